"""Recovery matrix: fault x outcome x operator action needed (issue 9).

For each fault scenario, one reel runs on the compact test line with the fast recipe
(tests/e2e_scenarios.py: operator_config, line_service, wait_for) against the bundled
simulators, the fault is injected through their fault injection (docs/simulators.md)
while the reel is RUNNING, and a scripted operator does what an operator at the HMI
would, no more:

  - while the line runs, or is OFFLINE (PLC data lost: nothing can be reset), or is
    still moving, the operator waits;
  - once the fault's cause is over (the injection has ended: the repair is made) and the
    line has stood (FAULT, IDLE or READY, the conveyor stopped) for --grace-s with the
    reel unfinished, the operator presses reset (the `reset` command through
    LineService.execute, as MQTT sends it). A refused reset is counted and retried after
    another --grace-s. If a reset was accepted and the line then stands READY for
    --grace-s without the reel coming back, the operator starts the reel again
    (`start_reel` with the same id: resumes it);
  - after --max-resets accepted resets, or --stuck-s from the fault, with the reel still
    not running, the operator restarts linectl as the docs say (`linectl run
    --reset-faults --resume`: a new LineService with request_reset and request_resume).

Recorded for each: whether the line left RUNNING before the reel's end (and why, from
the first such transition), the alarms raised, the final state, whether the reel
finished (closed at its planned length), the metres recorded unproven and not in spec,
false accepts, false rejects (not in spec, in spec by the truth), recorded bounds not
holding the true dose and burns against the simulator's ground truth
(restart_scrap.tally), the time from the fault until the line
ran again, and the operator actions needed: none / 1 reset / N resets / restart.

Two rows come from bench/restart_scrap.py's trials on the compact line: a planned
restart (LineService.stop(), a new service resumes) and a SIGKILL of `linectl run`
followed by `linectl run --reset-faults --resume --exit-after-reel`; their operator
action is the restart itself.

A scenario the simulators cannot drive is reported as such in the table, never faked.

    .venv/bin/python bench/recovery_matrix.py [--only a,b] [--length-m 40] [--json FILE]
        [--markdown FILE] [--list]

Scenarios run one at a time (real time; each takes 30 to 90 s). The expected action is
the issue's acceptance where it names the scenario ("no operator action" / "after one
operator reset"), or what a plant engineer would expect where it does not; the last
column says whether the measured action matched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the compact line and its helpers are the tests'
sys.path.insert(0, str(ROOT / "bench"))  # restart_scrap

import e2e_scenarios as sc  # noqa: E402
import restart_scrap as rs  # noqa: E402
from benchlib import code_version, host_facts  # noqa: E402

from linectl.commands import Command, CommandName  # noqa: E402
from linectl.config import LoadedConfig  # noqa: E402
from linectl.core.control import LineState, Transition  # noqa: E402
from linectl.service import LineService  # noqa: E402
from linectl.store import RecordStore  # noqa: E402
from simulators.server import SimulatedLine  # noqa: E402

OP = "op-1"
STOPPED = (LineState.FAULT, LineState.IDLE, LineState.READY)
MOVING = (LineState.STARTING, LineState.RUNNING, LineState.STOPPING)
NORMAL_END = "planned length reached"
NONE, ONE_RESET, RESTART = "none", "1 reset", "restart"

Inject = Callable[[SimulatedLine], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    """One row of the matrix."""

    name: str
    fault: str  # what is injected, in words
    expected: str  # NONE, ONE_RESET or RESTART
    inject: Inject | None = None  # None: a restart_scrap row (kind says which)
    at_metres: int = 5  # metres recorded before the fault (0: as soon as RUNNING)
    seed: int = 1
    kind: str = "inproc"  # "inproc", "planned", "sigkill"
    not_driven: str = ""  # why the simulators cannot drive it (the row says so)


async def _drop_every(sim: SimulatedLine, mode: str) -> None:
    # Both PLCs, offset so that the drops do not coincide, through the whole reel.
    sim.faults.drop_every("conveyor", 5.0, 3600.0, mode)
    await asyncio.sleep(2.5)
    sim.faults.drop_every("accelerator", 5.0, 3600.0, mode)


async def _close_once(sim: SimulatedLine, half: bool) -> None:
    sim.faults.close_mid_request("conveyor", 1, half=half)
    await asyncio.sleep(1.0)
    sim.faults.close_mid_request("accelerator", 1, half=half)


async def _exceptions(sim: SimulatedLine, plc: str, code: int, s: float) -> None:
    sim.faults.exceptions(plc, code, s)  # type: ignore[arg-type]
    await asyncio.sleep(s)  # the cause lasts this long


async def _link_loss(sim: SimulatedLine, plc: str, s: float) -> None:
    await sim.faults.link_loss(plc, s)  # type: ignore[arg-type]


async def _silent(sim: SimulatedLine, plc: str, s: float) -> None:
    sim.faults.silent(plc, s)  # type: ignore[arg-type]
    await asyncio.sleep(s)


async def _latch(sim: SimulatedLine, plc: str, code: int) -> None:
    sim.faults.latch(plc, code)  # type: ignore[arg-type]


async def _latch_persisting(sim: SimulatedLine, plc: str, code: int, s: float) -> None:
    sim.faults.latch(plc, code, persist=True)  # type: ignore[arg-type]
    await asyncio.sleep(s)
    sim.faults.clear_cause(plc, code)  # type: ignore[arg-type]


SCENARIOS: list[Scenario] = [
    Scenario(
        "drop_close_5s",
        "drop_every 5 s, close (no answer), both PLCs, whole reel",
        NONE,
        lambda s: _drop_every(s, "close"),
        at_metres=0,
        seed=21,
    ),
    Scenario(
        "drop_half_5s",
        "drop_every 5 s, half answer, both PLCs, whole reel",
        NONE,
        lambda s: _drop_every(s, "half"),
        at_metres=0,
        seed=22,
    ),
    Scenario(
        "drop_silent_5s",
        "drop_every 5 s, one request unanswered (silent), both PLCs, whole reel",
        NONE,
        lambda s: _drop_every(s, "silent"),
        at_metres=0,
        seed=23,
    ),
    Scenario(
        "close_mid_request",
        "close_mid_request x1 on each PLC (1 s apart)",
        NONE,
        lambda s: _close_once(s, half=False),
        seed=24,
    ),
    Scenario(
        "exc_burst_short",
        "exceptions 6 (busy) 0.12 s on the conveyor (< stale_after_s 0.25 s)",
        NONE,
        lambda s: _exceptions(s, "conveyor", 6, 0.12),
        seed=25,
    ),
    Scenario(
        "exc_burst_2s_cnv",
        "exceptions 6 (busy) 2 s on the conveyor",
        ONE_RESET,
        lambda s: _exceptions(s, "conveyor", 6, 2.0),
        seed=26,
    ),
    Scenario(
        "exc_burst_2s_acc",
        "exceptions 4 (device failure) 2 s on the accelerator",
        ONE_RESET,
        lambda s: _exceptions(s, "accelerator", 4, 2.0),
        seed=27,
    ),
    Scenario(
        "cnv_refused_3s",
        "conveyor server stopped 3 s (closed and refused: link_loss)",
        ONE_RESET,
        lambda s: _link_loss(s, "conveyor", 3.0),
        seed=28,
    ),
    Scenario(
        "cnv_silent_3s",
        "conveyor silent 3 s (accepts, never answers; its watchdog trips)",
        ONE_RESET,
        lambda s: _silent(s, "conveyor", 3.0),
        seed=29,
    ),
    Scenario(
        "acc_refused_3s",
        "accelerator server stopped 3 s (closed and refused: link_loss)",
        ONE_RESET,
        lambda s: _link_loss(s, "accelerator", 3.0),
        seed=30,
    ),
    Scenario(
        "acc_silent_3s",
        "accelerator silent 3 s (accepts, never answers; its watchdog trips)",
        ONE_RESET,
        lambda s: _silent(s, "accelerator", 3.0),
        seed=31,
    ),
    Scenario(
        "cnv_restart",
        "conveyor PLC restart, 0.3 s down, counters at new values (length 12345, clock 7)",
        ONE_RESET,
        lambda s: s.restart("conveyor", 0.3, counters={"length": 12_345, "clock": 7}),
        seed=32,
    ),
    Scenario(
        "acc_restart",
        "accelerator PLC restart, 0.3 s down, counters at new values (charge 99, trips 3, "
        "clock 11)",
        ONE_RESET,
        lambda s: s.restart(
            "accelerator", 0.3, counters={"charge_total": 99, "trip_count": 3, "clock": 11}
        ),
        seed=33,
    ),
    Scenario(
        "hv_fault",
        "HV fault latched (accelerator code 2), cause gone",
        ONE_RESET,
        lambda s: _latch(s, "accelerator", 2),
        seed=34,
    ),
    Scenario(
        "hv_fault_cause_5s",
        "HV fault latched (code 2), its cause present 5 s, then gone",
        ONE_RESET,
        lambda s: _latch_persisting(s, "accelerator", 2, 5.0),
        seed=35,
    ),
    Scenario(
        "acc_watchdog_trip",
        "accelerator watchdog trip latched while linectl runs (code 7)",
        ONE_RESET,
        lambda s: _latch(s, "accelerator", 7),
        seed=36,
    ),
    Scenario(
        "cnv_watchdog_trip",
        "conveyor watchdog trip latched while linectl runs (code 5)",
        ONE_RESET,
        lambda s: _latch(s, "conveyor", 5),
        seed=37,
    ),
    Scenario(
        "controller_stall",
        "linectl stalls past the watchdog timeout (event loop blocked), PLCs trip",
        ONE_RESET,
        not_driven=(
            "the simulators run in linectl's event loop here, so blocking it stops their "
            "physics too; the watchdog trip by linectl's absence is the sigkill row"
        ),
    ),
    Scenario(
        "planned_restart",
        "planned restart of linectl mid-reel (stop as SIGTERM; new service --resume)",
        RESTART,
        kind="planned",
        seed=41,
    ),
    Scenario(
        "sigkill_restart",
        "SIGKILL of linectl run mid-reel; run --reset-faults --resume --exit-after-reel",
        RESTART,
        kind="sigkill",
        seed=42,
    ),
]
BY_NAME = {s.name: s for s in SCENARIOS}
SMOKE = ("exc_burst_short", "hv_fault")


# ---------------------------------------------------------------------- the operator


@dataclass
class Row:
    """What one scenario measured."""

    name: str
    fault: str
    expected: str
    driven: bool = True
    not_driven: str = ""
    left_running: bool = False
    left_running_cause: str = ""
    transitions: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)
    final_state: str = ""
    finished: bool = False
    metres: int = 0
    planned_metres: int = 0
    unproven: int = 0
    not_in_spec: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    false_accepts: int = 0
    false_accept_metres: list[int] = field(default_factory=list)
    false_rejects: int = 0  # not in spec, but in spec by the truth
    bounds_violations: int = 0
    burns: int = 0
    resets: int = 0
    resets_refused: list[str] = field(default_factory=list)
    restarts_started: int = 0  # start_reel sent by the operator after a reset
    restarts: int = 0  # linectl restarted (the restart rows: the fault itself)
    action: str = ""
    met: bool | None = None
    fault_to_running_s: float | None = None
    took_s: float = 0.0
    error: str = ""
    not_in_spec_detail: list[dict[str, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


def classify(row: Row) -> str:
    """none / 1 reset / N resets / restart, plus what else the operator did."""
    if row.restarts:
        return RESTART
    parts = []
    if row.resets:
        parts.append(ONE_RESET if row.resets == 1 else f"{row.resets} resets")
    if row.restarts_started:
        parts.append(f"{row.restarts_started} start_reel")
    return " + ".join(parts) or NONE


class Operator:
    """Watches one service and acts as the brief above says; counts what it did."""

    def __init__(self, row: Row, reel_id: str, length_m: float, grace_s: float) -> None:
        self.row = row
        self.reel_id = reel_id
        self.length_m = length_m
        self.grace_s = grace_s

    async def tend(
        self,
        svc: LineService,
        sim: SimulatedLine,
        *,
        max_resets: int,
        deadline: float,
        t_fault: float | None,
        cause_over: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Until the reel is finished (True), or the operator would restart (False). The
        operator acts only once the fault's cause is over (cause_over(): the repair)."""
        row = self.row
        since: float | None = None  # the line has stood since
        reset_ok_at: float | None = None
        while self.reel_id not in svc.finished_reels:
            now = time.monotonic()
            if now > deadline:
                return False
            st = svc.ctl.state
            if (
                t_fault is not None
                and row.fault_to_running_s is None
                and row.left_running
                and st is LineState.RUNNING
            ):
                row.fault_to_running_s = round(now - t_fault, 2)
            standing = st in STOPPED and not sim.plant.conveyor.running and cause_over()
            since = (since or now) if standing else None
            if since is not None and now - since >= self.grace_s:
                since = None
                if reset_ok_at is not None and st is LineState.READY:
                    # Reset taken, the line ready, the reel not back: start it again.
                    res = await svc.execute(
                        Command(
                            CommandName.START_REEL, OP, reel_id=self.reel_id, length_m=self.length_m
                        )
                    )
                    row.restarts_started += 1
                    if not res.ack:
                        row.resets_refused.append(f"start_reel refused: {res.reason}")
                    reset_ok_at = None
                    continue
                if row.resets >= max_resets:
                    return False
                res = await svc.execute(Command(CommandName.RESET, OP))
                if res.ack:
                    row.resets += 1
                    reset_ok_at = time.monotonic()
                else:
                    row.resets_refused.append(f"{st.value}: {res.reason}")
                    if len(row.resets_refused) > 20:
                        return False
            await asyncio.sleep(0.05)
        return True


