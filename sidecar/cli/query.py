"""`clip-sidecar search` and `eval`: query the store from the terminal; measure ranking quality and ANN recall."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from sidecar.cli.benchmark import BENCHMARK_ITEMS
from sidecar.cli.output import format_hits
from sidecar.cli.root import (
    MODEL_FLAGS,
    PROMPT_FLAGS,
    STORE_FLAGS,
    FiniteFloatRange,
    model_options,
    open_existing_store,
    prompt_sets_option,
    settings_from,
    store_options,
    writable_folder,
)
from sidecar.config import Settings
from sidecar.retrieval.calibration import MAX_EF_SEARCH
from sidecar.retrieval.fusion import FUSION_METHODS, RRF_K
from sidecar.retrieval.search import DEFAULT_K, MAX_WEIGHT, MODES


@click.command()
@click.argument("text", required=False)
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Query image (alone: more like this photo; with TEXT: both).")
@click.option("--mode", type=click.Choice(MODES), help="Default: hybrid with text, vector without.")
@click.option("-k", "--k", "k", type=click.IntRange(1),
              help=f"Hits to print (default {DEFAULT_K}, or max_k where lower); at most max_k (SIDECAR_MAX_K, else "
                   "1000), as /v1/search takes.")
@click.option("--candidates", "rerank_candidates", type=click.IntRange(1),
              help="How many coarse hits the fine stage (rerank) sees (default: SIDECAR_RERANK_CANDIDATES, else 100); "
                   "at most max_k, as -k. With -k above it, the hits past them follow in coarse order.")
@click.option("--fusion", type=click.Choice(FUSION_METHODS), default="minmax", show_default=True,
              help="How hybrid mode merges the vector and BM25 lists: each list's scores scaled (minmax, zscore), "
                   f"or their ranks (rrf: weight / ({RRF_K} + rank), rank counted from 1 in each list), then summed "
                   "by the weights.")
@click.option("--vector-weight", type=FiniteFloatRange(0, MAX_WEIGHT), default=0.5, show_default=True,
              help="Weight of the vector scores where they are fused with BM25's.")
@click.option("--bm25-weight", type=FiniteFloatRange(0, MAX_WEIGHT), default=0.5, show_default=True,
              help="Weight of the BM25 scores where they are fused with the vector's (not both 0).")
@click.option("--rerank/--no-rerank", default=None,
              help="The fine stage: re-score the candidates with --fine-model (default: on, except in bm25 mode). "
                   "Skipped when no fine model is configured: silently by default, with a note on stderr when "
                   "--rerank is given.")
@click.option("--exact", is_flag=True, help="Brute-force vector search instead of HNSW.")
@click.option("--ef-search", type=click.IntRange(1, MAX_EF_SEARCH),
              help="HNSW search breadth for this query (default: the store's).")
@click.option("--filter", "filters", multiple=True, metavar="FIELD=VALUE",
              help="Metadata filter, repeatable (each FIELD once); FIELD=a,b matches either. A VALUE that reads "
                   "as a number or true/false matches that number or boolean too (year=2020 finds 2020 and \"2020\"). "
                   "A FIELD no stored document holds is refused, naming the fields they hold, as is a VALUE that "
                   "reads as no kind of value the FIELD holds (a word for a field of numbers).")
@click.option("--json", "as_json", is_flag=True, help="Print hits as JSON.")
@model_options
@store_options
def search(text: str | None, image: Path | None, mode: str | None, k: int | None, fusion: str,
           vector_weight: float, bm25_weight: float, rerank: bool | None, exact: bool, ef_search: int | None,
           filters: tuple[str, ...], as_json: bool, **kwargs: Any) -> None:
    """Search the store by TEXT, --image, or both."""
    from sidecar.api.validation import is_blank
    from sidecar.model.encoder import load_encoder, load_fine_encoder
    from sidecar.model.images import ImageDecodeError
    from sidecar.retrieval.search import (
        OverSearchLimit,
        SearchOptions,
        check_query_image_used,
        check_search_limits,
        past_window_depth,
    )
    from sidecar.retrieval.search import search as run_search
    from sidecar.stores.base import StoreQueryError, UnknownFilterField, check_query_model

    # --candidates is this search's, not a setting: over max_k, check_search_limits names the flag.
    candidates = kwargs.pop("rerank_candidates")
    settings = settings_from(kwargs, MODEL_FLAGS + STORE_FLAGS)
    k = min(DEFAULT_K, settings.max_k) if k is None else k  # as /v1/search: no -k is no -k to refuse
    # As /v1/search reads a query's text: its first max_text_chars characters, blank as none.
    text = None if text is None or is_blank(text[:settings.max_text_chars]) else text[:settings.max_text_chars]
    if text is None and image is None:
        raise click.UsageError("give TEXT (not blank), --image, or both")
    if vector_weight == bm25_weight == 0:
        raise click.BadParameter("both weights are 0: give one of them a positive weight",
                                 param_hint="'--vector-weight' / '--bm25-weight'")
    try:
        options = SearchOptions(mode=mode or ("hybrid" if text else "vector"), k=k,
                                candidates=candidates or settings.rerank_candidates,
                                fusion=fusion, weights=(vector_weight, bm25_weight), rerank=rerank,
                                exact=exact, ef_search=ef_search, filters=_parse_filters(filters, settings))
        check_search_limits(options, max_k=settings.max_k)  # as the API refuses them
        # After the limits: -k over max_k is told as such, not as a depth under k.
        options = dataclasses.replace(options, depth=past_window_depth(k, candidates=options.candidates,
                                                                         max_k=settings.max_k))
    except OverSearchLimit as exc:
        raise click.BadParameter(str(exc), param_hint=f"'--{exc.field.replace('_', '-')}'") from exc
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if image is not None:
        try:
            check_query_image_used(options, fine_model=settings.fine_model_settings() is not None)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--image") from exc
    # The store first: a mistyped --store-path (or an unreachable cluster) is told at once, not after the model load.
    store = open_existing_store(settings)
    try:
        encoder = load_encoder(settings)
        fine_encoder = load_fine_encoder(settings) if options.rerank else None
        try:
            vector = _query_vector(encoder, settings, text=text, image=image)
            fine_vector = _query_vector(fine_encoder, settings, text=text, image=image) if fine_encoder else None
        except ImageDecodeError as exc:
            raise click.BadParameter(f"{image}: {exc.reason}", param_hint="--image") from exc
        try:
            if options.mode != "bm25":
                check_query_model(store, encoder.signature)  # another model's vectors of the same size rank wrong
            result = run_search(store, vector=vector, text=text, options=options, fine_vector=fine_vector,
                                fine_model=fine_encoder.signature if fine_encoder else None)
        except UnknownFilterField as exc:
            raise click.BadParameter(str(exc), param_hint="--filter") from exc
        except StoreQueryError as exc:
            if not options.filters:
                raise  # a query the command built alone: the store's error, not the flags'
            raise click.BadParameter(str(exc), param_hint="--filter") from exc
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([hit.to_dict() for hit in result.hits], indent=2))
    else:
        click.echo(format_hits(result.hits))
    if rerank and result.rerank_skipped:  # asked for by --rerank, not just the mode's default
        click.echo(f"rerank skipped: {result.rerank_skipped}", err=True)


def _query_vector(encoder, settings, *, text: str | None, image: Path | None):
    """The query by `encoder`: its text vector, image vector, or the two combined."""
    from sidecar.retrieval.search import query_vector

    text_vector = encoder.encode_texts([settings.prompt(text)])[0] if text else None
    image_vector = None
    if image is not None:
        image_vector = encoder.encode_image_files([image.read_bytes()], max_pixels=settings.max_image_pixels)[0]
    return query_vector(text_vector, image_vector)


def _parse_filters(filters: tuple[str, ...], settings: Settings) -> dict[str, Any] | None:
    """--filter FIELD=VALUE flags as the store's filters, held to /v1/search's limits (max_filter_fields,
    max_filter_values): a list of values is one SQL or OpenSearch clause term per value."""
    parsed: dict[str, Any] = {}
    given = 0
    for item in filters:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--filter {item!r}: expected FIELD=VALUE")
        if field in parsed:  # a filter holds one entry per field: the later flag would replace the earlier
            raise ValueError(f"--filter {field!r} is given twice: give it once, FIELD=a,b for either value")
        given += len(value.split(","))
        if given > settings.max_filter_values:
            raise ValueError(f"--filter: more than {settings.max_filter_values} values in all (max_filter_values: "
                             "SIDECAR_MAX_FILTER_VALUES)")
        # Typed by the store as OpenSearch types a term filter's value by the field: "2020" finds a stored 2020.
        values = value.split(",")
        parsed[field] = values if len(values) > 1 else value
    if len(parsed) > settings.max_filter_fields:
        raise ValueError(f"--filter: {len(parsed)} fields, over the limit of {settings.max_filter_fields} "
                         "(max_filter_fields: SIDECAR_MAX_FILTER_FIELDS)")
    return parsed or None


@click.command("eval")
@click.option("--benchmark", is_flag=True,
              help="The built-in relevance benchmark: train the tiny models (cached), render a product catalogue, "
                   "embed and index it, run the standard configurations, write the report to --out.")
@click.option("--queries", "queries_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Judged queries, JSONL: {\"id\", \"text\"?, \"image\"? (path; alone, for vector configurations "
                   "only), \"category\"?, \"tags\"?, \"filters\"? (as /v1/search takes them: the query runs with "
                   "them)} a line.")
@click.option("--qrels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Graded judgments: TREC qrels (qid iter docid grade) or JSONL {\"query_id\", \"doc_id\", "
                   "\"relevance\"}; integer grades from -1000 to 1000.")
@click.option("--config", "configs", multiple=True, metavar="JSON|FILE",
              help="Configurations to compare (repeatable): inline JSON or a JSON file with an object, a list, or "
                   "{\"grid\": {field: [values]}}; fields mode, fusion, weights ([vector, bm25] or {\"vector\", \"bm25\"} as /v1/search "
                   "takes them), rerank, exact, candidates "
                   "(at least the deepest --measure cutoff, at most max_k; default SIDECAR_RERANK_CANDIDATES, or that "
                   "cutoff where deeper), ef_search (not under candidates: the store searches at least candidates "
                   f"wide; at most {MAX_EF_SEARCH}), name. "
                   "Default: every mode, rerank on and off.")
@click.option("--measure", "measures", multiple=True, metavar="MEASURE",
              help="ir-measures names, repeatable (default nDCG@10, RR@10, R@10; e.g. R@100, P@5, AP@100), each "
                   "with a cutoff: a configuration ranks its top N only (N the deepest cutoff), so AP or nDCG over "
                   "the whole ranking is refused.")
@click.option("--relevant-grade", type=click.IntRange(1), default=1, show_default=True,
              help="The lowest grade that counts as relevant for the default MRR and Recall (nDCG always uses the "
                   "grades). Not with --measure: write it in the measure there, e.g. RR(rel=2)@10. A judged "
                   "query with no document at that grade scores 0 and stays in the mean (as trec_eval); a query "
                   "the qrels do not name is left out.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder: results.json and results.md; with --benchmark and --queries also PNG plots and "
                   "report.html [default: reports/benchmark, reports/eval or reports/prompts; --ann writes only "
                   "where --out is given].")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("data/benchmark"),
              show_default=True, help="--benchmark: catalogue, shards and stores (reused by reruns).")
@click.option("--items", type=click.IntRange(100), default=BENCHMARK_ITEMS, show_default=True,
              help="--benchmark: products in the catalogue.")
@click.option("--ann", is_flag=True, help="Validate the ANN index instead: Recall@K of HNSW against exact search, "
              "each search as deep as searches ask (SIDECAR_RERANK_CANDIDATES: efSearch is at least that).")
@click.option("--samples", type=click.IntRange(1), default=200, show_default=True,
              help="--ann: queries, each a random stored vector turned as far from itself as its K-th neighbour "
                   "(as `store calibrate` makes them: a stored vector itself is far easier for HNSW to find).")
@click.option("-k", "--k", "k", type=click.IntRange(1),
              help=f"--ann: K (default {DEFAULT_K}, or max_k where lower), at most max_k (SIDECAR_MAX_K) as for a "
                   "search.")
@click.option("--prompts", "prompt_sets", multiple=True, metavar="SET",
              help="Score prompt sets instead (repeatable, to compare templates): top-1 / top-5 zero-shot accuracy on "
                   "the images of --labels.")
@click.option("--labels", "labels_path", type=click.Path(exists=True, path_type=Path),
              help="--prompts: the labelled sample, a folder or a .jsonl / .csv manifest as `embed` reads it; each "
                   "image's true label is its metadata field --label-field. Images missing, unreadable or not an image are "
                   "skipped, counted and listed in the report.")
@click.option("--label-field", default="label", show_default=True, help="--prompts: the metadata field of the truth.")
@prompt_sets_option
@model_options
@store_options
@click.pass_context
def eval_command(ctx: click.Context, benchmark: bool, queries_path: Path | None, qrels: Path | None,
                 configs: tuple[str, ...], measures: tuple[str, ...], relevant_grade: int, out: Path | None,
                 workdir: Path, items: int, ann: bool, samples: int, k: int | None, prompt_sets: tuple[str, ...],
                 labels_path: Path | None, label_field: str, **kwargs: Any) -> None:
    """Measure ranking quality: nDCG@10, MRR@10 and Recall@K (ir-measures) with latency per stage,
    for any list of search configurations; or validate the ANN index against exact search.

    \b
    Built-in benchmark (nothing to prepare; minutes on a laptop once the first run has trained
    tiny-clip-large, about 13 minutes on 2 cores):
      clip-sidecar eval --benchmark
    Your own judged queries, against the store:
      clip-sidecar eval --queries queries.jsonl --qrels qrels.txt \\
          --config '{"grid": {"mode": ["vector", "hybrid"], "fusion": ["minmax", "rrf"]}}'
    The ANN index against exact search:
      clip-sidecar eval --ann --samples 200 -k 10
    Prompt sets (zero-shot top-1 / top-5 accuracy) on labelled images:
      clip-sidecar eval --prompts shapes --prompts shapes-plain --labels sample.jsonl --label-field shape
    """
    chosen = [name for name, on in (("--benchmark", benchmark), ("--queries/--qrels", bool(queries_path or qrels)),
                                    ("--ann", ann), ("--prompts/--labels", bool(prompt_sets or labels_path))) if on]
    if len(chosen) != 1:
        raise click.UsageError("choose one of --benchmark, --queries with --qrels, --ann, or --prompts with --labels"
                               + (f" (got {', '.join(chosen)})" if chosen else ""))
    # A flag of another way, given, would be ignored without a word (--samples 1000 with --benchmark).
    for name, way in (("workdir", "--benchmark"), ("items", "--benchmark"), ("samples", "--ann"), ("k", "--ann"),
                      ("label_field", "--prompts/--labels")):
        if way != chosen[0] and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            flag = next(param.opts[-1] for param in ctx.command.params if param.name == name)
            raise click.UsageError(f"{flag} goes with {way} only (this run is {chosen[0]})")
    progress = ctx.obj["progress"]
    grade_given = ctx.get_parameter_source("relevant_grade") is not click.core.ParameterSource.DEFAULT
    settings = settings_from(kwargs, MODEL_FLAGS + STORE_FLAGS + PROMPT_FLAGS)
    # --ann writes a report only where --out is given: its printed lines are the whole report.
    out = out or {"--benchmark": Path("reports/benchmark"), "--queries/--qrels": Path("reports/eval"),
                  "--prompts/--labels": Path("reports/prompts")}.get(chosen[0])
    if prompt_sets or labels_path:
        if not (prompt_sets and labels_path):
            raise click.UsageError("--prompts and --labels go together")
        _prompt_accuracy(settings, prompt_sets, labels_path, label_field=label_field, out=out, progress=progress)
    elif ann:
        _ann(settings, samples=samples, k=min(DEFAULT_K, settings.max_k) if k is None else k, out=out,
             progress=progress)
    elif benchmark:
        from sidecar.cli.benchmark import QUERIES_PER_CATEGORY, run_benchmark

        if configs or measures or grade_given:
            raise click.UsageError("--benchmark runs its standard configurations and measures; use --queries "
                                   "and --qrels (its files are in --workdir/catalogue) to run your own")
        writable_folder(out)  # before the run, which takes minutes
        evaluation, report = run_benchmark(settings, workdir=workdir, out=out,
                                           items=items, queries_per_category=QUERIES_PER_CATEGORY, seed=0,
                                           progress=progress, echo=click.echo)
        _print_report(evaluation, report)
    else:
        if not (queries_path and qrels):
            raise click.UsageError("--queries and --qrels go together")
        if measures and grade_given:  # it would be ignored: it sets the default measures' rel=
            raise click.UsageError("--relevant-grade sets the default measures; with --measure, write the grade in "
                                   "each measure instead, e.g. RR(rel=2)@10 or R(rel=2)@100")
        _judged(settings, queries_path, qrels, configs=configs, measures=measures, relevant_grade=relevant_grade,
                out=out, progress=progress)


def _prompt_accuracy(settings, names: tuple[str, ...], labels_path: Path, *, label_field: str, out: Path,
                     progress: bool) -> None:
    from sidecar.cli.benchmark import machine_description
    from sidecar.ingest.corpus import printable, read_corpus
    from sidecar.model.encoder import load_encoder
    from sidecar.model.prompts import PromptSetRegistry
    from sidecar.retrieval.classification import accuracy_table, score_prompt_sets
    from sidecar.retrieval.relevance import EvaluationInputError
    from sidecar.retrieval.report import markdown, write_results_only

    sample, skipped = [], []  # skipped: (path, why), the images embed would skip too
    for item in read_corpus(labels_path):
        if item.unusable:
            skipped.append((item.path, item.unusable))
            continue
        truth = item.text if label_field == "text" else item.metadata.get(label_field)
        if not isinstance(truth, str) or not truth:
            raise click.UsageError(f"{labels_path}: item {item.id!r} has no {label_field!r} label "
                                   "(--label-field names the metadata field holding the truth)")
        sample.append((item.path, truth))
    writable_folder(out)  # before the model loads
    encoder = load_encoder(settings)
    try:
        results, unusable = score_prompt_sets(encoder, PromptSetRegistry(settings.prompt_sets_dir), names, sample,
                                              max_pixels=settings.max_image_pixels, progress=progress)
    except EvaluationInputError as exc:
        raise click.UsageError(str(exc)) from exc
    total = len(sample) + len(skipped)
    skipped += unusable
    listed = [{"path": printable(str(path)), "reason": reason} for path, reason in skipped]
    table = markdown(accuracy_table(results))
    lines = [f"- {s['path']}: {s['reason']}" for s in listed]
    summary = f"{len(skipped)} of {total} images skipped as unusable"
    info = {"machine": machine_description(), "model": encoder.signature.describe(), "labels": str(labels_path),
            "label_field": label_field}
    listing = f"\n{summary}:\n\n" + "\n".join(lines) + "\n" if skipped else ""
    write_results_only(out, {"info": info, "results": [r.to_json() for r in results], "skipped": listed},
                       f"# Prompt sets on {labels_path.name}\n\n{table}\n{listing}")
    if skipped:
        click.echo(f"\n{summary} (all listed in {out / 'results.md'}):\n" + "\n".join(lines[:5])
                   + ("\n- …" if len(lines) > 5 else ""))
    click.echo(f"\n{table}\n\nReport: {out / 'results.md'}, {out / 'results.json'}")


def _ann(settings, *, samples: int, k: int, out: Path | None, progress: bool) -> None:
    from sidecar.cli.benchmark import machine_description
    from sidecar.retrieval.evaluation import ann_recall
    from sidecar.retrieval.report import write_results_only
    from sidecar.retrieval.search import OverSearchLimit, SearchOptions, check_search_limits

    try:  # the depth a search may rank, as /v1/search and `search` limit it
        check_search_limits(SearchOptions(mode="vector", k=k, candidates=k), max_k=settings.max_k)
    except OverSearchLimit as exc:
        raise click.BadParameter(str(exc), param_hint="'--k'") from exc
    if out is not None:
        writable_folder(out)
    store = open_existing_store(settings)
    try:
        # As deep as searches ask (their candidates), as `store calibrate` measures: the effort they run at.
        report = ann_recall(store, queries=samples, k=k, depth=settings.rerank_candidates, progress=progress)
    except ValueError as exc:  # the store is empty
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()
    click.echo(report.describe())
    if out is None:  # the printed lines are the whole report: no folder appears uninvited
        return
    info = {"machine": machine_description(), "store": f"{settings.store} ({store.name})"}
    facts = "".join(f"- {key}: {value}\n" for key, value in info.items())
    json_path, markdown_path = write_results_only(out, {"info": info, "results": report.to_json()},
                                                  f"# The ANN index against exact search\n\n{facts}\n"
                                                  f"{report.describe()}\n")
    click.echo(f"\nReport: {markdown_path}, {json_path}")


def _judged(settings, queries_path: Path, qrels_path: Path, *, configs: tuple[str, ...], measures: tuple[str, ...],
            relevant_grade: int, out: Path, progress: bool) -> None:
    from sidecar.cli.benchmark import machine_description
    from sidecar.model.encoder import load_encoder, load_fine_encoder
    from sidecar.retrieval.relevance import (
        EvaluationInputError,
        SearchTarget,
        check_configs,
        default_configs,
        evaluate,
        parse_configs,
        ranking_depth,
        read_qrels,
        read_queries,
        standard_measures,
    )
    from sidecar.retrieval.report import write_report
    from sidecar.stores.base import check_query_model

    measure_names = list(measures) or standard_measures(relevant_grade=relevant_grade)
    try:
        queries, qrels = read_queries(queries_path), read_qrels(qrels_path)
        depth, candidates = ranking_depth(measure_names), settings.rerank_candidates
        runs = ([c for spec in configs for c in parse_configs(_load_json(spec), k=depth, candidates=candidates)]
                if configs else default_configs(k=depth, candidates=candidates))
        check_configs(runs, queries, qrels, measures=measure_names, max_k=settings.max_k)  # before the model loads
    except EvaluationInputError as exc:
        raise click.UsageError(str(exc)) from exc
    writable_folder(out)  # before the run, which takes minutes
    store = open_existing_store(settings)
    try:
        target = SearchTarget(store=store, encoder=load_encoder(settings), prompt_template=settings.prompt_template,
                              fine_encoder=load_fine_encoder(settings))
        if any(run.options.mode != "bm25" for run in runs):  # as `search`: another model's vectors rank wrong
            check_query_model(store, target.encoder.signature)
        evaluation = evaluate({"default": target}, queries, qrels, runs, measures=measure_names,
                              max_image_pixels=settings.max_image_pixels,
                              encode_threads=settings.serve_torch_threads, progress=progress)
    except EvaluationInputError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        store.close()
    evaluation.info.update({"machine": machine_description(), "store": f"{settings.store} ({store.name})",
                            "model": target.encoder.signature.describe(),
                            "fine model": target.fine_encoder.signature.describe() if target.fine_encoder else "none",
                            "queries": str(queries_path),
                            "qrels": str(qrels_path)})
    _print_report(evaluation, write_report(evaluation, out, title=f"clip-sidecar relevance: {queries_path.name}"))


def _load_json(spec: str) -> Any:
    """Inline JSON, or the path of a JSON file."""
    from sidecar.retrieval.relevance import EvaluationInputError, read_input_text

    text = spec
    if not spec.lstrip().startswith(("{", "[")):
        path = Path(spec)
        if not path.is_file():
            raise EvaluationInputError(f"--config {spec!r}: neither inline JSON nor an existing file")
        text = read_input_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvaluationInputError(f"--config {spec[:60]!r}: not JSON ({exc.msg} at line {exc.lineno})") from exc


def _print_report(evaluation, report) -> None:
    from sidecar.retrieval.report import defaults_table, markdown, notes_table, results_table

    click.echo("\n" + markdown(results_table(evaluation)))
    notes = notes_table(evaluation)
    if notes[1]:
        click.echo("\nNotes:\n" + markdown(notes))
    if evaluation.default:
        click.echo(f"\nThe default request ({evaluation.default}) against the best configuration:\n"
                   + markdown(defaults_table(evaluation)))
    click.echo(f"\nReport: {report.html}\n        {report.markdown}, {report.json}, "
               + ", ".join(str(p) for p in report.plots))
