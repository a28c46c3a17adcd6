"""Benchmark the OpenSearch store: bulk load through `clip-sidecar index` vs bare streaming_bulk, ANN
recall vs exact, query latency.

The bulk figure measures the path users run: vector shards on disk (as `clip-sidecar embed` writes
them) loaded by the `clip-sidecar index` command, a process of its own (start-up, reading the
shards, hash comparison, the load session: lock, settings relaxed once and restored, batches of
upserts, final refresh and count check), into an alias set up beforehand as `clip-sidecar
opensearch setup` does. The baseline is opensearch-py's `helpers.streaming_bulk`
with nothing around it, fed the same documents from memory the way a user of opensearch-py would
build them (`vector.tolist()` in the `_source` dict), into an index created the same way, with the
same chunk_size and max_chunk_bytes, keeping the index's refresh_interval (1s), then one refresh.
Both clocks stop when the documents are searchable.

Fairness: the JVM is warmed up first by both paths (a cold node's first load runs ~1.6x slower);
the two paths then alternate, `--repeat` times each, and the ratio is taken over the sums. The
recall and latency rows are measured on the index the last `clip-sidecar index` run loaded, after
its merges finished, and on a second index of uniform random vectors.

    .venv/bin/python bench/opensearch_bench.py                       # 30,000 x 512, 3 rounds
    .venv/bin/python bench/opensearch_bench.py --n 100000 --repeat 1
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from opensearchpy import helpers

from sidecar.ingest.shards import ShardRow, ShardSet
from sidecar.retrieval.evaluation import found_of_exact
from sidecar.retrieval.search import SearchOptions, search, uses_native_hybrid
from sidecar.stores.opensearch import OpenSearchStore
from sidecar.stores.opensearch_lock import LOCK_SUFFIX
from sidecar.types import Document, ModelSignature, ScoredId

log = logging.getLogger("opensearch_bench")
SIGNATURE_OF = "bench"


def structured(n: int, dim: int, *, latent: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors with low intrinsic dimension: a random linear map of a `latent`-d Gaussian."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, latent)) @ rng.normal(size=(latent, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def uniform(n: int, dim: int, *, seed: int = 0) -> np.ndarray:
    """Uniform on the unit sphere: no structure, HNSW's worst case."""
    x = np.random.default_rng(seed).normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def signature(dim: int) -> ModelSignature:
    return ModelSignature(model=SIGNATURE_OF, weights="none", dim=dim)


def documents(vectors: np.ndarray) -> list[Document]:
    return [Document(id=str(i), vector=v, text=f"item {i} group{i % 50}", metadata={"group": str(i % 50)},
                     content_hash=f"h{i}") for i, v in enumerate(vectors)]


def write_shards(out: Path, docs: list[Document], *, shard_rows: int = 4096) -> Path:
    """The shards `clip-sidecar embed` would have written for `docs`."""
    shards = ShardSet(out)
    shards.start(signature(len(docs[0].vector)), preprocessing={})
    for start in range(0, len(docs), shard_rows):
        part = docs[start:start + shard_rows]
        shards.write_shard(np.stack([d.vector for d in part]),
                           [ShardRow(id=d.id, path=f"{d.id}.jpg", text=d.text, metadata=dict(d.metadata),
                                     content_hash=d.content_hash, image_hash=d.content_hash) for d in part])
    return out


def new_alias() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


def store_for(url: str, alias: str, *, primaries: int = 1, replicas: int | str = "0-1") -> OpenSearchStore:
    """What `clip-sidecar index` opens (default settings, or SIDECAR_OPENSEARCH_SHARDS / _REPLICAS)."""
    return OpenSearchStore(url=url, index=alias, number_of_shards=primaries, number_of_replicas=replicas)


def drop(url: str, alias: str) -> None:
    store = store_for(url, alias)
    store.client.indices.delete(index=f"{alias}-v*,{alias}{LOCK_SUFFIX}", ignore_unavailable=True)
    store.close()


def load_bare(url: str, docs: list[Document]) -> float:
    """opensearch-py's streaming_bulk with nothing around it, then a refresh; returns seconds."""
    alias = new_alias()
    store = store_for(url, alias)
    try:
        store.setup(len(docs[0].vector))  # the same index body as the CLI's
        target = store.alias_indices()[0]
        actions = ({"_index": target, "_id": d.id,
                    "_source": {"id": d.id, "vector": d.vector.tolist(), "text": d.text,
                                "metadata": dict(d.metadata), "content_hash": d.content_hash}} for d in docs)
        started = time.perf_counter()
        for _ in helpers.streaming_bulk(store.client, actions, chunk_size=store.chunk_size,
                                        max_chunk_bytes=store.max_chunk_bytes):
            pass
        store.client.indices.refresh(index=target)
        return time.perf_counter() - started
    finally:
        store.close()
        drop(url, alias)


