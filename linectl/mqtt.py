"""The MQTT bridge: live telemetry, state, records from the outbox, commands (docs/mqtt.md).

A thin adapter on aiomqtt 2.x. What to publish comes from linectl.telemetry and the
record store's outbox; what a command means is linectl.commands and the line's
`execute`. The bridge never reaches into the control cycle:

- The control cycle calls `on_cycle` (an observer of the service): a report-by-exception
  filter and a non-blocking put on a bounded queue. When the queue is full the oldest
  live value is dropped and counted; nothing else is ever dropped.
- `state` and `alarms/active` keep only their newest payload (retained: the newest is
  all a subscriber needs).
- Records are read from the store's outbox on the bridge's own connection and published
  QoS 1 in order; the cursor moves only past what the broker has acknowledged.
- For the plant historians named in `[records] historians` (docs/mqtt.md, "The plant
  historian"): the retained `records/head`, replays of outbox ranges on request (each
  historian's in its own task, beside the live records), the historians' confirmations
  (their outbox cursors), and the line-side retention of confirmed reels.

The connection (client, TLS, reconnect back-off, the command subscription) is made by
linectl.broker, as for the Sparkplug edge node and the CLI client: `run()` reconnects
after any loss, with a new client (and a new will) per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linectl.aio import cancellable, entered, task_group, unix_ms
from linectl.broker import (
    Backoff,
    BrokerSettings,
    ClientFactory,
    make_client,
    protocol_version,
    reconnect_loop,
    subscribe_commands,
)
from linectl.commands import (
    Command,
    CommandError,
    CommandInbox,
    CommandResult,
    RefusalTally,
    authorize_sender,
    bounded,
    nak,
    parse_command,
    request_id_of,
)
from linectl.config import LoadedConfig, MqttConfig, Records
from linectl.store import OutboxRow, PruneResult, RecordStore
from linectl.telemetry import (
    ActiveAlarm,
    AlarmView,
    Confirmation,
    LineStatus,
    LiveValue,
    ReplayRequest,
    ReportFilter,
    RequestError,
    Topics,
    alarms_active_payload,
    encode,
    live_payload,
    ms_to_iso,
    parse_confirmation,
    parse_replay_request,
    record_payload,
    records_head_payload,
    replay_done_payload,
    schema_document,
    state_payload,
    status_payload,
)

log = logging.getLogger("linectl.mqtt")

CONSUMER = "mqtt"
"""This publisher's cursor name in the store's outbox."""


PRUNE_EVERY_S = 600.0
"""How often a long session prunes the outbox of rows every consumer has passed."""

HISTORIAN_CURSOR_PREFIX = "historian:"
"""A historian's outbox cursor is `historian:<hid>`: how far it confirmed the records."""

HEAD_EVERY_S = 1.0
"""`records/head` is published at most this often (and only when it changed)."""

RETENTION_EVERY_S = 3600.0
"""How often the line-side retention runs (and once when the bridge starts)."""

RETENTION_BATCH = 20
"""Reels pruned per store call: the bridge can stop between calls."""

_T = TypeVar("_T")


def historian_cursor(historian: str) -> str:
    """The outbox cursor (consumer) name of historian `historian`."""
    return f"{HISTORIAN_CURSOR_PREFIX}{historian}"


