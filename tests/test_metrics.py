"""Prometheus metrics: unit tests on a fake service, the HTTP endpoint (served by aiohttp
on the test's event loop, as on the daemon's), a real-time run of the line service against
the simulators, and the shipped alert rules.

promtool (Debian's `prometheus` package) checks the scraped exposition and the rules when
it is on PATH; the parser checks below run without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ROOT
from e2e_scenarios import compact_config, endpoints, wait_for
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from linectl.config import LoadedConfig, MetricsConfig, RegisterField, load_config
from linectl.core.control import ALARM_KINDS, Alarm, LineState, Outputs
from linectl.core.ledger import MetreRecord, Verdict
from linectl.errors import ConfigError, LocalError
from linectl.metrics import (
    LINK_ERROR_KINDS,
    METRE_CAUSES,
    MODBUS_FUNCTIONS,
    PROCESS_VALUES,
    LineMetrics,
    WithoutCreated,
    verdict_label,
)
from linectl.modbus.link import LinkStats
from linectl.service import CycleStats, LineService, ReelRequest, select_recipe
from linectl.web.server import (
    METRICS_LIMITS,
    RENDER_REUSE_S,
    MetricsServer,
    serve_metrics,
)
from simulators.server import SimulatedLine

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DOCS = ROOT / "docs" / "metrics.md"
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool not on PATH (apt-get install --no-install-recommends prometheus)"
LINE = "line1"

# The fixed metric names (the Grafana dashboard and the alert rules use them): family
# name as the text parser reports it -> (type, unit, label names besides `line`).
FAMILIES: dict[str, tuple[str, str, frozenset[str]]] = {
    "linectl_up": ("gauge", "", frozenset()),
    "linectl_line_state": ("gauge", "", frozenset({"state"})),
    "linectl_beam_current_amperes": ("gauge", "amperes", frozenset()),
    "linectl_beam_energy_electronvolts": ("gauge", "electronvolts", frozenset()),
    "linectl_scan_width_metres": ("gauge", "metres", frozenset()),
    "linectl_vacuum_pascals": ("gauge", "pascals", frozenset()),
    "linectl_line_speed_metres_per_second": ("gauge", "metres_per_second", frozenset()),
    "linectl_cable_tension_newtons": ("gauge", "newtons", frozenset()),
    "linectl_beam_current_setpoint_amperes": ("gauge", "amperes", frozenset()),
    "linectl_line_speed_setpoint_metres_per_second": (
        "gauge",
        "metres_per_second",
        frozenset(),
    ),
    "linectl_reel_position_metres": ("gauge", "metres", frozenset()),
    "linectl_metres": ("counter", "metres", frozenset({"verdict"})),
    "linectl_metres_out_of_spec": ("counter", "", frozenset({"cause"})),
    "linectl_interlock_trips": ("counter", "", frozenset({"kind"})),
    "linectl_alarms_active": ("gauge", "", frozenset()),
    "linectl_control_cycle_duration_seconds": ("histogram", "seconds", frozenset({"le"})),
    "linectl_control_cycle_lateness_seconds": ("histogram", "seconds", frozenset({"le"})),
    "linectl_control_cycles_missed": ("counter", "", frozenset()),
    "linectl_control_stalls": ("counter", "", frozenset()),
    "linectl_modbus_request_duration_seconds": (
        "histogram",
        "seconds",
        frozenset({"plc", "function", "le"}),
    ),
    "linectl_modbus_errors": ("counter", "", frozenset({"plc", "kind"})),
    "linectl_modbus_reconnects": ("counter", "", frozenset({"plc"})),
    "linectl_modbus_connected": ("gauge", "", frozenset({"plc"})),
    "linectl_metrics_errors": ("counter", "", frozenset()),
}
MQTT_FAMILIES: dict[str, tuple[str, str, frozenset[str]]] = {
    "linectl_mqtt_connected": ("gauge", "", frozenset()),
    "linectl_mqtt_queue_depth": ("gauge", "", frozenset()),
    "linectl_mqtt_dropped": ("counter", "", frozenset()),
    "linectl_mqtt_replay_backlog": ("gauge", "", frozenset()),
    "linectl_mqtt_published": ("counter", "", frozenset()),
}


# ----------------------------------------------------------------------------- fakes


@dataclass
class FakeSnapshot:
    values: dict[str, float | int | None]

    def value(self, name: str) -> float | int | None:
        return self.values[name]


@dataclass
class FakeController:
    state: LineState = LineState.OFFLINE
    alarms: dict[str, Alarm] = field(default_factory=dict)
    outputs: Outputs = field(default_factory=Outputs)


@dataclass
class FakeLedger:
    position_m: float | None


@dataclass(frozen=True)
class FakeReport:
    state: LineState
    outputs: Outputs
    position_m: float | None
    active_alarms: tuple[str, ...]


@dataclass
class FakeLink:
    name: str
    connected: bool = False
    stats: LinkStats = field(default_factory=LinkStats)


@dataclass
class FakeMqtt:
    connected: bool = True
    queue_depth: int = 0
    dropped_total: int = 0
    replay_backlog: int = 0
    published_total: int = 0


class FakeService:
    """Just what LineMetrics reads, with the service's real CycleStats and LinkStats."""

    def __init__(self, cfg: LoadedConfig) -> None:
        self.line_id = cfg.line.line_id
        self.cfg = cfg
        self.ctl = FakeController()
        self.ledger: FakeLedger | None = None
        self.stats = CycleStats()
        self.acc = FakeLink("accelerator")
        self.cnv = FakeLink("conveyor")
        self.last_acc: FakeSnapshot | None = None
        self.last_cnv: FakeSnapshot | None = None
        self.observers: list[Any] = []
        self.on_metres: list[Any] = []
        self.on_alarm: list[Any] = []

    @property
    def report(self) -> FakeReport:
        """The cycle's report, as the service's CycleReport carries it."""
        position = None if self.ledger is None else self.ledger.position_m
        return FakeReport(self.ctl.state, self.ctl.outputs, position, tuple(self.ctl.alarms))

    def cycle(self) -> None:
        for observer in self.observers:
            observer(self)


