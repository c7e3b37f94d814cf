"""Throughput: steady line speed against the beam's physical limit, and scrap at start
and stop against the geometric minimum.

Runs reels on the reference line (config/: 16 passes 6 m apart, the reference recipe) in
the closed loop on simulated time (tests/harness.py: the pure controller and ledger
stepped with the simulators' plant physics, no sockets, so a 300 m reel takes seconds),
`--repeat` seeds, and prints:

  - steady speed: the median measured line speed over the RUNNING plateau, next to the
    physical limit K * sum(w_k) * I_max / (W * D_target) (goal: >= 99 %);
  - start scrap: cable that passed under a beam that was on before the reel's metre 0
    got there: (path at metre 0's start - path at the first beam-on) + the distance from
    the length counter to the last pass. Geometric minimum: the span of the passes,
    (passes - 1) * spacing: with metre 0 exactly at pass 0 when the beam comes on at the
    right current, everything under passes 1.. is partly dosed;
  - stop scrap: cable behind the reel's last metre that passed pass 0 while the beam was
    on: path at the last beam-off - (path at the reel's end + first pass offset). Same
    geometric minimum, for the same reason in reverse.

    .venv/bin/python bench/throughput.py [--repeat 3] [--length 300] [--json FILE]

`--smoke` runs one short reel on a compact line (used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the closed-loop harness is shared with the tests

from harness import COMPACT, ClosedLoop  # noqa: E402

from linectl.config import load_config  # noqa: E402
from linectl.core.control import LineState  # noqa: E402


def one_reel(seed: int, length_m: float, *, compact: bool) -> dict[str, Any]:
    """Run one reel; return its speed and scrap figures."""
    cfg = load_config(ROOT / "config", environ={})
    recipe = cfg.load_recipe(cfg.line.default_recipe or "pv-1x6-en50618")
    geom = COMPACT if compact else cfg.line.geometry
    loop = ClosedLoop(cfg, recipe, geometry=geom, seed=seed)
    loop.settle()
    loop.start(length_m=length_m)
    truth = loop.plant.truth
    acc = loop.plant.accelerator
    first_on: float | None = None
    last_off: float | None = None
    was_on = False
    speeds: list[float] = []
    for _ in range(round(3600.0 / loop.cycle_s)):
        loop.cycle()
        on = acc.beam_on
        if on and first_on is None:
            first_on = truth.path_m
        if was_on and not on:
            last_off = truth.path_m
        was_on = on
        if loop.ctl.state is LineState.RUNNING:
            speeds.append(loop.plant.conveyor.speed_m_min)
        if loop.finished and not on and not loop.plant.conveyor.running:
            break
    if not loop.finished or first_on is None or last_off is None:
        raise RuntimeError(f"seed {seed}: the reel did not finish ({loop.ctl.state})")
    limit = recipe.max_speed_m_min(geom.weight_sum)
    top = sorted(speeds)[len(speeds) // 2 :]
    steady = statistics.median(top)
    span = geom.last_pass_offset_m - geom.first_pass_offset_m
    start_scrap = (truth.l0_m - first_on) + geom.last_pass_offset_m
    stop_scrap = last_off - (truth.l0_m + length_m + geom.first_pass_offset_m)
    cmp = loop.compare()
    return {
        "seed": seed,
        "steady_speed_m_min": steady,
        "limit_m_min": limit,
        "speed_of_limit": steady / limit,
        "start_scrap_m": start_scrap,
        "stop_scrap_m": stop_scrap,
        "geometric_min_m": span,
        "metres": cmp.metres,
        "in_spec": cmp.in_spec,
        "false_accepts": len(cmp.false_accepts),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="reels (seeds)")
    ap.add_argument("--length", type=float, default=300.0, help="reel length, m")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--smoke", action="store_true", help="one short reel, compact line")
    args = ap.parse_args(argv)
    repeat, length, compact = (1, 20.0, True) if args.smoke else (args.repeat, args.length, False)

    t0 = time.monotonic()
    runs = [one_reel(seed, length, compact=compact) for seed in range(1, repeat + 1)]
    took_s = time.monotonic() - t0

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(
        f"{'seed':>4} {'speed m/min':>11} {'limit':>7} {'ratio':>7} "
        f"{'start scrap m':>13} {'stop scrap m':>12} {'min m':>6} {'in spec':>8} {'FA':>3}"
    )
    for r in runs:
        print(
            f"{r['seed']:>4} {r['steady_speed_m_min']:>11.2f} {r['limit_m_min']:>7.2f} "
            f"{r['speed_of_limit']:>7.4f} {r['start_scrap_m']:>13.1f} {r['stop_scrap_m']:>12.1f} "
            f"{r['geometric_min_m']:>6.1f} {r['in_spec']:>4}/{r['metres']:<3} "
            f"{r['false_accepts']:>3}"
        )
    summary = {
        "speed_of_limit": med("speed_of_limit"),
        "start_scrap_of_min": med("start_scrap_m") / med("geometric_min_m"),
        "stop_scrap_of_min": med("stop_scrap_m") / med("geometric_min_m"),
    }
    print()
    print(f"{'goal':40} {'measured (median)':>18}  goal")
    print(f"{'steady speed / physical limit':40} {summary['speed_of_limit']:>18.4f}  >= 0.99")
    print(
        f"{'start scrap / geometric minimum':40} {summary['start_scrap_of_min']:>18.3f}  "
        "as close to 1 as it gets"
    )
    print(
        f"{'stop scrap / geometric minimum':40} {summary['stop_scrap_of_min']:>18.3f}  "
        "as close to 1 as it gets"
    )
    print(f"\n{repeat} reel(s) of {length:g} m on simulated time in {took_s:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
