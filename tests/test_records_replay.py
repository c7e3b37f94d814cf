"""The line's side of the plant historian, against a real broker (docs/mqtt.md, "The plant
historian"): `records/head`, replays of outbox ranges with the missing sub-ranges,
refused requests, confirmations advancing the historian's outbox cursor (and refused
when the store went back), and the retention the bridge runs."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from broker import TestBroker, mosquitto_binary, running_broker
from test_mqtt import Collector, FakeLine, eventually, mqtt_cfg, running_bridge

from linectl.config import Records
from linectl.core.ledger import MetreRecord, Verdict
from linectl.mqtt import MqttBridge, historian_cursor
from linectl.store import RecordStore, ReelInfo
from linectl.telemetry import (
    MAX_REPLAY_ROWS,
    SCHEMAS,
    RequestError,
    Topics,
    historian_confirmed_payload,
    parse_confirmation,
    parse_replay_request,
    record_payload,
    records_head_payload,
    replay_done_payload,
    replay_request_payload,
)

TOPICS = Topics.for_line("linectl", "line1")
W0 = "2025-03-01T10:00:00.000+00:00"
W1 = "2025-03-01T10:05:00.000+00:00"


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[TestBroker]:
    async with running_broker(tmp_path / "broker") as b:
        if b.kind != "mosquitto":
            pytest.skip("the historian's topics are tested on mosquitto (MQTT 5)")
        yield b


class DeepQueueBroker(TestBroker):
    """mosquitto that queues any number of QoS 1 messages for a subscriber that lags, as a
    plant's broker is set up for its historian (docs/mqtt.md, "Replays"): by default
    mosquitto drops what is queued beyond 1000 messages, and a long replay outruns this
    test's subscriber (it shares the event loop with the bridge)."""

    __test__ = False

    def _mosquitto_conf(self) -> Path:
        conf = super()._mosquitto_conf()
        conf.write_text(conf.read_text() + "max_queued_messages 0\n")
        return conf


def bridge_for(
    broker: TestBroker, db: Path, *, historians: tuple[str, ...] = ("plant",), **kw: Any
) -> MqttBridge:
    retention_days = kw.pop("retention_days", None)
    return MqttBridge(
        FakeLine(),
        mqtt_cfg(broker),
        line_id="line1",
        store_path=db,
        protocol=broker.protocol,
        records=Records(historians=list(historians), retention_days=retention_days),
        **kw,
    )


def fill(store: RecordStore, n: int) -> None:
    """n outbox rows of every kind: a reel start, metres, alarms, audit events."""
    store.open_reel(
        ReelInfo("R1", "line1", "PV", "1", "0" * 64, '{"k": 1}', "alice", 100.0, W0, {"a": 1})
    )
    i = 1
    while i < n:
        kind = i % 3
        if kind == 0:
            store.add_metres("R1", [MetreRecord(i, 120.0, 119.0, 121.0, Verdict.IN_SPEC)], W1)
        elif kind == 1:
            store.raise_alarm("vacuum", "vacuum fault", W1, reel_id="R1")
        else:
            store.audit(W1, "alice", "x", {"i": i}, True, reel_id="R1")
        i += 1
    assert store.outbox_last_seq() == n


def bulk_audit(db: Path, n: int) -> None:
    """n audit rows in the outbox at once (a fast setup: one transaction)."""
    data = json.dumps({"event_id": 0, "actor": "x", "action": "x", "detail": {}})
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany(
            "INSERT INTO outbox (kind, t, data) VALUES ('audit', ?, ?)", [(W1, data)] * n
        )
    conn.close()


async def publish(broker: TestBroker, topic: str, payload: Any, *, retain: bool = False) -> None:
    raw = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    async with broker.client() as c:
        await c.publish(topic, raw, qos=1, retain=retain)


def replayed(sub: Collector, hid: str = "plant") -> list[tuple[str, dict[str, Any]]]:
    """(last topic level, payload) of everything on replayed/<hid>/, in arrival order."""
    head = f"linectl/line1/replayed/{hid}/"
    return [(m.topic[len(head) :], m.payload) for m in sub.messages if m.topic.startswith(head)]


def dones(sub: Collector, hid: str = "plant") -> list[dict[str, Any]]:
    return [p for kind, p in replayed(sub, hid) if kind == "done"]


# ---------------------------------------------------------------------- pure: topics, payloads


