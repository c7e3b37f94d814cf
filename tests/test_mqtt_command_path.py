"""The MQTT command path under attack, against a running line on a real mosquitto (issue 10).

- A command published with retain while linectl is connected is refused and audited,
  and acts on nothing: MQTT 5 retain-as-published keeps its RETAIN flag on delivery.
- An answer goes only to the sender's own `response/<sender>` topic, whatever *Response
  Topic* the command names (another sender's, or one outside the prefix).

Each checks that nothing changed that should not have: line state, reel, audit rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import TestBroker, running_broker
from e2e_scenarios import MqttLine, mqtt_line, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linectl.core.control import LineState
from linectl.store import AuditEvent, RecordStore

RETAINED = "retained commands are refused: publish commands with retain=false"


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[TestBroker]:
    async with running_broker(tmp_path / "broker") as b:
        if b.kind != "mosquitto":
            pytest.skip("MQTT 5 (retain-as-published, response topics) needs mosquitto")
        yield b


@contextlib.asynccontextmanager
async def running_line(broker: TestBroker, tmp_path: Path) -> AsyncIterator[MqttLine]:
    """The daemon's wiring (service, MQTT bridge) on the simulated line, READY."""
    async with mqtt_line(broker.host, broker.port, tmp_path, seed=5) as line:
        yield line


def audit(db: Path) -> list[AuditEvent]:
    """The audit rows (commands and operator actions; state transitions left out)."""
    with RecordStore(db) as store:
        return [e for e in store.events() if e.action != "transition"]


async def audit_rows(db: Path) -> list[AuditEvent]:
    return await asyncio.to_thread(audit, db)


async def reel_state(db: Path, reel_id: str) -> str:
    def read() -> str:
        with RecordStore(db) as store:
            return store.reel(reel_id).state

    return await asyncio.to_thread(read)


@dataclass
class Seen:
    """Every message a client got: (topic, JSON payload, retain, correlation data)."""

    messages: list[tuple[str, dict[str, Any], bool, bytes | None]] = field(default_factory=list)

    async def listen(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            try:
                payload = json.loads(bytes(m.payload))  # type: ignore[arg-type]
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            corr = getattr(m.properties, "CorrelationData", None)
            self.messages.append((m.topic.value, payload, m.retain, corr))

    def answers(self) -> list[tuple[str, dict[str, Any], bytes | None]]:
        """The line's answers (schema `response`), wherever they were published."""
        return [
            (t, p, c) for t, p, _r, c in self.messages if p.get("schema") == "linectl.response/1"
        ]


@contextlib.asynccontextmanager
async def listening(client: aiomqtt.Client, *topics: str) -> AsyncIterator[Seen]:
    for t in topics:
        await client.subscribe(t, qos=1)
    seen = Seen()
    task = asyncio.create_task(seen.listen(client))
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def props(response_topic: str, correlation: bytes) -> Properties:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    p.ResponseTopic = response_topic
    p.CorrelationData = correlation
    return p


# ---------------------------------------------------------------------- retained commands


async def test_a_command_retained_while_linectl_is_connected_does_not_act(
    broker: TestBroker, tmp_path: Path
) -> None:
    async with (
        running_line(broker, tmp_path) as line,
        broker.client(identifier="hmi-op-1") as client,
        listening(client, line.topics.response("op-1")) as seen,
    ):
        t, svc = line.topics, line.svc
        start = {"request_id": "start-1", "reel_id": "R1", "length_m": 50.0}
        await client.publish(t.cmd("start_reel", "op-1"), json.dumps(start), qos=1)
        await wait_for(lambda: len(seen.answers()) == 1, 10.0, "the answer to start_reel")
        assert [p["result"] for _t, p, _c in seen.answers()] == ["ACK"]
        await wait_for(lambda: svc.ctl.state is LineState.RUNNING, 30.0, "RUNNING")
        await wait_for(lambda: bool(audit(line.db)), 10.0, "the start's audit row")
        before = await audit_rows(line.db)
        assert [(e.action, e.accepted) for e in before] == [("start_reel", True)]
        reel_before = svc.ctl.reel

        # Published with retain while the line is connected and running: a plain `stop`
        # would stop it; retained, it must be refused, audited, and change nothing.
        await client.publish(
            t.cmd("stop", "op-1"), b'{"request_id": "retained-stop"}', qos=1, retain=True
        )
        await wait_for(lambda: len(seen.answers()) == 2, 10.0, "the answer to the retained stop")
        answer = seen.answers()[1][1]
        assert (answer["result"], answer["command"], answer["reason"]) == ("NAK", "stop", RETAINED)
        await wait_for(lambda: len(audit(line.db)) == 2, 10.0, "the refusal's audit row")
        # Several control cycles later the line still runs the same reel.
        await asyncio.sleep(0.5)
        assert svc.ctl.state is LineState.RUNNING
        assert svc.ctl.reel is reel_before
        assert await reel_state(line.db, "R1") == "open"
        after = await audit_rows(line.db)
        assert after[:1] == before
        assert [(e.actor, e.action, e.accepted, e.reason) for e in after[1:]] == [
            ("op-1", "stop", False, RETAINED)
        ]
        assert after[1].detail == {"source": "mqtt"}
        assert len(seen.answers()) == 2  # one answer each, nothing else acted


# ---------------------------------------------------------------------- answer topics


async def test_answers_go_only_to_the_senders_own_response_topic(
    broker: TestBroker, tmp_path: Path
) -> None:
    async with (
        running_line(broker, tmp_path) as line,
        broker.client(identifier="spy") as spy_client,
        listening(spy_client, "#") as spy,
        broker.client(identifier="hmi-op-1") as client,
    ):
        t, svc = line.topics, line.svc
        # Aimed at another operator, outside the prefix, at linectl's own state topic,
        # and at the sender's own topic. `stop` in READY: refused, changes nothing.
        aims = {
            "other-user": t.response("op-2"),
            "outside": "elsewhere/inbox",
            "own-state": t.state,
            "own": t.response("op-1"),
        }
        for rid, aim in aims.items():
            body = json.dumps({"request_id": rid})
            await client.publish(
                t.cmd("stop", "op-1"), body, qos=1, properties=props(aim, rid.encode())
            )
        await wait_for(lambda: len(spy.answers()) >= len(aims), 10.0, "every answer")
        await asyncio.sleep(0.3)  # anything more would arrive now
        answers = spy.answers()
        assert {topic for topic, _p, _c in answers} == {t.response("op-1")}
        assert sorted(p["request_id"] for _t, p, _c in answers) == sorted(aims)
        # Correlation data comes back with each, so MQTT 5 clients still match answers.
        assert all(c == p["request_id"].encode() for _t, p, c in answers)
        assert all(p["reason"] == "nothing to stop in state ready" for _t, p, _c in answers)
        assert not [m for m in spy.messages if m[0] in (t.response("op-2"), "elsewhere/inbox")]
        assert svc.ctl.state is LineState.READY
    rows = audit(line.db)
    assert [(e.actor, e.action, e.accepted) for e in rows] == [("op-1", "stop", False)] * 4
