"""Closed loop on simulated time: the pure controller and dose ledger stepped together
with the simulators' pure plant physics, through the register map and codec (no
sockets). Used by the fast closed-loop tests and by the dose-accuracy benchmark.

The plant's ground truth is independent of the controller's code: the simulators never
import it, so agreement between the two means something.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from linectl.codec import decode, encode
from linectl.config import ControlTuning, Geometry, LoadedConfig, Recipe, RegisterMap
from linectl.core.control import (
    Alarm,
    Controller,
    LineState,
    Outputs,
    ReelPlan,
    Transition,
)
from linectl.core.ledger import DoseLedger, MetreRecord, Verdict
from linectl.core.views import CounterUnits, acc_view, acc_writes, cnv_view, cnv_writes
from simulators.plant import Plant

# A compact line for fast tests: 16 passes within 8.5 m of cable path.
COMPACT = Geometry(passes=16, pass_spacing_m=0.5, first_pass_offset_m=1.0)


def decode_inputs(rmap: RegisterMap, regs: dict[int, int]) -> dict[str, float | int]:
    """Every input field's value from a register image."""
    return {
        f.name: decode(f, [regs[a] for a in range(f.address, f.end)])
        for f in rmap.fields.values()
        if f.table == "input"
    }


@dataclass
class Comparison:
    """Ledger against ground truth over the final metres of one reel."""

    metres: int
    in_spec: int
    false_accepts: list[int]
    false_rejects: list[int]
    # (ledger - truth) / target, measured metres (no "gap" cause, not unproven)
    errors_pct: list[float]
    verdicts: dict[str, int]
    outside_bounds: list[int]  # "gap" metres whose true dose is outside their bounds

    @property
    def rms_pct(self) -> float:
        """RMS dose error, % of target."""
        e = self.errors_pct
        return math.sqrt(sum(x * x for x in e) / len(e)) if e else 0.0

    @property
    def max_pct(self) -> float:
        """Largest absolute dose error, % of target."""
        return max((abs(x) for x in self.errors_pct), default=0.0)

    @property
    def p99_pct(self) -> float:
        """99th percentile of the absolute dose error, % of target."""
        e = sorted(abs(x) for x in self.errors_pct)
        if len(e) < 2:
            return e[0] if e else 0.0
        return statistics.quantiles(e, n=100, method="inclusive")[98]


