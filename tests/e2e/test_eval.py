"""`clip-sidecar eval`: judged queries against the store, the built-in benchmark, and the choice between them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.stores.embedded import EmbeddedStore

CONCEPTS = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"))


@pytest.fixture
def judged(corpus, tmp_path):
    """Colour + shape queries over the session corpus, judged from its metadata: 2 = both match, 1 = the shape."""
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    queries, qrels = [], []
    for number, (colour, shape) in enumerate(CONCEPTS):
        queries.append({"id": f"q{number}", "text": f"{colour} {shape}", "category": "concept"})
        for row in rows:
            meta = row["metadata"]
            grade = 2 if (meta["color"], meta["shape"]) == (colour, shape) else 1 if meta["shape"] == shape else 0
            if grade:
                qrels.append(f"q{number} 0 {row['id']} {grade}")
    queries_path, qrels_path = tmp_path / "queries.jsonl", tmp_path / "qrels.txt"
    queries_path.write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    qrels_path.write_text("\n".join(qrels) + "\n", encoding="utf-8")
    return queries_path, qrels_path


def test_eval_with_judged_queries_writes_the_report_and_ranks_the_concepts_first(store_path, judged, tmp_path):
    queries, qrels = judged
    out = tmp_path / "report"
    configs = json.dumps({"grid": {"mode": ["vector", "bm25"], "rerank": [False]}})
    result = CliRunner().invoke(main, ["-q", "eval", "--queries", str(queries), "--qrels", str(qrels),
                                       "--store-path", str(store_path), "--config", configs, "--relevant-grade", "2",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| configuration | nDCG@10 | MRR@10 | Recall@10 |" in result.output
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    metrics = {r["name"]: r["metrics"] for r in report["results"]}
    assert set(metrics) == {"vector N=100", "bm25 N=100"}
    # The tiny model knows colours and shapes: a colour + shape query puts the concept first.
    assert metrics["vector N=100"]["RR(rel=2)@10"] == 1.0
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "metrics.png", "quality-latency.png",
                                              "report.html"}


def test_configurations_that_name_no_candidates_take_the_rerank_candidates_setting(store_path, judged, tmp_path):
    queries, qrels = judged
    configs = json.dumps([{"mode": "vector", "rerank": False}, {"mode": "bm25", "rerank": False, "candidates": 50}])
    result = CliRunner().invoke(main, ["-q", "eval", "--queries", str(queries), "--qrels", str(qrels),
                                       "--store-path", str(store_path), "--config", configs,
                                       "--out", str(tmp_path / "report")], env={"SIDECAR_RERANK_CANDIDATES": "30"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "results.json").read_text(encoding="utf-8"))
    assert {r["name"] for r in report["results"]} == {"vector N=30", "bm25 N=50"}


def test_a_rerank_skipped_for_want_of_a_fine_model_is_noted_in_the_terminal_markdown_and_html(store_path, judged,
                                                                                               tmp_path, monkeypatch):
    monkeypatch.delenv("SIDECAR_FINE_MODEL", raising=False)
    queries, qrels = judged
    out = tmp_path / "report"
    configs = json.dumps({"grid": {"mode": ["vector"], "rerank": [True, False]}})
    result = CliRunner().invoke(main, ["-q", "eval", "--queries", str(queries), "--qrels", str(qrels),
                                       "--store-path", str(store_path), "--config", configs, "--out", str(out)])
    assert result.exit_code == 0, result.output
    note = "rerank skipped for 4 of 4 queries: no fine model is configured"
    # The row's name still says +rerank: it points to the note, which every output carries.
    assert "| vector +rerank N=100 (see notes) |" in result.output and "| vector N=100 |" in result.output
    assert f"| vector +rerank N=100 | {note}" in result.output
    assert f"| vector +rerank N=100 | {note}" in (out / "results.md").read_text(encoding="utf-8")
    assert f"<td>vector +rerank N=100</td><td>{note}" in (out / "report.html").read_text(encoding="utf-8")


def test_eval_needs_exactly_one_of_benchmark_judged_queries_ann_or_prompts(judged):
    runner = CliRunner()
    result = runner.invoke(main, ["eval"])
    assert result.exit_code == 2
    assert "choose one of --benchmark, --queries with --qrels, --ann, or --prompts with --labels" in result.output
    result = runner.invoke(main, ["eval", "--ann", "--queries", str(judged[0])])
    assert result.exit_code == 2 and "(got --queries/--qrels, --ann)" in result.output
    result = runner.invoke(main, ["eval", "--queries", str(judged[0])])
    assert result.exit_code == 2 and "--queries and --qrels go together" in result.output
    # Another way's flag was ignored without a word.
    for args, message in ((["--queries", str(judged[0]), "--qrels", str(judged[1]), "--samples", "5"],
                           "--samples goes with --ann only (this run is --queries/--qrels)"),
                          (["--ann", "-k", "5", "--items", "300"],
                           "--items goes with --benchmark only (this run is --ann)"),
                          (["--benchmark", "-k", "5"], "--k goes with --ann only (this run is --benchmark)"),
                          (["--ann", "--label-field", "shape"],
                           "--label-field goes with --prompts/--labels only (this run is --ann)")):
        result = runner.invoke(main, ["eval", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def eval_judged(store_path: Path, judged: tuple[Path, Path], *args: str):
    """`clip-sidecar eval` of the judged queries on `store_path`, with more arguments."""
    queries, qrels = judged
    return CliRunner().invoke(main, ["eval", "--queries", str(queries), "--qrels", str(qrels), "--store-path",
                                     str(store_path), *args])


def test_a_bad_qrels_line_is_a_usage_error_in_one_line_naming_the_file_and_line(store_path, judged, tmp_path):
    queries, _ = judged
    qrels = tmp_path / "bad-qrels.txt"
    qrels.write_text("q0 0 item-000001 1\nq0 0 item-000002\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["-q", "eval", "--queries", str(queries), "--qrels", str(qrels), "--store-path",
                                       str(store_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {qrels}:2: expected 4 fields \"qid iter docid relevance\" (TREC qrels), got 3: "
                      "'q0 0 item-000002'"], result.output


def test_a_bad_configuration_is_a_usage_error_naming_the_field(store_path, judged):
    result = eval_judged(store_path, judged, "--config", '{"mode": "vector", "colour": "red"}')
    assert result.exit_code == 2 and "unknown field(s) colour" in result.output


def test_candidates_under_a_measures_cutoff_are_a_usage_error_naming_the_field(store_path, judged, tmp_path):
    # With R@100 this row ran 100 deep, reported as N=50.
    result = eval_judged(store_path, judged, "--measure", "R@100", "--config", '{"mode": "vector", "candidates": 50}',
                         "--out", str(tmp_path / "report"))
    assert result.exit_code == 2 and "'candidates' must be at least 100, the deepest cutoff" in result.output


def test_an_ef_search_under_the_candidates_is_a_usage_error_naming_both_fields(store_path, judged, tmp_path):
    # It ran at efSearch = candidates (the store searches at least that wide), reported as ef=16.
    result = eval_judged(store_path, judged, "--config", '{"mode": "vector", "ef_search": 16, "candidates": 50}',
                         "--out", str(tmp_path / "report"))
    assert result.exit_code == 2, result.output
    assert "ef_search 16 is below candidates 50: the store searches at least candidates wide, so it would run at 50" \
        in result.output
    assert not (tmp_path / "report").exists()


def test_an_image_only_query_in_a_hybrid_grid_is_refused_before_the_model_loads_saying_how_to_evaluate_it(
        store_path, judged, corpus, tmp_path, monkeypatch):
    # The search refuses hybrid and bm25 without text, and a configuration over fewer queries than the
    # others would not compare with them: refused, as before, but after the model loaded and without saying
    # how to evaluate such queries.
    def load_encoder(*_, **__):
        raise AssertionError("the model was loaded before the configurations were checked")

    monkeypatch.setattr("sidecar.model.encoder.load_encoder", load_encoder)
    queries_path, qrels_path = judged
    image = corpus.parent / "item-000000.jpg"
    with queries_path.open("a", encoding="utf-8") as queries:
        queries.write(json.dumps({"id": "by-image", "image": str(image)}) + "\n")
    with qrels_path.open("a", encoding="utf-8") as qrels:
        qrels.write("by-image 0 item-000000 2\n")
    result = eval_judged(store_path, judged, "--config", '{"grid": {"mode": ["vector", "hybrid"]}}',
                         "--out", str(tmp_path / "report"))
    assert result.exit_code == 2, result.output
    assert ("mode hybrid needs query text, and 1 queries (e.g. by-image) have an image only. Evaluate those in a "
            "queries file of their own with vector configurations only (--config '{\"mode\": \"vector\"}'") in \
        " ".join(result.output.split())


def test_a_configuration_file_that_is_not_utf8_is_a_usage_error_naming_it(store_path, judged, tmp_path):
    config = tmp_path / "configs.json"
    config.write_bytes('{"name": "caf\u00e9"}'.encode("latin-1"))
    result = eval_judged(store_path, judged, "--config", str(config))
    assert result.exit_code == 2 and "configs.json: not UTF-8 text (byte 0xe9" in result.output


def test_an_empty_configuration_list_is_refused_not_run_as_the_defaults(store_path, judged):
    result = eval_judged(store_path, judged, "--config", "[]")
    assert result.exit_code == 2 and "no configurations: the list is empty" in result.output


def test_relevant_grade_with_measures_is_refused_not_ignored(store_path, judged):
    result = eval_judged(store_path, judged, "--measure", "RR@10", "--relevant-grade", "2")
    assert result.exit_code == 2 and "write the grade in each measure instead, e.g. RR(rel=2)@10" in result.output


def test_ann_validation_writes_its_report_where_out_is_given(store_path, tmp_path):
    out = tmp_path / "ann"
    result = CliRunner().invoke(main, ["-q", "eval", "--ann", "--store-path", str(store_path), "--samples", "20",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert report["results"]["k"] == 10 and report["results"]["queries"] == 20
    assert 0.0 <= report["results"]["recall"] <= 1.0 and set(report["results"]["ann_ms"]) == {"p50", "p95"}
    assert "Recall@10 (HNSW vs exact) over 20 queries" in (out / "results.md").read_text(encoding="utf-8")
    assert f"Report: {out / 'results.md'}, {out / 'results.json'}" in result.output


def test_ann_validation_takes_k_up_to_max_k_and_refuses_one_over_it_naming_the_setting(store_path, monkeypatch):
    # max_k under the default K: no -k given is none to refuse ("'--k': 10 is over 3"); K is max_k.
    lower = CliRunner().invoke(main, ["-q", "eval", "--ann", "--store-path", str(store_path), "--samples", "2"],
                               env={"SIDECAR_MAX_K": "3", "SIDECAR_RERANK_CANDIDATES": "3"})
    assert lower.exit_code == 0 and "Recall@3" in lower.output, lower.output
    monkeypatch.setenv("SIDECAR_MAX_K", "1500")
    deep = CliRunner().invoke(main, ["-q", "eval", "--ann", "--store-path", str(store_path), "--samples", "2",
                                     "-k", "1200"])
    assert deep.exit_code == 0, deep.output
    assert "Recall@1200" in deep.output
    over = CliRunner().invoke(main, ["-q", "eval", "--ann", "--store-path", str(store_path), "-k", "1501"])
    assert over.exit_code == 2 and "'--k': 1501 is over 1500, the most hits a search ranks (max_k: SIDECAR_MAX_K)" \
        in over.output


def test_ann_validation_searches_as_deep_as_searches_do_and_reports_the_efsearch_they_run_at(store_path):
    # Searches ask for the N candidates (200 here) and run at efSearch max(ef_search, N): 200, not the store's 128.
    result = CliRunner().invoke(main, ["-q", "eval", "--ann", "--store-path", str(store_path), "--samples", "10"],
                                env={"SIDECAR_RERANK_CANDIDATES": "200"})
    assert result.exit_code == 0, result.output
    assert "at efSearch 200" in result.output and "200 deep" in result.output, result.output


def test_ann_validation_shows_progress_through_its_exact_searches_unless_quiet(store_path):
    args = ["eval", "--ann", "--store-path", str(store_path), "--samples", "10"]
    assert "exact search (the truth)" in CliRunner().invoke(main, args).stderr
    assert "exact search (the truth)" not in CliRunner().invoke(main, ["-q", *args]).stderr


def test_ann_validation_of_an_empty_store_is_an_error_saying_so(tmp_path):
    EmbeddedStore(tmp_path / "store").close()  # a store, with nothing in it
    result = CliRunner().invoke(main, ["-q", "eval", "--ann", "--store-path", str(tmp_path / "store")])
    # Click's own error line, not a ValueError traceback.
    assert result.exit_code == 1 and "Error: the store is empty: index something first" in result.output


def test_eval_refuses_another_models_store_unless_every_configuration_is_bm25(judged, tmp_path):
    from sidecar.types import Document, ModelSignature

    queries, qrels = judged
    path = tmp_path / "other-store"
    with EmbeddedStore(path) as store:  # the tiny model's size, another model: only the record tells them apart
        store.claim(ModelSignature(model="other-clip", weights="other-weights", dim=64))
        judged_id = qrels.read_text(encoding="utf-8").split()[2]  # a judged document: qrels the store lacks are refused
        store.upsert([Document(id=judged_id, vector=np.eye(64, dtype=np.float32)[0], text="red circle")])

    def run(*modes: str):
        return CliRunner().invoke(main, ["-q", "eval", "--queries", str(queries), "--qrels", str(qrels),
                                         "--store-path", str(path), "--out", str(tmp_path / "report"), "--config",
                                         json.dumps({"grid": {"mode": list(modes), "rerank": [False]}})])
    refused = run("vector", "bm25")
    assert refused.exit_code == 1 and "store holds vectors of other-clip (weights other-weights" in refused.output
    assert run("bm25").exit_code == 0


def test_search_and_eval_refuse_a_store_path_that_holds_no_store_and_create_none(tmp_path):
    mistyped = tmp_path / "mistyped"
    for args in (["search", "red circle"], ["eval", "--ann"]):
        result = CliRunner().invoke(main, ["-q", *args, "--store-path", str(mistyped)])
        assert result.exit_code == 1 and f"no embedded store at {mistyped}" in result.output, result.output
    assert not mistyped.exists()


# `eval --benchmark`'s catalogue step rewriting a catalogue of other parameters, killed (SIGKILL) at `window`.
_KILLED_CATALOGUE = """
import os, signal, sys
from pathlib import Path
import sidecar.model.catalogue as catalogue
from sidecar.cli.benchmark import _catalogue

