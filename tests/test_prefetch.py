"""The actor's decode prefetch: order kept, errors surface in the consumer, an abandoned chunk frees its decoder."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import closing

import pytest

from dcfm.segment.actor import prefetch


class _Source:
    """A generator-backed source that records how far it was read and whether it was closed."""

    def __init__(self, count: int, fail_at: int | None = None) -> None:
        self.count, self.fail_at = count, fail_at
        self.produced = 0
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[int]:
        try:
            for i in range(self.count):
                if i == self.fail_at:
                    raise OSError(f"corrupt packet at frame {i}")
                self.produced += 1
                yield i
        finally:
            self.closed.set()


def test_yields_everything_in_order_and_closes_the_source() -> None:
    source = _Source(50)
    assert list(prefetch(source, depth=3)) == list(range(50))
    assert source.closed.is_set()


def test_decoder_errors_reach_the_consumer_after_the_good_items() -> None:
    source = _Source(10, fail_at=4)
    seen: list[int] = []
    with pytest.raises(OSError, match="frame 4"):
        for item in prefetch(source, depth=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3]


def test_abandoning_early_stops_the_producer_and_closes_the_source() -> None:
    """A chunk that fails in the model must not leave a decode thread running or a container open."""
    source = _Source(10_000)
    with closing(prefetch(source, depth=4)) as buffered:
        assert next(buffered) == 0
    assert source.closed.wait(timeout=5)
    assert source.produced <= 1 + 4 + 2  # consumed + queue depth + one in hand on each side
    assert not any(t.name == "dcfm-decode" and t.is_alive() for t in threading.enumerate())
