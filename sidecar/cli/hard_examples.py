"""`clip-sidecar hard-examples export`: the server's hard-example and feedback logs → an evaluation set
and image-text pairs for fine-tuning."""

from __future__ import annotations

from pathlib import Path

import click

from sidecar.config import Settings


@click.group("hard-examples")
def hard_examples() -> None:
    """The queries that failed users, as the server logged them (SIDECAR_QUALITY_LOG_DIR): hard
    examples (no result, nothing the model finds close, vector and BM25 disagreeing) and POST /v1/feedback."""


@hard_examples.command()
@click.option("--log-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The server's quality_log_dir (default: SIDECAR_QUALITY_LOG_DIR).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/hard-examples"),
              show_default=True, help="Folder for queries.jsonl, qrels.jsonl, to_judge.jsonl, pairs.csv, images/.")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The shards the store was indexed from: they know each document's image, for pairs.csv.")
@click.option("--min-relevance", type=click.IntRange(0, 3), default=1, show_default=True,
              help="The lowest grade (a click counts 1) a document needs to make a fine-tuning pair.")
def export(log_dir: Path | None, out: Path, shards: Path | None, min_relevance: int) -> None:
    """Write an evaluation set and fine-tuning pairs from the logs.

    The logs keep their newest records only (SIDECAR_QUALITY_LOG_MAX_BYTES x (1 + backups)): each
    export reads what they hold now and replaces the files in OUT, so export into a new --out to
    keep an earlier export's.

    \b
    OUT/queries.jsonl, OUT/qrels.jsonl  every query (text and filters) with feedback and its judged
        documents (a judgment's grade, else 1 for a click): run them, each with its filters, with
        clip-sidecar eval --queries OUT/queries.jsonl --qrels OUT/qrels.jsonl
        (categories are the hard-example reasons, so eval reports each kind apart)
    OUT/to_judge.jsonl  hard queries nobody gave feedback on yet, the most searched first, with
        the hits they were shown (an image query's image in OUT/images/)
    OUT/pairs.csv  (document image, query text) per judged document, each pair once, the images
        named by --shards, in open_clip's CSV format (tab-separated filepath, title), for
        open_clip's trainer (pip install webdataset), e.g.
        python -m open_clip_train.main --train-data OUT/pairs.csv --model ViT-B-32
            --pretrained laion2b_s34b_b79k --lr 1e-6 --epochs 1 --batch-size 64 --logs runs
        (--batch-size at most the number of pairs: the trainer drops an incomplete batch)
        then serve runs/<name>/checkpoints/epoch_1.pt (SIDECAR_PRETRAINED) and compare with
        `clip-sidecar eval` on OUT/queries.jsonl before switching.
    """
    from sidecar.ingest.shards import ShardSet
    from sidecar.retrieval.hard_examples import FEEDBACK_FILE, HARD_EXAMPLES_FILE, export_examples

    configured = Settings.from_env().quality_log_dir
    if log_dir is None and not configured:
        raise click.UsageError("give --log-dir (or SIDECAR_QUALITY_LOG_DIR): the folder the server logged to")
    folder = log_dir or Path(configured)
    if not folder.is_dir():  # --log-dir is checked by click; the setting is not
        raise click.ClickException(f"SIDECAR_QUALITY_LOG_DIR names {folder}, which is not a folder: give the one the "
                                   "server logs to (its SIDECAR_QUALITY_LOG_DIR), or --log-dir")
    if not any(path for name in (HARD_EXAMPLES_FILE, FEEDBACK_FILE) for path in folder.glob(f"{name}*")):
        # Four empty files and exit 0 would read as "nothing was logged" where the folder is the wrong one.
        raise click.ClickException(f"{folder} holds no {HARD_EXAMPLES_FILE} or {FEEDBACK_FILE}: is it the server's "
                                   "SIDECAR_QUALITY_LOG_DIR? The server writes them at its first hard query or "
                                   "feedback (SIDECAR_HARD_EXAMPLE_FRACTION: the share of searches it checks)")
    image_paths = None
    if shards is not None:
        shard_set = ShardSet(shards)
        shard_set.require_shards()  # else every pair would be left out as a document the shards do not hold
        image_paths = {doc_id: row.path for doc_id, (_, row, _) in shard_set.live().items()}
    summary = export_examples(folder, out, image_paths=image_paths, min_relevance=min_relevance)
    click.echo(summary.describe())
    if shards is None and summary.queries:
        click.echo("no --shards: pairs.csv names no images (the shards know each document's image file)", err=True)