# ---------------------------------------------------------------------- one in-process row


def _hooks(svc: LineService, row: Row, armed: list[bool]) -> None:
    def on_transition(tr: Transition) -> None:
        if not armed[0]:
            return
        row.transitions.append(f"{tr.old.value}->{tr.new.value}: {tr.cause}")
        if tr.old is LineState.RUNNING and tr.cause != NORMAL_END and not row.left_running:
            row.left_running = True
            row.left_running_cause = f"{tr.old.value}->{tr.new.value}: {tr.cause}"

    svc.on_transition.append(on_transition)
    svc.on_alarm.append(lambda a: armed[0] and row.alarms.append(a.kind))


async def _start(svc: LineService, reel_id: str, length_m: float) -> None:
    await sc.wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
    res = await svc.execute(Command(CommandName.START_REEL, OP, reel_id=reel_id, length_m=length_m))
    if not res.ack:
        raise RuntimeError(f"start_reel refused: {res.reason}")
    await sc.wait_for(lambda: svc.ctl.state is LineState.RUNNING, 30.0, "RUNNING")


async def run_inproc(scen: Scenario, args: argparse.Namespace, workdir: Path) -> Row:
    row = Row(scen.name, scen.fault, scen.expected)
    reel_id = scen.name.upper()
    cfg: LoadedConfig = sc.operator_config(workdir, OP)
    op = Operator(row, reel_id, args.length_m, args.grace_s)
    armed = [False]
    t0 = time.monotonic()
    inject_task: asyncio.Task[None] | None = None
    with rs.captured("linectl") as lines:
        async with SimulatedLine(cfg, seed=scen.seed, k_dose_true=sc.TRUE_K) as sim:
            try:
                finished = False
                t_fault: float | None = None
                async with sc.line_service(cfg, sim) as svc:
                    _hooks(svc, row, armed)
                    await _start(svc, reel_id, args.length_m)
                    await sc.wait_for(
                        lambda: svc.records_written >= scen.at_metres,
                        60.0,
                        f"{scen.at_metres} metres",
                    )
                    armed[0] = True
                    t_fault = time.monotonic()
                    assert scen.inject is not None
                    inject_task = asyncio.create_task(scen.inject(sim), name="inject")
                    finished = await op.tend(
                        svc,
                        sim,
                        max_resets=args.max_resets,
                        deadline=t_fault + args.stuck_s,
                        t_fault=t_fault,
                        cause_over=inject_task.done,
                    )
                    row.final_state = svc.ctl.state.value
                if not finished:
                    # `linectl run --reset-faults --resume`, as the docs say.
                    row.restarts += 1
                    async with sc.line_service(cfg, sim, reset_faults=True) as svc2:
                        _hooks(svc2, row, armed)
                        svc2.request_resume(OP)
                        await op.tend(
                            svc2,
                            sim,
                            max_resets=row.resets + args.max_resets,
                            deadline=time.monotonic() + args.stuck_s,
                            t_fault=t_fault,
                        )
                        row.final_state = svc2.ctl.state.value
            except Exception as exc:  # the row reports it
                row.error = f"{type(exc).__name__}: {exc}"
            finally:
                if inject_task is not None and not inject_task.done():
                    inject_task.cancel()
                    await asyncio.gather(inject_task, return_exceptions=True)
            _tally(row, cfg, sim, reel_id, args.length_m)
    row.took_s = round(time.monotonic() - t0, 1)
    row.log = rs.notable(lines)[:60]
    return row


