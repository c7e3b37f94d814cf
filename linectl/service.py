"""The line service: the I/O around the pure line (linectl.core.line).

One task runs the control cycle at the configured period: ask both PLC links for a poll,
wait for their answers at most half a period, hand the freshest readings and the
commands waiting to `Line.cycle()`, post its writes to the links, and give its store
jobs to the record store's worker thread (so a commit, an fsync, never holds up a
cycle; jobs run in order). Adapters (metrics, MQTT, Sparkplug) read `report`, the
cycle's immutable `CycleReport`, and the service's query methods. On cancellation or
an exception the service commands the safe state (beam off, line stopped) before it
returns; if the process is killed, the PLCs' watchdogs do it.

Process protection only: linectl never replaces the personnel-safety system.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from linectl.aio import unix_ms
from linectl.commands import Command, CommandName, CommandResult, authorize_command, bounded
from linectl.config import ControlTuning, LoadedConfig, PlcEndpoint, Recipe
from linectl.core.control import (
    Alarm,
    CommandRefused,
    Controller,
    LineState,
    Outputs,
    ReelPlan,
    Transition,
)
from linectl.core.ledger import DoseLedger, MetreRecord
from linectl.core.line import (
    LEDGER_STATE,
    AckAlarms,
    AddMetres,
    Audit,
    ClearAlarmsExcept,
    CloseReel,
    CycleInput,
    CycleReport,
    Effect,
    Line,
    MarkUnproven,
    OpenReel,
    PreparedRecipe,
    RaiseAlarm,
    ReelRequest,
    SaveState,
    ShelveAlarm,
    UnshelveAlarm,
)
from linectl.core.views import acc_writes, cnv_writes
from linectl.errors import LinectlError, LocalError, PlcError
from linectl.modbus.link import PlcLink, Snapshot, StallLog, wait_polls
from linectl.store import RecordStore, ReelInfo, utc_now_iso
from linectl.telemetry import ActiveAlarm, AlarmView, LineStatus, LiveValue, iso_to_ms

log = logging.getLogger("linectl.service")

COMMAND_TIMEOUT_S = 2.0
"""A command the control cycle has not taken within this is refused (not running)."""
STOP_LOCK_WAIT_S = 2.0
"""After stop(), how long a record write waits for a database another process locks."""


@dataclass
class _Pending:
    """A command waiting for the control cycle, with what execute() prepared for it."""

    cmd: Command
    future: asyncio.Future[CommandResult]
    recipe: PreparedRecipe | None = None


@dataclass
class CycleStats:
    """Timing of the control cycle (for logs, metrics and benchmarks)."""

    cycles: int = 0
    missed: int = 0  # cycles skipped because one overran by more than a period
    stalls: int = 0  # wake-ups a whole period late or more (this process was stalled)
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
    bytes, and its file is read (never on the control cycle)."""
    if recipe.source_sha256 is not None:
        return recipe.source_sha256
    return hashlib.sha256(path.read_bytes()).hexdigest()


def link_fresh(link: PlcLink, snap: Snapshot | None) -> bool:
    """Whether a PLC's data may be used for control this cycle.

    Judged by the data's age, not by the connection: a connection closed and made again
    within the PLC's stale window (a closed socket, a lost or half answer, an exception
    burst) changes nothing. The PLC is unknown once its data is older than
    `stale_after_s`, or at once when a connection cannot be made again (refused, or
    timed out) or the PLC refused a setting written at connect (link.settings_refused).
    The age leaves out the time this process itself was stalled (`StallLog`): the PLC
    is judged by how long it gave no data while linectl could have taken it."""
    if snap is None or link.unreachable or link.settings_refused is not None:
        # (A PLC that refused its watchdog timeout or ramp cannot be run as configured.)
        return False
    return link.live_age_s(snap, link.now()) < link.endpoint.stale_after_s


