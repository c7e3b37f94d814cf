"""linectl.core.line on simulated time: the daemon's own per-cycle code (reel start,
checkpoints, resume after a restart, commands), driven without an event loop or a
socket against the simulators' plant physics and checked against its ground truth."""

from __future__ import annotations

import dataclasses

import pytest
from harness import ClosedLoop, decode_inputs

from linectl.commands import Command, CommandName
from linectl.config import LoadedConfig, Recipe
from linectl.core.control import LineState
from linectl.core.line import (
    AddMetres,
    Audit,
    CloseReel,
    CycleInput,
    Line,
    MarkUnproven,
    OpenReel,
    SaveState,
)


@pytest.fixture
def recipe(cfg: LoadedConfig) -> Recipe:
    """The bundled recipe (`cfg` is conftest's bundled configuration)."""
    return cfg.load_recipe("pv-1x6-en50618")


def stop_and_rest(cl: ClosedLoop) -> None:
    """Operator stop, then wait until the cable and the beam are at rest."""
    stop = cl.line.command(Command(CommandName.STOP, "op"))
    assert stop.ack, stop.reason
    assert cl.run_until(
        lambda: cl.ctl.state is LineState.READY and cl.plant.conveyor.speed_m_min == 0.0, 60.0
    )
    cl.run_for(2.0)  # the aligner and the ledger catch up with the standing line


