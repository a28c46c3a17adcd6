"""What the search page reads of a real OpenSearch node besides searches: thumbnails by id (a binary field,
left out of fetches, kept by rebuilds) and facets (terms aggregations) — the same answers as the
embedded store gives for the same documents."""

from __future__ import annotations

import json
import shutil

import pytest

from sidecar.stores.base import FacetCounts
from sidecar.stores.opensearch import REPO_CONFIG_DIR
from sidecar.types import ModelSignature
from tests.integration.conftest import drop, make_store
from tests.unit.stores.test_embedded_page_reads import EXPECTED_FACETS, facet_documents

pytestmark = pytest.mark.integration
SIGNATURE = ModelSignature(model="m", weights="w", dim=4)


@pytest.fixture
def small_store(node):
    store = make_store()
    store.claim(SIGNATURE)
    yield store
    drop(store)


def test_facets_match_the_embedded_stores_for_the_same_documents(small_store):
    small_store.upsert(facet_documents())
    assert small_store.facets() == EXPECTED_FACETS
    assert small_store.facets(size=1)["colour"] == FacetCounts(values=(("red", 6),), other=6)


def test_thumbnails_are_read_by_id_left_out_of_fetch_and_kept_by_a_rebuild(small_store):
    docs = facet_documents()
    small_store.upsert(docs)
    assert small_store.thumbnail("d4") == b"jpeg-4"
    assert small_store.thumbnail("d5") is None and small_store.thumbnail("missing") is None
    assert all(doc.thumbnail is None for doc in small_store.fetch(["d0", "d2"]))
    mapping = small_store.client.indices.get_mapping(index=small_store.alias)
    assert next(iter(mapping.values()))["mappings"]["properties"]["thumbnail"] == {"type": "binary"}
    small_store.rebuild(docs, signature=SIGNATURE)
    assert small_store.thumbnail("d8") == b"jpeg-8"
    small_store.delete(["d8"])
    assert small_store.thumbnail("d8") is None


def test_an_index_made_before_thumbnails_maps_them_as_binary_not_text(node, tmp_path):
    # plugin_config/index.json as it was: no thumbnail field.
    config = tmp_path / "plugin_config"
    shutil.copytree(REPO_CONFIG_DIR, config)
    template = json.loads((config / "index.json").read_text())
    del template["mappings"]["properties"]["thumbnail"]
    (config / "index.json").write_text(json.dumps(template))
    store = make_store(config_dir=config)
    try:
        store.claim(SIGNATURE)
        store.upsert(facet_documents())
        mapping = next(iter(store.client.indices.get_mapping(index=store.alias).values()))["mappings"]
        assert mapping["properties"]["thumbnail"] == {"type": "binary"}
        assert store.thumbnail("d0") == b"jpeg-0"
    finally:
        drop(store)
