"""The sync loop: rules and popularity turned into warm jobs on a schedule, with records.

::

    run()  (owned by the node: node.tasks.loop("sync", ...), only when `sync:` is set)
      every due rule (interval or cron) and `popular`, inside the off-peak windows:
        expand: repositories (globs over those pulled here), tags (exact, or from the tag
                list, read only when a tag set needs discovery), platforms
        merge:  one job per reference, whatever rules name it (platforms united)
        check:  one HEAD per watched tag (pull.revalidate: coalesced with client
                revalidations; skipped when checked within `recheck`)
        warm:   the selected platforms of the digest it points to (warm.Warmer)
        record: per reference: last run, next run, result and why, bytes, digest held
      sweep expired warming pins; save records

``run_once`` is the same pass on demand (``mirror sync --once``, ``POST /admin/sync``),
``warm_refs`` warms named references (``mirror warm``, ``POST /admin/warm``). One bad
reference never stops a run: it is recorded as failed and the rest go on.

Records are kept in memory (bounded) and saved to ``<storage>/sync/state.json``
(temp file + rename) after every run, so ``mirror sync status`` can read them without
a server and a restart keeps them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import structlog

from mirror import metrics
from mirror.clock import SYSTEM, Clock
from mirror.config import SyncRule, SyncSettings
from mirror.errors import (
    ManifestUnknown,
    NameUnknown,
    OciError,
    PolicyDenied,
    TooManyRequests,
    UpstreamUnavailable,
)
from mirror.oci import Digest, is_digest_reference, validate_name, validate_tag
from mirror.pull import PullService, Repo
from mirror.routing import Router
from mirror.storage.index import Index
from mirror.sync.budget import WarmBudget
from mirror.sync.popularity import Popularity, read_json, write_json
from mirror.sync.rules import (
    in_windows,
    needs_tag_list,
    next_run,
    rule_fingerprint,
    rule_platforms,
    rule_repositories,
    rule_tags,
)
from mirror.sync.warm import Progress, Warmer, WarmJob, WarmResult
from mirror.upstream import UpstreamClient

log = structlog.get_logger(__name__)

POPULAR = "popular"
MANUAL = "manual"
RECORDS_MAX = 10_000
#: The loop wakes at least this often to look for due rules.
WAKE_MAX = 30.0
STATE_VERSION = 1
STATE_FILE = "state.json"


@dataclass
class Record:
    """The last run of one reference."""

    ref: str
    rules: list[str] = field(default_factory=list)
    digest: str | None = None  # what the tag pointed to when last checked
    held: str | None = None  # the digest whose selected content was last held in full
    result: str = ""
    reason: str = ""
    fetched_bytes: int = 0
    present_bytes: int = 0
    last_run: float = 0.0
    checked_at: float | None = None  # last successful check upstream
    next_run: float | None = None

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> Record | None:
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in item.items() if k in names})
        except TypeError:
            return None


def parse_reference(router: Router, text: str) -> tuple[Repo, str]:
    """``(repo, tag or digest)`` of an image reference as a client would name it here
    (``nginx:1.27``, ``docker.io/library/nginx@sha256:...``, ``ghcr.io/org/app``).

    Raises:
        OciError: not a reference to a configured registry.
    """
    name, at, reference = text.strip().partition("@")
    if not at:
        slash, colon = name.rfind("/"), name.rfind(":")
        name, reference = (name[:colon], name[colon + 1:]) if colon > slash else (name, "latest")
    target = router.route(f"/v2/{name}/manifests/{reference}")
    if target.upstream is None:  # pragma: no cover (route() always names one or raises)
        raise NameUnknown(f"{text!r} names no configured registry")
    return Repo(target.upstream.name, target.repository), target.reference


class SyncService:
    """Rules, popularity, records and the warmer of one node."""

    def __init__(self, settings: SyncSettings, pull: PullService, router: Router, *,
                 clients: Mapping[str, UpstreamClient], index: Index, popularity: Popularity,
                 state_path: Path | None, clock: Clock = SYSTEM) -> None:
        self.settings = settings
        self.pull = pull
        self.router = router
        self.popularity = popularity
        self.budget = WarmBudget(settings, clients, clock=clock)
        self.warmer = Warmer(pull, self.budget, index, now=clock.time)
        self._index = index
        self._clock = clock
        self._state_path = state_path
        self.records: dict[str, Record] = {}
        self._next: dict[str, float] = {}
        self._run_lock = asyncio.Lock()
        self.last_run: dict[str, Any] = {}
        #: The parent regions' popularity documents (set by the node when it has parents).
        self.parents_popular: Callable[[int], Awaitable[list[Any]]] | None = None

    # --- lifetime -------------------------------------------------------------------------
    async def load(self) -> None:
        """Read the saved records (a missing or bad file starts empty)."""
        await self.refresh()

    async def refresh(self) -> None:
        """Take in what the node's other processes saved (each worker runs the passes it
        is asked for, the evicting one the loop): a record newer there than here wins."""
        if self._state_path is None:
            return
        records, last_run = await asyncio.to_thread(read_state, self._state_path)
        for ref, record in records.items():
            mine = self.records.get(ref)
            if mine is None or record.last_run > mine.last_run:
                self.records[ref] = record
        if float(last_run.get("started") or 0) > float(self.last_run.get("started") or 0):
            self.last_run = last_run

    async def save(self) -> None:
        """Write the records, with those the node's other processes saved (temp file +
        rename)."""
        if self._state_path is None:
            return
        await self.refresh()
        kept = sorted(self.records.values(), key=lambda r: r.last_run)[-RECORDS_MAX:]
        self.records = {r.ref: r for r in kept}
        document = {"version": STATE_VERSION, "saved_at": self._clock.time(),
                    "last_run": self.last_run, "records": [asdict(r) for r in kept]}
        await asyncio.to_thread(write_json, self._state_path, document)

    async def run(self) -> None:
        """The scheduled loop (the node's ``sync`` task); runs until cancelled."""
        while True:
            await self.tick()
            await asyncio.sleep(self._sleep_for(self._clock.time()))

    async def tick(self) -> dict[str, Any] | None:
        """Run the rules that are due, if inside the off-peak windows (outside them they
        are skipped to their next time); sweep expired warming pins.

        Returns:
            The run's report, or ``None`` when nothing ran.
        """
        now = self._clock.time()
        due = self._due(now)
        report = None
        if due:
            off_peak = not in_windows(self.settings.off_peak, now)
            for registry in {r.registry for r in self.settings.rules}:
                metrics.SYNC_PAUSED.labels(registry, "off_peak").set(int(off_peak))
            if off_peak:
                self._schedule(due, now)
            else:
                report = await self.run_once(names=due)
        await asyncio.to_thread(self._index.sweep_expired, self._clock.time())
        return report

    # --- runs -------------------------------------------------------------------------------
    async def run_once(self, *, dry_run: bool = False,
                       names: Iterable[str] | None = None) -> dict[str, Any]:
        """One pass of the rules named (default: every rule, and ``popular``).

        Returns:
            A report: every reference's result, counts and bytes.
        """
        async with self._run_lock:
            started = self._clock.time()
            chosen = set(names) if names is not None else {
                *(r.name for r in self.settings.rules), POPULAR}
            rules = [r for r in self.settings.rules if r.name in chosen]
            jobs, failures = await self._expand(rules, POPULAR in chosen)
            results = failures + list(await asyncio.gather(
                *(self._check_and_warm(job, dry_run=dry_run) for job in jobs)))
            if not dry_run:
                self._schedule(list(chosen), started)
                for job in jobs:
                    self._set_next(job)
            report = _report(results, started, self._clock.time(), dry_run)
            if not dry_run:
                self.last_run = {k: v for k, v in report.items() if k != "results"}
                await self.save()
            log.info("sync_run", dry_run=dry_run, references=len(results),
                     **{k: v for k, v in report.items() if k in ("counts", "fetched_bytes")})
            return report

    async def warm_refs(self, refs: list[str], *, platforms: tuple[str, ...] = (),
                        referrers: bool = False, protect: float | None = None,
                        progress: Progress | None = None) -> list[WarmResult]:
        """Warm named references now (``mirror warm``); off-peak windows do not apply."""
        jobs: list[WarmJob] = []
        results: list[WarmResult] = []
        for text in refs:
            try:
                repo, reference = parse_reference(self.router, text)
            except OciError as exc:
                results.append(WarmResult(text, result="failed", reason=exc.message))
                continue
            chosen = platforms or rule_platforms(
                (), self.popularity.platforms(repo.registry, repo.repository),
                self.settings.platforms)
            jobs.append(WarmJob(repo, reference, chosen, referrers,
                                self.settings.protect if protect is None else protect,
                                (MANUAL,)))
        results += await asyncio.gather(*(self._check_and_warm(j, progress=progress)
                                          for j in jobs))
        await self.save()
        return results

    async def _expand(self, rules: list[SyncRule],
                      popular: bool) -> tuple[list[WarmJob], list[WarmResult]]:
        """The jobs of some rules, one per reference (rules naming the same one merged)."""
        jobs: dict[tuple[Repo, str], WarmJob] = {}
        failures: list[WarmResult] = []
        for rule in rules:
            found, failed = await self._rule_jobs(rule)
            failures += failed
            for job in found:
                _merge(jobs, job)
        if popular:
            for job in self._popular_jobs():
                _merge(jobs, job)
            for job in await self._parents_popular_jobs():
                _merge(jobs, job)
        return list(jobs.values()), failures

    async def _parents_popular_jobs(self) -> list[WarmJob]:
        """What the parent regions pull most, warmed here too (through the chain, so from
        the nearest node that holds it): a region learns from its parents' traffic."""
        popular = self.settings.popular
        if self.parents_popular is None or not popular.top:
            return []
        try:
            documents = await self.parents_popular(popular.top)
        except Exception as exc:  # a parent's list is a hint; never a reason to stop a pass
            log.warning("parents_popular_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            return []
        jobs = []
        for document in documents:
            for item in _remote_top(document, popular.top):
                registry, repository, tag, platforms = item
                if registry not in self.pull.chains:
                    continue  # a registry this region does not mirror
                jobs.append(WarmJob(Repo(registry, repository), tag,
                                    platforms or self.settings.platforms, False,
                                    popular.protect, (POPULAR,)))
        return jobs

    async def _rule_jobs(self, rule: SyncRule) -> tuple[list[WarmJob], list[WarmResult]]:
        upstream = self.router.lookup(rule.registry)
        prefix = bool(upstream and upstream.library_prefix)
        repositories = rule_repositories(rule, self.popularity.repositories(rule.registry), prefix)
        jobs, failures = [], []
        for repository in repositories:
            repo = Repo(rule.registry, repository)
            available: list[str] | None = None
            if needs_tag_list(rule):
                if self.budget.paused(rule.registry):
                    failures.append(WarmResult(f"{repo}", result="deferred", reason=(
                        f"{rule.registry}: paused after a 429; tags not listed")))
                    continue
                try:
                    available = await self._tag_list(repo)
                except (OciError, TooManyRequests) as exc:
                    failures.append(self._failed(f"{repo}", rule.name, exc))
                    continue
            platforms = rule_platforms(rule.platforms,
                                       self.popularity.platforms(repo.registry, repository),
                                       self.settings.platforms)
            jobs += [WarmJob(repo, tag, platforms, rule.referrers, rule.protect, (rule.name,))
                     for tag in rule_tags(rule, available)]
        return jobs, failures

    async def _tag_list(self, repo: Repo) -> list[str]:
        token = metrics.CALLER.set("sync")
        try:
            _, tags = await self.pull.all_tags(repo, background=True)
            return tags
        except TooManyRequests as exc:
            self.budget.rate_limited(repo.registry, exc.retry_after)
            raise
        finally:
            metrics.CALLER.reset(token)

    def _popular_jobs(self) -> list[WarmJob]:
        popular = self.settings.popular
        jobs = []
        for item in self.popularity.top_tags(popular.top) if popular.top else []:
            platforms = self.popularity.platforms(item.registry, item.repository,
                                                  popular.platforms_max)
            jobs.append(WarmJob(Repo(item.registry, item.repository), item.tag,
                                tuple(platforms) or self.settings.platforms, False,
                                popular.protect, (POPULAR,)))
        return jobs

    async def _check_and_warm(self, job: WarmJob, *, dry_run: bool = False,
                              progress: Progress | None = None) -> WarmResult:
        async with self.budget.images:
            record = self.records.get(job.label) or Record(job.label)
            checked_before = record.checked_at
            try:
                digest = await self._check(job)
            except (OciError, TooManyRequests) as exc:
                result = self._failed(job.label, ",".join(job.rules), exc)
                if progress is not None:
                    progress({"ref": job.label, "event": "done", **result.as_json()})
            else:
                if digest is not None and not is_digest_reference(job.reference):
                    record.checked_at = self._clock.time()
                result = await self.warmer.warm(job, digest, dry_run=dry_run, progress=progress)
            if not dry_run:
                self._record(job, record, result, checked_before)
            return result

    async def _check(self, job: WarmJob) -> Digest | None:
        """The digest a tag points to now: one HEAD, unless checked within ``recheck``."""
        if is_digest_reference(job.reference):
            return Digest.parse(job.reference)
        if self.budget.paused(job.repo.registry):
            raise TooManyRequests(f"{job.repo.registry}: paused after a 429",
                                  self.budget.paused(job.repo.registry))
        token = metrics.CALLER.set("sync")
        try:
            resolved = await self.pull.revalidate(job.repo, job.reference, self.settings.recheck)
        except TooManyRequests as exc:
            metrics.SYNC_CHECKS.labels("failed").inc()
            self.budget.rate_limited(job.repo.registry, exc.retry_after)
            raise
        except (OciError, OSError):
            metrics.SYNC_CHECKS.labels("failed").inc()
            raise
        finally:
            metrics.CALLER.reset(token)
        digest = resolved.manifest.digest
        previous = self.records.get(job.label)
        metrics.SYNC_CHECKS.labels(
            "new" if previous is None or previous.digest is None
            else "unchanged" if previous.digest == str(digest) else "moved").inc()
        return digest

    def _record(self, job: WarmJob, record: Record, result: WarmResult,
                checked_before: float | None) -> None:
        now = self._clock.time()
        record.rules = sorted(set(job.rules))
        record.result, record.reason, record.last_run = result.result, result.reason, now
        record.fetched_bytes, record.present_bytes = result.fetched_bytes, result.present_bytes
        if result.digest is not None:
            record.digest = result.digest
        if result.result in ("warmed", "present") and result.digest is not None:
            if record.held not in (None, result.digest) and checked_before is not None:
                metrics.SYNC_LAG.observe(max(0.0, now - checked_before))
            record.held = result.digest
        self.records[record.ref] = record

    def _failed(self, ref: str, rule: str, exc: Exception) -> WarmResult:
        if isinstance(exc, TooManyRequests):
            result = WarmResult(ref, result="deferred", reason=f"rate limited: {exc.message}")
        elif isinstance(exc, PolicyDenied):
            result = WarmResult(ref, result="refused", reason=exc.message)
        elif isinstance(exc, ManifestUnknown):
            result = WarmResult(ref, result="failed", reason=f"not found upstream: {exc.message}")
        elif isinstance(exc, NameUnknown):
            result = WarmResult(ref, result="failed",
                                reason=f"repository not found upstream: {exc.message}")
        elif isinstance(exc, UpstreamUnavailable):
            result = WarmResult(ref, result="failed", reason=f"upstream unavailable: "
                                f"{exc.message}")
        else:
            message = exc.message if isinstance(exc, OciError) else str(exc)
            result = WarmResult(ref, result="failed", reason=message)
        if result.result in ("failed", "refused"):
            metrics.SYNC_IMAGES.labels(result.result).inc()
        log.warning("sync_reference_failed", ref=ref, rule=rule, result=result.result,
                    reason=result.reason)
        return result

    # --- schedule ---------------------------------------------------------------------------
    def _schedules(self) -> dict[str, Any]:
        return _schedules(self.settings)

    def _due(self, now: float) -> list[str]:
        return [name for name in self._schedules() if self._next.get(name, 0.0) <= now]

    def _schedule(self, names: Iterable[str], now: float) -> None:
        schedules = self._schedules()
        for name in names:
            if name in schedules:
                self._next[name] = next_run(schedules[name], now)

    def _set_next(self, job: WarmJob) -> None:
        record = self.records.get(job.label)
        times = [self._next[r] for r in job.rules if r in self._next]
        if record is not None and times:
            record.next_run = min(times)

    def _sleep_for(self, now: float) -> float:
        soonest = min(self._next.values(), default=now + WAKE_MAX)
        return min(WAKE_MAX, max(1.0, soonest - now))

    # --- status -----------------------------------------------------------------------------
    async def node_status(self, top: int = 20) -> dict[str, Any]:
        """:meth:`status` with the records every process of the node saved
        (``GET /admin/sync``)."""
        await self.refresh()
        return self.status(top)

    def status(self, top: int = 20) -> dict[str, Any]:
        """Rules, pauses, records and popularity of this process, as JSON."""
        return _status(self.settings, self._next, registries=self.budget.as_json(),
                       last_run=self.last_run, records=self.records,
                       popular=self.popularity.as_json(top))

    @staticmethod
    def offline_status(settings: SyncSettings | None, storage: Path,
                       top: int = 20) -> dict[str, Any]:
        """What ``GET /admin/sync`` would answer, from the files a node saved in
        ``storage`` (``mirror sync status`` with no server running): no next runs and
        no pauses (those live in the server), ``enabled`` and the ``source`` read.
        Blocking: it reads files."""
        sync = settings or SyncSettings()
        root = storage / "sync"
        records, last_run = read_state(root / STATE_FILE)
        popularity = Popularity(root / "popularity.json", window=sync.popular.window,
                                max_entries=sync.popular.max_entries)
        popularity.load()
        popularity.read_others()  # the workers' files (popularity-w<i>.json): the node's
        status = _status(sync, {}, registries={}, last_run=last_run, records=records,
                         popular=popularity.as_json(top))
        return {**status, "enabled": settings is not None, "source": str(root)}


def read_state(path: Path) -> tuple[dict[str, Record], dict[str, Any]]:
    """The records and the last run saved in ``state.json`` (a missing or bad file:
    none). Blocking."""
    document = read_json(path)
    if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
        return {}, {}
    records = {}
    for item in document.get("records") or []:
        record = Record.from_json(item) if isinstance(item, dict) else None
        if record is not None:
            records[record.ref] = record
    last = document.get("last_run")
    return records, last if isinstance(last, dict) else {}


def _schedules(settings: SyncSettings) -> dict[str, Any]:
    """Every schedule by name: the rules', and ``popular``'s when it keeps any warm."""
    found: dict[str, Any] = {r.name: r.schedule for r in settings.rules}
    if settings.popular.top:
        found[POPULAR] = settings.popular.schedule
    return found


def _status(settings: SyncSettings, next_runs: Mapping[str, float], *,
            registries: dict[str, object], last_run: dict[str, Any],
            records: Mapping[str, Record], popular: dict[str, Any]) -> dict[str, Any]:
    """The status document, from a running service or from its saved files."""
    fingerprints = {r.name: rule_fingerprint(r) for r in settings.rules}
    return {
        "rules": [{"name": name, "next_run": next_runs.get(name),
                   "schedule": asdict(schedule), "fingerprint": fingerprints.get(name)}
                  for name, schedule in _schedules(settings).items()],
        "registries": registries,
        "last_run": last_run,
        "records": [asdict(r) for r in sorted(records.values(), key=lambda r: r.ref)],
        "popular": popular,
    }


def _remote_top(document: Any, limit: int) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """The top tags of another node's popularity JSON, checked item by item (untrusted)."""
    top = document.get("top") if isinstance(document, dict) else None
    platforms = document.get("platforms") if isinstance(document, dict) else None
    found = []
    for item in top[:limit] if isinstance(top, list) else []:
        if not isinstance(item, dict):
            continue
        registry, repository, tag = item.get("registry"), item.get("repository"), item.get("tag")
        if not (isinstance(registry, str) and isinstance(repository, str)
                and isinstance(tag, str)):
            continue
        try:
            validate_name(repository)
            validate_tag(tag)
        except OciError:
            continue
        pulled = platforms.get(f"{registry}/{repository}") if isinstance(platforms, dict) else None
        names = tuple(p for p in pulled if isinstance(p, str))[:4] if isinstance(pulled, dict) \
            else ()
        found.append((registry, repository, tag, names))
    return found


def _merge(jobs: dict[tuple[Repo, str], WarmJob], job: WarmJob) -> None:
    key = (job.repo, job.reference)
    known = jobs.get(key)
    if known is None:
        jobs[key] = job
        return
    jobs[key] = WarmJob(job.repo, job.reference,
                        tuple(dict.fromkeys((*known.platforms, *job.platforms))),
                        known.referrers or job.referrers, max(known.protect, job.protect),
                        (*known.rules, *job.rules))


def _report(results: list[WarmResult], started: float, ended: float,
            dry_run: bool) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.result] = counts.get(result.result, 0) + 1
    return {"started": started, "seconds": round(ended - started, 3), "dry_run": dry_run,
            "counts": counts, "fetched_bytes": sum(r.fetched_bytes for r in results),
            "missing_bytes": sum(r.missing_bytes for r in results),
            "results": [r.as_json() for r in results]}
