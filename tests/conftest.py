"""Session fixtures for integration tests: a token server, real Distribution
registries seeded with the standard images, and a large image.

Integration tests need the ``docker-registry`` and ``skopeo`` binaries. Without
them the tests are skipped on a developer machine, but fail under ``CI`` so
that CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.support.containerd import Containerd
from tests.support.images import Image, Index, make_image, make_layer, standard_set
from tests.support.registry import Registry
from tests.support.s3 import MotoS3
from tests.support.tokenserver import TokenServer


def require_binary(name: str) -> str:
    """Return the path of ``name``; skip the test if missing, or fail under CI."""
    path = shutil.which(name)
    if path is None:
        reason = (
            f"{name} is not on PATH (Debian package: "
            + {
                "docker-registry": "docker-registry",
                "skopeo": "skopeo",
                "htpasswd": "apache2-utils",
                "containerd": "containerd",
                "dockerd": "docker.io",
            }.get(name, name)
            + ")"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must not skip integration tests", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def skopeo_bin() -> str:
    """The skopeo binary (skips or fails the test if it is missing)."""
    return require_binary("skopeo")


@pytest.fixture(scope="session")
def registry_bin() -> str:
    """The docker-registry binary (skips or fails the test if it is missing)."""
    return require_binary("docker-registry")


@pytest.fixture(scope="session")
def htpasswd_bin() -> str:
    """The htpasswd binary of apache2-utils (skips or fails the test if it is missing)."""
    return require_binary("htpasswd")


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A private containerd daemon for the session (Debian package ``containerd``)."""
    require_binary("containerd")
    require_binary("ctr")
    daemon = Containerd(tmp_path_factory.mktemp("containerd"))
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """A real S3 API (moto's server mode) on a loopback port, shared by the session."""
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def std_images() -> list[Image | Index]:
    """The four standard images (``standard_set("std")``) seeded in both registries."""
    return standard_set("std")


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """A token server granting every scope, shared by the session."""
    server = TokenServer(tmp_path_factory.mktemp("token"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry_anon(
    registry_bin: str,
    tmp_path_factory: pytest.TempPathFactory,
    std_images: list[Image | Index],
) -> Iterator[Registry]:
    """An anonymous Distribution seeded with the standard images."""
    yield from _seeded(Registry(tmp_path_factory.mktemp("registry-anon")), std_images)


@pytest.fixture(scope="session")
def registry_token(
    registry_bin: str,
    tmp_path_factory: pytest.TempPathFactory,
    token_server: TokenServer,
    std_images: list[Image | Index],
) -> Iterator[Registry]:
    """A Distribution with Docker-Hub-like bearer auth through ``token_server``,
    seeded with the standard images."""
    registry = Registry(tmp_path_factory.mktemp("registry-token"), token=token_server)
    yield from _seeded(registry, std_images)


def _seeded(registry: Registry, items: list[Image | Index]) -> Iterator[Registry]:
    """Start ``registry``, push ``items``, hand it out, stop it."""
    registry.start()
    try:
        for item in items:
            registry.push(item)
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def big_image(registry_anon: Registry) -> Image:
    """``big/layer:v1`` on ``registry_anon``: a Docker image with one 64 MiB layer."""
    image = make_image("big/layer", "v1", layers=[make_layer(64 << 20, seed=6464)], fmt="docker")
    registry_anon.push(image)
    return image
