"""The MQTT bridge against a real broker (mosquitto on a free port, else embedded amqtt).

Telemetry content and quality, the will on a kill, offline on a clean exit, reconnect
after a broker restart, store-and-forward across a broker outage and a controller
restart with nothing lost, and commands with ACK/NAK, refusals and audit on a running
line service over Modbus against the simulators.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import TestBroker, make_test_certs, mosquitto_binary, running_broker
from e2e_scenarios import TRUE_K, compact_config, endpoints, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linectl.commands import Command, CommandResult
from linectl.config import MqttConfig, load_config
from linectl.core.control import LineState
from linectl.core.ledger import MetreRecord, Verdict
from linectl.daemon import run_with_bridge
from linectl.mqtt import LiveQueue, MqttBridge
from linectl.quality import Quality
from linectl.service import LineService, select_recipe
from linectl.store import RecordStore, ReelInfo
from linectl.telemetry import ActiveAlarm, LineStatus, LiveValue, Topics
from simulators.server import SimulatedLine

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_767_225_600_000


# ---------------------------------------------------------------------- helpers


@dataclass
class FakeLine:
    """A line endpoint without PLCs: values and state set by the test."""

    values: dict[str, LiveValue] = field(default_factory=dict)
    status: LineStatus = field(default_factory=lambda: LineStatus("idle", "started", T0))
    alarms: tuple[ActiveAlarm, ...] = ()
    commands: list[Command] = field(default_factory=list)
    errors: list[tuple[str, str, str]] = field(default_factory=list)

    def live_values(self) -> Mapping[str, LiveValue]:
        return self.values

    def line_status(self) -> LineStatus:
        return self.status

    def active_alarms(self) -> Sequence[ActiveAlarm]:
        return self.alarms

    async def execute(self, cmd: Command) -> CommandResult:
        self.commands.append(cmd)
        return CommandResult(True, "", cmd.name.value, cmd.request_id, self.status.state)

    def audit_command_error(
        self, sender: str, command: str, reason: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        self.errors.append((sender, command, reason))

    def audit_refusals(self, summary: Mapping[str, Any]) -> None:
        pass

    def set(self, name: str, value: float | None, quality: Quality = Quality.GOOD) -> None:
        self.values[name] = LiveValue(name, value, quality, int(time.time() * 1000))


@dataclass
class Received:
    topic: str
    payload: Any
    retain: bool
    properties: Any = None


class Collector:
    """A subscriber that keeps every message of a line, and reconnects by itself.

    A persistent session (MQTT 5 session expiry) on a broker with persistence keeps
    the QoS 1 messages published while the collector itself is disconnected.
    """

    def __init__(self, broker: TestBroker, topic: str, *, client_id: str | None = None) -> None:
        self.broker = broker
        self.topic = topic
        self.client_id = client_id
        self.messages: list[Received] = []
        self.connected = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def on(self, suffix: str) -> list[Any]:
        return [m.payload for m in self.messages if m.topic.endswith(suffix)]

    async def _run(self) -> None:
        while True:
            try:
                kwargs: dict[str, Any] = {"identifier": self.client_id}
                if self.client_id is not None and self.broker.kind == "mosquitto":
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = 300
                    kwargs.update(clean_start=False, properties=props)
                async with self.broker.client(**kwargs) as c:
                    await c.subscribe(self.topic, qos=1)
                    self.connected.set()
                    async for m in c.messages:
                        raw = bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else b""
                        try:
                            payload: Any = json.loads(raw)
                        except ValueError:
                            payload = raw
                        self.messages.append(
                            Received(m.topic.value, payload, m.retain, m.properties)
                        )
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.05)

    async def __aenter__(self) -> Collector:
        self.task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), 10.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def mqtt_cfg(broker: TestBroker, **update: Any) -> MqttConfig:
    base: dict[str, Any] = {
        "enabled": True,
        "host": broker.host,
        "port": broker.port,
        "keepalive_s": 5,
        "reconnect_max_s": 0.5,
        "live_min_interval_s": 0.0,
        "deadbands": {"beam_current_ma": 0.05},
        # The bridge refuses a sender with no role before the line sees the command.
        "roles": {"operator": ["*"]},
        "identities": {"op-1": "operator", "boss": "operator"},
    }
    base.update(update)
    return MqttConfig.model_validate(base)


@contextlib.asynccontextmanager
async def running_bridge(bridge: MqttBridge) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.connected.wait(), 10.0)
        yield task
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 15.0)


async def eventually(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    await wait_for(cond, timeout_s, what)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[TestBroker]:
    # LINECTL_TEST_EMBEDDED_BROKER=1 tries the fallback (amqtt) where mosquitto exists.
    embedded = os.environ.get("LINECTL_TEST_EMBEDDED_BROKER") == "1"
    async with running_broker(tmp_path / "broker", persistence=True, force_embedded=embedded) as b:
        yield b


# ---------------------------------------------------------------------- the live queue


def test_live_queue_drops_the_oldest_and_counts() -> None:
    q = LiveQueue(3)
    for i in range(5):
        q.put_nowait(LiveValue("speed_m_min", float(i), Quality.GOOD, T0 + i))
    assert len(q) == 3
    assert q.dropped == 2

    async def take() -> list[float | int | bool | None]:
        return [v.value for v in await q.get_batch(10)]

    assert asyncio.run(take()) == [2.0, 3.0, 4.0]  # the newest kept, in order
    with pytest.raises(ValueError, match="at least 1"):
        LiveQueue(0)


async def test_queue_full_while_broker_down_drops_only_live_values(tmp_path: Path) -> None:
    # Nobody listens on this port: the bridge keeps trying, the cycle keeps going.
    broker = TestBroker(tmp_path / "b")
    line = FakeLine()
    bridge = MqttBridge(
        line,
        mqtt_cfg(broker, queue_size=10),
        line_id="line1",
        store_path=tmp_path / "r.sqlite",
    )
    task = asyncio.create_task(bridge.run())
    try:
        t0 = time.perf_counter()
        for i in range(100):
            line.set("speed_m_min", float(i))
            bridge.on_cycle()
        per_cycle_s = (time.perf_counter() - t0) / 100
        assert len(bridge.queue) == 10
        assert bridge.stats.dropped == 90
        assert not bridge.stats.connected
        print(f"on_cycle with the broker down: {per_cycle_s * 1e6:.1f} us per cycle")
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 5.0)


# ---------------------------------------------------------------------- telemetry


async def test_telemetry_content_quality_and_retained_state(
    broker: TestBroker, tmp_path: Path
) -> None:
    line = FakeLine()
    line.set("beam_current_ma", 39.8)
    line.set("vacuum_pa", None, Quality.COMM_FAIL)
    line.set("speed_m_min", 79.5, Quality.STALE)
    line.alarms = (ActiveAlarm("vacuum", "accelerator vacuum fault", True, T0),)
    topics = Topics.for_line("linectl", "line1")
    bridge = MqttBridge(
        line,
        mqtt_cfg(broker),
        line_id="line1",
        store_path=tmp_path / "r.sqlite",
        protocol=broker.protocol,
    )
    async with Collector(broker, "linectl/line1/#") as sub, running_bridge(bridge):
        bridge.on_cycle()
        await eventually(lambda: len(sub.on("/live/speed_m_min")) == 1, "live values")
        await eventually(lambda: len(sub.on("/alarms/active")) == 1, "alarms")
        beam = sub.on("/live/beam_current_ma")[0]
        assert beam["value"] == 39.8
        assert beam["quality"] == "good"
        assert beam["unit"] == "mA"
        assert abs(beam["t_ms"] - time.time() * 1000) < 10_000
        vacuum = sub.on("/live/vacuum_pa")[0]
        assert (vacuum["value"], vacuum["quality"]) == (None, "comm_fail")
        assert sub.on("/live/speed_m_min")[0]["quality"] == "stale"
        assert sub.on("/alarms/active")[0]["alarms"][0]["kind"] == "vacuum"
        assert sub.on("/status")[-1]["status"] == "online"

        # Report by exception: inside the deadband nothing, outside it the new value.
        line.set("beam_current_ma", 39.82)
        bridge.on_cycle()
        line.set("beam_current_ma", 39.9)
        bridge.on_cycle()
        await eventually(lambda: len(sub.on("/live/beam_current_ma")) == 2, "changed value")
        await asyncio.sleep(0.2)
        assert [p["value"] for p in sub.on("/live/beam_current_ma")] == [39.8, 39.9]
        # A change of quality goes at once.
        line.set("beam_current_ma", 39.9, Quality.STALE)
        bridge.on_cycle()
        await eventually(lambda: len(sub.on("/live/beam_current_ma")) == 3, "quality change")

        # State: published on change only.
        line.status = LineStatus("ready", "all permissives met", T0 + 5)
        bridge.on_cycle()
        bridge.on_cycle()
        await eventually(lambda: len(sub.on("/state")) == 2, "state change")
        await asyncio.sleep(0.2)
        assert [s["state"] for s in sub.on("/state")] == ["idle", "ready"]

        # A late subscriber gets status, schema, state and live values from retained ones.
        async with broker.client() as late:
            await late.subscribe("linectl/line1/#", qos=1)
            got: dict[str, Any] = {}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    async for m in late.messages:
                        assert m.retain
                        got[m.topic.value] = json.loads(bytes(m.payload))  # type: ignore[arg-type]
                        if len(got) >= 7:
                            break
        assert got[topics.status]["status"] == "online"
        assert got[topics.state]["state"] == "ready"
        assert got[topics.live("beam_current_ma")]["quality"] == "stale"
        assert "schemas" in got[topics.schema]
    # Clean exit: offline published by the bridge itself, retained.
    await eventually(lambda: sub.on("/status")[-1]["status"] == "offline", "offline")


WILL_SCRIPT = """
import asyncio, sys
import aiomqtt
from pathlib import Path
from linectl.config import MqttConfig
from linectl.mqtt import MqttBridge
from linectl.telemetry import LineStatus

