"""The reel report: what the records say about one reel (process.md, Records).

`build_report` gathers everything the report says into one JSON-able dict whose form is a
published interface (docs/records.md, schema id `linectl.reel-report/1`): the reel, its
recipe, the verdict (RELEASE or HOLD) with the metres not in spec by cause, the cut list,
the counts, the line speed, alarms and events. The text, CSV, cut-list, PNG and PDF
outputs are views of that one dict. An out-of-spec metre is never shown as in spec: a
metre index with no record at all (a hole below the last stored metre, or short of the
planned length of a reel that reached it) is reported as `missing`, out of spec.

Command line (wired into `linectl report` by linectl.cli):
    linectl report REEL [--db PATH | --config DIR] [--json | --csv | --format F]
                   [--cut-list] [--plot FILE] [--pdf FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Protocol, TextIO

from linectl.config import default_config_dir, load_config
from linectl.core.faults import name_fault_codes
from linectl.core.ledger import Verdict
from linectl.errors import EXIT_BAD_INPUT, EXIT_OK, LinectlError, LocalError
from linectl.store import Alarm, AuditEvent, RecordStore, ReelRecord, StoredMetre

REPORT_SCHEMA = "linectl.reel-report/1"
CUT_LIST_SCHEMA = "linectl.cut-list/1"
MISSING = "missing"  # verdict of a metre index below the last stored one with no record
PLANNED_END = "planned length reached"  # the end reason of a reel that reached its length
RELEASE = "RELEASE"
HOLD = "HOLD"

# Every verdict that is not in spec, in report order (the keys of out_of_spec_by_verdict).
OUT_OF_SPEC_VERDICTS: tuple[str, ...] = (
    Verdict.UNDER_DOSE.value,
    Verdict.OVER_DOSE.value,
    Verdict.UNPROVEN.value,
    Verdict.ENERGY.value,
    MISSING,
)

# What each not-in-spec verdict is called where a person reads it.
_VERDICT_LABELS = {
    Verdict.UNDER_DOSE.value: "under-dose",
    Verdict.OVER_DOSE.value: "over-dose",
    Verdict.UNPROVEN.value: "unproven",
    Verdict.ENERGY.value: "energy out of tolerance",
    MISSING: "missing",
}

# The kinds of events (`events[].kind`): who made them.
EVENT_OPERATOR = "operator"  # an operator action or command, accepted or refused
EVENT_STATE = "state_change"  # the controller's state transition (actor controller)
EVENT_ACCOUNTING = "accounting"  # the dose ledger's note on an interval (actor ledger)

CSV_COLUMNS = (
    "reel_id",
    "index",
    "dose_kgy",
    "min_dose_kgy",
    "max_dose_kgy",
    "verdict",
    "causes",
)
CSV_DOSE_DECIMALS = 2
"""Doses in the per-metre CSV: 0.01 kGy, below the ledger's accuracy (about 0.1 % of a
120 kGy target) and above float noise. `min_dose_kgy` is rounded down, `max_dose_kgy` up,
`dose_kgy` to the nearest: a rounded bound never looks better than the record."""

CUT_LIST_COLUMNS = ("reel_id", "from_m", "to_m", "length_m", "verdicts", "causes")


# --------------------------------------------------------------------------- building


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    # The store writes UTC with its offset; a time without one is taken as UTC.
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _seconds(text: str | None) -> float | None:
    t = _parse_time(text)
    return None if t is None else t.timestamp()


def _recipe_limits(recipe_json: str) -> dict[str, float | None]:
    try:
        data = json.loads(recipe_json)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    out: dict[str, float | None] = {}
    for key in ("min_dose_kgy", "target_dose_kgy", "max_dose_kgy"):
        value = data.get(key)
        out[key] = float(value) if isinstance(value, int | float) else None
    return out


def _union_causes(groups: Iterable[Sequence[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for causes in groups:
        for c in causes:
            seen.setdefault(c, None)
    return list(seen)


def out_of_spec_ranges(metres: Sequence[StoredMetre]) -> list[dict[str, Any]]:
    """Contiguous runs of metres with the same verdict other than in spec, by index;
    holes in the stored indices (below the last one) are runs with verdict `missing`."""
    by_index = {m.index: m for m in metres}
    if not by_index:
        return []
    ranges: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    cause_groups: list[tuple[str, ...]] = []
    for i in range(max(by_index) + 1):
        m = by_index.get(i)
        verdict = MISSING if m is None else m.verdict.value
        causes: tuple[str, ...] = ("no record",) if m is None else m.causes
        if current is not None and current["verdict"] == verdict and current["last"] == i - 1:
            current["last"] = i
            cause_groups.append(causes)
            continue
        if current is not None:
            current["causes"] = _union_causes(cause_groups)
            ranges.append(current)
            current = None
        if verdict != Verdict.IN_SPEC.value:
            current = {"first": i, "last": i, "verdict": verdict}
            cause_groups = [causes]
    if current is not None:
        current["causes"] = _union_causes(cause_groups)
        ranges.append(current)
    for r in ranges:
        r["length_m"] = r["last"] - r["first"] + 1
    return [{k: r[k] for k in ("first", "last", "length_m", "verdict", "causes")} for r in ranges]


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


# ---------------------------------------------------------------- verdict and cut list


def merge_outward(intervals: Iterable[tuple[float, float]]) -> list[tuple[int, int]]:
    """The cut list's rule: each interval [a, b) of cable coordinates (m) rounded outward
    to whole metre marks (floor(a), ceil(b)), then intervals that overlap or touch merged,
    in position order. Metres 3, 4, 5 and 7 ([3, 4), [4, 5), [5, 6), [7, 8)) give
    [(3, 6), (7, 8)]; [2.4, 2.6) gives [(2, 3)]."""
    rounded = sorted((math.floor(a), math.ceil(b)) for a, b in intervals if b > a)
    out: list[tuple[int, int]] = []
    for a, b in rounded:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def product_metres(reel: ReelRecord, metres: Sequence[StoredMetre]) -> int:
    """How many metres (0 .. n-1) the verdict covers. A reel that reached its planned
    length: floor(planned length) metres (a stored metre past it is still counted), so a
    record lost at the tail is `missing`. Any other reel (ended short, open, no planned
    length): up to the last stored metre; the cable beyond it is not part of the reel."""
    last = max((m.index for m in metres), default=-1) + 1
    if reel.state == "closed" and reel.end_reason == PLANNED_END and reel.planned_length_m:
        return max(last, math.floor(reel.planned_length_m))
    return last


def _unproven_why(causes: Sequence[str]) -> str:
    """Why a metre is unproven: its causes but the generic `unproven`, which alone means
    a bin whose dose could not be bounded (a counter reset)."""
    why = [c for c in causes if c != Verdict.UNPROVEN.value]
    return ", ".join(why) if why else "counter reset"


def _bad_key(m: StoredMetre | None) -> tuple[str, str] | None:
    """(verdict, why) of a metre not in spec, None for one in spec. `why` is set for
    unproven and missing metres only: for the others the verdict is the reason."""
    if m is None:
        return (MISSING, "no record")
    if m.verdict is Verdict.IN_SPEC:
        return None
    if m.verdict is Verdict.UNPROVEN:
        return (Verdict.UNPROVEN.value, _unproven_why(m.causes))
    return (m.verdict.value, "")


def _range_text(ranges: Sequence[Sequence[int]], limit: int | None = None) -> str:
    shown = ranges if limit is None else ranges[:limit]
    text = ", ".join(f"{a}-{b}" for a, b in shown)
    if limit is not None and len(ranges) > limit:
        text += f", ... ({len(ranges) - limit} more)"
    return f"{text} m" if text else "-"


def _verdict_and_cuts(
    reel: ReelRecord, metres: Sequence[StoredMetre]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The verdict of the reel and its cut list (docs/records.md, "Verdict")."""
    n = product_metres(reel, metres)
    by_index = {m.index: m for m in metres}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    bad: list[int] = []
    for i in range(n):
        m = by_index.get(i)
        key = _bad_key(m)
        if key is None:
            continue
        bad.append(i)
        g = groups.setdefault(
            key, {"cause": key[0], "why": key[1], "metres": 0, "ranges": [], "causes": {}}
        )
        g["metres"] += 1
        for c in ("no record",) if m is None else m.causes:
            g["causes"].setdefault(c, None)
        if g["ranges"] and g["ranges"][-1][1] == i:
            g["ranges"][-1][1] = i + 1
        else:
            g["ranges"].append([i, i + 1])
    order = {v: k for k, v in enumerate(OUT_OF_SPEC_VERDICTS)}
    by_cause = []
    for (verdict, _why), g in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[1]["ranges"][0][0])
    ):
        g["label"] = _VERDICT_LABELS.get(verdict, verdict)
        g["causes"] = list(g["causes"])
        by_cause.append({k: g[k] for k in ("cause", "label", "why", "metres", "ranges", "causes")})

    reasons: list[str] = []
    closed = reel.state == "closed"
    ended_short = closed and reel.end_reason != PLANNED_END
    if not closed:
        reasons.append("the reel is not finished (open): every figure is provisional")
    elif ended_short:
        planned = (
            f" of {reel.planned_length_m:g} m planned" if reel.planned_length_m is not None else ""
        )
        reasons.append(f"ended short ({reel.end_reason}): {n} m recorded{planned}")
    if n == 0:
        reasons.append("no metre recorded")
    if bad:
        reasons.append(f"{len(bad)} of {n} m not in spec")
    decision = HOLD if reasons else RELEASE
    result: dict[str, Any] = {
        "decision": decision,
        "reasons": reasons,
        "product_from_m": 0,
        "product_to_m": n,
        "in_spec_m": n - len(bad),
        "not_in_spec_m": len(bad),
        "ended_short": ended_short,
        "open": not closed,
        "by_cause": by_cause,
    }

    cuts: list[dict[str, Any]] = []
    for a, b in merge_outward((i, i + 1) for i in bad):
        keys = [_bad_key(by_index.get(i)) for i in range(a, b)]
        verdicts = _union_causes([[k[0]] for k in keys if k is not None])
        causes = _union_causes(
            ("no record",) if by_index.get(i) is None else by_index[i].causes for i in range(a, b)
        )
        cuts.append(
            {"from_m": a, "to_m": b, "length_m": b - a, "verdicts": verdicts, "causes": causes}
        )
    cut_list: dict[str, Any] = {
        "schema": CUT_LIST_SCHEMA,
        "reel_id": reel.reel_id,
        "decision": decision,
        "provisional": not closed,
        "product_from_m": 0,
        "product_to_m": n,
        "cut_m": sum(c["length_m"] for c in cuts),
        "cuts": cuts,
    }
    return result, cut_list


