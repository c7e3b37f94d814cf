"""The plant historian end to end: real Mosquitto, real PostgreSQL, the lines' real MQTT
bridge (issue 13's acceptance). Each test ends with the historian's rows equal to the
lines' stores: every record number once, every reel's report identical byte for byte.

- two lines at once;
- the historian killed (SIGKILL, its own process: `linectl historian run`) mid-stream and
  started again;
- a 60 s broker outage while the lines go on writing;
- duplicated deliveries;
- lost messages (a broker that drops what it queued beyond its limit), reconciled;
- a line store restored from a backup: detected, reported, nothing merged silently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from broker import TestBroker, running_broker
from historian_support import (
    HID,
    Line,
    assert_historian_equals,
    assert_reports_equal,
    running_historian,
    until,
    until_held,
)
from pg_support import fresh_database

from linectl.historian.reader import HistorianReader

pytestmark = pytest.mark.timeout(300)


class SmallQueueBroker(TestBroker):
    """mosquitto that queues at most 20 QoS 1 messages for a client that is away: what a
    line publishes beyond that while the historian is down is lost by the broker."""

    __test__ = False

    def _mosquitto_conf(self) -> Path:
        conf = super()._mosquitto_conf()
        conf.write_text(conf.read_text() + "max_queued_messages 20\n")
        return conf


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[TestBroker]:
    async with running_broker(tmp_path / "broker") as b:
        if b.kind != "mosquitto":
            pytest.skip("the historian is tested on mosquitto (MQTT 5, persistent sessions)")
        yield b


@pytest.fixture
def dsn(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    with fresh_database(request.node.name[:24]) as d:
        yield d


def incidents(dsn: str, line_id: str) -> list[dict[str, object]]:
    with HistorianReader(dsn) as r:
        return r.incidents(line_id)


async def test_two_lines_at_once(broker: TestBroker, dsn: str, tmp_path: Path) -> None:
    a = Line("line-a", tmp_path / "a.sqlite", broker)
    b = Line("line-b", tmp_path / "b.sqlite", broker)
    async with running_historian(broker, dsn, ["line-a", "line-b"]) as hist:
        await a.start()
        await b.start()
        await asyncio.gather(
            a.reel("A1", 300, pause_s=0.01),
            b.reel("B1", 250, pause_s=0.01),
            a.reel("A2", 120),
            b.reel("B2", 80),
        )
        await until_held(dsn, a)
        await until_held(dsn, b)
        await a.stop()
        await b.stop()
    assert_historian_equals(dsn, a)
    assert_historian_equals(dsn, b)
    # Same reel ids on two lines would be two reels: the natural key holds the line.
    assert incidents(dsn, "line-a") == incidents(dsn, "line-b") == []
    assert hist.stats.stored == a.last_seq() + b.last_seq()


async def test_duplicated_deliveries_change_nothing(
    broker: TestBroker, dsn: str, tmp_path: Path
) -> None:
    line = Line("line-d", tmp_path / "d.sqlite", broker)
    await line.start()
    await line.reel("D1", 100)
    # Every record published again, twice, as a broker's redelivery would.
    copies: list[tuple[str, bytes]] = []
    async with broker.client() as c:
        await c.subscribe("linectl/line-d/records/+", qos=1)
        async with running_historian(broker, dsn, ["line-d"]) as hist:
            await until_held(dsn, line)
            with line.store() as s:
                rows = s.outbox_after(0, 10_000)
            async with asyncio.timeout(5):
                # The subscriber's own copies, as delivered.
                async for m in c.messages:
                    if not m.topic.value.endswith("/head"):
                        copies.append((m.topic.value, bytes(m.payload)))  # type: ignore[arg-type]
                    if len(copies) == len(rows):
                        break
            stored_before = hist.stats.stored
            for _ in range(2):
                for topic, payload in copies:
                    await c.publish(topic, payload, qos=1)
            await until(lambda: hist.stats.duplicates >= 2 * len(copies), "the duplicates counted")
            assert hist.stats.stored == stored_before
    await line.stop()
    assert_historian_equals(dsn, line)
    assert incidents(dsn, "line-d") == []


async def test_lost_messages_are_reconciled_from_the_line(dsn: str, tmp_path: Path) -> None:
    broker = SmallQueueBroker(tmp_path / "small")
    await broker.start()
    try:
        line = Line("line-l", tmp_path / "l.sqlite", broker)
        # The historian subscribes once (persistent session), then is away.
        async with running_historian(broker, dsn, ["line-l"]):
            await line.start()
            await line.reel("L1", 50)
            await until_held(dsn, line)
        await line.reel("L2", 1000, batch=10)  # ~110 records: most beyond the broker's queue
        await until(lambda: line.bridge is not None and line.bridge.stats.replay_backlog == 0,
                    "the line's outbox published")  # fmt: skip
        async with running_historian(broker, dsn, ["line-l"]) as hist:
            await until_held(dsn, line)
            assert hist.stats.replays_requested >= 1, "the lost records came by a replay"
        await line.stop()
        assert_historian_equals(dsn, line)
    finally:
        await broker.stop()


async def test_a_60_s_broker_outage(broker: TestBroker, dsn: str, tmp_path: Path) -> None:
    a = Line("line-o1", tmp_path / "o1.sqlite", broker)
    b = Line("line-o2", tmp_path / "o2.sqlite", broker)
    async with running_historian(broker, dsn, ["line-o1", "line-o2"]) as hist:
        await a.start()
        await b.start()
        await a.reel("O1", 100)
        await until_held(dsn, a)
        await broker.stop()
        # The lines go on writing through the outage; nothing reaches the historian.
        writing = asyncio.gather(a.reel("O2", 400, pause_s=0.25), b.reel("O3", 300, pause_s=0.3))
        await asyncio.sleep(60.0)
        assert not hist.stats.connected
        await broker.start()
        await writing
        await until_held(dsn, a, 90.0)
        await until_held(dsn, b, 90.0)
        await a.stop()
        await b.stop()
        assert hist.stats.connects >= 2
    assert_historian_equals(dsn, a)
    assert_historian_equals(dsn, b)


HISTORIAN_TOML = """\
[historian]
id = "{hid}"
lines = ["line-k"]
confirm_every_s = 0.2
batch_max = 50

