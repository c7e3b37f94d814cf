"""Command line: `linectl config|init|recipe|probe|sim|run|report|demo|status|reel|alarms|...`.

Wiring only: every check lives in linectl.config, the daemon's client in linectl.client
(MQTT, and the rendering) and linectl.webclient (the HTTP API, used when the
configuration has no broker and [http] enabled); this module loads, prints and maps
errors to exit codes (0 ok, 1 not done, 2 bad input or configuration, 3 command refused
(NAK), 4 no answer from the line, 5 broker unreachable, 130 interrupted). Every command
is described in docs/cli.md.
linectl is process protection only: it never replaces the plant's personnel-safety
system or its hardwired beam inhibit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import getpass
import json
import logging
import os
import shlex
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, cast

from linectl import __version__
from linectl.client import (
    DEFAULT_TIMEOUT_S,
    Answer,
    BrokerError,
    ClientSettings,
    LineClient,
    LineView,
    NoAnswerError,
    client_settings,
    command_payload,
    describe_answer,
    hmi_view,
    new_request_id,
    not_online_text,
    read_answer,
    read_line,
    send_command,
    watch,
    watch_hmi,
)
from linectl.commands import CommandName, check_value
from linectl.config import (
    LoadedConfig,
    RegisterMap,
    config_dir_or_reference,
    default_config_dir,
    json_schemas,
    load_config,
    load_recipe,
    reference_config_dir,
    reference_config_note,
)
from linectl.core.control import ALARM_KINDS
from linectl.daemon import add_run_parser
from linectl.demo import add_demo_parser
from linectl.errors import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_BROKER,
    EXIT_INTERRUPTED,
    EXIT_NAK,
    EXIT_NO_ANSWER,
    EXIT_OK,
    ConfigError,
    LinectlError,
    LocalError,
)
from linectl.historian.cli import add_historian_parser
from linectl.probe import add_probe_parser
from linectl.report import add_report_parser
from linectl.web.auth import hash_password
from linectl.webclient import (
    ApiSession,
    HttpApiError,
    HttpTarget,
    follow,
    http_target,
    read_password,
)

log = logging.getLogger("linectl.cli")


# Subcommands whose remaining arguments go to another parser untouched.
_PASS_THROUGH = ("sim",)

_EPILOG = """\
configuration directory: --config/DIR, else $LINECTL_CONFIG_DIR, else ./config; `demo`
  and `sim` without any of these run on the reference configuration shipped with
  linectl. `linectl init DIR` writes a starter configuration directory.
environment overrides of line.toml: LINECTL_<SECTION>__<KEY>=value,
  e.g. LINECTL_ACCELERATOR__PORT=6000 or LINECTL_CYCLE_PERIOD_S=0.02.
