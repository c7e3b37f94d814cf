"""The plant historian's database (linectl.historian.pg and .reader) on a real PostgreSQL.

Each test module gets its own fresh database (tests/pg_support.py); tests here share it
and keep apart by line id. Without a server the tests skip, unless CI_REQUIRE_PG=1.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pg_support import fresh_database, pg_database_fixture, required

try:
    import psycopg
except ImportError:  # pragma: no cover (the dev extra installs it)
    if required():
        raise
    pytest.skip("psycopg is not installed (the historian extra)", allow_module_level=True)

from linectl import report
from linectl.core.ledger import MetreRecord, Verdict
from linectl.errors import LocalError
from linectl.historian import pg as hpg
from linectl.historian.pg import (
    HistorianDB,
    Migration,
    MigrationError,
    RecordIn,
    RecordInError,
    load_migrations,
    migrate,
)
from linectl.historian.reader import HistorianReader
from linectl.store import RecordStore, ReelInfo
from linectl.telemetry import record_payload

pg_dsn = pg_database_fixture()

ENVELOPE = {"schema", "seq", "historical", "quality", "t_ms", "store_id", "t", "replay"}
RECIPE_JSON = json.dumps(
    {
        "product": "PV-1x6",
        "min_dose_kgy": 100.0,
        "target_dose_kgy": 120.0,
        "max_dose_kgy": 150.0,
        "speed_min_m_min": 10.0,
    }
)


# --------------------------------------------------------------------------- helpers


def t_at(base: str, seconds: float) -> str:
    """ISO text `seconds` after `base`, as the store writes times (ms, +00:00)."""
    t = datetime.fromisoformat(base).timestamp() + seconds
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def reel_info(reel_id: str, started_at: str, planned_m: float | None = 20.0) -> ReelInfo:
    return ReelInfo(
        reel_id=reel_id,
        line_id="L1",
        recipe_product="PV-1x6",
        recipe_version="3",
        recipe_hash="ab" * 32,
        recipe_json=RECIPE_JSON,
        operator="anna",
        planned_length_m=planned_m,
        started_at=started_at,
        start={"l0_m": 1.25, "counters": {"b": 2, "a": 1}},
    )


def metre(i: int, verdict: Verdict = Verdict.IN_SPEC, *causes: str) -> MetreRecord:
    dose = 120.0 + (i % 7) * 0.37 if verdict is not Verdict.UNDER_DOSE else 95.5
    return MetreRecord(i, dose, dose - 1.5, dose + 1.25, verdict, causes)


def records_of(store: RecordStore, line_id: str) -> list[RecordIn]:
    """The store's outbox as the historian receives it: the payload the line publishes,
    through JSON, without its envelope."""
    out = []
    for row in store.outbox_after(0, 1_000_000):
        payload = record_payload(
            row.seq, row.kind, row.t, row.data, historical=False, store_id=store.store_id
        )
        data = {k: v for k, v in json.loads(json.dumps(payload)).items() if k not in ENVELOPE}
        out.append(RecordIn(line_id, store.store_id, row.seq, row.kind, row.t, data))
    return out


def build_line_store(path: Path) -> RecordStore:
    """A line's store with every kind of record: a reel released at its planned length,
    one ended short with out-of-spec, unproven and missing metres, alarms and audit
    events (transitions too), an open reel, and one reel started in one month whose
    metres were recorded in the next."""
    s = RecordStore(path)
    t0 = "2024-01-10T08:00:00.000+00:00"
    # R-GOOD: 20 m planned, all in spec, closed at its planned length: RELEASE.
    s.open_reel(reel_info("R-GOOD", t0))
    s.audit(
        t_at(t0, 0.5),
        "controller",
        "transition",
        {"from": "idle", "to": "running"},
        True,
        reel_id="R-GOOD",
    )
    for i in range(20):
        s.add_metres("R-GOOD", [metre(i)], t_at(t0, 1 + i * 0.6))
    s.audit(
        t_at(t0, 14),
        "controller",
        "transition",
        {"from": "running", "to": "idle"},
        True,
        reel_id="R-GOOD",
    )
    s.close_reel("R-GOOD", t_at(t0, 15), report.PLANNED_END)
    # R-BAD: under-dose, energy, a gap left missing, unproven ranges, alarms, refused command.
    t1 = "2024-01-10T09:00:00.000+00:00"
    s.open_reel(reel_info("R-BAD", t1, planned_m=40.0))
    a1 = s.raise_alarm("vacuum_high", "vacuum above limit (code 7)", t_at(t1, 2), "R-BAD")
    s.add_metres(
        "R-BAD",
        [metre(0), metre(1), metre(2, Verdict.UNDER_DOSE, "beam_current_low", "gap")],
        t_at(t1, 3),
    )
    s.add_metres("R-BAD", [metre(3, Verdict.ENERGY, "energy")], t_at(t1, 4))
    # 4..5 never recorded: missing.
    s.add_metres("R-BAD", [metre(6), metre(7)], t_at(t1, 5))
    s.mark_unproven("R-BAD", 7, 11, "restart", t_at(t1, 6))  # 7 is held: 8..11 new
    s.ack_alarm(a1, "anna", t_at(t1, 7))
    s.ack_alarm(a1, "bert", t_at(t1, 7.5))  # a second ack keeps the first
    s.clear_alarm(a1, t_at(t1, 8))
    a2 = s.raise_alarm("interlock", "door open", t_at(t1, 9), "R-BAD")
    s.clear_alarm(a2, t_at(t1, 10))  # cleared, never acknowledged: still active
    s.audit(
        t_at(t1, 11),
        "op-1",
        "set_speed",
        {"speed_m_min": 12.5, "request_id": "r-1", "nested": {"z": [1, 2], "a": None}},
        False,
        reason="refused: accelerator fault code 7",
        reel_id="R-BAD",
    )
    s.add_metres("R-BAD", [metre(12), metre(13, Verdict.OVER_DOSE, "speed")], t_at(t1, 12))
    s.close_reel("R-BAD", t_at(t1, 13), "operator ended the reel")
    s.raise_alarm("plc_lost", "accelerator PLC lost", t_at(t1, 20))  # no reel
    s.audit(t_at(t1, 21), "op-2", "login", {"role": "operator"}, True)  # no reel
    # R-MONTH: started on 31 January, its metres on 1 February.
    t2 = "2024-01-31T23:59:58.000+00:00"
    s.open_reel(reel_info("R-MONTH", t2, planned_m=None))
    for i in range(5):
        s.add_metres("R-MONTH", [metre(i)], t_at(t2, 3 + i))
    s.close_reel("R-MONTH", t_at(t2, 10), report.PLANNED_END)
    # R-OPEN: still running.
    t3 = "2024-02-02T10:00:00.000+00:00"
    s.open_reel(reel_info("R-OPEN", t3, planned_m=100.0))
    s.add_metres("R-OPEN", [metre(0), metre(1)], t_at(t3, 1))
    return s


@pytest.fixture(scope="module")
def line_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordStore]:
    store = build_line_store(tmp_path_factory.mktemp("line") / "records.db")
    yield store
    store.close()


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[HistorianDB]:
    hdb = await HistorianDB.open(pg_dsn)
    try:
        yield hdb
    finally:
        await hdb.close()


@pytest.fixture
def reader(pg_dsn: str) -> Iterator[HistorianReader]:
    with HistorianReader(pg_dsn) as r:
        yield r


def report_json(source: Any, reel_id: str) -> str:
    return json.dumps(report.build_report(source, reel_id), indent=2)


def assert_same_as_store(
    reader: HistorianReader, line_id: str, store: RecordStore, reels: Sequence[str]
) -> None:
    """Every reel's report byte-identical, and the reel list agreeing."""
    for reel_id in reels:
        assert report_json(reader.source(line_id), reel_id) == report_json(store, reel_id)
    listed = reader.reel_list(line_id=line_id)
    expected = report.list_reels(store)
    assert [r["reel_id"] for r in listed] == [r["reel_id"] for r in expected]
    for got, want in zip(listed, expected, strict=True):
        assert {k: got[k] for k in want} == want
        assert got["line_id"] == line_id
        assert got["verdict"] == report.build_report(store, want["reel_id"])["verdict"]["decision"]


