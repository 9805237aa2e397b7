"""A Docker-Hub-like bearer token server for Distribution's ``auth: token``.

It runs in a background thread (not on the test's event loop) because tests
block in subprocesses such as skopeo while Distribution's clients ask it for
tokens.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server received.

    ``user`` is the Basic-auth user name if credentials were sent and valid
    syntax, else None; ``authorized`` says whether any Authorization header came.
    """

    path: str
    query: dict[str, list[str]]
    authorized: bool
    user: str | None
    status: int

    @property
    def scopes(self) -> list[str]:
        """The ``scope`` query parameters, in order."""
        return self.query.get("scope", [])


def _parse_scope(scope: str) -> dict[str, object] | None:
    # "repository:name/with/slashes:pull,push" -- the name may hold a port colon
    # in other registries, so split the type off the left and actions off the right.
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


def _basic_user(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except ValueError:
        return None
    return user, password


class TokenServer:
    """Issues RS256 JWTs that Distribution 2.8 accepts (``x5c`` + ``rootcertbundle``).

    Every scope asked for is granted. With ``require_basic=(user, password)``
    a request without those Basic credentials gets 401, so a test can check
    that a client sends them.

    Args:
        workdir: folder for the certificate PEM.
        service: the ``service`` (and JWT ``aud``) Distribution is configured with.
        issuer: the JWT ``iss``.
        expires_in: token lifetime in seconds, also returned as ``expires_in``.
        require_basic: credentials every token request must carry, or None.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        service: str = "registry.test",
        issuer: str = "test-token-issuer",
        expires_in: int = 300,
        require_basic: tuple[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.require_basic = require_basic
        self.cert_path = workdir / "token-cert.pem"
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._cert = self._self_signed_cert()
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()

    def _self_signed_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def port(self) -> int:
        """The listening port (after ``start``)."""
        assert self._server is not None, "token server not started"
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        """The token endpoint URL, for Distribution's ``auth.token.realm``."""
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def token_requests(self) -> list[TokenRequest]:
        """A snapshot of every request received so far."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def mint(self, scopes: list[str], subject: str = "") -> str:
        """Sign a token granting ``scopes`` (used directly by seeding code).

        Args:
            scopes: scope strings like ``"repository:std/app:pull,push"``.
            subject: the JWT ``sub``.

        Returns:
            The encoded JWT.
        """
        now = int(time.time())
        access = [a for a in (_parse_scope(s) for s in scopes) if a is not None]
        claims = {
            "iss": self.issuer,
            "aud": self.service,
            "sub": subject,
            "iat": now,
            "nbf": now - 10,
            "exp": now + self.expires_in,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": [self._x5c]})

    def start(self) -> None:
        """Write the certificate and serve on 127.0.0.1:<free port> in a thread."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _answer(
        self, path: str, query: dict[str, list[str]], auth: str | None
    ) -> tuple[int, dict[str, object]]:
        creds = _basic_user(auth)
        user = creds[0] if creds else None
        status, body = 200, dict[str, object]()
        if urlsplit(path).path != "/token":
            status, body = 404, {"details": "not found"}
        elif self.require_basic is not None and creds != self.require_basic:
            status, body = 401, {"details": "bad or missing credentials"}
        else:
            token = self.mint(query.get("scope", []), subject=user or "")
            body = {
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        with self._lock:
            self._requests.append(
                TokenRequest(urlsplit(path).path, query, auth is not None, user, status)
            )
        return status, body

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                status, body = server._answer(self.path, query, self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="token"')
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # requests are recorded in token_requests instead

        return Handler
