"""MQTT telemetry, pure: topic names, payloads, their JSON Schema, report by exception.

No I/O and no clock: every time is an argument (unix milliseconds for payloads,
seconds of any monotonic clock for the report-by-exception filter). The adapter in
linectl.mqtt publishes what this module builds; docs/mqtt.md is the reader's version of
the same protocol, and `SCHEMAS` is its machine-readable one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from linectl.quality import Quality

SCHEMA_VERSION: Final = 1

# ---------------------------------------------------------------------- live values


@dataclass(frozen=True, slots=True)
class LiveValue:
    """One live value with its quality and the unix time (ms) it was measured at."""

    name: str
    value: float | int | bool | None
    quality: Quality
    t_ms: int


@dataclass(frozen=True, slots=True)
class LiveSpec:
    """What a live value is: unit and meaning (published in the schema and docs)."""

    name: str
    unit: str
    description: str


LIVE_VALUES: Final[tuple[LiveSpec, ...]] = (
    LiveSpec("beam_current_ma", "mA", "measured beam current (accelerator)"),
    LiveSpec("energy_mev", "MeV", "measured beam energy (accelerator)"),
    LiveSpec("scan_width_cm", "cm", "measured scan width (accelerator)"),
    LiveSpec("vacuum_pa", "Pa", "accelerator vacuum"),
    LiveSpec("speed_m_min", "m/min", "measured line speed (conveyor)"),
    LiveSpec("tension_n", "N", "cable tension (conveyor)"),
    LiveSpec("length_counter_m", "m", "conveyor length counter"),
    LiveSpec("reel_position_m", "m", "reel coordinate at the length counter (null: no reel)"),
    LiveSpec("beam_current_sp_ma", "mA", "dose-follow beam current set-point"),
    LiveSpec("speed_sp_m_min", "m/min", "line speed set-point"),
)
"""Every live value the line publishes, in publishing order."""

LIVE_UNITS: Final[dict[str, str]] = {s.name: s.unit for s in LIVE_VALUES}


# ---------------------------------------------------------------------- topics


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How one topic (pattern) is published."""

    pattern: str  # relative to <prefix>/<line_id>
    qos: int
    retain: bool
    schema: str
    description: str


RECORD_KINDS: Final = ("metres", "reel", "alarm", "audit")
"""Record kinds the store's outbox holds; each has its topic `records/<kind>`."""

TOPIC_SPECS: Final[tuple[TopicSpec, ...]] = (
    TopicSpec("status", 1, True, "status", "online/offline; the will sets offline"),
    TopicSpec("schema", 1, True, "", "the JSON Schema of every payload (this table's)"),
    TopicSpec("state", 1, True, "state", "line state, reel, recipe, active alarm kinds"),
    TopicSpec("alarms/active", 1, True, "alarms_active", "the alarm board: states and shelves"),
    TopicSpec("live/<name>", 0, True, "live", "one live value, report by exception"),
    TopicSpec("records/metres", 1, False, "metres", "completed metres (batches)"),
    TopicSpec("records/reel", 1, False, "reel", "reel start and end with its summary"),
    TopicSpec("records/alarm", 1, False, "alarm", "alarm raised, acknowledged, cleared"),
    TopicSpec("records/audit", 1, False, "audit", "every command and operator action"),
    TopicSpec("records/head", 1, True, "records_head", "the outbox's newest and oldest seq held"),
    TopicSpec("replay/<hid>", 1, False, "replay_request", "a historian asks for a seq range"),
    *(
        TopicSpec(f"replayed/<hid>/{kind}", 1, False, kind, f"replayed {kind} records")
        for kind in RECORD_KINDS
    ),
    TopicSpec("replayed/<hid>/done", 1, False, "replay_done", "a replay's end: what is missing"),
    TopicSpec(
        "historian/<hid>/confirmed",
        1,
        True,
        "historian_confirmed",
        "a historian has every record up to seq (linectl subscribes)",
    ),
    TopicSpec("cmd/<command>/<sender>", 1, False, "command", "commands to the line"),
    TopicSpec("response/<sender>", 1, False, "response", "answers to the sender's commands"),
)


