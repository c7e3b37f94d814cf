"""How much charge a metre of cable can have taken while linectl was away mid-reel.

After a crash (SIGKILL, power cut of the controller's machine) the ledger knows, from the
PLCs' totalizers, the charge delivered and the length moved since its last checkpoint,
but not how the one was spread over the other: alone, the counters bound a bin's share
only by "none to all of it", and at 80 m/min every bin under the beam then straddles the
upper limit (64 m of cable unproven per crash on the reference line).

The PLC interface gives more than the counters, and this module says when it may be
used. A *held gap* is one in which both PLCs held the set-points linectl last wrote
while the line ran at speed, until their own watchdogs made the line safe:

- the conveyor follows `speed_sp` and slows only by a fault (the watchdog, a drive
  fault: at most `ramp_rate`), a cable break or an e-stop (at once);
- the accelerator follows `beam_current_sp` (a ramp, a lag, 0.5 % ripple) and switches
  the beam off when its watchdog times out (`watchdog_timeout` after the last change of
  `watchdog`);
- both watchdogs run the same timeout (or the conveyor's is the longer), so the beam is
  off before the conveyor's watchdog starts the ramp down, but for the skew between the
  two links' last heartbeats. linectl bounds that skew: while it lives, conveyor data
  older than `stale_after_s` takes the beam off within two cycles, its age counted
  without linectl's own stalls (at most `stall_credit_s` of them: modbus.link.StallLog).

Then, while the beam was on, the current was at most `i_hi_ma` and the cable ran at
`v_low_m_min` or faster, so each metre of cable that crossed a pass took at most
`i_hi / v_low` mA*min of charge from it: `charge_per_m_uc`. The ledger bounds each bin of
the gap by that (and still by the gap's whole charge), and checks the counters against
it: a gap whose charge exceeds what its length can hold under this bound refutes it, and
the ledger falls back to "none to all".

Everything the bound rests on is read, not assumed, where the interface allows it: the
checkpoint says the line had run at speed on an unchanged set-point since before the
ledger's last sample; the first poll after the restart (before linectl writes anything)
reads back the set-points the PLCs held, their watchdog timeouts and ramp, and their
latched faults. Anything else on either side (an e-stop, a cable break, a drive fault,
another set-point, a timeout that could let the conveyor slow under the beam) and the
bound is not used. The interface spec latches one `fault_code`; which one a PLC keeps
when a drive fault is followed by its watchdog is not stated (docs/dose-ledger.md).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from linectl import dose

AT_SPEED_BAND_M_MIN = 0.5
"""The conveyor reports AT_SPEED within this of `speed_sp` (plc-interface.md)."""

CURRENT_MARGIN = 1.01
"""The accelerator's ripple (0.5 %), twice over."""

SPEED_JITTER_M_MIN = 1.0
"""Dose-follow sets the current from the measured speed: within the AT_SPEED band of an
unchanged set-point, plus as much again for the speed reading's noise."""

WATCHDOG_JITTER_S = 0.05
"""A PLC's scan: how late its watchdog may act after the timeout."""

STEADY_MARGIN_S = 0.1
"""The line must have been steady this much longer than the checkpoint's sample age."""

ACC_FAULTS_OK = frozenset({0, 1, 7})
"""Accelerator fault codes a held gap allows: none, an arc (less charge), its watchdog."""

CNV_FAULTS_OK = frozenset({0, 5})
"""Conveyor fault codes a held gap allows: none, its watchdog (the normal ramp)."""

Values = Mapping[str, float | int | None]


@dataclass(frozen=True, slots=True)
class Held:
    """What a checkpoint records of the running line for a held gap."""

    steady_s: float
    """How long the line had run at speed on this speed set-point (RUNNING, AT_SPEED,
    beam on) when the checkpoint was taken."""
    speed_sp_m_min: float
    current_sp_ma: float
    current_ma: float

    def to_json(self) -> dict[str, float]:
        return {
            "steady_s": self.steady_s,
            "speed_sp_m_min": self.speed_sp_m_min,
            "current_sp_ma": self.current_sp_ma,
            "current_ma": self.current_ma,
        }

    @classmethod
    def from_json(cls, d: object) -> Held | None:
        """None for anything that is not a complete record of finite numbers."""
        if not isinstance(d, Mapping):
            return None
        try:
            vals = [float(d[k]) for k in ("steady_s", "speed_sp_m_min", "current_sp_ma")]
            vals.append(float(d["current_ma"]))
        except (KeyError, TypeError, ValueError):
            return None
        if not all(math.isfinite(v) for v in vals):
            return None
        return cls(*vals)


