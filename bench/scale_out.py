"""Figures for docs/scaling.md: the memory each vector costs per engine (`memory`), the
overhead of the Ray engine against the local job on one machine (`embed`), and bulk load and query
latency on one OpenSearch node against a 3-node cluster (`cluster`).

faiss (the library OpenSearch's faiss engine wraps, same index types): an index of N vectors is
built and serialised; the bytes per vector are (size with N vectors - size trained but empty) / N,
so fixed costs (IVF centroids, PQ codebooks) are not spread over a small N. The index types are
HNSW over float32 (`hnsw` + flat), HNSW over fp16 (`encoder: sq, type: fp16`) and IVF + product
quantisation (`ivf` + `pq`, code_size 8, m = dim / 8 sub-quantisers: 1 byte each). M = 16, as the
store's default `m`.

lucene (the engine of the default mapping): N documents are loaded into an OpenSearch index made
by the store itself (`OpenSearchStore.setup`, the mapping users get), merged to one segment, and
the segment's files are summed by kind (`_stats/segments?include_segment_file_sizes`): `vec`
(the float32 vectors), `vex` (the HNSW graph), and everything (postings, doc values, _source).
Lucene reads vectors and graph through the page cache, so `vec` + `vex` is the memory a node needs
for searches to stay off disk.

embed: the same synthetic corpus (64-px JPEGs) embedded by the model in the settings (the
environment's CLIP_SIDECAR_CACHE etc.) with `embed_corpus` (the local job, 2 decode workers) and
with `embed_corpus_on_ray` on a Ray instance this process starts on this machine (address
"local"), each into a fresh folder, one run each; the Ray figure includes Ray's start-up, which a
user pays per job too.

cluster: the same documents (structured 512-d vectors, text "item I groupG") loaded and queried
on a 1-node instance (index of 1 shard, 0 replicas: a replica has no second node to live on) and
on a 3-node cluster (3 shards, 1 replica), with bench/opensearch_bench.py's functions: shards on
disk loaded by `clip-sidecar index --store opensearch` (its own process, settings
SIDECAR_OPENSEARCH_SHARDS / SIDECAR_OPENSEARCH_REPLICAS) after the untimed setup, each JVM warmed
first by a smaller load; the layouts alternate, `--repeat` loads each. docs/s counts until the
command exits (documents searchable on the primaries); "+ replicas" adds the wait for green after
it, when the load session has restored the replica and the replica copies are built. Then, on the
last load of each layout after its merges: recall@10 (ANN and exact vs numpy) and p50/p95 of k-NN,
BM25 and native hybrid queries, and of the hybrid search `/v1/search` runs (fused natively on one
shard, in Python on several), one at a time, through the store's client on the first URL. The bench
takes running instances; start and stop them with the repo's script:

    OPENSEARCH_PORT=9690 OPENSEARCH_NODE_DIR=/tmp/sb-one scripts/opensearch-local start
    OPENSEARCH_PORT=9660 OPENSEARCH_NODE_DIR=/tmp/clip-sidecar-cluster scripts/opensearch-local start --nodes 3
    (same variables) scripts/opensearch-local stop

    PYTHONPATH=. .venv/bin/python bench/scale_out.py memory                  # 20,000 x 512
    PYTHONPATH=. .venv/bin/python bench/scale_out.py memory --dims 512 768 --url http://127.0.0.1:9250
    CLIP_SIDECAR_CACHE=/work/.test-cache PYTHONPATH=. .venv/bin/python bench/scale_out.py embed --images 2000
    PYTHONPATH=. .venv/bin/python bench/scale_out.py cluster --n 20000     # 1 node at :9690, 3 at :9660
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from sidecar.config import Settings
from sidecar.ingest.embed import embed_corpus
from sidecar.model.encoder import load_encoder
from sidecar.model.synthetic import write_corpus
from sidecar.stores.opensearch import OpenSearchStore
from sidecar.stores.opensearch_lock import LOCK_SUFFIX
from sidecar.types import Document

sys.path.insert(0, str(Path(__file__).resolve().parent))
from opensearch_bench import (  # noqa: E402  (bench/ is not a package)
    documents,
    drop,
    load_cli,
    measured,
    new_alias,
    store_for,
    structured,
    write_shards,
)


def unit_vectors(n: int, dim: int, *, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def faiss_bytes_per_vector(vectors: np.ndarray) -> dict[str, float]:
    """Marginal serialised bytes per vector of each faiss index type."""
    dim = vectors.shape[1]
    ip = faiss.METRIC_INNER_PRODUCT

    def ivfpq() -> faiss.Index:
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, 64, dim // 8, 8, ip)

    kinds = {"faiss hnsw float32": lambda: faiss.IndexHNSWFlat(dim, 16, ip),
             "faiss hnsw fp16": lambda: faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, 16, ip),
             f"faiss ivf pq (m={dim // 8}, 8 bits)": ivfpq}
    out = {}
    for name, make in kinds.items():
        index = make()
        index.train(vectors)
        empty = faiss.serialize_index(index).size
        index.add(vectors)
        out[name] = (faiss.serialize_index(index).size - empty) / len(vectors)
    return out


def lucene_bytes_per_vector(url: str, vectors: np.ndarray) -> dict[str, float]:
    """Bytes per document of one merged lucene segment, by file kind."""
    alias = f"bench-mem-{uuid.uuid4().hex[:8]}"
    store = OpenSearchStore(url=url, index=alias, number_of_replicas=0)
    try:
        store.setup(vectors.shape[1])
        store.upsert([Document(id=str(i), vector=v, text=f"item {i}", metadata={"group": str(i % 50)},
                               content_hash=f"h{i}") for i, v in enumerate(vectors)])
        index = store.alias_indices()[0]
        store.client.indices.forcemerge(index=index, max_num_segments=1, request_timeout=900)
        # The searcher must drop the merged-away segments, or their files are counted too.
        store.client.indices.refresh(index=index)
        stats = store.client.indices.stats(index=index, metric="segments,store",
                                           params={"include_segment_file_sizes": "true"})
        primaries = stats["indices"][index]["primaries"]
        assert primaries["segments"]["count"] == 1, primaries["segments"]["count"]
        files = {kind: body["size_in_bytes"] for kind, body in primaries["segments"]["file_sizes"].items()}
        n = len(vectors)
        return {"lucene vec (float32 vectors)": files.get("vec", 0) / n,
                "lucene vex (HNSW graph)": files.get("vex", 0) / n,
                "lucene whole index on disk (with _source, text, ids)": primaries["store"]["size_in_bytes"] / n}
    finally:
        store.client.indices.delete(index=f"{alias}-v*,{alias}{LOCK_SUFFIX}", ignore_unavailable=True)
        store.close()


def embed_local_vs_ray(images: int) -> None:
    from sidecar.ingest.ray_engine import embed_corpus_on_ray  # the ray extra

    settings = Settings()
    encoder = load_encoder(settings)
    with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        manifest = write_corpus(Path(tmp) / "corpus", images, seed=5)
        started = time.perf_counter()
        local = embed_corpus(encoder, manifest, Path(tmp) / "local", workers=2, progress=False)
        local_s = time.perf_counter() - started
        started = time.perf_counter()
        on_ray = embed_corpus_on_ray(settings, manifest, Path(tmp) / "ray", progress=False)
        ray_s = time.perf_counter() - started
    print(f"| engine | images | seconds | images/s |\n| --- | --- | --- | --- |\n"
          f"| local (2 decode workers) | {images} | {local_s:.1f} | {images / local_s:,.0f} |\n"
          f"| ray (address local, defaults) | {images} | {ray_s:.1f} | {images / ray_s:,.0f} |\n"
          f"ray / local images/s: {local_s / ray_s:.2f}\nlocal: {local.describe()}\nray: {on_ray.describe()}")


def wait_green(store: OpenSearchStore) -> float:
    """Seconds until every shard copy of the store's index is assigned and started."""
    started = time.perf_counter()
    health = store.client.cluster.health(index=store.alias, wait_for_status="green", timeout="900s",
                                         request_timeout=960)
    if health["status"] != "green":
        raise RuntimeError(f"{store.alias} on {store.url} still {health['status']} after 900 s")
    return time.perf_counter() - started


