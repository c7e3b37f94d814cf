"""The CLI's client commands (`status`, `reel`, `alarms`, `reset`, `recipe select`,
`watch`) against a real broker (tests/broker.py) and the daemon side: the MQTT bridge
with a line whose state the test sets, and the real line service over Modbus against
the simulators.

The CLI runs as a subprocess (`python -m linectl ...`): real exit codes, a real pipe (or
a pseudo-terminal) as stdout, real signals. The pure parts of linectl.client are tested
in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import TestBroker, running_broker
from conftest import cli, cli_env, free_port
from e2e_scenarios import TRUE_K, compact_config, endpoints, wait_for

from linectl.cli import main
from linectl.client import (
    ClientSettings,
    LineClient,
    LineView,
    check_sender,
    classify,
    clock_text,
    command_payload,
    describe_answer,
    parse_broker,
    read_answer,
)
from linectl.commands import Command, CommandError, CommandName, CommandResult, parse_command
from linectl.config import MqttConfig, load_config
from linectl.core.control import LineState
from linectl.daemon import run_with_bridge
from linectl.errors import LocalError
from linectl.mqtt import MqttBridge
from linectl.quality import Quality
from linectl.service import LineService, select_recipe
from linectl.store import RecordStore
from linectl.telemetry import (
    ActiveAlarm,
    LineStatus,
    LiveValue,
    Topics,
    encode,
    live_payload,
    record_payload,
    state_payload,
    status_payload,
)
from simulators.server import SimulatedLine

ROOT = Path(__file__).resolve().parents[1]
TOPICS = Topics.for_line("linectl", "line1")


# ---------------------------------------------------------------------- helpers


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class FakeLine:
    """The bridge's line endpoint without PLCs: state set by the test; every command is
    answered by `answer` (ACK unless the test says otherwise)."""

    values: dict[str, LiveValue] = field(default_factory=dict)
    status: LineStatus = field(default_factory=lambda: LineStatus("idle", "started", now_ms()))
    alarms: tuple[ActiveAlarm, ...] = ()
    commands: list[Command] = field(default_factory=list)
    refuse: str = ""

    def live_values(self) -> Mapping[str, LiveValue]:
        return self.values

    def line_status(self) -> LineStatus:
        return self.status

    def active_alarms(self) -> Sequence[ActiveAlarm]:
        return self.alarms

    async def execute(self, cmd: Command) -> CommandResult:
        self.commands.append(cmd)
        return CommandResult(
            not self.refuse, self.refuse, cmd.name.value, cmd.request_id, self.status.state
        )

    def audit_command_error(
        self, sender: str, command: str, reason: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        pass

    def audit_refusals(self, summary: Mapping[str, Any]) -> None:
        pass

    def set(self, name: str, value: float | None, quality: Quality = Quality.GOOD) -> None:
        self.values[name] = LiveValue(name, value, quality, now_ms())


def mqtt_cfg(broker: TestBroker, **update: Any) -> MqttConfig:
    base: dict[str, Any] = {
        "enabled": True,
        "host": broker.host,
        "port": broker.port,
        "keepalive_s": 5,
        "reconnect_max_s": 0.5,
        "live_min_interval_s": 0.0,
        # The bridge refuses a sender with no role before the fake line sees it; who may
        # do what is tested in test_mqtt.py and test_security.py.
        "allow_anonymous_commands": True,
    }
    base.update(update)
    return MqttConfig.model_validate(base)


def line_config(tmp_path: Path, broker: TestBroker | None, port: int | None = None) -> Path:
    """The compact test line with [mqtt] enabled on the test broker, and two identities:
    op-1 (operator, every command) and eye (viewer, none)."""
    d = compact_config(tmp_path)
    line = (d / "line.toml").read_text()
    head, mqtt = line.split("\n[mqtt]\n", 1)
    port = broker.port if broker is not None else port
    for old, new in [
        ("enabled = false", "enabled = true"),
        ("port = 1883", f"port = {port}"),
        ("live_min_interval_s = 0.1", "live_min_interval_s = 0.0"),
        ("[mqtt.identities]\n", '[mqtt.identities]\n"op-1" = "operator"\n"eye" = "viewer"\n'),
    ]:
        assert old in mqtt, old
        mqtt = mqtt.replace(old, new, 1)
    (d / "line.toml").write_text(f"{head}\n[mqtt]\n{mqtt}")
    return d


@contextlib.asynccontextmanager
async def running_bridge(bridge: MqttBridge) -> AsyncIterator[None]:
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.connected.wait(), 10.0)
        yield
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 15.0)


async def retained(broker: TestBroker, topic: str, want: Any, timeout_s: float = 10.0) -> None:
    """Wait until the retained message on `topic` satisfies want(payload)."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with broker.client() as c:
            await c.subscribe(topic, qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for m in c.messages:
                        # Matched by topic: amqtt 0.12 delivers other retained topics too.
                        if m.topic.value != topic:
                            continue
                        if want(json.loads(bytes(m.payload))):  # type: ignore[arg-type]
                            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"retained {topic} never matched")


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[TestBroker]:
    embedded = os.environ.get("LINECTL_TEST_EMBEDDED_BROKER") == "1"
    async with running_broker(tmp_path / "broker", force_embedded=embedded) as b:
        yield b


