"""Client authentication, access rules, admin protection and repository membership.

In-process: the mirror app in front of the fake registry, which records every
request, so "touches nothing upstream" is a count.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import structlog
import yaml

from mirror import config, metrics
from mirror.cache.membership import Membership
from mirror.cli import main
from mirror.config.auth import ANONYMOUS
from mirror.errors import ConfigError
from mirror.server.auth import Authenticator, Identity, admin_allowed, allowed
from mirror.server.status import total
from tests.support.fake import FakeRegistry
from tests.unit.conftest import MirrorFactory

TOKEN = "ci-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def write_htpasswd(folder: Path, users: dict[str, str]) -> Path:
    """An htpasswd file of bcrypt entries (cost 4: fast tests, same format)."""
    path = folder / "htpasswd"
    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}"
             for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def auth_overrides(tmp_path: Path, *, anonymous: bool = False,
                   access: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    htpasswd = write_htpasswd(tmp_path, {"alice": "alice-pw", "bob": "bob-pw"})
    token_file = tmp_path / "ci.token"
    token_file.write_text(TOKEN + "\n")
    rules = access if access is not None else [
        {"who": ["user:alice"], "repositories": ["private/*", "public/*"]},
        {"who": ["group:readers", "user:ci"], "repositories": ["public/*"]},
        {"who": ["anonymous"], "repositories": ["open/*"]},
    ]
    return {"auth": {"htpasswd": str(htpasswd), "anonymous": anonymous,
                     "tokens": [{"name": "ci", "token_file": str(token_file)}],
                     "groups": {"readers": ["bob"]}},
            "access": rules, **extra}


def parse(document: dict[str, Any], tmp_path: Path) -> config.Settings:
    base = {"version": 1, "upstreams": [{"name": "reg.test", "url": "http://127.0.0.1:1",
                                         "default": True}]}
    return config.parse({**base, **document}, env={"T": TOKEN, "A": ADMIN_TOKEN}, base=tmp_path)


# --- config ---------------------------------------------------------------------------
def test_config_reads_auth_access_and_admin(tmp_path: Path) -> None:
    settings = parse(auth_overrides(tmp_path, admin={"listen": "127.0.0.1:9100",
                                                     "token_env": "A"}), tmp_path)
    assert settings.auth is not None
    assert settings.auth.groups_of("bob") == frozenset({"readers"})
    assert settings.auth.access[0].who == ("user:alice",)
    assert settings.auth.tokens[0].name == "ci"
    assert TOKEN not in repr(settings)
    assert settings.admin is not None and settings.admin.listen == ("127.0.0.1", 9100)


@pytest.mark.parametrize(("change", "key"), [
    ({"access": None}, "access"),
    ({"auth": None}, "access"),
    ({"access": [{"who": ["group:nobody"]}]}, "access[0].who[0]"),
    ({"access": [{"who": ["root"]}]}, "access[0].who[0]"),
    ({"access": [{"who": ["*"], "registries": ["other.io"]}]}, "access[0].registries[0]"),
    ({"access": [{"repositories": ["x"]}]}, "access[0].who"),
    ({"admin": {"listen": "127.0.0.1:5000"}}, "admin.listen"),
    ({"admin": {"token_env": "T", "listen": "0.0.0.0:9100", "extra": 1}}, "admin.extra"),
])
def test_config_errors_name_their_key(tmp_path: Path, change: dict[str, Any], key: str) -> None:
    document = {**auth_overrides(tmp_path), **change}
    document = {k: v for k, v in document.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        parse(document, tmp_path)
    assert caught.value.key == key


def test_config_refuses_weak_htpasswd_entries_and_short_tokens(tmp_path: Path) -> None:
    weak = tmp_path / "weak"
    weak.write_text("carol:$apr1$abc$0123456789012345678901\n")
    with pytest.raises(ConfigError, match="htpasswd -B"):
        parse({"auth": {"htpasswd": str(weak)}, "access": [{"who": ["*"]}]}, tmp_path)
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ConfigError, match="shorter than 16"):
        parse({"auth": {"tokens": [{"name": "x", "token_file": str(short)}]},
               "access": [{"who": ["*"]}]}, tmp_path)
    with pytest.raises(ConfigError, match="never put a token"):
        parse({"auth": {"tokens": [{"name": "x", "token": "inline-secret-0123456789"}]},
               "access": [{"who": ["*"]}]}, tmp_path)


# --- credentials and rules -------------------------------------------------------------
@pytest.fixture
def dave_line() -> str:
    """An entry written by Apache's own ``htpasswd -B`` (a ``$2y$`` hash)."""
    return subprocess.run(["htpasswd", "-Bbn", "dave", "dave-pw"], check=True,
                          capture_output=True, text=True).stdout.strip()


