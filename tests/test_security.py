"""Security: one test for each refusal docs/security.md names (the others are named there
by reference to the test that already checks them).

Most run a real LineService with its record store but without PLCs (its links point at
ports nothing listens on, so the line stays OFFLINE): what is checked is the answer, the
audit trail and that nothing changed, and no command can move anything anyway. The MQTT
bridge's own refusals (retained, oversize, malformed) are driven through its message
handler with that real service behind it, so their audit rows land in the store too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
from conftest import CONFIG_DIR, free_port
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linectl.commands import Command, CommandName, CommandResult
from linectl.config import (
    HttpConfig,
    LineConfig,
    LoadedConfig,
    MetricsConfig,
    MqttConfig,
    load_config,
)
from linectl.core.control import CommandRefused, Controller, LineState, ReelPlan
from linectl.errors import ConfigError
from linectl.metrics import LineMetrics, WithoutCreated
from linectl.mqtt import MqttBridge
from linectl.service import LineService, select_recipe
from linectl.store import AuditEvent, RecordStore
from linectl.telemetry import Topics
from linectl.web.server import HMI_LIMITS, HmiServer, serve_metrics

NO_ROLE = (
    "identity 'stranger' has no role: "
    'add "stranger" = "operator" under [mqtt.identities] in line.toml'
)
ROLES = {"operator": ["*"], "viewer": [], "ghost-role-holder": ["stop"]}
IDENTITIES = {"op-1": "operator", "eye": "viewer", "ghost": "nobody"}


def mqtt_config(**update: Any) -> MqttConfig:
    return MqttConfig(roles=ROLES, identities=IDENTITIES, **update)


def offline_config(tmp_path: Path, **mqtt: Any) -> LoadedConfig:
    """The shipped line with PLC endpoints nobody answers on and records in tmp."""
    cfg = load_config(CONFIG_DIR, environ={})
    cfg.line = cfg.line.model_copy(
        update={
            "mqtt": mqtt_config(**mqtt),
            "records": cfg.line.records.model_copy(update={"path": str(tmp_path / "r.sqlite")}),
            "accelerator": cfg.line.accelerator.model_copy(update={"port": free_port()}),
            "conveyor": cfg.line.conveyor.model_copy(update={"port": free_port()}),
        }
    )
    return cfg


@contextlib.asynccontextmanager
async def running(cfg: LoadedConfig) -> AsyncIterator[LineService]:
    recipe, path = select_recipe(cfg, None)
    svc = LineService(cfg, recipe, path)
    cycling = asyncio.Event()
    svc.observers.append(lambda s: cycling.set() if s.stats.cycles >= 2 else None)
    task = asyncio.create_task(svc.run())
    try:
        await asyncio.wait_for(cycling.wait(), 10.0)
        assert svc.ctl.state is LineState.OFFLINE
        yield svc
    finally:
        svc.stop()
        await asyncio.wait_for(task, 20.0)


def effects(svc: LineService) -> tuple[Any, ...]:
    """Everything a command can change."""
    reel = svc.ctl.reel
    return (
        svc.ctl.state,
        None if reel is None else reel.plan,
        svc.ctl._reset_pending,
        svc.recipe,
        svc.recipe_path,
        dict(svc.line.unacked),
        frozenset(svc.line.opened_reels),
        dict(svc.ctl.alarms),
        len(svc._commands),
    )


def audit(tmp_path: Path) -> list[AuditEvent]:
    with RecordStore(tmp_path / "r.sqlite") as store:
        return [e for e in store.events() if e.action != "transition"]


TWO_S = aiohttp.ClientTimeout(total=2.0)
START = Command(CommandName.START_REEL, "stranger", "s1", reel_id="R1", length_m=100.0)


# ---------------------------------------------------------------------- command roles


async def test_unauthorized_senders_are_refused_and_audited(tmp_path: Path) -> None:
    cfg = offline_config(tmp_path)
    async with running(cfg) as svc:
        before = effects(svc)
        answers = [
            await svc.execute(Command(CommandName.STOP, "eye", "v1")),
            await svc.execute(START),
            await svc.execute(Command(CommandName.RESET, "ghost", "g1")),
        ]
        assert effects(svc) == before
    assert [(a.ack, a.reason, a.request_id) for a in answers] == [
        (False, "role 'viewer' may not send stop", "v1"),
        (False, NO_ROLE, "s1"),
        (False, "role 'nobody' (of 'ghost') is not configured", "g1"),
    ]
    assert [(e.actor, e.action, e.accepted, e.reason) for e in audit(tmp_path)] == [
        ("eye", "stop", False, "role 'viewer' may not send stop"),
        ("stranger", "start_reel", False, NO_ROLE),
        ("ghost", "reset", False, "role 'nobody' (of 'ghost') is not configured"),
    ]


async def test_unknown_sender_is_refused_unless_anonymous_commands_are_allowed(
    tmp_path: Path,
) -> None:
    assert MqttConfig().allow_anonymous_commands is False  # the default
    async with running(offline_config(tmp_path / "closed")) as svc:
        closed = await svc.execute(START)
    async with running(offline_config(tmp_path / "open", allow_anonymous_commands=True)) as svc:
        opened = await svc.execute(START)
        # A known identity keeps its role's limits even then.
        viewer = await svc.execute(Command(CommandName.STOP, "eye"))
    assert closed.reason == NO_ROLE
    # Past authorization, the controller still decides (and refuses: no PLC data).
    assert not opened.ack
    assert opened.reason.startswith("cannot start in state offline")
    assert viewer.reason == "role 'viewer' may not send stop"
    for where in ("closed", "open"):
        assert all(not e.accepted for e in audit(tmp_path / where))


# ---------------------------------------------------------------------- unsafe state


async def test_commands_unsafe_in_the_current_state_are_refused_and_change_nothing(
    tmp_path: Path,
) -> None:
    async with running(offline_config(tmp_path)) as svc:
        before = effects(svc)
        answers = {
            name: await svc.execute(Command(name, "op-1", reel_id="R1", length_m=100.0))
            for name in (CommandName.START_REEL, CommandName.STOP, CommandName.RESET)
        }
        assert effects(svc) == before
    assert not any(a.ack for a in answers.values())
    assert answers[CommandName.START_REEL].reason.startswith("cannot start in state offline")
    assert answers[CommandName.STOP].reason == "nothing to stop in state offline"
    assert answers[CommandName.RESET].reason == ("PLC data not available: nothing can be reset now")
    assert [(e.action, e.accepted) for e in audit(tmp_path)] == [
        ("start_reel", False),
        ("stop", False),
        ("reset", False),
    ]


def test_the_controller_refuses_starts_and_recipe_changes_outside_ready() -> None:
    cfg = load_config(CONFIG_DIR, environ={})
    ctl = Controller(cfg.load_recipe("pv-1x6-en50618"), cfg.line.geometry)
    for state in (LineState.OFFLINE, LineState.IDLE, LineState.FAULT, LineState.RUNNING):
        ctl.state = state
        with pytest.raises(CommandRefused, match=f"cannot start in state {state.value}"):
            ctl.request_start(ReelPlan("R1", 100.0))
        assert ctl.state is state
        assert ctl.reel is None
    ctl.state = LineState.RUNNING
    ctl.restore_reel(ReelPlan("R1", 100.0), started=True)
    with pytest.raises(CommandRefused, match="stop the line first"):
        ctl.close_reel()


# ---------------------------------------------------------------------- the MQTT bridge


def message(
    topic: str, payload: bytes, *, retain: bool = False, response_topic: str | None = None
) -> aiomqtt.Message:
    props = None
    if response_topic is not None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response_topic
    return aiomqtt.Message(topic, payload, qos=1, retain=retain, mid=1, properties=props)


def bridge_for(svc: LineService, tmp_path: Path) -> MqttBridge:
    return MqttBridge(
        svc, svc.cfg.line.mqtt, line_id=svc.line_id, store_path=tmp_path / "bridge.sqlite"
    )


async def test_bridge_refuses_retained_oversize_and_malformed_commands_and_audits_them(
    tmp_path: Path,
) -> None:
    async with running(offline_config(tmp_path)) as svc:
        bridge = bridge_for(svc, tmp_path)
        topic = bridge.topics.cmd("stop", "op-1")
        executed: list[Command] = []
        real_execute = svc.execute

        async def execute(cmd: Command) -> CommandResult:
            executed.append(cmd)
            return await real_execute(cmd)

        svc.execute = execute  # type: ignore[method-assign]
        before = effects(svc)
        cases = {
            "retained": message(topic, b'{"request_id": "a"}', retain=True),
            "oversize": message(topic, b'{"reason": "' + b"x" * (1 << 20) + b'"}'),
            "malformed": message(topic, b"{oops"),
            "nested": message(topic, b"[" * 2000 + b"]" * 2000),
            "unknown": message(bridge.topics.cmd("launch", "op-1"), b"{}"),
        }
        answers = {
            k: await bridge._handle(m, *m.topic.value.split("/")[-2:]) for k, m in cases.items()
        }
        assert effects(svc) == before
    assert executed == [], "a refused payload never reaches the line"
    reasons = {k: a.reason for k, a in answers.items()}
    assert not any(a.ack for a in answers.values())
    assert reasons["retained"] == (
        "retained commands are refused: publish commands with retain=false"
    )
    assert "more than the 4096 allowed" in reasons["oversize"]
    assert "not JSON" in reasons["malformed"]
    assert "nested too deeply" in reasons["nested"]
    assert "unknown command 'launch'" in reasons["unknown"]
    rows = audit(tmp_path)
    assert [(e.actor, e.action, e.accepted) for e in rows] == [
        ("op-1", "stop", False),
        ("op-1", "stop", False),
        ("op-1", "stop", False),
        ("op-1", "stop", False),
        ("op-1", "launch", False),
    ]
    assert [e.reason for e in rows] == list(reasons.values())
    assert all(e.detail == {"source": "mqtt"} for e in rows)


async def test_answers_never_go_onto_linectls_own_topics(tmp_path: Path) -> None:
    cfg = offline_config(tmp_path)
    recipe, path = select_recipe(cfg, None)
    svc = LineService(cfg, recipe, path)
    bridge = bridge_for(svc, tmp_path)
    topics: Topics = bridge.topics
    published: list[str] = []

    class Client:
        async def publish(self, topic: str, payload: bytes, **_: Any) -> None:
            published.append(topic)

    result = CommandResult(False, "no", "stop")
    for own in (topics.record("metres"), topics.state, topics.status, topics.live("speed_m_min")):
        m = message(topics.cmd("stop", "op-1"), b"{}", response_topic=own)
        await bridge._respond(Client(), m, "op-1", result)  # type: ignore[arg-type]
    assert not set(published) & {
        topics.record("metres"),
        topics.state,
        topics.status,
        topics.live("speed_m_min"),
    }, published
    # Refused requests are answered on the documented fallback; a client's own topic works.
    assert set(published) == {topics.response("op-1")}
    published.clear()
    for spoof in ("spBv1.0/linectl/NDATA/line1", "$SYS/x", "a/+/b", "linectl/other/state"):
        m = message(topics.cmd("stop", "op-1"), b"{}", response_topic=spoof)
        await bridge._respond(Client(), m, "op-1", result)  # type: ignore[arg-type]
    assert set(published) == {topics.response("op-1")}
    published.clear()
    # Nor at another user, nor outside the prefix: only the sender's own response topic.
    for elsewhere in (
        topics.response("op-2"),
        "scada/op-1/answers",
        topics.response("op-1") + "/x",
        "linectl/line2/response/op-1",
    ):
        m = message(topics.cmd("stop", "op-1"), b"{}", response_topic=elsewhere)
        await bridge._respond(Client(), m, "op-1", result)  # type: ignore[arg-type]
    assert set(published) == {topics.response("op-1")}
    published.clear()
    m = message(topics.cmd("stop", "op-1"), b"{}", response_topic=topics.response("op-1"))
    await bridge._respond(Client(), m, "op-1", result)  # type: ignore[arg-type]
    assert published == [topics.response("op-1")]


# ---------------------------------------------------------------------- metrics endpoint


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only, nothing is sent
        except OSError:
            return None
        addr = str(s.getsockname()[0])
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


async def test_metrics_endpoint_binds_loopback_by_default(tmp_path: Path) -> None:
    # A line.toml without [metrics] gets the loopback default.
    minimal = LineConfig.model_validate(
        {
            "line_id": "l1",
            "accelerator": {"register_map": "a.toml", "port": 5020},
            "conveyor": {"register_map": "c.toml", "port": 5021},
        }
    )
    assert minimal.metrics.host == "127.0.0.1"
    assert load_config(CONFIG_DIR, environ={}).line.metrics.host == "127.0.0.1"
    exposition = WithoutCreated(LineMetrics("l1").registry)
    server = await serve_metrics(exposition, minimal.metrics.model_copy(update={"port": 0}))
    assert server is not None
    try:
        host, port = server.sockname[:2]
        assert host == "127.0.0.1"  # the socket's own address, not the configured string
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert b"linectl_up" in await r.read()
            other = _non_loopback_address()
            if other is not None:
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with http.get(f"http://{other}:{port}/metrics", timeout=TWO_S):
                        pass
    finally:
        await server.close()
    assert await serve_metrics(exposition, MetricsConfig(enabled=False)) is None


async def _answer(port: int, request: bytes, within_s: float = 20.0) -> bytes:
    """What the server sends back to `request` until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        with contextlib.suppress(ConnectionResetError):
            return await asyncio.wait_for(reader.read(), within_s)
        return b""
    finally:
        writer.close()


