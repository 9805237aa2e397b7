"""Which hosts are the registry itself, and which answers must come from them.

A blob, or a manifest by digest, is verified by its digest wherever it comes
from, so a redirect to a CDN is fine. A tag list, a referrers index or a
manifest by tag cannot be verified: after a redirect it is taken only from the
registry's own hosts (its URL, its aliases, the hosts its preset knows, and
``redirect_hosts`` from the config), never over http when the registry is https.
"""

from __future__ import annotations

from yarl import URL

from mirror.config import UpstreamSettings, presets
from mirror.oci import is_digest_reference


def confined(suffix: str) -> bool:
    """Whether the redirects of a request for ``suffix`` must stay on the registry's hosts."""
    if suffix.startswith("blobs/"):
        return False
    if suffix.startswith("manifests/"):
        return not is_digest_reference(suffix[len("manifests/"):])
    return True


class OwnHosts:
    """The hosts of one upstream registry (``url in hosts``)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        preset = presets.BY_KEY.get(settings.preset)
        names = {settings.host.lower(), *(a.lower() for a in settings.aliases),
                 *settings.redirect_hosts}
        if preset is not None:
            names.update(n.lower() for n in preset.names)
        self._names = frozenset(names)
        self._pattern = preset.redirect_hosts if preset is not None else None
        self._https = settings.url.scheme == "https"

    def __contains__(self, url: object) -> bool:
        if not isinstance(url, URL) or (url.scheme == "http" and self._https):
            return False
        host = (url.host or "").lower()
        port = "" if url.is_default_port() else f":{url.port}"
        return f"{host}{port}" in self._names or (
            self._pattern is not None and not port and self._pattern.fullmatch(host) is not None)
