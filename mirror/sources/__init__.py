"""Where a local miss is filled from: an ordered chain of sources behind one protocol.

::

    local cache miss
      -> S3 tier of the region        (mirror.sources.s3)
      -> ... peers, parent regions, imported bundles (same protocol)
      -> the upstream registry        (mirror.sources.upstream)

A :class:`~mirror.sources.chain.SourceChain` tries them in order: the first
source that has the content serves it; one that breaks off mid-blob hands the
rest to the next (resumed at the same offset); one whose bytes do not hash to
the digest is skipped for that digest (``mirror_source_fills_total{result=
"rejected"}``) and the next one is tried. Every byte from every source is
verified by the caller (the fill, or the manifest cache) before it is kept.
"""

from mirror.sources.base import ContentRef, Source
from mirror.sources.chain import ChainOpener, SourceChain
from mirror.sources.store import StoreSource
from mirror.sources.upstream import RegistryClient, UpstreamSource

__all__ = [
    "ChainOpener",
    "ContentRef",
    "RegistryClient",
    "Source",
    "SourceChain",
    "StoreSource",
    "UpstreamSource",
]
