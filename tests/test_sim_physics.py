"""Simulator physics without an event loop: time is passed in."""

from __future__ import annotations

import pytest

from linectl.config import load_config
from simulators.physics import (
    U16,
    U32,
    AcceleratorCounters,
    AcceleratorModel,
    AcceleratorParams,
    ConveyorCounters,
    ConveyorModel,
)
from simulators.plant import Plant


def quiet_acc(**counters: int) -> AcceleratorModel:
    return AcceleratorModel(
        seed=3,
        params=AcceleratorParams(ripple_frac=0.0),
        counters=AcceleratorCounters(**counters),
    )


def beam_up(acc: AcceleratorModel, sp_ma: float = 20.0) -> None:
    acc.current_sp_ma = sp_ma
    acc.write_command(hv_on=True, beam_on=True, fault_reset=False)
    acc.advance(2.05)


def test_hv_rises_after_about_two_seconds_and_beam_waits_for_it() -> None:
    acc = quiet_acc()
    acc.current_sp_ma = 10.0
    acc.write_command(hv_on=True, beam_on=True, fault_reset=False)
    acc.advance(1.9)
    assert not acc.hv_up
    assert not acc.beam_on
    assert acc.current_ma == 0.0
    acc.advance(0.2)
    assert acc.hv_up
    assert acc.beam_on


def test_current_ramp_is_limited_and_settles_on_the_set_point() -> None:
    acc = quiet_acc()
    beam_up(acc, 40.0)
    acc.advance(1.0)
    assert acc.current_ma <= 15.0 * 1.05 + 0.1
    acc.advance(1.0)
    assert 10.0 < acc.current_ma <= 30.0 * 1.05 + 0.1
    acc.advance(3.0)
    assert acc.current_ma == pytest.approx(40.0, rel=0.005)


def test_ripple_is_about_half_a_percent() -> None:
    acc = AcceleratorModel(seed=5)
    beam_up(acc, 20.0)
    acc.advance(4.0)
    samples = []
    for _ in range(500):
        acc.advance(0.01)
        samples.append(acc.current_ma)
    assert max(samples) <= 20.0 * 1.006
    assert min(samples) >= 20.0 * 0.994
    assert max(samples) - min(samples) > 20.0 * 0.003


def test_clearing_beam_on_cuts_the_beam_at_once() -> None:
    acc = quiet_acc()
    beam_up(acc)
    acc.advance(3.0)
    assert acc.current_ma > 19.0
    acc.write_command(hv_on=True, beam_on=False, fault_reset=False)
    assert acc.current_ma == 0.0
    assert not acc.beam_on


def test_arc_drops_the_beam_and_it_comes_back_by_itself() -> None:
    acc = quiet_acc()
    beam_up(acc)
    acc.advance(3.0)
    assert acc.arc(0.5)
    assert acc.current_ma == 0.0
    assert acc.fault_code == 1
    assert not acc.beam_on
    assert not acc.fault_latched
    assert acc.trip_count == 1
    acc.advance(0.45)
    assert acc.current_ma == 0.0
    acc.advance(0.1)
    assert acc.beam_on
    assert acc.fault_code == 0
    assert 0.0 < acc.current_ma < 5.0  # ramping back
    acc.advance(3.0)
    assert acc.current_ma == pytest.approx(20.0, rel=0.01)


def test_random_arcs_are_seeded_and_happen() -> None:
    counts = []
    for _ in range(2):
        acc = quiet_acc()
        acc.set_arc_rate(3600.0)  # one a second on average
        beam_up(acc)
        acc.advance(20.0)
        counts.append(acc.trip_count)
    assert counts[0] == counts[1]
    assert counts[0] >= 2


@pytest.mark.parametrize("code", [2, 3, 4, 5, 6, 7])
def test_latched_fault_needs_reset_edge_then_new_beam_on_edge(code: int) -> None:
    acc = quiet_acc()
    beam_up(acc)
    acc.advance(1.0)
    acc.latch(code)
    assert acc.current_ma == 0.0
    assert acc.fault_latched
    assert acc.fault_code == code
    assert acc.watchdog_trip == (code == 7)
    acc.advance(1.0)
    assert not acc.beam_on
    # reset edge with the requests still set: fault clears, beam stays off
    acc.write_command(hv_on=True, beam_on=True, fault_reset=True)
    assert not acc.fault_latched
    assert acc.fault_code == 0
    acc.advance(3.0)
    assert not acc.beam_on
    assert acc.current_ma == 0.0
    # holding FAULT_RESET high does not re-trigger; a new BEAM_ON edge restarts the beam
    acc.write_command(hv_on=True, beam_on=False, fault_reset=True)
    acc.write_command(hv_on=True, beam_on=True, fault_reset=False)
    acc.advance(2.5)
    assert acc.beam_on


