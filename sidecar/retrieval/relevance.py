"""Relevance evaluation: judged queries × search configurations → nDCG@10, MRR@10, Recall@K and latency per stage.

Metrics come from ir-measures (pytrec_eval underneath), never from formulas of our own. A
configuration is any `SearchOptions` (mode × fusion × weights × rerank × exact/ANN × candidates ×
ef_search) run against a named target (a store and the model that encodes its queries), so
the same harness compares fusion weights on one store, or two models on two stores.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import ir_measures
import numpy as np
import torch
from tqdm import tqdm

from sidecar.errors import not_utf8
from sidecar.model.encoder import Encoder
from sidecar.model.images import ImageDecodeError
from sidecar.retrieval.evaluation import percentiles
from sidecar.retrieval.search import OverSearchLimit, SearchOptions, check_search_limits, query_vector, search
from sidecar.stores.base import Store, StoreQueryError
from sidecar.types import Filters

log = logging.getLogger(__name__)

# Per query: encode (the query's vectors), coarse, fetch (reading the documents shown), rerank (the fine stage,
# 0 where it did not run), search (coarse + fetch + rerank: what the store and the ranking cost, without the
# model) and total.
STAGES = ("encode", "coarse", "fetch", "rerank", "search", "total")
DEFAULT_CUTOFF = 10
FETCH_CHUNK = 1000  # judged documents looked up in the store per request
# pytrec_eval keeps a counter for every grade up to the highest (1e8: 800 MB per configuration) and takes a C int
# (over 2**31: a SystemError traceback). Grades are levels (TREC's 0 to 4), not scores.
MAX_GRADE = 1000
# gdeval, ir-measures' provider of ERR and nDCG(dcg="exp-log2"), stops at a higher grade ("format error on line 1"),
# once every configuration has run.
GDEVAL_MAX_GRADE = 4


class EvaluationInputError(ValueError):
    """A query file, judgment file or configuration the harness cannot use; the message says where."""


# ---- queries and judgments ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Query:
    id: str
    text: str | None = None
    image: Path | None = None
    category: str = ""  # e.g. text-heavy; metrics are also reported per category
    tags: tuple[str, ...] = ()  # e.g. out-of-distribution; metrics are also reported per tag
    filters: Filters | None = None  # metadata filters the query runs with, as /v1/search takes them


def read_input_text(path: Path) -> str:
    """A query, judgment or configuration file's text, which must be UTF-8. A leading BOM (Notepad's UTF-8) is
    dropped: it was part of the first query id of a TREC qrels file, whose judgments then matched no query."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EvaluationInputError(f"{path}: {not_utf8(exc)}; save it as UTF-8") from exc


