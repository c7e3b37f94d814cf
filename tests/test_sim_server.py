"""Simulated PLCs over real Modbus TCP on loopback, checked with a plain pymodbus client.

Reads use the spec's literal addresses and struct decoding on purpose: this checks that
what the simulator serves from configuration is the interface plc-interface.md describes.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from linectl.config import LoadedConfig, load_config
from simulators.server import SimulatedLine

CONFIG = Path(__file__).resolve().parents[1] / "config"
DEADLINE_S = 10.0


def f32(regs: list[int]) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", *regs))[0])


def u32(regs: list[int]) -> int:
    return int(struct.unpack(">I", struct.pack(">HH", *regs))[0])


def f32_regs(value: float) -> list[int]:
    return list(struct.unpack(">HH", struct.pack(">f", value)))


async def client(port: int) -> AsyncModbusTcpClient:
    c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0, reconnect_delay=0)
    assert await c.connect()
    return c


async def until(cond: Callable[[], Awaitable[bool]], what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        if await cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def try_read(port: int) -> bool:
    """A fresh connection and one read; False if refused, dropped or timed out."""
    c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.5, retries=0, reconnect_delay=0)
    try:
        if not await c.connect():
            return False
        rr = await c.read_input_registers(0, count=1, device_id=1)
        return not rr.isError()
    except Exception:
        return False
    finally:
        c.close()


@pytest.fixture
def cfg() -> LoadedConfig:
    return load_config(CONFIG)


@pytest.fixture
async def line(cfg: LoadedConfig) -> AsyncIterator[SimulatedLine]:
    async with SimulatedLine(cfg, acc_counters={"clock": 1000}) as sim:
        yield sim


async def test_accelerator_serves_the_spec(line: SimulatedLine) -> None:
    c = await client(line.acc_port)
    try:
        ir = await c.read_input_registers(0, count=15, device_id=1)
        assert not ir.isError()
        status = ir.registers[0]
        assert status & 1  # READY
        assert status & (1 << 8)  # REMOTE
        assert status & (1 << 6)  # SAFETY_OK
        assert not status & (1 << 2)  # no beam
        assert 1e-5 < f32(ir.registers[7:9]) < 1e-3  # vacuum, Pa
        clock0 = u32(ir.registers[13:15])
        assert clock0 >= 1000
        hr = await c.read_holding_registers(0, count=9, device_id=1)
        assert hr.registers[8] == 500  # watchdog_timeout default
        assert not (await c.write_registers(1, f32_regs(10.0), device_id=1)).isError()
        assert not (await c.write_registers(3, f32_regs(1.2), device_id=1)).isError()
        assert not (await c.write_registers(5, f32_regs(100.0), device_id=1)).isError()
        assert not (await c.write_register(8, 0, device_id=1)).isError()
        assert not (await c.write_register(0, 0b11, device_id=1)).isError()

        async def beam_up() -> bool:
            rr = await c.read_input_registers(0, count=15, device_id=1)
            return bool(rr.registers[0] & 0b110 == 0b110 and f32(rr.registers[1:3]) > 9.0)

        await until(beam_up, "beam on at 10 mA")
        ir = await c.read_input_registers(0, count=15, device_id=1)
        assert f32(ir.registers[3:5]) == pytest.approx(1.2, abs=0.02)
        assert f32(ir.registers[5:7]) == pytest.approx(100.0, abs=0.5)
        assert u32(ir.registers[9:11]) > 0  # charge_total
        assert ir.registers[11] == 0  # fault_code
        assert u32(ir.registers[13:15]) > clock0 + 1500  # at least the HV rise
    finally:
        c.close()


async def test_conveyor_serves_the_spec(line: SimulatedLine) -> None:
    c = await client(line.cnv_port)
    try:
        assert not (await c.write_registers(1, f32_regs(60.0), device_id=1)).isError()
        assert not (await c.write_registers(5, f32_regs(120.0), device_id=1)).isError()
        assert not (await c.write_register(4, 0, device_id=1)).isError()
        assert not (await c.write_register(0, 1, device_id=1)).isError()

        async def at_speed() -> bool:
            rr = await c.read_input_registers(0, count=10, device_id=1)
            return bool(rr.registers[0] & 0b110 == 0b110)

        await until(at_speed, "RUNNING and AT_SPEED")
        ir = await c.read_input_registers(0, count=10, device_id=1)
        assert f32(ir.registers[1:3]) == pytest.approx(60.0, abs=0.5)
        assert u32(ir.registers[3:5]) > 0  # length, mm
        assert 20.0 < f32(ir.registers[5:7]) < 200.0  # tension
        assert ir.registers[0] & (1 << 3)  # TENSION_OK
    finally:
        c.close()


async def test_out_of_range_write_is_refused_and_changes_nothing(line: SimulatedLine) -> None:
    c = await client(line.acc_port)
    try:
        before = (await c.read_holding_registers(0, count=9, device_id=1)).registers
        rr = await c.write_registers(1, f32_regs(150.0), device_id=1)  # max 100 mA
        assert rr.isError()
        assert rr.exception_code == 3
        rr = await c.write_register(8, 50, device_id=1)  # 0 or 100..10000
        assert rr.exception_code == 3
        rr = await c.write_registers(3, [*f32_regs(1.0), *f32_regs(5.0)], device_id=1)
        assert rr.exception_code == 3  # second field out of range: the first is not applied
        after = (await c.read_holding_registers(0, count=9, device_id=1)).registers
        assert after == before
    finally:
        c.close()


async def test_unmapped_addresses_answer_exception_2(line: SimulatedLine) -> None:
    c = await client(line.acc_port)
    try:
        assert (await c.read_input_registers(15, count=1, device_id=1)).exception_code == 2
        assert (await c.read_input_registers(10, count=10, device_id=1)).exception_code == 2
        assert (await c.read_holding_registers(9, count=1, device_id=1)).exception_code == 2
        assert (await c.write_register(100, 1, device_id=1)).exception_code == 2
        assert (await c.read_coils(0, count=1, device_id=1)).exception_code == 2
    finally:
        c.close()


async def test_watchdog_trips_with_no_client_connected(line: SimulatedLine) -> None:
    c = await client(line.cnv_port)
    await c.write_register(4, 200, device_id=1)
    await c.write_register(3, 1, device_id=1)  # first change arms it
    c.close()
    cnv = line.plant.conveyor

    async def tripped() -> bool:
        return cnv.fault_code == 5

    await until(tripped, "conveyor watchdog trip")
    assert cnv.watchdog_trip


async def test_link_loss_refuses_and_drops_then_recovers(line: SimulatedLine) -> None:
    c = await client(line.acc_port)
    assert not (await c.read_input_registers(0, count=1, device_id=1)).isError()
    task = line.faults.link_loss("accelerator", 1.0)
    await until(lambda: asyncio.sleep(0, not line.is_up("accelerator")), "link down")
    try:
        rr = await c.read_input_registers(0, count=1, device_id=1)
        answered = not rr.isError()
    except Exception:
        answered = False
    assert not answered
    c.close()
    assert not await try_read(line.acc_port)
    assert await try_read(line.cnv_port)  # the other PLC is unaffected
    await until(lambda: try_read(line.acc_port), "accelerator back")
    await task


async def test_exceptions_for_a_while(line: SimulatedLine) -> None:
    c = await client(line.cnv_port)
    try:
        line.faults.exceptions("conveyor", 6, 0.5)
        rr = await c.read_input_registers(0, count=1, device_id=1)
        assert rr.exception_code == 6

        async def normal() -> bool:
            return not (await c.read_input_registers(0, count=1, device_id=1)).isError()

        await until(normal, "normal answers again")
    finally:
        c.close()


async def test_delay(line: SimulatedLine) -> None:
    c = await client(line.acc_port)
    try:
        line.faults.delay("accelerator", 0.3, 0.05, 5.0)
        t0 = time.monotonic()
        rr = await c.read_input_registers(0, count=1, device_id=1)
        assert not rr.isError()
        assert time.monotonic() - t0 >= 0.25
    finally:
        c.close()


async def test_requests_are_counted(line: SimulatedLine) -> None:
    c = await client(line.acc_port)
    try:
        n0 = line.requests("accelerator")
        for _ in range(3):
            await c.read_input_registers(0, count=15, device_id=1)
        await c.write_register(7, 5, device_id=1)
        assert line.requests("accelerator") - n0 == 4
        assert line.requests("conveyor") == 0
    finally:
        c.close()


async def test_restart_resets_counters_and_holding(line: SimulatedLine) -> None:
    c = await client(line.acc_port)
    await c.write_registers(1, f32_regs(42.0), device_id=1)
    await c.write_register(0, 1, device_id=1)
    c.close()
    await line.restart("accelerator", 0.2, {"charge_total": 77, "trip_count": 3, "clock": 5})
    c = await client(line.acc_port)
    try:
        ir = (await c.read_input_registers(0, count=15, device_id=1)).registers
        assert u32(ir[9:11]) == 77
        assert ir[12] == 3
        assert 5 <= u32(ir[13:15]) < 5 + 5000  # restarted at 5 ms, down for 0.2 s
        hr = (await c.read_holding_registers(0, count=9, device_id=1)).registers
        assert hr[0] == 0
        assert f32(hr[1:3]) == 0.0
        assert hr[8] == 500
    finally:
        c.close()


async def test_cdab_and_scaled_int32_map(tmp_path: Path) -> None:
    conf = tmp_path / "config"
    shutil.copytree(CONFIG, conf)
    acc_toml = conf / "registers" / "accelerator.toml"
    text = acc_toml.read_text()
    text = text.replace('type = "float32"', 'type = "float32"\nword_order = "CDAB"')
    text = text.replace('type = "uint32"', 'type = "uint32"\nword_order = "CDAB"')
    text = text.replace(
        '[fields.beam_current]\ntable = "input"\naddress = 1\n'
        'type = "float32"\nword_order = "CDAB"',
        '[fields.beam_current]\ntable = "input"\naddress = 1\ntype = "int32"\n'
        'word_order = "CDAB"\nscale = 0.001',
    )
    acc_toml.write_text(text)
    cfg = load_config(conf)
    assert cfg.accelerator_map.field("beam_current").type == "int32"
    assert cfg.accelerator_map.field("charge_total").word_order == "CDAB"

    def cdab(regs: list[int]) -> list[int]:
        return [regs[1], regs[0]]

    async with SimulatedLine(cfg, acc_counters={"clock": 0x12345678}) as sim:
        c = await client(sim.acc_port)
        try:
            await c.write_registers(1, cdab(f32_regs(8.0)), device_id=1)
            await c.write_registers(5, cdab(f32_regs(90.0)), device_id=1)
            await c.write_register(8, 0, device_id=1)
            await c.write_register(0, 0b11, device_id=1)
            assert sim.plant.accelerator.current_sp_ma == 8.0
            assert sim.plant.accelerator.scan_width_sp_cm == 90.0

            async def beam() -> bool:
                rr = await c.read_input_registers(0, count=15, device_id=1)
                raw = struct.unpack(">i", struct.pack(">HH", *cdab(rr.registers[1:3])))[0]
                return bool(7.5 < raw * 0.001 < 8.5)

            await until(beam, "8 mA as scaled CDAB int32")
            ir = (await c.read_input_registers(0, count=15, device_id=1)).registers
            assert f32(cdab(ir[5:7])) == pytest.approx(90.0, abs=0.5)
            clock = u32(cdab(ir[13:15]))
            assert 0x12345678 < clock < 0x12345678 + 60_000
        finally:
            c.close()


def test_cli_runs_schedules_faults_and_writes_truth(tmp_path: Path) -> None:
    from simulators.cli import main, parse_fault

    assert parse_fault("link_loss:conveyor:2@60").args == (2.0,)
    assert parse_fault("delay:acc:0.1,0.02,5@1").plc == "accelerator"
    with pytest.raises(Exception, match="needs a PLC"):
        parse_fault("latch@3")
    out = tmp_path / "truth.json"
    rc = main(
        [
            "--config", str(CONFIG), "--acc-port", "0", "--cnv-port", "0",
            "--fault", "estop@0.1", "--fault", "link_loss:accelerator:0.2@0.1",
            "--duration", "0.6", "--truth-out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    assert out.exists()


async def status_word(c: AsyncModbusTcpClient) -> int:
    rr = await c.read_input_registers(0, count=1, device_id=1)
    assert not rr.isError()
    return int(rr.registers[0])


async def test_watchdog_heartbeat_in_the_timeout_write_avoids_the_trip(
    line: SimulatedLine,
) -> None:
    """An armed watchdog stays armed while watchdog_timeout is 0. Setting the timeout back
    in the same FC16 write as a heartbeat change does not trip; setting it back with a
    stale heartbeat trips at once (legal PLC behaviour the controller must cope with)."""
    watchdog_trip = 1 << 9  # accelerator status bit 9; watchdog at 7, timeout at 8
    c = AsyncModbusTcpClient(
        "127.0.0.1", port=line.acc_port, timeout=0.2, retries=0, reconnect_delay=0
    )
    assert await c.connect()
    try:
        assert not (await c.write_register(7, 1, device_id=1)).isError()  # armed
        assert not (await c.write_register(8, 0, device_id=1)).isError()  # timing off
        await asyncio.sleep(0.7)  # longer than the 500 ms timeout
        assert not (await c.write_registers(7, [2, 500], device_id=1)).isError()
        await asyncio.sleep(0.05)
        assert not await status_word(c) & watchdog_trip
        assert line.plant.accelerator.fault_code == 0
        # Timeout back to 0, then to 500 without a heartbeat change: trips at once.
        assert not (await c.write_register(8, 0, device_id=1)).isError()
        await asyncio.sleep(0.6)
        assert not await status_word(c) & watchdog_trip
        assert not (await c.write_register(8, 500, device_id=1)).isError()
        assert await status_word(c) & watchdog_trip
        assert line.plant.accelerator.fault_code == 7
    finally:
        c.close()