def restore_alarm_board(line: Line, store: RecordStore, now_ms: int) -> None:
    """The alarm board as an earlier run left it, read from the store at start: alarms
    left unacknowledged are on it (returned to normal: this controller does not hold
    them) until acknowledged; shelves still in force stay in force, and one that expired
    while linectl was down is ended (and audited) by the first cycle."""
    for a in store.active_alarms():
        if a.acknowledged_at is None:
            line.restore_alarm(a.kind, a.message, _ms_or(a.raised_at, now_ms))
    for shelf in store.alarm_shelves():
        line.restore_shelf(
            shelf.kind,
            message=shelf.message,
            raised_ms=shelf.raised_ms,
            until_ms=shelf.until_ms,
            by=shelf.shelved_by,
            reason=shelf.reason,
        )


def apply_effect(store: RecordStore, effect: Effect) -> None:
    """Do one of the line's store jobs (on the store worker)."""
    match effect:
        case OpenReel():
            store.open_reel(
                ReelInfo(
                    reel_id=effect.reel_id,
                    line_id=effect.line_id,
                    recipe_product=effect.recipe.product,
                    recipe_version=effect.recipe.version,
                    recipe_hash=effect.recipe_sha256,
                    recipe_json=effect.recipe.model_dump_json(),
                    operator=effect.operator,
                    planned_length_m=effect.planned_length_m,
                    started_at=effect.started_at,
                )
            )
        case SaveState():
            store.save_state(effect.reel_id, effect.key, effect.state)
        case AddMetres():
            store.add_metres(effect.reel_id, effect.records, effect.wall, state=effect.checkpoint)
        case MarkUnproven():
            store.mark_unproven(
                effect.reel_id, effect.first_metre, effect.last_metre, effect.cause, effect.wall
            )
        case CloseReel():
            store.close_reel(effect.reel_id, effect.wall, effect.reason)
        case Audit():
            store.audit(
                effect.wall,
                effect.actor,
                effect.action,
                effect.detail,
                effect.accepted,
                reason=effect.reason,
                reel_id=effect.reel_id,
            )
        case RaiseAlarm():
            store.raise_alarm(effect.kind, effect.message, effect.wall, reel_id=effect.reel_id)
        case ClearAlarmsExcept():
            store.clear_alarms_except(effect.keep, effect.wall)
        case AckAlarms():
            store.ack_alarms(effect.kind, effect.by, effect.wall)
        case ShelveAlarm():
            store.shelve_alarm(
                effect.kind,
                effect.until_ms,
                effect.by,
                effect.reason,
                effect.wall,
                message=effect.message,
                raised_ms=effect.raised_ms,
            )
        case UnshelveAlarm():
            store.unshelve_alarm(effect.kind, effect.by, effect.wall, expired=effect.expired)


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
        self.clock = clock
        self.wall = wall
        self.wall_ms = wall_ms
        self.tuning = tuning or cfg.line.control
        self.store_path = store_path or cfg.resolve(cfg.line.records.path)
        if links is None:
            links = (
                PlcLink(
                    "accelerator",
                    acc_endpoint or cfg.line.accelerator,
                    cfg.accelerator_map,
                    clock=clock,
                ),
                PlcLink(
                    "conveyor", cnv_endpoint or cfg.line.conveyor, cfg.conveyor_map, clock=clock
                ),
            )
        self.acc, self.cnv = links
        # The cycle notes its own late wake-ups (a stall of this process: one whole cycle
        # late or more); its links judge their data's age without them (StallLog). The
        # spans are on the service's clock and the links compare them with theirs: one
        # clock (the links made here are given it; links passed in must share it).
        self.stalls = StallLog(
            min_stall_s=cfg.line.cycle_period_s,
            max_credit_s=cfg.line.stall_credit_s,
        )
        self.acc.stalls = self.cnv.stalls = self.stalls
        self.line = Line(
            cfg, recipe, recipe_hash(recipe, recipe_path), recipe_path.stem, tuning=self.tuning
        )
        self._recipe_paths = {recipe_path.stem: recipe_path}
        self.report: CycleReport | None = None
        """The last cycle's report (None before the first cycle)."""
        self.stats = CycleStats()
        self.metrics_url: str | None = None
        self.hmi_url: str | None = None
        """Where the HMI server listens (set by the daemon's wiring when [http] is on)."""
        """Where the Prometheus endpoint serves, once the daemon started it."""
        self.last_acc: Snapshot | None = None
        self.last_cnv: Snapshot | None = None
        self._store: RecordStore | None = None
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linectl-store")
        self._pending: list[Future[Any]] = []
        self._store_error: str | None = None
        self._stop = asyncio.Event()
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

    # ------------------------------------------------------------------ the line's state

    @property
    def ctl(self) -> Controller:
        """The line's controller (state, alarms, outputs, reel)."""
        return self.line.ctl

    @property
    def ledger(self) -> DoseLedger | None:
        """The current reel's dose ledger, once accounting started."""
        return self.line.ledger

    @property
    def recipe(self) -> Recipe:
        return self.line.recipe

    @property
    def recipe_path(self) -> Path:
        """The file of the recipe selected (a resumed reel's recipe is its own)."""
        return self._recipe_paths[self.line.recipe_name]

    @property
    def records_written(self) -> int:
        return self.line.records_written

    @property
    def finished_reels(self) -> list[str]:
        return self.line.finished_reels

    @property
    def reel_refused(self) -> str | None:
        """Why request_reel's reel did not start."""
        return self.line.reel_refused

    # ------------------------------------------------------------------ operator API

    def request_reel(self, reel: ReelRequest) -> None:
        """Run this reel as soon as the line is READY."""
        self.line.request_reel(reel)

    def interrupted_reel(self) -> ReelPlan | None:
        """The reel found open in the records at start (resume it with request_reel)."""
        return self.line.interrupted_reel()

    def request_resume(self, operator: str = "") -> None:
        """Resume the interrupted reel found in the records, once the line is READY."""
        self.line.request_resume(operator)

    def request_reset(self) -> None:
        """Reset latched alarms and PLC faults on the next cycle."""
        self.line.request_reset()

    def stop(self) -> None:
        """Ask the service to stop the line safely and return from run(). A record
        database another process keeps locked must not hold the stop up: from now on a
        write waits for it at most STOP_LOCK_WAIT_S (what cannot be written is logged
        as NOT STORED; the reel resumes from its last stored checkpoint)."""
        if self._store is not None:
            self._store.limit_lock_waits(STOP_LOCK_WAIT_S)
        self._stop.set()

    # ------------------------------------------------------------------ telemetry, commands

    def live_values(self) -> dict[str, LiveValue]:
        """The current live values (telemetry.LIVE_VALUES), each with its quality and the
        unix time (ms) it was measured at: the last cycle's report's."""
        report = self.report
        return dict(report.live) if report is not None else self._before_first_cycle().live_values()

    def line_status(self) -> LineStatus:
        """The line state as `state` reports it (the last cycle's report's)."""
        report = self.report
        return report.status if report is not None else self._before_first_cycle().status()

    def active_alarms(self) -> tuple[ActiveAlarm, ...]:
        """The latched alarms the controller holds now, oldest first."""
        report = self.report
        return report.active_alarms if report is not None else ()

    def alarm_board(self) -> tuple[AlarmView, ...]:
        """The alarm board (ISA-18.2 states, shelved alarms included), oldest first: the
        last cycle's report's; before the first cycle, what the records held at start."""
        report = self.report
        return report.alarm_board if report is not None else self.line.alarm_board()

    def _before_first_cycle(self) -> Line:
        # Before the first cycle the line has seen nothing: its status and live values
        # say so (COMM_FAIL), stamped now.
        self.line.stamp(self.wall_ms())
        return self.line

    async def execute(self, cmd: Command, *, timeout_s: float = COMMAND_TIMEOUT_S) -> CommandResult:
        """Authorize, then apply `cmd` on the control cycle; audited whether accepted or
        not. A command unsafe in the current state is refused with the controller's
        reason. Refused with "controller not running" if no cycle takes it in time."""
        why = authorize_command(cmd, self.cfg.line)
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
        self._do(
            Audit(
                self.wall(),
                bounded(sender),
                bounded(command) or "invalid_command",
                dict(detail or {}),
                False,
                reason=reason,
                reel_id=self.line.current_reel_id,
            )
        )

    def audit_refusals(self, summary: Mapping[str, Any]) -> None:
        """Audit the commands refused unread in one window (senders with no role, empty
        topic levels, full queues) as one row on no reel: a flood costs one store write
        per window and never fills a reel's audit trail."""
        if self._store is None:
            log.warning("refused commands not audited (no store): %s", dict(summary))
            return
        self._do(
            Audit(
                self.wall(),
                "(refused senders)",
                "refused_commands",
                dict(summary),
                False,
                reason="refused unread: no role, an empty topic level, or a full queue",
                reel_id=None,
            )
        )

    def _refuse(self, cmd: Command, reason: str) -> CommandResult:
        result, audit = self.line.refuse(cmd, reason, wall=self.wall())
        if self._store is not None:
            self._do(audit)
        else:
            log.warning("command %s not audited: the record store is not open", cmd.name.value)
        return result

    async def _prepare(self, cmd: Command) -> PreparedRecipe | None:
        """What a command needs from disk, read before it goes to the cycle (which never
        waits on a file): the recipe to select (read and hashed), and whether the reel
        id is new."""
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
        name = cmd.recipe
        if name is None or name == self.line.recipe_name:
            return None

        def load() -> tuple[PreparedRecipe, Path]:
            recipe, path = select_recipe(self.cfg, name)
            return PreparedRecipe(path.stem, recipe, recipe_hash(recipe, path)), path

        try:
            prepared, path = await asyncio.to_thread(load)
        except (LocalError, OSError) as exc:
            # The client gets the recipe it asked for and the ones it may choose from,
            # never a path on this host; the daemon's log keeps the full story.
            log.warning("recipe %r for %s: %s", name, cmd.name.value, exc)
            recipes_dir = self.cfg.recipes_dir
            available = await asyncio.to_thread(
                lambda: sorted(p.stem for p in recipes_dir.glob("*.toml") if p.is_file())
            )
            shown = ", ".join(available[:20]) + (
                f" and {len(available) - 20} more" if len(available) > 20 else ""
            )
            listing = f"available: {shown}" if available else "no recipe is available"
            if name not in available:
                raise LocalError(f"no recipe {name!r} on this line ({listing})") from None
            why = str(exc).replace(str(self.cfg.recipe_path(name)), f"{name}.toml")
            why = why.replace(str(recipes_dir), "recipes_dir")
            raise LocalError(f"recipe {name!r} cannot be used: {why} ({listing})") from None
        self._recipe_paths[prepared.name] = path
        return prepared

    # ------------------------------------------------------------------ store jobs

    def _do(self, effect: Effect) -> None:
        self._submit(partial(apply_effect, effect=effect))

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
        self.line.exit_when_done = exit_when_done
        self._store = await asyncio.get_running_loop().run_in_executor(
            self._exec, RecordStore, self.store_path
        )
        await self._find_interrupted_reel()
        await self._load_alarm_board()
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

    async def _load_alarm_board(self) -> None:
        assert self._store is not None
        store, now_ms = self._store, self.wall_ms()
        await asyncio.get_running_loop().run_in_executor(
            self._exec, restore_alarm_board, self.line, store, now_ms
        )

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
        req = self.line.reel_request
        if req is not None and await asyncio.to_thread(store.reel_exists, req.reel_id):
            self.line.opened_reels.add(req.reel_id)
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
        # The recipe in use is the one the reel was started with, so is its hash (the
        # file named at this start may hold something else by now).
        self.line.restore_interrupted(
            ReelPlan(reel.reel_id, reel.planned_length_m or 0.0, reel.operator),
            recipe,
            reel.recipe_hash,
            ckpt,
        )

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
            self._note_stall(next_t, t0)
            # Both polls run meanwhile (each link's own task); the cycle wakes once, when
            # the later one is done or at the deadline.
            polls = ((self.acc, self.acc.request_poll()), (self.cnv, self.cnv.request_poll()))
            await wait_polls(polls, poll_wait_s)
            self._note_stall(t0 + poll_wait_s, self.clock())
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

    def _note_stall(self, due_s: float, woke_s: float) -> None:
        stall_s = self.stalls.note(due_s, woke_s)
        if stall_s:
            self.stats.stalls += 1
            log.warning(
                "this process was stalled %.3f s (the control cycle woke late): the PLCs' "
                "data is judged without it",
                stall_s,
            )

    def _input(self, commands: list[_Pending]) -> CycleInput:
        acc_snap, cnv_snap = self.last_acc, self.last_cnv
        self._reap()  # a failed write raises the records alarm this cycle
        store_error, self._store_error = self._store_error, None
        return CycleInput(
            t_s=self.clock(),
            wall=self.wall(),
            wall_ms=self.wall_ms(),
            acc=acc_snap,
            cnv=cnv_snap,
            acc_fresh=link_fresh(self.acc, acc_snap),
            cnv_fresh=link_fresh(self.cnv, cnv_snap),
            acc_now_s=self.acc.now(),
            cnv_now_s=self.cnv.now(),
            acc_first=self.acc.first_snapshot,
            cnv_first=self.cnv.first_snapshot,
            commands=[(p.cmd, p.recipe) for p in commands],
            store_error=store_error,
        )

    def _cycle(self) -> None:
        """One control cycle on the freshest snapshots; never waits for a PLC."""
        self.last_acc, self.last_cnv = self.acc.latest, self.cnv.latest
        commands = [p for p in self._commands if not p.future.done()]  # not withdrawn
        self._commands = []
        inp = self._input(commands)
        report = self.line.cycle(inp)
        # Writes go out first: the links send them at once.
        self.acc.post(report.acc_writes)
        self.cnv.post(report.cnv_writes)
        self.report = report
        for effect in report.effects:
            self._do(effect)
        for p, result in zip(commands, report.results, strict=True):
            p.future.set_result(result)
        self._publish(report)
        if report.stop_service:
            self._stop.set()

    def _publish(self, report: CycleReport) -> None:
        """The report's events to the hooks (metrics, telemetry, tests)."""
        for tr in report.transitions:
            for on_tr in self.on_transition:
                on_tr(tr)
        for a in report.alarms:
            for on_alarm in self.on_alarm:
                on_alarm(a)
        if report.reel_started is not None:
            for hook in self.on_reel_start:
                hook(*report.reel_started)
        for reel_id, batch in report.metres:
            for on_metres in self.on_metres:
                on_metres(reel_id, list(batch))

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
        # The checkpoint a restart resumes from.
        for effect in self.line.checkpoint(self._input([])).effects:
            self._do(effect)
        await self._drain_store()
        await self.acc.close()
        await self.cnv.close()
        store, self._store = self._store, None  # a late command is refused, not audited
        if store is not None:
            await asyncio.get_running_loop().run_in_executor(self._exec, store.close)
        self._exec.shutdown(wait=True)


def _ms_or(iso: str, default: int) -> int:
    """Unix ms of a stored ISO 8601 time; `default` when it cannot be read."""
    try:
        return iso_to_ms(iso)
    except (TypeError, ValueError):
        return default


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


__all__ = [
    "CycleStats",
    "LineService",
    "LinectlError",
    "ReelRequest",
    "apply_effect",
    "recipe_hash",
    "select_recipe",
]
