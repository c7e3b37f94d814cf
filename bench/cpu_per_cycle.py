"""Controller CPU per cycle against a bare pymodbus poll of the same blocks (issue 9).

Measures, side by side in one run, the CPU time spent per cycle in three phases, each
against the bundled simulators in their own process (`python -m simulators`, as
bench/control_cycle.py starts them), so that the simulators' CPU is never counted:

  - bare:  a bare pymodbus 3.16 poll: one AsyncModbusTcpClient per PLC reading, every
           cycle, the blocks linectl's plan reads (linectl.modbus.plan.plan_reads with the
           endpoint's max_gap, the unit id of the endpoint), one request after the other,
           on an absolute schedule at the cycle rate (a cycle more than a period late is
           skipped, as the service skips it). No decoding, no writes: the floor any
           controller that polls these blocks pays;
  - rest:  linectl's LineService at the same rate on the compact test line
           (tests/e2e_scenarios.py), the line at rest (READY, no reel): both links' I/O
           tasks, the controller, heartbeat and set-point writes, the store thread;
  - reel:  the same with a reel RUNNING (beam on, dose ledger, metres and checkpoints
           written to SQLite).

CPU is a process's user + system time (resource.getrusage(RUSAGE_SELF): every thread,
the store thread included) over the measured window, divided by the cycles the window
ran (the service's cycles as its observers saw them; the bare loop's polls). Each phase
starts from fresh simulators and a fresh service or client, settles for --settle-s, then
is measured for --seconds.

--mode side-by-side (the default): in each round every phase runs at once, each in its
own process (this script, --worker), and all are measured over the same window, so a
change in the host's speed (this VM's neighbours, its clock) hits them alike. Measured
one after the other (--mode sequential: one process, the phases' order rotating round by
round), the bare poll's own CPU per cycle moved from 0.42 to 0.89 ms between rounds of
one run, and the ratio with it. The ratio controller / bare is taken per round (paired)
and its median reported with the medians of the figures. Goal (issue 9): controller
<= 2.5x the bare poll, at 100 Hz.

    .venv/bin/python bench/cpu_per_cycle.py [--rate 100] [--rounds 3] [--seconds 20]
        [--settle-s 2] [--mode side-by-side|sequential] [--json FILE]

Also printed: requests per cycle of each phase (linectl's from its links' counters) and
the user / system split, so that where the time goes can be read beside the ratio. The
machine's load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the compact line is the tests'
sys.path.insert(0, str(ROOT / "bench"))  # benchlib, control_cycle

import e2e_scenarios as sc  # noqa: E402
from benchlib import code_version, host_cpu_s, host_facts  # noqa: E402
from control_cycle import (  # noqa: E402
    SimProcess,
    proc_cpu_s,
    speed_limit_m_min,
    wait_running,
    with_period,
)

from linectl.aio import stop_task  # noqa: E402
from linectl.config import LoadedConfig, PlcEndpoint, RegisterMap, load_config  # noqa: E402
from linectl.core.control import LineState  # noqa: E402
from linectl.modbus.plan import plan_reads  # noqa: E402
from linectl.service import LineService, ReelRequest, select_recipe  # noqa: E402

PHASES = ("bare", "rest", "reel")
MODES = ("side-by-side", "sequential")
CONTROLLER_PHASES = ("rest", "reel")
GOAL_RATIO = 2.5


def cpu_s() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all its threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


class Window:
    """CPU, wall time and a cycle count between start() and stop(); beside them, the
    simulator process's CPU and the rest of the host's (what else ran meanwhile)."""

    def __init__(self, sim_pid: int | None = None) -> None:
        self.active = False
        self.cycles = 0
        self.sim_pid = sim_pid
        self._t0 = self._u0 = self._s0 = 0.0
        self._sim0: float | None = None
        self._host0: float | None = None
        self.wall_s = self.user_s = self.sys_s = 0.0
        self.sim_s: float | None = None
        self.host_s: float | None = None

    def _sim(self) -> float | None:
        return None if self.sim_pid is None else proc_cpu_s(self.sim_pid)

    def start(self) -> None:
        self.cycles = 0
        self._sim0, self._host0 = self._sim(), host_cpu_s()
        self._u0, self._s0 = cpu_s()
        self._t0 = time.perf_counter()
        self.active = True

    def stop(self) -> None:
        self.active = False
        self.wall_s = time.perf_counter() - self._t0
        u, s = cpu_s()
        self.user_s, self.sys_s = u - self._u0, s - self._s0
        sim1, host1 = self._sim(), host_cpu_s()
        self.sim_s = None if sim1 is None or self._sim0 is None else sim1 - self._sim0
        self.host_s = None if host1 is None or self._host0 is None else host1 - self._host0

    def tick(self, *_: object) -> None:
        if self.active:
            self.cycles += 1

    def figures(self, rate_hz: float) -> dict[str, Any]:
        n = max(1, self.cycles)
        cpu = self.user_s + self.sys_s
        pct_of = self._pct
        return {
            "cycles": self.cycles,
            "expected_cycles": round(self.wall_s * rate_hz, 1),
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(cpu, 4),
            "cpu_ms_per_cycle": round(1000.0 * cpu / n, 4),
            "user_ms_per_cycle": round(1000.0 * self.user_s / n, 4),
            "sys_ms_per_cycle": round(1000.0 * self.sys_s / n, 4),
            "cpu_pct": round(100.0 * cpu / self.wall_s, 2) if self.wall_s > 0 else None,
            "sim_cpu_pct": pct_of(self.sim_s),
            # The host's busy time less this process and the simulators: other work.
            "other_cpu_pct": pct_of(
                None if self.host_s is None else self.host_s - cpu - (self.sim_s or 0.0)
            ),
        }

    def _pct(self, s: float | None) -> float | None:
        return None if s is None or self.wall_s <= 0 else round(100.0 * s / self.wall_s, 1)


# ---------------------------------------------------------------------- the bare poll


Gate = Callable[[], Awaitable[None]]
"""Awaited once the phase runs (connected, the line READY or the reel RUNNING); returns
when the measured window opens. Sequential mode: the settling time. Side-by-side mode:
the settling time, then the moment every worker's window opens together."""


