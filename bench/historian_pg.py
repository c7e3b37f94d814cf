"""The plant historian on PostgreSQL: ingest throughput, and one line's year of records.

Three measurements (issue 13, part D), against the PostgreSQL at --server (default the
development server, $TEST_PG_DSN or host=127.0.0.1 port=5432 user=postgres):

1. ingest (default): metre records through `HistorianDB.apply`, the historian service's
   one write path, in batches of --batch metres (default 2,000), each metres record
   holding --per-record metres (default: 1 and then 10; a line at plant speeds writes one
   metre per record), with reel starts and ends on the way, into a fresh database. Given:
   metres/s and records/s over the whole run (wall time of the apply() calls back to
   back, batches made beforehand), batch latency p50/p95, and the CPU per metre of this
   process and of its PostgreSQL backend (the two share the host's 2 cores; with other
   load on the host the wall figure drops, the CPU figures hold). Goal: >= 50,000
   metres/s.

2. --year: one line's year loaded (default 1,500 reels of 10,000 m: 15 million metres,
   with under-dose, unproven and missing ranges, ends short, transitions, alarms) into
   the database --year-db (default linectl_bench_year; reels, starts and ends, events and
   alarms go through apply(), the metres by COPY straight into the partitions and their
   tallies set, which is set-up, not what is measured; the raw `records` stream of the
   metres is not loaded: no query here reads it). Then, timed: one reel's report
   (HistorianReader.source + linectl.report.build_report) over --reports reels chosen at
   random, p50/p95 (goal <= 100 ms), and the plant reel list (HistorianReader.reel_list:
   all reels, and with each filter) p50/p95 (goal <= 200 ms). The first reel's report is
   checked byte for byte against the same reel written into a line's own RecordStore.
   --reuse takes the database as a previous run left it (--keep) when it holds the same
   year; otherwise it is loaded again.

3. --driver-compare: psycopg 3 against asyncpg on the ingest's shape of work (COPY of
   2,000 records and their metres into temporary tables, then INSERT ... ON CONFLICT DO
   NOTHING into a records table and a month-partitioned metres table), in alternating
   rounds; asyncpg only needs to be installed for this (pip install asyncpg).

    python bench/historian_pg.py [--per-record 1,10] [--metres 1000000] [--json FILE]
    python bench/historian_pg.py --year [--keep] [--reuse] [--reels 1500] [--length 10000]
    python bench/historian_pg.py --driver-compare [--rounds 5]

`--smoke` runs 1 and 2 at small sizes (the test suite's check that this script works).
`--dsn DSN` uses that one database for everything (nothing created or dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import code_version, host_facts, pct  # noqa: E402

DEFAULT_SERVER = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
YEAR_DB = "linectl_bench_year"
YEAR_LINE = "YEAR-1"
STORE_ID = "bench-store-0001"
INGEST_GOAL_METRES_S = 50_000
REPORT_GOAL_MS = 100.0
LIST_GOAL_MS = 200.0
YEAR_START = datetime(2024, 1, 1, tzinfo=UTC)
METRE_S = 0.6
"""Seconds between two metres' records: 100 m/min."""
RECIPE_JSON = json.dumps(
    {
        "product": "PV-1x6",
        "version": "3",
        "min_dose_kgy": 100.0,
        "target_dose_kgy": 120.0,
        "max_dose_kgy": 150.0,
        "speed_min_m_min": 10.0,
    },
    sort_keys=True,
)
PRODUCTS = ("PV-1x6", "PV-1x10", "LSZH-3x2.5")
PLANNED_END = "planned length reached"


METRE_COPY_TYPES = [
    "text",
    "text",
    "int4",
    "float8",
    "float8",
    "float8",
    "text",
    "text",
    "text",
    "date",
]
"""The metre rows' column types as COPYed (line, reel, index, three doses, verdict,
causes, recorded_at, month)."""


def server_dsn(arg: str | None) -> str:
    return arg or os.environ.get("TEST_PG_DSN") or DEFAULT_SERVER


@contextmanager
def database(server: str, name: str, *, drop: bool, fresh: bool) -> Iterator[str]:
    """The DSN of database `name` on the server: made new when `fresh` (dropped first if
    it exists), dropped afterwards when `drop`."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    ident = sql.Identifier(name)
    with psycopg.connect(server, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if fresh and exists:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(ident))
        if fresh or not exists:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    try:
        yield make_conninfo(server, dbname=name)
    finally:
        if drop:
            with psycopg.connect(server, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def iso(t_s: float) -> str:
    """Unix seconds as the line's ISO text (ms, +00:00)."""
    return datetime.fromtimestamp(t_s, UTC).isoformat(timespec="milliseconds")


