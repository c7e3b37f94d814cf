"""One MQTT connection module (linectl.broker) for the bridge, the Sparkplug node and the
CLI client; one report-by-exception rule for the live values and the Sparkplug node."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import TestBroker, make_test_certs, mosquitto_binary
from e2e_scenarios import compact_config, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from linectl import aio
from linectl.broker import (
    Backoff,
    BrokerSettings,
    make_client,
    protocol_version,
    reconnect_loop,
    resolve_tls,
)
from linectl.client import LineClient, client_settings, read_line
from linectl.commands import Command, CommandResult
from linectl.config import MqttConfig, MqttTls, load_config
from linectl.mqtt import MqttBridge
from linectl.quality import Quality
from linectl.sparkplug.adapter import SparkplugEdge
from linectl.sparkplug.node import EdgeNode, decode
from linectl.telemetry import LIVE_VALUES, ActiveAlarm, LineStatus, LiveValue, ReportFilter

# ---------------------------------------------------------------------- the client factory


class Recorder:
    """A client factory that records what it was asked for."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, host: str, port: int, **kwargs: Any) -> aiomqtt.Client:
        self.calls.append({"host": host, "port": port, **kwargs})
        # Recorded only: the certificate files of this test do not exist.
        kwargs.pop("tls_params")
        kwargs.pop("tls_insecure")
        return aiomqtt.Client(host, port, **kwargs)


async def test_one_factory_builds_every_client(tmp_path: Path) -> None:
    tls = resolve_tls(MqttTls(ca_file="pki/ca.crt", cert_file="/abs/c.crt"), lambda p: tmp_path / p)
    assert tls is not None
    assert (tls.ca_file, tls.cert_file, tls.key_file) == (
        str(tmp_path / "pki/ca.crt"),
        "/abs/c.crt",
        None,
    )
    assert resolve_tls(None) is None
    s = BrokerSettings("10.0.0.5", 8883, "me", username="u", password="s3cret", tls=tls)
    assert "s3cret" not in repr(s)
    rec = Recorder()
    make_client(s, clean=True, factory=rec)  # MQTT 5 (the default): clean start
    make_client(s, protocol=aiomqtt.ProtocolVersion.V311, clean=True, factory=rec)
    v5, v311 = rec.calls
    assert v5["protocol"] is aiomqtt.ProtocolVersion.V5
    assert v5["clean_start"] is True
    assert "clean_session" not in v5
    assert v311["clean_session"] is True
    assert "clean_start" not in v311
    for call in rec.calls:
        assert (call["host"], call["port"], call["identifier"]) == ("10.0.0.5", 8883, "me")
        assert (call["username"], call["password"]) == ("u", "s3cret")
        assert call["tls_params"].ca_certs == str(tmp_path / "pki/ca.crt")
        assert call["tls_insecure"] is False
    assert protocol_version("3.1.1") is aiomqtt.ProtocolVersion.V311
    assert protocol_version("5") is aiomqtt.ProtocolVersion.V5


def test_one_wall_clock() -> None:
    from linectl import client, mqtt
    from linectl.sparkplug import adapter

    assert mqtt.unix_ms is client.unix_ms is adapter.unix_ms is aio.unix_ms
    assert abs(aio.unix_ms() - 1000 * __import__("time").time()) < 1000


# ---------------------------------------------------------------------- back-off and loop


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(1.0)
    assert [b.next_s() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next_s() == 0.1
    assert Backoff(0.05).next_s() == 0.05  # a cap below the first wait: the cap
    with pytest.raises(ValueError, match="positive"):
        Backoff(0.0)


async def test_reconnect_loop_retries_resets_on_connect_and_stops() -> None:
    stop = asyncio.Event()
    attempts: list[float] = []
    errors: list[str] = []
    backoff = Backoff(0.004, first_s=0.001)

    async def session(connected: Callable[[], None]) -> None:
        attempts.append(backoff.delay_s)
        n = len(attempts)
        if n == 4:
            connected()  # up: the next failure waits the first time again
        if n == 6:
            stop.set()
            return
        raise aiomqtt.MqttError(f"lost {n}")

    await reconnect_loop(session, backoff, stop=stop, on_error=lambda e: errors.append(str(e)))
    assert errors == ["lost 1", "lost 2", "lost 3", "lost 4", "lost 5"]
    # The delay each attempt found: doubled after each failure, reset by the connection.
    assert attempts == [0.001, 0.002, 0.004, 0.004, 0.002, 0.004]

    async def bug(connected: Callable[[], None]) -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # not a broker failure: the loop ends
        await reconnect_loop(bug, Backoff(0.01), stop=asyncio.Event())


# ---------------------------------------------------------------------- report by exception


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(0.01, 0.5),
            st.one_of(st.none(), st.floats(-100.0, 100.0)),
            st.sampled_from([Quality.GOOD, Quality.GOOD, Quality.STALE]),
        ),
        min_size=1,
        max_size=60,
    ),
    band=st.floats(0.0, 5.0),
    min_interval_s=st.floats(0.0, 1.0),
)
def test_sparkplug_and_mqtt_report_by_the_same_rule(
    steps: list[tuple[float, float | None, Quality]], band: float, min_interval_s: float
) -> None:
    """The same readings give the same reports on both (no maximum age on Sparkplug)."""
    name = "speed_m_min"
    mqtt = ReportFilter({name: band}, max_age_s=math.inf, min_interval_s=min_interval_s)
    node = EdgeNode(
        "g", "n", deadbands={name: band}, min_interval_s=min_interval_s, line_status=False
    )
    values = {s.name: LiveValue(s.name, 1.0, Quality.GOOD, 1) for s in LIVE_VALUES}
    node.new_session()
    node.birth(values, 1, 0.0)
    assert mqtt.offer(values[name], 0.0)
    t = 0.0
    for dt, value, quality in steps:
        t += dt
        values[name] = LiveValue(name, value, quality, 2)
        by_mqtt = mqtt.offer(values[name], t)
        sent = [m for topic, p in node.data(values, 2, t) for m in decode(p).metrics]
        by_sparkplug = any(m.alias == 200 for m in sent)  # speed_m_min
        assert by_sparkplug == by_mqtt, (t, value, quality)


