"""`linectl probe`: commission a PLC against its register map before the first reel.

Reads every mapped register of one or both PLCs through `linectl.modbus` (the requests
the controller itself makes), prints the decoded values with their units, and for each
32-bit field also the value in the other word orders. Then it checks what a wrong map or
a wrong PLC program would show: values outside their declared or plausible ranges, a PLC
clock that does not advance at 1 ms per ms, counters that move at rest, status bits that
contradict the interface (docs/plc-interface.md). Read-only unless `--active`, which is
refused unless the beam is off and the line at rest, and then checks the writable side:
set-point round trips, out-of-range refusal, the FAULT_RESET edge, watchdog arm and trip.

The checks are pure functions of the readings (registers with the host time they were
read at); only `run_probe` and the active sequence do I/O. Exit codes: 0 every check
passed, 1 a check failed, 2 bad input, PLC unreachable or `--active` refused.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TextIO, get_args

from linectl.codec import CodecError, bit_is_set, counter_modulus, decode, encode, with_bit
from linectl.config import (
    COUNTER_FIELDS,
    COUNTER_UNITS,
    LoadedConfig,
    PlcEndpoint,
    PlcName,
    RegisterField,
    RegisterMap,
    WordOrder,
    default_config_dir,
    load_config,
)
from linectl.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    LocalError,
    PlcError,
    PlcExceptionError,
    PlcUnavailableError,
    RemoteError,
)
from linectl.modbus import PlcLink, Snapshot
from linectl.quality import Quality

Status = Literal["pass", "fail", "skip"]
PLCS: Final[tuple[PlcName, PlcName]] = ("accelerator", "conveyor")
WORD_ORDERS: Final[tuple[WordOrder, ...]] = get_args(WordOrder)

SAMPLE_PERIOD_S: Final = 0.05
"""Time between two polls of the sampling window."""
DEFAULT_SECONDS: Final = 1.5
"""Default length of the sampling window (clock rate, counters at rest)."""
CLOCK_TOLERANCE: Final = 0.05
"""How far the PLC clock's rate may be from 1 ms per ms (relative)."""
MIN_TIMEOUT_S: Final = 0.5
"""The probe waits at least this long for an answer, whatever the controller's timeout_s."""
MIN_CONNECT_TIMEOUT_S: Final = 1.0
"""And at least this long for a connection."""
ACTIVE_WATCHDOG_MS: Final = 300
"""The watchdog timeout the active check arms (the interface allows 100 to 10000)."""

# Facts of the interface (docs/plc-interface.md): fault codes, which of them latch FAULT,
# the watchdog's own code, the TENSION_OK band.
FAULT_CODES: Final[dict[PlcName, dict[int, str]]] = {
    "accelerator": {
        0: "none",
        1: "beam trip (arc)",
        2: "high-voltage fault",
        3: "vacuum",
        4: "scan failure",
        5: "cooling",
        6: "safety chain open",
        7: "watchdog",
    },
    "conveyor": {
        0: "none",
        1: "drive fault",
        2: "cable break",
        3: "tension fault",
        4: "emergency stop",
        5: "watchdog",
    },
}
LATCHED_CODES: Final[dict[PlcName, frozenset[int]]] = {
    "accelerator": frozenset(range(2, 8)),
    "conveyor": frozenset(range(1, 6)),
}
WATCHDOG_CODE: Final[dict[PlcName, int]] = {"accelerator": 7, "conveyor": 5}
TENSION_OK_N: Final = (20.0, 200.0)
# A vacuum gauge reads at most about one atmosphere, in whichever unit the map names.
_ATMOSPHERE: Final[dict[str, float]] = {
    "Pa": 101325.0,
    "hPa": 1013.25,
    "mbar": 1013.25,
    "bar": 1.01325,
    "Torr": 760.0,
}
_NEWTON: Final[dict[str, float]] = {"N": 1.0, "daN": 10.0, "kN": 1000.0}
# Set-points the active round trip leaves alone: they have checks of their own.
_NOT_SETPOINTS: Final = frozenset({"command", "watchdog", "watchdog_timeout"})


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Check:
    """One check's result; `field` names the register-map field it is about, if one."""

    plc: str
    check: str
    field: str | None
    status: Status
    detail: str

    def as_json(self) -> dict[str, Any]:
        """The JSON form (`checks` of linectl.probe/1)."""
        return {
            "plc": self.plc,
            "check": self.check,
            "field": self.field,
            "status": self.status,
            "detail": self.detail,
        }


Registers = tuple[int, ...]
Series = tuple[tuple[float, Registers], ...]
"""(host monotonic time in s at which the answer came, the field's registers), in order."""


@dataclass(frozen=True)
class PlcReading:
    """What the probe read from one PLC: the input of every check."""

    plc: PlcName
    register_map: RegisterMap
    registers: Mapping[str, Registers]
    """Each field's registers from its first good read (missing: never read)."""
    series: Mapping[str, Series]
    """Each field's reads over the sampling window, the first one included."""
    read_checks: tuple[Check, ...] = ()
    """How the reads went: one check per planned request, one per field that failed."""

    def value(self, name: str) -> float | int | None:
        """The field's engineering value from its first read (None: not read)."""
        regs = self.registers.get(name)
        f = self.register_map.fields.get(name)
        if regs is None or f is None:
            return None
        return decode(f, regs)

    def values(self, name: str) -> list[float | int]:
        """Every value the field had over the sampling window."""
        f = self.register_map.fields[name]
        return [decode(f, regs) for _t, regs in self.series.get(name, ())]

    def bit(self, field_name: str, bit_name: str) -> bool | None:
        """The named bit of a bits field in its first read (None: unknown)."""
        f = self.register_map.fields.get(field_name)
        v = self.value(field_name)
        if f is None or v is None or bit_name not in f.bits:
            return None
        return bit_is_set(f, int(v), bit_name)

    def bit_ever(self, field_name: str, bit_name: str) -> bool | None:
        """Whether the bit was set in any read of the window (None: unknown)."""
        f = self.register_map.fields.get(field_name)
        if f is None or bit_name not in f.bits or not self.series.get(field_name):
            return self.bit(field_name, bit_name)
        return any(bit_is_set(f, int(v), bit_name) for v in self.values(field_name))


