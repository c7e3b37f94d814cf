"""A PLC that answers but refuses a setting written at connect (its watchdog timeout,
the ramp): it cannot be run as configured. The link says so loudly, keeps its heartbeat
and the safe state's writes going, and the line service treats the PLC as lost, so the
line never starts on it (before, the link stayed "unconfigured" silently: fresh data,
no command ever written)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from linectl.config import LoadedConfig, load_config
from linectl.core.control import LineState
from linectl.errors import ConfigError
from linectl.modbus.link import PlcLink
from linectl.service import LineService, select_recipe
from simulators.server import SimulatedLine


async def eventually(cond: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    t_end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > t_end:
            pytest.fail(f"not within {deadline_s} s: {what}")
        await asyncio.sleep(0.02)


async def test_a_refused_setting_is_loud_and_the_safe_writes_still_go_out(
    cfg: LoadedConfig, line: SimulatedLine, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = cfg.endpoint("conveyor").model_copy(update={"port": line.cnv_port})
    async with PlcLink("conveyor", endpoint, cfg.conveyor_map) as link:
        # The map allows 1..120 m/min/s; the PLC refuses 0.5 (exception 3).
        link.start_io(on_connect={"watchdog_timeout": 500, "ramp_rate": 0.5})
        await eventually(lambda: link.settings_refused is not None, "the refusal")
        assert "ramp_rate" in (link.settings_refused or "")
        assert any(
            r.levelno == logging.ERROR and "treated as lost" in r.getMessage()
            for r in caplog.records
        )
        # The writes posted (the safe state's) still reach the PLC.
        seen = set()
        for i in range(20):
            link.post({"speed_sp": float(i)})
            seq = link.request_poll()
            await link.wait_poll(seq, 1.0)
            if link.latest is not None and link.latest.value("speed_sp") is not None:
                seen.add(link.latest.value("speed_sp"))
            await asyncio.sleep(0.05)
        assert len(seen - {0.0}) > 1, f"posted writes not written: {seen}"
        assert link.configured
        await link.stop_io()


async def test_the_service_never_runs_a_plc_that_refused_its_settings(
    cfg: LoadedConfig, line: SimulatedLine, tmp_path: Path
) -> None:
    recipe, path = select_recipe(cfg, None)
    tuning = cfg.line.control.model_copy(update={"line_ramp_m_min_s": 0.5})
    svc = LineService(
        cfg,
        recipe,
        path,
        store_path=tmp_path / "r.sqlite",
        acc_endpoint=cfg.line.accelerator.model_copy(update={"port": line.acc_port}),
        cnv_endpoint=cfg.line.conveyor.model_copy(update={"port": line.cnv_port}),
        tuning=tuning,
    )
    run = asyncio.create_task(svc.run())
    try:
        await eventually(lambda: svc.cnv.settings_refused is not None, "the refusal")
        await asyncio.sleep(1.0)
        assert svc.ctl.state is LineState.OFFLINE
        assert svc.acc.settings_refused is None
    finally:
        svc.stop()
        await asyncio.wait_for(run, 30.0)


def test_config_refuses_settings_outside_the_maps(cfg: LoadedConfig, tmp_path: Path) -> None:
    work = tmp_path / "config"
    shutil.copytree(cfg.directory, work)
    line_toml = work / "line.toml"
    text = line_toml.read_text()
    assert "line_ramp_m_min_s" in text
    line_toml.write_text(
        "\n".join(
            "line_ramp_m_min_s = 0.5" if ln.strip().startswith("line_ramp_m_min_s") else ln
            for ln in text.splitlines()
        )
        + "\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(work, environ={})
    assert "line_ramp_m_min_s = 0.5 is outside the conveyor map's ramp_rate range" in str(
        info.value
    )
    # Both files are named: the setting or the map may be the one that is wrong (found by
    # tests/test_fuzz.py: a map whose range was 0..0 got an error naming line.toml only).
    assert str(line_toml) in str(info.value)
    assert "registers/conveyor.toml" in str(info.value)
