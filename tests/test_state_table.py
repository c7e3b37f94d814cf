"""The state machine as data: linectl.core.control.TRANSITIONS is the diagram in
docs/control.md, and the controller takes no transition outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_control import new_rig

from linectl.core.control import TRANSITIONS, IllegalTransitionError, LineState

ROOT = Path(__file__).resolve().parents[1]
EDGE = re.compile(r"^\s*(\[\*\]|[A-Z]+) --> ([A-Z]+): (.+)$")


def _diagram() -> tuple[dict[tuple[LineState, LineState], str], LineState]:
    """The edges of docs/control.md's state diagram, and its initial state."""
    text = (ROOT / "docs" / "control.md").read_text(encoding="utf-8")
    block = text.split("```mermaid\nstateDiagram-v2\n", 1)[1].split("```", 1)[0]
    edges: dict[tuple[LineState, LineState], str] = {}
    initial: LineState | None = None
    for line in block.splitlines():
        m = EDGE.match(line)
        assert m, f"not an edge of the diagram: {line!r}"
        old, new, label = m.groups()
        if old == "[*]":
            initial = LineState[new]
            continue
        key = (LineState[old], LineState[new])
        assert key not in edges, f"edge twice in the diagram: {line!r}"
        edges[key] = label
    assert initial is not None
    return edges, initial


def test_the_diagram_is_the_table() -> None:
    edges, initial = _diagram()
    assert edges == dict(TRANSITIONS)
    assert initial is LineState.OFFLINE
    assert new_rig().ctl.state is initial


def test_the_table_keeps_the_interlock_promises() -> None:
    states = set(LineState)
    # Data loss reaches OFFLINE from every state; an interlock reaches FAULT from every
    # state with data; FAULT is left only by an operator reset (or data loss).
    assert {old for old, new in TRANSITIONS if new is LineState.OFFLINE} == states - {
        LineState.OFFLINE
    }
    assert {old for old, new in TRANSITIONS if new is LineState.FAULT} == states - {LineState.FAULT}
    assert {new for old, new in TRANSITIONS if old is LineState.FAULT} == {
        LineState.IDLE,
        LineState.OFFLINE,
    }
    # Product runs only through the start sequence, from READY.
    assert {old for old, new in TRANSITIONS if new is LineState.RUNNING} == {LineState.STARTING}
    assert {old for old, new in TRANSITIONS if new is LineState.STARTING} == {LineState.READY}
    # Every state can be reached from the initial one.
    seen, todo = {LineState.OFFLINE}, [LineState.OFFLINE]
    while todo:
        s = todo.pop()
        for old, new in TRANSITIONS:
            if old is s and new not in seen:
                seen.add(new)
                todo.append(new)
    assert seen == states


@pytest.mark.parametrize(
    ("old", "new"),
    [(o, n) for o in LineState for n in LineState if o is not n and (o, n) not in TRANSITIONS],
)
def test_a_transition_outside_the_table_raises(old: LineState, new: LineState) -> None:
    rig = new_rig()
    rig.ctl.state = old
    with pytest.raises(IllegalTransitionError, match=f"{old.value} -> {new.value}"):
        rig.ctl._to(0.0, new, "test")
    assert rig.ctl.state is old, "an illegal transition changed the state"
