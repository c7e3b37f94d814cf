"""Which records of each line store the historian holds, and what it must ask for.

Pure and synchronous (time is an argument): the historian service feeds it what it
stored and what the lines announce, and asks it which ranges to request again.

A line's store numbers its records 1, 2, 3, ... with no gaps (SQLite AUTOINCREMENT in
one transaction with the record: a rolled-back write takes its number back). So the
historian holds "everything up to `confirmed`" plus a set of numbers above it; any
number between `confirmed` and the highest number it knows of (a record it holds, or the
line's announced head) that it does not hold is a gap to ask for again.

A store restored from a backup numbers again from where the backup ended: the same
numbers with other content. The tracker detects it (the head went below what the
historian confirmed, or a number came again with other content) and the service then
starts a new epoch for that store (docs/historian.md, "A restored line store").
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Final

REPLAY_MAX_ROWS: Final = 1000
"""The most records one replay request asks for (the line caps it at 100,000): a broker
drops QoS 1 messages beyond its queue for a subscriber (Mosquitto's max_queued_messages,
1000 by default), so a request stays within what it queues; the next follows the answer."""

GAP_GRACE_S: Final = 1.0
"""How long a gap may stand before it is asked for: records of one line come on several
topics, and a broker may deliver them out of order across topics."""

REPLAY_TIMEOUT_S: Final = 15.0
"""A replay request unanswered for this long is sent again."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Records `first_seq`..`last_seq` (inclusive) not held."""

    first_seq: int
    last_seq: int

    @property
    def count(self) -> int:
        return self.last_seq - self.first_seq + 1


@dataclass
class StoreTracker:
    """The sequence numbers held of one line store (one epoch of it)."""

    line_id: str
    store_id: str
    key: str
    """The store's key in the historian's tables: `store_id`, or `store_id#rN` for the
    Nth epoch after a restore was detected."""
    confirmed: int = 0
    """Every record 1..confirmed is held (or was explained as never to come)."""
    above: list[int] = field(default_factory=list)
    """Held numbers above `confirmed`, ascending."""
    head: int = 0
    """The newest number the line announced (records/head), 0 when none yet."""
    gap_seen_s: float | None = None
    """When the current lowest gap was first seen (None: no gap)."""
    requested: tuple[Gap, float] | None = None
    """The replay request in flight and when it was sent."""
    went_back_reported: int | None = None
    """The head below `confirmed` last reported (reported once, not on every head)."""

    @property
    def newest(self) -> int:
        """The highest number known to exist: held or announced."""
        return max(self.confirmed, self.above[-1] if self.above else 0, self.head)

    def holds(self, seq: int) -> bool:
        """Whether record `seq` is held."""
        if seq <= self.confirmed:
            return True
        i = bisect.bisect_left(self.above, seq)
        return i < len(self.above) and self.above[i] == seq

    def add(self, seqs: list[int]) -> bool:
        """Record that `seqs` are now held; True when `confirmed` moved."""
        before = self.confirmed
        for seq in seqs:
            if seq > self.confirmed and not self.holds(seq):
                bisect.insort(self.above, seq)
        self._advance()
        return self.confirmed != before

    def explain(self, gap: Gap) -> bool:
        """Numbers the line no longer holds (pruned before the historian had them) are
        recorded as an incident by the caller and then treated as held, so that they
        do not stand as a gap forever; True when `confirmed` moved."""
        before = self.confirmed
        if gap.first_seq <= self.confirmed + 1 <= gap.last_seq + 1:
            self.confirmed = max(self.confirmed, gap.last_seq)
        else:
            for seq in range(max(gap.first_seq, self.confirmed + 1), gap.last_seq + 1):
                if not self.holds(seq):
                    bisect.insort(self.above, seq)
        self._advance()
        return self.confirmed != before

    def _advance(self) -> None:
        while self.above and self.above[0] <= self.confirmed + 1:
            self.confirmed = max(self.confirmed, self.above.pop(0))
        if self.requested is not None and self.requested[0].last_seq <= self.confirmed:
            self.requested = None

    def gap(self) -> Gap | None:
        """The lowest missing range (at most REPLAY_MAX_ROWS long), or None."""
        if self.newest <= self.confirmed:
            return None
        first = self.confirmed + 1
        last = (self.above[0] - 1) if self.above else self.newest
        return Gap(first, min(last, first + REPLAY_MAX_ROWS - 1))

    def due_request(self, now_s: float) -> Gap | None:
        """The range to ask the line for now, or None (no gap, a gap younger than the
        grace time, or a request for it in flight and not yet timed out)."""
        gap = self.gap()
        if gap is None:
            self.gap_seen_s = None
            return None
        if self.gap_seen_s is None:
            self.gap_seen_s = now_s
        if now_s - self.gap_seen_s < GAP_GRACE_S:
            return None
        if self.requested is not None:
            asked, at_s = self.requested
            if asked.first_seq <= gap.first_seq <= asked.last_seq and (
                now_s - at_s < REPLAY_TIMEOUT_S
            ):
                return None
        self.requested = (gap, now_s)
        return gap

    def answered(self) -> None:
        """The line said it has sent what it holds of the request."""
        self.requested = None

    def went_back(self, head_seq: int) -> bool:
        """Whether an announced head below what is held says the store went back."""
        return head_seq < self.confirmed


def epoch_key(store_id: str, epoch: int) -> str:
    """The historian's key of a store's `epoch` (0: the store id itself)."""
    return store_id if epoch == 0 else f"{store_id}#r{epoch}"


def split_key(key: str) -> tuple[str, int]:
    """(store id, epoch) of a key made by `epoch_key`."""
    store_id, sep, tail = key.rpartition("#r")
    if sep and tail.isdigit():
        return store_id, int(tail)
    return key, 0