def backend_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of a PostgreSQL backend on this host (/proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_data(line_id: str, reel_id: str, started_at: str, planned_m: float) -> dict[str, Any]:
    return {
        "event": "start",
        "reel_id": reel_id,
        "line_id": line_id,
        "operator": "anna",
        "planned_length_m": planned_m,
        "recipe": {"product": PRODUCTS[0], "version": "3", "hash": "ab" * 32},
        "recipe_json": RECIPE_JSON,
        "start": {"l0_m": 1.25},
        "started_at": started_at,
    }


# --------------------------------------------------------------------------- 1. ingest


def ingest_batches(
    line_id: str, per_record: int, batch_metres: int, n_batches: int, reel_m: int
) -> list[list[Any]]:
    """`n_batches` batches of RecordIn, `batch_metres` metres each in records of
    `per_record` metres, reels of `reel_m` metres started and ended on the way."""
    from linectl.historian.pg import RecordIn

    rng = random.Random(per_record)
    t0 = YEAR_START.timestamp()
    seq = 0
    reel_no = 0
    idx = reel_m  # start with a new reel
    out: list[list[Any]] = []
    for _ in range(n_batches):
        batch: list[Any] = []
        in_batch = 0
        while in_batch < batch_metres:
            if idx >= reel_m:
                if reel_no:
                    seq += 1
                    end = {"event": "end", "reel_id": f"I-{reel_no:05d}", "reason": PLANNED_END}
                    batch.append(RecordIn(line_id, STORE_ID, seq, "reel", iso(t0), end))
                reel_no += 1
                idx = 0
                seq += 1
                reel_id = f"I-{reel_no:05d}"
                data = start_data(line_id, reel_id, iso(t0), float(reel_m))
                batch.append(RecordIn(line_id, STORE_ID, seq, "reel", iso(t0), data))
            metres = []
            for _k in range(per_record):
                dose = 120.0 + rng.gauss(0.0, 1.5)
                metres.append(
                    {
                        "index": idx,
                        "dose_kgy": dose,
                        "min_dose_kgy": dose - rng.uniform(0.5, 2.0),
                        "max_dose_kgy": dose + rng.uniform(0.5, 2.0),
                        "verdict": "in_spec",
                        "causes": [],
                    }
                )
                idx += 1
                t0 += METRE_S
            seq += 1
            data = {"event": "metres", "reel_id": f"I-{reel_no:05d}", "metres": metres}
            batch.append(RecordIn(line_id, STORE_ID, seq, "metres", iso(t0), data))
            in_batch += per_record
        out.append(batch)
    return out


async def ingest(dsn: str, per_record: int, batch_metres: int, total_metres: int) -> dict[str, Any]:
    """Apply pre-made batches back to back; the figures of one shape."""
    from linectl.historian.pg import HistorianDB

    n_batches = max(1, total_metres // batch_metres)
    line_id = f"INGEST-{per_record}"
    batches = ingest_batches(line_id, per_record, batch_metres, n_batches, 10_000)
    # The batches made beforehand are 5 million objects held for the whole run: Python's
    # cyclic garbage collector scanned them all in each full collection (0.75 s each, 8%
    # of a 1,000,000-metre run), a cost of this benchmark's scaffolding, not of apply().
    # Frozen, the collector skips them.
    gc.freeze()
    db = await HistorianDB.open(dsn)
    try:
        # One batch first, not timed: the connection's first statements, the partition.
        warm = ingest_batches(f"{line_id}-warm", per_record, batch_metres, 1, 10_000)[0]
        await db.apply(warm)
        pid = db._conn.info.backend_pid
        latencies: list[float] = []
        ends: list[float] = []
        cpu0, srv0, t0 = time.process_time(), backend_cpu_s(pid), time.perf_counter()
        for batch in batches:
            b0 = time.perf_counter()
            result = await db.apply(batch)
            ends.append(time.perf_counter())
            latencies.append((ends[-1] - b0) * 1000.0)
            if result.conflicts or result.malformed or result.duplicates:
                raise RuntimeError(f"unexpected: {result.conflicts[:3]} {result.malformed[:3]}")
        wall_s = time.perf_counter() - t0
        cpu_s = time.process_time() - cpu0
        srv1 = backend_cpu_s(pid)
    finally:
        await db.close()
        gc.unfreeze()
    metres = n_batches * batch_metres
    records = sum(len(b) for b in batches)
    srv_s = None if srv0 is None or srv1 is None else srv1 - srv0
    # Sustained: the rate in each tenth of the run (a growing table must not slow it).
    tenths = []
    step = max(1, n_batches // 10)
    for i in range(0, n_batches - step + 1, step):
        start = t0 if i == 0 else ends[i - 1]
        tenths.append(round(step * batch_metres / (ends[i + step - 1] - start)))
    return {
        "per_record": per_record,
        "batch_metres": batch_metres,
        "batches": n_batches,
        "metres": metres,
        "records": records,
        "wall_s": round(wall_s, 3),
        "metres_per_s": round(metres / wall_s),
        "records_per_s": round(records / wall_s),
        "batch_ms": {"p50": round(pct(latencies, 50), 1), "p95": round(pct(latencies, 95), 1)},
        "metres_per_s_by_tenth": tenths,
        "client_cpu_us_per_metre": round(cpu_s / metres * 1e6, 2),
        "server_cpu_us_per_metre": None if srv_s is None else round(srv_s / metres * 1e6, 2),
        "goal_metres_per_s": INGEST_GOAL_METRES_S,
        "met": metres / wall_s >= INGEST_GOAL_METRES_S,
    }


# --------------------------------------------------------------------------- 2. the year


def reel_plan(n: int, reels: int, length_m: int) -> dict[str, Any]:
    """What reel number n of the year is: its id, start, product, length, ending, and
    the ranges of its metres that are not in spec (deterministic in n)."""
    rng = random.Random(n)
    span_s = 365 * 86400 / reels
    start_s = YEAR_START.timestamp() + n * span_s + rng.uniform(0, span_s * 0.1)
    kind = rng.random()
    short = kind < 0.08  # the operator ended it early
    length = rng.randint(length_m // 3, length_m - 1) if short else length_m
    bad: list[tuple[int, int, str]] = []  # (first, last, what): what in under/unproven/missing
    if kind > 0.7:
        for what in ("under", "unproven", "missing"):
            if rng.random() < 0.5:
                a = rng.randrange(0, max(1, length - 200))
                bad.append((a, a + rng.randint(1, 150), what))
    return {
        "n": n,
        "reel_id": f"Y-{n:04d}",
        "start_s": start_s,
        "product": PRODUCTS[n % len(PRODUCTS)],
        "length": length,
        "planned": float(length_m),
        "end_reason": "operator ended the reel" if short else PLANNED_END,
        "bad": bad,
    }


def reel_metres(plan: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    """(idx, dose, min, max, verdict, causes, recorded_at) of every stored metre; an
    unproven range shares one record time, as linectl.store.mark_unproven writes it."""
    rng = random.Random(plan["n"] + 10**6)
    what_at: dict[int, tuple[str, int]] = {}
    for a, b, what in plan["bad"]:
        for i in range(a, min(b, plan["length"] - 1) + 1):
            what_at.setdefault(i, (what, a))
    t0 = plan["start_s"] + 5.0
    for i in range(plan["length"]):
        what, first = what_at.get(i, ("", 0))
        if what == "missing":
            continue
        if what == "unproven":
            yield (i, None, None, None, "unproven", "restart", iso(t0 + first * METRE_S))
            continue
        dose = 120.0 + rng.gauss(0.0, 1.5) if what != "under" else 96.0 + rng.gauss(0.0, 1.0)
        verdict = "under_dose" if what == "under" else "in_spec"
        causes = "beam_current_low" if what == "under" else ""
        lo, hi = dose - rng.uniform(0.5, 2.0), dose + rng.uniform(0.5, 2.0)
        yield (i, dose, lo, hi, verdict, causes, iso(t0 + i * METRE_S))


def reel_records(plan: dict[str, Any], seq: int, alarm_id: int, event_id: int) -> list[Any]:
    """The reel's start, transitions, an alarm (raised, acknowledged, cleared) and its end
    as RecordIn, from `seq` on."""
    from linectl.historian.pg import RecordIn

    rid, s0 = plan["reel_id"], plan["start_s"]
    end_s = s0 + 5.0 + plan["length"] * METRE_S + 2.0
    data = start_data(YEAR_LINE, rid, iso(s0), plan["planned"])
    data["recipe"] = {"product": plan["product"], "version": "3", "hash": "ab" * 32}
    out = [RecordIn(YEAR_LINE, STORE_ID, seq, "reel", iso(s0), data)]

    def audit(t_s: float, frm: str, to: str) -> None:
        nonlocal event_id
        detail = {"from": frm, "to": to}
        d = {
            "event_id": event_id,
            "actor": "controller",
            "action": "transition",
            "detail": detail,
            "accepted": True,
            "reason": "",
            "reel_id": rid,
        }
        out.append(RecordIn(YEAR_LINE, STORE_ID, seq + len(out), "audit", iso(t_s), d))
        event_id += 1

    audit(s0 + 1.0, "idle", "starting")
    audit(s0 + 4.0, "starting", "running")
    base = {
        "alarm_id": alarm_id,
        "kind": "vacuum_high",
        "message": "vacuum above limit",
        "reel_id": rid,
    }
    for ev, dt, extra in (
        ("raised", 60, {}),
        ("acknowledged", 90, {"by": "anna"}),
        ("cleared", 120, {}),
    ):
        out.append(
            RecordIn(
                YEAR_LINE,
                STORE_ID,
                seq + len(out),
                "alarm",
                iso(s0 + dt),
                {**base, "event": ev, **extra},
            )
        )
    audit(end_s - 1.0, "running", "idle")
    end = {"event": "end", "reel_id": rid, "reason": plan["end_reason"]}
    out.append(RecordIn(YEAR_LINE, STORE_ID, seq + len(out), "reel", iso(end_s), end))
    return out


async def load_year(dsn: str, reels: int, length_m: int, say: Callable[[str], None]) -> float:
    """Load the year; return the seconds it took."""
    import psycopg

    from linectl.historian.pg import HistorianDB

    t0 = time.monotonic()
    db = await HistorianDB.open(dsn)
    try:
        plans = [reel_plan(n, reels, length_m) for n in range(reels)]
        seq, records = 0, []
        for p in plans:
            recs = reel_records(p, seq + 1, p["n"] + 1, 3 * p["n"] + 1)
            seq += len(recs)
            records.append(recs)
        # Starts (reels, tallies, month partitions) through apply(), as the service would.
        starts = [r[0] for r in records]
        for i in range(0, len(starts), 500):
            await db.apply(starts[i : i + 500])
    finally:
        await db.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for k, p in enumerate(plans):
            month = datetime.fromtimestamp(p["start_s"], UTC).date().replace(day=1)
            stored = in_spec = 0
            last = -1
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(
                    "COPY metres (line_id, reel_id, idx, dose_kgy, min_dose_kgy, max_dose_kgy, "
                    "verdict, causes, recorded_at, reel_month) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(METRE_COPY_TYPES)
                    for row in reel_metres(p):
                        copy.write_row((YEAR_LINE, p["reel_id"], *row, month))
                        stored += 1
                        in_spec += row[4] == "in_spec"
                        last = row[0]
                cur.execute(
                    "UPDATE reel_tallies SET stored = %s, in_spec = %s, last_idx = %s "
                    "WHERE line_id = %s AND reel_id = %s",
                    (stored, in_spec, last, YEAR_LINE, p["reel_id"]),
                )
            if k % 100 == 99:
                say(f"  loaded {k + 1} reels ({time.monotonic() - t0:.0f} s)")
    db = await HistorianDB.open(dsn)
    try:
        rest = [r for recs in records for r in recs[1:]]
        for i in range(0, len(rest), 2000):
            result = await db.apply(rest[i : i + 2000])
            if result.conflicts or result.malformed:
                raise RuntimeError(f"year load: {result.conflicts[:3]} {result.malformed[:3]}")
    finally:
        await db.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_year (reels integer, length_m integer, "
            "loaded_s double precision)"
        )
        conn.execute("DELETE FROM bench_year")
        conn.execute(
            "INSERT INTO bench_year VALUES (%s, %s, %s)", (reels, length_m, time.monotonic() - t0)
        )
    return time.monotonic() - t0


def year_loaded(dsn: str, reels: int, length_m: int) -> float | None:
    """The load time of the year the database holds, if it is this one (else None)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('bench_year')").fetchone() == (None,):
            return None
        row = conn.execute("SELECT reels, length_m, loaded_s FROM bench_year").fetchone()
    return float(row[2]) if row is not None and tuple(row[:2]) == (reels, length_m) else None


def check_against_line_store(dsn: str, length_m: int, reels: int) -> bool:
    """Reel 0 written into a line's own RecordStore as the line would: its report must be
    byte-identical to the historian's."""
    from linectl.core.ledger import MetreRecord, Verdict
    from linectl.historian.reader import HistorianReader
    from linectl.report import build_report
    from linectl.store import RecordStore, ReelInfo

    plan = reel_plan(0, reels, length_m)
    recs = reel_records(plan, 1, 1, 1)
    # In memory where the host has it: the line store's fsync per write is not measured.
    shm = Path("/dev/shm")
    where = str(shm) if shm.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="historian-bench-", dir=where) as tmp:
        store = RecordStore(Path(tmp) / "line.db")
        start = recs[0].data
        store.open_reel(
            ReelInfo(
                reel_id=plan["reel_id"],
                line_id=YEAR_LINE,
                recipe_product=plan["product"],
                recipe_version="3",
                recipe_hash="ab" * 32,
                recipe_json=RECIPE_JSON,
                operator="anna",
                planned_length_m=plan["planned"],
                started_at=start["started_at"],
                start=start["start"],
            )
        )
        pending: list[MetreRecord] = []
        pending_t = ""

        def flush() -> None:
            if pending:
                store.add_metres(plan["reel_id"], pending, pending_t)
                pending.clear()

        unproven: tuple[int, int, str] | None = None
        for i, dose, lo, hi, verdict, causes, t in reel_metres(plan):
            if verdict == "unproven":
                unproven = (unproven[0], i, t) if unproven else (i, i, t)
                continue
            if unproven:
                flush()
                store.mark_unproven(
                    plan["reel_id"], unproven[0], unproven[1], "restart", unproven[2]
                )
                unproven = None
            if t != pending_t:
                flush()
                pending_t = t
            pending.append(
                MetreRecord(
                    i, dose, lo, hi, Verdict(verdict), tuple(c for c in causes.split(",") if c)
                )
            )
        flush()
        if unproven:
            store.mark_unproven(plan["reel_id"], unproven[0], unproven[1], "restart", unproven[2])
        for r in recs[1:]:
            d = r.data
            if r.kind == "audit":
                store.audit(
                    r.t, d["actor"], d["action"], d["detail"], d["accepted"], reel_id=d["reel_id"]
                )
            elif r.kind == "alarm" and d["event"] == "raised":
                store.raise_alarm(d["kind"], d["message"], r.t, d["reel_id"])
            elif r.kind == "alarm" and d["event"] == "acknowledged":
                store.ack_alarm(d["alarm_id"], d["by"], r.t)
            elif r.kind == "alarm":
                store.clear_alarm(d["alarm_id"], r.t)
            else:
                store.close_reel(plan["reel_id"], r.t, d["reason"])
        with HistorianReader(dsn) as reader:
            ours = json.dumps(build_report(reader.source(YEAR_LINE), plan["reel_id"]))
        theirs = json.dumps(build_report(store, plan["reel_id"]))
        store.close()
    return ours == theirs


def time_queries(dsn: str, reels: int, n_reports: int, n_lists: int) -> dict[str, Any]:
    from linectl.historian.reader import HistorianReader
    from linectl.report import build_report

    rng = random.Random(7)
    sample = rng.sample(range(reels), min(n_reports, reels))
    report_ms: list[float] = []
    metres_ms: list[float] = []
    sizes: list[int] = []
    with HistorianReader(dsn) as reader:
        build_report(reader.source(YEAR_LINE), "Y-0000")  # warm-up, not counted
        for n in sample:
            reel_id = f"Y-{n:04d}"
            t0 = time.perf_counter()
            source = reader.source(YEAR_LINE)
            rep = build_report(source, reel_id)
            report_ms.append((time.perf_counter() - t0) * 1000.0)
            sizes.append(rep["summary"]["metres_recorded"])
            t1 = time.perf_counter()
            source.metres(reel_id)
            metres_ms.append((time.perf_counter() - t1) * 1000.0)
        lists: dict[str, list[float]] = {}
        mid = YEAR_START + timedelta(days=180)
        variants: dict[str, dict[str, Any]] = {
            "all": {},
            "line": {"line_id": YEAR_LINE},
            "product": {"product": PRODUCTS[1]},
            "one month": {"since": mid, "until": mid + timedelta(days=30)},
            "HOLD": {"verdict": "HOLD"},
            "RELEASE": {"verdict": "RELEASE"},
        }
        rows: dict[str, int] = {}
        for name, filters in variants.items():
            ms = []
            for _ in range(n_lists):
                t0 = time.perf_counter()
                got = reader.reel_list(**filters)
                ms.append((time.perf_counter() - t0) * 1000.0)
            lists[name] = ms
            rows[name] = len(got)
    all_list = [x for ms in lists.values() for x in ms]
    return {
        "reports": len(report_ms),
        "report_metres_median": statistics.median(sizes),
        "report_ms": {"p50": round(pct(report_ms, 50), 1), "p95": round(pct(report_ms, 95), 1)},
        "metres_read_ms": {
            "p50": round(pct(metres_ms, 50), 1),
            "p95": round(pct(metres_ms, 95), 1),
        },
        "list_ms": {"p50": round(pct(all_list, 50), 1), "p95": round(pct(all_list, 95), 1)},
        "list_by_filter_ms": {
            name: {"rows": rows[name], "p50": round(pct(ms, 50), 1), "p95": round(pct(ms, 95), 1)}
            for name, ms in lists.items()
        },
        "report_met": pct(report_ms, 95) <= REPORT_GOAL_MS,
        "list_met": pct(all_list, 95) <= LIST_GOAL_MS,
    }


def year(
    dsn: str,
    reels: int,
    length_m: int,
    *,
    reuse: bool,
    n_reports: int,
    n_lists: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    import psycopg

    loaded_s = year_loaded(dsn, reels, length_m) if reuse else None
    reused = loaded_s is not None
    if loaded_s is None:
        name = psycopg.conninfo.conninfo_to_dict(dsn).get("dbname")
        say(f"loading {reels} reels of {length_m} m into database {name}")
        loaded_s = asyncio.run(load_year(dsn, reels, length_m, say))
    with psycopg.connect(dsn, autocommit=True) as conn:
        metres = conn.execute(
            "SELECT sum(stored) FROM reel_tallies WHERE line_id = %s", (YEAR_LINE,)
        ).fetchone()
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        parts = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'metres'::regclass"
        ).fetchone()
    res: dict[str, Any] = {
        "reels": reels,
        "length_m": length_m,
        "metres": int(metres[0] or 0) if metres else 0,
        "partitions": int(parts[0]) if parts else 0,
        "database_mb": round(int(size[0]) / 2**20) if size else None,
        "loaded_s": round(loaded_s, 1),
        "reused": reused,
        "reports_identical": check_against_line_store(dsn, length_m, reels),
    }
    res.update(time_queries(dsn, reels, n_reports, n_lists))
    return res


# --------------------------------------------------------------------------- 3. drivers


_CMP_SCHEMA = """
DROP TABLE IF EXISTS cmp_records, cmp_metres;
CREATE TABLE cmp_records (line_id text, store_id text, seq bigint, kind text, t text,
    data jsonb, received_at timestamptz DEFAULT now(), PRIMARY KEY (line_id, store_id, seq));
CREATE TABLE cmp_metres (line_id text, reel_id text, idx int, dose_kgy float8,
    min_dose_kgy float8, max_dose_kgy float8, verdict text, causes text, recorded_at text,
    reel_month date, PRIMARY KEY (line_id, reel_id, reel_month, idx))
    PARTITION BY RANGE (reel_month);
CREATE TABLE cmp_metres_2024_01 PARTITION OF cmp_metres
    FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
"""
_CMP_TEMP = """
CREATE TEMP TABLE IF NOT EXISTS tmp_rec (line_id text, store_id text, seq bigint, kind text,
    t text, data jsonb) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS tmp_met (line_id text, reel_id text, idx int, dose_kgy float8,
    min_dose_kgy float8, max_dose_kgy float8, verdict text, causes text, recorded_at text,
    reel_month date) ON COMMIT DELETE ROWS;
"""
_CMP_INSERT_REC = (
    "INSERT INTO cmp_records (line_id, store_id, seq, kind, t, data) "
    "SELECT line_id, store_id, seq, kind, t, data FROM tmp_rec ORDER BY seq "
    "ON CONFLICT DO NOTHING"
)
_CMP_INSERT_MET = "INSERT INTO cmp_metres SELECT * FROM tmp_met ORDER BY idx ON CONFLICT DO NOTHING"


def _cmp_rows(
    batches: list[list[Any]],
) -> list[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    month = YEAR_START.date()
    out = []
    for batch in batches:
        recs, mets = [], []
        for r in batch:
            text = json.dumps(r.data)
            recs.append((r.line_id, r.store_id, r.seq, r.kind, r.t, text))
            if r.kind == "metres":
                for m in r.data["metres"]:
                    mets.append(
                        (
                            r.line_id,
                            r.data["reel_id"],
                            m["index"],
                            m["dose_kgy"],
                            m["min_dose_kgy"],
                            m["max_dose_kgy"],
                            m["verdict"],
                            "",
                            r.t,
                            month,
                        )
                    )
        out.append((recs, mets))
    return out


async def _cmp_psycopg(dsn: str, rows: list[Any]) -> float:
    import psycopg
    from psycopg.types.json import Jsonb

    def as_is(x: Any) -> str:
        return str(x)

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await conn.execute(_CMP_SCHEMA)
        await conn.execute(_CMP_TEMP)
        t0 = time.perf_counter()
        for recs, mets in rows:
            async with conn.transaction(), conn.cursor() as cur:
                async with cur.copy("COPY tmp_rec FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(["text", "text", "int8", "text", "text", "jsonb"])
                    for r in recs:
                        await cp.write_row((*r[:5], Jsonb(r[5], as_is)))
                async with cur.copy("COPY tmp_met FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(METRE_COPY_TYPES)
                    for m in mets:
                        await cp.write_row(m)
                await cur.execute(_CMP_INSERT_REC)
                await cur.execute(_CMP_INSERT_MET)
        return time.perf_counter() - t0
    finally:
        await conn.close()


async def _cmp_asyncpg(dsn: str, rows: list[Any]) -> float:
    import asyncpg  # type: ignore[import-untyped, import-not-found, unused-ignore]
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    conn = await asyncpg.connect(
        host=params.get("host"),
        port=int(params.get("port") or 5432),
        user=params.get("user"),
        database=params.get("dbname"),
    )
    try:
        # JSON text made beforehand, as for psycopg (jsonb's binary form: version 1, text).
        await conn.set_type_codec(
            "jsonb",
            encoder=lambda text: b"\x01" + text.encode(),
            decoder=lambda data: json.loads(data[1:]),
            schema="pg_catalog",
            format="binary",
        )
        await conn.execute(_CMP_SCHEMA)
        await conn.execute(_CMP_TEMP)
        t0 = time.perf_counter()
        for recs, mets in rows:
            async with conn.transaction():
                await conn.copy_records_to_table("tmp_rec", records=recs)
                await conn.copy_records_to_table("tmp_met", records=mets)
                await conn.execute(_CMP_INSERT_REC)
                await conn.execute(_CMP_INSERT_MET)
        return time.perf_counter() - t0
    finally:
        await conn.close()


def driver_compare(
    dsn: str, rounds: int, n_batches: int, say: Callable[[str], None]
) -> dict[str, Any]:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        say("asyncpg is not installed (pip install asyncpg): comparing needs it")
        return {"error": "asyncpg not installed"}
    res: dict[str, Any] = {}
    for per_record in (1, 10):
        batches = ingest_batches("CMP", per_record, 2000, n_batches, 10**9)
        rows = _cmp_rows(batches)
        metres = n_batches * 2000
        times: dict[str, list[float]] = {"psycopg": [], "asyncpg": []}
        for r in range(rounds):
            # Alternate which goes first, so that neither always meets a warmer server.
            order = ("psycopg", "asyncpg") if r % 2 == 0 else ("asyncpg", "psycopg")
            for name in order:
                fn = _cmp_psycopg if name == "psycopg" else _cmp_asyncpg
                times[name].append(asyncio.run(fn(dsn, rows)))
        rates = {k: round(metres / statistics.median(v)) for k, v in times.items()}
        res[f"{per_record}_per_record"] = {
            "metres_per_s_median": rates,
            "rounds_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "asyncpg_over_psycopg": round(rates["asyncpg"] / rates["psycopg"], 3),
        }
        say(
            f"{per_record} metre(s)/record, {metres} metres x {rounds} rounds: psycopg "
            f"{rates['psycopg']:,} metres/s, asyncpg {rates['asyncpg']:,} metres/s "
            f"(asyncpg/psycopg {rates['asyncpg'] / rates['psycopg']:.2f})"
        )
    ratios = [v["asyncpg_over_psycopg"] for v in res.values()]
    res["choice"] = "asyncpg" if min(ratios) > 1.2 else "psycopg"
    say(f"choice: {res['choice']} (asyncpg is chosen only if > 20 % faster in every shape)")
    return res


# --------------------------------------------------------------------------- output


def print_table(res: dict[str, Any], say: Callable[[str], None] = print) -> None:
    rows: list[tuple[str, str, str, str]] = []
    for ing in res.get("ingest_runs", []):
        rows.append(
            (
                f"ingest, {ing['per_record']} metre(s)/record, metres/s",
                f"{ing['metres_per_s']:,}",
                f">= {INGEST_GOAL_METRES_S:,}",
                "yes" if ing["met"] else "NO",
            )
        )
    y = res.get("year")
    if y:
        rows.append(
            (
                "one reel's report p95, ms",
                f"{y['report_ms']['p95']}",
                f"<= {REPORT_GOAL_MS:g}",
                "yes" if y["report_met"] else "NO",
            )
        )
        rows.append(
            (
                "plant reel list p95, ms",
                f"{y['list_ms']['p95']}",
                f"<= {LIST_GOAL_MS:g}",
                "yes" if y["list_met"] else "NO",
            )
        )
    if rows:
        say(f"{'figure':48} {'measured':>12} {'goal':>10}  met")
        for name, val, goal, met in rows:
            say(f"{name:48} {val:>12} {goal:>10}  {met}")
    for ing in res.get("ingest_runs", []):
        say(
            f"ingest {ing['per_record']}/record: {ing['metres']:,} metres in {ing['records']:,} "
            f"records, {ing['batches']} batches of {ing['batch_metres']} metres, "
            f"{ing['wall_s']} s: {ing['metres_per_s']:,} metres/s, {ing['records_per_s']:,} "
            f"records/s; batch p50 {ing['batch_ms']['p50']} ms p95 {ing['batch_ms']['p95']} ms; "
            f"CPU per metre: this process {ing['client_cpu_us_per_metre']} us, PostgreSQL "
            f"backend {ing['server_cpu_us_per_metre']} us; metres/s by tenth of the run: "
            f"{', '.join(f'{x:,}' for x in ing['metres_per_s_by_tenth'])}"
        )
    if y:
        say(
            f"year: {y['metres']:,} metres in {y['reels']} reels ({y['partitions']} month "
            f"partitions, database {y['database_mb']} MB; loaded in {y['loaded_s']} s"
            f"{', reused' if y['reused'] else ''}); report of {y['reports']} reels "
            f"(median {y['report_metres_median']:g} m): p50 {y['report_ms']['p50']} ms p95 "
            f"{y['report_ms']['p95']} ms (reading the metres: p50 {y['metres_read_ms']['p50']} "
            f"ms); identical to the line store's: {y['reports_identical']}"
        )
        for name, f in y["list_by_filter_ms"].items():
            say(f"  reel list ({name}): {f['rows']} rows, p50 {f['p50']} ms p95 {f['p95']} ms")
    say(
        f"load average (1, 5, 15 min): start {res['load_avg_start']}, end {res['load_avg_end']}; "
        f"{res['cpus']} CPUs; took {res['took_s']} s; code {res['code']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--server", help=f"PostgreSQL to make databases on (default {DEFAULT_SERVER})")
    ap.add_argument("--dsn", help="use this one database for everything (made by the caller)")
    ap.add_argument("--per-record", default="1,10", help="metres per record, comma-separated")
    ap.add_argument("--batch", type=int, default=2000, help="metres per apply() (default 2000)")
    ap.add_argument(
        "--metres", type=int, default=1_000_000, help="metres per ingest run (default 1e6)"
    )
    ap.add_argument("--year", action="store_true", help="load a line's year, time the reads")
    ap.add_argument("--year-db", default=YEAR_DB, help=f"its database (default {YEAR_DB})")
    ap.add_argument("--reels", type=int, default=1500, help="reels in the year")
    ap.add_argument("--length", type=int, default=10_000, help="metres per reel")
    ap.add_argument("--reports", type=int, default=30, help="reels whose report is timed")
    ap.add_argument("--lists", type=int, default=10, help="runs of each reel list")
    ap.add_argument("--keep", action="store_true", help="keep the year's database afterwards")
    ap.add_argument("--reuse", action="store_true", help="use the year's database if loaded")
    ap.add_argument("--driver-compare", action="store_true", help="psycopg 3 against asyncpg")
    ap.add_argument("--rounds", type=int, default=5, help="driver comparison rounds")
    ap.add_argument("--smoke", action="store_true", help="everything at small sizes")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    try:
        per_record = [int(x) for x in args.per_record.split(",") if x]
    except ValueError:
        ap.error(f"--per-record {args.per_record!r}: integers, comma-separated")
    if not per_record or min(per_record) < 1 or args.batch < 1 or args.metres < 1:
        ap.error("--per-record, --batch and --metres must be positive")
    if args.reels < 1 or args.length < 10:
        ap.error("--reels must be >= 1 and --length >= 10")
    if args.smoke:
        per_record, args.batch, args.metres = [1, 10], 200, 800
        if args.year_db == YEAR_DB:
            args.year_db = f"{YEAR_DB}_smoke_{os.getpid()}"  # never the kept year
        args.reels, args.length, args.reports, args.lists = 6, 400, 3, 2
    server = server_dsn(args.server)
    code = code_version()
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    res: dict[str, Any] = {"python": sys.version.split()[0], "code": code}

    def say(text: str) -> None:
        print(text, flush=True)

    @contextmanager
    def db_for(name: str, *, keep: bool, fresh: bool) -> Iterator[str]:
        if args.dsn:
            yield args.dsn
        else:
            with database(server, name, drop=not keep, fresh=fresh) as dsn:
                yield dsn

    if args.driver_compare:
        with db_for(f"linectl_bench_drivers_{os.getpid()}", keep=False, fresh=True) as dsn:
            res["driver_compare"] = driver_compare(dsn, args.rounds, 20, say)
    if not args.driver_compare or args.smoke:
        if not args.year or args.smoke:
            runs = []
            with db_for(f"linectl_bench_ingest_{os.getpid()}", keep=False, fresh=True) as dsn:
                for n in per_record:
                    runs.append(asyncio.run(ingest(dsn, n, args.batch, args.metres)))
                    say(f"ingest {n}/record: {runs[-1]['metres_per_s']:,} metres/s")
            res["ingest_runs"] = runs
            res["ingest"] = runs[0]
        if args.year or args.smoke:
            # --reuse keeps the database only when it holds this very year; any other
            # content is dropped and the year loaded afresh.
            fresh = True
            if args.reuse and not args.dsn:
                with database(server, args.year_db, drop=False, fresh=False) as dsn:
                    fresh = year_loaded(dsn, args.reels, args.length) is None
            with db_for(args.year_db, keep=args.keep, fresh=fresh) as dsn:
                res["year"] = year(
                    dsn,
                    args.reels,
                    args.length,
                    reuse=args.reuse,
                    n_reports=args.reports,
                    n_lists=args.lists,
                    say=say,
                )
    res.update(host_facts(load_start, t0))
    print()
    print_table(res, say)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
