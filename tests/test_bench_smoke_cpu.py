"""Smoke run of bench/cpu_per_cycle.py, so that it never rots. The shape of the JSON and
the arithmetic of its figures are asserted, never the CPU figures themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["side-by-side", "sequential"])
def test_cpu_per_cycle_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str) -> None:
    out = tmp_path / "cpu.json"
    args = ["--rounds", "1", "--seconds", "1", "--settle-s", "0.3", "--json", str(out)]
    assert load_bench("cpu_per_cycle").main([*args, "--mode", mode]) == 0
    res = json.loads(out.read_text())
    assert res["rate_hz"] == 100
    assert res["mode"] == mode
    phases = res["phases"]
    assert list(phases) == ["bare", "rest", "reel"]
    (raw,) = res["rounds_raw"]
    for name, p in phases.items():
        r = raw[name]
        # Each phase cycled at its rate for the measured second and burnt some CPU.
        assert r["cycles"] > 0, name
        assert r["cycles"] + r["missed"] == pytest.approx(r["expected_cycles"], abs=5), name
        assert r["cpu_s"] > 0, name
        assert p["cpu_ms_per_cycle"] > 0, name
        assert p["cpu_ms_per_cycle"] == pytest.approx(1000.0 * r["cpu_s"] / r["cycles"], rel=5e-3)
        assert p["user_ms_per_cycle"] + p["sys_ms_per_cycle"] == pytest.approx(
            p["cpu_ms_per_cycle"], abs=2e-4
        )
        # Both PLCs' planned blocks read every cycle (one per table, two tables each).
        assert p["requests_per_cycle"]["read"] == pytest.approx(4.0, abs=0.1), name
    # The controller phases ran the line as asked, and wrote the PLCs every cycle.
    assert set(raw["rest"]["states"]) == {"ready"}
    assert set(raw["reel"]["states"]) == {"running"}
    assert phases["reel"]["requests_per_cycle"]["write"] > 0
    bare = phases["bare"]["cpu_ms_per_cycle"]
    for name in ("rest", "reel"):
        ratio = res["ratios"][name]
        expect = round(phases[name]["cpu_ms_per_cycle"] / bare, 3)
        assert ratio["per_round"] == [pytest.approx(expect, abs=1e-3)]
        assert ratio["median"] == pytest.approx(expect, abs=1e-3)
        assert ratio["met"] is (ratio["median"] <= 2.5)
    text = capsys.readouterr().out
    assert "CPU ms/cycle" in text
    assert "controller (reel) / bare poll" in text


def test_cpu_per_cycle_rejects_bad_arguments() -> None:
    mod = load_bench("cpu_per_cycle")
    for bad in (
        ["--phases", "bare,idle"],
        ["--rate", "0.5"],
        ["--seconds", "0"],
        ["--mode", "parallel"],
        ["--worker", "reel"],  # a worker needs its --workdir
    ):
        with pytest.raises(SystemExit):
            mod.main(bad)
