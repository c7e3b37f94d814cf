"""PlcLink against the in-process simulated PLCs on free ports (real sockets, real time)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from linectl.codec import decode, encode
from linectl.config import LoadedConfig, PlcName, load_config
from linectl.errors import (
    LocalError,
    PlcExceptionError,
    PlcTimeoutError,
    PlcUnavailableError,
)
from linectl.modbus.link import PlcLink, Snapshot, StallLog, wait_polls
from linectl.quality import Quality
from simulators.server import SimulatedLine

U32 = 1 << 32


@asynccontextmanager
async def open_link(
    cfg: LoadedConfig,
    plc: PlcName,
    port: int,
    *,
    connect: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[PlcLink]:
    """A started link to `port`; with connect=True, connected first."""
    endpoint = cfg.endpoint(plc).model_copy(update={"port": port})
    async with PlcLink(plc, endpoint, cfg.register_map(plc), clock=clock) as link:
        if connect:
            assert await link.wait_connected(10.0)
        yield link


def port_of(line: SimulatedLine, plc: PlcName) -> int:
    return line.acc_port if plc == "accelerator" else line.cnv_port


async def poll_until(
    link: PlcLink, pred: Callable[[Snapshot], bool], deadline_s: float = 10.0
) -> Snapshot:
    """Poll every 20 ms until pred(snapshot) holds; fail past the deadline."""
    t_end = time.monotonic() + deadline_s
    while True:
        snap = await link.poll()
        if pred(snap):
            return snap
        if time.monotonic() > t_end:
            pytest.fail(f"condition not met within {deadline_s} s; last snapshot {snap}")
        await asyncio.sleep(0.02)


async def eventually(cond: Callable[[], bool], deadline_s: float = 10.0) -> None:
    t_end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > t_end:
            pytest.fail(f"condition not met within {deadline_s} s")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- basics


@pytest.mark.parametrize("plc", ["accelerator", "conveyor"])
async def test_poll_one_request_per_block(
    cfg: LoadedConfig, line: SimulatedLine, plc: PlcName
) -> None:
    async with open_link(cfg, plc, port_of(line, plc)) as link:
        assert len(link.blocks) == 2
        await poll_until(link, lambda s: s.ok)
        before = line.requests(plc)
        snap = await link.poll()
        assert line.requests(plc) - before == len(link.blocks)
        assert snap.ok
        assert set(snap) == set(cfg.register_map(plc).fields)
        clock = snap.value("clock")
        assert isinstance(clock, int)
        for name in snap:
            sample = snap.get(name)
            assert sample.quality is Quality.GOOD
            assert sample.plc_clock_ms == clock
        # holding registers read back at their defaults after a PLC start
        wd_timeout = cfg.register_map(plc).field("watchdog_timeout").default
        assert snap.value("watchdog_timeout") == wd_timeout
        assert link.stats.requests_by_fc[3] == link.stats.requests_by_fc[4]
        assert link.stats.errors == {"timeout": 0, "exception": 0, "disconnect": 0, "protocol": 0}
        with pytest.raises(LocalError, match="no field"):
            snap.get("nope")


async def test_plc_clock_matches_plant(cfg: LoadedConfig, line: SimulatedLine) -> None:
    async with open_link(cfg, "accelerator", line.acc_port) as link:
        snap = await poll_until(link, lambda s: s.ok)
        plant_ms = line.plant.accelerator.clock_ms
        read_ms = snap.get("clock").plc_clock_ms
        assert read_ms is not None
        # the plant only moves forward; the value read is at most a few seconds behind
        assert 0 <= (plant_ms - read_ms) % U32 < 5000


async def test_write_and_verify(cfg: LoadedConfig, line: SimulatedLine) -> None:
    async with open_link(cfg, "accelerator", line.acc_port) as link:
        await link.write("energy_sp", 1.5)  # float32: FC16 + read-back
        await link.write("watchdog", 7)  # uint16: FC6 + read-back
        assert link.stats.requests_by_fc[16] == 1
        assert link.stats.requests_by_fc[6] == 1
        snap = await link.poll()
        assert snap.value("energy_sp") == 1.5
        assert snap.value("watchdog") == 7
        await link.write_many({"beam_current_sp": 12.5, "energy_sp": 2.0, "watchdog": 8})
        assert link.stats.requests_by_fc[16] == 2  # the two floats in one request
        snap = await link.poll()
        assert (snap.value("beam_current_sp"), snap.value("energy_sp")) == (12.5, 2.0)
        assert snap.value("watchdog") == 8


async def test_write_read_only_field_is_local_error_before_io(
    cfg: LoadedConfig, line: SimulatedLine
) -> None:
    async with open_link(cfg, "accelerator", line.acc_port) as link:
        before = line.requests("accelerator")
        with pytest.raises(LocalError, match="read-only"):
            await link.write("beam_current", 1.0)
        with pytest.raises(LocalError, match="no field"):
            await link.write("nope", 1.0)
        assert line.requests("accelerator") == before


async def test_out_of_range_write_is_plc_exception_code_3(
    cfg: LoadedConfig, line: SimulatedLine
) -> None:
    async with open_link(cfg, "accelerator", line.acc_port) as link:
        with pytest.raises(PlcExceptionError) as info:
            await link.write("beam_current_sp", 150.0)
        assert info.value.exception_code == 3
        assert info.value.plc == "accelerator"
        text = str(info.value)
        assert "beam_current_sp" in text
        assert "150.0" in text
        assert "3" in text
        assert link.connected  # an exception answer is a complete answer
        snap = await link.poll()
        assert snap.ok
        assert snap.value("beam_current_sp") == 0.0  # refused: nothing changed


async def test_not_connected_write_raises_at_once_and_poll_is_comm_fail(
    cfg: LoadedConfig, free_tcp_port: int
) -> None:
    async with open_link(cfg, "accelerator", free_tcp_port, connect=False) as link:
        assert not link.connected
        async with asyncio.timeout(1.0):  # would block on a connect if the link waited
            with pytest.raises(PlcUnavailableError, match="not connected"):
                await link.write("watchdog", 1)
            snap = await link.poll()
        assert not snap.connected
        assert all(snap.get(n).quality is Quality.COMM_FAIL for n in snap)
        assert snap.value("clock") is None
        await eventually(lambda: link.stats.connect_failures >= 2)  # keeps trying
        assert not link.connected


async def test_misuse_raises_local_error(cfg: LoadedConfig) -> None:
    link = PlcLink("accelerator", cfg.line.accelerator, cfg.accelerator_map)
    with pytest.raises(LocalError, match="not started"):
        await link.poll()
    with pytest.raises(LocalError, match="register map"):
        PlcLink("conveyor", cfg.line.conveyor, cfg.accelerator_map)


# --------------------------------------------------------------------------- faults


async def test_restart_reconnects(
    cfg: LoadedConfig, line: SimulatedLine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="linectl.modbus")
    async with open_link(cfg, "accelerator", line.acc_port) as link:
        await poll_until(link, lambda s: s.ok)
        await line.restart("accelerator", down_s=0.5)
        t0 = time.perf_counter()
        snap = await poll_until(link, lambda s: s.ok, deadline_s=10.0)
        took = time.perf_counter() - t0
        print(f"\nreconnect after simulator restart: GOOD data {took:.3f} s after the PLC returned")
        assert link.stats.reconnects >= 1
        # holding registers are back at their defaults after the restart
        assert (
            snap.value("watchdog_timeout") == cfg.accelerator_map.field("watchdog_timeout").default
        )
    lost = [r for r in caplog.records if "link lost" in r.getMessage()]
    recovered = [r for r in caplog.records if "recovered after" in r.getMessage()]
    assert len(lost) == 1
    assert len(recovered) == 1


async def test_link_loss_stale_then_comm_fail_then_recovery(
    cfg: LoadedConfig, line: SimulatedLine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="linectl.modbus")
    now = [0.0]  # the link's clock, moved by hand so staleness is exact
    async with open_link(cfg, "conveyor", line.cnv_port, clock=lambda: now[0]) as link:
        stale_after = link.endpoint.stale_after_s
        good = await poll_until(link, lambda s: s.ok)
        tension = good.value("tension")
        line.faults.link_loss("conveyor", 1.0)
        await eventually(lambda: not link.connected)
        now[0] = stale_after / 2
        snap = await link.poll()
        assert not snap.connected
        sample = snap.get("tension")
        assert sample.quality is Quality.STALE
        assert sample.value == tension  # the last good value, with its own time stamps
        assert sample.host_time_s == good.get("tension").host_time_s
        assert sample.plc_clock_ms == good.get("clock").plc_clock_ms
        now[0] = stale_after * 1.01
        snap = await link.poll()
        assert all(snap.quality(n) is Quality.COMM_FAIL for n in snap)
        assert snap.value("tension") is None
        assert snap.get("tension").host_time_s == now[0]
        for _ in range(5):
            await link.poll()
        await poll_until(link, lambda s: s.ok, deadline_s=15.0)
        assert link.stats.reconnects == 1
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("link lost" in m for m in msgs) == 1  # once per loss, not once per poll
    assert sum("recovered after" in m for m in msgs) == 1


async def test_exception_responses(cfg: LoadedConfig, line: SimulatedLine) -> None:
    async with open_link(cfg, "accelerator", line.acc_port) as link:
        await poll_until(link, lambda s: s.ok)
        line.faults.exceptions("accelerator", 4, 1.0)
        snap = await link.poll()
        assert not snap.ok
        assert snap.quality("energy") in (Quality.STALE, Quality.COMM_FAIL)
        with pytest.raises(PlcExceptionError) as info:
            await link.write("watchdog", 3)
        assert info.value.exception_code == 4
        assert "watchdog" in str(info.value)
        await poll_until(link, lambda s: s.quality("energy") is Quality.COMM_FAIL)
        assert link.stats.errors["exception"] >= 2
        assert link.connected  # exceptions do not drop the connection
        await poll_until(link, lambda s: s.ok)
        assert link.stats.reconnects == 0


async def test_late_responses_never_taken_for_current(
    cfg: LoadedConfig, line: SimulatedLine
) -> None:
    async with open_link(cfg, "accelerator", line.acc_port) as link:
        await poll_until(link, lambda s: s.ok)
        timeout_s = link.endpoint.timeout_s
        late_s = timeout_s * 1.6  # every answer comes after the link has given up on it
        window_s = 3.0
        t_end = time.monotonic() + window_s - 3 * late_s
        line.faults.delay("accelerator", late_s, 0.0, window_s)
        # Stop early enough that the simulator has applied every delayed write before
        # the checks below start (it applies a write after its delay, answered or not).
        i = 0
        while time.monotonic() < t_end:
            snap = await link.poll()
            assert not snap.ok
            with pytest.raises((PlcTimeoutError, PlcUnavailableError)):
                await link.write("watchdog", 100 + i)
            i += 1
            await asyncio.sleep(0.02)
        assert i >= 1
        assert link.stats.errors["timeout"] >= 1
        await poll_until(link, lambda s: s.ok, deadline_s=10.0)
        # after the delay: every value read is the current one
        for i in range(20):
            await link.write("watchdog", 1000 + i)
            await link.write("beam_current_sp", float(i), verify=False)
            snap = await link.poll()
            assert snap.ok
            assert snap.value("watchdog") == 1000 + i
            assert snap.value("beam_current_sp") == float(i)
            read_ms = snap.get("clock").plc_clock_ms
            assert read_ms is not None
            assert 0 <= (line.plant.accelerator.clock_ms - read_ms) % U32 < 5000


def request_timeout_s(link: PlcLink) -> float | None:
    """How long the link's current connection waits for an answer (pymodbus's timer)."""
    client = link._client
    return None if client is None else float(client.ctx.comm_params.timeout_connect)


async def test_a_request_waits_timeout_s_not_the_connect_timeout(
    cfg: LoadedConfig, line: SimulatedLine
) -> None:
    """pymodbus has one timeout for connect and requests; the link connects with the
    connect timeout and then bounds each request by timeout_s. Answers that come
    between the two are too late: they must time out, not be taken."""
    async with open_link(cfg, "accelerator", line.acc_port) as link:
        ep = link.endpoint
        assert ep.connect_timeout_s >= 3 * ep.timeout_s  # the defaults: 0.5 s and 0.1 s
        await poll_until(link, lambda s: s.ok)
        assert request_timeout_s(link) == ep.timeout_s
        late_s = (ep.timeout_s + ep.connect_timeout_s) / 2
        line.faults.delay("accelerator", late_s, 0.0, 2.0)
        snap = await link.poll()
        assert not snap.ok
        assert link.stats.errors["timeout"] >= 1
        await poll_until(link, lambda s: s.ok, deadline_s=10.0)  # and it comes back
        assert request_timeout_s(link) == ep.timeout_s  # on the new connection too


async def test_wait_polls_ends_when_both_are_done_or_at_its_deadline(
    cfg: LoadedConfig, line: SimulatedLine
) -> None:
    """The cycle's one wait for both links' polls: it ends once the later poll is done;
    with one PLC answering late it ends at its deadline with the other's poll done (the
    late one's data only ages); it leaves no hook behind either way."""
    # The accelerator waits 3 s for an answer: its late poll is still in flight when
    # the wait's deadline comes.
    acc_ep = cfg.endpoint("accelerator").model_copy(
        update={"port": line.acc_port, "timeout_s": 3.0, "stale_after_s": 5.0}
    )
    async with (
        PlcLink("accelerator", acc_ep, cfg.accelerator_map) as acc,
        open_link(cfg, "conveyor", line.cnv_port) as cnv,
    ):
        assert await acc.wait_connected(10.0)
        acc.start_io()
        cnv.start_io()
        await eventually(lambda: acc.configured and cnv.configured)
        for _ in range(5):
            polls = ((acc, acc.request_poll()), (cnv, cnv.request_poll()))
            async with asyncio.timeout(5.0):
                await wait_polls(polls, 5.0)
            assert all(link.poll_done(seq) for link, seq in polls)
        late_s = 2.0
        line.faults.delay("accelerator", late_s, 0.0, 3.0)
        await asyncio.sleep(0.05)  # a poll in flight now waits for a delayed answer
        polls = ((acc, acc.request_poll()), (cnv, cnv.request_poll()))
        async with asyncio.timeout(late_s / 2):  # never waits for the late PLC
            await wait_polls(polls, 0.3)
        assert cnv.poll_done(polls[1][1])
        assert not acc.poll_done(polls[0][1])
        assert acc._poll_hooks == []
        assert cnv._poll_hooks == []
        # A wait that is cancelled leaves no hook either.
        polls = ((acc, acc.request_poll()), (cnv, cnv.request_poll()))
        waiter = asyncio.create_task(wait_polls(polls, 10.0))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        assert acc._poll_hooks == []
        assert cnv._poll_hooks == []
        await acc.stop_io()
        await cnv.stop_io()


