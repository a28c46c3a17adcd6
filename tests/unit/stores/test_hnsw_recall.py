"""The embedded store's HNSW (default M, efConstruction, efSearch) finds what exact search finds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sidecar.retrieval.evaluation import found_of_exact
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document


def latent_mixture(n: int, *, seed: int) -> np.ndarray:
    """128-d unit vectors from a 16-d, 32-component Gaussian mixture + small noise (low intrinsic dim, like CLIP)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, 16))
    projection = rng.standard_normal((16, 128)) / 4.0
    latent = centres[rng.integers(0, 32, n)] + 0.5 * rng.standard_normal((n, 16))
    vectors = latent @ projection + 0.05 * rng.standard_normal((n, 128))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def test_recall_at_10_on_structured_vectors(tmp_path: Path):
    # Fixed seeds and a saved graph: the figure is reproducible; 0.98 leaves margin under the
    # 1.000 observed (0.992 even at efSearch 16), so a different faiss build order cannot flip it.
    vectors = latent_mixture(5_100, seed=0)
    corpus, queries = vectors[:5_000], vectors[5_000:]
    with EmbeddedStore(tmp_path / "s") as store:
        store.upsert([Document(id=str(i), vector=v) for i, v in enumerate(corpus)])
        recalls = [found_of_exact(store.vector_search(q, 10), store.vector_search(q, 10, exact=True)) / 10
                   for q in queries]
    assert np.mean(recalls) >= 0.98
