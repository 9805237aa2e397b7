"""Write cosign vulnerability attestations the way ``cosign attest --type vuln`` lays them
out, with keys made here: an in-toto statement (predicate type
``https://cosign.sigstore.dev/attestation/vuln/v1``, a Trivy JSON result inside) in a DSSE
envelope, as a layer of the ``sha256-<hex>.att`` manifest or in a keyed sigstore bundle.
For the tests and the benchmark."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from tests.support import cosign_sign as cs
from tests.support.cosign_push import OCI_MANIFEST, push_bundle
from tests.support.images import Blob
from tests.support.registry import Registry

VULN = "https://cosign.sigstore.dev/attestation/vuln/v1"
GENERIC = "https://cosign.sigstore.dev/attestation/v1"
DSSE_LAYER = "application/vnd.dsse.envelope.v1+json"
IN_TOTO = "application/vnd.in-toto+json"


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def trivy(severities: list[str]) -> dict[str, Any]:
    """A Trivy JSON result with one finding per severity given."""
    return {"SchemaVersion": 2, "ArtifactName": "registry.example/acme/app",
            "ArtifactType": "container_image",
            "Results": [{"Target": "debian 12", "Class": "os-pkgs", "Type": "debian",
                         "Vulnerabilities": [
                             {"VulnerabilityID": f"CVE-2026-{1000 + n}", "PkgName": "libfoo",
                              "InstalledVersion": "1.0", "Severity": sev}
                             for n, sev in enumerate(severities)]}]}


def vuln_predicate(severities: list[str], finished: float | None = None) -> dict[str, Any]:
    """cosign's vuln predicate around a Trivy result, the scan finished at ``finished``."""
    done = time.time() - 60 if finished is None else finished
    return {"invocation": {"parameters": None, "uri": "", "event_id": "", "builder.id": ""},
            "scanner": {"uri": "pkg:github/aquasecurity/trivy@v0.58.0", "version": "0.58.0",
                        "db": {"uri": "", "version": ""}, "result": trivy(severities)},
            "metadata": {"scanStartedOn": rfc3339(done - 30),
                         "scanFinishedOn": rfc3339(done)}}


def statement(digest: str, predicate: Any, predicate_type: str = VULN) -> bytes:
    """The in-toto statement (v0.1, as cosign attest writes it) about ``digest``."""
    return json.dumps({"_type": "https://in-toto.io/Statement/v0.1",
                       "predicateType": predicate_type,
                       "subject": [{"name": "registry.example/acme/app",
                                    "digest": {"sha256": digest.removeprefix("sha256:")}}],
                       "predicate": predicate}).encode()


def envelope(key: cs.PrivateKey, body: bytes) -> bytes:
    """The DSSE envelope cosign stores as a ``.att`` layer, signed over the PAE."""
    sig = cs.sign(key, cs.pae(IN_TOTO, body))
    return json.dumps({"payloadType": IN_TOTO, "payload": base64.b64encode(body).decode(),
                       "signatures": [{"keyid": "", "sig": base64.b64encode(sig).decode()}]
                       }).encode()


def att_manifest(layers: list[tuple[bytes, str]]) -> cs.SigImage:
    """The OCI manifest cosign pushes under ``sha256-<hex>.att``: (envelope, predicate)."""
    config = b"{}"
    blobs, descriptors = {}, []
    for body, predicate_type in layers:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        blobs[digest] = body
        descriptors.append({"mediaType": DSSE_LAYER, "size": len(body), "digest": digest,
                            "annotations": {"dev.cosignproject.cosign/signature": "",
                                            "predicateType": predicate_type}})
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "size": len(config),
                           "digest": "sha256:" + hashlib.sha256(config).hexdigest()},
                "layers": descriptors}
    return cs.SigImage(json.dumps(manifest).encode(), blobs)


def vuln_bundle(key: cs.PrivateKey, body: bytes, hint: str = "scanner") -> dict[str, Any]:
    """A keyed sigstore bundle v0.3 whose DSSE envelope holds the statement ``body``."""
    sig = cs.sign(key, cs.pae(IN_TOTO, body))
    return {"mediaType": cs.BUNDLE_V03,
            "verificationMaterial": {"publicKey": {"hint": hint}, "tlogEntries": []},
            "dsseEnvelope": {"payload": base64.b64encode(body).decode(),
                             "payloadType": IN_TOTO,
                             "signatures": [{"sig": base64.b64encode(sig).decode(),
                                             "keyid": ""}]}}


def push_att(registry: Registry, repo: str, digest: str, key: cs.PrivateKey, *,
             severities: list[str], finished: float | None = None,
             subject: str | None = None) -> str:
    """Push a ``.att`` manifest with one vuln report about ``subject`` (default ``digest``)
    for the image ``digest``; returns the ``.att`` manifest's digest."""
    body = statement(subject or digest, vuln_predicate(severities, finished))
    image = att_manifest([(envelope(key, body), VULN)])
    config = Blob.of(b"{}", "application/vnd.oci.image.config.v1+json")
    blobs = [config] + [Blob.of(data, DSSE_LAYER) for data in image.blobs.values()]
    manifest = Blob.of(image.manifest, OCI_MANIFEST)
    registry.push_raw(repo, blobs, [(manifest, digest.replace(":", "-", 1) + ".att")])
    return manifest.digest


def push_vuln_bundle(registry: Registry, repo: str, digest: str, size: int,
                     key: cs.PrivateKey, *, severities: list[str]) -> str:
    """Attach a keyed vuln-report bundle to ``digest`` (referrers tag schema)."""
    body = statement(digest, vuln_predicate(severities))
    return push_bundle(registry, repo, digest, size, document=vuln_bundle(key, body))
