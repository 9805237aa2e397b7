"""Content put straight into a filesystem store, for tests below the server."""

from __future__ import annotations

import hashlib
import os

from mirror.oci import Digest
from mirror.storage.filesystem import FilesystemStore


def put_blob(store: FilesystemStore, data: bytes) -> Digest:
    """Store a blob the way a fill does: temp file, then publish."""
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    fd, temp = store.new_temp()
    os.write(fd, data)
    os.close(fd)
    store.publish_blob(temp, digest)
    return digest
