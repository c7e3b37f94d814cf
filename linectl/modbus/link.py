"""The controller's link to one PLC: the only module that talks to pymodbus.

A `PlcLink` owns one Modbus TCP client and a background task that (re)connects it.
`poll()` reads the planned blocks and returns a `Snapshot` in which every value carries
its quality; it never raises on a communication failure. `write()` encodes through the
register map, writes, reads back and raises a `linectl.errors` type on any failure.

Every wait is bounded: connect by `connect_timeout_s`, each request by `timeout_s`, and
a request never waits for a connection (not connected means no I/O at all), so a dead
PLC can cost a caller at most one timeout per request and never stalls another link.

The control cycle does not call `poll()` and `write_many()` itself: it runs each link's
own I/O task (`start_io`), asks it for a poll (`request_poll`), waits for the answer at
most a bounded time, reads the freshest `latest` snapshot and hands its writes over with
`post()`. So a silent, slow or reconnecting PLC never delays the control cycle, nor a
write to the other PLC. The I/O task also owns what a (re)connect needs before the first
write: the heartbeat changes before any setting that could arm the PLC's watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, NoReturn, Self

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from linectl.aio import cancellable
from linectl.codec import BlockDecoder, CodecError, decode
from linectl.config import PlcEndpoint, PlcName, RegisterField, RegisterMap
from linectl.errors import (
    LocalError,
    PlcError,
    PlcExceptionError,
    PlcTimeoutError,
    PlcUnavailableError,
    WriteVerifyError,
)
from linectl.modbus.plan import (
    FC_READ_HOLDING,
    FC_WRITE_SINGLE,
    Block,
    WritePlan,
    WriteRun,
    plan_reads,
    plan_writes,
    write_plan,
)
from linectl.quality import Quality, Sample

log = logging.getLogger("linectl.modbus")

BACKOFF_START_S: Final = 0.05
"""First reconnect delay; doubles up to the endpoint's reconnect_max_s."""
LATENCY_HISTORY: Final = 512
"""Per function code, how many recent request latencies the stats keep."""
EWMA_ALPHA: Final = 0.1
"""Weight of the newest latency in the moving average."""
CLOCK_FIELD: Final = "clock"
"""The map field holding the PLC's free-running millisecond clock."""
HEARTBEAT_FIELD: Final = "watchdog"
"""The holding field the controller changes every cycle (the PLC's watchdog)."""
QUEUE_MAX: Final = 8
"""Posted writes kept at most while a PLC is slow (each a command-word change)."""
SETTINGS_RETRY_S: Final = 5.0
"""How often the settings a PLC refused at connect are written again."""
WRITE_PLANS_MAX: Final = 32
"""Write plans a link keeps (one per set of field names it writes: a handful)."""

EXCEPTION_NAMES: Final[dict[int, str]] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


# --------------------------------------------------------------------------- stalls


class StallLog:
    """When this process was not running although it was due to: the event loop stalled
    (the host starved it of CPU, a long synchronous call, the VM paused).

    The control cycle notes each wake-up that came later than due by more than
    `min_stall_s` (`note`). Data that aged while the controller itself was stalled is not
    the PLC's silence: the PLC's answer may have been waiting in the socket, and a request
    whose timer fired during the stall never had its chance. Such data is judged by its
    age less the stall (`credit_s`), at most `max_credit_s` of it: data older than the
    stale window plus that is never used, however long the stall (past the PLC's
    watchdog timeout the PLCs have made the line safe by themselves, and the world the
    data describes has changed). A stall delays the "PLC lost" judgment only of a PLC
    that went silent during it, and by at most `max_credit_s`.
    """

    __slots__ = ("_spans", "max_credit_s", "min_stall_s")

    def __init__(self, min_stall_s: float, max_credit_s: float, keep: int = 32) -> None:
        self.min_stall_s = min_stall_s
        self.max_credit_s = max_credit_s
        self._spans: deque[tuple[float, float]] = deque(maxlen=keep)

    def note(self, due_s: float, woke_s: float) -> float:
        """The loop was due at `due_s` and ran at `woke_s`: a stall when later than
        `min_stall_s`. Returns the stall noted (0.0 when none)."""
        late_s = woke_s - due_s
        if late_s <= self.min_stall_s:
            return 0.0
        self._spans.append((due_s, woke_s))
        return late_s

    def credit_s(self, since_s: float, now_s: float) -> float:
        """How long this process was stalled between `since_s` and `now_s` (the noted
        stalls' overlap with that span), at most `max_credit_s`."""
        total = 0.0
        for start, end in reversed(self._spans):
            if end <= since_s:
                break  # noted in order: the rest ended earlier still
            total += max(0.0, min(end, now_s) - max(start, since_s))
        return min(total, self.max_credit_s)


# --------------------------------------------------------------------------- results


