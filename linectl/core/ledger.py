"""Per-metre dose ledger, computed from the PLCs' totalizers (process.md, "From counters").

Over each interval between two samples the beam delivered charge dQ (uC) while cable
length dL passed the counter. Pass k then deposited

    dose * length = w_k * K * dQ / (60000 * W)          [kGy * m]

spread evenly over the stretch of cable that crossed pass k in that interval. Intervals
are short (one control cycle: a few centimetres of cable), so spreading evenly within one
costs nothing measurable, and nothing between two samples is lost.

The ledger keeps dose in sub-metre bins (`resolution_m`) so that a metre's verdict rests
on its worst part, not only on its mean. A metre is final when its end has left the last
pass. An interval whose dose cannot be bounded (a data gap, a counter reset, a missing
value) marks the cable under every pass during it as unproven; unproven is never in spec.

Pure: no I/O and no clock; the caller passes each sample with its time.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from linectl.config import Geometry, Recipe

# Flags per bin (bitmask): why the dose in a bin is not to be trusted or is bad.
UNPROVEN = 1  # dose could not be bounded (gap, reset, missing data)
ENERGY = 2  # deposited while the beam energy was outside the recipe's tolerance
STANDSTILL = 4  # beam on while the cable stood still: dose without bound (burn)


class Verdict(enum.Enum):
    """The verdict of one final metre."""

    IN_SPEC = "in_spec"
    UNDER_DOSE = "under_dose"
    OVER_DOSE = "over_dose"
    UNPROVEN = "unproven"
    ENERGY = "energy_out_of_tolerance"


@dataclass(frozen=True, slots=True)
class LedgerSample:
    """What the ledger needs from one control cycle.

    Counter values are the raw engineering readings (they wrap); None means the value was
    not GOOD this cycle. `energy_ok` is False when the measured energy is outside the
    recipe's tolerance (or unknown) while the beam is on.
    """

    t_s: float
    charge_uc: float | None
    length_m: float | None
    scan_width_cm: float | None
    energy_ok: bool = True
    speed_m_min: float | None = None  # measured; used only to estimate motion after a length reset


@dataclass(frozen=True, slots=True)
class MetreRecord:
    """A final metre: index i covers cable coordinates [i, i + 1) m from the reel start."""

    index: int
    dose_kgy: float  # mean over the metre
    min_dose_kgy: float  # lowest sub-metre bin
    max_dose_kgy: float  # highest sub-metre bin
    verdict: Verdict
    causes: tuple[str, ...] = ()

    @property
    def in_spec(self) -> bool:
        """True only for a metre shown to be in spec."""
        return self.verdict is Verdict.IN_SPEC


@dataclass(frozen=True, slots=True)
class IntervalEvent:
    """Why an interval was not accounted normally (for logs and alarms)."""

    t_s: float
    kind: str  # "gap", "charge_reset", "length_reset", "missing"
    detail: str


@dataclass
class LedgerLimits:
    """Plausibility bounds that tell a counter wrap from a reset, and a gap from a cycle."""

    max_interval_s: float = 0.5
    """An interval longer than this cannot bound the dose on its cable: unproven."""
    max_current_ma: float = 100.0
    """The accelerator's rating: no interval can deliver more charge than this allows."""
    max_speed_m_min: float = 300.0
    """The conveyor's limit: no interval can pass more cable than this allows."""
    margin: float = 1.5
    """Slack on the two bounds above (ripple, clock jitter)."""


@dataclass
class _Bins:
    """Sub-metre bins: dose*length (kGy*m) and flags, keyed by bin index."""

    dose_len: dict[int, float] = field(default_factory=dict)
    flags: dict[int, int] = field(default_factory=dict)


