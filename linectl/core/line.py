"""One line, one control cycle at a time: the per-cycle domain logic, pure.

`Line.cycle()` takes this cycle's time, the freshest reading of each PLC and the
operator commands waiting, and returns a `CycleReport`: the PLC writes, the answers to
the commands, the metre records, the state transitions and alarms, and the record
store's jobs (`Effect`s) in the order they must be done. It reads no clock, opens no
socket or file and starts no task: `linectl.service` does the I/O around it, and the
closed-loop tests on simulated time drive this same code (tests/harness.py).

What lives here: reel start (coordinate 0 on the standing line), resume after a restart
(from the checkpointed ledger, or the fallback that marks what it cannot prove), the
checkpoints, the end-of-reel rest rule, the energy check, the start-up reset of watchdog
trips linectl's own absence caused, alarms as the operator sees them (the alarm board:
ISA-18.2 states, acknowledgement, shelving), and the commands' effect on all of it.

Logging is the only side effect: a log line says what happened, for the plant engineer.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol, assert_never

from linectl.commands import MAX_SHELVE_S, Command, CommandName, CommandResult
from linectl.config import ControlTuning, LoadedConfig, Recipe, RegisterMap
from linectl.core.align import AccPoint, CnvPoint, CounterAligner, PlcClock
from linectl.core.control import (
    AccView,
    Alarm,
    AlarmKind,
    CnvView,
    CommandRefused,
    Controller,
    LineState,
    Outputs,
    ReelPlan,
    Transition,
    at_rest,
    conveyor_at_standstill,
    watchdog_trips_only,
)
from linectl.core.held_gap import Held, LinkTiming, held_gap_bound
from linectl.core.ledger import DoseLedger, LedgerSample, MetreRecord
from linectl.core.views import (
    CounterUnits,
    acc_view,
    acc_writes,
    cnv_view,
    cnv_writes,
    plc_clock_modulus_ms,
)
from linectl.errors import LocalError
from linectl.quality import Quality, Sample
from linectl.telemetry import ActiveAlarm, AlarmView, LineStatus, LiveValue, ms_to_iso

log = logging.getLogger("linectl.line")

LEDGER_STATE = "ledger"
"""The store's state key of a reel's ledger checkpoint."""

END_REEL_REST_S = 1.0
"""How long the cable and the beam must have been at rest before end_reel is taken:
far longer than the ledger lags the PLCs (the aligner holds a sample a few cycles)."""

CHECKPOINT_PERIOD_S = 1.0
"""A running reel's ledger is checkpointed at least this often (and at a clean stop)."""

RESUME_CLOCK_TOL_S = 2.0
"""How far a PLC's clock may disagree with the wall clock across a restart of linectl
(clock drift, sample ages) before it counts as a PLC restart."""

MAX_LINE_SPEED_M_MIN = 300.0
"""Faster than any cable line in the spec's range (5 to 250 m/min) runs."""


# ---------------------------------------------------------------------- inputs


class PlcReading(Protocol):
    """One poll of one PLC, as the control cycle sees it (a `modbus.link.Snapshot`
    satisfies it; the simulated-time harness builds its own)."""

    @property
    def seq(self) -> int:
        """The poll's number on its link: a new reading has a new one."""
        ...

    @property
    def host_time_s(self) -> float:
        """The link's clock when the poll finished."""
        ...

    @property
    def ok(self) -> bool:
        """Every value GOOD."""
        ...

    def get(self, name: str) -> Sample:
        """The named field's sample."""
        ...

    def value(self, name: str) -> float | int | None:
        """The named field's value (None when not GOOD)."""
        ...

    def __iter__(self) -> Iterator[str]:
        """The field names."""
        ...


@dataclass(frozen=True, slots=True)
class PreparedRecipe:
    """A recipe a command selects, read and hashed before it reaches the cycle."""

    name: str
    recipe: Recipe
    sha256: str


@dataclass(frozen=True, slots=True)
class CycleInput:
    """What one cycle gets: time, both PLCs' freshest readings, commands."""

    t_s: float
    """The controller's monotonic clock."""
    wall: str
    """Wall-clock time, ISO 8601 UTC (records)."""
    wall_ms: int
    """Wall-clock time, unix ms (telemetry, checkpoints)."""
    acc: PlcReading | None
    cnv: PlcReading | None
    acc_fresh: bool = True
    """Whether the accelerator's data may be used for control (by its age)."""
    cnv_fresh: bool = True
    acc_now_s: float | None = None
    """The accelerator link's clock now (the readings' time base); default t_s."""
    cnv_now_s: float | None = None
    commands: Sequence[tuple[Command, PreparedRecipe | None]] = ()
    """Authorised commands, in arrival order; each gets its answer in the report."""
    acc_first: PlcReading | None = None
    """The accelerator as linectl found it: its first complete poll since linectl
    started, before linectl wrote anything but the heartbeat (holding registers
    included). A resume after a crash reads the set-points the PLC held from it."""
    cnv_first: PlcReading | None = None
    store_error: str | None = None
    """A record-store write failed since the last cycle: the records alarm."""


# ---------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class OpenReel:
    reel_id: str
    line_id: str
    recipe: Recipe
    recipe_sha256: str
    operator: str
    planned_length_m: float
    started_at: str


@dataclass(frozen=True, slots=True)
class SaveState:
    reel_id: str
    key: str
    state: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AddMetres:
    """Metre records and the ledger checkpoint, in one transaction."""

    reel_id: str
    records: tuple[MetreRecord, ...]
    wall: str
    checkpoint: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class MarkUnproven:
    reel_id: str
    first_metre: int
    last_metre: int
    cause: str
    wall: str


@dataclass(frozen=True, slots=True)
class CloseReel:
    reel_id: str
    wall: str
    reason: str


@dataclass(frozen=True, slots=True)
class Audit:
    wall: str
    actor: str
    action: str
    detail: Mapping[str, Any]
    accepted: bool
    reason: str = ""
    reel_id: str | None = None


@dataclass(frozen=True, slots=True)
class RaiseAlarm:
    kind: str
    message: str
    wall: str
    reel_id: str | None


@dataclass(frozen=True, slots=True)
class ClearAlarmsExcept:
    keep: tuple[str, ...]
    wall: str


@dataclass(frozen=True, slots=True)
class AckAlarms:
    kind: str
    by: str
    wall: str


@dataclass(frozen=True, slots=True)
class ShelveAlarm:
    """An alarm shelved until `until_ms` (unix ms): the shelf in force, kept across a
    restart of linectl (the command itself is audited by the command path)."""

    kind: str
    message: str
    raised_ms: int
    """When the alarm was last raised, unix ms (the board shows it after a restart)."""
    until_ms: int
    by: str
    reason: str
    wall: str


@dataclass(frozen=True, slots=True)
class UnshelveAlarm:
    """The shelf of `kind` ends: by an operator's unshelve_alarm, or `expired`."""

    kind: str
    by: str
    wall: str
    expired: bool = False


Effect = (
    OpenReel
    | SaveState
    | AddMetres
    | MarkUnproven
    | CloseReel
    | Audit
    | RaiseAlarm
    | ClearAlarmsExcept
    | AckAlarms
    | ShelveAlarm
    | UnshelveAlarm
)
"""A record-store job; the service runs them in order on its store worker."""


# ---------------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True)
class CycleReport:
    """What one cycle did. Immutable: adapters read it, never the line's internals."""

    t_s: float
    wall_ms: int
    state: LineState
    outputs: Outputs
    acc_writes: Mapping[str, float | int]
    cnv_writes: Mapping[str, float | int]
    results: tuple[CommandResult, ...]
    """One per input command, in order."""
    transitions: tuple[Transition, ...]
    alarms: tuple[Alarm, ...]
    effects: tuple[Effect, ...]
    metres: tuple[tuple[str, tuple[MetreRecord, ...]], ...]
    """(reel id, final metres), as recorded this cycle."""
    reel_started: tuple[str, float] | None
    """(reel id, length-counter reading in m) when dose accounting started."""
    finished_reel: str | None
    stop_service: bool
    """The service should stop: the reel it was started for is done or refused."""
    position_m: float | None
    status: LineStatus
    """The line state as `state` reports it (t_ms: when the state was entered)."""
    active_alarms: tuple[ActiveAlarm, ...]
    """The latched alarms held now, oldest first."""
    alarm_board: tuple[AlarmView, ...]
    """The alarm board (ISA-18.2 states, shelved alarms included), oldest first."""
    live: Mapping[str, LiveValue]
    """The live values (telemetry.LIVE_VALUES) with their quality and measurement time."""


@dataclass
class _Resume:
    """An interrupted reel found at start, waiting for a sample to resume on."""

    ckpt: Mapping[str, Any]
    position_lost: bool = False  # the conveyor restarted while linectl was away


@dataclass(frozen=True, slots=True)
class ReelRequest:
    """A reel to run, as the operator gave it."""

    reel_id: str
    length_m: float
    operator: str = ""