@pytest.fixture
def svc(cfg: LoadedConfig) -> FakeService:
    return FakeService(cfg)


@pytest.fixture
def metrics(svc: FakeService) -> LineMetrics:
    m = LineMetrics(svc.line_id)
    m.attach(svc)
    return m


def value(m: LineMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, {"line": LINE, **labels})


def acc_values(**over: float | None) -> dict[str, float | int | None]:
    v: dict[str, float | int | None] = {
        "beam_current": 12.5,
        "energy": 1.2,
        "scan_width": 100.0,
        "vacuum": 2e-4,
    }
    v.update(over)
    return v


def cnv_values(**over: float | None) -> dict[str, float | int | None]:
    v: dict[str, float | int | None] = {"speed": 90.0, "tension": 55.0}
    v.update(over)
    return v


# ----------------------------------------------------------------------------- unit


def test_process_values_in_base_units(svc: FakeService, metrics: LineMetrics) -> None:
    svc.last_acc = FakeSnapshot(acc_values())
    svc.last_cnv = FakeSnapshot(cnv_values())
    svc.cycle()
    # The shipped maps declare mA, MeV, cm, Pa, m/min and N.
    assert value(metrics, "linectl_beam_current_amperes") == pytest.approx(0.0125)
    assert value(metrics, "linectl_beam_energy_electronvolts") == pytest.approx(1.2e6)
    assert value(metrics, "linectl_scan_width_metres") == pytest.approx(1.0)
    assert value(metrics, "linectl_vacuum_pascals") == pytest.approx(2e-4)
    assert value(metrics, "linectl_line_speed_metres_per_second") == pytest.approx(1.5)
    assert value(metrics, "linectl_cable_tension_newtons") == pytest.approx(55.0)


def test_unknown_values_are_nan(svc: FakeService, metrics: LineMetrics) -> None:
    for p in PROCESS_VALUES:  # before any poll
        assert math.isnan(value(metrics, p.metric) or 0.0), p.metric
    svc.last_acc = FakeSnapshot(acc_values())
    svc.last_cnv = FakeSnapshot(cnv_values())
    svc.cycle()
    svc.last_acc = FakeSnapshot(acc_values(energy=None))  # COMM_FAIL
    svc.cycle()
    assert math.isnan(value(metrics, "linectl_beam_energy_electronvolts") or 0.0)
    assert value(metrics, "linectl_beam_current_amperes") == pytest.approx(0.0125)


def test_line_state_is_one_hot(svc: FakeService, metrics: LineMetrics) -> None:
    for state in (LineState.IDLE, LineState.RUNNING, LineState.FAULT, LineState.READY):
        svc.ctl.state = state
        svc.cycle()
        got = {s.value: value(metrics, "linectl_line_state", state=s.value) for s in LineState}
        assert got == {s.value: (1.0 if s is state else 0.0) for s in LineState}


def test_setpoints_position_and_alarms(svc: FakeService, metrics: LineMetrics) -> None:
    assert math.isnan(value(metrics, "linectl_reel_position_metres") or 0.0)
    svc.ctl.outputs = Outputs(beam_current_sp_ma=20.0, speed_sp_m_min=90.0)
    svc.ledger = FakeLedger(12.25)
    svc.ctl.alarms = {
        "estop": Alarm("estop", "e-stop", 1.0),
        "cable_break": Alarm("cable_break", "break", 1.0),
    }
    svc.cycle()
    assert value(metrics, "linectl_beam_current_setpoint_amperes") == pytest.approx(0.02)
    assert value(metrics, "linectl_line_speed_setpoint_metres_per_second") == pytest.approx(1.5)
    assert value(metrics, "linectl_reel_position_metres") == 12.25
    assert value(metrics, "linectl_alarms_active") == 2
    svc.ledger = None
    svc.ctl.alarms = {}
    svc.cycle()
    assert math.isnan(value(metrics, "linectl_reel_position_metres") or 0.0)
    assert value(metrics, "linectl_alarms_active") == 0


def test_cycle_histograms_observe_only_new_samples(svc: FakeService, metrics: LineMetrics) -> None:
    name = "linectl_control_cycle_duration_seconds"
    for d in (0.004, 0.006, 0.030):
        svc.stats.record(d, 0.001)
    svc.cycle()
    assert value(metrics, f"{name}_count") == 3
    assert value(metrics, f"{name}_sum") == pytest.approx(0.040)
    svc.cycle()  # nothing new
    assert value(metrics, f"{name}_count") == 3
    svc.stats.record(0.07, 0.02)
    svc.cycle()
    assert value(metrics, f"{name}_count") == 4
    assert value(metrics, f"{name}_bucket", le="0.05") == 3
    assert value(metrics, "linectl_control_cycle_lateness_seconds_bucket", le="0.002") == 3
    assert value(metrics, "linectl_control_cycle_lateness_seconds_count") == 4
    # More cycles than the stats keep: only the kept samples can be observed.
    svc.stats.keep = 2
    for _ in range(5):
        svc.stats.record(0.01, 0.0)
    svc.cycle()
    assert value(metrics, f"{name}_count") == 6