def fake_bridge(line: FakeLine, broker: TestBroker, tmp_path: Path) -> MqttBridge:
    return MqttBridge(
        line,
        mqtt_cfg(broker),
        line_id="line1",
        store_path=tmp_path / "bridge.sqlite",
        protocol=broker.protocol,
    )


def running_line(line: FakeLine) -> None:
    """A line in the middle of a reel, with an alarm and a PLC value missing."""
    t = now_ms()
    line.status = LineStatus(
        "running",
        "beam on at dose-follow current",
        t,
        reel_id="R-7",
        reel_planned_length_m=100.0,
        reel_started=True,
        recipe_product="test cable",
        recipe_version="e2e-1",
        alarms=("beam_outage",),
    )
    line.alarms = (ActiveAlarm("beam_outage", "beam off for 1.2 s", False, t),)
    line.set("speed_m_min", 80.0)
    line.set("speed_sp_m_min", 80.0)
    line.set("reel_position_m", 25.0)
    line.set("beam_current_ma", None, Quality.COMM_FAIL)
    line.set("tension_n", 118.0, Quality.STALE)


# ---------------------------------------------------------------------- pure parts


def test_parse_broker() -> None:
    assert parse_broker("mqtt.plant", 1883) == ("mqtt.plant", 1883)
    assert parse_broker("10.0.0.5:8883", 1883) == ("10.0.0.5", 8883)
    assert parse_broker("[::1]:1884", 1883) == ("::1", 1884)
    assert parse_broker("[fe80::1]", 1883) == ("fe80::1", 1883)
    for bad, why in [
        ("host:99999", "port '99999'"),
        ("host:x", "port 'x'"),
        (":1883", "no host"),
        ("::1", "IPv6"),
        ("[::1", "missing ']'"),
    ]:
        with pytest.raises(LocalError, match=re.escape(why)):
            parse_broker(bad, 1883)


def test_command_payload_is_checked_by_the_daemons_parser() -> None:
    args = {"reel_id": "R1", "length_m": 40.0, "operator": "A. Smith", "recipe": None}
    payload = command_payload(CommandName.START_REEL, args, sender="op-1", request_id="cli-1")
    cmd = parse_command(payload, name="start_reel", sender="op-1")
    assert (cmd.reel_id, cmd.length_m, cmd.operator, cmd.recipe) == ("R1", 40.0, "A. Smith", None)
    assert cmd.request_id == "cli-1"
    with pytest.raises(CommandError, match="reel_id 'bad id'"):
        command_payload(CommandName.START_REEL, {**args, "reel_id": "bad id"}, sender="a",
                        request_id="x")  # fmt: skip
    with pytest.raises(CommandError, match="length_m must be positive"):
        command_payload(CommandName.START_REEL, {**args, "length_m": -3.0}, sender="a",
                        request_id="x")  # fmt: skip
    with pytest.raises(CommandError, match="sender 'a/b'"):
        check_sender("a/b")
    assert check_sender("op-1") == "op-1"


def test_answers_and_their_schema() -> None:
    ack = CommandResult(True, "", "ack_alarm", "r1", "fault", {"alarms": ["vacuum", "arc"]})
    result = read_answer(ack.to_json(123))
    assert result == ack
    assert (
        describe_answer("line1", result) == "line1: ACK ack_alarm (line fault); alarms vacuum, arc"
    )
    nak = CommandResult(False, "nothing to stop in state ready", "stop", "r2", "ready")
    assert describe_answer("line1", read_answer(nak.to_json(1))) == (
        "line1: NAK stop: nothing to stop in state ready (line ready)"
    )
    with pytest.raises(LocalError, match=re.escape("schema 'linectl.response/2'")):
        read_answer({**nak.to_json(1), "schema": "linectl.response/2"})
    with pytest.raises(LocalError, match="result 'ACK' and ack False"):
        read_answer({**nak.to_json(1), "result": "ACK"})


