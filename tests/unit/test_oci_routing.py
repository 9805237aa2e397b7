"""Grammars, Accept parsing, routing and Range parsing: pure functions."""

from __future__ import annotations

import pytest

from mirror import config
from mirror.errors import (
    DigestInvalid,
    NameInvalid,
    NameUnknown,
    RangeInvalid,
    RouteNotFound,
    TagInvalid,
    Unsupported,
)
from mirror.oci import Digest, accepted_types, validate_name, validate_tag
from mirror.routing import Kind, Router, tags_link
from mirror.server.responses import parse_range

HEX = "a" * 64


@pytest.mark.parametrize("name", ["a", "library/nginx", "a.b/c_d/e--f", "x__y", "0/1/2"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "a//b", "/a", "a/", "a..b", "-a", "a_", "..", "a/../b",
                                  "a" * 256])
def test_invalid_names(name: str) -> None:
    with pytest.raises(NameInvalid):
        validate_name(name)


def test_tags() -> None:
    assert validate_tag("v1.2_3-RC") == "v1.2_3-RC"
    for bad in ("", "-x", ".x", "a" * 129, "a/b", "a:b"):
        with pytest.raises(TagInvalid):
            validate_tag(bad)


def test_digests() -> None:
    assert str(Digest.parse(f"sha256:{HEX}")) == f"sha256:{HEX}"
    assert Digest.parse("sha512:" + "b" * 128).algorithm == "sha512"
    for bad in (f"sha256:{HEX.upper()}", "sha256:abc", f"md5:{HEX}", HEX, f"sha256:{HEX}0",
                "sha256:../../etc"):
        with pytest.raises(DigestInvalid):
            Digest.parse(bad)
    assert Digest.of(b"x").matches(b"x")


def test_accept_lines_and_wildcards() -> None:
    assert accepted_types(["a/b, c/d;q=0.5", "e/f"]) == {"a/b", "c/d", "e/f"}
    assert accepted_types([]) is None
    assert accepted_types(["a/b, */*"]) is None


def _router(**hub: object) -> Router:
    settings = config.parse({"upstreams": [
        {"name": "docker.io", "url": "https://registry-1.docker.io", "default": True,
         "aliases": ["dockerhub"], **hub},
        {"name": "ghcr.io", "url": "https://ghcr.io", "aliases": ["ghcr"]},
        {"name": "myreg:5000", "url": "http://myreg:5000", "aliases": ["myreg"]},
    ]}, env={})
    return Router(settings.upstreams)


@pytest.mark.parametrize(("path", "query", "registry", "repository"), [
    ("/v2/nginx/manifests/1.27", None, "docker.io", "library/nginx"),
    ("/v2/library/nginx/manifests/1.27", {"ns": "docker.io"}, "docker.io", "library/nginx"),
    ("/v2/org/app/manifests/v1", {"ns": "ghcr.io"}, "ghcr.io", "org/app"),
    ("/v2/org/app/manifests/v1", {"ns": "GHCR.IO"}, "ghcr.io", "org/app"),
    ("/v2/org/app/manifests/v1", {"ns": "myreg:5000"}, "myreg:5000", "org/app"),
    ("/v2/ghcr.io/org/app/manifests/v1", None, "ghcr.io", "org/app"),
    ("/v2/ghcr/org/app/manifests/v1", None, "ghcr.io", "org/app"),
    ("/ghcr/v2/org/app/manifests/v1", None, "ghcr.io", "org/app"),
    ("/dockerhub/v2/nginx/manifests/v1", None, "docker.io", "library/nginx"),
    ("/v2/docker.io/nginx/manifests/v1", None, "docker.io", "library/nginx"),
    ("/v2/a/manifests/b/manifests/v1", None, "docker.io", "a/manifests/b"),
    ("/v2/ghcr.io/org/app/manifests/v1", {"ns": "ghcr.io"}, "ghcr.io", "org/app"),
])
def test_routes(path: str, query: dict[str, str] | None, registry: str, repository: str) -> None:
    target = _router().route(path, query)
    assert target.upstream is not None and target.upstream.name == registry
    assert target.repository == repository
    assert target.kind is Kind.MANIFEST


def test_route_kinds() -> None:
    router = _router()
    assert router.route("/v2/").kind is Kind.PING
    assert router.route("/ghcr/v2/").kind is Kind.PING
    blob = router.route(f"/v2/a/b/blobs/sha256:{HEX}")
    assert blob.kind is Kind.BLOB and blob.digest is not None
    assert router.route("/v2/a/tags/list").kind is Kind.TAGS
    assert router.route(f"/v2/a/referrers/sha256:{HEX}").kind is Kind.REFERRERS
    digest = router.route(f"/v2/a/manifests/sha256:{HEX}")
    assert digest.digest is not None


@pytest.mark.parametrize(("path", "query", "error"), [
    ("/v2/a/blobs/uploads/", None, Unsupported),
    ("/v2/_catalog", None, Unsupported),
    ("/v3/a/manifests/v1", None, RouteNotFound),
    ("/v2/a/other/v1", None, RouteNotFound),
    ("/nope/v2/a/manifests/v1", None, NameUnknown),
    ("/v2/a/manifests/v1", {"ns": "evil.com"}, NameUnknown),
    ("/v2/evil.com/a/manifests/v1", None, NameUnknown),
    ("/ghcr/v2/a/manifests/v1", {"ns": "docker.io"}, NameInvalid),
    ("/v2/A/manifests/v1", None, NameInvalid),
    ("/v2/a/manifests/v1:x", None, DigestInvalid),
])
def test_route_errors(path: str, query: dict[str, str] | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        _router().route(path, query)


def test_no_default_registry() -> None:
    settings = config.parse({"upstreams": [{"name": "r", "url": "http://r"}]}, env={})
    with pytest.raises(NameUnknown):
        Router(settings.upstreams).route("/v2/a/manifests/v1")


def test_link_is_rewritten_to_the_clients_layout() -> None:
    target = _router().route("/ghcr/v2/org/app/tags/list", {"ns": "ghcr.io"})
    link = tags_link(target, 2, "b")
    assert link == '</ghcr/v2/org/app/tags/list?last=b&n=2&ns=ghcr.io>; rel="next"'


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-", (0, 100)), ("bytes=10-19", (10, 20)), ("bytes=90-200", (90, 100)),
    ("bytes=-10", (90, 100)), ("bytes=-500", (0, 100)), ("bytes=0-1,5-6", None),
    ("items=0-1", None), ("bytes=x-", None), ("bytes=5-2", None),
])
def test_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=200-300", "bytes=-0"])
def test_unsatisfiable_range(header: str) -> None:
    with pytest.raises(RangeInvalid) as error:
        parse_range(header, 100)
    assert error.value.headers["Content-Range"] == "bytes */100"
