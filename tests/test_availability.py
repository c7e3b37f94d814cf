"""Availability: the line keeps running through what is transient, restarts never trip a
watchdog, and a fault is recovered without a restart dance (real time, simulators).

Every scenario is judged by the interface contract (plc-interface.md), not by what the
bundled simulators happen to do, and every reel's records against the simulator's
ground truth: no metre recorded in spec that is not, and no dose on cable beyond the reel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from e2e_scenarios import TRUE_K, line_service, operator_config, wait_for

from linectl.commands import Command, CommandName
from linectl.config import LoadedConfig
from linectl.core.control import LineState, Transition
from linectl.core.ledger import Verdict
from linectl.service import LineService, ReelRequest, select_recipe
from linectl.store import RecordStore
from simulators import server
from simulators.server import SimulatedLine

pytestmark = pytest.mark.slow

OP = "op-1"
STOPPED = (LineState.READY, LineState.IDLE)


@contextlib.asynccontextmanager
async def _line(
    cfg: LoadedConfig, sim: SimulatedLine, *, reset_faults: bool = False
) -> AsyncIterator[tuple[LineService, list[Transition]]]:
    """The line service on the simulators, with every transition it made; stopped
    safely on exit."""
    async with line_service(cfg, sim, reset_faults=reset_faults) as svc:
        transitions: list[Transition] = []
        svc.on_transition.append(transitions.append)  # before the service's first cycle
        yield svc, transitions


def _no_watchdog_trip(sim: SimulatedLine) -> None:
    acc, cnv = sim.plant.accelerator, sim.plant.conveyor
    assert not acc.watchdog_trip, "accelerator watchdog tripped"
    assert not cnv.watchdog_trip, "conveyor watchdog tripped"
    assert not acc.fault_latched, f"accelerator fault {acc.fault_code_latched}"
    assert not cnv.fault_latched, "conveyor fault latched"


def _check_records(cfg: LoadedConfig, sim: SimulatedLine, reel_id: str) -> list[Verdict]:
    """Zero false accepts, metres numbered without a hole; the verdicts."""
    recipe, _ = select_recipe(cfg, None)
    with RecordStore(cfg.line.records.path) as store:
        metres = store.metres(reel_id)
    assert [m.index for m in metres] == list(range(len(metres)))
    for m in metres:
        if m.verdict is Verdict.IN_SPEC:
            true = sim.plant.truth.dose_kgy(m.index)
            assert recipe.min_dose_kgy <= true <= recipe.max_dose_kgy, f"false accept {m}"
    return [m.verdict for m in metres]


async def _run_reel(svc: LineService, reel_id: str, length_m: float) -> None:
    await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
    res = await svc.execute(Command(CommandName.START_REEL, OP, reel_id=reel_id, length_m=length_m))
    assert res.ack, res
    await wait_for(lambda: svc.ctl.state is LineState.RUNNING, 30.0, "RUNNING")


# --------------------------------------------------------------------------- watchdogs


async def test_restarts_never_trip_an_armed_watchdog(tmp_path: Path) -> None:
    """A PLC's watchdog, once armed, stays armed (plc-interface.md): a clean exit leaves
    it armed with timeout 0, and the next start must change the heartbeat before it
    writes the timeout, or the PLC trips at that write. Three starts, each after the
    last one's exit plus more than the timeout."""
    cfg = operator_config(tmp_path, OP)
    async with SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=3, k_dose_true=TRUE_K) as sim:
        for _ in range(3):
            async with _line(cfg, sim) as (svc, _tr):
                await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
                await asyncio.sleep(1.0)  # two watchdog timeouts of running
                _no_watchdog_trip(sim)
                assert sim.plant.accelerator.watchdog.armed
            await asyncio.sleep(0.8)  # longer than the 500 ms timeout, with no heartbeat
            assert sim.plant.accelerator.watchdog.armed, "the PLC keeps it armed"
            _no_watchdog_trip(sim)


async def test_watchdog_trips_left_by_an_absent_controller_are_reset_at_start(
    tmp_path: Path,
) -> None:
    """Watchdog trips (accelerator 7, conveyor 5) that linectl's absence caused are reset
    once both PLCs answer, audited as the controller's action."""
    cfg = operator_config(tmp_path, OP)
    async with SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=4, k_dose_true=TRUE_K) as sim:
        sim.faults.latch("accelerator", 7)
        sim.faults.latch("conveyor", 5)
        async with _line(cfg, sim) as (svc, _tr):
            await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
            _no_watchdog_trip(sim)
            assert not svc.ctl.alarms
    with RecordStore(cfg.line.records.path) as store:
        actions = [a for a in store.events() if a.action == "reset"]
    assert [(a.actor, a.accepted) for a in actions] == [("controller", True)]