def test_missed_cycles_and_link_counters_advance_by_difference(
    svc: FakeService, metrics: LineMetrics
) -> None:
    svc.stats.missed = 2
    svc.stats.stalls = 1
    svc.acc.stats.errors["timeout"] = 3
    svc.cnv.stats.reconnects = 1
    svc.acc.connected = True
    svc.cycle()
    svc.cycle()
    assert value(metrics, "linectl_control_cycles_missed_total") == 2
    assert value(metrics, "linectl_control_stalls_total") == 1
    assert value(metrics, "linectl_modbus_errors_total", plc="accelerator", kind="timeout") == 3
    assert value(metrics, "linectl_modbus_reconnects_total", plc="conveyor") == 1
    svc.stats.missed = 5
    svc.stats.stalls = 3
    svc.acc.stats.errors["timeout"] = 4
    svc.acc.stats.errors["protocol"] = 1
    svc.acc.connected = False
    svc.cycle()
    assert value(metrics, "linectl_control_cycles_missed_total") == 5
    assert value(metrics, "linectl_control_stalls_total") == 3
    assert value(metrics, "linectl_modbus_errors_total", plc="accelerator", kind="timeout") == 4
    assert value(metrics, "linectl_modbus_errors_total", plc="accelerator", kind="protocol") == 1
    assert value(metrics, "linectl_modbus_connected", plc="accelerator") == 0
    for plc in ("accelerator", "conveyor"):  # every kind exists from the start
        for kind in LINK_ERROR_KINDS:
            assert value(metrics, "linectl_modbus_errors_total", plc=plc, kind=kind) is not None


def test_modbus_latency_per_plc_and_function(svc: FakeService, metrics: LineMetrics) -> None:
    name = "linectl_modbus_request_duration_seconds"
    svc.acc.stats.record_latency(4, 0.0015)
    svc.acc.stats.record_latency(4, 0.004)
    svc.acc.stats.record_latency(16, 0.002)
    svc.cnv.stats.record_latency(3, 0.03)
    svc.cnv.stats.record_latency(23, 0.001)  # a function the links do not use today
    acc_in = {"plc": "accelerator", "function": "read_input_registers"}
    assert value(metrics, f"{name}_count", **acc_in) == 2
    assert value(metrics, f"{name}_sum", **acc_in) == pytest.approx(0.0055)
    assert value(metrics, f"{name}_bucket", le="0.002", **acc_in) == 1
    assert value(metrics, f"{name}_count", plc="accelerator", function="write_registers") == 1
    assert value(metrics, f"{name}_count", plc="conveyor", function="read_holding_registers") == 1
    assert value(metrics, f"{name}_count", plc="conveyor", function="fc23") == 1
    assert value(metrics, f"{name}_count", plc="conveyor", function="write_register") == 0
    assert set(MODBUS_FUNCTIONS.values()) == {
        "read_holding_registers",
        "read_input_registers",
        "write_registers",
        "write_register",
    }


def test_metres_by_verdict_and_cause(svc: FakeService, metrics: LineMetrics) -> None:
    records = [
        MetreRecord(0, 120.0, 118.0, 122.0, Verdict.IN_SPEC),
        # In spec across a data gap: the cause is no out-of-spec cause.
        MetreRecord(1, 120.0, 118.0, 122.0, Verdict.IN_SPEC, ("gap",)),
        MetreRecord(2, 100.0, 90.0, 110.0, Verdict.UNDER_DOSE, ("under_dose",)),
        MetreRecord(3, 150.0, 140.0, 160.0, Verdict.OVER_DOSE, ("standstill", "over_dose")),
        MetreRecord(4, 0.0, 0.0, 0.0, Verdict.UNPROVEN, ("incomplete", "unproven")),
        MetreRecord(5, 120.0, 118.0, 122.0, Verdict.ENERGY, ("energy",)),
    ]
    for hook in svc.on_metres:
        hook("R1", records)
    got = {v: value(metrics, "linectl_metres_total", verdict=verdict_label(v)) for v in Verdict}
    assert got == {
        Verdict.IN_SPEC: 2,
        Verdict.UNDER_DOSE: 1,
        Verdict.OVER_DOSE: 1,
        Verdict.UNPROVEN: 1,
        Verdict.ENERGY: 1,
    }
    causes = {c: value(metrics, "linectl_metres_out_of_spec_total", cause=c) for c in METRE_CAUSES}
    assert causes == {
        "incomplete": 1,
        "unproven": 1,
        "gap": 0,
        "standstill": 1,
        "over_dose": 1,
        "under_dose": 1,
        "energy": 1,
    }
    assert {verdict_label(v) for v in Verdict} == {
        "in_spec",
        "under_dose",
        "over_dose",
        "unproven",
        "energy",
    }


def test_interlock_trips_by_kind(svc: FakeService, metrics: LineMetrics) -> None:
    for kind in ("estop", "estop", "vacuum"):
        for hook in svc.on_alarm:
            hook(Alarm(kind, "test", 1.0))
    assert value(metrics, "linectl_interlock_trips_total", kind="estop") == 2
    assert value(metrics, "linectl_interlock_trips_total", kind="vacuum") == 1
    # Every kind the controller can raise is there from the start, at 0.
    assert value(metrics, "linectl_interlock_trips_total", kind="cooling") == 0
    for kind in ALARM_KINDS:
        assert value(metrics, "linectl_interlock_trips_total", kind=kind) is not None, kind


def test_mqtt_absent_until_bound_then_read_at_scrape(metrics: LineMetrics) -> None:
    assert value(metrics, "linectl_mqtt_connected") is None
    assert value(metrics, "linectl_mqtt_dropped_total") is None
    stats = FakeMqtt(connected=True, queue_depth=7, dropped_total=2, published_total=40)
    metrics.bind_mqtt(stats)
    assert value(metrics, "linectl_mqtt_connected") == 1
    assert value(metrics, "linectl_mqtt_queue_depth") == 7
    assert value(metrics, "linectl_mqtt_dropped_total") == 2
    assert value(metrics, "linectl_mqtt_published_total") == 40
    stats.connected = False
    stats.replay_backlog = 120
    assert value(metrics, "linectl_mqtt_connected") == 0
    assert value(metrics, "linectl_mqtt_replay_backlog") == 120


def test_hook_failure_never_reaches_the_service(svc: FakeService, metrics: LineMetrics) -> None:
    class Broken:
        def value(self, name: str) -> float:
            raise RuntimeError("boom")

    svc.last_acc = Broken()  # type: ignore[assignment]
    svc.cycle()  # must not raise: a metrics bug may not stop the line
    svc.cycle()
    assert value(metrics, "linectl_metrics_errors_total") == 2


