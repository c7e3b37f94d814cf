"""Configuration: line, PLC endpoints, register maps and recipes (pydantic v2, TOML).

Everything plant-specific lives in files under a configuration directory:

    <dir>/line.toml                  line id, PLC endpoints, cycle, geometry, records
    <dir>/registers/<plc>.toml       register maps (named by line.toml)
    <dir>/recipes/<name>.toml        recipes

Errors name the file, the field and what is wrong. Environment variables
`LINECTL_<SECTION>__<KEY>=value` override line.toml settings (see docs/configuration.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from linectl import dose
from linectl.errors import ConfigError

RegisterType = Literal["bits", "int16", "uint16", "int32", "uint32", "float32"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
Table = Literal["holding", "input"]
Access = Literal["r", "rw"]
PlcName = Literal["accelerator", "conveyor"]

_WIDTH: dict[str, int] = {
    "bits": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
}

ENV_PREFIX = "LINECTL_"
# Control characters (a tab is fine) and lone surrogates (how Python hands over a byte of
# the environment that is not UTF-8).
_BAD_ENV_CHARS_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")

COMMAND_NAMES: tuple[str, ...] = (
    "start_reel",
    "stop",
    "ack_alarm",
    "reset",
    "select_recipe",
    "end_reel",
    "shelve_alarm",
    "unshelve_alarm",
)
"""The operator commands a line takes (the values of linectl.commands.CommandName; a test
keeps the two equal). `[mqtt.roles]` may name these and `*`, nothing else."""


class _Strict(BaseModel):
    # allow_inf_nan=False: TOML has `inf` and `nan`, and a tolerance of `inf` or a scale of
    # `nan` would pass every comparison check below and silently disable a limit
    # (found by tests/test_fuzz.py: energy_tolerance_mev = inf was accepted).
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


# --------------------------------------------------------------------------- registers


class RegisterField(_Strict):
    """One named value in a PLC's register map."""

    name: str = ""
    """Semantic name the controller and simulators use (the TOML key; filled in on load)."""
    table: Table
    """`holding` (FC3 read, FC6/16 write) or `input` (FC4, read-only)."""
    address: Annotated[int, Field(ge=0, le=0xFFFF)]
    """0-based protocol address of the first register."""
    type: RegisterType
    """Wire type; 32-bit types take two registers."""
    word_order: WordOrder = "ABCD"
    """Order of the 16-bit words (and bytes) of a 32-bit value; ABCD = high word first."""
    scale: float = 1.0
    """Engineering value = raw * scale (e.g. 0.001 for a uA integer read as mA)."""
    unit: str = ""
    """Engineering unit after scaling."""
    access: Access = "r"
    """`r` read only, `rw` the controller writes it."""
    min: float | None = None
    """Lowest value the PLC accepts on write (engineering units)."""
    max: float | None = None
    """Highest value the PLC accepts on write (engineering units)."""
    default: float = 0.0
    """Value after a PLC restart (holding registers)."""
    bits: dict[str, Annotated[int, Field(ge=0, le=15)]] = Field(default_factory=dict)
    """For `bits` fields: bit name -> bit number (0 = least significant)."""
    counter: bool = False
    """A free-running totalizer or clock that wraps at its type's range."""
    description: str = ""
    """Free text for people."""

    @property
    def width(self) -> int:
        """Registers occupied."""
        return _WIDTH[self.type]

    @property
    def end(self) -> int:
        """One past the last register address."""
        return self.address + self.width

    def bit_index(self, bit_name: str) -> int:
        """Bit number of a named bit; KeyError names the field if it is unknown."""
        try:
            return self.bits[bit_name]
        except KeyError:
            raise KeyError(f"{self.name}: no bit named {bit_name!r}") from None

    @model_validator(mode="after")
    def _check(self) -> RegisterField:
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        if self.table == "input" and self.access != "r":
            raise ValueError("a field in the input table cannot be writable (access must be 'r')")
        if self.bits and self.type != "bits":
            raise ValueError(f"'bits' names are only allowed on type 'bits', not {self.type}")
        if len(set(self.bits.values())) != len(self.bits):
            raise ValueError("two bit names share one bit number")
        if self.counter and self.type not in ("uint16", "uint32"):
            raise ValueError(f"a counter must be uint16 or uint32, not {self.type}")
        if self.end > 0x10000:
            raise ValueError(f"address {self.address} + width {self.width} runs past 65535")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self


# Names the controller and the simulators rely on; a map must define all of them.
REQUIRED_FIELDS: dict[PlcName, dict[str, tuple[Table, Access, tuple[str, ...]]]] = {
    "accelerator": {
        "command": ("holding", "rw", ("HV_ON", "BEAM_ON", "FAULT_RESET")),
        "beam_current_sp": ("holding", "rw", ()),
        "energy_sp": ("holding", "rw", ()),
        "scan_width_sp": ("holding", "rw", ()),
        "watchdog": ("holding", "rw", ()),
        "watchdog_timeout": ("holding", "rw", ()),
        "status": (
            "input",
            "r",
            (
                "READY",
                "HV_ON",
                "BEAM_ON",
                "VACUUM_OK",
                "SCAN_OK",
                "COOLING_OK",
                "SAFETY_OK",
                "FAULT",
                "REMOTE",
                "WATCHDOG_TRIP",
            ),
        ),
        "beam_current": ("input", "r", ()),
        "energy": ("input", "r", ()),
        "scan_width": ("input", "r", ()),
        "vacuum": ("input", "r", ()),
        "charge_total": ("input", "r", ()),
        "fault_code": ("input", "r", ()),
        "trip_count": ("input", "r", ()),
        "clock": ("input", "r", ()),
    },
    "conveyor": {
        "command": ("holding", "rw", ("RUN", "FAULT_RESET")),
        "speed_sp": ("holding", "rw", ()),
        "watchdog": ("holding", "rw", ()),
        "watchdog_timeout": ("holding", "rw", ()),
        "ramp_rate": ("holding", "rw", ()),
        "status": (
            "input",
            "r",
            (
                "READY",
                "RUNNING",
                "AT_SPEED",
                "TENSION_OK",
                "CABLE_BREAK",
                "FAULT",
                "REMOTE",
                "WATCHDOG_TRIP",
                "ESTOP",
            ),
        ),
        "speed": ("input", "r", ()),
        "length": ("input", "r", ()),
        "tension": ("input", "r", ()),
        "fault_code": ("input", "r", ()),
        "clock": ("input", "r", ()),
    },
}

