"""Dose ledger checkpoint and restore: a reel continued from a checkpoint (through JSON)
records exactly what an uninterrupted one records; restore() refuses a bad state."""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ledger import GEOM, L_MOD, Q_MOD, RECIPE, new_ledger, run

from linectl.config import Geometry
from linectl.core.ledger import (
    CHECKPOINT_VERSION,
    DoseLedger,
    LedgerSample,
    MetreRecord,
    Verdict,
)

COMPACT = Geometry(passes=4, pass_spacing_m=1.5, first_pass_offset_m=1.0)


def synthetic(
    seed: int, n: int, *, dyadic: bool = False, geom: Geometry = GEOM
) -> list[LedgerSample]:
    """A long, eventful counter stream: jitter, ramps, beam trips, missing values, gaps
    with and without charge, charge and length counter resets, wraps, energy faults,
    standstill under the beam, interpolated charges. With `dyadic`, every time is a
    multiple of 1/64 s, so that shifting the time base by a whole number is exact."""
    rng = random.Random(seed)
    # The dose-follow current per m/min: the target dose on this geometry.
    ma_per_m_min = RECIPE.target_dose_kgy * 100.0 / (RECIPE.k_dose * geom.weight_sum)
    top = min(80.0, 40.0 / ma_per_m_min)  # as fast as 40 mA allows
    t = 1000.0 if dyadic else rng.uniform(0.0, 1e4)
    q = Q_MOD - rng.uniform(0.0, 3e5)  # the charge counter wraps early on
    length = rng.uniform(0.0, 100.0)
    speed, current = top, 40.0
    out = [LedgerSample(t, q, length, 100.0, True, speed)]
    for _ in range(n):
        r = rng.random()
        dt = 3 / 64 if dyadic else rng.choice([0.05, 0.05, 0.05, rng.uniform(0.01, 0.3)])
        # The speed wanders around `top`; now and then the line stops (and the beam
        # may stay on a moment: a standstill). The current follows the speed, with trips.
        speed = max(0.0, speed + 0.05 * (top - speed) + rng.gauss(0.0, top / 80.0))
        current = (
            0.0 if rng.random() < 0.01 else max(0.0, speed * ma_per_m_min * rng.gauss(1.0, 0.03))
        )
        if rng.random() < 0.002:
            speed = 0.0
            current = rng.choice([0.0, 0.0, 5.0])
        if r < 0.001:  # a gap: the line keeps moving; the beam may trip in it
            dt = rng.choice([48, 96, 192]) / 64 if dyadic else rng.uniform(0.6, 3.0)
            current *= rng.choice([0.0, 0.0, 0.02, 1.0])
        t += dt
        q = (q + current * 1000.0 * dt) % Q_MOD
        length = (length + speed / 60.0 * dt) % L_MOD
        charge: float | None = q
        len_m: float | None = length
        width: float | None = rng.gauss(100.0, 0.5)
        if r > 0.9995:
            q = rng.uniform(0.0, 1e6)  # charge counter reset (PLC restart)
            charge = q
        elif r > 0.9992:
            length = rng.uniform(0.0, 1e3)  # length counter reset
            len_m = length
        elif r > 0.97:
            charge, len_m, width = rng.choice(
                [(None, len_m, width), (charge, None, width), (charge, len_m, None)]
            )
        out.append(
            LedgerSample(
                t,
                charge,
                len_m,
                width,
                rng.random() > 0.0005,
                speed if rng.random() > 0.01 else None,
                rng.choice([0.0, 0.0, 0.0, rng.uniform(0.0, 2000.0)]),
            )
        )
    return out


def complete(s: LedgerSample) -> bool:
    """The sample has every value the ledger accounts with."""
    values = (s.charge_uc, s.length_m, s.scan_width_cm)
    return all(v is not None and math.isfinite(v) for v in values) and (
        s.scan_width_cm is not None and s.scan_width_cm > 0
    )


def uninterrupted(geom: Geometry, samples: list[LedgerSample]) -> tuple[DoseLedger, list[Any]]:
    ledger = DoseLedger(geom, RECIPE, charge_modulus_uc=Q_MOD, length_modulus_m=L_MOD)
    ledger.start(samples[0])
    recs: list[MetreRecord] = []
    for s in samples[1:]:
        recs += ledger.update(s)
    recs += ledger.finish()
    return ledger, recs


def through_json(state: dict[str, Any]) -> Any:
    # allow_nan=False: the checkpoint must be strict JSON.
    return json.loads(json.dumps(state, allow_nan=False))


