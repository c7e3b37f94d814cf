"""The plant historian's database: schema migrations and ingest (PostgreSQL, psycopg 3).

Schema: numbered SQL files in linectl/historian/migrations/ (`NNNN_name.sql`), applied in
order by `migrate`, linectl's own small runner: one transaction per migration, recorded
in `historian_migrations` with the file's sha256; a session advisory lock so that two
historians starting at once never migrate together; a database whose schema is newer
than this code (or whose applied migration differs from the file) is refused with
MigrationError. A runner of our own instead of Alembic or yoyo: the schema is plain SQL
the plant's DBA can read, there is no ORM to keep in step, and the runner is a page.

Ingest: `HistorianDB.apply(batch)` takes outbox records of any number of lines and
stores each once, in ONE transaction:

- the raw record, in `records`, keyed (line, store, seq). A key already held with the
  same content is a duplicate and changes nothing; with other content it is a conflict:
  the first stored is kept, the other content goes to `incidents` (and the result's
  `conflicts` / `seq_conflicts`);
- what it says, in `reels`, `metres` (partitioned by month), `alarms`, `events` and the
  per-reel `reel_tallies`, by natural key (line, reel, metre index; line, store, alarm or
  event id). A natural key already held with the same content changes nothing; with other
  content it is a conflict, kept as first stored (as the line's own store does), and the
  record's `problem` says so;
- a record that cannot be applied (a missing key, a wrong type, an unknown kind) is
  MALFORMED: it is kept raw in `records` with its problem, written to `incidents`, and the
  rest of the batch is stored. Its seq counts as stored, so the historian does not ask the
  line for it again and again; the raw record is there to apply by hand once understood.
  Only a record whose key itself is unusable (line, store or seq) or whose data is not
  JSON refuses the whole batch (RecordInError, nothing written): that is the caller's bug.

Records arrive in any order (a replay after an outage brings metres before their reel's
start), so there are no foreign keys, and rows may exist half-filled: a reel whose end
came before its start, an alarm acknowledged before its raise. Readers skip those rows
until the missing record is here.

Month partitions of `metres`: a reel's metres live in the partition of its start month
(`reel_tallies.reel_month`), so the report reads one partition. Metres whose reel start
has not arrived yet go to the month of the first of them the historian saw (the record's
time `t`: the best guess, and right for any reel that did not start in the previous
month); when the start arrives they are moved to the start month in the same transaction.
So at every commit all of one reel's metres are in the one partition reel_tallies names.
Partitions are created on demand (CREATE TABLE IF NOT EXISTS ... PARTITION OF).

Concurrency: apply() takes a transaction-level advisory lock per line, so two historians
writing the same line (a mistake, or a hand-off) serialise instead of racing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import struct
from _json import encode_basestring_ascii, make_encoder
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import chain, groupby
from operator import itemgetter, lt
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from linectl.core.ledger import Verdict
from linectl.errors import LocalError
from linectl.store import _causes_text, _json_safe, _ranges_text

log = logging.getLogger("linectl.historian.pg")

MIGRATIONS_DIR: Final = Path(__file__).with_name("migrations")
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

MIGRATION_LOCK_KEY: Final = 0x6C6E_6374_6C48_0001
"""pg_advisory_lock key the migration runner holds (bigint: "lnctlH" and 1)."""
LINE_LOCK_CLASS: Final = 0x6C48
"""First key of the (int, int) transaction advisory lock apply() takes per line; the
second is hashtext(line_id)."""

RECORD_KINDS: Final = ("metres", "reel", "alarm", "audit")
MAX_UNPROVEN_RANGE_M: Final = 1_000_000
"""The longest unproven range one record may mark (1,000 km, a hundred reels): a record
asking for more is malformed (a corrupt range, not a reason to write billions of rows)."""
_EXAMPLES_KEPT = 5
"""Conflicting metres quoted in full per record in an incident (all are counted)."""

_VERDICTS: Final = frozenset(v.value for v in Verdict)
_IN_SPEC: Final = Verdict.IN_SPEC.value
_UNPROVEN: Final = Verdict.UNPROVEN.value
_NUMBER = (int, float)


def _json_encoder() -> Callable[[Any], str]:
    """A function giving a value as compact JSON text, the text of json.dumps(value,
    separators=(",", ":"), allow_nan=False): ValueError for NaN or infinity, TypeError
    for a value JSON has no type for, RecursionError for a cycle.

    It is CPython's C encoder (the one json.dumps uses), made once and called directly:
    JSONEncoder.encode makes a new one on every call, which cost 1.1 of the 3.9 us the
    encoding of a one-metre record took. Without circular-reference markers: a cycle
    (never in data decoded from a message) ends in RecursionError, not ValueError."""

    def default(value: Any) -> Any:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    encode = make_encoder(
        None,  # markers: no cycle check
        default,
        encode_basestring_ascii,
        None,  # indent
        ":",  # key separator
        ",",  # item separator
        False,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )
    join = "".join
    return lambda value: join(encode(value, 0))


_ENCODE: Final = _json_encoder()
"""A record's data as compact JSON text; ValueError for NaN or infinity."""


class MigrationError(LocalError):
    """The database's historian schema cannot be used by this code: newer than it knows,
    an applied migration that differs from its file, or (for readers) not migrated."""


class RecordInError(LocalError, ValueError):
    """A record the batch cannot hold at all (its line, store or seq is unusable, or its
    data is not JSON): the whole apply() is refused and nothing is written. The message
    names the line, store and seq."""


# --------------------------------------------------------------------------- migrations


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file of migrations/."""

    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> tuple[Migration, ...]:
    """The migrations in `directory`, by version; MigrationError unless they are
    numbered 1, 2, 3 ... without a gap."""
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        m = _MIGRATION_FILE.match(path.name)
        if m is None:
            raise MigrationError(f"{path}: a migration is named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text(encoding="utf-8")))
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise MigrationError(
                f"{directory}: migration {mig.version:04d}_{mig.name} where "
                f"{expected:04d} was expected: migrations are numbered without gaps"
            )
    return tuple(found)


_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS historian_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    sha256     text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The newest migration applied to the connected database (0: none, or no table)."""
    row = conn.execute("SELECT to_regclass('historian_migrations')").fetchone()
    if row is None or row[0] is None:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM historian_migrations").fetchone()
    return int(row[0]) if row is not None else 0


def check_schema(
    conn: psycopg.Connection[Any], migrations: Sequence[Migration] | None = None
) -> int:
    """The connected database's schema version, for a reader: MigrationError when it is
    not this code's (newer, or not migrated yet: the historian migrates it at start, or
    `linectl historian migrate`)."""
    known = len(load_migrations() if migrations is None else migrations)
    version = current_version(conn)
    db = conn.info.dbname
    if version > known:
        raise MigrationError(
            f"database {db}: historian schema version {version} is newer than this linectl "
            f"knows ({known}): upgrade linectl"
        )
    if version < known:
        raise MigrationError(
            f"database {db}: historian schema version {version}, this linectl needs "
            f"{known}: start the historian (it migrates) or run `linectl historian migrate`"
        )
    return version


def connect_or_say(dsn: str) -> psycopg.Connection[Any]:
    """A connection to the historian database; LocalError saying which database could
    not be reached and why (the server's own words), instead of a driver traceback."""
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        raise LocalError(f"historian database {dsn_text(dsn)}: cannot connect: {reason}") from None


def dsn_text(dsn: str) -> str:
    """The DSN for a message, its password hidden (a log must never hold it)."""
    if not dsn:
        return "(libpq's environment: PGHOST, PGDATABASE, ...)"
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(a connection string libpq cannot parse)"
    if "password" in params:
        params["password"] = "***"
    return repr(" ".join(f"{k}={v}" for k, v in params.items()))


