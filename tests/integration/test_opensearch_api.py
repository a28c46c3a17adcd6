"""The Flask app on OpenSearch when things go wrong: a cluster nobody answers at (503 + Retry-After,
a real closed port), one without the index yet (503 too), a closed index (503 too, not 400 or 502), a document
on a shard with no copy assigned and a search of an index with such a shard (a red index: 503 too, not 404
nor 200 from the shards left), a filter the cluster refuses for its field's type or on a field no document
holds (400 naming `filters`), another model's rebuild while serving (409 model_mismatch on the next vector
search)."""

from __future__ import annotations

import re
import uuid

import pytest
import requests

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.config import Settings
from sidecar.errors import MAX_ECHOED_CHARS
from sidecar.retrieval.calibration import calibrate
from sidecar.retrieval.evaluation import ann_recall
from sidecar.stores import opensearch
from sidecar.stores.base import StoreUnavailable
from sidecar.types import Document, ModelSignature
from tests.integration.conftest import drop, make_store
from tests.integration.native_support import sidecar_env
from tests.support import free_port, gunicorn_server, png_b64, unit_vectors

pytestmark = pytest.mark.integration


def test_a_long_filter_value_the_cluster_refuses_is_echoed_as_far_as_any_client_value(app_on, claimed_store, encoder):
    # OpenSearch's reason repeats the value it could not parse; a 70,000-character one came back whole.
    client = app_on(claimed_store(documents(encoder.dim)))
    response = client.post("/v1/search", json={"text": "red circle", "filters": {"size": "9" * 69_999 + "x"}})
    assert response.status_code == 400, response.json
    message = response.json["error"]["message"]
    assert message.startswith("field 'filters' does not fit the types") and len(message) < 500, message[:500]
    assert message.endswith(f"(the first {MAX_ECHOED_CHARS} of its 70044 characters)"), message


@pytest.fixture
def app_on(encoder, tmp_path):
    built = []

    def build(store, **settings):
        built.append(create_app(Settings(cache_dir=tmp_path / "cache", store="opensearch", **settings),
                                encoder=encoder, store=store))
        return built[-1].test_client()

    yield build
    for app in built:
        state_of(app).encoding.close()
        state_of(app).quality.close()


def documents(dim: int, *, n: int = 4, prefix: str = "d", seed: int = 0) -> list[Document]:
    """`n` documents of random unit vectors, texts "red circle <i>", metadata colour red and size i."""
    vectors = unit_vectors(n, dim=dim, seed=seed)
    return [Document(id=f"{prefix}{i}", vector=vectors[i], text=f"red circle {i}",
                     metadata={"size": i, "colour": "red"}, content_hash=f"h{i}") for i in range(n)]


@pytest.fixture
def claimed_store(encoder, node):
    """`claimed_store(documents)`: a new store claimed by the served model, holding `documents` (searchable
    at once: the load refreshes); dropped after the test."""
    made = []

    def build(held: list[Document]):
        made.append(make_store())
        made[-1].claim(encoder.signature)
        made[-1].upsert(held)
        return made[-1]

    yield build
    for store in made:
        drop(store)


@pytest.mark.parametrize("body", [{"text": "red circle"}, {"text": "red circle", "mode": "bm25"},
                                  {"image": png_b64(), "exact": True}],
                         ids=["hybrid", "bm25", "image-exact"])
def test_a_cluster_nobody_answers_at_is_503_with_retry_after(app_on, body):
    # No mock: a loopback port with nothing listening refuses the connection for real.
    store = make_store(url=f"http://127.0.0.1:{free_port()}")
    try:
        response = app_on(store).post("/v1/search", json=body)
    finally:
        store.close()
    assert response.status_code == 503, response.json
    assert response.headers["Retry-After"] == "5"
    assert response.json["error"]["code"] == "store_unavailable"
    assert "cannot be reached" in response.json["error"]["message"]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/search", {"text": "red circle"}), ("POST", "/v1/search", {"text": "red circle", "mode": "bm25"}),
    ("POST", "/v1/search", {"image": png_b64()}), ("GET", "/v1/facets", None),
    # A stored document is looked up by id before anything is searched: the missing index, not a missing document.
    ("POST", "/v1/search", {"like": "d1"}), ("GET", "/v1/documents/d1/thumbnail", None)],
    ids=["hybrid", "bm25", "image", "facets", "like", "thumbnail"])