def test_attach_rejects_wrong_line_and_twice(svc: FakeService, metrics: LineMetrics) -> None:
    with pytest.raises(LocalError, match="already attached"):
        metrics.attach(svc)
    other = LineMetrics("line2")
    with pytest.raises(LocalError, match=r"'line2'.*'line1'"):
        other.attach(svc)
    assert len(svc.observers) == 1


def test_unconvertible_unit_is_a_config_error_and_changes_nothing(cfg: LoadedConfig) -> None:
    amap = cfg.accelerator_map
    fields: dict[str, RegisterField] = dict(amap.fields)
    fields["vacuum"] = fields["vacuum"].model_copy(update={"unit": "psi"})
    bad = LoadedConfig(
        cfg.directory,
        cfg.line,
        amap.model_copy(update={"fields": fields}),
        cfg.conveyor_map,
        [],
    )
    svc = FakeService(bad)
    with pytest.raises(ConfigError, match=r"accelerator map: field 'vacuum' has unit 'psi'"):
        LineMetrics(svc.line_id).attach(svc)
    assert svc.observers == []
    assert svc.acc.stats.on_request == []


# ----------------------------------------------------------------------------- endpoint


async def scrape(url: str, openmetrics: bool = False) -> str:
    """GET the exposition from the test's own loop (no thread: the server is on this loop)."""
    headers = {}
    if openmetrics:
        headers["Accept"] = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        assert resp.status == 200, resp.status
        return await resp.text()


@pytest.fixture
async def server(metrics: LineMetrics) -> AsyncIterator[MetricsServer]:
    async with MetricsServer(WithoutCreated(metrics.registry), "127.0.0.1", 0) as srv:
        yield srv


async def test_serve_binds_loopback_by_default_and_closes(metrics: LineMetrics) -> None:
    exposition = WithoutCreated(metrics.registry)
    srv = await serve_metrics(exposition, MetricsConfig(port=0))
    assert srv is not None
    try:
        assert srv.host == "127.0.0.1"
        assert srv.sockname[:2] == ("127.0.0.1", srv.port)
        assert srv.port > 0
        assert f'linectl_up{{line="{LINE}"}} 1.0' in await scrape(srv.url)
    finally:
        await srv.close()
        await srv.close()  # idempotent
    with pytest.raises(aiohttp.ClientConnectorError):
        await scrape(srv.url)
    # The port is free again after close.
    async with MetricsServer(exposition, "127.0.0.1", srv.port):
        pass
    assert await serve_metrics(exposition, MetricsConfig(enabled=False)) is None


async def test_serve_on_a_taken_port_names_it(metrics: LineMetrics) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = MetricsServer(WithoutCreated(metrics.registry), "127.0.0.1", port)
        with pytest.raises(LocalError, match=rf"cannot listen on 127\.0\.0\.1:{port}"):
            await srv.start()


async def test_exposition_has_no_created_samples(server: MetricsServer) -> None:
    text = await scrape(server.url)
    assert "linectl_metres_total" in text
    assert "_created" not in text
    reg = CollectorRegistry()
    assert list(WithoutCreated(reg).collect()) == []


# ----------------------------------------------------------------------------- checks


def check_exposition(text: str, *, mqtt: bool) -> dict[str, Any]:
    """Names, types, label sets and `line` on every sample; returns the families."""
    families = {f.name: f for f in parse_text(text)}
    expected = {**FAMILIES, **(MQTT_FAMILIES if mqtt else {})}
    assert set(families) == set(expected)
    for name, (kind, unit, labels) in expected.items():
        fam = families[name]
        assert fam.type == kind, name
        assert fam.documentation, f"{name} has no HELP"
        if unit:
            assert name.endswith("_" + unit), name
        for s in fam.samples:
            assert s.labels.get("line") == LINE, s
            assert set(s.labels) - {"line"} <= labels, s
            if kind == "counter":
                assert s.name == name + "_total", s.name
    return families


def check_openmetrics_units(text: str) -> None:
    units = {f.name: f.unit for f in parse_openmetrics(text)}
    for name, (_kind, unit, _labels) in FAMILIES.items():
        assert units[name] == unit, name


def promtool_check_metrics(text: str) -> None:
    assert PROMTOOL is not None
    proc = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Lint findings are printed (exit status 0 or 1 depending on the version): none allowed.
    assert proc.stdout.strip() == "", proc.stdout
    assert proc.stderr.strip() == "", proc.stderr


async def test_exposition_names_types_units(svc: FakeService, server: MetricsServer) -> None:
    check_exposition(await scrape(server.url), mqtt=False)
    check_openmetrics_units(await scrape(server.url, openmetrics=True))


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
async def test_promtool_accepts_the_exposition(metrics: LineMetrics, server: MetricsServer) -> None:
    metrics.bind_mqtt(FakeMqtt())
    promtool_check_metrics(await scrape(server.url))


def test_docs_name_every_metric() -> None:
    doc = DOCS.read_text()
    for name, (kind, _unit, labels) in {**FAMILIES, **MQTT_FAMILIES}.items():
        exposed = name + "_total" if kind == "counter" else name
        assert f"`{exposed}`" in doc, exposed
        for label in labels - {"le"}:
            assert f"`{label}`" in doc, (exposed, label)
    for rule in re.findall(r"^\s*- alert: (\w+)", ALERTS.read_text(), re.MULTILINE):
        assert f"`{rule}`" in doc, rule


# ----------------------------------------------------------------------------- real time


