"""What OpenSearch does when the sidecar it calls fails, on the real node with a real gunicorn sidecar:
down while a _bulk runs through the pipeline, overloaded (503 + the throttling header: ml-commons
retries), `connect` refusing a sidecar that does not fit the index, and a sidecar with API keys."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from typing import Iterator

import pytest
import requests
from click.testing import CliRunner

from sidecar.api.auth import key_entry, new_key
from sidecar.cli import main
from sidecar.stores.opensearch import OpenSearchStore
from sidecar.types import ModelSignature
from tests.integration.conftest import _client, make_store, owned_indices
from tests.integration.native_support import (
    TEXT_IMAGE,
    bulk,
    cli,
    ml_objects,
    opensearch_args,
    pipeline_document,
    printed_json,
    rows,
    scrape,
    sidecar_env,
    value,
)
from tests.support import free_port, gunicorn_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def alias(node: str) -> Iterator[str]:
    """An index set up by the CLI for the tiny model; disconnected and deleted afterwards."""
    name = f"it-native-fail-{uuid.uuid4().hex[:8]}"
    try:
        cli("opensearch", "setup", *opensearch_args(name))
        yield name
    finally:
        CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(name), "--disconnect"])
        client = _client()
        client.indices.delete(index=owned_indices(name), ignore_unavailable=True)
        client.close()


def test_sidecar_down_fails_the_bulk_items_clearly_writes_nothing_and_a_rerun_completes(
        alias, corpus, test_cache_dir, tmp_path):
    env, log, port = sidecar_env(alias, tmp_path, test_cache_dir), tmp_path / "sidecar.log", free_port()
    documents = [pipeline_document(corpus, row) for row in rows(corpus)[:12]]
    client = _client()
    try:
        with gunicorn_server(env, log, port=port) as url:
            cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--set-defaults")
        # The sidecar is stopped: every document needing it fails, with the reason, and none is written.
        results = bulk(client, alias, documents)
        assert [r["status"] for r in results] == [500] * len(documents)
        for result in results:
            reason = result["error"]["reason"]
            assert "Error communicating with remote model" in reason and "Connection refused" in reason, reason
        assert client.count(index=alias)["count"] == 0
        with gunicorn_server(env, log, port=port):  # back on the URL the connector holds
            results = bulk(client, alias, documents)
        assert [r["status"] for r in results] == [201] * len(documents)
        stored = client.mget(index=alias, body={"ids": [d["id"] for d in documents]}, _source_includes=["vector"])
        assert all(len(d["_source"]["vector"]) == 64 for d in stored["docs"])
    finally:
        client.close()


def test_an_overloaded_sidecar_answers_503_ml_commons_retries_and_the_load_completes(
        alias, corpus, test_cache_dir, tmp_path):
    # One waiting image at a time: 16 concurrent calls (the connector's max_connection) overload it.
    env = sidecar_env(alias, tmp_path, test_cache_dir, SIDECAR_QUEUE_ITEMS="1", SIDECAR_MAX_BATCH="1")
    documents = [pipeline_document(corpus, row) for row in rows(corpus)[:80]]
    client = _client()
    try:
        with gunicorn_server(env, tmp_path / "sidecar.log", threads=32) as url:
            cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--set-defaults", "--retries", "10")
            results = bulk(client, alias, documents)
            metrics = scrape(url)
        assert [r["status"] for r in results] == [201] * len(documents), [r for r in results if r["status"] != 201][:3]
        assert client.count(index=alias)["count"] == len(documents)
        refused = value(metrics, "sidecar_requests_total", endpoint=TEXT_IMAGE, status="503")
        served = value(metrics, "sidecar_requests_total", endpoint=TEXT_IMAGE, status="200")
        assert refused > 0, "the sidecar was never overloaded: the test proves nothing"
        assert served == len(documents) + 1  # every document once, and connect's own check
    finally:
        client.close()


@pytest.fixture
def sidecar_for(test_cache_dir, tmp_path) -> Iterator[str]:
    """A sidecar of the tiny model (its store does not matter to the refusals below: an empty embedded one)."""
    env = sidecar_env("unused", tmp_path, test_cache_dir, SIDECAR_STORE="embedded",
                      SIDECAR_STORE_PATH=str(tmp_path / "store"))
    with gunicorn_server(env, tmp_path / "sidecar.log") as url:
        yield url


def claimed(alias: str, signature: ModelSignature) -> OpenSearchStore:
    store = make_store(index=alias)
    store.claim(signature)
    return store


@pytest.mark.parametrize(("change", "message"), [
    ({"dim": 32}, "answers 64-dimensional vectors, but index {alias} holds 32-dimensional ones"),
    ({"weights": "sha256:another"}, "the URL asks for weights 'sha256:another', but this sidecar serves"),
])
def test_connect_refuses_a_sidecar_that_does_not_fit_the_index_and_keeps_nothing(
        node, encoder, sidecar_for, change, message):
    alias = f"it-native-refuse-{uuid.uuid4().hex[:8]}"
    store = claimed(alias, ModelSignature(**{"model": encoder.name, "weights": encoder.weights, "dim": encoder.dim,
                                            **change}))
    try:
        result = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias),
                                           "--sidecar-url", sidecar_for])
        assert result.exit_code == 1, result.output
        assert message.format(alias=alias) in result.output and "refusing the connection" in result.output
        assert not any(ml_objects(store.client, alias).values())
    finally:
        store.client.indices.delete(index=owned_indices(alias), ignore_unavailable=True)
        store.close()


def test_connect_without_the_index_says_to_set_it_up_first(node):
    result = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(f"it-native-{uuid.uuid4().hex}")])
    assert result.exit_code == 1 and "run `clip-sidecar opensearch setup` first" in result.output


def test_a_sidecar_url_the_cluster_does_not_trust_is_refused_with_the_setting_to_change(alias):
    result = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias),
                                       "--sidecar-url", "http://10.0.0.1:8080"])
    assert result.exit_code == 1
    assert "plugins.ml_commons.trusted_connector_endpoints_regex" in result.output, result.output
    client = _client()
    try:
        assert not any(ml_objects(client, alias).values())
    finally:
        client.close()


def test_rerank_by_text_works_for_any_index_and_a_rerun_without_rerank_removes_it(alias, corpus, test_cache_dir,
                                                                                   tmp_path):
    # A sidecar whose store is another index: the rerank by id would be refused, by text it is not.
    env = sidecar_env(alias, tmp_path, test_cache_dir, SIDECAR_STORE="embedded",
                      SIDECAR_STORE_PATH=str(tmp_path / "store"))
    client = _client()
    try:
        with gunicorn_server(env, tmp_path / "sidecar.log") as url:
            cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--rerank", "texts")
            bulk(client, alias, [pipeline_document(corpus, row) for row in rows(corpus)[:20]],
                 pipeline=f"{alias}-image")
            # The connector's Painless script writes the query into a JSON body: quotes and a backslash
            # in it must reach the sidecar as the same text.
            query = 'red "circle" \\ o\'clock'
            hits = client.search(index=alias, params={"search_pipeline": f"{alias}-hybrid-rerank"}, body={
                "size": 5, "_source": ["text"],
                "query": {"hybrid": {"queries": [{"neural": {"vector": {"query_text": "red circle", "k": 20}}},
                                                 {"match": {"text": "red circle"}}]}},
                "ext": {"rerank": {"query_context": {"query_text": query}}}})["hits"]["hits"]
            scores = [h["_score"] for h in hits]
            assert len(hits) == 5 and scores == sorted(scores, reverse=True) and -1.0 <= min(scores)
            direct = requests.post(f"{url}/v1/opensearch/rerank/texts", timeout=30, json={
                "query": query, "documents": [h["_source"]["text"] for h in hits]}).json()["results"]
            assert sorted(scores, reverse=True) == pytest.approx(sorted((r["relevance_score"] for r in direct),
                                                                        reverse=True), abs=1e-6)
            result = cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--rerank", "none")
        assert "removed model " in result.output and f"removed search pipeline {alias}-hybrid-rerank" in result.output
        left = ml_objects(client, alias)
        assert (len(left["connectors"]), len(left["models"]), left["search"]) == (2, 2, [f"{alias}-hybrid"])
    finally:
        client.close()


def test_a_sidecar_with_api_keys_is_called_with_the_connectors_key_and_refused_without(alias, corpus, test_cache_dir,
                                                                                     tmp_path):
    key = new_key()
    env = sidecar_env(alias, tmp_path, test_cache_dir, SIDECAR_API_KEYS=key_entry("opensearch", ["embeddings"], key))
    client = _client()
    try:
        with gunicorn_server(env, tmp_path / "sidecar.log", api_key=key) as url:
            # No key here (this shell has no SIDECAR_API_KEYS to check it against): OpenSearch's call meets the 401.
            refused = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url])
            assert refused.exit_code == 1 and "refusing the connection" in refused.output, refused.output
            # The sidecar's 401, relayed by ml-commons, is named as the sidecar's: not as OpenSearch asking connect
            # for credentials (it sent the user to SIDECAR_OPENSEARCH_USER, which a node without security never needs).
            assert f"could not call the sidecar at {url}" in refused.output, refused.output
            assert "401 Error from remote service" in refused.output and "unauthorized" in refused.output
            assert "SIDECAR_OPENSEARCH_USER" not in refused.output
            assert not any(ml_objects(client, alias).values())
            connected = cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--api-key", key)
            assert key not in connected.output
            results = bulk(client, alias, [pipeline_document(corpus, row) for row in rows(corpus)[:5]],
                           pipeline=f"{alias}-image")
            assert [r["status"] for r in results] == [201] * 5, results
            hits = client.search(index=alias, params={"search_pipeline": f"{alias}-hybrid-rerank"}, body={
                "size": 5, "_source": ["id"],
                "query": {"hybrid": {"queries": [{"neural": {"vector": {"query_text": "red circle", "k": 5}}},
                                                 {"match": {"text": "red circle"}}]}},
                "ext": {"rerank": {"query_context": {"query_text": "red circle"}}}})["hits"]["hits"]
            assert len(hits) == 5  # embedded and reranked through the connectors, with the key
    finally:
        client.close()


def test_a_rerun_with_a_changed_option_updates_the_connectors_in_place_and_keeps_the_ids(alias, corpus,
                                                                                          test_cache_dir, tmp_path):
    # ml-commons refuses to update a connector a deployed model uses: connect must find those models
    # (by the connector's id, a text field in ml-commons' mapping) and undeploy them first.
    env = sidecar_env(alias, tmp_path, test_cache_dir)
    client = _client()
    try:
        with gunicorn_server(env, tmp_path / "sidecar.log") as url:
            first = printed_json(cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url))
            rerun = cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--max-connection", "8")
            assert f"updated connector {alias}-texts" in rerun.output, rerun.output
            assert printed_json(rerun)["models"] == first["models"]
            for model_id in first["models"].values():
                model = client.transport.perform_request("GET", f"/_plugins/_ml/models/{model_id}")
                assert model["model_state"] == "DEPLOYED", model
            results = bulk(client, alias, [pipeline_document(corpus, row) for row in rows(corpus)[:3]],
                           pipeline=f"{alias}-image")
            assert [r["status"] for r in results] == [201] * 3, results
    finally:
        client.close()


def test_a_rerun_that_changes_nothing_while_the_sidecar_is_down_fails_but_keeps_the_connection(
        alias, corpus, test_cache_dir, tmp_path):
    env, log, port = sidecar_env(alias, tmp_path, test_cache_dir), tmp_path / "sidecar.log", free_port()
    client = _client()
    try:
        with gunicorn_server(env, log, port=port) as url:
            cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--set-defaults")
        made = ml_objects(client, alias)
        # The sidecar is stopped: the rerun's last step (an embed through OpenSearch) fails.
        rerun = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url,
                                          "--set-defaults"])
        assert rerun.exit_code == 1, rerun.output
        assert "Connection refused" in rerun.output and "this run changed nothing, so it removed nothing" \
            in rerun.output, rerun.output
        assert ml_objects(client, alias) == made
        with gunicorn_server(env, log, port=port):  # back: the kept connection embeds through the default pipeline
            results = bulk(client, alias, [pipeline_document(corpus, row) for row in rows(corpus)[:3]])
        assert [r["status"] for r in results] == [201] * 3, results
    finally:
        client.close()


def test_a_rerun_whose_change_cannot_work_fails_on_its_probes_and_keeps_the_connection_as_it_was(
        alias, corpus, test_cache_dir, tmp_path):
    # A new --sidecar-url the cluster cannot reach: the changed connectors are tried through probe copies first,
    # so the working connection is neither updated nor removed, and no probe is left on the cluster.
    env = sidecar_env(alias, tmp_path, test_cache_dir)
    client = _client()
    try:
        with gunicorn_server(env, tmp_path / "sidecar.log") as url:
            cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--set-defaults")
            made = ml_objects(client, alias)
            unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens
            rerun = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias),
                                              "--sidecar-url", unreachable, "--set-defaults"])
            assert rerun.exit_code == 1, rerun.output
            assert f"could not call the sidecar at {unreachable}" in rerun.output, rerun.output
            assert "tried through probe copies of the connectors this run would change: texts, text-image, rerank" \
                in rerun.output and "this run changed nothing, so it removed nothing" in rerun.output, rerun.output
            assert ml_objects(client, alias) == made
            # The kept connection still embeds through the index's default pipeline.
            results = bulk(client, alias, [pipeline_document(corpus, row) for row in rows(corpus)[:3]])
            assert [r["status"] for r in results] == [201] * 3, results
    finally:
        client.close()


def test_a_rerun_after_a_connect_killed_in_its_probes_removes_them_even_when_it_changes_nothing(
        alias, test_cache_dir, tmp_path):
    # A rerun that would change the sidecar URL is killed while OpenSearch calls through its probes (the new URL takes
    # the connection and never answers); the user then reruns with the options that work, which change nothing.
    client = _client()
    try:
        with gunicorn_server(sidecar_env(alias, tmp_path, test_cache_dir), tmp_path / "sidecar.log") as url:
            cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url)
            made = ml_objects(client, alias)
            with socket.create_server(("127.0.0.1", 0)) as silent:
                silent.settimeout(120)
                killed = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "-q", "opensearch", "connect",
                                           *opensearch_args(alias), "--sidecar-url",
                                           f"http://127.0.0.1:{silent.getsockname()[1]}"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    call, _ = silent.accept()  # OpenSearch calls the new URL: the probes are made and deployed
                finally:
                    killed.kill()
                    killed.wait()
                call.close()
            assert ml_objects(client, alias) != made  # the killed run's probes are on the cluster
            rerun = cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url)
            assert "(nothing changed)" in rerun.output, rerun.output
            assert ml_objects(client, alias) == made
    finally:
        client.close()


@pytest.mark.parametrize(("setting", "kind", "body"), [
    ("default_pipeline", "_ingest", {"description": "the user's own", "processors": []}),
    ("search.default_pipeline", "_search", {"description": "the user's own", "request_processors": []}),
])
def test_set_defaults_refuses_to_replace_a_default_pipeline_of_the_users_own_and_changes_nothing(
        alias, test_cache_dir, tmp_path, setting, kind, body):
    client = _client()
    own = f"own-{alias}"
    try:
        client.transport.perform_request("PUT", f"/{kind}/pipeline/{own}", body=body)
        client.indices.put_settings(index=alias, body={"index": {setting: own}})
        with gunicorn_server(sidecar_env(alias, tmp_path, test_cache_dir), tmp_path / "sidecar.log") as url:
            refused = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias),
                                                "--sidecar-url", url, "--set-defaults"])
        assert refused.exit_code == 1, refused.output
        assert f"index.{setting} is {own}" in refused.output and "--set-defaults" in refused.output, refused.output
        left = ml_objects(client, alias)
        assert not any(left[kind] for kind in ("connectors", "models", "model_groups", "ingest", "search")), left
        kept = client.indices.get_settings(index=alias, name=f"index.{setting}", flat_settings=True)
        assert [value[f"index.{setting}"] for value in (s["settings"] for s in kept.values())] == [own]
    finally:
        client.indices.put_settings(index=alias, body={"index": {setting: None}})
        client.transport.perform_request("DELETE", f"/{kind}/pipeline/{own}", params={"ignore": 404})
        client.close()


def test_a_sidecar_opensearch_cannot_reach_is_refused_with_what_to_check(alias):
    result = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias),
                                       "--sidecar-url", f"http://127.0.0.1:{free_port()}"])  # nothing listens
    assert result.exit_code == 1
    assert "Connection refused" in result.output and "--sidecar-url is the address OpenSearch's nodes reach" \
        in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_cluster_that_refuses_private_addresses_is_told_the_setting_to_change(alias, test_cache_dir, tmp_path):
    client = _client()
    setting = "plugins.ml_commons.connector.private_ip_enabled"
    try:
        with gunicorn_server(sidecar_env(alias, tmp_path, test_cache_dir), tmp_path / "sidecar.log") as url:
            client.cluster.put_settings(body={"transient": {setting: False}})
            result = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias),
                                               "--sidecar-url", url])
        assert result.exit_code == 1
        assert "private ip address" in result.output and f'"{setting}": true' in result.output, result.output
        assert not any(ml_objects(client, alias).values())
    finally:
        client.cluster.put_settings(body={"transient": {setting: None}})
        client.close()


def test_a_step_size_over_the_running_sidecars_max_batch_items_is_refused_by_connect_and_nothing_is_kept(
        alias, test_cache_dir, tmp_path):
    # This shell's settings allow the step (default 256); the sidecar's do not, and every _predict longer than the
    # step failed later inside OpenSearch with the sidecar's 413. Connect sends one full step through OpenSearch.
    client = _client()
    try:
        env = sidecar_env(alias, tmp_path, test_cache_dir, SIDECAR_MAX_BATCH_ITEMS="8")
        with gunicorn_server(env, tmp_path / "sidecar.log") as url:
            refused = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias),
                                                "--sidecar-url", url, "--step-size", "9", "--batch-size", "8"])
            assert refused.exit_code == 1, refused.output
            assert "413" in refused.output and "max_batch_items" in refused.output, refused.output
            assert not any(ml_objects(client, alias).values())
            cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--step-size", "8",
                "--batch-size", "8")
    finally:
        client.close()


def test_disconnect_in_the_sidecars_own_shell_needs_no_connector_key_and_checks_no_batch_size(alias):
    # Where SIDECAR_API_KEYS (and the sidecar's limits) are set, as inside the sidecar's container, connect checks
    # the connectors' key and --batch-size against them; --disconnect calls no sidecar and was refused all the same.
    env = {"SIDECAR_API_KEYS": key_entry("opensearch", ["embeddings"], new_key()), "SIDECAR_MAX_BATCH_ITEMS": "4"}
    result = CliRunner().invoke(main, ["opensearch", "connect", *opensearch_args(alias), "--disconnect"], env=env)
    assert result.exit_code == 0, result.output
    assert f"OpenSearch no longer calls the sidecar for {alias} (nothing was connected)" in result.output
    refused = CliRunner().invoke(main, ["opensearch", "connect", *opensearch_args(alias)], env=env)
    assert refused.exit_code == 2 and "SIDECAR_API_KEYS is set" in refused.output  # connecting still checks the key


def test_disconnect_after_the_index_was_deleted_removes_what_connect_made(alias, test_cache_dir, tmp_path):
    # Deleting the index first is the natural order of a teardown; the connectors, models and pipelines named
    # after it must not be left on the cluster for good.
    client = _client()
    try:
        with gunicorn_server(sidecar_env(alias, tmp_path, test_cache_dir), tmp_path / "sidecar.log") as url:
            cli("opensearch", "connect", *opensearch_args(alias), "--sidecar-url", url, "--set-defaults")
        client.indices.delete(index=f"{alias}-v*")
        result = CliRunner().invoke(main, ["-q", "opensearch", "connect", *opensearch_args(alias), "--disconnect"])
        assert result.exit_code == 0, result.output
        assert f"removed connector {alias}-texts" in result.output
        assert not any(ml_objects(client, alias).values())
    finally:
        client.close()
