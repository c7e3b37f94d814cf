"""The package as it is shipped: the sdist, and the wheel built from it (as `python -m build`
does), carry every file of linectl/ and simulators/ the runtime reads (the reference
configuration, the Sparkplug schema and module, the HMI's files, the historian's SQL) and
nothing of tests/ or bench/; the wheel's code, away from the checkout, finds its own
reference configuration.

.ci/run builds both archives first and hands them over in CI_LINECTL_DIST (a directory);
without it they are built here, offline, with this environment's setuptools, from a copy
of the checkout as git sees it (a build writes into its source tree: egg-info, the
sdist's release tree; and an old build/ there would leak into the wheel).
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from linectl import __version__
from linectl.config import load_config

# Two builds (about 2 s) and three runs of the unpacked wheel's CLI: 4 to 5 s in all.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("linectl", "simulators")
# What the runtime reads besides modules, by name: a file missing from the wheel here is
# a command that fails on a plant host only.
REQUIRED = {
    "linectl/reference/line.toml",
    "linectl/reference/registers/accelerator.toml",
    "linectl/reference/registers/conveyor.toml",
    "linectl/reference/recipes/pv-1x6-en50618.toml",
    "linectl/sparkplug/sparkplug_b.proto",
    "linectl/sparkplug/sparkplug_b_pb2.py",
    "linectl/web/static/index.html",
    "linectl/web/static/hmi.js",
    "linectl/web/static/hmi.css",
    "linectl/web/static/vendor/uPlot.iife.min.js",
    "linectl/web/static/vendor/uPlot.min.css",
    "linectl/cli.py",
    "simulators/cli.py",
}
# Never shipped: local state a checkout gathers.
JUNK = ("__pycache__", ".pyc", ".sqlite", ".sqlite-wal", ".sqlite-shm")
# Without git: what a checkout holds that a fresh clone does not.
LOCAL = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".*_cache",
    ".hypothesis",
    "records",
    "demo-out",
    "*.sqlite*",
)


@dataclass(frozen=True)
class Dist:
    sdist: Path
    wheel: Path


def _git_files() -> list[str] | None:
    """The checkout's files as git sees them: tracked, or new and not ignored (None
    without git or outside a checkout)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    # Tracked files deleted in the working tree are gone.
    return [name for name in listed if os.path.lexists(ROOT / name)]


def _copy_checkout(dest: Path) -> None:
    names = _git_files()
    if names is None:
        shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(*LOCAL))
        return
    for name in names:
        source, target = ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():  # config -> linectl/reference
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)


def _build(out: Path, tree: Path) -> None:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build needs")
    _copy_checkout(tree)
    # The sdist with setuptools' PEP 517 hook (what `python -m build --sdist` calls) ...
    sdist = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
            str(out),
        ],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert sdist.returncode == 0, sdist.stdout + sdist.stderr
    (archive,) = out.glob("linectl-*.tar.gz")
    # ... and the wheel from the sdist, so that what the sdist misses the wheel misses too.
    wheel = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(archive),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert wheel.returncode == 0, wheel.stdout + wheel.stderr


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    given = os.environ.get("CI_LINECTL_DIST")
    out = Path(given) if given else tmp_path_factory.mktemp("dist")
    if not given:
        _build(out, tmp_path_factory.mktemp("checkout") / "linectl")
    (sdist,) = out.glob(f"linectl-{__version__}.tar.gz")
    (wheel,) = out.glob(f"linectl-{__version__}-py3-none-any.whl")
    return Dist(sdist, wheel)


@pytest.fixture(scope="module")
def wheel_names(dist: Dist) -> set[str]:
    with zipfile.ZipFile(dist.wheel) as zf:
        return set(zf.namelist())


@pytest.fixture(scope="module")
def sdist_names(dist: Dist) -> set[str]:
    with tarfile.open(dist.sdist) as tf:
        prefix = f"linectl-{__version__}/"
        return {m.name.removeprefix(prefix) for m in tf.getmembers() if m.isfile()}