# --------------------------------------------------------------------------- formatting


def fmt_value(v: float | int | None) -> str:
    """A value for people: integers as they are, floats to 6 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}"


def _with_unit(f: RegisterField, v: float | int | None) -> str:
    return f"{fmt_value(v)} {f.unit}".rstrip()


def other_word_orders(f: RegisterField, registers: Registers) -> dict[str, float | int]:
    """For a 32-bit field, its registers decoded in each word order it is not declared in."""
    if f.width != 2 or len(registers) != 2:
        return {}
    return {
        order: decode(f.model_copy(update={"word_order": order}), registers)
        for order in WORD_ORDERS
        if order != f.word_order
    }


def bits_set(f: RegisterField, value: int) -> list[str]:
    """Names of the set bits of a bits field; unnamed ones as `bit<N>`."""
    names = {i: n for n, i in f.bits.items()}
    return [names.get(i, f"bit{i}") for i in range(16) if value >> i & 1]


def _onoff(flag: bool) -> str:
    return "set" if flag else "clear"


def _addr(f: RegisterField) -> str:
    return str(f.address) if f.width == 1 else f"{f.address}-{f.end - 1}"


# --------------------------------------------------------------------------- pure checks


def _range_for(rmap: RegisterMap, f: RegisterField) -> tuple[float | None, float | None, str]:
    """The range a field's value must lie in: declared (min/max) or plausible (measured
    values, from the set-point they follow or the physics); (None, None, "") if none."""
    if f.min is not None or f.max is not None:
        return f.min, f.max, "declared"
    follows = {
        "beam_current": "beam_current_sp",
        "energy": "energy_sp",
        "scan_width": "scan_width_sp",
        "speed": "speed_sp",
    }
    sp = rmap.fields.get(follows.get(f.name, ""))
    if sp is not None and sp.max is not None and sp.max > 0:
        return -0.02 * sp.max, 1.1 * sp.max, f"plausible ({sp.name} max {sp.max:g})"
    if f.name == "vacuum" and f.unit in _ATMOSPHERE:
        return 0.0, 1.1 * _ATMOSPHERE[f.unit], "plausible (0 to one atmosphere)"
    if f.name == "tension" and f.unit in _NEWTON:
        return -10.0 / _NEWTON[f.unit], 2000.0 / _NEWTON[f.unit], "plausible"
    return None, None, ""


def _in_range(v: float, lo: float | None, hi: float | None) -> bool:
    return math.isfinite(v) and (lo is None or v >= lo) and (hi is None or v <= hi)


def _float_sane(v: float) -> bool:
    # A float32 read in the wrong word order is mostly a denormal, a huge number or NaN.
    return math.isfinite(v) and (v == 0 or 1e-20 < abs(v) < 1e20)


def check_value(plc: PlcName, rmap: RegisterMap, f: RegisterField, regs: Registers) -> Check:
    """The field's value against its declared or plausible range, its type's sanity
    (finite, no denormal float, only named bits, a known fault code); a failure of a
    32-bit field names the word orders in which the value would pass."""
    v = decode(f, regs)
    lo, hi, why = _range_for(rmap, f)
    problem = ""
    if f.type == "bits":
        unknown = [b for b in bits_set(f, int(v)) if b.startswith("bit")]
        if unknown:
            problem = f"{', '.join(unknown)} set, which the map does not name"
    elif f.name == "fault_code" and int(v) not in FAULT_CODES[plc]:
        problem = (
            f"{fmt_value(v)} is not a fault code of the interface (0..{max(FAULT_CODES[plc])})"
        )
    elif f.type == "float32" and not _float_sane(float(v)):
        problem = f"{fmt_value(v)} is no plausible float (not finite, or a denormal)"
    elif not _in_range(float(v), lo, hi):
        problem = f"{_with_unit(f, v)} outside the {why} range {fmt_value(lo)}..{fmt_value(hi)}"
    if not problem:
        if f.type == "bits":
            return Check(plc, "value", f.name, "pass", f"0x{int(v):04x}, only named bits")
        where = f" in {fmt_value(lo)}..{fmt_value(hi)}" if why else ""
        return Check(plc, "value", f.name, "pass", f"{_with_unit(f, v)}{where}")
    hint = ""
    if f.width == 2:
        fits = [
            f"{order} {fmt_value(alt)}"
            for order, alt in other_word_orders(f, regs).items()
            if (f.type != "float32" or _float_sane(float(alt))) and _in_range(float(alt), lo, hi)
        ]
        if fits and len(fits) < 3:
            hint = f"; it would fit as {' or '.join(fits)}: check word_order"
    scale_hint = "" if f.type == "bits" or hint else "; check address, scale and unit"
    return Check(plc, "value", f.name, "fail", f"{problem}{hint}{scale_hint}")


def check_values(reading: PlcReading) -> list[Check]:
    """`check_value` for every field read."""
    rmap = reading.register_map
    return [
        check_value(reading.plc, rmap, f, reading.registers[f.name])
        for f in rmap.fields.values()
        if f.name in reading.registers
    ]


def _unwrapped(values: Sequence[float], modulus: float) -> list[float]:
    out = [values[0]]
    for prev, cur in itertools.pairwise(values):
        d = (cur - prev) % modulus
        out.append(out[-1] + d)
    return out


def clock_rate(f: RegisterField, series: Series) -> float | None:
    """The clock field's rate in ms per ms of host time over the series (a robust
    estimate: the median slope between readings half the series apart); None with fewer
    than 4 readings or less than 0.2 s between the first and the last."""
    if len(series) < 4 or series[-1][0] - series[0][0] < 0.2:
        return None
    to_ms = COUNTER_UNITS["clock"].get(f.unit)
    if to_ms is None:
        return None
    ts = [t * 1000.0 for t, _r in series]
    vals = _unwrapped([float(decode(f, r)) for _t, r in series], counter_modulus(f))
    half = len(series) // 2
    slopes = [
        (vals[i + half] - vals[i]) * to_ms / (ts[i + half] - ts[i])
        for i in range(len(series) - half)
        if ts[i + half] > ts[i]
    ]
    return statistics.median(slopes) if slopes else None


def check_clock(
    plc: PlcName, f: RegisterField, series: Series, tolerance: float = CLOCK_TOLERANCE
) -> Check:
    """The PLC clock advances at 1 ms per ms of host time, within `tolerance`."""
    if f.unit not in COUNTER_UNITS["clock"]:
        return Check(plc, "clock", f.name, "fail", f"unit {f.unit!r} is not ms or s")
    rate = clock_rate(f, series)
    if rate is None:
        return Check(
            plc, "clock", f.name, "fail", f"too few readings ({len(series)}) to measure its rate"
        )
    if abs(rate - 1.0) <= tolerance:
        return Check(plc, "clock", f.name, "pass", f"advances {rate:.3f} ms per ms")
    if f.width == 2 and len(series) >= 4:
        for order in WORD_ORDERS:
            if order == f.word_order:
                continue
            alt = clock_rate(f.model_copy(update={"word_order": order}), series)
            if alt is not None and abs(alt - 1.0) <= tolerance:
                return Check(
                    plc,
                    "clock",
                    f.name,
                    "fail",
                    f"advances {rate:.4g} ms per ms, not 1; read as {order} it advances "
                    f"{alt:.3f}: check word_order",
                )
    return Check(
        plc,
        "clock",
        f.name,
        "fail",
        f"advances {rate:.4g} ms per ms, not 1 (within {tolerance:.0%}): check address, "
        "scale and unit",
    )


def at_rest(reading: PlcReading) -> tuple[bool, list[str]]:
    """Whether the PLC's part of the line is at rest over the whole window (accelerator:
    no high voltage, no beam requested or on, no current; conveyor: RUN not requested,
    not running, no speed), and why not."""
    why: list[str] = []
    if reading.plc == "accelerator":
        for bit in ("HV_ON", "BEAM_ON"):
            if reading.bit_ever("command", bit):
                why.append(f"{bit} is requested (command)")
            if reading.bit_ever("status", bit):
                why.append(f"{bit} is set (status)")
        current = [abs(float(v)) for v in reading.values("beam_current")]
        if current and max(current) > 0.5:
            why.append(f"beam current reads {fmt_value(max(current))} mA")
    else:
        if reading.bit_ever("command", "RUN"):
            why.append("RUN is requested (command)")
        if reading.bit_ever("status", "RUNNING"):
            why.append("RUNNING is set (status)")
        speed = [abs(float(v)) for v in reading.values("speed")]
        if speed and max(speed) > 0.5:
            why.append(f"line speed reads {fmt_value(max(speed))} m/min")
    for name in ("status", "command"):
        if name not in reading.registers:
            why.append(f"{name} could not be read")
    return not why, why


def check_counters(reading: PlcReading) -> list[Check]:
    """The totalizers (charge, length, trips) do not move while the PLC is at rest."""
    plc = reading.plc
    rest, why = at_rest(reading)
    out = []
    for name in COUNTER_FIELDS[plc]:
        if name == "clock" or name not in reading.register_map.fields:
            continue
        series = reading.series.get(name, ())
        if not rest:
            out.append(Check(plc, "counter at rest", name, "skip", f"not at rest: {why[0]}"))
            continue
        if len(series) < 2:
            out.append(Check(plc, "counter at rest", name, "fail", "not read over the window"))
            continue
        f = reading.register_map.fields[name]
        first, last = decode(f, series[0][1]), decode(f, series[-1][1])
        moved = {r for _t, r in series}
        dt = series[-1][0] - series[0][0]
        if len(moved) == 1:
            out.append(
                Check(plc, "counter at rest", name, "pass", f"unchanged for {dt:.1f} s at rest")
            )
        else:
            out.append(
                Check(
                    plc,
                    "counter at rest",
                    name,
                    "fail",
                    f"moved from {_with_unit(f, first)} to {_with_unit(f, last)} in {dt:.1f} s "
                    "at rest: check address and word_order",
                )
            )
    return out


def fault_name(plc: PlcName, code: int | None) -> str:
    """`7 (watchdog)`, or the bare number when the interface does not know it."""
    if code is None:
        return "unknown"
    name = FAULT_CODES[plc].get(code)
    return f"{code} ({name})" if name else str(code)


def check_status(reading: PlcReading) -> list[Check]:
    """The status bits against the interface and against the measured values."""
    plc = reading.plc
    rm = reading.register_map
    if "status" not in reading.registers:
        return [Check(plc, "status", "status", "fail", "status not read")]
    out: list[Check] = []

    def add(name: str, ok: bool | None, good: str, bad: str, fld: str = "status") -> None:
        if ok is None:
            out.append(Check(plc, name, fld, "skip", "not read"))
        else:
            out.append(Check(plc, name, fld, "pass" if ok else "fail", good if ok else bad))

    bit = reading.bit
    code_v = reading.value("fault_code")
    code = None if code_v is None else int(code_v)
    fault = bit("status", "FAULT")
    add(
        "status REMOTE",
        bit("status", "REMOTE"),
        "REMOTE set: the PLC takes linectl's commands",
        "REMOTE clear: the PLC is in local mode and ignores linectl's commands",
    )
    if plc == "accelerator":
        add(
            "status SAFETY_OK",
            bit("status", "SAFETY_OK"),
            "SAFETY_OK set: personnel safety chain closed",
            "SAFETY_OK clear: the personnel safety chain is open; no beam is possible",
        )
    ready = bit("status", "READY")
    add(
        "status READY",
        ready,
        "READY set",
        f"READY clear (FAULT {'set' if fault else 'clear'}, fault_code {fault_name(plc, code)})",
    )
    if fault is not None and code is not None:
        latched = code in LATCHED_CODES[plc]
        add(
            "status FAULT",
            fault == latched,
            f"FAULT {'set' if fault else 'clear'} agrees with fault_code {fault_name(plc, code)}",
            f"FAULT {'set' if fault else 'clear'} but fault_code {fault_name(plc, code)}: "
            "check the status and fault_code addresses",
            "fault_code",
        )
    trip = bit("status", "WATCHDOG_TRIP")
    if trip is not None:
        wd = WATCHDOG_CODE[plc]
        ok = not trip or (bool(fault) and code == wd)
        add(
            "status WATCHDOG_TRIP",
            ok,
            f"WATCHDOG_TRIP {'set, with FAULT and code ' + str(wd) if trip else 'clear'}",
            f"WATCHDOG_TRIP set without FAULT and fault_code {wd} "
            f"(FAULT {'set' if fault else 'clear'}, fault_code {fault_name(plc, code)})",
        )
    if plc == "accelerator":
        beam, current = bit("status", "BEAM_ON"), reading.value("beam_current")
        if beam is False and current is not None:
            add(
                "status BEAM_ON",
                abs(float(current)) <= 0.5,
                f"BEAM_ON clear and beam current {fmt_value(current)} mA",
                f"BEAM_ON clear but beam current reads {fmt_value(current)} mA: "
                "check beam_current's address, scale and word_order",
                "beam_current",
            )
    else:
        running, speed = bit("status", "RUNNING"), reading.value("speed")
        if running is False and speed is not None:
            add(
                "status RUNNING",
                abs(float(speed)) <= 0.5,
                f"RUNNING clear and speed {fmt_value(speed)} m/min",
                f"RUNNING clear but speed reads {fmt_value(speed)} m/min: "
                "check speed's address, scale and word_order",
                "speed",
            )
        t_ok, tension = bit("status", "TENSION_OK"), reading.value("tension")
        tf = rm.fields.get("tension")
        if t_ok is not None and tension is not None and tf is not None and tf.unit in _NEWTON:
            t_n = float(tension) * _NEWTON[tf.unit]
            lo, hi = TENSION_OK_N
            agrees = (0.9 * lo <= t_n <= 1.1 * hi) if t_ok else not (1.1 * lo < t_n < 0.9 * hi)
            add(
                "status TENSION_OK",
                agrees,
                f"TENSION_OK {'set' if t_ok else 'clear'} and tension {t_n:.4g} N",
                f"TENSION_OK {'set' if t_ok else 'clear'} but tension reads {t_n:.4g} N "
                f"(the interface's band is {lo:g}..{hi:g} N): check tension's address, "
                "scale and word_order",
                "tension",
            )
    return out


def evaluate(reading: PlcReading, tolerance: float = CLOCK_TOLERANCE) -> list[Check]:
    """Every read-only check of one PLC's reading."""
    out = list(reading.read_checks)
    out += check_values(reading)
    clock = reading.register_map.fields.get("clock")
    if clock is not None:
        if "clock" in reading.registers:
            out.append(check_clock(reading.plc, clock, reading.series.get("clock", ()), tolerance))
        else:
            out.append(Check(reading.plc, "clock", "clock", "fail", "not read"))
    out += check_counters(reading)
    out += check_status(reading)
    return out


