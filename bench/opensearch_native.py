"""OpenSearch calling the sidecar, measured against the sidecar's own paths, side by side in one run.

- Ingest: documents with a base64 image through the index's default pipeline (OpenSearch calls the
  sidecar once per document) vs the index step of `clip-sidecar index` (`index_shards`, in this
  process: no interpreter start) of the same documents with precomputed vectors, the embed step
  (`embed_corpus`, 1 decode worker) timed apart. Each round loads a fresh index; rounds alternate.
- Query: a `neural` query_text through ml-commons vs /v1/search (vector mode, no rerank: the same
  work) for the same texts, interleaved one by one, after a warm-up that caches every text vector
  on both paths (so the figures compare the plumbing, not the model).
- Batching: what reached the sidecar (its /metrics): documents per call on each endpoint (a call
  refused 503 and retried by ml-commons counts again: the 503s are reported beside), and the forward
  passes the micro-batcher made of the concurrent image calls; plus a text pipeline (text_embedding,
  batch_size) over text-only documents.

Needs the local node (scripts/opensearch-local start) and a cached model:

    CLIP_SIDECAR_CACHE=/work/.test-cache PYTHONPATH=. .venv/bin/python bench/opensearch_native.py
    PYTHONPATH=. .venv/bin/python bench/opensearch_native.py --documents 2000 --rounds 3 --queries 300
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from opensearchpy import OpenSearch, helpers
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import TINY_MODEL, Settings
from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.indexing import index_shards
from sidecar.model.encoder import load_encoder
from sidecar.model.synthetic import COLORS, SHAPES, SIZES, write_corpus
from sidecar.model.tiny_model import checkpoint_path
from sidecar.retrieval.evaluation import percentiles
from sidecar.stores.opensearch import OpenSearchStore

ROOT = Path(__file__).resolve().parent.parent
TEXTS = "/v1/opensearch/embeddings/texts"
TEXT_IMAGE = "/v1/opensearch/embeddings/text-image"


def cli(*args: str, env: dict[str, str]) -> float:
    """Run `clip-sidecar ARGS`; returns its wall time."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", *args], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def store_args(url: str, alias: str) -> list[str]:
    return ["--opensearch-url", url, "--opensearch-index", alias]


