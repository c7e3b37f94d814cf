"""The report a quality engineer signs: verdict, cut list, line speed, CSV precision,
operator actions apart from state changes, and the PDF certificate (rendered with
poppler's pdftoppm and read back with pdftotext)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from linectl.core.ledger import MetreRecord, Verdict
from linectl.report import (
    CUT_LIST_SCHEMA,
    add_report_parser,
    build_report,
    merge_outward,
    run_report,
    verdict_line,
    write_text,
)
from linectl.store import RecordStore, ReelInfo

T0 = datetime(2025, 3, 4, 6, 0, 0, tzinfo=UTC)
HASH = "ab12" * 16
RECIPE_JSON = json.dumps(
    {"product": "PV1-F 1x6", "version": "4", "min_dose_kgy": 105.0, "target_dose_kgy": 120.0,
     "max_dose_kgy": 140.0}
)  # fmt: skip


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def rec(
    i: int, verdict: Verdict = Verdict.IN_SPEC, dose: float = 120.0, *causes: str
) -> MetreRecord:
    return MetreRecord(i, dose, dose - 1.0, dose + 1.0, verdict, causes)


def open_reel(store: RecordStore, reel_id: str, length_m: float | None = 30.0) -> None:
    store.open_reel(
        ReelInfo(reel_id, "line1", "PV1-F 1x6", "4", HASH, RECIPE_JSON, "carol", length_m, at(0))
    )


def transition(store: RecordStore, reel_id: str, t: float, old: str, new: str) -> None:
    detail = {"from": old, "to": new, "cause": f"{old} to {new}"}
    store.audit(at(t), "controller", "transition", detail, True, reel_id=reel_id)


def mixed_reel(store: RecordStore, reel_id: str = "Q1") -> None:
    """30 m planned and reached. Metres: 0-2 in spec, 3-5 under-dose, 6 in spec, 7
    over-dose, 8-9 unproven (gap), 10-19 in spec, 20-21 unproven (controller down), 22
    energy, 23 missing (never stored), 24-28 in spec, 29 missing (the tail)."""
    open_reel(store, reel_id)
    recs = [rec(i) for i in range(3)]
    recs += [rec(i, Verdict.UNDER_DOSE, 100.0, "under_dose") for i in (3, 4, 5)]
    recs += [rec(6), rec(7, Verdict.OVER_DOSE, 150.0, "over_dose")]
    recs += [rec(i, Verdict.UNPROVEN, 120.0, "unproven", "gap") for i in (8, 9)]
    recs += [rec(i) for i in range(10, 20)]
    store.add_metres(reel_id, recs, at(10))
    store.mark_unproven(reel_id, 20, 21, "controller down", at(20))
    store.add_metres(reel_id, [rec(22, Verdict.ENERGY, 119.0, "energy")], at(25))
    store.add_metres(reel_id, [rec(i) for i in range(24, 29)], at(30))
    store.raise_alarm("energy", "energy out of tolerance: 1.31 MeV", at(24), reel_id=reel_id)
    store.audit(at(0), "carol", "start_reel", {"reel_id": reel_id}, True, reel_id=reel_id)
    transition(store, reel_id, 0.0, "ready", "starting")
    transition(store, reel_id, 2.0, "starting", "running")
    store.audit(at(12), "dave", "set_speed", {"speed_m_min": 400}, False, reason="too fast",
                reel_id=reel_id)  # fmt: skip
    transition(store, reel_id, 31.0, "running", "stopping")
    transition(store, reel_id, 33.0, "stopping", "idle")
    store.close_reel(reel_id, at(33), "planned length reached")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "records.sqlite"
    with RecordStore(path) as s:
        mixed_reel(s)
    return path


def report_of(db: Path, reel_id: str = "Q1") -> dict:
    with RecordStore(db) as s:
        return build_report(s, reel_id)


def cli(db: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", *argv, "--db", str(db)])


def run(db: Path, *argv: str) -> str:
    out = io.StringIO()
    assert run_report(cli(db, *argv), out) == 0
    return out.getvalue()


# ------------------------------------------------------------------------- verdict


def test_verdict_counts_and_ranges_by_cause(db: Path) -> None:
    v = report_of(db)["verdict"]
    assert v["decision"] == "HOLD"
    assert (v["product_from_m"], v["product_to_m"]) == (0, 30)
    assert (v["in_spec_m"], v["not_in_spec_m"]) == (19, 11)
    assert v["reasons"] == ["11 of 30 m not in spec"]
    assert [(g["cause"], g["why"], g["metres"], g["ranges"]) for g in v["by_cause"]] == [
        ("under_dose", "", 3, [[3, 6]]),
        ("over_dose", "", 1, [[7, 8]]),
        ("unproven", "gap", 2, [[8, 10]]),
        ("unproven", "controller down", 2, [[20, 22]]),
        ("energy_out_of_tolerance", "", 1, [[22, 23]]),
        ("missing", "no record", 2, [[23, 24], [29, 30]]),  # a hole and the lost tail
    ]
    assert sum(g["metres"] for g in v["by_cause"]) == v["not_in_spec_m"]


def test_verdict_line_names_decision_causes_and_recipe_identity(db: Path) -> None:
    rep = report_of(db)
    line = verdict_line(rep)
    assert line.startswith("VERDICT HOLD  reel Q1: 11 of 30 m not in spec")
    assert f"recipe PV1-F 1x6 version 4 sha256 {HASH}" in line
    out = io.StringIO()
    write_text(rep, out)
    text = out.getvalue()
    assert text.splitlines()[0] == line
    assert "under-dose                                        3  3-6 m" in text
    assert "unproven (controller down)                        2  20-22 m" in text
    assert "missing (no record)                               2  23-24, 29-30 m" in text
    # The summary counts up to the last record; the lost tail is said where they differ.
    assert "missing 1, and 1 missing after the last record)" in text


def test_release_only_when_every_metre_of_the_finished_reel_is_in_spec(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with RecordStore(path) as s:
        open_reel(s, "OK", 10.5)  # a part metre at the end is never recorded
        s.add_metres("OK", [rec(i) for i in range(10)], at(5))
        s.close_reel("OK", at(9), "planned length reached")
        open_reel(s, "SHORT", 10.0)  # every recorded metre in spec, but ended short
        s.add_metres("SHORT", [rec(i) for i in range(6)], at(5))
        s.close_reel("SHORT", at(9), "ended by op-1: cable cut")
        open_reel(s, "OPEN", 10.0)
        s.add_metres("OPEN", [rec(i) for i in range(4)], at(5))
        open_reel(s, "EMPTY", 10.0)
        s.close_reel("EMPTY", at(9), "ended by op-1: wrong cable")
        reps = {r: build_report(s, r) for r in ("OK", "SHORT", "OPEN", "EMPTY")}
    ok = reps["OK"]["verdict"]
    assert (ok["decision"], ok["reasons"], ok["product_to_m"]) == ("RELEASE", [], 10)
    assert reps["OK"]["cut_list"]["cuts"] == []
    assert verdict_line(reps["OK"]).startswith(
        "VERDICT RELEASE  reel OK: all 10 m (0-10 m) in spec"
    )
    short = reps["SHORT"]["verdict"]
    assert short["decision"] == "HOLD"
    assert short["ended_short"]
    assert short["reasons"] == [
        "ended short (ended by op-1: cable cut): 6 m recorded of 10 m planned"
    ]
    assert (short["product_to_m"], short["not_in_spec_m"]) == (6, 0)
    opened = reps["OPEN"]
    assert opened["verdict"]["decision"] == "HOLD"
    assert opened["verdict"]["open"]
    assert opened["cut_list"]["provisional"] is True
    assert reps["EMPTY"]["verdict"]["reasons"][-1] == "no metre recorded"


# ------------------------------------------------------------------------- cut list


def test_merge_outward_rounds_to_whole_metres_and_merges() -> None:
    assert merge_outward([(3, 4), (4, 5), (5, 6), (7, 8)]) == [(3, 6), (7, 8)]
    assert merge_outward([(7, 8), (3, 4)]) == [(3, 4), (7, 8)]  # any order
    assert merge_outward([(2.4, 2.6)]) == [(2, 3)]  # outward, never inward
    assert merge_outward([(1.2, 3.0), (2.5, 4.1), (9.9, 10.0)]) == [(1, 5), (9, 10)]
    assert merge_outward([(5, 5), (6, 5.5)]) == []  # empty intervals cut nothing
    assert merge_outward([]) == []


def test_cut_list_merges_across_causes_in_cable_metre_marks(db: Path) -> None:
    cut = report_of(db)["cut_list"]
    assert cut["schema"] == CUT_LIST_SCHEMA
    assert [(c["from_m"], c["to_m"], c["verdicts"]) for c in cut["cuts"]] == [
        (3, 6, ["under_dose"]),
        (7, 10, ["over_dose", "unproven"]),  # 7 over-dose and 8-9 unproven: one cut
        (20, 24, ["unproven", "energy_out_of_tolerance", "missing"]),
        (29, 30, ["missing"]),
    ]
    assert cut["cut_m"] == 3 + 3 + 4 + 1
    assert cut["cuts"][2]["causes"] == ["controller down", "energy", "no record"]


def test_cut_list_outputs_text_csv_json(db: Path) -> None:
    rows = list(csv.reader(io.StringIO(run(db, "Q1", "--cut-list", "--format", "csv"))))
    assert rows[0] == ["reel_id", "from_m", "to_m", "length_m", "verdicts", "causes"]
    assert rows[1:3] == [
        ["Q1", "3", "6", "3", "under_dose", "under_dose"],
        ["Q1", "7", "10", "3", "over_dose;unproven", "over_dose;unproven;gap"],
    ]
    assert len(rows) == 1 + 4
    as_json = json.loads(run(db, "Q1", "--cut-list", "--json"))
    assert as_json == report_of(db)["cut_list"]
    assert json.loads(run(db, "Q1", "--cut-list", "--format", "json")) == as_json
    text = run(db, "Q1", "--cut-list")
    assert text.startswith("cut list of reel Q1: 4 cuts, 11 m in all; product 0-30 m")
    assert "         3        6         3  under-dose (under_dose)" in text


# ------------------------------------------------------------------------- line speed


def test_mean_speed_is_the_running_speed_not_the_reel_average(tmp_path: Path) -> None:
    """80 m/min (0.75 s a metre at the last pass), a stop of 5 minutes in the middle, the
    start sequence and the tail beyond the reel: the running speed is 80 m/min."""
    path = tmp_path / "s.sqlite"
    with RecordStore(path) as s:
        open_reel(s, "S", 100.0)
        transition(s, "S", 0.0, "ready", "starting")
        transition(s, "S", 7.0, "starting", "running")
        # Metres 0-49 leave the last pass from t = 80 s (94 m of tail first), some in
        # one batch (a burst after a data gap: the same record time).
        for i in range(50):
            s.add_metres("S", [rec(i)], at(80.0 + 0.75 * i if i != 31 else 80.0 + 0.75 * 32))
        transition(s, "S", 117.6, "running", "stopping")
        s.add_metres("S", [rec(50, Verdict.UNDER_DOSE, 90.0, "under_dose")], at(121.0))
        transition(s, "S", 127.0, "stopping", "idle")
        transition(s, "S", 420.0, "idle", "ready")
        transition(s, "S", 421.0, "ready", "starting")
        transition(s, "S", 428.0, "starting", "running")
        for i in range(51, 100):
            s.add_metres("S", [rec(i)], at(430.0 + 0.75 * (i - 51)))
        transition(s, "S", 520.0, "running", "stopping")
        transition(s, "S", 531.0, "stopping", "idle")
        s.close_reel("S", at(531.0), "planned length reached")
        summary = build_report(s, "S")["summary"]
    assert summary["speed_m_min_running"] == pytest.approx(80.0, abs=0.01)
    assert summary["speed_timed_m"] == 49 + 48  # the pairs across the stop are left out
    assert summary["running_s"] == pytest.approx((117.6 - 7.0) + (520.0 - 428.0))
    # The old figure, kept in /1 as documented: metres per minute of elapsed reel time.
    assert summary["speed_m_min_mean"] == pytest.approx(100 / (531.0 / 60.0), abs=0.001)
    assert summary["speed_m_min_mean"] < 12.0


def test_mean_speed_without_recorded_state_changes_uses_every_running_pair(
    tmp_path: Path,
) -> None:
    """No transitions recorded (a store made by hand): every pair of consecutive metres
    counts, but one slower than half the recipe's minimum speed (5 m/min: more than 24 s
    for a metre) is a stop and is left out."""
    recipe = json.dumps({**json.loads(RECIPE_JSON), "speed_min_m_min": 5.0})
    path = tmp_path / "n.sqlite"
    with RecordStore(path) as s:
        s.open_reel(ReelInfo("N", "line1", "PV1-F 1x6", "4", HASH, recipe, "carol", 20.0, at(0)))
        for i in range(20):
            t = 100.0 + 1.5 * i + (300.0 if i >= 10 else 0.0)  # 40 m/min, 5 min stop
            s.add_metres("N", [rec(i)], at(t))
        s.close_reel("N", at(500.0), "planned length reached")
        summary = build_report(s, "N")["summary"]
    assert summary["speed_m_min_running"] == pytest.approx(40.0)
    assert summary["speed_timed_m"] == 18
    assert summary["running_s"] is None


def test_a_controller_killed_while_running_does_not_count_its_downtime(tmp_path: Path) -> None:
    recipe = json.dumps({**json.loads(RECIPE_JSON), "speed_min_m_min": 5.0})
    path = tmp_path / "k.sqlite"
    with RecordStore(path) as s:
        s.open_reel(ReelInfo("K", "line1", "PV1-F 1x6", "4", HASH, recipe, "carol", 20.0, at(0)))
        transition(s, "K", 1.0, "starting", "running")
        for i in range(10):
            s.add_metres("K", [rec(i)], at(10.0 + 0.75 * i))
        # SIGKILL: no running -> stopping recorded; the restarted controller's first
        # transition comes from offline.
        transition(s, "K", 200.0, "offline", "idle")
        transition(s, "K", 210.0, "starting", "running")
        for i in range(10, 20):
            s.add_metres("K", [rec(i)], at(220.0 + 0.75 * (i - 10)))
        transition(s, "K", 240.0, "running", "stopping")
        s.close_reel("K", at(250.0), "planned length reached")
        summary = build_report(s, "K")["summary"]
    assert summary["speed_m_min_running"] == pytest.approx(80.0)
    assert summary["speed_timed_m"] == 18


# ------------------------------------------------------------------------- CSV, events


def test_csv_has_the_reel_and_two_decimals_rounded_safe_side(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with RecordStore(path) as s:
        open_reel(s, "C-1", 3.0)
        s.add_metres(
            "C-1",
            [
                MetreRecord(0, 120.123456789012, 104.999999999, 140.000000001, Verdict.IN_SPEC),
                MetreRecord(1, 0.29, 0.29, 0.29, Verdict.UNDER_DOSE, ("under_dose",)),
                MetreRecord(2, 119.995, 118.5, 121.25, Verdict.IN_SPEC),
            ],
            at(5),
        )
    rows = list(csv.DictReader(io.StringIO(run(path, "C-1", "--csv"))))
    assert [r["reel_id"] for r in rows] == ["C-1"] * 3
    assert (rows[0]["dose_kgy"], rows[0]["min_dose_kgy"], rows[0]["max_dose_kgy"]) == (
        "120.12",
        "104.99",  # down: never shown at the limit it is below
        "140.01",  # up: never shown at the limit it is above
    )
    assert (rows[1]["dose_kgy"], rows[1]["min_dose_kgy"], rows[1]["max_dose_kgy"]) == (
        "0.29",
        "0.29",
        "0.29",
    )  # no float noise (0.29 * 100 is 28.999999999999996)
    assert (rows[2]["dose_kgy"], rows[2]["min_dose_kgy"], rows[2]["max_dose_kgy"]) == (
        "120.00",
        "118.50",
        "121.25",
    )
    assert run(path, "C-1", "--format", "csv") == run(path, "C-1", "--csv")


def test_operator_actions_are_listed_apart_from_state_changes(db: Path) -> None:
    rep = report_of(db)
    kinds = [(e["actor"], e["kind"]) for e in rep["events"]]
    assert ("carol", "operator") in kinds
    assert ("dave", "operator") in kinds
    assert all(k == "state_change" for a, k in kinds if a == "controller")
    assert (rep["summary"]["operator_actions"], rep["summary"]["state_changes"]) == (2, 4)
    text = run(db, "Q1")
    actions = text.split("\noperator actions: 2\n")[1].split("\n\n")[0].splitlines()
    assert len(actions) == 2
    assert "carol: start_reel" in actions[0]
    assert "dave: set_speed" in actions[1]
    assert "refused: too fast" in actions[1]
    assert not any("transition" in a or "->" in a for a in actions)
    changes = text.split("\nstate changes (controller): 4\n")[1].split("\n\n")[0].splitlines()
    assert changes[1].endswith("starting -> running: starting to running")


# ------------------------------------------------------------------------- PDF


def _poppler() -> tuple[str, str]:
    pdftoppm, pdftotext = shutil.which("pdftoppm"), shutil.which("pdftotext")
    if pdftoppm is None or pdftotext is None:
        pytest.skip(
            "pdftoppm/pdftotext (poppler-utils) not installed: apt-get install poppler-utils"
        )
    return pdftoppm, pdftotext


def test_pdf_certificate_renders_one_page_with_the_report_text(db: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pdftoppm, pdftotext = _poppler()
    pdf = tmp_path / "Q1.pdf"
    out = run(db, "Q1", "--pdf", str(pdf))
    assert out.rstrip().endswith(f"certificate written to {pdf}")
    assert pdf.read_bytes().startswith(b"%PDF-")

    subprocess.run([pdftoppm, "-r", "40", "-png", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page*.png"))
    assert len(pages) == 1, pages  # one page
    assert pages[0].read_bytes().startswith(b"\x89PNG")
    assert pages[0].stat().st_size > 5_000

    text = subprocess.run(
        [pdftotext, "-layout", str(pdf), "-"], check=True, capture_output=True, text=True
    ).stdout
    flat = " ".join(text.split())
    assert "Irradiation certificate" in flat
    assert "reel Q1" in flat
    assert "HOLD" in flat
    assert "11 of 30 m not in spec" in flat
    assert "recipe PV1-F 1x6 version 4" in flat
    assert f"recipe sha256 {HASH}" in flat
    assert "operator carol" in flat
    # The cut list, as the text report has it.
    for row in ("3 6 3 under-dose", "7 10 3 over-dose, unproven", "29 30 1 missing"):
        assert row in flat, row
    assert "4 cuts, 11 m in all" in flat
    assert "unproven (controller down) 2 m 20-22 m" in flat
    assert "energy out of tolerance: 1.31 MeV" in flat  # the alarm
    assert "dave: set_speed" in flat
    assert "start_reel" in flat
    assert "starting -> running" not in flat  # state changes are counted, not listed
    assert "Quality engineer:" in flat
    assert "dose (kGy)" in flat  # the plot's axis


def test_pdf_of_a_long_list_stays_one_page_and_says_what_it_left_out(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pdftoppm, pdftotext = _poppler()
    path = tmp_path / "long.sqlite"
    with RecordStore(path) as s:
        open_reel(s, "L", 200.0)
        recs = [
            rec(i, Verdict.UNDER_DOSE, 100.0, "under_dose") if i % 5 == 0 else rec(i)
            for i in range(200)
        ]
        s.add_metres("L", recs, at(10))
        for k in range(12):
            s.raise_alarm(f"kind{k}", f"alarm number {k}", at(k), reel_id="L")
            s.audit(at(k), "op-1", "ack_alarm", {"kind": f"kind{k}"}, True, reel_id="L")
        s.close_reel("L", at(60), "planned length reached")
    pdf = tmp_path / "L.pdf"
    run(path, "L", "--pdf", str(pdf))
    subprocess.run([pdftoppm, "-r", "30", "-png", str(pdf), str(tmp_path / "p")], check=True)
    assert len(list(tmp_path.glob("p*.png"))) == 1
    text = " ".join(
        subprocess.run(
            [pdftotext, str(pdf), "-"], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    assert "40 cuts, 40 m in all" in text
    assert "... and 27 more: linectl report L --cut-list" in text
    assert "... and 7 more: linectl report" in text  # alarms
    assert "Quality engineer:" in text


def test_options_that_need_a_reel(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for extra in (("--pdf", "x.pdf"), ("--cut-list",)):
        assert run_report(cli(db, *extra), io.StringIO()) == 2
        assert f"{extra[0]} needs a REEL" in capsys.readouterr().err


def test_json_report_carries_verdict_and_cut_list(db: Path) -> None:
    rep = json.loads(run(db, "Q1", "--format", "json"))
    assert rep["schema"] == "linectl.reel-report/1"
    assert rep["verdict"]["decision"] == "HOLD"
    assert rep["cut_list"]["cuts"][0] == {
        "from_m": 3, "to_m": 6, "length_m": 3, "verdicts": ["under_dose"],
        "causes": ["under_dose"],
    }  # fmt: skip
    assert rep == json.loads(run(db, "Q1", "--json"))


def test_a_pdf_that_cannot_be_written_exits_2(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "no such dir" / "Q1.pdf"
    assert run_report(cli(db, "Q1", "--pdf", str(target)), io.StringIO()) == 2
    assert f"{target}: cannot write the certificate" in capsys.readouterr().err