async def test_dead_plc_does_not_stall_the_other_link(
    cfg: LoadedConfig, line: SimulatedLine, free_tcp_port: int
) -> None:
    """One PLC that never answers, one that does not exist: the conveyor polls on."""
    period_s = 0.02
    async with (
        open_link(cfg, "accelerator", line.acc_port) as acc,
        open_link(cfg, "conveyor", line.cnv_port) as cnv,
    ):
        await poll_until(acc, lambda s: s.ok)
        await poll_until(cnv, lambda s: s.ok)
        line.faults.delay("accelerator", 5.0, 0.0, 2.0)  # accepts, never answers in time
        stop = asyncio.Event()
        cnv_times: list[float] = []
        acc_polls = 0

        async def loop(link: PlcLink, on_poll: Callable[[Snapshot], Awaitable[None]]) -> None:
            while not stop.is_set():
                await on_poll(await link.poll())
                await asyncio.sleep(period_s)

        async def on_cnv(s: Snapshot) -> None:
            assert s.ok
            cnv_times.append(time.monotonic())

        async def on_acc(s: Snapshot) -> None:
            nonlocal acc_polls
            acc_polls += 1

        tasks = [asyncio.create_task(loop(cnv, on_cnv)), asyncio.create_task(loop(acc, on_acc))]
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
        assert acc.stats.errors["timeout"] >= 1
        gaps = [b - a for a, b in itertools.pairwise(cnv_times)]
        print(f"\nconveyor polls while the accelerator is dead: {len(cnv_times)}, ")
        print(f"max gap {max(gaps):.3f} s")
        assert len(cnv_times) >= 10
        assert max(gaps) < 1.0  # no stall anywhere near the dead PLC's timeouts

    # a PLC that does not exist at all: polls return at once
    async with open_link(cfg, "accelerator", free_tcp_port, connect=False) as dead:
        async with asyncio.timeout(2.0):
            for _ in range(20):
                snap = await dead.poll()
                assert not snap.ok


