"""`clip-sidecar search` and `eval`: query the store from the terminal; validate its ANN index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from sidecar.cli.output import format_hits
from sidecar.cli.root import (
    MODEL_FLAGS,
    STORE_FLAGS,
    model_options,
    settings_from,
    store_options,
)
from sidecar.retrieval.fusion import FUSION_METHODS
from sidecar.retrieval.search import MODES


@click.command()
@click.argument("text", required=False)
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Query image (alone: more like this photo; with TEXT: both).")
@click.option("--mode", type=click.Choice(MODES), help="Default: hybrid with text, vector without.")
@click.option("-k", "--k", "k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--candidates", type=click.IntRange(1, 10000), default=100, show_default=True,
              help="How many coarse hits the rerank sees.")
@click.option("--fusion", type=click.Choice(FUSION_METHODS), default="minmax", show_default=True)
@click.option("--vector-weight", type=float, default=0.7, show_default=True)
@click.option("--bm25-weight", type=float, default=0.3, show_default=True)
@click.option("--no-rerank", is_flag=True, help="Skip the second stage (to measure what it adds).")
@click.option("--exact", is_flag=True, help="Brute-force vector search instead of HNSW.")
@click.option("--filter", "filters", multiple=True, metavar="FIELD=VALUE",
              help="Metadata filter, repeatable; FIELD=a,b matches either.")
@click.option("--json", "as_json", is_flag=True, help="Print hits as JSON.")
@model_options
@store_options
def search(text: str | None, image: Path | None, mode: str | None, k: int, candidates: int, fusion: str,
           vector_weight: float, bm25_weight: float, no_rerank: bool, exact: bool, filters: tuple[str, ...],
           as_json: bool, **kwargs: Any) -> None:
    """Search the store by TEXT, --image, or both."""
    from sidecar.model.encoder import load_encoder
    from sidecar.model.images import ImageDecodeError
    from sidecar.retrieval.search import SearchOptions, query_vector
    from sidecar.retrieval.search import search as run_search
    from sidecar.stores import open_store

    if not text and image is None:
        raise click.UsageError("give TEXT, --image, or both")
    settings = settings_from(kwargs, MODEL_FLAGS + STORE_FLAGS)
    try:
        options = SearchOptions(mode=mode or ("hybrid" if text else "vector"), k=k, candidates=candidates,
                                fusion=fusion, weights=(vector_weight, bm25_weight), rerank=not no_rerank,
                                exact=exact, filters=_parse_filters(filters))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    encoder = load_encoder(settings)
    image_vector = None
    if image is not None:
        try:
            image_vector = encoder.encode_image_files([image.read_bytes()], max_pixels=settings.max_image_pixels)[0]
        except ImageDecodeError as exc:
            raise click.BadParameter(f"{image}: {exc.reason}", param_hint="--image") from exc
    store = open_store(settings)
    try:
        text_vector = encoder.encode_texts([settings.prompt(text)])[0] if text else None
        result = run_search(store, vector=query_vector(text_vector, image_vector), text=text, options=options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([hit.to_dict() for hit in result.hits], indent=2))
    else:
        click.echo(format_hits(result.hits))


def _parse_filters(filters: tuple[str, ...]) -> dict[str, Any] | None:
    parsed: dict[str, Any] = {}
    for item in filters:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--filter {item!r}: expected FIELD=VALUE")
        values = value.split(",")
        parsed[field] = values if len(values) > 1 else value
    return parsed or None


@click.command("eval")
@click.option("--queries", type=click.IntRange(1), default=200, show_default=True, help="Random stored vectors used as queries.")
@click.option("-k", "--k", "k", type=click.IntRange(1, 1000), default=10, show_default=True)
@store_options
def eval_command(queries: int, k: int, **kwargs: Any) -> None:
    """Validate the ANN index against exact search: Recall@K and latency p50/p95 of both."""
    from sidecar.retrieval.evaluation import ann_recall
    from sidecar.stores import open_store

    store = open_store(settings_from(kwargs, STORE_FLAGS))
    try:
        report = ann_recall(store, queries=queries, k=k)
    finally:
        store.close()
    click.echo(report.describe())
