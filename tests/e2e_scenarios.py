"""Real-time fault scenarios: the line service over Modbus TCP against the simulators.

Each scenario runs one short reel on a compact line, injects its fault part-way, lets
the operator's recovery happen (reset, resume) where the line stopped, and compares
every recorded metre with the simulator's independent ground truth. Used by the test
suite (tests/test_e2e_scenarios.py) and by bench/dose_accuracy.py, which prints the
figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from linectl.config import LoadedConfig, MqttConfig, load_config
from linectl.core.control import Alarm, LineState
from linectl.core.ledger import Verdict
from linectl.mqtt import MqttBridge
from linectl.service import LineService, ReelRequest, select_recipe
from linectl.store import RecordStore, ReelInfo, StoredMetre
from linectl.telemetry import Topics
from simulators.server import SimulatedLine

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
TRUE_K = 6000.0  # the plant's true dose coefficient, as dosimetry gave it to the recipe

FAST_RECIPE = """
product = "test cable"
version = "e2e-1"
target_dose_kgy = 120.0
min_dose_kgy = 105.0
max_dose_kgy = 140.0
energy_mev = 1.2
energy_tolerance_mev = 0.05
k_dose = 6000.0
scan_width_cm = 100.0
beam_current_min_ma = 1.0
beam_current_max_ma = 40.0
speed_min_m_min = 5.0
speed_max_m_min = 250.0
"""


def compact_config(tmp_path: Path) -> Path:
    """The shipped configuration with a compact geometry (4 passes within 2 m of cable
    path) and a fast test recipe (80 m/min at 40 mA), so real-time reels take seconds."""
    d = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, d)
    line = (d / "line.toml").read_text()
    for old, new in [
        ("passes = 16", "passes = 4"),
        ("pass_spacing_m = 6.0", "pass_spacing_m = 0.5"),
        ("first_pass_offset_m = 4.0", "first_pass_offset_m = 0.5"),
        ("relative_ramp_per_s = 0.25", "relative_ramp_per_s = 1.0"),
        ('default_recipe = "pv-1x6-en50618"', 'default_recipe = "fast"'),
        ('path = "records/linectl.sqlite"', f'path = "{tmp_path / "records.sqlite"}"'),
    ]:
        assert old in line, old
        line = line.replace(old, new)
    (d / "line.toml").write_text(line)
    (d / "recipes" / "fast.toml").write_text(FAST_RECIPE)
    return d


def operator_config(tmp_path: Path, operator: str) -> LoadedConfig:
    """The compact line, with `operator` holding the shipped `operator` role."""
    cfg = load_config(compact_config(tmp_path), environ={})
    mqtt = cfg.line.mqtt.model_copy(update={"identities": {operator: "operator"}})
    cfg.line = cfg.line.model_copy(update={"mqtt": mqtt})
    return cfg


@contextlib.asynccontextmanager
async def line_service(
    cfg: LoadedConfig,
    sim: SimulatedLine,
    *,
    exit_when_done: bool = False,
    reset_faults: bool = False,
) -> AsyncIterator[LineService]:
    """The line service running on the simulators (a new reel's coordinate 0 handed to
    the simulator's truth); stopped safely on exit, as SIGTERM does. The service task
    first runs at the caller's first await: hooks added before it see everything."""
    recipe, path = select_recipe(cfg, None)
    svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
    svc.on_reel_start.append(lambda _r, counter_m: sim.plant.start_reel(counter_m))
    if reset_faults:
        svc.request_reset()
    run = asyncio.create_task(svc.run(exit_when_done=exit_when_done))
    try:
        yield svc
    finally:
        svc.stop()
        await run


@dataclass
class MqttLine:
    """A line service with its MQTT bridge, on the simulators (see `mqtt_line`)."""

    svc: LineService
    sim: SimulatedLine
    bridge: MqttBridge
    topics: Topics
    db: Path


@contextlib.asynccontextmanager
async def mqtt_line(
    host: str, port: int, tmp_path: Path, *, seed: int = 5, refusal_window_s: float = 10.0
) -> AsyncIterator[MqttLine]:
    """The daemon's wiring of a service and its MQTT bridge on the simulated compact line,
    READY, on the broker at host:port; identities op-1 and op-2 are operators. Commands
    refused unread are audited per `refusal_window_s` (the daemon's: 10 s)."""
    cfg = load_config(compact_config(tmp_path), environ={})
    mqtt = MqttConfig(
        enabled=True,
        host=host,
        port=port,
        keepalive_s=5,
        reconnect_max_s=0.5,
        roles={"operator": ["*"]},
        identities={"op-1": "operator", "op-2": "operator"},
    )
    cfg.line = cfg.line.model_copy(update={"mqtt": mqtt})
    async with (
        SimulatedLine(cfg, seed=seed, k_dose_true=TRUE_K) as sim,
        line_service(cfg, sim) as svc,
    ):
        bridge = MqttBridge(
            svc,
            mqtt,
            line_id=cfg.line.line_id,
            store_path=svc.store_path,
            refusal_window_s=refusal_window_s,
        )
        svc.observers.append(bridge.on_cycle)
        run = asyncio.create_task(bridge.run())
        try:
            await asyncio.wait_for(bridge.connected.wait(), 10.0)
            await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
            topics = Topics.for_line(mqtt.topic_prefix, cfg.line.line_id)
            yield MqttLine(svc, sim, bridge, topics, svc.store_path)
        finally:
            # The bridge first, while the service can still audit what it flushes.
            bridge.stop()
            await asyncio.wait_for(run, 30.0)


def endpoints(cfg: LoadedConfig, sim: SimulatedLine) -> dict[str, Any]:
    """The line's PLC endpoints pointed at the simulator's ports."""
    return {
        "acc_endpoint": cfg.line.accelerator.model_copy(update={"port": sim.acc_port}),
        "cnv_endpoint": cfg.line.conveyor.model_copy(update={"port": sim.cnv_port}),
    }


def open_reel_in_records(cfg: LoadedConfig, reel_id: str, planned_length_m: float) -> None:
    """A reel opened in the line's records by an earlier run (never started here)."""
    recipe, _ = select_recipe(cfg, None)
    info = ReelInfo(
        reel_id,
        cfg.line.line_id,
        recipe.product,
        recipe.version,
        "0" * 64,
        recipe.model_dump_json(),
        "A. Smith",
        planned_length_m,
        "2026-12-03T10:00:00.000Z",
    )
    with RecordStore(cfg.line.records.path) as store:
        store.open_reel(info)


def read_only(db: Path, sql: str, *params: object) -> tuple[object, ...] | None:
    """One row from a daemon's database, read-only (never a writer beside the daemon)."""
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            row: tuple[object, ...] | None = con.execute(sql, params).fetchone()
            return row
        finally:
            con.close()
    except sqlite3.Error:  # not created yet, or mid-creation
        return None


def start_counter(db: Path, reel: str) -> float | None:
    """The length counter a daemon took as the reel's coordinate 0 (None: not yet)."""
    row = read_only(db, "SELECT value FROM reel_state WHERE reel_id = ? AND key = 'start'", reel)
    return None if row is None else float(json.loads(str(row[0]))["length_counter_m"])


def count_metres(db: Path, reel: str) -> int:
    """Metres a daemon has stored for the reel."""
    row = read_only(db, "SELECT COUNT(*) FROM metres WHERE reel_id = ?", reel)
    return 0 if row is None else int(str(row[0]))


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll until cond() holds; TimeoutError naming what did not happen."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


Inject = Callable[[SimulatedLine, LineService, "Result"], Awaitable[None]]


@dataclass
class Scenario:
    """One fault case."""

    name: str
    inject: Inject | None = None
    at_m: float = 5.0  # reel position at which the fault is injected
    length_m: float = 15.0
    seed: int = 1
    sim_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """What a scenario measured."""

    name: str
    finished: bool = False
    metres: int = 0
    contiguous: bool = False
    verdicts: dict[str, int] = field(default_factory=dict)
    false_accepts: list[int] = field(default_factory=list)
    false_rejects: list[int] = field(default_factory=list)
    errors_pct: list[float] = field(default_factory=list)  # measured metres (no gap)
    outside_bounds: list[int] = field(default_factory=list)  # gap metres, truth outside
    burns: int = 0
    recoveries: int = 0
    estop_to_beam_off_s: float | None = None
    speeds_m_min: list[float] = field(default_factory=list)  # measured while RUNNING
    speed_limit_m_min: float = 0.0
    missed_cycles: int = 0
    alarms: set[str] = field(default_factory=set)
    alarm_texts: list[str] = field(default_factory=list)  # "kind: message", in order
    # The oldest data the control cycle was given, per PLC (s): against stale_after_s,
    # it says how close a ride-through came to a link alarm.
    max_data_age_s: dict[str, float] = field(default_factory=dict)
    reel_state: str = ""  # as recorded: "closed" once complete
    safe_at_end: bool = False  # beam off and line stopped when the service returned
    error: str = ""

    @property
    def rms_pct(self) -> float:
        """RMS dose error, % of target."""
        e = self.errors_pct
        return math.sqrt(sum(x * x for x in e) / len(e)) if e else math.nan

    @property
    def max_pct(self) -> float:
        """Largest absolute dose error, % of target."""
        return max((abs(x) for x in self.errors_pct), default=math.nan)

    @property
    def steady_speed_m_min(self) -> float:
        """Median measured speed over the top of the run (the plateau)."""
        s = sorted(self.speeds_m_min)
        top = s[len(s) // 2 :]
        return statistics.median(top) if top else math.nan


# ---------------------------------------------------------------------- the faults


async def _estop(sim: SimulatedLine, svc: LineService, res: Result) -> None:
    t0 = time.monotonic()
    sim.faults.estop()
    await wait_for(lambda: not sim.plant.accelerator.beam_on_req, 5.0, "beam-off write")
    res.estop_to_beam_off_s = time.monotonic() - t0


async def _cable_break(sim: SimulatedLine, svc: LineService, res: Result) -> None:
    sim.faults.cable_break()


async def _hv_fault(sim: SimulatedLine, svc: LineService, res: Result) -> None:
    sim.faults.latch("accelerator", 2)


async def _long_trip(sim: SimulatedLine, svc: LineService, res: Result) -> None:
    sim.faults.arc(duration_s=3.0)  # longer than the ride-through: the line slows


async def _acc_loss(sim: SimulatedLine, svc: LineService, res: Result) -> None:
    await sim.faults.link_loss("accelerator", 1.5)


async def _cnv_loss(sim: SimulatedLine, svc: LineService, res: Result) -> None:
    await sim.faults.link_loss("conveyor", 1.5)


async def _acc_restart(sim: SimulatedLine, svc: LineService, res: Result) -> None:
    await sim.restart("accelerator", down_s=0.5)


async def _slow(sim: SimulatedLine, svc: LineService, res: Result) -> None:
    # Answers 20 to 40 ms late: within the link's timeout, so the line runs on.
    sim.faults.delay("accelerator", mean_s=0.03, jitter_s=0.01, duration_s=4.0)
    sim.faults.delay("conveyor", mean_s=0.03, jitter_s=0.01, duration_s=4.0)
    await asyncio.sleep(4.0)


async def _exceptions(sim: SimulatedLine, svc: LineService, res: Result) -> None:
    # A PLC answering every request with exception 4 (device failure) for a second.
    sim.faults.exceptions("accelerator", 4, 1.0)
    await asyncio.sleep(1.0)


SCENARIOS: list[Scenario] = [
    Scenario("clean", seed=1),
    Scenario("random_arcs", seed=2, sim_kwargs={"arc_rate_per_h": 360.0}),
    Scenario("long_beam_trip", _long_trip, seed=3),
    Scenario("latched_hv_fault", _hv_fault, seed=4),
    Scenario("estop", _estop, seed=5),
    Scenario("cable_break", _cable_break, seed=6),
    Scenario("acc_link_loss", _acc_loss, seed=7),
    Scenario("cnv_link_loss", _cnv_loss, seed=8),
    Scenario("acc_restart", _acc_restart, seed=9),
    Scenario(
        "counters_near_wrap",
        seed=10,
        sim_kwargs={
            "acc_counters": {"charge_total": 2**32 - 400_000, "clock": 2**32 - 3000},
            "cnv_counters": {"length": 2**32 - 9_000, "clock": 2**32 - 2000},
        },
    ),
    Scenario("slow_plcs", _slow, seed=11),
    Scenario("exception_responses", _exceptions, seed=12),
]


# ---------------------------------------------------------------------- the runner


async def run_scenario(sc: Scenario, workdir: Path, timeout_s: float = 150.0) -> Result:
    """Run one scenario end to end; the Result says what happened (never raises for a
    scenario failure: `error` holds it)."""
    res = Result(sc.name)
    cfg = load_config(compact_config(workdir), environ={})  # copytree makes workdir
    recipe, path = select_recipe(cfg, None)
    res.speed_limit_m_min = recipe.max_speed_m_min(cfg.line.geometry.weight_sum)
    async with SimulatedLine(cfg, seed=sc.seed, k_dose_true=TRUE_K, **sc.sim_kwargs) as sim:
        svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
        svc.on_reel_start.append(lambda _r, counter_m: sim.plant.start_reel(counter_m))

        def watch(s: LineService) -> None:
            for plc, link, snap in (("acc", s.acc, s.last_acc), ("cnv", s.cnv, s.last_cnv)):
                if snap is not None:
                    age_s = snap.age_s(link.now())
                    if math.isfinite(age_s) and age_s > res.max_data_age_s.get(plc, 0.0):
                        res.max_data_age_s[plc] = age_s
            if s.ctl.state is LineState.RUNNING and s.last_cnv is not None:
                v = s.last_cnv.value("speed")
                if v is not None:
                    res.speeds_m_min.append(float(v))
            if sim.plant.accelerator.beam_on and not sim.plant.conveyor.running:
                res.burns += 1

        svc.observers.append(watch)

        def alarm(a: Alarm) -> None:
            res.alarms.add(a.kind)
            res.alarm_texts.append(f"{a.kind}: {a.message}")

        svc.on_alarm.append(alarm)
        reel = ReelRequest(sc.name, sc.length_m, "e2e")
        svc.request_reel(reel)
        task = asyncio.create_task(svc.run(exit_when_done=True), name=f"service-{sc.name}")
        try:
            if sc.inject is not None:
                await wait_for(
                    lambda: svc.ledger is not None and (svc.ledger.position_m or 0.0) >= sc.at_m,
                    60.0,
                    f"{sc.at_m} m of reel",
                )
                await sc.inject(sim, svc, res)
            # The operator's part: whenever the line has stopped short of the reel's end,
            # reset and resume it.
            deadline = time.monotonic() + timeout_s
            while not task.done():
                if time.monotonic() > deadline:
                    raise TimeoutError("reel did not finish")
                stopped = svc.ctl.state in (LineState.FAULT, LineState.IDLE, LineState.READY)
                unfinished = svc.ctl.reel is not None and not svc.ctl.reel.complete
                if stopped and unfinished and not sim.plant.conveyor.running:
                    res.recoveries += 1
                    svc.request_reset()
                    svc.request_reel(reel)
                    await asyncio.sleep(1.0)
                await asyncio.sleep(0.05)
            await task
        except Exception as exc:  # the Result reports it
            res.error = f"{type(exc).__name__}: {exc}"
            svc.stop()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30.0)
        res.safe_at_end = not sim.plant.accelerator.beam_on and not sim.plant.conveyor.running
        res.finished = sc.name in svc.finished_reels
        res.missed_cycles = svc.stats.missed
        with RecordStore(workdir / "records.sqlite") as store:
            known = any(r.reel_id == sc.name for r in store.reels())
            metres = store.metres(sc.name) if known else []
            res.reel_state = store.reel(sc.name).state if known else ""
        truth = sim.plant.truth
        res.burns += len(truth.burns)
        res.metres = len(metres)
        res.contiguous = [m.index for m in metres] == list(range(len(metres)))
        for m in metres:
            res.verdicts[m.verdict.value] = res.verdicts.get(m.verdict.value, 0) + 1
            if m.dose_kgy is None or m.min_dose_kgy is None or m.max_dose_kgy is None:
                continue  # recorded unproven without any dose
            true = truth.dose_kgy(m.index)
            if "gap" in m.causes:
                # A data gap touched it: the dose is an estimate, the bounds the promise
                # (unproven or not).
                if not m.min_dose_kgy <= true <= m.max_dose_kgy:
                    res.outside_bounds.append(m.index)
            elif m.verdict is not Verdict.UNPROVEN:
                res.errors_pct.append(100.0 * (m.dose_kgy - true) / recipe.target_dose_kgy)
            if m.verdict is Verdict.UNPROVEN:
                continue
            inside = recipe.min_dose_kgy <= true <= recipe.max_dose_kgy
            if m.verdict is Verdict.IN_SPEC and not inside:
                res.false_accepts.append(m.index)
            if m.verdict is not Verdict.IN_SPEC and inside:
                res.false_rejects.append(m.index)
    return res


async def run_all(scenarios: list[Scenario], workdir: Path, concurrency: int = 4) -> list[Result]:
    """Run scenarios, `concurrency` at a time in this event loop (each has its own
    simulators, ports, service and records)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(sc: Scenario) -> Result:
        async with sem:
            return await run_scenario(sc, workdir / sc.name)

    return list(await asyncio.gather(*(one(sc) for sc in scenarios)))


def check_against_truth(
    metres: list[StoredMetre], sim: SimulatedLine, cfg: LoadedConfig, length_m: int
) -> dict[str, int]:
    """The records' promises against the simulator's ground truth: every metre recorded
    once; a measured dose within 0.5 % of target, one across a data gap within its
    bounds; no metre in spec that the truth puts out; no burn. The verdict counts."""
    recipe, _ = select_recipe(cfg, None)
    assert [m.index for m in metres] == list(range(length_m)), "metres lost or doubled"
    counts: dict[str, int] = {}
    for m in metres:
        counts[m.verdict.value] = counts.get(m.verdict.value, 0) + 1
        if m.verdict is Verdict.UNPROVEN:
            continue
        true = sim.plant.truth.dose_kgy(m.index)
        assert m.dose_kgy is not None
        if "gap" in m.causes:  # an estimate across a data gap: its bounds are the promise
            assert m.min_dose_kgy is not None
            assert m.max_dose_kgy is not None
            assert m.min_dose_kgy <= true <= m.max_dose_kgy, (m.index, true)
        else:
            assert abs(m.dose_kgy - true) <= 0.005 * recipe.target_dose_kgy, (m.index, true)
        if m.verdict is Verdict.IN_SPEC:
            assert recipe.min_dose_kgy <= true <= recipe.max_dose_kgy, f"false accept {m}"
    assert sim.plant.truth.burns == [], "beam on a standing cable"
    return counts
