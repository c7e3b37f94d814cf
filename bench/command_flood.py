"""An operator's command under a command flood (issue 10, item 2), through a real Mosquitto.

The line runs in this process: the real LineService and its MqttBridge, wired as in
tests/test_mqtt_flood.py::running_line (roles {"operator": ["*"]}, identities "op-1" and
"op-2", the daemon's refusal window), over Modbus TCP against the bundled simulators in
their own process (`python -m simulators`), with a mosquitto of its own on a free port
(tests/broker.py). The line is READY, no reel (so an authorised `stop` changes nothing:
it is answered NAK `nothing to stop`). Everything that talks to the line from outside is
a separate process (paho, MQTT 5), so that its CPU and memory are not the line's and it
can keep its rate on its own core:

  - "op-1", the operator: every `--interval` (0.5 s) publishes `ack_alarm` (alarm "*",
    a unique request_id; the NAK "no alarm" is an answer too) to
    `<base>/cmd/ack_alarm/op-1`, QoS 1, and times publish -> its answer on
    `<base>/response/op-1`, matched by request_id, on its own monotonic clock;
  - the flood, `--rate` (1000) QoS 1 messages a second, paced, from one client.

Scenarios, each measured for `--seconds` (20), one after the other on the same line (the
daemon does not restart between floods either):

  baseline    no flood;
  intruder    `stop` commands from "intruder", a sender with no role;
  authorised  `stop` commands from "op-2", an authorised operator.

The flood starts `--warmup-s` (1 s) before the measured window and stops with it; op-1
then has `--grace-s` (5 s) for its last answers (one still missing is "unanswered"), and
the line `--settle-s` (3 s) before its memory is read again. Per scenario: op-1's answer
latency p50/p99/max, count and unanswered; the control cycle's lateness p50/p99/max and
missed cycles (svc.stats); the flood rate achieved (publisher: PUBACKed messages a
second over its window; linectl: command messages its bridge took off the connection a
second, measured window); this process's CPU; its RSS (psutil) before the flood, the
peak while it ran, and after the settle; the audit rows written.

Goals (issue 10, item 2): under a 1000 msg/s flood from another identity, an operator's
command is answered within one control cycle (`cycle_period_s` of the configuration) +
50 ms, p99, none unanswered; cycle lateness and memory unchanged against the baseline,
held here as lateness p99 within +LATENESS_TOL_MS of the baseline's, missed cycles no
more than the baseline's, and RSS after the settle within +RSS_TOL_MB of its value before
the flood.

    .venv/bin/python bench/command_flood.py [--seconds 20] [--rate 1000] [--interval 0.5]
        [--scenarios baseline,intruder,authorised] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the broker and the compact line are the tests'
sys.path.insert(0, str(ROOT / "bench"))  # benchlib, the simulator process

import e2e_scenarios as sc  # noqa: E402
from benchlib import host_facts, pct  # noqa: E402
from broker import TestBroker  # noqa: E402
from control_cycle import SimProcess  # noqa: E402

from linectl.config import MqttConfig, load_config  # noqa: E402
from linectl.core.control import LineState  # noqa: E402
from linectl.mqtt import MqttBridge  # noqa: E402
from linectl.service import LineService, select_recipe  # noqa: E402
from linectl.telemetry import Topics  # noqa: E402

SCENARIOS: dict[str, tuple[str | None, str]] = {
    # name: (flood sender or None, what it is)
    "baseline": (None, "no flood"),
    "intruder": ("intruder", "QoS 1 `stop` from a sender with no role"),
    "authorised": ("op-2", "QoS 1 `stop` from an authorised operator (op-2)"),
}
GOAL_EXTRA_MS = 50.0  # answered within one cycle + 50 ms (p99)
LATENESS_TOL_MS = 1.0  # "cycle lateness unchanged": p99 within this of the baseline's
RSS_TOL_MB = 5.0  # "memory unchanged": RSS after the settle within this of before

# The clients, each in its own process (paho, MQTT 5, its network loop in a thread).
# Both print READY once subscribed, start on a line "go" on stdin, and end with one line
# RESULT <json>.
#   flood <host> <port> <topic> <response topic> <rate> <seconds>
#   op    <host> <port> <cmd topic> <response topic> <interval> <seconds> <grace> <tag>
CLIENT = r"""
import json, sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

