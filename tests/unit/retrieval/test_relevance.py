"""The relevance harness: metric values on a hand-made qrels file, input formats, configurations, the report."""

from __future__ import annotations

import json
import math
import re

import ir_measures
import numpy as np
import pytest

from sidecar.retrieval import relevance
from sidecar.retrieval.relevance import EvaluationInputError, Query, RunConfig, SearchTarget, check_configs
from sidecar.retrieval.report import label, sweeps, write_report, write_results_only
from sidecar.retrieval.search import SearchOptions
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document, ModelSignature

# BM25 ranks "alpha" as d1 (three alphas) above d2 (one), and finds nothing else; "gamma" finds only d3.
DOCS = {"d1": "alpha alpha alpha", "d2": "alpha beta", "d3": "beta gamma", "d4": "delta"}
QRELS_TREC = """q1 0 d2 2
q1 0 d1 1
q1 0 d4 1
q2 0 d3 1
q2 0 d9 2
"""


@pytest.fixture
def store(tmp_path):
    store = EmbeddedStore(tmp_path / "store")
    store.claim(ModelSignature(model="hand-made", weights="none", dim=4))
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(DOCS), 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.upsert([Document(id=doc_id, vector=vector, text=text) for (doc_id, text), vector in zip(DOCS.items(),
                                                                                                   vectors)])
    yield store
    store.close()


@pytest.fixture
def qrels_file(tmp_path):
    path = tmp_path / "qrels.txt"
    path.write_text(QRELS_TREC, encoding="utf-8")
    return path


QUERIES = [Query(id="q1", text="alpha", category="a"), Query(id="q2", text="gamma", category="b", tags=("x",))]
BM25 = RunConfig(options=SearchOptions(mode="bm25", rerank=False))


def test_metrics_on_a_hand_made_qrels_file_are_the_librarys_and_the_hand_computed_values(store, qrels_file):
    qrels = relevance.read_qrels(qrels_file)
    evaluation = relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, QUERIES, qrels, [BM25],
                                    measures=["nDCG@10", "RR@10", "R@10", "RR(rel=2)@10", "R(rel=2)@10"])
    result = evaluation.results[0]
    # By hand, trec_eval's linear gains. q1 ranks d1 (grade 1), d2 (grade 2); d4 (grade 1) is missed.
    ndcg_q1 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3) + 1 / math.log2(4))
    # q2 ranks d3 (grade 1) first; the ideal list holds d9 (grade 2), then d3.
    ndcg_q2 = 1 / (2 + 1 / math.log2(3))
    expected = {"nDCG@10": (ndcg_q1, ndcg_q2), "RR@10": (1.0, 1.0), "R@10": (2 / 3, 1 / 2),
                "RR(rel=2)@10": (1 / 2, 0.0), "R(rel=2)@10": (1.0, 0.0)}
    for measure, (q1, q2) in expected.items():
        assert result.per_query["q1"][measure] == pytest.approx(q1), measure
        assert result.per_query["q2"][measure] == pytest.approx(q2), measure
        assert result.metrics[measure] == pytest.approx((q1 + q2) / 2), measure
    # And the library, called directly on the same ranking, agrees on every aggregate.
    run = [ir_measures.ScoredDoc("q1", "d1", 2.0), ir_measures.ScoredDoc("q1", "d2", 1.0),
           ir_measures.ScoredDoc("q2", "d3", 1.0)]
    library = ir_measures.calc_aggregate([ir_measures.parse_measure(m) for m in expected],
                                         list(ir_measures.read_trec_qrels(str(qrels_file))), run)
    assert {str(m): pytest.approx(v) for m, v in library.items()} == result.metrics
    assert result.by_group["a"]["nDCG@10"] == pytest.approx(ndcg_q1)
    assert result.by_group["x"]["nDCG@10"] == pytest.approx(ndcg_q2)
    assert set(result.latency_ms) == {"encode", "coarse", "fetch", "rerank", "search", "total"}
    assert result.latency_ms["rerank"] == (0.0, 0.0)  # bm25 without the fine stage: no rerank, not its fetch


