"""Scale: N complete lines on one host, one process per line against N lines in one process.

Each line is a real LineService (the compact test line and fast recipe of
tests/e2e_scenarios.py; its own line id, records database, PLC ports and Prometheus
endpoint) running a reel at 20 Hz against its own pair of simulated PLCs over Modbus TCP.
For every N in --lines, two deployments are measured side by side in one run:

  per-process  N `linectl run` daemons (--reel, env overrides for the line id, ports,
               records path and metrics port), started a batch of --start-batch at a time
               so that the import burst of 40 interpreters does not stall lines already
               running;
  in-process   one helper process running the same N LineServices in one event loop,
               each with what the daemon gives it (linectl.daemon.run_with_bridge: its
               metrics endpoint; MQTT and Sparkplug are off in both).

The simulators always run in processes of their own (--lines-per-sim pairs per process,
this script's `_sims` role), so their cost is measured apart from the controllers'. This
script only launches, samples and scrapes: it runs no line itself.

Per point, once every line is RUNNING and after --settle s, over a window of --seconds:
  - controller CPU, % of one core: utime+stime of the controller processes (all their
    threads) from /proc/<pid>/stat, over the window's wall time; likewise the simulators;
    and the controllers' CPU ms per line-cycle actually run (ms/cyc);
  - memory: RSS and PSS (/proc/<pid>/smaps_rollup; PSS shares the interpreter's and the
    libraries' pages fairly between processes, so it is the honest sum), mean of 1 s samples;
  - from each line's /metrics (scraped just before and after the window, deltas):
    linectl_control_cycles_missed_total, the cycle count (linectl_control_cycle_duration_
    seconds_count), the mean cycle duration, and the p99 cycle lateness as the upper bound
    of its histogram bucket (linectl_control_cycle_lateness_seconds);
  - the host's busy % of all cores (/proc/stat), and the part of it that is not this
    benchmark's processes ("other": work of anything else on the host, which competes);
  - after the stop: metres recorded per line (proof the reels ran), daemon exit codes.
The two deployments alternate which goes first from one N to the next. A deployment that
saturates the machine at some N (host busy >= 90 %, fewer than 90 % of its cycles run, or a
line not RUNNING at the end of the window) is not run at larger N (unless --keep-going):
those points are reported as skipped. Missed cycles below that fail the goal, and show.

Printed: one row per point with the goal beside each figure (20 lines with no missed
cycle; 20 cycles/s per line), the in-process/per-process ratios at each N, and a least-
squares line (intercept + slope per line) of CPU and PSS against N for each deployment
(goal: cost linear in N). A PNG plot of cost against N goes to --plot.

    .venv/bin/python bench/scale.py [--lines 1,5,10,20,40] [--seconds 20] [--settle 3]
        [--lines-per-sim 10] [--start-batch CORES] [--keep-going] [--json FILE]
        [--plot FILE] [--workdir DIR]

`--smoke`: N = 1, 2, 3 s windows (used by the test suite so the script never rots).
Other work on the host shows up in the figures: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the compact test line is the tests'
sys.path.insert(0, str(ROOT))  # linectl and simulators, when run from elsewhere

from linectl.metrics import CYCLE_LATENESS_BUCKETS_S  # noqa: E402

# tests/e2e_scenarios (and with it the simulators) is imported where it is used, never in
# the process that hosts the lines: its memory would be charged to the controllers.

CYCLE_GOAL_HZ = 20.0
GOAL_LINES = 20  # goal: this many lines with no missed cycle
# Saturation (larger N not run): the host's cores nearly all busy, or the lines losing
# more than a tenth of their cycles. A few missed cycles fail the goal but are not it.
SATURATED_HOST_BUSY = 0.90
SATURATED_RATE = 0.90
DEPLOYMENTS = ("per-process", "in-process")
LAST_LATENESS_BUCKET_S = CYCLE_LATENESS_BUCKETS_S[-1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


# ---------------------------------------------------------------------- /proc sampling


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a live process has used."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces: count fields after its ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def proc_mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a live process, kB."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def host_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
    total = sum(parts[:8])  # guest time is already inside user
    return total - idle, total


def load_average() -> str:
    """The 1, 5 and 15 min load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------- metrics


