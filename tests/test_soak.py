"""A short soak (bench/soak.py): the daemon with its MQTT bridge over Modbus against the
simulators and a real mosquitto, reels back to back, a fault every few seconds (every
kind once: arcs, link loss, PLC restarts, slow answers, exception storms, latched PLC
faults, broker restarts).

Checked: no metre recorded in spec whose true dose is outside the limits, every record
of the store's outbox received by a subscriber, no growth of tasks, file descriptors or
sockets from the first half of the run (after a warm-up) to the second, nothing logged
at ERROR by linectl and no exception left unhandled. The benchmark runs the same for an
hour and prints the figures.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest
from broker import mosquitto_binary

from linectl.store import RecordStore

ROOT = Path(__file__).resolve().parents[1]


def _load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    return _load_soak()


def test_growth_figures_see_a_leak_and_ignore_a_flat_line(soak: ModuleType) -> None:
    # The growth check itself: a resource that grows by one per sample is caught, a flat
    # one with noise is not, and the warm-up is left out.
    samples = [
        {
            "t_s": float(t),
            "rss_kb": 50_000 + (20_000 if t < 10 else 0) + 100 * t,
            "tasks": 17 + t // 2,
            "fds": 23 + (t % 3),
            "sockets": 10,
            "threads": 7,
        }
        for t in range(60)
    ]
    g = soak.growth(samples, warmup_s=10.0)
    assert g["samples"] == 50
    assert g["tasks"]["growth"] >= 10
    assert g["tasks"]["slope_per_h"] == pytest.approx(1800.0, rel=0.05)
    assert g["fds"]["growth"] == 0
    assert g["sockets"]["growth"] == 0
    # The warm-up's 20 MB are not counted; 100 kB per second is.
    assert g["rss_mb"]["first_max"] < 55
    assert g["rss_mb"]["slope_per_h"] == pytest.approx(100 * 3600 / 1024, rel=0.01)
    met = {row["name"]: row["met"] for row in soak.goals({"growth": g})}
    assert not met["tasks p90 growth (2nd vs 1st half)"]
    assert met["fds p90 growth (2nd vs 1st half)"]
    # A sample that catches a burst (publishes in flight) is no leak: flat tasks with one
    # spike of 12 in the second half (as seen in CI: max 37 against 25, medians 23).
    burst = [dict(x, tasks=23 + (12 if x["t_s"] == 50.0 else 0)) for x in samples]
    b = soak.growth(burst, warmup_s=10.0)["tasks"]
    assert b["second_max"] - b["first_max"] == 12
    assert b["growth"] == 0


def test_a_new_store_opened_by_several_connections_at_once(tmp_path: Path) -> None:
    # Found by the soak: the service's writer and the MQTT bridge open the record store
    # together at the first start, and SQLite answered the one that lost the race to
    # switch the new file to WAL "database is locked" at once (2 % of starts).
    for i in range(150):
        path = tmp_path / f"r{i}.sqlite"
        errors: list[BaseException] = []

        def open_close(p: Path = path, errs: list[BaseException] = errors) -> None:
            try:
                RecordStore(p).close()
            except BaseException as exc:
                errs.append(exc)

        threads = [threading.Thread(target=open_close) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], f"start {i}: {errors}"
        with RecordStore(path) as store:
            assert store.schema_version() >= 1


@pytest.mark.slow
@pytest.mark.skipif(
    mosquitto_binary() is None,
    reason="needs mosquitto: the embedded broker keeps no session across a restart",
)
def test_short_soak(
    soak: ModuleType,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.WARNING)
    out = tmp_path / "soak.json"
    # 80 s with a fault every 6 s (+/- 50 %): a dozen faults, each of a different kind (the
    # scheduler takes every kind once first, in an order the seed fixes: with seed 1 the
    # broker and PLC restarts come among the first six), and time between them for the
    # line to run.
    argv = ["--minutes", "1.35", "--fault-every-s", "6", "--reel-m", "15", "--sample-s", "1"]
    argv += ["--seed", "1", "--json", str(out), "--workdir", str(tmp_path / "run")]
    assert soak.main(argv) == 0
    res = json.loads(out.read_text())

    kinds = set(res["fault_counts"])
    assert len(kinds) >= 10, kinds
    assert {"broker_restart", "acc_restart", "cnv_restart"} <= kinds
    assert not [f for f in res["faults"] if "error" in f], "a fault could not be injected"

    # Zero false accepts, over enough metres that it means something.
    reels = res["reels"]
    compared = sum(r["compared"] for r in reels)
    assert compared >= 10, f"only {compared} metres had a dose to compare"
    false_accepts = [(r["reel_id"], f) for r in reels for f in r["false_accepts"]]
    assert false_accepts == []
    assert all(r["contiguous"] for r in reels)
    assert sum(r["finished"] for r in reels) >= 1

    # Every record reached the subscriber through the broker restarts.
    rec = res["records"]
    assert rec["outbox_last_seq"] > 0
    assert rec["missing"] == 0, f"missing seqs {rec['missing_first']}"
    assert rec["bridge_cursor"] == rec["outbox_last_seq"]
    assert res["bridge_end"]["connects"] >= 2, "the broker restart was not seen"

    # No growth between the two halves after the warm-up. Each sample is a snapshot at a
    # random moment: a record batch in flight (one task per unacknowledged publish), a
    # PLC server's task for a client that is reconnecting, a socket closing after a link
    # loss or a broker restart come and go, so the halves are compared by their 90th
    # percentiles (soak.growth), and soak.TOLERANCE allows a few more; a leak of one per
    # fault or per reel passes them within a run this long.
    g = res["growth"]
    assert "error" not in g
    for key in ("tasks", "fds", "sockets"):
        assert g[key]["growth"] <= soak.TOLERANCE[key], (key, g[key], res["task_kinds"])

    # Nothing unhandled, nothing logged at ERROR by linectl (alarms are warnings).
    assert res["unhandled"] == []
    errors = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("linectl")
    ]
    assert errors == []
    assert soak.own_errors(res) == []

    printed = capsys.readouterr().out
    assert "false accepts (metres)" in printed
    assert "records missing at the subscriber" in printed