def active_refusal(reading: PlcReading) -> list[str]:
    """Why the active checks must not run on this PLC (empty: they may): the beam must be
    off and the line at rest, the fields they use readable, and no other controller may
    be changing the watchdog."""
    _rest, why = at_rest(reading)
    for name in ("watchdog", "watchdog_timeout"):
        if name not in reading.registers:
            why.append(f"{name} could not be read")
    hb = {r for _t, r in reading.series.get("watchdog", ())}
    if len(hb) > 1:
        why.append("the watchdog register changes: another controller is connected")
    return [f"{reading.plc}: {w}" for w in why]


def roundtrip_value(f: RegisterField, original: float) -> float | None:
    """A value inside the field's range, different from `original`, as the field can hold
    it exactly (None: the field declares no range to pick from)."""
    if f.min is None or f.max is None or f.max <= f.min:
        return None
    span = f.max - f.min
    for frac in (0.37, 0.63, 0.21):
        raw = f.min + frac * span
        v = float(f"{raw:.3g}")
        try:
            v = float(decode(f, encode(f, v)))
        except CodecError:
            continue
        if f.min <= v <= f.max and not math.isclose(v, original, rel_tol=1e-3, abs_tol=1e-6):
            return v
    return None


def out_of_range_value(f: RegisterField) -> float | None:
    """A value just above the field's max that its type can carry (None: none)."""
    if f.max is None:
        return None
    step = max(1.0, 0.1 * (f.max - (f.min or 0.0)))
    v = float(f"{f.max + step:.3g}")
    try:
        encode(f, v)
    except CodecError:
        return None
    return v