def load_cli(url: str, shards: Path, alias: str, *, dim: int, primaries: int = 1, replicas: int | str = "0-1") -> float:
    """`clip-sidecar index SHARDS --store opensearch` as a user runs it, after the setup a user runs
    first (`clip-sidecar opensearch setup`: index of `primaries` shards and `replicas` replicas, alias,
    lock index; untimed, as the bare path's index creation is); returns seconds."""
    store = store_for(url, alias, primaries=primaries, replicas=replicas)
    try:
        store.claim(signature(dim))
    finally:
        store.close()
    command = [sys.executable, "-m", "sidecar.cli", "-q", "index", str(shards), "--store", "opensearch",
               "--opensearch-url", url, "--opensearch-index", alias]
    env = {**os.environ, "SIDECAR_OPENSEARCH_SHARDS": str(primaries), "SIDECAR_OPENSEARCH_REPLICAS": str(replicas)}
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
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
    """ANN recall@k against numpy ground truth; the store's exact (knn_score) search checked on a
    subset; latency of k-NN, BM25 and (with neural-search) the store's native hybrid query; and
    the hybrid search as `/v1/search` runs it (`sidecar.retrieval.search`: 100 candidates fused
    natively or in Python by the store's rule, the top k fetched; no fine model); and a fetch of 100
    random documents with their vectors and without (what the fine stage reads), alternating."""
    scores = queries @ vectors.T
    truth = np.argsort(-scores, axis=1)[:, :k]
    recalls, exact_recalls, knn_ms, text_ms, hybrid_ms, search_ms = [], [], [], [], [], []
    fetch_ms: dict[bool, list[float]] = {True: [], False: []}
    rng = np.random.default_rng(0)
    options = SearchOptions(mode="hybrid", k=k, rerank=False)
    hybrid = store.has_neural_search()
    for i, (q, t) in enumerate(zip(queries, truth)):
        truth_hits = [ScoredId(str(j), float(scores[i, j])) for j in t]
        started = time.perf_counter()
        ann = store.vector_search(q, k)
        knn_ms.append((time.perf_counter() - started) * 1000)
        recalls.append(found_of_exact(ann, truth_hits) / k)
        if i < exact_queries:
            exact = store.vector_search(q, k, exact=True)
            exact_recalls.append(found_of_exact(exact, truth_hits) / k)
        started = time.perf_counter()
        store.text_search(f"group{i % 50}", k)
        text_ms.append((time.perf_counter() - started) * 1000)
        if hybrid:
            started = time.perf_counter()
            store.hybrid_search(q, f"group{i % 50}", k)
            hybrid_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        search(store, vector=q, text=f"group{i % 50}", options=options)
        search_ms.append((time.perf_counter() - started) * 1000)
        sample = [str(j) for j in rng.choice(len(vectors), min(100, len(vectors)), replace=False)]
        for with_vectors in (True, False) if i % 2 else (False, True):
            started = time.perf_counter()
            store.fetch(sample, vectors=with_vectors)
            fetch_ms[with_vectors].append((time.perf_counter() - started) * 1000)
    nan = float("nan")
    return {"recall": float(np.mean(recalls)), "exact_recall": float(np.mean(exact_recalls)),
            "knn_p50": float(np.percentile(knn_ms, 50)), "knn_p95": float(np.percentile(knn_ms, 95)),
            "text_p50": float(np.percentile(text_ms, 50)), "text_p95": float(np.percentile(text_ms, 95)),
            "hybrid_p50": float(np.percentile(hybrid_ms, 50)) if hybrid_ms else nan,
            "hybrid_p95": float(np.percentile(hybrid_ms, 95)) if hybrid_ms else nan,
            "search_p50": float(np.percentile(search_ms, 50)), "search_p95": float(np.percentile(search_ms, 95)),
            "search_fusion": "native" if uses_native_hybrid(store, options) else "python",
            "fetch_p50": float(np.percentile(fetch_ms[True], 50)),
            "fetch_bare_p50": float(np.percentile(fetch_ms[False], 50))}


