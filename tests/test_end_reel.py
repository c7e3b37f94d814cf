"""`end_reel`: an unfinished reel ended short of its length, in the run that stopped it
and after a restart, against the simulators (real time, compact line).

What it must show: refused while the line moves, for another reel and with the PLCs
away; accepted when stopped; every metre that reached the beam recorded (the final ones
as they were, the rest unproven, never in spec), nothing beyond; the reel closed with who
and why; another reel can start, the ended one's id cannot be used again.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from e2e_scenarios import TRUE_K, line_service, open_reel_in_records, operator_config, wait_for

from linectl.commands import Command, CommandName, CommandResult
from linectl.config import LoadedConfig
from linectl.core.control import LineState
from linectl.core.ledger import Verdict
from linectl.service import LineService, select_recipe
from linectl.store import RecordStore
from simulators.server import SimulatedLine

pytestmark = pytest.mark.slow

OP = "op-1"
STOPPED = (LineState.READY, LineState.IDLE)


def _start(reel_id: str, length_m: float = 500.0) -> Command:
    return Command(CommandName.START_REEL, OP, reel_id=reel_id, length_m=length_m)


def _end(reel_id: str, reason: str = "cable cut at the take-up") -> Command:
    return Command(CommandName.END_REEL, OP, reel_id=reel_id, reason=reason)


async def _stop_line(svc: LineService) -> None:
    res = await svc.execute(Command(CommandName.STOP, OP))
    assert res.ack, res
    await wait_for(lambda: svc.ctl.state in STOPPED, 60.0, "the line stopped")


def _nak(res: CommandResult, reason: str) -> None:
    assert not res.ack, res
    assert reason in res.reason, res


def _truth(sim: SimulatedLine, reached: int) -> list[float]:
    """The simulator's true dose of metres 0..reached (the next reel's start clears it)."""
    return [sim.plant.truth.dose_kgy(i) for i in range(reached + 1)]


def _check_ended(cfg: LoadedConfig, reel_id: str, reached: int, truth: list[float]) -> None:
    """The reel closed with who and why; metres 0..reached-1 each once, none beyond; no
    metre in spec that is not, by the simulator's truth (taken before the next reel)."""
    recipe, _ = select_recipe(cfg, None)
    with RecordStore(cfg.line.records.path) as store:
        reel = store.reel(reel_id)
        metres = store.metres(reel_id)
    assert reel.state == "closed"
    assert reel.end_reason == f"ended by {OP}: cable cut at the take-up"
    assert [m.index for m in metres] == list(range(reached))
    assert truth[reached] == 0.0, "cable beyond the end got dose"
    for m in metres:
        if m.verdict is Verdict.IN_SPEC:
            true = truth[m.index]
            assert recipe.min_dose_kgy <= true <= recipe.max_dose_kgy, f"false accept {m}"


async def _next_reel_starts(svc: LineService, ended: str) -> None:
    _nak(await svc.execute(_start(ended)), "a reel id is used once")
    await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
    res = await svc.execute(_start(f"{ended}-NEXT", 3.0))
    assert res.ack, res


async def _reel_under_way(svc: LineService, reel_id: str, metres: int) -> None:
    """Start `reel_id` once the line is READY and wait for `metres` metres recorded."""
    await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
    assert (await svc.execute(_start(reel_id))).ack
    await wait_for(lambda: svc.records_written >= metres, 60.0, f"{metres} metres recorded")


def _reached(svc: LineService, cfg: LoadedConfig) -> int:
    """Metres that have reached pass 0 (all of them or a part), by the ledger's position."""
    assert svc.ledger is not None
    assert svc.ledger.position_m is not None
    return math.ceil(svc.ledger.position_m - cfg.line.geometry.first_pass_offset_m - 1e-9)


def _at_rest_s(svc: LineService) -> float:
    since, report = svc.line.at_rest_since_s, svc.report
    return -1.0 if since is None or report is None else report.t_s - since


def _unchanged(svc: LineService) -> tuple[object, ...]:
    """What a refused end_reel must leave as it was (the line at rest)."""
    reel = svc.ctl.reel
    ledger = svc.ledger
    return (
        None if reel is None else reel.plan,
        None if ledger is None else (ledger.next_metre, ledger.position_m),
        svc.records_written,
    )


