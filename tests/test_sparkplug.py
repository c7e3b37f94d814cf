"""Sparkplug B edge node, pure part: payload encoding, session rules, commands, STATE."""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from linectl.commands import CommandName, CommandResult, parse_command
from linectl.core.ledger import MetreRecord, Verdict
from linectl.errors import ConfigError, LocalError
from linectl.quality import Quality
from linectl.sparkplug import sparkplug_b_pb2 as pb
from linectl.sparkplug.adapter import BdSeqFile
from linectl.sparkplug.node import (
    BDSEQ,
    DT,
    LAST_RESULT,
    LAYOUT,
    REBIRTH,
    DeviceDef,
    EdgeNode,
    Execute,
    HostState,
    HostWatch,
    Ignore,
    MetricDef,
    Rebirth,
    Refuse,
    Sample,
    all_metrics,
    check_layout,
    decode,
    metric_quality,
    metric_value,
    parse_state,
    parse_topic,
    set_value,
    state_payload,
    topic,
)
from linectl.telemetry import LIVE_VALUES, LiveValue

G, N = "plant", "line1"


def live(value: float | None = 1.0, quality: Quality = Quality.GOOD, t_ms: int = 900) -> dict:
    return {s.name: LiveValue(s.name, value, quality, t_ms) for s in LIVE_VALUES}


def born_node(**kw: object) -> EdgeNode:
    node = EdgeNode(G, N, sender="scada-1", **kw)  # type: ignore[arg-type]
    node.new_session()
    node.birth(live(), 1000, 0.0)
    return node


def metrics_by_name(payload: bytes) -> dict[str, pb.Payload.Metric]:
    return {m.name: m for m in decode(payload).metrics}


# ---------------------------------------------------------------------- wire format


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, body: bytes) -> bytes:
    return _varint(num << 3 | wire) + body


def _ld(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def test_field_numbers_match_the_specification() -> None:
    # Built by hand from the field numbers in Sparkplug 3.0 chapter 6, independently of
    # the generated module: Payload{timestamp=1, metrics=[...], seq=3}; Metric{name=1,
    # alias=2, timestamp=3, datatype=4, is_historical=5, is_null=7, properties=9,
    # long_value=11, double_value=13}; PropertySet{keys=1, values=2};
    # PropertyValue{type=1, int_value=3}.
    prop_value = _field(1, 0, _varint(3)) + _field(3, 0, _varint(500))
    props = _ld(1, b"Quality") + _ld(2, prop_value)
    metric_a = (
        _ld(1, b"speed_m_min")
        + _field(2, 0, _varint(200))
        + _field(3, 0, _varint(1_700_000_000_123))
        + _field(4, 0, _varint(10))
        + _field(5, 0, _varint(1))
        + _ld(9, props)
        + _field(13, 1, struct.pack("<d", 12.5))
    )
    metric_b = _ld(1, b"bdSeq") + _field(4, 0, _varint(4)) + _field(11, 0, _varint(2**64 - 2))
    metric_c = _field(2, 0, _varint(7)) + _field(7, 0, _varint(1))
    raw = (
        _field(1, 0, _varint(1_700_000_000_999))
        + _ld(2, metric_a)
        + _ld(2, metric_b)
        + _ld(2, metric_c)
        + _field(3, 0, _varint(3))
    )
    p = decode(raw)
    assert p.timestamp == 1_700_000_000_999
    assert p.seq == 3
    a, b, c = p.metrics
    assert (a.name, a.alias, a.timestamp, a.datatype) == ("speed_m_min", 200, 1_700_000_000_123, 10)
    assert a.is_historical
    assert metric_value(a) == 12.5
    assert metric_quality(a) is Quality.STALE
    assert metric_value(b) == -2  # Int64 in a uint64 field: two's complement
    assert c.alias == 7
    assert metric_value(c, DT.Double) is None
    # ... and the generated module writes the same bytes for the same message.
    assert p.SerializeToString() == raw


def test_datatype_numbers_match_the_specification() -> None:
    expected = {"Int8": 1, "Int32": 3, "Int64": 4, "UInt64": 8, "Float": 9, "Double": 10}
    expected |= {"Boolean": 11, "String": 12, "DateTime": 13, "Template": 19}
    expected |= {"PropertySet": 20, "DateTimeArray": 34}
    for name, number in expected.items():
        assert pb.DataType.Value(name) == number


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_int64_round_trip(value: int) -> None:
    m = pb.Payload.Metric()
    set_value(m, DT.Int64, value)
    back = pb.Payload.Metric.FromString(m.SerializeToString())
    assert metric_value(back, DT.Int64) == value


@given(st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_int32_round_trip(value: int) -> None:
    m = pb.Payload.Metric()
    set_value(m, DT.Int32, value)
    assert metric_value(pb.Payload.Metric.FromString(m.SerializeToString()), DT.Int32) == value


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        (DT.Double, 1.0 / 3.0),
        (DT.Float, 0.5),
        (DT.Boolean, True),
        (DT.Boolean, False),
        (DT.String, "ünïcode/λ"),
        (DT.UInt64, 2**64 - 1),
    ],
)
def test_value_round_trip(datatype: int, value: object) -> None:
    m = pb.Payload.Metric()
    m.datatype = datatype
    set_value(m, datatype, value)  # type: ignore[arg-type]
    back = pb.Payload.Metric.FromString(m.SerializeToString())
    assert metric_value(back) == value
    assert not back.is_null


