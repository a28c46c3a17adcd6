"""What a running app holds (settings, encoding service, store), typed, for its blueprints."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from flask import Flask, current_app

from sidecar.api.quality import Quality
from sidecar.config import Settings
from sidecar.model.prompts import PromptSetRegistry
from sidecar.serving.encoding import EncodingService
from sidecar.stores.base import Store, check_query_model

_KEY = "clip_sidecar"
# How long keyless /readyz callers share one computed readiness (auth.STATUS_ONLY_PATHS): a kubelet's probe
# every few seconds still sees each change, and whoever reaches the port cannot make the worker count the
# store (on OpenSearch, a cluster request) more than once a second however often it asks.
READINESS_SHARED_S = 1.0


class SharedReadiness:
    """The worker's last readiness answer, for the callers that may share one (`shared`): computed again only
    once it is older than `max_age_s`; `fresh` computes it now (a caller with a key) and keeps it for them."""

    def __init__(self, max_age_s: float = READINESS_SHARED_S, *, clock: Callable[[], float] = time.monotonic):
        self.max_age_s, self.clock = max_age_s, clock
        self._kept: tuple[float, tuple[dict, int]] | None = None  # (when computed, answer): one attribute, set at once
        # Held while a shared answer is computed: callers arriving meanwhile wait for it instead of asking the
        # store too (a store that takes its timeout to answer would otherwise be asked by each of them).
        self._computing = threading.Lock()

    def shared(self, compute: Callable[[], tuple[dict, int]]) -> tuple[dict, int]:
        with self._computing:
            kept = self._kept
            if kept is None or self.clock() - kept[0] > self.max_age_s:
                return self.fresh(compute)
            return kept[1]

    def fresh(self, compute: Callable[[], tuple[dict, int]]) -> tuple[dict, int]:
        answer = compute()
        self._kept = (self.clock(), answer)  # stamped when answered: a slow store's answer is not born stale
        return answer


@dataclass(frozen=True)
class AppState:
    settings: Settings
    encoding: EncodingService
    store: Store
    started: int  # Unix time the app loaded its model (`created` in /v1/models)
    prompt_sets: PromptSetRegistry  # the named prompt sets /v1/classify ranks labels of
    fine_encoding: EncodingService | None = None  # the fine-ranking model, where one is configured
    quality: Quality | None = None  # live recall, hard examples, feedback, the window of /v1/status
    readiness: SharedReadiness = field(default_factory=SharedReadiness)  # /readyz's answer to keyless callers

    def encodings(self) -> tuple[EncodingService, ...]:
        """Every encoding service of this worker: the coarse model's, and the fine model's where configured."""
        return (self.encoding,) if self.fine_encoding is None else (self.encoding, self.fine_encoding)

    def check_store_model(self) -> None:
        """Raise QueryModelMismatch where the store records another model than the one this worker encodes
        queries with: a store claimed by another model's `index` (or rebuilt with it) while serving."""
        check_query_model(self.store, self.encoding.encoder.signature)

    def close(self) -> None:
        """Stop the worker's background threads, committing what they hold: the quality checks and logs,
        then each encoding service (its batchers, and the text-vector cache's queued writes), then the store."""
        if self.quality is not None:
            self.quality.close()
        for service in self.encodings():
            service.close()
        self.store.close()

    @property
    def stopped(self) -> str | None:
        """None while every encode thread of the worker runs; else why one stopped (it cannot serve: searches
        rerank through the fine model's by default)."""
        return next((service.stopped for service in self.encodings() if service.stopped), None)


def attach_state(app: Flask, state: AppState) -> None:
    app.extensions[_KEY] = state


def state_of(app: Flask) -> AppState:
    return app.extensions[_KEY]


def current_state() -> AppState:
    """The state of the app handling the current request."""
    return state_of(current_app)
