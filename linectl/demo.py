"""`linectl demo`: the simulated line end to end, in one command.

Starts both PLC simulators (real Modbus TCP on free local ports), an MQTT broker
embedded in the process (unless --broker names one, or [mqtt] in the configuration is
enabled), the line service against them with its MQTT bridge and Prometheus endpoint,
runs one reel with a live view, and ends with the reel report, its plot, the ledger
checked against the simulator's ground truth, and what an MQTT subscriber received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiomqtt

from linectl.aio import stop_task
from linectl.config import (
    LoadedConfig,
    MqttConfig,
    Recipe,
    config_dir_or_reference,
    load_config,
    reference_config_note,
)
from linectl.core.ledger import Verdict
from linectl.daemon import run_with_bridge
from linectl.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, LocalError
from linectl.report import build_report, write_plot, write_text
from linectl.service import LineService, ReelRequest, select_recipe
from linectl.store import RecordStore


def add_demo_parser(commands: Any) -> None:
    """Add `demo` to the CLI's subcommands."""
    p = commands.add_parser(
        "demo",
        help="run the simulated line end to end: simulators, controller, a reel, the report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="DIR",
        help="configuration directory (default: $LINECTL_CONFIG_DIR, else ./config if it "
        "exists, else the reference configuration shipped with linectl)",
    )
    p.add_argument("--length", type=float, default=100.0, help="reel length, m (default 100)")
    p.add_argument("--recipe", help="recipe name (default: the line's default)")
    p.add_argument("--arc-rate", type=float, default=60.0, help="random arcs per hour")
    p.add_argument("--seed", type=int, default=1, help="simulator random seed")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    p.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="MQTT broker to use (default: the configured one if [mqtt] is enabled, else "
        "one embedded in this process on a free local port)",
    )
    p.add_argument(
        "--no-mqtt", action="store_true", help="run without MQTT (no broker, no telemetry)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="Prometheus endpoint port on 127.0.0.1 (default 0: any free port)",
    )
    p.set_defaults(handler=demo_command)


def demo_command(args: argparse.Namespace, out: TextIO) -> int:
    """Handler of `linectl demo`."""
    check_demo_args(args)  # before the event loop, the broker or a simulator starts
    return asyncio.run(_demo(args, out))


def _live(out: TextIO, tty: bool) -> Any:
    last = [0.0]

    def show(svc: LineService) -> None:
        now = time.monotonic()
        if now - last[0] < (0.25 if tty else 5.0):
            return
        last[0] = now
        acc, cnv = svc.last_acc, svc.last_cnv
        cur = acc.value("beam_current") if acc else None
        spd = cnv.value("speed") if cnv else None
        pos = svc.ledger.position_m if svc.ledger else None
        plan = svc.ctl.reel.plan.planned_length_m if svc.ctl.reel else None
        at = float(pos or 0)
        # Past the planned length the tail is still crossing the beam: say so rather than
        # a position beyond the plan.
        where = (
            f"tail clearing the beam, {at:7.1f} m counted"
            if plan and at > plan
            else f"position {at:7.1f}/{plan or 0:.0f} m"
        )
        line = (
            f"{svc.ctl.state.value:9} speed {float(spd or 0):6.1f} m/min  "
            f"beam {float(cur or 0):5.1f} mA  {where}  "
            f"recorded {svc.records_written:5d} m  alarms {len(svc.ctl.alarms)}"
        )
        out.write(("\r" + line) if tty else (line + "\n"))
        out.flush()

    return show


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _embedded_broker(out: TextIO) -> AsyncIterator[tuple[str, int]]:
    """An MQTT 3.1.1 broker (amqtt) in this process, on 127.0.0.1 and a free port only."""
    try:
        from amqtt.broker import Broker  # noqa: PLC0415 - optional dependency (extra "broker")
    except ImportError:
        raise LocalError(
            "the embedded broker needs amqtt: pip install -e '.[demo]', or give --broker "
            "HOST:PORT, or --no-mqtt"
        ) from None
    port = _free_port()
    # Always an explicit configuration: amqtt's default listens on 0.0.0.0:1883.
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    broker = Broker(config)
    await broker.start()
    out.write(f"embedded MQTT broker (amqtt, MQTT 3.1.1) on 127.0.0.1:{port}\n")
    try:
        yield "127.0.0.1", port
    finally:
        # Bounded: a stuck broker shutdown must not keep the demo from its report.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await broker.shutdown()


@dataclass
class _Received:
    """What a plain MQTT subscriber to the line's topics got during the demo."""

    by_kind: dict[str, int] = field(default_factory=dict)
    metres: int = 0
    status: list[str] = field(default_factory=list)


