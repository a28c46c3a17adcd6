"""The fine stage through OpenSearch: a `hybrid` query under the hybrid + rerank pipeline (plain
opensearch-py) and the sidecar's own /v1/search hybrid + rerank rank alike, the rerank processor
calling the sidecar's fine stage over the page, as /v1/search runs it over its candidates."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.model.synthetic import COLORS, SHAPES, SIZES
from sidecar.model.tiny_model import LARGE_MODEL_NAME, checkpoint_path
from tests.integration.conftest import _client, owned_indices
from tests.integration.native_support import cli, opensearch_args, scrape, sidecar_env, store_args, value
from tests.support import gunicorn_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # trains the large tiny model once per cache

QUERIES = ([f"{color} {shape}" for color in COLORS for shape in SHAPES]
           + [f"{size} {color} circle" for size in SIZES for color in list(COLORS)[:5]])
RERANK_PATH = "/v1/opensearch/rerank/ids"


@pytest.fixture(scope="module")
def fine_sidecar(node: str, corpus: Path, test_cache_dir: Path, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """The corpus embedded with the fine model and indexed by the CLI; a sidecar with that fine model;
    `connect`. Yields (alias, sidecar URL)."""
    alias = f"it-native-fine-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("native-fine")
    fine = {"SIDECAR_FINE_MODEL": LARGE_MODEL_NAME,
            "SIDECAR_FINE_PRETRAINED": str(checkpoint_path(test_cache_dir, model=LARGE_MODEL_NAME))}
    client = _client()
    try:
        cli("opensearch", "setup", *opensearch_args(alias))
        cli("embed", str(corpus), "--out", str(folder / "shards"), "--workers", "0", "--fine-model", LARGE_MODEL_NAME)
        cli("index", str(folder / "shards"), *store_args(alias))
        with gunicorn_server(sidecar_env(alias, folder, test_cache_dir, **fine), folder / "sidecar.log") as url:
            cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url)
            yield alias, url
    finally:
        CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias), "--disconnect"])
        client.indices.delete(index=owned_indices(alias), ignore_unavailable=True)
        client.close()


def test_hybrid_with_the_fine_rerank_overlaps_the_sidecars_own_hybrid_rerank(fine_sidecar):
    alias, url = fine_sidecar
    client = _client()
    before = scrape(url)
    overlaps = []
    try:
        for query in QUERIES:
            ours = requests.post(f"{url}/v1/search", json={"text": query, "mode": "hybrid", "k": 10,
                                                           "candidates": 100}, timeout=60).json()
            assert ours["rerank"] is True and "rerank_skipped" not in ours, ours
            # The rerank processor reranks the returned page: ask for the candidates, read the first 10.
            theirs = client.search(index=alias, params={"search_pipeline": f"{alias}-hybrid-rerank"}, body={
                "size": 100, "_source": ["id"],
                "query": {"hybrid": {"queries": [{"neural": {"vector": {"query_text": query, "k": 100}}},
                                                 {"match": {"text": {"query": query}}}]}},
                "ext": {"rerank": {"query_context": {
                    "query_text_path": "query.hybrid.queries.0.neural.vector.query_text"}}}})["hits"]["hits"]
            top = {h["_id"] for h in theirs[:10]}
            overlaps.append(len(top & {h["id"] for h in ours["hits"]}) / 10)
    finally:
        client.close()
    after = scrape(url)
    assert value(after, "sidecar_requests_total", endpoint=RERANK_PATH, status="200") - \
        value(before, "sidecar_requests_total", endpoint=RERANK_PATH, status="200") == len(QUERIES)
    assert value(after, "sidecar_rerank_skipped_total", endpoint=RERANK_PATH) == 0
    assert len(overlaps) == 50 and float(np.mean(overlaps)) >= 0.8, overlaps
