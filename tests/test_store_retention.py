"""What the plant historian needs of the line's store (docs/records.md): the store's
identity (schema 4), the reel start record's content, outbox ranges, outbox pruning that
waits for a historian's cursor, and the line-side retention of confirmed reels; and the
`[records] historians` / `retention_days` configuration."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from linectl.config import LineConfig, load_config
from linectl.core.ledger import MetreRecord, Verdict
from linectl.errors import ConfigError, LocalError
from linectl.store import SCHEMA_VERSION, PruneResult, RecordStore, ReelInfo

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"

# Reels of January 2025; the retention cut-off is a time between them.
T0 = "2025-01-10T08:00:00.000+00:00"
T1 = "2025-01-10T09:00:00.000+00:00"
T2 = "2025-01-11T09:00:00.000+00:00"
T3 = "2025-01-20T09:00:00.000+00:00"
CUT = "2025-01-15T00:00:00.000+00:00"


def reel(reel_id: str, started_at: str = T0) -> ReelInfo:
    return ReelInfo(
        reel_id=reel_id,
        line_id="line1",
        recipe_product="PV1-F 1x6",
        recipe_version="1",
        recipe_hash="ab" * 32,
        recipe_json='{"target_dose_kgy": 120.0}',
        operator="alice",
        planned_length_m=3.0,
        started_at=started_at,
        start={"l0_m": 1.5, "nested": {"q0_uc": 2}},
    )


def metres(n: int) -> list[MetreRecord]:
    return [MetreRecord(i, 120.0, 119.0, 121.0, Verdict.IN_SPEC, ()) for i in range(n)]


def finished_reel(store: RecordStore, reel_id: str, ended_at: str, *, alarm: bool = True) -> int:
    """A reel with metres, an audit event, controller state and (with `alarm`) an alarm
    cleared and acknowledged, closed at `ended_at`; return its end record's seq."""
    store.open_reel(reel(reel_id))
    store.add_metres(reel_id, metres(3), T1, state={"ledger": {"next_metre": 3}})
    store.audit(T1, "alice", "start_reel", {"reel_id": reel_id}, True, reel_id=reel_id)
    if alarm:
        alarm_id = store.raise_alarm("vacuum", "vacuum fault", T1, reel_id=reel_id)
        store.clear_alarm(alarm_id, T1)
        store.ack_alarm(alarm_id, "alice", T1)
    store.close_reel(reel_id, ended_at, "planned length reached")
    return store.outbox_last_seq()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RecordStore]:
    with RecordStore(tmp_path / "r.sqlite") as s:
        yield s


# ---------------------------------------------------------------------- identity, schema 4


