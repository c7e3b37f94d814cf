"""linectl.config: the shipped configuration, the spec's register maps, bad files, overrides."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from linectl.commands import CommandName
from linectl.config import (
    COMMAND_NAMES,
    COUNTER_FIELDS,
    REQUIRED_FIELDS,
    LineConfig,
    LoadedConfig,
    RegisterMap,
    json_schemas,
    load_config,
    load_recipe,
    load_register_map,
    read_toml,
)
from linectl.errors import ConfigError, LocalError

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"
BAD_DIR = Path(__file__).resolve().parent / "bad_configs"
REFERENCE_RECIPE = CONFIG_DIR / "recipes" / "pv-1x6-en50618.toml"

NO_ENV: dict[str, str] = {}


@pytest.fixture(scope="module")
def shipped() -> LoadedConfig:
    return load_config(CONFIG_DIR, environ=NO_ENV)


# --------------------------------------------------------------------------- shipped config


def test_shipped_config_loads(shipped: LoadedConfig) -> None:
    line = shipped.line
    assert line.line_id == "line1"
    assert line.cycle_period_s == 0.05
    assert (line.accelerator.host, line.accelerator.port, line.accelerator.unit_id) == (
        "127.0.0.1",
        5020,
        1,
    )
    assert (line.conveyor.host, line.conveyor.port, line.conveyor.unit_id) == (
        "127.0.0.1",
        5021,
        1,
    )
    assert shipped.overrides == []
    assert shipped.accelerator_map.plc == "accelerator"
    assert shipped.conveyor_map.plc == "conveyor"
    assert shipped.register_map("conveyor") is shipped.conveyor_map
    assert shipped.endpoint("accelerator") is line.accelerator
    assert shipped.recipes_dir == CONFIG_DIR / "recipes"


def test_shipped_geometry_matches_process_spec(shipped: LoadedConfig) -> None:
    geo = shipped.line.geometry
    assert geo.passes == 16
    assert geo.weights == [1.0] * 16
    assert geo.weight_sum == 16.0
    assert geo.offset_m(0) == 4.0
    assert geo.offset_m(1) == 10.0
    assert geo.last_pass_offset_m == 4.0 + 15 * 6.0


def test_reference_recipe_loads_and_allows_80_m_min(shipped: LoadedConfig) -> None:
    recipe = shipped.load_recipe("pv-1x6-en50618")
    assert recipe == load_recipe(REFERENCE_RECIPE, shipped)
    assert (recipe.target_dose_kgy, recipe.min_dose_kgy, recipe.max_dose_kgy) == (120, 105, 140)
    assert (recipe.energy_mev, recipe.energy_tolerance_mev) == (1.2, 0.05)
    assert (recipe.k_dose, recipe.scan_width_cm) == (1500, 100)
    assert (recipe.beam_current_min_ma, recipe.beam_current_max_ma) == (1, 40)
    assert (recipe.speed_min_m_min, recipe.speed_max_m_min) == (5, 250)
    # process.md: "At 40 mA that gives 80 m/min."
    assert recipe.max_speed_m_min(shipped.line.geometry.weight_sum) == pytest.approx(80.0)
    assert recipe.current_for_dose_ma(80.0, 16.0) == pytest.approx(40.0)


def test_every_shipped_recipe_checks_against_the_line(shipped: LoadedConfig) -> None:
    files = sorted(shipped.recipes_dir.glob("*.toml"))
    assert files
    for path in files:
        load_recipe(path, shipped)


# --------------------------------------------------------------------------- spec tables
#
# plc-interface.md, written out: (name, table, address, type, access, min, max, counter).
# Access "r" = read-only. Bits are checked separately below.

ACCELERATOR_SPEC: list[tuple[str, str, int, str, str, float | None, float | None, bool]] = [
    ("command", "holding", 0, "bits", "rw", None, None, False),
    ("beam_current_sp", "holding", 1, "float32", "rw", 0.0, 100.0, False),
    ("energy_sp", "holding", 3, "float32", "rw", 0.5, 2.5, False),
    ("scan_width_sp", "holding", 5, "float32", "rw", 20.0, 150.0, False),
    ("watchdog", "holding", 7, "uint16", "rw", None, None, False),
    ("watchdog_timeout", "holding", 8, "uint16", "rw", 0, 10000, False),
    ("status", "input", 0, "bits", "r", None, None, False),
    ("beam_current", "input", 1, "float32", "r", None, None, False),
    ("energy", "input", 3, "float32", "r", None, None, False),
    ("scan_width", "input", 5, "float32", "r", None, None, False),
    ("vacuum", "input", 7, "float32", "r", None, None, False),
    ("charge_total", "input", 9, "uint32", "r", None, None, True),
    ("fault_code", "input", 11, "uint16", "r", None, None, False),
    ("trip_count", "input", 12, "uint16", "r", None, None, True),
    ("clock", "input", 13, "uint32", "r", None, None, True),
]
ACCELERATOR_BITS = {
    "command": {"HV_ON": 0, "BEAM_ON": 1, "FAULT_RESET": 2},
    "status": {
        "READY": 0,
        "HV_ON": 1,
        "BEAM_ON": 2,
        "VACUUM_OK": 3,
        "SCAN_OK": 4,
        "COOLING_OK": 5,
        "SAFETY_OK": 6,
        "FAULT": 7,
        "REMOTE": 8,
        "WATCHDOG_TRIP": 9,
    },
}
ACCELERATOR_UNITS = {
    "beam_current_sp": "mA",
    "energy_sp": "MeV",
    "scan_width_sp": "cm",
    "watchdog_timeout": "ms",
    "beam_current": "mA",
    "energy": "MeV",
    "scan_width": "cm",
    "vacuum": "Pa",
    "charge_total": "uC",
    "clock": "ms",
}

CONVEYOR_SPEC: list[tuple[str, str, int, str, str, float | None, float | None, bool]] = [
    ("command", "holding", 0, "bits", "rw", None, None, False),
    ("speed_sp", "holding", 1, "float32", "rw", 0.0, 300.0, False),
    ("watchdog", "holding", 3, "uint16", "rw", None, None, False),
    ("watchdog_timeout", "holding", 4, "uint16", "rw", 0, 10000, False),
    ("ramp_rate", "holding", 5, "float32", "rw", 1.0, 120.0, False),
    ("status", "input", 0, "bits", "r", None, None, False),
    ("speed", "input", 1, "float32", "r", None, None, False),
    ("length", "input", 3, "uint32", "r", None, None, True),
    ("tension", "input", 5, "float32", "r", None, None, False),
    ("fault_code", "input", 7, "uint16", "r", None, None, False),
    ("clock", "input", 8, "uint32", "r", None, None, True),
]
CONVEYOR_BITS = {
    "command": {"RUN": 0, "FAULT_RESET": 1},
    "status": {
        "READY": 0,
        "RUNNING": 1,
        "AT_SPEED": 2,
        "TENSION_OK": 3,
        "CABLE_BREAK": 4,
        "FAULT": 5,
        "REMOTE": 6,
        "WATCHDOG_TRIP": 7,
        "ESTOP": 8,
    },
}
CONVEYOR_UNITS = {
    "speed_sp": "m/min",
    "ramp_rate": "m/min/s",
    "watchdog_timeout": "ms",
    "speed": "m/min",
    "length": "mm",
    "tension": "N",
    "clock": "ms",
}
# Defaults after a PLC restart (plc-interface.md: watchdog 500 ms, ramp 30 m/min/s).
DEFAULTS = {
    ("accelerator", "watchdog_timeout"): 500,
    ("conveyor", "watchdog_timeout"): 500,
    ("conveyor", "ramp_rate"): 30.0,
    ("accelerator", "command"): 0,
    ("conveyor", "command"): 0,
    ("accelerator", "beam_current_sp"): 0.0,
    ("conveyor", "speed_sp"): 0.0,
}


def _assert_map(
    rmap: RegisterMap,
    spec: list[tuple[str, str, int, str, str, float | None, float | None, bool]],
    bits: dict[str, dict[str, int]],
    units: dict[str, str],
) -> None:
    assert sorted(rmap.fields) == sorted(row[0] for row in spec), "no more, no fewer fields"
    for name, table, address, type_, access, lo, hi, counter in spec:
        f = rmap.field(name)
        got = (f.name, f.table, f.address, f.type, f.access, f.min, f.max, f.counter)
        assert got == (name, table, address, type_, access, lo, hi, counter)
        # The spec's 32-bit values are high word first, in engineering units as sent.
        assert f.word_order == "ABCD", name
        assert f.scale == 1.0, name
        assert f.bits == bits.get(name, {}), name
        assert f.unit == units.get(name, ""), name
    for name in spec_names_with_bits(spec):
        assert name in bits


def spec_names_with_bits(
    spec: list[tuple[str, str, int, str, str, float | None, float | None, bool]],
) -> list[str]:
    return [row[0] for row in spec if row[3] == "bits"]


def test_accelerator_map_is_the_spec(shipped: LoadedConfig) -> None:
    _assert_map(shipped.accelerator_map, ACCELERATOR_SPEC, ACCELERATOR_BITS, ACCELERATOR_UNITS)


def test_conveyor_map_is_the_spec(shipped: LoadedConfig) -> None:
    _assert_map(shipped.conveyor_map, CONVEYOR_SPEC, CONVEYOR_BITS, CONVEYOR_UNITS)


def test_defaults_after_restart(shipped: LoadedConfig) -> None:
    for (plc, name), value in DEFAULTS.items():
        assert shipped.register_map(plc).field(name).default == value, (plc, name)  # type: ignore[arg-type]


def test_register_spans_and_tables(shipped: LoadedConfig) -> None:
    acc = shipped.accelerator_map
    assert [f.name for f in acc.by_table["holding"]] == [
        "command",
        "beam_current_sp",
        "energy_sp",
        "scan_width_sp",
        "watchdog",
        "watchdog_timeout",
    ]
    assert acc.by_table["input"][-1].name == "clock"
    assert acc.field("clock").end == 15
    assert shipped.conveyor_map.field("clock").end == 10
    assert acc.field("status").bit_index("SAFETY_OK") == 6
    with pytest.raises(KeyError, match="no field 'nope'"):
        acc.field("nope")
    with pytest.raises(KeyError, match="no bit named"):
        acc.field("status").bit_index("NOPE")


def test_required_and_counter_tables_cover_the_maps(shipped: LoadedConfig) -> None:
    for plc in ("accelerator", "conveyor"):
        rmap = shipped.register_map(plc)  # type: ignore[arg-type]
        assert set(REQUIRED_FIELDS[plc]) == set(rmap.fields)  # type: ignore[index]
        assert {n for n, f in rmap.fields.items() if f.counter} == set(COUNTER_FIELDS[plc])  # type: ignore[index]


# --------------------------------------------------------------------------- bad files
#
# One fault per file in tests/bad_configs/. The prefix says where the file goes:
#   accelerator-*  the accelerator's register map (line.toml points at it)
#   line-*         line.toml, next to the reference register maps
#   recipe-*       a recipe, checked against the reference line
# Each message must name the file, the field and what is wrong.

BAD_CASES: dict[str, list[str]] = {
    "accelerator-overlap.toml": [
        "holding registers overlap",
        "'beam_current_sp' at 1..2",
        "'energy_sp' starting at 2",
    ],
    "accelerator-address-out-of-range.toml": [
        "fields.vacuum.address",
        "less than or equal to 65535",
    ],
    "accelerator-32bit-at-65535.toml": ["fields.clock", "address 65535 + width 2 runs past 65535"],
    "accelerator-writable-input.toml": [
        "fields.beam_current",
        "input table cannot be writable",
    ],
    "accelerator-bits-on-float.toml": [
        "fields.energy",
        "'bits' names are only allowed on type 'bits', not float32",
    ],
    "accelerator-unknown-key.toml": ["fields.beam_current.gain", "unknown key"],
    "accelerator-missing-required.toml": ["required field 'vacuum' is missing"],
    "accelerator-counter-flag-missing.toml": ["'charge_total'", "set counter = true"],
    "line-pass-weights-length.toml": ["geometry", "pass_weights has 15 entries for 16 passes"],
    "line-bad-syntax.toml": ["not valid TOML", "line 34"],
    "line-unknown-key.toml": ["accelerator.timeout_ms", "unknown key"],
    "line-missing-line-id.toml": ["line_id", "Field required"],
    "line-role-unknown-command.toml": ["mqtt: roles.operator: no command 'stopp'", "known: start"],
    "line-identity-undefined-role.toml": [
        "mqtt: identities.scada-1: role 'operatr' is not defined in [mqtt.roles]",
        "defined: 'operator', 'viewer'",
    ],
    "recipe-min-above-target.toml": [
        "min_dose_kgy < target_dose_kgy < max_dose_kgy",
        "min_dose_kgy 125",
        "target_dose_kgy 120",
    ],
    "recipe-current-cannot-reach-dose.toml": [
        "beam_current_min_ma..beam_current_max_ma = 1.0..2.0 mA",
        "cannot give 120.0 kGy",
        "needs 5..125 mA",
    ],
    "recipe-current-above-rating.toml": [
        "beam_current_max_ma 150",
        "set-point limit 100",
    ],
    "recipe-missing-required.toml": ["k_dose", "Field required"],
}


def _load_bad(name: str, tmp_path: Path, shipped: LoadedConfig) -> tuple[Path, ConfigError]:
    """Load one bad file where its prefix says it belongs; (file named, error)."""
    src = BAD_DIR / name
    load: Callable[[], object]
    if name.startswith("accelerator-"):
        env = {"LINECTL_ACCELERATOR__REGISTER_MAP": str(src)}
        load = partial(load_config, CONFIG_DIR, environ=env)
    elif name.startswith("line-"):
        shutil.copytree(CONFIG_DIR / "registers", tmp_path / "registers")
        src = Path(shutil.copy(src, tmp_path / "line.toml"))
        load = partial(load_config, tmp_path, environ=NO_ENV)
    elif name.startswith("recipe-"):
        load = partial(load_recipe, src, shipped)
    else:
        pytest.fail(f"{name}: unknown prefix")
    with pytest.raises(ConfigError) as info:
        load()
    return src, info.value


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_file_raises_config_error_naming_file_and_field(
    name: str, tmp_path: Path, shipped: LoadedConfig
) -> None:
    path, error = _load_bad(name, tmp_path, shipped)
    message = str(error)
    assert str(path) in message
    for part in BAD_CASES[name]:
        assert part in message, f"{part!r} not in {message!r}"
    assert isinstance(error, LocalError)


def test_every_bad_file_has_a_case() -> None:
    assert sorted(p.name for p in BAD_DIR.glob("*.toml")) == sorted(BAD_CASES)


def test_bad_register_map_loaded_directly_names_file() -> None:
    path = BAD_DIR / "accelerator-overlap.toml"
    with pytest.raises(ConfigError, match="overlap") as info:
        load_register_map(path)
    assert str(path) in str(info.value)


def test_register_map_for_the_wrong_plc() -> None:
    conveyor_map = CONFIG_DIR / "registers" / "conveyor.toml"
    with pytest.raises(ConfigError, match=r"line\.toml uses it for 'accelerator'") as info:
        load_config(CONFIG_DIR, environ={"LINECTL_ACCELERATOR__REGISTER_MAP": str(conveyor_map)})
    assert str(conveyor_map) in str(info.value)


def test_missing_directory_says_how_to_give_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere: no such configuration directory"):
        load_config(tmp_path / "nowhere", environ=NO_ENV)


def test_directory_without_line_toml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line\.toml: file not found"):
        load_config(tmp_path, environ=NO_ENV)


def test_both_plcs_on_one_endpoint() -> None:
    with pytest.raises(ConfigError, match="same PLC"):
        load_config(CONFIG_DIR, environ={"LINECTL_CONVEYOR__PORT": "5020"})


# --------------------------------------------------------------------------- env overrides


def test_env_override_nested_port() -> None:
    loaded = load_config(CONFIG_DIR, environ={"LINECTL_ACCELERATOR__PORT": "6000"})
    assert loaded.line.accelerator.port == 6000
    assert loaded.line.conveyor.port == 5021
    assert loaded.overrides == ["accelerator.port"]


def test_env_override_top_level_and_types() -> None:
    env = {
        "LINECTL_CYCLE_PERIOD_S": "0.02",
        "LINECTL_ACCELERATOR__HOST": "10.0.0.5",  # bare words stay strings
        "LINECTL_GEOMETRY__PASS_WEIGHTS": "[0.5, 1.0]",
        "LINECTL_GEOMETRY__PASSES": "2",
        "LINECTL_CONFIG_DIR": "/elsewhere",  # selects the directory; not an override
        "OTHER_VARIABLE": "ignored",
    }
    loaded = load_config(CONFIG_DIR, environ=env)
    assert loaded.line.cycle_period_s == 0.02
    assert loaded.line.accelerator.host == "10.0.0.5"
    assert loaded.line.geometry.weights == [0.5, 1.0]
    assert sorted(loaded.overrides) == [
        "accelerator.host",
        "cycle_period_s",
        "geometry.pass_weights",
        "geometry.passes",
    ]


@pytest.mark.parametrize(
    ("env", "parts"),
    [
        (
            {"LINECTL_ACCELERATOR__PORT": "not-a-port"},
            ["environment overrides", "accelerator.port", "valid integer"],
        ),
        ({"LINECTL_CYCLE_PERIOD_S": "5"}, ["environment overrides", "cycle_period_s", "1"]),
        ({"LINECTL_ACCELERATOR__PROT": "6000"}, ["accelerator.prot", "unknown key"]),
        ({"LINECTL_LINE_ID__X": "1"}, ["LINECTL_LINE_ID__X", "'line_id' is not a section"]),
    ],
)
def test_bad_env_override(env: dict[str, str], parts: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG_DIR, environ=env)
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_roles_and_identities_are_checked_and_every_fault_is_listed() -> None:
    data = read_toml(CONFIG_DIR / "line.toml")
    data["mqtt"]["roles"] = {"operator": ["stop", "*", "shutdown"], "viewer": []}
    data["mqtt"]["identities"] = {"op-1": "operator", "eye": "viewers", "boss": "admin"}
    with pytest.raises(ValidationError) as info:
        LineConfig.model_validate(data)
    message = str(info.value)
    assert "roles.operator: no command 'shutdown'" in message
    assert "identities.eye: role 'viewers' is not defined" in message
    assert "identities.boss: role 'admin' is not defined" in message
    assert "'stop'" not in message
    assert "op-1" not in message
    # The same through the environment, named with its overrides.
    env = {"LINECTL_MQTT__IDENTITIES__BOB": "operators"}
    with pytest.raises(ConfigError, match=r"identities\.bob: role 'operators' is not defined"):
        load_config(CONFIG_DIR, environ=env)
    ok = load_config(CONFIG_DIR, environ={"LINECTL_MQTT__IDENTITIES__BOB": "operator"})
    assert ok.line.mqtt.identities == {"bob": "operator"}


def test_command_names_are_the_commands() -> None:
    assert tuple(c.value for c in CommandName) == COMMAND_NAMES


@pytest.mark.parametrize("value", ["123456", "true", "1.5", "[1]", '"quoted"', "  x  ", "a#b"])
def test_env_text_keys_take_the_value_as_it_is(value: str) -> None:
    # Found by attack: LINECTL_MQTT__PASSWORD=123456 was parsed as TOML, an integer, and
    # refused as "not a valid string". Text keys take the text; the others still TOML.
    env = {
        "LINECTL_MQTT__PASSWORD": value,
        "LINECTL_MQTT__USERNAME": value,
        "LINECTL_MQTT__CLIENT_ID": value,
        "LINECTL_ACCELERATOR__HOST": value,
        "LINECTL_MQTT__TLS__CA_FILE": value,
        "LINECTL_MQTT__IDENTITIES__OP": "operator",
        "LINECTL_MQTT__PORT": "8883",
        "LINECTL_MQTT__ENABLED": "true",
        "LINECTL_MQTT__PROTOCOL": "5",  # a Literal of strings: text too
    }
    line = load_config(CONFIG_DIR, environ=env).line
    assert line.mqtt.password == value
    assert line.mqtt.username == value
    assert line.mqtt.client_id == value
    assert line.accelerator.host == value
    assert line.mqtt.tls is not None
    assert line.mqtt.tls.ca_file == value
    assert line.mqtt.identities == {"op": "operator"}
    assert line.mqtt.port == 8883
    assert line.mqtt.enabled is True
    assert line.mqtt.protocol == "5"


@pytest.mark.parametrize("value", ["pw\udcff", "pw\nsecond", "\x00"])
def test_env_value_that_no_file_can_hold_is_refused_unshown(value: str) -> None:
    # A byte of the environment that is not UTF-8 arrives as a lone surrogate.
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG_DIR, environ={"LINECTL_MQTT__PASSWORD": value})
    message = str(info.value)
    assert "LINECTL_MQTT__PASSWORD" in message
    assert "not UTF-8" in message
    assert value not in message
    assert "pw" not in message


def test_env_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINECTL_CONVEYOR__PORT", "6001")
    assert load_config(CONFIG_DIR).line.conveyor.port == 6001


# --------------------------------------------------------------------------- JSON Schema


def _props(schema: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    node = schema if model is None else schema["$defs"][model]
    props: dict[str, Any] = node["properties"]
    return props


def test_json_schemas_carry_field_docs() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"line", "register_map", "recipe"}
    line = schemas["line"]
    assert _props(line)["cycle_period_s"]["description"] == "Control cycle period."
    assert _props(line, "PlcEndpoint")["timeout_s"]["description"].startswith("Per-request timeout")
    assert "scan-uniformity" in _props(line, "Geometry")["pass_weights"]["description"]
    assert line["additionalProperties"] is False
    rfield = _props(schemas["register_map"], "RegisterField")
    assert "high word first" in rfield["word_order"]["description"]
    assert rfield["word_order"]["enum"] == ["ABCD", "CDAB", "BADC", "DCBA"]
    assert "raw * scale" in rfield["scale"]["description"]
    assert "wraps" in rfield["counter"]["description"]
    recipe = _props(schemas["recipe"])
    assert "dosimetry" in recipe["k_dose"]["description"]
    # Every property of every model is documented.
    for kind, schema in schemas.items():
        models = [schema, *schema.get("$defs", {}).values()]
        for model in models:
            for key, prop in model.get("properties", {}).items():
                assert prop.get("description"), f"{kind}: {key} has no description"


# --------------------------------------------------------------------------- another plant

PLANT_B_MARKER = "<!-- plant-b-accelerator: tests/test_config.py loads this block -->"


def _plant_b_map(tmp_path: Path) -> Path:
    """The example map of docs/configuration.md, written to a file."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    block = text.split(PLANT_B_MARKER, 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "accelerator-plant-b.toml"
    path.write_text(block, encoding="utf-8")
    return path