@dataclass
class LineScrape:
    """The figures of one line's /metrics this benchmark uses."""

    line: str = ""
    state: str | None = None
    missed: float = 0.0
    cycles: float = 0.0
    duration_sum_s: float = 0.0
    lateness_le: dict[float, float] = field(default_factory=dict)  # cumulative counts


def scrape(url: str, timeout_s: float = 5.0) -> LineScrape:
    """One line's figures from its Prometheus endpoint (OSError if it does not answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        text = resp.read().decode()
    out = LineScrape()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "linectl_line_state" and s.value == 1:
                out.state = s.labels["state"]
                out.line = s.labels["line"]
            elif s.name == "linectl_control_cycles_missed_total":
                out.missed = s.value
            elif s.name == "linectl_control_cycle_duration_seconds_count":
                out.cycles = s.value
            elif s.name == "linectl_control_cycle_duration_seconds_sum":
                out.duration_sum_s = s.value
            elif s.name == "linectl_control_cycle_lateness_seconds_bucket":
                out.lateness_le[float(s.labels["le"])] = s.value
    return out


def scrape_all(urls: Sequence[str]) -> tuple[list[LineScrape], list[float]]:
    """Every line's figures, each with the monotonic time of its scrape (the midpoint of
    the request), so counts are divided by each line's own interval."""
    out, times = [], []
    for url in urls:
        t0 = time.monotonic()
        out.append(scrape(url))
        times.append((t0 + time.monotonic()) / 2)
    return out, times


def bucket_quantile(before: list[LineScrape], after: list[LineScrape], q: float) -> float | None:
    """Upper bound (s) of the histogram bucket holding quantile q of the lateness observed
    between two scrapes, pooled over lines; inf past the last bucket, None if no cycles."""
    pooled: dict[float, float] = {}
    for b, a in zip(before, after, strict=True):
        for le, n in a.lateness_le.items():
            pooled[le] = pooled.get(le, 0.0) + n - b.lateness_le.get(le, 0.0)
    total = pooled.get(math.inf, 0.0)
    if total <= 0:
        return None
    for le in sorted(pooled):
        if pooled[le] >= q * total:
            return le
    return math.inf


# ---------------------------------------------------------------------- helper roles


def line_env(
    line_id: str, acc_port: int, cnv_port: int, records: Path, metrics_port: int
) -> dict[str, str]:
    """The environment overrides that make the shared configuration this line's."""
    return {
        "LINECTL_LINE_ID": line_id,
        "LINECTL_ACCELERATOR__PORT": str(acc_port),
        "LINECTL_CONVEYOR__PORT": str(cnv_port),
        "LINECTL_RECORDS__PATH": str(records),
        "LINECTL_METRICS__PORT": str(metrics_port),
    }


async def host_sims(config: Path, seeds: list[int]) -> None:
    """Role `_sims`: one SimulatedLine pair per seed on free ports; prints their ports as
    one JSON line, then serves until SIGTERM."""
    import e2e_scenarios as sc

    from linectl.config import load_config
    from simulators.server import SimulatedLine

    cfg = load_config(config, environ={})
    sims = [SimulatedLine(cfg, seed=s, k_dose_true=sc.TRUE_K) for s in seeds]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for sim in sims:
            await sim.start()
        print(json.dumps({"ports": [[s.acc_port, s.cnv_port] for s in sims]}), flush=True)
        await stop.wait()
    finally:
        for sim in sims:
            await sim.stop()


async def host_lines(spec: dict[str, Any]) -> None:
    """Role `_lines`: N LineServices in this one event loop, each as the daemon runs it
    (run_with_bridge); prints their metrics URLs as one JSON line once all serve, stops
    them all safely on SIGTERM."""
    from linectl.config import load_config
    from linectl.daemon import run_with_bridge
    from linectl.service import LineService, ReelRequest, select_recipe

    services = []
    for ln in spec["lines"]:
        env = line_env(ln["line_id"], ln["acc_port"], ln["cnv_port"], Path(ln["records"]), 0)
        cfg = load_config(Path(spec["config"]), environ=env)
        recipe, path = select_recipe(cfg, None)
        svc = LineService(cfg, recipe, path)
        svc.request_reel(ReelRequest(ln["reel"], float(ln["length_m"]), "bench"))
        services.append(svc)
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        for svc in services:
            svc.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    tasks = [
        asyncio.create_task(run_with_bridge(s, exit_when_done=False, metrics_port=0))
        for s in services
    ]
    while not all(s.metrics_url for s in services):
        failed = [t for t in tasks if t.done()]
        if failed:
            stop_all()
            await asyncio.gather(*tasks, return_exceptions=True)
            failed[0].result()  # raises what stopped it
            raise RuntimeError("a line service returned before it served its metrics")
        await asyncio.sleep(0.05)
    print(json.dumps({"metrics": [s.metrics_url for s in services]}), flush=True)
    await asyncio.gather(*tasks)


