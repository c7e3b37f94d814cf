"""Sparkplug B edge node against a real broker, watched by an independent subscriber.

The subscriber decodes with the generated protobuf module only (not linectl's node code)
and checks the session rules: births before data, seq order, bdSeq of NBIRTH = bdSeq of
NDEATH, rebirth on request, NDEATH when the connection dies, historical replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest
from broker import TestBroker, running_broker
from conftest import ROOT, free_port

from linectl.commands import Command, CommandName, CommandResult
from linectl.core.ledger import MetreRecord, Verdict
from linectl.quality import Quality
from linectl.sparkplug import sparkplug_b_pb2 as pb
from linectl.sparkplug.adapter import BdSeqFile, BrokerSettings, SparkplugEdge
from linectl.sparkplug.node import EdgeNode
from linectl.telemetry import LIVE_VALUES, LiveValue

GROUP, NODE = "plant", "line1"
PREFIX = f"spBv1.0/{GROUP}"


# ---------------------------------------------------------------------- the line, faked


class FakeLine:
    """LineSource: live values the test sets, commands it records."""

    def __init__(self) -> None:
        self.values = {s.name: LiveValue(s.name, 1.0, Quality.GOOD, _now_ms()) for s in LIVE_VALUES}
        self.commands: list[Command] = []
        self.refused: list[tuple[str, str, str]] = []

    def set(self, name: str, value: float | None, quality: Quality = Quality.GOOD) -> None:
        self.values[name] = LiveValue(name, value, quality, _now_ms())

    def live_values(self) -> dict[str, LiveValue]:
        return dict(self.values)

    async def execute(self, cmd: Command) -> CommandResult:
        self.commands.append(cmd)
        return CommandResult(True, "", cmd.name.value, cmd.request_id, "ready")

    def audit_command_error(
        self, sender: str, command: str, reason: str, detail: object = None
    ) -> None:
        self.refused.append((sender, command, reason))

    def audit_refusals(self, summary: object) -> None:
        pass


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------------- the subscriber


@dataclass
class Rx:
    topic: str
    kind: str
    device: str | None
    payload: pb.Payload
    qos: int
    retain: bool


@dataclass
class Subscriber:
    """Records every Sparkplug message of the group, decoded with the generated module."""

    msgs: list[Rx] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on(self, message: aiomqtt.Message) -> None:
        t = message.topic.value
        parts = t.split("/")
        if parts[1] == "STATE" or parts[2] in ("NCMD", "DCMD"):
            return  # what hosts publish; we watch the node
        assert isinstance(message.payload, bytes)
        self.msgs.append(
            Rx(
                t,
                parts[2],
                parts[4] if len(parts) == 5 else None,
                pb.Payload.FromString(message.payload),
                message.qos,
                message.retain,
            )
        )
        self.changed.set()

    async def wait_for(self, pred: Callable[[list[Rx]], bool], timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not pred(self.msgs):
                self.changed.clear()
                await self.changed.wait()

    def kinds(self) -> list[str]:
        return [m.kind for m in self.msgs]

    def count(self, kind: str) -> int:
        return self.kinds().count(kind)


@contextlib.asynccontextmanager
async def subscriber(broker: TestBroker) -> AsyncIterator[Subscriber]:
    sub = Subscriber()
    async with broker.client(identifier="test-host") as client:
        await client.subscribe(f"{PREFIX}/#", qos=1)

        async def pump() -> None:
            async for message in client.messages:
                sub.on(message)

        task = asyncio.create_task(pump())
        try:
            yield sub
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def bdseq_of(p: pb.Payload) -> int:
    (m,) = [m for m in p.metrics if m.name == "bdSeq"]
    return m.long_value


def check_sessions(msgs: list[Rx], broker: TestBroker) -> list[int]:
    """The Sparkplug session rules over everything the node published; returns the bdSeq
    of each NBIRTH. Independent of linectl's node module. The delivered QoS is checked on
    mosquitto only: the embedded amqtt broker delivers at the subscription's QoS."""
    qos = broker.kind == "mosquitto"
    births: list[int] = []
    expect_seq: int | None = None
    dbirths_due = 0
    dead: set[str | None] = set()
    for rx in msgs:
        p = rx.payload
        if rx.kind == "NDEATH":
            assert not p.HasField("seq"), "NDEATH carries no seq"
            assert [m.name for m in p.metrics] == ["bdSeq"]
            assert births, "NDEATH before any NBIRTH"
            assert bdseq_of(p) == births[-1], "NDEATH bdSeq differs from the NBIRTH's"
            expect_seq = None
            continue
        assert not rx.retain, f"{rx.kind} must not be retained"
        assert rx.qos == 0 or not qos, f"{rx.kind} must be QoS 0"
        assert p.HasField("timestamp"), f"{rx.kind} without a timestamp"
        if rx.kind == "NBIRTH":
            assert p.seq == 0
            names = {m.name for m in p.metrics}
            assert {"bdSeq", "Node Control/Rebirth"} <= names
            births.append(bdseq_of(p))
            expect_seq, dbirths_due = 1, 3
            dead.clear()
            continue
        assert expect_seq is not None, f"{rx.kind} before NBIRTH"
        assert p.seq == expect_seq, f"{rx.kind} seq {p.seq}, expected {expect_seq}"
        expect_seq = (expect_seq + 1) % 256
        if rx.kind == "DBIRTH":
            if rx.device in dead:  # born again after a DDEATH
                dead.discard(rx.device)
            else:
                assert dbirths_due > 0, "DBIRTH after data"
                dbirths_due -= 1
        elif rx.kind == "DDEATH":
            assert dbirths_due == 0, "DDEATH before every DBIRTH was sent"
            dead.add(rx.device)
        else:
            assert rx.device not in dead, f"{rx.kind} for a dead device"
            assert dbirths_due == 0, f"{rx.kind} before every DBIRTH was sent"
            for m in p.metrics:
                assert not m.HasField("name"), "DATA metrics carry the alias only"
                assert m.HasField("alias")
                assert m.HasField("timestamp")
    return births


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[TestBroker]:
    async with running_broker(tmp_path / "broker") as b:
        yield b


