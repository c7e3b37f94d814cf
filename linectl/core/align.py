"""Pairing the two PLCs' counters at one instant.

The ledger splits the beam charge of an interval over the cable that moved in the same
interval. The charge comes from the accelerator PLC and the length from the conveyor PLC,
in two requests that are answered at slightly different moments; when a PLC answers late,
or with jitter, the two counters of one control cycle were not sampled together, and a
few tens of milliseconds of charge land on the wrong stretch of cable (0.7 % max error per
metre measured with 30 +/- 10 ms response delays before this module existed).

So each counter reading gets the time the PLC sampled it, from the PLC's own millisecond
clock read in the same request block, mapped onto the host clock (`PlcClock`); and the
conveyor's length samples are paired with the accelerator's charge interpolated to the
same instant (`CounterAligner`). That costs one control cycle of delay in accounting,
never in control.

Pure: time comes in as arguments.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from linectl.core.ledger import LedgerSample


class PlcClock:
    """Maps a PLC's free-running millisecond clock onto the host's monotonic clock.

    offset = host receive time - PLC sample time, at its minimum over a sliding window:
    the least-delayed responses bound the true offset from above, and the minimum tracks
    it within the network's jitter floor. A jump of more than `jump_s` (a PLC restart,
    a clock set) starts the estimate afresh. Without a clock reading the host receive
    time is the best estimate there is.
    """

    def __init__(self, modulus_ms: float, *, window_s: float = 10.0, jump_s: float = 1.0) -> None:
        self.modulus_ms = modulus_ms
        self.window_s = window_s
        self.jump_s = jump_s
        self._last_raw: float | None = None
        self._unwrapped_ms = 0.0
        # (host time, offset) with offsets increasing: front is the window's minimum.
        self._mins: deque[tuple[float, float]] = deque()
        self.resets = 0

    @property
    def offset_s(self) -> float | None:
        """The current offset estimate (host - PLC), or None before the first reading."""
        return self._mins[0][1] if self._mins else None

    def sample_time(self, host_t_s: float, plc_ms: float | None) -> float:
        """Host-clock time at which the PLC took a sample stamped `plc_ms`."""
        if plc_ms is None or not math.isfinite(plc_ms):
            # A clock reading that is not a number would make the unwrapped clock NaN for
            # good, and every later sample time with it: no clock reading this time.
            return host_t_s
        if self._last_raw is None:
            self._unwrapped_ms = float(plc_ms)
        else:
            self._unwrapped_ms += (float(plc_ms) - self._last_raw) % self.modulus_ms
        self._last_raw = float(plc_ms)
        plc_s = self._unwrapped_ms / 1000.0
        offset = host_t_s - plc_s
        est = self.offset_s
        if est is not None and abs(offset - est) > self.jump_s:
            self._mins.clear()
            self.resets += 1
        while self._mins and self._mins[-1][1] >= offset:
            self._mins.pop()
        self._mins.append((host_t_s, offset))
        while self._mins[0][0] < host_t_s - self.window_s:
            self._mins.popleft()
        return plc_s + self._mins[0][1]


@dataclass(frozen=True, slots=True)
class AccPoint:
    """The accelerator's part of a ledger sample, at the time the PLC took it."""

    t_s: float
    charge_uc: float
    scan_width_cm: float | None
    energy_ok: bool


@dataclass(frozen=True, slots=True)
class CnvPoint:
    """The conveyor's part of a ledger sample, at the time the PLC took it."""

    t_s: float
    length_m: float
    speed_m_min: float | None


