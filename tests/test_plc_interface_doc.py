"""docs/plc-interface.md documents both bundled register maps, and config/ points inside.

The PLC interface is linectl's contract with the PLC programmer: every field of the
bundled maps must appear in the doc, in its PLC's section, with the address, table, type,
word order, scale, unit, access, range and restart value the map declares, and every bit
of every `bits` field with its number. The configuration's comments must point at that
doc (or another file in the repository), never at a path outside it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from linectl.config import LoadedConfig, RegisterField, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"
DOC = ROOT / "docs" / "plc-interface.md"

# One register table row: address, name, table, type, word order, scale, unit, access,
# range, value after restart, meaning.
REGISTER_COLUMNS = 11


@pytest.fixture(scope="module")
def config() -> LoadedConfig:
    return load_config(CONFIG_DIR, environ={})


def _sections(text: str) -> dict[str, list[list[str]]]:
    """Table rows (cells stripped) under each level-2 heading that names a PLC."""
    out: dict[str, list[list[str]]] = {"accelerator": [], "conveyor": []}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line.lower()
            current = next((plc for plc in out if plc in title), None)
            continue
        if current is not None and line.startswith("|") and not line.startswith("|---"):
            out[current].append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def _num(x: float) -> str:
    return f"{x:g}"


def _address(f: RegisterField) -> str:
    return str(f.address) if f.width == 1 else f"{f.address}-{f.end - 1}"


def _expected_row(f: RegisterField) -> list[str]:
    rng = "" if f.min is None or f.max is None else f"{_num(f.min)} to {_num(f.max)}"
    after_restart = _num(f.default) if f.table == "holding" else ""
    return [
        _address(f),
        f"`{f.name}`",
        f.table,
        f.type,
        f.word_order,
        _num(f.scale),
        f.unit,
        f.access,
        rng,
        after_restart,
    ]


def test_doc_exists() -> None:
    assert DOC.is_file(), "docs/plc-interface.md is missing"


@pytest.mark.parametrize("plc", ["accelerator", "conveyor"])
def test_every_field_documented_with_its_address(config: LoadedConfig, plc: str) -> None:
    rmap = config.accelerator_map if plc == "accelerator" else config.conveyor_map
    rows = _sections(DOC.read_text(encoding="utf-8"))[plc]
    assert rows, f"no table rows under a '## ... {plc} ...' heading in {DOC.name}"
    problems = []
    for f in rmap.fields.values():
        mine = [r for r in rows if len(r) == REGISTER_COLUMNS and r[1] == f"`{f.name}`"]
        if not mine:
            problems.append(f"{plc}.{f.name}: no register table row")
            continue
        want = _expected_row(f)
        if not any(r[: len(want)] == want for r in mine):
            got = " / ".join(" | ".join(r[: len(want)]) for r in mine)
            problems.append(f"{plc}.{f.name}: want {' | '.join(want)}; doc has {got}")
            continue
        if f.counter and not any("wraps" in r[-1] for r in mine):
            problems.append(f"{plc}.{f.name}: a counter, but its row does not say where it wraps")
    assert not problems, "docs/plc-interface.md disagrees with the map:\n" + "\n".join(problems)


@pytest.mark.parametrize("plc", ["accelerator", "conveyor"])
def test_every_bit_documented(config: LoadedConfig, plc: str) -> None:
    rmap = config.accelerator_map if plc == "accelerator" else config.conveyor_map
    rows = _sections(DOC.read_text(encoding="utf-8"))[plc]
    documented = {tuple(r[:3]) for r in rows if len(r) >= 3}
    missing = [
        f"{f.name} bit {bit} {name}"
        for f in rmap.fields.values()
        for name, bit in f.bits.items()
        if (f"`{f.name}`", str(bit), f"`{name}`") not in documented
    ]
    assert not missing, f"{plc} bits missing from docs/plc-interface.md: {missing}"


def test_check_catches_a_missing_field(config: LoadedConfig) -> None:
    # The check above must fail when a field is absent: drop one row and look again.
    text = DOC.read_text(encoding="utf-8")
    rows = _sections(text)["conveyor"]
    f = config.conveyor_map.field("ramp_rate")
    without = [r for r in rows if r[1:2] != [f"`{f.name}`"]]
    assert len(without) < len(rows)
    assert not any(r[: len(_expected_row(f))] == _expected_row(f) for r in without)


# --------------------------------------------------------------------------- config/ paths

# A token that looks like a path to a document or a configuration file.
_PATH_TOKEN = re.compile(r"[\w./~-]*[\w-]+\.(?:md|toml|txt|pdf|json)\b")


def _config_files() -> list[Path]:
    return sorted(p for p in CONFIG_DIR.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_points_inside_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for needle in ("../shared", "shared/spec", "/work/"):
        assert needle not in text, f"{path}: refers to {needle!r}, outside the repository"
    root = ROOT.resolve()
    for token in _PATH_TOKEN.findall(text):
        assert not token.startswith(("/", "~")), f"{path}: absolute path {token!r}"
        # Relative to the repository (docs/...) or to the file's own directory
        # (registers/accelerator.toml from line.toml); either way inside the repository.
        candidates = [(ROOT / token).resolve(), (path.parent / token).resolve()]
        inside = [c for c in candidates if c.is_relative_to(root) and c.is_file()]
        assert inside, f"{path}: {token!r} is not a file inside the repository"
