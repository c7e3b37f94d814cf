"""Store-and-forward through a broker outage: every record produced reaches a subscriber.

The acceptance figure of the MQTT records path (docs/mqtt.md, "Store-and-forward"): the
real LineService with its MQTT bridge (linectl.daemon.run_with_bridge) runs a reel over
Modbus TCP against the bundled simulators (compact test line, fast recipe), publishing
to a mosquitto with persistence on a free port (tests/broker.py). Part-way through the
reel the broker is stopped for `--outage-s` (default 60; SIGTERM, or SIGKILL with
`--kill-broker`), then started again, and the reel runs to its end.

A subscriber in its own process (paho, MQTT 5, QoS 1, persistent session: clean start
off, session expiry 1 h; the broker keeps its session through the restart) takes
`<prefix>/<line>/records/#` and keeps every message. The records produced are the
store's outbox rows (linectl.store.RecordStore.outbox_after; the store is fresh for the
run); a record is delivered when a message with its `seq` arrived. Printed, per kind
(metres, reel, alarm, audit) and in all: produced, produced while the broker was down,
delivered (distinct seq), lost, duplicates (extra copies; delivery is at least once),
delivered marked `historical`; then the bridge's reconnect after the broker's return
and the time from the broker's return until every record waiting then was acknowledged
(the bridge's outbox cursor passed it). Goal: nothing lost.

    .venv/bin/python bench/store_forward.py [--outage-s 60] [--length M] [--json FILE]

`--smoke`: a 3 s outage on a 10 m reel (used by the test suite; it checks that nothing
is lost). Not covered: a SIGKILL of the controller itself (the service would have to run
as its own process and be resumed); tests/test_mqtt.py checks that case on the bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the subscriber and the line set-up are shared
sys.path.insert(0, str(ROOT / "tests"))

import e2e_scenarios as sc  # noqa: E402
import telemetry_latency as tl  # noqa: E402
from broker import TestBroker  # noqa: E402

from linectl.daemon import run_with_bridge  # noqa: E402
from linectl.mqtt import CONSUMER, MqttBridge  # noqa: E402
from linectl.service import LineService, ReelRequest  # noqa: E402
from linectl.store import OutboxRow, RecordStore  # noqa: E402
from linectl.telemetry import RECORD_KINDS, Topics  # noqa: E402
from simulators.server import SimulatedLine  # noqa: E402

REEL_ID = "SF-1"


@dataclass
class Options:
    outage_s: float
    length_m: float | None
    outage_at_m: float | None
    kill_broker: bool


@dataclass(frozen=True, slots=True)
class Delivery:
    """The first copy of one record the subscriber received."""

    seq: int
    kind: str  # from the topic
    historical: bool
    recv_ms: float


def deliveries(sub: tl.Subscriber, base: str) -> tuple[dict[int, Delivery], int, list[str]]:
    """(first delivery by seq, record messages in all, problems: malformed or misfiled)."""
    head = f"{base}/records/"
    first: dict[int, Delivery] = {}
    total = 0
    problems: list[str] = []
    for m in sub.messages:
        # records/head (retained: the outbox's newest seq) announces records, is none.
        if not m.topic.startswith(head) or m.topic == f"{head}head":
            continue
        total += 1
        kind = m.topic[len(head) :]
        try:
            body = json.loads(m.payload)
            seq = int(body["seq"])
            historical = bool(body["historical"])
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{m.topic}: unreadable record ({exc})")
            continue
        if body.get("schema") != f"linectl.{kind}/1":
            problems.append(f"seq {seq} on {m.topic} has schema {body.get('schema')!r}")
        if seq not in first:
            first[seq] = Delivery(seq, kind, historical, m.recv_ms)
    return first, total, problems


def compare(
    rows: list[OutboxRow],
    got: dict[int, Delivery],
    total: int,
    outage: tuple[int, int],
) -> dict[str, Any]:
    """Per kind and in all: produced, during the outage, delivered, lost, duplicates,
    historical. `outage`: the seq range (exclusive, inclusive] written while down."""
    lo, hi = outage
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in (*RECORD_KINDS, "ALL"):
        mine = [r for r in rows if kind in ("ALL", r.kind)]
        seqs = {r.seq for r in mine}
        recv = [d for s, d in got.items() if s in seqs]
        by_kind[kind] = {
            "produced": len(mine),
            "during_outage": sum(lo < r.seq <= hi for r in mine),
            "delivered": len(recv),
            "lost": len(seqs) - len(recv),
            "historical": sum(d.historical for d in recv),
        }
    by_kind["ALL"]["duplicates"] = total - len(got)
    known = {r.seq: r.kind for r in rows}
    lost = sorted(set(known) - set(got))
    return {
        "by_kind": by_kind,
        "lost_seqs": lost[:50],
        "unknown_seqs": sorted(s for s in got if s not in known)[:50],
        "misfiled": sorted(s for s, d in got.items() if s in known and known[s] != d.kind)[:50],
    }


async def run(opts: Options, workdir: Path) -> dict[str, Any]:
    broker = TestBroker(workdir / "broker", persistence=True)
    tl.require_mosquitto(broker)
    await broker.start()
    cfg, recipe, recipe_path = tl.line_config(workdir, broker)
    base = Topics.for_line(cfg.line.mqtt.topic_prefix, cfg.line.line_id).base
    speed_m_s = tl.speed_limit_m_min(cfg, recipe) / 60.0
    # By default: 10 s of reel before the outage and about 15 s after the broker's return.
    length_m = opts.length_m or round(speed_m_s * (10.0 + opts.outage_s + 15.0) + 5.0)
    at_m = opts.outage_at_m if opts.outage_at_m is not None else min(10 * speed_m_s, length_m / 4)
    if not 0 < at_m < length_m:
        raise ValueError(f"the outage must start inside the reel: at {at_m} m of {length_m} m")
    sub = tl.Subscriber(
        broker.host,
        broker.port,
        f"{base}/records/#",
        f"bench-store-forward-{os.getpid()}",
        qos=1,
        persistent=True,
    )
    res: dict[str, Any] = {
        "broker": f"{broker.kind} on 127.0.0.1:{broker.port}, persistence on",
        "reel_length_m": length_m,
        "outage_at_m": round(at_m, 1),
        "broker_stop": "SIGKILL" if opts.kill_broker else "SIGTERM",
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        await sub.start()
        async with SimulatedLine(cfg, seed=1, k_dose_true=sc.TRUE_K) as sim:
            svc = LineService(cfg, recipe, recipe_path, **sc.endpoints(cfg, sim))
            svc.on_reel_start.append(lambda _r, counter_m: sim.plant.start_reel(counter_m))
            svc.request_reel(ReelRequest(REEL_ID, length_m, "bench"))
            task = asyncio.create_task(
                run_with_bridge(svc, exit_when_done=True, metrics_port=0), name="bench-line"
            )
            store = RecordStore(svc.store_path)  # a reader of its own
            try:
                await tl.wait_running(svc, task, 90.0)
                bridge = tl.find_bridge(svc)
                await tl.wait_until(
                    lambda: svc.ledger is not None and (svc.ledger.position_m or 0.0) >= at_m,
                    max(60.0, 3 * at_m / speed_m_s),
                    f"{at_m:.1f} m of reel",
                )
                res.update(
                    await _outage(
                        opts, broker=broker, svc=svc, bridge=bridge, store=store, task=task
                    )
                )
                # The reel runs to its end; run_with_bridge then flushes the outbox.
                await asyncio.wait_for(asyncio.shield(task), 3 * length_m / speed_m_s + 120.0)
                res["reel_finished"] = REEL_ID in svc.finished_reels
                res["missed_cycles"] = svc.stats.missed
                res["bridge"] = {
                    "connects": bridge.stats.connects,
                    "records_published": bridge.stats.records_published,
                    "live_dropped": bridge.stats.dropped,
                }
                rows = store.outbox_after(0, 10**9)
                produced = {r.seq for r in rows}
                # The last records and the broker's queued copies may still be on the way.
                t_wait = time.monotonic()
                while time.monotonic() - t_wait < 10.0:
                    if produced <= set(deliveries(sub, base)[0]):
                        break
                    await asyncio.sleep(0.05)
                res["cursor_at_end"] = store.outbox_cursor(CONSUMER)
                res["last_seq_at_end"] = store.outbox_last_seq()
            finally:
                store.close()
                svc.stop()
                await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 120.0)
    finally:
        await sub.stop()
        await broker.stop()
    got, total, problems = deliveries(sub, base)
    res.update(compare(rows, got, total, (res["seq_at_stop"], res["last_seq_at_return"])))
    res["problems"] = problems[:20]
    res["subscriber_sessions"] = sum(k == "C" for k, _, _ in sub.events)
    res["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


async def _outage(
    opts: Options,
    *,
    broker: TestBroker,
    svc: LineService,
    bridge: MqttBridge,
    store: RecordStore,
    task: asyncio.Task[None],
) -> dict[str, Any]:
    await broker.stop(kill=opts.kill_broker)
    t_down = tl.now_ms()
    # Read once the broker is gone: every later record waits in the outbox.
    seq_at_stop = store.outbox_last_seq()
    cursor_at_stop = store.outbox_cursor(CONSUMER)
    await asyncio.sleep(opts.outage_s)
    if task.done():
        raise RuntimeError(
            "the reel ended while the broker was down (its bridge stops unflushed): give a "
            "longer --length or a shorter --outage-s"
        )
    last_at_return = store.outbox_last_seq()
    cursor_at_return = store.outbox_cursor(CONSUMER)
    connects = bridge.stats.connects
    await broker.start()
    t_return = tl.now_ms()
    t_reconnect: float | None = None
    deadline = time.monotonic() + 120.0
    while True:
        if t_reconnect is None and bridge.stats.connects > connects:
            t_reconnect = tl.now_ms()
        if t_reconnect is not None and store.outbox_cursor(CONSUMER) >= last_at_return:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("the outbox backlog was not replayed within 120 s")
        await asyncio.sleep(0.002)
    t_backlog0 = tl.now_ms()
    return {
        "outage_s": round((t_return - t_down) / 1000.0, 2),
        "seq_at_stop": seq_at_stop,
        "cursor_at_stop": cursor_at_stop,
        "last_seq_at_return": last_at_return,
        "backlog_at_return": last_at_return - cursor_at_return,
        "position_at_return_m": round(svc.ledger.position_m or 0.0, 1) if svc.ledger else None,
        "bridge_reconnect_after_return_s": round((t_reconnect - t_return) / 1000.0, 3),
        "backlog_zero_after_return_s": round((t_backlog0 - t_return) / 1000.0, 3),
        "replay_s": round((t_backlog0 - t_reconnect) / 1000.0, 3),
    }


def print_table(res: dict[str, Any]) -> list[tuple[str, Any, str, bool | None]]:
    head = (
        f"{'kind':8} {'produced':>8} {'in outage':>9} {'delivered':>9} {'lost':>5} "
        f"{'dupl':>5} {'historical':>10}"
    )
    print(head)
    print("-" * len(head))
    for kind, f in res["by_kind"].items():
        print(
            f"{kind:8} {f['produced']:>8} {f['during_outage']:>9} {f['delivered']:>9} "
            f"{f['lost']:>5} {f.get('duplicates', ''):>5} {f['historical']:>10}"
        )
    print("(dupl: extra copies received, all kinds; in outage: written while the broker was down)")
    a = res["by_kind"]["ALL"]
    strays = len(res["unknown_seqs"]) + len(res["misfiled"])
    goals: list[tuple[str, Any, str, bool | None]] = [
        ("records lost", a["lost"], "0", a["lost"] == 0),
        ("records delivered / produced", f"{a['delivered']}/{a['produced']}", "all", None),
        ("duplicates (at least once)", a["duplicates"], "", None),
        ("unknown or misfiled seqs", strays, "0", strays == 0),
        (f"broker outage ({res['broker_stop']}), s", res["outage_s"], "", None),
        ("backlog at broker return, records", res["backlog_at_return"], "", None),
        ("bridge reconnect after return, s", res["bridge_reconnect_after_return_s"], "", None),
        ("replay: reconnect to backlog 0, s", res["replay_s"], "", None),
        ("broker return to backlog 0, s", res["backlog_zero_after_return_s"], "", None),
        ("reel finished", res["reel_finished"], "True", res["reel_finished"]),
        (
            "outbox cursor at end / last seq",
            f"{res['cursor_at_end']}/{res['last_seq_at_end']}",
            "",
            None,
        ),
    ]
    print()
    print(f"{'figure':40} {'measured':>12}  {'goal':>6}  met")
    for name, val, goal, met in goals:
        m = "" if met is None else ("yes" if met else "NO")
        print(f"{name:40} {val!s:>12}  {goal:>6}  {m}")
    print(
        f"\nbroker {res['broker']}; reel {res['reel_length_m']} m, outage from "
        f"{res['outage_at_m']} m; missed cycles {res['missed_cycles']}; bridge connects "
        f"{res['bridge']['connects']}, records published {res['bridge']['records_published']}, "
        f"live values dropped {res['bridge']['live_dropped']}; subscriber sessions "
        f"{res['subscriber_sessions']}"
    )
    if res["lost_seqs"]:
        print(f"lost seqs (first 50): {res['lost_seqs']}")
    for p in res["problems"]:
        print(f"problem: {p}")
    print(
        "load average (1, 5, 15 min): "
        f"start {res['load_avg_start']}, end {res['load_avg_end']}; {os.cpu_count()} CPUs"
    )
    return goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--outage-s", type=float, default=60.0, help="broker down this long, s")
    ap.add_argument(
        "--length", type=float, help="reel length, m (default: ~10 s before, ~15 s after)"
    )
    ap.add_argument("--outage-at", type=float, help="reel position at which the broker stops, m")
    ap.add_argument(
        "--kill-broker", action="store_true", help="SIGKILL the broker (default SIGTERM)"
    )
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--smoke", action="store_true", help="3 s outage on a 10 m reel")
    args = ap.parse_args(argv)
    if args.smoke:
        # The reel must outlast the outage and the bridge's reconnect backoff (up to
        # reconnect_max_s): a bridge stopped before it reconnects leaves the rest in the
        # outbox for the next run, which this run would count as lost.
        args.outage_s, args.length, args.outage_at = 3.0, 10.0, 1.5
    if args.outage_s <= 0:
        ap.error(f"--outage-s must be positive, not {args.outage_s}")
    if args.length is not None and args.length <= 0:
        ap.error(f"--length must be positive, not {args.length}")
    opts = Options(args.outage_s, args.length, args.outage_at, args.kill_broker)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="store-forward-") as tmp:
        res = asyncio.run(run(opts, Path(tmp)))
    res["took_s"] = round(time.monotonic() - t0, 1)
    goals = print_table(res)
    print(f"took {res['took_s']:.0f} s")
    if args.json:
        res["goals"] = [{"name": n, "measured": v, "goal": g, "met": m} for n, v, g, m in goals]
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
