"""Every preset: the mirror pulls through a fake that speaks that registry's dialect.

Each test configures the upstream the way a user would (the registry's name and
credentials; ``url`` only to point the preset's host at loopback) and pulls an
image through the mirror with ``?ns=<name>``, checking every digest. The fakes
are in ``tests/support/dialects.py``; their CDN refuses and records any
``Authorization`` header.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from mirror import config
from tests.support.dialects import (
    DOCKER_HUB,
    Cdn,
    Dialect,
    Rig,
    no_cdn_auth,
    pull,
    seed,
)

# --- Docker Hub ---------------------------------------------------------------


async def test_docker_hub_library_prefix_tokens_from_auth_host_and_cdn(
        rig: Any, mirror_for: Any) -> None:
    hub: Rig = await rig(DOCKER_HUB)
    digest, blobs = seed(hub.registry, "library/nginx")
    mirror = await mirror_for({"name": "docker.io", "url": hub.url, "default": True,
                               "username": "hub-bot", "password_env": "HUB"},
                              env={"HUB": "dckr_pat_secret"})
    # Docker's registry-mirrors path (no ns, no library/) and containerd's (ns=docker.io)
    assert await pull(mirror, "docker.io", "nginx") == digest
    response = await mirror.get("/v2/library/nginx/manifests/v1?ns=index.docker.io")
    assert response.status == 200
    # One authorized manifest GET upstream (after the anonymous 401): the second was a hit.
    assert [("Authorization" in r.headers) for r in hub.registry.requests
            if "/manifests/v1" in r.path] == [False, True]
    # Tokens come from the auth host, with the account's Basic credentials.
    assert hub.token_server is not None
    assert hub.tokens.calls, "no token fetched"
    call = hub.tokens.calls[0]
    assert URL(call.path).query["service"] == "registry.docker.io"
    assert URL(call.path).query.getall("scope") == ["repository:library/nginx:pull"]
    assert call.headers["Authorization"].startswith("Basic ")
    # Blobs went to the CDN, with the signed query intact and no Authorization.
    assert len(hub.cdn.requests) == len(blobs)
    assert all("X-Amz-Signature=ab%2Fcd" in r.path for r in hub.cdn.requests)
    no_cdn_auth(hub)


async def test_docker_hub_missing_repository_is_name_unknown(rig: Any, mirror_for: Any) -> None:
    hub: Rig = await rig(DOCKER_HUB)
    seed(hub.registry, "library/nginx")
    mirror = await mirror_for({"name": "docker.io", "url": hub.url, "default": True})
    response = await mirror.get("/v2/nosuch/manifests/latest")
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    # Anonymous token request, then the 401 insufficient_scope (not a 404) upstream.
    assert "Authorization" not in hub.tokens.calls[0].headers
    assert hub.registry.count(contains="/v2/library/nosuch/") >= 2


# --- ECR Public, GHCR, Quay, GCR, Artifact Registry, ACR, GitLab, Harbor ----------------


async def test_ecr_public_checks_blobs_with_get_not_head(rig: Any, mirror_for: Any) -> None:
    ecr = await rig(Dialect(scheme="bearer", service="public.ecr.aws", realm_path="/token/",
                            token_fields=("token",), expires_in=None, head_blob_401=True,
                            blob_redirect="cdn"))
    digest, blobs = seed(ecr.registry, "docker/library/alpine")
    mirror = await mirror_for({"name": "public.ecr.aws", "url": ecr.url})
    # HEAD of a blob the mirror does not have yet: upstream is asked with GET.
    head = await mirror.head(f"/v2/docker/library/alpine/blobs/{blobs[1]}?ns=public.ecr.aws")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(ecr.registry.blobs[blobs[1]]))
    assert ecr.registry.count("HEAD", "/blobs/") == 0
    assert await pull(mirror, "public.ecr.aws", "docker/library/alpine") == digest
    no_cdn_auth(ecr)


async def test_ecr_public_expired_token_answered_400_is_fetched_again(
        rig: Any, mirror_for: Any) -> None:
    ecr = await rig(Dialect(scheme="bearer", service="public.ecr.aws", realm_path="/token/",
                            invalid_token_400=True))
    seed(ecr.registry, "docker/library/alpine", "v1")
    digest, _ = seed(ecr.registry, "docker/library/alpine", "v2")
    mirror = await mirror_for({"name": "public.ecr.aws", "url": ecr.url})
    assert (await mirror.get("/v2/docker/library/alpine/manifests/v1?ns=public.ecr.aws")
            ).status == 200
    ecr.tokens.granted.clear()  # the cached token expired upstream
    response = await mirror.get("/v2/docker/library/alpine/manifests/v2?ns=public.ecr.aws")
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert len(ecr.tokens.calls) == 2


async def test_ghcr_token_without_expiry_and_placeholder_ping_scope(
        rig: Any, mirror_for: Any) -> None:
    ghcr = await rig(Dialect(scheme="bearer", service="ghcr.io", expires_in=None,
                             ping_scope="repository:user/image:pull", blob_redirect="cdn",
                             users={"octocat": "ghp_token"}))
    digest, _ = seed(ghcr.registry, "org/app")
    mirror = await mirror_for({"name": "ghcr.io", "url": ghcr.url, "username": "octocat",
                               "password_env": "GHCR"}, env={"GHCR": "ghp_token"})
    assert await pull(mirror, "ghcr.io", "org/app") == digest
    assert all(c.headers.get("Authorization") for c in ghcr.tokens.calls)
    no_cdn_auth(ghcr)


async def test_quay_two_challenges_on_one_line(rig: Any, mirror_for: Any) -> None:
    quay = await rig(Dialect(scheme="bearer", service="quay.io", realm_path="/v2/auth",
                             both_schemes=True, blob_redirect="cdn"))
    digest, _ = seed(quay.registry, "prometheus/node-exporter")
    mirror = await mirror_for({"name": "quay.io", "url": quay.url})
    assert await pull(mirror, "quay.io", "prometheus/node-exporter") == digest
    assert len(quay.tokens.calls) == 1
    no_cdn_auth(quay)


@pytest.mark.parametrize("name", ["gcr.io", "europe-west1-docker.pkg.dev"])
async def test_google_json_key_and_relative_redirects(
        rig: Any, mirror_for: Any, tmp_path: Path, name: str) -> None:
    key = json.dumps({"type": "service_account", "private_key": "-----BEGIN..."})
    (tmp_path / "key.json").write_text(key + "\n")
    google = await rig(Dialect(scheme="bearer", service=name, realm_path="/v2/token",
                               anonymous=False, users={"_json_key": key},
                               blob_redirect="relative"))
    digest, _ = seed(google.registry, "my-project/repo/app")
    mirror = await mirror_for({"name": name, "url": google.url, "json_key_file": "key.json"})
    assert await pull(mirror, name, "my-project/repo/app") == digest
    assert google.registry.count("GET", "/storage/blobs/") == 3


async def test_gcr_oauth2_access_token(rig: Any, mirror_for: Any) -> None:
    gcr = await rig(Dialect(scheme="bearer", service="gcr.io", realm_path="/v2/token",
                            anonymous=False, users={"oauth2accesstoken": "ya29.token"}))
    digest, _ = seed(gcr.registry, "proj/app")
    mirror = await mirror_for({"name": "gcr.io", "url": gcr.url, "username": "oauth2accesstoken",
                               "password_env": "GCP_TOKEN"}, env={"GCP_TOKEN": "ya29.token"})
    assert await pull(mirror, "gcr.io", "proj/app") == digest


async def test_gcr_401_without_challenge_learns_it_from_the_ping(rig: Any,
                                                                mirror_for: Any) -> None:
    gcr = await rig(Dialect(scheme="bearer", service="gcr.io", realm_path="/v2/token",
                            challenge_on_ping_only=True))
    digest, _ = seed(gcr.registry, "proj/app")
    mirror = await mirror_for({"name": "gcr.io", "url": gcr.url})
    assert await pull(mirror, "gcr.io", "proj/app") == digest
    assert gcr.registry.count("GET", "/v2/") >= 1
    assert [r.path for r in gcr.registry.requests[:2]] == ["/v2/proj/app/manifests/v1", "/v2/"]


async def test_acr_access_token_field(rig: Any, mirror_for: Any) -> None:
    acr = await rig(Dialect(scheme="bearer", service="contoso.azurecr.io",
                            realm_path="/oauth2/token", token_fields=("access_token",),
                            anonymous=False, blob_redirect="cdn",
                            users={"00000000-0000-0000-0000-000000000000": "sp-secret"}))
    digest, _ = seed(acr.registry, "hello-world")
    mirror = await mirror_for({"name": "contoso.azurecr.io", "url": acr.url,
                               "username": "00000000-0000-0000-0000-000000000000",
                               "password_env": "ACR"}, env={"ACR": "sp-secret"})
    assert await pull(mirror, "contoso.azurecr.io", "hello-world") == digest
    no_cdn_auth(acr)


async def test_gitlab_token_from_another_host(rig: Any, mirror_for: Any) -> None:
    gitlab = await rig(Dialect(scheme="bearer", service="container_registry",
                               realm_path="/jwt/auth", separate_token_host=True,
                               users={"deploy-token-1": "gldt-secret"}, blob_redirect="cdn"))
    digest, _ = seed(gitlab.registry, "group/project/app")
    mirror = await mirror_for({"name": "registry.gitlab.com", "url": gitlab.url,
                               "username": "deploy-token-1", "password_env": "GL"},
                              env={"GL": "gldt-secret"})
    assert await pull(mirror, "registry.gitlab.com", "group/project/app") == digest
    assert gitlab.tokens.calls[0].headers["Authorization"].startswith("Basic ")
    no_cdn_auth(gitlab)


async def test_harbor_preset_by_key(rig: Any, mirror_for: Any) -> None:
    harbor = await rig(Dialect(scheme="bearer", service="harbor-registry",
                               realm_path="/service/token", expires_in=1800, issued_at=True,
                               users={"robot$mirror": "robot-secret"}))
    digest, _ = seed(harbor.registry, "library/app")
    mirror = await mirror_for({"name": "harbor", "preset": "harbor", "url": harbor.url,
                               "username": "robot$mirror", "password_env": "H"},
                              env={"H": "robot-secret"})
    assert await pull(mirror, "harbor", "library/app") == digest


async def test_nexus_basic(rig: Any, mirror_for: Any) -> None:
    nexus = await rig(Dialect(scheme="basic", basic_realm="Sonatype Nexus Repository Manager",
                              users={"mirror": "nexus-secret"}))
    digest, _ = seed(nexus.registry, "team/app")
    mirror = await mirror_for({"name": "nexus", "preset": "nexus", "url": nexus.url,
                               "username": "mirror", "password_env": "N"},
                              env={"N": "nexus-secret"})
    assert await pull(mirror, "nexus", "team/app") == digest


async def test_artifactory_api_path_and_token_realm_under_it(rig: Any, mirror_for: Any) -> None:
    prefix = "/artifactory/api/docker/docker-remote"
    art = await rig(Dialect(scheme="bearer", service="acme.jfrog.io",
                            realm_path=f"{prefix}/v2/token", api_prefix=prefix,
                            users={"ci": "art-token"}, blob_redirect="cdn"))
    digest, _ = seed(art.registry, "library/app")
    mirror = await mirror_for({"name": "acme.jfrog.io", "url": art.url, "username": "ci",
                               "password_env": "A"}, env={"A": "art-token"})
    assert await pull(mirror, "acme.jfrog.io", "library/app") == digest
    assert art.registry.count(contains=f"{prefix}/v2/library/app/manifests/") >= 1
    no_cdn_auth(art)


# --- registry.k8s.io: every request redirected to another registry ----------------------


async def test_k8s_redirects_to_another_registry_which_gets_its_own_token(
        rig: Any, mirror_for: Any) -> None:
    backend = await rig(Dialect(scheme="bearer", service="us-docker.pkg.dev",
                                realm_path="/v2/token", blob_redirect="cdn"))
    front = await rig(Dialect(scheme="bearer", service="registry.k8s.io",
                              redirect_all_to=backend.url,
                              redirect_repo_prefix="k8s-artifacts-prod/images/"))
    seed(front.registry, "pause")  # the front knows the name; the bytes live on the backend
    digest, _ = seed(backend.registry, "k8s-artifacts-prod/images/pause")
    # The real preset allows *-docker.pkg.dev; here the backend is on loopback.
    backend_host = URL(backend.url).raw_authority
    mirror = await mirror_for({"name": "registry.k8s.io", "url": front.url,
                               "redirect_hosts": [backend_host]})
    assert await pull(mirror, "registry.k8s.io", "pause") == digest
    front_tokens = {"Bearer " + t for t in front.tokens.granted}
    back_tokens = {"Bearer " + t for t in backend.tokens.granted}
    assert front_tokens and back_tokens
    # Each host saw only its own tokens: none was replayed to the other.
    assert {r.headers.get("Authorization") for r in backend.registry.requests} <= (
        back_tokens | {None})
    assert {r.headers.get("Authorization") for r in front.registry.requests} <= (
        front_tokens | {None})
    # The backend's token was asked for the backend's repository, by its own challenge.
    scope = URL(backend.tokens.calls[0].path).query["scope"]
    assert scope == "repository:k8s-artifacts-prod/images/pause:pull"
    no_cdn_auth(backend)


# --- generic OCI -----------------------------------------------------------------------


@pytest.mark.parametrize("dialect", [
    Dialect(),
    Dialect(scheme="basic", users={"u": "p"}),
    Dialect(scheme="bearer", service="reg.example.com", users={"u": "p"}),
], ids=["anonymous", "basic", "bearer"])
async def test_generic_registry(rig: Any, mirror_for: Any, dialect: Dialect) -> None:
    generic = await rig(dialect)
    digest, _ = seed(generic.registry, "team/app")
    upstream: dict[str, Any] = {"name": "reg.example.com", "url": generic.url}
    if dialect.users:
        upstream.update(username="u", password_env="P")
    mirror = await mirror_for(upstream, env={"P": "p"})
    assert await pull(mirror, "reg.example.com", "team/app") == digest


def test_presets_fill_defaults_and_explicit_keys_win() -> None:
    settings = config.parse({"upstreams": [
        {"name": "docker.io"},
        {"name": "ghcr.io", "url": "http://127.0.0.1:1", "aliases": []},
        {"name": "public.ecr.aws", "blob_probe": "head"},
        {"name": "registry.k8s.io"},
    ]}, env={})
    hub, ghcr, ecr_public, k8s = settings.upstreams
    assert (hub.preset, str(hub.url), hub.library_prefix) == (
        "dockerhub", "https://registry-1.docker.io", True)
    assert "index.docker.io" in hub.aliases
    assert (ghcr.preset, str(ghcr.url), ghcr.aliases) == ("ghcr", "http://127.0.0.1:1", ())
    assert (ecr_public.preset, ecr_public.blob_probe) == ("ecr-public", "head")
    assert (k8s.preset, str(k8s.url), k8s.aliases) == ("k8s", "https://registry.k8s.io",
                                                      ("k8s.gcr.io",))


async def test_cdn_refuses_authorization(aiohttp_client: Any) -> None:
    """The fake CDN itself: an Authorization header is refused and recorded."""
    cdn = Cdn({"sha256:x": b"x"})
    client = await aiohttp_client(cdn.app())
    response = await client.get("/blobs/sha256:x?X-Amz-Signature=s",
                                headers={"Authorization": "Bearer t"})
    assert response.status == 400
    assert cdn.violations == ["/blobs/sha256:x?X-Amz-Signature=s"]
    assert (await client.get("/blobs/sha256:x?X-Amz-Signature=s")).status == 200
