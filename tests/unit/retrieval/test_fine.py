"""The fine stage: the strong model's order wins where it disagrees with the fast one; lexical evidence fuses in."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sidecar.retrieval.fine import UnusableFineVectors, fine_rank
from sidecar.types import Document, ModelSignature


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


# The fast model ranks a > b > c for the query (1, 0); the strong model, in its own space, c > b > a.
DOCS = [Document(id="a", vector=unit(1, 0.1), fine_vector=unit(0.1, 1, 0)),
        Document(id="b", vector=unit(1, 0.5), fine_vector=unit(0.5, 1, 0)),
        Document(id="c", vector=unit(1, 0.9), fine_vector=unit(1, 0.1, 0))]
FINE_QUERY = unit(1, 0, 0)
FINE = ModelSignature(model="strong", weights="w1", dim=3)  # the fine model of DOCS' fine vectors and FINE_QUERY
STRONG_8 = ModelSignature(model="strong", weights="w1", dim=8)  # the fine model of the 8-dimensional stores


def test_the_strong_models_order_replaces_the_fast_ones_where_they_disagree():
    scores = fine_rank(FINE_QUERY, DOCS)
    assert sorted(scores.final, key=scores.final.get, reverse=True) == ["c", "b", "a"]
    assert scores.final == scores.fine  # no lexical evidence: the strong model decides alone
    assert scores.fine["c"] == pytest.approx(float(unit(1, 0.1, 0) @ FINE_QUERY))


def test_lexical_evidence_fuses_with_the_strong_models_scores_by_the_weights():
    lexical = {"a": 12.0}  # only a matches the query's words
    heavy = fine_rank(FINE_QUERY, DOCS, lexical=lexical, weights=(0.3, 0.7))
    assert max(heavy.final, key=heavy.final.get) == "a"
    light = fine_rank(FINE_QUERY, DOCS, lexical=lexical, weights=(0.9, 0.1))
    assert max(light.final, key=light.final.get) == "c"


def test_candidates_without_fine_vectors_are_refused_with_the_fix():
    with pytest.raises(UnusableFineVectors, match="1 of 2 candidates .*embed them with --fine-model"):
        fine_rank(FINE_QUERY, [DOCS[0], Document(id="x", vector=unit(1, 0))])


def test_fine_vectors_of_another_fine_model_are_refused_with_the_fix():
    with pytest.raises(UnusableFineVectors, match="fine vectors have 3 dimensions, this server's fine model gives 2: "
                                                  "embedded with another fine model"):
        fine_rank(unit(1, 0), DOCS)


def test_fine_vectors_of_another_fine_model_of_the_same_size_are_refused_naming_both():
    other = ModelSignature(model="other", weights="w2", dim=3)
    with pytest.raises(UnusableFineVectors, match="embedded with strong .*this server's fine model is other "):
        fine_rank(FINE_QUERY, DOCS, model=other, stored_model=FINE)
    assert fine_rank(FINE_QUERY, DOCS, model=other, stored_model=None).fine  # none recorded: the size decides


@pytest.fixture
def store(tmp_path):
    from sidecar.stores.embedded import EmbeddedStore

    store = EmbeddedStore(tmp_path / "store")
    store.claim(ModelSignature(model="fast", weights="none", dim=2), fine_signature=FINE)
    texts = {"a": "plain badge", "b": "plain badge", "c": "plain badge"}
    store.upsert([Document(id=d.id, vector=d.vector, fine_vector=d.fine_vector, text=texts[d.id]) for d in DOCS])
    yield store
    store.close()


def test_search_ranks_by_the_strong_model_where_it_disagrees_with_the_fast_one(store):
    from sidecar.retrieval.search import SearchOptions, search

    fast_query = unit(1, 0)
    coarse = search(store, vector=fast_query, text=None, options=SearchOptions(mode="vector", k=3, rerank=False))
    assert [h.id for h in coarse.hits] == ["a", "b", "c"] and not coarse.reranked
    fine = search(store, vector=fast_query, text=None, options=SearchOptions(mode="vector", k=3),
                  fine_vector=FINE_QUERY, fine_model=FINE)
    assert [h.id for h in fine.hits] == ["c", "b", "a"]
    assert fine.reranked and fine.rerank_skipped is None
    assert {"vector", "fine", "rerank"} <= fine.hits[0].scores.keys()
    assert fine.hits[0].scores["vector"] == pytest.approx(float(DOCS[2].vector @ fast_query))


def test_without_a_fine_model_the_rerank_is_skipped_and_says_why(store):
    from sidecar.retrieval.search import NO_FINE_MODEL, SearchOptions, search

    result = search(store, vector=unit(1, 0), text=None, options=SearchOptions(mode="vector", k=3))
    assert [h.id for h in result.hits] == ["a", "b", "c"]  # the coarse order, untouched
    assert not result.reranked and result.rerank_skipped == NO_FINE_MODEL
    assert "rerank" not in result.hits[0].scores


def test_a_served_fine_model_other_than_the_stores_skips_the_rerank_naming_both(store):
    from sidecar.retrieval.search import SearchOptions, search

    other = ModelSignature(model="other", weights="w2", dim=3)  # the size of the stored fine vectors
    result = search(store, vector=unit(1, 0), text=None, options=SearchOptions(mode="vector", k=3),
                    fine_vector=FINE_QUERY, fine_model=other)
    assert [h.id for h in result.hits] == ["a", "b", "c"]  # the coarse order, not the wrong vectors' c > b > a
    assert not result.reranked and "this server's fine model is other (weights w2, dim 3)" in result.rerank_skipped
    with pytest.raises(ValueError, match="fine_vector needs fine_model"):
        search(store, vector=unit(1, 0), text=None, options=SearchOptions(mode="vector", k=3), fine_vector=FINE_QUERY)


def test_bm25_mode_ranks_by_bm25_unless_the_rerank_is_asked_for(store):
    from sidecar.retrieval.search import SearchOptions, search

    default = SearchOptions(mode="bm25", k=3)
    assert default.rerank is False
    result = search(store, vector=None, text="badge", options=default, fine_vector=FINE_QUERY, fine_model=FINE)
    assert not result.reranked and result.rerank_skipped is None
    assert all(set(h.scores) == {"bm25"} for h in result.hits)
    asked = search(store, vector=None, text="badge", options=SearchOptions(mode="bm25", k=3, rerank=True),
                   fine_vector=FINE_QUERY, fine_model=FINE)
    assert asked.reranked and [h.id for h in asked.hits][0] == "c"  # equal BM25: the strong model decides


def toward_query(cosine: float, axis: int) -> np.ndarray:
    """A unit vector at `cosine` to the query (axis 0)."""
    vector = np.zeros(8, dtype=np.float32)
    vector[0], vector[axis] = cosine, np.sqrt(1 - cosine * cosine)
    return vector


@pytest.fixture
def hybrid_store(tmp_path):
    """BM25 ranks a > b > x > y > c for "red"; the 4 hybrid candidates are a, b, c and d (c by its vector only)."""
    from sidecar.stores.embedded import EmbeddedStore

    store = EmbeddedStore(tmp_path / "store")
    store.claim(ModelSignature(model="fast", weights="none", dim=8))
    # (id, fast cosine, fine cosine, text)
    rows = [("a", 0.5, 0.5, "red red red red"), ("b", 0.4, 0.6, "red red red"), ("x", 0.0, 0.0, "red red"),
            ("y", 0.0, 0.0, "red red sky"), ("c", 1.0, 0.4, "red car on a long road by the sea"), ("d", 0.9, 0.8, "blue")]
    store.upsert([Document(id=doc_id, vector=toward_query(fast, axis), fine_vector=toward_query(fine, axis), text=text)
                  for axis, (doc_id, fast, fine, text) in enumerate(rows, start=1)])
    assert "c" not in {hit.id for hit in store.text_search("red", 4)}  # a candidate by its vector only
    yield store
    store.close()


def test_hybrid_fuses_in_the_fine_stage_the_bm25_of_candidates_outside_bm25s_own_top_n(hybrid_store):
    from sidecar.retrieval.search import SearchOptions, search

    query = toward_query(1.0, 1)
    result = search(hybrid_store, vector=query, text="red", options=SearchOptions(mode="hybrid", k=4, candidates=4),
                    fine_vector=query, fine_model=STRONG_8)
    ids = [hit.id for hit in result.hits]
    lexical = {hit.id: hit.score for hit in hybrid_store.text_search("red", 4, ids=ids)}
    assert sorted(ids) == ["a", "b", "c", "d"] and {h.id: h.scores.get("bm25") for h in result.hits if h.id != "d"} == lexical
    expected = fine_rank(query, hybrid_store.fetch(ids), lexical=lexical).final
    assert ids == sorted(expected, key=expected.get, reverse=True) == ["b", "a", "d", "c"]


def test_hybrid_without_the_fine_stage_shows_only_the_bm25_it_fused_that_of_bm25s_own_top_n(hybrid_store):
    from sidecar.retrieval.search import SearchOptions, search

    options = SearchOptions(mode="hybrid", k=4, candidates=4, rerank=False)
    result = search(hybrid_store, vector=toward_query(1.0, 1), text="red", options=options)
    scores = {hit.id: hit.scores for hit in result.hits}
    assert sorted(scores) == ["a", "b", "c", "d"] and hybrid_store.text_search("red", 1, ids=["c"])  # c matches "red"
    # c is not in BM25's top 4: it shows no bm25, and its fused score is its vector side's alone (the best
    # vector, min-max 1, times the vector weight), so the score not shown is one the fusion did not use.
    assert "bm25" not in scores["c"] and scores["c"]["fused"] == pytest.approx(options.weights[0])
    assert {doc_id: s["bm25"] for doc_id, s in scores.items() if "bm25" in s} == {
        hit.id: hit.score for hit in hybrid_store.text_search("red", 4) if hit.id in scores}


def test_the_fine_stage_asks_bm25_by_ids_only_for_the_candidates_outside_bm25s_own_top_n(hybrid_store, monkeypatch):
    from sidecar.retrieval.search import SearchOptions, search

    asked = []
    text_search = hybrid_store.text_search

    def recording(query, k, **kwargs):
        asked.append(kwargs.get("ids"))
        return text_search(query, k, **kwargs)

    monkeypatch.setattr(hybrid_store, "text_search", recording)
    query = toward_query(1.0, 1)
    options = SearchOptions(mode="hybrid", k=4, candidates=4)
    search(hybrid_store, vector=query, text="red", options=options, fine_vector=query, fine_model=STRONG_8)
    assert len(asked) == 2 and asked[0] is None and sorted(asked[1]) == ["c", "d"]  # a and b: from BM25's top 4
    asked.clear()
    search(hybrid_store, vector=query, text="red", options=SearchOptions(mode="hybrid", k=6, candidates=6),
           fine_vector=query, fine_model=STRONG_8)
    assert asked == [None, ["d"]]  # BM25's top 6 holds every candidate that matches but d ("blue")


def test_the_fine_stages_bm25_of_every_candidate_is_that_of_one_query_restricted_to_all_their_ids(tmp_path):
    from sidecar.model.synthetic import describe, iter_items, random_caption
    from sidecar.retrieval.search import SearchOptions, search
    from sidecar.stores.embedded import EmbeddedStore

    # Short templated texts, as product titles are: many ties, many candidates in and out of BM25's top N.
    rng = np.random.default_rng(3)
    store = EmbeddedStore(tmp_path / "store")
    store.claim(ModelSignature(model="fast", weights="none", dim=8))
    items = list(iter_items(600, seed=2024))
    for start in (0, 300):  # two writes: BM25 statistics over more than one index segment
        store.upsert([Document(id=item.id, vector=unit(*rng.normal(size=8)), fine_vector=unit(*rng.normal(size=8)),
                               text=describe(item.attributes)) for item in items[start:start + 300]])
    captions = random.Random(5)
    for item in iter_items(20, seed=31337):
        text = random_caption(item.attributes, captions)[0]
        result = search(store, vector=unit(*rng.normal(size=8)), text=text,
                        options=SearchOptions(mode="hybrid", k=60, candidates=60), fine_vector=unit(*rng.normal(size=8)),
                        fine_model=STRONG_8)
        ids = [hit.id for hit in result.hits]
        assert len(ids) == 60
        lexical = {hit.id: hit.score for hit in store.text_search(text, len(ids), ids=ids)}
        assert {hit.id: hit.scores["bm25"] for hit in result.hits if "bm25" in hit.scores} == lexical, text
    store.close()
