"""The `clip-sidecar` command line: embed, index, search, serve, eval, demo, cache and OpenSearch setup."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from sidecar.config import Settings

log = logging.getLogger("sidecar")

MODEL_FLAGS = ("model", "pretrained", "model_config", "device", "precision")
STORE_FLAGS = ("store", "store_path", "opensearch_url", "opensearch_index")


def _model_options(func: Callable) -> Callable:
    options = [
        click.option("--model", help="open_clip model name, e.g. ViT-B-32 (default: the tiny synthetic model)."),
        click.option("--pretrained", help="Pretrained tag (e.g. laion2b_s34b_b79k) or a checkpoint file path."),
        click.option("--model-config", type=click.Path(exists=True, dir_okay=True),
                     help="JSON model config (or folder of them) for architectures open_clip lacks."),
        click.option("--device", help="auto (default: CUDA if present), cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
                     help="auto = bf16/fp16 autocast on GPU, fp32 on CPU."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def _store_options(func: Callable) -> Callable:
    options = [
        click.option("--store", type=click.Choice(["embedded", "opensearch"]), help="Where vectors live (default embedded)."),
        click.option("--store-path", type=click.Path(path_type=Path), help="Embedded store directory (default data/store)."),
        click.option("--opensearch-url", help="OpenSearch URL (default http://127.0.0.1:9250)."),
        click.option("--opensearch-index", help="OpenSearch alias to read and write (default clip-sidecar)."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def _settings(kwargs: dict[str, Any], names: tuple[str, ...]) -> Settings:
    try:
        return Settings.from_env(**{name: kwargs.pop(name, None) for name in names})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


class _Group(click.Group):
    """Turns the errors a user can fix (wrong model, bad corpus, unreachable store) into one
    clear line and exit code 1, instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from sidecar.corpus import CorpusError
        from sidecar.shards import ShardError
        from sidecar.stores.base import StoreError

        try:
            return super().invoke(ctx)
        except (CorpusError, ShardError, StoreError) as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings only, no progress bars.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """CLIP image/text search: embed images offline, index them into the embedded store or
    OpenSearch, and search by text, image or both (vector, BM25, hybrid, rerank).

    \b
    First run (no cluster, no downloads):   clip-sidecar demo
    Your own images:
      clip-sidecar embed photos/ --out data/shards --model ViT-B-32 --pretrained laion2b_s34b_b79k
      clip-sidecar index data/shards
      clip-sidecar search "red sneakers" --model ViT-B-32 --pretrained laion2b_s34b_b79k
      clip-sidecar serve --workers 2

    Every option can also come from a SIDECAR_* environment variable (see README).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"progress": not quiet}


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/shards"), show_default=True,
              help="Shard directory (reused by reruns: only new or changed images are embedded).")
@click.option("--batch-size", type=click.IntRange(1, 8192), default=256, show_default=True)
@click.option("--shard-size", type=click.IntRange(1), default=4096, show_default=True,
              help="Vectors per shard file; a killed run loses at most the shard in progress.")
@click.option("--workers", type=click.IntRange(0), default=min(4, os.cpu_count() or 1), show_default=True,
              help="Decode/resize worker processes (0 = decode in the main process).")
@click.option("--decode", type=click.Choice(["auto", "cpu", "device"]), default="auto", show_default=True,
              help="Where JPEGs are decoded and resized: cpu (PIL workers) or device (batched on the model's "
                   "device, nvjpeg on a GPU); auto = device on CUDA, else cpu.")
@_model_options
@click.pass_context
def embed(ctx: click.Context, source: Path, out: Path, batch_size: int, shard_size: int, workers: int,
          decode: str, **kwargs: Any) -> None:
    """Embed the images of SOURCE into vector shards.

    SOURCE is a folder of images (a .txt beside an image is its text; else the file name is),
    or a .jsonl / .csv manifest with fields id, path (relative to the manifest), text, and
    metadata (JSONL object, or any extra CSV columns). Rerun it after the folder changes:
    new and changed files are embedded, vanished ones are recorded for the index step, and a
    killed run continues where it stopped. Unusable images are skipped and listed in
    OUT/errors.jsonl with the reason.
    """
    from sidecar.embed import embed_corpus
    from sidecar.encoder import load_encoder

    settings = _settings(kwargs, MODEL_FLAGS)
    summary = embed_corpus(load_encoder(settings), source, out, batch_size=batch_size, shard_size=shard_size,
                           workers=workers, max_pixels=settings.max_image_pixels, decode=decode,
                           progress=ctx.obj["progress"])
    click.echo(summary.describe())


@main.command()
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("data/shards"))
@click.option("--rebuild", is_flag=True,
              help="OpenSearch only: build a new versioned index and swap the alias when it is complete "
                   "(zero downtime); without it, changed documents are upserted in place.")
@_store_options
@click.pass_context
def index(ctx: click.Context, shards: Path, rebuild: bool, **kwargs: Any) -> None:
    """Load vector SHARDS (from `embed`) into the store: new and changed documents are written,
    unchanged ones skipped, deleted ones removed. Shards of a different model than the store
    holds are refused."""
    from sidecar.indexing import index_shards, rebuild_index
    from sidecar.stores import open_store

    settings = _settings(kwargs, STORE_FLAGS)
    store = open_store(settings)
    try:
        if rebuild:
            summary = rebuild_index(store, shards, progress=ctx.obj["progress"])
        else:
            summary = index_shards(store, shards, progress=ctx.obj["progress"])
    finally:
        store.close()
    click.echo(summary.describe())


@main.command()
@click.argument("text", required=False)
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Query image (alone: more like this photo; with TEXT: both).")
@click.option("--mode", type=click.Choice(["vector", "bm25", "hybrid"]), help="Default: hybrid with text, vector without.")
@click.option("-k", "--k", "k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--candidates", type=click.IntRange(1, 10000), default=100, show_default=True,
              help="How many coarse hits the rerank sees.")
@click.option("--fusion", type=click.Choice(["minmax", "zscore", "rrf"]), default="minmax", show_default=True)
@click.option("--vector-weight", type=float, default=0.7, show_default=True)
@click.option("--bm25-weight", type=float, default=0.3, show_default=True)
@click.option("--no-rerank", is_flag=True, help="Skip the second stage (to measure what it adds).")
@click.option("--exact", is_flag=True, help="Brute-force vector search instead of HNSW.")
@click.option("--filter", "filters", multiple=True, metavar="FIELD=VALUE",
              help="Metadata filter, repeatable; FIELD=a,b matches either.")
@click.option("--json", "as_json", is_flag=True, help="Print hits as JSON.")
@_model_options
@_store_options
def search(text: str | None, image: Path | None, mode: str | None, k: int, candidates: int, fusion: str,
           vector_weight: float, bm25_weight: float, no_rerank: bool, exact: bool, filters: tuple[str, ...],
           as_json: bool, **kwargs: Any) -> None:
    """Search the store by TEXT, --image, or both."""
    from sidecar.encoder import load_encoder
    from sidecar.images import ImageDecodeError, decode_image
    from sidecar.search import SearchOptions, query_vector
    from sidecar.search import search as run_search
    from sidecar.stores import open_store

    if not text and image is None:
        raise click.UsageError("give TEXT, --image, or both")
    settings = _settings(kwargs, MODEL_FLAGS + STORE_FLAGS)
    try:
        options = SearchOptions(mode=mode or ("hybrid" if text else "vector"), k=k, candidates=candidates,
                                fusion=fusion, weights=(vector_weight, bm25_weight), rerank=not no_rerank,
                                exact=exact, filters=_parse_filters(filters))
        query_image = decode_image(image.read_bytes(), max_pixels=settings.max_image_pixels) if image else None
    except (ValueError, ImageDecodeError) as exc:
        raise click.BadParameter(str(exc)) from exc
    encoder = load_encoder(settings)
    store = open_store(settings)
    try:
        text_vector = encoder.encode_texts([settings.prompt(text)])[0] if text else None
        image_vector = encoder.encode_images([query_image])[0] if query_image is not None else None
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


def format_hits(hits: list) -> str:
    """A ranked table: rank, final score, per-stage scores, id and text."""
    if not hits:
        return "(no hits)"
    lines = [f"{'#':>3}  {'score':>7}  {'vector':>7}  {'bm25':>7}  {'id':<14}  text"]
    for rank, hit in enumerate(hits, start=1):
        vector = hit.scores.get("vector")
        bm25 = hit.scores.get("bm25")
        lines.append(f"{rank:>3}  {hit.score:7.3f}  {_fmt(vector):>7}  {_fmt(bm25):>7}  {hit.id:<14}  {hit.text}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Gunicorn worker processes; each loads the model once, after the fork. With a GPU the "
                   "request path's CPU sets the ceiling: about one worker per two cores (8 on 16 vCPUs).")
@click.option("--threads", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Request threads per worker; they share that worker's micro-batcher.")
@click.option("--dev", is_flag=True, help="Flask's development server instead of gunicorn (development only).")
@_model_options
@_store_options
def serve(host: str, port: int, workers: int, threads: int, dev: bool, **kwargs: Any) -> None:
    """Serve the HTTP API: /v1/embeddings, /v1/search, /healthz, /readyz, /metrics."""
    settings = _settings(kwargs, MODEL_FLAGS + STORE_FLAGS)
    if dev:
        from sidecar.app import create_app

        create_app(settings).run(host=host, port=port, threaded=True)
        return
    # Gunicorn workers rebuild Settings from the environment: hand the flags over that way.
    overrides = {name: getattr(settings, name) for name in MODEL_FLAGS + STORE_FLAGS}
    env = {**os.environ, **{f"SIDECAR_{k.upper()}": str(v) for k, v in overrides.items()}}
    config = Path(__file__).resolve().parent.parent / "docker" / "gunicorn.conf.py"
    args = [sys.executable, "-m", "gunicorn", "--config", str(config), "--bind", f"{host}:{port}",
            "--workers", str(workers), "--threads", str(threads), "sidecar.wsgi:app"]
    log.info("starting gunicorn: %s", " ".join(args[2:]))
    os.execve(sys.executable, args, env)


@main.command()
@click.option("--queries", type=click.IntRange(1), default=200, show_default=True, help="Random stored vectors used as queries.")
@click.option("-k", "--k", "k", type=click.IntRange(1, 1000), default=10, show_default=True)
@_store_options
def eval(queries: int, k: int, **kwargs: Any) -> None:  # noqa: A001 - the command's name
    """Validate the ANN index against exact search: Recall@K and latency p50/p95 of both."""
    from sidecar.evaluation import ann_recall
    from sidecar.stores import open_store

    store = open_store(_settings(kwargs, STORE_FLAGS))
    try:
        report = ann_recall(store, queries=queries, k=k)
    finally:
        store.close()
    click.echo(report.describe())


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("data/demo"), show_default=True)
@click.option("--items", type=click.IntRange(10), default=2000, show_default=True, help="Synthetic images to render.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def demo(ctx: click.Context, workdir: Path, items: int, seed: int) -> None:
    """Everything end to end on a bare machine: train the tiny CLIP (cached), render a synthetic
    corpus, embed it, index it into an embedded store, and run sample queries in every mode."""
    from sidecar.demo import run_demo

    run_demo(workdir, items=items, seed=seed, progress=ctx.obj["progress"], echo=click.echo)


@main.group()
def cache() -> None:
    """The text-vector cache (keyed by model, weights, prompt template version and text)."""


@cache.command("warm")
@click.argument("prompts", type=click.File("r", encoding="utf-8"))
@_model_options
def cache_warm(prompts, **kwargs: Any) -> None:
    """Pre-compute vectors for PROMPTS (one text per line; - for stdin) so the first queries hit."""
    from sidecar.encoder import load_encoder
    from sidecar.encoding import EncodingService

    settings = _settings(kwargs, MODEL_FLAGS)
    texts = list(dict.fromkeys(line.strip() for line in prompts if line.strip()))
    service = EncodingService(load_encoder(settings), settings)
    try:
        started = time.perf_counter()
        for start in range(0, len(texts), settings.max_batch_items):
            service.encode_texts(texts[start:start + settings.max_batch_items])
        click.echo(f"{len(texts)} prompts cached in {time.perf_counter() - started:.1f} s; "
                   f"{service.cache.persisted_count()} vectors stored for this model and prompt version")
    finally:
        service.close()


@main.group()
def opensearch() -> None:
    """OpenSearch: apply the project's index template, mapping and search pipelines."""


@opensearch.command("setup")
@_model_options
@_store_options
def opensearch_setup(**kwargs: Any) -> None:
    """Create (idempotently) the k-NN index and alias, sized for the model, and the hybrid
    search pipelines. Safe to rerun."""
    from sidecar.encoder import load_encoder
    from sidecar.stores import open_store

    settings = _settings(kwargs, MODEL_FLAGS + STORE_FLAGS)
    settings = Settings.from_env(**{**{n: getattr(settings, n) for n in MODEL_FLAGS + STORE_FLAGS},
                                    "store": "opensearch"})
    encoder = load_encoder(settings)
    store = open_store(settings)
    try:
        store.claim(encoder.signature)  # creates index, alias and pipelines if missing
    finally:
        store.close()
    click.echo(f"OpenSearch index {settings.opensearch_index} ready for {encoder.signature.describe()}")


if __name__ == "__main__":
    main()