async def test_the_hmi_server_bounds_connections_and_request_heads(tmp_path: Path) -> None:
    # The bounds of the metrics endpoint (tests/test_metrics.py), on the HMI's server:
    # a connection cap with eviction of idle ones, a deadline for each request head (a
    # slowloris is cut), a bound on the head's size.
    limits = replace(HMI_LIMITS, max_connections=8, head_timeout_s=2.0)
    async with running(offline_config(tmp_path)) as svc:
        hmi = HmiServer(svc, HttpConfig(enabled=True, port=0), limits=limits)
        await hmi.start(port=0)
        try:
            port = int(hmi.url.rsplit(":", 1)[1])
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
            ok = await _answer(
                port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert ok.startswith(b"HTTP/1.1 200 ")
            assert hmi.bounds.stats.evicted >= 30 - 8 + 1
            assert hmi.bounds.open <= 8
            for _reader, writer in idle:
                writer.close()
            # A slowloris: a byte a second is not a request; cut at the deadline, 2 s.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = asyncio.get_running_loop().time()
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
                if reader.at_eof() or reader.exception() is not None or writer.is_closing():
                    break
                writer.write(bytes([byte]))
                with contextlib.suppress(TimeoutError, ConnectionResetError):
                    if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                        break
            assert asyncio.get_running_loop().time() - started < 5.0
            assert hmi.bounds.stats.timed_out == 1
            writer.close()
            big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nCookie: " + b"a" * 9000 + b"\r\n\r\n"
            assert (await _answer(port, big)).startswith(b"HTTP/1.0 400 ")
        finally:
            await hmi.stop()


# ---------------------------------------------------------------------- secrets in config


def test_the_broker_password_is_never_shown(tmp_path: Path) -> None:
    secret = "s3cret-Pw"
    env = {"LINECTL_MQTT__PASSWORD": secret}
    cfg = load_config(CONFIG_DIR, environ=env)
    assert cfg.line.mqtt.password == secret
    assert secret not in repr(cfg.line)
    assert secret not in str(cfg.line.mqtt)
    assert cfg.overrides == ["mqtt.password"]  # the key, never the value
    # An invalid file with the password override: the error names the override's key only.
    bad = dict(env, LINECTL_MQTT__KEEPALIVE_S="1")
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG_DIR, environ=bad)
    assert "mqtt.keepalive_s" in str(info.value)
    assert secret not in str(info.value)
    # A password of the wrong type in the file: the error does not echo it.
    line = (
        (CONFIG_DIR / "line.toml")
        .read_text()
        .replace("[mqtt]\n", "[mqtt]\npassword = 123456789\n", 1)
    )
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "line.toml").write_text(line)
    for sub in ("registers", "recipes"):
        (d / sub).symlink_to(CONFIG_DIR / sub)
    with pytest.raises(ConfigError, match=r"mqtt\.password") as info:
        load_config(d, environ={})
    assert "123456789" not in str(info.value)
    assert json.dumps(str(info.value))  # printable
