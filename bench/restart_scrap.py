"""Restart scrap: the cable a restart of linectl mid-reel costs, on the reference line.

Runs the real LineService (linectl/service.py) over Modbus TCP against the bundled
simulators, on the shipped configuration (config/: 16 passes 6 m apart, the first 4 m
past the length counter, so 94 m of cable path under the beam; recipe pv-1x6-en50618,
80 m/min at 40 mA), copied into a temporary directory with its records there. The
simulator's true dose coefficient is the recipe's k_dose (what dosimetry gave it). One
reel per mode; once it has run --restart-at-m metres of cable path at full speed, linectl
is restarted mid-reel and the reel finished:

  - planned: linectl is stopped cleanly (what SIGTERM does: LineService.stop(), then its
             run task awaited: the line ramps down, the beam off before the cable stands,
             the checkpoint written), then a new LineService in the same process is
             asked to resume the reel (request_resume(operator)) and runs it to its end;
  - sigkill: `linectl run --reel ...` as a child process, killed with SIGKILL (the PLCs'
             watchdogs cut the beam and stop the line), then
             `linectl run --reset-faults --resume --exit-after-reel` finishes the reel.

The reel is long enough that the whole beam zone at the restart (the cable between the
last pass and pass 0 then) and at least 20 m after it have left the last pass after the
restart. Every recorded metre is compared with the simulator's ground truth:
  - not in spec: metres recorded with any verdict but in_spec, plus metres not recorded
    at all (the scrap the restart costs), by verdict, by cause, by (verdict, causes);
  - false accepts: a metre recorded in_spec whose true dose is outside the recipe's
    [min_dose_kgy, max_dose_kgy] (goal: 0);
  - truly in spec among the not in spec: scrap that the truth says was good cable;
  - bounds violations: a metre whose recorded [min, max] bounds (across a data gap) do
    not hold its true dose;
  - burns (the beam on a standing cable, from the truth).
linectl's WARNING and ERROR log lines (both runs) and its ledger audit events are kept
in the JSON, so that why the metres were scrapped can be read there.

    .venv/bin/python bench/restart_scrap.py [--modes planned,sigkill] [--json FILE]

One trial per mode, one after the other (each takes a few minutes in real time: the
reference line runs 80 m/min). `--smoke`: the compact test line and the fast recipe
(tests/e2e_scenarios.py), a 7 m reel restarted at 3 m (for the smoke test: checks that
the bench runs, never a figure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the compact line is the tests'
sys.path.insert(0, str(ROOT / "bench"))  # benchlib

import e2e_scenarios as sc  # noqa: E402
from benchlib import host_facts  # noqa: E402

from linectl.config import LoadedConfig, load_config  # noqa: E402
from linectl.core.ledger import Verdict  # noqa: E402
from linectl.service import LineService, ReelRequest, select_recipe  # noqa: E402
from linectl.store import RecordStore, StoredMetre  # noqa: E402
from simulators.server import SimulatedLine  # noqa: E402

MODES = ("planned", "sigkill")
OP = "bench"
SEEDS = {"planned": 41, "sigkill": 42}
FULL_SPEED = 0.98  # of the recipe's maximum speed: "at full speed"
# after_zone_m: metres past the beam zone at the restart that must run after it.
REFERENCE = {"restart_at_m": 120.0, "length_m": 150.0, "after_zone_m": 20.0}
SMOKE = {"restart_at_m": 3.0, "length_m": 7.0, "after_zone_m": 2.0}


# ---------------------------------------------------------------------- configuration


def reference_config(workdir: Path) -> Path:
    """The shipped configuration as is, its records in workdir."""
    d = workdir / "config"
    shutil.copytree(sc.CONFIG_DIR, d)
    line = (d / "line.toml").read_text()
    old = 'path = "records/linectl.sqlite"'
    assert old in line, old
    (d / "line.toml").write_text(line.replace(old, f'path = "{workdir / "records.sqlite"}"'))
    return d


def config_dir(workdir: Path, smoke: bool) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    return sc.compact_config(workdir) if smoke else reference_config(workdir)


# ---------------------------------------------------------------------- watching the plant


@dataclass
class Timeline:
    """What the simulated plant did around the restart (bench clock, s)."""

    t_reel_start: float | None = None  # the reel's coordinate 0 set in the truth
    t_full_speed: float | None = None  # first seen at full speed
    t_restart: float | None = None  # stop() called, or SIGKILL sent
    t_beam_off: float | None = None  # beam off after the restart
    t_standstill: float | None = None  # conveyor stopped after the restart
    t_second_start: float | None = None  # the second linectl started
    t_moving_again: float | None = None  # cable moving again
    t_full_speed_again: float | None = None
    t_done: float | None = None  # the second linectl returned / exited
    position_at_restart_m: float | None = None  # cable path since the reel's coordinate 0
    speed_at_restart_m_min: float | None = None
    beam_current_at_restart_ma: float | None = None
    path_moved_after_restart_before_standstill_m: float | None = None


class PlantWatch:
    """Samples the simulator every 10 ms: speeds and beam around the restart."""

    def __init__(self, sim: SimulatedLine, v_full: float) -> None:
        self.sim = sim
        self.v_full = v_full
        self.tl = Timeline()
        self._t0 = time.monotonic()
        self._path_at_restart: float | None = None
        self._task: asyncio.Task[None] | None = None

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    def position_m(self) -> float:
        truth = self.sim.plant.truth
        return float(truth.path_m - truth.l0_m)

    def speed(self) -> float:
        return float(self.sim.plant.conveyor.speed_m_min)

    def at_full_speed(self) -> bool:
        return self.speed() >= FULL_SPEED * self.v_full

    def reel_started(self, counter_m: float | None) -> None:
        self.sim.plant.start_reel(counter_m)
        self.tl.t_reel_start = self.now()

    def restart(self) -> None:
        tl = self.tl
        tl.t_restart = self.now()
        tl.position_at_restart_m = round(self.position_m(), 3)
        tl.speed_at_restart_m_min = round(self.speed(), 3)
        acc = self.sim.plant.accelerator
        tl.beam_current_at_restart_ma = round(float(getattr(acc, "current_ma", math.nan)), 3)
        self._path_at_restart = float(self.sim.plant.truth.path_m)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="restart-scrap-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        tl = self.tl
        plant = self.sim.plant
        while True:
            t = self.now()
            full = self.at_full_speed()
            if tl.t_restart is None:
                if full and tl.t_full_speed is None and tl.t_reel_start is not None:
                    tl.t_full_speed = t
            else:
                if tl.t_beam_off is None and not plant.accelerator.beam_on:
                    tl.t_beam_off = t
                if tl.t_standstill is None and self.speed() <= 0.0:
                    tl.t_standstill = t
                    if self._path_at_restart is not None:
                        moved = float(plant.truth.path_m) - self._path_at_restart
                        tl.path_moved_after_restart_before_standstill_m = round(moved, 3)
                if tl.t_standstill is not None and tl.t_moving_again is None and self.speed() > 0:
                    tl.t_moving_again = t
                if tl.t_moving_again is not None and tl.t_full_speed_again is None and full:
                    tl.t_full_speed_again = t
            await asyncio.sleep(0.01)


async def wait_until(
    cond: Any, timeout_s: float, what: str, alive: Any = None, poll_s: float = 0.02
) -> None:
    """Poll cond() until it holds; TimeoutError naming what did not happen, RuntimeError
    when alive() says the thing waited on has ended first."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if alive is not None and not alive():
            raise RuntimeError(f"ended before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(poll_s)


# ---------------------------------------------------------------------- logs


class _Lines(logging.Handler):
    """linectl's log records as text lines."""

    def __init__(self, tag: str) -> None:
        super().__init__(logging.INFO)
        self.tag = tag
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"[{self.tag}] {self.format(record)}")