# ---------------------------------------------------------------- events and line speed


def event_kind(actor: str, action: str) -> str:
    """`state_change` (the controller's transitions), `accounting` (the dose ledger's
    notes) or `operator` (everything else: operator actions and commands)."""
    if actor == "controller" and action == "transition":
        return EVENT_STATE
    if actor == "ledger":
        return EVENT_ACCOUNTING
    return EVENT_OPERATOR


def running_periods(
    events: Sequence[AuditEvent], end_s: float | None
) -> list[tuple[float, float]] | None:
    """The periods (epoch seconds) the line was in state `running` while the reel was
    loaded, from the controller's recorded transitions; a period still open ends at
    `end_s` (the reel's end, else +inf). None when the reel has no recorded transition."""
    periods: list[tuple[float, float]] = []
    seen = False
    since: float | None = None
    for e in events:
        if event_kind(e.actor, e.action) != EVENT_STATE:
            continue
        t = _seconds(e.t)
        if t is None:
            continue
        seen = True
        old, new = e.detail.get("from"), e.detail.get("to")
        # A period ends at a transition out of running, or at any transition that does not
        # start from running (the controller was killed while running: its way out of
        # running was never recorded, and the downtime is left to running_speed's step
        # limit).
        if since is not None and (old != "running" or new != "running"):
            periods.append((since, t))
            since = None
        if new == "running" and since is None:
            since = t
    if since is not None:
        periods.append((since, math.inf if end_s is None else end_s))
    return periods if seen else None


def running_speed(
    metres: Sequence[StoredMetre],
    periods: Sequence[tuple[float, float]] | None,
    max_step_s: float | None = None,
) -> tuple[float | None, int, float]:
    """The mean line speed while the line ran (m/min), the metres and seconds it is taken
    over. A metre is recorded when its end leaves the last pass, so consecutive metres'
    record times are the cable's travel at the last pass: the sum over every pair of
    consecutive metres (i - 1, i) recorded within one period in state `running` of 1 m,
    divided by the sum of their time differences. Time starting, stopping and standing
    is not in it. Without periods (no transition recorded) every pair counts. A pair more
    than `max_step_s` apart is left out too: the line stood between the two records
    (a stop whose transitions were not recorded, such as a controller killed while
    running)."""
    times = {m.index: _seconds(m.recorded_at) for m in metres}
    dist = 0
    dt = 0.0
    for m in metres:
        t0, t1 = times.get(m.index - 1), times[m.index]
        if t0 is None or t1 is None or t1 < t0:
            continue
        if max_step_s is not None and t1 - t0 > max_step_s:
            continue
        if periods is not None and not any(a <= t0 and t1 <= b for a, b in periods):
            continue
        dist += 1
        dt += t1 - t0
    speed = dist / dt * 60.0 if dt > 0 else None
    return speed, dist, dt


