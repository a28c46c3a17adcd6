"""`clip-sidecar demo`: tiny model → synthetic corpus → embed → embedded store → sample queries."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable, Sequence

import click
from click.core import ParameterSource

from sidecar.cli.output import command_name, format_hits
from sidecar.config import Settings

SAMPLE_QUERIES = ("red circle", "a large blue square on the left", "green triangle", "small yellow star")
DEMO_HOST = "127.0.0.1"  # the demo serves this machine only: it has no API keys


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("data/demo"), show_default=True,
              help="Folder of the demo's corpus, shards and store (WORKDIR/store); a rerun updates them.")
@click.option("--items", type=click.IntRange(10), default=2000, show_default=True, help="Synthetic images to render.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the rendered corpus (the tiny CLIP is the same whatever it is).")
@click.option("--serve", "serve_page", is_flag=True,
              help="Then serve the search page (and the API) on --port until Ctrl-C; it prints the URL to open.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="Port of the search page with --serve (on 127.0.0.1: this machine only).")
@click.pass_context
def demo(ctx: click.Context, workdir: Path, items: int, seed: int, serve_page: bool, port: int) -> None:
    """Everything end to end on a bare machine: train the tiny CLIP (cached), render a synthetic
    corpus, embed it, index it into an embedded store, and run sample queries in every mode
    (`clip-sidecar eval --benchmark` measures the modes, and the fine-ranking stage, on judged queries).
    With --serve, the search page then shows the same store in a browser."""
    if serve_page:  # a port already taken is said now, not after the demo's minutes of work
        from sidecar.cli.serve import refuse_an_address_taken

        refuse_an_address_taken(DEMO_HOST, port)
    # The corpus flags given, so the "this demo, then the search page" command it ends with is of this demo.
    given = [f"--{name} {shlex.quote(str(ctx.params[name]))}" for name in ("workdir", "items", "seed")
             if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]
    run_demo(workdir, items=items, seed=seed, progress=ctx.obj["progress"], echo=click.echo,
             serve_port=port if serve_page else None, demo_flags=given)


def run_demo(workdir: Path, *, items: int, seed: int, progress: bool, echo: Callable[[str], None],
             serve_port: int | None = None, demo_flags: Sequence[str] = ()) -> None:
    """`demo_flags`: the demo's own flags that were given (--workdir, --items, --seed), which the command it
    prints to run this demo with the search page repeats."""
    # Heavy imports (torch, faiss) here, so `clip-sidecar --help` stays fast.
    from sidecar.ingest.embed import embed_corpus
    from sidecar.ingest.indexing import index_shards
    from sidecar.model.encoder import load_encoder
    from sidecar.model.synthetic import write_corpus
    from sidecar.retrieval.evaluation import ann_recall
    from sidecar.retrieval.search import SearchOptions, query_vector, search
    from sidecar.stores.embedded import EmbeddedStore

    settings = Settings.from_env(store_path=workdir / "store")
    echo(f"[1/5] model: {settings.model} (the tiny synthetic-data CLIP is trained once and cached in "
         f"{settings.cache_dir})")
    encoder = load_encoder(settings)
    echo(f"      {encoder.signature.describe()} on {encoder.device}")

    # Rendered on every run, never reused: a rerun with other --items or --seed must show that corpus, and the
    # same flags give the same bytes (a second of work for 2,000 images), which embed then finds unchanged.
    echo(f"[2/5] rendering {items} synthetic product photos into {workdir / 'corpus'}")
    manifest = write_corpus(workdir / "corpus", items, seed=seed, progress=progress)

    echo("[3/5] embedding images into shards (only new or changed files on a rerun)")
    summary = embed_corpus(encoder, manifest, workdir / "shards", workers=2, progress=progress)
    echo(f"      {summary.describe()}")

    echo(f"[4/5] indexing into the embedded store at {settings.store_path}")
    store = EmbeddedStore(settings.store_path)
    try:
        echo(f"      {index_shards(store, workdir / 'shards', progress=progress).describe()}")
        echo("[5/5] sample queries")
        for text in SAMPLE_QUERIES:
            vector = encoder.encode_texts([settings.prompt(text)])[0]
            for mode in ("vector", "bm25", "hybrid"):
                # No fine model in the demo: the rerank stage has nothing stronger to rank with.
                result = search(store, vector=vector, text=text, options=SearchOptions(mode=mode, k=5, rerank=False))
                echo(f"\n  query {text!r} — mode {mode}")
                echo(_indent(format_hits(result.hits)))
        first = next(iter(store.fetch(sorted(store.content_hashes())[:1])))
        image_path = manifest.parent / f"{first.id}.jpg"
        vector = encoder.encode_image_files([image_path.read_bytes()], max_pixels=settings.max_image_pixels)[0]
        result = search(store, vector=query_vector(None, vector), text=None, options=SearchOptions(mode="vector", k=5))
        echo(f"\n  image query {image_path.name} ({first.text}) — more like this photo")
        echo(_indent(format_hits(result.hits)))
        echo("\n" + ann_recall(store, queries=100, k=10, depth=settings.rerank_candidates,
                                progress=progress).describe())
    finally:
        store.close()
    command = command_name()
    store_path = shlex.quote(str(settings.store_path))  # a path with a space is one argument when pasted
    search_next = f"{command} search \"red circle\" --store-path {store_path}"
    serve_next = f"{command} serve --store-path {store_path}"
    if serve_port is not None:
        from sidecar.cli.serve import run_server

        # Said before the server takes the terminal: after Ctrl-C nothing else tells where the demo's store is
        # (`search` and `serve` default to another path).
        echo(f"\nAfter Ctrl-C: {search_next}\n"
             f"              {serve_next} --port {serve_port}")
        echo(f"\nSearch page: {page_url(serve_port)}  (open it in a browser; Ctrl-C stops the server)")
        run_server(settings, host=DEMO_HOST, port=serve_port)
        return
    echo(f"\nNext: {search_next}\n"
         f"      {serve_next}   (then open {page_url(8080)})\n"
         f"      or {' '.join([command, 'demo', *demo_flags, '--serve'])}: this demo, then the search page")


def page_url(port: int) -> str:
    return f"http://{DEMO_HOST}:{port}/"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