def migrate(dsn: str, migrations: Sequence[Migration] | None = None) -> int:
    """Bring the database at `dsn` to the newest schema; return its version. Each
    migration runs in its own transaction under a session advisory lock (a second
    historian waits, then finds nothing to do). MigrationError, changing nothing, when the
    database is newer than this code or an applied migration's file has changed."""
    migs = tuple(load_migrations() if migrations is None else migrations)
    with connect_or_say(dsn) as conn:
        db = conn.info.dbname
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(_BOOKKEEPING)
            applied = {
                int(r[0]): (str(r[1]), str(r[2]))
                for r in conn.execute("SELECT version, name, sha256 FROM historian_migrations")
            }
            newest = max(applied, default=0)
            if newest > len(migs):
                raise MigrationError(
                    f"database {db}: historian schema version {newest} is newer than this "
                    f"linectl knows ({len(migs)}): upgrade linectl; nothing was changed"
                )
            for mig in migs:
                held = applied.get(mig.version)
                if held is not None:
                    if held[1] != mig.sha256:
                        raise MigrationError(
                            f"database {db}: migration {mig.version:04d}_{held[0]} was applied "
                            f"from another text than {mig.version:04d}_{mig.name}.sql has now "
                            "(a migration is never edited once released: add a new one)"
                        )
                    continue
                with conn.transaction():
                    conn.execute(mig.sql.encode())
                    conn.execute(
                        "INSERT INTO historian_migrations (version, name, sha256) "
                        "VALUES (%s, %s, %s)",
                        (mig.version, mig.name, mig.sha256),
                    )
                log.info(
                    "historian database %s: migration %04d_%s applied", db, mig.version, mig.name
                )
            return len(migs)
        finally:
            if not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


# --------------------------------------------------------------------------- the API


@dataclass(frozen=True, slots=True)
class RecordIn:
    """One outbox record of a line, as the historian received it."""

    line_id: str
    store_id: str
    """The store's key: its store_id (or the service's key of one epoch of it)."""
    seq: int
    kind: str
    """metres, reel, alarm or audit."""
    t: str
    """The line's ISO text of the record's time, stored verbatim."""
    data: dict[str, Any]
    """The outbox data (the payload without its envelope: schema, seq, historical,
    quality, t_ms, store_id, t, replay)."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one apply() did."""

    stored: dict[tuple[str, str], list[int]]
    """(line_id, store_id) -> the seqs newly stored by this call, ascending (malformed
    records included: they are held, raw)."""
    duplicates: int
    """Records (line, store, seq) already held with the same content (or twice in the
    batch)."""
    conflicts: list[str]
    """Human-readable: a seq, or a natural key, held with other content (each also an
    incident)."""
    seq_conflicts: frozenset[tuple[str, str, int]] = frozenset()
    """(line_id, store_id, seq) of the records whose seq was held with other content."""
    malformed: list[str] = field(default_factory=list)
    """Human-readable: records kept raw but not applied (each also an incident)."""


@dataclass(frozen=True, slots=True)
class LineStore:
    """One line store as the historian knows it."""

    line_id: str
    store_id: str
    confirmed_seq: int
    """Every record 1..confirmed_seq is held (set by the service, never moves back)."""
    max_seq: int
    """The highest seq held."""
    head_seq: int | None
    """The line's newest seq as it last announced it (None: not yet)."""
    first_seen: str
    """When the historian first stored a record of it (ISO 8601, UTC)."""


class HistorianDB:
    """The ingest side: one connection, one apply() at a time."""

    def __init__(self, dsn: str, conn: psycopg.AsyncConnection[Any], version: int) -> None:
        self.dsn = dsn
        self._conn = conn
        self._version = version
        self._lock = asyncio.Lock()
        self._partitions: set[date] = set()
        """Months whose metres partition is known to exist."""

    @classmethod
    async def open(cls, dsn: str) -> HistorianDB:
        """Connect to the database at `dsn` and migrate it (MigrationError when it is
        newer than this code)."""
        version = await asyncio.to_thread(migrate, dsn)
        db = cls(dsn, await cls._connect(dsn), version)
        await db._load_partitions()
        return db

    @staticmethod
    async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
        # UTF-8 whatever the database's encoding: apply() encodes the text of its COPY
        # rows itself (see "COPY rows" below), in the encoding the server expects.
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True, client_encoding="UTF8")

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        """The connection, opened again after PostgreSQL dropped it (a restart, a
        fail-over): the call that saw the loss failed; the next one works."""
        if self._conn.closed or self._conn.broken:
            log.warning("historian database: connection lost; connecting again")
            self._conn = await self._connect(self.dsn)
            await self._load_partitions()
        return self._conn

    async def _load_partitions(self) -> None:
        cur = await self._conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'metres'::regclass"
        )
        self._partitions = {
            m for (name,) in await cur.fetchall() if (m := _partition_month(name)) is not None
        }

    async def schema_version(self) -> int:
        """The schema version the database was migrated to at open()."""
        return self._version

    async def close(self) -> None:
        await self._conn.close()

    async def __aenter__(self) -> HistorianDB:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ ingest

    async def apply(self, batch: Sequence[RecordIn]) -> ApplyResult:
        """Store the batch in one transaction, idempotently (module docstring): a
        record seen before changes nothing; a conflict keeps the first stored; a
        malformed record is kept raw and written to incidents. RecordInError (nothing
        written) for a record whose line, store or seq is unusable or whose data is not
        JSON; a database error rolls the whole batch back and is raised."""
        for r in batch:
            _check_key(r)
        if not batch:
            return ApplyResult({}, 0, [])
        async with self._lock:
            conn = await self._connection()
            work = _Apply(conn, self._partitions)
            async with conn.transaction():
                await work.run(batch)
            self._partitions |= work.new_partitions
        return work.result()

    # ------------------------------------------------------------------ line stores

    async def line_stores(self) -> list[LineStore]:
        """Every line store the historian holds records of (or was told about), by line
        and epoch."""
        async with self._lock:
            conn = await self._connection()
            cur = await conn.execute(
                "SELECT line_id, store_id, confirmed_seq, max_seq, head_seq, first_seen "
                "FROM line_stores ORDER BY line_id, epoch"
            )
            rows = await cur.fetchall()
        return [
            LineStore(r[0], r[1], int(r[2]), int(r[3]), _int_or_none(r[4]), iso_utc(r[5]))
            for r in rows
        ]

    async def set_confirmed(self, line_id: str, store_id: str, seq: int) -> None:
        """Record that every record 1..seq of the store is held; never moves back."""
        if seq < 0:
            raise LocalError(f"line {line_id} store {store_id}: confirmed seq {seq} < 0")
        await self._upsert_store(
            line_id, store_id, "confirmed_seq = greatest(line_stores.confirmed_seq, %s)", seq
        )

    async def set_head(self, line_id: str, store_id: str, head_seq: int) -> None:
        """Record the line's newest seq as it announced it (it may go back: a restore)."""
        await self._upsert_store(line_id, store_id, "head_seq = %s, head_at = now()", head_seq)

    async def _upsert_store(self, line_id: str, store_id: str, assign: str, value: int) -> None:
        """Set a line store's column (`assign`: "column = expression of %s"), making the
        store's row first when it is new (the service may hear of a store before any of
        its records)."""
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                await _lock_line(conn, line_id)
                await _insert_store(conn, line_id, store_id)
                await conn.execute(
                    f"UPDATE line_stores SET {assign} WHERE line_id = %s AND store_id = %s",
                    (value, line_id, store_id),
                )

    async def seqs_above(self, line_id: str, store_id: str, seq: int) -> list[int]:
        """The seqs held of the store above `seq`, ascending (to rebuild a gap tracker
        after a restart)."""
        async with self._lock:
            conn = await self._connection()
            cur = await conn.execute(
                "SELECT seq FROM records WHERE line_id = %s AND store_id = %s AND seq > %s "
                "ORDER BY seq",
                (line_id, store_id, seq),
            )
            return [int(r[0]) for r in await cur.fetchall()]

    async def add_incident(
        self, line_id: str, store_id: str | None, kind: str, detail: Mapping[str, Any]
    ) -> None:
        """Write an incident (a gap not recoverable, a store restored, ...)."""
        async with self._lock:
            conn = await self._connection()
            await conn.execute(
                "INSERT INTO incidents (line_id, store_id, kind, detail) VALUES (%s, %s, %s, %s)",
                (line_id, store_id, kind, _jsonb(detail)),
            )


