"""What the search page reads of the embedded store besides searches: thumbnails by id, and value counts
of the metadata (facets) — the values filters match, counted once per committed generation."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from sidecar.stores.base import FacetCounts
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document, ModelSignature

SIGNATURE = ModelSignature(model="m", weights="w", dim=4)


def facet_documents() -> list[Document]:
    """Twelve documents whose metadata has strings, integers, floats, booleans, lists and an object;
    the counts below follow from i."""
    colours = ("red", "red", "green", "blue")
    vectors = np.eye(4, dtype=np.float32)
    return [Document(id=f"d{i}", vector=vectors[i % 4], text=f"item {i}", content_hash=f"h{i}",
                     metadata={"colour": colours[i % 4], "shard": i % 3, "sale": i % 3 == 0, "price": 9.5,
                               "tags": ["new", "cheap"] if i < 5 else ["new"], "size": {"w": i}},
                     thumbnail=f"jpeg-{i}".encode() if i % 2 == 0 else None)
            for i in range(12)]


# What both stores must answer for facet_documents() (tests/integration checks OpenSearch against it).
EXPECTED_FACETS = {
    "colour": FacetCounts(values=(("red", 6), ("blue", 3), ("green", 3))),
    "shard": FacetCounts(values=((0, 4), (1, 4), (2, 4))),
    "sale": FacetCounts(values=((False, 8), (True, 4))),
    "price": FacetCounts(values=((9.5, 12),)),
    "tags": FacetCounts(values=(("new", 12), ("cheap", 5))),  # a list counts each element; nested objects none
}


def test_facets_count_the_values_filters_match_and_list_the_most_frequent(tmp_path: Path):
    with EmbeddedStore(tmp_path) as store:
        store.claim(SIGNATURE)
        store.upsert(facet_documents())
        assert store.facets() == EXPECTED_FACETS
        top = store.facets(size=1)
        assert top["colour"] == FacetCounts(values=(("red", 6),), other=6)
        assert top["tags"] == FacetCounts(values=(("new", 12),), other=5)
        # A counted value is one a filter finds: as many documents as the count says.
        for name, facet in EXPECTED_FACETS.items():
            for value, count in facet.values:
                assert len(store.vector_search(np.ones(4, dtype=np.float32) / 2, 50, filters={name: value})) == count


def test_facet_ties_are_cut_by_value_numbers_by_number_as_opensearch_cuts_them():
    # OpenSearch's terms aggregation orders a tie by the key before it cuts at `size`: 9 before 10.
    assert FacetCounts.ranked([(10, 1), (9, 1), (2.5, 3)]).top(2) == FacetCounts(values=((2.5, 3), (9, 1)), other=1)
    assert FacetCounts.ranked([("b", 1), ("B", 1), ("a", 2)]).values == (("a", 2), ("B", 1), ("b", 1))
    assert FacetCounts.ranked([(True, 1), (False, 1)]).values == ((False, 1), (True, 1))


def test_facets_follow_writes_and_deletes(tmp_path: Path):
    with EmbeddedStore(tmp_path) as store:
        store.claim(SIGNATURE)
        docs = facet_documents()
        store.upsert(docs)
        assert store.facets()["colour"].values[0] == ("red", 6)
        store.delete(["d0", "d1", "d4"])
        store.upsert([Document(id="d2", vector=docs[2].vector, metadata={"colour": "purple"})])
        assert dict(store.facets()["colour"].values) == {"red": 3, "blue": 3, "purple": 1, "green": 2}
        with EmbeddedStore(tmp_path) as other:  # another process's view: the committed generation
            assert other.facets() == store.facets()


def test_thumbnails_are_read_by_id_and_left_out_of_fetch(tmp_path: Path):
    with EmbeddedStore(tmp_path) as store:
        store.claim(SIGNATURE)
        store.upsert(facet_documents())
        assert store.thumbnail("d4") == b"jpeg-4"
        assert store.thumbnail("d5") is None  # indexed without one
        assert store.thumbnail("missing") is None
        assert all(doc.thumbnail is None for doc in store.fetch(["d0", "d2"]))
        store.upsert([Document(id="d4", vector=np.eye(4, dtype=np.float32)[0], thumbnail=b"jpeg-4b")])
        assert store.thumbnail("d4") == b"jpeg-4b"  # replaced with the document
        store.delete(["d4"])
        assert store.thumbnail("d4") is None


def test_a_store_made_before_thumbnails_takes_them(tmp_path: Path):
    with EmbeddedStore(tmp_path) as store:
        store.claim(SIGNATURE)
        store.upsert(facet_documents()[:2])
    with sqlite3.connect(tmp_path / "store.sqlite") as conn:  # the schema before thumbnails
        conn.execute("ALTER TABLE docs DROP COLUMN thumbnail")
    with EmbeddedStore(tmp_path) as store:
        assert store.thumbnail("d0") is None
        store.upsert(facet_documents()[:1])
        assert store.thumbnail("d0") == b"jpeg-0"
