"""The plant: both PLC models and the ground truth, seen through their register maps.

Pure and synchronous (time passed in). Registers are encoded and decoded only through
the configured RegisterMap and linectl.codec, so a map with other addresses, word orders
or scales is served as declared.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

from linectl import codec
from linectl.config import Geometry, PlcName, RegisterField, RegisterMap
from simulators.groundtruth import DoseTruth
from simulators.physics import (
    U32,
    AcceleratorCounters,
    AcceleratorModel,
    AcceleratorParams,
    ConveyorCounters,
    ConveyorModel,
    ConveyorParams,
    substeps,
)

ILLEGAL_ADDRESS = 2
ILLEGAL_VALUE = 3

WATCHDOG_TIMEOUT_MIN_MS = 100
"""watchdog_timeout is 0 (off) or at least this; the map's min of 0 cannot say so."""

COUNTER_NAMES: dict[PlcName, tuple[str, ...]] = {
    "accelerator": ("charge_total", "trip_count", "clock"),
    "conveyor": ("length", "clock"),
}


def _raw_modulus(f: RegisterField) -> int:
    return 1 << (16 * f.width)


class _PlcImage:
    """Holding-register image and address index of one PLC."""

    def __init__(self, rmap: RegisterMap) -> None:
        self.map = rmap
        self.holding_fields = rmap.by_table["holding"]
        self.input_fields = rmap.by_table["input"]
        self.holding_at: dict[int, RegisterField] = {}
        for f in self.holding_fields:
            for a in range(f.address, f.end):
                self.holding_at[a] = f
        self.holding: dict[int, int] = {}
        self.reset_holding()

    def reset_holding(self) -> None:
        """All holding registers to the map's defaults."""
        self.holding = {}
        for f in self.holding_fields:
            for i, r in enumerate(codec.encode(f, f.default)):
                self.holding[f.address + i] = r

    def decoded_holding(self) -> dict[str, float | int]:
        """Field name -> engineering value of the holding image."""
        return {
            f.name: codec.decode(f, [self.holding[a] for a in range(f.address, f.end)])
            for f in self.holding_fields
        }