def test_documented_plant_b_map_loads_and_decodes(tmp_path: Path) -> None:
    from linectl.codec import bit_is_set, counter_modulus, decode, encode

    path = _plant_b_map(tmp_path)
    loaded = load_config(CONFIG_DIR, environ={"LINECTL_ACCELERATOR__REGISTER_MAP": str(path)})
    acc = loaded.accelerator_map
    # 40 mA as integer uA, low word first: 40000 = 0x0000_9C40.
    assert encode(acc.field("beam_current_sp"), 40.0) == [0x9C40, 0x0000]
    assert decode(acc.field("energy"), [1200]) == pytest.approx(1.2)
    assert decode(acc.field("scan_width"), [1000]) == pytest.approx(100.0)
    assert bit_is_set(acc.field("status"), 1 << 9, "SAFETY_OK")
    assert counter_modulus(acc.field("charge_total")) == pytest.approx(2**32 * 1000.0)
    # The reference recipe still checks against this line.
    load_recipe(REFERENCE_RECIPE, loaded)


def test_a_file_given_as_the_directory_names_the_directory_to_give() -> None:
    with pytest.raises(ConfigError, match=r"line.toml: a file, not a configuration directory"):
        load_config(CONFIG_DIR / "line.toml", environ=NO_ENV)


