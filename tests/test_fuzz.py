"""Fuzzing: what linectl takes from outside, mutated at random (hypothesis).

Four kinds of input reach linectl from outside: configuration files, operator commands
over MQTT, and the PLCs' register values. For each the promise is the same: a clear error
or a safe, recorded outcome; never a crash of the daemon, never a changed state from an
input that was refused.

1. Configuration: line.toml, the register maps and recipes, generated from the shipped
   files with mutated values (wrong types, out of range, unknown and missing keys,
   overlapping addresses, huge numbers, unicode, NaN and infinities, broken bytes):
   they load, or raise ConfigError naming the file.
2. Commands: `parse_command` on arbitrary bytes, malformed and deeply nested JSON, wrong
   types, huge payloads and unknown commands gives a Command or a CommandError; a
   Command holds only what the records can store. Through a live service against the
   simulators, in every line state, a refused command changes nothing and every command
   is audited.
3. Register values: arbitrary 16-bit words through the codec, the views, the controller,
   the counter aligner and the dose ledger (NaN and infinities from float32 bit
   patterns, out-of-range numbers, counters jumping anywhere): never an exception, never
   the beam on with a reading that is not a number or out of range, never a metre in
   spec from a reading that is not a number.

Defects these tests found are fixed where they were (each fix's comment names this file);
the explicit @example cases are the failing inputs they found.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import os
import re
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from e2e_scenarios import TRUE_K, compact_config, endpoints
from harness import COMPACT, ClosedLoop, decode_inputs
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from linectl.codec import CodecError, decode, encode, register_count
from linectl.commands import (
    MAX_COMMAND_BYTES,
    Command,
    CommandError,
    CommandName,
    parse_command,
)
from linectl.config import (
    LoadedConfig,
    MqttConfig,
    RegisterField,
    load_config,
    load_recipe,
)
from linectl.core.align import AccPoint, CnvPoint, CounterAligner, PlcClock
from linectl.core.control import AccView, CnvView, Controller, LineState, Outputs
from linectl.core.ledger import DoseLedger, LedgerSample, MetreRecord, Verdict
from linectl.core.views import (
    CounterUnits,
    acc_view,
    acc_writes,
    cnv_view,
    cnv_writes,
    plc_clock_modulus_ms,
)
from linectl.errors import ConfigError
from linectl.modbus.plan import plan_reads
from linectl.service import LineService, ReelRequest, select_recipe
from linectl.store import RecordStore
from simulators.server import SimulatedLine

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"
CFG: LoadedConfig = load_config(CONFIG_DIR, environ={})
RECIPE = CFG.load_recipe("pv-1x6-en50618")
AMAP, CMAP = CFG.accelerator_map, CFG.conveyor_map


SCALE = int(os.environ.get("LINECTL_FUZZ_SCALE", "1"))
"""LINECTL_FUZZ_SCALE=20 runs twenty times the examples (a longer hunt, e.g. nightly)."""


def fuzz(max_examples: int) -> settings:
    """Hypothesis settings sized so that this file runs in about half a minute."""
    return settings(
        max_examples=max_examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# =========================================================================== 1. config


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        # JSON's string escapes are TOML's basic-string escapes; non-ASCII goes raw.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def toml_dumps(doc: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """A TOML document (enough of TOML for linectl's files; no TOML writer in stdlib)."""
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)
    ]
    out = "\n".join(lines) + "\n"
    for k, v in doc.items():
        if isinstance(v, dict):
            path = (*prefix, k)
            out += f"\n[{'.'.join(_toml_key(p) for p in path)}]\n" + toml_dumps(v, path)
    return out


def _read(name: str) -> dict[str, Any]:
    return tomllib.loads((CONFIG_DIR / name).read_text())


SHIPPED: dict[str, dict[str, Any]] = {
    "line.toml": _read("line.toml"),
    "registers/accelerator.toml": _read("registers/accelerator.toml"),
    "registers/conveyor.toml": _read("registers/conveyor.toml"),
}
RECIPE_DOC = _read("recipes/pv-1x6-en50618.toml")


def test_the_toml_writer_round_trips_the_shipped_files() -> None:
    # The mutations below are only as good as the writer that turns them into files.
    for doc in (*SHIPPED.values(), RECIPE_DOC):
        assert tomllib.loads(toml_dumps(doc)) == doc


def _paths(doc: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for k, v in doc.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


def _tables(doc: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for k, v in doc.items():
        if isinstance(v, dict):
            yield from _tables(v, (*prefix, k))


def _node(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for k in path:
        doc = doc[k]
    return doc


SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 15, 16, 124, 125, 65535, 65536, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 5e-324, 1e-300]),
    st.text(max_size=12),
    st.sampled_from(
        [
            *("", "nan", "ABCD", "DCBA", "float32", "uint32", "bits", "holding", "input", "rw"),
            *("r", "mm", "µC", "kg", "h", "\x00", "a\x00b", "\ud800", "é", "../x.toml", "."),
        ]
    ),
)
VALUES = st.one_of(
    SCALARS,
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=6), SCALARS, max_size=2),
)


