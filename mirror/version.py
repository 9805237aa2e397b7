"""The mirror's version: one source of truth, the ``version`` in pyproject.toml.

It is read from the installed package's metadata, so a wheel, an editable
install and the container image all report what pyproject.toml says.
"""

from __future__ import annotations

from importlib import metadata


def _installed_version() -> str:
    try:
        return metadata.version("mirror")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


#: The version of the installed ``mirror`` package, e.g. ``"0.1.0"``.
VERSION = _installed_version()
