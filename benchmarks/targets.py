"""The servers the benchmark compares, each started fresh on a free loopback port.

::

    clients ──► mirror          (python -m mirror serve)        ─┐
            ──► distribution    (docker-registry, proxy mode)    ├─► [throttle] ─► upstream
            ──► nginx           (proxy_cache keyed on digest)   ─┘                 (Distribution
            ──► nginx-sendfile  (the cached blob files, no upstream)                + token auth)
            ──► upstream        (directly, no cache)

The upstream is a real Distribution with Docker-Hub-like bearer tokens. The
mirror and Distribution's proxy log in with a username and password. nginx
cannot log in to a token service, so it passes the client's ``Authorization``
through: the upstream's 401 and its ``WWW-Authenticate`` reach the client,
which fetches a token from the token server and retries; cached content is
then served to anyone (that is what a caching nginx in front of a registry
does). nginx runs one worker process, like the mirror.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port, wait_http
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

UPSTREAM_NAME = "registry.bench"
USER, PASSWORD = "bench", "bench-password"
MIRROR, DISTRIBUTION, NGINX, SENDFILE, UPSTREAM = (
    "mirror", "distribution", "nginx", "nginx-sendfile", "upstream")
#: The same with two worker processes, and the bare aiohttp handler (hot scenarios).
MIRROR2, SENDFILE2, BARE = "mirror-2w", "nginx-sendfile-2w", "bare-aiohttp"
#: The mirror of another source tree (``--baseline-src``): before and after in one run.
BASELINE = "mirror-base"
ALL_TARGETS = (MIRROR, DISTRIBUTION, NGINX, SENDFILE, UPSTREAM, MIRROR2, SENDFILE2, BARE,
               BASELINE)
#: Targets that serve the hot bytes from files or memory of their own (no upstream).
LOCAL_TARGETS = (SENDFILE, SENDFILE2, BARE)


class Upstream:
    """The token server and the upstream Distribution, for the whole run."""

    def __init__(self, workdir: Path) -> None:
        self.tokens = TokenServer(workdir / "token")
        self.registry: Registry | None = None
        self.workdir = workdir

    def start(self) -> None:
        """Start the token server, then the registry that trusts it."""
        self.tokens.start()
        self.registry = Registry(self.workdir / "upstream", token=self.tokens)
        self.registry.start()

    def stop(self) -> None:
        """Stop both."""
        if self.registry is not None:
            self.registry.stop()
        self.tokens.stop()

    @property
    def reg(self) -> Registry:
        """The running registry."""
        assert self.registry is not None, "upstream not started"
        return self.registry

    def bearer(self, repo: str) -> dict[str, str]:
        """An ``Authorization`` header for pulling ``repo`` (for wrk and curl)."""
        return self.reg.auth_header(repo, "pull")


class Target:
    """A server under test. Subclasses start it on ``self.port``.

    Args:
        workdir: a fresh folder for its config, storage and logs.
        upstream_url: where it fetches from (the upstream or a throttle before it).
    """

    name: ClassVar[str] = ""

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        self.workdir = workdir
        self.upstream_url = upstream_url
        self.port = free_port()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and wait until it answers ``/v2/``."""

    def stop(self) -> None:
        """Stop it."""

    def pid(self) -> int | None:
        """The main process (its children are found through /proc)."""
        return None


class MirrorTarget(Target):
    """Our mirror as a subprocess, one process, default settings."""

    name = MIRROR
    workers = 1

    #: The source tree whose ``mirror`` package runs (``None``: this one).
    source: Path | None = None

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        super().__init__(workdir, upstream_url)
        workdir.mkdir(parents=True, exist_ok=True)
        secret = workdir / "upstream-password"
        secret.write_text(PASSWORD)
        upstream = {"name": UPSTREAM_NAME, "url": upstream_url, "default": True,
                    "username": USER, "password_file": str(secret)}
        self.storage = workdir / "cache"
        config = mirror_config(self.port, self.storage, [upstream])
        config["server"] = {"workers": self.workers}
        self.proc = MirrorProcess(workdir, config, source=self.source)

    def start(self) -> None:
        self.proc.start()

    def stop(self) -> None:
        self.proc.stop()

    def pid(self) -> int | None:
        return self.proc.pid