# --------------------------------------------------------------------------- I/O


def probe_endpoint(ep: PlcEndpoint, host: str | None, port: int | None) -> PlcEndpoint:
    """The endpoint the probe uses: overrides applied, timeouts no shorter than the
    probe's minimum (a commissioning read should not fail on a slow first answer)."""
    update: dict[str, Any] = {
        "timeout_s": max(ep.timeout_s, MIN_TIMEOUT_S),
        "connect_timeout_s": max(ep.connect_timeout_s, MIN_CONNECT_TIMEOUT_S),
    }
    if host is not None:
        update["host"] = host
    if port is not None:
        update["port"] = port
    return ep.model_copy(update=update)


def _one_field_map(rmap: RegisterMap, f: RegisterField) -> RegisterMap:
    # A map of this one field, to read it alone when its block was refused. Not validated
    # (the required fields are missing on purpose); the link only plans reads from it.
    return RegisterMap.model_construct(plc=rmap.plc, fields={f.name: f})


def _block_name(table: str, address: int, count: int) -> str:
    return f"{table} {address}..{address + count - 1}"


@dataclass
class _Collector:
    plc: PlcName
    registers: dict[str, Registers] = field(default_factory=dict)
    series: dict[str, list[tuple[float, Registers]]] = field(default_factory=dict)

    def add(self, snap: Snapshot) -> None:
        for r in snap.reads:
            if r.registers is None or r.quality is not Quality.GOOD:
                continue
            for f in r.block.fields:
                lo = f.address - r.block.address
                regs = tuple(r.registers[lo : lo + f.width])
                self.registers.setdefault(f.name, regs)
                self.series.setdefault(f.name, []).append((r.host_time_s, regs))


