"""Pure command handling: parsing with clear errors, authorization (no broker)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from linectl.commands import (
    MAX_COMMAND_BYTES,
    MAX_SHELVE_S,
    Command,
    CommandError,
    CommandName,
    CommandResult,
    authorize,
    nak,
    parse_command,
)
from linectl.config import MqttConfig
from linectl.errors import LocalError


def parse(obj: Any, name: str | None = "start_reel", sender: str | None = "scada-1") -> Command:
    return parse_command(json.dumps(obj).encode(), name=name, sender=sender)


def test_start_reel() -> None:
    cmd = parse(
        {
            "request_id": "r-1",
            "reel_id": "R-0042",
            "length_m": 2000,
            "operator": "A. Smith",
            "recipe": "pv-1x6-en50618",
            "reason": "shift start",
        }
    )
    assert cmd == Command(
        CommandName.START_REEL,
        "scada-1",
        "r-1",
        reel_id="R-0042",
        length_m=2000.0,
        operator="A. Smith",
        recipe="pv-1x6-en50618",
        reason="shift start",
    )
    assert cmd.detail() == {
        "source": "mqtt",
        "request_id": "r-1",
        "reel_id": "R-0042",
        "length_m": 2000.0,
        "operator": "A. Smith",
        "recipe": "pv-1x6-en50618",
        "reason": "shift start",
    }


def test_end_reel_names_the_reel_and_why() -> None:
    cmd = parse({"reel_id": "R-0042", "reason": "cable cut at 812 m"}, name="end_reel")
    assert cmd == Command(
        CommandName.END_REEL, "scada-1", reel_id="R-0042", reason="cable cut at 812 m"
    )
    assert cmd.detail() == {"source": "mqtt", "reel_id": "R-0042", "reason": "cable cut at 812 m"}


def test_name_and_sender_from_the_payload() -> None:
    cmd = parse({"command": "stop", "sender": "op-2"}, name=None, sender=None)
    assert (cmd.name, cmd.sender) == (CommandName.STOP, "op-2")
    with pytest.raises(CommandError, match="no command named"):
        parse({"sender": "op-2"}, name=None, sender=None)
    with pytest.raises(CommandError, match="no sender named"):
        parse({}, name="stop", sender=None)


def test_shelve_and_unshelve_alarm() -> None:
    cmd = parse(
        {"alarm": "vacuum", "duration_s": 1800, "reason": "pump swap", "request_id": "s-1"},
        name="shelve_alarm",
    )
    assert cmd == Command(
        CommandName.SHELVE_ALARM,
        "scada-1",
        "s-1",
        alarm="vacuum",
        duration_s=1800.0,
        reason="pump swap",
    )
    assert isinstance(cmd.duration_s, float)
    # The audit trail keeps how long and why.
    assert cmd.detail() == {
        "source": "mqtt",
        "request_id": "s-1",
        "alarm": "vacuum",
        "duration_s": 1800.0,
        "reason": "pump swap",
    }
    # One shift at most, that much included.
    longest = parse(
        {"alarm": "vacuum", "duration_s": MAX_SHELVE_S, "reason": "r"}, name="shelve_alarm"
    )
    assert longest.duration_s == MAX_SHELVE_S == 12 * 3600.0
    assert parse({"alarm": "vacuum", "duration_s": 0.5, "reason": "r"}, name="shelve_alarm")
    un = parse({"alarm": "vacuum"}, name="unshelve_alarm")
    assert un == Command(CommandName.UNSHELVE_ALARM, "scada-1", alarm="vacuum")
    assert un.duration_s is None
    # A reason is welcome on an unshelve too (the audit trail keeps it).
    assert parse({"alarm": "vacuum", "reason": "fixed"}, name="unshelve_alarm").reason == "fixed"


SHELVE = {"alarm": "vacuum", "duration_s": 600, "reason": "pump swap"}


@pytest.mark.parametrize(
    ("payload", "name", "message"),
    [
        ({**SHELVE, "duration_s": 0}, "shelve_alarm", "duration_s must be positive"),
        ({**SHELVE, "duration_s": -5}, "shelve_alarm", "duration_s must be positive"),
        ({**SHELVE, "duration_s": MAX_SHELVE_S + 0.001}, "shelve_alarm", "longer than the 43200"),
        ({**SHELVE, "duration_s": 10**400}, "shelve_alarm", "not a huge integer"),
        ({**SHELVE, "duration_s": True}, "shelve_alarm", "duration_s must be a number, not bool"),
        ({**SHELVE, "duration_s": "600"}, "shelve_alarm", "duration_s must be a number, not str"),
        ({**SHELVE, "duration_s": None}, "shelve_alarm", "duration_s must be a number"),
        ({"alarm": "vacuum", "reason": "r"}, "shelve_alarm", "missing key\\(s\\) duration_s"),
        ({"alarm": "vacuum", "duration_s": 60}, "shelve_alarm", "missing key\\(s\\) reason"),
        ({**SHELVE, "reason": "   "}, "shelve_alarm", "reason must say why the alarm is shelved"),
        ({**SHELVE, "alarm": "*"}, "shelve_alarm", "shelve_alarm: name one alarm kind, not"),
        ({**SHELVE, "alarm": "Vacuum!"}, "shelve_alarm", "neither an alarm kind nor"),
        ({"duration_s": 60, "reason": "r"}, "shelve_alarm", "missing key\\(s\\) alarm"),
        ({"alarm": "*"}, "unshelve_alarm", "unshelve_alarm: name one alarm kind, not"),
        ({}, "unshelve_alarm", "unshelve_alarm: missing key\\(s\\) alarm"),
        ({"alarm": "vacuum", "duration_s": 5}, "unshelve_alarm", "unknown key\\(s\\) duration_s"),
        ({"alarm": "vacuum", "duration_s": 5}, "ack_alarm", "unknown key\\(s\\) duration_s"),
    ],
)
def test_bad_shelving_commands_say_what_is_wrong(
    payload: dict[str, Any], name: str, message: str
) -> None:
    with pytest.raises(CommandError, match=message):
        parse(payload, name=name)
    with pytest.raises(LocalError):  # the caller's fault: exit code 2 in the CLI
        parse(payload, name=name)


def test_nan_and_infinite_durations_are_refused() -> None:
    for text in (b"NaN", b"Infinity", b"-Infinity"):
        payload = b'{"alarm": "vacuum", "reason": "r", "duration_s": ' + text + b"}"
        with pytest.raises(CommandError, match="duration_s must be positive and finite"):
            parse_command(payload, name="shelve_alarm", sender="a")


@pytest.mark.parametrize(
    ("payload", "name", "message"),
    [
        ({"reel_id": "R1"}, "start_reel", "start_reel: missing key\\(s\\) length_m"),
        ({"reel_id": "R1", "length_m": 5, "speed": 3}, "start_reel", "unknown key\\(s\\) speed"),
        ({"reel_id": "R1", "length_m": -5}, "start_reel", "length_m must be positive"),
        ({"reel_id": "R1", "length_m": 0}, "start_reel", "length_m must be positive"),
        ({"reel_id": "R1", "length_m": True}, "start_reel", "length_m must be a number"),
        ({"reel_id": "R1", "length_m": "5"}, "start_reel", "length_m must be a number, not str"),
        ({"reel_id": "R 1", "length_m": 5}, "start_reel", "reel_id 'R 1' does not match"),
        ({"reel_id": 7, "length_m": 5}, "start_reel", "reel_id must be a string, not int"),
        ({"recipe": "../etc/passwd"}, "select_recipe", "recipe '../etc/passwd' does not match"),
        ({"recipe": "pv.toml"}, "select_recipe", "recipe 'pv.toml' does not match"),
        ({}, "ack_alarm", "ack_alarm: missing key\\(s\\) alarm"),
        ({"alarm": "Vacuum!"}, "ack_alarm", "neither an alarm kind nor"),
        ({"reel_id": "R1"}, "stop", "stop: unknown key\\(s\\) reel_id"),
        ({}, "launch", "unknown command 'launch' \\(known: start_reel, stop"),
        ({"command": "reset"}, "stop", "payload names command 'reset', the topic 'stop'"),
        ({"sender": "eve"}, "stop", "payload names sender 'eve', the topic 'scada-1'"),
        ({"request_id": "x" * 65}, "stop", "request_id"),
        ({"reason": "x" * 201}, "stop", "reason is longer than 200"),
        ({"reel_id": "R1"}, "end_reel", "end_reel: missing key\\(s\\) reason"),
        ({"reason": "cut"}, "end_reel", "end_reel: missing key\\(s\\) reel_id"),
        ({"reel_id": "R1", "reason": "  "}, "end_reel", "reason must say why"),
        ({"reel_id": "R1", "reason": "cut", "length_m": 5}, "end_reel", "unknown key"),
    ],
)
def test_bad_commands_say_what_is_wrong(payload: dict[str, Any], name: str, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        parse(payload, name=name)


def test_bad_payloads() -> None:
    with pytest.raises(CommandError, match="not JSON"):
        parse_command(b"{nope", name="stop", sender="a")
    with pytest.raises(CommandError, match="not JSON"):
        parse_command(b"\xff\xfe", name="stop", sender="a")
    with pytest.raises(CommandError, match="must be a JSON object, not list"):
        parse_command(b"[]", name="stop", sender="a")
    big = b'{"reason": "' + b"x" * MAX_COMMAND_BYTES + b'"}'
    with pytest.raises(CommandError, match=f"more than the {MAX_COMMAND_BYTES} allowed"):
        parse_command(big, name="stop", sender="a")
    with pytest.raises(CommandError, match="sender 'a b' does not match"):
        parse_command(b"{}", name="stop", sender="a b")
    # Command errors are the caller's fault (LocalError), and NaN is not JSON we accept.
    with pytest.raises(LocalError, match="length_m must be positive and finite"):
        parse_command(b'{"reel_id": "R", "length_m": NaN}', name="start_reel", sender="a")


CFG = MqttConfig(
    roles={"operator": ["start_reel", "stop", "ack_alarm"], "admin": ["*"], "viewer": []},
    identities={"op-1": "operator", "boss": "admin", "eye": "viewer", "ghost": "nobody"},
)


@pytest.mark.parametrize(
    ("identity", "command", "reason"),
    [
        ("op-1", CommandName.START_REEL, ""),
        ("op-1", CommandName.RESET, "role 'operator' may not send reset"),
        ("boss", CommandName.SELECT_RECIPE, ""),
        ("eye", CommandName.STOP, "role 'viewer' may not send stop"),
        (
            "stranger",
            CommandName.STOP,
            "identity 'stranger' has no role: "
            'add "stranger" = "operator" under [mqtt.identities] in line.toml',
        ),
        (
            "stranger",
            CommandName.RESET,
            "identity 'stranger' has no role: "
            'add "stranger" = "admin" under [mqtt.identities] in line.toml',
        ),
        ("ghost", CommandName.STOP, "role 'nobody' (of 'ghost') is not configured"),
    ],
)
def test_authorize(identity: str, command: CommandName, reason: str) -> None:
    assert authorize(identity, command, CFG) == reason
    assert authorize(identity, Command(command, identity), CFG) == reason


def test_anonymous_commands_only_when_allowed() -> None:
    assert authorize("stranger", CommandName.STOP, CFG) != ""
    open_cfg = CFG.model_copy(update={"allow_anonymous_commands": True})
    assert authorize("stranger", CommandName.STOP, open_cfg) == ""
    # A known identity keeps its role's limits even then.
    assert authorize("eye", CommandName.STOP, open_cfg) == "role 'viewer' may not send stop"


def test_result_payload() -> None:
    r = CommandResult(True, "", "stop", "r-9", "running", {"x": 1})
    assert r.result == "ACK"
    assert r.to_json(5) == {
        "schema": "linectl.response/1",
        "result": "ACK",
        "ack": True,
        "reason": "",
        "command": "stop",
        "request_id": "r-9",
        "state": "running",
        "detail": {"x": 1},
        "t_ms": 5,
    }
    n = nak(None, "bad", command="launch")
    assert (n.ack, n.result, n.reason, n.command) == (False, "NAK", "bad", "launch")
    n2 = nak(Command(CommandName.STOP, "a", "r-1"), "no", state="idle")
    assert (n2.command, n2.request_id, n2.state) == ("stop", "r-1", "idle")
