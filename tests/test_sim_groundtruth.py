"""Ground-truth dose: analytic cases, pass weights, burns, output files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linectl.config import Geometry, load_config
from simulators.groundtruth import DoseTruth
from simulators.physics import AcceleratorParams
from simulators.plant import Plant


def run_constant(
    truth: DoseTruth, current_ma: float, speed_m_min: float, width_cm: float, seconds: float
) -> None:
    h = 0.001
    dq = current_ma * h * 1000.0
    dx = speed_m_min / 60.0 * h
    t = truth.t_s
    for _ in range(round(seconds / h)):
        t += h
        truth.step(t, dq, dx, width_cm)


def test_constant_beam_and_speed_gives_the_analytic_dose() -> None:
    geo = Geometry(passes=16, pass_spacing_m=6.0, first_pass_offset_m=4.0)
    truth = DoseTruth(geo, k_dose=1500.0)
    # 150 m/min for 42 s: 105 m, past the last pass (94 m) by 11 m.
    run_constant(truth, 40.0, 150.0, 100.0, 42.0)
    expected = 16 * 1500.0 * 40.0 / (150.0 * 100.0)
    doses = truth.doses()
    assert len(doses) == 11
    for i, d in doses.items():
        assert d == pytest.approx(expected, rel=0.005), i
    # the leader (negative coordinates) got only some passes
    assert truth.dose_kgy(-50) < expected


def test_pass_weights() -> None:
    geo = Geometry(
        passes=3, pass_spacing_m=2.0, first_pass_offset_m=1.0, pass_weights=[1.0, 0.5, 0.8]
    )
    truth = DoseTruth(geo, k_dose=1500.0)
    run_constant(truth, 10.0, 60.0, 50.0, 12.0)  # 12 m: 7 complete metres
    expected = 2.3 * 1500.0 * 10.0 / (60.0 * 50.0)
    doses = truth.doses()
    assert len(doses) == 7
    for d in doses.values():
        assert d == pytest.approx(expected, rel=0.005)


def test_start_reel_sets_coordinate_zero() -> None:
    geo = Geometry(passes=1, pass_spacing_m=1.0, first_pass_offset_m=2.0)
    truth = DoseTruth(geo)
    run_constant(truth, 0.0, 60.0, 100.0, 10.0)
    truth.start_reel()
    assert truth.coordinate_m(0) == pytest.approx(-2.0)
    run_constant(truth, 10.0, 60.0, 100.0, 5.0)
    assert truth.complete_length_m == pytest.approx(3.0)
    assert set(truth.doses()) == {0, 1, 2}


def test_burn_is_recorded_with_its_dose() -> None:
    geo = Geometry(passes=2, pass_spacing_m=3.0, first_pass_offset_m=1.0)
    truth = DoseTruth(geo, k_dose=1500.0)
    run_constant(truth, 5.0, 30.0, 100.0, 4.0)  # 2 m moving
    run_constant(truth, 5.0, 0.0, 100.0, 1.5)  # standing under the beam
    run_constant(truth, 0.0, 30.0, 100.0, 2.0)
    assert len(truth.burns) == 1
    b = truth.burns[0]
    assert b.t_start_s == pytest.approx(4.0, abs=0.002)
    assert b.t_end_s - b.t_start_s == pytest.approx(1.5, abs=0.002)
    assert b.charge_uc == pytest.approx(5.0 * 1.5 * 1000.0)
    assert b.deposit_kgy_m == pytest.approx(2 * 1500.0 * 7500.0 / (60000.0 * 100.0))
    assert b.position_m == pytest.approx([1.0, -2.0], abs=1e-6)
    assert b.peak_metre_dose_kgy == pytest.approx(1500.0 * 7500.0 / (60000.0 * 100.0))


def test_plant_truth_matches_the_formula_with_real_dynamics() -> None:
    cfg = load_config("config")
    geo = Geometry(passes=4, pass_spacing_m=2.0, first_pass_offset_m=1.0)
    plant = Plant(
        cfg.accelerator_map, cfg.conveyor_map, geo, acc_params=AcceleratorParams(ripple_frac=0.0)
    )
    acc, cnv = plant.accelerator, plant.conveyor
    acc.current_sp_ma = 20.0
    acc.scan_width_sp_cm = 100.0
    acc.write_command(hv_on=True, beam_on=True, fault_reset=False)
    cnv.speed_sp_m_min = 60.0
    cnv.ramp_rate_m_min_s = 120.0
    cnv.write_command(run=True, fault_reset=False)
    plant.advance(5.0)  # HV up at 2 s, current settled by ~4 s
    plant.start_reel(cnv.length_mm / 1000.0)
    # the counter reading (whole mm) maps to the true path within a millimetre
    assert plant.truth.coordinate_m(0) == pytest.approx(-1.0, abs=0.0011)
    plant.start_reel()
    plant.advance(10.0)
    expected = 4 * 1500.0 * 20.0 / (60.0 * 100.0)
    doses = plant.truth.doses()
    assert len(doses) == 3  # 10 m moved, last pass at 7 m
    for d in doses.values():
        assert d == pytest.approx(expected, rel=0.005)
    # charge bookkeeping agrees with the PLC totalizer
    assert plant.truth.charge_uc == pytest.approx(acc.charge_total_uc_float, rel=1e-9)


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_write(tmp_path: Path, suffix: str) -> None:
    geo = Geometry(passes=2, pass_spacing_m=1.0, first_pass_offset_m=1.0)
    truth = DoseTruth(geo)
    run_constant(truth, 5.0, 60.0, 100.0, 5.0)
    run_constant(truth, 5.0, 0.0, 100.0, 0.5)
    out = tmp_path / f"truth{suffix}"
    truth.write(out)
    text = out.read_text()
    if suffix == ".json":
        rep = json.loads(text)
        assert rep["burns"][0]["duration_s"] == pytest.approx(0.5, abs=0.002)
        assert any(r["complete"] for r in rep["dose_kgy"])
    else:
        assert "# burn" in text
        assert "metre,start_m,end_m,dose_kgy,complete" in text
