"""Every Prometheus metric of the mirror, defined in one place.

Labels are bounded: a route, a status, a registry name from the config, a
fixed reason or result. Never a repository, a tag or a digest.
"""

from __future__ import annotations

import functools
import os
import platform
from contextvars import ContextVar
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from mirror.version import VERSION

# A gauge, not an Info: Info has no multiprocess mode (server.workers).
BUILD_INFO = Gauge(
    "mirror_build_info", "The running mirror's version and its Python's, as labels (value 1).",
    ["version", "python"], multiprocess_mode="max",
)
BUILD_INFO.labels(VERSION, platform.python_version()).set(1)

REQUESTS = Counter(
    "mirror_http_requests_total", "Client requests answered.", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "mirror_http_request_duration_seconds", "Time to answer a client request.", ["route"],
    buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60, 300),
)
CACHE_RESULTS = Counter(
    "mirror_cache_results_total",
    "How requests were answered: hit, miss (this request started a fill), joined (it read an "
    "in-flight fill), stale (served past the TTL because upstream failed), redirect (a 307 to "
    "a presigned S3 URL).",
    ["kind", "result"],
)
SERVED_BYTES = Counter(
    "mirror_served_bytes_total", "Body bytes sent to clients, by where they came from.", ["source"]
)
UPSTREAM_REQUESTS = Counter(
    "mirror_upstream_requests_total", "Requests sent upstream.", ["registry", "method", "status"]
)
#: Who an upstream request is for: ``client`` unless set (warming sets ``sync``). Tasks
#: started under it (a fill a warm began) inherit it.
CALLER: ContextVar[str] = ContextVar("mirror_caller", default="client")
UPSTREAM_BY_CALLER = Counter(
    "mirror_upstream_requests_by_caller_total",
    "Requests sent upstream, by whom they were for: client (a pull) or sync (warming).",
    ["registry", "caller"],
)
UPSTREAM_BYTES = Counter(
    "mirror_upstream_bytes_total", "Body bytes received from upstream.", ["registry"]
)
UPSTREAM_ERRORS = Counter(
    "mirror_upstream_errors_total",
    "Upstream failures: connect, timeout, status_5xx, rate_limited, denied, bad_content, "
    "truncated, digest_mismatch, size_hint_wrong (a manifest declared another size).",
    ["registry", "reason"],
)
UPSTREAM_RETRIES = Counter(
    "mirror_upstream_retries_total", "Upstream requests retried.", ["registry"]
)
TOKEN_FETCHES = Counter(
    "mirror_upstream_token_fetches_total", "Bearer tokens fetched.", ["registry", "result"]
)
CREDENTIAL_FETCHES = Counter(
    "mirror_upstream_credential_fetches_total",
    "Credentials obtained from a docker config.json (or its helper) or from ECR.",
    ["registry", "source", "result"],
)
CREDENTIAL_ROTATIONS = Counter(
    "mirror_upstream_credential_rotations_total",
    "Moves to an upstream's next credential because the active one was rate-limited "
    "(reason 429 or remaining).",
    ["registry", "reason"],
)
BREAKER_STATE = Gauge(
    "mirror_upstream_breaker_state",
    "Circuit breaker of each upstream: 0 closed, 1 open (failing fast), 2 half-open (probing).",
    ["registry"], multiprocess_mode="livemax")
BREAKER_TRANSITIONS = Counter(
    "mirror_upstream_breaker_transitions_total",
    "Circuit breaker state changes, by the state entered (closed, open, half_open).",
    ["registry", "state"],
)
BUDGET_WAITS = Counter(
    "mirror_upstream_budget_waits_total",
    "Background upstream requests that waited for the request budget.", ["registry"],
)
BUDGET_OVERDRAFTS = Counter(
    "mirror_upstream_budget_overdrafts_total",
    "Client upstream requests sent past the budget, on the client overdraft.", ["registry"],
)
BUDGET_REFUSALS = Counter(
    "mirror_upstream_budget_refusals_total",
    "Client upstream requests refused (TOOMANYREQUESTS) because budget and overdraft were "
    "spent.", ["registry"],
)
RATELIMIT_LIMIT = Gauge(
    "mirror_upstream_ratelimit_limit",
    "Upstream's own request limit per window, from its ratelimit-limit header (Docker Hub), "
    "per credential (a username or anonymous).", ["registry", "credential"],
    multiprocess_mode="livemostrecent")
RATELIMIT_REMAINING = Gauge(
    "mirror_upstream_ratelimit_remaining",
    "Requests upstream says are left in its window, from its ratelimit-remaining header, per "
    "credential.", ["registry", "credential"], multiprocess_mode="livemostrecent")
RATELIMIT_WINDOW = Gauge(
    "mirror_upstream_ratelimit_window_seconds",
    "Length of upstream's rate-limit window (the w= of ratelimit-limit), per credential.",
    ["registry", "credential"], multiprocess_mode="livemostrecent")
FILLS = Counter("mirror_fills_total", "Upstream blob downloads finished, by result.", ["result"])
FILLS_IN_FLIGHT = Gauge("mirror_fills_in_flight", "Upstream blob downloads under way.",
    multiprocess_mode="livesum")