# --------------------------------------------------------------------------- helpers


def partition_name(month: date) -> str:
    """The metres partition of a month: metres_y2024m01."""
    return f"metres_y{month.year:04d}m{month.month:02d}"


def _partition_month(name: str) -> date | None:
    m = re.fullmatch(r"metres_y(\d{4})m(\d{2})", name)
    return date(int(m.group(1)), int(m.group(2)), 1) if m else None


def _next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def parse_iso(text: str) -> datetime:
    """An ISO 8601 time as an aware datetime (one without an offset is UTC, as the
    report takes it); ValueError when it is not one."""
    t = datetime.fromisoformat(text)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def month_of(t: datetime) -> date:
    """The first day of t's month, in UTC."""
    u = t.astimezone(UTC)
    return date(u.year, u.month, 1)


def iso_utc(value: datetime) -> str:
    """A timestamptz read back as ISO 8601 text in UTC (whatever the session's zone)."""
    return value.astimezone(UTC).isoformat()


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


async def _lock_line(conn: psycopg.AsyncConnection[Any], line_id: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LINE_LOCK_CLASS, line_id))


async def _insert_store(conn: psycopg.AsyncConnection[Any], line_id: str, store_id: str) -> None:
    """The row of a line store, made the first time it is seen with the next epoch of its
    line (the caller holds the line's lock); nothing when it exists."""
    await conn.execute(
        "INSERT INTO line_stores (line_id, store_id, epoch) VALUES (%s, %s, "
        "(SELECT coalesce(max(epoch), 0) + 1 FROM line_stores WHERE line_id = %s)) "
        "ON CONFLICT (line_id, store_id) DO NOTHING",
        (line_id, store_id, line_id),
    )


def _check_key(r: RecordIn) -> None:
    """RecordInError unless the record's key (line, store, seq) and data can be held."""
    for name in ("line_id", "store_id"):
        value = getattr(r, name)
        if type(value) is not str or not value or "\x00" in value:
            raise _refused(r, f"{name} must be non-empty text without NUL")
    if type(r.seq) is not int or r.seq < 1:
        raise _refused(r, "seq must be an integer >= 1")
    if r.seq > _MAX_SEQ:
        raise _refused(r, f"seq must be at most {_MAX_SEQ} (a bigint)")
    if type(r.data) is not dict and not isinstance(r.data, Mapping):
        raise _refused(r, f"data must be a JSON object, not {type(r.data).__name__}")


def _refused(r: RecordIn, why: str) -> RecordInError:
    return RecordInError(f"line {r.line_id!r} store {r.store_id!r} seq {r.seq!r}: {why}")


class _Malformed(Exception):  # noqa: N818 (a control-flow signal, never raised out of here)
    """A record that cannot be applied; the message says what is wrong."""


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def _text(d: Mapping[str, Any], key: str, *, empty: bool = False) -> str:
    if key not in d:
        raise _Malformed(f"no {key!r}")
    value = d[key]
    if not isinstance(value, str):
        raise _Malformed(f"{key!r} is {value!r}, not text")
    if not value and not empty:
        raise _Malformed(f"{key!r} is empty")
    return value


def _text_or_none(d: Mapping[str, Any], key: str) -> str | None:
    if key not in d:
        raise _Malformed(f"no {key!r}")
    value = d[key]
    if value is not None and not isinstance(value, str):
        raise _Malformed(f"{key!r} is {value!r}, not text or null")
    return value


def _int(d: Mapping[str, Any], key: str, low: int = 0) -> int:
    if key not in d:
        raise _Malformed(f"no {key!r}")
    value = d[key]
    if type(value) is not int or value < low:
        raise _Malformed(f"{key!r} is {value!r}, not an integer >= {low}")
    return value


def _number_or_none(d: Mapping[str, Any], key: str) -> float | None:
    if key not in d:
        raise _Malformed(f"no {key!r}")
    value = d[key]
    if value is None:
        return None
    if type(value) not in _NUMBER:
        raise _Malformed(f"{key!r} is {value!r}, not a number or null")
    return float(value)


