"""`linectl run`: the line daemon. SIGTERM and SIGINT stop the line safely first.

With `[mqtt] enabled` the MQTT bridge (linectl.mqtt, docs/mqtt.md) runs beside the line
service: telemetry, records from the store's outbox, commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import aiomqtt

from linectl.aio import stop_task
from linectl.commands import CommandError, check_value, parse_command
from linectl.config import default_config_dir, load_config
from linectl.errors import LocalError
from linectl.metrics import LineMetrics, WithoutCreated
from linectl.mqtt import MqttBridge
from linectl.service import STOP_LOCK_WAIT_S, LineService, ReelRequest, select_recipe
from linectl.sparkplug.adapter import SparkplugEdge
from linectl.store import RecordStore, check_database, limit_lock_waits
from linectl.web.server import HmiServer, serve_metrics

log = logging.getLogger("linectl.daemon")


def add_run_parser(commands: Any) -> None:
    """Add `run` to the CLI's subcommands."""
    p = commands.add_parser(
        "run",
        help="run the line daemon (controller, dose ledger, records)",
        description=(
            "Run the line controller against the PLCs in the configuration. With --reel it "
            "starts that reel as soon as the line is READY and runs it to its planned "
            "length. SIGTERM or Ctrl-C ramps the line down, switches the beam off and stops "
            "the line before the daemon exits; an interrupted reel is resumed (with the "
            "metres it could not see recorded as unproven) when the daemon runs again."
        ),
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="configuration directory (default: $LINECTL_CONFIG_DIR or ./config)",
    )
    p.add_argument("--reel", help="reel id to run")
    p.add_argument("--recipe", help="recipe name (file stem in recipes_dir) or path")
    p.add_argument("--length", type=float, help="planned reel length, m")
    p.add_argument("--operator", default="", help="operator name for the records")
    p.add_argument("--db", type=Path, help="record database (default: from line.toml)")
    p.add_argument(
        "--reset-faults",
        action="store_true",
        help="reset latched PLC faults and alarms once at start (an operator action, audited)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="resume the reel an earlier run left unfinished (found in the records)",
    )
    p.add_argument(
        "--exit-after-reel",
        action="store_true",
        help="exit when the reel is complete (or an operator has ended it short)",
    )
    p.set_defaults(handler=run_command, log_info_by_default=True)


def _check_run_args(args: argparse.Namespace) -> None:
    """What `run` is given, checked as the MQTT path checks a start_reel (the reel id, the
    length, the operator, the recipe name), before anything is loaded or started:
    LocalError (exit 2) names the option. A byte of argv that is not UTF-8 arrives as a
    lone surrogate, which no record can hold (it once made every store write fail)."""
    if args.reel and args.length is None:
        raise LocalError("--reel needs --length (planned reel length, m)")
    if args.length is not None and not (math.isfinite(args.length) and args.length > 0):
        raise LocalError(f"--length must be a positive number of metres, not {args.length}")
    if args.reel and args.resume:
        raise LocalError("give --reel for a new reel or --resume for an unfinished one, not both")
    try:
        if args.reel:
            # The checks an MQTT start_reel gets (id, length, operator), all at once.
            start: dict[str, object] = {"reel_id": args.reel, "length_m": args.length}
            if args.operator:
                start["operator"] = args.operator
            parse_command(json.dumps(start), name="start_reel", sender="linectl-run", source="cli")
    except CommandError as exc:
        raise LocalError(f"--reel/--length/--operator: {exc}") from None
    try:
        if args.operator:  # also with --resume, where it names who resumed the reel
            check_value("operator", args.operator)
    except CommandError as exc:
        raise LocalError(f"--operator: {exc}") from None
    if args.recipe is not None:
        # A bare name is a file stem in recipes_dir, as select_recipe over MQTT takes it;
        # a path is the local operator's choice, but its name goes into the records too.
        bare = Path(args.recipe).suffix != ".toml" and len(Path(args.recipe).parts) <= 1
        try:
            check_value("recipe", args.recipe, pattern=bare)
        except CommandError as exc:
            raise LocalError(f"--recipe: {exc}") from None


def run_command(args: argparse.Namespace, out: TextIO) -> int:
    """Handler of `linectl run`."""
    _check_run_args(args)
    cfg = load_config(args.config or default_config_dir())
    # A damaged or foreign database file stops the start here, naming the file (exit 2),
    # before the metrics endpoint, the PLC links or the broker are touched.
    check_database(args.db or cfg.resolve(cfg.line.records.path))
    recipe, recipe_path = select_recipe(cfg, args.recipe)
    service = LineService(cfg, recipe, recipe_path, store_path=args.db)
    if args.reset_faults:
        service.request_reset()
    if args.reel:
        service.request_reel(ReelRequest(args.reel, args.length, args.operator))
    if args.resume:
        service.request_resume(args.operator)
    print(
        f"linectl: line {cfg.line.line_id}, recipe {recipe.product} v{recipe.version}, "
        f"records {service.store_path}",
        file=out,
    )
    asyncio.run(_run(service, exit_when_done=args.exit_after_reel))
    if service.reel_refused is not None:
        # Refused on the line, as start_reel would be (a reel id used before, say).
        raise LocalError(f"--reel refused: {service.reel_refused}")
    return 0


def mqtt_bridge(service: LineService) -> MqttBridge | None:
    """The MQTT bridge for the service when `[mqtt] enabled`, hooked to its cycle."""
    cfg = service.cfg
    if not cfg.line.mqtt.enabled:
        return None
    bridge = MqttBridge(
        service,
        cfg.line.mqtt,
        line_id=service.line_id,
        store_path=service.store_path,
        resolve_path=cfg.resolve,
        protocol=(
            aiomqtt.ProtocolVersion.V5
            if cfg.line.mqtt.protocol == "5"
            else aiomqtt.ProtocolVersion.V311
        ),
    )
    service.observers.append(bridge.on_cycle)
    return bridge