@dataclass(frozen=True, slots=True)
class LinkTiming:
    """linectl's own bounds on how stale the conveyor link's last heartbeat can be."""

    cycle_s: float
    cnv_stale_after_s: float
    cnv_timeout_s: float
    stall_credit_s: float
    """At most this much of the conveyor data's age is left out as linectl's own stall
    (LineConfig.stall_credit_s)."""

    @property
    def skew_s(self) -> float:
        """How much earlier than the accelerator's the conveyor's last heartbeat can be
        while the beam is on (linectl takes the beam off on stale conveyor data within
        two cycles; stale counted without its own stalls, so later by up to their credit),
        plus a PLC scan for the watchdogs themselves."""
        return (
            self.cnv_stale_after_s
            + self.stall_credit_s
            + self.cnv_timeout_s
            + 2 * self.cycle_s
            + WATCHDOG_JITTER_S
        )


@dataclass(frozen=True, slots=True)
class HeldBound:
    charge_per_m_uc: float
    """At most this much charge per metre of cable that crossed a pass in the gap."""
    i_hi_ma: float
    v_low_m_min: float


def _num(values: Values, name: str) -> float | None:
    v = values.get(name)
    if v is None:
        return None
    x = float(v)
    return x if math.isfinite(x) else None


def _bit(values: Values, name: str, bit: int) -> bool | None:
    v = values.get(name)
    if v is None:
        return None
    return bool(int(v) >> bit & 1)


def held_gap_bound(
    held: Held | None,
    sample_age_s: float,
    acc_first: Values | None,
    cnv_first: Values | None,
    *,
    acc_bits: Mapping[str, Mapping[str, int]],
    cnv_bits: Mapping[str, Mapping[str, int]],
    current_max_ma: float,
    timing: LinkTiming,
) -> HeldBound | str:
    """The bound for a gap since a checkpoint, or why there is none.

    `held` and `sample_age_s` come from the checkpoint; `acc_first` and `cnv_first` are
    each PLC's first poll after linectl started (decoded values by field name, holding
    registers included), taken before linectl wrote anything but its heartbeat;
    `*_bits` the maps' bit names of the `command` and `status` fields.
    """
    if held is None:
        return "the line was not running steadily at the checkpoint"
    if held.steady_s < sample_age_s + STEADY_MARGIN_S:
        return (
            f"the line had run steadily {held.steady_s:.2f} s at the checkpoint, not since "
            f"before its last sample ({sample_age_s:.2f} s old)"
        )
    if acc_first is None or cnv_first is None:
        return "no first reading of both PLCs"
    speed_sp = _num(cnv_first, "speed_sp")
    if speed_sp is None or not math.isclose(
        speed_sp, held.speed_sp_m_min, rel_tol=1e-6, abs_tol=1e-4
    ):
        return f"the conveyor holds speed_sp {speed_sp}, not {held.speed_sp_m_min:.3f} m/min"
    run = _bit(cnv_first, "command", cnv_bits["command"]["RUN"])
    if not run:
        return "the conveyor's RUN is not set"
    acc_code, cnv_code = _num(acc_first, "fault_code"), _num(cnv_first, "fault_code")
    if acc_code is None or int(acc_code) not in ACC_FAULTS_OK:
        return f"accelerator fault code {acc_code}"
    if cnv_code is None or int(cnv_code) not in CNV_FAULTS_OK:
        return f"conveyor fault code {cnv_code}"
    for bit in ("ESTOP", "CABLE_BREAK"):
        if _bit(cnv_first, "status", cnv_bits["status"][bit]) is not False:
            return f"conveyor {bit} set (or unread)"
    acc_wd, cnv_wd = _num(acc_first, "watchdog_timeout"), _num(cnv_first, "watchdog_timeout")
    if not acc_wd or not cnv_wd or cnv_wd < acc_wd:
        return (
            f"watchdog timeouts accelerator {acc_wd} ms, conveyor {cnv_wd} ms: the "
            "conveyor's may not be shorter, and neither may be off"
        )
    ramp = _num(cnv_first, "ramp_rate")
    if ramp is None or ramp <= 0:
        return f"conveyor ramp_rate {ramp}"
    v_low = speed_sp - AT_SPEED_BAND_M_MIN - ramp * timing.skew_s
    if v_low <= 0:
        return f"at {speed_sp:.1f} m/min the conveyor may slow to a stop under the beam"
    i_sp_first = _num(acc_first, "beam_current_sp")
    if i_sp_first is None:
        return "the accelerator's beam_current_sp unread"
    i_seen = max(held.current_sp_ma, held.current_ma, i_sp_first)
    i_hi = CURRENT_MARGIN * min(
        current_max_ma, i_seen * (1.0 + SPEED_JITTER_M_MIN / held.speed_sp_m_min)
    )
    i_hi = max(i_hi, CURRENT_MARGIN * i_seen)  # never below what was seen
    return HeldBound(i_hi * dose.UC_PER_MA_MIN / v_low, i_hi, v_low)


__all__ = ["Held", "HeldBound", "LinkTiming", "held_gap_bound"]