def test_a_new_store_has_an_identity_that_never_changes(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with RecordStore(path) as s:
        assert s.schema_version() == SCHEMA_VERSION == 4
        first = s.store_id
    assert uuid.UUID(first).version == 4
    with RecordStore(path) as s:
        assert s.store_id == first  # made once, when the file was created
    with RecordStore(tmp_path / "other.sqlite") as other:
        assert other.store_id != first


def _as_version_3(path: Path) -> None:
    """Take a store back to what linectl wrote at schema version 3."""
    db = sqlite3.connect(path)
    db.execute("DROP TABLE store_meta")
    db.execute("DROP TABLE pruned_reels")
    db.execute("ALTER TABLE reels DROP COLUMN end_seq")
    db.execute("UPDATE schema_version SET version = 3")
    db.commit()
    db.close()


def test_a_version_3_store_gets_an_identity_and_its_end_seqs_at_the_upgrade(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.sqlite"
    with RecordStore(path) as s:
        end_old = finished_reel(s, "OLD", T1)
        end_kept = finished_reel(s, "KEPT", T2)
        s.open_reel(reel("OPEN"))
        # OLD's end record is pruned from the outbox (as an old store's would be).
        s.advance_outbox_cursor("mqtt", end_kept)
        with s._lock:
            s._db.execute("DELETE FROM outbox WHERE seq <= ?", (end_old,))
    _as_version_3(path)
    with RecordStore(path) as s:
        assert s.schema_version() == 4
        assert uuid.UUID(s.store_id).version == 4
        ends = dict(s._query("SELECT reel_id, end_seq FROM reels"))
        assert ends == {"OLD": None, "KEPT": end_kept, "OPEN": None}
        # OLD's end seq is not known: it is never pruned (nothing proves it confirmed).
        result = s.prune_confirmed(T3, s.outbox_last_seq())
        assert result.reels == ("KEPT",)
        assert [r.reel_id for r in s.reels()] == ["OLD", "OPEN"]
        assert s.integrity_check() == "ok"


def test_the_reel_start_record_carries_what_the_historian_needs(store: RecordStore) -> None:
    info = reel("R1")
    store.open_reel(info)
    (row,) = store.outbox_after(0)
    stored = store.reel("R1")
    with store._lock:
        start_json = store._db.execute("SELECT start_json FROM reels").fetchone()[0]
    assert row.data["recipe_json"] == stored.recipe_json == info.recipe_json
    assert row.data["start"] == json.loads(start_json) == {"l0_m": 1.5, "nested": {"q0_uc": 2}}
    assert row.data["started_at"] == T0
    assert row.t == T0


# ---------------------------------------------------------------------- outbox


def test_outbox_range_and_first_seq(store: RecordStore) -> None:
    assert store.outbox_first_seq() == 1  # empty: newest (0) + 1
    assert store.outbox_range(1, 10) == []
    for i in range(6):
        store.audit(T1, "alice", "x", {"i": i}, True)
    assert [r.seq for r in store.outbox_range(2, 4)] == [2, 3, 4]
    assert [r.seq for r in store.outbox_range(3, 100, limit=2)] == [3, 4]
    assert store.outbox_first_seq() == 1
    with store._lock:
        store._db.execute("DELETE FROM outbox WHERE seq IN (1, 2, 4)")
    assert [r.seq for r in store.outbox_range(1, 6)] == [3, 5, 6]
    assert store.outbox_first_seq() == 3
    with store._lock:
        store._db.execute("DELETE FROM outbox")
    assert store.outbox_first_seq() == 7  # nothing held: newest + 1


def test_outbox_pruning_waits_for_the_historian(store: RecordStore) -> None:
    for i in range(10):
        store.audit(T1, "alice", "x", {"i": i}, True)
    store.advance_outbox_cursor("mqtt", 10)
    store.advance_outbox_cursor("historian:plant", 0)  # as the bridge makes it at its start
    assert store.prune_outbox(keep=0) == 0  # the historian has confirmed nothing
    store.advance_outbox_cursor("historian:plant", 4)
    assert store.prune_outbox(keep=0) == 4
    assert store.outbox_first_seq() == 5
    assert store.outbox_consumers() == {"historian:plant": 4, "mqtt": 10}
    assert store.remove_outbox_cursor("historian:plant")
    assert not store.remove_outbox_cursor("historian:plant")
    assert store.prune_outbox(keep=0) == 6


# ---------------------------------------------------------------------- retention


def test_retention_deletes_only_confirmed_old_closed_reels(store: RecordStore) -> None:
    end_a = finished_reel(store, "A", T1)  # old, confirmed: deleted
    end_b = finished_reel(store, "B", T2)  # old, not confirmed
    finished_reel(store, "C", T3)  # confirmed, ended after the cut-off
    store.open_reel(reel("OPEN", T1))  # open: never
    store.add_metres("OPEN", metres(2), T1)
    # Records not bound to a reel are never deleted.
    free_alarm = store.raise_alarm("estop", "e-stop", T1)
    store.audit(T1, "op", "select_recipe", {"recipe": "x"}, True)
    everything = store.outbox_last_seq()

    assert store.prune_confirmed(CUT, end_a - 1) == PruneResult()  # A's end not confirmed
    result = store.prune_confirmed(CUT, end_a)
    assert result.reels == ("A",)
    assert (result.metres, result.events, result.alarms, result.reel_states) == (3, 1, 1, 1)
    assert [r.reel_id for r in store.reels()] == ["B", "C", "OPEN"]
    assert store.metres("A") == []
    assert store.events("A") == []
    assert store.alarms("A") == []
    assert store.load_state("A", "ledger") is None
    assert store.pruned_reels() == [("A", T1, 3)]
    # The reel id stays taken, and asking for the reel says where it went.
    assert store.reel_exists("A")
    with pytest.raises(LocalError, match="exists already"):
        store.open_reel(reel("A"))
    with pytest.raises(LocalError, match="historian"):
        store.reel("A")

    # Everything confirmed: B goes too; C ended after the cut-off, OPEN is open.
    result = store.prune_confirmed(CUT, everything)
    assert result.reels == ("B",)
    assert store.prune_confirmed(CUT, everything) == PruneResult()  # nothing left due
    assert [r.reel_id for r in store.reels()] == ["C", "OPEN"]
    assert store.metre_count("OPEN") == 2
    assert [a.id for a in store.alarms() if a.reel_id is None] == [free_alarm]
    assert [e.action for e in store.events() if e.reel_id is None] == ["select_recipe"]
    assert end_b < everything
    # The outbox is the outbox's business: retention deletes none of its rows.
    assert store.outbox_last_seq() == everything
    assert len(store.outbox_after(0, limit=10_000)) == everything
    assert store.integrity_check() == "ok"


def test_retention_keeps_a_reel_with_an_alarm_still_up_or_a_record_not_confirmed(
    store: RecordStore,
) -> None:
    store.open_reel(reel("UP"))
    alarm_up = store.raise_alarm("vacuum", "vacuum fault", T1, reel_id="UP")
    store.close_reel("UP", T1, "planned length reached")
    store.open_reel(reel("LATE"))
    alarm_late = store.raise_alarm("vacuum", "vacuum fault", T1, reel_id="LATE")
    store.clear_alarm(alarm_late, T1)
    store.close_reel("LATE", T1, "planned length reached")
    confirmed = store.outbox_last_seq()
    # Acknowledged after the reel's end: its record is not confirmed yet.
    store.ack_alarm(alarm_late, "alice", T2)

    result = store.prune_confirmed(CUT, confirmed)
    assert result.reels == ()
    assert dict(result.kept) == {
        "UP": f"its alarm {alarm_up} is not cleared and acknowledged yet",
        "LATE": f"its record seq {confirmed + 1} is not confirmed yet",
    }
    # Once the acknowledgement is confirmed, LATE goes; UP waits for its alarm.
    result = store.prune_confirmed(CUT, confirmed + 1)
    assert result.reels == ("LATE",)
    store.clear_alarm(alarm_up, T2)
    store.ack_alarm(alarm_up, "alice", T2)
    assert store.prune_confirmed(CUT, store.outbox_last_seq()).reels == ("UP",)


def test_retention_goes_in_steps_of_at_most_limit_reels(store: RecordStore) -> None:
    for i in range(5):
        finished_reel(store, f"R{i}", T1, alarm=False)
    confirmed = store.outbox_last_seq()
    first = store.prune_confirmed(CUT, confirmed, limit=2)
    assert first.reels == ("R0", "R1")
    assert first.resume_after is not None
    rest = store.prune_confirmed(CUT, confirmed, limit=3, after_end_seq=first.resume_after)
    assert (rest.reels, rest.resume_after) == (("R2", "R3", "R4"), None)
    assert (first + rest).metres == 15


def test_retention_steps_past_reels_it_keeps(store: RecordStore) -> None:
    # Two reels kept (an alarm still up) then one due: paging goes past the kept ones.
    for reel_id in ("K1", "K2"):
        store.open_reel(reel(reel_id))
        store.raise_alarm("vacuum", "vacuum fault", T1, reel_id=reel_id)
        store.close_reel(reel_id, T1, "planned length reached")
    finished_reel(store, "D", T1, alarm=False)
    confirmed = store.outbox_last_seq()
    results = [store.prune_confirmed(CUT, confirmed, limit=1)]
    while (after := results[-1].resume_after) is not None:
        results.append(store.prune_confirmed(CUT, confirmed, limit=1, after_end_seq=after))
    assert [r.reels for r in results] == [(), (), ("D",)]
    assert [reel_id for r in results for reel_id, _why in r.kept] == ["K1", "K2"]


def test_retention_refuses_times_without_an_offset(store: RecordStore) -> None:
    with pytest.raises(LocalError, match="no UTC offset"):
        store.prune_confirmed("2025-01-15T00:00:00", 10)
    with pytest.raises(LocalError, match="negative"):
        store.prune_confirmed(CUT, -1)


# ---------------------------------------------------------------------- configuration


def _line(*, mqtt: bool = True, **records: object) -> LineConfig:
    data = {
        "line_id": "line1",
        "accelerator": {"host": "127.0.0.1", "port": 5020, "register_map": "a.toml"},
        "conveyor": {"host": "127.0.0.1", "port": 5021, "register_map": "c.toml"},
        "records": records,
        "mqtt": {"enabled": mqtt},
    }
    return LineConfig.model_validate(data)


def test_config_takes_historians_and_retention() -> None:
    line = _line(historians=["plant", "plant-b.2"], retention_days=90)
    assert line.records.historians == ["plant", "plant-b.2"]
    assert line.records.retention_days == 90.0
    assert _line().records.historians == []
    assert _line().records.retention_days is None
    cfg = load_config(
        CONFIG_DIR,
        environ={
            "LINECTL_RECORDS__HISTORIANS": '["plant"]',
            "LINECTL_RECORDS__RETENTION_DAYS": "30",
            "LINECTL_MQTT__ENABLED": "true",
        },
    )
    assert (cfg.line.records.historians, cfg.line.records.retention_days) == (["plant"], 30.0)


def test_config_refuses_historians_without_mqtt() -> None:
    # The historian's replays and confirmations come over MQTT: without it the setting
    # would do nothing, silently.
    with pytest.raises(ValueError, match=r"records.historians needs mqtt.enabled = true"):
        _line(mqtt=False, historians=["plant"])
    with pytest.raises(ConfigError, match=r"records.historians needs mqtt.enabled"):
        load_config(CONFIG_DIR, environ={"LINECTL_RECORDS__HISTORIANS": '["plant"]'})


def test_config_refuses_retention_without_a_historian() -> None:
    with pytest.raises(ValueError, match=r"retention_days needs a historian.*historians"):
        _line(retention_days=30)
    with pytest.raises(ConfigError, match=r"records.*retention_days.*historians"):
        load_config(CONFIG_DIR, environ={"LINECTL_RECORDS__RETENTION_DAYS": "30"})
    with pytest.raises(ValueError, match="greater than 0"):
        _line(historians=["plant"], retention_days=0)


@pytest.mark.parametrize(
    ("hid", "why"),
    [
        ("plant/a", "not one MQTT topic level"),
        ("plant+", "not one MQTT topic level"),
        ("#", "not one MQTT topic level"),
        ("", "not one MQTT topic level"),
        ("pl\x00ant", "not one MQTT topic level"),
        ("pl ant", "not one MQTT topic level"),
        ("x" * 65, "not one MQTT topic level"),
    ],
)
def test_config_refuses_bad_historian_ids(hid: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        _line(historians=[hid])


def test_config_refuses_a_historian_named_twice() -> None:
    with pytest.raises(ValueError, match="'plant' is named twice"):
        _line(historians=["plant", "plant"])