def test_the_report_is_immutable_and_says_what_the_cycle_did(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    cl = ClosedLoop(cfg, recipe)
    cl.settle()
    report = cl.line.cycle(CycleInput(cl.t_s, "w", 0, None, None, acc_fresh=False))
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.state = LineState.RUNNING  # type: ignore[misc]
    # No PLC data: the line is offline and commands the safe state, heartbeat included.
    assert report.state is LineState.OFFLINE
    assert report.outputs.beam_on is False
    assert "watchdog" in report.acc_writes
    assert "watchdog" in report.cnv_writes


def test_a_reel_opens_at_the_standing_counter_and_records_every_metre(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    cl = ClosedLoop(cfg, recipe)
    cl.settle()
    regs = cl.plant.input_registers("conveyor")
    counter_before_m = float(decode_inputs(cfg.conveyor_map, regs)["length"]) * cl.units.length_to_m
    cl.start("R7", length_m=40.0)
    assert cl.run_until(lambda: cl.finished, 300.0)
    opened = [e for e in cl.effects if isinstance(e, OpenReel)]
    assert [(e.reel_id, e.planned_length_m) for e in opened] == [("R7", 40.0)]
    start = next(e for e in cl.effects if isinstance(e, SaveState) and e.key == "start")
    # Coordinate 0: the counter read on the standing line, before the first RUN.
    assert start.state["length_counter_m"] == pytest.approx(counter_before_m, abs=1e-3)
    assert [r.index for r in cl.records] == list(range(40))
    closes = [e for e in cl.effects if isinstance(e, CloseReel)]
    assert [(e.reel_id, e.reason) for e in closes] == [("R7", "planned length reached")]
    c = cl.compare()
    assert c.false_accepts == []
    assert c.in_spec == 40


def test_a_planned_restart_takes_the_reel_up_with_no_metre_lost(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    """Clean stop mid-reel, a new controller from the checkpoint (same PLC boot, the
    cable did not move): the reel finishes with every metre measured and in spec."""
    cl = ClosedLoop(cfg, recipe, seed=3)
    cl.settle()
    cl.start("PR", length_m=60.0)
    assert cl.run_until(lambda: cl.ledger is not None and (cl.ledger.position_m or 0) > 25, 120)
    stop_and_rest(cl)
    # The clean stop's last checkpoint: the one a restart resumes from.
    cl.effects += cl.line.checkpoint(
        CycleInput(cl.t_s, "w", round(cl.t_s * 1000), None, None)
    ).effects
    before = len(cl.records)
    cl.restart_controller()
    cl.run_for(5.0)  # the new controller sees both PLCs, then takes the reel up
    assert cl.run_until(lambda: cl.finished, 300.0), cl.ctl.why_not_ready()
    assert not any(isinstance(e, MarkUnproven) for e in cl.effects)
    assert [r.index for r in cl.records] == list(range(60))
    assert before > 0
    c = cl.compare()
    assert c.false_accepts == []
    assert c.verdicts == {"in_spec": 60}, c.verdicts
    resumed = [e for e in cl.effects if isinstance(e, Audit) and e.action == "start_reel"]
    assert resumed[-1].accepted
    assert resumed[-1].actor == "test"


def test_a_conveyor_restarted_while_linectl_was_away_closes_the_reel(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    """Its length counter restarted: where the cable stands is unknown. The rest of the
    reel is unproven ("position lost") and the reel is closed; nothing is in spec that
    cannot be shown to be."""
    cl = ClosedLoop(cfg, recipe, seed=4)
    cl.settle()
    cl.start("PL", length_m=60.0)
    assert cl.run_until(lambda: cl.ledger is not None and (cl.ledger.position_m or 0) > 25, 120)
    stop_and_rest(cl)
    recorded = len(cl.records)
    cl.plant.restart("conveyor", {"length": 123_456, "clock": 999})
    cl.restart_controller()
    assert cl.run_until(lambda: cl.line.ctl.reel is None, 60.0), cl.ctl.state
    lost = [e for e in cl.effects if isinstance(e, MarkUnproven)]
    assert len(lost) == 1
    assert lost[0].cause == "position lost"
    assert lost[0].first_metre <= recorded
    assert lost[0].last_metre == 59
    closes = [e for e in cl.effects if isinstance(e, CloseReel)]
    assert closes[-1].reel_id == "PL"
    assert "position lost" in closes[-1].reason
    assert cl.compare().false_accepts == []


def test_checkpoints_come_at_least_once_a_second_while_a_reel_runs(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    cl = ClosedLoop(cfg, recipe)
    cl.settle()
    cl.start("CK", length_m=200.0)
    cl.run_for(5.0)
    n = len([e for e in cl.effects if isinstance(e, AddMetres)])
    cl.run_for(10.0)
    saved = [e for e in cl.effects if isinstance(e, AddMetres)]
    assert len(saved) - n >= 10
    assert all("ledger" in e.checkpoint["ledger"] for e in saved[n:])


def test_a_refused_command_changes_nothing_and_is_audited_once(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    line = Line(cfg, recipe, "0" * 64, "pv-1x6-en50618")
    result = line.command(Command(CommandName.END_REEL, "op", reel_id="X", reason="r"))
    assert not result.ack
    assert result.reason == "no unfinished reel to end"
    report = line.cycle(CycleInput(0.05, "w", 50, None, None, acc_fresh=False, cnv_fresh=False))
    refusals = [e for e in report.effects if isinstance(e, Audit) and e.action == "end_reel"]
    assert [(e.accepted, e.reason) for e in refusals] == [(False, "no unfinished reel to end")]
    assert line.ctl.reel is None
    assert line.ledger is None


def test_a_resume_that_loses_the_position_never_starts_the_reel_afresh(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    """The samples that queued while the accelerator's data was missing come out
    together: the first finds the position lost; the next must not open a new ledger at
    a new coordinate 0 (it would overwrite the reel's start record)."""
    cl = ClosedLoop(cfg, recipe, seed=5)
    cl.settle()
    cl.start("QL", length_m=60.0)
    assert cl.run_until(lambda: cl.ledger is not None and (cl.ledger.position_m or 0) > 20, 120)
    stop_and_rest(cl)
    cl.plant.restart("conveyor", {"length": 654_321, "clock": 77})
    cl.restart_controller()
    mark = len(cl.effects)
    # Two cycles without an accelerator reading, well inside the aligner's wait: the
    # conveyor's samples wait for the next charge reading, and then go out together.
    cl.acc_link_up = False
    cl.run_for(0.1)
    cl.acc_link_up = True
    assert cl.run_until(lambda: cl.line.ctl.reel is None, 60.0), cl.ctl.state
    after = cl.effects[mark:]
    assert [e.cause for e in after if isinstance(e, MarkUnproven)] == ["position lost"]
    assert not [e for e in after if isinstance(e, SaveState) and e.key == "start"]
    assert cl.line.ledger is None


REEL_M = 130.0


def _crash_mid_reel(cl: ClosedLoop, reel_id: str, *, found: bool = True) -> int:
    """Run a reel to speed, crash linectl mid-reel for 6 s (the PLCs' watchdogs cut the
    beam and stop the line), restart it and run the reel to its end. The metres recorded
    before the restart."""
    cl.settle()
    cl.start(reel_id, length_m=REEL_M)
    assert cl.run_until(lambda: cl.ledger is not None and (cl.ledger.position_m or 0) > 40, 120)
    assert cl.ctl.state is LineState.RUNNING
    before = len(cl.records)
    cl.crash_for(6.0)
    # The PLCs made the line safe by themselves: beam off by its watchdog, line stopped.
    assert cl.plant.accelerator.fault_code == 7
    assert cl.plant.conveyor.fault_code == 5
    assert cl.plant.conveyor.speed_m_min == 0.0
    cl.restart_controller(found=found)
    assert cl.run_until(lambda: cl.finished, 300.0), cl.ctl.why_not_ready()
    return before


def test_a_crash_mid_reel_costs_nothing_where_the_plcs_held_their_set_points(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    """After a crash the ledger bounds the gap's charge per metre by what the PLCs held
    (core/held_gap.py): the cable that crossed the beam while linectl was away is shown
    in spec within its bounds, where the counters alone ("none to all of it") cannot."""
    # The reference line's geometry: 16 passes 6 m apart, so the 3 m that cross the
    # beam while linectl is away each miss one pass at most (112.5 of 120 kGy).
    cl = ClosedLoop(cfg, recipe, seed=6, geometry=cfg.line.geometry)
    before = _crash_mid_reel(cl, "CR")
    assert before < 40
    c = cl.compare()
    assert c.false_accepts == []
    assert c.outside_bounds == []
    assert cl.max_beam_standstill_s == 0.0
    assert [r.index for r in cl.records] == list(range(int(REEL_M)))
    gap = [r for r in cl.records if "gap" in r.causes]
    assert len(gap) >= 3, "the crash's gap touched no metre: the test shows nothing"
    assert all(r.in_spec for r in gap), [(r.index, r.verdict, r.max_dose_kgy) for r in gap]
    assert c.verdicts == {"in_spec": int(REEL_M)}, c.verdicts
    assert not any(isinstance(e, MarkUnproven) for e in cl.effects)
    assert "gap_bound_refuted" not in cl.ledger_events


def test_a_crash_without_the_plcs_first_readings_falls_back_to_the_counters_alone(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    """The same crash, but the set-points the PLCs held are not known (no first reading):
    the gap's metres straddle the upper limit and are unproven, none falsely accepted."""
    cl = ClosedLoop(cfg, recipe, seed=6, geometry=cfg.line.geometry)
    _crash_mid_reel(cl, "CB", found=False)
    c = cl.compare()
    assert c.false_accepts == []
    assert c.outside_bounds == []
    unproven = [r for r in cl.records if r.verdict.value == "unproven"]
    assert unproven
    assert all("gap" in r.causes for r in unproven)


@pytest.mark.parametrize("code", [1, 4])
def test_a_crash_with_another_conveyor_fault_gets_no_held_gap_bound(
    cfg: LoadedConfig, recipe: Recipe, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A drive fault or an e-stop while linectl was away: the conveyor may have slowed
    under the beam, so the held-gap bound is not used; nothing is falsely accepted."""
    cl = ClosedLoop(cfg, recipe, seed=7)
    cl.settle()
    cl.start("CF", length_m=80.0)
    assert cl.run_until(lambda: cl.ledger is not None and (cl.ledger.position_m or 0) > 30, 120)
    cl.crash_for(0.2)
    cl.plant.conveyor.fault(code)
    cl.crash_for(6.0)
    caplog.set_level("INFO", logger="linectl.line")
    cl.restart_controller()
    cl.run_for(10.0)  # a fault other than a watchdog trip waits for an operator reset
    assert f"conveyor fault code {code}" in caplog.text
    assert cl.compare().false_accepts == []
