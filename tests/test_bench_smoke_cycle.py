"""Smoke runs of bench/control_cycle.py and bench/interlock_latency.py, so that neither
rots. Behaviour and the shape of the JSON are asserted, never timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_control_cycle_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cycle.json"
    assert load_bench("control_cycle").main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    (rate,) = res["rates"]
    assert rate["rate_hz"] == 100
    assert rate["period_s"] == pytest.approx(0.01)
    (rnd,) = rate["rounds"]
    # The service ran at its rate for the measured second, RUNNING all along.
    assert rnd["cycles"] > 0
    assert rnd["cycles"] + rnd["missed"] == pytest.approx(rnd["expected_cycles"], abs=3)
    assert rnd["cycles_not_running"] == 0
    assert rate["cycles"] == rnd["cycles"]
    for fig in ("duration", "lateness", "bare_loop_lateness"):
        f = rate[fig]
        assert 0 <= f["p50_ms"] <= f["p99_ms"] <= f["max_ms"]
    assert rate["lateness_p99_ms_median_of_rounds"] == rate["lateness"]["p99_ms"]
    # CPU of the controller measured apart from the simulator's (its own process).
    assert rate["cpu_pct_median"] > 0
    assert rate["sim_cpu_pct_median"] is None or rate["sim_cpu_pct_median"] > 0
    assert res["sim"].startswith("separate process")
    assert res["baseline_s"] == 0.5
    assert len(res["load_avg_start"]) == 3
    goals = {g["name"]: g for g in res["goals"]}
    goal = goals["100 Hz lateness p99, ms (median of rounds)"]
    assert goal["goal"] == "<= 2"
    assert goal["met"] is (goal["measured"] <= 2.0)
    text = capsys.readouterr().out
    assert "late p99" in text
    assert "100 Hz lateness p99" in text


def test_control_cycle_rejects_bad_rates() -> None:
    mod = load_bench("control_cycle")
    with pytest.raises(SystemExit):
        mod.main(["--rates", "0.5"])
    with pytest.raises(SystemExit):
        mod.main(["--rates", "fast"])


def test_control_cycle_period_is_validated(tmp_path: Path) -> None:
    # At 1 Hz the 0.7 s acc_lost_hold_s no longer covers the watchdog plus two cycles;
    # model_copy alone would not have noticed.
    sys.path.insert(0, str(ROOT / "tests"))
    import e2e_scenarios as sc

    from linectl.config import load_config

    mod = load_bench("control_cycle")
    cfg = load_config(sc.compact_config(tmp_path), environ={})
    assert mod.with_period(cfg, 0.01).cycle_period_s == 0.01
    with pytest.raises(ValueError, match="acc_lost_hold_s"):
        mod.with_period(cfg, 1.0)


@pytest.mark.slow
def test_interlock_latency_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "interlock.json"
    assert load_bench("interlock_latency").main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    results = res["results"]
    # Both simulator set-ups: the child process over its pipes, and in this loop.
    assert [r["sim"] for r in results] == ["process", "inproc"]
    for r in results:
        assert r["rate_hz"] == 100
        assert r["trials"] == res["trials_per_rate"] == 1
        # Every e-stop saw its beam-off write at the accelerator PLC, via the interlock.
        assert r["beam_off_seen"] == r["trials"]
        assert all(x is not None and x > 0 for x in r["latencies_ms"])
        assert r["estop_alarm_every_trial"]
        assert r["estop_cause_every_trial"]
        assert r["off_after_detect_every_trial"]
        assert "estop" in r["alarms"]
        assert r["goal_ms"] == pytest.approx(2 * 10 + 10)
        assert r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        # The split adds up: e-stop -> the cycle that saw it -> the write at the PLC.
        assert r["detect_p50_ms"] + r["react_p50_ms"] == pytest.approx(r["p50_ms"], abs=0.02)
        assert r["met"] is (r["p99_ms"] <= r["goal_ms"])
    text = capsys.readouterr().out
    assert "goal ms" in text
    assert "process" in text