@st.composite
def mutations(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """The document with one to three random changes."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "set", "set", "scale", "delete", "unknown", "overlap"]))
        paths = list(_paths(doc))
        if kind == "unknown" or not paths:
            table = draw(st.sampled_from(list(_tables(doc))))
            key = draw(st.text(min_size=1, max_size=8))
            _node(doc, table)[key] = draw(VALUES)
            continue
        if kind == "overlap" and "fields" in doc and isinstance(doc["fields"], dict):
            fields = [k for k, v in doc["fields"].items() if isinstance(v, dict)]
            if len(fields) >= 2:
                a, b = draw(st.lists(st.sampled_from(fields), min_size=2, max_size=2))
                fa, fb = doc["fields"][a], doc["fields"][b]
                base = fb.get("address", 0)
                # (An earlier change may have made that address a string, a list, None.)
                numeric = isinstance(base, int | float)
                fa["address"] = base + draw(st.integers(0, 1)) if numeric else base
                fa["table"] = fb.get("table", "input")
                continue
        path = draw(st.sampled_from(paths))
        parent, key = _node(doc, path[:-1]), path[-1]
        if kind == "delete":
            del parent[key]
        elif kind == "scale" and isinstance(parent[key], int | float):
            # A plausible number made huge, tiny or negative.
            exp = draw(st.integers(-300, 300))
            parent[key] = parent[key] * draw(st.sampled_from([1, -1])) * 10.0**exp
        else:
            parent[key] = draw(VALUES)
    return doc


def _write(path: Path, text: str, splice: tuple[int, bytes] | None) -> None:
    # surrogatepass: a lone surrogate becomes bytes that are not UTF-8, as a broken
    # editor or a wrong encoding would leave them.
    data = text.encode("utf-8", "surrogatepass")
    if splice is not None:
        at, junk = splice
        at %= len(data) + 1
        data = data[:at] + junk + data[at:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _named_paths(d: Path, target: str, docs: Mapping[str, Any]) -> list[str]:
    """Files whose name an error about `target` may rightly carry."""
    names = [str(d / target)]
    if target == "line.toml":
        line_doc = docs["line.toml"]
        # A splice may land inside a register_map string: the file on disk is the truth.
        with contextlib.suppress(OSError, ValueError):
            line_doc = tomllib.loads((d / target).read_bytes().decode("utf-8"))
        for plc in ("accelerator", "conveyor"):
            section = line_doc.get(plc)
            rm = section.get("register_map") if isinstance(section, dict) else None
            if isinstance(rm, str):
                p = Path(rm) if rm.startswith("/") else d / rm
                names += [str(p), repr(p)]
    return names


SPLICES = st.one_of(
    st.none(),
    st.none(),
    st.tuples(st.integers(0, 10**5), st.binary(min_size=1, max_size=6)),
)


@fuzz(200)
@given(data=st.data())
def test_config_files_load_or_say_which_file_is_wrong(data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(sorted(SHIPPED)), label="file")
    docs = dict(SHIPPED)
    docs[target] = data.draw(mutations(SHIPPED[target]), label="mutated")
    splice = data.draw(SPLICES, label="splice")
    _check_config(target, docs, splice)


def _with(target: str, **changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SHIPPED[target])
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        _node(doc, tuple(parents))[key] = value
    return {**SHIPPED, target: doc}


@pytest.mark.parametrize(
    ("target", "docs", "splice"),
    [
        # Failing inputs found by the test above: each raised another exception than
        # ConfigError, or passed `linectl config check` and was then refused by the
        # daemon at start.
        pytest.param("line.toml", SHIPPED, (40, b"\xff"), id="not-utf8"),
        pytest.param(
            "line.toml",
            _with("line.toml", accelerator__register_map="registers/acc\x00elerator.toml"),
            None,
            id="nul-in-path",
        ),
        pytest.param("line.toml", SHIPPED, (0, b"y = " + b"[" * 3000 + b"\n"), id="deep-nesting"),
        pytest.param(
            "registers/accelerator.toml",
            _with("registers/accelerator.toml", fields__charge_total__unit="kg"),
            None,
            id="counter-unit-the-ledger-cannot-use",
        ),
        pytest.param(
            "registers/conveyor.toml",
            _with("registers/conveyor.toml", fields__clock__unit="h"),
            None,
            id="clock-unit-the-aligner-cannot-use",
        ),
        pytest.param(
            "registers/accelerator.toml",
            _with("registers/accelerator.toml", fields__beam_current__scale=math.nan),
            None,
            id="nan-scale",
        ),
    ],
)
def test_config_failing_inputs_found_by_fuzzing(
    target: str, docs: dict[str, Any], splice: tuple[int, bytes] | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, doc in docs.items():
            _write(Path(tmp) / name, toml_dumps(doc), splice if name == target else None)
        with pytest.raises(ConfigError) as info:
            load_config(tmp, environ={})
    assert any(n in str(info.value) for n in _named_paths(Path(tmp), target, docs))


def _assert_finite_floats(node: Any, where: str = "line") -> None:
    if isinstance(node, float):
        assert math.isfinite(node), where
    elif isinstance(node, dict):
        for k, v in node.items():
            _assert_finite_floats(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _assert_finite_floats(v, f"{where}[{i}]")


def _check_config(target: str, docs: Mapping[str, Any], splice: tuple[int, bytes] | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, doc in docs.items():
            _write(d / name, toml_dumps(doc), splice if name == target else None)
        try:
            loaded = load_config(d, environ={})
        except ConfigError as exc:
            msg = str(exc)
            assert any(n in msg for n in _named_paths(d, target, docs)), msg
            return
        # Accepted: whatever the daemon builds from it at start must take it too, or
        # `linectl config check` would say ok to a file the daemon then refuses.
        CounterUnits.from_maps(loaded.accelerator_map, loaded.conveyor_map)
        plc_clock_modulus_ms(loaded.accelerator_map)
        plc_clock_modulus_ms(loaded.conveyor_map)
        _assert_finite_floats(loaded.line.model_dump())
        for plc in ("accelerator", "conveyor"):
            plan_reads(loaded.register_map(plc), loaded.endpoint(plc).max_gap)
            for f in loaded.register_map(plc).fields.values():
                for x in (f.scale, f.default, f.min, f.max):
                    assert x is None or math.isfinite(x), f"{plc}.{f.name}: {x}"


HEALTHY_ACC = AccView(
    ok=True,
    ready=True,
    hv_on=True,
    beam_on=True,
    vacuum_ok=True,
    scan_ok=True,
    cooling_ok=True,
    safety_ok=True,
    beam_current_ma=10.0,
    energy_mev=1.2,
    scan_width_cm=100.0,
)
HEALTHY_CNV = CnvView(ok=True, ready=True, running=True, at_speed=True, tension_ok=True)


@fuzz(200)
@given(doc=mutations(RECIPE_DOC), splice=SPLICES)
# Found by this test: energy_tolerance_mev = inf was accepted (the energy interlock can
# then never trip); numbers that overflow gave a NaN current the checks let through.
@example(doc={**RECIPE_DOC, "energy_tolerance_mev": math.inf}, splice=None)
@example(
    doc={
        **RECIPE_DOC,
        **{"target_dose_kgy": 1e300, "max_dose_kgy": 1e301, "k_dose": 1e308},
        "speed_max_m_min": 1e10,
    },
    splice=None,
)
def test_recipes_load_or_say_which_file_is_wrong(
    doc: dict[str, Any], splice: tuple[int, bytes] | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipes" / "fuzzed.toml"
        _write(path, toml_dumps(doc), splice)
        try:
            recipe = load_recipe(path, CFG)
        except ConfigError as exc:
            error = str(exc)
        else:
            error = ""
    if error:
        assert str(path) in error
        return
    # No limit of an accepted recipe is a number that no comparison can fail.
    for key, value in recipe.model_dump().items():
        assert not isinstance(value, float) or math.isfinite(value), (key, value)
    # A recipe the line takes gives the controller finite set-points.
    ctl = Controller(recipe, CFG.line.geometry)
    assert math.isfinite(ctl.v_max)
    assert ctl.v_max > 0
    for v in (0.0, ctl.v_min, ctl.v_low, ctl.v_max):
        i = ctl.current_for(v, recipe.scan_width_cm)
        assert recipe.beam_current_min_ma <= i <= recipe.beam_current_max_ma
    acc = replace(HEALTHY_ACC, energy_mev=recipe.energy_mev)
    for k in range(3):
        out = ctl.step(0.05 * k, acc, replace(HEALTHY_CNV, speed_m_min=ctl.v_low), None)
        _assert_encodable(out)


# =========================================================================== 2. commands

CMD_NAMES = [c.value for c in CommandName]
TOPIC_NAMES = st.one_of(st.sampled_from(CMD_NAMES), st.text(max_size=12), st.none())
TOPIC_SENDERS = st.one_of(
    st.sampled_from(["op-1", "scada-1", "a", "x" * 128, "x" * 129, "op-1\n", "é"]),
    st.text(max_size=12),
    st.none(),
)
_FREE_TEXT = {"operator", "reason"}
_SAFE_TEXT = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]*")


def _assert_storable(cmd: Command) -> None:
    """What a parsed command holds can go into the records, the topics and the logs."""
    assert cmd.name.value in CMD_NAMES
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", cmd.sender)
    if cmd.request_id:
        assert re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", cmd.request_id)
    if cmd.reel_id is not None:
        assert re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", cmd.reel_id)
    if cmd.recipe is not None:
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,128}", cmd.recipe)
    if cmd.length_m is not None:
        assert math.isfinite(cmd.length_m)
        assert cmd.length_m > 0
    for key in ("operator", "reason", "alarm"):
        text = getattr(cmd, key)
        if text is not None:
            assert len(text) <= 200
            assert _SAFE_TEXT.fullmatch(text), (key, text)
            text.encode("utf-8")  # SQLite stores it; a lone surrogate raised here
    # The audit trail's JSON, without NaN.
    json.dumps(cmd.detail(), allow_nan=False, ensure_ascii=False).encode("utf-8")


def _parse(payload: bytes | str, name: str | None, sender: str | None) -> Command | None:
    try:
        cmd = parse_command(payload, name=name, sender=sender)
    except CommandError as exc:
        refusal = str(exc)
    else:
        refusal = ""
    if refusal or cmd is None:
        assert refusal, "a refusal says why"
        return None
    _assert_storable(cmd)
    return cmd


@fuzz(300)
@given(payload=st.binary(max_size=400), name=TOPIC_NAMES, sender=TOPIC_SENDERS)
def test_any_bytes_give_a_command_or_a_clear_error(
    payload: bytes, name: str | None, sender: str | None
) -> None:
    _parse(payload, name, sender)


JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
JSON_ANY = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
IDS = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
    st.sampled_from(["R1", "R1\n", "R 1", "", "x" * 65, "R\x00"]),
)
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["A. Smith", "\ud800", "a\nb", "\x1b[31m", "é" * 201, "x" * 200]),
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "command": st.one_of(st.sampled_from(CMD_NAMES), JSON_ANY),
    "sender": st.one_of(st.sampled_from(["op-1", "eve", "op-1\n"]), JSON_ANY),
    "request_id": st.one_of(IDS, JSON_ANY),
    "reason": st.one_of(TEXT, JSON_ANY),
    "reel_id": st.one_of(IDS, JSON_ANY),
    "length_m": st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**30), 10**30),
        st.sampled_from([10**400, -(10**400), 2000, True, "5"]),
        JSON_ANY,
    ),
    "operator": st.one_of(TEXT, JSON_ANY),
    "recipe": st.one_of(
        st.sampled_from(["pv-1x6-en50618", "../etc/passwd", "a.toml", "x\n"]), TEXT, JSON_ANY
    ),
    "alarm": st.one_of(st.sampled_from(["*", "vacuum", "Vacuum!", "vacuum\n"]), TEXT, JSON_ANY),
    "duration_s": st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([43200, 43200.001, 10**400, 0, -1, True, "60"]),
        JSON_ANY,
    ),
}
COMMAND_OBJECTS = st.fixed_dictionaries(
    {},
    optional={**FIELD_VALUES, "unknown": JSON_ANY, "speed": JSON_ANY},
)
GOOD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "reel_id": st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
    "request_id": st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
    "length_m": st.one_of(st.floats(0.001, 1e7), st.integers(1, 10**6)),
    "operator": st.text(max_size=40),
    "reason": st.text(max_size=80),
    "recipe": st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True),
    "alarm": st.one_of(st.just("*"), st.from_regex(r"[a-z0-9_]{1,64}", fullmatch=True)),
    "duration_s": st.one_of(st.floats(0.001, 43200), st.integers(1, 43200)),
}
# One character away from a good value: control characters, lone surrogates, a trailing
# newline, numbers too large for a float.
NASTY = st.one_of(
    JSON_ANY,
    st.sampled_from([10**400, -(10**400), 2**1024, "R1\n", "\ud800", "a\x00", "x" * 201]),
    st.tuples(
        st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True),
        st.text(st.characters(categories=["Cs", "Cc"]), min_size=1, max_size=2),
    ).map("".join),
)
REQUIRED = {
    "start_reel": ({"reel_id", "length_m"}, {"operator", "recipe"}),
    "stop": (set(), set()),
    "ack_alarm": ({"alarm"}, set()),
    "reset": (set(), set()),
    "select_recipe": ({"recipe"}, set()),
    "end_reel": ({"reel_id", "reason"}, set()),
    "shelve_alarm": ({"alarm", "duration_s", "reason"}, set()),
    "unshelve_alarm": ({"alarm"}, set()),
}


@st.composite
def near_valid_commands(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid command (name and payload), then zero to two of its values made nasty."""
    name = draw(st.sampled_from(CMD_NAMES))
    required, optional = REQUIRED[name]
    obj = {k: draw(GOOD_VALUES[k]) for k in sorted(required)}
    for k in sorted(optional | {"request_id", "reason"}):
        if draw(st.booleans()):
            obj[k] = draw(GOOD_VALUES[k])
    for _ in range(draw(st.integers(0, 2))):
        if obj:
            obj[draw(st.sampled_from(sorted(obj)))] = draw(NASTY)
    return name, obj


@fuzz(400)
@given(command=near_valid_commands(), sender=TOPIC_SENDERS, ascii_only=st.booleans())
# Found by this test: a sender "op-1\n" from the topic was accepted (`$` in re.match also
# matches before a trailing newline).
@example(command=("stop", {}), sender="op-1\n", ascii_only=True)
def test_nearly_valid_commands_parse_only_into_what_the_records_can_hold(
    command: tuple[str, dict[str, Any]], sender: str | None, ascii_only: bool
) -> None:
    name, obj = command
    text = json.dumps(obj, allow_nan=True, ensure_ascii=ascii_only)
    _parse(text.encode("utf-8", "surrogatepass"), name, sender or "op-1")


@fuzz(400)
@given(
    obj=st.one_of(COMMAND_OBJECTS, COMMAND_OBJECTS, JSON_ANY),
    name=TOPIC_NAMES,
    sender=TOPIC_SENDERS,
    ascii_only=st.booleans(),
)
# Found by this test: a huge integer length (OverflowError), a reel id with a trailing
# newline (accepted: `$` matches before it) and an operator with a lone surrogate
# (accepted, then the record store failed to write the reel and the line went to FAULT).
@example(
    obj={"reel_id": "R1", "length_m": 10**400}, name="start_reel", sender="op-1", ascii_only=True
)
@example(obj={"reel_id": "R1\n", "length_m": 5}, name="start_reel", sender="op-1", ascii_only=True)
@example(
    obj={"reel_id": "R1", "length_m": 5, "operator": "\ud800"},
    name="start_reel",
    sender="op-1",
    ascii_only=True,
)
def test_json_commands_of_any_shape(
    obj: Any, name: str | None, sender: str | None, ascii_only: bool
) -> None:
    text = json.dumps(obj, allow_nan=True, ensure_ascii=ascii_only)
    _parse(text.encode("utf-8", "surrogatepass"), name, sender)
    _parse(text, name, sender)  # a str payload, as the Sparkplug path hands it over


@fuzz(60)
@given(
    depth=st.integers(1, 6000) | st.integers(900, 2100),
    opener=st.sampled_from(["[", '{"a":', '{"reason":[']),
)
# Found by this test: 2000 nested arrays (4000 bytes) raised RecursionError.
@example(depth=2000, opener="[")
def test_deeply_nested_json_is_refused_clearly(depth: int, opener: str) -> None:
    closer = {"[": "]", '{"a":': "}", '{"reason":[': "]}"}[opener]
    payload = (opener * depth + "0" + closer * depth).encode()
    cmd = _parse(payload, "stop", "op-1")
    assert cmd is None


@fuzz(20)
@given(extra=st.integers(1, 2_000_000))
@example(extra=1_048_576)  # 1 MiB
def test_oversize_payloads_are_refused_unread(extra: int) -> None:
    payload = b'{"reason": "' + b"x" * (MAX_COMMAND_BYTES + extra) + b'"}'
    with pytest.raises(CommandError, match=f"more than the {MAX_COMMAND_BYTES} allowed"):
        parse_command(payload, name="stop", sender="op-1")


# =========================================================================== 3. registers

TYPES = ["bits", "int16", "uint16", "int32", "uint32", "float32"]
ORDERS = ["ABCD", "CDAB", "BADC", "DCBA"]
WORD = st.one_of(
    st.integers(0, 0xFFFF),
    # High and low words of float32 NaN, infinity, -0, the largest finite value.
    st.sampled_from([0x7FC0, 0x7F80, 0xFF80, 0xFFC0, 0x7F7F, 0xFFFF, 0x8000, 0x0000, 0x0001]),
)


@fuzz(400)
@given(
    type_=st.sampled_from(TYPES),
    order=st.sampled_from(ORDERS),
    words=st.lists(WORD, min_size=2, max_size=2),
    scale=st.sampled_from([1.0, 1.0, 0.001, 10.0, -2.5, 1e300]),
)
def test_any_register_words_decode_and_a_non_number_is_never_written_back(
    type_: str, order: str, words: list[int], scale: float
) -> None:
    f = RegisterField(
        name="x",
        table="input",
        address=0,
        type=type_,
        word_order=order,
        scale=scale,  # type: ignore[arg-type]
    )
    n = register_count(f.type)
    value = decode(f, words[:n])
    if f.type != "float32" and scale < 1e300:
        assert isinstance(value, int) or math.isfinite(value)  # a huge scale may overflow
    if not math.isfinite(value):
        with pytest.raises(CodecError, match="not a finite number"):
            encode(f, value)
    elif scale == 1.0:
        assert encode(f, value) == words[:n]  # every bit pattern survives the round trip
    with pytest.raises(CodecError):
        decode(f, words[: n - 1] if n > 1 else [*words[:1], 0])


def _input_fields(rmap: Any) -> list[RegisterField]:
    return [f for f in rmap.fields.values() if f.table == "input"]


def _registers(rmap: Any, words: list[int]) -> dict[int, int]:
    addrs = sorted({a for f in _input_fields(rmap) for a in range(f.address, f.end)})
    return {a: words[i % len(words)] for i, a in enumerate(addrs)}


def _not_finite(v: float | int | None) -> bool:
    if v is None:
        return False
    try:
        return not math.isfinite(v)
    except OverflowError:
        return True


VIEW_FIELDS = {
    "accelerator": ("beam_current", "energy", "scan_width", "fault_code"),
    "conveyor": ("speed", "fault_code"),
}


@fuzz(300)
@given(
    acc_words=st.lists(WORD, min_size=16, max_size=16),
    cnv_words=st.lists(WORD, min_size=10, max_size=10),
)
def test_register_images_of_any_words_give_views_that_name_every_non_number(
    acc_words: list[int], cnv_words: list[int]
) -> None:
    acc_vals = decode_inputs(AMAP, _registers(AMAP, acc_words))
    cnv_vals = decode_inputs(CMAP, _registers(CMAP, cnv_words))
    acc, cnv = acc_view(acc_vals, AMAP, ok=True), cnv_view(cnv_vals, CMAP, ok=True)
    for view, vals, plc in ((acc, acc_vals, "accelerator"), (cnv, cnv_vals, "conveyor")):
        bad = {n for n in VIEW_FIELDS[plc] if _not_finite(vals[n])}
        assert set(view.bad_values) == bad
    _controller_trips_on_bad_values(acc, cnv)


NUMBER = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**80), 2**80),
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e30, 3.4e38, 0.5, 2.0]),
)


