"""What the benchmarks share: percentiles as they report them."""

from __future__ import annotations

import hashlib
import math
import subprocess
from pathlib import Path


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs; NaN when empty."""
    a = sorted(xs)
    if not a:
        return math.nan
    return a[min(len(a) - 1, max(0, math.ceil(q / 100.0 * len(a)) - 1))]


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
