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
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from linectl.config import LineConfig, MqttConfig
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
    SHELVE_ALARM = "shelve_alarm"
    UNSHELVE_ALARM = "unshelve_alarm"


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
    """ack_alarm: the alarm kind to acknowledge, or "*" for every unacknowledged alarm;
    shelve_alarm, unshelve_alarm: the alarm kind."""
    duration_s: float | None = None
    """shelve_alarm: how long the alarm stays shelved, s (at most MAX_SHELVE_S)."""
    reason: str = ""
    """Free text from the operator (stop: why; end_reel: required), kept in the audit trail."""
    source: str = "mqtt"
    """The channel it came in on: mqtt, sparkplug, cli, http (the HMI and its API)."""

    def detail(self) -> dict[str, Any]:
        """The command's arguments as the audit trail keeps them."""
        out: dict[str, Any] = {"source": self.source}
        if self.request_id:
            out["request_id"] = self.request_id
        for key in ("reel_id", "length_m", "operator", "recipe", "alarm", "duration_s"):
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
    # Shelving hides an alarm from the operator's list for a while (ISA-18.2); the
    # reason is required: a shelved alarm is one the next shift must be able to question.
    CommandName.SHELVE_ALARM: (frozenset({"alarm", "duration_s", "reason"}), frozenset()),
    CommandName.UNSHELVE_ALARM: (frozenset({"alarm"}), frozenset()),
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


# The pattern parse_command holds each identifier key to (free text has none).
_PATTERNS: dict[str, re.Pattern[str]] = {
    "reel_id": _ID_RE,
    "request_id": _ID_RE,
    "sender": _NAME_RE,
    "recipe": _RECIPE_RE,
}


def check_value(key: str, value: object, *, pattern: bool = True) -> str:
    """`value` checked as parse_command checks the command key `key` (a string, the key's
    pattern, the length limit, no control character or lone surrogate), for input that
    comes another way (the command line: a byte of argv that is not UTF-8 arrives as a
    lone surrogate). `pattern=False`: only the checks every stored text gets (a recipe
    given as a path). CommandError names the key and what is wrong."""
    return _text({key: value}, key, _PATTERNS.get(key) if pattern else None)


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
    if cname is CommandName.SHELVE_ALARM and not reason.strip():
        raise CommandError("shelve_alarm: reason must say why the alarm is shelved")
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
        if alarm == "*" and cname is not CommandName.ACK_ALARM:
            raise CommandError(f"{cname.value}: name one alarm kind, not '*'")
        args["alarm"] = alarm
    if "duration_s" in obj:
        args["duration_s"] = _positive(obj, "duration_s")
        if args["duration_s"] > MAX_SHELVE_S:
            raise CommandError(
                f"duration_s {obj['duration_s']} is longer than the {MAX_SHELVE_S:g} s "
                "(one shift) an alarm may be shelved for"
            )
    if "length_m" in obj:
        args["length_m"] = _positive(obj, "length_m")
    return Command(cname, sender, request_id, reason=reason, source=source, **args)