COUNTER_FIELDS: dict[PlcName, tuple[str, ...]] = {
    "accelerator": ("charge_total", "trip_count", "clock"),
    "conveyor": ("length", "clock"),
}

# The units the dose ledger and the PLC-clock alignment can use, with the factor to the
# core's own units (uC, m, ms; linectl.core.views). Checked when a map is loaded, so that
# `linectl config check` refuses a unit the daemon would refuse at start (found by
# tests/test_fuzz.py: charge_total in "kg" passed the check).
COUNTER_UNITS: dict[str, dict[str, float]] = {
    "charge_total": {"nC": 0.001, "uC": 1.0, "µC": 1.0, "mC": 1000.0, "C": 1e6},
    "length": {"mm": 0.001, "cm": 0.01, "dm": 0.1, "m": 1.0},
    "clock": {"ms": 1.0, "s": 1000.0},
}


class RegisterMap(_Strict):
    """A PLC's whole register map, declared once and used by the link and the simulators."""

    plc: PlcName
    """Which PLC this map describes."""
    fields: dict[str, RegisterField]
    """Field name -> definition."""

    @field_validator("fields", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        # The TOML key is the field's name; copy it in so a field knows who it is.
        if isinstance(value, Mapping):
            return {k: {**v, "name": k} if isinstance(v, Mapping) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check(self) -> RegisterMap:
        for table in ("holding", "input"):
            spans = sorted(
                (f.address, f.end, f.name) for f in self.fields.values() if f.table == table
            )
            for (a0, a1, n0), (b0, _b1, n1) in itertools.pairwise(spans):
                if b0 < a1:
                    raise ValueError(
                        f"{table} registers overlap: {n0!r} at {a0}..{a1 - 1} "
                        f"and {n1!r} starting at {b0}"
                    )
        for name, (table, access, bits) in REQUIRED_FIELDS[self.plc].items():
            f = self.fields.get(name)
            if f is None:
                raise ValueError(f"required field {name!r} is missing from the {self.plc} map")
            if f.table != table:
                raise ValueError(f"field {name!r} must be in the {table} table, not {f.table}")
            if access == "rw" and f.access != "rw":
                raise ValueError(f"field {name!r} must be writable (access = 'rw')")
            missing = [b for b in bits if b not in f.bits]
            if missing:
                raise ValueError(f"field {name!r} lacks bit names {missing}")
        for name in COUNTER_FIELDS[self.plc]:
            if not self.fields[name].counter:
                raise ValueError(f"field {name!r} is a free-running counter: set counter = true")
            units = COUNTER_UNITS.get(name)
            if units is not None and self.fields[name].unit not in units:
                raise ValueError(
                    f"field {name!r}: unit {self.fields[name].unit!r} is not one of {sorted(units)}"
                )
        return self

    def field(self, name: str) -> RegisterField:
        """The named field; KeyError names the PLC."""
        try:
            return self.fields[name]
        except KeyError:
            raise KeyError(f"{self.plc} map has no field {name!r}") from None

    @cached_property
    def by_table(self) -> dict[Table, list[RegisterField]]:
        """Fields of each table sorted by address."""
        out: dict[Table, list[RegisterField]] = {"holding": [], "input": []}
        for f in sorted(self.fields.values(), key=lambda f: f.address):
            out[f.table].append(f)
        return out


# --------------------------------------------------------------------------- line


class PlcEndpoint(_Strict):
    """How to reach one PLC."""

    host: str = "127.0.0.1"
    """Host name or IP address of the PLC's Modbus TCP server."""
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    """TCP port."""
    unit_id: Annotated[int, Field(ge=0, le=255)] = 1
    """Modbus unit (slave) id."""
    timeout_s: Annotated[float, Field(gt=0, le=10)] = 0.1
    """Per-request timeout; the link never waits longer on one request. Keep it plus one
    cycle below stale_after_s, so that one lost answer is ridden through."""
    connect_timeout_s: Annotated[float, Field(gt=0, le=10)] = 0.5
    """TCP connect timeout."""
    reconnect_max_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """Cap of the reconnect backoff."""
    stale_after_s: Annotated[float, Field(gt=0, le=60)] = 0.25
    """Data older than this makes the PLC unknown to the controller (the "PLC lost"
    interlock: beam off, line to a stop, latched alarm); younger data is still used, so a
    connection dropped and made again within this window changes nothing."""
    max_gap: Annotated[int, Field(ge=0, le=124)] = 0
    """Unmapped registers the read planner may read across to join two blocks."""
    register_map: str
    """Path of the register map TOML, relative to the configuration directory."""


class Geometry(_Strict):
    """Where the cable crosses the beam, measured along the cable path."""

    passes: Annotated[int, Field(ge=1, le=64)] = 16
    """How many times the cable crosses the scanned beam."""
    pass_spacing_m: Annotated[float, Field(gt=0)] = 6.0
    """Cable path between consecutive passes, m."""
    first_pass_offset_m: Annotated[float, Field(ge=0)] = 4.0
    """Cable path from the length counter to pass 0, m."""
    pass_weights: list[Annotated[float, Field(gt=0, le=1.5)]] | None = None
    """Per-pass weights from the scan-uniformity map (all 1.0 when not given)."""

    @model_validator(mode="after")
    def _check(self) -> Geometry:
        if self.pass_weights is not None and len(self.pass_weights) != self.passes:
            raise ValueError(
                f"pass_weights has {len(self.pass_weights)} entries for {self.passes} passes"
            )
        return self

    @property
    def weights(self) -> list[float]:
        """Weight of each pass."""
        return list(self.pass_weights) if self.pass_weights else [1.0] * self.passes

    @property
    def weight_sum(self) -> float:
        """sum(w_k)."""
        return sum(self.weights)

    def offset_m(self, k: int) -> float:
        """Cable path from the counter to pass k."""
        return self.first_pass_offset_m + k * self.pass_spacing_m

    @property
    def last_pass_offset_m(self) -> float:
        """Cable path from the counter to the last pass."""
        return self.offset_m(self.passes - 1)


class ControlTuning(_Strict):
    """Controller parameters (`[control]` in line.toml); defaults suit the reference line."""

    current_lag_s: Annotated[float, Field(ge=0, le=5)] = 0.15
    """The accelerator's current lag: the set-point leads the measured speed by this."""
    current_ramp_ma_s: Annotated[float, Field(gt=0, le=1000)] = 15.0
    """The accelerator's current ramp limit, mA/s."""
    line_ramp_m_min_s: Annotated[float, Field(gt=0, le=120)] = 30.0
    """Upper bound of the line's acceleration, m/min per s; also written to the conveyor's
    ramp_rate at connect."""
    relative_ramp_per_s: Annotated[float, Field(gt=0, le=10)] = 0.25
    """At low speed, accelerate by at most this fraction of the speed per second: the
    current's lag then costs at most current_lag_s * this of the dose."""
    ride_through_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    """A beam trip shorter than this is ridden through at speed."""
    trip_stop_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    """A beam outage longer than this stops the line (it slows to minimum speed first)."""
    start_timeout_s: Annotated[float, Field(gt=0, le=600)] = 15.0
    """Each start phase must complete within this."""
    acc_lost_hold_s: Annotated[float, Field(gt=0, le=60)] = 0.7
    """After the accelerator link is lost the line keeps moving this long, longer than the
    accelerator's watchdog timeout, so a beam we can no longer switch off never stands on
    a stopped cable; then it stops."""
    speed_tolerance: Annotated[float, Field(gt=0, lt=0.5)] = 0.02
    """Relative speed tolerance for 'reached'."""
    reset_watchdog_trips_at_start: bool = True
    """At start-up, once both PLCs answer, reset latched faults that are watchdog trips
    and nothing else (accelerator code 7, conveyor code 5): linectl's own absence caused
    them. Any other latched fault still needs an operator reset."""


LINE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""A line id: one MQTT topic level, letters, digits, `_` and `-`, 1 to 64 characters."""

HISTORIAN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""A historian id: one MQTT topic level and part of the historian's client id: letters,
digits, `_`, `.` and `-`, 1 to 64 characters (the rule historian.toml's `id` follows)."""


class Records(_Strict):
    """Where records go, and which plant historians keep them (docs/records.md)."""

    path: str = "records/linectl.sqlite"
    """SQLite database path, relative to the configuration directory unless absolute."""
    historians: list[str] = Field(default_factory=list)
    """Plant historians (their ids, as in their topics `historian/<id>/confirmed`) that
    keep this line's records: the line answers their replay requests, and keeps every
    outbox row until each of them confirmed it. Empty: none."""
    retention_days: Annotated[float, Field(gt=0)] | None = None
    """Delete a closed reel (metres, events, alarms, state) this many days after it
    ended, once every historian named in `historians` confirmed it; None: keep every
    reel. Needs at least one historian."""

    @field_validator("historians")
    @classmethod
    def _check_historians(cls, historians: list[str]) -> list[str]:
        faults = [
            f"historian id {h!r} is not one MQTT topic level: 1 to 64 letters, digits, "
            "'_', '.' or '-'"
            for h in historians
            if not HISTORIAN_ID_RE.fullmatch(h)
        ]
        seen: set[str] = set()
        for h in historians:
            if h in seen:
                faults.append(f"historian id {h!r} is named twice")
            seen.add(h)
        if faults:
            raise ValueError("; ".join(faults))
        return historians

    @model_validator(mode="after")
    def _check_retention(self) -> Records:
        # Retention deletes what a historian confirmed; with none named nothing would
        # ever be confirmed, and a setting that silently does nothing misleads.
        if self.retention_days is not None and not self.historians:
            raise ValueError(
                "retention_days needs a historian: name the plant historian(s) that keep "
                'the records in historians (e.g. historians = ["plant"]), or remove '
                "retention_days"
            )
        return self


class MqttTls(_Strict):
    """TLS towards the broker."""

    ca_file: str | None = None
    """CA bundle that signed the broker's certificate; None: the system's."""
    cert_file: str | None = None
    """Client certificate (for brokers that authenticate clients by certificate)."""
    key_file: str | None = None
    """The client certificate's key."""
    insecure: bool = False
    """Skip the broker hostname check (test benches only)."""


class MqttConfig(_Strict):
    """The MQTT connection for SCADA telemetry and operator commands (docs/mqtt.md)."""

    enabled: bool = False
    """Publish telemetry and take commands over MQTT."""
    host: str = "127.0.0.1"
    """Broker host."""
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    """Broker port."""
    client_id: str | None = None
    """MQTT client id; None: `linectl-<line_id>`."""
    username: str | None = None
    """Broker user name (with `password`, or LINECTL_MQTT__PASSWORD in the environment)."""
    # repr=False: a logged or printed configuration never shows the password.
    password: str | None = Field(default=None, repr=False)
    """Broker password; prefer the environment variable to the file."""
    tls: MqttTls | None = None
    """TLS settings; None: plain TCP (only on a segregated network)."""
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_/-]{1,64}$")] = "linectl"
    """Topics are `<topic_prefix>/<line_id>/...`."""
    protocol: Literal["5", "3.1.1"] = "5"
    """MQTT protocol version; "3.1.1" for brokers without MQTT 5 (commands then answer
    on the documented fallback response topic)."""
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 15
    """MQTT keep-alive; the broker sends the will after 1.5 x this without traffic."""
    reconnect_max_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    """Reconnect backoff cap after the broker goes away."""
    queue_size: Annotated[int, Field(ge=10, le=100000)] = 1000
    """Live telemetry waiting for the broker; beyond it the oldest is dropped (counted)."""
    max_inflight: Annotated[int, Field(ge=1, le=1000)] = 50
    """QoS 1 messages in flight at once."""
    live_max_age_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """A live value is published at least this often even if it has not changed."""
    live_min_interval_s: Annotated[float, Field(ge=0, le=60)] = 0.1
    """A live value is published at most this often."""
    deadbands: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    """Report-by-exception deadband per value name (absolute, in the value's unit);
    values not named here are published on any change."""
    roles: dict[str, list[str]] = Field(default_factory=dict)
    """Command authorization: role -> commands it may send (`*` for all)."""
    identities: dict[str, str] = Field(default_factory=dict)
    """Command sender identity (the `sender` in a command) -> role."""
    allow_anonymous_commands: bool = False
    """Accept commands that name no known identity (test benches only)."""


class SparkplugConfig(_Strict):
    """Sparkplug B edge node (docs/sparkplug.md)."""

    enabled: bool = False
    """Publish as a Sparkplug B edge node beside the plain JSON topics."""
    group_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "linectl"
    """Sparkplug group id."""
    edge_node_id: str | None = None
    """Edge node id; None: the line id."""
    primary_host_id: str | None = None
    """Primary host application id whose STATE the node follows; None: do not wait."""


class MetricsConfig(_Strict):
    """Prometheus endpoint."""

    enabled: bool = True
    """Serve /metrics."""
    host: str = "127.0.0.1"
    """Bind address; loopback unless the plant's network says otherwise."""
    port: Annotated[int, Field(ge=0, le=65535)] = 9108
    """Port (0: any free port, for tests)."""


PASSWORD_HASH_RE = re.compile(
    r"^scrypt\$(?P<n>[0-9]{1,7})\$(?P<r>[0-9]{1,2})\$(?P<p>[0-9]{1,2})"
    r"\$(?P<salt>[A-Za-z0-9+/=]{16,128})\$(?P<hash>[A-Za-z0-9+/=]{43,128})$"
)
"""A password hash as `linectl http hash-password` writes it: scrypt, its cost
parameters, the salt and the derived key (base64)."""


class HttpUser(_Strict):
    """One local user of the HMI and its JSON API."""

    # repr=False: a logged or printed configuration never shows a hash either.
    password_hash: str = Field(repr=False)
    """`scrypt$N$r$p$salt$key` from `linectl http hash-password` (never the password)."""
    role: str
    """A role defined under [mqtt.roles]: the same roles for MQTT senders and HMI users."""

    @field_validator("password_hash")
    @classmethod
    def _check_hash(cls, value: str) -> str:
        m = PASSWORD_HASH_RE.fullmatch(value)
        if m is None:
            raise ValueError(
                "password_hash is not a scrypt hash (scrypt$N$r$p$salt$key): write it "
                "with `linectl http hash-password`, never the password itself"
            )
        n = int(m["n"])
        if n < 2**14 or n & (n - 1):
            raise ValueError(f"password_hash: scrypt N {n} must be a power of two >= 16384")
        return value


class HttpConfig(_Strict):
    """The daemon's HTTP server: the operator HMI, its JSON command API, the WebSocket
    live feed, /healthz and /metrics (docs/hmi.md)."""

    enabled: bool = False
    """Serve the HMI and the JSON API."""
    host: str = "127.0.0.1"
    """Bind address; loopback unless a reverse proxy or the plant network says otherwise
    (docs/hmi.md, deployment)."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8480
    """Port (0: any free port, for tests)."""
    tls_cert_file: str | None = None
    """PEM certificate (chain) for HTTPS, relative to the configuration directory."""
    tls_key_file: str | None = None
    """Its private key."""
    users: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], HttpUser] = Field(
        default_factory=dict
    )
    """Local users: name -> password hash and role."""
    session_ttl_s: Annotated[float, Field(ge=60, le=7 * 24 * 3600)] = 12 * 3600.0
    """A login lasts this long (a shift and its handover)."""
    login_max_failures: Annotated[int, Field(ge=1, le=100)] = 5
    """Failed logins from one address, or for one user name, within login_window_s
    before further attempts are refused for the rest of the window."""
    login_window_s: Annotated[float, Field(ge=1, le=86400)] = 300.0
    """The login rate limit's window."""
    max_clients: Annotated[int, Field(ge=1, le=1000)] = 50
    """Live-feed connections at once; more are refused (503)."""

    @model_validator(mode="after")
    def _check_tls(self) -> HttpConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        return self


class LineConfig(_Strict):
    """One irradiation line: identity, PLCs, cycle, geometry, records."""

    line_id: Annotated[str, Field(pattern=LINE_ID_RE.pattern)]
    """Line identifier (used in MQTT topics and records)."""
    cycle_period_s: Annotated[float, Field(ge=0.005, le=1.0)] = 0.05
    """Control cycle period."""
    accelerator: PlcEndpoint
    """The accelerator PLC."""
    conveyor: PlcEndpoint
    """The conveyor PLC."""
    geometry: Geometry = Field(default_factory=Geometry)
    """Pass geometry."""
    records: Records = Field(default_factory=Records)
    """Record store."""
    recipes_dir: str = "recipes"
    """Directory of recipe files, relative to the configuration directory."""
    default_recipe: str | None = None
    """Recipe (file stem) the daemon selects at start; None: the first in recipes_dir."""
    watchdog_timeout_ms: Annotated[int, Field(ge=100, le=10000)] = 500
    """Watchdog timeout written to both PLCs: they make the line safe by themselves if
    the controller stops changing their watchdog register for this long."""
    control: ControlTuning = Field(default_factory=ControlTuning)
    """Controller tuning."""
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    """MQTT telemetry and commands."""
    sparkplug: SparkplugConfig = Field(default_factory=SparkplugConfig)
    """Sparkplug B edge node."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """Prometheus metrics endpoint."""
    http: HttpConfig = Field(default_factory=HttpConfig)
    """The operator HMI and JSON API (docs/hmi.md)."""

    @property
    def stall_credit_s(self) -> float:
        """At most this much of a PLC's data age is left out as linectl's own stall (the
        smaller stale window): data older than its stale window plus this is never used
        (docs/control.md, "Stalls of the controller")."""
        return min(self.accelerator.stale_after_s, self.conveyor.stale_after_s)

    @field_validator("mqtt")
    @classmethod
    def _check_roles(cls, mqtt: MqttConfig) -> MqttConfig:
        # Checked where line.toml is loaded, so that `linectl config check` refuses what
        # authorization could never match: a role naming a command that does not exist
        # (a typo would silently take a right away) and an identity whose role is not
        # defined (every command from it would be refused). Every fault is listed.
        faults = []
        known = ", ".join(COMMAND_NAMES)
        for role, commands in mqtt.roles.items():
            for command in commands:
                if command != "*" and command not in COMMAND_NAMES:
                    faults.append(f"roles.{role}: no command {command!r} (known: {known}, or '*')")
        roles = ", ".join(repr(r) for r in mqtt.roles) or "none"
        for identity, role in mqtt.identities.items():
            if role not in mqtt.roles:
                faults.append(
                    f"identities.{identity}: role {role!r} is not defined in [mqtt.roles] "
                    f"(defined: {roles})"
                )
        if faults:
            # One fault a line, each under the `mqtt` key the error report names.
            raise ValueError("\n  mqtt: ".join(faults))
        return mqtt

    @model_validator(mode="after")
    def _check_historians_need_mqtt(self) -> LineConfig:
        # A historian's replays and confirmations come over MQTT: without it the setting
        # would silently do nothing (and retention would never prune).
        if self.records.historians and not self.mqtt.enabled:
            raise ValueError(
                "records.historians needs mqtt.enabled = true: the plant historian takes "
                "the records, and confirms them, over MQTT"
            )
        return self

    @model_validator(mode="after")
    def _check_http_roles(self) -> LineConfig:
        # HMI users take their roles from [mqtt.roles], so a typo there is caught here.
        roles = ", ".join(repr(r) for r in self.mqtt.roles) or "none"
        faults = [
            f"http.users.{name}: role {user.role!r} is not defined in [mqtt.roles] "
            f"(defined: {roles})"
            for name, user in self.http.users.items()
            if user.role not in self.mqtt.roles
        ]
        if faults:
            raise ValueError("\n  ".join(faults))
        return self

    @model_validator(mode="after")
    def _check(self) -> LineConfig:
        hold_min_s = self.watchdog_timeout_ms / 1000.0 + 2 * self.cycle_period_s
        if self.control.acc_lost_hold_s < hold_min_s:
            raise ValueError(
                f"control.acc_lost_hold_s {self.control.acc_lost_hold_s} s must exceed "
                f"watchdog_timeout_ms / 1000 + two cycles = {hold_min_s:g} s: the line must "
                "keep moving until the accelerator's own watchdog has cut the beam"
            )
        if self.watchdog_timeout_ms / 1000.0 < 3 * self.cycle_period_s:
            raise ValueError(
                f"watchdog_timeout_ms {self.watchdog_timeout_ms} is shorter than three "
                f"control cycles ({3 * self.cycle_period_s:g} s): the PLCs would trip in "
                "normal operation"
            )
        return self


# --------------------------------------------------------------------------- recipe


class Recipe(_Strict):
    """A validated product recipe. Doses in kGy, speeds in m/min, currents in mA."""

    _source_sha256: str | None = PrivateAttr(default=None)

    @property
    def source_sha256(self) -> str | None:
        """sha256 of the file bytes this recipe was validated from (load_recipe); None
        for a recipe built in code."""
        return self._source_sha256

    product: Annotated[str, Field(min_length=1)]
    """Product name."""
    version: Annotated[str, Field(min_length=1)]
    """Recipe version; every record names it."""
    target_dose_kgy: Annotated[float, Field(gt=0)]
    """Dose aimed at."""
    min_dose_kgy: Annotated[float, Field(gt=0)]
    """Lowest dose in spec."""
    max_dose_kgy: Annotated[float, Field(gt=0)]
    """Highest dose in spec."""
    energy_mev: Annotated[float, Field(gt=0)]
    """Beam energy."""
    energy_tolerance_mev: Annotated[float, Field(gt=0)]
    """Allowed deviation of the measured energy."""
    k_dose: Annotated[float, Field(gt=0)]
    """Dose coefficient K, kGy * (m/min) * cm / mA, from dosimetry."""
    scan_width_cm: Annotated[float, Field(gt=0)]
    """Scan width."""
    beam_current_min_ma: Annotated[float, Field(ge=0)]
    """Lowest beam current the accelerator may run at."""
    beam_current_max_ma: Annotated[float, Field(gt=0)]
    """Highest beam current the accelerator may run at."""
    speed_min_m_min: Annotated[float, Field(gt=0)]
    """Lowest line speed with beam on."""
    speed_max_m_min: Annotated[float, Field(gt=0)]
    """Highest line speed."""
    description: str = ""
    """Free text."""

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not self.min_dose_kgy < self.target_dose_kgy < self.max_dose_kgy:
            raise ValueError(
                "doses must satisfy min_dose_kgy < target_dose_kgy < max_dose_kgy; got "
                f"min_dose_kgy {self.min_dose_kgy}, target_dose_kgy {self.target_dose_kgy}, "
                f"max_dose_kgy {self.max_dose_kgy}"
            )
        if self.beam_current_min_ma >= self.beam_current_max_ma:
            raise ValueError(
                f"beam_current_min_ma {self.beam_current_min_ma} must be below "
                f"beam_current_max_ma {self.beam_current_max_ma}"
            )
        if self.speed_min_m_min >= self.speed_max_m_min:
            raise ValueError(
                f"speed_min_m_min {self.speed_min_m_min} must be below "
                f"speed_max_m_min {self.speed_max_m_min}"
            )
        return self

    def energy_ok(self, energy_mev: float) -> bool:
        """Whether a measured beam energy is this recipe's, within its tolerance."""
        return dose.energy_in_tolerance(energy_mev, self.energy_mev, self.energy_tolerance_mev)

    def current_for_dose_ma(self, speed_m_min: float, weight_sum: float) -> float:
        """Beam current that gives the target dose at this speed: I = D v W / (K sum w)."""
        return dose.current_for_dose_ma(
            self.k_dose, self.target_dose_kgy, speed_m_min, self.scan_width_cm, weight_sum
        )

    def check_against(self, geometry: Geometry, accelerator: RegisterMap | None = None) -> None:
        """Cross-check with the line: the current range must reach the target dose somewhere
        in the speed range, and must lie within the accelerator's set-point range."""
        ws = geometry.weight_sum
        i_lo = self.current_for_dose_ma(self.speed_min_m_min, ws)
        i_hi = self.current_for_dose_ma(self.speed_max_m_min, ws)
        v_max = self.max_speed_m_min(ws)
        if not all(math.isfinite(x) for x in (i_lo, i_hi, v_max)):
            # Finite inputs can still overflow (1e300 * 1e300); a NaN would pass every
            # comparison below and reach the controller's set-points (tests/test_fuzz.py).
            raise ValueError(
                "the recipe's numbers overflow: the dose-follow current "
                f"({i_lo:g}..{i_hi:g} mA) or the speed the beam allows ({v_max:g} m/min) "
                "is not a finite number"
            )
        if self.beam_current_max_ma < i_lo or self.beam_current_min_ma > i_hi:
            raise ValueError(
                "beam current range beam_current_min_ma..beam_current_max_ma = "
                f"{self.beam_current_min_ma}..{self.beam_current_max_ma} mA cannot give "
                f"{self.target_dose_kgy} kGy anywhere in speed_min_m_min..speed_max_m_min = "
                f"{self.speed_min_m_min}..{self.speed_max_m_min} m/min on this line "
                f"(needs {i_lo:.3g}..{i_hi:.3g} mA with sum(w) = {ws:g})"
            )
        if accelerator is not None:
            sp = accelerator.field("beam_current_sp")
            if sp.max is not None and self.beam_current_max_ma > sp.max:
                raise ValueError(
                    f"beam_current_max_ma {self.beam_current_max_ma} exceeds the accelerator's "
                    f"set-point limit {sp.max} mA"
                )
            esp = accelerator.field("energy_sp")
            if (esp.min is not None and self.energy_mev < esp.min) or (
                esp.max is not None and self.energy_mev > esp.max
            ):
                raise ValueError(
                    f"energy_mev {self.energy_mev} is outside the accelerator's range "
                    f"{esp.min}..{esp.max} MeV"
                )

    def max_speed_m_min(self, weight_sum: float) -> float:
        """Fastest speed at which full recipe current still gives the target dose."""
        v = dose.speed_for_dose_m_min(
            self.k_dose,
            self.target_dose_kgy,
            self.beam_current_max_ma,
            self.scan_width_cm,
            weight_sum,
        )
        return min(v, self.speed_max_m_min)


# --------------------------------------------------------------------------- loading


def _format_validation(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(file)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; ConfigError names the file and the line of a syntax error."""
    return read_toml_bytes(path)[0]


def read_toml_bytes(path: Path) -> tuple[dict[str, Any], bytes]:
    """Parse a TOML file read once: the table and the very bytes it was parsed from."""
    try:
        raw = path.read_bytes()
        return tomllib.loads(raw.decode("utf-8")), raw
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        # tomllib decodes the bytes itself and lets this through (found by
        # tests/test_fuzz.py: a file with a Latin-1 byte in a string).
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 at byte {exc.start}") from None
    except RecursionError:
        # tomllib recurses per nesting level: thousands of nested arrays exhaust the stack.
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        # open() refuses a path with a NUL character (a TOML string may hold one, e.g. in
        # register_map = "a\u0000b"): found by tests/test_fuzz.py.
        raise ConfigError(f"{path!r}: cannot read: {exc}") from None


def _parse_env_value(text: str) -> Any:
    # TOML value syntax, so numbers and booleans keep their types, `[...]` is a list and
    # `{"op-1" = "operator"}` a table; a JSON array or object (`{"op-1": "operator"}`) is
    # taken too; bare words stay strings.
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if text.lstrip().startswith(("{", "[")):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            pass
    return text


def _is_text(annotation: Any) -> bool:
    """Whether a field of this type holds text only: str, a Literal of strings, or one of
    those or None."""
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return bool(args) and all(_is_text(a) for a in args)
    return False


def _field_type(model: type[BaseModel], keys: list[str]) -> Any:
    """The declared type of the line.toml key at `keys`, or None when it is not a key."""
    node: Any = model
    for key in keys:
        if get_origin(node) in (Union, UnionType):
            # Optional sections (`tls`): the section's own type.
            inner = [a for a in get_args(node) if a is not type(None)]
            if len(inner) != 1:
                return None
            node = inner[0]
        if isinstance(node, type) and issubclass(node, BaseModel):
            info = node.model_fields.get(key)
            if info is None:
                return None
            node = info.annotation
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        else:
            return None
    return node


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Apply `LINECTL_<KEY>[__<KEY>...]=value` overrides to line.toml data in place.

    Keys are lower-cased; `__` separates nesting levels (LINECTL_ACCELERATOR__HOST=10.0.0.5).
    A value is read by the type of its key, as pydantic-settings does: a text key (a host,
    a user name, a password) takes the value exactly as it is, so `123456` or `true` stays
    that text; any other key takes TOML syntax (`6000`, `0.02`, `true`, `[0.5, 1.0]`). A
    table key takes a whole table as a TOML inline table or a JSON object, which replaces
    the file's table: LINECTL_MQTT__IDENTITIES='{"op-1" = "operator"}' gives a role to an
    identity whose name no environment variable name can hold (`-`, `.`, upper case).
    Returns the dotted keys that were overridden. `LINECTL_CONFIG_DIR` is not an override.
    """
    applied = []
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "LINECTL_CONFIG_DIR":
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        if _BAD_ENV_CHARS_RE.search(text):
            # A non-UTF-8 byte arrives as a lone surrogate, which no file or record can
            # hold. The value is never shown: it may be a password.
            raise ConfigError(
                f"environment {name}: the value holds a control character or a byte that "
                "is not UTF-8"
            )
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment {name}: {key!r} is not a section")
            node = child
        text_key = _is_text(_field_type(LineConfig, keys))
        node[keys[-1]] = text if text_key else _parse_env_value(text)
        applied.append(".".join(keys))
    return applied


def load_register_map(path: Path) -> RegisterMap:
    """Load and validate one register map file."""
    try:
        return RegisterMap.model_validate(read_toml(path))
    except ValidationError as exc:
        raise ConfigError(_format_validation(path, exc)) from None


def load_recipe(path: Path, line: LoadedConfig | None = None) -> Recipe:
    """Load and validate a recipe; with a line, cross-check it against the line."""
    data, raw = read_toml_bytes(path)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(path, exc)) from None
    # Records name the bytes that were validated, not whatever the file holds later.
    recipe._source_sha256 = hashlib.sha256(raw).hexdigest()
    if line is not None:
        try:
            recipe.check_against(line.line.geometry, line.accelerator_map)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return recipe


class LoadedConfig:
    """A configuration directory, loaded and validated as a whole."""

    def __init__(
        self,
        directory: Path,
        line: LineConfig,
        accelerator_map: RegisterMap,
        conveyor_map: RegisterMap,
        overrides: list[str],
    ) -> None:
        self.directory = directory
        self.line = line
        self.accelerator_map = accelerator_map
        self.conveyor_map = conveyor_map
        self.overrides = overrides

    def register_map(self, plc: PlcName) -> RegisterMap:
        """The map of the named PLC."""
        return self.accelerator_map if plc == "accelerator" else self.conveyor_map

    def endpoint(self, plc: PlcName) -> PlcEndpoint:
        """The endpoint of the named PLC."""
        return self.line.accelerator if plc == "accelerator" else self.line.conveyor

    def resolve(self, relative: str) -> Path:
        """A path from the configuration, relative to the configuration directory."""
        p = Path(relative)
        return p if p.is_absolute() else self.directory / p

    def mqtt_tls(self) -> MqttTls | None:
        """The [mqtt.tls] settings with their files resolved against this directory."""
        tls = self.line.mqtt.tls
        if tls is None:
            return None

        def path(p: str | None) -> str | None:
            return None if p is None else str(self.resolve(p))

        return tls.model_copy(
            update={
                "ca_file": path(tls.ca_file),
                "cert_file": path(tls.cert_file),
                "key_file": path(tls.key_file),
            }
        )

    @property
    def recipes_dir(self) -> Path:
        """Where recipe files live."""
        return self.resolve(self.line.recipes_dir)

    def recipe_path(self, name: str) -> Path:
        """Path of a recipe by name (file stem) or path."""
        p = Path(name)
        if p.suffix == ".toml" or len(p.parts) > 1:
            return p
        return self.recipes_dir / f"{name}.toml"

    def load_recipe(self, name: str) -> Recipe:
        """Load a recipe by name and cross-check it against this line."""
        return load_recipe(self.recipe_path(name), self)


def default_config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`LINECTL_CONFIG_DIR`, else ./config: the configuration of a command given none
    (`linectl demo` and `linectl sim` fall back further: config_dir_or_reference)."""
    env = os.environ if environ is None else environ
    return Path(env.get("LINECTL_CONFIG_DIR", "config"))


def reference_config_dir() -> Path:
    """The reference configuration shipped in the package (linectl/reference/: line.toml,
    both register maps, the recipe; package data in the wheel, config/ in a checkout links
    to it). `linectl demo` and `linectl sim` run on it when there is no configuration, and
    `linectl init DIR` copies it. Never written: it may sit in a read-only site-packages."""
    return Path(__file__).resolve().parent / "reference"


def config_dir_or_reference(environ: Mapping[str, str] | None = None) -> tuple[Path, bool]:
    """The configuration of a simulated line (`linectl demo`, `linectl sim`) given none:
    (directory, True) when it is the reference configuration. $LINECTL_CONFIG_DIR when set
    (even if it does not exist: an explicit choice is never replaced, load_config says it
    is missing), else ./config when it exists, else the reference configuration."""
    env = os.environ if environ is None else environ
    if "LINECTL_CONFIG_DIR" in env or Path("config").is_dir():
        return default_config_dir(env), False
    return reference_config_dir(), True


def reference_config_note(directory: Path) -> str:
    """The first line `linectl demo` and `linectl sim` print when they run on the
    reference configuration."""
    return (
        f"linectl: using the reference configuration shipped with linectl ({directory}); "
        "give --config DIR for your own (`linectl init DIR` writes one to start from)"
    )


def load_config(directory: Path | str, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Load line.toml and both register maps from a directory; ConfigError on any fault."""
    directory = Path(directory)
    line_path = directory / "line.toml"
    if directory.is_file():
        raise ConfigError(
            f"{directory}: a file, not a configuration directory (give the directory that "
            f"holds line.toml: {directory.parent})"
        )
    if not directory.is_dir():
        # Say how to point elsewhere, and how to make one (an installed linectl has none).
        raise ConfigError(
            f"{directory}: no such configuration directory (give --config DIR or set "
            f"LINECTL_CONFIG_DIR to the line's configuration directory, or write a starter "
            f"one with `linectl init {directory}`; `linectl demo` and `linectl sim` without "
            f"either run on the reference configuration shipped with linectl)"
        )
    data = read_toml(line_path)
    overrides = apply_env_overrides(data, os.environ if environ is None else environ)
    try:
        line = LineConfig.model_validate(data)
    except ValidationError as exc:
        where = f"{line_path} (with environment overrides {overrides})" if overrides else line_path
        raise ConfigError(_format_validation(Path(where), exc)) from None
    maps: dict[str, RegisterMap] = {}
    map_paths: dict[str, Path] = {}
    for plc in ("accelerator", "conveyor"):
        endpoint: PlcEndpoint = getattr(line, plc)
        path = Path(endpoint.register_map)
        path = path if path.is_absolute() else directory / path
        rmap = load_register_map(path)
        if rmap.plc != plc:
            raise ConfigError(f"{path}: plc = {rmap.plc!r}, but line.toml uses it for {plc!r}")
        maps[plc], map_paths[plc] = rmap, path
    acc, cnv = maps["accelerator"], maps["conveyor"]
    e_acc, e_cnv = line.accelerator, line.conveyor
    if (e_acc.host, e_acc.port, e_acc.unit_id) == (e_cnv.host, e_cnv.port, e_cnv.unit_id):
        raise ConfigError(
            f"{line_path}: accelerator and conveyor point at the same PLC "
            f"{e_acc.host}:{e_acc.port} unit {e_acc.unit_id}"
        )
    faults = _settings_out_of_map(line, acc, cnv, map_paths)
    if faults:
        raise ConfigError(f"{line_path}: " + "; ".join(faults))
    return LoadedConfig(directory, line, acc, cnv, overrides)


def _settings_out_of_map(
    line: LineConfig, acc: RegisterMap, cnv: RegisterMap, paths: Mapping[str, Path]
) -> list[str]:
    """The settings linectl writes at every connect, checked against the maps' ranges: a
    PLC that refuses one cannot be run (the link treats it as lost), so say it here,
    naming both files (the setting or the map may be the one that is wrong)."""
    wanted = (
        ("watchdog_timeout_ms", acc, "watchdog_timeout", line.watchdog_timeout_ms),
        ("watchdog_timeout_ms", cnv, "watchdog_timeout", line.watchdog_timeout_ms),
        ("control.line_ramp_m_min_s", cnv, "ramp_rate", line.control.line_ramp_m_min_s),
    )
    faults = []
    for key, rmap, name, value in wanted:
        if name not in rmap.fields:
            continue
        f = rmap.field(name)
        if (f.min is not None and value < f.min) or (f.max is not None and value > f.max):
            where = f"the {rmap.plc} map's {name} range"
            if f.min is not None and f.max is not None:
                where += f" {f.min:g}..{f.max:g} {f.unit}".rstrip()
            faults.append(f"{key} = {value:g} is outside {where} ({paths[rmap.plc]})")
    return faults


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of each configuration file kind."""
    return {
        "line": LineConfig.model_json_schema(),
        "register_map": RegisterMap.model_json_schema(),
        "recipe": Recipe.model_json_schema(),
    }