def helper_main(role: str, args: list[str]) -> int:
    """Entry point of the helper processes this script starts."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if role == "_sims":
        asyncio.run(host_sims(Path(args[0]), [int(s) for s in args[1].split(",")]))
    else:
        asyncio.run(host_lines(json.loads(Path(args[0]).read_text())))
    return 0


# ---------------------------------------------------------------------- processes


@dataclass
class Child:
    """A process this script started, with where its output goes."""

    what: str
    proc: subprocess.Popen[bytes]
    stderr: Path

    def tail(self, lines: int = 8) -> str:
        """The end of its stderr, for error messages."""
        try:
            text = self.stderr.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n    ".join(text[-lines:])


def spawn(what: str, cmd: list[str], logdir: Path, env: dict[str, str] | None = None) -> Child:
    """Start a process (stdout a pipe for its ready line, stderr a file)."""
    err = logdir / f"{what}.stderr"
    with err.open("wb") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=f
        )
    return Child(what, proc, err)


def ready_line(child: Child, timeout_s: float) -> dict[str, Any]:
    """The JSON line a helper prints once it serves."""
    assert child.proc.stdout is not None
    fd = child.proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            raise TimeoutError(f"{child.what} not ready within {timeout_s:g} s: {child.tail()}")
        chunk = os.read(fd, 65536)
        if not chunk:
            code = child.proc.wait()
            raise RuntimeError(
                f"{child.what} exited with {code} before it was ready:\n    {child.tail()}"
            )
        buf += chunk
    result: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return result


def stop_children(children: Sequence[Child], timeout_s: float) -> dict[str, int | None]:
    """SIGTERM each, wait for them all, SIGKILL any still running at the deadline.
    Returns each one's exit code (None: it had to be killed)."""
    for c in children:
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int | None] = {}
    for c in children:
        try:
            codes[c.what] = c.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
            codes[c.what] = None
        if c.proc.stdout is not None:
            c.proc.stdout.close()
    return codes


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports on 127.0.0.1 that nothing listens on right now (held open
    together while chosen, so they differ)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------- one point


@dataclass
class Point:
    """What one (deployment, N) measured."""

    deployment: str
    lines: int
    ok: bool = False
    error: str = ""
    controller_processes: int = 0
    startup_s: float = 0.0
    window_s: float = 0.0
    ctl_cpu_pct: float = 0.0  # % of one core, all controller processes together
    sim_cpu_pct: float = 0.0
    bench_cpu_pct: float = 0.0  # this script's own sampling and scraping
    host_busy_pct: float = 0.0  # % of all cores, everything on the machine
    other_busy_pct: float = 0.0  # the part of it that is not this benchmark's processes
    ctl_rss_mb: float = 0.0
    ctl_pss_mb: float = 0.0
    cycles: int = 0
    cycles_due: int = 0
    missed: int = 0
    cycle_rate_hz_per_line: float = 0.0
    cycle_duration_mean_ms: float = 0.0
    lateness_p99_ms: float | None = None
    lines_running_at_end: int = 0
    states_at_end: dict[str, int] = field(default_factory=dict)  # line state -> lines
    ctl_cpu_ms_per_cycle: float = 0.0  # controller CPU per line-cycle actually run
    lines_with_metres: int = 0
    metres_recorded: int = 0
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""

    @property
    def saturated(self) -> str:
        """Why this point saturated the machine ("" if it did not)."""
        if not self.ok:
            return f"failed: {self.error}"
        why = []
        if self.host_busy_pct >= 100 * SATURATED_HOST_BUSY:
            why.append(f"host busy {self.host_busy_pct:.0f} %")
        if self.cycle_rate_hz_per_line < SATURATED_RATE * CYCLE_GOAL_HZ:
            why.append(f"{self.cycle_rate_hz_per_line:.1f} cycles/s per line")
        if self.lines_running_at_end < self.lines:
            others = {k: v for k, v in self.states_at_end.items() if k != "running"}
            why.append(f"{self.lines - self.lines_running_at_end} lines not RUNNING {others}")
        return ", ".join(why)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["saturated"] = self.saturated
        d["ctl_cpu_pct_per_line"] = round(self.ctl_cpu_pct / self.lines, 2)
        d["ctl_pss_mb_per_line"] = round(self.ctl_pss_mb / self.lines, 1)
        if self.lateness_p99_ms is not None and math.isinf(self.lateness_p99_ms):
            d["lateness_p99_ms"] = f">{1000 * LAST_LATENESS_BUCKET_S:g}"  # JSON has no inf
        return d