@contextlib.contextmanager
def captured(tag: str) -> Any:
    """linectl's INFO and above, kept (never printed) while the block runs."""
    lg = logging.getLogger("linectl")
    h = _Lines(tag)
    level, propagate = lg.level, lg.propagate
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        yield h.lines
    finally:
        lg.removeHandler(h)
        lg.setLevel(level)
        lg.propagate = propagate


def notable(lines: list[str]) -> list[str]:
    """The lines that say why metres were scrapped: warnings, errors, reel and ledger."""
    keys = ("WARNING", "ERROR", "CRITICAL", "Traceback", "reel ", "resum", "unproven")
    return [ln for ln in lines if any(k in ln for k in keys)]


# ---------------------------------------------------------------------- the two modes


@dataclass
class Plan:
    """One trial's parameters."""

    mode: str
    reel_id: str
    length_m: float
    restart_at_m: float
    seed: int
    after_zone_m: float


def _phase_timeouts(cfg: LoadedConfig, plan: Plan, v: float) -> tuple[float, float]:
    """Generous real-time bounds for the run to the restart and for the rest of the reel."""
    geom = cfg.line.geometry
    mps = v / 60.0
    first = 90.0 + 2.0 * plan.restart_at_m / mps
    rest = 120.0 + 2.0 * (plan.length_m + geom.last_pass_offset_m - plan.restart_at_m) / mps
    return first, rest


