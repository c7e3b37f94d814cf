"""The shipped systemd unit (deploy/systemd/linectl.service) run the way systemd runs it.

systemd is not PID 1 here, so the unit cannot be started by systemd itself. This is the
closest honest proxy (issue 9, "the systemd unit resumes reels"): the unit file is parsed,
and only its install prefixes are rewritten (`/opt/linectl/venv/bin/linectl` to this
Python's linectl, `/etc/linectl` and `/var/lib/linectl` to temporary directories). Every
other argument of ExecStartPre= and ExecStart= is run exactly as written, with the unit's
Environment= and EnvironmentFile=, in its WorkingDirectory= and with its UMask=; Restart=,
RestartSec=, KillSignal= and TimeoutStopSec= decide what the test does when the daemon
dies or is stopped. What the proxy does not emulate: User=/Group= (the test runs as
whoever runs it), the sandboxing settings and the start limit (tests/test_deploy.py checks
those statically, `systemd-analyze verify` checks the whole unit, below, and
tests/test_systemd_real.py runs it under a real systemd in a container).

The line is the compact simulated line of the end-to-end tests (tests/e2e_scenarios.py),
served in-process, so every recorded metre is checked against the simulator's ground
truth: no metre lost or doubled, none recorded in spec whose true dose is outside the
recipe's limits, no beam on a standing cable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from e2e_scenarios import (
    TRUE_K,
    check_against_truth,
    compact_config,
    count_metres,
    read_only,
    start_counter,
    wait_for,
)

from linectl.config import load_config
from linectl.core.ledger import Verdict
from linectl.store import RecordStore
from simulators.server import SimulatedLine

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "linectl.service"

# What the example unit assumes of the host (its header), replaced here.
INSTALLED_LINECTL = "/opt/linectl/venv/bin/linectl"
CONFIG_PREFIX = "/etc/linectl"
STATE_PREFIX = "/var/lib/linectl"

# systemd's PATH for services (systemd.exec(5), "Environment variables in spawned
# processes"); a service gets no other variable of the manager's own environment.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"

# Signals after which systemd counts a stop as clean (systemd.service(5), Restart=).
CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}

# [Service] settings that would change how the daemon is started, stopped or restarted,
# and that this proxy does not emulate: a unit that starts using one fails the tests
# below until the proxy learns it.
NOT_EMULATED = {
    "ExecCondition",
    "ExecStartPost",
    "ExecStop",
    "ExecStopPost",
    "SuccessExitStatus",
    "RestartPreventExitStatus",
    "RestartForceExitStatus",
    "PIDFile",
    "BusName",
}

REEL = "UNIT-1"
LENGTH_M = 14


# --------------------------------------------------------------------------- the unit


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file, each key with every value it was given, in order.

    A key may repeat (Environment=, ExecStartPre=): configparser would keep only one. A
    line that ends in a backslash goes on on the next one; an empty assignment resets the
    key's list, as it does for systemd's list settings.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None, f"key outside a section: {line}"
        assert sep, f"not KEY=VALUE: {line}"
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def parse_duration_s(value: str) -> float:
    """A systemd time span (`2s`, `1min 30s`, `500ms`, a bare number of seconds)."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    for number, unit in parts:
        assert unit in units, f"time unit {unit!r} in {value!r}"
        total += float(number) * units[unit]
    return total


def restarts(policy: str, returncode: int) -> bool:
    """Whether systemd restarts a service whose main process ended so (systemd.service(5),
    the table under Restart=); `returncode` as subprocess gives it (-N: killed by N)."""
    clean = returncode == 0 or (returncode < 0 and signal.Signals(-returncode) in CLEAN_SIGNALS)
    by_signal = returncode < 0 and not clean
    return {
        "no": False,
        "always": True,
        "on-success": clean,
        "on-failure": not clean,
        "on-abnormal": by_signal,
        "on-abort": by_signal,
        "on-watchdog": False,
    }[policy]


def linectl_command() -> list[str]:
    """linectl as installed beside the running Python (its console script), else
    `python -m linectl`: what replaces the unit's /opt/linectl/venv/bin/linectl."""
    script = Path(sys.executable).with_name("linectl")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "linectl"]


