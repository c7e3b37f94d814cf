"""The line service: wires the PLC links, the pure controller and ledger, and the store.

One task runs the control cycle at the configured period: poll both PLCs at once, step
the controller, write both PLCs at once, account the dose. The record store runs on one
worker thread, so a commit (an fsync) never holds up a cycle, and runs its jobs in
order. On cancellation or an exception the service commands the safe state (beam off,
line stopped) before it returns; if the process is killed, the PLCs' watchdogs do it.

Process protection only: linectl never replaces the personnel-safety system.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from linectl.commands import Command, CommandName, CommandResult, authorize
from linectl.config import ControlTuning, LoadedConfig, PlcEndpoint, Recipe
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
from linectl.core.ledger import DoseLedger, LedgerSample, MetreRecord
from linectl.core.views import (
    CounterUnits,
    acc_view,
    acc_writes,
    cnv_view,
    cnv_writes,
    plc_clock_modulus_ms,
)
from linectl.errors import LinectlError, LocalError, PlcError
from linectl.modbus.link import PlcLink, Snapshot
from linectl.quality import Quality
from linectl.store import RecordStore, ReelInfo, utc_now_iso
from linectl.telemetry import ActiveAlarm, LineStatus, LiveValue

log = logging.getLogger("linectl.service")

LEDGER_STATE = "ledger"

COMMAND_TIMEOUT_S = 2.0
"""A command the control cycle has not taken within this is refused (not running)."""
END_REEL_REST_S = 1.0
"""How long the cable and the beam must have been at rest before end_reel is taken:
far longer than the ledger lags the PLCs (the aligner holds a sample a few cycles)."""


def unix_ms() -> int:
    """Wall-clock time now, unix milliseconds (telemetry timestamps)."""
    return time.time_ns() // 1_000_000


@dataclass
class _Pending:
    """A command waiting for the control cycle, with what execute() prepared for it."""

    cmd: Command
    future: asyncio.Future[CommandResult]
    recipe: tuple[Recipe, Path] | None = None


@dataclass(frozen=True, slots=True)
class ReelRequest:
    """A reel to run, as the operator gave it."""

    reel_id: str
    length_m: float
    operator: str = ""


@dataclass
class CycleStats:
    """Timing of the control cycle (for logs, metrics and benchmarks)."""

    cycles: int = 0
    missed: int = 0  # cycles skipped because one overran by more than a period
    duration_s: list[float] = field(default_factory=list)
    lateness_s: list[float] = field(default_factory=list)
    keep: int = 4096

    def record(self, duration_s: float, lateness_s: float) -> None:
        """Count one cycle; keep the last `keep` timings."""
        self.cycles += 1
        for xs, x in ((self.duration_s, duration_s), (self.lateness_s, lateness_s)):
            xs.append(x)
            if len(xs) > self.keep:
                del xs[: len(xs) - self.keep]


def recipe_hash(recipe: Recipe, path: Path) -> str:
    """sha256 of the bytes the recipe was validated from (config.load_recipe keeps it),
    so that records name exactly what was validated; a recipe built in code has no such
    bytes, and its file is read (never on the control cycle: _use_recipe)."""
    if recipe.source_sha256 is not None:
        return recipe.source_sha256
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fresh(link: PlcLink, snap: Snapshot | None) -> bool:
    """Whether a PLC's data may be used for control this cycle.

    Judged by the data's age, not by the connection: a connection closed and made again
    within the PLC's stale window (a closed socket, a lost or half answer, an exception
    burst) changes nothing. The PLC is unknown once its data is older than
    `stale_after_s`, or at once when a connection cannot be made again (refused, or
    timed out)."""
    if snap is None or link.unreachable:
        return False
    return snap.age_s(link.now()) < link.endpoint.stale_after_s


def _values(snap: Snapshot) -> dict[str, float | int | None]:
    return {name: snap.value(name) for name in snap}


class LineService:
    """One line's daemon. `run()` returns when asked to stop or when the reel is done."""

    def __init__(
        self,
        cfg: LoadedConfig,
        recipe: Recipe,
        recipe_path: Path,
        *,
        store_path: Path | None = None,
        acc_endpoint: PlcEndpoint | None = None,
        cnv_endpoint: PlcEndpoint | None = None,
        tuning: ControlTuning | None = None,
        links: tuple[PlcLink, PlcLink] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], str] = utc_now_iso,
        wall_ms: Callable[[], int] = unix_ms,
    ) -> None:
        self.cfg = cfg
        self.line_id = cfg.line.line_id
        self.recipe = recipe
        self.recipe_path = recipe_path
        self._recipe_sha256 = recipe_hash(recipe, recipe_path)
        self.clock = clock
        self.wall = wall
        self.wall_ms = wall_ms
        self.tuning = tuning or cfg.line.control
        self.store_path = store_path or cfg.resolve(cfg.line.records.path)
        if links is None:
            links = (
                PlcLink("accelerator", acc_endpoint or cfg.line.accelerator, cfg.accelerator_map),
                PlcLink("conveyor", cnv_endpoint or cfg.line.conveyor, cfg.conveyor_map),
            )
        self.acc, self.cnv = links
        self.units = CounterUnits.from_maps(cfg.accelerator_map, cfg.conveyor_map)
        self._acc_clock = PlcClock(plc_clock_modulus_ms(cfg.accelerator_map))
        self._cnv_clock = PlcClock(plc_clock_modulus_ms(cfg.conveyor_map))
        self.aligner = CounterAligner(self.units.charge_modulus_uc)
        self.ctl = Controller(recipe, cfg.line.geometry, self.tuning)
        self.ledger: DoseLedger | None = None
        self.stats = CycleStats()
        self.records_written = 0
        self.metrics_url: str | None = None
        """Where the Prometheus endpoint serves, once the daemon started it."""
        self.last_acc: Snapshot | None = None
        self.last_cnv: Snapshot | None = None
        self.finished_reels: list[str] = []
        self._store: RecordStore | None = None
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linectl-store")
        self._pending: list[Future[Any]] = []
        self._reel_request: ReelRequest | None = None
        self._resume_request: str | None = None  # the operator who asked to resume
        self._resume: dict[str, Any] | None = None  # an interrupted reel found at start
        self._resume_position_lost = False  # the conveyor restarted while we were away
        self._close_pending: str | None = None  # close the reel once the line stands
        self._reset_request = False
        self._reset_actor = "operator"
        self._startup_reset = False  # the start-up reset of watchdog trips is pending
        self._fault_stopped: str | None = None  # the reel a fault stopped while it ran
        self._store_error: str | None = None
        self._stop = asyncio.Event()
        self._exit_when_done = False
        self._acc_seq = self._cnv_seq = -1  # the snapshots the ledger has had
        self._clock_resets = {"accelerator": 0, "conveyor": 0}
        self._first_contact = False  # both PLCs have answered once since start
        self._last_ckpt_t = -math.inf
        self._last_sample_length_m: float | None = None
        self.observers: list[Callable[[LineService], None]] = []
        """Called after every cycle (live views, tests)."""
        self.on_reel_start: list[Callable[[str, float], None]] = []
        """Called with (reel id, length-counter reading in m) when dose accounting starts."""
        self.on_metres: list[Callable[[str, list[MetreRecord]], None]] = []
        """Called with (reel id, final metres) as metres are recorded (metrics, telemetry)."""
        self.on_transition: list[Callable[[Transition], None]] = []
        """Called on every line-state transition."""
        self.on_alarm: list[Callable[[Alarm], None]] = []
        """Called on every alarm raised."""
        self._commands: list[_Pending] = []
        self._running = False
        self._cycle_ms = 0  # unix ms at the start of the current cycle
        self._state_ms = wall_ms()
        self._state_cause = "starting"
        self._alarm_ms: dict[str, int] = {}
        self._unacked: dict[str, int] = {}  # alarm kind -> unacknowledged occurrences
        self._opened_reels: set[str] = set()
        self.reel_refused: str | None = None  # why request_reel's reel did not start
        # Since when the cable and the beam have been seen at rest (conveyor stopped,
        # beam off, both PLCs answering): end_reel needs the ledger caught up with it.
        self._at_rest_since_s: float | None = None
        self._cycle_t_s = 0.0
        self._latched: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ operator API

    def request_reel(self, reel: ReelRequest) -> None:
        """Run this reel as soon as the line is READY."""
        self._reel_request = reel

    def interrupted_reel(self) -> ReelPlan | None:
        """The reel found open in the records at start (resume it with request_reel)."""
        reel = self.ctl.reel
        return reel.plan if reel is not None and not reel.complete else None

    def request_resume(self, operator: str = "") -> None:
        """Resume the interrupted reel found in the records, once the line is READY."""
        self._resume_request = operator

    def request_reset(self) -> None:
        """Reset latched alarms and PLC faults on the next cycle."""
        self._reset_request = True

    def stop(self) -> None:
        """Ask the service to stop the line safely and return from run()."""
        self._stop.set()

    # ------------------------------------------------------------------ telemetry, commands

    def live_values(self) -> dict[str, LiveValue]:
        """The current live values (telemetry.LIVE_VALUES), each with its quality and the
        unix time (ms) it was measured at.

        PLC values carry the link's quality and the time their response arrived;
        set-points and the reel position are the controller's own (GOOD, this cycle).
        Before the first poll every PLC value is COMM_FAIL with no value.
        """
        now_ms = self._cycle_ms or self.wall_ms()
        out: dict[str, LiveValue] = {}

        def plc(snap: Snapshot | None, field: str, name: str, scale: float = 1.0) -> None:
            if snap is None:
                out[name] = LiveValue(name, None, Quality.COMM_FAIL, now_ms)
                return
            try:
                sample = snap.get(field)
            except LocalError:  # a map without this field: nothing to report
                return
            age_ms = round((snap.host_time_s - sample.host_time_s) * 1000.0)
            value = None if sample.value is None else float(sample.value) * scale
            out[name] = LiveValue(name, value, sample.quality, now_ms - max(0, age_ms))

        acc, cnv = self.last_acc, self.last_cnv
        plc(acc, "beam_current", "beam_current_ma")
        plc(acc, "energy", "energy_mev")
        plc(acc, "scan_width", "scan_width_cm")
        plc(acc, "vacuum", "vacuum_pa")
        plc(cnv, "speed", "speed_m_min")
        plc(cnv, "tension", "tension_n")
        plc(cnv, "length", "length_counter_m", self.units.length_to_m)
        position = self.ledger.position_m if self.ledger is not None else None
        out["reel_position_m"] = LiveValue("reel_position_m", position, Quality.GOOD, now_ms)
        o = self.ctl.outputs
        out["beam_current_sp_ma"] = LiveValue(
            "beam_current_sp_ma", o.beam_current_sp_ma, Quality.GOOD, now_ms
        )
        out["speed_sp_m_min"] = LiveValue("speed_sp_m_min", o.speed_sp_m_min, Quality.GOOD, now_ms)
        return out

    def line_status(self) -> LineStatus:
        """The line state as `state` reports it; `t_ms` is when the state was entered, so
        an unchanged status compares equal from cycle to cycle."""
        reel = self.ctl.reel
        return LineStatus(
            state=self.ctl.state.value,
            cause=self._state_cause,
            t_ms=self._state_ms,
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
        return tuple(
            ActiveAlarm(a.kind, a.message, a.latched, self._alarm_ms.get(a.kind, self._cycle_ms))
            for a in alarms
        )

    async def execute(self, cmd: Command, *, timeout_s: float = COMMAND_TIMEOUT_S) -> CommandResult:
        """Authorize, then apply `cmd` on the control cycle; audited whether accepted or
        not. A command unsafe in the current state is refused with the controller's
        reason. Refused with "controller not running" if no cycle takes it in time."""
        why = authorize(cmd.sender, cmd, self.cfg.line.mqtt)
        if why:
            return self._refuse(cmd, why)
        if not self._running:
            return self._refuse(cmd, "controller not running")
        pending = _Pending(cmd, asyncio.get_running_loop().create_future())
        try:
            pending.recipe = await self._prepare(cmd)
        except LocalError as exc:
            return self._refuse(cmd, str(exc))
        self._commands.append(pending)
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(pending.future)
        except TimeoutError:
            if pending.future.done():
                return pending.future.result()
            self._withdraw(pending)
            return self._refuse(cmd, "controller not running")
        except asyncio.CancelledError:
            # The caller went away (its connection dropped): no one would hear the answer,
            # so the command must not act unanswered either.
            if not pending.future.done():
                self._withdraw(pending)
                self._refuse(cmd, "cancelled before the control cycle took it")
            raise

    def _withdraw(self, pending: _Pending) -> None:
        # A command must never act later than its answer said it did not.
        with contextlib.suppress(ValueError):
            self._commands.remove(pending)
        pending.future.cancel()

    def audit_command_error(
        self, sender: str, command: str, reason: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        """Audit a command that never became a `Command` (it did not parse)."""
        if self._store is None:
            log.warning(
                "command %s from %s refused (%s); not audited: no store", command, sender, reason
            )
            return
        self._audit(
            command or "invalid_command",
            dict(detail or {}),
            accepted=False,
            reason=reason,
            actor=sender,
        )

    def _refuse(self, cmd: Command, reason: str) -> CommandResult:
        log.warning("command %s from %s refused: %s", cmd.name.value, cmd.sender, reason)
        if self._store is not None:
            self._audit(
                cmd.name.value, cmd.detail(), accepted=False, reason=reason, actor=cmd.sender
            )
        else:
            log.warning("command %s not audited: the record store is not open", cmd.name.value)
        return CommandResult(False, reason, cmd.name.value, cmd.request_id, self.ctl.state.value)

    async def _prepare(self, cmd: Command) -> tuple[Recipe, Path] | None:
        """What a command needs from disk, read before it goes to the cycle (which never
        waits on a file): the recipe to select, and whether the reel id is new."""
        if cmd.name is CommandName.START_REEL and cmd.reel_id is not None:
            store = self._store
            reel = self.ctl.reel
            resuming = reel is not None and reel.plan.reel_id == cmd.reel_id
            if store is not None and not resuming:
                # On the writer thread, after every write submitted before it.
                exists = await asyncio.get_running_loop().run_in_executor(
                    self._exec, store.reel_exists, cmd.reel_id
                )
                if exists:
                    raise LocalError(f"reel {cmd.reel_id!r} exists already: a reel id is used once")
        if cmd.recipe is not None and cmd.recipe != self.recipe_path.stem:
            return await asyncio.to_thread(select_recipe, self.cfg, cmd.recipe)
        return None

    def _take_commands(self) -> None:
        """Apply the commands waiting for this cycle, before the controller steps."""
        pending, self._commands = self._commands, []
        for p in pending:
            if p.future.done():  # withdrawn after its timeout
                continue
            p.future.set_result(self._apply(p))

    def _apply(self, p: _Pending) -> CommandResult:
        cmd = p.cmd
        state = self.ctl.state.value
        detail: dict[str, Any] = {}
        try:
            match cmd.name:
                case CommandName.START_REEL:
                    self._cmd_start(cmd, p.recipe)
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
                    self._cmd_select(p.recipe)
                case CommandName.END_REEL:
                    detail.update(self._cmd_end(cmd))
        except CommandRefused as exc:
            return self._refuse(cmd, str(exc))
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
        if (ours or self._fault_stopped == reel.plan.reel_id) and self._reel_request is None:
            log.info("reset: reel %s resumes once the line is ready", reel.plan.reel_id)
            self._resume_request = "" if actor == "controller" else actor
        self._fault_stopped = None

    def _check_reel_id(self, reel_id: str) -> bool:
        """Whether starting `reel_id` resumes the unfinished reel; CommandRefused when
        the id is taken otherwise (in this run or in the records: an id is used once)."""
        reel = self.ctl.reel
        resuming = reel is not None and not reel.complete and reel.plan.reel_id == reel_id
        if not resuming and reel_id in self._opened_reels:
            raise CommandRefused(f"reel {reel_id!r} exists already: a reel id is used once")
        return resuming

    def _cmd_start(self, cmd: Command, recipe: tuple[Recipe, Path] | None) -> None:
        if cmd.reel_id is None or cmd.length_m is None:  # a Command not from parse_command
            raise CommandRefused("start_reel needs reel_id and length_m")
        resuming = self._check_reel_id(cmd.reel_id)
        if self.ctl.state is not LineState.READY:
            # Checked before the recipe changes, so that a refused start changes nothing.
            why = self.ctl.why_not_ready()
            raise CommandRefused(
                f"cannot start in state {self.ctl.state.value}" + (f": {why}" if why else "")
            )
        old = (self.recipe, self.recipe_path)
        if recipe is not None:
            self._cmd_select(recipe)
        plan = ReelPlan(cmd.reel_id, cmd.length_m, cmd.operator or cmd.sender)
        try:
            self.ctl.request_start(plan)
        except CommandRefused:
            if recipe is not None:
                self._use_recipe(*old)
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
        rest_s = 0.0 if self._at_rest_since_s is None else self._cycle_t_s - self._at_rest_since_s
        if self._at_rest_since_s is None or rest_s < END_REEL_REST_S:
            raise CommandRefused(
                "the cable and the beam must be at rest (conveyor stopped, beam off) for "
                f"{END_REEL_REST_S:g} s first"
                + ("" if self._at_rest_since_s is None else f" (at rest for {rest_s:.1f} s)")
            )
        if reel.started and self.ledger is None:
            raise CommandRefused(
                "no length and charge readings for this reel yet: where its cable stands is "
                "not known"
            )
        records: list[MetreRecord] = []
        if self.ledger is not None:
            records = self.ledger.end_here()
            self._save(records, self._cycle_t_s)
        why = f"ended by {cmd.sender}: {cmd.reason}"
        self._close_reel(why)
        log.warning("reel %s %s; %d metres recorded unproven", reel_id, why, len(records))
        self._opened_reels.add(reel_id)
        if self._reel_request is not None and self._reel_request.reel_id == reel_id:
            self._reel_request = None
        if self._exit_when_done:
            self._stop.set()
        return {"reel_id": reel_id, "metres_unproven": len(records)}

    def _cmd_select(self, recipe: tuple[Recipe, Path] | None) -> None:
        reel = self.ctl.reel
        if reel is not None and not reel.complete:
            raise CommandRefused(
                f"reel {reel.plan.reel_id} is not finished: its recipe cannot change"
            )
        if self.ctl.state in (LineState.STARTING, LineState.RUNNING, LineState.STOPPING):
            raise CommandRefused(f"cannot change the recipe in state {self.ctl.state.value}")
        if recipe is not None:  # None: it is the recipe in use already
            self._use_recipe(*recipe)

    def _use_recipe(self, recipe: Recipe, path: Path) -> None:
        self.recipe, self.recipe_path = recipe, path
        self._recipe_sha256 = recipe_hash(recipe, path)
        self.ctl.recipe = recipe

    def _cmd_ack(self, cmd: Command) -> list[str]:
        kind = cmd.alarm or "*"
        kinds = sorted(self._unacked) if kind == "*" else [kind]
        if not kinds:
            raise CommandRefused("no unacknowledged alarm")
        if kind != "*" and kind not in self._unacked:
            raise CommandRefused(f"no unacknowledged alarm {kind!r}")
        for k in kinds:
            self._unacked.pop(k, None)
        wall, by = self.wall(), cmd.sender
        self._submit(lambda s: s.ack_alarms(kind, by, wall))
        return kinds

    # ------------------------------------------------------------------ store jobs

    def _submit(self, fn: Callable[[RecordStore], Any]) -> None:
        store = self._store
        if store is None:  # pragma: no cover - run() opens it first
            raise RuntimeError("store not open")
        fut = self._exec.submit(fn, store)
        self._pending.append(fut)
        if len(self._pending) > 64:
            self._reap()

    def _reap(self) -> None:
        still = []
        for fut in self._pending:
            if not fut.done():
                still.append(fut)
            elif fut.exception() is not None:
                self._store_failed(fut.exception())
        self._pending = still

    def _store_failed(self, exc: BaseException | None) -> None:
        # Cable that cannot be recorded cannot be shown in spec: stop making it.
        log.error("record store write failed: %s", exc)
        if self._store_error is None:
            self._store_error = f"record store write failed: {exc}"

    async def _drain_store(self) -> None:
        pending, self._pending = self._pending, []
        for fut in pending:
            try:
                await asyncio.wrap_future(fut)
            except Exception as exc:  # the rest still drains
                self._store_failed(exc)

    # ------------------------------------------------------------------ run

    async def run(self, *, exit_when_done: bool = False) -> None:
        """Run until stop() (or a finished reel with exit_when_done); always ends safe."""
        self._exit_when_done = exit_when_done
        self._store = await asyncio.get_running_loop().run_in_executor(
            self._exec, RecordStore, self.store_path
        )
        await self._find_interrupted_reel()
        await self._load_unacked_alarms()
        await self.acc.start()
        await self.cnv.start()
        wd_ms = self.cfg.line.watchdog_timeout_ms
        self.acc.start_io(on_connect={"watchdog_timeout": wd_ms})
        self.cnv.start_io(
            on_connect={"watchdog_timeout": wd_ms, "ramp_rate": self.tuning.line_ramp_m_min_s}
        )
        clean = False
        self._running = True
        try:
            await self._loop()
            clean = True
        finally:
            self._running = False
            self._refuse_pending("service stopping")
            await self._shutdown(clean)

    async def _load_unacked_alarms(self) -> None:
        # Alarms left unacknowledged by an earlier run can still be acknowledged.
        assert self._store is not None
        store = self._store
        alarms = await asyncio.get_running_loop().run_in_executor(self._exec, store.active_alarms)
        for a in alarms:
            if a.acknowledged_at is None:
                self._unacked[a.kind] = self._unacked.get(a.kind, 0) + 1

    def _refuse_pending(self, reason: str) -> None:
        pending, self._commands = self._commands, []
        for p in pending:
            if not p.future.done():
                p.future.set_result(self._refuse(p.cmd, reason))

    async def _find_interrupted_reel(self) -> None:
        assert self._store is not None
        store = self._store
        # --reel gets the check _prepare gives start_reel, off the cycle: an id in the
        # records is taken (unless it is the interrupted reel's), and the cycle refuses
        # it before it touches the line.
        req = self._reel_request
        if req is not None and await asyncio.to_thread(store.reel_exists, req.reel_id):
            self._opened_reels.add(req.reel_id)
        reel = await asyncio.to_thread(store.find_open_reel, self.line_id)
        if reel is None:
            return
        ckpt = await asyncio.to_thread(store.load_state, reel.reel_id, LEDGER_STATE)
        recipe = Recipe.model_validate_json(reel.recipe_json)
        # The checkpoint itself holds the ledger's bins (kilobytes): its gist only.
        gist = (
            "none (the reel never started)"
            if ckpt is None
            else ", ".join(
                f"{k} {ckpt[k]}" for k in ("next_metre", "position_m", "wall") if k in ckpt
            )
            + ("" if "ledger" in ckpt else " (no ledger state: an older checkpoint)")
        )
        log.warning(
            "found interrupted reel %s (recipe %s v%s); checkpoint: %s",
            reel.reel_id,
            recipe.product,
            recipe.version,
            gist,
        )
        self.recipe = recipe
        # The recipe in use is the one the reel was started with, so is its hash (the
        # file named at this start may hold something else by now).
        self._recipe_sha256 = reel.recipe_hash
        self.ctl = Controller(recipe, self.cfg.line.geometry, self.tuning)
        self._opened_reels.add(reel.reel_id)  # its id is taken, whatever becomes of it
        # Without a checkpoint the reel never reached its start (no cable was accounted):
        # it starts afresh when resumed.
        self.ctl.restore_reel(
            ReelPlan(reel.reel_id, reel.planned_length_m or 0.0, reel.operator),
            started=ckpt is not None,
        )
        if ckpt is not None:
            self._resume = {"reel": reel, "ckpt": ckpt}

    async def _loop(self) -> None:
        period = self.cfg.line.cycle_period_s
        next_t = self.clock()
        stopping_since: float | None = None
        # Each tick asks both links for a poll and waits for the answers at most half a
        # period: a PLC that answers late is read from its last snapshot, never waited
        # for (its data only ages, and past stale_after_s the PLC is unknown).
        poll_wait_s = 0.5 * period
        while True:
            t0 = self.clock()
            seqs = (self.acc.request_poll(), self.cnv.request_poll())
            await asyncio.gather(
                self.acc.wait_poll(seqs[0], poll_wait_s), self.cnv.wait_poll(seqs[1], poll_wait_s)
            )
            self._cycle()
            now = self.clock()
            self.stats.record(now - t0, max(0.0, t0 - next_t))
            for observer in self.observers:
                observer(self)
            if self._stop.is_set():
                if stopping_since is None:
                    stopping_since = now
                    with contextlib.suppress(CommandRefused):
                        self.ctl.request_stop("service stopping")
                    log.info("stopping: bringing the line to a safe stop")
                quiet = self.ctl.state in (
                    LineState.IDLE,
                    LineState.READY,
                    LineState.FAULT,
                    LineState.OFFLINE,
                )
                if quiet or now - stopping_since > 60.0:
                    return
            next_t += period
            delay = next_t - self.clock()
            if delay < -period:
                missed = int(-delay // period)
                self.stats.missed += missed
                next_t += missed * period
                delay = next_t - self.clock()
            await asyncio.sleep(max(0.0, delay))

    def _cycle(self) -> None:
        """One control cycle on the freshest snapshots; never waits for a PLC."""
        acc_snap, cnv_snap = self.acc.latest, self.cnv.latest
        self.last_acc, self.last_cnv = acc_snap, cnv_snap
        t_s = self.clock()
        self._cycle_ms = self.wall_ms()
        acc_fresh, cnv_fresh = _fresh(self.acc, acc_snap), _fresh(self.cnv, cnv_snap)
        acc_vals = _values(acc_snap) if acc_snap is not None else {}
        cnv_vals = _values(cnv_snap) if cnv_snap is not None else {}
        acc = acc_view(acc_vals, self.cfg.accelerator_map, ok=acc_fresh)
        cnv = cnv_view(cnv_vals, self.cfg.conveyor_map, ok=cnv_fresh)

        # Counter points for the ledger: new snapshots with every value GOOD only, each
        # at the moment its PLC sampled it (the PLC clocks also tell a PLC restart).
        energy_ok = not acc.beam_on or abs(acc.energy_mev - self.recipe.energy_mev) <= (
            self.recipe.energy_tolerance_mev
        )
        acc_pt = cnv_pt = None
        if acc_snap is not None and acc_snap.seq != self._acc_seq:
            self._acc_seq = acc_snap.seq
            acc_pt = self._acc_point(acc_snap, energy_ok)
        if cnv_snap is not None and cnv_snap.seq != self._cnv_seq:
            self._cnv_seq = cnv_snap.seq
            cnv_pt = self._cnv_point(cnv_snap)
        self._check_plc_restarts(t_s)

        self._cycle_t_s = t_s
        if not at_rest(acc, cnv):
            self._at_rest_since_s = None
        elif self._at_rest_since_s is None:
            self._at_rest_since_s = t_s

        self._reap()  # a failed write raises the records alarm below
        if self._store_error is not None:
            self.ctl.raise_alarm(t_s, "records", self._store_error)
            self._store_error = None
        starting = self.ctl.state is LineState.STARTING  # before this cycle's requests
        self._operator_requests()
        self._take_commands()
        position = None
        if self.ledger is not None and self.ledger.position_m is not None:
            # The planned end waits out any position uncertainty, so that every product
            # metre's verdict window has left the last pass before the line stops.
            position = self.ledger.position_m - self.ledger.position_uncertainty_m
        out = self.ctl.step(t_s, acc, cnv, position)
        # Writes go out before any accounting: the links send them at once.
        self.acc.post(acc_writes(out, self.cfg.accelerator_map))
        self.cnv.post(cnv_writes(out, self.cfg.conveyor_map))
        if not starting and self.ctl.state is LineState.STARTING:
            self._reel_zero(acc_snap, cnv_snap, cnv)
        self._events()
        if acc.ok and cnv.ok and not self._first_contact:
            self._first_contact = True
            self._on_first_contact(acc, cnv)

        now_link_s = max(
            (s.host_time_s for s in (acc_snap, cnv_snap) if s is not None), default=t_s
        )
        samples = self.aligner.push(now_link_s, acc_pt, cnv_pt)
        self._account(t_s, samples)

    def _check_plc_restarts(self, t_s: float) -> None:
        """A PLC whose clock jumped has restarted (or had its clock set): its counters
        and holding registers are not what they were. Treated as losing it: latched
        alarm, beam off, line to a stop; an operator reset brings the reel back."""
        for name, clock in (("accelerator", self._acc_clock), ("conveyor", self._cnv_clock)):
            if clock.resets != self._clock_resets[name]:
                self._clock_resets[name] = clock.resets
                kind: AlarmKind = "accelerator_link" if name == "accelerator" else "conveyor_link"
                self.ctl.raise_alarm(t_s, kind, f"{name} PLC restarted (its clock jumped)")

    def _reel_zero(
        self, acc_snap: Snapshot | None, cnv_snap: Snapshot | None, cnv: CnvView
    ) -> None:
        """A new reel is starting: cable coordinate 0 is the cable at the length counter
        now, read while the line stands and before the reel's first RUN goes out
        (process.md, "Positions"), so that the records' metres are the cable's physical
        counter marks. A resumed reel keeps the coordinate it has."""
        reel = self.ctl.reel
        if reel is None or reel.started or self.ledger is not None or self._resume is not None:
            return
        acc_pt = self._acc_point(acc_snap, True) if acc_snap is not None else None
        cnv_pt = self._cnv_point(cnv_snap) if cnv_snap is not None else None
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

    def _acc_point(self, snap: Snapshot, energy_ok: bool) -> AccPoint | None:
        if not snap.ok:
            return None
        q = snap.get("charge_total")
        if q.value is None:
            return None
        width = snap.value("scan_width")
        return AccPoint(
            self._acc_clock.sample_time(q.host_time_s, q.plc_clock_ms),
            float(q.value) * self.units.charge_to_uc,
            None if width is None else float(width),
            energy_ok,
        )

    def _cnv_point(self, snap: Snapshot) -> CnvPoint | None:
        if not snap.ok:
            return None
        length = snap.get("length")
        if length.value is None:
            return None
        speed = snap.value("speed")
        return CnvPoint(
            self._cnv_clock.sample_time(length.host_time_s, length.plc_clock_ms),
            float(length.value) * self.units.length_to_m,
            None if speed is None else float(speed),
        )

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
            if plan is None and not self._exit_when_done:
                # A daemon started with --resume always (the systemd unit, compose) finds
                # nothing to resume on most starts: that is no error.
                log.info("--resume: no unfinished reel in the records: waiting for commands")
            elif plan is None:
                log.error("--resume: no unfinished reel in the records")
                self._audit("resume_reel", {}, accepted=False, reason="no unfinished reel")
                self._stop.set()
            else:
                self._reel_request = ReelRequest(
                    plan.reel_id, plan.planned_length_m, operator or plan.operator
                )
        req = self._reel_request
        if req is not None and self.ctl.state is LineState.READY:
            self._reel_request = None
            plan = ReelPlan(req.reel_id, req.length_m, req.operator)
            try:
                try:
                    resuming = self._check_reel_id(req.reel_id)  # as start_reel is checked
                except CommandRefused:
                    if self._exit_when_done:
                        self._stop.set()
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

    async def _write_now(self, out: Outputs) -> None:
        """Write both PLCs now and wait for it (shutdown only: the I/O tasks are
        stopped by then). A PLC that does not answer costs at most its timeout."""
        jobs = []
        for link, values in (
            (self.acc, acc_writes(out, self.cfg.accelerator_map)),
            (self.cnv, cnv_writes(out, self.cfg.conveyor_map)),
        ):
            if link.connected:
                jobs.append(_write_direct(link, link.with_heartbeat(values)))
        await asyncio.gather(*jobs)

    def _events(self) -> None:
        transitions, alarms = self.ctl.take_events()
        reel_id = self.ctl.reel.plan.reel_id if self.ctl.reel else None
        wall = self.wall()
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
            self._state_ms, self._state_cause = self._cycle_ms, tr.cause
            for on_tr in self.on_transition:
                on_tr(tr)
            detail = {"from": tr.old.value, "to": tr.new.value, "cause": tr.cause}
            self._submit(partial(_audit_transition, wall=wall, detail=detail, reel_id=reel_id))
        for a in alarms:
            log.warning("alarm %s: %s", a.kind, a.message)
            self._alarm_ms[a.kind] = self._cycle_ms
            self._unacked[a.kind] = self._unacked.get(a.kind, 0) + 1
            for on_alarm in self.on_alarm:
                on_alarm(a)
            self._submit(
                partial(_raise_alarm, kind=a.kind, message=a.message, wall=wall, reel_id=reel_id)
            )
        self._clear_gone_alarms(transitions, wall)

    def _clear_gone_alarms(self, transitions: list[Transition], wall: str) -> None:
        """Record as cleared the alarms the controller no longer holds (after a reset),
        and the unlatched ones once the line runs again."""
        latched = frozenset(self.ctl.alarms)
        restarted = any(tr.new is LineState.RUNNING for tr in transitions)
        if self._latched - latched or (restarted and not latched):
            keep = sorted(latched)
            self._submit(lambda s: s.clear_alarms_except(keep, wall))
        self._latched = latched

    def _audit(
        self,
        action: str,
        detail: dict[str, Any],
        *,
        accepted: bool,
        reason: str = "",
        actor: str = "operator",
        reel_id: str | None = None,
    ) -> None:
        """One action for the audit trail, under `reel_id` (default: the current reel)."""
        wall = self.wall()
        if reel_id is None and self.ctl.reel is not None:
            reel_id = self.ctl.reel.plan.reel_id
        self._submit(
            lambda s: s.audit(wall, actor, action, detail, accepted, reason=reason, reel_id=reel_id)
        )

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
        if records or t_s - self._last_ckpt_t >= 1.0 or done:
            self._save(records, t_s)
        if done:
            reel_id = self._close_reel("planned length reached")
            log.info("reel %s complete", reel_id)
            self.finished_reels.append(reel_id)
            if self._exit_when_done:
                self._stop.set()

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
        submitted before; its ledger and any pending resume go with it. Its id."""
        reel_id = self.ctl.close_reel().reel_id
        wall = self.wall()
        self._submit(lambda s: s.close_reel(reel_id, wall, reason))
        self.ledger = None
        self._resume = None
        return reel_id

    def _ledger_events(self, reel_id: str) -> None:
        """Why an interval was not accounted normally: logged, and kept in the records
        (a skipped sample is routine while a link is down: debug only)."""
        assert self.ledger is not None
        events, self.ledger.events = self.ledger.events, []
        wall = self.wall()
        for ev in events:
            if ev.kind == "missing":
                log.debug("reel %s: sample skipped (%s)", reel_id, ev.detail)
                continue
            log.warning("reel %s: dose accounting %s: %s", reel_id, ev.kind, ev.detail)
            detail: dict[str, Any] = {"kind": ev.kind, "detail": ev.detail}
            self._submit(partial(_audit_ledger, wall=wall, detail=detail, reel_id=reel_id))

    def _save(self, records: list[MetreRecord], t_s: float) -> None:
        assert self.ledger is not None
        assert self.ctl.reel is not None
        reel_id = self.ctl.reel.plan.reel_id
        wall = self.wall()
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
        batch = list(records)
        if batch:
            for on_metres in self.on_metres:
                on_metres(reel_id, batch)
        self._submit(lambda s: s.add_metres(reel_id, batch, wall, state={LEDGER_STATE: ckpt}))

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
        now_s = self.cnv.now()
        return {
            "ledger": state,
            "wall_ms": self.wall_ms(),
            "sample_age_s": 0.0 if last_t_s is None else max(0.0, now_s - last_t_s),
            "plc_clocks": {
                link.name: _clock_reading(snap, link.now())
                for link, snap in ((self.acc, self.last_acc), (self.cnv, self.last_cnv))
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

    def _start_ledger(self, sample: Any) -> None:
        assert self.ctl.reel is not None
        plan = self.ctl.reel.plan
        self._last_sample_length_m = sample.length_m
        if self._resume is not None:
            self._resume_ledger(sample)
            return
        self.ledger = self._new_ledger()
        self.ledger.start(sample)
        start = {
            "length_counter_m": sample.length_m,
            "charge_uc": sample.charge_uc,
            "wall": self.wall(),
        }
        reel_id = plan.reel_id
        self._submit(lambda s: s.save_state(reel_id, "start", start))
        self._save([], self.clock())  # the first checkpoint: position 0 at L0
        for hook in self.on_reel_start:
            hook(reel_id, sample.length_m)
        log.info(
            "reel %s: dose accounting from length counter %.3f m", plan.reel_id, sample.length_m
        )

    def _open_reel(self, plan: ReelPlan) -> None:
        self._opened_reels.add(plan.reel_id)
        info = ReelInfo(
            reel_id=plan.reel_id,
            line_id=self.line_id,
            recipe_product=self.recipe.product,
            recipe_version=self.recipe.version,
            recipe_hash=self._recipe_sha256,
            recipe_json=self.recipe.model_dump_json(),
            operator=plan.operator,
            planned_length_m=plan.planned_length_m,
            started_at=self.wall(),
        )
        self._submit(lambda s: s.open_reel(info))

    def _resume_ledger(self, sample: Any) -> None:
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
        ckpt = self._resume["ckpt"]
        match self._continue_ledger(ckpt, sample):
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
        wall = self.wall()
        position: float | None = None
        if ckpt and ckpt.get("length_counter_m") is not None:
            moved = (sample.length_m - float(ckpt["length_counter_m"])) % (
                self.units.length_modulus_m
            )
            # Plausible only if no faster than the conveyor could have run while we were
            # down; the wall clock bounds the downtime (with a minute's slack for clock
            # error). Beyond it the counter was reset meanwhile: the position is lost.
            if moved <= _max_travel_m(ckpt.get("wall"), wall) and not self._resume_position_lost:
                position = float(ckpt["position_m"]) + moved
        first = int(ckpt["next_metre"]) if ckpt else 0
        if position is None:
            last = max(first, math.ceil(planned) - 1)
            log.error("reel %s: cable position lost across the restart; closing it", reel_id)
            self._submit(lambda s: s.mark_unproven(reel_id, first, last, "position lost", wall))
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
            self._submit(lambda s: s.mark_unproven(reel_id, first, upto, "controller down", wall))
        self.ledger = self._new_ledger()
        self.ledger.start(
            sample,
            position_m=position,
            next_metre=max(first, upto + 1),
            uncertainty_m=float(ckpt.get("uncertainty_m", 0.0)) if ckpt else 0.0,
        )
        self._save([], self.clock())

    def _continue_ledger(self, ckpt: Mapping[str, Any] | None, sample: LedgerSample) -> str:
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
        if not ckpt or "ledger" not in ckpt:
            return "fallback"
        elapsed_s = self._elapsed_since(ckpt)
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
        try:
            records = ledger.resume_with(sample, elapsed_s=elapsed_s)
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
        self._save(records, self.clock())
        return "done"

    def _elapsed_since(self, ckpt: Mapping[str, Any]) -> float | None:
        """Time from the checkpoint's last ledger sample to `sample`, at least: by the
        wall clock, checked against both PLCs' clocks. None when a PLC's clock does not
        agree (it restarted, or the clocks cannot tell) or the stamps are unusable."""
        try:
            wall_s = (self.wall_ms() - int(ckpt["wall_ms"])) / 1000.0
            sample_age_s = float(ckpt["sample_age_s"])
            clocks = ckpt["plc_clocks"]
            checks = (
                (self.acc, self.last_acc, plc_clock_modulus_ms(self.cfg.accelerator_map)),
                (self.cnv, self.last_cnv, plc_clock_modulus_ms(self.cfg.conveyor_map)),
            )
            for link, snap, modulus_ms in checks:
                before = clocks[link.name]
                now = _clock_reading(snap, link.now())
                if before is None or now is None:
                    log.error("%s PLC clock unread: cannot tell whether it restarted", link.name)
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
                        link.name,
                        plc_s,
                        between_s,
                    )
                    if link is self.cnv:
                        # Its length counter restarted too: how far the cable moved
                        # while nobody watched is unknown.
                        self._resume_position_lost = True
                    return None
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            log.error("checkpoint without usable resume stamps: %s", exc)
            return None
        # An upper bound, as resume_with() wants: the sample is no older than now.
        return max(wall_s, 0.0) + sample_age_s + RESUME_CLOCK_TOL_S

    # ------------------------------------------------------------------ shutdown

    async def _disarm_watchdogs(self, safe: Outputs) -> None:
        """After a clean stop (beam off, HV off, line stopped) the PLCs' watchdogs have
        nothing left to protect; left armed they would latch a fault half a second after
        we exit, and the next start would need a reset. The next run arms them again
        when it connects. After a failure they stay armed: they are the last line."""
        jobs = []
        if self.acc.connected:
            jobs.append(_disarm(self.acc, acc_writes(safe, self.cfg.accelerator_map)))
        if self.cnv.connected:
            jobs.append(_disarm(self.cnv, cnv_writes(safe, self.cfg.conveyor_map)))
        done = await asyncio.gather(*jobs)
        if jobs and all(done):
            log.info("clean exit: beam and HV off, line stopped, PLC watchdogs disarmed")

    async def _shutdown(self, clean: bool) -> None:
        if not clean:
            log.error("service failed: commanding the safe state")
        safe = Outputs(
            hv_on=False,
            watchdog=(self.ctl.outputs.watchdog + 1) & 0xFFFF,
            energy_sp_mev=self.recipe.energy_mev,
            scan_width_sp_cm=self.recipe.scan_width_cm,
        )
        await self.acc.stop_io()
        await self.cnv.stop_io()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._write_now(safe)
        if clean:
            await self._disarm_watchdogs(safe)
        if self.ledger is not None and self.ctl.reel is not None:
            self._save([], self.clock())  # the checkpoint a restart resumes from
        await self._drain_store()
        await self.acc.close()
        await self.cnv.close()
        store, self._store = self._store, None  # a late command is refused, not audited
        if store is not None:
            await asyncio.get_running_loop().run_in_executor(self._exec, store.close)
        self._exec.shutdown(wait=True)


RESUME_CLOCK_TOL_S = 2.0
"""How far a PLC's clock may disagree with the wall clock across a restart of linectl
(clock drift, sample ages) before it counts as a PLC restart."""


def _clock_reading(snap: Snapshot | None, now_s: float) -> tuple[int, float] | None:
    """The PLC clock (ms) of the snapshot's newest reading and its age at `now_s`."""
    if snap is None:
        return None
    q = snap.get("length" if snap.plc == "conveyor" else "charge_total")
    if q.plc_clock_ms is None:
        return None
    return (int(q.plc_clock_ms), max(0.0, now_s - q.host_time_s))


MAX_LINE_SPEED_M_MIN = 300.0
"""Faster than any cable line in the spec's range (5 to 250 m/min) runs."""


def _max_travel_m(since_wall: object, now_wall: str) -> float:
    """How far the cable can have moved between two wall-clock stamps, generously."""
    try:
        down_s = (
            datetime.fromisoformat(now_wall) - datetime.fromisoformat(str(since_wall))
        ).total_seconds()
    except (TypeError, ValueError):
        down_s = 3600.0  # no usable stamp: an hour's travel
    return MAX_LINE_SPEED_M_MIN / 60.0 * (max(0.0, down_s) + 60.0)


async def _write_direct(link: PlcLink, values: Mapping[str, float]) -> None:
    try:
        await link.write_many(values, verify=False)
    except PlcError as exc:
        log.warning("%s: safe state not written: %s", link.name, exc)


async def _disarm(link: PlcLink, safe: Mapping[str, float]) -> bool:
    try:
        async with asyncio.timeout(1.0):
            # Only once the safe state is written and read back.
            await link.write_many(link.with_heartbeat(safe), verify=True)
            await link.write_many({"watchdog_timeout": 0}, verify=True)
    except (PlcError, TimeoutError) as exc:
        why = str(exc) or "no answer within 1.0 s"
        log.warning("%s: watchdog left armed (%s): it will latch a fault", link.name, why)
        return False
    return True


def _audit_ledger(store: RecordStore, *, wall: str, detail: dict[str, Any], reel_id: str) -> None:
    store.audit(wall, "ledger", "interval", detail, True, reel_id=reel_id)


def _audit_transition(
    store: RecordStore, *, wall: str, detail: dict[str, Any], reel_id: str | None
) -> None:
    store.audit(wall, "controller", "transition", detail, True, reel_id=reel_id)


def _raise_alarm(
    store: RecordStore, *, kind: str, message: str, wall: str, reel_id: str | None
) -> None:
    store.raise_alarm(kind, message, wall, reel_id=reel_id)


def select_recipe(cfg: LoadedConfig, name: str | None) -> tuple[Recipe, Path]:
    """The recipe by name, else the line's default, else the first in recipes_dir."""
    if name is None:
        name = cfg.line.default_recipe
    if name is None:
        found = sorted(cfg.recipes_dir.glob("*.toml"))
        if not found:
            raise LocalError(f"no recipe given and none in {cfg.recipes_dir}")
        name = found[0].stem
    path = cfg.recipe_path(name)
    return cfg.load_recipe(name), path


__all__ = ["LineService", "LinectlError", "ReelRequest", "select_recipe"]
