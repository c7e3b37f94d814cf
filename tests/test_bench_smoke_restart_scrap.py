"""Smoke run of bench/restart_scrap.py, so that it never rots. Behaviour and the shape of
the JSON are asserted, never the scrap figures (the bench measures those on the
reference line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench


@pytest.mark.slow
def test_restart_scrap_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "restart_scrap.json"
    assert load_bench("restart_scrap").main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["errors"] == []
    assert res["false_accepts"] == 0
    trials = {t["mode"]: t for t in res["trials"]}
    assert set(trials) == {"planned", "sigkill"}
    for mode, t in trials.items():
        # The reel was restarted mid-reel at full speed, then finished: every metre
        # recorded once, the reel closed at its planned length.
        tl = t["timeline_s"]
        assert tl["t_restart"] is not None, mode
        assert tl["speed_at_restart_m_min"] >= 0.98 * t["recipe"]["full_speed_m_min"], mode
        assert tl["position_at_restart_m"] >= t["restart_at_m"], mode
        assert tl["t_standstill"] is not None, mode
        assert tl["t_moving_again"] is not None, mode
        assert t["recorded_once_each"], mode
        assert t["recorded"] == t["planned_metres"] == 7, mode
        assert t["missing"] == 0, mode
        assert t["reel_state"] == "closed", mode
        assert t["integrity"] == "ok", mode
        # The counts add up and agree with the truth: no false accept, no burn, every
        # gap's bounds hold the true dose.
        assert sum(t["verdicts"].values()) == t["recorded"], mode
        assert t["not_in_spec"] == t["recorded"] - t["verdicts"].get("in_spec", 0), mode
        assert len(t["not_in_spec_detail"]) == t["not_in_spec"], mode
        assert t["false_accepts"] == 0, mode
        assert t["bounds_violations"] == 0, mode
        assert t["burns"] == 0, mode
        assert t["unproven"] == t["verdicts"].get("unproven", 0), mode
        # The second run resumed the checkpointed reel (its log says so).
        assert any("resumed from its checkpoint" in ln for ln in t["log"]), mode
    assert trials["planned"]["reel_start_hook_on_resume"] == []
    assert trials["sigkill"]["first_returncode"] == -9
    assert trials["sigkill"]["second_returncode"] == 0
    assert "NOT IN SPEC" in capsys.readouterr().out