def read_queries(path: Path | str) -> list[Query]:
    """JSONL, one query a line: {"id", "text"?, "image"? (a file, relative to this file), "category"?, "tags"?,
    "filters"? (metadata field -> value or list of values, as /v1/search takes them)}."""
    path = Path(path)
    queries: list[Query] = []
    seen: set[str] = set()
    for number, line in enumerate(read_input_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationInputError(f"{where}: not JSON ({exc.msg})") from exc
        query_id = _an_id(row.get("id")) if isinstance(row, dict) else None
        if query_id is None:
            raise EvaluationInputError(f"{where}: each line needs an \"id\" (string)")
        if query_id in seen:
            raise EvaluationInputError(f"{where}: query id {query_id!r} appears twice")
        seen.add(query_id)
        text = row.get("text")
        image = row.get("image")
        if text is not None and not isinstance(text, str) or image is not None and not isinstance(image, str):
            raise EvaluationInputError(f"{where}: \"text\" and \"image\" must be strings")
        if not (text and text.strip()) and not image:
            raise EvaluationInputError(f"{where}: query {query_id!r} has neither \"text\" nor \"image\"")
        image_path = (path.parent / image) if image else None
        if image_path is not None and not image_path.is_file():
            raise EvaluationInputError(f"{where}: image {image_path} does not exist")
        category = row.get("category", "")
        if not isinstance(category, str):  # str() made a group "None" of null
            raise EvaluationInputError(f"{where}: \"category\" must be a string, got {category!r}")
        tags = row.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise EvaluationInputError(f"{where}: \"tags\" must be a list of strings")
        filters = row.get("filters")
        if filters is not None and not _is_filters(filters):
            raise EvaluationInputError(f"{where}: \"filters\" must be an object of metadata field -> a string, number "
                                       "or boolean, or a non-empty list of them")
        queries.append(Query(id=query_id, text=text, image=image_path, category=category,
                             tags=tuple(tags), filters=filters or None))
    if not queries:
        raise EvaluationInputError(f"{path}: no queries")
    return queries


def _an_id(value: Any) -> str | None:
    """A query or document id as a JSON line gives it: a non-blank string or an integer; else None (str() of
    null, a list or true would be an id nobody wrote)."""
    if isinstance(value, str) and value.strip() or isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _is_filters(value: Any) -> bool:
    def scalar(item: Any) -> bool:
        return isinstance(item, (str, int, float))  # bool is an int

    return isinstance(value, dict) and all(
        isinstance(name, str) and name and (scalar(wanted) or isinstance(wanted, list) and wanted
                                            and all(map(scalar, wanted)))
        for name, wanted in value.items())


def read_qrels(path: Path | str) -> dict[str, dict[str, int]]:
    """Graded judgments, query id -> {doc id: relevance}: TREC qrels ("qid iter docid rel" a line) or
    JSONL ({"query_id", "doc_id", "relevance"} a line), grades from -MAX_GRADE to MAX_GRADE. A document judged
    twice for one query with two grades is refused: which one the metrics use would be the file's order."""
    path = Path(path)
    lines = read_input_text(path).splitlines()
    jsonl = next((line for line in lines if line.strip()), "").lstrip().startswith("{")
    qrels: dict[str, dict[str, int]] = {}
    judged_on: dict[tuple[str, str], int] = {}  # (query id, doc id) -> the line that judged it
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        query_id, doc_id, relevance = _jsonl_judgment(line, where) if jsonl else _trec_judgment(line, where)
        if abs(relevance) > MAX_GRADE:
            raise EvaluationInputError(f"{where}: grade {relevance} is outside -{MAX_GRADE} to {MAX_GRADE}")
        grades = qrels.setdefault(query_id, {})
        if grades.get(doc_id, relevance) != relevance:
            raise EvaluationInputError(f"{where}: query {query_id!r} grades document {doc_id!r} {relevance}, line "
                                       f"{judged_on[query_id, doc_id]} grades it {grades[doc_id]}: keep one")
        grades[doc_id] = relevance
        judged_on.setdefault((query_id, doc_id), number)
    if not qrels:
        raise EvaluationInputError(f"{path}: no judgments")
    return qrels


def _trec_judgment(line: str, where: str) -> tuple[str, str, int]:
    fields = line.split()
    if len(fields) != 4:
        raise EvaluationInputError(f"{where}: expected 4 fields \"qid iter docid relevance\" (TREC qrels), got "
                                   f"{len(fields)}: {line.strip()[:80]!r}")
    try:
        relevance = int(fields[3])
    except ValueError:
        raise EvaluationInputError(f"{where}: relevance {fields[3]!r} is not an integer grade") from None
    return fields[0], fields[2], relevance


def _jsonl_judgment(line: str, where: str) -> tuple[str, str, int]:
    try:
        row = json.loads(line)
        query_id, doc_id, relevance = _an_id(row["query_id"]), _an_id(row["doc_id"]), row["relevance"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EvaluationInputError(f"{where}: expected {{\"query_id\", \"doc_id\", \"relevance\"}}: {exc}") from exc
    if query_id is None or doc_id is None:
        raise EvaluationInputError(f"{where}: \"query_id\" and \"doc_id\" must be non-blank strings (or integers), "
                                   f"got {row['query_id']!r} and {row['doc_id']!r}")
    if not isinstance(relevance, int) or isinstance(relevance, bool):
        raise EvaluationInputError(f"{where}: \"relevance\" must be an integer grade")
    return query_id, doc_id, relevance


# ---- configurations ------------------------------------------------------------------------------

# SearchOptions fields a configuration may set; k is the harness's (the deepest cutoff), filters each query's.
CONFIG_FIELDS = ("mode", "fusion", "weights", "rerank", "exact", "candidates", "ef_search")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One configuration to evaluate: search options, the target they run on, and a name for the report."""

    options: SearchOptions
    target: str = "default"
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", describe_options(self.options, target=self.target))
        options = self.options
        # The search asks the store for its N candidates, which it searches at least N wide (efSearch =
        # max(ef_search, N)): a lower ef_search would run, and be reported, as what it is not.
        if options.ef_search is not None and options.ef_search < options.candidates and not options.exact \
                and options.mode != "bm25":
            raise EvaluationInputError(f"configuration {self.name!r}: ef_search {options.ef_search} is below "
                                       f"candidates {options.candidates}: the store searches at least candidates "
                                       f"wide, so it would run at {options.candidates}")

    def parameters(self) -> dict[str, Any]:
        values = {name: getattr(self.options, name) for name in CONFIG_FIELDS}
        values["weights"] = list(values["weights"])
        return {"target": self.target, **values}


def describe_options(options: SearchOptions, *, target: str = "default") -> str:
    """A short, unique-enough label: "hybrid minmax 0.5/0.5 +rerank N=100"."""
    parts = [options.mode]
    if options.mode == "hybrid" or options.rerank and options.mode == "bm25":
        parts.append(f"{options.fusion} {options.weights[0]:g}/{options.weights[1]:g}")
    if options.rerank:
        parts.append("+rerank")
    if options.exact:
        parts.append("exact")
    parts.append(f"N={options.candidates}")
    if options.ef_search and not options.exact and options.mode != "bm25":
        parts.append(f"ef={options.ef_search}")
    if target != "default":
        parts.insert(0, f"[{target}]")
    return " ".join(parts)


def parse_configs(spec: Any, *, k: int = DEFAULT_CUTOFF, candidates: int = SearchOptions.candidates) -> list[RunConfig]:
    """Configurations from JSON: one object, a list of objects, or {"grid": {field: [values]}} (every
    combination). Objects hold SearchOptions fields (CONFIG_FIELDS) plus "name" and "target"; one that
    names no candidates gets `candidates` (the rerank_candidates setting, as a request would), or `k`
    (the ranking depth: `ranking_depth`) where that is deeper; one that names fewer than `k` is refused."""
    if isinstance(spec, dict) and "grid" in spec:
        grid = spec["grid"]
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise EvaluationInputError("\"grid\" must map each field to a non-empty list of values")
        names = list(grid)
        rows = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
        return dedupe([_config(row, k=k, candidates=candidates) for row in rows])
    rows = spec if isinstance(spec, list) else [spec]
    if not rows:
        raise EvaluationInputError("no configurations: the list is empty (leave out --config for the defaults)")
    return [_config(row, k=k, candidates=candidates) for row in rows]


# The JSON types of the fields whose values SearchOptions does not check (it compares mode and fusion
# with its choices, and weights' count and sum), and how a message names them.
_CONFIG_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "weights": ((list, dict), '[vector, bm25] or {"vector": ..., "bm25": ...}'),
    "rerank": ((bool, type(None)), "true, false or null (the mode's default)"),
    "exact": ((bool,), "true or false"),
    "candidates": ((int,), "an integer"),
    "ef_search": ((int, type(None)), "an integer or null (the store's setting)"),
}


def _is_a(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, except that JSON's true and false are not numbers."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _config(row: Any, *, k: int, candidates: int) -> RunConfig:
    if not isinstance(row, dict):
        raise EvaluationInputError(f"a configuration must be a JSON object, got {row!r}")
    unknown = set(row) - set(CONFIG_FIELDS) - {"name", "target"}
    if unknown:
        raise EvaluationInputError(f"configuration {row}: unknown field(s) {', '.join(sorted(unknown))}; "
                                   f"known: name, target, {', '.join(CONFIG_FIELDS)}")
    values = {key: value for key, value in row.items() if key in CONFIG_FIELDS}
    for key, value in values.items():
        expected = _CONFIG_TYPES.get(key)
        if expected and not _is_a(value, expected[0]):
            raise EvaluationInputError(f"configuration {row}: {key!r} must be {expected[1]}, got {value!r}")
    if "weights" in values:
        weights = values["weights"]
        if isinstance(weights, dict):  # as /v1/search reads it: a misspelt key is refused, a missing one the default
            unknown = set(weights) - {"vector", "bm25"}
            if unknown:
                raise EvaluationInputError(f"configuration {row}: 'weights' has unknown key(s) "
                                           f"{', '.join(sorted(map(str, unknown)))}; known: vector, bm25")
            weights = [weights.get(side, default) for side, default in zip(("vector", "bm25"), SearchOptions.weights)]
        if not all(_is_a(w, (int, float)) for w in weights):
            raise EvaluationInputError(f"configuration {row}: 'weights' must be numbers, got {values['weights']!r}")
        values["weights"] = tuple(float(w) for w in weights)
    if "candidates" not in values:
        values["candidates"] = max(candidates, k)
    elif values["candidates"] < k:  # a row named N=20 would have its ranks past 20 in coarse order
        raise EvaluationInputError(f"configuration {row}: 'candidates' must be at least {k}, the deepest cutoff "
                                   f"of the measures (each configuration ranks its top N only), got "
                                   f"{values['candidates']}")
    try:
        options = SearchOptions(k=k, **values)
    except (TypeError, ValueError) as exc:
        raise EvaluationInputError(f"configuration {row}: {exc}") from exc
    return RunConfig(options=options, target=str(row.get("target", "default")), name=str(row.get("name", "")))


def default_configs(*, k: int = DEFAULT_CUTOFF, candidates: int = SearchOptions.candidates) -> list[RunConfig]:
    """What `eval --queries` compares without --config: every mode, rerank on and off, and RRF, each
    with `candidates` (the rerank_candidates setting), or `k` (the ranking depth) where that is deeper."""
    base = SearchOptions(candidates=max(candidates, k))
    rows = [dict(mode="vector", rerank=False), dict(mode="vector"), dict(mode="bm25", rerank=False),
            dict(mode="bm25"), dict(), dict(rerank=False), dict(fusion="rrf", weights=(0.5, 0.5))]
    return dedupe(RunConfig(options=dataclasses.replace(base, **row)) for row in rows)


def dedupe(configs: Iterable[RunConfig]) -> list[RunConfig]:
    """Drop grid points that would run the same search: fusion and weights mean nothing to vector
    mode, nor to bm25 mode without the rerank; exact search has no ef_search."""
    defaults = SearchOptions()
    seen: dict[tuple, RunConfig] = {}
    for config in configs:
        options = config.options
        if options.mode == "vector" or options.mode == "bm25" and not options.rerank:
            options = dataclasses.replace(options, fusion=defaults.fusion, weights=defaults.weights)
        if options.exact or options.mode == "bm25":
            options = dataclasses.replace(options, ef_search=None)
        key = (config.target, options)
        if key not in seen:
            seen[key] = RunConfig(options=options, target=config.target, name=config.name)
    return list(seen.values())


# ---- running -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SearchTarget:
    """A store and the model that encodes queries for it (the model its vectors came from)."""

    store: Store
    encoder: Encoder | None  # None: BM25 without the rerank is all this target can run
    prompt_template: str = "{}"
    fine_encoder: Encoder | None = None  # the fine-ranking model, whose vectors the store holds beside each doc


@dataclass(slots=True)
class ConfigResult:
    config: RunConfig
    metrics: dict[str, float]  # measure -> mean over the judged queries
    by_group: dict[str, dict[str, float]]  # category or tag -> measure -> mean
    latency_ms: dict[str, tuple[float, float]]  # stage -> (p50, p95) per query
    per_query: dict[str, dict[str, float]]  # query id -> measure -> value
    notes: list[str] = field(default_factory=list)  # e.g. why a requested rerank was skipped

    def to_json(self) -> dict[str, Any]:
        return {"name": self.config.name, "parameters": self.config.parameters(), "metrics": self.metrics,
                "by_group": self.by_group, "notes": self.notes,
                "latency_ms": {stage: {"p50": p50, "p95": p95} for stage, (p50, p95) in self.latency_ms.items()},
                "per_query": self.per_query}


@dataclass(slots=True)
class Evaluation:
    measures: list[str]
    results: list[ConfigResult]
    queries: int  # judged queries evaluated
    groups: dict[str, int]  # group -> how many queries
    info: dict[str, Any] = field(default_factory=dict)  # targets, machine, date, command
    default: str | None = None  # the configuration users get without asking: compared with the best

    def to_json(self) -> dict[str, Any]:
        return {"measures": self.measures, "queries": self.queries, "groups": self.groups, "info": self.info,
                "default": self.default, "default_gaps": self.default_gaps() if self.default else None,
                "results": [result.to_json() for result in self.results]}

    def result(self, name: str) -> ConfigResult:
        found = [r for r in self.results if r.config.name == name]
        if not found:
            raise KeyError(f"no configuration named {name!r}")
        return found[0]

    def best(self, measure: str, *, group: str | None = None) -> ConfigResult:
        return max(self.results, key=lambda r: (r.by_group[group] if group else r.metrics)[measure])

    def default_gaps(self, measure: str | None = None) -> dict[str, dict[str, Any]]:
        """Per group (and "all"): the default configuration's value, the best one's, and the gap in points."""
        if self.default is None:
            raise ValueError("no default configuration named")
        measure = measure or self.measures[0]
        default = self.result(self.default)
        gaps = {}
        for group in ["all", *self.groups]:
            best = self.best(measure, group=None if group == "all" else group)
            value = (default.metrics if group == "all" else default.by_group[group])[measure]
            top = (best.metrics if group == "all" else best.by_group[group])[measure]
            gaps[group] = {"default": value, "best": top, "best_configuration": best.config.name,
                           "gap_points": round(100 * (top - value), 2)}
        return gaps


def standard_measures(*, relevant_grade: int = 1, recall_at: Sequence[int] = (DEFAULT_CUTOFF,)) -> list[str]:
    """nDCG@10 (graded gains), MRR@10 and Recall@K, where "relevant" means a grade >= relevant_grade."""
    rel = "" if relevant_grade <= 1 else f"(rel={relevant_grade})"
    return ["nDCG@10", f"RR{rel}@10", *(f"R{rel}@{k}" for k in recall_at)]


def ranking_depth(measures: Sequence[str]) -> int:
    """How deep each configuration ranks: the deepest cutoff of `measures`, at least DEFAULT_CUTOFF."""
    return max([DEFAULT_CUTOFF, *(m.params["cutoff"] for m in _parse_measures(measures))])


def _parse_measures(measures: Sequence[str]) -> list:
    """ir-measures objects for `measures`, each with a cutoff: every configuration ranks its top N only
    (N = the deepest cutoff), so a measure over the whole ranking (AP, nDCG, R without @K) is not defined."""
    try:
        parsed = [ir_measures.parse_measure(m) for m in measures]
    except (ValueError, NameError, SyntaxError) as exc:
        raise EvaluationInputError(f"unknown measure in {measures}: {exc} (ir-measures syntax, e.g. nDCG@10, "
                                   "RR(rel=2)@10, R@100)") from exc
    for text, measure in zip(measures, parsed):
        if "cutoff" not in measure.SUPPORTED_PARAMS:
            raise EvaluationInputError(f"measure {text} takes no cutoff: it scores the whole ranking, and each "
                                       "configuration ranks its top N only; use a measure with one, e.g. AP@100")
        if measure.params.get("cutoff") is None:
            raise EvaluationInputError(f"measure {text} has no cutoff: give one, e.g. {text}@100 (each "
                                       "configuration ranks its top N only, N the deepest cutoff)")
        try:
            measure.validate_params()  # ir-measures checks with assert: its message names the parameter
        except AssertionError as exc:
            raise EvaluationInputError(f"measure {text}: {exc}") from exc
        if measure.params["cutoff"] < 1:  # ir-measures lets it through; pytrec_eval aborts the process on it
            raise EvaluationInputError(f"measure {text}: the cutoff must be at least 1, got {measure.params['cutoff']}")
        # An installed provider must take it as written, asked now, not after every configuration has run:
        # none computes alpha_nDCG or RBP without an extra, and pytrec_eval refuses rel=0 (a TypeError).
        try:
            ir_measures.evaluator([measure], [])
        except (ValueError, TypeError) as exc:
            raise EvaluationInputError(f"measure {text}: ir-measures cannot compute it here: "
                                       + " ".join(str(exc).split())) from exc
    return parsed


def check_configs(configs: Sequence[RunConfig], queries: Sequence[Query], qrels: Mapping[str, Mapping[str, int]],
                  *, measures: Sequence[str], max_k: int | None = None) -> None:
    """EvaluationInputError where a measure cannot be computed on these judgments, a configuration cannot run over
    every judged query, or, given the max_k setting, asks for more than /v1/search takes (check_search_limits): it would measure a search no request
    can make. `eval` asks before it loads a model; the built-in benchmark's fixed configurations measure the
    project, not one server's limits. A mode with BM25 needs each query's text (the search refuses an image
    alone), and one configuration over fewer queries than the others would not compare with them."""
    depth = ranking_depth(measures)
    top = max((grade for grades in qrels.values() for grade in grades.values()), default=0)
    for text, measure in zip(measures, _parse_measures(measures)):
        provider = next(p.NAME for p in ir_measures.DefaultPipeline.providers if p.supports(measure))
        if provider == "gdeval" and top > GDEVAL_MAX_GRADE:
            raise EvaluationInputError(f"measure {text} is computed by gdeval, which takes grades up to "
                                       f"{GDEVAL_MAX_GRADE}, and the judgments grade up to {top}: map the grades "
                                       f"onto 0-{GDEVAL_MAX_GRADE}, or leave {text} out")
    imageonly = [q.id for q in queries if qrels.get(q.id) and not (q.text and q.text.strip())]
    for config in configs:
        if config.options.candidates < depth:  # it would rank `depth` deep under its own name's N
            raise EvaluationInputError(f"configuration {config.name!r}: 'candidates' must be at least {depth}, the "
                                       f"deepest cutoff of the measures, got {config.options.candidates}")
        if max_k is not None:
            try:
                check_search_limits(config.options, max_k=max_k)
            except OverSearchLimit as exc:  # k is no field of a configuration: each ranks the deepest cutoff
                field_name = "the deepest cutoff of the measures" if exc.field == "k" else repr(exc.field)
                raise EvaluationInputError(f"configuration {config.name!r}: {field_name}: {exc}") from exc
        if config.options.mode != "vector" and imageonly:
            raise EvaluationInputError(
                f"configuration {config.name!r}: mode {config.options.mode} needs query text, and {len(imageonly)} "
                f"queries (e.g. {imageonly[0]}) have an image only. Evaluate those in a queries file of their own "
                "with vector configurations only (--config '{\"mode\": \"vector\"}'; the default configurations "
                "run every mode), and the queries with text apart")


def evaluate(targets: Mapping[str, SearchTarget], queries: Sequence[Query], qrels: Mapping[str, Mapping[str, int]],
             configs: Sequence[RunConfig], *, measures: Sequence[str] | None = None, max_image_pixels: int = 40_000_000,
             encode_threads: int = 1, progress: bool = False) -> Evaluation:
    """Run every configuration over every judged query; metrics by ir-measures, latency per stage.

    Queries are encoded one at a time with `encode_threads` torch threads on CPU, as a serving
    worker encodes them (SIDECAR_SERVE_TORCH_THREADS): the encode latency is a request's."""
    measures = list(measures or standard_measures())
    parsed = _parse_measures(measures)
    depth = ranking_depth(measures)
    judged = [q for q in queries if qrels.get(q.id)]
    if len(judged) < len(queries):
        log.warning("%d of %d queries have no judgments and are left out", len(queries) - len(judged), len(queries))
    if not judged:
        raise EvaluationInputError("no query has a judgment: do the query ids match the qrels?")
    check_configs(configs, judged, qrels, measures=measures)
    for config in configs:
        if config.target not in targets:
            raise EvaluationInputError(f"configuration {config.name!r} runs on target {config.target!r}; "
                                       f"targets: {', '.join(targets)}")
    relevant = sorted({doc for q in judged for doc, grade in qrels[q.id].items() if grade > 0})
    for name in sorted({c.target for c in configs}):
        _check_judged_documents(targets[name].store, relevant, target=name if len(targets) > 1 else None)

    needing = {c.target for c in configs if _needs_vector(c.options)}
    for name in needing:
        if targets[name].encoder is None:
            raise EvaluationInputError(f"target {name!r} has no model, and its configurations need query vectors")
    fine_needed = {c.target for c in configs if c.options.rerank and targets[c.target].fine_encoder is not None}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(encode_threads)
    try:
        vectors = _encode_queries({name: targets[name].encoder for name in needing}, targets, judged,
                                  max_image_pixels=max_image_pixels, progress=progress)
        fine_vectors = _encode_queries({name: targets[name].fine_encoder for name in fine_needed}, targets, judged,
                                       max_image_pixels=max_image_pixels, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
    keys = _LibraryIds([q.id for q in judged])
    qrel_list = [ir_measures.Qrel(keys.queries[qid], keys.doc(doc), grade) for qid, docs in qrels.items()
                 if qid in keys.queries for doc, grade in docs.items()]
    groups = _groups(judged)
    results = []
    for config in tqdm(configs, desc="configurations", unit="config", disable=not progress):
        results.append(_run_config(config, targets[config.target], judged, vectors, fine_vectors, qrel_list, parsed,
                                   groups, depth=depth, keys=keys))
    return Evaluation(measures=[str(m) for m in parsed], results=results, queries=len(judged),
                      groups={name: len(ids) for name, ids in groups.items()})


def _check_judged_documents(store: Store, relevant: Sequence[str], *, target: str | None) -> None:
    """EvaluationInputError where the store holds none of the documents judged relevant (an empty store, or
    qrels whose doc ids are not the store's: every figure would read 0, as if no configuration found any);
    a warning naming how many where it lacks some: each is a relevant document every configuration misses."""
    found: set[str] = set()
    for start in range(0, len(relevant), FETCH_CHUNK):
        found.update(doc.id for doc in store.fetch(relevant[start:start + FETCH_CHUNK], vectors=False))
    missing = [doc for doc in relevant if doc not in found]
    if not missing:
        return
    where = f"the store of target {target!r}" if target else "the store"
    if len(missing) == len(relevant):
        raise EvaluationInputError(f"none of the {len(relevant)} documents judged relevant is in {where} (e.g. "
                                   f"{missing[0]!r}): do the qrels' doc ids match the store's?")
    log.warning("%d of %d documents judged relevant are not in %s (e.g. %r): every configuration misses them",
                len(missing), len(relevant), where, missing[0])


def _encode_queries(encoders: Mapping[str, Encoder], targets: Mapping[str, SearchTarget], queries: Sequence[Query],
                    *, max_image_pixels: int, progress: bool) -> dict[tuple[str, str], tuple[np.ndarray, float]]:
    """(target, query id) -> (query vector by `encoders[target]`, seconds to encode it alone): every
    configuration on a target reuses the vector and reports the encode time it cost."""
    encoded: dict[tuple[str, str], tuple[np.ndarray, float]] = {}
    for name, encoder in sorted(encoders.items()):
        prompt = targets[name].prompt_template
        encoder.encode_texts([prompt.format("warm up")])  # first calls allocate
        for query in tqdm(queries, desc=f"encode queries ({name}, {encoder.name})", unit="query",
                          disable=not progress):
            started = time.perf_counter()
            text_vector = image_vector = None
            if query.text and query.text.strip():
                text_vector = encoder.encode_texts([prompt.format(query.text)])[0]
            if query.image is not None:
                try:
                    image_vector = encoder.encode_image_files([query.image.read_bytes()],
                                                              max_pixels=max_image_pixels)[0]
                except ImageDecodeError as exc:
                    raise EvaluationInputError(f"query {query.id!r}: image {query.image}: {exc.reason}") from exc
            encoded[(name, query.id)] = (query_vector(text_vector, image_vector), time.perf_counter() - started)
    return encoded


def _needs_vector(options: SearchOptions) -> bool:
    """The fast model's query vector: every mode but bm25 (whose rerank uses the fine model's)."""
    return options.mode != "bm25"


def _groups(queries: Sequence[Query]) -> dict[str, list[str]]:
    """Query ids per category (in order of first appearance), then per tag; a query is in a group once,
    whether it names it as its category, as a tag or as both (as `hard-examples export` writes them)."""
    groups: dict[str, dict[str, None]] = {}  # dicts as ordered sets
    for query in queries:
        if query.category:
            groups.setdefault(query.category, {})[query.id] = None
    for query in queries:
        for tag in query.tags:
            groups.setdefault(tag, {})[query.id] = None
    return {name: list(ids) for name, ids in groups.items()}


class _LibraryIds:
    """Query and document ids as ir-measures is fed them: numbers, in the order first seen. Its file-based
    provider (gdeval, for ERR and nDCG(dcg="exp-log2")) refuses a query id that is not digits after its last
    "-" (reading "a-1" and "b-1" as one query "1") and splits each line on whitespace (a folder corpus's
    "my photo.jpg" is two fields)."""

    def __init__(self, query_ids: Sequence[str]) -> None:
        self.queries = {query_id: str(number) for number, query_id in enumerate(query_ids)}
        self.query_of = dict(zip(self.queries.values(), self.queries))
        self._docs: dict[str, str] = {}

    def doc(self, doc_id: str) -> str:
        return self._docs.setdefault(doc_id, str(len(self._docs)))


def _run_config(config: RunConfig, target: SearchTarget, queries: Sequence[Query],
                vectors: Mapping[tuple[str, str], tuple[np.ndarray, float]],
                fine_vectors: Mapping[tuple[str, str], tuple[np.ndarray, float]], qrel_list: list, measures: list,
                groups: Mapping[str, list[str]], *, depth: int, keys: _LibraryIds) -> ConfigResult:
    options = dataclasses.replace(config.options, k=depth)
    needs_vector = _needs_vector(options)
    run: list = []
    timings: dict[str, list[float]] = {stage: [] for stage in STAGES}
    notes: dict[str, int] = {}
    for query in queries:
        vector, encode_s = vectors[(config.target, query.id)] if needs_vector else (None, 0.0)
        fine_vector, fine_encode_s = fine_vectors.get((config.target, query.id), (None, 0.0)) if options.rerank \
            else (None, 0.0)
        encode_s += fine_encode_s
        try:
            result = search(target.store, vector=vector, text=query.text,
                            options=dataclasses.replace(options, filters=query.filters), fine_vector=fine_vector,
                            fine_model=target.fine_encoder.signature if target.fine_encoder else None)
        except StoreQueryError as exc:
            if not query.filters:
                raise  # a query the harness built alone: the store's error
            raise EvaluationInputError(f"query {query.id!r}: its filters do not fit the store: {exc}") from exc
        if result.rerank_skipped:
            notes[result.rerank_skipped] = notes.get(result.rerank_skipped, 0) + 1
        # Scores by rank, so the library sees exactly our order (pytrec_eval breaks score ties by doc id).
        run.extend(ir_measures.ScoredDoc(keys.queries[query.id], keys.doc(hit.id), float(len(result.hits) - rank))
                   for rank, hit in enumerate(result.hits))
        stages = {"encode": encode_s, **{stage: result.timings_s[stage] for stage in ("coarse", "fetch", "rerank")}}
        stages["search"] = stages["coarse"] + stages["fetch"] + stages["rerank"]
        stages["total"] = stages["encode"] + stages["search"]
        for stage, seconds in stages.items():
            timings[stage].append(seconds)
    per_query: dict[str, dict[str, float]] = {q.id: {str(m): 0.0 for m in measures} for q in queries}
    for metric in ir_measures.iter_calc(measures, qrel_list, run):
        per_query[keys.query_of[metric.query_id]][str(metric.measure)] = float(metric.value)
    names = [str(m) for m in measures]

    def mean_over(ids: Iterable[str]) -> dict[str, float]:
        ids = list(ids)
        return {name: statistics.fmean(per_query[qid][name] for qid in ids) for name in names}

    return ConfigResult(config=config, metrics=mean_over(per_query), by_group={g: mean_over(ids) for g, ids in
                                                                              groups.items()},
                        latency_ms={stage: percentiles(samples) for stage, samples in timings.items()},
                        per_query=per_query,
                        notes=[f"rerank skipped for {count} of {len(queries)} queries: {reason}"
                               for reason, count in notes.items()])
