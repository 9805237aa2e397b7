"""Talking to upstream registries: authentication, redirects, retries."""

from mirror.upstream.client import UpstreamClient

__all__ = ["UpstreamClient"]