def interrupted(
    geom: Geometry, samples: list[LedgerSample], cut: int, *, new_base_s: float | None = None
) -> tuple[DoseLedger, list[MetreRecord], dict[str, Any]]:
    """Run to sample `cut`, checkpoint through JSON, restore into a new ledger, continue.
    With `new_base_s` the samples after the cut come on a clock shifted by that much."""
    first = DoseLedger(geom, RECIPE, charge_modulus_uc=Q_MOD, length_modulus_m=L_MOD)
    first.start(samples[0])
    recs: list[MetreRecord] = []
    for s in samples[1:cut]:
        recs += first.update(s)
    state = through_json(first.checkpoint())
    ledger = DoseLedger.restore(
        geom, RECIPE, state, charge_modulus_uc=Q_MOD, length_modulus_m=L_MOD
    )
    assert ledger.awaiting_resume
    assert through_json(ledger.checkpoint()) == state  # restore() loses nothing
    rest = samples[cut:]
    shift = 0.0 if new_base_s is None else new_base_s
    # The first complete sample after the cut resumes: earlier ones would be skipped anyway.
    i = next((k for k, s in enumerate(rest) if complete(s)), len(rest))
    if i < len(rest):
        s = rest[i]
        # The elapsed time comes from a clock that survived (here: the old one).
        elapsed = s.t_s - state["last"]["t_s"]
        moved = LedgerSample(s.t_s + shift, *_fields(s)[1:])
        recs += ledger.resume_with(moved, elapsed_s=elapsed)
        for s in rest[i + 1 :]:
            recs += ledger.update(LedgerSample(s.t_s + shift, *_fields(s)[1:]))
    recs += ledger.finish()
    return ledger, recs, state


def _fields(s: LedgerSample) -> tuple[Any, ...]:
    return (
        s.t_s,
        s.charge_uc,
        s.length_m,
        s.scan_width_cm,
        s.energy_ok,
        s.speed_m_min,
        s.charge_uncertainty_uc,
    )


def assert_same(a: DoseLedger, ra: list[MetreRecord], b: DoseLedger, rb: list[MetreRecord]) -> None:
    assert rb == ra  # exactly: every float, verdict and cause
    assert b.position_m == a.position_m
    assert b.next_metre == a.next_metre
    assert b.position_uncertainty_m == a.position_uncertainty_m
    assert b.charge_total_uc == a.charge_total_uc


# ------------------------------------------------------------------ exact continuation


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), cut_frac=st.floats(0.0, 1.0))
def test_a_reel_continued_from_a_checkpoint_records_exactly_the_same(
    seed: int, cut_frac: float
) -> None:
    samples = synthetic(seed, 3000, geom=COMPACT)
    a, ra = uninterrupted(COMPACT, samples)
    assert len(ra) > 20
    cut = 1 + round(cut_frac * (len(samples) - 1))
    b, rb, _ = interrupted(COMPACT, samples, cut)
    assert_same(a, ra, b, rb)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reference_line_checkpoint_at_many_points(seed: int) -> None:
    samples = synthetic(seed, 6000)
    a, ra = uninterrupted(GEOM, samples)
    verdicts = {r.verdict for r in ra}
    assert len(ra) > 100
    assert Verdict.IN_SPEC in verdicts
    assert len(verdicts) >= 3, verdicts  # the stream is eventful
    for cut in (1, 2, 777, 2500, 4321, len(samples) - 1, len(samples)):
        b, rb, _ = interrupted(GEOM, samples, cut)
        assert_same(a, ra, b, rb)


def test_the_stream_exercises_every_rule() -> None:
    """The synthetic streams above meet every event the ledger knows."""
    kinds: set[str] = set()
    causes: set[str] = set()
    for seed in (1, 2, 3):
        ledger, recs = uninterrupted(GEOM, synthetic(seed, 6000))
        kinds |= {e.kind for e in ledger.events}
        causes |= {c for r in recs for c in r.causes}
    assert {"gap", "charge_reset", "length_reset", "position_uncertain", "missing"} <= kinds
    assert {"unproven", "gap", "under_dose", "energy", "standstill"} <= causes