mode, host, port, topic, resp = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
lock = threading.Lock()
subscribed = threading.Event()
st = {"acked": 0, "answers": 0, "errors": 0}
sent_at = {}  # request id -> monotonic ns at publish (op)
lat_ms = {}  # request id -> latency (op)
results = {}
reasons = {}

def on_subscribe(c, userdata, mid, rcs, props):
    subscribed.set()

def on_publish(c, userdata, mid, rc, props):
    with lock:
        st["acked"] += 1

def on_message(c, userdata, m):
    t = time.monotonic_ns()
    try:
        body = json.loads(m.payload)
    except ValueError:
        return
    with lock:
        st["answers"] += 1
        rid = body.get("request_id")
        if mode == "op" and rid in sent_at and rid not in lat_ms:
            lat_ms[rid] = (t - sent_at[rid]) / 1e6
            r = body.get("result", "?")
            results[r] = results.get(r, 0) + 1
            why = str(body.get("reason", ""))[:80]
            reasons[why] = reasons.get(why, 0) + 1

c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{mode}-{time.time_ns()}",
                protocol=mqtt.MQTTv5)
c.on_subscribe, c.on_publish, c.on_message = on_subscribe, on_publish, on_message
c.max_inflight_messages_set(1000)
c.max_queued_messages_set(0)
c.connect(host, port, keepalive=30)
c.loop_start()
c.subscribe(resp, qos=1)
if not subscribed.wait(15):
    sys.exit("not subscribed")
print("READY", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
if mode == "flood":
    rate, seconds = float(sys.argv[6]), float(sys.argv[7])
    n = 0
    end = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - t0) * rate) + 1  # paced: what the schedule allows by now
        while n < due:
            info = c.publish(topic, b'{"request_id": "f%d"}' % n, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                st["errors"] += 1
            n += 1
        time.sleep(min(0.001, max(0.0, t0 + n / rate - time.monotonic())))
    send_s = time.monotonic() - t0
    with lock:
        acked_in_window = st["acked"]
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        with lock:
            if st["acked"] >= n:
                break
        time.sleep(0.01)
    with lock:
        out = {"sent": n, "send_s": send_s, "acked_in_window": acked_in_window,
               "acked": st["acked"], "answers": st["answers"], "errors": st["errors"]}
else:
    interval, seconds, grace, tag = (float(sys.argv[6]), float(sys.argv[7]),
                                     float(sys.argv[8]), sys.argv[9])
    i = 0
    while True:
        due = t0 + i * interval
        if due >= t0 + seconds:
            break
        time.sleep(max(0.0, due - time.monotonic()))
        rid = f"{tag}-{i}"
        payload = json.dumps({"alarm": "*", "request_id": rid}).encode()
        with lock:
            sent_at[rid] = time.monotonic_ns()
        c.publish(topic, payload, qos=1)
        i += 1
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with lock:
            if len(lat_ms) >= len(sent_at):
                break
        time.sleep(0.01)
    with lock:
        out = {"sent": len(sent_at), "latencies_ms": [lat_ms[r] for r in sent_at if r in lat_ms],
               "unanswered": [r for r in sent_at if r not in lat_ms], "results": results,
               "reasons": reasons}
c.loop_stop()
c.disconnect()
print("RESULT " + json.dumps(out), flush=True)
"""


@dataclass
class Client:
    """One CLIENT process."""

    args: list[str]
    result: dict[str, Any] | None = None
    _proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start it; return once it has connected and subscribed its response topic."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), timeout_s)
        if line.strip() != b"READY":
            await self.stop()
            raise RuntimeError(f"bench client {self.args[0]} did not come up: {line!r}")

    def go(self) -> None:
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(b"go\n")

    async def finish(self, timeout_s: float) -> dict[str, Any]:
        """Its RESULT, once it has ended."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout_s)
            if not line:
                raise RuntimeError(f"bench client {self.args[0]} ended without a result")
            if line.startswith(b"RESULT "):
                self.result = json.loads(line[7:])
                break
        await asyncio.wait_for(self._proc.wait(), timeout_s)
        return self.result

    async def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class LogTally(logging.Handler):
    """linectl's warnings, counted by message template instead of printed (every refused
    command logs one): the counts go in the results."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.levelname} {record.msg}"[:120]
        self.counts[key] = self.counts.get(key, 0) + 1

    def take(self) -> dict[str, int]:
        out, self.counts = self.counts, {}
        return out


# ---------------------------------------------------------------------- the line


def rss_bytes() -> int:
    """This process's resident set size: psutil where installed (it is not a dependency
    of linectl), else /proc/self/statm, else the peak from getrusage (Linux: KiB)."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.Process().memory_info().rss)
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Line:
    svc: LineService
    bridge: MqttBridge
    topics: Topics
    db: Path
    period_s: float


