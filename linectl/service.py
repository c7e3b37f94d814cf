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
from functools import partial
from pathlib import Path
from typing import Any

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
from linectl.core.views import CounterUnits, acc_view, acc_writes, cnv_view, cnv_writes
from linectl.errors import LinectlError, LocalError, PlcError
from linectl.modbus.link import PlcLink, Snapshot
from linectl.quality import Quality
from linectl.store import RecordStore, ReelInfo, utc_now_iso

log = logging.getLogger("linectl.service")

LEDGER_STATE = "ledger"


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


def recipe_hash(path: Path) -> str:
    """sha256 of the recipe file's bytes: records name exactly what was validated."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fresh(snap: Snapshot) -> bool:
    # STALE values are younger than the endpoint's staleness limit: still usable for
    # control. Past it they turn COMM_FAIL, and the controller treats the PLC as unknown.
    return snap.connected and all(r.quality is not Quality.COMM_FAIL for r in snap.reads)


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
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], str] = utc_now_iso,
    ) -> None:
        self.cfg = cfg
        self.line_id = cfg.line.line_id
        self.recipe = recipe
        self.recipe_path = recipe_path
        self.clock = clock
        self.wall = wall
        self.tuning = tuning or cfg.line.control
        self.store_path = store_path or cfg.resolve(cfg.line.records.path)
        self.acc = PlcLink("accelerator", acc_endpoint or cfg.line.accelerator, cfg.accelerator_map)
        self.cnv = PlcLink("conveyor", cnv_endpoint or cfg.line.conveyor, cfg.conveyor_map)
        self.units = CounterUnits.from_maps(cfg.accelerator_map, cfg.conveyor_map)
        self.ctl = Controller(recipe, cfg.line.geometry, self.tuning)
        self.ledger: DoseLedger | None = None
        self.stats = CycleStats()
        self.records_written = 0
        self.last_acc: Snapshot | None = None
        self.last_cnv: Snapshot | None = None
        self.finished_reels: list[str] = []
        self._store: RecordStore | None = None
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linectl-store")
        self._pending: list[Future[Any]] = []
        self._reel_request: ReelRequest | None = None
        self._resume_request: str | None = None  # the operator who asked to resume
        self._resume: dict[str, Any] | None = None  # an interrupted reel found at start
        self._reset_request = False
        self._stop = asyncio.Event()
        self._exit_when_done = False
        self._connects = {"accelerator": -1, "conveyor": -1}
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
                log.error("record store write failed: %s", fut.exception())
        self._pending = still

    async def _drain_store(self) -> None:
        pending, self._pending = self._pending, []
        for fut in pending:
            try:
                await asyncio.wrap_future(fut)
            except Exception as exc:  # logged; the rest still drains
                log.error("record store write failed: %s", exc)

    # ------------------------------------------------------------------ run

    async def run(self, *, exit_when_done: bool = False) -> None:
        """Run until stop() (or a finished reel with exit_when_done); always ends safe."""
        self._exit_when_done = exit_when_done
        self._store = await asyncio.get_running_loop().run_in_executor(
            self._exec, RecordStore, self.store_path
        )
        await self._find_interrupted_reel()
        await self.acc.start()
        await self.cnv.start()
        clean = False
        try:
            await self._loop()
            clean = True
        finally:
            await self._shutdown(clean)

    async def _find_interrupted_reel(self) -> None:
        assert self._store is not None
        store = self._store
        reel = await asyncio.to_thread(store.find_open_reel, self.line_id)
        if reel is None:
            return
        ckpt = await asyncio.to_thread(store.load_state, reel.reel_id, LEDGER_STATE)
        recipe = Recipe.model_validate_json(reel.recipe_json)
        log.warning(
            "found interrupted reel %s (recipe %s v%s); checkpoint: %s",
            reel.reel_id,
            recipe.product,
            recipe.version,
            ckpt,
        )
        self.recipe = recipe
        self.ctl = Controller(recipe, self.cfg.line.geometry, self.tuning)
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
        while True:
            t0 = self.clock()
            await self._cycle()
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

    async def _cycle(self) -> None:
        acc_snap, cnv_snap = await asyncio.gather(self.acc.poll(), self.cnv.poll())
        self.last_acc, self.last_cnv = acc_snap, cnv_snap
        t_s = self.clock()
        await self._configure_plcs()
        acc_vals, cnv_vals = _values(acc_snap), _values(cnv_snap)
        acc_fresh, cnv_fresh = _fresh(acc_snap), _fresh(cnv_snap)
        acc = acc_view(acc_vals, self.cfg.accelerator_map, ok=acc_fresh)
        cnv = cnv_view(cnv_vals, self.cfg.conveyor_map, ok=cnv_fresh)

        self._operator_requests()
        position = self.ledger.position_m if self.ledger else None
        out = self.ctl.step(t_s, acc, cnv, position)
        await self._write(out, acc_ok=acc.ok, cnv_ok=cnv.ok)
        self._events()

        energy_ok = not acc.beam_on or abs(acc.energy_mev - self.recipe.energy_mev) <= (
            self.recipe.energy_tolerance_mev
        )
        sample = self.units.sample(
            t_s,
            acc_vals,
            cnv_vals,
            acc_ok=acc_snap.ok,  # the ledger takes GOOD values only
            cnv_ok=cnv_snap.ok,
            energy_ok=energy_ok,
        )
        self._account(t_s, sample)

    def _operator_requests(self) -> None:
        # A reset acts once the PLCs answer: before that there is nothing to reset yet.
        if self._reset_request and self.ctl.state is not LineState.OFFLINE:
            self._reset_request = False
            try:
                self.ctl.request_reset()
                self._audit("reset", {}, accepted=True)
            except CommandRefused as exc:
                self._audit("reset", {}, accepted=False, reason=str(exc))
        if self._resume_request is not None and self.ctl.state is not LineState.OFFLINE:
            operator, self._resume_request = self._resume_request, None
            plan = self.interrupted_reel()
            if plan is None:
                log.error("--resume: no unfinished reel in the records")
                self._audit("resume_reel", {}, accepted=False, reason="no unfinished reel")
                if self._exit_when_done:
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
                resuming = self.ctl.reel is not None and self.ctl.reel.plan.reel_id == req.reel_id
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
                self._audit(
                    "start_reel",
                    {"reel_id": req.reel_id},
                    accepted=False,
                    reason=str(exc),
                    actor=req.operator,
                )

    async def _configure_plcs(self) -> None:
        """After every (re)connect: the watchdog timeout and the conveyor's ramp rate
        (a restarted PLC is back at its defaults)."""
        settings: list[tuple[PlcLink, dict[str, float]]] = [
            (self.acc, {"watchdog_timeout": self.cfg.line.watchdog_timeout_ms}),
            (
                self.cnv,
                {
                    "watchdog_timeout": self.cfg.line.watchdog_timeout_ms,
                    "ramp_rate": self.tuning.line_ramp_m_min_s,
                },
            ),
        ]
        for link, values in settings:
            if not link.connected or self._connects[link.name] == link.stats.connects:
                continue
            try:
                await link.write_many(values, verify=True)
                self._connects[link.name] = link.stats.connects
                log.info("%s configured: %s", link.name, values)
            except PlcError as exc:
                log.warning("%s: could not configure (%s); will retry", link.name, exc)

    async def _write(self, out: Outputs, *, acc_ok: bool, cnv_ok: bool) -> None:
        jobs = []
        if self.acc.connected:
            jobs.append(self._write_one(self.acc, acc_writes(out, self.cfg.accelerator_map)))
        if self.cnv.connected:
            jobs.append(self._write_one(self.cnv, cnv_writes(out, self.cfg.conveyor_map)))
        await asyncio.gather(*jobs)

    async def _write_one(self, link: PlcLink, values: Mapping[str, float]) -> None:
        # Not verified here: the holding block is read back on the next poll anyway, and
        # a second request per cycle would halve the link's headroom.
        try:
            await link.write_many(values, verify=False)
        except PlcError as exc:
            log.debug("%s write failed: %s", link.name, exc)  # the link logs state changes

    def _events(self) -> None:
        transitions, alarms = self.ctl.take_events()
        reel_id = self.ctl.reel.plan.reel_id if self.ctl.reel else None
        wall = self.wall()
        for tr in transitions:
            log.info("state %s -> %s: %s", tr.old.value, tr.new.value, tr.cause)
            for on_tr in self.on_transition:
                on_tr(tr)
            detail = {"from": tr.old.value, "to": tr.new.value, "cause": tr.cause}
            self._submit(partial(_audit_transition, wall=wall, detail=detail, reel_id=reel_id))
        for a in alarms:
            log.warning("alarm %s: %s", a.kind, a.message)
            for on_alarm in self.on_alarm:
                on_alarm(a)
            self._submit(
                partial(_raise_alarm, kind=a.kind, message=a.message, wall=wall, reel_id=reel_id)
            )

    def _audit(
        self,
        action: str,
        detail: dict[str, Any],
        *,
        accepted: bool,
        reason: str = "",
        actor: str = "operator",
    ) -> None:
        wall = self.wall()
        reel_id = self.ctl.reel.plan.reel_id if self.ctl.reel else None
        self._submit(
            lambda s: s.audit(wall, actor, action, detail, accepted, reason=reason, reel_id=reel_id)
        )

    # ------------------------------------------------------------------ dose records

    def _account(self, t_s: float, sample: Any) -> None:
        reel = self.ctl.reel
        if reel is None:
            return
        if self.ledger is None:
            if not reel.started or sample.length_m is None or sample.charge_uc is None:
                return
            self._start_ledger(sample)
            return
        records = self.ledger.update(sample)
        if sample.length_m is not None:
            self._last_sample_length_m = sample.length_m
        done = reel.complete and self.ctl.state in (LineState.IDLE, LineState.READY)
        if done:
            records += self.ledger.finish()
        if records or t_s - self._last_ckpt_t >= 1.0 or done:
            self._save(records, t_s)
        if done:
            reel_id = reel.plan.reel_id
            wall = self.wall()
            self._submit(lambda s: s.close_reel(reel_id, wall, "planned length reached"))
            log.info("reel %s complete", reel_id)
            self.ctl.close_reel()
            self.ledger = None
            self.finished_reels.append(reel_id)
            if self._exit_when_done:
                self._stop.set()

    def _save(self, records: list[MetreRecord], t_s: float) -> None:
        assert self.ledger is not None
        assert self.ctl.reel is not None
        reel_id = self.ctl.reel.plan.reel_id
        ckpt = {
            "position_m": self.ledger.position_m,
            "length_counter_m": self._last_sample_length_m,
            "next_metre": self.ledger.next_metre,
            "wall": self.wall(),
        }
        self._last_ckpt_t = t_s
        self.records_written += len(records)
        wall = self.wall()
        batch = list(records)
        if batch:
            for on_metres in self.on_metres:
                on_metres(reel_id, batch)
        self._submit(lambda s: s.add_metres(reel_id, batch, wall, state={LEDGER_STATE: ckpt}))

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
        info = ReelInfo(
            reel_id=plan.reel_id,
            line_id=self.line_id,
            recipe_product=self.recipe.product,
            recipe_version=self.recipe.version,
            recipe_hash=recipe_hash(self.recipe_path),
            recipe_json=self.recipe.model_dump_json(),
            operator=plan.operator,
            planned_length_m=plan.planned_length_m,
            started_at=self.wall(),
        )
        self._submit(lambda s: s.open_reel(info))

    def _resume_ledger(self, sample: Any) -> None:
        """A restarted controller picks up an interrupted reel.

        Metres it did not see complete (those that were under the passes when it went
        down, and those that moved under them while it was down) are recorded unproven;
        the count continues from the first metre that has not reached pass 0 yet.
        """
        assert self._resume is not None
        assert self.ctl.reel is not None
        resume, self._resume = self._resume, None
        reel_id = self.ctl.reel.plan.reel_id
        planned = self.ctl.reel.plan.planned_length_m
        ckpt = resume["ckpt"]
        geom = self.cfg.line.geometry
        wall = self.wall()
        position: float | None = None
        if ckpt and ckpt.get("length_counter_m") is not None:
            moved = (sample.length_m - float(ckpt["length_counter_m"])) % (
                self.units.length_modulus_m
            )
            # Plausible only if no faster than the conveyor could have run; the wall
            # clock bounds the downtime (it may be off; we take its generous side).
            if moved <= 300.0 / 60.0 * 3600.0:
                position = float(ckpt["position_m"]) + moved
        first = int(ckpt["next_metre"]) if ckpt else 0
        if position is None:
            last = max(first, math.ceil(planned) - 1)
            log.error("reel %s: cable position lost across the restart; closing it", reel_id)
            self._submit(lambda s: s.mark_unproven(reel_id, first, last, "position lost", wall))
            self._submit(lambda s: s.close_reel(reel_id, wall, "position lost on restart"))
            self.ctl.close_reel()
            return
        # Every metre that had reached pass 0 (partly irradiated while we were away).
        upto = min(math.ceil(position - geom.first_pass_offset_m), math.ceil(planned)) - 1
        if upto >= first:
            log.warning("reel %s: metres %d..%d unproven (controller down)", reel_id, first, upto)
            self._submit(lambda s: s.mark_unproven(reel_id, first, upto, "controller down", wall))
        self.ledger = self._new_ledger()
        self.ledger.start(sample, position_m=position, next_metre=max(first, upto + 1))
        self._save([], self.clock())

    # ------------------------------------------------------------------ shutdown

    async def _shutdown(self, clean: bool) -> None:
        if not clean:
            log.error("service failed: commanding the safe state")
        safe = Outputs(
            hv_on=self.ctl.outputs.hv_on and clean,
            watchdog=(self.ctl.outputs.watchdog + 1) & 0xFFFF,
            energy_sp_mev=self.recipe.energy_mev,
            scan_width_sp_cm=self.recipe.scan_width_cm,
        )
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._write(safe, acc_ok=True, cnv_ok=True)
        if self.ledger is not None and self.ctl.reel is not None:
            self._save([], self.clock())  # the checkpoint a restart resumes from
        await self._drain_store()
        await self.acc.close()
        await self.cnv.close()
        store = self._store
        if store is not None:
            await asyncio.get_running_loop().run_in_executor(self._exec, store.close)
        self._exec.shutdown(wait=True)


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
