"""Value types that cross parts: the model signature, documents and scored ids.

They live here, below every part, so that the model, the ingest job and the stores can share
them without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

# Metadata filters: {"field": value} or {"field": [v1, v2]} (any of); all fields must match.
Filters = Mapping[str, Any]

# `Document.vector` of a document fetched without its vector (`Store.fetch(ids, vectors=False)`):
# empty and read-only, so code that reads it anyway fails on the shape at once.
NO_VECTOR = np.zeros(0, dtype=np.float32)
NO_VECTOR.flags.writeable = False


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """Which encoder produced a store's vectors; vectors of two models never mix."""

    model: str
    weights: str
    dim: int

    def describe(self) -> str:
        return f"{self.model} (weights {self.weights}, dim {self.dim})"


@dataclass(frozen=True, slots=True)
class Document:
    """One indexed item: an L2-normalised vector plus the text BM25 sees and free metadata.

    `vector` is NO_VECTOR where a fetch left it out. `fine_vector` is the same image by the
    fine-ranking model (stored beside the document, not in the ANN index), or None where no fine
    model was configured. `thumbnail` is a small JPEG of
    the image for the search page (written by `embed`; stores keep it and serve it by id, and
    `Store.fetch` leaves it out), or None."""

    id: str
    vector: np.ndarray
    text: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    fine_vector: np.ndarray | None = None
    thumbnail: bytes | None = None


@dataclass(frozen=True, slots=True)
class ScoredId:
    """A candidate from one retrieval stage; `score` is that stage's raw score."""

    id: str
    score: float
