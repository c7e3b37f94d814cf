"""Lines and a historian for the historian's end-to-end tests (tests/test_historian_e2e.py).

A line here is its record store and the real MQTT bridge (linectl.mqtt.MqttBridge) that
publishes its outbox, announces its head and answers replays: the part of linectl that
talks to the historian. Records are written with the store's own API (reels, metres in
batches, unproven ranges, alarms raised, acknowledged and cleared, audit events), as the
service writes them. `assert_historian_equals` compares the historian with a line's
store: every reel's report byte for byte, every record number once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broker import TestBroker
from test_mqtt import FakeLine, mqtt_cfg

from linectl.config import Records
from linectl.core.ledger import MetreRecord, Verdict
from linectl.historian.config import HistorianConfig
from linectl.historian.pg import HistorianDB
from linectl.historian.reader import HistorianReader
from linectl.historian.service import HistorianService
from linectl.mqtt import MqttBridge
from linectl.report import build_report
from linectl.store import RecordStore, ReelInfo

HID = "plant"
RECIPE_JSON = json.dumps(
    {"product": "PV", "version": "3", "min_dose_kgy": 105.0, "target_dose_kgy": 120.0,
     "max_dose_kgy": 140.0}
)  # fmt: skip
T0 = datetime(2026, 11, 30, 22, 0, tzinfo=UTC)  # reels cross a month's end: two partitions


def iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


@dataclass
class Line:
    """One line: its store and its bridge (not running until `start`)."""

    line_id: str
    db: Path
    broker: TestBroker
    bridge: MqttBridge | None = None
    task: asyncio.Task[None] | None = None
    clock: datetime = T0
    reels: list[str] = field(default_factory=list)

    def store(self) -> RecordStore:
        return RecordStore(self.db)

    async def start(self) -> None:
        self.bridge = MqttBridge(
            FakeLine(),
            mqtt_cfg(self.broker),
            line_id=self.line_id,
            store_path=self.db,
            protocol=self.broker.protocol,
            records=Records(historians=[HID]),
        )
        self.task = asyncio.create_task(self.bridge.run())

    async def stop(self) -> None:
        if self.bridge is not None and self.task is not None:
            self.bridge.stop()
            await asyncio.wait_for(self.task, 20.0)
        self.bridge = self.task = None

    def tick(self, seconds: float = 1.0) -> str:
        self.clock += timedelta(seconds=seconds)
        return iso(self.clock)

    async def reel(
        self, reel_id: str, metres: int, *, batch: int = 25, pause_s: float = 0.0
    ) -> None:
        """Write one whole reel as the service does: start, metres in batches (one of them
        out of spec, a range unproven), an alarm raised, acknowledged and cleared, operator
        actions, the end. `pause_s` between batches spreads it over time."""
        with self.store() as s:
            start = self.tick()
            s.open_reel(
                ReelInfo(reel_id, self.line_id, "PV", "3", "ab" * 32, RECIPE_JSON, "alice",
                         float(metres), start, {"l0_m": 1.5, "counter": 1234})
            )  # fmt: skip
            s.audit(start, "op-1", "start_reel", {"reel_id": reel_id}, True, reel_id=reel_id)
            self.reels.append(reel_id)
        i = 0
        while i < metres:
            n = min(batch, metres - i)
            with self.store() as s:
                t = self.tick()
                if i == batch * 2:
                    # A restart's range: no dose known.
                    s.mark_unproven(reel_id, i, i + n - 1, "controller restart", t)
                else:
                    recs = [_metre(k) for k in range(i, i + n)]
                    s.add_metres(reel_id, recs, t)
                if i == batch:
                    alarm = s.raise_alarm("vacuum", "accelerator vacuum fault", t, reel_id=reel_id)
                    s.ack_alarm(alarm, "op-1", self.tick(0.5))
                    s.clear_alarm(alarm, self.tick(0.5))
                    s.audit(t, "op-1", "ack", {"alarm": "vacuum"}, True, reel_id=reel_id)
                    s.audit(t, "viewer", "reset", {}, False, reason="role viewer", reel_id=reel_id)
            i += n
            if pause_s:
                await asyncio.sleep(pause_s)
        with self.store() as s:
            s.close_reel(reel_id, self.tick(), "planned length reached")

    def last_seq(self) -> int:
        with self.store() as s:
            return s.outbox_last_seq()

    def store_id(self) -> str:
        with self.store() as s:
            return s.store_id


def _metre(i: int) -> MetreRecord:
    if i % 97 == 13:
        return MetreRecord(i, 101.25, 99.5, 103.0, Verdict.UNDER_DOSE, ("under_dose",))
    dose = 120.0 + (i % 7) * 0.125
    return MetreRecord(i, dose, dose - 1.5, dose + 1.5, Verdict.IN_SPEC)


def historian_config(
    broker: TestBroker, dsn: str, lines: Iterable[str], **kw: Any
) -> HistorianConfig:
    return HistorianConfig.model_validate(
        {
            "historian": {"id": HID, "lines": list(lines), "confirm_every_s": 0.2, **kw},
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect_max_s": 0.5,
                     "keepalive_s": 5},
            "postgres": {"dsn": dsn},
        }
    )  # fmt: skip


@contextlib.asynccontextmanager
async def running_historian(
    broker: TestBroker, dsn: str, lines: Iterable[str], **kw: Any
) -> AsyncIterator[HistorianService]:
    """The historian service in this process, on its own database connection."""
    db = await HistorianDB.open(dsn)
    service = HistorianService(historian_config(broker, dsn, lines, **kw), db)
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        service.stop()
        try:
            await asyncio.wait_for(task, 20.0)
        finally:
            await db.close()


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


def held_count(dsn: str, line: Line) -> int:
    with HistorianReader(dsn) as r:
        return len(r.held_seqs(line.line_id, line.store_id()))


async def until_held(dsn: str, line: Line, timeout_s: float = 60.0) -> None:
    """Until the historian holds every record of the line's store (by number)."""
    want = line.last_seq()
    deadline = time.monotonic() + timeout_s
    while True:
        got = await asyncio.to_thread(held_count, dsn, line)
        if got >= want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"line {line.line_id}: the historian holds {got} of {want} records after "
                f"{timeout_s} s"
            )
        await asyncio.sleep(0.2)


def assert_reports_equal(dsn: str, line: Line) -> list[str]:
    """Every reel in the line's store reports the same from the historian (the JSON,
    byte for byte); returns the reels compared."""
    with line.store() as s, HistorianReader(dsn) as r:
        line_reels = [x.reel_id for x in s.reels()]
        source = r.source(line.line_id)
        for reel_id in line_reels:
            mine = json.dumps(build_report(s, reel_id))
            theirs = json.dumps(build_report(source, reel_id))
            assert mine == theirs, f"line {line.line_id} reel {reel_id}: reports differ"
    return line_reels


def assert_historian_equals(dsn: str, line: Line) -> None:
    """The historian holds exactly what the line's store holds: every record number
    1..last once, the same reels, and each reel's report identical (JSON, byte for byte)."""
    line_reels = assert_reports_equal(dsn, line)
    with line.store() as s, HistorianReader(dsn) as r:
        assert r.held_seqs(line.line_id, s.store_id) == list(range(1, s.outbox_last_seq() + 1))
        listed = [x["reel_id"] for x in r.reel_list(line_id=line.line_id)]
    assert sorted(listed) == sorted(line_reels)
