"""`linectl run`'s wiring: the service with its metrics endpoint, MQTT bridge and Sparkplug
B edge node together, against the simulators and a real broker."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from broker import running_broker, use_broker
from e2e_scenarios import TRUE_K, compact_config, endpoints, wait_for

from linectl.config import load_config
from linectl.daemon import _keep_running, run_with_bridge
from linectl.service import LineService, ReelRequest, select_recipe
from linectl.sparkplug import sparkplug_b_pb2 as spb
from simulators.server import SimulatedLine

pytestmark = pytest.mark.slow


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5.0) as resp:
        text: str = resp.read().decode()
        return text


async def test_run_wires_metrics_mqtt_and_sparkplug(tmp_path: Path) -> None:
    cfg = load_config(compact_config(tmp_path), environ={})
    recipe, path = select_recipe(cfg, None)
    async with running_broker(tmp_path / "broker") as broker:
        use_broker(cfg, broker, sparkplug=True)
        async with SimulatedLine(cfg, seed=3, k_dose_true=TRUE_K) as sim:
            svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
            svc.on_reel_start.append(lambda _r, counter_m: sim.plant.start_reel(counter_m))
            svc.request_reel(ReelRequest("WIRED-1", 4.0, "pytest"))
            scraped: list[str] = []

            def scrape_once(s: LineService) -> None:
                if not scraped and s.metrics_url and s.records_written >= 2:
                    scraped.append("pending")  # scraped off the loop below

            svc.observers.append(scrape_once)
            json_msgs: list[tuple[str, bytes]] = []
            sp_msgs: list[tuple[str, bytes]] = []
            async with broker.client() as sub:
                await sub.subscribe("linectl/line1/#", qos=1)
                await sub.subscribe("spBv1.0/#", qos=0)

                async def collect() -> None:
                    async for msg in sub.messages:
                        t = str(msg.topic)
                        body = bytes(msg.payload)  # type: ignore[arg-type]
                        (sp_msgs if t.startswith("spBv1.0/") else json_msgs).append((t, body))

                collector = asyncio.create_task(collect())
                run = asyncio.create_task(run_with_bridge(svc, exit_when_done=True, metrics_port=0))
                deadline = asyncio.get_running_loop().time() + 90.0
                while not run.done():
                    if asyncio.get_running_loop().time() > deadline:
                        svc.stop()
                        await run
                        pytest.fail(
                            f"the 4 m reel did not finish in 90 s: {svc.ctl.state.value}, "
                            f"alarms {sorted(svc.ctl.alarms)}"
                        )
                    if scraped == ["pending"] and svc.metrics_url:
                        scraped[0] = await asyncio.to_thread(_scrape, svc.metrics_url)
                    await asyncio.sleep(0.1)
                await run
                await asyncio.sleep(0.5)
                collector.cancel()
    assert svc.finished_reels == ["WIRED-1"]
    # Prometheus: served while running, with this line's figures.
    text = scraped[0]
    assert 'linectl_up{line="line1"} 1.0' in text
    assert 'linectl_line_state{line="line1",state="running"} 1.0' in text
    assert "linectl_mqtt_connected" in text
    # MQTT: every metre as a record, and the status online then offline.
    metres = [
        m
        for t, b in json_msgs
        if t == "linectl/line1/records/metres"
        for m in json.loads(b).get("metres", [])
    ]
    assert sorted(m["index"] for m in metres) == [0, 1, 2, 3]
    statuses = [json.loads(b)["status"] for t, b in json_msgs if t == "linectl/line1/status"]
    assert statuses[0] == "online"
    assert statuses[-1] == "offline"
    # Sparkplug: NBIRTH first, then device births and data; NDEATH at the clean exit.
    kinds = [t.split("/")[2] for t, _ in sp_msgs]
    assert kinds[0] == "NBIRTH"
    assert "DBIRTH" in kinds
    assert "DDATA" in kinds
    assert kinds[-1] == "NDEATH"
    birth = spb.Payload()
    birth.ParseFromString(sp_msgs[0][1])
    death = spb.Payload()
    death.ParseFromString(sp_msgs[-1][1])
    bdseq = {m.name: m.long_value for m in birth.metrics if m.name == "bdSeq"}
    assert bdseq == {m.name: m.long_value for m in death.metrics if m.name == "bdSeq"}


async def test_the_metrics_endpoint_is_served_on_the_daemons_loop_by_no_thread(
    tmp_path: Path,
) -> None:
    # The endpoint was a thread of its own (`linectl-metrics`) with its own asyncio loop;
    # it is an aiohttp server on the daemon's loop now, started and stopped with the line.
    cfg = load_config(compact_config(tmp_path), environ={})
    off = {"enabled": False}
    cfg.line = cfg.line.model_copy(
        update={
            "mqtt": cfg.line.mqtt.model_copy(update=off),
            "sparkplug": cfg.line.sparkplug.model_copy(update=off),
        }
    )
    recipe, path = select_recipe(cfg, None)
    async with SimulatedLine(cfg, seed=3) as sim:
        svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
        run = asyncio.create_task(run_with_bridge(svc, exit_when_done=False, metrics_port=0))
        try:
            await wait_for(
                lambda: svc.metrics_url is not None and svc.stats.cycles >= 5, 60.0, "cycles"
            )
            url = svc.metrics_url
            assert url is not None
            async with aiohttp.ClientSession() as http:
                texts = []
                for _ in range(3):
                    async with http.get(url) as r:
                        assert r.status == 200
                        texts.append(await r.text())
                    await asyncio.sleep(0.2)
            # (pytest-timeout's own watcher thread is named after this test.)
            threads = sorted(
                t.name for t in threading.enumerate() if not t.name.startswith("pytest_timeout")
            )
        finally:
            svc.stop()
            await asyncio.wait_for(run, 60.0)
    assert "linectl-metrics" not in threads
    assert not [name for name in threads if "metrics" in name], threads
    assert all('linectl_up{line="line1"} 1.0' in text for text in texts)
    # Stopped with the line: the port is closed.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(url)


class _FlakyAdapter:
    """Ends on its own twice (a stray cancellation, then an exception), then runs until
    stopped, as an adapter hit by the 3.11 quirks of linectl.aio would."""

    def __init__(self) -> None:
        self.runs = 0
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs == 1:
            raise asyncio.CancelledError
        if self.runs == 2:
            raise RuntimeError("session bug")
        await self.stopped.wait()


async def test_an_adapter_that_ends_on_its_own_is_started_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda _s: real_sleep(0))  # no 1 s back-off here
    adapter, stopping = _FlakyAdapter(), asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="linectl"):
        task = asyncio.create_task(_keep_running(adapter, "MQTT bridge", stopping))
        for _ in range(200):
            if adapter.runs == 3:
                break
            await real_sleep(0.005)
        assert adapter.runs == 3
        assert not task.done()
        stopping.set()
        adapter.stopped.set()
        await asyncio.wait_for(task, 2.0)
    assert "MQTT bridge ended with a stray cancellation" in caplog.text
    assert "MQTT bridge failed" in caplog.text
    assert caplog.text.count("stopped on its own while the line runs") == 2


async def test_keep_running_stops_when_cancelled() -> None:
    adapter, stopping = _FlakyAdapter(), asyncio.Event()
    adapter.runs = 2  # the next run waits until stopped
    task = asyncio.create_task(_keep_running(adapter, "MQTT bridge", stopping))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.wait({task}, timeout=2.0)
    assert task.cancelled()
    assert adapter.runs == 3
