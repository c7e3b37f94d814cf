"""Link faults of the simulated PLCs over real loopback sockets, checked with a raw pymodbus
client (short timeouts, no retries, no reconnects of its own): silent, closed mid-answer
(with or without half a frame), periodic drops, and closed-and-refused (link loss, restart).

The simulators are tested on their own here: nothing of linectl's link is used.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from linectl.config import PlcName
from simulators.server import MBAP_LEN, SimulatedLine, partial_frame_len

CONFIG = Path(__file__).resolve().parents[1] / "config"
TIMEOUT_S = 0.2
DEADLINE_S = 5.0
ACC_STATUS_WATCHDOG_TRIP = 1 << 9
CNV_STATUS_WATCHDOG_TRIP = 1 << 7


class Probe:
    """A raw pymodbus client that records connects and the bytes it receives."""

    def __init__(self, port: int) -> None:
        self.connects = 0
        self.received: list[bytes] = []
        self.c = AsyncModbusTcpClient(
            "127.0.0.1",
            port=port,
            timeout=TIMEOUT_S,
            retries=0,
            reconnect_delay=0,
            trace_packet=self._packet,
            trace_connect=self._connect,
        )
        # Keep pymodbus from closing the connection itself after a few timeouts: whether
        # the connection stays open is what the silent tests look at.
        self.c.set_max_no_responses(1000)

    def _packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self.received.append(data)  # the client's whole receive buffer so far
        return data

    def _connect(self, connected: bool) -> None:
        self.connects += connected

    async def connect(self) -> None:
        assert await self.c.connect()

    async def read(self) -> str:
        """One FC4 read: "ok", "exception" (a Modbus exception answer) or "failed" (no
        answer: timed out or connection closed). Reconnects first if it must."""
        if not self.c.connected:
            await self.connect()
        try:
            rr = await self.c.read_input_registers(0, count=1, device_id=1)
        except Exception:
            return "failed"
        return "exception" if rr.isError() else "ok"

    def close(self) -> None:
        self.c.close()


async def until(cond: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        ok = cond()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def connect_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def read_request(tid: int, count: int) -> bytes:
    """FC4 read of `count` input registers from 0, unit 1, as raw Modbus TCP."""
    return struct.pack(">HHHBBHH", tid, 0, 6, 1, 4, 0, count)


# --------------------------------------------------------------------------- silent


async def test_silent_accepts_and_never_answers_then_answers_again(line: SimulatedLine) -> None:
    p = Probe(line.acc_port)
    await p.connect()
    try:
        assert await p.read() == "ok"
        n0 = line.requests("accelerator")
        line.faults.silent("accelerator", 0.8)
        t_end = time.monotonic() + 0.8
        assert await p.read() == "failed"  # timed out ...
        assert p.c.connected  # ... on a connection that stays open
        assert line.connections("accelerator") == 1
        # A new connection is accepted, and not answered either.
        q = Probe(line.acc_port)
        await q.connect()
        assert line.connections("accelerator") == 2
        assert await q.read() == "failed"
        assert q.c.connected
        q.close()
        # A write is read and discarded: the heartbeat does not reach the plant.
        wd = line.plant.accelerator.watchdog.value
        with pytest.raises(Exception):  # noqa: B017, PT011 - pymodbus' timeout error
            await p.c.write_register(7, wd + 1, device_id=1)
        assert line.plant.accelerator.watchdog.value == wd
        assert line.requests("accelerator") - n0 == 3  # received all the same
        await asyncio.sleep(max(0.0, t_end - time.monotonic()) + 0.05)
        assert await p.read() == "ok"  # the same connection answers again
        assert p.connects == 1
        assert line.dropped("accelerator") == 3
    finally:
        p.close()


async def test_silent_plc_trips_its_watchdog_while_physics_run_on(line: SimulatedLine) -> None:
    p = Probe(line.cnv_port)
    await p.connect()
    try:
        assert not (await p.c.write_register(4, 200, device_id=1)).isError()  # timeout 200 ms
        assert not (await p.c.write_register(3, 1, device_id=1)).isError()  # arms it
        clock0 = line.plant.conveyor.clock_ms
        line.faults.silent("conveyor", 0.6)
        hb = 1
        t_end = time.monotonic() + 0.6
        while time.monotonic() < t_end:  # the controller keeps beating; nothing gets through
            hb += 1
            with pytest.raises(Exception):  # noqa: B017, PT011 - pymodbus' timeout error
                await p.c.write_register(3, hb, device_id=1)
        assert line.plant.conveyor.fault_code == 5

        async def trip_visible() -> bool:
            rr = await p.c.read_input_registers(0, count=10, device_id=1)
            return not rr.isError() and bool(rr.registers[0] & CNV_STATUS_WATCHDOG_TRIP)

        await until(trip_visible, "WATCHDOG_TRIP readable after the silence")
        assert line.plant.conveyor.clock_ms - clock0 >= 600
    finally:
        p.close()


# --------------------------------------------------------------------------- close mid-answer


async def test_close_mid_request_closes_without_answer_then_reconnects(
    line: SimulatedLine,
) -> None:
    p = Probe(line.cnv_port)
    await p.connect()
    try:
        assert await p.read() == "ok"
        line.faults.close_mid_request("conveyor", count=2)
        # The request is carried out (a write takes effect); only its answer is lost.
        with pytest.raises(Exception):  # noqa: B017, PT011 - pymodbus' connection/timeout error
            await p.c.write_register(3, 42, device_id=1)
        assert line.plant.conveyor.watchdog.value == 42
        await until(lambda: not p.c.connected, "connection closed by the PLC")
        n_bytes = sum(len(b) for b in p.received)
        assert await p.read() == "failed"  # reconnected; the second one is closed as well
        assert not p.c.connected
        assert sum(len(b) for b in p.received) == n_bytes  # no answer bytes at all
        assert await p.read() == "ok"  # reconnected, answered
        assert await p.read() == "ok"
        assert p.connects == 3
        assert line.dropped("conveyor") == 2
    finally:
        p.close()


async def test_close_mid_request_half_sends_a_partial_frame_then_closes(
    line: SimulatedLine,
) -> None:
    p = Probe(line.acc_port)
    await p.connect()
    try:
        assert await p.read() == "ok"
        p.received.clear()
        line.faults.close_mid_request("accelerator", half=True)
        assert await p.read() == "failed"
        assert not p.c.connected
        assert p.received, "no bytes of the answer arrived"
        got = p.received[-1]
        full = MBAP_LEN + 2 + 2  # header, function code, byte count, one register
        assert len(got) == partial_frame_len(bytes(full)) < full
        assert int.from_bytes(got[4:6], "big") + 6 == full  # the header announces more
        assert got[7] == 4  # function code of the answer
        assert await p.read() == "ok"
    finally:
        p.close()


async def test_half_answer_bytes_on_a_raw_socket(line: SimulatedLine) -> None:
    line.faults.close_mid_request("accelerator", count=1, half=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", line.acc_port)
    try:
        writer.write(read_request(0x1234, 15))
        await writer.drain()
        async with asyncio.timeout(2.0):
            got = await reader.read(-1)  # everything up to EOF
        full = MBAP_LEN + 2 + 30
        assert len(got) == partial_frame_len(bytes(full)) == MBAP_LEN + 16
        tid, pid, length, unit, fc, nbytes = struct.unpack(">HHHBBB", got[:9])
        assert (tid, pid, length, unit, fc, nbytes) == (0x1234, 0, full - 6, 1, 4, 30)
    finally:
        writer.close()
    # The next connection is answered in full.
    reader, writer = await asyncio.open_connection("127.0.0.1", line.acc_port)
    try:
        writer.write(read_request(7, 15))
        async with asyncio.timeout(2.0):
            got = await reader.readexactly(MBAP_LEN + 2 + 30)
        assert got[:2] == b"\x00\x07"
    finally:
        writer.close()


# --------------------------------------------------------------------------- periodic drops


@pytest.mark.parametrize("mode", ["close", "half", "silent"])
async def test_drop_every_drops_about_one_request_per_period(
    line: SimulatedLine, mode: str
) -> None:
    p = Probe(line.cnv_port)
    await p.connect()
    try:
        line.faults.drop_every("conveyor", 0.5, 1.5, mode)
        t_end = time.monotonic() + 1.7
        results: list[str] = []
        while time.monotonic() < t_end:
            results.append(await p.read())
            await asyncio.sleep(0.02)
        failed = results.count("failed")
        # One at the start, then the first request after 0.5 s and after 1.0 s.
        assert 2 <= failed <= 4, results
        assert results[0] == "failed"
        assert results.count("ok") >= 2 * failed
        assert "exception" not in results
        assert line.dropped("conveyor") == failed
        if mode == "silent":
            assert p.connects == 1  # the connection stayed open throughout
        else:
            assert p.connects == failed + 1
        assert await p.read() == "ok"  # over: no more drops
    finally:
        p.close()


def test_drop_every_rejects_bad_arguments(line: SimulatedLine) -> None:
    with pytest.raises(ValueError, match="mode"):
        line.faults.drop_every("conveyor", 1.0, 5.0, "reset")
    with pytest.raises(ValueError, match="period"):
        line.faults.drop_every("conveyor", 0.0, 5.0)


# --------------------------------------------------------------------------- closed and refused


@pytest.mark.parametrize("kind", ["link_loss", "restart"])
async def test_link_loss_and_restart_close_connections_and_refuse(
    line: SimulatedLine, kind: str
) -> None:
    plc: PlcName = "accelerator"
    p = Probe(line.port(plc))
    await p.connect()
    try:
        assert await p.read() == "ok"
        assert line.connections(plc) == 1
        if kind == "link_loss":
            task = line.faults.link_loss(plc, 0.6)
        else:
            task = asyncio.ensure_future(line.restart(plc, 0.6))
        # The open connection is closed by the PLC (EOF), with no request outstanding.
        await until(lambda: not p.c.connected, "open connection closed")
        assert not line.is_up(plc)
        assert line.connections(plc) == 0
        assert await connect_refused(line.port(plc))  # nothing listens: refused
        assert not await connect_refused(line.port("conveyor"))  # the other PLC is up
        await task
        assert line.is_up(plc)
        assert await p.read() == "ok"  # reconnects to the same port and is answered
    finally:
        p.close()


def test_cli_parses_the_link_faults() -> None:
    from simulators.cli import parse_fault

    f = parse_fault("silent:acc:2@5")
    assert (f.kind, f.plc, f.args) == ("silent", "accelerator", (2.0,))
    f = parse_fault("close_mid_request:cnv@1")
    assert (f.plc, f.args, f.mode) == ("conveyor", (), "close")
    f = parse_fault("close_mid_request:cnv:3,half@1")
    assert (f.args, f.mode) == ((3.0,), "half")
    f = parse_fault("drop_every:acc:5,60@10")
    assert (f.args, f.mode) == ((5.0, 60.0), "close")
    assert parse_fault("drop_every:acc:5,60,silent@10").mode == "silent"
    with pytest.raises(Exception, match="mode"):
        parse_fault("drop_every:acc:5,60,reset@10")
    with pytest.raises(Exception, match="needs a PLC"):
        parse_fault("silent:2@1")


def test_cli_schedules_the_link_faults() -> None:
    from simulators.cli import main

    rc = main(
        [
            "--config", str(CONFIG), "--acc-port", "0", "--cnv-port", "0",
            "--fault", "silent:acc:0.2@0.05",
            "--fault", "close_mid_request:cnv:2,half@0.05",
            "--fault", "drop_every:acc:0.1,0.2,silent@0.1",
            "--duration", "0.4",
        ]
    )  # fmt: skip
    assert rc == 0