def read_environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile= (comments and blank lines skipped)."""
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


@dataclass(frozen=True)
class Service:
    """The [Service] settings this proxy runs the daemon by, paths already rewritten."""

    environment: dict[str, str]  # Environment= lines
    environment_files: list[tuple[Path, bool]]  # EnvironmentFile=: (path, optional)
    exec_start_pre: list[list[str]]
    exec_start: list[str]
    working_directory: Path
    umask: int
    restart: str
    restart_s: float
    kill_signal: signal.Signals
    timeout_stop_s: float

    def env(self) -> dict[str, str]:
        """The process environment systemd gives the service at a start: its PATH, then
        Environment=, then EnvironmentFile= (read at each start; it overrides)."""
        env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", **self.environment}
        for path, optional in self.environment_files:
            if path.exists() or not optional:
                env.update(read_environment_file(path))
        # Not systemd's: lets a checkout run without an installed package.
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env


def one_of(svc: dict[str, list[str]], key: str, default: str) -> str:
    """The setting's last value (the one systemd uses), else systemd's default."""
    return svc[key][-1] if svc.get(key) else default


def _command(value: str, what: str) -> list[str]:
    """One Exec*= command line, split as systemd splits it. Prefixes and $VAR or %
    specifiers are not emulated here: a unit that starts using them fails this test
    until the proxy learns them (rather than running something else than systemd would)."""
    assert not value.startswith(("-", "@", ":", "+", "!", "|")), (
        f"{what}: prefix {value[0]!r} is not emulated by this test (and '-' on "
        "ExecStartPre would let the daemon start on a configuration that fails its check)"
    )
    argv = shlex.split(value)
    assert not any("$" in a or "%" in a for a in argv), f"{what}: $VAR/%-specifier: {value}"
    assert argv[0] == INSTALLED_LINECTL, f"{what}: runs {argv[0]}, not {INSTALLED_LINECTL}"
    return [*linectl_command(), *argv[1:]]


def load_service(etc: Path, state: Path) -> Service:
    """The shipped unit with /etc/linectl as `etc` and /var/lib/linectl as `state`."""
    text = UNIT.read_text(encoding="utf-8")
    text = text.replace(CONFIG_PREFIX, str(etc)).replace(STATE_PREFIX, str(state))
    svc = parse_unit(text)["Service"]
    assert not NOT_EMULATED & svc.keys(), f"not emulated here: {NOT_EMULATED & svc.keys()}"
    assert one_of(svc, "Type", "simple") in ("simple", "exec"), "only a plain main process"

    def one(key: str) -> str:
        assert svc.get(key), f"[Service] has no {key}="
        return svc[key][-1]

    environment: dict[str, str] = {}
    for line in svc.get("Environment", []):
        for assignment in shlex.split(line):
            key, sep, value = assignment.partition("=")
            assert sep, f"Environment={line}: not KEY=VALUE"
            environment[key] = value
    files = [(Path(v.removeprefix("-")), v.startswith("-")) for v in svc.get("EnvironmentFile", [])]
    assert len(svc.get("ExecStart", [])) == 1, "Type=exec takes exactly one ExecStart="
    return Service(
        environment=environment,
        environment_files=files,
        exec_start_pre=[_command(v, "ExecStartPre") for v in svc.get("ExecStartPre", [])],
        exec_start=_command(one("ExecStart"), "ExecStart"),
        working_directory=Path(one("WorkingDirectory")),
        umask=int(one_of(svc, "UMask", "0022"), 8),
        restart=one_of(svc, "Restart", "no"),
        restart_s=parse_duration_s(one_of(svc, "RestartSec", "100ms")),
        kill_signal=signal.Signals[one_of(svc, "KillSignal", "SIGTERM")],
        timeout_stop_s=parse_duration_s(one_of(svc, "TimeoutStopSec", "90s")),
    )


# --------------------------------------------------------------------------- the host


@dataclass
class Host:
    """A plant host as the unit's header describes it, in a temporary directory: the
    configuration in `etc` with the per-host settings in its linectl.env, the state
    directory systemd creates for StateDirectory=, and the simulated PLCs' ports."""

    etc: Path
    state: Path
    acc_port: int
    cnv_port: int
    logs: Path
    starts: int = 0

    @classmethod
    def make(cls, tmp_path: Path) -> Host:
        etc = compact_config(tmp_path)  # the reference configuration, a compact line
        state = tmp_path / "state"
        state.mkdir(mode=0o750)  # StateDirectory=linectl, StateDirectoryMode=0750
        host = cls(etc, state, free_port(), free_port(), tmp_path / "journal")
        host.logs.mkdir()
        # Per-host settings, where the unit reads them (EnvironmentFile=).
        (etc / "linectl.env").write_text(
            "# the simulated PLCs' ports on this host\n"
            f"LINECTL_ACCELERATOR__PORT={host.acc_port}\n"
            f"LINECTL_CONVEYOR__PORT={host.cnv_port}\n"
            "LINECTL_METRICS__PORT=0\n"
        )
        return host

    def log(self, name: str) -> Path:
        self.starts += 1
        return self.logs / f"{self.starts:02d}-{name}.log"


