"""Quality in production through the real app, gunicorn and CLI: live Recall@K from shadow exact searches
(in /v1/status and /metrics, summed over workers), the recall target's calibrated effort, hard examples
and feedback logged within their bounds, and their export round-tripping into `clip-sidecar eval`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.cli import main
from sidecar.config import Settings
from sidecar.model.encoder import load_encoder
from sidecar.model.tiny_model import checkpoint_path
from sidecar.retrieval.hard_examples import read_jsonl_log
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document
from tests.support import gunicorn_server

WORDS = ("red", "green", "blue", "circle", "square", "star", "small", "large", "left", "right")


@pytest.fixture(scope="module")
def uniform_store(encoder, tmp_path_factory) -> Path:
    """8,000 uniformly random unit vectors of the tiny model's dimension (HNSW's worst case, where the
    effort matters), each with a few words of text; the model's own text vectors query it."""
    path = tmp_path_factory.mktemp("uniform-store")
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((8000, encoder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with EmbeddedStore(path) as store:
        store.claim(encoder.signature)
        store.upsert([Document(id=f"u{i}", vector=v, text=" ".join(rng.choice(WORDS, 3)), content_hash=str(i))
                      for i, v in enumerate(vectors)])
    return path


def queries(n: int, *, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 3)) + f" {seed}-{i}" for i in range(n)]


def quality_app(encoder, store_path: Path, tmp_path: Path, **settings):
    settings = Settings(cache_dir=tmp_path / f"cache-{uuid.uuid4().hex[:6]}", store_path=store_path, **settings)
    store = EmbeddedStore(store_path, target_recall=settings.target_recall, target_k=settings.target_recall_k)
    return create_app(settings, encoder=encoder, store=store), store


def close(app, store) -> None:
    state_of(app).quality.close()
    state_of(app).encoding.close()
    store.close()


def scraped(client, name: str) -> float:
    """A series' value in one /metrics scrape, summed over its labels."""
    text = client.get("/metrics").get_data(as_text=True)
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name)


def search_all(client, texts: list[str], **body) -> list[dict]:
    answers = [client.post("/v1/search", json={"text": text, "mode": "vector", "k": 10, **body}) for text in texts]
    assert [a.status_code for a in answers] == [200] * len(texts), answers[0].get_json()
    return [a.get_json() for a in answers]


def test_live_recall_drops_with_an_absurdly_low_ef_search_and_recovers_when_the_target_is_set(
        encoder, uniform_store, tmp_path):
    # Every search is checked (fraction 1); candidates 10 so that the request's ef_search decides the breadth.
    app, store = quality_app(encoder, uniform_store, tmp_path, monitor_fraction=1.0, monitor_queue=256)
    client = app.test_client()
    try:
        before = {name: scraped(client, name) for name in ("sidecar_ann_recall_hits_total",
                                                           "sidecar_ann_recall_expected_total")}
        search_all(client, queries(40, seed=1), candidates=10, ef_search=1)
        assert state_of(app).quality.recall_checks.wait_idle(120)
        low = client.get("/v1/status").get_json()
        assert low["recall"]["checked"] == 40 and low["recall"]["expected"] == 400
        assert low["recall"]["value"] < 0.8, low["recall"]
        assert low["search_effort"]["calibrated"] is False and low["recall"]["meets_target"] is None
        # /metrics carries the same counts: recall = their ratio, whichever tool reads it.
        assert scraped(client, "sidecar_ann_recall_hits_total") - before["sidecar_ann_recall_hits_total"] == \
            low["recall"]["hits"]
        assert scraped(client, "sidecar_ann_recall_expected_total") - before["sidecar_ann_recall_expected_total"] == 400
    finally:
        close(app, store)

    result = CliRunner().invoke(main, ["-q", "store", "calibrate", "--store-path", str(uniform_store),
                                       "--target-recall", "0"])  # was told to "give --target-recall", as if absent
    assert result.exit_code == 2 and "give --target-recall (or SIDECAR_TARGET_RECALL) above 0, e.g. 0.99: 0 is no " \
        "target" in result.output, result.output
    result = CliRunner().invoke(main, ["-q", "store", "calibrate", "--store-path", str(uniform_store),
                                       "--target-recall", "0.99", "--queries", "100", "--ann-only"])
    assert result.exit_code == 0, result.output
    assert "target Recall@10 0.99: ef_search" in result.output and "saved with the store" in result.output

    app, store = quality_app(encoder, uniform_store, tmp_path, monitor_fraction=1.0, monitor_queue=256,
                             target_recall=0.99)
    client = app.test_client()
    try:
        search_all(client, queries(40, seed=2), candidates=10)  # no ef_search: the store's calibrated effort
        assert state_of(app).quality.recall_checks.wait_idle(120)
        status = client.get("/v1/status").get_json()
        effort = status["search_effort"]
        assert effort["calibrated"] is True and effort["target_recall"] == 0.99
        assert effort["ef_search"] == effort["calibration"]["ef_search"] > 1
        assert status["recall"]["checked"] == 40 and status["recall"]["target"] == 0.99
        assert status["recall"]["value"] >= 0.95, status["recall"]
        assert scraped(client, "sidecar_search_ef_search") == effort["ef_search"]
        assert scraped(client, "sidecar_recall_target") == 0.99
        assert any(row["stage"] == "search" and row["count"] == 40 and row["p95_ms"] for row in status["stages"])
    finally:
        close(app, store)
        (uniform_store / "calibration.json").unlink()


