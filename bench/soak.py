"""Soak: the line daemon for a long run under random faults, watched for leaks and loss.

Runs the real LineService with its adapters (linectl.daemon.run_with_bridge: metrics
endpoint, MQTT bridge) over Modbus TCP against the bundled simulators (compact test line,
fast recipe, tests/e2e_scenarios.py) and a mosquitto on a free port (tests/broker.py,
with persistence, so a restart keeps the subscriber's session). Reels run back to back:

  - an operator loop starts the next reel when one completes, and when the line has
    stopped short of a reel's end (a latched fault, a lost link) resets and resumes it,
    as the scenario runner does;
  - a fault scheduler (seeded) injects a fault every `--fault-every-s` (+/- 50 %), each
    kind once first (so a short run covers them all), then drawn at random by weight:
    arcs (short ride-through, long, a burst of random arcs), link loss, PLC restarts,
    slow responses, exception storms on either PLC, latched PLC faults (HV, vacuum,
    e-stop, cable break, drive) and broker restarts (SIGTERM: a broker that loses what it
    acknowledged on SIGKILL would measure the broker, not linectl). Two faults never act
    on the same PLC or the broker at once (the simulator's down/up of one server is not
    reentrant), but faults on different parts overlap;
  - a sampler notes every `--sample-s`: this process's RSS (VmRSS), asyncio tasks, open
    file descriptors and sockets, threads, the record store's size on disk and the MQTT
    bridge's queue, backlog and counters (the JSON time series);
  - a subscriber in its own process (paho, MQTT 5, persistent session, QoS 1) takes
    `<prefix>/<line>/records/#` and notes every record's `seq`.

The simulators run in this process (the fault injection and the ground truth need them),
so their tasks, sockets and memory are in the figures too: a leak there shows as well.

At the end every recorded metre of every reel is compared with the simulator's ground
truth (the truth keeps one reel: each reel's truth is taken when the next reel starts):
false accepts (recorded in spec, true dose outside the recipe's limits; goal 0) and
false rejects (recorded out of spec, true dose inside; counted). Every record the store's
outbox holds (seq 1..last) must have reached the subscriber (goal: none missing;
duplicates are counted: delivery is at least once). Growth: after a warm-up, the
second half's maximum of each resource against the first half's (goal: no growth beyond
a small tolerance), and RSS's least-squares slope per hour. Also listed: metres whose
recorded dose is off the truth by more than 0.5 % of target, and each reel's position
error (the ledger's reel coordinate against the truth's, at a standstill): an error there
shifts every later metre's number against the cable it stands for.

    .venv/bin/python bench/soak.py [--minutes 60] [--fault-every-s 20] [--reel-m 40]
        [--sample-s 5] [--warmup-s S] [--seed 1] [--only arc,cnv_restart,...]
        [--json FILE] [--log FILE] [--workdir DIR]

`--smoke`: one minute, a fault every 5 s. The load average is printed with the figures:
the machine's other work shows in the timings, never in the goals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the broker and the compact line are the tests'
sys.path.insert(0, str(ROOT / "bench"))  # the subscriber is telemetry_latency's

import e2e_scenarios as sc  # noqa: E402
import telemetry_latency as tl  # noqa: E402
from broker import TestBroker, mosquitto_binary  # noqa: E402

from linectl.config import Recipe  # noqa: E402
from linectl.core.control import LineState  # noqa: E402
from linectl.core.ledger import Verdict  # noqa: E402
from linectl.daemon import run_with_bridge  # noqa: E402
from linectl.mqtt import CONSUMER, MqttBridge  # noqa: E402
from linectl.service import LineService, ReelRequest  # noqa: E402
from linectl.store import RecordStore  # noqa: E402
from linectl.telemetry import Topics  # noqa: E402
from simulators.server import SimulatedLine  # noqa: E402

# Growth tolerances: what the second half's maximum may exceed the first half's by
# without counting as growth. Each figure is a snapshot at a random moment, so its
# maximum depends on what was in flight then: the bridge publishes a batch of records
# with up to max_inflight tasks at once, a PLC server holds a task per open connection
# and one more while a client reconnects, a broker restart or link loss leaves a socket
# half-closed for a moment. A leak grows without bound, one per reel or per fault, and
# passes any fixed allowance on a long enough run; the slope says which it is.
TOLERANCE = {"tasks": 8, "fds": 6, "sockets": 6, "threads": 2}
OUTLIER_PCT = 0.5
"""A metre whose recorded dose is further than this (% of target) from the truth is listed
(the scenario suite's accuracy goal)."""
RSS_TOLERANCE_MB = 8.0
"""RSS: allocator arenas and SQLite's page cache settle within a few MB of their peak."""


# ---------------------------------------------------------------------- the subscriber


class RecordSubscriber(tl.Subscriber):
    """telemetry_latency's subscriber (its own process, MQTT 5, persistent session, QoS 1)
    on the record topics, tallied by the records' `seq`."""

    def __init__(self, host: str, port: int, topic: str, client_id: str) -> None:
        super().__init__(host, port, topic, client_id, qos=1, persistent=True)
        self._seqs: Counter[int] = Counter()
        self._kinds: Counter[str] = Counter()
        self._bad: list[str] = []

    def _received(self, m: tl.Message) -> None:
        # Tallied at once and not kept: an hour of record payloads held here would count
        # as the service's memory growth, since both share this process.
        if m.topic.endswith("/records/head"):
            return  # the outbox's newest seq, announced: not a record
        try:
            seq = int(json.loads(m.payload)["seq"])
        except (ValueError, KeyError, TypeError) as exc:
            self._bad.append(f"{m.topic} {exc!r}")
            return
        self._seqs[seq] += 1
        self._kinds[m.topic.rsplit("/", 1)[-1]] += 1

    @property
    def seqs(self) -> Counter[int]:
        """How often each record seq arrived."""
        return self._seqs

    @property
    def kinds(self) -> Counter[str]:
        """Records by topic kind (metres, reel, alarm, audit)."""
        return self._kinds

    @property
    def bad(self) -> list[str]:
        """Messages without a usable seq, and failed connects."""
        return self._bad + [d for k, _t, d in self.events if k == "E"]

    @property
    def connects(self) -> int:
        """Sessions the subscriber opened."""
        return sum(k == "C" for k, _t, _d in self.events)

    @property
    def sessions_resumed(self) -> int:
        """Of those, how many found their persistent session on the broker."""
        return sum(k == "C" and d == "1" for k, _t, d in self.events)


# ---------------------------------------------------------------------- probes


def rss_kb() -> int:
    """This process's resident set size, kB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def open_fds() -> tuple[int, int, Counter[str]]:
    """(open fds, of which sockets, count by kind: socket, pipe, anon_inode, file)."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed between the listing and the look
            continue
        kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
        kinds[kind] += 1
    total = sum(kinds.values())
    return total, kinds["socket"], kinds


def task_kinds() -> Counter[str]:
    """The running loop's tasks by coroutine name (what a leak would be made of)."""
    out: Counter[str] = Counter()
    for t in asyncio.all_tasks():
        coro = t.get_coro()
        out[getattr(coro, "__qualname__", type(coro).__name__)] += 1
    return out


def file_bytes(path: Path) -> int:
    """Size of a SQLite database with its WAL and shared-memory files."""
    total = 0
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


class LogWatch(logging.Handler):
    """Counts WARNING and above by logger and message template; keeps ERRORs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.errors: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname} {record.name}: {record.msg}"] += 1
        if record.levelno >= logging.ERROR:
            self.errors.append(
                {
                    "logger": record.name,
                    "message": record.getMessage()[:500],
                    "exc": None
                    if record.exc_info is None
                    else logging.Formatter().formatException(record.exc_info)[-2000:],
                }
            )


# ---------------------------------------------------------------------- the line


@dataclass
class Options:
    """What one soak run does."""

    minutes: float = 60.0
    fault_every_s: float = 20.0
    reel_m: float = 40.0
    sample_s: float = 5.0
    seed: int = 1
    warmup_s: float | None = None  # default: a quarter of the run, at most 5 minutes
    faults: tuple[str, ...] | None = None  # default: all of FAULTS


@dataclass
class ReelTruth:
    """One reel's ground truth, taken when the next reel started (or at the end)."""

    reel_id: str
    doses_kgy: dict[int, float]
    complete_m: int
    burns: int


@dataclass
class Ctx:
    """What a fault acts on."""

    sim: SimulatedLine
    broker: TestBroker
    svc: LineService
    rng: random.Random


FaultFn = Callable[[Ctx], Awaitable[str]]


def _u(ctx: Ctx, lo: float, hi: float) -> float:
    return round(ctx.rng.uniform(lo, hi), 3)


async def _arc(ctx: Ctx) -> str:
    d = _u(ctx, 0.05, 0.8)  # within the ride-through
    return f"{d} s" + ("" if ctx.sim.faults.arc(d) else " (HV off: ignored)")


async def _long_arc(ctx: Ctx) -> str:
    d = _u(ctx, 1.5, 4.0)  # longer than the ride-through: the line slows or stops
    return f"{d} s" + ("" if ctx.sim.faults.arc(d) else " (HV off: ignored)")


async def _arc_burst(ctx: Ctx) -> str:
    rate, d = _u(ctx, 600.0, 3600.0), _u(ctx, 5.0, 20.0)
    ctx.sim.faults.random_arcs(rate)
    try:
        await asyncio.sleep(d)
    finally:
        ctx.sim.faults.random_arcs(0.0)
    return f"{rate:.0f}/h for {d} s"


def _link_loss(plc: Any) -> FaultFn:
    async def fault(ctx: Ctx) -> str:
        d = _u(ctx, 0.3, 3.0)
        await ctx.sim.faults.link_loss(plc, d)
        return f"{d} s"

    return fault


def _restart(plc: Any) -> FaultFn:
    async def fault(ctx: Ctx) -> str:
        d = _u(ctx, 0.2, 2.0)
        await ctx.sim.restart(plc, down_s=d)
        return f"down {d} s"

    return fault


def _slow(plc: Any) -> FaultFn:
    async def fault(ctx: Ctx) -> str:
        # Up to 0.15 s: some answers come after the link's 0.2 s timeout.
        mean, d = _u(ctx, 0.01, 0.12), _u(ctx, 2.0, 8.0)
        ctx.sim.faults.delay(plc, mean_s=mean, jitter_s=0.03, duration_s=d)
        await asyncio.sleep(d)
        return f"{mean} +/- 0.03 s for {d} s"

    return fault


def _exceptions(plc: Any) -> FaultFn:
    async def fault(ctx: Ctx) -> str:
        code, d = ctx.rng.choice([4, 6]), _u(ctx, 0.2, 2.0)
        ctx.sim.faults.exceptions(plc, code, d)
        await asyncio.sleep(d)
        return f"code {code} for {d} s"

    return fault


def _latch(plc: Any, codes: tuple[int, ...]) -> FaultFn:
    async def fault(ctx: Ctx) -> str:
        code = ctx.rng.choice(codes)
        ctx.sim.faults.latch(plc, code)
        return f"code {code}"

    return fault


async def _broker_restart(ctx: Ctx) -> str:
    d = _u(ctx, 0.5, 5.0)
    await ctx.broker.restart(down_s=d)
    return f"down {d} s"


# name -> (what it acts on, weight, fault). Weights: the common events of a real line
# (short arcs, slow answers) more often than restarts and latched faults.
FAULTS: dict[str, tuple[str, float, FaultFn]] = {
    "arc": ("accelerator", 3.0, _arc),
    "long_arc": ("accelerator", 1.0, _long_arc),
    "arc_burst": ("accelerator", 1.0, _arc_burst),
    "acc_link_loss": ("accelerator", 1.0, _link_loss("accelerator")),
    "cnv_link_loss": ("conveyor", 1.0, _link_loss("conveyor")),
    "acc_restart": ("accelerator", 1.0, _restart("accelerator")),
    "cnv_restart": ("conveyor", 1.0, _restart("conveyor")),
    "acc_slow": ("accelerator", 1.0, _slow("accelerator")),
    "cnv_slow": ("conveyor", 1.0, _slow("conveyor")),
    "acc_exceptions": ("accelerator", 1.0, _exceptions("accelerator")),
    "cnv_exceptions": ("conveyor", 1.0, _exceptions("conveyor")),
    "acc_latched": ("accelerator", 0.5, _latch("accelerator", (2, 3, 4, 5))),
    "cnv_latched": ("conveyor", 0.5, _latch("conveyor", (1, 2, 3, 4))),
    "broker_restart": ("broker", 1.5, _broker_restart),
}


class Soak:
    """One soak run: start with `run()`; the result is a JSON-ready dict."""

    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.rng = random.Random(opts.seed)
        self.samples: list[dict[str, Any]] = []
        self.task_kinds_at: dict[str, dict[str, int]] = {}
        self.fault_log: list[dict[str, Any]] = []
        self.truths: dict[str, ReelTruth] = {}
        self.reel_ids: list[str] = []
        self.resumes = 0
        self.resets = 0
        self.closed_unfinished: list[str] = []
        self.unhandled: list[str] = []
        self.watch = LogWatch()
        self._truth_reel: str | None = None
        self._t0 = 0.0
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._fault_tasks: set[asyncio.Task[None]] = set()
        self._bridge: MqttBridge  # set once run_with_bridge has made it
        self.burns_seen = 0
        self.position_err_m: dict[str, float] = {}
        self._still_cycles = 0

    # ------------------------------------------------------------------ hooks

    def _on_reel_start(self, sim: SimulatedLine, reel_id: str, counter_m: float) -> None:
        # The truth holds one reel: keep the one that ends here before it is cleared.
        self._keep_truth(sim)
        sim.plant.start_reel(counter_m)
        self._truth_reel = reel_id

    def _keep_truth(self, sim: SimulatedLine) -> None:
        if self._truth_reel is None:
            return
        truth = sim.plant.truth
        self.truths[self._truth_reel] = ReelTruth(
            self._truth_reel,
            dict(truth.bins),
            len(truth.complete_metres()),
            len(truth.burns),
        )

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.unhandled.append(f"{context.get('message')}: {exc!r}")
        loop.default_exception_handler(context)

    def _thread_exception(self, args: threading.ExceptHookArgs) -> None:
        self.unhandled.append(f"thread {args.thread}: {args.exc_value!r}")

    # ------------------------------------------------------------------ run

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        loop = asyncio.get_running_loop()
        old_handler = loop.get_exception_handler()
        old_hook = threading.excepthook
        loop.set_exception_handler(self._loop_exception)
        threading.excepthook = self._thread_exception
        logging.getLogger().addHandler(self.watch)
        try:
            return await self._run(opts)
        finally:
            logging.getLogger().removeHandler(self.watch)
            threading.excepthook = old_hook
            loop.set_exception_handler(old_handler)

    async def _run(self, opts: Options) -> dict[str, Any]:
        broker = TestBroker(self.workdir / "broker", persistence=True)
        await broker.start()
        cfg, recipe, recipe_path = tl.line_config(self.workdir, broker)
        topics = Topics.for_line(cfg.line.mqtt.topic_prefix, cfg.line.line_id)
        sub = RecordSubscriber(
            broker.host, broker.port, f"{topics.base}/records/#", f"soak-records-{os.getpid()}"
        )
        res: dict[str, Any] = {
            "options": {
                "minutes": opts.minutes,
                "fault_every_s": opts.fault_every_s,
                "reel_m": opts.reel_m,
                "sample_s": opts.sample_s,
                "seed": opts.seed,
            },
            "broker": f"{broker.kind} on 127.0.0.1:{broker.port}",
            "cycle_period_s": cfg.line.cycle_period_s,
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        }
        try:
            await sub.start()
            async with SimulatedLine(cfg, seed=opts.seed, k_dose_true=sc.TRUE_K) as sim:
                svc = LineService(cfg, recipe, recipe_path, **sc.endpoints(cfg, sim))
                svc.on_reel_start.append(lambda r, c: self._on_reel_start(sim, r, c))
                svc.observers.insert(0, lambda s: self._watch(s, sim))
                task = asyncio.create_task(
                    run_with_bridge(svc, exit_when_done=False, metrics_port=0), name="soak-line"
                )
                ctx = Ctx(sim, broker, svc, random.Random(opts.seed + 1))
                try:
                    await self._phase(ctx, task, res)
                finally:
                    svc.stop()
                    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 120.0)
                if task.exception() is not None:
                    raise RuntimeError("the line service failed") from task.exception()
                self._keep_truth(sim)
                res["bridge_end"] = self._bridge_stats(self._bridge)
                res["reels"] = self._reels(svc, recipe)
                res["records"] = await self._delivery(svc.store_path, sub)
                res["missed_cycles"] = svc.stats.missed
                res["cycles"] = svc.stats.cycles
                res["links"] = {
                    link.name: {
                        "connects": link.stats.connects,
                        "errors": dict(link.stats.errors),
                    }
                    for link in (svc.acc, svc.cnv)
                }
        finally:
            await sub.stop()
            await broker.stop()
        res["subscriber"] = {
            "connects": sub.connects,
            "sessions_resumed": sub.sessions_resumed,
            "bad": sub.bad[:20],
            "by_kind": dict(sub.kinds),
        }
        res["samples"] = self.samples
        res["task_kinds"] = self.task_kinds_at
        res["faults"] = self.fault_log
        res["fault_counts"] = dict(Counter(f["name"] for f in self.fault_log))
        res["operator"] = {
            "resets": self.resets,
            "resumes": self.resumes,
            "closed_unfinished": self.closed_unfinished,
        }
        res["growth"] = growth(self.samples, self._warmup_s())
        res["unhandled"] = self.unhandled
        res["beam_on_line_stopped_cycles"] = self.burns_seen
        res["errors_logged"] = self.watch.errors
        res["warnings"] = dict(self.watch.counts.most_common(40))
        res["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        res["goals"] = goals(res)
        return res

    def _warmup_s(self) -> float:
        if self.opts.warmup_s is not None:
            return self.opts.warmup_s
        return min(300.0, 0.25 * self.opts.minutes * 60.0)

    def _watch(self, svc: LineService, sim: SimulatedLine) -> None:
        """Every cycle: beam on a stopped line, and the reel position's error."""
        # Beam on while the conveyor does not run: a burn in the making (the truth's
        # burns are the authority; this one catches it between reels as well).
        if sim.plant.accelerator.beam_on and not sim.plant.conveyor.running:
            self.burns_seen += 1
        # The ledger's reel coordinate at the counter against the truth's, compared only
        # after a few cycles at a standstill with good conveyor data (while moving, or
        # while the link is down, the two differ by the data's age). An error here shifts
        # every later metre's number against the cable it stands for.
        ledger, reel, cnv = svc.ledger, svc.ctl.reel, svc.last_cnv
        still = (
            sim.plant.conveyor.speed_m_min == 0.0
            and cnv is not None
            and cnv.ok
            and cnv.value("speed") == 0
        )
        self._still_cycles = self._still_cycles + 1 if still else 0
        if (
            self._still_cycles >= 5
            and ledger is not None
            and ledger.position_m is not None
            and reel is not None
            and reel.plan.reel_id == self._truth_reel
        ):
            truth = sim.plant.truth
            err = ledger.position_m - (truth.path_m - truth.l0_m)
            worst = self.position_err_m.get(reel.plan.reel_id, 0.0)
            if abs(err) > abs(worst):
                self.position_err_m[reel.plan.reel_id] = err

    async def _phase(self, ctx: Ctx, task: asyncio.Task[None], res: dict[str, Any]) -> None:
        svc = ctx.svc
        self._t0 = time.monotonic()
        await sc.wait_for(lambda: find_bridge_or_none(svc) is not None, 30.0, "the bridge")
        self._bridge = tl.find_bridge(svc)
        end = self._t0 + self.opts.minutes * 60.0
        helpers = [
            asyncio.create_task(self._operator(ctx, end), name="soak-operator"),
            asyncio.create_task(self._sampler(ctx, end), name="soak-sampler"),
            asyncio.create_task(self._faults(ctx, end), name="soak-faults"),
        ]
        try:
            while time.monotonic() < end:
                if task.done():
                    raise RuntimeError(
                        "the line service returned during the soak"
                    ) from task.exception()
                for h in helpers:
                    if h.done() and h.exception() is not None:
                        raise RuntimeError(f"{h.get_name()} failed") from h.exception()
                await asyncio.sleep(0.5)
        finally:
            for h in helpers:
                h.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            # Faults in flight run to their end (each is bounded): a broker or PLC left
            # down would skew the end of the run.
            if self._fault_tasks:
                await asyncio.wait(set(self._fault_tasks), timeout=60.0)
            ctx.sim.faults.random_arcs(0.0)
            if not ctx.broker.running:
                await ctx.broker.start()
        res["soak_s"] = round(time.monotonic() - self._t0, 1)
        # The last records go out before the service stops: wait for the bridge to be
        # connected and its backlog to drain, so that the end is measured, not a race.
        bridge = self._bridge
        with contextlib.suppress(TimeoutError):
            await sc.wait_for(
                lambda: bridge.stats.connected and bridge.stats.replay_backlog == 0,
                60.0,
                "the bridge to catch up",
            )

    # ------------------------------------------------------------------ the operator

    async def _operator(self, ctx: Ctx, end: float) -> None:
        """Start reels back to back; reset and resume a reel the line stopped short of."""
        svc, sim = ctx.svc, ctx.sim
        n = 0
        current: str | None = None
        seen_loaded = False
        last_action = -math.inf
        while time.monotonic() < end:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            state = svc.ctl.state
            reel = svc.ctl.reel
            if current is not None and reel is not None and reel.plan.reel_id == current:
                seen_loaded = True
            done = current is not None and current in svc.finished_reels
            if current is not None and not done and seen_loaded and reel is None:
                # Closed without completing (the service gave up on its position).
                self.closed_unfinished.append(current)
                done = True
            if now - last_action < 1.0:
                continue
            if state is LineState.FAULT or (state is LineState.IDLE and svc.ctl.alarms):
                if not sim.plant.conveyor.running:
                    svc.request_reset()
                    self.resets += 1
                    last_action = now
                continue
            if current is None or done:
                n += 1
                current = f"SOAK-{n:04d}"
                seen_loaded = False
                self.reel_ids.append(current)
                svc.request_reel(ReelRequest(current, self.opts.reel_m, "soak"))
                last_action = now
                continue
            stopped = state in (LineState.IDLE, LineState.READY)
            unfinished = reel is not None and not reel.complete and reel.plan.reel_id == current
            if stopped and unfinished and not sim.plant.conveyor.running:
                self.resumes += 1
                svc.request_reel(ReelRequest(current, self.opts.reel_m, "soak"))
                last_action = now

    # ------------------------------------------------------------------ faults

    async def _faults(self, ctx: Ctx, end: float) -> None:
        names = list(self.opts.faults or FAULTS)
        weights = [FAULTS[n][1] for n in names]
        # The first fault after the first reel runs: a fault before the first reel tests
        # the start-up, which the other suites do.
        await sc.wait_for(
            lambda: ctx.svc.ledger is not None and ctx.svc.ctl.state is LineState.RUNNING,
            120.0,
            "the first reel to run",
        )
        # Every kind once first (in a seeded order), so that even a short run covers
        # them all; then weighted at random.
        first = list(names)
        self.rng.shuffle(first)
        while True:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.opts.fault_every_s)
            if time.monotonic() > end - 2.0:
                return
            free = [
                (n, w)
                for n, w in zip(names, weights, strict=True)
                if FAULTS[n][0] not in self._busy
            ]
            if not free:
                continue
            unused = [n for n in first if FAULTS[n][0] not in self._busy]
            if unused:
                name = unused[0]
                first.remove(name)
            else:
                name = self.rng.choices([n for n, _ in free], [w for _, w in free])[0]
            target, _, fn = FAULTS[name]
            t = asyncio.create_task(self._one_fault(ctx, name, target, fn), name=f"fault-{name}")
            self._busy[target] = t
            self._fault_tasks.add(t)
            t.add_done_callback(self._fault_tasks.discard)

    async def _one_fault(self, ctx: Ctx, name: str, target: str, fn: FaultFn) -> None:
        entry: dict[str, Any] = {
            "t_s": round(time.monotonic() - self._t0, 2),
            "name": name,
            "state": ctx.svc.ctl.state.value,
            "reel": ctx.svc.ctl.reel.plan.reel_id if ctx.svc.ctl.reel else None,
            "position_m": None
            if ctx.svc.ledger is None or ctx.svc.ledger.position_m is None
            else round(ctx.svc.ledger.position_m, 2),
        }
        self.fault_log.append(entry)
        try:
            entry["detail"] = await fn(ctx)
        except asyncio.CancelledError:
            entry["detail"] = "cut short at the end of the soak"
            raise
        except Exception as exc:  # a fault that could not be injected is reported, not fatal
            entry["error"] = repr(exc)
        finally:
            self._busy.pop(target, None)
            entry["took_s"] = round(time.monotonic() - self._t0 - entry["t_s"], 2)

    # ------------------------------------------------------------------ sampling

    async def _sampler(self, ctx: Ctx, end: float) -> None:
        store_path = ctx.svc.store_path
        mid_noted = False
        while True:
            s = self._sample(ctx, store_path)
            self.samples.append(s)
            if "start" not in self.task_kinds_at and s["t_s"] >= self._warmup_s():
                self.task_kinds_at["start"] = dict(task_kinds())
            if not mid_noted and time.monotonic() >= (self._t0 + end) / 2:
                self.task_kinds_at["middle"] = dict(task_kinds())
                mid_noted = True
            if time.monotonic() + self.opts.sample_s > end:
                self.task_kinds_at["end"] = dict(task_kinds())
                return
            await asyncio.sleep(self.opts.sample_s)

    def _sample(self, ctx: Ctx, store_path: Path) -> dict[str, Any]:
        svc = ctx.svc
        fds, sockets, _ = open_fds()
        b = self._bridge.stats
        return {
            "t_s": round(time.monotonic() - self._t0, 2),
            "rss_kb": rss_kb(),
            "tasks": len(asyncio.all_tasks()),
            "fds": fds,
            "sockets": sockets,
            "threads": threading.active_count(),
            "store_bytes": file_bytes(store_path),
            "state": svc.ctl.state.value,
            "reels_done": len(svc.finished_reels),
            "records_written": svc.records_written,
            "cycles": svc.stats.cycles,
            "missed": svc.stats.missed,
            "mqtt_connected": b.connected,
            "mqtt_queue": len(self._bridge.queue),
            "mqtt_backlog": b.replay_backlog,
            "mqtt_published": b.published,
            "mqtt_records": b.records_published,
            "mqtt_dropped": b.dropped,
            "broker_up": ctx.broker.running,
        }

    @staticmethod
    def _bridge_stats(bridge: MqttBridge) -> dict[str, Any]:
        s = bridge.stats
        return {
            "connects": s.connects,
            "disconnects": s.disconnects,
            "published": s.published,
            "live_published": s.live_published,
            "records_published": s.records_published,
            "dropped": s.dropped,
            "replay_backlog": s.replay_backlog,
        }

    # ------------------------------------------------------------------ the verdicts

    def _reels(self, svc: LineService, recipe: Recipe) -> list[dict[str, Any]]:
        out = []
        with RecordStore(svc.store_path) as store:
            known = {r.reel_id: r for r in store.reels()}
            for reel_id in self.reel_ids:
                rec = known.get(reel_id)
                metres = store.metres(reel_id) if rec is not None else []
                truth = self.truths.get(reel_id)
                row: dict[str, Any] = {
                    "reel_id": reel_id,
                    "state": rec.state if rec is not None else "never opened",
                    "finished": reel_id in svc.finished_reels,
                    "metres": len(metres),
                    "contiguous": [m.index for m in metres] == list(range(len(metres))),
                    "verdicts": dict(Counter(m.verdict.value for m in metres)),
                    "burns": truth.burns if truth is not None else 0,
                    "false_accepts": [],
                    "false_rejects": [],
                    "max_err_pct": None,
                    "position_err_m": _r(self.position_err_m.get(reel_id), 4),
                    "outliers": [],
                }
                errs = []
                for m in metres:
                    if m.verdict is Verdict.UNPROVEN or m.dose_kgy is None or truth is None:
                        continue
                    true = truth.doses_kgy.get(m.index, 0.0)
                    err = 100.0 * (m.dose_kgy - true) / recipe.target_dose_kgy
                    errs.append(err)
                    if abs(err) > OUTLIER_PCT:
                        row["outliers"].append(
                            {
                                "index": m.index,
                                "verdict": m.verdict.value,
                                "recorded": round(m.dose_kgy, 3),
                                "true": round(true, 3),
                            }
                        )
                    inside = recipe.min_dose_kgy <= true <= recipe.max_dose_kgy
                    if m.verdict is Verdict.IN_SPEC and not inside:
                        row["false_accepts"].append(
                            {"index": m.index, "recorded": m.dose_kgy, "true": round(true, 3)}
                        )
                    if m.verdict is not Verdict.IN_SPEC and inside:
                        row["false_rejects"].append(m.index)
                if errs:
                    row["max_err_pct"] = round(max(abs(e) for e in errs), 4)
                row["compared"] = len(errs)
                out.append(row)
        return out

    async def _delivery(self, store_path: Path, sub: RecordSubscriber) -> dict[str, Any]:
        with RecordStore(store_path) as store:
            last = store.outbox_last_seq()
            cursor = store.outbox_cursor(CONSUMER)
        expected = set(range(1, last + 1))
        # QoS 1 on to the subscriber: give the broker a moment to hand over the tail.
        with contextlib.suppress(TimeoutError):
            await sc.wait_for(lambda: expected <= set(sub.seqs), 20.0, "the last records")
        got = set(sub.seqs)
        missing = sorted(expected - got)
        return {
            "outbox_last_seq": last,
            "bridge_cursor": cursor,
            "received_unique": len(got & expected),
            "missing": len(missing),
            "missing_first": missing[:20],
            "duplicates": sum(n - 1 for n in sub.seqs.values() if n > 1),
            "unexpected": len(got - expected),
        }