@dataclass
class Plan:
    """The settings every point shares."""

    config: Path
    workdir: Path
    seconds: float
    settle_s: float
    lines_per_sim: int
    start_batch: int
    period_s: float
    reel_length_m: float


def _clean_env() -> dict[str, str]:
    # Only this script's overrides reach the daemons, whatever the caller's shell holds.
    return {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}


def measure(dep: str, n: int, plan: Plan) -> Point:
    """Run N lines in deployment `dep`, measure the window, stop them; never raises for a
    failed point (Point.error says what went wrong)."""
    pt = Point(dep, n, load_before=load_average())
    tag = f"{'pp' if dep == 'per-process' else 'ip'}{n:02d}"
    logdir = plan.workdir / tag
    logdir.mkdir(parents=True)
    sims: list[Child] = []
    ctls: list[Child] = []
    try:
        seeds = list(range(1, n + 1))
        groups = [seeds[i : i + plan.lines_per_sim] for i in range(0, n, plan.lines_per_sim)]
        for g, group in enumerate(groups):
            cmd = [sys.executable, __file__, "_sims", str(plan.config), ",".join(map(str, group))]
            sims.append(spawn(f"sims{g}", cmd, logdir))
        ports: list[list[int]] = []
        for child in sims:
            ports += ready_line(child, 60.0)["ports"]
        lines = [
            {
                "line_id": f"{tag}-line{i:02d}",
                "acc_port": ports[i][0],
                "cnv_port": ports[i][1],
                "records": str(logdir / f"line{i:02d}.sqlite"),
                "reel": f"{tag}-reel{i:02d}",
                "length_m": plan.reel_length_m,
            }
            for i in range(n)
        ]
        t_start = time.monotonic()
        start_timeout_s = 30.0 + 3.0 * n
        if dep == "per-process":
            urls = _start_daemons(lines, plan, logdir, ctls, start_timeout_s)
        else:
            spec = logdir / "lines.json"
            spec.write_text(json.dumps({"config": str(plan.config), "lines": lines}))
            cmd = [sys.executable, __file__, "_lines", str(spec)]
            ctls.append(spawn("lines", cmd, logdir))
            urls = ready_line(ctls[0], start_timeout_s)["metrics"]
        pt.controller_processes = len(ctls)
        _wait_running(urls, ctls, t_start + start_timeout_s)
        pt.startup_s = round(time.monotonic() - t_start, 1)
        time.sleep(plan.settle_s)
        _window(pt, urls, ctls, sims, plan)
        pt.ok = True
    except (OSError, RuntimeError, TimeoutError, ValueError, KeyError) as exc:
        pt.error = f"{type(exc).__name__}: {exc}"
    finally:
        pt.exit_codes = stop_children(ctls, 90.0)
        stop_children(sims, 30.0)
        pt.load_after = load_average()
    if pt.ok:
        _count_metres(pt, logdir, n)
        bad = {k: v for k, v in pt.exit_codes.items() if v != 0}
        if bad:
            pt.ok = False
            pt.error = f"controllers did not exit cleanly: {bad}"
    return pt