def _mapping(d: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    if key not in d:
        raise _Malformed(f"no {key!r}")
    value = d[key]
    if not isinstance(value, Mapping):
        raise _Malformed(f"{key!r} is {value!r}, not an object")
    return value


def _time(d: Mapping[str, Any], key: str) -> tuple[str, datetime]:
    text = _text(d, key)
    try:
        return text, parse_iso(text)
    except ValueError:
        raise _Malformed(f"{key!r} is {text!r}, not an ISO 8601 time") from None


def _jsonb(value: Mapping[str, Any]) -> Jsonb:
    """An incident's detail for a jsonb column: JSON has no NaN (null instead), and a
    value JSON has no type for (a date) is written as its text."""
    return Jsonb(_json_safe(dict(value)), dumps=_dumps_lenient)


def _dumps_lenient(value: Any) -> str:
    return json.dumps(value, default=str)


# --------------------------------------------------------------------------- one apply()


@dataclass(slots=True)
class _Rec:
    """One record of a batch, checked; its raw form for `records`."""

    line_id: str
    store_id: str
    seq: int
    kind: str
    t: str
    data: dict[str, Any]
    """The data as stored: non-finite numbers as null, as the line publishes them."""
    text: str
    """`data` as JSON text."""
    problems: tuple[str, ...] = ()
    """Why it is not applied (or not wholly): a tuple, no list made for each record."""

    @property
    def where(self) -> str:
        return f"line {self.line_id} store {self.store_id} seq {self.seq}"

    @classmethod
    def check(cls, r: RecordIn) -> _Rec:
        """The record made storable raw (its key checked by _check_key before);
        RecordInError when its data is not JSON."""
        problems: tuple[str, ...] = ()
        kind, t = r.kind, r.t
        if not isinstance(kind, str) or kind not in RECORD_KINDS:
            problems += (f"kind {kind!r} is none of {', '.join(RECORD_KINDS)}",)
            kind = str(kind).replace("\x00", "\\x00")
        if not isinstance(t, str) or "\x00" in t:
            problems += (f"t {t!r} is not text without NUL",)
            t = str(t).replace("\x00", "\\x00")
        data = r.data if type(r.data) is dict else dict(r.data)
        try:
            text = _ENCODE(data)
        except ValueError:
            # NaN or infinity (JSON has neither; the line publishes them as null).
            data = _json_safe(data)
            text = _ENCODE(data)
        except (TypeError, RecursionError) as exc:
            raise _refused(r, f"data is not JSON ({exc})") from None
        # PostgreSQL text and jsonb cannot hold NUL: keep such a record as JSON text in a
        # wrapper object, so that it is still held exactly, and never applied.
        if "\\u0000" in text and _has_nul(data):
            problems += ("data holds a NUL character (PostgreSQL cannot store it)",)
            data = {"json_text": text}
            text = _ENCODE(data)
        return cls(r.line_id, r.store_id, r.seq, kind, t, data, text, problems)

    def same(self, kind: str, t: str, data: Any) -> bool:
        """Whether (kind, t, data) is this record's content. Compared as JSON values
        (read back from the text), so that a tuple given for a list is the same."""
        return self.kind == kind and self.t == t and json.loads(self.text) == data


_REEL_COLUMNS: Final = (
    "reel_line_id",
    "recipe_product",
    "recipe_version",
    "recipe_hash",
    "recipe_json",
    "operator",
    "planned_length_m",
    "started_at",
    "started_ts",
    "started_month",
    "start_json",
    "state",
    "ended_at",
    "end_reason",
    "store_id",
    "start_seq",
    "end_seq",
)
_START_CONTENT: Final = (
    "reel_line_id",
    "recipe_product",
    "recipe_version",
    "recipe_hash",
    "recipe_json",
    "operator",
    "planned_length_m",
    "started_at",
    "start_json",
)
_ALARM_COLUMNS: Final = (
    "reel_id",
    "kind",
    "message",
    "raised_at",
    "acknowledged_at",
    "acknowledged_by",
    "cleared_at",
)
_EVENT_COLUMNS: Final = ("t", "reel_id", "actor", "action", "detail", "accepted", "reason")
_METRE_CONTENT: Final = (
    "dose_kgy",
    "min_dose_kgy",
    "max_dose_kgy",
    "verdict",
    "causes",
    "recorded_at",
)
_MAX_SEQ: Final = 2**63 - 1
"""The highest seq the bigint column holds."""
_MAX_INDEX: Final = 2**31 - 1
"""The highest metre index the int4 column holds (2,147,483 km)."""

_MetreRow = tuple[int, float | None, float | None, float | None, str, str, str]
"""(idx, dose_kgy, min_dose_kgy, max_dose_kgy, verdict, causes, recorded_at)"""


@dataclass(slots=True)
class _MetresIn:
    """The metres of one record for one reel."""

    rec: _Rec
    reel_id: str
    at: datetime
    """The record's time (its month is the reel's until the reel's start is here)."""
    rows: list[_MetreRow]


@dataclass(slots=True)
class _Tally:
    month: date
    from_start: bool
    last_idx: int
    fresh: bool = False
    """Made in this transaction: the reel has no metres stored yet."""


def _dose(value: Any, n: int, key: str) -> float | None:
    """A dose given as null or an integer (a float is taken as it is)."""
    if value is None:
        return None
    if type(value) is int:
        return float(value)
    raise _Malformed(f"metres[{n}]: {key!r} is {value!r}, not a number or null")


def _metres_rows(rec: _Rec) -> tuple[str, list[_MetreRow]]:
    """(reel id, metre rows) of a metres record: its metres, or an unproven range."""
    d = rec.data
    event = d.get("event")
    if type(event) is not str:
        event = _text(d, "event")
    reel_id = d.get("reel_id")
    if type(reel_id) is not str or not reel_id:
        reel_id = _text(d, "reel_id")
    t = rec.t
    if event == "metres":
        metres = d.get("metres")
        if not isinstance(metres, list):
            raise _Malformed(f"'metres' is {metres!r}, not a list")
        rows: list[_MetreRow] = []
        # Per metre, the common case (float doses, no causes) costs a few checks only:
        # this loop runs 50,000 times a second in a catch-up.
        for n, m in enumerate(metres):
            try:
                idx = m["index"]
                dose, lo, hi = m["dose_kgy"], m["min_dose_kgy"], m["max_dose_kgy"]
                verdict = m["verdict"]
                causes = m.get("causes", ())
            except KeyError as exc:
                raise _Malformed(f"metres[{n}] has no {exc.args[0]!r}") from None
            except (TypeError, AttributeError):
                raise _Malformed(
                    f"metres[{n}] is {m!r}, not a metre object (index, dose_kgy, "
                    "min_dose_kgy, max_dose_kgy, verdict, causes)"
                ) from None
            if type(idx) is not int or not 0 <= idx <= _MAX_INDEX:
                raise _Malformed(f"metres[{n}]: 'index' is {idx!r}, not a metre index")
            if type(dose) is not float:
                dose = _dose(dose, n, "dose_kgy")
            if type(lo) is not float:
                lo = _dose(lo, n, "min_dose_kgy")
            if type(hi) is not float:
                hi = _dose(hi, n, "max_dose_kgy")
            if type(verdict) is not str or verdict not in _VERDICTS:
                raise _Malformed(
                    f"metres[{n}]: 'verdict' is {verdict!r}, none of {sorted(_VERDICTS)}"
                )
            if causes:
                if not isinstance(causes, list) or not all(type(c) is str for c in causes):
                    raise _Malformed(f"metres[{n}]: 'causes' is {causes!r}, not a list of text")
                cause_text = _causes_text(causes)
            else:
                cause_text = ""
            rows.append((idx, dose, lo, hi, verdict, cause_text, t))
        return reel_id, rows
    if event == "unproven":
        first = _int(d, "first_index")
        last = _int(d, "last_index")
        cause = _text(d, "cause", empty=True)
        if last < first or last - first + 1 > MAX_UNPROVEN_RANGE_M or last > _MAX_INDEX:
            raise _Malformed(
                f"unproven range {first}..{last} is not a range of at most "
                f"{MAX_UNPROVEN_RANGE_M} metres"
            )
        # As linectl.store.mark_unproven: no dose, verdict unproven, the cause as causes.
        return reel_id, [(i, None, None, None, _UNPROVEN, cause, t) for i in range(first, last + 1)]
    raise _Malformed(f"'event' is {event!r}, not metres or unproven")


_USUAL_RECORD_KEYS: Final = frozenset(("event", "reel_id", "metres"))
_USUAL_METRE_KEYS: Final = frozenset(
    ("index", "dose_kgy", "min_dose_kgy", "max_dose_kgy", "verdict", "causes")
)
_INF: Final = math.inf


def _usual_metres(r: RecordIn) -> tuple[str, tuple[str, list[_MetreRow]]] | None:
    """A usual metres record checked, encoded and parsed in one pass: its data as JSON
    text, and its (reel id, metre rows); None for any other record.

    Why: a line at speed sends a metres record per metre, and encoding its data
    (_Rec.check, with the C encoder) and then parsing it (_parse) took 4.9 us a record
    of one metre; in one pass 3.6 us, most of them the three doses' repr (as the C
    encoder writes floats).
    Usual: the keys linectl.store writes and nothing else (event, reel_id, metres; for
    each metre index, dose_kgy, min_dose_kgy, max_dose_kgy, verdict, causes), in any
    order; kind metres, t and every text without NUL, finite float doses, an index the
    column holds, a known verdict, causes a list of text. For such a record the general
    path gives the same: a text of the same JSON value (its keys maybe in another order,
    which jsonb does not keep), the same rows, no problem. Any other record (a null or
    integer dose, a key more or less, a malformed metre) gives None and takes the
    general path, which says what is wrong with it."""
    d, t = r.data, r.t
    if (
        r.kind != "metres"
        or type(d) is not dict
        or d.keys() != _USUAL_RECORD_KEYS
        or type(t) is not str
        or "\x00" in t
    ):
        return None
    reel_id, metres = d["reel_id"], d["metres"]
    if (
        d["event"] != "metres"
        or type(reel_id) is not str
        or not reel_id
        or "\x00" in reel_id
        or type(metres) is not list
    ):
        return None
    texts: list[str] = []
    rows: list[_MetreRow] = []
    for m in metres:
        if type(m) is not dict or m.keys() != _USUAL_METRE_KEYS:
            return None
        idx, verdict, causes = m["index"], m["verdict"], m["causes"]
        dose, lo, hi = m["dose_kgy"], m["min_dose_kgy"], m["max_dose_kgy"]
        if not (
            type(idx) is int
            and 0 <= idx <= _MAX_INDEX
            and type(dose) is float
            and -_INF < dose < _INF  # False for NaN too
            and type(lo) is float
            and -_INF < lo < _INF
            and type(hi) is float
            and -_INF < hi < _INF
            and type(verdict) is str
            and verdict in _VERDICTS
            and type(causes) is list
        ):
            return None
        if causes:
            if not all(type(c) is str and "\x00" not in c for c in causes):
                return None
            causes_json = ",".join(map(encode_basestring_ascii, causes))
            causes_text = _causes_text(causes)
        else:
            causes_json = causes_text = ""
        # As the C encoder writes them: an int's and a float's repr, escaped ASCII text
        # (a verdict needs no escaping).
        texts.append(
            f'{{"index":{idx},"dose_kgy":{dose!r},"min_dose_kgy":{lo!r},'
            f'"max_dose_kgy":{hi!r},"verdict":"{verdict}","causes":[{causes_json}]}}'
        )
        rows.append((idx, dose, lo, hi, verdict, causes_text, t))
    reel_json = encode_basestring_ascii(reel_id)
    text = f'{{"event":"metres","reel_id":{reel_json},"metres":[{",".join(texts)}]}}'
    return text, (reel_id, rows)


class _Apply:
    """The work of one apply() call, inside its transaction."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], partitions: set[date]) -> None:
        self.conn = conn
        self.partitions = partitions
        self.new_partitions: set[date] = set()
        self.stored: dict[tuple[str, str], list[int]] = {}
        self.duplicates = 0
        self.conflicts: list[str] = []
        self.seq_conflicts: set[tuple[str, str, int]] = set()
        self.malformed: list[str] = []
        self.incidents: list[tuple[str, str | None, str, dict[str, Any]]] = []
        self.starts: list[tuple[_Rec, dict[str, Any]]] = []
        self.ends: list[tuple[_Rec, str, str]] = []
        self.metres: dict[tuple[str, str], list[_MetresIn]] = {}
        """(line, reel) -> its metres records, in batch order."""
        self.alarm_events: list[tuple[_Rec, str, int, dict[str, Any], str | None]] = []
        self.events: list[tuple[_Rec, int, dict[str, Any]]] = []
        self.tallies: dict[tuple[str, str], _Tally] = {}
        self.started: list[tuple[str, str, date]] = []
        """(line, reel, start month) of the reels whose start this batch stored."""
        self.late: dict[int, _Rec] = {}
        """Records that got a problem after their raw row was written."""
        self.store_rows: dict[tuple[str, str], tuple[int, int]] = {}
        """(line, store) -> (epoch, max_seq) held before this batch."""

    def result(self) -> ApplyResult:
        return ApplyResult(
            {k: sorted(v) for k, v in self.stored.items()},
            self.duplicates,
            self.conflicts,
            frozenset(self.seq_conflicts),
            self.malformed,
        )

    async def run(self, batch: Sequence[RecordIn]) -> None:
        lines = sorted({r.line_id for r in batch})
        for line_id in lines:
            await _lock_line(self.conn, line_id)
        await self._records(await self._new_records(batch, lines))
        await self._reels()
        await self._months()
        await self._metres()
        await self._alarms()
        await self._events()
        await self._line_stores()
        if self.late:
            # Records found in conflict after their raw row was written (rare).
            async with self.conn.cursor() as cur:
                await cur.executemany(
                    "UPDATE records SET problem = %s "
                    "WHERE line_id = %s AND store_id = %s AND seq = %s",
                    [
                        ("; ".join(r.problems), r.line_id, r.store_id, r.seq)
                        for r in self.late.values()
                    ],
                )
        if self.incidents:
            async with self.conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO incidents (line_id, store_id, kind, detail) "
                    "VALUES (%s, %s, %s, %s)",
                    [(ln, st, kind, _jsonb(detail)) for ln, st, kind, detail in self.incidents],
                )

    # ---------------------------------------------------------------- records

    async def _new_records(self, batch: Sequence[RecordIn], lines: list[str]) -> list[RecordIn]:
        """The records not held yet, in (line, store, seq) order; duplicates counted,
        seq conflicts reported. Only records whose seq may be held are checked here (their
        content compared): the others are checked while they stream to the server."""
        cur = await self.conn.execute(
            "SELECT line_id, store_id, epoch, max_seq FROM line_stores WHERE line_id = ANY(%s)",
            (lines,),
        )
        self.store_rows = {(r[0], r[1]): (int(r[2]), int(r[3])) for r in await cur.fetchall()}
        keys = [(r.line_id, r.store_id, r.seq) for r in batch]
        first: dict[tuple[str, str, int], RecordIn]
        if all(map(lt, keys, keys[1:])):
            # The usual batch (a line's records as it sent them): in order, no key twice.
            first = dict(zip(keys, batch, strict=True))
        else:
            first = {}
            for key, r in sorted(zip(keys, batch, strict=True), key=itemgetter(0)):
                had = first.get(key)
                if had is None:
                    first[key] = r
                    continue
                rec, was = _Rec.check(r), _Rec.check(had)
                if rec.same(was.kind, was.t, was.data):
                    self.duplicates += 1
                else:
                    self._seq_conflict(rec, was.kind, was.t, was.data, "earlier in the same batch")
        # Seqs at or below a store's highest held one may be held: look them up.
        max_seq = {store: row[1] for store, row in self.store_rows.items()}
        maybe: dict[tuple[str, str], list[int]] = {}
        for line_id, store_id, seq in [k for k in first if k[2] <= max_seq.get(k[:2], 0)]:
            maybe.setdefault((line_id, store_id), []).append(seq)
        for (line_id, store_id), seqs in maybe.items():
            cur = await self.conn.execute(
                "SELECT seq, kind, t, data FROM records "
                "WHERE line_id = %s AND store_id = %s AND seq = ANY(%s::int8[])",
                (line_id, store_id, "{" + ",".join(map(str, seqs)) + "}"),
            )
            for seq, kind, t, data in await cur.fetchall():
                rec = _Rec.check(first.pop((line_id, store_id, int(seq))))
                if rec.same(kind, t, data):
                    self.duplicates += 1
                else:
                    self._seq_conflict(rec, kind, t, data, "held")
        # `first` is in key order: each store's seqs are one run of it.
        for store, run in groupby(first, key=itemgetter(0, 1)):
            self.stored[store] = [seq for _line, _store, seq in run]
        return list(first.values())

    def _seq_conflict(self, rec: _Rec, kind: str, t: str, data: Any, held: str) -> None:
        self.seq_conflicts.add((rec.line_id, rec.store_id, rec.seq))
        text = (
            f"{rec.where}: {held} with other content; the first stored is kept, this one "
            "is in incidents"
        )
        self.conflicts.append(text)
        log.warning("historian: %s", text)
        self.incidents.append(
            (
                rec.line_id,
                rec.store_id,
                "seq_conflict",
                {
                    "seq": rec.seq,
                    "held": {"kind": kind, "t": t, "data": data},
                    "received": {"kind": rec.kind, "t": rec.t, "data": rec.data},
                },
            )
        )

    def _problem(self, rec: _Rec, problem: str) -> None:
        """A record kept raw but not applied."""
        rec.problems += (problem,)
        text = f"{rec.where} ({rec.kind}): {problem}; kept raw in records, not applied"
        self.malformed.append(text)
        log.error("historian: %s", text)
        self.incidents.append(
            (
                rec.line_id,
                rec.store_id,
                "malformed",
                {"seq": rec.seq, "kind": rec.kind, "t": rec.t, "problem": problem},
            )
        )

    def _key_conflict(self, rec: _Rec, what: str, detail: dict[str, Any]) -> None:
        """A record whose natural key was held with other content (first kept)."""
        rec.problems += (f"conflict: {what} held with other content; the first is kept",)
        self.late[id(rec)] = rec
        text = f"{rec.where}: {what} held with other content; the first stored is kept"
        self.conflicts.append(text)
        log.warning("historian: %s", text)
        self.incidents.append(
            (rec.line_id, rec.store_id, "key_conflict", {"seq": rec.seq, "what": what, **detail})
        )

    # ---------------------------------------------------------------- parsing

    def _parse(self, rec: _Rec, metres: tuple[str, list[_MetreRow]] | None = None) -> None:
        """Note what the record says in the lists the next steps write, or its problem.
        `metres`: the (reel id, rows) of a usual metres record, made by _usual_metres."""
        if rec.problems:
            # Found by _Rec.check (a bad kind or t, a NUL): noted, never applied.
            pending, rec.problems = rec.problems, ()
            for problem in pending:
                self._problem(rec, problem)
            return
        try:
            if rec.kind == "metres":
                reel_id, rows = metres or _metres_rows(rec)
                try:
                    at = parse_iso(rec.t)
                except ValueError:
                    raise _Malformed(f"t {rec.t!r} is not an ISO 8601 time") from None
                if rows:
                    self.metres.setdefault((rec.line_id, reel_id), []).append(
                        _MetresIn(rec, reel_id, at, rows)
                    )
            elif rec.kind == "reel":
                self._parse_reel(rec)
            elif rec.kind == "alarm":
                self._parse_alarm(rec)
            else:
                self._parse_audit(rec)
        except _Malformed as exc:
            self._problem(rec, str(exc))

    def _parse_reel(self, rec: _Rec) -> None:
        d = rec.data
        event = _text(d, "event")
        reel_id = _text(d, "reel_id")
        if event == "start":
            recipe = _mapping(d, "recipe")
            start = _mapping(d, "start")
            started_at, started_ts = _time(d, "started_at")
            row = {
                "reel_id": reel_id,
                "reel_line_id": _text(d, "line_id"),
                "recipe_product": _text(recipe, "product", empty=True),
                "recipe_version": _text(recipe, "version", empty=True),
                "recipe_hash": _text(recipe, "hash", empty=True),
                "recipe_json": _text(d, "recipe_json", empty=True),
                "operator": _text(d, "operator", empty=True),
                "planned_length_m": _number_or_none(d, "planned_length_m"),
                "started_at": started_at,
                "started_ts": started_ts,
                "started_month": month_of(started_ts),
                # As linectl.store.open_reel keeps it (sorted keys): the same text, so the
                # same dict when read back.
                "start_json": json.dumps(dict(start), sort_keys=True),
            }
            self.starts.append((rec, row))
        elif event == "end":
            self.ends.append((rec, reel_id, _text(d, "reason", empty=True)))
        else:
            raise _Malformed(f"'event' is {event!r}, not start or end")

    def _parse_alarm(self, rec: _Rec) -> None:
        d = rec.data
        event = _text(d, "event")
        if event not in ("raised", "acknowledged", "cleared"):
            raise _Malformed(f"'event' is {event!r}, not raised, acknowledged or cleared")
        alarm_id = _int(d, "alarm_id", low=1)
        content = {
            "reel_id": _text_or_none(d, "reel_id"),
            "kind": _text(d, "kind", empty=True),
            "message": _text(d, "message", empty=True),
        }
        by = _text(d, "by", empty=True) if event == "acknowledged" else None
        self.alarm_events.append((rec, event, alarm_id, content, by))

    def _parse_audit(self, rec: _Rec) -> None:
        d = rec.data
        event_id = _int(d, "event_id", low=1)
        if "accepted" not in d:
            raise _Malformed("no 'accepted'")
        accepted = d["accepted"]
        if not isinstance(accepted, bool):
            raise _Malformed(f"'accepted' is {accepted!r}, not true or false")
        row = {
            "t": rec.t,
            "reel_id": _text_or_none(d, "reel_id"),
            "actor": _text(d, "actor", empty=True),
            "action": _text(d, "action", empty=True),
            # As linectl.store.audit keeps it: JSON text with sorted keys.
            "detail": json.dumps(dict(_mapping(d, "detail")), sort_keys=True),
            "accepted": accepted,
            "reason": _text(d, "reason", empty=True),
        }
        self.events.append((rec, event_id, row))

    # ---------------------------------------------------------------- reels

    async def _reels(self) -> None:
        if not self.starts and not self.ends:
            return
        wanted: dict[str, set[str]] = {}
        for rec, row in self.starts:
            wanted.setdefault(rec.line_id, set()).add(row["reel_id"])
        for rec, reel_id, _reason in self.ends:
            wanted.setdefault(rec.line_id, set()).add(reel_id)
        held: dict[tuple[str, str], dict[str, Any]] = {}
        cols = ", ".join(_REEL_COLUMNS)
        for line_id, reel_ids in wanted.items():
            cur = await self.conn.execute(
                f"SELECT reel_id, {cols} FROM reels WHERE line_id = %s AND reel_id = ANY(%s)",
                (line_id, sorted(reel_ids)),
            )
            for r in await cur.fetchall():
                held[(line_id, r[0])] = dict(zip(_REEL_COLUMNS, r[1:], strict=True))
        changed: set[tuple[str, str]] = set()
        for rec, row in self.starts:
            key = (rec.line_id, row["reel_id"])
            reel = held.get(key)
            if reel is None or reel["started_at"] is None:
                reel = reel or dict.fromkeys(_REEL_COLUMNS) | {"state": "open"}
                reel.update({k: v for k, v in row.items() if k != "reel_id"})
                reel["store_id"], reel["start_seq"] = rec.store_id, rec.seq
                held[key] = reel
                changed.add(key)
                self.started.append((rec.line_id, row["reel_id"], row["started_month"]))
            elif any(reel[c] != row[c] for c in _START_CONTENT):
                self._key_conflict(
                    rec,
                    f"the start of reel {row['reel_id']}",
                    {
                        "reel_id": row["reel_id"],
                        "held": {c: reel[c] for c in _START_CONTENT},
                        "received": {c: row[c] for c in _START_CONTENT},
                    },
                )
        for rec, reel_id, reason in self.ends:
            key = (rec.line_id, reel_id)
            reel = held.get(key)
            if reel is None or reel["ended_at"] is None:
                reel = reel or dict.fromkeys(_REEL_COLUMNS)
                reel.update(state="closed", ended_at=rec.t, end_reason=reason, end_seq=rec.seq)
                held[key] = reel
                changed.add(key)
            elif (reel["ended_at"], reel["end_reason"]) != (rec.t, reason):
                self._key_conflict(
                    rec,
                    f"the end of reel {reel_id}",
                    {
                        "reel_id": reel_id,
                        "held": {"ended_at": reel["ended_at"], "end_reason": reel["end_reason"]},
                        "received": {"ended_at": rec.t, "end_reason": reason},
                    },
                )
        if changed:
            await self._upsert(
                "reels",
                ("line_id", "reel_id"),
                _REEL_COLUMNS,
                [(*key, *(held[key][c] for c in _REEL_COLUMNS)) for key in sorted(changed)],
            )

    async def _upsert(
        self, table: str, keys: Sequence[str], columns: Sequence[str], rows: list[tuple[Any, ...]]
    ) -> None:
        """Insert `rows` (the key columns, then `columns`), or update a row that exists."""
        names = ", ".join((*keys, *columns))
        marks = ", ".join(["%s"] * (len(keys) + len(columns)))
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns)
        async with self.conn.cursor() as cur:
            await cur.executemany(
                f"INSERT INTO {table} ({names}) VALUES ({marks}) "
                f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}",
                rows,
            )

    # ---------------------------------------------------------------- months

    async def _months(self) -> None:
        """Every reel of the batch with metres or a new start gets its tallies row and
        its month; metres that came before their reel's start move to its month."""
        started = self.started
        wanted: dict[str, set[str]] = {}
        for line_id, reel_id, _m in started:
            wanted.setdefault(line_id, set()).add(reel_id)
        for line_id, reel_id in self.metres:
            wanted.setdefault(line_id, set()).add(reel_id)
        if not wanted:
            return
        for line_id, reel_ids in wanted.items():
            cur = await self.conn.execute(
                "SELECT reel_id, reel_month, month_from_start, last_idx FROM reel_tallies "
                "WHERE line_id = %s AND reel_id = ANY(%s)",
                (line_id, sorted(reel_ids)),
            )
            for reel_id, month, from_start, last_idx in await cur.fetchall():
                self.tallies[(line_id, reel_id)] = _Tally(month, from_start, int(last_idx))
        inserts: list[tuple[str, str, date, bool]] = []
        for line_id, reel_id, month in started:
            tally = self.tallies.get((line_id, reel_id))
            if tally is None:
                self.tallies[(line_id, reel_id)] = _Tally(month, True, -1, fresh=True)
                inserts.append((line_id, reel_id, month, True))
                continue
            if tally.month != month:
                # Its metres came first and sit in the month of their record time.
                await self._ensure_partition(month)
                cur = await self.conn.execute(
                    "UPDATE metres SET reel_month = %s "
                    "WHERE line_id = %s AND reel_id = %s AND reel_month = %s",
                    (month, line_id, reel_id, tally.month),
                )
                log.info(
                    "historian: line %s reel %s: %d metres received before the reel's start "
                    "moved from %s to its start month %s",
                    line_id,
                    reel_id,
                    cur.rowcount,
                    tally.month,
                    month,
                )
            await self.conn.execute(
                "UPDATE reel_tallies SET reel_month = %s, month_from_start = true "
                "WHERE line_id = %s AND reel_id = %s",
                (month, line_id, reel_id),
            )
            tally.month, tally.from_start = month, True
        for key, items in self.metres.items():
            if key not in self.tallies:
                # Metres before their reel's start: the month of the first of them.
                month = month_of(items[0].at)
                self.tallies[key] = _Tally(month, False, -1, fresh=True)
                inserts.append((*key, month, False))
        if inserts:
            async with self.conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO reel_tallies (line_id, reel_id, reel_month, month_from_start) "
                    "VALUES (%s, %s, %s, %s)",
                    inserts,
                )
        # The month of every reel with metres here, and of every reel started (its metres
        # will follow), has its partition.
        for month in sorted({t.month for t in self.tallies.values()}):
            await self._ensure_partition(month)

    async def _ensure_partition(self, month: date) -> None:
        if month in self.partitions or month in self.new_partitions:
            return
        await self.conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF metres FOR VALUES FROM ({}) TO ({})"
            ).format(
                sql.Identifier(partition_name(month)),
                sql.Literal(month.isoformat()),
                sql.Literal(_next_month(month).isoformat()),
            )
        )
        self.new_partitions.add(month)

    # ---------------------------------------------------------------- metres

    async def _metres(self) -> None:
        to_copy: list[tuple[str, str, date, list[_MetreRow]]] = []
        """(line, reel, month, the reel's metres to store)"""
        tally_updates: list[tuple[int, int, int, str, str]] = []
        for (line_id, reel_id), items in self.metres.items():
            tally = self.tallies[(line_id, reel_id)]
            month = tally.month
            chosen: dict[int, tuple[_Rec, _MetreRow]] = {}
            clashes: dict[int, list[tuple[int, Sequence[Any], _MetreRow]]] = {}
            for mi in items:
                for row in mi.rows:
                    had = chosen.get(row[0])
                    if had is None:
                        chosen[row[0]] = (mi.rec, row)
                    elif had[1][1:] != row[1:]:
                        clashes.setdefault(id(mi.rec), []).append((row[0], had[1], row))
            # Only an index at or below the last one stored can be held already.
            maybe = [i for i in chosen if i <= tally.last_idx] if not tally.fresh else []
            if maybe:
                cur = await self.conn.execute(
                    "SELECT idx, dose_kgy, min_dose_kgy, max_dose_kgy, verdict, causes, "
                    "recorded_at FROM metres WHERE line_id = %s AND reel_id = %s "
                    "AND reel_month = %s AND idx = ANY(%s::int4[])",
                    (line_id, reel_id, month, "{" + ",".join(map(str, maybe)) + "}"),
                )
                for held in await cur.fetchall():
                    rec, row = chosen.pop(int(held[0]))
                    if tuple(held[1:]) != row[1:]:
                        clashes.setdefault(id(rec), []).append((row[0], tuple(held), row))
            if clashes:
                recs = {id(mi.rec): mi.rec for mi in items}
                for rec_id, clash in clashes.items():
                    self._metre_conflict(recs[rec_id], reel_id, clash)
            if not chosen:
                continue
            rows = [row for _rec, row in chosen.values()]
            to_copy.append((line_id, reel_id, month, rows))
            in_spec = sum(row[4] == _IN_SPEC for row in rows)
            tally_updates.append((len(rows), in_spec, max(chosen), line_id, reel_id))
        if to_copy:
            await _copy_binary(
                self.conn,
                _METRE_COPY,
                chain.from_iterable(_metre_copy_rows(*reel) for reel in to_copy),
            )
            async with self.conn.cursor() as cur:
                await cur.executemany(
                    "UPDATE reel_tallies SET stored = stored + %s, in_spec = in_spec + %s, "
                    "last_idx = greatest(last_idx, %s) WHERE line_id = %s AND reel_id = %s",
                    tally_updates,
                )

    def _metre_conflict(
        self, rec: _Rec, reel_id: str, clash: list[tuple[int, Sequence[Any], _MetreRow]]
    ) -> None:
        indices = [c[0] for c in clash]

        def as_dict(row: Sequence[Any]) -> dict[str, Any]:
            return dict(zip(_METRE_CONTENT, row[1:], strict=True))

        self._key_conflict(
            rec,
            f"metre(s) {_ranges_text(sorted(indices))} of reel {reel_id}",
            {
                "reel_id": reel_id,
                "metres": len(indices),
                "indices": _ranges_text(sorted(indices)),
                "examples": [
                    {"index": i, "held": as_dict(held), "received": as_dict(got)}
                    for i, held, got in clash[:_EXAMPLES_KEPT]
                ],
            },
        )

    # ---------------------------------------------------------------- alarms, events

    async def _held_by_id(
        self,
        table: str,
        id_column: str,
        columns: Sequence[str],
        wanted: Mapping[tuple[str, str], set[int]],
    ) -> dict[tuple[str, str, int], dict[str, Any]]:
        """The rows already held of `table` (alarms, events) for the ids each (line,
        store) of the batch names, as column -> value, by (line, store, id)."""
        held: dict[tuple[str, str, int], dict[str, Any]] = {}
        cols = ", ".join(columns)
        for (line_id, store_id), ids in wanted.items():
            cur = await self.conn.execute(
                f"SELECT {id_column}, {cols} FROM {table} "
                f"WHERE line_id = %s AND store_id = %s AND {id_column} = ANY(%s)",
                (line_id, store_id, sorted(ids)),
            )
            for r in await cur.fetchall():
                held[(line_id, store_id, int(r[0]))] = dict(zip(columns, r[1:], strict=True))
        return held

    async def _alarms(self) -> None:
        if not self.alarm_events:
            return
        wanted: dict[tuple[str, str], set[int]] = {}
        for rec, _e, alarm_id, _c, _by in self.alarm_events:
            wanted.setdefault((rec.line_id, rec.store_id), set()).add(alarm_id)
        held = await self._held_by_id("alarms", "alarm_id", _ALARM_COLUMNS, wanted)
        changed: set[tuple[str, str, int]] = set()
        for rec, event, alarm_id, content, by in self.alarm_events:
            key = (rec.line_id, rec.store_id, alarm_id)
            alarm = held.get(key)
            if alarm is None:
                # Any of its events may come first: each carries kind, message and reel.
                alarm = dict.fromkeys(_ALARM_COLUMNS) | content
                held[key] = alarm
            own: dict[str, Any]
            if event == "raised":
                own = {"raised_at": rec.t}
            elif event == "acknowledged":
                own = {"acknowledged_at": rec.t, "acknowledged_by": by}
            else:
                own = {"cleared_at": rec.t}
            before = {c: alarm[c] for c in (*content, *own)}
            conflict = any(alarm[c] != v for c, v in content.items())
            if all(alarm[c] is None for c in own):
                # The first raise, acknowledgement, clearing is kept, as on the line.
                alarm.update(own)
                changed.add(key)
            elif any(alarm[c] != v for c, v in own.items()):
                conflict = True
            if conflict:
                self._key_conflict(
                    rec,
                    f"alarm {alarm_id} ({event})",
                    {"alarm_id": alarm_id, "held": before, "received": {**content, **own}},
                )
        if changed:
            await self._upsert(
                "alarms",
                ("line_id", "store_id", "alarm_id"),
                _ALARM_COLUMNS,
                [(*k, *(held[k][c] for c in _ALARM_COLUMNS)) for k in sorted(changed)],
            )

    async def _events(self) -> None:
        if not self.events:
            return
        wanted: dict[tuple[str, str], set[int]] = {}
        for rec, event_id, _row in self.events:
            wanted.setdefault((rec.line_id, rec.store_id), set()).add(event_id)
        held = await self._held_by_id("events", "event_id", _EVENT_COLUMNS, wanted)
        new: list[tuple[Any, ...]] = []
        for rec, event_id, row in self.events:
            key = (rec.line_id, rec.store_id, event_id)
            had = held.get(key)
            if had is None:
                held[key] = row
                new.append((*key, *(row[c] for c in _EVENT_COLUMNS)))
            elif had != row:
                self._key_conflict(rec, f"audit event {event_id}", {"held": had, "received": row})
        if new:
            cols = ", ".join(_EVENT_COLUMNS)
            marks = ", ".join(["%s"] * (len(_EVENT_COLUMNS) + 3))
            async with self.conn.cursor() as cur:
                await cur.executemany(
                    f"INSERT INTO events (line_id, store_id, event_id, {cols}) VALUES ({marks})",
                    new,
                )

    # ---------------------------------------------------------------- bookkeeping

    async def _line_stores(self) -> None:
        for (line_id, store_id), seqs in self.stored.items():
            max_seq = seqs[-1]  # ascending
            if (line_id, store_id) not in self.store_rows:
                await _insert_store(self.conn, line_id, store_id)
            if max_seq > self.store_rows.get((line_id, store_id), (0, 0))[1]:
                await self.conn.execute(
                    "UPDATE line_stores SET max_seq = greatest(max_seq, %s) "
                    "WHERE line_id = %s AND store_id = %s",
                    (max_seq, line_id, store_id),
                )

    async def _records(self, new: list[RecordIn]) -> None:
        """Check and parse each new record (into the lists the next steps write) while
        its raw row streams to the server: PostgreSQL stores the raw stream on one core
        while this process parses on the other."""
        if new:
            await _copy_binary(self.conn, _RECORD_COPY, self._record_rows(new))

    def _record_rows(self, new: list[RecordIn]) -> Iterator[bytes]:
        """The COPY rows (_RECORD_COPY's columns) of the new records, each checked and
        parsed as its row is made."""
        starts: dict[tuple[str, str], bytes] = {}
        """(line, store) -> a row's start: its number of fields, the line and the store."""
        for raw in new:
            # Most records are the usual metres record: checked and parsed in one pass.
            usual = _usual_metres(raw)
            if usual is None:
                r = _Rec.check(raw)
                self._parse(r)
            else:
                text, metres = usual
                r = _Rec(raw.line_id, raw.store_id, raw.seq, raw.kind, raw.t, raw.data, text)
                self._parse(r, metres)
            start = starts.get((r.line_id, r.store_id))
            if start is None:
                start = _RECORD_FIELDS + _text_field(r.line_id) + _text_field(r.store_id)
                starts[(r.line_id, r.store_id)] = start
            data = r.text.encode()
            yield b"".join(
                (
                    start,
                    _INT8_FIELD(8, r.seq),
                    _KIND_FIELDS.get(r.kind) or _text_field(r.kind),
                    _text_field(r.t),
                    _I32(len(data) + 1),
                    _JSONB_VERSION,
                    data,
                    _text_field("; ".join(r.problems)) if r.problems else _NULL,
                )
            )


