"""The crash-safe record store: reels, metres, alarms, operator actions (process.md, Records).

SQLite through the standard library. Durability: WAL journal with `synchronous=FULL`, so a
commit returns only after the WAL is on disk; a metre that `add_metres` returned for
survives a crash of the controller and a power cut of the machine (as far as the disk
honours fsync). Each public write is one transaction.

Threading: one connection per `RecordStore`, opened with `check_same_thread=False` and
guarded by a lock, so any thread may call it, one call at a time. The service is meant to
call it from a single writer thread; readers in other processes (the report) see only
committed data, thanks to WAL.

Time: every timestamp is an argument (ISO 8601 UTC text); the store never reads a clock.
`utc_now_iso()` is there for callers that own the clock.

Restart rule: a metre index, once stored, is never stored again, never counted twice and
never overwritten: the first record of a metre wins (see `add_metres`).

Outbox (store-and-forward, docs/mqtt.md): every record written (new metres, unproven
ranges, reel start and end, alarm raised/acknowledged/cleared, audit events) also writes
an `outbox` row in the same transaction, so a record on disk always has its outbox row.
Publishers read the outbox in `seq` order on their own `RecordStore` (their own
connection) and advance a named, persisted cursor only past what their broker has
acknowledged.

Identity and retention (docs/records.md, "Store identity" and "Retention"): every store
file gets a random `store_id` once, when it is created, so that a plant historian can tell
one store's sequence numbers from another's (a new file, or a file restored from a backup
whose sequence went back). `prune_confirmed` deletes closed reels a historian has
confirmed, and nothing else ever deletes a record.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from linectl.core.ledger import MetreRecord, Verdict
from linectl.errors import LinectlError, LocalError

_T = TypeVar("_T")

log = logging.getLogger("linectl.store")

SCHEMA_VERSION = 4

_SCHEMA_V1 = """
CREATE TABLE reels (
    reel_id          TEXT PRIMARY KEY,
    line_id          TEXT NOT NULL,
    recipe_product   TEXT NOT NULL,
    recipe_version   TEXT NOT NULL,
    recipe_hash      TEXT NOT NULL,
    recipe_json      TEXT NOT NULL,
    operator         TEXT NOT NULL,
    planned_length_m REAL,
    started_at       TEXT NOT NULL,
    ended_at         TEXT,
    end_reason       TEXT,
    state            TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed')),
    start_json       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX reels_open ON reels (line_id, state);
CREATE TABLE metres (
    reel_id      TEXT NOT NULL REFERENCES reels (reel_id),
    idx          INTEGER NOT NULL CHECK (idx >= 0),
    dose_kgy     REAL,
    min_dose_kgy REAL,
    max_dose_kgy REAL,
    verdict      TEXT NOT NULL,
    causes       TEXT NOT NULL DEFAULT '',
    recorded_at  TEXT NOT NULL,
    PRIMARY KEY (reel_id, idx)
) WITHOUT ROWID;
CREATE TABLE alarms (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    reel_id         TEXT REFERENCES reels (reel_id),
    kind            TEXT NOT NULL,
    message         TEXT NOT NULL,
    raised_at       TEXT NOT NULL,
    acknowledged_at TEXT,
    acknowledged_by TEXT,
    cleared_at      TEXT
);
CREATE TABLE events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    t        TEXT NOT NULL,
    reel_id  TEXT REFERENCES reels (reel_id),
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    detail   TEXT NOT NULL,
    accepted INTEGER NOT NULL CHECK (accepted IN (0, 1)),
    reason   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_reel ON events (reel_id, id);
CREATE TABLE reel_state (
    reel_id TEXT NOT NULL REFERENCES reels (reel_id),
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (reel_id, key)
);
"""

# Version 2: the outbox for store-and-forward publishing, and its consumers' cursors.
_SCHEMA_V2 = """
CREATE TABLE outbox (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('metres', 'reel', 'alarm', 'audit')),
    t    TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE outbox_cursor (
    consumer TEXT PRIMARY KEY,
    seq      INTEGER NOT NULL CHECK (seq >= 0)
);
"""

# Version 3: alarm shelving (ISA-18.2). One row per shelf, kept when it ends (who ended
# it, or that it expired); at most one shelf in force (not ended) per alarm kind.
_SCHEMA_V3 = """
CREATE TABLE alarm_shelves (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL,
    message      TEXT NOT NULL,
    raised_ms    INTEGER NOT NULL,
    shelved_at   TEXT NOT NULL,
    shelved_by   TEXT NOT NULL,
    reason       TEXT NOT NULL,
    until_ms     INTEGER NOT NULL,
    ended_at     TEXT,
    ended_by     TEXT,
    expired      INTEGER NOT NULL DEFAULT 0 CHECK (expired IN (0, 1))
);
CREATE UNIQUE INDEX alarm_shelves_in_force ON alarm_shelves (kind) WHERE ended_at IS NULL;
"""

# Version 4: the store's identity (store_meta: key `store_id`, a uuid4 made once), the
# outbox seq of each closed reel's end record (reels.end_seq: retention deletes a reel only
# once the historians confirmed it, and the outbox row may be pruned long before), and the
# reels retention deleted (pruned_reels: a reel id stays used once, and the report can say
# where the reel went). end_seq of a reel closed before version 4 is taken from its end
# record when the outbox still holds it; NULL otherwise, and such a reel is never pruned.
_SCHEMA_V4 = """
CREATE TABLE store_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
ALTER TABLE reels ADD COLUMN end_seq INTEGER;
UPDATE reels SET end_seq = ends.seq FROM (
    SELECT json_extract(data, '$.reel_id') AS reel_id, MAX(seq) AS seq FROM outbox
    WHERE kind = 'reel' AND json_extract(data, '$.event') = 'end' GROUP BY 1
) AS ends WHERE reels.reel_id = ends.reel_id AND reels.state = 'closed';
CREATE TABLE pruned_reels (
    reel_id       TEXT PRIMARY KEY,
    line_id       TEXT NOT NULL,
    started_at    TEXT NOT NULL,
    ended_at      TEXT NOT NULL,
    end_seq       INTEGER NOT NULL,
    metres        INTEGER NOT NULL,
    pruned_before TEXT NOT NULL
);
"""


def _migrate_v4(db: sqlite3.Connection) -> None:
    _run_script(db, _SCHEMA_V4)
    # Made here, once: a file created new, and a version-3 file at its upgrade, get their
    # identity in the same transaction as the table that holds it.
    db.execute("INSERT INTO store_meta (key, value) VALUES ('store_id', ?)", (str(uuid.uuid4()),))


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Run the statements of `script` inside the caller's transaction (executescript
    would commit it)."""
    for stmt in script.split(";"):
        if stmt.strip():
            db.execute(stmt)


# Index i holds the step that takes the schema from version i to i + 1: a script, or a
# function for a step that needs more than SQL (a value made in Python).
_MIGRATIONS: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    _SCHEMA_V1,
    _SCHEMA_V2,
    _SCHEMA_V3,
    _migrate_v4,
)

