"""Quality of a sampled value, as every reading carries it."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Quality(enum.Enum):
    """Whether a value can be trusted now."""

    GOOD = "good"
    STALE = "stale"  # the last poll failed; the last good value, younger than stale_after_s
    COMM_FAIL = "comm_fail"  # no value: the PLC did not answer


@dataclass(frozen=True, slots=True)
class Sample:
    """One decoded field value from one poll.

    `plc_clock_ms` is the PLC's own clock register read in the same request block when
    the map has one (None otherwise); `host_time_s` is the controller's monotonic time
    at which the response arrived.
    """

    value: float | int | None
    quality: Quality
    plc_clock_ms: int | None
    host_time_s: float