def topic_base(prefix: str, line_id: str) -> str:
    """`<prefix>/<line_id>`: every topic of a line is below it."""
    return f"{prefix.strip('/')}/{line_id}"


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic names of one line."""

    base: str

    @classmethod
    def for_line(cls, prefix: str, line_id: str) -> Topics:
        """Topics under `<prefix>/<line_id>`."""
        return cls(topic_base(prefix, line_id))

    @property
    def status(self) -> str:
        """Retained online/offline; the will."""
        return f"{self.base}/status"

    @property
    def schema(self) -> str:
        """Retained JSON Schema document."""
        return f"{self.base}/schema"

    @property
    def state(self) -> str:
        """Retained line state."""
        return f"{self.base}/state"

    @property
    def alarms_active(self) -> str:
        """Retained list of active alarms."""
        return f"{self.base}/alarms/active"

    def live(self, name: str) -> str:
        """One live value."""
        return f"{self.base}/live/{name}"

    def record(self, kind: str) -> str:
        """Records of one kind (metres, reel, alarm, audit)."""
        if kind not in RECORD_KINDS:
            raise ValueError(f"unknown record kind {kind!r}")
        return f"{self.base}/records/{kind}"

    @property
    def records_head(self) -> str:
        """Retained: the outbox's newest seq and oldest seq held, with the store's id."""
        return f"{self.base}/records/head"

    def replay(self, historian: str) -> str:
        """Where historian `historian` asks the line for a range of records."""
        return f"{self.base}/replay/{historian}"

    @property
    def replay_filter(self) -> str:
        """The subscription that receives every historian's replay requests."""
        return f"{self.base}/replay/+"

    def replayed(self, historian: str, kind: str) -> str:
        """Replayed records of one kind, for one historian."""
        if kind not in RECORD_KINDS:
            raise ValueError(f"unknown record kind {kind!r}")
        return f"{self.base}/replayed/{historian}/{kind}"

    def replay_done(self, historian: str) -> str:
        """The end of a replay for one historian (with the missing sub-ranges)."""
        return f"{self.base}/replayed/{historian}/done"

    def confirmed(self, historian: str) -> str:
        """Retained, from historian `historian`: how far it has every record."""
        return f"{self.base}/historian/{historian}/confirmed"

    @property
    def confirmed_filter(self) -> str:
        """The subscription that receives every historian's confirmation."""
        return f"{self.base}/historian/+/confirmed"

    def parse_replay(self, topic: str) -> str | None:
        """The historian id of a replay-request topic (possibly empty), else None."""
        head = f"{self.base}/replay/"
        if not topic.startswith(head) or "/" in topic[len(head) :]:
            return None
        return topic[len(head) :]

    def parse_confirmed(self, topic: str) -> str | None:
        """The historian id of a confirmation topic (possibly empty), else None."""
        head, tail = f"{self.base}/historian/", "/confirmed"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        hid = topic[len(head) : len(topic) - len(tail)]
        return None if "/" in hid else hid

    def cmd(self, command: str, sender: str) -> str:
        """Where `sender` publishes `command`."""
        return f"{self.base}/cmd/{command}/{sender}"

    @property
    def cmd_filter(self) -> str:
        """The subscription that receives every command."""
        return f"{self.base}/cmd/+/+"

    def response(self, sender: str) -> str:
        """Where `sender`'s commands are answered (the only place: `answer_topic`)."""
        return f"{self.base}/response/{sender}"

    def answer_topic(self, requested: str | None, sender: str) -> str:
        """Where to answer `sender`'s command: its own response topic, `response/<sender>`,
        always. An MQTT 5 *Response Topic* on the command is honoured only when it is that
        same topic; any other (another sender's `response/<user>`, a topic outside the
        prefix, linectl's own state or record topics, Sparkplug, `$` topics) is ignored,
        and the answer goes to the sender's own topic. Else a client that may send
        commands could aim linectl's answers at another user, or make linectl publish
        wherever linectl's broker user may write (docs/security.md)."""
        del requested  # honoured only when it is the sender's own topic: the same string
        return self.response(sender)

    def parse_cmd_levels(self, topic: str) -> tuple[str, str] | None:
        """(command, sender) of a topic the command subscription delivers, either level
        possibly empty (MQTT allows empty levels; such a command is refused, audited);
        None for any other topic."""
        head = f"{self.base}/cmd/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 2:
            return None
        return parts[0], parts[1]

    def parse_cmd(self, topic: str) -> tuple[str, str] | None:
        """(command, sender) of a command topic with both levels set, None for any other
        topic."""
        levels = self.parse_cmd_levels(topic)
        return levels if levels is not None and all(levels) else None