@dataclass
class ClosedLoop:
    """One line: plant physics, controller, ledger; time advances by control cycles."""

    cfg: LoadedConfig
    recipe: Recipe
    geometry: Geometry = COMPACT
    seed: int = 1
    cycle_s: float = 0.05
    tuning: ControlTuning = field(default_factory=ControlTuning)
    acc_counters: dict[str, int] | None = None
    cnv_counters: dict[str, int] | None = None
    arc_rate_per_h: float = 0.0

    def __post_init__(self) -> None:
        self.plant = Plant(
            self.cfg.accelerator_map,
            self.cfg.conveyor_map,
            self.geometry,
            seed=self.seed,
            k_dose_true=self.recipe.k_dose,
            acc_counters=self.acc_counters,
            cnv_counters=self.cnv_counters,
            arc_rate_per_h=self.arc_rate_per_h,
        )
        self.ctl = Controller(self.recipe, self.geometry, self.tuning)
        self.units = CounterUnits.from_maps(self.cfg.accelerator_map, self.cfg.conveyor_map)
        self.t_s = 0.0
        self.ledger: DoseLedger | None = None
        self.records: list[MetreRecord] = []
        self.transitions: list[Transition] = []
        self.alarms: list[Alarm] = []
        self.acc_link_up = True  # False: the controller gets no acc data and cannot write
        self.cnv_link_up = True
        self.finished = False
        self.max_beam_standstill_s = 0.0
        self._standstill_s = 0.0
        self.out = Outputs()

    # ------------------------------------------------------------------ one cycle

    def cycle(self) -> Outputs:
        """Advance the plant one cycle, then run the controller on what it reads."""
        self.t_s += self.cycle_s
        self.plant.advance_to(self.t_s)
        amap, cmap = self.cfg.accelerator_map, self.cfg.conveyor_map
        acc_vals = decode_inputs(amap, self.plant.input_registers("accelerator"))
        cnv_vals = decode_inputs(cmap, self.plant.input_registers("conveyor"))
        acc = acc_view(acc_vals, amap, ok=self.acc_link_up)
        cnv = cnv_view(cnv_vals, cmap, ok=self.cnv_link_up)
        pos = None
        if self.ledger is not None and self.ledger.position_m is not None:
            # As the service does: the planned end waits out any position uncertainty.
            pos = self.ledger.position_m - self.ledger.position_uncertainty_m
        out = self.ctl.step(self.t_s, acc, cnv, pos)
        transitions, alarms = self.ctl.take_events()
        self.transitions += transitions
        self.alarms += alarms
        energy_ok = not acc.beam_on or abs(acc.energy_mev - self.recipe.energy_mev) <= (
            self.recipe.energy_tolerance_mev
        )
        sample = self.units.sample(
            self.t_s,
            acc_vals,
            cnv_vals,
            acc_ok=self.acc_link_up,
            cnv_ok=self.cnv_link_up,
            energy_ok=energy_ok,
        )
        reel = self.ctl.reel
        if self.ledger is None and reel is not None and reel.started:
            self.ledger = DoseLedger(
                self.geometry,
                self.recipe,
                charge_modulus_uc=self.units.charge_modulus_uc,
                length_modulus_m=self.units.length_modulus_m,
                planned_length_m=reel.plan.planned_length_m,
            )
            assert sample.length_m is not None
            self.ledger.start(sample)
            self.plant.start_reel(sample.length_m)
        elif self.ledger is not None and not self.finished:
            self.records += self.ledger.update(sample)
            if reel is not None and reel.complete and self.ctl.state is LineState.IDLE:
                self.records += self.ledger.finish()
                self.finished = True
        if self.acc_link_up:
            self._write("accelerator", amap, acc_writes(out, amap))
        if self.cnv_link_up:
            self._write("conveyor", cmap, cnv_writes(out, cmap))
        self._watch_burn()
        self.out = out
        return out

    def _write(self, plc: str, rmap: RegisterMap, values: dict[str, float | int]) -> None:
        for name, value in values.items():
            f = rmap.field(name)
            code = self.plant.write_holding(plc, f.address, encode(f, value))  # type: ignore[arg-type]
            assert code is None, f"{plc} refused {name} = {value}: exception {code}"

    def _watch_burn(self) -> None:
        beam = self.plant.accelerator.beam_on
        moving = self.plant.conveyor.running and self.plant.conveyor.speed_m_min > 0.01
        self._standstill_s = self._standstill_s + self.cycle_s if beam and not moving else 0.0
        self.max_beam_standstill_s = max(self.max_beam_standstill_s, self._standstill_s)

    # ------------------------------------------------------------------ driving

    def run_for(self, seconds: float) -> None:
        """Run cycles for this long."""
        for _ in range(round(seconds / self.cycle_s)):
            self.cycle()

    def run_until(self, done: object, max_s: float) -> bool:
        """Run until `done()` is true; False if max_s passed first."""
        assert callable(done)
        for _ in range(round(max_s / self.cycle_s)):
            self.cycle()
            if done():
                return True
        return False

    def settle(self, max_s: float = 5.0) -> None:
        """Run until the line is READY."""
        ok = self.run_until(lambda: self.ctl.state is LineState.READY, max_s)
        assert ok, f"line not READY: {self.ctl.state} {self.ctl.why_not_ready()}"

    def start(self, reel_id: str = "R1", length_m: float = 200.0) -> None:
        """Start (or resume) a reel from READY."""
        self.ctl.request_start(ReelPlan(reel_id, length_m, "test"))

    def run_reel(self, length_m: float = 200.0, max_s: float = 900.0) -> None:
        """Settle, start a reel and run it to its planned end."""
        self.settle()
        self.start(length_m=length_m)
        ok = self.run_until(lambda: self.finished, max_s)
        assert ok, f"reel did not finish: state {self.ctl.state}, alarms {self.ctl.alarms}"

    # ------------------------------------------------------------------ checking

    def compare(self) -> Comparison:
        """Every final metre of the ledger against the plant's true dose."""
        r = self.recipe
        fa, fr, errs, outside = [], [], [], []
        verdicts: dict[str, int] = {}
        for rec in self.records:
            verdicts[rec.verdict.value] = verdicts.get(rec.verdict.value, 0) + 1
            true = self.plant.truth.dose_kgy(rec.index)
            truly_in = r.min_dose_kgy <= true <= r.max_dose_kgy
            if rec.in_spec and not truly_in:
                fa.append(rec.index)
            if not rec.in_spec and truly_in and rec.verdict is not Verdict.UNPROVEN:
                fr.append(rec.index)
            if "gap" in rec.causes:
                # A data gap touched it: its dose is an estimate, its bounds are the
                # promise, and they hold its bins' bounds, so its mean true dose.
                if not rec.min_dose_kgy <= true <= rec.max_dose_kgy:
                    outside.append(rec.index)
            elif rec.verdict is not Verdict.UNPROVEN:
                errs.append(100.0 * (rec.dose_kgy - true) / r.target_dose_kgy)
        return Comparison(
            metres=len(self.records),
            in_spec=sum(rec.in_spec for rec in self.records),
            false_accepts=fa,
            false_rejects=fr,
            errors_pct=errs,
            verdicts=verdicts,
            outside_bounds=outside,
        )
