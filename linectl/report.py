"""The reel report: what the records say about one reel (process.md, Records).

`build_report` returns a JSON-able dict whose form is a published interface
(docs/records.md, schema id `linectl.reel-report/1`); the text, CSV and PNG outputs are
views of that dict. An out-of-spec metre is never shown as in spec: a metre index with no
record at all (a hole below the last stored metre) is reported as `missing`, out of spec.

Command line (wired into `linectl report` by linectl.cli):
    linectl report REEL [--db PATH | --config DIR] [--json | --csv] [--plot FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from linectl.config import default_config_dir, load_config
from linectl.core.ledger import Verdict
from linectl.errors import EXIT_BAD_INPUT, EXIT_OK, LinectlError, LocalError
from linectl.store import RecordStore, StoredMetre

REPORT_SCHEMA = "linectl.reel-report/1"
MISSING = "missing"  # verdict of a metre index below the last stored one with no record

# Every verdict that is not in spec, in report order (the keys of out_of_spec_by_verdict).
OUT_OF_SPEC_VERDICTS: tuple[str, ...] = (
    Verdict.UNDER_DOSE.value,
    Verdict.OVER_DOSE.value,
    Verdict.UNPROVEN.value,
    Verdict.ENERGY.value,
    MISSING,
)

CSV_COLUMNS = ("index", "dose_kgy", "min_dose_kgy", "max_dose_kgy", "verdict", "causes")


# --------------------------------------------------------------------------- building


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


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


def _union_causes(groups: Sequence[Sequence[str]]) -> list[str]:
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


def build_report(store: RecordStore, reel_id: str) -> dict[str, Any]:
    """The report of one reel as a JSON-able dict (docs/records.md); LocalError if unknown.

    Dose statistics (min/mean/max) cover the metres with a proven dose: every verdict but
    unproven. An unproven metre's dose is partial (or absent), so it would only mislead;
    the unproven metres are counted and listed as ranges instead.
    """
    reel = store.reel(reel_id)
    metres = store.metres(reel_id)
    limits = _recipe_limits(reel.recipe_json)
    ranges = out_of_spec_ranges(metres)

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
    speed = (
        len(metres) / (duration_s / 60.0)
        if duration_s is not None and duration_s > 0 and metres
        else None
    )

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
        "speed_m_min_mean": _round(speed, 3),
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
        "summary": summary,
        "ranges": ranges,
        "alarms": [
            {
                "id": a.id,
                "kind": a.kind,
                "message": a.message,
                "raised_at": a.raised_at,
                "acknowledged_at": a.acknowledged_at,
                "acknowledged_by": a.acknowledged_by,
                "cleared_at": a.cleared_at,
            }
            for a in store.alarms(reel_id)
        ],
        "events": [
            {
                "t": e.t,
                "actor": e.actor,
                "action": e.action,
                "detail": e.detail,
                "accepted": e.accepted,
                "reason": e.reason,
            }
            for e in store.events(reel_id)
        ],
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


def write_text(report: dict[str, Any], out: TextIO) -> None:
    """Human summary: reel, recipe, counts, out-of-spec ranges, alarms, operator actions."""
    reel, recipe, s = report["reel"], report["recipe"], report["summary"]
    w = out.write
    w(f"reel {reel['reel_id']}  line {reel['line_id']}  operator {reel['operator']}\n")
    w(
        f"  recipe   {recipe['product']}, version {recipe['version']}, "
        f"sha256 {recipe['hash'][:12]}  limits {_fmt(recipe['min_dose_kgy'], 'g')}.."
        f"{_fmt(recipe['max_dose_kgy'], 'g')} kGy, target {_fmt(recipe['target_dose_kgy'], 'g')}\n"
    )
    w(
        f"  run      {reel['started_at']} .. {reel['ended_at'] or '(open)'}"
        f"{'  (' + reel['end_reason'] + ')' if reel['end_reason'] else ''}, "
        f"{_fmt(s['speed_m_min_mean'])} m/min mean (approx.)\n"
    )
    w(
        f"  metres   {s['metres_recorded']} recorded, {s['in_spec']} in spec, "
        f"{s['out_of_spec']} out of spec"
    )
    parts = [f"{k} {v}" for k, v in s["out_of_spec_by_verdict"].items() if v]
    w(f" ({', '.join(parts)})\n" if parts else "\n")
    w(
        f"  dose     min {_fmt(s['dose_min_kgy'])}  mean {_fmt(s['dose_mean_kgy'])}  "
        f"max {_fmt(s['dose_max_kgy'])} kGy over {s['dose_stats_metres']} proven metres\n"
    )
    ranges = report["ranges"]
    w(f"\nout-of-spec ranges: {len(ranges) or 'none'}\n")
    if ranges:
        w(f"  {'first m':>8} {'last m':>8} {'length m':>9}  {'verdict':<24} causes\n")
        for r in ranges:
            w(
                f"  {r['first']:>8} {r['last']:>8} {r['length_m']:>9}  {r['verdict']:<24} "
                f"{','.join(r['causes'])}\n"
            )
    # "none" said, as for the ranges: a section left out could be a section lost.
    w(f"\nalarms: {len(report['alarms']) or 'none'}\n")
    if report["alarms"]:
        for a in report["alarms"]:
            ack = f"ack {a['acknowledged_at']} by {a['acknowledged_by']}"
            w(
                f"  {a['raised_at']}  {a['kind']}: {a['message']}  "
                f"[{ack if a['acknowledged_at'] else 'not acknowledged'}; "
                f"{'cleared ' + a['cleared_at'] if a['cleared_at'] else 'not cleared'}]\n"
            )
    w(f"\noperator actions: {len(report['events']) or 'none'}\n")
    if report["events"]:
        for e in report["events"]:
            verdict = "accepted" if e["accepted"] else f"refused: {e['reason']}"
            w(f"  {e['t']}  {e['actor']}: {e['action']} {json.dumps(e['detail'])} ({verdict})\n")
    w("\n(per-metre doses: --csv or --json)\n")


def write_csv(report: dict[str, Any], out: TextIO) -> None:
    """One row per stored metre: index, dose, min, max, verdict, causes (';'-separated)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for m in report["metres"]:
        writer.writerow(
            [
                m["index"],
                "" if m["dose_kgy"] is None else repr(m["dose_kgy"]),
                "" if m["min_dose_kgy"] is None else repr(m["min_dose_kgy"]),
                "" if m["max_dose_kgy"] is None else repr(m["max_dose_kgy"]),
                m["verdict"],
                ";".join(m["causes"]),
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


def write_plot(report: dict[str, Any], path: Path) -> None:
    """PNG: dose per metre against position, recipe limits, out-of-spec ranges shaded.

    matplotlib is imported here so that the rest of linectl works without it."""
    try:
        import matplotlib as mpl  # noqa: PLC0415 - optional dependency (extra "demo")

        mpl.use("Agg")  # no display: render to a file only
        import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the backend
        from matplotlib.patches import Patch  # noqa: PLC0415 - same
    except ImportError as exc:
        raise LocalError(f"--plot needs matplotlib (pip install 'linectl[demo]'): {exc}") from None

    reel, recipe, s = report["reel"], report["recipe"], report["summary"]
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

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110, layout="constrained")
    try:
        handles: list[Any] = []
        for r in report["ranges"]:
            colour = _VERDICT_COLOURS.get(r["verdict"], "#E69F00")
            ax.axvspan(r["first"], r["last"] + 1, color=colour, alpha=0.22, linewidth=0, zorder=0)
            # An opaque tick along the bottom with an edge line: a single bad metre on a
            # long reel stays visible even when its span is narrower than a pixel.
            ax.axvspan(
                r["first"],
                r["last"] + 1,
                ymin=0.0,
                ymax=0.025,
                facecolor=colour,
                edgecolor=colour,
                linewidth=1.0,
                zorder=3,
            )
        shown = [v for v in _VERDICT_COLOURS if any(r["verdict"] == v for r in report["ranges"])]
        handles += [
            Patch(color=_VERDICT_COLOURS[v], alpha=0.35, label=v.replace("_", " ")) for v in shown
        ]
        band = ax.fill_between(
            x, lo, hi, color="#009E73", alpha=0.25, linewidth=0, label="min..max within metre"
        )
        (line,) = ax.plot(x, mean, color="#009E73", linewidth=1.2, label="mean dose per metre")
        handles = [line, band, *handles]
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
        # Y range: the recipe window with margin, stretched to the data (a burn spike
        # must stay visible, but should not flatten everything else).
        finite = [v for v in (*lo, *hi) if math.isfinite(v)]
        bounds = [v for v in (recipe.get("min_dose_kgy"), recipe.get("max_dose_kgy")) if v]
        if finite or bounds:
            y_lo = min([*finite, *bounds])
            y_hi = max([*finite, *bounds])
            pad = 0.08 * (y_hi - y_lo or 1.0)
            ax.set_ylim(max(0.0, y_lo - pad), y_hi + pad)
        n_m = (max(m["index"] for m in metres) + 1) if metres else 1
        ax.set_xlim(0, max(n_m, 1))
        ax.set_xlabel("cable position from reel start (m)")
        ax.set_ylabel("dose (kGy)")
        ax.set_title(
            f"Reel {reel['reel_id']}: {recipe['product']} (recipe version {recipe['version']})\n"
            f"{s['metres_recorded']} m recorded, {s['in_spec']} in spec, "
            f"{s['out_of_spec']} out of spec",
            fontsize=11,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
        try:
            fig.savefig(path, format="png")
        except OSError as exc:
            raise LocalError(f"{path}: cannot write the plot: {exc.strerror}") from None
    finally:
        plt.close(fig)


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


def write_list_text(reels: Sequence[dict[str, Any]], out: TextIO) -> None:
    """One line per reel; an open reel says so where its end would be."""
    if not reels:
        out.write("no reels in the record store\n")
        return
    head = ("reel", "started", "ended", "recipe", "recorded", "in spec", "out", "operator")
    rows = [
        (
            r["reel_id"],
            r["started_at"] or "",
            r["ended_at"] or "(open)",
            f"{r['product']} v{r['recipe_version']}",
            str(r["metres_recorded"]),
            str(r["in_spec"]),
            str(r["out_of_spec"]),
            r["operator"],
        )
        for r in reels
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    for row in (head, *rows):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    for r in reels:
        if r["end_reason"] and r["end_reason"] != "planned length reached":
            out.write(f"{r['reel_id']}: {r['end_reason']}\n")


def write_list_csv(reels: Sequence[dict[str, Any]], out: TextIO) -> None:
    """One CSV row per reel, the columns of the JSON list."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(_LIST_COLUMNS)
    for r in reels:
        w.writerow(["" if r[c] is None else r[c] for c in _LIST_COLUMNS])


# --------------------------------------------------------------------------- command line


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `report REEL [--db PATH | --config DIR] [--json | --csv] [--plot FILE]` to an
    argparse subparsers object; the parser's `handler` default is `run_report`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="print the report of one reel (text, JSON or CSV) and optionally plot it; "
        "without REEL, list the reels",
        description=(
            "Report one reel from the record store: recipe, operator, start and end, counts "
            "in and out of spec, every out-of-spec range with its cause, alarms and operator "
            "actions. --json gives the full report (schema linectl.reel-report/1, "
            "docs/records.md) with every metre's dose; --csv one row per metre. Without "
            "REEL: every reel in the store, one line each (how it ended, metres in and not "
            "in spec); --json and --csv give the list (schema linectl.reel-list/1)."
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
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the full report as JSON")
    fmt.add_argument("--csv", action="store_true", help="print one CSV row per metre")
    p.add_argument("--plot", type=Path, metavar="FILE", help="also write a PNG plot to FILE")
    p.set_defaults(handler=run_report)
    return p


def _db_path(args: argparse.Namespace) -> Path:
    if args.db is not None:
        return Path(args.db)
    loaded = load_config(args.config if args.config is not None else default_config_dir())
    return loaded.resolve(loaded.line.records.path)


def run_report(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `linectl report`; 0 on success, 2 (message on stderr) for an unknown reel, a
    missing database or a bad configuration."""
    out = sys.stdout if out is None else out
    try:
        path = _db_path(args)
        if not path.is_file():
            raise LocalError(f"{path}: no record database there")
        if args.reel is None and args.plot is not None:
            raise LocalError("--plot needs a REEL")
        with RecordStore(path) as store:
            if args.reel is None:
                reels = list_reels(store)
            else:
                report = build_report(store, args.reel)
        if args.reel is None:
            if args.json:
                json.dump({"schema": LIST_SCHEMA, "reels": reels}, out, indent=2)
                out.write("\n")
            elif args.csv:
                write_list_csv(reels, out)
            else:
                write_list_text(reels, out)
            return EXIT_OK
        if args.plot is not None:
            write_plot(report, args.plot)
    except LinectlError as exc:
        print(f"linectl: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        json.dump(report, out, indent=2)
        out.write("\n")
    elif args.csv:
        write_csv(report, out)
    else:
        write_text(report, out)
        if args.plot is not None:
            out.write(f"plot written to {args.plot}\n")
    return EXIT_OK
