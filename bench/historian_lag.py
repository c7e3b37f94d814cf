"""Line-to-historian lag with N lines: from a record's commit in a line's store to its
commit in PostgreSQL (issue 13: p99 <= 1 s at 10 lines).

The lines run in a child process (as they would on their own computers, they must not
share the historian's event loop): each is a record store (linectl.store.RecordStore)
written as the service writes it, and the real MQTT bridge (linectl.mqtt.MqttBridge)
that publishes its outbox, announces its head and answers replays. Each line writes a
metres record every --batch-s seconds holding the metres of that time at --speed-m-min
(one reel after another of --reel-m metres, a reel start and end between them, an
operator action now and then). The historian (linectl.historian.service.HistorianService,
the `linectl historian run` service) runs in this process against a fresh database on the
development PostgreSQL (tests/pg_support.py) and a mosquitto on a free port
(tests/broker.py). The lag of a record is the historian's commit time minus the record's
time (`t_ms`, the line's wall clock when it wrote the record; same host, same clock).

Printed: records and metres per second, lag p50/p95/p99/max over the measured period
(after --warmup-s), and at the end whether the historian holds every record of every
line (by number). Goal: p99 <= 1000 ms at 10 lines.

    python bench/historian_lag.py [--lines 10] [--duration-s 60] [--speed-m-min 200]
                                  [--batch-s 1.0] [--json FILE]

`--smoke`: 2 lines for 4 s (the test suite's check that the script works).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import benchlib  # noqa: E402
from broker import TestBroker  # noqa: E402
from pg_support import fresh_database  # noqa: E402

from linectl.config import MqttConfig, Records  # noqa: E402
from linectl.core.ledger import MetreRecord, Verdict  # noqa: E402
from linectl.historian.config import HistorianConfig  # noqa: E402
from linectl.historian.pg import HistorianDB  # noqa: E402
from linectl.historian.reader import HistorianReader  # noqa: E402
from linectl.historian.service import HistorianService  # noqa: E402
from linectl.store import RecordStore, ReelInfo  # noqa: E402

HID = "plant"
RECIPE_JSON = json.dumps(
    {"product": "PV", "version": "3", "min_dose_kgy": 105.0, "target_dose_kgy": 120.0,
     "max_dose_kgy": 140.0}
)  # fmt: skip


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------- the lines (child)


async def _line(
    line_id: str, db: Path, port: int, opts: argparse.Namespace, stop: asyncio.Event
) -> None:
    from test_mqtt import FakeLine  # the bridge's line endpoint: records only here

    from linectl.mqtt import MqttBridge

    cfg = MqttConfig(enabled=True, host="127.0.0.1", port=port, keepalive_s=5)
    bridge = MqttBridge(
        FakeLine(),
        cfg,
        line_id=line_id,
        store_path=db,
        records=Records(historians=[HID]),
    )
    task = asyncio.create_task(bridge.run())
    per_batch_m = opts.speed_m_min / 60.0 * opts.batch_s
    store = RecordStore(db)
    reel_no, done_m, carry = 0, 0, 0.0
    reel_id = ""
    try:
        while not stop.is_set():
            if not reel_id:
                reel_no += 1
                reel_id = f"{line_id}-R{reel_no}"
                t = now_iso()
                info = ReelInfo(reel_id, line_id, "PV", "3", "ab" * 32, RECIPE_JSON, "alice",
                                float(opts.reel_m), t)  # fmt: skip
                await asyncio.to_thread(store.open_reel, info)
                await asyncio.to_thread(
                    store.audit, t, "op-1", "start_reel", {"reel_id": reel_id}, True,
                    reel_id=reel_id,
                )  # fmt: skip
                done_m, carry = 0, 0.0
            carry += per_batch_m
            n = min(int(carry), opts.reel_m - done_m)
            carry -= n
            if n:
                recs = [
                    MetreRecord(i, 120.0, 118.5, 121.5, Verdict.IN_SPEC)
                    for i in range(done_m, done_m + n)
                ]
                await asyncio.to_thread(store.add_metres, reel_id, recs, now_iso())
                done_m += n
            if done_m >= opts.reel_m:
                await asyncio.to_thread(
                    store.close_reel, reel_id, now_iso(), "planned length reached"
                )
                reel_id = ""
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), opts.batch_s)
        # Published before the bridge goes: the parent waits for the historian to hold all.
        await asyncio.sleep(1.0)
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 20.0)
        store.close()


async def lines_main(opts: argparse.Namespace) -> int:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    workdir = Path(opts.workdir)
    await asyncio.gather(
        *(
            _line(f"line-{i + 1:02d}", workdir / f"line-{i + 1:02d}.sqlite", opts.port, opts, stop)
            for i in range(opts.lines)
        )
    )
    return 0


# ---------------------------------------------------------------------- the historian (parent)


def _pct(xs: list[int], q: float) -> float:
    return benchlib.pct([float(x) for x in xs], q) if xs else float("nan")


async def measure(opts: argparse.Namespace, dsn: str, workdir: Path) -> dict[str, Any]:
    broker = TestBroker(workdir / "broker")
    await broker.start()
    line_ids = [f"line-{i + 1:02d}" for i in range(opts.lines)]
    cfg = HistorianConfig.model_validate(
        {
            "historian": {"id": HID, "lines": line_ids},
            "mqtt": {"host": broker.host, "port": broker.port},
            "postgres": {"dsn": dsn},
        }
    )
    db = await HistorianDB.open(dsn)
    hist = HistorianService(cfg, db, keep_lag=True)
    htask = asyncio.create_task(hist.run())
    child: asyncio.subprocess.Process | None = None
    try:
        while not hist.stats.connected:  # noqa: ASYNC110 (a counter, not an event)
            await asyncio.sleep(0.05)
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--lines-child", "--port", str(broker.port),
            "--workdir", str(workdir), "--lines", str(opts.lines),
            "--speed-m-min", str(opts.speed_m_min), "--batch-s", str(opts.batch_s),
            "--reel-m", str(opts.reel_m),
        )  # fmt: skip
        cpu0 = time.process_time()
        await asyncio.sleep(opts.warmup_s)
        hist.stats.lag_ms.clear()
        stored0, t0 = hist.stats.stored, time.monotonic()
        await asyncio.sleep(opts.duration_s)
        lag = list(hist.stats.lag_ms)
        stored, elapsed_s = hist.stats.stored - stored0, time.monotonic() - t0
        cpu_s = time.process_time() - cpu0
        child.send_signal(signal.SIGTERM)
        await asyncio.wait_for(child.wait(), 60.0)
        child = None
        # Every record of every line held, by number?
        complete: dict[str, bool] = {}
        deadline = time.monotonic() + 30.0
        for line_id in line_ids:
            with RecordStore(workdir / f"{line_id}.sqlite") as s:
                last, store_id = s.outbox_last_seq(), s.store_id
            while True:
                with HistorianReader(dsn) as r:
                    held = r.held_seqs(line_id, store_id)
                complete[line_id] = held == list(range(1, last + 1))
                if complete[line_id] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
        with HistorianReader(dsn) as r:
            metres = sum(int(x["metres_recorded"]) for x in r.reel_list())
    finally:
        if child is not None:
            child.kill()
            await child.wait()
        hist.stop()
        await asyncio.wait_for(htask, 30.0)
        await db.close()
        await broker.stop()
    return {
        "lines": opts.lines,
        "duration_s": round(elapsed_s, 2),
        "records_per_s": round(stored / elapsed_s, 1),
        "metres_held": metres,
        "lag_ms": {
            "n": len(lag),
            "p50": _pct(lag, 50),
            "p95": _pct(lag, 95),
            "p99": _pct(lag, 99),
            "max": max(lag) if lag else None,
        },
        "historian_cpu_s": round(cpu_s, 2),
        "replays_requested": hist.stats.replays_requested,
        "complete": complete,
        "goal_met": bool(lag) and _pct(lag, 99) <= 1000.0 and all(complete.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=10)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--speed-m-min", type=float, default=200.0)
    p.add_argument("--batch-s", type=float, default=1.0)
    p.add_argument("--reel-m", type=int, default=2000)
    p.add_argument("--json", type=Path)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--lines-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.lines_child:
        return asyncio.run(lines_main(opts))
    if opts.smoke:
        opts.lines, opts.duration_s, opts.warmup_s, opts.reel_m = 2, 4.0, 1.0, 100
    load0, t0 = os.getloadavg(), time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="linectl-hlag-") as tmp,
        fresh_database("historian_lag") as dsn,
    ):
        res = asyncio.run(measure(opts, dsn, Path(tmp)))
    res["host"] = benchlib.host_facts(load0, t0)
    lag = res["lag_ms"]
    print(
        f"{res['lines']} lines, {res['duration_s']} s measured: {res['records_per_s']} records/s "
        f"into PostgreSQL; lag p50 {lag['p50']:.0f} ms, p95 {lag['p95']:.0f} ms, "
        f"p99 {lag['p99']:.0f} ms, max {lag['max']} ms over {lag['n']} records "
        f"(goal p99 <= 1000 ms); every record held: {all(res['complete'].values())}; "
        f"replays asked: {res['replays_requested']}"
    )
    print(json.dumps(res["host"]))
    if opts.json:
        opts.json.write_text(json.dumps(res, indent=2))
    return 0 if all(res["complete"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
