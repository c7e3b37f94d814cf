"""Command line: `linectl config|recipe|sim|demo ...`.

Wiring only: every check lives in linectl.config; this module loads, prints and maps
errors to exit codes (0 ok, 1 not done, 2 bad input or configuration, 130 interrupted).
linectl is process protection only: it never replaces the plant's personnel-safety
system or its hardwired beam inhibit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, cast

from linectl import __version__
from linectl.config import (
    LoadedConfig,
    RegisterMap,
    default_config_dir,
    json_schemas,
    load_config,
    load_recipe,
)
from linectl.daemon import add_run_parser
from linectl.demo import add_demo_parser
from linectl.errors import ConfigError, LinectlError
from linectl.report import add_report_parser

log = logging.getLogger("linectl.cli")

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports

# Subcommands whose remaining arguments go to another parser untouched.
_PASS_THROUGH = ("sim",)

_EPILOG = """\
configuration directory: --config/DIR, else $LINECTL_CONFIG_DIR, else ./config.
environment overrides of line.toml: LINECTL_<SECTION>__<KEY>=value,
  e.g. LINECTL_ACCELERATOR__PORT=6000 or LINECTL_CYCLE_PERIOD_S=0.02.
exit codes: 0 ok, 1 not implemented, 2 invalid input or configuration, 130 interrupted.

