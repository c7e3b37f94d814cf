"""Line control: state machine, dose-follow, beam-trip ride-through and interlocks.

Pure and synchronous: `Controller.step(t_s, acc, cnv, position_m)` takes what the PLCs
said this cycle and returns what to write, plus the transitions and alarms it caused.
The async service owns the clock and the I/O.

States (docs/control.md has the diagram):

    OFFLINE  a PLC's data is not GOOD: nothing can be shown, nothing may run
    IDLE     connected, no reel running, a start permissive missing
    READY    connected, no reel running, every permissive met: a reel may start
    STARTING HV up, line to minimum speed, beam on, then RUNNING
    RUNNING  product: dose-follow at the speed the beam allows
    STOPPING ramp down with dose-follow, beam off at minimum speed, line stopped
    FAULT    a latched alarm: beam off, line stopping; leaves only on an operator reset

Process protection only: the plant's personnel-safety system and hardwired beam
inhibit are outside this software and never replaced by it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, get_args

from linectl import dose
from linectl.config import ControlTuning, Geometry, Recipe
from linectl.core.faults import fault_text


class LineState(enum.Enum):
    """Line states."""

    OFFLINE = "offline"
    IDLE = "idle"
    READY = "ready"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAULT = "fault"


_S = LineState
TRANSITIONS: Final[Mapping[tuple[LineState, LineState], str]] = MappingProxyType(
    {
        (_S.OFFLINE, _S.IDLE): "both PLCs answer (no latched alarm)",
        (_S.OFFLINE, _S.FAULT): "both PLCs answer (a latched alarm, e.g. the link alarm)",
        (_S.IDLE, _S.READY): "all permissives met",
        (_S.READY, _S.IDLE): "the missing permissives (why_not_ready)",
        (_S.READY, _S.STARTING): "operator started reel ID",
        (_S.STARTING, _S.RUNNING): "beam on at dose-follow current",
        (_S.STARTING, _S.STOPPING): "operator stop",
        (_S.RUNNING, _S.STOPPING): "operator stop / planned length reached / beam outage of N s",
        (_S.STOPPING, _S.IDLE): "stopped (with the stop's cause)",
        (_S.STARTING, _S.FAULT): "start timed out in phase P / interlock messages",
        (_S.RUNNING, _S.FAULT): "interlock messages",
        (_S.STOPPING, _S.FAULT): "interlock messages",
        (_S.IDLE, _S.FAULT): (
            "interlock messages (e-stop, cable break, accelerator fault code, "
            "beam on a standing line)"
        ),
        (_S.READY, _S.FAULT): "interlock messages",
        (_S.FAULT, _S.IDLE): "operator reset",
        (_S.IDLE, _S.OFFLINE): "PLC data lost or stale",
        (_S.READY, _S.OFFLINE): "PLC data lost or stale",
        (_S.STARTING, _S.OFFLINE): "PLC data lost or stale",
        (_S.RUNNING, _S.OFFLINE): "PLC data lost or stale",
        (_S.STOPPING, _S.OFFLINE): "PLC data lost or stale",
        (_S.FAULT, _S.OFFLINE): "PLC data lost or stale",
    }
)
"""The state machine as data: every legal transition (old, new) and what takes it.
Controller enforces it on every change; docs/control.md's diagram is tested to be this
table, edge for edge and label for label (tests/test_state_table.py)."""
del _S


class IllegalTransitionError(RuntimeError):
    """A transition outside TRANSITIONS: a bug in the controller, never an input. The
    service fails safe on it (beam off, HV off, line stopped)."""


class StartPhase(enum.Enum):
    """Steps of STARTING."""

    HV = "hv"  # high voltage, energy and scan up
    LINE = "line"  # conveyor to minimum speed
    BEAM = "beam"  # beam on at the dose-follow current


@dataclass(frozen=True, slots=True)
class AccView:
    """The accelerator this cycle (decoded and quality-checked by the service)."""

    ok: bool  # every value GOOD this cycle
    ready: bool = False
    hv_on: bool = False
    beam_on: bool = False
    vacuum_ok: bool = False
    scan_ok: bool = False
    cooling_ok: bool = False
    safety_ok: bool = False
    fault: bool = False
    watchdog_trip: bool = False
    beam_current_ma: float = 0.0
    energy_mev: float = 0.0
    scan_width_cm: float = 0.0
    fault_code: int = 0
    bad_values: tuple[str, ...] = ()
    """Register-map fields whose value was not a finite number (views.acc_view)."""


@dataclass(frozen=True, slots=True)
class CnvView:
    """The conveyor this cycle."""

    ok: bool
    ready: bool = False
    running: bool = False
    at_speed: bool = False
    tension_ok: bool = False
    cable_break: bool = False
    fault: bool = False
    watchdog_trip: bool = False
    estop: bool = False
    speed_m_min: float = 0.0
    fault_code: int = 0
    bad_values: tuple[str, ...] = ()
    """Register-map fields whose value was not a finite number (views.cnv_view)."""


# Every alarm the controller can raise. A closed list, checked by mypy at every place that
# raises one: the metrics export each kind at 0 from the start, so that Prometheus's
# increase() sees the first trip of a kind as well as the later ones.
AlarmKind = Literal[
    "accelerator_bad_value",
    "conveyor_bad_value",
    "line_stopped_beam_on",
    "below_min_speed_beam_on",
    "estop",
    "cable_break",
    "conveyor_fault",
    "accelerator_fault",
    "safety_chain",
    "hv_lost",
    "vacuum",
    "scan",
    "cooling",
    "energy",
    "conveyor_link",
    "accelerator_link",
    "start_timeout",
    "beam_outage",
    "records",  # the record store failed (LineService)
]
ALARM_KINDS: tuple[AlarmKind, ...] = get_args(AlarmKind)

_BAD_VALUE: dict[str, AlarmKind] = {
    "accelerator": "accelerator_bad_value",
    "conveyor": "conveyor_bad_value",
}


def beam_measured_on(acc: AccView) -> bool:
    """BEAM_ON reported, or a measured current above 0.5 mA (docs/control.md)."""
    return acc.beam_on or acc.beam_current_ma > 0.5


def conveyor_at_standstill(cnv: CnvView) -> bool:
    """Not running, and slower than 0.05 m/min."""
    return not cnv.running and cnv.speed_m_min < 0.05


ACC_WATCHDOG_FAULT_CODE = 7
"""The accelerator's fault code for a watchdog trip (plc-interface.md)."""
CNV_WATCHDOG_FAULT_CODE = 5
"""The conveyor's fault code for a watchdog trip."""