@pytest.mark.parametrize("new_base_s", [-999.0, 5.0e6, -1000.0 + 1 / 64])
def test_resume_on_a_new_clock_records_exactly_the_same(new_base_s: float) -> None:
    """The caller's monotonic clock restarts with the process: resume_with() takes the
    elapsed time from a clock that survived, and the new time base from then on."""
    samples = synthetic(7, 4000, dyadic=True)  # dyadic times: the shift is exact
    a, ra = uninterrupted(GEOM, samples)
    for cut in (1500, 2222):
        b, rb, _ = interrupted(GEOM, samples, cut, new_base_s=new_base_s)
        assert_same(a, ra, b, rb)
    assert any(e.kind == "resume" for e in b.events)


def test_a_restart_across_a_beam_trip_loses_no_cable() -> None:
    """The controller dies with the beam tripped; the cable coasts 2 m through the passes
    while it is down. The restored ledger accounts the downtime from the counters: every
    piece of cable missed exactly one pass (112.5 kGy), and every metre is in spec."""
    ledger = new_ledger(planned_length_m=200.0)
    ledger.start(LedgerSample(0.0, 0.0, 0.0, 100.0))
    recs, q, length, _t = run(ledger, current_ma=40.0, speed_m_min=80.0, seconds=60.0)
    state = through_json(ledger.checkpoint())
    restored = DoseLedger.restore(
        GEOM,
        RECIPE,
        state,
        charge_modulus_uc=Q_MOD,
        length_modulus_m=L_MOD,
        planned_length_m=200.0,
    )
    with pytest.raises(RuntimeError, match="resume_with"):
        restored.update(LedgerSample(0.05, q, length, 100.0))
    # 25 s later (wall clock), on a monotonic clock that restarted near 0.
    length += 2.0
    recs += restored.resume_with(LedgerSample(0.5, q, length, 100.0), elapsed_s=25.0)
    more, *_ = run(
        restored, current_ma=40.0, speed_m_min=80.0, seconds=180.0, q0=q, l0=length, t0=0.5
    )
    recs += more
    assert [r.index for r in recs] == list(range(200))
    assert all(r.verdict is Verdict.IN_SPEC for r in recs)
    # Pass 0 was over [76, 78) of the cable while the controller was down.
    assert recs[76].min_dose_kgy == pytest.approx(112.5)
    assert recs[76].dose_kgy == pytest.approx(112.5)
    assert recs[75].min_dose_kgy == pytest.approx(120.0)


def test_checkpoint_is_small_and_strict_json() -> None:
    """Only the beam zone is kept: about (last pass + 1 m) / resolution bins."""
    ledger = new_ledger()
    ledger.start(LedgerSample(0.0, 0.0, 0.0, 100.0))
    run(ledger, current_ma=40.0, speed_m_min=80.0, seconds=600.0)
    state = ledger.checkpoint()
    text = json.dumps(state, allow_nan=False)
    assert len(state["bins"]["dose_len"]) <= (GEOM.last_pass_offset_m - 4.0 + 2.0) * 10
    assert len(text) < 24_000
    assert state["version"] == CHECKPOINT_VERSION
    _assert_plain(state)


def _assert_plain(v: Any) -> None:
    if isinstance(v, dict):
        assert all(isinstance(k, str) for k in v)
        for x in v.values():
            _assert_plain(x)
    elif isinstance(v, list):
        for x in v:
            _assert_plain(x)
    else:
        assert v is None or isinstance(v, str | int | float | bool), type(v)
        if isinstance(v, float):
            assert math.isfinite(v)


def test_checkpoint_before_start_and_resume_misuse() -> None:
    ledger = new_ledger()
    with pytest.raises(RuntimeError, match="before start"):
        ledger.checkpoint()
    ledger.start(LedgerSample(0.0, 0.0, 0.0, 100.0))
    with pytest.raises(ValueError, match="elapsed_s"):
        ledger.resume_with(LedgerSample(1.0, 0.0, 0.0, 100.0), elapsed_s=math.nan)
    with pytest.raises(ValueError, match="elapsed_s"):
        ledger.resume_with(LedgerSample(1.0, 0.0, 0.0, 100.0), elapsed_s=0.0)
    with pytest.raises(ValueError, match="scan width"):
        ledger.resume_with(LedgerSample(1.0, 0.0, 0.0, None), elapsed_s=1.0)
    # A speed that is not a number is stored as none (the ledger ignores both alike).
    ledger.update(LedgerSample(0.05, 2000.0, 0.0667, 100.0, True, math.nan))
    assert ledger.checkpoint()["last"]["speed_m_min"] is None


# ------------------------------------------------------------------ validation