def test_reset_does_nothing_while_the_cause_persists() -> None:
    acc = quiet_acc()
    beam_up(acc)
    acc.latch(6, persist=True)
    assert not acc.safety_ok
    acc.write_command(hv_on=True, beam_on=True, fault_reset=True)
    assert acc.fault_latched
    acc.clear_cause(6)
    assert acc.fault_latched  # still latched until the next reset edge
    acc.write_command(hv_on=True, beam_on=True, fault_reset=False)
    acc.write_command(hv_on=True, beam_on=True, fault_reset=True)
    assert not acc.fault_latched


def test_accelerator_watchdog_arms_on_first_change_and_trips() -> None:
    acc = quiet_acc()
    acc.write_watchdog_timeout(500)
    beam_up(acc)
    acc.advance(2.0)  # never changed: not armed
    assert acc.beam_on
    acc.write_watchdog(1)
    acc.advance(0.45)
    acc.write_watchdog(1)  # same value is no change
    acc.advance(0.04)
    assert acc.beam_on
    acc.advance(0.02)
    assert not acc.beam_on
    assert acc.fault_latched
    assert acc.fault_code == 7
    assert acc.watchdog_trip
    acc.write_command(hv_on=True, beam_on=True, fault_reset=True)
    assert not acc.watchdog_trip
    acc.advance(2.0)  # disarmed after a reset until the next change
    assert not acc.fault_latched


def test_watchdog_timeout_zero_disables() -> None:
    acc = quiet_acc()
    acc.write_watchdog_timeout(0)
    beam_up(acc)
    acc.write_watchdog(5)
    acc.advance(5.0)
    assert acc.beam_on


# The spec arms the watchdog at the first change of `watchdog` (after start or a
# FAULT_RESET) and nothing else disarms it: `watchdog_timeout` = 0 only stops the timing.
# A controller that sets the timeout back with a stale heartbeat sees a trip at once, which
# is legal PLC behaviour it must cope with; changing the heartbeat with (or just before) the
# timeout write avoids it.


def tripped(model: AcceleratorModel | ConveyorModel) -> bool:
    return model.watchdog_trip and model.fault_code == (
        7 if isinstance(model, AcceleratorModel) else 5
    )


@pytest.mark.parametrize("kind", ["accelerator", "conveyor"])
def test_armed_watchdog_stays_armed_when_timeout_is_0_and_trips_at_once_when_reset(
    kind: str,
) -> None:
    model: AcceleratorModel | ConveyorModel = quiet_acc() if kind == "accelerator" else running()
    model.write_watchdog_timeout(500)
    model.write_watchdog(1)  # armed
    model.advance(0.1)
    model.write_watchdog_timeout(0)
    model.advance(2.0)
    assert model.watchdog.armed
    assert not tripped(model)  # 0 disables the timing ...
    model.write_watchdog_timeout(500)  # ... and no heartbeat change since 2.1 s
    model.advance(0.001)
    assert tripped(model)


@pytest.mark.parametrize("kind", ["accelerator", "conveyor"])
def test_watchdog_armed_while_timeout_0_stays_armed_across_0_500_0(kind: str) -> None:
    model: AcceleratorModel | ConveyorModel = quiet_acc() if kind == "accelerator" else running()
    model.write_watchdog_timeout(0)
    model.write_watchdog(1)  # a change arms it even with the timing off
    assert model.watchdog.armed
    model.advance(0.1)
    model.write_watchdog_timeout(500)
    model.write_watchdog_timeout(0)  # 0 -> 500 -> 0 in the same instant: still armed
    model.advance(2.0)
    assert model.watchdog.armed
    assert not tripped(model)
    model.write_watchdog_timeout(500)
    model.advance(0.001)
    assert tripped(model)