def test_a_store_not_set_up_yet_is_503_with_retry_after_naming_setup_as_readyz_says_not_ready(
        app_on, node, method, path, body):
    # docker compose / kubectl apply start the server before anyone ran `opensearch setup`: the server is not
    # available yet (its /readyz says so), not a bad gateway; it used to answer 502 store_error.
    store = make_store()
    try:
        client = app_on(store)
        response = client.open(path, method=method, json=body)
        assert response.status_code == 503, response.json
        assert response.headers["Retry-After"] == "5"
        assert response.json["error"]["code"] == "store_unavailable"
        assert f"no index or alias {store.alias}: run `clip-sidecar opensearch setup`" in response.json["error"]["message"]
        assert client.get("/readyz").status_code == 503
    finally:
        store.close()


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/search", {"like": "nope"}), ("GET", "/v1/documents/nope/thumbnail", None)], ids=["like", "thumbnail"])
def test_a_document_missing_from_a_set_up_store_is_404_naming_it(app_on, claimed_store, encoder, method, path, body):
    response = app_on(claimed_store(documents(encoder.dim))).open(path, method=method, json=body)
    assert response.status_code == 404, response.json
    assert response.json["error"]["code"] == "document_not_found"
    assert "no document with id 'nope' in the store" in response.json["error"]["message"]


@pytest.fixture
def half_red_store(encoder, node):
    """(store, held, lost): a store claimed by the served model whose index lost one of its two primary shards
    (unassigned: the index is red), `held` the ids of its documents on the shard that answers, `lost` those
    on the other one. A shard that holds data cannot be unassigned (OpenSearch allocates an existing primary
    again to the node holding its copy, whatever the allocation filters say), so the loaded index is cloned
    into one allowed one shard per node, on the node of the first: the clone's second shard gets none."""
    store = make_store(number_of_shards=2, number_of_replicas=0)
    try:
        store.claim(encoder.signature)
        store.upsert(documents(encoder.dim, n=6))
        (loaded,) = store.alias_indices()
        red = f"{loaded}-red"  # `drop` deletes it with the store's own versions
        node_id = store.client.search_shards(index=loaded)["shards"][0][0]["node"]
        store.client.indices.put_settings(index=loaded, body={"index.blocks.write": True})  # as a clone requires
        store.client.indices.clone(index=loaded, target=red, wait_for_active_shards=0, body={"settings": {
            "index.number_of_replicas": 0, "index.routing.allocation.require._id": node_id,
            "index.routing.allocation.total_shards_per_node": 1}})
        health = store.client.cluster.health(index=red, wait_for_active_shards=1, wait_for_no_initializing_shards=True,
                                             timeout="30s", request_timeout=40)
        assert not health["timed_out"] and health["status"] == "red", health
        store.client.indices.update_aliases(body={"actions": [{"remove": {"index": loaded, "alias": store.alias}},
                                                              {"add": {"index": red, "alias": store.alias}}]})
        # Routing by a value routes as by an id: a shard without a copy answers no group members.
        routed = {f"d{i}": store.client.search_shards(index=red, routing=f"d{i}")["shards"][0] for i in range(6)}
        held, lost = [i for i, copies in routed.items() if copies], [i for i, copies in routed.items() if not copies]
        assert held and lost, routed
        yield store, held, lost
    finally:
        drop(store)


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/search", {"like": "{lost}"}), ("POST", "/v1/captions", {"like": "{lost}"}),
    ("GET", "/v1/documents/{lost}/thumbnail", None)], ids=["search-like", "captions-like", "thumbnail"])