@pytest.mark.parametrize("value", [None, math.nan, math.inf])
def test_unknown_values_are_null(value: float | None) -> None:
    m = pb.Payload.Metric()
    set_value(m, DT.Double, value)
    back = pb.Payload.Metric.FromString(m.SerializeToString())
    assert back.is_null
    assert back.WhichOneof("value") is None
    assert metric_value(back, DT.Double) is None


def test_garbage_is_not_a_payload() -> None:
    with pytest.raises(LocalError, match="not a Sparkplug B payload"):
        decode(b"\xff\xff\xff")


# ---------------------------------------------------------------------- topics


def test_topics() -> None:
    assert topic(G, "NBIRTH", N) == "spBv1.0/plant/NBIRTH/line1"
    assert topic(G, "DDATA", N, "dose") == "spBv1.0/plant/DDATA/line1/dose"
    t = parse_topic("spBv1.0/plant/DCMD/line1/conveyor")
    assert t is not None
    assert (t.group_id, t.kind, t.edge_node_id, t.device_id) == (G, "DCMD", N, "conveyor")
    st_ = parse_topic("spBv1.0/STATE/scada-1")
    assert st_ is not None
    assert (st_.kind, st_.edge_node_id) == ("STATE", "scada-1")
    for bad in ("linectl/line1/state", "spBv1.0/plant/NCMD/line1/x", "spBv1.0/plant/DCMD/line1"):
        assert parse_topic(bad) is None
    with pytest.raises(ValueError, match="device id"):
        topic(G, "DBIRTH", N)


@pytest.mark.parametrize(("group", "node"), [("a/b", "n"), ("g", "n+"), ("g", ""), ("#", "n")])
def test_bad_ids_are_refused(group: str, node: str) -> None:
    with pytest.raises(ConfigError, match="has \\+ / or #"):
        EdgeNode(group, node)


def test_bad_sender_is_refused() -> None:
    with pytest.raises(ConfigError, match="command sender"):
        EdgeNode(G, N, sender="scada host")


# ---------------------------------------------------------------------- aliases


def test_aliases_unique_and_rebirth_without_alias() -> None:
    node = EdgeNode(G, N, properties={"line_id": "line1", "version": "0.1.0"})
    aliases = [m.alias for _, m in all_metrics(node.layout) if m.alias is not None]
    assert len(aliases) == len(set(aliases))
    no_alias = [m.name for _, m in all_metrics(node.layout) if m.alias is None]
    assert no_alias == [REBIRTH]


