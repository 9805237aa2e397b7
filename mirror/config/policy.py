"""The ``policy`` section: who must have signed what, and what is refused outright.

::

    policy:
      keys:                        # public keys (PEM): ECDSA P-256/384, Ed25519, RSA
        - {name: release, file: cosign.pub}          # tlog: true asks for a Rekor entry too
      identities:                  # keyless: Fulcio certificates, checked with trusted_root
        - {name: ci, issuer: "https://token.actions.githubusercontent.com",
           subject_regex: "^https://github.com/acme/"}
      trusted_root: trusted_root.json                # sigstore trusted root, read offline
      rules:                       # first match wins; registries/repositories as in access:
        - {registries: [docker.io], repositories: ["acme/*"], require: [release, ci]}
        - {repositories: ["library/bad-*"], deny: true}
        - {digests: ["sha256:..."], deny: true, mode: warn}
      default: allow               # what no rule matches: allow or deny
      countersign_key: mirror.key  # PEM private key: images that pass get the mirror's
                                   # own cosign signature too (mirror/policy/countersign.py)

The files are read here, once, so that the policy box (:mod:`mirror.policy`) works on bytes
and a bad key or root is a one-line error naming its key path at start.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mirror.config.values import (
    _bool,
    _existing_file,
    _list,
    _mapping,
    _one_or_more,
    _only_keys,
    _rule_scope,
    _string,
)
from mirror.config.vulnerabilities import VulnerabilityBar, parse_vulnerabilities
from mirror.errors import ConfigError

MODES = ("enforce", "warn")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_FILE = 1024 * 1024


@dataclass(frozen=True)
class PolicyKey:
    """A signer known by its public key; ``tlog`` also asks for a Rekor entry (SET)."""

    name: str
    file: Path
    pem: bytes = field(repr=False)
    tlog: bool = False


@dataclass(frozen=True)
class PolicyIdentity:
    """A keyless signer: Fulcio certificates of this OIDC ``issuer`` (exact) whose subject
    (SAN email or URI) is ``subject`` or matches ``subject_regex`` (searched, as cosign's
    ``--certificate-identity-regexp``)."""

    name: str
    issuer: str
    subject: str | None = None
    subject_regex: str | None = None


@dataclass(frozen=True)
class PolicyRule:
    """One rule: which images (registries, repository globs, digests) and what they need.

    ``require`` names keys or identities (any one suffices); ``deny`` refuses outright; a
    rule with neither allows. ``vulnerabilities`` also asks for a signed, fresh report
    (:mod:`mirror.config.vulnerabilities`). ``mode: warn`` serves what fails, with a warning.
    """

    registries: tuple[str, ...] = ("*",)
    repositories: tuple[str, ...] = ("*",)
    digests: tuple[str, ...] = ()
    require: tuple[str, ...] = ()
    deny: bool = False
    mode: str = "enforce"
    vulnerabilities: VulnerabilityBar | None = None


@dataclass(frozen=True)
class PolicySettings:
    """``policy``: the signers, the trust root, the rules and the default."""

    keys: tuple[PolicyKey, ...] = ()
    identities: tuple[PolicyIdentity, ...] = ()
    trusted_root: Path | None = None
    trusted_root_json: bytes = field(default=b"", repr=False)
    rules: tuple[PolicyRule, ...] = ()
    default: str = "allow"
    countersign_key: Path | None = None
    countersign_pem: bytes = field(default=b"", repr=False)


def _policy(value: Any, registries: tuple[str, ...], base: Path) -> PolicySettings | None:
    """The ``policy`` section, validated; ``None`` when absent."""
    if value is None:
        return None
    policy = _mapping(value, "policy")
    _only_keys(policy, "policy", {"keys", "identities", "trusted_root", "rules", "default",
                                  "countersign_key"})
    keys = tuple(_key(raw, f"policy.keys[{i}]", base)
                 for i, raw in enumerate(_list(policy.get("keys", []), "policy.keys")))
    identities = tuple(_identity(raw, f"policy.identities[{i}]") for i, raw
                       in enumerate(_list(policy.get("identities", []), "policy.identities")))
    _unique([k.name for k in keys] + [i.name for i in identities], keys, identities)
    root_path, root_json = _trusted_root(policy.get("trusted_root"), base)
    if identities and root_path is None:
        raise ConfigError("policy.trusted_root", "required with identities: the sigstore "
                          "trusted_root.json their certificates and Rekor entries chain to")
    if any(k.tlog for k in keys) and root_path is None:
        raise ConfigError("policy.trusted_root", "required by a key with tlog: true "
                          "(its Rekor key)")
    names = {k.name for k in keys} | {i.name for i in identities}
    rules = tuple(_rule(raw, f"policy.rules[{i}]", registries, names)
                  for i, raw in enumerate(_list(policy.get("rules", []), "policy.rules")))
    default = _string(policy.get("default", "allow"), "policy.default").lower()
    if default not in ("allow", "deny"):
        raise ConfigError("policy.default", f"expected allow or deny, got {default!r}")
    sign_path, sign_pem = _countersign_key(policy.get("countersign_key"), base)
    return PolicySettings(keys=keys, identities=identities, trusted_root=root_path,
                          trusted_root_json=root_json, rules=rules, default=default,
                          countersign_key=sign_path, countersign_pem=sign_pem)


def _countersign_key(value: Any, base: Path) -> tuple[Path | None, bytes]:
    """``policy.countersign_key``: the mirror's private key (PEM, unencrypted), or none."""
    if value is None:
        return None, b""
    key = "policy.countersign_key"
    path = _existing_file(value, key, base)
    pem = path.read_bytes()[:_MAX_FILE]
    if pem.count(b"-----BEGIN ") != 1:
        raise ConfigError(key, f"{path}: expected one PEM private key "
                          "(-----BEGIN PRIVATE KEY-----)")
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(key, f"{path}: the private key is encrypted: give it unencrypted "
                          "(readable by the mirror only, mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(key, f"{path}: not a PEM private key") from None
    if not ((isinstance(loaded, ec.EllipticCurvePrivateKey)
             and isinstance(loaded.curve, (ec.SECP256R1, ec.SECP384R1)))
            or isinstance(loaded, ed25519.Ed25519PrivateKey)
            or (isinstance(loaded, rsa.RSAPrivateKey) and loaded.key_size >= 2048)):
        raise ConfigError(key, f"{path}: expected an ECDSA P-256/384, Ed25519 or RSA (2048+) "
                          "private key")
    return path, pem


def _name(value: Any, key: str) -> str:
    text = _string(value, key)
    if _NAME_RE.fullmatch(text) is None:
        raise ConfigError(key, f"expected a name of letters, digits, '.', '_' or '-', "
                          f"got {text!r}")
    return text


def _unique(names: list[str], keys: tuple[PolicyKey, ...],
            identities: tuple[PolicyIdentity, ...]) -> None:
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            where = f"policy.keys[{index}]" if index < len(keys) \
                else f"policy.identities[{index - len(keys)}]"
            raise ConfigError(f"{where}.name", f"{name!r} is already the name of a key or "
                              "identity")
        seen.add(name)
    del identities


def _key(raw: Any, key: str, base: Path) -> PolicyKey:
    item = _mapping(raw, key)
    _only_keys(item, key, {"name", "file", "tlog"})
    if "name" not in item or "file" not in item:
        raise ConfigError(key, "needs a name and a file (a PEM public key)")
    path = _existing_file(item["file"], f"{key}.file", base)
    pem = path.read_bytes()[:_MAX_FILE]
    _check_public_key(pem, f"{key}.file")
    return PolicyKey(name=_name(item["name"], f"{key}.name"), file=path, pem=pem,
                     tlog=_bool(item.get("tlog", False), f"{key}.tlog"))


def _check_public_key(pem: bytes, key: str) -> None:
    if pem.count(b"-----BEGIN ") != 1:
        raise ConfigError(key, "expected one PEM public key (-----BEGIN PUBLIC KEY-----)")
    try:
        loaded = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(key, "not a PEM public key") from None
    curves = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
    if not ((isinstance(loaded, ec.EllipticCurvePublicKey) and isinstance(loaded.curve, curves))
            or isinstance(loaded, ed25519.Ed25519PublicKey)
            or (isinstance(loaded, rsa.RSAPublicKey) and loaded.key_size >= 2048)):
        raise ConfigError(key, "expected an ECDSA P-256/384/521, Ed25519 or RSA (2048+) key")


def _identity(raw: Any, key: str) -> PolicyIdentity:
    item = _mapping(raw, key)
    _only_keys(item, key, {"name", "issuer", "subject", "subject_regex"})
    if "name" not in item or "issuer" not in item:
        raise ConfigError(key, "needs a name and an issuer (the OIDC issuer URL)")
    if ("subject" in item) == ("subject_regex" in item):
        raise ConfigError(key, "give subject or subject_regex (one of them)")
    regex = None
    if "subject_regex" in item:
        regex = _string(item["subject_regex"], f"{key}.subject_regex")
        try:
            re.compile(regex)
        except re.error as exc:
            raise ConfigError(f"{key}.subject_regex", f"not a regular expression: {exc}") \
                from None
    subject = _string(item["subject"], f"{key}.subject") if "subject" in item else None
    return PolicyIdentity(name=_name(item["name"], f"{key}.name"),
                          issuer=_string(item["issuer"], f"{key}.issuer"),
                          subject=subject, subject_regex=regex)


def _trusted_root(value: Any, base: Path) -> tuple[Path | None, bytes]:
    if value is None:
        return None, b""
    key = "policy.trusted_root"
    path = _existing_file(value, key, base)
    data = path.read_bytes()
    if len(data) > _MAX_FILE:
        raise ConfigError(key, f"{path} is larger than 1MiB: not a trusted root")
    try:
        doc = json.loads(data)
    except ValueError:
        raise ConfigError(key, f"{path} is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("certificateAuthorities"), list) \
            or not isinstance(doc.get("tlogs"), list):
        raise ConfigError(key, f"{path} is not a sigstore trusted_root.json "
                          "(no certificateAuthorities and tlogs)")
    _check_root_material(doc, key, path)
    return path, data


def _check_root_material(doc: dict[str, Any], key: str, path: Path) -> None:
    """Every CA certificate and log key of a trusted root loads (named by its place)."""
    for i, ca in enumerate(doc["certificateAuthorities"]):
        certs = (ca.get("certChain") or {}).get("certificates") if isinstance(ca, dict) else None
        if not isinstance(certs, list) or not certs:
            raise ConfigError(key, f"{path}: certificateAuthorities[{i}] has no certChain")
        for j, cert in enumerate(certs):
            try:
                x509.load_der_x509_certificate(base64.b64decode(cert["rawBytes"]))
            except (ValueError, TypeError, KeyError):
                raise ConfigError(key, f"{path}: certificateAuthorities[{i}] certificate "
                                  f"{j} does not load") from None
    for i, log in enumerate(doc["tlogs"]):
        try:
            serialization.load_der_public_key(base64.b64decode(log["publicKey"]["rawBytes"]))
        except (ValueError, TypeError, KeyError, UnsupportedAlgorithm):
            raise ConfigError(key, f"{path}: tlogs[{i}] has no public key that loads") \
                from None


def _rule(raw: Any, key: str, registries: tuple[str, ...], names: set[str]) -> PolicyRule:
    item = _mapping(raw, key)
    _only_keys(item, key, {"registries", "repositories", "digests", "require", "deny", "mode",
                           "vulnerabilities"})
    regs, repos = _rule_scope(item, key, registries)
    digests = tuple(_digest(d, f"{key}.digests[{i}]") for i, d
                    in enumerate(_one_or_more(item["digests"], f"{key}.digests"))) \
        if "digests" in item else ()
    require = tuple(_signer(n, f"{key}.require[{i}]", names) for i, n
                    in enumerate(_one_or_more(item["require"], f"{key}.require"))) \
        if "require" in item else ()
    deny = _bool(item.get("deny", False), f"{key}.deny")
    if deny and require:
        raise ConfigError(key, "give require or deny: true, not both")
    vulns = parse_vulnerabilities(item["vulnerabilities"], f"{key}.vulnerabilities", names) \
        if "vulnerabilities" in item else None
    if deny and vulns is not None:
        raise ConfigError(key, "give vulnerabilities or deny: true, not both")
    mode = _string(item.get("mode", "enforce"), f"{key}.mode").lower()
    if mode not in MODES:
        raise ConfigError(f"{key}.mode", f"expected enforce or warn, got {mode!r}")
    return PolicyRule(registries=regs, repositories=repos, digests=digests, require=require,
                      deny=deny, mode=mode, vulnerabilities=vulns)


def _digest(value: Any, key: str) -> str:
    text = _string(value, key)
    if _DIGEST_RE.fullmatch(text) is None:
        raise ConfigError(key, f"expected sha256:<64 hex digits>, got {text[:80]!r}")
    return text


def _signer(value: Any, key: str, names: set[str]) -> str:
    name = _string(value, key)
    if name not in names:
        raise ConfigError(key, f"{name!r} is not the name of a policy key or identity "
                          f"(expected one of {', '.join(sorted(names)) or 'none'})")
    return name
