"""The OpenSearch store on a real 3-node cluster (scripts/opensearch-local start --nodes 3): an
index of 3 shards and 1 replica answers as one shard does, keeps answering while a node is down,
ends with every document exactly once after a node is killed mid-load, and rebuilds by alias swap.

The module starts its own cluster (OPENSEARCH_CLUSTER_PORT, default 9660; node dir
OPENSEARCH_CLUSTER_DIR) unless one already answers there, and stops it at the end only if it
started it. The store talks to node 1; node 3 is the one killed."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConnectionError as OSConnectionError

from sidecar.retrieval.search import SearchOptions, search
from sidecar.stores.opensearch import OpenSearchStore
from sidecar.stores.opensearch_lock import LOCK_SUFFIX
from sidecar.types import Document
from tests.integration.conftest import SIGNATURE, clustered_vectors, load_in_background, make_documents
from tests.support import ORIGINAL_ENVIRON

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "opensearch-local"
PORT = int(os.environ.get("OPENSEARCH_CLUSTER_PORT", "9660"))
NODE_DIR = os.environ.get("OPENSEARCH_CLUSTER_DIR", "/tmp/clip-sidecar-cluster")
URL = f"http://127.0.0.1:{PORT}"
ENV = {**ORIGINAL_ENVIRON, "OPENSEARCH_PORT": str(PORT), "OPENSEARCH_NODE_DIR": NODE_DIR}
N_DOCS = 3000
QUERIES = 12
# Wide enough that HNSW finds the exact top-100 a hybrid takes, in one graph as in three: the
# layouts are then compared on what sharding changes (statistics, normalisation), not on ANN misses.
EF_SEARCH = 1000


def cluster_script(*args: str, timeout: float = 600) -> None:
    done = subprocess.run([str(SCRIPT), *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"opensearch-local {' '.join(args)}: {done.stderr[-2000:]}"


def nodes_joined(client: OpenSearch) -> int:
    try:
        return int(client.cluster.health(request_timeout=10)["number_of_nodes"])
    except OSConnectionError:
        return 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """Node 1's URL of a 3-node cluster."""
    client = OpenSearch(hosts=[URL], timeout=30, max_retries=0)
    started = nodes_joined(client) == 0
    if started:
        cluster_script("start", "--nodes", "3")
    assert nodes_joined(client) == 3, f"{URL} is not a 3-node cluster; stop it or set OPENSEARCH_CLUSTER_PORT"
    try:
        yield URL
    finally:
        client.close()
        if started:
            cluster_script("stop")


def store_on(url: str, *, shards: int, replicas: int, **overrides: object) -> OpenSearchStore:
    store = OpenSearchStore(url=url, index=f"it-cluster-{shards}x{replicas}-{time.monotonic_ns() % 10**8}",
                            number_of_shards=shards, number_of_replicas=replicas, **overrides)  # type: ignore[arg-type]
    store.claim(SIGNATURE)
    return store


def drop(store: OpenSearchStore) -> None:
    store.client.indices.delete(index=f"{store.alias}-v*,{store.alias}{LOCK_SUFFIX}", ignore_unavailable=True)
    store.close()


def wait_for_status(store: OpenSearchStore, status: str) -> dict:
    return store.client.cluster.health(index=store.alias, wait_for_status=status, timeout="120s",
                                       request_timeout=150)


def top10s(store: OpenSearchStore, queries: list[tuple[np.ndarray, str]]) -> dict[str, list[list]]:
    """Per query: top-10 ids by exact and by ANN vector search, and the top-10 BM25 scores (ids
    tied on a score may come in any order, and the cut may fall inside a tie)."""
    out: dict[str, list[list]] = {"exact": [], "ann": [], "bm25 scores": []}
    for vector, text in queries:
        out["exact"].append([h.id for h in store.vector_search(vector, 10, exact=True)])
        out["ann"].append([h.id for h in store.vector_search(vector, 10)])
        out["bm25 scores"].append([round(h.score, 4) for h in store.text_search(text, 10)])
    return out