window = sys.argv[2]
real = getattr(catalogue, window)

def killed(*args, **kwargs):
    if window == "make_queries":  # the new corpus and manifest in place, the old queries and qrels still there
        os.kill(os.getpid(), signal.SIGKILL)
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # write_catalogue: every file written, the parameters not yet

setattr(catalogue, window, killed)
_catalogue(Path(sys.argv[1]), items=60, queries_per_category=2, seed=0, progress=False, echo=print)
"""


@pytest.mark.parametrize("window", ["make_queries", "write_catalogue"])
def test_a_catalogue_rewrite_killed_midway_is_rendered_again_not_reused_under_the_old_parameters(tmp_path, window):
    from sidecar.cli.benchmark import _catalogue

    folder = tmp_path / "catalogue"
    echoed: list[str] = []
    _catalogue(folder, items=40, queries_per_category=2, seed=0, progress=False, echo=echoed.append)
    killed = subprocess.run([sys.executable, "-c", _KILLED_CATALOGUE, str(folder), window], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9 and "rendering a 60-product catalogue" in killed.stdout, killed.stderr
    files = _catalogue(folder, items=40, queries_per_category=2, seed=0, progress=False, echo=echoed.append)
    assert "rendering a 40-product catalogue" in echoed[-1], echoed
    assert len(files.manifest.read_text(encoding="utf-8").splitlines()) == 40
    _catalogue(folder, items=40, queries_per_category=2, seed=0, progress=False, echo=echoed.append)
    assert "catalogue: reusing" in echoed[-1]  # a complete rewrite is stamped and reused


@pytest.mark.slow
def test_benchmark_runs_from_nothing_to_a_report(tmp_path, fine_encoder):
    # The whole path a user runs: both tiny models (trained once into the test cache), the catalogue,
    # embed and index per model, every standard configuration, the report. A small catalogue keeps it short.
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", "eval", "--benchmark", "--items", "300",
                             "--workdir", str(tmp_path / "bench"), "--out", str(out)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr
    assert "against the best configuration" in result.stdout
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert report["groups"].keys() == {"text-heavy", "image-heavy", "mixed", "out-of-distribution"}
    assert report["default"] in {r["name"] for r in report["results"]}
    assert "report.html" in result.stdout and (out / "report.html").is_file()


def test_configurations_over_what_the_api_takes_are_refused_naming_them_before_the_model_loads(
        store_path, judged, tmp_path, monkeypatch):
    # They ran after the model load, measuring searches that this server's /v1/search refuses.
    def load_encoder(*_, **__):
        raise AssertionError("the model was loaded before the configurations were checked")

    monkeypatch.setattr("sidecar.model.encoder.load_encoder", load_encoder)
    limit = "the most hits a search ranks (max_k: SIDECAR_MAX_K)"
    vector = '{"mode": "vector", "rerank": false'
    refused = {
        (vector + ', "candidates": 1001}',): f"configuration 'vector N=1001': 'candidates': 1001 is over 1000, {limit}",
        (vector + ', "ef_search": 4097}',): "configuration 'vector N=100 ef=4097': 'ef_search': 4097 is over 4096, "
                                            "the widest HNSW search a query may ask for",
        (vector + "}", "--measure", "R@1001"): "configuration 'vector N=1001': the deepest cutoff of the measures: "
                                               f"1001 is over 1000, {limit}",
    }
    for (config, *more), message in refused.items():
        result = eval_judged(store_path, judged, "--config", config, *more, "--out", str(tmp_path / "report"))
        assert result.exit_code == 2 and message in result.output, (config, result.output)
    # max_k raised (with SIDECAR_MAX_K): the configuration is the setting's to allow, as for the API.
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["-q", "eval", "--queries", str(judged[0]), "--qrels", str(judged[1]),
                                       "--store-path", str(store_path), "--config",
                                       vector + ', "candidates": 1001}',
                                       "--out", str(tmp_path / "report")], env={"SIDECAR_MAX_K": "2000"})
    assert result.exit_code == 0, result.output
