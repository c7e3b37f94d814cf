"""The historian's record-number bookkeeping (linectl.historian.tracker): pure, no I/O."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from linectl.historian.tracker import (
    GAP_GRACE_S,
    REPLAY_MAX_ROWS,
    REPLAY_TIMEOUT_S,
    Gap,
    StoreTracker,
    epoch_key,
    split_key,
)


def tracker(**kw: object) -> StoreTracker:
    return StoreTracker("line-1", "S", "S", **kw)  # type: ignore[arg-type]


def test_in_order_records_confirm_as_they_come() -> None:
    t = tracker()
    assert t.add([1, 2, 3])
    assert t.confirmed == 3
    assert t.above == []
    assert not t.add([2, 3])  # a redelivery moves nothing
    assert t.gap() is None


def test_a_hole_holds_confirmation_back_until_filled() -> None:
    t = tracker()
    t.add([1, 2, 5, 6])
    assert t.confirmed == 2
    assert t.gap() == Gap(3, 4)
    assert t.add([4, 3])
    assert t.confirmed == 6
    assert t.above == []


def test_a_trailing_loss_is_seen_only_through_the_head() -> None:
    t = tracker()
    t.add([1, 2])
    assert t.gap() is None
    t.head = 4
    assert t.gap() == Gap(3, 4)


def test_gap_is_asked_for_after_the_grace_time_and_again_after_the_timeout() -> None:
    t = tracker(head=10)
    t.add([1, 2])
    assert t.due_request(100.0) is None  # just seen: records may still be on their way
    assert t.due_request(100.0 + GAP_GRACE_S / 2) is None
    assert t.due_request(100.0 + GAP_GRACE_S) == Gap(3, 10)
    # In flight: not asked twice.
    assert t.due_request(100.0 + GAP_GRACE_S + 1.0) is None
    # Unanswered past the timeout: asked again.
    assert t.due_request(100.0 + GAP_GRACE_S + REPLAY_TIMEOUT_S) == Gap(3, 10)
    t.add(list(range(3, 11)))
    assert t.due_request(200.0) is None
    assert t.requested is None


def test_an_answer_lets_the_next_gap_be_asked_at_once() -> None:
    t = tracker(head=10)
    t.add([1])
    t.due_request(0.0)
    assert t.due_request(GAP_GRACE_S) == Gap(2, 10)
    t.add([2, 3, 4])  # part came; the line says it sent what it holds
    t.answered()
    assert t.due_request(GAP_GRACE_S + 0.1) == Gap(5, 10)


def test_a_request_asks_for_at_most_the_replay_limit() -> None:
    t = tracker(head=REPLAY_MAX_ROWS * 3)
    gap = t.gap()
    assert gap == Gap(1, REPLAY_MAX_ROWS)


def test_records_the_line_no_longer_holds_are_explained_not_waited_for() -> None:
    t = tracker(head=20)
    t.add([1, 2, 9, 10])
    assert t.explain(Gap(3, 8))
    assert t.confirmed == 10
    # A missing range above a hole is remembered as held; the hole stays a gap.
    t2 = tracker(head=20)
    t2.add([1])
    assert not t2.explain(Gap(5, 6))
    assert t2.gap() == Gap(2, 4)
    t2.add([2, 3, 4])
    assert t2.confirmed == 6


def test_a_head_below_what_is_held_says_the_store_went_back() -> None:
    t = tracker()
    t.add(list(range(1, 101)))
    assert not t.went_back(100)
    assert not t.went_back(150)
    assert t.went_back(60)


def test_epoch_keys_round_trip() -> None:
    assert epoch_key("abc", 0) == "abc"
    assert split_key(epoch_key("abc", 0)) == ("abc", 0)
    assert split_key(epoch_key("abc", 3)) == ("abc", 3)
    assert split_key("a#rb") == ("a#rb", 0)


@given(st.permutations(list(range(1, 60))), st.integers(min_value=1, max_value=59))
def test_any_arrival_order_confirms_exactly_the_unbroken_run(order: list[int], cut: int) -> None:
    t = tracker()
    arrived = order[:cut]
    t.add(arrived)
    expected = 0
    held = set(arrived)
    while expected + 1 in held:
        expected += 1
    assert t.confirmed == expected
    assert all(t.holds(s) for s in arrived)
    assert not any(t.holds(s) for s in set(range(1, 60)) - held)