class DoseLedger:
    """The dose of every metre of one reel, from counter samples."""

    def __init__(
        self,
        geometry: Geometry,
        recipe: Recipe,
        *,
        charge_modulus_uc: float,
        length_modulus_m: float,
        planned_length_m: float | None = None,
        resolution_m: float = 0.1,
        limits: LedgerLimits | None = None,
    ) -> None:
        if (
            not 0 < resolution_m <= 1.0
            or abs(1.0 / resolution_m - round(1.0 / resolution_m)) > 1e-9
        ):
            raise ValueError("resolution_m must divide 1 m evenly (e.g. 0.1, 0.25, 0.5, 1)")
        self.geometry = geometry
        self.recipe = recipe
        self.charge_modulus_uc = charge_modulus_uc
        self.length_modulus_m = length_modulus_m
        self.planned_length_m = planned_length_m
        self.resolution_m = resolution_m
        self._bins_per_m = round(1.0 / resolution_m)
        self.limits = limits or LedgerLimits()
        self._offsets_m = [geometry.offset_m(k) for k in range(geometry.passes)]
        self._weights = geometry.weights
        self._bins = _Bins()
        self._last: LedgerSample | None = None
        # Cable coordinate at the counter (L - L0, unwrapped); None before start().
        self._pos_m: float | None = None
        self._next_metre = 0  # the lowest metre not yet final
        # After a length-counter reset the cable moved an unknown distance in [0, worst];
        # the estimate is off by at most this much, so every later metre's verdict takes
        # the worst bin within this distance either side (position uncertainty).
        self._uncertainty_m = 0.0
        self._uncertain_from = 0  # the first metre the uncertainty applies to
        self.events: list[IntervalEvent] = []
        self.charge_total_uc = 0.0  # charge accounted to this reel

    # ------------------------------------------------------------------ state

    @property
    def position_m(self) -> float | None:
        """Cable coordinate at the length counter now (None before start)."""
        return self._pos_m

    @property
    def position_uncertainty_m(self) -> float:
        """How far the reel coordinate may be off the cable (0 unless a length-counter
        reset made the motion during it unknown)."""
        return self._uncertainty_m

    @property
    def next_metre(self) -> int:
        """Index of the first metre that is not final yet."""
        return self._next_metre

    def start(
        self,
        sample: LedgerSample,
        *,
        position_m: float = 0.0,
        next_metre: int = 0,
        uncertainty_m: float = 0.0,
    ) -> None:
        """Begin the reel: coordinate 0 is the cable at the counter now (L0).

        A restarted controller resumes with the reel coordinate now at the counter, the
        first metre it has not recorded (it has marked the ones it could not see), and
        the position uncertainty the checkpoint carried.
        """
        if sample.length_m is None or sample.charge_uc is None:
            raise ValueError("a reel can start only on GOOD length and charge readings")
        self._pos_m = position_m
        self._next_metre = next_metre
        self._uncertainty_m = uncertainty_m
        self._uncertain_from = next_metre
        self._last = sample

    # ------------------------------------------------------------------ update

    def update(self, sample: LedgerSample) -> list[MetreRecord]:
        """Account the interval since the previous sample; return metres that became final."""
        if self._pos_m is None or self._last is None:
            raise RuntimeError("update() before start()")
        prev = self._last
        dt_s = sample.t_s - prev.t_s
        if not dt_s > 0:  # `not >` so that a NaN time is skipped too
            return []  # same cycle twice, or a clock step: nothing to account
        # A value that is not a finite number is no value: a NaN scan width made a NaN
        # dose, and a NaN dose passed both limit checks as in spec (found by
        # tests/test_fuzz.py). Skipped like a missing one, so the next good pair
        # accounts the interval from good values only.
        missing = [
            name
            for name, v in (
                ("length", sample.length_m),
                ("beam charge", sample.charge_uc),
                ("scan width", sample.scan_width_cm),
            )
            if v is None or not math.isfinite(v) or (name == "scan width" and v <= 0)
        ]
        if missing:
            # Counters make a skipped sample harmless: the next good pair accounts the
            # whole interval exactly, and the gap check below marks it unproven if it
            # grew too long to bound where the dose went.
            self.events.append(IntervalEvent(sample.t_s, "missing", ", ".join(missing)))
            return []
        assert prev.length_m is not None
        assert prev.charge_uc is not None
        assert sample.length_m is not None
        d_len_m, len_ok = self._delta(
            prev.length_m,
            sample.length_m,
            self.length_modulus_m,
            self.limits.max_speed_m_min / 60.0 * dt_s * self.limits.margin + 0.01,
        )
        if not len_ok:
            # Length counter reset: how far the cable moved is unknown. Estimate it from
            # the measured speed and mark all that could have passed under a beam in the
            # worst case as unproven; metre numbering after it carries that estimate.
            self.events.append(
                IntervalEvent(sample.t_s, "length_reset", f"{prev.length_m} -> {sample.length_m} m")
            )
            worst_m = self.limits.max_speed_m_min / 60.0 * dt_s
            speeds = [
                s
                for s in (prev.speed_m_min, sample.speed_m_min)
                if s is not None and math.isfinite(s)
            ]
            estimate_m = (
                min(worst_m, max(0.0, sum(speeds) / len(speeds) / 60.0 * dt_s)) if speeds else 0.0
            )
            self._mark_unproven(self._pos_m, self._pos_m + worst_m)
            self._pos_m += estimate_m
            # The estimate may be off by up to this much, for the rest of the reel: a dose
            # dip (an arc) after it could otherwise land on the wrong metre and a short
            # metre be recorded in spec (found by the soak benchmark).
            if self._uncertainty_m == 0.0:
                self._uncertain_from = self._next_metre
            self._uncertainty_m += max(estimate_m, worst_m - estimate_m)
            self.events.append(
                IntervalEvent(
                    sample.t_s,
                    "position_uncertain",
                    f"reel position now uncertain by +/- {self._uncertainty_m:.2f} m",
                )
            )
            self._last = sample
            return self._finalise()
        a_m = self._pos_m
        b_m = a_m + d_len_m
        self._pos_m = b_m

        reason = None
        if dt_s > self.limits.max_interval_s:
            reason = IntervalEvent(sample.t_s, "gap", f"{dt_s:.3f} s without data")
        d_q_uc = 0.0
        if reason is None:
            assert sample.charge_uc is not None
            d_q_uc, q_ok = self._delta(
                prev.charge_uc,
                sample.charge_uc,
                self.charge_modulus_uc,
                self.limits.max_current_ma * 1000.0 * dt_s * self.limits.margin + 1.0,
            )
            if not q_ok:
                reason = IntervalEvent(
                    sample.t_s, "charge_reset", f"{prev.charge_uc} -> {sample.charge_uc} uC"
                )
        if reason is not None:
            self.events.append(reason)
            self._mark_unproven(a_m, b_m)
        else:
            assert sample.scan_width_cm is not None
            # Mean of the two scan-width readings: W changes slowly; this is its best value.
            w_cm = sample.scan_width_cm
            if (
                prev.scan_width_cm is not None
                and math.isfinite(prev.scan_width_cm)
                and prev.scan_width_cm > 0
            ):
                w_cm = 0.5 * (w_cm + prev.scan_width_cm)
            self._deposit(a_m, b_m, d_q_uc, w_cm, energy_ok=sample.energy_ok and prev.energy_ok)
            self.charge_total_uc += d_q_uc
        self._last = sample
        return self._finalise()

    def finish(self) -> list[MetreRecord]:
        """End the reel: every product metre not yet final is recorded as it stands, and
        the ones that did not leave the last pass are unproven (incomplete)."""
        if self._pos_m is None:
            return []
        end_m = self.planned_length_m
        if end_m is None:
            end_m = max(0.0, self._pos_m)
        return self._finish_below(math.floor(end_m + 1e-9))

    def end_here(self) -> list[MetreRecord]:
        """End the reel short, where the cable stands (the operator ends it): every metre
        that has reached the first pass, or may have within the position uncertainty, and
        is not final yet is recorded as it stands, unproven (incomplete). Cable that never
        reached the beam is not part of the reel. The line must be stopped."""
        if self._pos_m is None:
            return []
        reached_m = self._pos_m - self._offsets_m[0] + self._uncertainty_m
        end = math.ceil(reached_m - 1e-9)
        if self.planned_length_m is not None:
            # The reel's last metre as finish() counts it (a fractional end is no metre).
            end = min(end, math.floor(self.planned_length_m + 1e-9))
        return self._finish_below(max(0, end))

    def _finish_below(self, end: int) -> list[MetreRecord]:
        """Metres next_metre..end-1 final now, each incomplete."""
        out = [self._verdict(i, incomplete=True) for i in range(self._next_metre, end)]
        self._next_metre = max(self._next_metre, end)
        self._drop_below(self._next_metre - self._window_metres())
        return out

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _delta(old: float, new: float, modulus: float, bound: float) -> tuple[float, bool]:
        """Counter delta with wrap handling; False when it is a reset (implausible)."""
        d = (new - old) % modulus
        return d, d <= bound

    def _bin_range(self, lo_m: float, hi_m: float) -> range:
        r = self.resolution_m
        return range(math.floor(lo_m / r), math.floor(hi_m / r - 1e-12) + 1)

    def _deposit(
        self, a_m: float, b_m: float, d_q_uc: float, w_cm: float, *, energy_ok: bool
    ) -> None:
        if d_q_uc <= 0:
            return
        dl = self._bins.dose_len
        fl = self._bins.flags
        r = self.resolution_m
        base = self.recipe.k_dose * d_q_uc / (60000.0 * w_cm)  # kGy*m per unit weight
        length_m = b_m - a_m
        extra = 0 if energy_ok else ENERGY
        for off, w in zip(self._offsets_m, self._weights, strict=True):
            lo, hi = a_m - off, b_m - off
            total = w * base
            if length_m <= 1e-9:
                # Beam on a standing cable: a point dose, without bound. Burn.
                j = math.floor(lo / r)
                dl[j] = dl.get(j, 0.0) + total
                fl[j] = fl.get(j, 0) | STANDSTILL | extra
                continue
            density = total / length_m  # kGy: dose*length per metre of stretch
            for j in self._bin_range(lo, hi):
                o = min(hi, (j + 1) * r) - max(lo, j * r)
                if o > 0:
                    dl[j] = dl.get(j, 0.0) + density * o
                    if extra:
                        fl[j] = fl.get(j, 0) | extra

    def _mark_unproven(self, a_m: float, b_m: float) -> None:
        fl = self._bins.flags
        for off in self._offsets_m:
            for j in self._bin_range(a_m - off, max(b_m - off, a_m - off)):
                fl[j] = fl.get(j, 0) | UNPROVEN

    def _finalise(self) -> list[MetreRecord]:
        assert self._pos_m is not None
        # Metre i is final when its end (i + 1) has left the last pass.
        # With a position uncertainty, only once the window around it has left too.
        past_last_m = self._pos_m - self._offsets_m[-1] - self._uncertainty_m
        limit = math.floor(past_last_m + 1e-9)
        if self.planned_length_m is not None:
            limit = min(limit, math.floor(self.planned_length_m + 1e-9))
        out = []
        while self._next_metre < limit:
            out.append(self._verdict(self._next_metre, incomplete=False))
            self._next_metre += 1
        if out:
            self._drop_below(self._next_metre - self._window_metres())
        return out

    def _window_metres(self) -> int:
        return math.ceil(self._uncertainty_m) + 1 if self._uncertainty_m > 0 else 0

    def _verdict(self, i: int, *, incomplete: bool) -> MetreRecord:
        n = self._bins_per_m
        r = self.resolution_m
        doses = [self._bins.dose_len.get(i * n + j, 0.0) / r for j in range(n)]
        mean = sum(doses) / n  # the best estimate of this metre's dose
        # The verdict: every bin this metre may really be, within the position
        # uncertainty either side (none: its own bins).
        k = math.ceil(self._uncertainty_m / r) if i >= self._uncertain_from else 0
        window = range(i * n - k, (i + 1) * n + k)
        if k:
            doses = [self._bins.dose_len.get(j, 0.0) / r for j in window]
        flags = 0
        for j in window:
            flags |= self._bins.flags.get(j, 0)
        lo, hi = min(doses), max(doses)
        causes = []
        if incomplete:
            causes.append("incomplete")
        if flags & UNPROVEN:
            causes.append("unproven")
        if flags & STANDSTILL:
            causes.append("standstill")
        if hi > self.recipe.max_dose_kgy:
            causes.append("over_dose")
        if lo < self.recipe.min_dose_kgy:
            causes.append("under_dose")
        if flags & ENERGY:
            causes.append("energy")
        if incomplete or flags & UNPROVEN:
            verdict = Verdict.UNPROVEN
        elif flags & STANDSTILL or hi > self.recipe.max_dose_kgy:
            verdict = Verdict.OVER_DOSE
        elif lo < self.recipe.min_dose_kgy:
            verdict = Verdict.UNDER_DOSE
        elif flags & ENERGY:
            verdict = Verdict.ENERGY
        else:
            verdict = Verdict.IN_SPEC
        return MetreRecord(i, mean, lo, hi, verdict, tuple(causes))

    def _drop_below(self, metre: int) -> None:
        # Final metres are reported; their bins are no longer needed. The leader
        # (negative coordinates) is never product and is dropped with them.
        cut = metre * self._bins_per_m
        for d in (self._bins.dose_len, self._bins.flags):
            for j in [j for j in d if j < cut]:
                del d[j]
