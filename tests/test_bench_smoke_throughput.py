"""Smoke run of bench/throughput.py, so that it never rots (figures are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = load_bench("throughput")
    out = tmp_path / "throughput.json"
    assert mod.main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    assert run["metres"] == 20
    assert run["false_accepts"] == 0
    # Scrap can never be less than the geometry allows: the pass span is dosed either way.
    assert run["start_scrap_m"] >= run["geometric_min_m"]
    assert run["stop_scrap_m"] >= run["geometric_min_m"]
    assert set(res["summary"]) == {"speed_of_limit", "start_scrap_of_min", "stop_scrap_of_min"}
    assert "steady speed / physical limit" in capsys.readouterr().out
