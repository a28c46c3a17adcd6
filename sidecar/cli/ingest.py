"""`clip-sidecar embed` and `index`: images → vector shards → the store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from sidecar.cli.prompts import TAG_HELP, parse_tag_specs
from sidecar.cli.root import (
    MODEL_FLAGS,
    PROMPT_FLAGS,
    STORE_FLAGS,
    FiniteFloatRange,
    model_options,
    prompt_sets_option,
    settings_from,
    store_options,
    writable_folder,
)
from sidecar.config import DECODE_MODES, EMBED_ENGINES, JPEG_DECODERS, THUMBNAIL_SIDE


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/shards"), show_default=True,
              help="Shard directory (reused by reruns: only new or changed images are embedded).")
@click.option("--batch-size", type=click.IntRange(1, 8192), default=256, show_default=True,
              help="Images per forward pass of the model: larger keeps a GPU busier, at more memory.")
@click.option("--shard-size", type=click.IntRange(1), default=4096, show_default=True,
              help="Vectors per shard file. The local engine writes a shard once this many vectors are waiting "
                   "and does not split a batch, so its shards hold up to --shard-size + --batch-size - 1. A killed "
                   "run loses at most the shard in progress.")
# Each decode worker is a process with memory of its own: past a few per core they add memory, not speed.
@click.option("--workers", type=click.IntRange(0, 256), default=min(4, os.cpu_count() or 1), show_default=True,
              help="Decode/resize worker processes (0 = decode in the main process); one or two per core.")
@click.option("--decode", type=click.Choice(DECODE_MODES), default="auto", show_default=True,
              help="Where JPEGs are decoded and resized: cpu (the decode workers), device (batched on the "
                   "model's device, by --jpeg-decoder), or split (both at once: the workers decode the share of "
                   "JPEGs that keeps pace with the device, measured as the job runs); auto = device on CUDA, else "
                   "cpu. The ray engine decodes on CPU tasks.")
@click.option("--jpeg-decoder", type=click.Choice(JPEG_DECODERS), default="torchvision", show_default=True,
              help="What decodes the device's JPEGs (--decode device, split, or auto on CUDA): torchvision "
                   "(nvjpeg, its Huffman stage on one CPU thread) or nvimagecodec (NVIDIA's nvImageCodec: the "
                   "hardware JPEG decoders of A100/H100/H200-class GPUs, CPU stages on a thread pool; pip install "
                   "'clip-sidecar[nvimagecodec]').")
@click.option("--thumbnail-size", "thumbnail_side", type=click.IntRange(0, 1024), default=None,
              metavar="PIXELS",
              help="Longer side of the JPEG thumbnail kept for each image (the search page shows them; the "
                   f"store serves them by document id); 0 = none. Default {THUMBNAIL_SIDE} for a new --out; a "
                   "rerun without it keeps OUT's size, none included. A size is fixed per --out once its shards "
                   "hold thumbnails; shards without them get theirs from a run that names a size.")
@click.option("--tag", "tags", multiple=True, metavar="SET[:K|THRESHOLD]",
              help=TAG_HELP + " Default: the sets OUT was last tagged with (`clip-sidecar tag OUT --clear` drops "
                              "them).")
@click.option("--allow-empty", is_flag=True,
              help="Let a SOURCE with no images record every document OUT holds as deleted (the next `index` removes "
                   "them). Without it such a run is refused: a disk not mounted shows an empty folder.")
@click.option("--engine", type=click.Choice(EMBED_ENGINES), default="local", show_default=True,
              help="local: this machine's processes. ray: a Ray cluster (pip install 'clip-sidecar[ray]') decodes "
                   "on CPU tasks and runs the model on actors, one per GPU; same shards, skips and reruns.")
@click.option("--address", envvar="RAY_ADDRESS", default="local", show_default=True,
              help="--engine ray: the cluster's address (HOST:PORT of its head, as `ray start --head` prints it, "
                   "or ray://HOST:PORT of its Ray Client, port 10001 by default; else RAY_ADDRESS); local starts a "
                   "Ray of this command's own on this machine. Every node must see SOURCE and --out at the same "
                   "paths. An address that accepts no connection within 5 s fails then, naming it, as does one "
                   "where no Ray head or Ray Client server answers within 6 s more (another server, the "
                   "dashboard's port): Ray alone retries either for minutes.")
@click.option("--actors", type=click.IntRange(0), default=0, show_default=True,
              help="--engine ray: most encoder actors; 0 = one per GPU of the cluster, or as many CPU actors as "
                   "its CPUs hold.")
@click.option("--actor-cpus", type=FiniteFloatRange(0.01), default=1.0, show_default=True,
              help="--engine ray: CPUs each encoder actor reserves.")
@click.option("--task-cpus", type=FiniteFloatRange(0.01), default=1.0, show_default=True,
              help="--engine ray: CPUs each hash, decode or shard-writing task reserves.")
@prompt_sets_option
@model_options
@click.pass_context
def embed(ctx: click.Context, source: Path, out: Path, batch_size: int, shard_size: int, workers: int,
          decode: str, jpeg_decoder: str, thumbnail_side: int | None, tags: tuple[str, ...], allow_empty: bool,
          engine: str, address: str, actors: int, actor_cpus: float, task_cpus: float, **kwargs: Any) -> None:
    """Embed the images of SOURCE into vector shards.

    SOURCE is a folder of images (a .txt beside an image is its text; else the file name is;
    macOS's ._NAME twins and __MACOSX folders are not images and are left out),
    or a .jsonl / .csv / .parquet manifest with fields id, path (relative to the manifest; the
    only one required), text, and metadata (a JSONL object or Parquet struct column; any other
    CSV or Parquet columns are metadata too). Rerun it after the folder changes: new and changed
    files are embedded, vanished ones are recorded for the index step, a killed run continues
    where it stopped (a SOURCE with no images at all over shards that hold some is refused unless
    --allow-empty; a file or folder it cannot read is refused, naming it), and after a move (SOURCE in another folder or on another machine) the rows
    of unchanged images name their new paths, with nothing embedded again. A file or subfolder
    renamed or moved within SOURCE (or SOURCE given as a parent folder) gives its items new ids:
    each gets the stored vectors and thumbnail of its image bytes under the new id, with no
    forward pass, and the old id counts as vanished. Copies among the new files (the same bytes)
    are encoded once: each copy gets the first's vectors and thumbnail. Unusable images (and
    files whose name or caption is not UTF-8) are skipped and listed in OUT/errors.jsonl with the
    reason; one under an id embedded before counts as
    vanished (`index` removes the old image's vector) until a rerun finds a usable file there. With
    --fine-model, each image's vector by that stronger model is stored too, for the fine-ranking
    stage (rerank) of `search` and `serve`. Each image's thumbnail goes into the shards too
    (--thumbnail-size; a rerun keeps OUT's). With --tag, each document's
    metadata gets the top labels of prompt sets (`clip-sidecar prompts`), which `index` loads as
    keyword fields to filter on: `--filter tag_SET=LABEL`. One job at a time writes OUT: an `embed` or
    `tag` started while another writes it is refused at once, naming it (a killed run holds nothing).

    \b
    On a Ray cluster (same shards; a rerun of either engine continues the other's work):
      clip-sidecar embed photos.jsonl --out /shared/shards --engine ray --address HEAD:6379
    """
    from sidecar.ingest.shards import ShardSet
    from sidecar.ingest.tagging import Tagger, recorded_specs
    from sidecar.model.encoder import Encoder, load_encoder, load_fine_encoder
    from sidecar.model.prompts import PromptSetRegistry

    settings = settings_from(kwargs, MODEL_FLAGS + PROMPT_FLAGS)
    writable_folder(out)  # before the model loads
    specs = parse_tag_specs(tags)
    recorded_in = None if specs else out
    specs = specs or recorded_specs(ShardSet(out))

    def load_tagger(encoder: Encoder) -> Tagger | None:  # either engine's, by the model it embeds with
        return (Tagger.load(specs, PromptSetRegistry(settings.prompt_sets_dir), encoder, recorded_in=recorded_in)
                if specs else None)

    if engine == "ray":
        from sidecar.ingest.ray_engine import RayResources, RayUnavailable, embed_corpus_on_ray

        if decode in ("device", "split"):
            raise click.UsageError(f"--engine ray decodes on CPU tasks: --decode {decode} is for the local engine")
        if jpeg_decoder != "torchvision":
            raise click.UsageError(f"--engine ray decodes on CPU tasks: --jpeg-decoder {jpeg_decoder} is for the "
                                   "local engine's --decode device or split")
        try:
            summary = embed_corpus_on_ray(settings, source, out, address=address, batch_size=batch_size,
                                          shard_size=shard_size, max_pixels=settings.max_image_pixels,
                                          thumbnail_side=thumbnail_side, load_tagger=load_tagger,
                                          allow_empty=allow_empty,
                                          resources=RayResources(actors=actors, actor_cpus=actor_cpus,
                                                                 task_cpus=task_cpus),
                                          progress=ctx.obj["progress"], verbose=ctx.obj["verbose"])
        except RayUnavailable as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        from sidecar.ingest.embed import embed_corpus
        from sidecar.model.images import JpegDecoderUnavailable

        encoder = load_encoder(settings)
        try:
            summary = embed_corpus(encoder, source, out, batch_size=batch_size, shard_size=shard_size,
                                   workers=workers, max_pixels=settings.max_image_pixels, decode=decode,
                                   jpeg_decoder=jpeg_decoder, fine_encoder=load_fine_encoder(settings),
                                   thumbnail_side=thumbnail_side, tagger=load_tagger(encoder),
                                   allow_empty=allow_empty, progress=ctx.obj["progress"])
        except JpegDecoderUnavailable as exc:
            raise click.UsageError(f"--jpeg-decoder {jpeg_decoder}: {exc}") from exc
    click.echo(summary.describe())


@click.command()
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("data/shards"))
@click.option("--rebuild", is_flag=True,
              help="Build the store anew from SHARDS beside the one serving and switch to it when complete (zero "
                   "downtime; the shards may be of another model): OpenSearch swaps its alias onto a new "
                   "versioned index, the embedded store points STORE_PATH/current at a new version directory. "
                   "Running servers answer from the old contents until the switch, then from the new, without a "
                   "restart. A killed rebuild leaves the old store serving; rerun it. Without --rebuild, changed "
                   "documents are upserted in place.")
@click.option("--drop-unsharded", is_flag=True,
              help="With --rebuild: drop the stored documents no shard holds (written through OpenSearch's ingest "
                   "pipeline, or by another shard directory); without it such a rebuild is refused, naming them, "
                   "before anything changes.")
@click.option("--wait-for-lock", "lock_wait_s", type=FiniteFloatRange(0), default=0, show_default=True,
              metavar="SECONDS",
              help="Wait up to SECONDS for the load holding the store's load lock to finish (a --rebuild, for "
                   "an index run; an index run, for a --rebuild; on OpenSearch also another index run); 0 refuses "
                   "at once, naming the holder.")
@store_options
@click.pass_context
def index(ctx: click.Context, shards: Path, rebuild: bool, drop_unsharded: bool, lock_wait_s: float,
          **kwargs: Any) -> None:
    """Load vector SHARDS (from `embed`) into the store: new and changed documents (by the hash
    of image, text and metadata) are written, unchanged ones skipped, deleted ones removed.
    Shards of a different model than the store holds are refused.

    One run is one load session: the embedded store saves its HNSW graph once at the end;
    OpenSearch holds the alias's load lock for the run (a concurrent --rebuild or index run waits
    or is refused) and relaxes refresh and replicas once when the run is large; the embedded store
    holds its load lock shared (index runs go side by side, a --rebuild waits or is refused). A killed run
    leaves what it committed; rerun it to write the rest (`clip-sidecar store check` tells).
    With a recall target (--target-recall, SIDECAR_TARGET_RECALL), a run that changed a tenth of
    the documents or more (or left the store uncalibrated) calibrates the search effort again."""
    from sidecar.ingest.indexing import index_shards, rebuild_index
    from sidecar.stores import open_store

    if drop_unsharded and not rebuild:
        raise click.UsageError("--drop-unsharded goes with --rebuild: `index` alone keeps every stored document")
    settings = settings_from(kwargs, STORE_FLAGS)
    store = open_store(settings, progress=ctx.obj["progress"])
    try:
        if rebuild:
            summary = rebuild_index(store, shards, lock_wait_s=lock_wait_s, drop_unsharded=drop_unsharded,
                                    progress=ctx.obj["progress"])
        else:
            summary = index_shards(store, shards, lock_wait_s=lock_wait_s, progress=ctx.obj["progress"])
        click.echo(summary.describe())
        if settings.target_recall:
            from sidecar.retrieval.calibration import recalibrate_if_changed

            effort, decision = recalibrate_if_changed(store, changed=summary.written + summary.deleted,
                                                      depth=settings.rerank_candidates,
                                                      queries=settings.calibration_queries,
                                                      progress=ctx.obj["progress"])
            click.echo(f"search effort: {decision}" + (f"\n{effort.describe()}" if effort else ""))
    finally:
        store.close()
