"""The one MQTT connection module: broker settings, the client factory, the reconnect loop.

The MQTT bridge (linectl.mqtt), the Sparkplug B edge node (linectl.sparkplug.adapter) and
the command-line client (linectl.client) each hold one connection to the plant's broker.
How that connection is made lives here, once:

- `BrokerSettings`: where the broker is and who we are on it, from `[mqtt]`
  (`BrokerSettings.from_config`), with the TLS files resolved against the configuration
  directory (`resolve_tls`);
- `make_client`: the aiomqtt client for those settings (TLS, credentials, protocol, will,
  clean session, no Nagle delay on small publishes);
- `reconnect_loop` and `Backoff`: run a session, and after a broker loss try again with
  a capped exponential back-off, reset once a connection is up;
- `subscribe_commands`: the subscription of a command topic, MQTT 5 retain-as-published,
  so that a retained command can be told from a live one (docs/security.md).

aiomqtt does not reconnect by itself, and its client cannot be entered twice: every
attempt gets a new client (and so a new will).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from linectl.aio import cancellable, wait_event
from linectl.config import MqttConfig, MqttTls

log = logging.getLogger("linectl.broker")

V5: Final = aiomqtt.ProtocolVersion.V5
V311: Final = aiomqtt.ProtocolVersion.V311

PROTOCOLS: Final[dict[str, aiomqtt.ProtocolVersion]] = {"5": V5, "3.1.1": V311}
"""`[mqtt] protocol` -> aiomqtt's protocol version."""

BACKOFF_FIRST_S: Final = 0.1
"""The first wait after a failed or lost connection; doubled after each failure."""


def protocol_version(
    protocol: Literal["5", "3.1.1"] | aiomqtt.ProtocolVersion,
) -> aiomqtt.ProtocolVersion:
    """aiomqtt's protocol version for `[mqtt] protocol` ("5" or "3.1.1"), or itself."""
    if isinstance(protocol, aiomqtt.ProtocolVersion):
        return protocol
    return PROTOCOLS[protocol]


def resolve_tls(tls: MqttTls | None, resolve: Callable[[str], Path] = Path) -> MqttTls | None:
    """`[mqtt.tls]` with its files resolved (`resolve`: LoadedConfig.resolve, which takes a
    relative path from the configuration directory); None when there is no TLS."""
    if tls is None:
        return None

    def path(p: str | None) -> str | None:
        return None if p is None else str(resolve(p))

    return tls.model_copy(
        update={
            "ca_file": path(tls.ca_file),
            "cert_file": path(tls.cert_file),
            "key_file": path(tls.key_file),
        }
    )


