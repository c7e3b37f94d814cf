"""Sparkplug B edge node, pure: topics, payloads and the session rules (docs/sparkplug.md).

No I/O and no clock: every time is an argument (`now_ms`: unix milliseconds, UTC, for
payload timestamps; `now_s`: seconds of any monotonic clock, for report-by-exception
intervals). `EdgeNode` turns the line's readings into `(topic, payload bytes)` messages
and Sparkplug commands into linectl `Command`s; the adapter in linectl.sparkplug.adapter
publishes what it builds, in the order it builds it.

Session rules kept here (Sparkplug 3.0):
- bdSeq: starts at 0 and goes up by one (255 -> 0) on every new MQTT CONNECT
  (`new_session`; `retry_session` keeps it after a CONNECT that was never acknowledged);
  the NDEATH registered as the will carries it, and so does the NBIRTH of that connection
  and of every rebirth within it.
- seq: NBIRTH has 0; every later NBIRTH/DBIRTH/NDATA/DDATA has the previous + 1, 255 -> 0.
  NDEATH carries none.
- Births before data: `data` and `metres` refuse to build anything before `birth`.
- Devices with a PLC behind them (accelerator, conveyor) get a DDEATH when the link is
  lost (every metric COMM_FAIL) and a DBIRTH when it is back; no DDATA in between.
- Aliases: every metric has a fixed alias, unique across the node, except
  'Node Control/Rebirth', which must have none. BIRTHs carry name and alias; DATA carries
  the alias only.
- Quality: the property "Quality" (Int32): 192 GOOD, 500 STALE, 0 BAD (comm-fail).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from linectl.commands import Command, CommandError, CommandName, CommandResult, nak, parse_command
from linectl.core.ledger import MetreRecord
from linectl.errors import ConfigError, LocalError
from linectl.quality import Quality
from linectl.sparkplug import sparkplug_b_pb2 as pb
from linectl.telemetry import report_due

NAMESPACE: Final = "spBv1.0"
BDSEQ: Final = "bdSeq"
REBIRTH: Final = "Node Control/Rebirth"
LAST_RESULT: Final = "Commands/last_result"
REQUEST: Final = "Commands/request"

DT = pb.DataType
QUALITY_CODE: Final[dict[Quality, int]] = {
    Quality.GOOD: 192,
    Quality.STALE: 500,
    Quality.COMM_FAIL: 0,
}
"""Sparkplug quality codes (spec 6.4.10 "Quality Codes"): 0 BAD, 192 GOOD, 500 STALE."""
QUALITY_OF_CODE: Final[dict[int, Quality]] = {v: k for k, v in QUALITY_CODE.items()}

_ID_RE = re.compile(r"^[^+/#]{1,128}$")
_SENDER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_U64 = (1 << 64) - 1
_INT_BITS: Final[dict[int, int]] = {int(DT.Int8): 8, int(DT.Int16): 16, int(DT.Int32): 32}
_U32 = (1 << 32) - 1

Value = float | int | bool | str | None
Message = tuple[str, bytes]
"""(topic, payload): publish with QoS 0, retain false (NDEATH as the will: QoS 1)."""


class Reading(Protocol):
    """What a metric is fed from: linectl.telemetry.LiveValue fits."""

    @property
    def value(self) -> Value:
        """The value; None when unknown."""
        ...

    @property
    def quality(self) -> Quality:
        """Whether it can be trusted."""
        ...

    @property
    def t_ms(self) -> int:
        """Unix ms when it was measured."""
        ...


@dataclass(frozen=True, slots=True)
class Sample:
    """A reading the node makes itself (line status, records, command results)."""

    value: Value
    quality: Quality
    t_ms: int


# ---------------------------------------------------------------------- the metric table


@dataclass(frozen=True, slots=True)
class MetricDef:
    """One Sparkplug metric of the node or of one of its devices."""

    name: str
    """Metric name (folders separated by '/')."""
    alias: int | None
    """Fixed alias, unique across the node; None only for 'Node Control/Rebirth'."""
    datatype: int
    """Sparkplug DataType (sparkplug_b.proto)."""
    unit: str = ""
    """Engineering unit, sent in BIRTHs as the property "engUnit"."""
    command: CommandName | None = None
    """A writable command metric: writing it (NCMD/DCMD) sends this command."""
    description: str = ""


@dataclass(frozen=True, slots=True)
class DeviceDef:
    """The node (device_id None) or one Sparkplug device, with its metrics."""

    device_id: str | None
    metrics: tuple[MetricDef, ...]
    liveness: bool = False
    """A PLC behind it: DDEATH when every fed metric is COMM_FAIL (the link is lost),
    DBIRTH again when one comes back."""


def _m(name: str, alias: int, dt: int, unit: str = "", desc: str = "") -> MetricDef:
    return MetricDef(name, alias, dt, unit, None, desc)


def _cmd(name: CommandName, alias: int) -> MetricDef:
    dt = DT.Boolean if name in (CommandName.STOP, CommandName.RESET) else DT.String
    how = "write true" if dt == DT.Boolean else "write"
    return MetricDef(f"Commands/{name.value}", alias, dt, "", name, f"{how} to send {name.value}")


NODE: Final = DeviceDef(
    None,
    (
        _m(BDSEQ, 1, DT.Int64, "", "birth/death sequence of this MQTT session"),
        MetricDef(REBIRTH, None, DT.Boolean, "", None, "write true: NBIRTH and DBIRTHs again"),
        _m("Line/state", 2, DT.String, "", "line state"),
        _m("Line/cause", 3, DT.String, "", "why the line is in its state"),
        _m("Line/alarms", 4, DT.String, "", "active alarm kinds, comma-separated"),
        _m("Line/reel_id", 5, DT.String, "", "reel on the line ('' none)"),
        _m("Line/recipe", 6, DT.String, "", "selected recipe: product and version"),
        _cmd(CommandName.START_REEL, 10),
        _cmd(CommandName.STOP, 11),
        _cmd(CommandName.ACK_ALARM, 12),
        _cmd(CommandName.RESET, 13),
        _cmd(CommandName.SELECT_RECIPE, 14),
        MetricDef(REQUEST, 15, DT.String, "", None, "write a whole JSON command"),
        _m(LAST_RESULT, 16, DT.String, "", "JSON answer to the last Sparkplug command"),
        _cmd(CommandName.END_REEL, 17),
    ),
)

ACCELERATOR: Final = DeviceDef(
    "accelerator",
    (
        _m("beam_current_ma", 100, DT.Double, "mA", "measured beam current"),
        _m("energy_mev", 101, DT.Double, "MeV", "measured beam energy"),
        _m("scan_width_cm", 102, DT.Double, "cm", "measured scan width"),
        _m("vacuum_pa", 103, DT.Double, "Pa", "accelerator vacuum"),
        _m("beam_current_sp_ma", 104, DT.Double, "mA", "dose-follow beam current set-point"),
        _cmd(CommandName.RESET, 150),
        _cmd(CommandName.ACK_ALARM, 151),
    ),
    liveness=True,
)

CONVEYOR: Final = DeviceDef(
    "conveyor",
    (
        _m("speed_m_min", 200, DT.Double, "m/min", "measured line speed"),
        _m("tension_n", 201, DT.Double, "N", "cable tension"),
        _m("length_counter_m", 202, DT.Double, "m", "conveyor length counter"),
        _m("speed_sp_m_min", 203, DT.Double, "m/min", "line speed set-point"),
        _cmd(CommandName.STOP, 250),
        _cmd(CommandName.START_REEL, 251),
    ),
    liveness=True,
)

METRE_METRICS: Final = (
    _m("Metre/reel_id", 301, DT.String, "", "reel of the last completed metre"),
    _m("Metre/index", 302, DT.Int64, "", "metre i: cable [i, i+1) m from the reel start"),
    _m("Metre/dose_kgy", 303, DT.Double, "kGy", "mean dose over the metre"),
    _m("Metre/min_dose_kgy", 304, DT.Double, "kGy", "lowest sub-metre dose"),
    _m("Metre/max_dose_kgy", 305, DT.Double, "kGy", "highest sub-metre dose"),
    _m("Metre/verdict", 306, DT.String, "", "in_spec, under_dose, over_dose, unproven, ..."),
    _m("Metre/causes", 307, DT.String, "", "why not in spec, comma-separated"),
)

DOSE: Final = DeviceDef(
    "dose",
    (
        _m("reel_position_m", 300, DT.Double, "m", "reel coordinate at the length counter"),
        *METRE_METRICS,
        _cmd(CommandName.SELECT_RECIPE, 350),
    ),
)

LAYOUT: Final[tuple[DeviceDef, ...]] = (NODE, ACCELERATOR, CONVEYOR, DOSE)
"""The node and its devices, in birth order."""

DYNAMIC_ALIAS_BASE: Final = 1000
"""Readings the table does not know become node metrics 'Line/<name>' from this alias up."""

# Live-value name -> metric name, for readings whose metric name differs from theirs.
_LINE_KEYS: Final = {
    "line_state": "Line/state",
    "line_cause": "Line/cause",
    "line_alarms": "Line/alarms",
    "line_reel_id": "Line/reel_id",
    "line_recipe": "Line/recipe",
}


def check_layout(layout: Sequence[DeviceDef]) -> None:
    """Raise ConfigError unless aliases are unique, names unique per device, and only
    'Node Control/Rebirth' is without an alias."""
    seen: dict[int, str] = {}
    for dev in layout:
        names = [m.name for m in dev.metrics]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"device {dev.device_id}: metric names repeated: {sorted(dup)}")
        for m in dev.metrics:
            where = f"{dev.device_id or 'node'}:{m.name}"
            if m.alias is None:
                if m.name != REBIRTH:
                    raise ConfigError(f"{where} has no alias")
                continue
            if m.name == REBIRTH:
                raise ConfigError(f"{where} must not have an alias (Sparkplug 3.0)")
            if m.alias <= 0 or m.alias >= DYNAMIC_ALIAS_BASE:
                raise ConfigError(f"{where}: alias {m.alias} outside 1..{DYNAMIC_ALIAS_BASE - 1}")
            if m.alias in seen:
                raise ConfigError(f"{where}: alias {m.alias} already used by {seen[m.alias]}")
            seen[m.alias] = where


check_layout(LAYOUT)


# ---------------------------------------------------------------------- topics


@dataclass(frozen=True, slots=True)
class SpTopic:
    """A parsed Sparkplug topic."""

    group_id: str
    kind: str  # NBIRTH, NDEATH, DBIRTH, DDEATH, NDATA, DDATA, NCMD, DCMD, STATE
    edge_node_id: str  # the host id for STATE
    device_id: str | None = None


_NODE_KINDS = frozenset({"NBIRTH", "NDEATH", "NDATA", "NCMD"})
_DEVICE_KINDS = frozenset({"DBIRTH", "DDEATH", "DDATA", "DCMD"})


def topic(group_id: str, kind: str, edge_node_id: str, device_id: str | None = None) -> str:
    """`spBv1.0/<group>/<kind>/<node>[/<device>]`."""
    if kind in _DEVICE_KINDS:
        if device_id is None:
            raise ValueError(f"{kind} needs a device id")
        return f"{NAMESPACE}/{group_id}/{kind}/{edge_node_id}/{device_id}"
    if kind not in _NODE_KINDS:
        raise ValueError(f"unknown Sparkplug message type {kind!r}")
    if device_id is not None:
        raise ValueError(f"{kind} takes no device id")
    return f"{NAMESPACE}/{group_id}/{kind}/{edge_node_id}"


def state_topic(host_id: str) -> str:
    """`spBv1.0/STATE/<host_id>`: the primary host application's birth and death."""
    return f"{NAMESPACE}/STATE/{host_id}"