def test_historian_topics_and_their_parsing() -> None:
    assert TOPICS.records_head == "linectl/line1/records/head"
    assert TOPICS.replay("plant") == "linectl/line1/replay/plant"
    assert TOPICS.replayed("plant", "metres") == "linectl/line1/replayed/plant/metres"
    assert TOPICS.replay_done("plant") == "linectl/line1/replayed/plant/done"
    assert TOPICS.confirmed("plant") == "linectl/line1/historian/plant/confirmed"
    assert TOPICS.parse_replay("linectl/line1/replay/plant") == "plant"
    assert TOPICS.parse_replay("linectl/line1/replay/") == ""
    assert TOPICS.parse_replay("linectl/line1/replay/a/b") is None
    assert TOPICS.parse_replay("linectl/line2/replay/plant") is None
    assert TOPICS.parse_confirmed("linectl/line1/historian/plant/confirmed") == "plant"
    assert TOPICS.parse_confirmed("linectl/line1/historian/a/b/confirmed") is None
    assert TOPICS.parse_confirmed("linectl/line1/historian/plant/other") is None
    with pytest.raises(ValueError, match="unknown record kind"):
        TOPICS.replayed("plant", "done")


def test_requests_parse_and_payloads_match_their_schemas() -> None:
    req = parse_replay_request(json.dumps(replay_request_payload(3, 9, "r")))
    assert (req.from_seq, req.to_seq, req.request_id) == (3, 9, "r")
    assert parse_replay_request(b'{"from_seq": 1, "to_seq": 100000}').request_id == ""
    with pytest.raises(RequestError, match="bytes, more than"):
        parse_replay_request(b" " * 5000)
    with pytest.raises(RequestError, match="request_id must be text") as info:
        parse_replay_request(b'{"from_seq": 1, "to_seq": 2, "request_id": 7}')
    assert (info.value.from_seq, info.value.to_seq) == (1, 2)
    conf = parse_confirmation(json.dumps(historian_confirmed_payload("u", 0, 5)))
    assert (conf.store_id, conf.seq) == ("u", 0)
    for bad, says in [
        (b'{"store_id": "u", "seq": -1}', "negative"),
        (b'{"store_id": "", "seq": 1}', "store_id"),
        (b'{"store_id": "u", "seq": true}', "not a whole number"),
    ]:
        with pytest.raises(RequestError, match=says):
            parse_confirmation(bad)
    for payload, name in [
        (records_head_payload("u", 5, 1, 0), "records_head"),
        (replay_done_payload("r", 1, 5, [(2, 3)], 0), "replay_done"),
        (replay_done_payload(None, None, None, [], 0, error="x"), "replay_done"),
        (replay_request_payload(1, 2, "r"), "replay_request"),
        (historian_confirmed_payload("u", 5, 0), "historian_confirmed"),
    ]:
        schema = SCHEMAS[name]
        assert payload["schema"] == schema["$id"]
        assert set(schema["required"]) <= set(payload)
        assert set(payload) <= set(schema["properties"])


# ---------------------------------------------------------------------- records/head


async def test_head_is_retained_with_the_newest_and_oldest_seq(
    broker: TestBroker, tmp_path: Path
) -> None:
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as store:
        fill(store, 5)
        store_id = store.store_id
        bridge = bridge_for(broker, db)
        async with running_bridge(bridge), Collector(broker, TOPICS.records_head) as sub:
            await eventually(lambda: sub.on("records/head") != [], "the head")
            head = sub.messages[0]
            assert head.retain  # a subscriber that comes later gets it at once
            assert head.payload["seq"] == 5
            assert head.payload["first_seq"] == 1
            assert head.payload["store_id"] == store_id
            assert head.payload["schema"] == "linectl.records_head/1"
            assert set(head.payload) <= set(SCHEMAS["records_head"]["properties"])

            # A burst of records: the head follows, at most once a second.
            t0 = time.monotonic()
            for i in range(30):
                store.audit(W1, "alice", "x", {"i": i}, True)
                await asyncio.sleep(0.05)
            await eventually(lambda: sub.on("records/head")[-1]["seq"] == 35, "the new head")
            elapsed_s = time.monotonic() - t0
            published = len(sub.on("records/head")) - 1
            assert published <= elapsed_s / bridge.head_every_s + 1.5, (published, elapsed_s)

            # Pruning moves first_seq.
            store.advance_outbox_cursor(historian_cursor("plant"), 20)
            store.advance_outbox_cursor("mqtt", 35)
            assert store.prune_outbox(keep=0) == 20
            await eventually(
                lambda: sub.on("records/head")[-1]["first_seq"] == 21, "first_seq after pruning"
            )


# ---------------------------------------------------------------------- replays