async def bare_poll(
    cfg: LoadedConfig, sim: SimProcess, rate_hz: float, gate: Gate, seconds: float
) -> dict[str, Any]:
    """A plain pymodbus poll of the blocks linectl's plan reads, at the cycle rate."""
    from pymodbus.client import AsyncModbusTcpClient

    plcs: list[tuple[PlcEndpoint, RegisterMap, int]] = [
        (cfg.line.accelerator, cfg.accelerator_map, sim.acc_port),
        (cfg.line.conveyor, cfg.conveyor_map, sim.cnv_port),
    ]
    polls: list[tuple[AsyncModbusTcpClient, list[tuple[bool, int, int]], int]] = []
    for ep, rmap, port in plcs:
        client = AsyncModbusTcpClient(ep.host, port=port, timeout=ep.timeout_s, retries=0)
        if not await client.connect():
            raise RuntimeError(f"bare poll: cannot connect to {ep.host}:{port}")
        blocks = [(b.table == "holding", b.address, b.count) for b in plan_reads(rmap, ep.max_gap)]
        polls.append((client, blocks, ep.unit_id))
    win = Window(sim.pid)
    period = 1.0 / rate_hz
    missed = [0]

    running = True

    async def loop() -> None:
        next_t = time.monotonic()
        while running:
            for client, blocks, unit in polls:
                for holding, address, count in blocks:
                    if holding:
                        rr = await client.read_holding_registers(
                            address, count=count, device_id=unit
                        )
                    else:
                        rr = await client.read_input_registers(address, count=count, device_id=unit)
                    if rr.isError():
                        raise RuntimeError(f"bare poll got {rr}")
            win.tick()
            next_t += period
            late = time.monotonic() - next_t
            if late > period:  # skip the slots it overran, as the service does
                skipped = int(late // period)
                missed[0] += skipped if win.active else 0
                next_t += skipped * period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    task = asyncio.create_task(loop(), name="bench-bare-poll")
    try:
        await gate()
        if task.done():
            task.result()
        win.start()
        await asyncio.sleep(seconds)
        win.stop()
        if task.done():
            task.result()
    finally:
        # Asked to end, then cancelled until it does: on 3.11 pymodbus's wait_for can
        # swallow a cancellation (linectl.aio), and a side-by-side worker hung so.
        running = False
        await stop_task(task, grace_s=2.0)
        for client, _b, _u in polls:
            client.close()
    return {
        **win.figures(rate_hz),
        "missed": missed[0],
        "requests_per_cycle": {"read": float(sum(len(b) for _c, b, _u in polls))},
    }


# ---------------------------------------------------------------------- the controller


def _requests(svc: LineService) -> dict[int, int]:
    out: dict[int, int] = {}
    for link in (svc.acc, svc.cnv):
        for fc, n in link.stats.requests_by_fc.items():
            out[fc] = out.get(fc, 0) + n
    return out


def _per_cycle(before: dict[int, int], after: dict[int, int], cycles: int) -> dict[str, float]:
    kinds = {"read": (3, 4), "write": (6, 16)}
    n = max(1, cycles)
    return {
        k: round(sum(after.get(fc, 0) - before.get(fc, 0) for fc in fcs) / n, 3)
        for k, fcs in kinds.items()
    }


async def controller(
    cfg: LoadedConfig,
    sim: SimProcess,
    *,
    rate_hz: float,
    gate: Gate,
    seconds: float,
    reel: bool,
) -> dict[str, Any]:
    """linectl's LineService at the cycle rate, the line at rest or running a reel."""
    recipe, recipe_path = select_recipe(cfg, None)
    svc = LineService(
        cfg,
        recipe,
        recipe_path,
        acc_endpoint=cfg.line.accelerator.model_copy(update={"port": sim.acc_port}),
        cnv_endpoint=cfg.line.conveyor.model_copy(update={"port": sim.cnv_port}),
    )
    win = Window(sim.pid)
    states: dict[str, int] = {}

    def observe(s: LineService) -> None:
        if win.active:
            win.cycles += 1
            states[s.ctl.state.value] = states.get(s.ctl.state.value, 0) + 1

    svc.observers.append(observe)
    if reel:
        # Long enough that the reel still runs when the window ends.
        v = speed_limit_m_min(cfg, recipe)
        length_m = round(v / 60.0 * (seconds + 120.0) * 1.5 + 20.0)
        svc.request_reel(ReelRequest("CPU-1", length_m, "bench"))
    task = asyncio.create_task(svc.run(), name="bench-cpu-line")
    try:
        if reel:
            await wait_running(svc, 60.0)
        else:
            await sc.wait_for(lambda: svc.ctl.state is LineState.READY, 60.0, "the line READY")
        await gate()
        if task.done():
            task.result()
            raise RuntimeError("the line service returned before the measurement")
        missed0, req0, rec0 = svc.stats.missed, _requests(svc), svc.records_written
        win.start()
        await asyncio.sleep(seconds)
        win.stop()
        missed1, req1, rec1 = svc.stats.missed, _requests(svc), svc.records_written
        if task.done():
            task.result()
            raise RuntimeError("the line service returned before the measurement ended")
    finally:
        svc.stop()
        async with asyncio.timeout(90.0):
            await asyncio.gather(task, return_exceptions=True)
    return {
        **win.figures(rate_hz),
        "missed": missed1 - missed0,
        "states": states,
        "metres_recorded": rec1 - rec0,
        "requests_per_cycle": _per_cycle(req0, req1, win.cycles),
    }


# ---------------------------------------------------------------------- the run


async def phase(
    name: str, *, rate_hz: float, gate: Gate, seconds: float, workdir: Path, seed: int
) -> dict[str, Any]:
    """One phase: fresh simulators (own process) and the poller or service."""
    cfg = load_config(sc.compact_config(workdir), environ={})
    cfg.line = with_period(cfg, 1.0 / rate_hz)
    sim = SimProcess(cfg.directory, seed=seed)
    await sim.start()
    try:
        if name == "bare":
            res = await bare_poll(cfg, sim, rate_hz, gate, seconds)
        else:
            res = await controller(
                cfg, sim, rate_hz=rate_hz, gate=gate, seconds=seconds, reel=name == "reel"
            )
    finally:
        await sim.stop()
    return {"phase": name, **res}


async def worker(args: argparse.Namespace) -> int:
    """Side-by-side mode, one phase in this process: say READY on stdout once it runs and
    has settled, read the window's start (time.monotonic(), shared by every process on
    the host) from stdin, measure, print the figures as one JSON line."""
    loop = asyncio.get_running_loop()

    async def gate() -> None:
        await asyncio.sleep(args.settle_s)
        print("READY", flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        start = float(line.split()[1])  # "GO <t>"
        await asyncio.sleep(max(0.0, start - time.monotonic()))

    res = await phase(
        args.worker,
        rate_hz=args.rate,
        gate=gate,
        seconds=args.seconds,
        workdir=args.workdir,
        seed=args.seed,
    )
    print("RESULT " + json.dumps(res), flush=True)
    return 0


async def side_by_side_round(
    phases: list[str], *, rate_hz: float, settle_s: float, seconds: float, workdir: Path, seed: int
) -> dict[str, dict[str, Any]]:
    """Every phase at once, each in its own process with its own simulators, all measured
    over the same window: a change in the host's speed (a VM's neighbours, the clock)
    hits the bare poll and the controller alike, where one phase after the other it
    moved the ratio by up to a factor of two from round to round."""
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        for name in phases:
            procs[name] = await asyncio.create_subprocess_exec(
                sys.executable,
                str(SCRIPT),
                "--worker",
                name,
                "--rate",
                str(rate_hz),
                "--settle-s",
                str(settle_s),
                "--seconds",
                str(seconds),
                "--workdir",
                str(workdir / name),
                "--seed",
                str(seed),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        for name, proc in procs.items():
            assert proc.stdout is not None
            async with asyncio.timeout(120.0):
                line = await proc.stdout.readline()
            if line.strip() != b"READY":
                raise RuntimeError(f"worker {name} did not get ready: {line!r}")
        start = time.monotonic() + 0.5
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.write(f"GO {start}\n".encode())
            await proc.stdin.drain()
        got: dict[str, dict[str, Any]] = {}
        for name, proc in procs.items():
            async with asyncio.timeout(seconds + 120.0):
                out, _ = await proc.communicate()
            results = [ln for ln in out.decode().splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not results:
                raise RuntimeError(f"worker {name} failed (exit {proc.returncode})")
            got[name] = json.loads(results[-1].removeprefix("RESULT "))
        return got
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def summarise(rounds: list[dict[str, dict[str, Any]]], phases: list[str]) -> dict[str, Any]:
    """Medians over the rounds, and the per-round (paired) ratios to the bare poll."""
    out: dict[str, Any] = {}
    for p in phases:
        rs = [r[p] for r in rounds]
        out[p] = {
            "cpu_ms_per_cycle": _median([r["cpu_ms_per_cycle"] for r in rs]),
            "user_ms_per_cycle": _median([r["user_ms_per_cycle"] for r in rs]),
            "sys_ms_per_cycle": _median([r["sys_ms_per_cycle"] for r in rs]),
            "cpu_pct": _median([r["cpu_pct"] for r in rs if r["cpu_pct"] is not None]),
            "sim_cpu_pct": _median([r["sim_cpu_pct"] for r in rs if r["sim_cpu_pct"] is not None]),
            "other_cpu_pct_max": max(
                (r["other_cpu_pct"] for r in rs if r["other_cpu_pct"] is not None), default=None
            ),
            "cycles": sum(r["cycles"] for r in rs),
            "expected_cycles": round(sum(r["expected_cycles"] for r in rs), 1),
            "missed": sum(r["missed"] for r in rs),
            "requests_per_cycle": rs[-1]["requests_per_cycle"],
            "per_round_cpu_ms_per_cycle": [r["cpu_ms_per_cycle"] for r in rs],
        }
    ratios: dict[str, Any] = {}
    if "bare" in phases:
        for p in phases:
            if p == "bare":
                continue
            per_round = [
                round(r[p]["cpu_ms_per_cycle"] / r["bare"]["cpu_ms_per_cycle"], 3)
                for r in rounds
                if r["bare"]["cpu_ms_per_cycle"] > 0
            ]
            med_c, med_b = out[p]["cpu_ms_per_cycle"], out["bare"]["cpu_ms_per_cycle"]
            ratio_of_medians = round(med_c / med_b, 3) if med_c and med_b else None
            ratio = _median(per_round)
            ratios[p] = {
                "per_round": per_round,
                "median": None if ratio is None else round(ratio, 3),
                "of_medians": ratio_of_medians,
                "goal": f"<= {GOAL_RATIO:g}",
                "met": None if ratio is None else ratio <= GOAL_RATIO,
            }
    return {"phases": out, "ratios": ratios}


async def run(
    phases: list[str],
    *,
    mode: str,
    rate_hz: float,
    rounds: int,
    settle_s: float,
    seconds: float,
    workdir: Path,
) -> dict[str, Any]:
    raw: list[dict[str, dict[str, Any]]] = []

    async def settle() -> None:
        await asyncio.sleep(settle_s)

    for i in range(rounds):
        if mode == "side-by-side":
            got = await side_by_side_round(
                phases,
                rate_hz=rate_hz,
                settle_s=settle_s,
                seconds=seconds,
                workdir=workdir / f"r{i}",
                seed=i + 1,
            )
            raw.append({name: got[name] for name in phases})
            continue
        order = phases[i % len(phases) :] + phases[: i % len(phases)]
        got = {}
        for name in order:
            got[name] = await phase(
                name,
                rate_hz=rate_hz,
                gate=settle,
                seconds=seconds,
                workdir=workdir / f"r{i}-{name}",
                seed=i + 1,
            )
        raw.append(got)
    return {"rounds_raw": raw, **summarise(raw, phases)}


# ---------------------------------------------------------------------- output


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(res: dict[str, Any], say: Callable[[str], None] = print) -> None:
    head = (
        f"{'phase':6} {'CPU ms/cycle':>12} {'user':>7} {'sys':>7} {'CPU %':>6} {'cycles':>7} "
        f"{'expected':>8} {'missed':>6} {'reads/cyc':>9} {'writes/cyc':>10} {'x bare':>7} "
        f"{'sim %':>6} {'other %':>7}"
    )
    say(head)
    say("-" * len(head))
    for name, p in res["phases"].items():
        rq = p["requests_per_cycle"]
        ratio = res["ratios"].get(name, {}).get("median")
        say(
            f"{name:6} {_f(p['cpu_ms_per_cycle']):>12} {_f(p['user_ms_per_cycle']):>7} "
            f"{_f(p['sys_ms_per_cycle']):>7} {_f(p['cpu_pct'], '.1f'):>6} {p['cycles']:>7} "
            f"{p['expected_cycles']:>8g} {p['missed']:>6} {_f(rq.get('read'), '.2f'):>9} "
            f"{_f(rq.get('write'), '.2f'):>10} {_f(ratio, '.2f') if name != 'bare' else '1':>7} "
            f"{_f(p['sim_cpu_pct'], '.1f'):>6} {_f(p['other_cpu_pct_max'], '.1f'):>7}"
        )
    say(
        f"CPU of the phase's process per cycle (user + system, every thread; simulators in "
        f"their own process), phases {res['mode']}, medians of {res['rounds']} round(s) of "
        f"{res['seconds']:g} s at "
        f"{res['rate_hz']:g} Hz;\nx bare: median of the per-round ratios controller / bare "
        "poll (same round, same machine state);\nsim %: the simulator process, median; other %: "
        "the rest of the host (all cores, % of one core), the largest of the rounds"
    )
    say("")
    say(f"{'figure':44} {'measured':>9} {'goal':>7}  met")
    for name, r in res["ratios"].items():
        met = "-" if r["met"] is None else "yes" if r["met"] else "NO"
        say(
            f"{'controller (' + name + ') / bare poll, CPU per cycle':44} "
            f"{_f(r['median'], '.2f'):>9} {r['goal']:>7}  {met}"
        )
        say(f"  per round: {r['per_round']}; ratio of the medians {r['of_medians']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="cycle rate, Hz (default 100)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every phase (interleaved)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time per phase, s")
    ap.add_argument("--settle-s", type=float, default=2.0, help="unmeasured time first, s")
    ap.add_argument(
        "--phases",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(PHASES),
        help="comma-separated, of bare,rest,reel (default all)",
    )
    ap.add_argument(
        "--mode",
        choices=MODES,
        default="side-by-side",
        help="side-by-side (default): the phases at once, each in its own process, over one\n"
        "window; sequential: one phase after the other in this process",
    )
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    # A side-by-side run's workers (this script again, one phase each).
    ap.add_argument("--worker", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        if args.workdir is None:
            ap.error("--worker needs --workdir")
        return asyncio.run(worker(args))
    if not 1.0 <= args.rate <= 200.0:
        ap.error(f"--rate must be within 1..200 Hz, not {args.rate:g}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, not {args.rounds}")
    if args.seconds <= 0:
        ap.error(f"--seconds must be positive, not {args.seconds:g}")
    if args.settle_s < 0:
        ap.error(f"--settle-s must not be negative, not {args.settle_s:g}")
    if bad := set(args.phases) - set(PHASES):
        ap.error(f"unknown phase(s) {sorted(bad)}")
    if not args.phases:
        ap.error("no phase given")
    code = code_version()
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cpu-per-cycle-") as tmp:
        res = asyncio.run(
            run(
                args.phases,
                mode=args.mode,
                rate_hz=args.rate,
                rounds=args.rounds,
                settle_s=args.settle_s,
                seconds=args.seconds,
                workdir=Path(tmp),
            )
        )
    res.update(
        {
            "rate_hz": args.rate,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "settle_s": args.settle_s,
            "mode": args.mode,
            "sim": "separate process (python -m simulators), fresh for each phase",
            "python": sys.version.split()[0],
            "code": code,
            **host_facts(load_start, t0),
        }
    )
    print_table(res)
    print(
        f"\n{args.rounds} round(s) x {len(args.phases)} phase(s), {args.mode}, in "
        f"{res['took_s']:.0f} s; "
        f"load average (1, 5, 15 min): start {res['load_avg_start']}, end "
        f"{res['load_avg_end']}; {res['cpus']} CPUs; code {code}"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
