"""Prompt-set tags on a real OpenSearch node: written at embed time, loaded as keyword fields by `index`,
filtered on by the CLI and the app, and re-tagged from the stored vectors (no image left) after a set changed."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import yaml

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.config import Settings
from sidecar.ingest.shards import ShardSet
from sidecar.model.synthetic import write_corpus
from tests.conftest import EXAMPLE_PROMPT_SETS
from tests.integration.conftest import URL, _auth, _client, cli, make_store, store_args

pytestmark = [pytest.mark.integration]


def search_ids(alias: str, *args: str) -> set[str]:
    hits = json.loads(cli("search", *args, "-k", "500", "--candidates", "500", *store_args(alias), "--json").output)
    return {hit["id"] for hit in hits}


def test_tags_filter_in_opensearch_and_retagging_reuses_the_stored_vectors(encoder, alias, tmp_path):
    sets = tmp_path / "prompt-sets"
    cli("prompts", "add", *sorted(EXAMPLE_PROMPT_SETS.iterdir()), "--prompt-sets", sets)
    corpus = write_corpus(tmp_path / "corpus", 120, seed=41)
    out = tmp_path / "shards"
    cli("embed", corpus, "--out", out, "--workers", "0", "--tag", "shapes", "--tag", "colors:2", "--prompt-sets", sets)
    assert "120 written" in cli("index", out, *store_args(alias)).output

    tags = {doc_id: row.metadata for doc_id, (_, row, _) in ShardSet(out).live().items()}
    client = _client()
    try:
        mapping = next(iter(client.indices.get_mapping(index=alias).values()))["mappings"]
        # Keyword fields: the cluster's own terms aggregation facets on them.
        facets = client.search(index=alias, body={"size": 0, "aggs": {"shapes": {"terms": {
            "field": "metadata.tag_shapes", "size": 10}}}})["aggregations"]["shapes"]["buckets"]
    finally:
        client.close()
    fields = mapping["properties"]["metadata"]["properties"]
    assert fields["tag_shapes"]["type"] == fields["tag_colors"]["type"] == "keyword"
    assert fields["tag_shapes_score"]["type"] == "double"  # decimals map to double: filters see them as written
    assert {b["key"]: b["doc_count"] for b in facets} == Counter(m["tag_shapes"][0] for m in tags.values())

    circles = {doc_id for doc_id, m in tags.items() if m["tag_shapes"] == ["circle"]}
    assert 0 < len(circles) < 120
    assert search_ids(alias, "shape", "--mode", "vector", "--filter", "tag_shapes=circle") == circles
    lexical = search_ids(alias, "circle", "--mode", "bm25", "--filter", "tag_shapes=circle")
    assert lexical and lexical <= circles
    red_or_blue = {doc_id for doc_id, m in tags.items() if {"red", "blue"} & set(m["tag_colors"])}
    assert search_ids(alias, "shape", "--mode", "vector", "--filter", "tag_colors=red,blue") == red_or_blue

    # The app filters on tags the same way.
    user, password = _auth() or ("", "")
    app = create_app(Settings(store="opensearch", opensearch_url=URL, opensearch_index=alias, opensearch_user=user,
                              opensearch_password=password, cache_dir=tmp_path / "cache", prompt_sets_dir=sets),
                     encoder=encoder)
    try:
        body = app.test_client().post("/v1/search", json={"text": "circle", "mode": "hybrid", "k": 100,
                                                          "filters": {"tag_shapes": "circle"}}).json
        assert body["hits"] and {hit["id"] for hit in body["hits"]} <= circles
    finally:
        state_of(app).encoding.close()
        state_of(app).store.close()

    store = make_store(index=alias)
    before = {doc.id: doc.vector for doc in store.fetch(sorted(tags))}
    # Version 2 calls circles discs; with the images gone, only the stored vectors can re-tag.
    edited = yaml.safe_load((EXAMPLE_PROMPT_SETS / "shapes.yaml").read_text())
    edited.update(version=2)
    edited["labels"][0] = {"name": "disc", "templates": ["a circle", "a photo of a circle"]}
    (tmp_path / "shapes.yaml").write_text(yaml.safe_dump(edited))
    cli("prompts", "add", tmp_path / "shapes.yaml", "--prompt-sets", sets)
    shutil.rmtree(corpus.parent)
    assert f"{len(circles)} with new tags (stored vectors reused)" in cli("tag", out, "--prompt-sets", sets).output
    result = cli("index", out, *store_args(alias))
    assert f"{len(circles)} written, {120 - len(circles)} unchanged" in result.output
    try:
        assert search_ids(alias, "shape", "--mode", "vector", "--filter", "tag_shapes=disc") == circles
        assert search_ids(alias, "shape", "--mode", "vector", "--filter", "tag_shapes=circle") == set()
        after = {doc.id: doc.vector for doc in store.fetch(sorted(tags))}
        for doc_id, vector in after.items():
            np.testing.assert_allclose(vector, before[doc_id], atol=1e-6)
    finally:
        store.close()