def _max_step_s(recipe_json: str) -> float | None:
    """The longest a running line takes for one metre: twice the time at the recipe's
    minimum speed (below it the beam goes off and the line stops); None if unknown."""
    try:
        data = json.loads(recipe_json)
    except ValueError:
        return None
    v_min = data.get("speed_min_m_min") if isinstance(data, dict) else None
    if isinstance(v_min, int | float) and v_min > 0:
        return 2.0 * 60.0 / float(v_min)
    return None


def _event_json(e: AuditEvent) -> dict[str, Any]:
    detail = e.detail
    if isinstance(detail, dict) and isinstance(detail.get("cause"), str):
        # Records made before fault codes were named say "accelerator fault code 7".
        detail = {**detail, "cause": name_fault_codes(detail["cause"])}
    return {
        "t": e.t,
        "actor": e.actor,
        "action": e.action,
        "detail": detail,
        "accepted": e.accepted,
        "reason": name_fault_codes(e.reason) if e.reason else e.reason,
        "kind": event_kind(e.actor, e.action),
    }


class ReelSource(Protocol):
    """Where a reel's records are read from: a line's store (RecordStore) or the plant
    historian (linectl.historian.reader), so that both give the same report."""

    def reel(self, reel_id: str) -> ReelRecord: ...

    def metres(self, reel_id: str) -> list[StoredMetre]: ...

    def events(self, reel_id: str | None = None) -> list[AuditEvent]: ...

    def alarms(self, reel_id: str | None = None) -> list[Alarm]: ...


def build_report(store: ReelSource, reel_id: str) -> dict[str, Any]:
    """The report of one reel as a JSON-able dict (docs/records.md); LocalError if unknown.
    Every view (text, CSV, cut list, PNG, PDF) renders this dict and nothing else.

    Dose statistics (min/mean/max) cover the metres with a proven dose: every verdict but
    unproven. An unproven metre's dose is partial (or absent), so it would only mislead;
    the unproven metres are counted and listed as ranges instead.
    """
    reel = store.reel(reel_id)
    metres = store.metres(reel_id)
    events = store.events(reel_id)
    limits = _recipe_limits(reel.recipe_json)
    ranges = out_of_spec_ranges(metres)
    verdict, cut_list = _verdict_and_cuts(reel, metres)

    by_verdict = dict.fromkeys(OUT_OF_SPEC_VERDICTS, 0)
    for r in ranges:
        by_verdict[r["verdict"]] += r["length_m"]
    in_spec = sum(1 for m in metres if m.verdict is Verdict.IN_SPEC)
    cause_counts = Counter(c for m in metres for c in m.causes)

    proven = [m for m in metres if m.verdict is not Verdict.UNPROVEN and m.dose_kgy is not None]
    mins = [m.min_dose_kgy for m in proven if m.min_dose_kgy is not None]
    maxs = [m.max_dose_kgy for m in proven if m.max_dose_kgy is not None]
    means = [m.dose_kgy for m in proven if m.dose_kgy is not None]

    t0 = _parse_time(reel.started_at)
    t1 = _parse_time(reel.ended_at) or _parse_time(max((m.recorded_at for m in metres), default=""))
    duration_s = (t1 - t0).total_seconds() if t0 is not None and t1 is not None else None
    # Kept as documented in /1 (metres per minute of the reel's elapsed time); it is not
    # the line speed: see speed_m_min_running.
    elapsed_rate = (
        len(metres) / (duration_s / 60.0)
        if duration_s is not None and duration_s > 0 and metres
        else None
    )
    end_s = _seconds(reel.ended_at)
    periods = running_periods(events, end_s)
    speed, speed_m, speed_s = running_speed(metres, periods, _max_step_s(reel.recipe_json))
    # Time in state running; a period still open (an open reel) counts to the last record.
    last_record_s = max(
        (t for m in metres if (t := _seconds(m.recorded_at)) is not None), default=None
    )
    running_s = (
        sum(max(0.0, (b if math.isfinite(b) else (last_record_s or a)) - a) for a, b in periods)
        if periods is not None
        else None
    )

    kinds = Counter(event_kind(e.actor, e.action) for e in events)
    summary = {
        "metres_recorded": len(metres),
        "in_spec": in_spec,
        "out_of_spec": sum(by_verdict.values()),
        "out_of_spec_by_verdict": by_verdict,
        "metres_by_cause": dict(sorted(cause_counts.items())),
        "dose_stats_metres": len(means),
        "dose_min_kgy": _round(min(mins)) if mins else None,
        "dose_mean_kgy": _round(sum(means) / len(means)) if means else None,
        "dose_max_kgy": _round(max(maxs)) if maxs else None,
        "duration_s": _round(duration_s, 3),
        "speed_m_min_mean": _round(elapsed_rate, 3),
        "speed_m_min_running": _round(speed, 2),
        "speed_timed_m": speed_m,
        "speed_timed_s": _round(speed_s, 3),
        "running_s": _round(running_s, 3),
        "operator_actions": kinds[EVENT_OPERATOR],
        "state_changes": kinds[EVENT_STATE],
        "accounting_events": kinds[EVENT_ACCOUNTING],
    }
    return {
        "schema": REPORT_SCHEMA,
        "reel": {
            "reel_id": reel.reel_id,
            "line_id": reel.line_id,
            "operator": reel.operator,
            "state": reel.state,
            "started_at": reel.started_at,
            "ended_at": reel.ended_at,
            "end_reason": reel.end_reason,
            "planned_length_m": reel.planned_length_m,
        },
        "recipe": {
            "product": reel.recipe_product,
            "version": reel.recipe_version,
            "hash": reel.recipe_hash,
            **limits,
        },
        "verdict": verdict,
        "cut_list": cut_list,
        "summary": summary,
        "ranges": ranges,
        "alarms": [
            {
                "id": a.id,
                "kind": a.kind,
                "message": name_fault_codes(a.message),
                "raised_at": a.raised_at,
                "acknowledged_at": a.acknowledged_at,
                "acknowledged_by": a.acknowledged_by,
                "cleared_at": a.cleared_at,
            }
            for a in store.alarms(reel_id)
        ],
        "events": [_event_json(e) for e in events],
        "metres": [
            {
                "index": m.index,
                "dose_kgy": m.dose_kgy,
                "min_dose_kgy": m.min_dose_kgy,
                "max_dose_kgy": m.max_dose_kgy,
                "verdict": m.verdict.value,
                "causes": list(m.causes),
            }
            for m in metres
        ],
    }


