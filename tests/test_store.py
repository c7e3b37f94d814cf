"""The record store: round trip, never a metre twice, crash safety, alarms, audit."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from linectl.core.ledger import MetreRecord, Verdict
from linectl.errors import LocalError
from linectl.store import (
    SCHEMA_VERSION,
    RecordStore,
    ReelInfo,
    StoreFileError,
    StoreLockedError,
    check_database,
    limit_lock_waits,
)

T0 = "2025-01-10T08:00:00.000+00:00"
T1 = "2025-01-10T08:01:00.000+00:00"
T2 = "2025-01-10T08:02:00.000+00:00"


def reel_info(reel_id: str = "R1", line_id: str = "line1") -> ReelInfo:
    return ReelInfo(
        reel_id=reel_id,
        line_id=line_id,
        recipe_product="PV1-F 1x6 mm2 EN 50618",
        recipe_version="1",
        recipe_hash="ab" * 32,
        recipe_json='{"min_dose_kgy": 105.0, "target_dose_kgy": 120.0, "max_dose_kgy": 140.0}',
        operator="alice",
        planned_length_m=500.0,
        started_at=T0,
        start={"l0_m": 1234.5, "q0_uc": 17.0},
    )


def metre(i: int, dose: float = 120.0, verdict: Verdict = Verdict.IN_SPEC) -> MetreRecord:
    causes = () if verdict is Verdict.IN_SPEC else (verdict.value,)
    return MetreRecord(i, dose, dose - 1.0, dose + 1.0, verdict, causes)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RecordStore]:
    with RecordStore(tmp_path / "rec" / "linectl.sqlite") as s:
        yield s


def test_pragmas_and_schema(store: RecordStore) -> None:
    db = sqlite3.connect(store.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
    with store._lock:  # the store's own connection carries the per-connection pragmas
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.schema_version() == SCHEMA_VERSION
    assert store.integrity_check() == "ok"


def test_reopen_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with RecordStore(path) as s:
        s.open_reel(reel_info())
    with RecordStore(path) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert [r.reel_id for r in s.reels()] == ["R1"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    RecordStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(LocalError, match="newer"):
        RecordStore(path)


def test_round_trip(store: RecordStore) -> None:
    store.open_reel(reel_info())
    recs = [
        metre(0),
        metre(1, 100.0, Verdict.UNDER_DOSE),
        MetreRecord(2, 150.0, 120.0, 180.0, Verdict.OVER_DOSE, ("standstill", "over_dose")),
    ]
    assert store.add_metres("R1", recs, T1) == 3
    stored = store.metres("R1")
    assert [m.to_record() for m in stored] == recs
    assert all(m.recorded_at == T1 for m in stored)
    assert store.last_metre_index("R1") == 2
    assert store.metre_count("R1") == 3

    r = store.reel("R1")
    assert r.reel_id == "R1"
    assert r.recipe_hash == "ab" * 32
    assert r.start == {"l0_m": 1234.5, "q0_uc": 17.0}
    assert r.state == "open"
    assert r.ended_at is None
    store.close_reel("R1", T2, "planned length reached")
    r = store.reel("R1")
    assert (r.state, r.ended_at, r.end_reason) == ("closed", T2, "planned length reached")
    with pytest.raises(LocalError, match="closed"):
        store.add_metres("R1", [metre(3)], T2)
    with pytest.raises(LocalError, match="closed"):
        store.close_reel("R1", T2, "again")


def test_reel_id_used_once(store: RecordStore) -> None:
    store.open_reel(reel_info())
    with pytest.raises(LocalError, match="exists already"):
        store.open_reel(reel_info())


def test_unknown_reel(store: RecordStore) -> None:
    with pytest.raises(LocalError, match="no reel"):
        store.reel("nope")
    with pytest.raises(LocalError, match="no reel"):
        store.add_metres("nope", [metre(0)], T1)
    assert store.last_metre_index("nope") is None


def test_nan_dose_is_stored_as_unknown(store: RecordStore) -> None:
    store.open_reel(reel_info())
    nan = float("nan")
    store.add_metres("R1", [MetreRecord(0, nan, nan, nan, Verdict.UNPROVEN, ("gap",))], T1)
    (m,) = store.metres("R1")
    assert m.dose_kgy is None
    assert m.verdict is Verdict.UNPROVEN


def test_duplicate_metre_not_counted_twice(store: RecordStore) -> None:
    store.open_reel(reel_info())
    assert store.add_metres("R1", [metre(0), metre(1)], T1) == 2
    # Same content again (a replay after restart): ignored.
    assert store.add_metres("R1", [metre(1), metre(2)], T2) == 1
    # Other content for a stored index: the first record wins, never overwritten.
    assert store.add_metres("R1", [metre(0, 200.0, Verdict.OVER_DOSE)], T2) == 0
    stored = store.metres("R1")
    assert [m.index for m in stored] == [0, 1, 2]
    assert stored[0].verdict is Verdict.IN_SPEC
    assert stored[1].recorded_at == T1


def test_state_saved_with_metres_atomically(store: RecordStore) -> None:
    store.open_reel(reel_info())
    assert store.load_state("R1", "ledger") is None
    store.add_metres("R1", [metre(0)], T1, state={"ledger": {"next_metre": 1, "pos_m": 70.2}})
    assert store.load_state("R1", "ledger") == {"next_metre": 1, "pos_m": 70.2}
    store.save_state("R1", "ledger", {"next_metre": 2})
    assert store.load_state("R1", "ledger") == {"next_metre": 2}
    # A failing transaction stores neither the metres nor the state.
    store.close_reel("R1", T2, "done")
    with pytest.raises(LocalError):
        store.add_metres("R1", [metre(1)], T2, state={"ledger": {"next_metre": 99}})
    assert store.load_state("R1", "ledger") == {"next_metre": 2}
    with pytest.raises(LocalError, match="no reel"):
        store.save_state("nope", "ledger", {})


def test_open_reel_found_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with RecordStore(path) as s:
        s.open_reel(reel_info("R1"))
        s.add_metres("R1", [metre(i) for i in range(5)], T1)
        s.close_reel("R1", T1, "done")
        s.open_reel(reel_info("R2"))
        s.open_reel(reel_info("X1", line_id="line2"))
        s.add_metres("R2", [metre(i) for i in range(3)], T2)
    with RecordStore(path) as s:
        found = s.find_open_reel("line1")
        assert found is not None
        assert found.reel_id == "R2"
        assert found.start == {"l0_m": 1234.5, "q0_uc": 17.0}
        assert s.last_metre_index("R2") == 2
        assert s.find_open_reel("line3") is None
        assert [r.reel_id for r in s.reels()] == ["R1", "R2", "X1"]


def test_mark_unproven(store: RecordStore) -> None:
    store.open_reel(reel_info())
    store.add_metres("R1", [metre(0), metre(1), metre(4, 90.0, Verdict.UNDER_DOSE)], T1)
    # Metres 2..6 were not seen by a restarted controller: 2, 3, 5, 6 are new.
    assert store.mark_unproven("R1", 1, 6, "controller restart", T2) == 4
    stored = {m.index: m for m in store.metres("R1")}
    assert sorted(stored) == list(range(7))
    assert stored[1].verdict is Verdict.IN_SPEC  # stored before: kept
    assert stored[4].verdict is Verdict.UNDER_DOSE
    for i in (2, 3, 5, 6):
        assert stored[i].verdict is Verdict.UNPROVEN
        assert stored[i].causes == ("controller restart",)
        assert stored[i].dose_kgy is None
    # The restarted ledger later produces metre 3 again: it stays unproven.
    assert store.add_metres("R1", [metre(3), metre(7)], T2) == 1
    assert {m.index: m for m in store.metres("R1")}[3].verdict is Verdict.UNPROVEN
    with pytest.raises(LocalError):
        store.mark_unproven("R1", 5, 4, "bad", T2)


def test_alarm_lifecycle(store: RecordStore) -> None:
    store.open_reel(reel_info())
    a1 = store.raise_alarm("energy", "energy 1.31 MeV outside 1.2 +/- 0.05", T0, reel_id="R1")
    a2 = store.raise_alarm("plc_comm", "conveyor unreachable", T1)
    assert a1 != a2
    assert [a.id for a in store.active_alarms()] == [a1, a2]
    store.ack_alarm(a1, "bob", T1)
    assert [a.id for a in store.active_alarms()] == [a1, a2]  # acked, not cleared
    store.clear_alarm(a1, T2)
    assert [a.id for a in store.active_alarms()] == [a2]
    store.clear_alarm(a2, T1)
    assert [a.id for a in store.active_alarms()] == [a2]  # cleared, not acknowledged
    store.ack_alarm(a2, "carol", T2)
    store.ack_alarm(a2, "dave", "2025-01-10T09:00:00+00:00")  # second ack keeps the first
    assert store.active_alarms() == []
    (alarm,) = store.alarms("R1")
    assert (alarm.acknowledged_by, alarm.acknowledged_at, alarm.cleared_at) == ("bob", T1, T2)
    assert store.alarms()[1].acknowledged_by == "carol"
    with pytest.raises(LocalError, match="no alarm"):
        store.ack_alarm(999, "bob", T2)


def test_audit(store: RecordStore) -> None:
    store.open_reel(reel_info())
    store.audit(T0, "alice", "start_reel", {"reel_id": "R1"}, True, reel_id="R1")
    store.audit(T1, "bob", "set_speed", {"speed_m_min": 400}, False, reason="above recipe maximum")
    events = store.events()
    assert [(e.actor, e.action, e.accepted) for e in events] == [
        ("alice", "start_reel", True),
        ("bob", "set_speed", False),
    ]
    assert events[1].detail == {"speed_m_min": 400}
    assert events[1].reason == "above recipe maximum"
    assert [e.action for e in store.events("R1")] == ["start_reel"]


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from linectl.core.ledger import MetreRecord, Verdict
    from linectl.store import RecordStore, ReelInfo

    store = RecordStore(Path(sys.argv[1]))
    store.open_reel(ReelInfo("K1", "line1", "p", "1", "00", "{}", "op", None,
                             "2025-01-10T08:00:00+00:00"))
    i = 0
    while True:
        batch = [MetreRecord(j, 120.0, 119.0, 121.0, Verdict.IN_SPEC) for j in range(i, i + 3)]
        store.add_metres("K1", batch, "2025-01-10T08:00:01+00:00",
                         state={"ledger": {"next_metre": i + 3}})
        i += 3
        # Reported only after the commit returned: the parent may rely on it.
        sys.stdout.write(f"{i - 1}\\n")
        sys.stdout.flush()
    """
)