def test_layout_check_refuses_bad_tables() -> None:
    dup = DeviceDef("x", (MetricDef("a", 100, DT.Double), MetricDef("b", 100, DT.Double)))
    with pytest.raises(ConfigError, match="alias 100 already used"):
        check_layout((*LAYOUT, dup))
    aliased_rebirth = DeviceDef(None, (MetricDef(REBIRTH, 5, DT.Boolean),))
    with pytest.raises(ConfigError, match="must not have an alias"):
        check_layout((aliased_rebirth,))
    missing = DeviceDef(None, (MetricDef("c", None, DT.Boolean),))
    with pytest.raises(ConfigError, match="has no alias"):
        check_layout((missing,))


def test_births_declare_every_metric_with_name_alias_type_and_value() -> None:
    node = EdgeNode(G, N)
    node.new_session()
    msgs = node.birth(live(2.5, t_ms=1234), 5000, 0.0)
    assert [t for t, _ in msgs] == [
        "spBv1.0/plant/NBIRTH/line1",
        "spBv1.0/plant/DBIRTH/line1/accelerator",
        "spBv1.0/plant/DBIRTH/line1/conveyor",
        "spBv1.0/plant/DBIRTH/line1/dose",
    ]
    declared: dict[int, str] = {}
    for (_, payload), dev in zip(msgs, node.layout, strict=True):
        p = decode(payload)
        assert p.timestamp == 5000
        assert [m.name for m in p.metrics] == [m.name for m in dev.metrics]
        for m in p.metrics:
            assert m.HasField("datatype")
            assert m.HasField("timestamp")
            if m.name == REBIRTH:
                assert not m.HasField("alias")
                assert m.datatype == DT.Boolean
                assert metric_value(m) is False
                continue
            assert m.HasField("alias")
            assert m.alias not in declared, f"alias {m.alias} twice"
            declared[m.alias] = m.name
    by_name = metrics_by_name(msgs[1][1])
    beam = by_name["beam_current_ma"]
    assert metric_value(beam) == 2.5
    assert beam.timestamp == 1234  # when it was measured, not when it was sent
    assert metric_quality(beam) is Quality.GOOD
    unit = dict(zip(beam.properties.keys, beam.properties.values, strict=True))["engUnit"]
    assert unit.string_value == "mA"


def test_birth_quality_codes() -> None:
    node = EdgeNode(G, N)
    node.new_session()
    values = live()
    values["vacuum_pa"] = LiveValue("vacuum_pa", 0.001, Quality.STALE, 900)
    values["speed_m_min"] = LiveValue("speed_m_min", None, Quality.COMM_FAIL, 900)
    del values["tension_n"]  # never read: declared null, BAD
    msgs = node.birth(values, 1000, 0.0)
    acc, cnv = metrics_by_name(msgs[1][1]), metrics_by_name(msgs[2][1])

    def code(m: pb.Payload.Metric) -> int:
        props = dict(zip(m.properties.keys, m.properties.values, strict=True))
        assert props["Quality"].type == DT.Int32
        return props["Quality"].int_value

    assert code(acc["vacuum_pa"]) == 500
    assert code(acc["beam_current_ma"]) == 192
    assert code(cnv["speed_m_min"]) == 0
    assert cnv["speed_m_min"].is_null
    assert code(cnv["tension_n"]) == 0
    assert cnv["tension_n"].is_null


# ---------------------------------------------------------------------- session rules


def test_bdseq_starts_at_zero_increments_and_wraps() -> None:
    node = EdgeNode(G, N)
    assert [node.new_session() for _ in range(3)] == [0, 1, 2]
    node = EdgeNode(G, N, bd_seq=254)
    assert [node.new_session() for _ in range(3)] == [255, 0, 1]


def test_retry_after_an_unacknowledged_connect_keeps_bdseq() -> None:
    node = EdgeNode(G, N)
    assert node.retry_session() == 0  # no session yet: the first one
    node.end_session()
    assert node.retry_session() == 0
    assert decode(node.death(1)[1]).metrics[0].long_value == 0
    assert node.new_session() == 1


