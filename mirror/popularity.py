"""How often each image is pulled, for the status page.

:class:`Popularity` is the interface the pull path records into and the
status page reads; :class:`TopCounter` keeps it in memory, bounded (the
"space saving" scheme: when full, the least pulled name gives its place and
its count to the new one, so heavy hitters are never lost). A persisted
store can take its place behind the same interface: the node uses
:class:`mirror.sync.popularity.Popularity` (decaying counts, per platform too,
saved under the storage folder), which the sync loop reads as well.
"""

from __future__ import annotations

from typing import Protocol


class Popularity(Protocol):
    """Counts pulls of images named ``registry/repository:tag``."""

    def record(self, image: str) -> None:
        """Count one pull of ``image``."""

    def top(self, count: int) -> list[tuple[str, int]]:
        """The ``count`` most pulled images, most pulled first."""


class TopCounter:
    """A bounded in-memory :class:`Popularity`.

    Args:
        capacity: how many names are tracked at most.
    """

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self._counts: dict[str, int] = {}

    def record(self, image: str) -> None:
        """Count one pull of ``image``."""
        if image in self._counts or len(self._counts) < self.capacity:
            self._counts[image] = self._counts.get(image, 0) + 1
            return
        smallest = min(self._counts, key=self._counts.__getitem__)
        self._counts[image] = self._counts.pop(smallest) + 1

    def top(self, count: int) -> list[tuple[str, int]]:
        """The ``count`` most pulled images, most pulled first."""
        ranked = sorted(self._counts.items(), key=lambda item: (-item[1], item[0]))
        return ranked[:count]