def test_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    last_committed = -1
    deadline = time.monotonic() + 60.0
    try:
        # Kill it mid-run, once it has committed a good number of batches.
        while last_committed < 150:
            line = child.stdout.readline()
            if not line:
                assert child.stderr is not None
                pytest.fail(f"child ended early: {child.stderr.read()}")
            last_committed = int(line)
            assert time.monotonic() < deadline, "child too slow"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
        assert child.stdout is not None
        # Lines written after our last read were committed too.
        for line in child.stdout.read().splitlines():
            if line.strip():
                last_committed = int(line)
        child.stdout.close()
        if child.stderr is not None:
            child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    with RecordStore(path) as s:
        assert s.integrity_check() == "ok"
        indices = [m.index for m in s.metres("K1")]
        n = len(indices)
        assert indices == list(range(n))  # contiguous: no batch half stored
        assert n - 1 >= last_committed
        assert n % 3 == 0  # whole transactions only
        state = s.load_state("K1", "ledger")
        assert state == {"next_metre": n}  # checkpoint in step with the metres
        found = s.find_open_reel("line1")
        assert found is not None
        assert found.reel_id == "K1"


# ------------------------------------------------------------- a locked or damaged database


DB_LOCKER = (
    "import sqlite3, sys\n"
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "db.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
    "db.execute('ROLLBACK')\n"
)
"""A script (`python -c DB_LOCKER PATH`) that holds PATH's write lock, prints "locked",
and lets go when its stdin closes: another process keeping the record database locked."""


