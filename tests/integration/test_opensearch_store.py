"""OpenSearchStore against a real node: bulk load, k-NN, BM25, filters, exact vs ANN, alias swap, hybrid."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from sidecar.ingest.indexing import rebuild_index
from sidecar.ingest.shards import ShardError
from sidecar.retrieval.search import SearchOptions, search, uses_native_hybrid
from sidecar.stores.base import ModelMismatchError, StoreError, StoreQueryError, StoreUnavailable
from sidecar.stores.embedded import EmbeddedStore
from sidecar.stores.opensearch_lock import LoadLock
from sidecar.types import Document, ModelSignature
from tests.integration.conftest import (
    DIM,
    SIGNATURE,
    URL,
    drop,
    make_documents,
    make_store,
    owned_indices,
)
from tests.support import assert_a_zero_weight_ranks_as_the_other_list, tied_captions, write_shards

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_bulk_load_counts_and_knn_finds_nearest_cluster(store):
    docs, labels, centres = make_documents(3000)
    assert store.upsert(docs) == 3000
    assert store.count() == 3000
    hits = store.vector_search(centres[2], 10)
    assert len(hits) == 10
    assert {labels[int(h.id[1:])] for h in hits} == {2}
    # Raw inner product, not OpenSearch's 1 + ip transform.
    best = store.fetch([hits[0].id])[0]
    assert hits[0].score == pytest.approx(float(best.vector @ centres[2]), abs=1e-4)
    assert -1.0 <= hits[-1].score <= hits[0].score <= 1.0
    assert store.content_hashes()["d7"] == "h7"


def test_text_search_filters_and_fetch_order(store):
    docs, _, centres = make_documents(400)
    store.upsert(docs)
    hits = store.text_search("cluster3", 50)
    assert hits and all("cluster3" in docs[int(h.id[1:])].text for h in hits)
    red = store.text_search("thing", 20, filters={"color": "red"})
    assert red and all(docs[int(h.id[1:])].metadata["color"] == "red" for h in red)
    either = store.vector_search(centres[0], 20, filters={"color": ["green", "blue"]})
    assert len(either) == 20 and {docs[int(h.id[1:])].metadata["color"] for h in either} <= {"green", "blue"}
    exact = store.vector_search(centres[0], 20, filters={"color": "red"}, exact=True)
    assert {docs[int(h.id[1:])].metadata["color"] for h in exact} == {"red"}
    fetched = store.fetch(["d5", "missing", "d1"])
    assert [d.id for d in fetched] == ["d5", "d1"]
    np.testing.assert_allclose(fetched[0].vector, docs[5].vector, atol=1e-6)
    assert fetched[0].metadata == docs[5].metadata


def test_exact_matches_numpy_and_ann_recall(store):
    docs, _, _ = make_documents(2000, seed=1)
    store.upsert(docs)
    matrix = np.stack([d.vector for d in docs])
    queries, _, _ = make_documents(20, seed=2, prefix="q")
    recalls = []
    for q in queries:
        truth = [f"d{i}" for i in np.argsort(-(matrix @ q.vector))[:10]]
        exact = store.vector_search(q.vector, 10, exact=True)
        assert [h.id for h in exact][:5] == truth[:5]
        assert exact[0].score == pytest.approx(float(matrix[int(truth[0][1:])] @ q.vector), abs=1e-4)
        ann = store.vector_search(q.vector, 10)
        recalls.append(len({h.id for h in ann} & set(truth)) / 10)
    assert np.mean(recalls) >= 0.9


def test_vector_scores_are_the_float32_inner_products_opensearch_computed_without_decimal_residue(store):
    docs, _, _ = make_documents(300, seed=3)
    store.upsert(docs)
    vectors = {d.id: d.vector for d in docs}
    queries, _, _ = make_documents(10, seed=4, prefix="q")
    for q in queries:
        for exact in (True, False):
            for hit in store.vector_search(q.vector, 10, exact=exact):
                # A float32 value, as the embedded store's scores are (1.6823235 read as a float64 less 1 was
                # 0.6823235000000001), within 2 float32 steps of 1 + ip (2.4e-7) of the inner product.
                assert float(np.float32(hit.score)) == hit.score
                assert abs(hit.score - float(vectors[hit.id] @ q.vector)) <= 2.4e-7


def test_incremental_upsert_and_delete_are_visible(store):
    docs, _, _ = make_documents(100)
    store.upsert(docs)
    changed = Document(id="d3", vector=docs[3].vector, text="brand new words", content_hash="new")
    store.upsert([changed, Document(id="extra", vector=docs[4].vector, text="extra")])
    assert store.count() == 101
    assert store.content_hashes()["d3"] == "new"
    assert [h.id for h in store.text_search("brand", 5)] == ["d3"]
    assert store.delete(["d3", "extra", "never-there"]) == 2
    assert store.count() == 99
    assert store.fetch(["d3"]) == []


def test_other_model_is_refused(store):
    assert store.signature() == SIGNATURE
    with pytest.raises(ModelMismatchError):
        store.claim(ModelSignature(model="other", weights="x", dim=DIM))
    with pytest.raises(ModelMismatchError):
        store.claim(ModelSignature(model=SIGNATURE.model, weights=SIGNATURE.weights, dim=DIM * 2))
    store.claim(SIGNATURE)  # the same model again is fine


def test_failed_load_restores_refresh_and_replicas(node):
    s = make_store(large_load_threshold=10)
    try:
        s.claim(SIGNATURE)
        docs, _, _ = make_documents(200)
        bad = Document(id="bad", vector=np.ones(DIM + 3, dtype=np.float32), text="wrong dimension")
        with pytest.raises(StoreError, match="bad") as info:
            s.upsert(docs[:100] + [bad] + docs[100:])
        assert info.value.__cause__ is not None  # the BulkIndexError with every item error
        settings = next(iter(s.client.indices.get_settings(index=s.alias).values()))["settings"]["index"]
        assert settings["refresh_interval"] == "1s"
        assert settings["number_of_replicas"] == "1"
        assert "bulk_load_saved_settings" not in (s._meta() or {})
        assert s.signature() == SIGNATURE
    finally:
        drop(s)


def test_alias_swap_under_query_load_has_no_failures(store):
    docs, _, centres = make_documents(1500)
    store.upsert(docs)
    failures: list[BaseException] = []
    answered = []
    stop = threading.Event()

    def query_loop() -> None:
        reader = make_store(index=store.alias)
        try:
            for _ in range(2000):  # bounded even if the swap hangs
                if stop.is_set():
                    break
                try:
                    answered.append(len(reader.vector_search(centres[1], 5)))
                except Exception as exc:  # noqa: BLE001 - every failure counts, whatever its type
                    failures.append(exc)
        finally:
            reader.close()

    thread = threading.Thread(target=query_loop)
    thread.start()
    try:
        before = store.alias_indices()
        new_docs, _, _ = make_documents(1200, seed=5, prefix="n")
        new_index = store.rebuild(iter(new_docs), signature=SIGNATURE)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert failures == []
    assert answered and all(n == 5 for n in answered)
    assert store.alias_indices() == [new_index]
    assert not store.client.indices.exists(index=before[0])
    assert store.count() == 1200
    assert store.signature() == SIGNATURE


def test_a_rebuild_keeps_the_default_pipelines_beside_the_settings_of_a_cluster_template_matching_the_new_index(
        store):
    # The default pipelines (`opensearch connect --set-defaults`, or by hand) are the old index's settings, which no
    # template gives the new one: connect leaves none, so as not to hide the cluster's own (one applies per index).
    client, alias = store.client, store.alias
    ingest, search_pipeline, template = f"{alias}-ingest", f"{alias}-search", f"{alias}-cluster-wide"
    try:
        client.ingest.put_pipeline(id=ingest, body={"processors": []})
        client.transport.perform_request("PUT", f"/_search/pipeline/{search_pipeline}", body={"request_processors": []})
        client.indices.put_settings(index=alias, body={"index": {"default_pipeline": ingest,
                                                                 "search.default_pipeline": search_pipeline}})
        client.indices.put_index_template(name=template, body={
            "index_patterns": [f"{alias}-*"], "priority": 500, "template": {"settings": {"index": {"max_result_window": 20000}}}})
        new_index = store.rebuild(iter(make_documents(10)[0]), signature=SIGNATURE)
        settings = client.indices.get_settings(index=new_index, flat_settings=True)[new_index]["settings"]
        assert (settings["index.default_pipeline"], settings["index.search.default_pipeline"]) == (ingest, search_pipeline)
        assert settings["index.max_result_window"] == "20000"
        assert store.count() == 10
    finally:
        client.indices.delete_index_template(name=template, ignore=404)
        client.indices.delete(index=owned_indices(alias), ignore_unavailable=True)  # before the pipelines it names
        client.ingest.delete_pipeline(id=ingest, ignore=404)
        client.transport.perform_request("DELETE", f"/_search/pipeline/{search_pipeline}", params={"ignore": 404})


def test_hybrid_search_fuses_vector_and_text(store):
    if not store.has_neural_search():
        pytest.skip("neural-search plugin not installed on this node")
    docs, labels, centres = make_documents(600)
    store.upsert(docs)
    # Vector side points at cluster 4; text side only matches "cluster5" items.
    text_only = {d.id for d in docs if labels[int(d.id[1:])] == 5}
    minmax = store.hybrid_search(centres[4], "cluster5", 10, weights=(0.1, 0.9))
    assert minmax[0].id in text_only
    vector_heavy = store.hybrid_search(centres[4], "cluster5", 10, weights=(0.9, 0.1))
    assert labels[int(vector_heavy[0].id[1:])] == 4
    rrf = store.hybrid_search(centres[4], "cluster5", 10, fusion="rrf")
    ids = {h.id for h in rrf}
    assert ids & text_only and any(labels[int(i[1:])] == 4 for i in ids)
    red = store.hybrid_search(centres[4], "cluster5", 10, filters={"color": "red"})
    assert red and all(docs[int(h.id[1:])].metadata["color"] == "red" for h in red)
    with pytest.raises(StoreError, match="rrf"):
        store.hybrid_search(centres[4], "x", 5, fusion="rrf", weights=(0.2, 0.8))


@pytest.mark.parametrize("fusion", ["minmax", "zscore", "rrf"])
def test_hybrid_with_one_list_weighted_zero_ranks_exactly_as_the_other_list_ties_included(store, fusion):
    docs, query = tied_captions(dim=DIM)
    # Written first, so that the tied captions' Lucene doc ids pass 32: neural-search's hybrid query orders equal
    # fused scores by a hash map of doc ids, which put tied2..tied4 before tied0 from there (so a weight of 0 is fused in Python).
    store.upsert([Document(id=f"filler{i}", vector=-query, text="a green triangle") for i in range(30)])
    store.upsert(docs)
    assert_a_zero_weight_ranks_as_the_other_list(store, query, depth=len(docs), fusion=fusion)


def test_a_searchs_ef_search_reaches_the_native_hybrid_querys_knn_side(store, monkeypatch):
    if not store.has_neural_search():
        pytest.skip("the native hybrid query needs neural-search")
    docs, _, centres = make_documents(200)
    store.upsert(docs)
    sent = []
    search_on_the_node = store._search
    monkeypatch.setattr(store, "_search", lambda body, **kwargs: sent.append(body) or search_on_the_node(body, **kwargs))
    options = SearchOptions(mode="hybrid", k=10, candidates=50, ef_search=321)
    assert uses_native_hybrid(store, options)
    assert len(search(store, vector=centres[2], text="cluster2", options=options).hits) == 10
    knn = sent[0]["query"]["hybrid"]["queries"][0]["knn"]["vector"]
    assert knn["method_parameters"] == {"ef_search": 321}


def test_metadata_of_mixed_types_loads_and_filters_as_written(store):
    # A CSV date column, a number column with a word in it, decimals: OpenSearch's default dynamic
    # mapping would make `taken` a date and refuse "unknown", refuse "five", and round 0.1 to float32.
    docs, _, centres = make_documents(3)
    metadata = ({"taken": "2021-03-04", "n": 5, "score": 0.1}, {"taken": "unknown", "n": "five", "score": 0.3},
                {"n": 4.5})
    assert store.upsert([dataclasses.replace(doc, metadata=meta) for doc, meta in zip(docs, metadata)]) == 3

    def matching(**filters) -> list[str]:
        return sorted(hit.id for hit in store.vector_search(centres[0], 3, filters=filters, exact=True))

    assert matching(taken="unknown") == ["d1"] and matching(taken="2021-03-04") == ["d0"]
    assert matching(score=0.1) == ["d0"] and matching(n=5) == ["d0"]
    assert matching(n=4) == []  # 4.5 is not cut to 4 (no coerce): kept in _source, not indexed in a long field
    assert dict(store.facets()["score"].values) == {0.1: 1, 0.3: 1}
    assert store.fetch(["d1", "d2"])[1].metadata == {"n": 4.5}


def test_a_filter_value_finds_the_same_documents_or_the_same_refusal_on_both_stores(store, tmp_path):
    # A user moving a corpus from the embedded store to OpenSearch: "2020" for a stored 2020, 5 for a stored "5"
    # and "true" for a stored true found nothing (later: a 400) on the embedded store, the documents here.
    docs, _, centres = make_documents(2)
    metadata = ({"year": 2020, "code": "5", "on": True, "price": 2.5}, {"year": 2021, "code": "true", "on": False,
                                                                         "price": 3.0})
    docs = [dataclasses.replace(doc, metadata=meta) for doc, meta in zip(docs, metadata)]
    store.upsert(docs)
    with EmbeddedStore(tmp_path / "embedded") as embedded:
        embedded.claim(SIGNATURE)
        embedded.upsert(docs)

        def answers(filters: dict) -> tuple[object, object]:
            found = []
            for each in (store, embedded):
                try:
                    found.append(sorted(hit.id for hit in each.vector_search(centres[0], 2, filters=filters,
                                                                              exact=True)))
                except StoreQueryError:
                    found.append("refused")
            return found[0], found[1]

        for filters, expected in (({"year": "2020"}, ["d0"]), ({"year": "2020.0"}, ["d0"]), ({"year": 2020.0}, ["d0"]),
                                  ({"year": "2020.5"}, []), ({"price": "2.5"}, ["d0"]), ({"code": 5}, ["d0"]),
                                  ({"code": True}, ["d1"]), ({"on": "true"}, ["d0"]), ({"on": ["false"]}, ["d1"]),
                                  ({"year": "abc"}, "refused"), ({"year": True}, "refused"), ({"on": 1}, "refused"),
                                  ({"on": "yes"}, "refused"), ({"price": "abc"}, "refused"),
                                  ({"year": "+2020"}, ["d0"]), ({"year": "02020"}, ["d0"]), ({"year": "2020."}, ["d0"]),
                                  ({"price": "2.5e0"}, ["d0"]), ({"year": " 2020"}, "refused"),
                                  ({"year": "2_020"}, "refused")):
            assert answers(filters) == (expected, expected), filters


def test_setup_is_idempotent(node):
    s = make_store()
    try:
        s.setup(DIM)
        first = s.alias_indices()
        s.setup(DIM)
        assert s.alias_indices() == first and s.signature() is None
        with pytest.raises(StoreError, match="dim"):
            s.setup(DIM + 1)
    finally:
        drop(s)


def test_an_index_whose_vector_field_is_no_knn_vector_is_refused_and_reported_naming_it(node):
    # An index made by hand (or by dynamic mapping) behind the alias: setup and claim ended in KeyError: 'vector'.
    s = make_store()
    name = f"{s.alias}-v1"
    try:
        s.client.indices.create(index=name, body={"mappings": {"properties": {"text": {"type": "text"}}},
                                                  "aliases": {s.alias: {}}})
        for call in (lambda: s.setup(DIM), lambda: s.claim(SIGNATURE)):
            with pytest.raises(StoreError, match=f"index {name} behind alias {s.alias} maps field 'vector' as "
                                                 "nothing, not as a knn_vector"):
                call()
        report = s.check()
        assert any("not as a knn_vector" in problem and "--rebuild" in problem for problem in report.problems)
    finally:
        drop(s)


def test_a_write_block_fails_a_load_and_a_rebuild_in_one_store_error_naming_opensearchs_reason(store):
    # What OpenSearch sets on every index of a disk past its flood-stage watermark: the load lock's create
    # was answered 429 cluster_block_exception, which left `index` and `index --rebuild` in a traceback.
    docs, _, _ = make_documents(5)
    blocked = {"index.blocks.read_only_allow_delete": True}
    store.client.indices.put_settings(index=owned_indices(store.alias), body=blocked, expand_wildcards="all")
    try:
        for operation, load in (("index", lambda: store.upsert(docs)),
                                ("rebuild", lambda: store.rebuild(docs, signature=SIGNATURE))):
            with pytest.raises(StoreError, match=f"^{operation} of {store.alias} failed: OpenSearch at {URL} answered "
                                                 "429 cluster_block_exception: .*flood-stage watermark"):
                load()
    finally:
        store.client.indices.put_settings(index=owned_indices(store.alias), expand_wildcards="all",
                                          body={"index.blocks.read_only_allow_delete": None})
    assert store.upsert(docs) == 5  # the lock was let go


def test_a_write_block_met_mid_load_stops_it_naming_the_block_not_as_an_overloaded_cluster(node):
    # The block set once the load holds its lock: each document answers 429 cluster_block_exception, which
    # was retried as rejections for rounds (minutes at the default backoff), then called an overload.
    s = make_store(initial_backoff=0.05)
    try:
        s.claim(SIGNATURE)
        docs, _, _ = make_documents(20)
        s.client.indices.put_settings(index=f"{s.alias}-v*", body={"index.blocks.read_only_allow_delete": True})
        with pytest.raises(StoreError, match="cluster_block_exception.*flood-stage watermark") as info:
            s.upsert(docs)
        assert "overloaded" not in str(info.value)
    finally:
        s.client.indices.put_settings(index=f"{s.alias}-v*", body={"index.blocks.read_only_allow_delete": None})
        drop(s)


def test_reads_before_setup_name_the_missing_alias_and_the_setup_command(node):
    # docker compose and Kubernetes start the server before anyone ran `opensearch setup`: /readyz's reason
    # and /v1/search's error are these messages.
    s = make_store()
    try:
        for read in (s.count, lambda: s.vector_search(np.ones(DIM, dtype=np.float32) / DIM**0.5, 3),
                     lambda: s.text_search("red", 3)):
            with pytest.raises(StoreUnavailable) as caught:  # not there yet: the API answers 503, retry later
                read()
            message = str(caught.value)
            assert f"no index or alias {s.alias}: run `clip-sidecar opensearch setup`" in message
            assert "root_cause" not in message
    finally:
        s.close()


def test_installed_package_finds_plugin_config_through_the_setting(node, tmp_path):
    """A non-editable install (Docker: `pip install .`) has no plugin_config/ beside the package:
    SIDECAR_PLUGIN_CONFIG_DIR points at a copy; without it the error names the variable."""
    source, target = tmp_path / "source", tmp_path / "site"
    # What the Dockerfiles copy before `pip install .` (a copy: the build must not write into the checkout).
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "sidecar", source / "sidecar", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    assert not (target / "plugin_config").exists()
    config = shutil.copytree(REPO / "plugin_config", tmp_path / "config")
    probe = (
        "import sidecar.stores.opensearch as m, sys\n"
        "from sidecar.config import Settings\n"
        "from sidecar.stores import open_store\n"
        "assert m.__file__.startswith(sys.argv[1]), m.__file__\n"
        "try:\n"
        f"    s = open_store(Settings.from_env(store='opensearch', opensearch_url={URL!r}, opensearch_index=sys.argv[2]))\n"
        "except m.StoreError as exc:\n"
        "    print('ERROR', exc); sys.exit(0)\n"
        "s.setup(8); print('OK', s.config_dir, s.count())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_PLUGIN_CONFIG_DIR"}
    env["PYTHONPATH"] = str(target)
    # What the probe's setup makes (the index and the load lock's index) is deleted here, whatever the probe did.
    owner = make_store(index=f"it-inst-{uuid.uuid4().hex[:8]}")
    run = functools.partial(subprocess.run, [sys.executable, "-c", probe, str(target), owner.alias],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, check=True)
    try:
        missing = run(env=env).stdout
        assert missing.startswith("ERROR") and "SIDECAR_PLUGIN_CONFIG_DIR" in missing
        found = run(env={**env, "SIDECAR_PLUGIN_CONFIG_DIR": str(config)}).stdout
        assert found.strip() == f"OK {config} 0"
    finally:
        drop(owner)


def test_a_rebuild_that_would_drop_documents_no_shard_holds_is_refused_unless_told_to_drop_them(store, tmp_path):
    # A document written by another door (OpenSearch's ingest pipeline) is in no shard: a rebuild from the
    # shards would lose it, so it is refused before anything changes; told to, it drops it and says so.
    docs, _, _ = make_documents(5)
    store.upsert(docs)
    store.client.index(index=store.alias, id="from-the-pipeline", refresh=True,
                       body={"id": "from-the-pipeline", "text": "red", "vector": docs[0].vector.tolist()})
    shards = write_shards(tmp_path / "shards", docs, SIGNATURE)
    before = store.alias_indices()
    with pytest.raises(ShardError, match=r"1 stored document is in no shard .* 'from-the-pipeline'.*--drop-unsharded"):
        rebuild_index(store, shards, progress=False)
    assert store.alias_indices() == before and store.count() == 6
    summary = rebuild_index(store, shards, drop_unsharded=True, progress=False)
    assert (summary.deleted, summary.total_in_store) == (1, 5)
    assert "1 deleted" in summary.describe()



def test_a_rebuild_waiting_for_an_index_run_refuses_the_documents_that_run_writes_from_another_shard_directory(
        store, tmp_path, monkeypatch):
    # The unsharded check reads what is stored once the rebuild holds the load lock: read while it waited, it missed
    # what the index run it waited for wrote, and the rebuild dropped those documents unnamed.
    docs, _, _ = make_documents(7)
    store.upsert(docs[:5])
    shards = write_shards(tmp_path / "shards", docs[:5], SIGNATURE)
    holder = make_store(index=store.alias)  # another process's index run from another shard directory
    waiting, outcome = threading.Event(), []

    def rebuild() -> None:
        try:
            outcome.append(rebuild_index(store, shards, lock_wait_s=60, progress=False))
        except ShardError as exc:
            outcome.append(exc)

    try:
        with holder.bulk_load():
            acquire = LoadLock.acquire

            def signalling_acquire(lock, **kwargs):
                waiting.set()
                return acquire(lock, **kwargs)

            monkeypatch.setattr(LoadLock, "acquire", signalling_acquire)
            thread = threading.Thread(target=rebuild)
            thread.start()
            assert waiting.wait(timeout=60)
            holder.upsert(docs[5:])
        thread.join(timeout=120)
    finally:
        holder.close()
    assert len(outcome) == 1 and isinstance(outcome[0], ShardError), outcome
    assert "2 stored documents are in no shard of" in str(outcome[0]) and "'d5'" in str(outcome[0])
    assert store.count() == 7 and len(store.alias_indices()) == 1

def test_a_first_rebuild_onto_an_alias_nothing_set_up_yet_writes_every_document(node, tmp_path):
    store = make_store()
    try:
        docs, _, _ = make_documents(3)
        summary = rebuild_index(store, write_shards(tmp_path / "shards", docs, SIGNATURE), progress=False)
        assert (summary.written, summary.deleted, summary.total_in_store) == (3, 0, 3)
    finally:
        drop(store)