@dataclass
class CycleWatch:
    """Observer: while `active`, every cycle's lateness (from svc.stats) and how many
    cycles were not READY."""

    active: bool = False
    lateness_s: list[float] = field(default_factory=list)
    not_ready: int = 0

    def __call__(self, svc: LineService) -> None:
        if self.active:
            self.lateness_s.append(svc.stats.lateness_s[-1])
            self.not_ready += svc.ctl.state is not LineState.READY

    def begin(self) -> None:
        self.active, self.lateness_s, self.not_ready = True, [], 0


@contextlib.asynccontextmanager
async def running_line(broker: TestBroker, workdir: Path, seed: int) -> Any:
    """Simulators (own process), service and bridge, READY. As running_line in
    tests/test_mqtt_flood.py, with the daemon's refusal window (10 s)."""
    cfg = load_config(sc.compact_config(workdir), environ={})
    mqtt = MqttConfig(
        enabled=True,
        host=broker.host,
        port=broker.port,
        keepalive_s=5,
        reconnect_max_s=0.5,
        roles={"operator": ["*"]},
        identities={"op-1": "operator", "op-2": "operator"},
    )
    cfg.line = cfg.line.model_copy(update={"mqtt": mqtt})
    recipe, path = select_recipe(cfg, None)
    sim = SimProcess(cfg.directory, seed=seed)
    await sim.start()
    try:
        svc = LineService(
            cfg,
            recipe,
            path,
            acc_endpoint=cfg.line.accelerator.model_copy(update={"port": sim.acc_port}),
            cnv_endpoint=cfg.line.conveyor.model_copy(update={"port": sim.cnv_port}),
        )
        bridge = MqttBridge(svc, mqtt, line_id=cfg.line.line_id, store_path=svc.store_path)
        svc.observers.append(bridge.on_cycle)
        service = asyncio.create_task(svc.run(), name="bench-line")
        bridge_task = asyncio.create_task(bridge.run(), name="bench-bridge")
        try:
            await asyncio.wait_for(bridge.connected.wait(), 15.0)
            await sc.wait_for(lambda: svc.ctl.state is LineState.READY, 60.0, "the line READY")
            yield Line(
                svc,
                bridge,
                Topics.for_line(mqtt.topic_prefix, cfg.line.line_id),
                svc.store_path,
                cfg.line.cycle_period_s,
            )
            for t in (service, bridge_task):
                if t.done():
                    t.result()  # raises what ended it early
                    raise RuntimeError(f"{t.get_name()} ended before the benchmark did")
        finally:
            bridge.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bridge_task, 15.0)
            svc.stop()
            await asyncio.wait_for(asyncio.gather(service, return_exceptions=True), 60.0)
    finally:
        await sim.stop()