async def _subscribe(mqtt: MqttConfig, line_id: str, got: _Received, ready: asyncio.Event) -> None:
    protocol = aiomqtt.ProtocolVersion.V5 if mqtt.protocol == "5" else aiomqtt.ProtocolVersion.V311
    prefix = f"{mqtt.topic_prefix}/{line_id}/"
    async with aiomqtt.Client(
        mqtt.host,
        mqtt.port,
        identifier=f"linectl-demo-viewer-{os.getpid()}",
        username=mqtt.username,
        password=mqtt.password,
        protocol=protocol,
    ) as client:
        await client.subscribe(prefix + "#", qos=1)
        ready.set()
        async for msg in client.messages:
            rest = str(msg.topic)[len(prefix) :]
            kind = rest.split("/")[0] if not rest.startswith("records/") else rest
            got.by_kind[kind] = got.by_kind.get(kind, 0) + 1
            try:
                body = json.loads(bytes(msg.payload))
            except (TypeError, ValueError):
                continue
            if rest == "records/metres" and isinstance(body, dict):
                got.metres += len(body.get("metres", []))
            if rest == "status" and isinstance(body, dict):
                got.status.append(str(body.get("status")))


MAX_ARC_RATE_PER_H = 3600.0
"""--arc-rate above one arc a second would keep the beam from ever running."""