def make_edge(
    port: int,
    line: FakeLine,
    tmp_path: Path,
    *,
    primary: str | None = None,
    protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V311,
) -> SparkplugEdge:
    node = EdgeNode(GROUP, NODE, sender=primary or "sparkplug", line_status=False)
    settings = BrokerSettings(
        "127.0.0.1", port, "edge-under-test", keepalive_s=5, protocol=protocol
    )
    return SparkplugEdge(
        node,
        line,
        settings,
        primary_host_id=primary,
        bdseq_file=BdSeqFile(tmp_path / "bdseq.json"),
        scan_period_s=0.05,
    )


@contextlib.asynccontextmanager
async def running(edge: SparkplugEdge) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(edge.run())
    try:
        yield task
    finally:
        edge.stop()
        async with asyncio.timeout(10):
            await task


def ncmd(name: str, datatype: int, value: bool | str) -> bytes:
    p = pb.Payload()
    p.timestamp = _now_ms()
    m = p.metrics.add()
    m.name = name
    m.datatype = datatype
    if isinstance(value, bool):
        m.boolean_value = value
    else:
        m.string_value = value
    return p.SerializeToString()


# ---------------------------------------------------------------------- tests


async def test_births_then_data_in_seq_order_and_ndeath_on_stop(
    broker: TestBroker, tmp_path: Path
) -> None:
    line = FakeLine()
    edge = make_edge(broker.port, line, tmp_path)
    async with subscriber(broker) as sub, running(edge):
        await sub.wait_for(lambda ms: len(ms) >= 4)
        for i in range(20):
            line.set("speed_m_min", 10.0 + i)
            line.set("vacuum_pa", 0.001 * (i % 3), Quality.STALE if i % 2 else Quality.GOOD)
            await asyncio.sleep(0.06)
        await sub.wait_for(lambda ms: sum(m.kind == "DDATA" for m in ms) >= 15)
        # The accelerator PLC stops answering: DDEATH; it answers again: DBIRTH.
        acc = ("beam_current_ma", "energy_mev", "scan_width_cm", "vacuum_pa")
        for name in (*acc, "beam_current_sp_ma"):
            line.set(name, None, Quality.COMM_FAIL)
        await sub.wait_for(lambda ms: ms[-1].kind == "DDEATH")
        line.set("energy_mev", 1.5)
        await sub.wait_for(lambda ms: sum(m.kind == "DBIRTH" for m in ms) == 4)
    await sub.wait_for(lambda ms: ms[-1].kind == "NDEATH")
    seen = [(m.kind, m.device) for m in sub.msgs]
    assert ("DBIRTH", "accelerator") in seen[seen.index(("DDEATH", "accelerator")) :]
    assert sub.kinds()[:4] == ["NBIRTH", "DBIRTH", "DBIRTH", "DBIRTH"]
    assert [m.device for m in sub.msgs[1:4]] == ["accelerator", "conveyor", "dose"]
    assert check_sessions(sub.msgs, broker) == [0]
    # The last speed published is the last one set, by alias 200, in the conveyor DDATA.
    speeds = [
        m.double_value
        for rx in sub.msgs
        if rx.kind == "DDATA" and rx.device == "conveyor"
        for m in rx.payload.metrics
        if m.alias == 200
    ]
    assert speeds[-1] == 29.0
    assert speeds == sorted(speeds)
    # A stale vacuum carries the STALE code.
    codes = {
        m.properties.values[0].int_value
        for rx in sub.msgs
        if rx.kind == "DDATA" and rx.device == "accelerator"
        for m in rx.payload.metrics
        if m.alias == 103 and len(m.properties.keys)
    }
    assert 500 in codes
    assert edge.stats.births == 1


