"""The mirror as a real subprocess: ``python -m mirror serve --config FILE``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support.net import free_port, http_status


def mirror_config(port: int, storage_path: Path, upstreams: list[dict[str, Any]]) -> dict[str, Any]:
    """Return a minimal mirror config listening on 127.0.0.1:``port``.

    Args:
        port: the listen port (use ``free_port()``).
        storage_path: the filesystem storage folder.
        upstreams: entries like ``{"name": "registry.test", "url": "http://127.0.0.1:P",
            "default": True, "aliases": ["reg"]}``.
    """
    return {
        "version": 1,
        "listen": f"127.0.0.1:{port}",
        "storage": {"path": str(storage_path)},
        "upstreams": upstreams,
        "log": {"format": "json", "level": "info"},
        # one process unless a test asks for workers (the default is one per core)
        "server": {"workers": 1},
    }


def log_events(text: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``event`` in ``text`` (compact or spaced JSON alike)."""
    found = []
    for line in text.splitlines():
        if event not in line or not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            found.append(record)
    return found


class MirrorProcess:
    """Runs the mirror with ``config`` until ``stop()`` or ``kill9()``.

    Args:
        workdir: folder for ``mirror.yaml`` and ``mirror.log``.
        config: the config dict; its ``listen`` is ``"127.0.0.X:PORT"``.
        source: run the ``mirror`` package of this source tree instead (a benchmark's
            baseline, e.g. another checkout).
    """

    def __init__(self, workdir: Path, config: dict[str, Any],
                 source: Path | None = None) -> None:
        self.workdir = workdir
        self.config = config
        self.source = source
        self.config_path = workdir / "mirror.yaml"
        self.log_path = workdir / "mirror.log"
        self.host, _, port = str(config["listen"]).rpartition(":")
        self.port = int(port)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``"http://HOST:PORT"`` of its listen address (127.0.0.1 unless set otherwise;
        ``https`` when the config has a ``tls`` section)."""
        scheme = "https" if self.config.get("tls") else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 15.0) -> None:
        """Write the config, start the process and wait for ``/readyz`` == 200.

        Raises:
            RuntimeError: if it exits or is not ready within ``timeout``
                (the message holds the log's tail).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "mirror", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.source,
            )
        deadline = time.monotonic() + timeout
        while http_status(f"{self.url}/readyz", timeout=1.0) != 200:
            code = self._proc.poll()
            if code is not None or time.monotonic() >= deadline:
                why = f"exited with {code}" if code is not None else f"not ready in {timeout}s"
                self.stop()
                raise RuntimeError(f"mirror {why}; log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_workers(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``count`` workers have logged ``mirror_started`` (``/readyz`` answers
        with the first one) and return those events.

        Raises:
            AssertionError: not all within ``timeout`` s (the message is the log's tail).
        """
        deadline = time.monotonic() + timeout
        while len(started := self.events("mirror_started")) < count:
            assert time.monotonic() < deadline, self.log_tail()
            time.sleep(0.05)
        return started

    def stop(self, timeout: float = 10.0) -> int | None:
        """Send SIGTERM, wait up to ``timeout`` s, then SIGKILL.

        Returns:
            The exit code, or None if it was not running.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` (e.g. SIGHUP) to the running process."""
        assert self._proc is not None and self._proc.poll() is None, "not running"
        self._proc.send_signal(signum)

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a blocked peer)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def kill9(self) -> None:
        """SIGKILL the process (a crash) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> MirrorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        """The whole log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines of ``event``, parsed."""
        return log_events(self.log_text(), event)

    def log_tail(self, lines: int = 50) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])


class Mirrors:
    """The mirrors one test starts in front of a registry, under ``root`` (the test's
    ``tmp_path``); :meth:`stop` ends them all (the ``mirrors`` fixture calls it).

    Args:
        root: where each mirror's folder and, unless given, the shared ``cache`` go.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[MirrorProcess] = []

    def start(self, registry_url: str, workers: int = 1, *, upstream: str = "registry.test",
              aliases: list[str] | None = None, storage_path: Path | None = None,
              workdir: str | None = None, timeout: float = 15.0,
              **sections: Any) -> MirrorProcess:
        """Start a mirror of ``registry_url`` (the default upstream, named ``upstream``)
        and return once every one of its ``workers`` has started.

        Args:
            storage_path: its storage folder (``root/cache`` unless given: mirrors started
                one after the other share it).
            workdir: its folder's name under ``root`` (``mirror-N`` unless given).
            timeout: how long the start and each worker may take, in seconds.
            sections: config sections; a mapping merges into the base config's section
                of that name (``storage={"max_size": "1GiB"}`` keeps the path), anything
                else replaces it.
        """
        entry: dict[str, Any] = {"name": upstream, "url": registry_url, "default": True}
        if aliases:
            entry["aliases"] = aliases
        config = mirror_config(free_port(), storage_path or self.root / "cache", [entry])
        config["server"] = {"workers": workers}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
        process = MirrorProcess(self.root / (workdir or f"mirror-{len(self.started)}"), config)
        process.start(timeout=timeout)
        self.started.append(process)
        process.wait_workers(workers, timeout)
        return process

    def stop(self) -> None:
        """Stop every mirror started (those stopped already are left as they are)."""
        for process in self.started:
            process.stop()