def _tally(row: Row, cfg: LoadedConfig, sim: SimulatedLine, reel_id: str, length_m: float) -> None:
    """The reel's records against the simulator's truth (restart_scrap.tally)."""
    with RecordStore(cfg.resolve(cfg.line.records.path)) as store:
        known = store.reel_exists(reel_id)
        metres = store.metres(reel_id) if known else []
        reel = store.reel(reel_id) if known else None
    plan = rs.Plan(row.name, reel_id, length_m, 0.0, 0, 0.0)
    t = rs.tally(cfg, plan, metres, sim, rs.Timeline())
    row.finished = (
        reel is not None and reel.state == "closed" and bool(t["recorded_once_each"])
    ) and not row.error
    _from_tally(row, t)


def _from_tally(row: Row, t: dict[str, Any]) -> None:
    row.metres = t["recorded"]
    row.planned_metres = t["planned_metres"]
    row.unproven = t["unproven"]
    row.not_in_spec = t["not_in_spec"]
    row.verdicts = t["verdicts"]
    row.false_accepts = t["false_accepts"]
    row.false_accept_metres = t["false_accept_metres"]
    row.bounds_violations = t["bounds_violations"]
    row.burns = t["burns"]
    row.false_rejects = t["truly_in_spec_among_not_in_spec"]
    row.not_in_spec_detail = t["not_in_spec_detail"]