class Line:
    def live_values(self): return {}
    def line_status(self): return LineStatus("idle", "x", 0)
    def active_alarms(self): return ()
    async def execute(self, cmd): raise NotImplementedError
    def audit_command_error(self, *a, **k): pass
    def audit_refusals(self, *a, **k): pass

async def main():
    cfg = MqttConfig(enabled=True, host="127.0.0.1", port=int(sys.argv[1]), keepalive_s=5)
    protocol = aiomqtt.ProtocolVersion(int(sys.argv[3]))
    bridge = MqttBridge(
        Line(), cfg, line_id="line1", store_path=Path(sys.argv[2]), protocol=protocol
    )
    task = asyncio.create_task(bridge.run())
    await bridge.connected.wait()
    print("connected", flush=True)
    await task

asyncio.run(main())
"""


async def test_will_on_kill(broker: TestBroker, tmp_path: Path) -> None:
    async with Collector(broker, "linectl/line1/status") as sub:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WILL_SCRIPT,
            str(broker.port),
            str(tmp_path / "r.sqlite"),
            str(int(broker.protocol)),
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20.0)
            assert line.strip() == b"connected"
            await eventually(
                lambda: sub.on("status")[-1:] != [] and sub.on("status")[-1]["status"] == "online",
                "online",
            )
            t0 = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            await eventually(lambda: sub.on("status")[-1]["status"] == "offline", "the will", 15.0)
            print(f"will published {time.monotonic() - t0:.2f} s after SIGKILL")
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    will = sub.messages[-1]
    assert will.payload["status"] == "offline"
    # Retained: a later subscriber sees the line offline.
    async with broker.client() as late:
        await late.subscribe("linectl/line1/status", qos=1)
        async with asyncio.timeout(5.0):
            m = await anext(aiter(late.messages))
    assert m.retain
    assert json.loads(bytes(m.payload))["status"] == "offline"  # type: ignore[arg-type]


async def test_reconnects_after_broker_restart(broker: TestBroker, tmp_path: Path) -> None:
    line = FakeLine()
    line.set("speed_m_min", 10.0)
    bridge = MqttBridge(
        line,
        mqtt_cfg(broker),
        line_id="line1",
        store_path=tmp_path / "r.sqlite",
        protocol=broker.protocol,
    )
    async with running_bridge(bridge):
        bridge.on_cycle()
        await broker.stop(kill=True)
        await eventually(lambda: not bridge.stats.connected, "the bridge sees the loss")
        for i in range(20):  # the line keeps cycling while the broker is away
            line.set("speed_m_min", 11.0 + i)
            bridge.on_cycle()
            await asyncio.sleep(0.05)
        await broker.start()
        t0 = time.monotonic()
        await eventually(lambda: bridge.stats.connected, "reconnect", 10.0)
        print(f"reconnected {time.monotonic() - t0:.2f} s after the broker came back")
        assert bridge.stats.connects == 2
        assert bridge.stats.disconnects == 1
        async with Collector(broker, "linectl/line1/#") as sub:
            # Retained state and status published afresh after the restart.
            await eventually(lambda: sub.on("/status") != [], "status after restart")
            assert sub.on("/status")[-1]["status"] == "online"
            line.set("speed_m_min", 99.0)
            bridge.on_cycle()
            await eventually(
                lambda: 99.0 in [p["value"] for p in sub.on("/live/speed_m_min")],
                "live after restart",
            )


# ---------------------------------------------------------------------- store-and-forward


def reel_info(reel_id: str) -> ReelInfo:
    return ReelInfo(
        reel_id=reel_id,
        line_id="line1",
        recipe_product="PV",
        recipe_version="1",
        recipe_hash="0" * 64,
        recipe_json="{}",
        operator="pytest",
        planned_length_m=1000.0,
        started_at="2026-01-01T00:00:00.000+00:00",
    )


def metre(i: int) -> MetreRecord:
    return MetreRecord(i, 120.0 + i % 7, 118.0, 123.0, Verdict.IN_SPEC)


def wall(i: int) -> str:
    return f"2026-01-01T00:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}+00:00"


def received_records(sub: Collector) -> list[dict[str, Any]]:
    # records/head (the outbox's newest seq, retained) is not a record.
    return [
        m.payload
        for m in sub.messages
        if "/records/" in m.topic and not m.topic.endswith("/records/head")
    ]


def check_nothing_lost(sub: Collector, db: Path, reel_id: str) -> dict[str, int]:
    """Every outbox row in the store arrived, each metre at least once, in order."""
    with RecordStore(db) as store:
        last = store.outbox_last_seq()
        stored = [m.index for m in store.metres(reel_id)]
    got = received_records(sub)
    seqs = [p["seq"] for p in got]
    firsts: list[int] = []
    seen: set[int] = set()
    for s in seqs:
        if s not in seen:
            seen.add(s)
            firsts.append(s)
    assert seen == set(range(1, last + 1)), f"missing {sorted(set(range(1, last + 1)) - seen)}"
    assert firsts == sorted(firsts), "records out of order"
    indices = {m["index"] for p in got if p.get("event") == "metres" for m in p["metres"]}
    assert indices == set(stored)
    return {"records": last, "received": len(seqs), "duplicates": len(seqs) - last}


OUTAGE_S = 3.0


async def test_store_and_forward_across_broker_outage(broker: TestBroker, tmp_path: Path) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("needs a broker that keeps a persistent session across its restart")
    db = tmp_path / "r.sqlite"
    writer = RecordStore(db)
    writer.open_reel(reel_info("R1"))
    bridge = MqttBridge(
        FakeLine(),
        mqtt_cfg(broker),
        line_id="line1",
        store_path=db,
        protocol=broker.protocol,
        poll_s=0.05,
    )
    stop = asyncio.Event()
    counts = {"metres": 0}

    async def write() -> None:
        # The service's writer: a metre every 20 ms, an audit event every 10.
        i = 0
        while not stop.is_set():
            await asyncio.to_thread(writer.add_metres, "R1", [metre(i)], wall(i))
            if i % 10 == 0:
                await asyncio.to_thread(writer.audit, wall(i), "op", "note", {"i": i}, True)
            i += 1
            counts["metres"] = i
            await asyncio.sleep(0.02)

    async with (
        Collector(broker, "linectl/line1/records/#", client_id="sf-collector") as sub,
        running_bridge(bridge),
    ):
        wtask = asyncio.create_task(write())
        await asyncio.sleep(0.5)
        await broker.stop()  # SIGTERM: mosquitto saves the collector's session
        seq_down = writer.outbox_last_seq()
        await asyncio.sleep(OUTAGE_S)
        await broker.start()
        seq_up = writer.outbox_last_seq()
        assert seq_up - seq_down > 50, "records were written during the outage"
        await eventually(lambda: bridge.stats.connected, "reconnect")
        await asyncio.sleep(0.5)
        stop.set()
        await wtask
        writer.close_reel("R1", wall(10**6), "planned length reached")
        last = writer.outbox_last_seq()
        await eventually(
            lambda: any(p["seq"] == last for p in received_records(sub)), "the reel end", 15.0
        )
        # The broker acknowledged it all (the cursor moves just after the last PUBACK).
        await eventually(lambda: bridge.stats.replay_backlog == 0, "no backlog")
        cursor = await asyncio.to_thread(writer.outbox_cursor, "mqtt")
    writer.close()
    figures = check_nothing_lost(sub, db, "R1")
    by_seq = {p["seq"]: p for p in received_records(sub)}
    # Written while the broker was down: sent after it came back, marked historical.
    assert all(by_seq[s]["historical"] for s in range(seq_down + 1, seq_up + 1))
    assert by_seq[last]["historical"] is False
    end = by_seq[last]
    assert end["event"] == "end"
    assert end["summary"]["metres"] == counts["metres"]
    assert end["summary"]["by_verdict"]["in_spec"] == counts["metres"]
    assert cursor == last
    print(
        f"outage {OUTAGE_S:.0f} s: {figures['records']} records produced, all delivered "
        f"({seq_up - seq_down} during the outage), {figures['duplicates']} duplicates"
    )


CHILD_SCRIPT = """
import asyncio, sys
import aiomqtt
from pathlib import Path
from linectl.config import MqttConfig
from linectl.core.ledger import MetreRecord, Verdict
from linectl.mqtt import MqttBridge
from linectl.store import RecordStore
from linectl.telemetry import LineStatus

