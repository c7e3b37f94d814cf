"""Live telemetry latency, PLC sample to MQTT subscriber, through a real Mosquitto.

Runs the real LineService with its MQTT bridge (linectl.daemon.run_with_bridge) over
Modbus TCP against the bundled simulators (compact test line, fast recipe, a reel
running so the values change every cycle), publishing to a mosquitto started on a free
port (tests/broker.py). A subscriber in its own process (paho, MQTT 5, so that its clock
readings never wait on this process's event loop) takes `<prefix>/<line>/live/#` and
notes its wall clock at every message. For each live message:

    latency = subscriber's wall clock on receipt (ms) - payload `t_ms`

`t_ms` is the host wall-clock time (unix ms, integer) of the PLC sample: for a PLC value,
when the Modbus response carrying it arrived at the controller (the cycle's wall-clock
reading less the sample's age within its poll); for set-points and the reel position,
the control cycle that computed them. Both clocks are the same host's wall clock
(time.time_ns), so no clock offset enters; the integer `t_ms` adds up to 1 ms. The
figure covers the rest of the control cycle after the poll, the bridge's report-by-
exception filter and queue, aiomqtt/paho, mosquitto, and the subscriber's socket.
Only `good` values are timed (a `stale` value's t_ms is its last good sample, by
design); retained copies delivered at (re)subscribe are skipped.

Printed, per round of `--seconds` (default 30, `--rounds` 3) and pooled: p50, p90, p99,
max and count (goal: p99 <= 50 ms). Then a store-and-forward phase: the broker is
stopped for `--outage-s` (default 20) while the reel runs and started again; measured
are the bridge's reconnect after the broker's return, the replay of the outbox backlog
(records per second from the bridge's reconnect until every record waiting at the
broker's return is acknowledged), and the live latency while that replay runs and in the
`--after-s` seconds after the reconnect. The line's own backlog from a 20 s outage is a
few dozen records, replayed in milliseconds; `--extra-backlog N` adds N audit records to
the store during the outage so that live values can be timed beside a replay that lasts
seconds.

    .venv/bin/python bench/telemetry_latency.py [--seconds 30] [--rounds 3]
        [--outage-s 20] [--extra-backlog 0] [--no-replay] [--json FILE]

`--smoke`: 3 s, one round, no replay phase (used by the test suite so the script never
rots). The machine's load average is printed with the figures: other work on the host
shows up in the tail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the broker and the compact line are the tests'
sys.path.insert(0, str(ROOT / "bench"))  # benchlib

import e2e_scenarios as sc  # noqa: E402
from benchlib import pct  # noqa: E402
from broker import TestBroker  # noqa: E402

from linectl.config import LoadedConfig, Recipe, load_config  # noqa: E402
from linectl.core.control import LineState  # noqa: E402
from linectl.daemon import run_with_bridge  # noqa: E402
from linectl.mqtt import CONSUMER, MqttBridge  # noqa: E402
from linectl.service import LineService, ReelRequest, select_recipe  # noqa: E402
from linectl.store import RecordStore, utc_now_iso  # noqa: E402
from linectl.telemetry import Topics  # noqa: E402
from simulators.server import SimulatedLine  # noqa: E402

GOAL_P99_MS = 50.0

# The subscriber process: one line per event on stdout, flushed at once.
#   C <ns> <session_present>   connected        S <ns>   subscribed
#   D <ns> <reason>            disconnected     M <ns> <retain> <topic>\t<payload>
# paho reconnects by itself (loop_forever); the short capped delay keeps it from
# arriving long after the broker's return.
SUBSCRIBER = r"""
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

host, port, topic, client_id = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
qos, persistent = int(sys.argv[5]), sys.argv[6] == "1"
out = sys.stdout

def emit(line):
    out.write(line + "\n")
    out.flush()

def on_connect(c, userdata, flags, rc, props):
    if rc.is_failure:
        emit(f"E {time.time_ns()} {rc}")
        return
    emit(f"C {time.time_ns()} {int(flags.session_present)}")
    c.subscribe(topic, qos=qos)