def test_classify_follows_the_topic_table() -> None:
    assert classify(TOPICS, "linectl/line1/state") == ("state", "")
    assert classify(TOPICS, "linectl/line1/alarms/active") == ("alarms_active", "")
    assert classify(TOPICS, "linectl/line1/live/speed_m_min") == ("live", "speed_m_min")
    assert classify(TOPICS, "linectl/line1/records/metres") == ("metres", "")
    assert classify(TOPICS, "linectl/line1/cmd/stop/op-1") == ("command", "stop/op-1")
    assert classify(TOPICS, "linectl/line2/state") == ("", "")
    assert classify(TOPICS, "linectl/line1/live/a/b") == ("", "")


def test_line_view_renders_and_checks_schemas() -> None:
    view = LineView(TOPICS)
    t = now_ms()
    # Times are local times of day, with the date when it is not today.
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", clock_text(t, ms=True))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", clock_text(t - 3 * 86_400_000))
    status = LineStatus("ready", "PLCs ready", t, recipe_product="p", recipe_version="2")
    (line,) = view.apply(TOPICS.state, encode(state_payload(status)))
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} state READY since \d\d:\d\d:\d\d: PLCs ready$", line)
    assert view.apply(TOPICS.status, encode(status_payload(True, t, session_ms=t)))
    live = LiveValue("vacuum_pa", 2.5e-4, Quality.STALE, t)
    (line,) = view.apply(TOPICS.live("vacuum_pa"), encode(live_payload(live)))
    assert line.endswith("live vacuum_pa 2.50e-04 Pa [stale]")
    # A payload of another protocol version is not read as this one: a warning instead.
    (warn,) = view.apply(TOPICS.alarms_active, b'{"schema": "linectl.alarms_active/2"}')
    assert "linectl.alarms_active/2" in warn
    assert view.alarms is None
    assert view.apply(TOPICS.state, b"not json")[0].startswith("warning:")
    # Records are delivered at least once: a repeated seq is shown once.
    batch = {
        "reel_id": "R1",
        "event": "metres",
        "metres": [
            {"index": 4, "dose_kgy": 121.0, "verdict": "in_spec", "causes": []},
            {"index": 5, "dose_kgy": 101.0, "verdict": "under_dose", "causes": ["beam"]},
        ],
    }
    rec = encode(record_payload(7, "metres", "2026-01-01T00:00:00+00:00", batch, historical=False))
    (first,) = view.apply(TOPICS.record("metres"), rec)
    assert first.endswith("metres R1 #4..#5: 1 in_spec, 1 under_dose")
    assert view.apply(TOPICS.record("metres"), rec) == []
    lines = view.status_lines(ClientSettings("line1", "127.0.0.1", 1883))
    assert lines[0].startswith("line1 @ 127.0.0.1:1883: online since")
    assert lines[1].startswith("state     READY since")
    assert lines[1].endswith(": PLCs ready")
    assert "vacuum 2.50e-04 Pa [stale]" in "\n".join(lines)
    assert any("linectl.alarms_active/2" in ln for ln in lines)
    screen = view.screen_lines(ClientSettings("line1", "h", 1), t)
    assert "metres    R1: 2 seen (1 in_spec, 1 under_dose); last #5 101.0 kGy under_dose" in screen


def test_help_documents_every_client_command_and_exit_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("status", "reel", "alarms", "reset", "watch"):
        assert re.search(rf"^\s+{word}\s+\S", out, re.M), word
    assert "3 the line refused the command (NAK" in out
    assert "4 no answer from the line" in out
    assert "5 MQTT" in out
    for sub in (["status"], ["reel", "start"], ["reel", "stop"], ["alarms"], ["reset"],
                ["recipe", "select"], ["watch"]):  # fmt: skip
        assert main([*sub, "--help"]) == 0
        text = capsys.readouterr().out
        assert "exit codes: 0 ok" in text, sub
        assert "--broker HOST[:PORT]" in text, sub


def test_bad_input_exits_2_and_sends_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("LINECTL_"):
            monkeypatch.delenv(name)
    # Nothing listens here: a check made after connecting would exit 5, not 2.
    cfg = str(line_config(tmp_path, None, port=free_port()))
    for args, why in [
        (["reel", "start", "bad id", "--length", "5"], "reel_id 'bad id'"),
        (["reel", "start", "R1", "--length", "-3"], "length_m must be positive"),
        (["reel", "start", "R1", "--length", "nan"], "length_m must be finite"),
        (["reel", "start", "R1"], "--length"),
        (["reel", "stop", "--sender", "a/b"], "sender 'a/b'"),
        (["reel", "stop", "--broker", "h:99999"], "port '99999'"),
        (["reel", "stop", "--timeout", "-1"], "positive number of seconds"),
        (["alarms", "ack"], "needs the alarm KIND"),
        (["alarms", "ack", "Bad Kind!"], "unknown alarm kind 'Bad Kind!'"),
        (["alarms", "ack", "vacuum_low"], "unknown alarm kind 'vacuum_low': one of"),
        (["reel", "end", "R1"], "--reason"),
        (["alarms", "vacuum"], "invalid choice: 'vacuum' (choose from 'ack')"),
        (["recipe", "select", "../etc/passwd"], "recipe '../etc/passwd'"),
        (["watch", "--duration", "0"], "positive number of seconds"),
    ]:
        assert main([*args, "--config", cfg]) == 2, args
        err = capsys.readouterr().err
        assert why in err, (args, err)
        assert "Traceback" not in err