def unfinished_reel_message(reel_id: str, planned_length_m: float) -> str:
    """Why another reel cannot start while `reel_id` is unfinished, and the two ways on:
    the commands (MQTT) and their CLI spelling (docs/cli.md)."""
    length = f"{planned_length_m:.10g}"
    return (
        f"reel {reel_id} is not finished: resume it (start_reel with reel_id {reel_id} and "
        f"length_m {length}: linectl reel start {reel_id} --length {length}) or close it "
        f"(end_reel with a reason: linectl reel end {reel_id} --reason TEXT) first"
    )


def watchdog_trips_only(acc: AccView, cnv: CnvView) -> bool:
    """Both PLCs answering, at least one with a latched fault, and every latched fault a
    watchdog trip (WATCHDOG_TRIP set and the watchdog's fault code): what a controller
    that was away (killed, host down) leaves behind, and nothing else."""
    if not (acc.ok and cnv.ok):
        return False
    tripped = False
    for fault, trip, code, wd_code in (
        (acc.fault, acc.watchdog_trip, acc.fault_code, ACC_WATCHDOG_FAULT_CODE),
        (cnv.fault, cnv.watchdog_trip, cnv.fault_code, CNV_WATCHDOG_FAULT_CODE),
    ):
        if fault:
            if not (trip and code == wd_code):
                return False
            tripped = True
    return tripped


def at_rest(acc: AccView, cnv: CnvView) -> bool:
    """Both PLCs answering, the conveyor at a standstill and the beam off: no cable moves
    and none is irradiated."""
    return acc.ok and cnv.ok and conveyor_at_standstill(cnv) and not beam_measured_on(acc)


