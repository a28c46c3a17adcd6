"""The one interface both stores (embedded, OpenSearch) implement, and its value types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

# Metadata filters: {"field": value} or {"field": [v1, v2]} (any of); all fields must match.
Filters = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Document:
    """One indexed item: an L2-normalised vector plus the text BM25 sees and free metadata."""

    id: str
    vector: np.ndarray
    text: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    content_hash: str = ""


@dataclass(frozen=True, slots=True)
class ScoredId:
    """A candidate from one retrieval stage; `score` is that stage's raw score."""

    id: str
    score: float


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """Which encoder produced a store's vectors; vectors of two models never mix."""

    model: str
    weights: str
    dim: int

    def describe(self) -> str:
        return f"{self.model} (weights {self.weights}, dim {self.dim})"


class StoreError(RuntimeError):
    """A store cannot do what was asked (wrong model, unreachable cluster, bad state)."""


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
    `sidecar.search`, the same for every store.
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
        self, vector: np.ndarray, k: int, *, filters: Filters | None = None, exact: bool = False
    ) -> list[ScoredId]:
        """Top-k by inner product; exact=True is brute force (the ANN's ground truth)."""

    def text_search(self, query: str, k: int, *, filters: Filters | None = None) -> list[ScoredId]:
        """Top-k by BM25 over Document.text."""

    def fetch(self, ids: Sequence[str]) -> list[Document]:
        """Full documents (full-precision vectors included) in the order asked; unknown ids skipped."""

    def close(self) -> None: ...