async def test_writes_posted_faster_than_answered_never_starve_the_polls(
    cfg: LoadedConfig, line: SimulatedLine
) -> None:
    """A PLC that answers every request 30 ms late while the cycle posts a write every
    10 ms: each round sends what was queued when it began, then the poll asked for.
    (It used to write until the queue was empty, which a fast poster never lets happen:
    the polls waited behind the writes and the data aged past stale_after_s.)"""
    async with open_link(cfg, "conveyor", line.cnv_port) as link:
        await poll_until(link, lambda s: s.ok)
        link.start_io()
        fcs: list[int] = []
        link.stats.on_request.append(lambda fc, _latency_s: fcs.append(fc))
        line.faults.delay("conveyor", 0.03, 0.0, 10.0)
        t_end = time.monotonic() + 1.5
        next_poll = 0.0
        while time.monotonic() < t_end:
            link.post({"speed_sp": 1.0, "watchdog": 0})
            if time.monotonic() >= next_poll:  # the cycle asks for a poll every 50 ms
                link.request_poll()
                next_poll = time.monotonic() + 0.05
            await asyncio.sleep(0.01)
        await link.stop_io()
    runs = [len(list(g)) for fc, g in itertools.groupby(fcs) if fc == 16]
    print(f"\n{len(fcs)} requests, writes in a row: {runs}")
    # Each write replaces the unsent one (one command word): one in flight, one queued.
    assert runs, "no write sent"
    assert max(runs) <= 2, f"writes in a row before a poll: {runs}"
    assert fcs.count(4) >= 5, "polls starved"


