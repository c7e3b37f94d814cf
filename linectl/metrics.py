"""Prometheus metrics for one line: state, process values, dose verdicts, trips, timing, links.

An adapter beside the Modbus link and the record store. It reads the service through the
service's hooks and a structural view (`ServiceView`), so it imports neither
linectl.service nor linectl.modbus; the daemon wires the two together. Every series has
its own `CollectorRegistry` (never the process-global one) and carries the label `line`.

Values are in base units (amperes, electronvolts, metres, pascals, metres per second,
newtons, seconds). Process values are converted from the unit each register map declares,
with the factors worked out once in `attach()`: a unit that cannot be converted is a
ConfigError there, never a wrong number later. Counters that mirror the service's and the
links' running totals advance by the difference since the last cycle.

A metrics fault must never stop the line: every hook catches its own exceptions, logs the
first one and carries on (linectl_metrics_errors_total counts them).

Nothing here speaks HTTP: the `[metrics]` endpoint is linectl.web.server.MetricsServer,
on the daemon's event loop, which serves `WithoutCreated(registry)`. Scrapes read the
registry on that loop, so every collector here must stay cheap and do no I/O (the MQTT
series read plain attributes). See docs/metrics.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, ParamSpec, Protocol, Self, assert_never

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from linectl.config import LoadedConfig, RegisterMap
from linectl.core.control import ALARM_KINDS, Alarm, LineState, Outputs
from linectl.core.ledger import MetreRecord, Verdict
from linectl.errors import ConfigError, LocalError

log = logging.getLogger("linectl.metrics")

P = ParamSpec("P")

# ----------------------------------------------------------------------------- buckets

CYCLE_DURATION_BUCKETS_S: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.06, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
)  # fmt: skip
"""Work per control cycle: fine around a 50 ms period (and its half), coarse beyond."""
CYCLE_LATENESS_BUCKETS_S: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
"""How late a cycle started: a healthy loop sits in the first buckets."""
MODBUS_BUCKETS_S: Final = (
    0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.1, 0.2, 0.5, 1.0,
)  # fmt: skip
"""Round trip of one answered request: milliseconds on a plant LAN, up to the timeout."""

# ----------------------------------------------------------------------------- labels

MODBUS_FUNCTIONS: Final[dict[int, str]] = {
    3: "read_holding_registers",
    4: "read_input_registers",
    6: "write_register",
    16: "write_registers",
}
"""Modbus function code -> the `function` label (the codes the links use)."""

LINK_ERROR_KINDS: Final = ("timeout", "exception", "disconnect", "protocol")
"""The `kind` label of linectl_modbus_errors_total (the links' LinkStats.errors keys)."""

METRE_CAUSES: Final = (
    "incomplete",
    "unproven",
    "gap",
    "standstill",
    "over_dose",
    "under_dose",
    "energy",
)
"""The causes the dose ledger gives a metre that is not in spec, created at zero so that
`increase()` sees the first one; any other cause the ledger reports is still counted."""


def verdict_label(verdict: Verdict) -> str:
    """The `verdict` label of linectl_metres_total (short and stable)."""
    match verdict:
        case Verdict.IN_SPEC:
            return "in_spec"
        case Verdict.UNDER_DOSE:
            return "under_dose"
        case Verdict.OVER_DOSE:
            return "over_dose"
        case Verdict.UNPROVEN:
            return "unproven"
        case Verdict.ENERGY:
            return "energy"
        case _:
            assert_never(verdict)


def modbus_function(fc: int) -> str:
    """The `function` label of a Modbus function code."""
    return MODBUS_FUNCTIONS.get(fc, f"fc{fc}")


# ----------------------------------------------------------------------------- units

UNIT_FACTORS: Final[dict[str, dict[str, float]]] = {
    "amperes": {"A": 1.0, "mA": 1e-3, "uA": 1e-6, "µA": 1e-6},
    "electronvolts": {"eV": 1.0, "keV": 1e3, "MeV": 1e6},
    "metres": {"m": 1.0, "cm": 1e-2, "mm": 1e-3},
    "pascals": {"Pa": 1.0, "hPa": 1e2, "mbar": 1e2, "kPa": 1e3, "Torr": 101325.0 / 760.0},
    "metres_per_second": {"m/s": 1.0, "m/min": 1.0 / 60.0},
    "newtons": {"N": 1.0, "daN": 10.0, "kN": 1e3},
}
"""Base unit -> the register-map units it can be converted from, with their factors."""


def unit_factor(rmap: RegisterMap, field: str, base: str) -> float:
    """Factor from the field's declared unit to the base unit; ConfigError if unknown."""
    unit = rmap.field(field).unit
    known = UNIT_FACTORS[base]
    try:
        return known[unit]
    except KeyError:
        raise ConfigError(
            f"{rmap.plc} map: field {field!r} has unit {unit!r}, which the metrics cannot "
            f"convert to {base}; use one of {sorted(known)}"
        ) from None


@dataclass(frozen=True, slots=True)
class ProcessValue:
    """One measured value exported as a gauge in a base unit."""

    metric: str
    help: str
    plc: str
    field: str
    unit: str


PROCESS_VALUES: Final = (
    ProcessValue(
        "linectl_beam_current_amperes", "Measured beam current.", "accelerator",
        "beam_current", "amperes",
    ),
    ProcessValue(
        "linectl_beam_energy_electronvolts", "Measured beam energy.", "accelerator",
        "energy", "electronvolts",
    ),
    ProcessValue(
        "linectl_scan_width_metres", "Measured scan width.", "accelerator",
        "scan_width", "metres",
    ),
    ProcessValue(
        "linectl_vacuum_pascals", "Accelerator vacuum (pressure).", "accelerator",
        "vacuum", "pascals",
    ),
    ProcessValue(
        "linectl_line_speed_metres_per_second", "Measured line speed.", "conveyor",
        "speed", "metres_per_second",
    ),
    ProcessValue(
        "linectl_cable_tension_newtons", "Measured cable tension.", "conveyor",
        "tension", "newtons",
    ),
)  # fmt: skip
"""The process gauges; NaN while the value is unknown (no poll yet, or COMM_FAIL)."""

# ----------------------------------------------------------------------------- views


class SnapshotView(Protocol):
    """What the metrics read from a poll result (linectl.modbus.link.Snapshot)."""

    def value(self, name: str) -> float | int | None:
        """The named field's value in map units; None when unknown."""
        ...


class LinkStatsView(Protocol):
    """What the metrics read from a link's LinkStats."""

    @property
    def errors(self) -> Mapping[str, int]:
        """Failed requests by kind (running totals)."""
        ...

    @property
    def reconnects(self) -> int:
        """Connects after a lost connection (running total)."""
        ...

    @property
    def on_request(self) -> list[Callable[[int, float], None]]:
        """Hooks called with (function code, latency s) per answered request."""
        ...


class LinkView(Protocol):
    """What the metrics read from a PlcLink."""

    @property
    def name(self) -> str:
        """The PLC's name (the `plc` label)."""
        ...

    @property
    def connected(self) -> bool:
        """Whether a TCP connection is open."""
        ...

    @property
    def stats(self) -> LinkStatsView:
        """The link's counters."""
        ...


class ReportView(Protocol):
    """What the metrics read from the cycle's report (linectl.core.line.CycleReport)."""

    @property
    def state(self) -> LineState:
        """The line state after the cycle."""
        ...

    @property
    def outputs(self) -> Outputs:
        """The outputs of the cycle (set-points)."""
        ...

    @property
    def position_m(self) -> float | None:
        """Reel position (cable coordinate at the length counter), m; None between reels."""
        ...

    @property
    def active_alarms(self) -> Sequence[object]:
        """The latched alarms held."""
        ...


class CycleStatsView(Protocol):
    """What the metrics read from the service's CycleStats."""

    @property
    def cycles(self) -> int:
        """Cycles run (running total)."""
        ...

    @property
    def missed(self) -> int:
        """Cycles skipped after an overrun (running total)."""
        ...

    @property
    def stalls(self) -> int:
        """Stalls of this process the cycle noted (running total)."""
        ...

    @property
    def duration_s(self) -> Sequence[float]:
        """The most recent cycle durations, oldest first."""
        ...

    @property
    def lateness_s(self) -> Sequence[float]:
        """The most recent cycle start delays, oldest first."""
        ...


class ServiceView(Protocol):
    """The parts of linectl.service.LineService the metrics use (structural: no import)."""

    @property
    def line_id(self) -> str:
        """The line's id (the `line` label)."""
        ...

    @property
    def cfg(self) -> LoadedConfig:
        """The configuration (register maps for the units)."""
        ...

    @property
    def report(self) -> ReportView | None:
        """The last cycle's immutable report (None before the first cycle)."""
        ...

    @property
    def stats(self) -> CycleStatsView:
        """Cycle timing."""
        ...

    @property
    def acc(self) -> LinkView:
        """The accelerator link."""
        ...

    @property
    def cnv(self) -> LinkView:
        """The conveyor link."""
        ...

    @property
    def last_acc(self) -> SnapshotView | None:
        """The accelerator's latest poll."""
        ...

    @property
    def last_cnv(self) -> SnapshotView | None:
        """The conveyor's latest poll."""
        ...

    @property
    def observers(self) -> list[Callable[[Self], None]]:
        """Called with the service after every cycle."""
        ...

    @property
    def on_metres(self) -> list[Callable[[str, list[MetreRecord]], None]]:
        """Called with (reel id, final metres)."""
        ...

    @property
    def on_alarm(self) -> list[Callable[[Alarm], None]]:
        """Called with every alarm raised."""
        ...


class MqttStatsView(Protocol):
    """What the metrics read from the MQTT publisher, at scrape time (on the event loop,
    while a scrape is answered: plain attribute reads only, no I/O)."""

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        ...

    @property
    def queue_depth(self) -> int:
        """Messages waiting to be published."""
        ...

    @property
    def dropped_total(self) -> int:
        """Messages dropped (queue full), running total."""
        ...

    @property
    def replay_backlog(self) -> int:
        """Stored messages still to replay after a reconnect."""
        ...

    @property
    def published_total(self) -> int:
        """Messages published, running total."""
        ...


# ----------------------------------------------------------------------------- MQTT


class _MqttCollector:
    """Reads the bound MQTT stats at scrape time; yields nothing until one is bound, so a
    line without MQTT has no MQTT series (and no MQTT alert can fire for it)."""

    def __init__(self, line_id: str) -> None:
        self.line_id = line_id
        self.stats: MqttStatsView | None = None

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None:
            return iter(())
        return self._families(stats)

    def _families(self, s: MqttStatsView | None) -> Iterator[Metric]:
        line = [self.line_id]
        connected = GaugeMetricFamily(
            "linectl_mqtt_connected", "1 while the MQTT broker connection is up.", labels=["line"]
        )
        depth = GaugeMetricFamily(
            "linectl_mqtt_queue_depth", "Messages waiting to be published.", labels=["line"]
        )
        dropped = CounterMetricFamily(
            "linectl_mqtt_dropped", "Messages dropped because the queue was full.", labels=["line"]
        )
        backlog = GaugeMetricFamily(
            "linectl_mqtt_replay_backlog",
            "Stored messages still to replay after a reconnect.",
            labels=["line"],
        )
        published = CounterMetricFamily(
            "linectl_mqtt_published", "Messages published.", labels=["line"]
        )
        if s is not None:
            connected.add_metric(line, 1.0 if s.connected else 0.0)
            depth.add_metric(line, float(s.queue_depth))
            dropped.add_metric(line, float(s.dropped_total))
            backlog.add_metric(line, float(s.replay_backlog))
            published.add_metric(line, float(s.published_total))
        yield from (connected, depth, dropped, backlog, published)


# ----------------------------------------------------------------------------- exposition


class WithoutCreated:
    """The registry's metrics without prometheus_client's `*_created` samples.

    They carry each counter's creation time, which Prometheus 2 does not use; in the text
    format they would show up as gauges such as `linectl_metres_created`, which reads as a
    process value. The registry itself is left as it is.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for m in self.registry.collect():
            out = Metric(m.name, m.documentation, m.type, m.unit)
            out.samples = [s for s in m.samples if not s.name.endswith("_created")]
            yield out


# ----------------------------------------------------------------------------- metrics


class LineMetrics:
    """Every linectl series of one line, in a registry of its own.

    `attach(svc)` hooks it to a service; `bind_mqtt(stats)` adds the MQTT series. The
    daemon serves `WithoutCreated(registry)` (linectl.web.server.MetricsServer).
    """

    def __init__(self, line_id: str, registry: CollectorRegistry | None = None) -> None:
        self.line_id = line_id
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        line = line_id
        self._attached = False
        self._hook_errors = 0

        self.up = Gauge("linectl_up", "1 while linectl runs.", ["line"], registry=reg)
        self.up.labels(line).set(1)
        self.metrics_errors = Counter(
            "linectl_metrics_errors",
            "Exceptions caught in the metrics hooks (the line keeps running).",
            ["line"],
            registry=reg,
        ).labels(line)

        self.line_state = Gauge(
            "linectl_line_state",
            "1 for the line's current state, 0 for the others.",
            ["line", "state"],
            registry=reg,
        )
        self._state_children = {s: self.line_state.labels(line, s.value) for s in LineState}
        self._state: LineState | None = None

        self._process = {
            p.metric: Gauge(p.metric, p.help, ["line"], unit=p.unit, registry=reg).labels(line)
            for p in PROCESS_VALUES
        }
        self._factors: dict[str, float] = {}
        self.beam_current_sp = Gauge(
            "linectl_beam_current_setpoint_amperes",
            "Beam current set-point written to the accelerator.",
            ["line"],
            unit="amperes",
            registry=reg,
        ).labels(line)
        self.line_speed_sp = Gauge(
            "linectl_line_speed_setpoint_metres_per_second",
            "Line speed set-point written to the conveyor.",
            ["line"],
            unit="metres_per_second",
            registry=reg,
        ).labels(line)
        self.reel_position = Gauge(
            "linectl_reel_position_metres",
            "Position of the running reel at the length counter; NaN between reels.",
            ["line"],
            unit="metres",
            registry=reg,
        ).labels(line)
        for g in (*self._process.values(), self.beam_current_sp, self.line_speed_sp):
            g.set(math.nan)
        self.reel_position.set(math.nan)

        self.metres = Counter(
            "linectl_metres",
            "Final metres recorded, by verdict.",
            ["line", "verdict"],
            unit="metres",
            registry=reg,
        )
        self._metres = {v: self.metres.labels(line, verdict_label(v)) for v in Verdict}
        self.out_of_spec = Counter(
            "linectl_metres_out_of_spec",
            "Metres recorded not in spec, by cause (a metre with two causes counts under both).",
            ["line", "cause"],
            registry=reg,
        )
        for cause in METRE_CAUSES:
            self.out_of_spec.labels(line, cause)
        self.interlock_trips = Counter(
            "linectl_interlock_trips",
            "Alarms raised by the controller's interlocks, by kind.",
            ["line", "kind"],
            registry=reg,
        )
        # Every kind at 0 from the start, as the causes above: increase() then sees the
        # first trip of a kind, which a series that appears at 1 would hide.
        for kind in ALARM_KINDS:
            self.interlock_trips.labels(line, kind)
        self.alarms_active = Gauge(
            "linectl_alarms_active", "Latched alarms (held until reset).", ["line"], registry=reg
        ).labels(line)
        self.alarms_active.set(0)

        self.cycle_duration = Histogram(
            "linectl_control_cycle_duration_seconds",
            "Time one control cycle took (poll, step, write, account).",
            ["line"],
            unit="seconds",
            buckets=CYCLE_DURATION_BUCKETS_S,
            registry=reg,
        ).labels(line)
        self.cycle_lateness = Histogram(
            "linectl_control_cycle_lateness_seconds",
            "How late each control cycle started against its schedule.",
            ["line"],
            unit="seconds",
            buckets=CYCLE_LATENESS_BUCKETS_S,
            registry=reg,
        ).labels(line)
        self.cycles_missed = Counter(
            "linectl_control_cycles_missed",
            "Control cycles skipped because one overran by more than a period.",
            ["line"],
            registry=reg,
        ).labels(line)
        self.stalls = Counter(
            "linectl_control_stalls",
            "Times the control cycle woke a whole period late or more (this process was "
            "stalled); the PLCs' data was judged without the stall.",
            ["line"],
            registry=reg,
        ).labels(line)

        self.modbus_duration = Histogram(
            "linectl_modbus_request_duration_seconds",
            "Round trip of each answered Modbus request, by PLC and function.",
            ["line", "plc", "function"],
            unit="seconds",
            buckets=MODBUS_BUCKETS_S,
            registry=reg,
        )
        self.modbus_errors = Counter(
            "linectl_modbus_errors",
            "Failed Modbus requests, by PLC and kind.",
            ["line", "plc", "kind"],
            registry=reg,
        )
        self.modbus_reconnects = Counter(
            "linectl_modbus_reconnects",
            "Successful connects to a PLC after a lost connection.",
            ["line", "plc"],
            registry=reg,
        )
        self.modbus_connected = Gauge(
            "linectl_modbus_connected",
            "1 while the TCP connection to the PLC is open.",
            ["line", "plc"],
            registry=reg,
        )

        self._mqtt = _MqttCollector(line)
        reg.register(self._mqtt)

        # Running totals last seen, so that counters advance by the difference.
        self._seen_cycles = 0
        self._seen_missed = 0
        self._seen_stalls = 0
        self._seen_link: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------------ wiring

    def attach(self, svc: ServiceView) -> None:
        """Hook onto a service: observers, on_metres, on_alarm and both links' requests.

        ConfigError if a register map declares a unit the metrics cannot convert;
        LocalError if already attached or the service runs another line.
        """
        if self._attached:
            raise LocalError("metrics: already attached to a service")
        if svc.line_id != self.line_id:
            raise LocalError(
                f"metrics for line {self.line_id!r} cannot attach to line {svc.line_id!r}"
            )
        maps = {"accelerator": svc.cfg.accelerator_map, "conveyor": svc.cfg.conveyor_map}
        factors = {p.metric: unit_factor(maps[p.plc], p.field, p.unit) for p in PROCESS_VALUES}
        self._factors = factors
        for link in (svc.acc, svc.cnv):
            self._attach_link(link)
        svc.observers.append(self._guard(self.observe))
        svc.on_metres.append(self._guard(self.count_metres))
        svc.on_alarm.append(self._guard(self.count_alarm))
        self._attached = True
        self.observe(svc)

    def _attach_link(self, link: LinkView) -> None:
        plc = link.name
        for kind in LINK_ERROR_KINDS:
            self.modbus_errors.labels(self.line_id, plc, kind)
        self.modbus_reconnects.labels(self.line_id, plc)
        self.modbus_connected.labels(self.line_id, plc).set(0)
        children = {
            fc: self.modbus_duration.labels(self.line_id, plc, fn)
            for fc, fn in MODBUS_FUNCTIONS.items()
        }

        def on_request(fc: int, latency_s: float) -> None:
            child = children.get(fc)
            if child is None:
                child = children[fc] = self.modbus_duration.labels(
                    self.line_id, plc, modbus_function(fc)
                )
            child.observe(latency_s)

        link.stats.on_request.append(self._guard(on_request))

    def bind_mqtt(self, stats: MqttStatsView) -> None:
        """Export the MQTT publisher's stats (read at every scrape); replaces any earlier."""
        self._mqtt.stats = stats

    def _guard(self, fn: Callable[P, None]) -> Callable[P, None]:
        # The hooks run inside the control cycle and the Modbus request path: a metrics
        # bug must cost a series, never the line.
        def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                fn(*args, **kwargs)
            except Exception:
                self.metrics_errors.inc()
                self._hook_errors += 1
                if self._hook_errors == 1:
                    log.exception("metrics hook %s failed (logged once)", fn.__name__)

        return guarded

    # ------------------------------------------------------------------ hooks

    def observe(self, svc: ServiceView) -> None:
        """After every cycle: state, process values, set-points, timing, links."""
        report = svc.report
        if report is not None:
            self._set_state(report.state)
            self.alarms_active.set(len(report.active_alarms))
            out = report.outputs
            self.beam_current_sp.set(out.beam_current_sp_ma * 1e-3)
            self.line_speed_sp.set(out.speed_sp_m_min / 60.0)
            pos = report.position_m
            self.reel_position.set(math.nan if pos is None else pos)

        for p in PROCESS_VALUES:
            snap = svc.last_acc if p.plc == "accelerator" else svc.last_cnv
            v = None if snap is None else snap.value(p.field)
            factor = self._factors.get(p.metric)
            self._process[p.metric].set(
                math.nan if v is None or factor is None else float(v) * factor
            )

        self._observe_cycles(svc.stats)
        for link in (svc.acc, svc.cnv):
            self._observe_link(link)

    def _set_state(self, state: LineState) -> None:
        if state is self._state:
            return
        for s, child in self._state_children.items():
            child.set(1 if s is state else 0)
        self._state = state

    def _observe_cycles(self, stats: CycleStatsView) -> None:
        new = stats.cycles - self._seen_cycles
        if new < 0:  # a fresh CycleStats: start over from it
            new = stats.cycles
        self._seen_cycles = stats.cycles
        if new > 0:
            for x in _last(stats.duration_s, new):
                self.cycle_duration.observe(x)
            for x in _last(stats.lateness_s, new):
                self.cycle_lateness.observe(x)
        self._seen_missed = _advance(self.cycles_missed, stats.missed, self._seen_missed)
        self._seen_stalls = _advance(self.stalls, stats.stalls, self._seen_stalls)

    def _observe_link(self, link: LinkView) -> None:
        plc = link.name
        self.modbus_connected.labels(self.line_id, plc).set(1 if link.connected else 0)
        stats = link.stats
        for kind, total in stats.errors.items():
            key = (plc, kind)
            child = self.modbus_errors.labels(self.line_id, plc, kind)
            self._seen_link[key] = _advance(child, total, self._seen_link.get(key, 0))
        key = (plc, "reconnects")
        child = self.modbus_reconnects.labels(self.line_id, plc)
        self._seen_link[key] = _advance(child, stats.reconnects, self._seen_link.get(key, 0))

    def count_metres(self, reel_id: str, records: list[MetreRecord]) -> None:
        """Final metres: one per metre under its verdict, one per cause if not in spec."""
        for r in records:
            self._metres[r.verdict].inc()
            if r.verdict is not Verdict.IN_SPEC:
                for cause in r.causes:
                    self.out_of_spec.labels(self.line_id, cause).inc()

    def count_alarm(self, alarm: Alarm) -> None:
        """One alarm raised."""
        self.interlock_trips.labels(self.line_id, alarm.kind).inc()


class _Incrementable(Protocol):
    def inc(self, amount: float = 1) -> None: ...


def _advance(counter: _Incrementable, total: int, seen: int) -> int:
    """Advance a counter that mirrors a running total; returns the total to remember."""
    delta = total - seen
    if delta < 0:  # the source started over (a new stats object): count it from zero
        delta = total
    if delta > 0:
        counter.inc(delta)
    return total


def _last(xs: Sequence[float], n: int) -> Iterable[float]:
    return xs[-n:] if n < len(xs) else xs


__all__ = [
    "LineMetrics",
    "MqttStatsView",
    "ServiceView",
    "WithoutCreated",
    "unit_factor",
    "verdict_label",
]
