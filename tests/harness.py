"""Closed loop on simulated time: linectl's own per-cycle code (linectl.core.line, the
code the daemon runs each cycle) stepped together with the simulators' pure plant
physics, through the register map and codec (no sockets). Used by the fast closed-loop
tests and by the dose-accuracy benchmark.

The plant's ground truth is independent of the controller's code: the simulators never
import it, so agreement between the two means something.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from linectl.codec import decode, encode
from linectl.commands import Command, CommandName
from linectl.config import ControlTuning, Geometry, LoadedConfig, PlcName, Recipe, RegisterMap
from linectl.core.control import Alarm, CommandRefused, Controller, LineState, Outputs, Transition
from linectl.core.ledger import DoseLedger, MetreRecord, Verdict
from linectl.core.line import LEDGER_STATE, AddMetres, Audit, CycleInput, Effect, Line
from linectl.quality import Quality, Sample
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


@dataclass(frozen=True, slots=True)
class SimReading:
    """One poll of a simulated PLC, as linectl.core.line.PlcReading: every input field
    decoded from the plant's register image, stamped with the simulated time and the
    PLC's own clock register (as a real link does)."""

    seq: int
    host_time_s: float
    values: dict[str, float | int]
    plc_clock_ms: int | None

    @property
    def ok(self) -> bool:
        return True

    def get(self, name: str) -> Sample:
        return Sample(self.values[name], Quality.GOOD, self.plc_clock_ms, self.host_time_s)

    def value(self, name: str) -> float | int | None:
        return self.values.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)


