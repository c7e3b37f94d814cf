"""`linectl sim` / `python -m simulators`: run both simulated PLCs until SIGINT/SIGTERM.

Faults are scheduled on the command line as KIND[:PLC][:ARG]@T_S (T_S seconds after
start); see docs/simulators.md for the list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from linectl.config import PlcName, default_config_dir, load_config
from linectl.errors import ConfigError, LocalError
from simulators.server import DROP_MODES, SimulatedLine

log = logging.getLogger("simulators")

_PLCS: dict[str, PlcName] = {
    "accelerator": "accelerator",
    "acc": "accelerator",
    "conveyor": "conveyor",
    "cnv": "conveyor",
}
# kind -> (needs a PLC, number of numeric arguments (min, max))
_KINDS: dict[str, tuple[bool, int, int]] = {
    "arc": (False, 0, 1),  # arc[:DURATION_S]
    "random_arcs": (False, 1, 1),  # random_arcs:RATE_PER_H
    "latch": (True, 1, 1),  # latch:PLC:CODE
    "estop": (False, 0, 0),
    "cable_break": (False, 0, 0),
    "drive_fault": (False, 0, 0),
    "safety_open": (False, 0, 0),
    "safety_close": (False, 0, 0),
    "link_loss": (True, 1, 1),  # link_loss:PLC:DURATION_S
    "restart": (True, 0, 1),  # restart:PLC[:DOWN_S]
    "exceptions": (True, 2, 2),  # exceptions:PLC:CODE,DURATION_S
    "delay": (True, 3, 3),  # delay:PLC:MEAN_S,JITTER_S,DURATION_S
    "silent": (True, 1, 1),  # silent:PLC:DURATION_S
    "close_mid_request": (True, 0, 1),  # close_mid_request:PLC[:COUNT][,MODE]
    "drop_every": (True, 2, 2),  # drop_every:PLC:PERIOD_S,DURATION_S[,MODE]
}
# kind -> the words its optional last argument may be (the first is the default)
_MODES: dict[str, tuple[str, ...]] = {
    "close_mid_request": ("close", "half"),
    "drop_every": DROP_MODES,
}


@dataclass(frozen=True)
class FaultSpec:
    """One scheduled fault."""

    kind: str
    plc: PlcName | None
    args: tuple[float, ...]
    at_s: float
    mode: str | None = None


def parse_fault(text: str) -> FaultSpec:
    """KIND[:PLC][:ARG[,ARG...]][,MODE]@T_S -> FaultSpec (argparse type)."""
    spec, sep, at = text.partition("@")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: missing @T_S (seconds after start)")
    try:
        at_s = float(at)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: time {at!r} is not a number") from None
    parts = spec.split(":")
    kind = parts.pop(0)
    if kind not in _KINDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown fault {kind!r}; one of {sorted(_KINDS)}"
        )
    needs_plc, nmin, nmax = _KINDS[kind]
    plc: PlcName | None = None
    if needs_plc:
        if not parts or parts[0] not in _PLCS:
            raise argparse.ArgumentTypeError(f"{text!r}: {kind} needs a PLC (accelerator|conveyor)")
        plc = _PLCS[parts.pop(0)]
    raw = [a for a in ",".join(parts).split(",") if a != ""] if parts else []
    mode: str | None = None
    if kind in _MODES:
        mode = _MODES[kind][0]
        if raw and not _is_number(raw[-1]):
            mode = raw.pop()
            if mode not in _MODES[kind]:
                raise argparse.ArgumentTypeError(
                    f"{text!r}: {kind} mode {mode!r} is not one of {list(_MODES[kind])}"
                )
    try:
        args = tuple(float(a) for a in raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: arguments must be numbers") from None
    if not nmin <= len(args) <= nmax:
        raise argparse.ArgumentTypeError(f"{text!r}: {kind} takes {nmin}..{nmax} numbers")
    return FaultSpec(kind, plc, args, at_s, mode)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `sim` options (pass a subparser to embed them in another CLI)."""
    p = parser or argparse.ArgumentParser(
        prog="linectl sim", description="Run the simulated accelerator and conveyor PLCs."
    )
    p.add_argument("--config", type=Path, default=None, help="configuration directory")
    p.add_argument("--acc-port", type=int, default=None, help="accelerator port (config)")
    p.add_argument("--cnv-port", type=int, default=None, help="conveyor port (config)")
    p.add_argument("--host", default=None, help="address to listen on (config host)")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--k-dose", type=float, default=1500.0, help="true dose coefficient K")
    p.add_argument("--arc-rate", type=float, default=0.0, metavar="PER_H", help="random arcs")
    p.add_argument(
        "--fault",
        type=parse_fault,
        action="append",
        default=[],
        metavar="KIND[:PLC][:ARG]@T_S",
        help="schedule a fault (repeatable), e.g. arc:0.5@30 link_loss:conveyor:2@60",
    )
    p.add_argument("--truth-out", type=Path, default=None, help="write ground truth on exit")
    p.add_argument("--duration", type=float, default=None, help="stop after this many s")
    p.add_argument("--log-level", default="INFO")
    return p


