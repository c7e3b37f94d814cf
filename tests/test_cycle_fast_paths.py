"""The control cycle's cheaper paths (issue 9) give what the plain ones give.

BlockDecoder against codec.decode field by field, Snapshot.value against get().value,
a link's cached write plan against plan_writes, Outputs.changed against
dataclasses.replace, a report's live values (made when read) against the line's at
that cycle.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from linectl.codec import BlockDecoder, CodecError, decode
from linectl.config import LoadedConfig, RegisterField, RegisterType, WordOrder
from linectl.core.control import Outputs
from linectl.errors import LocalError
from linectl.modbus.link import BlockRead, PlcLink, Snapshot
from linectl.modbus.plan import plan_reads, plan_writes, write_plan
from linectl.quality import Quality
from linectl.service import select_recipe

TYPES: tuple[RegisterType, ...] = ("bits", "uint16", "int16", "uint32", "int32", "float32")
WORD_ORDERS: tuple[WordOrder, ...] = ("ABCD", "CDAB", "BADC", "DCBA")
WIDTH = {"bits": 1, "uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2}


def _same(a: float | int, b: float | int) -> bool:
    """Equal value and type; NaN equals NaN (float32 registers can hold one)."""
    if type(a) is not type(b):
        return False
    return a == b or (math.isnan(a) and math.isnan(b))


@st.composite
def blocks(draw: Any) -> tuple[list[RegisterField], int, list[int]]:
    """Fields of every type, word order and scale at increasing addresses, with gaps,
    and registers for the block that covers them."""
    start = draw(st.integers(0, 100))
    address = start + draw(st.integers(0, 3))
    fields = []
    for i in range(draw(st.integers(1, 10))):
        t = draw(st.sampled_from(TYPES))
        fields.append(
            RegisterField(
                name=f"f{i}",
                table="input",
                address=address,
                type=t,
                word_order=draw(st.sampled_from(WORD_ORDERS)),
                scale=draw(st.sampled_from([1.0, 0.001, 0.1, 2.0])),
            )
        )
        address += WIDTH[t] + draw(st.integers(0, 2))
    count = address - start + draw(st.integers(0, 2))
    regs = draw(st.lists(st.integers(0, 0xFFFF), min_size=count, max_size=count))
    return fields, start, regs


@given(blocks())
def test_block_decoder_is_decode_field_by_field(
    block: tuple[list[RegisterField], int, list[int]],
) -> None:
    fields, start, regs = block
    got = BlockDecoder(fields, start, len(regs))(regs)
    assert list(got) == [f.name for f in fields]
    for f in fields:
        lo = f.address - start
        want = decode(f, regs[lo : lo + f.width])
        assert _same(got[f.name], want), (f, got[f.name], want)


def test_block_decoder_masks_as_decode_and_checks_the_length() -> None:
    f = RegisterField(name="x", table="input", address=5, type="uint16")
    dec = BlockDecoder([f], 5, 1)
    assert dec([0x1_0005]) == {"x": decode(f, [0x1_0005])} == {"x": 5}
    with pytest.raises(CodecError):
        dec([1, 2])


def test_snapshot_value_is_get_value(cfg: LoadedConfig) -> None:
    rmap = cfg.accelerator_map
    blocks_ = plan_reads(rmap, cfg.line.accelerator.max_gap)
    rng = random.Random(9)
    reads = []
    for i, b in enumerate(blocks_):
        regs = [rng.randrange(0x10000) for _ in range(b.count)]
        quality = Quality.GOOD if i == 0 else Quality.COMM_FAIL
        reads.append(BlockRead(b, regs if i == 0 else None, quality, 7, 1.0))
    index = {f.name: (i, f) for i, b in enumerate(blocks_) for f in b.fields}
    snap = Snapshot("accelerator", 2.0, True, tuple(reads), index)
    fresh = Snapshot("accelerator", 2.0, True, tuple(reads), index)
    for name in snap:
        assert _same_or_none(snap.value(name), fresh.get(name).value)
    good = reads[0]
    for f in blocks_[0].fields:
        lo = f.address - blocks_[0].address
        assert good.registers is not None
        assert _same(good.decoded()[f.name], decode(f, good.registers[lo : lo + f.width]))
    with pytest.raises(LocalError):
        snap.value("no_such_field")


def _same_or_none(a: float | int | None, b: float | int | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and _same(a, b))


def test_cached_write_plan_encodes_every_write_afresh(cfg: LoadedConfig) -> None:
    rmap = cfg.accelerator_map
    link = PlcLink("accelerator", cfg.line.accelerator, rmap)
    w1 = {"command": 3, "beam_current_sp": 12.5, "energy_sp": 1.5, "watchdog": 1}
    w2 = {"command": 0, "beam_current_sp": 0.0, "energy_sp": 2.0, "watchdog": 2}
    assert link._write_plan(w1).runs(w1) == plan_writes(rmap, w1)
    assert link._write_plan(w2) is link._write_plan(w1)  # same names: planned once
    assert link._write_plan(w2).runs(w2) == plan_writes(rmap, w2)
    with pytest.raises(LocalError):
        write_plan(rmap, ["charge_total"])  # read-only
    with pytest.raises(LocalError):
        link._write_plan({"energy_sp": 1.0}).runs({"energy_sp": 99.0e40})  # not a float32


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Outputs)])
def test_outputs_changed_is_replace(name: str) -> None:
    base = Outputs(
        hv_on=True,
        beam_on=True,
        acc_fault_reset=True,
        beam_current_sp_ma=3.0,
        energy_sp_mev=1.5,
        scan_width_sp_cm=60.0,
        run=True,
        cnv_fault_reset=True,
        speed_sp_m_min=40.0,
        watchdog=17,
    )
    value = {bool: False, float: 0.0, int: 0}[type(getattr(base, name))]
    assert base.changed(**{name: value}) == dataclasses.replace(base, **{name: value})
    assert base.changed() == base


def test_a_reports_live_values_are_its_cycles_even_when_read_later(cfg: LoadedConfig) -> None:
    """CycleReport.live is made on first read: read cycles later (the line moved on,
    the reel position and the speed changed), it still holds what the line's
    live_values() gave at the report's own cycle."""
    from harness import ClosedLoop  # the closed loop on simulated time

    cl = ClosedLoop(cfg, select_recipe(cfg, None)[0])
    reports: list[Any] = []
    cycle = cl.line.cycle

    def keep(inp: Any) -> Any:
        report = cycle(inp)
        reports.append((report, cl.line.live_values()))
        return report

    cl.line.cycle = keep  # type: ignore[method-assign]
    cl.settle()
    cl.start(length_m=50.0)
    cl.run_for(10.0)
    assert cl.ledger is not None
    assert cl.ledger.position_m
    taken = reports[-150::30]
    cl.run_for(5.0)  # and the line moves on before they are read
    positions = set()
    for report, then in taken:
        assert dict(report.live) == then
        assert len(report.live) == len(then)
        assert list(report.live) == list(then)
        positions.add(then["reel_position_m"].value)
    assert len(positions) == len(taken)  # the reports really were of different cycles
    now = cl.line.live_values()["reel_position_m"].value
    assert now not in positions
