"""Per-metre dose ledger, computed from the PLCs' totalizers (process.md, "From counters").

Over each interval between two samples the beam delivered charge dQ (uC) while cable
length dL passed the counter. Pass k then deposited

    dose * length = w_k * K * dQ / (60000 * W)          [kGy * m]

spread evenly over the stretch of cable that crossed pass k in that interval. Intervals
are short (one control cycle: a few centimetres of cable), so spreading evenly within one
costs nothing measurable, and nothing between two samples is lost.

The ledger keeps dose in sub-metre bins (`resolution_m`) so that a metre's verdict rests
on its worst part, not only on its mean. Each bin has a lower and an upper bound; they
are equal except after a data gap. A gap (an interval longer than `max_interval_s`) still
has exact counters at its two ends, so its charge is known but not where along the
stretch it landed: the lower bound gets none of it, the upper bound all of it in every
bin of the stretch. A gap without charge is therefore exact, and one with little charge
may still be shown in spec. A counter reset marks the cable under every pass during it
as unproven; unproven is never in spec. A metre is final when its end has left the last
pass.

`checkpoint()` and `DoseLedger.restore()` carry the whole state across a restart of the
controller; `resume_with()` continues it on a clock that did not survive the restart.

Pure: no I/O and no clock; the caller passes each sample with its time.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from linectl import dose
from linectl.config import Geometry, Recipe

# Flags per bin (bitmask): why the dose in a bin is not to be trusted or is bad.
UNPROVEN = 1  # dose could not be bounded (counter reset, length reset)
ENERGY = 2  # deposited while the beam energy was outside the recipe's tolerance
STANDSTILL = 4  # beam on while the cable stood still: dose without bound (burn)
_ALL_FLAGS = UNPROVEN | ENERGY | STANDSTILL

CHECKPOINT_VERSION = 1
"""Format version of `DoseLedger.checkpoint()`; `restore()` refuses any other."""


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
    recipe's tolerance (or unknown) while the beam is on. `charge_uncertainty_uc` is how
    far the true charge counter at `t_s` may be from `charge_uc` (the charge of the
    accelerator-sample span it was interpolated in; 0 for a direct reading). Only a gap's
    upper bound uses it.
    """

    t_s: float
    charge_uc: float | None
    length_m: float | None
    scan_width_cm: float | None
    energy_ok: bool = True
    speed_m_min: float | None = None  # measured; used only to estimate motion after a length reset
    charge_uncertainty_uc: float = 0.0


@dataclass(frozen=True, slots=True)
class MetreRecord:
    """A final metre: index i covers cable coordinates [i, i + 1) m from the reel start."""

    index: int
    dose_kgy: float  # mean over the metre (best estimate)
    min_dose_kgy: float  # lowest lower bound of a sub-metre bin
    max_dose_kgy: float  # highest upper bound of a sub-metre bin
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
    kind: str
    """"gap", "gap_bound_refuted", "charge_reset", "length_reset", "position_uncertain",
    "missing", "resume"."""
    detail: str


@dataclass
class LedgerLimits:
    """Plausibility bounds that tell a counter wrap from a reset, and a gap from a cycle."""

    max_interval_s: float = 0.5
    """An interval longer than this is a gap: where its charge landed along the cable is
    not known, only bounded (lower bound none of it, upper bound all of it in one bin)."""
    max_current_ma: float = 100.0
    """The accelerator's rating: no interval can deliver more charge than this allows."""
    max_speed_m_min: float = 300.0
    """The conveyor's limit: no interval can pass more cable than this allows."""
    margin: float = 1.5
    """Slack on the two bounds above (ripple, clock jitter)."""
    charge_resolution_uc: float = 1.0
    """One count of the charge register, uC: two readings that agree may still hide up to
    this much charge between them. A gap's upper bound adds it."""


