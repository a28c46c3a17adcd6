"""The hard-example log keeps only queries eval can replay (with a text or an image), and its export keeps
feedback that names any logged search of a query by its query_id and writes pairs open_clip's trainer reads
as written."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Callable

import numpy as np

from sidecar.retrieval.hard_examples import (
    FEEDBACK_FILE,
    HARD_EXAMPLES_FILE,
    RECENT_FILE,
    REPEATS_FILE,
    HardExampleLog,
    HardExampleRules,
    JsonlLog,
    SearchedQuery,
    classify,
    export_examples,
    feedback_record,
    read_jsonl_log,
)
from sidecar.retrieval.monitor import BackgroundChecks
from sidecar.retrieval.search import SearchOptions, search
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document, ModelSignature
from tests.support import damage_sqlite_file, png_b64


def test_feedback_on_an_earlier_search_of_a_text_searched_again_is_exported(tmp_path: Path):
    hard = JsonlLog(tmp_path / HARD_EXAMPLES_FILE, max_bytes=10**6, backups=1)
    feedback = JsonlLog(tmp_path / FEEDBACK_FILE, max_bytes=10**6, backups=1)
    for query_id in ("first", "second"):  # one hard text searched twice: two answers, two query_ids
        hard.write({"query_id": query_id, "text": "red sneakers", "mode": "hybrid", "k": 10,
                    "reasons": ["low_score"], "hits": []})
    feedback.write(feedback_record(query_id="first", text=None, doc_id="sku-1", relevance=3, kind="judgment"))
    feedback.write(feedback_record(query_id="second", text=None, doc_id="sku-2", relevance=1, kind="click"))
    hard.close()
    feedback.close()
    summary = export_examples(tmp_path, tmp_path / "out")
    assert summary.queries == 1 and summary.judgments == 2 and not summary.skipped.get(
        "feedback without query text whose query_id names no logged query"), summary.describe()
    qrels = [json.loads(line) for line in (tmp_path / "out" / "qrels.jsonl").read_text().splitlines()]
    assert {(q["doc_id"], q["relevance"]) for q in qrels} == {("sku-1", 3), ("sku-2", 1)}


def test_feedback_on_a_text_in_another_case_or_spacing_judges_the_logged_query_and_keeps_its_text(tmp_path: Path):
    hard = JsonlLog(tmp_path / HARD_EXAMPLES_FILE, max_bytes=10**6, backups=1)
    hard.write({"query_id": "q1", "text": "Blue Square", "mode": "vector", "k": 10, "reasons": ["low_score"],
                "hits": []})
    hard.close()
    feedback = JsonlLog(tmp_path / FEEDBACK_FILE, max_bytes=10**6, backups=1)
    feedback.write(feedback_record(query_id=None, text="blue  SQUARE", doc_id="sq-1", relevance=3, kind="judgment"))
    feedback.close()
    summary = export_examples(tmp_path, tmp_path / "out")
    (judged,) = map(json.loads, (tmp_path / "out" / "queries.jsonl").read_text().splitlines())
    assert summary.to_judge == 0 and judged["category"] == "low_score" and judged["text"] == "blue  SQUARE"


def test_export_skips_lines_a_killed_server_cut_short_even_inside_a_character_and_counts_them_per_file(
        tmp_path: Path):
    # A line cut inside "é" stopped the export with a UnicodeDecodeError traceback; a line cut elsewhere was
    # dropped without a word.
    def line(doc_id: str) -> bytes:
        record = feedback_record(query_id=None, text="café rouge", doc_id=doc_id, relevance=1, kind="click")
        return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"

    cut_in_character = line("d2")[:line("d2").index("é".encode()) + 1]
    (tmp_path / f"{FEEDBACK_FILE}.1").write_bytes(line("d1") + line("d3")[:20] + b"\n")
    (tmp_path / FEEDBACK_FILE).write_bytes(line("d4") + cut_in_character)
    summary = export_examples(tmp_path, tmp_path / "out")
    qrels = [json.loads(row) for row in (tmp_path / "out" / "qrels.jsonl").read_text().splitlines()]
    assert sorted(q["doc_id"] for q in qrels) == ["d1", "d4"]
    assert {why: count for why, count in summary.skipped.items() if why.startswith("lines")} == {
        f"lines of {FEEDBACK_FILE}.1 that are not a whole record (cut short by a killed server or a full disk)": 1,
        f"lines of {FEEDBACK_FILE} that are not a whole record (cut short by a killed server or a full disk)": 1}
    assert f"left out: 1 lines of {FEEDBACK_FILE} that are not a whole record" in summary.describe()


def test_export_leaves_out_a_hard_example_object_without_a_query_id_and_counts_it(tmp_path: Path):
    # {"a": 1} became a query "q-None" in to_judge.jsonl, with no text and no reasons.
    hard = JsonlLog(tmp_path / HARD_EXAMPLES_FILE, max_bytes=10**6, backups=1)
    hard.write({"a": 1})
    hard.write({"query_id": "q1", "text": "red circle", "mode": "vector", "k": 10, "reasons": ["low_score"],
                "hits": []})
    hard.close()
    summary = export_examples(tmp_path, tmp_path / "out")
    (row,) = map(json.loads, (tmp_path / "out" / "to_judge.jsonl").read_text().splitlines())
    assert row["text"] == "red circle" and summary.to_judge == 1
    assert summary.skipped == {f"records of {HARD_EXAMPLES_FILE} whose query_id is not the server's (missing, or "
                               "of another type: another program's record, or one edited by hand)": 1}


def test_export_leaves_out_and_counts_log_records_whose_fields_are_not_of_the_servers_types(tmp_path: Path):
    # Each of these stopped the export in a traceback: a number for a text (no casefold), a list for an id
    # (unhashable), a word for a relevance (no int()); a null relevance is none given: a click's 1.
    def write(name: str, *records: dict) -> None:
        log = JsonlLog(tmp_path / name, max_bytes=10**6, backups=1)
        for record in records:
            log.write(record)
        log.close()

    write(HARD_EXAMPLES_FILE, {"query_id": "h1", "text": "red circle", "reasons": ["low_score"], "hits": []},
          {"query_id": "h2", "text": 5}, {"query_id": "h3", "text": "x", "filters": ["shape"]})
    write(REPEATS_FILE, {"query_id": "h4", "repeat_of": "h1"}, {"query_id": ["h5"], "repeat_of": "h1"})
    write(FEEDBACK_FILE, feedback_record(query_id="h4", text=None, doc_id="d1", relevance=2, kind="judgment"),
          {"text": 5, "doc_id": "d2"}, {"text": "x", "doc_id": ["d3"]}, {"query_id": ["h1"], "doc_id": "d4"},
          {"text": "x", "doc_id": "d5", "relevance": "high"}, {"text": "x", "doc_id": "d6", "relevance": None})
    summary = export_examples(tmp_path, tmp_path / "out")
    qrels = [json.loads(row) for row in (tmp_path / "out" / "qrels.jsonl").read_text().splitlines()]
    assert [(q["doc_id"], q["relevance"]) for q in qrels] == [("d1", 2), ("d6", 1)]
    left_out = {why.split(" is not")[0]: count for why, count in summary.skipped.items() if why.startswith("records")}
    assert left_out == {f"records of {HARD_EXAMPLES_FILE} whose text": 1,
                        f"records of {HARD_EXAMPLES_FILE} whose filters": 1,
                        f"records of {REPEATS_FILE} whose query_id": 1,
                        f"records of {FEEDBACK_FILE} whose text": 1, f"records of {FEEDBACK_FILE} whose doc_id": 1,
                        f"records of {FEEDBACK_FILE} whose query_id": 1,
                        f"records of {FEEDBACK_FILE} whose relevance": 1}, summary.skipped


def test_a_record_written_after_a_line_left_unfinished_starts_a_line_of_its_own_within_the_bound(tmp_path: Path):
    # Appended to the unfinished line (a server killed, or a disk full, mid-write), the next record was lost with it.
    cut = b'{"time":"2026-01-01T00:00:00Z","doc_id":"cut'
    record = feedback_record(query_id=None, text="red circle", doc_id="d1", relevance=1, kind="click")
    size = len(json.dumps(record, separators=(",", ":")).encode("utf-8")) + 1
    for folder, max_bytes in (("roomy", 10**6), ("tight", len(cut) + size)):  # tight: no room for the line's end
        path = tmp_path / folder / FEEDBACK_FILE
        path.parent.mkdir()
        path.write_bytes(cut)
        log = JsonlLog(path, max_bytes=max_bytes, backups=1)
        log.write(record)
        log.close()
        assert [r["doc_id"] for r in read_jsonl_log(path)] == ["d1"], folder
        assert all(file.stat().st_size <= max_bytes for file in path.parent.glob(f"{FEEDBACK_FILE}*")), folder


def test_feedback_naming_a_logged_search_by_query_id_with_other_filters_is_another_query(tmp_path: Path):
    # The text under other filters judges other documents: lumped with the logged search's query, the first record
    # would decide which filters eval re-runs both judgments with.
    hard = JsonlLog(tmp_path / HARD_EXAMPLES_FILE, max_bytes=10**6, backups=1)
    hard.write({"query_id": "unfiltered", "text": "red circle", "mode": "vector", "k": 10, "filters": {},
                "reasons": ["low_score"], "hits": []})
    hard.close()
    feedback = JsonlLog(tmp_path / FEEDBACK_FILE, max_bytes=10**6, backups=1)
    feedback.write(feedback_record(query_id="unfiltered", text=None, doc_id="blue-1", relevance=3, kind="judgment",
                                   filters={"color": "blue"}))
    feedback.write(feedback_record(query_id="unfiltered", text=None, doc_id="red-1", relevance=3, kind="judgment"))
    feedback.close()
    summary = export_examples(tmp_path, tmp_path / "out")
    queries = {q["id"]: q for q in map(json.loads, (tmp_path / "out" / "queries.jsonl").read_text().splitlines())}
    qrels = [json.loads(line) for line in (tmp_path / "out" / "qrels.jsonl").read_text().splitlines()]
    judged = {(queries[q["query_id"]]["text"], json.dumps(queries[q["query_id"]].get("filters")), q["doc_id"])
              for q in qrels}
    assert summary.queries == 2 and judged == {("red circle", '{"color": "blue"}', "blue-1"),
                                               ("red circle", "null", "red-1")}, summary.describe()
    # The logged search's own query keeps its hard-example reason; the other filters' was not logged as hard.
    assert sorted(q["category"] for q in queries.values()) == ["feedback", "low_score"]


def test_a_like_search_with_neither_text_nor_image_is_not_logged_and_an_image_query_is(tmp_path: Path):
    image = base64.b64decode(png_b64())
    checks = BackgroundChecks(capacity=10)
    with EmbeddedStore(tmp_path / "store") as store:
        log = HardExampleLog(store, folder=tmp_path / "log", checks=checks, fraction=1.0, rules=HardExampleRules(),
                             images=True, max_bytes=10**6, backups=1, repeat_seconds=3600)
        for query_id, query_image in (("like", None), ("image", image)):  # both found nothing: hard
            log.offer(SearchedQuery(query_id=query_id, text=None, image=query_image, mode="vector", k=3,
                                    filters=None, vector=np.ones(4, dtype=np.float32) / 2, hits=[]))
        assert checks.wait_idle(30)
        checks.close()
        log.close()
    assert [record["query_id"] for record in read_jsonl_log(tmp_path / "log" / HARD_EXAMPLES_FILE)] == ["image"]
    # Still to judge, it is shown as queries.jsonl shows a judged one: its image file (it had neither text nor image).
    export_examples(tmp_path / "log", tmp_path / "out")
    (row,) = map(json.loads, (tmp_path / "out" / "to_judge.jsonl").read_text().splitlines())
    assert row["text"] is None and (tmp_path / "out" / row["image"]).read_bytes() == image


def test_one_text_searched_with_two_images_and_alone_exports_three_queries_and_feedback_keeps_its_searchs_image(
        tmp_path: Path):
    red, blue = (base64.b64decode(png_b64(colour)) for colour in ((255, 0, 0), (0, 0, 255)))
    checks = BackgroundChecks(capacity=10)
    with EmbeddedStore(tmp_path / "store") as store:
        log = HardExampleLog(store, folder=tmp_path / "log", checks=checks, fraction=1.0, rules=HardExampleRules(),
                             images=True, max_bytes=10**6, backups=1, repeat_seconds=3600)
        for query_id, query_image in (("with-red", red), ("with-blue", blue), ("alone", None)):  # all found nothing
            log.offer(SearchedQuery(query_id=query_id, text="shoes like this", image=query_image, mode="vector", k=3,
                                    filters=None, vector=np.ones(4, dtype=np.float32) / 2, hits=[]))
        assert checks.wait_idle(30)
        checks.close()
        log.close()
    assert len(list(read_jsonl_log(tmp_path / "log" / HARD_EXAMPLES_FILE))) == 3  # three queries to the log
    feedback = JsonlLog(tmp_path / "log" / FEEDBACK_FILE, max_bytes=10**6, backups=1)
    feedback.write(feedback_record(query_id="with-red", text="shoes like this", doc_id="sku-1", relevance=3,
                                   kind="judgment"))
    feedback.close()
    summary = export_examples(tmp_path / "log", tmp_path / "out")
    assert summary.queries == 1 and summary.to_judge == 2, summary.describe()
    (judged,) = map(json.loads, (tmp_path / "out" / "queries.jsonl").read_text().splitlines())
    assert (tmp_path / "out" / judged["image"]).read_bytes() == red  # the image the judged search was made with
    to_judge = [json.loads(line) for line in (tmp_path / "out" / "to_judge.jsonl").read_text().splitlines()]
    assert sorted((tmp_path / "out" / row["image"]).read_bytes() if row.get("image") else b"" for row in to_judge) \
        == sorted([blue, b""])


def searched(query_id: str, text: str, *, filters=None, model: str = "m") -> SearchedQuery:
    """A search that found nothing (no_result: hard on any store)."""
    return SearchedQuery(query_id=query_id, text=text, image=None, mode="vector", k=3, filters=filters,
                         vector=np.ones(4, dtype=np.float32) / 2, hits=[], model=model)


def logged_searches(tmp_path: Path, searches: list[tuple[float, SearchedQuery]], *, repeat_seconds: float
                    ) -> tuple[list[dict], list[dict]]:
    """The hard-example records and repeat lines of `searches`, each offered at its clock time (seconds)."""
    now = [0.0]
    checks = BackgroundChecks(capacity=10)
    with EmbeddedStore(tmp_path / "store") as store:
        log = HardExampleLog(store, folder=tmp_path / "log", checks=checks, fraction=1.0, rules=HardExampleRules(),
                             images=False, max_bytes=10**6, backups=1, repeat_seconds=repeat_seconds,
                             clock=lambda: now[0])
        for at, query in searches:
            now[0] = at
            log.offer(query)
            assert checks.wait_idle(30)
        checks.close()
        log.close()
    return (list(read_jsonl_log(tmp_path / "log" / HARD_EXAMPLES_FILE)),
            list(read_jsonl_log(tmp_path / "log" / REPEATS_FILE)))


def test_a_query_searched_again_in_any_case_or_spacing_within_the_window_is_a_repeat_line_naming_its_record(
        tmp_path: Path):
    records, repeats = logged_searches(tmp_path, [
        (0, searched("a", "Red Circle")), (10, searched("b", "red  circle")), (3599, searched("c", " RED circle\t")),
        (3600, searched("d", "red circle"))], repeat_seconds=3600)
    # The user's own text is kept; past the window the query is classified and logged afresh.
    assert [(r["query_id"], r["text"]) for r in records] == [("a", "Red Circle"), ("d", "red circle")]
    assert [(r["query_id"], r["repeat_of"]) for r in repeats] == [("b", "a"), ("c", "a")]


def test_the_same_text_under_other_filters_or_by_another_model_is_another_query_and_a_zero_window_logs_every_search(
        tmp_path: Path):
    records, repeats = logged_searches(tmp_path / "keys", [
        (0, searched("a", "red")), (1, searched("b", "red", filters={"color": "blue"})),
        (2, searched("c", "red", model="other")), (3, searched("d", "Red", filters={"color": "blue"}))],
        repeat_seconds=3600)
    assert [r["query_id"] for r in records] == ["a", "b", "c"] and [r["query_id"] for r in repeats] == ["d"]
    records, repeats = logged_searches(tmp_path / "zero", [(0, searched("a", "red")), (0, searched("b", "red"))],
                                       repeat_seconds=0)
    assert [r["query_id"] for r in records] == ["a", "b"] and repeats == []


def logged_by_two_workers(tmp_path: Path, steps: list[tuple[float, int, SearchedQuery] | Callable[[], None]]
                          ) -> tuple[list[dict], list[dict]]:
    """The hard-example records and repeat lines of two logs on one folder, each with its own checks thread and
    SQLite connection, as two Gunicorn workers have. `steps`: a search offered at its clock time (seconds) to
    worker 0 or 1, or something done between searches."""
    now = [0.0]
    with EmbeddedStore(tmp_path / "store") as store:
        workers = [(checks := BackgroundChecks(capacity=10),
                    HardExampleLog(store, folder=tmp_path / "log", checks=checks, fraction=1.0,
                                   rules=HardExampleRules(), images=False, max_bytes=10**6, backups=1,
                                   repeat_seconds=3600, clock=lambda: now[0])) for _ in range(2)]
        for step in steps:
            if callable(step):
                step()
                continue
            now[0], worker, query = step
            checks, log = workers[worker]
            log.offer(query)
            assert checks.wait_idle(30)
        for checks, log in workers:
            checks.close()
            log.close()
    return (list(read_jsonl_log(tmp_path / "log" / HARD_EXAMPLES_FILE)),
            list(read_jsonl_log(tmp_path / "log" / REPEATS_FILE)))


def test_a_query_logged_by_one_worker_is_a_repeat_for_another_worker_logging_to_the_same_folder(tmp_path: Path):
    records, repeats = logged_by_two_workers(tmp_path, [
        (0, 0, searched("a", "red circle")), (5, 1, searched("b", "Red Circle")),
        (3600, 1, searched("c", "red circle")), (3601, 0, searched("d", "red circle"))])
    # Past the window the second worker logs it afresh, and the first then finds that record.
    assert [r["query_id"] for r in records] == ["a", "c"]
    assert [(r["query_id"], r["repeat_of"]) for r in repeats] == [("b", "a"), ("d", "c")]


def test_a_memory_file_sqlite_cannot_read_is_moved_aside_and_the_queries_are_still_logged_and_repeats_found(
        tmp_path: Path, caplog):
    # A disk fault or a copy cut short: the file only remembers recent queries, so the log must go on without it.
    (tmp_path / "log").mkdir()
    damaged = b"not a database " * 100
    (tmp_path / "log" / RECENT_FILE).write_bytes(damaged)
    records, repeats = logged_searches(tmp_path, [(0, searched("a", "red circle")), (5, searched("b", "red circle"))],
                                       repeat_seconds=3600)
    assert ([r["query_id"] for r in records], [(r["query_id"], r["repeat_of"]) for r in repeats]) == (["a"], [("b", "a")])
    assert (tmp_path / "log" / f"{RECENT_FILE}.unreadable").read_bytes() == damaged
    assert f"{RECENT_FILE} cannot be read (file is not a database); moved to {RECENT_FILE}.unreadable" in caplog.text


def test_a_memory_file_damaged_under_two_running_workers_is_moved_aside_once_and_both_go_on_logging_and_finding_repeats(
        tmp_path: Path, caplog):
    # Before, every check of both workers failed on the damaged file until they restarted: nothing more was logged.
    recent = tmp_path / "log" / RECENT_FILE
    records, repeats = logged_by_two_workers(tmp_path, [
        (0, 0, searched("a", "red circle")), (1, 1, searched("b", "blue square")),
        lambda: damage_sqlite_file(recent),
        (5, 0, searched("c", "green")), (6, 1, searched("d", "green")),
        (7, 1, searched("e", "yellow")), (8, 0, searched("f", "Yellow"))])
    assert [r["query_id"] for r in records] == ["a", "b", "c", "e"]
    # The second worker's connection was to the damaged file: it found the new one the first worker began.
    assert [(r["query_id"], r["repeat_of"]) for r in repeats] == [("d", "c"), ("f", "e")]
    assert recent.with_name(f"{RECENT_FILE}.unreadable").read_bytes().startswith(b"not a database")
    assert caplog.text.count(f"{RECENT_FILE} cannot be read (file is not a database); moved to") == 1


class CountingStore(EmbeddedStore):
    """An embedded store that counts its vector and BM25 searches: a hard-example check runs one of each."""

    searches = 0

    def vector_search(self, *args, **kwargs):
        self.searches += 1
        return super().vector_search(*args, **kwargs)

    def text_search(self, *args, **kwargs):
        self.searches += 1
        return super().text_search(*args, **kwargs)


def checks_of_easy_searches(tmp_path: Path, searches: list[tuple[float, str, str]], *, repeat_seconds: float
                            ) -> tuple[int, list[str]]:
    """The store searches the checks of `searches` ran, and the outcomes they recorded. Each is (clock time, text,
    mode) of a search the store answers well: its vector and BM25 top hit are the one document, at cosine 1."""
    now, outcomes = [0.0], []
    checks = BackgroundChecks(capacity=10)
    with CountingStore(tmp_path / "store") as store:
        store.claim(ModelSignature("m", "w", 4))
        store.upsert([Document(id="zebra", vector=unit(1, 0, 0, 0), text="zebra", content_hash="z"),
                      Document(id="fig", vector=unit(0, 1, 0, 0), text="fig", content_hash="f")])
        hit = store.vector_search(unit(1, 0, 0, 0), 1)[0]
        store.searches = 0
        log = HardExampleLog(store, folder=tmp_path / "log", checks=checks, fraction=1.0, rules=HardExampleRules(),
                             images=False, max_bytes=10**6, backups=1, repeat_seconds=repeat_seconds,
                             record=outcomes.append, clock=lambda: now[0])
        for i, (at, text, mode) in enumerate(searches):
            now[0] = at
            log.offer(SearchedQuery(query_id=str(i), text=text, image=None, mode=mode, k=1, filters=None,
                                    vector=None if mode == "bm25" else unit(1, 0, 0, 0), hits=[hit], model="m"))
            assert checks.wait_idle(30)
        checks.close()
        log.close()
        assert not list(read_jsonl_log(tmp_path / "log" / HARD_EXAMPLES_FILE))
        return store.searches, outcomes


def test_a_popular_query_found_not_hard_is_not_checked_again_within_the_window_nor_logged(tmp_path: Path):
    # Each of its searches cost a check of two store searches: at fraction 1.0 it kept the check queue busy.
    searched, outcomes = checks_of_easy_searches(tmp_path / "window", [
        *((i, "Zebra" if i % 2 else "zebra ", "hybrid") for i in range(50)), (3600, "zebra", "vector")],
        repeat_seconds=3600)
    assert searched == 2 * 2  # the first search's check, and the first past the window's
    assert outcomes == ["skipped"] * 49
    searched, outcomes = checks_of_easy_searches(tmp_path / "zero", [(0, "zebra", "hybrid")] * 3, repeat_seconds=0)
    assert searched == 3 * 2 and outcomes == []


def test_a_bm25_search_found_not_hard_does_not_spare_a_later_vector_search_its_check(tmp_path: Path):
    # A check without a query vector judged only the hits shown, not the model: its verdict stands for nothing else.
    searched, outcomes = checks_of_easy_searches(tmp_path, [(0, "zebra", "bm25"), (1, "zebra", "bm25"),
                                                            (2, "zebra", "hybrid"), (3, "zebra", "hybrid")],
                                                 repeat_seconds=3600)
    assert searched == 2 and outcomes == ["skipped"]


def test_feedback_naming_a_repeat_by_query_id_is_exported_with_its_query_and_to_judge_puts_the_most_searched_first(
        tmp_path: Path):
    hard = JsonlLog(tmp_path / HARD_EXAMPLES_FILE, max_bytes=10**6, backups=1)
    for query_id, text in (("rare", "green star"), ("popular", "Red Circle"), ("judged", "blue square")):
        hard.write({"query_id": query_id, "text": text, "mode": "vector", "k": 10, "reasons": ["low_score"],
                    "hits": []})
    hard.close()
    repeats = JsonlLog(tmp_path / REPEATS_FILE, max_bytes=10**6, backups=1)
    for query_id, first in (("p2", "popular"), ("p3", "popular"), ("j2", "judged"), ("gone", "rotated-out")):
        repeats.write({"query_id": query_id, "repeat_of": first})
    repeats.close()
    feedback = JsonlLog(tmp_path / FEEDBACK_FILE, max_bytes=10**6, backups=1)
    feedback.write(feedback_record(query_id="j2", text=None, doc_id="sq-1", relevance=3, kind="judgment"))
    feedback.write(feedback_record(query_id=None, text="BLUE  Square", doc_id="sq-2", relevance=0, kind="judgment"))
    feedback.write(feedback_record(query_id="gone", text=None, doc_id="x", relevance=1, kind="click"))
    feedback.close()
    summary = export_examples(tmp_path, tmp_path / "out")
    # The repeat's judgment and the same text in other case and spacing judge the one logged query.
    (judged,) = map(json.loads, (tmp_path / "out" / "queries.jsonl").read_text().splitlines())
    qrels = [json.loads(line) for line in (tmp_path / "out" / "qrels.jsonl").read_text().splitlines()]
    assert judged["text"] == "blue square" and judged["category"] == "low_score"
    assert {(q["query_id"], q["doc_id"], q["relevance"]) for q in qrels} == {(judged["id"], "sq-1", 3),
                                                                              (judged["id"], "sq-2", 0)}
    to_judge = [json.loads(line) for line in (tmp_path / "out" / "to_judge.jsonl").read_text().splitlines()]
    assert [(row["text"], row["searches"]) for row in to_judge] == [("Red Circle", 3), ("green star", 1)]
    # A repeat whose record rotated out names no text: its feedback is left out, and counted.
    assert summary.skipped["feedback without query text whose query_id names no logged query"] == 1


def test_open_clips_csv_reader_reads_every_exported_pair_caption_as_written_and_na_texts_are_left_out(tmp_path: Path):
    from open_clip_train.data import CsvDataset  # the trainer's own reader, with its default keys and separator

    image = tmp_path / "sku-1.png"
    image.write_bytes(base64.b64decode(png_b64()))
    feedback = JsonlLog(tmp_path / FEEDBACK_FILE, max_bytes=10**6, backups=1)
    texts = ["red sneakers", 'a "quoted"\tquery', "1234", "NA", "null", "None", "n/a"]
    for text in texts:
        feedback.write(feedback_record(query_id=None, text=text, doc_id="sku-1", relevance=2, kind="judgment"))
    feedback.close()
    summary = export_examples(tmp_path, tmp_path / "out", image_paths={"sku-1": str(image)})
    pairs = CsvDataset(str(tmp_path / "out" / "pairs.csv"), transforms=None, img_key="filepath", caption_key="title")
    # pandas reads NA, null, None, n/a as a missing value: open_clip would train on the caption "nan".
    assert [str(caption) for caption in pairs.captions] == ["red sneakers", 'a "quoted" query', "1234"]
    assert pairs.images == [str(image.resolve())] * 3
    assert summary.pairs == 3 and sum(count for why, count in summary.skipped.items() if "missing" in why) == 4


def test_a_document_judged_for_one_text_under_several_filters_or_spacings_makes_one_pair(tmp_path: Path):
    # Each was its own query (rightly, in qrels), and each wrote the same (image, caption) row to pairs.csv: the
    # trainer saw the pair as often as its filters varied, and two copies in a batch are each other's negatives.
    image = tmp_path / "sku-1.png"
    image.write_bytes(base64.b64decode(png_b64()))
    feedback = JsonlLog(tmp_path / FEEDBACK_FILE, max_bytes=10**6, backups=1)
    for text, filters in (("red sneakers", None), ("red sneakers", {"size": "42"}), ("red  sneakers", {"size": "43"})):
        feedback.write(feedback_record(query_id=None, text=text, doc_id="sku-1", relevance=1, kind="click",
                                       filters=filters))
    feedback.close()
    summary = export_examples(tmp_path, tmp_path / "out", image_paths={"sku-1": str(image)})
    rows = (tmp_path / "out" / "pairs.csv").read_text().splitlines()[1:]
    assert summary.judgments == 3 and rows == [f"{image.resolve()}\tred sneakers"] and summary.pairs == 1
    assert summary.skipped == {"pairs already written (the same image and text, judged under other filters)": 2}


def test_pairs_whose_image_moved_or_is_named_relative_to_an_older_embeds_folder_are_left_out_naming_the_rerun(
        tmp_path: Path, monkeypatch):
    (tmp_path / "photos").mkdir()
    image = tmp_path / "photos" / "here.png"
    image.write_bytes(base64.b64decode(png_b64()))
    (tmp_path / "photos" / "old.png").write_bytes(image.read_bytes())
    feedback = JsonlLog(tmp_path / FEEDBACK_FILE, max_bytes=10**6, backups=1)
    for doc_id in ("here", "moved", "old"):
        feedback.write(feedback_record(query_id=None, text="red", doc_id=doc_id, relevance=2, kind="judgment"))
    feedback.close()
    monkeypatch.chdir(tmp_path)  # where "photos/old.png" happens to resolve, though not where its embed ran
    summary = export_examples(tmp_path, tmp_path / "out", image_paths={
        "here": str(image), "moved": str(tmp_path / "gone" / "moved.png"), "old": "photos/old.png"})
    rows = (tmp_path / "out" / "pairs.csv").read_text().splitlines()[1:]
    assert rows == [f"{image}\tred"]
    assert [(why, count) for why, count in summary.skipped.items() if "rerun `clip-sidecar embed" in why] == [
        ("pairs whose image is not at the path the shards name (moved since, or named relative to an older embed's "
         "folder): rerun `clip-sidecar embed SOURCE --out SHARDS` with SOURCE where it is now to update the paths", 2)]


def test_a_pair_whose_document_the_shards_do_not_hold_says_so_and_only_without_shards_asks_for_them(tmp_path: Path):
    image = tmp_path / "here.png"
    image.write_bytes(base64.b64decode(png_b64()))
    feedback = JsonlLog(tmp_path / FEEDBACK_FILE, max_bytes=10**6, backups=1)
    for doc_id in ("here", "deleted"):
        feedback.write(feedback_record(query_id=None, text="red", doc_id=doc_id, relevance=2, kind="judgment"))
    feedback.close()
    with_shards = export_examples(tmp_path, tmp_path / "out", image_paths={"here": str(image)})
    assert with_shards.pairs == 1 and with_shards.skipped == {
        "pairs whose document the shards do not hold (deleted since, or an id feedback named that was never "
        "indexed)": 1}, with_shards.describe()
    without = export_examples(tmp_path, tmp_path / "out")
    assert without.pairs == 0 and without.skipped == {"pairs whose document image is unknown (pass the shards)": 2}


def unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def reasons_of_hybrid_search(tmp_path: Path, documents: list[tuple[str, np.ndarray, str]], **options) -> list[str]:
    """The hard-example reasons of a real hybrid search for "zebra" (query vector e1) on an embedded store."""
    query = unit(1, 0, 0, 0)
    with EmbeddedStore(tmp_path / "store") as store:
        store.claim(ModelSignature("m", "w", 4))
        store.upsert([Document(id=doc_id, vector=vector, text=text, content_hash=doc_id)
                      for doc_id, vector, text in documents])
        options = SearchOptions(mode="hybrid", weights=(0.4, 0.6), rerank=False, **options)
        hits = search(store, vector=query, text="zebra", options=options).hits
        record = classify(SearchedQuery(query_id="q", text="zebra", image=None, mode="hybrid", k=options.k,
                                        filters=None, vector=query, hits=hits), store=store, rules=HardExampleRules())
    return record["reasons"] if record else []


def test_low_score_judges_the_models_best_match_not_the_top_hit_bm25_ranked_first(tmp_path: Path):
    # BM25 ranks first a document the model scores 0, while the model matches another exactly: not low_score.
    exact = [("match", unit(1, 0, 0, 0), "apple"), ("words", unit(0, 1, 0, 0), "zebra zebra"),
             ("other", unit(0, 0, 0, 1), "fig")]
    assert "low_score" not in reasons_of_hybrid_search(tmp_path / "exact", exact, k=3)
    # The model's best match is at cosine 0.1; the top hit is BM25's alone, with no vector score: low_score.
    far = [("near", unit(0.1, 1, 0, 0), "apple"), ("words", unit(0, 0, 1, 0), "zebra")]
    assert "low_score" in reasons_of_hybrid_search(tmp_path / "far", far, k=1, candidates=1)


def test_export_leaves_out_and_counts_a_hard_example_whose_image_is_not_base64(tmp_path: Path):
    # The server writes an image query's bytes as base64; a record with other text there stopped the export.
    log = JsonlLog(tmp_path / HARD_EXAMPLES_FILE, max_bytes=10**6, backups=1)
    log.write({"query_id": "h1", "text": None, "image": "not base64!", "reasons": ["no_hits"], "hits": []})
    log.write({"query_id": "h2", "text": None, "image": png_b64(), "reasons": ["no_hits"], "hits": []})
    log.close()
    summary = export_examples(tmp_path, tmp_path / "out")
    (row,) = map(json.loads, (tmp_path / "out" / "to_judge.jsonl").read_text().splitlines())
    assert row["id"] == "q-h2" and (tmp_path / "out" / row["image"]).read_bytes() == base64.b64decode(png_b64())
    assert summary.skipped == {f"records of {HARD_EXAMPLES_FILE} whose image is not the server's (missing, or of "
                               "another type: another program's record, or one edited by hand)": 1}
