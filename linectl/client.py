"""The command-line client of a running line: status, alarms, commands, a live view.

`linectl status`, `reel start|stop`, `alarms [ack KIND]`, `reset`, `recipe select` and
`watch` (docs/cli.md) talk to `linectl run` only through the MQTT broker, never to the
PLCs or the record store. Topics, payloads and commands come from linectl.telemetry and
linectl.commands, the same definitions the daemon's bridge (linectl.mqtt) uses, so the
two sides cannot disagree: a command is checked here by the daemon's own parser before
it is sent, and every payload read is checked against the schema id it should carry.

Two halves:
- pure: settings, command payloads, answers, `LineView` (what the retained and live
  topics say about the line) and its renderings; time is an argument. The renderings
  also serve the HTTP way to the line (linectl.webclient, when the configuration has
  no broker): `hmi_view` and `HmiWatch` read the HMI's state document as the topics'
  payloads, so both ways print the same.
- `LineClient`, a thin aiomqtt shell (one connection, MQTT 5 when the broker speaks it,
  else 3.1.1), and the `read_line`, `send_command` and `watch` coroutines the CLI runs.
  The connection itself (client, TLS, `watch`'s reconnect back-off) is linectl.broker's,
  as for the daemon's MQTT bridge and Sparkplug node.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import math
import secrets
import shutil
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TextIO

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linectl.aio import cancellable, entered, task_group, unix_ms
from linectl.broker import Backoff, BrokerSettings, make_client, reconnect_loop, resolve_tls
from linectl.commands import CommandError, CommandName, CommandResult, parse_command
from linectl.config import LoadedConfig, MqttTls
from linectl.errors import LocalError, RemoteError
from linectl.telemetry import LIVE_UNITS, LIVE_VALUES, SCHEMAS, TOPIC_SPECS, Topics, encode

DEFAULT_TIMEOUT_S: Final = 5.0
"""How long a command waits for its answer. The daemon answers within 2 s even when its
control cycle does not take the command ("controller not running"), so 5 s leaves room
for the broker round trip."""

SETTLE_S: Final = 0.3
"""After the required retained topics have arrived, how long to wait for the rest (live
values): a broker sends retained messages in one burst right after the subscription."""


class BrokerError(RemoteError):
    """The MQTT broker cannot be reached, or refused the connection or a subscription."""


class NoAnswerError(RemoteError, TimeoutError):
    """The line did not answer (no daemon, or it is not connected to this broker)."""


# ---------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where the line's broker is and who we are on it."""

    line_id: str
    host: str
    port: int
    topic_prefix: str = "linectl"
    sender: str = "cli"
    """Our identity in command topics (`cmd/<command>/<sender>`); with the documented
    broker ACL it must be our broker user name."""
    username: str | None = None
    # repr=False: a printed settings object never shows the password.
    password: str | None = field(default=None, repr=False)
    tls: MqttTls | None = None
    """`[mqtt.tls]`, its files resolved; None: plain TCP."""
    keepalive_s: int = 15
    mqtt_enabled: bool = True
    """`[mqtt] enabled` in the configuration we read (only for hints in errors: the
    daemon's own configuration decides whether it uses MQTT)."""
    address: str = ""
    """Where the line is reached, for the renderings' headers when it is not the broker
    (the HTTP API's URL); empty: the broker's `host:port`."""

    @property
    def broker(self) -> str:
        """`host:port`, for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def where(self) -> str:
        """Where the line is reached: `address`, else the broker."""
        return self.address or self.broker

    @property
    def topics(self) -> Topics:
        """The line's topics."""
        return Topics.for_line(self.topic_prefix, self.line_id)

    def connection(self, client_id: str) -> BrokerSettings:
        """The broker connection (linectl.broker) under `client_id`."""
        return BrokerSettings(
            host=self.host,
            port=self.port,
            client_id=client_id,
            username=self.username,
            password=self.password,
            tls=self.tls,
            keepalive_s=self.keepalive_s,
        )


