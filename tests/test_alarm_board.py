"""The alarm board (ISA-18.2 states, acknowledgement, shelving) in the pure core: the
state table transition by transition, shelving with wall-clock expiry, its refusals,
its effects, and that it never touches the interlocks. No event loop, no socket."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from harness import ClosedLoop

from linectl.commands import MAX_SHELVE_S, Command, CommandName, CommandResult
from linectl.config import LoadedConfig, MqttConfig, Recipe
from linectl.core.control import CommandRefused, LineState
from linectl.core.line import (
    AckAlarms,
    AlarmBoard,
    Audit,
    CycleInput,
    CycleReport,
    Line,
    RaiseAlarm,
    ShelveAlarm,
    UnshelveAlarm,
)
from linectl.mqtt import MqttBridge
from linectl.telemetry import ActiveAlarm, AlarmView, LineStatus, alarm_view_json

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in unix ms


@pytest.fixture
def recipe(cfg: LoadedConfig) -> Recipe:
    return cfg.load_recipe("pv-1x6-en50618")


def states(board: AlarmBoard) -> dict[str, str]:
    return {v.kind: v.state for v in board.views()}


# ---------------------------------------------------------------------- the state table

# Events: ("raise", kind) latched, ("blip", kind) momentary, ("ack", kind), ("reset",)
# (the controller no longer holds anything latched).
Event = tuple[str, ...]


def apply(board: AlarmBoard, events: list[Event], held: set[str]) -> None:
    for i, ev in enumerate(events):
        match ev:
            case ("raise", kind):
                board.raise_alarm(kind, f"{kind} #{i}", latched=True, t_ms=T0 + i)
                held.add(kind)
            case ("blip", kind):
                board.raise_alarm(kind, f"{kind} #{i}", latched=False, t_ms=T0 + i)
            case ("ack", kind):
                board.ack(kind)
            case ("reset",):
                held.clear()
            case _:
                raise AssertionError(ev)
        board.returned(held)  # as every cycle does after its events


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # Raised (latched): active, unacknowledged.
        ([("raise", "vacuum")], "unack"),
        # Momentary: raised and at once back to normal, unacknowledged.
        ([("blip", "beam_outage")], "rtn_unack"),
        # Acknowledged while active: acked; while returned: gone.
        ([("raise", "vacuum"), ("ack", "vacuum")], "acked"),
        ([("blip", "beam_outage"), ("ack", "beam_outage")], None),
        # The operator reset: acked -> gone; unack -> rtn_unack, then ack -> gone.
        ([("raise", "vacuum"), ("ack", "vacuum"), ("reset",)], None),
        ([("raise", "vacuum"), ("reset",)], "rtn_unack"),
        ([("raise", "vacuum"), ("reset",), ("ack", "vacuum")], None),
        # Raised again while acked, or while returned unacknowledged: unack again.
        ([("raise", "vacuum"), ("ack", "vacuum"), ("blip", "vacuum")], "unack"),
        ([("raise", "vacuum"), ("reset",), ("raise", "vacuum")], "unack"),
        ([("raise", "vacuum"), ("ack", "vacuum"), ("reset",), ("raise", "vacuum")], "unack"),
        # A momentary alarm raised again before it is acknowledged stays rtn_unack.
        ([("blip", "beam_outage"), ("blip", "beam_outage")], "rtn_unack"),
    ],
)
def test_the_state_table(events: list[Event], expected: str | None) -> None:
    board = AlarmBoard()
    apply(board, events, set())
    kind = events[0][1]
    assert states(board).get(kind) == expected


def test_views_say_active_latched_and_when_last_raised() -> None:
    board = AlarmBoard()
    held = {"vacuum"}
    board.raise_alarm("vacuum", "vacuum fault", latched=True, t_ms=T0)
    board.raise_alarm("beam_outage", "beam off for 10.0 s", latched=False, t_ms=T0 + 5)
    board.returned(held)
    assert board.views() == (
        AlarmView("vacuum", "vacuum fault", "unack", active=True, latched=True, t_ms=T0),
        AlarmView("beam_outage", "beam off for 10.0 s", "rtn_unack", False, False, T0 + 5),
    )
    board.returned(set())  # reset: vacuum no longer needs one
    vacuum = board.views()[0]
    assert (vacuum.state, vacuum.active, vacuum.latched) == ("rtn_unack", False, False)
    board.raise_alarm("vacuum", "vacuum fault again", latched=True, t_ms=T0 + 9)
    # Oldest first, by the time each was last raised.
    assert [(v.kind, v.message, v.t_ms) for v in board.views()] == [
        ("beam_outage", "beam off for 10.0 s", T0 + 5),
        ("vacuum", "vacuum fault again", T0 + 9),
    ]
    assert board.unacked() == {"vacuum": 2, "beam_outage": 1}


def test_ack_of_what_is_not_unacknowledged_is_refused() -> None:
    board = AlarmBoard()
    with pytest.raises(CommandRefused, match="no unacknowledged alarm 'vacuum'"):
        board.ack("vacuum")
    board.raise_alarm("vacuum", "v", latched=True, t_ms=T0)
    board.ack("vacuum")
    with pytest.raises(CommandRefused, match="no unacknowledged alarm 'vacuum'"):
        board.ack("vacuum")
    assert states(board) == {"vacuum": "acked"}


# ---------------------------------------------------------------------- shelving, pure


def test_shelving_hides_the_state_without_acknowledging_and_expires_by_the_wall_clock() -> None:
    board = AlarmBoard()
    board.raise_alarm("vacuum", "vacuum fault", latched=True, t_ms=T0)
    board.returned({"vacuum"})
    board.shelve("vacuum", T0 + 60_000, "op-1", "sensor being replaced")
    (v,) = board.views()
    assert v == AlarmView(
        "vacuum",
        "vacuum fault",
        "shelved",
        active=True,
        latched=True,
        t_ms=T0,
        shelved_until_ms=T0 + 60_000,
        shelved_by="op-1",
        shelve_reason="sensor being replaced",
    )
    assert board.unacked() == {"vacuum": 1}  # shelving does not acknowledge
    assert board.real_state("vacuum") == "unack"
    # Its real state goes on underneath: reset, then raised again while shelved.
    board.returned(set())
    assert board.real_state("vacuum") == "rtn_unack"
    board.raise_alarm("vacuum", "vacuum fault again", latched=True, t_ms=T0 + 10)
    assert states(board) == {"vacuum": "shelved"}
    assert board.unacked() == {"vacuum": 2}
    assert board.expired(T0 + 59_999) == []
    (ended,) = board.expired(T0 + 60_000)
    assert ended.kind == "vacuum"
    assert board.shelf("vacuum") is None
    assert states(board) == {"vacuum": "unack"}  # its real state again


def test_a_shelved_alarm_back_to_normal_stays_listed_until_unshelved() -> None:
    board = AlarmBoard()
    board.raise_alarm("vacuum", "v", latched=True, t_ms=T0)
    board.shelve("vacuum", T0 + 1000, "op", "r")
    board.ack("vacuum")  # by name: a shelved alarm can be acknowledged
    board.returned(set())  # and reset: back to normal
    (v,) = board.views()
    assert (v.state, v.active, v.latched) == ("shelved", False, False)
    assert board.real_state("vacuum") is None
    board.unshelve("vacuum")
    assert board.views() == ()  # nothing left to show


def test_shelving_refusals_say_why() -> None:
    board = AlarmBoard()
    with pytest.raises(
        CommandRefused, match=r"no alarm 'vacuum' on the alarm board.*board is empty"
    ):
        board.shelve("vacuum", T0, "op", "r")
    board.raise_alarm("estop", "e", latched=True, t_ms=T0)
    with pytest.raises(CommandRefused, match=r"\(on the board: estop\)"):
        board.shelve("vacuum", T0, "op", "r")
    board.shelve("estop", T0 + 3_600_000, "op-1", "r")
    with pytest.raises(
        CommandRefused,
        match=r"'estop' is shelved already, until 2026-01-01T01:00:00.000Z \(by op-1\): "
        "unshelve it first",
    ):
        board.shelve("estop", T0 + 5, "op-2", "again")
    with pytest.raises(CommandRefused, match=r"'vacuum' is not shelved \(shelved: estop\)"):
        board.unshelve("vacuum")
    board.unshelve("estop")
    with pytest.raises(CommandRefused, match=r"'estop' is not shelved \(no alarm is shelved\)"):
        board.unshelve("estop")


# ---------------------------------------------------------------------- in the line


def cmd(name: CommandName, sender: str = "op-1", **kw: object) -> Command:
    return Command(name, sender, **kw)  # type: ignore[arg-type]


def shelve(kind: str, duration_s: float = 60.0, reason: str = "known fault") -> Command:
    return cmd(CommandName.SHELVE_ALARM, alarm=kind, duration_s=duration_s, reason=reason)


def faulted(cfg: LoadedConfig, recipe: Recipe) -> ClosedLoop:
    """A ready line whose accelerator latches a fault: FAULT, latched alarm."""
    cl = ClosedLoop(cfg, recipe)
    cl.settle()
    cl.plant.accelerator.latch(2)
    cl.run_for(0.2)
    assert cl.ctl.state is LineState.FAULT
    assert "accelerator_fault" in cl.ctl.alarms
    return cl


def test_the_line_reports_its_board(cfg: LoadedConfig, recipe: Recipe) -> None:
    cl = faulted(cfg, recipe)
    t_s = cl.t_s
    cl.cycle()
    assert cl.line.alarm_board() == cl.line.alarm_board()  # equal views, cycle to cycle
    (v,) = cl.line.alarm_board()
    assert (v.kind, v.state, v.active, v.latched) == ("accelerator_fault", "unack", True, True)
    assert v.message == "accelerator fault 2 (high voltage)"
    assert v.t_ms < round(t_s * 1000)  # when it was raised, not now
    # The report carries the same board (the service and the MQTT bridge read it).
    report = cl.line.checkpoint(CycleInput(cl.t_s, "w", round(cl.t_s * 1000), None, None))
    assert isinstance(report, CycleReport)
    assert report.alarm_board == (v,)


def test_ack_reset_and_raise_again_through_the_line(cfg: LoadedConfig, recipe: Recipe) -> None:
    cl = faulted(cfg, recipe)
    board = cl.line.alarm_board
    assert cl.line.command(cmd(CommandName.ACK_ALARM, alarm="accelerator_fault")).ack
    cl.run_for(0.1)
    assert [v.state for v in board()] == ["acked"]
    assert cl.line.command(cmd(CommandName.RESET)).ack
    assert cl.run_until(lambda: cl.ctl.state is LineState.READY, 5.0)
    assert board() == ()  # acked, then reset: gone
    # Unacknowledged at the reset: returned to normal, unacknowledged.
    cl.plant.accelerator.latch(3)
    cl.run_for(0.2)
    assert [(v.state, v.active) for v in board()] == [("unack", True)]
    assert cl.line.command(cmd(CommandName.RESET)).ack
    assert cl.run_until(lambda: cl.ctl.state is LineState.READY, 5.0)
    assert [(v.state, v.active, v.latched) for v in board()] == [("rtn_unack", False, False)]
    # Raised again before anyone acknowledged it: unack again.
    cl.plant.accelerator.latch(2)
    cl.run_for(0.2)
    assert [(v.state, v.active) for v in board()] == [("unack", True)]
    result = cl.line.command(cmd(CommandName.ACK_ALARM, alarm="*"))
    assert result.ack
    assert result.detail == {"alarms": ["accelerator_fault"]}


def test_shelving_never_changes_the_line_state_or_the_interlocks(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    cl = faulted(cfg, recipe)
    before = (cl.ctl.state, dict(cl.ctl.alarms), cl.line.status().alarms)
    result = cl.line.command(shelve("accelerator_fault"))
    assert result.ack, result.reason
    cl.run_for(1.0)
    # Hidden from the operator's list, nothing else: still FAULT, still latched, the
    # outputs still safe, no start, and a reset still needed.
    assert (cl.ctl.state, dict(cl.ctl.alarms), cl.line.status().alarms) == before
    assert [(v.state, v.active, v.latched) for v in cl.line.alarm_board()] == [
        ("shelved", True, True)
    ]
    out = cl.ctl.outputs
    assert (out.beam_on, out.run, out.hv_on, out.beam_current_sp_ma) == (False, False, False, 0.0)
    refused = cl.line.command(cmd(CommandName.START_REEL, reel_id="R1", length_m=10.0))
    assert not refused.ack
    assert "cannot start in state fault" in refused.reason
    assert [a.kind for a in cl.line.active_alarms()] == ["accelerator_fault"]
    assert cl.line.unacked == {"accelerator_fault": 1}  # shelving does not acknowledge
    assert cl.line.command(cmd(CommandName.RESET)).ack
    assert cl.run_until(lambda: cl.ctl.state is LineState.READY, 5.0)
    # Raised while shelved: recorded as usual, the line faults as usual.
    mark = len(cl.effects)
    cl.plant.accelerator.latch(2)
    cl.run_for(0.2)
    assert cl.ctl.state is LineState.FAULT
    raised = [e for e in cl.effects[mark:] if isinstance(e, RaiseAlarm)]
    assert [e.kind for e in raised] == ["accelerator_fault"]
    assert [(v.state, v.active) for v in cl.line.alarm_board()] == [("shelved", True)]
    assert cl.line.unacked == {"accelerator_fault": 2}


def test_shelve_and_unshelve_are_effects_and_audited(cfg: LoadedConfig, recipe: Recipe) -> None:
    cl = faulted(cfg, recipe)
    wall_ms, raised_ms = round(cl.t_s * 1000), cl.line.board.t_ms("accelerator_fault")
    mark = len(cl.effects)
    result = cl.line.command(shelve("accelerator_fault", 90.5, "arc detector swap"))
    assert result.ack, result.reason
    cl.cycle()
    until = wall_ms + 90_500  # from the time of the cycle that took it
    assert result.detail == {"shelved_until_ms": until, "state": "unack"}
    new = cl.effects[mark:]
    assert [e for e in new if isinstance(e, ShelveAlarm)] == [
        ShelveAlarm(
            "accelerator_fault",
            "accelerator fault 2 (high voltage)",
            raised_ms or -1,
            until,
            "op-1",
            "arc detector swap",
            f"t+{wall_ms / 1000:.3f}s",
        )
    ]
    (audit,) = [e for e in new if isinstance(e, Audit) and e.action == "shelve_alarm"]
    assert (audit.actor, audit.accepted) == ("op-1", True)
    assert audit.detail["alarm"] == "accelerator_fault"
    assert audit.detail["duration_s"] == 90.5
    assert audit.detail["reason"] == "arc detector swap"
    assert audit.detail["shelved_until_ms"] == until

    mark = len(cl.effects)
    result = cl.line.command(cmd(CommandName.UNSHELVE_ALARM, "op-2", alarm="accelerator_fault"))
    assert result.ack
    assert result.detail == {"shelved_until_ms": until, "shelved_by": "op-1", "state": "unack"}
    cl.cycle()
    new = cl.effects[mark:]
    assert [(e.kind, e.by, e.expired) for e in new if isinstance(e, UnshelveAlarm)] == [
        ("accelerator_fault", "op-2", False)
    ]
    audits = [e for e in new if isinstance(e, Audit) and "shelve" in e.action]
    assert [(e.actor, e.action, e.accepted) for e in audits] == [("op-2", "unshelve_alarm", True)]
    assert [v.state for v in cl.line.alarm_board()] == ["unack"]


def test_refusals_are_answered_audited_and_change_nothing(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    cl = faulted(cfg, recipe)
    line = cl.line

    def refused(c: Command, why: str) -> None:
        board = line.alarm_board()
        result = line.command(c)
        assert not result.ack
        assert why in result.reason, result.reason
        assert line.alarm_board() == board
        (audit,) = [e for e in line._effects if isinstance(e, Audit)][-1:]
        assert (audit.action, audit.accepted, audit.reason) == (c.name.value, False, result.reason)

    refused(shelve("vacuum"), "no alarm 'vacuum' on the alarm board")
    refused(cmd(CommandName.UNSHELVE_ALARM, alarm="accelerator_fault"), "is not shelved")
    refused(shelve("accelerator_fault", reason="  "), "needs a reason")
    refused(shelve("accelerator_fault", duration_s=MAX_SHELVE_S + 1), "outside 0 < duration_s")
    refused(shelve("accelerator_fault", duration_s=float("nan")), "outside 0 < duration_s")
    refused(cmd(CommandName.SHELVE_ALARM, alarm="accelerator_fault", reason="r"), "duration_s")
    assert line.command(shelve("accelerator_fault", duration_s=3600.0)).ack
    refused(shelve("accelerator_fault"), "is shelved already, until 1970-01-01T01:00:00.")
    refused(shelve("accelerator_fault"), "unshelve it first")
    assert not [e for e in line._effects if isinstance(e, UnshelveAlarm)]
    assert len([e for e in line._effects if isinstance(e, ShelveAlarm)]) == 1


def test_ack_all_leaves_shelved_alarms_to_be_acknowledged_by_name(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    cl = faulted(cfg, recipe)
    line = cl.line
    assert line.command(shelve("accelerator_fault")).ack
    result = line.command(cmd(CommandName.ACK_ALARM, alarm="*"))
    assert not result.ack
    assert result.reason == (
        "no unacknowledged alarm but shelved ones (accelerator_fault): acknowledge a "
        "shelved alarm by its kind"
    )
    cl.ctl.raise_alarm(cl.t_s, "records", "disk full")  # as a failed store write does
    cl.cycle()
    assert set(line.unacked) == {"accelerator_fault", "records"}
    result = line.command(cmd(CommandName.ACK_ALARM, alarm="*"))
    assert result.ack
    assert result.detail == {"alarms": ["records"]}
    acks = [e for e in line._effects if isinstance(e, AckAlarms)]
    assert [(e.kind, e.by) for e in acks] == [("records", "op-1")]  # never "*"
    assert line.unacked == {"accelerator_fault": 1}
    assert line.command(cmd(CommandName.ACK_ALARM, alarm="accelerator_fault")).ack
    assert line.unacked == {}
    assert {v.kind: v.state for v in line.alarm_board()} == {
        "accelerator_fault": "shelved",
        "records": "acked",
    }


# ---------------------------------------------------------------------- expiry


def offline(line: Line, wall_ms: int) -> CycleReport:
    return line.cycle(
        CycleInput(wall_ms / 1000.0, f"w{wall_ms}", wall_ms, None, None, acc_fresh=False)
    )


def test_a_shelf_expires_by_the_wall_clock_and_is_audited(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    line = Line(cfg, recipe, "0" * 64, "pv-1x6-en50618")
    offline(line, T0)
    line.cycle(CycleInput(T0 / 1000 + 0.05, "w", T0 + 50, None, None, store_error="disk full"))
    assert [v.state for v in line.alarm_board()] == ["unack"]
    assert line.command(shelve("records", duration_s=2.0, reason="disk swap")).ack
    report = offline(line, T0 + 100)
    assert [v.state for v in report.alarm_board] == ["shelved"]
    assert report.alarm_board[0].shelved_until_ms == T0 + 50 + 2000
    report = offline(line, T0 + 2049)
    assert [v.state for v in report.alarm_board] == ["shelved"]
    assert not [e for e in report.effects if isinstance(e, UnshelveAlarm)]
    report = offline(line, T0 + 2050)
    assert [v.state for v in report.alarm_board] == ["unack"]  # its real state again
    assert [e for e in report.effects if isinstance(e, UnshelveAlarm)] == [
        UnshelveAlarm("records", "controller", f"w{T0 + 2050}", expired=True)
    ]
    (audit,) = [e for e in report.effects if isinstance(e, Audit)]
    assert (audit.actor, audit.action, audit.accepted) == ("controller", "unshelve_alarm", True)
    assert audit.detail["expired"] is True
    assert audit.detail["why"] == "shelf expired at 2026-01-01T00:00:02.050Z"
    assert audit.detail["shelved_by"] == "op-1"
    assert audit.detail["shelve_reason"] == "disk swap"
    assert line.ctl.state is LineState.OFFLINE  # nothing else moved
    assert "records" in line.ctl.alarms
    report = offline(line, T0 + 5000)
    assert not [e for e in report.effects if isinstance(e, UnshelveAlarm | Audit)]


def test_shelves_and_unacknowledged_alarms_from_the_records_at_start(
    cfg: LoadedConfig, recipe: Recipe
) -> None:
    """As the service loads them: a shelf still in force stays; one that expired while
    linectl was down ends, audited, at the first cycle; unacknowledged alarms of the
    earlier run are returned to normal, unacknowledged."""
    line = Line(cfg, recipe, "0" * 64, "pv-1x6-en50618")
    line.restore_alarm("vacuum", "vacuum fault", T0 - 9000)
    line.restore_alarm("vacuum", "vacuum fault again", T0 - 5000)
    line.restore_alarm("estop", "emergency stop", T0 - 7000)
    line.restore_shelf(
        "vacuum", message="x", raised_ms=0, until_ms=T0 + 60_000, by="op-1", reason="pump"
    )
    line.restore_shelf(
        "scan", message="scan fault", raised_ms=T0 - 8000, until_ms=T0 - 1, by="op-2", reason="r"
    )
    before = line.alarm_board()  # what the service shows before the first cycle
    assert [(v.kind, v.state, v.active) for v in before] == [
        ("scan", "shelved", False),
        ("estop", "rtn_unack", False),
        ("vacuum", "shelved", False),
    ]
    assert before[2].message == "vacuum fault again"
    assert before[0].message == "scan fault"
    assert line.unacked == {"vacuum": 2, "estop": 1}
    report = offline(line, T0)
    assert [(v.kind, v.state) for v in report.alarm_board] == [
        ("estop", "rtn_unack"),
        ("vacuum", "shelved"),
    ]
    assert [e for e in report.effects if isinstance(e, UnshelveAlarm)] == [
        UnshelveAlarm("scan", "controller", f"w{T0}", expired=True)
    ]
    (audit,) = [e for e in report.effects if isinstance(e, Audit) and "shelve" in e.action]
    assert audit.detail["alarm"] == "scan"
    assert audit.detail["expired"] is True


# ---------------------------------------------------------------------- MQTT


class BoardLine:
    """The MQTT bridge's line endpoint, with an alarm board (as LineService has)."""

    def __init__(self, board: tuple[AlarmView, ...]) -> None:
        self.board = board

    def live_values(self) -> dict[str, Any]:
        return {}

    def line_status(self) -> LineStatus:
        return LineStatus("fault", "accelerator fault", T0, alarms=("vacuum",))

    def active_alarms(self) -> tuple[ActiveAlarm, ...]:
        return (ActiveAlarm("vacuum", "vacuum fault", True, T0),)

    def alarm_board(self) -> tuple[AlarmView, ...]:
        return self.board

    async def execute(self, cmd: Command) -> CommandResult:
        raise AssertionError("no command here")

    def audit_command_error(
        self, sender: str, command: str, reason: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        raise AssertionError("no command here")

    def audit_refusals(self, summary: Mapping[str, Any]) -> None:
        raise AssertionError("no command here")


def test_the_mqtt_bridge_publishes_the_board(tmp_path: Path) -> None:
    shelved = AlarmView(
        "vacuum", "vacuum fault", "shelved", True, True, T0, T0 + 60_000, "op-1", "r"
    )
    line = BoardLine((shelved,))
    bridge = MqttBridge(
        line, MqttConfig(), line_id="line1", store_path=tmp_path / "r.sqlite", wall_ms=lambda: T0
    )
    bridge.on_cycle()
    payload = json.loads(bridge._state[bridge.topics.alarms_active])
    assert payload["alarms"] == [alarm_view_json(shelved)]
    # A change of state only (unshelved: its real state) is published again.
    line.board = (replace(shelved, state="unack", shelved_until_ms=None),)
    bridge.on_cycle()
    payload = json.loads(bridge._state[bridge.topics.alarms_active])
    assert [(a["state"], a["shelved_until_ms"]) for a in payload["alarms"]] == [("unack", None)]