def start_sidecar(port: int, *, env: dict[str, str], threads: int, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        process = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "-q", "serve", "--port", str(port),
                                    "--threads", str(threads)], cwd=ROOT, env={**env, "GUNICORN_LOGLEVEL": "warning"},
                                   stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except requests.RequestException:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the sidecar exited: {log.read_text()[-2000:]}")
        time.sleep(0.3)
    raise RuntimeError("the sidecar did not become ready")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def histogram(before: dict, after: dict, name: str, **labels: str) -> dict[str, float]:
    """Per-bucket counts (not cumulative) added between two scrapes, plus count and sum."""
    def added(sample: str, **extra: str) -> float:
        key = (sample, tuple(sorted({**labels, **extra}.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)
    edges = sorted({float(dict(k[1])["le"]) for k in after if k[0] == f"{name}_bucket"
                    and all(dict(k[1]).get(a) == b for a, b in labels.items())})
    buckets, below = {}, 0.0
    for edge in edges:
        cumulative = added(f"{name}_bucket", le=_le(edge))
        if cumulative - below:
            buckets[f"<={_le(edge)}"] = cumulative - below
        below = cumulative
    return {"count": added(f"{name}_count"), "sum": added(f"{name}_sum"), "buckets": buckets}


def refused(before: dict, after: dict, endpoint: str) -> float:
    key = ("sidecar_requests_total", (("endpoint", endpoint), ("status", "503")))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _le(edge: float) -> str:
    return "+Inf" if edge == float("inf") else repr(float(edge))


def pipeline_documents(manifest: Path) -> list[dict[str, Any]]:
    documents = []
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        image = base64.b64encode((manifest.parent / row["path"]).read_bytes()).decode("ascii")
        documents.append({"id": row["id"], "text": row["text"], "image": image, "metadata": row["metadata"]})
    return documents


def load_through_pipeline(client: OpenSearch, alias: str, documents: list[dict[str, Any]], *, chunk: int) -> float:
    started = time.perf_counter()
    failed = [item for ok, item in helpers.streaming_bulk(
        client, ({"_index": alias, "_id": d["id"], "_source": d} for d in documents), chunk_size=chunk,
        raise_on_error=False, max_retries=3) if not ok]
    client.indices.refresh(index=alias)
    elapsed = time.perf_counter() - started
    if failed or client.count(index=alias)["count"] != len(documents):
        raise RuntimeError(f"pipeline load failed: {failed[:3]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--opensearch", default=os.environ.get("SIDECAR_OPENSEARCH_URL", "http://127.0.0.1:9250"))
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="ingest rounds per path (alternating)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=32, help="sidecar request threads")
    parser.add_argument("--chunk", type=int, default=200, help="documents per _bulk request (pipeline path)")
    parser.add_argument("--port", type=int, default=18290)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-native-"))
    print(f"work folder (removed after a run that succeeds): {folder}", file=sys.stderr)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    client = OpenSearch(hosts=[args.opensearch], timeout=300)
    base = f"bench-native-{uuid.uuid4().hex[:6]}"
    aliases: list[str] = []
    sidecar: subprocess.Popen | None = None
    results: dict[str, Any] = {"documents": args.documents, "rounds": args.rounds, "queries": args.queries}
    try:
        manifest = write_corpus(folder / "corpus", args.documents, seed=5)
        documents = pipeline_documents(manifest)
        shards = folder / "shards"
        settings = Settings.from_env()
        encoder = load_encoder(settings)
        started = time.perf_counter()
        embed_corpus(encoder, manifest, shards, workers=1, progress=False)
        results["embed_s"] = time.perf_counter() - started

        query_alias = f"{base}-q"
        aliases.append(query_alias)
        cli("opensearch", "setup", *store_args(args.opensearch, query_alias), env=env)
        sidecar_env = {**env, "SIDECAR_STORE": "opensearch", "SIDECAR_OPENSEARCH_URL": args.opensearch,
                       "SIDECAR_OPENSEARCH_INDEX": query_alias, "SIDECAR_CACHE_DIR": str(folder / "cache"),
                       "SIDECAR_TEXT_CACHE_PERSIST": "false"}
        if "SIDECAR_PRETRAINED" not in env and settings.model == TINY_MODEL:
            sidecar_env["SIDECAR_PRETRAINED"] = str(checkpoint_path(settings.cache_dir))
        sidecar = start_sidecar(args.port, env=sidecar_env, threads=args.threads, log=folder / "sidecar.log")
        url = f"http://127.0.0.1:{args.port}"

        # --- ingest: pipeline vs clip-sidecar index, alternating, fresh index each round --------------
        pipeline_s, index_s, image_calls, passes = [], [], None, None
        for round_number in range(args.rounds):
            for path in ("index", "pipeline") if round_number % 2 else ("pipeline", "index"):
                alias = f"{base}-{path}-{round_number}"
                aliases.append(alias)
                cli("opensearch", "setup", *store_args(args.opensearch, alias), env=env)
                if path == "index":
                    store = OpenSearchStore(url=args.opensearch, index=alias)
                    try:
                        index_s.append(index_shards(store, shards, progress=False).seconds)
                    finally:
                        store.close()
                    continue
                # The sidecar stores another index: no rerank by id here, embeddings only.
                cli("opensearch", "connect", *store_args(args.opensearch, alias), "--sidecar-url", url,
                    "--set-defaults", "--rerank", "none", env=env)
                before = scrape(url)
                pipeline_s.append(load_through_pipeline(client, alias, documents, chunk=args.chunk))
                after = scrape(url)
                image_calls = histogram(before, after, "sidecar_request_items", endpoint=TEXT_IMAGE)
                image_calls["refused_503"] = refused(before, after, TEXT_IMAGE)
                passes = histogram(before, after, "sidecar_batch_size", modality="image", model="coarse")
                cli("opensearch", "connect", *store_args(args.opensearch, alias), "--disconnect", env=env)
        results["pipeline_docs_per_s"] = [args.documents / s for s in pipeline_s]
        results["index_docs_per_s"] = [args.documents / s for s in index_s]
        results["embed_plus_index_docs_per_s"] = args.documents / (results["embed_s"] + statistics.median(index_s))
        results["ratio_pipeline_to_index"] = statistics.median(index_s) / statistics.median(pipeline_s)
        results["ratio_pipeline_to_embed_plus_index"] = (results["embed_s"] + statistics.median(index_s)) / \
            statistics.median(pipeline_s)
        results["image_calls"], results["image_forward_passes"] = image_calls, passes

        # --- batching of the text pipeline, and the query comparison, on the query index ---------------
        store = OpenSearchStore(url=args.opensearch, index=query_alias)
        try:
            index_shards(store, shards, progress=False)
        finally:
            store.close()
        cli("opensearch", "connect", *store_args(args.opensearch, query_alias), "--sidecar-url", url, env=env)
        texts = [{"id": f"text-{i}", "text": f"a {c} {s} number {i}"} for i, (c, s) in
                 enumerate((c, s) for c in COLORS for s in SHAPES for _ in range(5))]
        before = scrape(url)
        helpers.bulk(client, ({"_index": query_alias, "_id": t["id"], "_source": t} for t in texts), chunk_size=200,
                     pipeline=f"{query_alias}-text", refresh=True)
        after = scrape(url)
        results["text_pipeline_calls"] = histogram(before, after, "sidecar_request_items", endpoint=TEXTS)
        results["text_pipeline_calls"]["refused_503"] = refused(before, after, TEXTS)
        helpers.bulk(client, ({"_op_type": "delete", "_index": query_alias, "_id": t["id"]} for t in texts),
                     refresh=True)

        queries = [f"{size} {c} {s}" for size in SIZES for c in COLORS for s in SHAPES]
        queries = (queries * (args.queries // len(queries) + 1))[:args.queries]
        session = requests.Session()

        def neural(text: str) -> float:
            started = time.perf_counter()
            client.search(index=query_alias, body={"size": 10, "_source": ["id"], "query": {
                "neural": {"vector": {"query_text": text, "k": 10, "model_id": model_id}}}})
            return time.perf_counter() - started

        def own(text: str) -> float:
            started = time.perf_counter()
            response = session.post(f"{url}/v1/search", json={"text": text, "mode": "vector", "k": 10,
                                                               "rerank": False}, timeout=60)
            response.raise_for_status()
            return time.perf_counter() - started

        model_id = client.transport.perform_request("POST", "/_plugins/_ml/models/_search", body={
            "query": {"term": {"name.keyword": f"{query_alias}-text-image"}}})["hits"]["hits"][0]["_id"]
        for text in set(queries):  # warm-up: every text vector cached on both paths
            neural(text), own(text)
        through_ml, direct = [], []
        for text in queries:
            through_ml.append(neural(text))
            direct.append(own(text))
        results["neural_p50_p95_ms"] = percentiles(through_ml)
        results["v1_search_p50_p95_ms"] = percentiles(direct)
        cli("opensearch", "connect", *store_args(args.opensearch, query_alias), "--disconnect", env=env)
    finally:
        if sidecar is not None:
            os.killpg(sidecar.pid, signal.SIGTERM)
            sidecar.wait(timeout=30)
        for alias in aliases:
            subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", "opensearch", "connect",
                            *store_args(args.opensearch, alias), "--disconnect"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client.indices.delete(index=f"{alias}-v*", ignore_unavailable=True)
        client.close()
    shutil.rmtree(folder)  # kept where the run failed: the sidecar's log is in it
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