@pytest.mark.parametrize(
    "value",
    [
        '{"op-1" = "operator", "QE.Lead" = "operator"}',  # a TOML inline table
        '{"op-1": "operator", "QE.Lead": "operator"}',  # a JSON object
    ],
)
def test_env_whole_table_names_identities_no_env_name_can_hold(value: str) -> None:
    # `op-1` cannot be an environment variable name's part, and names are lower-cased:
    # the whole table in one variable replaces the file's [mqtt.identities].
    loaded = load_config(CONFIG_DIR, environ={"LINECTL_MQTT__IDENTITIES": value})
    assert loaded.line.mqtt.identities == {"op-1": "operator", "QE.Lead": "operator"}
    assert loaded.overrides == ["mqtt.identities"]
    # A per-key override still adds to it (applied after the whole table).
    env = {"LINECTL_MQTT__IDENTITIES": value, "LINECTL_MQTT__IDENTITIES__BOB": "operator"}
    identities = load_config(CONFIG_DIR, environ=env).line.mqtt.identities
    assert identities == {"op-1": "operator", "QE.Lead": "operator", "bob": "operator"}
    # An undefined role is refused as in the file.
    bad = value.replace('"QE.Lead" = "operator"', '"QE.Lead" = "boss"').replace(
        '"QE.Lead": "operator"', '"QE.Lead": "boss"'
    )
    with pytest.raises(ConfigError, match=r"identities\.QE\.Lead: role 'boss' is not defined"):
        load_config(CONFIG_DIR, environ={"LINECTL_MQTT__IDENTITIES": bad})


def test_env_table_key_with_no_table_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.identities.*valid dictionary"):
        load_config(CONFIG_DIR, environ={"LINECTL_MQTT__IDENTITIES": "op-1=operator"})
