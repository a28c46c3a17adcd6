"""`clip-sidecar store check` and `store repair`: is the store consistent, and rebuild what can be rebuilt."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import click

from sidecar.cli.root import (
    STORE_FLAGS,
    STORE_LOCATION_FLAGS,
    open_existing_store,
    settings_from,
    store_location_options,
    store_options,
)
from sidecar.config import Settings
from sidecar.stores.base import Store, StoreDamaged


@click.group()
def store() -> None:
    """Check the store's consistency, or repair it (after a crash, a power loss, a killed run)."""


@store.command()
@store_location_options
def check(**kwargs: Any) -> None:
    """Report whether the store is consistent; exit status 1 when it is not.

    Embedded: SQLite integrity, committed rows against vectors.f32, the HNSW graph against the
    live rows and their vectors, the BM25 (tantivy) index against the live texts; notes name harmless
    leftovers of an interrupted write and rows the graph does not cover yet (searched exactly).
    OpenSearch: the alias and its index, the load lock, settings an interrupted load left relaxed,
    versioned indices no alias names. Reads only, safe while the store serves, but for one thing every
    process that opens an embedded store does: a BM25 index that is missing or cannot be opened is built
    again from the documents first (with a warning). The embedded store's check holds its write lock while
    it reads (an `index` run's next write waits for it).
    """
    try:
        with _opened(kwargs) as opened:
            report = opened.check()
    except StoreDamaged as exc:  # too damaged to open, which is what the check finds
        report = exc.report
    click.echo(report.describe())
    if not report.clean:
        raise SystemExit(1)


@store.command()
@store_location_options
@click.pass_context
def repair(ctx: click.Context, **kwargs: Any) -> None:
    """Rebuild what can be rebuilt from what the store committed, say what was done, then check.

    Embedded: discards an uncommitted tail of vectors.f32, removes documents whose vectors were
    lost (a rerun of `clip-sidecar index` writes them again), rebuilds the BM25 (tantivy) index when it is
    out of step, rebuilds the HNSW graph when it is missing or does not match (else adds the rows
    it lacks), removes leftover files; safe to kill: a rerun does what the killed run left undone.
    OpenSearch: restores settings an interrupted load left relaxed, deletes versioned indices no
    alias names. Takes the store's write lock.
    """
    with _opened(kwargs, progress=ctx.obj["progress"]) as opened:
        report = opened.repair()
        click.echo(report.describe() if report.actions or report.problems else f"{report.location}: nothing to repair")
        after = opened.check()
    click.echo(after.describe())
    if not after.clean:
        raise SystemExit(1)


@store.command()
@click.option("-k", "--k", "target_recall_k", type=click.IntRange(1, 1000),
              help="K of Recall@K (default: SIDECAR_TARGET_RECALL_K, else 10).")
@click.option("--queries", "calibration_queries", type=click.IntRange(1),
              help="Stored vectors searched for (default: SIDECAR_CALIBRATION_QUERIES, else 300).")
@click.option("--seed", type=int, default=0, show_default=True, help="Which stored vectors are sampled.")
@click.option("--allow-exact/--ann-only", default=True, show_default=True,
              help="Choose exact search where it measures as fast as the ANN effort; --ann-only keeps the ANN "
                   "(exact search reads every vector: on a shared cluster it costs more than its latency shows).")
@store_options
@click.pass_context
def calibrate(ctx: click.Context, seed: int, allow_exact: bool, **kwargs: Any) -> None:
    """Choose the search effort for --target-recall and save it with the store.

    Samples stored vectors, searches each exactly and by HNSW at growing efSearch, as deep as
    searches do (SIDECAR_RERANK_CANDIDATES, 100: the store searches at least that wide, so no
    efSearch under it is tried), and keeps the lowest efSearch whose Recall@K against exact search
    reaches the target with 95 % confidence (exact search instead where it is as fast, or where no
    efSearch up to 4096 reaches it). Every
    server and command with the same target then gives that effort to the vector queries that
    name no ef_search of their own; `index` calibrates again after large changes, and /v1/status
    and /metrics show the live recall it gets on real queries.

    \b
      clip-sidecar store calibrate --target-recall 0.99
      clip-sidecar store calibrate --store opensearch --target-recall 0.95 -k 10 --queries 500
    """
    from sidecar.retrieval.calibration import calibrate as run_calibration

    settings = settings_from(kwargs, STORE_FLAGS + ("target_recall_k", "calibration_queries"))
    if not settings.target_recall:
        raise click.UsageError("give --target-recall (or SIDECAR_TARGET_RECALL) above 0, e.g. 0.99: 0 is no target, "
                               "the store's fixed ef_search")
    with _opened_with(settings) as opened:
        try:
            effort = run_calibration(opened, target_recall=settings.target_recall, k=settings.target_recall_k,
                                     depth=settings.rerank_candidates, queries=settings.calibration_queries, seed=seed, allow_exact=allow_exact,
                                     progress=ctx.obj["progress"])
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        opened.effort.save(effort)
    click.echo(effort.describe())
    # A calibration applies where both the target and K match (`SearchEffort.matches`).
    at_k = "" if effort.k == Settings.target_recall_k else f" with SIDECAR_TARGET_RECALL_K={effort.k}"
    click.echo(f"saved with the store: vector queries without ef_search get "
               f"{'exact search' if effort.exact else f'ef_search {effort.ef_search}'} wherever "
               f"SIDECAR_TARGET_RECALL={settings.target_recall:g} (or --target-recall) is set{at_k}")


@contextlib.contextmanager
def _opened(kwargs: dict[str, Any], *, progress: bool = False) -> Iterator[Store]:
    with _opened_with(settings_from(kwargs, STORE_LOCATION_FLAGS), progress=progress) as opened:
        yield opened


@contextlib.contextmanager
def _opened_with(settings: Settings, *, progress: bool = False) -> Iterator[Store]:
    opened = open_existing_store(settings, progress=progress)
    try:
        yield opened
    finally:
        opened.close()
