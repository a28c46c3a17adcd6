"""Recall@10 of a store's HNSW (embedded: FAISS; OpenSearch: lucene) against its own exact search, on structured and random vectors.

Structured set: a 32-d latent Gaussian mixture (64 components, unit-variance centres, within-component
std 0.5) mapped to 512-d by a fixed random Gaussian projection (entries N(0, 1/32), so each
signal coordinate has std ~1.1), plus isotropic noise (std 0.05 per coordinate, ~4.5% of the signal's
norm), then L2-normalised: a low intrinsic dimension, like CLIP embeddings of a real corpus. Raising
the noise to std 0.5 (~45% of the signal) left recall unchanged in a spot check. Random set: uniformly random unit
vectors in 512-d (normalised Gaussians), the worst case for any graph index. Queries are fresh
draws from the same distribution, not stored points.

    .venv/bin/python bench/hnsw_recall.py [--n 20000] [--queries 200] [--target-recall 0.99]
        [--store opensearch --opensearch-url http://127.0.0.1:9250]

Both stores are opened as `clip-sidecar` opens them (`open_store`, default index settings; OpenSearch:
one shard, no replica, a fresh `bench-recall-*` alias per data set, deleted at the end), and the sweep
names ef_search per query. With --target-recall, each store is then calibrated for it (`clip-sidecar
store calibrate --ann-only`: the lowest efSearch reaching the target on stored vectors, saved with the
store) and the fresh queries are searched at the effort it chose, their recall and p50/p95 measured
beside exact search's in the same run, and the lowest efSearch that reaches the target on those fresh
queries is found by doubling and bisection, to show how far above it the calibration lands.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import faiss
import numpy as np

from sidecar.config import Settings
from sidecar.retrieval.calibration import FIRST_EF_SEARCH, MAX_EF_SEARCH, calibrate
from sidecar.retrieval.evaluation import found_of_exact
from sidecar.stores import open_store
from sidecar.stores.base import Store
from sidecar.types import Document, ModelSignature, ScoredId

sys.path.insert(0, str(Path(__file__).resolve().parent))
from opensearch_bench import drop, index_state, wait_for_merges  # noqa: E402  (bench/ is not a package)

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


class StoreFor:
    """Opens the store a data set is measured on, as `clip-sidecar` opens it (`open_store`)."""

    def __init__(self, kind: str, *, workdir: str, opensearch_url: str):
        self.kind = kind
        self.workdir = workdir
        self.opensearch_url = opensearch_url
        self.aliases: list[str] = []

    def open(self, name: str, *, target_recall: float = 0.0) -> Store:
        if self.kind == "embedded":
            settings = Settings.from_env({}, store="embedded", store_path=Path(self.workdir) / name,
                                         target_recall=target_recall)
        else:
            if not any(alias.endswith(f"-{name}") for alias in self.aliases):
                self.aliases.append(f"bench-recall-{uuid.uuid4().hex[:8]}-{name}")
            alias = next(alias for alias in self.aliases if alias.endswith(f"-{name}"))
            # One shard and no replica: one node, one HNSW graph per segment.
            settings = Settings.from_env({}, store="opensearch", opensearch_url=self.opensearch_url,
                                         opensearch_index=alias, opensearch_replicas=0, target_recall=target_recall)
        return open_store(settings)

    def drop_all(self) -> None:
        for alias in self.aliases:
            drop(self.opensearch_url, alias)


def recall_at_10(found: list[list[ScoredId]], truth: list[list[ScoredId]]) -> float:
    return float(np.mean([found_of_exact(f, t) / 10 for f, t in zip(found, truth)]))


def measure(name: str, corpus: np.ndarray, queries: np.ndarray, stores: StoreFor, target_recall: float = 0.0) -> None:
    docs = [Document(id=str(i), vector=vector, content_hash=str(i)) for i, vector in enumerate(corpus)]
    store = stores.open(name)
    try:
        store.claim(ModelSignature(model="bench", weights=name, dim=corpus.shape[1]))
        start = time.perf_counter()
        store.upsert(docs)
        print(f"{name}: upsert + HNSW build of {len(corpus)} x {corpus.shape[1]}: {time.perf_counter() - start:.1f} s")
        if stores.kind == "opensearch":
            waited = wait_for_merges(store)
            print(f"{name}: {index_state(store)} (merges waited {waited:.0f} s)")
        truth = [store.vector_search(q, 10, exact=True) for q in queries]
        for ef_search in EF_SEARCH:
            start = time.perf_counter()
            found = [store.vector_search(q, 10, ef_search=ef_search) for q in queries]
            per_query_ms = (time.perf_counter() - start) / len(queries) * 1e3
            print(f"{name}: efSearch {ef_search:4d}  recall@10 {recall_at_10(found, truth):.3f}  "
                  f"{per_query_ms:.2f} ms/query (store call)")
    finally:
        store.close()
    if target_recall:
        measure_target(name, stores, queries, truth, target_recall)


def timed_search(store: Store, queries: np.ndarray, **kwargs) -> tuple[list[list[ScoredId]], np.ndarray]:
    found, ms = [], []
    for q in queries:
        start = time.perf_counter()
        found.append(store.vector_search(q, 10, **kwargs))
        ms.append((time.perf_counter() - start) * 1e3)
    return found, np.array(ms)


def lowest_reaching(store: Store, queries: np.ndarray, truth: list[list[ScoredId]], target_recall: float) -> str:
    """The lowest efSearch whose recall@10 on these queries reaches the target (doubling, then
    bisecting to one; recall is near enough monotone in efSearch), with the recalls either side."""
    recalls: dict[int, float] = {}

    def recall(ef: int) -> float:
        if ef not in recalls:
            recalls[ef] = recall_at_10(timed_search(store, queries, ef_search=ef)[0], truth)
        return recalls[ef]

    low, high = 9, FIRST_EF_SEARCH  # low: known to miss (below k=10, ef_search is raised to k)
    while recall(high) < target_recall and high < MAX_EF_SEARCH:
        low, high = high, min(2 * high, MAX_EF_SEARCH)
    if recall(high) < target_recall:
        return f"none up to {MAX_EF_SEARCH} ({recall(high):.3f})"
    while high - low > 1:
        middle = (low + high) // 2
        if recall(middle) >= target_recall:
            high = middle
        else:
            low = middle
    below = f"{low}: {recalls[low]:.3f}, " if low in recalls else ""
    return f"{high} ({below}{high}: {recalls[high]:.3f})"


def measure_target(name: str, stores: StoreFor, queries: np.ndarray, truth: list[list[ScoredId]],
                   target_recall: float) -> None:
    store = stores.open(name, target_recall=target_recall)
    try:
        start = time.perf_counter()
        effort = calibrate(store, target_recall=target_recall, k=10, queries=300, allow_exact=False)
        store.effort.save(effort)
        print(f"{name}: calibration in {time.perf_counter() - start:.1f} s: {effort.describe().splitlines()[0]}")
        # Side by side in one run: the calibrated effort (no ef_search named), then exact search.
        found, ann_ms = timed_search(store, queries)
        _, exact_ms = timed_search(store, queries, exact=True)
        lowest = lowest_reaching(store, queries, truth, target_recall)
    finally:
        store.close()
    recall = recall_at_10(found, truth)
    print(f"{name}: target {target_recall:g} -> ef_search {effort.ef_search}: fresh-query recall@10 {recall:.3f} "
          f"({'meets' if recall >= target_recall else 'MISSES'} the target); "
          f"p50/p95 {np.percentile(ann_ms, 50):.2f}/{np.percentile(ann_ms, 95):.2f} ms "
          f"(exact {np.percentile(exact_ms, 50):.2f}/{np.percentile(exact_ms, 95):.2f} ms); "
          f"lowest efSearch reaching it on these queries: {lowest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--target-recall", type=float, default=0.0, help="calibrate for it, then measure (0: skip)")
    parser.add_argument("--store", choices=("embedded", "opensearch"), default="embedded",
                        help="embedded: FAISS HNSW in a temporary directory; opensearch: lucene HNSW on a node")
    parser.add_argument("--opensearch-url", default="http://127.0.0.1:9250",
                        help="the node --store opensearch indexes into (fresh bench-recall-* aliases, deleted after)")
    args = parser.parse_args()
    if args.store == "embedded":
        print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads, M=32 efConstruction=200")
    with tempfile.TemporaryDirectory() as workdir:
        stores = StoreFor(args.store, workdir=workdir, opensearch_url=args.opensearch_url)
        if args.store == "opensearch":
            probe = stores.open("probe")
            print(f"OpenSearch {probe.client.info()['version']['number']} at {args.opensearch_url}, "
                  f"engine {probe.engine}, m={probe.m} ef_construction={probe.ef_construction}")
            probe.close()
        try:
            structured = latent_mixture(args.n + args.queries, seed=1)
            measure("structured", structured[: args.n], structured[args.n :], stores, args.target_recall)
            measure("random", uniform_unit(args.n, seed=2), uniform_unit(args.queries, seed=3), stores,
                    args.target_recall)
        finally:
            stores.drop_all()


if __name__ == "__main__":
    main()