@pytest.mark.slow
async def test_line_service_scrape_end_to_end(tmp_path: Path) -> None:
    cfg = load_config(compact_config(tmp_path), environ={})
    recipe, path = select_recipe(cfg, None)
    async with SimulatedLine(cfg, seed=5) as sim:
        svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
        metrics = LineMetrics(cfg.line.line_id)
        metrics.attach(svc)
        mqtt = FakeMqtt(connected=True, queue_depth=1, published_total=10)
        metrics.bind_mqtt(mqtt)
        srv = await serve_metrics(
            WithoutCreated(metrics.registry), cfg.line.metrics.model_copy(update={"port": 0})
        )
        assert srv is not None
        svc.request_reel(ReelRequest("METRICS-1", 1000.0, "pytest"))
        task = asyncio.create_task(svc.run())
        try:
            await wait_for(
                lambda: svc.ctl.state is LineState.RUNNING and svc.records_written >= 1,
                90.0,
                "a metre recorded while running",
            )
            running = await scrape(srv.url)
        finally:
            svc.stop()
            await asyncio.wait_for(task, 60.0)
        try:
            # Past the time a render is reused: the figures of after the stop.
            await asyncio.sleep(RENDER_REUSE_S)
            stopped = await scrape(srv.url)
            stopped_om = await scrape(srv.url, True)
        finally:
            await srv.close()

    # While running: live values, in base units, within what the recipe allows.
    fams = check_exposition(running, mqtt=True)

    def one(name: str, **labels: str) -> float:
        family = name if name in fams else re.sub(r"_(total|count|sum|bucket)$", "", name)
        got = [
            s.value
            for s in fams[family].samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(got) == 1, (name, labels, got)
        return float(got[0])

    assert one("linectl_line_state", state="running") == 1
    assert sum(s.value for s in fams["linectl_line_state"].samples) == 1
    assert one("linectl_beam_energy_electronvolts") == pytest.approx(
        recipe.energy_mev * 1e6, abs=recipe.energy_tolerance_mev * 1e6
    )
    beam_a = one("linectl_beam_current_amperes")
    # Measured values carry the simulator's noise: 10 % slack on the recipe's range.
    assert recipe.beam_current_min_ma * 0.9e-3 <= beam_a <= recipe.beam_current_max_ma * 1.1e-3
    assert one("linectl_scan_width_metres") == pytest.approx(recipe.scan_width_cm / 100, rel=0.05)
    speed = one("linectl_line_speed_metres_per_second")
    assert recipe.speed_min_m_min / 60 * 0.9 <= speed <= recipe.speed_max_m_min / 60 * 1.1
    assert one("linectl_line_speed_setpoint_metres_per_second") > 0
    assert one("linectl_beam_current_setpoint_amperes") > 0
    assert math.isfinite(one("linectl_vacuum_pascals"))
    assert math.isfinite(one("linectl_cable_tension_newtons"))
    assert one("linectl_reel_position_metres") > 2.0  # the compact line's last pass
    assert sum(s.value for s in fams["linectl_metres"].samples) >= 1
    for plc in ("accelerator", "conveyor"):
        assert one("linectl_modbus_connected", plc=plc) == 1
        n = "linectl_modbus_request_duration_seconds_count"
        assert one(n, plc=plc, function="read_input_registers") > 10
        assert one(n, plc=plc, function="write_registers") > 10
    assert one("linectl_mqtt_connected") == 1
    assert one("linectl_mqtt_published_total") == 10

    # After the stop: the counters equal the service's own totals exactly.
    fams = check_exposition(stopped, mqtt=True)
    check_openmetrics_units(stopped_om)
    assert one("linectl_control_cycle_duration_seconds_count") == svc.stats.cycles
    assert one("linectl_control_cycle_lateness_seconds_count") == svc.stats.cycles
    assert one("linectl_control_cycles_missed_total") == svc.stats.missed
    assert one("linectl_control_stalls_total") == svc.stats.stalls
    assert sum(s.value for s in fams["linectl_metres"].samples) == svc.records_written
    for link in (svc.acc, svc.cnv):
        answered = link.stats.requests - sum(link.stats.errors.values())
        counts = [
            s.value
            for s in fams["linectl_modbus_request_duration_seconds"].samples
            if s.name.endswith("_count") and s.labels["plc"] == link.name
        ]
        assert sum(counts) == answered, link.name
        for kind, total in link.stats.errors.items():
            assert one("linectl_modbus_errors_total", plc=link.name, kind=kind) == total
        assert one("linectl_modbus_reconnects_total", plc=link.name) == link.stats.reconnects
    assert one("linectl_line_state", state=svc.ctl.state.value) == 1
    assert one("linectl_metrics_errors_total") == 0
    if PROMTOOL is not None:
        promtool_check_metrics(running)
        promtool_check_metrics(stopped)


# ----------------------------------------------------------------------------- alert rules


def test_alert_rules_structure() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning"}, r["alert"]
        assert r["annotations"]["summary"], r["alert"]
        assert r["annotations"]["description"], r["alert"]
        assert re.fullmatch(r"\d+[smh]", str(r.get("for", "0s"))), r["alert"]
    # Every linectl series an alert reads is one the exporter produces.
    exported = set(FAMILIES) | set(MQTT_FAMILIES)
    for r in rules:
        for ref in re.findall(r"\blinectl_[a-z_]+", r["expr"]):
            base = re.sub(r"_(total|bucket|count|sum)$", "", ref)
            assert base in exported, (r["alert"], ref)
    assert {
        "LinectlDown",
        "LinectlLineFault",
        "LinectlOutOfSpecMetres",
        "LinectlInterlockTrip",
        "LinectlPlcLinkDown",
        "LinectlControlCyclesMissed",
        "LinectlCycleLatenessHigh",
        "LinectlMqttDisconnected",
        "LinectlMqttDropping",
        "LinectlMqttReplayBacklogGrowing",
    } <= set(names)


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_check_rules() -> None:
    assert PROMTOOL is not None
    proc = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def _s(name: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"job": "linectl", "instance": "h:9108", **labels}
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def _firing(alert: str, at: str, *expected: dict[str, str]) -> dict[str, Any]:
    """A check that exactly `expected` (label sets) of `alert` fire at time `at`."""
    samples = []
    for labels in expected:
        full = {"alertname": alert, "alertstate": "firing", **labels}
        inner = ",".join(f'{k}="{v}"' for k, v in sorted(full.items()))
        samples.append({"labels": f"ALERTS{{{inner}}}", "value": 1})
    return {
        "expr": f'ALERTS{{alertname="{alert}",alertstate="firing"}}',
        "eval_time": at,
        "exp_samples": samples,
    }


def _src(**labels: str) -> dict[str, str]:
    return {"job": "linectl", "instance": "h:9108", **labels}


def alert_rule_tests() -> list[dict[str, Any]]:
    """Series and expected alerts, one block per rule (15 s samples)."""
    up = _s("up", "1x200", instance="h:9108")
    crit, warn = {"severity": "critical"}, {"severity": "warning"}
    return [
        {  # scrape fails for one instance
            "input_series": [up, _s("up", "1 0x80", instance="dead:9108")],
            "checks": [
                _firing("LinectlDown", "30s"),  # still pending
                _firing("LinectlDown", "2m", {**crit, **_src(instance="dead:9108")}),
            ],
        },
        {  # l1 cycles; l2's loop stops after a minute while its endpoint answers
            "input_series": [
                up,
                _s("linectl_up", "1x80", line="l1"),
                _s("linectl_up", "1x80", line="l2"),
                _s("linectl_control_cycle_duration_seconds_count", "0+300x80", line="l1"),
                _s("linectl_control_cycle_duration_seconds_count", "0+300x4 1200x76", line="l2"),
            ],
            "checks": [
                _firing("LinectlControlLoopStalled", "1m"),
                _firing("LinectlControlLoopStalled", "4m", {**crit, **_src(line="l2")}),
            ],
        },
        {
            "input_series": [
                up,
                _s("linectl_line_state", "0 0 1 1 1 1", line="l1", state="fault"),
                _s("linectl_line_state", "1x5", line="l2", state="running"),
                _s("linectl_line_state", "0x5", line="l2", state="fault"),
            ],
            "checks": [
                _firing("LinectlLineFault", "15s"),
                _firing("LinectlLineFault", "45s", {**crit, **_src(line="l1", state="fault")}),
            ],
        },
        {  # one under-dosed metre at 2 min; in-spec metres all along
            "input_series": [
                up,
                _s("linectl_metres_total", "0+20x120", line="l1", verdict="in_spec"),
                _s("linectl_metres_total", "0x7 1x112", line="l1", verdict="under_dose"),
            ],
            "checks": [
                _firing("LinectlOutOfSpecMetres", "1m"),
                _firing("LinectlOutOfSpecMetres", "3m", {**warn, "line": "l1"}),
                _firing("LinectlOutOfSpecMetres", "25m"),  # 10 min window passed
            ],
        },
        {  # vacuum: tripped before Prometheus had history, again at 25 min;
            # estop: the first trip of its kind at 12 min (every kind is exported at 0);
            # l2 restarted at 20 min and tripped on cooling before its first scrape
            "input_series": [
                up,
                _s("linectl_up", "1x140", line="l1"),
                _s("linectl_interlock_trips_total", "2x100 3x40", line="l1", kind="vacuum"),
                _s("linectl_interlock_trips_total", "0x48 1x90", line="l1", kind="estop"),
                _s("linectl_interlock_trips_total", "0x79 _ 1x60", line="l2", kind="cooling"),
            ],
            "checks": [
                _firing("LinectlInterlockTrip", "2m"),  # no alert for old trips
                _firing("LinectlInterlockTrip", "13m", {**warn, **_src(line="l1", kind="estop")}),
                _firing(
                    "LinectlInterlockTrip",
                    "21m",
                    {**warn, **_src(line="l2", kind="cooling")},
                    {**warn, **_src(line="l1", kind="estop")},  # still in its 10 min
                ),
                _firing(
                    "LinectlInterlockTrip",
                    "26m",
                    {**warn, **_src(line="l2", kind="cooling")},
                    {**warn, **_src(line="l1", kind="vacuum")},
                ),
                _firing("LinectlInterlockTrip", "40m"),  # 10 min windows passed
            ],
        },
        {
            "input_series": [
                up,
                _s("linectl_modbus_connected", "1x20", line="l1", plc="accelerator"),
                _s("linectl_modbus_connected", "1 1 0x18", line="l1", plc="conveyor"),
            ],
            "checks": [
                _firing("LinectlPlcLinkDown", "30s"),  # pending
                _firing("LinectlPlcLinkDown", "1m", {**crit, **_src(line="l1", plc="conveyor")}),
            ],
        },
        {
            "input_series": [
                up,
                _s(
                    "linectl_modbus_errors_total",
                    "0+5x40",
                    line="l1",
                    plc="accelerator",
                    kind="timeout",
                ),
                _s(
                    "linectl_modbus_errors_total", "0x40", line="l1", plc="conveyor", kind="timeout"
                ),
            ],
            "checks": [
                _firing("LinectlModbusErrors", "5m", {**warn, "line": "l1", "plc": "accelerator"}),
            ],
        },
        {
            "input_series": [up, _s("linectl_control_cycles_missed_total", "0x8 2x40", line="l1")],
            "checks": [
                _firing("LinectlControlCyclesMissed", "1m"),
                _firing("LinectlControlCyclesMissed", "3m", {**warn, **_src(line="l1")}),
            ],
        },
        {  # l1: every cycle starts 25..50 ms late; l2: all within 1 ms
            "input_series": [
                up,
                *[
                    _s("linectl_control_cycle_lateness_seconds_bucket", v, line="l1", le=le)
                    for le, v in (("0.001", "0x60"), ("0.025", "0x60"), ("0.05", "0+300x60"))
                ],
                _s(
                    "linectl_control_cycle_lateness_seconds_bucket",
                    "0+300x60",
                    line="l1",
                    le="+Inf",
                ),
                *[
                    _s(
                        "linectl_control_cycle_lateness_seconds_bucket",
                        "0+300x60",
                        line="l2",
                        le=le,
                    )
                    for le in ("0.001", "0.025", "0.05", "+Inf")
                ],
            ],
            "checks": [
                _firing("LinectlCycleLatenessHigh", "3m"),  # pending (for: 5m)
                _firing("LinectlCycleLatenessHigh", "10m", {**warn, "line": "l1"}),
            ],
        },
        {
            "input_series": [
                up,
                _s("linectl_mqtt_connected", "1 1 0x20", line="l1"),
                _s("linectl_mqtt_dropped_total", "0x4 3x20", line="l1"),
                _s("linectl_mqtt_replay_backlog", "0+10x100", line="l1"),
                _s("linectl_mqtt_replay_backlog", "50x100", line="l2"),
            ],
            "checks": [
                _firing("LinectlMqttDisconnected", "1m"),  # pending
                _firing("LinectlMqttDisconnected", "2m", {**warn, **_src(line="l1")}),
                _firing("LinectlMqttDropping", "2m", {**warn, **_src(line="l1")}),
                _firing("LinectlMqttReplayBacklogGrowing", "5m"),  # pending
                _firing("LinectlMqttReplayBacklogGrowing", "21m", {**warn, **_src(line="l1")}),
            ],
        },
    ]


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_alert_rules_fire_as_documented(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    tests = [
        {"interval": "15s", "input_series": t["input_series"], "promql_expr_test": t["checks"]}
        for t in alert_rule_tests()
    ]
    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "15s", "tests": tests}
    path = tmp_path / "alerts_test.yml"
    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    proc = subprocess.run(
        [PROMTOOL, "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------- hung and excess HTTP connections

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _closed(conn: Conn) -> bool:
    """Whether the server has closed `conn` (EOF, or a reset: an abort)."""
    reader, _writer = conn
    return reader.at_eof() or reader.exception() is not None


async def _count_closed(conns: list[Conn], at_least: int, within_s: float) -> int:
    """How many of `conns` the server has closed, waiting up to `within_s` for `at_least`."""
    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: sum(map(_closed, conns)) >= at_least, within_s, "closed")
    return sum(map(_closed, conns))


async def _closed_by_server(conn: Conn, within_s: float) -> bool:
    return await _count_closed([conn], 1, within_s) == 1


async def _connect(port: int) -> Conn:
    return await asyncio.open_connection("127.0.0.1", port)


def _close_all(conns: list[Conn]) -> None:
    for _reader, writer in conns:
        writer.close()


def _transport(conn: Conn) -> asyncio.Transport:
    transport = conn[1].transport
    assert isinstance(transport, asyncio.Transport)
    return transport


def _endpoint_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "linectl-metrics")


async def test_idle_connections_are_bounded_and_a_scraper_is_still_answered(
    metrics: LineMetrics,
) -> None:
    # Found by attack: 200 idle connections held 204 threads, one each, with no timeout.
    # Then one thread of its own served them; now the caller's event loop does, no thread.
    threads_before = {t.ident for t in threading.enumerate()}
    limits = replace(METRICS_LIMITS, head_timeout_s=60.0)
    async with MetricsServer(
        WithoutCreated(metrics.registry), "127.0.0.1", 0, limits=limits
    ) as srv:
        idle = [await _connect(srv.port) for _ in range(200)]
        try:
            assert _endpoint_threads() == 0
            assert {t.ident for t in threading.enumerate()} == threads_before
            # A scraper is answered while they are all still open...
            assert f'linectl_up{{line="{LINE}"}} 1.0' in await scrape(srv.url)
            # ... because the endpoint holds at most 16 of them: the rest were closed to
            # make room (the head deadline, 60 s here, closed none of them).
            excess = len(idle) - METRICS_LIMITS.max_connections
            assert await _count_closed(idle, excess, within_s=20.0) >= excess
            assert srv.stats.evicted >= excess
            assert srv.stats.refused == 0
            assert srv.stats.timed_out == 0
            assert srv.bounds.open <= METRICS_LIMITS.max_connections
            assert {t.ident for t in threading.enumerate()} == threads_before
        finally:
            _close_all(idle)
        assert f'linectl_up{{line="{LINE}"}} 1.0' in await scrape(srv.url)
        assert srv.stats.requests == 2
    assert _endpoint_threads() == 0


async def test_a_client_that_does_not_send_its_request_head_in_time_is_dropped(
    metrics: LineMetrics,
) -> None:
    limits = replace(METRICS_LIMITS, head_timeout_s=2.5)
    async with MetricsServer(
        WithoutCreated(metrics.registry), "127.0.0.1", 0, limits=limits
    ) as srv:
        silent = await _connect(srv.port)
        partial = await _connect(srv.port)
        partial[1].write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        # A slowloris: one byte a second, each one before aiohttp's keep-alive timeout
        # (10 s) and the head deadline (2.5 s here) could notice a silence.
        slowloris = await _connect(srv.port)
        # And the same on a kept-alive connection, after one answered request.
        kept = await _connect(srv.port)
        kept[1].write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(kept[0].readuntil(b"\r\n\r\n"), 10.0)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(re.findall(rb"Content-Length: (\d+)", head)[0])
        await kept[0].readexactly(length)
        conns = [silent, partial, slowloris, kept]
        try:
            started = time.monotonic()
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
            sent = 0
            while not (_closed(slowloris) and _closed(kept)) and sent < 20:
                for _reader, writer in (slowloris, kept):
                    if not writer.is_closing():
                        writer.write(request[sent : sent + 1])
                sent += 1
                await asyncio.sleep(1.0)
            # Cut after the deadline, 2.5 s (+ a second of trickle), never answered.
            assert await _count_closed(conns, 4, within_s=20.0) == 4
            assert time.monotonic() - started < 8.0, "the trickle held the connection"
            assert 2 <= sent <= 6, sent
            for reader, _writer in (silent, partial, slowloris):
                assert reader.exception() is not None or await reader.read() == b""
        finally:
            _close_all(conns)
        assert srv.stats.timed_out == 4
        assert srv.stats.requests == 1  # the kept-alive connection's first request
        assert "linectl_up" in await scrape(srv.url)


HEAD_LINES = b"Host: x\r\nConnection: close\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"NONSENSE\r\n\r\n", 400, id="not-http"),
        pytest.param(b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400, id="bad-header"),
        pytest.param(b"POST /metrics HTTP/1.1\r\n" + HEAD_LINES + b"\r\n", 405, id="post"),
        pytest.param(b"PUT /metrics HTTP/1.1\r\n" + HEAD_LINES + b"\r\n", 405, id="put"),
        pytest.param(b"GET / HTTP/1.1\r\n" + HEAD_LINES + b"\r\n", 404, id="root"),
        pytest.param(b"GET /metricsx HTTP/1.1\r\n" + HEAD_LINES + b"\r\n", 404, id="other-path"),
        pytest.param(
            b"GET /metrics HTTP/1.1\r\n" + HEAD_LINES + b"X: " + b"a" * 5000 + b"\r\n\r\n",
            400,
            id="header-too-long",
        ),
        pytest.param(
            b"GET /metrics?" + b"a" * 5000 + b" HTTP/1.1\r\n" + HEAD_LINES + b"\r\n",
            400,
            id="request-line-too-long",
        ),
        pytest.param(
            b"GET /metrics HTTP/1.1\r\n"
            + HEAD_LINES
            + b"".join(b"X-%d: 1\r\n" % i for i in range(40))
            + b"\r\n",
            400,
            id="too-many-headers",
        ),
    ],
)
async def test_requests_the_endpoint_does_not_take(
    metrics: LineMetrics, request_bytes: bytes, status: int
) -> None:
    async with MetricsServer(WithoutCreated(metrics.registry), "127.0.0.1", 0) as srv:
        reader, writer = await _connect(srv.port)
        try:
            writer.write(request_bytes)
            got = b""
            with contextlib.suppress(ConnectionResetError):
                got = await asyncio.wait_for(reader.read(), 20.0)  # the server closes
        finally:
            writer.close()
        assert re.match(rb"HTTP/1\.[01] %d " % status, got), got[:100]
        assert b"linectl_up" not in got
        assert "linectl_up" in await scrape(srv.url)
        # What aiohttp could not parse never reached the application.
        assert srv.stats.requests == (2 if status in (404, 405) else 1)