# ---------------------------------------------------------------------- restart rows


async def run_restart(scen: Scenario, args: argparse.Namespace, workdir: Path) -> Row:
    """A restart_scrap trial on the compact line: the restart is the fault."""
    row = Row(scen.name, scen.fault, scen.expected)
    at = min(10.0, args.length_m / 3.0)
    plan = rs.Plan(scen.kind, scen.name.upper(), args.length_m, at, scen.seed, 2.0)
    r = await rs.run_trial(plan, workdir, smoke=True)
    row.error = r["error"]
    row.took_s = r.get("took_s", 0.0)
    row.restarts = 1
    row.left_running = True
    row.left_running_cause = "linectl stopped (planned)" if scen.kind == "planned" else "SIGKILL"
    row.final_state = r.get("second_state_at_exit", "") or (
        f"exit {r.get('second_returncode')}" if "second_returncode" in r else ""
    )
    row.log = r.get("log", [])[:60]
    if "recorded" in r:
        _from_tally(row, r)
        row.finished = (
            r.get("reel_state") == "closed" and bool(r["recorded_once_each"]) and not row.error
        )
    return row


# ---------------------------------------------------------------------- the run


async def run_one(scen: Scenario, args: argparse.Namespace, workdir: Path) -> Row:
    if scen.not_driven:
        return Row(scen.name, scen.fault, scen.expected, driven=False, not_driven=scen.not_driven)
    if scen.kind == "inproc":
        row = await run_inproc(scen, args, workdir)
    else:
        row = await run_restart(scen, args, workdir)
    row.action = classify(row)
    row.met = row.action == row.expected and row.finished and row.false_accepts == 0
    return row