# ---------------------------------------------------------------------- payloads


def iso_to_ms(text: str) -> int:
    """Unix ms of an ISO 8601 time with an offset (the store's format)."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError(f"time {text!r} has no UTC offset")
    return round(dt.timestamp() * 1000)


def ms_to_iso(t_ms: int) -> str:
    """ISO 8601 UTC text of unix ms (`2026-01-01T00:00:00.000Z`), for messages."""
    dt = datetime.fromtimestamp(t_ms / 1000.0, tz=UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_value(value: float | int | bool | None) -> float | int | bool | None:
    # JSON has no NaN: an unknown value is null (its quality says why).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON bytes; NaN is refused (payload builders turn it into null)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def live_payload(v: LiveValue) -> dict[str, Any]:
    """`live/<name>` payload (schema `live`)."""
    return {
        "schema": "linectl.live/1",
        "name": v.name,
        "value": _json_value(v.value),
        "unit": LIVE_UNITS.get(v.name, ""),
        "quality": v.quality.value,
        "t_ms": v.t_ms,
    }


def status_payload(online: bool, t_ms: int, *, session_ms: int) -> dict[str, Any]:
    """`status` payload. The will is built at connect time: its t_ms is the session's
    start, not the moment the broker publishes it."""
    return {
        "schema": "linectl.status/1",
        "status": "online" if online else "offline",
        "quality": Quality.GOOD.value,
        "t_ms": t_ms,
        "session_ms": session_ms,
    }


@dataclass(frozen=True, slots=True)
class LineStatus:
    """What `state` reports; built by the service from its controller."""

    state: str
    cause: str
    t_ms: int
    quality: Quality = Quality.GOOD
    reel_id: str | None = None
    reel_planned_length_m: float | None = None
    reel_started: bool = False
    recipe_product: str = ""
    recipe_version: str = ""
    alarms: tuple[str, ...] = ()
    not_ready_reason: str = ""


def state_payload(s: LineStatus) -> dict[str, Any]:
    """`state` payload (schema `state`)."""
    return {
        "schema": "linectl.state/1",
        "state": s.state,
        "cause": s.cause,
        "not_ready_reason": s.not_ready_reason,
        "reel": None
        if s.reel_id is None
        else {
            "reel_id": s.reel_id,
            "planned_length_m": s.reel_planned_length_m,
            "started": s.reel_started,
        },
        "recipe": {"product": s.recipe_product, "version": s.recipe_version},
        "alarms": list(s.alarms),
        "quality": s.quality.value,
        "t_ms": s.t_ms,
    }


@dataclass(frozen=True, slots=True)
class ActiveAlarm:
    """An alarm the controller holds now."""

    kind: str
    message: str
    latched: bool
    t_ms: int


ALARM_STATES: Final = ("unack", "acked", "rtn_unack", "shelved")
"""An alarm's state on the alarm board (ISA-18.2; docs/control.md, "Alarm states"):
active and unacknowledged, active and acknowledged, returned to normal but not yet
acknowledged, shelved (hidden from the operator's list for a while)."""


@dataclass(frozen=True, slots=True)
class AlarmView:
    """One alarm on the alarm board, as the operator's list and SCADA see it."""

    kind: str
    message: str
    state: str  # "unack" | "acked" | "rtn_unack" | "shelved"
    active: bool  # the condition holds now (for us: latched in the controller, not yet reset)
    latched: bool  # needs an operator reset
    t_ms: int  # unix ms it was last raised
    shelved_until_ms: int | None = None
    shelved_by: str | None = None
    shelve_reason: str | None = None


def alarm_view_json(a: AlarmView) -> dict[str, Any]:
    """One alarm of the board as JSON (an item of `alarms/active`, and the HMI's row)."""
    return {
        "kind": a.kind,
        "message": a.message,
        "state": a.state,
        "active": a.active,
        "latched": a.latched,
        "t_ms": a.t_ms,
        "shelved_until_ms": a.shelved_until_ms,
        "shelved_by": a.shelved_by,
        "shelve_reason": a.shelve_reason,
    }


def alarms_active_payload(alarms: Iterable[AlarmView | ActiveAlarm], t_ms: int) -> dict[str, Any]:
    """`alarms/active` payload (schema `alarms_active`): the alarm board, oldest first,
    shelved alarms included (with their state; a SCADA's operator list hides them). An
    `ActiveAlarm` (a line endpoint without a board) gives the keys it has."""
    return {
        "schema": "linectl.alarms_active/1",
        "alarms": [
            alarm_view_json(a)
            if isinstance(a, AlarmView)
            else {"kind": a.kind, "message": a.message, "latched": a.latched, "t_ms": a.t_ms}
            for a in alarms
        ],
        "quality": Quality.GOOD.value,
        "t_ms": t_ms,
    }


def record_payload(
    seq: int,
    kind: str,
    t_iso: str,
    data: Mapping[str, Any],
    *,
    historical: bool,
    store_id: str | None = None,
    replay: bool = False,
) -> dict[str, Any]:
    """`records/<kind>` payload from one outbox row (`replayed/<hid>/<kind>` with `replay`).

    `seq` is the outbox sequence number: increasing, unique per store (`store_id`, the
    store's uuid; left out when None, for callers without a store); delivery is at least
    once, so a subscriber drops a (`store_id`, `seq`) it has seen. `historical` is true
    when the record was written before the current broker session began (it waited in
    the outbox through a broker outage or a controller restart). `t` is the row's time as
    the store holds it (ISO text, verbatim, so a historian stores the line's own text),
    `t_ms` the same time in unix ms. A replayed record carries `"replay": true`.
    """
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    payload: dict[str, Any] = {
        "schema": f"linectl.{kind}/1",
        "seq": seq,
        "historical": historical,
        "quality": Quality.GOOD.value,
        "t_ms": iso_to_ms(t_iso),
        "t": t_iso,
    }
    if store_id is not None:
        payload["store_id"] = store_id
    if replay:
        payload["replay"] = True
    # The record's own keys last, as before: none of them is one of the keys above.
    payload.update(data)
    return payload


# ---------------------------------------------------------------------- the historian's topics

MAX_REPLAY_ROWS: Final = 100_000
"""The longest range one replay request may ask for (to_seq - from_seq + 1)."""

MAX_HISTORIAN_PAYLOAD_BYTES: Final = 4096
"""A replay request or confirmation larger than this is refused unread."""


def records_head_payload(store_id: str, seq: int, first_seq: int, t_ms: int) -> dict[str, Any]:
    """`records/head` payload (schema `records_head`): the newest outbox seq (0: none yet)
    and the oldest still held (`seq` + 1 when none is), of the store `store_id`."""
    return {
        "schema": "linectl.records_head/1",
        "store_id": store_id,
        "seq": seq,
        "first_seq": first_seq,
        "quality": Quality.GOOD.value,
        "t_ms": t_ms,
    }


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """A historian's request for the records from_seq..to_seq (inclusive)."""

    from_seq: int
    to_seq: int
    request_id: str = ""


def replay_request_payload(from_seq: int, to_seq: int, request_id: str) -> dict[str, Any]:
    """`replay/<hid>` payload (schema `replay_request`), as a historian sends it."""
    return {
        "schema": "linectl.replay_request/1",
        "from_seq": from_seq,
        "to_seq": to_seq,
        "request_id": request_id,
    }


class RequestError(ValueError):
    """A replay request or confirmation that cannot be used; the message says what is
    wrong. `request_id`, `from_seq`, `to_seq` are what could be read of it (for the
    answer)."""

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        from_seq: int | None = None,
        to_seq: int | None = None,
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.from_seq = from_seq
        self.to_seq = to_seq


def _json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    if len(raw) > MAX_HISTORIAN_PAYLOAD_BYTES:
        raise RequestError(f"{what} is {len(raw)} bytes, more than {MAX_HISTORIAN_PAYLOAD_BYTES}")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"{what} is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RequestError(f"{what} is not a JSON object")
    return doc


def _schema_is(doc: Mapping[str, Any], name: str, what: str) -> None:
    expected = f"linectl.{name}/1"
    if "schema" in doc and doc["schema"] != expected:
        raise RequestError(f"{what} names schema {doc['schema']!r}, not {expected!r}")


def _seq_of(doc: Mapping[str, Any], key: str) -> int | None:
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_replay_request(raw: bytes | str) -> ReplayRequest:
    """A replay request as the line takes it; RequestError saying what is wrong: not
    JSON, another schema, `from_seq`/`to_seq` missing or not whole numbers, below 1,
    inverted, a range of more than MAX_REPLAY_ROWS, a `request_id` that is not text of
    at most 128 characters."""
    what = "replay request"
    doc = _json_object(raw, what)
    rid = doc.get("request_id", "")
    request_id = rid if isinstance(rid, str) and len(rid) <= 128 else None
    a, b = _seq_of(doc, "from_seq"), _seq_of(doc, "to_seq")

    def error(message: str) -> RequestError:
        return RequestError(message, request_id=request_id, from_seq=a, to_seq=b)

    _schema_is(doc, "replay_request", what)
    if request_id is None:
        raise error(f"{what}: request_id must be text of at most 128 characters")
    for key, value in (("from_seq", a), ("to_seq", b)):
        if key not in doc:
            raise error(f"{what}: {key} is missing")
        if value is None:
            raise error(f"{what}: {key} {doc[key]!r} is not a whole number")
        if value < 1:
            raise error(f"{what}: {key} {value} is below 1 (the first seq)")
    assert a is not None
    assert b is not None
    if b < a:
        raise error(f"{what}: the range {a}..{b} is inverted (to_seq below from_seq)")
    if b - a + 1 > MAX_REPLAY_ROWS:
        raise error(
            f"{what}: the range {a}..{b} holds {b - a + 1} seqs, more than {MAX_REPLAY_ROWS}: "
            "ask for it in parts"
        )
    return ReplayRequest(a, b, request_id)


def replay_done_payload(
    request_id: str | None,
    from_seq: int | None,
    to_seq: int | None,
    missing: Iterable[tuple[int, int]],
    t_ms: int,
    *,
    error: str | None = None,
) -> dict[str, Any]:
    """`replayed/<hid>/done` payload (schema `replay_done`): the sub-ranges [lo, hi] of
    from_seq..to_seq the line no longer holds (pruned) or never wrote. With `error` the
    request was refused (nothing was replayed); what could be read of it is echoed,
    null otherwise."""
    payload: dict[str, Any] = {
        "schema": "linectl.replay_done/1",
        "request_id": request_id,
        "from_seq": from_seq,
        "to_seq": to_seq,
        "missing": [[lo, hi] for lo, hi in missing],
        "quality": Quality.GOOD.value,
        "t_ms": t_ms,
    }
    if error is not None:
        payload["error"] = error
    return payload


@dataclass(frozen=True, slots=True)
class Confirmation:
    """A historian has committed every record 1..seq of store `store_id`."""

    store_id: str
    seq: int


def historian_confirmed_payload(store_id: str, seq: int, t_ms: int) -> dict[str, Any]:
    """`historian/<hid>/confirmed` payload (schema `historian_confirmed`), as a historian
    sends it."""
    return {
        "schema": "linectl.historian_confirmed/1",
        "store_id": store_id,
        "seq": seq,
        "t_ms": t_ms,
    }


def parse_confirmation(raw: bytes | str) -> Confirmation:
    """A historian's confirmation; RequestError saying what is wrong (not JSON, another
    schema, `store_id` not text, `seq` missing, not a whole number or negative)."""
    what = "historian confirmation"
    doc = _json_object(raw, what)
    _schema_is(doc, "historian_confirmed", what)
    store_id = doc.get("store_id")
    if not isinstance(store_id, str) or not store_id:
        raise RequestError(f"{what}: store_id must be non-empty text")
    seq = _seq_of(doc, "seq")
    if seq is None:
        raise RequestError(f"{what}: seq {doc.get('seq')!r} is missing or not a whole number")
    if seq < 0:
        raise RequestError(f"{what}: seq {seq} is negative")
    return Confirmation(store_id, seq)


# ---------------------------------------------------------------------- report by exception


ReportValue = float | int | bool | str | None
"""A value reported by exception (live values; Sparkplug metrics may also be text)."""


def report_due(
    last: tuple[ReportValue, Quality, float] | None,
    value: ReportValue,
    quality: Quality,
    now_s: float,
    *,
    deadband: float = 0.0,
    min_interval_s: float = 0.0,
    max_age_s: float = math.inf,
) -> bool:
    """Report by exception, the one rule (the MQTT live values and the Sparkplug node).

    `last` is (value, quality, time) of the last report, None if there was none. A value
    is reported when it is the first, when its quality changed (at once), or, at least
    `min_interval_s` after the last report, when the last report is `max_age_s` old or
    the value moved by more than `deadband` (any change when it is 0). A change between
    a number, NaN and None (unknown) is a change; NaN to NaN is none.
    """
    if last is None:
        return True
    old, old_quality, sent_s = last
    if old_quality is not quality:
        return True
    age_s = now_s - sent_s
    if age_s < min_interval_s:
        return False
    if age_s >= max_age_s:
        return True
    return _moved(old, value, deadband)


def _moved(old: ReportValue, new: ReportValue, band: float) -> bool:
    if old is None or new is None or isinstance(old, bool | str) or isinstance(new, bool | str):
        return old != new
    old_nan, new_nan = math.isnan(old), math.isnan(new)
    if old_nan or new_nan:
        return old_nan != new_nan
    if band <= 0:
        return old != new
    return abs(new - old) > band


@dataclass
class ReportFilter:
    """Report by exception for live values (`report_due`, by value name).

    A value is published when it is new, when its quality changes, when it moved by more
    than its deadband since it was last published (any change when it has none), or when
    it was last published `max_age_s` ago; never more often than `min_interval_s`, except
    for a change of quality, which goes at once.
    """

    deadbands: Mapping[str, float] = field(default_factory=dict)
    max_age_s: float = 5.0
    min_interval_s: float = 0.1
    _sent: dict[str, tuple[ReportValue, Quality, float]] = field(default_factory=dict)

    def offer(self, v: LiveValue, now_s: float) -> bool:
        """Whether to publish `v` now; if so it counts as published at `now_s`."""
        due = report_due(
            self._sent.get(v.name),
            v.value,
            v.quality,
            now_s,
            deadband=self.deadbands.get(v.name, 0.0),
            min_interval_s=self.min_interval_s,
            max_age_s=self.max_age_s,
        )
        if due:
            self._sent[v.name] = (v.value, v.quality, now_s)
        return due

    def forget(self) -> None:
        """Publish everything afresh (after a reconnect: retained values may be gone)."""
        self._sent.clear()


# ---------------------------------------------------------------------- JSON Schema

_T_MS = {"type": "integer", "description": "unix time, milliseconds"}
_QUALITY = {"enum": [q.value for q in Quality]}
_NUM_OR_NULL = {"type": ["number", "null"]}


def _obj(schema_id: str, props: Mapping[str, Any], required: Iterable[str]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"linectl.{schema_id}/1",
        "type": "object",
        "properties": {"schema": {"const": f"linectl.{schema_id}/1"}, **props},
        "required": ["schema", *required],
    }


_RECORD_COMMON = {
    "seq": {"type": "integer", "minimum": 1},
    "historical": {"type": "boolean"},
    "quality": _QUALITY,
    "t_ms": _T_MS,
    # Always sent by this linectl; optional so that an older one's records still check.
    "t": {"type": "string", "description": "the record's time as the store holds it"},
    "store_id": {"type": "string", "description": "the record store's uuid"},
    "replay": {"const": True, "description": "on replayed/<hid>/<kind> only"},
}
_RECORD_REQUIRED = ("seq", "historical", "quality", "t_ms")

_METRE = {
    "type": "object",
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "dose_kgy": _NUM_OR_NULL,
        "min_dose_kgy": _NUM_OR_NULL,
        "max_dose_kgy": _NUM_OR_NULL,
        "verdict": {"type": "string"},
        "causes": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["index", "dose_kgy", "verdict", "causes"],
}

SCHEMAS: Final[dict[str, dict[str, Any]]] = {
    "status": _obj(
        "status",
        {
            "status": {"enum": ["online", "offline"]},
            "quality": _QUALITY,
            "t_ms": _T_MS,
            "session_ms": _T_MS,
        },
        ("status", "quality", "t_ms"),
    ),
    "state": _obj(
        "state",
        {
            "state": {
                "enum": ["offline", "idle", "ready", "starting", "running", "stopping", "fault"]
            },
            "cause": {"type": "string"},
            "not_ready_reason": {"type": "string"},
            "reel": {
                "type": ["object", "null"],
                "properties": {
                    "reel_id": {"type": "string"},
                    "planned_length_m": _NUM_OR_NULL,
                    "started": {"type": "boolean"},
                },
            },
            "recipe": {
                "type": "object",
                "properties": {"product": {"type": "string"}, "version": {"type": "string"}},
            },
            "alarms": {"type": "array", "items": {"type": "string"}},
            "quality": _QUALITY,
            "t_ms": _T_MS,
        },
        ("state", "cause", "reel", "recipe", "alarms", "quality", "t_ms"),
    ),
    "alarms_active": _obj(
        "alarms_active",
        {
            "alarms": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string"},
                        "message": {"type": "string"},
                        "latched": {"type": "boolean", "description": "needs an operator reset"},
                        "t_ms": {**_T_MS, "description": "when it was last raised, unix ms"},
                        # Since the alarm board (ISA-18.2 states, shelving): always sent by
                        # linectl; optional so that an older daemon's payload still checks.
                        "state": {"enum": list(ALARM_STATES)},
                        "active": {
                            "type": "boolean",
                            "description": "its condition holds (latched, not yet reset)",
                        },
                        "shelved_until_ms": {
                            "type": ["integer", "null"],
                            "description": "shelved until (unix ms); null: not shelved",
                        },
                        "shelved_by": {"type": ["string", "null"]},
                        "shelve_reason": {"type": ["string", "null"]},
                    },
                    "required": ["kind", "message", "latched", "t_ms"],
                },
            },
            "quality": _QUALITY,
            "t_ms": _T_MS,
        },
        ("alarms", "quality", "t_ms"),
    ),
    "live": _obj(
        "live",
        {
            "name": {"enum": [s.name for s in LIVE_VALUES]},
            "value": {"type": ["number", "boolean", "null"]},
            "unit": {"type": "string"},
            "quality": _QUALITY,
            "t_ms": _T_MS,
        },
        ("name", "value", "unit", "quality", "t_ms"),
    ),
    "metres": _obj(
        "metres",
        {
            **_RECORD_COMMON,
            "reel_id": {"type": "string"},
            "event": {"enum": ["metres", "unproven"]},
            "metres": {"type": "array", "items": _METRE},
            "first_index": {"type": "integer"},
            "last_index": {"type": "integer"},
            "cause": {"type": "string"},
        },
        (*_RECORD_REQUIRED, "reel_id", "event"),
    ),
    "reel": _obj(
        "reel",
        {
            **_RECORD_COMMON,
            "reel_id": {"type": "string"},
            "event": {"enum": ["start", "end"]},
            "line_id": {"type": "string"},
            "operator": {"type": "string"},
            "planned_length_m": _NUM_OR_NULL,
            "recipe": {
                "type": "object",
                "properties": {
                    "product": {"type": "string"},
                    "version": {"type": "string"},
                    "hash": {"type": "string"},
                },
            },
            "recipe_json": {"type": "string", "description": "the recipe as validated"},
            "start": {"type": "object", "description": "the reel's start data"},
            "started_at": {"type": "string"},
            "reason": {"type": "string"},
            "summary": {"type": "object"},
        },
        (*_RECORD_REQUIRED, "reel_id", "event"),
    ),
    "alarm": _obj(
        "alarm",
        {
            **_RECORD_COMMON,
            "alarm_id": {"type": "integer"},
            "event": {"enum": ["raised", "acknowledged", "cleared"]},
            "kind": {"type": "string"},
            "message": {"type": "string"},
            "reel_id": {"type": ["string", "null"]},
            "by": {"type": "string"},
        },
        (*_RECORD_REQUIRED, "alarm_id", "event", "kind"),
    ),
    "audit": _obj(
        "audit",
        {
            **_RECORD_COMMON,
            "event_id": {"type": "integer"},
            "actor": {"type": "string"},
            "action": {"type": "string"},
            "detail": {"type": "object"},
            "accepted": {"type": "boolean"},
            "reason": {"type": "string"},
            "reel_id": {"type": ["string", "null"]},
        },
        (*_RECORD_REQUIRED, "event_id", "actor", "action", "accepted", "reason"),
    ),
    "records_head": _obj(
        "records_head",
        {
            "store_id": {"type": "string"},
            "seq": {"type": "integer", "minimum": 0, "description": "newest seq; 0: none"},
            "first_seq": {
                "type": "integer",
                "minimum": 1,
                "description": "oldest seq still held; seq + 1 when none is",
            },
            "quality": _QUALITY,
            "t_ms": _T_MS,
        },
        ("store_id", "seq", "first_seq", "t_ms"),
    ),
    "replay_request": _obj(
        "replay_request",
        {
            "from_seq": {"type": "integer", "minimum": 1},
            "to_seq": {"type": "integer", "minimum": 1},
            "request_id": {"type": "string", "maxLength": 128},
        },
        ("from_seq", "to_seq"),
    ),
    "replay_done": _obj(
        "replay_done",
        {
            "request_id": {"type": ["string", "null"]},
            "from_seq": {"type": ["integer", "null"]},
            "to_seq": {"type": ["integer", "null"]},
            "missing": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
            "error": {"type": "string", "description": "the request was refused: why"},
            "quality": _QUALITY,
            "t_ms": _T_MS,
        },
        ("request_id", "from_seq", "to_seq", "missing", "t_ms"),
    ),
    "historian_confirmed": _obj(
        "historian_confirmed",
        {
            "store_id": {"type": "string"},
            "seq": {"type": "integer", "minimum": 0},
            "t_ms": _T_MS,
        },
        ("store_id", "seq"),
    ),
    "command": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "linectl.command/1",
        "type": "object",
        "properties": {
            "command": {"type": "string", "description": "optional; must match the topic"},
            "sender": {"type": "string", "description": "optional; must match the topic"},
            "request_id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
            "reason": {"type": "string"},
            "reel_id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
            "length_m": {"type": "number", "exclusiveMinimum": 0},
            "operator": {"type": "string"},
            "recipe": {"type": "string"},
            "alarm": {"type": "string"},
            "duration_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 43200},
        },
        "additionalProperties": False,
    },
    "response": _obj(
        "response",
        {
            "result": {"enum": ["ACK", "NAK"]},
            "ack": {"type": "boolean"},
            "reason": {"type": "string"},
            "command": {"type": "string"},
            "request_id": {"type": "string"},
            "state": {"type": "string"},
            "detail": {"type": "object"},
            "t_ms": _T_MS,
        },
        ("result", "ack", "reason", "command", "request_id", "t_ms"),
    ),
}
"""JSON Schema (2020-12) of every payload, by schema name (TOPIC_SPECS names them)."""