@dataclass
class _Bins:
    """Sub-metre bins, keyed by bin index; doses as dose*length (kGy*m).

    lower bound = dose_len; best estimate = dose_len + gap_est;
    upper bound = dose_len + gap_upper. Only gaps write gap_est and gap_upper, so
    outside them the three are the same number.
    """

    dose_len: dict[int, float] = field(default_factory=dict)
    flags: dict[int, int] = field(default_factory=dict)
    gap_est: dict[int, float] = field(default_factory=dict)
    gap_upper: dict[int, float] = field(default_factory=dict)


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
        # A restored ledger's samples may come on another clock: it waits for resume_with().
        self._awaiting_resume = False
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

    @property
    def last_sample_t_s(self) -> float | None:
        """Time of the last sample accounted (None before start())."""
        return None if self._last is None else self._last.t_s

    @property
    def awaiting_resume(self) -> bool:
        """True for a restored ledger until `resume_with()` has taken its first sample."""
        return self._awaiting_resume

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
        if (
            sample.length_m is None
            or sample.charge_uc is None
            or not math.isfinite(sample.length_m)
            or not math.isfinite(sample.charge_uc)
            or not math.isfinite(sample.t_s)
        ):
            raise ValueError("a reel can start only on GOOD length and charge readings")
        self._pos_m = position_m
        self._next_metre = next_metre
        self._uncertainty_m = uncertainty_m
        self._uncertain_from = next_metre
        self._awaiting_resume = False
        self._last = sample

    # ------------------------------------------------------------------ update

    def update(self, sample: LedgerSample) -> list[MetreRecord]:
        """Account the interval since the previous sample; return metres that became final."""
        if self._pos_m is None or self._last is None:
            raise RuntimeError("update() before start()")
        if self._awaiting_resume:
            raise RuntimeError(
                "a restored ledger takes its first sample through resume_with(sample, "
                "elapsed_s=...): its samples' clock may not have survived the restart"
            )
        dt_s = sample.t_s - self._last.t_s
        if not dt_s > 0 or not math.isfinite(dt_s):  # `not >` so that a NaN time is skipped too
            return []  # same cycle twice, or a clock step: nothing to account
        return self._account(sample, dt_s)

    def resume_with(
        self,
        sample: LedgerSample,
        *,
        elapsed_s: float,
        charge_per_m_uc: float | None = None,
    ) -> list[MetreRecord]:
        """Continue on a clock that differs from the previous samples' (after `restore()`).

        `elapsed_s` is the time from the last sample the ledger has (the checkpoint's) to
        `sample`, taken from a clock that survived the restart (the PLC clock, or the wall
        clock). The interval is accounted exactly as `update()` would with that length: a
        gap if longer than `max_interval_s` (bounded, see the module doc), and the counters'
        plausibility bounds scale with it. If in doubt give an upper bound: a longer one
        only makes the interval a gap and widens the plausibility bounds, a shorter one
        could make real motion look like a length-counter reset whose worst case does
        not cover it. From then on `sample.t_s` is the time base.

        `charge_per_m_uc`, when the caller can show it (linectl.core.held_gap), bounds
        the charge any metre of cable took from one pass during the interval, if it is a
        gap: each bin's upper bound is then its share at that density instead of the
        whole charge. A gap whose charge is more than its length can hold at that density
        refutes the bound, and is bounded as any gap (an event says so).
        Raises ValueError for an elapsed time that is not a positive number or a sample
        that lacks a GOOD length, charge or scan width.
        """
        if self._pos_m is None or self._last is None:
            raise RuntimeError("resume_with() before start() or restore()")
        if not (math.isfinite(elapsed_s) and elapsed_s > 0):
            raise ValueError(f"elapsed_s must be a positive number of seconds, not {elapsed_s!r}")
        missing = self._missing(sample)
        if missing or not math.isfinite(sample.t_s):
            raise ValueError(
                "resume_with() needs a complete sample; missing: " + ", ".join(missing or ["time"])
            )
        self.events.append(
            IntervalEvent(
                sample.t_s, "resume", f"{elapsed_s:.3f} s since the last sample (new time base)"
            )
        )
        self._awaiting_resume = False
        return self._account(sample, elapsed_s, charge_per_m_uc=charge_per_m_uc)

    @staticmethod
    def _missing(sample: LedgerSample) -> list[str]:
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
        u = sample.charge_uncertainty_uc
        if not (math.isfinite(u) and u >= 0):
            missing.append("charge uncertainty")
        return missing

    def _account(
        self, sample: LedgerSample, dt_s: float, *, charge_per_m_uc: float | None = None
    ) -> list[MetreRecord]:
        assert self._pos_m is not None
        assert self._last is not None
        prev = self._last
        missing = self._missing(sample)
        if missing:
            # Counters make a skipped sample harmless: the next good pair accounts the
            # whole interval exactly, and it becomes a gap if it grew too long.
            self.events.append(IntervalEvent(sample.t_s, "missing", ", ".join(missing)))
            return []
        assert prev.length_m is not None
        assert prev.charge_uc is not None
        assert sample.length_m is not None
        assert sample.charge_uc is not None
        assert sample.scan_width_cm is not None
        d_len_m, len_ok = self._delta(
            prev.length_m,
            sample.length_m,
            self.length_modulus_m,
            self.limits.max_speed_m_min / 60.0 * dt_s * self.limits.margin + 0.01,
        )
        if not len_ok:
            self._length_reset(prev, sample, dt_s)
            self._last = sample
            return self._finalise()
        a_m = self._pos_m
        b_m = a_m + d_len_m
        self._pos_m = b_m

        gap = dt_s > self.limits.max_interval_s
        d_q_uc, q_ok = self._delta(
            prev.charge_uc,
            sample.charge_uc,
            self.charge_modulus_uc,
            self.limits.max_current_ma * 1000.0 * dt_s * self.limits.margin + 1.0,
        )
        # Mean of the two scan-width readings: W changes slowly; this is its best value.
        w_cm = sample.scan_width_cm
        w_min_cm = w_cm
        if (
            prev.scan_width_cm is not None
            and math.isfinite(prev.scan_width_cm)
            and prev.scan_width_cm > 0
        ):
            w_cm = 0.5 * (w_cm + prev.scan_width_cm)
            w_min_cm = min(w_min_cm, prev.scan_width_cm)
        energy_ok = sample.energy_ok and prev.energy_ok
        if not q_ok:
            # A charge counter reset: how much charge came is unknown (also inside a gap).
            if gap:
                self.events.append(IntervalEvent(sample.t_s, "gap", f"{dt_s:.3f} s without data"))
            self.events.append(
                IntervalEvent(
                    sample.t_s, "charge_reset", f"{prev.charge_uc} -> {sample.charge_uc} uC"
                )
            )
            self._mark_unproven(a_m, b_m)
        elif gap:
            # The counters bound the charge; where along the stretch it landed is unknown.
            q_hi_uc = (
                d_q_uc
                + self.limits.charge_resolution_uc
                + prev.charge_uncertainty_uc
                + sample.charge_uncertainty_uc
            )
            if charge_per_m_uc is not None and q_hi_uc > charge_per_m_uc * (b_m - a_m) + (
                self.limits.charge_resolution_uc
            ):
                self.events.append(
                    IntervalEvent(
                        sample.t_s,
                        "gap_bound_refuted",
                        f"{d_q_uc:.0f} uC on {b_m - a_m:.3f} m is more than "
                        f"{charge_per_m_uc:.0f} uC/m: the held-gap bound is not used",
                    )
                )
                charge_per_m_uc = None
            if d_q_uc == 0:
                how = "no charge: exact"
            elif charge_per_m_uc is None:
                how = f"{d_q_uc:.0f} uC: bounded per bin (none to all of it)"
            else:
                how = f"{d_q_uc:.0f} uC: bounded per bin at {charge_per_m_uc:.0f} uC/m"
            self.events.append(
                IntervalEvent(
                    sample.t_s,
                    "gap",
                    f"{dt_s:.3f} s without data, {b_m - a_m:.3f} m of cable, {how}",
                )
            )
            self._deposit_gap(
                a_m,
                b_m,
                d_q_uc=d_q_uc,
                q_hi_uc=q_hi_uc,
                w_cm=w_cm,
                w_min_cm=w_min_cm,
                energy_ok=energy_ok,
                charge_per_m_uc=charge_per_m_uc,
            )
            self.charge_total_uc += d_q_uc
        else:
            self._deposit(a_m, b_m, d_q_uc, w_cm, energy_ok=energy_ok)
            self.charge_total_uc += d_q_uc
        self._last = sample
        return self._finalise()

    def _length_reset(self, prev: LedgerSample, sample: LedgerSample, dt_s: float) -> None:
        # Length counter reset: how far the cable moved is unknown. Estimate it from the
        # measured speed and mark all that could have passed under a beam in the worst
        # case as unproven; metre numbering after it carries that estimate.
        assert self._pos_m is not None
        self.events.append(
            IntervalEvent(sample.t_s, "length_reset", f"{prev.length_m} -> {sample.length_m} m")
        )
        worst_m = self.limits.max_speed_m_min / 60.0 * dt_s
        speeds = [
            s for s in (prev.speed_m_min, sample.speed_m_min) if s is not None and math.isfinite(s)
        ]
        estimate_m = (
            min(worst_m, max(0.0, sum(speeds) / len(speeds) / 60.0 * dt_s)) if speeds else 0.0
        )
        self._mark_unproven(self._pos_m, self._pos_m + worst_m)
        self._pos_m += estimate_m
        # The estimate may be off by up to this much, for the rest of the reel: a dose dip
        # (an arc) after it could otherwise land on the wrong metre and a short metre be
        # recorded in spec (found by the soak benchmark).
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

    # ------------------------------------------------------------------ checkpoint

    def checkpoint(self) -> dict[str, Any]:
        """All the state needed to continue this reel exactly, as a JSON-serialisable dict
        (str, int, float, bool, None, list, dict; every number finite).

        Bins of final metres are dropped as the reel goes, so the bins cover the beam
        zone (next_metre to the cable at pass 0; before the first metre is final, the
        leader downstream of the counter too). Raises RuntimeError before
        start(), and ValueError if the state holds a number that is not finite (a dose
        made infinite by an absurd scan width reading).
        """
        if self._pos_m is None or self._last is None:
            raise RuntimeError("checkpoint() before start()")
        b = self._bins
        # Every bin the ledger holds: a later verdict may read any of them (before the
        # first metre is final, a position uncertainty that grows lets metre 0 read the
        # leader's bins). Doses densely from the lowest bin that has one (None: no dose
        # entry), the rest sparsely as [bin, value] pairs: flags and gap bounds are rare.
        first = min(b.dose_len, default=0)
        last = max(b.dose_len, default=-1)
        dense: list[float | None] = [None] * (last - first + 1)
        for j, v in b.dose_len.items():
            dense[j - first] = v
        s = self._last
        speed = s.speed_m_min
        state: dict[str, Any] = {
            "version": CHECKPOINT_VERSION,
            "resolution_m": self.resolution_m,
            "recipe": {"product": self.recipe.product, "version": self.recipe.version},
            "geometry": {"offsets_m": list(self._offsets_m), "weights": list(self._weights)},
            "charge_modulus_uc": self.charge_modulus_uc,
            "length_modulus_m": self.length_modulus_m,
            "position_m": self._pos_m,
            "next_metre": self._next_metre,
            "uncertainty_m": self._uncertainty_m,
            "uncertain_from": self._uncertain_from,
            "charge_total_uc": self.charge_total_uc,
            "last": {
                "t_s": s.t_s,
                "charge_uc": s.charge_uc,
                "length_m": s.length_m,
                "scan_width_cm": s.scan_width_cm,
                "energy_ok": s.energy_ok,
                # The ledger uses a speed only if it is a finite number: None is the same.
                "speed_m_min": speed if speed is not None and math.isfinite(speed) else None,
                "charge_uncertainty_uc": s.charge_uncertainty_uc,
            },
            "bins": {
                "first": first,
                "dose_len": dense,
                "flags": sorted([j, f] for j, f in b.flags.items()),
                "gap_est": sorted([j, v] for j, v in b.gap_est.items()),
                "gap_upper": sorted([j, v] for j, v in b.gap_upper.items()),
            },
        }
        _check_finite(state, "checkpoint")
        return state

    @classmethod
    def restore(
        cls,
        geometry: Geometry,
        recipe: Recipe,
        state: Mapping[str, Any],
        *,
        charge_modulus_uc: float,
        length_modulus_m: float,
        planned_length_m: float | None = None,
        resolution_m: float = 0.1,
        limits: LedgerLimits | None = None,
    ) -> DoseLedger:
        """A ledger continuing from `checkpoint()`'s state (after a JSON round trip).

        The arguments are those of the constructor; the state must have been taken with
        the same resolution, geometry, recipe (product and version) and counter moduli.
        ValueError names what is wrong: a version other than CHECKPOINT_VERSION, a missing
        or unknown key, a value of the wrong type or not finite, or a mismatch. The
        restored ledger takes its first sample through `resume_with()`.
        """
        ledger = cls(
            geometry,
            recipe,
            charge_modulus_uc=charge_modulus_uc,
            length_modulus_m=length_modulus_m,
            planned_length_m=planned_length_m,
            resolution_m=resolution_m,
            limits=limits,
        )
        st = _State(state, "checkpoint")
        version = st.int_("version")
        if version != CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint format version {version} is not {CHECKPOINT_VERSION}, "
                "the one this ledger reads"
            )
        st.keys(
            "version",
            "resolution_m",
            "recipe",
            "geometry",
            "charge_modulus_uc",
            "length_modulus_m",
            "position_m",
            "next_metre",
            "uncertainty_m",
            "uncertain_from",
            "charge_total_uc",
            "last",
            "bins",
        )
        res = st.num("resolution_m")
        if abs(res - resolution_m) > 1e-12:
            raise ValueError(
                f"checkpoint resolution_m {res} differs from this ledger's {resolution_m}"
            )
        rec = st.sub("recipe")
        rec.keys("product", "version")
        if (rec.str_("product"), rec.str_("version")) != (recipe.product, recipe.version):
            raise ValueError(
                f"checkpoint recipe {rec.str_('product')!r} version {rec.str_('version')!r} "
                f"is not {recipe.product!r} version {recipe.version!r}"
            )
        geo = st.sub("geometry")
        geo.keys("offsets_m", "weights")
        offsets, weights = geo.nums("offsets_m"), geo.nums("weights")
        if offsets != ledger._offsets_m or weights != ledger._weights:
            raise ValueError(
                f"checkpoint geometry (pass offsets {offsets}, weights {weights}) differs "
                f"from this line's (offsets {ledger._offsets_m}, weights {ledger._weights})"
            )
        for name, mine in (
            ("charge_modulus_uc", charge_modulus_uc),
            ("length_modulus_m", length_modulus_m),
        ):
            if st.num(name) != mine:
                raise ValueError(f"checkpoint {name} {st.num(name)} differs from {mine}")
        uncertainty = st.num("uncertainty_m")
        if uncertainty < 0:
            raise ValueError(f"checkpoint uncertainty_m {uncertainty} is negative")
        last = st.sub("last")
        last.keys(
            "t_s",
            "charge_uc",
            "length_m",
            "scan_width_cm",
            "energy_ok",
            "speed_m_min",
            "charge_uncertainty_uc",
        )
        width = last.num_or_none("scan_width_cm")
        if width is not None and width <= 0:
            raise ValueError(f"checkpoint last.scan_width_cm {width} is not positive")
        unc = last.num("charge_uncertainty_uc")
        if unc < 0:
            raise ValueError(f"checkpoint last.charge_uncertainty_uc {unc} is negative")
        sample = LedgerSample(
            t_s=last.num("t_s"),
            charge_uc=last.num("charge_uc"),
            length_m=last.num("length_m"),
            scan_width_cm=width,
            energy_ok=last.bool_("energy_ok"),
            speed_m_min=last.num_or_none("speed_m_min"),
            charge_uncertainty_uc=unc,
        )
        bins = st.sub("bins")
        bins.keys("first", "dose_len", "flags", "gap_est", "gap_upper")
        first = bins.int_("first")
        dose_len: dict[int, float] = {}
        for i, v in enumerate(bins.list_("dose_len")):
            if v is not None:
                dose_len[first + i] = _dose(v, f"checkpoint bins.dose_len[{i}]")
        flags: dict[int, int] = {}
        for j, f in bins.pairs("flags", integer=True):
            if not 0 <= f <= _ALL_FLAGS:
                raise ValueError(
                    f"checkpoint bins.flags: bin {j} has flags {f:g}, not in 0..{_ALL_FLAGS}"
                )
            flags[j] = int(f)
        ledger._bins = _Bins(
            dose_len=dose_len,
            flags=flags,
            gap_est=dict(bins.pairs("gap_est")),
            gap_upper=dict(bins.pairs("gap_upper")),
        )
        ledger._pos_m = st.num("position_m")
        ledger._next_metre = st.int_("next_metre")
        ledger._uncertainty_m = uncertainty
        ledger._uncertain_from = st.int_("uncertain_from")
        ledger.charge_total_uc = st.num("charge_total_uc")
        ledger._last = sample
        ledger._awaiting_resume = True
        return ledger

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
        base = dose.dose_length_kgy_m(self.recipe.k_dose, d_q_uc, w_cm)  # per unit weight
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

    def _deposit_gap(
        self,
        a_m: float,
        b_m: float,
        *,
        d_q_uc: float,
        q_hi_uc: float,
        w_cm: float,
        w_min_cm: float,
        energy_ok: bool,
        charge_per_m_uc: float | None = None,
    ) -> None:
        """A gap: the counters give its charge (d_q_uc, at most q_hi_uc with the counts a
        reading may hide), not how it was spread over the stretch under each pass.

        Lower bound: none of it (dose_len untouched). Upper bound: for every bin of the
        stretch under pass k, all of pass k's charge in that one bin (the worst case),
        or, with `charge_per_m_uc`, what the bin's length of the stretch can hold at that
        density (never more than all of it); with the narrower of the two scan-width
        readings. Best estimate: spread evenly,
        as an ordinary interval. With the cable standing, charge is a standstill as in
        any interval; no charge on a standing cable is nothing (but the hidden counts).
        """
        if b_m - a_m <= 1e-9:
            if d_q_uc > 0:
                self._deposit(a_m, b_m, d_q_uc, w_cm, energy_ok=energy_ok)
                return
            self._add_upper_at_point(a_m, q_hi_uc, w_min_cm)
            return
        ge = self._bins.gap_est
        gu = self._bins.gap_upper
        fl = self._bins.flags
        r = self.resolution_m
        k_dose = self.recipe.k_dose
        length_m = b_m - a_m
        flag = ENERGY if (not energy_ok and d_q_uc > 0) else 0
        for off, w in zip(self._offsets_m, self._weights, strict=True):
            lo, hi = a_m - off, b_m - off
            est_density = w * dose.dose_length_kgy_m(k_dose, d_q_uc, w_cm) / length_m
            worst = w * dose.dose_length_kgy_m(k_dose, q_hi_uc, w_min_cm)  # all in one bin
            for j in self._bin_range(lo, hi):
                o = min(hi, (j + 1) * r) - max(lo, j * r)
                if charge_per_m_uc is None:
                    gu[j] = gu.get(j, 0.0) + worst
                else:
                    q_bin = charge_per_m_uc * max(o, 0.0) + self.limits.charge_resolution_uc
                    gu[j] = gu.get(j, 0.0) + w * dose.dose_length_kgy_m(
                        k_dose, min(q_hi_uc, q_bin), w_min_cm
                    )
                if d_q_uc > 0 and o > 0:
                    ge[j] = ge.get(j, 0.0) + est_density * o
                if flag:
                    fl[j] = fl.get(j, 0) | flag

    def _add_upper_at_point(self, a_m: float, q_hi_uc: float, w_min_cm: float) -> None:
        gu = self._bins.gap_upper
        r = self.resolution_m
        for off, w in zip(self._offsets_m, self._weights, strict=True):
            j = math.floor((a_m - off) / r)
            gu[j] = gu.get(j, 0.0) + w * dose.dose_length_kgy_m(
                self.recipe.k_dose, q_hi_uc, w_min_cm
            )

    def _mark_unproven(self, a_m: float, b_m: float) -> None:
        fl = self._bins.flags
        for off in self._offsets_m:
            for j in self._bin_range(a_m - off, max(b_m - off, a_m - off)):
                fl[j] = fl.get(j, 0) | UNPROVEN

    def _finalise(self) -> list[MetreRecord]:
        assert self._pos_m is not None
        # Metre i is final when its end (i + 1) has left the last pass.
        # With a position uncertainty, only once the window around it has left too: the
        # window in whole bins, as the verdict reads it (uncertainty 1.73 m reads 1.8 m;
        # the 7 cm beyond were still under the beam, found by test_availability).
        window_m = self._window_bins() * self.resolution_m
        past_last_m = self._pos_m - self._offsets_m[-1] - window_m
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

    def _window_bins(self) -> int:
        """Bins either side of a metre its verdict reads: the position uncertainty."""
        return math.ceil(self._uncertainty_m / self.resolution_m - 1e-9)

    def _window_metres(self) -> int:
        return math.ceil(self._uncertainty_m) + 1 if self._uncertainty_m > 0 else 0

    def _bounds(self, j: int) -> tuple[float, float]:
        """Lower and upper bound of bin j's dose, kGy (equal unless a gap touched it)."""
        r = self.resolution_m
        d = self._bins.dose_len.get(j, 0.0)
        u = self._bins.gap_upper.get(j)
        return d / r, (d / r if u is None else (d + u) / r)

    def _verdict(self, i: int, *, incomplete: bool) -> MetreRecord:
        n = self._bins_per_m
        r = self.resolution_m
        own = range(i * n, (i + 1) * n)
        b = self._bins
        # The best estimate of this metre's dose: a gap's charge spread evenly.
        est = [(b.dose_len.get(j, 0.0) + b.gap_est.get(j, 0.0)) / r for j in own]
        mean = sum(est) / n
        # The verdict: every bin this metre may really be, within the position
        # uncertainty either side (none: its own bins).
        k = self._window_bins() if i >= self._uncertain_from else 0
        window = range(i * n - k, (i + 1) * n + k)
        bounds = [self._bounds(j) for j in window]
        flags = 0
        for j in window:
            flags |= b.flags.get(j, 0)
        lo = min(x for x, _ in bounds)
        hi = max(y for _, y in bounds)
        d_min, d_max = self.recipe.min_dose_kgy, self.recipe.max_dose_kgy
        # Shown out of spec: a bin whose upper bound is below the minimum, or whose lower
        # bound is above the maximum. Not shown either way: a bin whose bounds straddle a
        # limit (only a gap makes the two differ). Both comparisons stay strict.
        under = any(y < d_min for _, y in bounds)
        over = any(x > d_max for x, _ in bounds)
        straddle = any(x < d_min <= y or x <= d_max < y for x, y in bounds)
        causes = []
        if incomplete:
            causes.append("incomplete")
        if flags & UNPROVEN or straddle:
            causes.append("unproven")
        # "gap" on every metre a gap touched, in spec or not: a quality engineer sees
        # which doses are estimates shown within bounds rather than measured.
        if any(j in b.gap_upper for j in window):
            causes.append("gap")
        if flags & STANDSTILL:
            causes.append("standstill")
        if over:
            causes.append("over_dose")
        if under:
            causes.append("under_dose")
        if flags & ENERGY:
            causes.append("energy")
        # A gap's bounds are sound: a bin shown out of spec is a fact whatever another bin
        # of the metre may be, so unproven-by-gap ranks below a shown over- or under-dose.
        if incomplete or flags & UNPROVEN:
            verdict = Verdict.UNPROVEN
        elif flags & STANDSTILL or over:
            verdict = Verdict.OVER_DOSE
        elif under:
            verdict = Verdict.UNDER_DOSE
        elif straddle:
            verdict = Verdict.UNPROVEN
        elif flags & ENERGY:
            verdict = Verdict.ENERGY
        else:
            verdict = Verdict.IN_SPEC
        return MetreRecord(i, mean, lo, hi, verdict, tuple(causes))

    def _drop_below(self, metre: int) -> None:
        # Final metres are reported; their bins are no longer needed. The leader
        # (negative coordinates) is never product and is dropped with them.
        cut = metre * self._bins_per_m
        b = self._bins
        for d in (b.dose_len, b.flags, b.gap_est, b.gap_upper):
            for j in [j for j in d if j < cut]:
                del d[j]