def parse_broker(text: str, default_port: int) -> tuple[str, int]:
    """`HOST`, `HOST:PORT` or `[IPv6]:PORT` -> (host, port); LocalError naming the fault."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise LocalError(f"--broker {text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise LocalError(f"--broker {text!r}: expected ':PORT' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise LocalError(f"--broker {text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not host:
        raise LocalError(f"--broker {text!r}: no host name")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise LocalError(f"--broker {text!r}: port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def check_sender(sender: str) -> str:
    """`sender` if the daemon would take it as a command sender; CommandError otherwise.

    Checked by the daemon's own parser, so the rule has one home (linectl.commands).
    """
    parse_command(b"{}", name=CommandName.STOP.value, sender=sender, source="cli")
    return sender


def client_settings(
    loaded: LoadedConfig,
    *,
    broker: str | None = None,
    sender: str | None = None,
    login: Callable[[], str] = getpass.getuser,
) -> ClientSettings:
    """Settings from the line's configuration ([mqtt]: host, port, TLS, credentials,
    topic prefix), `broker` (HOST[:PORT]) and `sender` overriding.

    The sender defaults to the broker user name (under the documented ACL a client may
    send commands only under its own name), else the login name.
    """
    mq = loaded.line.mqtt
    host, port = (mq.host, mq.port) if broker is None else parse_broker(broker, mq.port)
    if sender is None:
        try:
            sender = mq.username or login()
        except (KeyError, OSError):  # no login name (a container without a passwd entry)
            raise LocalError("no sender identity: give --sender ID") from None
    return ClientSettings(
        line_id=loaded.line.line_id,
        host=host,
        port=port,
        topic_prefix=mq.topic_prefix,
        sender=check_sender(sender),
        username=mq.username,
        password=mq.password,
        tls=resolve_tls(mq.tls, loaded.resolve),
        keepalive_s=mq.keepalive_s,
        mqtt_enabled=mq.enabled,
    )


# ---------------------------------------------------------------------- commands and answers


def new_request_id() -> str:
    """A request id no other request of ours uses (the daemon answers a repeated id with
    the first answer, as a retry)."""
    return f"cli-{secrets.token_hex(8)}"


def command_payload(
    name: CommandName, args: Mapping[str, Any], *, sender: str, request_id: str
) -> bytes:
    """The JSON payload of a command, checked by the daemon's parser before it is sent.

    Bad input raises CommandError (a LocalError) naming what is wrong; nothing is sent.
    Arguments that are None are left out.
    """
    obj = {k: v for k, v in args.items() if v is not None}
    for key, value in obj.items():
        # JSON has no NaN or infinity: named here, as the daemon cannot be asked.
        if isinstance(value, float) and not math.isfinite(value):
            raise CommandError(f"{name.value}: {key} must be finite, not {value}")
    obj["request_id"] = request_id
    payload = encode(obj)
    parse_command(payload, name=name.value, sender=sender, source="cli")
    return payload


def read_answer(obj: Mapping[str, Any]) -> CommandResult:
    """A `response` payload as the daemon's CommandResult; LocalError if it is not one."""
    _check_schema(obj, "response")
    result = obj.get("result")
    if result not in ("ACK", "NAK") or obj.get("ack") is not (result == "ACK"):
        raise LocalError(f"answer has result {result!r} and ack {obj.get('ack')!r}")
    detail = obj.get("detail")
    return CommandResult(
        ack=result == "ACK",
        reason=str(obj.get("reason", "")),
        command=str(obj.get("command", "")),
        request_id=str(obj.get("request_id", "")),
        state=str(obj.get("state", "")),
        detail=detail if isinstance(detail, dict) else {},
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """The line's answer to a command: as the daemon's CommandResult, and as sent."""

    result: CommandResult
    payload: dict[str, Any]


def describe_answer(line_id: str, result: CommandResult) -> str:
    """One line for the operator: what the line said to the command."""
    state = f" (line {result.state})" if result.state else ""
    if result.ack:
        text = f"{line_id}: ACK {result.command}{state}"
    else:
        text = f"{line_id}: NAK {result.command}: {result.reason}{state}"
    extra = ", ".join(
        f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in result.detail.items()
    )
    return f"{text}; {extra}" if extra else text


# ---------------------------------------------------------------------- topics and payloads

_SPECS: Final = tuple((spec, spec.pattern.split("/")) for spec in TOPIC_SPECS)


def classify(topics: Topics, topic: str) -> tuple[str, str]:
    """(schema name, variable part) of one of the line's topics, from the protocol's own
    topic table (telemetry.TOPIC_SPECS): ("live", "speed_m_min"), ("state", "").
    ("", "") for a topic that is not the line's."""
    head = topics.base + "/"
    if not topic.startswith(head):
        return "", ""
    parts = topic[len(head) :].split("/")
    for spec, pattern in _SPECS:
        if len(pattern) == len(parts) and all(
            p == q or (p.startswith("<") and q) for p, q in zip(pattern, parts, strict=True)
        ):
            var = [q for p, q in zip(pattern, parts, strict=True) if p.startswith("<")]
            return spec.schema, "/".join(var)
    return "", ""


def _check_schema(obj: Mapping[str, Any], schema: str) -> None:
    want = SCHEMAS[schema]["$id"]
    got = obj.get("schema")
    if got != want:
        raise LocalError(f"payload has schema {got!r}, this client reads {want!r}")


def decode(payload: object) -> dict[str, Any] | None:
    """A JSON object payload, or None (empty, not JSON, not an object)."""
    if isinstance(payload, bytes | bytearray):
        try:
            obj = json.loads(bytes(payload))
        except (ValueError, UnicodeDecodeError):
            return None
        return obj if isinstance(obj, dict) else None
    if isinstance(payload, str):
        return decode(payload.encode())
    return None


def clock_text(t_ms: object, *, ms: bool = False) -> str:
    """Local time of day of a unix ms time (with the date when it is not today); '?'
    for none."""
    if isinstance(t_ms, bool) or not isinstance(t_ms, int | float):
        return "?"
    dt = datetime.fromtimestamp(t_ms / 1000.0).astimezone()
    text = dt.strftime("%H:%M:%S.%f")[:-3] if ms else dt.strftime("%H:%M:%S")
    # A state entered yesterday must not read as this morning.
    return text if dt.date() == datetime.now().astimezone().date() else f"{dt:%Y-%m-%d} {text}"


_LIVE_FORMAT: Final[dict[str, str]] = {
    "beam_current_ma": ".1f",
    "beam_current_sp_ma": ".1f",
    "energy_mev": ".3f",
    "scan_width_cm": ".1f",
    "vacuum_pa": ".2e",
    "speed_m_min": ".1f",
    "speed_sp_m_min": ".1f",
    "tension_n": ".0f",
    "length_counter_m": ".1f",
    "reel_position_m": ".1f",
}


def live_text(name: str, obj: Mapping[str, Any] | None, *, unit: bool = True) -> str:
    """A live value for people: `80.0 m/min`, `n/a`, `79.2 m/min [stale]`."""
    if obj is None:
        return "-"
    value = obj.get("value")
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, int | float) and math.isfinite(value):
        text = format(value, _LIVE_FORMAT.get(name, ".4g"))
        u = LIVE_UNITS.get(name, str(obj.get("unit", "")))
        if unit and u:
            text += f" {u}"
    else:
        text = "n/a"
    quality = obj.get("quality", "good")
    return text if quality == "good" else f"{text} [{quality}]"


def reel_progress_text(position_m: float, planned_m: float | None) -> str:
    """Where the reel stands: `at 25.0 m (25 %)`.

    Past its planned length the reel is not done: its tail is still crossing the beam's
    passes, so the counter runs on by up to the last pass's offset. That is said as it
    is, never as a percentage above 100.
    """
    if planned_m is None or planned_m <= 0:
        return f"at {position_m:.1f} m"
    if position_m > planned_m:
        return (
            f"planned length reached, tail clearing the beam: {position_m:.1f} m of cable counted"
        )
    return f"at {position_m:.1f} m ({100.0 * position_m / planned_m:.0f} %)"


# ---------------------------------------------------------------------- what the line says


@dataclass
class ReelProgress:
    """Completed metres of one reel seen on `records/metres`."""

    reel_id: str
    metres: int = 0
    by_verdict: dict[str, int] = field(default_factory=dict)
    last_index: int | None = None
    last_dose_kgy: float | None = None
    last_verdict: str = ""