def _start_daemons(
    lines: list[dict[str, Any]], plan: Plan, logdir: Path, ctls: list[Child], timeout_s: float
) -> list[str]:
    """`linectl run` per line, a batch at a time: the next batch starts once the previous
    one serves its metrics (the interpreter and imports are up)."""
    metrics_ports = free_ports(len(lines))
    urls = [f"http://127.0.0.1:{p}/metrics" for p in metrics_ports]
    deadline = time.monotonic() + timeout_s
    for first in range(0, len(lines), plan.start_batch):
        batch = range(first, min(first + plan.start_batch, len(lines)))
        for i in batch:
            ln = lines[i]
            env = _clean_env() | line_env(
                ln["line_id"], ln["acc_port"], ln["cnv_port"], Path(ln["records"]), metrics_ports[i]
            )
            cmd = [sys.executable, "-m", "linectl", "run", "--config", str(plan.config)]
            cmd += ["--reel", ln["reel"], "--length", str(ln["length_m"]), "--operator", "bench"]
            ctls.append(spawn(f"daemon{i:02d}", cmd, logdir, env))
        for i in batch:
            while True:
                _check_alive(ctls)
                try:
                    scrape(urls[i], timeout_s=2.0)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"daemon{i:02d} never served {urls[i]}") from None
                    time.sleep(0.1)
    return urls


def _check_alive(children: Sequence[Child]) -> None:
    for c in children:
        if c.proc.poll() is not None:
            raise RuntimeError(f"{c.what} exited with {c.proc.returncode}:\n    {c.tail()}")


def _wait_running(urls: list[str], ctls: Sequence[Child], deadline: float) -> None:
    """Until every line reports RUNNING on its metrics (its reel is under the beam)."""
    pending = set(urls)
    states: dict[str, str | None] = {}
    while pending:
        _check_alive(ctls)
        for url in sorted(pending):
            with contextlib.suppress(OSError):
                states[url] = scrape(url, timeout_s=2.0).state
                if states[url] == "running":
                    pending.discard(url)
        if pending and time.monotonic() > deadline:
            seen = sorted({str(states.get(u)) for u in pending})
            raise TimeoutError(f"{len(pending)} lines not RUNNING in time (states {seen})")
        if pending:
            time.sleep(0.2)


def _window(
    pt: Point, urls: list[str], ctls: Sequence[Child], sims: Sequence[Child], plan: Plan
) -> None:
    ctl_pids = [c.proc.pid for c in ctls]
    sim_pids = [c.proc.pid for c in sims]
    before, t_before = scrape_all(urls)
    t0 = time.monotonic()
    ctl0 = sum(proc_cpu_s(p) for p in ctl_pids)
    sim0 = sum(proc_cpu_s(p) for p in sim_pids)
    me0 = proc_cpu_s(os.getpid())
    busy0, total0 = host_jiffies()
    rss, pss = [], []
    t_end = t0 + plan.seconds
    while (left := t_end - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        mem = [proc_mem_kb(p) for p in ctl_pids]
        rss.append(sum(m[0] for m in mem))
        pss.append(sum(m[1] for m in mem))
    busy1, total1 = host_jiffies()
    ctl1 = sum(proc_cpu_s(p) for p in ctl_pids)
    sim1 = sum(proc_cpu_s(p) for p in sim_pids)
    me1 = proc_cpu_s(os.getpid())
    dt = time.monotonic() - t0
    after, t_after = scrape_all(urls)
    _check_alive(ctls)
    # The scrapes bracket the CPU window: counts are taken over each line's own interval.
    line_s = sum(a - b for a, b in zip(t_after, t_before, strict=True))
    pt.window_s = round(dt, 2)
    pt.ctl_cpu_pct = round(100.0 * (ctl1 - ctl0) / dt, 1)
    pt.sim_cpu_pct = round(100.0 * (sim1 - sim0) / dt, 1)
    pt.bench_cpu_pct = round(100.0 * (me1 - me0) / dt, 1)
    pt.host_busy_pct = round(100.0 * (busy1 - busy0) / max(1, total1 - total0), 1)
    ours_pct = (pt.ctl_cpu_pct + pt.sim_cpu_pct + pt.bench_cpu_pct) / NCPU
    pt.other_busy_pct = round(max(0.0, pt.host_busy_pct - ours_pct), 1)
    pt.ctl_rss_mb = round(sum(rss) / len(rss) / 1024.0, 1)
    pt.ctl_pss_mb = round(sum(pss) / len(pss) / 1024.0, 1)
    pt.cycles = round(sum(a.cycles - b.cycles for a, b in zip(after, before, strict=True)))
    pt.cycles_due = round(line_s / plan.period_s)
    pt.missed = round(sum(a.missed - b.missed for a, b in zip(after, before, strict=True)))
    pt.cycle_rate_hz_per_line = round(pt.cycles / line_s, 2)
    dur = sum(a.duration_sum_s - b.duration_sum_s for a, b in zip(after, before, strict=True))
    pt.cycle_duration_mean_ms = round(1000.0 * dur / max(1, pt.cycles), 2)
    p99 = bucket_quantile(before, after, 0.99)
    pt.lateness_p99_ms = None if p99 is None else 1000.0 * p99
    pt.lines_running_at_end = sum(1 for a in after if a.state == "running")
    for a in after:
        pt.states_at_end[str(a.state)] = pt.states_at_end.get(str(a.state), 0) + 1
    # Per cycle run: a saturated host runs fewer cycles, so % of a core alone flatters it.
    pt.ctl_cpu_ms_per_cycle = round(1000.0 * (ctl1 - ctl0) / max(1, pt.cycles), 3)


def _count_metres(pt: Point, logdir: Path, n: int) -> None:
    from linectl.store import RecordStore

    for i in range(n):
        with RecordStore(logdir / f"line{i:02d}.sqlite") as store:
            metres = sum(len(store.metres(r.reel_id)) for r in store.reels())
        pt.metres_recorded += metres
        pt.lines_with_metres += metres > 0


# ---------------------------------------------------------------------- the run


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float] | None:
    """Least squares y = a + b x, with R^2 (None for fewer than two distinct x)."""
    if len(set(xs)) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"intercept": round(a, 2), "per_line": round(b, 3), "r2": round(r2, 4)}


