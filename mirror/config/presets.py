"""Per-registry presets: what a user would otherwise have to know about each registry.

A preset is chosen by the upstream's ``name`` (or its ``url`` host), or named
explicitly with ``preset:``. It only fills defaults into the raw config entry
before validation; any key the user writes wins. The auth dialects themselves
(challenge, realm, service, token shape) need no preset: the client reads them
from each registry's ``WWW-Authenticate`` challenge. What a preset adds is the
API host behind a familiar name, aliases, ``library/``, the key under which
``docker login`` stores credentials, where credentials come from by default
(ECR), and quirks such as ECR Public's blob ``HEAD``. ``docs/registries.md``
describes every preset with a config snippet.

This module is pure data and imports nothing of the mirror, so that
:mod:`mirror.config` can use it while validating.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ECR_PUBLIC_HOST = "public.ecr.aws"
ECR_PUBLIC_REGION = "us-east-1"
"""ECR Public's API (``ecr-public``) answers in this region only."""
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
"""Where ``docker login`` (no server) stores Docker Hub credentials in config.json."""

_ECR_HOST = re.compile(
    r"(?P<account>\d{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?"
)


@dataclass(frozen=True)
class Preset:
    """Defaults for one kind of registry.

    Attributes:
        key: the value of ``preset:`` that selects it.
        title: human name, for docs and errors.
        names: host names that select it automatically.
        pattern: a host pattern that selects it automatically.
        url: the API base URL; ``None`` means ``https://<name>``.
        aliases: more names clients use for it.
        library_prefix: add ``library/`` to one-part repository names.
        blob_probe: ``head`` or ``get``: how a blob's existence and size are
            asked for without downloading it.
        docker_config_server: the config.json key of its credentials; ``None``
            means the registry's host.
        needs_url: no well-known host; ``url`` (or a host as ``name``) is required.
        redirect_hosts: hosts besides its own that it redirects tag lists,
            referrers and manifests by tag to (content not verifiable by digest).
    """

    key: str
    title: str
    names: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    url: str | None = None
    aliases: tuple[str, ...] = ()
    library_prefix: bool = False
    blob_probe: str = "head"
    docker_config_server: str | None = None
    needs_url: bool = False
    redirect_hosts: re.Pattern[str] | None = None

    def matches(self, host: str) -> bool:
        """Whether ``host`` (lowercase, maybe with a port) selects this preset."""
        return host in self.names or (self.pattern is not None
                                      and self.pattern.fullmatch(host) is not None)


PRESETS: tuple[Preset, ...] = (
    Preset("dockerhub", "Docker Hub",
           names=("docker.io", "index.docker.io", "registry-1.docker.io",
                  "registry.hub.docker.com"),
           url="https://registry-1.docker.io",
           aliases=("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"),
           library_prefix=True, docker_config_server=DOCKER_HUB_CONFIG_KEY),
    Preset("ecr", "AWS ECR (private)", pattern=_ECR_HOST),
    Preset("ecr-public", "AWS ECR Public", names=(ECR_PUBLIC_HOST,), blob_probe="get"),
    Preset("ghcr", "GitHub Container Registry", names=("ghcr.io",)),
    Preset("quay", "Quay", names=("quay.io",)),
    Preset("gcr", "Google Container Registry",
           names=("gcr.io",), pattern=re.compile(r"[a-z]+\.gcr\.io")),
    Preset("artifact-registry", "Google Artifact Registry",
           pattern=re.compile(r"[a-z0-9-]+-docker\.pkg\.dev")),
    Preset("acr", "Azure Container Registry",
           pattern=re.compile(r"[a-z0-9]+\.azurecr\.(io|cn|us)")),
    Preset("gitlab", "GitLab container registry", names=("registry.gitlab.com",)),
    Preset("harbor", "Harbor", needs_url=True),
    Preset("nexus", "Sonatype Nexus", needs_url=True),
    Preset("artifactory", "JFrog Artifactory", pattern=re.compile(r"[a-z0-9-]+\.jfrog\.io"),
           needs_url=True),
    # registry.k8s.io redirects every request, manifests by tag too, to a regional
    # Artifact Registry.
    Preset("k8s", "registry.k8s.io", names=("registry.k8s.io",), aliases=("k8s.gcr.io",),
           redirect_hosts=re.compile(r"[a-z0-9-]+-docker\.pkg\.dev")),
    Preset("generic", "any OCI registry", needs_url=True),
)
BY_KEY: dict[str, Preset] = {p.key: p for p in PRESETS}


def find(name: str, url_host: str | None = None, explicit: str | None = None) -> Preset:
    """The preset for an upstream.

    Args:
        name: the upstream's ``name`` (lowercase).
        url_host: the host of its ``url``, when one is given.
        explicit: the ``preset:`` value, when one is given.

    Raises:
        KeyError: ``explicit`` names no preset.
    """
    if explicit is not None:
        return BY_KEY[explicit]
    for host in (name, url_host):
        if host is None:
            continue
        for preset in PRESETS:
            if preset.matches(host):
                return preset
    return BY_KEY["generic"]


def ecr_region(host: str) -> str | None:
    """The AWS region of an ECR registry host, or ``None`` if it is not one."""
    match = _ECR_HOST.fullmatch(host)
    return match.group("region") if match else None


def looks_like_host(name: str) -> bool:
    """Whether a registry name can serve as its own URL host (``myreg.example.com:5000``)."""
    host = name.split(":", 1)[0]
    return "." in host or host == "localhost"
