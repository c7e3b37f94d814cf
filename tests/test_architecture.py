"""The import contracts in pyproject.toml fail when they are broken.

A contract that stays kept whatever the code does checks nothing. Each case copies the
package (linectl/, simulators/ and pyproject.toml) to a temporary directory, adds one
import that breaks a contract, runs lint-imports on the copy and checks that it fails and
names the contract and the import. The unmodified copy must keep every contract, and every
contract in pyproject.toml must be broken by at least one case here.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("linectl", "simulators")

LAYERS = "Layers: adapters and the CLI above the pure core"
INDEPENDENT = "The Modbus link and the control core are independent"
CORE = "The control core is pure: no I/O, clock, thread or randomness"
PROTOCOL = (
    "Telemetry, commands, the HMI's feed and the historian's tracker are pure: "
    "no I/O, clock, thread or randomness"
)
CODEC = "Codec, quality, errors and the dose law are pure: no I/O, clock, thread or randomness"
CONFIG = "Config reads files only: no network, clock, thread or randomness"
NODE = "The Sparkplug node is pure: no I/O, clock, thread or randomness"
CLIENT = "The CLI's clients know the protocol, not the daemon"
PYMODBUS = "Only linectl.modbus imports pymodbus"
MQTT = "Only the MQTT adapters and the MQTT client import aiomqtt and paho"
AIOHTTP = "Only the HMI server and the CLI's HTTP client import aiohttp"
PSYCOPG = "Only the historian's database modules import psycopg"
IMPORTLIB = "No importlib in linectl: every import is visible to the contracts"
SIM_LOADERS = "Only the CLI and the demo import the simulators"
SIM_PHYSICS = "Simulators never import the controller's physics, links or CLI"
SIM_ONLY = "Simulators import only linectl.config, linectl.codec and linectl.errors"

_RESULT = re.compile(r"^(?P<name>.+?) (?P<verdict>KEPT|BROKEN)(?: \(\d+ ignored imports?\))?$")


@dataclass(frozen=True)
class Case:
    edit: str  # "path: line": the line is appended to the module (created if missing)
    broken: frozenset[str]  # contracts that must break
    shows: str  # the offending import as lint-imports reports it

    @property
    def id(self) -> str:
        return self.edit


def _case(edit: str, broken: set[str], shows: str) -> Case:
    return Case(edit, frozenset(broken), shows)


CASES = [
    # The cases of the issue: each kept all 11 contracts before.
    _case("linectl/core/ledger.py: import threading", {CORE}, "linectl.core.ledger -> threading"),
    _case(
        "linectl/core/ledger.py: from linectl import aio",
        {CORE},
        "linectl.core.ledger -> linectl.aio",
    ),
    _case(
        "linectl/sparkplug/adapter.py: import pymodbus",
        {PYMODBUS},
        "linectl.sparkplug.adapter -> pymodbus",
    ),
    _case("linectl/core/control.py: import random", {CORE}, "linectl.core.control -> random"),
    _case("linectl/report.py: import aiomqtt", {MQTT}, "linectl.report -> aiomqtt"),
    # New modules are covered without editing the contracts.
    _case(
        "linectl/newmodule.py: import pymodbus", {PYMODBUS, LAYERS}, "linectl.newmodule -> pymodbus"
    ),
    _case("linectl/newmodule.py: import math", {LAYERS}, "- linectl.newmodule"),
    _case("linectl/core/clock.py: import time", {CORE}, "linectl.core.clock -> time"),
    # A submodule of an external package counts as the package.
    _case(
        "linectl/core/align.py: from concurrent.futures import ThreadPoolExecutor",
        {CORE},
        "linectl.core.align -> concurrent",
    ),
    _case("linectl/core/views.py: import datetime", {CORE}, "linectl.core.views -> datetime"),
    _case("linectl/telemetry.py: import time", {PROTOCOL}, "linectl.telemetry -> time"),
    _case("linectl/commands.py: import secrets", {PROTOCOL}, "linectl.commands -> secrets"),
    _case("linectl/codec.py: import socket", {CODEC}, "linectl.codec -> socket"),
    _case("linectl/quality.py: from linectl import aio", {CODEC}, "linectl.quality -> linectl.aio"),
    _case("linectl/config.py: import threading", {CONFIG}, "linectl.config -> threading"),
    _case("linectl/sparkplug/node.py: import asyncio", {NODE}, "linectl.sparkplug.node -> asyncio"),
    _case(
        "linectl/sparkplug/node.py: from linectl.sparkplug import adapter",
        {NODE},
        "linectl.sparkplug.node -> linectl.sparkplug.adapter",
    ),
    _case("linectl/metrics.py: import paho.mqtt.client", {MQTT}, "linectl.metrics -> paho"),
    _case("linectl/store.py: import importlib", {IMPORTLIB}, "linectl.store -> importlib"),
    _case("linectl/report.py: import aiohttp", {AIOHTTP}, "linectl.report -> aiohttp"),
    _case("linectl/store.py: import psycopg", {PSYCOPG}, "linectl.store -> psycopg"),
    _case(
        "linectl/historian/tracker.py: import time",
        {PROTOCOL},
        "linectl.historian.tracker -> time",
    ),
    _case(
        "linectl/store.py: from linectl.historian import pg",
        {LAYERS},
        "linectl.store -> linectl.historian.pg",
    ),
    _case("linectl/web/feed.py: import asyncio", {PROTOCOL}, "linectl.web.feed -> asyncio"),
    _case(
        "linectl/webclient.py: from linectl.web import server",
        {CLIENT},
        "linectl.webclient -> linectl.web.server",
    ),
    _case(
        "linectl/service.py: import simulators.server",
        {SIM_LOADERS},
        "linectl.service -> simulators.server",
    ),
    _case(
        "linectl/core/views.py: from linectl import store",
        {LAYERS},
        "linectl.core.views -> linectl.store",
    ),
    _case(
        "linectl/core/ledger.py: from linectl.modbus import plan",
        {LAYERS, INDEPENDENT},
        "linectl.core.ledger -> linectl.modbus.plan",
    ),
    _case(
        "linectl/client.py: from linectl import service",
        {CLIENT},
        "linectl.client -> linectl.service",
    ),
    _case(
        "simulators/physics.py: import linectl.core.ledger",
        {SIM_PHYSICS, SIM_ONLY},
        "simulators.physics -> linectl.core.ledger",
    ),
    _case(
        "simulators/plant.py: from linectl import quality",
        {SIM_ONLY},
        "simulators.plant -> linectl.quality",
    ),
]


def _lint_imports() -> list[str]:
    script = Path(sys.executable).with_name("lint-imports")
    found = str(script) if script.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.skip("lint-imports is not installed")
    return [found]


def _copy_project(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    # The whole file: [tool.importlinter] is read from it as lint-imports reads ours.
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _run(root: Path) -> tuple[int, str, dict[str, str]]:
    """lint-imports on the copy at root: exit code, output and each contract's verdict."""
    env = {
        **os.environ,
        # The copy, never the installed (editable) linectl, is what gets analysed.
        "PYTHONPATH": str(root),
        # Long contract names on one line, whatever the terminal.
        "COLUMNS": "250",
        "NO_COLOR": "1",
    }
    proc = subprocess.run(
        # Run in the copy, lint-imports reads the copy's pyproject.toml (no --config:
        # deprecated in import-linter 2.17, and a positional file is new there).
        [*_lint_imports(), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    verdicts: dict[str, str] = {}
    for line in output.splitlines():
        match = _RESULT.match(line.strip())
        if match:
            verdicts[match["name"]] = match["verdict"]
    return proc.returncode, output, verdicts


def _contract_names() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        config = tomllib.load(f)
    return [c["name"] for c in config["tool"]["importlinter"]["contracts"]]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each contract's verdict on an unmodified copy of the working tree."""
    code, output, verdicts = _run(_copy_project(tmp_path_factory.mktemp("baseline")))
    assert verdicts, output
    assert code == 0 or "BROKEN" in verdicts.values(), output
    return verdicts


def test_unmodified_copy_keeps_every_contract(baseline: dict[str, str]) -> None:
    names = _contract_names()
    assert sorted(baseline) == sorted(names)
    broken = sorted(name for name, verdict in baseline.items() if verdict != "KEPT")
    assert broken == [], f"broken in the working tree before any change: {broken}"


def test_every_contract_is_broken_by_a_case() -> None:
    names = set(_contract_names())
    named = set().union(*(case.broken for case in CASES))
    assert named <= names, f"cases name contracts that do not exist: {sorted(named - names)}"
    assert names <= named, f"no case shows these contracts can fail: {sorted(names - named)}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_contract_fails_when_broken(case: Case, tmp_path: Path, baseline: dict[str, str]) -> None:
    root = _copy_project(tmp_path)
    path, line = case.edit.split(": ", 1)
    target = root / path
    text = target.read_text(encoding="utf-8") if target.exists() else ""
    target.write_text(f"{text}\n{line}\n", encoding="utf-8")

    code, output, verdicts = _run(root)

    assert code != 0, output
    broken = {name for name, verdict in verdicts.items() if verdict == "BROKEN"}
    assert case.broken <= broken, output
    # Nothing else breaks than what the change breaks (or what was broken before it).
    already = {name for name, verdict in baseline.items() if verdict == "BROKEN"}
    assert broken - already <= case.broken, output
    assert case.shows in output, output


def test_no_import_hidden_in_a_call() -> None:
    """`__import__("x")` is invisible to import-linter (importlib is a contract)."""
    calls = []
    for path in sorted((ROOT / "linectl").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        calls += [
            f"{path.relative_to(ROOT)}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"__import__", "exec", "eval"}
        ]
    assert calls == []