def test_nbirth_and_ndeath_carry_the_same_bdseq() -> None:
    node = EdgeNode(G, N, bd_seq=41)
    bd = node.new_session()
    will_topic, will = node.death(999)
    assert will_topic == "spBv1.0/plant/NDEATH/line1"
    death = decode(will)
    assert not death.HasField("seq")
    assert [m.name for m in death.metrics] == [BDSEQ]
    assert death.metrics[0].datatype == DT.Int64
    nbirth = decode(node.birth(live(), 1000, 0.0)[0][1])
    assert nbirth.seq == 0
    bd_birth = metric_value(next(m for m in nbirth.metrics if m.name == BDSEQ))
    assert bd_birth == metric_value(death.metrics[0]) == bd == 42


def test_no_data_before_birth_and_no_death_before_session() -> None:
    node = EdgeNode(G, N)
    with pytest.raises(LocalError, match="NDEATH before new_session"):
        node.death(0)
    with pytest.raises(LocalError, match="birth before new_session"):
        node.birth(live(), 0, 0.0)
    node.new_session()
    with pytest.raises(LocalError, match="DATA before NBIRTH"):
        node.data(live(), 0, 0.0)
    with pytest.raises(LocalError, match="DATA before NBIRTH"):
        node.metres(
            "R1", [MetreRecord(0, 25.0, 24.0, 26.0, Verdict.IN_SPEC)], 0, 0, historical=False
        )
    node.birth(live(), 0, 0.0)
    node.end_session()
    with pytest.raises(LocalError, match="DATA before NBIRTH"):
        node.data(live(), 0, 0.0)


def test_seq_counts_every_message_and_wraps_after_255() -> None:
    node = EdgeNode(G, N)
    node.new_session()
    seqs = [decode(p).seq for _, p in node.birth(live(), 0, 0.0)]
    assert seqs == [0, 1, 2, 3]
    for i in range(1, 300):
        values = live(float(i))
        for _, payload in node.data(values, i, float(i)):
            seqs.append(decode(payload).seq)
    # Every DATA message's seq is one more than the previous message's, 255 -> 0.
    for a, b in itertools.pairwise(seqs):
        assert b == (a + 1) % 256
    assert max(seqs) == 255
    assert seqs.count(0) >= 2  # wrapped at least once


def test_rebirth_keeps_bdseq_and_restarts_seq() -> None:
    node = born_node()
    bd = node.bd_seq
    node.data(live(3.0), 2000, 1.0)
    again = node.birth(live(3.0), 3000, 2.0)
    nbirth = decode(again[0][1])
    assert nbirth.seq == 0
    assert [decode(p).seq for _, p in again] == [0, 1, 2, 3]
    assert metric_value(next(m for m in nbirth.metrics if m.name == BDSEQ)) == bd
    assert node.bd_seq == bd


# ---------------------------------------------------------------------- report by exception


def test_data_by_exception_alias_only() -> None:
    node = born_node(deadbands={"speed_m_min": 0.5})
    assert node.data(live(), 2000, 1.0) == []  # nothing changed
    values = live()
    values["speed_m_min"] = LiveValue("speed_m_min", 1.4, Quality.GOOD, 1900)  # inside band
    assert node.data(values, 2000, 1.0) == []
    values["speed_m_min"] = LiveValue("speed_m_min", 1.6, Quality.GOOD, 1950)
    values["beam_current_ma"] = LiveValue("beam_current_ma", 1.01, Quality.GOOD, 1950)
    msgs = node.data(values, 2000, 1.0)
    assert [t for t, _ in msgs] == [
        "spBv1.0/plant/DDATA/line1/accelerator",
        "spBv1.0/plant/DDATA/line1/conveyor",
    ]
    (acc,) = decode(msgs[0][1]).metrics
    (cnv,) = decode(msgs[1][1]).metrics
    assert (acc.alias, cnv.alias) == (100, 200)
    for m in (acc, cnv):
        assert not m.HasField("name")
        assert not m.HasField("datatype")
        assert m.timestamp == 1950
        assert len(m.properties.keys) == 0  # GOOD: no Quality property
    assert metric_value(cnv, DT.Double) == 1.6
    assert node.data(values, 2100, 1.1) == []  # sent: nothing new


