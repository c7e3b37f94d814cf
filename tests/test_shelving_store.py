"""Alarm shelves in the record store: kept, ended, one in force per kind, the schema
upgrade that adds them, and a shelf that survives a restart of linectl (and one that
expired meanwhile, ended and audited at the first cycle)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from linectl.config import LoadedConfig, Recipe
from linectl.core.line import (
    CycleInput,
    Line,
    RaiseAlarm,
    ShelveAlarm,
    UnshelveAlarm,
)
from linectl.service import LineService, apply_effect, restore_alarm_board
from linectl.store import SCHEMA_VERSION, AlarmShelf, RecordStore, ReelInfo

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
W0 = "2026-01-01T00:00:00.000+00:00"
W1 = "2026-01-01T00:01:00.000+00:00"
W2 = "2026-01-01T00:02:00.000+00:00"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RecordStore]:
    with RecordStore(tmp_path / "r.sqlite") as s:
        yield s


@pytest.fixture
def recipe(cfg: LoadedConfig) -> Recipe:
    return cfg.load_recipe("pv-1x6-en50618")


def test_a_shelf_is_kept_in_force_then_ended(store: RecordStore) -> None:
    sid = store.shelve_alarm(
        "vacuum", T0_MS + 3_600_000, "op-1", "pump swap", W0, message="vacuum", raised_ms=T0_MS
    )
    assert store.alarm_shelves() == [
        AlarmShelf(sid, "vacuum", "vacuum", T0_MS, W0, "op-1", "pump swap", T0_MS + 3_600_000)
    ]
    assert store.alarm_shelves()[0].in_force
    assert store.unshelve_alarm("vacuum", "op-2", W1)
    assert not store.unshelve_alarm("vacuum", "op-2", W1)  # nothing in force any more
    assert store.alarm_shelves() == []
    (ended,) = store.alarm_shelves(in_force=False)
    assert (ended.ended_at, ended.ended_by, ended.expired, ended.in_force) == (
        W1,
        "op-2",
        False,
        False,
    )
    store.shelve_alarm("vacuum", T0_MS + 5, "op-1", "again", W1)
    assert store.unshelve_alarm("vacuum", "controller", W2, expired=True)
    assert [(s.reason, s.ended_by, s.expired) for s in store.alarm_shelves(in_force=False)] == [
        ("pump swap", "op-2", False),
        ("again", "controller", True),
    ]


def test_one_shelf_in_force_per_kind(store: RecordStore) -> None:
    store.shelve_alarm("vacuum", T0_MS + 10, "op-1", "first", W0)
    store.shelve_alarm("estop", T0_MS + 10, "op-1", "other kind", W0)
    store.shelve_alarm("vacuum", T0_MS + 20, "op-2", "second", W1)  # ends the first
    assert [(s.kind, s.reason) for s in store.alarm_shelves()] == [
        ("estop", "other kind"),
        ("vacuum", "second"),
    ]
    first = store.alarm_shelves(in_force=False)[0]
    assert (first.reason, first.ended_at, first.ended_by) == ("first", W1, "op-2")
    # The database itself holds the rule.
    with pytest.raises(sqlite3.IntegrityError), store._lock:
        store._db.execute(
            "INSERT INTO alarm_shelves (kind, message, raised_ms, shelved_at, shelved_by, "
            "reason, until_ms) VALUES ('vacuum', '', 0, ?, 'x', 'x', 0)",
            (W2,),
        )


def test_a_version_2_database_gets_the_shelves_table(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with RecordStore(path) as s:
        s.open_reel(ReelInfo("R1", "line1", "PV", "1", "ab" * 32, "{}", "alice", 100.0, W0))
    # As an older linectl left it: schema version 2, no alarm_shelves.
    db = sqlite3.connect(path)
    db.execute("DROP TABLE alarm_shelves")
    # ... and without what version 4 added (the store's identity, retention).
    db.execute("DROP TABLE store_meta")
    db.execute("DROP TABLE pruned_reels")
    db.execute("ALTER TABLE reels DROP COLUMN end_seq")
    db.execute("UPDATE schema_version SET version = 2")
    db.commit()
    db.close()
    assert SCHEMA_VERSION >= 3
    with RecordStore(path) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert [r.reel_id for r in s.reels()] == ["R1"]  # nothing lost
        assert s.alarm_shelves() == []
        s.shelve_alarm("vacuum", T0_MS, "op", "r", W0)
        assert len(s.alarm_shelves()) == 1
        assert s.integrity_check() == "ok"


def test_shelves_survive_a_restart_and_expired_ones_end_at_the_first_cycle(
    tmp_path: Path, cfg: LoadedConfig, recipe: Recipe
) -> None:
    path = tmp_path / "r.sqlite"
    with RecordStore(path) as store:
        for effect in (
            RaiseAlarm("vacuum", "vacuum fault", W0, None),
            RaiseAlarm("scan", "scan fault", W0, None),
            ShelveAlarm("vacuum", "vacuum fault", T0_MS, T0_MS + 600_000, "op-1", "pump", W0),
            ShelveAlarm("scan", "scan fault", T0_MS, T0_MS + 30_000, "op-2", "coil", W0),
        ):
            apply_effect(store, effect)
    # linectl is down for a minute: the scan shelf expires meanwhile.
    line = Line(cfg, recipe, "0" * 64, "pv-1x6-en50618")
    with RecordStore(path) as store:
        restore_alarm_board(line, store, T0_MS)
    assert [(v.kind, v.state, v.shelved_by) for v in line.alarm_board()] == [
        ("vacuum", "shelved", "op-1"),
        ("scan", "shelved", "op-2"),
    ]
    now = T0_MS + 60_000
    report = line.cycle(CycleInput(0.05, W1, now, None, None, acc_fresh=False))
    assert [(v.kind, v.state) for v in report.alarm_board] == [
        ("vacuum", "shelved"),
        ("scan", "rtn_unack"),
    ]
    assert [e for e in report.effects if isinstance(e, UnshelveAlarm)] == [
        UnshelveAlarm("scan", "controller", W1, expired=True)
    ]
    with RecordStore(path) as store:
        for effect in report.effects:
            apply_effect(store, effect)
    with RecordStore(path) as store:
        assert [s.kind for s in store.alarm_shelves()] == ["vacuum"]
        ended = [s for s in store.alarm_shelves(in_force=False) if s.kind == "scan"]
        assert [(s.ended_at, s.ended_by, s.expired) for s in ended] == [(W1, "controller", True)]
        (event,) = [e for e in store.events() if e.action == "unshelve_alarm"]
        assert (event.actor, event.accepted, event.detail["alarm"]) == ("controller", True, "scan")
        assert event.detail["expired"] is True


async def test_the_service_loads_the_board_before_its_first_cycle(
    tmp_path: Path, cfg: LoadedConfig, recipe: Recipe
) -> None:
    path = tmp_path / "r.sqlite"
    with RecordStore(path) as store:
        store.raise_alarm("estop", "emergency stop", W0)
        store.raise_alarm("vacuum", "vacuum fault", W1)
        store.shelve_alarm(
            "vacuum", T0_MS + 600_000, "op-1", "pump", W1, message="vacuum", raised_ms=T0_MS
        )
    svc = LineService(
        cfg, recipe, cfg.recipe_path("pv-1x6-en50618"), store_path=path, wall_ms=lambda: T0_MS
    )
    svc._store = RecordStore(path)
    try:
        await svc._load_alarm_board()
        board = svc.alarm_board()
    finally:
        svc._store.close()
        svc._exec.shutdown(wait=True)
    assert [(v.kind, v.state, v.t_ms) for v in board] == [
        ("estop", "rtn_unack", T0_MS),
        ("vacuum", "shelved", T0_MS + 60_000),
    ]
    assert board[1].message == "vacuum fault"
    assert (board[1].shelved_until_ms, board[1].shelve_reason) == (T0_MS + 600_000, "pump")
    assert svc.line.unacked == {"estop": 1, "vacuum": 1}