@dataclass
class LineView:
    """The line as its retained and live topics describe it; fed one message at a time.

    `apply` returns one line of text per change (what `watch` prints when its output is
    not a terminal); the `*_lines` methods render the whole picture.
    """

    topics: Topics
    status: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    alarms: dict[str, Any] | None = None
    live: dict[str, dict[str, Any]] = field(default_factory=dict)
    reels: dict[str, ReelProgress] = field(default_factory=dict)
    events: deque[str] = field(default_factory=lambda: deque(maxlen=6))
    """The latest record events (reel, alarm, unproven metres), newest last."""
    problems: list[str] = field(default_factory=list)
    carried: frozenset[str] | None = None
    """The live values the source carries (the HMI's state document has no vacuum,
    scan width or length counter); None: every value (MQTT: `-` marks one never
    published)."""
    _seen_seq: deque[int] = field(default_factory=lambda: deque(maxlen=2000))

    @property
    def seen(self) -> set[str]:
        """The retained topics (schema names) that have arrived."""
        have = {"status": self.status, "state": self.state, "alarms_active": self.alarms}
        return {k for k, v in have.items() if v is not None}

    def apply(self, topic: str, payload: object) -> list[str]:
        """Take one message; the changes it makes, as lines of text."""
        kind, var = classify(self.topics, topic)
        if kind in ("", "command", "response"):
            return []
        obj = decode(payload)
        if obj is None:
            if payload in (b"", "", None):  # a cleared retained topic
                return []
            return [self._problem(f"{topic}: payload is not a JSON object")]
        try:
            _check_schema(obj, kind)
        except LocalError as exc:
            return [self._problem(f"{topic}: {exc}")]
        if kind in ("metres", "reel", "alarm", "audit"):
            seq = obj.get("seq")
            if isinstance(seq, int):
                # Records are delivered at least once: a seq seen before is a repeat.
                if seq in self._seen_seq:
                    return []
                self._seen_seq.append(seq)
        return self._take(kind, var, obj)

    def _problem(self, text: str) -> str:
        if text not in self.problems:
            self.problems.append(text)
        return f"warning: {text}"

    def _take(self, kind: str, var: str, obj: dict[str, Any]) -> list[str]:
        at = clock_text(obj.get("t_ms"), ms=True)
        if kind == "status":
            self.status = obj
            return [f"{at} status {status_text(obj)}"]
        if kind == "state":
            self.state = obj
            return [f"{at} state {state_text(obj)}"]
        if kind == "alarms_active":
            self.alarms = obj
            return [f"{at} alarms {alarms_text(obj)}"]
        if kind == "live":
            self.live[var] = obj
            return [f"{at} live {var} {live_text(var, obj)}"]
        if kind == "metres":
            return [f"{at} {self._metres(obj)}"]
        if kind == "reel":
            text = reel_event_text(obj)
            self.events.append(f"{clock_text(obj.get('t_ms'))} {text}")
            return [f"{at} {text}"]
        if kind == "alarm":
            text = alarm_event_text(obj)
            self.events.append(f"{clock_text(obj.get('t_ms'))} {text}")
            return [f"{at} {text}"]
        return []

    def _metres(self, obj: Mapping[str, Any]) -> str:
        reel_id = str(obj.get("reel_id", "?"))
        reel = self.reels.setdefault(reel_id, ReelProgress(reel_id))
        old = " (historical)" if obj.get("historical") else ""
        if obj.get("event") == "unproven":
            first, last = obj.get("first_index"), obj.get("last_index")
            n = last - first + 1 if isinstance(first, int) and isinstance(last, int) else 0
            reel.metres += n
            reel.by_verdict["unproven"] = reel.by_verdict.get("unproven", 0) + n
            text = f"metres {reel_id} #{first}..#{last} unproven: {obj.get('cause', '')}{old}"
            self.events.append(f"{clock_text(obj.get('t_ms'))} {text}")
            return text
        batch: dict[str, int] = {}
        indexes: list[int] = []
        for m in obj.get("metres") or []:
            if not isinstance(m, dict):
                continue
            verdict = str(m.get("verdict", "?"))
            batch[verdict] = batch.get(verdict, 0) + 1
            reel.by_verdict[verdict] = reel.by_verdict.get(verdict, 0) + 1
            reel.metres += 1
            if isinstance(m.get("index"), int):
                indexes.append(m["index"])
                reel.last_index = m["index"]
            dose = m.get("dose_kgy")
            reel.last_dose_kgy = float(dose) if isinstance(dose, int | float) else None
            reel.last_verdict = verdict
        span = f"#{min(indexes)}..#{max(indexes)}" if indexes else "(none)"
        counts = ", ".join(f"{n} {v}" for v, n in sorted(batch.items()))
        return f"metres {reel_id} {span}: {counts or 'empty batch'}{old}"

    # ------------------------------------------------------------------ renderings

    def header(self, settings: ClientSettings) -> str:
        """`line1 @ broker: online since ...` (or why not)."""
        return f"{settings.line_id} @ {settings.where}: " + (
            "no status (no linectl has published this line here)"
            if self.status is None
            else status_text(self.status)
        )

    @property
    def online(self) -> bool:
        """Whether the retained status says the daemon is connected now."""
        return self.status is not None and self.status.get("status") == "online"

    def status_lines(self, settings: ClientSettings) -> list[str]:
        """The `status` command's text."""
        out = [self.header(settings)]
        if self.status is not None and not self.online:
            out.append("(the line's daemon is not connected: what follows is its last word)")
        st = self.state
        if st is None:
            out.append("state     unknown (no retained state)")
        else:
            out.append(f"state     {state_text(st)}")
            if st.get("not_ready_reason") and st.get("state") in ("idle", "ready", "fault"):
                out.append(f"not ready {st['not_ready_reason']}")
            out.append(f"reel      {self.reel_text()}")
            recipe = st.get("recipe") or {}
            out.append(f"recipe    {recipe.get('product', '?')}, version {recipe.get('version')}")
        out.append(f"alarms    {'unknown' if self.alarms is None else alarms_text(self.alarms)}")
        out.extend(self.live_lines())
        out.extend(f"warning   {p}" for p in self.problems)
        return out

    def reel_text(self) -> str:
        """The reel the state names, with its position from the live values."""
        reel = (self.state or {}).get("reel")
        if not isinstance(reel, dict):
            return "none"
        planned = reel.get("planned_length_m")
        text = str(reel.get("reel_id", "?"))
        if isinstance(planned, int | float):
            text += f", {planned:g} m planned"
        pos = self.live.get("reel_position_m", {}).get("value")
        if isinstance(pos, int | float) and not isinstance(pos, bool):
            plan = planned if isinstance(planned, int | float) else None
            text += f", {reel_progress_text(float(pos), plan)}"
        if not reel.get("started"):
            text += " (not started)"
        return text

    def live_lines(self) -> list[str]:
        """Live values, two lines (accelerator, conveyor); none if none arrived. Values
        the source does not carry (`carried`) are left out."""
        if not self.live:
            return []
        lv = self.live.get

        def sp(name: str, setpoint: str) -> str:
            text = live_text(name, lv(name))
            if lv(setpoint) is not None:
                text += f" (set-point {live_text(setpoint, lv(setpoint), unit=False)})"
            return text

        def parts(*items: tuple[str, str, str]) -> str:
            return ", ".join(
                f"{label} {text}"
                for label, name, text in items
                if self.carried is None or name in self.carried
            )

        return [
            "beam      "
            + parts(
                ("current", "beam_current_ma", sp("beam_current_ma", "beam_current_sp_ma")),
                ("energy", "energy_mev", live_text("energy_mev", lv("energy_mev"))),
                ("scan", "scan_width_cm", live_text("scan_width_cm", lv("scan_width_cm"))),
                ("vacuum", "vacuum_pa", live_text("vacuum_pa", lv("vacuum_pa"))),
            ),
            "line      "
            + parts(
                ("speed", "speed_m_min", sp("speed_m_min", "speed_sp_m_min")),
                ("tension", "tension_n", live_text("tension_n", lv("tension_n"))),
                (
                    "counter",
                    "length_counter_m",
                    live_text("length_counter_m", lv("length_counter_m")),
                ),
            ),
        ]

    def alarm_lines(self, settings: ClientSettings) -> list[str]:
        """The `alarms` command's text."""
        out = [self.header(settings)]
        if self.status is not None and not self.online:
            out.append("(the line's daemon is not connected: these are the last it reported)")
        alarms = (self.alarms or {}).get("alarms")
        if not isinstance(alarms, list):
            out.append("active alarms unknown (no retained alarms/active)")
            return out
        if not alarms:
            out.append("no active alarms")
            return out
        out.append(f"{len(alarms)} active alarm{'s' if len(alarms) != 1 else ''}:")
        width = max(len(str(a.get("kind", ""))) for a in alarms if isinstance(a, dict))
        for a in alarms:
            if isinstance(a, dict):
                latched = "latched" if a.get("latched") else "       "
                state = alarm_state_text(a)
                out.append(
                    f"  {a.get('kind', '?')!s:<{width}}  {latched}  since "
                    f"{clock_text(a.get('t_ms'))}  {a.get('message', '')}"
                    + (f"  [{state}]" if state else "")
                )
        out.append("acknowledge with: linectl alarms ack KIND (or 'all'); then linectl reset")
        return out

    def screen_lines(self, settings: ClientSettings, now_ms: int, note: str = "") -> list[str]:
        """The `watch` screen."""
        out = [
            f"linectl watch  {settings.line_id} @ {settings.where}  {clock_text(now_ms)}"
            "  (Ctrl-C to quit)",
            self.header(settings),
        ]
        if note:
            out.append(f"!! {note}")
        out.extend(self.status_lines(settings)[1:])
        if self.reels:
            reel = list(self.reels.values())[-1]
            counts = ", ".join(f"{n} {v}" for v, n in sorted(reel.by_verdict.items()))
            last = ""
            if reel.last_index is not None:
                dose = "n/a" if reel.last_dose_kgy is None else f"{reel.last_dose_kgy:.1f} kGy"
                last = f"; last #{reel.last_index} {dose} {reel.last_verdict}"
            out.append(f"metres    {reel.reel_id}: {reel.metres} seen ({counts}){last}")
        if self.events:
            out.append("events")
            out.extend(f"  {e}" for e in self.events)
        return out