async def test_a_replay_is_the_held_rows_in_order_then_done(
    broker: TestBroker, tmp_path: Path
) -> None:
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as store:
        fill(store, 30)
        rows = {r.seq: r for r in store.outbox_after(0, limit=100)}
        store_id = store.store_id
    bridge = bridge_for(broker, db)
    async with Collector(broker, "linectl/line1/#") as sub, running_bridge(bridge):
        await eventually(lambda: len(sub.on("/records/audit")) >= 9, "the live records")
        live = sub.on("/records/reel")[0]
        assert (live["store_id"], live["t"], live["seq"]) == (store_id, W0, 1)
        assert "replay" not in live
        request = replay_request_payload(5, 20, "r1")
        await publish(broker, TOPICS.replay("plant"), request)
        await eventually(lambda: dones(sub) != [], "the replay's done")
        got = replayed(sub)
        # Every held row of the range, once, in seq order, and the done after them.
        assert [p["seq"] for _k, p in got[:-1]] == list(range(5, 21))
        assert got[-1] == ("done", got[-1][1])
        for kind, p in got[:-1]:
            row = rows[p["seq"]]
            assert kind == row.kind
            expected = record_payload(
                row.seq, row.kind, row.t, row.data, historical=True, store_id=store_id, replay=True
            )
            assert p == expected
        done = got[-1][1]
        assert done["request_id"] == "r1"
        assert (done["from_seq"], done["to_seq"], done["missing"]) == (5, 20, [])
        assert "error" not in done
        assert set(done) <= set(SCHEMAS["replay_done"]["properties"])
        assert bridge.stats.records_replayed == 16
        assert bridge.stats.replays == 1


async def test_a_replay_reports_what_was_pruned_or_never_written(
    broker: TestBroker, tmp_path: Path
) -> None:
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as store:
        fill(store, 30)
        store.advance_outbox_cursor("mqtt", 30)
        store.advance_outbox_cursor(historian_cursor("plant"), 7)
        assert store.prune_outbox(keep=0) == 7
        # A hole in the middle (as a replay never sees one; the line reports it all the same).
        with store._lock:
            store._db.execute("DELETE FROM outbox WHERE seq BETWEEN 12 AND 13")
    bridge = bridge_for(broker, db)
    async with Collector(broker, "linectl/line1/replayed/#") as sub, running_bridge(bridge):
        await publish(broker, TOPICS.replay("plant"), replay_request_payload(1, 40, "r2"))
        await eventually(lambda: dones(sub) != [], "the replay's done")
        seqs = [p["seq"] for k, p in replayed(sub) if k != "done"]
        assert seqs == [*range(8, 12), *range(14, 31)]
        assert dones(sub)[0]["missing"] == [[1, 7], [12, 13], [31, 40]]
        # A range wholly pruned: only the done.
        await publish(broker, TOPICS.replay("plant"), replay_request_payload(2, 3, "r3"))
        await eventually(lambda: len(dones(sub)) == 2, "the second done")
        assert dones(sub)[1]["missing"] == [[2, 3]]
        assert len(seqs) == len([1 for k, _p in replayed(sub) if k != "done"])


async def test_a_request_for_a_historian_not_configured_is_ignored(
    broker: TestBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "linectl.mqtt")
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as store:
        fill(store, 5)
    bridge = bridge_for(broker, db)
    async with Collector(broker, "linectl/line1/replayed/#") as sub, running_bridge(bridge):
        for _ in range(3):
            await publish(broker, TOPICS.replay("stranger"), replay_request_payload(1, 5, "x"))
        await eventually(
            lambda: "'stranger' ignored: it is not in [records] historians" in caplog.text,
            "the warning",
        )
        # The configured historian is served meanwhile, the stranger never.
        await publish(broker, TOPICS.replay("plant"), replay_request_payload(1, 1, "p"))
        await eventually(lambda: dones(sub) != [], "the configured historian's done")
        await asyncio.sleep(0.3)
        assert replayed(sub, "stranger") == []
    warnings = [r for r in caplog.records if "stranger" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING]  # once, not per request