def _not_finite(plc: str, view: AccView | CnvView) -> tuple[AlarmKind, str] | None:
    """The trip for a view whose numbers are not all finite, None when they are.

    NaN fails every comparison, so without this an energy of NaN never tripped the
    energy interlock and a speed of NaN never took the beam off a slow line (found by
    tests/test_fuzz.py). A PLC that answers with values that are not numbers is treated
    like any other process fault: beam off, line to a stop, latched alarm; its links
    still answer, so both PLCs get the safe state written.
    """
    names = list(view.bad_values)
    numbers: dict[str, float] = (
        {
            "beam_current_ma": view.beam_current_ma,
            "energy_mev": view.energy_mev,
            "scan_width_cm": view.scan_width_cm,
        }
        if isinstance(view, AccView)
        else {"speed_m_min": view.speed_m_min}
    )
    names += [n for n, x in numbers.items() if not math.isfinite(x)]
    if not names:
        return None
    return (_BAD_VALUE[plc], f"{plc} reports values that are not numbers: {', '.join(names)}")


@dataclass(frozen=True, slots=True)
class Outputs:
    """What to write to the PLCs this cycle."""

    hv_on: bool = False
    beam_on: bool = False
    acc_fault_reset: bool = False
    beam_current_sp_ma: float = 0.0
    energy_sp_mev: float = 0.5
    scan_width_sp_cm: float = 20.0
    run: bool = False
    cnv_fault_reset: bool = False
    speed_sp_m_min: float = 0.0
    watchdog: int = 0

    def changed(
        self,
        *,
        hv_on: bool | None = None,
        beam_on: bool | None = None,
        acc_fault_reset: bool | None = None,
        beam_current_sp_ma: float | None = None,
        energy_sp_mev: float | None = None,
        scan_width_sp_cm: float | None = None,
        run: bool | None = None,
        cnv_fault_reset: bool | None = None,
        speed_sp_m_min: float | None = None,
        watchdog: int | None = None,
    ) -> Outputs:
        """A copy with the given fields changed (None: unchanged; no field is optional).
        What dataclasses.replace does, without its per-call look at the fields: a cycle
        makes several."""
        return Outputs(
            self.hv_on if hv_on is None else hv_on,
            self.beam_on if beam_on is None else beam_on,
            self.acc_fault_reset if acc_fault_reset is None else acc_fault_reset,
            self.beam_current_sp_ma if beam_current_sp_ma is None else beam_current_sp_ma,
            self.energy_sp_mev if energy_sp_mev is None else energy_sp_mev,
            self.scan_width_sp_cm if scan_width_sp_cm is None else scan_width_sp_cm,
            self.run if run is None else run,
            self.cnv_fault_reset if cnv_fault_reset is None else cnv_fault_reset,
            self.speed_sp_m_min if speed_sp_m_min is None else speed_sp_m_min,
            self.watchdog if watchdog is None else watchdog,
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change and why."""

    t_s: float
    old: LineState
    new: LineState
    cause: str


@dataclass(frozen=True, slots=True)
class Alarm:
    """A process alarm. Latched alarms hold FAULT until reset."""

    kind: AlarmKind
    message: str
    t_s: float
    latched: bool = True


@dataclass(frozen=True, slots=True)
class ReelPlan:
    """The reel the operator asked for."""

    reel_id: str
    planned_length_m: float
    operator: str = ""


class CommandRefused(Exception):  # noqa: N818 - it is a refusal, not a program error
    """An operator command that is not allowed in the current state; str() says why."""


_WATCHDOG_MOD = 0x10000


@dataclass
class _Reel:
    plan: ReelPlan
    started: bool = False  # RUNNING was reached once: the ledger has L0
    complete: bool = False


@dataclass
class Controller:
    """The pure line controller. One instance per line."""

    recipe: Recipe
    geometry: Geometry
    tuning: ControlTuning = field(default_factory=ControlTuning)
    state: LineState = LineState.OFFLINE
    alarms: dict[str, Alarm] = field(default_factory=dict)
    reel: _Reel | None = None
    _out: Outputs = field(default_factory=Outputs)
    _phase: StartPhase = StartPhase.HV
    _phase_t_s: float = 0.0
    _trip_t_s: float | None = None
    _acc_lost_t_s: float | None = None
    # A PLC not yet seen answering is just not connected yet; losing one that answered
    # is an alarm.
    _acc_seen: bool = False
    _cnv_seen: bool = False
    _last_t_s: float | None = None
    _reset_pending: bool = False
    _cycle: int = 0
    _stop_cause: str = ""
    transitions: list[Transition] = field(default_factory=list)
    new_alarms: list[Alarm] = field(default_factory=list)

    # ------------------------------------------------------------------ derived

    @property
    def v_min(self) -> float:
        """Minimum line speed with beam on, m/min."""
        return self.recipe.speed_min_m_min

    @property
    def v_low(self) -> float:
        """The lowest speed the controller runs the beam at, m/min: a speed tolerance above
        v_min, so that speed ripple at the low operating point never cuts the beam."""
        return self.v_min * (1 + self.tuning.speed_tolerance)

    @property
    def v_max(self) -> float:
        """The speed the beam allows at full recipe current, capped by the recipe."""
        return self.recipe.max_speed_m_min(self.geometry.weight_sum)

    def current_for(self, speed_m_min: float, scan_width_cm: float) -> float:
        """Dose-follow: I = D * v * W / (K * sum w), within the recipe's current range."""
        w = scan_width_cm if scan_width_cm > 0 else self.recipe.scan_width_cm
        r = self.recipe
        i = dose.current_for_dose_ma(
            r.k_dose, r.target_dose_kgy, speed_m_min, w, self.geometry.weight_sum
        )
        return min(max(i, self.recipe.beam_current_min_ma), self.recipe.beam_current_max_ma)

    @property
    def outputs(self) -> Outputs:
        """The outputs of the last step."""
        return self._out

    # ------------------------------------------------------------------ operator

    def request_start(self, plan: ReelPlan) -> None:
        """Start (or resume) a reel. Raises CommandRefused with the reason."""
        if self.state is not LineState.READY:
            raise CommandRefused(
                f"cannot start in state {self.state.value}: {self.why_not_ready()}"
            )
        if plan.planned_length_m <= 0:
            raise CommandRefused("planned length must be positive")
        if self.reel is not None and not self.reel.complete:
            if self.reel.plan.reel_id != plan.reel_id:
                raise CommandRefused(
                    unfinished_reel_message(self.reel.plan.reel_id, self.reel.plan.planned_length_m)
                )
        else:
            self.reel = _Reel(plan)
        self._enter_starting(self._last_t_s or 0.0, f"operator started reel {plan.reel_id}")

    def request_stop(self, cause: str = "operator stop") -> None:
        """Stop the line with a ramp-down; the reel can be resumed later."""
        if self.state in (LineState.STARTING, LineState.RUNNING):
            self._stop_cause = cause
            self._to(self._last_t_s or 0.0, LineState.STOPPING, cause)
        elif self.state is not LineState.STOPPING:
            raise CommandRefused(f"nothing to stop in state {self.state.value}")

    def raise_alarm(self, t_s: float, kind: AlarmKind, message: str) -> None:
        """A latched alarm from outside the control core (the record store failing, say):
        the line goes to FAULT and stays there until reset."""
        self._alarm(t_s, kind, message)
        if self.state is not LineState.FAULT:
            self._to(t_s, LineState.FAULT, message)

    def request_reset(self) -> None:
        """Reset latched alarms and PLC faults once their causes are gone."""
        if self.state is not LineState.FAULT and not self.alarms:
            raise CommandRefused("no latched alarm to reset")
        self._reset_pending = True

    def close_reel(self) -> ReelPlan:
        """Forget the current reel (the service closes its records)."""
        if self.reel is None:
            raise CommandRefused("no reel")
        if self.state in (LineState.STARTING, LineState.RUNNING, LineState.STOPPING):
            raise CommandRefused(f"stop the line first (state {self.state.value})")
        plan = self.reel.plan
        self.reel = None
        return plan

    def restore_reel(self, plan: ReelPlan, *, started: bool) -> None:
        """Adopt a reel found open in the records after a restart: it can be resumed
        (request_start with the same id) but not replaced until it is closed."""
        if self.reel is not None:
            raise CommandRefused(f"reel {self.reel.plan.reel_id} is already loaded")
        self.reel = _Reel(plan, started=started)

    def take_events(self) -> tuple[list[Transition], list[Alarm]]:
        """Transitions and new alarms since the last call (operator requests included)."""
        events = (self.transitions, self.new_alarms)
        self.transitions, self.new_alarms = [], []
        return events

    def why_not_ready(self) -> str:
        """Human reason why the line is not READY ('' when it is)."""
        return self._not_ready_reason or ""

    _not_ready_reason: str = ""

    # ------------------------------------------------------------------ step

    def step(self, t_s: float, acc: AccView, cnv: CnvView, position_m: float | None) -> Outputs:
        """One control cycle. `position_m` is the reel coordinate at the length counter
        (from the ledger), None before the reel's start."""
        dt_s = 0.0 if self._last_t_s is None else max(0.0, t_s - self._last_t_s)
        self._last_t_s = t_s
        self._cycle += 1
        out = self._out.changed(
            acc_fault_reset=False,
            cnv_fault_reset=False,
            watchdog=self._cycle % _WATCHDOG_MOD,
            energy_sp_mev=self.recipe.energy_mev,
            scan_width_sp_cm=self.recipe.scan_width_cm,
        )

        # 1. Data quality first: unknown is never treated as fine.
        self._acc_seen |= acc.ok
        self._cnv_seen |= cnv.ok
        if not acc.ok or not cnv.ok:
            out = self._offline(t_s, acc, cnv, out)
            self._out = out
            return out
        if self._acc_lost_t_s is not None:
            self._acc_lost_t_s = None
        if self.state is LineState.OFFLINE:
            self._to(t_s, LineState.FAULT if self.alarms else LineState.IDLE, "both PLCs answer")

        # 2. Interlocks: each acts in this very cycle.
        out = self._interlocks(t_s, acc, cnv, out)

        # 3. Reset of latched alarms.
        if self._reset_pending:
            out = self._reset(t_s, acc, cnv, out)

        # 4. The state's own logic.
        match self.state:
            case LineState.FAULT:
                out = self._safe(out)
            case LineState.IDLE | LineState.READY:
                out = self._safe(out)
                self._update_ready(t_s, acc, cnv)
            case LineState.STARTING:
                out = self._starting(t_s, dt_s, acc, cnv, out)
            case LineState.RUNNING:
                out = self._running(t_s, dt_s, acc, cnv, out, position_m=position_m)
            case LineState.STOPPING:
                out = self._stopping(t_s, dt_s, acc, cnv, out)
            case LineState.OFFLINE:  # pragma: no cover - left above
                out = self._safe(out)

        # 5. Last word: the beam is never requested on a line that is not running or is
        # below the recipe's minimum speed (strictly; the controller's own low operating
        # point, v_low, sits a tolerance above it).
        # Written as `not >=` so that a speed of NaN also takes the beam off.
        if out.beam_on and (not cnv.running or not cnv.speed_m_min >= self.v_min):
            out = out.changed(beam_on=False)
        self._out = out
        return out

    # ------------------------------------------------------------------ pieces

    def _offline(self, t_s: float, acc: AccView, cnv: CnvView, out: Outputs) -> Outputs:
        self._acc_seen |= acc.ok
        self._cnv_seen |= cnv.ok
        if acc.ok:
            # The hold is measured from the latest loss of the accelerator link.
            self._acc_lost_t_s = None
        if not cnv.ok:
            # The conveyor is unknown: the cable may be standing. Beam off at once on the
            # PLC that still answers; the conveyor's own watchdog stops the line.
            if self._cnv_seen:
                self._alarm(t_s, "conveyor_link", "conveyor data lost or stale: beam off")
            out = out.changed(beam_on=False, beam_current_sp_ma=0.0)
        if not acc.ok:
            # The accelerator is unknown: its beam may still be on and we cannot switch
            # it off. Stopping the line now could burn the cable, so hold the speed until
            # the accelerator's watchdog has certainly cut the beam, then stop.
            if self._acc_seen:
                self._alarm(t_s, "accelerator_link", "accelerator data lost or stale")
            if self._acc_lost_t_s is None:
                self._acc_lost_t_s = t_s
            held = t_s - self._acc_lost_t_s < self.tuning.acc_lost_hold_s
            out = out.changed(beam_on=False, beam_current_sp_ma=0.0)
            if not held:
                out = out.changed(run=False, speed_sp_m_min=0.0)
        if self.state is not LineState.OFFLINE:
            self._to(t_s, LineState.OFFLINE, "PLC data lost or stale")
        return out

    def _interlocks(self, t_s: float, acc: AccView, cnv: CnvView, out: Outputs) -> Outputs:
        active = self.state in (LineState.STARTING, LineState.RUNNING, LineState.STOPPING)
        trips: list[tuple[AlarmKind, str]] = []
        for plc, view in (("accelerator", acc), ("conveyor", cnv)):
            bad = _not_finite(plc, view)
            if bad is not None:
                trips.append(bad)
        beam_is_on = beam_measured_on(acc)
        if beam_is_on and (cnv.estop or cnv.cable_break or not cnv.running):
            trips.append(("line_stopped_beam_on", "beam on while the line is not running"))
        elif beam_is_on and cnv.speed_m_min < self.v_min * (1 - self.tuning.speed_tolerance):
            trips.append(
                (
                    "below_min_speed_beam_on",
                    f"beam on at {cnv.speed_m_min:.1f} m/min, below {self.v_min:g} m/min",
                )
            )
        if cnv.estop:
            trips.append(("estop", "emergency stop on the conveyor"))
        if cnv.cable_break:
            trips.append(("cable_break", "cable break"))
        if cnv.fault:
            # In any state: a fault latched while IDLE is an alarm an operator can reset.
            trips.append(("conveyor_fault", fault_text("conveyor", cnv.fault_code)))
        if acc.fault and (active or acc.fault_code not in (0,)):
            trips.append(("accelerator_fault", fault_text("accelerator", acc.fault_code)))
        if not acc.safety_ok and (active or beam_is_on):
            trips.append(("safety_chain", "personnel safety chain open"))
        hv_expected = self._out.hv_on and (
            self.state in (LineState.RUNNING, LineState.STOPPING)
            or (self.state is LineState.STARTING and self._phase is not StartPhase.HV)
        )
        if hv_expected and not acc.hv_on:
            # HV dropped while we hold it on: an HV fault or a PLC restart.
            trips.append(("hv_lost", "accelerator high voltage dropped while requested"))
        if acc.hv_on and (active or beam_is_on):
            if not acc.vacuum_ok:
                trips.append(("vacuum", "accelerator vacuum fault"))
            if not acc.scan_ok:
                trips.append(("scan", "scan fault"))
            if not acc.cooling_ok:
                trips.append(("cooling", "cooling fault"))
            hv_settled = self.state is not LineState.STARTING or self._phase is not StartPhase.HV
            if hv_settled and not self.recipe.energy_ok(acc.energy_mev):
                trips.append(
                    (
                        "energy",
                        f"energy {acc.energy_mev:.3f} MeV outside {self.recipe.energy_mev:g} "
                        f"+/- {self.recipe.energy_tolerance_mev:g}",
                    )
                )
        if not trips:
            return out
        for kind, msg in trips:
            self._alarm(t_s, kind, msg)
        if self.state is not LineState.FAULT:
            self._to(t_s, LineState.FAULT, "; ".join(m for _, m in trips))
        return self._safe(out)

    def _safe(self, out: Outputs) -> Outputs:
        """Beam off, line to a stop (normal ramp), HV kept only while nothing is wrong."""
        return out.changed(
            beam_on=False,
            beam_current_sp_ma=0.0,
            hv_on=out.hv_on and self.state is not LineState.FAULT,
            run=False,
            speed_sp_m_min=0.0,
        )

    def _reset(self, t_s: float, acc: AccView, cnv: CnvView, out: Outputs) -> Outputs:
        self._reset_pending = False
        out = out.changed(acc_fault_reset=acc.fault, cnv_fault_reset=cnv.fault)
        # Alarms whose cause is still present come back on the next cycle's interlocks.
        self.alarms.clear()
        if self.state is LineState.FAULT:
            self._to(t_s, LineState.IDLE, "operator reset")
        return out

    def _update_ready(self, t_s: float, acc: AccView, cnv: CnvView) -> None:
        reasons = []
        if not acc.ready:
            reasons.append("accelerator not READY")
        if not acc.safety_ok:
            reasons.append("safety chain open")
        if acc.fault:
            reasons.append(fault_text("accelerator", acc.fault_code))
        if not cnv.ready:
            reasons.append("conveyor not READY")
        if cnv.fault:
            reasons.append(fault_text("conveyor", cnv.fault_code))
        if cnv.estop:
            reasons.append("e-stop")
        if not conveyor_at_standstill(cnv):
            # A reel starts on a standing line: its coordinate 0 is the counter then.
            reasons.append("conveyor still moving")
        if beam_measured_on(acc):
            reasons.append("beam still on")
        if self.alarms:
            reasons.append("alarms not reset: " + ", ".join(sorted(self.alarms)))
        self._not_ready_reason = "; ".join(reasons)
        want = LineState.IDLE if reasons else LineState.READY
        if want is not self.state:
            self._to(t_s, want, self._not_ready_reason or "all permissives met")

    def _enter_starting(self, t_s: float, cause: str) -> None:
        self._phase = StartPhase.HV
        self._phase_t_s = t_s
        self._trip_t_s = None
        self._to(t_s, LineState.STARTING, cause)

    def _ramp_speed(self, dt_s: float, current_sp: float, target: float) -> float:
        """Next speed set-point: within the line's ramp, the accelerator's current ramp,
        and a relative limit at low speed."""
        k = self.recipe.k_dose * self.geometry.weight_sum
        # dI/dt = D W / (K sum w) * dv/dt: the beam's ramp bounds the line's.
        by_current = (
            self.tuning.current_ramp_ma_s
            * k
            / (self.recipe.target_dose_kgy * self.recipe.scan_width_cm)
        )
        rate = min(
            self.tuning.line_ramp_m_min_s,
            0.9 * by_current,
            max(self.tuning.relative_ramp_per_s * max(current_sp, self.v_min), 0.5),
        )
        step = rate * dt_s
        if target > current_sp:
            return min(target, current_sp + step)
        return max(target, current_sp - step)

    def _follow_current(self, out: Outputs, acc: AccView, cnv: CnvView, dt_s: float) -> Outputs:
        # Lead the measured speed by the accelerator's lag so the dose stays on target
        # while the line ramps.
        slope = 0.0 if dt_s <= 0 else (out.speed_sp_m_min - self._out.speed_sp_m_min) / dt_s
        v_ff = max(0.0, cnv.speed_m_min + slope * self.tuning.current_lag_s)
        return out.changed(beam_current_sp_ma=self.current_for(v_ff, acc.scan_width_cm))

    def _starting(
        self, t_s: float, dt_s: float, acc: AccView, cnv: CnvView, out: Outputs
    ) -> Outputs:
        if t_s - self._phase_t_s > self.tuning.start_timeout_s:
            self._alarm(t_s, "start_timeout", f"start phase {self._phase.value} did not complete")
            self._to(t_s, LineState.FAULT, f"start timed out in phase {self._phase.value}")
            return self._safe(out)
        out = out.changed(hv_on=True)
        match self._phase:
            case StartPhase.HV:
                out = out.changed(beam_on=False, run=False, speed_sp_m_min=0.0)
                energy_ok = self.recipe.energy_ok(acc.energy_mev)
                if acc.hv_on and acc.ready and energy_ok and acc.scan_ok:
                    self._phase, self._phase_t_s = StartPhase.LINE, t_s
            case StartPhase.LINE:
                sp = self._ramp_speed(dt_s, self._out.speed_sp_m_min, self.v_low)
                out = out.changed(run=True, speed_sp_m_min=sp, beam_on=False)
                if cnv.running and cnv.speed_m_min >= self.v_min:
                    self._phase, self._phase_t_s = StartPhase.BEAM, t_s
            case StartPhase.BEAM:
                # Keep ramping: a jump of the set-point would also jump the current's lead.
                sp = self._ramp_speed(dt_s, self._out.speed_sp_m_min, self.v_low)
                out = out.changed(run=True, speed_sp_m_min=sp, beam_on=True)
                out = self._follow_current(out, acc, cnv, dt_s)
                target = out.beam_current_sp_ma
                if acc.beam_on and abs(acc.beam_current_ma - target) <= max(0.03 * target, 0.2):
                    assert self.reel is not None
                    self.reel.started = True
                    self._to(t_s, LineState.RUNNING, "beam on at dose-follow current")
        return out

    def _running(
        self,
        t_s: float,
        dt_s: float,
        acc: AccView,
        cnv: CnvView,
        out: Outputs,
        *,
        position_m: float | None,
    ) -> Outputs:
        assert self.reel is not None
        out = out.changed(hv_on=True, run=True, beam_on=True)
        # Planned end: the last product metre has left the last pass.
        if (
            position_m is not None
            and position_m - self.geometry.last_pass_offset_m >= self.reel.plan.planned_length_m
        ):
            self.reel.complete = True
            self._stop_cause = "planned length reached"
            self._to(t_s, LineState.STOPPING, "planned length reached")
            return self._stopping(t_s, dt_s, acc, cnv, out)
        # Beam trip: fault_code 1, or the beam is requested but not on.
        tripped = acc.fault_code == 1 or (self._out.beam_on and not acc.beam_on)
        target = self.v_max
        if tripped:
            if self._trip_t_s is None:
                self._trip_t_s = t_s
            outage = t_s - self._trip_t_s
            if outage > self.tuning.trip_stop_s:
                self._alarm(t_s, "beam_outage", f"beam off for {outage:.1f} s", latched=False)
                self._stop_cause = "long beam outage"
                self._to(t_s, LineState.STOPPING, f"beam outage of {outage:.1f} s")
                return self._stopping(t_s, dt_s, acc, cnv, out)
            if outage > self.tuning.ride_through_s:
                target = self.v_low  # little cable passes unirradiated while we wait
        else:
            self._trip_t_s = None
        sp = self._ramp_speed(dt_s, self._out.speed_sp_m_min or cnv.speed_m_min, target)
        out = out.changed(speed_sp_m_min=sp)
        return self._follow_current(out, acc, cnv, dt_s)

    def _stopping(
        self, t_s: float, dt_s: float, acc: AccView, cnv: CnvView, out: Outputs
    ) -> Outputs:
        tol = self.tuning.speed_tolerance
        sp = self._ramp_speed(dt_s, self._out.speed_sp_m_min, self.v_min)
        beam_wanted = self._out.beam_on and cnv.speed_m_min > self.v_min * (1 + tol)
        if beam_wanted and acc.fault_code != 1:
            out = out.changed(hv_on=True, run=True, beam_on=True, speed_sp_m_min=sp)
            return self._follow_current(out, acc, cnv, dt_s)
        # At minimum speed (or the beam is gone): beam off first, then the line.
        out = out.changed(beam_on=False, beam_current_sp_ma=0.0, hv_on=True)
        if beam_measured_on(acc):
            return out.changed(run=True, speed_sp_m_min=max(sp, self.v_min))
        out = out.changed(run=False, speed_sp_m_min=0.0)
        if conveyor_at_standstill(cnv):
            self._to(t_s, LineState.IDLE, f"stopped: {self._stop_cause}")
        return out

    # ------------------------------------------------------------------ bookkeeping

    def _alarm(self, t_s: float, kind: AlarmKind, message: str, *, latched: bool = True) -> None:
        if kind in self.alarms:
            return
        a = Alarm(kind, message, t_s, latched)
        if latched:
            self.alarms[kind] = a
        self.new_alarms.append(a)

    def _to(self, t_s: float, new: LineState, cause: str) -> None:
        if new is self.state:
            return
        if (self.state, new) not in TRANSITIONS:
            raise IllegalTransitionError(f"{self.state.value} -> {new.value} ({cause})")
        self.transitions.append(Transition(t_s, self.state, new, cause))
        self.state = new
