"""linectl.cli in-process: exit codes, summaries, messages, schema export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from linectl import __version__
from linectl.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"
BAD_DIR = Path(__file__).resolve().parent / "bad_configs"
RECIPE = CONFIG_DIR / "recipes" / "pv-1x6-en50618.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own LINECTL_* settings must not change what these tests see.
    for name in list(os.environ):
        if name.startswith("LINECTL_"):
            monkeypatch.delenv(name)


def test_config_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(CONFIG_DIR)]) == 0
    out = capsys.readouterr().out
    assert "line line1" in out
    assert "accelerator 127.0.0.1:5020 unit 1" in out
    assert "conveyor    127.0.0.1:5021 unit 1" in out
    assert "15 fields (6 holding, 9 input)" in out
    assert "11 fields (5 holding, 6 input)" in out
    assert "16 passes" in out
    assert "pv-1x6-en50618 (version 1) ok, 80 m/min at full current" in out
    assert out.rstrip().endswith("ok")


def test_config_check_uses_env_dir_and_overrides(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LINECTL_CONFIG_DIR", str(CONFIG_DIR))
    monkeypatch.setenv("LINECTL_ACCELERATOR__PORT", "6000")
    assert main(["config", "check"]) == 0
    out = capsys.readouterr().out
    assert "environment overrides: accelerator.port" in out
    assert "127.0.0.1:6000" in out


def test_config_check_default_dir_is_cwd_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["config", "check"]) == 0
    assert "line line1" in capsys.readouterr().out


def test_config_check_missing_dir_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["config", "check", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert "nope: no such configuration directory (give --config DIR" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_config_check_bad_map_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = BAD_DIR / "accelerator-overlap.toml"
    monkeypatch.setenv("LINECTL_ACCELERATOR__REGISTER_MAP", str(bad))
    assert main(["config", "check", str(CONFIG_DIR)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "holding registers overlap" in err


def test_config_check_reports_every_bad_recipe(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, config)
    for name in ("recipe-current-above-rating.toml", "recipe-min-above-target.toml"):
        shutil.copy(BAD_DIR / name, config / "recipes" / name)
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "recipe-current-above-rating.toml: beam_current_max_ma 150" in err
    assert "recipe-min-above-target.toml: invalid" in err


def test_config_check_missing_recipes_dir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, config)
    shutil.rmtree(config / "recipes")
    assert main(["config", "check", str(config)]) == 2
    assert "recipes directory" in capsys.readouterr().err


def test_recipe_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipe", "check", str(RECIPE), "--config", str(CONFIG_DIR)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out
    assert "PV1-F 1x6 mm2 EN 50618, version 1" in out
    assert "max line speed at full current (40 mA): 80 m/min (limited by beam current)" in out


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("recipe-current-above-rating.toml", "beam_current_max_ma 150"),
        ("recipe-missing-required.toml", "k_dose: Field required"),
        ("recipe-current-cannot-reach-dose.toml", "cannot give 120.0 kGy"),
    ],
)
def test_recipe_check_bad_exit_2(capsys: pytest.CaptureFixture[str], name: str, part: str) -> None:
    path = BAD_DIR / name
    assert main(["recipe", "check", str(path), "--config", str(CONFIG_DIR)]) == 2
    captured = capsys.readouterr()
    assert str(path) in captured.err
    assert part in captured.err
    assert "Traceback" not in captured.err


def test_recipe_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert main(["recipe", "check", str(path), "--config", str(CONFIG_DIR)]) == 2
    assert f"{path}: file not found" in capsys.readouterr().err


def test_schema_to_stdout_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schemas = json.loads(capsys.readouterr().out)
    assert set(schemas) == {"line", "register_map", "recipe"}
    assert schemas["recipe"]["properties"]["k_dose"]["description"]


def test_schema_to_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "schemas"
    assert main(["config", "schema", "--out", str(out_dir)]) == 0
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["line.schema.json", "recipe.schema.json", "register_map.schema.json"]
    for path in out_dir.iterdir():
        assert json.loads(path.read_text(encoding="utf-8"))["type"] == "object"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "run", "report"])
def test_daemon_commands_explain_themselves(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    assert "--config" in capsys.readouterr().out


def test_run_refuses_a_reel_without_length(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(CONFIG_DIR), "--reel", "R1"]) == 2
    assert "--length" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"linectl {__version__}"


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["config", "--help"], ["config", "check", "--help"], ["recipe", "check", "-h"]],
)
def test_help_everywhere(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: linectl" in out


def test_help_states_process_protection_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "never replaces the plant's personnel-safety system" in out


@pytest.mark.parametrize("argv", [[], ["config"], ["bogus"], ["recipe", "check"]])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_sim_passes_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """`linectl -v sim --x y` hands ['--x', 'y'] to simulators.cli.main untouched."""
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    fake = types.ModuleType("simulators.cli")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "simulators.cli", fake)
    assert main(["-v", "sim", "--help", "run", "--port", "5020"]) == 3
    assert seen == [["--help", "run", "--port", "5020"]]


def test_keyboard_interrupt_exit_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    fake = types.ModuleType("simulators.cli")
    fake.main = interrupted  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "simulators.cli", fake)
    assert main(["sim"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "linectl", "config", "check", str(CONFIG_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "line line1" in result.stdout


def test_sim_help_reaches_the_simulators(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("simulators.cli")
    assert main(["sim", "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


# ------------------------------------------------------ run and report: refused before start


@pytest.mark.parametrize(
    ("argv", "part"),
    [
        # A byte of argv that is not UTF-8 arrives as a lone surrogate: an operator named
        # so with --resume made every store write fail and took the line to FAULT.
        (["--resume", "--operator", "op\udcff"], "--operator: operator 'op\\udcff' holds"),
        (["--operator", "op\x1b[2J"], "--operator: operator"),
        (["--reel", "R1", "--length", "5", "--operator", "op\udcff"], "lone surrogate"),
        (["--reel", "R1\udcff", "--length", "5"], "reel_id 'R1\\udcff' does not match"),
        (["--reel", "R1\n", "--length", "5"], "does not match"),
        (["--reel", "R1", "--length", "nan"], "--length must be a positive number"),
        (["--reel", "R1", "--length", "inf"], "--length must be a positive number"),
        (["--reel", "R" * 65, "--length", "5"], "does not match"),
        (["--operator", "x" * 201], "longer than 200 characters"),
        (["--recipe", "pv.x"], "--recipe: recipe 'pv.x' does not match"),
        (["--recipe", "recipes/pv\udcff.toml"], "--recipe: recipe"),
    ],
)
def test_run_refuses_what_the_mqtt_path_refuses_before_anything_starts(
    argv: list[str], part: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "r.sqlite"
    assert main(["run", "--config", str(CONFIG_DIR), "--db", str(db), *argv]) == 2
    err = capsys.readouterr().err
    assert part in err, err
    assert "Traceback" not in err
    assert not db.exists()  # nothing was started: not even the record store


def test_run_refuses_a_non_utf8_operator_from_a_real_argv(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    argv = [sys.executable, "-m", "linectl", "run", "--config", str(CONFIG_DIR)]
    result = subprocess.run(
        [*argv, "--db", str(db), "--resume", "--operator", b"op\xff"],
        capture_output=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")},
    )
    assert result.returncode == 2, result.stderr
    assert b"--operator: operator 'op\\udcff' holds a control character or a lone surrogate" in (
        result.stderr
    )
    assert b"Traceback" not in result.stderr
    assert not db.exists()


def _damaged_database(path: Path) -> None:
    from linectl.core.ledger import MetreRecord, Verdict
    from linectl.store import RecordStore, ReelInfo

    with RecordStore(path) as store:
        store.open_reel(ReelInfo("R1", "line1", "p", "1", "h", "{}", "op", 5000.0, "2025"))
        for start in range(0, 6000, 500):
            metres = [
                MetreRecord(i, 120.0, 119.0, 121.0, Verdict.IN_SPEC, ())
                for i in range(start, start + 500)
            ]
            store.add_metres("R1", metres, "2025")
    size = path.stat().st_size
    with path.open("r+b") as f:  # every page but the first (the schema): every table
        f.seek(4096)
        f.write(os.urandom(size - 4096))


@pytest.mark.parametrize("damage", ["not a database", "damaged pages"])
@pytest.mark.parametrize("command", [["run"], ["report"], ["report", "R1"]])
def test_a_damaged_record_database_exits_2_naming_the_file(
    damage: str, command: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "r.sqlite"
    if damage == "not a database":
        db.write_bytes(b"SQLite format 2\0" + os.urandom(8192))
    else:
        _damaged_database(db)
    before = db.read_bytes()
    argv = [*command, "--db", str(db)]
    if command == ["run"]:
        argv += ["--config", str(CONFIG_DIR)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"linectl: error: {db}: " in err
    assert "damaged" in err
    assert "Traceback" not in err
    assert db.read_bytes() == before  # left as it was, for whoever restores it