@pytest.mark.parametrize(
    "case",
    [
        (b"{not json", False, "not JSON"),
        (b"[1, 2]", False, "not a JSON object"),
        ({"from_seq": 1, "request_id": "m"}, False, "to_seq is missing"),
        ({"from_seq": -3, "to_seq": 5, "request_id": "m"}, False, "from_seq -3 is below 1"),
        ({"from_seq": "1", "to_seq": 5, "request_id": "m"}, False, "from_seq '1' is not a whole"),
        ({"from_seq": 9, "to_seq": 5, "request_id": "m"}, False, "inverted"),
        (
            {"from_seq": 1, "to_seq": MAX_REPLAY_ROWS + 1, "request_id": "m"},
            False,
            f"more than {MAX_REPLAY_ROWS}",
        ),
        ({"schema": "linectl.other/1", "from_seq": 1, "to_seq": 2}, False, "names schema"),
        (replay_request_payload(1, 2, "m"), True, "retained replay requests are refused"),
    ],
)
async def test_a_malformed_request_is_answered_with_an_error_and_logged(
    broker: TestBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: tuple[Any, bool, str],
) -> None:
    payload, retain, says = case
    caplog.set_level(logging.INFO, "linectl.mqtt")
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as store:
        fill(store, 5)
    bridge = bridge_for(broker, db)
    try:
        async with Collector(broker, "linectl/line1/replayed/#") as sub, running_bridge(bridge):
            await publish(broker, TOPICS.replay("plant"), payload, retain=retain)
            await eventually(lambda: dones(sub) != [], "the refusal")
            await asyncio.sleep(0.2)
            (done,) = dones(sub)
            assert says in done["error"]
            assert done["missing"] == []
            # Nothing but the done: no record is replayed for a refused request.
            assert [k for k, _p in replayed(sub)] == ["done"]
            if isinstance(payload, dict) and payload.get("request_id") == "m":
                assert done["request_id"] == "m"
    finally:
        if retain:
            await publish(broker, TOPICS.replay("plant"), b"", retain=True)  # clear it
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "replay request from historian 'plant' refused" in errors[0].getMessage()
    assert says in errors[0].getMessage()


async def test_a_newer_request_replaces_a_queued_one_and_live_records_go_on(
    tmp_path: Path,
) -> None:
    if mosquitto_binary() is None:
        pytest.skip("needs mosquitto")
    broker = DeepQueueBroker(tmp_path / "broker")
    await broker.start()
    try:
        await _newer_replaces_queued(broker, tmp_path)
    finally:
        await broker.stop()