# --------------------------------------------------------------------------- views


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _why_label(group: dict[str, Any]) -> str:
    return f"{group['label']} ({group['why']})" if group["why"] else str(group["label"])


def verdict_line(report: dict[str, Any]) -> str:
    """The verdict in one line: decision, reel, what is wrong, the recipe's identity."""
    v, reel, recipe = report["verdict"], report["reel"], report["recipe"]
    if v["decision"] == RELEASE:
        what = f"all {v['product_to_m']} m (0-{v['product_to_m']} m) in spec"
    else:
        what = "; ".join(v["reasons"])
    return (
        f"VERDICT {v['decision']}  reel {reel['reel_id']}: {what}; recipe {recipe['product']} "
        f"version {recipe['version']} sha256 {recipe['hash']}"
    )


def _speed_text(s: dict[str, Any]) -> str:
    if s["speed_m_min_running"] is None:
        return "line speed -"
    return (
        f"line speed {s['speed_m_min_running']:.1f} m/min mean while running "
        f"({s['speed_timed_m']} m in {s['speed_timed_s']:.1f} s)"
    )


def write_text(report: dict[str, Any], out: TextIO) -> None:
    """Human report: the verdict line and the metres not in spec by cause, the cut list,
    reel, recipe, counts, alarms, and operator actions apart from the state changes."""
    reel, recipe, s, v = report["reel"], report["recipe"], report["summary"], report["verdict"]
    w = out.write
    w(verdict_line(report) + "\n")
    if v["by_cause"]:
        w(f"  {'not in spec':<44} {'metres':>6}  at (m from the reel's 0 mark)\n")
        for g in v["by_cause"]:
            w(f"  {_why_label(g):<44} {g['metres']:>6}  {_range_text(g['ranges'])}\n")
    w("\n")
    w(f"reel {reel['reel_id']}  line {reel['line_id']}  operator {reel['operator']}\n")
    w(
        f"  recipe   {recipe['product']}, version {recipe['version']}, "
        f"sha256 {recipe['hash'][:12]}  limits {_fmt(recipe['min_dose_kgy'], 'g')}.."
        f"{_fmt(recipe['max_dose_kgy'], 'g')} kGy, target {_fmt(recipe['target_dose_kgy'], 'g')}\n"
    )
    w(
        f"  run      {reel['started_at']} .. {reel['ended_at'] or '(open)'}"
        f"{'  (' + reel['end_reason'] + ')' if reel['end_reason'] else ''}\n"
    )
    w(f"  speed    {_speed_text(s).removeprefix('line speed ')}\n")
    w(
        f"  metres   {s['metres_recorded']} recorded, {s['in_spec']} in spec, "
        f"{s['out_of_spec']} out of spec"
    )
    parts = [f"{k} {n}" for k, n in s["out_of_spec_by_verdict"].items() if n]
    # The verdict also counts metres missing past the last record of a reel that reached
    # its planned length; say so where the two counts differ.
    tail = v["not_in_spec_m"] - s["out_of_spec"]
    if tail > 0:
        parts.append(f"and {tail} missing after the last record")
    w(f" ({', '.join(parts)})\n" if parts else "\n")
    w(
        f"  dose     min {_fmt(s['dose_min_kgy'])}  mean {_fmt(s['dose_mean_kgy'])}  "
        f"max {_fmt(s['dose_max_kgy'])} kGy over {s['dose_stats_metres']} proven metres\n"
    )
    w("\n")
    write_cut_list_text(report["cut_list"], out)
    # "none" said, as for the cut list: a section left out could be a section lost.
    w(f"\nalarms: {len(report['alarms']) or 'none'}\n")
    for a in report["alarms"]:
        w(f"  {_alarm_text(a)}\n")
    for kind, title in (
        (EVENT_OPERATOR, "operator actions"),
        (EVENT_STATE, "state changes (controller)"),
        (EVENT_ACCOUNTING, "dose accounting notes (ledger)"),
    ):
        events = [e for e in report["events"] if e["kind"] == kind]
        if kind == EVENT_ACCOUNTING and not events:
            continue  # routine: only a reel with a gap or a counter reset has them
        w(f"\n{title}: {len(events) or 'none'}\n")
        for e in events:
            w(f"  {_event_text(e)}\n")
    w("\n(per-metre doses: --csv or --json)\n")


def _alarm_text(a: dict[str, Any]) -> str:
    ack = f"ack {a['acknowledged_at']} by {a['acknowledged_by']}"
    return (
        f"{a['raised_at']}  {a['kind']}: {a['message']}  "
        f"[{ack if a['acknowledged_at'] else 'not acknowledged'}; "
        f"{'cleared ' + a['cleared_at'] if a['cleared_at'] else 'not cleared'}]"
    )


def _event_text(e: dict[str, Any]) -> str:
    if e["kind"] == EVENT_STATE:
        d = e["detail"]
        return f"{e['t']}  {d.get('from')} -> {d.get('to')}: {d.get('cause', '')}"
    verdict = "accepted" if e["accepted"] else f"refused: {e['reason']}"
    return f"{e['t']}  {e['actor']}: {e['action']} {json.dumps(e['detail'])} ({verdict})"


def write_cut_list_text(cut_list: dict[str, Any], out: TextIO) -> None:
    """The cut list as a table: from and to (metre marks on the cable), length, why."""
    w = out.write
    cuts = cut_list["cuts"]
    head = f"cut list of reel {cut_list['reel_id']}"
    if cut_list["provisional"]:
        head += " (PROVISIONAL: the reel is open)"
    count = f"{len(cuts)} cut{'s' if len(cuts) > 1 else ''}, {cut_list['cut_m']} m in all"
    w(
        f"{head}: {count if cuts else 'none'}; product "
        f"{cut_list['product_from_m']}-{cut_list['product_to_m']} m from the reel's 0 mark\n"
    )
    if cuts:
        w(f"  {'from m':>8} {'to m':>8} {'length m':>9}  why\n")
        for c in cuts:
            why = ", ".join(_VERDICT_LABELS.get(x, x) for x in c["verdicts"])
            w(
                f"  {c['from_m']:>8} {c['to_m']:>8} {c['length_m']:>9}  {why}"
                f" ({', '.join(c['causes'])})\n"
            )


def _decimal(x: float | None, rounding: str) -> str:
    if x is None or not math.isfinite(x):
        return ""
    step = Decimal(1).scaleb(-CSV_DOSE_DECIMALS)
    return str(Decimal(repr(x)).quantize(step, rounding=rounding))


