"""The command-line client of a running line over its HTTP JSON API.

When the configuration has no broker (`[mqtt] enabled = false`) and `[http] enabled =
true`, `linectl status`, `reel start|stop|end`, `alarms [ack KIND]`, `reset`, `recipe
select` and `watch` (docs/cli.md) talk to the HTTP server of `linectl run`
(linectl.web.server) instead of the broker:

- `POST /api/login` with an [http.users] user and its password: a session cookie and the
  session's CSRF token; `POST /api/logout` at the end, so that a script that runs
  `linectl status` in a loop does not fill the server's sessions;
- `GET /api/state`: the state document (linectl.web.feed.build_state);
- `POST /api/cmd/<name>` with the X-CSRF-Token header and the command's JSON (the MQTT
  payload, checked by linectl.client before it is sent), answered with a
  linectl.response/1 document, ACK or NAK, as over MQTT;
- `/ws`: the live feed, a snapshot and then deltas (`FeedCopy` keeps the copy true).

This module only speaks HTTP. Payloads are built and checked, answers read and
rendered by linectl.client, as over MQTT, so the output and the exit codes agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

import aiohttp

from linectl.config import LoadedConfig
from linectl.errors import LocalError, RemoteError

DEFAULT_TIMEOUT_S: Final = 5.0
"""How long one request may take (a login included: the server checks a scrypt hash)."""
FEED_SILENCE_S: Final = 5.0
"""The server sends at least a heartbeat every second: a feed silent this long is lost."""
LOGOUT_TIMEOUT_S: Final = 1.0
"""The logout at the end is a courtesy: it never holds the command up for long."""
MAX_FEED_MESSAGE_BYTES: Final = 64 * 1024 * 1024
"""A snapshot carries the reel's whole dose chart (up to 200,000 points)."""
TREND_WINDOW_MS: Final = 10 * 60 * 1000
"""The trend rows kept: those within 10 minutes of the newest (the server's window)."""
_ANY_ADDRESS: Final = frozenset({"", "0.0.0.0", "::", "[::]"})


class HttpApiError(RemoteError):
    """The line's HTTP API cannot be reached, or did not answer (in time, or as the API
    does): the CLI's "no answer from the line" (exit 4)."""


class LoginError(LocalError):
    """The line's HTTP API refused the login: wrong user or password, or too many failed
    logins (exit 2, like any input of ours that is wrong)."""