class CounterAligner:
    """Turns the two PLCs' sample streams into ledger samples taken at one instant.

    Each conveyor sample waits until an accelerator sample at or after its time has
    arrived, then gets the charge interpolated linearly between the accelerator samples
    around it (when they are at most `max_span_s` apart). If none arrives within
    `max_wait_s` it goes to the ledger with no charge: the ledger skips it, and the next
    good pair accounts the whole interval from the counters (or marks it unproven if it
    grew too long).
    """

    def __init__(
        self,
        charge_modulus_uc: float,
        *,
        max_wait_s: float = 0.3,
        max_span_s: float = 0.3,
        max_rate_uc_s: float = 100_000.0,
    ) -> None:
        self.charge_modulus_uc = charge_modulus_uc
        self.max_rate_uc_s = max_rate_uc_s
        """Beam current bound (uC/s; 100 mA by default, over any recipe's maximum) for the
        charge a sample read a moment before the first accelerator reading can hide."""
        self.max_wait_s = max_wait_s
        self.max_span_s = max_span_s
        """No interpolation between accelerator samples further apart than this: across
        a gap in its data the charge may have come at any moment (or in a burst), so the
        conveyor samples inside it get no charge and the ledger bounds the gap itself."""
        self._acc: deque[AccPoint] = deque()
        self._pending: deque[CnvPoint] = deque()
        self._last_cnv_t_s = -math.inf

    def push(self, now_s: float, acc: AccPoint | None, cnv: CnvPoint | None) -> list[LedgerSample]:
        """Add this cycle's good samples (None where a PLC gave none); return the ledger
        samples that are complete, in time order."""
        if acc is not None and (not self._acc or acc.t_s > self._acc[-1].t_s):
            self._acc.append(acc)
        if cnv is not None and cnv.t_s > self._last_cnv_t_s:
            self._pending.append(cnv)
            self._last_cnv_t_s = cnv.t_s
        out: list[LedgerSample] = []
        while self._pending:
            p = self._pending[0]
            sample = self._pair(p)
            if sample is None:
                if now_s - p.t_s <= self.max_wait_s:
                    break  # the accelerator sample after it is still to come
                sample = LedgerSample(p.t_s, None, p.length_m, None, True, p.speed_m_min)
            self._pending.popleft()
            out.append(sample)
        # Keep one accelerator sample before the oldest conveyor sample still waiting.
        oldest = self._pending[0].t_s if self._pending else now_s
        while len(self._acc) > 1 and self._acc[1].t_s <= oldest:
            self._acc.popleft()
        return out

    def _pair(self, p: CnvPoint) -> LedgerSample | None:
        after = next((a for a in self._acc if a.t_s >= p.t_s), None)
        if after is None:
            return None
        before = next((a for a in reversed(self._acc) if a.t_s <= p.t_s), None)
        if before is None or before is after:
            # Nothing earlier to interpolate from (the first samples): the nearest is
            # exact to within one poll, and the ledger starts from it.
            charge = after.charge_uc
            energy_ok = after.energy_ok
            uncertainty_uc = self.max_rate_uc_s * (after.t_s - p.t_s)
        elif after.t_s - before.t_s > self.max_span_s:
            return LedgerSample(p.t_s, None, p.length_m, None, True, p.speed_m_min)
        else:
            energy_ok = before.energy_ok and after.energy_ok
            step = (after.charge_uc - before.charge_uc) % self.charge_modulus_uc
            if step > self.charge_modulus_uc / 2:
                # Not a forward step: the counter was reset between the two. No
                # interpolation across it; the ledger sees the reset on this value,
                # an exact reading.
                charge = after.charge_uc
                uncertainty_uc = 0.0
            else:
                frac = (p.t_s - before.t_s) / (after.t_s - before.t_s)
                charge = (before.charge_uc + frac * step) % self.charge_modulus_uc
                # The charge really counted at p.t_s lies between the two readings: the
                # ledger widens a gap's upper bound that starts or ends here by this.
                uncertainty_uc = max(frac, 1.0 - frac) * step
        return LedgerSample(
            p.t_s,
            charge,
            p.length_m,
            after.scan_width_cm,
            energy_ok,
            p.speed_m_min,
            charge_uncertainty_uc=uncertainty_uc,
        )


__all__ = ["AccPoint", "CnvPoint", "CounterAligner", "PlcClock"]