@contextlib.contextmanager
def locked(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the database's write lock (BEGIN EXCLUSIVE) until the end
    of the block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DB_LOCKER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)


def test_a_write_on_a_locked_database_says_what_was_not_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "r.sqlite"
    s = RecordStore(path, lock_wait_s=0.3)
    s.open_reel(reel_info())
    with locked(path):
        with pytest.raises(StoreLockedError) as info:
            s.add_metres("R1", [metre(0), metre(1), metre(2)], T1, state={"ledger": {"n": 3}})
        with pytest.raises(StoreLockedError, match="audit event stop by alice"):
            s.audit(T1, "alice", "stop", {}, accepted=True, reel_id="R1")
        assert s.metres("R1") == []  # reads go on: WAL readers never wait for a writer
    message = str(info.value)
    assert str(path) in message
    assert "metres 0-2 of reel R1 and the ledger checkpoint of reel R1 NOT STORED" in message
    assert "locked by another connection" in message
    assert s.unwritten == 2
    # Nothing of a refused write is stored; the next write goes in.
    assert s.load_state("R1", "ledger") is None
    assert s.add_metres("R1", [metre(0)], T2) == 1
    with caplog.at_level(logging.ERROR, logger="linectl.store"):
        s.close()
    summary = [r.getMessage() for r in caplog.records if "NOT STORED" in r.getMessage()]
    assert len(summary) == 1
    assert "2 record write(s) NOT STORED" in summary[0]
    assert "metres 0-2 of reel R1" in summary[0]
    assert "audit event stop by alice" in summary[0]


