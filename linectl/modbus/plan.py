"""Read and write planning for a register map (pure: no I/O, no clock).

A poll reads each table in as few requests as the map allows: contiguous blocks of at
most 125 registers (the Modbus limit for FC3/FC4) that cover every field. Unmapped
registers between fields are read only when the endpoint's `max_gap` allows it, since
some PLCs answer a read that touches an unmapped register with exception 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from linectl.codec import CodecError, decode, encode
from linectl.config import RegisterField, RegisterMap, Table
from linectl.errors import LocalError

MAX_READ_REGISTERS: Final = 125
"""Registers one FC3/FC4 request may read (Modbus application protocol, 6.3/6.4)."""
MAX_WRITE_REGISTERS: Final = 123
"""Registers one FC16 request may write (Modbus application protocol, 6.12)."""

FC_READ_HOLDING: Final = 3
FC_READ_INPUT: Final = 4
FC_WRITE_SINGLE: Final = 6
FC_WRITE_MULTIPLE: Final = 16

_READ_FC: Final[dict[Table, int]] = {"holding": FC_READ_HOLDING, "input": FC_READ_INPUT}


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: `count` registers of `table` from `address`, holding `fields`."""

    table: Table
    address: int
    count: int
    fields: tuple[RegisterField, ...]

    @property
    def end(self) -> int:
        """One past the last register read."""
        return self.address + self.count

    @property
    def function_code(self) -> int:
        """3 for holding registers, 4 for input registers."""
        return _READ_FC[self.table]


@dataclass(frozen=True, slots=True)
class WriteRun:
    """One write request: contiguous holding registers from `address`."""

    address: int
    registers: tuple[int, ...]
    fields: tuple[RegisterField, ...]

    @property
    def function_code(self) -> int:
        """6 for a single register, 16 for more."""
        return FC_WRITE_SINGLE if len(self.registers) == 1 else FC_WRITE_MULTIPLE


def plan_reads(
    register_map: RegisterMap, max_gap: int = 0, max_registers: int = MAX_READ_REGISTERS
) -> tuple[Block, ...]:
    """Blocks covering every field of the map, holding table first, each sorted by address.

    Greedy joining is optimal here: fields are disjoint intervals in address order, so
    extending the current block whenever allowed never costs an extra request.
    """
    if not 1 <= max_registers <= MAX_READ_REGISTERS:
        raise LocalError(f"max_registers must be 1..{MAX_READ_REGISTERS}, not {max_registers}")
    if max_gap < 0:
        raise LocalError(f"max_gap must be >= 0, not {max_gap}")
    blocks: list[Block] = []
    for table in ("holding", "input"):
        current: list[RegisterField] = []
        for f in register_map.by_table[table]:
            if current:
                start, end = current[0].address, current[-1].end
                if f.address - end <= max_gap and f.end - start <= max_registers:
                    current.append(f)
                    continue
                blocks.append(_block(table, current))
            current = [f]
        if current:
            blocks.append(_block(table, current))
    return tuple(blocks)


def _block(table: Table, fields: list[RegisterField]) -> Block:
    start = fields[0].address
    return Block(table, start, fields[-1].end - start, tuple(fields))


def decode_block(block: Block, registers: Sequence[int]) -> dict[str, float | int]:
    """A block's response registers -> {field name: engineering value}."""
    if len(registers) != block.count:
        raise CodecError(
            f"{block.table} block at {block.address}: expected {block.count} registers, "
            f"got {len(registers)}"
        )
    out: dict[str, float | int] = {}
    for f in block.fields:
        lo = f.address - block.address
        out[f.name] = decode(f, registers[lo : lo + f.width])
    return out


def writable_field(register_map: RegisterMap, name: str) -> RegisterField:
    """The named field if the controller may write it; LocalError otherwise."""
    f = register_map.fields.get(name)
    if f is None:
        raise LocalError(f"{register_map.plc}: no field {name!r} in the register map")
    if f.access != "rw" or f.table != "holding":
        raise LocalError(f"{register_map.plc}: field {name!r} is read-only (access 'r')")
    return f


def encode_value(field: RegisterField, value: float) -> list[int]:
    """codec.encode, with a value that does not fit the type reported as our error."""
    try:
        return encode(field, value)
    except CodecError as exc:
        raise LocalError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class WritePlan:
    """How one set of holding fields is written: the fields of each request, in address
    order. It depends on the names only, so a caller that writes the same fields every
    cycle plans them once (`write_plan`) and only encodes the values (`runs`)."""

    groups: tuple[tuple[RegisterField, ...], ...]
    # Each field's last value and its registers: most set-points are the same from
    # cycle to cycle, and encoding them again cost a tenth of a write's CPU at 100 Hz.
    _last: dict[str, tuple[float, list[int]]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def runs(self, values: Mapping[str, float]) -> tuple[WriteRun, ...]:
        """The requests for these values (the plan's fields, by name); every value is
        encoded before any run is made, so a bad one fails the whole call."""
        last = self._last
        encoded: dict[str, list[int]] = {}
        for g in self.groups:
            for f in g:
                v = values[f.name]
                seen = last.get(f.name)
                # Same type and value, and not zero (0.0 and -0.0 are equal but encode
                # apart): the registers are the ones encoded last time.
                if seen is not None and seen[0] == v and type(seen[0]) is type(v) and v != 0:
                    encoded[f.name] = seen[1]
                    continue
                regs = encode_value(f, v)  # LocalError: nothing is kept
                last[f.name] = (v, regs)
                encoded[f.name] = regs
        return tuple(_run(g, encoded) for g in self.groups)


def write_plan(
    register_map: RegisterMap,
    names: Iterable[str],
    max_registers: int = MAX_WRITE_REGISTERS,
) -> WritePlan:
    """The requests that write these fields: adjacent fields share one (FC16).

    Every name is checked (known, writable) first: LocalError names a bad one.
    """
    fields = sorted((writable_field(register_map, n) for n in names), key=lambda f: f.address)
    groups: list[tuple[RegisterField, ...]] = []
    group: list[RegisterField] = []
    for f in fields:
        if group and f.address == group[-1].end and f.end - group[0].address <= max_registers:
            group.append(f)
            continue
        if group:
            groups.append(tuple(group))
        group = [f]
    if group:
        groups.append(tuple(group))
    return WritePlan(tuple(groups))


def plan_writes(
    register_map: RegisterMap,
    values: Mapping[str, float],
    max_registers: int = MAX_WRITE_REGISTERS,
) -> tuple[WriteRun, ...]:
    """Writes for several fields: adjacent fields share one request (FC16).

    Every name is checked (known, writable, encodable) before anything is planned, so a
    bad entry fails the whole call before any I/O.
    """
    return write_plan(register_map, values, max_registers).runs(values)


def _run(fields: Sequence[RegisterField], encoded: Mapping[str, list[int]]) -> WriteRun:
    regs = tuple(r for f in fields for r in encoded[f.name])
    return WriteRun(fields[0].address, regs, tuple(fields))
