"""Peers without processes: tokens, rendezvous hashing, membership health, config errors."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from mirror import config
from mirror.clock import ManualClock
from mirror.cluster import PeerSet, TokenSource, rendezvous, sign_token, verify_token
from mirror.errors import ConfigError

SECRET = "0123456789abcdef-secret"


def _cluster(**extra: Any) -> config.ClusterSettings:
    document = {"listen": "127.0.0.2:5000", "upstreams": [{"name": "docker.io"}],
                "cluster": {"secret_env": "S", "peers": ["http://127.0.0.3:5000"], **extra}}
    settings = config.parse(document, env={"S": SECRET})
    assert settings.cluster is not None
    return settings.cluster


NODE_B = "http://127.0.0.3:5000"
BLOB = "/_peer/v2/library/x/blobs/sha256:" + "a" * 64 + "?ns=docker.io"


def _verify(token: str, now: float = 990.0, *, secret: str = SECRET,
            audiences: tuple[str, ...] = (NODE_B,), method: str = "GET",
            path: str = BLOB) -> str | None:
    return verify_token(secret, token, now, 60, audiences=audiences, method=method, path=path)


def test_a_token_is_valid_for_its_node_until_it_expires() -> None:
    token = sign_token(SECRET, "node-a", 1000.0, audience=NODE_B, method="GET", path=BLOB)
    assert _verify(token) == "node-a"
    assert _verify(token, 1001.0) is None  # expired
    assert _verify(token, 800.0) is None  # too far ahead: not ours
    assert _verify(token, secret="another-secret-entirely") is None
    assert _verify(token.replace("node-a", "node-b")) is None
    assert _verify("Basic xyz") is None


def test_a_token_opens_only_the_node_method_and_path_it_was_made_for() -> None:
    token = sign_token(SECRET, "node-a", 1000.0, audience=NODE_B, method="HEAD", path=BLOB)
    assert _verify(token, method="HEAD") == "node-a"
    assert _verify(token, method="GET") is None  # a HEAD is not a GET
    assert _verify(token, method="HEAD", audiences=("http://127.0.0.4:5000",)) is None
    assert _verify(token, method="HEAD", path=BLOB.replace("?ns=docker.io", "?ns=quay.io")) \
        is None
    assert _verify(token, method="HEAD", path=BLOB.replace("a" * 64, "b" * 64)) is None
    assert _verify(token, method="HEAD", path="/_peer/popular?top=1000") is None
    # a node accepts tokens made for any of its names (its region's load balancer)
    assert _verify(token, method="HEAD", audiences=("https://lb.example", NODE_B)) == "node-a"


def test_the_token_source_signs_each_request_for_its_target() -> None:
    clock = ManualClock(1000.0)
    source = TokenSource(_cluster(node_id="node-a"), clock)
    header = source.headers(f"{NODE_B}{BLOB}", "HEAD")["Authorization"]
    assert header.startswith("Bearer mirror-peer.v2.node-a.")
    assert verify_token(SECRET, header[7:], 1000.0, 60, audiences=(NODE_B,), method="HEAD",
                        path=BLOB) == "node-a"
    assert verify_token(SECRET, header[7:], 1000.0, 60, audiences=(NODE_B,), method="GET",
                        path=BLOB) is None


def test_audiences_are_base_urls() -> None:
    assert _cluster(audiences=["https://mirror.us-east.example.com"]).audiences == (
        "https://mirror.us-east.example.com",)
    with pytest.raises(ConfigError, match=r"cluster.audiences\[0\]"):
        _cluster(audiences=["https://lb.example/v2"])


def test_a_new_member_takes_about_one_nth_of_the_digests() -> None:
    digests = [f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(4000)]
    three = [f"http://127.0.0.{i}:5000" for i in (2, 3, 4)]
    four = [*three, "http://127.0.0.5:5000"]
    before = {d: rendezvous(d, three)[0] for d in digests}
    after = {d: rendezvous(d, four)[0] for d in digests}
    moved = [d for d in digests if before[d] != after[d]]
    assert all(after[d] == four[3] for d in moved)  # only to the new member, none between
    assert 0.2 < len(moved) / len(digests) < 0.3  # about 1/4
    shares = [sum(1 for o in after.values() if o == m) / len(digests) for m in four]
    assert all(0.2 < share < 0.3 for share in shares)


def test_a_member_enters_the_hash_when_healthy_and_leaves_after_failures() -> None:
    clock = ManualClock()
    settings = _cluster(health_failures=2, quarantine="1m")
    peer = "http://127.0.0.3:5000"
    members = PeerSet(settings, "http://127.0.0.2:5000", clock)
    assert members.healthy() == []  # not before it answered a check
    members.succeeded(peer)
    assert members.healthy() == [peer]
    members.failed(peer, "timeout")
    assert members.healthy() == [peer]  # one failure is not enough
    members.failed(peer, "timeout")
    assert members.healthy() == []
    members.succeeded(peer)
    members.quarantine(peer)
    assert members.healthy() == []
    clock.advance(61)
    assert members.healthy() == [peer]
    assert set(members.ranked("sha256:x")) == {peer, "http://127.0.0.2:5000"}


@pytest.mark.parametrize(("extra", "env", "key"), [
    ({"secret_env": "S"}, {"S": "short"}, "cluster.secret_env"),
    ({}, {}, "cluster.secret_env"),
    ({"secret_env": "S", "peers": ["ftp://x"]}, {"S": SECRET}, "cluster.peers[0]"),
    ({"secret_env": "S", "peers": ["http://x:1/path"]}, {"S": SECRET}, "cluster.peers[0]"),
    ({"secret_env": "S", "header_timeout": "1h"}, {"S": SECRET}, "cluster.header_timeout"),
    ({"secret_env": "S", "peers_dns": {"name": "x"}}, {"S": SECRET}, "cluster.peers_dns"),
    ({"secret_env": "S", "node_id": "a b"}, {"S": SECRET}, "cluster.node_id"),
])
def test_cluster_config_errors_name_their_key(extra: dict[str, Any], env: dict[str, str],
                                               key: str) -> None:
    document = {"listen": "127.0.0.2:5000", "upstreams": [{"name": "docker.io"}],
                "cluster": extra}
    with pytest.raises(ConfigError) as info:
        config.parse(document, env=env)
    assert info.value.key == key


def test_self_url_is_required_when_listening_everywhere_with_peers() -> None:
    document = {"listen": "0.0.0.0:5000", "upstreams": [{"name": "docker.io"}],
                "cluster": {"secret_env": "S", "peers": ["http://127.0.0.9:5000"]}}
    with pytest.raises(ConfigError) as info:
        config.parse(document, env={"S": SECRET})
    assert info.value.key == "cluster.self_url"
    assert _cluster().self_url == "http://127.0.0.2:5000"
    document["cluster"] = {"secret_env": "S", "self_url": "http://${POD_IP}:5000"}  # type: ignore[index]
    settings = config.parse(document, env={"S": SECRET, "POD_IP": "127.0.0.7"})
    assert settings.cluster is not None and settings.cluster.self_url == "http://127.0.0.7:5000"
    with pytest.raises(ConfigError) as missing:
        config.parse(document, env={"S": SECRET})
    assert missing.value.key == "cluster.self_url"
