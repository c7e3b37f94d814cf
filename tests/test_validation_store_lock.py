"""SIGTERM with the record database locked by another process (issue 10, item 6e).

Found by attack: with an `sqlite3` shell holding BEGIN EXCLUSIVE on the records, SIGTERM
took 45 s (here 108 s) to exit: every queued write waited out a 10 s busy timeout in turn.
Now the daemon stops the line safely, gives the lock a bounded wait, says loudly what it
could not store, exits; and a restart, once the lock is gone, takes the reel up from its
last stored checkpoint, every metre recorded once, none in spec that is not.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from e2e_scenarios import TRUE_K, compact_config, count_metres, start_counter, wait_for
from test_store import DB_LOCKER

from linectl.config import load_config
from linectl.core.ledger import Verdict
from linectl.service import select_recipe
from linectl.store import RecordStore
from simulators.server import SimulatedLine

pytestmark = pytest.mark.slow


async def test_sigterm_with_the_records_locked_exits_promptly_and_loses_no_metre(
    tmp_path: Path,
) -> None:
    cfg_dir = compact_config(tmp_path)
    cfg = load_config(cfg_dir, environ={})
    db = tmp_path / "records.sqlite"
    acc_port, cnv_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}
    env |= {
        "LINECTL_ACCELERATOR__PORT": str(acc_port),
        "LINECTL_CONVEYOR__PORT": str(cnv_port),
        "LINECTL_METRICS__PORT": "0",
    }
    cmd = [sys.executable, "-m", "linectl", "run", "--config", str(cfg_dir)]
    length = 30
    async with SimulatedLine(
        cfg, acc_port=acc_port, cnv_port=cnv_port, seed=11, k_dose_true=TRUE_K
    ) as sim:
        first = await asyncio.create_subprocess_exec(
            *cmd,
            "--reel",
            "LOCKED",
            "--length",
            str(length),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        locker: subprocess.Popen[str] | None = None
        try:
            await wait_for(lambda: start_counter(db, "LOCKED") is not None, 60.0, "reel start")
            counter = start_counter(db, "LOCKED")
            assert counter is not None
            sim.plant.start_reel(counter)
            await wait_for(lambda: count_metres(db, "LOCKED") >= 5, 60.0, "5 metres")
            locker = subprocess.Popen(  # noqa: ASYNC220 - a helper that only holds a lock
                [sys.executable, "-c", DB_LOCKER, str(db)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert locker.stdout is not None
            assert await asyncio.to_thread(locker.stdout.readline) == "locked\n"
            stored_before = count_metres(db, "LOCKED")
            await asyncio.sleep(3.0)  # writes queue up behind the lock, as in the attack
            first.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            # A hang guard, not a timing assertion: it took 108 s before the fix.
            _out, err = await asyncio.wait_for(first.communicate(), 60.0)
            took_s = time.monotonic() - t0
        finally:
            if first.returncode is None:
                first.kill()
                await first.wait()
            if locker is not None and locker.stdin is not None:
                locker.stdin.close()  # the lock goes, as when the shell ends its transaction
                await asyncio.to_thread(locker.wait, 30)
        log = err.decode()
        assert first.returncode == 0, log[-3000:]
        print(f"SIGTERM to exit with the records locked: {took_s:.1f} s")
        # The line was made safe by linectl itself.
        assert not sim.plant.accelerator.beam_on
        assert not sim.plant.accelerator.watchdog_trip
        await wait_for(lambda: not sim.plant.conveyor.running, 10.0, "the line stopped")
        assert sim.plant.truth.burns == []
        # What could not be stored is said, loudly, with what it was.
        assert "NOT STORED" in log
        assert "record write(s) NOT STORED, the database was locked" in log
        assert "of reel LOCKED" in log
        # Nothing was written while the lock was held, and what was stored before stays.
        assert count_metres(db, "LOCKED") == stored_before

        # The lock is gone: a restart resumes the reel from its last stored checkpoint.
        second = await asyncio.create_subprocess_exec(
            *cmd,
            "--resume",
            "--reset-faults",
            "--exit-after-reel",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _out, err2 = await asyncio.wait_for(second.communicate(), 120.0)
        finally:
            if second.returncode is None:
                second.kill()
                await second.wait()
        assert second.returncode == 0, err2.decode()[-3000:]
        with RecordStore(db) as store:
            metres = store.metres("LOCKED")
            reel = store.reel("LOCKED")
            assert store.integrity_check() == "ok"
        assert reel.state == "closed"
        # Every metre recorded exactly once; none in spec whose true dose is not.
        assert [m.index for m in metres] == list(range(length))
        recipe, _ = select_recipe(cfg, None)
        for m in metres:
            if m.verdict is Verdict.IN_SPEC:
                true = sim.plant.truth.dose_kgy(m.index)
                assert recipe.min_dose_kgy <= true <= recipe.max_dose_kgy, m
        assert sim.plant.truth.burns == []
