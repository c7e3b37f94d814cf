"""Records name the recipe bytes that were validated (issue 9): the hash is taken when
the recipe is loaded, never re-read from disk at reel start, and a reel started after
an interrupted one is resumed names the recipe actually in use."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from e2e_scenarios import TRUE_K, compact_config, endpoints, wait_for

from linectl.config import Recipe, load_config, load_recipe
from linectl.core.control import LineState
from linectl.service import LineService, ReelRequest, recipe_hash, select_recipe
from linectl.store import RecordStore
from simulators.server import SimulatedLine


def test_load_recipe_keeps_the_hash_of_the_bytes_it_validated(tmp_path: Path) -> None:
    cfg = load_config(compact_config(tmp_path), environ={})
    path = cfg.recipe_path("fast")
    raw = path.read_bytes()
    recipe = load_recipe(path, cfg)
    path.write_bytes(raw + b"\n# edited after loading\n")
    assert recipe.source_sha256 == hashlib.sha256(raw).hexdigest()
    assert recipe_hash(recipe, path) == hashlib.sha256(raw).hexdigest()
    # Built in code: no validated bytes, so the file it is said to come from is hashed.
    built = Recipe.model_validate(recipe.model_dump())
    assert built.source_sha256 is None
    assert recipe_hash(built, path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
async def test_a_reel_records_the_validated_bytes_not_the_file_at_start(tmp_path: Path) -> None:
    cfg = load_config(compact_config(tmp_path), environ={})
    recipe, path = select_recipe(cfg, None)
    validated = hashlib.sha256(path.read_bytes()).hexdigest()
    async with SimulatedLine(cfg, acc_port=0, cnv_port=0, seed=41, k_dose_true=TRUE_K) as sim:
        svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
        # The file changes (or goes) after validation: the records must not follow it.
        path.write_text(path.read_text() + "\n# edited after loading\n")
        svc.request_reel(ReelRequest("HASH-1", 2.0, "op"))
        svc_task = asyncio.create_task(svc.run(exit_when_done=True))
        try:
            await wait_for(lambda: svc.ctl.state is LineState.RUNNING, 30.0, "RUNNING")
        finally:
            svc.stop()
            await svc_task
    with RecordStore(cfg.line.records.path) as store:
        assert store.reel("HASH-1").recipe_hash == validated
