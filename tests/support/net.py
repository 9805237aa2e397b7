"""Loopback networking helpers for tests: free ports and waiting for HTTP servers."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Collection

# A handler with no proxies: the test environment may set HTTP_PROXY on purpose
# (to a closed port) so that clients cannot reach the internet; our own polling
# of loopback servers must not go through it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Polling a test server over https asks "is it up", not "who is it": no verification.
_ANY_CERT = ssl.create_default_context()
_ANY_CERT.check_hostname = False
_ANY_CERT.verify_mode = ssl.CERT_NONE
_DIRECT_TLS = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=_ANY_CERT))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Returns:
        The port number. Nothing listens on it when this returns, so it also
        serves as a "closed port" that refuses connections.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """GET ``url`` directly (no proxy) and return the status, or None if unreachable.

    An https URL is polled without verifying the server's certificate.
    """
    opener = _DIRECT_TLS if url.startswith("https:") else _DIRECT
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the open response
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return None


def wait_http(url: str, timeout: float = 10.0, statuses: Collection[int] = (200,)) -> int:
    """Poll ``url`` until it answers with one of ``statuses``.

    Args:
        url: the URL to GET (loopback, never proxied).
        timeout: seconds to wait in total.
        statuses: acceptable HTTP status codes.

    Returns:
        The status that was seen.

    Raises:
        TimeoutError: if no acceptable answer came within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    last: int | None = None
    while True:
        last = http_status(url, timeout=1.0)
        if last is not None and last in statuses:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{url} did not answer {sorted(statuses)} in {timeout}s (last status: {last})"
            )
        time.sleep(0.05)