class LineEndpoint(Protocol):
    """What the bridge needs from a line (linectl.service.LineService provides it)."""

    def live_values(self) -> Mapping[str, LiveValue]:
        """Current live values."""
        ...

    def line_status(self) -> LineStatus:
        """Current line state."""
        ...

    def active_alarms(self) -> Sequence[ActiveAlarm]:
        """Alarms held now."""
        ...

    async def execute(self, cmd: Command) -> CommandResult:
        """Apply a command on the control cycle; audited."""
        ...

    def audit_command_error(
        self, sender: str, command: str, reason: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        """Audit a command that did not parse."""
        ...

    def audit_refusals(self, summary: Mapping[str, Any]) -> None:
        """Audit the commands refused unread in one window, as one row on no reel."""
        ...


@runtime_checkable
class AlarmBoardSource(Protocol):
    """A line endpoint with an alarm board (LineService): `alarms/active` publishes the
    board, with each alarm's state and shelf; an endpoint without one (a test's) has its
    active alarms published."""

    def alarm_board(self) -> Sequence[AlarmView]:
        """The alarm board, oldest first (shelved alarms included)."""
        ...


@dataclass
class BridgeStats:
    """Counters for logs, metrics (linectl_mqtt_*) and tests."""

    connected: bool = False
    connects: int = 0
    disconnects: int = 0
    dropped: int = 0
    """Live values dropped because the queue was full (linectl_mqtt_dropped_total)."""
    published: int = 0
    """Messages the broker took (QoS 0 written, QoS 1 acknowledged)."""
    live_published: int = 0
    records_published: int = 0
    replay_backlog: int = 0
    """Outbox records not yet acknowledged by the broker."""
    commands: int = 0
    last_error: str = ""
    replays: int = 0
    """Replay requests answered (done published), refused ones included."""
    records_replayed: int = 0
    """Outbox rows published on `replayed/<hid>/<kind>`."""
    confirmations: int = 0
    """Historian confirmations taken: their historian's cursor set to their seq (a
    cursor never moves back)."""


class LiveQueue:
    """Bounded FIFO of live values between the control cycle and the publisher.

    `put_nowait` never blocks and never fails: when full, the oldest value goes (and is
    counted), since a newer value of the same kind will follow it anyway.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"queue size must be at least 1, not {maxsize}")
        self.maxsize = maxsize
        self.dropped = 0
        self._items: deque[LiveValue] = deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: LiveValue) -> None:
        """Queue a value; drop the oldest if full."""
        if len(self._items) >= self.maxsize:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    def clear(self) -> None:
        """Drop everything queued (counted as dropped)."""
        self.dropped += len(self._items)
        self._items.clear()

    async def get_batch(self, limit: int) -> list[LiveValue]:
        """Wait for at least one value; take up to `limit`, oldest first."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        n = min(limit, len(self._items))
        return [self._items.popleft() for _ in range(n)]


class _Newest(Generic[_T]):
    """The newest item per key, waiting for its worker: a newer item replaces a queued one
    (a historian's newer replay request, its newer confirmation), so a flood from one
    historian holds one item, in bounded memory, and never queues work."""

    def __init__(self) -> None:
        self._items: dict[str, _T] = {}
        self._ready = asyncio.Event()

    def put(self, key: str, item: _T) -> None:
        """Queue `item` for `key`, replacing the one queued (if any)."""
        self._items[key] = item
        self._ready.set()

    async def take(self) -> dict[str, _T]:
        """Wait for at least one item; take every one queued."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        items, self._items = self._items, {}
        return items


class _Stopped(Exception):  # noqa: N818 - a signal inside the task group, not an error
    """Raised inside a session's task group when stop() was called."""


class MqttBridge:
    """One line's MQTT connection. `run()` until `stop()`; `on_cycle` is the observer."""

    def __init__(
        self,
        line: LineEndpoint,
        cfg: MqttConfig,
        *,
        line_id: str,
        store_path: Path,
        resolve_path: Callable[[str], Path] = Path,
        consumer: str = CONSUMER,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = unix_ms,
        client_factory: ClientFactory = aiomqtt.Client,
        protocol: aiomqtt.ProtocolVersion | None = None,
        poll_s: float = 0.2,
        backoff_min_s: float = 0.1,
        flush_s: float = 2.0,
        batch: int = 200,
        answers_per_sender: int = 256,
        per_sender_queue: int = 8,
        max_command_senders: int = 64,
        refusal_window_s: float = 10.0,
        records: Records | None = None,
        head_every_s: float = HEAD_EVERY_S,
        retention_every_s: float = RETENTION_EVERY_S,
    ) -> None:
        self.line = line
        self.cfg = cfg
        self.records = records if records is not None else _records_config(line)
        """`[records]`: the historians served and the retention (None: the line's own
        configuration when the line has one, LineService's `cfg`; else no historian)."""
        self.historians: tuple[str, ...] = tuple(self.records.historians)
        self.head_every_s = head_every_s
        self.retention_every_s = retention_every_s
        self.line_id = line_id
        self.topics = Topics.for_line(cfg.topic_prefix, line_id)
        self.store_path = store_path
        self.resolve_path = resolve_path
        self.consumer = consumer
        self.clock = clock
        self.wall_ms = wall_ms
        self.client_factory = client_factory
        self.protocol = protocol_version(cfg.protocol if protocol is None else protocol)
        """MQTT 5 by default (`[mqtt] protocol`; retain-as-published on the command topics,
        correlation data); 3.1.1 for old brokers."""
        self.settings = BrokerSettings.from_config(
            cfg, client_id=cfg.client_id or f"linectl-{line_id}", resolve=resolve_path
        )
        self.poll_s = poll_s
        self.backoff_min_s = backoff_min_s
        self.flush_s = flush_s
        self.batch = batch
        self.stats = BridgeStats()
        self.queue = LiveQueue(cfg.queue_size)
        self.filter = ReportFilter(cfg.deadbands, cfg.live_max_age_s, cfg.live_min_interval_s)
        self._state: dict[str, bytes] = {}  # retained state topic -> newest payload
        self._state_sent: dict[str, bytes] = {}
        self._state_ready = asyncio.Event()
        self._last_status: LineStatus | None = None
        self._last_alarms: tuple[AlarmView | ActiveAlarm, ...] | None = None
        self._alarm_board = line.alarm_board if isinstance(line, AlarmBoardSource) else None
        self._stopping = asyncio.Event()
        self._store: RecordStore | None = None
        self._acked_seq: int | None = None  # acknowledged, not yet written to the cursor
        self._answers: dict[str, OrderedDict[str, CommandResult]] = {}
        """Answers by sender, then request id (bounded per sender): the dedupe cache.
        Only senders that may send commands get here, and those are configured."""
        self.answers_per_sender = answers_per_sender
        self.per_sender_queue = per_sender_queue
        self.max_command_senders = max_command_senders
        self.refusals = RefusalTally(window_s=refusal_window_s)
        """Commands refused unread (no role, empty topic level, queue full)."""
        self._cycle_error_logged = False
        self._session_ms = 0
        self.connected = asyncio.Event()
        """Set while a session is up (tests wait on it)."""
        self._store_id = ""
        # Per session (made afresh at each connect): what the historians asked for.
        self._replay_boxes: dict[str, _Newest[ReplayRequest | RequestError]] = {}
        self._confirm_box: _Newest[Confirmation] = _Newest()
        self._strangers: set[str] = set()  # historian ids not configured, warned this session
        self._went_back: dict[str, int] = {}  # historian -> confirmed seq logged as too high
        self._retained_s: float | None = None  # when retention last ran (self.clock)

    # ------------------------------------------------------------------ control-cycle side

    def on_cycle(self, _line: object = None) -> None:
        """Observer of the control cycle: filter live values, queue them, note state.

        Never blocks and never raises (an error here must not stop the line).
        """
        try:
            now_s = self.clock()
            for v in self.line.live_values().values():
                if self.filter.offer(v, now_s):
                    self.queue.put_nowait(v)
            self.stats.dropped = self.queue.dropped
            status = self.line.line_status()
            if status != self._last_status:
                self._last_status = status
                self._set_state(self.topics.state, encode(state_payload(status)))
            board = self._alarm_board
            alarms: tuple[AlarmView | ActiveAlarm, ...] = (
                tuple(board()) if board is not None else tuple(self.line.active_alarms())
            )
            if alarms != self._last_alarms:
                self._last_alarms = alarms
                payload = alarms_active_payload(alarms, self.wall_ms())
                self._set_state(self.topics.alarms_active, encode(payload))
        except Exception:
            if not self._cycle_error_logged:
                log.exception("telemetry from the control cycle failed (logged once)")
                self._cycle_error_logged = True

    def _set_state(self, topic: str, payload: bytes) -> None:
        self._state[topic] = payload
        self._state_ready.set()

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Flush the outbox briefly, publish `offline` and disconnect; run() returns."""
        self._stopping.set()

    async def run(self) -> None:
        """Connect, serve, and reconnect after any loss, until stop()."""
        backoff = Backoff(self.cfg.reconnect_max_s, self.backoff_min_s)
        try:
            # Any failure of a session reconnects: a bug in one must not stop the line.
            await reconnect_loop(
                self._connect_and_serve,
                backoff,
                stop=self._stopping,
                retry=(Exception,),
                on_error=self._failed,
            )
        finally:
            store, self._store = self._store, None
            if store is not None:
                await asyncio.to_thread(store.close)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, aiomqtt.MqttError) or (
            isinstance(exc, ExceptionGroup) and exc.subgroup(aiomqtt.MqttError)
        ):
            self._lost(_describe(exc))
        else:
            log.error("MQTT session failed; reconnecting", exc_info=exc)
            self._lost(_describe(exc) if isinstance(exc, ExceptionGroup) else repr(exc))

    def _lost(self, why: str) -> None:
        if self.stats.connected or why != self.stats.last_error:
            # Once per outage, not once per attempt.
            log.warning("MQTT broker %s:%s: %s", self.cfg.host, self.cfg.port, why)
        if self.stats.connected:
            self.stats.disconnects += 1
        self.stats.connected = False
        self.stats.last_error = why
        self.connected.clear()

    def _client(self) -> aiomqtt.Client:
        cfg = self.cfg
        session_ms = self.wall_ms()
        will = aiomqtt.Will(
            self.topics.status,
            encode(status_payload(False, session_ms, session_ms=session_ms)),
            qos=1,
            retain=True,
        )
        self._session_ms = session_ms
        return make_client(
            self.settings,
            protocol=self.protocol,
            will=will,
            timeout_s=max(5.0, float(cfg.keepalive_s)),
            max_inflight=cfg.max_inflight,
            factory=self.client_factory,
        )

    async def _connect_and_serve(self, connected: Callable[[], None]) -> None:
        store = await self._open_store()
        client = self._client()
        async with entered(client):
            connected()
            self.stats.connected = True
            self.stats.connects += 1
            log.info("MQTT connected to %s:%s", self.cfg.host, self.cfg.port)
            session_seq = await asyncio.to_thread(store.outbox_last_seq)
            # Retain-as-published (MQTT 5): a retained command is seen as one even when it
            # is published while we are connected, and refused (`_handle`).
            await subscribe_commands(client, self.topics.cmd_filter, self.protocol)
            self._replay_boxes = {hid: _Newest() for hid in self.historians}
            self._confirm_box = _Newest()
            self._strangers = set()
            # Subscribed whatever the configuration, so that a historian the line does not
            # know is told about in the log (it would wait for answers that never come).
            # Retain-as-published: a retained replay request is told from a live one.
            await subscribe_commands(client, self.topics.replay_filter, self.protocol)
            await subscribe_commands(client, self.topics.confirmed_filter, self.protocol)
            await self._publish(client, self.topics.status, self._status(True), qos=1, retain=True)
            await self._publish(
                client, self.topics.schema, encode(schema_document()), qos=1, retain=True
            )
            # Live values queued during an outage are superseded by the fresh ones that
            # follow at once: dropped (counted), not sent late.
            self.queue.clear()
            self.stats.dropped = self.queue.dropped
            # Retained topics may have been lost with a broker restart: everything afresh.
            self.filter.forget()
            self._state_sent.clear()
            if self._state:
                self._state_ready.set()
            self.connected.set()
            try:
                async with task_group() as tg:
                    tg.create_task(self._commands(client), name="mqtt-commands")
                    tg.create_task(self._live(client), name="mqtt-live")
                    tg.create_task(self._states(client), name="mqtt-state")
                    tg.create_task(self._records(client, store, session_seq), name="mqtt-records")
                    tg.create_task(self._head(client, store), name="mqtt-records-head")
                    tg.create_task(self._confirmations(store), name="mqtt-confirmations")
                    replay_sem = asyncio.Semaphore(self._replay_inflight)
                    for hid, box in self._replay_boxes.items():
                        tg.create_task(
                            self._replays(
                                client, store, hid, box=box, sem=replay_sem, session_seq=session_seq
                            ),
                            name=f"mqtt-replay-{hid}",
                        )
                    if self.records.retention_days is not None:
                        tg.create_task(self._retention(store), name="mqtt-retention")
                    tg.create_task(self._until_stopped(), name="mqtt-stop")
            except* _Stopped:
                pass
            # A clean exit: the will is not sent on a clean disconnect, so say it here.
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(self.flush_s):
                    await self._records(client, store, session_seq, until_empty=True)
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(self.flush_s):
                    await self._publish(
                        client, self.topics.status, self._status(False), qos=1, retain=True
                    )
            self.connected.clear()
            self.stats.connected = False
            log.info("MQTT: offline published, disconnecting")

    def _status(self, online: bool) -> bytes:
        return encode(status_payload(online, self.wall_ms(), session_ms=self._session_ms))

    async def _open_store(self) -> RecordStore:
        if self._store is None:
            # Its own connection: reads never wait on the service's writer thread.
            store = await asyncio.to_thread(RecordStore, self.store_path)
            self._store_id = await asyncio.to_thread(lambda: store.store_id)
            await asyncio.to_thread(self._historian_cursors, store)
            self._store = store
        return self._store

    def _historian_cursors(self, store: RecordStore) -> None:
        """Make each named historian's outbox cursor (at 0 when new), before anything is
        pruned: from the bridge's start the outbox keeps every row until the historians
        confirm it. The cursor of a historian no longer named is removed (else the outbox
        would wait for it forever), loudly."""
        for hid in self.historians:
            store.advance_outbox_cursor(historian_cursor(hid), 0)  # never moves one back
        for consumer, seq in store.outbox_consumers().items():
            hid = consumer.removeprefix(HISTORIAN_CURSOR_PREFIX)
            if consumer.startswith(HISTORIAN_CURSOR_PREFIX) and hid not in self.historians:
                store.remove_outbox_cursor(consumer)
                log.warning(
                    "historian %r is no longer in [records] historians: its outbox cursor "
                    "(confirmed up to seq %d) is removed, and the outbox no longer waits for it",
                    hid,
                    seq,
                )

    @property
    def _replay_inflight(self) -> int:
        # Half the window: the live records' publishes never queue behind more than half a
        # window of replayed ones in the client (they share one connection).
        return max(1, self.cfg.max_inflight // 2)

    async def _until_stopped(self) -> None:
        await self._stopping.wait()
        raise _Stopped

    async def _publish(
        self,
        client: aiomqtt.Client,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        properties: Properties | None = None,
    ) -> None:
        await cancellable(
            client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        )
        self.stats.published += 1

    # ------------------------------------------------------------------ live and state

    async def _live(self, client: aiomqtt.Client) -> None:
        while True:
            for v in await self.queue.get_batch(64):
                await self._publish(
                    client, self.topics.live(v.name), encode(live_payload(v)), qos=0, retain=True
                )
                self.stats.live_published += 1

    async def _states(self, client: aiomqtt.Client) -> None:
        while True:
            await self._state_ready.wait()
            self._state_ready.clear()
            for topic, payload in list(self._state.items()):
                if self._state_sent.get(topic) != payload:
                    await self._publish(client, topic, payload, qos=1, retain=True)
                    self._state_sent[topic] = payload

    # ------------------------------------------------------------------ records

    async def _records(
        self,
        client: aiomqtt.Client,
        store: RecordStore,
        session_seq: int,
        *,
        until_empty: bool = False,
    ) -> None:
        """Publish the outbox in order, at most max_inflight unacknowledged at once."""
        await self._save_cursor(store)
        cursor = await asyncio.to_thread(store.outbox_cursor, self.consumer)
        await asyncio.to_thread(store.prune_outbox)
        pruned_s = self.clock()
        sem = asyncio.Semaphore(self.cfg.max_inflight)
        while True:
            if self.clock() - pruned_s > PRUNE_EVERY_S:
                await asyncio.to_thread(store.prune_outbox)
                pruned_s = self.clock()
            rows = await asyncio.to_thread(store.outbox_after, cursor, self.batch)
            last = await asyncio.to_thread(store.outbox_last_seq)
            self.stats.replay_backlog = max(0, last - cursor)
            if not rows:
                if until_empty:
                    return
                # Polled: the writer is another thread (or process); a read is cheap.
                await asyncio.sleep(self.poll_s)
                continue
            messages = [
                (
                    self.topics.record(row.kind),
                    self._record_bytes(row, historical=row.seq <= session_seq),
                )
                for row in rows
            ]
            done = [False] * len(rows)
            try:
                await self._publish_bounded(client, messages, sem, done)
            finally:
                # What the broker acknowledged, in an unbroken run from the cursor.
                n = next((i for i, ok in enumerate(done) if not ok), len(done))
                if n:
                    self._acked_seq = rows[n - 1].seq
                self.stats.records_published += sum(done)
            cursor = rows[-1].seq
            await self._save_cursor(store)
            self.stats.replay_backlog = max(0, last - cursor)

    async def _publish_bounded(
        self,
        client: aiomqtt.Client,
        messages: Iterable[tuple[str, bytes]] | AsyncIterator[tuple[str, bytes]],
        sem: asyncio.Semaphore,
        done: list[bool] | None = None,
    ) -> int:
        """Publish (topic, payload) pairs QoS 1, not retained, starting them in order with
        at most `sem`'s count unacknowledged at once; `done[i]` is set when message i was
        acknowledged. Returns how many were published, when every one was acknowledged;
        the first failure cancels the rest and is raised. The live records and the
        replays both publish through it. An async iterator of messages (a replay reading
        the outbox page by page) is read while the messages before are in flight, so the
        window never drains between pages."""

        async def send(i: int, topic: str, payload: bytes) -> None:
            try:
                await self._publish(client, topic, payload, qos=1, retain=False)
                if done is not None:
                    done[i] = True
            finally:
                sem.release()

        async def each() -> AsyncIterator[tuple[str, bytes]]:
            if isinstance(messages, AsyncIterator):
                async for m in messages:
                    yield m
            else:
                for m in messages:
                    yield m

        tasks: list[asyncio.Task[None]] = []
        n = 0
        try:
            async for topic, payload in each():
                # Acquired here, in order: publishes start in seq order.
                await sem.acquire()
                tasks.append(asyncio.create_task(send(n, topic, payload)))
                n += 1
                if len(tasks) > 4 * self.cfg.max_inflight:
                    # A long replay: forget the acknowledged ones (a failure is raised).
                    for t in tasks:
                        if t.done():
                            t.result()
                    tasks = [t for t in tasks if not t.done()]
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        return n

    def _record_bytes(self, row: OutboxRow, *, historical: bool, replay: bool = False) -> bytes:
        payload = record_payload(
            row.seq,
            row.kind,
            row.t,
            row.data,
            historical=historical,
            store_id=self._store_id,
            replay=replay,
        )
        return encode(payload)

    async def _save_cursor(self, store: RecordStore) -> None:
        seq = self._acked_seq
        if seq is not None:
            await asyncio.to_thread(store.advance_outbox_cursor, self.consumer, seq)
            self._acked_seq = None

    # ------------------------------------------------------------------ the plant historian

    async def _head(self, client: aiomqtt.Client, store: RecordStore) -> None:
        """`records/head`, retained: at once (every connect), then at most once per
        `head_every_s` while it changed (its seq grows with every record; its first_seq
        when the outbox is pruned)."""
        sent: tuple[int, int] | None = None
        while True:
            head = await asyncio.to_thread(_outbox_head, store)
            if head != sent:
                payload = records_head_payload(self._store_id, head[0], head[1], self.wall_ms())
                await self._publish(
                    client, self.topics.records_head, encode(payload), qos=1, retain=True
                )
                sent = head
            await asyncio.sleep(self.head_every_s)

    def _historian_message(self, message: aiomqtt.Message) -> bool:
        """Take a replay request or a confirmation off the connection (never waiting: the
        work is its worker's); False for any other topic."""
        topic = message.topic.value
        hid = self.topics.parse_replay(topic)
        if hid is not None:
            if self._known_historian(hid, "replay request"):
                item = _replay_item(message)
                if isinstance(item, RequestError):
                    log.error("replay request from historian %r refused: %s", hid, item)
                self._replay_boxes[hid].put(hid, item)
            return True
        hid = self.topics.parse_confirmed(topic)
        if hid is not None:
            if self._known_historian(hid, "confirmation"):
                try:
                    conf = parse_confirmation(_raw(message))
                except RequestError as exc:
                    log.error("confirmation from historian %r refused: %s", hid, exc)
                else:
                    self._confirm_box.put(hid, conf)
            return True
        return False

    def _known_historian(self, hid: str, what: str) -> bool:
        if hid in self.historians:
            return True
        if hid not in self._strangers:
            # Once per session and id: a historian's retries must not flood the log.
            self._strangers.add(hid)
            log.warning(
                "%s from historian %r ignored: it is not in [records] historians (%s); "
                "name it there for the line to serve it",
                what,
                hid[:64],
                ", ".join(self.historians) or "none",
            )
        return False

    async def _replays(
        self,
        client: aiomqtt.Client,
        store: RecordStore,
        hid: str,
        *,
        box: _Newest[ReplayRequest | RequestError],
        sem: asyncio.Semaphore,
        session_seq: int,
    ) -> None:
        """One historian's replays, one at a time, in their own task (the live records
        go on beside them); a request that came while one ran waits, and a newer one
        replaces it."""
        while True:
            item = (await box.take())[hid]
            if isinstance(item, RequestError):
                done = replay_done_payload(
                    item.request_id,
                    item.from_seq,
                    item.to_seq,
                    (),
                    self.wall_ms(),
                    error=str(item),
                )
            else:
                done = await self._replay(
                    client, store, hid, item, sem=sem, session_seq=session_seq
                )
            await self._publish(
                client, self.topics.replay_done(hid), encode(done), qos=1, retain=False
            )
            self.stats.replays += 1

    async def _replay(
        self,
        client: aiomqtt.Client,
        store: RecordStore,
        hid: str,
        req: ReplayRequest,
        *,
        sem: asyncio.Semaphore,
        session_seq: int,
    ) -> dict[str, Any]:
        """Publish the outbox rows req.from_seq..req.to_seq still held, in seq order, on
        `replayed/<hid>/<kind>`, every one acknowledged; return the `done` payload with
        the sub-ranges not held (pruned, or never written)."""
        log.info(
            "replaying seq %d..%d for historian %r (request %r)",
            req.from_seq,
            req.to_seq,
            hid,
            req.request_id,
        )
        missing: list[tuple[int, int]] = []
        expect = req.from_seq

        async def held() -> AsyncIterator[tuple[str, bytes]]:
            nonlocal expect
            while expect <= req.to_seq:
                rows = await asyncio.to_thread(store.outbox_range, expect, req.to_seq, self.batch)
                if not rows:
                    break
                for row in rows:
                    if row.seq > expect:
                        missing.append((expect, row.seq - 1))
                    expect = row.seq + 1
                    yield (
                        self.topics.replayed(hid, row.kind),
                        self._record_bytes(row, historical=row.seq <= session_seq, replay=True),
                    )

        self.stats.records_replayed += await self._publish_bounded(client, held(), sem)
        if expect <= req.to_seq:
            missing.append((expect, req.to_seq))
        if missing:
            log.info(
                "replay for historian %r: seq %s no longer held or never written",
                hid,
                ", ".join(f"{lo}..{hi}" for lo, hi in missing[:10]),
            )
        return replay_done_payload(
            req.request_id, req.from_seq, req.to_seq, missing, self.wall_ms()
        )

    async def _confirmations(self, store: RecordStore) -> None:
        while True:
            for hid, conf in (await self._confirm_box.take()).items():
                await self._confirm(store, hid, conf)

    async def _confirm(self, store: RecordStore, hid: str, conf: Confirmation) -> None:
        """Advance historian `hid`'s outbox cursor to the seq it confirmed, when the
        confirmation is for this store and possible."""
        if conf.store_id != self._store_id:
            # Another store's (this line's store before it was replaced, or another
            # line's): nothing of this store is confirmed by it.
            log.info(
                "historian %r confirms seq %d of store %s, not of this line's store %s: ignored",
                hid,
                conf.seq,
                conf.store_id[:64],
                self._store_id,
            )
            return
        newest = await asyncio.to_thread(store.outbox_last_seq)
        if conf.seq > newest:
            if self._went_back.get(hid) != conf.seq:
                self._went_back[hid] = conf.seq
                log.error(
                    "historian %r confirms seq %d of this store (%s), but its newest seq is "
                    "%d: the store went back (restored from a backup?). Records the "
                    "historian holds above seq %d are no longer on the line, and new ones "
                    "will reuse their seqs; the historian's cursor is not advanced "
                    '(docs/records.md, "Store identity")',
                    hid,
                    conf.seq,
                    self._store_id,
                    newest,
                    newest,
                )
            return
        self._went_back.pop(hid, None)
        await asyncio.to_thread(store.advance_outbox_cursor, historian_cursor(hid), conf.seq)
        self.stats.confirmations += 1
        log.debug("historian %r confirmed seq %d", hid, conf.seq)

    async def _retention(self, store: RecordStore) -> None:
        """The line-side retention: at once when the bridge starts, then every
        `retention_every_s` (across reconnects: at most that often)."""
        while True:
            last = self._retained_s
            wait_s = 0.0 if last is None else last + self.retention_every_s - self.clock()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
                continue
            self._retained_s = self.clock()
            try:
                await self._prune_confirmed(store)
            except Exception:
                # A locked database, a full disk: tried again next time, and the session
                # (the live records) goes on.
                log.exception("retention failed; it runs again in %.0f s", self.retention_every_s)

    async def _prune_confirmed(self, store: RecordStore) -> PruneResult:
        """Delete the reels every named historian confirmed that ended more than
        `retention_days` ago (RecordStore.prune_confirmed); log what went."""
        days = self.records.retention_days
        assert days is not None
        confirmed = min(
            [
                await asyncio.to_thread(store.outbox_cursor, historian_cursor(hid))
                for hid in self.historians
            ]
        )
        before_ms = self.wall_ms() - round(days * 86_400_000)
        before_iso = ms_to_iso(before_ms)
        total = PruneResult()
        after = 0
        while True:
            result = await asyncio.to_thread(
                partial(
                    store.prune_confirmed,
                    before_iso,
                    confirmed,
                    limit=RETENTION_BATCH,
                    after_end_seq=after,
                )
            )
            total += result
            if result.resume_after is None:
                break
            after = result.resume_after
        if total.reels:
            log.info(
                "retention: deleted %d reel(s) ended before %s and confirmed (up to seq %d) "
                "by every historian (%s): %s; with %d metres, %d audit events, %d alarms, "
                "%d state rows",
                len(total.reels),
                before_iso,
                confirmed,
                ", ".join(self.historians),
                _first(total.reels),
                total.metres,
                total.events,
                total.alarms,
                total.reel_states,
            )
        if total.kept:
            log.info(
                "retention: %d reel(s) due kept: %s",
                len(total.kept),
                _first([f"{reel_id}: {why}" for reel_id, why in total.kept], sep="; "),
            )
        return total

    # ------------------------------------------------------------------ commands

    async def _commands(self, client: aiomqtt.Client) -> None:
        """Take commands off the connection as fast as they come, never waiting for the
        control cycle: a sender with no role (or a topic with an empty level) is
        refused here and counted (`RefusalTally`); every other command goes to its
        sender's bounded queue (`CommandInbox`), served round robin, one in flight per
        sender. A flood from one identity then fills only its own queue and delays no
        one else's command beyond the next cycle, in bounded memory."""
        inbox: CommandInbox[tuple[aiomqtt.Message, str]] = CommandInbox(
            per_sender=self.per_sender_queue, max_senders=self.max_command_senders
        )
        wake = asyncio.Event()
        try:
            async with task_group() as tg:
                tg.create_task(self._serve_commands(client, inbox, wake, tg), name="mqtt-cmd-serve")
                tg.create_task(self._audit_refusals_every_window(), name="mqtt-cmd-tally")
                async for message in client.messages:
                    if not self._historian_message(message):
                        self._receive(client, message, inbox, wake, tg)
        finally:
            self._flush_refusals()

    def _receive(
        self,
        client: aiomqtt.Client,
        message: aiomqtt.Message,
        inbox: CommandInbox[tuple[aiomqtt.Message, str]],
        wake: asyncio.Event,
        tg: asyncio.TaskGroup,
    ) -> None:
        where = self.topics.parse_cmd_levels(message.topic.value)
        if where is None:
            return
        self.stats.commands += 1
        name, sender = where
        now_s = self.clock()
        if not name or not sender:
            # Nobody to answer (no response topic for an empty sender): counted, audited
            # in the window's aggregate.
            self.refusals.add(sender or "(empty)", "empty topic level", now_s)
            return
        reason = authorize_sender(sender, self.cfg)
        if reason:
            if self.refusals.add(sender, reason, now_s):
                result = nak(None, reason, command=bounded(name))
                tg.create_task(self._answer(client, message, sender, result))
            return
        if not inbox.offer(sender, (message, name)):
            reason = f"too many commands from {bounded(sender)!r} waiting: dropped"
            if self.refusals.add(sender, "queue full", now_s):
                result = nak(None, reason, command=bounded(name))
                tg.create_task(self._answer(client, message, sender, result))
            return
        wake.set()

    async def _answer(
        self, client: aiomqtt.Client, message: aiomqtt.Message, sender: str, result: CommandResult
    ) -> None:
        payload = message.payload
        if isinstance(payload, bytes | str):
            # Read only to be answered (at most once a second per sender).
            result = replace(result, request_id=request_id_of(payload))
        with contextlib.suppress(aiomqtt.MqttError):
            await self._respond(client, message, sender, result)

    async def _serve_commands(
        self,
        client: aiomqtt.Client,
        inbox: CommandInbox[tuple[aiomqtt.Message, str]],
        wake: asyncio.Event,
        tg: asyncio.TaskGroup,
    ) -> None:
        while True:
            await wake.wait()
            wake.clear()
            for sender, (message, name) in inbox.take():
                tg.create_task(self._serve_one(client, message, name, sender, (inbox, wake)))

    async def _serve_one(
        self,
        client: aiomqtt.Client,
        message: aiomqtt.Message,
        name: str,
        sender: str,
        queue: tuple[CommandInbox[tuple[aiomqtt.Message, str]], asyncio.Event],
    ) -> None:
        inbox, wake = queue
        try:
            result = await self._handle(message, name, sender)
            await self._respond(client, message, sender, result)
        finally:
            inbox.done(sender)
            wake.set()

    async def _audit_refusals_every_window(self) -> None:
        while True:
            await asyncio.sleep(self.refusals.window_s / 4)
            if self.refusals.due(self.clock()):
                self._flush_refusals()

    def _flush_refusals(self) -> None:
        summary = self.refusals.flush(self.clock())
        if summary is not None:
            log.warning(
                "commands refused unread in the last %.0f s: %d (senders: %s)",
                summary["window_s"],
                summary["refused"],
                ", ".join(list(summary["by_sender"])[:5]),
            )
            self.line.audit_refusals(summary)

    async def _handle(self, message: aiomqtt.Message, name: str, sender: str) -> CommandResult:
        payload = message.payload
        raw = payload if isinstance(payload, bytes | str) else str(payload)
        if message.retain:
            # A retained command would act again at every reconnect.
            reason = "retained commands are refused: publish commands with retain=false"
            self.line.audit_command_error(sender, name, reason, {"source": "mqtt"})
            return nak(None, reason, command=bounded(name))
        try:
            cmd = parse_command(raw, name=name, sender=sender, source="mqtt")
        except CommandError as exc:
            self.line.audit_command_error(sender, name, str(exc), {"source": "mqtt"})
            result = nak(None, str(exc), command=bounded(name))
            return replace(result, request_id=request_id_of(raw))
        answers = self._answers.setdefault(cmd.sender, OrderedDict())
        if cmd.request_id:
            # A QoS 1 redelivery or a client's retry: the same answer, not a second
            # action; from this run's memory, or from the audit trail after a restart.
            known = answers.get(cmd.request_id) or await self._answer_on_record(cmd)
            if known is not None:
                return known
        result = await self.line.execute(cmd)
        if cmd.request_id:
            answers[cmd.request_id] = result
            while len(answers) > self.answers_per_sender:
                answers.popitem(last=False)
        return result

    async def _answer_on_record(self, cmd: Command) -> CommandResult | None:
        """The answer a request got before (this sender, this request id), from the audit
        trail: a replay after a restart is answered from the record, not executed."""
        store = self._store
        if store is None:
            return None
        event = await asyncio.to_thread(store.command_on_record, cmd.sender, cmd.request_id)
        if event is None:
            return None
        detail = {k: v for k, v in event.detail.items() if k not in ("source", "request_id")}
        return CommandResult(
            event.accepted,
            event.reason,
            event.action,
            cmd.request_id,
            "",
            {**detail, "answered_from": f"audit record of {event.t}"},
        )

    async def _respond(
        self, client: aiomqtt.Client, message: aiomqtt.Message, sender: str, result: CommandResult
    ) -> None:
        props = message.properties
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        out: Properties | None = None
        if correlation is not None:
            out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            out.CorrelationData = correlation
        answer_topic = self.topics.answer_topic(topic, sender)
        if topic and topic != answer_topic:
            # Another user's response topic, or one outside the prefix: never honoured.
            log.debug("command from %s: response topic %r ignored", sender, topic)
        await self._publish(
            client,
            answer_topic,
            encode(result.to_json(self.wall_ms())),
            qos=1,
            retain=False,
            properties=out,
        )


def _records_config(line: object) -> Records:
    """The line's `[records]` when the line carries its configuration (LineService's
    `cfg`), else the defaults (no historian)."""
    cfg = getattr(line, "cfg", None)
    return cfg.line.records if isinstance(cfg, LoadedConfig) else Records()


def _raw(message: aiomqtt.Message) -> bytes | str:
    payload = message.payload
    return payload if isinstance(payload, bytes | str) else str(payload)


def _replay_item(message: aiomqtt.Message) -> ReplayRequest | RequestError:
    """A replay request, or why it is refused."""
    try:
        req = parse_replay_request(_raw(message))
    except RequestError as exc:
        return exc
    if message.retain:
        # Retained, it would be answered again at every connection, long after it was
        # asked (and the historian may not be listening for it any more).
        return RequestError(
            "retained replay requests are refused: publish them with retain=false",
            request_id=req.request_id,
            from_seq=req.from_seq,
            to_seq=req.to_seq,
        )
    return req


def _first(items: Sequence[str], n: int = 20, *, sep: str = ", ") -> str:
    """The first `n` items joined, and how many more (a first retention may delete a
    year of reels: the log line stays readable)."""
    more = f"{sep}and {len(items) - n} more" if len(items) > n else ""
    return sep.join(items[:n]) + more


def _outbox_head(store: RecordStore) -> tuple[int, int]:
    """(newest seq, oldest seq held) of the outbox."""
    return store.outbox_last_seq(), store.outbox_first_seq()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        inner = exc.subgroup(aiomqtt.MqttError) or exc
        return "; ".join(_describe(e) for e in inner.exceptions)
    return str(exc) or type(exc).__name__


async def wait_connected(bridge: MqttBridge, timeout_s: float) -> None:
    """Wait until the bridge has a session (TimeoutError otherwise)."""
    async with asyncio.timeout(timeout_s):
        await bridge.connected.wait()


__all__ = [
    "CONSUMER",
    "HISTORIAN_CURSOR_PREFIX",
    "BridgeStats",
    "LineEndpoint",
    "LiveQueue",
    "MqttBridge",
    "historian_cursor",
    "wait_connected",
]
