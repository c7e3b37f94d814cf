"""The HMI feed's snapshot and deltas (pure): a client's copy, built from a snapshot and
the deltas that follow, is always the server's state, however many updates it missed."""

from __future__ import annotations

import copy
import random
from typing import Any

from linectl.core.ledger import MetreRecord, Verdict
from linectl.web.feed import TREND_WINDOW_MS, ClientView, Feed


def metre(i: int, dose: float = 120.0, verdict: Verdict = Verdict.IN_SPEC) -> MetreRecord:
    return MetreRecord(i, dose, dose - 1, dose + 1, verdict)


def apply(copy_: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    """What the page does with a message (docs/hmi.md)."""
    if msg["type"] == "snapshot":
        return copy.deepcopy(msg["state"])
    if msg["type"] == "delta":
        for key, value in msg.get("set", {}).items():
            copy_[key] = copy.deepcopy(value)
        append = msg.get("append", {})
        copy_["dose"]["points"].extend(copy.deepcopy(append.get("dose", [])))
        copy_["trend"].extend(copy.deepcopy(append.get("trend", [])))
    return copy_


def server_state(feed: Feed) -> dict[str, Any]:
    return feed.snapshot(ClientView())["state"]


def test_a_snapshot_then_deltas_keep_the_clients_copy_equal() -> None:
    rng = random.Random(7)
    feed = Feed()
    feed.update({"t_ms": 0, "status": {"state": "IDLE"}, "alarms": []})
    view = ClientView()
    mine = apply({}, feed.snapshot(view))
    seq = view.seq
    index = 0
    t_ms = 0
    for step in range(300):
        t_ms += 100
        for _ in range(rng.randrange(0, 4)):  # updates the client may or may not see
            what = rng.random()
            if what < 0.3:
                feed.update(
                    {
                        "t_ms": t_ms,
                        "status": {"state": rng.choice(["IDLE", "READY", "RUNNING"])},
                        "alarms": [{"kind": "vacuum"}] if rng.random() < 0.3 else [],
                    }
                )
            elif what < 0.5:
                feed.start_dose(f"R{step // 100}")
            elif what < 0.8:
                feed.add_metres(feed.dose_reel or "", [metre(index)])
                index += 1
            else:
                feed.add_trend(t_ms, rng.random() * 40, rng.random() * 80)
        if rng.random() < 0.5:  # the client is sent something only now and then
            msg = feed.delta(view)
            if msg is None:
                continue
            assert msg["base"] == seq
            seq = msg["seq"]
            mine = apply(mine, msg)
            theirs = server_state(feed)
            assert {k: v for k, v in mine.items() if k != "t_ms"} == {
                k: v for k, v in theirs.items() if k != "t_ms"
            }


def test_nothing_changed_is_no_message_and_the_clock_alone_is_no_change() -> None:
    feed = Feed()
    feed.update({"t_ms": 1, "status": {"state": "IDLE"}})
    view = ClientView()
    feed.snapshot(view)
    assert feed.delta(view) is None
    assert not feed.update({"t_ms": 2, "status": {"state": "IDLE"}})
    assert feed.delta(view) is None


def test_updates_between_two_deltas_are_coalesced_into_the_latest() -> None:
    feed = Feed()
    feed.update({"t_ms": 0, "status": {"state": "IDLE"}})
    view = ClientView()
    feed.snapshot(view)
    for state in ("READY", "STARTING", "RUNNING"):
        feed.update({"t_ms": 0, "status": {"state": state}})
    msg = feed.delta(view)
    assert msg is not None
    assert msg["set"]["status"] == {"state": "RUNNING"}
    assert feed.delta(view) is None


def test_metres_are_appended_and_a_new_reel_replaces_the_series() -> None:
    feed = Feed()
    feed.update({"t_ms": 0})
    feed.start_dose("R1")
    view = ClientView()
    feed.snapshot(view)
    feed.add_metres("R1", [metre(0), metre(1)])
    feed.add_metres("R2", [metre(7)])  # not the chart's reel: ignored
    msg = feed.delta(view)
    assert msg is not None
    assert [p[0] for p in msg["append"]["dose"]] == [0, 1]
    assert "dose" not in msg.get("set", {})
    feed.start_dose("R2")
    feed.add_metres("R2", [metre(0, 90.0, Verdict.UNDER_DOSE)])
    msg = feed.delta(view)
    assert msg is not None
    assert msg["set"]["dose"] == {"reel_id": "R2", "points": [[0, 90.0, 89.0, 91.0, "under_dose"]]}


def test_stored_metres_merged_later_rebuild_the_series_in_order() -> None:
    # A reel resumed after a restart: metres from before arrive after newer ones.
    feed = Feed()
    feed.update({"t_ms": 0})
    feed.start_dose("R1")
    view = ClientView()
    feed.snapshot(view)
    feed.add_metres("R1", [metre(5), metre(6)])
    feed.delta(view)
    feed.add_metres("R1", [metre(i) for i in range(5)])
    msg = feed.delta(view)
    assert msg is not None
    assert [p[0] for p in msg["set"]["dose"]["points"]] == list(range(7))


def test_the_trend_keeps_ten_minutes() -> None:
    feed = Feed()
    for t in range(0, 2 * TREND_WINDOW_MS, 500):
        feed.add_trend(t, 10.0, 50.0)
    rows = list(feed.trend)
    assert rows[-1][0] - rows[0][0] <= TREND_WINDOW_MS
    assert len(rows) == TREND_WINDOW_MS // 500 + 1


def test_a_lagging_client_gets_only_the_trend_rows_it_has_not_had() -> None:
    feed = Feed()
    feed.update({"t_ms": 0})
    view = ClientView()
    feed.snapshot(view)
    feed.add_trend(500, 1.0, 2.0)
    feed.add_trend(1000, 1.5, 2.5)
    msg = feed.delta(view)
    assert msg is not None
    assert msg["append"]["trend"] == [[500, 1.0, 2.0], [1000, 1.5, 2.5]]
    feed.add_trend(1500, 2.0, 3.0)
    msg = feed.delta(view)
    assert msg is not None
    assert msg["append"]["trend"] == [[1500, 2.0, 3.0]]