# --------------------------------------------------------------------------- config only


def _cdab_config(src: Path, dst: Path) -> LoadedConfig:
    shutil.copytree(src, dst)
    path = dst / "registers" / "accelerator.toml"
    lines = []
    for text in path.read_text().splitlines():
        lines.append(text)
        if text.strip() in ('type = "float32"', 'type = "uint32"'):
            lines.append('word_order = "CDAB"')
    path.write_text("\n".join(lines) + "\n")
    return load_config(dst, environ={})


async def test_cdab_word_order_by_configuration_alone(
    cfg: LoadedConfig, config_dir: Path, tmp_path: Path
) -> None:
    cdab = _cdab_config(config_dir, tmp_path / "config")
    rmap = cdab.accelerator_map
    assert rmap.field("energy").word_order == "CDAB"
    assert rmap.field("clock").word_order == "CDAB"
    async with (
        SimulatedLine(cdab, seed=3) as line,
        open_link(cdab, "accelerator", line.acc_port) as link,
    ):
        await link.write("beam_current_sp", 12.5)
        await link.write("energy_sp", 1.75)
        snap = await poll_until(link, lambda s: s.ok)
        assert snap.value("beam_current_sp") == 12.5
        assert snap.value("energy_sp") == 1.75
        # the wire really is CDAB: a raw read differs from the ABCD encoding
        f = rmap.field("energy_sp")
        client = AsyncModbusTcpClient("127.0.0.1", port=line.acc_port, timeout=2.0, retries=0)
        await client.connect()
        try:
            rr = await client.read_holding_registers(f.address, count=2)
        finally:
            client.close()
        assert list(rr.registers) == encode(f, 1.75)
        abcd = cfg.accelerator_map.field("energy_sp")
        assert list(rr.registers) != encode(abcd, 1.75)
        assert decode(abcd, rr.registers) != 1.75
        # 32-bit inputs decode to the plant's values
        read_ms = snap.get("clock").plc_clock_ms
        assert read_ms is not None
        assert 0 <= (line.plant.accelerator.clock_ms - read_ms) % U32 < 5000
        vac = snap.value("vacuum")
        assert isinstance(vac, float)
        assert math.isfinite(vac)
        assert 0 < vac < 1.0