def test_a_query_naming_a_group_as_its_category_and_a_tag_counts_once_in_its_size_and_its_mean(store, qrels_file):
    # As hard-examples export writes them: category = the first reason, tags = every reason. The group
    # "hard" counted 4 queries of 2, q2 three times, and weighted its mean so.
    queries = [Query(id="q1", text="alpha", category="other", tags=("hard",)),
               Query(id="q2", text="gamma", category="hard", tags=("hard", "hard"))]
    evaluation = relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, queries,
                                    relevance.read_qrels(qrels_file), [BM25], measures=["nDCG@10"])
    assert evaluation.groups == {"other": 1, "hard": 2}
    per_query = evaluation.results[0].per_query
    assert evaluation.results[0].by_group["hard"]["nDCG@10"] == pytest.approx(
        (per_query["q1"]["nDCG@10"] + per_query["q2"]["nDCG@10"]) / 2)


def test_a_judged_query_the_run_misses_counts_as_zero_not_as_absent(store, tmp_path):
    qrels = {"q1": {"d2": 1}, "q3": {"d4": 1}}
    queries = [Query(id="q1", text="alpha"), Query(id="q3", text="nothing matches this")]
    result = relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, queries, qrels, [BM25],
                                measures=["RR@10"]).results[0]
    assert result.per_query["q3"]["RR@10"] == 0.0
    assert result.metrics["RR@10"] == pytest.approx((1 / 2 + 0.0) / 2)


def test_a_judged_query_with_no_relevant_document_scores_zero_in_the_mean_as_ir_measures_aggregates_it(store):
    # q2's only judgment is grade 0; q9 is judged nowhere and is left out.
    qrels = {"q1": {"d2": 1}, "q2": {"d3": 0}}
    queries = [*QUERIES, Query(id="q9", text="alpha")]
    measures = ["nDCG@10", "RR@10", "R@10", "P@5"]
    result = relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, queries, qrels, [BM25],
                                measures=measures).results[0]
    assert set(result.per_query) == {"q1", "q2"} and all(v == 0.0 for v in result.per_query["q2"].values())
    run = [ir_measures.ScoredDoc("q1", "d1", 2.0), ir_measures.ScoredDoc("q1", "d2", 1.0),
           ir_measures.ScoredDoc("q2", "d3", 1.0)]  # BM25's ranking of "alpha" and "gamma"
    qrel_list = [ir_measures.Qrel(q, d, g) for q, docs in qrels.items() for d, g in docs.items()]
    library = ir_measures.calc_aggregate([ir_measures.parse_measure(m) for m in measures], qrel_list, run)
    assert result.metrics == pytest.approx({str(m): v for m, v in library.items()})


def test_err_is_computed_per_query_for_query_and_document_ids_its_provider_would_refuse_or_merge(store):
    # ERR comes from gdeval, which reads files: a query id is its digits after the last "-" ("q-1" and "x-1" were
    # one query, "epsilon" none: a CalledProcessError after every configuration ran) and a line splits on spaces.
    store.upsert([Document(id="my photo", vector=np.eye(4, dtype=np.float32)[0], text="epsilon")])
    qrels = {"q-1": {"d2": 2, "d1": 1}, "x-1": {"d3": 1}, "epsilon": {"my photo": 3, "d1": 1}}
    queries = [Query(id="q-1", text="alpha"), Query(id="x-1", text="gamma"), Query(id="epsilon", text="epsilon")]
    result = relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, queries, qrels, [BM25],
                                measures=["ERR@10"]).results[0]
    # The library's values on ids it reads: BM25 ranks d1, d2 for "alpha", d3 for "gamma", "my photo" for "epsilon".
    numbered = {"q-1": "1", "x-1": "2", "epsilon": "3"}
    run = [ir_measures.ScoredDoc("1", "d1", 2.0), ir_measures.ScoredDoc("1", "d2", 1.0),
           ir_measures.ScoredDoc("2", "d3", 1.0), ir_measures.ScoredDoc("3", "photo", 1.0)]
    qrel_list = [ir_measures.Qrel(numbered[q], d.replace("my ", ""), g) for q, docs in qrels.items()
                 for d, g in docs.items()]
    library = {m.query_id: m.value for m in ir_measures.iter_calc([ir_measures.parse_measure("ERR@10")], qrel_list,
                                                                   run)}
    assert {q: v["ERR@10"] for q, v in result.per_query.items()} == pytest.approx(
        {query: library[number] for query, number in numbered.items()})
    assert all(value > 0 for value in library.values())