def sql_one(dsn: str, query: str, params: Sequence[Any] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        return None if row is None else row[0]


def sql_all(dsn: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def start_record(line_id: str, seq: int, reel_id: str, started_at: str, **over: Any) -> RecordIn:
    data: dict[str, Any] = {
        "event": "start",
        "reel_id": reel_id,
        "line_id": line_id,
        "operator": "anna",
        "planned_length_m": 10.0,
        "recipe": {"product": "PV-1x6", "version": "3", "hash": "h"},
        "recipe_json": RECIPE_JSON,
        "start": {},
        "started_at": started_at,
    }
    data.update(over)
    return RecordIn(line_id, "S1", seq, "reel", started_at, data)


def metres_record(
    line_id: str, seq: int, reel_id: str, t: str, indices: Sequence[int], *, dose: float = 120.0
) -> RecordIn:
    metres = [
        {
            "index": i,
            "dose_kgy": dose,
            "min_dose_kgy": dose - 1,
            "max_dose_kgy": dose + 1,
            "verdict": "in_spec",
            "causes": [],
        }
        for i in indices
    ]
    data = {"event": "metres", "reel_id": reel_id, "metres": metres}
    return RecordIn(line_id, "S1", seq, "metres", t, data)


# --------------------------------------------------------------------------- migrations


def test_migrations_are_numbered_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "0001_first.sql").write_text("SELECT 1;")
    (tmp_path / "0003_third.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="0002 was expected"):
        load_migrations(tmp_path)
    (tmp_path / "bad-name.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        load_migrations(tmp_path)
    shipped = load_migrations()
    assert [m.version for m in shipped] == list(range(1, len(shipped) + 1))


async def test_migrations_apply_once_and_refuse_a_newer_schema() -> None:
    with fresh_database("migrations") as dsn:
        known = len(load_migrations())
        assert migrate(dsn) == known
        tables = {r[0] for r in sql_all(dsn, "SELECT tablename FROM pg_tables")}
        assert {"records", "reels", "metres", "alarms", "events", "reel_tallies"} <= tables
        assert {"line_stores", "incidents", "historian_migrations"} <= tables
        applied = sql_all(dsn, "SELECT version, applied_at FROM historian_migrations")
        # The second time is a no-op: nothing applied again.
        assert migrate(dsn) == known
        assert sql_all(dsn, "SELECT version, applied_at FROM historian_migrations") == applied
        with HistorianReader(dsn) as r:
            assert r.schema_version == known
        # An applied migration whose file changed is refused.
        changed = [Migration(m.version, m.name, m.sql + "\n-- edited") for m in load_migrations()]
        with pytest.raises(MigrationError, match="another text"):
            migrate(dsn, changed)
        # A schema newer than the code: refused by the runner, the ingest and the reader.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO historian_migrations (version, name, sha256) "
                "VALUES (%s, 'from_the_future', 'x')",
                (known + 1,),
            )
        with pytest.raises(MigrationError, match="newer than this linectl knows"):
            migrate(dsn)
        with pytest.raises(MigrationError, match="newer"):
            await HistorianDB.open(dsn)
        with pytest.raises(MigrationError, match="newer"):
            HistorianReader(dsn)


def test_two_historians_migrating_at_once_apply_each_migration_once() -> None:
    with fresh_database("migrate_race") as dsn:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                migrate(dsn)
            except BaseException as exc:  # pragma: no cover (reported below)
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert errors == []
        assert sql_one(dsn, "SELECT count(*) FROM historian_migrations") == len(load_migrations())


def test_a_reader_refuses_a_database_not_migrated() -> None:
    with fresh_database("unmigrated") as dsn, pytest.raises(MigrationError, match="migrate"):
        HistorianReader(dsn)


# --------------------------------------------------------------------------- the report


async def test_reports_from_the_historian_are_byte_identical_to_the_line(
    db: HistorianDB, reader: HistorianReader, line_store: RecordStore, pg_dsn: str
) -> None:
    reels = [r.reel_id for r in line_store.reels()]
    recs = records_of(line_store, "ORDERED")
    result = await db.apply(recs)
    assert result.stored == {("ORDERED", line_store.store_id): [r.seq for r in recs]}
    assert (result.duplicates, result.conflicts, result.malformed) == (0, [], [])
    assert_same_as_store(reader, "ORDERED", line_store, reels)
    counts = reader.record_count("ORDERED")
    assert counts == {
        "records": len(recs),
        "records_with_problem": 0,
        "reels": 4,
        "metres": sum(line_store.metre_count(r) for r in reels),
        "alarms": len(line_store.alarms()),
        "events": len(line_store.events()),
        "incidents": 0,
    }
    # The same dataclasses and values as the store, the line's whole history included.
    src = reader.source("ORDERED")
    assert src.events() == line_store.events()
    assert src.alarms() == line_store.alarms()
    for reel_id in reels:
        assert src.reel(reel_id) == line_store.reel(reel_id)
        assert src.metres(reel_id) == line_store.metres(reel_id)
    # Verdicts: one released reel; the list computes it from the tallies alone.
    decisions = {r["reel_id"]: r["verdict"] for r in reader.reel_list(line_id="ORDERED")}
    assert decisions == {
        "R-GOOD": "RELEASE",
        "R-BAD": "HOLD",
        "R-MONTH": "RELEASE",
        "R-OPEN": "HOLD",
    }


async def test_shuffled_and_duplicated_batches_give_the_same_reports(
    db: HistorianDB, reader: HistorianReader, line_store: RecordStore
) -> None:
    reels = [r.reel_id for r in line_store.reels()]
    recs = records_of(line_store, "SHUFFLED")
    rng = random.Random(13)
    for _round in range(3):
        shuffled = recs[:]
        rng.shuffle(shuffled)
        # Batches of 1..7, each also holding copies of records of other batches.
        i = 0
        while i < len(shuffled):
            n = rng.randint(1, 7)
            batch = shuffled[i : i + n] + rng.sample(recs, 2)
            i += n
            result = await db.apply(batch)
            assert result.conflicts == []
            assert result.malformed == []
    assert_same_as_store(reader, "SHUFFLED", line_store, reels)
    assert reader.held_seqs("SHUFFLED", line_store.store_id) == [r.seq for r in recs]
    assert reader.incidents("SHUFFLED") == []
    again = await db.apply(recs + recs)
    assert again.stored == {}
    assert again.duplicates == 2 * len(recs)


async def test_apply_twice_stores_nothing_the_second_time(
    db: HistorianDB, reader: HistorianReader, line_store: RecordStore
) -> None:
    recs = records_of(line_store, "TWICE")
    first = await db.apply(recs)
    before = reader.record_count("TWICE")
    second = await db.apply(recs)
    assert first.stored[("TWICE", line_store.store_id)] == [r.seq for r in recs]
    assert second == hpg.ApplyResult({}, len(recs), [])
    assert reader.record_count("TWICE") == before
    # A duplicate within one batch is counted too, and stored once.
    dup = metres_record("TWICE-B", 1, "R", "2024-05-01T00:00:00+00:00", [0])
    result = await db.apply([dup, dup])
    assert result.stored == {("TWICE-B", "S1"): [1]}
    assert result.duplicates == 1


async def test_metres_before_their_reel_start_move_to_its_month(
    db: HistorianDB, reader: HistorianReader, line_store: RecordStore, pg_dsn: str
) -> None:
    """R-MONTH started on 31 January; its metres (and its end) came first, recorded in
    February: they sit in February until the start arrives, then in January, where the
    report reads them."""
    recs = records_of(line_store, "LATE-START")
    start = next(
        r for r in recs if r.data.get("event") == "start" and r.data["reel_id"] == "R-MONTH"
    )
    month_recs = [r for r in recs if r.data.get("reel_id") == "R-MONTH" and r is not start]
    assert len(month_recs) == 6  # 5 metres records and the end
    await db.apply(month_recs)

    def partitions() -> set[str]:
        rows = sql_all(
            pg_dsn,
            "SELECT DISTINCT tableoid::regclass::text FROM metres "
            "WHERE line_id = 'LATE-START' AND reel_id = 'R-MONTH'",
        )
        return {r[0] for r in rows}

    assert partitions() == {"metres_y2024m02"}
    # Not shown before its start: neither in the list nor as a report.
    assert reader.reel_list(line_id="LATE-START") == []
    assert "LATE-START" not in reader.lines_of_reel("R-MONTH")
    with pytest.raises(LocalError, match="no reel 'R-MONTH' of line LATE-START"):
        reader.source("LATE-START").reel("R-MONTH")
    await db.apply([start])
    assert partitions() == {"metres_y2024m01"}
    assert "LATE-START" in reader.lines_of_reel("R-MONTH")
    assert (
        sql_one(
            pg_dsn,
            "SELECT reel_month::text FROM reel_tallies WHERE line_id = 'LATE-START' "
            "AND reel_id = 'R-MONTH'",
        )
        == "2024-01-01"
    )
    assert report_json(reader.source("LATE-START"), "R-MONTH") == report_json(line_store, "R-MONTH")
    # More metres after the start land in the start month too.
    extra = metres_record("LATE-START", 999, "R-MONTH", "2024-02-01T00:10:00+00:00", [5])
    extra = RecordIn(extra.line_id, line_store.store_id, 999, "metres", extra.t, extra.data)
    await db.apply([extra])
    assert partitions() == {"metres_y2024m01"}


async def test_partitions_are_made_per_month_on_demand(
    db: HistorianDB, reader: HistorianReader, pg_dsn: str
) -> None:
    line = "MONTHS"
    starts = ["2023-11-30T12:00:00+00:00", "2023-12-15T12:00:00+00:00", "2024-03-01T00:00:00Z"]
    batch: list[RecordIn] = []
    for n, t in enumerate(starts):
        batch.append(start_record(line, 2 * n + 1, f"M{n}", t))
        batch.append(metres_record(line, 2 * n + 2, f"M{n}", t, range(3)))
    await db.apply(batch)
    names = {
        r[0]
        for r in sql_all(
            pg_dsn,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'metres'::regclass",
        )
    }
    assert {"metres_y2023m11", "metres_y2023m12", "metres_y2024m03"} <= names
    rows = sql_all(
        pg_dsn,
        "SELECT reel_id, tableoid::regclass::text FROM metres WHERE line_id = %s "
        "GROUP BY 1, 2 ORDER BY 1",
        (line,),
    )
    assert rows == [
        ("M0", "metres_y2023m11"),
        ("M1", "metres_y2023m12"),
        ("M2", "metres_y2024m03"),
    ]
    for n in range(3):
        assert [m.index for m in reader.source(line).metres(f"M{n}")] == [0, 1, 2]
    # A new connection finds the partitions that exist (no CREATE for them).
    again = await HistorianDB.open(pg_dsn)
    try:
        assert {hpg.partition_name(m) for m in again._partitions} >= names
    finally:
        await again.close()


# --------------------------------------------------------------------------- conflicts


async def test_a_seq_held_with_other_content_is_a_conflict_kept_as_first_stored(
    db: HistorianDB, reader: HistorianReader, pg_dsn: str
) -> None:
    line = "SEQ-CONFLICT"
    first = metres_record(line, 1, "R", "2024-04-01T00:00:00+00:00", [0], dose=120.0)
    other = metres_record(line, 1, "R", "2024-04-01T00:00:00+00:00", [0], dose=99.0)
    await db.apply([start_record(line, 2, "R", "2024-04-01T00:00:00+00:00"), first])
    result = await db.apply([other])
    assert result.stored == {}
    assert result.duplicates == 0
    assert result.seq_conflicts == {(line, "S1", 1)}
    assert len(result.conflicts) == 1
    assert "line SEQ-CONFLICT store S1 seq 1" in result.conflicts[0]
    (inc,) = reader.incidents(line)
    assert inc["kind"] == "seq_conflict"
    assert inc["detail"]["held"]["data"]["metres"][0]["dose_kgy"] == 120.0
    assert inc["detail"]["received"]["data"]["metres"][0]["dose_kgy"] == 99.0
    (m,) = reader.source(line).metres("R")
    assert m.dose_kgy == 120.0
    # Within one batch too: the first (in seq order, as given) is kept.
    result = await db.apply(
        [
            metres_record(line, 3, "R", "2024-04-01T00:00:01+00:00", [1]),
            metres_record(line, 3, "R", "2024-04-01T00:00:01+00:00", [1], dose=50.0),
        ]
    )
    assert result.stored == {(line, "S1"): [3]}
    assert result.seq_conflicts == {(line, "S1", 3)}
    assert [m.dose_kgy for m in reader.source(line).metres("R")] == [120.0, 120.0]


async def test_a_natural_key_held_with_other_content_is_a_conflict(
    db: HistorianDB, reader: HistorianReader, pg_dsn: str
) -> None:
    line = "KEY-CONFLICT"
    t = "2024-04-02T00:00:00+00:00"
    await db.apply([start_record(line, 1, "R", t), metres_record(line, 2, "R", t, [0, 1])])
    # The same metres under a new seq: identical content is no conflict.
    same = await db.apply([metres_record(line, 3, "R", t, [1])])
    assert same.stored == {(line, "S1"): [3]}
    assert same.conflicts == []
    # Other content for metre 1 (and a new metre 2 in the same record): 2 stored, 1 kept.
    result = await db.apply([metres_record(line, 4, "R", t, [1, 2], dose=80.0)])
    assert result.stored == {(line, "S1"): [4]}
    assert result.seq_conflicts == frozenset()
    assert result.conflicts == [
        f"line {line} store S1 seq 4: metre(s) 1 of reel R held with other content; "
        "the first stored is kept"
    ]
    assert [m.dose_kgy for m in reader.source(line).metres("R")] == [120.0, 120.0, 80.0]
    (inc,) = reader.incidents(line)
    assert inc["kind"] == "key_conflict"
    assert inc["detail"]["examples"][0]["held"]["dose_kgy"] == 120.0
    assert inc["detail"]["examples"][0]["received"]["dose_kgy"] == 80.0
    problem = sql_one(pg_dsn, "SELECT problem FROM records WHERE line_id = %s AND seq = 4", (line,))
    assert "metre(s) 1 of reel R held with other content" in problem
    # The tallies count what was stored, once.
    assert reader.reel_list(line_id=line)[0]["metres_recorded"] == 3
    # A second start of the reel with other content: the first is kept.
    result = await db.apply([start_record(line, 5, "R", t, operator="mallory")])
    assert "the start of reel R" in result.conflicts[0]
    assert reader.source(line).reel("R").operator == "anna"


# --------------------------------------------------------------------------- kinds


async def test_unproven_ranges_are_metres_without_dose(
    db: HistorianDB, reader: HistorianReader, pg_dsn: str
) -> None:
    line = "UNPROVEN"
    t = "2024-04-03T00:00:00+00:00"
    unproven = {
        "event": "unproven",
        "reel_id": "R",
        "first_index": 2,
        "last_index": 5,
        "cause": "restart",
    }
    await db.apply(
        [
            start_record(line, 1, "R", t),
            metres_record(line, 2, "R", t, [0, 1]),
            RecordIn(line, "S1", 3, "metres", t, unproven),
            # The same range again under another seq (identical: nothing changes).
            RecordIn(line, "S1", 4, "metres", t, {**unproven, "first_index": 4, "last_index": 6}),
        ]
    )
    ms = reader.source(line).metres("R")
    assert [m.index for m in ms] == list(range(7))
    for m in ms[2:]:
        assert (m.dose_kgy, m.min_dose_kgy, m.max_dose_kgy) == (None, None, None)
        assert m.verdict is Verdict.UNPROVEN
        assert m.causes == ("restart",)
    (row,) = reader.reel_list(line_id=line)
    assert (row["metres_recorded"], row["in_spec"], row["out_of_spec"]) == (7, 2, 5)
    # An unproven range over metres held with a dose: they keep it (a conflict).
    result = await db.apply(
        [RecordIn(line, "S1", 5, "metres", t, {**unproven, "first_index": 0, "last_index": 1})]
    )
    assert len(result.conflicts) == 1
    assert [m.dose_kgy for m in reader.source(line).metres("R")[:2]] == [120.0, 120.0]


async def test_alarms_keep_the_first_acknowledgement_and_clearing_in_any_order(
    db: HistorianDB, reader: HistorianReader
) -> None:
    line = "ALARMS"
    base = {"alarm_id": 1, "kind": "vacuum", "message": "vacuum high", "reel_id": None}
    raised = RecordIn(
        line, "S1", 1, "alarm", "2024-04-04T00:00:01+00:00", {**base, "event": "raised"}
    )
    ack = RecordIn(
        line,
        "S1",
        2,
        "alarm",
        "2024-04-04T00:00:02+00:00",
        {**base, "event": "acknowledged", "by": "anna"},
    )
    cleared = RecordIn(
        line, "S1", 3, "alarm", "2024-04-04T00:00:03+00:00", {**base, "event": "cleared"}
    )
    # The acknowledgement and the clearing come before the raise.
    await db.apply([cleared])
    await db.apply([ack])
    assert reader.source(line).alarms() == []  # not shown before its raise
    await db.apply([raised])
    (alarm,) = reader.source(line).alarms()
    assert (alarm.id, alarm.kind, alarm.message, alarm.reel_id) == (
        1,
        "vacuum",
        "vacuum high",
        None,
    )
    assert alarm.raised_at == raised.t
    assert (alarm.acknowledged_at, alarm.acknowledged_by) == (ack.t, "anna")
    assert alarm.cleared_at == cleared.t
    assert not alarm.active
    # Another acknowledgement of the same alarm (a line never sends one): the first stays.
    late = RecordIn(
        line,
        "S1",
        4,
        "alarm",
        "2024-04-04T00:00:09+00:00",
        {**base, "event": "acknowledged", "by": "bert"},
    )
    result = await db.apply([late])
    assert "alarm 1 (acknowledged)" in result.conflicts[0]
    assert reader.source(line).alarms()[0].acknowledged_by == "anna"
    # The same alarm id in another store (a new store file) is another alarm.
    await db.apply(
        [
            RecordIn(
                line,
                "S2",
                1,
                "alarm",
                "2024-04-05T00:00:00+00:00",
                {**base, "event": "raised", "message": "again"},
            )
        ]
    )
    assert [a.message for a in reader.source(line).alarms()] == ["vacuum high", "again"]


# --------------------------------------------------------------------------- bad input


async def test_a_malformed_record_is_kept_raw_and_the_rest_stored(
    db: HistorianDB, reader: HistorianReader, pg_dsn: str
) -> None:
    line = "MALFORMED"
    t = "2024-04-06T00:00:00+00:00"
    bad_metre = metres_record(line, 3, "R", t, [5])
    del bad_metre.data["metres"][0]["verdict"]
    batch = [
        start_record(line, 1, "R", t),
        metres_record(line, 2, "R", t, [0, 1]),
        bad_metre,
        RecordIn(line, "S1", 4, "audit", t, {"event_id": 1, "actor": "a"}),  # no action...
        RecordIn(line, "S1", 5, "weather", t, {"rain": True}),  # unknown kind
        RecordIn(line, "S1", 6, "metres", "yesterday", metres_record(line, 6, "R", t, [9]).data),
        RecordIn(
            line,
            "S1",
            7,
            "metres",
            t,
            {"event": "metres", "reel_id": "R", "metres": [{"index": 3, "note": "nul\x00"}]},
        ),
        metres_record(line, 8, "R", t, [2]),
    ]
    result = await db.apply(batch)
    assert result.stored == {(line, "S1"): list(range(1, 9))}
    assert len(result.malformed) == 5
    text = "\n".join(result.malformed)
    assert f"line {line} store S1 seq 3 (metres): metres[0] has no 'verdict'; kept raw" in text
    assert f"line {line} store S1 seq 4 (audit): no 'accepted'" in text
    assert "seq 5 (weather): kind 'weather' is none of metres, reel, alarm, audit" in text
    assert "seq 6 (metres): t 'yesterday' is not an ISO 8601 time" in text
    assert "seq 7 (metres): data holds a NUL character" in text
    assert [m.index for m in reader.source(line).metres("R")] == [0, 1, 2]
    assert reader.record_count(line)["records_with_problem"] == 5
    assert [i["kind"] for i in reader.incidents(line)] == ["malformed"] * 5
    # The raw record is held exactly (the NUL one as JSON text in a wrapper).
    raw = sql_one(pg_dsn, "SELECT data FROM records WHERE line_id = %s AND seq = 7", (line,))
    assert json.loads(raw["json_text"])["metres"][0]["note"] == "nul\x00"
    # Sent again: duplicates, nothing new.
    again = await db.apply(batch)
    assert (again.stored, again.duplicates, again.malformed) == ({}, 8, [])


async def test_a_record_without_a_usable_key_refuses_the_batch(
    db: HistorianDB, reader: HistorianReader
) -> None:
    line = "REFUSED"
    good = metres_record(line, 1, "R", "2024-04-07T00:00:00+00:00", [0])
    for bad, why in [
        (RecordIn(line, "S1", 0, "metres", good.t, good.data), "seq must be an integer >= 1"),
        (RecordIn(line, "", 2, "metres", good.t, good.data), "store_id must be non-empty"),
        (RecordIn(line, "S1", 3, "metres", good.t, {"x": object()}), "data is not JSON"),
    ]:
        with pytest.raises(RecordInError, match=why) as info:
            await db.apply([good, bad])
        assert f"line {line!r} store {bad.store_id!r} seq {bad.seq!r}" in str(info.value)
    assert reader.record_count(line)["records"] == 0


async def test_non_finite_numbers_are_stored_as_null(
    db: HistorianDB, reader: HistorianReader
) -> None:
    line = "NAN"
    rec = metres_record(line, 2, "R", "2024-04-08T00:00:00+00:00", [0])
    rec.data["metres"][0]["dose_kgy"] = float("nan")
    await db.apply([start_record(line, 1, "R", rec.t), rec])
    (m,) = reader.source(line).metres("R")
    assert m.dose_kgy is None
    assert m.min_dose_kgy == 119.0


# --------------------------------------------------------------------------- bookkeeping


async def test_line_stores_confirmed_never_moves_back(
    db: HistorianDB, reader: HistorianReader
) -> None:
    line = "STORES"
    t = "2024-04-09T00:00:00+00:00"
    await db.apply([metres_record(line, s, "R", t, [s]) for s in (1, 2, 3, 7, 9)])
    await db.set_confirmed(line, "S1", 3)
    await db.set_confirmed(line, "S1", 2)  # never back
    await db.set_head(line, "S1", 12)
    await db.set_head(line, "S2", 4)  # a store not seen yet: made, next epoch
    stores = {(s.line_id, s.store_id): s for s in await db.line_stores()}
    s1, s2 = stores[(line, "S1")], stores[(line, "S2")]
    assert (s1.confirmed_seq, s1.max_seq, s1.head_seq) == (3, 9, 12)
    assert (s2.confirmed_seq, s2.max_seq, s2.head_seq) == (0, 0, 4)
    assert datetime.fromisoformat(s1.first_seen) <= datetime.fromisoformat(s2.first_seen)
    assert await db.seqs_above(line, "S1", 3) == [7, 9]
    status = [s for s in reader.line_store_status() if s["line_id"] == line]
    assert [(s["store_id"], s["epoch"]) for s in status] == [("S1", 1), ("S2", 2)]
    await db.add_incident(line, None, "gap_unrecoverable", {"from_seq": 4, "to_seq": 6})
    (inc,) = reader.incidents(line)
    assert (inc["kind"], inc["store_id"], inc["detail"]) == (
        "gap_unrecoverable",
        None,
        {"from_seq": 4, "to_seq": 6},
    )
    with pytest.raises(LocalError):
        await db.set_confirmed(line, "S1", -1)


async def test_the_connection_is_made_again_after_it_was_lost(db: HistorianDB, pg_dsn: str) -> None:
    line = "RECONNECT"
    pid = db._conn.info.backend_pid
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        # Waits (up to 10 s) until the backend is gone: the next apply() surely fails.
        admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
    t = "2024-04-10T00:00:00+00:00"
    with pytest.raises(psycopg.OperationalError):
        await db.apply([metres_record(line, 1, "R", t, [0])])
    result = await db.apply([metres_record(line, 1, "R", t, [0])])
    assert result.stored == {(line, "S1"): [1]}


async def test_two_lines_in_one_batch(db: HistorianDB, reader: HistorianReader) -> None:
    t = "2024-04-11T00:00:00+00:00"
    batch = []
    for line in ("TWO-A", "TWO-B"):
        batch += [
            start_record(line, 1, "SAME-REEL", t),
            metres_record(line, 2, "SAME-REEL", t, [0, 1]),
        ]
    result = await db.apply(batch)
    assert result.stored == {("TWO-A", "S1"): [1, 2], ("TWO-B", "S1"): [1, 2]}
    assert reader.lines_of_reel("SAME-REEL") == ["TWO-A", "TWO-B"]
    assert reader.lines_of_reel("NO-SUCH-REEL") == []


# --------------------------------------------------------------------------- reel list


async def test_the_reel_list_filters(db: HistorianDB, reader: HistorianReader) -> None:
    t = "2024-06-0{}T12:00:00+00:00"
    batch = []
    for n, (line, product) in enumerate(
        [("LIST-A", "PV"), ("LIST-B", "PV"), ("LIST-A", "LSZH"), ("LIST-B", "LSZH")], start=1
    ):
        batch.append(
            start_record(
                line,
                n,
                f"L{n}",
                t.format(n),
                recipe={"product": product, "version": "1", "hash": "h"},
                planned_length_m=2.0,
            )
        )
        batch.append(metres_record(line, 10 + n, f"L{n}", t.format(n), [0, 1]))
    # L1 closed at its planned length: RELEASE; the others open: HOLD.
    batch.append(
        RecordIn(
            "LIST-A",
            "S1",
            20,
            "reel",
            t.format(1).replace("12:", "13:"),
            {"event": "end", "reel_id": "L1", "reason": report.PLANNED_END},
        )
    )
    await db.apply(batch)

    def ids(**filters: Any) -> list[str]:
        return [
            r["reel_id"] for r in reader.reel_list(**filters) if r["line_id"].startswith("LIST-")
        ]

    assert ids() == ["L1", "L2", "L3", "L4"]
    assert ids(line_id="LIST-A") == ["L1", "L3"]
    assert ids(product="LSZH") == ["L3", "L4"]
    assert ids(since="2024-06-02T12:00:00+00:00") == ["L2", "L3", "L4"]
    assert ids(until=datetime(2024, 6, 3, 12, tzinfo=UTC)) == ["L1", "L2"]
    assert ids(since="2024-06-02", until="2024-06-04") == ["L2", "L3"]
    assert ids(verdict="RELEASE") == ["L1"]
    assert ids(verdict="hold") == ["L2", "L3", "L4"]
    with pytest.raises(LocalError, match="RELEASE or HOLD"):
        reader.reel_list(verdict="maybe")
    with pytest.raises(LocalError, match="not an ISO 8601"):
        reader.reel_list(since="last tuesday")


def test_the_verdict_rule_names_what_the_report_uses() -> None:
    from linectl.historian import reader as hreader

    assert (hreader.RELEASE, hreader.HOLD, hreader.PLANNED_END) == (
        report.RELEASE,
        report.HOLD,
        report.PLANNED_END,
    )


async def test_verdicts_agree_with_the_report_for_every_ending(
    db: HistorianDB, reader: HistorianReader, tmp_path: Path
) -> None:
    """The list's verdict (from the tallies) is the report's for each way a reel ends."""
    line = "VERDICTS"
    t = "2024-07-01T00:00:00.000+00:00"
    with RecordStore(tmp_path / "v.db") as s:
        cases: list[tuple[str, float | None, list[int], str | None]] = [
            ("V-full", 3.0, [0, 1, 2], report.PLANNED_END),  # RELEASE
            ("V-tail-missing", 5.0, [0, 1, 2], report.PLANNED_END),  # missing 3, 4
            ("V-past-plan", 2.5, [0, 1, 2], report.PLANNED_END),  # floor 2 < 3 stored
            ("V-hole", 3.0, [0, 2], report.PLANNED_END),
            ("V-short", 3.0, [0, 1, 2], "operator ended the reel"),
            ("V-open", 3.0, [0, 1, 2], None),
            ("V-empty", 3.0, [], report.PLANNED_END),
            ("V-zero-plan", 0.0, [0, 1], report.PLANNED_END),
            ("V-no-plan", None, [0, 1], report.PLANNED_END),
            ("V-no-plan-empty", None, [], report.PLANNED_END),
        ]
        for n, (reel_id, planned, indices, end) in enumerate(cases):
            start = t_at(t, n * 100)
            s.open_reel(reel_info(reel_id, start, planned_m=planned))
            if indices:
                s.add_metres(reel_id, [metre(i) for i in indices], t_at(start, 1))
            if end is not None:
                s.close_reel(reel_id, t_at(start, 2), end)
        await db.apply(records_of(s, line))
        assert_same_as_store(reader, line, s, [c[0] for c in cases])
        listed = {r["reel_id"]: r["verdict"] for r in reader.reel_list(line_id=line)}
        assert listed["V-full"] == "RELEASE"
        assert listed["V-past-plan"] == "RELEASE"
        assert sorted(v for v in listed.values()).count("RELEASE") == 4


# --------------------------------------------------------------------------- encoding


def test_record_text_is_the_text_json_dumps_gives() -> None:
    """apply() encodes a record's data with a C encoder made once (pg._ENCODE): the same
    text as json.dumps, the same errors (a cycle: RecursionError, refused as not JSON)."""
    values: list[Any] = [
        {
            "event": "metres",
            "reel_id": 'R-\u00f8\u2028"\\\t\U0001f600',
            "metres": [
                {
                    "index": 0,
                    "dose_kgy": 120.00750792543985,
                    "min_dose_kgy": -0.0,
                    "max_dose_kgy": 1e300,
                    "verdict": "in_spec",
                    "causes": ["beam_current_low", "gap"],
                }
            ],
        },
        {"n": None, "b": [True, False], "i": 2**70, "f": 1e-7, "deep": {"k": [[], {}]}, 1: "x"},
    ]
    for value in values:
        assert hpg._ENCODE(value) == json.dumps(value, separators=(",", ":"))
    with pytest.raises(ValueError, match="Out of range float"):
        hpg._ENCODE({"x": float("inf")})
    with pytest.raises(TypeError, match="not JSON serializable"):
        hpg._ENCODE({"x": object()})
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(RecursionError):
        hpg._ENCODE(cycle)


def test_usual_metres_records_take_a_shortcut_to_the_same_result(
    line_store: RecordStore,
) -> None:
    """pg._usual_metres checks, encodes and parses a usual metres record in one pass:
    for every record it takes, the general path (_Rec.check, then _metres_rows) gives
    the same JSON value, the same rows and no problem; it leaves every other record to
    the general path; and the metres records a line sends take it."""
    rng = random.Random(13)
    verdicts = [v.value for v in Verdict]

    def metre(i: int) -> dict[str, Any]:
        dose = 120.0 + rng.gauss(0.0, 30.0)
        causes = rng.choice([[], ["beam_current_low"], ["gap", "speed"], ['\u00f8 "q" \\ \t']])
        return {
            "index": i,
            "dose_kgy": dose,
            "min_dose_kgy": dose - rng.random(),
            "max_dose_kgy": rng.choice([dose + rng.random(), -0.0, 1e300, 5e-324]),
            "verdict": rng.choice(verdicts),
            "causes": causes,
        }

    metre_changes: list[Callable[[dict[str, Any]], None]] = [
        lambda m: m.update(dose_kgy=120),
        lambda m: m.update(min_dose_kgy=None),
        lambda m: m.update(max_dose_kgy=float("nan")),
        lambda m: m.update(dose_kgy=float("-inf")),
        lambda m: m.update(index=True),
        lambda m: m.update(index=-1),
        lambda m: m.update(index=2**31),
        lambda m: m.update(verdict="fine"),
        lambda m: m.update(causes=("gap",)),
        lambda m: m.update(causes=["gap", 7]),
        lambda m: m.update(causes=["nul\x00"]),
        lambda m: m.update(note="more"),
        lambda m: m.pop("causes"),
        lambda m: m.pop("verdict"),
    ]
    record_changes: list[Callable[[dict[str, Any]], None]] = [
        lambda d: d.update(extra=1),
        lambda d: d.pop("event"),
        lambda d: d.update(event="unproven"),
        lambda d: d.update(reel_id=""),
        lambda d: d.update(reel_id="R\x00"),
        lambda d: d.update(reel_id=7),
        lambda d: d.update(metres=tuple(d["metres"])),
        lambda d: d.update(metres=[*d["metres"], "not a metre"]),
        lambda d: d.update(metres=[]),
        lambda d: d.update(reel_id="R\u00d8D \U0001f600"),
    ]
    taken = left = 0
    for n in range(600):
        data: dict[str, Any] = {
            "event": "metres",
            "reel_id": f"R-{n % 7}",
            "metres": [metre(i) for i in range(rng.randint(1, 4))],
        }
        if n % 3 == 0:  # as a line sends it: keys in sorted order
            data = json.loads(json.dumps(data, sort_keys=True))
        if n % 4 == 1:
            rng.choice(metre_changes)(rng.choice(data["metres"]))
        if n % 5 == 2:
            rng.choice(record_changes)(data)
        kind, t = "metres", "2024-09-01T00:00:00.000+00:00"
        if n % 17 == 3:
            kind = "reel"
        if n % 19 == 4:
            t = rng.choice(["yesterday", "2024-09-01T00:00:00\x00"])
        r = RecordIn("USUAL", "S1", n + 1, kind, t, data)
        usual = hpg._usual_metres(r)
        if usual is None:
            left += 1
            continue
        taken += 1
        text, (reel_id, rows) = usual
        rec = hpg._Rec.check(r)
        assert rec.problems == ()
        assert json.loads(text) == json.loads(rec.text) == data
        assert (reel_id, rows) == hpg._metres_rows(rec)
    assert taken > 200
    assert left > 100
    sent = [r for r in records_of(line_store, "USUAL") if r.data.get("event") == "metres"]
    assert sent
    assert all(hpg._usual_metres(r) is not None for r in sent)


async def test_a_seq_beyond_bigint_refuses_the_batch(
    db: HistorianDB, reader: HistorianReader
) -> None:
    line = "HUGE-SEQ"
    t = "2024-04-07T00:00:00+00:00"
    good = metres_record(line, 1, "R", t, [0])
    with pytest.raises(RecordInError, match="seq must be at most 9223372036854775807"):
        await db.apply([good, metres_record(line, 2**63, "R", t, [1])])
    assert reader.record_count(line)["records"] == 0
    # The largest bigint is a seq like any other.
    result = await db.apply([good, metres_record(line, 2**63 - 1, "R", t, [1])])
    assert result.stored == {(line, "S1"): [1, 2**63 - 1]}
    assert reader.held_seqs(line, "S1") == [1, 2**63 - 1]


async def test_a_database_in_latin1_holds_the_same_text(tmp_path: Path) -> None:
    """apply() encodes its COPY rows' text itself, as UTF-8, and tells the server so: a
    database in another encoding holds the same characters, the reports are the line's."""
    from pg_support import database_name, server_dsn
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = database_name("latin1")
    ident = sql.Identifier(name)
    with psycopg.connect(server_dsn(), autocommit=True) as admin:
        admin.execute(
            sql.SQL(
                "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
                "TEMPLATE template0"
            ).format(ident)
        )
    try:
        dsn = make_conninfo(server_dsn(), dbname=name)
        line = "LINJE-\u00d8"
        t = "2024-08-01T00:00:00.000+00:00"
        with RecordStore(tmp_path / "latin1.db") as s:
            info = reel_info("R\u00d8D-1", t)
            s.open_reel(replace(info, operator="\u00c5sa", start={"m\u00e5l": "\u00e6\u00f8"}))
            s.add_metres("R\u00d8D-1", [metre(0), metre(1)], t_at(t, 1))
            s.audit(t_at(t, 2), "\u00c5sa", "note", {"text": "\u00bd"}, True, reel_id="R\u00d8D-1")
            s.close_reel("R\u00d8D-1", t_at(t, 3), report.PLANNED_END)
            async with await HistorianDB.open(dsn) as db:
                result = await db.apply(records_of(s, line))
            assert result.malformed == []
            assert result.conflicts == []
            with HistorianReader(dsn) as reader:
                assert_same_as_store(reader, line, s, ["R\u00d8D-1"])
                assert reader.record_count(line)["records"] == len(records_of(s, line))
    finally:
        with psycopg.connect(server_dsn(), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


# --------------------------------------------------------------------------- bench


def test_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/historian_pg.py runs end to end at small sizes (figures are not asserted)."""
    from conftest import load_bench

    with fresh_database("bench_smoke") as dsn:
        out = tmp_path / "bench.json"
        bench = load_bench("historian_pg")
        assert bench.main(["--smoke", "--dsn", dsn, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ingest"]["metres"] > 0
    assert res["ingest"]["metres_per_s"] > 0
    assert res["year"]["metres"] > 0
    assert res["year"]["report_ms"]["p50"] > 0
    assert res["year"]["list_ms"]["p50"] > 0
    assert res["year"]["reports_identical"] is True
    assert "cpus" in res
    assert "metres/s" in capsys.readouterr().out