@dataclass
class ClosedLoop:
    """One line: plant physics and linectl's own per-cycle code (linectl.core.line: the
    controller, the counter aligner on PLC clocks, the ledger, reel start and
    checkpoints); time advances by control cycles. Store jobs are kept, not run."""

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
        line_cfg = copy.copy(self.cfg)
        line_cfg.line = self.cfg.line.model_copy(update={"geometry": self.geometry})
        self.line = Line(line_cfg, self.recipe, "0" * 64, "test", tuning=self.tuning)
        self.units = self.line.units
        self.t_s = 0.0
        self.records: list[MetreRecord] = []
        self.transitions: list[Transition] = []
        self.alarms: list[Alarm] = []
        self.effects: list[Effect] = []
        self.ledger_events: list[str] = []
        """The kinds of the ledger's interval events (audited as "interval")."""
        self.acc_link_up = True  # False: the controller gets no acc data and cannot write
        self.cnv_link_up = True
        self.finished = False
        self.max_beam_standstill_s = 0.0
        self._standstill_s = 0.0
        self._seq = 0
        self._last: dict[str, SimReading] = {}
        self._last_ledger: DoseLedger | None = None
        self.out = Outputs()
        # Each PLC as the controller found it at its start (CycleInput.acc_first).
        self._first: dict[str, SimReading | None] = {
            "accelerator": self.found("accelerator"),
            "conveyor": self.found("conveyor"),
        }

    @property
    def ctl(self) -> Controller:
        return self.line.ctl

    @property
    def ledger(self) -> DoseLedger | None:
        """The reel's ledger (the last one, once the reel is closed)."""
        return self.line.ledger or self._last_ledger

    # ------------------------------------------------------------------ one cycle

    def _read(self, plc: PlcName, rmap: RegisterMap, up: bool) -> SimReading | None:
        """This cycle's reading, or the last one (ageing) while the link is down."""
        if up:
            self._seq += 1
            values = decode_inputs(rmap, self.plant.input_registers(plc))
            clock = values.get("clock")
            self._last[plc] = SimReading(
                self._seq, self.t_s, values, None if clock is None else int(clock)
            )
        return self._last.get(plc)

    def cycle(self) -> Outputs:
        """Advance the plant one cycle, then run linectl's cycle on what it reads."""
        self.t_s += self.cycle_s
        self.plant.advance_to(self.t_s)
        amap, cmap = self.cfg.accelerator_map, self.cfg.conveyor_map
        report = self.line.cycle(
            CycleInput(
                t_s=self.t_s,
                wall=f"t+{self.t_s:.3f}s",
                wall_ms=round(self.t_s * 1000.0),
                acc=self._read("accelerator", amap, self.acc_link_up),
                cnv=self._read("conveyor", cmap, self.cnv_link_up),
                acc_fresh=self.acc_link_up,
                cnv_fresh=self.cnv_link_up,
                acc_first=self._first["accelerator"],
                cnv_first=self._first["conveyor"],
            )
        )
        self.transitions += report.transitions
        self.alarms += report.alarms
        self.effects += report.effects
        self.ledger_events += [
            str(e.detail["kind"])
            for e in report.effects
            if isinstance(e, Audit) and e.action == "interval"
        ]
        for _reel, batch in report.metres:
            self.records += batch
        if report.reel_started is not None:
            self.plant.start_reel(report.reel_started[1])
        if report.finished_reel is not None:
            self.finished = True
        if self.line.ledger is not None:
            self._last_ledger = self.line.ledger
        if self.acc_link_up:
            self._write("accelerator", amap, report.acc_writes)
        if self.cnv_link_up:
            self._write("conveyor", cmap, report.cnv_writes)
        self._watch_burn()
        self.out = report.outputs
        return report.outputs

    def _write(self, plc: str, rmap: RegisterMap, values: Mapping[str, float | int]) -> None:
        for name, value in values.items():
            f = rmap.field(name)
            code = self.plant.write_holding(plc, f.address, encode(f, value))
            assert code is None, f"{plc} refused {name} = {value}: exception {code}"

    def _watch_burn(self, dt_s: float | None = None) -> None:
        beam = self.plant.accelerator.beam_on
        moving = self.plant.conveyor.running and self.plant.conveyor.speed_m_min > 0.01
        dt_s = self.cycle_s if dt_s is None else dt_s
        self._standstill_s = self._standstill_s + dt_s if beam and not moving else 0.0
        self.max_beam_standstill_s = max(self.max_beam_standstill_s, self._standstill_s)

    def last_checkpoint(self) -> dict[str, Any] | None:
        """The ledger checkpoint the store would hold now, as it would read it back."""
        for e in reversed(self.effects):
            if isinstance(e, AddMetres):
                return dict(json.loads(json.dumps(e.checkpoint[LEDGER_STATE])))
        return None

    def found(self, plc: PlcName) -> SimReading:
        """One poll of every field, holding registers included: the PLC as a controller
        finds it when it connects (modbus.link's first_snapshot)."""
        self._seq += 1
        rmap = self.plant.register_map(plc)
        values = decode_inputs(rmap, self.plant.input_registers(plc))
        holding = self.plant.holding_registers(plc)
        for f in rmap.by_table["holding"]:
            values[f.name] = decode(f, [holding[a] for a in range(f.address, f.end)])
        clock = values.get("clock")
        return SimReading(self._seq, self.t_s, values, None if clock is None else int(clock))

    def crash_for(self, seconds: float, step_s: float = 0.01) -> None:
        """linectl dies (SIGKILL): no cycle, no write, no checkpoint for this long; the
        PLCs go on alone on what they were last told, until their watchdogs act."""
        for _ in range(round(seconds / step_s)):
            self.t_s += step_s
            self.plant.advance_to(self.t_s)
            self._watch_burn(step_s)

    def restart_controller(self, *, resume: bool = True, found: bool = True) -> None:
        """linectl restarts (the PLCs do not): a new Line takes up the open reel from the
        last checkpoint, as the daemon does from its store at start-up; it finds the PLCs
        as they are now (found=False: as if their first poll had not been complete)."""
        reel = self.line.ctl.reel
        assert reel is not None, "no reel to take up"
        ckpt = self.last_checkpoint()
        line = Line(self.line.cfg, self.recipe, "0" * 64, "test", tuning=self.tuning)
        line.restore_interrupted(reel.plan, self.recipe, "0" * 64, ckpt)
        if resume:
            line.request_resume("test")
        self.line = line
        self._last_ledger = None
        self._first = {
            "accelerator": self.found("accelerator") if found else None,
            "conveyor": self.found("conveyor") if found else None,
        }

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
        """Start (or resume) a reel from READY, as an operator's start_reel does;
        CommandRefused with the line's reason when it is refused."""
        cmd = Command(CommandName.START_REEL, "test", reel_id=reel_id, length_m=length_m)
        result = self.line.command(cmd)
        if not result.ack:
            raise CommandRefused(result.reason)

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