def on_subscribe(c, userdata, mid, rcs, props):
    emit(f"S {time.time_ns()}")

def on_disconnect(c, userdata, flags, rc, props):
    emit(f"D {time.time_ns()} {rc}")

def on_message(c, userdata, m):
    t = time.time_ns()
    emit(f"M {t} {int(m.retain)} {m.topic}\t{m.payload.decode('utf-8', 'replace')}")

c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
c.on_connect, c.on_subscribe = on_connect, on_subscribe
c.on_disconnect, c.on_message = on_disconnect, on_message
props = None
if persistent:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
c.reconnect_delay_set(0.05, 0.25)
c.connect(host, port, keepalive=10, clean_start=not persistent, properties=props)
c.loop_forever(retry_first_connection=True)
"""


def now_ms() -> float:
    """Host wall clock, unix ms (the clock `t_ms` is read from)."""
    return time.time_ns() / 1e6


@dataclass(frozen=True, slots=True)
class Message:
    """One message as the subscriber process received it."""

    recv_ms: float
    retain: bool
    topic: str
    payload: str


@dataclass
class Subscriber:
    """An MQTT subscriber in its own process (see SUBSCRIBER)."""

    host: str
    port: int
    topic: str
    client_id: str
    qos: int = 0
    persistent: bool = False
    messages: list[Message] = field(default_factory=list)
    events: list[tuple[str, float, str]] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    _proc: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 15.0) -> None:
        """Start the process; return once it has subscribed."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SUBSCRIBER,
            self.host,
            str(self.port),
            self.topic,
            self.client_id,
            str(self.qos),
            "1" if self.persistent else "0",
            stdout=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,  # one record payload per line
        )
        self._reader = asyncio.create_task(self._read(), name="bench-subscriber")
        try:
            await asyncio.wait_for(self.subscribed.wait(), timeout_s)
        except TimeoutError:
            await self.stop()
            raise TimeoutError(f"subscriber did not subscribe to {self.topic}") from None

    def _received(self, m: Message) -> None:
        self.messages.append(m)

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            text = line.decode().rstrip("\n")
            kind, _, rest = text.partition(" ")
            if kind == "M":
                ns, retain, tail = rest.split(" ", 2)
                topic, _, payload = tail.partition("\t")
                self._received(Message(int(ns) / 1e6, retain == "1", topic, payload))
                continue
            ns, _, detail = rest.partition(" ")
            self.events.append((kind, int(ns) / 1e6, detail))
            if kind == "S":
                self.subscribed.set()
            elif kind == "D":
                self.subscribed.clear()

    async def stop(self) -> None:
        """End the process (it has nothing to flush)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5.0)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5.0)


# ---------------------------------------------------------------------- the line


def require_mosquitto(broker: TestBroker) -> None:
    """The bridge and the subscriber speak MQTT 5: the embedded amqtt fallback will not do."""
    if broker.kind != "mosquitto":
        raise RuntimeError("this benchmark needs mosquitto (MQTT 5); install mosquitto")


def line_config(workdir: Path, broker: TestBroker) -> tuple[LoadedConfig, Recipe, Path]:
    """The compact test line with `[mqtt]` enabled on the test broker (the shipped MQTT
    settings otherwise: deadbands, live_min_interval_s, queue, in-flight)."""
    cfg = load_config(sc.compact_config(workdir), environ={})
    mqtt = cfg.line.mqtt.model_copy(
        update={"enabled": True, "host": broker.host, "port": broker.port}
    )
    cfg.line = cfg.line.model_copy(update={"mqtt": mqtt})
    recipe, path = select_recipe(cfg, None)
    return cfg, recipe, path


def speed_limit_m_min(cfg: LoadedConfig, recipe: Recipe) -> float:
    """The steady line speed: what the recipe's maximum beam current allows."""
    return recipe.max_speed_m_min(cfg.line.geometry.weight_sum)


