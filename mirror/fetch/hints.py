"""Blob sizes learned from manifests: hints, never the truth.

A hint lets a fill announce a length (and stream) when upstream sends none.
It is only advisory: any manifest, in any repository of any upstream, may
declare any size for any digest, and sizes are kept by digest alone. So
upstream's own ``Content-Length`` wins over a hint, the bytes are judged by
their digest only, and a hint that a body contradicted is dropped, so that a
wrong manifest can never make a correct blob unfetchable.
"""

from __future__ import annotations

from cachetools import LRUCache

from mirror.oci import Digest


class SizeHints:
    """Sizes by digest, bounded, last writer wins (they are checked against the bytes)."""

    def __init__(self, maxsize: int = 200_000) -> None:
        self._sizes: LRUCache[Digest, int] = LRUCache(maxsize=maxsize)

    def __setitem__(self, digest: Digest, size: int) -> None:
        self._sizes[digest] = size

    def get(self, digest: Digest) -> int | None:
        """The size a manifest declared for ``digest``, if any."""
        return self._sizes.get(digest)

    def drop(self, digest: Digest, size: int | None) -> None:
        """Forget the hint ``size`` of ``digest`` (not a newer one learned since)."""
        if size is not None and self._sizes.get(digest) == size:
            del self._sizes[digest]
