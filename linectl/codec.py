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


def _to_wire(data: bytes, word_order: WordOrder) -> list[int]:
    """Big-endian bytes of the value -> registers in the PLC's word/byte order."""
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
