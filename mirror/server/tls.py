"""The server's TLS context, and its certificate reloaded in place on SIGHUP.

The one :class:`ssl.SSLContext` given to the listening socket is kept for the
life of the process. A reload loads the new certificate chain and key into
that same context: every handshake after it presents the new certificate,
while connections already established keep theirs and are never dropped.

A pair that does not load (missing file, bad PEM, a key that does not match
the certificate) is tried in a scratch context first and rejected there, so a
bad reload leaves the running certificate untouched.
"""

from __future__ import annotations

import asyncio
import signal
import ssl

import structlog
from aiohttp import web

from mirror.config import TlsSettings
from mirror.config.checks import tls_context
from mirror.errors import ConfigError

log = structlog.get_logger(__name__)


class ServerTls:
    """The listening socket's TLS context and the files it was loaded from.

    Args:
        settings: the ``tls`` section (certificate and key paths).
        context: the context the listener uses, already loaded from them
            (:func:`mirror.config.checks.tls_context`).
    """

    def __init__(self, settings: TlsSettings, context: ssl.SSLContext) -> None:
        self.settings = settings
        self.context = context

    def reload(self) -> bool:
        """Load the certificate and key files again into the live context.

        Returns:
            True when the new pair is in use, False when it did not load (the
            old one stays; the reason is logged).
        """
        cert, key = self.settings.cert, self.settings.key
        try:
            tls_context(self.settings)  # a trial in a scratch context: a bad pair stops here
            self.context.load_cert_chain(cert, key)
        except (ConfigError, OSError, ssl.SSLError) as exc:
            log.error("tls_reload_failed", cert=str(cert), key=str(key),
                      error=str(exc) or type(exc).__name__,
                      hint="the previous certificate stays in use")
            return False
        log.info("tls_reloaded", cert=str(cert), key=str(key))
        return True


def reload_on_sighup(app: web.Application, tls: ServerTls | None) -> None:
    """Make SIGHUP reload the certificate (when serving TLS) once ``app`` runs.

    Without TLS, SIGHUP is logged and ignored rather than ending the process,
    so ``systemctl reload`` is always safe.
    """

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, _on_sighup, tls)

    async def uninstall(app: web.Application) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    app.on_startup.append(install)
    app.on_cleanup.append(uninstall)


def _on_sighup(tls: ServerTls | None) -> None:
    if tls is None:
        log.info("sighup_ignored", reason="no tls section: nothing to reload")
        return
    tls.reload()