@fuzz(300)
@given(
    acc_vals=st.fixed_dictionaries(
        dict.fromkeys(("status", *VIEW_FIELDS["accelerator"], "charge_total"), NUMBER)
    ),
    cnv_vals=st.fixed_dictionaries(dict.fromkeys(("status", *VIEW_FIELDS["conveyor"]), NUMBER)),
)
# Found by this test: a fault code of NaN raised ValueError (int(nan)) in the view.
@example(acc_vals={"fault_code": math.nan}, cnv_vals={"status": math.inf})
def test_views_of_any_numbers_never_raise(
    acc_vals: dict[str, Any], cnv_vals: dict[str, Any]
) -> None:
    acc, cnv = acc_view(acc_vals, AMAP, ok=True), cnv_view(cnv_vals, CMAP, ok=True)
    for view, vals, plc in ((acc, acc_vals, "accelerator"), (cnv, cnv_vals, "conveyor")):
        bad = {n for n in VIEW_FIELDS[plc] if _not_finite(vals.get(n))}
        status = vals.get("status")
        if isinstance(status, float) and not (
            math.isfinite(status) and status == int(status) and status >= 0
        ):
            bad.add("status")
        assert set(view.bad_values) == bad
        assert isinstance(view.fault_code, int)
    _controller_trips_on_bad_values(acc, cnv)