async def _newer_replaces_queued(broker: TestBroker, tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    n = 5_000  # long enough to be under way when the live record comes
    with RecordStore(db) as store:
        store.audit(W0, "alice", "x", {}, True)
    bulk_audit(db, n)
    with RecordStore(db) as store:
        store.advance_outbox_cursor("mqtt", n + 1)  # the live publisher is up to date
    bridge = bridge_for(broker, db)
    async with Collector(broker, "linectl/line1/#") as sub, running_bridge(bridge):
        await publish(broker, TOPICS.replay("plant"), replay_request_payload(1, n, "big"))
        await eventually(lambda: replayed(sub) != [], "the replay under way")
        # While it runs: two more requests; the first of them is replaced by the second.
        await publish(broker, TOPICS.replay("plant"), replay_request_payload(1, 2, "queued"))
        await publish(broker, TOPICS.replay("plant"), replay_request_payload(3, 4, "newer"))
        # A live record goes out beside the replay.
        with RecordStore(db) as store:
            store.audit(W1, "alice", "live", {}, True)
        await eventually(lambda: len(dones(sub)) == 2, "both replays done", 60.0)
        topics = [m.topic for m in sub.messages]
        live_at = next(i for i, m in enumerate(sub.messages) if m.topic.endswith("/records/audit"))
        big_done_at = topics.index("linectl/line1/replayed/plant/done")
        assert live_at < big_done_at, "the live record waited for the replay"
        assert [d["request_id"] for d in dones(sub)] == ["big", "newer"]
        seqs = [p["seq"] for k, p in replayed(sub) if k != "done"]
        assert seqs == [*range(1, n + 1), 3, 4]


# ---------------------------------------------------------------------- confirmations


async def test_confirmed_advances_the_cursor_and_pruning_waits_for_it(
    broker: TestBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "linectl.mqtt")
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as store:
        fill(store, 30)
        store.advance_outbox_cursor(historian_cursor("gone"), 3)  # named no more
        store_id = store.store_id
        bridge = bridge_for(broker, db)
        async with running_bridge(bridge):
            # Made at the bridge's start, at 0; the one no longer named is removed.
            assert store.outbox_consumers()[historian_cursor("plant")] == 0
            assert historian_cursor("gone") not in store.outbox_consumers()
            assert "historian 'gone' is no longer in [records] historians" in caplog.text
            await eventually(lambda: store.outbox_cursor("mqtt") == 30, "the live records")
            assert store.prune_outbox(keep=0) == 0  # the historian has confirmed nothing

            confirmed = historian_confirmed_payload(store_id, 10, 0)
            await publish(broker, TOPICS.confirmed("plant"), confirmed, retain=True)
            await eventually(
                lambda: store.outbox_cursor(historian_cursor("plant")) == 10, "the cursor"
            )
            assert store.prune_outbox(keep=0) == 10
            assert store.outbox_first_seq() == 11

            # Another store's confirmation (the line's store was replaced): logged, ignored.
            other = historian_confirmed_payload("0000-other", 25, 0)
            await publish(broker, TOPICS.confirmed("plant"), other, retain=True)
            await eventually(lambda: "not of this line's store" in caplog.text, "the info")
            # A historian the line does not know: warned about, no cursor made.
            await publish(
                broker, TOPICS.confirmed("x"), historian_confirmed_payload(store_id, 5, 0)
            )
            await eventually(lambda: "confirmation from historian 'x' ignored" in caplog.text, "x")
            assert store.outbox_cursor(historian_cursor("plant")) == 10
            assert historian_cursor("x") not in store.outbox_consumers()
        # The retained confirmation is taken again at the next start (and never goes back).
        await publish(
            broker,
            TOPICS.confirmed("plant"),
            historian_confirmed_payload(store_id, 12, 0),
            retain=True,
        )
        async with running_bridge(bridge_for(broker, db)):
            await eventually(
                lambda: store.outbox_cursor(historian_cursor("plant")) == 12, "the cursor again"
            )
    await publish(broker, TOPICS.confirmed("plant"), b"", retain=True)
    info = [r for r in caplog.records if "not of this line's store" in r.getMessage()]
    assert info[0].levelno == logging.INFO


async def test_a_confirmation_above_the_newest_seq_says_the_store_went_back(
    broker: TestBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "linectl.mqtt")
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as store:
        fill(store, 10)
        store_id = store.store_id
        bridge = bridge_for(broker, db)
        async with running_bridge(bridge):
            await publish(
                broker, TOPICS.confirmed("plant"), historian_confirmed_payload(store_id, 15, 0)
            )
            await eventually(lambda: "the store went back" in caplog.text, "the error")
            (error,) = [r for r in caplog.records if "went back" in r.getMessage()]
            assert error.levelno == logging.ERROR
            assert "restored from a backup" in error.getMessage()
            assert "confirms seq 15" in error.getMessage()
            assert "newest seq is 10" in error.getMessage()
            assert store.outbox_cursor(historian_cursor("plant")) == 0
            # A confirmation it can take is taken.
            await publish(
                broker, TOPICS.confirmed("plant"), historian_confirmed_payload(store_id, 10, 0)
            )
            await eventually(
                lambda: store.outbox_cursor(historian_cursor("plant")) == 10, "the cursor"
            )


async def test_a_malformed_confirmation_is_logged_and_changes_nothing(
    broker: TestBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "linectl.mqtt")
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as store:
        fill(store, 10)
        bridge = bridge_for(broker, db)
        async with running_bridge(bridge):
            await publish(broker, TOPICS.confirmed("plant"), {"store_id": store.store_id})
            await eventually(lambda: "refused" in caplog.text, "the error")
            assert "seq None is missing or not a whole number" in caplog.text
            assert store.outbox_cursor(historian_cursor("plant")) == 0


# ---------------------------------------------------------------------- retention


async def test_the_bridge_prunes_confirmed_old_reels(
    broker: TestBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "linectl.mqtt")
    db = tmp_path / "r.sqlite"
    with RecordStore(db) as store:
        fill(store, 10)
        store.clear_alarms_except([], W1)
        store.ack_alarms("*", "alice", W1)
        store.close_reel("R1", W1, "planned length reached")
        end_seq = store.outbox_last_seq()
        store.open_reel(ReelInfo("R2", "line1", "PV", "1", "0" * 64, "{}", "bob", 9.0, W1))
        store_id = store.store_id
        bridge = bridge_for(
            broker, db, historians=("plant", "qa"), retention_days=1.0, retention_every_s=0.2
        )
        async with running_bridge(bridge):
            await eventually(lambda: store.outbox_cursor("mqtt") == end_seq + 1, "published")
            # One historian's confirmation is not enough: every named one must have it.
            conf = historian_confirmed_payload(store_id, end_seq, 0)
            await publish(broker, TOPICS.confirmed("plant"), conf)
            await eventually(
                lambda: store.outbox_cursor(historian_cursor("plant")) == end_seq, "plant"
            )
            await asyncio.sleep(0.5)
            assert [r.reel_id for r in store.reels()] == ["R1", "R2"]
            await publish(broker, TOPICS.confirmed("qa"), conf)
            await eventually(lambda: [r.reel_id for r in store.reels()] == ["R2"], "R1 pruned")
            await eventually(lambda: "retention: deleted 1 reel(s)" in caplog.text, "the log")
            assert store.metres("R1") == []
            assert store.reel_exists("R1")
