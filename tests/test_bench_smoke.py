"""Smoke runs of the benchmark scripts, so that none of them rots (figures are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_link_throughput_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "link.json"
    assert load_bench("link_throughput").main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["blocks_per_poll"] == 2
    assert res["bare_polls_per_s"] > 0
    assert res["link_polls_per_s"] > 0
    assert res["reconnects_measured"] == res["restarts"] == 1
    assert "ratio link/bare" in capsys.readouterr().out


@pytest.mark.slow
def test_dose_accuracy_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dose.json"
    assert load_bench("dose_accuracy").main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    clean = res["scenarios"]["clean"]
    assert clean["finished"] == 1
    assert clean["metres"] == 4
    assert clean["metres_with_dose"] == 4
    assert res["all"]["false_accepts"] == 0
    assert {g["name"] for g in res["goals"]} >= {"p99 dose error, % of target", "false accepts"}
    assert "p99 dose error" in capsys.readouterr().out


def _needs_mosquitto() -> None:
    from broker import mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("the MQTT benchmarks need mosquitto (MQTT 5 broker)")


@pytest.mark.slow
def test_telemetry_latency_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _needs_mosquitto()
    out = tmp_path / "latency.json"
    assert load_bench("telemetry_latency").main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["broker"].startswith(("mosquitto", "amqtt"))
    assert res["replay"] is None  # the smoke run has no broker outage
    [rnd] = res["rounds"]
    assert rnd["round"] == 1
    assert rnd["cycles"] > 0
    assert rnd["cycles_not_running"] == 0  # the reel ran through the whole round
    # Values change every cycle while the reel runs: live messages arrived and were timed.
    assert rnd["count"] > 0
    assert res["pooled"]["count"] == rnd["count"]
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        assert isinstance(res["pooled"][key], float | int)
    assert res["pooled"]["p50_ms"] <= res["pooled"]["p99_ms"] <= res["pooled"]["max_ms"]
    assert res["pooled"]["min_ms"] >= 0  # received after the sample, on the same clock
    assert {g["name"] for g in res["goals"]} == {"live latency p99, ms (pooled)"}
    assert "live latency p99" in capsys.readouterr().out


@pytest.mark.slow
def test_store_forward_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _needs_mosquitto()
    out = tmp_path / "store_forward.json"
    assert load_bench("store_forward").main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["by_kind"]) == {"metres", "reel", "alarm", "audit", "ALL"}
    everything = res["by_kind"]["ALL"]
    assert res["reel_finished"] is True
    # Behaviour, not timing: every record the store produced reached the subscriber,
    # including those written while the broker was down, and those came marked historical.
    assert everything["produced"] > 0
    assert everything["during_outage"] > 0
    assert everything["lost"] == 0
    assert everything["delivered"] == everything["produced"]
    assert res["lost_seqs"] == res["unknown_seqs"] == res["misfiled"] == []
    assert everything["historical"] >= everything["during_outage"]
    assert res["by_kind"]["reel"]["delivered"] == 2  # the reel's start and end
    assert res["cursor_at_end"] == res["last_seq_at_end"]
    assert res["problems"] == []
    assert "records lost" in capsys.readouterr().out