# ---------------------------------------------------------------------- against a broker


async def test_status_and_alarms_from_the_retained_topics(
    broker: TestBroker, tmp_path: Path
) -> None:
    cfg = str(line_config(tmp_path, broker))
    line = FakeLine()
    running_line(line)
    bridge = fake_bridge(line, broker, tmp_path)
    async with running_bridge(bridge):
        bridge.on_cycle()
        await retained(broker, TOPICS.live("tension_n"), lambda p: p["value"] == 118.0)
        await retained(broker, TOPICS.alarms_active, lambda p: p["alarms"] != [])
        r = await cli("status", "--config", cfg)
        assert r.rc == 0, r
        assert r.out.startswith(f"line1 @ 127.0.0.1:{broker.port}: online since")
        for text in (
            "state     RUNNING since",
            ": beam on at dose-follow current",
            "reel      R-7, 100 m planned, at 25.0 m (25 %)",
            "recipe    test cable, version e2e-1",
            "alarms    beam_outage: beam off for 1.2 s",
            "beam      current n/a [comm_fail], energy -,",
            "line      speed 80.0 m/min (set-point 80.0)",
            "tension 118 N [stale]",
        ):
            assert text in r.out, (text, r.out)
        r = await cli("status", "--config", cfg, "--json")
        assert r.rc == 0, r
        doc = json.loads(r.out)
        assert doc["state"]["state"] == "running"
        assert doc["live"]["speed_m_min"]["value"] == 80.0
        assert doc["status"]["status"] == "online"
        r = await cli("alarms", "--config", cfg)
        assert r.rc == 0, r
        assert "1 active alarm:" in r.out
        assert re.search(r"beam_outage\s+since \d\d:\d\d:\d\d\s+beam off for 1.2 s", r.out)
        # The line changes: the next status says so.
        line.status = LineStatus("ready", "reel R-7 stopped", now_ms(), not_ready_reason="")
        line.alarms = ()
        bridge.on_cycle()
        await retained(broker, TOPICS.state, lambda p: p["state"] == "ready")
        r = await cli("alarms", "--config", cfg)
        assert (r.rc, "no active alarms" in r.out) == (0, True), r
    # The daemon is gone (it published offline): the last known state, and exit 4.
    r = await cli("status", "--config", cfg)
    assert r.rc == 4, r
    assert "OFFLINE" in r.out
    assert "READY since" in r.out
    assert "is `linectl run` running?" in r.err


async def test_no_daemon_no_broker(broker: TestBroker, tmp_path: Path) -> None:
    cfg = str(line_config(tmp_path, broker))
    r = await cli("reel", "stop", "--config", cfg, "--sender", "op-1", "--timeout", "1")
    assert r.rc == 4, r
    assert f"no answer from line line1 within 1 s (broker 127.0.0.1:{broker.port}" in r.err
    assert "no linectl has published linectl/line1/status on this broker" in r.err
    r = await cli("status", "--config", cfg, "--timeout", "1")
    assert r.rc == 4, r
    assert f"no status of line line1 at broker 127.0.0.1:{broker.port} within 1 s" in r.err
    assert r.out == ""
    # A daemon that was there and left: its offline status is named.
    bridge = fake_bridge(FakeLine(), broker, tmp_path)
    async with running_bridge(bridge):
        pass
    r = await cli("reset", "--config", cfg, "--sender", "op-1", "--timeout", "1")
    assert r.rc == 4, r
    assert "the line is OFFLINE" in r.err
    # No broker at all.
    closed = f"127.0.0.1:{free_port()}"
    for args in (["status"], ["reel", "stop"], ["watch", "--duration", "5"]):
        r = await cli(*args, "--config", cfg, "--broker", closed, "--timeout", "2")
        assert r.rc == 5, (args, r)
        assert f"cannot connect to MQTT broker {closed} (line line1)" in r.err, r
        assert "Traceback" not in r.err