async def test_exposition_negotiation_is_prometheus_clients(server: MetricsServer) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(server.url, headers={"Accept-Encoding": "gzip"}) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            body = gzip.decompress(await resp.read()).decode()
        assert f'linectl_up{{line="{LINE}"}} 1.0' in body
        async with http.get(server.url, headers={"Accept-Encoding": "identity"}) as resp:
            assert "Content-Encoding" not in resp.headers
            assert (await resp.text()).startswith("# HELP ")
        async with http.head(server.url) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) > 1000
            assert await resp.read() == b""
    om = await scrape(server.url, openmetrics=True)
    assert om.rstrip().endswith("# EOF")


async def test_scrapes_together_cost_one_render_and_later_ones_see_new_values(
    metrics: LineMetrics,
) -> None:
    # Rendering takes milliseconds on the loop the control cycle runs on: 16 scrapers at
    # once must not cost 16 renders in one pass of the loop.
    async with MetricsServer(WithoutCreated(metrics.registry), "127.0.0.1", 0, reuse_s=60.0) as srv:
        texts = await asyncio.gather(*(scrape(srv.url) for _ in range(16)))
        assert len(set(texts)) == 1
        assert srv.exposition.renders == 1
        await scrape(srv.url, openmetrics=True)  # another format: a render of its own
        assert srv.exposition.renders == 2
    async with MetricsServer(WithoutCreated(metrics.registry), "127.0.0.1", 0) as srv:
        assert "linectl_cable_tension_newtons" in await scrape(srv.url)
        metrics._process["linectl_cable_tension_newtons"].set(42.0)
        await asyncio.sleep(RENDER_REUSE_S)
        assert f'linectl_cable_tension_newtons{{line="{LINE}"}} 42.0' in await scrape(srv.url)
        assert srv.exposition.renders == 2