def check_demo_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments before anything starts (LocalError: exit 2, one line)."""
    if not (math.isfinite(args.length) and args.length > 0):
        raise LocalError(f"--length must be a positive number of metres, not {args.length:g}")
    if not (math.isfinite(args.arc_rate) and 0 <= args.arc_rate <= MAX_ARC_RATE_PER_H):
        raise LocalError(
            f"--arc-rate must be 0 to {MAX_ARC_RATE_PER_H:g} arcs per hour, not {args.arc_rate:g}"
        )
    if not 0 <= args.metrics_port <= 65535:
        raise LocalError(
            f"--metrics-port must be 0 (any free port) to 65535, not {args.metrics_port}"
        )
    if args.broker and not args.no_mqtt:
        host, _, port_s = args.broker.rpartition(":")
        if not host or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
            raise LocalError(f"--broker: expected HOST:PORT (port 1 to 65535), not {args.broker!r}")
    if args.out.exists() and not args.out.is_dir():
        raise LocalError(f"--out {args.out}: exists and is not a directory")


async def _demo(args: argparse.Namespace, out: TextIO) -> int:
    check_demo_args(args)
    directory, reference = (
        (args.config, False) if args.config is not None else config_dir_or_reference()
    )
    if reference:  # said first: a user who meant their own line sees it at once
        out.write(reference_config_note(directory) + "\n")
        out.flush()
    cfg = load_config(directory)
    recipe, recipe_path = select_recipe(cfg, args.recipe)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalError(f"--out {args.out}: cannot create: {exc.strerror}") from None
    async with contextlib.AsyncExitStack() as stack:
        mqtt: MqttConfig | None = None
        if not args.no_mqtt:
            if args.broker:
                host, _, port_s = args.broker.rpartition(":")
                if not host or not port_s.isdigit():
                    raise LocalError(f"--broker: expected HOST:PORT, not {args.broker!r}")
                mqtt = cfg.line.mqtt.model_copy(
                    update={"enabled": True, "host": host, "port": int(port_s)}
                )
            elif cfg.line.mqtt.enabled:
                mqtt = cfg.line.mqtt
            else:
                host, port = await stack.enter_async_context(_embedded_broker(out))
                mqtt = cfg.line.mqtt.model_copy(
                    update={"enabled": True, "host": host, "port": port, "protocol": "3.1.1"}
                )
        cfg.line = cfg.line.model_copy(
            update={"mqtt": mqtt or cfg.line.mqtt.model_copy(update={"enabled": False})}
        )
        return await _run_demo(cfg, recipe, recipe_path, args, out)
    raise AssertionError("unreachable")  # pragma: no cover - mypy: the block returns


async def _run_demo(
    cfg: LoadedConfig, recipe: Recipe, recipe_path: Path, args: argparse.Namespace, out: TextIO
) -> int:
    db = args.out / "demo.sqlite"
    reel_id = time.strftime("DEMO-%Y%m%d-%H%M%S")
    got = _Received()
    viewer: asyncio.Task[None] | None = None
    if cfg.line.mqtt.enabled:
        ready = asyncio.Event()
        viewer = asyncio.create_task(_subscribe(cfg.line.mqtt, cfg.line.line_id, got, ready))
        async with asyncio.timeout(10.0):
            await ready.wait()
    # Imported lazily: the simulators are a separate package the controller never needs.
    from simulators.server import SimulatedLine  # noqa: PLC0415 - only the demo needs them

    async with SimulatedLine(
        cfg, seed=args.seed, arc_rate_per_h=args.arc_rate, k_dose_true=recipe.k_dose
    ) as line:
        acc_ep = cfg.line.accelerator.model_copy(update={"port": line.acc_port})
        cnv_ep = cfg.line.conveyor.model_copy(update={"port": line.cnv_port})
        out.write(
            f"simulated PLCs on 127.0.0.1:{line.acc_port} (accelerator) and "
            f":{line.cnv_port} (conveyor); {args.arc_rate:g} random arcs/h\n"
            f"reel {reel_id}: {args.length:g} m of {recipe.product} (recipe v{recipe.version}),"
            f" {cfg.line.geometry.passes} passes, last pass "
            f"{cfg.line.geometry.last_pass_offset_m:g} m past the counter\n"
        )
        if cfg.line.mqtt.enabled:
            mq = cfg.line.mqtt
            out.write(
                f"MQTT telemetry on {mq.host}:{mq.port} under "
                f"{mq.topic_prefix}/{cfg.line.line_id}/\n"
            )
        service = LineService(
            cfg, recipe, recipe_path, store_path=db, acc_endpoint=acc_ep, cnv_endpoint=cnv_ep
        )
        service.observers.append(_live(out, out.isatty()))
        # Align the simulator's ground truth with the reel's cable coordinate 0.
        service.on_reel_start.append(lambda _reel, counter_m: line.plant.start_reel(counter_m))
        service.request_reel(ReelRequest(reel_id, args.length, "demo"))
        loop = asyncio.get_running_loop()
        interrupted = False

        def interrupt() -> None:
            # A safe stop, then the partial reel's report; the exit code says why.
            nonlocal interrupted
            interrupted = True
            service.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, interrupt)
        t0 = time.monotonic()
        announced = [False]

        def announce(svc: LineService) -> None:
            if not announced[0] and svc.metrics_url:
                announced[0] = True
                out.write(f"Prometheus metrics at {svc.metrics_url}\n")

        service.observers.insert(0, announce)
        await run_with_bridge(service, exit_when_done=True, metrics_port=args.metrics_port)
        elapsed = time.monotonic() - t0
        truth = line.plant.truth
        line.plant.truth.write(args.out / "truth.json")
    if viewer is not None:
        await asyncio.sleep(0.5)  # the last records and "offline" in flight
        await stop_task(viewer, grace_s=0.0)
    out.write(f"\n\nran {elapsed:.0f} s\n\n")
    with RecordStore(db) as store:
        started = any(r.reel_id == reel_id for r in store.reels())
    if not started:
        out.write(
            f"the reel never started: line {service.ctl.state.value}, alarms "
            f"{sorted(service.ctl.alarms)}; {service.ctl.why_not_ready()}\n"
        )
        return EXIT_INTERRUPTED if interrupted else EXIT_FAILED
    if reel_id not in service.finished_reels:
        out.write("the reel did not finish (stopped early); its records are kept\n")
    with RecordStore(db) as store:
        report = build_report(store, reel_id)
        metres = store.metres(reel_id)
    write_text(report, out)
    plot = args.out / f"{reel_id}.png"
    write_plot(report, plot)
    out.write(f"\nplot: {plot}\nrecords: {db}\nground truth: {args.out / 'truth.json'}\n")
    # The ledger against the simulator's independent ground truth.
    errs, false_accepts = [], 0
    for m in metres:
        if m.dose_kgy is None or m.verdict is Verdict.UNPROVEN:
            continue
        true = truth.dose_kgy(m.index)
        errs.append(abs(m.dose_kgy - true) / recipe.target_dose_kgy * 100.0)
        inside = recipe.min_dose_kgy <= true <= recipe.max_dose_kgy
        false_accepts += m.verdict is Verdict.IN_SPEC and not inside
    if errs:
        out.write(
            f"ledger vs ground truth over {len(errs)} metres: max error {max(errs):.3f} % of "
            f"target, false accepts {false_accepts}\n"
        )
    if cfg.line.mqtt.enabled:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(got.by_kind.items()))
        out.write(
            f"MQTT subscriber received: {kinds or 'nothing'}; {got.metres} metre records; "
            f"status {' -> '.join(got.status) or '?'}\n"
        )
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if reel_id in service.finished_reels and false_accepts == 0 else EXIT_FAILED