def test_qrels_whose_relevant_documents_are_none_of_the_stores_are_refused_and_some_missing_are_warned_of(
        store, tmp_path, caplog):
    # Were scored as relevant documents every configuration missed: a report of zeros for an empty store or
    # for qrels naming documents by another id (file names, say).
    target = {"default": SearchTarget(store=store, encoder=None)}
    with pytest.raises(EvaluationInputError, match=r"none of the 2 documents judged relevant is in the store \(e.g. "
                                                   r"'d1.jpg'\): do the qrels' doc ids match the store's\?"):
        relevance.evaluate(target, QUERIES, {"q1": {"d1.jpg": 1, "d2.jpg": 2, "d3": 0}}, [BM25])
    with EmbeddedStore(tmp_path / "empty") as empty, pytest.raises(EvaluationInputError, match="none of the 1"):
        relevance.evaluate({"default": SearchTarget(store=empty, encoder=None)}, QUERIES, {"q1": {"d1": 1}}, [BM25])
    relevance.evaluate(target, QUERIES, {"q1": {"d1": 1, "d9": 2, "d8": 0}}, [BM25])
    assert "1 of 2 documents judged relevant are not in the store (e.g. 'd9'): every configuration misses them" \
        in caplog.text


@pytest.mark.parametrize(("measure", "message"), [
    ("AP", "measure AP has no cutoff: give one, e.g. AP@100"),  # was 0.0: scored on the top 10 only
    ("R", "measure R has no cutoff"),  # was an AssertionError from ir-measures
    ("Bpref", "measure Bpref takes no cutoff"),
    ("nDCG(foo=1)@10", r"measure nDCG\(foo=1\)@10: unsupported params found: \['foo'\]"),
    ("R@5.5", "measure R@5.5: invalid param cutoff=5.5"),
])
def test_a_measure_without_a_cutoff_or_with_a_bad_parameter_is_refused_naming_it(store, measure, message):
    with pytest.raises(EvaluationInputError, match=message):
        relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, QUERIES, {"q1": {"d1": 1}}, [BM25],
                           measures=[measure])


@pytest.mark.parametrize("measure", ["P@0", "nDCG@0", "R(rel=2)@0"])
def test_a_cutoff_of_zero_is_refused_naming_the_measure_before_any_search(measure):
    # pytrec_eval aborted the process on it (SIGABRT, "Negative cutoff detected"), after every configuration ran.
    with pytest.raises(EvaluationInputError, match=rf"measure {re.escape(measure)}: the cutoff must be at least 1, got 0"):
        relevance.ranking_depth(["nDCG@10", measure])


@pytest.mark.parametrize(("measure", "message"), [
    ("P(rel=0)@10", "relevance_level should be positive"),  # was pytrec_eval's TypeError after every search
    ("alpha_nDCG@10", r"Unsupported measures .*pyndeval"),  # was ir-measures' ValueError after every search
])
def test_a_measure_no_installed_provider_computes_as_written_is_refused_naming_it_before_any_search(measure,
                                                                                                    message):
    with pytest.raises(EvaluationInputError, match=rf"measure {re.escape(measure)}: ir-measures cannot compute it "
                                                   rf"here: .*{message}"):
        relevance.ranking_depth(["nDCG@10", measure])


def test_jsonl_judgments_read_the_same_as_trec(tmp_path, qrels_file):
    jsonl = tmp_path / "qrels.jsonl"
    jsonl.write_text("".join(json.dumps({"query_id": q, "doc_id": d, "relevance": int(g)}) + "\n"
                             for q, _, d, g in (line.split() for line in QRELS_TREC.splitlines())), encoding="utf-8")
    assert relevance.read_qrels(jsonl) == relevance.read_qrels(qrels_file) == {
        "q1": {"d2": 2, "d1": 1, "d4": 1}, "q2": {"d3": 1, "d9": 2}}


