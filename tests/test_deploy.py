"""Deployment files: docker compose stack, image, Prometheus, Grafana, Mosquitto, systemd.

Static checks against the code they deploy: the compose environment overrides are loaded
with linectl's own config loader, the service commands are parsed with the CLIs' own
parsers, the dashboard's queries name only the fixed metric names (and the labels those
metrics carry), the mosquitto config is run by a real mosquitto. Tools that may be missing
(promtool, docker compose, systemd-analyze, mosquitto) skip only the checks that need them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from conftest import free_port

from linectl.cli import build_parser as linectl_parser
from linectl.config import load_config
from linectl.historian.config import load_historian_config
from simulators.cli import build_parser as sim_parser

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "linectl.json"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
UNIT = DEPLOY / "systemd" / "linectl.service"
METRICS_DOC = ROOT / "docs" / "metrics.md"
METRICS_SRC = ROOT / "linectl" / "metrics.py"

SERVICES = {"mosquitto", "sim", "linectl", "prometheus", "grafana", "postgres", "historian"}

# LineService._loop gives a safe stop at most this long before it returns (then one
# safe-state write of at most 1 s); a supervisor must not SIGKILL it sooner.
SAFE_STOP_LIMIT_S = 60.0
STOP_MARGIN_S = 10.0

# The fixed Prometheus names (the metrics module, the dashboard and the alert rules share
# them): name -> (type, labels besides `line`).
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "linectl_up": ("gauge", frozenset()),
    "linectl_line_state": ("gauge", frozenset({"state"})),
    "linectl_beam_current_amperes": ("gauge", frozenset()),
    "linectl_beam_energy_electronvolts": ("gauge", frozenset()),
    "linectl_scan_width_metres": ("gauge", frozenset()),
    "linectl_vacuum_pascals": ("gauge", frozenset()),
    "linectl_line_speed_metres_per_second": ("gauge", frozenset()),
    "linectl_cable_tension_newtons": ("gauge", frozenset()),
    "linectl_beam_current_setpoint_amperes": ("gauge", frozenset()),
    "linectl_line_speed_setpoint_metres_per_second": ("gauge", frozenset()),
    "linectl_reel_position_metres": ("gauge", frozenset()),
    "linectl_metres_total": ("counter", frozenset({"verdict"})),
    "linectl_metres_out_of_spec_total": ("counter", frozenset({"cause"})),
    "linectl_interlock_trips_total": ("counter", frozenset({"kind"})),
    "linectl_alarms_active": ("gauge", frozenset()),
    "linectl_control_cycle_duration_seconds": ("histogram", frozenset()),
    "linectl_control_cycle_lateness_seconds": ("histogram", frozenset()),
    "linectl_control_cycles_missed_total": ("counter", frozenset()),
    "linectl_control_stalls_total": ("counter", frozenset()),
    "linectl_modbus_request_duration_seconds": ("histogram", frozenset({"plc", "function"})),
    "linectl_modbus_errors_total": ("counter", frozenset({"plc", "kind"})),
    "linectl_modbus_reconnects_total": ("counter", frozenset({"plc"})),
    "linectl_modbus_connected": ("gauge", frozenset({"plc"})),
    "linectl_mqtt_connected": ("gauge", frozenset()),
    "linectl_mqtt_queue_depth": ("gauge", frozenset()),
    "linectl_mqtt_dropped_total": ("counter", frozenset()),
    "linectl_mqtt_replay_backlog": ("gauge", frozenset()),
    "linectl_mqtt_published_total": ("counter", frozenset()),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# What the dashboard must show (issue: line state, beam current and speed against their
# set-points, verdicts, out-of-spec causes, trips, loop timing, Modbus, MQTT).
DASHBOARD_MUST_QUERY = {
    "linectl_line_state",
    "linectl_beam_current_amperes",
    "linectl_beam_current_setpoint_amperes",
    "linectl_line_speed_metres_per_second",
    "linectl_line_speed_setpoint_metres_per_second",
    "linectl_metres_total",
    "linectl_metres_out_of_spec_total",
    "linectl_interlock_trips_total",
    "linectl_control_cycle_duration_seconds",
    "linectl_control_cycle_lateness_seconds",
    "linectl_modbus_request_duration_seconds",
    "linectl_modbus_errors_total",
    "linectl_mqtt_queue_depth",
    "linectl_mqtt_dropped_total",
    "linectl_mqtt_replay_backlog",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own LINECTL_* settings must not change what the config loader sees.
    for name in list(os.environ):
        if name.startswith("LINECTL_"):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- helpers


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is needed to read the YAML files")


def _load_yaml(path: Path) -> Any:
    return _yaml().safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    svc = compose["services"][name]
    assert isinstance(svc, dict)
    return svc


def _env(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment as the container sees it (compose stringifies scalars)."""
    raw = svc.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    out = {}
    for key, value in raw.items():
        out[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc["command"]
    assert isinstance(cmd, list), "give commands as lists: no shell splitting surprises"
    return [str(c) for c in cmd]


def _bind_mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of every bind mount from the repository."""
    mounts = {}
    for spec in svc.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def _named_volumes(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> volume name of every named volume."""
    out = {}
    for spec in svc.get("volumes", []):
        source, target = spec.split(":")[:2]
        if not source.startswith((".", "/", "~")):
            out[target] = source
    return out


def _host_path(mounts: dict[str, Path], container_path: str) -> Path:
    """The repository file that a container path shows, through the bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in mounts.items():
        t = PurePosixPath(target)
        if path == t or t in path.parents:
            return source / path.relative_to(t)
    raise AssertionError(f"{container_path} is not inside any bind mount {sorted(mounts)}")


def _duration_s(text: str) -> float:
    """'90s', '1min 30s', '2m', '1h', '500ms' or a bare number of seconds."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(f"{n}{u}" for n, u in parts) == text.replace(" ", ""), text
    return sum(float(n) * units[u] for n, u in parts)


def _loaded_demo_config(compose: dict[str, Any]) -> Any:
    return load_config(CONFIG_DIR, environ=_env(_service(compose, "linectl")))


# --------------------------------------------------------------------------- compose


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == SERVICES
    assert _service(compose, "mosquitto")["image"].startswith("eclipse-mosquitto:2")
    assert _service(compose, "prometheus")["image"].startswith("prom/prometheus:")
    assert _service(compose, "grafana")["image"].startswith("grafana/grafana:")
    for name in ("sim", "linectl"):
        svc = _service(compose, name)
        assert svc["build"] == ".", name
        assert (ROOT / svc["build"] / "Dockerfile").is_file()


def test_compose_historian_keeps_the_compose_line(compose: dict[str, Any]) -> None:
    svc = _service(compose, "historian")
    args = linectl_parser().parse_args(_command(svc))
    assert (args.command, args.historian_command) == ("historian", "run")
    hist = load_historian_config(_host_path(_bind_mounts(svc), str(args.config)))
    line = _loaded_demo_config(compose).line
    # The line names the historian; the historian keeps the line, on the same topics.
    assert hist.historian.id in line.records.historians
    assert hist.historian.lines == [line.line_id]
    assert hist.historian.topic_prefix == line.mqtt.topic_prefix
    assert hist.mqtt.host == "mosquitto"
    assert "host=postgres" in hist.postgres.dsn
    assert "password" not in hist.postgres.dsn
    # The template a plant starts from loads too.
    assert load_historian_config(ROOT / "deploy" / "historian" / "historian.toml").historian.lines


def test_compose_files_exist_and_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for target, source in _bind_mounts(svc).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is not in the repo"
            assert ROOT in source.parents, f"{name}: {source} lies outside the repository"
        for target, volume in _named_volumes(svc).items():
            assert volume in declared, f"{name}: volume {volume!r} at {target} is not declared"


def test_compose_publishes_only_on_loopback(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_controller_overrides_validate_and_point_at_the_stack(
    compose: dict[str, Any],
) -> None:
    cfg = _loaded_demo_config(compose)
    line = cfg.line
    assert set(cfg.overrides) >= {
        "accelerator.host",
        "conveyor.host",
        "mqtt.enabled",
        "mqtt.host",
        "metrics.host",
        "records.path",
    }
    # The PLC endpoints are the simulator service, at the ports its command line serves.
    sim_args = sim_parser().parse_args(_command(_service(compose, "sim"))[1:])
    assert _command(_service(compose, "sim"))[0] == "sim"
    assert line.accelerator.host == line.conveyor.host == "sim"
    assert (line.accelerator.port, line.conveyor.port) == (sim_args.acc_port, sim_args.cnv_port)
    # The broker is the mosquitto service, on the port its config listens on.
    assert line.mqtt.enabled is True
    assert line.mqtt.host == "mosquitto"
    listeners = re.findall(r"^listener\s+(\d+)", MOSQUITTO_CONF.read_text(), re.MULTILINE)
    assert [int(p) for p in listeners] == [line.mqtt.port]
    # Metrics reachable from the prometheus container.
    assert line.metrics.enabled is True
    assert line.metrics.host == "0.0.0.0"


def test_compose_simulator_listens_beyond_its_loopback(compose: dict[str, Any]) -> None:
    svc = _service(compose, "sim")
    cmd = _command(svc)
    args = sim_parser().parse_args(cmd[1:])
    assert args.host == "0.0.0.0", "the controller's container cannot reach a loopback server"
    mounts = _bind_mounts(svc)
    assert _host_path(mounts, str(args.config)) == CONFIG_DIR.resolve()


def test_compose_controller_command_and_config_mount(compose: dict[str, Any]) -> None:
    svc = _service(compose, "linectl")
    cmd = _command(svc)
    args = linectl_parser().parse_args(cmd)
    assert args.command == "run"
    assert args.reel is None, "a fixed reel id would be refused on the second start"
    assert args.resume, "a restarted container must take up the interrupted reel"
    mounts = _bind_mounts(svc)
    assert _host_path(mounts, str(args.config)) == CONFIG_DIR.resolve()
    assert any(
        spec.split(":")[1] == str(args.config) and spec.endswith(":ro") for spec in svc["volumes"]
    ), "the configuration is mounted read-only"


def test_compose_records_on_a_named_volume(compose: dict[str, Any]) -> None:
    cfg = _loaded_demo_config(compose)
    records = PurePosixPath(cfg.line.records.path)
    assert records.is_absolute()
    volumes = _named_volumes(_service(compose, "linectl"))
    assert any(PurePosixPath(t) in records.parents for t in volumes), (
        f"records {records} are not on a named volume ({volumes}): lost with the container"
    )


def test_compose_gives_the_controller_time_for_a_safe_stop(compose: dict[str, Any]) -> None:
    svc = _service(compose, "linectl")
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    grace = _duration_s(svc["stop_grace_period"])
    assert grace >= SAFE_STOP_LIMIT_S + STOP_MARGIN_S
    # As PID 1 without an init, a signal that arrives before linectl has set its handlers
    # would be ignored; an init forwards it.
    assert svc.get("init") is True


def test_compose_prometheus_scrapes_the_controller(compose: dict[str, Any]) -> None:
    prom = _service(compose, "prometheus")
    mounts = _bind_mounts(prom)
    config_flag = next(c for c in _command(prom) if c.startswith("--config.file="))
    config_in_container = config_flag.split("=", 1)[1]
    assert _host_path(mounts, config_in_container) == PROMETHEUS_YML.resolve()
    prom_cfg = _load_yaml(PROMETHEUS_YML)
    # Rule files resolve relative to the config file, in the container as in the repo.
    rule_files = prom_cfg["rule_files"]
    assert rule_files
    for rule in rule_files:
        in_container = PurePosixPath(config_in_container).parent / rule
        host = _host_path(mounts, str(in_container))
        assert host == (PROMETHEUS_YML.parent / rule).resolve()
        assert host.is_file(), f"alert rules {host} missing"
    targets = [
        t
        for job in prom_cfg["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    ]
    assert targets == ["linectl:9108"] or all(t.startswith("linectl:") for t in targets)
    reference = load_config(CONFIG_DIR, environ={}).line.metrics.port
    demo = _loaded_demo_config(compose).line.metrics.port
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in compose["services"], f"{target}: no such service"
        assert int(port) == reference == demo, (
            f"scrape port {port}, line.toml [metrics] port {reference}, demo {demo}"
        )


def test_compose_grafana_provisioning(compose: dict[str, Any]) -> None:
    graf = _service(compose, "grafana")
    mounts = _bind_mounts(graf)
    prov = _host_path(mounts, "/etc/grafana/provisioning/datasources")
    sources = [ds for f in sorted(prov.glob("*.yml")) for ds in _load_yaml(f)["datasources"]]
    assert len(sources) == 1
    source = sources[0]
    assert source["type"] == "prometheus"
    url = re.fullmatch(r"http://([a-z0-9_-]+):(\d+)/?", source["url"])
    assert url is not None, source["url"]
    assert url.group(1) == "prometheus"
    assert url.group(1) in compose["services"]
    # The dashboard refers to the datasource by uid.
    dash = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in _panels(dash) if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in _panels(dash) for t in p.get("targets", [])}
    assert uids == {source["uid"]}
    # The dashboard provider's path is mounted from the directory holding linectl.json.
    dprov = _host_path(mounts, "/etc/grafana/provisioning/dashboards")
    providers = [p for f in sorted(dprov.glob("*.yml")) for p in _load_yaml(f)["providers"]]
    assert providers
    for provider in providers:
        assert _host_path(mounts, provider["options"]["path"]) == DASHBOARD.parent.resolve()
    home = _env(graf).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        assert _host_path(mounts, home) == DASHBOARD.resolve()


def test_compose_mosquitto_config_mount(compose: dict[str, Any]) -> None:
    mounts = _bind_mounts(_service(compose, "mosquitto"))
    # The path the eclipse-mosquitto image starts mosquitto with.
    assert _host_path(mounts, "/mosquitto/config/mosquitto.conf") == MOSQUITTO_CONF.resolve()


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_validates() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- dashboard


def _panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def _base_metric(name: str) -> tuple[str, bool]:
    """(fixed metric name, is a histogram bucket); AssertionError for an unknown name."""
    if name in METRICS:
        return name, False
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and METRICS.get(base, ("", ()))[0] == "histogram":
            return base, suffix == "_bucket"
    raise AssertionError(f"{name} is not one of the fixed metric names")


def _labels_used(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {s.strip() for s in group.split(",") if s.strip()}
    for matchers in re.findall(r"\{([^{}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for call in re.findall(r"label_values\(\s*[^,()]+,\s*(\w+)\s*\)", expr):
        labels.add(call)
    return labels


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(dash, dict)
    return dash


def test_dashboard_queries_only_fixed_metrics_and_their_labels(dashboard: dict[str, Any]) -> None:
    exprs = _exprs(dashboard)
    assert exprs
    queried: set[str] = set()
    for expr in exprs:
        names = re.findall(r"\blinectl_[a-z0-9_]+", expr)
        assert names, f"query names no linectl metric: {expr}"
        allowed = {"line"}
        for name in names:
            base, bucket = _base_metric(name)
            queried.add(base)
            allowed |= METRICS[base][1]
            if bucket:
                allowed.add("le")
        unknown = _labels_used(expr) - allowed
        assert not unknown, f"labels {unknown} are not on {names}: {expr}"
    missing = DASHBOARD_MUST_QUERY - queried
    assert not missing, f"dashboard does not show {sorted(missing)}"


def test_dashboard_legends_name_labels_the_query_keeps(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            by = re.search(r"\b(?:sum|max|min|avg)\s+by\s*\(([^)]*)\)", expr)
            if by is not None:
                kept = {s.strip() for s in by.group(1).split(",")}
            elif re.match(r"\s*(?:sum|max|min|avg|count)\s*\(", expr):
                kept = set()
            else:
                kept = {"line"} | {
                    lbl for n in re.findall(r"\blinectl_[a-z0-9_]+", expr)
                    for lbl in METRICS[_base_metric(n)[0]][1]
                }  # fmt: skip
            assert legend_labels <= kept, f"{panel['title']}: legend {legend_labels} vs {expr}"


def test_dashboard_histograms_are_shown_as_p99(dashboard: dict[str, Any]) -> None:
    exprs = _exprs(dashboard)
    for name, (kind, _labels) in METRICS.items():
        if kind != "histogram":
            continue
        assert any(
            "histogram_quantile(0.99" in e and f"{name}_bucket" in e and "rate(" in e for e in exprs
        ), f"no p99 of {name}"
    modbus = next(e for e in exprs if "linectl_modbus_request_duration_seconds_bucket" in e)
    assert _labels_used(modbus) >= {"le", "plc", "function"}, "p99 per PLC and function"


def test_dashboard_layout(dashboard: dict[str, Any]) -> None:
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"]
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        if p["type"] != "row":
            assert p.get("targets"), f"{p['title']} has no query"


def _promql_for_promtool(expr: str) -> str:
    # Grafana's variables, replaced by values Prometheus itself accepts.
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$line", ".*")
        .replace("$__interval", "1m")
    )


def test_dashboard_queries_parse_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    exprs = [
        _promql_for_promtool(t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])
    ]
    # Every query as a recording rule: promtool parses each one.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_dashboard_metrics_exist_in_the_metrics_module(dashboard: dict[str, Any]) -> None:
    if not METRICS_SRC.exists():
        pytest.skip("linectl/metrics.py not there yet")
    source = METRICS_SRC.read_text(encoding="utf-8")
    for expr in _exprs(dashboard):
        for name in re.findall(r"\blinectl_[a-z0-9_]+", expr):
            base, _ = _base_metric(name)
            # prometheus_client adds `_total` to a counter's name itself.
            registered = base.removesuffix("_total") if METRICS[base][0] == "counter" else base
            assert f'"{registered}"' in source, f"{base} is not registered in {METRICS_SRC}"


def test_fixed_metric_names_are_documented() -> None:
    if not METRICS_DOC.exists():
        pytest.skip("docs/metrics.md not there yet")
    doc = METRICS_DOC.read_text(encoding="utf-8")
    missing = [name for name in METRICS if not re.search(rf"\b{name}\b", doc)]
    assert not missing, f"{METRICS_DOC} does not document {missing}"


# --------------------------------------------------------------------------- prometheus


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    # Also checks the rule files it names (deploy/prometheus/alerts.yml).
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- mosquitto


def _mqtt_connack(port: int) -> int:
    """CONNECT (MQTT 3.1.1, no credentials) and return the CONNACK return code."""
    client_id = b"linectl-deploy-test"
    var_header = b"\x00\x04MQTT\x04\x02\x00\x0a"
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = var_header + payload
    packet = bytes([0x10, len(body)]) + body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(packet)
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            if not chunk:
                break
            reply += chunk
    assert reply[:2] == b"\x20\x02", f"no CONNACK: {reply!r}"
    return reply[3]


def _run_mosquitto(conf: str, tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    path = tmp_path / "mosquitto.conf"
    path.write_text(conf)
    proc = subprocess.Popen(
        ["/usr/sbin/mosquitto", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {proc.returncode} on {conf!r}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise AssertionError("mosquitto did not start listening")


def _local_conf(conf: str, port: int, data_dir: Path) -> str:
    # Same file, but on a free loopback port and a temporary data directory.
    conf, n = re.subn(r"^listener\s+\d+.*$", f"listener {port} 127.0.0.1", conf, flags=re.M)
    assert n == 1
    return re.sub(
        r"^persistence_location\s+.*$", f"persistence_location {data_dir}/", conf, flags=re.M
    )


@pytest.mark.parametrize("keep_anonymous", [True, False])
def test_mosquitto_config_runs_and_admits_the_demo_clients(
    tmp_path: Path, keep_anonymous: bool
) -> None:
    if not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed")
    port = free_port()
    conf = _local_conf(MOSQUITTO_CONF.read_text(), port, tmp_path)
    if not keep_anonymous:
        # The control: without that line mosquitto 2 refuses the demo's anonymous clients,
        # so an accepted CONNECT above is the config's doing.
        conf = re.sub(r"^allow_anonymous.*$", "", conf, flags=re.M)
    proc = _run_mosquitto(conf, tmp_path, port)
    try:
        code = _mqtt_connack(port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (code == 0) is keep_anonymous, f"CONNACK return code {code}"


# --------------------------------------------------------------------------- systemd


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_has_the_required_settings() -> None:
    unit = _unit(UNIT)
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc["User"] not in ("", "root", "0")
    assert svc["Restart"] == "on-failure"
    assert svc["WorkingDirectory"].startswith("/")
    assert unit["Service"]["EnvironmentFile"]
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] in ("yes", "true")
    assert svc["KillSignal"] == "SIGTERM"
    assert _duration_s(svc["TimeoutStopSec"]) >= SAFE_STOP_LIMIT_S + STOP_MARGIN_S
    assert svc["CapabilityBoundingSet"] == ""
    exec_start = svc["ExecStart"].split()
    args = linectl_parser().parse_args(exec_start[1:])
    assert PurePosixPath(exec_start[0]).name == "linectl"
    assert args.command == "run"
    assert args.resume, "a restart by systemd must take up the interrupted reel"
    assert args.reel is None, "a fixed reel id would be refused on the second start"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_lets_the_daemon_write_its_records() -> None:
    unit = _unit(UNIT)
    svc = unit["Service"]
    env = dict(e.split("=", 1) for line in svc.get("Environment", []) for e in line.split())
    records = PurePosixPath(env["LINECTL_RECORDS__PATH"])
    # ProtectSystem=strict: only the state directory and ReadWritePaths are writable.
    writable = [PurePosixPath("/var/lib") / d for d in svc.get("StateDirectory", [])]
    writable += [PurePosixPath(p) for v in svc.get("ReadWritePaths", []) for p in v.split()]
    assert any(w in records.parents for w in writable), f"{records} not in {writable}"
    config_dir = env["LINECTL_CONFIG_DIR"]
    assert f"--config {config_dir}" in svc["ExecStart"][-1]


# --------------------------------------------------------------------------- image


def _dockerfile() -> list[list[str]]:
    """Instructions as [KEYWORD, rest] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append([keyword.upper(), rest.strip()])
    return out


def _dockerignore() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [p.strip() for p in lines if p.strip() and not p.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    hit = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!").strip("/").removeprefix("**/")
        if fnmatch(rel, pat) or any(fnmatch(part, pat) for part in rel.split("/")[:1]):
            hit = not negate
    return hit


def _copy_sources() -> list[str]:
    sources = []
    for keyword, rest in _dockerfile():
        if keyword == "COPY" and "--from=" not in rest:
            parts = rest.split()
            sources += [p.rstrip("/") for p in parts[:-1] if not p.startswith("--")]
    return sources


def test_dockerfile_base_user_and_entrypoint() -> None:
    instructions = _dockerfile()
    froms = [rest.split()[0] for kw, rest in instructions if kw == "FROM"]
    assert froms
    assert all(f == "python:3.11-slim" for f in froms), froms
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    final = instructions[last_from:]
    users = [rest for kw, rest in final if kw == "USER"]
    assert users
    assert users[-1] not in ("root", "0"), "the image runs as a non-root user"
    entry = [rest for kw, rest in final if kw == "ENTRYPOINT"]
    assert entry
    assert json.loads(entry[-1]) == ["linectl"]
    env = " ".join(rest for kw, rest in final if kw == "ENV")
    records = re.search(r"LINECTL_RECORDS__PATH=(\S+)", env)
    volume = [json.loads(rest) for kw, rest in final if kw == "VOLUME"]
    assert records is not None
    assert volume
    assert any(PurePosixPath(v) in PurePosixPath(records.group(1)).parents for v in volume[-1])


def test_dockerfile_copies_exist_and_are_not_ignored() -> None:
    sources = _copy_sources()
    assert {"pyproject.toml", "README.md", "linectl", "simulators", "linectl/reference"} <= set(
        sources
    )
    patterns = _dockerignore()
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src, patterns), f"{src} is copied but .dockerignore excludes it"
    for local_state in (".venv", ".git", "records", "tests"):
        assert _ignored(local_state, patterns), f".dockerignore lets {local_state} in"


def test_image_build_context_builds_the_package(tmp_path: Path) -> None:
    # The files the build stage copies, and only those, must make a complete wheel. Built
    # offline with this environment's setuptools (pyproject.toml asks for >= 68).
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build needs")
    context = tmp_path / "context"
    context.mkdir()
    for src in _copy_sources():
        if src == "linectl/reference":  # runtime stage only (the build stage copies linectl/)
            continue
        source = ROOT / src
        if source.is_dir():
            shutil.copytree(
                source, context / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(source, context / src)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("linectl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "linectl = linectl.cli:main" in zf.read(entry_points).decode()
    assert {"linectl/cli.py", "linectl/daemon.py", "simulators/cli.py"} <= names
