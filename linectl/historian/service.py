"""`linectl historian`: every line's records from the broker into PostgreSQL, none lost.

The adapter between the plant broker (aiomqtt) and the database (linectl.historian.pg);
which records it holds and what it must ask for again is the pure
linectl.historian.tracker. One connection to the broker, with a fixed client id and a
persistent session (records published while the historian is away wait in the broker),
QoS 1 subscriptions to each line's records and to the answers to its replay requests:

- records go into a queue; one writer takes them in batches (one transaction each) and
  then tells the tracker what is now held;
- every line announces its newest record number (`records/head`, retained); a number the
  historian has not got, whether lost by the broker, dropped from a full session queue
  or missed while it was down, is asked for again from the line's outbox
  (`replay/<id>`), which answers on `replayed/<id>/...`;
- what is committed is told back to each line (`historian/<id>/confirmed`, retained), so
  the line keeps its outbox rows until then and may prune its records after that.

docs/historian.md describes the protocol, the tables and what happens in each outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linectl.aio import cancellable, entered, task_group, unix_ms, wait_event
from linectl.broker import (
    V5,
    Backoff,
    BrokerSettings,
    make_client,
    protocol_version,
    reconnect_loop,
)
from linectl.errors import LocalError
from linectl.historian.config import HistorianConfig
from linectl.historian.pg import (
    ApplyResult,
    HistorianDB,
    MigrationError,
    RecordIn,
    RecordInError,
)
from linectl.historian.tracker import Gap, StoreTracker, epoch_key, split_key
from linectl.telemetry import (
    RECORD_KINDS,
    Topics,
    encode,
    historian_confirmed_payload,
    replay_request_payload,
)

log = logging.getLogger("linectl.historian")

ENVELOPE_KEYS: Final = frozenset(
    {"schema", "seq", "historical", "quality", "t_ms", "store_id", "t", "replay"}
)
"""Payload keys that describe the message, not the record: what is left is the outbox
row's data, stored as the line stored it."""

DB_RETRY_S: Final = 1.0
"""How long the writer waits before it tries an unreachable database again."""

TICK_S: Final = 0.2
"""How often gaps are looked for and confirmations are due."""


class BadMessageError(ValueError):
    """A message on a historian topic that does not say what it must."""


@dataclass(frozen=True, slots=True)
class RecordMsg:
    line_id: str
    store_id: str
    seq: int
    kind: str
    t: str
    t_ms: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class HeadMsg:
    line_id: str
    store_id: str
    seq: int
    first_seq: int


@dataclass(frozen=True, slots=True)
class DoneMsg:
    line_id: str
    request_id: str
    missing: list[tuple[int, int]]


Parsed = RecordMsg | HeadMsg | DoneMsg


def _int(payload: Mapping[str, Any], key: str) -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadMessageError(f"{key!r} must be a non-negative integer, not {value!r}")
    return value


def _text(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise BadMessageError(f"{key!r} must be non-empty text, not {value!r}")
    return value


def parse_message(topic: str, payload: bytes, prefix: str, historian_id: str) -> Parsed | None:
    """What a message on one of the historian's subscriptions says; None for a topic it
    does not use (another historian's replies); BadMessageError for one it cannot use."""
    levels = topic.split("/")
    base = prefix.strip("/").split("/")
    if levels[: len(base)] != base or len(levels) < len(base) + 3:
        return None
    line_id, rest = levels[len(base)], levels[len(base) + 1 :]
    if rest[0] == "records" and len(rest) == 2:
        kind = rest[1]
    elif rest[0] == "replayed" and len(rest) == 3 and rest[1] == historian_id:
        kind = rest[2]
    else:
        return None
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessageError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadMessageError("not a JSON object")
    if kind == "head":
        return HeadMsg(line_id, _text(data, "store_id"), _int(data, "seq"), _int(data, "first_seq"))
    if kind == "done":
        missing: list[tuple[int, int]] = []
        for item in data.get("missing", []):
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
                or item[0] > item[1]
            ):
                raise BadMessageError(f"'missing' must hold [first, last] pairs, not {item!r}")
            missing.append((item[0], item[1]))
        return DoneMsg(line_id, str(data.get("request_id", "")), missing)
    if kind not in RECORD_KINDS:
        return None
    seq = _int(data, "seq")
    if seq == 0:
        raise BadMessageError("'seq' must be 1 or more")
    store_id = _text(data, "store_id")
    t = _text(data, "t")
    body = {k: v for k, v in data.items() if k not in ENVELOPE_KEYS}
    return RecordMsg(line_id, store_id, seq, kind, t, _int(data, "t_ms"), body)