def _controller_trips_on_bad_values(acc: AccView, cnv: CnvView) -> None:
    """A running controller that gets these views: a view with a value that is not a
    number trips it in this very cycle (beam off, line stopping)."""
    ctl = _running_controller()
    out = ctl.step(ctl._last_t_s + 0.05, acc, cnv, 100.0)  # type: ignore[operator]
    _assert_encodable(out)
    _assert_beam_only_on_good_data(ctl, out, acc, cnv)
    if acc.bad_values or cnv.bad_values:
        assert ctl.state is LineState.FAULT
        assert not out.beam_on
        assert not out.run
        kinds = {
            f"{p}_bad_value" for p, v in (("accelerator", acc), ("conveyor", cnv)) if v.bad_values
        }
        assert kinds <= set(ctl.alarms)


def _assert_encodable(out: Outputs) -> None:
    """Every output is a number the PLCs' maps can carry (the service writes them all)."""
    for rmap, values in ((AMAP, acc_writes(out, AMAP)), (CMAP, cnv_writes(out, CMAP))):
        for name, v in values.items():
            assert math.isfinite(v), (name, v)
            encode(rmap.field(name), v)  # CodecError would end the service's cycle


_RUNNING: Controller | None = None


def _running_controller() -> Controller:
    """A controller in RUNNING at the line's full speed (an ideal plant brought it there)."""
    global _RUNNING  # noqa: PLW0603 - built once: it takes a few hundred cycles
    if _RUNNING is None:
        from linectl.core.control import ReelPlan

        ctl = Controller(RECIPE, CFG.line.geometry)
        out = Outputs()
        t = 0.0
        for i in range(2000):
            t += 0.05
            acc, cnv = _follow(ctl, out)
            out = ctl.step(t, acc, cnv, 10.0)
            if i == 2:
                ctl.request_start(ReelPlan("R1", 10_000.0))
            if ctl.state is LineState.RUNNING and cnv.speed_m_min > 0.9 * ctl.v_max:
                break
        assert ctl.state is LineState.RUNNING
        ctl.take_events()
        _RUNNING = ctl
    return copy.deepcopy(_RUNNING)


