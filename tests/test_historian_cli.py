"""`linectl historian ...` and `linectl report --historian` from the command line, the
historian's configuration file, and the messages it refuses (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_support import fresh_database

from linectl.cli import main
from linectl.core.ledger import MetreRecord, Verdict
from linectl.errors import ConfigError
from linectl.historian.config import load_historian_config
from linectl.historian.pg import HistorianDB, RecordIn
from linectl.historian.service import BadMessageError, HeadMsg, RecordMsg, parse_message
from linectl.report import build_report
from linectl.store import RecordStore, ReelInfo

RECIPE_JSON = json.dumps(
    {"product": "PV", "version": "3", "min_dose_kgy": 105.0, "target_dose_kgy": 120.0,
     "max_dose_kgy": 140.0}
)  # fmt: skip


# ---------------------------------------------------------------------- configuration


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "historian.toml"
    p.write_text(text)
    return p


def test_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_historian_config(write(tmp_path, '[historian]\nlines = ["line-1"]\n'), {})
    assert cfg.historian.id == "plant"
    assert cfg.mqtt.port == 1883
    assert cfg.postgres.dsn == ""  # libpq's environment then


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[historian]\nlines = ["line/1"]\n', "historian.lines.0"),
        ('[historian]\nlines = ["a", "a"]\n', "names a line twice"),
        ("[historian]\nlines = []\n", "historian.lines"),
        ('[historian]\nlines = ["a"]\nid = "pl+nt"\n', "historian.id"),
        ('[historian]\nlines = ["a"]\n[mqtt]\nport = 0\n', "mqtt.port"),
        ('[historian]\nlines = ["a"]\n[postgres]\ndsm = "x"\n', "postgres.dsm: unknown key"),
        ("[mqtt]\n", "historian: Field required"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path: Path, text: str, named: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_historian_config(path, {})
    assert str(path) in str(err.value)
    assert named in str(err.value)


def test_mqtt_password_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[historian]\nlines = ["a"]\n')
    cfg = load_historian_config(path, {"HISTORIAN_MQTT_PASSWORD": "s3cret"})
    assert cfg.mqtt.password == "s3cret"
    assert "s3cret" not in repr(cfg)


# ---------------------------------------------------------------------- messages


def test_records_and_heads_parse_and_other_historians_replies_are_not_ours() -> None:
    payload = {"schema": "linectl.reel/1", "seq": 4, "historical": False, "quality": "GOOD",
               "t_ms": 1, "store_id": "S", "t": "2026-01-01T00:00:00+00:00", "event": "end",
               "reel_id": "R"}  # fmt: skip
    m = parse_message("linectl/l1/records/reel", json.dumps(payload).encode(), "linectl", "plant")
    assert isinstance(m, RecordMsg)
    assert (m.line_id, m.store_id, m.seq, m.kind) == ("l1", "S", 4, "reel")
    assert m.data == {"event": "end", "reel_id": "R"}  # the record, not its envelope
    head = {"store_id": "S", "seq": 9, "first_seq": 1}
    h = parse_message("linectl/l1/records/head", json.dumps(head).encode(), "linectl", "plant")
    assert h == HeadMsg("l1", "S", 9, 1)
    other = parse_message("linectl/l1/replayed/other/reel", b"{}", "linectl", "plant")
    assert other is None


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"seq": -1, "store_id": "S", "t": "x", "t_ms": 1}', "'seq' must be"),
        (b'{"seq": 0, "store_id": "S", "t": "x", "t_ms": 1}', "'seq' must be 1 or more"),
        (b'{"seq": 1, "t": "x", "t_ms": 1}', "'store_id' must be"),
        (b'{"seq": 1, "store_id": "S", "t_ms": 1}', "'t' must be"),
    ],
)
def test_bad_records_are_refused_with_the_reason(payload: bytes, why: str) -> None:
    with pytest.raises(BadMessageError, match=why):
        parse_message("linectl/l1/records/metres", payload, "linectl", "plant")


# ---------------------------------------------------------------------- against PostgreSQL


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with fresh_database("historian_cli") as d:
        yield d


@pytest.fixture(scope="module")
def line_store(tmp_path_factory: pytest.TempPathFactory, dsn: str) -> Path:
    """Two lines' stores, the same reel id on both, all of it in the historian."""

    paths = {}
    for line_id in ("line-1", "line-2"):
        path = tmp_path_factory.mktemp(line_id) / "r.sqlite"
        with RecordStore(path) as s:
            for n, (reel, short) in enumerate((("SHARED", False), (f"{line_id}-X", True))):
                t = f"2026-11-0{n + 1}T08:00:00.000+00:00"
                s.open_reel(ReelInfo(reel, line_id, "PV", "3", "ab" * 32, RECIPE_JSON, "alice",
                                     20.0, t))  # fmt: skip
                recs = [MetreRecord(i, 120.0, 119.0, 121.0, Verdict.IN_SPEC) for i in range(20)]
                if short:
                    recs[3] = MetreRecord(3, 90.0, 89.0, 91.0, Verdict.UNDER_DOSE, ("under_dose",))
                s.add_metres(reel, recs, t.replace("08:00", "08:01"))
                s.close_reel(reel, t.replace("08:00", "08:02"), "planned length reached")
            rows = s.outbox_after(0, 1000)
            store_id = s.store_id

        records = [RecordIn(line_id, store_id, r.seq, r.kind, r.t, r.data) for r in rows]
        asyncio.run(apply_all(dsn, records))
        paths[line_id] = path
    return paths["line-1"]


