"""Two-stage retrieval over any store: coarse (vector / BM25 / hybrid, top N), then the fine stage to top K."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sidecar.retrieval.calibration import MAX_EF_SEARCH
from sidecar.retrieval.fine import UnusableFineVectors, fine_rank
from sidecar.retrieval.fusion import FUSION_METHODS, fuse, fused_ranking, ranking
from sidecar.stores.base import Store, check_filter_fields
from sidecar.types import Filters, ModelSignature

MODES = ("vector", "bm25", "hybrid")
# Hits per page where a search names no k (/v1/search, /v1/captions, `search`), or max_k where lower.
DEFAULT_K = 10


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    mode: str = "hybrid"
    k: int = DEFAULT_K
    candidates: int = 100  # N: how many the coarse stage hands to the fine stage
    # Ranks past the N candidates (k > N) follow in coarse order from one more coarse search this deep
    # (None: k), leaving the N out: searches of one depth (max_k for /v1/search's every page and for `search`:
    # past_window_depth) rank them alike.
    depth: int | None = None
    fusion: str = "minmax"
    # (vector, bm25). Chosen on the relevance benchmark (bench/RESULTS.md): equal weights beat 0.7/0.3
    # by 12.6 points of nDCG@10 without a fine model, and tie it (-0.2) with one.
    weights: tuple[float, float] = (0.5, 0.5)
    # The fine stage (a stronger model over the N candidates), where one is configured. None = the
    # mode's default: on, except in bm25 mode, which ranks by BM25 unless asked to fuse vectors.
    rerank: bool | None = None
    exact: bool = False  # brute-force vector search instead of ANN
    ef_search: int | None = None  # HNSW breadth for this query (None: the store's setting)
    filters: Filters | None = None
    # Hybrid on a store with its own fusion (OpenSearch + neural-search): fuse there when it
    # supports the fusion asked for; False always fuses in Python (to compare the two).
    native_hybrid: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.fusion not in FUSION_METHODS:
            raise ValueError(f"fusion {self.fusion!r}: choose one of {', '.join(FUSION_METHODS)}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.rerank is None:
            object.__setattr__(self, "rerank", self.mode != "bm25")
        if self.ef_search is not None and self.ef_search < 1:
            raise ValueError(f"ef_search must be >= 1, got {self.ef_search}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.depth is not None and self.depth < self.k:
            raise ValueError(f"depth must be at least k ({self.k}), got {self.depth}")
        # isfinite first: NaN passes both comparisons below and would make every fused score NaN.
        if len(self.weights) != 2 or not all(0 <= weight <= MAX_WEIGHT for weight in self.weights) \
                or sum(self.weights) <= 0:
            raise ValueError(f"weights must be two numbers from 0 to {MAX_WEIGHT:g} (vector, bm25), not both 0, "
                             f"got {self.weights}")


# A fusion weight's ceiling (the API's, `search`'s and `eval`'s): only the two weights' ratio ranks, and a
# weight of 1e308 made fused scores infinite, which JSON cannot carry. NaN fails every comparison: refused too.
MAX_WEIGHT = 100.0


class OverSearchLimit(ValueError):
    """A search option over what any search may ask for; `field` names the option (k, candidates, ef_search)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_search_limits(options: SearchOptions, *, max_k: int) -> None:
    """OverSearchLimit where `options` ask for more than /v1/search takes: k or candidates over max_k (the
    setting), ef_search over MAX_EF_SEARCH. The API checks each field as it reads it; `search` and `eval`,
    which build their options from flags and configuration files, ask here before the model loads."""
    for field_name, value in (("k", options.k), ("candidates", options.candidates)):
        if value > max_k:
            raise OverSearchLimit(field_name, f"{value} is over {max_k}, the most hits a search ranks "
                                              "(max_k: SIDECAR_MAX_K)")
    if options.ef_search is not None and options.ef_search > MAX_EF_SEARCH:
        raise OverSearchLimit("ef_search", f"{options.ef_search} is over {MAX_EF_SEARCH}, the widest HNSW search "
                                           "a query may ask for")


def check_query_image_used(options: SearchOptions, *, fine_model: bool) -> None:
    """ValueError where a query's image (an uploaded one, or a stored document's) would be ignored without a word:
    mode bm25 ranks by the text alone, and only its fine stage (rerank on, with a fine model) reads the image."""
    if options.mode == "bm25" and not (options.rerank and fine_model):
        raise ValueError("mode bm25 ranks by the text alone: the query image is read only by the fine stage (rerank "
                         "on, with a fine model), which this search does not run; use mode hybrid to rank by text "
                         "and image together")


def past_window_depth(shown: int, *, candidates: int, max_k: int) -> int | None:
    """`SearchOptions.depth` for a ranking shown down to rank `shown`: max_k where it reaches past the
    `candidates`, so that /v1/search's every page and `search` rank the hits past them alike; else None."""
    return max_k if shown > candidates else None


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    scores: dict[str, float]  # per stage: vector, bm25, fused, fine, rerank — why it ranked there
    text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, "scores": self.scores, "text": self.text,
                "metadata": dict(self.metadata)}