def test_quality_changes_go_out_at_once_and_good_is_said_again() -> None:
    node = born_node(min_interval_s=10.0)
    values = live()
    values["vacuum_pa"] = LiveValue("vacuum_pa", 1.0, Quality.STALE, 1900)
    (msg,) = node.data(values, 2000, 0.1)  # inside min_interval: quality goes anyway
    (m,) = decode(msg[1]).metrics
    assert metric_quality(m) is Quality.STALE
    values["vacuum_pa"] = LiveValue("vacuum_pa", None, Quality.COMM_FAIL, 1950)
    (m,) = decode(node.data(values, 2050, 0.2)[0][1]).metrics
    assert metric_quality(m) is Quality.COMM_FAIL
    assert m.is_null
    values["vacuum_pa"] = LiveValue("vacuum_pa", 1.0, Quality.GOOD, 1990)
    (m,) = decode(node.data(values, 2100, 0.3)[0][1]).metrics
    assert metric_quality(m) is Quality.GOOD  # explicit 192 after a bad spell
    values["vacuum_pa"] = LiveValue("vacuum_pa", 2.0, Quality.GOOD, 1995)
    assert node.data(values, 2200, 0.4) == []  # a value change waits for min_interval
    (m,) = decode(node.data(values, 2300, 10.4)[0][1]).metrics
    assert metric_value(m, DT.Double) == 2.0
    assert metric_quality(m) is None


def test_lost_plc_link_is_a_ddeath_and_its_return_a_dbirth() -> None:
    node = born_node()
    acc_names = {"beam_current_ma", "energy_mev", "scan_width_cm", "vacuum_pa"}
    acc_names.add("beam_current_sp_ma")
    values = live(2.0)
    for name in acc_names:
        values[name] = LiveValue(name, None, Quality.COMM_FAIL, 1900)
    msgs = node.data(values, 2000, 1.0)
    assert [t for t, _ in msgs] == [
        "spBv1.0/plant/DDEATH/line1/accelerator",
        "spBv1.0/plant/DDATA/line1/conveyor",
        "spBv1.0/plant/DDATA/line1/dose",
    ]
    death = decode(msgs[0][1])
    assert (death.seq, death.timestamp, len(death.metrics)) == (4, 2000, 0)
    assert node.data(values, 2100, 2.0) == []  # dead: nothing from the accelerator
    values["energy_mev"] = LiveValue("energy_mev", 1.2, Quality.GOOD, 2150)
    ((t, payload),) = node.data(values, 2200, 3.0)
    assert t == "spBv1.0/plant/DBIRTH/line1/accelerator"
    reborn = decode(payload)
    assert reborn.seq == 7
    by_name = {m.name: m for m in reborn.metrics}
    assert metric_value(by_name["energy_mev"]) == 1.2
    assert metric_quality(by_name["vacuum_pa"]) is Quality.COMM_FAIL
    assert by_name["vacuum_pa"].alias == 103
    values["vacuum_pa"] = LiveValue("vacuum_pa", 1e-3, Quality.GOOD, 2250)
    ((t, _),) = node.data(values, 2300, 4.0)
    assert t == "spBv1.0/plant/DDATA/line1/accelerator"


def test_unknown_reading_needs_a_rebirth_and_gets_a_fresh_alias() -> None:
    node = born_node()
    values: dict = live()
    values["mystery_x"] = LiveValue("mystery_x", 7, Quality.GOOD, 900)
    assert node.unknown(values) == ["mystery_x"]
    assert node.data(values, 2000, 1.0) == []  # not declared: not sent
    nbirth = metrics_by_name(node.birth(values, 3000, 2.0)[0][1])
    m = nbirth["Line/mystery_x"]
    assert m.alias >= 1000
    assert m.datatype == DT.Int64
    assert metric_value(m) == 7
    assert node.unknown(values) == []
    aliases = [x.alias for x in nbirth.values() if x.HasField("alias")]
    assert len(aliases) == len(set(aliases))


# ---------------------------------------------------------------------- records