# ---------------------------------------------------------------------- where and who


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """Where the line's HTTP API is, and who we log in as."""

    line_id: str
    """The line of the configuration we read."""
    host: str
    port: int
    tls: bool
    """HTTPS: `[http] tls_cert_file` is set."""
    user: str
    cafile: Path | None = None
    """The CA (or certificate) to trust for HTTPS; None: the system's trust store."""

    @property
    def url(self) -> str:
        """`http://127.0.0.1:8480`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


def http_target(
    loaded: LoadedConfig,
    *,
    user: str | None = None,
    sender: str | None = None,
    cafile: Path | None = None,
) -> HttpTarget:
    """The line's HTTP API from `[http]` (host, port, TLS) and who we are: `user`, else
    `sender`, else the `[mqtt] username` the CLI uses as its identity; LocalError naming
    the option when there is none. A bind address for every interface (0.0.0.0, ::)
    is reached on the loopback."""
    http = loaded.line.http
    if http.port == 0:
        raise LocalError(
            "[http] port = 0 (any free port) in line.toml: the CLI cannot know which port "
            "the daemon got; set the port in line.toml (or LINECTL_HTTP__PORT)"
        )
    host = "127.0.0.1" if http.host.strip() in _ANY_ADDRESS else http.host.strip("[]")
    name = user or sender or loaded.line.mqtt.username
    if not name:
        raise LocalError(
            "the line's HTTP API needs a user: give --user NAME (a user of [http.users] in "
            "the daemon's line.toml)"
        )
    return HttpTarget(
        line_id=loaded.line.line_id,
        host=host,
        port=http.port,
        tls=http.tls_cert_file is not None,
        user=name,
        cafile=cafile,
    )


def read_password(
    target: HttpTarget,
    password_file: Path | None,
    *,
    stdin: TextIO | None = None,
    ask: Callable[[str], str] = getpass.getpass,
) -> str:
    """The password of `target.user`: the first line of `password_file` (`-`: standard
    input), else asked on the terminal; LocalError when neither can be."""
    stdin = sys.stdin if stdin is None else stdin
    if password_file is None:
        if not stdin.isatty():
            raise LocalError(
                f"the line's HTTP API needs the password of user {target.user!r}: give "
                "--password-file FILE (its first line), or run on a terminal to be asked"
            )
        try:
            password = ask(f"password of {target.user} at {target.url}: ")
        except EOFError:
            password = ""
    else:
        try:
            if str(password_file) == "-":
                first = stdin.readline()
            else:
                with password_file.open(encoding="utf-8") as f:
                    first = f.readline()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise LocalError(f"--password-file {password_file}: {why}") from None
        password = first.rstrip("\r\n")
    if not password:
        where = "" if password_file is None else f" (--password-file {password_file})"
        raise LocalError(f"empty password for user {target.user!r}{where}")
    return password


def _ssl_context(target: HttpTarget) -> ssl.SSLContext | None:
    if not target.tls:
        return None
    try:
        return ssl.create_default_context(
            cafile=None if target.cafile is None else str(target.cafile)
        )
    except (OSError, ssl.SSLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LocalError(f"--cafile {target.cafile}: {why}") from None


# ---------------------------------------------------------------------- the live feed (pure)


class FeedCopy:
    """The client's copy of the state the live feed describes.

    `take` applies one message of the feed: a snapshot replaces the copy; a delta whose
    `base` is the copy's `seq` updates it (`set` replaces top-level keys, `append`
    extends the dose and trend series); any other delta means a message was missed, and
    the copy asks for a snapshot (`{"type": "resync"}`) and ignores deltas until it has
    one. A heartbeat carries the server's latest seq: another than the copy's means a
    message was missed too (asked again at each such heartbeat, so a lost resync is
    repeated within a second); else it only moves the time. docs/hmi.md, "The live feed".
    """

    def __init__(self) -> None:
        self.seq: int | None = None
        self.state: dict[str, Any] = {}
        self._resync_asked = False

    def take(self, msg: Mapping[str, Any]) -> str:
        """'state' (the copy changed), 'resync' (send {"type": "resync"}) or ''."""
        kind = msg.get("type")
        if kind == "snapshot" and isinstance(msg.get("state"), dict):
            self.state = dict(msg["state"])
            self.seq = _int(msg.get("seq"))
            self._resync_asked = False
            return "state"
        if kind == "heartbeat":
            seq = _int(msg.get("seq"))
            if seq is not None and seq != self.seq:
                self._resync_asked = True
                return "resync"
            if self.state and msg.get("t_ms") is not None:
                self.state["t_ms"] = msg["t_ms"]
            return ""
        if kind != "delta":
            return ""
        if self.seq is None or msg.get("base") != self.seq:
            if self._resync_asked:
                return ""
            self._resync_asked = True
            return "resync"
        changes = msg.get("set")
        if isinstance(changes, dict):
            self.state.update(changes)
        append = msg.get("append")
        if isinstance(append, dict):
            self._append(append)
        self.seq = _int(msg.get("seq"))
        return "state"

    def _append(self, append: Mapping[str, Any]) -> None:
        dose = append.get("dose")
        chart = self.state.get("dose")
        if isinstance(dose, list) and isinstance(chart, dict):
            points = chart.get("points")
            chart["points"] = [*points, *dose] if isinstance(points, list) else list(dose)
        trend = append.get("trend")
        if isinstance(trend, list) and trend:
            rows = self.state.get("trend")
            rows = [*rows, *trend] if isinstance(rows, list) else list(trend)
            # Rows older than the window before the newest row go, as the server drops them.
            newest = rows[-1][0] if isinstance(rows[-1], list) and rows[-1] else None
            if isinstance(newest, int | float):
                rows = [
                    r
                    for r in rows
                    if isinstance(r, list)
                    and r
                    and isinstance(r[0], int | float)
                    and r[0] >= newest - TREND_WINDOW_MS
                ]
            self.state["trend"] = rows


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class FeedSink(Protocol):
    """What follows the feed (linectl.client.HmiWatch)."""

    def state(self, doc: Mapping[str, Any]) -> None:
        """A new state document (read it now: the copy changes with the next message)."""

    def lost(self, why: str) -> None:
        """The feed is gone; it is being reconnected."""

    def back(self) -> None:
        """The feed is back after `lost`."""


# ---------------------------------------------------------------------- the HTTP shell


class ApiSession:
    """One login to the line's HTTP API (an async context manager: logs in on entry and
    out on exit)."""

    def __init__(
        self, target: HttpTarget, password: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.target = target
        self._password = password
        self.timeout_s = timeout_s
        self.csrf = ""
        self.line_id = ""
        """The line the server says it is (after the login)."""
        self.role = ""
        self.sent = False
        """Whether a command has gone out (it may act even if we stop waiting)."""
        self._http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        """The HTTP session (inside `async with`)."""
        if self._http is None:
            raise RuntimeError("ApiSession is not open (use `async with`)")
        return self._http

    async def __aenter__(self) -> ApiSession:
        ctx = _ssl_context(self.target)
        self._http = aiohttp.ClientSession(
            # unsafe: the jar keeps the cookie of an IP address (127.0.0.1).
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(ssl=ctx) if ctx is not None else None,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        )
        try:
            await self._login()
        except BaseException:
            await self._http.close()
            self._http = None
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        http, self._http = self._http, None
        if http is None:
            return
        try:
            if self.csrf:
                # Best effort: the session ends with its TTL otherwise.
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with asyncio.timeout(LOGOUT_TIMEOUT_S):
                        async with http.post(
                            f"{self.target.url}/api/logout",
                            headers={"X-CSRF-Token": self.csrf},
                        ) as r:
                            await r.read()
        finally:
            await http.close()

    @contextlib.contextmanager
    def _errors(self, what: str, *, command: str = "") -> Iterator[None]:
        """aiohttp's errors as ours, each saying what to check."""
        url = self.target.url
        after = ""
        if command:
            after = (
                f"; {command} may have been sent and may still be carried out: check "
                "`linectl status`"
            )
        try:
            yield
        except aiohttp.ClientConnectorCertificateError as exc:
            raise LocalError(
                f"the line's HTTP API at {url} has a certificate this client does not trust "
                f"({exc.certificate_error}): give --cafile FILE (the CA that signed it, or "
                "for a self-signed certificate the file [http] tls_cert_file names), and "
                "reach it by the name the certificate carries ([http] host, "
                "LINECTL_HTTP__HOST)"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise HttpApiError(
                f"TLS with the line's HTTP API at {url} failed ({exc}): does `linectl run` "
                "serve HTTPS there ([http] tls_cert_file in its line.toml and this one)?"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            why = "connection refused" if isinstance(exc.os_error, ConnectionRefusedError) else ""
            why = why or exc.os_error.strerror or str(exc.os_error) or str(exc)
            not_sent = f"; {command} was not sent" if command else ""
            raise HttpApiError(
                f"cannot reach the line's HTTP API at {url} ({why}): is `linectl run` going "
                f"with [http] enabled?{not_sent}"
            ) from None
        except TimeoutError:
            raise HttpApiError(
                f"no answer from the line's HTTP API at {url} within {self.timeout_s:g} s "
                f"({what}){after}"
            ) from None
        except aiohttp.WSServerHandshakeError as exc:
            raise HttpApiError(
                f"the line's HTTP API at {url} refused the live feed ({exc.status} {exc.message})"
            ) from None
        except aiohttp.ClientError as exc:
            raise HttpApiError(
                f"lost the connection to the line's HTTP API at {url} ({what}: "
                f"{exc or type(exc).__name__}){after}"
            ) from None

    def _unexpected(self, what: str, status: int, body: object) -> HttpApiError:
        error = body.get("error") if isinstance(body, dict) else None
        text = f": {error}" if isinstance(error, str) else ""
        return HttpApiError(
            f"the line's HTTP API at {self.target.url} answered {what} with HTTP {status}"
            f"{text or ' and no answer of the linectl API'} (is linectl run there, and of "
            "this version?)"
        )

    async def _login(self) -> None:
        t = self.target
        with self._errors("login"):
            async with self.http.post(
                f"{t.url}/api/login", json={"user": t.user, "password": self._password}
            ) as r:
                status, body = r.status, await _json(r)
        error = body.get("error") if isinstance(body, dict) else None
        if status == 401:
            raise LoginError(
                f"wrong user or password: the line's HTTP API at {t.url} refused the login "
                f"of {t.user!r} (users are [http.users] in the daemon's line.toml; --user, "
                "--password-file)"
            )
        if status == 429:
            wait = r.headers.get("Retry-After")
            again = f"try again in {wait} s" if wait else str(error or "try again later")
            raise LoginError(
                f"the line's HTTP API at {t.url} refuses logins for now (too many failed "
                f"logins for {t.user!r} or from this address): {again}"
            )
        if status == 400 and isinstance(error, str):
            raise LoginError(f"the line's HTTP API at {t.url} refused the login: {error}")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("csrf"), str):
            raise self._unexpected("the login", status, body)
        self.csrf = body["csrf"]
        self.line_id = str(body.get("line_id") or "")
        self.role = str(body.get("role") or "")

    async def state(self) -> dict[str, Any]:
        """The state document (GET /api/state)."""
        with self._errors("GET /api/state"):
            async with self.http.get(f"{self.target.url}/api/state") as r:
                status, body = r.status, await _json(r)
        if status != 200 or not isinstance(body, dict):
            raise self._unexpected("GET /api/state", status, body)
        return body

    async def command(self, name: str, payload: bytes) -> dict[str, Any]:
        """Send a command (POST /api/cmd/<name>, `payload` checked by the caller); its
        answer, a linectl.response/1 document, ACK or NAK, whatever the HTTP status
        (403: the role may not, 409: refused in this state, ...)."""
        headers = {"X-CSRF-Token": self.csrf, "Content-Type": "application/json"}
        self.sent = True
        with self._errors(f"POST /api/cmd/{name}", command=name):
            async with self.http.post(
                f"{self.target.url}/api/cmd/{name}", data=payload, headers=headers
            ) as r:
                status, body = r.status, await _json(r)
        if not isinstance(body, dict) or "result" not in body:
            raise self._unexpected(f"command {name}", status, body)
        return body

    async def feed(self, sink: FeedSink, opened: Callable[[], None]) -> str:
        """Follow the live feed (/ws) into `sink` until it ends; why it ended. `opened`
        is called once the feed is up."""
        url = self.target.url
        with self._errors("the live feed /ws"):
            async with self.http.ws_connect(
                f"{url}/ws", max_msg_size=MAX_FEED_MESSAGE_BYTES, autoping=True
            ) as ws:
                opened()
                copy = FeedCopy()
                while True:
                    try:
                        msg = await ws.receive(timeout=FEED_SILENCE_S)
                    except TimeoutError:
                        return f"the live feed was silent for {FEED_SILENCE_S:g} s"
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        try:
                            obj = json.loads(msg.data)
                        except ValueError:
                            continue
                        if not isinstance(obj, dict):
                            continue
                        action = copy.take(obj)
                        if action == "resync":
                            await ws.send_str('{"type":"resync"}')
                        elif action == "state":
                            sink.state(copy.state)
                    elif msg.type in (
                        aiohttp.WSMsgType.CLOSE,
                        aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.CLOSED,
                    ):
                        extra = f": {msg.extra}" if isinstance(msg.extra, str) and msg.extra else ""
                        return f"the line closed the live feed (code {ws.close_code}{extra})"
                    elif msg.type is aiohttp.WSMsgType.ERROR:
                        return f"the live feed failed ({ws.exception()})"


async def _json(r: aiohttp.ClientResponse) -> Any:
    try:
        return await r.json(content_type=None)
    except (ValueError, UnicodeDecodeError):
        return None


async def follow(
    target: HttpTarget,
    password: str,
    sink: FeedSink,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    first_backoff_s: float = 0.2,
    backoff_max_s: float = 5.0,
) -> None:
    """Follow the line's live feed into `sink` until cancelled. The first login and feed
    must succeed (HttpApiError or LoginError otherwise); after that a lost feed is told
    to `sink` and reconnected (a new login: a restarted daemon forgot the session), with
    back-off. A refused login ends it (LoginError)."""
    delay_s = first_backoff_s
    opened_once = False
    lost = ""

    def opened() -> None:
        nonlocal opened_once, lost, delay_s
        opened_once = True
        delay_s = first_backoff_s
        if lost:
            lost = ""
            sink.back()

    while True:
        try:
            async with ApiSession(target, password, timeout_s=timeout_s) as api:
                why = await api.feed(sink, opened)
        except HttpApiError as exc:
            if not opened_once:
                raise
            why = str(exc)
        if why != lost:
            lost = why
            sink.lost(why)
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, backoff_max_s)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ApiSession",
    "FeedCopy",
    "FeedSink",
    "HttpApiError",
    "HttpTarget",
    "LoginError",
    "follow",
    "http_target",
    "read_password",
]