FILL_READERS = Gauge("mirror_fill_readers", "Clients reading an in-flight download right now.",
    multiprocess_mode="livesum")
FILL_TAKEOVERS = Counter(
    "mirror_fill_takeovers_total",
    "Downloads another worker process claimed and stopped without publishing (it died), "
    "taken over from the bytes it left.",
)
RANGED_READS = Counter(
    "mirror_ranged_reads_total",
    "Ranges a reader asked of the sources itself, far ahead of a download (or behind a "
    "relay's window), by result: ok, or refused (the reader then followed the download).",
    ["result"],
)
FILL_JOINS = Counter(
    "mirror_fill_joins_total", "Requests that joined a download another request started."
)
STALE_SERVED = Counter(
    "mirror_stale_served_total", "Tags answered from cache because upstream failed.",
    ["registry", "reason"],
)

# --- sources of content after a local miss (mirror.sources) --------------------------
SOURCE_FILLS = Counter(
    "mirror_source_fills_total",
    "Blob fills and manifests taken from a source, by source kind (s3, upstream, memory, "
    "peer, parent, bundle) and result: ok, absent (the source does not have it), failed "
    "(broke off; the next source went on), rejected (wrong bytes; skipped for that digest).",
    ["source", "result"],
)
SOURCE_BYTES = Counter(
    "mirror_source_bytes_total", "Blob bytes read from each kind of source into fills.",
    ["source"],
)
TASK_RESTARTS = Counter(
    "mirror_task_restarts_total",
    "Background loops (eviction, sync, peer health...) restarted after they failed.",
    ["task"],
)

# --- regional peers (mirror.cluster, mirror.sources.peer) ------------------------------
PEER_MEMBERS = Gauge(
    "mirror_peer_members", "Peers of this node's region: known, and healthy (in the hash).",
    ["state"], multiprocess_mode="livemax")
PEER_QUARANTINES = Counter(
    "mirror_peer_quarantines_total", "Peers quarantined after they served wrong bytes."
)
PEER_DNS_FAILURES = Counter(
    "mirror_peer_dns_failures_total", "Failed look-ups of the peers' DNS name (last answer kept)."
)
PEER_SERVED = Counter(
    "mirror_peer_served_total",
    "Requests this node answered for other nodes: peer (in its region, as owner) or child "
    "(a node of a region whose parent this is).",
    ["hop", "kind"],
)
PEER_REFUSED = Counter(
    "mirror_peer_refused_total", "Peer API requests refused for a missing or bad token."
)

S3_LOOKUPS = Counter(
    "mirror_s3_lookups_total",
    "Look-ups in the shared S3 tier after a local miss: hit, miss, or skipped (S3 is backing "
    "off after a failure).",
    ["kind", "result"],
)
S3_READ_BYTES = Counter(
    "mirror_s3_read_bytes_total", "Blob bytes read from the shared S3 tier into local fills."
)
S3_UPLOADS = Counter(
    "mirror_s3_uploads_total",
    "Uploads to the shared S3 tier: ok, exists (another node had put it there), failed, "
    "skipped (backing off, or too many uploads queued).",
    ["kind", "result"],
)
S3_UPLOAD_BYTES = Counter(
    "mirror_s3_upload_bytes_total", "Bytes uploaded to the shared S3 tier.", ["kind"]
)
S3_FAILURES = Counter(
    "mirror_s3_failures_total",
    "Failed S3 operations: head, get, read, put, upload, presign, delete, verify (an object "
    "whose bytes are not its digest, removed from the bucket).",
    ["operation"],
)
S3_REDIRECTS = Counter(
    "mirror_s3_redirects_total", "Blob requests answered with a 307 to a presigned S3 URL."
)
# --- the local cache: size, eviction, pins, disk full (mirror.cache.eviction) ----------
CACHE_BYTES = Gauge("mirror_cache_bytes", "Bytes of verified content in the local cache.",
    multiprocess_mode="livemostrecent")
CACHE_ENTRIES = Gauge("mirror_cache_entries", "Blobs and manifests in the local cache.",
    multiprocess_mode="livemostrecent")
CACHE_MAX_BYTES = Gauge("mirror_cache_max_bytes", "storage.max_size (0: unbounded).",
    multiprocess_mode="livemax")
STORAGE_DISK_BYTES = Gauge(
    "mirror_storage_disk_bytes",
    "The filesystem that holds storage.path: size, and free (available to the mirror), "
    "refreshed every minute.",
    ["kind"], multiprocess_mode="livemostrecent")
CACHE_PINNED_BYTES = Gauge("mirror_cache_pinned_bytes", "Bytes of cached content that is pinned.",
    multiprocess_mode="livemostrecent")
CACHE_WATERMARK = Gauge(
    "mirror_cache_watermark_state",
    "0: below the low watermark, 1: between the watermarks, 2: above the high watermark.",
    multiprocess_mode="livemostrecent")