def run(counts: list[int], plan: Plan, *, keep_going: bool = False) -> dict[str, Any]:
    """Every (N, deployment) point, side by side per N; a deployment stops at the first N
    that saturates the machine (unless keep_going)."""
    points: list[Point] = []
    skipped: dict[str, str] = {}
    for i, n in enumerate(counts):
        # Alternate which deployment goes first, so drift in the host's other load does
        # not always fall on the same one.
        for dep in DEPLOYMENTS if i % 2 == 0 else DEPLOYMENTS[::-1]:
            if dep in skipped:
                continue
            print(f"... {dep}, {n} lines (load {load_average()})", file=sys.stderr, flush=True)
            pt = measure(dep, n, plan)
            points.append(pt)
            if pt.saturated and not keep_going:
                skipped[dep] = f"saturated at N={n}: {pt.saturated}"
    fits: dict[str, dict[str, Any]] = {}
    for dep in DEPLOYMENTS:
        good = [p for p in points if p.deployment == dep and p.ok]
        xs = [float(p.lines) for p in good]
        fits[dep] = {
            "cpu_pct": linear_fit(xs, [p.ctl_cpu_pct for p in good]),
            "pss_mb": linear_fit(xs, [p.ctl_pss_mb for p in good]),
        }
    return {
        "host_cpus": NCPU,
        "cycle_period_s": plan.period_s,
        "seconds": plan.seconds,
        "settle_s": plan.settle_s,
        "lines_per_sim": plan.lines_per_sim,
        "start_batch": plan.start_batch,
        "reel_length_m": plan.reel_length_m,
        "counts": counts,
        "points": [p.as_dict() for p in points],
        "skipped": skipped,
        "fits": fits,
        "goal_lines_no_miss": GOAL_LINES,
        "goal_cycle_hz": CYCLE_GOAL_HZ,
    }


def _late(v: float | str | None) -> str:
    if v is None:
        return "-"
    return v if isinstance(v, str) else f"<={v:g}"