def test_metres_live_and_historical() -> None:
    node = born_node()
    recs = [
        MetreRecord(0, 25.0, 24.5, 25.5, Verdict.IN_SPEC),
        MetreRecord(1, 21.0, 19.0, 22.0, Verdict.UNDER_DOSE, ("dose_low", "gap")),
    ]
    ((t, payload),) = node.metres("R-7", recs, 1500, 2000, historical=True)
    assert t == "spBv1.0/plant/DDATA/line1/dose"
    p = decode(payload)
    assert len(p.metrics) == 14
    assert all(m.is_historical and m.timestamp == 1500 for m in p.metrics)
    second = {m.alias: m for m in p.metrics[7:]}
    assert metric_value(second[301], DT.String) == "R-7"
    assert metric_value(second[302], DT.Int64) == 1
    assert metric_value(second[303], DT.Double) == 21.0
    assert metric_value(second[306], DT.String) == "under_dose"
    assert metric_value(second[307], DT.String) == "dose_low,gap"
    # A historical replay does not become the current value of the next birth ...
    dose = metrics_by_name(node.birth(live(), 3000, 2.0)[3][1])
    assert dose["Metre/index"].is_null
    # ... a live one does.
    (_, live_msg) = node.metres("R-7", recs[:1], 3500, 3600, historical=False)[0]
    assert not any(m.is_historical for m in decode(live_msg).metrics)
    dose = metrics_by_name(node.birth(live(), 4000, 3.0)[3][1])
    assert metric_value(dose["Metre/index"]) == 0
    assert dose["Metre/index"].timestamp == 3500


# ---------------------------------------------------------------------- commands


def ncmd(*metrics: tuple[str | None, int | None, int, object]) -> bytes:
    p = pb.Payload()
    p.timestamp = 1
    for name, alias, datatype, value in metrics:
        m = p.metrics.add()
        if name is not None:
            m.name = name
        if alias is not None:
            m.alias = alias
        set_value(m, datatype, value)  # type: ignore[arg-type]
    return p.SerializeToString()


NCMD = "spBv1.0/plant/NCMD/line1"


def test_rebirth_request() -> None:
    node = born_node()
    assert node.command(NCMD, ncmd((REBIRTH, None, DT.Boolean, True))) == [Rebirth()]
    (ev,) = node.command(NCMD, ncmd((REBIRTH, None, DT.Boolean, False)))
    assert isinstance(ev, Ignore)
    dcmd = "spBv1.0/plant/DCMD/line1/conveyor"
    (ev,) = node.command(dcmd, ncmd((REBIRTH, None, DT.Boolean, True)))
    assert isinstance(ev, Ignore)


def test_command_metrics_become_the_json_paths_commands() -> None:
    node = born_node()
    events = node.command(
        NCMD,
        ncmd(
            (None, 11, DT.Boolean, True),  # Commands/stop by alias only
            ("Commands/ack_alarm", None, DT.String, "vacuum_low"),
            ("Commands/start_reel", None, DT.String, '{"reel_id": "R-9", "length_m": 120}'),
            ("Commands/request", None, DT.String, '{"command": "reset", "request_id": "q1"}'),
            (None, 17, DT.String, '{"reel_id": "R-8", "reason": "cable cut"}'),
        ),
    )
    assert all(isinstance(e, Execute) for e in events)
    got = [e.command for e in events if isinstance(e, Execute)]
    kw = {"sender": "scada-1", "source": "sparkplug"}
    assert got == [
        parse_command(b"{}", name="stop", **kw),
        parse_command(b'{"alarm": "vacuum_low"}', name="ack_alarm", **kw),
        parse_command(b'{"reel_id": "R-9", "length_m": 120}', name="start_reel", **kw),
        parse_command(b'{"command": "reset", "request_id": "q1"}', **kw),
        parse_command(b'{"reel_id": "R-8", "reason": "cable cut"}', name="end_reel", **kw),
    ]
    assert got[2].length_m == 120.0
    assert got[0].name is CommandName.STOP


