"""A real CNCF Distribution registry (Debian ``docker-registry``) for tests.

Starts ``docker-registry serve`` on a free loopback port with its own storage,
seeds it with the OCI push API, and reads its access log (combined format) to
count the requests it served.
"""

from __future__ import annotations

import base64
import http.client
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tests.support.images import Blob, Image, Index
from tests.support.net import free_port, wait_http
from tests.support.tokenserver import TokenServer

# gorilla/handlers CombinedLoggingHandler:
#   host - user [time] "METHOD URI PROTO" status size "referer" "user-agent"
_ACCESS_RE = re.compile(
    r"^(?P<host>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<path>\S+) (?P<proto>[^"]+)" (?P<status>\d{3}) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)



def write_htpasswd(path: Path, users: dict[str, str], binary: str = "htpasswd") -> Path:
    """Write ``path`` as Apache's ``htpasswd -B`` writes it (bcrypt), one line a user."""
    lines = [subprocess.run([binary, "-Bbn", user, password], check=True,
                            capture_output=True, text=True).stdout.strip()
             for user, password in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path

@dataclass(frozen=True)
class AccessEntry:
    """One line of Distribution's access log."""

    method: str
    path: str
    status: int
    bytes: int
    user_agent: str


def parse_access_log(text: str) -> list[AccessEntry]:
    """Parse the combined-format access lines out of a Distribution log.

    Non-access lines (Distribution's own logging) are ignored.
    """
    entries = []
    for line in text.splitlines():
        match = _ACCESS_RE.match(line)
        if match:
            size = match["bytes"]
            entries.append(
                AccessEntry(
                    match["method"],
                    match["path"],
                    int(match["status"]),
                    0 if size == "-" else int(size),
                    match["agent"] or "",
                )
            )
    return entries


class PushError(RuntimeError):
    """A push to the registry got an unexpected answer."""


class Registry:
    """A Distribution 2.8 process on 127.0.0.1:<free port>.

    Args:
        workdir: folder for config, storage and the log (created if missing).
        token: bearer-token auth through this (started) token server.
        htpasswd: Basic auth with this single ``(user, password)``.
        proxy_remote: run as a pull-through cache of this upstream URL.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        token: TokenServer | None = None,
        htpasswd: tuple[str, str] | None = None,
        proxy_remote: str | None = None,
    ) -> None:
        if token is not None and htpasswd is not None:
            raise ValueError("Distribution supports one auth method at a time")
        self.workdir = workdir
        self.token = token
        self.htpasswd = htpasswd
        self.proxy_remote = proxy_remote
        self.port = free_port()
        self.config_path = workdir / "config.yml"
        self.log_path = workdir / "registry.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """``"127.0.0.1:PORT"``, as used in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``"http://127.0.0.1:PORT"``."""
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        """The process id while running (for sampling its memory)."""
        return self._proc.pid if self._proc is not None else None

    def _config(self) -> dict[str, object]:
        config: dict[str, object] = {
            "version": 0.1,
            # Distribution's own log lines are noise here; the access log is
            # written independently of this level.
            "log": {"level": "warn", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.workdir / "storage")},
                "delete": {"enabled": True},
                "redirect": {"disable": True},
            },
            "http": {"addr": self.host, "secret": "test-secret"},
        }
        if self.token is not None:
            config["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": self.token.service,
                    "issuer": self.token.issuer,
                    "rootcertbundle": str(self.token.cert_path),
                }
            }
        if self.htpasswd is not None:
            user, password = self.htpasswd
            htfile = write_htpasswd(self.workdir / "htpasswd", {user: password})
            config["auth"] = {"htpasswd": {"realm": "test-registry", "path": str(htfile)}}
        if self.proxy_remote is not None:
            config["proxy"] = {"remoteurl": self.proxy_remote}
        return config

    def start(self, timeout: float = 15.0) -> None:
        """Write the config, start the process and wait until ``/v2/`` answers.

        Raises:
            RuntimeError: if the process exits or does not answer in time
                (the message holds the log's tail).
        """
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not on PATH")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self._config()))
        with self.log_path.open("ab") as log:
            # The access log goes to one stream and the app log to the other,
            # depending on the version; capture both in one file.
            self._proc = subprocess.Popen(
                [binary, "serve", str(self.config_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_http(f"{self.url}/v2/", timeout=timeout, statuses=(200, 401))
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(f"registry did not start: {exc}\n{self._tail()}") from exc

    def stop(self) -> None:
        """Terminate the process (kill after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # --- access log -------------------------------------------------------

    def _settled_size(self, timeout: float = 5.0) -> int:
        # Access lines are written after each response completes; wait until
        # the file has not grown for 200 ms.
        deadline = time.monotonic() + timeout
        size, stable_since = self.log_path.stat().st_size, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now_size = self.log_path.stat().st_size
            if now_size != size:
                size, stable_since = now_size, time.monotonic()
            elif time.monotonic() - stable_since >= 0.2:
                break
        return size

    def clear_log_mark(self) -> int:
        """Return a mark (a log offset) for ``requests_since``, after the log settles."""
        return self._settled_size()

    def requests_since(self, mark: int) -> list[AccessEntry]:
        """Return the access entries logged after ``mark`` (after the log settles)."""
        end = self._settled_size()
        with self.log_path.open("rb") as log:
            log.seek(mark)
            text = log.read(end - mark).decode(errors="replace")
        return parse_access_log(text)

    def access_log(self) -> list[AccessEntry]:
        """Return every access entry so far (after the log settles)."""
        return self.requests_since(0)

    def count(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        path_regex: str | None = None,
        *,
        since: int = 0,
    ) -> int:
        """Count access entries matching every given filter, logged after ``since``."""
        pattern = re.compile(path_regex) if path_regex else None
        return sum(
            1
            for e in self.requests_since(since)
            if (method is None or e.method == method)
            and (path_contains is None or path_contains in e.path)
            and (pattern is None or pattern.search(e.path))
        )

    # --- seeding ----------------------------------------------------------

    def push(self, item: Image | Index) -> None:
        """Push an image or index: blobs, then child manifests by digest, then the tag.

        Raises:
            PushError: on any unexpected status.
        """
        pusher = _Pusher(self, item.repo)
        try:
            children = item.children if isinstance(item, Index) else []
            for blob in item.blobs():
                pusher.blob(blob)
            for child in children:
                pusher.manifest(child.manifest, child.manifest.digest)
            pusher.manifest(item.manifest, item.tag)
        finally:
            pusher.close()

    def push_raw(self, repo: str, blobs: list[Blob],
                 manifests: list[tuple[Blob, str]]) -> None:
        """Push blobs, then manifests under their references (artifacts, extra tags)."""
        pusher = _Pusher(self, repo)
        try:
            for blob in blobs:
                pusher.blob(blob)
            for manifest, reference in manifests:
                pusher.manifest(manifest, reference)
        finally:
            pusher.close()

    def auth_header(self, repo: str, actions: str = "pull,push") -> dict[str, str]:
        """Return the Authorization header this registry needs for ``repo``, if any."""
        if self.token is not None:
            token = self.token.mint([f"repository:{repo}:{actions}"], subject="seeder")
            return {"Authorization": f"Bearer {token}"}
        if self.htpasswd is not None:
            creds = base64.b64encode(":".join(self.htpasswd).encode()).decode()
            return {"Authorization": f"Basic {creds}"}
        return {}


class _Pusher:
    """One keep-alive connection pushing into one repository."""

    def __init__(self, registry: Registry, repo: str) -> None:
        self.repo = repo
        self.conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=120)
        # Tokens are minted directly, not fetched over HTTP, so that seeding
        # leaves no trace in the token server's request log.
        self.headers = registry.auth_header(repo)

    def close(self) -> None:
        self.conn.close()

    def _call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        self.conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
        resp = self.conn.getresponse()
        resp.read()
        return resp

    def _expect(self, resp: http.client.HTTPResponse, status: int, what: str) -> None:
        if resp.status != status:
            raise PushError(
                f"{what} in {self.repo}: {resp.status} {resp.reason}, expected {status}"
            )

    def blob(self, blob: Blob) -> None:
        path = f"/v2/{self.repo}/blobs/{blob.digest}"
        if self._call("HEAD", path).status == 200:
            return
        resp = self._call("POST", f"/v2/{self.repo}/blobs/uploads/")
        self._expect(resp, 202, "start upload")
        location = urlsplit(resp.headers["Location"])
        sep = "&" if location.query else ""
        put = f"{location.path}?{location.query}{sep}digest={blob.digest}"
        # http.client sends a bytes body with one sendall: no copy of big blobs.
        resp = self._call(
            "PUT",
            put,
            body=blob.data,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)},
        )
        self._expect(resp, 201, f"upload {blob.digest}")

    def manifest(self, manifest: Blob, reference: str) -> None:
        resp = self._call(
            "PUT",
            f"/v2/{self.repo}/manifests/{reference}",
            body=manifest.data,
            headers={"Content-Type": manifest.media_type},
        )
        self._expect(resp, 201, f"put manifest {reference}")
        got = resp.headers.get("Docker-Content-Digest")
        if got != manifest.digest:
            raise PushError(
                f"manifest {reference}: registry says {got}, expected {manifest.digest}"
            )
