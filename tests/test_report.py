"""The reel report: exact counts and ranges from a synthetic reel; JSON, CSV, text, PNG."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from linectl.core.ledger import MetreRecord, Verdict
from linectl.report import (
    LIST_SCHEMA,
    REPORT_SCHEMA,
    add_report_parser,
    build_report,
    list_reels,
    out_of_spec_ranges,
    run_report,
)
from linectl.store import RecordStore, ReelInfo

T0 = "2025-01-10T08:00:00+00:00"
T_END = "2025-01-10T08:01:00+00:00"  # 60 s for the whole reel
RECIPE_JSON = json.dumps(
    {"product": "PV", "version": "3", "min_dose_kgy": 105.0, "target_dose_kgy": 120.0,
     "max_dose_kgy": 140.0}
)  # fmt: skip


def m(i: int, verdict: Verdict, dose: float, causes: tuple[str, ...] = ()) -> MetreRecord:
    return MetreRecord(i, dose, dose - 2.0, dose + 2.0, verdict, causes)


def fill(store: RecordStore, reel_id: str = "R7") -> None:
    """Metres 0..44:
    0-9 in spec, 10-14 under, 15-19 in spec, 20-22 over, 23-29 unproven (marked after a
    restart), 30-34 energy, 35-39 in spec, 40-41 never recorded, 42-44 in spec."""
    store.open_reel(
        ReelInfo(reel_id, "line1", "PV1-F 1x6", "3", "cd" * 32, RECIPE_JSON, "alice", 45.0, T0)
    )
    recs = [m(i, Verdict.IN_SPEC, 120.0) for i in range(10)]
    recs += [m(i, Verdict.UNDER_DOSE, 100.0, ("under_dose",)) for i in range(10, 15)]
    recs += [m(i, Verdict.IN_SPEC, 121.0) for i in range(15, 20)]
    recs += [m(20, Verdict.OVER_DOSE, 150.0, ("over_dose",))]
    recs += [m(21, Verdict.OVER_DOSE, 160.0, ("standstill", "over_dose"))]
    recs += [m(22, Verdict.OVER_DOSE, 145.0, ("over_dose",))]
    store.add_metres(reel_id, recs, "2025-01-10T08:00:20+00:00")
    store.mark_unproven(reel_id, 23, 29, "controller restart", "2025-01-10T08:00:30+00:00")
    recs = [m(i, Verdict.ENERGY, 119.0, ("energy",)) for i in range(30, 35)]
    recs += [m(i, Verdict.IN_SPEC, 119.0) for i in range(35, 40)]
    recs += [m(i, Verdict.IN_SPEC, 119.0) for i in range(42, 45)]
    store.add_metres(reel_id, recs, "2025-01-10T08:00:50+00:00")
    store.raise_alarm("energy", "energy out of tolerance", T0, reel_id=reel_id)
    store.audit(T0, "alice", "start_reel", {"reel_id": reel_id}, True, reel_id=reel_id)
    store.close_reel(reel_id, T_END, "planned length reached")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "records.sqlite"
    with RecordStore(path) as s:
        fill(s)
    return path


@pytest.fixture
def store(db: Path) -> Iterator[RecordStore]:
    with RecordStore(db) as s:
        yield s


def test_summary_and_ranges_exact(store: RecordStore) -> None:
    rep = build_report(store, "R7")
    assert rep["schema"] == REPORT_SCHEMA
    assert rep["reel"]["operator"] == "alice"
    assert rep["reel"]["state"] == "closed"
    assert rep["recipe"] == {
        "product": "PV1-F 1x6",
        "version": "3",
        "hash": "cd" * 32,
        "min_dose_kgy": 105.0,
        "target_dose_kgy": 120.0,
        "max_dose_kgy": 140.0,
    }
    s = rep["summary"]
    assert s["metres_recorded"] == 43
    assert s["in_spec"] == 10 + 5 + 5 + 3
    assert s["out_of_spec_by_verdict"] == {
        "under_dose": 5,
        "over_dose": 3,
        "unproven": 7,
        "energy_out_of_tolerance": 5,
        "missing": 2,
    }
    assert s["out_of_spec"] == 22
    assert s["in_spec"] + s["out_of_spec"] == 45  # every metre 0..44 accounted once
    assert s["metres_by_cause"]["standstill"] == 1
    assert s["metres_by_cause"]["controller restart"] == 7
    # Dose stats over proven metres (unproven ones have no dose here).
    assert s["dose_stats_metres"] == 36
    assert s["dose_min_kgy"] == 98.0
    assert s["dose_max_kgy"] == 162.0
    assert s["duration_s"] == 60.0
    assert s["speed_m_min_mean"] == 43.0
    assert rep["ranges"] == [
        {"first": 10, "last": 14, "length_m": 5, "verdict": "under_dose", "causes": ["under_dose"]},
        {
            "first": 20,
            "last": 22,
            "length_m": 3,
            "verdict": "over_dose",
            "causes": ["over_dose", "standstill"],
        },
        {
            "first": 23,
            "last": 29,
            "length_m": 7,
            "verdict": "unproven",
            "causes": ["controller restart"],
        },
        {
            "first": 30,
            "last": 34,
            "length_m": 5,
            "verdict": "energy_out_of_tolerance",
            "causes": ["energy"],
        },
        {"first": 40, "last": 41, "length_m": 2, "verdict": "missing", "causes": ["no record"]},
    ]
    assert len(rep["metres"]) == 43
    assert rep["metres"][23]["dose_kgy"] is None
    assert len(rep["alarms"]) == 1
    assert rep["events"][0]["action"] == "start_reel"


def test_ranges_split_on_verdict_change_and_edges(store: RecordStore) -> None:
    assert out_of_spec_ranges([]) == []
    metres = store.metres("R7")
    # A reel that starts out of spec and ends out of spec keeps both edge ranges.
    only = [x for x in metres if 10 <= x.index <= 22]
    ranges = out_of_spec_ranges(only)
    assert [(r["first"], r["last"], r["verdict"]) for r in ranges] == [
        (0, 9, "missing"),
        (10, 14, "under_dose"),
        (20, 22, "over_dose"),
    ]


def args(db: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", "R7", "--db", str(db), *extra])


def test_json_round_trip(db: Path) -> None:
    out = io.StringIO()
    assert run_report(args(db, "--json"), out) == 0
    rep = json.loads(out.getvalue())
    assert rep["schema"] == "linectl.reel-report/1"
    with RecordStore(db) as s:
        assert rep == json.loads(json.dumps(build_report(s, "R7")))


def test_csv_one_row_per_metre(db: Path) -> None:
    out = io.StringIO()
    assert run_report(args(db, "--csv"), out) == 0
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == [
        "reel_id", "index", "dose_kgy", "min_dose_kgy", "max_dose_kgy", "verdict", "causes"
    ]  # fmt: skip
    assert len(rows) == 1 + 43
    assert rows[1] == ["R7", "0", "120.00", "118.00", "122.00", "in_spec", ""]
    assert rows[22] == [
        "R7", "21", "160.00", "158.00", "162.00", "over_dose", "standstill;over_dose"
    ]  # fmt: skip
    assert rows[24][2:] == ["", "", "", "unproven", "controller restart"]


def test_text(db: Path) -> None:
    out = io.StringIO()
    assert run_report(args(db), out) == 0
    text = out.getvalue()
    assert "reel R7" in text
    assert "43 recorded, 23 in spec, 22 out of spec" in text
    assert "under_dose" in text
    assert "energy out of tolerance" in text


def test_unknown_reel_and_missing_db(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = args(db)
    a.reel = "nope"
    assert run_report(a, io.StringIO()) == 2
    assert "no reel 'nope'" in capsys.readouterr().err
    assert run_report(args(tmp_path / "absent.sqlite"), io.StringIO()) == 2
    assert "no record database" in capsys.readouterr().err
    assert not (tmp_path / "absent.sqlite").exists()


def test_db_from_config(db: Path, tmp_path: Path, config_dir: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(config_dir, conf)
    target = conf / "records" / "linectl.sqlite"  # line.toml's [records] path
    target.parent.mkdir(exist_ok=True)
    shutil.copy(db, target)
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["report", "R7", "--config", str(conf), "--json"])
    out = io.StringIO()
    assert run_report(a, out) == 0
    assert json.loads(out.getvalue())["reel"]["reel_id"] == "R7"


def test_plot_png(db: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "r7.png"
    out = io.StringIO()
    assert run_report(args(db, "--plot", str(png)), out) == 0
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000


def _more_reels(db: Path) -> None:
    """Beside R7: R8 ended short by an operator, R9 open with metres, R10 open without."""
    with RecordStore(db) as s:
        for reel_id, t in (("R8", "09"), ("R9", "10"), ("R10", "11")):
            s.open_reel(
                ReelInfo(reel_id, "line1", "PV1-F 1x6", "3", "cd" * 32, RECIPE_JSON, "bob",
                         100.0, f"2025-01-10T{t}:00:00+00:00")
            )  # fmt: skip
        s.add_metres("R8", [m(i, Verdict.IN_SPEC, 120.0) for i in range(5)], T_END)
        s.add_metres("R8", [m(5, Verdict.UNPROVEN, 60.0, ("incomplete",))], T_END)
        s.close_reel("R8", "2025-01-10T09:30:00+00:00", "ended by op-1: cable cut")
        s.add_metres("R9", [m(i, Verdict.IN_SPEC, 120.0) for i in (0, 1, 3)], T_END)


def test_list_of_reels_counts_as_the_reports_do(db: Path) -> None:
    _more_reels(db)
    with RecordStore(db) as s:
        reels = list_reels(s)
        reports = {r: build_report(s, r)["summary"] for r in ("R7", "R8", "R9", "R10")}
    assert [r["reel_id"] for r in reels] == ["R7", "R8", "R9", "R10"]
    for r in reels:  # the same counts as each reel's own report, missing metres included
        rep = reports[r["reel_id"]]
        assert (r["metres_recorded"], r["in_spec"], r["out_of_spec"]) == (
            rep["metres_recorded"],
            rep["in_spec"],
            rep["out_of_spec"],
        ), r["reel_id"]
    assert (reels[0]["metres_recorded"], reels[0]["in_spec"], reels[0]["out_of_spec"]) == (
        43,
        23,
        22,
    )
    assert reels[2]["out_of_spec"] == 1  # metre 2 of R9 is missing
    assert reels[1]["end_reason"] == "ended by op-1: cable cut"
    assert (reels[3]["state"], reels[3]["metres_recorded"], reels[3]["ended_at"]) == (
        "open",
        0,
        None,
    )


def _list_args(db: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", "--db", str(db), *extra])


def test_report_without_a_reel_lists_them(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _more_reels(db)
    out = io.StringIO()
    assert run_report(_list_args(db), out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "reel", "started", "ended", "recipe", "recorded", "in", "spec", "out", "operator"
    ]  # fmt: skip
    assert lines[1].split()[0] == "R7"
    assert lines[1].split()[-4:] == ["43", "23", "22", "alice"]
    assert "(open)" in lines[3]
    assert lines[-1] == "R8: ended by op-1: cable cut"

    out = io.StringIO()
    assert run_report(_list_args(db, "--json"), out) == 0
    listed = json.loads(out.getvalue())
    assert listed["schema"] == LIST_SCHEMA
    with RecordStore(db) as s:
        assert listed["reels"] == list_reels(s)

    out = io.StringIO()
    assert run_report(_list_args(db, "--csv"), out) == 0
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["reel_id"], r["out_of_spec"], r["ended_at"]) for r in rows] == [
        ("R7", "22", T_END),
        ("R8", "1", "2025-01-10T09:30:00+00:00"),
        ("R9", "1", ""),
        ("R10", "0", ""),
    ]

    assert run_report(_list_args(db, "--plot", "x.png"), io.StringIO()) == 2
    assert "--plot needs a REEL" in capsys.readouterr().err


def test_an_empty_store_lists_no_reels(tmp_path: Path) -> None:
    db = tmp_path / "empty.sqlite"
    RecordStore(db).close()
    out = io.StringIO()
    assert run_report(_list_args(db), out) == 0
    assert out.getvalue() == "no reels in the record store\n"


def test_text_says_none_rather_than_leaving_a_section_out(db: Path) -> None:
    _more_reels(db)
    a = args(db)
    a.reel = "R9"
    out = io.StringIO()
    assert run_report(a, out) == 0
    text = out.getvalue()
    assert "\nalarms: none\n" in text
    assert "\noperator actions: none\n" in text