async def test_authenticator_accepts_htpasswd_B_entries_and_tokens(tmp_path: Path,
                                                                 dave_line: str) -> None:
    line = dave_line
    assert line.startswith("dave:$2y$")
    (tmp_path / "htpasswd").write_text(line + "\n")
    token_file = tmp_path / "t"
    token_file.write_text(TOKEN)
    settings = parse({"auth": {"htpasswd": str(tmp_path / "htpasswd"),
                               "tokens": [{"name": "ci", "token_file": str(token_file)}]},
                      "access": [{"who": ["*"]}]}, tmp_path)
    assert settings.auth is not None
    auth = Authenticator(settings.auth)
    assert (await auth.authenticate(basic("dave", "dave-pw")["Authorization"])).user == "dave"
    assert (await auth.authenticate(basic("dave", "dave-pw")["Authorization"])).user == "dave"
    assert (await auth.authenticate(f"Bearer {TOKEN}")).user == "ci"
    assert (await auth.authenticate(basic("ci", TOKEN)["Authorization"])).user == "ci"
    for wrong in (basic("dave", "nope")["Authorization"], "Bearer nope", basic("ci", "x")[
            "Authorization"], "Basic !!!", "Digest x", basic("eve", "dave-pw")["Authorization"]):
        with pytest.raises(Exception) as caught:
            await auth.authenticate(wrong)
        assert getattr(caught.value, "code", None) == "UNAUTHORIZED"
        assert 'Basic realm="mirror"' in caught.value.headers["WWW-Authenticate"]  # type: ignore[attr-defined]


async def test_htpasswd_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = write_htpasswd(tmp_path, {"alice": "one"})
    settings = parse({"auth": {"htpasswd": str(path), "cache_ttl": 0},
                      "access": [{"who": ["*"]}]}, tmp_path)
    assert settings.auth is not None
    auth = Authenticator(settings.auth)
    assert (await auth.authenticate(basic("alice", "one")["Authorization"])).user == "alice"
    write_htpasswd(tmp_path, {"alice": "two-longer"})
    assert (await auth.authenticate(basic("alice", "two-longer")["Authorization"])).user \
        == "alice"
    with pytest.raises(Exception, match="wrong credentials"):
        await auth.authenticate(basic("alice", "one")["Authorization"])


def test_rules_match_who_registry_and_repository_glob(tmp_path: Path) -> None:
    settings = parse(auth_overrides(tmp_path), tmp_path)
    assert settings.auth is not None
    rules = settings.auth.access
    alice = Identity("alice")
    bob = Identity("bob", frozenset({"readers"}))
    anon = Identity(ANONYMOUS, authenticated=False)
    assert allowed(rules, alice, "reg.test", "private/app")
    assert allowed(rules, alice, "reg.test", "private/deep/app")  # * crosses /
    assert not allowed(rules, bob, "reg.test", "private/app")
    assert allowed(rules, bob, "reg.test", "public/base")
    assert not allowed(rules, anon, "reg.test", "public/base")
    assert allowed(rules, anon, "reg.test", "open/x")
    assert not allowed(rules, Identity("anonymous"), "reg.test", "open/x")  # a user so named
    assert allowed(rules, bob, "reg.test", "")  # a ping
    only = parse({**auth_overrides(tmp_path), "access": [
        {"who": ["authenticated"], "registries": ["reg.test"], "repositories": "lib/*"}]},
        tmp_path).auth
    assert only is not None
    assert allowed(only.access, bob, "reg.test", "lib/a")
    assert not allowed(only.access, bob, "other", "lib/a")
    assert not allowed(only.access, anon, "reg.test", "lib/a")


def test_admin_token_as_bearer_or_basic_password(tmp_path: Path) -> None:
    settings = parse({"admin": {"token_env": "A"}}, tmp_path)
    assert admin_allowed(settings.admin, f"Bearer {ADMIN_TOKEN}")
    assert admin_allowed(settings.admin, basic("anyone", ADMIN_TOKEN)["Authorization"])
    assert not admin_allowed(settings.admin, "Bearer wrong")
    assert not admin_allowed(settings.admin, None)
    assert admin_allowed(None, None)


