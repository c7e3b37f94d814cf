"""Smoke run of bench/throughput.py, so that it never rots (figures are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench/throughput.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
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