class BlockRead:
    """What one poll knows about one block: its registers and their quality.

    GOOD: read in this poll. STALE: this poll's read failed; `registers` are from the
    last good read, still younger than stale_after_s, with that read's time stamps.
    COMM_FAIL: no usable registers (`registers` is None).
    """

    __slots__ = (
        "_decoder",
        "_values",
        "block",
        "host_time_s",
        "plc_clock_ms",
        "quality",
        "registers",
    )

    def __init__(
        self,
        block: Block,
        registers: Sequence[int] | None,
        quality: Quality,
        plc_clock_ms: int | None,
        host_time_s: float,
        *,
        decoder: BlockDecoder | None = None,
        values: dict[str, float | int] | None = None,
    ) -> None:
        self.block = block
        self.registers = registers
        self.quality = quality
        self.plc_clock_ms = plc_clock_ms
        self.host_time_s = host_time_s
        self._decoder = decoder
        self._values = values  # the registers decoded, once asked for

    def decoded(self) -> dict[str, float | int]:
        """Every field of the block by name, decoded on the first call (the control cycle
        reads them all, every cycle: one pass over the block, not one per field).
        Read-only by contract; CodecError if the block has no registers."""
        values = self._values
        if values is None:
            if self.registers is None:
                raise CodecError(f"{self.block.table} block at {self.block.address}: no data")
            decoder = self._decoder
            if decoder is None:
                decoder = BlockDecoder(self.block.fields, self.block.address, self.block.count)
            values = self._values = decoder(self.registers)
        return values


class Snapshot:
    """One poll's result: a `Sample` per field of the map.

    Nothing is decoded until a value is asked for, so a poll costs its requests and
    little else; then a block is decoded whole, in one pass (`BlockRead.decoded`): the
    control cycle reads every field of every block, every cycle. Read-only by contract.
    """

    __slots__ = ("_cache", "_index", "_values", "connected", "host_time_s", "plc", "reads", "seq")

    def __init__(
        self,
        plc: PlcName,
        host_time_s: float,
        connected: bool,
        reads: tuple[BlockRead, ...],
        index: Mapping[str, tuple[int, RegisterField]],
        *,
        seq: int = 0,
    ) -> None:
        self.plc: PlcName = plc
        self.seq = seq
        """The link's poll count when this snapshot was taken (tells a new one apart)."""
        self.host_time_s = host_time_s
        """Link clock when the poll finished."""
        self.connected = connected
        """Whether the link had a connection when the poll finished."""
        self.reads = reads
        """Per planned block, in plan order."""
        self._index = index
        self._cache: dict[str, Sample] = {}
        self._values: dict[str, float | int | None] | None = None  # every field's, once asked

    @property
    def ok(self) -> bool:
        """True when every value is GOOD."""
        return all(r.quality is Quality.GOOD for r in self.reads)

    def age_s(self, now_s: float) -> float:
        """How old the oldest block's data is at `now_s` (link clock); inf when a block
        has none. The control cycle judges freshness by this, not by the connection."""
        if not self.reads:
            return math.inf
        return max(
            (now_s - r.host_time_s) if r.registers is not None else math.inf for r in self.reads
        )

    def get(self, name: str) -> Sample:
        """The named field's sample; LocalError if the map has no such field."""
        sample = self._cache.get(name)
        if sample is not None:
            return sample
        try:
            i, f = self._index[name]
        except KeyError:
            raise LocalError(f"{self.plc}: no field {name!r} in the register map") from None
        r = self.reads[i]
        if r.registers is None:
            sample = Sample(None, Quality.COMM_FAIL, None, r.host_time_s)
        else:
            sample = Sample(r.decoded()[f.name], r.quality, r.plc_clock_ms, r.host_time_s)
        self._cache[name] = sample
        return sample

    def value(self, name: str) -> float | int | None:
        """The named field's value (None when COMM_FAIL)."""
        # As get(name).value, without a Sample: the cycle asks for every field's value
        # (linectl.core.line.reading_values), so they are gathered into one dict once.
        values = self._values
        if values is None:
            values = self._values = self._all_values()
        try:
            return values[name]
        except KeyError:
            raise LocalError(f"{self.plc}: no field {name!r} in the register map") from None

    def _all_values(self) -> dict[str, float | int | None]:
        values: dict[str, float | int | None] = {}
        for r in self.reads:
            if r.registers is None:
                values.update(dict.fromkeys((f.name for f in r.block.fields), None))
            else:
                values.update(r.decoded())
        return values

    def quality(self, name: str) -> Quality:
        """The named field's quality."""
        return self.reads[self._field_block(name)].quality

    def _field_block(self, name: str) -> int:
        try:
            return self._index[name][0]
        except KeyError:
            raise LocalError(f"{self.plc}: no field {name!r} in the register map") from None

    @property
    def samples(self) -> dict[str, Sample]:
        """Every field's sample (decodes all of them)."""
        return {name: self.get(name) for name in self._index}

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __repr__(self) -> str:
        q = ", ".join(f"{r.block.table}@{r.block.address}:{r.quality.value}" for r in self.reads)
        return f"Snapshot({self.plc}, t={self.host_time_s:.3f}, connected={self.connected}, {q})"