[mqtt]
host = "{host}"
port = {port}
reconnect_max_s = 0.5

[postgres]
dsn = "{dsn}"
"""


async def test_historian_killed_mid_stream_and_restarted(
    broker: TestBroker, dsn: str, tmp_path: Path
) -> None:
    conf = tmp_path / "historian.toml"
    conf.write_text(HISTORIAN_TOML.format(hid=HID, host=broker.host, port=broker.port, dsn=dsn))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}
    cmd = [sys.executable, "-m", "linectl", "historian", "run", "--config", str(conf)]
    log1 = tmp_path / "historian-1.log"
    with log1.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=err)
    line = Line("line-k", tmp_path / "k.sqlite", broker)
    await line.start()
    writing = asyncio.create_task(line.reel("K1", 1500, batch=10, pause_s=0.02))
    # Mid-stream: some records are in the database, more are coming.
    await until(lambda: line.last_seq() > 40, "the reel under way")
    await asyncio.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert not writing.done(), "killed mid-stream"
    await asyncio.sleep(1.0)
    log2 = tmp_path / "historian-2.log"
    with log2.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=err)
    try:
        await writing
        await until_held(dsn, line, 90.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 30.0)
        await line.stop()
    assert rc == 0, log2.read_text()
    assert "keeping lines line-k" in log1.read_text()
    assert_historian_equals(dsn, line)
    assert incidents(dsn, "line-k") == []


async def test_a_restored_line_store_is_detected_and_reported(
    broker: TestBroker, dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    line = Line("line-r", tmp_path / "r.sqlite", broker)
    backup = tmp_path / "r-backup.sqlite"
    async with running_historian(broker, dsn, ["line-r"]) as hist:
        await line.start()
        await line.reel("R1", 100)
        await until_held(dsn, line)
        await asyncio.to_thread(snapshot, line.db, backup)
        backup_seq = line.last_seq()
        await line.reel("R2", 60)
        await until_held(dsn, line)
        lost_to = line.last_seq()
        await line.stop()
        # The line computer's disk is replaced; its store comes back from the backup.
        await asyncio.to_thread(restore, backup, line.db)
        line.reels.remove("R2")
        with caplog.at_level(logging.ERROR, logger="linectl"):
            await line.start()
            await line.reel("R3", 40)
            await until(
                lambda: "store_restored" in [i["kind"] for i in incidents(dsn, "line-r")],
                "the restore detected",
            )
            store_id = line.store_id()
            with HistorianReader(dsn) as r:
                keys = sorted({s["store_id"] for s in r.line_store_status()})
            new_key = next(k for k in keys if k != store_id)
            await until(
                lambda: _held(dsn, line, new_key) >= line.last_seq() - backup_seq,
                "the new records held",
            )
            await line.stop()
        assert hist.stats.incidents >= 2
    found = incidents(dsn, "line-r")
    kinds = [i["kind"] for i in found]
    # Each record number that came with other content, and the store: when the line's
    # head went below what was confirmed (if that came first), and when its records
    # first differed from those held (where the new epoch starts).
    assert "seq_conflict" in kinds
    store_level = [k for k in kinds if k != "seq_conflict"]
    assert store_level in (["store_restored"], ["store_went_back", "store_restored"]), kinds
    detail = next(i for i in found if i["kind"] == "store_restored")["detail"]
    assert isinstance(detail, dict)
    assert detail["records_not_in_line_store"] == [backup_seq + 1, lost_to]
    with HistorianReader(dsn) as r:
        # Nothing lost: R2, no longer on the line, is still in the historian.
        assert r.lines_of_reel("R2") == ["line-r"]
        # The records before the backup once; the new epoch holds what came after.
        assert r.held_seqs("line-r", store_id) == list(range(1, lost_to + 1))
        assert r.held_seqs("line-r", new_key) == list(range(backup_seq + 1, line.last_seq() + 1))
    # Every reel the restored line holds reports the same from the historian.
    assert assert_reports_equal(dsn, line) == ["R1", "R3"]
    assert any("went back" in r.getMessage() for r in caplog.records), "the line said so too"


def snapshot(db: Path, backup: Path) -> None:
    """A consistent copy of a live store (SQLite's online backup, WAL included)."""
    src, dst = sqlite3.connect(db), sqlite3.connect(backup)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def restore(backup: Path, db: Path) -> None:
    """Put a backup in the store's place (its WAL and shared memory files removed)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(backup, db)


def _held(dsn: str, line: Line, key: str) -> int:
    with HistorianReader(dsn) as r:
        return len(r.held_seqs(line.line_id, key))


def test_payload_json_is_what_the_line_wrote(tmp_path: Path) -> None:
    # The raw stream keeps the line's data verbatim: nothing re-formatted.
    data = {"event": "metres", "reel_id": "R", "metres": [{"index": 0, "dose_kgy": 120.125}]}
    assert json.loads(json.dumps(data)) == data