OUTBOX_KEEP = 100_000
"""Outbox rows kept after every consumer has passed them (for late diagnosis)."""


LOCK_WAIT_S = 10.0
"""How long a write waits for the database's write lock while another connection (another
process: a second linectl, an `sqlite3` shell in a transaction) holds it."""
MIN_LOCK_WAIT_S = 0.5
"""The least a write waits once `limit_lock_waits` has cut the waits short (at shutdown),
so that a moment's ordinary contention (the MQTT bridge advancing its cursor) never costs a
record."""
_ATTEMPT_S = 0.05
"""SQLite's own busy wait per attempt; the store retries in its own loop, which
`limit_lock_waits` can end from another thread."""
_UNWRITTEN_KEPT = 200


class StoreFileError(LocalError):
    """The database file cannot be used: not an SQLite database, damaged, or not openable.
    The message names the file."""


class StoreLockedError(LinectlError):
    """A write that could not take the database's write lock in time: another connection
    holds it. Nothing of that write is stored; the message names the file and the write."""


# Every open store of this process: limit_lock_waits() ends their waits (at shutdown).
_OPEN_STORES: weakref.WeakSet[RecordStore] = weakref.WeakSet()
_OPEN_LOCK = threading.Lock()


def limit_lock_waits(seconds: float) -> None:
    """From now on, every open store of this process waits for a locked database at most
    until `seconds` from now (but at least MIN_LOCK_WAIT_S per write), a wait in progress
    included. `linectl run` calls it on SIGTERM/SIGINT: a database another process keeps
    locked must not hold up a safe stop (docs/records.md, "A locked database")."""
    with _OPEN_LOCK:
        stores = list(_OPEN_STORES)
    for store in stores:
        store.limit_lock_waits(seconds)


def _primary_code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _is_busy(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _file_error(path: Path, exc: sqlite3.Error) -> StoreFileError | None:
    """The error to raise for a database file that cannot be used, or None for others."""
    code = _primary_code(exc)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreFileError(
            f"{path}: not a usable record database ({exc}): the file is damaged or is not "
            "a linectl database; restore it from a backup (docs/deployment.md) or give "
            "another --db"
        )
    if code == sqlite3.SQLITE_CANTOPEN:
        return StoreFileError(f"{path}: cannot open the record database ({exc})")
    if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_PERM):
        return StoreFileError(f"{path}: cannot use the record database ({exc})")
    if code == sqlite3.SQLITE_READONLY:
        return StoreFileError(f"{path}: the record database cannot be written ({exc})")
    return None


def check_database(path: Path | str) -> None:
    """Open the record database at `path` (creating it when missing) and run SQLite's
    quick check; StoreFileError naming the file when it is damaged or not a database.
    `linectl run` calls it before anything starts."""
    with RecordStore(path) as store:
        result = store.quick_check()
    if result != "ok":
        raise StoreFileError(
            f"{path}: the record database is damaged (quick_check: {result}); restore it "
            "from a backup (docs/deployment.md) or give another --db"
        )


def utc_now_iso() -> str:
    """Wall-clock time now, ISO 8601 UTC (for callers that own the clock)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class ReelInfo:
    """What is known of a reel when it starts. `start` holds what a restarted controller
    needs to resume its ledger (L0, counter readings at the start), as JSON-able data."""

    reel_id: str
    line_id: str
    recipe_product: str
    recipe_version: str
    recipe_hash: str  # sha256 of the recipe file's content
    recipe_json: str  # the recipe as validated, JSON text
    operator: str
    planned_length_m: float | None
    started_at: str
    start: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReelRecord(ReelInfo):
    """A stored reel: its start information and how (whether) it ended."""

    state: str = "open"  # "open" or "closed"
    ended_at: str | None = None
    end_reason: str | None = None


@dataclass(frozen=True, slots=True)
class StoredMetre:
    """One stored metre. Doses are None for a metre recorded unproven without any dose."""

    index: int
    dose_kgy: float | None
    min_dose_kgy: float | None
    max_dose_kgy: float | None
    verdict: Verdict
    causes: tuple[str, ...]
    recorded_at: str

    def to_record(self) -> MetreRecord:
        """As a ledger record (NaN for doses not known)."""
        nan = math.nan
        return MetreRecord(
            self.index,
            nan if self.dose_kgy is None else self.dose_kgy,
            nan if self.min_dose_kgy is None else self.min_dose_kgy,
            nan if self.max_dose_kgy is None else self.max_dose_kgy,
            self.verdict,
            self.causes,
        )


@dataclass(frozen=True, slots=True)
class Alarm:
    """One alarm occurrence and its lifecycle."""

    id: int
    reel_id: str | None
    kind: str
    message: str
    raised_at: str
    acknowledged_at: str | None
    acknowledged_by: str | None
    cleared_at: str | None

    @property
    def active(self) -> bool:
        """Shown until it is both cleared and acknowledged (latched alarms)."""
        return self.cleared_at is None or self.acknowledged_at is None


@dataclass(frozen=True, slots=True)
class AlarmShelf:
    """One shelving of an alarm (ISA-18.2): in force until `until_ms` (unix ms) unless
    ended before; `ended_at` None while in force."""

    id: int
    kind: str
    message: str
    raised_ms: int
    """When the alarm was last raised before it was shelved, unix ms."""
    shelved_at: str
    shelved_by: str
    reason: str
    until_ms: int
    ended_at: str | None = None
    ended_by: str | None = None
    """Who unshelved it ("controller" when it expired)."""
    expired: bool = False

    @property
    def in_force(self) -> bool:
        return self.ended_at is None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One record waiting to be published: its kind, the record's time and content."""

    seq: int
    kind: str  # metres, reel, alarm, audit
    t: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What `prune_confirmed` deleted, and the old, confirmed reels it kept and why."""

    reels: tuple[str, ...] = ()
    """The reels deleted, oldest end first."""
    metres: int = 0
    events: int = 0
    alarms: int = 0
    reel_states: int = 0
    kept: tuple[tuple[str, str], ...] = ()
    """(reel id, why) of reels old enough and confirmed that were kept all the same."""
    resume_after: int | None = None
    """The call stopped at its `limit`: pass this as `after_end_seq` to go on (None: every
    reel due was looked at)."""

    def __add__(self, other: PruneResult) -> PruneResult:
        return PruneResult(
            self.reels + other.reels,
            self.metres + other.metres,
            self.events + other.events,
            self.alarms + other.alarms,
            self.reel_states + other.reel_states,
            self.kept + other.kept,
            other.resume_after,
        )


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One operator action or command, accepted or refused, and why."""

    id: int
    t: str
    reel_id: str | None
    actor: str
    action: str
    detail: dict[str, Any]
    accepted: bool
    reason: str


def _finite(x: float) -> float | None:
    # SQLite stores NaN as NULL anyway; say so explicitly.
    return x if math.isfinite(x) else None


def _causes_text(causes: Sequence[str]) -> str:
    return ",".join(causes)


def _causes_tuple(text: str) -> tuple[str, ...]:
    return tuple(c for c in text.split(",") if c)


