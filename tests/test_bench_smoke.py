"""Smoke runs of the benchmark scripts, so that none of them rots (figures are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_link_throughput_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "link.json"
    assert _load("link_throughput").main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["blocks_per_poll"] == 2
    assert res["bare_polls_per_s"] > 0
    assert res["link_polls_per_s"] > 0
    assert res["reconnects_measured"] == res["restarts"] == 1
    assert "ratio link/bare" in capsys.readouterr().out
