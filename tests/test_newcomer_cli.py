"""What a newcomer meets first: the demo's arguments, a simulator port in use, a recipe
checked by name, progress past the planned length, and `run | tee` with Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from e2e_scenarios import TRUE_K, compact_config, start_counter, wait_for

from linectl.cli import main
from linectl.client import LineView, reel_progress_text
from linectl.config import load_config
from linectl.telemetry import Topics
from simulators.cli import main as sim_main
from simulators.server import SimulatedLine

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"


@pytest.fixture
def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}


@pytest.fixture(autouse=True)
def _no_linectl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LINECTL_"):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- demo arguments


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--length", "-1"], "--length must be a positive number of metres, not -1"),
        (["--length", "0"], "--length must be a positive number of metres, not 0"),
        (["--length", "nan"], "--length must be a positive number of metres, not nan"),
        (["--length", "inf"], "--length must be a positive number of metres, not inf"),
        (["--arc-rate", "-5"], "--arc-rate must be 0 to 3600 arcs per hour, not -5"),
        (["--arc-rate", "nan"], "--arc-rate must be 0 to 3600 arcs per hour, not nan"),
        (["--metrics-port", "70000"], "--metrics-port must be 0 (any free port) to 65535"),
        (["--broker", "localhost"], "--broker: expected HOST:PORT"),
        (["--broker", "localhost:0"], "--broker: expected HOST:PORT"),
    ],
)
def test_demo_refuses_bad_arguments_before_anything_starts(
    argv: list[str], why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "demo-out"
    t0 = time.monotonic()
    rc = main(["demo", "--config", str(CONFIG_DIR), "--out", str(out_dir), *argv])
    assert rc == 2
    assert time.monotonic() - t0 < 5.0  # no simulator, broker or reel was started
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"linectl: error: {captured.err.strip()[16:]}"]
    assert why in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not out_dir.exists()


def test_demo_refuses_an_out_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "demo-out"
    a_file.write_text("")
    assert main(["demo", "--config", str(CONFIG_DIR), "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"linectl: error: --out {a_file}: exists and is not a directory"


# --------------------------------------------------------------------------- sim port in use


@pytest.mark.parametrize("option", ["--acc-port", "--cnv-port"])
def test_sim_on_a_port_in_use_exits_2_naming_the_port(
    option: str, clean_env: dict[str, str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--acc-port": "0", "--cnv-port": "0", option: str(port)}
        cmd = [sys.executable, "-m", "linectl", "sim", "--config", str(CONFIG_DIR)]
        for name, value in ports.items():
            cmd += [name, value]
        proc = subprocess.run(
            [*cmd, "--duration", "5"],
            capture_output=True,
            text=True,
            env=clean_env,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"port {port} on 127.0.0.1 ({option}) is not free" in lines[0]
    assert "Traceback" not in proc.stderr


def test_sim_refuses_one_port_for_both() -> None:
    port = str(free_port())
    rc = sim_main(["--config", str(CONFIG_DIR), "--acc-port", port, "--cnv-port", port])
    assert rc == 2


# --------------------------------------------------------------------------- recipe by name


def test_recipe_check_takes_a_bare_name_as_run_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipe", "check", "pv-1x6-en50618", "--config", str(CONFIG_DIR)]) == 0
    out = capsys.readouterr().out
    assert f"recipe {CONFIG_DIR / 'recipes' / 'pv-1x6-en50618.toml'}: ok" in out
    assert "max line speed at full current (40 mA): 80 m/min" in out


def test_recipe_check_typo_lists_the_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipe", "check", "pv-1x6-en5618", "--config", str(CONFIG_DIR)]) == 2
    err = capsys.readouterr().err
    assert "recipe 'pv-1x6-en5618': no such file, and no recipe of that name in" in err
    assert "did you mean 'pv-1x6-en50618'? available: pv-1x6-en50618" in err
    assert len(err.strip().splitlines()) == 1


def test_recipe_check_missing_path_says_file_not_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["recipe", "check", str(missing), "--config", str(CONFIG_DIR)]) == 2
    assert f"{missing}: file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- progress text


def test_progress_never_reads_past_100_percent() -> None:
    assert reel_progress_text(25.0, 100.0) == "at 25.0 m (25 %)"
    assert reel_progress_text(100.0, 100.0) == "at 100.0 m (100 %)"
    text = reel_progress_text(199.0, 100.0)
    assert text == "planned length reached, tail clearing the beam: 199.0 m of cable counted"
    assert "%" not in text
    assert reel_progress_text(12.5, None) == "at 12.5 m"
    assert reel_progress_text(12.5, 0.0) == "at 12.5 m"


def test_status_reel_line_past_the_planned_length() -> None:
    view = LineView(Topics.for_line("linectl", "line1"))
    view.state = {"reel": {"reel_id": "R-7", "planned_length_m": 100.0, "started": True}}
    view.live["reel_position_m"] = {"value": 124.0}
    text = view.reel_text()
    assert text == (
        "R-7, 100 m planned, planned length reached, tail clearing the beam: "
        "124.0 m of cable counted"
    )


# --------------------------------------------------------------------------- run | tee, Ctrl-C


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    return compact_config(tmp_path)


@pytest.mark.slow
async def test_a_closed_output_pipe_does_not_stop_the_safe_shutdown(
    cfg_dir: Path, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    """`linectl run 2>&1 | tee log`, Ctrl-C: the shell's SIGINT kills tee as well, so the
    daemon's stdout and stderr are a closed pipe while it ramps down. The safe stop must
    still complete: beam off, line stopped, watchdogs disarmed, no watchdog trip."""
    cfg = load_config(cfg_dir, environ={})
    db = tmp_path / "records.sqlite"
    acc_port, cnv_port = free_port(), free_port()
    env = {
        **clean_env,
        "LINECTL_ACCELERATOR__PORT": str(acc_port),
        "LINECTL_CONVEYOR__PORT": str(cnv_port),
        "LINECTL_METRICS__PORT": "0",
    }
    read_end, write_end = os.pipe()
    async with SimulatedLine(
        cfg, acc_port=acc_port, cnv_port=cnv_port, seed=3, k_dose_true=TRUE_K
    ) as sim:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "linectl", "run", "--config", str(cfg_dir),
            "--reel", "TEE-1", "--length", "200",
            env=env, stdout=write_end, stderr=write_end,
        )  # fmt: skip
        os.close(write_end)
        try:
            await wait_for(lambda: start_counter(db, "TEE-1") is not None, 60.0, "reel start")
            await wait_for(lambda: sim.plant.accelerator.beam_on, 30.0, "beam on")
            os.close(read_end)  # tee is gone: every write of the daemon now fails
            read_end = -1
            proc.send_signal(signal.SIGINT)
            rc = await asyncio.wait_for(proc.wait(), 60.0)
        finally:
            if read_end >= 0:
                os.close(read_end)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        # The daemon did the safe stop itself; only its output was lost (141: pipe closed).
        assert rc in (0, 141), rc
        assert not sim.plant.accelerator.watchdog_trip
        assert not sim.plant.accelerator.beam_on_req
        assert not sim.plant.accelerator.beam_on
        await wait_for(lambda: not sim.plant.conveyor.running, 10.0, "the line stopped")
        assert sim.plant.conveyor.speed_sp_m_min == 0.0
        await asyncio.sleep(1.0)  # a clean exit disarmed the watchdogs: nothing trips
        assert not sim.plant.accelerator.watchdog_trip
        assert not sim.plant.accelerator.fault_latched
        assert not sim.plant.conveyor.fault_latched
        assert not sim.plant.accelerator.hv_on_req
        assert sim.plant.truth.burns == []
