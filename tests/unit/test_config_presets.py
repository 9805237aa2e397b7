"""Config of presets and credentials: defaults filled, errors naming their key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mirror import config
from mirror.config import DockerConfigCredential, EcrCredential, StaticCredential, presets
from mirror.errors import ConfigError

ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


def one(entry: dict[str, Any], base: Path = Path("."), **env: str) -> config.UpstreamSettings:
    [upstream] = config.parse({"upstreams": [entry]}, env=env, base=base).upstreams
    return upstream


@pytest.mark.parametrize(("name", "preset", "url"), [
    ("docker.io", "dockerhub", "https://registry-1.docker.io"),
    ("index.docker.io", "dockerhub", "https://registry-1.docker.io"),
    (ECR, "ecr", f"https://{ECR}"),
    ("public.ecr.aws", "ecr-public", "https://public.ecr.aws"),
    ("ghcr.io", "ghcr", "https://ghcr.io"),
    ("quay.io", "quay", "https://quay.io"),
    ("gcr.io", "gcr", "https://gcr.io"),
    ("eu.gcr.io", "gcr", "https://eu.gcr.io"),
    ("europe-west1-docker.pkg.dev", "artifact-registry", "https://europe-west1-docker.pkg.dev"),
    ("contoso.azurecr.io", "acr", "https://contoso.azurecr.io"),
    ("registry.gitlab.com", "gitlab", "https://registry.gitlab.com"),
    ("acme.jfrog.io", "artifactory", "https://acme.jfrog.io"),
    ("registry.k8s.io", "k8s", "https://registry.k8s.io"),
    ("registry.example.com:5000", "generic", "https://registry.example.com:5000"),
])
def test_name_alone_selects_preset_and_url(name: str, preset: str, url: str) -> None:
    upstream = one({"name": name})
    assert (upstream.preset, str(upstream.url)) == (preset, url)


def test_preset_found_by_url_host_and_explicit_preset_wins() -> None:
    assert one({"name": "hub", "url": "https://registry-1.docker.io"}).library_prefix
    assert one({"name": "hub", "url": "https://registry-1.docker.io"}).preset == "dockerhub"
    harbor = one({"name": "harbor.corp.example", "preset": "harbor"})
    assert (harbor.preset, str(harbor.url)) == ("harbor", "https://harbor.corp.example")
    assert one({"name": "docker.io", "library_prefix": False}).library_prefix is False


def test_ecr_gets_credentials_from_the_aws_chain_by_default() -> None:
    [cred] = one({"name": ECR}).credentials
    assert cred == EcrCredential("ecr-0", "eu-west-1")
    [cred] = one({"name": "ecr", "url": f"https://{ECR}",
                  "ecr": {"profile": "prod", "refresh_margin": "2h"}}).credentials
    assert isinstance(cred, EcrCredential)
    assert (cred.region, cred.profile, cred.refresh_margin) == ("eu-west-1", "prod", 7200)


def test_credentials_list_in_order(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"auths": {}}))
    (tmp_path / "key.json").write_text('{"type": "service_account"}\n')
    upstream = one({"name": "docker.io", "username": "a", "password_env": "A", "credentials": [
        {"username": "b", "password_env": "B", "label": "second-bot"},
        {"docker_config": "config.json", "helper_timeout": "3s"},
        {"json_key_file": "key.json"},
    ]}, base=tmp_path, A="first-secret", B="second-secret")
    a, b, docker, key = upstream.credentials
    assert a == StaticCredential("static-0", "a", config.Secret("first-secret"))
    assert (b.label, upstream.username) == ("second-bot", "a")
    assert docker == DockerConfigCredential("docker_config-2", tmp_path / "config.json",
                                            presets.DOCKER_HUB_CONFIG_KEY, 3.0)
    assert isinstance(key, StaticCredential) and key.username == "_json_key"
    assert key.password.reveal() == '{"type": "service_account"}'
    assert "secret" not in repr(upstream) and "service_account" not in repr(upstream)


def test_docker_config_server_defaults_to_the_registry_host(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text("{}")
    [cred] = one({"name": "ghcr.io", "docker_config": "c.json"}, base=tmp_path).credentials
    assert isinstance(cred, DockerConfigCredential) and cred.server == "ghcr.io"


@pytest.mark.parametrize(("entry", "key"), [
    ({"name": "x", "preset": "nope"}, "upstreams[0].preset"),
    ({"name": "nexus", "preset": "nexus"}, "upstreams[0].url"),
    ({"name": "docker.io", "blob_probe": "peek"}, "upstreams[0].blob_probe"),
    ({"name": "ghcr.io", "credentials": []}, "upstreams[0].credentials"),
    ({"name": "ghcr.io", "credentials": [{"password_env": "A"}]}, "upstreams[0].credentials[0]"),
    ({"name": "ghcr.io", "credentials": [{"username": "u", "password_env": "NOPE"}]},
     "upstreams[0].credentials[0].password_env"),
    ({"name": "ghcr.io", "credentials": [{"username": "u", "password": "x"}]},
     "upstreams[0].credentials[0].password"),
    ({"name": "ghcr.io", "credentials": [{"username": "u", "password_env": "A", "bogus": 1}]},
     "upstreams[0].credentials[0].bogus"),
    ({"name": "ghcr.io", "credentials": [{"username": "u", "password_env": "A",
                                          "server": "x"}]}, "upstreams[0].credentials[0].server"),
    ({"name": "ghcr.io", "credentials": [{"docker_config": "/nonexistent/config.json"}]},
     "upstreams[0].credentials[0].docker_config"),
    ({"name": "ghcr.io", "credentials": [{"username": "u", "password_env": "A", "label": "l"},
                                         {"username": "v", "password_env": "A", "label": "l"}]},
     "upstreams[0].credentials"),
    ({"name": "ghcr.io", "username": "u", "password_env": "A", "ecr": {}}, "upstreams[0]"),
    ({"name": "ghcr.io", "ecr": {}}, "upstreams[0].ecr.region"),
    ({"name": ECR, "ecr": {"region": "eu-west-1", "zone": "a"}}, "upstreams[0].ecr.zone"),
    ({"name": ECR, "ecr": {"refresh_margin": "soon"}}, "upstreams[0].ecr.refresh_margin"),
    ({"name": ECR, "ecr": {"endpoint_url": "ftp://x"}}, "upstreams[0].ecr.endpoint_url"),
    ({"name": "gcr.io", "json_key_file": "/nonexistent.json"}, "upstreams[0].json_key_file"),
])
def test_errors_name_their_key(entry: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        one(entry, A="a")
    assert error.value.key == key, str(error.value)


def test_docker_config_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(ConfigError) as error:
        one({"name": "ghcr.io", "docker_config": "c.json"}, base=tmp_path)
    assert error.value.key == "upstreams[0].docker_config"