@dataclass
class _MqttMetrics:
    """The bridge's stats as the metrics read them (at scrape time, on the loop)."""

    bridge: MqttBridge

    @property
    def connected(self) -> bool:
        return self.bridge.stats.connected

    @property
    def queue_depth(self) -> int:
        return len(self.bridge.queue)

    @property
    def dropped_total(self) -> int:
        return self.bridge.stats.dropped

    @property
    def replay_backlog(self) -> int:
        return self.bridge.stats.replay_backlog

    @property
    def published_total(self) -> int:
        return self.bridge.stats.published


class _Adapter(Protocol):
    async def run(self) -> None: ...


async def _keep_running(adapter: _Adapter, name: str, stopping: asyncio.Event) -> None:
    """An adapter's run() returns only after stop(). If it ends before that (a bug, or
    an asyncio quirk: linectl.aio), say so and start it again: telemetry must never die
    silently while the line runs."""
    while True:
        try:
            await adapter.run()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if stopping.is_set() or (task is not None and task.cancelling()):
                raise  # asked to stop
            log.error("%s ended with a stray cancellation", name, exc_info=True)
        except Exception:
            log.exception("%s failed", name)
        if stopping.is_set():
            return
        log.error("%s stopped on its own while the line runs; starting it again in 1 s", name)
        await asyncio.sleep(1.0)


async def run_with_bridge(
    service: LineService,
    *,
    exit_when_done: bool,
    metrics_port: int | None = None,
    http_port: int | None = None,
) -> None:
    """Run the service with its adapters beside it, as the configuration enables them:
    the Prometheus endpoint, the MQTT bridge and the Sparkplug B edge node. The Prometheus
    endpoint (linectl.web.server.MetricsServer) is served on this event loop, not by a
    thread of its own.

    The adapters stop after the service: the line is safe and the store drained first,
    then the last records are flushed and `offline` (NDEATH) published. A broker that is
    away never holds up the line or its shutdown for longer than the bridge's flush time.
    `metrics_port` and `http_port` override the configured ports (0: any free port).
    With `[http] enabled` the HMI server (linectl.web) serves the operator's page, the
    JSON command API, the live feed and /metrics too; it starts before the line does and
    stops after it.
    """
    cfg = service.cfg
    metrics = LineMetrics(service.line_id)
    metrics.attach(service)
    exposition = WithoutCreated(metrics.registry)
    mcfg = cfg.line.metrics
    if metrics_port is not None:
        mcfg = mcfg.model_copy(update={"port": metrics_port})
    server = await serve_metrics(exposition, mcfg)
    service.metrics_url = None if server is None else server.url
    bridge = mqtt_bridge(service)
    tasks: list[tuple[Any, asyncio.Task[None]]] = []
    outbox: RecordStore | None = None
    stopping = asyncio.Event()
    if bridge is not None:
        metrics.bind_mqtt(_MqttMetrics(bridge))
        run = _keep_running(bridge, "MQTT bridge", stopping)
        tasks.append((bridge, asyncio.create_task(run, name="linectl-mqtt")))
    if cfg.line.sparkplug.enabled:
        # Opening may wait on the database lock: never on the event loop.
        outbox = await asyncio.to_thread(RecordStore, service.store_path)
        edge = SparkplugEdge.from_config(cfg, service, status=service.line_status, outbox=outbox)
        run = _keep_running(edge, "Sparkplug edge node", stopping)
        tasks.append((edge, asyncio.create_task(run, name="linectl-sparkplug")))
    hmi: HmiServer | None = None
    if cfg.line.http.enabled:
        hmi = HmiServer(
            service,
            cfg.line.http,
            metrics=exposition,
            broker_state=_broker_state(bridge),
        )
        await hmi.start(port=http_port)
        service.hmi_url = hmi.url
    try:
        await service.run(exit_when_done=exit_when_done)
    finally:
        if hmi is not None:
            await hmi.stop()
        stopping.set()
        for adapter, _task in tasks:
            adapter.stop()
        flush_s = 3 * bridge.flush_s + 5.0 if bridge is not None else 5.0
        for _adapter, task in tasks:
            # Stopped adapters flush and leave on their own; one that does not is
            # cancelled (again, if a cancellation is lost: see linectl.aio). Failures
            # were logged by _keep_running, which never ends with an exception.
            await stop_task(task, grace_s=flush_s)
        if outbox is not None:
            await asyncio.to_thread(outbox.close)
        if server is not None:
            await server.close()


def _broker_state(bridge: MqttBridge | None) -> Callable[[], str]:
    """The broker link as the HMI's banner shows it."""
    if bridge is None:
        return lambda: "off"
    return lambda: "connected" if bridge.stats.connected else "disconnected"


def _on_stop_signal(service: LineService) -> None:
    """SIGTERM or SIGINT: stop the line safely. A record database that another process
    keeps locked must not hold the exit up (each waiting write used to take 10 s): from
    now on a write waits for it at most STOP_LOCK_WAIT_S, and what could not be written is
    logged as NOT STORED (linectl.store)."""
    limit_lock_waits(STOP_LOCK_WAIT_S)
    service.stop()


async def _run(service: LineService, *, exit_when_done: bool) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_stop_signal, service)
    try:
        await run_with_bridge(service, exit_when_done=exit_when_done)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