def _state() -> dict[str, Any]:
    ledger = new_ledger()
    ledger.start(LedgerSample(0.0, 0.0, 0.0, 100.0))
    _, q, length, t = run(ledger, current_ma=40.0, speed_m_min=80.0, seconds=3.0)
    ledger.update(LedgerSample(t + 2.0, q, length, 100.0))  # a gap: bounds in the state
    ledger.update(LedgerSample(t + 2.05, q + 2000.0, length + 0.0667, 100.0, False))
    assert not any(e.kind == "length_reset" for e in ledger.events)
    state = through_json(ledger.checkpoint())
    assert state["bins"]["gap_upper"]
    assert state["bins"]["flags"]
    return state


def _restore(state: Any, **kw: Any) -> DoseLedger:
    args: dict[str, Any] = {"charge_modulus_uc": Q_MOD, "length_modulus_m": L_MOD}
    args.update(kw)
    geom = args.pop("geometry", GEOM)
    recipe = args.pop("recipe", RECIPE)
    return DoseLedger.restore(geom, recipe, state, **args)


def _with(path: str, value: Any) -> dict[str, Any]:
    state = copy.deepcopy(_state())
    *parents, key = path.split(".")
    d: Any = state
    for p in parents:
        d = d[p]
    if value is _DELETE:
        del d[key]
    else:
        d[key] = value
    return state


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("version", 2, "format version 2 is not 1"),
        ("version", True, "version is not an integer"),
        ("version", _DELETE, "lacks version"),
        ("position_m", _DELETE, "lacks position_m"),
        ("last.charge_uc", _DELETE, r"checkpoint.last lacks charge_uc"),
        ("bins.gap_upper", _DELETE, r"checkpoint.bins lacks gap_upper"),
        ("extra", 1, "unknown keys extra"),
        ("position_m", math.nan, r"position_m is not a finite number"),
        ("charge_total_uc", math.inf, r"charge_total_uc is not a finite number"),
        ("last.t_s", -math.inf, r"last.t_s is not a finite number"),
        ("last.length_m", "12", r"last.length_m is not a number"),
        ("last.energy_ok", 1, r"last.energy_ok is not true or false"),
        ("last.scan_width_cm", 0.0, r"scan_width_cm 0.0 is not positive"),
        ("next_metre", 3.5, r"next_metre is not an integer"),
        ("uncertainty_m", -0.1, r"uncertainty_m -0.1 is negative"),
        ("resolution_m", 0.25, r"resolution_m 0.25 differs"),
        ("bins.dose_len", [1.0, math.nan], r"bins.dose_len\[1\] is not a finite number"),
        ("bins.flags", [[3, 64]], r"flags 64, not in 0..7"),
        ("bins.flags", [[3, 1.5]], r"1.5 is not an integer"),
        ("bins.gap_upper", [[1, 2, 3]], r"not a \[bin, value\] pair"),
        ("bins.gap_upper", [[1, -2.0]], r"bins.gap_upper\[0\] is a negative dose"),
        ("bins.dose_len", [0.5, None, -1.0], r"bins.dose_len\[2\] is a negative dose"),
        ("bins.gap_est", [["7", 1.0]], r"bin '7' is not an integer"),
        ("charge_modulus_uc", 65536.0, r"charge_modulus_uc 65536.0 differs"),
        ("recipe.version", "2", r"recipe 'test' version '2' is not 'test' version '1'"),
        ("geometry.offsets_m", [4.0], r"geometry .* differs"),
        ("last", [], r"checkpoint.last is not a mapping"),
    ],
)
def test_restore_refuses_a_bad_state_naming_what_is_wrong(
    path: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _restore(_with(path, value))


def test_restore_refuses_a_mismatched_ledger() -> None:
    state = _state()
    with pytest.raises(ValueError, match=r"resolution_m 0\.1 differs from this ledger's 0\.5"):
        _restore(state, resolution_m=0.5)
    with pytest.raises(ValueError, match="geometry"):
        _restore(state, geometry=COMPACT)
    with pytest.raises(ValueError, match="length_modulus_m"):
        _restore(state, length_modulus_m=65.536)
    with pytest.raises(ValueError, match="not a mapping"):
        _restore([1, 2])
    # NaN as Python's json module reads it from a non-standard file.
    text = json.dumps({**state, "position_m": math.nan})
    assert "NaN" in text
    with pytest.raises(ValueError, match="position_m is not a finite number"):
        _restore(json.loads(text))
    assert _restore(state).position_m == state["position_m"]  # the state itself is good
