"""The one interface both stores (embedded, OpenSearch) implement, and the errors they raise."""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

import numpy as np

from sidecar.types import Document, Filters, ModelSignature, ScoredId


class StoreError(RuntimeError):
    """A store cannot do what was asked (wrong model, unreachable cluster, bad state)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (cluster down, connection refused, timeout): the
    caller may retry later; the API answers 503 with Retry-After."""


class ModelMismatchError(StoreError):
    def __init__(self, store: ModelSignature, other: ModelSignature):
        super().__init__(
            f"store holds vectors of {store.describe()}, refusing vectors of {other.describe()}; "
            "index into a new store (or rebuild) to switch models"
        )
        self.store = store
        self.other = other


class Store(Protocol):
    """Vector (ANN + exact) and BM25 retrieval over one collection of Documents.

    Scores: `vector_search` returns inner product of normalised vectors (cosine, in [-1, 1]);
    `text_search` returns raw BM25 (higher is better). Fusion and rerank live in
    `sidecar.retrieval.search`, the same for every store.
    """

    name: str

    def signature(self) -> ModelSignature | None:
        """The model whose vectors the store holds, or None while empty and unclaimed."""

    def claim(self, signature: ModelSignature) -> None:
        """Record the model on first use; raise ModelMismatchError if another model is stored."""

    def upsert(self, documents: Sequence[Document]) -> int:
        """Insert or replace by id; returns how many were written."""

    def delete(self, ids: Sequence[str]) -> int:
        """Remove by id; unknown ids are ignored; returns how many were removed."""

    def count(self) -> int: ...

    def content_hashes(self) -> dict[str, str]:
        """id -> content_hash for every stored document (drives incremental indexing)."""

    def vector_search(
        self, vector: np.ndarray, k: int, *, filters: Filters | None = None, exact: bool = False,
        ef_search: int | None = None,
    ) -> list[ScoredId]:
        """Top-k by inner product; exact=True is brute force (the ANN's ground truth); `ef_search`
        widens or narrows the HNSW search for this query (None: the store's setting)."""

    def text_search(self, query: str, k: int, *, filters: Filters | None = None,
                    ids: Sequence[str] | None = None) -> list[ScoredId]:
        """Top-k by BM25 over Document.text; `ids` restricts the search to those documents without
        changing their scores (the lexical evidence for candidates another stage found)."""

    def supports_native_hybrid(self, *, fusion: str, weights: tuple[float, float], exact: bool) -> bool:
        """Whether `hybrid_search` can fuse vector and BM25 results in the store for these options;
        where not, `sidecar.retrieval.search` fuses the two lists in Python."""

    def hybrid_search(self, vector: np.ndarray, query: str, k: int, *, filters: Filters | None = None,
                      fusion: str = "minmax", weights: tuple[float, float] = (0.5, 0.5)) -> list[ScoredId]:
        """Top-k fused in the store, on `sidecar.retrieval.fusion`'s scale; raises StoreError where
        `supports_native_hybrid` is False."""

    def rebuild(self, documents: Iterable[Document], *, signature: ModelSignature) -> str:
        """Load `documents` into a fresh index and swap it in whole (zero downtime); returns its name.
        Stores updated in place raise StoreError saying so."""

    def fetch(self, ids: Sequence[str]) -> list[Document]:
        """Full documents (full-precision vectors included, and the fine model's where stored) in the
        order asked; unknown ids skipped."""

    def close(self) -> None: ...