async def test_other_latched_faults_are_never_reset_without_an_operator(tmp_path: Path) -> None:
    cfg = operator_config(tmp_path, OP)
    async with SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=5, k_dose_true=TRUE_K) as sim:
        sim.faults.latch("accelerator", 7)
        sim.faults.latch("conveyor", 1)  # a drive fault: not ours to reset
        async with _line(cfg, sim) as (svc, _tr):
            await wait_for(lambda: svc.ctl.state is LineState.FAULT, 30.0, "FAULT")
            await asyncio.sleep(1.0)
            assert svc.ctl.state is LineState.FAULT
            assert sim.plant.conveyor.fault_latched
            assert sim.plant.accelerator.fault_latched
            assert {"conveyor_fault", "accelerator_fault"} <= set(svc.ctl.alarms)


async def test_reset_faults_resets_a_conveyor_fault_latched_while_idle(tmp_path: Path) -> None:
    """`--reset-faults` acts after the first poll of both PLCs, on whatever either holds
    latched, in any state: a conveyor fault latched while the line was idle included."""
    cfg = operator_config(tmp_path, OP)
    async with SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=6, k_dose_true=TRUE_K) as sim:
        sim.faults.latch("conveyor", 1)
        sim.faults.latch("accelerator", 2)
        async with _line(cfg, sim, reset_faults=True) as (svc, _tr):
            await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
            _no_watchdog_trip(sim)


# --------------------------------------------------------------------------- ride through


@pytest.mark.parametrize("half", [False, True], ids=["closed", "half-answer"])
async def test_dropped_connections_are_ridden_through(tmp_path: Path, half: bool) -> None:
    """One connection closed mid-request (no answer, or half of one) every second on
    each PLC through a whole reel: no state change, no alarm, no metre unproven, the
    reel finishes."""
    cfg = operator_config(tmp_path, OP)
    async with (
        SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=7, k_dose_true=TRUE_K) as sim,
        _line(cfg, sim) as (svc, transitions),
    ):
        await _run_reel(svc, "RIDE", 40.0)
        before = len(transitions)
        mode = "half" if half else "close"
        sim.faults.drop_every("conveyor", 1.0, 600.0, mode)
        sim.faults.drop_every("accelerator", 1.3, 600.0, mode)
        await wait_for(lambda: svc.finished_reels == ["RIDE"], 120.0, "the reel finished")
        assert sim.requests("conveyor") > 0
        seen = [(t.old, t.new) for t in transitions[before:]]
        # Only the reel's own end: RUNNING -> STOPPING -> IDLE (-> READY).
        assert seen[:2] == [
            (LineState.RUNNING, LineState.STOPPING),
            (LineState.STOPPING, LineState.IDLE),
        ], seen
        assert all(t.new in (LineState.IDLE, LineState.READY) for t in transitions[before + 1 :])
        assert not svc.ctl.alarms
        assert svc.cnv.stats.reconnects >= 3, "the faults did act"
    verdicts = _check_records(cfg, sim, "RIDE")
    assert Verdict.UNPROVEN not in verdicts
    assert verdicts.count(Verdict.IN_SPEC) == 40


async def test_exception_burst_shorter_than_the_stale_window(tmp_path: Path) -> None:
    cfg = operator_config(tmp_path, OP)
    async with (
        SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=8, k_dose_true=TRUE_K) as sim,
        _line(cfg, sim) as (svc, transitions),
    ):
        await _run_reel(svc, "EXC", 20.0)
        before = len(transitions)
        sim.faults.exceptions("conveyor", 6, 0.12)  # server device busy
        await asyncio.sleep(1.0)
        sim.faults.exceptions("accelerator", 5, 0.12)
        await wait_for(lambda: svc.finished_reels == ["EXC"], 120.0, "the reel finished")
        assert [t.new for t in transitions[before:]][:1] == [LineState.STOPPING]
        assert not svc.ctl.alarms
    assert Verdict.UNPROVEN not in _check_records(cfg, sim, "EXC")


