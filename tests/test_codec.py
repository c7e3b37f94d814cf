"""linectl.codec: round trips in every word order, scale, bits, counters, and pymodbus."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client.mixin import ModbusClientMixin

from linectl.codec import (
    CodecError,
    bit_is_set,
    counter_modulus,
    decode,
    encode,
    register_count,
    with_bit,
)
from linectl.config import RegisterField, RegisterType, WordOrder

WORD_ORDERS: tuple[WordOrder, ...] = ("ABCD", "CDAB", "BADC", "DCBA")
INT_RANGES: dict[RegisterType, tuple[int, int]] = {
    "bits": (0, 0xFFFF),
    "uint16": (0, 0xFFFF),
    "int16": (-0x8000, 0x7FFF),
    "uint32": (0, 0xFFFF_FFFF),
    "int32": (-0x8000_0000, 0x7FFF_FFFF),
}


def make_field(
    type_: RegisterType,
    word_order: WordOrder = "ABCD",
    scale: float = 1.0,
    bits: dict[str, int] | None = None,
) -> RegisterField:
    return RegisterField(
        name=f"f_{type_}",
        table="holding",
        address=10,
        type=type_,
        word_order=word_order,
        scale=scale,
        access="rw",
        bits=bits or {},
    )


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("word_order", WORD_ORDERS)
@pytest.mark.parametrize("type_", list(INT_RANGES))
@given(data=st.data())
def test_integer_round_trip(type_: RegisterType, word_order: WordOrder, data: Any) -> None:
    lo, hi = INT_RANGES[type_]
    value = data.draw(st.integers(lo, hi))
    field = make_field(type_, word_order)
    regs = encode(field, value)
    assert len(regs) == register_count(type_)
    assert all(0 <= r <= 0xFFFF for r in regs)
    back = decode(field, regs)
    assert back == value
    assert type(back) is int


@pytest.mark.parametrize("word_order", WORD_ORDERS)
@given(value=st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_round_trip(word_order: WordOrder, value: float) -> None:
    field = make_field("float32", word_order)
    regs = encode(field, value)
    assert len(regs) == 2
    assert decode(field, regs) == value


@pytest.mark.parametrize("word_order", WORD_ORDERS)
@pytest.mark.parametrize("type_", ["uint16", "int16", "uint32", "int32", "float32"])
@given(data=st.data())
def test_registers_round_trip(type_: RegisterType, word_order: WordOrder, data: Any) -> None:
    """Any register content the PLC may send decodes and re-encodes to the same words."""
    field = make_field(type_, word_order)
    n = register_count(type_)
    regs = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n))
    value = decode(field, regs)
    if isinstance(value, float) and math.isnan(value):
        return  # NaN payloads are not required to survive: no PLC sends them as data
    assert encode(field, value) == regs


def test_float32_rounds_to_single_precision() -> None:
    field = make_field("float32")
    assert decode(field, encode(field, 0.1)) == struct.unpack(">f", struct.pack(">f", 0.1))[0]


# --------------------------------------------------------------------------- word orders


@pytest.mark.parametrize(
    ("word_order", "expected"),
    [
        ("ABCD", [0x1122, 0x3344]),
        ("CDAB", [0x3344, 0x1122]),
        ("BADC", [0x2211, 0x4433]),
        ("DCBA", [0x4433, 0x2211]),
    ],
)
def test_word_orders_place_bytes(word_order: WordOrder, expected: list[int]) -> None:
    field = make_field("uint32", word_order)
    assert encode(field, 0x11223344) == expected
    assert decode(field, expected) == 0x11223344


@pytest.mark.parametrize(
    ("word_order", "expected"),
    [("ABCD", [0x1122]), ("CDAB", [0x1122]), ("BADC", [0x2211]), ("DCBA", [0x2211])],
)
def test_word_order_of_16_bit_values_swaps_bytes_only(
    word_order: WordOrder, expected: list[int]
) -> None:
    # A 16-bit value has one word: only the byte-swapping orders change it.
    field = make_field("uint16", word_order)
    assert encode(field, 0x1122) == expected


def test_float32_abcd_matches_ieee_big_endian() -> None:
    # 1.5 is 0x3FC00000 in IEEE-754 single precision.
    assert encode(make_field("float32"), 1.5) == [0x3FC0, 0x0000]
    assert encode(make_field("float32", "CDAB"), 1.5) == [0x0000, 0x3FC0]


# --------------------------------------------------------------------------- scale


def test_scale_integer_fields() -> None:
    ua_as_ma = make_field("uint32", scale=0.001)  # a PLC that sends uA, read as mA
    assert encode(ua_as_ma, 12.345) == [0, 12345]
    assert decode(ua_as_ma, [0, 12345]) == pytest.approx(12.345)
    tenths = make_field("int16", scale=0.1)
    assert encode(tenths, -12.3) == [(-123) & 0xFFFF]
    assert decode(tenths, [(-123) & 0xFFFF]) == pytest.approx(-12.3)


@given(raw=st.integers(0, 0xFFFF_FFFF))
def test_scaled_uint32_round_trip(raw: int) -> None:
    field = make_field("uint32", "CDAB", scale=0.001)
    regs = encode(field, raw * 0.001)
    assert decode(field, regs) == pytest.approx(raw * 0.001)
    assert encode(field, decode(field, regs)) == regs


def test_scale_float32() -> None:
    field = make_field("float32", scale=10.0)
    assert decode(field, encode(field, 25.0)) == pytest.approx(25.0)
    assert encode(field, 25.0) == encode(make_field("float32"), 2.5)


def test_integer_encode_rounds_to_nearest() -> None:
    assert encode(make_field("uint16"), 2.6) == [3]
    assert encode(make_field("uint16", scale=0.5), 1.2) == [2]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("type_", "value"),
    [
        ("uint16", 70000),
        ("uint16", -1),
        ("int16", 40000),
        ("int16", -40000),
        ("uint32", -1),
        ("uint32", 2**32),
        ("int32", 2**31),
        ("bits", 0x1_0000),
        ("float32", 1e39),
        ("float32", -1e39),
        ("uint16", math.nan),
        ("int32", math.inf),
    ],
)
def test_out_of_range_encode_raises(type_: RegisterType, value: float) -> None:
    field = make_field(type_)
    with pytest.raises(CodecError, match=field.name):
        encode(field, value)


def test_scaled_value_out_of_range_raises() -> None:
    # 70 mA as uA does not fit a uint16.
    with pytest.raises(CodecError, match="outside uint16 range"):
        encode(make_field("uint16", scale=0.001), 70.0)


@pytest.mark.parametrize(("type_", "count"), [("uint16", 2), ("float32", 1), ("uint32", 3)])
def test_decode_wrong_register_count_raises(type_: RegisterType, count: int) -> None:
    with pytest.raises(CodecError, match="expected"):
        decode(make_field(type_), [0] * count)


def test_codec_error_is_value_error() -> None:
    assert issubclass(CodecError, ValueError)


# --------------------------------------------------------------------------- bits


def test_bits_helpers() -> None:
    field = make_field("bits", bits={"HV_ON": 0, "BEAM_ON": 1, "FAULT_RESET": 2, "TOP": 15})
    value = with_bit(field, 0, "BEAM_ON", True)
    assert value == 0b10
    assert bit_is_set(field, value, "BEAM_ON")
    assert not bit_is_set(field, value, "HV_ON")
    value = with_bit(field, value, "TOP", True)
    assert value == 0x8002
    assert encode(field, value) == [0x8002]
    assert with_bit(field, value, "BEAM_ON", False) == 0x8000
    assert with_bit(field, 0xFFFF, "HV_ON", False) == 0xFFFE
    # Setting a set bit or clearing a clear one changes nothing.
    assert with_bit(field, value, "TOP", True) == value
    assert with_bit(field, 0, "HV_ON", False) == 0


def test_unknown_bit_name_raises_key_error_naming_field() -> None:
    field = make_field("bits", bits={"RUN": 0})
    with pytest.raises(KeyError, match="f_bits"):
        bit_is_set(field, 1, "NOPE")
    with pytest.raises(KeyError, match="NOPE"):
        with_bit(field, 1, "NOPE", True)


# --------------------------------------------------------------------------- counters


def test_counter_modulus() -> None:
    assert counter_modulus(make_field("uint32")) == 2**32
    assert counter_modulus(make_field("uint16")) == 2**16
    assert counter_modulus(make_field("uint32", scale=0.001)) == pytest.approx(2**32 * 0.001)
    for type_ in ("float32", "int32", "int16", "bits"):
        with pytest.raises(CodecError, match="counter"):
            counter_modulus(make_field(type_))  # type: ignore[arg-type]


def test_register_count() -> None:
    assert [register_count(t) for t in ("bits", "int16", "uint16")] == [1, 1, 1]
    assert [register_count(t) for t in ("int32", "uint32", "float32")] == [2, 2, 2]


# --------------------------------------------------------------------------- pymodbus


_PYMODBUS_TYPES: dict[RegisterType, ModbusClientMixin.DATATYPE] = {
    "float32": ModbusClientMixin.DATATYPE.FLOAT32,
    "int32": ModbusClientMixin.DATATYPE.INT32,
    "uint32": ModbusClientMixin.DATATYPE.UINT32,
    "int16": ModbusClientMixin.DATATYPE.INT16,
    "uint16": ModbusClientMixin.DATATYPE.UINT16,
}
_SAMPLES: dict[RegisterType, list[float]] = {
    "float32": [0.0, 1.5, -2.25, 40.0, 123.456, 3.0e38, -1.0e-30],
    "int32": [0, 1, -1, 123456789, -(2**31), 2**31 - 1],
    "uint32": [0, 1, 0x11223344, 2**32 - 1, 4_000_000_000],
    "int16": [0, 1, -1, 12345, -(2**15), 2**15 - 1],
    "uint16": [0, 1, 0xBEEF, 2**16 - 1],
}


@pytest.mark.parametrize(("word_order", "pymodbus_order"), [("ABCD", "big"), ("CDAB", "little")])
@pytest.mark.parametrize("type_", list(_PYMODBUS_TYPES))
def test_matches_pymodbus_conversions(
    type_: RegisterType, word_order: WordOrder, pymodbus_order: str
) -> None:
    """Our codec and pymodbus 3.16's own conversions agree (big = ABCD, little = CDAB)."""
    field = make_field(type_, word_order)
    datatype = _PYMODBUS_TYPES[type_]
    for sample in _SAMPLES[type_]:
        value: float = sample
        if type_ == "float32":
            value = struct.unpack(">f", struct.pack(">f", sample))[0]
        else:
            value = int(sample)
        theirs = ModbusClientMixin.convert_to_registers(
            value,
            datatype,
            word_order=pymodbus_order,  # type: ignore[arg-type]
        )
        assert encode(field, value) == theirs, (type_, word_order, value)
        assert decode(field, theirs) == ModbusClientMixin.convert_from_registers(
            theirs,
            datatype,
            word_order=pymodbus_order,  # type: ignore[arg-type]
        )
