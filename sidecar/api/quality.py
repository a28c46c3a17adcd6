"""Quality in production, as the app runs it: the live recall monitor and the hard-example log fed by
/v1/search, the feedback log of /v1/feedback, and the metric window /v1/status reports from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.config import Settings
from sidecar.retrieval.hard_examples import (
    FEEDBACK_FILE,
    HardExampleLog,
    HardExampleRules,
    JsonlLog,
    SearchedQuery,
)
from sidecar.retrieval.monitor import BackgroundChecks, RecallCheck, RecallMonitor
from sidecar.retrieval.search import SearchOptions, SearchResult
from sidecar.serving import metrics
from sidecar.serving.metric_window import MetricWindow
from sidecar.stores.base import Store


@dataclass
class Quality:
    # A queue and thread each for the monitor and the hard-example log: hard-example checks (every
    # search by default, two searches each) filling a shared queue left the monitor's 1 % none.
    recall_checks: BackgroundChecks
    monitor: RecallMonitor
    window: MetricWindow
    hard_example_checks: BackgroundChecks | None = None  # None: quality_log_dir is not set
    hard_examples: HardExampleLog | None = None
    feedback: JsonlLog | None = None

    def observe_search(self, *, query_id: str, text: str | None, image: bytes | None, vector: np.ndarray | None,
                       options: SearchOptions, result: SearchResult, model: str) -> None:
        """Called by /v1/search after it answered: a query that searched by ANN is offered to the
        recall monitor; every query to the hard-example log. Both only sample and queue here."""
        if vector is not None and options.mode != "bm25" and not options.exact:
            self.monitor.offer(vector, candidates=options.candidates, filters=options.filters,
                               ef_search=options.ef_search)
        if self.hard_examples is not None:
            self.hard_examples.offer(SearchedQuery(query_id=query_id, text=text, image=image, mode=options.mode,
                                                   k=options.k, filters=options.filters, vector=vector,
                                                   hits=result.hits, model=model))

    def update_gauges(self, store: Store) -> None:
        """The recall target and the effort queries get now (before each scrape). The target is the setting's
        whether or not a calibration for it exists: recall under it is what the operator asked to hear of
        (the alert's and /v1/status's verdicts alike), and the usual remedy is that calibration."""
        effort = store.effort
        metrics.RECALL_TARGET.set(effort.target_recall or 0.0)
        metrics.SEARCH_EF.set(0 if effort.exact(None) else effort.ef_search(None))

    def close(self) -> None:
        for checks in (self.recall_checks, self.hard_example_checks):
            if checks is not None:
                checks.close()
        self.window.close()
        for log in (self.hard_examples, self.feedback):
            if log is not None:
                log.close()


def build_quality(settings: Settings, store: Store) -> Quality:
    recall_checks = BackgroundChecks(capacity=settings.monitor_queue, name="recall-checks")
    quality = Quality(recall_checks=recall_checks, window=MetricWindow(),
                      monitor=RecallMonitor(store, fraction=settings.monitor_fraction, k=settings.target_recall_k,
                                            checks=recall_checks, record=_record_recall))
    if settings.quality_log_dir:
        folder = Path(settings.quality_log_dir)
        bounds: dict[str, Any] = dict(max_bytes=settings.quality_log_max_bytes, backups=settings.quality_log_backups)
        quality.hard_example_checks = BackgroundChecks(capacity=settings.monitor_queue, name="hard-examples")
        quality.hard_examples = HardExampleLog(
            store, folder=folder, checks=quality.hard_example_checks, fraction=settings.hard_example_fraction,
            rules=HardExampleRules(min_score=settings.hard_example_min_score,
                                   max_agreement=settings.hard_example_max_agreement),
            images=settings.hard_example_images, repeat_seconds=settings.hard_example_repeat_seconds,
            record=lambda outcome: metrics.HARD_EXAMPLES.labels(outcome).inc(), **bounds)
        quality.feedback = JsonlLog(folder / FEEDBACK_FILE, **bounds)
    quality.window.start()
    return quality


def _record_recall(check: RecallCheck) -> None:
    metrics.SHADOW_CHECKS.labels(check.outcome).inc()
    if check.outcome == "checked":
        metrics.RECALL_HITS.inc(check.hits)
        metrics.RECALL_EXPECTED.inc(check.expected)