@dataclass
class HistorianStats:
    """Counters for logs, tests and benchmarks."""

    connected: bool = False
    connects: int = 0
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    bad_messages: int = 0
    replays_requested: int = 0
    incidents: int = 0
    batches: int = 0
    lag_ms: list[int] = field(default_factory=list)
    """Line record time to commit, per stored record (kept only when `keep_lag`)."""


class HistorianService:
    """One historian: run() until stop()."""

    def __init__(
        self,
        cfg: HistorianConfig,
        db: HistorianDB,
        *,
        client_factory: Callable[..., aiomqtt.Client] = aiomqtt.Client,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = unix_ms,
        keep_lag: bool = False,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.hid = cfg.historian.id
        self.prefix = cfg.historian.topic_prefix.strip("/")
        self.lines = frozenset(cfg.historian.lines)
        self.client_factory = client_factory
        self.clock = clock
        self.wall_ms = wall_ms
        self.keep_lag = keep_lag
        self.stats = HistorianStats()
        self.trackers: dict[tuple[str, str], StoreTracker] = {}
        """(line id, store id) -> the tracker of the store's current epoch."""
        self.current_store: dict[str, str] = {}
        """line id -> the store id the line announced last (the one told what is held)."""
        self._queue: asyncio.Queue[RecordMsg] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._confirm_due: set[tuple[str, str]] = set()
        self._confirmed_sent: dict[str, tuple[str, int]] = {}
        self._last_error = ""
        self._loaded = False
        self.settings = BrokerSettings(
            host=cfg.mqtt.host,
            port=cfg.mqtt.port,
            client_id=f"linectl-historian-{self.hid}",
            username=cfg.mqtt.username,
            password=cfg.mqtt.password,
            tls=cfg.mqtt.tls,
            keepalive_s=cfg.mqtt.keepalive_s,
            reconnect_max_s=cfg.mqtt.reconnect_max_s,
            protocol=protocol_version(cfg.mqtt.protocol),
        )

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Write what was received, then disconnect; run() returns."""
        self._stopping.set()

    async def load(self) -> None:
        """Rebuild the trackers from the database (after a restart: what is held)."""
        for row in await self.db.line_stores():
            store_id, epoch = split_key(row.store_id)
            key = (row.line_id, store_id)
            current = self.trackers.get(key)
            if current is not None and epoch < split_key(current.key)[1]:
                continue  # an older epoch of a store that was restored
            above = await self.db.seqs_above(row.line_id, row.store_id, row.confirmed_seq)
            self.trackers[key] = StoreTracker(
                row.line_id,
                store_id,
                row.store_id,
                confirmed=row.confirmed_seq,
                above=above,
                head=row.head_seq or 0,
            )
        self._loaded = True

    async def run(self) -> None:
        """Connect, keep the lines' records, reconnect after any loss, until stop()."""
        if not self._loaded:
            await self.load()
        backoff = Backoff(self.cfg.mqtt.reconnect_max_s)
        async with task_group() as tg:
            writer = tg.create_task(self._writer(), name="historian-writer")
            await reconnect_loop(
                self._session, backoff, stop=self._stopping, retry=(Exception,), on_error=self._lost
            )
            await self._queue.join()
            writer.cancel()

    def _lost(self, exc: Exception) -> None:
        why = str(exc) or type(exc).__name__
        if not isinstance(exc, aiomqtt.MqttError):
            log.error("historian session failed; reconnecting", exc_info=exc)
        elif self.stats.connected or why != self._last_error:
            # Once per outage, not once per attempt.
            log.warning(
                "historian: broker %s %s: %s; trying again",
                self.settings.where,
                "lost" if self.stats.connected else "not reachable",
                why,
            )
        self._last_error = why
        self.stats.connected = False

    def _make_client(self) -> aiomqtt.Client:
        factory = self.client_factory
        if self.settings.protocol is V5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.cfg.mqtt.session_expiry_s
            factory = functools.partial(factory, properties=props)
        # clean=False: the broker keeps the subscriptions and queues QoS 1 records while
        # the historian is away (what it drops when its queue is full is replayed).
        return make_client(
            self.settings, clean=False, max_inflight=self.cfg.mqtt.max_inflight, factory=factory
        )

    async def _session(self, connected: Callable[[], None]) -> None:
        client = self._make_client()
        async with entered(client):
            connected()
            self.stats.connected = True
            self.stats.connects += 1
            log.info(
                "historian %s connected to %s, keeping lines %s",
                self.hid,
                self.settings.where,
                ", ".join(sorted(self.lines)),
            )
            for line_id in sorted(self.lines):
                base = Topics.for_line(self.prefix, line_id).base
                # records/+ brings records/head (retained) too.
                await cancellable(client.subscribe(f"{base}/records/+", qos=1))
                await cancellable(client.subscribe(f"{base}/replayed/{self.hid}/+", qos=1))
            # Everything is said again on a new connection: a broker restart loses nothing
            # the lines need from us then.
            self._confirmed_sent.clear()
            tasks = [
                asyncio.create_task(self._receive(client), name="historian-receive"),
                asyncio.create_task(self._tick(client), name="historian-tick"),
                asyncio.create_task(self._stopping.wait(), name="historian-stop"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a lost connection raises here: reconnect
                # Stopping: write what was received and say so before disconnecting.
                await self._queue.join()
                await self._publish_confirmations(client)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.stats.connected = False

    # ------------------------------------------------------------------ receive

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                payload = str(payload).encode()
            try:
                parsed = parse_message(topic, bytes(payload), self.prefix, self.hid)
            except BadMessageError as exc:
                self.stats.bad_messages += 1
                log.error("historian: %s: %s; ignored", topic, exc)
                continue
            if parsed is None or parsed.line_id not in self.lines:
                continue
            if isinstance(parsed, RecordMsg):
                self.stats.received += 1
                self._queue.put_nowait(parsed)
            elif isinstance(parsed, HeadMsg):
                await self._on_head(parsed)
            else:
                await self._on_done(parsed)

    def _tracker(self, line_id: str, store_id: str) -> StoreTracker:
        key = (line_id, store_id)
        tracker = self.trackers.get(key)
        if tracker is None:
            if any(line == line_id for line, _ in self.trackers):
                log.warning(
                    "historian: line %s has a new record store %s (a new computer or a "
                    "store started afresh)",
                    line_id,
                    store_id,
                )
            tracker = StoreTracker(line_id, store_id, epoch_key(store_id, 0))
            self.trackers[key] = tracker
        return tracker

    async def _on_head(self, head: HeadMsg) -> None:
        self.current_store[head.line_id] = head.store_id
        tracker = self._tracker(head.line_id, head.store_id)
        if tracker.went_back(head.seq) and tracker.went_back_reported != head.seq:
            # Reported now; the new epoch starts where the line's records first differ
            # from what is held (see _write): the head may already count records the
            # restored store wrote since, so it does not say where the backup ended.
            tracker.went_back_reported = head.seq
            log.error(
                "historian: line %s announces record %d as the newest of store %s, but the "
                "historian holds every record up to %d: the store went back (restored from "
                "a backup?)",
                head.line_id,
                head.seq,
                head.store_id,
                tracker.confirmed,
            )
            await self._incident(
                head.line_id,
                tracker.key,
                "store_went_back",
                {
                    "line_newest_seq": head.seq,
                    "historian_confirmed_seq": tracker.confirmed,
                    "why": "the line's store holds fewer records than the historian has "
                    "confirmed: restored from a backup, or replaced",
                },
            )
        tracker.head = head.seq
        await self.db.set_head(head.line_id, tracker.key, head.seq)
        self._confirm_due.add((head.line_id, head.store_id))

    async def _on_done(self, done: DoneMsg) -> None:
        store_id = self.current_store.get(done.line_id)
        if store_id is None:
            return
        tracker = self._tracker(done.line_id, store_id)
        tracker.answered()
        for first, last in done.missing:
            gap = Gap(first, last)
            if tracker.holds(first) and tracker.holds(last):
                continue
            await self._incident(
                done.line_id,
                tracker.key,
                "records_not_held_by_line",
                {
                    "first_seq": first,
                    "last_seq": last,
                    "why": "the line's outbox no longer holds them (pruned before this "
                    "historian confirmed them, or never written); they cannot be recovered",
                },
            )
            if tracker.explain(gap):
                self._confirm_due.add((done.line_id, store_id))

    async def _restored(self, tracker: StoreTracker, base_seq: int, why: str) -> StoreTracker:
        """The store went back (restored from a backup): keep what is held under the old
        epoch, report it, and take the store's records above `base_seq` as a new epoch."""
        key = (tracker.line_id, tracker.store_id)
        epoch = split_key(tracker.key)[1] + 1
        new = StoreTracker(
            tracker.line_id,
            tracker.store_id,
            epoch_key(tracker.store_id, epoch),
            confirmed=base_seq,
            head=tracker.head,
        )
        self.trackers[key] = new
        await self._incident(
            tracker.line_id,
            tracker.key,
            "store_restored",
            {
                "why": why,
                "historian_confirmed_seq": tracker.confirmed,
                "historian_newest_seq": tracker.newest,
                "line_seq": base_seq,
                "old_epoch": tracker.key,
                "new_epoch": new.key,
                "records_not_in_line_store": [base_seq + 1, tracker.newest],
            },
        )
        log.error(
            "historian: line %s's record store %s went back to record %d (%s; the "
            "historian holds up to %d): restored from a backup? Records %d..%d are kept "
            "as %s and are no longer in the line's store; its new records are kept as %s",
            tracker.line_id,
            tracker.store_id,
            base_seq,
            why,
            tracker.newest,
            base_seq + 1,
            tracker.newest,
            tracker.key,
            new.key,
        )
        await self.db.set_confirmed(new.line_id, new.key, base_seq)
        return new

    async def _incident(
        self, line_id: str, store_key: str | None, kind: str, detail: Mapping[str, Any]
    ) -> None:
        self.stats.incidents += 1
        await self.db.add_incident(line_id, store_key, kind, detail)

    # ------------------------------------------------------------------ write

    async def _writer(self) -> None:
        hs = self.cfg.historian
        while True:
            batch = [await self._queue.get()]
            deadline = self.clock() + hs.batch_wait_s
            while len(batch) < hs.batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    left = deadline - self.clock()
                    if left <= 0:
                        break
                    try:
                        async with asyncio.timeout(left):
                            batch.append(await self._queue.get())
                    except TimeoutError:
                        break
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[RecordMsg]) -> None:
        # Numbers already held first: a redelivery changes nothing, but a number held
        # with other content says the store went back, and the records after it belong
        # to the new epoch; applying them first would file them under the old one.
        held = [m for m in batch if self._tracker(m.line_id, m.store_id).holds(m.seq)]
        fresh = [m for m in batch if not self._tracker(m.line_id, m.store_id).holds(m.seq)]
        for part in (held, fresh):
            if part:
                again = await self._write_part(part)
                if again:
                    # The restored store's records, now under its new epoch.
                    await self._write_part(again)

    async def _write_part(self, batch: list[RecordMsg]) -> list[RecordMsg]:
        """Apply records; return those to apply again because they started a new epoch."""
        records = []
        for m in batch:
            key = self._tracker(m.line_id, m.store_id).key
            records.append(RecordIn(m.line_id, key, m.seq, m.kind, m.t, m.data))
        result = await self._apply(records)
        committed_ms = self.wall_ms()
        self.stats.batches += 1
        self.stats.duplicates += result.duplicates
        stored_now: set[tuple[str, str, int]] = set()
        for (line_id, key), seqs in result.stored.items():
            store_id, _ = split_key(key)
            tracker = self.trackers.get((line_id, store_id))
            if tracker is None or tracker.key != key:
                continue
            stored_now.update((line_id, key, s) for s in seqs)
            self.stats.stored += len(seqs)
            if tracker.add(seqs):
                self._confirm_due.add((line_id, store_id))
        if self.keep_lag:
            sent_ms = {
                (r.line_id, r.store_id, r.seq): m.t_ms for r, m in zip(records, batch, strict=True)
            }
            self.stats.lag_ms.extend(committed_ms - sent_ms[k] for k in stored_now)
        # A record number held with other content: the store went back (restored).
        lowest: dict[tuple[str, str], int] = {}
        for line_id, key, seq in result.seq_conflicts:
            store_id, _ = split_key(key)
            current = self.trackers.get((line_id, store_id))
            if current is not None and current.key == key:
                lowest[(line_id, store_id)] = min(seq, lowest.get((line_id, store_id), seq))
        for (line_id, store_id), seq in lowest.items():
            await self._restored(
                self.trackers[(line_id, store_id)],
                seq - 1,
                f"record {seq} came again with other content",
            )
        return [
            m
            for r, m in zip(records, batch, strict=True)
            if (m.line_id, m.store_id) in lowest and r.seq >= lowest[(m.line_id, m.store_id)]
        ]

    async def _apply(self, records: list[RecordIn]) -> ApplyResult:
        """One transaction; while the database is unreachable, wait and try again (the
        records stay in the queue and in the lines' outboxes: nothing is dropped). A batch
        the database refuses as unusable is taken record by record, and a refused record
        is an incident, explained so that it is not asked for forever."""
        while True:
            try:
                return await self.db.apply(records)
            except RecordInError as exc:
                if len(records) == 1:
                    r = records[0]
                    store_id, _ = split_key(r.store_id)
                    await self._incident(r.line_id, r.store_id, "record_refused", {"why": str(exc)})
                    log.error("historian: %s", exc)
                    tracker = self.trackers.get((r.line_id, store_id))
                    if tracker is not None and tracker.explain(Gap(r.seq, r.seq)):
                        self._confirm_due.add((r.line_id, store_id))
                    return ApplyResult(stored={}, duplicates=0, conflicts=[str(exc)])
                results = [await self._apply([r]) for r in records]
                return _merged(results)
            except Exception as exc:  # a database outage: wait, never drop
                if self._stopping.is_set():
                    # Not lost: still in the lines' outboxes, replayed after the restart.
                    raise
                log.error(
                    "historian: writing %d records failed (%s); trying again in %.0f s",
                    len(records),
                    exc,
                    DB_RETRY_S,
                )
                await asyncio.sleep(DB_RETRY_S)

    # ------------------------------------------------------------------ reconcile

    async def _tick(self, client: aiomqtt.Client) -> None:
        confirm_every_s = self.cfg.historian.confirm_every_s
        confirmed_s = self.clock()
        while True:
            now_s = self.clock()
            for tracker in list(self.trackers.values()):
                if self.current_store.get(tracker.line_id, tracker.store_id) != tracker.store_id:
                    continue
                gap = tracker.due_request(now_s)
                if gap is not None:
                    await self._request(client, tracker, gap)
            if now_s - confirmed_s >= confirm_every_s:
                confirmed_s = now_s
                await self._publish_confirmations(client)
            await asyncio.sleep(TICK_S)

    async def _request(self, client: aiomqtt.Client, tracker: StoreTracker, gap: Gap) -> None:
        self.stats.replays_requested += 1
        log.info(
            "historian: asking line %s for records %d..%d (%d)",
            tracker.line_id,
            gap.first_seq,
            gap.last_seq,
            gap.count,
        )
        payload = replay_request_payload(gap.first_seq, gap.last_seq, uuid.uuid4().hex)
        topics = Topics.for_line(self.prefix, tracker.line_id)
        await cancellable(client.publish(topics.replay(self.hid), encode(payload), qos=1))

    async def _publish_confirmations(self, client: aiomqtt.Client) -> None:
        due, self._confirm_due = self._confirm_due, set()
        for line_id, store_id in sorted(due):
            tracker = self.trackers.get((line_id, store_id))
            if tracker is None:
                continue
            await self.db.set_confirmed(line_id, tracker.key, tracker.confirmed)
            if self.current_store.get(line_id, store_id) != store_id:
                continue
            if self._confirmed_sent.get(line_id) == (store_id, tracker.confirmed):
                continue
            payload = historian_confirmed_payload(store_id, tracker.confirmed, self.wall_ms())
            topics = Topics.for_line(self.prefix, line_id)
            await cancellable(
                client.publish(topics.confirmed(self.hid), encode(payload), qos=1, retain=True)
            )
            self._confirmed_sent[line_id] = (store_id, tracker.confirmed)


async def run_historian(cfg: HistorianConfig) -> int:
    """Open the database (migrating it; waiting for it while it is not up), run the
    service until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    db = await _open_database(cfg.postgres.dsn, stop)
    if db is None:
        return 0
    service = HistorianService(cfg, db)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, service.stop)
    try:
        await service.run()
    finally:
        await db.close()
    log.info(
        "historian %s stopped: %d records stored, %d duplicates, %d replays asked",
        service.hid,
        service.stats.stored,
        service.stats.duplicates,
        service.stats.replays_requested,
    )
    return 0


async def _open_database(dsn: str, stop: asyncio.Event) -> HistorianDB | None:
    """The database, once it answers (a historian started before PostgreSQL, or during
    its fail-over, waits for it and says so once); None when stopped meanwhile. A schema
    newer than this code is not waited for: MigrationError."""
    said = ""
    while not stop.is_set():
        try:
            return await HistorianDB.open(dsn)
        except MigrationError:
            raise
        except LocalError as exc:
            if str(exc) != said:
                log.warning("historian: %s; trying again every %.0f s", exc, DB_RETRY_S * 5)
                said = str(exc)
        await wait_event(stop, DB_RETRY_S * 5)
    return None


def _merged(results: list[ApplyResult]) -> ApplyResult:
    """The results of several apply() calls as one."""
    stored: dict[tuple[str, str], list[int]] = {}
    for res in results:
        for key, seqs in res.stored.items():
            stored.setdefault(key, []).extend(seqs)
    return ApplyResult(
        stored=stored,
        duplicates=sum(r.duplicates for r in results),
        conflicts=[c for r in results for c in r.conflicts],
        seq_conflicts=frozenset(k for r in results for k in r.seq_conflicts),
    )