# ---------------------------------------------------------------------- the alarm board

UNACK = "unack"
ACKED = "acked"
RTN_UNACK = "rtn_unack"
SHELVED = "shelved"
_NORMAL = "normal"  # returned and acknowledged: off the board (unless shelved)


@dataclass
class _BoardAlarm:
    """One alarm kind on the board, in its real (unshelved) state."""

    kind: str
    message: str
    latched: bool
    """A latched kind: it holds FAULT until an operator reset."""
    t_ms: int
    """When it was last raised, unix ms."""
    order: int
    """Raise order: the board is listed oldest first."""
    state: str = UNACK
    unacked: int = 0
    """Occurrences not yet acknowledged (each is a row of the records)."""

    @property
    def active(self) -> bool:
        return self.state in (UNACK, ACKED)


@dataclass(frozen=True, slots=True)
class Shelf:
    """An alarm shelved by an operator until a wall-clock time."""

    kind: str
    until_ms: int
    by: str
    reason: str


@dataclass
class AlarmBoard:
    """The alarms as the operator handles them, with ISA-18.2 states; pure.

    - raised: a latched alarm is active and unacknowledged (`unack`); a momentary one
      (not latched) is raised and at once back to normal: `rtn_unack`;
    - acknowledged: `unack` -> `acked`; `rtn_unack` -> off the board;
    - the operator reset (the controller no longer holds it): `acked` -> off the board;
      `unack` -> `rtn_unack`;
    - a latched alarm raised again while `acked` or `rtn_unack` -> `unack` (a momentary
      one -> `unack` while active, else `rtn_unack`).

    Shelving hides one alarm from the operator's list until a wall-clock time: its view
    says `shelved`, whatever its real state, which goes on changing underneath (a raise
    while shelved is recorded as usual). A shelved alarm stays on the board until it is
    unshelved, also once its real state has gone back to normal. The board never acts
    on the line: the interlocks and the controller's latched alarms do not see it.
    """

    _alarms: dict[str, _BoardAlarm] = field(default_factory=dict)
    _shelves: dict[str, Shelf] = field(default_factory=dict)
    _order: int = 0

    def raise_alarm(self, kind: str, message: str, *, latched: bool, t_ms: int) -> None:
        """An alarm raised: `unack` (latched, or raised while active), else `rtn_unack`."""
        self._order += 1
        a = self._alarms.get(kind)
        if a is None:
            a = self._alarms[kind] = _BoardAlarm(kind, message, latched, t_ms, 0, _NORMAL)
        a.message, a.latched, a.t_ms, a.order = message, latched, t_ms, self._order
        a.state = UNACK if latched or a.active else RTN_UNACK
        a.unacked += 1

    def restore(self, kind: str, message: str, t_ms: int) -> None:
        """An alarm the records hold unacknowledged from an earlier run: the controller
        does not hold it (any more), so it is `rtn_unack` until acknowledged."""
        self._order += 1
        a = self._alarms.get(kind)
        if a is None:
            a = self._alarms[kind] = _BoardAlarm(kind, message, True, t_ms, self._order, _NORMAL)
        elif t_ms >= a.t_ms:
            a.message, a.t_ms = message, t_ms
        if not a.active:
            a.state = RTN_UNACK
        a.unacked += 1

    def returned(self, held: Collection[str]) -> None:
        """The controller holds only `held` latched now: the others returned to normal
        (an operator reset cleared them, or they never latched)."""
        for a in list(self._alarms.values()):
            if a.active and a.kind not in held:
                self._set(a, RTN_UNACK if a.state == UNACK else _NORMAL)

    def ack(self, kind: str) -> None:
        """Acknowledge every occurrence of `kind`."""
        a = self._alarms.get(kind)
        if a is None or not a.unacked:
            raise CommandRefused(f"no unacknowledged alarm {kind!r}")
        a.unacked = 0
        self._set(a, ACKED if a.active else _NORMAL)

    def unacked(self) -> dict[str, int]:
        """Alarm kind -> occurrences not yet acknowledged."""
        return {k: a.unacked for k, a in self._alarms.items() if a.unacked}

    def shelf(self, kind: str) -> Shelf | None:
        """The shelf of `kind` in force, if any."""
        return self._shelves.get(kind)

    def shelves(self) -> tuple[Shelf, ...]:
        """Every shelf in force."""
        return tuple(self._shelves.values())

    def on_board(self, kind: str) -> bool:
        """Whether `kind` is listed (in a state other than normal, or shelved)."""
        a = self._alarms.get(kind)
        return a is not None and (a.state != _NORMAL or kind in self._shelves)

    def shelve(self, kind: str, until_ms: int, by: str, reason: str) -> Shelf:
        """Shelve an alarm on the board until `until_ms`; CommandRefused when it is not
        on the board or is shelved already."""
        old = self._shelves.get(kind)
        if old is not None:
            raise CommandRefused(
                f"alarm {kind!r} is shelved already, until {ms_to_iso(old.until_ms)} (by "
                f"{old.by}): unshelve it first to shelve it again"
            )
        if not self.on_board(kind):
            listed = ", ".join(v.kind for v in self.views())
            raise CommandRefused(
                f"no alarm {kind!r} on the alarm board: only a raised alarm can be shelved "
                + (f"(on the board: {listed})" if listed else "(the board is empty)")
            )
        shelf = self._shelves[kind] = Shelf(kind, until_ms, by, reason)
        return shelf

    def unshelve(self, kind: str) -> Shelf:
        """End the shelf of `kind`; the alarm shows in its real state again (off the
        board if that is normal). CommandRefused when it is not shelved."""
        shelf = self._shelves.pop(kind, None)
        if shelf is None:
            shelved = ", ".join(sorted(self._shelves))
            raise CommandRefused(
                f"alarm {kind!r} is not shelved"
                + (f" (shelved: {shelved})" if shelved else " (no alarm is shelved)")
            )
        a = self._alarms.get(kind)
        if a is not None and a.state == _NORMAL:
            del self._alarms[kind]
        return shelf

    def restore_shelf(self, shelf: Shelf, message: str, t_ms: int) -> None:
        """A shelf in force found in the records at start (it may have expired since:
        `expired()` ends it at the first cycle)."""
        if shelf.kind not in self._alarms:
            self._order += 1
            self._alarms[shelf.kind] = _BoardAlarm(
                shelf.kind, message, True, t_ms, self._order, _NORMAL
            )
        self._shelves[shelf.kind] = shelf

    def expired(self, now_ms: int) -> list[Shelf]:
        """End the shelves whose time has come (wall clock at or past `until_ms`)."""
        out = [s for s in self._shelves.values() if now_ms >= s.until_ms]
        for s in out:
            self.unshelve(s.kind)
        return out

    def real_state(self, kind: str) -> str | None:
        """The state `kind` would show unshelved (None: not on the board)."""
        a = self._alarms.get(kind)
        return None if a is None or a.state == _NORMAL else a.state

    def t_ms(self, kind: str) -> int | None:
        a = self._alarms.get(kind)
        return None if a is None else a.t_ms

    def message(self, kind: str) -> str:
        a = self._alarms.get(kind)
        return "" if a is None else a.message

    def views(self) -> tuple[AlarmView, ...]:
        """The board, oldest raise first: every alarm not back to normal, and every
        shelved one (state `shelved`, with its shelf)."""
        out = []
        for a in sorted(self._alarms.values(), key=lambda a: (a.t_ms, a.order)):
            shelf = self._shelves.get(a.kind)
            if shelf is None and a.state == _NORMAL:
                continue
            out.append(
                AlarmView(
                    kind=a.kind,
                    message=a.message,
                    state=SHELVED if shelf is not None else a.state,
                    active=a.active,
                    latched=a.latched and a.active,
                    t_ms=a.t_ms,
                    shelved_until_ms=None if shelf is None else shelf.until_ms,
                    shelved_by=None if shelf is None else shelf.by,
                    shelve_reason=None if shelf is None else shelf.reason,
                )
            )
        return tuple(out)

    def _set(self, a: _BoardAlarm, state: str) -> None:
        a.state = state
        if state == _NORMAL and a.kind not in self._shelves:
            del self._alarms[a.kind]


# ---------------------------------------------------------------------- the line


