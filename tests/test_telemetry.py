"""Pure telemetry: topics, payloads and their schema, report by exception (no broker)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linectl.commands import MAX_SHELVE_S
from linectl.quality import Quality
from linectl.telemetry import (
    ALARM_STATES,
    LIVE_VALUES,
    RECORD_KINDS,
    SCHEMAS,
    TOPIC_SPECS,
    ActiveAlarm,
    AlarmView,
    LineStatus,
    LiveValue,
    ReportFilter,
    Topics,
    alarm_view_json,
    alarms_active_payload,
    encode,
    iso_to_ms,
    live_payload,
    ms_to_iso,
    record_payload,
    schema_document,
    state_payload,
    status_payload,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in unix ms


def test_topic_names() -> None:
    t = Topics.for_line("linectl/", "line1")
    assert t.base == "linectl/line1"
    assert t.status == "linectl/line1/status"
    assert t.state == "linectl/line1/state"
    assert t.alarms_active == "linectl/line1/alarms/active"
    assert t.live("beam_current_ma") == "linectl/line1/live/beam_current_ma"
    assert t.record("metres") == "linectl/line1/records/metres"
    assert t.cmd("stop", "scada-1") == "linectl/line1/cmd/stop/scada-1"
    assert t.cmd_filter == "linectl/line1/cmd/+/+"
    assert t.response("scada-1") == "linectl/line1/response/scada-1"
    with pytest.raises(ValueError, match="unknown record kind 'x'"):
        t.record("x")


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("linectl/line1/cmd/stop/scada-1", ("stop", "scada-1")),
        ("linectl/line1/cmd/stop", None),  # no sender level
        ("linectl/line1/cmd/stop/a/b", None),
        ("linectl/line1/cmd//a", None),
        ("linectl/line2/cmd/stop/a", None),  # another line
        ("linectl/line1/state", None),
    ],
)
def test_parse_command_topic(topic: str, expected: tuple[str, str] | None) -> None:
    assert Topics.for_line("linectl", "line1").parse_cmd(topic) == expected


def test_topic_table_names_a_schema_for_every_payload_topic() -> None:
    for spec in TOPIC_SPECS:
        assert spec.qos in (0, 1)
        if spec.pattern != "schema":
            assert spec.schema in SCHEMAS, spec
    # Records are events: never retained, always acknowledged. records/head is the
    # outbox's state (its newest seq), retained like the other state topics.
    for spec in TOPIC_SPECS:
        if spec.pattern.startswith(("records/", "replayed/")):
            assert spec.qos == 1
            assert spec.retain == (spec.pattern == "records/head")
    assert {s.pattern.removeprefix("records/") for s in TOPIC_SPECS} >= set(RECORD_KINDS)


def _check(payload: dict[str, object], schema_name: str) -> None:
    """Each payload names its schema, has its required keys and only declared keys, and
    carries a quality and a timestamp (every value does)."""
    schema = SCHEMAS[schema_name]
    assert payload["schema"] == schema["$id"]
    missing = set(schema["required"]) - set(payload)
    assert not missing, missing
    undeclared = set(payload) - set(schema["properties"])
    assert not undeclared, undeclared
    if schema_name not in ("command", "response"):
        assert payload["quality"] in {q.value for q in Quality}
    assert isinstance(payload["t_ms"], int)
    json.loads(encode(payload))  # encodes as strict JSON


def test_live_payload_carries_quality_time_and_unit() -> None:
    p = live_payload(LiveValue("beam_current_ma", 39.8, Quality.GOOD, T0))
    assert p == {
        "schema": "linectl.live/1",
        "name": "beam_current_ma",
        "value": 39.8,
        "unit": "mA",
        "quality": "good",
        "t_ms": T0,
    }
    _check(p, "live")


def test_unknown_value_is_null_never_nan() -> None:
    p = live_payload(LiveValue("vacuum_pa", math.nan, Quality.COMM_FAIL, T0))
    assert p["value"] is None
    assert p["quality"] == "comm_fail"
    assert b"NaN" not in encode(p)
    with pytest.raises(ValueError, match="Out of range float"):
        encode({"x": math.nan})


def test_live_names_are_unique_and_have_units() -> None:
    names = [s.name for s in LIVE_VALUES]
    assert len(names) == len(set(names))
    assert all(s.unit for s in LIVE_VALUES)


def test_state_status_alarm_payloads_match_their_schemas() -> None:
    status = LineStatus(
        "running",
        "beam on",
        T0,
        reel_id="R1",
        reel_planned_length_m=100.0,
        reel_started=True,
        recipe_product="PV",
        recipe_version="3",
        alarms=("vacuum",),
    )
    p = state_payload(status)
    _check(p, "state")
    assert p["reel"] == {"reel_id": "R1", "planned_length_m": 100.0, "started": True}
    assert state_payload(LineStatus("idle", "x", T0))["reel"] is None
    _check(status_payload(False, T0, session_ms=T0 - 5), "status")
    assert status_payload(True, T0, session_ms=T0)["status"] == "online"
    a = alarms_active_payload([ActiveAlarm("vacuum", "vacuum fault", True, T0)], T0 + 1)
    _check(a, "alarms_active")
    assert a["alarms"][0]["kind"] == "vacuum"


def test_alarms_active_carries_the_board_states_and_shelves() -> None:
    board = [
        AlarmView("vacuum", "vacuum fault", "unack", True, True, T0),
        AlarmView("beam_outage", "beam off for 10.0 s", "rtn_unack", False, False, T0 + 1),
        AlarmView(
            "scan",
            "scan fault",
            "shelved",
            active=True,
            latched=True,
            t_ms=T0 + 2,
            shelved_until_ms=T0 + 3_600_000,
            shelved_by="op-1",
            shelve_reason="coil swap",
        ),
    ]
    p = alarms_active_payload(board, T0 + 5)
    _check(p, "alarms_active")
    item = SCHEMAS["alarms_active"]["properties"]["alarms"]["items"]
    for a in p["alarms"]:
        # Every key declared, the existing ones still there and required.
        assert set(a) <= set(item["properties"])
        assert set(item["required"]) == {"kind", "message", "latched", "t_ms"} <= set(a)
        assert a["state"] in item["properties"]["state"]["enum"]
    assert p["alarms"][0] == {
        "kind": "vacuum",
        "message": "vacuum fault",
        "state": "unack",
        "active": True,
        "latched": True,
        "t_ms": T0,
        "shelved_until_ms": None,
        "shelved_by": None,
        "shelve_reason": None,
    }
    assert p["alarms"][2] == alarm_view_json(board[2])
    assert (p["alarms"][2]["state"], p["alarms"][2]["shelved_until_ms"]) == (
        "shelved",
        T0 + 3_600_000,
    )
    assert [a["kind"] for a in p["alarms"]] == ["vacuum", "beam_outage", "scan"]
    assert list(item["properties"]["state"]["enum"]) == list(ALARM_STATES)
    assert set(ALARM_STATES) == {"unack", "acked", "rtn_unack", "shelved"}
    # An endpoint without a board: its active alarms, with the keys they have.
    old = alarms_active_payload([ActiveAlarm("vacuum", "v", True, T0)], T0)
    _check(old, "alarms_active")
    assert old["alarms"] == [{"kind": "vacuum", "message": "v", "latched": True, "t_ms": T0}]


def test_the_command_schema_knows_the_shelving_keys() -> None:
    props = SCHEMAS["command"]["properties"]
    assert props["duration_s"]["exclusiveMinimum"] == 0
    assert props["duration_s"]["maximum"] == MAX_SHELVE_S


def test_ms_to_iso() -> None:
    assert ms_to_iso(T0) == "2026-01-01T00:00:00.000Z"
    assert ms_to_iso(T0 + 3_600_250) == "2026-01-01T01:00:00.250Z"
    assert iso_to_ms(ms_to_iso(T0 + 1234).replace("Z", "+00:00")) == T0 + 1234


def test_record_payload() -> None:
    data = {"event": "raised", "alarm_id": 3, "kind": "estop", "message": "e", "reel_id": None}
    p = record_payload(17, "alarm", "2026-01-01T00:00:01.250+00:00", data, historical=True)
    assert p["seq"] == 17
    assert p["historical"] is True
    assert p["t_ms"] == T0 + 1250
    assert p["t"] == "2026-01-01T00:00:01.250+00:00"  # the store's text, verbatim
    assert p["kind"] == "estop"
    assert "store_id" not in p
    assert "replay" not in p
    _check(p, "alarm")
    p = record_payload(
        17, "alarm", "2026-01-01T00:00:01.250+00:00", data, historical=True, store_id="u-1"
    )
    assert p["store_id"] == "u-1"
    _check(p, "alarm")
    with pytest.raises(ValueError, match="unknown record kind"):
        record_payload(1, "nope", "2026-01-01T00:00:00+00:00", {}, historical=False)
    with pytest.raises(ValueError, match="no UTC offset"):
        iso_to_ms("2026-01-01T00:00:00")


def test_schema_document_is_json() -> None:
    doc = json.loads(encode(schema_document()))
    assert doc["schemas"].keys() == SCHEMAS.keys()
    assert any(t["topic"] == "live/<name>" and t["qos"] == 0 for t in doc["topics"])


# ---------------------------------------------------------------------- report by exception


def v(value: float | None, t_s: float = 0.0, q: Quality = Quality.GOOD) -> LiveValue:
    return LiveValue("speed_m_min", value, q, round(T0 + t_s * 1000))


def test_first_value_is_published_then_deadband_holds() -> None:
    f = ReportFilter({"speed_m_min": 0.5}, max_age_s=10.0, min_interval_s=0.0)
    assert f.offer(v(80.0), 0.0)
    assert not f.offer(v(80.4), 0.1)  # inside the band
    assert not f.offer(v(79.6), 0.2)
    assert f.offer(v(80.6), 0.3)  # outside the band of the last *published* value
    assert not f.offer(v(80.9), 0.4)  # 0.3 from 80.6


def test_no_deadband_means_any_change() -> None:
    f = ReportFilter({}, max_age_s=10.0, min_interval_s=0.0)
    assert f.offer(v(1.0), 0.0)
    assert not f.offer(v(1.0), 0.1)
    assert f.offer(v(1.0000001), 0.2)


def test_max_age_republishes_an_unchanged_value() -> None:
    f = ReportFilter({}, max_age_s=5.0, min_interval_s=0.1)
    assert f.offer(v(1.0), 0.0)
    assert not f.offer(v(1.0), 4.9)
    assert f.offer(v(1.0), 5.0)
    assert not f.offer(v(1.0), 9.9)
    assert f.offer(v(1.0), 10.0)


def test_min_interval_holds_changes_but_not_quality() -> None:
    f = ReportFilter({}, max_age_s=5.0, min_interval_s=1.0)
    assert f.offer(v(1.0), 0.0)
    assert not f.offer(v(2.0), 0.5)  # changed, but too soon
    assert f.offer(v(2.0), 1.0)  # the held change goes once the interval is over
    assert f.offer(v(None, q=Quality.COMM_FAIL), 1.1)  # quality: at once
    assert f.offer(v(2.0, q=Quality.GOOD), 1.2)  # and back


def test_unknown_and_nan_values_are_changes() -> None:
    f = ReportFilter({"speed_m_min": 1.0}, max_age_s=5.0, min_interval_s=0.0)
    assert f.offer(v(1.0), 0.0)
    assert f.offer(v(None), 0.1)
    assert not f.offer(v(None), 0.2)
    assert f.offer(v(math.nan), 0.3)
    assert not f.offer(v(math.nan), 0.4)
    assert f.offer(v(1.0), 0.5)


def test_forget_publishes_everything_afresh() -> None:
    f = ReportFilter({}, max_age_s=5.0, min_interval_s=1.0)
    assert f.offer(v(1.0), 0.0)
    f.forget()
    assert f.offer(v(1.0), 0.1)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(0.01, 0.5),  # time step, s
            st.floats(-100.0, 100.0),  # value
            st.sampled_from([Quality.GOOD, Quality.GOOD, Quality.GOOD, Quality.STALE]),
        ),
        min_size=1,
        max_size=200,
    ),
    band=st.floats(0.0, 5.0),
    min_interval_s=st.floats(0.0, 1.0),
)
def test_report_by_exception_properties(
    steps: list[tuple[float, float, Quality]], band: float, min_interval_s: float
) -> None:
    max_age_s = 3.0
    f = ReportFilter({"speed_m_min": band}, max_age_s=max_age_s, min_interval_s=min_interval_s)
    t = 0.0
    last: tuple[float, float, Quality] | None = None  # (t, value, quality) last published
    for dt, value, quality in steps:
        t += dt
        sent = f.offer(v(value, t, quality), t)
        if last is None:
            assert sent, "the first value is always published"
        else:
            t_last, v_last, q_last = last
            if quality is not q_last:
                assert sent, "a change of quality goes at once"
            elif t - t_last < min_interval_s:
                assert not sent, "never more often than the minimum interval"
            elif t - t_last >= max_age_s or abs(value - v_last) > band:
                assert sent, "outside the band, or too old: published"
            else:
                assert not sent, "inside the band and young: held"
        if sent:
            last = (t, value, quality)