async def planned_trial(
    cfg: LoadedConfig, plan: Plan, sim: SimulatedLine, watch: PlantWatch, res: dict[str, Any]
) -> None:
    """Clean stop mid-reel (as SIGTERM), a new service resumes the reel and finishes it."""
    recipe, path = select_recipe(cfg, None)
    t_first, t_rest = _phase_timeouts(cfg, plan, watch.v_full)
    with captured("first") as lines1:
        svc = LineService(cfg, recipe, path, **sc.endpoints(cfg, sim))
        svc.on_reel_start.append(lambda _r, counter_m: watch.reel_started(counter_m))
        svc.request_reel(ReelRequest(plan.reel_id, plan.length_m, OP))
        task = asyncio.create_task(svc.run(exit_when_done=True), name="restart-scrap-first")
        try:
            await wait_until(
                lambda: (
                    watch.tl.t_reel_start is not None
                    and watch.position_m() >= plan.restart_at_m
                    and watch.at_full_speed()
                ),
                t_first,
                f"{plan.restart_at_m} m of reel at full speed",
                alive=lambda: not task.done(),
            )
            res["metres_recorded_before_restart"] = svc.records_written
            watch.restart()
        finally:
            svc.stop()  # what SIGTERM does
            await task
    res["first_state_at_exit"] = svc.ctl.state.value
    hooks: list[float] = []
    with captured("second") as lines2:
        svc2 = LineService(cfg, recipe, path, **sc.endpoints(cfg, sim))
        # A resumed reel keeps its coordinate 0: a second reel start would be a finding.
        svc2.on_reel_start.append(lambda _r, counter_m: hooks.append(counter_m))
        svc2.request_resume(OP)
        watch.tl.t_second_start = watch.now()
        task2 = asyncio.create_task(svc2.run(exit_when_done=True), name="restart-scrap-second")
        try:
            await wait_until(
                lambda: plan.reel_id in svc2.finished_reels,
                t_rest,
                "the resumed reel finished",
                alive=lambda: not task2.done(),
            )
        finally:
            svc2.stop()
            await task2
        watch.tl.t_done = watch.now()
    res["reel_start_hook_on_resume"] = hooks
    res["second_state_at_exit"] = svc2.ctl.state.value
    res["log_lines"] = len(lines1) + len(lines2)
    res["log"] = notable(lines1 + lines2)


