"""Credentials: docker config.json (auths, credHelpers, credsStore), ECR through a
real GetAuthorizationToken endpoint (moto's server), rotation when one is
rate-limited, and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from prometheus_client import REGISTRY

from mirror.config import DockerConfigCredential, EcrCredential
from mirror.errors import Denied
from mirror.upstream import ecr as ecr_module
from mirror.upstream.dockerconfig import DockerConfigSource, run_helper
from mirror.upstream.ecr import EcrSource
from tests.support.dialects import (
    DOCKER_HUB,
    Dialect,
    Rig,
    basic_header,
    pull,
    seed,
)
from tests.support.net import free_port

SECRET = "s3cr3t-never-logged"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


# --- docker config.json --------------------------------------------------------------


@pytest.mark.parametrize("entry", [
    {"auth": base64.b64encode(f"cfg-user:{SECRET}".encode()).decode()},
    {"username": "cfg-user", "password": SECRET},
], ids=["auth", "username-password"])
async def test_docker_config_auths(rig: Any, mirror_for: Any, tmp_path: Path,
                                   entry: dict[str, str]) -> None:
    nexus: Rig = await rig(Dialect(scheme="basic", users={"cfg-user": SECRET}))
    digest, _ = seed(nexus.registry, "team/app")
    # Docker writes the key as the host, or as a URL; both find the registry.
    key = "reg.example.com" if "auth" in entry else "https://reg.example.com/"
    config_json = write_config(tmp_path / "config.json", {"auths": {key: entry}})
    mirror = await mirror_for({"name": "reg.example.com", "url": nexus.url,
                               "docker_config": str(config_json)})
    assert await pull(mirror, "reg.example.com", "team/app") == digest
    assert all(r.headers.get("Authorization") == basic_header("cfg-user", SECRET)
               for r in nexus.registry.requests[1:])


@pytest.fixture
def helper_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``docker-credential-testhelper`` on PATH: logs its stdin, answers a fixed credential."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "helper.log"
    script = bin_dir / "docker-credential-testhelper"
    script.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 2
server=$(cat)
printf '%s\\n' "$server" >> {log}
[ -n "$HELPER_SLEEP" ] && sleep "$HELPER_SLEEP"
if [ -n "$HELPER_EMPTY" ]; then echo "credentials not found in native keychain"; exit 1; fi
if [ -n "$HELPER_FAIL" ]; then echo "secret-ish failure output"; exit 1; fi
printf '{{"ServerURL":"%s","Username":"helper-user","Secret":"{SECRET}"}}' "$server"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield log


@pytest.mark.parametrize("style", ["credHelpers", "credsStore"])
async def test_docker_config_helper_for_docker_hub(
        rig: Any, mirror_for: Any, tmp_path: Path, helper_bin: Path, style: str) -> None:
    hub: Rig = await rig(Dialect(**{**DOCKER_HUB.__dict__, "users": {"helper-user": SECRET}}))
    digest, _ = seed(hub.registry, "library/nginx")
    document: dict[str, Any] = ({"credHelpers": {"https://index.docker.io/v1/": "testhelper"}}
                                if style == "credHelpers" else {"credsStore": "testhelper"})
    document["auths"] = {"https://index.docker.io/v1/": {"auth": "bm90OnVzZWQ="}}
    config_json = write_config(tmp_path / "config.json", document)
    mirror = await mirror_for({"name": "docker.io", "url": hub.url, "default": True,
                               "docker_config": str(config_json)})
    assert await pull(mirror, "docker.io", "nginx") == digest
    # The helper got the server the way Docker sends it, and its answer reached the realm.
    assert lines(helper_bin) == ["https://index.docker.io/v1/"]
    assert hub.tokens.calls[0].headers["Authorization"] == basic_header("helper-user", SECRET)


async def test_docker_hub_entry_written_as_docker_io(rig: Any, mirror_for: Any,
                                                    tmp_path: Path) -> None:
    """podman (auth.json) and some tools key Docker Hub as docker.io."""
    hub: Rig = await rig(Dialect(**{**DOCKER_HUB.__dict__, "users": {"cfg-user": SECRET}}))
    digest, _ = seed(hub.registry, "library/nginx")
    config_json = write_config(tmp_path / "auth.json", {"auths": {"docker.io": {
        "auth": base64.b64encode(f"cfg-user:{SECRET}".encode()).decode()}}})
    mirror = await mirror_for({"name": "docker.io", "url": hub.url,
                               "docker_config": str(config_json)})
    assert await pull(mirror, "docker.io", "library/nginx") == digest
    assert hub.tokens.calls[0].headers["Authorization"] == basic_header("cfg-user", SECRET)


async def test_helper_runs_once_while_its_answer_is_fresh(helper_bin: Path,
                                                          tmp_path: Path) -> None:
    config_json = write_config(tmp_path / "c.json", {"credHelpers": {"ghcr.io": "testhelper"}})
    source = DockerConfigSource(DockerConfigCredential("h", config_json, "ghcr.io"), "ghcr.io")
    values = await asyncio.gather(*(source.authorization() for _ in range(5)))
    assert len({v.reveal() if v else None for v in values}) == 1
    assert lines(helper_bin) == ["ghcr.io"]
    source.invalidate()
    await source.authorization()
    assert lines(helper_bin) == ["ghcr.io", "ghcr.io"]


async def test_helper_timeout_missing_and_no_entry(helper_bin: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELPER_SLEEP", "5")
    with pytest.raises(Denied, match="did not answer within"):
        await asyncio.wait_for(run_helper("testhelper", "ghcr.io", 0.3), 3)
    with pytest.raises(Denied, match="cannot run"):
        await run_helper("nosuchhelper", "ghcr.io", 1)
    monkeypatch.delenv("HELPER_SLEEP")
    monkeypatch.setenv("HELPER_FAIL", "1")
    with pytest.raises(Denied, match=r"failed \(exit 1\)") as failed:
        await run_helper("testhelper", "ghcr.io", 3)
    assert "secret-ish" not in str(failed.value)
    monkeypatch.setenv("HELPER_EMPTY", "1")  # Docker goes anonymous on this answer
    assert await run_helper("testhelper", "ghcr.io", 3) is None
    config_json = write_config(tmp_path / "c.json", {"auths": {"quay.io": {"auth": "eDp5"}}})
    source = DockerConfigSource(DockerConfigCredential("h", config_json, "ghcr.io"), "ghcr.io")
    assert await source.authorization() is None  # nothing for this server: anonymous


# --- ECR through moto's server --------------------------------------------------------

ECR_HOST = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The standard AWS chain finds these environment credentials and nothing else."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


async def test_ecr_credentials_from_get_authorization_token_refreshed_before_expiry(
        rig: Any, mirror_for: Any, moto_url: str, aws_env: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # moto issues "AWS:<account>-auth-token" expiring at 2015-01-01T00:00Z, always; the
    # wall clock starts 2h before that, and the refresh margin is 1h.
    expires = 1420070400.0
    now = [expires - 7200.0]
    monkeypatch.setattr(ecr_module, "wall_time", lambda: now[0])
    ecr: Rig = await rig(Dialect(scheme="basic", basic_realm=f"https://{ECR_HOST}/",
                                 users={"AWS": "123456789012-auth-token"}, blob_redirect="cdn"))
    digest, _ = seed(ecr.registry, "team/app")
    seed(ecr.registry, "team/other")
    mirror = await mirror_for({"name": ECR_HOST, "url": ecr.url,
                               "ecr": {"endpoint_url": moto_url, "refresh_margin": "1h"}})
    labels = {"registry": ECR_HOST, "source": "ecr", "result": "ok"}
    before = sample("mirror_upstream_credential_fetches_total", **labels)
    assert await pull(mirror, ECR_HOST, "team/app") == digest
    # One token for the whole pull (401, then manifest and three blobs with it).
    assert sample("mirror_upstream_credential_fetches_total", **labels) == before + 1
    # Inside the margin, though the token has not expired yet: fetched again before use.
    now[0] = expires - 3600.0 + 1
    response = await mirror.get(f"/v2/team/other/manifests/v1?ns={ECR_HOST}")
    assert response.status == 200
    assert sample("mirror_upstream_credential_fetches_total", **labels) == before + 2
    expected = basic_header("AWS", "123456789012-auth-token")
    assert [r.headers.get("Authorization") for r in ecr.registry.requests] == [None] + [
        expected] * (len(ecr.registry.requests) - 1)
    assert ecr.cdn.violations == [] and len(ecr.cdn.requests) == 3


async def test_ecr_preset_needs_no_credentials_config(moto_url: str, aws_env: None) -> None:
    from mirror import config  # noqa: PLC0415

    [upstream] = config.parse({"upstreams": [{"name": ECR_HOST}]}, env={}).upstreams
    assert (upstream.preset, str(upstream.url)) == ("ecr", f"https://{ECR_HOST}")
    [cred] = upstream.credentials
    assert isinstance(cred, EcrCredential)
    assert (cred.region, cred.registry_id) == ("eu-west-1", None)
    source = EcrSource(EcrCredential("e", "eu-west-1", "123456789012", moto_url, None, 0),
                       "ecr", wall_clock=lambda: 0.0)
    value = await source.authorization()
    assert value is not None
    assert value.reveal() == basic_header("AWS", "123456789012-auth-token")


async def test_ecr_public_token_from_the_ecr_public_api(
        rig: Any, mirror_for: Any, aws_env: None, aiohttp_server: Any) -> None:
    """moto has no ecr-public; a fake of its JSON API checks the SigV4 scope instead."""
    calls: list[dict[str, str]] = []

    async def api(request: web.Request) -> web.Response:
        calls.append(dict(request.headers))
        token = base64.b64encode(b"AWS:public-password").decode()
        body = {"authorizationData": {"authorizationToken": token, "expiresAt": 4102444800}}
        return web.json_response(body, content_type="application/x-amz-json-1.1")

    app = web.Application()
    app.router.add_post("/", api)
    api_server = await aiohttp_server(app)
    ecr: Rig = await rig(Dialect(scheme="bearer", service="public.ecr.aws", realm_path="/token/",
                                 users={"AWS": "public-password"}))
    digest, _ = seed(ecr.registry, "org/tool")
    mirror = await mirror_for({"name": "public.ecr.aws", "url": ecr.url, "ecr": {
        "endpoint_url": str(api_server.make_url("")).rstrip("/")}})
    assert await pull(mirror, "public.ecr.aws", "org/tool") == digest
    [call] = calls
    assert call["X-Amz-Target"] == "SpencerFrontendService.GetAuthorizationToken"
    assert "/us-east-1/ecr-public/aws4_request" in call["Authorization"]
    assert ecr.tokens.calls[0].headers["Authorization"] == basic_header("AWS", "public-password")


# --- rotation --------------------------------------------------------------------------


def two_accounts(env: dict[str, str]) -> dict[str, Any]:
    env.update(A="pass-a", B="pass-b")
    return {"credentials": [{"username": "bot-a", "password_env": "A", "label": "a"},
                            {"username": "bot-b", "password_env": "B", "label": "b"}]}


async def test_rotation_on_429(rig: Any, mirror_for: Any) -> None:
    hub: Rig = await rig(Dialect(**{**DOCKER_HUB.__dict__,
                                    "users": {"bot-a": "pass-a", "bot-b": "pass-b"}}))
    digest, _ = seed(hub.registry, "library/nginx")
    hub.registry.limited.add("bot-a")
    env: dict[str, str] = {}
    mirror = await mirror_for({"name": "docker.io", "url": hub.url, **two_accounts(env),
                               "max_retry_wait": "1s"}, env=env)
    before = sample("mirror_upstream_credential_rotations_total", registry="docker.io",
                    reason="429")
    assert await pull(mirror, "docker.io", "library/nginx") == digest
    assert sample("mirror_upstream_credential_rotations_total", registry="docker.io",
                  reason="429") == before + 1
    users = [hub.tokens.owner.get(r.headers.get("Authorization", "")[7:])
             for r in hub.registry.requests if "/manifests/" in r.path]
    assert users[-1] == "bot-b"
    assert "bot-a" in users


async def test_rotation_when_ratelimit_remaining_reaches_zero(rig: Any, mirror_for: Any) -> None:
    hub: Rig = await rig(Dialect(**{**DOCKER_HUB.__dict__,
                                    "users": {"bot-a": "pass-a", "bot-b": "pass-b"}}))
    first, _ = seed(hub.registry, "library/nginx")
    second, _ = seed(hub.registry, "library/redis")
    hub.registry.remaining.update({"bot-a": 1, "bot-b": 100})
    env: dict[str, str] = {}
    mirror = await mirror_for({"name": "docker.io", "url": hub.url, **two_accounts(env)},
                              env=env)
    before = sample("mirror_upstream_credential_rotations_total", registry="docker.io",
                    reason="remaining")
    assert await pull(mirror, "docker.io", "library/nginx") == first  # bot-a: 0 left
    assert await pull(mirror, "docker.io", "library/redis") == second
    assert sample("mirror_upstream_credential_rotations_total", registry="docker.io",
                  reason="remaining") == before + 1
    assert hub.registry.remaining == {"bot-a": 0, "bot-b": 99}


async def test_every_credential_limited_is_toomanyrequests_after_one_rotation(
        rig: Any, mirror_for: Any) -> None:
    hub: Rig = await rig(Dialect(**{**DOCKER_HUB.__dict__,
                                    "users": {"bot-a": "pass-a", "bot-b": "pass-b"}}))
    seed(hub.registry, "library/nginx")
    hub.registry.limited.update({"bot-a", "bot-b"})
    env: dict[str, str] = {}
    mirror = await mirror_for({"name": "docker.io", "url": hub.url, **two_accounts(env),
                               "retries": 3, "max_retry_wait": "1s"}, env=env)
    before = sample("mirror_upstream_credential_rotations_total", registry="docker.io",
                    reason="429")
    response = await mirror.get("/v2/library/nginx/manifests/v1?ns=docker.io")
    assert response.status == 429
    assert (await response.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert response.headers["Retry-After"] == "3600"
    assert sample("mirror_upstream_credential_rotations_total", registry="docker.io",
                  reason="429") == before + 1
    assert hub.registry.count("GET", "/manifests/v1") == 3  # anonymous 401, bot-a, bot-b


async def test_rejected_docker_config_credential_is_read_again(
        rig: Any, mirror_for: Any, tmp_path: Path) -> None:
    """After `docker login` with a new password, a 401 makes the mirror re-read the file."""
    reg: Rig = await rig(Dialect(scheme="basic", users={"u": "old"}))
    first, _ = seed(reg.registry, "team/app")
    second, _ = seed(reg.registry, "team/other")
    path = write_config(tmp_path / "config.json", {"auths": {"reg.example.com": {
        "username": "u", "password": "old"}}})
    mirror = await mirror_for({"name": "reg.example.com", "url": reg.url,
                               "docker_config": str(path)})
    assert await pull(mirror, "reg.example.com", "team/app") == first
    reg.registry.dialect.users["u"] = "new"
    write_config(path, {"auths": {"reg.example.com": {"username": "u", "password": "new"}}})
    assert await pull(mirror, "reg.example.com", "team/other") == second


async def test_secrets_never_logged(rig: Any, mirror_for: Any, tmp_path: Path) -> None:
    hub: Rig = await rig(Dialect(**{**DOCKER_HUB.__dict__, "users": {"bot": SECRET}}))
    seed(hub.registry, "library/nginx")
    hub.registry.limited.add("bot")
    with structlog.testing.capture_logs() as logs:
        mirror = await mirror_for({"name": "docker.io", "url": hub.url, "username": "bot",
                                   "password_env": "S", "max_retry_wait": "1s"},
                                  env={"S": SECRET})
        response = await mirror.get("/v2/library/nginx/manifests/v1?ns=docker.io")
        assert response.status == 429
        assert SECRET not in await response.text()
    text = repr(logs)
    encoded = base64.b64encode(f"bot:{SECRET}".encode()).decode()
    assert SECRET not in text and encoded not in text
    assert not any(t in text for t in hub.tokens.granted)