def test_a_recall_target_not_calibrated_for_is_the_alerts_target_as_it_is_the_status_pages(
        encoder, uniform_store, tmp_path):
    # The gauge read 0 until a calibration for the target existed: the alert then judged recall against its 0.95
    # floor while /v1/status judged it against the 0.99 asked for, and the two could disagree.
    assert not (uniform_store / "calibration.json").exists()
    app, store = quality_app(encoder, uniform_store, tmp_path, target_recall=0.99)
    client = app.test_client()
    try:
        status = client.get("/v1/status").get_json()
        assert status["search_effort"]["calibrated"] is False and status["recall"]["target"] == 0.99
        assert scraped(client, "sidecar_recall_target") == 0.99
    finally:
        close(app, store)


def test_calibrate_at_another_k_names_the_recall_k_setting_servers_need_to_apply_it(tmp_path):
    # A calibration applies where the target and K both match: at K=5, a server with the default K=10 keeps its
    # fixed ef_search, so "wherever SIDECAR_TARGET_RECALL=0.5 is set" alone would send the operator astray.
    path = tmp_path / "store"
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    with EmbeddedStore(path) as store:
        store.upsert([Document(id=f"d{i}", vector=v / np.linalg.norm(v)) for i, v in enumerate(vectors)])
    result = CliRunner().invoke(main, ["-q", "store", "calibrate", "--store-path", str(path), "--target-recall", "0.5",
                                       "-k", "5", "--queries", "20", "--ann-only"])
    assert result.exit_code == 0, result.output
    assert "wherever SIDECAR_TARGET_RECALL=0.5 (or --target-recall) is set with SIDECAR_TARGET_RECALL_K=5" \
        in result.output, result.output
    for k, applied in ((5, True), (10, False)):
        with EmbeddedStore(path, target_recall=0.5, target_k=k) as store:
            assert (store.effort.applied() is not None) is applied


def test_shadow_checks_wait_for_no_request_and_are_dropped_when_their_queue_is_full(encoder, uniform_store,
                                                                                    tmp_path):
    app, store = quality_app(encoder, uniform_store, tmp_path, monitor_fraction=1.0, monitor_queue=1)
    client = app.test_client()
    quality = state_of(app).quality
    release = threading.Event()
    quality.recall_checks.submit(release.wait)  # the check thread is busy until released; one check may wait
    try:
        search_all(client, queries(5, seed=3), candidates=10)  # answered while the checks are stuck
        status = client.get("/v1/status").get_json()["recall"]
        assert status["dropped"] == 4 and status["checked"] == 0
    finally:
        release.set()
        assert quality.recall_checks.wait_idle(60)
        assert client.get("/v1/status").get_json()["recall"]["checked"] == 1
        close(app, store)


