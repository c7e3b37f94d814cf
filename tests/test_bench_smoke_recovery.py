"""Smoke run of bench/recovery_matrix.py on two cheap scenarios, so that it never rots.
What the rows say is asserted (a short exception burst is ridden through; a latched HV
fault needs one reset; both reels finish with no false accept), never timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_bench


@pytest.mark.slow
def test_recovery_matrix_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, md = tmp_path / "matrix.json", tmp_path / "matrix.md"
    assert (
        load_bench("recovery_matrix").main(["--smoke", "--json", str(out), "--markdown", str(md)])
        == 0
    )
    res = json.loads(out.read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["exc_burst_short", "hv_fault"]
    assert res["errors"] == []
    assert res["false_accepts"] == 0
    for name, r in rows.items():
        assert r["driven"], name
        assert r["finished"], name
        assert r["metres"] == r["planned_metres"] == 15, name
        assert r["false_accepts"] == 0, name
        assert r["bounds_violations"] == 0, name
        assert r["burns"] == 0, name
        assert sum(r["verdicts"].values()) == r["metres"], name
        assert r["not_in_spec"] == r["metres"] - r["verdicts"].get("in_spec", 0), name
    short = rows["exc_burst_short"]
    assert not short["left_running"]
    assert short["alarms"] == []
    assert short["action"] == "none"
    assert short["resets"] == 0
    assert short["unproven"] == 0
    assert short["met"] is True
    hv = rows["hv_fault"]
    assert hv["left_running"]
    assert "accelerator_fault" in hv["alarms"]
    assert hv["resets"] == 1
    assert hv["restarts"] == 0
    assert hv["action"] == "1 reset"
    assert hv["fault_to_running_s"] is not None
    assert hv["fault_to_running_s"] > 0
    assert hv["met"] is True
    text = capsys.readouterr().out
    assert "| fault | left RUNNING |" in text
    assert md.read_text().count("\n") == 2 + len(rows)


def test_recovery_matrix_rows_and_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    mod = load_bench("recovery_matrix")
    assert mod.classify(mod.Row("x", "f", "none")) == "none"
    assert mod.classify(mod.Row("x", "f", "none", resets=2)) == "2 resets"
    assert mod.classify(mod.Row("x", "f", "none", resets=1, restarts_started=1)) == (
        "1 reset + 1 start_reel"
    )
    assert mod.classify(mod.Row("x", "f", "none", resets=1, restarts=1)) == "restart"
    # A scenario the simulators cannot drive says so in its row.
    row = mod.Row("x", "stall", "1 reset", driven=False, not_driven="cannot")
    assert "not driven: cannot" in mod.markdown([row])
    with pytest.raises(SystemExit):
        mod.main(["--only", "no_such_fault"])
    assert mod.main(["--list"]) == 0
    assert "hv_fault" in capsys.readouterr().out
