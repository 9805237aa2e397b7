"""What upstream's small answers must look like before a client gets them.

A tag list or a referrers index cannot be verified by digest: the least the
mirror can do is refuse what is not one (an HTML login page, a captive portal,
another API's JSON) rather than pass it on as if it were. Manifests are checked
by :func:`mirror.oci.manifest_media_type`.
"""

from __future__ import annotations

import json
from typing import Any

from mirror.errors import UpstreamUnavailable
from mirror.oci import OCI_INDEX


def tag_list(body: bytes) -> dict[str, Any]:
    """The parsed tag list: ``{"name": str, "tags": [str, ...] | null}``.

    Raises:
        UpstreamUnavailable: (502) anything else.
    """
    document = _json_object(body, "tag list")
    tags = document.get("tags")
    if not isinstance(document.get("name"), str) or not (
            tags is None or (isinstance(tags, list) and all(isinstance(t, str) for t in tags))):
        raise UpstreamUnavailable("upstream sent a tag list without a name and a list of tags",
                                  status=502)
    return document


def referrers_index(body: bytes) -> dict[str, Any]:
    """The parsed referrers answer: an OCI image index.

    Raises:
        UpstreamUnavailable: (502) anything else.
    """
    document = _json_object(body, "referrers index")
    media_type = document.get("mediaType", OCI_INDEX)
    if media_type != OCI_INDEX or document.get("schemaVersion") != 2 \
            or not isinstance(document.get("manifests"), list) \
            or not all(isinstance(m, dict) for m in document["manifests"]):
        raise UpstreamUnavailable("upstream sent a referrers answer that is not an image index",
                                  status=502)
    return document


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        raise UpstreamUnavailable(f"upstream sent a {what} that is not JSON", status=502) from None
    if not isinstance(document, dict):
        raise UpstreamUnavailable(f"upstream sent a {what} that is not a JSON object",
                                  status=502)
    return document