class _PlcProbe:
    """One PLC's links: the controller's own read plan, plus one link per field that had
    to be read alone because its request was refused."""

    def __init__(self, plc: PlcName, endpoint: PlcEndpoint, rmap: RegisterMap) -> None:
        self.plc = plc
        self.endpoint = endpoint
        self.rmap = rmap
        self.link = PlcLink(plc, endpoint, rmap, heartbeat_field=None)
        self.singles: list[PlcLink] = []
        self.col = _Collector(plc)
        self.read_checks: list[Check] = []

    async def connect(self) -> None:
        await self.link.start()
        ep = self.endpoint
        if not await self.link.wait_connected(ep.connect_timeout_s):
            raise PlcUnavailableError(
                self.plc,
                f"cannot connect to {ep.host}:{ep.port} within {ep.connect_timeout_s:g} s "
                "(is the address right, the PLC on, the port open?)",
            )

    async def _poll_answered(self, link: PlcLink) -> tuple[Snapshot, str]:
        """Poll (up to three times while there is no answer); the snapshot and, when a
        block failed, whether it was refused or not answered."""
        why = ""
        for _ in range(3):
            before = dict(link.stats.errors)
            if not link.connected:
                await link.wait_connected(self.endpoint.connect_timeout_s)
            snap = await link.poll()
            errors = {k: v - before.get(k, 0) for k, v in link.stats.errors.items()}
            if errors.get("exception"):
                why = "refused by the PLC with a Modbus exception (its code is logged on stderr)"
            elif any(errors.values()) or not snap.connected:
                why = f"no answer within {self.endpoint.timeout_s:g} s"
            else:
                why = ""
            if snap.ok or errors.get("exception"):
                return snap, why
        return snap, why

    async def first_read(self) -> None:
        snap, why = await self._poll_answered(self.link)
        if all(r.registers is None for r in snap.reads) and not why.startswith("refused"):
            ep = self.endpoint
            raise PlcUnavailableError(
                self.plc, f"{ep.host}:{ep.port} accepts connections but answers no read ({why})"
            )
        self.col.add(snap)
        for r in snap.reads:
            b = r.block
            names = ", ".join(f.name for f in b.fields)
            where = _block_name(b.table, b.address, b.count)
            if r.registers is not None:
                self.read_checks.append(
                    Check(
                        self.plc,
                        "read",
                        None,
                        "pass",
                        f"{where} (FC{b.function_code}, {len(b.fields)} fields) in one request",
                    )
                )
                continue
            self.read_checks.append(
                Check(
                    self.plc,
                    "read",
                    names if len(b.fields) == 1 else None,
                    "fail",
                    f"{where} (FC{b.function_code}: {names}) {why}; the controller could "
                    f"not read {'this field' if len(b.fields) == 1 else 'these fields'}",
                )
            )
            if len(b.fields) > 1:
                await self._read_alone(b.fields)

    async def _read_alone(self, fields: Sequence[RegisterField]) -> None:
        for f in fields:
            link = PlcLink(
                self.plc, self.endpoint, _one_field_map(self.rmap, f), heartbeat_field=None
            )
            await link.start()
            self.singles.append(link)
            if not await link.wait_connected(self.endpoint.connect_timeout_s):
                self.read_checks.append(
                    Check(self.plc, "read", f.name, "fail", "read alone: no connection")
                )
                continue
            snap, why = await self._poll_answered(link)
            if snap.ok:
                self.col.add(snap)
                continue
            self.read_checks.append(
                Check(
                    self.plc,
                    "read",
                    f.name,
                    "fail",
                    f"{f.table} {_addr(f)} read alone: {why}; check its address and table",
                )
            )

    async def sample(self) -> None:
        for link in (self.link, *self.singles):
            if link.connected:
                self.col.add(await link.poll())

    def reading(self) -> PlcReading:
        return PlcReading(
            self.plc,
            self.rmap,
            dict(self.col.registers),
            {k: tuple(v) for k, v in self.col.series.items()},
            tuple(self.read_checks),
        )

    async def close(self) -> None:
        for link in (self.link, *self.singles):
            await link.close()


# --------------------------------------------------------------------------- active