# ---------------------------------------------------------------------- TLS, all three


class FakeLine:
    def live_values(self) -> Mapping[str, LiveValue]:
        return {"speed_m_min": LiveValue("speed_m_min", 1.0, Quality.GOOD, aio.unix_ms())}

    def line_status(self) -> LineStatus:
        return LineStatus("idle", "started", aio.unix_ms())

    def active_alarms(self) -> Sequence[ActiveAlarm]:
        return ()

    async def execute(self, cmd: Command) -> CommandResult:
        return CommandResult(False, "not here", cmd.name.value)

    def audit_command_error(
        self, sender: str, command: str, reason: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        pass

    def audit_refusals(self, summary: Mapping[str, Any]) -> None:
        pass


async def test_bridge_sparkplug_and_cli_connect_over_tls_from_the_configuration(
    tmp_path: Path,
) -> None:
    """All three take `[mqtt]` (a CA file relative to the configuration directory, user
    and password) through linectl.broker, and connect to a TLS-only broker."""
    if shutil.which("openssl") is None or mosquitto_binary() is None:
        pytest.skip("needs openssl and mosquitto")
    pki = make_test_certs(tmp_path / "pki")
    broker = TestBroker(tmp_path / "b", users={"linectl": "pw"}, tls=pki)
    d = compact_config(tmp_path)
    (d / "certs").mkdir()
    shutil.copy(pki.ca, d / "certs" / "ca.crt")
    # Only the configuration directory has it (relative to the working directory: none).
    assert not await asyncio.to_thread(Path("certs/ca.crt").exists)
    cfg = load_config(d, environ={})
    mq = MqttConfig(
        enabled=True,
        host=broker.host,
        port=broker.port,
        username="linectl",
        password="pw",
        tls=MqttTls(ca_file="certs/ca.crt"),
        reconnect_max_s=0.5,
    )
    sp = cfg.line.sparkplug.model_copy(update={"enabled": True})
    cfg.line = cfg.line.model_copy(update={"mqtt": mq, "sparkplug": sp})
    line = FakeLine()
    await broker.start()
    try:
        bridge = MqttBridge(
            line,
            mq,
            line_id=cfg.line.line_id,
            store_path=tmp_path / "r.sqlite",
            resolve_path=cfg.resolve,
        )
        edge = SparkplugEdge.from_config(cfg, line, bdseq_path=tmp_path / "bdseq.json")
        tasks = [asyncio.create_task(bridge.run()), asyncio.create_task(edge.run())]
        try:
            await wait_for(lambda: bridge.stats.connected, 10.0, "the bridge over TLS")
            await wait_for(lambda: edge.stats.births > 0, 10.0, "the Sparkplug node over TLS")
            bridge.on_cycle()
            settings_ = client_settings(cfg, sender="op-1")
            assert settings_.tls is not None
            assert settings_.tls.ca_file == str(d / "certs/ca.crt")
            view = await read_line(settings_, {"status", "state"})
            assert view.online  # the CLI read what the bridge published, over TLS
            async with LineClient(settings_) as c:
                assert c.protocol is aiomqtt.ProtocolVersion.V5
        finally:
            bridge.stop()
            edge.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), 15.0)
        assert bridge.stats.connects == 1
        assert edge.stats.connects == 1
        # Without the CA the broker's certificate is not trusted: nobody connects.
        plain = BrokerSettings(broker.host, broker.port, "x", "linectl", "pw", MqttTls())
        with pytest.raises(aiomqtt.MqttError):
            async with make_client(plain, timeout_s=5.0):
                pass
    finally:
        await broker.stop()