async def test_commands_answered_through_the_bridge(broker: TestBroker, tmp_path: Path) -> None:
    cfg = str(line_config(tmp_path, broker))
    line = FakeLine()
    bridge = fake_bridge(line, broker, tmp_path)
    async with running_bridge(bridge):
        r = await cli("reel", "start", "R9", "--length", "250", "--operator", "A. Smith",
                      "--recipe", "fast", "--reason", "first reel", "--config", cfg,
                      "--sender", "op-1")  # fmt: skip
        assert (r.rc, r.out) == (0, "line1: ACK start_reel (line idle)\n"), r
        line.refuse = "cannot start in state idle: conveyor not READY"
        r = await cli("reel", "start", "R9", "--length", "5", "--config", cfg, "--sender", "x")
        assert r.rc == 3, r
        assert r.out == ""
        assert r.err == (
            "linectl: line1: NAK start_reel: cannot start in state idle: conveyor not READY "
            "(line idle)\n"
        )
        r = await cli("alarms", "ack", "all", "--json", "--config", cfg, "--sender", "x")
        assert r.rc == 3, r
        assert json.loads(r.out)["result"] == "NAK"
    got = [(c.name, c.sender, c.reel_id, c.length_m, c.operator, c.recipe) for c in line.commands]
    assert got == [
        (CommandName.START_REEL, "op-1", "R9", 250.0, "A. Smith", "fast"),
        (CommandName.START_REEL, "x", "R9", 5.0, None, None),
        (CommandName.ACK_ALARM, "x", None, None, None, None),
    ]
    assert line.commands[0].reason == "first reel"
    assert line.commands[2].alarm == "*"
    assert len({c.request_id for c in line.commands}) == 3  # a new request id each time


async def test_mqtt5_response_topic_and_correlation_data(
    broker: TestBroker, tmp_path: Path
) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("MQTT 5 needs mosquitto")
    line = FakeLine()
    settings = ClientSettings("line1", broker.host, broker.port, sender="op-1")
    bridge = fake_bridge(line, broker, tmp_path)
    seen: list[aiomqtt.Message] = []
    async with running_bridge(bridge), broker.client() as spy:
        await spy.subscribe("linectl/line1/#", qos=1)

        async def listen() -> None:
            async for m in spy.messages:
                seen.append(m)

        task = asyncio.create_task(listen())
        async with LineClient(settings) as client:
            assert client.protocol is aiomqtt.ProtocolVersion.V5
            payload = command_payload(CommandName.STOP, {}, sender="op-1", request_id="cli-a1")
            answer = await client.request(CommandName.STOP, payload, "cli-a1", 5.0)
        await wait_for(lambda: any("/response/" in m.topic.value for m in seen), 5.0, "answer")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert answer.result.ack
    assert answer.result.request_id == "cli-a1"
    (cmd,) = [m for m in seen if m.topic.value == "linectl/line1/cmd/stop/op-1"]
    assert cmd.properties is not None
    assert cmd.properties.ResponseTopic == "linectl/line1/response/op-1"
    assert cmd.properties.CorrelationData == b"cli-a1"
    (resp,) = [m for m in seen if m.topic.value == "linectl/line1/response/op-1"]
    assert resp.properties is not None
    assert resp.properties.CorrelationData == b"cli-a1"


async def test_mqtt311_broker_falls_back_to_the_response_topic(tmp_path: Path) -> None:
    pytest.importorskip("amqtt")
    async with running_broker(tmp_path / "b", force_embedded=True) as broker:
        line = FakeLine()
        settings = ClientSettings("line1", broker.host, broker.port, sender="op-1")
        bridge = fake_bridge(line, broker, tmp_path)
        async with running_bridge(bridge), LineClient(settings) as client:
            assert client.protocol is aiomqtt.ProtocolVersion.V311
            payload = command_payload(CommandName.RESET, {}, sender="op-1", request_id="cli-b")
            answer = await client.request(CommandName.RESET, payload, "cli-b", 5.0)
    assert answer.result.ack
    assert [(c.name, c.request_id) for c in line.commands] == [(CommandName.RESET, "cli-b")]


