"""Plant physics of the two PLCs: pure, synchronous, time passed in.

The models implement the behaviour in plc-interface.md. They know nothing of registers:
inputs are engineering values set by `Plant` after decoding a Modbus write, outputs are
properties that `Plant` encodes. Time only moves when `advance`/`advance_to` is called;
internally the models step at `STEP_S` or finer so totalizers are exact to 1 ms.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

STEP_S = 0.001
"""Largest internal integration step, s."""

U32 = 1 << 32
U16 = 1 << 16

ARC_MIN_S = 0.2
ARC_MAX_S = 3.0

ACC_LATCHED_CODES = (2, 3, 4, 5, 6, 7)
# Faults that also take the high voltage down (other faults only switch the beam off).
_HV_CODES = frozenset((2, 3, 6))
CNV_FAULT_CODES = (1, 2, 3, 4, 5)


def substeps(dt_s: float) -> tuple[int, float]:
    """Number of equal steps of at most STEP_S covering dt_s, and their length."""
    if dt_s <= 0:
        return 0, 0.0
    # The small slack keeps 0.010 s from turning into 11 steps through float noise.
    n = max(1, math.ceil(dt_s / STEP_S - 1e-9))
    return n, dt_s / n


@dataclass
class Watchdog:
    """The PLCs' controller watchdog: armed by the first change of the value."""

    value: int = 0
    timeout_ms: int = 500
    armed: bool = False
    last_change_s: float = 0.0

    def write(self, value: int, t_s: float) -> None:
        """The controller wrote the watchdog register."""
        if value != self.value:
            self.value = value
            self.armed = True
            self.last_change_s = t_s

    def expired(self, t_s: float) -> bool:
        """True once the armed watchdog has not changed for timeout_ms."""
        if not self.armed or self.timeout_ms == 0:
            return False
        return t_s - self.last_change_s >= self.timeout_ms / 1000.0

    def disarm(self) -> None:
        """Wait for the next change before timing again (start, reset, trip)."""
        self.armed = False


# --------------------------------------------------------------------------- accelerator


@dataclass
class AcceleratorParams:
    """Dynamics of the accelerator (defaults: the reference ELV-class machine)."""

    hv_rise_s: float = 2.0
    ramp_ma_s: float = 15.0
    lag_s: float = 0.15
    ripple_frac: float = 0.005
    energy_noise_mev: float = 0.002
    scan_noise_cm: float = 0.05
    vacuum_pa: float = 1.0e-4
    vacuum_fault_pa: float = 5.0e-2
    vacuum_ok_below_pa: float = 1.0e-3


@dataclass
class AcceleratorCounters:
    """Initial counter values (engineering units)."""

    charge_total_uc: int = 0
    trip_count: int = 0
    clock_ms: int = 0


