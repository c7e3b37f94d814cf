"""Operator commands over MQTT: parsing, validation and authorization (docs/mqtt.md).

Pure: no I/O, no clock. The MQTT adapter hands the topic's command name and sender and
the payload bytes to `parse_command`; the service executes a `Command` on the control
cycle and answers with a `CommandResult`. Bad input raises `CommandError`, whose message
names what is wrong; nothing is changed by a command that does not parse.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from linectl.config import MqttConfig
from linectl.errors import LocalError

MAX_COMMAND_BYTES = 4096
"""A command payload larger than this is refused unread (a command is a few fields)."""

_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
# A recipe is a file stem in recipes_dir: no dots, so never a path or a '.toml' name.
_RECIPE_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_MAX_TEXT = 200


class CommandName(enum.StrEnum):
    """The commands a line takes."""

    START_REEL = "start_reel"
    STOP = "stop"
    ACK_ALARM = "ack_alarm"
    RESET = "reset"
    SELECT_RECIPE = "select_recipe"
    END_REEL = "end_reel"


class CommandError(LocalError):
    """A command that cannot be parsed or is not allowed; str() says why."""


@dataclass(frozen=True, slots=True)
class Command:
    """One operator command, validated.

    `sender` is the identity that sent it (the broker user named in the command topic);
    `request_id` is the client's own id for the request, echoed in the answer.
    Fields a command does not use are None.
    """

    name: CommandName
    sender: str
    request_id: str = ""
    reel_id: str | None = None
    """start_reel: the reel id (used once); end_reel: the unfinished reel to end."""
    length_m: float | None = None
    """start_reel: planned length, m."""
    operator: str | None = None
    """start_reel: the operator named in the records (default: the sender)."""
    recipe: str | None = None
    """start_reel (optional) and select_recipe: recipe name (file stem in recipes_dir)."""
    alarm: str | None = None
    """ack_alarm: the alarm kind to acknowledge, or "*" for every unacknowledged alarm."""
    reason: str = ""
    """Free text from the operator (stop: why; end_reel: required), kept in the audit trail."""
    source: str = "mqtt"
    """The channel it came in on: mqtt, sparkplug, cli."""

    def detail(self) -> dict[str, Any]:
        """The command's arguments as the audit trail keeps them."""
        out: dict[str, Any] = {"source": self.source}
        if self.request_id:
            out["request_id"] = self.request_id
        for key in ("reel_id", "length_m", "operator", "recipe", "alarm"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The answer to a command: ACK (`ack` True) or NAK with the reason."""

    ack: bool
    reason: str = ""
    command: str = ""
    request_id: str = ""
    state: str = ""
    """The line state when the command was decided."""
    detail: Mapping[str, Any] = field(default_factory=dict)
    """Extra facts for the client (e.g. the alarms acknowledged)."""

    @property
    def result(self) -> str:
        """ "ACK" or "NAK"."""
        return "ACK" if self.ack else "NAK"

    def to_json(self, t_ms: int) -> dict[str, Any]:
        """The response payload (schema `linectl.response/1`, docs/mqtt.md)."""
        return {
            "schema": "linectl.response/1",
            "result": self.result,
            "ack": self.ack,
            "reason": self.reason,
            "command": self.command,
            "request_id": self.request_id,
            "state": self.state,
            "detail": dict(self.detail),
            "t_ms": t_ms,
        }


def nak(cmd: Command | None, reason: str, *, command: str = "", state: str = "") -> CommandResult:
    """A refusal of `cmd` (or of a payload that did not parse into one)."""
    if cmd is None:
        return CommandResult(False, reason, command=command, state=state)
    return CommandResult(False, reason, cmd.name.value, cmd.request_id, state)


# ---------------------------------------------------------------------- parsing

_FIELDS: dict[CommandName, tuple[frozenset[str], frozenset[str]]] = {
    # command: (required keys, optional keys); "sender", "request_id", "reason" and
    # "command" are allowed everywhere.
    CommandName.START_REEL: (
        frozenset({"reel_id", "length_m"}),
        frozenset({"operator", "recipe"}),
    ),
    CommandName.STOP: (frozenset(), frozenset()),
    CommandName.ACK_ALARM: (frozenset({"alarm"}), frozenset()),
    CommandName.RESET: (frozenset(), frozenset()),
    CommandName.SELECT_RECIPE: (frozenset({"recipe"}), frozenset()),
    # Naming the reel guards against ending another one than the operator means; the
    # reason goes into the reel's record as why it ended short.
    CommandName.END_REEL: (frozenset({"reel_id", "reason"}), frozenset()),
}
_COMMON = frozenset({"sender", "request_id", "reason", "command"})


def command_name(text: str) -> CommandName:
    """The command named `text`; CommandError listing the known ones otherwise."""
    try:
        return CommandName(text)
    except ValueError:
        known = ", ".join(c.value for c in CommandName)
        raise CommandError(f"unknown command {text!r} (known: {known})") from None


# Control characters and lone surrogates (JSON "\ud800" decodes to one). A surrogate
# cannot be encoded as UTF-8, so SQLite refuses the record that holds it: the store's write
# fails and the line goes to FAULT ("records"). Found by tests/test_fuzz.py with an
# `operator` of "\ud800" in start_reel.
_BAD_CHARS_RE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def _text(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise CommandError(f"{key} must be a string, not {type(value).__name__}")
    # fullmatch: `$` in match() also matches before a trailing newline, so "R1\n" passed
    # as a reel id (found by tests/test_fuzz.py).
    if pattern is not None and not pattern.fullmatch(value):
        raise CommandError(f"{key} {value!r} does not match {pattern.pattern}")
    if len(value) > _MAX_TEXT:
        raise CommandError(f"{key} is longer than {_MAX_TEXT} characters")
    if _BAD_CHARS_RE.search(value):
        raise CommandError(f"{key} {value!r} holds a control character or a lone surrogate")
    return value


def parse_command(
    payload: bytes | str,
    *,
    name: str | None = None,
    sender: str | None = None,
    source: str = "mqtt",
) -> Command:
    """Parse a JSON command payload.

    `name` and `sender` come from the topic (`.../cmd/<name>/<sender>`); a payload that
    also names them must agree. Unknown keys, missing keys and bad types are errors.
    """
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(
            f"command payload is {len(payload)} bytes, more than the {MAX_COMMAND_BYTES} allowed"
        )
    try:
        obj = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"command payload is not JSON: {exc}") from None
    except RecursionError:
        # 4096 bytes of "[" nest deeper than the decoder's recursion limit (found by
        # tests/test_fuzz.py); no command nests at all.
        raise CommandError("command payload is not JSON we take: nested too deeply") from None
    if not isinstance(obj, dict):
        raise CommandError(f"command payload must be a JSON object, not {type(obj).__name__}")

    if name is None:
        if "command" not in obj:
            raise CommandError("no command named (topic or 'command' key)")
        name = _text(obj, "command")
    elif "command" in obj and obj["command"] != name:
        raise CommandError(f"payload names command {obj['command']!r}, the topic {name!r}")
    cname = command_name(name)

    if sender is None:
        if "sender" not in obj:
            raise CommandError("no sender named (topic or 'sender' key)")
        sender = _text(obj, "sender", _NAME_RE)
    elif "sender" in obj and obj["sender"] != sender:
        raise CommandError(f"payload names sender {obj['sender']!r}, the topic {sender!r}")
    if not _NAME_RE.fullmatch(sender):
        raise CommandError(f"sender {sender!r} does not match {_NAME_RE.pattern}")

    required, optional = _FIELDS[cname]
    unknown = set(obj) - required - optional - _COMMON
    if unknown:
        raise CommandError(f"{cname.value}: unknown key(s) {', '.join(sorted(unknown))}")
    missing = required - set(obj)
    if missing:
        raise CommandError(f"{cname.value}: missing key(s) {', '.join(sorted(missing))}")

    request_id = _text(obj, "request_id", _ID_RE) if "request_id" in obj else ""
    reason = _text(obj, "reason") if "reason" in obj else ""
    if cname is CommandName.END_REEL and not reason.strip():
        raise CommandError("end_reel: reason must say why the reel ends short of its length")
    args: dict[str, Any] = {}
    if "reel_id" in obj:
        args["reel_id"] = _text(obj, "reel_id", _ID_RE)
    if "operator" in obj:
        args["operator"] = _text(obj, "operator")
    if "recipe" in obj:
        args["recipe"] = _text(obj, "recipe", _RECIPE_RE)
    if "alarm" in obj:
        alarm = _text(obj, "alarm")
        if alarm != "*" and not re.fullmatch(r"[a-z0-9_]{1,64}", alarm):
            raise CommandError(f"alarm {alarm!r} is neither an alarm kind nor '*'")
        args["alarm"] = alarm
    if "length_m" in obj:
        length = obj["length_m"]
        if isinstance(length, bool) or not isinstance(length, int | float):
            raise CommandError(f"length_m must be a number, not {type(length).__name__}")
        try:
            length_m = float(length)
        except OverflowError:
            # A JSON integer of hundreds of digits does not fit a float (found by
            # tests/test_fuzz.py: math.isfinite raised OverflowError).
            raise CommandError("length_m must be positive and finite, not a huge integer") from None
        if not math.isfinite(length_m) or length_m <= 0:
            raise CommandError(f"length_m must be positive and finite, not {length}")
        args["length_m"] = length_m
    return Command(cname, sender, request_id, reason=reason, source=source, **args)


# ---------------------------------------------------------------------- authorization


def role_of(identity: str, cfg: MqttConfig) -> str | None:
    """The role configured for `identity`, or None."""
    return cfg.identities.get(identity)


def authorize(identity: str, command: Command | CommandName, cfg: MqttConfig) -> str:
    """'' when `identity` may send `command`, else the reason it may not.

    The broker's ACL is the first line (who may publish to a command topic at all);
    this is the second: identities map to roles, roles to the commands they may send.
    """
    name = command.name if isinstance(command, Command) else command
    role = role_of(identity, cfg)
    if role is None:
        if cfg.allow_anonymous_commands:
            return ""
        return f"identity {identity!r} has no role"
    allowed = cfg.roles.get(role)
    if allowed is None:
        return f"role {role!r} (of {identity!r}) is not configured"
    if "*" in allowed or name.value in allowed:
        return ""
    return f"role {role!r} may not send {name.value}"


__all__ = [
    "MAX_COMMAND_BYTES",
    "Command",
    "CommandError",
    "CommandName",
    "CommandResult",
    "authorize",
    "command_name",
    "nak",
    "parse_command",
    "role_of",
]