@pytest.mark.parametrize(("second_line", "message"), [
    ("q1 0 d2", "expected 4 fields \"qid iter docid relevance\" (TREC qrels), got 3: 'q1 0 d2'"),
    ("q1 0 d2 1 extra", "expected 4 fields \"qid iter docid relevance\" (TREC qrels), got 5: 'q1 0 d2 1 extra'"),
    ("q1 0 d2 1.5", "relevance '1.5' is not an integer grade"),
    ("q1 0 d1 0", "query 'q1' grades document 'd1' 0, line 1 grades it 2: keep one"),
    # pytrec_eval raised a SystemError over 2**31, and allocates a counter per grade up to the highest
    ("q1 0 d2 99999999999999999999", "grade 99999999999999999999 is outside -1000 to 1000"),
    ("q1 0 d2 100000000", "grade 100000000 is outside -1000 to 1000"),
    ("q1 0 d2 -1001", "grade -1001 is outside -1000 to 1000"),
])
def test_a_bad_trec_judgment_is_refused_naming_the_file_and_line(tmp_path, second_line, message):
    # Was "not TREC qrels: not enough values to unpack (expected 4, got 3)" with no line; a document graded
    # twice was read as its last grade.
    path = tmp_path / "qrels.txt"
    path.write_text(f"q1 0 d1 2\n{second_line}\n", encoding="utf-8")
    with pytest.raises(EvaluationInputError) as refused:
        relevance.read_qrels(path)
    assert str(refused.value) == f"{path}:2: {message}"


def test_a_document_graded_twice_alike_and_one_graded_twice_apart_in_jsonl(tmp_path):
    path = tmp_path / "qrels.jsonl"
    rows = [("q1", "d1", 1), ("q1", "d1", 1), ("q2", "d1", 2), ("q1", "d1", 2)]
    path.write_text("".join(json.dumps({"query_id": q, "doc_id": d, "relevance": g}) + "\n" for q, d, g in rows[:3]),
                    encoding="utf-8")
    assert relevance.read_qrels(path) == {"q1": {"d1": 1}, "q2": {"d1": 2}}
    path.write_text("".join(json.dumps({"query_id": q, "doc_id": d, "relevance": g}) + "\n" for q, d, g in rows),
                    encoding="utf-8")
    with pytest.raises(EvaluationInputError, match=r"qrels.jsonl:4: query 'q1' grades document 'd1' 2, line 1 "
                                                    r"grades it 1: keep one"):
        relevance.read_qrels(path)


@pytest.mark.parametrize(("query_id", "doc_id"), [("q1", None), ("q1", ""), ("q1", " "), (["q1"], "d1"), (True, "d1")])
def test_a_jsonl_judgment_whose_ids_are_not_strings_or_integers_is_refused_naming_the_line(tmp_path, query_id,
                                                                                           doc_id):
    # Were read as the ids str() made of them: document "None" or "", query "['q1']" or "True".
    path = tmp_path / "qrels.jsonl"
    path.write_text(json.dumps({"query_id": "q0", "doc_id": "d1", "relevance": 1}) + "\n"
                    + json.dumps({"query_id": query_id, "doc_id": doc_id, "relevance": 1}) + "\n", encoding="utf-8")
    with pytest.raises(EvaluationInputError, match=r"qrels.jsonl:2: \"query_id\" and \"doc_id\" must be non-blank "
                                                   r"strings \(or integers\), got "):
        relevance.read_qrels(path)


def test_a_query_id_that_is_blank_or_not_a_string_or_integer_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "queries.jsonl"
    for query_id in ("", " ", None, True, ["q1"]):
        path.write_text(json.dumps({"id": query_id, "text": "red"}) + "\n", encoding="utf-8")
        with pytest.raises(EvaluationInputError, match=r"queries.jsonl:1: each line needs an \"id\" \(string\)"):
            relevance.read_queries(path)
    path.write_text('{"id": 7, "text": "red"}\n', encoding="utf-8")
    assert relevance.read_queries(path)[0].id == "7"


@pytest.mark.parametrize("category", [None, 5, ["a"]])
def test_a_query_category_that_is_not_a_string_is_refused_naming_the_line_not_reported_as_a_group(tmp_path, category):
    path = tmp_path / "queries.jsonl"  # null was the group "None" in every table, 5 the group "5"
    path.write_text(json.dumps({"id": "q1", "text": "red", "category": category}) + "\n", encoding="utf-8")
    with pytest.raises(EvaluationInputError, match=r"queries.jsonl:1: \"category\" must be a string, got "):
        relevance.read_queries(path)


