"""Peers without processes: tokens, rendezvous hashing, membership health, config errors."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from mirror import config
from mirror.clock import ManualClock
from mirror.cluster import PeerSet, rendezvous, sign_token, verify_token
from mirror.errors import ConfigError

SECRET = "0123456789abcdef-secret"


def _cluster(**extra: Any) -> config.ClusterSettings:
    document = {"listen": "127.0.0.2:5000", "upstreams": [{"name": "docker.io"}],
                "cluster": {"secret_env": "S", "peers": ["http://127.0.0.3:5000"], **extra}}
    settings = config.parse(document, env={"S": SECRET})
    assert settings.cluster is not None
    return settings.cluster


def test_a_token_is_valid_for_its_node_until_it_expires() -> None:
    token = sign_token(SECRET, "node-a", 1000.0)
    assert verify_token(SECRET, token, 990.0, 60) == "node-a"
    assert verify_token(SECRET, token, 1001.0, 60) is None  # expired
    assert verify_token(SECRET, token, 800.0, 60) is None  # too far ahead: not ours
    assert verify_token("another-secret-entirely", token, 990.0, 60) is None
    assert verify_token(SECRET, token.replace("node-a", "node-b"), 990.0, 60) is None
    assert verify_token(SECRET, "Basic xyz", 990.0, 60) is None


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