def test_two_gunicorn_workers_add_up_their_shadow_checks_and_keep_their_logs_within_bounds(uniform_store, tmp_path):
    logs = tmp_path / "quality"
    env = {"SIDECAR_STORE_PATH": str(uniform_store), "SIDECAR_MONITOR_FRACTION": "1", "SIDECAR_MONITOR_QUEUE": "256",
           "SIDECAR_TEXT_CACHE_PATH": str(tmp_path / "text.sqlite"), "SIDECAR_QUALITY_LOG_DIR": str(logs),
           "SIDECAR_HARD_EXAMPLE_MIN_SCORE": "2",  # every query's top score is "low": every one is logged
           "SIDECAR_QUALITY_LOG_MAX_BYTES": "4096", "SIDECAR_QUALITY_LOG_BACKUPS": "2",
           # every request thread may wait for the model: on a busy machine 8 clients never meet a 503
           "SIDECAR_QUEUE_ITEMS": "8"}
    with gunicorn_server(env, tmp_path / "gunicorn.log", workers=2, threads=8) as url:
        # Both workers up first: a worker's figures start at its own boot (its window's first snapshot).
        assert len(status_by_worker(url, until=lambda status: True)) == 2, "the second worker did not answer"
        texts = queries(60, seed=4)
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda t: requests.post(f"{url}/v1/search", json={
                "text": t, "mode": "vector", "candidates": 10}, timeout=60).status_code, texts))
            feedback = list(pool.map(lambda i: requests.post(f"{url}/v1/feedback", json={
                "text": texts[i % 60], "doc_id": f"u{i}", "kind": "click"}, timeout=60).status_code, range(150)))
        assert codes == [200] * 60 and feedback == [200] * 150
        # Each worker, once every sampled query's check is done (or dropped), reports the whole server's
        # figures: its own checks and the other's.
        answers = status_by_worker(url, until=lambda status: sum(
            status["recall"][outcome] for outcome in ("checked", "dropped", "failed")) == 60)
        assert len(answers) == 2, f"only workers {list(answers)} answered with every check done"
        first, second = (status["recall"] for status in answers.values())
        assert first == second and first["checked"] == 60 and first["expected"] == 600, answers
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        checked = sum(s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                      if s.name == "sidecar_shadow_checks_total")
        assert checked == 60
    for name in ("hard-examples.jsonl", "feedback.jsonl"):
        files = sorted(logs.glob(f"{name}*"))
        assert 1 < len(files) <= 3, files  # rotated, at most 2 backups
        assert all(f.stat().st_size <= 4096 for f in files), [f.stat().st_size for f in files]
        for f in files:
            assert all(json.loads(line) for line in f.read_text().splitlines())


def status_by_worker(url: str, *, until) -> dict[int, dict]:
    """/v1/status by worker pid, for the answers `until` accepts, asked until two workers gave one (the
    kernel hands a connection to either, so concurrent requests reach both) or 3,840 requests went."""
    answers: dict[int, dict] = {}
    codes: dict[int, int] = {}
    with ThreadPoolExecutor(16) as pool:
        for _ in range(60):
            for answer in pool.map(lambda _: requests.get(f"{url}/v1/status", timeout=10), range(64)):
                # 16 at once may meet a worker's connection bound (503 overloaded): those are asked again
                if answer.status_code == 200 and until(answer.json()):
                    answers[answer.json()["pid"]] = answer.json()
                elif answer.status_code != 200:
                    codes[answer.status_code] = codes.get(answer.status_code, 0) + 1
            if len(answers) == 2:
                break
            time.sleep(0.5)  # the checks are still running
    assert set(codes) <= {503}, codes
    return answers


def test_feedback_answers_404_when_not_enabled_and_400_naming_the_field(build_app, tmp_path):
    disabled = build_app().test_client()
    answer = disabled.post("/v1/feedback", json={"text": "red circle", "doc_id": "x"})
    assert answer.status_code == 404 and "SIDECAR_QUALITY_LOG_DIR" in answer.get_json()["error"]["message"]
    client = build_app(quality_log_dir=str(tmp_path / "q")).test_client()
    for body, field in (({"text": "red"}, "doc_id"), ({"doc_id": "a"}, "query_id"),
                        ({"doc_id": "a", "text": "red", "relevance": 4}, "relevance"),
                        ({"doc_id": "a", "text": "red", "kind": "like"}, "kind"),
                        ({"doc_id": " ", "text": "red"}, "doc_id")):
        answer = client.post("/v1/feedback", json=body)
        assert answer.status_code == 400 and field in answer.get_json()["error"]["message"], (body, answer.get_json())
    answer = client.post("/v1/feedback", json={"query_id": "abc", "doc_id": "item-000001", "kind": "judgment",
                                               "relevance": 0})
    assert answer.status_code == 200 and answer.get_json()["recorded"]["relevance"] == 0


def test_feedback_on_a_document_the_store_does_not_hold_answers_404_naming_the_field_and_logs_nothing(
        build_app, tmp_path):
    # It was answered 200 `recorded`: a mistyped id went into qrels, a judgment eval could never find again.
    logs = tmp_path / "quality"
    client = build_app(quality_log_dir=str(logs)).test_client()
    answer = client.post("/v1/feedback", json={"text": "red circle", "doc_id": "item-999999"})
    assert answer.status_code == 404 and answer.get_json()["error"] == {
        "code": "document_not_found", "message": "field 'doc_id': no document with id 'item-999999' in the store"}
    assert not (logs / "feedback.jsonl").exists() or not (logs / "feedback.jsonl").read_text()
    # The request's own faults are told first: the store is asked only about a request otherwise valid.
    answer = client.post("/v1/feedback", json={"text": "red circle", "doc_id": "item-999999", "filters": ["red"]})
    assert answer.status_code == 400 and "'filters'" in answer.get_json()["error"]["message"], answer.get_json()