def test_query_file_errors_name_the_line(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text('{"id": "q1", "text": "red"}\n{"id": "q2"}\n', encoding="utf-8")
    with pytest.raises(EvaluationInputError, match=r"queries.jsonl:2: query 'q2' has neither"):
        relevance.read_queries(path)
    path.write_text('{"id": "q1", "image": "missing.jpg"}\n', encoding="utf-8")
    with pytest.raises(EvaluationInputError, match="missing.jpg does not exist"):
        relevance.read_queries(path)


def test_query_judgment_and_configuration_files_beginning_with_a_utf8_bom_read_as_without_it(tmp_path, qrels_file):
    # The BOM was part of the first TREC query id ("\ufeffq1" judged no query) and no JSON line or file parsed.
    trec = tmp_path / "bom.txt"
    trec.write_bytes(b"\xef\xbb\xbf" + qrels_file.read_bytes())
    assert relevance.read_qrels(trec) == relevance.read_qrels(qrels_file)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"query_id": "q1", "doc_id": "d1", "relevance": 1}).encode())
    assert relevance.read_qrels(jsonl) == {"q1": {"d1": 1}}
    queries = tmp_path / "queries.jsonl"
    queries.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "q1", "text": "red"}).encode())
    assert relevance.read_queries(queries)[0].id == "q1"
    config = tmp_path / "config.json"
    config.write_bytes(b"\xef\xbb\xbf{}")
    assert relevance.read_input_text(config) == "{}"


def test_query_and_judgment_files_that_are_not_utf8_are_refused_naming_them(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("q1 0 caf\u00e9 1\n".encode("latin-1"))  # was a UnicodeDecodeError traceback
    for read in (relevance.read_queries, relevance.read_qrels):
        with pytest.raises(EvaluationInputError, match=r"latin1.txt: not UTF-8 text \(byte 0xe9 at offset 8\)"):
            read(path)


def test_a_query_image_that_is_no_image_is_refused_naming_the_query_and_the_file(store, encoder, tmp_path):
    # Was an ImageDecodeError traceback out of `clip-sidecar eval`, after the model loaded.
    (tmp_path / "notes.jpg").write_bytes(b"not an image")
    queries = [Query(id="qa", image=tmp_path / "notes.jpg")]
    with pytest.raises(EvaluationInputError, match=r"query 'qa': image .*notes.jpg: not a recognised image format"):
        relevance.evaluate({"default": SearchTarget(store=store, encoder=encoder)}, queries, {"qa": {"d1": 1}},
                           [RunConfig(options=SearchOptions(mode="vector", rerank=False))])


def test_image_queries_resolve_relative_to_the_query_file(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"not read here")
    path = tmp_path / "queries.jsonl"
    path.write_text('{"id": "q1", "image": "photo.jpg", "category": "photo", "tags": ["t"]}\n', encoding="utf-8")
    assert relevance.read_queries(path) == [Query(id="q1", image=tmp_path / "photo.jpg", category="photo",
                                                  tags=("t",))]


def test_a_grid_expands_to_every_distinct_search():
    configs = relevance.parse_configs({"grid": {"mode": ["vector", "bm25", "hybrid"], "fusion": ["minmax", "rrf"],
                                                "rerank": [False]}})
    # Fusion means nothing to vector or bm25 without the rerank: 1 + 1 + 2 searches, not 6.
    assert [c.name for c in configs] == ["vector N=100", "bm25 N=100", "hybrid minmax 0.5/0.5 N=100",
                                         "hybrid rrf 0.5/0.5 N=100"]


def test_configuration_errors_name_the_field():
    with pytest.raises(EvaluationInputError, match="unknown field.*colour"):
        relevance.parse_configs({"mode": "vector", "colour": "red"})
    with pytest.raises(EvaluationInputError, match="mode 'semantic'"):
        relevance.parse_configs({"mode": "semantic"})
    assert relevance.parse_configs({"weights": {"vector": 0.2, "bm25": 0.8}})[0].options.weights == (0.2, 0.8)


@pytest.mark.parametrize(("row", "message"), [
    ({"weights": 5}, "'weights' must be \\[vector, bm25\\]"),  # was a TypeError
    ({"weights": ["a", 1]}, "'weights' must be numbers"),  # was a ValueError from float()
    ({"weights": {"vector": True}}, "'weights' must be numbers"),
    ({"candidates": "many"}, "'candidates' must be an integer, got 'many'"),  # was a ValueError from int()
    ({"candidates": None}, "'candidates' must be an integer, got None"),  # was a TypeError
    ({"exact": "false"}, "'exact' must be true or false, got 'false'"),  # was taken as true
    ({"rerank": 1}, "'rerank' must be true, false or null"),
    ({"ef_search": "16"}, "'ef_search' must be an integer or null"),
])
def test_a_configuration_value_of_the_wrong_type_is_refused_naming_the_key_and_the_configuration(row, message):
    with pytest.raises(EvaluationInputError, match=f"configuration {{'{next(iter(row))}'.*: {message}"):
        relevance.parse_configs({"grid": {key: [value] for key, value in row.items()}})
    with pytest.raises(EvaluationInputError, match=message):
        relevance.parse_configs([row])


def test_candidates_under_the_deepest_cutoff_are_refused_naming_the_field_not_run_deeper_under_their_name(store):
    # They ran as N=100 (the deepest cutoff) in a row named N=20: a flat candidates sweep on the plot.
    with pytest.raises(EvaluationInputError, match="'candidates' must be at least 100, the deepest cutoff.*got 20"):
        relevance.parse_configs({"candidates": 20}, k=100)
    with pytest.raises(EvaluationInputError, match="'candidates' must be at least 10, .*got 0"):
        relevance.parse_configs([{"mode": "vector", "candidates": 0}])  # ran as N=10
    shallow = RunConfig(options=SearchOptions(mode="bm25", rerank=False, candidates=20))
    with pytest.raises(EvaluationInputError, match="'bm25 N=20': 'candidates' must be at least 100"):
        relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, QUERIES, {"q1": {"d1": 1}},
                           [shallow], measures=["R@100"])