linectl is process protection only. It never replaces the plant's personnel-safety
system or its hardwired beam inhibit.
"""


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The whole argument parser (exposed for tests and documentation)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="linectl",
        description="Line control for electron-beam cable irradiation lines.",
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"linectl {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output: -v info, -vv debug (default: warnings only)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    # config ------------------------------------------------------------------
    config = commands.add_parser(
        "config",
        help="check a configuration directory or export its JSON Schemas",
        description="Check a configuration directory or export its JSON Schemas.",
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    config_cmds = config.add_subparsers(dest="config_command", metavar="ACTION")
    config_cmds.required = True
    check = config_cmds.add_parser(
        "check",
        help="load line.toml, both register maps and every recipe; print a summary",
        description=(
            "Load line.toml (with environment overrides), both register maps and every "
            "recipe in the recipes directory, cross-checking each recipe against the line. "
            "Exit 0 and print a summary when all is valid, else exit 2 and name the file "
            "and field at fault."
        ),
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    check.add_argument(
        "directory",
        nargs="?",
        type=Path,
        metavar="DIR",
        help="configuration directory (default: $LINECTL_CONFIG_DIR or ./config)",
    )
    check.set_defaults(handler=_cmd_config_check)
    schema = config_cmds.add_parser(
        "schema",
        help="print or write the JSON Schemas of line.toml, register maps and recipes",
        description=(
            "Export the JSON Schemas (with every field's documentation) of the three file "
            "kinds. Without --out, print one JSON object keyed by kind to stdout."
        ),
    )
    schema.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write <kind>.schema.json files into DIR (created if missing) instead",
    )
    schema.set_defaults(handler=_cmd_config_schema)

    # recipe ------------------------------------------------------------------
    recipe = commands.add_parser(
        "recipe",
        help="validate a recipe against the line",
        description="Validate recipes against the line configuration.",
    )
    recipe_cmds = recipe.add_subparsers(dest="recipe_command", metavar="ACTION")
    recipe_cmds.required = True
    rcheck = recipe_cmds.add_parser(
        "check",
        help="validate one recipe file and print what it allows on this line",
        description=(
            "Validate a recipe file and cross-check it against the line: the beam current "
            "range must reach the target dose in the speed range with this line's passes "
            "and weights, and stay within the accelerator's set-point ranges. Prints the "
            "line speed the beam allows at full recipe current."
        ),
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    rcheck.add_argument("file", type=Path, metavar="FILE", help="recipe TOML file")
    rcheck.add_argument(
        "--config",
        type=Path,
        metavar="DIR",
        help="configuration directory (default: $LINECTL_CONFIG_DIR or ./config)",
    )
    rcheck.set_defaults(handler=_cmd_recipe_check)

    # sim (arguments pass through untouched; see main) --------------------------
    sim = commands.add_parser(
        "sim",
        add_help=False,
        help="run the PLC simulators (arguments go to the simulators' own CLI)",
        description="Run the bundled PLC simulators; `linectl sim --help` shows their options.",
    )
    sim.set_defaults(handler=_cmd_sim)

    # run, report, demo ---------------------------------------------------------
    add_run_parser(commands)
    add_report_parser(commands)
    add_demo_parser(commands)
    return parser


# --------------------------------------------------------------------------- handlers


def _config_dir(given: Path | None) -> Path:
    return given if given is not None else default_config_dir()


def _map_summary(rmap: RegisterMap) -> str:
    tables = rmap.by_table
    return (
        f"{len(rmap.fields)} fields "
        f"({len(tables['holding'])} holding, {len(tables['input'])} input)"
    )


def _cmd_config_check(args: argparse.Namespace, out: TextIO) -> int:
    directory = _config_dir(args.directory)
    loaded = load_config(directory)
    line = loaded.line
    geo = line.geometry
    print(f"configuration {directory}", file=out)
    if loaded.overrides:
        print(f"  environment overrides: {', '.join(loaded.overrides)}", file=out)
    print(f"  line {line.line_id}, cycle {line.cycle_period_s * 1000:g} ms", file=out)
    for plc in ("accelerator", "conveyor"):
        ep = loaded.endpoint(plc)
        print(
            f"  {plc:<11} {ep.host}:{ep.port} unit {ep.unit_id}, "
            f"{ep.register_map}: {_map_summary(loaded.register_map(plc))}",
            file=out,
        )
    print(
        f"  geometry    {geo.passes} passes, {geo.pass_spacing_m:g} m apart, first "
        f"{geo.first_pass_offset_m:g} m past the counter, sum(w) = {geo.weight_sum:g}",
        file=out,
    )
    _check_recipes(loaded, out)
    print("ok", file=out)
    return EXIT_OK


def _check_recipes(loaded: LoadedConfig, out: TextIO) -> None:
    """Load every recipe in the recipes directory; ConfigError lists all that fail."""
    rdir = loaded.recipes_dir
    if not rdir.is_dir():
        raise ConfigError(f"{rdir}: recipes directory (recipes_dir in line.toml) not found")
    files = sorted(rdir.glob("*.toml"))
    if not files:
        print(f"  recipes     none in {rdir}", file=out)
        return
    errors: list[str] = []
    ws = loaded.line.geometry.weight_sum
    for path in files:
        try:
            recipe = load_recipe(path, loaded)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        print(
            f"  recipe      {path.stem} (version {recipe.version}) ok, "
            f"{recipe.max_speed_m_min(ws):.4g} m/min at full current",
            file=out,
        )
    if errors:
        raise ConfigError("\n".join(errors))


def _cmd_recipe_check(args: argparse.Namespace, out: TextIO) -> int:
    loaded = load_config(_config_dir(args.config))
    path: Path = args.file
    recipe = load_recipe(path, loaded)
    ws = loaded.line.geometry.weight_sum
    v_max = recipe.max_speed_m_min(ws)
    limited = "recipe speed_max_m_min" if v_max >= recipe.speed_max_m_min else "beam current"
    print(f"recipe {path}: ok", file=out)
    print(f"  product     {recipe.product}, version {recipe.version}", file=out)
    print(
        f"  dose        target {recipe.target_dose_kgy:g} kGy, "
        f"limits {recipe.min_dose_kgy:g}..{recipe.max_dose_kgy:g} kGy",
        file=out,
    )
    print(
        f"  beam        {recipe.energy_mev:g} +/- {recipe.energy_tolerance_mev:g} MeV, "
        f"{recipe.beam_current_min_ma:g}..{recipe.beam_current_max_ma:g} mA, "
        f"scan {recipe.scan_width_cm:g} cm, K = {recipe.k_dose:g}",
        file=out,
    )
    print(
        f"  line        {loaded.line.line_id}: {loaded.line.geometry.passes} passes, "
        f"sum(w) = {ws:g}; speed range {recipe.speed_min_m_min:g}.."
        f"{recipe.speed_max_m_min:g} m/min",
        file=out,
    )
    print(
        f"  current for target dose: {recipe.current_for_dose_ma(recipe.speed_min_m_min, ws):.4g}"
        f" mA at {recipe.speed_min_m_min:g} m/min",
        file=out,
    )
    print(
        f"  max line speed at full current ({recipe.beam_current_max_ma:g} mA): "
        f"{v_max:.4g} m/min (limited by {limited})",
        file=out,
    )
    return EXIT_OK


def _cmd_config_schema(args: argparse.Namespace, out: TextIO) -> int:
    schemas = json_schemas()
    target: Path | None = args.out
    if target is None:
        json.dump(schemas, out, indent=2, sort_keys=True)
        out.write("\n")
        return EXIT_OK
    try:
        target.mkdir(parents=True, exist_ok=True)
        for kind, schema in schemas.items():
            path = target / f"{kind}.schema.json"
            path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            print(f"wrote {path}", file=out)
    except OSError as exc:
        raise ConfigError(f"{target}: cannot write schemas: {exc.strerror}") from None
    return EXIT_OK


def _cmd_sim(args: argparse.Namespace, out: TextIO) -> int:
    rest: list[str] = args.rest
    # Imported by name at call time: the CLI works without the simulators, and mypy's
    # strict run on linectl/ does not pull the simulators' code into its check.
    try:
        module: Any = importlib.import_module("simulators.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in ("simulators", "simulators.cli"):
            raise
        print("linectl: error: the simulators are not installed (simulators.cli)", file=sys.stderr)
        return EXIT_BAD_INPUT
    sim_main = cast(Callable[[list[str]], int | None], module.main)
    try:
        code = sim_main(rest)
    except SystemExit as exc:  # its argparse on --help or a usage error
        code = exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    return EXIT_OK if code is None else int(code)


# --------------------------------------------------------------------------- main


def _split_pass_through(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Cut argv after a pass-through command: (ours, theirs) or (argv, None).

    Global options take no values, so the first word not starting with '-' is the command.
    """
    for i, word in enumerate(argv):
        if not word.startswith("-"):
            if word in _PASS_THROUGH:
                return argv[: i + 1], argv[i + 1 :]
            break
    return argv, None


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # No force=True: a host that already configured logging (pytest, an embedding
    # program) keeps its handlers; only the level follows -v.
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (console script `linectl`)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    ours, theirs = _split_pass_through(args_list)
    parser = build_parser()
    try:
        args = parser.parse_args(ours)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    args.rest = theirs or []
    _setup_logging(args.verbose)
    handler = cast(Callable[[argparse.Namespace, TextIO], int], args.handler)
    try:
        return handler(args, sys.stdout)
    except LinectlError as exc:
        log.debug("command failed", exc_info=True)
        print(f"linectl: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("linectl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as other Unix tools do;
        # pointing stdout at devnull keeps the interpreter's final flush from failing too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