# --------------------------------------------------------------------------- COPY rows
#
# apply() writes its two COPY streams (records, metres) in PostgreSQL's binary COPY
# format itself instead of with psycopg's write_row, which calls a dumper per field:
# that was about 2 us of this process's CPU a metre (its record's row and its own), and
# this process is the ingest's bottleneck (bench/historian_pg.py). Here a row is a few
# byte strings joined, the constant ones (a line's, a store's, a reel's) made once.
# The format (PostgreSQL's documentation of COPY, "Binary Format"): a header; per row
# the number of fields (int16), then each field as its length (int32; -1: NULL) and
# its bytes in the type's binary form: int4, int8 and float8 big-endian; date as days
# since 2000-01-01; text in the client encoding (UTF-8: _connect sets it); jsonb as a
# version byte 1 and the JSON text. Then a trailer: -1 (int16).

_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
"""The signature, then the flags and the header extension's length (both 0)."""
_COPY_TRAILER: Final = b"\xff\xff"
_COPY_CHUNK: Final = 32 * 1024
"""Bytes sent to the server at a time: it stores them while this process makes the
next chunk (two cores at work, not one after the other)."""
_NULL: Final = b"\xff\xff\xff\xff"
_I32: Final = struct.Struct(">i").pack
_INT4_FIELD: Final = struct.Struct(">ii").pack
"""(4, value): an int4 or date field."""
_INT8_FIELD: Final = struct.Struct(">iq").pack
"""(8, value): an int8 field."""
_FLOAT8_FIELD: Final = struct.Struct(">id").pack
"""(8, value): a float8 field."""
_METRE_NUMBERS: Final = struct.Struct(">iiididid").pack
"""(4, idx, 8, dose, 8, min, 8, max): a metre's index and its three doses."""
_JSONB_VERSION: Final = b"\x01"
_PG_EPOCH: Final = date(2000, 1, 1).toordinal()
_RECORD_FIELDS: Final = struct.pack(">h", 7)
"""A records row's start: its number of fields."""
_METRE_FIELDS: Final = struct.pack(">h", 10)
"""A metres row's start: its number of fields."""


