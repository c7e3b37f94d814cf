"""`linectl run --reel` gets the checks an MQTT start_reel gets (issue 9): a bad id or
operator is refused before anything runs; an id the records hold already is refused on
the line, before it moves, and the run says so in its exit code."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from e2e_scenarios import TRUE_K, compact_config, endpoints, open_reel_in_records

from linectl.cli import main
from linectl.config import load_config
from linectl.core.control import LineState
from linectl.service import LineService, ReelRequest, select_recipe
from linectl.store import RecordStore
from simulators.server import SimulatedLine

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--reel", "R 1", "--length", "10"], "reel_id 'R 1' does not match"),
        (["--reel", "R1\n", "--length", "10"], "reel_id"),
        (["--reel", "R1", "--length", "10", "--operator", "x" * 201], "operator is longer"),
        (["--reel", "R1", "--length", "10", "--operator", "a\x07b"], "control character"),
    ],
)
def test_run_refuses_a_bad_reel_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    db = tmp_path / "records.sqlite"
    assert main(["run", "--config", str(CONFIG_DIR), "--db", str(db), *argv]) == 2
    assert says in capsys.readouterr().err
    assert not db.exists(), "a refused start created records"


@pytest.mark.slow
async def test_a_reel_id_in_the_records_is_refused_before_the_line_moves(
    tmp_path: Path,
) -> None:
    cfg = load_config(compact_config(tmp_path), environ={})
    recipe, path = select_recipe(cfg, None)
    open_reel_in_records(cfg, "USED", 5.0)
    with RecordStore(cfg.line.records.path) as store:
        store.close_reel("USED", "2026-12-03T11:00:00.000Z", "planned length reached")
    async with SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=42, k_dose_true=TRUE_K) as sim:
        svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
        svc.request_reel(ReelRequest("USED", 3.0, "op"))
        await asyncio.wait_for(svc.run(exit_when_done=True), 30.0)
        assert not sim.plant.conveyor.running
    assert svc.reel_refused is not None
    assert "exists already" in svc.reel_refused
    assert LineState.STARTING not in {t.new for t in svc.ctl.transitions}
    with RecordStore(cfg.line.records.path) as store:
        assert [r.reel_id for r in store.reels()] == ["USED"]
        assert store.reel("USED").state == "closed"
        assert store.metres("USED") == []