# --------------------------------------------------------------------------- stalls


def test_stall_log_notes_only_wake_ups_later_than_its_threshold() -> None:
    stalls = StallLog(min_stall_s=0.05, max_credit_s=1.0)
    assert stalls.note(due_s=1.0, woke_s=1.04) == 0.0  # jitter, not a stall
    assert stalls.credit_s(0.0, 2.0) == 0.0
    assert stalls.note(due_s=2.0, woke_s=2.3) == pytest.approx(0.3)
    assert stalls.credit_s(0.0, 3.0) == pytest.approx(0.3)


def test_stall_log_credits_the_overlap_with_the_datas_age_at_most_max_credit() -> None:
    stalls = StallLog(min_stall_s=0.05, max_credit_s=0.25)
    stalls.note(1.0, 1.1)
    stalls.note(2.0, 2.2)
    # Only what falls between the read and now counts.
    assert stalls.credit_s(1.05, 1.5) == pytest.approx(0.05)
    assert stalls.credit_s(1.5, 2.1) == pytest.approx(0.1)
    assert stalls.credit_s(1.5, 3.0) == pytest.approx(0.2)
    assert stalls.credit_s(2.5, 3.0) == 0.0
    # Both stalls (0.3 s) are more than max_credit_s.
    assert stalls.credit_s(0.0, 3.0) == pytest.approx(0.25)