def _positive(obj: Mapping[str, Any], key: str) -> float:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(f"{key} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        # A JSON integer of hundreds of digits does not fit a float (found by
        # tests/test_fuzz.py: math.isfinite raised OverflowError).
        raise CommandError(f"{key} must be positive and finite, not a huge integer") from None
    if not math.isfinite(number) or number <= 0:
        raise CommandError(f"{key} must be positive and finite, not {value}")
    return number


MAX_SHELVE_S = 12 * 3600.0
"""The longest an alarm may be shelved for: one shift. It comes back by itself then."""


# ---------------------------------------------------------------------- authorization


def role_of(identity: str, cfg: MqttConfig) -> str | None:
    """The role configured for `identity`, or None."""
    return cfg.identities.get(identity)


def request_id_of(payload: bytes | str) -> str:
    """The request id a payload carries, best effort ('' when it has none that is
    valid): for answering a command refused without being parsed."""
    if len(payload) > MAX_COMMAND_BYTES:
        return ""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return ""
    rid = obj.get("request_id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and _ID_RE.fullmatch(rid) else ""


def authorize_sender(identity: str, cfg: MqttConfig, command: str | None = None) -> str:
    """'' when `identity` may send some command, else why not (no role), and what to
    configure so that it may (`command`, when known, picks a role that may send it):
    checked on the topic alone, before the payload is read."""
    if role_of(identity, cfg) is None and not cfg.allow_anonymous_commands:
        hint = _role_hint(identity, cfg, command)
        return f"identity {bounded(identity)!r} has no role: {hint}"
    return ""


def _role_hint(identity: str, cfg: MqttConfig, command: str | None) -> str:
    """What to add where so that `identity` gets a role: line.toml's [mqtt.identities],
    with a role that may send `command` (or every command), 'operator' if it is one.
    Bounded: an identity too long to quote whole is not repeated."""
    where = "under [mqtt.identities] in line.toml"
    if len(identity) > MAX_STORED_TEXT:
        return f"give it a role {where}"
    # A TOML basic string: JSON's escapes are TOML's (ensure_ascii keeps it printable).
    key = json.dumps(identity)
    roles = cfg.roles
    if not roles:
        return f'define a role under [mqtt.roles], then add {key} = "ROLE" {where}'
    every = [r for r, allowed in roles.items() if "*" in allowed]
    fits = [r for r, allowed in roles.items() if command is not None and command in allowed]
    for candidates in (fits + every, every, list(roles)):
        if candidates:
            role = "operator" if "operator" in candidates else candidates[0]
            break
    return f"add {key} = {json.dumps(role)} {where}"


def authorize_command(cmd: Command, line: LineConfig) -> str:
    """'' when `cmd`'s sender may send it on the channel it came in on, else why not.
    One rule for every channel: an MQTT sender's role is its identity's under
    [mqtt.identities], an HMI user's is the one under [http.users]; both name a role of
    [mqtt.roles]."""
    if cmd.source == "http":
        user = line.http.users.get(cmd.sender)
        if user is None:
            return f"no HMI user {bounded(cmd.sender)!r} under [http.users]"
        return authorize(cmd.sender, cmd, line.mqtt, role=user.role)
    return authorize(cmd.sender, cmd, line.mqtt)


def authorize(
    identity: str, command: Command | CommandName, cfg: MqttConfig, *, role: str | None = None
) -> str:
    """'' when `identity` may send `command`, else the reason it may not.

    The broker's ACL is the first line (who may publish to a command topic at all);
    this is the second: identities map to roles, roles to the commands they may send.
    `role`: the sender's role when another channel knows it (an HMI user's).
    """
    name = command.name if isinstance(command, Command) else command
    if role is None:
        role = role_of(identity, cfg)
    if role is None:
        return authorize_sender(identity, cfg, name.value)
    allowed = cfg.roles.get(role)
    if allowed is None:
        return f"role {role!r} (of {identity!r}) is not configured"
    if "*" in allowed or name.value in allowed:
        return ""
    return f"role {role!r} may not send {name.value}"


# ---------------------------------------------------------------------- flood control

MAX_STORED_TEXT = 64
"""A sender or command name taken from a topic is kept to this many characters in logs
and the audit trail (a topic level may be 65,535 bytes long)."""


def bounded(text: str, limit: int = MAX_STORED_TEXT) -> str:
    """`text`, cut to `limit` characters with a note of how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...(+{len(text) - limit} chars)"


class RefusalTally:
    """Commands refused without being read: from senders that have no role, on a topic
    with an empty level, or dropped because their sender's queue was full.

    They are counted, not audited one by one: a flood of them would otherwise cost a
    store write each and bury one reel's audit trail (one report listed 20,017
    "operator actions"). `flush()` gives the aggregate for one audit row, attached to
    no reel, once per `window_s`. Answers are rate-limited per sender
    (`answer_interval_s`) and in total (`max_answers_per_s`). Memory is bounded: at most
    `max_senders` distinct senders are named; the rest are counted together.
    Pure: time comes in as an argument.
    """

    def __init__(
        self,
        *,
        window_s: float = 10.0,
        answer_interval_s: float = 1.0,
        max_answers_per_s: float = 20.0,
        max_senders: int = 64,
    ) -> None:
        self.window_s = window_s
        self.answer_interval_s = answer_interval_s
        self.max_answers_per_s = max_answers_per_s
        self.max_senders = max_senders
        self.total = 0
        """Refusals since this tally was made (for metrics and tests)."""
        self._counts: dict[tuple[str, str], int] = {}  # (sender, reason) -> count
        self._other = 0  # beyond max_senders
        self._since_s: float | None = None
        self._answered_s: dict[str, float] = {}
        self._budget = max_answers_per_s
        self._budget_t_s: float | None = None

    def add(self, sender: str, reason: str, now_s: float) -> bool:
        """Count one refusal; whether to answer it (rate limits)."""
        self.total += 1
        if self._since_s is None:
            self._since_s = now_s
        key = (bounded(sender), reason)
        if key in self._counts or len(self._counts) < self.max_senders:
            self._counts[key] = self._counts.get(key, 0) + 1
        else:
            self._other += 1
        return self._may_answer(key[0], now_s)

    def _may_answer(self, sender: str, now_s: float) -> bool:
        if self._budget_t_s is not None:
            self._budget = min(
                self.max_answers_per_s,
                self._budget + (now_s - self._budget_t_s) * self.max_answers_per_s,
            )
        self._budget_t_s = now_s
        last = self._answered_s.get(sender)
        if self._budget < 1.0 or (last is not None and now_s - last < self.answer_interval_s):
            return False
        if last is None and len(self._answered_s) >= self.max_senders:
            # Forget senders not answered for a while; bounded either way.
            cutoff = now_s - self.answer_interval_s
            self._answered_s = {k: t for k, t in self._answered_s.items() if t > cutoff}
            if len(self._answered_s) >= self.max_senders:
                return False
        self._budget -= 1.0
        self._answered_s[sender] = now_s
        return True

    def due(self, now_s: float) -> bool:
        """Whether a window's aggregate is waiting to be audited."""
        return self._since_s is not None and now_s - self._since_s >= self.window_s

    def flush(self, now_s: float) -> dict[str, Any] | None:
        """The aggregate since the last flush (None if nothing was refused), for one
        audit row; the tally starts over."""
        if self._since_s is None:
            return None
        by_sender: dict[str, dict[str, int]] = {}
        for (sender, reason), n in sorted(self._counts.items(), key=lambda kv: -kv[1]):
            by_sender.setdefault(sender, {})[reason] = n
        out: dict[str, Any] = {
            "refused": sum(self._counts.values()) + self._other,
            "window_s": round(now_s - self._since_s, 3),
            "by_sender": by_sender,
        }
        if self._other:
            out["other_senders"] = self._other
        self._counts, self._other, self._since_s = {}, 0, None
        return out


T = TypeVar("T")


class CommandInbox(Generic[T]):
    """Commands from senders that may send them, waiting for the control cycle.

    One bounded queue per sender (`per_sender`), served round robin with at most one
    command per sender in flight: a sender that floods fills only its own queue (what
    overflows is dropped and counted), and every other sender's command goes to the next
    cycle. At most `max_senders` senders have a queue. Pure: no event loop.
    """

    def __init__(self, *, per_sender: int = 8, max_senders: int = 64) -> None:
        self.per_sender = per_sender
        self.max_senders = max_senders
        self._queues: dict[str, deque[T]] = {}
        self._busy: set[str] = set()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def offer(self, sender: str, item: T) -> bool:
        """Queue `item`; False (dropped) when the sender's queue is full or there are
        too many senders with commands waiting."""
        q = self._queues.get(sender)
        if q is None:
            if len(self._queues) >= self.max_senders:
                return False
            q = self._queues[sender] = deque()
        if len(q) >= self.per_sender:
            return False
        q.append(item)
        return True

    def take(self) -> list[tuple[str, T]]:
        """The next command of each sender with none in flight (now in flight)."""
        out = []
        for sender, q in list(self._queues.items()):
            if sender in self._busy or not q:
                continue
            out.append((sender, q.popleft()))
            self._busy.add(sender)
        # Round robin: the senders just served go to the back of the order.
        for sender, _ in out:
            self._queues[sender] = self._queues.pop(sender)
        return out

    def done(self, sender: str) -> None:
        """The sender's command in flight has been answered."""
        self._busy.discard(sender)
        q = self._queues.get(sender)
        if q is not None and not q:
            del self._queues[sender]


__all__ = [
    "MAX_COMMAND_BYTES",
    "MAX_STORED_TEXT",
    "Command",
    "CommandError",
    "CommandInbox",
    "CommandName",
    "CommandResult",
    "RefusalTally",
    "authorize",
    "authorize_sender",
    "bounded",
    "check_value",
    "command_name",
    "nak",
    "parse_command",
    "request_id_of",
    "role_of",
]
