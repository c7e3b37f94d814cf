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

aiomqtt does not reconnect by itself: `run()` loops on MqttError with a capped backoff,
with a new client (and a new will) per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linectl.aio import cancellable, entered, task_group, wait_event
from linectl.commands import Command, CommandError, CommandResult, nak, parse_command
from linectl.config import MqttConfig
from linectl.store import OutboxRow, RecordStore
from linectl.telemetry import (
    ActiveAlarm,
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


def unix_ms() -> int:
    """Wall-clock time now, unix milliseconds."""
    return time.time_ns() // 1_000_000


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


ClientFactory = Callable[..., aiomqtt.Client]


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
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
        poll_s: float = 0.2,
        backoff_min_s: float = 0.1,
        flush_s: float = 2.0,
        batch: int = 200,
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
        self.protocol = protocol
        """MQTT 5 by default (response topic, correlation data); 3.1.1 for old brokers,
        whose clients get their answers on the fallback response topic."""
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
        self._last_alarms: tuple[ActiveAlarm, ...] | None = None
        self._stopping = asyncio.Event()
        self._store: RecordStore | None = None
        self._acked_seq: int | None = None  # acknowledged, not yet written to the cursor
        self._answers: OrderedDict[tuple[str, str], CommandResult] = OrderedDict()
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
            alarms = tuple(self.line.active_alarms())
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
        backoff_s = self.backoff_min_s
        try:
            while not self._stopping.is_set():
                try:
                    await self._connect_and_serve()
                    backoff_s = self.backoff_min_s
                except (aiomqtt.MqttError, ExceptionGroup) as exc:
                    if isinstance(exc, ExceptionGroup) and not exc.subgroup(aiomqtt.MqttError):
                        log.exception("MQTT session failed; reconnecting")
                    self._lost(_describe(exc))
                except Exception as exc:  # a bug in a session must not stop the line
                    log.exception("MQTT session failed; reconnecting")
                    self._lost(repr(exc))
                if self._stopping.is_set():
                    break
                await wait_event(self._stopping, backoff_s)
                backoff_s = min(backoff_s * 2, self.cfg.reconnect_max_s)
        finally:
            store, self._store = self._store, None
            if store is not None:
                await asyncio.to_thread(store.close)

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
        tls: aiomqtt.TLSParameters | None = None
        if cfg.tls is not None:
            t = cfg.tls

            def path(p: str | None) -> str | None:
                return None if p is None else str(self.resolve_path(p))

            tls = aiomqtt.TLSParameters(
                ca_certs=path(t.ca_file), certfile=path(t.cert_file), keyfile=path(t.key_file)
            )
        self._session_ms = session_ms
        client = self.client_factory(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password,
            identifier=cfg.client_id or f"linectl-{self.line_id}",
            protocol=self.protocol,
            will=will,
            keepalive=cfg.keepalive_s,
            timeout=max(5.0, float(cfg.keepalive_s)),
            max_inflight_messages=cfg.max_inflight,
            tls_params=tls,
            tls_insecure=cfg.tls.insecure if cfg.tls is not None else None,
            # Small publishes must not wait for Nagle and the peer's delayed ACK (~40 ms on
            # Linux): without this p99 live latency was 53 ms, with it 19-26 ms (bench).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # aiomqtt warns above 10 pending calls; up to max_inflight is what we ask for.
        client.pending_calls_threshold = cfg.max_inflight + 10
        return client

    async def _connect_and_serve(self) -> None:
        store = await self._open_store()
        client = self._client()
        async with entered(client):
            self.stats.connected = True
            self.stats.connects += 1
            log.info("MQTT connected to %s:%s", self.cfg.host, self.cfg.port)
            session_seq = await asyncio.to_thread(store.outbox_last_seq)
            await cancellable(client.subscribe(self.topics.cmd_filter, qos=1))
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
        # Ends with MqttError when the connection goes, which ends the session.
        async for message in client.messages:
            where = self.topics.parse_cmd(message.topic.value)
            if where is None:
                continue
            self.stats.commands += 1
            result = await self._handle(message, *where)
            await self._respond(client, message, where[1], result)

    async def _handle(self, message: aiomqtt.Message, name: str, sender: str) -> CommandResult:
        payload = message.payload
        raw = payload if isinstance(payload, bytes | str) else str(payload)
        if message.retain:
            # A retained command would act again at every reconnect.
            reason = "retained commands are refused: publish commands with retain=false"
            self.line.audit_command_error(sender, name, reason, {"source": "mqtt"})
            return nak(None, reason, command=name)
        try:
            cmd = parse_command(raw, name=name, sender=sender, source="mqtt")
        except CommandError as exc:
            self.line.audit_command_error(sender, name, str(exc), {"source": "mqtt"})
            return nak(None, str(exc), command=name)
        key = (cmd.sender, cmd.request_id)
        if cmd.request_id and key in self._answers:
            # A QoS 1 redelivery or a client's retry: the same answer, not a second action.
            return self._answers[key]
        result = await self.line.execute(cmd)
        if cmd.request_id:
            self._answers[key] = result
            while len(self._answers) > 256:
                self._answers.popitem(last=False)
        return result

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
        await self._publish(
            client,
            self.topics.answer_topic(topic, sender),
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