async def apply_all(dsn: str, records: list[RecordIn]) -> None:
    db = await HistorianDB.open(dsn)
    try:
        await db.apply(records)
    finally:
        await db.close()


def run_cli(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "linectl", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_report_from_the_historian_is_the_lines_report(line_store: Path, dsn: str) -> None:
    code, stdout, stderr = run_cli(
        "report", "--historian", dsn, "--line", "line-1", "SHARED", "--json"
    )
    assert code == 0, stderr
    with RecordStore(line_store) as s:
        mine = json.dumps(build_report(s, "SHARED"), indent=2) + "\n"
    assert stdout == mine


def test_a_reel_id_on_two_lines_needs_line(line_store: Path, dsn: str) -> None:
    code, _, stderr = run_cli("report", "--historian", dsn, "SHARED")
    assert code == 2
    assert "exists on lines line-1, line-2: give --line" in stderr
    code, _, stderr = run_cli("report", "--historian", dsn, "NOPE")
    assert code == 2
    assert "no reel 'NOPE' in the historian" in stderr


def test_the_plant_list_filters(line_store: Path, dsn: str) -> None:
    code, stdout, stderr = run_cli("report", "--historian", dsn, "--json")
    assert code == 0, stderr
    reels = json.loads(stdout)["reels"]
    assert sorted((r["line_id"], r["reel_id"]) for r in reels) == [
        ("line-1", "SHARED"), ("line-1", "line-1-X"), ("line-2", "SHARED"), ("line-2", "line-2-X")
    ]  # fmt: skip
    code, stdout, _ = run_cli("report", "--historian", dsn, "--json", "--verdict", "HOLD")
    assert {r["reel_id"] for r in json.loads(stdout)["reels"]} == {"line-1-X", "line-2-X"}
    code, stdout, _ = run_cli(
        "report", "--historian", dsn, "--json", "--line", "line-2", "--since", "2026-11-02"
    )
    assert [r["reel_id"] for r in json.loads(stdout)["reels"]] == ["line-2-X"]
    code, stdout, _ = run_cli("report", "--historian", dsn)
    assert code == 0
    assert stdout.splitlines()[0].split()[:2] == ["line", "reel"]
    assert "HOLD" in stdout


def test_an_empty_plant_list_says_where_it_looked(line_store: Path, dsn: str) -> None:
    code, stdout, _ = run_cli("report", "--historian", dsn, "--line", "line-9")
    assert (code, stdout) == (0, "no reels in the historian\n")
    code, stdout, _ = run_cli("report", "--historian", dsn, "--line", "line-9", "--csv")
    assert code == 0
    assert stdout.startswith("line_id,reel_id,")
    assert stdout.rstrip().endswith(",verdict")


def test_list_filters_with_a_reel_are_refused(line_store: Path, dsn: str) -> None:
    code, _, stderr = run_cli("report", "--historian", dsn, "SHARED", "--verdict", "HOLD")
    assert code == 2
    assert "--verdict filters the list of reels: give no REEL" in stderr


def test_a_password_in_the_dsn_is_never_printed() -> None:
    dsn = "host=127.0.0.1 port=1 dbname=x password=hunter22"
    code, _, stderr = run_cli("report", "--historian", dsn)
    assert code == 2
    assert "cannot connect" in stderr
    assert "hunter22" not in stderr
    assert "password=***" in stderr


def test_plant_filters_need_the_historian_and_bad_dates_are_named() -> None:
    assert main(["report", "--line", "line-1", "--db", "/nonexistent.sqlite"]) == 2
    code, _, stderr = run_cli("report", "--historian", "dbname=x", "--since", "yesterday")
    assert code == 2
    assert "--since 'yesterday': not an ISO 8601 date" in stderr
    code, _, stderr = run_cli("report", "--historian", "host=127.0.0.1 port=1 dbname=x")
    assert code == 2
    assert "historian database 'host=127.0.0.1 port=1 dbname=x': cannot connect" in stderr.replace(
        "dbname=x host=127.0.0.1 port=1", "host=127.0.0.1 port=1 dbname=x"
    )
    assert "Traceback" not in stderr


def test_historian_status_and_migrate(line_store: Path, dsn: str, tmp_path: Path) -> None:
    code, stdout, stderr = run_cli("historian", "migrate", "--dsn", dsn)
    assert code == 0, stderr
    assert "schema version 1" in stdout
    code, stdout, stderr = run_cli("historian", "status", "--dsn", dsn, "--json")
    assert code == 0, stderr
    stores = json.loads(stdout)["stores"]
    assert sorted(s["line_id"] for s in stores) == ["line-1", "line-2"]
    # As docs/historian.md runs it: the database named by the configuration file.
    conf = write(tmp_path, f'[historian]\nlines = ["line-1"]\n[postgres]\ndsn = "{dsn}"\n')
    code, stdout, stderr = run_cli("historian", "status", "--config", str(conf))
    assert code == 0, stderr
    assert "line line-1 store " in stdout


def test_historian_check_names_a_bad_file(tmp_path: Path) -> None:
    bad = write(tmp_path, '[historian]\nlines = ["a b"]\n')
    code, _, stderr = run_cli("historian", "check", "--config", str(bad))
    assert code == 2
    assert str(bad) in stderr
    assert "historian.lines.0" in stderr
    good = write(tmp_path, '[historian]\nlines = ["a"]\n')
    code, stdout, _ = run_cli("historian", "check", "--config", str(good))
    assert code == 0
    assert "historian plant: lines a" in stdout


def test_run_waits_for_its_database_and_its_broker_and_says_so(tmp_path: Path) -> None:
    # Started before PostgreSQL (a plant's boot order is not guaranteed): it waits, says
    # why once, and a SIGTERM then stops it cleanly.
    conf = write(
        tmp_path,
        '[historian]\nlines = ["a"]\n[postgres]\ndsn = "host=127.0.0.1 port=1 dbname=x"\n',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "linectl", "historian", "run", "--config", str(conf)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20.0
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while "trying again" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        assert "cannot connect" in line
        assert "trying again every 5 s" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    assert code == 0