def status_text(obj: Mapping[str, Any]) -> str:
    """`online since 12:00:00` (`online` when the source does not say since when) or
    `OFFLINE (last session from 11:00:00)`."""
    if obj.get("status") == "online":
        if obj.get("t_ms") is None:
            return "online"
        return f"online since {clock_text(obj.get('t_ms'))}"
    since = obj.get("session_ms", obj.get("t_ms"))
    return f"OFFLINE (its last session began {clock_text(since)})"


def state_text(obj: Mapping[str, Any]) -> str:
    """`RUNNING since 12:00:05: beam on at dose-follow current`."""
    text = f"{str(obj.get('state', '?')).upper()} since {clock_text(obj.get('t_ms'))}"
    if obj.get("cause"):
        text += f": {obj['cause']}"
    if obj.get("quality", "good") != "good":
        text += f" [{obj['quality']}]"
    return text


def alarms_text(obj: Mapping[str, Any]) -> str:
    """`none` or `vacuum (latched): accelerator vacuum fault; ...`."""
    alarms = obj.get("alarms")
    if not isinstance(alarms, list) or not alarms:
        return "none"
    return "; ".join(
        f"{a.get('kind', '?')}{' (latched)' if a.get('latched') else ''}: {a.get('message', '')}"
        for a in alarms
        if isinstance(a, dict)
    )


_ALARM_STATES: Final = {
    "unack": "unacknowledged",
    "acked": "acknowledged",
    "rtn_unack": "cleared, unacknowledged",
    "shelved": "shelved",
}


def alarm_state_text(a: Mapping[str, Any]) -> str:
    """An alarm's ISA-18.2 state for people (`acknowledged`, `shelved until 14:00:00 by
    op-1`); '' when the payload does not carry one."""
    state = a.get("state")
    if not isinstance(state, str):
        return ""
    text = _ALARM_STATES.get(state, state)
    if state == "shelved":
        if a.get("shelved_until_ms") is not None:
            text += f" until {clock_text(a.get('shelved_until_ms'))}"
        if a.get("shelved_by"):
            text += f" by {a['shelved_by']}"
    return text


