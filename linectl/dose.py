"""The dose law, written once (process.md, "Physics").

A cable passing under the beam `n` times, pass weights w_i (sum w), at speed v, under a
beam of current I scanned across W:

    D = K * I * sum(w) / (v * W)        D in kGy, I in mA, v in m/min, W in cm

K (`k_dose`, kGy*m*cm/(mA*min)) comes from the recipe's dosimetry. The controller uses it
forwards (the current for a dose at a speed, the speed the beam allows at full current),
the dose ledger per charge (the dose-length a charge delivers over a length of cable),
and recipes and the CLI to check that a recipe can reach its dose on a line. The
simulators have their own physics and never import this (a closed-loop test would
otherwise check the law against itself).

Pure: arithmetic only.
"""

from __future__ import annotations

UC_PER_MA_MIN = 60_000.0
"""1 mA flowing for one minute is 60,000 uC."""


def dose_kgy(
    k_dose: float, current_ma: float, speed_m_min: float, scan_width_cm: float, weight_sum: float
) -> float:
    """The dose a steady beam gives a cable moving at `speed_m_min`."""
    return k_dose * current_ma * weight_sum / (speed_m_min * scan_width_cm)


def current_for_dose_ma(
    k_dose: float, dose_kgy: float, speed_m_min: float, scan_width_cm: float, weight_sum: float
) -> float:
    """The beam current that gives `dose_kgy` at this speed: I = D v W / (K sum w)."""
    return dose_kgy * speed_m_min * scan_width_cm / (k_dose * weight_sum)


def speed_for_dose_m_min(
    k_dose: float, dose_kgy: float, current_ma: float, scan_width_cm: float, weight_sum: float
) -> float:
    """The speed at which `current_ma` gives `dose_kgy`: v = K I sum w / (D W)."""
    return k_dose * weight_sum * current_ma / (scan_width_cm * dose_kgy)


def dose_length_kgy_m(k_dose: float, charge_uc: float, scan_width_cm: float) -> float:
    """What `charge_uc` delivered across `scan_width_cm` gives one pass of unit weight,
    as dose times length (kGy*m): spread over L metres of cable it is a dose of this / L.
    (The charge I*t in mA*min, times K / W.)"""
    return k_dose * charge_uc / (UC_PER_MA_MIN * scan_width_cm)


def energy_in_tolerance(energy_mev: float, target_mev: float, tolerance_mev: float) -> bool:
    """Whether the beam energy is the recipe's (a NaN never is)."""
    return abs(energy_mev - target_mev) <= tolerance_mev


__all__ = [
    "UC_PER_MA_MIN",
    "current_for_dose_ma",
    "dose_kgy",
    "dose_length_kgy_m",
    "energy_in_tolerance",
    "speed_for_dose_m_min",
]