async def test_end_a_reel_in_the_same_run_after_a_fault(tmp_path: Path) -> None:
    cfg = operator_config(tmp_path, OP)
    async with SimulatedLine(cfg, seed=21, k_dose_true=TRUE_K) as sim:
        async with line_service(cfg, sim) as svc:
            await _reel_under_way(svc, "END-1", 4)
            _nak(await svc.execute(_end("END-1")), "stop the line first (state running)")
            # A latched HV fault: FAULT at once, while the conveyor still ramps down.
            sim.faults.latch("accelerator", 2)
            await wait_for(lambda: svc.ctl.state is LineState.FAULT, 10.0, "FAULT")
            assert sim.plant.conveyor.speed_m_min > 1.0, "the line stopped too soon to test"
            _nak(await svc.execute(_end("END-1")), "must be at rest")
            assert svc.ctl.reel is not None
            assert svc.ctl.reel.plan.reel_id == "END-1"

            await wait_for(lambda: _at_rest_s(svc) >= 1.2, 30.0, "the line at rest for 1.2 s")
            before = _unchanged(svc)
            _nak(await svc.execute(_end("OTHER")), "the unfinished reel is 'END-1', not 'OTHER'")
            _nak(await svc.execute(Command(CommandName.END_REEL, OP, reel_id="END-1")), "reason")
            assert _unchanged(svc) == before, "a refused end_reel changed something"
            assert svc.ledger is not None
            final = svc.ledger.next_metre
            reached = _reached(svc, cfg)
            assert reached > final  # cable under the passes: incomplete metres to record

            res = await svc.execute(_end("END-1"))
            assert res.ack, res
            assert res.state == "fault"
            assert res.detail == {"reel_id": "END-1", "metres_unproven": reached - final}
            assert svc.ctl.reel is None
            _nak(await svc.execute(_end("END-1")), "no unfinished reel")
            assert (await svc.execute(Command(CommandName.RESET, OP))).ack
            truth = _truth(sim, reached)
            await _next_reel_starts(svc, "END-1")
        _check_ended(cfg, "END-1", reached, truth)
        with RecordStore(cfg.line.records.path) as store:
            metres = store.metres("END-1")
            events = [e for e in store.events("END-1") if e.action == "end_reel"]
        for m in metres[final:]:
            assert m.verdict is Verdict.UNPROVEN, m
            assert "incomplete" in m.causes, m
        # In the reel's audit trail: the four refusals while it was on the line and the
        # command that ended it (the refusal after it belongs to no reel).
        assert [(e.actor, e.accepted) for e in events] == [(OP, False)] * 4 + [(OP, True)]


async def test_end_an_interrupted_reel_after_a_restart(tmp_path: Path) -> None:
    cfg = operator_config(tmp_path, OP)
    async with SimulatedLine(cfg, seed=22, k_dose_true=TRUE_K) as sim:
        async with line_service(cfg, sim) as first:
            await _reel_under_way(first, "END-2", 3)
        # The clean stop left the reel open, to be resumed.
        with RecordStore(cfg.line.records.path) as store:
            assert store.reel("END-2").state == "open"
            final = len(store.metres("END-2"))
        # The recipe file is edited meanwhile: the resumed reel, and the next one on the
        # recipe it brings back, name the bytes validated at END-2's start.
        _, recipe_path = select_recipe(cfg, None)
        recipe_path.write_text(recipe_path.read_text() + "\n# edited while linectl was down\n")

        async with line_service(cfg, sim) as second:
            await wait_for(
                lambda: second.ctl.state is LineState.READY and _at_rest_s(second) >= 1.2,
                30.0,
                "READY and at rest, the interrupted reel's position known",
            )
            assert second.interrupted_reel() is not None
            # A clean stop checkpoints the ledger: the restart resumed it where it was,
            # so the metres under the passes are still open (incomplete), not lost.
            assert second.ledger is not None
            assert second.ledger.next_metre == final
            reached = _reached(second, cfg)
            assert reached > final
            res = await second.execute(_end("END-2"))
            assert res.ack, res
            assert res.detail == {"reel_id": "END-2", "metres_unproven": reached - final}
            assert second.interrupted_reel() is None
            truth = _truth(sim, reached)
            await _next_reel_starts(second, "END-2")
        _check_ended(cfg, "END-2", reached, truth)
        with RecordStore(cfg.line.records.path) as store:
            rest = store.metres("END-2")[final:]
            assert store.reel("END-2-NEXT").recipe_hash == store.reel("END-2").recipe_hash
        assert rest
        # Nothing was lost to the restart: the only unproven metres are the ones the
        # cut left under the passes.
        for m in rest:
            assert m.verdict is Verdict.UNPROVEN, m
            assert "incomplete" in m.causes, m
            assert "controller down" not in m.causes, m


async def test_end_a_reel_that_never_started(tmp_path: Path) -> None:
    # Opened in the records, never started (no cable accounted): ended with no metres.
    cfg = operator_config(tmp_path, OP)
    open_reel_in_records(cfg, "END-3", 50.0)
    async with SimulatedLine(cfg, seed=23, k_dose_true=TRUE_K) as sim:
        # As `linectl run --exit-after-reel`: ending the reel ends the run.
        async with line_service(cfg, sim, exit_when_done=True) as svc:
            await wait_for(lambda: _at_rest_s(svc) >= 1.2, 30.0, "at rest")
            assert svc.interrupted_reel() is not None
            _nak(await svc.execute(_start("END-3-B")), "END-3")  # it holds the line
            res = await svc.execute(_end("END-3"))
            assert res.ack, res
            assert res.detail == {"reel_id": "END-3", "metres_unproven": 0}
            await wait_for(svc._stop.is_set, 5.0, "the run told to end")
        _check_ended(cfg, "END-3", 0, _truth(sim, 0))
