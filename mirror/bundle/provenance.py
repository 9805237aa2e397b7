"""Which signed bundle set each tag, per signer: what rollback protection compares against.

``<storage>/imports.json``, written only by ``mirror import`` under its lock (temp file +
rename)::

    {"version": 1,
     "tags": {"docker.io/library/nginx:1.27": {
         "sha256:<key id>": {"created": "2026-11-29T20:00:00Z", "sequence": 3,
                             "bundle": "<uuid>", "digest": "sha256:..."}}}}

A bundle signed by a key is older than what a tag holds when that key's last bundle for the
tag was created later (or at the same time with a higher sequence): the import then
leaves the tag alone unless asked to roll it back. ``mirror export`` writes ``created``
to the microsecond, so two bundles made one after the other are told apart.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_NAME = "imports.json"


@dataclass(frozen=True)
class Stamp:
    """When a signed bundle was made, as its bundle.json says."""

    created: str
    sequence: int
    bundle: str

    def order(self) -> tuple[float, int]:
        """Comparable: the creation time (an unreadable one counts as oldest), then the
        sequence."""
        try:
            when = datetime.datetime.fromisoformat(self.created.replace("Z", "+00:00"))
            seconds = when.timestamp() if when.tzinfo is not None else 0.0
        except ValueError:
            seconds = 0.0
        return seconds, self.sequence


class Provenance:
    """The stamps of the signed bundles that set each tag, per signer."""

    def __init__(self, root: Path) -> None:
        self._path = root / FILE_NAME
        self._tags: dict[str, dict[str, dict[str, Any]]] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            document = json.loads(self._path.read_text())
            if isinstance(document, dict) and isinstance(document.get("tags"), dict):
                self._tags = document["tags"]

    def newer(self, tag: str, key_id: str, stamp: Stamp) -> Stamp | None:
        """The stamp this signer's last bundle for ``tag`` had, when newer than ``stamp``."""
        held = self._tags.get(tag, {}).get(key_id)
        if not isinstance(held, dict):
            return None
        try:
            before = Stamp(str(held["created"]), int(held["sequence"]), str(held["bundle"]))
        except (KeyError, TypeError, ValueError):
            return None
        return before if before.order() > stamp.order() else None

    def record(self, tag: str, key_id: str, stamp: Stamp, digest: str) -> None:
        """``tag`` now points where this signer's bundle said."""
        self._tags.setdefault(tag, {})[key_id] = {
            "created": stamp.created, "sequence": stamp.sequence, "bundle": stamp.bundle,
            "digest": digest}

    def save(self) -> None:
        """Write the file whole, or not at all."""
        fd, name = tempfile.mkstemp(dir=self._path.parent, prefix=".imports-")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump({"version": 1, "tags": self._tags}, file, indent=1, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.replace(name, self._path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise
