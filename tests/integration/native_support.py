"""Helpers of the tests where OpenSearch calls the sidecar: the CLI, the sidecar's environment, pipeline
documents, bulk results, /metrics, and everything connect may have left on the cluster."""

from __future__ import annotations

import base64
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import requests
from click.testing import Result
from opensearchpy import OpenSearch, OpenSearchWarning, helpers
from prometheus_client.parser import text_string_to_metric_families

from sidecar.model.tiny_model import checkpoint_path
from tests.integration.conftest import URL, cli, opensearch_args, store_args  # noqa: F401  (the native tests import them from here)

TEXTS = "/v1/opensearch/embeddings/texts"
TEXT_IMAGE = "/v1/opensearch/embeddings/text-image"


def sidecar_env(alias: str, folder: Path, test_cache_dir: Path, **extra: str) -> dict[str, str]:
    return {"SIDECAR_STORE": "opensearch", "SIDECAR_OPENSEARCH_URL": URL, "SIDECAR_OPENSEARCH_INDEX": alias,
            "SIDECAR_CACHE_DIR": str(folder / "cache"), "SIDECAR_PRETRAINED": str(checkpoint_path(test_cache_dir)),
            **extra}


def rows(corpus: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in corpus.read_text().splitlines()]


def b64(corpus: Path, row: dict[str, Any]) -> str:
    return base64.b64encode((corpus.parent / row["path"]).read_bytes()).decode("ascii")


def pipeline_document(corpus: Path, row: dict[str, Any]) -> dict[str, Any]:
    """A document as any client sends it for the pipeline: the project's fields, an image instead of a vector."""
    return {"id": row["id"], "text": row["text"], "image": b64(corpus, row), "metadata": row["metadata"]}


def bulk(client: OpenSearch, alias: str, documents: list[dict[str, Any]], **params: Any) -> list[dict[str, Any]]:
    """Index through the alias (its default pipeline unless `pipeline` is given); returns each item's result."""
    actions = ({"_index": alias, "_id": doc["id"], "_source": doc} for doc in documents)
    results = [item["index"] for _ok, item in helpers.streaming_bulk(client, actions, raise_on_error=False,
                                                                      raise_on_exception=False, max_retries=0,
                                                                      chunk_size=500, **params)]
    client.indices.refresh(index=alias)
    return results


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The sidecar's /metrics as {(sample name, sorted labels): value}."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def concept(source: dict[str, Any]) -> tuple[str, str]:
    return source["metadata"]["color"], source["metadata"]["shape"]


def printed_json(result: Result) -> dict[str, Any]:
    """The JSON object `connect` prints after its lines of changes."""
    return json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])


def ml_objects(client: OpenSearch, alias: str) -> dict[str, list[str]]:
    """Everything on the cluster named after `alias` by connect: ml objects, pipelines, templates, settings."""
    # ml-commons writes its task records as a deploy goes on: one written a moment ago is searchable only after a
    # refresh, and a snapshot taken right after connect would lack it. The node's first direct access to its system
    # indices answers with a deprecation warning (future versions refuse it), which is no failure of the test's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OpenSearchWarning)
        client.indices.refresh(index=".plugins-ml-task,.plugins-ml-model,.plugins-ml-connector,"
                               ".plugins-ml-model-group", ignore_unavailable=True)
    found: dict[str, list[str]] = {}
    for kind in ("connectors", "models", "model_groups"):
        hits = client.transport.perform_request("POST", f"/_plugins/_ml/{kind}/_search", body={
            "size": 100, "query": {"prefix": {"name.keyword": alias}}})["hits"]["hits"]
        found[kind] = sorted(h["_id"] for h in hits)
    model_ids = found["models"]
    tasks = client.transport.perform_request("POST", "/_plugins/_ml/tasks/_search", body={
        "size": 100, "query": {"terms": {"model_id": model_ids}}})["hits"]["hits"] if model_ids else []
    found["tasks"] = sorted(h["_id"] for h in tasks)
    found["ingest"] = sorted(n for n in get(client, "/_ingest/pipeline") if n.startswith(alias))
    found["search"] = sorted(n for n in get(client, "/_search/pipeline") if n.startswith(alias))
    found["templates"] = sorted(t["name"] for t in get(client, "/_index_template").get("index_templates", [])
                                if t["name"].startswith(alias))
    settings = client.indices.get_settings(index=alias, ignore_unavailable=True)  # {} once the index is gone
    found["settings"] = sorted(f"{index}:{key}" for index, body in settings.items()
                               for key in ("default_pipeline", "search") if key in body["settings"]["index"])
    return found


def get(client: OpenSearch, path: str) -> dict[str, Any]:
    """GET, {} where the cluster has none of the kind (404)."""
    found = client.transport.perform_request("GET", path, params={"ignore": 404})
    return {} if "error" in found else found
