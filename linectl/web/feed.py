"""The HMI's live state as JSON, and the messages that keep a client's copy true. Pure.

`build_state()` turns one moment of the line (`FeedInputs`) into the state document the
page shows (docs/hmi.md, "The live feed"). `Feed` holds the newest state, numbered by a
sequence that grows whenever anything in it changes; `ClientView` is what one client was
last sent, so its next message is a delta from exactly that: a client that falls behind
(a slow link, a browser tab in the background) gets one bigger delta or a new snapshot
later, never a queue of stale ones. Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from linectl import dose
from linectl.config import Recipe
from linectl.core.control import AccView, CnvView, LineState, Outputs, beam_measured_on
from linectl.core.ledger import MetreRecord
from linectl.telemetry import AlarmView, LineStatus, LiveValue, alarm_view_json

TREND_WINDOW_MS = 10 * 60 * 1000
"""The trend chart's span: the last 10 minutes of current and speed."""
TREND_PERIOD_MS = 500
"""One trend row every half second: 1,200 rows in the window."""
MAX_DOSE_POINTS = 200_000
"""A reel's dose points held for the chart (a 200 km reel); the records keep every metre."""

SERIES_KEYS = ("dose", "trend")
"""State keys that grow by appending; every other key is replaced whole in a delta."""

_RUNNING_STATES = (LineState.STARTING, LineState.RUNNING)
_LINE_OK_STATES = (LineState.READY, LineState.STARTING, LineState.RUNNING)


@dataclass(frozen=True, slots=True)
class LinkState:
    """One PLC link as the banner shows it."""

    up: bool
    """Its data is fresh enough to control with."""
    age_ms: int | None
    """Age of its newest data (None: nothing read yet)."""


@dataclass(frozen=True, slots=True)
class ReelFacts:
    """The reel on the line."""

    reel_id: str
    operator: str
    planned_length_m: float
    started: bool
    position_m: float | None


@dataclass(frozen=True, slots=True)
class FeedInputs:
    """One moment of the line, gathered by the server from the service."""

    t_ms: int
    line_id: str
    status: LineStatus
    recipe_name: str
    recipe: Recipe
    speed_limit_m_min: float
    """The fastest the beam can dose the recipe's minimum at its maximum current."""
    weight_sum: float
    """The passes' summed weights (dose now = K I sum(w) / (v W))."""
    reel: ReelFacts | None
    acc: AccView | None
    cnv: CnvView | None
    acc_link: LinkState
    cnv_link: LinkState
    broker: str
    """"connected", "disconnected" or "off"."""
    outputs: Outputs
    live: Mapping[str, LiveValue]
    alarms: Sequence[AlarmView]