def find_bridge(svc: LineService) -> MqttBridge:
    """The bridge run_with_bridge made for `svc` (it hooks bridge.on_cycle as an observer;
    run_with_bridge does not hand the bridge out)."""
    for obs in svc.observers:
        owner = getattr(obs, "__self__", None)
        if isinstance(owner, MqttBridge):
            return owner
    raise RuntimeError("no MQTT bridge among the service's observers: is [mqtt] enabled?")


async def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll every 5 ms; TimeoutError naming what did not happen."""
    await sc.wait_for(cond, timeout_s, what)


async def wait_running(svc: LineService, task: asyncio.Task[None], timeout_s: float) -> None:
    """Wait until the reel runs (1 m done). The service task's own error if it ended
    first; TimeoutError saying where the line stands otherwise."""
    try:
        await wait_until(
            lambda: (
                task.done()
                or (
                    svc.ctl.state is LineState.RUNNING
                    and svc.ledger is not None
                    and (svc.ledger.position_m or 0.0) > 1.0
                )
            ),
            timeout_s,
            "the reel to run",
        )
    except TimeoutError:
        raise TimeoutError(
            f"the reel did not start within {timeout_s:g} s: line {svc.ctl.state.value}, "
            f"alarms {sorted(svc.ctl.alarms)}, {svc.ctl.why_not_ready()!r}"
        ) from None
    if task.done():
        task.result()  # raises what ended the service
        raise RuntimeError("the line service returned before the reel ran")


@dataclass
class CycleWatch:
    """Observer, placed before the bridge's: while `active`, counts cycles and cycles not
    RUNNING, and notes how old the conveyor's speed sample is when the cycle hands its
    values to the bridge (the part of the latency spent in the controller)."""

    active: bool = False
    cycles: int = 0
    not_running: int = 0
    handoff_ms: list[float] = field(default_factory=list)

    def __call__(self, svc: LineService) -> None:
        if self.active:
            self.cycles += 1
            self.not_running += svc.ctl.state is not LineState.RUNNING
            v = svc.live_values().get("speed_m_min")
            if v is not None and v.quality.value == "good":
                self.handoff_ms.append(now_ms() - v.t_ms)

    def begin(self) -> None:
        self.active, self.cycles, self.not_running = True, 0, 0
        self.handoff_ms = []

    def end(self) -> tuple[int, int, list[float]]:
        """(cycles, cycles not RUNNING, hand-off ages in ms)."""
        self.active = False
        return self.cycles, self.not_running, self.handoff_ms


# ---------------------------------------------------------------------- figures


def latencies(messages: list[Message], t0_ms: float, t1_ms: float) -> tuple[list[float], int]:
    """Latency (ms) of every fresh `good` live message received in [t0, t1), and how
    many live messages in the window were not timed (not good)."""
    out: list[float] = []
    skipped = 0
    for m in messages:
        if m.retain or not t0_ms <= m.recv_ms < t1_ms or "/live/" not in m.topic:
            continue
        body = json.loads(m.payload)
        if body.get("quality") != "good":
            skipped += 1
            continue
        out.append(m.recv_ms - float(body["t_ms"]))
    return out, skipped


def figures(lat: list[float], **extra: Any) -> dict[str, Any]:
    """p50/p90/p99/max/count of latencies (ms), with context."""
    return {
        "count": len(lat),
        "p50_ms": _r(pct(lat, 50)),
        "p90_ms": _r(pct(lat, 90)),
        "p99_ms": _r(pct(lat, 99)),
        "max_ms": _r(pct(lat, 100)),
        "min_ms": _r(min(lat)) if lat else None,
        **extra,
    }


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 2)


# ---------------------------------------------------------------------- the run


@dataclass
class Options:
    seconds: float
    rounds: int
    replay: bool
    outage_s: float
    after_s: float
    extra_backlog: int = 0


async def run(opts: Options, workdir: Path) -> dict[str, Any]:
    broker = TestBroker(workdir / "broker")
    require_mosquitto(broker)
    await broker.start()
    cfg, recipe, recipe_path = line_config(workdir, broker)
    topics = Topics.for_line(cfg.line.mqtt.topic_prefix, cfg.line.line_id)
    speed_m_min = speed_limit_m_min(cfg, recipe)
    # Long enough that the reel is still running when the measurements end.
    busy_s = opts.rounds * opts.seconds + (opts.outage_s + opts.after_s + 10 if opts.replay else 0)
    length_m = round(speed_m_min / 60.0 * busy_s * 1.5 + 20.0)
    sub = Subscriber(
        broker.host, broker.port, f"{topics.base}/live/#", f"bench-latency-{os.getpid()}"
    )
    res: dict[str, Any] = {
        "broker": f"{broker.kind} on 127.0.0.1:{broker.port}",
        "cycle_period_s": cfg.line.cycle_period_s,
        "live_min_interval_s": cfg.line.mqtt.live_min_interval_s,
        "reel_length_m": length_m,
        "speed_limit_m_min": round(speed_m_min, 2),
        "seconds_per_round": opts.seconds,
        "rounds": [],
        "replay": None,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        await sub.start()
        async with SimulatedLine(cfg, seed=1, k_dose_true=sc.TRUE_K) as sim:
            svc = LineService(cfg, recipe, recipe_path, **sc.endpoints(cfg, sim))
            svc.on_reel_start.append(lambda _r, counter_m: sim.plant.start_reel(counter_m))
            watch = CycleWatch()
            svc.observers.append(watch)
            svc.request_reel(ReelRequest("LATENCY-1", length_m, "bench"))
            task = asyncio.create_task(
                run_with_bridge(svc, exit_when_done=False, metrics_port=0), name="bench-line"
            )
            try:
                await wait_running(svc, task, 90.0)
                bridge = find_bridge(svc)
                await wait_until(lambda: bridge.stats.connected, 10.0, "the bridge to connect")
                for i in range(opts.rounds):
                    res["rounds"].append(await _round(i + 1, opts.seconds, sub, svc, watch))
                if opts.replay:
                    res["replay"] = await _replay(
                        opts, broker=broker, sub=sub, svc=svc, bridge=bridge, watch=watch
                    )
                res["bridge"] = {
                    "connects": bridge.stats.connects,
                    "live_published": bridge.stats.live_published,
                    "dropped": bridge.stats.dropped,
                    "records_published": bridge.stats.records_published,
                }
                res["missed_cycles"] = svc.stats.missed
                if task.done():
                    task.result()  # the service ended early: say why
                    raise RuntimeError("the line service returned before the measurements ended")
            finally:
                svc.stop()
                await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 120.0)
    finally:
        await sub.stop()
        await broker.stop()
    pooled: list[float] = []
    handoff: list[float] = []
    for rnd in res["rounds"]:
        pooled += rnd.pop("_lat")
        handoff += rnd.pop("_handoff")
    res["pooled"] = figures(pooled, handoff_p99_ms=_r(pct(handoff, 99)))
    res["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


async def _round(
    n: int, seconds: float, sub: Subscriber, svc: LineService, watch: CycleWatch
) -> dict[str, Any]:
    missed0 = svc.stats.missed
    watch.begin()
    t0 = now_ms()
    await asyncio.sleep(seconds)
    t1 = now_ms()
    cycles, not_running, handoff = watch.end()
    lat, skipped = latencies(sub.messages, t0, t1)
    return figures(
        lat,
        round=n,
        not_good=skipped,
        cycles=cycles,
        cycles_not_running=not_running,
        handoff_p99_ms=_r(pct(handoff, 99)),
        _handoff=handoff,
        missed_cycles=svc.stats.missed - missed0,
        _lat=lat,
    )


async def _replay(
    opts: Options,
    *,
    broker: TestBroker,
    sub: Subscriber,
    svc: LineService,
    bridge: MqttBridge,
    watch: CycleWatch,
) -> dict[str, Any]:
    """Broker down `outage_s` with the reel running, then up: reconnect, replay, latency."""
    store = RecordStore(svc.store_path)  # a reader of its own, like any outbox consumer
    try:
        watch.begin()
        await broker.stop()
        t_down = now_ms()
        seq_at_stop = store.outbox_last_seq()  # later records wait in the outbox
        if opts.extra_backlog:
            await asyncio.to_thread(_pad_outbox, svc.store_path, opts.extra_backlog)
        await asyncio.sleep(max(0.0, opts.outage_s - (now_ms() - t_down) / 1000.0))
        last_at_return = store.outbox_last_seq()
        cursor_at_return = store.outbox_cursor(CONSUMER)
        connects = bridge.stats.connects
        await broker.start()
        t_return = now_ms()
        t_reconnect: float | None = None
        deadline = time.monotonic() + 60.0
        while True:
            if t_reconnect is None and bridge.stats.connects > connects:
                t_reconnect = now_ms()
            if t_reconnect is not None and store.outbox_cursor(CONSUMER) >= last_at_return:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the outbox backlog was not replayed within 60 s")
            await asyncio.sleep(0.002)
        t_backlog0 = now_ms()
        t_end = t_reconnect + opts.after_s * 1000.0
        await asyncio.sleep(max(0.0, (t_end - now_ms()) / 1000.0) + 0.5)  # + what is in flight
        cycles, not_running, handoff = watch.end()
    finally:
        store.close()
    backlog = last_at_return - cursor_at_return
    replay_s = (t_backlog0 - t_reconnect) / 1000.0
    during, skip_d = latencies(sub.messages, t_reconnect, t_backlog0)
    after, skip_a = latencies(sub.messages, t_reconnect, t_end)
    sub_back = [t for k, t, _ in sub.events if k == "S" and t >= t_return]
    return {
        "outage_s": round((t_return - t_down) / 1000.0, 2),
        "extra_backlog": opts.extra_backlog,
        "records_during_outage": last_at_return - seq_at_stop,
        "backlog_at_return": backlog,
        "bridge_reconnect_after_return_s": round((t_reconnect - t_return) / 1000.0, 3),
        "subscriber_back_after_return_s": round((sub_back[0] - t_return) / 1000.0, 3)
        if sub_back
        else None,
        "replay_s": round(replay_s, 3),
        "backlog_zero_after_return_s": round((t_backlog0 - t_return) / 1000.0, 3),
        "replay_records_per_s": round(backlog / replay_s, 1) if replay_s > 0 else None,
        "cycles_not_running": not_running,
        "cycles": cycles,
        "handoff_p99_ms_phase": _r(pct(handoff, 99)),
        "during_replay": figures(during, not_good=skip_d),
        "after_reconnect": figures(after, not_good=skip_a, seconds=opts.after_s),
    }


def _pad_outbox(path: Path, n: int) -> None:
    """`n` audit records (actor `bench`), written as any writer would, to lengthen the
    backlog the bridge replays after the outage."""
    with RecordStore(path) as store:
        for i in range(n):
            store.audit(utc_now_iso(), "bench", "backlog_padding", {"i": i}, True)


# ---------------------------------------------------------------------- output


def _f(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(res: dict[str, Any]) -> list[tuple[str, Any, str, bool | None]]:
    head = (
        f"{'phase':30} {'count':>6} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'ctl p99':>7} {'not-run':>7} {'missed':>6}"
    )
    print(head)
    print("-" * len(head))

    def row(name: str, f: dict[str, Any]) -> None:
        print(
            f"{name:30} {f['count']:>6} {_f(f['p50_ms']):>7} {_f(f['p90_ms']):>7} "
            f"{_f(f['p99_ms']):>7} {_f(f['max_ms']):>7} {_f(f.get('handoff_p99_ms')):>7} "
            f"{f.get('cycles_not_running', '-')!s:>7} {f.get('missed_cycles', '-')!s:>6}"
        )

    for rnd in res["rounds"]:
        row(f"round {rnd['round']} ({res['seconds_per_round']:g} s)", rnd)
    row("ALL rounds", res["pooled"])
    rp = res["replay"]
    if rp is not None:
        row("during replay", rp["during_replay"])
        row(f"first {rp['after_reconnect']['seconds']:g} s after reconnect", rp["after_reconnect"])
    print(
        "count: good live messages timed; ctl p99: age of the conveyor speed sample when the "
        "cycle hands it to the bridge (the controller's share); not-run: cycles not RUNNING; "
        "missed: control cycles missed"
    )
    goals: list[tuple[str, Any, str, bool | None]] = [
        (
            "live latency p99, ms (pooled)",
            res["pooled"]["p99_ms"],
            f"<= {GOAL_P99_MS:g}",
            res["pooled"]["p99_ms"] is not None and res["pooled"]["p99_ms"] <= GOAL_P99_MS,
        )
    ]
    if rp is not None:
        p99 = rp["after_reconnect"]["p99_ms"]
        goals += [
            (
                f"live p99 after reconnect ({rp['after_reconnect']['seconds']:g} s), ms",
                p99,
                f"<= {GOAL_P99_MS:g}",
                p99 is not None and p99 <= GOAL_P99_MS,
            ),
            ("broker outage, s", rp["outage_s"], "", None),
            ("records produced during the outage", rp["records_during_outage"], "", None),
            ("  of which --extra-backlog padding", rp["extra_backlog"], "", None),
            ("backlog at broker return, records", rp["backlog_at_return"], "", None),
            ("bridge reconnect after return, s", rp["bridge_reconnect_after_return_s"], "", None),
            ("replay: reconnect to backlog 0, s", rp["replay_s"], "", None),
            ("replay rate, records/s", rp["replay_records_per_s"], "", None),
            ("broker return to backlog 0, s", rp["backlog_zero_after_return_s"], "", None),
        ]
    print()
    print(f"{'figure':44} {'measured':>10}  {'goal':>8}  met")
    for name, val, goal, met in goals:
        m = "" if met is None else ("yes" if met else "NO")
        print(f"{name:44} {val!s:>10}  {goal:>8}  {m}")
    b = res.get("bridge", {})
    print(
        f"\nbroker {res['broker']}; cycle {res['cycle_period_s']:g} s; live_min_interval_s "
        f"{res['live_min_interval_s']:g}; reel {res['reel_length_m']} m at up to "
        f"{res['speed_limit_m_min']} m/min; missed cycles {res.get('missed_cycles')}; bridge "
        f"published {b.get('live_published')} live, {b.get('records_published')} records, "
        f"dropped {b.get('dropped')} live"
    )
    print(
        "load average (1, 5, 15 min): "
        f"start {res['load_avg_start']}, end {res['load_avg_end']}; {os.cpu_count()} CPUs"
    )
    return goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each round, s")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each printed, then pooled)")
    ap.add_argument("--outage-s", type=float, default=20.0, help="broker outage for the replay")
    ap.add_argument(
        "--after-s", type=float, default=5.0, help="live latency window after the reconnect, s"
    )
    ap.add_argument(
        "--extra-backlog",
        type=int,
        default=0,
        help="audit records written to the store during the outage, so that the replay "
        "lasts long enough to time live values beside it (default 0: the line's own only)",
    )
    ap.add_argument("--no-replay", action="store_true", help="skip the broker-outage phase")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--smoke", action="store_true", help="3 s, one round, no replay phase")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds, args.no_replay = 3.0, 1, True
    for name in ("seconds", "outage_s", "after_s"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, not {args.rounds}")
    if args.extra_backlog < 0:
        ap.error(f"--extra-backlog must not be negative, not {args.extra_backlog}")
    opts = Options(
        args.seconds,
        args.rounds,
        not args.no_replay,
        args.outage_s,
        args.after_s,
        args.extra_backlog,
    )
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="telemetry-latency-") as tmp:
        res = asyncio.run(run(opts, Path(tmp)))
    res["took_s"] = round(time.monotonic() - t0, 1)
    goals = print_table(res)
    print(f"took {res['took_s']:.0f} s")
    if args.json:
        res["goals"] = [{"name": n, "measured": v, "goal": g, "met": m} for n, v, g, m in goals]
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