def test_device_commands() -> None:
    node = born_node()
    conveyor = "spBv1.0/plant/DCMD/line1/conveyor"
    (ev,) = node.command(conveyor, ncmd((None, 250, DT.Boolean, True)))
    assert isinstance(ev, Execute)
    assert ev.command.name is CommandName.STOP
    dose = "spBv1.0/plant/DCMD/line1/dose"
    (ev,) = node.command(dose, ncmd(("Commands/select_recipe", None, DT.String, "pv-1x6")))
    assert isinstance(ev, Execute)
    assert ev.command.recipe == "pv-1x6"
    # An alias of another device's metric is not this device's.
    (ev,) = node.command(dose, ncmd((None, 250, DT.Boolean, True)))
    assert isinstance(ev, Ignore)
    (ev,) = node.command("spBv1.0/plant/DCMD/line1/boiler", ncmd((None, 250, DT.Boolean, True)))
    assert isinstance(ev, Ignore)


@pytest.mark.parametrize(
    ("metric", "match"),
    [
        (("Commands/start_reel", None, DT.String, "R-9"), "JSON object"),
        (("Commands/start_reel", None, DT.String, '{"reel_id": "R-9"}'), "missing key"),
        (("Commands/end_reel", None, DT.String, "R-9"), "JSON object"),
        (("Commands/end_reel", None, DT.String, '{"reel_id": "R-9"}'), "missing key"),
        (("Commands/request", None, DT.String, "{not json"), "not JSON"),
        (("Commands/request", None, DT.String, '{"command": "fly"}'), "unknown command"),
        (("Commands/stop", None, DT.String, "yes"), "takes a Boolean"),
        (("Commands/ack_alarm", None, DT.String, "Bad Kind!"), "neither an alarm kind"),
        (("beam_current_ma", None, DT.Double, 3.0), "read-only"),
        (("Line/state", None, DT.String, "running"), "read-only"),
        (("Commands/request", None, DT.String, '{"command": "stop", "sender": "x"}'), "sender"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(metric: tuple, match: str) -> None:
    node = born_node()
    where = "spBv1.0/plant/DCMD/line1/accelerator" if metric[0] == "beam_current_ma" else NCMD
    (ev,) = node.command(where, ncmd(metric))
    assert isinstance(ev, Refuse), ev
    assert not ev.result.ack
    assert match in ev.result.reason


def test_commands_ignored() -> None:
    node = born_node()
    (ev,) = node.command(NCMD, ncmd(("Commands/stop", None, DT.Boolean, False)))
    assert isinstance(ev, Ignore)
    (ev,) = node.command(NCMD, ncmd(("No Such/metric", None, DT.Boolean, True)))
    assert isinstance(ev, Ignore)
    (ev,) = node.command("spBv1.0/plant/NCMD/line2", ncmd(("Commands/stop", None, DT.Boolean, 1)))
    assert isinstance(ev, Ignore)
    (ev,) = node.command(NCMD, b"\xff\xff")
    assert isinstance(ev, Refuse)


def test_command_result_goes_out_and_into_the_next_birth() -> None:
    node = born_node()
    result = CommandResult(False, "line is running", "select_recipe", "q7", "running")
    ((t, payload),) = node.command_result(result, 4242)
    assert t == "spBv1.0/plant/NDATA/line1"
    p = decode(payload)
    assert p.seq == 4
    (m,) = p.metrics
    assert m.alias == 16
    answer = json.loads(metric_value(m, DT.String))  # type: ignore[arg-type]
    assert answer["result"] == "NAK"
    assert answer["reason"] == "line is running"
    assert answer["request_id"] == "q7"
    nbirth = metrics_by_name(node.birth(live(), 5000, 1.0)[0][1])
    assert json.loads(metric_value(nbirth[LAST_RESULT])) == answer  # type: ignore[arg-type]


# ---------------------------------------------------------------------- STATE


def test_parse_state() -> None:
    assert parse_state(state_payload(True, 123)) == HostState(True, 123)
    for bad, match in [
        (b"ONLINE", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"online": "yes", "timestamp": 1}', "'online' must be a boolean"),
        (b'{"online": true}', "'timestamp' must be an integer"),
        (b'{"online": true, "timestamp": true}', "'timestamp' must be an integer"),
    ]:
        with pytest.raises(LocalError, match=match):
            parse_state(bad)


def test_host_watch() -> None:
    w = HostWatch("scada-1")
    assert w.update(HostState(False, 100)) == "ignored"  # retained death, never online
    assert not w.online
    assert w.update(HostState(True, 200)) == "online"
    assert w.update(HostState(False, 150)) == "ignored"  # older than the birth we follow
    assert w.online
    assert w.update(HostState(False, 200)) == "offline"  # same session's death
    assert not w.online
    assert w.update(HostState(True, 300)) == "online"
    w.reset()
    assert not w.online


# ---------------------------------------------------------------------- bdSeq persistence


def test_bdseq_file_continues_across_restarts(tmp_path: Path) -> None:
    f = BdSeqFile(tmp_path / "state" / "bdseq.json")
    assert f.load() is None
    first = EdgeNode(G, N, bd_seq=f.load())
    f.save(first.new_session())
    f.save(first.new_session())
    restarted = EdgeNode(G, N, bd_seq=f.load())  # a new process
    assert restarted.new_session() == 2
    f.save(255)
    assert EdgeNode(G, N, bd_seq=f.load()).new_session() == 0


@pytest.mark.parametrize("text", ["", "{}", '{"bdSeq": 256}', '{"bdSeq": "3"}', "[1]"])
def test_bad_bdseq_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bdseq.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        BdSeqFile(path).load()


def test_node_line_status_metrics_only_when_fed() -> None:
    with_status = EdgeNode(G, N)
    without = EdgeNode(G, N, line_status=False)
    names = {m.name for _, m in all_metrics(with_status.layout)}
    assert "Line/state" in names
    assert not any(m.name.startswith("Line/") for _, m in all_metrics(without.layout))
    with_status.new_session()
    status = {"line_state": Sample("running", Quality.GOOD, 10)}
    nbirth = metrics_by_name(with_status.birth({**live(), **status}, 20, 0.0)[0][1])
    assert metric_value(nbirth["Line/state"]) == "running"
    assert metric_quality(nbirth["Line/cause"]) is Quality.COMM_FAIL  # not fed: null, BAD


def test_docs_list_every_metric_with_its_alias_type_and_unit() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "sparkplug.md").read_text()
    for dev in LAYOUT:
        section = text.split(f"### {dev.device_id or 'node'}\n", 1)[1].split("\n### ", 1)[0]
        for m in dev.metrics:
            alias = "—" if m.alias is None else str(m.alias)
            row = f"| `{m.name}` | {alias} | {pb.DataType.Name(m.datatype)} | {m.unit} |"
            assert row in section, f"docs/sparkplug.md lacks {row!r}"


def test_edge_from_config() -> None:
    from conftest import CONFIG_DIR

    from linectl.config import load_config
    from linectl.sparkplug.adapter import SparkplugEdge

    class Line:
        def live_values(self) -> dict:
            return {}

        async def execute(self, cmd: object) -> CommandResult:
            return CommandResult(True)

    off = load_config(CONFIG_DIR, environ={})
    with pytest.raises(ConfigError, match=r"sparkplug\.enabled is false"):
        SparkplugEdge.from_config(off, Line())
    env = {"LINECTL_SPARKPLUG__ENABLED": "true", "LINECTL_SPARKPLUG__PRIMARY_HOST_ID": "scada-1"}
    cfg = load_config(CONFIG_DIR, environ=env)
    edge = SparkplugEdge.from_config(cfg, Line(), bdseq_path=Path("/nonexistent/bd.json"))
    assert (edge.node.group_id, edge.node.edge_node_id) == ("linectl", cfg.line.line_id)
    assert edge.node.sender == "scada-1"
    assert edge.primary_host_id == "scada-1"
    assert edge.broker.client_id == f"linectl-{cfg.line.line_id}-spb"
    assert edge.broker.port == cfg.line.mqtt.port
    assert edge.node.bd_seq is None  # no file yet: the first session will use 0
    assert not any(m.name.startswith("Line/") for _, m in all_metrics(edge.node.layout))
    bad = load_config(CONFIG_DIR, environ={**env, "LINECTL_SPARKPLUG__EDGE_NODE_ID": "a/b"})
    with pytest.raises(ConfigError, match="edge_node_id 'a/b'"):
        SparkplugEdge.from_config(bad, Line())
