"""What the benchmarks share: percentiles as they report them."""

from __future__ import annotations

import math


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs; NaN when empty."""
    a = sorted(xs)
    if not a:
        return math.nan
    return a[min(len(a) - 1, max(0, math.ceil(q / 100.0 * len(a)) - 1))]
