"""Execution: warm one image reference through the pull service, like a client would.

::

    warm(job, digest)
      the manifest (index or image), by digest when the tag was just checked
      index: the children of the selected platforms only (+ their attestations when
             referrers are wanted); image: itself
      referrers of the index and of each selected child, when wanted
      pin everything until now + protect (before fetching: nothing warmed is evicted
             while the rest comes in)
      blobs not held yet: fetched with fetch_blob(background=True), under the blob
             cap, each fill paced by the bandwidth cap while no client reads it, one
             failure not stopping the others

Everything goes through :class:`~mirror.pull.PullService` with ``background=True``:
the single flight, verification and budgets of client pulls hold, and a client
asking for a blob a warm is fetching joins that fill. Fills are atomic (temp file,
verified, renamed), so a warm cut by a restart leaves whole blobs or nothing, and
the next run fetches only what is missing. "Already here" is a success.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from mirror import metrics
from mirror.errors import MirrorError, OciError, PolicyDenied, TooManyRequests
from mirror.oci import INDEX_TYPES, Digest, is_attestation, is_platform_image, parse_manifest
from mirror.pull import PullService, Repo
from mirror.storage.index import Index
from mirror.sync.budget import WarmBudget
from mirror.sync.rules import Platform

log = structlog.get_logger(__name__)

#: A progress event: ``{"ref", "event": plan|blob|done, ...}``.
Progress = Callable[[dict[str, Any]], None]

#: Docker's attestation manifests sit in the index, pointing at the image they describe.
_ATTESTS = "vnd.docker.reference.digest"


class Deferred(MirrorError):
    """Warming from this registry must wait (a 429 pause or the ratelimit floor)."""


@dataclass(frozen=True, slots=True)
class WarmJob:
    """One image reference to keep warm."""

    repo: Repo
    reference: str  # a tag or a digest
    platforms: tuple[str, ...]
    referrers: bool = False
    protect: float = 86400.0
    rules: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        sep = "@" if ":" in self.reference else ":"
        return f"{self.repo}{sep}{self.reference}"


@dataclass
class WarmResult:
    """What one warm did: ``warmed`` (fetched now), ``present`` (already held),
    ``failed``, ``refused`` (by the signature policy) or ``deferred`` (and why), with
    bytes and counts."""

    ref: str
    digest: str | None = None
    result: str = "failed"
    reason: str = ""
    fetched_bytes: int = 0
    present_bytes: int = 0
    missing_bytes: int = 0  # dry run: what would be fetched
    missing_blobs: int = 0
    blobs: int = 0
    manifests: int = 0
    platforms: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "", [])}


@dataclass
class _Plan:
    manifests: list[str] = field(default_factory=list)
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size
    platforms: list[str] = field(default_factory=list)


class Warmer:
    """Warms image references through the pull service within a :class:`WarmBudget`."""

    def __init__(self, pull: PullService, budget: WarmBudget, index: Index, *,
                 now: Callable[[], float]) -> None:
        self.pull = pull
        self.budget = budget
        self._index = index
        self._now = now

    async def warm(self, job: WarmJob, digest: Digest | None = None, *, dry_run: bool = False,
                   progress: Progress | None = None) -> WarmResult:
        """Warm one reference (``digest``: what its tag was just found to point to).

        Never raises for what upstream does: the result says what went wrong.
        """
        token = metrics.CALLER.set("sync")
        result = WarmResult(job.label)
        try:
            await self._warm(job, digest, result, dry_run, progress)
        except TooManyRequests as exc:
            self.budget.rate_limited(job.repo.registry, exc.retry_after)
            result.result, result.reason = "deferred", f"rate limited upstream: {exc.message}"
        except Deferred as exc:
            result.result, result.reason = "deferred", str(exc)
        except PolicyDenied as exc:  # the policy's verdict: nothing of it is fetched
            result.result, result.reason = "refused", exc.message
        except OciError as exc:
            result.result, result.reason = "failed", exc.message
        except (MirrorError, OSError) as exc:
            result.result, result.reason = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            metrics.CALLER.reset(token)
        if not dry_run and result.result in ("warmed", "present", "failed", "refused"):
            metrics.SYNC_IMAGES.labels(result.result).inc()
        if progress is not None:
            progress({"ref": job.label, "event": "done", **result.as_json()})
        # An upstream 503 (or any failure) behind a warm is something to look at.
        emit = log.warning if result.result in ("failed", "deferred", "refused") \
            else log.info
        emit("warm_done", **result.as_json(), dry_run=dry_run)
        return result

    async def _warm(self, job: WarmJob, digest: Digest | None, result: WarmResult,
                    dry_run: bool, progress: Progress | None) -> None:
        if self.budget.paused(job.repo.registry):
            raise Deferred(f"{job.repo.registry}: paused after a 429 for "
                           f"{self.budget.paused(job.repo.registry):.0f}s more")
        top = (await self.pull.manifest(job.repo, digest or job.reference,
                                        background=True)).manifest
        result.digest = str(top.digest)
        plan = await self._plan(job, top.digest, top.media_type, parse_manifest(top.data))
        result.platforms, result.manifests = plan.platforms, len(plan.manifests)
        missing: dict[str, int] = {}
        for blob, size in plan.blobs.items():
            if await self.pull.blobs.cached(Digest.parse(blob)) is None:
                missing[blob] = size
            else:
                result.present_bytes += size
        result.blobs, result.missing_blobs = len(plan.blobs), len(missing)
        result.missing_bytes = sum(missing.values())
        if progress is not None:
            progress({"ref": job.label, "event": "plan", "total": sum(plan.blobs.values()),
                      "present": result.present_bytes, "blobs": len(plan.blobs)})
        if dry_run:
            result.result = "planned" if missing else "present"
            return
        until = self._now() + job.protect
        await asyncio.to_thread(self._index.pin_until, [*plan.manifests, *plan.blobs],
                                job.label, until)
        if missing:
            blocked = self.budget.blocked(job.repo.registry)
            if blocked:
                raise Deferred(f"{job.repo.registry}: {blocked.replace('_', ' ')} "
                               f"(remaining {self.budget.remaining(job.repo.registry)})")
            await self._fetch_all(job, missing, result, progress)
        metrics.SYNC_BYTES.labels("present").inc(result.present_bytes)
        result.result = "warmed" if missing else "present"

    async def _plan(self, job: WarmJob, digest: Digest, media_type: str,
                    document: dict[str, Any]) -> _Plan:
        plan = _Plan(manifests=[str(digest)])
        images: list[tuple[Digest, dict[str, Any]]] = []
        if media_type in INDEX_TYPES:
            children = _select(document, job.platforms, job.referrers)
            if not any(platform for _, platform in children):
                offered = sorted({str(p) for e in document.get("manifests") or []
                                  if isinstance(e, dict) and (p := Platform.of(e))})
                raise OciError(f"no manifest for {', '.join(job.platforms)} "
                               f"(the index has {', '.join(offered) or 'none'})")
            for child, platform in children:
                if platform:
                    plan.platforms.append(platform)
                found = await self.pull.manifest(job.repo, child, background=True)
                plan.manifests.append(str(child))
                images.append((child, parse_manifest(found.manifest.data)))
        else:
            images.append((digest, document))
        if job.referrers:
            for subject in dict.fromkeys([digest, *(d for d, _ in images)]):
                images.extend(await self._referrers(job.repo, subject, plan))
        for _, image in images:
            for kind, blob, size in _descriptors(image):
                if kind == "blob":
                    plan.blobs[blob] = size
        return plan

    async def _referrers(self, repo: Repo, subject: Digest,
                         plan: _Plan) -> list[tuple[Digest, dict[str, Any]]]:
        found = await self.pull.referrers(repo, subject, background=True)
        images = []
        for entry in parse_manifest(found.body).get("manifests") or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
                continue
            child = Digest.parse(entry["digest"])
            manifest = await self.pull.manifest(repo, child, background=True)
            plan.manifests.append(str(child))
            images.append((child, parse_manifest(manifest.manifest.data)))
        return images

    async def _fetch_all(self, job: WarmJob, missing: dict[str, int], result: WarmResult,
                         progress: Progress | None) -> None:
        outcomes = await asyncio.gather(
            *(self._fetch(job, blob, size, progress) for blob, size in missing.items()),
            return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        result.fetched_bytes = sum(o for o in outcomes if isinstance(o, int))
        metrics.SYNC_BYTES.labels("warmed").inc(result.fetched_bytes)
        if failures:
            first = failures[0]
            if isinstance(first, TooManyRequests | Deferred) or not isinstance(first, Exception):
                raise first
            message = first.message if isinstance(first, OciError) else str(first)
            raise OciError(f"{len(failures)} of {len(missing)} blob(s) failed: {message}")

    async def _fetch(self, job: WarmJob, blob: str, size: int,
                     progress: Progress | None) -> int:
        async with self.budget.blobs:
            if self.budget.paused(job.repo.registry):
                raise Deferred(f"{job.repo.registry}: paused after a 429")
            pace = self.budget.bandwidth.spend if self.budget.bandwidth.rate else None
            await self.pull.fetch_blob(job.repo, Digest.parse(blob), background=True,
                                       pace=pace)
        if progress is not None:
            progress({"ref": job.label, "event": "blob", "digest": blob, "size": size})
        return size


def _select(index: dict[str, Any], platforms: tuple[str, ...],
            referrers: bool) -> list[tuple[Digest, str]]:
    """``(digest, platform)`` of the children to warm: the wanted platforms, the entries
    that are not platform images (a SOCI index, an artifact: platform ``""``), and (with
    referrers) the attestation manifests of the wanted platforms (platform ``""``)."""
    wanted = [Platform.parse(p) for p in platforms]
    chosen: list[tuple[Digest, str]] = []
    entries = [e for e in index.get("manifests") or [] if isinstance(e, dict)
               and isinstance(e.get("digest"), str)]
    for entry in entries:
        platform = Platform.of(entry)
        if not is_platform_image(entry):
            if not is_attestation(entry):
                chosen.append((Digest.parse(entry["digest"]), ""))
        elif platform is not None and any(platform.matches(w) for w in wanted):
            chosen.append((Digest.parse(entry["digest"]), str(platform)))
    if referrers:
        picked = {str(d) for d, _ in chosen}
        for entry in entries:
            annotations = entry.get("annotations")
            if isinstance(annotations, dict) and annotations.get(_ATTESTS) in picked:
                chosen.append((Digest.parse(entry["digest"]), ""))
    return chosen


def _descriptors(document: dict[str, Any]) -> list[tuple[str, str, int]]:
    """``(kind, digest, size)`` of the config and layers of an image manifest."""
    found = []
    config = document.get("config")
    for blob in [config] if isinstance(config, dict) else []:
        if isinstance(blob.get("digest"), str):
            found.append(("blob", blob["digest"], int(blob.get("size", 0) or 0)))
    for layer in document.get("layers") or []:
        if isinstance(layer, dict) and isinstance(layer.get("digest"), str):
            found.append(("blob", layer["digest"], int(layer.get("size", 0) or 0)))
    return found
