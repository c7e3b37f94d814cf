"""docs/deployment.md 3.4, "Records: location and backup", run as written.

The backup commands are taken from the document's code block (only /var/lib/linectl and
/var/backups/linectl are moved to temporary directories) and run against a store that a
running linectl holds open in WAL mode, with its newest commits still in the WAL; then
the check and the restore rehearsal the section describes: `PRAGMA integrity_check`
prints ok, the file is put in place with the old -wal and -shm removed, linectl opens it
and `linectl report REEL` reports a known reel, as it was when the backup was taken.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from linectl.core.ledger import MetreRecord, Verdict
from linectl.store import RecordStore, ReelInfo

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "deployment.md"
STATE_PREFIX = "/var/lib/linectl"
BACKUP_PREFIX = "/var/backups/linectl"
W0 = "2026-12-07T10:00:00.000+00:00"
W1 = "2026-12-07T10:05:00.000+00:00"


def backup_block() -> list[str]:
    """The shell lines of section 3.4's code block, continuation lines joined."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("### 3.4 ", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "docs/deployment.md 3.4 has no sh code block"
    lines: list[str] = []
    pending = ""
    for raw in block.group(1).splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        lines.append(pending + raw)
        pending = ""
    return lines


def host_command(state: Path, backups: Path, which: str) -> str:
    """The documented command that starts with `which`, paths moved."""
    found = [c for c in backup_block() if c.startswith(which)]
    assert len(found) == 1, f"3.4: one command starting {which!r}, found {found}"
    return found[0].replace(STATE_PREFIX, str(state)).replace(BACKUP_PREFIX, str(backups))


def metres(store: RecordStore, reel_id: str, first: int, count: int) -> None:
    records = [
        MetreRecord(i, 120.0, 119.0, 121.0, Verdict.IN_SPEC) for i in range(first, first + count)
    ]
    store.add_metres(reel_id, records, W1)


def report_json(db: Path, reel_id: str) -> dict[str, object]:
    """`linectl report --db DB --json REEL` (schema linectl.reel-report/1)."""
    out = subprocess.run(
        [sys.executable, "-m", "linectl", "report", "--db", str(db), "--json", reel_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report: dict[str, object] = json.loads(out.stdout)
    return report


@pytest.fixture
def running_store(tmp_path: Path) -> tuple[Path, RecordStore]:
    """/var/lib/linectl as the unit lays it out, with a store linectl holds open."""
    state = tmp_path / "var-lib-linectl"
    (state / "records").mkdir(parents=True)
    db = state / "records" / "linectl.sqlite"
    store = RecordStore(db)
    store.open_reel(
        ReelInfo("R-KNOWN", "line1", "PV", "1", "0" * 64, '{"k": 1}', "alice", 40.0, W0)
    )
    metres(store, "R-KNOWN", 0, 30)
    return db, store


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 CLI is not installed")
def test_backup_while_running_then_restore_rehearsal(
    tmp_path: Path, running_store: tuple[Path, RecordStore]
) -> None:
    db, store = running_store
    state = db.parent.parent
    backups = tmp_path / "var-backups-linectl"
    backups.mkdir()
    try:
        # The newest commits are in the WAL: a copy of the file alone would lose them.
        wal = db.with_name(db.name + "-wal")
        assert wal.exists()
        assert wal.stat().st_size > 0
        copied = tmp_path / "copy.sqlite"
        shutil.copyfile(db, copied)
        conn = sqlite3.connect(copied)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            in_copy = (
                conn.execute("SELECT count(*) FROM metres").fetchone()[0]
                if ("metres" in tables)
                else 0
            )
        finally:
            conn.close()
        assert in_copy < 30, "the test's commits were not in the WAL: it shows nothing"

        # The documented backup on the host, while linectl runs.
        cmd = host_command(state, backups, "sqlite3 ")
        subprocess.run(["bash", "-c", cmd], check=True, timeout=60)
        made = sorted(backups.glob("linectl-*.sqlite"))
        assert len(made) == 1, f"{cmd}: made {made}"
        backup = made[0]
        assert re.fullmatch(r"linectl-\d{4}-\d{2}-\d{2}\.sqlite", backup.name)
        # "Check each backup": the documented check prints ok.
        check = subprocess.run(
            ["sqlite3", str(backup), "PRAGMA integrity_check"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert check.stdout.strip() == "ok"

        # linectl goes on after the backup: these metres are not in it.
        metres(store, "R-KNOWN", 30, 10)
    finally:
        store.close()  # "stop linectl"

    # The rehearsal: the backup put in place, the old -wal and -shm removed.
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(backup, db)
    # "start linectl": it opens (and checks) the store, and goes on writing to it.
    with RecordStore(db) as restored:
        assert restored.integrity_check() == "ok"
        assert [m.index for m in restored.metres("R-KNOWN")] == list(range(30))
        metres(restored, "R-KNOWN", 30, 1)
    report = report_json(db, "R-KNOWN")
    reel = report["reel"]
    assert isinstance(reel, dict)
    assert reel["reel_id"] == "R-KNOWN"
    reported = report["metres"]
    assert isinstance(reported, list)
    # As at the backup, plus what the restored linectl wrote; nothing of after the backup.
    assert len(reported) == 31


def test_backup_in_the_container_with_python_alone(
    tmp_path: Path, running_store: tuple[Path, RecordStore]
) -> None:
    """The compose variant's backup (python's sqlite3, no sqlite3 CLI in the image): the
    `python -c` program of the documented `docker compose exec` line, run here."""
    db, store = running_store
    state = db.parent.parent
    try:
        line = host_command(state, tmp_path, "docker compose exec linectl python -c ")
        program = re.search(r'python -c "(.*)"$', line)
        assert program is not None, line
        subprocess.run([sys.executable, "-c", program.group(1)], check=True, timeout=60)
    finally:
        store.close()
    backup = state / "backup.sqlite"
    with RecordStore(backup) as copy:
        assert copy.integrity_check() == "ok"
        assert [m.index for m in copy.metres("R-KNOWN")] == list(range(30))