def parse_topic(text: str) -> SpTopic | None:
    """The parts of a Sparkplug B topic; None if `text` is not one."""
    parts = text.split("/")
    if len(parts) < 3 or parts[0] != NAMESPACE:
        return None
    if parts[1] == "STATE":
        return SpTopic("", "STATE", parts[2]) if len(parts) == 3 else None
    if len(parts) == 4 and parts[2] in _NODE_KINDS:
        return SpTopic(parts[1], parts[2], parts[3])
    if len(parts) == 5 and parts[2] in _DEVICE_KINDS:
        return SpTopic(parts[1], parts[2], parts[3], parts[4])
    return None


# ---------------------------------------------------------------------- payload helpers


def decode(payload: bytes) -> pb.Payload:
    """A Sparkplug B payload from bytes; LocalError if it is not one."""
    msg = pb.Payload()
    try:
        msg.ParseFromString(payload)
    except Exception as exc:  # protobuf raises its own DecodeError (a plain Exception)
        raise LocalError(f"not a Sparkplug B payload: {exc}") from None
    return msg


def _is_null(value: Value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def set_value(m: pb.Payload.Metric, datatype: int, value: Value) -> None:
    """Put `value` in `m` as `datatype` wants it; None and NaN become is_null."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        m.is_null = True
        return
    if datatype == DT.Boolean:
        m.boolean_value = bool(value)
    elif datatype in (DT.String, DT.Text, DT.UUID):
        m.string_value = str(value)
    elif datatype == DT.Double:
        m.double_value = float(value)
    elif datatype == DT.Float:
        m.float_value = float(value)
    elif datatype in (DT.Int64, DT.UInt64, DT.DateTime):
        m.long_value = int(value) & _U64  # two's complement
    elif datatype in (DT.Int8, DT.Int16, DT.Int32, DT.UInt8, DT.UInt16, DT.UInt32):
        m.int_value = int(value) & _U32
    else:
        raise ValueError(f"data type {datatype} is not supported here")


def _signed(raw: int, bits: int) -> int:
    return raw - (1 << bits) if raw >= 1 << (bits - 1) else raw


def metric_value(m: pb.Payload.Metric, datatype: int | None = None) -> Value:
    """The Python value of `m` (None when is_null); `datatype` when `m` does not carry
    one (DATA and CMD messages: the host knows it from the BIRTH)."""
    if m.is_null:
        return None
    dt = m.datatype if m.HasField("datatype") else datatype
    kind = m.WhichOneof("value")
    if kind is None:
        return None
    if kind == "long_value":
        return _signed(m.long_value, 64) if dt == DT.Int64 else m.long_value
    if kind == "int_value":
        bits = _INT_BITS.get(int(dt or 0))
        return _signed(m.int_value & ((1 << bits) - 1), bits) if bits else m.int_value
    if kind in ("double_value", "float_value", "boolean_value", "string_value"):
        v: Value = getattr(m, kind)
        return v
    raise LocalError(f"metric value of kind {kind} is not supported")


def metric_quality(m: pb.Payload.Metric) -> Quality | None:
    """The quality a metric's "Quality" property gives; None if it has none."""
    props = m.properties
    for key, pv in zip(props.keys, props.values, strict=False):
        if key == "Quality":
            return QUALITY_OF_CODE.get(pv.int_value, Quality.COMM_FAIL)
    return None


def _add_props(m: pb.Payload.Metric, quality: Quality | None, unit: str) -> None:
    if quality is not None:
        m.properties.keys.append("Quality")
        pv = m.properties.values.add()
        pv.type = DT.Int32
        pv.int_value = QUALITY_CODE[quality]
    if unit:
        m.properties.keys.append("engUnit")
        pv = m.properties.values.add()
        pv.type = DT.String
        pv.string_value = unit


# ---------------------------------------------------------------------- primary host STATE


@dataclass(frozen=True, slots=True)
class HostState:
    """A primary host application's STATE payload (Sparkplug 3.0: JSON)."""

    online: bool
    timestamp: int


def parse_state(payload: bytes) -> HostState:
    """`{"online": bool, "timestamp": int}`; LocalError naming what is wrong otherwise."""
    try:
        obj = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LocalError(f"STATE payload is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LocalError("STATE payload is not a JSON object")
    online, ts = obj.get("online"), obj.get("timestamp")
    if not isinstance(online, bool):
        raise LocalError(f"STATE 'online' must be a boolean, not {online!r}")
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise LocalError(f"STATE 'timestamp' must be an integer (ms), not {ts!r}")
    return HostState(online, ts)


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """A STATE payload (what a host publishes; used by tests and tools)."""
    return json.dumps({"online": online, "timestamp": timestamp_ms}).encode()


@dataclass
class HostWatch:
    """Follows the primary host's STATE.

    Births wait for `online` (operational-behavior-edge-node-birth-sequence-wait). A STATE
    older than the newest one seen is ignored (a stale retained message). An offline STATE
    at least as new as the online one we followed means the host lost this broker: the
    node must publish NDEATH, disconnect and start over.
    """

    host_id: str
    online: bool = False
    timestamp: int = -1

    def update(self, state: HostState) -> str:
        """'online', 'offline' (disconnect now), or 'ignored'."""
        if state.timestamp < self.timestamp:
            return "ignored"
        was_online = self.online
        self.online, self.timestamp = state.online, state.timestamp
        if state.online:
            return "online"
        return "offline" if was_online else "ignored"

    def reset(self) -> None:
        """Forget the host's state (a new connection re-reads the retained STATE)."""
        self.online = False


# ---------------------------------------------------------------------- commands in


@dataclass(frozen=True, slots=True)
class Rebirth:
    """The host asked for NBIRTH and DBIRTHs again."""


@dataclass(frozen=True, slots=True)
class Execute:
    """A command for the line (already parsed and validated)."""

    command: Command


@dataclass(frozen=True, slots=True)
class Refuse:
    """A command that did not parse; `result` is the NAK to report."""

    result: CommandResult


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing to do (e.g. a command metric written false); `why` is for the log."""

    why: str


CommandEvent = Rebirth | Execute | Refuse | Ignore


# ---------------------------------------------------------------------- the edge node


def _payload(now_ms: int, seq: int | None) -> pb.Payload:
    p = pb.Payload()
    p.timestamp = now_ms
    if seq is not None:
        p.seq = seq
    return p


@dataclass
class _Sent:
    value: Value
    quality: Quality
    at_s: float


@dataclass
class EdgeNode:
    """One Sparkplug B edge node (the line) with its devices; pure.

    `bd_seq` is the bdSeq used by the previous MQTT session (None: there was none, the
    first session uses 0); the adapter persists it across restarts. `deadbands` (absolute,
    in the metric's unit, by metric or reading name) and `min_interval_s` tune report by
    exception: a metric goes out in a DATA message when its quality changes (at once) or
    its value moved by more than its deadband (any change without one), at most once per
    `min_interval_s`. `sender` is the identity commands from Sparkplug are executed as
    (authorized like any other sender: mqtt.identities / mqtt.roles).
    """

    group_id: str
    edge_node_id: str
    sender: str = "sparkplug"
    bd_seq: int | None = None
    deadbands: Mapping[str, float] = field(default_factory=dict)
    min_interval_s: float = 0.0
    layout: tuple[DeviceDef, ...] = LAYOUT
    properties: Mapping[str, str] = field(default_factory=dict)
    """Constant node metrics 'Properties/<key>' (String), e.g. line_id, version."""
    line_status: bool = True
    """Declare the 'Line/*' metrics (state, cause, alarms, reel, recipe); off when nothing
    feeds them, so a host never shows metrics that can only be null."""

    _seq: int = field(default=0, init=False)
    _session: bool = field(default=False, init=False)
    _born: bool = field(default=False, init=False)
    _sent: dict[tuple[str | None, str], _Sent] = field(default_factory=dict, init=False)
    _dynamic: dict[str, MetricDef] = field(default_factory=dict, init=False)
    _dead: set[str] = field(default_factory=set, init=False)
    _last_metre: dict[str, Sample] = field(default_factory=dict, init=False)
    _last_result: Sample | None = field(default=None, init=False)
    _by_alias: dict[int, tuple[str | None, MetricDef]] = field(default_factory=dict, init=False)
    _by_name: dict[tuple[str | None, str], MetricDef] = field(default_factory=dict, init=False)
    _feed: dict[str, tuple[str | None, MetricDef]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for what, ident in (("group_id", self.group_id), ("edge_node_id", self.edge_node_id)):
            if not _ID_RE.match(ident):
                raise ConfigError(f"sparkplug {what} {ident!r} is empty or has + / or #")
        if not _SENDER_RE.fullmatch(self.sender):
            raise ConfigError(
                f"sparkplug command sender {self.sender!r} must match {_SENDER_RE.pattern}"
            )
        if self.bd_seq is not None and not 0 <= self.bd_seq <= 255:
            raise ConfigError(f"bdSeq {self.bd_seq} is outside 0..255")
        props = tuple(
            MetricDef(f"Properties/{k}", 20 + i, DT.String, "", None, "constant")
            for i, k in enumerate(sorted(self.properties))
        )
        if len(props) > 10:
            raise ConfigError("at most 10 node properties")
        node, *devices = self.layout
        own = tuple(m for m in node.metrics if self.line_status or not m.name.startswith("Line/"))
        self.layout = (DeviceDef(node.device_id, own + props, node.liveness), *devices)
        check_layout(self.layout)
        for dev in self.layout:
            for m in dev.metrics:
                self._by_name[(dev.device_id, m.name)] = m
                if m.alias is not None:
                    self._by_alias[m.alias] = (dev.device_id, m)
                # Device metrics are fed by the reading of the same name; node metrics
                # only through _LINE_KEYS; commands and metre records by nobody.
                fed = m.command is None and not m.name.startswith("Metre/")
                if dev.device_id is not None and fed:
                    self._feed[m.name] = (dev.device_id, m)
        for key, name in _LINE_KEYS.items():
            if self.line_status:
                self._feed[key] = (None, self._by_name[(None, name)])

    # ------------------------------------------------------------------ session

    @property
    def born(self) -> bool:
        """NBIRTH and DBIRTHs went out in this session."""
        return self._born

    def new_session(self) -> int:
        """The bdSeq for a new MQTT CONNECT (one more than the last, 255 -> 0). Call
        before connecting; register `death()` as the will."""
        self.bd_seq = 0 if self.bd_seq is None else (self.bd_seq + 1) % 256
        self._session, self._born = True, False
        return self.bd_seq

    def retry_session(self) -> int:
        """Open the session again with the same bdSeq, for a retry after a CONNECT that
        was never acknowledged (refused, timed out): no broker holds a will with it, so
        the host sees bdSeq go up by exactly one per session that happened."""
        if self.bd_seq is None:
            return self.new_session()
        self._session, self._born = True, False
        return self.bd_seq

    def end_session(self) -> None:
        """The connection is gone: births are due again on the next one."""
        self._session, self._born = False, False

    def death(self, now_ms: int) -> Message:
        """NDEATH: only the bdSeq metric, no seq (the will, and the clean-exit message)."""
        if not self._session or self.bd_seq is None:
            raise LocalError("NDEATH before new_session(): no bdSeq for this connection")
        p = _payload(now_ms, None)
        m = p.metrics.add()
        m.name = BDSEQ
        m.timestamp = now_ms
        m.datatype = DT.Int64
        m.long_value = self.bd_seq
        return topic(self.group_id, "NDEATH", self.edge_node_id), p.SerializeToString()

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % 256
        return seq

    # ------------------------------------------------------------------ births

    def _metric_def(self, device_id: str | None, name: str) -> MetricDef:
        return self._by_name[(device_id, name)]

    def _learn(self, readings: Mapping[str, Reading]) -> None:
        for key in readings:
            if key not in self._feed and key not in self._dynamic:
                alias = DYNAMIC_ALIAS_BASE + len(self._dynamic)
                sample = readings[key].value
                dt = (
                    DT.Boolean
                    if isinstance(sample, bool)
                    else DT.Int64
                    if isinstance(sample, int)
                    else DT.String
                    if isinstance(sample, str)
                    else DT.Double
                )
                m = MetricDef(f"Line/{key}", alias, dt, "", None, "not in the metric table")
                self._dynamic[key] = m
                self._by_alias[alias] = (None, m)
                self._by_name[(None, m.name)] = m
                self._feed[key] = (None, m)

    def unknown(self, readings: Mapping[str, Reading]) -> list[str]:
        """Reading names no BIRTH of this session declared (they need a rebirth)."""
        return sorted(k for k in readings if k not in self._feed)

    def _current(
        self, readings: Mapping[str, Reading], now_ms: int
    ) -> dict[tuple[str | None, str], Reading]:
        """Every fed metric's current reading by (device, metric name)."""
        out: dict[tuple[str | None, str], Reading] = {}
        for key, (dev, m) in self._feed.items():
            r = readings.get(key)
            if r is not None:
                out[(dev, m.name)] = r
            elif (dev, m.name) not in out:
                out[(dev, m.name)] = Sample(None, Quality.COMM_FAIL, now_ms)
        return out

    def birth(self, readings: Mapping[str, Reading], now_ms: int, now_s: float) -> list[Message]:
        """NBIRTH (seq 0, bdSeq of this session) and one DBIRTH per device, with every
        metric's name, alias, type, current value and quality. Also answers a rebirth
        request (same bdSeq: the session goes on)."""
        if not self._session or self.bd_seq is None:
            raise LocalError("birth before new_session(): no bdSeq for this connection")
        self._learn(readings)
        cur = self._current(readings, now_ms)
        self._seq = 0
        self._sent.clear()
        self._dead.clear()
        out = [self._birth_of(dev, cur, now_ms, now_s) for dev in self.layout]
        self._born = True
        return out

    def _metrics_of(self, dev: DeviceDef) -> tuple[MetricDef, ...]:
        return dev.metrics + (tuple(self._dynamic.values()) if dev.device_id is None else ())

    def _birth_of(
        self,
        dev: DeviceDef,
        cur: Mapping[tuple[str | None, str], Reading],
        now_ms: int,
        now_s: float,
    ) -> Message:
        p = _payload(now_ms, self._next_seq())
        for mdef in self._metrics_of(dev):
            value, quality, t_ms = self._birth_value(dev.device_id, mdef, cur, now_ms)
            m = p.metrics.add()
            m.name = mdef.name
            if mdef.alias is not None:
                m.alias = mdef.alias
            m.timestamp = t_ms
            m.datatype = mdef.datatype
            set_value(m, mdef.datatype, value)
            _add_props(m, quality, mdef.unit)
            if quality is not None:
                self._sent[(dev.device_id, mdef.name)] = _Sent(value, quality, now_s)
        kind = "NBIRTH" if dev.device_id is None else "DBIRTH"
        return topic(self.group_id, kind, self.edge_node_id, dev.device_id), p.SerializeToString()

    def _link_lost(self, dev: DeviceDef, cur: Mapping[tuple[str | None, str], Reading]) -> bool:
        fed = [cur[k] for m in dev.metrics if (k := (dev.device_id, m.name)) in cur]
        return bool(fed) and all(r.quality is Quality.COMM_FAIL for r in fed)

    def _birth_value(
        self,
        device_id: str | None,
        mdef: MetricDef,
        cur: Mapping[tuple[str | None, str], Reading],
        now_ms: int,
    ) -> tuple[Value, Quality | None, int]:
        """(value, quality or None for control metrics, timestamp) for a BIRTH."""
        if mdef.name == BDSEQ:
            return self.bd_seq, None, now_ms
        if mdef.command is not None or mdef.name == REBIRTH:
            return (False if mdef.datatype == DT.Boolean else ""), None, now_ms
        if mdef.name == REQUEST:
            return "", None, now_ms
        if mdef.name == LAST_RESULT:
            last = self._last_result
            return ("", None, now_ms) if last is None else (last.value, None, last.t_ms)
        if mdef.name.startswith("Properties/"):
            return self.properties[mdef.name.removeprefix("Properties/")], None, now_ms
        if mdef.name.startswith("Metre/"):
            s = self._last_metre.get(mdef.name)
            return (None, Quality.GOOD, now_ms) if s is None else (s.value, s.quality, s.t_ms)
        r = cur[(device_id, mdef.name)]
        return r.value, r.quality, r.t_ms

    # ------------------------------------------------------------------ data

    def _require_born(self) -> None:
        if not self._born:
            raise LocalError("DATA before NBIRTH/DBIRTH in this session")

    def _changed(self, key: tuple[str | None, str], r: Reading, now_s: float) -> bool:
        # The MQTT live values' rule (linectl.telemetry.report_due), without a maximum
        # age, on the values as Sparkplug carries them: None, NaN and inf are all null.
        last = self._sent.get(key)
        return report_due(
            None if last is None else (_nullable(last.value), last.quality, last.at_s),
            _nullable(r.value),
            r.quality,
            now_s,
            deadband=self.deadbands.get(key[1], 0.0),
            min_interval_s=self.min_interval_s,
        )

    def data(self, readings: Mapping[str, Reading], now_ms: int, now_s: float) -> list[Message]:
        """NDATA/DDATA with the metrics that changed since they were last sent (report by
        exception), by alias only. Readings the BIRTH did not declare are skipped: check
        `unknown()` first and rebirth if it names any."""
        self._require_born()
        cur = self._current({k: v for k, v in readings.items() if k in self._feed}, now_ms)
        out: list[Message] = []
        for dev in self.layout:
            if dev.liveness and dev.device_id is not None:
                lost = self._link_lost(dev, cur)
                if dev.device_id in self._dead:
                    if not lost:  # the PLC answers again: the device is born again
                        self._dead.discard(dev.device_id)
                        out.append(self._birth_of(dev, cur, now_ms, now_s))
                    continue
                if lost:
                    self._dead.add(dev.device_id)
                    death = _payload(now_ms, self._next_seq()).SerializeToString()
                    t = topic(self.group_id, "DDEATH", self.edge_node_id, dev.device_id)
                    out.append((t, death))
                    continue
            changed: list[tuple[MetricDef, Reading]] = []
            for mdef in self._metrics_of(dev):
                key = (dev.device_id, mdef.name)
                r = cur.get(key)
                if r is None or key not in self._sent:
                    continue
                if self._changed(key, r, now_s):
                    changed.append((mdef, r))
            if not changed:
                continue
            p = _payload(now_ms, self._next_seq())
            for mdef, r in changed:
                key = (dev.device_id, mdef.name)
                before = self._sent[key].quality
                m = p.metrics.add()
                assert mdef.alias is not None  # only control metrics have none
                m.alias = mdef.alias
                m.timestamp = r.t_ms
                set_value(m, mdef.datatype, r.value)
                # Absent means GOOD (spec); say GOOD explicitly when it comes back.
                if r.quality is not Quality.GOOD or before is not Quality.GOOD:
                    _add_props(m, r.quality, "")
                self._sent[key] = _Sent(r.value, r.quality, now_s)
            kind = "NDATA" if dev.device_id is None else "DDATA"
            out.append(
                (
                    topic(self.group_id, kind, self.edge_node_id, dev.device_id),
                    p.SerializeToString(),
                )
            )
        return out

    def metres(
        self,
        reel_id: str,
        records: Sequence[MetreRecord],
        t_ms: int,
        now_ms: int,
        *,
        historical: bool,
    ) -> list[Message]:
        """DDATA on the dose device: each record as the seven Metre/* metrics, in order,
        all stamped `t_ms` (when the record was made). `historical` marks store-and-
        forward replays (is_historical): they do not change the current values."""
        self._require_born()
        if not records:
            return []
        p = _payload(now_ms, self._next_seq())
        for rec in records:
            values: dict[str, Value] = {
                "Metre/reel_id": reel_id,
                "Metre/index": rec.index,
                "Metre/dose_kgy": rec.dose_kgy,
                "Metre/min_dose_kgy": rec.min_dose_kgy,
                "Metre/max_dose_kgy": rec.max_dose_kgy,
                "Metre/verdict": rec.verdict.value,
                "Metre/causes": ",".join(rec.causes),
            }
            for mdef in METRE_METRICS:
                m = p.metrics.add()
                assert mdef.alias is not None
                m.alias = mdef.alias
                m.timestamp = t_ms
                if historical:
                    m.is_historical = True
                set_value(m, mdef.datatype, values[mdef.name])
                if not historical:
                    self._last_metre[mdef.name] = Sample(values[mdef.name], Quality.GOOD, t_ms)
        return [(topic(self.group_id, "DDATA", self.edge_node_id, "dose"), p.SerializeToString())]

    def command_result(self, result: CommandResult, now_ms: int) -> list[Message]:
        """NDATA with 'Commands/last_result': the answer's JSON (docs/mqtt.md schema
        linectl.response/1). Kept for the next BIRTH too; [] before the first birth."""
        text = json.dumps(result.to_json(now_ms), separators=(",", ":"))
        self._last_result = Sample(text, Quality.GOOD, now_ms)
        if not self._born:
            return []
        mdef = self._metric_def(None, LAST_RESULT)
        assert mdef.alias is not None
        p = _payload(now_ms, self._next_seq())
        m = p.metrics.add()
        m.alias = mdef.alias
        m.timestamp = now_ms
        m.string_value = text
        return [(topic(self.group_id, "NDATA", self.edge_node_id), p.SerializeToString())]

    # ------------------------------------------------------------------ commands

    def command(self, topic_text: str, payload: bytes) -> list[CommandEvent]:
        """What an NCMD or DCMD asks for, metric by metric, in order."""
        t = parse_topic(topic_text)
        if (
            t is None
            or t.kind not in ("NCMD", "DCMD")
            or t.group_id != self.group_id
            or t.edge_node_id != self.edge_node_id
        ):
            return [Ignore(f"not a command for this node: {topic_text}")]
        device = t.device_id
        if device is not None and all(d.device_id != device for d in self.layout):
            return [Ignore(f"DCMD for unknown device {device!r}")]
        try:
            msg = decode(payload)
        except LocalError as exc:
            return [Refuse(nak(None, str(exc)))]
        return [self._one_command(device, m) for m in msg.metrics] or [Ignore("no metrics")]

    def _resolve(self, device: str | None, m: pb.Payload.Metric) -> MetricDef | None:
        if m.HasField("name") and m.name:
            return self._by_name.get((device, m.name))
        if m.HasField("alias"):
            found = self._by_alias.get(m.alias)
            if found is not None and found[0] == device:
                return found[1]
        return None

    def _one_command(self, device: str | None, m: pb.Payload.Metric) -> CommandEvent:
        where = f"DCMD {device}" if device else "NCMD"
        mdef = self._resolve(device, m)
        label = m.name or f"alias {m.alias}"
        if mdef is None:
            return Ignore(f"{where}: unknown metric {label}")
        if mdef.name == REBIRTH:
            if device is None and metric_value(m, DT.Boolean) is True:
                return Rebirth()
            return Ignore(f"{where}: {REBIRTH} written without true")
        if mdef.command is None and mdef.name != REQUEST:
            return Refuse(nak(None, f"{where}: metric {mdef.name} is read-only"))
        try:
            value = metric_value(m, mdef.datatype)
        except LocalError as exc:
            return Refuse(nak(None, f"{where}: {mdef.name}: {exc}"))
        return self._to_command(mdef, value)

    def _to_command(self, mdef: MetricDef, value: Value) -> CommandEvent:
        cname = mdef.command
        label = cname.value if cname is not None else ""
        try:
            if cname is None:  # Commands/request: a whole JSON command
                if not isinstance(value, str):
                    raise CommandError(f"{mdef.name} takes a String (a JSON command)")
                cmd = parse_command(value, sender=self.sender, source="sparkplug")
            elif mdef.datatype == DT.Boolean:
                if not isinstance(value, bool):
                    raise CommandError(f"{mdef.name} takes a Boolean")
                if not value:
                    return Ignore(f"{mdef.name} written false")
                cmd = parse_command(b"{}", name=label, sender=self.sender, source="sparkplug")
            else:
                if not isinstance(value, str) or not value:
                    raise CommandError(f"{mdef.name} takes a non-empty String")
                if value.lstrip().startswith("{"):
                    text = value
                else:
                    arg = {"ack_alarm": "alarm", "select_recipe": "recipe"}.get(label)
                    if arg is None:
                        raise CommandError(f"{mdef.name} takes a JSON object of arguments")
                    text = json.dumps({arg: value})
                cmd = parse_command(text, name=label, sender=self.sender, source="sparkplug")
        except CommandError as exc:
            return Refuse(nak(None, str(exc), command=label))
        return Execute(cmd)


def _nullable(value: Value) -> Value:
    """`value`, or None when Sparkplug sends it as null (None, NaN, infinity)."""
    return None if _is_null(value) else value


def readings_from_status(status: object, t_ms: int) -> dict[str, Sample]:
    """Node metrics 'Line/*' from a linectl.telemetry.LineStatus (duck-typed, so the
    adapter may pass anything with its fields)."""
    get = getattr
    recipe = f"{get(status, 'recipe_product', '')} {get(status, 'recipe_version', '')}".strip()
    q = get(status, "quality", Quality.GOOD)
    return {
        "line_state": Sample(str(get(status, "state", "")), q, t_ms),
        "line_cause": Sample(str(get(status, "cause", "")), q, t_ms),
        "line_alarms": Sample(",".join(get(status, "alarms", ())), q, t_ms),
        "line_reel_id": Sample(get(status, "reel_id", None) or "", q, t_ms),
        "line_recipe": Sample(recipe, q, t_ms),
    }


def all_metrics(layout: Iterable[DeviceDef] = LAYOUT) -> list[tuple[str | None, MetricDef]]:
    """(device id, metric) for every metric of the table (for docs and tests)."""
    return [(d.device_id, m) for d in layout for m in d.metrics]


__all__ = [
    "ACCELERATOR",
    "BDSEQ",
    "CONVEYOR",
    "DOSE",
    "LAST_RESULT",
    "LAYOUT",
    "NAMESPACE",
    "NODE",
    "QUALITY_CODE",
    "REBIRTH",
    "REQUEST",
    "CommandEvent",
    "DeviceDef",
    "EdgeNode",
    "Execute",
    "HostState",
    "HostWatch",
    "Ignore",
    "Message",
    "MetricDef",
    "Reading",
    "Rebirth",
    "Refuse",
    "Sample",
    "SpTopic",
    "all_metrics",
    "check_layout",
    "decode",
    "metric_quality",
    "metric_value",
    "parse_state",
    "parse_topic",
    "readings_from_status",
    "set_value",
    "state_payload",
    "state_topic",
    "topic",
]