@dataclass(frozen=True, slots=True)
class SearchResult:
    hits: list[Hit]
    # coarse; rerank: the fine stage (reading the N candidates with their fine vectors, ranking them), 0 where it
    # did not run; fetch: the rest (reading the documents shown where no fine stage ran, building the hits)
    timings_s: dict[str, float]
    reranked: bool = False  # whether the fine stage ranked the hits
    rerank_skipped: str | None = None  # why a requested fine stage did not run


def query_vector(text_vector: np.ndarray | None, image_vector: np.ndarray | None) -> np.ndarray | None:
    """A text+image query searches near both: the normalised sum of the two unit vectors."""
    vectors = [v for v in (text_vector, image_vector) if v is not None]
    if not vectors:
        return None
    combined = np.sum(vectors, axis=0, dtype=np.float32)
    return combined / max(float(np.linalg.norm(combined)), 1e-12)


NO_FINE_MODEL = ("no fine model is configured (SIDECAR_FINE_MODEL): re-scoring the candidates with the vectors "
                 "that found them would not be a rerank")


def search(store: Store, *, vector: np.ndarray | None, text: str | None, options: SearchOptions,
           fine_vector: np.ndarray | None = None, fine_model: ModelSignature | None = None,
           no_fine_vector: str = NO_FINE_MODEL) -> SearchResult:
    """Coarse retrieval of N candidates, then (with `options.rerank` and a `fine_vector`, the query by
    the fine model `fine_model`) the fine stage over them; top K with per-stage scores, those past the N
    (K > N) in the coarse order of a search `options.depth` deep, with coarse scores only. The stage is
    skipped, saying why, where the store records another fine model. `no_fine_vector` says why a
    requested fine stage has no `fine_vector`."""
    if fine_vector is not None and fine_model is None:
        raise ValueError("fine_vector needs fine_model, the model that encoded it: the store's fine vectors must be "
                         "of the same model")
    if options.mode in ("bm25", "hybrid") and not (text and text.strip()):
        raise ValueError(f"mode {options.mode} needs query text; use mode vector for an image-only query")
    if options.mode in ("vector", "hybrid") and vector is None:
        raise ValueError(f"mode {options.mode} needs a query vector (text or image)")

    started = time.perf_counter()
    native = options.mode == "hybrid" and uses_native_hybrid(store, options)
    window = _coarse(store, vector=vector, text=text, options=options, depth=options.candidates, native=native)
    if not window.scores and options.filters:
        check_filter_fields(store, options.filters)
    # Ranks past the N candidates (the rescore window) come from one deeper coarse search, in its order,
    # leaving out the N: the first N are the ranking a search of k <= N shows, and what follows them is
    # the same for every search of that depth, so pages cut from such searches neither repeat nor skip.
    past: list[str] = []
    vector_scores, bm25_scores, coarse = dict(window.vector), dict(window.bm25), dict(window.scores)
    if options.k > options.candidates:
        deep = _coarse(store, vector=vector, text=text, options=options, depth=options.depth or options.k,
                       native=native)
        in_window = set(window.top)
        past = [doc_id for doc_id in deep.top if doc_id not in in_window][:options.k - len(window.top)]
        # A hit past the window shows the deep search's scores. One in the window keeps the window's
        # alone: the deep lists hold raw scores the window's lists lacked (a BM25-only hit's vector
        # score), which a page reaching past the window would show and one ending inside it would not.
        for doc_id in past:
            for scores, deep_scores in ((vector_scores, deep.vector), (bm25_scores, deep.bm25)):
                if doc_id in deep_scores:
                    scores[doc_id] = deep_scores[doc_id]
            coarse[doc_id] = deep.scores[doc_id]
    top = window.top
    fine_stage = options.rerank and fine_vector is not None
    if top and (native or (fine_stage and options.mode == "hybrid")):
        # The lexical evidence the fine stage fuses (and `scores.bm25` shows) is raw BM25 of every
        # candidate. The BM25 list fused here holds BM25's own top N, not the vector side's candidates
        # that match too; the native hybrid response carries fused scores only (their vector scores come
        # below). The candidates it lacks get theirs from one query restricted to their ids: the same
        # scores a full text_search gives them, and no query at all where BM25's list holds them all.
        rest = [doc_id for doc_id in top + (past if native else []) if doc_id not in bm25_scores]
        if rest:
            bm25_scores.update(_as_dict(store.text_search(text, len(rest), filters=options.filters, ids=rest)))
    coarse_done = time.perf_counter()

    skipped = no_fine_vector if options.rerank and fine_vector is None else None
    # The fine stage reads all N documents (their fine vectors); without it only the K shown are read.
    # The model's vectors are read only where the native hybrid left `scores.vector` to fill in, and
    # only for the K hits shown: on OpenSearch they are most of a fetch's bytes (bench/RESULTS.md).
    shown = top if fine_stage else top[:options.k]
    documents = {doc.id: doc for doc in store.fetch(shown + past, vectors=native and not fine_stage)}
    top = [doc_id for doc_id in shown if doc_id in documents]  # a document deleted between the two calls drops out
    fine = None
    if fine_stage:
        try:
            fine = fine_rank(fine_vector, [documents[d] for d in top], lexical=bm25_scores, fusion=options.fusion,
                             weights=options.weights, model=fine_model, stored_model=store.fine_signature())
        except UnusableFineVectors as exc:
            skipped = str(exc)
    ranked_at = time.perf_counter()
    final = fine.final if fine else coarse
    ranked = sorted(top, key=final.__getitem__, reverse=True)[:options.k]
    ranked += [doc_id for doc_id in past if doc_id in documents][:options.k - len(ranked)]
    if native:
        # Exact inner product from the stored full vectors (what the ANN side scored, without its error).
        with_vectors = {doc.id: doc for doc in store.fetch(ranked)} if fine_stage else documents
        vector_scores = _exact_scores([doc_id for doc_id in ranked if doc_id in with_vectors
                                       and with_vectors[doc_id].vector.size], with_vectors, vector)
    hits = []
    for doc_id in ranked:
        reranked = fine is not None and doc_id in fine.final  # not a hit past the window
        scores = {"vector": vector_scores.get(doc_id), "bm25": bm25_scores.get(doc_id),
                  "fused": coarse[doc_id] if options.mode == "hybrid" else None,
                  "fine": fine.fine[doc_id] if reranked else None, "rerank": fine.final[doc_id] if reranked else None}
        doc = documents[doc_id]
        hits.append(Hit(id=doc_id, score=fine.final[doc_id] if reranked else coarse[doc_id], text=doc.text,
                        metadata=dict(doc.metadata), scores={name: value for name, value in scores.items()
                                                             if value is not None}))
    # Where no fine stage ran, the time after the coarse stage is the reading of the page: not a rerank's.
    rerank_s = ranked_at - coarse_done if fine is not None else 0.0
    return SearchResult(hits=hits, timings_s={"coarse": coarse_done - started, "rerank": rerank_s,
                                              "fetch": time.perf_counter() - coarse_done - rerank_s},
                        reranked=fine is not None, rerank_skipped=skipped)