def audit_rows_since(db: Path, after_id: int) -> tuple[int, dict[str, int]]:
    """(newest event id, audit rows after `after_id` by actor, transitions left out)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    try:
        last = con.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        rows = con.execute(
            "SELECT actor, count(*) FROM events WHERE id > ? AND action != 'transition' "
            "GROUP BY actor",
            (after_id,),
        ).fetchall()
    finally:
        con.close()
    return int(last), {str(a)[:40]: int(n) for a, n in rows}


# ---------------------------------------------------------------------- one scenario


@dataclass
class Options:
    seconds: float
    rate: float
    interval: float
    warmup_s: float
    grace_s: float
    settle_s: float
    scenarios: list[str]
    seed: int = 1


def _r(x: float, nd: int = 2) -> float | None:
    return None if math.isnan(x) else round(x, nd)


def _mb(b: int) -> float:
    return round(b / 2**20, 1)


async def scenario(
    name: str, opts: Options, line: Line, broker: TestBroker, logs: LogTally
) -> dict[str, Any]:
    flood_sender, what = SCENARIOS[name]
    t = line.topics
    svc, bridge = line.svc, line.bridge
    op = Client(
        [
            "op",
            broker.host,
            str(broker.port),
            t.cmd("ack_alarm", "op-1"),
            t.response("op-1"),
            str(opts.interval),
            str(opts.seconds),
            str(opts.grace_s),
            f"op1-{name}",
        ]
    )
    flood: Client | None = None
    if flood_sender is not None:
        flood = Client(
            [
                "flood",
                broker.host,
                str(broker.port),
                t.cmd("stop", flood_sender),
                t.response(flood_sender),
                str(opts.rate),
                str(opts.warmup_s + opts.seconds),
            ]
        )
    watch = CycleWatch()
    svc.observers.insert(0, watch)
    rss_samples: list[int] = []
    sampling = True

    async def sample_rss() -> None:
        while sampling:
            rss_samples.append(rss_bytes())
            await asyncio.sleep(0.1)

    try:
        await op.start()
        if flood is not None:
            await flood.start()
        await asyncio.sleep(1.0)  # the connections' own work done
        last_event, _ = await asyncio.to_thread(audit_rows_since, line.db, 0)
        rss_before = rss_bytes()
        sampler = asyncio.create_task(sample_rss(), name="bench-rss")
        refused0 = bridge.refusals.total
        logs.take()
        if flood is not None:
            flood.go()
            await asyncio.sleep(opts.warmup_s)
        missed0, cmds0 = svc.stats.missed, bridge.stats.commands
        cpu0, wall0 = time.process_time(), time.monotonic()
        watch.begin()
        op.go()
        await asyncio.sleep(opts.seconds)
        watch.active = False
        wall_s = time.monotonic() - wall0
        cpu_s = time.process_time() - cpu0
        missed = svc.stats.missed - missed0
        received = bridge.stats.commands - cmds0
        rss_end = rss_bytes()
        op_res = await op.finish(opts.grace_s + 30.0)
        flood_res = await flood.finish(30.0) if flood is not None else None
        await asyncio.sleep(opts.settle_s)
        sampling = False
        await sampler
        rss_after = rss_bytes()
        _, audit_rows = await asyncio.to_thread(audit_rows_since, line.db, last_event)
    finally:
        sampling = False
        svc.observers.remove(watch)
        await op.stop()
        if flood is not None:
            await flood.stop()
    lat = op_res["latencies_ms"]
    lateness_ms = [x * 1000.0 for x in watch.lateness_s]
    flood_fig: dict[str, Any] | None = None
    if flood_res is not None:
        send_s = flood_res["send_s"]
        flood_fig = {
            "sender": flood_sender,
            "target_per_s": opts.rate,
            "sent": flood_res["sent"],
            "acked": flood_res["acked"],
            "sent_per_s": round(flood_res["sent"] / send_s, 1),
            "acked_per_s": round(flood_res["acked_in_window"] / send_s, 1),
            "publish_errors": flood_res["errors"],
            "answers_to_flooder": flood_res["answers"],
        }
    return {
        "scenario": name,
        "flood_what": what,
        "flood": flood_fig,
        "operator": {
            "sent": op_res["sent"],
            "answered": len(lat),
            "unanswered": len(op_res["unanswered"]),
            "unanswered_ids": op_res["unanswered"][:20],
            "p50_ms": _r(pct(lat, 50)),
            "p99_ms": _r(pct(lat, 99)),
            "max_ms": _r(pct(lat, 100)),
            "results": op_res["results"],
            "reasons": op_res["reasons"],
        },
        "received_by_linectl_per_s": round(received / wall_s, 1),
        "refused_unread": bridge.refusals.total - refused0,
        "cycle": {
            "cycles": len(lateness_ms),
            "expected_cycles": round(wall_s / line.period_s, 1),
            "missed": missed,
            "not_ready": watch.not_ready,
            "lateness_p50_ms": _r(pct(lateness_ms, 50), 3),
            "lateness_p99_ms": _r(pct(lateness_ms, 99), 3),
            "lateness_max_ms": _r(pct(lateness_ms, 100), 3),
        },
        "cpu_pct": round(100.0 * cpu_s / wall_s, 1),
        "rss_mb": {
            "before": _mb(rss_before),
            "peak": _mb(max([*rss_samples, rss_end])),
            "end_of_window": _mb(rss_end),
            "after": _mb(rss_after),
            "growth": _mb(rss_after - rss_before),
        },
        "audit_rows": audit_rows,
        "linectl_warnings": logs.take(),
        "line_state_after": svc.ctl.state.value,
        "wall_s": round(wall_s, 2),
    }


# ---------------------------------------------------------------------- the run


async def run(opts: Options, workdir: Path, logs: LogTally) -> dict[str, Any]:
    broker = TestBroker(workdir / "broker")
    if broker.kind != "mosquitto":
        raise RuntimeError("this benchmark needs mosquitto (MQTT 5); install mosquitto")
    await broker.start()
    try:
        async with running_line(broker, workdir, opts.seed) as line:
            out = []
            for name in opts.scenarios:
                out.append(await scenario(name, opts, line, broker, logs))
                print(f"  {name}: done", file=sys.stderr, flush=True)
            return {
                "broker": f"{broker.kind} on 127.0.0.1:{broker.port}",
                "cycle_period_s": line.period_s,
                "goal_answer_p99_ms": round(line.period_s * 1000.0 + GOAL_EXTRA_MS, 3),
                "scenarios": out,
            }
    finally:
        await broker.stop()


def judge(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals, per scenario."""
    goal_ms = res["goal_answer_p99_ms"]
    by = {s["scenario"]: s for s in res["scenarios"]}
    base = by.get("baseline")
    goals: list[dict[str, Any]] = []

    def add(name: str, measured: Any, goal: str, met: bool | None) -> None:
        goals.append({"name": name, "measured": measured, "goal": goal, "met": met})

    for s in res["scenarios"]:
        n, o, c = s["scenario"], s["operator"], s["cycle"]
        p99 = o["p99_ms"]
        add(f"{n}: op-1 answer p99, ms", p99, f"<= {goal_ms:g}", p99 is not None and p99 <= goal_ms)
        add(f"{n}: op-1 unanswered", o["unanswered"], "0", o["unanswered"] == 0)
        if base is None or s is base:
            add(f"{n}: cycle lateness p99, ms", c["lateness_p99_ms"], "", None)
            add(f"{n}: missed cycles", c["missed"], "", None)
            add(f"{n}: RSS growth, MB", s["rss_mb"]["growth"], "", None)
            continue
        bl = base["cycle"]["lateness_p99_ms"]
        lim = None if bl is None else round(bl + LATENESS_TOL_MS, 3)
        late = c["lateness_p99_ms"]
        add(
            f"{n}: cycle lateness p99, ms",
            late,
            "-" if lim is None else f"<= {lim:g}",
            None if lim is None or late is None else late <= lim,
        )
        bm = base["cycle"]["missed"]
        add(f"{n}: missed cycles", c["missed"], f"<= {bm}", c["missed"] <= bm)
        g = s["rss_mb"]["growth"]
        add(f"{n}: RSS growth, MB", g, f"<= {RSS_TOL_MB:g}", g <= RSS_TOL_MB)
    return goals