async def test_the_documented_acl(tmp_path: Path) -> None:
    """Under docs/mqtt.md's ACL an operator sends only under their own name (the default
    sender is the user name); reading the state needs the read rules of docs/cli.md."""
    reader = "".join(
        f"topic read linectl/+/{t}\n"
        for t in ("status", "state", "alarms/active", "live/#", "records/#")
    )
    acl = (
        "user linectl\ntopic readwrite linectl/#\n\n"
        f"user op-2\n{reader}\n"
        "pattern write linectl/+/cmd/+/%u\n"
        "pattern read linectl/+/response/%u\n"
    )
    users = {"linectl": "bridge", "op-1": "pw", "op-2": "pw2"}
    broker = TestBroker(tmp_path / "b", users=users, acl=acl)
    if broker.kind != "mosquitto":
        pytest.skip("users and ACLs need mosquitto")
    await broker.start()
    try:
        cfg = str(line_config(tmp_path, broker))
        env = cli_env(LINECTL_MQTT__USERNAME="op-1", LINECTL_MQTT__PASSWORD="pw")
        line = FakeLine()
        bridge = MqttBridge(
            line,
            mqtt_cfg(broker, username="linectl", password="bridge"),
            line_id="line1",
            store_path=tmp_path / "r.sqlite",
        )
        async with running_bridge(bridge):
            r = await cli("reel", "stop", "--config", cfg, env=env)
            assert (r.rc, r.out) == (0, "line1: ACK stop (line idle)\n"), r
            # Under another name the broker drops the command: no answer, and why.
            r = await cli("reel", "stop", "--config", cfg, "--sender", "boss", "--timeout",
                          "1", env=env)  # fmt: skip
            assert r.rc == 4, r
            assert "no answer from line line1 within 1 s" in r.err
            # Mosquitto grants a subscription its ACL will never deliver on: the message
            # names the ACL as a cause.
            r = await cli("status", "--config", cfg, "--timeout", "1", env=env)
            assert r.rc == 4, r
            assert "or its ACL does not let op-1 read it" in r.err
            # With the read rules of docs/cli.md: the state, and commands as before.
            env2 = cli_env(LINECTL_MQTT__USERNAME="op-2", LINECTL_MQTT__PASSWORD="pw2")
            bridge.on_cycle()
            r = await cli("status", "--config", cfg, env=env2)
            assert r.rc == 0, r
            assert "state     IDLE since" in r.out
            r = await cli("reset", "--config", cfg, env=env2)
            assert (r.rc, r.out) == (0, "line1: ACK reset (line idle)\n"), r
            bad = cli_env(LINECTL_MQTT__USERNAME="op-1", LINECTL_MQTT__PASSWORD="nope")
            r = await cli("status", "--config", cfg, env=bad)
            assert r.rc == 5, r
            assert "refused the connection" in r.err
            assert "LINECTL_MQTT__PASSWORD" in r.err
        assert [(c.name, c.sender) for c in line.commands] == [
            (CommandName.STOP, "op-1"),
            (CommandName.RESET, "op-2"),
        ]
    finally:
        await broker.stop()


# ---------------------------------------------------------------------- watch


async def test_watch_prints_a_line_per_update(broker: TestBroker, tmp_path: Path) -> None:
    cfg = str(line_config(tmp_path, broker))
    line = FakeLine()
    running_line(line)
    bridge = fake_bridge(line, broker, tmp_path)
    async with running_bridge(bridge), broker.client() as pub:
        bridge.on_cycle()
        await retained(broker, TOPICS.state, lambda p: p["state"] == "running")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "linectl", "watch", "--config", cfg, "--duration", "4",
            cwd=ROOT, env=cli_env(), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 10.0)
        assert first, "watch printed nothing"
        await asyncio.sleep(0.3)  # the retained burst is in
        line.set("speed_m_min", 42.5)
        line.status = LineStatus("stopping", "stop requested by op-1", now_ms(), reel_id="R-7")
        line.alarms = ()
        bridge.on_cycle()
        batch = {
            "reel_id": "R-7",
            "event": "metres",
            "metres": [{"index": 30, "dose_kgy": 120.4, "verdict": "in_spec", "causes": []}],
        }
        rec = encode(
            record_payload(41, "metres", datetime.now(UTC).isoformat(), batch, historical=False)
        )
        for _ in range(2):  # a redelivery: shown once
            await pub.publish(TOPICS.record("metres"), rec, qos=1)
        out, err = await asyncio.wait_for(proc.communicate(), 15.0)
    text = first.decode() + out.decode()
    assert proc.returncode == 0, err
    assert "watching line1" in err.decode()
    lines = text.splitlines()
    stamp = r"^\d\d:\d\d:\d\d\.\d\d\d "
    assert all(re.match(stamp, ln) for ln in lines), lines
    assert any(re.search(r"status online since", ln) for ln in lines)
    assert any(ln.endswith("live speed_m_min 80.0 m/min") for ln in lines)
    assert any(ln.endswith("live beam_current_ma n/a [comm_fail]") for ln in lines)
    assert any("alarms beam_outage: beam off for 1.2 s" in ln for ln in lines)
    # The updates after the start, in the order they happened.
    assert any(ln.endswith("live speed_m_min 42.5 m/min") for ln in lines)
    assert any("state STOPPING since" in ln and "requested by op-1" in ln for ln in lines)
    assert any(ln.endswith("alarms none") for ln in lines)
    assert [ln for ln in lines if "metres R-7" in ln] == [
        next(ln for ln in lines if ln.endswith("metres R-7 #30..#30: 1 in_spec"))
    ]


