"""`linectl historian run|check|migrate|status`: the plant historian's command line.

Wired into `linectl` by linectl.cli (`add_historian_parser`). The PostgreSQL driver is
an optional extra (`pip install 'linectl[historian]'`): it is imported only here, when
a historian command runs, so a line computer never needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any, TextIO

from linectl.errors import LocalError
from linectl.historian.config import HistorianConfig, load_historian_config

DEFAULT_CONFIG = "historian.toml"


def default_config_path() -> Path:
    """./historian.toml (the file a plant keeps is named with --config)."""
    return Path(DEFAULT_CONFIG)


def add_historian_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `historian ACTION` to an argparse subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "historian",
        help="the plant historian: every line's records in PostgreSQL (docs/historian.md)",
        description=(
            "The plant historian keeps every line's records (reels, metres, alarms, audit) "
            "in PostgreSQL: it takes them from the plant broker, asks a line again for "
            "any it missed, and tells each line what it holds so that the line may prune. "
            "Reports: `linectl report --historian DSN`. docs/historian.md."
        ),
    )
    actions = p.add_subparsers(dest="historian_command", metavar="ACTION")
    actions.required = True

    def config_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--config",
            type=Path,
            metavar="FILE",
            help="historian configuration (default: ./historian.toml; an example is "
            "deploy/historian/historian.toml, explained in docs/historian.md)",
        )

    run = actions.add_parser(
        "run",
        help="run the historian until SIGTERM or Ctrl-C",
        description="Migrate the database if needed, connect to the broker with a "
        "persistent session and keep the configured lines' records until stopped.",
    )
    config_arg(run)
    run.set_defaults(handler=_cmd_run, log_info_by_default=True)

    check = actions.add_parser(
        "check", help="validate the configuration file (connects to nothing)"
    )
    config_arg(check)
    check.set_defaults(handler=_cmd_check)

    migrate = actions.add_parser(
        "migrate", help="apply the database migrations and print the schema version"
    )
    config_arg(migrate)
    migrate.add_argument("--dsn", help="the database (default: [postgres] dsn of --config)")
    migrate.set_defaults(handler=_cmd_migrate)

    status = actions.add_parser(
        "status",
        help="each line store's records held, the line's newest, and the incidents",
    )
    config_arg(status)
    status.add_argument("--dsn", help="the database (default: [postgres] dsn of --config)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_cmd_status)
    return p


def _load(args: argparse.Namespace) -> HistorianConfig:
    return load_historian_config(args.config if args.config is not None else default_config_path())


def _dsn(args: argparse.Namespace) -> str:
    if getattr(args, "dsn", None) is not None:
        return str(args.dsn)
    return _load(args).postgres.dsn


def _driver() -> None:
    try:
        import linectl.historian.pg  # noqa: F401, PLC0415 (psycopg: an optional extra)
    except ImportError as exc:
        raise LocalError(
            f"the historian needs its extra: pip install 'linectl[historian]' ({exc})"
        ) from None


def _cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    cfg = _load(args)
    h = cfg.historian
    print(
        f"historian {h.id}: lines {', '.join(h.lines)} on {cfg.mqtt.host}:{cfg.mqtt.port} "
        f"(topics {h.topic_prefix}/<line>/...), database configured: OK",
        file=out,
    )
    return 0


def _cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    cfg = _load(args)
    _driver()
    from linectl.historian.service import run_historian  # noqa: PLC0415 (needs psycopg)

    return asyncio.run(run_historian(cfg))


def _cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    dsn = _dsn(args)
    _driver()
    from linectl.historian.pg import HistorianDB  # noqa: PLC0415 (needs psycopg)

    async def go() -> int:
        db = await HistorianDB.open(dsn)
        try:
            return await db.schema_version()
        finally:
            await db.close()

    print(f"historian database at schema version {asyncio.run(go())}", file=out)
    return 0


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    dsn = _dsn(args)
    _driver()
    from linectl.historian.reader import HistorianReader  # noqa: PLC0415 (needs psycopg)

    with HistorianReader(dsn) as reader:
        stores: list[dict[str, Any]] = reader.line_store_status()
        incidents: list[dict[str, Any]] = reader.incidents()
    if args.json:
        json.dump({"stores": stores, "incidents": incidents}, out, indent=2, default=str)
        out.write("\n")
        return 0
    if not stores:
        print("no line has sent a record yet", file=out)
    for s in stores:
        behind = "" if s["head_seq"] is None else f", line's newest {s['head_seq']}"
        print(
            f"line {s['line_id']} store {s['store_id']}: every record up to "
            f"{s['confirmed_seq']} held{behind}",
            file=out,
        )
    for i in incidents:
        print(
            f"INCIDENT {i['detected_at']} line {i['line_id']} {i['kind']}: "
            f"{json.dumps(i['detail'], sort_keys=True, default=str)}",
            file=out,
        )
    return 0
