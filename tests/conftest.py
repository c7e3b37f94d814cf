"""Shared fixtures: free ports, the default configuration, a running simulated line."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from linectl.config import LoadedConfig, load_config

if TYPE_CHECKING:
    from simulators.server import SimulatedLine

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_tcp_port() -> int:
    """A free port on 127.0.0.1."""
    return free_port()


@pytest.fixture
def config_dir() -> Path:
    """The bundled configuration directory (do not modify: copy it to tmp_path first)."""
    return CONFIG_DIR


@pytest.fixture
def cfg() -> LoadedConfig:
    """The bundled default configuration (config/), environment overrides ignored."""
    return load_config(CONFIG_DIR, environ={})


@pytest.fixture
async def line(cfg: LoadedConfig) -> AsyncIterator[SimulatedLine]:
    """Both simulated PLCs serving the default maps on free ports."""
    from simulators.server import SimulatedLine

    async with SimulatedLine(cfg, seed=1) as sim:
        yield sim


def load_bench(name: str) -> ModuleType:
    """A bench/ script as a module (the smoke tests call its main())."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", root / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Run:
    """What a `linectl` subprocess did."""

    rc: int
    out: str
    err: str


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `linectl` subprocess: the developer's own LINECTL_* settings
    must not change what the tests see."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}
    env.update(extra)
    return env


async def cli(*args: str, env: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> Run:
    """`python -m linectl ARGS`, stdout and stderr piped, stdin not a terminal."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "linectl",
        *args,
        cwd=ROOT,
        env=dict(env or cli_env()),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())