async def test_watch_follows_the_line_across_a_broker_restart(
    broker: TestBroker, tmp_path: Path
) -> None:
    cfg = str(line_config(tmp_path, broker))
    line = FakeLine()
    running_line(line)
    bridge = fake_bridge(line, broker, tmp_path)
    async with running_bridge(bridge):
        bridge.on_cycle()
        await retained(broker, TOPICS.state, lambda p: p["state"] == "running")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "linectl", "watch", "--config", cfg, "--duration", "8",
            cwd=ROOT, env=cli_env(), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 10.0)
        await broker.restart(down_s=1.0)
        await wait_for(bridge.connected.is_set, 10.0, "the bridge back")
        await asyncio.sleep(1.5)  # the watch is back too (its backoff is at most 0.8 s here)
        line.set("speed_m_min", 33.3)
        bridge.on_cycle()
        out, err = await asyncio.wait_for(proc.communicate(), 20.0)
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    lost = next(i for i, ln in enumerate(lines) if f"broker 127.0.0.1:{broker.port} lost" in ln)
    back = next(i for i, ln in enumerate(lines) if ln.endswith(f"{broker.port} back"))
    new = next(i for i, ln in enumerate(lines) if ln.endswith("live speed_m_min 33.3 m/min"))
    assert lost < back < new, lines


async def test_watch_ctrl_c_exits_0(broker: TestBroker, tmp_path: Path) -> None:
    cfg = str(line_config(tmp_path, broker))
    line = FakeLine()
    bridge = fake_bridge(line, broker, tmp_path)
    async with running_bridge(bridge):
        bridge.on_cycle()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "linectl", "watch", "--config", cfg,
            cwd=ROOT, env=cli_env(), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 10.0)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 10.0)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err


async def test_watch_redraws_in_place_on_a_terminal(broker: TestBroker, tmp_path: Path) -> None:
    cfg = str(line_config(tmp_path, broker))
    line = FakeLine()
    running_line(line)
    bridge = fake_bridge(line, broker, tmp_path)
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side closed
                return
            if not data:
                return
            chunks.append(data)

    async with running_bridge(bridge):
        bridge.on_cycle()
        await retained(broker, TOPICS.state, lambda p: p["state"] == "running")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "linectl", "watch", "--config", cfg, "--duration", "3.5",
            cwd=ROOT, env=cli_env(COLUMNS="120"), stdout=slave,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        os.close(slave)
        reader = asyncio.create_task(asyncio.to_thread(drain))
        # The change comes once the first frame is drawn (the CLI takes about a second to
        # start on a loaded host: a fixed sleep raced it).
        for _ in range(200):
            if b"RUNNING since" in b"".join(chunks):
                break
            await asyncio.sleep(0.05)
        line.set("speed_m_min", 61.0)
        bridge.on_cycle()
        _, err = await asyncio.wait_for(proc.communicate(), 15.0)
        await asyncio.wait_for(reader, 5.0)
    os.close(master)
    assert proc.returncode == 0, err
    screen = b"".join(chunks).decode()
    assert screen.startswith("\x1b[?25l\x1b[H\x1b[2J")  # cursor hidden, screen cleared
    assert screen.endswith("\x1b[J\x1b[?25h")  # the last frame, then the cursor back
    frames = screen.split("\x1b[H")[2:]
    assert len(frames) >= 3  # redrawn in place (and each second for the clock)
    assert "\n" not in screen.replace("\x1b[K\r\n", "").replace("\x1b[K\n", "")
    last = frames[-1]
    assert "linectl watch  line1 @ 127.0.0.1:" in last
    assert "RUNNING since" in last
    assert "61.0 m/min" in last
    # The value before the change was on the screen first, and then replaced in place.
    before = [i for i, f in enumerate(frames) if "80.0 m/min" in f]
    after = [i for i, f in enumerate(frames) if "61.0 m/min" in f]
    assert before
    assert after
    assert max(before) < min(after)


# ---------------------------------------------------------------------- the real line