class Line:
    """One line's control, dose accounting and reel bookkeeping; pure (time in)."""

    def __init__(
        self,
        cfg: LoadedConfig,
        recipe: Recipe,
        recipe_sha256: str,
        recipe_name: str,
        *,
        tuning: ControlTuning | None = None,
        exit_when_done: bool = False,
    ) -> None:
        self.cfg = cfg
        self.line_id = cfg.line.line_id
        self.tuning = tuning or cfg.line.control
        self.recipe = recipe
        self.recipe_sha256 = recipe_sha256
        self.recipe_name = recipe_name
        self.exit_when_done = exit_when_done
        self.units = CounterUnits.from_maps(cfg.accelerator_map, cfg.conveyor_map)
        # The PLC fields live_values reports, in its order: (0 accelerator / 1 conveyor,
        # map field, live value, scale to the live value's unit); made once, not per cycle.
        self._live_fields: tuple[tuple[int, str, str, float], ...] = (
            (0, "beam_current", "beam_current_ma", 1.0),
            (0, "energy", "energy_mev", 1.0),
            (0, "scan_width", "scan_width_cm", 1.0),
            (0, "vacuum", "vacuum_pa", 1.0),
            (1, "speed", "speed_m_min", 1.0),
            (1, "tension", "tension_n", 1.0),
            (1, "length", "length_counter_m", self.units.length_to_m),
        )
        self._acc_clock = PlcClock(plc_clock_modulus_ms(cfg.accelerator_map))
        self._cnv_clock = PlcClock(plc_clock_modulus_ms(cfg.conveyor_map))
        self.aligner = CounterAligner(self.units.charge_modulus_uc)
        self.ctl = Controller(recipe, cfg.line.geometry, self.tuning)
        self.ledger: DoseLedger | None = None
        self.records_written = 0
        self.finished_reels: list[str] = []
        self.reel_refused: str | None = None
        """Why request_reel's reel did not start."""
        self.last_acc: PlcReading | None = None
        self.last_cnv: PlcReading | None = None
        self.state_cause = "starting"
        self.state_ms: int | None = None
        """Unix ms when the state was entered (None: at start)."""
        self.alarm_ms: dict[str, int] = {}
        self.board = AlarmBoard()
        """The alarms as the operator handles them (ISA-18.2 states, shelving)."""
        self.opened_reels: set[str] = set()
        """Reel ids taken, in this run or found in the records."""
        self.at_rest_since_s: float | None = None
        """Since when the cable and the beam have been seen at rest (conveyor stopped,
        beam off, both PLCs answering): end_reel needs the ledger caught up with it."""
        self.reel_request: ReelRequest | None = None
        self._resume_request: str | None = None  # the operator who asked to resume
        self._resume: _Resume | None = None
        self._close_pending: str | None = None  # close the reel once the line stands
        self._reset_request = False
        self._reset_actor = "operator"
        self._startup_reset = False  # the start-up reset of watchdog trips is pending
        self._fault_stopped: str | None = None  # the reel a fault stopped while it ran
        self._acc_seq = self._cnv_seq = -1  # the readings the ledger has had
        self._clock_resets = {"accelerator": 0, "conveyor": 0}
        self._first_contact = False  # both PLCs have answered once since start
        self._last_ckpt_t = -math.inf
        self._last_sample_length_m: float | None = None
        self._latched: frozenset[str] = frozenset()
        # Since when the line has run at speed on one speed set-point, beam on: what a
        # checkpoint records so that a crash's gap can be bounded (core/held_gap.py).
        self._steady_since_s: float | None = None
        self._held: Held | None = None
        # Each PLC as linectl found it at start (CycleInput.acc_first), by field name.
        self._first_values: dict[str, dict[str, float | int | None]] = {}
        self._state_before: LineState | None = None  # after the last cycle's step
        # This cycle's time, and what it produces.
        self._in = CycleInput(0.0, "", 0, None, None)
        self._effects: list[Effect] = []
        self._metres: list[tuple[str, tuple[MetreRecord, ...]]] = []
        self._reel_started: tuple[str, float] | None = None
        self._finished: str | None = None
        self._stop_service = False

    # ------------------------------------------------------------------ requests

    def request_reel(self, reel: ReelRequest) -> None:
        """Run this reel as soon as the line is READY."""
        self.reel_request = reel

    def request_resume(self, operator: str = "") -> None:
        """Resume the interrupted reel found in the records, once the line is READY."""
        self._resume_request = operator

    def request_reset(self) -> None:
        """Reset latched alarms and PLC faults once both PLCs have answered."""
        self._reset_request = True

    def interrupted_reel(self) -> ReelPlan | None:
        """The reel found open in the records at start (resume it with request_reel)."""
        reel = self.ctl.reel
        return reel.plan if reel is not None and not reel.complete else None

    @property
    def current_reel_id(self) -> str | None:
        return self.ctl.reel.plan.reel_id if self.ctl.reel is not None else None

    def restore_interrupted(
        self,
        plan: ReelPlan,
        recipe: Recipe,
        recipe_sha256: str,
        ckpt: Mapping[str, Any] | None,
    ) -> None:
        """An unfinished reel from the records: its recipe (and hash) are the ones it was
        started with; without a checkpoint it never reached its start (no cable was
        accounted) and starts afresh when resumed."""
        self.recipe, self.recipe_sha256 = recipe, recipe_sha256
        self.ctl = Controller(recipe, self.cfg.line.geometry, self.tuning)
        self.opened_reels.add(plan.reel_id)  # its id is taken, whatever becomes of it
        self.ctl.restore_reel(plan, started=ckpt is not None)
        if ckpt is not None:
            self._resume = _Resume(ckpt)

    def restore_alarm(self, kind: str, message: str, t_ms: int) -> None:
        """An alarm the records hold unacknowledged from an earlier run (at start): on
        the board, returned to normal and unacknowledged, until an operator acknowledges
        it."""
        self.board.restore(kind, message, t_ms)

    def restore_shelf(
        self, kind: str, *, message: str, raised_ms: int, until_ms: int, by: str, reason: str
    ) -> None:
        """A shelf the records hold in force (at start). One that expired while linectl
        was down is ended, and audited, at the first cycle."""
        self.board.restore_shelf(Shelf(kind, until_ms, by, reason), message, raised_ms)

    @property
    def unacked(self) -> dict[str, int]:
        """Alarm kind -> unacknowledged occurrences."""
        return self.board.unacked()

    # ------------------------------------------------------------------ the cycle

    def cycle(self, inp: CycleInput) -> CycleReport:
        """One control cycle on the freshest readings."""
        self._in = inp
        if self.state_ms is None:
            self.state_ms = inp.wall_ms  # the state "starting" began with the first cycle
        t_s = inp.t_s
        acc_r, cnv_r = inp.acc, inp.cnv
        self.last_acc, self.last_cnv = acc_r, cnv_r
        acc_vals = reading_values(acc_r) if acc_r is not None else {}
        cnv_vals = reading_values(cnv_r) if cnv_r is not None else {}
        acc = acc_view(acc_vals, self.cfg.accelerator_map, ok=acc_r is not None and inp.acc_fresh)
        cnv = cnv_view(cnv_vals, self.cfg.conveyor_map, ok=cnv_r is not None and inp.cnv_fresh)

        # Counter points for the ledger: new readings with every value GOOD only, each
        # at the moment its PLC sampled it (the PLC clocks also tell a PLC restart).
        energy_ok = not acc.beam_on or self.recipe.energy_ok(acc.energy_mev)
        acc_pt = cnv_pt = None
        if acc_r is not None and acc_r.seq != self._acc_seq:
            self._acc_seq = acc_r.seq
            acc_pt = self._acc_point(acc_r, energy_ok)
        if cnv_r is not None and cnv_r.seq != self._cnv_seq:
            self._cnv_seq = cnv_r.seq
            cnv_pt = self._cnv_point(cnv_r)
        self._check_plc_restarts(t_s)

        if not at_rest(acc, cnv):
            self.at_rest_since_s = None
        elif self.at_rest_since_s is None:
            self.at_rest_since_s = t_s

        if inp.store_error is not None:
            # Cable that cannot be recorded cannot be shown in spec: stop making it.
            self.ctl.raise_alarm(t_s, "records", inp.store_error)
        self._expire_shelves()
        self._operator_requests()
        results = tuple(self.command(cmd, recipe) for cmd, recipe in inp.commands)
        position = None
        if self.ledger is not None and self.ledger.position_m is not None:
            # The planned end waits out any position uncertainty, so that every product
            # metre's verdict window has left the last pass before the line stops.
            position = self.ledger.position_m - self.ledger.position_uncertainty_m
        out = self.ctl.step(t_s, acc, cnv, position)
        self._track_steady(t_s, acc, cnv, out)
        for plc, first in (("accelerator", inp.acc_first), ("conveyor", inp.cnv_first)):
            if plc not in self._first_values and first is not None and first.ok:
                self._first_values[plc] = reading_values(first)
        writes = (acc_writes(out, self.cfg.accelerator_map), cnv_writes(out, self.cfg.conveyor_map))
        if self.ctl.state is LineState.STARTING and self._state_before is not LineState.STARTING:
            # A start taken since the last cycle (here, or by a command in between).
            self._reel_zero(acc_r, cnv_r, cnv)
        self._state_before = self.ctl.state
        transitions, alarms = self._events()
        if acc.ok and cnv.ok and not self._first_contact:
            self._first_contact = True
            self._on_first_contact(acc, cnv)

        now_link_s = max((r.host_time_s for r in (acc_r, cnv_r) if r is not None), default=t_s)
        self._account(t_s, self.aligner.push(now_link_s, acc_pt, cnv_pt))
        return self._report(out, writes, results, transitions, alarms)

    def checkpoint(self, inp: CycleInput) -> CycleReport:
        """The checkpoint a restart resumes from (at a clean stop), with nothing else."""
        self._in = inp
        if self.ledger is not None and self.ctl.reel is not None:
            self._save([], inp.t_s)
        out = self.ctl.outputs
        return self._report(out, ({}, {}), (), [], [])

    def refuse(self, cmd: Command, reason: str, *, wall: str) -> tuple[CommandResult, Audit]:
        """A command refused outside the cycle (not authorised, not running): the answer
        and its audit record."""
        log.warning("command %s from %s refused: %s", cmd.name.value, cmd.sender, reason)
        audit = Audit(
            wall,
            cmd.sender,
            cmd.name.value,
            cmd.detail(),
            False,
            reason=reason,
            reel_id=self.current_reel_id,
        )
        result = CommandResult(False, reason, cmd.name.value, cmd.request_id, self.ctl.state.value)
        return result, audit

    def _report(
        self,
        out: Outputs,
        writes: tuple[Mapping[str, float | int], Mapping[str, float | int]],
        results: tuple[CommandResult, ...],
        transitions: list[Transition],
        alarms: list[Alarm],
    ) -> CycleReport:
        effects, self._effects = self._effects, []
        metres, self._metres = self._metres, []
        started, self._reel_started = self._reel_started, None
        finished, self._finished = self._finished, None
        stop, self._stop_service = self._stop_service, False
        return CycleReport(
            t_s=self._in.t_s,
            wall_ms=self._in.wall_ms,
            state=self.ctl.state,
            outputs=out,
            acc_writes=MappingProxyType(dict(writes[0])),
            cnv_writes=MappingProxyType(dict(writes[1])),
            results=results,
            transitions=tuple(transitions),
            alarms=tuple(alarms),
            effects=tuple(effects),
            metres=tuple(metres),
            reel_started=started,
            finished_reel=finished,
            stop_service=stop,
            position_m=self.ledger.position_m if self.ledger is not None else None,
            status=self.status(),
            active_alarms=self.active_alarms(),
            alarm_board=self.alarm_board(),
            live=LazyLive(self._live_source()),
        )

    # ------------------------------------------------------------------ what adapters read

    def stamp(self, wall_ms: int) -> None:
        """Before the first cycle: the time the status and live values are stamped with
        (the state "starting" is entered then)."""
        self._in = replace(self._in, wall_ms=wall_ms)
        if self.state_ms is None:
            self.state_ms = wall_ms

    def status(self) -> LineStatus:
        """The line state as `state` reports it; `t_ms` is when the state was entered, so
        an unchanged status compares equal from cycle to cycle."""
        reel = self.ctl.reel
        return LineStatus(
            state=self.ctl.state.value,
            cause=self.state_cause,
            t_ms=self.state_ms if self.state_ms is not None else self._in.wall_ms,
            reel_id=reel.plan.reel_id if reel else None,
            reel_planned_length_m=reel.plan.planned_length_m if reel else None,
            reel_started=reel.started if reel else False,
            recipe_product=self.recipe.product,
            recipe_version=str(self.recipe.version),
            alarms=tuple(sorted(self.ctl.alarms)),
            not_ready_reason=self.ctl.why_not_ready(),
        )

    def active_alarms(self) -> tuple[ActiveAlarm, ...]:
        """The latched alarms the controller holds now, oldest first."""
        alarms = sorted(self.ctl.alarms.values(), key=lambda a: a.t_s)
        now_ms = self._in.wall_ms
        return tuple(
            ActiveAlarm(a.kind, a.message, a.latched, self.alarm_ms.get(a.kind, now_ms))
            for a in alarms
        )

    def alarm_board(self) -> tuple[AlarmView, ...]:
        """The alarm board, oldest first: latched alarms (until reset and acknowledged),
        momentary ones until acknowledged, shelved ones (state `shelved`) until unshelved."""
        return self.board.views()

    def live_values(self) -> dict[str, LiveValue]:
        """The live values, each with its quality and the unix time (ms) it was measured
        at. PLC values carry their reading's quality and the time it arrived; set-points
        and the reel position are the controller's own (GOOD, this cycle). Before the
        first reading every PLC value is COMM_FAIL with no value."""
        return self._live_source().values()

    def _live_source(self) -> _LiveSource:
        """What this cycle's live values are made of (immutable: readings, numbers)."""
        o = self.ctl.outputs
        return _LiveSource(
            self._live_fields,
            (self.last_acc, self.last_cnv),
            self.ledger.position_m if self.ledger is not None else None,
            o.beam_current_sp_ma,
            o.speed_sp_m_min,
            self._in.wall_ms,
        )

    def _emit(self, effect: Effect) -> None:
        self._effects.append(effect)

    def _audit(
        self,
        action: str,
        detail: Mapping[str, Any],
        *,
        accepted: bool,
        reason: str = "",
        actor: str = "operator",
        reel_id: str | None = None,
    ) -> None:
        """One action for the audit trail, under `reel_id` (default: the current reel)."""
        self._emit(
            Audit(
                self._in.wall,
                actor,
                action,
                dict(detail),
                accepted,
                reason=reason,
                reel_id=reel_id if reel_id is not None else self.current_reel_id,
            )
        )

    def _check_plc_restarts(self, t_s: float) -> None:
        """A PLC whose clock jumped has restarted (or had its clock set): its counters
        and holding registers are not what they were. Treated as losing it: latched
        alarm, beam off, line to a stop; an operator reset brings the reel back."""
        for name, clock in (("accelerator", self._acc_clock), ("conveyor", self._cnv_clock)):
            if clock.resets != self._clock_resets[name]:
                self._clock_resets[name] = clock.resets
                kind: AlarmKind = "accelerator_link" if name == "accelerator" else "conveyor_link"
                self.ctl.raise_alarm(t_s, kind, f"{name} PLC restarted (its clock jumped)")

    def _reel_zero(self, acc_r: PlcReading | None, cnv_r: PlcReading | None, cnv: CnvView) -> None:
        """A new reel is starting: cable coordinate 0 is the cable at the length counter
        now, read while the line stands and before the reel's first RUN goes out
        (process.md, "Positions"), so that the records' metres are the cable's physical
        counter marks. A resumed reel keeps the coordinate it has."""
        reel = self.ctl.reel
        if reel is None or reel.started or self.ledger is not None or self._resume is not None:
            return
        acc_pt = self._acc_point(acc_r, True) if acc_r is not None else None
        cnv_pt = self._cnv_point(cnv_r) if cnv_r is not None else None
        if acc_pt is None or cnv_pt is None or not conveyor_at_standstill(cnv):
            # Not expected (READY needs both PLCs answering and the line standing): the
            # reel then starts its accounting at the first aligned sample once running.
            log.warning("reel %s: no standing length reading at its start", reel.plan.reel_id)
            return
        reel.started = True
        self._start_ledger(
            LedgerSample(
                t_s=cnv_pt.t_s,
                charge_uc=acc_pt.charge_uc,
                length_m=cnv_pt.length_m,
                scan_width_cm=acc_pt.scan_width_cm,
                speed_m_min=cnv_pt.speed_m_min,
            )
        )

    def _track_steady(self, t_s: float, acc: AccView, cnv: CnvView, out: Outputs) -> None:
        steady = (
            self.ctl.state is LineState.RUNNING
            and out.run
            and out.beam_on
            and acc.ok
            and acc.beam_on
            and cnv.ok
            and cnv.at_speed
        )
        if not steady:
            self._steady_since_s = None
            self._held = None
            return
        held = self._held
        if (
            self._steady_since_s is None
            or held is None
            or (held.speed_sp_m_min != out.speed_sp_m_min)
        ):
            self._steady_since_s = t_s
        self._held = Held(
            t_s - self._steady_since_s,
            out.speed_sp_m_min,
            out.beam_current_sp_ma,
            acc.beam_current_ma,
        )

    def _on_first_contact(self, acc: AccView, cnv: CnvView) -> None:
        """Both PLCs answered for the first time since start: latched watchdog trips that
        only our own absence can have caused are reset (configurable)."""
        if self._reset_request:
            return  # --reset-faults: it resets whatever is latched, next cycle
        if self.tuning.reset_watchdog_trips_at_start and watchdog_trips_only(acc, cnv):
            log.warning(
                "PLC watchdog trip latched while linectl was away: resetting it "
                "(control.reset_watchdog_trips_at_start)"
            )
            self._reset_request = True
            self._reset_actor = "controller"
            self._startup_reset = True

    def _acc_point(self, r: PlcReading, energy_ok: bool) -> AccPoint | None:
        if not r.ok:
            return None
        q = r.get("charge_total")
        if q.value is None:
            return None
        width = r.value("scan_width")
        return AccPoint(
            self._acc_clock.sample_time(q.host_time_s, q.plc_clock_ms),
            float(q.value) * self.units.charge_to_uc,
            None if width is None else float(width),
            energy_ok,
        )

    def _cnv_point(self, r: PlcReading) -> CnvPoint | None:
        if not r.ok:
            return None
        length = r.get("length")
        if length.value is None:
            return None
        speed = r.value("speed")
        return CnvPoint(
            self._cnv_clock.sample_time(length.host_time_s, length.plc_clock_ms),
            float(length.value) * self.units.length_to_m,
            None if speed is None else float(speed),
        )

    # ------------------------------------------------------------------ operator requests

    def _operator_requests(self) -> None:
        # A reset acts once both PLCs have answered and the controller has seen what
        # they hold latched: before that there is nothing to reset yet.
        if self._reset_request and self._first_contact and self.ctl.state is not LineState.OFFLINE:
            self._reset_request = False
            actor, self._reset_actor = self._reset_actor, "operator"
            try:
                self._reset(actor)
                self._audit("reset", {}, accepted=True, actor=actor)
            except CommandRefused as exc:
                self._audit("reset", {}, accepted=False, reason=str(exc), actor=actor)
            self._startup_reset = False
        if self._resume_request is not None and self.ctl.state is not LineState.OFFLINE:
            operator, self._resume_request = self._resume_request, None
            plan = self.interrupted_reel()
            if plan is None and not self.exit_when_done:
                # A daemon started with --resume always (the systemd unit, compose) finds
                # nothing to resume on most starts: that is no error.
                log.info("--resume: no unfinished reel in the records: waiting for commands")
            elif plan is None:
                log.error("--resume: no unfinished reel in the records")
                self._audit("resume_reel", {}, accepted=False, reason="no unfinished reel")
                self._stop_service = True
            else:
                self.reel_request = ReelRequest(
                    plan.reel_id, plan.planned_length_m, operator or plan.operator
                )
        req = self.reel_request
        if req is not None and self.ctl.state is LineState.READY:
            self.reel_request = None
            plan = ReelPlan(req.reel_id, req.length_m, req.operator)
            try:
                try:
                    resuming = self._check_reel_id(req.reel_id, req.length_m)  # as start_reel
                except CommandRefused:
                    if self.exit_when_done:
                        self._stop_service = True
                    raise
                self.ctl.request_start(plan)
                if not resuming:
                    self._open_reel(plan)
                self._audit(
                    "start_reel",
                    {"reel_id": req.reel_id, "length_m": req.length_m},
                    accepted=True,
                    actor=req.operator,
                )
            except CommandRefused as exc:
                log.error("reel %s refused: %s", req.reel_id, exc)
                self.reel_refused = f"reel {req.reel_id}: {exc}"
                self._audit(
                    "start_reel",
                    {"reel_id": req.reel_id},
                    accepted=False,
                    reason=str(exc),
                    actor=req.operator,
                )

    # ------------------------------------------------------------------ commands

    def command(self, cmd: Command, recipe: PreparedRecipe | None = None) -> CommandResult:
        """Apply one authorised command now (before the controller steps); audited
        whether accepted or refused. A command unsafe in the current state is refused
        with the controller's reason, and changes nothing."""
        state = self.ctl.state.value
        detail: dict[str, Any] = {}
        try:
            match cmd.name:
                case CommandName.START_REEL:
                    self._cmd_start(cmd, recipe)
                case CommandName.STOP:
                    cause = f"operator stop ({cmd.sender})"
                    self.ctl.request_stop(f"{cause}: {cmd.reason}" if cmd.reason else cause)
                case CommandName.ACK_ALARM:
                    detail["alarms"] = self._cmd_ack(cmd)
                case CommandName.RESET:
                    if self.ctl.state is LineState.OFFLINE:
                        raise CommandRefused("PLC data not available: nothing can be reset now")
                    self._reset(cmd.sender)
                case CommandName.SELECT_RECIPE:
                    self._cmd_select(recipe)
                case CommandName.END_REEL:
                    detail.update(self._cmd_end(cmd))
                case CommandName.SHELVE_ALARM:
                    detail.update(self._cmd_shelve(cmd))
                case CommandName.UNSHELVE_ALARM:
                    detail.update(self._cmd_unshelve(cmd))
                case _:  # every command has its case: mypy says so when one is added
                    assert_never(cmd.name)
        except CommandRefused as exc:
            result, audit = self.refuse(cmd, str(exc), wall=self._in.wall)
            self._emit(audit)
            return result
        log.info("command %s from %s accepted", cmd.name.value, cmd.sender)
        # end_reel has closed its reel by now: its record still gets the command.
        ended = cmd.reel_id if cmd.name is CommandName.END_REEL else None
        self._audit(
            cmd.name.value,
            {**cmd.detail(), **detail},
            accepted=True,
            actor=cmd.sender,
            reel_id=ended,
        )
        return CommandResult(True, "", cmd.name.value, cmd.request_id, state, detail)

    def _reset(self, actor: str) -> None:
        """Reset latched alarms and PLC faults. A reel that a fault stopped comes back:
        once the line is READY it restarts, and the cable under the beam gets its
        remaining passes (the ledger has kept accounting all along)."""
        self.ctl.request_reset()
        reel = self.ctl.reel
        if reel is None or reel.complete or not reel.started:
            return
        # Only a reel that a fault (or the controller's own absence) stopped: one the
        # operator had stopped stays stopped.
        ours = actor == "controller" and self._startup_reset
        if (ours or self._fault_stopped == reel.plan.reel_id) and self.reel_request is None:
            log.info("reset: reel %s resumes once the line is ready", reel.plan.reel_id)
            self._resume_request = "" if actor == "controller" else actor
        self._fault_stopped = None

    def _check_reel_id(self, reel_id: str, length_m: float) -> bool:
        """Whether starting `reel_id` resumes the unfinished reel; CommandRefused when
        the id is taken otherwise (in this run or in the records: an id is used once),
        or when it resumes the unfinished reel with another planned length (the reel
        keeps the length it was opened with: its records and its end depend on it)."""
        reel = self.ctl.reel
        resuming = reel is not None and not reel.complete and reel.plan.reel_id == reel_id
        if not resuming and reel_id in self.opened_reels:
            raise CommandRefused(f"reel {reel_id!r} exists already: a reel id is used once")
        if reel is not None and resuming:
            planned = reel.plan.planned_length_m
            if not math.isclose(length_m, planned, rel_tol=1e-9, abs_tol=1e-6):
                raise CommandRefused(
                    f"reel {reel_id!r} is unfinished with a planned length of {planned:.10g} m, "
                    f"not {length_m:.10g} m: resume it with length {planned:.10g} m "
                    f"(linectl reel start {reel_id} --length {planned:.10g}), or end it "
                    f"(linectl reel end {reel_id} --reason TEXT) and start a new reel"
                )
        return resuming

    def _cmd_start(self, cmd: Command, recipe: PreparedRecipe | None) -> None:
        if cmd.reel_id is None or cmd.length_m is None:  # a Command not from parse_command
            raise CommandRefused("start_reel needs reel_id and length_m")
        resuming = self._check_reel_id(cmd.reel_id, cmd.length_m)
        if self.ctl.state is not LineState.READY:
            # Checked before the recipe changes, so that a refused start changes nothing.
            why = self.ctl.why_not_ready()
            raise CommandRefused(
                f"cannot start in state {self.ctl.state.value}" + (f": {why}" if why else "")
            )
        old = PreparedRecipe(self.recipe_name, self.recipe, self.recipe_sha256)
        if recipe is not None:
            self._cmd_select(recipe)
        plan = ReelPlan(cmd.reel_id, cmd.length_m, cmd.operator or cmd.sender)
        try:
            self.ctl.request_start(plan)
        except CommandRefused:
            if recipe is not None:
                self._use_recipe(old)
            raise
        if not resuming:
            self._open_reel(plan)

    def _cmd_end(self, cmd: Command) -> dict[str, Any]:
        """End the unfinished reel short of its planned length, where its cable stands.

        Without this, a reel whose cable was cut or scrapped would hold the line: no
        other reel starts while one is open. Every metre that has reached the beam and is
        not final yet is recorded unproven (incomplete); the reel is closed with the
        sender and the reason. Taken only with the cable and the beam at rest for
        END_REEL_REST_S, both PLCs answering: a line that still moves (ramping down in
        FAULT, say) would carry more cable under the beam after the reel was closed, and
        the ledger lags the PLCs by a few cycles."""
        reel = self.ctl.reel
        if reel is None:
            raise CommandRefused("no unfinished reel to end")
        reel_id = reel.plan.reel_id
        if reel.complete:
            raise CommandRefused(
                f"reel {reel_id!r} reached its planned length: it closes once the line stops"
            )
        if cmd.reel_id != reel_id:
            raise CommandRefused(f"the unfinished reel is {reel_id!r}, not {cmd.reel_id!r}")
        if not cmd.reason.strip():
            raise CommandRefused("end_reel needs a reason (kept in the reel's record)")
        state = self.ctl.state
        if state in (LineState.STARTING, LineState.RUNNING, LineState.STOPPING):
            raise CommandRefused(f"stop the line first (state {state.value})")
        if state is LineState.OFFLINE:
            raise CommandRefused("PLC data not available: where the cable stands is not known")
        t_s = self._in.t_s
        rest_s = 0.0 if self.at_rest_since_s is None else t_s - self.at_rest_since_s
        if self.at_rest_since_s is None or rest_s < END_REEL_REST_S:
            raise CommandRefused(
                "the cable and the beam must be at rest (conveyor stopped, beam off) for "
                f"{END_REEL_REST_S:g} s first"
                + ("" if self.at_rest_since_s is None else f" (at rest for {rest_s:.1f} s)")
            )
        if reel.started and self.ledger is None:
            raise CommandRefused(
                "no length and charge readings for this reel yet: where its cable stands is "
                "not known"
            )
        records: list[MetreRecord] = []
        if self.ledger is not None:
            records = self.ledger.end_here()
            self._save(records, t_s)
        why = f"ended by {cmd.sender}: {cmd.reason}"
        self._close_reel(why)
        log.warning("reel %s %s; %d metres recorded unproven", reel_id, why, len(records))
        self.opened_reels.add(reel_id)
        if self.reel_request is not None and self.reel_request.reel_id == reel_id:
            self.reel_request = None
        if self.exit_when_done:
            self._stop_service = True
        return {"reel_id": reel_id, "metres_unproven": len(records)}

    def _cmd_select(self, recipe: PreparedRecipe | None) -> None:
        reel = self.ctl.reel
        if reel is not None and not reel.complete:
            raise CommandRefused(
                f"reel {reel.plan.reel_id} is not finished: its recipe cannot change"
            )
        if self.ctl.state in (LineState.STARTING, LineState.RUNNING, LineState.STOPPING):
            raise CommandRefused(f"cannot change the recipe in state {self.ctl.state.value}")
        if recipe is not None:  # None: it is the recipe in use already
            self._use_recipe(recipe)

    def _use_recipe(self, recipe: PreparedRecipe) -> None:
        self.recipe, self.recipe_sha256 = recipe.recipe, recipe.sha256
        self.recipe_name = recipe.name
        self.ctl.recipe = recipe.recipe

    def _cmd_ack(self, cmd: Command) -> list[str]:
        """Acknowledge one alarm kind, or ("*") every unacknowledged alarm the operator's
        list shows: a shelved alarm is acknowledged only by its name (shelving hides it,
        so "all" cannot mean it)."""
        kind = cmd.alarm or "*"
        unacked = self.board.unacked()
        if kind != "*":
            self.board.ack(kind)  # CommandRefused: no unacknowledged alarm of that kind
            self._emit(AckAlarms(kind, cmd.sender, self._in.wall))
            return [kind]
        shelved = sorted(k for k in unacked if self.board.shelf(k) is not None)
        kinds = sorted(k for k in unacked if k not in shelved)
        if not kinds:
            raise CommandRefused(
                "no unacknowledged alarm"
                + (
                    f" but shelved ones ({', '.join(shelved)}): acknowledge a shelved "
                    "alarm by its kind"
                    if shelved
                    else ""
                )
            )
        for k in kinds:
            self.board.ack(k)
        if shelved:
            for k in kinds:
                self._emit(AckAlarms(k, cmd.sender, self._in.wall))
        else:
            self._emit(AckAlarms("*", cmd.sender, self._in.wall))
        return kinds

    def _cmd_shelve(self, cmd: Command) -> dict[str, Any]:
        """Shelve an alarm on the board (ISA-18.2): hidden from the operator's list until
        the wall clock passes now + duration_s. Never from the records, never from the
        interlocks: the line stays in FAULT and a reset is still needed; no acknowledgement."""
        kind, duration_s = cmd.alarm, cmd.duration_s
        if kind is None or kind == "*" or duration_s is None:  # not from parse_command
            raise CommandRefused("shelve_alarm needs alarm (one kind) and duration_s")
        if not 0.0 < duration_s <= MAX_SHELVE_S:  # NaN too
            raise CommandRefused(
                f"duration_s {duration_s:g} is outside 0 < duration_s <= {MAX_SHELVE_S:g}"
            )
        if not cmd.reason.strip():
            raise CommandRefused("shelve_alarm needs a reason (kept in the audit trail)")
        until_ms = self._in.wall_ms + math.ceil(duration_s * 1000.0)
        shelf = self.board.shelve(kind, until_ms, cmd.sender, cmd.reason)
        self._emit(
            ShelveAlarm(
                kind,
                self.board.message(kind),
                self.board.t_ms(kind) or self._in.wall_ms,
                shelf.until_ms,
                shelf.by,
                shelf.reason,
                self._in.wall,
            )
        )
        log.warning(
            "alarm %s shelved by %s until %s: %s",
            kind,
            cmd.sender,
            ms_to_iso(until_ms),
            cmd.reason,
        )
        return {"shelved_until_ms": until_ms, "state": self.board.real_state(kind)}

    def _cmd_unshelve(self, cmd: Command) -> dict[str, Any]:
        kind = cmd.alarm
        if kind is None or kind == "*":  # not from parse_command
            raise CommandRefused("unshelve_alarm needs alarm (one kind)")
        shelf = self.board.unshelve(kind)
        self._emit(UnshelveAlarm(kind, cmd.sender, self._in.wall))
        log.warning("alarm %s unshelved by %s", kind, cmd.sender)
        return {
            "shelved_until_ms": shelf.until_ms,
            "shelved_by": shelf.by,
            "state": self.board.real_state(kind),
        }

    def _expire_shelves(self) -> None:
        """Shelves whose time has come end by themselves (wall clock, this cycle's):
        the alarm shows in its real state again; audited as the controller's."""
        for shelf in self.board.expired(self._in.wall_ms):
            until = ms_to_iso(shelf.until_ms)
            log.warning("alarm %s: shelf expired (until %s, by %s)", shelf.kind, until, shelf.by)
            self._emit(UnshelveAlarm(shelf.kind, "controller", self._in.wall, expired=True))
            self._audit(
                "unshelve_alarm",
                {
                    "alarm": shelf.kind,
                    "expired": True,
                    "why": f"shelf expired at {until}",
                    "shelved_until_ms": shelf.until_ms,
                    "shelved_by": shelf.by,
                    "shelve_reason": shelf.reason,
                    "state": self.board.real_state(shelf.kind),
                },
                accepted=True,
                actor="controller",
            )

    # ------------------------------------------------------------------ events

    def _events(self) -> tuple[list[Transition], list[Alarm]]:
        transitions, alarms = self.ctl.take_events()
        reel_id = self.current_reel_id
        wall, now_ms = self._in.wall, self._in.wall_ms
        for tr in transitions:
            log.info("state %s -> %s: %s", tr.old.value, tr.new.value, tr.cause)
            if (
                reel_id is not None
                and tr.old in (LineState.STARTING, LineState.RUNNING)
                and tr.new in (LineState.FAULT, LineState.OFFLINE)
            ):
                self._fault_stopped = reel_id  # an operator reset brings it back
            elif tr.new is LineState.RUNNING or tr.old is LineState.RUNNING:
                self._fault_stopped = None
            self.state_ms, self.state_cause = now_ms, tr.cause
            detail = {"from": tr.old.value, "to": tr.new.value, "cause": tr.cause}
            self._emit(Audit(wall, "controller", "transition", detail, True, reel_id=reel_id))
        for a in alarms:
            shelf = self.board.shelf(a.kind)
            if shelf is None:
                log.warning("alarm %s: %s", a.kind, a.message)
            else:  # hidden from the operator's list, never from the log or the records
                log.warning(
                    "alarm %s (shelved until %s): %s", a.kind, ms_to_iso(shelf.until_ms), a.message
                )
            self.alarm_ms[a.kind] = now_ms
            self.board.raise_alarm(a.kind, a.message, latched=a.latched, t_ms=now_ms)
            self._emit(RaiseAlarm(a.kind, a.message, wall, reel_id))
        self.board.returned(self.ctl.alarms)
        self._clear_gone_alarms(transitions, wall)
        return transitions, alarms

    def _clear_gone_alarms(self, transitions: list[Transition], wall: str) -> None:
        """Record as cleared the alarms the controller no longer holds (after a reset),
        and the unlatched ones once the line runs again."""
        latched = frozenset(self.ctl.alarms)
        restarted = any(tr.new is LineState.RUNNING for tr in transitions)
        if self._latched - latched or (restarted and not latched):
            self._emit(ClearAlarmsExcept(tuple(sorted(latched)), wall))
        self._latched = latched

    # ------------------------------------------------------------------ dose records

    def _account(self, t_s: float, samples: list[LedgerSample]) -> None:
        reel = self.ctl.reel
        if reel is None:
            return
        if self._close_pending is not None:
            self._close_when_stopped()
            return
        records: list[MetreRecord] = []
        for sample in samples:
            if self._close_pending is not None or self.ctl.reel is not reel:
                # The resume just lost the cable's position: the reel is closed (or
                # closes once the line stands), and no later sample of this batch may
                # start it afresh at a wrong coordinate 0.
                break
            if self.ledger is None:
                if reel.started and sample.length_m is not None and sample.charge_uc is not None:
                    self._start_ledger(sample)
                continue
            records += self.ledger.update(sample)
            if sample.length_m is not None:
                self._last_sample_length_m = sample.length_m
        if self.ledger is not None and self.ledger.events:
            self._ledger_events(reel.plan.reel_id)
        if self.ledger is None:
            return
        done = reel.complete and self.ctl.state in (LineState.IDLE, LineState.READY)
        if done:
            records += self.ledger.finish()
        if records or t_s - self._last_ckpt_t >= CHECKPOINT_PERIOD_S or done:
            self._save(records, t_s)
        if done:
            reel_id = self._close_reel("planned length reached")
            log.info("reel %s complete", reel_id)
            self.finished_reels.append(reel_id)
            self._finished = reel_id
            if self.exit_when_done:
                self._stop_service = True

    def _close_when_stopped(self) -> None:
        """Close the reel _close_pending names once the line it was starting on stands
        (the controller closes no reel on a moving line); no ledger meanwhile."""
        assert self._close_pending is not None
        if self.ctl.state in (LineState.STARTING, LineState.RUNNING, LineState.STOPPING):
            return
        reason, self._close_pending = self._close_pending, None
        self._close_reel(reason)

    def _close_reel(self, reason: str) -> str:
        """Close the current reel: in the controller now, in the store after every record
        emitted before; its ledger and any pending resume go with it. Its id."""
        reel_id = self.ctl.close_reel().reel_id
        self._emit(CloseReel(reel_id, self._in.wall, reason))
        self.ledger = None
        self._resume = None
        return reel_id

    def _ledger_events(self, reel_id: str) -> None:
        """Why an interval was not accounted normally: logged, and kept in the records
        (a skipped sample is routine while a link is down: debug only)."""
        assert self.ledger is not None
        events, self.ledger.events = self.ledger.events, []
        for ev in events:
            if ev.kind == "missing":
                log.debug("reel %s: sample skipped (%s)", reel_id, ev.detail)
                continue
            log.warning("reel %s: dose accounting %s: %s", reel_id, ev.kind, ev.detail)
            detail: dict[str, Any] = {"kind": ev.kind, "detail": ev.detail}
            self._emit(Audit(self._in.wall, "ledger", "interval", detail, True, reel_id=reel_id))

    def _save(self, records: list[MetreRecord], t_s: float) -> None:
        assert self.ledger is not None
        assert self.ctl.reel is not None
        reel_id = self.ctl.reel.plan.reel_id
        wall = self._in.wall
        ckpt: dict[str, Any] = {
            "position_m": self.ledger.position_m,
            "length_counter_m": self._last_sample_length_m,
            "next_metre": self.ledger.next_metre,
            "uncertainty_m": self.ledger.position_uncertainty_m,
            "wall": wall,
        }
        ckpt.update(self._resume_state())
        self._last_ckpt_t = t_s
        self.records_written += len(records)
        batch = tuple(records)
        if batch:
            self._metres.append((reel_id, batch))
        self._emit(AddMetres(reel_id, batch, wall, {LEDGER_STATE: ckpt}))

    def _link_now(self, plc: str) -> float:
        now = self._in.acc_now_s if plc == "accelerator" else self._in.cnv_now_s
        return self._in.t_s if now is None else now

    def _resume_state(self) -> dict[str, Any]:
        """What a restart needs to continue the ledger exactly: its whole state, how old
        its last sample is, and the PLCs' clocks (a PLC that restarted while linectl was
        away shows it there). Empty if the state cannot be taken."""
        assert self.ledger is not None
        last_t_s = self.ledger.last_sample_t_s
        try:
            state = self.ledger.checkpoint()
        except (RuntimeError, ValueError) as exc:
            log.warning("ledger state not checkpointed (a restart will not resume it): %s", exc)
            return {}
        now_s = self._link_now("conveyor")
        return {
            "ledger": state,
            "held": None if self._held is None else self._held.to_json(),
            "wall_ms": self._in.wall_ms,
            "sample_age_s": 0.0 if last_t_s is None else max(0.0, now_s - last_t_s),
            "plc_clocks": {
                "accelerator": _clock_reading(
                    self.last_acc, "charge_total", self._link_now("accelerator")
                ),
                "conveyor": _clock_reading(self.last_cnv, "length", self._link_now("conveyor")),
            },
        }

    def _new_ledger(self) -> DoseLedger:
        assert self.ctl.reel is not None
        return DoseLedger(
            self.cfg.line.geometry,
            self.recipe,
            charge_modulus_uc=self.units.charge_modulus_uc,
            length_modulus_m=self.units.length_modulus_m,
            planned_length_m=self.ctl.reel.plan.planned_length_m,
        )

    def _start_ledger(self, sample: LedgerSample) -> None:
        assert self.ctl.reel is not None
        plan = self.ctl.reel.plan
        self._last_sample_length_m = sample.length_m
        if self._resume is not None:
            self._resume_ledger(sample)
            return
        assert sample.length_m is not None
        self.ledger = self._new_ledger()
        self.ledger.start(sample)
        start = {
            "length_counter_m": sample.length_m,
            "charge_uc": sample.charge_uc,
            "wall": self._in.wall,
        }
        self._emit(SaveState(plan.reel_id, "start", start))
        self._save([], self._in.t_s)  # the first checkpoint: position 0 at L0
        self._reel_started = (plan.reel_id, sample.length_m)
        log.info(
            "reel %s: dose accounting from length counter %.3f m", plan.reel_id, sample.length_m
        )

    def _open_reel(self, plan: ReelPlan) -> None:
        self.opened_reels.add(plan.reel_id)
        self._emit(
            OpenReel(
                reel_id=plan.reel_id,
                line_id=self.line_id,
                recipe=self.recipe,
                recipe_sha256=self.recipe_sha256,
                operator=plan.operator,
                planned_length_m=plan.planned_length_m,
                started_at=self._in.wall,
            )
        )

    def _resume_ledger(self, sample: LedgerSample) -> None:
        """A restarted controller picks up an interrupted reel.

        From its checkpointed ledger when it can (_continue_ledger). Otherwise (no ledger
        state, or a PLC restarted while linectl was away) metres it did not see complete
        (those under the passes when it went down, and those that moved under them while
        it was down) are recorded unproven ("controller down"), and the count continues
        from the first metre that has not reached pass 0 yet; with the conveyor's counter
        restarted too the position is lost and the reel is closed.
        """
        assert self._resume is not None
        assert self.ctl.reel is not None
        resume = self._resume
        ckpt = resume.ckpt
        match self._continue_ledger(resume, sample):
            case "wait":
                return  # an incomplete sample: the next one resumes
            case "done":
                self._resume = None
                return
            case _:
                pass
        self._resume = None
        reel_id = self.ctl.reel.plan.reel_id
        planned = self.ctl.reel.plan.planned_length_m
        geom = self.cfg.line.geometry
        wall = self._in.wall
        position: float | None = None
        if ckpt.get("length_counter_m") is not None and sample.length_m is not None:
            moved = (sample.length_m - float(ckpt["length_counter_m"])) % (
                self.units.length_modulus_m
            )
            # Plausible only if no faster than the conveyor could have run while we were
            # down; the wall clock bounds the downtime (with a minute's slack for clock
            # error). Beyond it the counter was reset meanwhile: the position is lost.
            if moved <= _max_travel_m(ckpt.get("wall_ms"), self._in.wall_ms) and not (
                resume.position_lost
            ):
                position = float(ckpt["position_m"]) + moved
        first = int(ckpt.get("next_metre", 0))
        if position is None:
            last = max(first, math.ceil(planned) - 1)
            log.error("reel %s: cable position lost across the restart; closing it", reel_id)
            self._emit(MarkUnproven(reel_id, first, last, "position lost", wall))
            # The resume was taken as a start (STARTING): stop that start, then close.
            self._close_pending = "position lost on restart"
            with contextlib.suppress(CommandRefused):
                self.ctl.request_stop("cable position lost across the restart")
            self._close_when_stopped()
            return
        # Every metre that had reached pass 0 (partly irradiated while we were away).
        upto = min(math.ceil(position - geom.first_pass_offset_m), math.ceil(planned)) - 1
        if upto >= first:
            log.warning("reel %s: metres %d..%d unproven (controller down)", reel_id, first, upto)
            self._emit(MarkUnproven(reel_id, first, upto, "controller down", wall))
        self.ledger = self._new_ledger()
        self.ledger.start(
            sample,
            position_m=position,
            next_metre=max(first, upto + 1),
            uncertainty_m=float(ckpt.get("uncertainty_m", 0.0)),
        )
        self._save([], self._in.t_s)

    def _continue_ledger(self, resume: _Resume, sample: LedgerSample) -> str:
        """Take up the checkpointed ledger where it stopped: "done"; "wait" for a sample
        it can resume on; "fallback" when it cannot be trusted to continue (no state, a
        changed geometry or recipe, a PLC that restarted while linectl was away: its
        counters are not continuous), and the metres that reached the beam are marked.

        The interval since the checkpoint is a gap the PLCs' totalizers bound: a cable
        that stood with the beam off (a planned restart) loses nothing; after a kill,
        only metres whose bounds can cross a limit are unproven.
        """
        assert self.ctl.reel is not None
        reel_id = self.ctl.reel.plan.reel_id
        ckpt = resume.ckpt
        if "ledger" not in ckpt:
            return "fallback"
        elapsed_s = self._elapsed_since(resume)
        if elapsed_s is None:
            return "fallback"
        try:
            ledger = DoseLedger.restore(
                self.cfg.line.geometry,
                self.recipe,
                ckpt["ledger"],
                charge_modulus_uc=self.units.charge_modulus_uc,
                length_modulus_m=self.units.length_modulus_m,
                planned_length_m=self.ctl.reel.plan.planned_length_m,
            )
        except ValueError as exc:
            log.error("reel %s: checkpointed ledger not usable: %s", reel_id, exc)
            return "fallback"
        bound = held_gap_bound(
            Held.from_json(ckpt.get("held")),
            float(ckpt.get("sample_age_s", 0.0)),
            self._first_values.get("accelerator"),
            self._first_values.get("conveyor"),
            acc_bits=_bit_names(self.cfg.accelerator_map),
            cnv_bits=_bit_names(self.cfg.conveyor_map),
            current_max_ma=self.recipe.beam_current_max_ma,
            timing=LinkTiming(
                self.cfg.line.cycle_period_s,
                self.cfg.line.conveyor.stale_after_s,
                self.cfg.line.conveyor.timeout_s,
                self.cfg.line.stall_credit_s,
            ),
        )
        if isinstance(bound, str):
            charge_per_m_uc = None
            log.info("reel %s: the gap is bounded by the counters alone: %s", reel_id, bound)
        else:
            charge_per_m_uc = bound.charge_per_m_uc
            log.info(
                "reel %s: the PLCs held their set-points while linectl was away: at most "
                "%.1f mA at %.1f m/min or faster while the beam was on",
                reel_id,
                bound.i_hi_ma,
                bound.v_low_m_min,
            )
        try:
            records = ledger.resume_with(
                sample, elapsed_s=elapsed_s, charge_per_m_uc=charge_per_m_uc
            )
        except ValueError as exc:
            log.info("reel %s: waiting for a complete sample to resume on (%s)", reel_id, exc)
            return "wait"
        self.ledger = ledger
        log.warning(
            "reel %s resumed from its checkpoint: %.1f s since its last sample, at metre %d",
            reel_id,
            elapsed_s,
            ledger.next_metre,
        )
        if ledger.events:
            self._ledger_events(reel_id)
        self._save(records, self._in.t_s)
        return "done"

    def _elapsed_since(self, resume: _Resume) -> float | None:
        """Time from the checkpoint's last ledger sample to now, at least: by the wall
        clock, checked against both PLCs' clocks. None when a PLC's clock does not agree
        (it restarted, or the clocks cannot tell) or the stamps are unusable."""
        ckpt = resume.ckpt
        try:
            wall_s = (self._in.wall_ms - int(ckpt["wall_ms"])) / 1000.0
            sample_age_s = float(ckpt["sample_age_s"])
            clocks = ckpt["plc_clocks"]
            checks = (
                ("accelerator", self.last_acc, "charge_total", self.cfg.accelerator_map),
                ("conveyor", self.last_cnv, "length", self.cfg.conveyor_map),
            )
            for name, reading, fld, rmap in checks:
                modulus_ms = plc_clock_modulus_ms(rmap)
                before = clocks[name]
                now = _clock_reading(reading, fld, self._link_now(name))
                if before is None or now is None:
                    log.error("%s PLC clock unread: cannot tell whether it restarted", name)
                    return None
                # Both readings' ages taken out: the wall time between them.
                between_s = wall_s + float(before[1]) - float(now[1])
                plc_s = ((int(now[0]) - int(before[0])) % modulus_ms) / 1000.0
                if between_s * 1000.0 >= modulus_ms or not math.isclose(
                    plc_s, between_s, abs_tol=RESUME_CLOCK_TOL_S + 0.01 * abs(between_s)
                ):
                    log.error(
                        "%s PLC clock moved %.1f s while the wall clock moved %.1f s: it "
                        "restarted (or a clock was set) while linectl was away",
                        name,
                        plc_s,
                        between_s,
                    )
                    if name == "conveyor":
                        # Its length counter restarted too: how far the cable moved
                        # while nobody watched is unknown.
                        resume.position_lost = True
                    return None
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            log.error("checkpoint without usable resume stamps: %s", exc)
            return None
        # An upper bound, as resume_with() wants: the sample is no older than now.
        return max(wall_s, 0.0) + sample_age_s + RESUME_CLOCK_TOL_S