def test_a_document_on_a_shard_without_a_copy_is_503_with_retry_after_naming_it_as_a_search_on_a_red_index(
        app_on, half_red_store, method, path, body):
    # mget answers 200 with an error in place of each such document, which was skipped: 404 "no document with
    # id", a wrong answer while the document is stored; a search on an index without any shard answers 503.
    store, held, lost = half_red_store
    client = app_on(store)
    fill = {"lost": lost[0]}
    response = client.open(path.format(**fill), method=method,
                           json=None if body is None else {key: value.format(**fill) for key, value in body.items()})
    assert response.status_code == 503, response.json
    assert response.headers["Retry-After"] == "5"
    assert response.json["error"]["code"] == "store_unavailable"
    message = response.json["error"]["message"]
    assert repr(lost[0]) in message and store.alias in message, message
    assert "no_shard_available_action_exception" in message and "No shard available" in message, message


def test_fetching_documents_some_on_a_shard_without_a_copy_is_store_unavailable_counting_and_naming_them(
        half_red_store):
    # The fine stage and page reads fetch many ids at once: one lost shard used to drop its hits silently.
    store, held, lost = half_red_store
    assert [doc.id for doc in store.fetch(held)] == held
    with pytest.raises(StoreUnavailable) as raised:
        store.fetch([*held, *lost])
    message = str(raised.value)
    assert f"{len(lost)} of {len(held) + len(lost)} documents, the first {lost[0]!r} of index " \
           f"{store.alias_indices()[0]}: no_shard_available_action_exception: 'No shard available" in message, message



@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/search", {"text": "red circle"}), ("POST", "/v1/search", {"text": "red circle", "mode": "bm25"}),
    ("POST", "/v1/search", {"image": png_b64()}), ("POST", "/v1/search", {"image": png_b64(), "exact": True}),
    ("POST", "/v1/search", {"image": png_b64(), "filters": {"colour": "red"}}),
    ("POST", "/v1/search", {"like": "d1"}), ("POST", "/v1/search", {"like": "d1", "text": "red circle"}),
    ("POST", "/v1/captions", {"like": "d1"}), ("POST", "/v1/captions", {"image": png_b64()}),
    ("GET", "/v1/documents/d1/thumbnail", None), ("GET", "/v1/facets", None)],
    ids=["hybrid", "bm25", "image", "image-exact", "image-filtered", "like", "like-with-text", "captions-like",
         "captions-image", "thumbnail", "facets"])
def test_a_read_of_a_closed_index_is_503_with_retry_after_naming_the_index_and_how_to_open_it(
        app_on, closed_store, method, path, body):
    # OpenSearch answers a read of a closed index 400 index_closed_exception, which read as a query it refused: 502
    # "OpenSearch refused the query: 'closed'", 400 blaming `filters` for a filtered search, 502 for `like` (its
    # mget's item error). The request is fine; the index is shut until an operator opens it.
    store, index = closed_store
    response = app_on(store).open(path, method=method, json=body)
    assert response.status_code == 503, response.json
    assert response.headers["Retry-After"] == "5"
    assert response.json["error"]["code"] == "store_unavailable"
    message = response.json["error"]["message"]
    assert f"index {index} behind alias {store.alias} on OpenSearch at {store.url} is closed" in message, message
    assert f"`POST /{index}/_open`" in message, message


@pytest.mark.parametrize("read", ["count", "fetch", "content_hashes"])
def test_counting_or_fetching_from_a_closed_index_is_store_unavailable_naming_the_index(closed_store, read):
    # mget answers 200 with index_closed_exception in place of each document: it read as a StoreError (502); the
    # content hashes `index` reads raised opensearch-py's own 400 to the CLI.
    store, index = closed_store
    with pytest.raises(StoreUnavailable) as raised:
        {"count": store.count, "fetch": lambda: store.fetch(["d0", "d1"]), "content_hashes": store.content_hashes}[read]()
    assert f"index {index} behind alias {store.alias} on OpenSearch at {store.url} is closed" in str(raised.value)