exit codes: 0 ok, 1 not implemented, 2 invalid input or configuration (for the HTTP
  API also a wrong user or password), 3 the line refused the command (NAK, reason
  printed), 4 no answer from the line (no daemon on the broker or at the HTTP API, or
  its status says offline), 5 MQTT broker unreachable or refusing us, 130 interrupted
  (Ctrl-C; `watch` exits 0). See docs/cli.md.

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
        help="more log output: -v info, -vv debug (default: warnings only; `run` logs "
        "info, its state changes, by default)",
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

    # init --------------------------------------------------------------------
    init = commands.add_parser(
        "init",
        help="write a starter configuration directory (the reference line) to edit",
        description=_wrap(
            "Write a complete, commented starter configuration into DIR: line.toml, "
            "registers/ (both PLCs' register maps), recipes/ (one recipe) and records/ (where "
            "line.toml puts the records), a copy of the reference line shipped with linectl "
            "with every path relative to DIR. Edit it for your line; `linectl config check "
            "DIR` passes on it as written. An existing DIR that is not empty is left alone "
            "(exit 2) unless --force is given."
        ),
        epilog="example: linectl init /etc/linectl && linectl config check /etc/linectl",
        formatter_class=fmt,
    )
    init.add_argument("directory", type=Path, metavar="DIR", help="directory to write (created)")
    init.add_argument(
        "--force",
        action="store_true",
        help="write into an existing, non-empty DIR, overwriting the starter's files there "
        "(other files are kept)",
    )
    init.set_defaults(handler=_cmd_init)

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
    rcheck.add_argument(
        "file",
        type=Path,
        metavar="NAME|FILE",
        help="recipe name (file stem in the configuration's recipes_dir, as `run --recipe` "
        "takes it) or recipe TOML file",
    )
    rcheck.add_argument(
        "--config",
        type=Path,
        metavar="DIR",
        help="configuration directory (default: $LINECTL_CONFIG_DIR or ./config)",
    )
    rcheck.set_defaults(handler=_cmd_recipe_check)

    # http ------------------------------------------------------------------------
    http = commands.add_parser(
        "http",
        help="the HMI's users: hash a password for [http.users] in line.toml",
        description="Tools for the HMI server ([http] in line.toml, docs/hmi.md).",
    )
    http_cmds = http.add_subparsers(dest="http_command", metavar="ACTION")
    http_cmds.required = True
    hashpw = http_cmds.add_parser(
        "hash-password",
        help="read a password and print its scrypt hash for [http.users]",
        description=(
            "Read a password (asked twice on a terminal; one line from standard input "
            "otherwise) and print the line to put under [http.users.NAME] in line.toml. "
            "The password itself is never stored or printed."
        ),
        epilog="example: linectl http hash-password --user alice >> line.toml.snippet",
        formatter_class=fmt,
    )
    hashpw.add_argument(
        "--user",
        metavar="NAME",
        help="print a whole [http.users.NAME] table (role operator) instead of one key",
    )
    hashpw.set_defaults(handler=_cmd_http_hash_password)

    # sim (arguments pass through untouched; see main) --------------------------
    sim = commands.add_parser(
        "sim",
        add_help=False,
        help="run the PLC simulators (arguments go to the simulators' own CLI; --config "
        "default: $LINECTL_CONFIG_DIR, else ./config, else the reference configuration)",
        description="Run the bundled PLC simulators; `linectl sim --help` shows their options.",
    )
    sim.set_defaults(handler=_cmd_sim)

    # run, report, demo ---------------------------------------------------------
    add_run_parser(commands)
    add_report_parser(commands)
    # historian: the plant's PostgreSQL system of record for every line (its own service).
    add_historian_parser(commands)
    add_demo_parser(commands)
    # probe: commissioning reads (and, with --active, writes) straight to the PLCs.
    add_probe_parser(commands)

    # the running daemon's client, through the MQTT broker or the HTTP API -------------
    _add_client_parsers(commands, recipe_cmds)
    return parser


_CLIENT_EPILOG = """\
With [mqtt] enabled = true in line.toml (or --broker), the line's daemon is reached
through the MQTT broker named in its [mqtt] section (host, port, TLS, username,
password; LINECTL_MQTT__USERNAME / LINECTL_MQTT__PASSWORD override them, --broker the
address). The sender is your identity in command topics: --sender, else the MQTT user
name, else your login name; the line's [mqtt.identities] and [mqtt.roles] decide what
it may send.

With [mqtt] enabled = false and [http] enabled = true, it is reached through the
daemon's HTTP API ([http] host, port; HTTPS when tls_cert_file is set): you log in as
--user (default: --sender, else [mqtt] username), a user of [http.users], with the
password asked on the terminal or read from --password-file; your role decides what
you may send.

exit codes: 0 ok, 2 invalid input (nothing sent; over HTTP also a wrong user or
password), 3 refused by the line (NAK, reason printed), 4 no answer from the line (or,
for status/alarms, it is offline; over HTTP: its API cannot be reached), 5 MQTT
broker unreachable or refusing us, 130 interrupted. See docs/cli.md.
"""


