"""`linectl run`: the line daemon. SIGTERM and SIGINT stop the line safely first."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import Any, TextIO

from linectl.config import default_config_dir, load_config
from linectl.errors import LocalError
from linectl.service import LineService, ReelRequest, select_recipe

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
    p.add_argument("--config", type=Path, default=None, help="configuration directory")
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
    p.add_argument("--exit-after-reel", action="store_true", help="exit when the reel is complete")
    p.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace, out: TextIO) -> int:
    """Handler of `linectl run`."""
    cfg = load_config(args.config or default_config_dir())
    if args.reel and args.length is None:
        raise LocalError("--reel needs --length (planned reel length, m)")
    if args.length is not None and args.length <= 0:
        raise LocalError(f"--length must be positive, not {args.length}")
    recipe, recipe_path = select_recipe(cfg, args.recipe)
    service = LineService(cfg, recipe, recipe_path, store_path=args.db)
    if args.reset_faults:
        service.request_reset()
    if args.reel and args.resume:
        raise LocalError("give --reel for a new reel or --resume for an unfinished one, not both")
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
    return 0


async def _run(service: LineService, *, exit_when_done: bool) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    try:
        await service.run(exit_when_done=exit_when_done)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
