"""A keyless sigstore bundle made by sigstore-js (``@sigstore/sign`` through
``@sigstore/mock``'s Fulcio and Rekor) attached to an image in real Distribution as a
referrer (the referrers tag schema: Distribution 2.8 has no referrers API), enforced by
a real mirror process (workers 1 and 2) whose policy names the identity and the mock's
trusted root: the image signed by the matching identity pulls with skopeo, digests
checked; the one signed by another identity gets ``403 DENIED``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_policy_sigstore_js import sigstore_js
from tests.support.cosign_push import push_bundle
from tests.support.images import Image, make_image, make_layer
from tests.support.mirrorproc import MirrorProcess, Mirrors
from tests.support.registry import Registry
from tests.support.skopeo import manifest_digest, skopeo_copy, verify_dir

pytestmark = pytest.mark.integration
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ISSUER = "https://token.actions.githubusercontent.com"
RELEASE = "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main"
STRANGER = "https://github.com/evil/app/.github/workflows/release.yml@refs/heads/main"


@pytest.fixture(scope="module")
def keyless(registry_token: Registry) -> tuple[dict[str, Image], dict[str, Any]]:
    images = {name: make_image(f"keyless/{name}", "v1", fmt="oci",
                               layers=[make_layer(3000 + i, seed=900 + i)])
              for i, name in enumerate(("ours", "theirs"))}
    for image in images.values():
        registry_token.push(image)
    (signed,) = sigstore_js([{"op": "keyless", "signings": [
        {"issuer": ISSUER, "subject": RELEASE, "digest": images["ours"].manifest.digest},
        {"issuer": ISSUER, "subject": STRANGER, "digest": images["theirs"].manifest.digest},
    ]}])
    for image, bundle in zip(images.values(), signed["bundles"], strict=True):
        push_bundle(registry_token, image.repo, image.manifest.digest, image.manifest.size,
                    document=bundle)
    return images, signed["trusted_root"]


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def mirror(request: pytest.FixtureRequest, registry_token: Registry,
           keyless: tuple[dict[str, Image], dict[str, Any]],
           mirrors: Mirrors, tmp_path: Path) -> MirrorProcess:
    (tmp_path / "root.json").write_text(json.dumps(keyless[1]))
    policy = {"trusted_root": str(tmp_path / "root.json"),
              "identities": [{"name": "ci", "issuer": ISSUER,
                              "subject_regex": "^https://github.com/acme/"}],
              "rules": [{"repositories": ["keyless/*"], "require": ["ci"]}]}
    return mirrors.start(registry_token.url, request.param, workdir="mirror", timeout=30,
                         policy=policy)


def test_a_keyless_bundle_referrer_is_enforced(
        mirror: MirrorProcess, keyless: tuple[dict[str, Image], dict[str, Any]],
        tmp_path: Path) -> None:
    ours, theirs = keyless[0]["ours"], keyless[0]["theirs"]
    for reference in ("v1", ours.manifest.digest):
        sep = ":" if reference == "v1" else "@"
        out = skopeo_copy(f"127.0.0.1:{mirror.port}/{ours.repo}{sep}{reference}",
                          tmp_path / f"ours-{sep}")
        assert manifest_digest(out) == ours.manifest.digest
        assert verify_dir(out) == {b.digest: b.size for b in ours.blobs()}
    request = urllib.request.Request(f"{mirror.url}/v2/{theirs.repo}/manifests/v1",
                                     headers={"Accept": ours.manifest.media_type})
    with pytest.raises(urllib.error.HTTPError) as refused:
        _DIRECT.open(request, timeout=30)
    assert refused.value.code == 403
    error = json.loads(refused.value.read())["errors"][0]
    assert error["code"] == "DENIED" and "no signature by ci" in error["message"]