class AcceleratorModel:
    """Electron-beam accelerator behind the accelerator PLC."""

    def __init__(
        self,
        seed: int = 1,
        params: AcceleratorParams | None = None,
        counters: AcceleratorCounters | None = None,
        arc_rate_per_h: float = 0.0,
    ) -> None:
        self.p = params or AcceleratorParams()
        self.rng = random.Random(seed)
        self._arc_rng = random.Random(seed * 7919 + 1)
        self.t_s = 0.0
        self.arc_rate_per_h = arc_rate_per_h
        self._next_arc_in_s = self._draw_arc_interval()
        # Fault causes still present (code -> True); a latched fault needs them gone.
        self.causes: set[int] = set()
        self.restart(counters or AcceleratorCounters())

    # ------------------------------------------------------------------ lifecycle

    def restart(self, counters: AcceleratorCounters) -> None:
        """PLC restart: counters to new values, holding registers to defaults, outputs off."""
        # holding registers (engineering values)
        self.hv_on_req = False
        self.beam_on_req = False
        self.fault_reset_bit = False
        self.current_sp_ma = 0.0
        self.energy_sp_mev = 0.5
        self.scan_width_sp_cm = 20.0
        self.watchdog = Watchdog()
        # state
        self.hv_timer_s = 0.0
        self.hv_up = False
        self.beam_armed = False
        self.ramp_ma = 0.0
        self.lag_ma = 0.0
        self.current_ma = 0.0
        self.arc_left_s = 0.0
        self.fault_latched = False
        self.fault_code_latched = 0
        self.watchdog_trip = False
        self.charge_acc_uc = 0.0
        self.charge_init_uc = counters.charge_total_uc
        self.trips = counters.trip_count
        self.clock_init_ms = counters.clock_ms
        self.clock_base_s = self.t_s

    def set_defaults(self, energy_sp_mev: float, scan_width_sp_cm: float, timeout_ms: int) -> None:
        """Holding-register defaults from the register map (applied at start and restart)."""
        self.energy_sp_mev = energy_sp_mev
        self.scan_width_sp_cm = scan_width_sp_cm
        self.watchdog.timeout_ms = timeout_ms

    # ------------------------------------------------------------------ inputs

    def write_command(self, hv_on: bool, beam_on: bool, fault_reset: bool) -> None:
        """The command word: edges of BEAM_ON and FAULT_RESET act."""
        if fault_reset and not self.fault_reset_bit:
            self._fault_reset()
        if beam_on and not self.beam_on_req and not self.fault_latched:
            self.beam_armed = True
        if not beam_on:
            self.beam_armed = False
        if not hv_on:
            self.hv_timer_s = 0.0
            self.hv_up = False
        self.hv_on_req, self.beam_on_req, self.fault_reset_bit = hv_on, beam_on, fault_reset
        self._gate()

    def write_watchdog(self, value: int) -> None:
        """The controller's watchdog register."""
        self.watchdog.write(value, self.t_s)

    def write_watchdog_timeout(self, timeout_ms: int) -> None:
        """0 disables, otherwise 100..10000 ms (range checked by the plant)."""
        self.watchdog.timeout_ms = timeout_ms

    def _fault_reset(self) -> None:
        if self.causes:
            return  # the cause is still there: the reset does nothing
        self.fault_latched = False
        self.fault_code_latched = 0
        self.watchdog_trip = False
        self.watchdog.disarm()

    # ------------------------------------------------------------------ faults

    def arc(self, duration_s: float) -> bool:
        """A beam trip now; ignored (False) when the high voltage is not up."""
        if not self.hv_up:
            return False
        self.arc_left_s = max(self.arc_left_s, duration_s)
        self.trips = (self.trips + 1) % U16
        self._cut()
        return True

    def latch(self, code: int, persist: bool = False) -> None:
        """A latched fault (codes 2..7); `persist` keeps its cause until `clear_cause`."""
        if code not in ACC_LATCHED_CODES:
            raise ValueError(f"accelerator latched fault codes are 2..7, not {code}")
        if persist:
            self.causes.add(code)
        if code == 7:
            self.watchdog_trip = True
            self.watchdog.disarm()
        if not self.fault_latched:
            self.fault_code_latched = code
        self.fault_latched = True
        self.beam_armed = False
        self._cut()

    def clear_cause(self, code: int) -> None:
        """The cause of a persistent fault is gone (FAULT stays latched until reset)."""
        self.causes.discard(code)

    def _draw_arc_interval(self) -> float:
        if self.arc_rate_per_h <= 0:
            return math.inf
        return self._arc_rng.expovariate(self.arc_rate_per_h / 3600.0)

    def set_arc_rate(self, rate_per_h: float) -> None:
        """Random arcs while the beam is on (Poisson, seeded)."""
        self.arc_rate_per_h = rate_per_h
        self._next_arc_in_s = self._draw_arc_interval()

    # ------------------------------------------------------------------ outputs

    @property
    def safety_ok(self) -> bool:
        """Personnel safety chain closed."""
        return 6 not in self.causes

    @property
    def vacuum_pa(self) -> float:
        """Tube vacuum (no noise: it is a slow quantity)."""
        return self.p.vacuum_fault_pa if 3 in self.causes else self.p.vacuum_pa

    @property
    def vacuum_ok(self) -> bool:
        """Vacuum good enough for HV."""
        return self.vacuum_pa < self.p.vacuum_ok_below_pa

    @property
    def scan_ok(self) -> bool:
        """Scanner working."""
        return 4 not in self.causes

    @property
    def cooling_ok(self) -> bool:
        """Cooling working."""
        return 5 not in self.causes

    @property
    def ready(self) -> bool:
        """No latched fault and no fault cause present."""
        return not self.fault_latched and not self.causes

    @property
    def hv_allowed(self) -> bool:
        """HV may be (or stay) on: requested, and no HV, vacuum or safety fault."""
        if not self.hv_on_req or self.causes & _HV_CODES:
            return False
        return not (self.fault_latched and self.fault_code_latched in _HV_CODES)

    @property
    def beam_gate(self) -> bool:
        """Everything that must hold for beam (the arc aside)."""
        return (
            self.hv_on_req
            and self.beam_on_req
            and self.beam_armed
            and self.hv_up
            and self.ready
            and self.safety_ok
            and not self.watchdog_trip
        )

    @property
    def beam_on(self) -> bool:
        """Status BEAM_ON: the beam is switched on and not tripped."""
        return self.beam_gate and self.arc_left_s <= 0

    @property
    def fault_code(self) -> int:
        """Latched fault code, else 1 during an arc, else 0."""
        if self.fault_latched:
            return self.fault_code_latched
        return 1 if self.arc_left_s > 0 else 0

    @property
    def energy_mev(self) -> float:
        """Measured energy (0 without HV)."""
        if not self.hv_up:
            return 0.0
        return self.energy_sp_mev + self.rng.gauss(0.0, self.p.energy_noise_mev)

    @property
    def scan_width_cm(self) -> float:
        """Actual scan width (what the dose depends on)."""
        return self.scan_width_sp_cm if self.scan_ok else 0.0

    @property
    def scan_width_measured_cm(self) -> float:
        """Measured scan width, with a little noise."""
        return self.scan_width_cm + self.rng.gauss(0.0, self.p.scan_noise_cm)

    @property
    def charge_total_uc_float(self) -> float:
        """Unwrapped charge totalizer including its initial value, uC."""
        return self.charge_init_uc + self.charge_acc_uc

    @property
    def charge_total_uc(self) -> int:
        """Charge totalizer as the PLC exposes it (integer uC, wraps at 2^32)."""
        return math.floor(self.charge_total_uc_float) % U32

    @property
    def trip_count(self) -> int:
        """Beam trips since start (wraps at 2^16)."""
        return self.trips % U16

    @property
    def clock_ms_float(self) -> float:
        """Unwrapped PLC clock, ms."""
        return self.clock_init_ms + (self.t_s - self.clock_base_s) * 1000.0

    @property
    def clock_ms(self) -> int:
        """PLC clock (wraps at 2^32)."""
        return math.floor(self.clock_ms_float + 1e-6) % U32

    # ------------------------------------------------------------------ dynamics

    def _cut(self) -> None:
        # The beam is gated electrically: current drops at once.
        self.ramp_ma = 0.0
        self.lag_ma = 0.0
        self.current_ma = 0.0

    def _gate(self) -> None:
        if not self.beam_on:
            self._cut()

    def advance(self, dt_s: float) -> None:
        """Let dt_s pass."""
        n, h = substeps(dt_s)
        for _ in range(n):
            self.step(h)

    def advance_to(self, t_s: float) -> None:
        """Let time run up to t_s (no-op if in the past)."""
        self.advance(t_s - self.t_s)

    def step(self, h: float) -> float:
        """One integration step of h <= STEP_S seconds; returns the charge delivered, uC."""
        p = self.p
        self.t_s += h
        hv_allowed = self.hv_allowed
        if hv_allowed and not self.hv_up:
            self.hv_timer_s += h
            if self.hv_timer_s >= p.hv_rise_s:
                self.hv_up = True
        if not hv_allowed:
            self.hv_up = False
            self.hv_timer_s = 0.0
        if self.watchdog.expired(self.t_s):
            self.latch(7)
        if self.arc_left_s > 0:
            self.arc_left_s -= h
        if not self.beam_on:
            self._cut()
            return 0.0
        # random arcs only while the beam is on
        self._next_arc_in_s -= h
        if self._next_arc_in_s <= 0:
            self._next_arc_in_s = self._draw_arc_interval()
            self.arc(self._arc_rng.uniform(ARC_MIN_S, ARC_MAX_S))
            return 0.0
        sp = self.current_sp_ma
        dr = p.ramp_ma_s * h
        self.ramp_ma = (
            min(sp, self.ramp_ma + dr) if sp > self.ramp_ma else max(sp, self.ramp_ma - dr)
        )
        self.lag_ma += (self.ramp_ma - self.lag_ma) * (h / (p.lag_s + h))
        ripple = 0.0
        if p.ripple_frac > 0:
            # mostly a periodic component, a little white noise
            ripple = p.ripple_frac * (
                0.8 * math.sin(2 * math.pi * 3.1 * self.t_s) + 0.2 * self.rng.uniform(-1, 1)
            )
        self.current_ma = max(0.0, self.lag_ma * (1.0 + ripple))
        dq = self.current_ma * h * 1000.0  # 1 mA for 1 s = 1000 uC
        self.charge_acc_uc += dq
        return dq