def test_an_ef_search_under_the_candidates_is_refused_naming_both_fields_not_run_at_n_under_its_name():
    # The store searches at least the N candidates wide: "vector N=100 ef=16" ran at efSearch 100.
    refused = "ef_search 16 is below candidates 100: the store searches at least candidates wide, so it would run at 100"
    with pytest.raises(EvaluationInputError, match=f"'vector N=100 ef=16': {refused}"):
        relevance.parse_configs({"mode": "vector", "rerank": False, "ef_search": 16})
    with pytest.raises(EvaluationInputError, match=refused):
        relevance.parse_configs({"grid": {"mode": ["hybrid"], "ef_search": [128, 16]}})
    with pytest.raises(EvaluationInputError, match=refused):  # the benchmark's configurations are checked too
        RunConfig(options=SearchOptions(mode="vector", ef_search=16))
    # Where ef_search means nothing (exact search, BM25) or reaches N, it runs as named.
    assert [c.name for c in relevance.parse_configs({"grid": {"mode": ["vector"], "rerank": [False],
                                                              "ef_search": [10, 40], "candidates": [10]}})] == \
        ["vector N=10 ef=10", "vector N=10 ef=40"]
    assert len(relevance.parse_configs([{"mode": "bm25", "ef_search": 16}, {"exact": True, "ef_search": 16}])) == 2


def test_configurations_naming_no_candidates_rank_as_deep_as_the_deepest_cutoff_and_say_so():
    assert [c.name for c in relevance.parse_configs({"mode": "bm25"}, k=100, candidates=30)] == ["bm25 N=100"]
    assert {c.options.candidates for c in relevance.default_configs(k=100, candidates=30)} == {100}
    assert [c.name for c in relevance.parse_configs({"mode": "bm25"}, k=10, candidates=30)] == ["bm25 N=30"]


def test_weights_as_an_object_refuse_a_misspelt_key_and_default_a_missing_one_as_the_search_api_does():
    # {"bm52": 0.5} ran as weights 0.5/0 (vector alone, named "hybrid minmax 0.5/0"), a missing key as 0.
    with pytest.raises(EvaluationInputError, match="'weights' has unknown key\\(s\\) bm52; known: vector, bm25"):
        relevance.parse_configs({"mode": "hybrid", "weights": {"vector": 0.5, "bm52": 0.5}})
    assert relevance.parse_configs({"weights": {"vector": 0.7}})[0].options.weights == (0.7, SearchOptions().weights[1])


@pytest.mark.parametrize("weights", ["[NaN, 1]", "[1e308, 1]"])
def test_a_configuration_with_a_weight_that_is_not_finite_or_over_the_apis_ceiling_is_refused(weights):
    # JSON's NaN parses to a float: it ran as a row "hybrid minmax nan/1" of NaN scores; 1e308 made them infinite.
    with pytest.raises(EvaluationInputError, match=r"weights must be two numbers from 0 to 100 \(vector, bm25\)"):
        relevance.parse_configs(json.loads(f'{{"weights": {weights}}}'))


