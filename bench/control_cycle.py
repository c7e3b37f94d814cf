"""Control-cycle timing and controller CPU at 20, 50 and 100 Hz.

Runs the real LineService (linectl/service.py) over Modbus TCP against the bundled
simulators, with a reel running: the line is RUNNING, the dose ledger accounts every
cycle and the record store writes metres and checkpoints. The simulators run in their
own process (`python -m simulators`, what `linectl sim` runs), so the CPU time of this
process is the controller's alone: links, controller, ledger, store thread (and this
script's cycle observer, a list append). The compact test line and fast recipe of the
test suite (tests/e2e_scenarios.py) are used so the reel starts within seconds; only
`cycle_period_s` changes between rates (re-validated: watchdog >= 3 cycles,
acc_lost_hold_s > watchdog + 2 cycles).

For each round (`--rounds`, default 3) and each rate, in that order so that drift in the
machine's load hits every rate alike: a fresh simulator process and service, the reel
started, then `--seconds` (default 20) measured from the start of dose accounting. Per
cycle the service records (svc.stats, CycleStats):

  - duration: poll both PLCs, step the controller, write both PLCs, account the dose;
  - lateness: how much later than scheduled the cycle started (the event loop's wake-up
    and whatever else ran in the loop meanwhile);
  - missed: cycles skipped because one overran by more than a period.

After each session an empty asyncio loop, scheduled the same way, runs `--baseline-s`
(default 5) at the same rate: its lateness is the platform's share (the host's load and
the event loop's timer, which waits in whole milliseconds) beside the service's.

Printed per rate: p50/p99/max of duration and lateness pooled over the rounds, the median
of the per-round p99s, missed cycles, CPU in % of one core (process CPU time over the
measured wall time) for the controller and, for comparison, the simulator process, and
the empty loop's lateness. Goal: at 100 Hz, p99 lateness <= 2 ms (held against the
median of the rounds' p99s; the pooled p99 is shown beside it).

    .venv/bin/python bench/control_cycle.py [--rates 20,50,100] [--rounds 3]
        [--seconds 20] [--baseline-s 5] [--json FILE]

`--smoke`: 100 Hz only, one round of 1 s (used by the test suite so the script never
rots). The machine's load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the compact line is the tests'
sys.path.insert(0, str(ROOT / "bench"))  # benchlib

import e2e_scenarios as sc  # noqa: E402
from benchlib import host_facts, pct  # noqa: E402

from linectl.config import LineConfig, LoadedConfig, Recipe, load_config  # noqa: E402
from linectl.core.control import LineState  # noqa: E402
from linectl.service import LineService, ReelRequest, select_recipe  # noqa: E402

DEFAULT_RATES_HZ = (20, 50, 100)
GOAL_RATE_HZ = 100
GOAL_P99_LATENESS_MS = 2.0

_UP = re.compile(r"simulated line \S+ up: accelerator :(\d+), conveyor :(\d+)")


# ---------------------------------------------------------------------- the simulators


def proc_cpu_s(pid: int) -> float | None:
    """CPU time (user + system, s) of another process, from /proc; None where there is
    no /proc (the figure is then left out)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which is in parentheses and may hold spaces):
    # state is field 3, utime field 14, stime field 15.
    rest = text.rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class SimProcess:
    """The simulators' CLI (`python -m simulators`, what `linectl sim` runs) on free
    ports, in its own process."""

    config_dir: Path
    seed: int = 1
    acc_port: int = 0
    cnv_port: int = 0
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    _proc: asyncio.subprocess.Process | None = None
    _drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start it; return once both servers listen (ports read from its log)."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "simulators",  # `linectl sim` runs the same, but ignores --log-level
            "--config",
            str(self.config_dir),
            "--acc-port",
            "0",
            "--cnv-port",
            "0",
            "--seed",
            str(self.seed),
            "--k-dose",
            str(sc.TRUE_K),
            "--log-level",
            "INFO",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await asyncio.wait_for(self._wait_up(), timeout_s)
        except (TimeoutError, EOFError):
            await self.stop()
            raise RuntimeError(
                "the simulator process did not come up; its log ends:\n" + "\n".join(self.log_tail)
            ) from None
        self._drain = asyncio.create_task(self._read_rest(), name="bench-sim-log")

    async def _wait_up(self) -> None:
        assert self._proc is not None
        assert self._proc.stderr is not None
        while True:
            line = await self._proc.stderr.readline()
            if not line:
                raise EOFError
            text = line.decode(errors="replace").rstrip()
            self.log_tail.append(text)
            m = _UP.search(text)
            if m:
                self.acc_port, self.cnv_port = int(m[1]), int(m[2])
                return

    async def _read_rest(self) -> None:
        # Keep reading so that the simulator never blocks on a full pipe.
        assert self._proc is not None
        assert self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            self.log_tail.append(line.decode(errors="replace").rstrip())

    async def stop(self) -> None:
        """SIGTERM (it stops cleanly), SIGKILL if it does not within 5 s."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._drain, 5.0)


# ---------------------------------------------------------------------- the line


def with_period(cfg: LoadedConfig, period_s: float) -> LineConfig:
    """The line configuration at another cycle period, validated again (model_copy alone
    skips LineConfig's validators)."""
    line = cfg.line.model_copy(update={"cycle_period_s": period_s})
    return LineConfig.model_validate(line.model_dump())


def speed_limit_m_min(cfg: LoadedConfig, recipe: Recipe) -> float:
    """The steady line speed: what the recipe's maximum beam current allows."""
    return recipe.max_speed_m_min(cfg.line.geometry.weight_sum)


@dataclass
class CycleRecorder:
    """Observer: while `active`, the timing of every cycle (read from svc.stats right
    after the service recorded it) and how many cycles were not RUNNING."""

    active: bool = False
    duration_s: list[float] = field(default_factory=list)
    lateness_s: list[float] = field(default_factory=list)
    not_running: int = 0

    def __call__(self, svc: LineService) -> None:
        if self.active:
            self.duration_s.append(svc.stats.duration_s[-1])
            self.lateness_s.append(svc.stats.lateness_s[-1])
            self.not_running += svc.ctl.state is not LineState.RUNNING


async def wait_running(svc: LineService, timeout_s: float) -> None:
    """Until the reel runs with dose accounting started; TimeoutError saying where the line
    stands."""
    try:
        await sc.wait_for(
            lambda: svc.ctl.state is LineState.RUNNING and svc.ledger is not None,
            timeout_s,
            "the reel to run",
        )
    except TimeoutError:
        raise TimeoutError(
            f"the reel did not start within {timeout_s:g} s: line {svc.ctl.state.value}, "
            f"alarms {sorted(svc.ctl.alarms)}, {svc.ctl.why_not_ready()!r}"
        ) from None


async def session(rate_hz: float, seconds: float, workdir: Path, seed: int) -> dict[str, Any]:
    """One rate, one round: fresh simulators and service, `seconds` measured while the
    reel runs. Returns the round's raw timings and its figures."""
    cfg = load_config(sc.compact_config(workdir), environ={})
    cfg.line = with_period(cfg, 1.0 / rate_hz)
    recipe, recipe_path = select_recipe(cfg, None)
    # Long enough that the reel is still running when the measurement ends.
    length_m = round(speed_limit_m_min(cfg, recipe) / 60.0 * (seconds + 60.0) * 1.5 + 20.0)
    sim = SimProcess(cfg.directory, seed=seed)
    await sim.start()
    try:
        acc_endpoint = cfg.line.accelerator.model_copy(update={"port": sim.acc_port})
        cnv_endpoint = cfg.line.conveyor.model_copy(update={"port": sim.cnv_port})
        svc = LineService(
            cfg, recipe, recipe_path, acc_endpoint=acc_endpoint, cnv_endpoint=cnv_endpoint
        )
        rec = CycleRecorder()
        svc.observers.append(rec)
        svc.request_reel(ReelRequest("CYCLE-1", length_m, "bench"))
        task = asyncio.create_task(svc.run(), name=f"bench-line-{rate_hz:g}Hz")
        try:
            await wait_running(svc, 60.0)
            missed0, records0 = svc.stats.missed, svc.records_written
            sim_cpu0 = proc_cpu_s(sim.pid)
            rec.active = True
            wall0, cpu0 = time.perf_counter(), time.process_time()
            await asyncio.sleep(seconds)
            wall1, cpu1 = time.perf_counter(), time.process_time()
            rec.active = False
            sim_cpu1 = proc_cpu_s(sim.pid)
            if task.done():
                task.result()  # the service ended early: say why
                raise RuntimeError("the line service returned before the measurement ended")
            wall_s = wall1 - wall0
            sim_cpu_pct = (
                None
                if sim_cpu0 is None or sim_cpu1 is None
                else 100.0 * (sim_cpu1 - sim_cpu0) / wall_s
            )
            return {
                "rate_hz": rate_hz,
                "wall_s": wall_s,
                "cycles": len(rec.duration_s),
                "expected_cycles": wall_s * rate_hz,
                "cycles_not_running": rec.not_running,
                "missed": svc.stats.missed - missed0,
                "metres_recorded": svc.records_written - records0,
                "cpu_pct": 100.0 * (cpu1 - cpu0) / wall_s,
                "cpu_ms_per_cycle": 1000.0 * (cpu1 - cpu0) / max(1, len(rec.duration_s)),
                "sim_cpu_pct": sim_cpu_pct,
                "duration_s": rec.duration_s,
                "lateness_s": rec.lateness_s,
            }
        finally:
            svc.stop()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 90.0)
    finally:
        await sim.stop()


