"""The real server, one process or a supervisor with workers: every answer's ``Server``
header is ``mirror/<version>``, never aiohttp's Python and aiohttp versions."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mirror.version import VERSION
from tests.support.mirrorproc import MirrorProcess, mirror_config
from tests.support.net import free_port

pytestmark = pytest.mark.integration
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _server(url: str) -> str:
    try:
        with _DIRECT.open(url, timeout=10) as answer:
            return str(answer.headers["Server"])
    except urllib.error.HTTPError as error:
        return str(error.headers["Server"])


@pytest.mark.parametrize("workers", [1, 2])
def test_every_answer_names_the_mirror(tmp_path: Path, workers: int) -> None:
    config = mirror_config(free_port(), tmp_path / "cache",
                           [{"name": "registry.test", "url": f"http://127.0.0.1:{free_port()}",
                             "default": True, "retries": 0}])
    config["server"] = {"workers": workers}
    mirror = MirrorProcess(tmp_path, config)
    mirror.start()
    try:
        for path in ("/v2/", "/healthz", "/metrics", "/", "/v2/app/blobs/sha256:" + "0" * 64,
                     "/nothing/here"):
            assert _server(mirror.url + path) == f"mirror/{VERSION}", path
    finally:
        mirror.stop()