class Line:
    def live_values(self): return {}
    def line_status(self): return LineStatus("running", "x", 0)
    def active_alarms(self): return ()
    async def execute(self, cmd): raise NotImplementedError
    def audit_command_error(self, *a, **k): pass
    def audit_refusals(self, *a, **k): pass

async def main():
    port, db, first = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    cfg = MqttConfig(enabled=True, host="127.0.0.1", port=port, keepalive_s=5)
    store = RecordStore(db)
    protocol = aiomqtt.ProtocolVersion(int(sys.argv[4]))
    bridge = MqttBridge(
        Line(), cfg, line_id="line1", store_path=db, poll_s=0.02, protocol=protocol
    )
    task = asyncio.create_task(bridge.run())
    await bridge.connected.wait()
    i = first
    while True:  # until SIGKILL
        t = f"2026-01-01T00:00:{i // 1000 % 60:02d}.{i % 1000:03d}+00:00"
        await asyncio.to_thread(
            store.add_metres, "R1", [MetreRecord(i, 120.0, 119.0, 121.0, Verdict.IN_SPEC)], t
        )
        print(i, flush=True)
        i += 1
        await asyncio.sleep(0.005)

asyncio.run(main())
"""


async def test_store_and_forward_across_controller_kill(broker: TestBroker, tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as s:
        s.open_reel(reel_info("R1"))
    async with Collector(broker, "linectl/line1/records/#", client_id="kill-collector") as sub:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD_SCRIPT,
            str(broker.port),
            str(db),
            "0",
            str(int(broker.protocol)),
            stdout=asyncio.subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            await eventually(
                lambda: len(received_records(sub)) >= 100, "records from the child", 20.0
            )
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        with RecordStore(db) as s:
            written = s.outbox_last_seq()
            cursor = s.outbox_cursor("mqtt")
        assert cursor <= written
        # The controller comes back: a new bridge on the same store goes on from the cursor.
        bridge = MqttBridge(
            FakeLine(), mqtt_cfg(broker), line_id="line1", store_path=db, protocol=broker.protocol
        )
        async with running_bridge(bridge):
            await eventually(
                lambda: {p["seq"] for p in received_records(sub)} >= set(range(1, written + 1)),
                "the rest after the restart",
            )
    figures = check_nothing_lost(sub, db, "R1")
    print(
        f"controller SIGKILL: {written} records written, cursor was at {cursor}, all "
        f"delivered, {figures['duplicates']} duplicates"
    )


# ---------------------------------------------------------------------- commands


class Operator:
    """An MQTT 5 client that sends commands and collects the answers."""

    def __init__(self, client: aiomqtt.Client, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self.answers: list[Received] = []
        self._n = 0

    async def listen(self) -> None:
        async for m in self.client.messages:
            self.answers.append(
                Received(m.topic.value, json.loads(bytes(m.payload)), m.retain, m.properties)  # type: ignore[arg-type]
            )

    async def send(
        self, command: str, sender: str, payload: dict[str, Any], *, v5: bool = True
    ) -> Received:
        """Send a command; wait for its answer on the sender's own response topic (with
        MQTT 5 the command names it as its response topic and carries correlation data,
        which comes back; without, the request id matches)."""
        self._n += 1
        rid = f"req-{self._n}"
        body = json.dumps({"request_id": rid, **payload})
        props: Properties | None = None
        if v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.topics.response(sender)
            props.CorrelationData = rid.encode()
        await self.client.publish(self.topics.cmd(command, sender), body, qos=1, properties=props)

        def mine() -> Received | None:
            for a in self.answers:
                if a.payload.get("request_id") == rid or (
                    a.properties is not None
                    and getattr(a.properties, "CorrelationData", None) == rid.encode()
                ):
                    return a
            return None

        await eventually(lambda: mine() is not None, f"the answer to {command}")
        answer = mine()
        assert answer is not None
        assert answer.topic == self.topics.response(sender)
        if v5:
            assert answer.properties.CorrelationData == rid.encode()
        return answer


async def test_commands_ack_nak_refusals_and_audit(broker: TestBroker, tmp_path: Path) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("MQTT 5 response topics need mosquitto")
    cfg = load_config(compact_config(tmp_path), environ={})
    cfg.line = cfg.line.model_copy(
        update={
            "mqtt": mqtt_cfg(
                broker,
                roles={"operator": ["*"], "viewer": []},
                identities={"op-1": "operator", "eye": "viewer"},
            )
        }
    )
    recipe, path = select_recipe(cfg, None)
    topics = Topics.for_line("linectl", "line1")
    async with (
        SimulatedLine(cfg, seed=5, k_dose_true=TRUE_K) as sim,
        Collector(broker, "linectl/line1/#") as records,
    ):
        svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
        svc.on_reel_start.append(lambda _r, counter_m: sim.plant.start_reel(counter_m))
        service = asyncio.create_task(run_with_bridge(svc, exit_when_done=False, metrics_port=0))
        async with broker.client(identifier="hmi") as client:
            await client.subscribe(topics.response("+"), qos=1)
            op = Operator(client, topics)
            listener = asyncio.create_task(op.listen())
            try:
                await eventually(lambda: svc.ctl.state is LineState.READY, "READY", 30.0)

                async def nak(command: str, sender: str, payload: dict[str, Any], why: str) -> None:
                    a = (await op.send(command, sender, payload)).payload
                    assert (a["result"], a["ack"]) == ("NAK", False), a
                    assert why in a["reason"], a
                    assert a["command"] == command

                # Unsafe in the current state: refused with the controller's reason.
                await nak("stop", "op-1", {}, "nothing to stop in state ready")
                await nak("reset", "op-1", {}, "no latched alarm to reset")
                await nak("ack_alarm", "op-1", {"alarm": "*"}, "no unacknowledged alarm")
                # Authorization.
                start = {"reel_id": "R1", "length_m": 12.0, "operator": "A. Smith"}
                await nak("start_reel", "eye", start, "role 'viewer' may not send start_reel")
                await nak("start_reel", "stranger", start, "identity 'stranger' has no role")
                # Bad input: named, and nothing changes.
                await nak("start_reel", "op-1", {"reel_id": "R1", "length_m": -1}, "length_m")
                await nak("select_recipe", "op-1", {"recipe": "nope"}, "nope")
                assert svc.ctl.state is LineState.READY

                a = (await op.send("start_reel", "op-1", start)).payload
                assert (a["result"], a["reason"], a["state"]) == ("ACK", "", "ready")
                await eventually(lambda: svc.ctl.state is LineState.RUNNING, "RUNNING", 20.0)
                await nak("start_reel", "op-1", {**start, "reel_id": "R2"}, "state running")
                await nak("select_recipe", "op-1", {"recipe": "fast"}, "R1 is not finished")
                await eventually(lambda: (svc.ledger.position_m or 0) > 3.0, "3 m", 20.0)
                # The fallback response topic, for a client without MQTT 5 properties.
                a = (await op.send("stop", "op-1", {"reason": "end of shift"}, v5=False)).payload
                assert a["result"] == "ACK"
                await eventually(lambda: svc.ctl.state is LineState.READY, "READY again", 30.0)
                # An alarm: acknowledged, then reset.
                sim.faults.latch("accelerator", 2)
                await eventually(lambda: svc.ctl.state is LineState.FAULT, "FAULT", 10.0)
                a = (await op.send("ack_alarm", "op-1", {"alarm": "accelerator_fault"})).payload
                assert a["result"] == "ACK"
                assert a["detail"]["alarms"] == ["accelerator_fault"]
                await nak("ack_alarm", "op-1", {"alarm": "accelerator_fault"}, "no unacknowledged")
                a = (await op.send("reset", "op-1", {})).payload
                assert a["result"] == "ACK"
                await eventually(
                    lambda: svc.ctl.state is LineState.READY, "READY after reset", 15.0
                )
                # Malformed JSON is answered too.
                await client.publish(topics.cmd("stop", "op-1"), b"{oops", qos=1)
                await eventually(
                    lambda: any("not JSON" in a.payload["reason"] for a in op.answers), "NAK"
                )
            finally:
                svc.stop()
                await asyncio.wait_for(service, 30.0)
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
        await eventually(lambda: records.on("/records/audit") != [], "audit records")
        await asyncio.sleep(0.5)

    with RecordStore(tmp_path / "records.sqlite") as store:
        # The aggregate of refusals comes when its window ends (timing): tested apart.
        events = [e for e in store.events() if e.action not in ("transition", "refused_commands")]
        alarms = store.alarms()
    audit = [(e.actor, e.action, e.accepted) for e in events]
    assert audit == [
        ("op-1", "stop", False),
        ("op-1", "reset", False),
        ("op-1", "ack_alarm", False),
        ("eye", "start_reel", False),
        # ("stranger", no role): refused unread, counted, audited in aggregate on no reel
        ("op-1", "start_reel", False),
        ("op-1", "select_recipe", False),
        ("op-1", "start_reel", True),
        ("op-1", "start_reel", False),
        ("op-1", "select_recipe", False),
        ("op-1", "stop", True),
        ("op-1", "ack_alarm", True),
        ("op-1", "ack_alarm", False),
        ("op-1", "reset", True),
        ("op-1", "stop", False),
    ]
    assert events[0].reason == "nothing to stop in state ready"
    assert events[3].reason == "role 'viewer' may not send start_reel"
    assert events[6].detail["operator"] == "A. Smith"
    assert events[9].detail["reason"] == "end of shift"
    assert "not JSON" in events[-1].reason
    acc = [a for a in alarms if a.kind == "accelerator_fault"]
    assert acc[0].acknowledged_by == "op-1"
    assert acc[0].cleared_at is not None
    # Every audit row went out on records/audit, and the reel's metres on records/metres.
    published = {p["event_id"] for p in records.on("/records/audit")}
    assert {e.id for e in store_events(tmp_path)} <= published
    metres = [m for p in records.on("/records/metres") for m in p.get("metres", [])]
    assert metres
    assert {p["reel_id"] for p in records.on("/records/metres")} == {"R1"}
    reel_events = [p["event"] for p in records.on("/records/reel")]
    assert reel_events[0] == "start"
    # Live telemetry from the running service: values with quality and time.
    beam = records.on("/live/beam_current_ma")
    assert max(p["value"] for p in beam if p["value"] is not None) > 1.0
    assert "good" in {p["quality"] for p in beam}
    # Before the PLC first answers: no value, and the quality says so.
    assert all(p["value"] is None for p in beam if p["quality"] == "comm_fail")
    assert any(p["value"] for p in records.on("/live/speed_sp_m_min"))
    assert any(p["value"] is not None for p in records.on("/live/reel_position_m"))
    assert all(isinstance(p["t_ms"], int) for p in records.on("/live/tension_n"))
    states = [(p["state"], (p["reel"] or {}).get("reel_id")) for p in records.on("/state")]
    assert ("running", "R1") in states
    assert "fault" in [st for st, _ in states]
    assert records.on("/status")[-1]["status"] == "offline"  # the daemon's clean exit
    alarm_events = [(p["kind"], p["event"]) for p in records.on("/records/alarm")]
    assert ("accelerator_fault", "acknowledged") in alarm_events
    assert ("accelerator_fault", "cleared") in alarm_events


def store_events(tmp_path: Path) -> list[Any]:
    with RecordStore(tmp_path / "records.sqlite") as store:
        return store.events()


async def test_broker_identity_and_acl_are_the_first_line(tmp_path: Path) -> None:
    """With the documented ACL a client can send commands only under its own name, and
    the bridge needs its own credentials."""
    broker = TestBroker(
        tmp_path / "b",
        users={"linectl": "bridge-pw", "op-1": "op-pw"},
        acl=(
            "user linectl\ntopic readwrite linectl/#\n\n"
            "pattern write linectl/+/cmd/+/%u\n"
            "pattern read linectl/+/response/%u\n"
        ),
    )
    if broker.kind != "mosquitto":
        pytest.skip("users and ACLs need mosquitto")
    await broker.start()
    try:
        line = FakeLine()
        wrong = MqttBridge(
            line,
            mqtt_cfg(broker, username="linectl", password="nope"),
            line_id="line1",
            store_path=tmp_path / "r.sqlite",
        )
        task = asyncio.create_task(wrong.run())
        await eventually(lambda: wrong.stats.last_error != "", "a refused connection")
        assert not wrong.stats.connected
        assert "authori" in wrong.stats.last_error.lower() or "bad" in wrong.stats.last_error
        wrong.stop()
        await asyncio.wait_for(task, 5.0)

        bridge = MqttBridge(
            line,
            mqtt_cfg(broker, username="linectl", password="bridge-pw"),
            line_id="line1",
            store_path=tmp_path / "r.sqlite",
        )
        topics = bridge.topics
        async with (
            running_bridge(bridge),
            broker.client(username="op-1", password="op-pw") as client,
        ):
            await client.subscribe(topics.response("op-1"), qos=1)
            # Under another identity: the broker drops it; the line never sees it.
            await client.publish(topics.cmd("stop", "boss"), b"{}", qos=1)
            await client.publish(topics.cmd("stop", "op-1"), b'{"request_id": "own"}', qos=1)
            async with asyncio.timeout(5.0):
                m = await anext(aiter(client.messages))
            answer = json.loads(bytes(m.payload))  # type: ignore[arg-type]
            assert answer["request_id"] == "own"
            await asyncio.sleep(0.3)
        assert [(c.name.value, c.sender) for c in line.commands] == [("stop", "op-1")]
    finally:
        await broker.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_retained_and_repeated_commands(
    broker: TestBroker, tmp_path: Path, protocol: str
) -> None:
    """A retained command never acts: with MQTT 5 (retain-as-published) not even when it
    is published while linectl is connected. MQTT 3.1.1 cannot tell it then (the broker
    clears RETAIN on delivery to a connected subscriber): it acts once, and is refused at
    every later connection; the broker's ACL must keep it out (docs/security.md)."""
    if protocol == "5" and broker.kind != "mosquitto":
        pytest.skip("MQTT 5 needs mosquitto")
    v5 = protocol == "5"
    version = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
    line = FakeLine()
    cfg = mqtt_cfg(broker, protocol=protocol)
    topics = Topics.for_line("linectl", "line1")
    db = tmp_path / "r.sqlite"
    bridge = MqttBridge(line, cfg, line_id="line1", store_path=db)
    assert bridge.protocol is version  # from [mqtt] protocol
    refused = ("op-1", "reset", "retained commands are refused: publish commands with retain=false")
    async with broker.client() as client:
        await client.subscribe(topics.response("op-1"), qos=1)
        async with running_bridge(bridge):
            # The same request id twice (a client's retry): one action, the same answer.
            for _ in range(2):
                await client.publish(topics.cmd("stop", "op-1"), b'{"request_id": "a"}', qos=1)
            # A retained command published while the bridge is connected...
            await client.publish(
                topics.cmd("reset", "op-1"), b'{"request_id": "b"}', qos=1, retain=True
            )
            if v5:  # ...is refused at once,
                await eventually(lambda: line.errors == [refused], "the retained command refused")
            else:  # ...or, with 3.1.1, delivered live once,
                await eventually(lambda: len(line.commands) == 2, "two commands")
        # ...and again, retained, to the next session: refused, not acted on (again).
        bridge2 = MqttBridge(line, cfg, line_id="line1", store_path=db)
        async with running_bridge(bridge2):
            await eventually(lambda: len(line.errors) == (2 if v5 else 1), "refused again")
        await client.publish(topics.cmd("reset", "op-1"), b"", qos=1, retain=True)  # clear it
        answers = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for m in client.messages:
                    answers.append(json.loads(bytes(m.payload)))  # type: ignore[arg-type]
    acted = [("stop", "a")] if v5 else [("stop", "a"), ("reset", "b")]
    assert [(c.name.value, c.request_id) for c in line.commands] == acted
    assert line.errors == [refused] * (2 if v5 else 1)
    assert [(a["request_id"], a["result"]) for a in answers] == [
        ("a", "ACK"),
        ("a", "ACK"),
        ("" if v5 else "b", "NAK" if v5 else "ACK"),
        ("", "NAK"),
    ]


async def test_tls_with_username_and_password(tmp_path: Path) -> None:
    if shutil.which("openssl") is None or mosquitto_binary() is None:
        pytest.skip("needs openssl and mosquitto")
    tls = make_test_certs(tmp_path / "pki")
    broker = TestBroker(tmp_path / "b", users={"linectl": "pw"}, tls=tls)
    await broker.start()
    try:
        line = FakeLine()
        line.set("speed_m_min", 42.0)
        secure = mqtt_cfg(broker, username="linectl", password="pw", tls={"ca_file": str(tls.ca)})
        bridge = MqttBridge(line, secure, line_id="line1", store_path=tmp_path / "r.sqlite")
        async with running_bridge(bridge):
            assert bridge.stats.connected
        # Without TLS the same broker does not take us.
        plain = MqttBridge(
            line,
            mqtt_cfg(broker, username="linectl", password="pw"),
            line_id="line1",
            store_path=tmp_path / "r.sqlite",
        )
        task = asyncio.create_task(plain.run())
        await eventually(lambda: plain.stats.last_error != "", "a failed plain connection")
        assert not plain.stats.connected
        plain.stop()
        await asyncio.wait_for(task, 5.0)
    finally:
        await broker.stop()
