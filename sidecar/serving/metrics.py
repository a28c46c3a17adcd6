"""Prometheus series: requests, per-stage latency, batch sizes, queue depth, cache hits."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Latency buckets from 0.5 ms to 10 s: encode stages live in the low milliseconds.
_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("sidecar_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
REQUEST_SECONDS = Histogram("sidecar_request_seconds", "HTTP request latency", ["endpoint"], buckets=_BUCKETS)
STAGE_SECONDS = Histogram(
    "sidecar_stage_seconds", "Latency per stage: queue_wait, forward, search, rerank", ["stage", "modality"],
    buckets=_BUCKETS,
)
BATCH_SIZE = Histogram(
    "sidecar_batch_size", "Items per forward pass", ["modality"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
QUEUE_DEPTH = Gauge("sidecar_queue_depth", "Items waiting for the model", ["modality"])
CACHE_LOOKUPS = Counter("sidecar_text_cache_lookups_total", "Text-vector cache lookups", ["result"])