def _text_field(value: str) -> bytes:
    data = value.encode()
    return _I32(len(data)) + data


def _float8_field(value: float | None) -> bytes:
    return _NULL if value is None else _FLOAT8_FIELD(8, value)


_KIND_FIELDS: Final = {kind: _text_field(kind) for kind in RECORD_KINDS}
_VERDICT_FIELDS: Final = {verdict: _text_field(verdict) for verdict in _VERDICTS}


async def _copy_binary(
    conn: psycopg.AsyncConnection[Any], statement: str, rows: Iterable[bytes]
) -> None:
    """COPY ... FROM STDIN (FORMAT BINARY) of `rows`, each the bytes of one row. They
    are made as the stream goes (`rows` is a generator doing each row's work), while the
    server stores the chunks already sent."""
    async with conn.cursor() as cur, cur.copy(statement) as copy:
        chunk = bytearray(_COPY_HEADER)
        for row in rows:
            chunk += row
            if len(chunk) >= _COPY_CHUNK:
                await copy.write(chunk)
                chunk = bytearray()
        chunk += _COPY_TRAILER
        await copy.write(chunk)


def _metre_copy_rows(
    line_id: str, reel_id: str, month: date, rows: Iterable[_MetreRow]
) -> Iterator[bytes]:
    """The COPY rows (_METRE_COPY's columns) of one reel's metres."""
    start = _METRE_FIELDS + _text_field(line_id) + _text_field(reel_id)
    end = _INT4_FIELD(4, month.toordinal() - _PG_EPOCH)
    for idx, dose, lo, hi, verdict, causes, t in rows:
        if dose is None or lo is None or hi is None:
            numbers = b"".join(
                (_INT4_FIELD(4, idx), _float8_field(dose), _float8_field(lo), _float8_field(hi))
            )
        else:
            numbers = _METRE_NUMBERS(4, idx, 8, dose, 8, lo, 8, hi)
        yield b"".join(
            (start, numbers, _VERDICT_FIELDS[verdict], _text_field(causes), _text_field(t), end)
        )


_METRE_COPY: Final = (
    "COPY metres (line_id, reel_id, idx, dose_kgy, min_dose_kgy, max_dose_kgy, verdict, "
    "causes, recorded_at, reel_month) FROM STDIN (FORMAT BINARY)"
)
_RECORD_COPY: Final = (
    "COPY records (line_id, store_id, seq, kind, t, data, problem) FROM STDIN (FORMAT BINARY)"
)