def hybrid_top10s(store: OpenSearchStore, queries: list[tuple[np.ndarray, str]]) -> list[list[str]]:
    return [[h.id for h in store.hybrid_search(vector, text, 10)] for vector, text in queries]


def search_top10s(store: OpenSearchStore, corpus, **options: object) -> list[list[str]]:
    """Top-10 ids of `/v1/search`'s hybrid (`sidecar.retrieval.search`: coarse top-100, then the fine
    stage where `rerank`; a query's fine vector is that of the document it was made from)."""
    docs, queries = corpus
    fine = {id(doc.vector): doc.fine_vector for doc in docs}
    return [[hit.id for hit in search(store, vector=vector, text=text, fine_vector=fine[id(vector)], fine_model=SIGNATURE,
                                      options=SearchOptions(**options)).hits]  # type: ignore[arg-type]
            for vector, text in queries]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[Document], list[tuple[np.ndarray, str]]]:
    """Clustered vectors with captions of 3-12 words from 300 (BM25 scores seldom tie within a top-10,
    but the cut of a top-100 often falls inside a tie: the store breaks ties by id); queries near a
    document with two of its words."""
    vectors, _, _ = clustered_vectors(N_DOCS, seed=16)
    fine_vectors, _, _ = clustered_vectors(N_DOCS, seed=17)  # a "fine model"'s vectors, for the rerank
    rng = np.random.default_rng(16)
    words = [f"w{i}" for i in range(300)]
    docs = [Document(id=f"c{i}", vector=vectors[i], text=" ".join(rng.choice(words, size=rng.integers(3, 13))),
                     content_hash=f"h{i}", fine_vector=fine_vectors[i]) for i in range(N_DOCS)]
    picks = rng.choice(N_DOCS, size=QUERIES, replace=False)
    queries = [(docs[i].vector, " ".join(docs[i].text.split()[:2])) for i in picks]
    return docs, queries


@pytest.fixture(scope="module")
def sharded(cluster: str, corpus) -> Iterator[OpenSearchStore]:
    """3 shards, 1 replica, the corpus loaded, green."""
    store = store_on(cluster, shards=3, replicas=1, ef_search=EF_SEARCH)
    try:
        store.upsert(corpus[0])
        wait_for_status(store, "green")
        yield store
    finally:
        drop(store)


@pytest.fixture(scope="module")
def single(cluster: str, corpus) -> Iterator[OpenSearchStore]:
    """The same corpus in one shard, no replica."""
    store = store_on(cluster, shards=1, replicas=0, ef_search=EF_SEARCH)
    try:
        store.upsert(corpus[0])
        yield store
    finally:
        drop(store)


def test_three_shards_with_replicas_give_the_same_top10_as_one_shard(corpus, sharded, single):
    _, queries = corpus
    settings = next(iter(sharded.client.indices.get_settings(index=sharded.alias).values()))["settings"]["index"]
    assert (settings["number_of_shards"], settings["number_of_replicas"]) == ("3", "1")
    routing = sharded.client.cat.shards(index=sharded.alias, format="json")
    assert len({row["node"] for row in routing if row["prirep"] == "p"}) >= 2, routing
    assert top10s(sharded, queries) == top10s(single, queries)


def test_the_store_fuses_natively_on_one_shard_and_in_python_on_three(sharded, single):
    assert single.supports_native_hybrid(fusion="minmax", weights=(0.5, 0.5), exact=False)
    assert not sharded.supports_native_hybrid(fusion="minmax", weights=(0.5, 0.5), exact=False)


