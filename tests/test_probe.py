"""`linectl probe` against the bundled simulators, with the right maps and with wrong ones.

The simulator always serves the right map (config/); the probe is given a copy of the
configuration in which one field of one map is wrong: a word order, an address, a scale.
Each must make the probe fail a check that names the field. No timing assertions.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from linectl import cli, codec
from linectl.config import load_config
from linectl.probe import (
    PlcReading,
    active_refusal,
    check_clock,
    check_counters,
    out_of_range_value,
    roundtrip_value,
)
from simulators.server import SimulatedLine
from tests.conftest import CONFIG_DIR, free_port


def probe_config(tmp_path: Path, sim: SimulatedLine) -> Path:
    """A copy of config/ whose endpoints are the simulator's ports."""
    target = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, target)
    line = target / "line.toml"
    text = line.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^port = 5020$", f"port = {sim.acc_port}", text)
    text = re.sub(r"(?m)^port = 5021$", f"port = {sim.cnv_port}", text)
    line.write_text(text, encoding="utf-8")
    loaded = load_config(target, environ={})
    assert loaded.line.accelerator.port == sim.acc_port
    assert loaded.line.conveyor.port == sim.cnv_port
    return target


def edit_field(config: Path, plc: str, name: str, **changes: str) -> None:
    """Set keys (TOML values as text) of `[fields.<name>]` in a copied map file."""
    path = config / "registers" / f"{plc}.toml"
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"[fields.{name}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    for key, value in changes.items():
        for i in range(start + 1, end):
            if re.match(rf"{key}\s*=", lines[i]):
                lines[i] = f"{key} = {value}"
                break
        else:
            lines.insert(start + 1, f"{key} = {value}")
            end += 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`linectl probe ...` in a thread (it runs its own event loop) while the simulator
    runs on the test's loop; (exit code, stdout, stderr)."""
    code = await asyncio.to_thread(cli.main, ["probe", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def failed(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in result["checks"] if c["status"] == "fail"]


# --------------------------------------------------------------------------- right maps


async def test_probe_passes_with_the_right_maps(
    line: SimulatedLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = probe_config(tmp_path, line)
    code, out, err = await run_cli(capsys, str(config), "--json", "--seconds", "1")
    result = json.loads(out)
    assert failed(result) == [], err
    assert code == 0
    assert result["schema"] == "linectl.probe/1"
    assert result["ok"] is True
    acc = result["plcs"]["accelerator"]["fields"]
    assert acc["energy_sp"]["value"] == 0.5
    assert acc["energy_sp"]["unit"] == "MeV"
    assert set(acc["clock"]["other_word_orders"]) == {"CDAB", "BADC", "DCBA"}
    assert "READY" in acc["status"]["bits_set"]
    checks = {(c["plc"], c["check"], c["field"]) for c in result["checks"]}
    for plc in ("accelerator", "conveyor"):
        assert (plc, "clock", "clock") in checks
        assert (plc, "status REMOTE", "status") in checks
    assert ("accelerator", "counter at rest", "charge_total") in checks
    assert ("conveyor", "counter at rest", "length") in checks


async def test_probe_text_output_has_values_other_orders_and_a_table(
    line: SimulatedLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = probe_config(tmp_path, line)
    code, out, _err = await run_cli(capsys, str(config), "--plc", "conveyor", "--seconds", "1")
    assert code == 0
    assert re.search(r"ramp_rate\s+holding 5-6\s+float32 ABCD 30 m/min/s\s+CDAB ", out)
    assert "PASS  conveyor" in out
    assert "FAIL" not in out
    assert out.rstrip().endswith("PASS")


async def test_probe_active_passes_on_a_line_at_rest(
    line: SimulatedLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = probe_config(tmp_path, line)
    code, out, err = await run_cli(capsys, str(config), "--active", "--json", "--seconds", "1")
    result = json.loads(out)
    assert failed(result) == [], err
    assert code == 0
    names = {(c["plc"], c["check"], c["field"]) for c in result["checks"]}
    for plc, sp in (("accelerator", "energy_sp"), ("conveyor", "speed_sp")):
        assert (plc, "set-point round trip", sp) in names
        assert (plc, "out-of-range write refused", sp) in names
        assert (plc, "FAULT_RESET edge", "command") in names
        assert (plc, "watchdog trip", "watchdog_timeout") in names
        assert (plc, "FAULT_RESET clears the trip", "command") in names
    # Left as found (set-points restored), no fault latched, the watchdog disabled.
    for plc in ("accelerator", "conveyor"):
        rmap = line.plant.register_map(plc)
        holding = line.plant.holding_registers(plc)

        def value(name: str, rmap: Any = rmap, holding: Any = holding) -> float:
            f = rmap.field(name)
            return codec.decode(f, [holding[a] for a in range(f.address, f.end)])

        assert value("watchdog_timeout") == 0
        for f in rmap.by_table["holding"]:
            if f.name not in ("command", "watchdog", "watchdog_timeout"):
                assert value(f.name) == f.default, f.name
    code, out, _err = await run_cli(capsys, str(config), "--json", "--seconds", "0.5")
    assert code == 0, failed(json.loads(out))


# --------------------------------------------------------------------------- wrong maps

WRONG_MAPS = [
    # word order swapped: a float set-point turns into a denormal, a clock races
    pytest.param(("accelerator", "scan_width_sp", {"word_order": '"CDAB"'}), id="order-float"),
    pytest.param(("conveyor", "clock", {"word_order": '"CDAB"'}), id="order-clock"),
    # address shifted by one: the simulator (like many PLCs) refuses unmapped registers
    pytest.param(("accelerator", "clock", {"address": "14"}), id="address-clock"),
    pytest.param(("conveyor", "ramp_rate", {"address": "6"}), id="address-ramp"),
    # wrong scale: a set-point out of its range, a clock at 10 ms per ms, a tension that
    # contradicts TENSION_OK
    pytest.param(("accelerator", "energy_sp", {"scale": "0.1"}), id="scale-setpoint"),
    pytest.param(("conveyor", "clock", {"scale": "10.0"}), id="scale-clock"),
    pytest.param(("conveyor", "tension", {"scale": "0.1"}), id="scale-tension"),
]


@pytest.mark.parametrize("case", WRONG_MAPS)
async def test_probe_names_the_field_of_a_wrong_map(
    line: SimulatedLine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: tuple[str, str, dict[str, str]],
) -> None:
    plc, name, changes = case
    config = probe_config(tmp_path, line)
    edit_field(config, plc, name, **changes)
    code, out, _err = await run_cli(capsys, str(config), "--plc", plc, "--json", "--seconds", "1")
    result = json.loads(out)
    bad = failed(result)
    assert code == 1
    assert result["ok"] is False
    assert any(c["field"] == name and c["plc"] == plc for c in bad), bad


async def test_probe_whole_map_shifted_by_one(
    line: SimulatedLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A map written with 1-based addresses: every request is refused; read one by one,
    the fields that land on no register are named, the others read their neighbours."""
    config = probe_config(tmp_path, line)
    rmap = load_config(config, environ={}).conveyor_map
    for f in rmap.fields.values():
        edit_field(config, "conveyor", f.name, address=str(f.address + 1))
    code, out, _err = await run_cli(
        capsys, str(config), "--plc", "conveyor", "--json", "--seconds", "1"
    )
    bad = failed(json.loads(out))
    assert code == 1
    reads = {c["field"] for c in bad if c["check"] == "read"}
    assert {"ramp_rate", "clock"} <= reads, bad
    assert any(c["check"] == "read" and "holding 1..7" in c["detail"] for c in bad)


# --------------------------------------------------------------------------- refusals


async def test_probe_unreachable_plc_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    code, out, err = await run_cli(
        capsys, str(CONFIG_DIR), "--plc", "accelerator", "--host", "127.0.0.1", "--port", str(port)
    )
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("linectl:")]
    assert len(lines) == 1
    assert f"accelerator: cannot connect to 127.0.0.1:{port}" in lines[0]


async def test_probe_port_needs_one_plc(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = await run_cli(capsys, str(CONFIG_DIR), "--port", "5020")
    assert code == 2
    assert "--port needs --plc" in err


async def test_probe_active_refused_while_the_line_runs(
    line: SimulatedLine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = probe_config(tmp_path, line)
    rmap = line.plant.register_map("conveyor")
    sp = rmap.field("speed_sp")
    cmd = rmap.field("command")
    assert line.plant.write_holding("conveyor", sp.address, codec.encode(sp, 20.0)) is None
    run = codec.with_bit(cmd, 0, "RUN", True)
    assert line.plant.write_holding("conveyor", cmd.address, codec.encode(cmd, run)) is None
    for _ in range(200):
        if line.plant.input_values("conveyor")["speed"] > 1.0:
            break
        await asyncio.sleep(0.02)
    before = dict(line.plant.holding_registers("conveyor"))
    code, out, err = await run_cli(
        capsys, str(config), "--plc", "conveyor", "--active", "--seconds", "0.5"
    )
    assert code == 2
    assert "Traceback" not in err
    assert "probe --active refused, nothing was written" in err
    assert "RUNNING" in err or "RUN is requested" in err
    assert "counter at rest" in out  # the read-only checks ran and were printed
    after = line.plant.holding_registers("conveyor")
    assert {a: after[a] for a in before if a != rmap.field("watchdog").address} == {
        a: v for a, v in before.items() if a != rmap.field("watchdog").address
    }


# --------------------------------------------------------------------------- pure checks


def _reading(plc: str, series: dict[str, list[tuple[float, tuple[int, ...]]]]) -> PlcReading:
    cfg = load_config(CONFIG_DIR, environ={})
    rmap = cfg.accelerator_map if plc == "accelerator" else cfg.conveyor_map
    regs = {name: s[0][1] for name, s in series.items()}
    return PlcReading(plc, rmap, regs, {k: tuple(v) for k, v in series.items()})  # type: ignore[arg-type]


def _clock_series(
    rate: float, n: int = 20, start_ms: int = 65_000
) -> list[tuple[float, tuple[int, ...]]]:
    cfg = load_config(CONFIG_DIR, environ={})
    f = cfg.conveyor_map.field("clock")
    return [
        (i * 0.05, tuple(codec.encode(f, (start_ms + round(i * 50 * rate)) % (1 << 32))))
        for i in range(n)
    ]


def test_check_clock_rate() -> None:
    cfg = load_config(CONFIG_DIR, environ={})
    f = cfg.conveyor_map.field("clock")
    assert check_clock("conveyor", f, tuple(_clock_series(1.0))).status == "pass"
    slow = check_clock("conveyor", f, tuple(_clock_series(0.1)))
    assert slow.status == "fail"
    assert "scale" in slow.detail
    swapped = f.model_copy(update={"word_order": "CDAB"})
    wrong = check_clock("conveyor", swapped, tuple(_clock_series(1.0)))
    assert wrong.status == "fail"
    assert "read as ABCD" in wrong.detail
    assert check_clock("conveyor", f, tuple(_clock_series(1.0, n=2))).status == "fail"


def test_check_clock_across_the_wrap() -> None:
    cfg = load_config(CONFIG_DIR, environ={})
    f = cfg.conveyor_map.field("clock")
    series = tuple(_clock_series(1.0, start_ms=(1 << 32) - 400))
    assert check_clock("conveyor", f, series).status == "pass"


def test_counters_that_move_at_rest_fail() -> None:
    cfg = load_config(CONFIG_DIR, environ={})
    rmap = cfg.conveyor_map
    length = rmap.field("length")
    zero = {
        name: [(0.0, tuple(codec.encode(rmap.field(name), 0)))]
        for name in ("command", "status", "speed")
    }
    moving = [(i * 0.1, tuple(codec.encode(length, 1000 + i))) for i in range(5)]
    checks = check_counters(_reading("conveyor", {**zero, "length": moving}))
    assert [(c.field, c.status) for c in checks] == [("length", "fail")]
    still = [(i * 0.1, tuple(codec.encode(length, 1000))) for i in range(5)]
    checks = check_counters(_reading("conveyor", {**zero, "length": still}))
    assert [(c.field, c.status) for c in checks] == [("length", "pass")]


def test_active_refused_when_another_controller_beats_the_watchdog() -> None:
    cfg = load_config(CONFIG_DIR, environ={})
    rmap = cfg.conveyor_map
    series = {
        name: [(0.0, tuple(codec.encode(rmap.field(name), 0)))]
        for name in ("command", "status", "speed", "watchdog_timeout")
    }
    wd = rmap.field("watchdog")
    series["watchdog"] = [(i * 0.05, tuple(codec.encode(wd, i))) for i in range(3)]
    why = active_refusal(_reading("conveyor", series))
    assert any("another controller" in w for w in why)
    series["watchdog"] = [(0.0, tuple(codec.encode(wd, 7)))]
    assert active_refusal(_reading("conveyor", series)) == []


def test_roundtrip_and_out_of_range_values() -> None:
    cfg = load_config(CONFIG_DIR, environ={})
    for rmap in (cfg.accelerator_map, cfg.conveyor_map):
        for f in rmap.fields.values():
            if f.min is None or f.max is None:
                continue
            v = roundtrip_value(f, f.default)
            assert v is not None
            assert f.min <= v <= f.max
            assert v != f.default
            bad = out_of_range_value(f)
            assert bad is not None
            assert bad > f.max
