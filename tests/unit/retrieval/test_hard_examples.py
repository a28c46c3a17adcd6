"""The hard-example export: feedback that names any logged search of a query by its query_id is kept."""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.retrieval.hard_examples import (
    FEEDBACK_FILE,
    HARD_EXAMPLES_FILE,
    JsonlLog,
    export_examples,
    feedback_record,
)


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
