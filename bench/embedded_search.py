"""Search latency per mode on a 100k-document embedded store (vector, exact vector, bm25,
hybrid, hybrid + the fine stage), p50 and p95, and hybrid QPS from 1 vs N threads sharing one store
object (as a gunicorn worker's request threads do). Embedding speed: bench/embed_throughput.py.

The 100k documents are rendered synthetic items embedded by the tiny model (real image
vectors with their descriptions as BM25 text), built once into --store (reused by reruns) in
one load session (the HNSW graph is built once, at its end). The tiny model stands in for the
fine model too (each document's fine vector is its vector, the query's is its text vector), so
"hybrid+rerank" runs the whole fine stage (BM25 of the candidates, their fine vectors read,
fused) at the cost of a 64-d fine model.

    .venv/bin/python bench/embedded_search.py
    .venv/bin/python bench/embedded_search.py --docs 20000 --queries 100 --threads 1,2,4 --thread-rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sidecar.config import Settings
from sidecar.model.encoder import load_encoder
from sidecar.model.synthetic import describe, iter_items, random_caption
from sidecar.retrieval.evaluation import percentiles
from sidecar.retrieval.search import SearchOptions, search
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document


def build_store(encoder, path: Path, *, docs: int, batch: int = 2000) -> EmbeddedStore:
    store = EmbeddedStore(path)
    if store.count() >= docs:
        print(f"reusing {path} ({store.count()} documents)")
        return store
    store.claim(encoder.signature)
    started = time.perf_counter()
    pending: list = []
    with store.bulk_load():
        for item in tqdm(iter_items(docs - store.count(), seed=2024, start=store.count()),
                         total=docs - store.count(), desc="build"):
            pending.append(item)
            if len(pending) == batch:
                _add(store, encoder, pending)
                pending = []
        if pending:
            _add(store, encoder, pending)
    print(f"built {store.count()} documents in {time.perf_counter() - started:.0f} s")
    return store


def _add(store: EmbeddedStore, encoder, items: list) -> None:
    vectors = encoder.encode_images([item.image for item in items])
    store.upsert([Document(id=item.id, vector=v, fine_vector=v, text=describe(item.attributes),
                           metadata=item.attributes, content_hash=item.id) for item, v in zip(items, vectors)])


def bench_search(store: EmbeddedStore, encoder, *, queries: int) -> None:
    rng = random.Random(5)
    texts = [random_caption(item.attributes, rng)[0] for item in iter_items(queries, seed=31337)]
    vectors = encoder.encode_texts(texts)
    sample = texts[:50]
    started = time.perf_counter()
    for text in sample:
        encoder.encode_texts([text])
    encode_ms = (time.perf_counter() - started) / len(sample) * 1000
    print(f"\nsearch over {store.count()} documents, {queries} queries, k=10, candidates=100 "
          f"(query text encode, batch 1: {encode_ms:.2f} ms mean, not included below)")
    print(f"{'mode':<16} {'p50 ms':>8} {'p95 ms':>8}")
    configs = [("vector", "vector", False), ("vector exact", "vector", False), ("bm25", "bm25", False),
               ("hybrid", "hybrid", False), ("hybrid+rerank", "hybrid", True)]
    for label, mode, rerank in configs:
        options = SearchOptions(mode=mode, k=10, candidates=100, rerank=rerank, exact=label == "vector exact")
        warm = search(store, vector=vectors[0], text=texts[0], options=options, fine_vector=vectors[0],
                      fine_model=encoder.signature)
        samples = []
        for text, vector in zip(texts, vectors):
            started = time.perf_counter()
            search(store, vector=vector, text=text, options=options, fine_vector=vector, fine_model=encoder.signature)
            samples.append(time.perf_counter() - started)
        p50, p95 = percentiles(samples)
        # A store built before documents had fine vectors skips the stage after its BM25 and reads.
        note = f"  (fine stage skipped: {warm.rerank_skipped})" if warm.rerank_skipped else ""
        print(f"{label:<16} {p50:>8.2f} {p95:>8.2f}{note}")


def bench_threads(store: EmbeddedStore, encoder, *, threads: list[int], queries: int, rounds: int) -> None:
    """Hybrid QPS (BM25 + HNSW, min-max fusion, no rerank) with 1..N threads on one store object.

    The thread counts take turns, `rounds` times, `queries` queries per turn: on a shared machine
    the load of other jobs drifts, and the per-round ratio to one thread is what stays comparable."""
    rng = random.Random(7)
    texts = [random_caption(item.attributes, rng)[0] for item in iter_items(queries, seed=4242)]
    vectors = encoder.encode_texts(texts)
    options = SearchOptions(mode="hybrid", k=10, candidates=100, rerank=False)
    search(store, vector=vectors[0], text=texts[0], options=options)  # warm
    qps: dict[int, list[float]] = {count: [] for count in threads}
    load_before = os.getloadavg()[0]
    for _ in range(rounds):
        for count in threads:
            qps[count].append(_run_threads(store, texts, vectors, options, count))
    print(f"\nhybrid QPS from threads sharing one store object: {rounds} rounds of {queries} queries per thread "
          f"count (load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")
    print(f"{'threads':>8} {'median QPS':>11} {'per round':>28} {'median x 1 thread':>18}")
    for count in threads:
        ratios = sorted(q / one for q, one in zip(qps[count], qps[threads[0]]))
        per_round = ", ".join(f"{q:.1f}" for q in qps[count])
        print(f"{count:>8} {sorted(qps[count])[rounds // 2]:>11.1f} {per_round:>28} {ratios[rounds // 2]:>17.2f}x")


def _run_threads(store: EmbeddedStore, texts: list[str], vectors, options: SearchOptions, count: int) -> float:
    next_query = iter(range(len(texts)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(next_query, None)
            if i is None:
                return
            search(store, vector=vectors[i], text=texts[i], options=options)

    pool = [threading.Thread(target=worker) for _ in range(count)]
    started = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--store", type=Path, default=Path("data/bench/store-100k"))
    parser.add_argument("--threads", default="1,4", help="thread counts for the hybrid QPS measurement")
    parser.add_argument("--thread-queries", type=int, default=60, help="hybrid queries per thread count and round")
    parser.add_argument("--thread-rounds", type=int, default=5, help="rounds in which the thread counts take turns")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"torch {torch.__version__}")
    encoder = load_encoder(Settings())
    print(f"model: {encoder.signature.describe()} on {encoder.device} ({encoder.precision})")
    store = build_store(encoder, args.store, docs=args.docs)
    try:
        bench_search(store, encoder, queries=args.queries)
        bench_threads(store, encoder, threads=[int(t) for t in args.threads.split(",")], queries=args.thread_queries,
                      rounds=args.thread_rounds)
    finally:
        store.close()


if __name__ == "__main__":
    main()