async def test_ndeath_when_cancelled(broker: TestBroker, tmp_path: Path) -> None:
    edge = make_edge(broker.port, FakeLine(), tmp_path)
    async with subscriber(broker) as sub:
        task = asyncio.create_task(edge.run())
        await sub.wait_for(lambda ms: len(ms) >= 4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sub.wait_for(lambda ms: ms[-1].kind == "NDEATH")
    assert check_sessions(sub.msgs, broker) == [0]


async def test_rebirth_on_ncmd(broker: TestBroker, tmp_path: Path) -> None:
    line = FakeLine()
    edge = make_edge(broker.port, line, tmp_path)
    async with subscriber(broker) as sub, running(edge), broker.client() as host:
        await sub.wait_for(lambda ms: len(ms) >= 4)
        line.set("tension_n", 55.0)
        await sub.wait_for(lambda ms: "DDATA" in [m.kind for m in ms])
        await host.publish(
            f"{PREFIX}/NCMD/{NODE}", ncmd("Node Control/Rebirth", pb.Boolean, True), qos=0
        )
        await sub.wait_for(lambda ms: sum(m.kind == "DBIRTH" for m in ms) == 6)
        line.set("tension_n", 56.0)
        await sub.wait_for(lambda ms: ms[-1].kind == "DDATA")
    births = check_sessions(sub.msgs, broker)
    assert births == [0, 0]  # same bdSeq: the session went on
    second = [i for i, m in enumerate(sub.msgs) if m.kind == "NBIRTH"][1]
    assert sub.kinds()[second : second + 4] == ["NBIRTH", "DBIRTH", "DBIRTH", "DBIRTH"]
    # The rebirth re-declares current values: tension 55 in the conveyor DBIRTH.
    cnv = sub.msgs[second + 2].payload
    assert {m.name: m.double_value for m in cnv.metrics}["tension_n"] == 55.0
    assert edge.stats.rebirths == 1


async def test_commands_over_ncmd_and_dcmd(broker: TestBroker, tmp_path: Path) -> None:
    line = FakeLine()
    edge = make_edge(broker.port, line, tmp_path)
    async with subscriber(broker) as sub, running(edge), broker.client() as host:
        await sub.wait_for(lambda ms: len(ms) >= 4)
        await host.publish(f"{PREFIX}/NCMD/{NODE}", ncmd("Commands/stop", pb.Boolean, True))
        await host.publish(
            f"{PREFIX}/DCMD/{NODE}/dose",
            ncmd("Commands/select_recipe", pb.String, "pv-1x6-en50618"),
        )
        await host.publish(
            f"{PREFIX}/NCMD/{NODE}", ncmd("Commands/start_reel", pb.String, "no json")
        )

        def answers(ms: list[Rx]) -> list[dict[str, object]]:
            return [
                json.loads(m.string_value)
                for rx in ms
                if rx.kind == "NDATA"
                for m in rx.payload.metrics
                if m.alias == 16
            ]

        await sub.wait_for(lambda ms: len(answers(ms)) == 3)
    assert [c.name for c in line.commands] == [CommandName.STOP, CommandName.SELECT_RECIPE]
    assert all(c.source == "sparkplug" and c.sender == "sparkplug" for c in line.commands)
    assert line.commands[1].recipe == "pv-1x6-en50618"
    got = sorted((a["command"], a["result"]) for a in answers(sub.msgs))
    assert got == [("select_recipe", "ACK"), ("start_reel", "NAK"), ("stop", "ACK")]
    # The command that did not parse is audited too.
    assert [(c, r[:12]) for _s, c, r in line.refused] == [("start_reel", answers_reason(sub))]
    check_sessions(sub.msgs, broker)


def answers_reason(sub: object) -> str:
    """The first 12 characters of the NAK's reason, as the node answered it."""
    msgs = sub.msgs  # type: ignore[attr-defined]
    for rx in msgs:
        if rx.kind != "NDATA":
            continue
        for m in rx.payload.metrics:
            if m.alias == 16 and json.loads(m.string_value)["result"] == "NAK":
                return str(json.loads(m.string_value)["reason"])[:12]
    return ""


async def test_retained_command_is_refused_and_audited(broker: TestBroker, tmp_path: Path) -> None:
    line = FakeLine()
    async with broker.client() as host:
        # Left on the broker by some client: it would act on every reconnect.
        await host.publish(
            f"{PREFIX}/NCMD/{NODE}", ncmd("Commands/stop", pb.Boolean, True), qos=1, retain=True
        )
    edge = make_edge(broker.port, line, tmp_path)
    try:
        async with subscriber(broker) as sub, running(edge):
            await sub.wait_for(lambda ms: len(ms) >= 4)
            for _ in range(100):
                if line.refused:
                    break
                await asyncio.sleep(0.02)
    finally:
        async with broker.client() as host:
            await host.publish(f"{PREFIX}/NCMD/{NODE}", b"", qos=1, retain=True)  # clear it
    assert line.commands == []
    assert [(c, r) for _s, c, r in line.refused] == [("sparkplug_command", "retained command")]


async def test_command_retained_while_connected_is_refused_over_mqtt5(
    broker: TestBroker, tmp_path: Path
) -> None:
    """With MQTT 5 the node subscribes NCMD/DCMD retain-as-published: a command published
    with retain while it is connected keeps its RETAIN flag, and is refused, not run."""
    if broker.kind != "mosquitto":
        pytest.skip("MQTT 5 needs mosquitto")
    line = FakeLine()
    edge = make_edge(broker.port, line, tmp_path, protocol=aiomqtt.ProtocolVersion.V5)
    async with subscriber(broker) as sub, running(edge):
        await sub.wait_for(lambda ms: sub.count("DBIRTH") >= 3)
        async with broker.client() as host:
            await host.publish(
                f"{PREFIX}/NCMD/{NODE}", ncmd("Commands/stop", pb.Boolean, True), qos=1, retain=True
            )
            await host.publish(
                f"{PREFIX}/DCMD/{NODE}/conveyor",
                ncmd("Commands/reset", pb.Boolean, True),
                qos=1,
                retain=True,
            )
            for _ in range(250):
                if len(line.refused) >= 2:
                    break
                await asyncio.sleep(0.02)
            # Not retained: the same command runs (the refusal is about RETAIN only).
            await host.publish(
                f"{PREFIX}/NCMD/{NODE}", ncmd("Commands/stop", pb.Boolean, True), qos=1
            )
            for _ in range(250):
                if line.commands:
                    break
                await asyncio.sleep(0.02)
    assert [(c, r) for _s, c, r in line.refused] == [("sparkplug_command", "retained command")] * 2
    assert [c.name for c in line.commands] == [CommandName.STOP]


class CuttableProxy:
    """TCP between the edge node and the broker; `cut()` drops it like a network fault
    (no DISCONNECT reaches the broker), `restore()` lets connections through again."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", self.broker_port)
        except OSError:
            w.transport.abort()
            return
        self._writers += [w, bw]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(r, bw), pipe(br, w))


async def test_connection_loss_ndeath_then_new_bdseq_and_historical_records(
    broker: TestBroker, tmp_path: Path
) -> None:
    line = FakeLine()
    proxy = CuttableProxy(broker.port)
    await proxy.restore()
    edge = make_edge(proxy.port, line, tmp_path)
    records = [
        MetreRecord(i, 25.0 + i, 24.0, 26.0 + i, Verdict.IN_SPEC if i else Verdict.UNPROVEN)
        for i in range(3)
    ]
    async with subscriber(broker) as sub, running(edge):
        await sub.wait_for(lambda ms: len(ms) >= 4)
        edge.offer_metres("R-1", records[:1])  # live
        await sub.wait_for(lambda ms: ms[-1].device == "dose" and ms[-1].kind == "DDATA")
        await proxy.cut()
        # The broker sees the socket die without DISCONNECT: it publishes the will.
        await sub.wait_for(lambda ms: ms[-1].kind == "NDEATH")
        edge.offer_metres("R-1", records[1:])  # made while the broker is unreachable
        await asyncio.sleep(0.3)
        await proxy.restore()
        await sub.wait_for(lambda ms: sum(m.kind == "NBIRTH" for m in ms) == 2)
        await sub.wait_for(lambda ms: ms[-1].device == "dose" and ms[-1].kind == "DDATA")
    assert check_sessions(sub.msgs, broker) == [0, 1]  # a new CONNECT: the next bdSeq
    dose = [rx.payload for rx in sub.msgs if rx.kind == "DDATA" and rx.device == "dose"]
    live_metrics = list(dose[0].metrics)
    assert not any(m.is_historical for m in live_metrics)
    replay = [m for p in dose[1:] for m in p.metrics]
    assert replay
    assert all(m.is_historical for m in replay)
    assert [m.long_value for m in replay if m.alias == 302] == [1, 2]
    assert edge.stats.records_historical == 2
    assert BdSeqFile(tmp_path / "bdseq.json").load() == 1


_NODE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import aiomqtt
    from linectl.commands import CommandResult
    from linectl.quality import Quality
    from linectl.sparkplug.adapter import BdSeqFile, BrokerSettings, SparkplugEdge
    from linectl.sparkplug.node import EdgeNode, Sample

    class Line:
        def live_values(self):
            return {"speed_m_min": Sample(12.0, Quality.GOOD, 1)}
        async def execute(self, cmd):
            return CommandResult(True)

    async def main():
        node = EdgeNode("plant", "line1", line_status=False)
        edge = SparkplugEdge(
            node, Line(),
            BrokerSettings("127.0.0.1", int(sys.argv[1]), "edge-sub", keepalive_s=5,
                           protocol=aiomqtt.ProtocolVersion.V311),
            bdseq_file=BdSeqFile(Path(sys.argv[2])), scan_period_s=0.05)
        await edge.run()

    asyncio.run(main())
    """
)


