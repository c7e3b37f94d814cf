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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
from linectl.config import MqttConfig
from linectl.store import OutboxRow, RecordStore
from linectl.telemetry import (
    ActiveAlarm,
    AlarmView,
    LineStatus,
    LiveValue,
    ReportFilter,
    Topics,
    alarms_active_payload,
    encode,
    live_payload,
    record_payload,
    schema_document,
    state_payload,
    status_payload,
)

log = logging.getLogger("linectl.mqtt")

CONSUMER = "mqtt"
"""This publisher's cursor name in the store's outbox."""


PRUNE_EVERY_S = 600.0
"""How often a long session prunes the outbox of rows every consumer has passed."""


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
    ) -> None:
        self.line = line
        self.cfg = cfg
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
            self._store = await asyncio.to_thread(RecordStore, self.store_path)
        return self._store

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
            done = [False] * len(rows)

            async def send(i: int, row: OutboxRow, done: list[bool]) -> None:
                try:
                    await self._publish(
                        client,
                        self.topics.record(row.kind),
                        _record_bytes(row, historical=row.seq <= session_seq),
                        qos=1,
                        retain=False,
                    )
                    done[i] = True
                    self.stats.records_published += 1
                finally:
                    sem.release()

            tasks: list[asyncio.Task[None]] = []
            try:
                for i, row in enumerate(rows):
                    # Acquired here, in order: publishes start in seq order.
                    await sem.acquire()
                    tasks.append(asyncio.create_task(send(i, row, done)))
                await asyncio.gather(*tasks)
            finally:
                # What the broker acknowledged, in an unbroken run from the cursor.
                n = next((i for i, ok in enumerate(done) if not ok), len(done))
                if n:
                    self._acked_seq = rows[n - 1].seq
                for t in tasks:
                    t.cancel()
            cursor = rows[-1].seq
            await self._save_cursor(store)
            self.stats.replay_backlog = max(0, last - cursor)

    async def _save_cursor(self, store: RecordStore) -> None:
        seq = self._acked_seq
        if seq is not None:
            await asyncio.to_thread(store.advance_outbox_cursor, self.consumer, seq)
            self._acked_seq = None

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


def _record_bytes(row: OutboxRow, *, historical: bool) -> bytes:
    return encode(record_payload(row.seq, row.kind, row.t, row.data, historical=historical))


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
    "BridgeStats",
    "LineEndpoint",
    "LiveQueue",
    "MqttBridge",
    "wait_connected",
]