@dataclass(frozen=True, slots=True)
class _Coarse:
    top: list[str]  # the depth's best ids, best first
    scores: dict[str, float]  # what ranked them: vector, BM25 or fused (over this depth's lists)
    vector: dict[str, float]  # each side's raw scores (none where the store fused them itself)
    bm25: dict[str, float]


def _coarse(store: Store, *, vector: np.ndarray | None, text: str | None, options: SearchOptions, depth: int,
            native: bool) -> _Coarse:
    """The coarse stage `depth` deep: vector, BM25, or both fused (in the store where `native`)."""
    vector_scores: dict[str, float] = {}
    bm25_scores: dict[str, float] = {}
    if native:
        scores = _as_dict(store.hybrid_search(vector, text, depth, filters=options.filters, fusion=options.fusion,
                                              weights=options.weights, ef_search=options.ef_search))
    else:
        if options.mode in ("vector", "hybrid"):
            vector_scores = _as_dict(store.vector_search(vector, depth, filters=options.filters, exact=options.exact,
                                                         ef_search=options.ef_search))
        if options.mode in ("bm25", "hybrid"):
            bm25_scores = _as_dict(store.text_search(text, depth, filters=options.filters))
        if options.mode == "hybrid":
            # BM25's top N only: a vector candidate outside it adds 0 here, and without the fine stage its
            # hit shows no `scores.bm25` (the score shown is the one fused; finding another costs a query).
            scores = fuse([vector_scores, bm25_scores], method=options.fusion, weights=options.weights)
            top = fused_ranking(scores, [vector_scores, bm25_scores], weights=options.weights)
            return _Coarse(top=top[:depth], scores=scores, vector=vector_scores, bm25=bm25_scores)
        scores = vector_scores or bm25_scores
    return _Coarse(top=ranking(scores)[:depth], scores=scores, vector=vector_scores, bm25=bm25_scores)


def uses_native_hybrid(store: Store, options: SearchOptions) -> bool:
    """Whether hybrid fusion runs in the store (which fusions it can run is the store's rule)."""
    return options.native_hybrid and store.supports_native_hybrid(fusion=options.fusion, weights=options.weights,
                                                                  exact=options.exact)


def _exact_scores(ids: list[str], documents: dict, vector: np.ndarray) -> dict[str, float]:
    if not ids:
        return {}
    matrix = np.stack([np.asarray(documents[doc_id].vector, dtype=np.float32) for doc_id in ids])
    return dict(zip(ids, (matrix @ np.asarray(vector, dtype=np.float32)).tolist()))


def _as_dict(hits) -> dict[str, float]:
    return {hit.id: float(hit.score) for hit in hits}