class _Active:
    """The active checks on one PLC, through its main link (beam off, line at rest)."""

    def __init__(self, probe: _PlcProbe) -> None:
        self.p = probe
        self.plc = probe.plc
        self.link = probe.link
        self.rmap = probe.rmap
        self.checks: list[Check] = []

    def add(self, check: str, fld: str | None, ok: bool, detail: str) -> None:
        self.checks.append(Check(self.plc, check, fld, "pass" if ok else "fail", detail))

    async def value(self, name: str) -> float | int:
        snap = await self.link.poll()
        v = snap.value(name)
        if v is None:
            raise PlcUnavailableError(self.plc, f"{name} could not be read")
        return v

    async def run(self) -> list[Check]:
        try:
            for f in self.rmap.fields.values():
                setpoint = f.access == "rw" and f.table == "holding" and f.type != "bits"
                if setpoint and f.name not in _NOT_SETPOINTS:
                    await self.setpoint(f)
            await self.fault_reset()
            await self.watchdog()
        except PlcError as exc:
            self.add("active", None, False, f"stopped: {exc}")
        return self.checks

    async def setpoint(self, f: RegisterField) -> None:
        original = await self.value(f.name)
        target = roundtrip_value(f, float(original))
        if target is None:
            self.checks.append(
                Check(self.plc, "set-point round trip", f.name, "skip", "no min/max declared")
            )
            return
        try:
            try:
                await self.link.write(f.name, target, verify=True)
                got = await self.value(f.name)
                ok = math.isclose(float(got), target, rel_tol=1e-6, abs_tol=1e-9)
                self.add(
                    "set-point round trip",
                    f.name,
                    ok,
                    f"wrote {_with_unit(f, target)}, read back {_with_unit(f, got)}",
                )
            except PlcError as exc:
                self.add("set-point round trip", f.name, False, f"wrote {fmt_value(target)}: {exc}")
            bad = out_of_range_value(f)
            if bad is not None:
                await self.refuses(f, bad)
        finally:
            await self.link.write(f.name, original, verify=True)

    async def refuses(self, f: RegisterField, bad: float) -> None:
        before = await self.value(f.name)
        name = "out-of-range write refused"
        try:
            await self.link.write(f.name, bad, verify=False)
        except PlcExceptionError as exc:
            after = await self.value(f.name)
            unchanged = after == before
            self.add(
                name,
                f.name,
                exc.exception_code == 3 and unchanged,
                f"{_with_unit(f, bad)} (max {fmt_value(f.max)}) refused with exception "
                f"{exc.exception_code}" + ("" if unchanged else f"; the value became {after}"),
            )
            return
        after = await self.value(f.name)
        self.add(
            name,
            f.name,
            False,
            f"{_with_unit(f, bad)} (max {fmt_value(f.max)}) was accepted (reads "
            f"{_with_unit(f, after)}); the interface refuses it with exception 3",
        )

    async def pulse_reset(self) -> None:
        cmd = self.rmap.field("command")
        word = int(await self.value("command"))
        await self.link.write("command", with_bit(cmd, word, "FAULT_RESET", True), verify=True)
        await self.link.write("command", with_bit(cmd, word, "FAULT_RESET", False), verify=True)

    async def status(self) -> tuple[int, int]:
        snap = await self.link.poll()
        st, code = snap.value("status"), snap.value("fault_code")
        if st is None or code is None:
            raise PlcUnavailableError(self.plc, "status or fault_code could not be read")
        return int(st), int(code)

    def bit(self, word: int, name: str) -> bool:
        return bit_is_set(self.rmap.field("status"), word, name)

    async def wait_status(self, cond: Callable[[int, int], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            st, code = await self.status()
            if cond(st, code):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)

    async def fault_reset(self) -> None:
        st0, code0 = await self.status()
        await self.pulse_reset()
        cleared = await self.wait_status(lambda st, _c: not self.bit(st, "FAULT"), 1.0)
        st, code = await self.status()
        was = f"fault_code {fault_name(self.plc, code0)} before" if self.bit(st0, "FAULT") else ""
        self.add(
            "FAULT_RESET edge",
            "command",
            cleared,
            f"FAULT_RESET 0->1->0 written; FAULT clear, READY {_onoff(self.bit(st, 'READY'))}"
            + (f" ({was})" if was else "")
            if cleared
            else f"FAULT still latched after FAULT_RESET: fault_code {fault_name(self.plc, code)} "
            "(is its cause still present?)",
        )

    async def watchdog(self) -> None:
        hb_f = self.rmap.field("watchdog")
        to_f = self.rmap.field("watchdog_timeout")
        modulus = 1 << (16 * hb_f.width)
        hb = int(await self.value("watchdog"))
        timeout_ms = float(ACTIVE_WATCHDOG_MS)
        if to_f.max is not None:
            timeout_ms = min(timeout_ms, to_f.max)
        expected = WATCHDOG_CODE[self.plc]

        last_beat = time.monotonic()

        async def beat() -> None:
            nonlocal hb, last_beat
            hb = (hb + 1) % modulus
            await self.link.write("watchdog", hb, verify=False)
            last_beat = time.monotonic()

        try:
            await beat()  # arms the watchdog (the first change), before the timeout is set
            await beat()
            await self.link.write("watchdog_timeout", timeout_ms, verify=True)
            keep_s = max(3 * timeout_ms / 1000.0, 0.6)
            end = time.monotonic() + keep_s
            tripped = False
            while time.monotonic() < end:
                await beat()
                st, _code = await self.status()
                if self.bit(st, "WATCHDOG_TRIP"):
                    tripped = True
                    break
                await asyncio.sleep(timeout_ms / 4000.0)
            self.add(
                "watchdog kept alive",
                "watchdog",
                not tripped,
                f"no trip in {keep_s:.1f} s with the heartbeat changing (timeout {timeout_ms:g} ms)"
                if not tripped
                else "WATCHDOG_TRIP while the heartbeat was changing",
            )
            if tripped:
                return
            trip = await self.wait_status(
                lambda st, _c: self.bit(st, "WATCHDOG_TRIP"), timeout_ms / 1000.0 * 3 + 1.0
            )
            st, code = await self.status()
            after_ms = (time.monotonic() - last_beat) * 1000.0
            ok = trip and self.bit(st, "FAULT") and code == expected
            self.add(
                "watchdog trip",
                "watchdog_timeout",
                ok,
                f"heartbeat stopped: WATCHDOG_TRIP and FAULT seen {after_ms:.0f} ms after the "
                f"last change (timeout {timeout_ms:g} ms), "
                f"fault_code {fault_name(self.plc, code)}"
                if ok
                else f"heartbeat stopped: WATCHDOG_TRIP {_onoff(self.bit(st, 'WATCHDOG_TRIP'))}, "
                f"FAULT {_onoff(self.bit(st, 'FAULT'))}, fault_code {fault_name(self.plc, code)} "
                f"(expected the trip with code {expected})",
            )
            if not trip:
                return
            await self.pulse_reset()
            cleared = await self.wait_status(
                lambda st, c: (
                    not self.bit(st, "WATCHDOG_TRIP") and not self.bit(st, "FAULT") and c == 0
                ),
                1.0,
            )
            st, code = await self.status()
            self.add(
                "FAULT_RESET clears the trip",
                "command",
                cleared,
                "WATCHDOG_TRIP and FAULT clear, fault_code 0"
                if cleared
                else f"after FAULT_RESET: WATCHDOG_TRIP {_onoff(self.bit(st, 'WATCHDOG_TRIP'))}, "
                f"FAULT {_onoff(self.bit(st, 'FAULT'))}, fault_code {fault_name(self.plc, code)}",
            )
        finally:
            # Left disabled: `linectl run` writes its own watchdog_timeout at connect.
            await self.link.write("watchdog_timeout", 0, verify=True)


# --------------------------------------------------------------------------- the probe


@dataclass
class ProbeResult:
    """Everything one probe found."""

    readings: dict[PlcName, PlcReading]
    endpoints: dict[PlcName, PlcEndpoint]
    checks: list[Check]
    active: bool = False
    refused: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if c.status == "fail"]


