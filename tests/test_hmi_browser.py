"""The HMI in a real browser: Debian's Chromium driven by Playwright, against the daemon's
HMI server on the simulated line (docs/hmi.md). The feed is cut and restored by a TCP
relay between the browser and the server, as a network cut would.

Chromium is found at /usr/bin/chromium (.ci/run installs Debian's package). Without it
these tests are skipped, unless CI_REQUIRE_BROWSER=1 (set by .ci/run): then a missing
browser fails the run instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_scenarios import wait_for
from hmi_support import PASSWORD, HmiLine, TcpProxy, hmi_line, until

from linectl.core.control import LineState

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "hmi.png"

if not Path(CHROMIUM).exists():
    if os.environ.get("CI_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"CI_REQUIRE_BROWSER=1 but there is no Chromium at {CHROMIUM}")
    pytest.skip("no Chromium (apt-get install chromium)", allow_module_level=True)

async_playwright = pytest.importorskip("playwright.async_api").async_playwright

# A browser's start holds both cores of a CI host for a moment: .ci/run runs these tests
# on their own, after the rest (see the marker in pyproject.toml).
pytestmark = [pytest.mark.slow, pytest.mark.browser]


@dataclass
class Ui:
    hmi: HmiLine
    proxy: TcpProxy
    url: str
    page: Any


@pytest.fixture
async def ui(tmp_path: Path) -> AsyncIterator[Ui]:
    async with hmi_line(tmp_path, patient_links=True) as hmi, async_playwright() as pw:
        proxy = TcpProxy("127.0.0.1", int(hmi.url.rsplit(":", 1)[1]))
        url = await proxy.start()
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        try:
            context = await browser.new_context(viewport={"width": 1600, "height": 1000})
            page = await context.new_page()
            yield Ui(hmi, proxy, url, page)
        finally:
            await browser.close()
            await proxy.stop()


async def log_in(ui: Ui, user: str, password: str = PASSWORD) -> None:
    page = ui.page
    await page.goto(ui.url + "/")
    await page.fill("#login-user", user)
    await page.fill("#login-password", password)
    await page.click("#login-submit")


async def text(page: Any, selector: str) -> str:
    return str(await page.locator(selector).inner_text()).strip()


async def confirm(page: Any) -> None:
    await page.locator("#confirm-dialog").wait_for(state="visible", timeout=5000)
    await page.click("#confirm-yes")


async def result(page: Any, start: str, timeout_s: float = 10.0) -> str:
    await until(
        page,
        f"document.getElementById('cmd-result').innerText.startsWith({start!r})",
        timeout_s,
        f"command result {start}",
    )
    return await text(page, "#cmd-result")


async def test_login_with_a_wrong_password_then_the_right_one(ui: Ui) -> None:
    page = ui.page
    await log_in(ui, "op", "not-the-password")
    await until(
        page,
        "document.getElementById('login-error').innerText.includes('wrong user or password')",
        10.0,
        "login error shown",
    )
    assert await page.locator("#hmi-view").is_hidden()
    await page.fill("#login-password", PASSWORD)
    await page.click("#login-submit")
    await until(page, "window.hmi && window.hmi.seq !== null && !window.hmi.stale", 10.0, "live")
    assert await text(page, "#line-state") == "READY"
    assert await text(page, "#beam-indicator") == "BEAM OFF"
    assert await text(page, "#session-user") == "op"


async def test_a_viewer_who_forces_a_command_is_refused_by_the_server(ui: Ui) -> None:
    page = ui.page
    await log_in(ui, "view")
    await until(page, "window.hmi && !window.hmi.stale", 10.0, "live")
    assert await page.locator("#cmd-reset").is_disabled()
    # The page greys the button out and would not send it; a viewer who sends the
    # request anyway, from the page with its session and CSRF token, is refused by the
    # server, which is what protects the line.
    answer = await page.evaluate(
        """async () => {
            const session = await (await fetch('/api/session')).json();
            const r = await fetch('/api/cmd/reset', {
                method: 'POST',
                headers: {'Content-Type': 'application/json', 'X-CSRF-Token': session.csrf},
                body: '{}',
            });
            return {status: r.status, body: await r.json()};
        }"""
    )
    assert answer["status"] == 403
    assert answer["body"]["result"] == "NAK"
    assert answer["body"]["reason"] == "role 'viewer' may not send reset"
    assert ui.hmi.svc.ctl.state is LineState.READY


async def test_start_a_reel_see_the_dose_chart_fill_and_stop_with_confirmation(
    ui: Ui, tmp_path: Path
) -> None:
    page = ui.page
    await log_in(ui, "op")
    await until(page, "window.hmi && !window.hmi.stale", 10.0, "live")
    await page.click("#cmd-start")
    await page.fill("#start-reel-id", "B1")
    await page.fill("#start-length", "400")
    await page.click("#start-submit")
    await page.locator("#confirm-dialog").wait_for(state="visible", timeout=5000)
    assert "B1" in await text(page, "#confirm-text")
    assert ui.hmi.svc.ctl.reel is None  # nothing is sent before the confirmation
    await page.click("#confirm-yes")
    assert await result(page, "ACK") == "ACK start_reel"
    await until(page, "window.hmi.doseChartPoints() >= 10", 60.0, "dose chart fills")
    assert await text(page, "#line-state") == "RUNNING"
    assert await text(page, "#beam-indicator") == "BEAM ON"
    await until(
        page,
        "window.hmi.trendChartPoints() >= 4",
        10.0,
        "trend chart fills",
    )
    # The picture in docs/hmi.md: taken on every run, written into docs/ on request
    # (UPDATE_DOCS_SCREENSHOT=1), so that a test run leaves the source tree as it was.
    shot = await page.screenshot(path=str(tmp_path / "hmi.png"))
    assert shot.startswith(b"\x89PNG")
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        SCREENSHOT.write_bytes(shot)
    # Stop: the dialog first, and cancelling it sends nothing.
    await page.click("#cmd-stop")
    await page.locator("#confirm-dialog").wait_for(state="visible", timeout=5000)
    await page.click("#confirm-no")
    await asyncio.sleep(0.5)
    assert ui.hmi.svc.ctl.state is LineState.RUNNING
    await page.click("#cmd-stop")
    await confirm(page)
    assert await result(page, "ACK") == "ACK stop"
    await until(
        page,
        "['IDLE', 'READY'].includes(document.getElementById('line-state').innerText.trim())",
        30.0,
        "line stopped",
    )
    assert await text(page, "#beam-indicator") == "BEAM OFF"
    # The reel list, and the reel's report as a page with its plot.
    await page.click("#link-reels")
    row = page.locator("tr[data-reel='B1']")
    await row.wait_for(timeout=10000)
    await row.locator("a").first.click()
    await until(page, "window.reelPage && window.reelPage.chartPoints() >= 10", 10.0, "reel plot")
    assert "B1" in await text(page, "#reel-title")


async def raise_alarm(ui: Ui) -> str:
    """A latched accelerator fault (vacuum): the alarm's kind, once the line holds it."""
    ui.hmi.sim.faults.latch("accelerator", 2)
    await wait_for(lambda: bool(ui.hmi.svc.alarm_board()), 10.0, "alarm raised")
    return ui.hmi.svc.alarm_board()[0].kind


