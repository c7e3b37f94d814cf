"""Modbus TCP servers for the simulated PLCs (pymodbus 3.16 SimDevice with an action hook).

The pure `Plant` does the physics; this module owns the clock, the sockets and the fault
injection that lives on the link (loss, silence, connections closed mid-answer, periodic
drops, delay, exceptions, restart). Every request first advances the plant to now, so a
response is as fresh as a real PLC's; a background task advances it every ~10 ms as well,
so watchdogs trip with no client connected, whatever the link does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import traceback
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal, cast, get_args

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from linectl.config import LoadedConfig, PlcName
from simulators.plant import Plant

log = logging.getLogger("simulators")

PLCS: tuple[PlcName, PlcName] = ("accelerator", "conveyor")
TICK_S = 0.01
"""Background physics period."""

_READ_FC = {3, 4, 23}
_WRITE_FC = {6, 16, 23}
_BIT_FC = {1, 2, 5, 15}
MBAP_LEN = 7
"""Modbus TCP header: transaction id, protocol id, length, unit id."""

Fate = Literal["answer", "silent", "close", "half"]
"""What becomes of one request: answered; dropped with no answer (connection open);
carried out, then the connection closed with no answer; carried out, part of the answer
frame sent, then the connection closed."""
DropMode = Literal["close", "half", "silent"]
DROP_MODES: tuple[str, ...] = get_args(DropMode)


class _Handler(ServerRequestHandler):
    """pymodbus' handler, made safe for overlapping requests, with the link faults.

    The stock handler parses a frame in `callback_data`, then reads `self.last_pdu` a few
    loop iterations later (`handle_later` -> a task -> `handle_request`) and again after
    awaiting the datastore: a request that arrives meanwhile (a client that timed out and
    sent the next one while the old one is delayed) overwrites it, and the old answer
    would go out under the new transaction id. Here each request is queued with its fate
    the moment it is parsed, in arrival order, and answered from the queue (pymodbus
    schedules exactly one `handle_later` per parsed request). The fate ("answer",
    "silent", "close", "half") is the link's decision (`_PlcLink.fate`); every answer goes
    through `server_send`, which sends nothing while the PLC is silent.
    """

    def __init__(self, server: _Server, link: _PlcLink) -> None:
        super().__init__(server, server.trace_packet, server.trace_pdu, server.trace_connect)  # type: ignore[no-untyped-call]
        self.link = link
        self._queue: deque[tuple[ModbusPDU, tuple[Any, ...] | None, Fate]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        used: int = super().callback_data(data, addr)
        # The base schedules one handle_later when (and only when) last_pdu is set.
        if self.last_pdu:
            self._queue.append((self.last_pdu, self.last_addr, self.link.fate()))
        return used

    def handle_later(self) -> None:
        if not self._queue:
            return
        task = asyncio.get_running_loop().create_task(self._handle(*self._queue.popleft()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, pdu: ModbusPDU, addr: tuple[Any, ...] | None, fate: Fate) -> None:
        if fate == "silent":
            log.debug("%s: request dropped, no answer (silent)", self.link.plc)
            return  # discarded unexecuted: a write does not reach the plant
        try:
            response = await pdu.datastore_update(self.server.context, pdu.dev_id)
        except Exception as exc:
            log.error("request failed: %s; %s", exc, traceback.format_exc())
            response = ExceptionResponse(pdu.function_code, ExcCodes.DEVICE_FAILURE)
        response.transaction_id = pdu.transaction_id
        response.dev_id = pdu.dev_id
        transport = self.transport
        if not transport or transport.is_closing():
            return
        if fate == "answer":
            self.server_send(response, addr)
            return
        # "close" and "half": the request was carried out; its answer is lost.
        if fate == "half" and not self.link.silent_now():
            frame = self.framer.buildFrame(response)
            self.send(frame[: partial_frame_len(frame)])
        transport.close()  # flushes what was written, then FIN: the client sees EOF
        log.info("%s: connection closed mid-answer (%s)", self.link.plc, fate)

    def server_send(self, pdu: ModbusPDU | None, addr: tuple[Any, ...] | None) -> None:
        if self.link.silent_now():
            log.debug("%s: answer suppressed (silent)", self.link.plc)
            return
        super().server_send(pdu, addr)  # type: ignore[no-untyped-call]


def partial_frame_len(frame: bytes) -> int:
    """How much of a Modbus TCP frame a "half" answer sends: the 7-byte MBAP header and
    half of the PDU (at least its function code), always short of the whole frame."""
    pdu_len = len(frame) - MBAP_LEN
    return MBAP_LEN + max(1, pdu_len // 2)


class _Server(ModbusTcpServer):
    link: _PlcLink

    def callback_new_connection(self) -> _Handler:
        return _Handler(self, self.link)


class _PlcLink:
    """One PLC's Modbus server and the link faults that act on it."""

    def __init__(self, line: SimulatedLine, plc: PlcName, port: int, unit_id: int) -> None:
        self.line = line
        self.plc = plc
        self.port = port
        self.unit_id = unit_id
        self.server: _Server | None = None
        self.requests = 0
        self.exc_code = 0
        self.exc_until = 0.0
        self.delay = (0.0, 0.0)
        self.delay_until = 0.0
        self.silent_until = 0.0
        self.close_left = 0
        self.close_half = False
        self.drop_mode: DropMode = "close"
        self.drop_period_s = 0.0
        self.drop_start = 0.0
        self.drop_next = 0.0
        self.drop_until = 0.0
        self.dropped = 0
        self.rng = random.Random(hash((plc, line.seed)) & 0xFFFF_FFFF)
        rmap = line.plant.register_map(plc)
        self.holding_fields = rmap.by_table["holding"]
        self.input_fields = rmap.by_table["input"]

    def _device(self) -> SimDevice:
        def block(fields: list[Any]) -> list[SimData]:
            return [
                SimData(f.address, count=f.width, values=0, datatype=DataType.REGISTERS)
                for f in fields
            ]

        holding, inputs = block(self.holding_fields), block(self.input_fields)
        if not holding:
            holding = [SimData(0, datatype=DataType.INVALID)]
        if not inputs:
            inputs = [SimData(0, datatype=DataType.INVALID)]
        # Coils and discrete inputs are not part of the interface: the action refuses them;
        # pymodbus needs one block in each list all the same.
        bits = [SimData(0, values=False, datatype=DataType.BITS)]
        return SimDevice(
            id=self.unit_id,
            simdata=(bits, list(bits), holding, inputs),
            action=self._action,
        )

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests += 1
        return pdu

    def _trace_connect(self, connected: bool) -> None:
        log.info("%s: client %s", self.plc, "connected" if connected else "disconnected")

    async def start(self) -> None:
        """Listen on self.port (0 = any free port; the bound one is kept)."""
        server = _Server(
            self._device(),
            address=(self.line.host, self.port),
            trace_pdu=self._trace_pdu,
            trace_connect=self._trace_connect,
        )
        server.link = self
        await server.serve_forever(background=True)
        sockets = getattr(server.transport, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self.server = server
        log.info("%s: listening on %s:%d", self.plc, self.line.host, self.port)

    async def stop(self) -> None:
        """Close the listener and drop every open connection."""
        server, self.server = self.server, None
        if server is None:
            return
        # ModbusProtocol.close() closes the listening socket and each client transport.
        await server.shutdown()  # type: ignore[no-untyped-call]
        await asyncio.sleep(0)
        log.info("%s: stopped listening, connections dropped", self.plc)

    async def _action(  # noqa: PLR0917 - the signature pymodbus calls
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code in _BIT_FC:
            return ExcCodes.ILLEGAL_ADDRESS
        # FC6 reads back after writing: that is the same request, no second delay.
        readback = function_code == 6 and set_values is None
        loop = asyncio.get_running_loop()
        if not readback and loop.time() < self.delay_until:
            mean, jitter = self.delay
            await asyncio.sleep(max(0.0, self.rng.uniform(mean - jitter, mean + jitter)))
        now = loop.time()
        if now < self.exc_until:
            return ExcCodes(self.exc_code)
        plant = self.line.plant
        plant.advance_to(self.line.plant_time())
        is_input = function_code == 4
        if set_values is not None and function_code in _WRITE_FC:
            rc = plant.write_holding(self.plc, address, [int(v) for v in set_values])
            if rc is not None:
                return ExcCodes(rc)
        image = plant.input_registers(self.plc) if is_input else plant.holding_registers(self.plc)
        for a, v in image.items():
            i = a - start_address
            if 0 <= i < len(registers):
                registers[i] = v
        return None

    # ------------------------------------------------------------ link faults

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def silent_now(self) -> bool:
        """The PLC answers nothing right now."""
        return self._now() < self.silent_until

    def fate(self) -> Fate:
        """Decide what becomes of a request that has just arrived (arrival order)."""
        now = self._now()
        fate: Fate = "answer"
        if now < self.silent_until:
            fate = "silent"
        elif self.close_left > 0:
            self.close_left -= 1
            fate = "half" if self.close_half else "close"
        elif self.drop_next <= now < self.drop_until:
            # The first request at or after each period boundary (start + k * period).
            k = math.floor((now - self.drop_start) / self.drop_period_s) + 1
            self.drop_next = self.drop_start + k * self.drop_period_s
            fate = self.drop_mode
        if fate != "answer":
            self.dropped += 1
        return fate

    def silent(self, duration_s: float) -> None:
        self.silent_until = self._now() + duration_s

    def close_mid_request(self, count: int, half: bool) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        self.close_left = count
        self.close_half = half

    def drop_every(self, period_s: float, duration_s: float, mode: str) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, not {period_s}")
        if mode not in DROP_MODES:
            raise ValueError(f"mode must be one of {DROP_MODES}, not {mode!r}")
        now = self._now()
        self.drop_mode = cast(DropMode, mode)
        self.drop_period_s = period_s
        self.drop_start = self.drop_next = now
        self.drop_until = now + duration_s

    def exceptions(self, code: int, duration_s: float) -> None:
        self.exc_code = int(ExcCodes(code))
        self.exc_until = asyncio.get_running_loop().time() + duration_s

    def set_delay(self, mean_s: float, jitter_s: float, duration_s: float) -> None:
        self.delay = (mean_s, jitter_s)
        self.delay_until = asyncio.get_running_loop().time() + duration_s


class Faults:
    """Fault injection on a running SimulatedLine (all take effect at once)."""

    def __init__(self, line: SimulatedLine) -> None:
        self._line = line

    def _sync(self) -> Plant:
        plant = self._line.plant
        plant.advance_to(self._line.plant_time())
        return plant

    def arc(self, duration_s: float = 0.5) -> bool:
        """One beam trip now (ignored, False, if the high voltage is not up)."""
        ok = self._sync().accelerator.arc(duration_s)
        log.info("fault: arc %.2f s%s", duration_s, "" if ok else " ignored (HV off)")
        return ok

    def random_arcs(self, rate_per_h: float) -> None:
        """Random arcs while the beam is on, seeded; 0 switches them off."""
        self._sync().accelerator.set_arc_rate(rate_per_h)
        log.info("fault: random arcs at %.1f per hour", rate_per_h)

    def latch(self, plc: PlcName, code: int, persist: bool = False) -> None:
        """A latched fault: accelerator codes 2..7, conveyor 1..5."""
        plant = self._sync()
        if plc == "accelerator":
            plant.accelerator.latch(code, persist)
        else:
            plant.conveyor.fault(code, persist)
        log.info("fault: %s latched code %d%s", plc, code, " (cause persists)" if persist else "")

    def clear_cause(self, plc: PlcName, code: int) -> None:
        """The cause of a persistent fault is gone (a FAULT_RESET is still needed)."""
        plant = self._sync()
        if plc == "accelerator":
            plant.accelerator.clear_cause(code)
        else:
            plant.conveyor.clear_cause(code)
        log.info("fault: %s cause %d cleared", plc, code)

    def estop(self) -> None:
        """Emergency stop on the conveyor (standstill within 0.3 s, latched code 4)."""
        self.latch("conveyor", 4)

    def cable_break(self) -> None:
        """Cable break (standstill within 0.3 s, latched code 2)."""
        self.latch("conveyor", 2)

    def drive_fault(self) -> None:
        """Drive fault (normal ramp down, latched code 1)."""
        self.latch("conveyor", 1)

    def safety_open(self) -> None:
        """Personnel safety chain opens: SAFETY_OK clear, beam and HV off, code 6."""
        self.latch("accelerator", 6, persist=True)

    def safety_close(self) -> None:
        """Safety chain closed again (FAULT_RESET needed)."""
        self.clear_cause("accelerator", 6)

    def link_loss(self, plc: PlcName, duration_s: float) -> asyncio.Task[None]:
        """Closed and refused: stop listening and close every open connection (clients see
        EOF, connects are refused) for duration_s, then listen again on the same port."""
        return self._line._spawn(self._line._down(plc, duration_s, None, restart=False))

    def silent(self, plc: PlcName, duration_s: float) -> None:
        """Accept and never answer for duration_s: connections (open and new) stay up,
        every request is read and discarded (not carried out: writes, heartbeats included,
        do not reach the plant) and no answer goes out; then answers resume."""
        self._line._links[plc].silent(duration_s)
        log.info("fault: %s silent for %.2f s", plc, duration_s)

    def close_mid_request(self, plc: PlcName, count: int = 1, half: bool = False) -> None:
        """The next `count` requests are carried out, then their connection is closed
        without an answer; with half=True part of the answer frame (the MBAP header and
        half the PDU) is sent first. Replaces any count still pending; 0 cancels."""
        self._line._links[plc].close_mid_request(count, half)
        log.info(
            "fault: %s closes the connection on the next %d request(s)%s",
            plc,
            count,
            " after half an answer" if half else "",
        )

    def drop_every(
        self, plc: PlcName, period_s: float, duration_s: float, mode: str = "close"
    ) -> None:
        """For duration_s, drop one request per period_s: the first request from now on,
        then the first at or after each period boundary. mode "close" and "half" as in
        close_mid_request, "silent" as in silent for that one request (the connection stays
        open, the next request is answered)."""
        self._line._links[plc].drop_every(period_s, duration_s, mode)
        log.info(
            "fault: %s drops one request every %.2f s (%s) for %.1f s",
            plc,
            period_s,
            mode,
            duration_s,
        )

    def delay(self, plc: PlcName, mean_s: float, jitter_s: float, duration_s: float) -> None:
        """Delay every response by mean +/- jitter (uniform) for duration_s."""
        self._line._links[plc].set_delay(mean_s, jitter_s, duration_s)
        log.info(
            "fault: %s responses delayed %.3f +/- %.3f s for %.1f s",
            plc,
            mean_s,
            jitter_s,
            duration_s,
        )

    def exceptions(self, plc: PlcName, code: int, duration_s: float) -> None:
        """Answer every request with Modbus exception `code` for duration_s."""
        self._line._links[plc].exceptions(code, duration_s)
        log.info("fault: %s answers exception %d for %.1f s", plc, code, duration_s)


class SimulatedLine:
    """Both simulated PLCs on TCP, as an async context manager."""

    def __init__(
        self,
        cfg: LoadedConfig,
        acc_port: int = 0,
        cnv_port: int = 0,
        *,
        seed: int = 1,
        k_dose_true: float = 1500.0,
        host: str = "127.0.0.1",
        acc_counters: Mapping[str, int] | None = None,
        cnv_counters: Mapping[str, int] | None = None,
        arc_rate_per_h: float = 0.0,
    ) -> None:
        self.cfg = cfg
        self.seed = seed
        self.host = host
        self.plant = Plant(
            cfg.accelerator_map,
            cfg.conveyor_map,
            cfg.line.geometry,
            seed=seed,
            k_dose_true=k_dose_true,
            acc_counters=acc_counters,
            cnv_counters=cnv_counters,
            arc_rate_per_h=arc_rate_per_h,
        )
        self._links: dict[PlcName, _PlcLink] = {
            "accelerator": _PlcLink(self, "accelerator", acc_port, cfg.line.accelerator.unit_id),
            "conveyor": _PlcLink(self, "conveyor", cnv_port, cfg.line.conveyor.unit_id),
        }
        self.faults = Faults(self)
        self._t0 = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SimulatedLine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the physics clock and both servers."""
        self._t0 = asyncio.get_running_loop().time()
        try:
            for link in self._links.values():
                await link.start()
        except BaseException:
            await self.stop()
            raise
        self._ticker = asyncio.create_task(self._tick(), name="sim physics")

    async def stop(self) -> None:
        """Stop both servers and every background task."""
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._ticker = None
        self._tasks.clear()
        for link in self._links.values():
            await link.stop()

    def plant_time(self) -> float:
        """Plant time now: seconds since the line started."""
        return asyncio.get_running_loop().time() - self._t0

    async def _tick(self) -> None:
        while True:
            self.plant.advance_to(self.plant_time())
            await asyncio.sleep(TICK_S)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _down(
        self, plc: PlcName, down_s: float, counters: Mapping[str, int] | None, restart: bool
    ) -> None:
        link = self._links[plc]
        await link.stop()
        if restart:
            self.plant.advance_to(self.plant_time())
            used = self.plant.restart(plc, counters)
            log.info("%s: restart, down %.2f s, counters %s", plc, down_s, used)
        else:
            log.info("fault: %s link lost for %.2f s", plc, down_s)
        await asyncio.sleep(down_s)
        await link.start()

    # ------------------------------------------------------------------ public API

    @property
    def acc_port(self) -> int:
        """Bound TCP port of the accelerator PLC."""
        return self._links["accelerator"].port

    @property
    def cnv_port(self) -> int:
        """Bound TCP port of the conveyor PLC."""
        return self._links["conveyor"].port

    def port(self, plc: PlcName) -> int:
        """Bound TCP port of a PLC."""
        return self._links[plc].port

    def is_up(self, plc: PlcName) -> bool:
        """The PLC's server is listening."""
        return self._links[plc].server is not None

    async def restart(
        self, plc: PlcName, down_s: float = 0.5, counters: Mapping[str, int] | None = None
    ) -> None:
        """Drop connections, stay down for down_s, come back with new counters and
        holding registers at their defaults."""
        await self._down(plc, down_s, counters, restart=True)

    def requests(self, plc: PlcName) -> int:
        """Modbus requests received by a PLC so far."""
        return self._links[plc].requests

    def connections(self, plc: PlcName) -> int:
        """Client connections open on a PLC right now (0 while it is down)."""
        server = self._links[plc].server
        return len(server.active_connections) if server is not None else 0

    def dropped(self, plc: PlcName) -> int:
        """Requests left unanswered by silent, close_mid_request and drop_every so far."""
        return self._links[plc].dropped
