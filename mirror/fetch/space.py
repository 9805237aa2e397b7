"""The byte budget a fill asks for room (implemented by mirror.cache.eviction)."""

from __future__ import annotations

from typing import Protocol


class Space(Protocol):
    """What fills ask of the cache's byte budget (see mirror.cache.eviction)."""

    def fits(self, size: int) -> bool: ...

    async def reserve(self, size: int) -> bool:
        """Reserve room for a download; ``False``: no room (reservation given back)."""
        ...

    def release(self, size: int) -> None: ...

    async def admit(self, size: int, held: int = 0) -> bool:
        """Whether a verified blob may be kept; ``held`` bytes of it are still reserved."""
        ...

    async def make_room(self, size: int) -> int: ...


class Unbounded:
    """No byte budget: everything fits, nothing is evicted."""

    def fits(self, size: int) -> bool:
        return True

    async def reserve(self, size: int) -> bool:
        return True

    def release(self, size: int) -> None:
        return None

    async def admit(self, size: int, held: int = 0) -> bool:
        return True

    async def make_room(self, size: int) -> int:
        return 0
