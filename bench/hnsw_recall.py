"""Recall@10 of the embedded store's HNSW against its own exact search, on structured and random vectors.

Structured set: a 32-d latent Gaussian mixture (64 components, unit-variance centres, within-component
std 0.5) mapped to 512-d by a fixed random Gaussian projection (entries N(0, 1/32), so each
signal coordinate has std ~1.1), plus isotropic noise (std 0.05 per coordinate, ~4.5% of the signal's
norm), then L2-normalised: a low intrinsic dimension, like CLIP embeddings of a real corpus. Raising
the noise to std 0.5 (~45% of the signal) left recall unchanged in a spot check. Random set: uniformly random unit
vectors in 512-d (normalised Gaussians), the worst case for any graph index. Queries are fresh
draws from the same distribution, not stored points.

    .venv/bin/python bench/hnsw_recall.py [--n 20000] [--queries 200] [--target-recall 0.99]

With --target-recall, each store is then calibrated for it (`clip-sidecar store calibrate --ann-only`:
the lowest efSearch reaching the target on stored vectors) and the fresh queries are searched at the
effort it chose, their recall and p50/p95 measured beside exact search's in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import faiss
import numpy as np

from sidecar.retrieval.calibration import calibrate
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document, ModelSignature

DIM = 512
EF_SEARCH = (64, 128, 256, 512)


def latent_mixture(
    n: int, *, dim: int = DIM, latent_dim: int = 32, components: int = 64, within_std: float = 0.5,
    noise_std: float = 0.05, seed: int = 0,
) -> np.ndarray:
    """Unit vectors with a `latent_dim`-dimensional Gaussian-mixture structure embedded in `dim` dims."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, latent_dim))
    projection = rng.standard_normal((latent_dim, dim)) / np.sqrt(latent_dim)
    latent = centres[rng.integers(0, components, n)] + within_std * rng.standard_normal((n, latent_dim))
    vectors = latent @ projection + noise_std * rng.standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def uniform_unit(n: int, *, dim: int = DIM, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def measure(name: str, corpus: np.ndarray, queries: np.ndarray, workdir: str, target_recall: float = 0.0) -> None:
    path = os.path.join(workdir, name)
    docs = [Document(id=str(i), vector=vector, content_hash=str(i)) for i, vector in enumerate(corpus)]
    with EmbeddedStore(path) as store:
        store.claim(ModelSignature(model="bench", weights=name, dim=corpus.shape[1]))
        start = time.perf_counter()
        store.upsert(docs)
        print(f"{name}: upsert + HNSW build of {len(corpus)} x {corpus.shape[1]}: {time.perf_counter() - start:.1f} s")
        truth = [{hit.id for hit in store.vector_search(q, 10, exact=True)} for q in queries]
    for ef_search in EF_SEARCH:
        with EmbeddedStore(path, ef_search=ef_search) as store:
            start = time.perf_counter()
            found = [{hit.id for hit in store.vector_search(q, 10)} for q in queries]
            per_query_ms = (time.perf_counter() - start) / len(queries) * 1e3
        recall = np.mean([len(f & t) / 10 for f, t in zip(found, truth)])
        print(f"{name}: efSearch {ef_search:4d}  recall@10 {recall:.3f}  {per_query_ms:.2f} ms/query (store call)")
    if target_recall:
        measure_target(name, path, queries, truth, target_recall)


def timed_search(store: EmbeddedStore, queries: np.ndarray, **kwargs) -> tuple[list[set[str]], np.ndarray]:
    found, ms = [], []
    for q in queries:
        start = time.perf_counter()
        found.append({hit.id for hit in store.vector_search(q, 10, **kwargs)})
        ms.append((time.perf_counter() - start) * 1e3)
    return found, np.array(ms)


def measure_target(name: str, path: str, queries: np.ndarray, truth: list[set[str]], target_recall: float) -> None:
    with EmbeddedStore(path, target_recall=target_recall, target_k=10) as store:
        start = time.perf_counter()
        effort = calibrate(store, target_recall=target_recall, k=10, queries=300, allow_exact=False)
        store.effort.save(effort)
        print(f"{name}: calibration in {time.perf_counter() - start:.1f} s: {effort.describe().splitlines()[0]}")
        # Side by side in one run: the calibrated effort (no ef_search named), then exact search.
        found, ann_ms = timed_search(store, queries)
        _, exact_ms = timed_search(store, queries, exact=True)
    recall = np.mean([len(f & t) / 10 for f, t in zip(found, truth)])
    print(f"{name}: target {target_recall:g} -> ef_search {effort.ef_search}: fresh-query recall@10 {recall:.3f}; "
          f"p50/p95 {np.percentile(ann_ms, 50):.2f}/{np.percentile(ann_ms, 95):.2f} ms "
          f"(exact {np.percentile(exact_ms, 50):.2f}/{np.percentile(exact_ms, 95):.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--target-recall", type=float, default=0.0, help="calibrate for it, then measure (0: skip)")
    args = parser.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, M=32 efConstruction=200")
    with tempfile.TemporaryDirectory() as workdir:
        structured = latent_mixture(args.n + args.queries, seed=1)
        measure("structured", structured[: args.n], structured[args.n :], workdir, args.target_recall)
        measure("random", uniform_unit(args.n, seed=2), uniform_unit(args.queries, seed=3), workdir, args.target_recall)


if __name__ == "__main__":
    main()
