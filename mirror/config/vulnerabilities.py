"""A policy rule's ``vulnerabilities`` bar: the vulnerability gate (issue 22 item 5).

::

    rules:
      - repositories: ["acme/*"]
        require: [release]                 # optional: a signature too
        vulnerabilities:
          max_severity: high               # the worst finding allowed (inclusive)
          max_age: 7d                      # the newest report's scanFinishedOn, at most
          keys: [scanner]                  # policy keys or identities that sign reports

An image passes only with a verified cosign vulnerability attestation (predicate type
``https://cosign.sigstore.dev/attestation/vuln/v1``) of its own digest, signed by one of
``keys``, whose newest report is younger than ``max_age`` and whose worst finding is at
most ``max_severity`` (``none``: no finding at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mirror.config.values import _mapping, _only_keys, _string, parse_duration
from mirror.errors import ConfigError

#: Trivy's severities, least to worst; ``NONE`` (no finding) is below them all.
SEVERITIES = ("NONE", "UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")
DEFAULT_MAX_AGE = 7 * 86400.0


@dataclass(frozen=True)
class VulnerabilityBar:
    """What a rule asks of an image's vulnerability report.

    Attributes:
        max_severity: the worst severity allowed (inclusive), one of :data:`SEVERITIES`.
        max_age: seconds since the scan finished, at most.
        keys: names of policy keys or identities whose reports count (any one suffices).
    """

    max_severity: str
    max_age: float
    keys: tuple[str, ...]


def parse_vulnerabilities(raw: Any, key: str, names: set[str]) -> VulnerabilityBar:
    """A rule's ``vulnerabilities`` mapping, validated (``names``: the keys and identities).

    Raises:
        ConfigError: naming the key at fault.
    """
    item = _mapping(raw, key)
    _only_keys(item, key, {"max_severity", "max_age", "keys"})
    if "max_severity" not in item or "keys" not in item:
        raise ConfigError(key, "needs max_severity and keys (who signs the reports)")
    severity = _string(item["max_severity"], f"{key}.max_severity").upper()
    if severity not in SEVERITIES:
        raise ConfigError(f"{key}.max_severity", "expected one of "
                          f"{', '.join(s.lower() for s in SEVERITIES)}, got {severity.lower()!r}")
    max_age = parse_duration(item.get("max_age", "7d"), f"{key}.max_age")
    if max_age <= 0:
        raise ConfigError(f"{key}.max_age", "expected a duration above 0s")
    keys = item["keys"]
    keys = [keys] if isinstance(keys, str) else keys
    if not isinstance(keys, list) or not keys:
        raise ConfigError(f"{key}.keys", "expected a non-empty list of key or identity names")
    signers = []
    for index, name in enumerate(keys):
        text = _string(name, f"{key}.keys[{index}]")
        if text not in names:
            raise ConfigError(f"{key}.keys[{index}]", f"{text!r} is not the name of a policy "
                              f"key or identity (expected one of "
                              f"{', '.join(sorted(names)) or 'none'})")
        signers.append(text)
    return VulnerabilityBar(max_severity=severity, max_age=max_age, keys=tuple(signers))


def format_age(seconds: float) -> str:
    """``7d``, ``12h``, ``30m`` or ``45s``: a duration as a config would write it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
