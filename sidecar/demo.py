"""The offline demo: tiny model → synthetic corpus → embed → embedded store → sample queries."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from sidecar.config import Settings
from sidecar.embed import embed_corpus
from sidecar.encoder import load_encoder
from sidecar.evaluation import ann_recall
from sidecar.images import decode_image
from sidecar.indexing import index_shards
from sidecar.search import SearchOptions, query_vector, search
from sidecar.stores.embedded import EmbeddedStore
from sidecar.synthetic import write_corpus

SAMPLE_QUERIES = ("red circle", "a large blue square on the left", "green triangle", "small yellow star")


def run_demo(workdir: Path, *, items: int, seed: int, progress: bool, echo: Callable[[str], None]) -> None:
    from sidecar.cli import format_hits  # the CLI's table, so demo and `search` print alike

    settings = Settings.from_env(store_path=workdir / "store")
    echo(f"[1/5] model: {settings.model} (the tiny synthetic-data CLIP is trained once and cached in "
         f"{settings.cache_dir})")
    encoder = load_encoder(settings)
    echo(f"      {encoder.signature.describe()} on {encoder.device}")

    manifest = workdir / "corpus" / "manifest.jsonl"
    if not manifest.exists():
        echo(f"[2/5] rendering {items} synthetic product photos into {manifest.parent}")
        write_corpus(manifest.parent, items, seed=seed, progress=progress)
    else:
        echo(f"[2/5] corpus: reusing {manifest}")

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
            for mode, rerank in (("vector", False), ("bm25", False), ("hybrid", False), ("hybrid", True)):
                options = SearchOptions(mode=mode, k=5, rerank=rerank)
                result = search(store, vector=vector, text=text, options=options)
                echo(f"\n  query {text!r} — mode {mode}{' + rerank' if rerank else ''}")
                echo(_indent(format_hits(result.hits)))
        first = next(iter(store.fetch(sorted(store.content_hashes())[:1])))
        image_path = manifest.parent / f"{first.id}.jpg"
        image = decode_image(image_path.read_bytes(), max_pixels=settings.max_image_pixels)
        result = search(store, vector=query_vector(None, encoder.encode_images([image])[0]), text=None,
                        options=SearchOptions(mode="vector", k=5))
        echo(f"\n  image query {image_path.name} ({first.text}) — more like this photo")
        echo(_indent(format_hits(result.hits)))
        echo("\n" + ann_recall(store, queries=100, k=10).describe())
    finally:
        store.close()
    echo(f"\nNext: clip-sidecar search \"red circle\" --store-path {settings.store_path}\n"
         f"      clip-sidecar serve --dev --store-path {settings.store_path}")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
