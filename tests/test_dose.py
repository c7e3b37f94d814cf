"""The dose law (linectl.dose): one formula, used forwards, backwards and per charge."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from linectl import dose
from linectl.config import LoadedConfig

positive = st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False)


@given(k=positive, d=positive, v=positive, w=positive, ws=positive)
def test_current_speed_and_dose_are_one_law(
    k: float, d: float, v: float, w: float, ws: float
) -> None:
    i = dose.current_for_dose_ma(k, d, v, w, ws)
    assert dose.dose_kgy(k, i, v, w, ws) == pytest.approx(d, rel=1e-9)
    assert dose.speed_for_dose_m_min(k, d, i, w, ws) == pytest.approx(v, rel=1e-9)


@given(k=positive, i=positive, v=positive, w=positive)
def test_a_charge_spread_over_the_cable_it_passed_is_the_steady_dose(
    k: float, i: float, v: float, w: float
) -> None:
    minutes = 0.5
    charge_uc = i * minutes * dose.UC_PER_MA_MIN
    length_m = v * minutes
    spread = dose.dose_length_kgy_m(k, charge_uc, w) / length_m
    assert spread == pytest.approx(dose.dose_kgy(k, i, v, w, 1.0), rel=1e-9)


def test_the_reference_recipe_on_the_reference_line(cfg: LoadedConfig) -> None:
    """README's figures: 120 kGy at 40 mA on 16 passes allows 80 m/min."""
    recipe = cfg.load_recipe("pv-1x6-en50618")
    ws = cfg.line.geometry.weight_sum
    assert recipe.max_speed_m_min(ws) == pytest.approx(80.0, rel=1e-6)
    assert recipe.current_for_dose_ma(80.0, ws) == pytest.approx(40.0, rel=1e-6)


def test_energy_tolerance_is_inclusive_and_nan_is_never_in_it() -> None:
    assert dose.energy_in_tolerance(1.5, 1.0, 0.5)  # exact in binary: inclusive
    assert dose.energy_in_tolerance(0.5, 1.0, 0.5)
    assert not dose.energy_in_tolerance(1.5000001, 1.0, 0.5)
    assert not dose.energy_in_tolerance(math.nan, 1.2, 0.05)
