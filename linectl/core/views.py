"""Translation between register-map values and the controller's views and outputs.

Pure: the service feeds decoded values from the links; the closed-loop tests feed values
decoded from the simulator's registers. Field and bit names are the register map's
contract names (linectl.config.REQUIRED_FIELDS); units are converted here, once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from linectl.codec import counter_modulus, with_bit
from linectl.config import COUNTER_UNITS, RegisterMap
from linectl.core.control import AccView, CnvView, Outputs
from linectl.core.ledger import LedgerSample
from linectl.errors import ConfigError

Values = Mapping[str, float | int | None]

# Factor to the ledger's units (metres, microcoulombs) by the map's declared unit; the
# map's loader checks the same tables.
_LENGTH_TO_M = COUNTER_UNITS["length"]
_CHARGE_TO_UC = COUNTER_UNITS["charge_total"]
_CLOCK_TO_MS = COUNTER_UNITS["clock"]


def _bits(values: Values, rmap: RegisterMap, field: str, bad: list[str]) -> dict[str, bool]:
    raw = values.get(field)
    f = rmap.field(field)
    if raw is None:
        return dict.fromkeys(f.bits, False)
    if isinstance(raw, float) and not (math.isfinite(raw) and raw == int(raw) and raw >= 0):
        # Not a bit pattern (int(nan) raises): the PLC's status is unknown.
        bad.append(field)
        return dict.fromkeys(f.bits, False)
    return {name: bool(int(raw) >> bit & 1) for name, bit in f.bits.items()}


def _num(values: Values, field: str, bad: list[str]) -> float:
    v = values.get(field)
    if v is None:
        return 0.0
    try:
        x = float(v)
    except OverflowError:  # an int too large for a float
        x = math.inf
    if not math.isfinite(x):
        # NaN fails every comparison, so an interlock that compares it never trips:
        # named here, and the controller trips on it (found by tests/test_fuzz.py).
        bad.append(field)
    return x


def _code(values: Values, field: str, bad: list[str]) -> int:
    x = _num(values, field, bad)
    return int(x) if math.isfinite(x) else 0  # int(nan) raises; the name is in `bad`


def acc_view(values: Values, rmap: RegisterMap, *, ok: bool) -> AccView:
    """The accelerator's decoded values as the controller sees them."""
    if not ok:
        return AccView(ok=False)
    bad: list[str] = []
    s = _bits(values, rmap, "status", bad)
    return AccView(
        ok=True,
        ready=s["READY"],
        hv_on=s["HV_ON"],
        beam_on=s["BEAM_ON"],
        vacuum_ok=s["VACUUM_OK"],
        scan_ok=s["SCAN_OK"],
        cooling_ok=s["COOLING_OK"],
        safety_ok=s["SAFETY_OK"],
        fault=s["FAULT"],
        watchdog_trip=s["WATCHDOG_TRIP"],
        beam_current_ma=_num(values, "beam_current", bad),
        energy_mev=_num(values, "energy", bad),
        scan_width_cm=_num(values, "scan_width", bad),
        fault_code=_code(values, "fault_code", bad),
        bad_values=tuple(bad),
    )


def cnv_view(values: Values, rmap: RegisterMap, *, ok: bool) -> CnvView:
    """The conveyor's decoded values as the controller sees them."""
    if not ok:
        return CnvView(ok=False)
    bad: list[str] = []
    s = _bits(values, rmap, "status", bad)
    return CnvView(
        ok=True,
        ready=s["READY"],
        running=s["RUNNING"],
        at_speed=s["AT_SPEED"],
        tension_ok=s["TENSION_OK"],
        cable_break=s["CABLE_BREAK"],
        fault=s["FAULT"],
        watchdog_trip=s["WATCHDOG_TRIP"],
        estop=s["ESTOP"],
        speed_m_min=_num(values, "speed", bad),
        fault_code=_code(values, "fault_code", bad),
        bad_values=tuple(bad),
    )


def acc_writes(out: Outputs, rmap: RegisterMap) -> dict[str, float | int]:
    """Holding-field values for the accelerator."""
    cmd_f = rmap.field("command")
    cmd = with_bit(cmd_f, 0, "HV_ON", out.hv_on)
    cmd = with_bit(cmd_f, cmd, "BEAM_ON", out.beam_on)
    cmd = with_bit(cmd_f, cmd, "FAULT_RESET", out.acc_fault_reset)
    return {
        "command": cmd,
        "beam_current_sp": out.beam_current_sp_ma,
        "energy_sp": out.energy_sp_mev,
        "scan_width_sp": out.scan_width_sp_cm,
        "watchdog": out.watchdog,
    }


def cnv_writes(out: Outputs, rmap: RegisterMap) -> dict[str, float | int]:
    """Holding-field values for the conveyor."""
    cmd_f = rmap.field("command")
    cmd = with_bit(cmd_f, 0, "RUN", out.run)
    cmd = with_bit(cmd_f, cmd, "FAULT_RESET", out.cnv_fault_reset)
    return {"command": cmd, "speed_sp": out.speed_sp_m_min, "watchdog": out.watchdog}


@dataclass(frozen=True, slots=True)
class CounterUnits:
    """How to turn the maps' counter readings into ledger units, and where they wrap."""

    charge_to_uc: float
    length_to_m: float
    charge_modulus_uc: float
    length_modulus_m: float

    @classmethod
    def from_maps(cls, acc: RegisterMap, cnv: RegisterMap) -> CounterUnits:
        """Read the units from the maps; ConfigError names an unknown unit."""
        q, length = acc.field("charge_total"), cnv.field("length")
        try:
            kq = _CHARGE_TO_UC[q.unit]
        except KeyError:
            raise ConfigError(
                f"accelerator map: charge_total unit {q.unit!r} is not one of "
                f"{sorted(_CHARGE_TO_UC)}"
            ) from None
        try:
            kl = _LENGTH_TO_M[length.unit]
        except KeyError:
            raise ConfigError(
                f"conveyor map: length unit {length.unit!r} is not one of {sorted(_LENGTH_TO_M)}"
            ) from None
        return cls(kq, kl, counter_modulus(q) * kq, counter_modulus(length) * kl)

    def sample(
        self,
        t_s: float,
        acc: Values,
        cnv: Values,
        *,
        acc_ok: bool,
        cnv_ok: bool,
        energy_ok: bool,
    ) -> LedgerSample:
        """A ledger sample from this cycle's values; None where a value is not GOOD."""
        q = acc.get("charge_total") if acc_ok else None
        length = cnv.get("length") if cnv_ok else None
        w = acc.get("scan_width") if acc_ok else None
        v = cnv.get("speed") if cnv_ok else None
        return LedgerSample(
            t_s=t_s,
            charge_uc=None if q is None else float(q) * self.charge_to_uc,
            length_m=None if length is None else float(length) * self.length_to_m,
            scan_width_cm=None if w is None else float(w),
            energy_ok=energy_ok,
            speed_m_min=None if v is None else float(v),
        )


def plc_clock_modulus_ms(rmap: RegisterMap) -> float:
    """Where the map's PLC clock wraps, in ms (a map without a clock: never used)."""
    if "clock" not in rmap.fields:
        return float(2**32)
    f = rmap.field("clock")
    scale_to_ms = _CLOCK_TO_MS.get(f.unit)
    if scale_to_ms is None:
        raise ConfigError(f"{rmap.plc} map: clock unit {f.unit!r} is not one of ['ms', 's']")
    return counter_modulus(f) * scale_to_ms
