"""Sparkplug B edge node over MQTT: the thin async shell around linectl.sparkplug.node.

It has its own broker connection (aiomqtt), because a Sparkplug edge node's will must be
its NDEATH. Per connection:

1. the next bdSeq (persisted before connecting; a retry after a CONNECT that was never
   acknowledged keeps it), the NDEATH with it registered as the will (QoS 1, not
   retained), clean session;
2. subscribe to NCMD, DCMD (QoS 1) and, when a primary host is configured, its STATE;
   with a primary host, births wait until its STATE says online;
3. NBIRTH and one DBIRTH per device with current values, then metre records that waited
   for the broker (is_historical), then data by exception every `scan_period_s`. Metre
   records come from the record store's outbox (durable, own cursor "sparkplug") when one
   is given, else from `offer_metres` (in memory);
4. 'Node Control/Rebirth' = true in an NCMD: NBIRTH and DBIRTHs again (same bdSeq);
   command metrics: the command goes to the line (`LineSource.execute`) and its answer
   comes back as NDATA 'Commands/last_result';
5. on leaving (stop, cancellation, primary host offline) it publishes the NDEATH itself
   before disconnecting, because a clean DISCONNECT makes the broker drop the will. If the
   process dies, the broker publishes the will.

The broker going away is normal: reconnect with capped exponential backoff, new bdSeq.
The connection (settings, client, TLS, back-off, the command subscriptions with MQTT 5
retain-as-published) is linectl.broker's, as for the JSON bridge and the CLI client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiomqtt

from linectl.aio import cancellable, entered, task_group, unix_ms
from linectl.broker import Backoff, BrokerSettings, make_client, reconnect_loop, subscribe_commands
from linectl.commands import Command, CommandResult
from linectl.config import LoadedConfig
from linectl.core.ledger import MetreRecord, Verdict
from linectl.errors import ConfigError, LocalError
from linectl.sparkplug.node import (
    EdgeNode,
    Execute,
    HostWatch,
    Message,
    Reading,
    Rebirth,
    Refuse,
    parse_state,
    readings_from_status,
    state_topic,
    topic,
)
from linectl.telemetry import iso_to_ms

log = logging.getLogger("linectl.sparkplug")


MAX_PENDING_COMMANDS = 16
"""Commands waiting for the line at once; more are refused ("busy")."""


class LineSource(Protocol):
    """What the edge node needs from the line (LineService provides it)."""

    def live_values(self) -> Mapping[str, Reading]:
        """Current live values by name (linectl.telemetry.LiveValue)."""
        ...

    async def execute(self, cmd: Command) -> CommandResult:
        """Authorize and apply a command; the answer."""
        ...


class OutboxRow(Protocol):
    """One row of the record store's outbox (linectl.store.OutboxRow fits)."""

    @property
    def seq(self) -> int:
        """Increasing sequence number."""
        ...

    @property
    def kind(self) -> str:
        """metres, reel, alarm, audit."""
        ...

    @property
    def t(self) -> str:
        """When the record was made, ISO 8601 with offset."""
        ...

    @property
    def data(self) -> Mapping[str, Any]:
        """The record."""
        ...


class Outbox(Protocol):
    """The record store's durable outbox, read by a named consumer (a RecordStore on its
    own connection fits). Called from a worker thread: the calls block on SQLite."""

    def outbox_after(self, seq: int, limit: int = 100) -> Sequence[OutboxRow]:
        """Rows after `seq`, oldest first."""
        ...

    def outbox_last_seq(self) -> int:
        """The newest row's seq (0: none yet)."""
        ...

    def outbox_cursor(self, consumer: str) -> int:
        """The last seq `consumer` passed (0: never read)."""
        ...

    def advance_outbox_cursor(self, consumer: str, seq: int) -> None:
        """Persist that `consumer` passed `seq`."""
        ...


OUTBOX_CONSUMER = "sparkplug"
"""The Sparkplug edge node's cursor name in the outbox (the JSON publisher has its own)."""
METRES_PER_MESSAGE = 100
"""Metre records per DDATA (7 metrics each): keeps messages well under 100 kB."""