@pytest.mark.parametrize("mode", ["silent", "refused"])
async def test_conveyor_lost_beam_off_from_the_other_plc(tmp_path: Path, mode: str) -> None:
    """A conveyor that accepts and never answers, or refuses connections: the beam is
    switched off on the accelerator by linectl (not by a watchdog), and the silent PLC
    never delays the accelerator's writes (its heartbeat goes on: no trip)."""
    cfg = operator_config(tmp_path, OP)
    async with (
        SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=9, k_dose_true=TRUE_K) as sim,
        _line(cfg, sim) as (svc, _tr),
    ):
        await _run_reel(svc, "LOST", 200.0)
        await wait_for(lambda: svc.records_written >= 3, 60.0, "3 metres")
        if mode == "silent":
            sim.faults.silent("conveyor", 2.0)
        else:
            sim.faults.link_loss("conveyor", 2.0)
        await wait_for(lambda: not sim.plant.accelerator.beam_on_req, 5.0, "beam off")
        assert "conveyor_link" in svc.ctl.alarms
        assert svc.ctl.state is LineState.OFFLINE
        await asyncio.sleep(1.5)  # the accelerator is still written every cycle
        assert not sim.plant.accelerator.watchdog_trip
        assert not sim.plant.accelerator.fault_latched
        assert not svc.cnv.answering or mode == "silent"
    assert sim.plant.truth.burns == []
    _check_records(cfg, sim, "LOST")


# --------------------------------------------------------------------------- recovery


async def _reset_until_running(svc: LineService) -> None:
    async def reset() -> bool:
        res = await svc.execute(Command(CommandName.RESET, OP))
        return res.ack

    for _ in range(100):  # the PLC may still be on its way back
        if svc.ctl.state is not LineState.OFFLINE and await reset():
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("reset never accepted")
    await wait_for(lambda: svc.ctl.state is LineState.RUNNING, 60.0, "the reel running again")


@pytest.mark.parametrize("fault", ["hv", "link3s", "silent3s", "cnv_restart", "acc_restart"])
async def test_one_operator_reset_brings_the_reel_back(tmp_path: Path, fault: str) -> None:
    """A fault mid-reel stops the line; one operator reset, without restarting linectl,
    restarts it; the reel finishes, every metre recorded once and none beyond, with zero
    false accepts."""
    cfg = operator_config(tmp_path, OP)
    length_m = 30.0
    async with (
        SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=10, k_dose_true=TRUE_K) as sim,
        _line(cfg, sim) as (svc, _tr),
    ):
        await _run_reel(svc, "BACK", length_m)
        await wait_for(lambda: svc.records_written >= 5, 60.0, "5 metres")
        match fault:
            case "hv":
                sim.faults.latch("accelerator", 2)
            case "link3s":
                sim.faults.link_loss("conveyor", 3.0)
            case "silent3s":
                sim.faults.silent("conveyor", 3.0)
            case "cnv_restart":
                await sim.restart("conveyor", 0.3, counters={"length": 12_345, "clock": 7})
            case "acc_restart":
                await sim.restart(
                    "accelerator",
                    0.3,
                    counters={"charge_total": 99, "trip_count": 3, "clock": 11},
                )
        await wait_for(
            lambda: svc.ctl.state in (LineState.FAULT, LineState.OFFLINE), 10.0, "the stop"
        )
        await wait_for(lambda: svc.ctl.state is LineState.FAULT, 30.0, "FAULT, data back")
        await _reset_until_running(svc)
        await wait_for(lambda: svc.finished_reels == ["BACK"], 120.0, "the reel finished")
    verdicts = _check_records(cfg, sim, "BACK")
    assert len(verdicts) == int(length_m), "every metre of the reel recorded, none beyond"
    # The fault came at about metre 7: the second half ran in spec again after the reset.
    assert verdicts[15:].count(Verdict.IN_SPEC) >= 5, verdicts


# --------------------------------------------------------------------------- stalls


