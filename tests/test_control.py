"""Unit tests of the pure line controller: no event loop, no plant physics.

Controller.step is driven with hand-made AccView/CnvView. Where a sequence needs the
plant to react, an *ideal follower* stands in for it: the next cycle's views report
exactly what the previous outputs asked for (the closed-loop tests in
test_closed_loop.py cover the real plant dynamics).

Every interlock is checked to act within two control cycles of its cause appearing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from linectl.config import ControlTuning, Geometry, Recipe, load_config
from linectl.core.control import (
    ALARM_KINDS,
    AccView,
    Alarm,
    CnvView,
    CommandRefused,
    Controller,
    LineState,
    Outputs,
    ReelPlan,
    StartPhase,
    Transition,
)

ROOT = Path(__file__).resolve().parents[1]
_CFG = load_config(ROOT / "config", environ={})
RECIPE: Recipe = _CFG.load_recipe("pv-1x6-en50618")
GEOMETRY: Geometry = _CFG.line.geometry
CYCLE_S = 0.05  # the default control cycle
TWO_CYCLES = 2


# --------------------------------------------------------------------------- views


def running_acc(**changes: object) -> AccView:
    """The accelerator as its PLC reports it with the line running at 80 m/min, 40 mA."""
    base = AccView(
        ok=True,
        ready=True,
        hv_on=True,
        beam_on=True,
        vacuum_ok=True,
        scan_ok=True,
        cooling_ok=True,
        safety_ok=True,
        beam_current_ma=40.0,
        energy_mev=1.2,
        scan_width_cm=100.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def running_cnv(**changes: object) -> CnvView:
    """The conveyor as its PLC reports it running at 80 m/min."""
    base = CnvView(
        ok=True, ready=True, running=True, at_speed=True, tension_ok=True, speed_m_min=80.0
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def idle_acc(**changes: object) -> AccView:
    """Accelerator ready, HV off, no fault."""
    return running_acc(hv_on=False, beam_on=False, beam_current_ma=0.0, energy_mev=0.0, **changes)


def idle_cnv(**changes: object) -> CnvView:
    """Conveyor ready and stopped."""
    return running_cnv(running=False, at_speed=False, speed_m_min=0.0, **changes)


def followed(out: Outputs) -> tuple[AccView, CnvView]:
    """An ideal plant: the views that exactly obey the previous outputs."""
    beam = out.hv_on and out.beam_on
    acc = running_acc(
        hv_on=out.hv_on,
        beam_on=beam,
        beam_current_ma=out.beam_current_sp_ma if beam else 0.0,
        energy_mev=RECIPE.energy_mev if out.hv_on else 0.0,
    )
    speed = out.speed_sp_m_min if out.run else 0.0
    cnv = running_cnv(running=speed > 0.0, speed_m_min=speed)
    return acc, cnv


# --------------------------------------------------------------------------- rig


@dataclass
class Rig:
    """A controller on simulated time, with every event it emitted."""

    ctl: Controller
    t_s: float = 0.0
    transitions: list[Transition] = field(default_factory=list)
    alarms: list[Alarm] = field(default_factory=list)

    def step(
        self, acc: AccView, cnv: CnvView, pos: float | None = None, dt_s: float = CYCLE_S
    ) -> Outputs:
        self.t_s += dt_s
        out = self.ctl.step(self.t_s, acc, cnv, pos)
        self.collect()
        return out

    def collect(self) -> None:
        transitions, alarms = self.ctl.take_events()
        self.transitions += transitions
        self.alarms += alarms

    def follow(self, pos: float | None = None) -> Outputs:
        """One cycle with the ideal plant."""
        return self.step(*followed(self.ctl.outputs), pos)

    def follow_until(self, done: Callable[[], bool], max_s: float = 30.0) -> None:
        for _ in range(round(max_s / CYCLE_S)):
            self.follow()
            if done():
                return
        raise AssertionError(f"not reached: state {self.ctl.state}, alarms {self.ctl.alarms}")

    def within_two(
        self,
        acc: AccView,
        cnv: CnvView,
        done: Callable[[Outputs], bool],
        pos: float | None = None,
    ) -> int:
        """Step with these views until done(outputs); fail after two cycles."""
        for n in range(1, TWO_CYCLES + 1):
            if done(self.step(acc, cnv, pos)):
                return n
        raise AssertionError(f"not done within two cycles: {self.ctl.outputs}")

    def alarm_kinds(self) -> set[str]:
        return {a.kind for a in self.alarms}


def new_rig(tuning: ControlTuning | None = None) -> Rig:
    return Rig(Controller(RECIPE, GEOMETRY, tuning or ControlTuning()))


def ready_rig(tuning: ControlTuning | None = None) -> Rig:
    rig = new_rig(tuning)
    rig.step(idle_acc(), idle_cnv())
    rig.step(idle_acc(), idle_cnv())
    assert rig.ctl.state is LineState.READY, rig.ctl.why_not_ready()
    return rig


def running_rig(
    tuning: ControlTuning | None = None, *, full_speed: bool = True, length_m: float = 1000.0
) -> Rig:
    """A controller in RUNNING (at 80 m/min and 40 mA when full_speed)."""
    rig = ready_rig(tuning)
    rig.ctl.request_start(ReelPlan("R1", length_m, "tester"))
    rig.collect()
    rig.follow_until(lambda: rig.ctl.state is LineState.RUNNING)
    if full_speed:
        rig.follow_until(lambda: rig.ctl.outputs.speed_sp_m_min >= rig.ctl.v_max - 1e-9)
        rig.follow()  # the measured speed catches up: the views are now the running ones
        assert rig.ctl.outputs.beam_current_sp_ma == pytest.approx(40.0)
    return rig


def assert_safe(out: Outputs) -> None:
    assert not out.beam_on
    assert out.beam_current_sp_ma == 0.0
    assert not out.run
    assert out.speed_sp_m_min == 0.0


# --------------------------------------------------------------------------- basics


def test_reference_recipe_numbers() -> None:
    ctl = Controller(RECIPE, GEOMETRY)
    assert GEOMETRY.weight_sum == 16
    assert ctl.v_min == 5.0
    assert ctl.v_max == pytest.approx(80.0)
    assert ctl.current_for(80.0, 100.0) == pytest.approx(40.0)
    assert ctl.current_for(40.0, 100.0) == pytest.approx(20.0)
    assert ctl.current_for(40.0, 0.0) == pytest.approx(20.0)  # no measurement: recipe W
    assert ctl.current_for(1.0, 100.0) == RECIPE.beam_current_min_ma  # clamped low
    assert ctl.current_for(500.0, 100.0) == RECIPE.beam_current_max_ma  # clamped high


def test_offline_until_both_plcs_answer_then_ready() -> None:
    rig = new_rig()
    assert rig.ctl.state is LineState.OFFLINE
    rig.step(idle_acc(), idle_cnv())
    assert rig.ctl.state is LineState.READY
    assert rig.ctl.why_not_ready() == ""
    assert [t.new for t in rig.transitions] == [LineState.IDLE, LineState.READY]
    rig.step(idle_acc(ready=False), idle_cnv())
    assert rig.ctl.state is LineState.IDLE
    assert "accelerator not READY" in rig.ctl.why_not_ready()


def test_start_sequence_phases() -> None:
    rig = ready_rig()
    rig.ctl.request_start(ReelPlan("R1", 500.0, "tester"))
    assert rig.ctl.state is LineState.STARTING
    out = rig.step(idle_acc(), idle_cnv())  # HV requested, nothing else yet
    assert out.hv_on
    assert not out.beam_on
    assert not out.run
    assert out.energy_sp_mev == RECIPE.energy_mev
    assert out.scan_width_sp_cm == RECIPE.scan_width_cm
    assert rig.ctl._phase is StartPhase.HV
    hv_up = running_acc(beam_on=False, beam_current_ma=0.0)
    rig.step(hv_up, idle_cnv())
    assert rig.ctl._phase is StartPhase.LINE
    speeds = [rig.step(hv_up, idle_cnv()).speed_sp_m_min for _ in range(5)]
    assert speeds == sorted(speeds)
    assert 0 < speeds[-1] < rig.ctl.v_min
    assert not rig.ctl.outputs.beam_on
    assert rig.ctl.outputs.run
    # The line follows its set-point up to minimum speed: then beam on at the dose-follow
    # current.
    while rig.ctl._phase is StartPhase.LINE:
        sp = rig.ctl.outputs.speed_sp_m_min
        assert not rig.step(hv_up, running_cnv(speed_m_min=sp)).beam_on
        assert rig.t_s < 10.0
    assert rig.ctl.v_min <= rig.ctl.outputs.speed_sp_m_min <= rig.ctl.v_low
    for _ in range(5):
        out = rig.step(hv_up, running_cnv(speed_m_min=rig.ctl.v_low))
        assert out.beam_on
        assert out.run
    assert out.speed_sp_m_min == pytest.approx(rig.ctl.v_low)
    assert out.beam_current_sp_ma == pytest.approx(rig.ctl.current_for(rig.ctl.v_low, 100.0))
    beam_up = running_acc(beam_current_ma=out.beam_current_sp_ma)
    rig.step(beam_up, running_cnv(speed_m_min=rig.ctl.v_low))
    assert rig.ctl.state is LineState.RUNNING
    assert rig.ctl.reel is not None
    assert rig.ctl.reel.started


def test_start_phase_timeout_faults() -> None:
    rig = ready_rig()
    rig.ctl.request_start(ReelPlan("R1", 500.0))
    for _ in range(round(ControlTuning().start_timeout_s / CYCLE_S) + 2):
        rig.step(idle_acc(), idle_cnv())  # HV never comes up
    assert rig.ctl.state is LineState.FAULT
    assert "start_timeout" in rig.ctl.alarms
    assert_safe(rig.ctl.outputs)


# --------------------------------------------------------------------------- beam vs line


@pytest.mark.parametrize(
    "cnv",
    [running_cnv(running=False), running_cnv(running=False, speed_m_min=0.0)],
    ids=["not-running-at-speed", "standing"],
)
def test_line_stopped_with_beam_on_cuts_the_beam(cnv: CnvView) -> None:
    rig = running_rig()
    rig.within_two(running_acc(), cnv, lambda o: not o.beam_on)
    assert rig.ctl.state is LineState.FAULT
    assert "line_stopped_beam_on" in rig.ctl.alarms


def test_below_minimum_speed_with_beam_on_cuts_the_beam_and_latches() -> None:
    rig = running_rig()
    rig.within_two(running_acc(), running_cnv(speed_m_min=3.0), lambda o: not o.beam_on)
    assert rig.ctl.state is LineState.FAULT
    assert "below 5 m/min" in rig.ctl.alarms["below_min_speed_beam_on"].message


def test_just_below_minimum_speed_the_beam_is_off_without_a_fault() -> None:
    # Inside the speed tolerance the command alone drops the beam (no latched fault).
    rig = running_rig(full_speed=False)
    out = rig.step(running_acc(beam_current_ma=2.5), running_cnv(speed_m_min=4.95))
    assert not out.beam_on
    assert rig.ctl.state is LineState.RUNNING
    out = rig.step(running_acc(beam_current_ma=2.5), running_cnv(speed_m_min=5.05))
    assert out.beam_on


# --------------------------------------------------------------------------- data loss


def test_accelerator_link_lost_holds_the_line_then_stops_it() -> None:
    rig = running_rig()
    hold_s = rig.ctl.tuning.acc_lost_hold_s
    lost = AccView(ok=False)
    out = rig.step(lost, running_cnv())
    t_lost = rig.t_s
    assert rig.ctl.state is LineState.OFFLINE
    assert not out.beam_on
    assert out.beam_current_sp_ma == 0.0
    assert out.run
    assert out.speed_sp_m_min > 0
    assert "accelerator_link" in rig.ctl.alarms
    while rig.t_s + CYCLE_S < t_lost + hold_s - 1e-9:
        assert rig.step(lost, running_cnv()).run
    # The hold ends: the line is stopped within two cycles.
    rig.within_two(lost, running_cnv(), lambda o: not o.run and o.speed_sp_m_min == 0.0)
    assert rig.t_s - t_lost <= hold_s + TWO_CYCLES * CYCLE_S
    assert any(t.new is LineState.OFFLINE and t.cause for t in rig.transitions)


def test_conveyor_link_lost_cuts_the_beam_at_once() -> None:
    rig = running_rig()
    out = rig.step(running_acc(), CnvView(ok=False))
    assert not out.beam_on
    assert out.beam_current_sp_ma == 0.0
    assert rig.ctl.state is LineState.OFFLINE
    assert "conveyor_link" in rig.ctl.alarms


def test_link_back_after_loss_needs_a_reset() -> None:
    rig = running_rig()
    rig.step(running_acc(), CnvView(ok=False))
    rig.step(idle_acc(), idle_cnv())
    assert rig.ctl.state is LineState.FAULT  # the link alarm is latched
    for _ in range(5):
        assert_safe(rig.step(idle_acc(), idle_cnv()))
    assert rig.ctl.state is LineState.FAULT
    rig.ctl.request_reset()
    rig.step(idle_acc(), idle_cnv())
    rig.step(idle_acc(), idle_cnv())
    assert rig.ctl.state is LineState.READY


# --------------------------------------------------------------------------- interlocks

INTERLOCKS = [
    ("energy", running_acc(energy_mev=1.3), running_cnv(), r"energy 1\.300 MeV outside 1\.2"),
    ("vacuum", running_acc(vacuum_ok=False), running_cnv(), "vacuum"),
    ("scan", running_acc(scan_ok=False), running_cnv(), "scan"),
    ("cooling", running_acc(cooling_ok=False), running_cnv(), "cooling"),
    ("safety_chain", running_acc(safety_ok=False), running_cnv(), "safety chain open"),
    (
        "accelerator_fault",
        running_acc(fault=True, fault_code=2, beam_on=False, beam_current_ma=0.0),
        running_cnv(),
        r"accelerator fault 2 \(high voltage\)",
    ),
    (
        "conveyor_fault",
        running_acc(),
        running_cnv(fault=True, fault_code=1),
        r"conveyor fault 1 \(drive\)",
    ),
    (
        "estop",
        running_acc(),
        running_cnv(estop=True, fault=True, fault_code=4, running=False, speed_m_min=0.0),
        "emergency stop",
    ),
    (
        "cable_break",
        running_acc(),
        running_cnv(cable_break=True, fault=True, fault_code=2, speed_m_min=20.0),
        "cable break",
    ),
]


@pytest.mark.parametrize(
    ("kind", "acc", "cnv", "message"), INTERLOCKS, ids=[i[0] for i in INTERLOCKS]
)
def test_interlock_beam_off_line_stop_latched(
    kind: str, acc: AccView, cnv: CnvView, message: str
) -> None:
    rig = running_rig()
    rig.within_two(acc, cnv, lambda o: not o.beam_on and not o.run)
    assert_safe(rig.ctl.outputs)
    assert not rig.ctl.outputs.hv_on
    assert rig.ctl.state is LineState.FAULT
    alarm = rig.ctl.alarms[kind]
    assert alarm.latched
    assert pytest.approx(rig.t_s) == alarm.t_s
    assert re.search(message, alarm.message), alarm.message
    fault = [t for t in rig.transitions if t.new is LineState.FAULT]
    assert len(fault) == 1
    assert alarm.message in fault[0].cause


def test_energy_within_tolerance_is_fine() -> None:
    rig = running_rig()
    for e in (1.16, 1.24):
        rig.step(running_acc(energy_mev=e), running_cnv())
    assert rig.ctl.state is LineState.RUNNING


def test_hv_dropping_while_requested_faults() -> None:
    rig = running_rig()
    acc = running_acc(hv_on=False, beam_on=False, beam_current_ma=0.0, energy_mev=0.0)
    rig.within_two(acc, running_cnv(), lambda o: not o.beam_on and not o.run)
    assert "hv_lost" in rig.ctl.alarms


# --------------------------------------------------------------------------- reset


def test_fault_is_left_only_by_reset_with_a_one_cycle_pulse() -> None:
    rig = running_rig()
    latched = idle_acc(fault=True, fault_code=2, ready=False)
    rig.step(latched, idle_cnv(fault=True, fault_code=1))
    assert rig.ctl.state is LineState.FAULT
    # The PLCs' latched faults stay until reset; nothing else leaves FAULT.
    for _ in range(20):
        out = rig.step(idle_acc(), idle_cnv())
        assert not out.acc_fault_reset
        assert not out.cnv_fault_reset
    assert rig.ctl.state is LineState.FAULT
    with pytest.raises(CommandRefused, match="cannot start"):
        rig.ctl.request_start(ReelPlan("R1", 1000.0))
    # Reset while both PLCs still report their latched FAULT bits: one pulse each.
    rig.ctl.request_reset()
    out = rig.step(latched, idle_cnv(fault=True, fault_code=1))
    assert out.acc_fault_reset
    assert out.cnv_fault_reset
    assert rig.ctl.state is LineState.IDLE
    assert rig.transitions[-1].cause == "operator reset"
    pulses = [rig.step(idle_acc(), idle_cnv()) for _ in range(3)]
    assert not any(o.acc_fault_reset or o.cnv_fault_reset for o in pulses)
    assert rig.ctl.state is LineState.READY
    assert rig.ctl.alarms == {}


def test_reset_with_the_cause_still_there_brings_the_alarm_back() -> None:
    rig = running_rig()
    estop = idle_cnv(estop=True, fault=True, fault_code=4)
    rig.step(running_acc(), estop)
    assert rig.ctl.state is LineState.FAULT
    n_estop = sum(a.kind == "estop" for a in rig.alarms)
    rig.ctl.request_reset()
    rig.step(idle_acc(), estop)
    rig.within_two(idle_acc(), estop, lambda o: rig.ctl.state is LineState.FAULT)
    assert "estop" in rig.ctl.alarms
    assert sum(a.kind == "estop" for a in rig.alarms) == n_estop + 1


def test_reset_refused_without_alarm() -> None:
    rig = ready_rig()
    with pytest.raises(CommandRefused, match="no latched alarm"):
        rig.ctl.request_reset()


# --------------------------------------------------------------------------- commands


def test_start_refused_when_not_ready_says_why() -> None:
    rig = new_rig()
    rig.step(idle_acc(), idle_cnv(ready=False))
    assert rig.ctl.state is LineState.IDLE
    with pytest.raises(CommandRefused, match="conveyor not READY"):
        rig.ctl.request_start(ReelPlan("R1", 100.0))
    rig = ready_rig()
    with pytest.raises(CommandRefused, match="positive"):
        rig.ctl.request_start(ReelPlan("R1", 0.0))


def test_stop_refused_when_idle() -> None:
    rig = ready_rig()
    with pytest.raises(CommandRefused, match="nothing to stop"):
        rig.ctl.request_stop()


def test_operator_stop_then_resume_the_same_reel_only() -> None:
    rig = running_rig()
    rig.ctl.request_stop("operator stop")
    rig.collect()
    assert rig.ctl.state is LineState.STOPPING
    rig.follow_until(lambda: rig.ctl.state is LineState.READY, max_s=60.0)
    assert any(t.cause == "stopped: operator stop" for t in rig.transitions)
    with pytest.raises(CommandRefused, match="R1 is not finished"):
        rig.ctl.request_start(ReelPlan("R2", 100.0))
    rig.ctl.request_start(ReelPlan("R1", 1000.0))  # resuming the same reel is fine
    with pytest.raises(CommandRefused, match="stop the line first"):
        rig.ctl.close_reel()
    rig.ctl.request_stop()
    rig.follow_until(lambda: rig.ctl.state is LineState.READY, max_s=60.0)
    assert rig.ctl.close_reel().reel_id == "R1"
    rig.ctl.request_start(ReelPlan("R2", 100.0))
    assert rig.ctl.state is LineState.STARTING
    with pytest.raises(CommandRefused, match="no reel"):
        Controller(RECIPE, GEOMETRY).close_reel()


def test_resume_after_fault_keeps_the_reel_started() -> None:
    rig = running_rig()
    rig.step(running_acc(cooling_ok=False), running_cnv())
    rig.ctl.request_reset()
    rig.follow_until(lambda: rig.ctl.state is LineState.READY)
    rig.ctl.request_start(ReelPlan("R1", 1000.0))
    assert rig.ctl.reel is not None
    assert rig.ctl.reel.started
    rig.follow_until(lambda: rig.ctl.state is LineState.RUNNING)


# --------------------------------------------------------------------------- dose-follow


def test_dose_follow_and_ramp_limits_up_to_full_speed() -> None:
    rig = running_rig(full_speed=False)
    ctl, tuning = rig.ctl, rig.ctl.tuning
    lead_m_min = tuning.line_ramp_m_min_s * tuning.current_lag_s
    prev_sp = ctl.outputs.speed_sp_m_min
    for _ in range(round(30.0 / CYCLE_S)):
        acc, cnv = followed(ctl.outputs)
        out = rig.step(acc, cnv)
        v = cnv.speed_m_min
        rise = out.speed_sp_m_min - prev_sp
        # The ramp: the line's own limit, 90 % of what 15 mA/s of current allows (30 m/min/s
        # for the reference recipe), and a relative limit at low speed.
        assert rise <= 0.9 * 30.0 * CYCLE_S + 1e-9
        assert rise <= tuning.relative_ramp_per_s * max(prev_sp, ctl.v_min) * CYCLE_S + 1e-9
        assert out.speed_sp_m_min <= ctl.v_max + 1e-9
        # Dose-follow: the current of the measured speed, led by at most the lag.
        lo, hi = ctl.current_for(v, 100.0), ctl.current_for(v + lead_m_min, 100.0)
        assert lo - 1e-9 <= out.beam_current_sp_ma <= hi + 1e-9
        assert out.beam_on
        prev_sp = out.speed_sp_m_min
    assert ctl.outputs.speed_sp_m_min == pytest.approx(80.0)
    assert ctl.outputs.beam_current_sp_ma == pytest.approx(40.0)


def test_current_follows_measured_speed_and_is_clamped() -> None:
    rig = running_rig()
    assert rig.step(running_acc(), running_cnv(speed_m_min=40.0)).beam_current_sp_ma == (
        pytest.approx(20.0)
    )
    assert rig.step(running_acc(), running_cnv(speed_m_min=60.0)).beam_current_sp_ma == (
        pytest.approx(30.0)
    )
    # A measured scan width enters the law: wider scan, more current for the same dose.
    out = rig.step(running_acc(scan_width_cm=110.0), running_cnv(speed_m_min=60.0))
    assert out.beam_current_sp_ma == pytest.approx(33.0)
    out = rig.step(running_acc(), running_cnv(speed_m_min=120.0))
    assert out.beam_current_sp_ma == RECIPE.beam_current_max_ma


# --------------------------------------------------------------------------- beam trips


def trip_acc() -> AccView:
    return running_acc(beam_on=False, beam_current_ma=0.0, fault_code=1)


def test_short_beam_trip_is_ridden_through_at_speed() -> None:
    rig = running_rig()
    ride_s = rig.ctl.tuning.ride_through_s
    for _ in range(round(ride_s / CYCLE_S) - 1):
        out = rig.step(trip_acc(), running_cnv())
        assert out.speed_sp_m_min == pytest.approx(80.0)
        assert out.beam_on
        assert out.run
    rig.step(running_acc(), running_cnv())
    rig.step(running_acc(), running_cnv())
    assert rig.ctl.state is LineState.RUNNING
    assert rig.ctl.alarms == {}


def test_longer_beam_trip_slows_the_line_to_minimum_speed() -> None:
    rig = running_rig(ControlTuning(trip_stop_s=60.0))
    ctl = rig.ctl
    t0 = rig.t_s
    speeds: list[float] = []
    for _ in range(round(40.0 / CYCLE_S)):
        _, cnv = followed(ctl.outputs)
        out = rig.step(trip_acc(), cnv)
        if rig.t_s - t0 > ctl.tuning.ride_through_s + TWO_CYCLES * CYCLE_S:
            speeds.append(out.speed_sp_m_min)
    assert speeds[0] < 80.0
    assert speeds == sorted(speeds, reverse=True)
    assert speeds[-1] == pytest.approx(ctl.v_low)
    assert min(speeds) >= ctl.v_min
    assert ctl.state is LineState.RUNNING


def test_long_beam_outage_stops_the_line_with_an_unlatched_alarm() -> None:
    rig = running_rig()
    ctl = rig.ctl
    t0 = rig.t_s
    while ctl.state is LineState.RUNNING:
        _, cnv = followed(ctl.outputs)
        rig.step(trip_acc(), cnv)
        assert rig.t_s - t0 <= ctl.tuning.trip_stop_s + TWO_CYCLES * CYCLE_S
    assert rig.t_s - t0 > ctl.tuning.trip_stop_s
    assert ctl.state is LineState.STOPPING
    outage = [a for a in rig.alarms if a.kind == "beam_outage"]
    assert len(outage) == 1
    assert not outage[0].latched
    assert "beam_outage" not in ctl.alarms
    assert not ctl.outputs.beam_on
    rig.follow_until(lambda: ctl.state is LineState.IDLE or ctl.state is LineState.READY)
    assert ctl.reel is not None
    assert not ctl.reel.complete


# --------------------------------------------------------------------------- reel end


def test_planned_length_beam_on_until_the_last_metre_left_the_last_pass() -> None:
    planned_m = 500.0
    rig = running_rig(length_m=planned_m)
    ctl = rig.ctl
    end_m = planned_m + GEOMETRY.last_pass_offset_m  # 500 + 94 m
    rig.step(*followed(ctl.outputs), pos=end_m - 0.01)
    assert ctl.state is LineState.RUNNING
    rig.step(*followed(ctl.outputs), pos=end_m)
    assert ctl.state is LineState.STOPPING
    assert rig.transitions[-1].cause == "planned length reached"
    assert ctl.reel is not None
    assert ctl.reel.complete
    # Ramp down with the beam on, dose-following, until minimum speed.
    beam_off_at = None
    for _ in range(round(60.0 / CYCLE_S)):
        acc, cnv = followed(ctl.outputs)
        out = rig.step(acc, cnv, pos=end_m + 1.0)
        if beam_off_at is None and not out.beam_on:
            beam_off_at = cnv.speed_m_min
            assert out.run  # the line keeps moving until the beam is seen off
        if out.beam_on:
            # Decelerating, the current leads the speed downwards by at most the lag.
            v, lead = cnv.speed_m_min, ctl.tuning.line_ramp_m_min_s * ctl.tuning.current_lag_s
            lo, hi = ctl.current_for(v - lead, 100.0), ctl.current_for(v, 100.0)
            assert lo - 1e-9 <= out.beam_current_sp_ma <= hi + 1e-9
        if ctl.state is LineState.IDLE:
            break
    assert beam_off_at is not None
    assert ctl.v_min <= beam_off_at <= ctl.v_min * (1 + ctl.tuning.speed_tolerance) + 1e-6
    assert ctl.state is LineState.IDLE
    assert not ctl.outputs.run
    rig.step(idle_acc(), idle_cnv())
    assert ctl.state is LineState.READY
    ctl.request_start(ReelPlan("R2", 100.0))  # a finished reel does not block the next


# --------------------------------------------------------------------------- bookkeeping


def test_watchdog_changes_every_cycle_whatever_the_state() -> None:
    rig = running_rig(full_speed=False)
    views = [
        (running_acc(), running_cnv()),
        (AccView(ok=False), running_cnv()),
        (AccView(ok=False), CnvView(ok=False)),
        (idle_acc(), idle_cnv(estop=True)),
        (idle_acc(), idle_cnv()),
    ]
    last = rig.ctl.outputs.watchdog
    for acc, cnv in views * 5:
        wd = rig.step(acc, cnv).watchdog
        assert wd != last
        assert 0 <= wd < 0x10000
        last = wd


def test_every_transition_carries_a_cause() -> None:
    rig = running_rig()
    rig.step(running_acc(), CnvView(ok=False))
    rig.step(idle_acc(), idle_cnv())
    rig.ctl.request_reset()
    rig.follow_until(lambda: rig.ctl.state is LineState.READY)
    rig.ctl.request_start(ReelPlan("R1", 1000.0))
    rig.collect()
    rig.follow_until(lambda: rig.ctl.state is LineState.RUNNING)
    rig.ctl.request_stop()
    rig.collect()
    rig.follow_until(lambda: rig.ctl.state is LineState.IDLE)
    states = {t.new for t in rig.transitions}
    assert states == set(LineState)
    for t in rig.transitions:
        assert isinstance(t.cause, str)
        assert t.cause.strip(), t
        assert t.old is not t.new


# --------------------------------------------------------------------------- property

SPEEDS = st.one_of(
    st.sampled_from([0.0, 4.89, 4.95, 4.999, 5.0, 5.1, 80.0]),
    st.floats(0.0, 300.0, allow_nan=False),
)
ACC = st.builds(
    AccView,
    ok=st.booleans(),
    ready=st.booleans(),
    hv_on=st.booleans(),
    beam_on=st.booleans(),
    vacuum_ok=st.booleans(),
    scan_ok=st.booleans(),
    cooling_ok=st.booleans(),
    safety_ok=st.booleans(),
    fault=st.booleans(),
    watchdog_trip=st.booleans(),
    beam_current_ma=st.floats(0.0, 100.0, allow_nan=False),
    energy_mev=st.one_of(st.just(1.2), st.floats(0.0, 2.5, allow_nan=False)),
    scan_width_cm=st.one_of(st.just(100.0), st.floats(0.0, 150.0, allow_nan=False)),
    fault_code=st.integers(0, 7),
)
CNV = st.builds(
    CnvView,
    ok=st.booleans(),
    ready=st.booleans(),
    running=st.booleans(),
    at_speed=st.booleans(),
    tension_ok=st.booleans(),
    cable_break=st.booleans(),
    fault=st.booleans(),
    watchdog_trip=st.booleans(),
    estop=st.booleans(),
    speed_m_min=SPEEDS,
    fault_code=st.integers(0, 5),
)
STEP_T = tuple[tuple[AccView, CnvView], float | None, float, str | None]
# Mostly healthy views (so the controller gets somewhere), with random faults mixed in.
HEALTHY = st.tuples(
    st.builds(
        running_acc,
        beam_on=st.booleans(),
        beam_current_ma=st.one_of(
            st.sampled_from([0.0, 0.3, 2.5, 40.0]), st.floats(0.0, 45.0, allow_nan=False)
        ),
        fault_code=st.sampled_from([0, 0, 0, 1]),
    ),
    st.builds(running_cnv, speed_m_min=SPEEDS, running=st.booleans()),
)
POSITIONS = st.one_of(
    st.sampled_from([None, None, None, 0.0, 100.0, 393.9, 394.0]),
    st.floats(-10.0, 2000.0, allow_nan=False),
)
STEP = st.tuples(
    st.one_of(HEALTHY, HEALTHY, st.tuples(ACC, CNV)),
    POSITIONS,  # position_m (the test reel is 300 m: its end is at 394 m)
    st.sampled_from([CYCLE_S, CYCLE_S, CYCLE_S, 0.0, 0.5, 3.0, 20.0]),  # dt_s
    st.sampled_from([None, None, None, None, "start", "stop", "reset", "close"]),
)


def _one_step(acc: AccView, cnv: CnvView) -> list[STEP_T]:
    return [((acc, cnv), None, CYCLE_S, None)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start_running=st.booleans(), steps=st.lists(STEP, min_size=1, max_size=60))
# Found by this test in an earlier version: the beam was requested just below minimum
# speed, and on a conveyor reporting not running while the beam was still off.
@example(start_running=True, steps=_one_step(running_acc(), running_cnv(speed_m_min=4.95)))
@example(
    start_running=True,
    steps=_one_step(running_acc(beam_on=False, beam_current_ma=0.0), running_cnv(running=False)),
)
def test_random_views_never_beam_on_a_standing_or_unknown_line(
    start_running: bool,
    steps: list[STEP_T],
) -> None:
    rig = running_rig(full_speed=False) if start_running else new_rig()
    ctl = rig.ctl
    refusals: list[str] = []
    for (acc, cnv), pos, dt_s, command in steps:
        try:
            match command:
                case "start":
                    ctl.request_start(ReelPlan("R1", 300.0))
                case "stop":
                    ctl.request_stop()
                case "reset":
                    ctl.request_reset()
                case "close":
                    ctl.close_reel()
        except CommandRefused as e:
            refusals.append(str(e))
        out = rig.step(acc, cnv, pos, dt_s)
        if out.beam_on:
            assert acc.ok
            assert cnv.ok
            assert cnv.running
            assert cnv.speed_m_min >= ctl.v_min
        assert out.speed_sp_m_min >= 0.0
        assert 0.0 <= out.beam_current_sp_ma <= RECIPE.beam_current_max_ma
        if ctl.state is LineState.FAULT:
            assert not out.beam_on
            assert not out.run
    assert all(refusals), "a refusal must say why"
    for t in rig.transitions:
        assert t.cause.strip()


def test_alarm_kinds_are_the_documented_ones() -> None:
    # docs/control.md's interlock table names every kind the controller can raise (the
    # metrics export each one at 0; mypy keeps the raising code to this list).
    text = (ROOT / "docs" / "control.md").read_text(encoding="utf-8")
    table = text[text.index("| alarm kind |") :].split("\n\n", 1)[0]
    documented = {
        kind
        for row in table.splitlines()[2:]
        for kind in re.findall(r"`([a-z_]+)`", row.split("|")[1])
    }
    assert documented == set(ALARM_KINDS)
    assert len(ALARM_KINDS) == len(set(ALARM_KINDS))
