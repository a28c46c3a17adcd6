"""Prometheus series: requests, per-stage latency, forward CPU, batch sizes, queue depth, cache hits, batcher
stops.

The encoder's series carry a `model` label, the role of the encoder that recorded them: "coarse" (the
model every search and embedding uses) or "fine" (the fine-ranking model, where one is configured:
its own batchers and cache in the same worker). The search and rerank stages run in the store, not
in a model: their `model` is empty. `search` is a /v1/search's coarse stage (the candidates); `rerank` is
recorded for a search the fine stage ranked (response `rerank: true`) only: reading the candidates'
documents and fine vectors, and ranking them.

Under gunicorn each worker is a process of its own: with PROMETHEUS_MULTIPROC_DIR set (the
gunicorn config sets it before any worker starts) every worker writes its series to files in
that folder and `exposition()` sums them, so one scrape counts the whole server.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The `model` label of an encoder's series (see above).
ModelRole = Literal["coarse", "fine"]

# Latency buckets from 0.5 ms to 30 s: encode stages live in the low milliseconds, and a request waits at most
# request_timeout_s (30 s by default) before its 504, which a top bound of 10 s would read as 10 s. 0.5 (not
# 0.512) is the p95 budget of docker/prometheus/alerts.yml: with a bound there, histogram_quantile's p95 is above
# it exactly when more than 5 % of requests are slower; requests between it and the next bound would otherwise
# count as fast.
_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("sidecar_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
REQUEST_SECONDS = Histogram("sidecar_request_seconds", "HTTP request latency", ["endpoint"], buckets=_BUCKETS)
STAGE_SECONDS = Histogram(
    "sidecar_stage_seconds", "Latency per stage: queue_wait, forward, search (coarse), rerank (fine stage, where it ran)", ["stage", "modality", "model"],
    buckets=_BUCKETS,
)
# CPU (thread time) of the forward passes, apart from their latency: with the server's total CPU it
# splits a request's cost into the model's part and the rest (bench/serve_load.py reports both).
FORWARD_CPU_SECONDS = Counter("sidecar_forward_cpu_seconds", "CPU time the forward passes took on the model thread",
                              ["modality", "model"])
_ITEM_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_SIZE = Histogram("sidecar_batch_size", "Items per forward pass", ["modality", "model"], buckets=_ITEM_BUCKETS)
# Rerank requests from OpenSearch the fine stage could not run for (no fine model, documents without
# fine vectors): answered in their own order, as /v1/search keeps its coarse order.
RERANK_SKIPPED = Counter("sidecar_rerank_skipped_total", "OpenSearch rerank requests answered in their own order",
                         ["endpoint"])
# What callers batch, as it arrived (ml-commons' text_embedding batch_size and connector step size
# show here); sidecar_batch_size shows the model passes the micro-batcher made of it across concurrent requests
# (texts the text-vector cache's file holds take none).
REQUEST_ITEMS = Histogram("sidecar_request_items", "Items (texts, images, documents to rerank) per request, by endpoint",
                          ["endpoint"], buckets=_ITEM_BUCKETS)
# Summed over the live workers; a dead worker's last value is dropped.
QUEUE_DEPTH = Gauge("sidecar_queue_depth", "Items waiting for the model", ["modality", "model"],
                    multiprocess_mode="livesum")
# hit: in the worker's memory (or being computed for another request); disk_hit: in the SQLite file (another
# worker's, an earlier run's, `clip-sidecar cache warm`); miss: encoded.
CACHE_LOOKUPS = Counter("sidecar_text_cache_lookups_total",
                        "Text-vector cache lookups: hit (memory), disk_hit (the shared file), miss (encoded)",
                        ["result", "model"])
BATCHER_STOPS = Counter("sidecar_batcher_stops_total",
                        "Micro-batcher threads that died (their worker answers 503 and is replaced)",
                        ["modality", "model"])

# Live Recall@K of the ANN (sidecar.retrieval.monitor): two counters rather than a gauge, so that every
# worker's shadow checks add up and recall over any window is rate(hits) / rate(expected) — in PromQL
# (docker/prometheus/alerts.yml) and in /v1/status alike.
RECALL_HITS = Counter("sidecar_ann_recall_hits_total",
                      "Shadow-checked queries: results of the exact top K that the ANN top K found (ties counted)")
RECALL_EXPECTED = Counter("sidecar_ann_recall_expected_total", "Shadow-checked queries: results of the exact top K")
SHADOW_CHECKS = Counter("sidecar_shadow_checks_total",
                        "Queries offered to the shadow exact search: checked, dropped (queue full), failed", ["outcome"])
# The recall target and the effort it chose (set at each scrape; the most recent write of a live worker wins).
RECALL_TARGET = Gauge("sidecar_recall_target", "The target_recall setting, calibrated for or not, as /v1/status "
                      "judges recall against it (0: none set)",
                      multiprocess_mode="livemostrecent")
SEARCH_EF = Gauge("sidecar_search_ef_search", "HNSW efSearch of queries that name none (0: exact search); one that "
                  "asks for more candidates than this searches at that many",
                  multiprocess_mode="livemostrecent")
HARD_EXAMPLES = Counter("sidecar_hard_examples_total",
                        "Hard-example checks of searches: logged (hard), repeated (a query logged within "
                        "SIDECAR_HARD_EXAMPLE_REPEAT_SECONDS), skipped (one found not hard within it), dropped "
                        "(queue full), too_large (a record over the file bound)",
                        ["outcome"])
FEEDBACK = Counter("sidecar_feedback_total", "Feedback records (POST /v1/feedback) by kind", ["kind"])


class ForwardSeries:
    """The series of one encoder's model passes of one modality: items per pass (sidecar_batch_size), the
    stage "forward" and its CPU. Recorded by the code that runs the model, once per pass: the batcher's batch
    may hold texts the text-vector cache's file answers (no pass) and runs in passes of max_batch."""

    def __init__(self, modality: str, role: ModelRole):
        self.batch_size = BATCH_SIZE.labels(modality, role)
        self.seconds = STAGE_SECONDS.labels("forward", modality, role)
        self.cpu_seconds = FORWARD_CPU_SECONDS.labels(modality, role)

    @contextmanager
    def timed(self, items: int) -> Iterator[None]:
        """Record a pass of `items` items: the block's time as the stage's (texts: tokenising included)."""
        self.batch_size.observe(items)
        with self.seconds.time():
            yield

    @contextmanager
    def cpu(self) -> Iterator[None]:
        """The block's CPU time (of the thread) as the pass's: the model's part, tokenising apart."""
        started = time.thread_time()
        try:
            yield
        finally:
            self.cpu_seconds.inc(time.thread_time() - started)


def exposition() -> tuple[bytes, str]:
    """The body and content type of a scrape: all workers' series summed in multiprocess mode,
    this process's series otherwise (the development server, tests)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