class BaselineTarget(MirrorTarget):
    """The mirror of another source tree (set :attr:`source`, ``--baseline-src``), one
    process, default settings: the same scenario before and after a change, side by side."""

    name = BASELINE


class Mirror2Target(MirrorTarget):
    """Our mirror with ``server.workers: 2`` (a supervisor and two worker processes)."""

    name = MIRROR2
    workers = 2


class _ProxyRegistry(Registry):
    """Distribution in proxy mode that logs in to its remote with a password."""

    def _config(self) -> dict[str, object]:
        config = super()._config()
        config["proxy"] = {"remoteurl": self.proxy_remote, "username": USER,
                           "password": PASSWORD}
        return config


class DistributionTarget(Target):
    """CNCF Distribution (Debian ``docker-registry``) as a pull-through cache."""

    name = DISTRIBUTION

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        super().__init__(workdir, upstream_url)
        self.registry = _ProxyRegistry(workdir, proxy_remote=upstream_url)
        self.port = self.registry.port

    def start(self) -> None:
        self.registry.start()

    def stop(self) -> None:
        self.registry.stop()

    def pid(self) -> int | None:
        return self.registry.pid


_NGINX_MAIN = """\
{user}worker_processes {workers};
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
{body}
}}
"""

# proxy_cache_lock stays at its defaults (lock_timeout and lock_age 5 s): that
# is what most configurations run, and what the herd scenario shows.
_NGINX_CACHE = """\
    proxy_cache_path {work}/cache levels=1:2 keys_zone=registry:16m max_size=64g
                     inactive=7d use_temp_path=off;
    upstream registry {{ server {upstream}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host {upstream};
        proxy_read_timeout 300s;
        proxy_cache registry;
        proxy_cache_lock on;
        proxy_ignore_headers Cache-Control Expires Set-Cookie;
        location ~ "^/v2/.+/blobs/(sha256:[0-9a-f]{{64}})$" {{
            proxy_cache_key $1;
            proxy_cache_valid 200 365d;
            proxy_pass http://registry;
        }}
        location ~ "^/v2/.+/manifests/(sha256:[0-9a-f]{{64}})$" {{
            proxy_cache_key "$1|$http_accept";
            proxy_cache_valid 200 365d;
            proxy_pass http://registry;
        }}
        location ~ "^/v2/.+/manifests/" {{
            proxy_cache_key "$uri|$http_accept";
            proxy_cache_valid 200 5m;
            proxy_pass http://registry;
        }}
        location / {{
            proxy_cache off;
            proxy_pass http://registry;
        }}
    }}
"""

_NGINX_SENDFILE = """\
    server {{
        listen 127.0.0.1:{port};
        location ~ "^/v2/.+/blobs/sha256:([0-9a-f]{{64}})$" {{
            default_type application/octet-stream;
            alias {root}/$1;
        }}
        location ~ "^/v2/.+/manifests/sha256:([0-9a-f]{{64}})$" {{
            default_type application/vnd.oci.image.manifest.v1+json;
            alias {root}/manifest-$1;
        }}
        location / {{ return 404; }}
    }}
"""