def test_limit_lock_waits_ends_a_wait_in_progress_and_what_follows(tmp_path: Path) -> None:
    # A SIGTERM with the database locked by another process took 45 s and more: every
    # queued write waited out the 10 s busy timeout in turn (found by attack).
    path = tmp_path / "r.sqlite"
    s = RecordStore(path, lock_wait_s=120.0)
    s.open_reel(reel_info())
    errors: list[BaseException] = []

    def write() -> None:
        try:
            s.add_metres("R1", [metre(0)], T1)
        except BaseException as exc:
            errors.append(exc)

    with locked(path):
        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.3)
        assert writer.is_alive()  # waiting for the lock, as a running line's write does
        limit_lock_waits(0.0)  # what `linectl run` does on SIGTERM
        writer.join(timeout=20.0)  # a hang guard: without the limit it waits 120 s
        assert not writer.is_alive()
        assert len(errors) == 1
        assert isinstance(errors[0], StoreLockedError)
        # The lock is held for long: every later write tries once and says what it lost.
        for i in range(1, 21):
            with pytest.raises(StoreLockedError, match=f"metres {i} of reel R1 NOT STORED"):
                s.add_metres("R1", [metre(i)], T1)
    assert s.unwritten == 21
    s.close()


def test_after_limit_lock_waits_a_moments_contention_costs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    s = RecordStore(path)
    s.open_reel(reel_info())
    s.limit_lock_waits(0.0)
    with locked(path) as proc:
        threading.Timer(0.1, lambda: proc.stdin.close() if proc.stdin else None).start()
        assert s.add_metres("R1", [metre(0)], T1) == 1  # waited for the lock's release
    assert s.unwritten == 0
    s.close()


def _damage(path: Path, first_page: int, pages: int) -> None:
    with path.open("r+b") as f:
        f.seek(4096 * first_page)
        f.write(os.urandom(4096 * pages))


def test_a_file_that_is_not_a_database_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    path.write_bytes(b"not a database, just bytes\n" * 200)
    with pytest.raises(StoreFileError, match=rf"{path}: not a usable record database"):
        RecordStore(path)
    with pytest.raises(StoreFileError, match=rf"{path}: not a usable record database"):
        check_database(path)
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(StoreFileError, match="cannot open the record database"):
        RecordStore(tmp_path / "dir.sqlite")


def test_a_damaged_database_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with RecordStore(path) as s:
        s.open_reel(reel_info())
        for start in range(0, 6000, 500):
            s.add_metres("R1", [metre(i) for i in range(start, start + 500)], T1)
    check_database(path)  # sound
    _damage(path, 20, 4)  # a few pages: the quick check finds them
    with pytest.raises(StoreFileError, match=rf"{path}: .*damaged"):
        check_database(path)
    _damage(path, 1, path.stat().st_size // 4096 - 1)  # every table: a read finds it
    with (
        pytest.raises(StoreFileError, match=rf"{path}: .*damaged"),
        RecordStore(path) as s,
    ):
        s.metres("R1")