def tls_parameters(tls: MqttTls | None) -> aiomqtt.TLSParameters | None:
    """aiomqtt's TLS parameters for resolved `[mqtt.tls]` settings (None: plain TCP)."""
    if tls is None:
        return None
    return aiomqtt.TLSParameters(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where the broker is and who we are on it. TLS files are already resolved."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    # repr=False: a logged or printed settings object never shows the password.
    password: str | None = field(default=None, repr=False)
    tls: MqttTls | None = None
    """None: plain TCP."""
    keepalive_s: int = 15
    reconnect_max_s: float = 2.0
    """The reconnect back-off's cap."""
    protocol: aiomqtt.ProtocolVersion = V5
    """MQTT 5 (`[mqtt] protocol = "5"`, the default) or 3.1.1."""

    @classmethod
    def from_config(
        cls,
        mq: MqttConfig,
        *,
        client_id: str,
        resolve: Callable[[str], Path] = Path,
        host: str | None = None,
        port: int | None = None,
    ) -> BrokerSettings:
        """The settings `[mqtt]` describes, TLS files resolved by `resolve`; `host` and
        `port` override the configured ones."""
        return cls(
            host=mq.host if host is None else host,
            port=mq.port if port is None else port,
            client_id=client_id,
            username=mq.username,
            password=mq.password,
            tls=resolve_tls(mq.tls, resolve),
            keepalive_s=mq.keepalive_s,
            reconnect_max_s=mq.reconnect_max_s,
            protocol=protocol_version(mq.protocol),
        )

    @property
    def where(self) -> str:
        """`host:port` (`[IPv6]:port`), for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


ClientFactory = Callable[..., aiomqtt.Client]
"""What builds the client (aiomqtt.Client; tests may wrap it)."""


def make_client(
    settings: BrokerSettings,
    *,
    protocol: aiomqtt.ProtocolVersion | None = None,
    will: aiomqtt.Will | None = None,
    clean: bool | None = None,
    timeout_s: float = 10.0,
    max_inflight: int | None = None,
    factory: ClientFactory = aiomqtt.Client,
) -> aiomqtt.Client:
    """A new (unconnected) client for `settings`; enter it to connect.

    `protocol` overrides the settings' one (the CLI tries MQTT 5, then 3.1.1). `clean`:
    a clean session (3.1.1) or clean start (MQTT 5) on every connect. `timeout_s` bounds
    each of its operations (connect, subscribe, publish). `max_inflight`: QoS 1 messages
    in flight at once (aiomqtt warns above 10 pending calls unless told otherwise).
    """
    s = settings
    version = protocol or s.protocol
    kwargs: dict[str, object] = {}
    if clean is not None:
        if version is V5:
            kwargs["clean_start"] = clean
        else:
            kwargs["clean_session"] = clean
    if max_inflight is not None:
        kwargs["max_inflight_messages"] = max_inflight
    client = factory(
        s.host,
        s.port,
        username=s.username,
        password=s.password,
        identifier=s.client_id,
        protocol=version,
        will=will,
        keepalive=s.keepalive_s,
        timeout=timeout_s,
        tls_params=tls_parameters(s.tls),
        tls_insecure=s.tls.insecure if s.tls is not None else None,
        # Small publishes must not wait for Nagle and the peer's delayed ACK (~40 ms on
        # Linux): without this p99 live latency was 53 ms, with it 19-26 ms (bench).
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        **kwargs,
    )
    if max_inflight is not None:
        client.pending_calls_threshold = max_inflight + 10
    return client


async def subscribe_commands(
    client: aiomqtt.Client, topic: str, protocol: aiomqtt.ProtocolVersion, *, qos: int = 1
) -> None:
    """Subscribe a command topic (filter). With MQTT 5 retain-as-published: the broker
    then keeps the RETAIN flag of a retained command on delivery to this (already
    connected) subscriber, so `message.retain` tells a retained command from a live one
    at any time, not only at subscribe time. MQTT 3.1.1 has no such option: there the
    broker's ACL must keep retained commands out (docs/security.md). A subscription the
    broker refuses is logged (nothing would reach linectl on that topic)."""
    if protocol is V5:
        options = SubscribeOptions(qos=qos, retainAsPublished=True)
        granted = await cancellable(client.subscribe(topic, options=options))
    else:
        granted = await cancellable(client.subscribe(topic, qos=qos))
    for g in granted:
        code = getattr(g, "value", g)
        if isinstance(code, int) and code >= 128:
            log.warning("the broker refused the subscription to %s (code %d)", topic, code)


class Backoff:
    """Capped exponential back-off: `first_s`, doubled after each failure, at most `max_s`;
    back to `first_s` once a connection is up (`reset`)."""

    def __init__(self, max_s: float, first_s: float = BACKOFF_FIRST_S) -> None:
        if not (first_s > 0 and max_s > 0):
            raise ValueError(f"back-off times must be positive, not {first_s}, {max_s}")
        self.first_s = min(first_s, max_s)
        self.max_s = max_s
        self.delay_s = self.first_s

    def reset(self) -> None:
        """A connection is up: the next failure waits `first_s` again."""
        self.delay_s = self.first_s

    def next_s(self) -> float:
        """How long to wait before the next attempt (and double it for the one after)."""
        delay_s = self.delay_s
        self.delay_s = min(delay_s * 2, self.max_s)
        return delay_s


Session = Callable[[Callable[[], None]], Awaitable[object]]
"""One connection: called with `connected`, which it calls once its connection is up."""


async def reconnect_loop(
    session: Session,
    backoff: Backoff,
    *,
    stop: asyncio.Event | None = None,
    retry: tuple[type[Exception], ...] = (aiomqtt.MqttError,),
    on_error: Callable[[Exception], None] | None = None,
) -> None:
    """Run `session` until `stop` is set (or, without one, until cancelled): whenever it
    returns or fails with one of `retry`, wait the back-off (a stop cuts the wait short)
    and run it again. `on_error` sees each such failure (to log or count it; raising
    there ends the loop). Any other exception ends the loop, as does a cancellation."""
    if stop is None:
        stop = asyncio.Event()
    while not stop.is_set():
        try:
            await session(backoff.reset)
        except retry as exc:
            if on_error is not None:
                on_error(exc)
        if stop.is_set():
            break
        await wait_event(stop, backoff.next_s())


__all__ = [
    "PROTOCOLS",
    "Backoff",
    "BrokerSettings",
    "ClientFactory",
    "make_client",
    "protocol_version",
    "reconnect_loop",
    "resolve_tls",
    "subscribe_commands",
    "tls_parameters",
]
