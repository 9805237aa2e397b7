"""The ``import`` section: what ``mirror import`` accepts on this mirror."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mirror.config.settings import ImportSettings
from mirror.config.values import _existing_file, _mapping, _only_keys, section_keys
from mirror.errors import ConfigError


def _import(value: Any, base: Path) -> ImportSettings:
    """``import.trusted_keys``: ed25519 public keys (PEM files); when given, every import
    must be signed by one of them."""
    item = _mapping(value, "import")
    _only_keys(item, "import", section_keys(ImportSettings))
    raw = item.get("trusted_keys", [])
    if not isinstance(raw, list):
        raise ConfigError("import.trusted_keys", "expected a list of PEM public key files")
    keys = tuple(_public_key(v, f"import.trusted_keys[{i}]", base) for i, v in enumerate(raw))
    return ImportSettings(trusted_keys=keys)


def _public_key(value: Any, key: str, base: Path) -> Path:
    path = _existing_file(value, key, base)
    try:
        loaded = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError):
        raise ConfigError(key, f"{path} is not a PEM public key") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise ConfigError(key, f"{path} is not an ed25519 public key")
    return path