def test_feedback_on_a_stored_document_whose_id_is_over_512_characters_is_recorded(encoder, tmp_path):
    # A folder corpus's ids are relative paths, of any length; search returns them, `like` and the thumbnail take them,
    # and /v1/feedback answered 400 "field 'doc_id' has 605 characters, over the limit of 512".
    deep = "photos/" + "deep/" * 120 + "shoe.jpg"
    with EmbeddedStore(tmp_path / "store") as store:
        store.claim(encoder.signature)
        store.upsert([Document(id=deep, vector=encoder.encode_texts(["red shoe"])[0], text="red shoe")])
    app, store = quality_app(encoder, tmp_path / "store", tmp_path, quality_log_dir=str(tmp_path / "quality"))
    try:
        client = app.test_client()
        assert client.post("/v1/search", json={"text": "red shoe"}).get_json()["hits"][0]["id"] == deep
        answer = client.post("/v1/feedback", json={"text": "red shoe", "doc_id": deep})
        assert answer.status_code == 200 and answer.get_json()["recorded"]["doc_id"] == deep, answer.get_json()
        assert client.post("/v1/feedback", json={"text": "red shoe", "doc_id": deep + "x"}).status_code == 404
        answer = client.post("/v1/feedback", json={"query_id": "q" * 513, "doc_id": deep})
        assert answer.status_code == 400 and "over the limit of 512" in answer.get_json()["error"]["message"]
    finally:
        close(app, store)


def test_feedback_with_filters_naming_a_field_no_document_holds_answers_400_as_search_does_and_logs_nothing(
        build_app, tmp_path):
    # It was answered 200 `recorded`: the export kept the filters, and eval, re-running the query with them, refused
    # the whole evaluation set ("query 'q-…': its filters do not fit the store").
    logs = tmp_path / "quality"
    client = build_app(quality_log_dir=str(logs)).test_client()
    mistyped = {"colour": "red"}
    searched = client.post("/v1/search", json={"text": "red circle", "filters": mistyped})
    answer = client.post("/v1/feedback", json={"text": "red circle", "doc_id": "item-000001", "filters": mistyped})
    assert searched.status_code == answer.status_code == 400, answer.get_json()
    assert answer.get_json()["error"] == searched.get_json()["error"]
    assert "'colour'" in answer.get_json()["error"]["message"]
    assert not (logs / "feedback.jsonl").exists() or not (logs / "feedback.jsonl").read_text()
    answer = client.post("/v1/feedback", json={"text": "red circle", "doc_id": "item-000001",
                                               "filters": {"color": "black"}})
    assert answer.status_code == 200 and answer.get_json()["recorded"]["filters"] == {"color": "black"}


@pytest.mark.parametrize("excluding", [{"color": "blue"}, {"color": ["blue", "red"], "shape": "star"},
                                       {"color": ["blue", 1]}])
def test_feedback_with_filters_that_exclude_the_judged_document_answers_400_naming_filters_and_logs_nothing(
        build_app, tmp_path, excluding):
    # It was answered 200 `recorded`: eval, re-running the query under them, could never find the judged document
    # (a value of another type than the stored one's matches nothing on the embedded store, as another value; a
    # filter with no value of a type its field holds is refused as one that does not fit the stored types).
    logs = tmp_path / "quality"
    client = build_app(quality_log_dir=str(logs)).test_client()
    black_star = {"text": "black star", "doc_id": "item-000001"}  # large, black, star
    answer = client.post("/v1/feedback", json={**black_star, "filters": excluding})
    assert answer.status_code == 400, answer.get_json()
    assert answer.get_json()["error"]["message"].startswith(
        "field 'filters' does not let through the judged document 'item-000001' (field 'doc_id')")
    assert not (logs / "feedback.jsonl").exists() or not (logs / "feedback.jsonl").read_text()
    letting_through = {"color": ["blue", "black"], "shape": "star", "size": "large"}
    answer = client.post("/v1/feedback", json={**black_star, "filters": letting_through})
    assert answer.status_code == 200 and answer.get_json()["recorded"]["filters"] == letting_through


def test_feedback_the_log_cannot_take_answers_503_saying_nothing_was_recorded_and_the_server_closes_cleanly(
        build_app, tmp_path):
    # A full disk (the log is /dev/full here) was answered 200 `recorded`: the record was lost, and the error went
    # only to stderr as a "--- Logging error ---" traceback; closing the app then raised it again.
    logs = tmp_path / "quality"
    logs.mkdir()
    (logs / "feedback.jsonl").symlink_to("/dev/full")
    app = build_app(quality_log_dir=str(logs))
    answer = app.test_client().post("/v1/feedback", json={"text": "red circle", "doc_id": "item-000001"})
    assert answer.status_code == 503 and answer.get_json()["error"] == {
        "code": "log_unwritable", "message": "the feedback log (feedback.jsonl) could not be written (No space left "
                                             "on device): nothing was recorded"}  # no server path told to a client
    # build_app's teardown closes the app: it raised the unwritten bytes' error again.