def reel_event_text(obj: Mapping[str, Any]) -> str:
    """A `records/reel` start or end, one line."""
    reel_id = obj.get("reel_id", "?")
    if obj.get("event") == "start":
        recipe = obj.get("recipe") or {}
        return (
            f"reel {reel_id} started by {obj.get('operator') or '?'}, "
            f"{obj.get('planned_length_m', '?')} m planned, recipe "
            f"{recipe.get('product', '?')} v{recipe.get('version', '?')}"
        )
    summary = obj.get("summary") or {}
    counts = summary.get("by_verdict") or {}
    verdicts = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()) if n)
    text = f"reel {reel_id} ended ({obj.get('reason', '?')}): {summary.get('metres', '?')} metres"
    return f"{text} ({verdicts})" if verdicts else text


def alarm_event_text(obj: Mapping[str, Any]) -> str:
    """A `records/alarm` event, one line."""
    by = f" by {obj['by']}" if obj.get("by") else ""
    return f"alarm {obj.get('kind', '?')} {obj.get('event', '?')}{by}: {obj.get('message', '')}"


# ---------------------------------------------------------------------- the MQTT shell

_UNSUPPORTED_PROTOCOL: Final = frozenset({1, 132})  # CONNACK: 3.1.1 code, MQTT 5 reason
_BAD_CREDENTIALS: Final = frozenset({4, 5, 134, 135})


def _code(rc: object) -> int | None:
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


class LineClient:
    """One connection to the line's broker (an async context manager).

    MQTT 5 when the broker speaks it (commands then carry a response topic and
    correlation data), else 3.1.1 (answers on the fallback topic, matched by request id).
    """

    def __init__(
        self,
        settings: ClientSettings,
        *,
        connect_timeout_s: float = DEFAULT_TIMEOUT_S,
        protocols: tuple[aiomqtt.ProtocolVersion, ...] = (
            aiomqtt.ProtocolVersion.V5,
            aiomqtt.ProtocolVersion.V311,
        ),
    ) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.connect_timeout_s = connect_timeout_s
        self.protocols = protocols
        self.protocol = protocols[0]
        self._client: aiomqtt.Client | None = None
        self.sent = False
        """Whether a command has gone to the broker (it may act even if we stop waiting)."""

    def _make(self, protocol: aiomqtt.ProtocolVersion) -> aiomqtt.Client:
        s = self.settings
        # Never the daemon's client id: the broker would drop the daemon's session.
        client_id = f"linectl-cli-{s.sender}-{secrets.token_hex(4)}"[:64]
        return make_client(
            s.connection(client_id), protocol=protocol, timeout_s=self.connect_timeout_s
        )

    async def __aenter__(self) -> LineClient:
        where = f"MQTT broker {self.settings.broker} (line {self.settings.line_id})"
        for i, protocol in enumerate(self.protocols):
            client = self._make(protocol)
            try:
                await entered(client).__aenter__()
            except MqttConnectError as exc:
                code = _code(exc.rc)
                if code in _UNSUPPORTED_PROTOCOL and i + 1 < len(self.protocols):
                    continue  # an MQTT 3.1.1 broker: try the next protocol
                hint = ""
                if code in _BAD_CREDENTIALS:
                    hint = (
                        " (user name and password come from [mqtt] in line.toml, or "
                        "LINECTL_MQTT__USERNAME and LINECTL_MQTT__PASSWORD)"
                    )
                raise BrokerError(f"{where} refused the connection: {exc}{hint}") from None
            except aiomqtt.MqttError as exc:
                raise BrokerError(f"cannot connect to {where}: {exc}") from None
            self._client, self.protocol = client, protocol
            return self
        raise BrokerError(f"{where} speaks none of MQTT 5 and 3.1.1")  # pragma: no cover

    async def __aexit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await entered(client).__aexit__(None, None, None)

    @property
    def client(self) -> aiomqtt.Client:
        """The connected aiomqtt client."""
        if self._client is None:
            raise RuntimeError("LineClient is not connected (use `async with`)")
        return self._client

    async def subscribe(self, *topics: str, required: bool = True) -> list[str]:
        """Subscribe (QoS 1); the topics the broker took. A topic it refuses (its ACL)
        raises BrokerError naming it when `required`, else is left out."""
        took = []
        for topic in topics:
            granted = await cancellable(
                self.client.subscribe(topic, qos=1, timeout=self.connect_timeout_s)
            )
            codes = [_code(g) for g in granted]
            if all(c is not None and c < 128 for c in codes):
                took.append(topic)
            elif required:
                raise BrokerError(
                    f"MQTT broker {self.settings.broker} refused the subscription to {topic} "
                    f"for {self.settings.username or 'an anonymous client'}: its ACL must let "
                    "this user read the line's topics (docs/cli.md)"
                )
        return took

    async def read(self, need: Iterable[str], timeout_s: float) -> LineView:
        """The line's retained topics (status, state, alarms/active, live values).

        Returns once every schema in `need` has arrived and the burst of live values has
        had SETTLE_S to follow, or after `timeout_s` with whatever did arrive.
        """
        t = self.topics
        view = LineView(t)
        need = set(need)
        await self.subscribe(t.status, t.state, t.alarms_active, t.live("+"))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s) as cm:
                settling = False
                async for m in self.client.messages:
                    view.apply(m.topic.value, m.payload)
                    if len(view.live) >= len(LIVE_VALUES) and need <= view.seen:
                        break
                    if not settling and need <= view.seen:
                        settling = True
                        cm.reschedule(min(cm.when() or math.inf, loop.time() + SETTLE_S))
        return view

    async def request(
        self, name: CommandName, payload: bytes, request_id: str, timeout_s: float
    ) -> Answer:
        """Send a command (already checked by `command_payload`) and wait for its answer.

        NoAnswerError (naming the broker, the line and what its status says) when no
        answer comes within `timeout_s`.
        """
        t, s = self.topics, self.settings
        response_topic = t.response(s.sender)
        view = LineView(t)
        # Subscribed before publishing: an answer can never come before we listen. The
        # status only explains a missing answer, so an ACL may keep it from us.
        await self.subscribe(response_topic)
        status_readable = bool(await self.subscribe(t.status, required=False))
        props: Properties | None = None
        correlation = request_id.encode()
        if self.protocol is aiomqtt.ProtocolVersion.V5:
            # Our own response topic, the only one the daemon answers on (the documented
            # ACL, `pattern read linectl/+/response/%u`, covers both protocols).
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = response_topic
            props.CorrelationData = correlation
        cmd_topic = t.cmd(name.value, s.sender)
        await cancellable(
            self.client.publish(cmd_topic, payload, qos=1, retain=False, properties=props)
        )
        self.sent = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async for m in self.client.messages:
                    if m.topic.value != response_topic:
                        view.apply(m.topic.value, m.payload)
                        continue
                    obj = decode(m.payload)
                    if obj is None or obj.get("request_id") != request_id:
                        continue  # another request's answer (same sender, another shell)
                    theirs = getattr(m.properties, "CorrelationData", None)
                    if theirs is not None and bytes(theirs) != correlation:
                        continue
                    return Answer(read_answer(obj), obj)
        if not status_readable:
            view.problems.append(f"the broker does not let us read {t.status}")
        raise NoAnswerError(no_answer_text(s, view, cmd_topic, timeout_s))


