"""JSON from a bundle, parsed only when its shape cannot exhaust the importing host.

``json.loads`` recurses once per level of nesting (200,000 levels: a ``RecursionError``)
and builds one Python object per value (8 MiB of ``{},`` is 2.8 million dicts, about
300 MB). Before parsing, the text is checked in C-speed passes: strings blanked out,
then the nesting depth and the number of containers and values counted.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mirror.errors import BundleError

#: OCI documents and bundle.json nest 4 to 6 levels deep.
MAX_DEPTH = 32
#: Values (objects, arrays, and everything after a comma) in one document.
MAX_ITEMS = 250_000

_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def loads(data: bytes, what: str, *, max_depth: int = MAX_DEPTH,
          max_items: int = MAX_ITEMS) -> Any:
    """Parse ``data`` after checking its depth and size in values.

    Raises:
        BundleError: not JSON, nested deeper than ``max_depth``, or more than
            ``max_items`` values.
    """
    bare = _outside_strings(data)
    items = bare.count(b",") + bare.count(b"[") + bare.count(b"{")
    if items > max_items:
        raise BundleError(f"{what} holds more than {max_items} JSON values (refused)")
    brackets = bare.translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            break
        shorter = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) == len(brackets):
            raise BundleError(f"{what} is not JSON (its brackets do not match)")
        brackets = shorter
    if brackets:
        raise BundleError(f"{what} nests JSON deeper than {max_depth} levels (refused)")
    del bare, brackets
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BundleError(f"{what} is not JSON") from None


def _outside_strings(data: bytes) -> bytes:
    """``data`` without its strings (``re.sub`` would hold a list of every piece)."""
    # Escaped backslashes, then escaped quotes, go first: every quote left delimits a
    # string, and one linear pass finds them (an escape-aware pattern backtracks).
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    view = memoryview(text)
    bare = bytearray()
    last = 0
    for match in _STRING.finditer(text):
        bare += view[last:match.start()]
        last = match.end()
    bare += view[last:]
    view.release()
    return bytes(bare)