async def test_acknowledge_and_shelve_an_alarm(ui: Ui) -> None:
    page = ui.page
    await log_in(ui, "op")
    await until(page, "window.hmi && !window.hmi.stale", 10.0, "live")
    kind = await raise_alarm(ui)
    row = page.locator(f"li.alarm[data-alarm='{kind}']")
    await row.wait_for(timeout=5000)
    assert await row.get_attribute("data-state") == "unack"
    await row.locator(".btn-ack").click()
    await confirm(page)
    assert (await result(page, "ACK")).startswith("ACK ack_alarm")
    await until(
        page,
        f"document.querySelector(\"li.alarm[data-alarm='{kind}']\").dataset.state === 'acked'",
        5.0,
        "acked",
    )
    await row.locator(".btn-shelve").click()
    await page.locator("#shelve-dialog").wait_for(state="visible", timeout=5000)
    await page.select_option("#shelve-duration", "30")
    await page.fill("#shelve-reason", "vacuum gauge under maintenance")
    await page.click("#shelve-submit")
    await confirm(page)
    assert (await result(page, "ACK")).startswith("ACK shelve_alarm")
    await until(
        page,
        f"document.querySelector(\"li.alarm[data-alarm='{kind}']\").dataset.state === 'shelved'",
        5.0,
        "shelved",
    )
    shown = await row.inner_text()
    assert "vacuum gauge under maintenance" in shown
    board = ui.hmi.svc.alarm_board()
    assert board[0].state == "shelved"
    assert board[0].shelved_by == "op"
    # Shelving hides nothing from the interlocks: the line is still held.
    assert ui.hmi.svc.ctl.state is LineState.FAULT


async def test_a_cut_feed_shows_stale_within_2_s_and_converges_after(ui: Ui) -> None:
    page = ui.page
    await log_in(ui, "op")
    await until(page, "window.hmi && !window.hmi.stale", 10.0, "live")
    assert await page.locator("#cmd-reset").is_enabled()
    loop = asyncio.get_running_loop()
    ui.proxy.cut()
    cut_at = loop.time()
    await until(
        page,
        "!document.getElementById('stale-overlay').hidden && window.hmi.stale",
        2.0,
        "stale overlay",
    )
    shown_after_s = loop.time() - cut_at
    assert shown_after_s < 2.0
    assert await page.locator("#cmd-reset").is_disabled()
    assert await page.locator("#cmd-start").is_disabled()
    # An alarm raised while the page cannot hear the line.
    kind = await raise_alarm(ui)
    await wait_for(lambda: ui.hmi.svc.ctl.state is LineState.FAULT, 10.0, "FAULT")
    await asyncio.sleep(1.0)
    assert await page.locator(f"li.alarm[data-alarm='{kind}']").count() == 0
    assert await text(page, "#line-state") == "READY"  # stale, and the overlay says so
    ui.proxy.restore()
    await until(page, "!window.hmi.stale", 10.0, "live again")
    assert await page.locator("#stale-overlay").is_hidden()
    assert await text(page, "#line-state") == "FAULT"
    row = page.locator(f"li.alarm[data-alarm='{kind}']")
    assert await row.count() == 1
    assert await row.get_attribute("data-state") == "unack"
    assert await page.locator("#cmd-reset").is_enabled()


async def test_a_gap_in_the_feed_makes_the_page_ask_for_a_snapshot(ui: Ui) -> None:
    page = ui.page
    await log_in(ui, "op")
    await until(page, "window.hmi && !window.hmi.stale", 10.0, "live")
    (client,) = ui.hmi.server.clients
    # As if a delta had been lost on the way: the next one starts from a state the page
    # never had.
    client.view.seq -= 1
    ui.hmi.server.feed.add_trend(2**50, 1.0, 2.0)  # something to send
    await wait_for(lambda: ui.hmi.server.resyncs == 1, 5.0, "the page's resync")
    await until(
        page,
        f"window.hmi.seq >= {ui.hmi.server.feed.seq} && !window.hmi.stale",
        5.0,
        "the page back on the feed",
    )
    assert await text(page, "#line-state") == "READY"
