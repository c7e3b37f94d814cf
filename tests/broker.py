"""A real MQTT broker for the tests: mosquitto on a free port when its binary is present,
the embedded amqtt broker otherwise (MQTT 3.1.1 only), bound to 127.0.0.1.

Never the default port 1883, never state from another run: every broker gets a fresh
directory in tmp for its configuration, password file and persistence.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from conftest import free_port

from linectl.config import LoadedConfig


def mosquitto_binary() -> str | None:
    """The mosquitto broker binary, if installed."""
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    return shutil.which("mosquitto")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class TestBroker:
    """One broker; `start`, `stop` (or `kill`) and `start` again on the same port."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        persistence: bool = False,
        force_embedded: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.users = dict(users or {})
        self.acl = acl
        self.persistence = persistence
        self.tls = tls
        self.binary = None if force_embedded else mosquitto_binary()
        self.kind = "mosquitto" if self.binary else "amqtt"
        self._proc: asyncio.subprocess.Process | None = None
        self._embedded: Any = None
        self.starts = 0
        if self.users and self.binary is not None:
            pw = self.workdir / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    [_passwd_binary(), "-b", str(pw), user, password], check=True, timeout=10
                )
            pw.chmod(0o600)

    @property
    def protocol(self) -> aiomqtt.ProtocolVersion:
        """The newest protocol this broker speaks (amqtt: 3.1.1 only)."""
        if self.kind == "mosquitto":
            return aiomqtt.ProtocolVersion.V5
        return aiomqtt.ProtocolVersion.V311

    @property
    def running(self) -> bool:
        """Whether the broker process (or embedded broker) is up."""
        if self._proc is not None:
            return self._proc.returncode is None
        return self._embedded is not None

    def _mosquitto_conf(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if self.users else 'true'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "max_keepalive 60",
            # Started as root, mosquitto drops to user 'mosquitto', which may not read the
            # files in tmp; stay who we are (ignored when not root).
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        ]
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
            ]
        if self.users:
            lines.append(f"password_file {self.workdir / 'passwd'}")
        if self.acl is not None:
            acl = self.workdir / "acl"
            acl.write_text(self.acl)
            acl.chmod(0o600)
            lines.append(f"acl_file {acl}")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    async def start(self, timeout_s: float = 10.0) -> None:
        """Start (or restart) the broker on its port; return once it accepts connections."""
        if self.running:
            raise RuntimeError("broker already running")
        if self.binary is not None:
            conf = self._mosquitto_conf()
            self._proc = await asyncio.create_subprocess_exec(
                self.binary,
                "-c",
                str(conf),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        else:
            if self.users or self.acl or self.tls:
                raise RuntimeError("the embedded broker fallback has no users, ACLs or TLS")
            from amqtt.broker import Broker

            config = {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
            self._embedded = Broker(config)
            await self._embedded.start()
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.port):
            if self._proc is not None and self._proc.returncode is not None:
                log = self.workdir / "mosquitto.log"
                text = log.read_text() if log.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}: {text}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"broker not listening on {self.port}")
            await asyncio.sleep(0.02)
        self.starts += 1

    async def stop(self, *, kill: bool = False) -> None:
        """Stop the broker: SIGTERM (clean, saves persistence) or SIGKILL."""
        if self._proc is not None:
            proc, self._proc = self._proc, None
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 5.0)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        if self._embedded is not None:
            broker, self._embedded = self._embedded, None
            with contextlib.suppress(Exception):
                await broker.shutdown()
        # The port must be free before a restart binds it again.
        for _ in range(200):
            if not _port_open(self.port):
                break
            await asyncio.sleep(0.01)

    async def restart(self, down_s: float = 0.0, *, kill: bool = False) -> None:
        """Stop, stay down `down_s`, start again on the same port."""
        await self.stop(kill=kill)
        await asyncio.sleep(down_s)
        await self.start()

    def client(self, **kwargs: Any) -> aiomqtt.Client:
        """A test client connected to this broker (enter it with `async with`)."""
        kwargs.setdefault("protocol", self.protocol)
        return aiomqtt.Client(self.host, self.port, **kwargs)


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate it signed for 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path


def make_test_certs(directory: Path) -> TlsFiles:
    """A throw-away CA and server certificate (IP SAN 127.0.0.1), by the openssl tool."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl not found")
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 "
        "-subj /CN=linectl-test-ca",
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt "
        "-days 1 -extfile san.cnf",
    ]
    for args in steps:
        subprocess.run([openssl, *args.split()], cwd=d, check=True, capture_output=True, timeout=30)
    return TlsFiles(d / "ca.crt", d / "server.crt", d / "server.key")


def _passwd_binary() -> str:
    found = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.access(found, os.X_OK):
        raise RuntimeError("mosquitto_passwd not found")
    return found


@contextlib.asynccontextmanager
async def running_broker(workdir: Path, **kwargs: Any) -> AsyncIterator[TestBroker]:
    """A started broker, stopped on exit."""
    broker = TestBroker(workdir, **kwargs)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def use_broker(cfg: LoadedConfig, broker: TestBroker, *, sparkplug: bool = False) -> None:
    """Point the line's [mqtt] at `broker` and enable it (MQTT 5 on mosquitto, 3.1.1 on the
    embedded broker); with `sparkplug`, enable the Sparkplug B edge node as well."""
    mqtt = cfg.line.mqtt.model_copy(
        update={
            "enabled": True,
            "port": broker.port,
            "protocol": "5" if broker.kind == "mosquitto" else "3.1.1",
        }
    )
    update: dict[str, Any] = {"mqtt": mqtt}
    if sparkplug:
        update["sparkplug"] = cfg.line.sparkplug.model_copy(update={"enabled": True})
    cfg.line = cfg.line.model_copy(update=update)