def _follow(ctl: Controller, out: Outputs) -> tuple[AccView, CnvView]:
    """An ideal plant: it reports exactly what the outputs asked for."""
    beam = out.hv_on and out.beam_on
    acc = replace(
        HEALTHY_ACC,
        hv_on=out.hv_on,
        beam_on=beam,
        beam_current_ma=out.beam_current_sp_ma if beam else 0.0,
        energy_mev=ctl.recipe.energy_mev if out.hv_on else 0.0,
    )
    speed = out.speed_sp_m_min if out.run else 0.0
    return acc, replace(HEALTHY_CNV, running=speed > 0.0, speed_m_min=speed)


def _assert_beam_only_on_good_data(
    ctl: Controller, out: Outputs, acc: AccView, cnv: CnvView
) -> None:
    """The beam is requested only when everything the controller read is a good number
    in range: the line runs at or above the minimum speed, the energy is in tolerance,
    the safety chain is closed, nothing trips."""
    if not out.beam_on:
        return
    assert acc.ok
    assert cnv.ok
    assert not acc.bad_values
    assert not cnv.bad_values
    for x in (acc.beam_current_ma, acc.energy_mev, acc.scan_width_cm, cnv.speed_m_min):
        assert math.isfinite(x)
    assert cnv.running
    assert cnv.speed_m_min >= ctl.v_min
    assert not cnv.estop
    assert not cnv.cable_break
    assert acc.safety_ok
    assert acc.hv_on
    assert abs(acc.energy_mev - ctl.recipe.energy_mev) <= ctl.recipe.energy_tolerance_mev
    assert acc.vacuum_ok
    assert acc.scan_ok
    assert acc.cooling_ok


BAD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e30, 1e30, 3.4e38, 0.0])
VIEW_CHANGE = st.one_of(
    st.tuples(
        st.just("acc"),
        st.sampled_from(["beam_current_ma", "energy_mev", "scan_width_cm"]),
        BAD_FLOATS,
    ),
    st.tuples(st.just("cnv"), st.just("speed_m_min"), BAD_FLOATS),
    st.tuples(
        st.just("acc"),
        st.sampled_from(["ready", "hv_on", "beam_on", "safety_ok", "vacuum_ok", "fault"]),
        st.booleans(),
    ),
    st.tuples(
        st.just("cnv"), st.sampled_from(["running", "estop", "cable_break", "fault"]), st.booleans()
    ),
    st.tuples(st.sampled_from(["acc", "cnv"]), st.just("ok"), st.booleans()),
)


@fuzz(200)
@given(
    steps=st.lists(
        st.tuples(st.lists(VIEW_CHANGE, max_size=3), st.sampled_from([0.05, 0.05, 0.0, 0.5])),
        min_size=1,
        max_size=40,
    )
)
# Found by this test: a NaN speed with the line running at full speed kept the beam on
# (NaN < v_min is False), and a NaN energy never tripped the energy interlock.
@example(steps=[([("cnv", "speed_m_min", math.nan)], 0.05)])
@example(steps=[([("acc", "energy_mev", math.nan)], 0.05)])
def test_controller_never_beams_on_a_reading_that_is_not_a_good_number(
    steps: list[tuple[list[tuple[str, str, Any]], float]],
) -> None:
    ctl = _running_controller()
    out = ctl.outputs
    t = ctl._last_t_s or 0.0
    for changes, dt in steps:
        acc, cnv = _follow(ctl, out)
        for which, name, value in changes:
            if which == "acc":
                acc = replace(acc, **{name: value})
            else:
                cnv = replace(cnv, **{name: value})
        t += dt
        was = ctl.state
        out = ctl.step(t, acc, cnv, 100.0)
        _assert_encodable(out)
        _assert_beam_only_on_good_data(ctl, out, acc, cnv)
        nonfinite = any(
            not math.isfinite(x)
            for x in (acc.beam_current_ma, acc.energy_mev, acc.scan_width_cm, cnv.speed_m_min)
        )
        if nonfinite and acc.ok and cnv.ok and was is not LineState.OFFLINE:
            assert ctl.state is LineState.FAULT