@pytest.fixture
def closed_store(claimed_store, encoder):
    """(store, index): a store claimed by the served model, holding `documents`, whose one index is closed (as
    `POST /<index>/_close` leaves it; dropped after the test as an open one is)."""
    store = claimed_store(documents(encoder.dim))
    (index,) = store.alias_indices()
    assert store.client.indices.close(index=index, timeout="30s", request_timeout=40)["acknowledged"]
    return store, index


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/search", {"text": "red circle"}), ("POST", "/v1/search", {"text": "red circle", "mode": "bm25"}),
    ("POST", "/v1/search", {"image": png_b64()}), ("POST", "/v1/search", {"image": png_b64(), "exact": True}),
    ("POST", "/v1/search", {"like": "{held}"}), ("POST", "/v1/captions", {"like": "{held}"}),
    ("GET", "/v1/facets", None)],
    ids=["hybrid", "bm25", "image", "image-exact", "like", "captions-like", "facets"])
def test_a_search_of_an_index_with_a_shard_without_a_copy_is_503_naming_the_index_and_the_shards_left(
        app_on, half_red_store, method, path, body):
    # OpenSearch answers such a search 200 from the shards left (`_shards.successful` below `total`, `failed` 0):
    # the hits of the other shard were missing without a sign, and the fusion and rerank ranked the rest.
    store, held, _ = half_red_store
    response = app_on(store).open(path, method=method, json=None if body is None else {
        key: value.format(held=held[0]) if isinstance(value, str) else value for key, value in body.items()})
    assert response.status_code == 503, response.json
    assert response.headers["Retry-After"] == "5"
    assert response.json["error"]["code"] == "store_unavailable"
    assert_refused_as_partial(response.json["error"]["message"], store)


@pytest.mark.parametrize("read", ["hybrid-minmax", "hybrid-rrf", "count", "content_hashes"])
def test_the_native_hybrid_search_and_the_count_of_an_index_with_a_shard_without_a_copy_are_store_unavailable(
        half_red_store, encoder, read):
    # The hybrid query through an inline search pipeline (served on an index of one shard) refuses as other
    # searches do; `_count` takes no allow_partial_search_results and counted the shard left alone; the scan of
    # the content hashes `index` reads raised opensearch-py's ScanError to the CLI.
    store, _, _ = half_red_store
    with pytest.raises(StoreUnavailable) as raised:
        if read == "count":
            store.count()
        elif read == "content_hashes":
            store.content_hashes()
        else:
            store.hybrid_search(documents(encoder.dim, n=1)[0].vector, "red circle", 5, fusion=read.split("-")[1])
    assert_refused_as_partial(str(raised.value), store)


def test_readyz_on_an_index_with_a_shard_without_a_copy_is_not_ready_naming_the_shards_left(app_on, half_red_store):
    # It counted the shard left and said ready, while every search is refused.
    store, _, _ = half_red_store
    response = app_on(store).get("/readyz")
    assert response.status_code == 503, response.json
    assert_refused_as_partial(response.json["reason"], store)


def assert_refused_as_partial(message: str, store) -> None:
    (red,) = store.alias_indices()
    (lost,) = [shard["shard"] for shard in store.client.cat.shards(index=red, format="json")
               if shard["state"] == "UNASSIGNED"]
    assert f"has no copy of shard {lost} of index {red}: 1 of its 2 shards could answer" in message, message
    assert "allow_partial_search_results" not in message, message  # OpenSearch's advice to bypass the refusal