async def run(names: list[str], args: argparse.Namespace, workdir: Path) -> list[Row]:
    rows = []
    for name in names:
        row = await run_one(BY_NAME[name], args, workdir / name)
        if args.verbose:
            print(f"  {name}: {row.action or '-'} {row.error}", flush=True)
        rows.append(row)
    return rows


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def markdown(rows: list[Row]) -> str:
    head = (
        "| fault | left RUNNING | final state | reel finished | metres unproven | not in spec "
        "| metres recorded / planned | false accepts | operator action needed | expected "
        "| as expected |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    out = []
    for r in rows:
        if not r.driven:
            out.append(
                f"| {r.fault} | not driven: {r.not_driven} | - | - | - | - | - | - | - | "
                f"{r.expected} | - |"
            )
            continue
        left = _yn(r.left_running) + (f" ({r.left_running_cause})" if r.left_running else "")
        if r.alarms:
            left += f"; alarms {', '.join(sorted(set(r.alarms)))}"
        action = r.action
        if r.resets_refused:
            action += f" ({len(r.resets_refused)} refused first)"
        if r.fault_to_running_s is not None:
            action += f"; running again {r.fault_to_running_s:g} s after the fault"
        fin = _yn(r.finished) + (f" (error: {r.error})" if r.error else "")
        bad = ", ".join(f"{v} {n}" for v, n in r.verdicts.items() if v != "in_spec")
        missing = r.planned_metres - r.metres
        if missing > 0:
            bad = ", ".join(x for x in (bad, f"missing {missing}") if x)
        if r.not_in_spec:
            bad += f"; {r.false_rejects} in spec by the truth"
        out.append(
            f"| {r.fault} | {left} | {r.final_state or '-'} | {fin} | {r.unproven} | "
            f"{r.not_in_spec}{f' ({bad})' if bad else ''} | {r.metres}/{r.planned_metres} | "
            f"{r.false_accepts} | "
            f"{action} | {r.expected} | {'-' if r.met is None else _yn(r.met)} |"
        )
    return head + "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], help="scenarios")
    ap.add_argument("--smoke", action="store_true", help=f"only {', '.join(SMOKE)}, 15 m reels")
    ap.add_argument("--length-m", type=float, default=40.0, help="reel length, m (default 40)")
    ap.add_argument("--grace-s", type=float, default=2.0, help="operator waits this long, s")
    ap.add_argument("--max-resets", type=int, default=3, help="resets before a restart")
    ap.add_argument("--stuck-s", type=float, default=90.0, help="restart after this long, s")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--verbose", action="store_true", help="linectl's log on stderr")
    args = ap.parse_args(argv)
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:20} {s.expected:8} {s.fault}")
        return 0
    names = list(SMOKE) if args.smoke else args.only or [s.name for s in SCENARIOS]
    if args.smoke:
        args.length_m = 15.0
    if bad := [n for n in names if n not in BY_NAME]:
        ap.error(f"unknown scenario(s) {bad}; --list shows them")
    if args.length_m < 12.0:
        ap.error("--length-m must be at least 12 (the fault comes at metre 5)")
    if args.max_resets < 1 or args.grace_s <= 0:
        ap.error("--max-resets must be >= 1 and --grace-s > 0")
    if not args.verbose:
        logging.getLogger("linectl").setLevel(logging.CRITICAL)
        logging.getLogger("simulators").setLevel(logging.CRITICAL)
    code = code_version()
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="recovery-matrix-") as tmp:
        rows = asyncio.run(run(names, args, Path(tmp)))
    table = markdown(rows)
    res: dict[str, Any] = {
        "line": "compact test line, fast recipe (tests/e2e_scenarios.py), 50 ms cycle",
        "length_m": args.length_m,
        "grace_s": args.grace_s,
        "max_resets": args.max_resets,
        "stuck_s": args.stuck_s,
        "rows": [asdict(r) for r in rows],
        "false_accepts": sum(r.false_accepts for r in rows),
        "not_as_expected": [r.name for r in rows if r.met is False],
        "not_driven": [r.name for r in rows if not r.driven],
        "errors": [f"{r.name}: {r.error}" for r in rows if r.error],
        "code": code,
        **host_facts(load_start, t0),
    }
    print(table)
    print(
        f"{len(rows)} scenario(s), {len(res['not_driven'])} not driven; false accepts "
        f"{res['false_accepts']}; not as expected: {res['not_as_expected'] or 'none'}; "
        f"errors: {res['errors'] or 'none'}; {res['took_s']:.0f} s; load average (1, 5, 15 min): "
        f"start {res['load_avg_start']}, end {res['load_avg_end']}; {res['cpus']} CPUs; "
        f"code {code}"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