# ---------------------------------------------------------------- closed loop, corrupted

_WARM: ClosedLoop | None = None


def _warm_loop() -> ClosedLoop:
    """The compact line running a reel at full speed, metres being recorded."""
    global _WARM  # noqa: PLW0603 - built once, copied per example
    if _WARM is None:
        cl = ClosedLoop(CFG, RECIPE, geometry=COMPACT, seed=3)
        cl.settle()
        cl.start(length_m=400.0)
        assert cl.run_until(lambda: cl.ledger is not None and (cl.ledger.position_m or 0) > 12, 120)
        _WARM = cl
    return copy.deepcopy(_WARM)


FLOAT_FIELDS = {
    "accelerator": ["beam_current", "energy", "scan_width", "vacuum"],
    "conveyor": ["speed", "tension"],
}
NON_NUMBERS = st.sampled_from(["nan", "inf", "-inf", "nan_payload"])
CORRUPTION = st.one_of(
    # A float field reads NaN or an infinity (the kinds the promise is about).
    st.tuples(
        st.sampled_from(
            [("accelerator", f) for f in FLOAT_FIELDS["accelerator"]]
            + [("conveyor", f) for f in FLOAT_FIELDS["conveyor"]]
        ),
        NON_NUMBERS,
        st.integers(0, 0xFFFF),
    ),
    # Status and fault code words at random: any bit pattern.
    st.tuples(
        st.sampled_from(
            [
                ("accelerator", "status"),
                ("conveyor", "status"),
                ("accelerator", "fault_code"),
                ("conveyor", "fault_code"),
            ]
        ),
        st.just("word"),
        st.integers(0, 0xFFFF),
    ),
)
JUMPS = st.tuples(
    st.sampled_from(
        [
            ("accelerator", "charge_total"),
            ("conveyor", "length"),
            ("accelerator", "clock"),
            ("conveyor", "clock"),
        ]
    ),
    st.just("jump"),
    st.integers(0, 2**32 - 1),
)


def _swap(w: int) -> int:
    return ((w & 0xFF) << 8) | (w >> 8)


def _float_words(f: RegisterField, kind: str, payload: int) -> list[int]:
    """The registers of a float32 field that reads NaN or an infinity, in its word order."""
    bits = {
        "nan": 0x7FC00000,
        "inf": 0x7F800000,
        "-inf": 0xFF800000,
        "nan_payload": 0x7F800000 | (payload << 4 & 0x7FFFFF) | 1,  # any other NaN
    }[kind]
    hi, lo = bits >> 16, bits & 0xFFFF
    words = {
        "ABCD": [hi, lo],
        "CDAB": [lo, hi],
        "BADC": [_swap(hi), _swap(lo)],
        "DCBA": [_swap(lo), _swap(hi)],
    }[f.word_order]
    value = decode(f, words)
    assert math.isnan(value) if kind.startswith("nan") else value == float(kind)
    return words


@fuzz(80)
@given(
    events=st.dictionaries(
        st.integers(0, 59), st.lists(CORRUPTION, min_size=1, max_size=3), min_size=1, max_size=12
    ),
    jumps=st.dictionaries(st.integers(0, 59), st.lists(JUMPS, max_size=2), max_size=3),
)
# Found by this test: a NaN scan width made a NaN dose, which passed both limits as in
# spec; a NaN speed while running kept the beam on.
@example(events={5: [(("accelerator", "scan_width"), "nan", 0)]}, jumps={})
@example(events={k: [(("conveyor", "speed"), "nan", 0)] for k in range(3, 9)}, jumps={})
def test_registers_corrupted_at_random_keep_the_beam_and_the_records_safe(
    events: dict[int, list[Any]], jumps: dict[int, list[Any]]
) -> None:
    merged = {k: [*events.get(k, []), *jumps.get(k, [])] for k in {*events, *jumps}}
    # Drive cycle by cycle, recomputing the views the controller saw.
    cl = _warm_loop()
    first_record = len(cl.records)
    real = cl.plant.input_registers
    cycle = 0
    images: dict[str, dict[int, int]] = {}  # what the controller read this cycle

    def input_registers(plc: str) -> dict[int, int]:
        regs = real(plc)  # type: ignore[arg-type]
        for (p, name), kind, value in merged.get(cycle, []):
            if p != plc:
                continue
            f = cl.plant.register_map(plc).field(name)  # type: ignore[arg-type]
            if kind == "word":
                words = [value] * f.width
            elif kind == "jump":
                words = encode(f, (value % (1 << (16 * f.width))) * f.scale)
            else:
                words = _float_words(f, kind, value)
            for i, w in enumerate(words):
                regs[f.address + i] = w
        images[plc] = regs
        return regs

    cl.plant.input_registers = input_registers  # type: ignore[method-assign]
    for cycle in range(100):  # 60 with corruptions, then 40 clean ones  # noqa: B007
        out = cl.cycle()
        acc = acc_view(decode_inputs(AMAP, images["accelerator"]), AMAP, ok=True)
        cnv = cnv_view(decode_inputs(CMAP, images["conveyor"]), CMAP, ok=True)
        _assert_encodable(out)
        _assert_beam_only_on_good_data(cl.ctl, out, acc, cnv)
    assert len(cl.records) > first_record, "no metre recorded in the run"
    assert cl.max_beam_standstill_s == 0.0, "beam on a standing cable"
    if cl.ledger is not None and not cl.finished:
        cl.records += cl.ledger.finish()
    _assert_records_finite(cl.records)
    if not jumps or not any(jumps.values()):
        # Counters intact: every metre the ledger calls in spec is truly in spec, with
        # readings that were not numbers in the middle of it.
        c = cl.compare()
        assert c.false_accepts == [], c.false_accepts


