"""Pairing the two PLCs' counters at one instant (linectl.core.align)."""

from __future__ import annotations

import random

import pytest

from linectl.core.align import AccPoint, CnvPoint, CounterAligner, PlcClock

MOD_MS = float(2**32)


def test_plc_clock_maps_onto_host_time_through_the_least_delayed_response() -> None:
    clock = PlcClock(MOD_MS)
    rng = random.Random(1)
    offset_s = 1234.5  # host time - PLC time
    errors = []
    for i in range(400):
        plc_s = 10.0 + 0.05 * i
        delay_s = 0.002 + rng.uniform(0.0, 0.04)  # response latency after sampling
        est = clock.sample_time(plc_s + offset_s + delay_s, plc_s * 1000.0)
        errors.append(est - (plc_s + offset_s))
    # After a few samples the estimate is within the fastest responses' latency.
    assert all(0.0 <= e <= 0.0045 for e in errors[100:]), max(errors[100:])


def test_plc_clock_unwraps_and_restarts() -> None:
    clock = PlcClock(MOD_MS)
    t0 = clock.sample_time(100.0, MOD_MS - 50.0)
    t1 = clock.sample_time(100.1, 50.0)  # wrapped: 100 ms later
    assert t1 - t0 == pytest.approx(0.1)
    # A PLC restart: its clock starts again from some other value.
    t2 = clock.sample_time(105.0, 7.0)
    assert clock.resets == 1
    assert t2 == pytest.approx(105.0)


def test_plc_clock_without_reading_uses_host_time() -> None:
    assert PlcClock(MOD_MS).sample_time(3.25, None) == 3.25


def acc(t: float, q: float, *, energy_ok: bool = True) -> AccPoint:
    return AccPoint(t, q, 100.0, energy_ok)


def cnv(t: float, length: float) -> CnvPoint:
    return CnvPoint(t, length, 60.0)


def test_charge_interpolated_to_the_length_sample_instant() -> None:
    al = CounterAligner(float(2**32))
    assert al.push(1.00, acc(1.00, 100.0), cnv(1.02, 5.0)) == []  # waits for the next
    out = al.push(1.05, acc(1.05, 150.0), cnv(1.07, 6.0))
    assert len(out) == 1
    assert out[0].t_s == 1.02
    assert out[0].charge_uc == pytest.approx(120.0)
    assert out[0].length_m == 5.0
    out = al.push(1.10, acc(1.11, 210.0), None)
    assert [s.charge_uc for s in out] == [pytest.approx(170.0)]


def test_charge_interpolated_across_a_counter_wrap() -> None:
    al = CounterAligner(1000.0)
    al.push(0.0, acc(0.0, 990.0), cnv(0.025, 1.0))
    out = al.push(0.05, acc(0.05, 10.0), None)
    assert out[0].charge_uc == pytest.approx(0.0)


def test_no_interpolation_across_a_counter_reset() -> None:
    al = CounterAligner(1000.0)
    al.push(0.0, acc(0.0, 400.0), cnv(0.025, 1.0))
    out = al.push(0.05, acc(0.05, 3.0), None)  # went back: a PLC restart
    assert out[0].charge_uc == 3.0


def test_energy_fault_on_either_side_counts() -> None:
    al = CounterAligner(1000.0)
    al.push(0.0, acc(0.0, 1.0), cnv(0.025, 1.0))
    out = al.push(0.05, acc(0.05, 2.0, energy_ok=False), None)
    assert out[0].energy_ok is False


def test_length_sample_given_up_without_charge_after_max_wait() -> None:
    al = CounterAligner(1000.0, max_wait_s=0.3)
    first = al.push(0.0, acc(0.0, 1.0), cnv(0.0, 1.0))
    assert [smp.charge_uc for smp in first] == [1.0]  # same instant: exact
    assert al.push(0.05, None, cnv(0.05, 2.0)) == []  # waits for the accelerator
    out = al.push(0.4, None, None)
    assert [s.length_m for s in out] == [2.0]
    assert out[0].charge_uc is None  # the ledger skips it; counters bridge the gap


def test_out_of_order_or_repeated_samples_are_ignored() -> None:
    al = CounterAligner(1000.0)
    al.push(0.0, acc(0.0, 1.0), None)
    out = al.push(0.05, acc(0.0, 1.0), cnv(0.0, 1.0))  # the same acc sample again
    assert [s.t_s for s in out] == [0.0]
    assert al.push(0.1, None, cnv(0.0, 1.0)) == []


def test_no_charge_credited_inside_a_gap_in_the_accelerator_data() -> None:
    """The beam may have stopped, or come back in a burst, at any moment of the gap: the
    length samples inside it get no charge, so the ledger bounds the whole gap."""
    al = CounterAligner(float(2**32), max_span_s=0.3)
    al.push(1.5, acc(1.5, 1000.0), cnv(1.5, 10.0))
    for i in range(1, 10):  # conveyor answers, accelerator silent for 0.5 s
        al.push(1.5 + 0.05 * i, None, cnv(1.5 + 0.05 * i, 10.0 + 0.05 * i))
    out = al.push(2.05, acc(2.05, 1000.0), cnv(2.05, 10.55))
    inside = [s for s in out if 1.5 < s.t_s < 2.05]
    assert inside
    assert all(s.charge_uc is None for s in inside)