@dataclass
class LinkStats:
    """Counters and latencies of one link, kept for metrics (all monotonic counts)."""

    polls: int = 0
    requests: int = 0
    """Requests sent (each read block, write and read-back counts once)."""
    requests_by_fc: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(
        default_factory=lambda: {"timeout": 0, "exception": 0, "disconnect": 0, "protocol": 0}
    )
    """Failed requests by kind; `protocol` is a malformed or mismatched response."""
    connects: int = 0
    """Successful connects, the first one included."""
    reconnects: int = 0
    """Successful connects after a lost connection."""
    connect_failures: int = 0
    last_latency_s: float | None = None
    ewma_latency_s: float | None = None
    latencies_s: dict[int, deque[float]] = field(default_factory=dict, repr=False)
    """Function code -> the most recent request latencies (bounded)."""
    on_request: list[Callable[[int, float], None]] = field(
        default_factory=list, repr=False, compare=False
    )
    """Called with (function code, latency in s) for every answered request (metrics).
    Runs on the link's event loop inside the request path: it must be quick; one that
    raises is logged and removed, never allowed to fail the request."""

    def count_request(self, fc: int) -> None:
        """Note one request sent."""
        self.requests += 1
        self.requests_by_fc[fc] = self.requests_by_fc.get(fc, 0) + 1

    def record_latency(self, fc: int, latency_s: float) -> None:
        """Note the round-trip time of one answered request."""
        self.last_latency_s = latency_s
        prev = self.ewma_latency_s
        self.ewma_latency_s = latency_s if prev is None else prev + EWMA_ALPHA * (latency_s - prev)
        hist = self.latencies_s.get(fc)
        if hist is None:
            hist = self.latencies_s[fc] = deque(maxlen=LATENCY_HISTORY)
        hist.append(latency_s)
        if not self.on_request:
            return  # (no copy of an empty list for every request)
        for hook in list(self.on_request):
            try:
                hook(fc, latency_s)
            except Exception:  # an observer's fault never fails a PLC request
                log.exception("link stats observer failed; removed")
                self.on_request.remove(hook)


class _RequestError(Exception):
    """Internal: one request failed; `kind` is a LinkStats.errors key."""

    def __init__(self, kind: str, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


# --------------------------------------------------------------------------- link


def _quiet_pymodbus() -> None:
    # pymodbus logs every failed connect and timeout; the link logs state changes once.
    # Only applied when the application has not chosen a level for pymodbus itself.
    lg = logging.getLogger("pymodbus.logging")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.CRITICAL)


