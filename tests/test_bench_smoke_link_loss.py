"""Smoke run of bench/link_loss.py, so that it never rots. Behaviour and the shape of the
JSON are asserted, never timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench


@pytest.mark.slow
def test_link_loss_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "link_loss.json"
    assert load_bench("link_loss").main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    modes = {m["mode"]: m for m in res["modes"]}
    assert set(modes) == {"closed", "half", "refused", "silent"}
    for name in ("closed", "half"):
        m = modes[name]
        assert m["trials"] == 1
        # The fault hit (one request left unanswered, one reconnect) and changed nothing.
        assert m["dropped_requests"] == 1
        assert m["beam_off"] == 0
        assert m["unchanged"] == 1
        assert m["transitions"] == []
        assert m["alarms"] == []
    for name in ("refused", "silent"):
        m = modes[name]
        # The beam went off at the accelerator and the line left RUNNING for OFFLINE.
        assert m["beam_off"] == m["trials"] == 1
        assert m["unchanged"] == 0
        assert "conveyor_link" in m["alarms"]
        assert any(t.startswith("running->offline") for t in m["transitions"])
        assert m["from_t0"]["p50_ms"] > 0
    assert modes["refused"]["cnv_connect_failures"] >= 1
    assert modes["silent"]["from_stale_exact"]["p50_ms"] is not None
    phases = res["lateness"]
    assert set(phases) == {"healthy", "silent", "healthy again"}
    assert phases["silent"]["conveyor"] == "silent"
    for p in phases.values():
        assert p["cycles"] > 0
        assert p["p99_ms"] is not None
    # The silent conveyor was seen as lost while the line stayed idle.
    assert "offline" in phases["silent"]["states"]
    assert "running" not in phases["silent"]["states"]
    assert "idle line, phase" in capsys.readouterr().out