class Plant:
    """Accelerator, conveyor and dose truth, stepped together at 1 ms or finer."""

    def __init__(
        self,
        accelerator_map: RegisterMap,
        conveyor_map: RegisterMap,
        geometry: Geometry,
        *,
        seed: int = 1,
        k_dose_true: float = 1500.0,
        acc_counters: Mapping[str, int] | None = None,
        cnv_counters: Mapping[str, int] | None = None,
        acc_params: AcceleratorParams | None = None,
        cnv_params: ConveyorParams | None = None,
        arc_rate_per_h: float = 0.0,
    ) -> None:
        self.images: dict[PlcName, _PlcImage] = {
            "accelerator": _PlcImage(accelerator_map),
            "conveyor": _PlcImage(conveyor_map),
        }
        self.rng = random.Random(seed * 31 + 7)
        self.t_s = 0.0
        self.accelerator = AcceleratorModel(
            seed, acc_params, _acc_counters(acc_counters), arc_rate_per_h
        )
        self.conveyor = ConveyorModel(seed, cnv_params, _cnv_counters(cnv_counters))
        self.truth = DoseTruth(geometry, k_dose_true)
        for plc in ("accelerator", "conveyor"):
            self._apply_defaults(plc)

    # ------------------------------------------------------------------ time

    def advance_to(self, t_s: float) -> None:
        """Let plant time run to t_s, stepping both PLCs and the truth together."""
        n, h = substeps(t_s - self.t_s)
        acc, cnv, truth = self.accelerator, self.conveyor, self.truth
        for _ in range(n):
            dq = acc.step(h)
            dx = cnv.step(h)
            self.t_s += h
            truth.step(self.t_s, dq, dx, acc.scan_width_cm)
        if n:
            self.t_s = t_s

    def advance(self, dt_s: float) -> None:
        """Let dt_s pass."""
        self.advance_to(self.t_s + dt_s)

    # ------------------------------------------------------------------ registers

    def register_map(self, plc: PlcName) -> RegisterMap:
        """The map served for a PLC."""
        return self.images[plc].map

    def holding_registers(self, plc: PlcName) -> dict[int, int]:
        """Address -> raw value of every mapped holding register."""
        return dict(self.images[plc].holding)

    def input_registers(self, plc: PlcName) -> dict[int, int]:
        """Address -> raw value of every mapped input register, from the model now."""
        values = self.input_values(plc)
        out: dict[int, int] = {}
        for f in self.images[plc].input_fields:
            v = values.get(f.name, 0)
            if f.counter:
                raw = math.floor(v / f.scale + 1e-9) % _raw_modulus(f)
                regs = codec.encode(f, raw * f.scale)
            else:
                try:
                    regs = codec.encode(f, v)
                except codec.CodecError:
                    # A measurement out of the field's range saturates, like a PLC's analog
                    # scaling does, rather than crashing the server.
                    regs = _saturated(f, v)
            for i, r in enumerate(regs):
                out[f.address + i] = r
        return out

    def input_values(self, plc: PlcName) -> dict[str, float]:
        """Field name -> engineering value of each input (counters unwrapped)."""
        rmap = self.images[plc].map
        if plc == "accelerator":
            a = self.accelerator
            st = rmap.field("status")
            bits = {
                "READY": a.ready,
                "HV_ON": a.hv_up,
                "BEAM_ON": a.beam_on,
                "VACUUM_OK": a.vacuum_ok,
                "SCAN_OK": a.scan_ok,
                "COOLING_OK": a.cooling_ok,
                "SAFETY_OK": a.safety_ok,
                "FAULT": a.fault_latched,
                "REMOTE": True,
                "WATCHDOG_TRIP": a.watchdog_trip,
            }
            return {
                "status": _bits(st, bits),
                "beam_current": a.current_ma,
                "energy": a.energy_mev,
                "scan_width": a.scan_width_measured_cm if a.scan_ok else 0.0,
                "vacuum": a.vacuum_pa,
                "charge_total": a.charge_total_uc_float,
                "fault_code": a.fault_code,
                "trip_count": a.trip_count,
                "clock": a.clock_ms_float + 1e-6,
            }
        c = self.conveyor
        st = rmap.field("status")
        bits = {
            "READY": c.ready,
            "RUNNING": c.running,
            "AT_SPEED": c.at_speed,
            "TENSION_OK": c.tension_ok,
            "CABLE_BREAK": c.cable_break,
            "FAULT": c.fault_latched,
            "REMOTE": True,
            "WATCHDOG_TRIP": c.watchdog_trip,
            "ESTOP": c.estop,
        }
        return {
            "status": _bits(st, bits),
            "speed": c.speed_m_min,
            "length": c.length_mm_float,
            "tension": c.tension_n,
            "fault_code": c.fault_code,
            "clock": c.clock_ms_float + 1e-6,
        }

    def write_holding(self, plc: PlcName, address: int, values: Sequence[int]) -> int | None:
        """Apply a Modbus write; returns an exception code (2, 3) or None when done.

        A refused write changes nothing, not even the registers it would have touched.
        """
        img = self.images[plc]
        touched: list[RegisterField] = []
        new = dict(img.holding)
        for i, raw in enumerate(values):
            f = img.holding_at.get(address + i)
            if f is None:
                return ILLEGAL_ADDRESS
            if not 0 <= raw <= 0xFFFF:
                return ILLEGAL_VALUE
            new[address + i] = raw
            if f not in touched:
                touched.append(f)
        decoded: list[tuple[RegisterField, float | int]] = []
        for f in touched:
            v = codec.decode(f, [new[a] for a in range(f.address, f.end)])
            if not _acceptable(f, v):
                return ILLEGAL_VALUE
            decoded.append((f, v))
        img.holding = new
        for f, v in decoded:
            self._apply(plc, f, v)
        return None

    def _apply(self, plc: PlcName, f: RegisterField, v: float | int) -> None:
        """Hand a decoded holding value to the model."""
        setter = self._setters(plc).get(f.name)
        if setter is not None:
            setter(f, v)

    def _setters(self, plc: PlcName) -> dict[str, Callable[[RegisterField, float | int], None]]:
        if plc == "accelerator":
            a = self.accelerator

            def acc_command(f: RegisterField, v: float | int) -> None:
                raw = int(v)
                a.write_command(
                    codec.bit_is_set(f, raw, "HV_ON"),
                    codec.bit_is_set(f, raw, "BEAM_ON"),
                    codec.bit_is_set(f, raw, "FAULT_RESET"),
                )

            def current(_f: RegisterField, v: float | int) -> None:
                a.current_sp_ma = float(v)

            def energy(_f: RegisterField, v: float | int) -> None:
                a.energy_sp_mev = float(v)

            def scan(_f: RegisterField, v: float | int) -> None:
                a.scan_width_sp_cm = float(v)

            return {
                "command": acc_command,
                "beam_current_sp": current,
                "energy_sp": energy,
                "scan_width_sp": scan,
                "watchdog": lambda _f, v: a.write_watchdog(int(v)),
                "watchdog_timeout": lambda _f, v: a.write_watchdog_timeout(round(v)),
            }
        c = self.conveyor

        def cnv_command(f: RegisterField, v: float | int) -> None:
            raw = int(v)
            c.write_command(
                codec.bit_is_set(f, raw, "RUN"), codec.bit_is_set(f, raw, "FAULT_RESET")
            )

        def speed(_f: RegisterField, v: float | int) -> None:
            c.speed_sp_m_min = float(v)

        def ramp(_f: RegisterField, v: float | int) -> None:
            c.ramp_rate_m_min_s = float(v)

        return {
            "command": cnv_command,
            "speed_sp": speed,
            "ramp_rate": ramp,
            "watchdog": lambda _f, v: c.write_watchdog(int(v)),
            "watchdog_timeout": lambda _f, v: c.write_watchdog_timeout(round(v)),
        }

    def _apply_defaults(self, plc: PlcName) -> None:
        img = self.images[plc]
        img.reset_holding()
        fields = {f.name: f for f in img.holding_fields}
        for name, v in img.decoded_holding().items():
            if name in ("command", "watchdog"):
                continue  # commands are 0 and the watchdog is unarmed after a restart
            self._apply(plc, fields[name], v)

    # ------------------------------------------------------------------ lifecycle

    def random_counters(self, plc: PlcName) -> dict[str, int]:
        """Arbitrary counter values, as after a real PLC restart."""
        out: dict[str, int] = {}
        for name in COUNTER_NAMES[plc]:
            f = self.images[plc].map.field(name)
            out[name] = round(self.rng.randrange(_raw_modulus(f)) * f.scale)
        return out

    def restart(self, plc: PlcName, counters: Mapping[str, int] | None = None) -> dict[str, int]:
        """PLC restart: counters to `counters` (random if None), holding to defaults, outputs
        off. Returns the counter values used."""
        new = dict(counters) if counters is not None else self.random_counters(plc)
        if plc == "accelerator":
            self.accelerator.restart(_acc_counters(new))
        else:
            self.conveyor.restart(_cnv_counters(new))
        self._apply_defaults(plc)
        return new

    def start_reel(self, length_counter_m: float | None = None) -> None:
        """The controller starts a reel at this length-counter reading (default: now).

        The reading is matched to the true cable path through the counter's wrap, so it
        may be a value read a moment ago.
        """
        if length_counter_m is None:
            self.truth.start_reel()
            return
        behind_mm = (self.conveyor.length_mm - round(length_counter_m * 1000.0)) % U32
        self.truth.start_reel(self.truth.path_m - behind_mm / 1000.0)