async def run_probe(
    loaded: LoadedConfig,
    plcs: Sequence[PlcName],
    endpoints: Mapping[PlcName, PlcEndpoint],
    *,
    seconds: float = DEFAULT_SECONDS,
    active: bool = False,
    tolerance: float = CLOCK_TOLERANCE,
) -> ProbeResult:
    """Read, sample for `seconds`, check; with `active`, then check the writable side
    unless `active_refusal` says why not. PlcUnavailableError when a PLC cannot be
    reached or answers no read."""
    probes = {plc: _PlcProbe(plc, endpoints[plc], loaded.register_map(plc)) for plc in plcs}
    try:
        results = await asyncio.gather(
            *(p.connect() for p in probes.values()), return_exceptions=True
        )
        _raise_unreachable(results)
        results = await asyncio.gather(
            *(p.first_read() for p in probes.values()), return_exceptions=True
        )
        _raise_unreachable(results)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(SAMPLE_PERIOD_S)
            await asyncio.gather(*(p.sample() for p in probes.values()))
        readings = {plc: p.reading() for plc, p in probes.items()}
        checks = [c for r in readings.values() for c in evaluate(r, tolerance)]
        result = ProbeResult(readings, dict(endpoints), checks, active=active)
        if active:
            result.refused = [w for r in readings.values() for w in active_refusal(r)]
            if not result.refused:
                for p in probes.values():
                    result.checks += await _Active(p).run()
        return result
    finally:
        for p in probes.values():
            await p.close()


def _raise_unreachable(results: Sequence[object]) -> None:
    errors = [r for r in results if isinstance(r, BaseException)]
    if not errors:
        return
    for e in errors:
        if not isinstance(e, PlcError):
            raise e
    if len(errors) == 1:
        raise errors[0]
    # One line naming every PLC that could not be reached (each message names its PLC).
    raise RemoteError("; ".join(str(e) for e in errors))


# --------------------------------------------------------------------------- output


def _json_num(v: float | int | None) -> float | int | str | None:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def result_json(result: ProbeResult, loaded: LoadedConfig) -> dict[str, Any]:
    """The probe's result as JSON (schema linectl.probe/1)."""
    plcs: dict[str, Any] = {}
    for plc, reading in result.readings.items():
        ep = result.endpoints[plc]
        fields: dict[str, Any] = {}
        for f in reading.register_map.fields.values():
            regs = reading.registers.get(f.name)
            entry: dict[str, Any] = {
                "table": f.table,
                "address": f.address,
                "type": f.type,
                "word_order": f.word_order,
                "scale": f.scale,
                "unit": f.unit,
                "registers": None if regs is None else list(regs),
                "value": None if regs is None else _json_num(decode(f, regs)),
            }
            if f.type == "bits" and regs is not None:
                entry["bits_set"] = bits_set(f, int(decode(f, regs)))
            if f.width == 2 and regs is not None:
                entry["other_word_orders"] = {
                    k: _json_num(v) for k, v in other_word_orders(f, regs).items()
                }
            fields[f.name] = entry
        plcs[plc] = {
            "endpoint": f"{ep.host}:{ep.port}",
            "unit_id": ep.unit_id,
            "register_map": str(loaded.resolve(ep.register_map)),
            "fields": fields,
        }
    return {
        "schema": "linectl.probe/1",
        "ok": not result.failed and not result.refused,
        "plcs": plcs,
        "checks": [c.as_json() for c in result.checks],
        "active": {"requested": result.active, "refused": result.refused or None},
    }


