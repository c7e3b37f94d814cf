"""`linectl demo`: the simulated line end to end, in one command.

Starts both PLC simulators (real Modbus TCP on free local ports), the line service
against them, runs one reel with a live view, and ends with the reel report, its plot,
and the ledger checked against the simulator's ground truth.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import time
from pathlib import Path
from typing import Any, TextIO

from linectl.config import default_config_dir, load_config
from linectl.core.ledger import Verdict
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
    p.add_argument("--config", type=Path, default=None, help="configuration directory")
    p.add_argument("--length", type=float, default=100.0, help="reel length, m (default 100)")
    p.add_argument("--recipe", help="recipe name (default: the line's default)")
    p.add_argument("--arc-rate", type=float, default=60.0, help="random arcs per hour")
    p.add_argument("--seed", type=int, default=1, help="simulator random seed")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    p.set_defaults(handler=demo_command)


def demo_command(args: argparse.Namespace, out: TextIO) -> int:
    """Handler of `linectl demo`."""
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
        line = (
            f"{svc.ctl.state.value:9} speed {float(spd or 0):6.1f} m/min  "
            f"beam {float(cur or 0):5.1f} mA  "
            f"position {float(pos or 0):7.1f}/{plan or 0:.0f} m  "
            f"recorded {svc.records_written:5d} m  alarms {len(svc.ctl.alarms)}"
        )
        out.write(("\r" + line) if tty else (line + "\n"))
        out.flush()

    return show


async def _demo(args: argparse.Namespace, out: TextIO) -> int:
    cfg = load_config(args.config or default_config_dir())
    recipe, recipe_path = select_recipe(cfg, args.recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    db = args.out / "demo.sqlite"
    reel_id = time.strftime("DEMO-%Y%m%d-%H%M%S")
    # Loaded by name: the simulators are a separate package the controller never needs.
    sim: Any = importlib.import_module("simulators.server")
    async with sim.SimulatedLine(
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
        service = LineService(
            cfg, recipe, recipe_path, store_path=db, acc_endpoint=acc_ep, cnv_endpoint=cnv_ep
        )
        service.observers.append(_live(out, out.isatty()))
        # Align the simulator's ground truth with the reel's cable coordinate 0.
        service.on_reel_start.append(lambda _reel, counter_m: line.plant.start_reel(counter_m))
        service.request_reel(ReelRequest(reel_id, args.length, "demo"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        t0 = time.monotonic()
        await service.run(exit_when_done=True)
        elapsed = time.monotonic() - t0
        truth = line.plant.truth
        line.plant.truth.write(args.out / "truth.json")
    out.write(f"\n\nran {elapsed:.0f} s\n\n")
    with RecordStore(db) as store:
        started = any(r.reel_id == reel_id for r in store.reels())
    if not started:
        out.write(
            f"the reel never started: line {service.ctl.state.value}, alarms "
            f"{sorted(service.ctl.alarms)}; {service.ctl.why_not_ready()}\n"
        )
        return 1
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
    return 0 if reel_id in service.finished_reels and false_accepts == 0 else 1
