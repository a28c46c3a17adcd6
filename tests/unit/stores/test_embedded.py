"""Tests for the embedded store: SQLite + a tantivy BM25 index + memmapped vectors + FAISS HNSW in one directory."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from sidecar.stores import bm25
from sidecar.stores.base import ModelMismatchError, QueryModelMismatch, StoreDamaged, StoreError, StoreQueryError
from sidecar.stores.bm25 import Bm25Index, query_terms
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import NO_VECTOR, Document, ModelSignature
from tests.support import damage_sqlite_file

REPO_ROOT = Path(__file__).resolve().parents[3]
DIM = 32
SIGNATURE = ModelSignature(model="ViT-Tiny", weights="synthetic", dim=DIM)
COLOURS = ("red", "green", "blue", "yellow")


def clustered_unit_vectors(n: int, *, dim: int = DIM, clusters: int = 8, spread: float = 0.25, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres: the shape CLIP embeddings of a corpus have."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    vectors = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def make_docs(n: int, *, seed: int = 0, prefix: str = "doc", version: int = 0) -> list[Document]:
    vectors = clustered_unit_vectors(n, seed=seed)
    return [
        Document(
            id=f"{prefix}{i}",
            vector=vectors[i],
            text=f"a {COLOURS[i % 4]} item number{i}",
            metadata={"colour": COLOURS[i % 4], "shard": i % 3, "tags": ["even"] if i % 2 == 0 else ["odd"],
                      "version": version},
            content_hash=f"h{i}v{version}",
        )
        for i in range(n)
    ]


@pytest.fixture
def store(tmp_path: Path):
    with EmbeddedStore(tmp_path / "store") as opened:
        opened.claim(SIGNATURE)
        yield opened


def stored(path: Path, docs: list[Document], **options: Any) -> EmbeddedStore:
    """A store opened at `path` (with EmbeddedStore's `options`), claimed for SIGNATURE and holding `docs`; the
    caller closes it (`with stored(...) as store:`)."""
    store = EmbeddedStore(path, **options)
    store.claim(SIGNATURE)
    store.upsert(docs)
    return store


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )


def as_pairs(hits) -> list[tuple[str, float]]:
    return [(hit.id, round(hit.score, 5)) for hit in hits]


# -- writes ---------------------------------------------------------------------------------


def test_upsert_count_and_fetch_round_trip(store: EmbeddedStore):
    docs = make_docs(50)
    assert store.upsert(docs) == 50
    assert store.count() == 50
    fetched = store.fetch(["doc7", "missing", "doc3"])
    assert [doc.id for doc in fetched] == ["doc7", "doc3"]
    np.testing.assert_array_equal(fetched[0].vector, docs[7].vector)
    assert fetched[0].text == docs[7].text
    assert dict(fetched[0].metadata) == dict(docs[7].metadata)
    assert store.content_hashes()["doc7"] == "h7v0"
    (bare,) = store.fetch(["doc7"], vectors=False)
    assert bare.vector is NO_VECTOR and (bare.text, dict(bare.metadata)) == (docs[7].text, dict(docs[7].metadata))


def test_upsert_replaces_by_id(store: EmbeddedStore):
    store.upsert(make_docs(20))
    replacement = make_docs(20, seed=99, version=1)[4]
    assert store.upsert([replacement]) == 1
    assert store.count() == 20
    (doc,) = store.fetch(["doc4"])
    np.testing.assert_array_equal(doc.vector, replacement.vector)
    assert doc.metadata["version"] == 1
    # The old vector is tombstoned: only the new version answers, in ANN and exact search.
    for exact in (False, True):
        hits = store.vector_search(replacement.vector, 20, exact=exact)
        assert hits[0].id == "doc4"
        assert pytest.approx(hits[0].score, abs=1e-5) == 1.0
        assert [h.id for h in hits].count("doc4") == 1


def test_duplicate_ids_in_one_batch_last_wins(store: EmbeddedStore):
    first, second = make_docs(2)
    written: list[int] = []
    assert store.upsert([first, Document(id=first.id, vector=second.vector, text="later")], progress=written.append) == 1
    assert written == [1]  # progress counts what was written, in the one commit that wrote it
    assert store.fetch([first.id])[0].text == "later"


def test_delete_removes_from_every_search(store: EmbeddedStore):
    docs = make_docs(40)
    store.upsert(docs)
    assert store.delete(["doc1", "doc2", "nope"]) == 2
    assert store.delete(["doc1"]) == 0
    assert store.count() == 38
    assert store.fetch(["doc1"]) == []
    assert "doc1" not in store.content_hashes()
    for exact in (False, True):
        assert "doc1" not in {h.id for h in store.vector_search(docs[1].vector, 40, exact=exact)}
    assert "doc1" not in {h.id for h in store.text_search("number1", 40)}


def test_many_tombstones_trigger_a_rebuild_that_keeps_results(tmp_path: Path):
    with EmbeddedStore(tmp_path / "s", rebuild_tombstone_fraction=0.1) as store:
        docs = make_docs(300)
        store.upsert(docs)
        store.delete([doc.id for doc in docs[:100]])
        graphs = list((tmp_path / "s").glob("hnsw.*"))
        assert len(graphs) == 1  # the rebuilt graph replaced the old file
        assert store.count() == 200
        query = docs[150].vector
        assert as_pairs(store.vector_search(query, 10)) == as_pairs(store.vector_search(query, 10, exact=True))


def test_readding_a_deleted_id(store: EmbeddedStore):
    docs = make_docs(5)
    store.upsert(docs)
    store.delete(["doc0"])
    store.upsert([docs[0]])
    assert store.count() == 5
    assert store.vector_search(docs[0].vector, 1)[0].id == "doc0"


# -- persistence ------------------------------------------------------------------------------


def test_reopen_gives_identical_results(tmp_path: Path):
    docs = make_docs(500)
    query = clustered_unit_vectors(1, seed=7)[0]
    with stored(tmp_path / "s", docs) as store:
        store.delete(["doc10"])
        before = (as_pairs(store.vector_search(query, 10)), as_pairs(store.vector_search(query, 10, exact=True)),
                  as_pairs(store.text_search("red number5", 10)), store.count())
    with EmbeddedStore(tmp_path / "s") as reopened:
        assert reopened.signature() == SIGNATURE
        after = (as_pairs(reopened.vector_search(query, 10)), as_pairs(reopened.vector_search(query, 10, exact=True)),
                 as_pairs(reopened.text_search("red number5", 10)), reopened.count())
    assert after == before


def test_another_process_sees_identical_results(tmp_path: Path):
    docs = make_docs(500)
    query = clustered_unit_vectors(1, seed=7)[0]
    with stored(tmp_path / "s", docs) as store:
        here = {"ann": as_pairs(store.vector_search(query, 10)),
                "text": as_pairs(store.text_search("blue number3", 5, filters={"shard": 0}))}
    result = run_python(
        """
        import json, sys
        import numpy as np
        from sidecar.stores.embedded import EmbeddedStore
        query = np.array(json.loads(sys.argv[2]), dtype=np.float32)
        with EmbeddedStore(sys.argv[1]) as store:
            pairs = lambda hits: [(h.id, round(h.score, 5)) for h in hits]
            print(json.dumps({"ann": pairs(store.vector_search(query, 10)),
                              "text": pairs(store.text_search("blue number3", 5, filters={"shard": 0}))}))
        """,
        str(tmp_path / "s"), json.dumps(query.tolist()),
    )
    assert result.returncode == 0, result.stderr
    there = {key: [tuple(pair) for pair in value] for key, value in json.loads(result.stdout).items()}
    assert there == here


def test_writes_from_another_process_are_seen_by_an_open_store(tmp_path: Path):
    with stored(tmp_path / "s", make_docs(10)) as store:
        assert store.count() == 10
        result = run_python(
            """
            import sys
            sys.path.insert(0, sys.argv[2])
            from test_embedded import make_docs
            from sidecar.stores.embedded import EmbeddedStore
            with EmbeddedStore(sys.argv[1]) as other:
                other.upsert(make_docs(5, prefix="new"))
                other.delete(["doc0"])
            """,
            str(tmp_path / "s"), str(Path(__file__).parent),
        )
        assert result.returncode == 0, result.stderr
        assert store.count() == 14
        assert store.vector_search(make_docs(5, prefix="new")[2].vector, 1)[0].id == "new2"


READER = """
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from sidecar.stores.embedded import EmbeddedStore
    path, done, progress, n = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    ids = [f"doc{i}" for i in range(n)]
    query = np.ones(32, dtype=np.float32) / np.sqrt(32)
    versions, reads = set(), 0
    with EmbeddedStore(path) as store:
        while not done.exists() or reads < 5:
            docs = store.fetch(ids)
            seen = {doc.metadata["version"] for doc in docs}
            # One snapshot: every document comes from the same committed upsert.
            if len(docs) != n or len(seen) != 1:
                raise SystemExit(f"torn read: {len(docs)} docs, versions {sorted(seen)}")
            if store.count() != n:
                raise SystemExit(f"count {store.count()} != {n}")
            for exact in (False, True):
                hits = store.vector_search(query, 10, exact=exact)
                if len(hits) != 10 or not {h.id for h in hits} <= set(ids):
                    raise SystemExit(f"bad vector hits {hits}")
            hits = store.text_search("item", 10, filters={"colour": ["red", "blue"]})
            if len(hits) != 10:
                raise SystemExit(f"bad text hits {hits}")
            versions |= seen
            reads += 1
            progress.write_text(str(reads))
    print(json.dumps({"versions": sorted(versions), "reads": reads}))
"""


def reads_done(progress: Path) -> int:
    try:
        return int(progress.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_reader_process_never_sees_a_torn_write(tmp_path: Path):
    n, rounds = 200, 12
    path, done, progress = tmp_path / "s", tmp_path / "done", tmp_path / "progress"
    with EmbeddedStore(path, rebuild_tombstone_fraction=0.5) as writer:
        writer.claim(SIGNATURE)
        writer.upsert(make_docs(n))
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        reader = subprocess.Popen(
            [sys.executable, "-W", "error", "-c", textwrap.dedent(READER), str(path), str(done), str(progress), str(n)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            # Every round replaces all documents (new vectors, new version) in one upsert; with
            # rebuild_tombstone_fraction=0.5 some rounds rebuild and swap the HNSW file too.
            # Waiting for a read between rounds guarantees the reader overlaps the writes.
            for version in range(1, rounds + 1):
                reads_before = reads_done(progress)
                writer.upsert(make_docs(n, seed=version, version=version))
                deadline = time.monotonic() + 60
                while reads_done(progress) <= reads_before and reader.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
        finally:
            done.touch()
            stdout, stderr = reader.communicate(timeout=120)
    assert reader.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["reads"] >= rounds
    assert set(report["versions"]) <= set(range(rounds + 1))
    assert len(report["versions"]) >= rounds // 2


def test_two_writer_processes_serialise(tmp_path: Path):
    path = tmp_path / "s"
    with EmbeddedStore(path) as store:
        store.claim(SIGNATURE)
    code = """
        import sys
        sys.path.insert(0, sys.argv[2])
        from test_embedded import make_docs
        from sidecar.stores.embedded import EmbeddedStore
        with EmbeddedStore(sys.argv[1]) as store:
            for batch in range(10):
                seed = batch + (100 if sys.argv[3] == "b" else 0)
                store.upsert(make_docs(30, seed=seed, prefix=f"{sys.argv[3]}-{batch}-"))
    """
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-W", "error", "-c", textwrap.dedent(code), str(path),
                          str(Path(__file__).parent), name], stderr=subprocess.PIPE, text=True, env=env)
        for name in ("a", "b")
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    with EmbeddedStore(path) as store:
        assert store.count() == 600
        docs = store.fetch(["a-3-7", "b-9-29"])
        assert [doc.id for doc in docs] == ["a-3-7", "b-9-29"]
        assert store.vector_search(docs[1].vector, 1)[0].id == "b-9-29"


def test_uncommitted_vector_rows_are_discarded(tmp_path: Path):
    with EmbeddedStore(tmp_path / "s") as store:
        store.claim(SIGNATURE)
        docs = make_docs(10)
        store.upsert(docs[:5])
        # A writer that crashed after appending vectors but before committing SQLite.
        with open(tmp_path / "s" / "vectors.f32", "ab") as handle:
            handle.write(np.ones((3, DIM), dtype=np.float32).tobytes())
        store.upsert(docs[5:])
        for doc in store.fetch([doc.id for doc in docs]):
            np.testing.assert_array_equal(doc.vector, docs[int(doc.id[3:])].vector)


# -- search ------------------------------------------------------------------------------


def test_ann_agrees_with_exact(store: EmbeddedStore):
    store.upsert(make_docs(2000))
    queries = clustered_unit_vectors(20, seed=123)
    overlaps = []
    for query in queries:
        ann = {h.id for h in store.vector_search(query, 10)}
        exact = store.vector_search(query, 10, exact=True)
        overlaps.append(len(ann & {h.id for h in exact}) / 10)
        assert exact == sorted(exact, key=lambda h: -h.score)
    assert np.mean(overlaps) >= 0.98


def test_exact_search_matches_numpy(store: EmbeddedStore):
    docs = make_docs(300)
    store.upsert(docs)
    query = clustered_unit_vectors(1, seed=5)[0]
    matrix = np.stack([doc.vector for doc in docs])
    expected = [f"doc{i}" for i in np.argsort(-(matrix @ query), kind="stable")[:7]]
    assert [h.id for h in store.vector_search(query, 7, exact=True)] == expected
    # A query shaped (1, dim) is accepted too.
    assert [h.id for h in store.vector_search(query[None, :], 7, exact=True)] == expected


@pytest.mark.parametrize("filtered", [False, True])
def test_exact_search_cut_inside_a_group_of_equal_scores_keeps_its_lowest_rows_as_a_deeper_search_ranks_them(
        store: EmbeddedStore, filtered: bool):
    # One image under several ids scores alike. The cut at k inside such a group kept whichever rows
    # argpartition left there (k=17 over 5 groups of 8: d39 for d32), so a page was no prefix of a deeper
    # search and exact search disagreed with a brute-force ranking (score, then row).
    groups = clustered_unit_vectors(5, seed=3)
    vectors = np.repeat(groups, 8, axis=0)
    store.upsert([Document(id=f"d{i:02d}", vector=v, metadata={"all": 1}) for i, v in enumerate(vectors)])
    query = groups[0] + 0.1 * groups[1]
    query /= np.linalg.norm(query)
    brute = [f"d{i:02d}" for i in np.lexsort((np.arange(len(vectors)), -(vectors @ query)))]
    filters = {"all": 1} if filtered else None
    for k in range(1, len(vectors) + 1):
        assert [h.id for h in store.vector_search(query, k, exact=True, filters=filters)] == brute[:k], k


def test_k_larger_than_the_store(store: EmbeddedStore):
    store.upsert(make_docs(5))
    assert len(store.vector_search(make_docs(1)[0].vector, 50)) == 5
    assert len(store.vector_search(make_docs(1)[0].vector, 50, exact=True)) == 5


def test_empty_store_searches_return_nothing(tmp_path: Path):
    with EmbeddedStore(tmp_path / "s") as store:
        assert store.signature() is None
        assert store.count() == 0
        assert store.vector_search(np.ones(DIM, dtype=np.float32), 3) == []
        assert store.text_search("anything", 3) == []


def test_a_filter_value_matches_what_opensearch_reads_it_as_and_true_is_never_1(store: EmbeddedStore):
    # As OpenSearch's term filter reads a value by the field's type: "1" matches a stored 1 (a number field), 1 and
    # true a stored "1" and "true" (a keyword field), "true" a stored true; a boolean is never a number. A value
    # matched stored values of its own JSON type only, so "2020" found nothing where OpenSearch found 2020.
    vectors = clustered_unit_vectors(4)
    store.upsert([Document(id=doc_id, vector=vector, metadata=metadata) for doc_id, vector, metadata in zip(
        ("flag", "one", "text", "list"), vectors,
        ({"v": True}, {"v": 1}, {"v": "1"}, {"v": [False, 1.0, "true"]}))])

    def matching(value) -> list[str]:
        return sorted(hit.id for hit in store.vector_search(vectors[0], 4, filters={"v": value}, exact=True))

    assert matching(True) == matching("true") == ["flag", "list"]
    assert matching(1) == matching("1") == ["list", "one", "text"]
    assert matching(1.0) == matching("1.0") == ["list", "one"]  # a keyword "1" is not 1.0's text "1.0"
    assert matching(False) == matching("false") == ["list"]
    assert matching([True, "1"]) == ["flag", "list", "one", "text"]
    assert matching("+1") == matching("01") == matching("1e0") == ["list", "one"]  # read as Java reads numbers
    assert matching(0) == matching(" 1") == matching("1_0") == matching("1e999") == []


def test_a_filter_finds_fields_named_with_a_backslash_or_quote_and_never_matches_inside_an_object(store: EmbeddedStore):
    # The field was found by a JSON path ($."name"), which compares the name as escaped in the JSON text (a
    # backslash matched nothing), and json_each walked an object field's members (its values matched).
    vectors = clustered_unit_vectors(4)
    store.upsert([Document(id=doc_id, vector=vector, metadata=metadata) for doc_id, vector, metadata in zip(
        ("slash", "quote", "object", "list"), vectors,
        ({"a\\b": "x"}, {'a"b': "x"}, {"colour": {"inner": "red"}}, {"colour": ["red", {"inner": "blue"}]}))])

    def matching(filters) -> list[str]:
        return sorted(hit.id for hit in store.vector_search(vectors[0], 4, filters=filters, exact=True))

    assert matching({"a\\b": "x"}) == ["slash"]
    assert matching({'a"b': "x"}) == ["quote"]
    assert matching({"colour": "red"}) == ["list"]
    assert matching({"colour": "blue"}) == []


@pytest.mark.parametrize("exact", [False, True])
def test_vector_search_with_filters(store: EmbeddedStore, exact: bool):
    docs = make_docs(400)
    store.upsert(docs)
    query = docs[8].vector
    by_id = {doc.id: doc for doc in docs}
    single = store.vector_search(query, 20, filters={"colour": "red"}, exact=exact)
    assert len(single) == 20 and all(by_id[h.id].metadata["colour"] == "red" for h in single)
    assert single[0].id == "doc8"
    many = store.vector_search(query, 30, filters={"colour": ["red", "blue"], "shard": 2}, exact=exact)
    assert len(many) == 30
    assert all(by_id[h.id].metadata["colour"] in ("red", "blue") and by_id[h.id].metadata["shard"] == 2 for h in many)
    # A list-valued metadata field matches when any element matches (term-filter semantics).
    tagged = store.vector_search(query, 10, filters={"tags": "odd"}, exact=exact)
    assert all(int(h.id[3:]) % 2 == 1 for h in tagged)
    assert store.vector_search(query, 5, filters={"colour": "purple"}, exact=exact) == []


def test_filtered_search_through_hnsw_matches_exact(tmp_path: Path):
    # exact_filter_rows=1 forces the HNSW + IDSelector path for every filter.
    with EmbeddedStore(tmp_path / "s", exact_filter_rows=1) as store:
        store.upsert(make_docs(1000))
        store.delete(["doc4"])
        query = clustered_unit_vectors(1, seed=11)[0]
        filters = {"colour": ["red", "green"]}
        ann = store.vector_search(query, 10, filters=filters)
        exact = store.vector_search(query, 10, filters=filters, exact=True)
        assert len({h.id for h in ann} & {h.id for h in exact}) >= 9
        assert "doc4" not in {h.id for h in ann}


def test_text_search_ranks_the_matching_doc_first(store: EmbeddedStore):
    docs = make_docs(100)
    docs.append(Document(id="sneaker", vector=docs[0].vector, text="Red running sneakers, size 42",
                         metadata={"colour": "red", "shard": 9}))
    store.upsert(docs)
    hits = store.text_search("red sneakers", 5)
    assert hits[0].id == "sneaker"
    assert all(hit.score > 0 for hit in hits)
    assert hits == sorted(hits, key=lambda h: -h.score)
    assert store.text_search("red sneakers", 5, filters={"shard": 9}) == hits[:1]
    assert store.text_search("red sneakers", 5, filters={"colour": "blue"}) == []


def test_text_search_with_filters(store: EmbeddedStore):
    store.upsert(make_docs(60))
    hits = store.text_search("item", 100, filters={"colour": ["green", "yellow"], "tags": "odd"})
    assert hits and all(int(h.id[3:]) % 4 in (1, 3) for h in hits)


@pytest.mark.parametrize("query", ['red AND "', "NEAR(a b", "colour:red", "-red *", "red) OR (blue", "x^2 + {y}"])
def test_text_search_is_safe_for_arbitrary_user_text(store: EmbeddedStore, query: str):
    store.upsert(make_docs(20))
    assert isinstance(store.text_search(query, 5), list)


def test_query_terms_are_the_index_words_each_once_and_operators_are_plain_words():
    assert query_terms('Red "sneakers" AND red Crème') == ["red", "sneakers", "and", "creme"]
    assert query_terms("  ?! ") == []


# -- validation and models --------------------------------------------------------------------


def test_model_mismatch(tmp_path: Path):
    with EmbeddedStore(tmp_path / "s") as store:
        store.claim(SIGNATURE)
        store.claim(SIGNATURE)
        other = ModelSignature(model="ViT-B-32", weights="laion2b", dim=DIM)
        with pytest.raises(ModelMismatchError, match="ViT-B-32"):
            store.claim(other)
    with EmbeddedStore(tmp_path / "s") as reopened:
        with pytest.raises(ModelMismatchError):
            reopened.claim(other)


def test_the_fine_model_is_recorded_once_kept_across_reopens_and_another_one_refused(tmp_path: Path):
    fine = ModelSignature(model="ViT-L-14", weights="openai", dim=16)
    with EmbeddedStore(tmp_path / "s") as store:
        store.claim(SIGNATURE)
        assert store.fine_signature() is None  # no fine vectors loaded: none recorded
        store.claim(SIGNATURE, fine_signature=fine)
        store.claim(SIGNATURE)  # a claim naming no fine model (setup, documents without fine vectors) keeps it
        assert store.fine_signature() == fine
    other = ModelSignature(model="ViT-H-14", weights="laion2b", dim=16)  # the same size: only the record tells
    with EmbeddedStore(tmp_path / "s") as reopened:
        assert reopened.fine_signature() == fine and reopened.signature() == SIGNATURE
        with pytest.raises(ModelMismatchError, match="fine-model vectors of ViT-L-14 .*refusing fine-model vectors "
                                                     "of ViT-H-14"):
            reopened.claim(SIGNATURE, fine_signature=other)
        assert reopened.fine_signature() == fine


def test_dim_mismatch_names_both_dimensions(store: EmbeddedStore):
    store.upsert(make_docs(3))
    wrong = Document(id="x", vector=np.ones(DIM * 2, dtype=np.float32))
    with pytest.raises(ValueError, match=rf"expects {DIM}.*got {DIM * 2}"):
        store.upsert([wrong])
    assert store.count() == 3


def test_a_query_of_another_size_is_a_model_mismatch_naming_the_stored_model_and_the_flags(store: EmbeddedStore):
    # A typed error, which the API answers 409 model_mismatch: as a ValueError it was a 500.
    store.upsert(make_docs(3))
    with pytest.raises(QueryModelMismatch, match=rf"vectors of {re.escape(SIGNATURE.describe())}, the query vector "
                                                 r"has 16 dimensions: .*\(--model / SIDECAR_MODEL, --pretrained"):
        store.vector_search(np.ones(16, dtype=np.float32), 3)


def test_a_query_of_another_size_than_an_unclaimed_stores_vectors_names_both_sizes(tmp_path: Path):
    with EmbeddedStore(tmp_path / "s") as store:
        store.upsert(make_docs(3))
        with pytest.raises(QueryModelMismatch, match=rf"store holds {DIM}-d vectors, the query vector has 16 dim"):
            store.vector_search(np.ones(16, dtype=np.float32), 3)


def test_claim_with_a_different_dim_than_stored_vectors(tmp_path: Path):
    with EmbeddedStore(tmp_path / "s") as store:
        store.upsert(make_docs(3))
        with pytest.raises(ValueError, match=rf"{DIM}-d.*64-d"):
            store.claim(ModelSignature(model="m", weights="w", dim=64))


@pytest.mark.parametrize(
    "vector, message",
    [
        (np.array([np.nan] * DIM, dtype=np.float32), "NaN"),
        (np.ones((2, DIM), dtype=np.float32), "1-D"),
        (np.ones(DIM, dtype=np.int64), "float"),
    ],
)
def test_bad_vectors_are_rejected(store: EmbeddedStore, vector: np.ndarray, message: str):
    with pytest.raises(ValueError, match=message):
        store.upsert([Document(id="bad", vector=vector)])
    assert store.count() == 0


@pytest.mark.parametrize("bad_id", ["", None, 3])
def test_bad_ids_are_rejected(store: EmbeddedStore, bad_id: object):
    with pytest.raises(ValueError, match="non-empty strings"):
        store.upsert([Document(id=bad_id, vector=np.ones(DIM, dtype=np.float32))])  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_k_must_be_a_positive_integer(store: EmbeddedStore, k: object):
    store.upsert(make_docs(3))
    with pytest.raises(ValueError, match="k must be"):
        store.vector_search(np.ones(DIM, dtype=np.float32), k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        store.text_search("red", k)  # type: ignore[arg-type]


def test_bad_filters_and_query_vectors(store: EmbeddedStore):
    store.upsert(make_docs(3))
    query = np.ones(DIM, dtype=np.float32)
    with pytest.raises(ValueError, match="empty list"):
        store.vector_search(query, 3, filters={"colour": []})
    with pytest.raises(ValueError, match="strings, numbers or booleans"):
        store.text_search("red", 3, filters={"colour": {"nested": 1}})
    with pytest.raises(ValueError, match="NaN or infinite"):
        store.vector_search(np.full(DIM, np.inf, dtype=np.float32), 3)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        store.upsert([Document(id="m", vector=query, metadata={"when": object()})])


def test_closed_store_refuses_work(tmp_path: Path):
    store = EmbeddedStore(tmp_path / "s")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.count()


def test_numpy_scalars_work_as_k_and_filter_values(store: EmbeddedStore):
    docs = make_docs(30)
    store.upsert(docs)
    hits = store.vector_search(docs[0].vector, np.int64(3), filters={"shard": np.int64(0)})
    assert len(hits) == 3 and hits[0].id == "doc0"
    assert len(store.text_search("item", np.int32(4), filters={"shard": [np.int64(1)]})) == 4


# -- load sessions: the graph is saved once per session -----------------------------------------


def graph_files(path: Path) -> list[str]:
    return sorted(file.name for file in path.glob("hnsw.*"))


def test_a_load_session_saves_the_graph_once_and_its_rows_answer_searches_meanwhile(tmp_path: Path):
    path = tmp_path / "s"
    with stored(path, make_docs(200)) as store:
        before = graph_files(path)
        assert len(before) == 1
        with store.bulk_load() as load:
            load.expect(150)
            for batch in range(3):
                docs = make_docs(50, seed=10 + batch, prefix=f"b{batch}-")
                store.upsert(docs)
                assert graph_files(path) == before  # rows committed, graph file untouched
                # Rows the graph does not cover yet are searched exactly beside it.
                assert store.vector_search(docs[7].vector, 5)[0].id == f"b{batch}-7"
            store.delete(["doc3"])
            assert store.count() == 349
        after = graph_files(path)
        assert len(after) == 1 and after != before
        queries = clustered_unit_vectors(10, seed=77)
        for query in queries:
            assert as_pairs(store.vector_search(query, 10)) == as_pairs(store.vector_search(query, 10, exact=True))
        assert store.check().clean


def test_a_first_load_session_whose_every_row_is_deleted_leaves_a_store_that_checks_clean(tmp_path: Path):
    # The session recorded its rows as covered by a graph it never saved (there were no live rows to build
    # one from): `store check` then reported "no HNSW graph recorded, though it should cover 5 rows".
    with EmbeddedStore(tmp_path / "s") as store:
        with store.bulk_load():
            docs = make_docs(5)
            store.upsert(docs)
            store.delete([doc.id for doc in docs])
        assert store.check().problems == []
        store.upsert(make_docs(3, seed=4, prefix="later-"))
        assert store.vector_search(make_docs(3, seed=4)[1].vector, 1)[0].id == "later-1"
        assert store.check().problems == []


def test_a_session_that_fails_leaves_its_committed_rows_searchable_and_the_next_one_adds_them(tmp_path: Path):
    path = tmp_path / "s"
    with stored(path, make_docs(100)) as store:
        before = graph_files(path)
        with pytest.raises(RuntimeError, match="interrupted"), store.bulk_load():
            store.upsert(make_docs(40, seed=3, prefix="late"))
            raise RuntimeError("interrupted")
        assert graph_files(path) == before
        report = store.check()
        assert report.clean and any("40 live rows written since the graph was last saved" in n for n in report.notes)
        assert store.vector_search(make_docs(40, seed=3, prefix="late")[5].vector, 1)[0].id == "late5"
        store.upsert(make_docs(1, seed=4, prefix="next"))
        assert store.check().notes == []


def test_a_session_cut_off_after_deleting_most_rows_still_answers_k_hits_and_repair_rebuilds_its_graph(
        tmp_path: Path):
    path, docs = tmp_path / "s", make_docs(1000)
    with stored(path, docs) as store:
        kept = docs[::50]
        with pytest.raises(RuntimeError, match="interrupted"), store.bulk_load():
            store.delete([doc.id for doc in docs if doc not in kept])  # deletes commit at once
            raise RuntimeError("interrupted")  # the session ends before its rebuild
        report = store.check()
        assert report.clean and any("still holds 980 deleted documents" in note for note in report.notes)
        query = clustered_unit_vectors(1, seed=9)[0]
        # HNSW walking a graph of 98 % deleted rows finds only some of the 20 live ones.
        assert as_pairs(store.vector_search(query, 15)) == as_pairs(store.vector_search(query, 15, exact=True))
        repaired = store.repair()
        assert any("rebuilt the HNSW graph from 20 live rows (980 of its rows were deleted documents)" in action
                   for action in repaired.actions)
        assert store.check().notes == []
        assert as_pairs(store.vector_search(query, 15)) == as_pairs(store.vector_search(query, 15, exact=True))


# -- readers take no lock ------------------------------------------------------------------------


def run_beside(hold, read, *, timeout: float = 60) -> list:
    """Run `read` on a thread while another thread sits inside the context `hold()`; what it returned."""
    entered, release, results = threading.Event(), threading.Event(), []

    def holder() -> None:
        with hold():
            entered.set()
            release.wait(timeout)

    holding = threading.Thread(target=holder)
    holding.start()
    try:
        assert entered.wait(timeout)
        reader = threading.Thread(target=lambda: results.append(read()))
        reader.start()
        reader.join(timeout)  # a reader that waits for the holder is still waiting here
        finished = list(results)
    finally:
        release.set()
        holding.join(timeout)
    return finished


def test_a_reader_does_not_wait_for_another_reader(store: EmbeddedStore):
    store.upsert(make_docs(30))
    version = store._opened[-1].store
    assert run_beside(version._read, store.count) == [30]


def test_a_reader_does_not_wait_for_a_writer(store: EmbeddedStore):
    docs = make_docs(30)
    store.upsert(docs)
    found = run_beside(store._opened[-1].store._write, lambda: [h.id for h in store.vector_search(docs[4].vector, 1)])
    assert found == [["doc4"]]


def test_threads_sharing_one_store_read_whole_generations_while_it_writes(tmp_path: Path):
    n = 120
    errors: list[str] = []
    done = threading.Event()
    with stored(tmp_path / "s", make_docs(n), rebuild_tombstone_fraction=0.5) as store:

        def read_loop() -> None:
            ids = [f"doc{i}" for i in range(n)]
            while not done.is_set():
                versions = {doc.metadata["version"] for doc in store.fetch(ids)}
                hits = store.vector_search(np.ones(DIM, dtype=np.float32), 10)
                text = store.text_search("item", 10, filters={"colour": "red"})
                if len(versions) != 1 or len(hits) != 10 or len(text) != 10 or store.count() != n:
                    errors.append(f"versions {versions}, {len(hits)} vector hits, {len(text)} text hits")

        readers = [threading.Thread(target=read_loop) for _ in range(4)]
        for reader in readers:
            reader.start()
        try:
            for version in range(1, 9):
                store.upsert(make_docs(n, seed=version, version=version))
        finally:
            done.set()
            for reader in readers:
                reader.join(60)
    assert errors == []


def closed_store_with_a_graph(path: Path, docs: list[Document]) -> Path:
    """A store at `path` holding `docs`, closed; its one graph file."""
    stored(path, docs).close()
    (graph,) = path.glob("hnsw.*")
    return graph


def test_a_graph_file_removed_while_a_reader_opens_it_is_still_read_whole(tmp_path: Path, monkeypatch):
    """A writer removes the old graph once its commit names a new one; a reader that took its snapshot
    before may be opening the old file just then. Here the file goes in the narrowest place: after the
    reader chose it, as faiss starts reading. (faiss opening the file by name met no file there and
    failed with a RuntimeError, which no reader retried: seen once in CI.)"""
    path, docs = tmp_path / "s", make_docs(300)
    graph = closed_store_with_a_graph(path, docs)
    read_index = faiss.read_index

    def removed_as_read_starts(*args):
        graph.unlink(missing_ok=True)
        return read_index(*args)

    monkeypatch.setattr(faiss, "read_index", removed_as_read_starts)
    with EmbeddedStore(path) as store:
        assert as_pairs(store.vector_search(docs[7].vector, 3))[0][0] == "doc7"
    assert not graph.exists()


def test_the_writer_syncs_every_commit_to_disk(store: EmbeddedStore):
    assert store._opened[-1].store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_large_write_leaves_no_large_write_ahead_log_while_a_reader_keeps_the_store_open(tmp_path: Path):
    # A server keeps its connections open while `index` writes 10,000-document batches: SQLite would
    # leave the log at the largest batch's size for the server's lifetime.
    with EmbeddedStore(tmp_path / "store") as server, EmbeddedStore(tmp_path / "store") as writer:
        writer.claim(SIGNATURE)
        docs = [dataclasses.replace(doc, thumbnail=bytes([i % 251]) * 4000) for i, doc in enumerate(make_docs(5000))]
        writer.upsert(docs)  # ~20 MB of thumbnails in one transaction
        assert server.count() == 5000
        writer.upsert(make_docs(1, prefix="one-more"))
        assert (tmp_path / "store" / "store.sqlite-wal").stat().st_size <= 8 << 20


# -- check and repair ------------------------------------------------------------------------------


def test_check_of_a_healthy_store_is_clean(store: EmbeddedStore):
    store.upsert(make_docs(100))
    store.delete(["doc1"])
    report = store.check()
    assert report.clean and report.problems == [] and report.notes == []
    assert "consistent" in report.describe()


def test_check_keeps_another_processs_write_out_while_it_reads_and_finds_no_damage(tmp_path: Path, monkeypatch):
    # A write committed between check's SQLite snapshot and its reading of the files beside it moved
    # the BM25 index past the snapshot's generation and removed the graph file it names: damage, to check.
    path = tmp_path / "s"
    with EmbeddedStore(path) as seed:
        seed.upsert(make_docs(100))
    checker, writer = EmbeddedStore(path), EmbeddedStore(path)  # `writer`: an `index` run of another process
    inspect_graph = checker._opened[-1].store._inspect_graph
    wrote = []

    def a_writer_writes_if_write_lock_is_free(*args, **kwargs):
        with open(path / "write.lock", "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                free = False
            else:
                free = True
                fcntl.flock(handle, fcntl.LOCK_UN)
        if free:
            wrote.append(writer.upsert(make_docs(100, version=1)))  # replaces every row: a new graph file
        return inspect_graph(*args, **kwargs)

    monkeypatch.setattr(checker._opened[-1].store, "_inspect_graph", a_writer_writes_if_write_lock_is_free)
    try:
        report = checker.check()
        assert report.problems == [] and wrote == []
        monkeypatch.undo()
        assert writer.upsert(make_docs(100, version=1)) == 100 and checker.check().clean
    finally:
        checker.close()
        writer.close()


def test_a_missing_graph_file_is_reported_refused_by_searches_and_writes_and_rebuilt_by_repair(tmp_path: Path):
    path, docs = tmp_path / "s", make_docs(300)
    graph = closed_store_with_a_graph(path, docs)
    graph.unlink()  # a power loss after a commit that named a graph file never written
    with EmbeddedStore(path) as store:
        report = store.check()
        assert not report.clean and any(graph.name in p and "missing" in p for p in report.problems)
        with pytest.raises(StoreError, match=f"the graph file {graph.name} named by .* store repair"):
            store.vector_search(docs[0].vector, 3)
        with pytest.raises(StoreError, match=f"the graph file {graph.name} named by .* store repair"):  # not a traceback
            store.upsert(make_docs(1, version=1))
        with sqlite3.connect(path / "store.sqlite") as conn:
            assert conn.execute("SELECT count(*) FROM docs").fetchone()[0] == 300
        repaired = store.repair()
        assert any("rebuilt the HNSW graph from 300 live rows" in a for a in repaired.actions)
        assert store.check().clean
        query = clustered_unit_vectors(1, seed=9)[0]
        assert as_pairs(store.vector_search(query, 10)) == as_pairs(store.vector_search(query, 10, exact=True))


def test_lost_vectors_are_reported_and_repair_removes_those_documents(tmp_path: Path):
    path = tmp_path / "s"
    docs = make_docs(50)
    stored(path, docs).close()
    with open(path / "vectors.f32", "r+b") as handle:
        handle.truncate(48 * DIM * 4)  # the last two rows' bytes never reached the disk
    with EmbeddedStore(path) as store:
        assert any("48 of the 50 committed rows" in p for p in store.check().problems)
        report = store.repair()
        assert any("removed 2 documents whose vectors were lost (doc48, doc49)" in a for a in report.actions)
        assert store.check().clean and store.count() == 48
        assert store.upsert(docs[48:]) == 2  # what a rerun of `index` does
        assert store.count() == 50 and store.check().clean


def test_an_unreadable_store_sqlite_is_refused_naming_the_file_and_what_to_do_and_is_left_as_it_was(tmp_path: Path):
    path = tmp_path / "s"
    stored(path, make_docs(20)).close()
    damage_sqlite_file(path / "store.sqlite")  # was sqlite3.DatabaseError "file is not a database", from any call
    damaged = (path / "store.sqlite").read_bytes()
    with pytest.raises(StoreDamaged) as refused:
        EmbeddedStore(path)
    assert str(refused.value).startswith(f"{path / 'store.sqlite'} is not a readable SQLite database (file is not a "
                                         "database): the store's documents cannot be read")
    assert "store repair` cannot rebuild them" in str(refused.value)
    assert "clip-sidecar index SHARDS --store-path NEW" in str(refused.value)
    assert refused.value.report.problems == [str(refused.value)] and not refused.value.report.clean
    assert (path / "store.sqlite").read_bytes() == damaged  # the documents' file: reported, never moved or begun anew


@pytest.mark.parametrize("lost", ["empty", "missing"])
def test_a_store_sqlite_emptied_or_removed_beside_the_vectors_is_damage_not_a_new_empty_store(tmp_path: Path, lost):
    path = tmp_path / "s"
    stored(path, make_docs(20)).close()
    vectors = (path / "vectors.f32").read_bytes()
    if lost == "empty":
        (path / "store.sqlite").write_bytes(b"")  # SQLite reads an empty file as a new database: check said consistent
    else:
        (path / "store.sqlite").unlink()
    assert EmbeddedStore.exists_at(path)
    with pytest.raises(StoreDamaged, match=re.escape(f"{path / 'store.sqlite'} is {lost}, though the folder holds the "
                                                     "store's vectors.f32, bm25/, hnsw.")):
        EmbeddedStore(path)
    assert (path / "vectors.f32").read_bytes() == vectors  # the next `index` overwrote them
    assert (path / "store.sqlite").exists() == (lost == "empty")  # no database begun over the lost one
    # An empty store.sqlite alone is a store whose creation was cut off before its schema: it opens as new.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "store.sqlite").write_bytes(b"")
    with EmbeddedStore(fresh) as store:
        assert store.count() == 0 and store.check().clean


def test_a_damaged_page_past_the_header_fails_a_search_as_store_damaged_naming_the_file(tmp_path: Path):
    path, docs = tmp_path / "s", make_docs(20)
    stored(path, docs).close()
    with contextlib.closing(sqlite3.connect(path / "store.sqlite")) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        docs_page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'docs'").fetchone()[0]
    with open(path / "store.sqlite", "r+b") as handle:
        handle.seek((docs_page - 1) * page_size)
        handle.write(b"\xff" * page_size)
    with EmbeddedStore(path) as store:  # opens: the header and the meta table read fine
        with pytest.raises(StoreDamaged, match=re.escape(f"{path / 'store.sqlite'} is not a readable SQLite database "
                                                         "(database disk image is malformed)")):
            store.vector_search(docs[0].vector, 3)  # was sqlite3.DatabaseError
        assert any("integrity check failed" in problem for problem in store.check().problems)


def _damage_bm25(path: Path, *, delete: list[int] = (), add: list[tuple[int, str]] = ()) -> None:
    """Change the store's BM25 index behind its back, as a bug or a half-finished write would."""
    with Bm25Index(path / "bm25").writer() as writer:
        writer.delete(delete)
        if add:
            writer.add(*zip(*add))
        writer.commit()


def test_a_bm25_index_out_of_step_is_reported_and_rebuilt(tmp_path: Path):
    path = tmp_path / "s"
    stored(path, make_docs(20)).close()
    _damage_bm25(path, delete=[3, 4], add=[(4, "something else"), (999, "a red item")])
    with EmbeddedStore(path) as store:
        problems = store.check().problems
        assert "1 live documents are missing from the BM25 index" in problems
        assert "1 BM25 entries hold another text than their document" in problems
        assert "1 BM25 entries belong to no live document (or repeat one)" in problems
        assert any(p.startswith("the BM25 index is at commit") for p in problems)
        assert "rebuilt the BM25 index from the live rows" in store.repair().actions
        assert store.check().clean
        assert [h.id for h in store.text_search("number3", 5)] == ["doc3"]


def _empty_bm25_meta(folder: Path) -> None:
    (folder / "meta.json").write_bytes(b"")


def _lose_a_bm25_segment_file(folder: Path) -> None:
    next(folder.glob("*.idx")).unlink()


def _cut_bm25_segment_files_short(folder: Path) -> None:
    for file in folder.glob("*.idx"):
        os.truncate(file, 10)


@pytest.mark.parametrize("damage", [_empty_bm25_meta, _lose_a_bm25_segment_file, _cut_bm25_segment_files_short])
def test_a_bm25_index_tantivy_cannot_open_is_built_again_when_the_store_opens(tmp_path: Path, damage, caplog):
    path = tmp_path / "s"
    with stored(path, make_docs(20)) as store:
        expected = as_pairs(store.text_search("blue number7", 5))
    damage(path / "bm25")
    with EmbeddedStore(path) as store:  # was tantivy's ValueError, from every command: check and repair too
        assert as_pairs(store.text_search("blue number7", 5)) == expected
        assert store.check().clean
    assert "the BM25 index of" in caplog.text and "cannot be opened" in caplog.text


def test_a_write_cut_off_between_its_bm25_and_sqlite_commits_is_healed_by_the_next_write(tmp_path: Path):
    path = tmp_path / "s"
    docs = make_docs(30)
    with stored(path, docs[:20]) as store:
        before = as_pairs(store.text_search("red item", 10))
    # What a writer killed after its tantivy commit leaves: rows SQLite never committed.
    _damage_bm25(path, add=[(20, "red red red item"), (21, "red item")])
    with EmbeddedStore(path) as store:
        assert as_pairs(store.text_search("red item", 10))[0][0] == before[0][0]  # row 20 is no document
        assert {h.id for h in store.text_search("red item", 20)} <= {d.id for d in docs[:20]}
        assert not store.check().clean
        store.upsert(docs[20:])
        assert store.check().clean
        assert {h.id for h in store.text_search("number25", 5)} == {"doc25"}


class _CtrlCDuringCommit:
    """The store's writer connection, with a Ctrl-C arriving while COMMIT runs: Python raises it once
    the statement has returned, the write committed."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        cursor = self._conn.execute(sql, *args)
        if sql == "COMMIT":
            raise KeyboardInterrupt
        return cursor

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def test_ctrl_c_during_a_commit_surfaces_as_the_interrupt_and_the_write_stays_committed(tmp_path: Path):
    path = tmp_path / "s"
    docs = make_docs(10)
    with stored(path, docs[:5]) as store:
        version = store._opened[-1].store
        real_writer = version._writer
        version._writer = _CtrlCDuringCommit(real_writer)
        try:
            with pytest.raises(KeyboardInterrupt):  # not sqlite3.OperationalError from a ROLLBACK of nothing
                store.upsert(docs[5:])
        finally:
            version._writer = real_writer
    with EmbeddedStore(path) as store:
        assert store.count() == 10
        assert store.check().clean


def test_filtered_text_search_gives_the_same_hits_whichever_way_it_restricts(store: EmbeddedStore, monkeypatch):
    store.upsert(make_docs(200))
    filters = {"colour": ["red", "blue"], "tags": "even"}
    ids = [f"doc{i}" for i in range(0, 200, 3)]
    by_term_set = (store.text_search("red item number4", 15, filters=filters),
                   store.text_search("blue item", 15, ids=ids))
    monkeypatch.setattr(bm25, "_TERM_SET_ROWS", 0)  # the path a filter of thousands of rows takes
    assert (store.text_search("red item number4", 15, filters=filters),
            store.text_search("blue item", 15, ids=ids)) == by_term_set
    assert by_term_set[0] and by_term_set[1]


def test_filtered_ids_are_the_given_documents_a_search_under_the_filters_matches(store: EmbeddedStore):
    docs = make_docs(12)
    store.upsert(docs)
    store.delete(["doc4"])
    filters = {"colour": ["red", "blue"], "tags": "even"}
    matching = {hit.id for hit in store.vector_search(docs[0].vector, 12, filters=filters, exact=True)}
    asked = [f"doc{i}" for i in range(12)] + ["unknown"]
    assert sorted(store.filtered_ids(asked, filters)) == sorted(matching) and matching
    # A value of another type than any the field holds can match no document: refused, as OpenSearch refuses it.
    with pytest.raises(StoreQueryError, match="^metadata field 'shard' holds numbers, its filter's values are text "
                                              "that read as none of them"):
        store.filtered_ids(["doc1"], {"shard": "one"})
    assert store.filtered_ids(["doc1"], {"shard": "1"}) == ["doc1"]  # a word OpenSearch reads as the number
    assert store.filtered_ids([], filters) == []


@pytest.mark.parametrize(("found", "advice"), [("4", ": a newer clip-sidecar wrote it, upgrade clip-sidecar to open it"),
                                             ("x", "")])
def test_a_store_of_an_unknown_format_is_refused_untouched_saying_to_upgrade_when_newer(tmp_path: Path, found, advice):
    path = tmp_path / "s"
    with EmbeddedStore(path) as store:
        store.claim(SIGNATURE)
        store.upsert(make_docs(5))
    conn = sqlite3.connect(path / "store.sqlite")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'format'", (found,))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as refused:
        EmbeddedStore(path)
    assert str(refused.value) == f"{path} holds embedded-store format {found!r}; this version reads '1', '2', '3'{advice}"
    conn = sqlite3.connect(path / "store.sqlite")
    assert conn.execute("SELECT count(*) FROM docs").fetchone()[0] == 5
    assert dict(conn.execute("SELECT key, value FROM meta"))["format"] == found


def test_a_format_2_store_gets_its_bm25_index_when_opened(tmp_path: Path):
    path = tmp_path / "s"
    docs = make_docs(40)
    with stored(path, docs) as store:
        expected = as_pairs(store.text_search("blue number7", 5))
    shutil.rmtree(path / "bm25")  # what format 2 had instead: an FTS5 table
    conn = sqlite3.connect(path / "store.sqlite")
    conn.execute("CREATE VIRTUAL TABLE docs_fts USING fts5(text)")
    conn.execute("INSERT INTO docs_fts(rowid, text) SELECT row, text FROM docs")
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'format'")
    conn.execute("DELETE FROM meta WHERE key = 'bm25_opstamp'")
    conn.commit()
    conn.close()
    with EmbeddedStore(path) as store:
        assert as_pairs(store.text_search("blue number7", 5)) == expected
        assert store.check().clean
    conn = sqlite3.connect(path / "store.sqlite")
    assert dict(conn.execute("SELECT key, value FROM meta"))["format"] == "3"
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'docs_fts'").fetchone()[0] == 0
    conn.close()


def test_leftovers_of_an_interrupted_write_are_notes_and_repair_removes_them(tmp_path: Path):
    path = tmp_path / "s"
    stored(path, make_docs(20)).close()
    with open(path / "vectors.f32", "ab") as handle:
        handle.write(np.ones((3, DIM), dtype=np.float32).tobytes())  # appended, never committed
    (path / "hnsw.99.faiss.tmp").write_bytes(b"half a graph")
    with EmbeddedStore(path) as store:
        report = store.check()
        assert report.clean
        assert any("bytes past the committed rows" in n for n in report.notes)
        assert any("hnsw.99.faiss.tmp" in n for n in report.notes)
        repaired = store.repair()
        assert "removed leftover file hnsw.99.faiss.tmp" in repaired.actions
        assert store.check().notes == []


def test_a_format_1_store_is_read_and_upgraded_when_opened(tmp_path: Path):
    path = tmp_path / "s"
    docs = make_docs(60)
    stored(path, docs[:50]).close()
    conn = sqlite3.connect(path / "store.sqlite")  # what format 1 wrote: no hnsw_rows, the graph covers all rows
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'format'")
    conn.execute("DELETE FROM meta WHERE key = 'hnsw_rows'")
    conn.commit()
    conn.close()
    with EmbeddedStore(path) as store:
        assert store.check().clean and store.count() == 50
        assert store.vector_search(docs[10].vector, 1)[0].id == "doc10"
        store.upsert(docs[50:])
        assert store.check().clean and store.count() == 60
    conn = sqlite3.connect(path / "store.sqlite")
    assert dict(conn.execute("SELECT key, value FROM meta"))["format"] == "3"
    conn.close()
