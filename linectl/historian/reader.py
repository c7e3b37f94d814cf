"""The plant historian's read side (synchronous, psycopg 3): what `linectl report
--historian DSN` reads.

`HistorianReader.source(line_id)` is a report source (linectl.report.ReelSource) for one
line: `reel`, `metres`, `events` and `alarms` give the same dataclasses with the same
values as linectl.store.RecordStore gives for that line's store, so that
`build_report(reader.source(line), reel)` is byte-identical (as JSON) to the line's own
report. `reel_list` is the plant-wide reel list with filters, each reel's verdict taken
from the per-reel tallies without reading its metres.

Rows the historian holds half (a reel whose end came before its start, an alarm
acknowledged before its raise: records arriving out of order) are not shown until the
missing record is here: a report is made only of what the line's store would show.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from types import TracebackType
from typing import Any, Final

import psycopg

from linectl.core.ledger import Verdict
from linectl.errors import LocalError
from linectl.historian.pg import check_schema, connect_or_say, iso_utc, parse_iso
from linectl.store import Alarm, AuditEvent, ReelRecord, StoredMetre, _causes_tuple, reel_from_row

RELEASE: Final = "RELEASE"
HOLD: Final = "HOLD"
PLANNED_END: Final = "planned length reached"
"""linectl.report.PLANNED_END: the end reason of a reel that reached its planned length
(the verdict's rule needs it in SQL; tests check the two agree)."""

_VERDICT_BY_VALUE: Final = {v.value: v for v in Verdict}

# The reel's verdict from its row and tallies, as linectl.report._verdict_and_cuts decides
# it: RELEASE only for a reel closed at its planned length with every metre of the product
# (0 .. n-1, n = product_metres) in spec and n > 0. Stored metres all lie below n, so
# "every metre in spec" is in_spec = n. product_metres: the last stored index + 1, or
# floor(planned length) when larger (a planned length of 0 or none does not count; a
# non-finite one is left out here, where Python's floor would fail).
_PRODUCT_M = (
    "greatest(t.last_idx + 1, CASE WHEN r.planned_length_m <> 0 "
    "AND r.planned_length_m BETWEEN -9e18 AND 9e18 "
    "THEN floor(r.planned_length_m)::bigint ELSE 0 END)"
)
_VERDICT_SQL: Final = (
    f"CASE WHEN r.state = 'closed' AND r.end_reason = '{PLANNED_END}' "
    f"AND t.in_spec > 0 AND t.in_spec = {_PRODUCT_M} THEN '{RELEASE}' ELSE '{HOLD}' END"
)


class ReelSource:
    """One line's records in the historian, read as linectl.store.RecordStore reads
    its store (the methods linectl.report.build_report calls)."""

    def __init__(self, conn: psycopg.Connection[Any], line_id: str) -> None:
        self._conn = conn
        self.line_id = line_id

    def reel(self, reel_id: str) -> ReelRecord:
        """The reel; LocalError if the historian has not got its start."""
        row = self._conn.execute(
            "SELECT reel_id, reel_line_id, recipe_product, recipe_version, recipe_hash, "
            "recipe_json, operator, planned_length_m, started_at, start_json, state, "
            "ended_at, end_reason FROM reels "
            "WHERE line_id = %s AND reel_id = %s AND started_at IS NOT NULL",
            (self.line_id, reel_id),
        ).fetchone()
        if row is None:
            raise LocalError(f"no reel {reel_id!r} of line {self.line_id} in the historian")
        return reel_from_row(row)

    def metres(self, reel_id: str) -> list[StoredMetre]:
        """Every metre of the reel held, by index (from the one partition of its
        month)."""
        month = self._conn.execute(
            "SELECT reel_month FROM reel_tallies WHERE line_id = %s AND reel_id = %s",
            (self.line_id, reel_id),
        ).fetchone()
        if month is None:
            return []
        # Binary results: ten thousand rows' doses come as 8-byte floats, not parsed text
        # (the values are the same, exactly).
        with self._conn.cursor(binary=True) as cur:
            rows = cur.execute(
                "SELECT idx, dose_kgy, min_dose_kgy, max_dose_kgy, verdict, causes, "
                "recorded_at FROM metres WHERE line_id = %s AND reel_id = %s "
                "AND reel_month = %s ORDER BY idx",
                (self.line_id, reel_id, month[0]),
            ).fetchall()
        # Thousands of metres share a few verdicts and cause lists: look each up once.
        causes: dict[str, tuple[str, ...]] = {}
        out: list[StoredMetre] = []
        for idx, dose, lo, hi, verdict, cause_text, recorded_at in rows:
            c = causes.get(cause_text)
            if c is None:
                c = causes[cause_text] = _causes_tuple(cause_text)
            out.append(StoredMetre(idx, dose, lo, hi, _VERDICT_BY_VALUE[verdict], c, recorded_at))
        return out

    def events(self, reel_id: str | None = None) -> list[AuditEvent]:
        """Audit events of the line (of one reel when given), in the order recorded:
        by store (in the order the historian first saw them), then by the store's id."""
        where, params = self._where(reel_id)
        rows = self._conn.execute(
            "SELECT e.event_id, e.t, e.reel_id, e.actor, e.action, e.detail, e.accepted, "
            "e.reason FROM events e LEFT JOIN line_stores s "
            "ON s.line_id = e.line_id AND s.store_id = e.store_id "
            f"WHERE e.line_id = %s{where} ORDER BY s.epoch, e.event_id",
            params,
        ).fetchall()
        return [
            AuditEvent(int(r[0]), r[1], r[2], r[3], r[4], json.loads(r[5]), bool(r[6]), r[7])
            for r in rows
        ]

    def alarms(self, reel_id: str | None = None) -> list[Alarm]:
        """Alarms of the line (of one reel when given) whose raise is held, oldest first."""
        where, params = self._where(reel_id)
        rows = self._conn.execute(
            "SELECT e.alarm_id, e.reel_id, e.kind, e.message, e.raised_at, e.acknowledged_at, "
            "e.acknowledged_by, e.cleared_at FROM alarms e LEFT JOIN line_stores s "
            "ON s.line_id = e.line_id AND s.store_id = e.store_id "
            f"WHERE e.line_id = %s AND e.raised_at IS NOT NULL{where} "
            "ORDER BY s.epoch, e.alarm_id",
            params,
        ).fetchall()
        return [Alarm(int(r[0]), *r[1:]) for r in rows]

    def _where(self, reel_id: str | None) -> tuple[str, tuple[str, ...]]:
        if reel_id is None:
            return "", (self.line_id,)
        return " AND e.reel_id = %s", (self.line_id, reel_id)


class HistorianReader:
    """A read-only connection to the historian database (a context manager).
    MigrationError when its schema is not the one this code reads."""

    def __init__(self, dsn: str) -> None:
        self._conn: psycopg.Connection[Any] = connect_or_say(dsn)
        try:
            # The reader never writes: say so to the server, so that a bug cannot.
            self._conn.execute("SET default_transaction_read_only = on")
            self.schema_version = check_schema(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> HistorianReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ reels

    def lines_of_reel(self, reel_id: str) -> list[str]:
        """The ids of the lines holding a (started) reel with this id, sorted."""
        rows = self._conn.execute(
            "SELECT line_id FROM reels WHERE reel_id = %s AND started_at IS NOT NULL "
            "ORDER BY line_id",
            (reel_id,),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def source(self, line_id: str) -> ReelSource:
        """One line's records, for linectl.report.build_report."""
        return ReelSource(self._conn, line_id)

    def reel_list(
        self,
        *,
        line_id: str | None = None,
        product: str | None = None,
        since: str | datetime | date | None = None,
        until: str | datetime | date | None = None,
        verdict: str | None = None,
    ) -> list[dict[str, Any]]:
        """The plant's reels, by start time then line: the keys of
        linectl.report.list_reels (same meaning) plus `line_id` and `verdict` (RELEASE or
        HOLD, as the reel's report decides). Filters: the line, the recipe's product, the
        start time (since <= started < until; ISO 8601 text, a datetime or a date, UTC
        when without an offset), the verdict. LocalError for a filter that is not one."""
        where = ["r.started_at IS NOT NULL"]
        params: list[Any] = []
        if line_id is not None:
            where.append("r.line_id = %s")
            params.append(line_id)
        if product is not None:
            where.append("r.recipe_product = %s")
            params.append(product)
        for bound, op, name in ((since, ">=", "since"), (until, "<", "until")):
            if bound is not None:
                where.append(f"r.started_ts {op} %s")
                params.append(_instant(bound, name))
        if verdict is not None:
            v = verdict.upper()
            if v not in (RELEASE, HOLD):
                raise LocalError(f"verdict {verdict!r}: RELEASE or HOLD")
            where.append(f"{_VERDICT_SQL} = %s")
            params.append(v)
        rows = self._conn.execute(
            "SELECT r.line_id, r.reel_id, r.state, r.started_at, r.ended_at, r.recipe_product, "
            "r.recipe_version, r.operator, r.planned_length_m, coalesce(t.stored, 0), "
            "coalesce(t.in_spec, 0), coalesce(t.last_idx, -1), r.end_reason, "
            f"{_VERDICT_SQL} FROM reels r LEFT JOIN reel_tallies t "
            "ON t.line_id = r.line_id AND t.reel_id = r.reel_id "
            f"WHERE {' AND '.join(where)} ORDER BY r.started_ts, r.line_id, r.start_seq",
            params,
        ).fetchall()
        out = []
        for r in rows:
            stored, in_spec, last = int(r[9]), int(r[10]), int(r[11])
            out.append(
                {
                    "line_id": r[0],
                    "reel_id": r[1],
                    "state": r[2],
                    "started_at": r[3],
                    "ended_at": r[4],
                    "product": r[5],
                    "recipe_version": r[6],
                    "operator": r[7],
                    "planned_length_m": r[8],
                    "metres_recorded": stored,
                    "in_spec": in_spec,
                    # As list_reels: a metre missing below the last stored one is out.
                    "out_of_spec": stored - in_spec + (last + 1 - stored),
                    "end_reason": r[12],
                    "verdict": r[13],
                }
            )
        return out

    # ------------------------------------------------------------------ bookkeeping

    def incidents(self, line_id: str | None = None) -> list[dict[str, Any]]:
        """Every incident (of one line when given), oldest first."""
        where, params = ("WHERE line_id = %s", (line_id,)) if line_id is not None else ("", ())
        rows = self._conn.execute(
            "SELECT id, line_id, store_id, detected_at, kind, detail FROM incidents "
            f"{where} ORDER BY id",
            params,
        ).fetchall()
        return [
            {
                "id": int(r[0]),
                "line_id": r[1],
                "store_id": r[2],
                "detected_at": iso_utc(r[3]),
                "kind": r[4],
                "detail": r[5],
            }
            for r in rows
        ]

    def line_store_status(self) -> list[dict[str, Any]]:
        """Every line store held: line_id, store_id, epoch, confirmed_seq, max_seq,
        head_seq, first_seen (ISO 8601), by line and epoch."""
        rows = self._conn.execute(
            "SELECT line_id, store_id, epoch, confirmed_seq, max_seq, head_seq, first_seen "
            "FROM line_stores ORDER BY line_id, epoch"
        ).fetchall()
        keys = ("line_id", "store_id", "epoch", "confirmed_seq", "max_seq", "head_seq")
        return [{**dict(zip(keys, r[:6], strict=True)), "first_seen": iso_utc(r[6])} for r in rows]

    def record_count(self, line_id: str) -> dict[str, int]:
        """What the historian holds of a line, counted: raw records (and of them
        malformed or partly conflicting), reels (started), metres, alarms (raised),
        audit events, incidents."""
        queries = {
            "records": "SELECT count(*) FROM records WHERE line_id = %s",
            "records_with_problem": (
                "SELECT count(*) FROM records WHERE line_id = %s AND problem IS NOT NULL"
            ),
            "reels": "SELECT count(*) FROM reels WHERE line_id = %s AND started_at IS NOT NULL",
            "metres": "SELECT count(*) FROM metres WHERE line_id = %s",
            "alarms": "SELECT count(*) FROM alarms WHERE line_id = %s AND raised_at IS NOT NULL",
            "events": "SELECT count(*) FROM events WHERE line_id = %s",
            "incidents": "SELECT count(*) FROM incidents WHERE line_id = %s",
        }
        out = {}
        for name, query in queries.items():
            row = self._conn.execute(query, (line_id,)).fetchone()
            out[name] = int(row[0]) if row is not None else 0
        return out

    def held_seqs(self, line_id: str, store_id: str) -> list[int]:
        """Every seq held of a line store, ascending."""
        rows = self._conn.execute(
            "SELECT seq FROM records WHERE line_id = %s AND store_id = %s ORDER BY seq",
            (line_id, store_id),
        ).fetchall()
        return [int(r[0]) for r in rows]


def _instant(value: str | datetime | date, name: str) -> datetime:
    """A filter bound as an aware datetime (UTC when it has no offset)."""
    if isinstance(value, datetime):
        return parse_iso(value.isoformat())
    if isinstance(value, date):
        return parse_iso(value.isoformat())
    try:
        return parse_iso(value)
    except ValueError:
        raise LocalError(f"{name} {value!r}: not an ISO 8601 date or time") from None
