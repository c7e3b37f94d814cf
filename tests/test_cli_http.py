"""The CLI's client commands over the daemon's HTTP API (linectl.webclient), used when
the configuration has no broker and [http] enabled: against the real HMI server in
front of the line on the simulators (tests/hmi_support.py), with the CLI as a subprocess
(real exit codes, real output). The pure parts (the feed copy, the state document as
the MQTT renderings read it) are tested in-process.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from conftest import Run, cli, free_port
from e2e_scenarios import compact_config, wait_for
from hmi_support import PASSWORD, HmiLine, hmi_line, login, users

from linectl.cli import main
from linectl.client import ClientSettings, HmiWatch, hmi_view
from linectl.config import HttpConfig, load_config
from linectl.core.control import LineState
from linectl.errors import LocalError
from linectl.webclient import FeedCopy, http_target, read_password

ROOT = Path(__file__).resolve().parents[1]
NOW_MS = time.time_ns() // 1_000_000


# ---------------------------------------------------------------------- helpers


def cli_config(tmp_path: Path, port: int, *, http: str = "", mqtt: bool = False) -> Path:
    """The CLI's copy of the line's configuration: no broker ([mqtt] enabled = false,
    as shipped) and [http] enabled on `port` (with `http` added to the table)."""
    d = compact_config(tmp_path / "cli")
    line = (d / "line.toml").read_text()
    if mqtt:
        head, rest = line.split("\n[mqtt]\n", 1)
        line = head + "\n[mqtt]\n" + rest.replace("enabled = false", "enabled = true", 1)
    line = _without_http(line) + f"\n[http]\nenabled = true\nport = {port}\n{http}"
    (d / "line.toml").write_text(line)
    return d


def _without_http(text: str) -> str:
    """line.toml without its [http] table and subtables (the shipped one may have one)."""
    kept, skipping = [], False
    for row in text.splitlines():
        header = row.strip()
        if header.startswith("["):
            skipping = header.startswith(("[http]", "[http."))
        if not skipping:
            kept.append(row)
    return "\n".join(kept) + "\n"


def password_file(tmp_path: Path, password: str = PASSWORD) -> str:
    """A file whose first line is `password`."""
    path = tmp_path / f"password-{password}"
    path.write_text(password + "\n")
    return str(path)


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


@dataclass
class Cli:
    """The CLI against one running HMI server, as user op unless told otherwise."""

    hmi: HmiLine
    cfg: str
    pw: str

    async def __call__(self, *args: str, user: str = "op") -> Run:
        return await cli(*args, "--config", self.cfg, "--user", user, "--password-file",
                         self.pw)  # fmt: skip


def cli_for(hmi: HmiLine, tmp_path: Path) -> Cli:
    cfg = cli_config(tmp_path, port_of(hmi.url))
    return Cli(hmi, str(cfg), password_file(tmp_path))


def doc(**over: Any) -> dict[str, Any]:
    """A state document as linectl.web.feed.build_state makes it (with the series)."""
    base: dict[str, Any] = {
        "t_ms": NOW_MS,
        "line_id": "line1",
        "status": {
            "state": "running",
            "cause": "beam on at dose-follow current",
            "since_ms": NOW_MS - 60_000,
            "not_ready_reason": "",
        },
        "recipe": {"name": "fast", "product": "test cable", "version": 3},
        "reel": {
            "reel_id": "R-7",
            "operator": "A. Smith",
            "planned_length_m": 100.0,
            "position_m": 25.0,
            "started": True,
        },
        "beam": {
            "on": True,
            "hv_on": True,
            "current_ma": 39.8,
            "current_sp_ma": 40.0,
            "energy_mev": 1.2,
        },
        "conveyor": {
            "running": True,
            "speed_m_min": 80.0,
            "speed_sp_m_min": 80.0,
            "speed_limit_m_min": 80.0,
            "tension_n": 118.0,
        },
        "dose_now_kgy": 121.0,
        "links": {
            "accelerator": {"up": True, "age_ms": 10},
            "conveyor": {"up": False, "age_ms": 900},
            "broker": "off",
        },
        "alarms": [
            {
                "kind": "beam_outage",
                "message": "beam off for 1.2 s",
                "state": "acked",
                "active": True,
                "latched": False,
                "t_ms": NOW_MS - 5_000,
                "shelved_until_ms": None,
                "shelved_by": None,
                "shelve_reason": None,
            },
        ],
        "dose": {"reel_id": "R-7", "points": [[0, 121.0, 105, 140, "in_spec"]]},
        "trend": [],
    }
    base.update(over)
    return base


# ---------------------------------------------------------------------- pure parts


def test_feed_copy_follows_snapshot_and_deltas_and_asks_for_a_resync() -> None:
    copy = FeedCopy()
    # A delta before any snapshot cannot be applied: one resync asked, then quiet.
    assert copy.take({"type": "delta", "base": 3, "seq": 4, "set": {"x": 1}}) == "resync"
    assert copy.take({"type": "delta", "base": 4, "seq": 5, "set": {"x": 2}}) == ""
    snap = doc()
    assert copy.take({"type": "snapshot", "seq": 7, "state": snap}) == "state"
    assert copy.state["status"]["state"] == "running"
    delta = {
        "type": "delta",
        "base": 7,
        "seq": 9,
        "set": {"reel": None, "t_ms": 5},
        "append": {"dose": [[1, 120.0, 105, 140, "in_spec"]], "trend": [[5, 1.0, 2.0]]},
    }
    assert copy.take(delta) == "state"
    assert copy.seq == 9
    assert copy.state["reel"] is None
    assert [p[0] for p in copy.state["dose"]["points"]] == [0, 1]
    assert copy.state["trend"] == [[5, 1.0, 2.0]]
    assert copy.take({"type": "heartbeat", "seq": 9, "t_ms": 6}) == ""
    assert copy.state["t_ms"] == 6
    # Trend rows older than 10 minutes before the newest go.
    old = {"type": "delta", "base": 9, "seq": 9, "append": {"trend": [[5 + 600_001, 1.0, 2.0]]}}
    assert copy.take(old) == "state"
    assert copy.state["trend"] == [[600_006, 1.0, 2.0]]
    # A heartbeat with another seq: something was missed.
    assert copy.take({"type": "heartbeat", "seq": 10, "t_ms": 7}) == "resync"
    assert copy.state["t_ms"] == 6
    assert copy.take({"type": "snapshot", "seq": 9, "state": copy.state}) == "state"
    # A delta from another base: a message was missed.
    assert copy.take({"type": "delta", "base": 8, "seq": 10, "set": {"t_ms": 7}}) == "resync"
    assert copy.state["t_ms"] == 6
    assert copy.take({"type": "snapshot", "seq": 12, "state": doc()}) == "state"
    assert copy.take({"type": "delta", "base": 12, "seq": 13, "set": {"t_ms": 8}}) == "state"


def test_the_state_document_renders_as_status_and_alarms_do_over_mqtt() -> None:
    settings = ClientSettings("line1", "127.0.0.1", 8480, address="http://127.0.0.1:8480")
    view = hmi_view(settings, doc())
    lines = view.status_lines(settings)
    assert lines[0] == "line1 @ http://127.0.0.1:8480: online"
    assert re.fullmatch(r"state     RUNNING since [\d:]+: beam on at dose-follow current", lines[1])
    assert "reel      R-7, 100 m planned, at 25.0 m (25 %)" in lines
    assert "recipe    test cable, version 3" in lines
    assert "alarms    beam_outage: beam off for 1.2 s" in lines
    # Only the values the document carries; the conveyor's link is down: comm_fail.
    assert "beam      current 39.8 mA (set-point 40.0), energy 1.200 MeV" in lines
    assert (
        "line      speed 80.0 m/min [comm_fail] (set-point 80.0), tension 118 N [comm_fail]"
        in lines
    )
    alarms = view.alarm_lines(settings)
    assert "1 active alarm:" in alarms
    assert any(
        re.search(r"beam_outage\s+since [\d:]+\s+beam off for 1.2 s  \[acknowledged\]$", a)
        for a in alarms
    ), alarms


def test_watch_lines_from_the_feed_show_what_changed() -> None:
    out = io.StringIO()
    settings = ClientSettings("line1", "127.0.0.1", 8480, address="http://127.0.0.1:8480")
    w = HmiWatch(settings, out, screen=False, wall_ms=lambda: NOW_MS)
    w.state(doc())
    first = out.getvalue().splitlines()
    text = "\n".join(first)
    assert " status online" in text
    assert " state RUNNING since " in text
    assert " live speed_m_min 80.0 m/min [comm_fail]" in text
    assert " reel R-7 started, 100 m planned, operator A. Smith" in text
    assert " alarm beam_outage acknowledged: beam off for 1.2 s" in text
    assert " metres R-7 #0..#0: 1 in_spec" in text
    # Jitter that does not change what is shown prints nothing; new metres do.
    out.truncate(0)
    out.seek(0)
    beam = {**doc()["beam"], "current_ma": 39.81}
    points = [[0, 121.0, 105, 140, "in_spec"], [1, 100.0, 105, 140, "under_dose"]]
    w.state(doc(beam=beam, dose={"reel_id": "R-7", "points": points}))
    assert out.getvalue().splitlines() == [
        out.getvalue().splitlines()[0].split(" ")[0] + " metres R-7 #1..#1: 1 under_dose"
    ]
    out.truncate(0)
    out.seek(0)
    w.state(doc(reel=None, alarms=[], dose={"reel_id": None, "points": []}))
    text = out.getvalue()
    assert "reel R-7 off the line" in text
    assert "alarm beam_outage gone" in text
    assert "alarms none" in text
    screen = w.view.screen_lines(settings, NOW_MS)
    assert "metres    R-7: 2 seen (1 in_spec, 1 under_dose); last #1 100.0 kGy under_dose" in screen
    w.lost("connection refused")
    w.back()
    assert out.getvalue().splitlines()[-2:] == [
        out.getvalue().splitlines()[-2].split(" ")[0]
        + " http://127.0.0.1:8480 lost (connection refused); reconnecting",
        out.getvalue().splitlines()[-1].split(" ")[0] + " http://127.0.0.1:8480 back",
    ]


def test_target_and_password(tmp_path: Path) -> None:
    cfg = load_config(cli_config(tmp_path, 8480, http='host = "0.0.0.0"\n'), environ={})
    target = http_target(cfg, user="op")
    assert (target.host, target.port, target.url) == ("127.0.0.1", 8480, "http://127.0.0.1:8480")
    with pytest.raises(LocalError, match="give --user NAME"):
        http_target(cfg)
    assert http_target(cfg, sender="op-1").user == "op-1"
    cfg6 = load_config(
        cli_config(tmp_path / "b", 8443, http='host = "::1"\ntls_cert_file = "c.pem"\n'
                   'tls_key_file = "k.pem"\n'),
        environ={},
    )  # fmt: skip
    assert http_target(cfg6, user="op").url == "https://[::1]:8443"
    any6 = load_config(cli_config(tmp_path / "c", 8480, http='host = "::"\n'), environ={})
    assert http_target(any6, user="op").host == "127.0.0.1"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    asked: list[str] = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return "secret"

    assert read_password(target, None, stdin=Tty(), ask=ask) == "secret"
    assert asked == ["password of op at http://127.0.0.1:8480: "]
    with pytest.raises(LocalError, match="give --password-file FILE"):
        read_password(target, None, stdin=io.StringIO())
    pw = tmp_path / "pw"
    pw.write_text("first line\r\nsecond\n")
    assert read_password(target, pw) == "first line"
    assert read_password(target, Path("-"), stdin=io.StringIO("from stdin\n")) == "from stdin"
    with pytest.raises(LocalError, match=r"--password-file .*nope: No such file"):
        read_password(target, tmp_path / "nope")
    pw.write_text("\n")
    with pytest.raises(LocalError, match="empty password"):
        read_password(target, pw)


def test_which_way_to_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("LINECTL_"):
            monkeypatch.delenv(name)
    # Neither MQTT nor HTTP: the message says what to enable; nothing is tried.
    plain = compact_config(tmp_path / "plain")
    for args in (["status"], ["reset"], ["watch", "--duration", "1"], ["alarms"]):
        assert main([*args, "--config", str(plain)]) == 2, args
        err = capsys.readouterr().err
        assert "no way to reach the line" in err, err
        assert "[http] enabled = true" in err
        assert "[mqtt] enabled = true" in err
    # HTTP options with a broker: refused, not ignored.
    mqtt = cli_config(tmp_path / "m", 8480, mqtt=True)
    assert main(["status", "--config", str(mqtt), "--user", "op"]) == 2
    assert "--user: only for the line's HTTP API" in capsys.readouterr().err
    # Over HTTP: no user, no password (stdin is not a terminal here), bad input: exit 2
    # before anything is sent.
    http = str(cli_config(tmp_path / "h", free_port()))
    assert main(["reset", "--config", http]) == 2
    assert "give --user NAME" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    assert main(["reset", "--config", http, "--user", "op"]) == 2
    assert "give --password-file FILE" in capsys.readouterr().err
    assert main(["reel", "start", "bad id", "--length", "5", "--config", http, "--user", "op"]) == 2
    assert "reel_id 'bad id'" in capsys.readouterr().err


async def test_no_daemon_says_what_to_check(tmp_path: Path) -> None:
    port = free_port()
    cfg = str(cli_config(tmp_path, port))
    pw = password_file(tmp_path)
    for args in (["status"], ["reel", "stop"], ["watch", "--duration", "5"]):
        r = await cli(*args, "--config", cfg, "--user", "op", "--password-file", pw)
        assert r.rc == 4, (args, r)
        assert (
            f"linectl: error: cannot reach the line's HTTP API at http://127.0.0.1:{port} "
            "(connection refused): is `linectl run` going with [http] enabled?"
        ) in r.err, r
        assert "Traceback" not in r.err
        assert r.out == ""


# ---------------------------------------------------------------------- against the line


@pytest.mark.slow
async def test_status_commands_and_refusals_over_http(tmp_path: Path) -> None:
    async with hmi_line(tmp_path) as hmi:
        run = cli_for(hmi, tmp_path)
        r = await run("status")
        assert r.rc == 0, r
        assert r.out.startswith(f"line1 @ {hmi.url}: online\n"), r.out
        assert re.search(r"^state     READY since [\d:]+", r.out, re.M), r.out
        assert "reel      none" in r.out
        assert "alarms    none" in r.out
        assert re.search(r"^beam      current \S+ mA", r.out, re.M), r.out
        r = await run("status", "--json")
        assert r.rc == 0, r
        state = json.loads(r.out)
        assert state["status"]["state"] == "ready"
        assert state["line_id"] == "line1"
        r = await run("alarms")
        assert (r.rc, "no active alarms" in r.out) == (0, True), r

        # Refused by the line: the controller's reason, exit 3, as a NAK over MQTT.
        r = await run("alarms", "ack", "all")
        assert r.rc == 3, r
        assert r.out == ""
        assert r.err == "linectl: line1: NAK ack_alarm: no unacknowledged alarm (line ready)\n"
        r = await run("alarms", "ack", "all", "--json")
        assert r.rc == 3, r
        assert json.loads(r.out)["result"] == "NAK"
        # A viewer: the server's reason for the 403.
        r = await run("reset", user="view")
        assert r.rc == 3, r
        assert "NAK reset: role 'viewer' may not send reset" in r.err, r
        r = await run("reel", "start", "V1", "--length", "5", user="view")
        assert r.rc == 3, r
        assert "role 'viewer' may not send start_reel" in r.err
        # ... who may read.
        r = await run("status", user="view")
        assert r.rc == 0, r

        # A reel started and stopped through the API.
        r = await run("reel", "start", "H1", "--length", "500", "--operator", "A. Smith",
                      "--reason", "first reel")  # fmt: skip
        assert (r.rc, r.out) == (0, "line1: ACK start_reel (line ready)\n"), r
        await wait_for(lambda: hmi.svc.ctl.state is LineState.RUNNING, 30.0, "RUNNING")
        r = await run("status")
        assert r.rc == 0, r
        assert re.search(r"^reel      H1, 500 m planned, at [\d.]+ m \(\d+ %\)$", r.out, re.M), r
        r = await run("reel", "stop", "--reason", "end of test")
        assert r.rc == 0, r
        assert r.out.startswith("line1: ACK stop (line "), r
        await wait_for(lambda: hmi.svc.ctl.state is LineState.READY, 30.0, "READY")
        r = await run("reel", "start", "H2", "--length", "5")
        assert r.rc == 3, r
        assert "reel H1 is not finished" in r.err, r
        r = await run("reel", "end", "H1", "--reason", "cable cut")
        assert r.rc == 0, r
        assert "ACK end_reel" in r.out
        assert hmi.svc.ctl.reel is None

        # A wrong password: exit 2, said as such.
        r = await cli("status", "--config", run.cfg, "--user", "op", "--password-file",
                      password_file(tmp_path, "not-it"))  # fmt: skip
        assert r.rc == 2, r
        assert "linectl: error: wrong user or password" in r.err, r
        assert r.out == ""
    # Every CLI run logged out again: no session is left behind.
    assert len(hmi.server.sessions) == 0


@pytest.mark.slow
async def test_watch_over_the_live_feed(tmp_path: Path) -> None:
    async with hmi_line(tmp_path) as hmi:
        run = cli_for(hmi, tmp_path)
        watching = asyncio.create_task(run("watch", "--duration", "6"))
        await asyncio.sleep(2.5)
        # Started in-process: one CLI at a time keeps the simulated line's CPU.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            session = await login(http, hmi.url, "op")
            async with http.post(
                f"{hmi.url}/api/cmd/start_reel",
                json={"reel_id": "W1", "length_m": 500},
                headers={"X-CSRF-Token": str(session["csrf"])},
            ) as resp:
                assert resp.status == 200, await resp.text()
        r = await watching
        assert r.rc == 0, r
        assert f"watching line1 at {hmi.url}" in r.err
        assert re.search(r"^[\d:.]+ status online$", r.out, re.M), r.out
        assert re.search(r"^[\d:.]+ state READY since ", r.out, re.M), r.out
        assert re.search(r"^[\d:.]+ alarms none$", r.out, re.M), r.out
        assert re.search(r"^[\d:.]+ reel W1 started, 500 m planned, operator op$", r.out, re.M)
        assert re.search(r"^[\d:.]+ state (STARTING|RUNNING) since ", r.out, re.M), r.out
        assert re.search(r"^[\d:.]+ live speed_m_min [\d.]+ m/min$", r.out, re.M), r.out


@pytest.mark.slow
async def test_failed_logins_are_rate_limited(tmp_path: Path) -> None:
    http = HttpConfig(enabled=True, port=0, users=users(op="operator"), login_max_failures=2)
    async with hmi_line(tmp_path, http=http, ready=False) as hmi:
        cfg = str(cli_config(tmp_path, port_of(hmi.url)))
        wrong = password_file(tmp_path, "guess")
        for _ in range(2):
            r = await cli("status", "--config", cfg, "--user", "op", "--password-file", wrong)
            assert (r.rc, "wrong user or password" in r.err) == (2, True), r
        r = await cli("status", "--config", cfg, "--user", "op", "--password-file",
                      password_file(tmp_path))  # fmt: skip
        assert r.rc == 2, r
        assert re.search(r"refuses logins for now .*: try again in \d+ s", r.err), r


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "hmi.pem", tmp_path / "hmi.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.mark.slow
async def test_https_with_cafile(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    http = HttpConfig(
        enabled=True,
        port=0,
        users=users(op="operator"),
        tls_cert_file=str(cert),
        tls_key_file=str(key),
    )
    async with hmi_line(tmp_path, http=http, ready=False) as hmi:
        assert hmi.url.startswith("https://")
        tls = f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
        cfg = str(cli_config(tmp_path, port_of(hmi.url), http=tls))
        pw = password_file(tmp_path)
        r = await cli("status", "--config", cfg, "--user", "op", "--password-file", pw)
        assert r.rc == 2, r
        assert "has a certificate this client does not trust" in r.err, r
        assert "give --cafile FILE" in r.err
        r = await cli("status", "--config", cfg, "--user", "op", "--password-file", pw,
                      "--cafile", str(cert))  # fmt: skip
        assert r.rc == 0, r
        assert r.out.startswith(f"line1 @ {hmi.url}: online"), r.out