@pytest.mark.slow
async def test_operator_session_on_a_running_line(broker: TestBroker, tmp_path: Path) -> None:
    """The real line service over Modbus against the simulators, driven from the CLI."""
    if broker.kind != "mosquitto":
        pytest.skip("`linectl run`'s bridge speaks MQTT 5 only (no protocol config key)")
    config_dir = line_config(tmp_path, broker)
    cfg = load_config(config_dir, environ={})
    recipe, path = select_recipe(cfg, None)
    c = ("--config", str(config_dir))
    op = (*c, "--sender", "op-1")

    async with SimulatedLine(cfg, seed=5, k_dose_true=TRUE_K) as sim:
        svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
        svc.on_reel_start.append(lambda _r, counter_m: sim.plant.start_reel(counter_m))
        service = asyncio.create_task(run_with_bridge(svc, exit_when_done=False, metrics_port=0))
        try:
            await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY")
            await retained(broker, TOPICS.state, lambda p: p["state"] == "ready")
            r = await cli("status", *c)
            assert r.rc == 0, r
            assert "state     READY since" in r.out, r
            assert "recipe    test cable, version e2e-1" in r.out

            r = await cli("reel", "stop", *op)
            assert r.rc == 3, r
            assert "NAK stop: nothing to stop in state ready" in r.err, r
            r = await cli("recipe", "select", "nope", *op)
            assert r.rc == 3, r
            assert "nope" in r.err, r
            r = await cli("reel", "start", "R1", "--length", "60", "--operator", "A. Smith",
                          "--sender", "eye", *c)  # fmt: skip
            assert r.rc == 3, r
            assert "role 'viewer' may not send start_reel" in r.err, r
            assert svc.ctl.state is LineState.READY  # refused: nothing changed

            r = await cli("reel", "start", "R1", "--length", "60", "--operator", "A. Smith", *op)
            assert (r.rc, r.out) == (0, "line1: ACK start_reel (line ready)\n"), r
            await wait_for(lambda: svc.ctl.state is LineState.RUNNING, 20.0, "RUNNING")
            r = await cli("reel", "start", "R2", "--length", "5", *op)
            assert r.rc == 3, r
            assert "state running" in r.err, r
            await wait_for(lambda: (svc.ledger.position_m or 0) > 2.0, 20.0, "2 m of reel")
            r = await cli("watch", "--duration", "3", *c)
            assert r.rc == 0, r
            assert re.search(r"state RUNNING since .*", r.out), r.out
            assert re.search(r"live speed_m_min \d+\.\d m/min$", r.out, re.M), r.out
            assert re.search(r"metres R1 #\d+\.\.#\d+: \d+ in_spec$", r.out, re.M), r.out
            r = await cli("status", *c)
            assert re.search(r"reel      R1, 60 m planned, at \d+\.\d m \(\d+ %\)", r.out), r

            r = await cli("reel", "stop", "--reason", "end of shift", *op)
            assert r.rc == 0, r
            assert "ACK stop (line running)" in r.out, r
            await wait_for(lambda: svc.ctl.state is LineState.READY, 30.0, "READY again")

            sim.faults.latch("accelerator", 2)
            await wait_for(lambda: svc.ctl.state is LineState.FAULT, 10.0, "FAULT")
            await retained(broker, TOPICS.alarms_active, lambda p: p["alarms"] != [])
            r = await cli("alarms", *c)
            assert r.rc == 0, r
            assert re.search(r"accelerator_fault\s+latched\s+since", r.out), r
            r = await cli("alarms", "ack", "accelerator_fault", *op)
            assert r.rc == 0, r
            assert r.out == "line1: ACK ack_alarm (line fault); alarms accelerator_fault\n"
            r = await cli("alarms", "ack", "accelerator_fault", *op)
            assert r.rc == 3, r
            assert "no unacknowledged" in r.err, r
            r = await cli("reset", *op)
            assert r.rc == 0, r
            await wait_for(lambda: svc.ctl.state is LineState.READY, 15.0, "READY after reset")

            # R1's cable is cut: end it where it stands, and R2 may start.
            r = await cli("reel", "end", "R1", *op)
            assert r.rc == 2, r  # --reason is required: nothing sent
            r = await cli("reel", "end", "R1", "--reason", "cable cut", *op)
            assert r.rc == 0, r
            assert re.fullmatch(
                r"line1: ACK end_reel \(line ready\); reel_id R1, metres_unproven [1-9]\d*\n", r.out
            ), r
            assert svc.interrupted_reel() is None
        finally:
            svc.stop()
            await asyncio.wait_for(service, 30.0)

    with RecordStore(tmp_path / "records.sqlite") as store:
        events = [e for e in store.events() if e.action != "transition"]
    assert [(e.actor, e.action, e.accepted) for e in events] == [
        ("op-1", "stop", False),
        ("op-1", "select_recipe", False),
        ("eye", "start_reel", False),
        ("op-1", "start_reel", True),
        ("op-1", "start_reel", False),
        ("op-1", "stop", True),
        ("op-1", "ack_alarm", True),
        ("op-1", "ack_alarm", False),
        ("op-1", "reset", True),
        ("op-1", "end_reel", True),
    ]
    assert events[3].detail["operator"] == "A. Smith"
    assert events[5].detail["reason"] == "end of shift"