def _acc_counters(d: Mapping[str, int] | None) -> AcceleratorCounters:
    d = d or {}
    return AcceleratorCounters(
        charge_total_uc=int(d.get("charge_total", 0)),
        trip_count=int(d.get("trip_count", 0)),
        clock_ms=int(d.get("clock", 0)),
    )


def _cnv_counters(d: Mapping[str, int] | None) -> ConveyorCounters:
    d = d or {}
    return ConveyorCounters(length_mm=int(d.get("length", 0)), clock_ms=int(d.get("clock", 0)))


def _bits(f: RegisterField, flags: Mapping[str, bool]) -> int:
    value = 0
    for name, on in flags.items():
        if name in f.bits:
            value = codec.with_bit(f, value, name, on)
    return value


def _acceptable(f: RegisterField, v: float | int) -> bool:
    """The PLC's range check of a written value (engineering units)."""
    if isinstance(v, float) and not math.isfinite(v):
        return False
    if f.min is not None and v < f.min:
        return False
    if f.max is not None and v > f.max:
        return False
    return not (f.name == "watchdog_timeout" and 0 < v < WATCHDOG_TIMEOUT_MIN_MS)


def _saturated(f: RegisterField, v: float) -> list[int]:
    lo, hi = {
        "int16": (-0x8000, 0x7FFF),
        "uint16": (0, 0xFFFF),
        "bits": (0, 0xFFFF),
        "int32": (-0x8000_0000, 0x7FFF_FFFF),
        "uint32": (0, 0xFFFF_FFFF),
    }.get(f.type, (0, 0))
    raw = min(hi, max(lo, v / f.scale)) if math.isfinite(v) else 0
    return codec.encode(f, round(raw) * f.scale)