# gunicorn's error log line ("[time] [pid] [LEVEL] message") and its access line ('host - - [time] "GET …" 503 …').
SERVER_LINE = re.compile(r'\[[^]]+\] \[\d+\] \[[A-Z]+\] |\S+ - \S+ \[[^]]+\] "')


def test_a_served_store_not_set_up_yet_logs_each_failed_search_once_in_the_servers_format(node, test_cache_dir,
                                                                                           tmp_path):
    # opensearch-py's own warning for each 404 reached the log as `WARNING:opensearch:POST …/_count
    # [status:404 …]`, on every probe: basicConfig's format (open_clip's `logging.info` installs it), not gunicorn's.
    alias = f"it-{uuid.uuid4().hex[:10]}"
    log = tmp_path / "sidecar.log"
    with gunicorn_server(sidecar_env(alias, tmp_path, test_cache_dir), log, ready_status=503) as url:
        for _ in range(3):
            assert requests.get(f"{url}/readyz", timeout=30).status_code == 503
        assert requests.post(f"{url}/v1/search", json={"text": "red circle"}, timeout=30).status_code == 503
    lines = log.read_text().splitlines()
    assert [line for line in lines if not SERVER_LINE.match(line)] == [], lines
    (said,) = [line for line in lines if f"no index or alias {alias}" in line]
    assert "[WARNING] POST /v1/search: search on" in said, said