def find_bridge_or_none(svc: LineService) -> MqttBridge | None:
    """The bridge, or None before run_with_bridge has made it."""
    try:
        return tl.find_bridge(svc)
    except RuntimeError:
        return None


# ---------------------------------------------------------------------- figures


def _slope_per_h(ts: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over ts (s), per hour."""
    if len(ts) < 3:
        return None
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return None
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var * 3600.0


def _p90(xs: list[float]) -> float:
    """The 90th percentile, nearest rank."""
    ordered = sorted(xs)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Per resource, after the warm-up: each half's max, 90th percentile and median, the
    growth, and the slope per hour (RSS in MB).

    The growth of RSS is that of the max (memory does not come and go in bursts); that
    of a count (tasks, fds, sockets, threads) is that of the 90th percentile: a sample
    is a snapshot at a random moment, and one that catches a burst of publishes in
    flight (a task each) moved the max by 12 in a CI run where the medians were equal.
    A leak moves the whole distribution, the 90th percentile with it."""
    post = [s for s in samples if s["t_s"] >= warmup_s]
    out: dict[str, Any] = {"warmup_s": warmup_s, "samples": len(post)}
    if len(post) < 4:
        out["error"] = "too few samples after the warm-up to compare halves"
        return out
    half = len(post) // 2
    a, b = post[:half], post[half:]
    for key in ("rss_kb", "tasks", "fds", "sockets", "threads"):
        scale = 1024.0 if key == "rss_kb" else 1.0
        name = "rss_mb" if key == "rss_kb" else key

        def col(xs: list[dict[str, Any]], k: str = key, d: float = scale) -> list[float]:
            return [x[k] / d for x in xs]

        first, second = col(a), col(b)
        grew = max(second) - max(first) if key == "rss_kb" else _p90(second) - _p90(first)
        out[name] = {
            "first_max": round(max(first), 2),
            "second_max": round(max(second), 2),
            "first_p90": round(_p90(first), 2),
            "second_p90": round(_p90(second), 2),
            "growth": round(grew, 2),
            "first_median": round(statistics.median(first), 2),
            "second_median": round(statistics.median(second), 2),
            "slope_per_h": _r(_slope_per_h([x["t_s"] for x in post], col(post)), 2),
        }
    return out


def _r(x: float | None, nd: int) -> float | None:
    return None if x is None else round(x, nd)


def own_errors(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The ERROR records linectl logged (libraries' own are listed, not counted: paho logs
    a broker restart's dropped socket at ERROR, and the bridge reports the same loss)."""
    return [e for e in res.get("errors_logged", []) if e["logger"].split(".")[0] == "linectl"]


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The soak's goals, each with its figure and whether it was met."""
    reels = res.get("reels", [])
    rec = res.get("records", {})
    g = res.get("growth", {})
    fa = sum(len(r["false_accepts"]) for r in reels)
    out = [
        {"name": "false accepts (metres)", "measured": fa, "goal": "0", "met": fa == 0},
        {
            "name": "records missing at the subscriber",
            "measured": rec.get("missing"),
            "goal": "0",
            "met": rec.get("missing") == 0 and rec.get("outbox_last_seq", 0) > 0,
        },
        {
            "name": "unhandled exceptions",
            "measured": len(res.get("unhandled", [])),
            "goal": "0",
            "met": not res.get("unhandled"),
        },
        {
            "name": "ERROR log records from linectl",
            "measured": len(own_errors(res)),
            "goal": "0",
            "met": not own_errors(res),
        },
    ]
    burns = sum(r["burns"] for r in reels) + res.get("beam_on_line_stopped_cycles", 0)
    out.append(
        {
            "name": "burns (truth; beam on a stopped line)",
            "measured": burns,
            "goal": "0",
            "met": burns == 0,
        }
    )
    if "error" in g or "rss_mb" not in g:
        out.append({"name": "growth", "measured": g.get("error"), "goal": "-", "met": False})
        return out
    rss = g["rss_mb"]
    out.append(
        {
            "name": "RSS max growth, MB (2nd vs 1st half)",
            "measured": rss["growth"],
            "goal": f"<= {RSS_TOLERANCE_MB:g}",
            "met": rss["growth"] <= RSS_TOLERANCE_MB,
        }
    )
    for key, tol in TOLERANCE.items():
        f = g[key]
        out.append(
            {
                "name": f"{key} p90 growth (2nd vs 1st half)",
                "measured": f["growth"],
                "goal": f"<= {tol}",
                "met": f["growth"] <= tol,
            }
        )
    return out


# ---------------------------------------------------------------------- output


def print_table(res: dict[str, Any]) -> None:
    reels = res["reels"]
    rec = res["records"]
    g = res["growth"]
    finished = sum(r["finished"] for r in reels)
    metres = sum(r["metres"] for r in reels)
    verdicts: Counter[str] = Counter()
    for r in reels:
        verdicts.update(r["verdicts"])
    fr = sum(len(r["false_rejects"]) for r in reels)
    errs = [r["max_err_pct"] for r in reels if r["max_err_pct"] is not None]
    print(
        f"soak {res['soak_s']:.0f} s, cycle {res['cycle_period_s']:g} s, "
        f"{res['cycles']} cycles, {res['missed_cycles']} missed; broker {res['broker']}"
    )
    print(
        f"reels: {len(reels)} ({finished} finished, {len(reels) - finished} unfinished at the "
        f"end or closed), {metres} metres; verdicts {dict(verdicts)}"
    )
    print(
        f"compared with truth: {sum(r['compared'] for r in reels)} metres, false rejects {fr}, "
        f"largest dose error {max(errs) if errs else float('nan'):.3f} % of target"
    )
    op = res["operator"]
    print(
        f"operator: {op['resets']} resets, {op['resumes']} resumes, "
        f"closed unfinished {op['closed_unfinished'] or 'none'}"
    )
    print(
        "faults: " + ", ".join(f"{k} {v}" for k, v in sorted(res["fault_counts"].items())) or "none"
    )
    print(
        f"records: outbox 1..{rec['outbox_last_seq']}, received {rec['received_unique']}, "
        f"missing {rec['missing']}, duplicates {rec['duplicates']}, bridge cursor "
        f"{rec['bridge_cursor']}; bridge connects {res['bridge_end']['connects']}, live "
        f"dropped {res['bridge_end']['dropped']}"
    )
    samples = res["samples"]
    if samples:
        mb = samples[-1]["store_bytes"] / 1e6
        print(
            f"record store {mb:.2f} MB at the end ({mb * 1000 / max(1, len(reels)):.0f} kB per "
            f"reel); MQTT backlog max {max(x['mqtt_backlog'] for x in samples)} records, "
            f"queue max {max(x['mqtt_queue'] for x in samples)} values"
        )
    if "error" not in g:
        print()
        head = (
            f"{'resource':10} {'1st max':>9} {'2nd max':>9} {'growth':>8} "
            f"{'1st med':>9} {'2nd med':>9} {'slope/h':>9}"
        )
        print(f"after a {g['warmup_s']:.0f} s warm-up, {g['samples']} samples:")
        print(head)
        print("-" * len(head))
        for key in ("rss_mb", "tasks", "fds", "sockets", "threads"):
            f = g[key]
            print(
                f"{key:10} {f['first_max']:>9} {f['second_max']:>9} {f['growth']:>8} "
                f"{f['first_median']:>9} {f['second_median']:>9} {f['slope_per_h']!s:>9}"
            )
    print()
    print(f"{'goal':42} {'measured':>10}  {'goal':>8}  met")
    for row in res["goals"]:
        print(
            f"{row['name']:42} {row['measured']!s:>10}  {row['goal']:>8}  "
            f"{'yes' if row['met'] else 'NO'}"
        )
    others = Counter(
        f"{e['logger']}: {e['message']}" for e in res["errors_logged"] if e not in own_errors(res)
    )
    for e in own_errors(res)[:10]:
        print(f"  ERROR {e['logger']}: {e['message']}")
    for text, n in others.most_common(5):
        print(f"  (library) ERROR {text} x{n}")
    for u in res["unhandled"][:10]:
        print(f"  unhandled: {u}")
    for r in reels:
        for f in r["false_accepts"][:5]:
            print(f"  false accept: {r['reel_id']} metre {f}")
    shifted = [
        r for r in reels if r["position_err_m"] is not None and abs(r["position_err_m"]) > 0.05
    ]
    outliers = sum(len(r["outliers"]) for r in reels)
    print(
        f"metres off the truth by more than {OUTLIER_PCT:g} % of target: {outliers}; reels whose "
        f"position at a standstill was off the truth by more than 5 cm: "
        + (", ".join(f"{r['reel_id']} {r['position_err_m']:+.3f} m" for r in shifted) or "none")
    )
    print(
        "load average (1, 5, 15 min): "
        f"start {res['load_avg_start']}, end {res['load_avg_end']}; {os.cpu_count()} CPUs"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the faulted run")
    ap.add_argument("--fault-every-s", type=float, default=20.0, help="mean time between faults")
    ap.add_argument("--reel-m", type=float, default=40.0, help="length of each reel, m")
    ap.add_argument("--sample-s", type=float, default=5.0, help="resource sampling period, s")
    ap.add_argument(
        "--warmup-s",
        type=float,
        help="ignored by the growth figures (default: a quarter of the run, at most 300 s)",
    )
    ap.add_argument("--seed", type=int, default=1, help="fault schedule and plant seed")
    ap.add_argument("--only", help="comma-separated fault names (default: all)")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--log", type=Path, help="write the daemon's INFO log here")
    ap.add_argument(
        "--workdir",
        type=Path,
        help="keep the records, broker and config here (default: a temporary directory, removed)",
    )
    ap.add_argument("--smoke", action="store_true", help="one minute, a fault every 5 s")
    args = ap.parse_args(argv)
    if args.smoke:
        args.minutes, args.fault_every_s, args.reel_m, args.sample_s = 1.0, 5.0, 15.0, 2.0
    for name in ("minutes", "fault_every_s", "reel_m", "sample_s"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    if args.warmup_s is not None and args.warmup_s < 0:
        ap.error(f"--warmup-s must not be negative, not {args.warmup_s}")
    faults: tuple[str, ...] | None = None
    if args.only:
        faults = tuple(args.only.split(","))
        unknown = set(faults) - set(FAULTS)
        if unknown:
            ap.error(f"unknown fault(s): {', '.join(sorted(unknown))}; known: {', '.join(FAULTS)}")
    if mosquitto_binary() is None:
        # The embedded fallback keeps no sessions across a restart: delivery could not be
        # measured across broker restarts.
        print("bench/soak.py needs mosquitto (/usr/sbin/mosquitto)", file=sys.stderr)
        return 2
    opts = Options(
        args.minutes,
        args.fault_every_s,
        args.reel_m,
        args.sample_s,
        args.seed,
        args.warmup_s,
        faults,
    )
    handler: logging.Handler | None = None
    if args.log:
        handler = logging.FileHandler(args.log, mode="w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    t0 = time.monotonic()
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            res = asyncio.run(Soak(opts, args.workdir).run())
        else:
            with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
                res = asyncio.run(Soak(opts, Path(tmp)).run())
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    res["took_s"] = round(time.monotonic() - t0, 1)
    print_table(res)
    print(f"took {res['took_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
