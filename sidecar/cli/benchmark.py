"""`clip-sidecar eval --benchmark`: the built-in relevance benchmark, from a bare machine to a report.

Trains (once, cached) the fast tiny model and the stronger one, renders the product catalogue
(`sidecar.model.catalogue`), embeds and indexes it once per model, runs the standard
configurations and writes the report (JSON, Markdown, PNG plots, HTML).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sidecar.config import Settings
from sidecar.retrieval.search import SearchOptions

if TYPE_CHECKING:  # relevance imports torch: `eval --help` reads BENCHMARK_ITEMS without it
    from sidecar.retrieval.relevance import Evaluation, RunConfig

BENCHMARK_ITEMS = 3000
QUERIES_PER_CATEGORY = 60
FAST, STRONG = "default", "strong"  # targets: the fast model's store (with fine vectors), the strong model's
STRONG_MODEL = "tiny-clip-large"
WEIGHTS = ((0.5, 0.5), (0.7, 0.3), (0.3, 0.7))  # (vector, bm25): the defaults, before and after measuring, and the mirror


def standard_configs() -> list[RunConfig]:
    """What the benchmark compares. On the fast model's store (which holds the strong model's vectors
    beside each document): every mode, the fusions and weights, exact vs ANN and an ef_search sweep,
    each coarse alone and with the fine stage (the cascade), and the candidate depth N. On the strong
    model's own store: its exact search alone, the reference the cascade is measured against."""
    from sidecar.retrieval.relevance import DEFAULT_CUTOFF, RunConfig, dedupe

    base = SearchOptions(rerank=False)

    def fast(**changes) -> RunConfig:
        return RunConfig(options=dataclasses.replace(base, **changes), target=FAST)

    def strong(**changes) -> RunConfig:
        return RunConfig(options=dataclasses.replace(base, exact=True, **changes), target=STRONG)

    return dedupe([
        fast(mode="vector"),
        fast(mode="vector", exact=True),
        fast(mode="bm25"),
        *(fast(weights=w) for w in WEIGHTS),
        fast(fusion="zscore", weights=(0.5, 0.5)),
        fast(fusion="rrf", weights=(0.5, 0.5)),
        # The store searches at least the N candidates wide (efSearch = max(ef_search, N)): the sweep ranks
        # the measures' cutoff (N = 10), where efSearch 10 and up each search as named.
        *(fast(mode="vector", candidates=DEFAULT_CUTOFF, ef_search=ef) for ef in (10, 20, 40, 80)),
        # The cascade: coarse on the fast model, the fine stage on the strong one.
        fast(mode="vector", rerank=True),
        fast(mode="bm25", rerank=True),
        *(fast(rerank=True, weights=w) for w in WEIGHTS),
        fast(rerank=True, fusion="rrf", weights=(0.5, 0.5)),
        *(fast(rerank=True, weights=(0.5, 0.5), candidates=n) for n in (20, 50, 200)),
        # The strong model alone, exact: what the cascade should come close to.
        strong(mode="vector"),
        *(strong(weights=w) for w in WEIGHTS[:2]),
        strong(fusion="rrf", weights=(0.5, 0.5)),
        # The default request, whatever SearchOptions() says it is (listed above unless it changed).
        RunConfig(options=SearchOptions(), target=FAST),
    ])


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def run_benchmark(settings: Settings, *, workdir: Path, out: Path, items: int, queries_per_category: int,
                  seed: int, progress: bool, echo: Callable[[str], None]) -> tuple[Evaluation, object]:
    # Heavy imports (torch, faiss, matplotlib) here, so `clip-sidecar --help` stays fast.
    from sidecar.ingest.embed import embed_corpus
    from sidecar.ingest.indexing import index_shards
    from sidecar.model.encoder import load_encoder
    from sidecar.retrieval.relevance import (
        SearchTarget,
        evaluate,
        read_qrels,
        read_queries,
        standard_measures,
    )
    from sidecar.retrieval.report import write_report
    from sidecar.stores import open_store

    models = {FAST: settings, STRONG: dataclasses.replace(settings, model=settings.fine_model or STRONG_MODEL,
                                                          pretrained=settings.fine_pretrained,
                                                          model_config=settings.fine_model_config)}
    echo(f"[1/4] models: {models[FAST].model} (fast, coarse) and {models[STRONG].model} (strong, fine); the tiny "
         f"ones are trained once and cached in {settings.cache_dir}")
    encoders = {name: load_encoder(model_settings) for name, model_settings in models.items()}

    catalogue_dir = workdir / "catalogue"
    files = _catalogue(catalogue_dir, items=items, queries_per_category=queries_per_category, seed=seed,
                       progress=progress, echo=echo)

    stores = {}
    try:
        # The fast model's store also holds the strong model's vectors (the same embed pass): the
        # cascade's fine stage reads them. The strong model's own store is the exact reference.
        plan = {FAST: (encoders[FAST], encoders[STRONG]), STRONG: (encoders[STRONG], None)}
        for step, (name, (encoder, fine)) in enumerate(plan.items()):
            label = f"{encoder.name}" + (f" + fine vectors by {fine.name}" if fine else "")
            echo(f"[3/4] embed and index: {label}" if step == 0 else f"      embed and index: {label}")
            shards = workdir / f"shards-{name}"
            echo("      " + embed_corpus(encoder, files.manifest, shards, workers=1, fine_encoder=fine,
                                         progress=progress).describe())
            store_settings = dataclasses.replace(
                settings, store_path=workdir / f"store-{name}",
                opensearch_index=f"{settings.opensearch_index}-benchmark-{name}")
            stores[name] = open_store(store_settings)
            echo("      " + index_shards(stores[name], shards, progress=progress).describe())
        targets = {FAST: SearchTarget(store=stores[FAST], encoder=encoders[FAST], fine_encoder=encoders[STRONG],
                                      prompt_template=settings.prompt_template),
                   STRONG: SearchTarget(store=stores[STRONG], encoder=encoders[STRONG],
                                        prompt_template=settings.prompt_template)}
        configs = standard_configs()
        echo(f"[4/4] {len(configs)} configurations × {queries_per_category * 3} queries")
        evaluation = evaluate(targets, read_queries(files.queries), read_qrels(files.qrels), configs,
                              measures=standard_measures(relevant_grade=2), max_image_pixels=settings.max_image_pixels,
                              encode_threads=settings.serve_torch_threads, progress=progress)
    finally:
        for store in stores.values():
            store.close()
    # The default request is whatever SearchOptions() is: the benchmark follows the code's defaults.
    evaluation.default = next(c.name for c in configs if c.target == FAST and c.options == SearchOptions())
    evaluation.info.update({
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "command": " ".join(["clip-sidecar", *sys.argv[1:]]),
        "store": settings.store,
        "targets": f"{FAST} = the fast model's store ({encoders[FAST].signature.describe()}) with fine vectors by "
                   f"the strong model; {STRONG} = the strong model's own store ({encoders[STRONG].signature.describe()})",
        "catalogue": f"{items} products (seed {seed}); queries and graded judgments in {catalogue_dir}",
        "relevant": "grade 2 (every attribute the query names) for MRR and Recall; nDCG uses grades 1 and 2",
    })
    report = write_report(evaluation, out, title="clip-sidecar relevance benchmark")
    return evaluation, report


