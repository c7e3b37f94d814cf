"""Read/write planning and block decoding (pure, no event loop)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from linectl.codec import CodecError, encode
from linectl.config import LoadedConfig, RegisterMap
from linectl.errors import LocalError
from linectl.modbus.plan import (
    MAX_READ_REGISTERS,
    decode_block,
    plan_reads,
    plan_writes,
    write_plan,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def _acc_data() -> dict[str, Any]:
    with (CONFIG_DIR / "registers" / "accelerator.toml").open("rb") as fh:
        return tomllib.load(fh)


def _moved(field: str, address: int) -> RegisterMap:
    """The accelerator map with one field moved (to make holes)."""
    data = _acc_data()
    data["fields"][field]["address"] = address
    return RegisterMap.model_validate(data)


def test_default_maps_one_block_per_table(cfg: LoadedConfig) -> None:
    for plc in ("accelerator", "conveyor"):
        rmap = cfg.register_map(plc)
        blocks = plan_reads(rmap, cfg.endpoint(plc).max_gap)
        assert [b.table for b in blocks] == ["holding", "input"]
        assert [b.function_code for b in blocks] == [3, 4]
        for b in blocks:
            fields = rmap.by_table[b.table]
            assert b.address == fields[0].address
            assert b.end == fields[-1].end
            assert {f.name for f in b.fields} == {f.name for f in fields}


def test_acc_default_block_extent(cfg: LoadedConfig) -> None:
    hold, inp = plan_reads(cfg.accelerator_map)
    assert (hold.address, hold.count) == (0, 9)
    assert (inp.address, inp.count) == (0, 15)


def test_hole_splits_unless_max_gap_covers_it() -> None:
    # clock normally at 13..14 right after trip_count (12); at 18 it leaves a 5-register hole.
    rmap = _moved("clock", 18)
    inputs = [b for b in plan_reads(rmap) if b.table == "input"]
    assert [(b.address, b.count) for b in inputs] == [(0, 13), (18, 2)]
    assert [b.table for b in plan_reads(rmap, max_gap=4)].count("input") == 2
    joined = [b for b in plan_reads(rmap, max_gap=5) if b.table == "input"]
    assert [(b.address, b.count) for b in joined] == [(0, 20)]


def test_over_125_registers_splits_even_with_huge_gap() -> None:
    rmap = _moved("clock", 200)
    inputs = [b for b in plan_reads(rmap, max_gap=124) if b.table == "input"]
    assert [(b.address, b.count) for b in inputs] == [(0, 13), (200, 2)]
    for b in plan_reads(rmap, max_gap=124):
        assert b.count <= MAX_READ_REGISTERS


def test_block_never_exceeds_limit_at_boundary() -> None:
    # clock at 123..124 fits exactly in a 125-register block from 0; at 124 it does not.
    assert [b.count for b in plan_reads(_moved("clock", 123), max_gap=124)][-1] == 125
    split = [b for b in plan_reads(_moved("clock", 124), max_gap=124) if b.table == "input"]
    assert [(b.address, b.count) for b in split] == [(0, 13), (124, 2)]


def test_bad_planning_arguments() -> None:
    rmap = _moved("clock", 13)
    with pytest.raises(LocalError):
        plan_reads(rmap, max_gap=-1)
    with pytest.raises(LocalError):
        plan_reads(rmap, max_registers=126)


SAMPLE_VALUES: dict[str, float] = {
    "command": 0b011,
    "beam_current_sp": 42.5,
    "energy_sp": 1.5,
    "scan_width_sp": 120.0,
    "watchdog": 65535,
    "watchdog_timeout": 500,
    "status": 0b1_0111_1001,
    "beam_current": 41.93,
    "energy": 1.498,
    "scan_width": 119.7,
    "vacuum": 2.5e-5,
    "charge_total": 4_000_000_123,
    "fault_code": 1,
    "trip_count": 65535,
    "clock": 0xFFFF_FFFE,
}


@pytest.mark.parametrize("word_order", ["ABCD", "CDAB", "BADC", "DCBA"])
def test_decode_round_trip(word_order: str) -> None:
    data = _acc_data()
    for f in data["fields"].values():
        if f["type"] in ("float32", "uint32"):
            f["word_order"] = word_order
    data["fields"]["clock"]["address"] = 16  # a hole, read across with max_gap
    rmap = RegisterMap.model_validate(data)
    for max_gap in (0, 2):
        for block in plan_reads(rmap, max_gap=max_gap):
            regs = [0xDEAD] * block.count  # unmapped registers hold junk
            for f in block.fields:
                lo = f.address - block.address
                regs[lo : lo + f.width] = encode(f, SAMPLE_VALUES[f.name])
            decoded = decode_block(block, regs)
            assert set(decoded) == {f.name for f in block.fields}
            for name, v in decoded.items():
                if rmap.fields[name].type == "float32":
                    assert math.isclose(v, SAMPLE_VALUES[name], rel_tol=1e-6)
                else:
                    assert v == SAMPLE_VALUES[name]
                    assert isinstance(v, int)


def test_decode_block_rejects_wrong_length(cfg: LoadedConfig) -> None:
    block = plan_reads(cfg.accelerator_map)[0]
    with pytest.raises(CodecError, match="expected 9 registers, got 8"):
        decode_block(block, [0] * 8)


def test_plan_writes_joins_adjacent_fields(cfg: LoadedConfig) -> None:
    rmap = cfg.accelerator_map
    runs = plan_writes(rmap, {"watchdog": 7, "beam_current_sp": 10.0, "energy_sp": 1.5})
    assert [(r.address, len(r.registers), r.function_code) for r in runs] == [
        (1, 4, 16),
        (7, 1, 6),
    ]
    assert runs[0].registers == (
        *encode(rmap.field("beam_current_sp"), 10.0),
        *encode(rmap.field("energy_sp"), 1.5),
    )


def test_plan_writes_refuses_before_io(cfg: LoadedConfig) -> None:
    rmap = cfg.accelerator_map
    with pytest.raises(LocalError, match="read-only"):
        plan_writes(rmap, {"beam_current": 1.0})
    with pytest.raises(LocalError, match="no field 'nope'"):
        plan_writes(rmap, {"nope": 1.0})
    with pytest.raises(LocalError, match="watchdog"):
        plan_writes(rmap, {"watchdog": 70000})


def test_a_plan_kept_across_cycles_encodes_as_a_fresh_one(cfg: LoadedConfig) -> None:
    """The link keeps one plan per set of names and it remembers each field's last
    encoding: whatever the values do from call to call (repeat, change, 0.0 to -0.0,
    True to 1, a refused value in between), its runs are a fresh plan's."""
    rmap = cfg.accelerator_map
    names = ("command", "beam_current_sp", "energy_sp", "scan_width_sp", "watchdog")
    plan = write_plan(rmap, names)
    steps: list[dict[str, Any]] = [
        {"command": 1, "beam_current_sp": 10.0, "energy_sp": 1.5, "scan_width_sp": 100.0},
        {"command": 1, "beam_current_sp": 10.0, "energy_sp": 1.5, "scan_width_sp": 100.0},
        {"command": 3, "beam_current_sp": 12.5, "energy_sp": 1.5, "scan_width_sp": 100.0},
        {"command": 3, "beam_current_sp": 0.0, "energy_sp": 1.5, "scan_width_sp": 100.0},
        {"command": 3, "beam_current_sp": -0.0, "energy_sp": 1.5, "scan_width_sp": 100.0},
        {"command": True, "beam_current_sp": -0.0, "energy_sp": 1.5, "scan_width_sp": 100.0},
        {"command": 1, "beam_current_sp": 12.5, "energy_sp": 1.5, "scan_width_sp": 100.0},
    ]
    for i, step in enumerate(steps):
        values = {**step, "watchdog": i}
        assert plan.runs(values) == plan_writes(rmap, values), step
    # A refused value raises and leaves the remembered encoding as it was.
    with pytest.raises(LocalError, match="watchdog"):
        plan.runs({**steps[-1], "watchdog": 70000})
    values = {**steps[-1], "watchdog": 7}
    assert plan.runs(values) == plan_writes(rmap, values)
    bits = [r.registers for r in plan.runs({**steps[4], "watchdog": 7})]
    assert bits != [r.registers for r in plan.runs({**steps[3], "watchdog": 7})]  # -0.0