def _num(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def _sig(x: float | None, digits: int = 3) -> float | None:
    """`x` to `digits` significant digits (a vacuum of 1.0e-4 Pa has no decimals to keep)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def live_number(live: Mapping[str, LiveValue], name: str) -> float | None:
    """A live value as a number (None when unknown)."""
    v = live.get(name)
    if v is None or v.value is None or isinstance(v.value, bool):
        return None
    return float(v.value)


def dose_now_kgy(inp: FeedInputs) -> float | None:
    """The dose the cable under the beam takes now, from the measured current and speed
    (None when either is unknown or the cable stands)."""
    current = live_number(inp.live, "beam_current_ma")
    speed = live_number(inp.live, "speed_m_min")
    width = live_number(inp.live, "scan_width_cm") or inp.recipe.scan_width_cm
    if current is None or speed is None or speed <= 0.01 or width <= 0:
        return None
    # D = K I sum(w) / (v W): the dose law, with the live values.
    return dose.dose_kgy(inp.recipe.k_dose, current, speed, width, inp.weight_sum)


def _permissives(inp: FeedInputs) -> dict[str, dict[str, Any]]:
    state = LineState(inp.status.state)
    latched = [a.kind for a in inp.alarms if a.latched and a.active]
    if state in _LINE_OK_STATES:
        line = {"ok": True, "why": ""}
    else:
        why = inp.status.not_ready_reason or f"line {state.value}: {inp.status.cause}"
        line = {"ok": False, "why": why}
    if latched:
        beam = {"ok": False, "why": "alarms not reset: " + ", ".join(sorted(latched))}
    elif not inp.acc_link.up:
        beam = {"ok": False, "why": "accelerator PLC not answering"}
    elif state not in _RUNNING_STATES:
        beam = {"ok": False, "why": f"line {state.value}: the beam runs only with a reel"}
    else:
        beam = {"ok": True, "why": ""}
    return {"beam": beam, "line": line}


def build_state(inp: FeedInputs) -> dict[str, Any]:
    """The state document, without its growing series (`dose`, `trend`: the Feed adds
    them)."""
    r = inp.recipe
    acc, cnv, out = inp.acc, inp.cnv, inp.outputs
    beam_on = acc is not None and acc.ok and beam_measured_on(acc)
    reel = inp.reel
    return {
        "t_ms": inp.t_ms,
        "line_id": inp.line_id,
        "status": {
            "state": inp.status.state,
            "cause": inp.status.cause,
            "since_ms": inp.status.t_ms,
            "not_ready_reason": inp.status.not_ready_reason,
        },
        "recipe": {
            "name": inp.recipe_name,
            "product": r.product,
            "version": r.version,
            "target_dose_kgy": r.target_dose_kgy,
            "min_dose_kgy": r.min_dose_kgy,
            "max_dose_kgy": r.max_dose_kgy,
            "speed_min_m_min": r.speed_min_m_min,
            "speed_max_m_min": r.speed_max_m_min,
            "beam_current_max_ma": r.beam_current_max_ma,
        },
        "reel": None
        if reel is None
        else {
            "reel_id": reel.reel_id,
            "operator": reel.operator,
            "planned_length_m": reel.planned_length_m,
            "position_m": _num(reel.position_m, 2),
            "started": reel.started,
        },
        "permissives": _permissives(inp),
        "beam": {
            "on": beam_on,
            "hv_on": bool(acc is not None and acc.ok and acc.hv_on),
            "current_ma": _num(live_number(inp.live, "beam_current_ma"), 3),
            "current_sp_ma": _num(out.beam_current_sp_ma, 3),
            "energy_mev": _num(live_number(inp.live, "energy_mev"), 3),
            "vacuum_pa": _sig(live_number(inp.live, "vacuum_pa")),
        },
        "conveyor": {
            "running": bool(cnv is not None and cnv.ok and cnv.running),
            "speed_m_min": _num(live_number(inp.live, "speed_m_min"), 2),
            "speed_sp_m_min": _num(out.speed_sp_m_min, 2),
            "speed_limit_m_min": _num(inp.speed_limit_m_min, 2),
            "tension_n": _num(live_number(inp.live, "tension_n"), 1),
        },
        "dose_now_kgy": _num(dose_now_kgy(inp), 2),
        "links": {
            "accelerator": {"up": inp.acc_link.up, "age_ms": inp.acc_link.age_ms},
            "conveyor": {"up": inp.cnv_link.up, "age_ms": inp.cnv_link.age_ms},
            "broker": inp.broker,
        },
        "alarms": [alarm_view_json(a) for a in inp.alarms],
    }


def dose_point(m: MetreRecord) -> list[Any]:
    """One metre on the dose chart: [index, dose, min, max, verdict]."""
    return [m.index, _num(m.dose_kgy), _num(m.min_dose_kgy), _num(m.max_dose_kgy), m.verdict.value]


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


@dataclass
class ClientView:
    """What one client was last sent: the basis of its next delta."""

    seq: int = -1
    sent: dict[str, str] = field(default_factory=dict)
    """Top-level key -> its JSON as last sent."""
    dose_reel: str | None = None
    dose_gen: int = -1
    dose_n: int = 0
    trend_last_ms: int = -1


class Feed:
    """The newest state and its sequence number, and the growing series."""

    def __init__(self) -> None:
        self.seq = 0
        self.state: dict[str, Any] = {}
        self._strs: dict[str, str] = {}
        self.dose_reel: str | None = None
        self.dose_gen = 0
        """Grows when the dose series is rebuilt (a new reel, stored metres merged in)."""
        self._dose: dict[int, list[Any]] = {}
        self._dose_list: list[list[Any]] = []
        self._dose_sorted = True
        self.trend: deque[list[Any]] = deque()

    # ------------------------------------------------------------------ series

    def start_dose(self, reel_id: str | None) -> None:
        """The dose chart now belongs to `reel_id` (empty until its metres come)."""
        if reel_id != self.dose_reel:
            self.dose_reel = reel_id
            self._dose.clear()
            self._dose_list = []
            self._dose_sorted = True
            self.dose_gen += 1
            self.seq += 1

    def add_metres(self, reel_id: str, metres: Iterable[MetreRecord]) -> None:
        """Metres recorded for `reel_id` (ignored unless it is the chart's reel)."""
        if reel_id != self.dose_reel:
            return
        changed = False
        for m in metres:
            if len(self._dose) >= MAX_DOSE_POINTS and m.index not in self._dose:
                break
            point = dose_point(m)
            if m.index in self._dose:
                # A metre recorded again (never expected): the chart is rebuilt.
                self._dose_sorted = False
            elif self._dose_list and m.index < self._dose_list[-1][0]:
                self._dose_sorted = False
            self._dose[m.index] = point
            if self._dose_sorted:
                self._dose_list.append(point)
            changed = True
        if not self._dose_sorted:
            self._dose_list = [self._dose[i] for i in sorted(self._dose)]
            self._dose_sorted = True
            self.dose_gen += 1
        if changed:
            self.seq += 1

    def add_trend(self, t_ms: int, current_ma: float | None, speed_m_min: float | None) -> None:
        """One trend row; rows older than the window are dropped."""
        self.trend.append([t_ms, _num(current_ma, 3), _num(speed_m_min, 2)])
        while self.trend and self.trend[0][0] < t_ms - TREND_WINDOW_MS:
            self.trend.popleft()
        self.seq += 1

    @property
    def dose_points(self) -> list[list[Any]]:
        """The chart's points, by metre."""
        return self._dose_list

    # ------------------------------------------------------------------ state

    def update(self, state: Mapping[str, Any]) -> bool:
        """Take a new state document; True if anything in it changed. `t_ms` alone
        changing is no change (the heartbeat carries the time)."""
        strs = {k: _dumps(v) for k, v in state.items() if k != "t_ms"}
        changed = strs != self._strs
        self.state = dict(state)
        if changed:
            self._strs = strs
            self.seq += 1
        return changed

    def snapshot(self, view: ClientView) -> dict[str, Any]:
        """A full snapshot for a client; `view` becomes what it holds."""
        state = dict(self.state)
        state["dose"] = {"reel_id": self.dose_reel, "points": list(self._dose_list)}
        state["trend"] = list(self.trend)
        view.seq = self.seq
        view.sent = dict(self._strs)
        view.dose_reel, view.dose_gen, view.dose_n = (
            self.dose_reel,
            self.dose_gen,
            len(self._dose_list),
        )
        view.trend_last_ms = self.trend[-1][0] if self.trend else -1
        return {"type": "snapshot", "seq": self.seq, "state": state}

    def delta(self, view: ClientView) -> dict[str, Any] | None:
        """What changed since the client's `view`, as one message (None: nothing did);
        `view` becomes the new basis."""
        if view.seq == self.seq:
            return None
        changes: dict[str, Any] = {}
        for key, text in self._strs.items():
            if view.sent.get(key) != text:
                changes[key] = self.state[key]
                view.sent[key] = text
        for key in list(view.sent):
            if key not in self._strs:
                changes[key] = None
                del view.sent[key]
        append: dict[str, Any] = {}
        if view.dose_reel != self.dose_reel or view.dose_gen != self.dose_gen:
            changes["dose"] = {"reel_id": self.dose_reel, "points": list(self._dose_list)}
        elif len(self._dose_list) > view.dose_n:
            append["dose"] = self._dose_list[view.dose_n :]
        view.dose_reel, view.dose_gen = self.dose_reel, self.dose_gen
        view.dose_n = len(self._dose_list)
        # The rows the client has not had are at the end: walk back to them, never
        # through the whole 10-minute window (20 clients x 1,200 rows a round).
        rows: list[list[Any]] = []
        for row in reversed(self.trend):
            if row[0] <= view.trend_last_ms:
                break
            rows.append(row)
        rows.reverse()
        if rows:
            append["trend"] = rows
            view.trend_last_ms = rows[-1][0]
        changes["t_ms"] = self.state.get("t_ms")
        msg: dict[str, Any] = {"type": "delta", "base": view.seq, "seq": self.seq}
        if changes:
            msg["set"] = changes
        if append:
            msg["append"] = append
        view.seq = self.seq
        return msg
