"""What a policy verdict costs (issue 22): the first verdict of an image, and a kept one,
side by side with the same call without a policy, in one run.

The call measured is the one the serving path will make per manifest answer: read the
signatures (the ``.sig`` manifest and payload blobs, or a bundle, already in memory: the
mirror's cache holds them), then :meth:`mirror.policy.VerdictCache.verdict`. Cases:

- ``no policy``: the same call with no ``policy:`` section (the baseline);
- ``keyed .sig, first``: a cosign ``.sig`` manifest with one ECDSA P-256 signature, a new
  verdict cache each time (parse, verify, payload check);
- ``keyed bundle, first``: a keyed DSSE bundle (sigstore bundle v0.3), likewise;
- ``keyless .sig, first``: a real keyless cosign signature (Fulcio certificate, chain,
  Rekor SET; from ``../shared/fixtures/cosign``) against sigstore's public trusted root;
- ``vuln report .att``: a rule with a ``vulnerabilities`` bar and no signature required;
  the image's ``.att`` holds one keyed cosign vulnerability attestation (DSSE, P-256) with
  a Trivy result of :data:`FINDINGS` findings (read, verified, severities counted);
- ``keyed .sig + vuln .att``: both asked by the rule (``require`` and ``vulnerabilities``);
- ``... kept``: the same image again, its verdict in the cache;
- ``countersigned .sig``: what answering cosign's ``sha256-<hex>.sig`` tag adds with
  ``policy.countersign_key`` (P-256, RFC 6979): first, the image's verdict and the mirror's
  signed manifest made (payload, signature, config, manifest); kept, the kept verdict and
  the made answer found again (the store's write, once per node, is not counted).

Figures are medians of ``--repeat`` runs of ``--iterations`` calls each; the ratio column
divides by the baseline. Usage::

    .venv/bin/python -m benchmarks.policy [--iterations 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from mirror.config import parse
from mirror.policy import (
    Policy,
    Signature,
    Unreadable,
    Verdict,
    VerdictCache,
    compile_policy,
    legacy_signature,
    parse_bundle,
    signature_layers,
)
from mirror.policy.countersign import Countersigned, Countersigner
from mirror.policy.vuln import attestation_layers, parse_attestation
from tests.support import cosign_attest as ca
from tests.support import cosign_sign as cs

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "cosign"
KEYLESS = FIXTURES / "containers-image/signature/fixtures/dir-img-cosign-fulcio-rekor-valid"
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()

#: The mirror's small hot answers per second in one worker (README, lean path): the cost
#: of one request that a kept verdict is added to.
REQUEST_RATE = 15_400

NO_POLICY = Verdict(True, None, "no policy")
#: Findings in the benchmark's vulnerability report (a middling image's Trivy result).
FINDINGS = 200

#: A case: what to call once per iteration (fresh state made outside the timing).
Case = Callable[[], Verdict]


def decide(cache: VerdictCache, policy: Policy | None, digest: str,
           read: Callable[[], list[Signature]], signature_set: str) -> Verdict:
    """The serving path's call: no policy -> allowed; else the verdict, the signatures
    read only when it is not kept (named by the digest of the .sig manifest)."""
    if policy is None:
        return NO_POLICY
    return cache.verdict(policy, "docker.io", "acme/app", digest, read,
                         signature_set=signature_set)


def read_sig(image: cs.SigImage) -> Callable[[], list[Signature]]:
    def read() -> list[Signature]:
        layers = signature_layers(image.manifest)
        assert not isinstance(layers, Unreadable)
        return [legacy_signature(layer, image.blobs[layer.digest]) for layer in layers]
    return read


def keyed_policy(folder: Path, key: cs.PrivateKey) -> Policy:
    (folder / "release.pub").write_bytes(cs.public_pem(key))
    settings = parse({"policy": {"keys": [{"name": "release", "file": "release.pub"}],
                                 "rules": [{"require": ["release"]}]}},
                     env={}, base=folder).policy
    assert settings is not None
    return compile_policy(settings)


def vuln_policy(folder: Path, key: cs.PrivateKey, *, signed: bool) -> Policy:
    (folder / "scanner.pub").write_bytes(cs.public_pem(key))
    rule: dict[str, object] = {"vulnerabilities": {"max_severity": "critical",
                                                   "max_age": "7d", "keys": ["scanner"]}}
    if signed:
        rule["require"] = ["scanner"]
    settings = parse({"policy": {"keys": [{"name": "scanner", "file": "scanner.pub"}],
                                 "rules": [rule]}}, env={}, base=folder).policy
    assert settings is not None
    return compile_policy(settings)


def read_att(key: cs.PrivateKey) -> Callable[[], list[Signature]]:
    """What the gate reads of a ``.att`` manifest with one vulnerability report."""
    severities = list(("LOW", "MEDIUM", "HIGH", "CRITICAL", "UNKNOWN") * (FINDINGS // 5))
    body = ca.statement(DIGEST, ca.vuln_predicate(severities))
    image = ca.att_manifest([(ca.envelope(key, body), ca.VULN)])

    def read() -> list[Signature]:
        layers = attestation_layers(image.manifest)
        assert not isinstance(layers, Unreadable)
        return [parse_attestation(layer, image.blobs[layer.digest]) for layer in layers]
    return read


def keyless_setup(folder: Path) -> tuple[Policy, str, Callable[[], list[Signature]]] | None:
    if not KEYLESS.is_dir():
        return None
    doc = json.loads((KEYLESS / "signature-1").read_bytes().partition(b"\n")[2])
    image = cs.sig_manifest([(base64.b64decode(doc["payload"]), doc["annotations"])])
    digest = "sha256:" + hashlib.sha256((KEYLESS / "manifest.json").read_bytes()).hexdigest()
    settings = parse({"policy": {
        "trusted_root": str(FIXTURES / "sigstore-python/trusted_root.json"),
        "identities": [{"name": "ci", "issuer": "https://github.com/login/oauth",
                        "subject": "mitr@redhat.com"}],
        "rules": [{"require": ["ci"]}]}}, env={}, base=folder).policy
    assert settings is not None
    return compile_policy(settings), digest, read_sig(image)


def cases(folder: Path) -> dict[str, tuple[Case, Case]]:
    """Each case: (first verdict, kept verdict); the baseline has no cache to warm."""
    key = cs.new_key("p256")
    policy = keyed_policy(folder, key)
    sig = read_sig(cs.sig_manifest([cs.legacy_layer(key, cs.payload(DIGEST))]))
    bundle_bytes = json.dumps(cs.dsse_bundle(key, DIGEST)).encode()

    def bundle() -> list[Signature]:
        return [parse_bundle(bundle_bytes)]

    att = read_att(key)

    def sig_and_att() -> list[Signature]:
        return [*sig(), *att()]

    found: dict[str, tuple[Policy | None, str, Callable[[], list[Signature]]]] = {
        "no policy": (None, DIGEST, sig),
        "keyed .sig": (policy, DIGEST, sig),
        "keyed bundle": (policy, DIGEST, bundle),
        "vuln report .att": (vuln_policy(folder, key, signed=False), DIGEST, att),
        "keyed .sig + vuln .att": (vuln_policy(folder, key, signed=True), DIGEST,
                                   sig_and_att),
    }
    keyless = keyless_setup(folder)
    if keyless is not None:
        found["keyless .sig"] = keyless
    out = {}
    for name, (pol, digest, read) in found.items():
        kept = VerdictCache()
        first_verdict = decide(kept, pol, digest, read, name)
        assert first_verdict.allowed, (name, first_verdict.reason)
        out[name] = (_first(pol, digest, read, name), _kept(kept, pol, digest, read, name))
    out["countersigned .sig"] = countersigned(policy, sig)
    return out


def countersigned(policy: Policy, read: Callable[[], list[Signature]]) -> tuple[Case, Case]:
    """The ``.sig`` answer of an image that passed, with the mirror's signature: (first, kept),
    as :meth:`mirror.pull.PullService.countersigned` makes it (the upstream reads aside)."""
    pem = cs.new_key("p256").private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
    signer = Countersigner(pem)
    upstream = cs.sig_manifest([cs.legacy_layer(cs.new_key(), cs.payload(DIGEST))]).manifest
    made: dict[tuple[str, str], Countersigned] = {}
    kept_verdicts = VerdictCache()

    def answer(verdicts: VerdictCache, memo: dict[tuple[str, str], Countersigned]) -> Verdict:
        verdict = decide(verdicts, policy, DIGEST, read, "countersigned")
        key = (DIGEST, "upstream")
        if verdict.allowed and key not in memo:
            memo[key] = signer.countersign("docker.io/acme/app", DIGEST, upstream)
        return verdict

    answer(kept_verdicts, made)
    return (lambda: answer(VerdictCache(), {}), lambda: answer(kept_verdicts, made))


def _first(pol: Policy | None, digest: str, read: Callable[[], list[Signature]],
           signature_set: str) -> Case:
    return lambda: decide(VerdictCache(), pol, digest, read, signature_set)


def _kept(cache: VerdictCache, pol: Policy | None, digest: str,
          read: Callable[[], list[Signature]], signature_set: str) -> Case:
    return lambda: decide(cache, pol, digest, read, signature_set)


def timed(calls: dict[tuple[str, str], tuple[Case, int]], repeat: int
          ) -> dict[tuple[str, str], float]:
    """Seconds per call of each case: the median over ``repeat`` rounds, each round running
    every case once in turn (so that a busy machine slows them all alike)."""
    runs: dict[tuple[str, str], list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, (call, iterations) in calls.items():
            began = time.perf_counter()
            for _ in range(iterations):
                call()
            runs[name].append((time.perf_counter() - began) / iterations)
    return {name: statistics.median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        calls: dict[tuple[str, str], tuple[Case, int]] = {}
        for name, (first, kept) in cases(Path(tmp)).items():
            if name == "no policy":
                calls[(name, "-")] = (kept, args.iterations * 20)
                continue
            calls[(name, "first")] = (first, args.iterations)
            calls[(name, "kept")] = (kept, args.iterations * 20)
        figures = timed(calls, args.repeat)
    baseline = figures[("no policy", "-")]
    rows = [(name, which, seconds) for (name, which), seconds in figures.items()]
    print("| case | verdict | µs per call | ms per call | x no policy |")
    print("| --- | --- | --- | --- | --- |")
    for name, which, seconds in rows:
        print(f"| {name} | {which} | {seconds * 1e6:,.1f} | {seconds * 1e3:.3f} | "
              f"{seconds / baseline:,.1f}x |")
    extra = max(0.0, *(s - baseline for (_, which), s in figures.items() if which == "kept"))
    print(f"\nfirst keyed verdict: {figures[('keyed .sig', 'first')] * 1e3:.2f} ms (.sig), "
          f"{figures[('keyed bundle', 'first')] * 1e3:.2f} ms (bundle); goal under 20 ms")
    print(f"first verdict with a vulnerability report ({FINDINGS} findings): "
          f"{figures[('vuln report .att', 'first')] * 1e3:.2f} ms; with a .sig too: "
          f"{figures[('keyed .sig + vuln .att', 'first')] * 1e3:.2f} ms")
    print(f"countersigned .sig: {figures[('countersigned .sig', 'first')] * 1e3:.2f} ms "
          f"first, {figures[('countersigned .sig', 'kept')] * 1e6:.1f} µs kept")
    if ("keyless .sig", "first") in figures:
        print(f"first keyless verdict: {figures[('keyless .sig', 'first')] * 1e3:.2f} ms; "
              "goal under 100 ms")
    print(f"kept verdict: at most {extra * 1e6:.1f} µs over no policy; on a request of "
          f"{1e6 / REQUEST_RATE:.0f} µs ({REQUEST_RATE:,} req/s, README) that is "
          f"{1 / (1 + extra * REQUEST_RATE):.3f}x the requests per second (goal 0.95x)")


if __name__ == "__main__":
    main()