@pytest.mark.parametrize("rerank", [False, True], ids=["coarse", "reranked"])
def test_sidecar_hybrid_search_on_three_shards_gives_the_same_top10_as_one_shard(corpus, sharded, single, rerank):
    # On 3 shards the store fuses in Python (shard-independent k-NN and dfs BM25, ties by id); on
    # 1 shard the same fusion, asked for explicitly, is the reference. (The native one there differs
    # at the min-max floor and in which of the BM25 hits tied at the 100th candidate it keeps: this
    # corpus's short captions tie a lot.)
    assert (search_top10s(sharded, corpus, rerank=rerank)
            == search_top10s(single, corpus, rerank=rerank, native_hybrid=False))


@pytest.mark.xfail(strict=True, reason="OpenSearch's hybrid query takes each sub-query's top hits per shard and "
                   "min-max normalises over their union, so 3 shards normalise over more BM25 and k-NN hits than "
                   "one shard does and the fused top-10 differs (11 of 12 queries on 2026-11-30; docs/scaling.md)")
def test_native_hybrid_on_three_shards_gives_the_same_top10_as_one_shard(corpus, sharded, single):
    _, queries = corpus
    assert hybrid_top10s(sharded, queries) == hybrid_top10s(single, queries)


def test_queries_keep_answering_from_replicas_while_a_node_is_down(cluster, corpus, sharded):
    _, queries = corpus
    before = top10s(sharded, queries)
    cluster_script("stop-node", "3")
    try:
        health = sharded.client.cluster.health(wait_for_nodes="2", timeout="120s", request_timeout=150)
        assert health["number_of_nodes"] == 2
        wait_for_status(sharded, "yellow")  # every shard has a live copy: replicas promoted
        assert sharded.count() == N_DOCS
        assert top10s(sharded, queries) == before
        assert len(hybrid_top10s(sharded, queries)) == QUERIES  # the native hybrid answers too
    finally:
        cluster_script("start-node", "3")
    wait_for_status(sharded, "green")
    assert top10s(sharded, queries) == before


def test_a_node_killed_mid_load_ends_with_every_document_exactly_once(cluster):
    # 20,000 small documents: long enough a load to kill a node in the middle of it. Few
    # connection retries; a rerun after the node is back is what a user does.
    docs, _, _ = make_documents(20_000, seed=3, prefix="k")
    store = store_on(cluster, shards=3, replicas=1, chunk_size=250, connection_retries=2, initial_backoff=0.5)
    try:
        loader, outcome = load_in_background(store, docs, timeout_s=180)
        cluster_script("stop-node", "3")
        # Back while the load still runs: writes to its shards wait for their primaries (the
        # load runs with 0 replicas), and fail after OpenSearch's 1-minute wait if it is late.
        cluster_script("start-node", "3")
        loader.join(timeout=600)
        assert not loader.is_alive(), "the load hung after the node came back"
        wait_for_status(store, "yellow")
        if not (outcome and outcome[0] == len(docs)):
            assert store.upsert(docs) == len(docs)  # the rerun, as after any failed load
        wait_for_status(store, "green")
        store.client.indices.refresh(index=store.alias)
        assert store.count() == len(docs)
        ids = set(store.content_hashes())
        assert ids == {d.id for d in docs}
        settings = next(iter(store.client.indices.get_settings(index=store.alias).values()))["settings"]["index"]
        assert (settings["number_of_shards"], settings["number_of_replicas"]) == ("3", "1")
    finally:
        cluster_script("start-node", "3")  # a no-op when it runs
        drop(store)


def test_rebuild_swaps_the_alias_to_a_new_sharded_index_on_the_cluster(cluster, corpus, sharded):
    docs, queries = corpus
    before = top10s(sharded, queries)
    old = sharded.alias_indices()
    new = sharded.rebuild(iter(docs), signature=SIGNATURE)
    assert sharded.alias_indices() == [new] and new not in old
    assert not any(sharded.client.indices.exists(index=name) for name in old)
    wait_for_status(sharded, "green")
    settings = sharded.client.indices.get_settings(index=new)[new]["settings"]["index"]
    assert (settings["number_of_shards"], settings["number_of_replicas"]) == ("3", "1")
    assert sharded.count() == N_DOCS
    assert top10s(sharded, queries) == before