async def sigkill_trial(
    cfg: LoadedConfig,
    plan: Plan,
    sim: SimulatedLine,
    watch: PlantWatch,
    res: dict[str, Any],
    *,
    cfg_dir: Path,
    workdir: Path,
) -> None:
    """`linectl run` killed with SIGKILL mid-reel, then `--reset-faults --resume
    --exit-after-reel`."""
    db = cfg.resolve(cfg.line.records.path)
    t_first, t_rest = _phase_timeouts(cfg, plan, watch.v_full)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}
    env.update(
        {
            "LINECTL_ACCELERATOR__PORT": str(sim.acc_port),
            "LINECTL_CONVEYOR__PORT": str(sim.cnv_port),
            "LINECTL_METRICS__PORT": "0",  # never the default port another process may hold
        }
    )
    cmd = [sys.executable, "-m", "linectl", "run", "--config", str(cfg_dir)]
    err1, err2 = workdir / "first.stderr", workdir / "second.stderr"
    with err1.open("wb") as f1:
        first = await asyncio.create_subprocess_exec(
            *cmd,
            "--reel",
            plan.reel_id,
            "--length",
            f"{plan.length_m:g}",
            "--operator",
            OP,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=f1,
        )
        try:

            def alive() -> bool:
                return first.returncode is None

            await wait_until(
                lambda: sc.start_counter(db, plan.reel_id) is not None,
                60.0,
                "the reel's start in the records",
                alive=alive,
                poll_s=0.05,
            )
            watch.reel_started(sc.start_counter(db, plan.reel_id))
            await wait_until(
                lambda: watch.position_m() >= plan.restart_at_m and watch.at_full_speed(),
                t_first,
                f"{plan.restart_at_m} m of reel at full speed",
                alive=alive,
            )
            watch.restart()
            first.send_signal(signal.SIGKILL)
            async with asyncio.timeout(10.0):
                await first.wait()
        finally:
            if first.returncode is None:
                first.kill()
                await first.wait()
    res["first_returncode"] = first.returncode
    res["metres_recorded_before_restart"] = sc.count_metres(db, plan.reel_id)
    # Killed: the PLCs' own watchdogs make the line safe.
    await wait_until(lambda: watch.tl.t_standstill is not None, 30.0, "the line to stand")
    with err2.open("wb") as f2:
        watch.tl.t_second_start = watch.now()
        second = await asyncio.create_subprocess_exec(
            *cmd,
            "--reset-faults",
            "--resume",
            "--exit-after-reel",
            "--operator",
            OP,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=f2,
        )
        try:
            async with asyncio.timeout(t_rest):
                await second.wait()
        finally:
            if second.returncode is None:
                second.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(70.0):
                        await second.wait()
                except TimeoutError:
                    second.kill()
                    await second.wait()
    watch.tl.t_done = watch.now()
    res["second_returncode"] = second.returncode
    lines = [f"[first] {ln}" for ln in err1.read_text(errors="replace").splitlines()]
    lines += [f"[second] {ln}" for ln in err2.read_text(errors="replace").splitlines()]
    res["log_lines"] = len(lines)
    res["log"] = notable(lines)


# ---------------------------------------------------------------------- figures