@pytest.mark.parametrize("kind", ["accelerator", "conveyor"])
def test_heartbeat_change_just_before_the_timeout_write_avoids_the_trip(kind: str) -> None:
    model: AcceleratorModel | ConveyorModel = quiet_acc() if kind == "accelerator" else running()
    model.write_watchdog_timeout(500)
    model.write_watchdog(1)
    model.write_watchdog_timeout(0)
    model.advance(2.0)
    model.write_watchdog(2)  # fresh heartbeat first ...
    model.write_watchdog_timeout(500)  # ... then the timeout
    model.advance(0.45)
    assert not tripped(model)
    model.advance(0.1)  # timed from the heartbeat change: 500 ms without one trips
    assert tripped(model)


@pytest.mark.parametrize("plc", ["accelerator", "conveyor"])
def test_heartbeat_and_timeout_in_one_fc16_write_avoid_the_trip(plc: str) -> None:
    from linectl import codec

    cfg = load_config("config")
    plant = Plant(cfg.accelerator_map, cfg.conveyor_map, cfg.line.geometry)
    rmap = cfg.accelerator_map if plc == "accelerator" else cfg.conveyor_map
    model = plant.accelerator if plc == "accelerator" else plant.conveyor
    wd, wt = rmap.field("watchdog"), rmap.field("watchdog_timeout")
    assert wt.address == wd.end  # adjacent in the reference map: one FC16 writes both
    assert plant.write_holding(plc, wd.address, codec.encode(wd, 1)) is None  # armed
    assert plant.write_holding(plc, wt.address, codec.encode(wt, 0)) is None
    plant.advance(2.0)
    assert model.watchdog.armed
    regs = [*codec.encode(wd, 2), *codec.encode(wt, 500)]
    assert plant.write_holding(plc, wd.address, regs) is None
    plant.advance(0.3)
    assert not tripped(model)
    # The same write without the heartbeat change trips at once.
    assert plant.write_holding(plc, wt.address, codec.encode(wt, 0)) is None
    plant.advance(1.0)
    assert plant.write_holding(plc, wd.address, regs) is None  # heartbeat still 2
    plant.advance(0.01)
    assert tripped(model)


def test_charge_totalizer_integrates_exactly() -> None:
    acc = quiet_acc()
    beam_up(acc, 10.0)
    acc.advance(5.0)
    q0 = acc.charge_total_uc_float
    acc.advance(2.0)
    assert acc.charge_total_uc_float - q0 == pytest.approx(10.0 * 2.0 * 1000.0, rel=1e-6)


def test_accelerator_counters_wrap() -> None:
    acc = quiet_acc(charge_total_uc=U32 - 1000, trip_count=U16 - 1, clock_ms=U32 - 100)
    assert acc.clock_ms == U32 - 100
    acc.advance(0.2)
    assert acc.clock_ms == 100
    beam_up(acc, 10.0)
    acc.advance(3.0)  # ~10 mA for a few s: tens of mC
    assert acc.charge_total_uc < 100_000
    assert acc.charge_total_uc == int(acc.charge_total_uc_float) % U32
    acc.arc(0.3)
    assert acc.trip_count == 0


def test_accelerator_restart_resets_counters_and_outputs() -> None:
    acc = quiet_acc(clock_ms=5)
    beam_up(acc)
    acc.advance(1.0)
    acc.restart(AcceleratorCounters(charge_total_uc=123, trip_count=7, clock_ms=1000))
    assert not acc.beam_on
    assert not acc.hv_on_req
    assert acc.current_sp_ma == 0.0
    assert acc.charge_total_uc == 123
    assert acc.trip_count == 7
    assert acc.clock_ms == 1000
    acc.advance(0.5)
    assert acc.clock_ms == 1500


# --------------------------------------------------------------------------- conveyor


def running(speed: float = 200.0) -> ConveyorModel:
    cnv = ConveyorModel(seed=2)
    cnv.speed_sp_m_min = speed
    cnv.ramp_rate_m_min_s = 60.0
    cnv.write_command(run=True, fault_reset=False)
    cnv.advance(speed / 60.0 + 0.5)
    return cnv