def journal(path: Path, tail: int = 4000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-tail:]


@contextlib.asynccontextmanager
async def spawn(
    svc: Service, argv: list[str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A process of the service as systemd spawns it (its environment, working directory
    and umask; stdout and stderr to the journal, here a file); killed if still running
    when the block ends."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=svc.env(),
            cwd=svc.working_directory,
            umask=svc.umask,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def exec_start_pre(svc: Service, host: Host) -> None:
    """Every ExecStartPre= as written; systemd starts the daemon only if each exits 0."""
    for argv in svc.exec_start_pre:
        log = host.log("exec-start-pre")
        async with spawn(svc, argv, log) as proc:
            rc = await asyncio.wait_for(proc.wait(), 60.0)
        assert rc == 0, f"ExecStartPre {shlex.join(argv)} exited {rc}: {journal(log)}"


async def crash(proc: asyncio.subprocess.Process, sim: SimulatedLine) -> int:
    """SIGKILL mid-reel; the exit code, once the accelerator PLC's own watchdog has
    switched the beam off (within its 0.5 s timeout; the line may still be stopping)."""
    proc.send_signal(signal.SIGKILL)
    rc = await asyncio.wait_for(proc.wait(), 5.0)
    await wait_for(lambda: not sim.plant.accelerator.beam_on, 2.0, "PLC watchdog: beam off")
    return rc


async def stop(svc: Service, proc: asyncio.subprocess.Process) -> tuple[int, float]:
    """`systemctl stop`: KillSignal= to the main process, then TimeoutStopSec= before
    systemd would send SIGKILL. The exit code and how long the stop took."""
    t0 = time.monotonic()
    proc.send_signal(svc.kill_signal)
    try:
        rc = await asyncio.wait_for(proc.wait(), svc.timeout_stop_s)
    except TimeoutError:
        raise AssertionError(f"no exit within TimeoutStopSec={svc.timeout_stop_s} s") from None
    return rc, time.monotonic() - t0


def reel_state(db: Path, reel: str) -> str | None:
    row = read_only(db, "SELECT state FROM reels WHERE reel_id = ?", reel)
    return None if row is None else str(row[0])


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host.make(tmp_path)


# --------------------------------------------------------------------------- tests


def test_the_proxy_runs_the_unit_as_written(host: Host) -> None:
    """The rewrite touches the install prefixes only: the daemon is `run --resume` on the
    unit's configuration, and the records are where the unit's environment puts them,
    inside its state directory (the only writable path under ProtectSystem=strict)."""
    svc = load_service(host.etc, host.state)
    unit = parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]
    written = shlex.split(unit["ExecStart"][-1])
    assert svc.exec_start[len(linectl_command()) :] == [
        a.replace(CONFIG_PREFIX, str(host.etc)) for a in written[1:]
    ]
    assert "--resume" in svc.exec_start
    assert svc.restart == "on-failure"
    assert restarts(svc.restart, -signal.SIGKILL), "a crash must be restarted"
    assert not restarts(svc.restart, 0), "a clean stop must not be"
    assert not restarts(svc.restart, -signal.SIGTERM)
    env = svc.env()
    assert Path(env["LINECTL_CONFIG_DIR"]) == host.etc
    records = Path(env["LINECTL_RECORDS__PATH"])
    assert host.state in records.parents
    assert svc.working_directory == host.state
    assert env["LINECTL_ACCELERATOR__PORT"] == str(host.acc_port)  # the EnvironmentFile


async def operator_run(svc: Service, host: Host, sim: SimulatedLine, db: Path) -> None:
    """The reel, started by an operator's `linectl run --reel` on this host's
    configuration and records (as the unit's environment gives them); that run crashes
    (SIGKILL) once it has recorded a metre."""
    argv = [*linectl_command(), "run", "--config", str(host.etc), "--reel", REEL]
    log = host.log("operator-run")
    async with spawn(svc, [*argv, "--length", str(LENGTH_M), "--operator", "pytest"], log) as run:
        try:
            await wait_for(lambda: start_counter(db, REEL) is not None, 30.0, "reel start")
            counter = start_counter(db, REEL)
            assert counter is not None
            sim.plant.start_reel(counter)  # the reel's metre 0 for the ground truth
            await wait_for(lambda: count_metres(db, REEL) >= 1, 30.0, "a metre")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {journal(log)}") from None
        assert await crash(run, sim) == -signal.SIGKILL


async def taken_up(sim: SimulatedLine, db: Path, metres: int, log: Path) -> None:
    """Wait until the daemon runs the reel again (beam on: nobody else switches it on,
    and it was off when the daemon started) and has recorded `metres` more of it since
    (a resume after a crash records the metres that passed meanwhile at once: those do
    not count)."""
    try:
        await wait_for(lambda: sim.plant.accelerator.beam_on, 30.0, "beam on")
        goal = count_metres(db, REEL) + metres
        await wait_for(lambda: count_metres(db, REEL) >= goal, 30.0, f"{metres} metres more")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {journal(log)}") from None


@pytest.mark.timeout(120)
async def test_unit_takes_up_the_interrupted_reel_after_a_crash_and_a_stop(host: Host) -> None:
    """A reel interrupted by a crash; the unit started as systemd starts it (each
    ExecStartPre= must exit 0, then ExecStart= as written) takes it up. A stop on
    KillSignal= mid-reel: exit 0 within TimeoutStopSec=, the line made safe by the daemon
    itself, no restart. Started again, then SIGKILL mid-reel (a crash): Restart= restarts
    it after RestartSec=, and it takes the reel up again and runs it to its end. The
    records: the reel closed, every metre recorded once, no false accept against the
    simulator's ground truth. Finally KillSignal= stops the idle daemon with exit 0."""
    svc = load_service(host.etc, host.state)
    db = Path(svc.env()["LINECTL_RECORDS__PATH"])
    cfg = load_config(host.etc, environ={})
    async with SimulatedLine(
        cfg, acc_port=host.acc_port, cnv_port=host.cnv_port, seed=9, k_dose_true=TRUE_K
    ) as sim:
        # The simulated HV comes up in 0.5 s, not the reference machine's 2 s: each of the
        # four starts below waits for it (the controller does not model it, only waits).
        sim.plant.accelerator.p.hv_rise_s = 0.5
        await operator_run(svc, host, sim, db)

        # systemctl start linectl: the crashed reel taken up (the PLC watchdog trips of
        # the crash reset by the daemon itself: the unit gives no --reset-faults).
        await exec_start_pre(svc, host)
        log = host.log("exec-start")
        async with spawn(svc, svc.exec_start, log) as daemon:
            await taken_up(sim, db, 2, log)
            assert sim.plant.accelerator.beam_on, journal(log)
            # systemctl stop linectl, mid-reel.
            rc, took = await stop(svc, daemon)
        text = journal(log, 100_000)
        assert rc == 0, f"exit {rc} on {svc.kill_signal.name}: {journal(log)}"
        assert not restarts(svc.restart, rc), f"Restart={svc.restart} restarts a clean stop"
        assert f"interrupted reel {REEL}" in text
        assert "resumed from its checkpoint" in text
        # The daemon made the line safe itself: no PLC watchdog had to.
        assert not sim.plant.accelerator.beam_on
        assert not sim.plant.accelerator.watchdog_trip
        assert reel_state(db, REEL) == "open"

        # systemctl start linectl; the daemon crashes mid-reel.
        await exec_start_pre(svc, host)
        log = host.log("exec-start")
        async with spawn(svc, svc.exec_start, log) as daemon:
            await taken_up(sim, db, 2, log)
            crashed = time.monotonic()
            rc = await crash(daemon, sim)
        assert "resumed from its checkpoint" in journal(log, 100_000)
        assert reel_state(db, REEL) == "open"

        # Restart=on-failure, after RestartSec=: the reel taken up and run to its end.
        assert restarts(svc.restart, rc), f"Restart={svc.restart} does not restart exit {rc}"
        await asyncio.sleep(max(0.0, crashed + svc.restart_s - time.monotonic()))
        await exec_start_pre(svc, host)
        log = host.log("exec-start-restarted")
        async with spawn(svc, svc.exec_start, log) as daemon:
            try:
                await wait_for(lambda: reel_state(db, REEL) == "closed", 60.0, "reel closed")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}: {journal(log)}") from None
            # Done, it waits for commands; systemctl stop linectl.
            assert daemon.returncode is None, journal(log)
            rc, _ = await stop(svc, daemon)
        assert rc == 0, f"exit {rc} on {svc.kill_signal.name}: {journal(log)}"
        assert "resumed from its checkpoint" in journal(log, 100_000)

        # The records where the unit's environment puts them, made under its UMask=.
        assert host.state in db.parents
        mode = os.stat(db).st_mode & 0o777
        assert mode & svc.umask == 0, oct(mode)
        with RecordStore(db) as store:
            metres = store.metres(REEL)
            assert store.integrity_check() == "ok"
        counts = check_against_truth(metres, sim, cfg, LENGTH_M)
    # The stops and crashes left the metres then under the beam short of dose or
    # unproven (bounded by the PLCs' counters); the restarted daemon ran the reel's end
    # at speed, in spec.
    assert [m.verdict for m in metres[-2:]] == [Verdict.IN_SPEC] * 2, (counts, metres[-2:])
    print(f"verdicts {counts}; stop mid-reel on {svc.kill_signal.name} took {took:.1f} s")