def print_result(result: ProbeResult, loaded: LoadedConfig, out: TextIO) -> None:
    """The readings, field by field, then the pass/fail table."""
    for plc, reading in result.readings.items():
        ep = result.endpoints[plc]
        print(
            f"{plc} at {ep.host}:{ep.port} unit {ep.unit_id}, "
            f"map {loaded.resolve(ep.register_map)}",
            file=out,
        )
        print(
            f"  {'field':<17} {'table':<7} {'addr':<5} {'type':<12} {'value':<26} "
            "other word orders",
            file=out,
        )
        for f in reading.register_map.fields.values():
            regs = reading.registers.get(f.name)
            kind = f"{f.type} {f.word_order}" if f.width == 2 else f.type
            if regs is None:
                shown, others = "not read", ""
            else:
                v = decode(f, regs)
                if f.type == "bits":
                    shown = f"0x{int(v):04x} {' '.join(bits_set(f, int(v))) or '-'}"
                else:
                    shown = _with_unit(f, v)
                others = "  ".join(
                    f"{k} {fmt_value(a)}" for k, a in other_word_orders(f, regs).items()
                )
            line = f"  {f.name:<17} {f.table:<7} {_addr(f):<5} {kind:<12} {shown:<26} {others}"
            print(line.rstrip(), file=out)
        print(file=out)
    print("checks", file=out)
    width = max((len(c.check) for c in result.checks), default=5)
    fwidth = max((len(c.field or "-") for c in result.checks), default=5)
    for c in result.checks:
        print(
            f"  {c.status.upper():<4}  {c.plc:<11}  {c.check:<{width}}  "
            f"{c.field or '-':<{fwidth}}  {c.detail}",
            file=out,
        )
    counts = {s: sum(1 for c in result.checks if c.status == s) for s in ("pass", "fail", "skip")}
    verdict = "FAIL" if counts["fail"] else "PASS"
    print(
        f"{len(result.checks)} checks: {counts['pass']} passed, {counts['fail']} failed, "
        f"{counts['skip']} skipped: {verdict}",
        file=out,
    )
    if result.active and result.refused:
        print(f"active checks refused, nothing written: {'; '.join(result.refused)}", file=out)


# --------------------------------------------------------------------------- CLI


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.5 <= v <= 60:
        raise argparse.ArgumentTypeError(f"must be 0.5 to 60 s, not {text}")
    return v


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1 to 65535, not {text}")
    return v


def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `probe [DIR] [--plc P] [--host H] [--port N] [--json] [--active] [--seconds S]`
    to an argparse subparsers object; its `handler` default is `run_probe_command`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "probe",
        help="commission a PLC: read every mapped register and check it against the map",
        description=(
            "Read every register of the map of one or both PLCs (the controller's own "
            "requests), print the decoded values with units, and for each 32-bit field the "
            "value in the other word orders. Check the values against their declared and "
            "plausible ranges, that the PLC clock advances at 1 ms per ms, that the counters "
            "do not move at rest, and the status bits against the interface "
            "(docs/plc-interface.md). Read-only unless --active. Exit 0 when every check "
            "passes, 1 when one fails, 2 on bad input, an unreachable PLC or a refused "
            "--active."
        ),
        epilog=(
            "--active writes to the PLC: set-point round trips (each restored), an "
            "out-of-range write that the PLC must refuse, a FAULT_RESET edge, and the "
            "watchdog: armed with a short timeout, kept alive, left to trip, reset with "
            "FAULT_RESET; watchdog_timeout is left at 0 (linectl run writes its own). It is "
            "refused, with the reason, unless the beam is off (no HV_ON/BEAM_ON), the line "
            "at rest (no RUN, no speed) and no other controller changes the watchdog. "
            "See docs/cli.md."
        ),
    )
    p.add_argument(
        "directory",
        nargs="?",
        type=Path,
        metavar="DIR",
        help="configuration directory (default: $LINECTL_CONFIG_DIR or ./config)",
    )
    p.add_argument(
        "--plc",
        choices=("accelerator", "conveyor", "both"),
        default="both",
        help="which PLC to probe (default: both)",
    )
    p.add_argument("--host", metavar="HOST", help="PLC host instead of line.toml's")
    p.add_argument(
        "--port", type=_port, metavar="N", help="PLC port instead of line.toml's (one --plc only)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--active",
        action="store_true",
        help="also check the writable side (writes; refused unless the line is at rest "
        "and the beam off)",
    )
    p.add_argument(
        "--seconds",
        type=_seconds,
        default=DEFAULT_SECONDS,
        metavar="S",
        help=f"sampling window for the clock and counter checks (default {DEFAULT_SECONDS:g} s)",
    )
    p.set_defaults(handler=run_probe_command)
    return p


def run_probe_command(args: argparse.Namespace, out: TextIO) -> int:
    """`linectl probe`: exit 0 all passed, 1 a check failed, 2 bad input, unreachable
    PLC or refused --active (LinectlError for the CLI's one-line message)."""
    plcs: list[PlcName] = list(PLCS) if args.plc == "both" else [args.plc]
    if args.port is not None and len(plcs) != 1:
        raise LocalError(
            "--port needs --plc accelerator or --plc conveyor (the two PLCs have their own "
            "ports; or set LINECTL_ACCELERATOR__PORT and LINECTL_CONVEYOR__PORT)"
        )
    directory = args.directory if args.directory is not None else default_config_dir()
    loaded = load_config(directory)
    endpoints = {plc: probe_endpoint(loaded.endpoint(plc), args.host, args.port) for plc in plcs}
    result = asyncio.run(
        run_probe(loaded, plcs, endpoints, seconds=args.seconds, active=args.active)
    )
    if args.json:
        json.dump(result_json(result, loaded), out, indent=2)
        out.write("\n")
    else:
        print_result(result, loaded, out)
    out.flush()
    if result.refused:
        print(
            f"linectl: error: probe --active refused, nothing was written: "
            f"{'; '.join(result.refused)}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    return EXIT_FAILED if result.failed else EXIT_OK