async def test_ndeath_will_when_the_process_is_killed(broker: TestBroker, tmp_path: Path) -> None:
    bdseq = tmp_path / "bdseq.json"

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", _NODE_SCRIPT, str(broker.port), str(bdseq)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async with subscriber(broker) as sub:
        for n in (1, 2):
            proc = spawn()
            try:
                await sub.wait_for(lambda ms, n=n: sum(m.kind == "NBIRTH" for m in ms) == n, 30)
            finally:
                proc.kill()  # SIGKILL: no NDEATH of its own, no DISCONNECT
                _, err = proc.communicate(timeout=10)
            await sub.wait_for(lambda ms, n=n: sum(m.kind == "NDEATH" for m in ms) == n)
            death = sub.msgs[-1]
            assert death.qos == 1 or broker.kind == "amqtt"  # the will's QoS
            assert not death.retain
    births = check_sessions(sub.msgs, broker)
    assert births == [0, 1], err.decode()  # the file carried bdSeq over the restart


async def test_births_wait_for_primary_host_online(broker: TestBroker, tmp_path: Path) -> None:
    line = FakeLine()
    edge = make_edge(broker.port, line, tmp_path, primary="scada-1")
    state_topic = "spBv1.0/STATE/scada-1"

    def state(online: bool, ts: int) -> bytes:
        return json.dumps({"online": online, "timestamp": ts}).encode()

    async with subscriber(broker) as sub, running(edge), broker.client() as host:
        await asyncio.sleep(0.5)
        assert sub.msgs == []  # connected, but no host yet: no birth
        await host.publish(state_topic, state(True, 1000), qos=1, retain=True)
        await sub.wait_for(lambda ms: len(ms) >= 4)
        # The host loses this broker: the node must leave (NDEATH) and wait again.
        await host.publish(state_topic, state(False, 1000), qos=1, retain=True)
        await sub.wait_for(lambda ms: ms[-1].kind == "NDEATH")
        await asyncio.sleep(0.5)
        assert sub.count("NBIRTH") == 1
        await host.publish(state_topic, state(True, 2000), qos=1, retain=True)
        await sub.wait_for(lambda ms: sum(m.kind == "NBIRTH" for m in ms) == 2)
        await host.publish(state_topic, b"", qos=1, retain=True)  # clear the retained STATE
    assert check_sessions(sub.msgs, broker)[:2] == [0, 1]