async def test_an_answer_not_taken_in_time_is_dropped_and_busy_slots_refuse() -> None:
    # A client that asks and never reads holds its slot while its answer is written, for
    # answer_timeout_s at most; while all slots are held so, a new connection is closed
    # at once (there is no idle one to evict).
    reg = CollectorRegistry()
    g = Gauge("big", "A large exposition.", ["i"], registry=reg)
    for i in range(40_000):
        g.labels(f"{i:08d}-" + "x" * 60).set(i)
    size = len(generate_latest(reg))
    assert size > 3_000_000
    limits = replace(METRICS_LIMITS, max_connections=4, answer_timeout_s=2.0)
    async with MetricsServer(reg, "127.0.0.1", 0, limits=limits, reuse_s=60.0) as srv:
        readers: list[Conn] = []
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
            conn = await asyncio.open_connection(sock=sock, limit=1024)
            conn[1].write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            readers.append(conn)
        try:
            await wait_for(lambda: srv.stats.requests >= 4, 20.0, "4 requests")
            for conn in readers:
                _transport(conn).pause_reading()  # and never read again
            await asyncio.sleep(0.2)
            assert not any(map(_closed, readers))
            late = await _connect(srv.port)
            assert await _closed_by_server(late, 1.0)
            assert srv.stats.refused == 1
            _close_all([late])
            # The deadline (2 s here) drops the four; what they get is cut short.
            await wait_for(lambda: srv.stats.timed_out == 4, 20.0, "4 answers timed out")
            assert srv.bounds.open == 0
            for reader, writer in readers:
                _transport((reader, writer)).resume_reading()
                got = b""
                with contextlib.suppress(ConnectionResetError):
                    got = await asyncio.wait_for(reader.read(), 20.0)
                assert len(got) < size, "the whole answer went through"
        finally:
            _close_all(readers)
        async with (
            aiohttp.ClientSession() as http,
            http.get(srv.url, headers={"Accept-Encoding": "identity"}) as resp,
        ):
            assert resp.status == 200
            assert len(await resp.read()) == size