class NginxTarget(Target):
    """nginx as a caching reverse proxy of the upstream (one worker)."""

    name = NGINX
    workers = 1

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        super().__init__(workdir, upstream_url)
        self._proc: subprocess.Popen[bytes] | None = None

    def _body(self) -> str:
        upstream = self.upstream_url.removeprefix("http://").rstrip("/")
        return _NGINX_CACHE.format(work=self.workdir, upstream=upstream, port=self.port)

    def start(self) -> None:
        binary = shutil.which("nginx")
        if binary is None:
            raise RuntimeError("nginx is not on PATH (Debian package: nginx)")
        for sub in ("tmp", "cache"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        # As root, workers would run as nobody and could not read our folders.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = self.workdir / "nginx.conf"
        conf.write_text(_NGINX_MAIN.format(user=user, work=self.workdir, body=self._body(),
                                           workers=self.workers))
        with (self.workdir / "stderr.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [binary, "-p", str(self.workdir), "-e", str(self.workdir / "error.log"),
                 "-c", str(conf), "-g", "daemon off;"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            wait_http(f"{self.url}/v2/", timeout=10, statuses=(200, 401, 404))
        except TimeoutError as exc:
            self.stop()
            tail = (self.workdir / "error.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"nginx did not start: {exc}\n{tail}") from exc

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: fast shutdown of master and workers
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


class SendfileTarget(NginxTarget):
    """nginx serving blob files from a folder with sendfile, no upstream at all.

    The mirror keeps its blob files mode 0600 (mkstemp), which an unprivileged
    nginx worker cannot read; :meth:`add_blob` writes the same bytes to a file
    of mode 0644 in a folder of its own.
    """

    name = SENDFILE

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        super().__init__(workdir, upstream_url)
        self.root = workdir / "blobs"

    def _body(self) -> str:
        return _NGINX_SENDFILE.format(root=self.root, port=self.port)

    def add_blob(self, digest: str, data: bytes, media_type: str | None = None) -> None:
        """Serve ``data`` as blob ``digest`` (or as a manifest, given its ``media_type``)."""
        _add_file(self.root, digest, data, media_type)


def _add_file(root: Path, digest: str, data: bytes, media_type: str | None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    name = digest.removeprefix("sha256:")
    if media_type is not None:
        name = f"manifest-{name}"
        (root / f"{name}.type").write_text(media_type)
    dest = root / name
    dest.write_bytes(data)
    dest.chmod(0o644)


class Sendfile2Target(SendfileTarget):
    """nginx serving the same files with two worker processes."""

    name = SENDFILE2
    workers = 2


class BareTarget(Target):
    """A bare aiohttp handler under uvloop answering the same bytes from memory
    (:mod:`benchmarks.bare`): the ceiling of the mirror's stack in one process."""

    name = BARE

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        super().__init__(workdir, upstream_url)
        self.root = workdir / "files"
        self._proc: subprocess.Popen[bytes] | None = None

    def add_blob(self, digest: str, data: bytes, media_type: str | None = None) -> None:
        """Serve ``data`` as blob ``digest`` (or as a manifest, given its ``media_type``)."""
        _add_file(self.root, digest, data, media_type)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "stderr.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.bare", str(self.port), str(self.root)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        wait_http(f"{self.url}/v2/", timeout=20, statuses=(200,))

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


class DirectTarget(Target):
    """The upstream itself, no cache in front (the clients log in)."""

    name = UPSTREAM

    def __init__(self, workdir: Path, upstream_url: str, upstream: Upstream) -> None:
        super().__init__(workdir, upstream_url)
        self.upstream = upstream
        self.port = int(upstream_url.rsplit(":", 1)[1].rstrip("/"))

    def pid(self) -> int | None:
        return self.upstream.reg.pid


def make_target(name: str, workdir: Path, upstream_url: str, upstream: Upstream) -> Target:
    """Build (not start) the target called ``name`` in ``workdir``."""
    if name == UPSTREAM:
        return DirectTarget(workdir, upstream_url, upstream)
    kinds: dict[str, type[Target]] = {MIRROR: MirrorTarget, DISTRIBUTION: DistributionTarget,
                                      NGINX: NginxTarget, SENDFILE: SendfileTarget,
                                      MIRROR2: Mirror2Target, SENDFILE2: Sendfile2Target,
                                      BARE: BareTarget, BASELINE: BaselineTarget}
    return kinds[name](workdir, upstream_url)