# ---------------------------------------------------------------------- figures


def _ms(x: float) -> float | None:
    return None if math.isnan(x) else round(x * 1000.0, 3)


def _stats_ms(xs: list[float]) -> dict[str, float | None]:
    return {"p50_ms": _ms(pct(xs, 50)), "p99_ms": _ms(pct(xs, 99)), "max_ms": _ms(pct(xs, 100))}


def summarise(rate_hz: float, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled and per-round figures of one rate."""
    durations = [x for r in rounds for x in r["duration_s"]]
    lateness = [x for r in rounds for x in r["lateness_s"]]
    bare = [x for r in rounds for x in r["bare_lateness_s"]]
    per_round = [
        {
            "round": i + 1,
            "cycles": r["cycles"],
            "expected_cycles": round(r["expected_cycles"], 1),
            "cycles_not_running": r["cycles_not_running"],
            "missed": r["missed"],
            "metres_recorded": r["metres_recorded"],
            "duration": _stats_ms(r["duration_s"]),
            "lateness": _stats_ms(r["lateness_s"]),
            "bare_loop_lateness": _stats_ms(r["bare_lateness_s"]),
            "cpu_pct": round(r["cpu_pct"], 2),
            "cpu_ms_per_cycle": round(r["cpu_ms_per_cycle"], 3),
            "sim_cpu_pct": None if r["sim_cpu_pct"] is None else round(r["sim_cpu_pct"], 2),
        }
        for i, r in enumerate(rounds)
    ]

    def median_of(key: str, fig: str) -> float | None:
        vals = [p[key][fig] for p in per_round if p[key][fig] is not None]
        return round(statistics.median(vals), 3) if vals else None

    sim_cpu = [p["sim_cpu_pct"] for p in per_round if p["sim_cpu_pct"] is not None]
    return {
        "rate_hz": rate_hz,
        "period_s": 1.0 / rate_hz,
        "rounds": per_round,
        "cycles": len(durations),
        "cycles_not_running": sum(r["cycles_not_running"] for r in rounds),
        "missed": sum(r["missed"] for r in rounds),
        "metres_recorded": sum(r["metres_recorded"] for r in rounds),
        "duration": _stats_ms(durations),
        "lateness": _stats_ms(lateness),
        "bare_loop_lateness": _stats_ms(bare),
        "duration_p99_ms_median_of_rounds": median_of("duration", "p99_ms"),
        "lateness_p99_ms_median_of_rounds": median_of("lateness", "p99_ms"),
        "cpu_pct_median": round(statistics.median(p["cpu_pct"] for p in per_round), 2),
        "cpu_ms_per_cycle_median": round(
            statistics.median(p["cpu_ms_per_cycle"] for p in per_round), 3
        ),
        "sim_cpu_pct_median": round(statistics.median(sim_cpu), 2) if sim_cpu else None,
    }


# ---------------------------------------------------------------------- the run


async def bare_loop(rate_hz: float, seconds: float) -> list[float]:
    """Lateness (s) of an empty asyncio loop scheduled as the service schedules its cycles:
    what the host and the event loop's timer cost before any control work."""
    period = 1.0 / rate_hz
    out: list[float] = []
    next_t = t_end = time.monotonic()
    t_end += seconds
    while next_t < t_end:
        await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        out.append(max(0.0, time.monotonic() - next_t))
        next_t += period
    return out


async def run(
    rates_hz: list[float], rounds: int, seconds: float, baseline_s: float, workdir: Path
) -> dict[str, Any]:
    raw: dict[float, list[dict[str, Any]]] = {r: [] for r in rates_hz}
    for i in range(rounds):
        for rate in rates_hz:  # interleaved: load drift hits every rate alike
            got = await session(rate, seconds, workdir / f"r{i}-{rate:g}Hz", seed=i + 1)
            # Right after the session, nothing else in the loop: the platform's share.
            got["bare_lateness_s"] = await bare_loop(rate, baseline_s) if baseline_s > 0 else []
            raw[rate].append(got)
    return {"rates": [summarise(rate, raw[rate]) for rate in rates_hz]}


def _f(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(res: dict[str, Any]) -> list[dict[str, Any]]:
    head = (
        f"{'rate':>6} {'cycles':>6} {'missed':>6} {'dur p50':>7} {'dur p99':>7} {'dur max':>7} "
        f"{'p99 med':>7} {'late p50':>8} {'late p99':>8} {'late max':>8} {'p99 med':>7} "
        f"{'CPU %':>6} {'ms/cyc':>6} {'sim CPU':>7} {'bare p50':>8} {'bare p99':>8}"
    )
    print(head)
    print("-" * len(head))
    for f in res["rates"]:
        d, lt = f["duration"], f["lateness"]
        print(
            f"{f['rate_hz']:>4g}Hz {f['cycles']:>6} {f['missed']:>6} {_f(d['p50_ms']):>7} "
            f"{_f(d['p99_ms']):>7} {_f(d['max_ms']):>7} "
            f"{_f(f['duration_p99_ms_median_of_rounds']):>7} {_f(lt['p50_ms']):>8} "
            f"{_f(lt['p99_ms']):>8} {_f(lt['max_ms']):>8} "
            f"{_f(f['lateness_p99_ms_median_of_rounds']):>7} {_f(f['cpu_pct_median'], '.1f'):>6} "
            f"{_f(f['cpu_ms_per_cycle_median'], '.3f'):>6} {_f(f['sim_cpu_pct_median'], '.1f'):>7} "
            f"{_f(f['bare_loop_lateness']['p50_ms']):>8} {_f(f['bare_loop_lateness']['p99_ms']):>8}"
        )
    print(
        "times in ms, pooled over the rounds; dur: poll + step + write + dose accounting; "
        "late: cycle start after its schedule;\np99 med: median of the rounds' p99s; "
        "CPU %: this process (the controller) in % of one core, and ms/cyc: its CPU ms per "
        "cycle, medians of the rounds;\nsim CPU: the simulator process, % of one core; bare: "
        "lateness of an empty asyncio loop at the same rate, run after each session"
    )
    goals: list[dict[str, Any]] = []
    for f in res["rates"]:
        rate = f["rate_hz"]
        goal = f"<= {GOAL_P99_LATENESS_MS:g}" if rate == GOAL_RATE_HZ else ""
        med, pooled = f["lateness_p99_ms_median_of_rounds"], f["lateness"]["p99_ms"]
        goals.append(
            {
                "name": f"{rate:g} Hz lateness p99, ms (median of rounds)",
                "measured": med,
                "goal": goal,
                "met": (med is not None and med <= GOAL_P99_LATENESS_MS) if goal else None,
            }
        )
        goals.append(
            {
                "name": f"{rate:g} Hz lateness p99, ms (pooled)",
                "measured": pooled,
                "goal": goal,
                "met": (pooled is not None and pooled <= GOAL_P99_LATENESS_MS) if goal else None,
            }
        )
        bare = f["bare_loop_lateness"]["p99_ms"]
        goals.append(
            {
                "name": f"{rate:g} Hz empty asyncio loop lateness p99, ms",
                "measured": bare,
                "goal": "",
                "met": None,
            }
        )
        goals.append(
            {
                "name": f"{rate:g} Hz controller CPU, % of one core",
                "measured": f["cpu_pct_median"],
                "goal": "",
                "met": None,
            }
        )
    print()
    print(f"{'figure':44} {'measured':>10}  {'goal':>8}  met")
    for g in goals:
        met = "" if g["met"] is None else ("yes" if g["met"] else "NO")
        print(f"{g['name']:44} {g['measured']!s:>10}  {g['goal']:>8}  {met}")
    return goals


def parse_rates(text: str) -> list[float]:
    """ "20,50,100" -> [20.0, 50.0, 100.0] (argparse type)."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: rates must be numbers (Hz)") from None
    if not rates:
        raise argparse.ArgumentTypeError("no rate given")
    for r in rates:
        # LineConfig allows cycle_period_s 0.005 .. 1.0 s.
        if not 1.0 <= r <= 200.0:
            raise argparse.ArgumentTypeError(f"rate {r:g} Hz is outside 1..200 Hz")
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--rates",
        type=parse_rates,
        default=list(DEFAULT_RATES_HZ),
        help="cycle rates, Hz, comma-separated (default 20,50,100)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds per rate (interleaved)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time per round, s")
    ap.add_argument(
        "--baseline-s",
        type=float,
        default=5.0,
        help="empty asyncio loop run after each session, s (0: none)",
    )
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--smoke", action="store_true", help="100 Hz, one round of 1 s")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rates, args.rounds, args.seconds = [float(GOAL_RATE_HZ)], 1, 1.0
        args.baseline_s = min(args.baseline_s, 0.5)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, not {args.rounds}")
    if args.seconds <= 0:
        ap.error(f"--seconds must be positive, not {args.seconds}")
    if args.baseline_s < 0:
        ap.error(f"--baseline-s must not be negative, not {args.baseline_s}")
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="control-cycle-") as tmp:
        res = asyncio.run(run(args.rates, args.rounds, args.seconds, args.baseline_s, Path(tmp)))
    res.update(
        {
            "rounds": args.rounds,
            "seconds_per_round": args.seconds,
            "baseline_s": args.baseline_s,
            "sim": "separate process (python -m simulators)",
            **host_facts(load_start, t0),
        }
    )
    goals = print_table(res)
    print(
        f"\n{len(args.rates)} rate(s) x {args.rounds} round(s) of {args.seconds:g} s in "
        f"{res['took_s']:.0f} s; load average (1, 5, 15 min): start {res['load_avg_start']}, "
        f"end {res['load_avg_end']}; {res['cpus']} CPUs"
    )
    if args.json:
        res["goals"] = goals
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