def test_a_mode_that_needs_text_refuses_image_only_queries(store, tmp_path):
    (tmp_path / "p.jpg").write_bytes(b"x")
    queries = [Query(id="q1", image=tmp_path / "p.jpg")]
    with pytest.raises(EvaluationInputError, match="mode bm25 needs query text"):
        relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, queries, {"q1": {"d1": 1}}, [BM25])


def test_a_vector_configuration_on_a_target_without_a_model_is_refused(store):
    vector = RunConfig(options=SearchOptions(mode="vector"))
    with pytest.raises(EvaluationInputError, match="has no model"):
        relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, QUERIES, {"q1": {"d1": 1}}, [vector])


def test_report_writes_json_markdown_plots_and_one_self_contained_html(store, qrels_file, tmp_path):
    configs = [BM25, *(RunConfig(options=SearchOptions(mode="bm25", rerank=False, candidates=n)) for n in (20, 50))]
    evaluation = relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, QUERIES,
                                    relevance.read_qrels(qrels_file), configs)
    evaluation.default = BM25.name
    files = write_report(evaluation, tmp_path / "report", title="hand-made")
    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert [r["name"] for r in data["results"]] == [c.name for c in configs]
    assert data["default_gaps"]["all"]["gap_points"] == 0.0
    text = files.markdown.read_text(encoding="utf-8")
    assert "| configuration | nDCG@10 | MRR@10 | Recall@10 |" in text and "bm25 N=100" in text
    for plot in files.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = files.html.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(files.plots)
    assert "src=\"http" not in page and "<link" not in page
    # Configurations that differ only in N make one line of the quality-latency plot.
    assert [len(family) for family in sweeps(evaluation.results).values()] == [3]
    # `eval --ann` (or --prompts) into the folder after it: the judged run's page and plots stood beside its results
    # as if they were this run's.
    write_results_only(tmp_path / "report", {"results": []}, "# The ANN index against exact search\n")
    assert sorted(path.name for path in (tmp_path / "report").iterdir()) == ["results.json", "results.md"]


def test_the_quality_latency_plot_names_every_configuration_and_the_machine(store, qrels_file):
    from sidecar.retrieval.report import quality_latency_figure

    # Each point was a grey dot with no name but the best one's, and the title named no machine.
    configs = [BM25, RunConfig(options=SearchOptions(mode="bm25", rerank=True, weights=(0.3, 0.7)))]
    evaluation = relevance.evaluate({"default": SearchTarget(store=store, encoder=None)}, QUERIES,
                                    relevance.read_qrels(qrels_file), configs)
    evaluation.info["machine"] = "Test CPU, 2 cores"
    axes = quality_latency_figure(evaluation).axes[0]
    assert {text.get_text() for text in axes.texts} == {c.name for c in configs}
    assert "Test CPU, 2 cores" in axes.get_title()


def test_labels_read_as_the_field_names_them():
    assert [label(m) for m in ("nDCG@10", "RR(rel=2)@10", "R@100")] == ["nDCG@10", "MRR@10", "Recall@100"]


def test_two_measures_that_differ_only_in_their_grade_keep_it_in_their_labels_and_other_parameters_always():
    # Both read Recall@10 (two columns, 0.200 and 0.600, of the same name); judged_only vanished.
    measures = ["R@10", "R(rel=2)@10", "nDCG(judged_only=True)@10"]
    assert [label(m, among=measures) for m in measures] == ["Recall@10", "Recall(rel=2)@10",
                                                            "nDCG(judged_only=True)@10"]


def test_err_over_grades_above_four_is_refused_before_any_search_and_other_measures_take_them():
    # gdeval (ERR, nDCG(dcg="exp-log2")) stopped at a grade of 5 with "format error on line 1" of a temporary
    # file, in a traceback after every configuration had run.
    queries = [Query(id="q1", text="red circle")]
    configs = [RunConfig(name="vector", options=SearchOptions(mode="vector"))]
    with pytest.raises(EvaluationInputError, match=r"measure ERR@10 is computed by gdeval, which takes grades up to "
                                                   r"4, and the judgments grade up to 5"):
        check_configs(configs, queries, {"q1": {"d1": 5}}, measures=["nDCG@10", "ERR@10"])
    check_configs(configs, queries, {"q1": {"d1": 5}}, measures=["nDCG@10", "RR@10"])
    check_configs(configs, queries, {"q1": {"d1": 4}}, measures=["ERR@10"])
