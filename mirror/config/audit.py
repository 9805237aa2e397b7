"""The ``audit`` section: where the audit trail is written.

::

    audit:
      file: /var/log/mirror/audit.jsonl   # or "-": standard output
      max_size: 100MiB                    # rotated to <file>.1 beyond (the chain goes on)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.config.values import _mapping, _only_keys, _string, parse_size
from mirror.errors import ConfigError

DEFAULT_MAX_SIZE = 100 * 2**20


@dataclass(frozen=True)
class AuditSettings:
    """``audit``: the file (``None``: standard output) and its size before rotation."""

    file: Path | None
    max_size: int = DEFAULT_MAX_SIZE


def _audit(value: Any, base: Path) -> AuditSettings:
    item = _mapping(value, "audit")
    _only_keys(item, "audit", {"file", "max_size"})
    if "file" not in item:
        raise ConfigError("audit.file", 'required: a file path, or "-" for standard output')
    text = _string(item["file"], "audit.file")
    if not text:
        raise ConfigError("audit.file", 'expected a file path, or "-" for standard output')
    path = None if text == "-" else (base / text if not Path(text).is_absolute()
                                     else Path(text))
    if path is not None and not path.parent.is_dir():
        raise ConfigError("audit.file", f"{path.parent} is not a folder")
    max_size = parse_size(item["max_size"], "audit.max_size") if "max_size" in item \
        else DEFAULT_MAX_SIZE
    if max_size < 4096:
        raise ConfigError("audit.max_size", "expected at least 4KiB")
    return AuditSettings(path, max_size)
