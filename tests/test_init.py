"""linectl outside the source tree: the reference configuration shipped in the package,
`linectl init DIR`, and where `demo`, `sim` and `config check` take their configuration
from when given none (and what they say about it)."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tomllib
import types
from pathlib import Path

import pytest

import linectl
from linectl.cli import build_parser, main
from linectl.config import (
    config_dir_or_reference,
    load_config,
    reference_config_dir,
    reference_config_note,
)
from linectl.errors import ConfigError, LocalError

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(linectl.__file__).resolve().parent / "reference"
STARTER_FILES = {
    "line.toml",
    "registers/accelerator.toml",
    "registers/conveyor.toml",
    "recipes/pv-1x6-en50618.toml",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own LINECTL_* settings must not change what these tests see.
    for name in list(os.environ):
        if name.startswith("LINECTL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: no ./config, as for a user of the installed package."""
    cwd = tmp_path / "empty"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the reference


def test_reference_configuration_is_package_data_and_config_links_to_it() -> None:
    assert reference_config_dir() == REFERENCE
    # Declared once: the checkout's config/ is the package's reference configuration.
    assert (ROOT / "config").resolve() == REFERENCE
    assert _files(REFERENCE) >= STARTER_FILES
    loaded = load_config(REFERENCE, environ={})
    assert loaded.line.line_id == "line1"
    assert [p.stem for p in sorted(loaded.recipes_dir.glob("*.toml"))] == ["pv-1x6-en50618"]


def test_config_dir_or_reference(empty_cwd: Path) -> None:
    assert config_dir_or_reference({}) == (REFERENCE, True)
    # An explicit LINECTL_CONFIG_DIR is kept even when missing: load_config then says so.
    assert config_dir_or_reference({"LINECTL_CONFIG_DIR": "/nowhere"}) == (
        Path("/nowhere"),
        False,
    )
    (empty_cwd / "config").mkdir()
    assert config_dir_or_reference({}) == (Path("config"), False)


# --------------------------------------------------------------------------- init


def test_init_writes_a_starter_that_config_check_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "plant" / "line 7"  # a parent to create, a space to quote
    assert main(["init", str(target)]) == 0
    out = capsys.readouterr().out
    assert _files(target) == STARTER_FILES
    assert (target / "records").is_dir()
    for name in STARTER_FILES:
        assert str(target / name) in out
    quoted = shlex.quote(str(target))
    for command in ("config check", "sim --config", "run --config"):
        assert f"linectl {command} {quoted}" in out

    assert main(["config", "check", str(target)]) == 0
    checked = capsys.readouterr().out
    assert "pv-1x6-en50618 (version 1) ok" in checked
    assert checked.rstrip().endswith("ok")


def test_init_starter_is_the_reference_with_paths_inside_it(tmp_path: Path) -> None:
    target = tmp_path / "cfg"
    assert main(["init", str(target)]) == 0
    # Maps and recipe as shipped; line.toml is the reference under a header of its own.
    for name in STARTER_FILES - {"line.toml"}:
        assert (target / name).read_bytes() == (REFERENCE / name).read_bytes()
    text = (target / "line.toml").read_text(encoding="utf-8")
    assert text.startswith("# Starter configuration written by `linectl init`")
    assert text.endswith((REFERENCE / "line.toml").read_text(encoding="utf-8"))
    # Nothing points into the package, the source tree or where init ran.
    for elsewhere in (str(REFERENCE), str(ROOT), str(tmp_path), "site-packages"):
        assert elsewhere not in text
    data = tomllib.loads(text)
    relative = [
        data["recipes_dir"],
        data["accelerator"]["register_map"],
        data["conveyor"]["register_map"],
        data["records"]["path"],
    ]
    for path in relative:
        assert not Path(path).is_absolute(), path
    loaded = load_config(target, environ={})
    assert loaded.recipes_dir == target / "recipes"
    records = loaded.resolve(loaded.line.records.path)
    assert records.parent == target / "records"
    assert records.parent.is_dir()


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """(header, lines) per TOML table; the first is the top-level keys ("")."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        match = re.match(r"\s*\[+([^\]]+)\]+\s*$", line)
        if match:
            sections.append((match.group(1), []))
        else:
            sections[-1][1].append(line)
    return sections


def test_init_starter_line_toml_comments_every_section(tmp_path: Path) -> None:
    target = tmp_path / "cfg"
    assert main(["init", str(target)]) == 0
    sections = _sections((target / "line.toml").read_text(encoding="utf-8"))
    assert len(sections) > 10
    uncommented = []
    for i, (header, lines) in enumerate(sections):
        # A comment inside the table, or right above its header (the previous lines' end).
        above = sections[i - 1][1] if i else []
        tail = []
        for line in reversed(above):
            if not line.strip().startswith("#"):
                break
            tail.append(line)
        if not tail and not any(line.strip().startswith("#") for line in lines):
            uncommented.append(header or "(top-level keys)")
    assert not uncommented, f"sections without a comment: {uncommented}"


def test_init_refuses_a_non_empty_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "cfg"
    target.mkdir()
    (target / "line.toml").write_text("# the plant's own\n", encoding="utf-8")
    assert main(["init", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"{target}: exists and is not empty; nothing written" in err
    assert "--force" in err
    assert "Traceback" not in err
    assert _files(target) == {"line.toml"}
    assert (target / "line.toml").read_text(encoding="utf-8") == "# the plant's own\n"


def test_init_force_overwrites_the_starter_and_keeps_other_files(tmp_path: Path) -> None:
    target = tmp_path / "cfg"
    target.mkdir()
    (target / "line.toml").write_text("# broken\n", encoding="utf-8")
    (target / "linectl.env").write_text("LINECTL_MQTT__PASSWORD=x\n", encoding="utf-8")
    assert main(["init", "--force", str(target)]) == 0
    assert _files(target) == STARTER_FILES | {"linectl.env"}
    assert (target / "linectl.env").read_text(encoding="utf-8") == "LINECTL_MQTT__PASSWORD=x\n"
    assert main(["config", "check", str(target)]) == 0


def test_init_into_an_existing_empty_directory(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path)]) == 0
    assert _files(tmp_path) >= STARTER_FILES


def test_init_onto_a_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "cfg"
    target.write_text("", encoding="utf-8")
    assert main(["init", "--force", str(target)]) == 2
    assert f"{target}: exists and is not a directory" in capsys.readouterr().err


def test_init_copies_only_the_starter_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkout's config/ (the reference) may hold records of a `linectl run --config
    # config`: never copied.
    reference = tmp_path / "reference"
    reference.mkdir()
    for name in STARTER_FILES:
        (reference / name).parent.mkdir(parents=True, exist_ok=True)
        (reference / name).write_bytes((REFERENCE / name).read_bytes())
    (reference / "records").mkdir()
    (reference / "records" / "linectl.sqlite").write_bytes(b"SQLite format 3\0")
    monkeypatch.setattr("linectl.cli.reference_config_dir", lambda: reference)
    target = tmp_path / "cfg"
    assert main(["init", str(target)]) == 0
    assert _files(target) == STARTER_FILES


# --------------------------------------------------------------------------- defaults


def test_config_check_without_any_configuration_says_to_init(
    empty_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check"]) == 2
    captured = capsys.readouterr()
    assert "no configuration directory given, and there is no ./config here" in captured.err
    assert "`linectl init DIR`" in captured.err
    assert captured.out == ""


def test_config_check_with_a_missing_env_dir_says_to_init(
    empty_cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LINECTL_CONFIG_DIR", str(empty_cwd / "etc"))
    assert main(["config", "check"]) == 2
    err = capsys.readouterr().err
    assert f"$LINECTL_CONFIG_DIR names {empty_cwd / 'etc'}, which does not exist" in err
    assert f"`linectl init {empty_cwd / 'etc'}`" in err


def test_missing_configuration_directory_names_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere: no such configuration directory") as info:
        load_config(tmp_path / "nowhere", environ={})
    assert f"`linectl init {tmp_path / 'nowhere'}`" in str(info.value)
    assert "source tree" not in str(info.value)


def _stop_demo_at_load(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """linectl.demo's load_config replaced: records the directory, then stops the demo."""
    seen: list[Path] = []

    def load(directory: Path) -> None:
        seen.append(Path(directory))
        raise LocalError("stopped by the test")

    monkeypatch.setattr("linectl.demo.load_config", load)
    return seen


