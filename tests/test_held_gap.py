"""A crash's gap bounded by what the PLCs held (linectl.core.held_gap): when the bound
may be used, what it is, and that the ledger's bounds under it hold the true dose of
every bin however the beam and the line behaved within what the bound assumes."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ledger import GEOM, L_MOD, Q_MOD, RECIPE, new_ledger, run

from linectl.core.held_gap import Held, HeldBound, LinkTiming, held_gap_bound
from linectl.core.ledger import LedgerSample, MetreRecord, Verdict

ACC_BITS = {
    "command": {"HV_ON": 0, "BEAM_ON": 1, "FAULT_RESET": 2},
    "status": {"BEAM_ON": 2},
}
CNV_BITS = {
    "command": {"RUN": 0, "FAULT_RESET": 1},
    "status": {"CABLE_BREAK": 4, "ESTOP": 8},
}
TIMING = LinkTiming(cycle_s=0.05, cnv_stale_after_s=0.25, cnv_timeout_s=0.1, stall_credit_s=0.25)
HELD = Held(steady_s=30.0, speed_sp_m_min=80.0, current_sp_ma=40.0, current_ma=39.9)


def found(**over: float | int | None) -> tuple[dict[str, float | int | None], ...]:
    """The two PLCs as a restarted linectl finds them after a crash at 80 m/min, 40 mA:
    both watchdogs tripped, set-points as last written."""
    acc: dict[str, float | int | None] = {
        "command": 0b011,
        "beam_current_sp": 40.0,
        "watchdog_timeout": 500,
        "fault_code": 7,
        "status": 0,
    }
    cnv: dict[str, float | int | None] = {
        "command": 0b01,
        "speed_sp": 80.0,
        "watchdog_timeout": 500,
        "ramp_rate": 30.0,
        "fault_code": 5,
        "status": 0,
    }
    for k, v in over.items():
        plc, name = k.split("__")
        (acc if plc == "acc" else cnv)[name] = v
    return acc, cnv


def bound(
    held: Held | None = HELD, over: dict[str, float | int | None] | None = None
) -> HeldBound | str:
    acc, cnv = found(**(over or {}))
    return held_gap_bound(
        held,
        0.2,
        acc,
        cnv,
        acc_bits=ACC_BITS,
        cnv_bits=CNV_BITS,
        current_max_ma=40.0,
        timing=TIMING,
    )


def test_a_crash_at_speed_gets_the_bound_from_what_the_plcs_held() -> None:
    b = bound()
    assert isinstance(b, HeldBound)
    # The current: the recipe's 40 mA (what dose-follow may have set), 1 % ripple.
    assert b.i_hi_ma == pytest.approx(40.4)
    # The speed: 0.5 m/min AT_SPEED band, and 30 m/min/s for the conveyor link's skew
    # (0.25 s stale + up to 0.25 s of linectl's own stall left out of the data's age
    # + 0.1 s timeout + two 50 ms cycles + 50 ms PLC scan = 0.75 s).
    assert b.v_low_m_min == pytest.approx(80.0 - 0.5 - 30.0 * 0.75)
    assert b.charge_per_m_uc == pytest.approx(40.4 * 60000.0 / b.v_low_m_min)


@pytest.mark.parametrize(
    ("held", "over", "why"),
    [
        (None, {}, "not running steadily"),
        (Held(0.1, 80.0, 40.0, 40.0), {}, "had run steadily 0.10 s"),
        (HELD, {"cnv__speed_sp": 60.0}, "holds speed_sp 60.0"),
        (HELD, {"cnv__command": 0}, "RUN is not set"),
        (HELD, {"cnv__fault_code": 1}, "conveyor fault code 1"),
        (HELD, {"cnv__fault_code": 4}, "conveyor fault code 4"),
        (HELD, {"acc__fault_code": 2}, "accelerator fault code 2"),
        (HELD, {"cnv__status": 1 << 8}, "ESTOP"),
        (HELD, {"cnv__status": 1 << 4}, "CABLE_BREAK"),
        (HELD, {"cnv__watchdog_timeout": 400}, "watchdog timeouts"),
        (HELD, {"acc__watchdog_timeout": 0}, "watchdog timeouts"),
        (HELD, {"cnv__ramp_rate": None}, "ramp_rate"),
        (HELD, {"acc__beam_current_sp": None}, "beam_current_sp unread"),
        (Held(30.0, 10.0, 5.0, 5.0), {"cnv__speed_sp": 10.0}, "may slow to a stop"),
    ],
)
def test_anything_the_bound_cannot_rest_on_refuses_it_and_says_why(
    held: Held | None, over: dict[str, float | int | None], why: str
) -> None:
    b = bound(held, over)
    assert isinstance(b, str)
    assert why in b


def test_no_first_reading_no_bound() -> None:
    b = held_gap_bound(
        HELD,
        0.2,
        None,
        None,
        acc_bits=ACC_BITS,
        cnv_bits=CNV_BITS,
        current_max_ma=40.0,
        timing=TIMING,
    )
    assert b == "no first reading of both PLCs"


def test_a_checkpoint_record_that_is_not_whole_is_no_held_state() -> None:
    assert Held.from_json(HELD.to_json()) == HELD
    assert Held.from_json(None) is None
    assert Held.from_json({"steady_s": 1.0}) is None
    assert Held.from_json({**HELD.to_json(), "current_ma": "nan"}) is None


# ---------------------------------------------------------------------- the ledger


def crash(
    rng: random.Random, *, rho: float | None, beam_off_s: float | None = None
) -> tuple[dict[int, float], list[MetreRecord], list[str]]:
    """80 m/min at 40 mA, sampled every 50 ms; then a crash: no sample for 3-9 s while the
    line runs on at speed, the beam (at up to 40.4 mA, tripping at random) goes off at a
    random moment, and the line ramps down at 30 m/min/s to a stop some time after (never
    slower than v_low while the beam is on, which is what the bound assumes); then 80
    m/min at 40 mA again. The ledger resumes across the gap with `rho`. Returns the true
    dose (kGy) of every 0.1 m bin the gap's stretch touched, from 1 ms steps inside the
    gap and the exact 7.5 kGy per pass outside it."""
    h, r = 0.001, 0.1
    k, w = RECIPE.k_dose, 100.0
    offsets = [GEOM.offset_m(i) for i in range(GEOM.passes)]
    ledger = new_ledger()
    ledger.start(LedgerSample(0.0, 0.0, 0.0, w))
    recs, q, pos, t = run(ledger, current_ma=40.0, speed_m_min=80.0, seconds=100.0)
    a_m = pos
    in_gap: dict[int, float] = {}  # dose*length per bin, from the gap
    beam_off_s = rng.uniform(0.0, 1.5) if beam_off_s is None else beam_off_s
    ramp_from_s = beam_off_s + rng.uniform(0.0, 1.0)
    gap_s = ramp_from_s + 80.0 / 30.0 + rng.uniform(0.0, 4.0)
    v, s = 80.0, 0.0
    while s < gap_s:
        if s >= ramp_from_s:
            v = max(0.0, v - 30.0 * h)
        i_ma = rng.uniform(38.0, 40.4) if s < beam_off_s and rng.random() > 0.1 else 0.0
        dq, dl = i_ma * 1000.0 * h, v / 60.0 * h
        if dl > 0:
            e = k * dq / (60000.0 * w)
            for off in offsets:
                lo, hi = pos - off, pos + dl - off
                for j in range(math.floor(lo / r), math.floor(hi / r) + 1):
                    o = min(hi, (j + 1) * r) - max(lo, j * r)
                    if o > 0:
                        in_gap[j] = in_gap.get(j, 0.0) + e * o / dl
        else:
            assert dq == 0  # what the bound assumes: no beam on a standing cable
        pos += dl
        q += dq
        s += h
    b_m = pos
    t += gap_s
    recs += ledger.resume_with(LedgerSample(t, q, pos, w), elapsed_s=gap_s, charge_per_m_uc=rho)
    more, *_ = run(ledger, current_ma=40.0, speed_m_min=80.0, seconds=100.0, q0=q, l0=pos, t0=t)
    truth: dict[int, float] = {}
    for j, gap_dose_len in in_gap.items():
        outside = 0.0  # bin length that crossed each pass before or after the gap
        for off in offsets:
            lo, hi = j * r + off, (j + 1) * r + off  # the bin in counter coordinates
            outside += (hi - lo) - max(0.0, min(hi, b_m) - max(lo, a_m))
        truth[j] = (7.5 * outside + gap_dose_len) / r
    return truth, recs + more, [e.kind for e in ledger.events]


RHO = 40.4 * 60000.0 / (80.0 - 0.5 - 30.0 * 0.5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_held_gap_bounds_hold_the_truth_and_never_accept_a_bad_metre(seed: int) -> None:
    truth, recs, kinds = crash(random.Random(seed), rho=RHO)
    assert "gap_bound_refuted" not in kinds
    gap = [r for r in recs if "gap" in r.causes]
    assert gap
    for r in gap:
        doses = [truth.get(j, 120.0) for j in range(r.index * 10, r.index * 10 + 10)]
        assert r.min_dose_kgy <= min(doses) + 1e-6, (r, doses)
        assert max(doses) <= r.max_dose_kgy + 1e-6, (r, doses)
        if r.verdict is Verdict.IN_SPEC:
            assert RECIPE.min_dose_kgy <= min(doses)
            assert max(doses) <= RECIPE.max_dose_kgy
    # Each metre misses one pass at most (3.4 m of cable, passes 6 m apart): shown in
    # spec, where the counters alone leave them unproven.
    assert all(r.verdict is Verdict.IN_SPEC for r in gap), [(r.index, r.verdict) for r in gap]


def test_the_same_crash_on_the_counters_alone_is_unproven() -> None:
    """48 mC on 3.4 m, "none to all of it" per bin: the bound crosses 140 kGy."""
    _truth, recs, _ = crash(random.Random(1), rho=None, beam_off_s=1.2)
    gap = [r for r in recs if "gap" in r.causes]
    assert any(r.verdict is Verdict.UNPROVEN for r in gap)


def test_charge_beyond_what_the_length_can_hold_refutes_the_bound() -> None:
    """48 mC while only 0.5 m of cable moved: more than 0.5 m can hold at the bound's
    density, so the beam was on a slow cable and the bound is wrong. The ledger says so
    and bounds the gap by the counters alone."""
    ledger = new_ledger()
    ledger.start(LedgerSample(0.0, 0.0, 0.0, 100.0))
    _recs, q, pos, t = run(ledger, current_ma=40.0, speed_m_min=80.0, seconds=100.0)
    ledger.resume_with(
        LedgerSample(t + 6.0, (q + 48_000.0) % Q_MOD, (pos + 0.5) % L_MOD, 100.0),
        elapsed_s=6.0,
        charge_per_m_uc=RHO,
    )
    refuted = [e for e in ledger.events if e.kind == "gap_bound_refuted"]
    assert len(refuted) == 1
    assert "48000 uC on 0.500 m" in refuted[0].detail
    gap = next(e for e in ledger.events if e.kind == "gap")
    assert "none to all of it" in gap.detail