def _assert_records_finite(records: list[MetreRecord]) -> None:
    for r in records:
        for x in (r.dose_kgy, r.min_dose_kgy, r.max_dose_kgy):
            assert math.isfinite(x), r
        if r.verdict is Verdict.IN_SPEC:
            assert RECIPE.min_dose_kgy <= r.min_dose_kgy <= r.max_dose_kgy <= RECIPE.max_dose_kgy


# ---------------------------------------------------------------- aligner and ledger

Q_MOD = float(2**32)  # uC
L_MOD = float(2**32) / 1000.0  # m (mm counter)
READING = st.one_of(
    st.just("ok"),
    st.just("ok"),
    st.just("ok"),
    st.sampled_from(["nan", "inf", "-inf", "neg", "none"]),
    st.floats(0.0, 2**32 - 1, allow_nan=False),  # the counter jumps anywhere
)


def _reading(kind: Any, good: float) -> float | None:
    if isinstance(kind, float):
        return kind
    return {
        "ok": good,
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
        "neg": -abs(good) - 1.0,
        "none": None,
    }[kind]


@fuzz(200)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([0.05, 0.05, 0.05, 0.0, 0.3, 1.0]),  # dt
            READING,  # charge
            READING,  # length
            READING,  # scan width
            READING,  # speed
            st.sampled_from(["ok", "ok", "ok", "nan", "inf", "jump", "back", "none"]),  # clock
            st.booleans(),  # accelerator answered
            st.booleans(),  # conveyor answered
        ),
        min_size=1,
        max_size=150,
    ),
    width_never_a_number=st.booleans(),
)
def test_aligner_and_ledger_take_any_counter_stream(
    steps: list[tuple[Any, ...]], width_never_a_number: bool
) -> None:
    geometry = COMPACT
    ledger = DoseLedger(
        geometry, RECIPE, charge_modulus_uc=Q_MOD, length_modulus_m=L_MOD, planned_length_m=None
    )
    aligner = CounterAligner(Q_MOD)
    acc_clock, cnv_clock = PlcClock(2.0**32), PlcClock(2.0**32)
    t = 0.0
    q, length, plc_ms = 123_456.0, 1_000.0, 5_000.0
    current_ma = RECIPE.current_for_dose_ma(40.0, geometry.weight_sum)
    records: list[MetreRecord] = []
    started = False
    for dt, kq, kl, kw, kv, kc, acc_up, cnv_up in steps:
        t += dt
        q = (q + current_ma * 1000.0 * dt) % Q_MOD
        length = (length + 40.0 / 60.0 * dt) % L_MOD
        plc_ms += dt * 1000.0
        clock = {
            "ok": plc_ms % 2**32,
            "nan": math.nan,
            "inf": math.inf,
            "jump": (plc_ms * 7919) % 2**32,
            "back": max(0.0, plc_ms - 10_000.0),
            "none": None,
        }[kc]
        ta, tc = acc_clock.sample_time(t, clock), cnv_clock.sample_time(t + 0.001, clock)
        assert math.isfinite(ta)
        assert math.isfinite(tc)
        charge, len_m = _reading(kq, q), _reading(kl, length)
        width = math.nan if width_never_a_number else _reading(kw, 100.0)
        acc = AccPoint(ta, charge, width, True) if acc_up and charge is not None else None
        cnv = CnvPoint(tc, len_m, _reading(kv, 40.0)) if cnv_up and len_m is not None else None
        for sample in aligner.push(t, acc, cnv):
            if not started:
                if (
                    sample.length_m is not None
                    and sample.charge_uc is not None
                    and math.isfinite(sample.length_m)
                    and math.isfinite(sample.charge_uc)
                ):
                    ledger.start(sample)
                    started = True
                continue
            records += ledger.update(sample)
            pos = ledger.position_m
            assert pos is not None
            assert math.isfinite(pos)
    records += ledger.finish()
    _assert_records_finite(records)
    if width_never_a_number:
        assert not any(r.in_spec for r in records), "in spec without one good scan width"


@fuzz(200)
@given(
    samples=st.lists(
        st.tuples(
            st.floats(allow_nan=True, allow_infinity=True),
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
            st.booleans(),
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
        ),
        max_size=40,
    )
)
# Found by this test: NaN in the scan width gave NaN doses recorded IN_SPEC.
@example(samples=[(0.05, 10.0, 0.05, math.nan, True, 40.0)] * 3)
def test_ledger_takes_any_sample_without_an_exception(
    samples: list[tuple[Any, ...]],
) -> None:
    ledger = DoseLedger(
        COMPACT, RECIPE, charge_modulus_uc=Q_MOD, length_modulus_m=L_MOD, planned_length_m=None
    )
    ledger.start(LedgerSample(0.0, 0.0, 0.0, 100.0))
    t = 0.0
    records: list[MetreRecord] = []
    for dt, dq, dl, width, energy_ok, speed in samples:
        t = t + dt if math.isfinite(dt) and abs(dt) < 10 else t + 0.05
        # Deltas of finite readings stay within a plausible cycle; others as they come.
        charge = dq if dq is None or not math.isfinite(dq) else abs(dq) % 5000.0
        length = dl if dl is None or not math.isfinite(dl) else abs(dl) % 0.5
        records += ledger.update(LedgerSample(t, charge, length, width, energy_ok, speed))
    records += ledger.finish()
    _assert_records_finite(records)


# =========================================================================== live service


SENDERS = ["op-1", "op-1", "op-1", "eye", "stranger"]
LIVE_SENDER = st.sampled_from(SENDERS)
LIVE_COMMAND = st.one_of(
    st.builds(
        lambda s, r, n, extra: ("start_reel", s, {"reel_id": r, "length_m": n, **extra}),
        LIVE_SENDER,
        st.sampled_from(["F1", "F2", "F3"]),
        st.sampled_from([12.0, 1e6, 0.5, -1.0]),
        st.sampled_from(
            [
                {},
                {"operator": "A. Smith"},
                {"recipe": "fast"},
                {"recipe": "nope"},
                {"recipe": "pv-1x6-en50618"},
            ]
        ),
    ),
    st.builds(lambda s, r: ("stop", s, r), LIVE_SENDER, st.sampled_from([{}, {"reason": "fuzz"}])),
    st.builds(
        lambda s, a: ("ack_alarm", s, {"alarm": a}),
        LIVE_SENDER,
        st.sampled_from(["*", "accelerator_fault", "conveyor_link", "estop", "nope"]),
    ),
    st.builds(lambda s: ("reset", s, {}), LIVE_SENDER),
    st.builds(
        lambda s, r: ("select_recipe", s, {"recipe": r}),
        LIVE_SENDER,
        st.sampled_from(["fast", "pv-1x6-en50618", "nope"]),
    ),
    # D1, D2: the driver's reels, so that some are the reel on the line.
    st.builds(
        lambda s, r: ("end_reel", s, {"reel_id": r, "reason": "fuzz"}),
        LIVE_SENDER,
        st.sampled_from(["F1", "D1", "D2"]),
    ),
    # Garbage: unknown commands, wrong keys and types.
    st.builds(
        lambda n, s, p: (n, s, p),
        st.one_of(st.text(max_size=8), st.sampled_from(CMD_NAMES)),
        LIVE_SENDER,
        st.dictionaries(
            st.sampled_from(["reel_id", "length_m", "x", "alarm"]), JSON_LEAF, max_size=2
        ),
    ),
)
PHASES = ["ready", "starting", "running", "stopping", "fault", "offline"]