def test_demo_without_configuration_uses_the_reference_and_says_so_first(
    empty_cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _stop_demo_at_load(monkeypatch)
    assert main(["demo", "--no-mqtt", "--out", str(empty_cwd / "out")]) == 2
    assert seen == [REFERENCE]
    first = capsys.readouterr().out.splitlines()[0]
    assert first == reference_config_note(REFERENCE)
    assert first.startswith("linectl: using the reference configuration shipped with linectl (")
    assert "give --config DIR for your own" in first


@pytest.mark.parametrize("where", ["option", "cwd", "env"])
def test_demo_with_a_configuration_uses_it_silently(
    where: str,
    empty_cwd: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _stop_demo_at_load(monkeypatch)
    mine = empty_cwd / "config"
    mine.mkdir()
    argv = ["demo", "--no-mqtt", "--out", str(empty_cwd / "out")]
    if where == "option":
        argv += ["--config", str(mine)]
    elif where == "env":
        monkeypatch.setenv("LINECTL_CONFIG_DIR", str(mine))
    assert main(argv) == 2
    assert [p.resolve() for p in seen] == [mine.resolve()]
    assert "reference configuration" not in capsys.readouterr().out


def _fake_simulators(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    fake = types.ModuleType("simulators.cli")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "simulators.cli", fake)
    return seen


def test_sim_without_configuration_gets_the_reference_and_says_so_first(
    empty_cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _fake_simulators(monkeypatch)
    assert main(["sim", "--seed", "3"]) == 0
    assert seen == [["--config", str(REFERENCE), "--seed", "3"]]
    assert capsys.readouterr().err.splitlines()[0] == reference_config_note(REFERENCE)


@pytest.mark.parametrize(
    "argv", [["--config", "mine"], ["--config=mine"], ["--conf", "mine"], ["--co=mine"]]
)
def test_sim_with_a_configuration_passes_it_through(
    argv: list[str],
    empty_cwd: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _fake_simulators(monkeypatch)
    assert main(["sim", *argv]) == 0
    assert seen == [argv]
    assert capsys.readouterr().err == ""


def test_sim_with_a_configuration_in_cwd_uses_it(
    empty_cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (empty_cwd / "config").mkdir()
    seen = _fake_simulators(monkeypatch)
    assert main(["sim"]) == 0
    assert seen == [[]]  # the simulators' own default, ./config
    assert capsys.readouterr().err == ""


def test_sim_runs_on_the_reference(empty_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("simulators.cli")
    argv = ["sim", "--duration", "0.2", "--acc-port", "0", "--cnv-port", "0"]
    assert main(argv) == 0
    assert capsys.readouterr().err.splitlines()[0] == reference_config_note(REFERENCE)


def test_sim_help_says_where_its_configuration_comes_from(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("simulators.cli")
    assert main(["sim", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config DIR defaults to $LINECTL_CONFIG_DIR, else ./config" in out
    assert f"the reference configuration shipped with linectl ({REFERENCE})" in out


def _commands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((f"{prefix}{name}", sub))
                found.extend(_commands(sub, f"{prefix}{name} "))
    return found


def test_every_commands_help_says_where_its_configuration_comes_from() -> None:
    checked = []
    for name, parser in _commands(build_parser()):
        for action in parser._actions:
            names_config = "--config" in action.option_strings or (
                not action.option_strings and action.dest == "directory" and name != "init"
            )
            if names_config and name.startswith("historian"):
                # The historian's configuration is a file of its own, not a line's directory.
                assert "default: ./historian.toml" in (action.help or ""), name
                continue
            if names_config:
                checked.append(name)
                assert "$LINECTL_CONFIG_DIR" in (action.help or ""), name
                assert "./config" in (action.help or ""), name
    assert {"run", "demo", "report", "probe", "config check", "status", "watch"} <= set(checked)
    demo = dict(_commands(build_parser()))["demo"]
    (config,) = [a for a in demo._actions if "--config" in a.option_strings]
    assert "reference configuration shipped with linectl" in (config.help or "")
