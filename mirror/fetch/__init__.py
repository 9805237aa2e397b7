"""Single-flight upstream fills with fan-out streaming and verification.

One :class:`Fill` per digest downloads a blob into a temp file, hashing as it
writes. Every request for that digest, the first and all later ones, reads the
growing temp file through its own file descriptor and sends bytes as soon as
they are on disk; nobody waits for the whole blob. Only a file whose size and
digest match is published (atomic rename). When the download fails, every
reader raises :class:`FillError` and aborts its connection, and the temp file
is removed.

The fill runs as a task owned by the :class:`Fetcher`, never by a request: a
client that disconnects does not cancel a download that others are reading.
A connection dropped mid-download is resumed with a ``Range`` request before
readers are failed.

Space is asked of a :class:`Space` (the evictor): a fill reserves its size when
the headers arrive; a verified blob is published only if it may be kept,
otherwise (larger than ``storage.max_size``, or no room left that eviction
could make) it is streamed to its readers and deleted after them. When a write
fails with ENOSPC, the fill asks for room and retries once; if the disk is
still full it turns into a relay: the bytes already on disk are read from the
temp file, the rest from a bounded window in memory that advances with the
slowest reader. The blob is verified as always and never published.

Which process of a node fills a digest is the fetcher's :class:`Coalescer`
(:mod:`mirror.fetch.coalesce`): this one (:class:`LocalCoalescer`), or the
holder of the digest's claim (:class:`mirror.fetch.claim.ClaimCoalescer`),
which the others follow. The manifest cache is built with the same one.
"""

from mirror.errors import DigestMismatch
from mirror.fetch.body import UpstreamOpener
from mirror.fetch.coalesce import Coalescer, LocalCoalescer
from mirror.fetch.fetcher import RESUME_ATTEMPTS, UNKEPT_GRACE, Fetcher
from mirror.fetch.fill import FileSpan, Fill, RangeOpener
from mirror.fetch.flight import SingleFlight
from mirror.fetch.space import Space, Unbounded
from mirror.storage.writer import DISK_FULL_ERRNOS

__all__ = [
    "DISK_FULL_ERRNOS",
    "RESUME_ATTEMPTS",
    "UNKEPT_GRACE",
    "Coalescer",
    "DigestMismatch",
    "Fetcher",
    "FileSpan",
    "Fill",
    "LocalCoalescer",
    "RangeOpener",
    "SingleFlight",
    "Space",
    "Unbounded",
    "UpstreamOpener",
]
