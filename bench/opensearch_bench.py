"""Benchmark the OpenSearch store: bulk load vs bare streaming_bulk, ANN recall vs exact, query latency.

Fairness of the bulk comparison: the JVM is warmed up first (a cold node's first load runs ~1.6x
slower, whichever path goes first); both paths write the same documents into an index created the
same way, with the same chunk_size and max_chunk_bytes, and both end with a refresh, so the
documents are searchable when the clock stops. The bare path builds its actions the way a user of
opensearch-py would (`vector.tolist()` in the `_source` dict) and keeps the index's refresh_interval
(1s); the store path includes everything `upsert` does (settings relaxed and restored, _meta
bookkeeping, retries armed, final refresh and count check).

The structured index loaded by the store is kept for the recall and latency measurements, after
its background merges have finished (both paths leave merges running; the clock does not wait
for them in either).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import uuid

import numpy as np
from opensearchpy import helpers

from sidecar.stores.opensearch import OpenSearchStore
from sidecar.types import Document, ModelSignature

log = logging.getLogger("opensearch_bench")


def structured(n: int, dim: int, *, latent: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors with low intrinsic dimension: a random linear map of a `latent`-d Gaussian."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, latent)) @ rng.normal(size=(latent, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def uniform(n: int, dim: int, *, seed: int = 0) -> np.ndarray:
    """Uniform on the unit sphere: no structure, HNSW's worst case."""
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


def load_bare(store: OpenSearchStore, docs: list[Document]) -> float:
    """opensearch-py's streaming_bulk with nothing around it, then a refresh; returns seconds."""
    target = store._alias_indices()[0]
    actions = ({"_index": target, "_id": d.id,
                "_source": {"id": d.id, "vector": d.vector.tolist(), "text": d.text,
                            "metadata": dict(d.metadata), "content_hash": d.content_hash}} for d in docs)
    started = time.perf_counter()
    for _ in helpers.streaming_bulk(store.client, actions, chunk_size=store.chunk_size,
                                    max_chunk_bytes=store.max_chunk_bytes):
        pass
    store.client.indices.refresh(index=target)
    return time.perf_counter() - started


def load_store(store: OpenSearchStore, docs: list[Document]) -> float:
    started = time.perf_counter()
    store.upsert(docs)
    return time.perf_counter() - started


def index_state(store: OpenSearchStore) -> str:
    stats = store.client.indices.stats(index=store.alias, metric="merge,segments")["_all"]["primaries"]
    return f"{stats['segments']['count']} segments, {stats['merges']['current']} merges running"


def wait_for_merges(store: OpenSearchStore, *, timeout_s: float = 600) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        stats = store.client.indices.stats(index=store.alias, metric="merge")["_all"]["primaries"]
        if stats["merges"]["current"] == 0:
            break
        time.sleep(1)
    return time.perf_counter() - started


def recall_and_latency(store: OpenSearchStore, vectors: np.ndarray, queries: np.ndarray, *, k: int = 10,
                       exact_queries: int = 20) -> dict[str, float]:
    """ANN recall@k against numpy ground truth; the store's exact (knn_score) search checked on a subset."""
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    recalls, exact_recalls, knn_ms, hybrid_ms = [], [], [], []
    hybrid = store.has_neural_search()
    for i, (q, t) in enumerate(zip(queries, truth)):
        truth_ids = {str(j) for j in t}
        started = time.perf_counter()
        ann = store.vector_search(q, k)
        knn_ms.append((time.perf_counter() - started) * 1000)
        recalls.append(len({h.id for h in ann} & truth_ids) / k)
        if i < exact_queries:
            exact = store.vector_search(q, k, exact=True)
            exact_recalls.append(len({h.id for h in exact} & truth_ids) / k)
        if hybrid:
            started = time.perf_counter()
            store.hybrid_search(q, f"group{i % 50}", k)
            hybrid_ms.append((time.perf_counter() - started) * 1000)
    nan = float("nan")
    return {"recall": float(np.mean(recalls)), "exact_recall": float(np.mean(exact_recalls)),
            "knn_p50": float(np.percentile(knn_ms, 50)), "knn_p95": float(np.percentile(knn_ms, 95)),
            "hybrid_p50": float(np.percentile(hybrid_ms, 50)) if hybrid_ms else nan,
            "hybrid_p95": float(np.percentile(hybrid_ms, 95)) if hybrid_ms else nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:9250")
    parser.add_argument("--n", type=int, default=100_000, help="documents per load (bulk comparison and recall)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--exact-queries", type=int, default=20, help="queries also run as exact knn_score")
    parser.add_argument("--warmup", type=int, default=5000, help="documents per path loaded and dropped first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("opensearch").setLevel(logging.WARNING)

    data = structured(args.n + args.queries, args.dim, seed=1)
    docs = documents(data[:args.n])
    if args.warmup:
        for load in (load_bare, load_store):
            store = new_store(args.url, args.dim)
            try:
                load(store, docs[:args.warmup])
            finally:
                drop(store)

    bare = new_store(args.url, args.dim)
    try:
        bare_s = load_bare(bare, docs)
        bare_state = index_state(bare)
    finally:
        drop(bare)
    store = new_store(args.url, args.dim)
    try:
        store_s = load_store(store, docs)
        store_state = index_state(store)
        merge_wait = wait_for_merges(store)
        results = {"structured": recall_and_latency(store, data[:args.n], data[args.n:],
                                                    exact_queries=args.exact_queries)}
        results["structured"]["state"] = f"{index_state(store)} (merges waited {merge_wait:.0f}s)"
    finally:
        drop(store)

    random_data = uniform(args.n + args.queries, args.dim, seed=2)
    store = new_store(args.url, args.dim)
    try:
        load_store(store, documents(random_data[:args.n]))
        merge_wait = wait_for_merges(store)
        results["uniform"] = recall_and_latency(store, random_data[:args.n], random_data[args.n:],
                                                exact_queries=args.exact_queries)
        results["uniform"]["state"] = f"{index_state(store)} (merges waited {merge_wait:.0f}s)"
    finally:
        drop(store)

    rows = [f"machine {platform.machine()} ({os.cpu_count()} cores), {args.n} x {args.dim}, lucene HNSW m={store.m} "
            f"ef_construction={store.ef_construction} ef_search={store.ef_search}, chunk_size {store.chunk_size}",
            f"bulk load: store {store_s:.1f}s ({args.n / store_s:,.0f} docs/s; {store_state}), "
            f"bare streaming_bulk {bare_s:.1f}s ({args.n / bare_s:,.0f} docs/s; {bare_state}), "
            f"store/bare docs/s ratio {bare_s / store_s:.2f}",
            f"{'vectors':<12}{'recall@10':>10}{'exact':>8}{'knn p50':>10}{'knn p95':>10}{'hyb p50':>10}{'hyb p95':>10}"]
    for name, r in results.items():
        rows.append(f"{name:<12}{r['recall']:>10.3f}{r['exact_recall']:>8.3f}{r['knn_p50']:>8.1f}ms"
                    f"{r['knn_p95']:>8.1f}ms{r['hybrid_p50']:>8.1f}ms{r['hybrid_p95']:>8.1f}ms  {r['state']}")
    log.info("\n".join(rows))


if __name__ == "__main__":
    main()
