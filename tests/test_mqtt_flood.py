"""The command path under a flood, against a real mosquitto (issue 10, items 2 to 4).

- A sender with no role is refused unread and counted: one audit row per window, on no
  reel, whatever the flood; an operator's command is answered meanwhile and the line
  does not move.
- An authorised sender that floods fills only its own bounded queue: another sender's
  command is served before the flood has drained.
- The dedupe cache is per sender: another sender's traffic cannot evict a request id,
  and after a restart a replayed request is answered from the audit record, not run.
- A topic with an empty sender level is audited (in the aggregate); every stored name
  from a topic is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from broker import TestBroker, running_broker
from e2e_scenarios import MqttLine, mqtt_line, wait_for
from test_mqtt import FakeLine, mqtt_cfg, running_bridge

from linectl.commands import MAX_STORED_TEXT, CommandInbox, CommandName, RefusalTally
from linectl.core.control import LineState
from linectl.mqtt import MqttBridge
from linectl.store import AuditEvent, RecordStore
from linectl.telemetry import Topics

WINDOW_S = 0.5


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[TestBroker]:
    async with running_broker(tmp_path / "broker") as b:
        yield b


@contextlib.asynccontextmanager
async def running_line(broker: TestBroker, tmp_path: Path) -> AsyncIterator[MqttLine]:
    """The service and its bridge, READY; refusals tallied per WINDOW_S."""
    async with mqtt_line(
        broker.host, broker.port, tmp_path, seed=9, refusal_window_s=WINDOW_S
    ) as line:
        yield line


def audit(db: Path) -> list[AuditEvent]:
    with RecordStore(db) as store:
        return [e for e in store.events() if e.action != "transition"]


async def answers_of(client: aiomqtt.Client, into: dict[str, list[dict[str, object]]]) -> None:
    async for m in client.messages:
        payload = json.loads(bytes(m.payload))  # type: ignore[arg-type]
        into.setdefault(m.topic.value.rsplit("/", 1)[1], []).append(payload)


@contextlib.asynccontextmanager
async def listening(
    client: aiomqtt.Client, topics: Topics, *senders: str
) -> AsyncIterator[dict[str, list[dict[str, object]]]]:
    for s in senders:
        await client.subscribe(topics.response(s), qos=1)
    got: dict[str, list[dict[str, object]]] = {}
    task = asyncio.create_task(answers_of(client, got))
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_flood_from_senders_with_no_role_is_counted_not_filed_under_the_reel(
    broker: TestBroker, tmp_path: Path
) -> None:
    long_sender = "x" * 10_000
    async with (
        running_line(broker, tmp_path) as line,
        broker.client() as client,
        listening(client, line.topics, "op-1", "intruder") as got,
    ):
        t = line.topics
        flood = 1500
        for i in range(flood):
            await client.publish(t.cmd("stop", "intruder"), b'{"request_id": "f%d"}' % i, qos=0)
        await client.publish(t.cmd("stop", long_sender), b"{}", qos=1)
        await client.publish(f"{t.base}/cmd/stop/", b"{}", qos=1)  # an empty sender level
        await client.publish(t.cmd("x" * 5000, "op-2"), b"{}", qos=1)  # a known sender
        await client.publish(
            t.cmd("ack_alarm", "op-1"), b'{"request_id": "mine", "alarm": "*"}', qos=1
        )
        await wait_for(lambda: got.get("op-1"), 10.0, "the operator's answer")
        assert got["op-1"][0]["request_id"] == "mine", got["op-1"]
        await wait_for(
            lambda: line.bridge.refusals.total >= flood + 2, 20.0, "every refusal counted"
        )
        rows: list[AuditEvent] = []

        def aggregated() -> bool:
            rows[:] = [e for e in audit(line.db) if e.action == "refused_commands"]
            return sum(int(e.detail["refused"]) for e in rows) >= flood + 2

        await wait_for(aggregated, 20.0, "the aggregate audited")
        assert line.svc.ctl.state is LineState.READY
        intruder_answers = len(got.get("intruder", []))
    events = audit(line.db)
    assert all(e.reel_id is None for e in rows)
    assert len(rows) <= 20  # one per window, not one per message
    senders = {s for e in rows for s in e.detail["by_sender"]}
    assert "intruder" in senders
    assert "(empty)" in senders
    assert all(len(s) <= MAX_STORED_TEXT + 30 for s in senders)
    # No row per refused message, and every name stored from a topic is bounded.
    assert not [e for e in events if e.actor in ("intruder", long_sender)]
    assert all(len(e.actor) <= MAX_STORED_TEXT + 30 for e in events)
    assert all(len(e.action) <= MAX_STORED_TEXT + 30 for e in events)
    bad_name = [e for e in events if e.actor == "op-2"]
    assert len(bad_name) == 1
    assert not bad_name[0].accepted
    # Answers to the flood are rate-limited (one a second per sender).
    assert 1 <= intruder_answers <= 30


async def test_an_authorised_flood_fills_its_own_queue_and_delays_no_one_else(
    broker: TestBroker, tmp_path: Path
) -> None:
    async with (
        running_line(broker, tmp_path) as line,
        broker.client() as client,
        listening(client, line.topics, "op-1", "op-2") as got,
    ):
        t = line.topics
        for i in range(300):
            await client.publish(t.cmd("stop", "op-2"), b'{"request_id": "s%d"}' % i, qos=1)
        await client.publish(t.cmd("stop", "op-1"), b'{"request_id": "mine"}', qos=1)
        await wait_for(lambda: got.get("op-1"), 10.0, "the operator's answer")
        op2_answers_then = len(got.get("op-2", []))
        await wait_for(lambda: line.bridge.refusals.total > 0, 10.0, "op-2's overflow dropped")
        assert line.svc.ctl.state is LineState.READY
    # op-1 was served while op-2's flood was still being answered, not after all of it.
    assert op2_answers_then < 300
    executed = [e for e in audit(line.db) if e.actor == "op-2" and e.action == "stop"]
    assert len(executed) < 300  # what overflowed its queue was dropped, not run


async def test_the_dedupe_cache_is_per_sender(broker: TestBroker, tmp_path: Path) -> None:
    line = FakeLine()
    bridge = MqttBridge(
        line,
        mqtt_cfg(broker, identities={"op-1": "operator", "op-2": "operator"}),
        line_id="line1",
        store_path=tmp_path / "r.sqlite",
        answers_per_sender=16,
    )
    topics = Topics.for_line("linectl", "line1")
    async with running_bridge(bridge), broker.client() as client:
        await client.publish(topics.cmd("stop", "op-1"), b'{"request_id": "keep"}', qos=1)
        await wait_for(lambda: len(line.commands) == 1, 10.0, "op-1's stop")
        for i in range(100):  # more than the cache holds per sender, from someone else
            await client.publish(topics.cmd("reset", "op-2"), b'{"request_id": "r%d"}' % i, qos=1)
            await wait_for(lambda n=i: len(line.commands) == n + 2, 10.0, "op-2's reset")
        await client.publish(topics.cmd("stop", "op-1"), b'{"request_id": "keep"}', qos=1)
        await client.publish(topics.cmd("stop", "op-1"), b'{"request_id": "new"}', qos=1)
        await wait_for(lambda: len(line.commands) == 102, 10.0, "op-1's new stop")
        await asyncio.sleep(0.3)
    stops = [c.request_id for c in line.commands if c.name is CommandName.STOP]
    assert stops == ["keep", "new"]  # the replay of "keep" was answered, not run


async def test_a_request_replayed_after_a_restart_is_answered_from_the_record(
    broker: TestBroker, tmp_path: Path
) -> None:
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as store:  # what the earlier run audited
        store.audit(
            "2026-12-07T00:00:00.000+00:00",
            "op-1",
            "stop",
            {"source": "mqtt", "request_id": "before"},
            True,
        )
    line = FakeLine()
    bridge = MqttBridge(line, mqtt_cfg(broker), line_id="line1", store_path=db)
    topics = Topics.for_line("linectl", "line1")
    async with (
        running_bridge(bridge),
        broker.client() as client,
        listening(client, topics, "op-1") as got,
    ):
        await client.publish(topics.cmd("stop", "op-1"), b'{"request_id": "before"}', qos=1)
        await wait_for(lambda: got.get("op-1"), 10.0, "the answer")
        await client.publish(topics.cmd("stop", "op-1"), b'{"request_id": "after"}', qos=1)
        await wait_for(lambda: len(got.get("op-1", [])) == 2, 10.0, "the second answer")
    first = got["op-1"][0]
    assert (first["result"], first["request_id"]) == ("ACK", "before")
    assert "audit record" in str(first["detail"])
    assert [c.request_id for c in line.commands] == ["after"]


# ---------------------------------------------------------------------- pure parts


def test_inbox_serves_senders_round_robin_and_bounds_each_queue() -> None:
    inbox: CommandInbox[int] = CommandInbox(per_sender=3, max_senders=2)
    assert [inbox.offer("a", i) for i in range(5)] == [True, True, True, False, False]
    assert inbox.offer("b", 100)
    assert not inbox.offer("c", 200)  # too many senders waiting
    assert inbox.take() == [("a", 0), ("b", 100)]
    assert inbox.take() == []  # one in flight per sender
    inbox.done("b")
    inbox.done("a")
    assert inbox.take() == [("a", 1)]
    assert inbox.offer("c", 201)  # b's queue is gone: room for another sender


def test_tally_aggregates_bounds_senders_and_rate_limits_answers() -> None:
    tally = RefusalTally(window_s=10.0, answer_interval_s=1.0, max_answers_per_s=5.0, max_senders=3)
    answered = [tally.add("s", "no role", 0.001 * i) for i in range(100)]
    assert answered.count(True) == 1  # once a second per sender
    for i in range(10):
        tally.add(f"other{i}" + "y" * 1000, "no role", 0.5)
    assert not tally.due(5.0)
    assert tally.due(10.0)
    summary = tally.flush(10.0)
    assert summary is not None
    assert summary["refused"] == 110
    assert len(summary["by_sender"]) == 3
    assert summary["other_senders"] == 8
    assert all(len(s) <= MAX_STORED_TEXT + 30 for s in summary["by_sender"])
    assert tally.flush(11.0) is None