def status_hint(settings: ClientSettings, view: LineView) -> str:
    """What the line's retained status says about why it did not answer or is not there."""
    s = settings
    if view.problems:
        text = "; ".join(view.problems) + ", so whether the line is there is unknown"
    elif view.status is None:
        text = (
            f"no linectl has published {view.topics.status} on this broker, or its ACL "
            f"does not let {s.username or 'an anonymous client'} read it; check the broker, "
            "the line id and topic_prefix, and that `linectl run` runs with "
            "[mqtt] enabled = true"
        )
    elif not view.online:
        text = f"the line is {status_text(view.status)}; is `linectl run` running?"
    else:
        text = (
            "the line reports online but did not answer (the broker's ACL may not let "
            f"sender {s.sender!r} publish there or read {view.topics.response(s.sender)}); "
            "the command may still be carried out: check `linectl status`"
        )
    if not s.mqtt_enabled:
        text += "; note: [mqtt] enabled = false in this configuration"
    return text


def no_answer_text(settings: ClientSettings, view: LineView, topic: str, timeout_s: float) -> str:
    """Why a command got no answer, as far as the line's retained status tells."""
    s = settings
    return (
        f"no answer from line {s.line_id} within {timeout_s:g} s (broker {s.broker}, "
        f"{topic}): {status_hint(s, view)}"
    )


def not_online_text(settings: ClientSettings, view: LineView, timeout_s: float) -> str:
    """Why `status`/`alarms` found no line online (empty when it is online)."""
    s = settings
    if view.online:
        return ""
    if view.status is None:
        return (
            f"no status of line {s.line_id} at broker {s.broker} within {timeout_s:g} s: "
            + status_hint(s, view)
        )
    return f"line {s.line_id} at broker {s.broker}: " + status_hint(s, view)


# ---------------------------------------------------------------------- what the CLI runs


async def read_line(
    settings: ClientSettings, need: Iterable[str], timeout_s: float = DEFAULT_TIMEOUT_S
) -> LineView:
    """Connect, read the retained topics, disconnect."""
    try:
        async with LineClient(settings, connect_timeout_s=timeout_s) as c:
            return await c.read(need, timeout_s)
    except aiomqtt.MqttError as exc:
        raise BrokerError(f"lost MQTT broker {settings.broker}: {exc}") from None


async def send_command(
    client: LineClient, name: CommandName, payload: bytes, request_id: str, timeout_s: float
) -> Answer:
    """Send one command on a new connection of `client` and wait for its answer."""
    try:
        async with client:
            return await client.request(name, payload, request_id, timeout_s)
    except aiomqtt.MqttError as exc:
        s = client.settings
        after = (
            f" after {name.value} was sent (it may still be carried out: check `linectl status`)"
            if client.sent
            else f"; {name.value} was not sent"
        )
        raise BrokerError(f"lost MQTT broker {s.broker} (line {s.line_id}){after}: {exc}") from None


class _Screen:
    """`watch` on a terminal: the whole screen redrawn in place, at most 10 times a second."""

    MIN_INTERVAL_S = 0.1

    def __init__(self, out: TextIO, clock: Callable[[], float]) -> None:
        self.out = out
        self.clock = clock
        self.drawn_s = -math.inf
        self.dirty = True

    def start(self) -> None:
        self.out.write("\x1b[?25l\x1b[H\x1b[2J")  # hide the cursor, clear
        self.out.flush()

    def draw(self, lines: list[str]) -> None:
        width = max(20, shutil.get_terminal_size().columns)
        # Home, overwrite each line and clear its rest, clear below: no flicker.
        body = "".join(f"{line[:width]}\x1b[K\n" for line in lines)
        self.out.write(f"\x1b[H{body}\x1b[J")
        self.out.flush()
        self.drawn_s = self.clock()
        self.dirty = False

    def close(self) -> None:
        self.out.write("\x1b[?25h")  # the cursor back
        self.out.flush()


async def watch(
    settings: ClientSettings,
    out: TextIO,
    *,
    screen: bool,
    duration_s: float | None = None,
    connect_timeout_s: float = DEFAULT_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
    wall_ms: Callable[[], int] = unix_ms,
    backoff_max_s: float = 5.0,
) -> None:
    """Follow the line until cancelled (Ctrl-C) or `duration_s` has passed.

    `screen`: redraw a compact screen in place (a terminal); else print one line per
    update (a pipe, a log). The first connection must succeed (BrokerError otherwise);
    after that a lost broker is shown and reconnected to, with backoff.
    """
    view = LineView(settings.topics)
    t = settings.topics
    topics: tuple[str, ...] = (t.status, t.state, t.alarms_active, t.live("+"))
    topics += (t.record("metres"), t.record("reel"), t.record("alarm"))
    scr = _Screen(out, clock) if screen else None
    note = ""

    def emit(lines: list[str]) -> None:
        if scr is None:
            for line in lines:
                out.write(line + "\n")
            out.flush()
        elif lines or note:
            scr.dirty = True

    connected_once = False

    async def connection(connected: Callable[[], None]) -> None:
        nonlocal note, connected_once
        async with LineClient(settings, connect_timeout_s=connect_timeout_s) as c:
            await c.subscribe(*topics)
            connected()
            connected_once = True
            if note:
                note = ""
                emit([f"{clock_text(wall_ms(), ms=True)} broker {settings.broker} back"])
            async for m in c.client.messages:
                emit(view.apply(m.topic.value, m.payload))

    def lost(exc: Exception) -> None:
        nonlocal note
        if not connected_once:
            if isinstance(exc, BrokerError):
                raise exc
            raise BrokerError(f"lost MQTT broker {settings.broker}: {exc}") from None
        note = f"broker {settings.broker} lost ({exc}); reconnecting"
        emit([f"{clock_text(wall_ms(), ms=True)} {note}"])

    async def follow() -> None:
        # Until cancelled (Ctrl-C) or the duration is over: no stop event.
        await reconnect_loop(
            connection,
            Backoff(backoff_max_s, first_s=0.2),
            retry=(aiomqtt.MqttError, BrokerError),
            on_error=lost,
        )

    await _run_watch(scr, follow, lambda: view.screen_lines(settings, wall_ms(), note), duration_s)


