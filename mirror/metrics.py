"""Every Prometheus metric of the mirror, defined in one place.

Labels are bounded: a route, a status, a registry name from the config, a
fixed reason or result. Never a repository, a tag or a digest.
"""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

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
UPSTREAM_BYTES = Counter(
    "mirror_upstream_bytes_total", "Body bytes received from upstream.", ["registry"]
)
UPSTREAM_ERRORS = Counter(
    "mirror_upstream_errors_total",
    "Upstream failures: connect, timeout, status_5xx, rate_limited, denied, bad_content, "
    "truncated, digest_mismatch.",
    ["registry", "reason"],
)
UPSTREAM_RETRIES = Counter(
    "mirror_upstream_retries_total", "Upstream requests retried.", ["registry"]
)
TOKEN_FETCHES = Counter(
    "mirror_upstream_token_fetches_total", "Bearer tokens fetched.", ["registry", "result"]
)
FILLS = Counter("mirror_fills_total", "Upstream blob downloads finished, by result.", ["result"])
FILLS_IN_FLIGHT = Gauge("mirror_fills_in_flight", "Upstream blob downloads under way.")
FILL_READERS = Gauge("mirror_fill_readers", "Clients reading an in-flight download right now.")
FILL_JOINS = Counter(
    "mirror_fill_joins_total", "Requests that joined a download another request started."
)
STALE_SERVED = Counter(
    "mirror_stale_served_total", "Tags answered from cache because upstream failed.",
    ["registry", "reason"],
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


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: the request path calls this per request.

    Safe to cache because every label value is from a bounded set.
    """
    return metric.labels(*labels)
