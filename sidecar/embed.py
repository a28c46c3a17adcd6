"""The offline embed job: corpus → decode/resize workers → batched forward → shard writer.

Resumable and incremental by content hash: a rerun skips every item whose bytes are already
in a complete shard, embeds new or changed files, and records ids that disappeared.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from sidecar.corpus import CorpusError, CorpusItem, content_hash, read_corpus
from sidecar.encoder import Encoder
from sidecar.images import ImageDecodeError, decode_image
from sidecar.shards import ShardRow, ShardSet

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EmbedSummary:
    total: int
    embedded: int
    unchanged: int
    failed: int
    deleted: int
    shards_written: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.total} items: {self.embedded} embedded, {self.unchanged} unchanged, {self.failed} failed "
                f"(see errors.jsonl), {self.deleted} deleted since last run; {self.shards_written} new shards; "
                f"{self.images_per_s:.1f} images/s")


def embed_corpus(encoder: Encoder, source: Path, out: Path, *, batch_size: int = 256, shard_size: int = 4096,
                 workers: int = 2, max_pixels: int = 40_000_000, progress: bool = True) -> EmbedSummary:
    started = time.perf_counter()
    shards = ShardSet(out)
    shards.start(encoder.signature, preprocessing={"resize": repr(encoder.resize), "context_length":
                                                   encoder.context_length})
    known = {doc_id: row.content_hash for doc_id, (_, row, _) in shards.latest().items()}
    items, hashes = _scan(source, progress=progress)
    todo = [(item, hashes[item.id]) for item in items if known.get(item.id) != hashes[item.id]]
    deleted = sorted(set(known) - set(hashes))
    shards.set_deleted(deleted)
    log.info("%d items in %s: %d to embed, %d unchanged, %d deleted since the last run",
             len(items), source, len(todo), len(items) - len(todo), len(deleted))

    failed = 0
    shards_before = len(shards.shard_names())
    with (out / "errors.jsonl").open("w", encoding="utf-8") as errors, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer, \
            tqdm(total=len(todo), unit="img", desc="embed", disable=not progress) as bar:
        pending: Future | None = None
        buffer_vectors: list[np.ndarray] = []
        buffer_rows: list[ShardRow] = []
        for batch in _decoded_batches(todo, encoder, batch_size=batch_size, workers=workers,
                                      max_pixels=max_pixels):
            good = []
            for item, digest, pixels, reason in batch:
                if reason is not None:
                    failed += 1
                    errors.write(json.dumps({"id": item.id, "path": str(item.path), "reason": reason}) + "\n")
                else:
                    good.append((item, digest, pixels))
            if good:
                buffer_vectors.append(encoder.postprocess(encoder.forward_images(np.stack([g[2] for g in good]))))
                buffer_rows.extend(ShardRow(id=item.id, path=str(item.path), text=item.text,
                                            metadata=item.metadata, content_hash=digest) for item, digest, _ in good)
            bar.update(len(batch))
            if len(buffer_rows) >= shard_size:
                pending = _write(writer, pending, shards, buffer_vectors, buffer_rows)
                buffer_vectors, buffer_rows = [], []
        if buffer_rows:
            pending = _write(writer, pending, shards, buffer_vectors, buffer_rows)
        if pending is not None:
            pending.result()
    embedded = len(todo) - failed
    summary = EmbedSummary(total=len(items), embedded=embedded, unchanged=len(items) - len(todo), failed=failed,
                           deleted=len(deleted), shards_written=len(shards.shard_names()) - shards_before,
                           seconds=time.perf_counter() - started)
    log.info("embed finished: %s", summary.describe())
    return summary


def _write(writer: ThreadPoolExecutor, pending: Future | None, shards: ShardSet,
           vectors: list[np.ndarray], rows: list[ShardRow]) -> Future:
    # One shard in flight at a time: the next batch's forward overlaps this shard's disk write.
    if pending is not None:
        pending.result()
    return writer.submit(shards.write_shard, np.concatenate(vectors), rows)


def _scan(source: Path, *, progress: bool) -> tuple[list[CorpusItem], dict[str, str]]:
    items: list[CorpusItem] = []
    hashes: dict[str, str] = {}
    for item in tqdm(read_corpus(source), unit="file", desc="scan", disable=not progress):
        if item.id in hashes:
            raise CorpusError(f"duplicate id {item.id!r} in {source}: ids must be unique")
        try:
            hashes[item.id] = content_hash(item.path)
        except OSError as exc:
            raise CorpusError(f"item {item.id!r}: cannot read {item.path}: {exc.strerror}") from exc
        items.append(item)
    return items, hashes


# ---- decode workers: PIL only (no torch ops), so forking after torch started is safe ----
_prepare: Callable[[Image.Image], np.ndarray] | None = None
_max_pixels = 0
_min_side = 0


def _init_worker(prepare: Callable[[Image.Image], np.ndarray], max_pixels: int, min_side: int) -> None:
    global _prepare, _max_pixels, _min_side
    _prepare, _max_pixels, _min_side = prepare, max_pixels, min_side


def _load(path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        with open(path, "rb") as fh:
            image = decode_image(fh.read(), max_pixels=_max_pixels, min_side=_min_side)
        return _prepare(image), None
    except ImageDecodeError as exc:
        return None, exc.reason
    except OSError as exc:
        return None, f"cannot read file: {exc}"


def _decoded_batches(todo: list[tuple[CorpusItem, str]], encoder: Encoder, *,
                     batch_size: int, workers: int, max_pixels: int) -> Iterator[list[tuple]]:
    """Batches of (item, hash, uint8 pixels | None, error | None); workers decode ahead of the model."""
    paths = [item.path for item, _ in todo]
    init = (encoder.prepare_image, max_pixels, encoder.image_size)
    if workers <= 0:
        _init_worker(*init)
        results = map(_load, paths)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker,
                                                        initargs=init)
        results = pool.imap(_load, paths, chunksize=16)
    try:
        batch = []
        for (item, digest), (pixels, reason) in zip(todo, results):
            batch.append((item, digest, pixels, reason))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        if pool is not None:
            pool.terminate()
