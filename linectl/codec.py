"""Register codec: engineering values <-> 16-bit Modbus registers.

Pure and struct-based; shared by the controller's link and the simulators so that both
sides read the register map the same way. Engineering value = raw * scale.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Final

from linectl.config import RegisterField, RegisterType, WordOrder

# struct code (big-endian within the whole value) and register count per type.
_STRUCT: Final[dict[RegisterType, tuple[str, int]]] = {
    "bits": (">H", 1),
    "uint16": (">H", 1),
    "int16": (">h", 1),
    "uint32": (">I", 2),
    "int32": (">i", 2),
    "float32": (">f", 2),
}

_INT_LIMITS: Final[dict[RegisterType, tuple[int, int]]] = {
    "bits": (0, 0xFFFF),
    "uint16": (0, 0xFFFF),
    "int16": (-0x8000, 0x7FFF),
    "uint32": (0, 0xFFFF_FFFF),
    "int32": (-0x8000_0000, 0x7FFF_FFFF),
}


class CodecError(ValueError):
    """A value cannot be encoded for, or decoded from, a field."""


def register_count(type_: RegisterType) -> int:
    """How many 16-bit registers a value of this type occupies."""
    return _STRUCT[type_][1]


# Big-endian 16-bit words of a one- and a two-register value (the common word order).
_WORDS: Final[dict[int, struct.Struct]] = {2: struct.Struct(">H"), 4: struct.Struct(">2H")}


def _to_wire(data: bytes, word_order: WordOrder) -> list[int]:
    """Big-endian bytes of the value -> registers in the PLC's word/byte order."""
    if word_order == "ABCD":  # as they come (every write of a cycle goes through here)
        return list(_WORDS[len(data)].unpack(data))
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if word_order in ("CDAB", "DCBA"):
        words.reverse()
    if word_order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def _from_wire(registers: Sequence[int], word_order: WordOrder) -> bytes:
    """Registers in the PLC's order -> big-endian bytes of the value (inverse of _to_wire)."""
    words = [int(r & 0xFFFF).to_bytes(2, "big") for r in registers]
    if word_order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    if word_order in ("CDAB", "DCBA"):
        words.reverse()
    return b"".join(words)


def encode(field: RegisterField, value: float) -> list[int]:
    """Engineering value -> registers. Raises CodecError if it does not fit the type."""
    fmt, _count = _STRUCT[field.type]
    if isinstance(value, bool):
        value = int(value)
    # A set-point of NaN or infinity is never meant: refuse it for every type.
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise CodecError(f"{field.name}: {value!r} is not a finite number")
    raw_f = value / field.scale
    if field.type == "float32":
        try:
            data = struct.pack(fmt, raw_f)
        except (OverflowError, struct.error) as exc:
            raise CodecError(f"{field.name}: {value!r} does not fit float32") from exc
        return _to_wire(data, field.word_order)
    raw = round(raw_f)
    lo, hi = _INT_LIMITS[field.type]
    if not lo <= raw <= hi:
        raise CodecError(
            f"{field.name}: {value!r} (raw {raw}) outside {field.type} range {lo}..{hi}"
        )
    return _to_wire(struct.pack(fmt, raw), field.word_order)


def decode(field: RegisterField, registers: Sequence[int]) -> float | int:
    """Registers -> engineering value. Integers without scale stay int."""
    fmt, count = _STRUCT[field.type]
    if len(registers) != count:
        raise CodecError(f"{field.name}: expected {count} registers, got {len(registers)}")
    (raw,) = struct.unpack(fmt, _from_wire(registers, field.word_order))
    if field.type == "float32":
        return float(raw) * field.scale
    if field.scale == 1.0:
        return int(raw)
    return int(raw) * field.scale


class BlockDecoder:
    """Decodes every field of one contiguous run of registers in one pass.

    A poll's block is decoded every cycle, field by field that costs a byte shuffle and
    a struct call per field; here the block's words are packed once and the fields in
    the common word order (ABCD, high word first) come out of one precompiled struct.
    Fields in another word order go through `decode`. Same values, same types as
    `decode` gives field by field.
    """

    __slots__ = ("_all", "_count", "_fast", "_fast_names", "_names", "_scaled", "_slow", "_words")

    def __init__(self, fields: Sequence[RegisterField], address: int, count: int) -> None:
        self._count = count
        self._words = struct.Struct(f">{count}H")
        self._names = tuple(f.name for f in fields)
        self._all = tuple((f, f.address - address) for f in fields)
        fmt = [">"]
        at = 0  # byte offset the format has reached
        fast_names: list[str] = []
        scaled: list[tuple[str, float]] = []
        slow: list[tuple[RegisterField, int]] = []
        for f in sorted(fields, key=lambda f: f.address):
            lo = f.address - address
            code, width = _STRUCT[f.type]
            if lo < 0 or lo + width > count:
                raise CodecError(f"{f.name}: outside the block at {address} (+{count})")
            if f.word_order != "ABCD" or 2 * lo < at:  # (an overlap: never in a valid map)
                slow.append((f, lo))
                continue
            if 2 * lo > at:
                fmt.append(f"{2 * lo - at}x")
            fmt.append(code[1])
            at = 2 * (lo + width)
            fast_names.append(f.name)
            if f.scale != 1.0:  # decode: raw * scale; without a scale an int stays int
                scaled.append((f.name, f.scale))
        self._fast = struct.Struct("".join(fmt))
        self._fast_names = tuple(fast_names)
        self._scaled = tuple(scaled)
        self._slow = tuple(slow)

    @property
    def names(self) -> tuple[str, ...]:
        """The fields' names, in the order the decoded dict has them."""
        return self._names

    def __call__(self, registers: Sequence[int]) -> dict[str, float | int]:
        """The block's registers -> {field name: engineering value}."""
        if len(registers) != self._count:
            raise CodecError(f"expected {self._count} registers, got {len(registers)}")
        try:
            raw = self._fast.unpack_from(self._words.pack(*registers))
        except struct.error:
            # A register outside 0..0xFFFF (never from a PLC): `decode` masks it.
            return {f.name: decode(f, registers[lo : lo + f.width]) for f, lo in self._all}
        out = dict(zip(self._fast_names, raw, strict=True))
        for name, scale in self._scaled:
            out[name] = out[name] * scale
        if self._slow:
            for f, lo in self._slow:
                out[f.name] = decode(f, registers[lo : lo + f.width])
            out = {name: out[name] for name in self._names}
        return out


def counter_modulus(field: RegisterField) -> float:
    """Engineering value at which a free-running counter field wraps."""
    if field.type not in ("uint16", "uint32"):
        raise CodecError(f"{field.name}: a counter must be uint16 or uint32, not {field.type}")
    return (1 << (16 * register_count(field.type))) * field.scale


def bit_is_set(field: RegisterField, value: int, bit_name: str) -> bool:
    """True when the named bit of a bits field is set."""
    return bool(value >> field.bit_index(bit_name) & 1)


def with_bit(field: RegisterField, value: int, bit_name: str, on: bool) -> int:
    """The bits value with the named bit set or cleared."""
    mask = 1 << field.bit_index(bit_name)
    return (value | mask) if on else (value & ~mask & 0xFFFF)