def measured(store: OpenSearchStore, vectors: np.ndarray, queries: np.ndarray, *, exact_queries: int) -> dict:
    merge_wait = wait_for_merges(store)
    result = recall_and_latency(store, vectors, queries, exact_queries=exact_queries)
    result["state"] = f"{index_state(store)} (merges waited {merge_wait:.0f}s)"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:9250")
    parser.add_argument("--n", type=int, default=30_000, help="documents per load (bulk comparison and recall)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="loads per path, alternating")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--exact-queries", type=int, default=20, help="queries also run as exact knn_score")
    parser.add_argument("--warmup", type=int, default=5000, help="documents per path loaded and dropped first")
    parser.add_argument("--no-recall", action="store_true", help="only the bulk comparison")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("opensearch").setLevel(logging.WARNING)

    data = structured(args.n + args.queries, args.dim, seed=1)
    docs = documents(data[:args.n])
    with tempfile.TemporaryDirectory(prefix="opensearch-bench-") as tmp:
        shards = write_shards(Path(tmp) / "shards", docs)
        if args.warmup:
            load_bare(args.url, docs[:args.warmup])
            warm = new_alias()
            load_cli(args.url, write_shards(Path(tmp) / "warmup", docs[:args.warmup]), warm, dim=args.dim)
            drop(args.url, warm)
        bare_s, cli_s, alias = [], [], ""
        for round_ in range(args.repeat):
            bare_s.append(load_bare(args.url, docs))
            if alias:
                drop(args.url, alias)
            alias = new_alias()
            cli_s.append(load_cli(args.url, shards, alias, dim=args.dim))
            log.info("round %d: bare %.1f s, clip-sidecar index %.1f s", round_ + 1, bare_s[-1], cli_s[-1])
    store = store_for(args.url, alias)
    results = {}
    try:
        state = index_state(store)
        if not args.no_recall:
            results["structured"] = measured(store, data[:args.n], data[args.n:], exact_queries=args.exact_queries)
    finally:
        store.close()
        drop(args.url, alias)
    if not args.no_recall:
        random_data = uniform(args.n + args.queries, args.dim, seed=2)
        alias = new_alias()
        store = store_for(args.url, alias)
        try:
            store.claim(signature(args.dim))
            store.upsert(documents(random_data[:args.n]))
            results["uniform"] = measured(store, random_data[:args.n], random_data[args.n:],
                                          exact_queries=args.exact_queries)
        finally:
            store.close()
            drop(args.url, alias)

    rows = [f"machine {platform.machine()} ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), "
            f"{args.n} x {args.dim}, lucene HNSW m={store.m} ef_construction={store.ef_construction} "
            f"ef_search={store.ef_search}, chunk_size {store.chunk_size}",
            f"bulk load, {args.repeat} alternating rounds: clip-sidecar index {sum(cli_s):.1f}s "
            f"({args.n * len(cli_s) / sum(cli_s):,.0f} docs/s; per round {', '.join(f'{s:.1f}' for s in cli_s)}; "
            f"last index {state}), bare streaming_bulk {sum(bare_s):.1f}s "
            f"({args.n * len(bare_s) / sum(bare_s):,.0f} docs/s; per round {', '.join(f'{s:.1f}' for s in bare_s)}), "
            f"index/bare docs/s ratio {sum(bare_s) / sum(cli_s):.2f}"]
    if results:
        rows.append(f"{'vectors':<12}{'recall@10':>10}{'exact':>8}{'knn p50':>10}{'knn p95':>10}{'bm25 p50':>10}"
                    f"{'bm25 p95':>10}{'hyb p50':>10}{'hyb p95':>10}{'search p50':>12}{'search p95':>12}"
                    f"{'fetch 100 p50 with / without vectors':>40}")
        for name, r in results.items():
            rows.append(f"{name:<12}{r['recall']:>10.3f}{r['exact_recall']:>8.3f}{r['knn_p50']:>8.1f}ms"
                        f"{r['knn_p95']:>8.1f}ms{r['text_p50']:>8.1f}ms{r['text_p95']:>8.1f}ms"
                        f"{r['hybrid_p50']:>8.1f}ms{r['hybrid_p95']:>8.1f}ms{r['search_p50']:>10.1f}ms"
                        f"{r['search_p95']:>10.1f}ms{r['fetch_p50']:>26.1f} / {r['fetch_bare_p50']:.1f} ms"
                        f"  (search fused {r['search_fusion']}) {r['state']}")
    log.info("\n".join(rows))


if __name__ == "__main__":
    main()