# ---------------------------------------------------------------------- checkpoint helpers


def _number(v: Any, where: str) -> float:
    """A finite int or float (not a bool) as a float; ValueError naming where it was."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{where} is not a number: {v!r}")
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(f"{where} is not a finite number: {v!r}")
    return x


def _dose(v: Any, where: str) -> float:
    """A dose*length: finite and not negative (a negative one would lower a bound)."""
    x = _number(v, where)
    if x < 0:
        raise ValueError(f"{where} is a negative dose: {v!r}")
    return x


def _check_finite(v: Any, where: str) -> None:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{where} is not a finite number: {v!r}")
    if isinstance(v, dict):
        for k, x in v.items():
            _check_finite(x, f"{where}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_finite(x, f"{where}[{i}]")


class _State:
    """Typed, named access to one level of a checkpoint; ValueError names the field."""

    def __init__(self, d: Any, where: str) -> None:
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} is not a mapping: {type(d).__name__}")
        self.d = d
        self.where = where

    def keys(self, *names: str) -> None:
        missing = [n for n in names if n not in self.d]
        if missing:
            raise ValueError(f"{self.where} lacks {', '.join(missing)}")
        unknown = sorted(str(k) for k in self.d if k not in names)
        if unknown:
            raise ValueError(f"{self.where} has unknown keys {', '.join(unknown)}")

    def _get(self, name: str) -> Any:
        if name not in self.d:
            raise ValueError(f"{self.where} lacks {name}")
        return self.d[name]

    def num(self, name: str) -> float:
        return _number(self._get(name), f"{self.where}.{name}")

    def num_or_none(self, name: str) -> float | None:
        v = self._get(name)
        return None if v is None else _number(v, f"{self.where}.{name}")

    def int_(self, name: str) -> int:
        v = self._get(name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{self.where}.{name} is not an integer: {v!r}")
        return v

    def bool_(self, name: str) -> bool:
        v = self._get(name)
        if not isinstance(v, bool):
            raise ValueError(f"{self.where}.{name} is not true or false: {v!r}")
        return v

    def str_(self, name: str) -> str:
        v = self._get(name)
        if not isinstance(v, str):
            raise ValueError(f"{self.where}.{name} is not a string: {v!r}")
        return v

    def list_(self, name: str) -> list[Any]:
        v = self._get(name)
        if not isinstance(v, list):
            raise ValueError(f"{self.where}.{name} is not a list: {type(v).__name__}")
        return v

    def nums(self, name: str) -> list[float]:
        return [_number(x, f"{self.where}.{name}[{i}]") for i, x in enumerate(self.list_(name))]

    def sub(self, name: str) -> _State:
        return _State(self._get(name), f"{self.where}.{name}")

    def pairs(self, name: str, *, integer: bool = False) -> list[tuple[int, float]]:
        """[[bin, value], ...] with integer bins and doses (integers if asked)."""
        out = []
        for i, p in enumerate(self.list_(name)):
            where = f"{self.where}.{name}[{i}]"
            if not (isinstance(p, list) and len(p) == 2):
                raise ValueError(f"{where} is not a [bin, value] pair: {p!r}")
            j, v = p
            if isinstance(j, bool) or not isinstance(j, int):
                raise ValueError(f"{where}: bin {j!r} is not an integer")
            if integer and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{where}: {v!r} is not an integer")
            out.append((j, _number(v, where) if integer else _dose(v, where)))
        return out
