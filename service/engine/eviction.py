"""The device tier's eviction order: a segmented LRU (Karedla, Love, Wherry, 1994).

Under Zipf traffic a plain LRU lets every domain requested once push a frequently used one out: at
512 slots over 10,000 domains it keeps 0.59 of requests on the device where the best any cache of
that size can do is 0.70 (the 512 most requested). A segmented LRU keeps a domain that has served
a second request in a protected segment (most of the slots); newly loaded domains wait in
probation, and evictions take probation's least recent first, so one-off requests cycle through
probation instead of through the hot set. `python -m bench.eviction` replays Zipf traffic through
both orders and prints their hit rates beside the ideal's.

Runs in the engine process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

PROTECTED_SHARE = 0.8  # of the device tier's slots


class SegmentedLru:
    """Keys (domains) in eviction order; the owner decides what is evicted (leases, pins)."""

    def __init__(self, protected_share: float = PROTECTED_SHARE):
        self.protected_share = protected_share
        self._probation: collections.OrderedDict[str, None] = collections.OrderedDict()  # oldest first
        self._protected: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def __contains__(self, key: str) -> bool:
        return key in self._probation or key in self._protected

    def __iter__(self) -> Iterator[str]:
        """Eviction order: probation's least recent first, then the protected segment's (take what you
        need and stop: no change may come between two steps)."""
        yield from self._probation
        yield from self._protected

    def add(self, key: str) -> None:
        """A newly loaded key: the most recent in probation."""
        self.discard(key)
        self._probation[key] = None

    def touch(self, key: str) -> None:
        """Used again without earning protection: the most recent of its segment."""
        for segment in (self._protected, self._probation):
            if key in segment:
                segment.move_to_end(key)
                return

    def promote(self, key: str, capacity: int) -> None:
        """Served again: the most recent of the protected segment, which keeps `protected_share` of
        `capacity` slots (its least recent goes back to probation, as probation's most recent)."""
        if key not in self:
            return
        self._probation.pop(key, None)
        self._protected[key] = None
        self._protected.move_to_end(key)
        while len(self._protected) > max(1, int(capacity * self.protected_share)):
            demoted, _ = self._protected.popitem(last=False)
            self._probation[demoted] = None

    def discard(self, key: str) -> None:
        self._probation.pop(key, None)
        self._protected.pop(key, None)