def metre_records(row: OutboxRow) -> tuple[str, list[MetreRecord]] | None:
    """(reel id, metres) of a `metres` outbox row; None for other kinds. An `unproven`
    range becomes one UNPROVEN record per metre, dose unknown (null)."""
    if row.kind != "metres":
        return None
    d = row.data
    reel_id = str(d["reel_id"])
    nan = math.nan

    def num(x: Any) -> float:
        return nan if x is None else float(x)

    if d.get("event") == "unproven":
        cause = str(d.get("cause", ""))
        first, last = int(d["first_index"]), int(d["last_index"])
        recs = [
            MetreRecord(i, nan, nan, nan, Verdict.UNPROVEN, (cause,) if cause else ())
            for i in range(first, last + 1)
        ]
        return reel_id, recs
    recs = [
        MetreRecord(
            int(m["index"]),
            num(m.get("dose_kgy")),
            num(m.get("min_dose_kgy")),
            num(m.get("max_dose_kgy")),
            Verdict(m["verdict"]),
            tuple(m.get("causes", ())),
        )
        for m in d.get("metres", ())
    ]
    return reel_id, recs


class BdSeqFile:
    """The last bdSeq used, kept in a small JSON file so it goes on across restarts
    (Sparkplug: one more on every new MQTT CONNECT). Written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int | None:
        """The last bdSeq used; None when the file does not exist yet."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            value = json.loads(text)["bdSeq"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path}: not a bdSeq state file ({exc!r})") from None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise ConfigError(f"{self.path}: bdSeq {value!r} is not an integer in 0..255")
        return value

    def save(self, bd_seq: int) -> None:
        """Record `bd_seq` as used (fsync'd, then renamed over the old file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w") as f:
            json.dump({"bdSeq": bd_seq}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)


@dataclass
class SparkplugStats:
    """Counters for logs, metrics and tests."""

    connected: bool = False
    connects: int = 0
    births: int = 0
    rebirths: int = 0
    data_messages: int = 0
    commands: int = 0
    records_sent: int = 0
    records_historical: int = 0
    records_dropped: int = 0


class _HostOfflineError(Exception):
    """The primary host went offline on this broker: NDEATH, disconnect, start over."""


class _StopRequestedError(Exception):
    """stop() was called."""


class SparkplugEdge:
    """Runs one EdgeNode against a broker until stopped (see the module docstring)."""

    def __init__(
        self,
        node: EdgeNode,
        source: LineSource,
        broker: BrokerSettings,
        *,
        primary_host_id: str | None = None,
        bdseq_file: BdSeqFile | None = None,
        status: Callable[[], Any] | None = None,
        outbox: Outbox | None = None,
        scan_period_s: float = 0.1,
        max_backlog: int = 100_000,
        wall_ms: Callable[[], int] = unix_ms,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.source = source
        self.broker = broker
        self.primary_host_id = primary_host_id
        self.bdseq_file = bdseq_file
        self.status = status
        self.outbox = outbox
        self._cursor: int | None = None
        self.scan_period_s = scan_period_s
        self.wall_ms = wall_ms
        self.clock = clock
        self.stats = SparkplugStats()
        self._watch = HostWatch(primary_host_id) if primary_host_id else None
        self._host_online = asyncio.Event()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()  # builds and publishes happen in seq order
        # Commands run one at a time, in arrival order (asyncio.Lock is FIFO), and a
        # burst beyond MAX_PENDING_COMMANDS is refused rather than queued without bound.
        self._cmd_lock = asyncio.Lock()
        self._cmd_pending = 0
        self._backlog: deque[tuple[str, list[MetreRecord], int]] = deque()
        self._backlog_metres = 0
        self._max_backlog = max_backlog
        self._born_at_ms = 0
        if bdseq_file is not None and node.bd_seq is None:
            node.bd_seq = bdseq_file.load()

    @classmethod
    def from_config(
        cls,
        cfg: LoadedConfig,
        source: LineSource,
        *,
        status: Callable[[], Any] | None = None,
        outbox: Outbox | None = None,
        bdseq_path: Path | None = None,
        scan_period_s: float = 0.1,
    ) -> SparkplugEdge:
        """An edge node as cfg.line.sparkplug and cfg.line.mqtt describe it. The bdSeq
        file defaults to `sparkplug-bdseq.json` beside the record database. With `outbox`
        (a RecordStore of its own) metre records come from the store, durably."""
        line = cfg.line
        sp, mq = line.sparkplug, line.mqtt
        if not sp.enabled:
            raise ConfigError("sparkplug.enabled is false")
        node = EdgeNode(
            sp.group_id,
            sp.edge_node_id or line.line_id,
            sender=sp.primary_host_id or "sparkplug",
            deadbands=dict(mq.deadbands),
            min_interval_s=mq.live_min_interval_s,
            properties={"line_id": line.line_id},
            line_status=status is not None,
        )
        path = bdseq_path or cfg.resolve(line.records.path).parent / "sparkplug-bdseq.json"
        broker = BrokerSettings.from_config(
            mq,
            # Its own client id: the JSON telemetry client may share the broker.
            client_id=f"{mq.client_id or 'linectl-' + line.line_id}-spb",
            resolve=cfg.resolve,  # TLS files relative to the configuration directory
        )
        return cls(
            node,
            source,
            broker,
            primary_host_id=sp.primary_host_id,
            bdseq_file=BdSeqFile(path),
            status=status,
            outbox=outbox,
            scan_period_s=scan_period_s,
        )

    # ------------------------------------------------------------------ hooks

    def offer_metres(self, reel_id: str, records: Sequence[MetreRecord]) -> None:
        """Completed metres (fits LineService.on_metres), when there is no outbox. They go
        out on the dose device; those made while the broker was away go out after the next
        birth, marked is_historical. Held in memory: beyond `max_backlog` metres the
        oldest are dropped (counted), and a restart loses them (the outbox does not)."""
        if not records:
            return
        self._backlog.append((reel_id, list(records), self.wall_ms()))
        self._backlog_metres += len(records)
        while self._backlog_metres > self._max_backlog and self._backlog:
            _, dropped, _ = self._backlog.popleft()
            self._backlog_metres -= len(dropped)
            self.stats.records_dropped += len(dropped)
            log.warning("sparkplug: %d metre records dropped (backlog full)", len(dropped))

    def stop(self) -> None:
        """Publish NDEATH, disconnect and return from run()."""
        self._stop.set()

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Connect, birth, publish; reconnect when the broker goes; until stop()."""
        advance = True  # the previous CONNECT was acknowledged (or there was none)

        async def connection(connected: Callable[[], None]) -> None:
            nonlocal advance
            if advance:
                bd_seq = self.node.new_session()
                if self.bdseq_file is not None:
                    self.bdseq_file.save(bd_seq)
            else:
                bd_seq = self.node.retry_session()
            advance = False
            will_topic, will_payload = self.node.death(self.wall_ms())
            try:
                will = aiomqtt.Will(will_topic, will_payload, 1, False)
                async with entered(self._client(will)) as c:
                    advance = True
                    connected()
                    self.stats.connects += 1
                    self.stats.connected = True
                    log.info("sparkplug: connected (bdSeq %d)", bd_seq)
                    outcome = await self._session(c)
                if outcome == "host_offline":
                    log.warning("sparkplug: primary host offline: disconnected, starting over")
            finally:
                self.stats.connected = False
                self.node.end_session()

        def lost(exc: Exception) -> None:
            log.warning("sparkplug: broker connection lost or refused: %s", exc)

        await reconnect_loop(
            connection, Backoff(self.broker.reconnect_max_s), stop=self._stop, on_error=lost
        )

    def _client(self, will: aiomqtt.Will) -> aiomqtt.Client:
        return make_client(self.broker, will=will, clean=True, timeout_s=10.0)

    async def _session(self, client: aiomqtt.Client) -> str:
        """Runs one connection: 'stop', 'host_offline', or raises MqttError (lost)."""
        node = self.node
        base = (node.group_id, node.edge_node_id)
        # Retain-as-published (MQTT 5): a retained NCMD/DCMD is seen as retained even when
        # it is published while we are connected, and refused (`_receive`).
        protocol = self.broker.protocol
        await subscribe_commands(client, topic(base[0], "NCMD", base[1]), protocol)
        await subscribe_commands(client, f"spBv1.0/{base[0]}/DCMD/{base[1]}/+", protocol)
        if self._watch is not None:
            self._watch.reset()
            self._host_online.clear()
            await cancellable(client.subscribe(state_topic(self._watch.host_id), qos=1))
        outcome = "lost"
        lost: list[Exception] = []
        try:
            async with task_group() as tg:
                tg.create_task(self._receive(client, tg), name="sparkplug-receive")
                tg.create_task(self._publish_loop(client), name="sparkplug-publish")
                tg.create_task(self._until_stopped(), name="sparkplug-stop")
        except* _StopRequestedError:
            outcome = "stop"
        except* _HostOfflineError:
            outcome = "host_offline"
        except* aiomqtt.MqttError as group:
            lost.extend(group.exceptions)
        finally:
            # Leaving on purpose (stop, cancellation, host offline): NDEATH first, since
            # the DISCONNECT that follows makes the broker discard the will. Without a
            # birth in this session there is nothing for a host to mark offline.
            if (outcome != "lost" or _cancelling()) and self.node.born:
                await self._ndeath(client)
        if lost:
            raise aiomqtt.MqttError(str(lost[0]))
        return outcome

    async def _until_stopped(self) -> None:
        await self._stop.wait()
        raise _StopRequestedError

    async def _ndeath(self, client: aiomqtt.Client) -> None:
        # Sparkplug: an edge node that leaves on purpose publishes its NDEATH first.
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with self._lock:
                t, payload = self.node.death(self.wall_ms())
                await cancellable(client.publish(t, payload, qos=1, timeout=2.0))

    # ------------------------------------------------------------------ publishing

    def _readings(self) -> dict[str, Reading]:
        out: dict[str, Reading] = dict(self.source.live_values())
        if self.status is not None:
            st = self.status()
            if st is not None:
                out.update(readings_from_status(st, self.wall_ms()))
        return out

    async def _send(self, client: aiomqtt.Client, msgs: list[Message]) -> None:
        for t, payload in msgs:
            await cancellable(client.publish(t, payload, qos=0, retain=False))

    async def _birth(self, client: aiomqtt.Client) -> None:
        async with self._lock:
            now_ms = self.wall_ms()
            msgs = self.node.birth(self._readings(), now_ms, self.clock())
            await self._send(client, msgs)
            self._born_at_ms = now_ms
        self.stats.births += 1
        log.info("sparkplug: NBIRTH and %d DBIRTH(s) published", len(msgs) - 1)

    async def _flush_records(self, client: aiomqtt.Client) -> None:
        while self._backlog:
            reel_id, records, t_ms = self._backlog[0]
            historical = t_ms < self._born_at_ms
            for i in range(0, len(records), METRES_PER_MESSAGE):
                async with self._lock:
                    msgs = self.node.metres(
                        reel_id,
                        records[i : i + METRES_PER_MESSAGE],
                        t_ms,
                        self.wall_ms(),
                        historical=historical,
                    )
                    await self._send(client, msgs)
            self._backlog.popleft()
            self._backlog_metres -= len(records)
            self.stats.records_sent += len(records)
            if historical:
                self.stats.records_historical += len(records)

    async def _start_cursor(self, outbox: Outbox) -> int:
        """Where this consumer's outbox reading starts, found once, before the first
        birth: a record committed after a host saw the births is always sent."""
        if self._cursor is not None:
            return self._cursor
        cursor = await asyncio.to_thread(outbox.outbox_cursor, OUTBOX_CONSUMER)
        if cursor == 0:
            # A new consumer starts from now, not from the store's whole history.
            cursor = await asyncio.to_thread(outbox.outbox_last_seq)
            await asyncio.to_thread(outbox.advance_outbox_cursor, OUTBOX_CONSUMER, cursor)
        self._cursor = cursor
        return cursor

    async def _flush_outbox(self, client: aiomqtt.Client, outbox: Outbox) -> None:
        """Metre records from the store's outbox after our cursor, then the cursor on.

        Sparkplug DATA is QoS 0, so there is no acknowledgement to wait for: the cursor
        moves once the messages are handed to the connection. A record in flight when
        the connection drops is lost to Sparkplug (it stays in the store, and the JSON
        publisher delivers records at least once)."""
        self._cursor = await self._start_cursor(outbox)
        while True:
            rows = await asyncio.to_thread(outbox.outbox_after, self._cursor, 100)
            if not rows:
                return
            for row in rows:
                found = metre_records(row)
                if found is not None and found[1]:
                    reel_id, recs = found
                    t_ms = iso_to_ms(row.t)
                    historical = t_ms < self._born_at_ms
                    for i in range(0, len(recs), METRES_PER_MESSAGE):
                        chunk = recs[i : i + METRES_PER_MESSAGE]
                        async with self._lock:
                            msgs = self.node.metres(
                                reel_id, chunk, t_ms, self.wall_ms(), historical=historical
                            )
                            await self._send(client, msgs)
                    self.stats.records_sent += len(recs)
                    if historical:
                        self.stats.records_historical += len(recs)
                self._cursor = row.seq
            await asyncio.to_thread(outbox.advance_outbox_cursor, OUTBOX_CONSUMER, self._cursor)

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        if self._watch is not None:
            await self._host_online.wait()
        if self.outbox is not None:
            await self._start_cursor(self.outbox)
        await self._birth(client)
        while True:
            await self._flush_records(client)
            if self.outbox is not None:
                await self._flush_outbox(client, self.outbox)
            readings = self._readings()
            if self.node.unknown(readings):
                log.info("sparkplug: new metrics %s: rebirth", self.node.unknown(readings))
                await self._birth(client)
                continue
            async with self._lock:
                msgs = self.node.data(readings, self.wall_ms(), self.clock())
                await self._send(client, msgs)
            self.stats.data_messages += len(msgs)
            await asyncio.sleep(self.scan_period_s)

    # ------------------------------------------------------------------ receiving

    async def _receive(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        async for message in client.messages:
            t = message.topic.value
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload or "").encode()
            if t.startswith("spBv1.0/STATE/"):
                self._on_state(data)
                continue
            if message.retain and ("/NCMD/" in t or "/DCMD/" in t):
                # A retained command would act again on every reconnect, long after the
                # operator sent it: refused, as on the JSON command topics.
                self.stats.commands += 1
                log.warning("sparkplug: retained command on %s refused", t)
                self._audit_refusal("retained command", t)
                continue
            for event in self.node.command(t, data):
                if isinstance(event, Rebirth):
                    log.info("sparkplug: rebirth requested")
                    self.stats.rebirths += 1
                    if self.node.born:
                        await self._birth(client)
                elif isinstance(event, Execute):
                    self.stats.commands += 1
                    if self._cmd_pending >= MAX_PENDING_COMMANDS:
                        busy = CommandResult(
                            False, "busy: too many commands pending", event.command.name.value
                        )
                        self._audit_refusal(busy.reason, t)
                        await self._answer(client, busy)
                        continue
                    self._cmd_pending += 1
                    tg.create_task(self._execute(client, event.command))
                elif isinstance(event, Refuse):
                    self.stats.commands += 1
                    log.warning("sparkplug: command refused: %s", event.result.reason)
                    self._audit_refusal(event.result.reason, t, event.result.command)
                    await self._answer(client, event.result)
                else:
                    log.info("sparkplug: %s", event.why)

    def _on_state(self, data: bytes) -> None:
        if self._watch is None:
            return
        try:
            state = parse_state(data)
        except LocalError as exc:
            log.warning("sparkplug: STATE of %s ignored: %s", self._watch.host_id, exc)
            return
        verdict = self._watch.update(state)
        if verdict == "online":
            self._host_online.set()
        elif verdict == "offline":
            self._host_online.clear()
            raise _HostOfflineError

    def _audit_refusal(self, reason: str, topic: str, command: str = "") -> None:
        """Every command is audited, also one that never became a Command."""
        audit = getattr(self.source, "audit_command_error", None)
        if audit is not None:
            audit(self.node.sender, command or "sparkplug_command", reason, {"topic": topic})

    async def _execute(self, client: aiomqtt.Client, cmd: Command) -> None:
        async with self._cmd_lock:
            try:
                await self._execute_one(client, cmd)
            finally:
                self._cmd_pending -= 1

    async def _execute_one(self, client: aiomqtt.Client, cmd: Command) -> None:
        try:
            result = await self.source.execute(cmd)
        except LocalError as exc:
            result = CommandResult(False, str(exc), cmd.name.value, cmd.request_id)
        except Exception as exc:  # a bug in the line must not end the Sparkplug session
            log.exception("sparkplug: %s failed", cmd.name.value)
            result = CommandResult(False, f"internal error: {exc}", cmd.name.value, cmd.request_id)
        log.info(
            "sparkplug: %s from %s: %s %s", cmd.name.value, cmd.sender, result.result, result.reason
        )
        await self._answer(client, result)

    async def _answer(self, client: aiomqtt.Client, result: CommandResult) -> None:
        async with self._lock:
            msgs = self.node.command_result(result, self.wall_ms())
            await self._send(client, msgs)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


__all__ = ["BdSeqFile", "BrokerSettings", "LineSource", "SparkplugEdge", "SparkplugStats"]