def reel_from_row(row: Sequence[Any]) -> ReelRecord:
    """A reel from its row, columns as `RecordStore._REEL_COLUMNS` (the historian's reels
    table has the same columns: one reading for both)."""
    return ReelRecord(
        reel_id=row[0],
        line_id=row[1],
        recipe_product=row[2],
        recipe_version=row[3],
        recipe_hash=row[4],
        recipe_json=row[5],
        operator=row[6],
        planned_length_m=row[7],
        started_at=row[8],
        start=json.loads(row[9]),
        state=row[10],
        ended_at=row[11],
        end_reason=row[12],
    )


class RecordStore:
    """The records of one line (or several) in one SQLite file."""

    def __init__(self, path: Path | str, *, lock_wait_s: float = LOCK_WAIT_S) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.lock_wait_s = lock_wait_s
        """How long a write waits for the write lock another connection holds."""
        self._wait_until: float | None = None  # limit_lock_waits (monotonic)
        # A wait ran out and no write has succeeded since: the lock is held for long. After
        # limit_lock_waits, later writes then try once instead of waiting each.
        self._stuck = False
        self._unwritten: list[str] = []
        self._unwritten_total = 0
        self._store_id: str | None = None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per public write.
            # The busy timeout is short: lock waits are the store's own loop (_retry).
            self._db = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=_ATTEMPT_S
            )
        except sqlite3.Error as exc:
            raise (_file_error(self.path, exc) or exc) from None
        try:
            self._use_wal()
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise (_file_error(self.path, exc) or exc) from None
        except BaseException:
            self._db.close()
            raise
        with _OPEN_LOCK:
            _OPEN_STORES.add(self)

    def _use_wal(self, timeout_s: float = 10.0) -> None:
        # Two connections opening a new file at once (the service's writer and the MQTT
        # bridge's reader start together; found by bench/soak.py) race to switch it to
        # WAL, and SQLite answers the loser "database is locked" at once instead of
        # waiting out the busy timeout (waiting could deadlock). The winner's switch takes
        # a moment: try again until it is done.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL").fetchone()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the connection (a checkpoint folds the WAL into the database). Writes that
        could not be made for a locked database are listed in the log, loudly."""
        with _OPEN_LOCK:
            _OPEN_STORES.discard(self)
        with self._lock:
            self._db.close()
            unwritten, total = self._unwritten, self._unwritten_total
            self._unwritten, self._unwritten_total = [], 0
        if total:
            more = f" (and {total - len(unwritten)} more)" if total > len(unwritten) else ""
            log.error(
                "%s: %d record write(s) NOT STORED, the database was locked by another "
                "connection: %s%s. A restarted `linectl run --resume` takes the reel up from "
                "its last stored checkpoint and records the metres since from the PLCs' "
                "counters as a data gap; the audit events and alarm changes listed are lost",
                self.path,
                total,
                "; ".join(unwritten),
                more,
            )

    @property
    def unwritten(self) -> int:
        """How many writes failed on a locked database since the store was opened."""
        return self._unwritten_total

    def limit_lock_waits(self, seconds: float) -> None:
        """Wait for a locked database at most until `seconds` from now (at least
        MIN_LOCK_WAIT_S per write), a wait in progress included; thread-safe."""
        until = time.monotonic() + max(0.0, seconds)
        current = self._wait_until
        self._wait_until = until if current is None else min(current, until)

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _deadline(self, start: float) -> float:
        deadline = start + self.lock_wait_s
        if self._wait_until is None:
            # Running: every write waits its full time. The writes behind it wait in the
            # caller's queue, in order, and go in when the lock is released.
            return deadline
        if self._stuck:
            return start  # shutting down, and the lock is held for long: one attempt
        return min(deadline, max(self._wait_until, start + MIN_LOCK_WAIT_S))

    def _retry(self, attempt: Callable[[], _T], what: Callable[[], str] | None) -> _T:
        """Run `attempt` until the database is not busy (another connection holds the
        lock), up to the deadline; then StoreLockedError naming `what` (a write; None: a
        read). Call with self._lock held."""
        start = time.monotonic()
        while True:
            try:
                result = attempt()
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise (_file_error(self.path, exc) or exc) from None
                if time.monotonic() < self._deadline(start):
                    continue  # each attempt waits up to _ATTEMPT_S in SQLite
                waited = time.monotonic() - start
                if what is None:
                    raise StoreLockedError(
                        f"{self.path}: the database is locked by another connection "
                        f"(waited {waited:.1f} s)"
                    ) from None
                self._stuck = True
                text = what()
                self._unwritten_total += 1
                if len(self._unwritten) < _UNWRITTEN_KEPT:
                    self._unwritten.append(text)
                raise StoreLockedError(
                    f"{self.path}: {text} NOT STORED: the database is locked by another "
                    f"connection (waited {waited:.1f} s)"
                ) from None
            if what is not None:
                self._stuck = False
            return result

    @contextmanager
    def _tx(self, what: Callable[[], str] = lambda: "a write") -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (IMMEDIATE) so it cannot fail half way on
        a lock upgrade; rolled back on any error. `what` says what it writes, for the
        error when the database stays locked."""
        with self._lock:
            self._retry(lambda: self._db.execute("BEGIN IMMEDIATE"), what)
            try:
                yield self._db
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise (_file_error(self.path, exc) or exc) from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise (_file_error(self.path, exc) or exc) from None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._retry(lambda: self._db.execute(sql, params).fetchall(), None)

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one step per transaction."""
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise LocalError(
                f"{self.path}: record schema version {version} is newer than this linectl "
                f"understands ({SCHEMA_VERSION})"
            )
        while version < SCHEMA_VERSION:
            self._retry(lambda: db.execute("BEGIN IMMEDIATE"), lambda: "the schema upgrade")
            try:
                # Another connection (the publisher's, another process) may have migrated
                # while we waited for the write lock: read the version again under it.
                row = db.execute("SELECT version FROM schema_version").fetchone()
                if row is not None and int(row[0]) > version:
                    db.execute("COMMIT")
                    version = int(row[0])
                    continue
                step = _MIGRATIONS[version]
                if isinstance(step, str):
                    _run_script(db, step)
                else:
                    step(db)
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            version += 1

    def schema_version(self) -> int:
        """The schema version of the open database."""
        return int(self._query("SELECT version FROM schema_version")[0][0])

    @property
    def store_id(self) -> str:
        """This store file's identity: a uuid4 (text) made once, when the file was created
        (or upgraded to schema version 4), and never changed. A copy of the file (a
        backup) has the same one: its sequence numbers are the same store's."""
        if self._store_id is None:
            rows = self._query("SELECT value FROM store_meta WHERE key = 'store_id'")
            self._store_id = str(rows[0][0])
        return self._store_id

    def integrity_check(self) -> str:
        """SQLite's own check: 'ok' when the file is sound."""
        return str(self._query("PRAGMA integrity_check")[0][0])

    def quick_check(self) -> str:
        """SQLite's quick check (pages and structure, not index contents): 'ok' when sound."""
        return "; ".join(str(r[0]) for r in self._query("PRAGMA quick_check(5)"))

    # ------------------------------------------------------------------ reels

    def open_reel(self, reel: ReelInfo) -> None:
        """Record the start of a reel; LocalError if the reel id exists already."""
        # The text stored is the text published: the historian keeps the line's own.
        start_json = json.dumps(dict(reel.start), sort_keys=True)
        with self._tx(lambda: f"the start of reel {reel.reel_id}") as db:
            if _reel_id_taken(db, reel.reel_id):
                raise LocalError(f"reel {reel.reel_id!r} exists already: a reel id is used once")
            db.execute(
                "INSERT INTO reels (reel_id, line_id, recipe_product, recipe_version, "
                "recipe_hash, recipe_json, operator, planned_length_m, started_at, start_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    reel.reel_id,
                    reel.line_id,
                    reel.recipe_product,
                    reel.recipe_version,
                    reel.recipe_hash,
                    reel.recipe_json,
                    reel.operator,
                    reel.planned_length_m,
                    reel.started_at,
                    start_json,
                ),
            )
            _outbox(
                db,
                "reel",
                reel.started_at,
                {
                    "event": "start",
                    "reel_id": reel.reel_id,
                    "line_id": reel.line_id,
                    "operator": reel.operator,
                    "planned_length_m": reel.planned_length_m,
                    "recipe": {
                        "product": reel.recipe_product,
                        "version": reel.recipe_version,
                        "hash": reel.recipe_hash,
                    },
                    # What the historian needs to rebuild the reel's report on its own
                    # (identical to the line's): the recipe as validated, the start data.
                    "recipe_json": reel.recipe_json,
                    "start": json.loads(start_json),
                    "started_at": reel.started_at,
                },
            )

    _REEL_COLUMNS = (
        "reel_id, line_id, recipe_product, recipe_version, recipe_hash, recipe_json, "
        "operator, planned_length_m, started_at, start_json, state, ended_at, end_reason"
    )

    def find_open_reel(self, line_id: str) -> ReelRecord | None:
        """The reel of this line still open (after a restart: the one to resume or close)."""
        rows = self._query(
            f"SELECT {self._REEL_COLUMNS} FROM reels WHERE line_id = ? AND state = 'open' "
            "ORDER BY started_at DESC, rowid DESC",
            (line_id,),
        )
        if len(rows) > 1:
            log.warning(
                "line %s has %d open reels; returning the latest started", line_id, len(rows)
            )
        return reel_from_row(rows[0]) if rows else None

    def reel(self, reel_id: str) -> ReelRecord:
        """A stored reel; LocalError if unknown (saying so when retention deleted it)."""
        rows = self._query(f"SELECT {self._REEL_COLUMNS} FROM reels WHERE reel_id = ?", (reel_id,))
        if not rows:
            pruned = self._query(
                "SELECT ended_at, pruned_before FROM pruned_reels WHERE reel_id = ?", (reel_id,)
            )
            if pruned:
                raise LocalError(
                    f"reel {reel_id!r} is no longer in {self.path}: it ended at {pruned[0][0]} "
                    "and was deleted by the line's retention after the plant historian "
                    f"confirmed it; report it from the historian (linectl report --historian DSN "
                    f"{reel_id})"
                )
            raise LocalError(f"no reel {reel_id!r} in {self.path}")
        return reel_from_row(rows[0])

    def reel_exists(self, reel_id: str) -> bool:
        """Whether a reel with this id was ever recorded (a reel id is used once), a reel
        retention deleted included."""
        with self._lock:
            return self._retry(lambda: _reel_id_taken(self._db, reel_id), None)

    def reels(self) -> list[ReelRecord]:
        """Every reel, oldest start first."""
        rows = self._query(f"SELECT {self._REEL_COLUMNS} FROM reels ORDER BY started_at, rowid")
        return [reel_from_row(r) for r in rows]

    def metre_tallies(self) -> dict[str, tuple[int, int, int]]:
        """Reel id -> (metres stored, of them in spec, last stored index), for every reel
        with metres, in one query."""
        rows = self._query(
            "SELECT reel_id, COUNT(*), SUM(verdict = ?), MAX(idx) FROM metres GROUP BY reel_id",
            (Verdict.IN_SPEC.value,),
        )
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}

    def close_reel(self, reel_id: str, ended_at: str, reason: str) -> None:
        """Record the end of a reel; LocalError if unknown or closed already."""
        with self._tx(lambda: f"the end of reel {reel_id} ({reason})") as db:
            self._require_open(db, reel_id)
            db.execute(
                "UPDATE reels SET state = 'closed', ended_at = ?, end_reason = ? WHERE reel_id = ?",
                (ended_at, reason, reel_id),
            )
            summary = _reel_summary(db, reel_id)
            end_seq = _outbox(
                db,
                "reel",
                ended_at,
                {"event": "end", "reel_id": reel_id, "reason": reason, "summary": summary},
            )
            # Kept on the reel: retention compares it with the historians' confirmed seq
            # long after the outbox row itself is pruned.
            db.execute("UPDATE reels SET end_seq = ? WHERE reel_id = ?", (end_seq, reel_id))

    @staticmethod
    def _require_open(db: sqlite3.Connection, reel_id: str) -> None:
        row = db.execute("SELECT state FROM reels WHERE reel_id = ?", (reel_id,)).fetchone()
        if row is None:
            raise LocalError(f"no reel {reel_id!r}")
        if row[0] != "open":
            raise LocalError(f"reel {reel_id!r} is closed: its records are final")

    # ------------------------------------------------------------------ metres

    def add_metres(
        self,
        reel_id: str,
        records: Sequence[MetreRecord],
        recorded_at: str,
        *,
        state: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> int:
        """Store final metres in one transaction; return how many were new.

        `state` (key -> value, as in `save_state`) is saved in the same transaction, so a
        ledger checkpoint and the metres it accounts for are never out of step on disk.

        A metre index already stored is ignored (INSERT OR IGNORE): the first record of a
        metre wins and is never counted twice. A repeat with other content (a replay after
        a restart, or a metre marked unproven before) is logged as a warning and dropped:
        a stored verdict is never replaced, so nothing marked unproven or out of spec can
        later turn in spec. LocalError if the reel is unknown or closed.
        """
        if not records and not state:
            return 0
        inserted = 0
        conflicts: list[int] = []
        new: list[dict[str, Any]] = []
        with self._tx(lambda: _metres_what(reel_id, records, state)) as db:
            self._require_open(db, reel_id)
            for rec in records:
                row = (
                    reel_id,
                    rec.index,
                    _finite(rec.dose_kgy),
                    _finite(rec.min_dose_kgy),
                    _finite(rec.max_dose_kgy),
                    rec.verdict.value,
                    _causes_text(rec.causes),
                    recorded_at,
                )
                cur = db.execute(
                    "INSERT OR IGNORE INTO metres (reel_id, idx, dose_kgy, min_dose_kgy, "
                    "max_dose_kgy, verdict, causes, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                if cur.rowcount == 1:
                    inserted += 1
                    new.append(_metre_json(rec))
                    continue
                old = db.execute(
                    "SELECT dose_kgy, min_dose_kgy, max_dose_kgy, verdict, causes FROM metres "
                    "WHERE reel_id = ? AND idx = ?",
                    (reel_id, rec.index),
                ).fetchone()
                if tuple(old) != row[2:7]:
                    conflicts.append(rec.index)
            for key, value in (state or {}).items():
                self._put_state(db, reel_id, key, value)
            if new:
                _outbox(
                    db,
                    "metres",
                    recorded_at,
                    {"event": "metres", "reel_id": reel_id, "metres": new},
                )
        if conflicts:
            log.warning(
                "reel %s: %d metre(s) came again with other content and were kept as first "
                "stored (indices %s)",
                reel_id,
                len(conflicts),
                _ranges_text(conflicts),
            )
        return inserted

    def last_metre_index(self, reel_id: str) -> int | None:
        """The highest metre index stored for the reel (None when none is)."""
        value = self._query("SELECT MAX(idx) FROM metres WHERE reel_id = ?", (reel_id,))[0][0]
        return None if value is None else int(value)

    def metre_count(self, reel_id: str) -> int:
        """How many metres are stored for the reel."""
        return int(self._query("SELECT COUNT(*) FROM metres WHERE reel_id = ?", (reel_id,))[0][0])

    def mark_unproven(
        self, reel_id: str, first_idx: int, last_idx: int, cause: str, recorded_at: str
    ) -> int:
        """Record metres first_idx..last_idx (inclusive) as unproven, without a dose, where
        nothing is stored yet (a restarted controller could not see them); return how many
        were new. Metres already stored keep their record."""
        if first_idx < 0 or last_idx < first_idx:
            raise LocalError(f"bad metre range {first_idx}..{last_idx}")
        with self._tx(
            lambda: f"unproven metres {first_idx}..{last_idx} of reel {reel_id} ({cause})"
        ) as db:
            self._require_open(db, reel_id)
            stored = {
                int(r[0])
                for r in db.execute(
                    "SELECT idx FROM metres WHERE reel_id = ? AND idx BETWEEN ? AND ?",
                    (reel_id, first_idx, last_idx),
                )
            }
            cur = db.executemany(
                "INSERT OR IGNORE INTO metres (reel_id, idx, dose_kgy, min_dose_kgy, "
                "max_dose_kgy, verdict, causes, recorded_at) "
                "VALUES (?, ?, NULL, NULL, NULL, ?, ?, ?)",
                (
                    (reel_id, i, Verdict.UNPROVEN.value, cause, recorded_at)
                    for i in range(first_idx, last_idx + 1)
                ),
            )
            for lo, hi in _missing_ranges(first_idx, last_idx, stored):
                _outbox(
                    db,
                    "metres",
                    recorded_at,
                    {
                        "event": "unproven",
                        "reel_id": reel_id,
                        "first_index": lo,
                        "last_index": hi,
                        "cause": cause,
                    },
                )
            return int(cur.rowcount)

    def metres(self, reel_id: str) -> list[StoredMetre]:
        """Every stored metre of the reel, by index."""
        rows = self._query(
            "SELECT idx, dose_kgy, min_dose_kgy, max_dose_kgy, verdict, causes, recorded_at "
            "FROM metres WHERE reel_id = ? ORDER BY idx",
            (reel_id,),
        )
        return [
            StoredMetre(r[0], r[1], r[2], r[3], Verdict(r[4]), _causes_tuple(r[5]), r[6])
            for r in rows
        ]

    # ------------------------------------------------------------------ alarms

    def raise_alarm(
        self, kind: str, message: str, raised_at: str, reel_id: str | None = None
    ) -> int:
        """Record a new alarm; return its id."""
        with self._tx(lambda: f"alarm {kind} raised at {raised_at}") as db:
            cur = db.execute(
                "INSERT INTO alarms (reel_id, kind, message, raised_at) VALUES (?, ?, ?, ?)",
                (reel_id, kind, message, raised_at),
            )
            assert cur.lastrowid is not None
            alarm_id = int(cur.lastrowid)
            _outbox(
                db,
                "alarm",
                raised_at,
                {
                    "event": "raised",
                    "alarm_id": alarm_id,
                    "kind": kind,
                    "message": message,
                    "reel_id": reel_id,
                },
            )
            return alarm_id

    def ack_alarm(self, alarm_id: int, by: str, at: str) -> None:
        """Acknowledge an alarm; a second acknowledgement keeps the first one's time."""
        with self._tx(lambda: f"the acknowledgement of alarm {alarm_id} by {by}") as db:
            self._require_alarm(db, alarm_id)
            self._ack(db, alarm_id, by, at)

    def ack_alarms(self, kind: str, by: str, at: str) -> list[int]:
        """Acknowledge every unacknowledged alarm of `kind` ("*": of any kind); return
        their ids (empty when there was none)."""
        with self._tx(lambda: f"the acknowledgement of {kind} alarms by {by}") as db:
            if kind == "*":
                rows = db.execute("SELECT id FROM alarms WHERE acknowledged_at IS NULL")
            else:
                rows = db.execute(
                    "SELECT id FROM alarms WHERE acknowledged_at IS NULL AND kind = ?", (kind,)
                )
            ids = [int(r[0]) for r in rows.fetchall()]
            for alarm_id in ids:
                self._ack(db, alarm_id, by, at)
            return ids

    @staticmethod
    def _ack(db: sqlite3.Connection, alarm_id: int, by: str, at: str) -> None:
        cur = db.execute(
            "UPDATE alarms SET acknowledged_at = ?, acknowledged_by = ? "
            "WHERE id = ? AND acknowledged_at IS NULL",
            (at, by, alarm_id),
        )
        if cur.rowcount == 1:
            _outbox_alarm_event(db, alarm_id, "acknowledged", at, by=by)

    def clear_alarm(self, alarm_id: int, at: str) -> None:
        """Record that an alarm's condition has gone; clearing twice keeps the first time."""
        with self._tx(lambda: f"the clearing of alarm {alarm_id}") as db:
            self._require_alarm(db, alarm_id)
            self._clear(db, alarm_id, at)

    def clear_alarms_except(self, active_kinds: Sequence[str], at: str) -> list[int]:
        """Clear every uncleared alarm whose kind is not in `active_kinds` (the controller
        no longer holds it); return their ids."""
        with self._tx(lambda: f"the clearing of alarms gone at {at}") as db:
            rows = db.execute("SELECT id, kind FROM alarms WHERE cleared_at IS NULL").fetchall()
            ids = [int(r[0]) for r in rows if r[1] not in set(active_kinds)]
            for alarm_id in ids:
                self._clear(db, alarm_id, at)
            return ids

    @staticmethod
    def _clear(db: sqlite3.Connection, alarm_id: int, at: str) -> None:
        cur = db.execute(
            "UPDATE alarms SET cleared_at = ? WHERE id = ? AND cleared_at IS NULL",
            (at, alarm_id),
        )
        if cur.rowcount == 1:
            _outbox_alarm_event(db, alarm_id, "cleared", at)

    @staticmethod
    def _require_alarm(db: sqlite3.Connection, alarm_id: int) -> None:
        if db.execute("SELECT 1 FROM alarms WHERE id = ?", (alarm_id,)).fetchone() is None:
            raise LocalError(f"no alarm {alarm_id}")

    _ALARM_COLUMNS = (
        "id, reel_id, kind, message, raised_at, acknowledged_at, acknowledged_by, cleared_at"
    )

    def active_alarms(self) -> list[Alarm]:
        """Alarms not yet both cleared and acknowledged, oldest first."""
        rows = self._query(
            f"SELECT {self._ALARM_COLUMNS} FROM alarms "
            "WHERE cleared_at IS NULL OR acknowledged_at IS NULL ORDER BY id"
        )
        return [Alarm(*r) for r in rows]

    def alarms(self, reel_id: str | None = None) -> list[Alarm]:
        """Every alarm (of one reel when given), oldest first."""
        if reel_id is None:
            rows = self._query(f"SELECT {self._ALARM_COLUMNS} FROM alarms ORDER BY id")
        else:
            rows = self._query(
                f"SELECT {self._ALARM_COLUMNS} FROM alarms WHERE reel_id = ? ORDER BY id",
                (reel_id,),
            )
        return [Alarm(*r) for r in rows]

    # ------------------------------------------------------------------ alarm shelving

    def shelve_alarm(
        self,
        kind: str,
        until_ms: int,
        by: str,
        reason: str,
        at: str,
        *,
        message: str = "",
        raised_ms: int = 0,
    ) -> int:
        """Record a shelf in force for `kind` until `until_ms`; return its id. A shelf of
        the kind still in force is ended first (at `at`, by `by`): one per kind. The
        command that shelved it is in the audit trail (and published from there)."""
        with self._tx(lambda: f"the shelving of alarm {kind} by {by}") as db:
            db.execute(
                "UPDATE alarm_shelves SET ended_at = ?, ended_by = ? "
                "WHERE kind = ? AND ended_at IS NULL",
                (at, by, kind),
            )
            cur = db.execute(
                "INSERT INTO alarm_shelves (kind, message, raised_ms, shelved_at, shelved_by, "
                "reason, until_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kind, message, raised_ms, at, by, reason, until_ms),
            )
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    def unshelve_alarm(self, kind: str, by: str, at: str, *, expired: bool = False) -> bool:
        """End the shelf of `kind` in force (by an operator, or `expired`); False when
        there was none."""
        with self._tx(lambda: f"the unshelving of alarm {kind} by {by}") as db:
            cur = db.execute(
                "UPDATE alarm_shelves SET ended_at = ?, ended_by = ?, expired = ? "
                "WHERE kind = ? AND ended_at IS NULL",
                (at, by, int(expired), kind),
            )
            return cur.rowcount > 0

    _SHELF_COLUMNS = (
        "id, kind, message, raised_ms, shelved_at, shelved_by, reason, until_ms, "
        "ended_at, ended_by, expired"
    )

    def alarm_shelves(self, *, in_force: bool = True) -> list[AlarmShelf]:
        """The shelves in force (every shelf, ended ones too, with in_force=False),
        oldest first. One in force may have expired by the clock: the line ends it."""
        where = " WHERE ended_at IS NULL" if in_force else ""
        rows = self._query(f"SELECT {self._SHELF_COLUMNS} FROM alarm_shelves{where} ORDER BY id")
        return [
            AlarmShelf(
                id=int(r[0]),
                kind=r[1],
                message=r[2],
                raised_ms=int(r[3]),
                shelved_at=r[4],
                shelved_by=r[5],
                reason=r[6],
                until_ms=int(r[7]),
                ended_at=r[8],
                ended_by=r[9],
                expired=bool(r[10]),
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ audit

    def audit(
        self,
        t: str,
        actor: str,
        action: str,
        detail: Mapping[str, Any],
        accepted: bool,
        *,
        reason: str = "",
        reel_id: str | None = None,
    ) -> int:
        """Record an operator action or command, accepted or refused; return its id."""
        with self._tx(lambda: f"audit event {action} by {actor} at {t}") as db:
            cur = db.execute(
                "INSERT INTO events (t, reel_id, actor, action, detail, accepted, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    t,
                    reel_id,
                    actor,
                    action,
                    json.dumps(dict(detail), sort_keys=True),
                    int(accepted),
                    reason,
                ),
            )
            assert cur.lastrowid is not None
            event_id = int(cur.lastrowid)
            _outbox(
                db,
                "audit",
                t,
                {
                    "event_id": event_id,
                    "actor": actor,
                    "action": action,
                    "detail": dict(detail),
                    "accepted": bool(accepted),
                    "reason": reason,
                    "reel_id": reel_id,
                },
            )
            return event_id

    def events(self, reel_id: str | None = None) -> list[AuditEvent]:
        """Audit events (of one reel when given), in the order recorded."""
        cols = "id, t, reel_id, actor, action, detail, accepted, reason"
        if reel_id is None:
            rows = self._query(f"SELECT {cols} FROM events ORDER BY id")
        else:
            rows = self._query(
                f"SELECT {cols} FROM events WHERE reel_id = ? ORDER BY id", (reel_id,)
            )
        return [
            AuditEvent(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), bool(r[6]), r[7])
            for r in rows
        ]

    def command_on_record(self, sender: str, request_id: str) -> AuditEvent | None:
        """The audit record of `sender`'s command with this request id (the last, if a
        client reused one), or None: a request replayed after a restart is answered
        from it, not executed again."""
        if not request_id:
            return None
        cols = "id, t, reel_id, actor, action, detail, accepted, reason"
        rows = self._query(
            f"SELECT {cols} FROM events WHERE actor = ? "
            "AND json_extract(detail, '$.request_id') = ? ORDER BY id DESC LIMIT 1",
            (sender, request_id),
        )
        return next(
            (
                AuditEvent(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), bool(r[6]), r[7])
                for r in rows
            ),
            None,
        )

    # ------------------------------------------------------------------ controller state

    def save_state(self, reel_id: str, key: str, value: Mapping[str, Any]) -> None:
        """Store (replace) a piece of controller state for the reel, e.g. its ledger
        checkpoint. Save it in the same order as the metres it accounts for: after them."""
        with self._tx(lambda: f"the {key} checkpoint of reel {reel_id}") as db:
            if db.execute("SELECT 1 FROM reels WHERE reel_id = ?", (reel_id,)).fetchone() is None:
                raise LocalError(f"no reel {reel_id!r}")
            self._put_state(db, reel_id, key, value)

    @staticmethod
    def _put_state(
        db: sqlite3.Connection, reel_id: str, key: str, value: Mapping[str, Any]
    ) -> None:
        db.execute(
            "INSERT INTO reel_state (reel_id, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (reel_id, key) DO UPDATE SET value = excluded.value",
            (reel_id, key, json.dumps(dict(value), sort_keys=True)),
        )

    def load_state(self, reel_id: str, key: str) -> dict[str, Any] | None:
        """A piece of controller state saved for the reel, or None."""
        rows = self._query(
            "SELECT value FROM reel_state WHERE reel_id = ? AND key = ?", (reel_id, key)
        )
        if not rows:
            return None
        value = json.loads(rows[0][0])
        assert isinstance(value, dict)
        return value

    # ------------------------------------------------------------------ outbox

    def outbox_after(self, seq: int, limit: int = 100) -> list[OutboxRow]:
        """Outbox rows with a sequence number above `seq`, oldest first, at most `limit`."""
        return self.outbox_range(seq + 1, 2**63 - 1, limit)

    def outbox_range(self, from_seq: int, to_seq: int, limit: int | None = None) -> list[OutboxRow]:
        """The outbox rows from_seq..to_seq (inclusive) still held, oldest first, at most
        `limit` (a replay pages through a long range). A seq pruned, or never written, is
        simply absent."""
        rows = self._query(
            "SELECT seq, kind, t, data FROM outbox WHERE seq BETWEEN ? AND ? ORDER BY seq LIMIT ?",
            (from_seq, to_seq, -1 if limit is None else limit),
        )
        return [OutboxRow(int(r[0]), r[1], r[2], json.loads(r[3])) for r in rows]

    def outbox_first_seq(self) -> int:
        """The oldest outbox sequence number still held; the newest + 1 when none is."""
        rows = self._query(
            "SELECT MIN(seq), (SELECT seq FROM sqlite_sequence WHERE name = 'outbox') FROM outbox"
        )
        first, last = rows[0]
        if first is not None:
            return int(first)
        return (int(last) if last is not None else 0) + 1

    def outbox_last_seq(self) -> int:
        """The newest outbox sequence number (0 when none was ever written)."""
        # sqlite_sequence keeps the highest AUTOINCREMENT value even after pruning.
        row = self._query("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
        return int(row[0][0]) if row else 0

    def outbox_cursor(self, consumer: str) -> int:
        """The last sequence number `consumer` has had acknowledged (0: none yet)."""
        rows = self._query("SELECT seq FROM outbox_cursor WHERE consumer = ?", (consumer,))
        return int(rows[0][0]) if rows else 0

    def outbox_backlog(self, consumer: str) -> int:
        """How many outbox rows `consumer` has not had acknowledged yet."""
        rows = self._query(
            "SELECT COUNT(*) FROM outbox WHERE seq > "
            "COALESCE((SELECT seq FROM outbox_cursor WHERE consumer = ?), 0)",
            (consumer,),
        )
        return int(rows[0][0])

    def advance_outbox_cursor(self, consumer: str, seq: int) -> None:
        """Record that `consumer` has had every row up to `seq` acknowledged. A cursor
        never moves back; LocalError for a sequence number never written."""
        if seq < 0:
            raise LocalError(f"outbox cursor {seq} is negative")
        with self._tx(lambda: f"the outbox cursor of {consumer}") as db:
            last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            if seq > (int(last[0]) if last else 0):
                raise LocalError(f"outbox cursor {seq} is past the newest row")
            db.execute(
                "INSERT INTO outbox_cursor (consumer, seq) VALUES (?, ?) "
                "ON CONFLICT (consumer) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                (consumer, seq),
            )

    def outbox_consumers(self) -> dict[str, int]:
        """Every consumer with a cursor, and its cursor."""
        rows = self._query("SELECT consumer, seq FROM outbox_cursor ORDER BY consumer")
        return {str(r[0]): int(r[1]) for r in rows}

    def remove_outbox_cursor(self, consumer: str) -> bool:
        """Forget a consumer (one that is gone for good): pruning no longer waits for it.
        False when it had no cursor."""
        with self._tx(lambda: f"the removal of the outbox cursor of {consumer}") as db:
            cur = db.execute("DELETE FROM outbox_cursor WHERE consumer = ?", (consumer,))
            return cur.rowcount > 0

    def prune_outbox(self, keep: int = OUTBOX_KEEP) -> int:
        """Delete outbox rows every known consumer has passed, but the newest `keep` of
        those; return how many. Without any consumer nothing is deleted."""
        with self._tx(lambda: "the outbox pruning") as db:
            low = db.execute("SELECT MIN(seq) FROM outbox_cursor").fetchone()[0]
            if low is None:
                return 0
            cur = db.execute("DELETE FROM outbox WHERE seq <= ?", (int(low) - keep,))
            return int(cur.rowcount)

    # ------------------------------------------------------------------ retention

    def prune_confirmed(
        self,
        before_iso: str,
        confirmed_seq: int,
        *,
        limit: int | None = None,
        after_end_seq: int = 0,
    ) -> PruneResult:
        """Delete the closed reels every historian has confirmed: whose end record's seq
        is at most `confirmed_seq` and that ended before `before_iso` (ISO 8601 with an
        offset), with their metres, audit events, controller state, and their alarms
        (which must be cleared and acknowledged); return what was deleted.

        Never deleted: an open reel; a reel whose end was not confirmed (or whose end seq
        is not known: closed before schema version 4 with its end record pruned); a reel
        with an alarm not yet cleared and acknowledged, or with a record still in the
        outbox above `confirmed_seq` (an alarm acknowledged, an audit event written
        after its end). Each reel goes in its own transaction (all of it or nothing), so
        the writer waits at most one reel's delete. The reel id stays taken
        (`pruned_reels`).

        At most `limit` reels per call, taken by their end seq above `after_end_seq`: the
        result's `resume_after` is where the next call goes on (None when every reel due
        was looked at), so the caller can stop between calls, and a reel kept is not
        looked at twice.
        """
        before = _aware(before_iso, "before_iso")
        if confirmed_seq < 0:
            raise LocalError(f"confirmed seq {confirmed_seq} is negative")
        rows = self._query(
            "SELECT reel_id, ended_at, end_seq FROM reels WHERE state = 'closed' "
            "AND end_seq > ? AND end_seq <= ? ORDER BY end_seq",
            (after_end_seq, confirmed_seq),
        )
        due: list[tuple[str, int]] = []
        kept: list[tuple[str, str]] = []
        for reel_id, ended_at, end_seq in rows:
            if limit is not None and len(due) == limit:
                # The next call goes on after the last reel looked at.
                return self._prune_reels(due, before_iso, confirmed_seq, kept, due[-1][1])
            try:
                ended = _aware(ended_at, f"ended_at of reel {reel_id}")
            except LocalError as exc:
                kept.append((reel_id, str(exc)))
                continue
            if ended < before:
                due.append((reel_id, int(end_seq)))
        return self._prune_reels(due, before_iso, confirmed_seq, kept, None)

    def _prune_reels(
        self,
        due: Sequence[tuple[str, int]],
        before_iso: str,
        confirmed_seq: int,
        kept: Sequence[tuple[str, str]],
        resume_after: int | None,
    ) -> PruneResult:
        total = PruneResult(kept=tuple(kept))
        for reel_id, _end_seq in due:
            total += self._prune_reel(reel_id, before_iso, confirmed_seq)
        return replace(total, resume_after=resume_after)

    def _prune_reel(self, reel_id: str, before_iso: str, confirmed_seq: int) -> PruneResult:
        with self._tx(lambda: f"the retention of reel {reel_id}") as db:
            row = db.execute(
                "SELECT line_id, started_at, ended_at, end_seq, state FROM reels WHERE reel_id = ?",
                (reel_id,),
            ).fetchone()
            if row is None or row[4] != "closed" or row[3] is None or row[3] > confirmed_seq:
                return PruneResult()  # gone (another connection pruned it) or not due
            unconfirmed = db.execute(
                "SELECT MIN(seq) FROM outbox WHERE seq > ? AND kind IN ('alarm', 'audit') "
                "AND json_extract(data, '$.reel_id') = ?",
                (confirmed_seq, reel_id),
            ).fetchone()[0]
            if unconfirmed is not None:
                why = f"its record seq {unconfirmed} is not confirmed yet"
                return PruneResult(kept=((reel_id, why),))
            active = db.execute(
                "SELECT MIN(id) FROM alarms WHERE reel_id = ? "
                "AND (cleared_at IS NULL OR acknowledged_at IS NULL)",
                (reel_id,),
            ).fetchone()[0]
            if active is not None:
                why = f"its alarm {active} is not cleared and acknowledged yet"
                return PruneResult(kept=((reel_id, why),))
            counts = [
                db.execute(f"DELETE FROM {table} WHERE reel_id = ?", (reel_id,)).rowcount
                for table in ("metres", "events", "alarms", "reel_state")
            ]
            db.execute(
                "INSERT INTO pruned_reels (reel_id, line_id, started_at, ended_at, end_seq, "
                "metres, pruned_before) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (reel_id, row[0], row[1], row[2], row[3], counts[0], before_iso),
            )
            db.execute("DELETE FROM reels WHERE reel_id = ?", (reel_id,))
            metres, events, alarms, reel_states = counts
            return PruneResult((reel_id,), metres, events, alarms, reel_states)

    def pruned_reels(self) -> list[tuple[str, str, int]]:
        """(reel id, ended_at, metres) of every reel retention deleted, oldest end first."""
        rows = self._query(
            "SELECT reel_id, ended_at, metres FROM pruned_reels ORDER BY end_seq, reel_id"
        )
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]


def _outbox(db: sqlite3.Connection, kind: str, t: str, data: Mapping[str, Any]) -> int:
    """Queue a record for publishing, inside the caller's transaction; return its seq."""
    cur = db.execute(
        "INSERT INTO outbox (kind, t, data) VALUES (?, ?, ?)",
        (kind, t, json.dumps(_json_safe(dict(data)), sort_keys=True, allow_nan=False)),
    )
    assert cur.lastrowid is not None
    return int(cur.lastrowid)


def _aware(text: str, what: str) -> datetime:
    """An ISO 8601 time with an offset; LocalError naming `what` otherwise."""
    try:
        t = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise LocalError(f"{what} {text!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise LocalError(f"{what} {text!r} has no UTC offset")
    return t


def _reel_id_taken(db: sqlite3.Connection, reel_id: str) -> bool:
    """Whether the reel id was ever recorded: stored, or deleted by retention."""
    row = db.execute(
        "SELECT EXISTS (SELECT 1 FROM reels WHERE reel_id = ?) "
        "OR EXISTS (SELECT 1 FROM pruned_reels WHERE reel_id = ?)",
        (reel_id, reel_id),
    ).fetchone()
    return bool(row[0])


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: an unknown number is published as null, so that a
    record is never lost (rolled back) for a value it cannot encode."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _outbox_alarm_event(
    db: sqlite3.Connection, alarm_id: int, event: str, at: str, *, by: str | None = None
) -> None:
    kind, message, reel_id = db.execute(
        "SELECT kind, message, reel_id FROM alarms WHERE id = ?", (alarm_id,)
    ).fetchone()
    data: dict[str, Any] = {
        "event": event,
        "alarm_id": alarm_id,
        "kind": kind,
        "message": message,
        "reel_id": reel_id,
    }
    if by is not None:
        data["by"] = by
    _outbox(db, "alarm", at, data)


def _metre_json(rec: MetreRecord) -> dict[str, Any]:
    return {
        "index": rec.index,
        "dose_kgy": _finite(rec.dose_kgy),
        "min_dose_kgy": _finite(rec.min_dose_kgy),
        "max_dose_kgy": _finite(rec.max_dose_kgy),
        "verdict": rec.verdict.value,
        "causes": list(rec.causes),
    }


def _missing_ranges(first: int, last: int, stored: set[int]) -> list[tuple[int, int]]:
    """Contiguous runs of first..last (inclusive) not in `stored`."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    for i in range(first, last + 2):
        missing = i <= last and i not in stored
        if missing and start is None:
            start = i
        elif not missing and start is not None:
            out.append((start, i - 1))
            start = None
    return out


def _reel_summary(db: sqlite3.Connection, reel_id: str) -> dict[str, Any]:
    """The end-of-reel summary published with the reel's end: counts by verdict, the
    out-of-spec ranges with their causes, dose statistics."""
    rows = db.execute(
        "SELECT idx, dose_kgy, verdict, causes FROM metres WHERE reel_id = ? ORDER BY idx",
        (reel_id,),
    ).fetchall()
    info = db.execute(
        "SELECT started_at, ended_at, planned_length_m FROM reels WHERE reel_id = ?", (reel_id,)
    ).fetchone()
    by_verdict = {v.value: 0 for v in Verdict}
    out_of_spec: list[dict[str, Any]] = []
    doses = [float(r[1]) for r in rows if r[1] is not None]
    for idx, _dose, verdict, causes in rows:
        by_verdict[verdict] = by_verdict.get(verdict, 0) + 1
        if verdict == Verdict.IN_SPEC.value:
            continue
        last = out_of_spec[-1] if out_of_spec else None
        if (
            last is not None
            and last["last_index"] == idx - 1
            and last["verdict"] == verdict
            and last["causes"] == _causes_tuple(causes)
        ):
            last["last_index"] = idx
        else:
            out_of_spec.append(
                {
                    "first_index": idx,
                    "last_index": idx,
                    "verdict": verdict,
                    "causes": _causes_tuple(causes),
                }
            )
    for r in out_of_spec:
        r["causes"] = list(r["causes"])
    return {
        "metres": len(rows),
        "by_verdict": by_verdict,
        "out_of_spec": out_of_spec,
        "dose_min_kgy": min(doses) if doses else None,
        "dose_max_kgy": max(doses) if doses else None,
        "dose_mean_kgy": sum(doses) / len(doses) if doses else None,
        "started_at": info[0],
        "ended_at": info[1],
        "planned_length_m": info[2],
    }


def _metres_what(
    reel_id: str, records: Sequence[MetreRecord], state: Mapping[str, Any] | None
) -> str:
    parts = []
    if records:
        parts.append(f"metres {_ranges_text(sorted(r.index for r in records))} of reel {reel_id}")
    if state:
        parts.append(f"the {', '.join(state)} checkpoint of reel {reel_id}")
    return " and ".join(parts)


def _ranges_text(indices: Sequence[int]) -> str:
    """'3-5, 9' for [3, 4, 5, 9] (sorted input)."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)