async def _inject(line: SimulatedLine, f: FaultSpec) -> None:
    fl = line.faults
    a = f.args
    match f.kind:
        case "arc":
            fl.arc(a[0] if a else 0.5)
        case "random_arcs":
            fl.random_arcs(a[0])
        case "latch":
            assert f.plc is not None
            fl.latch(f.plc, int(a[0]))
        case "estop":
            fl.estop()
        case "cable_break":
            fl.cable_break()
        case "drive_fault":
            fl.drive_fault()
        case "safety_open":
            fl.safety_open()
        case "safety_close":
            fl.safety_close()
        case "link_loss":
            assert f.plc is not None
            await fl.link_loss(f.plc, a[0])
        case "restart":
            assert f.plc is not None
            await line.restart(f.plc, a[0] if a else 0.5)
        case "exceptions":
            assert f.plc is not None
            fl.exceptions(f.plc, int(a[0]), a[1])
        case "delay":
            assert f.plc is not None
            fl.delay(f.plc, a[0], a[1], a[2])
        case "silent":
            assert f.plc is not None
            fl.silent(f.plc, a[0])
        case "close_mid_request":
            assert f.plc is not None
            fl.close_mid_request(f.plc, int(a[0]) if a else 1, half=f.mode == "half")
        case "drop_every":
            assert f.plc is not None
            fl.drop_every(f.plc, a[0], a[1], f.mode or "close")
        case _:
            raise AssertionError(f.kind)


def check_port(host: str, port: int, option: str) -> None:
    """LocalError naming the port when the simulator could not listen on it.

    Checked before either server starts: pymodbus only says "Could not start listen".
    """
    if not 0 <= port <= 65535:
        raise LocalError(f"{option} {port}: a port is 0 (any free port) to 65535")
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise LocalError(f"cannot listen on {host}:{port} ({option}): {exc.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            if os.name == "posix":  # as asyncio's servers do: a TIME_WAIT port is free
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        hint = (
            "another program (a simulator already running?) listens there"
            if exc.errno == errno.EADDRINUSE
            else exc.strerror
        )
        raise LocalError(
            f"port {port} on {host} ({option}) is not free: {hint}; give another with "
            f"{option} PORT, or 0 for any free port"
        ) from None


async def run(args: argparse.Namespace) -> int:
    """Run until a signal (or --duration); returns the exit code."""
    cfg = load_config(args.config or default_config_dir())
    acc_port = cfg.line.accelerator.port if args.acc_port is None else args.acc_port
    cnv_port = cfg.line.conveyor.port if args.cnv_port is None else args.cnv_port
    host = args.host or cfg.line.accelerator.host
    if acc_port == cnv_port != 0:
        raise LocalError(f"the accelerator and the conveyor cannot share port {acc_port}")
    check_port(host, acc_port, "--acc-port")
    check_port(host, cnv_port, "--cnv-port")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with SimulatedLine(
        cfg,
        acc_port,
        cnv_port,
        seed=args.seed,
        k_dose_true=args.k_dose,
        host=host,
        arc_rate_per_h=args.arc_rate,
    ) as line:
        log.info(
            "simulated line %s up: accelerator :%d, conveyor :%d",
            cfg.line.line_id,
            line.acc_port,
            line.cnv_port,
        )

        async def scheduled(f: FaultSpec) -> None:
            await asyncio.sleep(max(0.0, f.at_s - line.plant_time()))
            try:
                await _inject(line, f)
            except (ValueError, KeyError) as exc:
                log.error("fault %s failed: %s", f, exc)

        tasks = [asyncio.create_task(scheduled(f), name=f"fault {f.kind}") for f in args.fault]
        try:
            if args.duration is None:
                await stop.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(args.duration):
                        await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            line.plant.advance_to(line.plant_time())
            if args.truth_out is not None:
                line.plant.truth.write(args.truth_out)
                log.info("ground truth written to %s", args.truth_out)
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(sig)
    log.info("simulated line stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: `linectl sim ...` and `python -m simulators ...`."""
    args = build_parser().parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Under `linectl sim` the root logger already has a handler (basicConfig then does
    # nothing): the level asked for here must still apply.
    logging.getLogger().setLevel(level)
    try:
        return asyncio.run(run(args))
    except (ConfigError, LocalError) as exc:
        log.error("%s", exc)
        return 2
    except RuntimeError as exc:
        if "listen" not in str(exc):  # pymodbus: "Could not start listen, ..."
            raise
        log.error("the simulators could not listen: a port was taken after the check")
        return 2
    except KeyboardInterrupt:
        return 0