def _f(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(res: dict[str, Any], goals: list[dict[str, Any]]) -> None:
    head = (
        f"{'scenario':10} {'flood/s':>8} {'rcvd/s':>7} {'op n':>5} {'unans':>5} "
        f"{'op p50':>7} {'op p99':>7} {'op max':>7} {'late p50':>8} {'late p99':>8} "
        f"{'late max':>8} {'missed':>6} {'CPU %':>6} {'RSS0':>6} {'peak':>6} {'RSS1':>6}"
    )
    print(head)
    print("-" * len(head))
    for s in res["scenarios"]:
        o, c, m, fl = s["operator"], s["cycle"], s["rss_mb"], s["flood"]
        print(
            f"{s['scenario']:10} {_f(fl and fl['acked_per_s'], '.0f'):>8} "
            f"{s['received_by_linectl_per_s']:>7.0f} {o['answered']:>5} {o['unanswered']:>5} "
            f"{_f(o['p50_ms']):>7} {_f(o['p99_ms']):>7} {_f(o['max_ms']):>7} "
            f"{_f(c['lateness_p50_ms'], '.2f'):>8} {_f(c['lateness_p99_ms'], '.2f'):>8} "
            f"{_f(c['lateness_max_ms'], '.2f'):>8} {c['missed']:>6} {s['cpu_pct']:>6.1f} "
            f"{m['before']:>6.1f} {m['peak']:>6.1f} {m['after']:>6.1f}"
        )
    print(
        "times in ms; flood/s: flood messages PUBACKed a second (publisher process); rcvd/s: "
        "command messages linectl's bridge took a second;\nop: op-1's command to its answer "
        "(n answered, unans: unanswered); late: control-cycle start after its schedule; "
        "missed: cycles skipped;\nCPU %: this process (the line) in % of one core; RSS0/peak/"
        "RSS1: this process's RSS in MB before the flood, peak, after the settle"
    )
    print()
    print(f"{'figure':40} {'measured':>10}  {'goal':>10}  met")
    for g in goals:
        met = "" if g["met"] is None else ("yes" if g["met"] else "NO")
        print(f"{g['name']:40} {g['measured']!s:>10}  {g['goal']:>10}  {met}")
    print()
    for s in res["scenarios"]:
        fl = s["flood"]
        extra = ""
        if fl is not None:
            extra = (
                f"; flood sent {fl['sent']} ({fl['sent_per_s']:.0f}/s), acked {fl['acked']}, "
                f"answers to the flooder {fl['answers_to_flooder']}"
            )
        print(
            f"{s['scenario']}: refused unread {s['refused_unread']}; audit rows {s['audit_rows']}; "
            f"op-1 answers {s['operator']['results']}; line {s['line_state_after']}{extra}"
        )
        for msg, n in sorted(s["linectl_warnings"].items(), key=lambda kv: -kv[1])[:4]:
            print(f"    linectl log x{n}: {msg}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time per scenario, s")
    ap.add_argument("--rate", type=float, default=1000.0, help="flood rate, messages/s")
    ap.add_argument("--interval", type=float, default=0.5, help="op-1's command interval, s")
    ap.add_argument("--warmup-s", type=float, default=1.0, help="flood before measuring, s")
    ap.add_argument("--grace-s", type=float, default=5.0, help="wait for op-1's last answers, s")
    ap.add_argument("--settle-s", type=float, default=3.0, help="before RSS is read again, s")
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all, in that order)",
    )
    ap.add_argument("--seed", type=int, default=1, help="simulator seed")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument(
        "-v", "--verbose", action="store_true", help="print linectl's log (else: counted)"
    )
    args = ap.parse_args(argv)
    names = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = [x for x in names if x not in SCENARIOS]
    if unknown or not names:
        ap.error(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    for name in ("seconds", "rate", "interval"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name} must be positive, not {getattr(args, name)}")
    for name in ("warmup_s", "grace_s", "settle_s"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must not be negative")
    opts = Options(
        args.seconds,
        args.rate,
        args.interval,
        args.warmup_s,
        args.grace_s,
        args.settle_s,
        names,
        args.seed,
    )
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    logs = LogTally()
    linectl_log = logging.getLogger("linectl")
    saved = linectl_log.propagate
    linectl_log.addHandler(logs)
    linectl_log.propagate = args.verbose
    try:
        with tempfile.TemporaryDirectory(prefix="command-flood-") as tmp:
            res = asyncio.run(run(opts, Path(tmp), logs))
    finally:
        linectl_log.removeHandler(logs)
        linectl_log.propagate = saved
    res.update(
        {
            "seconds": args.seconds,
            "rate": args.rate,
            "interval_s": args.interval,
            "warmup_s": args.warmup_s,
            "settle_s": args.settle_s,
            "line": "separate process for simulators and clients; line + bridge here",
            **host_facts(load_start, t0),
        }
    )
    goals = judge(res)
    print_table(res, goals)
    print(
        f"\ncycle {res['cycle_period_s']:g} s; goal: op-1 answered within one cycle + "
        f"{GOAL_EXTRA_MS:g} ms p99 = {res['goal_answer_p99_ms']:g} ms; broker {res['broker']}; "
        f"took {res['took_s']:.0f} s; load average start {load_start}, end "
        f"{res['load_avg_end']}; {res['cpus']} CPUs"
    )
    if args.json:
        res["goals"] = goals
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