def test_feedback_on_a_query_past_max_text_chars_records_the_text_its_search_logged_cut_alike_and_a_blank_cut_names_the_limit(build_app, tmp_path):
    # The text a client searched and sends back: past max_text_chars, /v1/search cut it and /v1/feedback answered 413.
    logs = tmp_path / "quality"
    app = build_app(quality_log_dir=str(logs), hard_example_min_score=2.0, monitor_fraction=0.0)
    client = app.test_client()
    text = "red circle " * 500  # 5,500 characters
    searched = client.post("/v1/search", json={"text": text, "k": 3})
    assert searched.status_code == 200
    answer = client.post("/v1/feedback", json={"query_id": searched.get_json()["query_id"], "text": text,
                                               "doc_id": searched.get_json()["hits"][0]["id"]})
    assert answer.status_code == 200, answer.get_json()
    assert state_of(app).quality.hard_example_checks.wait_idle(60)
    (logged,) = map(json.loads, (logs / "hard-examples.jsonl").read_text().splitlines())
    assert answer.get_json()["recorded"]["text"] == logged["text"] == text[:4096]
    # Blank within the characters kept: no text, as a blank one (a query_id names the query).
    blank = client.post("/v1/feedback", json={"query_id": "abc", "doc_id": "item-000001",
                                              "text": "\u2009" * 4096 + "red"})
    assert blank.status_code == 200 and blank.get_json()["recorded"]["text"] is None
    # Without a query_id, such a text names no query: the 400 says where the text must not be blank.
    refused = client.post("/v1/feedback", json={"doc_id": "a", "text": "\u2009" * 4096 + "red"})
    assert refused.status_code == 400 and "within its first 4096 characters, max_text_chars" in \
        refused.get_json()["error"]["message"]


def test_a_hard_example_logs_the_k_and_the_hits_its_pages_showed_not_the_next_page_probe(build_app, tmp_path):
    logs = tmp_path / "quality"
    # min_score 2: every query's top hit scores under it, so every search is logged.
    app = build_app(quality_log_dir=str(logs), hard_example_min_score=2.0, monitor_fraction=0.0)
    client = app.test_client()
    first = client.post("/v1/search", json={"text": "red circle", "mode": "vector", "k": 3}).get_json()
    second = client.post("/v1/search", json={"text": "blue square", "mode": "vector", "k": 3, "offset": 3}).get_json()
    before = client.post("/v1/search", json={"text": "blue square", "mode": "vector", "k": 3}).get_json()
    assert first["next_offset"] == 3 and second["next_offset"] == 6  # each ranking went on past the page
    assert state_of(app).quality.hard_example_checks.wait_idle(60)
    logged = {record["query_id"]: record
              for record in map(json.loads, (logs / "hard-examples.jsonl").read_text().splitlines())}
    assert logged[first["query_id"]]["k"] == 3
    assert [hit["id"] for hit in logged[first["query_id"]]["hits"]] == [hit["id"] for hit in first["hits"]]
    # A later page's search: the ranking down to that page's end (the pages before it, then it).
    assert logged[second["query_id"]]["k"] == 6
    assert [hit["id"] for hit in logged[second["query_id"]]["hits"]] == \
        [hit["id"] for hit in before["hits"] + second["hits"]]


def test_a_page_cut_at_max_k_logs_the_ranking_down_to_max_k_not_offset_plus_k(build_app, tmp_path):
    logs = tmp_path / "quality"
    app = build_app(quality_log_dir=str(logs), hard_example_min_score=2.0, monitor_fraction=0.0, max_k=5,
                    rerank_candidates=5, hard_example_repeat_seconds=0)
    client = app.test_client()
    whole = client.post("/v1/search", json={"text": "red circle", "mode": "vector", "k": 5}).get_json()
    cut = client.post("/v1/search", json={"text": "red circle", "mode": "vector", "k": 3, "offset": 3}).get_json()
    assert cut["cut_at_max_k"] is True and cut["hits"] == whole["hits"][3:]
    assert state_of(app).quality.hard_example_checks.wait_idle(60)
    logged = {record["query_id"]: record
              for record in map(json.loads, (logs / "hard-examples.jsonl").read_text().splitlines())}
    assert logged[cut["query_id"]]["k"] == 5
    assert [hit["id"] for hit in logged[cut["query_id"]]["hits"]] == [hit["id"] for hit in whole["hits"]]