def ranges(xs: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out: list[str] = []
    xs = sorted(xs)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def tally(
    cfg: LoadedConfig, plan: Plan, metres: list[StoredMetre], sim: SimulatedLine, tl: Timeline
) -> dict[str, Any]:
    """Metres by verdict and cause, checked against the simulator's truth."""
    recipe, _ = select_recipe(cfg, None)
    geom = cfg.line.geometry
    lo, hi = recipe.min_dose_kgy, recipe.max_dose_kgy
    truth = sim.plant.truth
    planned = math.ceil(plan.length_m)
    recorded = {m.index for m in metres}
    missing = sorted(set(range(planned)) - recorded)
    bad = [m for m in metres if m.verdict is not Verdict.IN_SPEC]
    verdicts = Counter(m.verdict.value for m in metres)
    causes = Counter(c for m in bad for c in m.causes)
    combos = Counter(f"{m.verdict.value} [{', '.join(m.causes)}]" for m in bad)
    false_accepts = [
        m.index
        for m in metres
        if m.verdict is Verdict.IN_SPEC and not lo <= truth.dose_kgy(m.index) <= hi
    ]
    truly_good = [m.index for m in bad if lo <= truth.dose_kgy(m.index) <= hi]
    bounds = [
        m.index
        for m in metres
        if m.min_dose_kgy is not None
        and m.max_dose_kgy is not None
        and not m.min_dose_kgy - 1e-9 <= truth.dose_kgy(m.index) <= m.max_dose_kgy + 1e-9
    ]
    errs = [
        100.0 * abs(m.dose_kgy - truth.dose_kgy(m.index)) / recipe.target_dose_kgy
        for m in metres
        if m.dose_kgy is not None and m.verdict is not Verdict.UNPROVEN and "gap" not in m.causes
    ]
    unproven = [m for m in metres if m.verdict is Verdict.UNPROVEN]
    zone: dict[str, Any] = {}
    if tl.position_at_restart_m is not None:
        pos = tl.position_at_restart_m
        z0 = max(0, math.floor(pos - geom.last_pass_offset_m))
        z1 = min(planned - 1, math.floor(pos - geom.offset_m(0)))
        zone = {
            "metres": f"{z0}-{z1}",
            "count": max(0, z1 - z0 + 1),
            "not_in_spec_inside": sum(z0 <= m.index <= z1 for m in bad),
            "not_in_spec_outside": sum(not z0 <= m.index <= z1 for m in bad),
        }
    bad_truth = [truth.dose_kgy(m.index) for m in bad]
    # The metres a data gap touched (the restart's): their doses are bounded estimates.
    gapped = [m for m in metres if "gap" in m.causes]
    return {
        "planned_metres": planned,
        "recorded": len(metres),
        "recorded_once_each": sorted(recorded) == list(range(planned)) == [m.index for m in metres],
        "missing": len(missing),
        "not_in_spec": len(bad) + len(missing),
        "not_in_spec_metres": ranges([m.index for m in bad] + missing),
        "verdicts": dict(verdicts.most_common()),
        "causes_not_in_spec": dict(causes.most_common()),
        "by_verdict_and_causes": dict(combos.most_common()),
        "unproven": len(unproven),
        "unproven_causes": dict(Counter(c for m in unproven for c in m.causes).most_common()),
        "false_accepts": len(false_accepts),
        "false_accept_metres": false_accepts,
        "truly_in_spec_among_not_in_spec": len(truly_good),
        "true_dose_of_not_in_spec_kgy": (
            {"min": round(min(bad_truth), 2), "max": round(max(bad_truth), 2)}
            if bad_truth
            else None
        ),
        "bounds_violations": len(bounds),
        "not_in_spec_detail": [
            {
                "metre": m.index,
                "verdict": m.verdict.value,
                "causes": list(m.causes),
                "dose_kgy": _r(m.dose_kgy),
                "min_kgy": _r(m.min_dose_kgy),
                "max_kgy": _r(m.max_dose_kgy),
                "true_kgy": _r(truth.dose_kgy(m.index)),
            }
            for m in bad
        ],
        "gap_metres": {
            "count": len(gapped),
            "in_spec": sum(m.verdict is Verdict.IN_SPEC for m in gapped),
            "min_kgy_lowest": _r(min((m.min_dose_kgy or 0.0 for m in gapped), default=None)),
            "max_kgy_highest": _r(max((m.max_dose_kgy or 0.0 for m in gapped), default=None)),
            "true_kgy": (
                [
                    _r(min(truth.dose_kgy(m.index) for m in gapped)),
                    _r(max(truth.dose_kgy(m.index) for m in gapped)),
                ]
                if gapped
                else None
            ),
        },
        "max_dose_error_pct_of_target": round(max(errs), 3) if errs else None,
        "burns": len(truth.burns),
        "beam_zone_at_restart": zone,
    }


async def run_trial(plan: Plan, workdir: Path, smoke: bool) -> dict[str, Any]:
    """One reel with one restart; never raises for a failed trial (`error` says it)."""
    cfg_dir = config_dir(workdir, smoke)
    cfg = load_config(cfg_dir, environ={})
    recipe, _ = select_recipe(cfg, None)
    geom = cfg.line.geometry
    v_full = recipe.max_speed_m_min(geom.weight_sum)
    need = plan.restart_at_m - geom.offset_m(0) + plan.after_zone_m
    res: dict[str, Any] = {
        "mode": plan.mode,
        "reel_id": plan.reel_id,
        "seed": plan.seed,
        "length_m": plan.length_m,
        "restart_at_m": plan.restart_at_m,
        "line": {
            "passes": geom.passes,
            "pass_spacing_m": geom.pass_spacing_m,
            "first_pass_offset_m": geom.offset_m(0),
            "last_pass_offset_m": geom.last_pass_offset_m,
            "cycle_period_s": cfg.line.cycle_period_s,
            "watchdog_timeout_ms": cfg.line.watchdog_timeout_ms,
        },
        "recipe": {
            "product": recipe.product,
            "min_dose_kgy": recipe.min_dose_kgy,
            "max_dose_kgy": recipe.max_dose_kgy,
            "target_dose_kgy": recipe.target_dose_kgy,
            "k_dose": recipe.k_dose,
            "full_speed_m_min": round(v_full, 3),
        },
        "error": "",
    }
    if plan.length_m < need:
        res["error"] = f"--length-m must be at least {need:g} for --restart-at-m"
        return res
    t0 = time.monotonic()
    async with SimulatedLine(cfg, seed=plan.seed, k_dose_true=recipe.k_dose) as sim:
        watch = PlantWatch(sim, v_full)
        watch.start()
        try:
            if plan.mode == "planned":
                await planned_trial(cfg, plan, sim, watch, res)
            else:
                await sigkill_trial(cfg, plan, sim, watch, res, cfg_dir=cfg_dir, workdir=workdir)
        except Exception as exc:  # the result reports it
            res["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            await watch.stop()
        res["timeline_s"] = asdict(watch.tl)
        db = cfg.resolve(cfg.line.records.path)
        with RecordStore(db) as store:
            known = store.reel_exists(plan.reel_id)
            metres = store.metres(plan.reel_id) if known else []
            reel = store.reel(plan.reel_id) if known else None
            events = store.events(plan.reel_id) if known else []
            res["integrity"] = store.integrity_check()
        res["reel_state"] = reel.state if reel else ""
        res["reel_end_reason"] = reel.end_reason if reel else None
        res["events"] = [
            f"{e.action} by {e.actor}{'' if e.accepted else ' (refused)'}: "
            f"{json.dumps(e.detail, sort_keys=True)}"
            for e in events
        ]
        res.update(tally(cfg, plan, metres, sim, watch.tl))
    res["took_s"] = round(time.monotonic() - t0, 1)
    return res


# ---------------------------------------------------------------------- output


def print_result(r: dict[str, Any]) -> None:
    tl = r.get("timeline_s", {})
    print(f"\n== {r['mode']}: reel {r['reel_id']}, {r['length_m']:g} m, seed {r['seed']}")
    if r["error"]:
        print(f"  ERROR: {r['error']}")
    if "not_in_spec" not in r:
        return
    print(
        f"  restart at {tl.get('position_at_restart_m')} m of cable path, "
        f"{tl.get('speed_at_restart_m_min')} m/min (full speed {r['recipe']['full_speed_m_min']}); "
        f"beam zone then: metres {r['beam_zone_at_restart'].get('metres')}"
    )
    print(
        f"  metres recorded {r['recorded']} of {r['planned_metres']} "
        f"(each once: {r['recorded_once_each']}), reel {r['reel_state']} "
        f"({r['reel_end_reason']}), took {r['took_s']:.0f} s"
    )
    print(f"  NOT IN SPEC: {r['not_in_spec']} m  (metres {r['not_in_spec_metres'] or '-'})")
    print(f"    verdicts (all metres): {r['verdicts']}")
    for combo, n in r["by_verdict_and_causes"].items():
        print(f"    {n:5d}  {combo}")
    print(f"    unproven: {r['unproven']}, causes {r['unproven_causes']}")
    g = r["gap_metres"]
    print(
        f"    metres a gap touched: {g['count']}, {g['in_spec']} in spec; recorded bounds "
        f"{g['min_kgy_lowest']} to {g['max_kgy_highest']} kGy; true {g['true_kgy']} kGy"
    )
    print(
        f"  false accepts {r['false_accepts']} (goal 0); truly in spec among the not in spec "
        f"{r['truly_in_spec_among_not_in_spec']}; bounds violations {r['bounds_violations']}; "
        f"burns {r['burns']}; max dose error {r['max_dose_error_pct_of_target']} % of target"
    )
    print(
        f"  timeline (s): full speed {tl.get('t_full_speed')}, restart {tl.get('t_restart')}, "
        f"beam off {tl.get('t_beam_off')}, standstill {tl.get('t_standstill')} "
        f"(+{tl.get('path_moved_after_restart_before_standstill_m')} m), moving again "
        f"{tl.get('t_moving_again')}, full speed again {tl.get('t_full_speed_again')}, "
        f"done {tl.get('t_done')}"
    )
    for ln in r.get("log", [])[:40]:
        print(f"    {ln}")


async def run(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    out = []
    for mode in args.modes:  # one trial at a time: each is real time
        plan = Plan(
            mode=mode,
            reel_id=f"RESTART-{mode.upper()}",
            length_m=args.length_m,
            restart_at_m=args.restart_at_m,
            seed=SEEDS[mode],
            after_zone_m=(SMOKE if args.smoke else REFERENCE)["after_zone_m"],
        )
        r = await run_trial(plan, workdir / mode, args.smoke)
        print_result(r)
        out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=list(MODES),
        help="comma-separated, of planned,sigkill (default both, in turn)",
    )
    ap.add_argument(
        "--restart-at-m",
        type=float,
        help=f"restart once this much cable path ran (default {REFERENCE['restart_at_m']:g})",
    )
    ap.add_argument(
        "--length-m", type=float, help=f"planned reel length, m (default {REFERENCE['length_m']:g})"
    )
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument(
        "--smoke", action="store_true", help="compact test line, 7 m reel restarted at 3 m"
    )
    ap.add_argument("--keep", type=Path, help="keep the configs, records and logs in this dir")
    args = ap.parse_args(argv)
    if bad := set(args.modes) - set(MODES):
        ap.error(f"unknown mode(s) {sorted(bad)}")
    defaults = SMOKE if args.smoke else REFERENCE
    if args.restart_at_m is None:
        args.restart_at_m = defaults["restart_at_m"]
    if args.length_m is None:
        args.length_m = defaults["length_m"]
    load_start = [round(x, 2) for x in os.getloadavg()]
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="restart-scrap-") as tmp:
        workdir = args.keep or Path(tmp)
        trials = asyncio.run(run(args, workdir))
    res: dict[str, Any] = {
        "geometry": "compact (smoke)" if args.smoke else "reference (config/)",
        "trials": trials,
        "false_accepts": sum(t.get("false_accepts", 0) for t in trials),
        "errors": [f"{t['mode']}: {t['error']}" for t in trials if t["error"]],
        **host_facts(load_start, t_start),
    }
    print(
        "\nnot in spec: "
        + ", ".join(f"{t['mode']} {t.get('not_in_spec', '-')} m" for t in trials)
        + f"; false accepts {res['false_accepts']}; {res['took_s']:.0f} s; load average "
        f"(1, 5, 15 min): start {res['load_avg_start']}, end {res['load_avg_end']}; "
        f"{res['cpus']} CPUs"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