def schema_document() -> dict[str, Any]:
    """The retained `schema` topic's payload: every schema and the topic table."""
    return {
        "schema": "linectl.schema/1",
        "version": SCHEMA_VERSION,
        "topics": [
            {
                "topic": t.pattern,
                "qos": t.qos,
                "retain": t.retain,
                "schema": t.schema,
                "description": t.description,
            }
            for t in TOPIC_SPECS
        ],
        "schemas": SCHEMAS,
    }


__all__ = [
    "ALARM_STATES",
    "LIVE_VALUES",
    "MAX_HISTORIAN_PAYLOAD_BYTES",
    "MAX_REPLAY_ROWS",
    "RECORD_KINDS",
    "SCHEMAS",
    "TOPIC_SPECS",
    "ActiveAlarm",
    "AlarmView",
    "Confirmation",
    "LineStatus",
    "LiveSpec",
    "LiveValue",
    "ReplayRequest",
    "ReportFilter",
    "ReportValue",
    "RequestError",
    "TopicSpec",
    "Topics",
    "alarm_view_json",
    "alarms_active_payload",
    "encode",
    "historian_confirmed_payload",
    "iso_to_ms",
    "live_payload",
    "ms_to_iso",
    "parse_confirmation",
    "parse_replay_request",
    "record_payload",
    "records_head_payload",
    "replay_done_payload",
    "replay_request_payload",
    "report_due",
    "schema_document",
    "state_payload",
    "status_payload",
    "topic_base",
]