async def test_outbox_records_durable_across_outage_and_restart(
    broker: TestBroker, tmp_path: Path
) -> None:
    from linectl.store import RecordStore, ReelInfo, utc_now_iso

    db = tmp_path / "records.sqlite"
    writer = RecordStore(db)  # the service's store
    writer.open_reel(
        ReelInfo("R-5", "line1", "pv", "1", "0" * 64, "{}", "op", 100.0, utc_now_iso())
    )

    def metre(i: int) -> MetreRecord:
        return MetreRecord(i, 25.0 + i, 24.0, 26.0 + i, Verdict.IN_SPEC)

    writer.add_metres("R-5", [metre(0)], utc_now_iso())  # before Sparkplug existed
    line = FakeLine()
    proxy = CuttableProxy(broker.port)
    await proxy.restore()

    def dose_indices(ms: list[Rx]) -> list[tuple[int, bool]]:
        return [
            (m.long_value, m.is_historical)
            for rx in ms
            if rx.kind == "DDATA" and rx.device == "dose"
            for m in rx.payload.metrics
            if m.alias == 302
        ]

    with RecordStore(db) as reader:  # the edge node's own connection
        edge = make_edge(proxy.port, line, tmp_path)
        edge.outbox = reader
        async with subscriber(broker) as sub:
            async with running(edge):
                await sub.wait_for(lambda ms: len(ms) >= 4)
                writer.add_metres("R-5", [metre(1)], utc_now_iso())
                await sub.wait_for(lambda ms: len(dose_indices(ms)) == 1)
                await proxy.cut()
                await sub.wait_for(lambda ms: ms[-1].kind == "NDEATH")
                writer.add_metres("R-5", [metre(2), metre(3)], utc_now_iso())
                writer.mark_unproven("R-5", 4, 5, "controller down", utc_now_iso())
                await asyncio.sleep(0.2)
                await proxy.restore()
                await sub.wait_for(lambda ms: len(dose_indices(ms)) == 5)
            writer.add_metres("R-5", [metre(6)], utc_now_iso())  # Sparkplug is down
            restarted = make_edge(proxy.port, line, tmp_path)
            restarted.outbox = reader
            async with running(restarted):
                await sub.wait_for(lambda ms: len(dose_indices(ms)) == 6)
                await asyncio.sleep(0.3)  # nothing more may come
        assert reader.outbox_cursor("sparkplug") == writer.outbox_last_seq()
    writer.close()
    assert check_sessions(sub.msgs, broker) == [0, 1, 2]
    # Metre 0 predates the consumer; 1 went live; 2..5 waited for the broker, 6 for the
    # restart: historical, in order, each exactly once.
    assert dose_indices(sub.msgs) == [
        (1, False),
        (2, True),
        (3, True),
        (4, True),
        (5, True),
        (6, True),
    ]
    unproven = [rx.payload for rx in sub.msgs if rx.kind == "DDATA" and rx.device == "dose"][2]
    by_alias = {m.alias: m for m in unproven.metrics[:7]}
    assert by_alias[303].is_null  # no dose for an unproven metre
    assert by_alias[306].string_value == "unproven"
    assert by_alias[307].string_value == "controller down"