def placement(store: OpenSearchStore) -> str:
    """Where the index's shard copies live, e.g. '3 primaries + 3 replicas on 3 nodes'."""
    rows = store.client.cat.shards(index=store.alias, format="json")
    primaries = sum(row["prirep"] == "p" for row in rows)
    return (f"{primaries} primaries + {len(rows) - primaries} replicas on "
            f"{len({row['node'] for row in rows})} node(s)")


def one_node_vs_cluster(layouts: dict[str, tuple[str, int, int]], *, n: int, dim: int, queries: int,
                        repeat: int, warmup: int) -> None:
    """Bulk load through `clip-sidecar index` and query latency on each layout (url, shards, replicas)."""
    data = structured(n + queries, dim, seed=1)
    docs = documents(data[:n])
    load_s: dict[str, list[float]] = {name: [] for name in layouts}
    green_s: dict[str, list[float]] = {name: [] for name in layouts}
    aliases: dict[str, str] = {}
    results, where, counts = {}, {}, {}
    try:
        with tempfile.TemporaryDirectory(prefix="scale-out-cluster-") as tmp:
            shards = write_shards(Path(tmp) / "shards", docs)
            warm = write_shards(Path(tmp) / "warmup", docs[:warmup])
            for url, primaries, replicas in layouts.values():
                alias = new_alias()
                load_cli(url, warm, alias, dim=dim, primaries=primaries, replicas=replicas)
                drop(url, alias)
            for round_ in range(repeat):
                # Alternating the order spreads the drift of a shared machine's load over both layouts.
                for name in (list(layouts) if round_ % 2 == 0 else list(reversed(layouts))):
                    url, primaries, replicas = layouts[name]
                    if name in aliases:
                        drop(url, aliases.pop(name))
                    aliases[name] = new_alias()
                    load_s[name].append(load_cli(url, shards, aliases[name], dim=dim, primaries=primaries,
                                                 replicas=replicas))
                    store = store_for(url, aliases[name], primaries=primaries, replicas=replicas)
                    try:
                        green_s[name].append(wait_green(store))
                    finally:
                        store.close()
                    print(f"# round {round_ + 1}, {name}: clip-sidecar index {load_s[name][-1]:.1f} s, "
                          f"then green {green_s[name][-1]:.1f} s", flush=True)
        for name, (url, primaries, replicas) in layouts.items():
            store = store_for(url, aliases[name], primaries=primaries, replicas=replicas)
            try:
                counts[name] = store.count()
                where[name] = placement(store)
                results[name] = measured(store, data[:n], data[n:], exact_queries=20)
            finally:
                store.close()
    finally:
        for name, alias in aliases.items():
            drop(layouts[name][0], alias)

    print(f"# {n} x {dim}, {queries} queries each, load average {os.getloadavg()[0]:.1f} at the end")
    print("| layout | index | documents after load | `clip-sidecar index` docs/s (s per load) | + replicas green: docs/s "
          "| recall@10 ANN / exact | k-NN p50 / p95 | BM25 p50 / p95 | native hybrid p50 / p95 "
          "| `/v1/search` hybrid p50 / p95 (fused where) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        loads, greens = load_s[name], green_s[name]
        print(f"| {name} | {where[name]} | {counts[name]:,} | {n * len(loads) / sum(loads):,.0f} "
              f"({', '.join(f'{s:.1f}' for s in loads)}) | {n * len(loads) / (sum(loads) + sum(greens)):,.0f} "
              f"(green after {', '.join(f'{s:.1f}' for s in greens)} s) | {r['recall']:.3f} / {r['exact_recall']:.3f} "
              f"| {r['knn_p50']:.1f} / {r['knn_p95']:.1f} ms | {r['text_p50']:.1f} / {r['text_p95']:.1f} ms "
              f"| {r['hybrid_p50']:.1f} / {r['hybrid_p95']:.1f} ms "
              f"| {r['search_p50']:.1f} / {r['search_p95']:.1f} ms ({r['search_fusion']}) |")
        print(f"# {name}: {r['state']}")
    one, many = list(results)
    print(f"{many} / {one}: docs/s {sum(load_s[one]) / sum(load_s[many]):.2f}, with replicas "
          f"{(sum(load_s[one]) + sum(green_s[one])) / (sum(load_s[many]) + sum(green_s[many])):.2f}; "
          + ", ".join(f"{kind} p50 {results[many][kind + '_p50'] / results[one][kind + '_p50']:.2f}"
                      for kind in ("knn", "text", "hybrid", "search")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["memory", "embed", "cluster"])
    parser.add_argument("--n", type=int, default=20_000,
                        help="memory: vectors per measurement; cluster: documents per load (default 20,000)")
    parser.add_argument("--dims", type=int, nargs="+", default=[512],
                        help="memory: vector dimensions; cluster: the first one (default 512)")
    parser.add_argument("--url", default="http://127.0.0.1:9250",
                        help="memory: an OpenSearch node for the lucene rows; '' skips them")
    parser.add_argument("--images", type=int, default=2000, help="embed: corpus size (default 2,000)")
    parser.add_argument("--one-node", default="http://127.0.0.1:9690", help="cluster: the 1-node instance's URL")
    parser.add_argument("--cluster-url", default="http://127.0.0.1:9660", help="cluster: a node of the 3-node cluster")
    parser.add_argument("--repeat", type=int, default=2, help="cluster: loads per layout, alternating (default 2)")
    parser.add_argument("--queries", type=int, default=100, help="cluster: queries of each kind (default 100)")
    parser.add_argument("--warmup", type=int, default=2000, help="cluster: documents of each JVM's warm-up load")
    args = parser.parse_args()
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {platform.processor() or ''}")
    if args.part == "embed":
        embed_local_vs_ray(args.images)
        return
    if args.part == "cluster":
        logging.getLogger("opensearch").setLevel(logging.WARNING)
        one_node_vs_cluster({"1 node": (args.one_node, 1, 0), "3 nodes": (args.cluster_url, 3, 1)}, n=args.n,
                            dim=args.dims[0], queries=args.queries, repeat=args.repeat, warmup=args.warmup)
        return
    faiss.omp_set_num_threads(1)  # a shared box: one core
    print(f"# n={args.n}, faiss {faiss.__version__}")
    print("| engine, layout | dim | bytes per vector | × dim × 4 |")
    print("| --- | --- | --- | --- |")
    for dim in args.dims:
        vectors = unit_vectors(args.n, dim)
        started = time.perf_counter()
        rows = faiss_bytes_per_vector(vectors)
        if args.url:
            rows.update(lucene_bytes_per_vector(args.url, vectors))
        for name, size in rows.items():
            print(f"| {name} | {dim} | {size:,.0f} | {size / (dim * 4):.2f} |", flush=True)
        print(f"# dim {dim}: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