def _wrap(text: str) -> str:
    """A description wrapped for the raw formatter (which keeps the epilog's layout)."""
    return textwrap.fill(text, 88)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _client_options(*, sender: bool = True, json_out: bool = True) -> argparse.ArgumentParser:
    """Options every client command takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="DIR",
        help="configuration directory whose line.toml names the line and its broker or "
        "HTTP API (default: $LINECTL_CONFIG_DIR or ./config)",
    )
    common.add_argument(
        "--broker",
        metavar="HOST[:PORT]",
        help="MQTT broker address instead of [mqtt] host and port ([IPv6]:PORT for IPv6); "
        "talk MQTT even with [mqtt] enabled = false",
    )
    if sender:
        common.add_argument(
            "--sender",
            metavar="ID",
            help="your identity in command topics (default: the MQTT user name, else your "
            "login name); the line's [mqtt.identities] gives it a role",
        )
    common.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the broker (or the HTTP API) and the line "
        f"(default {DEFAULT_TIMEOUT_S:g})",
    )
    http = common.add_argument_group(
        "the HTTP API (when line.toml has [mqtt] enabled = false and [http] enabled = true)"
    )
    http.add_argument(
        "--user",
        metavar="NAME",
        help="your user of the daemon's [http.users] (default: --sender, else [mqtt] username)",
    )
    http.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="read the password from FILE's first line ('-': standard input) instead of "
        "asking on the terminal",
    )
    http.add_argument(
        "--cafile",
        type=Path,
        metavar="FILE",
        help="trust this CA (or self-signed certificate) for HTTPS instead of the system's",
    )
    if json_out:
        common.add_argument(
            "--json",
            action="store_true",
            help="print what the line published (state, alarms or the answer) as JSON; over "
            "HTTP, the state document of GET /api/state",
        )
    return common


def _client_parser(
    group: Any, name: str, options: argparse.ArgumentParser, *, description: str, **kw: Any
) -> argparse.ArgumentParser:
    """One client command: its `options` (a parent parser), the description wrapped, and
    the epilog every client command shares (how the daemon is reached, exit codes)."""
    parser: argparse.ArgumentParser = group.add_parser(
        name,
        parents=[options],
        description=_wrap(description),
        epilog=_CLIENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )
    return parser


def _add_client_parsers(commands: Any, recipe_cmds: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    reader = _client_options(sender=False)
    sender = _client_options()

    status = _client_parser(
        commands,
        "status",
        reader,
        help="show the running line's state, reel, recipe, alarms and live values",
        description=(
            "Show what the line's daemon last published on its retained MQTT topics (or, "
            "over HTTP, its state document now): online or offline, the line state and "
            "why, the reel and how far it is, the recipe, the active alarms and the live "
            "values with their quality. Exit 0 when the daemon is online; exit 4 when it is "
            "offline (its last known state is printed), has never published on this "
            "broker, or its HTTP API cannot be reached."
        ),
    )
    status.set_defaults(handler=_cmd_status)

    reel = commands.add_parser(
        "reel",
        help="start, stop or end a reel on the running line",
        description=(
            "Start, stop or end a reel on the running line (commands start_reel, stop, end_reel)."
        ),
        epilog=_CLIENT_EPILOG,
        formatter_class=fmt,
    )
    reel_cmds = reel.add_subparsers(dest="reel_command", metavar="ACTION")
    reel_cmds.required = True
    start = _client_parser(
        reel_cmds,
        "start",
        sender,
        help="start a reel (the line must be READY)",
        description=(
            "Ask the line to start reel REEL_ID of --length metres. The line takes it only "
            "when it is READY and no other reel is unfinished; an unfinished reel is "
            "resumed by starting it again with its own id. With --recipe the recipe is "
            "selected first (both happen or neither). Prints the line's ACK, or its NAK "
            "with the reason (exit 3)."
        ),
    )
    start.add_argument("reel_id", metavar="REEL_ID", help="reel id ([A-Za-z0-9_.:-], 1..64)")
    start.add_argument(
        "--length", type=float, required=True, metavar="M", help="planned reel length, m"
    )
    start.add_argument(
        "--operator", metavar="NAME", help="operator named in the records (default: sender)"
    )
    start.add_argument("--recipe", metavar="NAME", help="select this recipe first (file stem)")
    start.add_argument("--reason", metavar="TEXT", help="note for the audit trail")
    start.set_defaults(handler=_cmd_reel_start)
    stop = _client_parser(
        reel_cmds,
        "stop",
        sender,
        help="stop the running reel (ramps down with dose-follow, then stops)",
        description=(
            "Ask the line to stop: beam current and line speed ramp down together with "
            "dose-follow, then the beam goes off and the line stops. Taken in STARTING or "
            "RUNNING; refused (NAK, exit 3) otherwise. The reel stays unfinished and can "
            "be resumed with `linectl reel start` and its id."
        ),
    )
    stop.add_argument("--reason", metavar="TEXT", help="why, for the audit trail")
    stop.set_defaults(handler=_cmd_reel_stop)
    end = _client_parser(
        reel_cmds,
        "end",
        sender,
        help="end an unfinished reel short of its length (its cable was cut or scrapped)",
        description=(
            "End the unfinished reel REEL_ID where its cable stands, short of its planned "
            "length: for a reel that will not be resumed (its cable was cut, scrapped or "
            "taken off the line). Every metre that has reached the beam and is not final "
            "yet is recorded unproven (incomplete); cable that never reached the beam is not "
            "part of the reel. The reel is closed with your identity and --reason, and "
            "another reel can start. Taken when the line is stopped (READY, IDLE or FAULT) "
            "with the conveyor at a standstill and the beam off for 1 s, both PLCs "
            "answering; refused (NAK, exit 3) otherwise."
        ),
    )
    end.add_argument("reel_id", metavar="REEL_ID", help="the unfinished reel (a guard)")
    end.add_argument(
        "--reason", required=True, metavar="TEXT", help="why it ends short (kept in its record)"
    )
    end.set_defaults(handler=_cmd_reel_end)

    alarms = _client_parser(
        commands,
        "alarms",
        sender,
        help="list the active alarms, or acknowledge one (alarms ack KIND)",
        usage="%(prog)s [options] [ack KIND]",
        description=(
            "Without arguments: list the alarms the line holds now (kind, latched, since "
            "when, message). `ack KIND` acknowledges the unacknowledged alarm of that kind "
            "('all' or '*' for every one); a latched alarm then still needs `linectl reset` "
            "once its cause is gone. Listing exits 4 when the line is offline."
        ),
    )
    alarms.add_argument("action", nargs="?", choices=["ack"], help="ack: acknowledge KIND")
    alarms.add_argument("kind", nargs="?", metavar="KIND", help="alarm kind, or 'all'")
    alarms.add_argument("--reason", metavar="TEXT", help="note for the audit trail (ack)")
    alarms.set_defaults(handler=_cmd_alarms)

    reset = _client_parser(
        commands,
        "reset",
        sender,
        help="reset latched alarms and PLC faults once their causes are gone",
        description=(
            "Ask the line to reset its latched alarms and the PLCs' latched faults "
            "(command reset). Taken when there is a latched alarm or FAULT and PLC data is "
            "available; refused (NAK, exit 3) otherwise."
        ),
    )
    reset.add_argument("--reason", metavar="TEXT", help="note for the audit trail")
    reset.set_defaults(handler=_cmd_reset)

    select = _client_parser(
        recipe_cmds,
        "select",
        sender,
        help="select the running line's recipe (no reel running or unfinished)",
        description=(
            "Ask the running line to select recipe NAME (a file stem in its recipes "
            "directory). Refused (NAK, exit 3) while a reel is running or unfinished, or "
            "when the recipe does not load or does not fit the line."
        ),
    )
    select.add_argument("recipe", metavar="NAME", help="recipe file stem in recipes_dir")
    select.add_argument("--reason", metavar="TEXT", help="note for the audit trail")
    select.set_defaults(handler=_cmd_recipe_select)

    watch_p = _client_parser(
        commands,
        "watch",
        _client_options(sender=False, json_out=False),
        help="follow the running line live: state, alarms, values, metres",
        description=(
            "Follow the line live: status, state, alarms, live values, completed metres, "
            "reel and alarm events (over HTTP: the HMI's live feed). On a terminal a "
            "compact screen is redrawn in place; otherwise (a pipe, a file) one line is "
            "printed per update. A lost broker or feed is shown and reconnected to. Ctrl-C "
            "ends it (exit 0)."
        ),
    )
    watch_p.add_argument(
        "--duration", type=_positive, metavar="S", help="stop after S seconds (exit 0)"
    )
    watch_p.add_argument(
        "--lines", action="store_true", help="one line per update even on a terminal"
    )
    watch_p.set_defaults(handler=_cmd_watch)


# --------------------------------------------------------------------------- handlers


def _config_dir(given: Path | None) -> Path:
    return given if given is not None else default_config_dir()


def _map_summary(rmap: RegisterMap) -> str:
    tables = rmap.by_table
    return (
        f"{len(rmap.fields)} fields "
        f"({len(tables['holding'])} holding, {len(tables['input'])} input)"
    )


def _no_default_config(directory: Path) -> str:
    """What `config check` without DIR says when its default directory does not exist."""
    if "LINECTL_CONFIG_DIR" in os.environ:
        return (
            f"$LINECTL_CONFIG_DIR names {directory}, which does not exist: point it at the "
            f"line's configuration directory, or write a starter configuration there with "
            f"`linectl init {shlex.quote(str(directory))}`"
        )
    return (
        "no configuration directory given, and there is no ./config here (the default; "
        "LINECTL_CONFIG_DIR is not set). Write a starter configuration with `linectl init "
        "DIR` and check it with `linectl config check DIR` (`linectl init config` makes it "
        "the default in this directory)"
    )


def _cmd_config_check(args: argparse.Namespace, out: TextIO) -> int:
    directory = _config_dir(args.directory)
    if args.directory is None and not directory.exists():
        raise ConfigError(_no_default_config(directory))
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


def _recipe_file(loaded: LoadedConfig, given: Path) -> Path:
    """A recipe file as given, else by name in recipes_dir as `run --recipe` finds it; a
    name that is neither lists the recipes there."""
    if given.is_file():
        return given
    path = loaded.recipe_path(str(given))
    if path.exists() or path != loaded.recipes_dir / f"{given}.toml":
        return path  # a path (suffix or directory) that is missing: load_recipe says so
    names = sorted(p.stem for p in loaded.recipes_dir.glob("*.toml"))
    close = difflib.get_close_matches(str(given), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"recipe {str(given)!r}: no such file, and no recipe of that name in "
        f"{loaded.recipes_dir}; {hint}available: {', '.join(names) or 'none'}"
    )


def _cmd_recipe_check(args: argparse.Namespace, out: TextIO) -> int:
    loaded = load_config(_config_dir(args.config))
    path = _recipe_file(loaded, args.file)
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
    # Imported lazily: the CLI works without the simulators (mypy skips their code: see
    # [tool.mypy] in pyproject.toml).
    try:
        import simulators.cli  # noqa: F401, PLC0415 - only `linectl sim` needs them
    except ModuleNotFoundError as exc:
        if exc.name not in ("simulators", "simulators.cli"):
            raise
        print("linectl: error: the simulators are not installed (simulators.cli)", file=sys.stderr)
        return EXIT_BAD_INPUT
    # What sys.modules holds (a test's stand-in included): `simulators.cli` as a name
    # is the package's attribute, which an earlier import may have set to the real one.
    sim_cli = sys.modules["simulators.cli"]
    sim_main = cast(Callable[[list[str]], int | None], sim_cli.main)
    asks_help = any(word in ("-h", "--help") for word in rest)
    if not asks_help and not _gives_config(rest):
        directory, reference = config_dir_or_reference()
        if reference:  # the simulators log on stderr: said there, first
            print(reference_config_note(directory), file=sys.stderr, flush=True)
            rest = ["--config", str(directory), *rest]
    try:
        code = sim_main(rest)
    except SystemExit as exc:  # its argparse on --help or a usage error
        code = exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if asks_help:
        print(
            f"\n--config DIR defaults to $LINECTL_CONFIG_DIR, else ./config if it exists, else "
            f"the reference configuration shipped with linectl ({reference_config_dir()}).",
            file=out,
        )
    return EXIT_OK if code is None else int(code)


def _gives_config(argv: list[str]) -> bool:
    """Whether the simulators' arguments name a configuration: --config DIR or
    --config=DIR, or an abbreviation their argparse takes for it (--co, --conf, ...)."""
    for word in argv:
        if word == "--":
            break
        name = word.split("=", 1)[0]
        if len(name) >= len("--co") and "--config".startswith(name):
            return True
    return False


# --------------------------------------------------------------------------- init

_STARTER_FILES = ("line.toml", "registers/*.toml", "recipes/*.toml")
"""What `linectl init` copies from the reference configuration (never anything a checkout
may have added there, such as records)."""

_STARTER_HEADER = """\
# Starter configuration written by `linectl init` (linectl {version}): a copy of the
# reference line shipped with linectl. Edit it for your line: line_id; the PLC endpoints
# in [accelerator] and [conveyor]; registers/, your PLCs' register maps; [geometry], from
# the line's drawings; recipes/, your validated recipes. Then check it with
# `linectl config check DIR` (DIR: the directory that holds this file).
#
"""


def _cmd_init(args: argparse.Namespace, out: TextIO) -> int:
    """Handler of `linectl init DIR`: the reference configuration, copied to start from."""
    target: Path = args.directory
    source = reference_config_dir()
    files = sorted({path for pattern in _STARTER_FILES for path in source.glob(pattern)})
    if not (source / "line.toml").is_file():
        raise LocalError(
            f"{source}: the reference configuration is missing from this installation of "
            "linectl (reinstall it)"
        )
    if target.exists() and not target.is_dir():
        raise LocalError(f"{target}: exists and is not a directory; nothing written")
    written: list[Path] = []
    try:
        if target.is_dir() and any(target.iterdir()) and not args.force:
            raise LocalError(
                f"{target}: exists and is not empty; nothing written (give another DIR, or "
                "--force to overwrite the starter's files in it)"
            )
        for path in files:
            relative = path.relative_to(source)
            dest = target / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = path.read_text(encoding="utf-8")
            if relative == Path("line.toml"):
                text = _STARTER_HEADER.format(version=__version__) + text
            dest.write_text(text, encoding="utf-8")
            written.append(dest)
        records = target / "records"
        records.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = exc.filename or target
        raise LocalError(
            f"{where}: cannot write the starter configuration: {exc.strerror}"
        ) from None
    print(f"wrote a starter configuration (the reference line) to {target}:", file=out)
    for path in written:
        print(f"  {path}", file=out)
    print(f"  {records}{os.sep}  (the records: [records] path in line.toml)", file=out)
    quoted = shlex.quote(str(target))
    print(
        "edit it for your line (PLC endpoints, register maps, geometry, recipes), then:\n"
        f"  linectl config check {quoted}    check it\n"
        f"  linectl sim --config {quoted}    simulated PLCs serving its register maps\n"
        f"  linectl run --config {quoted}    the controller (in another terminal)",
        file=out,
    )
    return EXIT_OK


# --------------------------------------------------------------------------- client


def _settings(args: argparse.Namespace, loaded: LoadedConfig | None = None) -> ClientSettings:
    loaded = loaded or load_config(_config_dir(args.config))
    return client_settings(loaded, broker=args.broker, sender=getattr(args, "sender", None))


_HTTP_OPTIONS = (("--user", "user"), ("--password-file", "password_file"), ("--cafile", "cafile"))


def _http(args: argparse.Namespace) -> tuple[LoadedConfig, HttpTarget | None]:
    """The configuration, and the line's HTTP API when the client uses it: with no
    broker (neither --broker nor [mqtt] enabled = true) and [http] enabled = true.
    LocalError when neither way to the line is enabled."""
    loaded = load_config(_config_dir(args.config))
    line = loaded.line
    if args.broker is not None or line.mqtt.enabled:
        given = [opt for opt, key in _HTTP_OPTIONS if getattr(args, key) is not None]
        if given:
            how = "--broker" if args.broker is not None else "[mqtt] enabled = true in line.toml"
            raise LocalError(
                f"{', '.join(given)}: only for the line's HTTP API, but this client reaches "
                f"the line through the MQTT broker ({how}); LINECTL_MQTT__ENABLED=false "
                "uses the HTTP API ([http] enabled = true)"
            )
        return loaded, None
    if not line.http.enabled:
        raise LocalError(
            f"no way to reach the line: {loaded.directory / 'line.toml'} has [mqtt] "
            "enabled = false and [http] enabled = false. The client talks to `linectl run` "
            "through its HTTP API or through an MQTT broker: set [http] enabled = true "
            "(with [http.users]; or LINECTL_HTTP__ENABLED=true here) or [mqtt] enabled = "
            "true, as the daemon has it, or give --broker HOST[:PORT]"
        )
    target = http_target(
        loaded, user=args.user, sender=getattr(args, "sender", None), cafile=args.cafile
    )
    return loaded, target


def _http_settings(target: HttpTarget) -> ClientSettings:
    """What the renderings of linectl.client need: the line and where it is."""
    return ClientSettings(
        target.line_id, target.host, target.port, address=target.url, mqtt_enabled=False
    )


def _other_line(target: HttpTarget, api: ApiSession) -> None:
    if api.line_id and api.line_id != target.line_id:
        print(
            f"linectl: note: the HTTP API at {target.url} serves line {api.line_id}, not "
            f"{target.line_id} as this configuration says",
            file=sys.stderr,
        )


def _read_http(args: argparse.Namespace, out: TextIO, target: HttpTarget, alarms: bool) -> int:
    password = read_password(target, args.password_file)

    async def get() -> dict[str, Any]:
        async with ApiSession(target, password, timeout_s=args.timeout) as api:
            _other_line(target, api)
            return await api.state()

    doc = asyncio.run(get())
    if args.json:
        json.dump(doc, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        settings = _http_settings(target)
        view = hmi_view(settings, doc)
        lines = view.alarm_lines(settings) if alarms else view.status_lines(settings)
        out.write("\n".join(lines) + "\n")
    out.flush()
    return EXIT_OK


def _view_json(settings: ClientSettings, view: LineView) -> dict[str, Any]:
    return {
        "line_id": settings.line_id,
        "broker": settings.broker,
        "status": view.status,
        "state": view.state,
        "alarms_active": view.alarms,
        "live": view.live,
    }


def _read(args: argparse.Namespace, out: TextIO, need: set[str], alarms: bool) -> int:
    loaded, target = _http(args)
    if target is not None:
        return _read_http(args, out, target, alarms)
    settings = _settings(args, loaded)
    view = asyncio.run(read_line(settings, need, args.timeout))
    why = not_online_text(settings, view, args.timeout)
    if view.status is None:
        raise NoAnswerError(why)
    if args.json:
        json.dump(_view_json(settings, view), out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        lines = view.alarm_lines(settings) if alarms else view.status_lines(settings)
        out.write("\n".join(lines) + "\n")
    out.flush()
    if why:
        print(f"linectl: {why}", file=sys.stderr)
        return EXIT_NO_ANSWER
    return EXIT_OK


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    return _read(args, out, {"status", "state", "alarms_active"}, alarms=False)


def _send_http(
    target: HttpTarget, password: str, name: CommandName, payload: bytes, timeout_s: float
) -> tuple[ApiSession, Callable[[], Answer]]:
    """The session the command goes through, and the call that sends it (so that a
    Ctrl-C can tell whether it went out)."""
    api = ApiSession(target, password, timeout_s=timeout_s)

    async def send() -> Answer:
        async with api:
            _other_line(target, api)
            obj = await api.command(name.value, payload)
        return Answer(read_answer(obj), obj)

    return api, lambda: asyncio.run(send())


def _send(
    args: argparse.Namespace, out: TextIO, name: CommandName, cmd_args: dict[str, Any]
) -> int:
    loaded, target = _http(args)
    settings = _settings(args, loaded) if target is None else _http_settings(target)
    sender = settings.sender if target is None else target.user
    request_id = new_request_id()
    cmd_args["reason"] = args.reason
    # Checked by the daemon's own parser before anything is sent: bad input exits 2.
    payload = command_payload(name, cmd_args, sender=sender, request_id=request_id)
    client: LineClient | ApiSession
    if target is None:
        client = LineClient(settings, connect_timeout_s=args.timeout)
        mqtt_client = client

        def run() -> Answer:
            return asyncio.run(send_command(mqtt_client, name, payload, request_id, args.timeout))
    else:
        password = read_password(target, args.password_file)
        client, run = _send_http(target, password, name, payload, args.timeout)
    try:
        answer = run()
    except KeyboardInterrupt:
        if client.sent:
            print(
                f"linectl: interrupted before the answer came; {name.value} was sent and may "
                "still be carried out: check `linectl status`",
                file=sys.stderr,
            )
        else:
            print(f"linectl: interrupted; {name.value} was not sent", file=sys.stderr)
        return EXIT_INTERRUPTED
    text = describe_answer(settings.line_id, answer.result)
    if args.json:
        json.dump(answer.payload, out, indent=2, sort_keys=True)
        out.write("\n")
    elif answer.result.ack:
        print(text, file=out)
    out.flush()
    if not answer.result.ack:
        print(f"linectl: {text}", file=sys.stderr)
        return EXIT_NAK
    return EXIT_OK


def _cmd_reel_start(args: argparse.Namespace, out: TextIO) -> int:
    cmd_args = {
        "reel_id": args.reel_id,
        "length_m": args.length,
        "operator": args.operator,
        "recipe": args.recipe,
    }
    return _send(args, out, CommandName.START_REEL, cmd_args)


def _cmd_reel_stop(args: argparse.Namespace, out: TextIO) -> int:
    return _send(args, out, CommandName.STOP, {})


def _cmd_reel_end(args: argparse.Namespace, out: TextIO) -> int:
    return _send(args, out, CommandName.END_REEL, {"reel_id": args.reel_id})


def _cmd_alarms(args: argparse.Namespace, out: TextIO) -> int:
    if args.action is None:
        if args.reason is not None:
            raise LocalError("--reason goes with `alarms ack KIND`")
        return _read(args, out, {"status", "alarms_active"}, alarms=True)
    if args.kind is None:
        raise LocalError("alarms ack needs the alarm KIND (as `linectl alarms` lists it) or 'all'")
    kind = "*" if args.kind == "all" else args.kind
    if kind != "*" and kind not in ALARM_KINDS:
        # Checked here, so that a mistyped kind is never sent (exit 2).
        raise LocalError(f"unknown alarm kind {kind!r}: one of {', '.join(ALARM_KINDS)}, or 'all'")
    return _send(args, out, CommandName.ACK_ALARM, {"alarm": kind})


def _cmd_reset(args: argparse.Namespace, out: TextIO) -> int:
    return _send(args, out, CommandName.RESET, {})


def _cmd_recipe_select(args: argparse.Namespace, out: TextIO) -> int:
    return _send(args, out, CommandName.SELECT_RECIPE, {"recipe": args.recipe})


def _watch_http(
    args: argparse.Namespace, out: TextIO, loaded: LoadedConfig, target: HttpTarget
) -> int:
    password = read_password(target, args.password_file)
    settings = _http_settings(target)
    screen = out.isatty() and not args.lines
    if not screen:
        print(f"linectl: watching {settings.line_id} at {target.url}", file=sys.stderr)
    timeout_s = args.timeout
    # Ctrl-C is how a watch ends: exit 0, not 130.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            watch_hmi(
                settings,
                out,
                lambda sink: follow(target, password, sink, timeout_s=timeout_s),
                screen=screen,
                duration_s=args.duration,
                # The plant's meaningful changes, as the MQTT telemetry reports them.
                deadbands=loaded.line.mqtt.deadbands,
            )
        )
    return EXIT_OK


def _cmd_watch(args: argparse.Namespace, out: TextIO) -> int:
    loaded, target = _http(args)
    if target is not None:
        return _watch_http(args, out, loaded, target)
    settings = _settings(args, loaded)
    screen = out.isatty() and not args.lines
    if not screen:
        print(f"linectl: watching {settings.line_id} at {settings.broker}", file=sys.stderr)
    # Ctrl-C is how a watch ends: exit 0, not 130.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            watch(
                settings,
                out,
                screen=screen,
                duration_s=args.duration,
                connect_timeout_s=args.timeout,
            )
        )
    return EXIT_OK


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


MIN_PASSWORD_CHARS = 8


def _cmd_http_hash_password(args: argparse.Namespace, out: TextIO) -> int:
    """Handler of `linectl http hash-password`."""
    if args.user is not None:
        check_value("sender", args.user)
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise LocalError("the two passwords differ; nothing printed")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD_CHARS:
        raise LocalError(f"a password has at least {MIN_PASSWORD_CHARS} characters")
    encoded = hash_password(password)
    if args.user is None:
        print(f'password_hash = "{encoded}"', file=out)
    else:
        print(f'[http.users.{args.user}]\npassword_hash = "{encoded}"\nrole = "operator"', file=out)
    return 0


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
    # The daemon's log is the line's logbook: state changes and operator actions are
    # logged at info, so `run` shows info unless told otherwise.
    _setup_logging(args.verbose + int(getattr(args, "log_info_by_default", False)))
    handler = cast(Callable[[argparse.Namespace, TextIO], int], args.handler)
    try:
        code = handler(args, sys.stdout)
        # A pipe closed meanwhile (`linectl run | tee log`, tee killed by the same Ctrl-C)
        # shows here, after the handler did its work (for `run`: the safe stop), and not
        # as an error in the interpreter's own final flush.
        sys.stdout.flush()
        return code
    except (NoAnswerError, HttpApiError) as exc:
        print(f"linectl: error: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except BrokerError as exc:
        print(f"linectl: error: {exc}", file=sys.stderr)
        return EXIT_BROKER
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