def test_counting_on_a_cluster_nobody_answers_at_is_store_unavailable():
    # /v1/facets counts after its aggregation: a cluster lost in between answers 503, not 500.
    store = make_store(url=f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(StoreUnavailable, match="counting .* cannot be reached"):
            store.count()
    finally:
        store.close()


def test_a_filter_value_of_another_type_than_the_field_is_400_naming_filters(app_on, claimed_store, encoder):
    store = claimed_store(documents(encoder.dim))
    client = app_on(store)
    matching = client.post("/v1/search", json={"text": "red circle", "filters": {"size": [1, 2]}})
    assert matching.status_code == 200, matching.json
    assert sorted(h["id"] for h in matching.json["hits"]) == ["d1", "d2"]
    # "size" holds numbers in the index: OpenSearch refuses a word for it (400), which used to
    # surface as a 500.
    response = client.post("/v1/search", json={"text": "red circle", "filters": {"size": "big"}})
    assert response.status_code == 400, response.json
    # It named the alias ("search on <alias>: ...") rather than the field and what it holds.
    message = response.json["error"]["message"]
    assert message.startswith("field 'filters' does not fit the types of the stored metadata: metadata field 'size' "
                              "holds whole numbers (long); ")
    assert "big" in message and store.alias not in message
    # A field no document holds is absent from the mapping: no error from OpenSearch, no hits; the
    # empty answer is checked against the fields the mapping holds (facets), numbers and keywords.
    response = client.post("/v1/search", json={"text": "red circle", "filters": {"colour": "red", "sise": 1}})
    assert response.status_code == 400, response.json
    message = response.json["error"]["message"]
    assert message.startswith("field 'filters': no stored document holds metadata field 'sise'"), message
    assert "colour, size" in message


def test_feedback_with_a_filter_value_of_another_type_or_one_excluding_the_judged_document_is_400_naming_filters(
        app_on, claimed_store, encoder, tmp_path):
    # Both were recorded: eval, re-running the query under them, refused the whole evaluation set for the first and
    # could never find the judged document under the second.
    logs = tmp_path / "quality"
    client = app_on(claimed_store(documents(encoder.dim)), quality_log_dir=str(logs))
    judged = {"text": "red circle", "doc_id": "d1"}  # size 1, colour red
    searched = client.post("/v1/search", json={"text": "red circle", "filters": {"size": "big"}}).json
    answer = client.post("/v1/feedback", json={**judged, "filters": {"size": "big"}})
    assert answer.status_code == 400 and answer.json["error"] == searched["error"], answer.json
    answer = client.post("/v1/feedback", json={**judged, "filters": {"size": [2, 3]}})
    assert answer.status_code == 400, answer.json
    assert answer.json["error"]["message"].startswith("field 'filters' does not let through the judged document 'd1'")
    assert not (logs / "feedback.jsonl").exists() or not (logs / "feedback.jsonl").read_text()
    answer = client.post("/v1/feedback", json={**judged, "filters": {"size": [1, 3], "colour": "red"}})
    assert answer.status_code == 200 and answer.json["recorded"]["filters"] == {"size": [1, 3], "colour": "red"}
    held_value_nobody_has = client.post("/v1/search", json={"text": "red circle", "filters": {"size": 9}})
    assert held_value_nobody_has.status_code == 200 and held_value_nobody_has.json["hits"] == []


@pytest.fixture
def served(app_on, claimed_store, encoder, monkeypatch):
    """A server on an OpenSearch store of its own model, and `rebuild(signature)`: another process's
    `index --rebuild` of that alias (a new index recording `signature`, the alias moved onto it). The
    recorded model is cached for an hour, not REFRESH_S: only the search's own answer can tell it moved."""
    monkeypatch.setattr(opensearch, "REFRESH_S", 3600.0)
    store = claimed_store(documents(encoder.dim, prefix="old"))

    def rebuild(signature: ModelSignature) -> None:
        other_process = make_store(index=store.alias)
        try:
            other_process.rebuild(iter(documents(signature.dim, prefix="new", seed=1)), signature=signature)
        finally:
            other_process.close()

    yield app_on(store), rebuild


VECTOR_SEARCHES = [{"text": "red circle"}, {"image": png_b64()}, {"image": png_b64(), "exact": True},
                   {"image": png_b64(), "filters": {"colour": "red"}}]


@pytest.mark.parametrize("size", [1, 2], ids=["same-size", "other-size"])
@pytest.mark.parametrize("body", VECTOR_SEARCHES, ids=["hybrid", "image", "image-exact", "image-filtered"])
def test_another_models_rebuild_while_serving_answers_the_next_vector_search_409_naming_both(
        served, encoder, body, size):
    client, rebuild = served
    before = client.post("/v1/search", json=body)  # the server checks, and caches, the recorded model
    assert before.status_code == 200 and before.json["hits"][0]["id"].startswith("old"), before.json
    rebuild(ModelSignature(model="other-clip", weights="other-weights", dim=size * encoder.dim))
    # Same size: the hits of the other model's vectors ranked by this server's; other size: OpenSearch's 400
    # (a 502 store_error, or a 400 blaming `filters`) before the search read the record again.
    response = client.post("/v1/search", json=body)
    assert response.status_code == 409, response.json
    assert response.json["error"]["code"] == "model_mismatch"
    message = response.json["error"]["message"]
    assert "vectors of other-clip (weights other-weights" in message and f"encoded by {encoder.name} " in message


def test_a_rebuild_with_the_served_model_while_serving_answers_from_the_new_index(served, encoder):
    client, rebuild = served
    assert client.post("/v1/search", json={"image": png_b64()}).status_code == 200
    rebuild(encoder.signature)
    response = client.post("/v1/search", json={"image": png_b64()})
    assert response.status_code == 200, response.json
    assert {hit["id"] for hit in response.json["hits"]} == {f"new{i}" for i in range(4)}


@pytest.mark.parametrize("size", [1, 2], ids=["same-size", "other-size"])
def test_another_models_rebuild_while_serving_leaves_like_searches_answering_from_the_first(served, encoder, size):
    # A `like` search alone ranks the stored vectors by one of their own: valid whatever their model. It used
    # to be refused once (409), by the check of the server's own model, and answered from then on.
    client, rebuild = served
    assert client.post("/v1/search", json={"like": "old0"}).json["hits"][0]["id"] == "old0"
    rebuild(ModelSignature(model="other-clip", weights="other-weights", dim=size * encoder.dim))
    for _ in range(2):
        response = client.post("/v1/search", json={"like": "new0"})
        assert response.status_code == 200, response.json
        assert [hit["id"] for hit in response.json["hits"]][0] == "new0"
        assert {hit["id"] for hit in response.json["hits"]} == {f"new{i}" for i in range(4)}


@pytest.mark.parametrize(("path", "body"), [("/v1/captions", {"like": "new0"}),
                                            ("/v1/search", {"like": "new0", "text": "red circle"})],
                         ids=["captions", "search-with-text"])
def test_another_models_rebuild_while_serving_refuses_like_ranked_by_this_servers_vectors_from_the_first(
        served, encoder, path, body):
    # Captions are ranked by this server's text vectors, `like` with text by its encoding of the text: the
    # liked document's read notices the rebuild, and the model check after it refuses.
    client, rebuild = served
    rebuild(ModelSignature(model="other-clip", weights="other-weights", dim=encoder.dim))
    for _ in range(2):
        response = client.post(path, json=body)
        assert response.status_code == 409 and response.json["error"]["code"] == "model_mismatch", response.json


@pytest.mark.parametrize("empty", ["unclaimed-index", "no-alias"])
def test_an_index_into_the_empty_store_by_another_model_while_serving_is_refused_from_the_first_search(
        app_on, encoder, node, monkeypatch, empty):
    monkeypatch.setattr(opensearch, "REFRESH_S", 3600.0)  # not the periodic read: the unclaimed record's own
    store = make_store()
    try:
        if empty == "unclaimed-index":
            store.setup(encoder.dim)
        client = app_on(store)  # the server starts on the empty store (reading its record), which takes any model
        other_process = make_store(index=store.alias)
        try:
            other_process.claim(ModelSignature(model="other-clip", weights="other-weights", dim=encoder.dim))
            other_process.upsert(documents(encoder.dim, prefix="new", seed=1))
        finally:
            other_process.close()
        # A model of the same size: the first search finding the documents used to rank them by this
        # server's vectors (200), as nothing in its answer tells which model claimed the index.
        for _ in range(2):
            response = client.post("/v1/search", json={"image": png_b64()})
            assert response.status_code == 409, response.json
            assert "vectors of other-clip (weights other-weights" in response.json["error"]["message"]
    finally:
        drop(store)


def test_a_document_written_without_a_vector_is_found_by_hybrid_search_refused_as_like_and_skipped_as_a_query(
        app_on, claimed_store, encoder):
    # An ingest pipeline writes a document that lacks the field it embeds (a text-only document
    # through the image pipeline) without `vector`: searches must still answer, not 500.
    store = claimed_store(documents(encoder.dim, n=3))
    store.client.index(index=store.alias, id="no-vector", body={"id": "no-vector", "text": "red circle"},
                       refresh=True)
    client = app_on(store)
    response = client.post("/v1/search", json={"text": "red circle", "mode": "hybrid", "k": 4})
    assert response.status_code == 200, response.json
    hits = {hit["id"]: hit for hit in response.json["hits"]}
    assert set(hits) == {"d0", "d1", "d2", "no-vector"}
    assert "vector" not in hits["no-vector"]["scores"] and "vector" in hits["d0"]["scores"]
    liked = client.post("/v1/search", json={"like": "no-vector"})
    assert liked.status_code == 400, liked.json
    assert "field 'like'" in liked.json["error"]["message"] and "no vector" in liked.json["error"]["message"]
    # Exact search scores only documents holding a vector (the script scored that one 0: no inner product).
    assert len(store.vector_search(documents(encoder.dim, n=1)[0].vector, 10, exact=True)) == 3
    # Calibrating the search effort samples stored documents as queries: that one is no query.
    assert calibrate(store, target_recall=0.5, k=1, queries=4).queries == 3
    assert ann_recall(store, queries=4, k=1).queries == 3  # eval --ann likewise