async def _run_watch(
    scr: _Screen | None,
    follow: Callable[[], Coroutine[Any, Any, None]],
    screen_lines: Callable[[], list[str]],
    duration_s: float | None,
) -> None:
    """Run `follow` until cancelled (Ctrl-C), until it fails, or until `duration_s` has
    passed (the normal end); on a screen (`scr`), draw `screen_lines()` meanwhile."""

    async def ticker() -> None:
        # Redraws what changed (at most every MIN_INTERVAL_S), and the clock each second.
        assert scr is not None
        while True:
            await asyncio.sleep(scr.MIN_INTERVAL_S)
            if scr.dirty or scr.clock() - scr.drawn_s >= 1.0:
                scr.draw(screen_lines())

    async def run() -> None:
        if scr is None:
            await follow()
            return
        async with task_group() as tg:
            tg.create_task(follow(), name="watch-follow")
            tg.create_task(ticker(), name="watch-screen")

    if scr is not None:
        scr.start()
    deadline = asyncio.timeout(duration_s)
    try:
        async with deadline:
            await run()
    except TimeoutError:
        if not deadline.expired():
            raise
        # --duration: the normal end.
    except BaseExceptionGroup as group:  # the screen's task group: its one real error
        raise group.exceptions[0] from None
    finally:
        if scr is not None:
            scr.draw(screen_lines())
            scr.close()


# ---------------------------------------------------------------------- the HMI's state

HMI_LIVE: Final = (
    # (live value, section of the state document, its key there, the PLC link)
    ("beam_current_ma", "beam", "current_ma", "accelerator"),
    ("beam_current_sp_ma", "beam", "current_sp_ma", ""),
    ("energy_mev", "beam", "energy_mev", "accelerator"),
    ("speed_m_min", "conveyor", "speed_m_min", "conveyor"),
    ("speed_sp_m_min", "conveyor", "speed_sp_m_min", ""),
    ("tension_n", "conveyor", "tension_n", "conveyor"),
    ("reel_position_m", "reel", "position_m", "conveyor"),
)
"""The live values the HMI's state document carries, and where (set-points are the
controller's own, good whatever the links say)."""


def _section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, Mapping) else {}


def hmi_payloads(doc: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The HMI's state document (GET /api/state and the /ws feed of `linectl run` with
    [http] enabled; linectl.web.feed) as the MQTT payloads `LineView` reads: (schema
    name, variable part, payload), for `status`, `state`, `alarms_active` and the live
    values it carries. A value whose PLC link is down has quality `comm_fail`."""
    t_ms = doc.get("t_ms")
    st = _section(doc, "status")
    reel = doc.get("reel")
    recipe = _section(doc, "recipe")
    links = _section(doc, "links")
    out: list[tuple[str, str, dict[str, Any]]] = [("status", "", {"status": "online"})]
    out.append(
        (
            "state",
            "",
            {
                "state": st.get("state", "?"),
                "cause": st.get("cause", ""),
                "not_ready_reason": st.get("not_ready_reason", ""),
                "reel": None
                if not isinstance(reel, Mapping)
                else {
                    "reel_id": reel.get("reel_id"),
                    "planned_length_m": reel.get("planned_length_m"),
                    "started": reel.get("started"),
                },
                "recipe": {"product": recipe.get("product"), "version": recipe.get("version")},
                "quality": "good",
                "t_ms": st.get("since_ms"),
            },
        )
    )
    alarms = doc.get("alarms")
    out.append(
        ("alarms_active", "", {"alarms": alarms if isinstance(alarms, list) else [], "t_ms": t_ms})
    )
    for name, section, key, link in HMI_LIVE:
        part = _section(doc, section)
        if section == "reel" and not part:
            continue
        up = not link or _section(links, link).get("up") is not False
        value = {
            "name": name,
            "value": part.get(key),
            "unit": LIVE_UNITS.get(name, ""),
            "quality": "good" if up else "comm_fail",
            "t_ms": t_ms,
        }
        out.append(("live", name, value))
    return out


def hmi_view(settings: ClientSettings, doc: Mapping[str, Any]) -> LineView:
    """The line as the HMI's state document describes it (for `status` and `alarms`)."""
    view = LineView(settings.topics, carried=frozenset(name for name, *_ in HMI_LIVE))
    for kind, var, obj in hmi_payloads(doc):
        view._take(kind, var, obj)
    return view