def print_table(res: dict[str, Any]) -> None:
    """The figures, one row per point, goals in the header and beside the fits."""
    print(
        f"{res['host_cpus']} cores; CPU in % of one core; window {res['seconds']:g} s per point; "
        f"cycle {1000 * res['cycle_period_s']:g} ms"
    )
    hdr = (
        f"{'deployment':12} {'N':>3} {'procs':>5} {'ctl CPU%':>8} {'/line':>6} {'ms/cyc':>6} "
        f"{'RSS MB':>7} {'PSS MB':>7} {'/line':>6} {'missed':>10} {'cyc/s/ln':>8} {'dur ms':>6} "
        f"{'late p99':>8} {'run':>5} {'sim CPU%':>8} {'host%':>5} {'other':>5}  note"
    )
    print(hdr)
    print(
        f"{'goal':12} {'':>3} {'':>5} {'linear':>8} {'':>6} {'':>6} {'':>7} {'linear':>7} {'':>6} "
        f"{'0 @N<=20':>10} {'20':>8} {'< 50':>6} {'< 50':>8} {'all':>5} {'':>8} {'< 90':>5}"
    )
    for p in res["points"]:
        if not p["ok"]:
            print(f"{p['deployment']:12} {p['lines']:>3}  FAILED: {p['error']}")
            continue
        n = p["lines"]
        note = f"saturated: {p['saturated']}" if p["saturated"] else ""
        print(
            f"{p['deployment']:12} {n:>3} {p['controller_processes']:>5} "
            f"{p['ctl_cpu_pct']:>8.1f} {p['ctl_cpu_pct_per_line']:>6.2f} "
            f"{p['ctl_cpu_ms_per_cycle']:>6.3f} "
            f"{p['ctl_rss_mb']:>7.1f} {p['ctl_pss_mb']:>7.1f} {p['ctl_pss_mb_per_line']:>6.1f} "
            f"{p['missed']:>4}/{p['cycles_due']:<5} {p['cycle_rate_hz_per_line']:>8.2f} "
            f"{p['cycle_duration_mean_ms']:>6.2f} {_late(p['lateness_p99_ms']):>8} "
            f"{p['lines_running_at_end']:>2}/{n:<2} {p['sim_cpu_pct']:>8.1f} "
            f"{p['host_busy_pct']:>5.0f} {p['other_busy_pct']:>5.0f}  {note}"
        )
    for dep, why in res["skipped"].items():
        print(f"{dep}: larger N not run, {why}")
    print()
    by_n: dict[int, dict[str, dict[str, Any]]] = {}
    for p in res["points"]:
        if p["ok"]:
            by_n.setdefault(p["lines"], {})[p["deployment"]] = p
    print(f"{'in-process / per-process':26} {'N':>3} {'CPU':>6} {'PSS':>6} {'RSS':>6}")
    for n, d in sorted(by_n.items()):
        if len(d) == 2:
            a, b = d["per-process"], d["in-process"]
            cpu = b["ctl_cpu_pct"] / a["ctl_cpu_pct"] if a["ctl_cpu_pct"] else math.nan
            print(
                f"{'':26} {n:>3} {cpu:>6.2f} {b['ctl_pss_mb'] / a['ctl_pss_mb']:>6.2f} "
                f"{b['ctl_rss_mb'] / a['ctl_rss_mb']:>6.2f}"
            )
    print()
    print(f"{'fit a + b*N':26} {'figure':8} {'a':>8} {'b/line':>8} {'R^2':>7}  goal")
    for dep, fits in res["fits"].items():
        for name, f in fits.items():
            if f is None:
                print(f"{dep:26} {name:8} {'(fewer than two points)':>25}")
                continue
            print(
                f"{dep:26} {name:8} {f['intercept']:>8.2f} {f['per_line']:>8.3f} "
                f"{f['r2']:>7.4f}  linear (R^2 near 1)"
            )


