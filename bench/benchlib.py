"""What the benchmarks share: percentiles as they report them, and the host facts
that end every result."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import time
from pathlib import Path


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs; NaN when empty."""
    a = sorted(xs)
    if not a:
        return math.nan
    return a[min(len(a) - 1, max(0, math.ceil(q / 100.0 * len(a)) - 1))]


def host_facts(load_start: object, t0: float) -> dict[str, object]:
    """The load average at the start (as measured then) and now, the CPUs, and the run's
    wall time from `t0` (time.monotonic()): what every benchmark's result ends with."""
    return {
        "load_avg_start": load_start,
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "took_s": round(time.monotonic() - t0, 1),
    }


def code_version(root: Path | None = None) -> dict[str, object]:
    """Which code a run measured: the git commit, the tracked files modified in the working
    tree, and a digest of linectl/ and simulators/ as they were read (the tree may be
    mid-edit: two runs with the same digest ran the same code)."""
    root = root or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip()

    h = hashlib.sha256()
    for pkg in ("linectl", "simulators"):
        for p in sorted((root / pkg).rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    modified = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "modified_tracked_files": len(modified),
        "code_sha256": h.hexdigest()[:16],
    }


def host_cpu_s() -> float | None:
    """CPU seconds the whole host has been busy (all cores, /proc/stat); None without it."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