@dataclass(frozen=True, slots=True)
class _LiveSource:
    """A cycle's live values, unmade: made only when an adapter reads them (MQTT and the
    HMI at a few Hz), not every cycle at 100 Hz."""

    fields: tuple[tuple[int, str, str, float], ...]
    readings: tuple[PlcReading | None, PlcReading | None]
    position_m: float | None
    beam_current_sp_ma: float
    speed_sp_m_min: float
    now_ms: int

    def values(self) -> dict[str, LiveValue]:
        now_ms = self.now_ms
        out: dict[str, LiveValue] = {}
        readings = self.readings
        for which, fld, name, scale in self.fields:
            r = readings[which]
            if r is None:
                out[name] = LiveValue(name, None, Quality.COMM_FAIL, now_ms)
                continue
            try:
                sample = r.get(fld)
            except (LocalError, KeyError):  # a map without this field: nothing to report
                continue
            age_ms = round((r.host_time_s - sample.host_time_s) * 1000.0)
            value = None if sample.value is None else float(sample.value) * scale
            out[name] = LiveValue(name, value, sample.quality, now_ms - max(0, age_ms))
        out["reel_position_m"] = LiveValue("reel_position_m", self.position_m, Quality.GOOD, now_ms)
        for name, value in (
            ("beam_current_sp_ma", self.beam_current_sp_ma),
            ("speed_sp_m_min", self.speed_sp_m_min),
        ):
            out[name] = LiveValue(name, value, Quality.GOOD, now_ms)
        return out


