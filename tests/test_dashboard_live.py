"""The Grafana dashboard's queries and the alert rules in a real Prometheus, scraping a
real controller that runs a reel on the simulated line.

Grafana itself cannot run here (it is neither in Debian nor on PyPI, and no image
registry is reachable), so this is the check nearest to it: the data side of every
panel. Prometheus (Debian's package, the one that brings promtool) runs the shipped
deploy/prometheus/prometheus.yml with only its target and intervals changed, and the
shipped alert rules. Each panel's query is sent as Grafana would send it (its variables
replaced as Grafana replaces them) and must come back without error and with data; the
dashboard's `line` variable must list the line; every alert rule must evaluate without
error. tests/test_deploy.py holds the static checks of the same files.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import running_broker, use_broker
from conftest import free_port
from e2e_scenarios import TRUE_K, compact_config, endpoints, wait_for

from linectl.config import load_config
from linectl.core.control import LineState
from linectl.daemon import run_with_bridge
from linectl.service import LineService, ReelRequest, select_recipe
from simulators.server import SimulatedLine

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "linectl.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS_YML = ROOT / "deploy" / "prometheus" / "alerts.yml"

SCRAPE_S = 1  # the test's scrape and rule interval (5 s in the shipped file)
STEP_S = 1  # the query step, Grafana's $__interval here


def _rate_interval_s() -> int:
    # Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval).
    return max(STEP_S + SCRAPE_S, 4 * SCRAPE_S)


def _grafana_expr(expr: str, line_value: str, range_s: int) -> str:
    """A panel's query as Grafana sends it: `$line` is the variable's regex (its
    allValue `.*` for All, the line id otherwise), the range macros in seconds."""
    return (
        expr.replace("$__rate_interval", f"{_rate_interval_s()}s")
        .replace("$__range", f"{range_s}s")
        .replace("$__interval", f"{STEP_S}s")
        .replace("$line", line_value)
    )


def _targets(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, query) of every panel, rows' nested panels included."""
    for panel in dash["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for target in p.get("targets", []):
                yield p["title"], target["expr"]


def _get(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10.0) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def _prometheus_config(tmp: Path, metrics_port: int) -> Path:
    """The shipped prometheus.yml, scraping 127.0.0.1:<port> every SCRAPE_S."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to edit prometheus.yml")
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    cfg["global"]["scrape_interval"] = f"{SCRAPE_S}s"
    cfg["global"]["evaluation_interval"] = f"{SCRAPE_S}s"
    (job,) = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    # rule_files are relative to the config file: the shipped alerts.yml beside it.
    shutil.copy(ALERTS_YML, tmp / "alerts.yml")
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


class _Prometheus:
    """Debian's prometheus on a free loopback port, its storage in tmp."""

    def __init__(self, binary: str, config: Path, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "prometheus.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text(errors="replace")[-2000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def target_up(self) -> bool:
        targets = _get(self.url, "/api/v1/targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


async def _poll(cond: Any, timeout_s: float, what: str) -> None:
    """Like wait_for, for a condition that blocks (HTTP): off the event loop."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(cond):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def _rules(base: str) -> list[dict[str, Any]]:
    return [r for g in _get(base, "/api/v1/rules")["groups"] for r in g["rules"]]


def _firing(base: str) -> set[str]:
    return {r["name"] for r in _rules(base) if r.get("state") == "firing"}


def _all_rules_evaluated(base: str) -> bool:
    return all(not r["lastEvaluation"].startswith("0001-") for r in _rules(base))


async def test_dashboard_queries_return_data_from_a_running_line(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus server is not installed (Debian's prometheus package)")
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    cfg = load_config(compact_config(tmp_path), environ={})
    recipe, path = select_recipe(cfg, None)
    line_id = cfg.line.line_id

    async with running_broker(tmp_path / "broker") as broker:
        use_broker(cfg, broker)
        async with SimulatedLine(cfg, seed=11, k_dose_true=TRUE_K) as sim:
            svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
            svc.on_reel_start.append(lambda _r, counter_m: sim.plant.start_reel(counter_m))
            alarm_kinds: list[str] = []
            svc.on_alarm.append(lambda alarm: alarm_kinds.append(alarm.kind))
            verdicts: set[str] = set()
            svc.on_metres.append(lambda _r, batch: verdicts.update(m.verdict.value for m in batch))
            # Long enough never to end inside the test: it is stopped below.
            svc.request_reel(ReelRequest("DASH-1", 2000.0, "pytest"))
            run = asyncio.create_task(run_with_bridge(svc, exit_when_done=False, metrics_port=0))
            prom: _Prometheus | None = None
            try:
                await wait_for(
                    lambda: svc.ctl.state is LineState.RUNNING and svc.records_written >= 1,
                    90.0,
                    "the line running with a metre recorded",
                )
                assert svc.metrics_url is not None
                metrics_port = urllib.parse.urlsplit(svc.metrics_url).port
                assert metrics_port is not None
                config = _prometheus_config(tmp_path, metrics_port)
                prom = _Prometheus(binary, config, tmp_path)
                await _poll(prom.ready, 30.0, "prometheus ready")
                await _poll(prom.target_up, 30.0, "the controller's target up")
                t_start = time.time()
                # Enough scrapes for every rate window, then a latched high-voltage fault:
                # an interlock trip (the trips-by-kind panel has data) and a line in FAULT.
                await asyncio.sleep(4 * _rate_interval_s())
                sim.faults.latch("accelerator", 2)
                await wait_for(
                    lambda: svc.ctl.state is LineState.FAULT and bool(alarm_kinds),
                    30.0,
                    "the line in FAULT with its alarm raised",
                )
                await asyncio.sleep(2 * _rate_interval_s())
                url = prom.url
                await _poll(
                    lambda: (
                        _all_rules_evaluated(url)
                        and {"LinectlLineFault", "LinectlInterlockTrip"} <= _firing(url)
                    ),
                    30.0,
                    "every rule evaluated, LinectlLineFault and LinectlInterlockTrip firing",
                )
                t_end = time.time()

                range_s = math.ceil(t_end - t_start)
                failures: list[str] = []
                answered = 0
                for title, expr in _targets(dash):
                    for line_value in (".*", re.escape(line_id)):
                        query = _grafana_expr(expr, line_value, range_s)
                        data = await asyncio.to_thread(
                            _get,
                            prom.url,
                            "/api/v1/query_range",
                            query=query,
                            start=f"{t_start:.3f}",
                            end=f"{t_end:.3f}",
                            step=f"{STEP_S}s",
                        )
                        values = [
                            float(v)
                            for series in data["result"]
                            for _t, v in series["values"]
                            if math.isfinite(float(v))
                        ]
                        answered += 1
                        if not values:
                            failures.append(f"{title}: no data for {query}")
                assert not failures, "\n".join(failures)
                assert answered == 2 * len(list(_targets(dash)))

                # The `line` variable (label_values(linectl_up, line)) lists this line.
                (var,) = dash["templating"]["list"]
                call = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
                assert call is not None, var["query"]
                metric, label = call.groups()
                values = _get(prom.url, f"/api/v1/label/{label}/values", **{"match[]": metric})
                assert values == [line_id]

                # Every shipped alert rule is loaded and evaluates without error.
                yaml = pytest.importorskip("yaml")
                shipped = yaml.safe_load(ALERTS_YML.read_text(encoding="utf-8"))
                n_rules = sum(len(g["rules"]) for g in shipped["groups"])
                rules = _rules(prom.url)
                assert len(rules) == n_rules
                bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
                assert not bad, bad
                # The fault fires its two alerts (the first trip of its kinds, with no
                # history before this test); nothing else is wrong with the line but what
                # the fault did to the metres under the beam at that moment.
                firing = _firing(prom.url)
                assert {"LinectlLineFault", "LinectlInterlockTrip"} <= firing, firing
                expected = {"LinectlLineFault", "LinectlInterlockTrip"}
                if verdicts - {"in_spec"}:
                    expected.add("LinectlOutOfSpecMetres")
                if svc.stats.missed:
                    # A loaded host (CI: two test workers and Prometheus on 2 cores)
                    # can make the loop skip a cycle: the alert is then right to fire.
                    expected.add("LinectlControlCyclesMissed")
                assert firing <= expected, (firing, verdicts)
            finally:
                if prom is not None:
                    prom.close()
                svc.stop()
                await run