def test_a_link_on_its_own_credits_no_stall(cfg: LoadedConfig) -> None:
    link = PlcLink("conveyor", cfg.endpoint("conveyor"), cfg.register_map("conveyor"))
    link.stalls.note(0.0, 100.0)
    assert link.stalls.credit_s(0.0, 100.0) == 0.0


async def test_data_aged_by_a_stall_of_this_process_is_judged_without_it(
    cfg: LoadedConfig, line: SimulatedLine
) -> None:
    """A poll that fails after this process was stalled keeps the last good values STALE
    while their age less the stall is inside the stale window (the PLC was not asked
    meanwhile), never longer than the window plus max_credit_s; live_age_s says the same."""
    now = [0.0]
    async with open_link(cfg, "conveyor", line.cnv_port, clock=lambda: now[0]) as link:
        stale_after = link.endpoint.stale_after_s
        link.stalls = StallLog(min_stall_s=0.05, max_credit_s=stale_after)
        good = await poll_until(link, lambda s: s.ok)
        line.faults.link_loss("conveyor", 1.0)
        await eventually(lambda: not link.connected)
        # Stalled from 0.01 to 1.2 stale windows: the data is 1.3 windows old, 0.3 live.
        link.stalls.note(0.01 * stale_after, 1.2 * stale_after)
        now[0] = 1.3 * stale_after
        snap = await link.poll()
        assert snap.get("tension").quality is Quality.STALE
        assert snap.value("tension") == good.value("tension")
        assert link.live_age_s(good, now[0]) == pytest.approx(0.3 * stale_after)
        # Past the window plus the credit (at most one window): unknown, stall or not.
        now[0] = 2.01 * stale_after
        snap = await link.poll()
        assert snap.get("tension").quality is Quality.COMM_FAIL
        assert link.live_age_s(good, now[0]) >= stale_after
