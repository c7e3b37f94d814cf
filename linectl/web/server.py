"""The daemon's HTTP server (aiohttp): the HMI, the JSON command API, the live feed,
/healthz and /metrics (docs/hmi.md).

One command path: a command from the page is parsed by `linectl.commands` exactly as an
MQTT payload is, with the logged-in user as its sender and "http" as its source, and
goes to `LineService.execute`, which authorizes it (the user's role from [http.users]),
audits it and applies it on the control cycle. The server refuses what the role may not
do whatever the page sends; the page only greys out what would be refused.

The live feed never delays the control cycle: the cycle's hooks only note that
something changed (and hand over the metres recorded); one task builds the state at most
5 times a second and each client is sent a delta from what it last got, or nothing while
its connection is still busy with the last message (then a larger delta later).

`MetricsServer` is the `[metrics]` endpoint: a second, small aiohttp application (GET
/metrics, nothing else) on the same event loop. Both servers listen behind
`linectl.web.bounds` (a connection cap and a deadline for each request head) with
aiohttp's own limits on the head's size and the keep-alive time, and a deadline to take
each answer (`HttpLimits`; docs/security.md). The exposition is rendered on the loop: it
only reads the registry (no I/O), and a render is reused for RENDER_REUSE_S, so however
many scrapers ask, the loop renders at most one per format in that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import math
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from aiohttp import WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from linectl.commands import (
    Command,
    CommandError,
    CommandName,
    CommandResult,
    authorize_command,
    nak,
    parse_command,
)
from linectl.config import HttpConfig, MetricsConfig
from linectl.core.line import reading_values
from linectl.core.views import acc_view, cnv_view
from linectl.errors import LocalError
from linectl.report import build_report, list_reels
from linectl.service import LineService, link_fresh
from linectl.store import RecordStore
from linectl.web.auth import LoginLimiter, Session, Sessions, csrf_ok, verify_password
from linectl.web.bounds import ConnectionBounds, ConnectionStats
from linectl.web.feed import (
    TREND_PERIOD_MS,
    ClientView,
    Feed,
    FeedInputs,
    LinkState,
    ReelFacts,
    build_state,
    live_number,
)

log = logging.getLogger("linectl.web")


class _ClientFaults(logging.Filter):
    """aiohttp logs a request it cannot parse (not HTTP, a header too long: the client's
    fault) as an error with a traceback; anyone who can connect could fill the log with
    them. Here each is one line at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            detail = " ".join(str(exc.message).split())[:200].replace("%", "%%")
            record.msg = f"{record.msg}: {exc.code} {detail}"
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


http_log = logging.getLogger("linectl.web.http")
"""aiohttp's connection handlers log here (not to aiohttp.server)."""
http_log.addFilter(_ClientFaults())

STATIC_DIR: Final = Path(__file__).parent / "static"
COOKIE: Final = "linectl_session"
FEED_PERIOD_S: Final = 0.2
"""At most 5 updates a second per client (the issue's bound; the eye needs no more)."""
HEARTBEAT_S: Final = 1.0
"""A client hears at least this often (a heartbeat when nothing changed), so the page can
tell a silent feed from a quiet line within 1.5 s."""
SEND_TIMEOUT_S: Final = 5.0
"""A client that takes no message for this long is dropped (it reconnects and gets a
snapshot)."""
MAX_BUFFERED_BYTES: Final = 256 * 1024
"""A client whose connection still holds this much unsent is skipped this round."""
SNAPSHOT_AFTER_SKIPS: Final = 25
"""A client skipped this many rounds in a row (5 s) gets a snapshot when it drains."""
MAX_BODY_BYTES: Final = 16 * 1024
CYCLE_STALE_S: Final = 2.0
"""/healthz answers 503 when the control cycle has not run for this long."""


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP client may hold of a server on the daemon's loop."""

    max_connections: int
    """Connections held at once. At the limit a new one takes the place of the oldest one
    that is not being answered (closed), or is closed at once when all are answered."""
    head_timeout_s: float
    """A request line and its headers must arrive within this of the connection opening
    (or of a later request's first byte); otherwise the connection is closed unanswered."""
    answer_timeout_s: float
    """The client must take its answer within this, or the connection is dropped."""
    keepalive_timeout_s: float
    """An idle kept-alive connection is closed after this (aiohttp's keepalive_timeout;
    its default is an hour)."""
    max_line_bytes: int
    """The request line (aiohttp's max_line_size); longer: 400 and closed."""
    max_field_bytes: int
    """One header, name and value (aiohttp's max_field_size); longer: 400 and closed."""
    max_headers: int
    """Headers in one request (aiohttp's max_headers); more: 400 and closed."""


