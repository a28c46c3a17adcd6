"""Benchmark the OpenSearch store: bulk load vs bare streaming_bulk, ANN recall vs exact, query latency."""

from __future__ import annotations

import argparse
import logging
import time
import uuid

import numpy as np
from opensearchpy import helpers

from sidecar.stores.base import Document, ModelSignature
from sidecar.stores.opensearch import OpenSearchStore, _index_action

log = logging.getLogger("opensearch_bench")


def structured(n: int, dim: int, *, latent: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors with low intrinsic dimension: a random linear map of a `latent`-d Gaussian."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, latent)) @ rng.normal(size=(latent, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def uniform(n: int, dim: int, *, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def documents(vectors: np.ndarray) -> list[Document]:
    return [Document(id=str(i), vector=v, text=f"item {i} group{i % 50}", metadata={"group": str(i % 50)})
            for i, v in enumerate(vectors)]


def new_store(url: str, dim: int) -> OpenSearchStore:
    store = OpenSearchStore(url=url, index=f"bench-{uuid.uuid4().hex[:8]}", number_of_replicas=0)
    store.claim(ModelSignature(model="bench", weights="none", dim=dim))
    return store


def drop(store: OpenSearchStore) -> None:
    store.client.indices.delete(index=f"{store.alias}-v*", ignore_unavailable=True)
    store.close()


def bulk_ratio(url: str, vectors: np.ndarray) -> tuple[float, float]:
    docs = documents(vectors)
    store = new_store(url, vectors.shape[1])
    try:
        t0 = time.perf_counter()
        store.upsert(docs)
        through_store = time.perf_counter() - t0
    finally:
        drop(store)
    bare = new_store(url, vectors.shape[1])
    try:
        target = bare._alias_indices()[0]
        t0 = time.perf_counter()
        for _ in helpers.streaming_bulk(bare.client, (_index_action(target, d) for d in docs), chunk_size=500):
            pass
        bare.client.indices.refresh(index=target)
        bare_s = time.perf_counter() - t0
    finally:
        drop(bare)
    return through_store, bare_s


def recall_and_latency(url: str, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> dict[str, float]:
    store = new_store(url, vectors.shape[1])
    try:
        store.upsert(documents(vectors))
        truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
        recalls, exact_recalls, knn_ms, hybrid_ms = [], [], [], []
        for q, t in zip(queries, truth):
            t0 = time.perf_counter()
            ann = store.vector_search(q, k)
            knn_ms.append((time.perf_counter() - t0) * 1000)
            exact = store.vector_search(q, k, exact=True)
            truth_ids = {str(i) for i in t}
            recalls.append(len({h.id for h in ann} & truth_ids) / k)
            exact_recalls.append(len({h.id for h in exact} & truth_ids) / k)
            if store.has_neural_search():
                t0 = time.perf_counter()
                store.hybrid_search(q, "group7", k)
                hybrid_ms.append((time.perf_counter() - t0) * 1000)
        return {"recall": float(np.mean(recalls)), "exact_recall": float(np.mean(exact_recalls)),
                "knn_p50": float(np.percentile(knn_ms, 50)), "knn_p95": float(np.percentile(knn_ms, 95)),
                "hybrid_p50": float(np.percentile(hybrid_ms, 50)) if hybrid_ms else float("nan"),
                "hybrid_p95": float(np.percentile(hybrid_ms, 95)) if hybrid_ms else float("nan")}
    finally:
        drop(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:9250")
    parser.add_argument("--n", type=int, default=100_000, help="documents for the bulk-load comparison")
    parser.add_argument("--n-recall", type=int, default=20_000, help="documents for recall and latency")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("opensearch").setLevel(logging.WARNING)

    store_s, bare_s = bulk_ratio(args.url, structured(args.n, args.dim))
    rows = [f"bulk load {args.n}x{args.dim}: store {store_s:.1f}s ({args.n / store_s:,.0f} docs/s), "
            f"bare streaming_bulk {bare_s:.1f}s ({args.n / bare_s:,.0f} docs/s), ratio {store_s / bare_s:.2f}"]
    rows.append(f"{'vectors':<12}{'recall@10':>10}{'exact':>8}{'knn p50':>9}{'knn p95':>9}{'hyb p50':>9}{'hyb p95':>9}")
    for name, make in (("structured", structured), ("uniform", uniform)):
        data = make(args.n_recall + args.queries, args.dim, seed=1)
        r = recall_and_latency(args.url, data[:args.n_recall], data[args.n_recall:])
        rows.append(f"{name:<12}{r['recall']:>10.3f}{r['exact_recall']:>8.3f}{r['knn_p50']:>8.1f}ms"
                    f"{r['knn_p95']:>7.1f}ms{r['hybrid_p50']:>7.1f}ms{r['hybrid_p95']:>7.1f}ms")
    log.info("\n".join(rows))


if __name__ == "__main__":
    main()