class _Freezer:
    """Stalls of the whole process (controller and the in-process simulators alike, as a
    host that starves it of CPU) with a request to `plc` in flight: `arm` makes the next
    request that reaches that simulator block the event loop for `freeze_s`. The link's
    timer fires during the stall, its request is given up and the connection dropped;
    the cycle wakes with data older than the stale window."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, plc: str, freeze_s: float) -> None:
        self.armed = False
        self.taken = 0
        handle = server._Handler.callback_data

        def frozen(handler: Any, data: bytes, addr: Any = None) -> int:
            used: int = handle(handler, data, addr)
            if self.armed and handler.link.plc == plc:
                self.armed = False
                time.sleep(freeze_s)  # blocks the event loop, as a starved process is
                self.taken += 1
            return used

        monkeypatch.setattr(server._Handler, "callback_data", frozen)

    async def stall(self) -> None:
        """One stall, taken."""
        n = self.taken
        self.armed = True
        await wait_for(lambda: self.taken > n, 5.0, "the stall")


async def test_a_stall_of_linectl_itself_is_ridden_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process stalled for 0.3 s (longer than the 0.25 s stale window, shorter than
    the PLCs' 0.5 s watchdog) with a request in flight, three times in a reel: the PLCs
    were not silent, linectl was not running. No state change, no alarm, the reel
    finishes; the stalls are counted and the records hold against the truth."""
    cfg = operator_config(tmp_path, OP)
    freezer = _Freezer(monkeypatch, "conveyor", 0.3)
    async with (
        SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=12, k_dose_true=TRUE_K) as sim,
        _line(cfg, sim) as (svc, transitions),
    ):
        await _run_reel(svc, "STALL", 20.0)
        before = len(transitions)
        await wait_for(lambda: svc.records_written >= 2, 60.0, "2 metres")
        for _ in range(3):
            await freezer.stall()
            await asyncio.sleep(0.5)
        await wait_for(
            lambda: svc.finished_reels == ["STALL"] or bool(svc.ctl.alarms), 120.0, "the end"
        )
        assert not svc.ctl.alarms
        assert [t.new for t in transitions[before:]][:2] == [LineState.STOPPING, LineState.IDLE]
        assert not svc.ctl.alarms
        assert svc.stats.stalls >= 3
        assert svc.cnv.stats.errors["timeout"] >= 3, "the requests in flight timed out"
        _no_watchdog_trip(sim)
    verdicts = _check_records(cfg, sim, "STALL")
    assert len(verdicts) == 20
    assert sim.plant.truth.burns == []


@pytest.mark.parametrize(
    ("freeze_s", "silent"), [(0.6, False), (0.2, True)], ids=["stall-0.6s", "silent-0.2s-stall"]
)
async def test_a_plc_is_lost_where_no_stall_explains_its_silence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, freeze_s: float, silent: bool
) -> None:
    """The credit is for linectl's own absence, at most one stale window:
    - after 0.6 s away both PLCs' data is too old to use, whatever the cause;
    - a conveyor that stops answering as this process stalls (0.2 s) is lost once it has
      been silent for the stale window while linectl ran: the beam off by linectl, from
      the accelerator, not by its watchdog.
    The cable is recorded as the ledger can bound it, never in spec where the truth is not."""
    cfg = operator_config(tmp_path, OP)
    freezer = _Freezer(monkeypatch, "conveyor", freeze_s)
    async with (
        SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=13, k_dose_true=TRUE_K) as sim,
        _line(cfg, sim) as (svc, _tr),
    ):
        await _run_reel(svc, "LOST", 200.0)
        await wait_for(lambda: svc.records_written >= 2, 60.0, "2 metres")
        if silent:
            sim.faults.silent("conveyor", 3.0)
        await freezer.stall()
        await wait_for(lambda: not sim.plant.accelerator.beam_on_req, 5.0, "beam off")
        await wait_for(lambda: "conveyor_link" in svc.ctl.alarms, 5.0, "conveyor_link")
        assert svc.stats.stalls >= 1
        if silent:
            assert "accelerator_link" not in svc.ctl.alarms
            assert not sim.plant.accelerator.watchdog_trip, "linectl switched the beam off"
        else:
            assert "accelerator_link" in svc.ctl.alarms
    _check_records(cfg, sim, "LOST")
    assert sim.plant.truth.burns == []


# --------------------------------------------------------------------------- reel zero


async def test_reel_zero_is_the_counter_of_the_standing_line(tmp_path: Path) -> None:
    """Cable coordinate 0 is the length counter read while the line stands, before the
    reel's first RUN (process.md, "Positions")."""
    cfg = operator_config(tmp_path, OP)
    async with SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=11, k_dose_true=TRUE_K) as sim:
        zero: list[float] = []
        async with _line(cfg, sim) as (svc, _tr):
            svc.on_reel_start.append(lambda _r, counter_m: zero.append(counter_m))
            await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
            standing_mm = sim.plant.conveyor.length_mm
            svc.request_reel(ReelRequest("ZERO", 5.0, OP))
            await wait_for(lambda: bool(zero), 30.0, "reel start")
            assert not sim.plant.conveyor.running
            assert zero == [pytest.approx(int(standing_mm) / 1000.0, abs=1e-6)]
