"""Modbus link throughput and reconnect time against the bundled simulator.

Runs, side by side in one process and against one simulated line:
  1. a bare pymodbus client loop reading the same blocks the link plans,
  2. linectl's PlcLink.poll() loop,
and prints polls/s of each and their ratio (goal: link >= 0.8 of bare), then the time
from a simulated PLC restart until the link delivers GOOD data again (goal: < 1 s).

    .venv/bin/python bench/link_throughput.py [--seconds 5] [--rounds 3] [--json FILE]

`--smoke` runs a short version (used by the test suite so the script never rots).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from linectl.config import load_config
from linectl.modbus.link import PlcLink
from linectl.modbus.plan import plan_reads
from linectl.quality import Quality
from simulators.server import SimulatedLine

ROOT = Path(__file__).resolve().parents[1]


async def bare_loop(port: int, blocks: list[tuple[str, int, int]], seconds: float) -> float:
    """Polls/s of a plain pymodbus client reading the same blocks, no decoding."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0)
    await client.connect()
    try:
        n = 0
        t_end = time.perf_counter() + seconds
        t0 = time.perf_counter()
        while time.perf_counter() < t_end:
            for table, address, count in blocks:
                if table == "holding":
                    rr = await client.read_holding_registers(address, count=count)
                else:
                    rr = await client.read_input_registers(address, count=count)
                if rr.isError():
                    raise RuntimeError(f"bare client got {rr}")
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        client.close()


async def link_loop(link: PlcLink, seconds: float) -> float:
    """Polls/s of the linectl link (plan, read, decode, quality)."""
    n = 0
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        snap = await link.poll()
        if not snap.ok:
            raise RuntimeError("link poll was not GOOD during the throughput run")
        n += 1
    return n / (time.perf_counter() - t0)


async def wait_good(link: PlcLink, deadline_s: float) -> float | None:
    """Seconds until a poll is all GOOD, polling every 10 ms; None past the deadline."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline_s:
        snap = await link.poll()
        if snap.ok and snap.get("clock").quality is Quality.GOOD:
            return time.perf_counter() - t0
        await asyncio.sleep(0.01)
    return None


async def run(seconds: float, rounds: int, restarts: int) -> dict[str, object]:
    cfg = load_config(ROOT / "config")
    rmap = cfg.accelerator_map
    async with SimulatedLine(cfg) as line:
        endpoint = cfg.line.accelerator.model_copy(update={"port": line.acc_port})
        blocks = [(b.table, b.address, b.count) for b in plan_reads(rmap, endpoint.max_gap)]
        bare, linked = [], []
        async with PlcLink("accelerator", endpoint, rmap) as link:
            await wait_good(link, 5.0)
            for _ in range(rounds):  # interleaved so drift hits both alike
                bare.append(await bare_loop(line.acc_port, blocks, seconds))
                linked.append(await link_loop(link, seconds))
            reconnect_s: list[float] = []
            down_s = 0.5
            for _ in range(restarts):
                await line.restart("accelerator", down_s=down_s)
                # restart() returns when the PLC is back: time from its return to GOOD data.
                t = await wait_good(link, 10.0)
                if t is not None:
                    reconnect_s.append(t)
    b, lk = statistics.median(bare), statistics.median(linked)
    return {
        "blocks_per_poll": len(blocks),
        "bare_polls_per_s": round(b, 1),
        "link_polls_per_s": round(lk, 1),
        "ratio": round(lk / b, 3),
        "goal_ratio": 0.8,
        "reconnect_s_median": round(statistics.median(reconnect_s), 3) if reconnect_s else None,
        "reconnect_s_max": round(max(reconnect_s), 3) if reconnect_s else None,
        "reconnects_measured": len(reconnect_s),
        "restarts": restarts,
        "goal_reconnect_s": 1.0,
        "seconds_per_round": seconds,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each timed round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--restarts", type=int, default=5, help="PLC restarts for the reconnect time")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--smoke", action="store_true", help="short run for the test suite")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds, args.restarts = 0.3, 1, 1
    res = asyncio.run(run(args.seconds, args.rounds, args.restarts))
    rows = [
        ("blocks (requests) per poll", res["blocks_per_poll"], "1 per table"),
        ("bare pymodbus polls/s", res["bare_polls_per_s"], ""),
        ("linectl link polls/s", res["link_polls_per_s"], ""),
        ("ratio link/bare", res["ratio"], ">= 0.8"),
        ("reconnect after restart, median s", res["reconnect_s_median"], "< 1.0"),
        ("reconnect after restart, max s", res["reconnect_s_max"], "< 1.0"),
    ]
    print(f"{'figure':38} {'measured':>10}  goal")
    for name, val, goal in rows:
        print(f"{name:38} {val!s:>10}  {goal}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