def write_csv(report: dict[str, Any], out: TextIO) -> None:
    """One row per stored metre: reel, index, dose, min, max (CSV_DOSE_DECIMALS; min
    rounded down, max up), verdict, causes (';'-separated); unknown doses empty."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    reel_id = report["reel"]["reel_id"]
    for m in report["metres"]:
        writer.writerow(
            [
                reel_id,
                m["index"],
                _decimal(m["dose_kgy"], ROUND_HALF_EVEN),
                _decimal(m["min_dose_kgy"], ROUND_FLOOR),
                _decimal(m["max_dose_kgy"], ROUND_CEILING),
                m["verdict"],
                ";".join(m["causes"]),
            ]
        )


def write_cut_list_csv(cut_list: dict[str, Any], out: TextIO) -> None:
    """One row per cut: reel, from and to (whole metre marks), length, verdicts and causes
    (';'-separated). A reel with nothing to cut gives the header only."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CUT_LIST_COLUMNS)
    for c in cut_list["cuts"]:
        writer.writerow(
            [
                cut_list["reel_id"],
                c["from_m"],
                c["to_m"],
                c["length_m"],
                ";".join(c["verdicts"]),
                ";".join(c["causes"]),
            ]
        )


# Shading per verdict: colour-blind-safe hues (Okabe-Ito), labelled in the legend.
_VERDICT_COLOURS = {
    Verdict.UNDER_DOSE.value: "#0072B2",
    Verdict.OVER_DOSE.value: "#D55E00",
    Verdict.UNPROVEN.value: "#999999",
    Verdict.ENERGY.value: "#CC79A7",
    MISSING: "#000000",
}


def _matplotlib(option: str) -> Any:
    """matplotlib's Figure class, imported here so that the rest of linectl works
    without it; LocalError naming the option if it is not installed."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 - optional (extra "demo")
    except ImportError as exc:
        raise LocalError(
            f"{option} needs matplotlib (pip install 'linectl[demo]'): {exc}"
        ) from None
    return Figure


def _draw_dose(ax: Any, report: dict[str, Any], *, small: bool = False) -> list[Any]:
    """Dose per metre against position on `ax`: mean as steps with the min..max band, the
    recipe's lines, the metres not in spec shaded by verdict. Returns the legend handles."""
    from matplotlib.patches import Patch  # noqa: PLC0415 - optional, as in _matplotlib

    recipe = report["recipe"]
    metres = report["metres"]
    # Metre i covers [i, i + 1) m: draw each as a flat step over its own metre, with a
    # NaN break at every hole, so that no line bridges a metre that has no record.
    x: list[float] = []
    mean: list[float] = []
    lo: list[float] = []
    hi: list[float] = []
    prev: int | None = None
    for m in metres:
        i = int(m["index"])
        if prev is not None and i != prev + 1:
            x.append(prev + 1.0)
            for series in (mean, lo, hi):
                series.append(math.nan)
        prev = i
        x += [float(i), i + 1.0]
        for series, key in ((mean, "dose_kgy"), (lo, "min_dose_kgy"), (hi, "max_dose_kgy")):
            v = math.nan if m[key] is None else float(m[key])
            series += [v, v]

    # The shaded spans: every metre not in spec as the verdict sees it (holes and a
    # missing tail included), by verdict.
    spans = [(a, b, g["cause"]) for g in report["verdict"]["by_cause"] for a, b in g["ranges"]]
    for a, b, verdict in spans:
        colour = _VERDICT_COLOURS.get(verdict, "#E69F00")
        ax.axvspan(a, b, color=colour, alpha=0.22, linewidth=0, zorder=0)
        # An opaque tick along the bottom with an edge line: a single bad metre on a
        # long reel stays visible even when its span is narrower than a pixel.
        ax.axvspan(
            a, b, ymin=0.0, ymax=0.025, facecolor=colour, edgecolor=colour, linewidth=1.0, zorder=3
        )
    shown = [v for v in _VERDICT_COLOURS if any(s[2] == v for s in spans)]
    patches = [
        Patch(color=_VERDICT_COLOURS[v], alpha=0.35, label=_VERDICT_LABELS[v]) for v in shown
    ]
    band = ax.fill_between(
        x, lo, hi, color="#009E73", alpha=0.25, linewidth=0, label="min..max within metre"
    )
    (line,) = ax.plot(x, mean, color="#009E73", linewidth=1.2, label="mean dose per metre")
    handles: list[Any] = [line, band, *patches]
    for key, name, style in (
        ("max_dose_kgy", "max", "--"),
        ("target_dose_kgy", "target", ":"),
        ("min_dose_kgy", "min", "--"),
    ):
        value = recipe.get(key)
        if value is not None:
            h = ax.axhline(
                value,
                color="#B00020" if name != "target" else "#333333",
                linestyle=style,
                linewidth=1.0,
                label=f"recipe {name} {value:g} kGy",
            )
            handles.append(h)
    # Y range: the recipe window with margin, stretched to the data (a burn spike must
    # stay visible, but should not flatten everything else).
    finite = [v for v in (*lo, *hi) if math.isfinite(v)]
    bounds = [v for v in (recipe.get("min_dose_kgy"), recipe.get("max_dose_kgy")) if v]
    if finite or bounds:
        y_lo = min([*finite, *bounds])
        y_hi = max([*finite, *bounds])
        pad = 0.08 * (y_hi - y_lo or 1.0)
        ax.set_ylim(max(0.0, y_lo - pad), y_hi + pad)
    n_m = max([report["verdict"]["product_to_m"], *(m["index"] + 1 for m in metres)])
    ax.set_xlim(0, max(n_m, 1))
    size = 8 if small else 10
    ax.set_xlabel("cable position from the reel's 0 mark (m)", fontsize=size)
    ax.set_ylabel("dose (kGy)", fontsize=size)
    ax.tick_params(labelsize=size - 1)
    ax.grid(True, alpha=0.3)
    return handles