class PlcLink:
    """Modbus TCP link to one PLC, with its own reconnecting background task."""

    def __init__(
        self,
        name: PlcName,
        endpoint: PlcEndpoint,
        register_map: RegisterMap,
        *,
        clock: Callable[[], float] = time.monotonic,
        heartbeat_field: str | None = HEARTBEAT_FIELD,
        stalls: StallLog | None = None,
    ) -> None:
        if register_map.plc != name:
            raise LocalError(f"link {name!r} given the register map of {register_map.plc!r}")
        self.name: PlcName = name
        self.endpoint = endpoint
        self.register_map = register_map
        self.blocks: tuple[Block, ...] = plan_reads(register_map, endpoint.max_gap)
        self.stats = LinkStats()
        self._clock = clock
        self.stalls = stalls or StallLog(min_stall_s=math.inf, max_credit_s=0.0)
        """This process's stalls, on the link's clock: the data's age less them is what
        tells a silent PLC (`live_age_s`). The control cycle notes them into the log it
        shares with its links; a link on its own credits none."""
        self._client: AsyncModbusTcpClient | None = None
        self._generation = 0  # tells a stale client's disconnect callback from the current's
        self._lost = asyncio.Event()
        self._up_event = asyncio.Event()
        self._io_lock = asyncio.Lock()
        self._manager: asyncio.Task[None] | None = None
        self._closed = False
        # field name -> (index of its block, field); the clock field's, if the map has one
        self._index: dict[str, tuple[int, RegisterField]] = {
            f.name: (i, f) for i, b in enumerate(self.blocks) for f in b.fields
        }
        self._clock_at = self._index.get(CLOCK_FIELD)
        # Per block, its decoder; built once, as the blocks are.
        self._decoders = tuple(BlockDecoder(b.fields, b.address, b.count) for b in self.blocks)
        # Field names (in the order given) -> how they are written: the control cycle
        # writes the same fields every cycle.
        self._write_plans: dict[tuple[str, ...], WritePlan] = {}
        self._last_good: list[BlockRead | None] = [None] * len(self.blocks)
        self._up: bool | None = None  # None until the first connect attempt ends
        self._down_since: float | None = None
        self._answered = False  # the current connection has answered a request
        self._connect_failed = False  # the latest connect attempt failed
        self._failing_blocks: set[int] = set()
        # The heartbeat (the PLC's `watchdog` register): every write that carries it
        # gets the next value from here, so it changes with every write the control
        # cycle hands over, and a (re)connect can make it change before anything else.
        self._hb_field: RegisterField | None = None
        if heartbeat_field is not None and heartbeat_field in {
            f.name for f in register_map.by_table["holding"]
        }:
            self._hb_field = register_map.field(heartbeat_field)
        self._hb = 0
        # The I/O task (start_io): pending writes, poll requests, the latest snapshot.
        self._io_task: asyncio.Task[None] | None = None
        self._io_stopping = False
        self._io_wake = asyncio.Event()
        self._queue: deque[dict[str, float]] = deque()
        self._poll_seq = 0  # polls requested
        self._poll_done = 0  # polls finished (or given up: not connected)
        # Called when a poll finishes (wait_polls: one wake-up for several links).
        self._poll_hooks: list[Callable[[], None]] = []
        self._on_connect: dict[str, float] = {}
        self._configured_gen = -1  # the connection generation the I/O task configured
        self.settings_refused: str | None = None
        """Why the PLC is not usable although it answers: it refused (or holds another
        value than) a setting written at connect. None when configured."""
        self._refused_at_s = 0.0
        self.latest: Snapshot | None = None
        """The freshest snapshot the I/O task took (None before its first poll)."""
        self.writes_dropped = 0
        """Posted writes replaced by a newer one before they could be sent."""
        self.first_snapshot: Snapshot | None = None
        """The PLC as linectl found it: the first complete poll since this link was made,
        taken before it wrote anything but the heartbeat (the set-points an earlier
        controller left, its watchdog timeouts, latched faults). None until then, and for
        good if that poll was not complete."""
        self._wrote = False  # anything but the heartbeat written since the link was made

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the connection manager; returns at once (see `wait_connected`)."""
        if self._manager is not None:
            raise LocalError(f"{self.name}: link already started")
        if self._closed:
            raise LocalError(f"{self.name}: link is closed")
        _quiet_pymodbus()
        self._manager = asyncio.create_task(self._manage(), name=f"modbus-link-{self.name}")

    async def close(self) -> None:
        """Stop the I/O task and the manager and drop the connection. Idempotent."""
        await self.stop_io()
        self._closed = True
        task, self._manager = self._manager, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drop_client()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while a TCP connection to the PLC is open."""
        return self._client is not None and self._client.connected

    def now(self) -> float:
        """The link's clock (the time base of its snapshots' host times)."""
        return self._clock()

    def live_age_s(self, snap: Snapshot, now_s: float) -> float:
        """How long the PLC has not given data, at `now_s`: the snapshot's age (its
        oldest block's) less the time this process was stalled meanwhile (`stalls`)."""
        age = snap.age_s(now_s)
        return self._live_age_s(now_s - age, now_s) if math.isfinite(age) else age

    def _live_age_s(self, host_time_s: float, now_s: float) -> float:
        """The age at `now_s` of data read at `host_time_s`, less this process's stalls."""
        return now_s - host_time_s - self.stalls.credit_s(host_time_s, now_s)

    @property
    def answering(self) -> bool:
        """True while connected and the connection has answered a request: a PLC that
        accepts connections and never answers is never `answering`."""
        return self.connected and self._answered

    @property
    def unreachable(self) -> bool:
        """True when there is no connection and the latest attempt to make one failed
        (refused, or timed out): the PLC is lost now, whatever the age of its data."""
        return not self.connected and self._connect_failed

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected, at most timeout_s; returns whether it is."""
        self._check_running()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._up_event.wait()
        return self.connected

    def _check_running(self) -> None:
        if self._closed:
            raise LocalError(f"{self.name}: link is closed")
        if self._manager is None:
            raise LocalError(f"{self.name}: link not started (use start() or async with)")

    # ------------------------------------------------------------------ connection

    async def _manage(self) -> None:
        delay = BACKOFF_START_S
        while True:
            if await self._connect_once():
                await self._lost.wait()
                # A connection that answered earns an immediate retry (most losses are our
                # own drop after one timeout); one that never answered backs off, so a
                # port that accepts and then drops or stays silent is not hammered.
                if self._answered:
                    delay = BACKOFF_START_S
                    continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.endpoint.reconnect_max_s)

    async def _connect_once(self) -> bool:
        ep = self.endpoint
        self._generation += 1
        gen = self._generation

        def on_connect(up: bool) -> None:
            if not up and gen == self._generation:
                self._drop_client()
                self._mark_down("connection closed by the PLC")

        # pymodbus uses one timeout for connect and for requests: the connect's here
        # (our outer asyncio timeout is the connect's bound, so pymodbus's must not fire
        # first); once connected it is set to the request timeout (below). Its reconnect
        # and retries are off: this task reconnects, and a retry would double the wait.
        client = AsyncModbusTcpClient(
            ep.host,
            port=ep.port,
            name=f"linectl-{self.name}",
            timeout=max(ep.timeout_s, ep.connect_timeout_s),
            retries=0,
            reconnect_delay=0,
            trace_connect=on_connect,
        )
        why = f"cannot connect to {ep.host}:{ep.port}"
        ok = False
        try:
            async with asyncio.timeout(ep.connect_timeout_s):
                ok = await cancellable(client.connect())
        except TimeoutError:
            why = f"connect to {ep.host}:{ep.port} timed out after {ep.connect_timeout_s} s"
        except (OSError, ModbusException) as exc:
            why = f"cannot connect to {ep.host}:{ep.port}: {exc}"
        except BaseException:
            client.close()  # cancelled by close(): leave no socket behind
            raise
        if not ok or not client.connected:
            client.close()
            self.stats.connect_failures += 1
            self._connect_failed = True
            self._mark_down(why)
            self._io_wake.set()
            return False
        # Requests are bounded by pymodbus's own wait for the answer, at timeout_s: it
        # waits with a timer anyway, and a second one of ours around every request cost
        # a tenth of the link's CPU at 100 Hz (cpu_per_cycle).
        client.ctx.comm_params.timeout_connect = ep.timeout_s
        self._lost.clear()
        self._client = client
        self._answered = False
        self._connect_failed = False
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        # Connected is not recovered: the link is up once this connection answers.
        self._up_event.set()
        self._io_wake.set()
        return True

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._generation += 1
        self._up_event.clear()
        if client is not None:
            client.close()
        self._lost.set()

    def _drop(self, why: str) -> None:
        """Drop the connection (the manager reconnects) and note why, once."""
        self._drop_client()
        self._mark_down(why)

    def _mark_up(self) -> None:
        ep = self.endpoint
        if self._up is False and self._down_since is not None:
            log.info(
                "%s: link recovered after %.3f s (%s:%d answers again)",
                self.name,
                self._clock() - self._down_since,
                ep.host,
                ep.port,
            )
        elif self._up is None:
            log.info("%s: link up (%s:%d)", self.name, ep.host, ep.port)
        self._up = True
        self._down_since = None

    def _mark_down(self, why: str) -> None:
        if self._up is False:
            return
        self._down_since = self._clock()
        log.warning("%s: link lost: %s" if self._up else "%s: link down: %s", self.name, why)
        self._up = False

    # ------------------------------------------------------------------ requests

    async def _request(
        self,
        fc: int,
        call: Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]],
        count: int | None = None,
    ) -> ModbusPDU:
        """One request with a bounded wait; failures raise _RequestError.

        After a timeout or a malformed answer the connection is dropped: a late answer
        to this request can then never be taken for the answer to a later one. `count`
        is the number of registers a read must return.
        """
        client = self._client
        if client is None or not client.connected:
            raise _RequestError("disconnect", "not connected")
        self.stats.count_request(fc)
        t0 = time.perf_counter()
        try:
            # pymodbus's timer bounds the wait (timeout_s, set at connect).
            pdu = await cancellable(call(client))
        except (TimeoutError, ModbusIOException) as exc:
            # ModbusIOException is pymodbus's "no response" within timeout_s.
            if self._client is not client:  # the PLC closed the socket meanwhile
                self._fail(client, "disconnect", f"connection lost during FC{fc}", exc)
            msg = f"no answer within {self.endpoint.timeout_s} s (FC{fc})"
            waited_s = time.perf_counter() - t0
            if waited_s > 2 * self.endpoint.timeout_s:
                # Its timer fired late: this process was stalled, the PLC may have answered.
                msg += f", after {waited_s:.3f} s: this process was stalled"
            self._fail(client, "timeout", msg, exc)
        except (ConnectionException, OSError) as exc:
            self._fail(client, "disconnect", f"connection lost (FC{fc}): {exc}", exc)
        except ModbusException as exc:
            self._fail(client, "protocol", f"bad answer (FC{fc}): {exc}", exc)
        if pdu.function_code & 0x7F != fc:
            # An answer to another request: never decode it as this one's.
            self._fail(client, "protocol", f"asked FC{fc}, answer is FC{pdu.function_code & 0x7F}")
        if not self._answered:  # an exception reply is an answer too: the PLC is there
            self._answered = True
            self._mark_up()
        if pdu.isError():
            code = int(pdu.exception_code)
            self.stats.errors["exception"] += 1
            name = EXCEPTION_NAMES.get(code, "unknown")
            raise _RequestError("exception", f"Modbus exception {code} ({name})", code)
        if count is not None and len(pdu.registers) != count:
            got = len(pdu.registers)
            self._fail(client, "protocol", f"asked FC{fc} for {count} registers, got {got}")
        self.stats.record_latency(fc, time.perf_counter() - t0)
        return pdu

    def _fail(
        self,
        client: AsyncModbusTcpClient,
        kind: str,
        message: str,
        exc: BaseException | None = None,
    ) -> NoReturn:
        self.stats.errors[kind] += 1
        # Only the connection the request used: the manager may already have a new one.
        if self._client is client:
            self._drop(message)
        raise _RequestError(kind, message) from exc

    async def _read(self, fc: int, address: int, count: int) -> list[int]:
        unit = self.endpoint.unit_id
        if fc == FC_READ_HOLDING:
            pdu = await self._request(
                fc,
                lambda c: c.read_holding_registers(address, count=count, device_id=unit),
                count,
            )
        else:
            pdu = await self._request(
                fc,
                lambda c: c.read_input_registers(address, count=count, device_id=unit),
                count,
            )
        return list(pdu.registers)

    # ------------------------------------------------------------------ poll

    async def poll(self) -> Snapshot:
        """Read every planned block once; never raises on a communication failure."""
        self._check_running()
        async with self._io_lock:
            self.stats.polls += 1
            got: list[tuple[list[int], float] | None] = [None] * len(self.blocks)
            for i, block in enumerate(self.blocks):
                if not self.connected:
                    break
                fc = block.function_code
                try:
                    regs = await self._read(fc, block.address, block.count)
                except _RequestError as exc:
                    if exc.kind == "exception" and i not in self._failing_blocks:
                        self._failing_blocks.add(i)
                        log.warning(
                            "%s: FC%d read of %d registers at %d refused: %s",
                            self.name,
                            fc,
                            block.count,
                            block.address,
                            exc,
                        )
                    continue
                if i in self._failing_blocks:
                    self._failing_blocks.discard(i)
                    log.info("%s: FC%d read at %d answered again", self.name, fc, block.address)
                got[i] = (regs, self._clock())
            now = self._clock()
            connected = self.connected
        plc_clock: int | None = None
        clock_block = -1  # the block the clock was decoded from, with its values
        clock_values: dict[str, float | int] | None = None
        if self._clock_at is not None and (g := got[self._clock_at[0]]) is not None:
            # Its block is decoded whole: the cycle reads the rest of it anyway.
            clock_block = self._clock_at[0]
            clock_values = self._decoders[clock_block](g[0])
            plc_clock = int(clock_values[CLOCK_FIELD])
        reads = []
        for i, block in enumerate(self.blocks):
            g = got[i]
            if g is not None:
                r = BlockRead(
                    block,
                    g[0],
                    Quality.GOOD,
                    plc_clock,
                    g[1],
                    decoder=self._decoders[i],
                    values=clock_values if i == clock_block else None,
                )
                self._last_good[i] = r
            else:
                r = self._degraded(i, now)
            reads.append(r)
        return Snapshot(self.name, now, connected, tuple(reads), self._index)

    def _degraded(self, i: int, now: float) -> BlockRead:
        last = self._last_good[i]
        if (
            last is not None
            and self._live_age_s(last.host_time_s, now) < self.endpoint.stale_after_s
        ):
            return BlockRead(
                last.block,
                last.registers,
                Quality.STALE,
                last.plc_clock_ms,
                last.host_time_s,
                decoder=self._decoders[i],
                values=last._values,  # the same registers: decoded once
            )
        return BlockRead(self.blocks[i], None, Quality.COMM_FAIL, None, now)

    # ------------------------------------------------------------------ write

    async def write(self, name: str, value: float, *, verify: bool = True) -> None:
        """Write one holding field (FC6 or FC16), then read it back unless verify=False."""
        await self.write_many({name: value}, verify=verify)

    async def write_many(self, values: Mapping[str, float], *, verify: bool = True) -> None:
        """Write several holding fields; adjacent ones go in one FC16 request.

        Runs are written in address order; on a failure the earlier runs stay written.
        """
        self._check_running()
        runs = self._write_plan(values).runs(values)  # LocalError before any I/O
        self._require_connected(values)
        async with self._io_lock:
            for run in runs:
                self._require_connected(values)
                await self._write_run(run, values, verify)

    def _write_plan(self, values: Mapping[str, float]) -> WritePlan:
        """plan_writes' plan for these names, made once per set of names."""
        key = tuple(values)
        plan = self._write_plans.get(key)
        if plan is None:
            plan = write_plan(self.register_map, key)  # LocalError names a bad field
            if len(self._write_plans) >= WRITE_PLANS_MAX:
                self._write_plans.clear()
            self._write_plans[key] = plan
        return plan

    def _require_connected(self, values: Mapping[str, float]) -> None:
        if not self.connected:
            names = ", ".join(values)
            raise PlcUnavailableError(self.name, f"not connected; {names} not written")

    async def _write_run(self, run: WriteRun, values: Mapping[str, float], verify: bool) -> None:
        unit = self.endpoint.unit_id
        fc = run.function_code
        if any(f is not self._hb_field for f in run.fields):
            self._wrote = True  # before the request: one that times out may have landed
        try:
            if fc == FC_WRITE_SINGLE:
                reg = run.registers[0]
                await self._request(
                    fc, lambda c: c.write_register(run.address, reg, device_id=unit)
                )
            else:
                regs = list(run.registers)
                await self._request(
                    fc, lambda c: c.write_registers(run.address, regs, device_id=unit)
                )
            if not verify:
                return
            back = await self._read(FC_READ_HOLDING, run.address, len(run.registers))
        except _RequestError as exc:
            # Formatted here only: every cycle writes, and it is needed for an error.
            what = ", ".join(f"{f.name}={values[f.name]!r}" for f in run.fields)
            raise self._public_error(exc, f"write {what}") from None
        for f in run.fields:
            lo = f.address - run.address
            want = decode(f, run.registers[lo : lo + f.width])
            got = decode(f, back[lo : lo + f.width])
            if not _same(want, got):
                raise WriteVerifyError(
                    self.name, f"write {f.name}={values[f.name]!r}: read back {got!r}"
                )

    def _public_error(self, exc: _RequestError, what: str) -> Exception:
        if exc.kind == "exception":
            return PlcExceptionError(self.name, f"{what} refused: {exc}", exc.code)
        if exc.kind == "timeout":
            return PlcTimeoutError(self.name, f"{what}: {exc}")
        return PlcUnavailableError(self.name, f"{what}: {exc}")

    # ------------------------------------------------------------------ heartbeat

    def with_heartbeat(self, values: Mapping[str, float]) -> dict[str, float]:
        """`values` with the heartbeat field, if there, set to the link's next heartbeat:
        every write the control cycle hands over changes it, and it continues from what
        the PLC held at connect, so the first write after a (re)connect changes it too."""
        out = dict(values)
        f = self._hb_field
        if f is not None and f.name in out:
            self._hb = (self._hb + 1) % (1 << (16 * f.width))
            out[f.name] = self._hb
        return out

    def _seed_heartbeat(self, snap: Snapshot) -> bool:
        """Continue the heartbeat from the PLC's own register, so that the next write
        changes it whatever value an earlier controller (or a restart) left there.
        False when the register could not be read."""
        if self._hb_field is None:
            return True
        sample = snap.get(self._hb_field.name)
        if sample.quality is not Quality.GOOD or sample.value is None:
            return False
        self._hb = int(sample.value)
        return True

    # ------------------------------------------------------------------ I/O task

    def start_io(self, on_connect: Mapping[str, float] | None = None) -> None:
        """Start the link's I/O task. After every (re)connect it polls once, changes the
        heartbeat (alone, so it cannot come after a setting in another request), then
        writes `on_connect` (e.g. the watchdog timeout; a restarted PLC is back at its
        defaults), verified; only then the writes posted by the control cycle."""
        self._check_running()
        if self._io_task is not None:
            raise LocalError(f"{self.name}: I/O task already started")
        if on_connect:
            plan_writes(self.register_map, on_connect)  # LocalError now, not at connect
        self._on_connect = dict(on_connect or {})
        self._io_task = asyncio.create_task(self._io(), name=f"modbus-io-{self.name}")

    async def stop_io(self) -> None:
        """Stop the I/O task once its request in flight is answered (or timed out), so
        that the connection is left clean for a last write; what is still queued is not
        sent. Idempotent."""
        task, self._io_task = self._io_task, None
        self._queue.clear()
        if task is None:
            return
        self._io_stopping = True
        self._io_wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.endpoint.timeout_s + 0.1):
                await asyncio.shield(task)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def request_poll(self) -> int:
        """Ask the I/O task for a poll; returns its number for `wait_poll`."""
        self._poll_seq += 1
        self._io_wake.set()
        return self._poll_seq

    async def wait_poll(self, seq: int, timeout_s: float) -> bool:
        """Wait at most timeout_s for poll `seq` to finish; whether it did. A link with
        no connection finishes its polls at once (with data that only ages)."""
        await wait_polls(((self, seq),), timeout_s)
        return self.poll_done(seq)

    def poll_done(self, seq: int) -> bool:
        """Whether poll `seq` (from request_poll) has finished."""
        return self._poll_done >= seq

    def post(self, values: Mapping[str, float]) -> None:
        """Hand over a write; returns at once, the I/O task sends it.

        Latest value wins: a write not yet sent is replaced by a newer one with the same
        command word (its set-points are out of date anyway); a write that changes the
        command word is kept and sent in order, so an edge (FAULT_RESET, RUN, BEAM_ON)
        is never merged away. While there is no connection only the newest is kept: an
        edge for a PLC we could not see is no command anyone meant."""
        w = self.with_heartbeat(values)
        q = self._queue
        if q and q[-1].get("command") == w.get("command"):
            q[-1] = w
            self.writes_dropped += 1
        else:
            q.append(w)
        if not self.connected or len(q) > QUEUE_MAX:
            while len(q) > 1:
                q.popleft()
                self.writes_dropped += 1
        self._io_wake.set()

    @property
    def configured(self) -> bool:
        """True when the current connection has had its heartbeat and on-connect writes."""
        return self.connected and self._configured_gen == self._generation

    async def _io(self) -> None:
        while not self._io_stopping:
            await self._io_wake.wait()
            self._io_wake.clear()
            if self._io_stopping:
                return
            try:
                await self._io_round()
            except PlcError as exc:
                log.debug("%s: %s", self.name, exc)  # state changes are logged once
            except LocalError as exc:
                # A value the map refuses (out of its range): a bug upstream, never a
                # reason to end the task that keeps the watchdog alive.
                log.error("%s: write refused before I/O: %s", self.name, exc)

    async def _io_round(self) -> None:
        if not self.connected:
            self._finish_polls(self._degraded_snapshot())
            while len(self._queue) > 1:
                self._queue.popleft()
                self.writes_dropped += 1
            return
        if (
            self.settings_refused is not None
            and self._clock() - self._refused_at_s >= SETTINGS_RETRY_S
        ):
            self._configured_gen = -1  # try the settings again
        if self._configured_gen != self._generation:
            await self._configure()
            if not self.configured:
                return
        # Only the writes queued now: one posted while these are in flight waits for the
        # poll. Against a PLC that answers slower than the cycle posts, writing until the
        # queue is empty starved the polls (four writes in a row at 30-40 ms each), and
        # the data aged past stale_after_s; a round is now at most the queue (merged to
        # one write per command word) and one poll.
        for _ in range(len(self._queue)):
            if not self._queue or not self.connected:
                break
            w = self._queue.popleft()
            await self.write_many(w, verify=False)
        if self._poll_done < self._poll_seq:
            seq = self._poll_seq
            snap = await self.poll()
            self._finish_polls(snap, seq)
        if self._queue or self._poll_done < self._poll_seq:
            self._io_wake.set()

    def _finish_polls(self, snap: Snapshot, seq: int | None = None) -> None:
        snap.seq = self._poll_seq if seq is None else seq
        self.latest = snap
        self._poll_done = snap.seq
        for hook in self._poll_hooks:
            hook()

    async def _configure(self) -> None:
        gen = self._generation
        snap = await self.poll()
        self._finish_polls(snap, self._poll_seq)
        if self.first_snapshot is None and not self._wrote and snap.ok:
            self.first_snapshot = snap
        if gen != self._generation or not self.connected:
            return
        if self._hb_field is not None:
            hb = self._hb_field.name
            if not self._seed_heartbeat(snap):
                # Value unknown: two writes of consecutive values change it for sure.
                await self.write_many(self.with_heartbeat({hb: 0}), verify=False)
            await self.write_many(self.with_heartbeat({hb: 0}), verify=False)
        if self._on_connect:
            try:
                await self.write_many(self._on_connect, verify=True)
            except (PlcExceptionError, WriteVerifyError) as exc:
                busy = isinstance(exc, PlcExceptionError) and exc.exception_code in (5, 6)
                if busy or gen != self._generation or not self.connected:
                    raise  # transient: configured again on the next round
                self._settings_refused(gen, exc)
                return
            if self.settings_refused is not None:
                log.warning("%s took its settings now: %s", self.name, self._on_connect)
            self.settings_refused = None
            log.info("%s configured: %s", self.name, self._on_connect)
        if gen == self._generation:
            self._configured_gen = gen

    def _settings_refused(self, gen: int, exc: PlcError) -> None:
        """The PLC answered and would not take a setting linectl needs (its watchdog
        timeout, the ramp): it cannot be run as configured. Treated as lost (the line
        service sees `settings_refused` and keeps it out of control, so the line goes
        to its safe state), but the safe-state writes still go out and the heartbeat
        keeps changing, and the settings are tried again every SETTINGS_RETRY_S."""
        why = f"settings {self._on_connect} refused at connect: {exc}"
        if self.settings_refused != why:
            log.error(
                "%s: %s; the PLC is treated as lost until it takes them (retried every "
                "%g s): check its program and the map's ranges",
                self.name,
                why,
                SETTINGS_RETRY_S,
            )
        self.settings_refused = why
        self._refused_at_s = self._clock()
        self._configured_gen = gen  # the safe state's writes must still go out

    def _degraded_snapshot(self) -> Snapshot:
        now = self._clock()
        reads = tuple(self._degraded(i, now) for i in range(len(self.blocks)))
        return Snapshot(self.name, now, self.connected, reads, self._index)


def _same(want: float | int, got: float | int) -> bool:
    # Both sides went through the same float32 encoding, so only rounding of a PLC
    # that stores the value differently (e.g. as a scaled integer) can differ.
    if isinstance(want, int) and isinstance(got, int):
        return want == got
    return math.isclose(want, got, rel_tol=1e-6, abs_tol=1e-9)


async def wait_polls(polls: Sequence[tuple[PlcLink, int]], timeout_s: float) -> None:
    """Wait until every link has finished its poll (link, seq from request_poll), at
    most timeout_s. The caller wakes once, when the last one finishes or at the deadline;
    waiting for each link in turn woke it once per link and armed a timer for each, every
    cycle (cpu_per_cycle)."""
    if all(link.poll_done(seq) for link, seq in polls):
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def check() -> None:
        if not done.done() and all(link.poll_done(seq) for link, seq in polls):
            done.set_result(None)

    def expire() -> None:
        if not done.done():
            done.set_result(None)

    for link, _seq in polls:
        link._poll_hooks.append(check)
    timer = loop.call_later(timeout_s, expire)
    try:
        await done
    finally:
        timer.cancel()
        for link, _seq in polls:
            link._poll_hooks.remove(check)