METRICS_LIMITS: Final = HttpLimits(
    max_connections=16,
    head_timeout_s=5.0,
    answer_timeout_s=10.0,
    keepalive_timeout_s=10.0,
    max_line_bytes=4096,
    max_field_bytes=4096,
    max_headers=32,
)
"""The [metrics] endpoint's: a scraper sends a short GET with a few headers."""
HMI_SPARE_CONNECTIONS: Final = 32
"""The HMI holds `max_clients` live-feed connections plus this many for pages and API
calls (a browser opens up to 6 per server)."""
HMI_LIMITS: Final = HttpLimits(
    max_connections=50 + HMI_SPARE_CONNECTIONS,  # [http] max_clients + spare: see HmiServer
    head_timeout_s=10.0,
    answer_timeout_s=30.0,
    keepalive_timeout_s=30.0,
    max_line_bytes=8190,
    max_field_bytes=8190,
    max_headers=64,
)
"""The HMI's (the browser's cookie and headers fit; a reel's report may be large)."""
RENDER_REUSE_S: Final = 0.1
"""A rendered exposition is served again to scrapes within this time (per format)."""

_SECURITY_HEADERS: Final = {
    # Same-origin everything: no CDN, no inline script, no framing (clickjacking).
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(eq=False)
class _Client:
    ws: web.WebSocketResponse
    session: Session
    transport: asyncio.BaseTransport | None
    view: ClientView = field(default_factory=ClientView)
    want_snapshot: bool = True
    sending: asyncio.Task[None] | None = None
    skipped: int = 0
    last_sent_s: float = 0.0


class HmiServer:
    """The HTTP server of one running line. `start()` binds it; `url` says where."""

    def __init__(
        self,
        svc: LineService,
        config: HttpConfig,
        *,
        metrics: Collector | None = None,
        broker_state: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        limits: HttpLimits | None = None,
    ) -> None:
        self.svc = svc
        self.config = config
        self.metrics = metrics
        self._exposition = None if metrics is None else Exposition(metrics)
        self.limits = limits or replace(
            HMI_LIMITS, max_connections=config.max_clients + HMI_SPARE_CONNECTIONS
        )
        self.bounds = ConnectionBounds(
            "HMI",
            max_connections=self.limits.max_connections,
            head_timeout_s=self.limits.head_timeout_s,
        )
        self.broker_state = broker_state or (lambda: "off")
        self.clock = clock
        self.sessions = Sessions(config.session_ttl_s)
        self.limiter = LoginLimiter(config.login_max_failures, config.login_window_s)
        self.feed = Feed()
        self.clients: set[_Client] = set()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._loads: set[asyncio.Task[None]] = set()
        self._tls = config.tls_cert_file is not None
        self.resyncs = 0
        """Snapshots asked for by clients that saw a gap in their feed."""
        self._last_trend_ms = 0
        self._cycle_seen = -1.0
        self.app = self._make_app()
        svc.on_metres.append(self.feed.add_metres)

    # ------------------------------------------------------------------ life

    def _make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES,
            middlewares=[_bounded(self.bounds, self.limits.answer_timeout_s), _headers],
        )
        r = app.router
        r.add_get("/", self._page("index.html"))
        r.add_get("/reels", self._page("reels.html"))
        r.add_get("/reels/{reel_id}", self._page("reel.html"))
        r.add_static("/static/", STATIC_DIR, follow_symlinks=False)
        r.add_get("/healthz", self._healthz)
        r.add_get("/metrics", self._metrics)
        r.add_get("/api/session", self._session)
        r.add_post("/api/login", self._login)
        r.add_post("/api/logout", self._logout)
        r.add_get("/api/state", self._state)
        r.add_get("/api/recipes", self._recipes)
        r.add_get("/api/reels", self._reels)
        r.add_get("/api/reels/{reel_id}", self._reel)
        r.add_post("/api/cmd/{name}", self._command)
        r.add_get("/ws", self._ws)
        return app

    async def start(self, *, port: int | None = None) -> None:
        """Bind and serve (`port` overrides the configured one; 0: any free port).
        LocalError when the address cannot be bound or the TLS files cannot be read."""
        cfg = self.config
        ctx: ssl.SSLContext | None = None
        if cfg.tls_cert_file is not None and cfg.tls_key_file is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert = self.svc.cfg.resolve(cfg.tls_cert_file)
            key = self.svc.cfg.resolve(cfg.tls_key_file)
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise LocalError(f"[http] TLS: cannot load {cert} / {key}: {exc}") from None
        try:
            self._runner, self._server = await _listen(
                self.app,
                cfg.host,
                cfg.port if port is None else port,
                self.limits,
                self.bounds,
                ssl_context=ctx,
            )
        except OSError as exc:
            raise LocalError(f"[http] cannot listen on {cfg.host}:{cfg.port}: {exc}") from None
        bound = _bound_port(self._server, cfg.port)
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self.url = f"{'https' if ctx else 'http'}://{host}:{bound}"
        self._task = asyncio.create_task(self._publish(), name="linectl-hmi-feed")
        log.info("HMI on %s/ (users: %d)", self.url, len(cfg.users))

    async def stop(self) -> None:
        """Close every client and stop serving."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for client in list(self.clients):
            with contextlib.suppress(Exception):
                await client.ws.close(code=1001, message=b"linectl stopping")
        for task in list(self._loads):
            task.cancel()
        runner, server = self._runner, self._server
        self._runner = self._server = None
        await _unlisten(runner, server)

    # ------------------------------------------------------------------ the feed

    def gather(self) -> FeedInputs:
        """This moment of the line, from the service's last cycle."""
        svc = self.svc
        cfg = svc.cfg
        report = svc.report
        reel = svc.ctl.reel
        acc_snap, cnv_snap = svc.last_acc, svc.last_cnv
        acc_up = link_fresh(svc.acc, acc_snap)
        cnv_up = link_fresh(svc.cnv, cnv_snap)
        return FeedInputs(
            t_ms=svc.wall_ms(),
            line_id=svc.line_id,
            status=svc.line_status(),
            recipe_name=svc.line.recipe_name,
            recipe=svc.recipe,
            speed_limit_m_min=svc.ctl.v_max,
            weight_sum=cfg.line.geometry.weight_sum,
            reel=None
            if reel is None
            else ReelFacts(
                reel.plan.reel_id,
                reel.plan.operator,
                reel.plan.planned_length_m,
                reel.started,
                report.position_m if report is not None else None,
            ),
            acc=None
            if acc_snap is None
            else acc_view(reading_values(acc_snap), cfg.accelerator_map, ok=acc_up and acc_snap.ok),
            cnv=None
            if cnv_snap is None
            else cnv_view(reading_values(cnv_snap), cfg.conveyor_map, ok=cnv_up and cnv_snap.ok),
            acc_link=LinkState(acc_up, _age_ms(acc_snap, svc.acc.now())),
            cnv_link=LinkState(cnv_up, _age_ms(cnv_snap, svc.cnv.now())),
            broker=self.broker_state(),
            outputs=svc.ctl.outputs,
            live=svc.live_values(),
            alarms=svc.alarm_board(),
        )

    def refresh(self) -> None:
        """Build the state now (the feed task does it every FEED_PERIOD_S)."""
        inp = self.gather()
        reel_id = inp.reel.reel_id if inp.reel is not None else None
        if reel_id is not None and reel_id != self.feed.dose_reel:
            self.feed.start_dose(reel_id)
            self._load_stored_metres(reel_id)
        if inp.t_ms - self._last_trend_ms >= TREND_PERIOD_MS:
            self._last_trend_ms = inp.t_ms
            current = live_number(inp.live, "beam_current_ma")
            self.feed.add_trend(inp.t_ms, current, live_number(inp.live, "speed_m_min"))
        self.feed.update(build_state(inp))

    def _load_stored_metres(self, reel_id: str) -> None:
        """A reel resumed after a restart of linectl has metres from before it: they are
        read from the store (off the loop) and merged into the chart."""
        path = self.svc.store_path

        def read() -> list[Any]:
            if not path.is_file():
                return []
            with RecordStore(path) as store:
                return [m.to_record() for m in store.metres(reel_id)]

        async def load() -> None:
            try:
                metres = await asyncio.to_thread(read)
            except (LocalError, OSError) as exc:
                log.warning("HMI: the stored metres of reel %s cannot be read: %s", reel_id, exc)
                return
            self.feed.add_metres(reel_id, metres)

        task = asyncio.create_task(load(), name=f"linectl-hmi-load-{reel_id}")
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def _publish(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # pragma: no cover - a bug here must not stop the feed
                log.exception("HMI: building the live state failed")
            now_s = time.monotonic()
            for client in list(self.clients):
                self._serve_client(client, now_s)
            await asyncio.sleep(max(0.0, FEED_PERIOD_S - (time.monotonic() - started)))

    def _serve_client(self, client: _Client, now_s: float) -> None:
        if client.sending is not None and not client.sending.done():
            client.skipped += 1
            return
        transport = client.transport
        if transport is not None and _buffered(transport) > MAX_BUFFERED_BYTES:
            client.skipped += 1
            return
        if client.skipped >= SNAPSHOT_AFTER_SKIPS:
            client.want_snapshot = True
        client.skipped = 0
        msg: dict[str, Any] | None
        if client.want_snapshot:
            client.want_snapshot = False
            msg = self.feed.snapshot(client.view)
        else:
            msg = self.feed.delta(client.view)
        if msg is None and now_s - client.last_sent_s >= HEARTBEAT_S:
            msg = {"type": "heartbeat", "seq": client.view.seq, "t_ms": self.feed.state["t_ms"]}
        if msg is None:
            return
        client.last_sent_s = now_s
        client.sending = asyncio.create_task(self._send(client, _dumps(msg)))

    async def _send(self, client: _Client, text: str) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await client.ws.send_str(text)
        except (TimeoutError, ConnectionError, RuntimeError):
            log.info("HMI: client of %s dropped (it did not take the feed)", client.session.user)
            self.clients.discard(client)
            with contextlib.suppress(Exception):
                await client.ws.close(code=1011, message=b"too slow")

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        session = self._current(request)
        if session is None:
            return _error(401, "not logged in")
        if len(self.clients) >= self.config.max_clients:
            return _error(503, f"too many live clients (max_clients {self.config.max_clients})")
        ws = web.WebSocketResponse(max_msg_size=4096, heartbeat=None)
        await ws.prepare(request)
        client = _Client(ws, session, request.transport)
        self.clients.add(client)
        self.refresh()  # the snapshot is of now, not of the feed's last round
        self._serve_client(client, time.monotonic())
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    kind = json.loads(msg.data).get("type")
                except (ValueError, AttributeError):
                    kind = None
                if kind == "resync":
                    # The page saw a delta that does not follow what it holds.
                    self.resyncs += 1
                    log.info(
                        "HMI: %s's page asked for a snapshot (a gap in its feed)", session.user
                    )
                    client.want_snapshot = True
                # A session that ended (logout, expiry) ends its feed too.
                if self.sessions.get(session.token, self.clock()) is None:
                    break
        finally:
            self.clients.discard(client)
        return ws

    # ------------------------------------------------------------------ sessions

    def _current(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE), self.clock())

    def _commands_of(self, role: str) -> list[str]:
        allowed = self.svc.cfg.line.mqtt.roles.get(role, [])
        return [c.value for c in CommandName if "*" in allowed or c.value in allowed]

    def _session_body(self, s: Session) -> dict[str, Any]:
        return {
            "user": s.user,
            "role": s.role,
            "csrf": s.csrf,
            "commands": self._commands_of(s.role),
            "line_id": self.svc.line_id,
        }

    async def _session(self, request: web.Request) -> web.Response:
        s = self._current(request)
        if s is None:
            return _error(401, "not logged in")
        return web.json_response(self._session_body(s))

    async def _login(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the login must be a JSON object with user and password")
        if not isinstance(body, dict):
            body = {}
        user, password = body.get("user"), body.get("password")
        if not isinstance(user, str) or not isinstance(password, str) or len(user) > 64:
            return _error(400, "the login must be a JSON object with user and password")
        now = self.clock()
        peer = request.remote or "unknown"
        keys = (f"addr:{peer}", f"user:{user}")
        wait = self.limiter.retry_after_s(keys, now)
        if wait > 0:
            log.warning("HMI: login for %r from %s refused: rate limit", user[:64], peer)
            return _error(
                429,
                f"too many failed logins; try again in {math.ceil(wait)} s",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        account = self.config.users.get(user)
        ok = await asyncio.to_thread(
            verify_password, password, account.password_hash if account else None
        )
        if not ok or account is None:
            self.limiter.failed(keys, now)
            log.warning("HMI: failed login for %r from %s", user[:64], peer)
            return _error(401, "wrong user or password")
        self.limiter.succeeded(f"user:{user}")
        session = self.sessions.open(user, account.role, now)
        log.info("HMI: %s logged in (role %s) from %s", user, account.role, peer)
        resp = web.json_response(self._session_body(session))
        resp.set_cookie(
            COOKIE,
            session.token,
            httponly=True,
            samesite="Strict",
            secure=self._tls,
            path="/",
            max_age=int(self.config.session_ttl_s),
        )
        return resp

    async def _logout(self, request: web.Request) -> web.Response:
        s = self._current(request)
        if s is None:
            return _error(401, "not logged in")
        if not csrf_ok(s, request.headers.get("X-CSRF-Token")):
            return _error(403, "missing or wrong X-CSRF-Token")
        self.sessions.close(s.token)
        for client in [c for c in self.clients if c.session.token == s.token]:
            await client.ws.close(code=1000, message=b"logged out")
        log.info("HMI: %s logged out", s.user)
        resp = web.json_response({"user": s.user, "logged_out": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    # ------------------------------------------------------------------ commands

    async def _command(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        s = self._current(request)
        if s is None:
            return self._nak(401, None, name, "not logged in")
        svc = self.svc
        if not csrf_ok(s, request.headers.get("X-CSRF-Token")) or not _same_origin(request):
            why = "missing or wrong X-CSRF-Token (or another site's page sent it)"
            svc.audit_command_error(s.user, name, why, {"source": "http"})
            return self._nak(403, None, name, why)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._nak(413, None, name, f"a command is at most {MAX_BODY_BYTES} bytes")
        try:
            cmd = parse_command(body or b"{}", name=name, sender=s.user, source="http")
        except CommandError as exc:
            svc.audit_command_error(s.user, name, str(exc), {"source": "http"})
            return self._nak(400, None, name, str(exc))
        if not cmd.request_id:
            cmd = _with_request_id(cmd)
        refused_by_role = authorize_command(cmd, svc.cfg.line) != ""
        result = await svc.execute(cmd)
        status = 200
        if not result.ack:
            if refused_by_role:
                status = 403
            elif result.reason == "controller not running":
                status = 503
            else:
                status = 409
        log.info(
            "HMI: %s from %s: %s%s",
            cmd.name.value,
            s.user,
            result.result,
            f" ({result.reason})" if result.reason else "",
        )
        return web.json_response(result.to_json(svc.wall_ms()), status=status)

    def _nak(self, status: int, cmd: Any, name: str, reason: str) -> web.Response:
        result: CommandResult = nak(cmd, reason, command=name[:64])
        return web.json_response(result.to_json(self.svc.wall_ms()), status=status)

    # ------------------------------------------------------------------ reads

    async def _state(self, request: web.Request) -> web.Response:
        if self._current(request) is None:
            return _error(401, "not logged in")
        self.refresh()
        return web.json_response(self.feed.snapshot(ClientView())["state"])

    async def _recipes(self, request: web.Request) -> web.Response:
        if self._current(request) is None:
            return _error(401, "not logged in")
        recipes_dir = self.svc.cfg.recipes_dir
        names = await asyncio.to_thread(
            lambda: sorted(p.stem for p in recipes_dir.glob("*.toml") if p.is_file())
        )
        return web.json_response({"recipes": names, "current": self.svc.line.recipe_name})

    async def _with_store(self, fn: Callable[[RecordStore], Any]) -> Any:
        path = self.svc.store_path

        def read() -> Any:
            if not path.is_file():
                raise LocalError("no record database yet")
            with RecordStore(path) as store:
                return fn(store)

        return await asyncio.to_thread(read)

    async def _reels(self, request: web.Request) -> web.Response:
        if self._current(request) is None:
            return _error(401, "not logged in")
        try:
            reels = await self._with_store(list_reels)
        except LocalError as exc:
            return _error(404, str(exc))
        return web.json_response({"schema": "linectl.reel-list/1", "reels": reels})

    async def _reel(self, request: web.Request) -> web.Response:
        if self._current(request) is None:
            return _error(401, "not logged in")
        reel_id = request.match_info["reel_id"]
        try:
            report = await self._with_store(lambda st: build_report(st, reel_id))
        except LocalError as exc:
            return _error(404, str(exc))
        return web.Response(text=_dumps(report), content_type="application/json")

    async def _healthz(self, request: web.Request) -> web.Response:
        report = self.svc.report
        now_ms = self.svc.wall_ms()
        age_s = None if report is None else max(0.0, (now_ms - report.wall_ms) / 1000.0)
        ok = age_s is not None and age_s < CYCLE_STALE_S
        body = {
            "status": "ok" if ok else "stalled",
            "line_id": self.svc.line_id,
            "state": self.svc.line_status().state,
            "cycle_age_s": None if age_s is None else round(age_s, 3),
        }
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._exposition is None:
            return _error(404, "metrics are not enabled")
        return self._exposition.response(request)

    def _page(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        path = STATIC_DIR / name

        async def page(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(path)

        return page


# ---------------------------------------------------------------------- /metrics


class Exposition:
    """prometheus_client's exposition of one collector, as the scraper asks for it: text
    or OpenMetrics (prometheus_client's `choose_encoder`), gzip when accepted.

    Rendered on the loop (a few milliseconds: reading the registry does no I/O) and kept
    for `reuse_s`, so that scrapes arriving together cost one render, not one each."""

    MAX_KEPT: Final = 8
    """Renders kept (one per format asked for; the Accept header chooses the format)."""

    def __init__(
        self,
        collector: Collector,
        *,
        reuse_s: float = RENDER_REUSE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.collector = collector
        self.reuse_s = reuse_s
        self.clock = clock
        self.renders = 0
        """Renders so far (a scrape answered from a kept render does not count)."""
        self._kept: dict[tuple[str, bool], tuple[float, bytes]] = {}
        self._failed = False

    def response(self, request: web.BaseRequest) -> web.Response:
        """The answer to one scrape."""
        gzipped = _gzip_accepted(request.headers.get("Accept-Encoding", ""))
        try:
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            key = (content_type, gzipped)
            now = self.clock()
            kept = self._kept.get(key)
            if kept is None or now - kept[0] >= self.reuse_s:
                body = encoder(self.collector)
                if gzipped:
                    body = gzip.compress(body)
                if len(self._kept) >= self.MAX_KEPT:
                    self._kept.clear()
                kept = self._kept[key] = (now, body)
                self.renders += 1
        except Exception:
            if not self._failed:  # the first failure in full, the rest answered 500 only
                self._failed = True
                log.exception("metrics: the exposition failed")
            return web.Response(status=500, text="exposition failed\n")
        headers = {"Content-Type": content_type}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=kept[1], headers=headers)


class MetricsServer:
    """The `[metrics]` endpoint: GET (or HEAD) /metrics on the running event loop, 404
    for any other path, 405 for any other method; within METRICS_LIMITS.

    `start()` binds it (LocalError naming the address when it cannot), `close()` stops
    it and frees the port (idempotent); `async with` does both."""

    def __init__(
        self,
        collector: Collector,
        host: str,
        port: int,
        *,
        limits: HttpLimits = METRICS_LIMITS,
        reuse_s: float = RENDER_REUSE_S,
    ) -> None:
        self.host = host
        self.port = port
        """The bound port once started (the free port chosen when 0 was asked for)."""
        self.limits = limits
        self.exposition = Exposition(collector, reuse_s=reuse_s)
        self.bounds = ConnectionBounds(
            "metrics", max_connections=limits.max_connections, head_timeout_s=limits.head_timeout_s
        )
        self.app = web.Application(middlewares=[_bounded(self.bounds, limits.answer_timeout_s)])
        self.app.router.add_get("/metrics", self._scrape)  # GET and HEAD
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen on host:port."""
        try:
            self._runner, self._server = await _listen(
                self.app, self.host, self.port, self.limits, self.bounds
            )
        except OSError as exc:
            raise LocalError(
                f"metrics endpoint: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        self.port = _bound_port(self._server, self.port)
        log.info("metrics on %s", self.url)

    async def close(self) -> None:
        """Stop serving, drop every connection, release the socket."""
        runner, server = self._runner, self._server
        self._runner = self._server = None
        await _unlisten(runner, server)

    @property
    def stats(self) -> ConnectionStats:
        """Connections let in and turned away, requests answered."""
        return self.bounds.stats

    @property
    def sockname(self) -> tuple[Any, ...]:
        """The listening socket's own address (host, port, ...)."""
        if self._server is None or not self._server.sockets:
            raise LocalError("metrics endpoint: not listening")
        return tuple(self._server.sockets[0].getsockname())

    @property
    def url(self) -> str:
        """The scrape URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def _scrape(self, request: web.Request) -> web.Response:
        return self.exposition.response(request)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def serve_metrics(collector: Collector, config: MetricsConfig) -> MetricsServer | None:
    """Serve `collector` as the line's [metrics] section says; None when it is disabled."""
    if not config.enabled:
        return None
    server = MetricsServer(collector, config.host, config.port)
    await server.start()
    return server


# ---------------------------------------------------------------------- listening


async def _listen(
    app: web.Application,
    host: str,
    port: int,
    limits: HttpLimits,
    bounds: ConnectionBounds,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, asyncio.Server]:
    """Serve `app` on host:port behind `bounds` (aiohttp's TCPSite, with the protocol
    factory wrapped: aiohttp has no hook for the connection cap or the head deadline).
    OSError when the address cannot be bound."""
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        logger=http_log,
        keepalive_timeout=limits.keepalive_timeout_s,
        max_line_size=limits.max_line_bytes,
        max_field_size=limits.max_field_bytes,
        max_headers=limits.max_headers,
    )
    await runner.setup()
    factory = runner.server
    assert factory is not None  # set up above
    try:
        server = await asyncio.get_running_loop().create_server(
            bounds.wrap(factory),
            host,
            port,
            ssl=ssl_context,
            backlog=128,
            # The bounds see a TLS connection once its handshake is done: this bounds that.
            ssl_handshake_timeout=limits.head_timeout_s if ssl_context is not None else None,
        )
    except BaseException:
        await runner.cleanup()
        raise
    return runner, server


async def _unlisten(runner: web.AppRunner | None, server: asyncio.Server | None) -> None:
    """Stop listening, then close every connection (aiohttp's shutdown of its handlers)."""
    if server is not None:
        server.close()
    if runner is not None:
        await runner.cleanup()
    if server is not None:
        await server.wait_closed()


def _bound_port(server: asyncio.Server, asked: int) -> int:
    sockets = server.sockets
    return int(sockets[0].getsockname()[1]) if sockets else asked


def _bounded(bounds: ConnectionBounds, answer_timeout_s: float) -> Middleware:
    """Tells `bounds` which connections are being answered, and writes each answer under
    its deadline (aiohttp would write it after the handler with no deadline at all)."""

    @web.middleware
    async def bounded(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        transport = request.transport
        bounds.request_started(transport)
        # aiohttp runs each request (handler, then writing the answer) in a task of its
        # own: the connection is idle again when that task ends.
        task = asyncio.current_task()
        assert task is not None  # a handler always runs in a task
        task.add_done_callback(lambda _task: bounds.request_finished(transport))
        resp = await handler(request)
        if not resp.prepared:  # a WebSocket, prepared by its handler, has its own bounds
            try:
                async with asyncio.timeout(answer_timeout_s):
                    await resp.prepare(request)
                    await resp.write_eof()
            except TimeoutError:
                bounds.answer_timed_out(transport)
            except ConnectionError:
                pass  # the client left; aiohttp notes it when it finishes the response
        return resp

    return bounded


def _gzip_accepted(accept_encoding: str) -> bool:
    return any(part.split(";")[0].strip().lower() == "gzip" for part in accept_encoding.split(","))


# ---------------------------------------------------------------------- helpers


@web.middleware
async def _headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        resp = exc
    if not resp.prepared:
        for k, v in _SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
    if isinstance(resp, web.HTTPException):
        raise resp
    return resp


def _same_origin(request: web.Request) -> bool:
    """A browser names the page's origin on a POST; it must be this server's own."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None  # non-browser clients send none; "null" is an opaque origin
    return origin.split("://", 1)[-1] == request.host


def _with_request_id(cmd: Command) -> Command:
    # The answer and the audit row name the request even when the client gave no id.
    return replace(cmd, request_id="http-" + uuid.uuid4().hex[:16])


def _error(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _age_ms(snap: Any, now_s: float) -> int | None:
    if snap is None:
        return None
    age = snap.age_s(now_s)
    return None if not math.isfinite(age) else int(age * 1000)


def _buffered(transport: asyncio.BaseTransport) -> int:
    get = getattr(transport, "get_write_buffer_size", None)
    return int(get()) if get is not None else 0