def test_conveyor_follows_set_point_within_ramp() -> None:
    cnv = ConveyorModel(seed=2)
    cnv.speed_sp_m_min = 100.0
    cnv.write_command(run=True, fault_reset=False)  # default ramp 30 m/min/s
    cnv.advance(1.0)
    assert cnv.speed_m_min == pytest.approx(30.0, abs=0.05)
    assert cnv.running
    assert not cnv.at_speed
    cnv.advance(3.0)
    assert cnv.speed_m_min == pytest.approx(100.0)
    assert cnv.at_speed
    assert cnv.tension_ok
    assert 20.0 < cnv.tension_n < 200.0
    cnv.write_command(run=False, fault_reset=False)
    cnv.advance(1.0)
    assert cnv.speed_m_min == pytest.approx(70.0, abs=0.05)


@pytest.mark.parametrize("code", [2, 4])
def test_cable_break_and_estop_stop_within_0_3_s(code: int) -> None:
    cnv = running(300.0)
    cnv.fault(code)
    cnv.advance(0.3)
    assert cnv.speed_m_min == 0.0
    assert cnv.fault_code == code
    assert cnv.fault_latched
    assert cnv.estop == (code == 4)
    assert cnv.cable_break == (code == 2)


def test_drive_fault_stops_with_the_normal_ramp_and_needs_run_edge() -> None:
    cnv = running(120.0)
    cnv.fault(1)
    cnv.advance(1.0)
    assert cnv.speed_m_min == pytest.approx(60.0, abs=0.1)
    cnv.advance(1.5)
    assert cnv.speed_m_min == 0.0
    cnv.write_command(run=True, fault_reset=True)
    assert not cnv.fault_latched
    cnv.advance(1.0)
    assert cnv.speed_m_min == 0.0  # RUN still set, but no new edge
    cnv.write_command(run=False, fault_reset=False)
    cnv.write_command(run=True, fault_reset=False)
    cnv.advance(1.0)
    assert cnv.speed_m_min > 50.0


def test_conveyor_watchdog() -> None:
    cnv = running(60.0)
    cnv.write_watchdog_timeout(200)
    cnv.advance(1.0)
    assert cnv.fault_code == 0  # not armed yet
    cnv.write_watchdog(9)
    cnv.advance(0.21)
    assert cnv.fault_code == 5
    assert cnv.watchdog_trip
    cnv.advance(0.5)
    assert cnv.speed_m_min == pytest.approx(60.0 - 0.51 * 60.0, abs=0.2)  # normal ramp


def test_length_counter_and_clock_wrap() -> None:
    cnv = ConveyorModel(seed=1, counters=ConveyorCounters(length_mm=U32 - 500, clock_ms=U32 - 1))
    cnv.speed_sp_m_min = 60.0
    cnv.ramp_rate_m_min_s = 120.0
    cnv.write_command(run=True, fault_reset=False)
    cnv.advance(0.5)  # ramp to 60 m/min in 0.5 s: 0.25 m
    cnv.advance(1.0)  # 1 m more
    assert cnv.length_mm_float - (U32 - 500) == pytest.approx(1250.0, abs=0.01)
    assert cnv.length_mm == 750
    assert cnv.clock_ms == 1499


def test_conveyor_restart() -> None:
    cnv = running(60.0)
    cnv.restart(ConveyorCounters(length_mm=42, clock_ms=7))
    assert cnv.length_mm == 42
    assert cnv.clock_ms == 7
    assert not cnv.run_req
    cnv.advance(0.3)
    assert cnv.speed_m_min == 0.0


# --------------------------------------------------------------------------- plant


def test_plant_range_check_and_unmapped_writes_change_nothing() -> None:
    from linectl import codec

    cfg = load_config("config")
    plant = Plant(cfg.accelerator_map, cfg.conveyor_map, cfg.line.geometry)
    sp = cfg.accelerator_map.field("beam_current_sp")
    wt = cfg.accelerator_map.field("watchdog_timeout")
    before = plant.holding_registers("accelerator")
    assert plant.write_holding("accelerator", sp.address, codec.encode(sp, 100.5)) == 3
    assert plant.write_holding("accelerator", wt.address, codec.encode(wt, 50)) == 3
    assert plant.write_holding("accelerator", 200, [1]) == 2
    assert plant.holding_registers("accelerator") == before
    assert plant.write_holding("accelerator", sp.address, codec.encode(sp, 12.5)) is None
    assert plant.accelerator.current_sp_ma == 12.5
    assert plant.write_holding("accelerator", wt.address, codec.encode(wt, 0)) is None
    assert plant.accelerator.watchdog.timeout_ms == 0