@pytest.mark.timeout(60)
async def test_unit_on_a_fresh_host_waits_for_commands(host: Host) -> None:
    """`--resume` with no reel to resume (a new installation): the daemon starts, makes
    its records inside the state directory (StateDirectory= makes only the directory
    itself), brings the line to READY and waits for commands; it must not exit, or
    Restart=on-failure would loop until the start limit. KillSignal= stops it, exit 0."""
    svc = load_service(host.etc, host.state)
    db = Path(svc.env()["LINECTL_RECORDS__PATH"])
    cfg = load_config(host.etc, environ={})
    async with SimulatedLine(cfg, acc_port=host.acc_port, cnv_port=host.cnv_port, seed=3):
        await exec_start_pre(svc, host)
        log = host.log("exec-start")
        async with spawn(svc, svc.exec_start, log) as daemon:
            try:
                await wait_for(lambda: "-> ready" in journal(log), 30.0, "READY")
                await asyncio.sleep(1.0)
            except TimeoutError as exc:
                raise AssertionError(f"{exc}: {journal(log)}") from None
            assert daemon.returncode is None, journal(log)
            rc, _ = await stop(svc, daemon)
        assert rc == 0, f"exit {rc} on {svc.kill_signal.name}: {journal(log)}"
    assert host.state in db.parents
    assert read_only(db, "SELECT COUNT(*) FROM reels") == (0,)


def test_systemd_analyze_verifies_the_unit_the_proxy_runs(host: Host, tmp_path: Path) -> None:
    """`systemd-analyze verify` on the unit with the same prefixes rewritten as the tests
    above run it (the ExecStart binary must exist): no error and no warning."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    linectl = linectl_command()
    if len(linectl) != 1:
        pytest.skip("no linectl console script beside this Python for ExecStart= to name")
    text = UNIT.read_text(encoding="utf-8")
    text = text.replace(INSTALLED_LINECTL, linectl[0])
    text = text.replace(CONFIG_PREFIX, str(host.etc)).replace(STATE_PREFIX, str(host.state))
    path = tmp_path / "linectl.service"
    path.write_text(text, encoding="utf-8")
    try:
        result = subprocess.run(
            [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip("systemd-analyze verify did not finish in 60 s (no systemd to ask?)")
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and "Failed to" in output and "linectl.service" not in output:
        pytest.skip(f"systemd-analyze cannot run here: {output}")
    assert result.returncode == 0, output
    # Unknown keys and bad values are only warnings (exit 0): any output is a fault.
    assert output == "", output