def test_a_popular_hard_query_in_any_case_or_spacing_is_logged_once_leaving_rarer_ones_in_the_bounded_log_and_feedback_on_any_of_its_searches_is_exported(
        build_app, tmp_path):
    logs, out = tmp_path / "quality", tmp_path / "export"
    # min_score 2: every search is hard. Two files of 4 KiB hold a few full records: each search of the popular
    # query logged again (SIDECAR_HARD_EXAMPLE_FRACTION=1.0) rotated the rare one out before anyone exported it.
    app = build_app(quality_log_dir=str(logs), hard_example_min_score=2.0, monitor_fraction=0.0, monitor_queue=512,
                    quality_log_max_bytes=4096, quality_log_backups=1)
    client = app.test_client()
    (rare,) = search_all(client, ["small star on the left"])
    spellings = ["Red Circle", "red  circle", " RED circle\t"]
    answers = search_all(client, [spellings[i % 3] for i in range(300)])
    assert state_of(app).quality.hard_example_checks.wait_idle(60)
    logged = list(read_jsonl_log(logs / "hard-examples.jsonl"))
    assert [(r["query_id"], r["text"]) for r in logged] == [(rare["query_id"], "small star on the left"),
                                                            (answers[0]["query_id"], "Red Circle")]
    # Feedback naming the last search of the popular query by its query_id alone still reaches its query.
    last = answers[-1]
    assert client.post("/v1/feedback", json={"query_id": last["query_id"], "doc_id": last["hits"][0]["id"],
                                             "kind": "judgment", "relevance": 3}).status_code == 200
    result = CliRunner().invoke(main, ["-q", "hard-examples", "export", "--log-dir", str(logs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 judged queries (1 judgments), 1 hard queries still to judge" in result.output
    (judged,) = map(json.loads, (out / "queries.jsonl").read_text().splitlines())
    assert judged["text"] == "Red Circle" and judged["category"] == "low_score"
    (to_judge,) = map(json.loads, (out / "to_judge.jsonl").read_text().splitlines())
    assert to_judge["text"] == "small star on the left"


def test_status_counts_the_hard_example_checks_by_outcome_the_repeats_and_skips_beside_the_logged(build_app, tmp_path):
    # It reported `logged` alone: the searches a repeat line or a not-hard verdict within the window stood for were
    # nowhere but in /metrics. min_score and max_agreement -1: only a search that found nothing is hard.
    app = build_app(quality_log_dir=str(tmp_path / "quality"), hard_example_min_score=-1.0,
                    hard_example_max_agreement=-1.0, monitor_fraction=0.0)
    client = app.test_client()
    for text, mode in (("qwxzv", "bm25"), ("QWXZV", "bm25"), ("red circle", "hybrid"), ("Red Circle", "hybrid")):
        assert client.post("/v1/search", json={"text": text, "mode": mode, "k": 3}).status_code == 200
    assert state_of(app).quality.hard_example_checks.wait_idle(60)
    assert client.get("/v1/status").get_json()["hard_examples"] == {
        "enabled": True, "logged": 1, "repeated": 1, "skipped": 1, "dropped": 0, "too_large": 0}


def test_hard_examples_and_feedback_export_into_an_evaluation_set_eval_runs_and_open_clip_fine_tunes_on_the_pairs(
        build_app, shards, test_cache_dir, tmp_path):
    logs, out = tmp_path / "quality", tmp_path / "export"
    # min_score 2: every query's top hit scores under it, so every searched text is a hard example.
    app = build_app(quality_log_dir=str(logs), hard_example_min_score=2.0, monitor_fraction=0.0)
    client = app.test_client()
    texts = ["red circle", "blue square", "green star on the left", "small yellow triangle"]
    answers = search_all(client, texts)
    assert all(a["query_id"] for a in answers)
    # Clicks and judgments: by text, or by the query_id of the search alone.
    hits = [[hit["id"] for hit in a["hits"]] for a in answers]
    for body in ({"text": texts[0], "doc_id": hits[0][0]},
                 {"text": texts[1], "doc_id": hits[1][0], "kind": "judgment", "relevance": 2},
                 {"text": texts[1], "doc_id": hits[1][1], "kind": "judgment", "relevance": 0},
                 {"text": texts[1], "doc_id": hits[1][0]},  # a later click does not undo the judgment's grade
                 {"query_id": answers[2]["query_id"], "doc_id": hits[2][0]}):
        assert client.post("/v1/feedback", json=body).status_code == 200
    assert state_of(app).quality.hard_example_checks.wait_idle(60)
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "hard-examples", "export", "--log-dir", str(logs), "--out", str(out),
                                  "--shards", str(shards)])
    assert result.exit_code == 0, result.output
    assert "3 judged queries (4 judgments), 1 hard queries still to judge, 3 image-text pairs" in result.output
    queries_file = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    assert sorted(q["text"] for q in queries_file) == sorted(texts[:3])
    assert all(q["category"] == "low_score" for q in queries_file)
    qrels = [json.loads(line) for line in (out / "qrels.jsonl").read_text().splitlines()]
    assert sorted(q["relevance"] for q in qrels) == [0, 1, 1, 2]
    assert [json.loads(line)["text"] for line in (out / "to_judge.jsonl").read_text().splitlines()] == [texts[3]]

    report = tmp_path / "report"
    result = runner.invoke(main, ["-q", "eval", "--queries", str(out / "queries.jsonl"), "--qrels",
                                  str(out / "qrels.jsonl"), "--config", '{"mode": "vector", "rerank": false}',
                                  "--store-path", str(state_of(app).settings.store_path), "--out", str(report)])
    assert result.exit_code == 0, result.output
    evaluated = json.loads((report / "results.json").read_text())
    assert evaluated["queries"] == 3 and set(evaluated["results"][0]["per_query"]) == {q["id"] for q in queries_file}
    # The clicked and well-judged documents were the top hits they were shown: found again at rank 1.
    assert evaluated["results"][0]["metrics"]["RR@10"] == 1.0

    # Back into training: open_clip's own trainer fine-tunes the served model on pairs.csv as written,
    # and the checkpoint it saves is what SIDECAR_PRETRAINED then serves.
    original = checkpoint_path(test_cache_dir)
    logs_dir = tmp_path / "fine-tune"
    subprocess.run([sys.executable, "-c", FINE_TUNE, "--train-data", str(out / "pairs.csv"), "--model", "tiny-clip",
                    "--pretrained", str(original), "--batch-size", "3", "--epochs", "3", "--lr", "1e-4",
                    "--warmup", "1", "--workers", "0", "--precision", "fp32", "--seed", "0",
                    "--logs", str(logs_dir), "--name", "hard-examples"],
                   check=True, cwd=Path(__file__).parents[2], capture_output=True, timeout=600)
    tuned_path = logs_dir / "hard-examples" / "checkpoints" / "epoch_3.pt"
    rows = [line.split("\t") for line in (out / "pairs.csv").read_text().splitlines()[1:]]
    images = [Image.open(path).convert("RGB") for path, _ in rows]
    before, after = (load_encoder(Settings(cache_dir=test_cache_dir, pretrained=str(path)), fetch=False)
                     for path in (original, tuned_path))
    # The trainer's objective on the pairs it was given: their in-batch contrastive loss went down.
    assert pair_loss(after, images, [text for _, text in rows]) < pair_loss(before, images, [text for _, text in rows])



def test_feedback_on_a_filtered_search_is_exported_with_its_filters_and_eval_reruns_the_query_with_them(
        build_app, tmp_path):
    logs, out = tmp_path / "quality", tmp_path / "export"
    app = build_app(quality_log_dir=str(logs), hard_example_min_score=2.0, monitor_fraction=0.0)
    client = app.test_client()
    blue, unfiltered = (client.post("/v1/search", json={"text": "red circle", "mode": "vector", "k": 5, **body}).get_json()
                        for body in ({"filters": {"color": "blue"}}, {}))
    shapes = client.post("/v1/search", json={"text": "small star", "mode": "vector", "k": 5,
                                              "filters": {"shape": "square"}}).get_json()
    assert {hit["metadata"]["color"] for hit in blue["hits"]} == {"blue"} and blue["hits"][0] != unfiltered["hits"][0]
    # The filters named by the logged search's query_id, sent with the feedback, or none (the same text unfiltered).
    for body in ({"query_id": blue["query_id"], "text": "red circle", "doc_id": blue["hits"][0]["id"],
                  "kind": "judgment", "relevance": 3},
                 {"text": "red circle", "doc_id": unfiltered["hits"][0]["id"]},
                 {"text": "small star", "filters": {"shape": "square"}, "doc_id": shapes["hits"][0]["id"]}):
        assert client.post("/v1/feedback", json=body).status_code == 200
    assert state_of(app).quality.hard_example_checks.wait_idle(60)
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "hard-examples", "export", "--log-dir", str(logs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    exported = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    assert sorted((q["text"], json.dumps(q.get("filters"))) for q in exported) == [
        ("red circle", "null"), ("red circle", '{"color": "blue"}'), ("small star", '{"shape": "square"}')]

    report = tmp_path / "report"
    result = runner.invoke(main, ["-q", "eval", "--queries", str(out / "queries.jsonl"), "--qrels",
                                  str(out / "qrels.jsonl"), "--config", '{"mode": "vector", "rerank": false}',
                                  "--store-path", str(state_of(app).settings.store_path), "--out", str(report)])
    assert result.exit_code == 0, result.output
    per_query = json.loads((report / "results.json").read_text())["results"][0]["per_query"]
    # Each judged document was its search's top hit among the documents its filters let through: found at rank 1.
    assert {q["id"]: per_query[q["id"]]["RR@10"] for q in exported} == {q["id"]: 1.0 for q in exported}


# The tiny model's config is registered in the process (a real model needs no such line):
# python -m open_clip_train.main --train-data OUT/pairs.csv --model ViT-B-32 --pretrained ...
FINE_TUNE = ("import sys; from sidecar.model.tiny_model import register_tiny_config; register_tiny_config(); "
             "from open_clip_train.main import main; main(sys.argv[1:])")


def pair_loss(encoder, images, texts) -> float:
    """CLIP's symmetric in-batch cross-entropy of the (image, text) pairs at the model's own learnt
    temperature: what open_clip's trainer minimises (in float64: a well-trained model's is tiny)."""
    cosines = encoder.encode_images(images).astype(np.float64) @ encoder.encode_texts(texts).astype(np.float64).T
    similarity = torch.from_numpy(cosines) * float(encoder.model.logit_scale.detach().exp())
    labels = torch.arange(len(texts))
    return float(F.cross_entropy(similarity, labels) + F.cross_entropy(similarity.T, labels)) / 2


def test_hard_examples_export_from_a_folder_without_the_servers_logs_is_an_error_naming_the_setting(tmp_path):
    # It wrote four empty files and exited 0: a mistyped folder read as "nothing was logged".
    (tmp_path / "logs").mkdir()
    result = CliRunner().invoke(main, ["-q", "hard-examples", "export", "--log-dir", str(tmp_path / "logs"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"{tmp_path / 'logs'} holds no hard-examples.jsonl or feedback.jsonl" in result.output
    assert "SIDECAR_QUALITY_LOG_DIR" in result.output and not (tmp_path / "out").exists()


def test_hard_examples_export_from_a_setting_naming_no_folder_says_so_naming_the_setting(tmp_path, monkeypatch):
    # It said the missing folder "holds no hard-examples.jsonl", and asked whether it was SIDECAR_QUALITY_LOG_DIR.
    monkeypatch.setenv("SIDECAR_QUALITY_LOG_DIR", str(tmp_path / "missing"))
    result = CliRunner().invoke(main, ["-q", "hard-examples", "export", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: SIDECAR_QUALITY_LOG_DIR names {tmp_path / 'missing'}, which is not a folder: give the one the server "
        "logs to (its SIDECAR_QUALITY_LOG_DIR), or --log-dir")
    assert not (tmp_path / "out").exists()


def test_hard_examples_export_with_shards_naming_a_folder_of_no_shards_is_an_error_naming_it(tmp_path):
    # It exported, exit 0, every pair left out as "pairs whose document the shards do not hold": the corpus folder
    # given for the shards read as shards of no documents.
    logs, corpus = tmp_path / "logs", tmp_path / "corpus"
    logs.mkdir()
    (logs / "feedback.jsonl").write_text(json.dumps({"text": "red circle", "doc_id": "d1", "relevance": 1,
                                                     "kind": "click"}) + "\n")
    corpus.mkdir()
    (corpus / "manifest.jsonl").write_text(json.dumps({"id": "d1", "image": "d1.jpg"}) + "\n")
    result = CliRunner().invoke(main, ["-q", "hard-examples", "export", "--log-dir", str(logs),
                                       "--out", str(tmp_path / "out"), "--shards", str(corpus)])
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: {corpus} holds no shards (no manifest.json): run `clip-sidecar embed` first")
    assert not (tmp_path / "out").exists()


def test_a_served_app_runs_one_thread_of_each_background_check_and_the_readme_names_both(build_app, tmp_path):
    # A live worker showed two `hard-examples` threads and no `recall-checks`: the second was an OpenMP helper
    # its search started (it takes its starter's name), and the recall checks start with the first sampled
    # search. The README's list of a worker's threads named neither.
    def running(name: str) -> int:
        return sum(thread.name == name for thread in threading.enumerate())

    names = ("recall-checks", "hard-examples")
    before = {name: running(name) for name in names}
    app = build_app(quality_log_dir=str(tmp_path / "quality"), monitor_fraction=1.0)
    client = app.test_client()
    for text in ("red circle", "blue square", "green star"):
        assert client.post("/v1/search", json={"text": text, "k": 3}).status_code == 200
    quality = state_of(app).quality
    assert quality.recall_checks.wait_idle(60) and quality.hard_example_checks.wait_idle(60)
    assert {name: running(name) - before[name] for name in names} == {name: 1 for name in names}
    threads = (Path(__file__).resolve().parents[2] / "README.md").read_text().split("**Process and thread names**")[1]
    threads = threads.split("\n- ")[0]
    assert all(f"`{name}`" in threads for name in names), threads