def _walk(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


def _source_files() -> set[str]:
    """Every file of the source tree's packages: as git sees them in a checkout, else
    all files there that are not local state."""
    listed = _git_files()
    if listed is None:
        listed = [p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in _walk(ROOT / pkg)]
    return {
        name
        for name in listed
        if name.split("/", 1)[0] in PACKAGES
        and (ROOT / name).is_file()
        and not (ROOT / name).is_symlink()
        and not any(junk in name for junk in JUNK)
    }


def _package_files(names: set[str]) -> set[str]:
    return {n for n in names if n.split("/", 1)[0] in PACKAGES}


def test_wheel_carries_every_file_of_the_packages_and_nothing_else(
    wheel_names: set[str],
) -> None:
    source = _source_files()
    shipped = _package_files(wheel_names)
    missing = sorted(source - shipped)
    extra = sorted(shipped - source)
    assert not missing, (
        f"in the source tree but not in the wheel: {missing}; a file the runtime reads is "
        "declared in [tool.setuptools.package-data] in pyproject.toml"
    )
    assert not extra, f"in the wheel but not in the source tree (a stale build?): {extra}"
    assert source >= REQUIRED
    assert any(n.startswith("linectl/web/static/") for n in source)


def test_wheel_has_nothing_of_tests_bench_or_local_state(wheel_names: set[str]) -> None:
    tops = {name.split("/", 1)[0] for name in wheel_names}
    assert tops == {"linectl", "simulators", f"linectl-{__version__}.dist-info"}
    for name in wheel_names:
        assert not any(junk in name for junk in JUNK), name
        assert "/tests/" not in name, name
        assert "/bench/" not in name, name


def test_wheel_carries_the_historians_sql(wheel_names: set[str]) -> None:
    sql = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "linectl").rglob("*.sql")
        if "historian" in p.relative_to(ROOT / "linectl").parts[:1]
    }
    assert sql <= wheel_names


def test_wheel_reference_configuration_is_the_source_trees(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as zf:
        for name in zf.namelist():
            if name.startswith("linectl/reference/"):
                assert zf.read(name) == (ROOT / name).read_bytes(), name


def test_wheel_metadata(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as zf:
        info = f"linectl-{__version__}.dist-info"
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = email.parser.Parser().parsestr(zf.read(f"{info}/METADATA").decode())
    assert "linectl = linectl.cli:main" in entry_points
    assert metadata["Version"] == __version__
    requires = metadata.get_all("Requires-Dist") or []
    assert any(r.startswith("pymodbus") for r in requires)
    assert any("matplotlib" in r and 'extra == "demo"' in r for r in requires)


def test_sdist_builds_the_wheel_and_leaves_tests_and_bench_out(
    sdist_names: set[str], wheel_names: set[str]
) -> None:
    assert {"pyproject.toml", "README.md", "PKG-INFO", "MANIFEST.in"} <= sdist_names
    assert _package_files(wheel_names) <= sdist_names
    assert "docs/deployment.md" in sdist_names
    for name in sdist_names:
        assert name.split("/", 1)[0] not in ("tests", "bench", "config", ".ci"), name
        assert not any(junk in name for junk in JUNK), name


def test_unpacked_wheel_runs_on_its_own_reference_configuration(dist: Dist, tmp_path: Path) -> None:
    # The wheel's code, away from the checkout (its dependencies are this environment's):
    # init copies the wheel's reference, not the checkout's config/.
    site = tmp_path / "site"
    with zipfile.ZipFile(dist.wheel) as zf:
        zf.extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINECTL_")}
    env["PYTHONPATH"] = str(site)

    def linectl(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-P", "-m", "linectl", *argv],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    where = linectl("init", "cfg")
    assert where.returncode == 0, where.stderr
    check = linectl("config", "check", "cfg")
    assert check.returncode == 0, check.stderr
    assert check.stdout.rstrip().endswith("ok")
    # The simulators too, on the wheel's reference (found next to the wheel's modules).
    sim = linectl("sim", "--duration", "0.2", "--acc-port", "0", "--cnv-port", "0")
    assert sim.returncode == 0, sim.stderr
    first = sim.stderr.splitlines()[0]
    assert f"({site / 'linectl' / 'reference'})" in first, first
    assert load_config(work / "cfg", environ={}).line.line_id == "line1"
    shutil.rmtree(site)