# --------------------------------------------------------------------------- conveyor


@dataclass
class ConveyorParams:
    """Dynamics of the cable handling system."""

    tension_run_n: float = 80.0
    tension_idle_n: float = 50.0
    tension_noise_n: float = 1.5
    tension_fault_n: float = 260.0
    tension_min_n: float = 20.0
    tension_max_n: float = 200.0
    at_speed_band_m_min: float = 0.5
    quick_stop_s: float = 0.25
    """A cable break or e-stop brings the line to a standstill within this time."""


@dataclass
class ConveyorCounters:
    """Initial counter values (engineering units)."""

    length_mm: int = 0
    clock_ms: int = 0


@dataclass
class _QuickStop:
    rate_m_min_s: float = 0.0
    active: bool = False


class ConveyorModel:
    """Cable handling behind the conveyor PLC."""

    def __init__(
        self,
        seed: int = 1,
        params: ConveyorParams | None = None,
        counters: ConveyorCounters | None = None,
    ) -> None:
        self.p = params or ConveyorParams()
        self.rng = random.Random(seed * 104729 + 3)
        self.t_s = 0.0
        self.causes: set[int] = set()
        self.path_m = 0.0
        """True cable path moved since the model was created (never wraps, never resets)."""
        self.speed_m_min = 0.0
        self._quick = _QuickStop()
        self.restart(counters or ConveyorCounters())

    def restart(self, counters: ConveyorCounters) -> None:
        """PLC restart: counters to new values, holding registers to defaults, drive off."""
        self.run_req = False
        self.fault_reset_bit = False
        self.speed_sp_m_min = 0.0
        self.ramp_rate_m_min_s = 30.0
        self.watchdog = Watchdog()
        self.run_armed = False
        self.fault_latched = False
        self.fault_code_latched = 0
        self.watchdog_trip = False
        self.estop_latched = False
        self.cable_break_latched = False
        self.length_acc_mm = 0.0
        self.length_init_mm = counters.length_mm
        self.clock_init_ms = counters.clock_ms
        self.clock_base_s = self.t_s
        if self.speed_m_min > 0:
            # The drives lose power: the brakes stop the line quickly.
            self._quick = _QuickStop(self.speed_m_min / self.p.quick_stop_s, True)

    def set_defaults(self, ramp_rate_m_min_s: float, timeout_ms: int) -> None:
        """Holding-register defaults from the register map."""
        self.ramp_rate_m_min_s = ramp_rate_m_min_s
        self.watchdog.timeout_ms = timeout_ms

    # ------------------------------------------------------------------ inputs

    def write_command(self, run: bool, fault_reset: bool) -> None:
        """The command word: RUN and FAULT_RESET act on 0->1 edges."""
        if fault_reset and not self.fault_reset_bit:
            self._fault_reset()
        if run and not self.run_req and not self.fault_latched:
            self.run_armed = True
        if not run:
            self.run_armed = False
        self.run_req, self.fault_reset_bit = run, fault_reset

    def write_watchdog(self, value: int) -> None:
        """The controller's watchdog register."""
        self.watchdog.write(value, self.t_s)

    def write_watchdog_timeout(self, timeout_ms: int) -> None:
        """0 disables, otherwise 100..10000 ms."""
        self.watchdog.timeout_ms = timeout_ms

    def _fault_reset(self) -> None:
        if self.causes:
            return
        self.fault_latched = False
        self.fault_code_latched = 0
        self.watchdog_trip = False
        self.estop_latched = False
        self.cable_break_latched = False
        self.watchdog.disarm()

    # ------------------------------------------------------------------ faults

    def fault(self, code: int, persist: bool = False) -> None:
        """Fault 1 drive, 2 cable break, 3 tension, 4 e-stop, 5 watchdog (all latch)."""
        if code not in CNV_FAULT_CODES:
            raise ValueError(f"conveyor fault codes are 1..5, not {code}")
        if persist:
            self.causes.add(code)
        if code == 5:
            self.watchdog_trip = True
            self.watchdog.disarm()
        if code == 4:
            self.estop_latched = True
        if code == 2:
            self.cable_break_latched = True
        if code in (2, 4) and self.speed_m_min > 0:
            rate = self.speed_m_min / self.p.quick_stop_s
            if not self._quick.active or rate > self._quick.rate_m_min_s:
                self._quick = _QuickStop(rate, True)
        if not self.fault_latched:
            self.fault_code_latched = code
        self.fault_latched = True
        self.run_armed = False

    def clear_cause(self, code: int) -> None:
        """The cause of a persistent fault is gone."""
        self.causes.discard(code)

    # ------------------------------------------------------------------ outputs

    @property
    def ready(self) -> bool:
        """No latched fault and no fault cause."""
        return not self.fault_latched and not self.causes

    @property
    def drive_on(self) -> bool:
        """The drive is commanded to run."""
        return self.run_req and self.run_armed and self.ready

    @property
    def running(self) -> bool:
        """The line moves."""
        return self.speed_m_min > 1e-6

    @property
    def at_speed(self) -> bool:
        """Within the band of the set-point while the drive runs."""
        return self.drive_on and (
            abs(self.speed_m_min - self.speed_sp_m_min) <= self.p.at_speed_band_m_min
        )

    @property
    def tension_n(self) -> float:
        """Cable tension."""
        if self.cable_break_latched or 2 in self.causes:
            return 0.0
        if self.fault_code_latched == 3 or 3 in self.causes:
            return self.p.tension_fault_n
        base = self.p.tension_run_n if self.running or self.drive_on else self.p.tension_idle_n
        return base + self.rng.gauss(0.0, self.p.tension_noise_n)

    @property
    def tension_ok(self) -> bool:
        """Tension within its window (evaluated on the noiseless value)."""
        if self.cable_break_latched or 2 in self.causes:
            return False
        return not (self.fault_code_latched == 3 or 3 in self.causes)

    @property
    def fault_code(self) -> int:
        """Latched fault code or 0."""
        return self.fault_code_latched if self.fault_latched else 0

    @property
    def estop(self) -> bool:
        """Emergency stop active or latched."""
        return self.estop_latched or 4 in self.causes

    @property
    def cable_break(self) -> bool:
        """Cable break detected (latched)."""
        return self.cable_break_latched or 2 in self.causes

    @property
    def length_mm_float(self) -> float:
        """Unwrapped length counter including its initial value, mm."""
        return self.length_init_mm + self.length_acc_mm

    @property
    def length_mm(self) -> int:
        """Length counter as exposed (integer mm, wraps at 2^32)."""
        return math.floor(self.length_mm_float) % U32

    @property
    def clock_ms_float(self) -> float:
        """Unwrapped PLC clock, ms."""
        return self.clock_init_ms + (self.t_s - self.clock_base_s) * 1000.0

    @property
    def clock_ms(self) -> int:
        """PLC clock (wraps at 2^32)."""
        return math.floor(self.clock_ms_float + 1e-6) % U32

    # ------------------------------------------------------------------ dynamics

    def advance(self, dt_s: float) -> None:
        """Let dt_s pass."""
        n, h = substeps(dt_s)
        for _ in range(n):
            self.step(h)

    def advance_to(self, t_s: float) -> None:
        """Let time run up to t_s."""
        self.advance(t_s - self.t_s)

    def step(self, h: float) -> float:
        """One step of h <= STEP_S seconds; returns the cable path moved, m."""
        self.t_s += h
        if self.watchdog.expired(self.t_s):
            self.fault(5)
        v0 = self.speed_m_min
        if self._quick.active:
            v1 = max(0.0, v0 - self._quick.rate_m_min_s * h)
            if v1 == 0.0:
                self._quick.active = False
        else:
            target = self.speed_sp_m_min if self.drive_on else 0.0
            dv = self.ramp_rate_m_min_s * h
            v1 = min(target, v0 + dv) if target > v0 else max(target, v0 - dv)
        self.speed_m_min = v1
        # trapezoidal: exact for the piecewise-linear speed profile
        dx_m = (v0 + v1) * 0.5 / 60.0 * h
        self.path_m += dx_m
        self.length_acc_mm += dx_m * 1000.0
        return dx_m
