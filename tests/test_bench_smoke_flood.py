"""Smoke run of bench/command_flood.py, so that it never rots. The shape of the JSON and
that the operator was answered in every scenario are asserted, never timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from broker import mosquitto_binary
from conftest import load_bench


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_binary() is None, reason="needs mosquitto (MQTT 5)")
def test_command_flood_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "flood.json"
    argv = ["--seconds", "2", "--rate", "200", "--grace-s", "3", "--settle-s", "0.5"]
    assert load_bench("command_flood").main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [s["scenario"] for s in res["scenarios"]] == ["baseline", "intruder", "authorised"]
    assert res["goal_answer_p99_ms"] == pytest.approx(res["cycle_period_s"] * 1000 + 50)
    for s in res["scenarios"]:
        op = s["operator"]
        # op-1 sent every 0.5 s and got an answer to each (ACK or NAK, both answers).
        assert op["sent"] >= 3
        assert op["answered"] == op["sent"]
        assert op["unanswered"] == 0
        assert sum(op["results"].values()) == op["answered"]
        assert 0 < op["p50_ms"] <= op["p99_ms"] <= op["max_ms"]
        c = s["cycle"]
        assert c["cycles"] > 0
        assert c["missed"] >= 0
        assert 0 <= c["lateness_p50_ms"] <= c["lateness_p99_ms"] <= c["lateness_max_ms"]
        m = s["rss_mb"]
        assert 0 < m["before"] <= m["peak"]
        assert m["growth"] == pytest.approx(m["after"] - m["before"], abs=0.2)
        assert s["line_state_after"] == "ready"  # nothing the flood sent moved the line
        assert s["audit_rows"].get("op-1") == op["sent"]
    base, intruder, authorised = res["scenarios"]
    assert base["flood"] is None
    for s, sender in ((intruder, "intruder"), (authorised, "op-2")):
        fl = s["flood"]
        assert fl["sender"] == sender
        assert fl["target_per_s"] == 200
        assert fl["sent"] > 0
        assert fl["acked_per_s"] > 0
        assert s["received_by_linectl_per_s"] > 0
    assert intruder["refused_unread"] > 0
    assert "intruder" not in intruder["audit_rows"]  # aggregated, never a row per message
    goals = {g["name"]: g for g in res["goals"]}
    assert goals["intruder: op-1 unanswered"]["met"] is True
    assert "authorised: RSS growth, MB" in goals
    text = capsys.readouterr().out
    assert "op p99" in text
    assert "late p99" in text