# --- over HTTP ------------------------------------------------------------------------
async def test_missing_or_wrong_credentials_get_401_and_touch_nothing_upstream(
        fake: FakeRegistry, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    fake.add_image("public/base", "v1", [b"layer"])
    client = await make_mirror(**auth_overrides(tmp_path))
    fake.requests.clear()
    for headers in ({}, basic("alice", "wrong"), {"Authorization": "Bearer wrong"}):
        for path in ("/v2/", "/v2/public/base/manifests/v1"):
            resp = await client.get(path, headers=headers)
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == 'Basic realm="mirror"'
            assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
    assert fake.requests == []
    resp = await client.get("/v2/", headers=basic("alice", "alice-pw"))
    assert resp.status == 200
    assert (await client.get("/healthz")).status == 200


async def test_access_rules_allow_deny_and_log_the_user(
        fake: FakeRegistry, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    fake.add_image("private/app", "v1", [b"secret layer"])
    fake.add_image("public/base", "v1", [b"public layer"])
    fake.add_image("open/x", "v1", [b"open layer"])
    client = await make_mirror(**auth_overrides(tmp_path, anonymous=True))
    with structlog.testing.capture_logs() as logs:
        ok = await client.get("/v2/private/app/manifests/v1",
                              headers={**basic("alice", "alice-pw"), "User-Agent": "test-agent/1"})
        assert ok.status == 200
        fake.requests.clear()
        denied = await client.get("/v2/private/app/manifests/v1", headers=basic("bob", "bob-pw"))
        assert denied.status == 403
        assert (await denied.json())["errors"][0]["code"] == "DENIED"
        anonymous = await client.get("/v2/private/app/manifests/v1")
        assert anonymous.status == 401  # may log in and try again
        assert "WWW-Authenticate" in anonymous.headers
        assert fake.requests == []
        assert (await client.get("/v2/open/x/manifests/v1")).status == 200
        assert (await client.get("/v2/public/base/manifests/v1",
                                 headers={"Authorization": f"Bearer {TOKEN}"})).status == 200
    lines = [e for e in logs if e.get("event") == "request"]
    assert [(e["user"], e["status"]) for e in lines] == [
        ("alice", 200), ("bob", 403), ("anonymous", 401), ("anonymous", 200), ("ci", 200)]
    assert lines[0]["user_agent"] == "test-agent/1"
    assert lines[0]["client"] == "127.0.0.1"
    text = repr(logs)
    assert "alice-pw" not in text and TOKEN not in text and "bob-pw" not in text


async def test_admin_token_guards_metrics_and_status(
        make_mirror: MirrorFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    client = await make_mirror(admin={"token_file": str(token_file)})
    for path in ("/metrics", "/"):
        resp = await client.get(path)
        assert resp.status == 401
        assert "mirror admin" in resp.headers["WWW-Authenticate"]
        assert (await client.get(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                ).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_with_auth_and_no_admin_section_pages_want_an_operator(
        make_mirror: MirrorFactory, tmp_path: Path) -> None:
    overrides = auth_overrides(tmp_path, anonymous=True)
    overrides["auth"]["admin_groups"] = ["readers"]  # bob is an operator, alice is not
    client = await make_mirror(**overrides)
    for path in ("/metrics", "/", "/admin/popular", "/admin/sync"):
        assert (await client.get(path)).status == 401
        assert (await client.get(path, headers=basic("alice", "alice-pw"))).status == 403
        assert (await client.get(path, headers=basic("bob", "bob-pw"))).status == 200
    local = (tmp_path / "cache" / "admin.token").read_text().strip()
    assert (await client.get("/metrics", headers={"Authorization": f"Bearer {local}"})
            ).status == 200


async def test_admin_listen_moves_metrics_and_status_off_the_main_port(
        make_mirror: MirrorFactory) -> None:
    client = await make_mirror(admin={"listen": "127.0.0.1:1"})  # the test port is another
    assert (await client.get("/metrics")).status == 404
    assert (await client.get("/")).status == 404
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/v2/")).status == 200


# --- private content ------------------------------------------------------------------
async def test_a_private_layer_is_not_served_under_another_repository(
        fake: FakeRegistry, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    password = tmp_path / "upstream.pw"
    password.write_text("upstream-secret")
    _digest, manifest = fake.add_image("private/app", "v1", [b"private layer bytes"])
    fake.add_image("public/base", "v1", [b"public layer bytes"])
    layer = next(d for d, data in fake.blobs.items() if data == b"private layer bytes")
    client = await make_mirror(upstream={"username": "bot", "password_file": str(password)},
                               **auth_overrides(tmp_path))
    alice, bob = basic("alice", "alice-pw"), basic("bob", "bob-pw")
    assert (await client.get("/v2/private/app/manifests/v1", headers=alice)).status == 200
    resp = await client.get(f"/v2/private/app/blobs/{layer}", headers=alice)
    assert resp.status == 200 and await resp.read() == b"private layer bytes"
    fake.requests.clear()
    # Distribution links blobs per repository: public/base does not hold this one.
    fake.fault(kind="status", path=f"/v2/public/base/blobs/{layer}", status=404)
    before = total(metrics.AUTH_FAILURES, reason="not_member")
    for method in ("GET", "HEAD"):
        resp = await client.request(method, f"/v2/public/base/blobs/{layer}", headers=bob)
        assert resp.status == 404
        if method == "GET":
            assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    # asked once (the refusal is remembered for negative_ttl), never fetched
    assert [r.method for r in fake.requests] == ["HEAD"]
    assert total(metrics.AUTH_FAILURES, reason="not_member") == before + 2
    # A repository that does hold it (upstream says so) is served from the cache.
    fake.requests.clear()
    fake.faults.clear()
    resp = await client.get(f"/v2/public/other/blobs/{layer}", headers=alice)
    assert resp.status == 200 and await resp.read() == b"private layer bytes"
    assert [r.method for r in fake.requests] == ["HEAD"]
    fake.requests.clear()
    assert (await client.get(f"/v2/public/other/blobs/{layer}", headers=alice)).status == 200
    assert fake.requests == []  # remembered
    assert manifest


async def test_membership_survives_a_restart(
        fake: FakeRegistry, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    password = tmp_path / "upstream.pw"
    password.write_text("upstream-secret")
    fake.add_image("private/app", "v1", [b"layer one"])
    layer = next(d for d, data in fake.blobs.items() if data == b"layer one")
    overrides = {"upstream": {"username": "bot", "password_file": str(password)}}
    first = await make_mirror(**overrides)
    assert (await first.get("/v2/private/app/manifests/v1")).status == 200
    assert await (await first.get(f"/v2/private/app/blobs/{layer}")).read() == b"layer one"
    fake.requests.clear()
    assert await (await first.get(f"/v2/private/app/blobs/{layer}")).read() == b"layer one"
    assert fake.requests == []  # cached
    await first.close()
    second = await make_mirror(**overrides)
    fake.requests.clear()
    assert (await second.get(f"/v2/private/app/blobs/{layer}")).status == 200
    assert fake.requests == []


async def test_upstream_without_credentials_serves_cached_blobs_under_any_name(
        fake: FakeRegistry, mirror: Any) -> None:
    fake.add_image("a/one", "v1", [b"shared public layer"])
    layer = next(d for d, data in fake.blobs.items() if data == b"shared public layer")
    assert (await mirror.get(f"/v2/a/one/blobs/{layer}")).status == 200
    fake.requests.clear()
    assert (await mirror.get(f"/v2/b/two/blobs/{layer}")).status == 200
    assert fake.requests == []


async def test_per_registry_figures_count_hits_and_bytes(
        fake: FakeRegistry, mirror: Any) -> None:
    fake.add_image("lib/app", "v1", [b"x" * 1000])
    layer = next(d for d, data in fake.blobs.items() if data == b"x" * 1000)
    results = total(metrics.REGISTRY_CACHE_RESULTS, registry="fake.test", kind="blob")
    served = total(metrics.REGISTRY_SERVED_BYTES, registry="fake.test")
    for _ in range(3):
        assert len(await (await mirror.get(f"/v2/lib/app/blobs/{layer}")).read()) == 1000
    hits = total(metrics.REGISTRY_CACHE_RESULTS, registry="fake.test", kind="blob", result="hit")
    assert await (await mirror.get(f"/v2/lib/app/blobs/{layer}")).read()
    assert total(metrics.REGISTRY_CACHE_RESULTS, registry="fake.test", kind="blob",
                 result="hit") == hits + 1
    assert total(metrics.REGISTRY_CACHE_RESULTS, registry="fake.test", kind="blob") \
        == results + 4
    assert total(metrics.REGISTRY_SERVED_BYTES, registry="fake.test") == served + 4000


async def test_cache_ls_and_du_print_json_by_registry(
        fake: FakeRegistry, make_mirror: MirrorFactory, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cache"
    mirror = await make_mirror()
    _digest, manifest = fake.add_image("lib/app", "v1", [b"a" * 3000])
    assert (await mirror.get("/v2/lib/app/manifests/v1")).status == 200
    for descriptor in json.loads(manifest)["layers"]:
        assert len(await (await mirror.get(f"/v2/lib/app/blobs/{descriptor['digest']}")
                          ).read()) == 3000
    config_file = tmp_path / "mirror.yaml"
    config_file.write_text(f"version: 1\nstorage: {{path: {root}}}\n"
                           "upstreams: [{name: fake.test, url: 'http://127.0.0.1:9', "
                           "default: true}, {name: other.test, url: 'http://127.0.0.1:9'}]\n")
    capsys.readouterr()

    def run(*args: str) -> Any:
        assert main(["cache", *args, "--json", "--config", str(config_file)]) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index("{"):])  # after any late server log line

    usage = await asyncio.to_thread(run, "du")
    assert usage["by_registry"]["fake.test"] == 3000 + len(manifest)
    assert usage["by_registry"]["other.test"] == 0
    assert usage["blob_bytes"] == 3000 and usage["manifests"] == 1
    listing = await asyncio.to_thread(run, "ls")
    assert [i["reference"] for i in listing["images"]["fake.test"]] == ["fake.test/lib/app:v1"]
    assert {c["kind"]: c["registries"] for c in listing["content"]} == {
        "blob": ["fake.test"], "manifest": ["fake.test"]}
    assert main(["cache", "du", "--config", str(config_file)]) == 0
    assert "fake.test" in capsys.readouterr().out


def test_the_example_config_block_parses_when_uncommented(tmp_path: Path) -> None:
    example = (Path(__file__).parents[2] / "config" / "mirror.example.yaml").read_text()
    block = example.split("# --- who may pull what", 1)[1].split("\n", 1)[1]
    text = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))
    write_htpasswd(tmp_path, {"alice": "x"})
    text = text.replace("/etc/mirror/htpasswd", str(tmp_path / "htpasswd"))
    document = {**yaml.safe_load(text), "version": 1,
                "upstreams": [{"name": "docker.io", "default": True}]}
    settings = config.parse(document, env={"MIRROR_CI_TOKEN": TOKEN,
                                           "MIRROR_ADMIN_TOKEN": ADMIN_TOKEN})
    assert settings.auth is not None and len(settings.auth.access) == 2
    assert settings.admin is not None and settings.admin.listen == ("127.0.0.1", 9100)


async def test_a_failing_membership_database_never_fails_a_pull(tmp_path: Path) -> None:
    membership = Membership(tmp_path / "membership.db")
    await asyncio.to_thread(membership.open)
    await membership.record("r", "a/b", ["sha256:1"])
    assert await membership.known("r", "a/b", "sha256:1")
    assert not await membership.known("r", "a/c", "sha256:1")
    assert membership._conn is not None
    membership._conn.execute("DROP TABLE members")  # as a corrupt file would fail
    with structlog.testing.capture_logs() as logs:
        assert not await membership.known("r", "x/y", "sha256:2")
        await membership.record("r", "x/y", ["sha256:2"])
    assert {e["event"] for e in logs} == {"membership_read_failed", "membership_write_failed"}
    assert await membership.known("r", "x/y", "sha256:2")  # learnt in memory all the same
    await asyncio.to_thread(membership.close)


async def test_with_an_admin_token_operators_may_still_log_in_as_users(
        make_mirror: MirrorFactory, tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token.secret"
    token_file.write_text(ADMIN_TOKEN)
    overrides = auth_overrides(tmp_path, admin={"token_file": str(token_file)})
    overrides["auth"]["admin_groups"] = ["readers"]  # bob
    client = await make_mirror(**overrides)
    assert (await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            ).status == 200
    assert (await client.get("/metrics", headers=basic("bob", "bob-pw"))).status == 200
    assert (await client.get("/metrics", headers=basic("alice", "alice-pw"))).status == 403
    wrong = await client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert wrong.status == 401 and "mirror admin" in wrong.headers["WWW-Authenticate"]
    # bob is an operator, but his rules hold public/* only: a warm of private/* is refused.
    refused = await client.post("/admin/warm", headers=basic("bob", "bob-pw"),
                                json={"refs": ["private/app:v1", "public/base:v1"]})
    assert refused.status == 403 and "private/app" in (await refused.text())
    bad = await client.post("/admin/warm", headers=basic("bob", "bob-pw"),
                            json={"refs": ["Not A Ref"]})
    assert bad.status == 400