class LazyLive(Mapping[str, LiveValue]):
    """A read-only mapping of a cycle's live values, made on first read."""

    __slots__ = ("_source", "_values")

    def __init__(self, source: _LiveSource) -> None:
        self._source = source
        self._values: dict[str, LiveValue] | None = None

    def _made(self) -> dict[str, LiveValue]:
        if self._values is None:
            self._values = self._source.values()
        return self._values

    def __getitem__(self, name: str) -> LiveValue:
        return self._made()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._made())

    def __len__(self) -> int:
        return len(self._made())


def reading_values(r: PlcReading) -> dict[str, float | int | None]:
    """Every field of a reading, by name (what the views decode)."""
    return {name: r.value(name) for name in r}


def _bit_names(rmap: RegisterMap) -> dict[str, Mapping[str, int]]:
    """The bit names of the map's `command` and `status` fields."""
    return {name: rmap.field(name).bits for name in ("command", "status")}


def _clock_reading(r: PlcReading | None, fld: str, now_s: float) -> tuple[int, float] | None:
    """The PLC clock (ms) of the reading's counter field and its age at `now_s`."""
    if r is None:
        return None
    q = r.get(fld)
    if q.plc_clock_ms is None:
        return None
    return (int(q.plc_clock_ms), max(0.0, now_s - q.host_time_s))


def _max_travel_m(since_wall_ms: object, now_wall_ms: int) -> float:
    """How far the cable can have moved between two wall-clock stamps, generously."""
    try:
        down_s = (now_wall_ms - int(str(since_wall_ms))) / 1000.0
    except (TypeError, ValueError):
        down_s = 3600.0  # no usable stamp: an hour's travel
    return MAX_LINE_SPEED_M_MIN / 60.0 * (max(0.0, down_s) + 60.0)


__all__ = [
    "LEDGER_STATE",
    "AckAlarms",
    "AddMetres",
    "AlarmBoard",
    "Audit",
    "ClearAlarmsExcept",
    "CloseReel",
    "CycleInput",
    "CycleReport",
    "Effect",
    "Line",
    "MarkUnproven",
    "OpenReel",
    "PlcReading",
    "PreparedRecipe",
    "RaiseAlarm",
    "ReelRequest",
    "SaveState",
    "ShelveAlarm",
    "UnshelveAlarm",
    "reading_values",
]