def _effects(svc: LineService) -> tuple[Any, ...]:
    """Everything a command can change, as the control cycle is about to step."""
    reel = svc.ctl.reel
    return (
        svc.ctl.state,
        None if reel is None else (reel.plan, reel.started, reel.complete),
        svc.ctl._reset_pending,
        svc.recipe,
        svc.recipe_path,
        svc.ctl.recipe,
        dict(svc.line.unacked),
        frozenset(svc.line.opened_reels),
        dict(svc.ctl.alarms),
        None if svc.ledger is None else (id(svc.ledger), svc.ledger.next_metre),
        svc.line.reel_request,
        svc.records_written,
    )


async def _until(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@settings(
    max_examples=2,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # a live line does not shrink reproducibly
    suppress_health_check=list(HealthCheck),
)
@given(batches=st.lists(st.lists(LIVE_COMMAND, min_size=3, max_size=6), min_size=6, max_size=6))
async def test_live_service_refused_commands_change_nothing_in_any_state(
    batches: list[list[tuple[str, str, dict[str, Any]]]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cfg = load_config(compact_config(tmp_path), environ={})
        cfg.line = cfg.line.model_copy(
            update={
                "mqtt": MqttConfig(
                    roles={"operator": ["*"], "viewer": []},
                    identities={"op-1": "operator", "eye": "viewer"},
                )
            }
        )
        recipe, path = select_recipe(cfg, None)
        async with SimulatedLine(cfg, seed=7, k_dose_true=TRUE_K) as sim:
            svc = LineService(cfg, recipe, path, **endpoints(cfg, sim))
            applied: dict[int, tuple[tuple[Any, ...], tuple[Any, ...], bool]] = {}
            real_apply = svc.line.command

            def apply(cmd: Any, recipe: Any = None) -> Any:
                before = _effects(svc)
                result = real_apply(cmd, recipe)
                applied[id(cmd)] = (before, _effects(svc), result.ack)
                return result

            svc.line.command = apply  # type: ignore[method-assign]
            task = asyncio.create_task(svc.run())
            sent: list[tuple[str, Command, bool]] = []
            visited: list[str] = []
            unparsed = 0
            n_reel = 0

            async def fire(phase: str, batch: list[tuple[str, str, dict[str, Any]]]) -> None:
                nonlocal unparsed
                visited.append(f"{phase}:{svc.ctl.state.value}")
                for name, sender, payload in batch:
                    try:
                        cmd = parse_command(json.dumps(payload), name=name, sender=sender)
                    except CommandError:
                        unparsed += 1
                        continue
                    result = await svc.execute(cmd)
                    sent.append((phase, cmd, result.ack))

            async def ready() -> None:
                if svc.ctl.state is LineState.FAULT or svc.ctl.alarms:
                    svc.request_reset()
                await _until(lambda: svc.ctl.state is LineState.READY, 15.0)

            async def start() -> None:
                nonlocal n_reel
                if svc.ctl.state in (LineState.STARTING, LineState.RUNNING):
                    return
                await ready()
                reel = svc.ctl.reel
                if reel is not None and not reel.complete:
                    svc.request_reel(
                        ReelRequest(reel.plan.reel_id, reel.plan.planned_length_m, "driver")
                    )
                else:
                    n_reel += 1
                    svc.request_reel(ReelRequest(f"D{n_reel}", 1e6, "driver"))
                await _until(lambda: svc.ctl.state is not LineState.READY, 5.0)

            try:
                await _until(lambda: svc.ctl.state is not LineState.OFFLINE, 10.0)
                for phase, batch in zip(PHASES, batches, strict=True):
                    match phase:
                        case "ready":
                            await ready()
                        case "starting":
                            await start()
                        case "running":
                            await start()
                            if not await _until(lambda: svc.ctl.state is LineState.RUNNING, 20.0):
                                await start()
                                await _until(lambda: svc.ctl.state is LineState.RUNNING, 20.0)
                        case "stopping":
                            stop = Command(CommandName.STOP, "op-1")
                            result = await svc.execute(stop)
                            sent.append((phase, stop, result.ack))
                        case "fault":
                            await _until(
                                lambda: (
                                    svc.ctl.state
                                    in (LineState.IDLE, LineState.READY, LineState.FAULT)
                                ),
                                20.0,
                            )
                            sim.faults.latch("accelerator", 2)
                            await _until(lambda: svc.ctl.state is LineState.FAULT, 5.0)
                        case "offline":
                            await ready()
                            sim.faults.link_loss("conveyor", 2.0)
                            await _until(lambda: svc.ctl.state is LineState.OFFLINE, 5.0)
                    await fire(phase, batch)
            finally:
                svc.stop()
                await asyncio.wait_for(task, 60.0)

        # Every command reached a decision; a refused one changed nothing.
        for phase, cmd, ack in sent:
            seen = applied.get(id(cmd))
            if ack:
                assert seen is not None, (phase, cmd)
            elif seen is not None:
                before, after, _ = seen
                assert before == after, (phase, cmd, before, after)
        # Every command that parsed is in the audit trail, accepted or refused.
        with RecordStore(tmp_path / "records.sqlite") as store:
            audit = [e for e in store.events() if e.actor in SENDERS and e.action in CMD_NAMES]
        assert len(audit) == len(sent)
        assert [bool(e.accepted) for e in audit] == [ack for _, _, ack in sent]
        acks = sum(ack for _, _, ack in sent)
        print(f"live: phases {visited}; {len(sent)} commands, {acks} ACK; {unparsed} unparsed")
        states = {v.split(":")[1] for v in visited}
        assert {"ready", "fault", "offline"} <= states, visited
        assert states & {"starting", "running"}, visited