class HmiWatch:
    """`watch` over the HMI's live feed: the screen and the lines of the MQTT `watch`,
    from each new state document. A feed follower (linectl.webclient.follow) calls
    `state`, `lost` and `back`."""

    def __init__(
        self,
        settings: ClientSettings,
        out: TextIO,
        *,
        screen: bool,
        deadbands: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = unix_ms,
    ) -> None:
        self.settings = settings
        self.out = out
        self.wall_ms = wall_ms
        self.deadbands = dict(deadbands or {})
        """Per live value: a line only when it moved by more than this since the last
        line ([mqtt.deadbands], the MQTT telemetry's report by exception)."""
        self._printed: dict[str, tuple[object, object]] = {}
        self.view = LineView(settings.topics, carried=frozenset(name for name, *_ in HMI_LIVE))
        self.scr = _Screen(out, clock) if screen else None
        self.note = ""
        self._shown: dict[tuple[str, str], str] = {}
        self._dose: tuple[object, int] = (None, 0)
        self._reel: tuple[object, object] | None = None
        self._alarm_states: dict[str, str] = {}

    def screen_lines(self) -> list[str]:
        """The screen now."""
        return self.view.screen_lines(self.settings, self.wall_ms(), self.note)

    def _emit(self, lines: list[str]) -> None:
        if self.scr is None:
            for line in lines:
                self.out.write(line + "\n")
            self.out.flush()
        elif lines or self.note:
            self.scr.dirty = True

    def state(self, doc: Mapping[str, Any]) -> None:
        """A new state document: what changed, as the MQTT watch shows it."""
        at = clock_text(doc.get("t_ms"), ms=True)
        lines: list[str] = []
        for kind, var, obj in hmi_payloads(doc):
            taken = self.view._take(kind, var, obj)
            # A line when what people read changes (not at each jitter of a value).
            if kind == "live":
                if not self._moved(var, obj):
                    continue
                shown = live_text(var, obj)
            elif kind == "status":
                shown = status_text(obj)
                taken = [f"{at} status {shown}"]
            elif kind == "state":
                shown = state_text(obj)
            else:
                shown = alarms_text(obj)
            if self._shown.get((kind, var)) != shown:
                self._shown[kind, var] = shown
                lines.extend(taken)
        lines.extend(self._events(doc, at))
        lines.extend(self._metres(doc, at))
        self._emit(lines)

    def _moved(self, name: str, obj: Mapping[str, Any]) -> bool:
        """Whether a live value moved past its deadband (or changed quality) since its
        last line; if so, this is its last line."""
        value, quality = obj.get("value"), obj.get("quality")
        last = self._printed.get(name)
        band = self.deadbands.get(name, 0.0)
        if last is not None and last[1] == quality and band > 0:
            old = last[0]
            if (
                isinstance(old, int | float)
                and isinstance(value, int | float)
                and abs(value - old) <= band
            ):
                return False
        self._printed[name] = (value, quality)
        return True

    def _event(self, text: str, at: str, t_ms: object) -> str:
        self.view.events.append(f"{clock_text(t_ms)} {text}")
        return f"{at} {text}"

    def _events(self, doc: Mapping[str, Any], at: str) -> list[str]:
        """Reel and alarm changes (over MQTT: the records/reel and records/alarm events)."""
        t_ms = doc.get("t_ms")
        lines: list[str] = []
        reel = doc.get("reel")
        now = (reel.get("reel_id"), reel.get("started")) if isinstance(reel, Mapping) else None
        if now != self._reel:
            if now is not None and isinstance(reel, Mapping):
                planned = reel.get("planned_length_m")
                plan = f"{planned:g}" if isinstance(planned, int | float) else "?"
                started = "started" if reel.get("started") else "on the line (not started)"
                text = f"reel {now[0]} {started}, {plan} m planned, operator "
                text += str(reel.get("operator") or "?")
                lines.append(self._event(text, at, t_ms))
            elif self._reel is not None:
                lines.append(self._event(f"reel {self._reel[0]} off the line", at, t_ms))
            self._reel = now
        states: dict[str, str] = {}
        alarms = doc.get("alarms")
        for a in alarms if isinstance(alarms, list) else []:
            if isinstance(a, Mapping):
                kind = str(a.get("kind", "?"))
                states[kind] = alarm_state_text(a) or ("active" if a.get("active") else "clear")
                if self._alarm_states.get(kind) != states[kind]:
                    text = f"alarm {kind} {states[kind]}: {a.get('message', '')}"
                    lines.append(self._event(text, at, t_ms))
        for kind in self._alarm_states.keys() - states.keys():
            lines.append(self._event(f"alarm {kind} gone", at, t_ms))
        self._alarm_states = states
        return lines

    def _metres(self, doc: Mapping[str, Any], at: str) -> list[str]:
        """New points of the reel's dose chart, as a `records/metres` batch."""
        dose = _section(doc, "dose")
        reel_id, points = dose.get("reel_id"), dose.get("points")
        if reel_id is None or not isinstance(points, list):
            return []
        old_reel, seen = self._dose
        if reel_id != old_reel or len(points) < seen:
            # Another reel, or its chart rebuilt: counted again from its first metre.
            self.view.reels.pop(str(reel_id), None)
            seen = 0
        self._dose = (reel_id, len(points))
        metres = [
            {"index": p[0], "dose_kgy": p[1], "verdict": p[4]}
            for p in points[seen:]
            if isinstance(p, list) and len(p) >= 5
        ]
        if not metres:
            return []
        return [f"{at} {self.view._metres({'reel_id': reel_id, 'metres': metres})}"]

    def lost(self, why: str) -> None:
        """The feed is gone (reconnecting)."""
        self.note = f"{self.settings.where} lost ({why}); reconnecting"
        self._emit([f"{clock_text(self.wall_ms(), ms=True)} {self.note}"])

    def back(self) -> None:
        """The feed is back."""
        self.note = ""
        self._emit([f"{clock_text(self.wall_ms(), ms=True)} {self.settings.where} back"])


async def watch_hmi(
    settings: ClientSettings,
    out: TextIO,
    follow: Callable[[HmiWatch], Coroutine[Any, Any, None]],
    *,
    screen: bool,
    duration_s: float | None = None,
    deadbands: Mapping[str, float] | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_ms: Callable[[], int] = unix_ms,
) -> None:
    """`watch` over the HMI's live feed: `follow(sink)` feeds the state documents in
    (linectl.webclient.follow); the screen and lines are the MQTT watch's."""
    sink = HmiWatch(settings, out, screen=screen, deadbands=deadbands, clock=clock, wall_ms=wall_ms)
    await _run_watch(sink.scr, lambda: follow(sink), sink.screen_lines, duration_s)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Answer",
    "BrokerError",
    "ClientSettings",
    "HmiWatch",
    "LineClient",
    "LineView",
    "NoAnswerError",
    "check_sender",
    "classify",
    "client_settings",
    "command_payload",
    "describe_answer",
    "hmi_payloads",
    "hmi_view",
    "new_request_id",
    "no_answer_text",
    "not_online_text",
    "parse_broker",
    "read_answer",
    "read_line",
    "send_command",
    "status_hint",
    "watch",
    "watch_hmi",
]