def plot(res: dict[str, Any], path: Path) -> None:
    """Controller CPU, memory, cycle lateness and missed cycles against N, both
    deployments (the simulators' CPU dotted, for scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(12, 8))
    cpu_ax, mem_ax, late_ax, miss_ax = grid.flat
    styles = {"per-process": ("tab:blue", "o"), "in-process": ("tab:orange", "s")}
    for dep, (color, marker) in styles.items():
        pts = [p for p in res["points"] if p["deployment"] == dep and p["ok"]]
        if not pts:
            continue
        ns = [p["lines"] for p in pts]
        kw: dict[str, Any] = {"marker": marker, "color": color}
        faint: dict[str, Any] = {**kw, "alpha": 0.6}
        cpu_ax.plot(ns, [p["ctl_cpu_pct"] for p in pts], label=f"{dep} controllers", **kw)
        cpu_ax.plot(
            ns, [p["sim_cpu_pct"] for p in pts], ls=":", label=f"simulators ({dep} run)", **faint
        )
        mem_ax.plot(ns, [p["ctl_pss_mb"] for p in pts], label=f"{dep} PSS", **kw)
        mem_ax.plot(ns, [p["ctl_rss_mb"] for p in pts], ls="--", label=f"{dep} RSS", **faint)
        late = [
            x if isinstance(x, float | int) else 1000 * LAST_LATENESS_BUCKET_S
            for x in (p["lateness_p99_ms"] for p in pts)
        ]
        late_ax.plot(ns, late, label=f"{dep} (upper bucket bound)", **kw)
        missed = [100.0 * p["missed"] / max(1, p["cycles_due"]) for p in pts]
        miss_ax.plot(ns, missed, label=dep, **kw)
    cpu_ax.axhline(100 * res["host_cpus"], color="grey", linewidth=0.8, linestyle="--")
    cpu_ax.set_title(f"CPU, % of one core ({res['host_cpus']} cores = dashed)")
    mem_ax.set_title("controller memory, MB")
    late_ax.axhline(1000 * res["cycle_period_s"], color="grey", linewidth=0.8, linestyle="--")
    late_ax.set_title("cycle lateness p99, ms (one cycle = dashed)")
    miss_ax.set_title("missed cycles, % of those due (goal 0 up to 20 lines)")
    ns_run = sorted({p["lines"] for p in res["points"]})
    for ax in grid.flat:
        ax.set_xticks(ns_run)
        ax.set_xlabel("lines N")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        "linectl: cost of N lines at 20 Hz on one host, one process per line vs all in one"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in {"_sims", "_lines"}:
        return helper_main(argv[0], argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lines", default="1,5,10,20,40", help="comma-separated line counts N")
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window per point")
    ap.add_argument("--settle", type=float, default=3.0, help="wait after all lines RUNNING, s")
    ap.add_argument("--lines-per-sim", type=int, default=10, help="simulated lines per process")
    ap.add_argument(
        "--start-batch", type=int, default=NCPU, help="daemons started at once (per-process)"
    )
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument(
        "--plot", type=Path, default=ROOT / "bench" / "results" / "scale.png", help="PNG plot"
    )
    ap.add_argument("--keep-going", action="store_true", help="run every N even past saturation")
    ap.add_argument("--workdir", type=Path, help="keep configs, records and logs here")
    ap.add_argument("--smoke", action="store_true", help="N = 1, 2 with 3 s windows")
    args = ap.parse_args(argv)
    if args.smoke:
        args.lines, args.seconds, args.settle = "1,2", 3.0, 0.5
    try:
        counts = sorted({int(x) for x in args.lines.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--lines must be comma-separated integers, not {args.lines!r}")
    if not counts or counts[0] < 1:
        ap.error(f"--lines needs positive line counts, not {args.lines!r}")
    if args.seconds < 1 or args.lines_per_sim < 1 or args.start_batch < 1:
        ap.error("--seconds must be >= 1, --lines-per-sim and --start-batch >= 1")

    import e2e_scenarios as sc

    from linectl.config import load_config
    from linectl.service import select_recipe

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="linectl-scale-"))
            )
        else:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        config = sc.compact_config(workdir)
        cfg = load_config(config, environ={})
        recipe, _ = select_recipe(cfg, None)
        # Long enough to run at the recipe's top speed through the slowest start, the
        # settle and the window: the reel must never finish while it is measured.
        worst_s = 30.0 + 3.0 * counts[-1] + args.settle + args.seconds + 60.0
        plan = Plan(
            config=config,
            workdir=workdir,
            seconds=args.seconds,
            settle_s=args.settle,
            lines_per_sim=args.lines_per_sim,
            start_batch=args.start_batch,
            period_s=cfg.line.cycle_period_s,
            reel_length_m=math.ceil(recipe.speed_max_m_min / 60.0 * worst_s),
        )
        load0 = load_average()
        res = run(counts, plan, keep_going=args.keep_going)
        res["load_before"], res["load_after"] = load0, load_average()
    print(f"load average before: {res['load_before']}, after: {res['load_after']}")
    print_table(res)
    plot(res, args.plot)
    res["plot"] = str(args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
