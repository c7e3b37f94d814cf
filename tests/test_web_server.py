"""The HMI server against the running line on the simulators: login, roles, CSRF, the
one command path (audited with the user), the live feed's snapshot and deltas,
/healthz and /metrics (docs/hmi.md)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from e2e_scenarios import wait_for
from hmi_support import PASSWORD, HmiLine, hmi_line, login, users

from linectl.config import HttpConfig
from linectl.core.control import LineState

pytestmark = pytest.mark.slow


@pytest.fixture
async def hmi(tmp_path: Path) -> AsyncIterator[HmiLine]:
    async with hmi_line(tmp_path) as h:
        yield h


def client() -> aiohttp.ClientSession:
    # unsafe=True: the jar keeps cookies of an IP address host (127.0.0.1).
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def audit_rows(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(
            "SELECT actor, action, detail, accepted, reason FROM events ORDER BY id"
        ).fetchall()


async def test_login_sets_a_strict_httponly_cookie_and_refuses_a_wrong_password(
    hmi: HmiLine,
) -> None:
    async with client() as http:
        async with http.get(f"{hmi.url}/api/session") as r:
            assert r.status == 401
        async with http.post(f"{hmi.url}/api/login", json={"user": "op", "password": "wrong"}) as r:
            assert r.status == 401
            assert (await r.json())["error"] == "wrong user or password"
            assert "Set-Cookie" not in r.headers
        async with http.post(
            f"{hmi.url}/api/login", json={"user": "nobody", "password": PASSWORD}
        ) as r:
            assert r.status == 401
        async with http.post(
            f"{hmi.url}/api/login", json={"user": "op", "password": PASSWORD}
        ) as r:
            assert r.status == 200
            cookie = r.headers["Set-Cookie"]
            body = await r.json()
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert body["user"] == "op"
        assert body["role"] == "operator"
        assert "start_reel" in body["commands"]
        assert len(body["csrf"]) >= 32
        async with http.get(f"{hmi.url}/api/session") as r:
            assert r.status == 200
            assert (await r.json())["csrf"] == body["csrf"]


async def test_failed_logins_are_rate_limited_even_for_the_right_password(
    tmp_path: Path,
) -> None:
    http_cfg = HttpConfig(enabled=True, port=0, users=users(op="operator"), login_max_failures=3)
    async with hmi_line(tmp_path, http=http_cfg, ready=False) as hmi, client() as http:
        for _ in range(3):
            async with http.post(
                f"{hmi.url}/api/login", json={"user": "op", "password": "guess"}
            ) as r:
                assert r.status == 401
        async with http.post(
            f"{hmi.url}/api/login", json={"user": "op", "password": PASSWORD}
        ) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) > 0
            assert "too many failed logins" in (await r.json())["error"]


async def test_a_viewer_who_forces_a_command_is_refused_and_audited(hmi: HmiLine) -> None:
    async with client() as http:
        session = await login(http, hmi.url, "view")
        assert session["commands"] == []
        async with http.post(
            f"{hmi.url}/api/cmd/start_reel",
            json={"reel_id": "V1", "length_m": 10},
            headers={"X-CSRF-Token": str(session["csrf"])},
        ) as r:
            assert r.status == 403
            body = await r.json()
    assert body["result"] == "NAK"
    assert body["reason"] == "role 'viewer' may not send start_reel"
    assert hmi.svc.ctl.reel is None
    await wait_for(lambda: any(row[0] == "view" for row in audit_rows(hmi.db)), 5.0, "audit")
    row = next(row for row in audit_rows(hmi.db) if row[0] == "view")
    assert row[1] == "start_reel"
    assert json.loads(row[2])["source"] == "http"
    assert row[3] == 0


async def test_a_command_without_the_csrf_token_or_from_another_origin_is_refused(
    hmi: HmiLine,
) -> None:
    async with client() as http:
        session = await login(http, hmi.url, "op")
        async with http.post(f"{hmi.url}/api/cmd/reset", json={}) as r:
            assert r.status == 403
            assert "X-CSRF-Token" in (await r.json())["reason"]
        async with http.post(
            f"{hmi.url}/api/cmd/reset",
            json={},
            headers={"X-CSRF-Token": "not-the-token"},
        ) as r:
            assert r.status == 403
        async with http.post(
            f"{hmi.url}/api/cmd/reset",
            json={},
            headers={"X-CSRF-Token": str(session["csrf"]), "Origin": "http://evil.example"},
        ) as r:
            assert r.status == 403
        async with http.post(f"{hmi.url}/api/logout") as r:
            assert r.status == 403  # logout needs the token too
    async with client() as anon:
        async with anon.post(f"{hmi.url}/api/cmd/reset", json={}) as r:
            assert r.status == 401
            assert (await r.json())["result"] == "NAK"
        async with anon.get(f"{hmi.url}/api/state") as r:
            assert r.status == 401
        async with anon.get(f"{hmi.url}/ws") as r:
            assert r.status == 401


async def test_bad_commands_name_what_is_wrong_and_change_nothing(hmi: HmiLine) -> None:
    async with client() as http:
        session = await login(http, hmi.url, "op")
        hdr = {"X-CSRF-Token": str(session["csrf"])}
        cases = [
            ("start_reel", b'{"reel_id": "R1"}', "missing key(s) length_m"),
            ("start_reel", b'{"reel_id": "R1", "length_m": -3}', "length_m must be positive"),
            ("launch", b"{}", "unknown command 'launch'"),
            ("stop", b"[1]", "must be a JSON object"),
            ("shelve_alarm", b'{"alarm": "vacuum", "duration_s": 60}', "missing key(s) reason"),
        ]
        for name, payload, why in cases:
            async with http.post(f"{hmi.url}/api/cmd/{name}", data=payload, headers=hdr) as r:
                assert r.status == 400, name
                body = await r.json()
                assert why in body["reason"], (name, body)
        async with http.post(f"{hmi.url}/api/cmd/stop", data=b"x" * 20000, headers=hdr) as r:
            assert r.status == 413
    assert hmi.svc.ctl.reel is None
    assert hmi.svc.ctl.state is LineState.READY


async def test_start_and_end_a_reel_through_the_api_with_the_feed_following(
    hmi: HmiLine,
) -> None:
    async with client() as http:
        session = await login(http, hmi.url, "op")
        hdr = {"X-CSRF-Token": str(session["csrf"])}
        async with http.ws_connect(f"{hmi.url}/ws") as ws:
            first = json.loads((await ws.receive()).data)
            assert first["type"] == "snapshot"
            state: dict[str, Any] = first["state"]
            seq = first["seq"]
            assert state["status"]["state"] == "ready"
            assert state["reel"] is None
            async with http.post(
                f"{hmi.url}/api/cmd/start_reel",
                json={"reel_id": "H1", "length_m": 6, "request_id": "req-1"},
                headers=hdr,
            ) as r:
                body = await r.json()
                assert r.status == 200, body
                assert body["result"] == "ACK"
                assert body["request_id"] == "req-1"
            # Follow the deltas until the dose chart has metres: every delta's base is
            # the sequence number of the message before it.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60.0
            while len(state["dose"]["points"]) < 5:
                assert loop.time() < deadline, "no dose points in 60 s"
                msg = json.loads((await ws.receive(timeout=5.0)).data)
                if msg["type"] == "heartbeat":
                    assert msg["seq"] == seq
                    continue
                assert msg["type"] == "delta"
                assert msg["base"] == seq
                assert msg["seq"] > seq
                seq = msg["seq"]
                state.update(msg.get("set", {}))
                for point in msg.get("append", {}).get("dose", []):
                    state["dose"]["points"].append(point)
            assert state["reel"]["reel_id"] == "H1"
            assert state["dose"]["reel_id"] == "H1"
            indexes = [p[0] for p in state["dose"]["points"]]
            assert indexes == list(range(len(indexes)))
            assert all(p[4] == "in_spec" for p in state["dose"]["points"])
            # The client's copy, built from one snapshot and its deltas, is the server's.
            async with http.get(f"{hmi.url}/api/state") as r:
                now = await r.json()
            assert now["dose"]["points"][: len(indexes)] == state["dose"]["points"]
        await wait_for(lambda: hmi.svc.ctl.state is LineState.READY, 60.0, "reel done")
        async with http.get(f"{hmi.url}/api/reels") as r:
            reels = (await r.json())["reels"]
        assert [x["reel_id"] for x in reels] == ["H1"]
        async with http.get(f"{hmi.url}/api/reels/H1") as r:
            report = await r.json()
        assert report["reel"]["reel_id"] == "H1"
        assert len(report["metres"]) == 6
        async with http.get(f"{hmi.url}/api/reels/nope") as r:
            assert r.status == 404
    rows = [row for row in audit_rows(hmi.db) if row[1] == "start_reel"]
    assert rows
    assert rows[0][0] == "op"
    assert json.loads(rows[0][2])["source"] == "http"
    assert rows[0][3] == 1


async def test_a_refused_command_answers_409_with_the_controllers_reason(
    hmi: HmiLine,
) -> None:
    async with client() as http:
        session = await login(http, hmi.url, "op")
        async with http.post(
            f"{hmi.url}/api/cmd/ack_alarm",
            json={"alarm": "*"},
            headers={"X-CSRF-Token": str(session["csrf"])},
        ) as r:
            assert r.status == 409
            body = await r.json()
    assert body == {**body, "result": "NAK", "reason": "no unacknowledged alarm"}


async def test_healthz_and_metrics(hmi: HmiLine) -> None:
    async with client() as http:
        async with http.get(f"{hmi.url}/healthz") as r:
            assert r.status == 200
            health = await r.json()
        assert health["status"] == "ok"
        assert health["state"] == "ready"
        async with http.get(f"{hmi.url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
        assert 'linectl_line_state{line="line1",state="ready"} 1.0' in text
        assert "_created" not in text
        async with http.get(f"{hmi.url}/") as r:
            assert r.status == 200
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Frame-Options"] == "DENY"
        async with http.get(f"{hmi.url}/static/vendor/uPlot.iife.min.js") as r:
            assert r.status == 200


async def test_logout_ends_the_session_and_its_feed(hmi: HmiLine) -> None:
    async with client() as http:
        session = await login(http, hmi.url, "op")
        async with http.ws_connect(f"{hmi.url}/ws") as ws:
            assert json.loads((await ws.receive()).data)["type"] == "snapshot"
            async with http.post(
                f"{hmi.url}/api/logout", headers={"X-CSRF-Token": str(session["csrf"])}
            ) as r:
                assert r.status == 200
            while True:
                msg = await ws.receive(timeout=5.0)
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    break
        async with http.get(f"{hmi.url}/api/session") as r:
            assert r.status == 401


async def test_a_client_gets_at_most_five_updates_a_second_while_a_reel_runs(
    hmi: HmiLine,
) -> None:
    # The line changes every 50 ms cycle; the feed coalesces to its 0.2 s round.
    async with client() as http:
        session = await login(http, hmi.url, "op")
        async with http.post(
            f"{hmi.url}/api/cmd/start_reel",
            json={"reel_id": "F1", "length_m": 200},
            headers={"X-CSRF-Token": str(session["csrf"])},
        ) as r:
            assert r.status == 200
        await wait_for(lambda: hmi.svc.ctl.state is LineState.RUNNING, 30.0, "running")
        async with http.ws_connect(f"{hmi.url}/ws") as ws:
            assert json.loads((await ws.receive()).data)["type"] == "snapshot"
            loop = asyncio.get_running_loop()
            start = loop.time()
            deltas = 0
            while loop.time() - start < 3.0:
                msg = json.loads((await ws.receive(timeout=2.0)).data)
                deltas += msg["type"] == "delta"
    # 3 s of rounds: at most 15 (16 with the round under way when counting began).
    assert 5 <= deltas <= 16


class _BusyTransport:
    """A connection whose send buffer is full (a client that reads nothing)."""

    def __init__(self) -> None:
        self.buffered = 10 * 1024 * 1024

    def get_write_buffer_size(self) -> int:
        return self.buffered


class _NoSocket:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send_str(self, text: str) -> None:
        self.sent.append(json.loads(text))


async def test_a_slow_client_is_skipped_then_gets_a_snapshot_not_a_backlog(
    hmi: HmiLine,
) -> None:
    from linectl.web import server as web_server

    ws = _NoSocket()
    transport = _BusyTransport()
    session = hmi.server.sessions.open("op", "operator", 0.0)
    slow = web_server._Client(ws, session, transport)  # type: ignore[arg-type]
    slow.want_snapshot = False
    hmi.server.feed.snapshot(slow.view)  # it had the state once
    rounds = web_server.SNAPSHOT_AFTER_SKIPS + 5
    for i in range(rounds):
        hmi.server.refresh()
        hmi.server.feed.add_trend(10**12 + i, 1.0, 2.0)  # something changes every round
        hmi.server._serve_client(slow, float(i))
    # Nothing was built or queued for it while its connection was full.
    assert ws.sent == []
    assert slow.skipped == rounds
    transport.buffered = 0
    hmi.server._serve_client(slow, float(rounds))
    assert slow.sending is not None
    await slow.sending
    # Skipped long enough: it gets a whole snapshot of now, never the rounds it missed.
    assert [m["type"] for m in ws.sent] == ["snapshot"]
    assert ws.sent[0]["seq"] == hmi.server.feed.seq