EVICTIONS = Counter(
    "mirror_cache_evictions_total",
    "Blobs and manifests evicted, by reason: watermark (LRU above the high watermark), "
    "disk_full (to make room after ENOSPC), operator (mirror cache evict), corrupt (failed "
    "a digest check).",
    ["reason"],
)
EVICTED_BYTES = Counter(
    "mirror_cache_evicted_bytes_total", "Bytes evicted, by reason (as above).", ["reason"]
)
DISK_FULL = Counter(
    "mirror_storage_full_total",
    "Writes that failed because the disk was full (ENOSPC/EDQUOT), by what the mirror did: "
    "retried (after evicting), relayed (streamed on from memory, not kept), manifest (served "
    "from memory, not kept), index (an index write failed).",
    ["action"],
)
NOT_KEPT = Counter(
    "mirror_blobs_not_kept_total",
    "Blobs streamed to clients but not kept: too_large (over storage.max_size), no_room "
    "(pinned or busy content leaves no room), disk_full.",
    ["reason"],
)
CORRUPT = Counter(
    "mirror_cache_corrupt_total", "Stored content found not to match its digest, and removed."
)

# --- per registry (configured names only), for hit ratio and bytes saved per upstream ---
REGISTRY_CACHE_RESULTS = Counter(
    "mirror_registry_cache_results_total",
    "mirror_cache_results_total by registry: how blob and manifest requests were answered.",
    ["registry", "kind", "result"],
)
REGISTRY_SERVED_BYTES = Counter(
    "mirror_registry_served_bytes_total",
    "Body bytes sent to clients, by registry and where they came from: memory, disk (the "
    "cache) or fill (a download under way).",
    ["registry", "source"],
)
REGISTRY_CACHE_BYTES = Gauge(
    "mirror_registry_cache_bytes",
    "Bytes in the local cache known to belong to a registry (content of several registries "
    "counts under each; other: known under none), refreshed every minute.",
    ["registry"], multiprocess_mode="livemostrecent")
AUTH_FAILURES = Counter(
    "mirror_auth_failures_total",
    "Client requests refused: unauthorized (missing or wrong credentials), denied (no access "
    "rule allows it, or not an operator), not_member (a digest asked under a repository that "
    "does not hold it), throttled (429: too many failed logins from the address or for the "
    "user), busy (503: the queue of password checks is full).",
    ["reason"],
)
# --- signatures and policy (mirror.policy), the audit trail (mirror.audit) -------------
POLICY_DECISIONS = Counter(
    "mirror_policy_decisions_total",
    "Manifest answers the signature policy judged, by registry and verdict "
    "(allow, warn: served with a Warning header, deny: refused with 403).",
    ["registry", "verdict"])
AUDIT_LINES = Counter(
    "mirror_audit_lines_total", "Lines written to the audit trail, by kind.", ["kind"])
# --- warming: the sync loop and `mirror warm` (mirror.sync) ----------------------------
SYNC_IMAGES = Counter(
    "mirror_sync_images_total",
    "Image references warming handled (the selected platforms of each): warmed (fetched "
    "now), present (already held), failed.",
    ["result"],
)
SYNC_BYTES = Counter(
    "mirror_sync_bytes_total",
    "Blob bytes of warmed images: warmed (fetched now) or present (already held).",
    ["result"],
)
SYNC_CHECKS = Counter(
    "mirror_sync_tag_checks_total",
    "Watched tags checked: unchanged (one HEAD, nothing else), moved (a new digest), new "
    "(first seen), failed.",
    ["result"],
)
SYNC_LAG = Histogram(
    "mirror_sync_lag_seconds",
    "From the last check that saw a tag's old digest to the mirror holding all of the new "
    "digest's selected content (an upper bound of the lag behind upstream).",
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400),
)
SYNC_PAUSED = Gauge(
    "mirror_sync_paused",
    "1 while warming from a registry is paused: rate_limited (after a 429, until its "
    "Retry-After), ratelimit_floor (ratelimit-remaining below sync.ratelimit_floor), "
    "off_peak (outside sync.off_peak).",
    ["registry", "reason"],
)


def exposition() -> bytes:
    """The text exposition of every metric: of this process, or summed over every worker
    process when the supervisor set ``PROMETHEUS_MULTIPROC_DIR`` (multiprocess mode)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return generate_latest()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def node_samples(metric: Any) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of ``metric`` for the node: ``(name, labels, value)``, summed over every
    worker process in multiprocess mode (as ``/metrics`` sums them), else this process's.

    The status page reads its figures here, so that whichever worker answers it shows
    the node's hit ratio and bytes.
    """
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    names = {family.name for family in metric.describe()}
    if folder:
        registry = CollectorRegistry()
        collector = multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=folder)
        families = [f for f in collector.collect()  # type: ignore[no-untyped-call]
                    if f.name in names]
    else:
        families = list(metric.collect())
    return [(sample.name, dict(sample.labels), float(sample.value))
            for family in families for sample in family.samples
            if not sample.name.endswith("_created")]


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: the request path calls this per request.

    Safe to cache because every label value is from a bounded set.
    """
    return metric.labels(*labels)
