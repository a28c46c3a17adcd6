"""Figures for docs/scaling.md: the memory each vector costs per engine (`memory`), and the
overhead of the Ray engine against the local job on one machine (`embed`).

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

    PYTHONPATH=. .venv/bin/python bench/scale_out.py memory                  # 20,000 x 512
    PYTHONPATH=. .venv/bin/python bench/scale_out.py memory --dims 512 768 --url http://127.0.0.1:9250
    CLIP_SIDECAR_CACHE=/work/.test-cache PYTHONPATH=. .venv/bin/python bench/scale_out.py embed --images 2000
"""

from __future__ import annotations

import argparse
import platform
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
from sidecar.stores.opensearch import LOCK_SUFFIX, OpenSearchStore
from sidecar.types import Document


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
        index = store._alias_indices()[0]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["memory", "embed"])
    parser.add_argument("--n", type=int, default=20_000, help="memory: vectors per measurement (default 20,000)")
    parser.add_argument("--dims", type=int, nargs="+", default=[512], help="memory: vector dimensions (default 512)")
    parser.add_argument("--url", default="http://127.0.0.1:9250",
                        help="memory: an OpenSearch node for the lucene rows; '' skips them")
    parser.add_argument("--images", type=int, default=2000, help="embed: corpus size (default 2,000)")
    args = parser.parse_args()
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {platform.processor() or ''}")
    if args.part == "embed":
        embed_local_vs_ray(args.images)
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