def _catalogue(folder: Path, *, items: int, queries_per_category: int, seed: int, progress: bool,
               echo: Callable[[str], None]):
    """Reuse a catalogue written with the same parameters; otherwise write it afresh. The parameters' stamp
    is removed before the rewrite and put back (renamed into place) after it: a run killed in between
    leaves no stamp, so no later run takes a half-rewritten catalogue, or another one, for its own."""
    from sidecar.model.catalogue import CatalogueFiles, write_catalogue

    parameters = {"items": items, "queries_per_category": queries_per_category, "seed": seed}
    stamp = folder / "parameters.json"
    files = CatalogueFiles(manifest=folder / "corpus" / "manifest.jsonl", queries=folder / "queries.jsonl",
                           qrels=folder / "qrels.txt")
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == parameters and all(
            p.is_file() for p in (files.manifest, files.queries, files.qrels)):
        echo(f"[2/4] catalogue: reusing {folder}")
        return files
    echo(f"[2/4] rendering a {items}-product catalogue with {queries_per_category} queries per kind into {folder}")
    stamp.unlink(missing_ok=True)
    files = write_catalogue(folder, items, queries_per_category=queries_per_category, seed=seed, progress=progress)
    partial = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(parameters) + "\n", encoding="utf-8")
    os.replace(partial, stamp)
    return files