def write_plot(report: dict[str, Any], path: Path) -> None:
    """PNG: dose per metre against position, recipe limits, out-of-spec ranges shaded.

    matplotlib is imported here so that the rest of linectl works without it."""
    figure = _matplotlib("--plot")
    reel, recipe, s = report["reel"], report["recipe"], report["summary"]
    fig = figure(figsize=(11, 5.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    handles = _draw_dose(ax, report)
    ax.set_title(
        f"Reel {reel['reel_id']}: {recipe['product']} (recipe version {recipe['version']}), "
        f"{report['verdict']['decision']}\n"
        f"{s['metres_recorded']} m recorded, {s['in_spec']} in spec, "
        f"{s['out_of_spec']} out of spec",
        fontsize=11,
    )
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise LocalError(f"{path}: cannot write the plot: {exc.strerror}") from None


# --------------------------------------------------------------------------- PDF certificate

PDF_ROWS = {"by_cause": 14, "cuts": 14, "alarms": 6, "actions": 8}
"""Rows each list of the certificate shows at most (it is one page); a longer list ends
with a line that says how many more there are and where they are."""

_PAGE_W_IN, _PAGE_H_IN = 8.27, 11.69  # A4 portrait
_LEFT, _RIGHT = 0.06, 0.94
_DECISION_COLOURS = {RELEASE: "#1B7F3B", HOLD: "#B00020"}


class _Page:
    """Lines of text placed top-down on one figure, in figure coordinates."""

    def __init__(self, fig: Any) -> None:
        self.fig = fig
        self.y = 0.965

    @staticmethod
    def height(size: float) -> float:
        return size * 1.32 / (_PAGE_H_IN * 72.0)

    @staticmethod
    def chars(width: float, size: float) -> int:
        """How many monospaced characters of `size` fit in `width` (figure fraction)."""
        return int(width * _PAGE_W_IN * 72.0 / (0.61 * size))

    def line(
        self,
        text: str,
        *,
        size: float = 8.0,
        x: float = _LEFT,
        width: float = _RIGHT - _LEFT,
        mono: bool = True,
        bold: bool = False,
        advance: bool = True,
    ) -> None:
        if mono:
            limit = self.chars(width, size)
            if len(text) > limit:
                text = text[: limit - 3] + "..."
        self.fig.text(
            x,
            self.y,
            text,
            fontsize=size,
            family="DejaVu Sans Mono" if mono else "DejaVu Sans",
            weight="bold" if bold else "normal",
            va="top",
            ha="left",
        )
        if advance:
            self.y -= self.height(size)

    def gap(self, size: float = 8.0) -> None:
        self.y -= self.height(size) * 0.6


def _capped(lines: list[str], limit: int, more: str) -> list[str]:
    if len(lines) <= limit:
        return lines
    return [*lines[: limit - 1], f"... and {len(lines) - limit + 1} more: {more}"]


def write_pdf(report: dict[str, Any], path: Path) -> None:
    """A one-page A4 certificate of the reel (matplotlib's PDF backend, TrueType fonts so
    that the text can be searched and extracted): verdict, recipe identity, run, dose plot,
    metres not in spec by cause, cut list, alarms, operator and operator actions, and
    lines for the quality engineer's signature. Every figure comes from `report`."""
    figure = _matplotlib("--pdf")
    import matplotlib as mpl  # noqa: PLC0415 - present: _matplotlib imported it

    reel, recipe, s, v = report["reel"], report["recipe"], report["summary"], report["verdict"]
    cut_list = report["cut_list"]
    reel_id = reel["reel_id"]
    with mpl.rc_context({"pdf.fonttype": 42, "font.family": "DejaVu Sans"}):
        fig = figure(figsize=(_PAGE_W_IN, _PAGE_H_IN))
        page = _Page(fig)
        page.line("Irradiation certificate", size=16, mono=False, bold=True, advance=False)
        fig.text(
            _RIGHT, page.y, f"reel {reel_id}", fontsize=12, ha="right", va="top", weight="bold"
        )
        page.y -= page.height(16)
        page.line(
            f"line {reel['line_id']}   operator {reel['operator']}   "
            f"record: linectl report {reel_id} (schema {report['schema']})",
            size=8,
            mono=False,
        )
        page.gap()
        # The verdict: the decision in a coloured box, the reasons beside it.
        fig.text(
            _LEFT,
            page.y,
            f" {v['decision']} ",
            fontsize=22,
            weight="bold",
            color="white",
            va="top",
            ha="left",
            bbox={"facecolor": _DECISION_COLOURS[v["decision"]], "edgecolor": "none", "pad": 4},
        )
        if v["decision"] == RELEASE:
            reasons = [f"all {v['product_to_m']} m (0-{v['product_to_m']} m) in spec"]
        else:
            reasons = list(v["reasons"])
        y0 = page.y
        page.y -= page.height(2)
        wrapped = [part for text in reasons for part in textwrap.wrap(text, 64)]
        for part in _capped(wrapped, 3, "the text report"):
            page.line(part, size=10, x=_LEFT + 0.25, width=_RIGHT - _LEFT - 0.25, mono=False)
        page.y = min(page.y, y0 - page.height(22) - page.height(4))
        page.gap()

        for label, value in (
            ("recipe", f"{recipe['product']}   version {recipe['version']}"),
            ("recipe sha256", recipe["hash"]),
            (
                "dose limits",
                f"{_fmt(recipe['min_dose_kgy'], 'g')} .. {_fmt(recipe['max_dose_kgy'], 'g')} kGy, "
                f"target {_fmt(recipe['target_dose_kgy'], 'g')} kGy",
            ),
            (
                "run",
                f"{reel['started_at']} .. {reel['ended_at'] or '(open)'}"
                f"{'  (' + reel['end_reason'] + ')' if reel['end_reason'] else ''}",
            ),
            ("line speed", _speed_text(s).removeprefix("line speed ")),
            (
                "metres",
                f"0-{v['product_to_m']} m: {v['in_spec_m']} in spec, "
                f"{v['not_in_spec_m']} not in spec; dose min {_fmt(s['dose_min_kgy'])}, "
                f"mean {_fmt(s['dose_mean_kgy'])}, max {_fmt(s['dose_max_kgy'])} kGy",
            ),
        ):
            page.line(f"{label:<14}{value}", size=8)
        page.gap()

        # The dose plot.
        plot_h = 0.25
        ax = fig.add_axes((_LEFT + 0.05, page.y - plot_h, _RIGHT - _LEFT - 0.06, plot_h - 0.01))
        handles = _draw_dose(ax, report, small=True)
        ax.legend(handles=handles, loc="lower right", fontsize=6, ncol=2, framealpha=0.85)
        page.y -= plot_h + page.height(8) * 3.2

        # Not in spec by cause (left) and the cut list (right), side by side.
        top = page.y
        col_w = (_RIGHT - _LEFT) / 2 - 0.01
        page.line("Not in spec, by cause", size=9, mono=False, bold=True, width=col_w)
        rows = [
            f"{_why_label(g)[:28]:<28} {g['metres']:>6} m  {_range_text(g['ranges'], 2)}"
            for g in v["by_cause"]
        ] or ["none"]
        for row in _capped(rows, PDF_ROWS["by_cause"], f"linectl report {reel_id}"):
            page.line(row, size=7, width=col_w)
        left_end = page.y
        page.y = top
        x2 = _LEFT + col_w + 0.02
        title = "Cut list" + (" (PROVISIONAL: reel open)" if cut_list["provisional"] else "")
        page.line(title, size=9, x=x2, mono=False, bold=True, width=col_w)
        cuts = cut_list["cuts"]
        if cuts:
            page.line(f"{'from m':>8} {'to m':>8} {'length m':>9}  why", size=7, x=x2, width=col_w)
        rows = [
            f"{c['from_m']:>8} {c['to_m']:>8} {c['length_m']:>9}  "
            + ", ".join(_VERDICT_LABELS.get(x, x) for x in c["verdicts"])
            for c in cuts
        ] or [f"none: keep 0-{cut_list['product_to_m']} m"]
        for row in _capped(rows, PDF_ROWS["cuts"], f"linectl report {reel_id} --cut-list"):
            page.line(row, size=7, x=x2, width=col_w)
        if cuts:
            page.line(
                f"{len(cuts)} cuts, {cut_list['cut_m']} m in all; metre marks from the "
                "reel's 0 mark",
                size=7,
                x=x2,
                width=col_w,
            )
        page.y = min(page.y, left_end)
        page.gap()

        page.line(f"Alarms: {len(report['alarms']) or 'none'}", size=9, mono=False, bold=True)
        for row in _capped(
            [_alarm_text(a) for a in report["alarms"]], PDF_ROWS["alarms"], "linectl report"
        ):
            page.line(row, size=7)
        page.gap()
        actions = [e for e in report["events"] if e["kind"] == EVENT_OPERATOR]
        page.line(
            f"Operator {reel['operator']}; operator actions: {len(actions) or 'none'} "
            f"(state changes of the controller: {s['state_changes']}, in the text report)",
            size=9,
            mono=False,
            bold=True,
        )
        for row in _capped(
            [_event_text(e) for e in actions], PDF_ROWS["actions"], "linectl report"
        ):
            page.line(row, size=7)

        # Signature lines at the foot of the page.
        page.y = 0.075
        page.line(
            "Quality engineer: ______________________________   "
            "Date: ________________   Signature: ______________________________",
            size=8,
            mono=False,
        )
        page.gap()
        page.line(
            "Verdict rule, cut list and figures: docs/records.md, 'The reel report'. "
            "Metres are cable metre marks from the reel's 0 mark.",
            size=6.5,
            mono=False,
        )
        try:
            fig.savefig(
                path,
                format="pdf",
                metadata={
                    "Title": f"Irradiation certificate, reel {reel_id}: {v['decision']}",
                    "Subject": verdict_line(report),
                    "Creator": "linectl report",
                },
            )
        except OSError as exc:
            raise LocalError(f"{path}: cannot write the certificate: {exc.strerror}") from None


# --------------------------------------------------------------------------- the list of reels

LIST_SCHEMA = "linectl.reel-list/1"
_LIST_COLUMNS = (
    "reel_id",
    "state",
    "started_at",
    "ended_at",
    "product",
    "recipe_version",
    "operator",
    "planned_length_m",
    "metres_recorded",
    "in_spec",
    "out_of_spec",
    "end_reason",
)


def list_reels(store: RecordStore) -> list[dict[str, Any]]:
    """Every reel in the store, oldest start first: what it is, how it ended, its metres
    in spec and out of spec counted as its report counts them (a metre missing below the
    last stored one is out of spec): a quality engineer's index of the reports."""
    tallies = store.metre_tallies()
    out = []
    for reel in store.reels():
        stored, in_spec, last = tallies.get(reel.reel_id, (0, 0, -1))
        missing = last + 1 - stored
        out.append(
            {
                "reel_id": reel.reel_id,
                "state": reel.state,
                "started_at": reel.started_at,
                "ended_at": reel.ended_at,
                "product": reel.recipe_product,
                "recipe_version": reel.recipe_version,
                "operator": reel.operator,
                "planned_length_m": reel.planned_length_m,
                "metres_recorded": stored,
                "in_spec": in_spec,
                "out_of_spec": stored - in_spec + missing,
                "end_reason": reel.end_reason,
            }
        )
    return out


def write_list_text(
    reels: Sequence[dict[str, Any]], out: TextIO, *, where: str = "the record store"
) -> None:
    """One line per reel; an open reel says so where its end would be."""
    if not reels:
        out.write(f"no reels in {where}\n")
        return
    # The plant-wide list (the historian's) names each reel's line and verdict.
    plant = "line_id" in reels[0]
    head: tuple[str, ...] = (
        "reel", "started", "ended", "recipe", "recorded", "in spec", "out", "operator",
    )  # fmt: skip
    if plant:
        head = ("line", *head, "verdict")
    rows = [
        (
            *((r["line_id"],) if plant else ()),
            r["reel_id"],
            r["started_at"] or "",
            r["ended_at"] or "(open)",
            f"{r['product']} v{r['recipe_version']}",
            str(r["metres_recorded"]),
            str(r["in_spec"]),
            str(r["out_of_spec"]),
            r["operator"],
            *((r["verdict"],) if plant else ()),
        )
        for r in reels
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    for row in (head, *rows):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    for r in reels:
        if r["end_reason"] and r["end_reason"] != "planned length reached":
            out.write(f"{r['reel_id']}: {r['end_reason']}\n")


def write_list_csv(reels: Sequence[dict[str, Any]], out: TextIO, *, plant: bool = False) -> None:
    """One CSV row per reel, the columns of the JSON list (`plant`: the historian's list,
    with each reel's line and verdict)."""
    w = csv.writer(out, lineterminator="\n")
    columns: tuple[str, ...] = _LIST_COLUMNS
    if plant or (reels and "line_id" in reels[0]):
        columns = ("line_id", *columns, "verdict")
    w.writerow(columns)
    for r in reels:
        w.writerow(["" if r[c] is None else r[c] for c in columns])


# --------------------------------------------------------------------------- command line


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `report [REEL] [--db PATH | --config DIR] [--json | --csv | --format F]
    [--cut-list] [--plot FILE] [--pdf FILE]` to an argparse subparsers object; the
    parser's `handler` default is `run_report`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="print the report of one reel (verdict, cut list; text, JSON or CSV), plot "
        "it, write its PDF certificate; without REEL, list the reels",
        description=(
            "Report one reel from the record store: the verdict (RELEASE or HOLD) with the "
            "metres not in spec by cause, the cut list, recipe name, version and hash, "
            "operator, start and end, line speed, counts, alarms, operator actions and the "
            "controller's state changes. --json gives the full report (schema "
            "linectl.reel-report/1, docs/records.md) with every metre's dose; --csv one row "
            "per metre; --cut-list only the cut list (text, CSV or JSON, schema "
            "linectl.cut-list/1); --pdf FILE a one-page certificate. Without REEL: every "
            "reel in the store, one line each (how it ended, metres in and not in spec); "
            "--json and --csv give the list (schema linectl.reel-list/1)."
        ),
    )
    p.add_argument("reel", nargs="?", metavar="REEL", help="reel id (none: list the reels)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--db", type=Path, metavar="PATH", help="record database file")
    where.add_argument(
        "--config",
        type=Path,
        metavar="DIR",
        help="configuration directory whose [records] path names the database "
        "(default: $LINECTL_CONFIG_DIR or ./config)",
    )
    where.add_argument(
        "--historian",
        metavar="DSN",
        help="read the plant historian's PostgreSQL database instead of a line's store "
        "(a libpq connection string, e.g. 'host=db1 dbname=linectl'; docs/historian.md): "
        "every line's reels, with the filters below",
    )
    plant = p.add_argument_group("plant-wide (with --historian)")
    plant.add_argument("--line", metavar="LINE", help="only this line's reels")
    plant.add_argument("--product", metavar="PRODUCT", help="only reels of this recipe product")
    plant.add_argument(
        "--since", metavar="DATE", help="only reels started at or after DATE (ISO 8601)"
    )
    plant.add_argument("--until", metavar="DATE", help="only reels started before DATE (ISO 8601)")
    plant.add_argument("--verdict", choices=(RELEASE, HOLD), help="only reels with this verdict")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the full report as JSON")
    fmt.add_argument("--csv", action="store_true", help="print one CSV row per metre")
    fmt.add_argument(
        "--format",
        choices=("text", "json", "csv"),
        help="output format (the same as --json or --csv; default text)",
    )
    p.add_argument(
        "--cut-list",
        action="store_true",
        help="print only the cut list: the metre ranges to cut out, merged and rounded "
        "outward to whole metre marks",
    )
    p.add_argument("--plot", type=Path, metavar="FILE", help="also write a PNG plot to FILE")
    p.add_argument(
        "--pdf", type=Path, metavar="FILE", help="also write a one-page PDF certificate to FILE"
    )
    p.set_defaults(handler=run_report)
    return p


def _db_path(args: argparse.Namespace) -> Path:
    if args.db is not None:
        return Path(args.db)
    loaded = load_config(args.config if args.config is not None else default_config_dir())
    return loaded.resolve(loaded.line.records.path)


def _historian_reader(dsn: str) -> Any:
    try:
        from linectl.historian.reader import HistorianReader  # noqa: PLC0415 (optional extra)
    except ImportError as exc:
        raise LocalError(
            f"--historian needs linectl's historian extra (pip install 'linectl[historian]'): {exc}"
        ) from None
    return HistorianReader(dsn)


def _iso_arg(text: str | None, option: str) -> str | None:
    if text is None:
        return None
    if _parse_time(text) is None:
        raise LocalError(f"{option} {text!r}: not an ISO 8601 date or time")
    return text


def _historian_list(dsn: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    since = _iso_arg(getattr(args, "since", None), "--since")
    until = _iso_arg(getattr(args, "until", None), "--until")
    with _historian_reader(dsn) as reader:
        rows: list[dict[str, Any]] = reader.reel_list(
            line_id=getattr(args, "line", None),
            product=getattr(args, "product", None),
            since=since,
            until=until,
            verdict=getattr(args, "verdict", None),
        )
    return rows


def _historian_report(dsn: str, reel_id: str, line_id: str | None) -> dict[str, Any]:
    """One reel's report from the historian: the same code as from a line's store."""
    with _historian_reader(dsn) as reader:
        lines: list[str] = reader.lines_of_reel(reel_id)
        if line_id is None:
            if not lines:
                raise LocalError(f"no reel {reel_id!r} in the historian")
            if len(lines) > 1:
                raise LocalError(
                    f"reel {reel_id!r} exists on lines {', '.join(sorted(lines))}: give --line"
                )
            line_id = lines[0]
        elif line_id not in lines:
            raise LocalError(f"no reel {reel_id!r} of line {line_id!r} in the historian")
        return build_report(reader.source(line_id), reel_id)


def _output_format(args: argparse.Namespace) -> str:
    if getattr(args, "json", False):
        return "json"
    if getattr(args, "csv", False):
        return "csv"
    return getattr(args, "format", None) or "text"


def run_report(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `linectl report`; 0 on success (whatever the verdict), 2 (message on stderr)
    for an unknown reel, a missing database, a bad configuration or an unwritable file."""
    out = sys.stdout if out is None else out
    form = _output_format(args)
    pdf = getattr(args, "pdf", None)
    cut_only = getattr(args, "cut_list", False)
    try:
        if args.reel is None:
            for given, option in ((args.plot, "--plot"), (pdf, "--pdf"), (cut_only, "--cut-list")):
                if given:
                    raise LocalError(f"{option} needs a REEL")
        historian = getattr(args, "historian", None)
        if historian is None:
            for option in ("line", "product", "since", "until", "verdict"):
                if getattr(args, option, None) is not None:
                    raise LocalError(f"--{option} needs --historian DSN (a plant-wide list)")
            path = _db_path(args)
            if not path.is_file():
                raise LocalError(f"{path}: no record database there")
            with RecordStore(path) as store:
                if args.reel is None:
                    reels = list_reels(store)
                else:
                    report = build_report(store, args.reel)
        elif args.reel is None:
            reels = _historian_list(historian, args)
        else:
            for option in ("product", "since", "until", "verdict"):
                if getattr(args, option, None) is not None:
                    raise LocalError(f"--{option} filters the list of reels: give no REEL")
            report = _historian_report(historian, args.reel, getattr(args, "line", None))
        if args.reel is None:
            if form == "json":
                json.dump({"schema": LIST_SCHEMA, "reels": reels}, out, indent=2)
                out.write("\n")
            elif form == "csv":
                write_list_csv(reels, out, plant=historian is not None)
            else:
                where = "the record store" if historian is None else "the historian"
                write_list_text(reels, out, where=where)
            return EXIT_OK
        if args.plot is not None:
            write_plot(report, args.plot)
        if pdf is not None:
            write_pdf(report, pdf)
    except LinectlError as exc:
        print(f"linectl: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    data = report["cut_list"] if cut_only else report
    if form == "json":
        json.dump(data, out, indent=2)
        out.write("\n")
    elif form == "csv":
        (write_cut_list_csv if cut_only else write_csv)(data, out)
    else:
        (write_cut_list_text if cut_only else write_text)(data, out)
        if args.plot is not None:
            out.write(f"plot written to {args.plot}\n")
        if pdf is not None:
            out.write(f"certificate written to {pdf}\n")
    return EXIT_OK
