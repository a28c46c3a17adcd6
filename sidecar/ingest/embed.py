"""The offline embed job: corpus → decode/resize workers → batched forward → shard writer.

Resumable and incremental: a rerun skips every item whose document (image bytes, text and
metadata; `sidecar.ingest.identity`) is already in a complete shard, embeds new or changed
images, gives items whose text or metadata alone changed a new row with their stored vector
(no forward pass), and records ids that disappeared. With a tagger, every document's metadata also
carries the top labels of prompt sets (`sidecar.ingest.tagging`): from the fresh vector of a new
image, from the stored vector of a known one (a changed set re-tags without re-encoding).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from sidecar.config import DECODE_MODES
from sidecar.ingest.corpus import CorpusError, CorpusItem, read_corpus
from sidecar.ingest.decode_pool import decoded_batches
from sidecar.ingest.identity import document_hash, image_hash
from sidecar.ingest.shards import ShardRow, ShardSet
from sidecar.ingest.tagging import Tagger, tagged
from sidecar.model.encoder import Encoder
from sidecar.model.images import stack_pixels

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EmbedSummary:
    total: int
    embedded: int
    redescribed: int  # text or metadata changed, image not: new rows with the stored vectors
    unchanged: int
    failed: int
    deleted: int
    shards_written: int
    seconds: float
    # Seconds per stage. Main thread: scan (list + hash), stage_wait (waiting for the stager),
    # forward (on a GPU: queueing it), copy_back (on a GPU: waiting for the model), write_wait
    # (waiting for the shard writer). Stager thread, concurrently: decode_wait (waiting for
    # decode workers), device_decode.
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.total} items: {self.embedded} embedded, {self.unchanged} unchanged, {self.failed} failed "
                f"(see errors.jsonl), {self.deleted} deleted since last run, {self.redescribed} with new text or "
                f"metadata only (vectors reused); {self.shards_written} new shards; {self.images_per_s:.1f} images/s")

    def describe_stages(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.stages.items())


PARALLEL_SCAN_MIN = 2000  # files


def embed_corpus(encoder: Encoder, source: Path, out: Path, *, batch_size: int = 256, shard_size: int = 4096,
                 workers: int = 2, max_pixels: int = 40_000_000, decode: str = "auto",
                 fine_encoder: Encoder | None = None, tagger: Tagger | None = None,
                 progress: bool = True) -> EmbedSummary:
    """Embed `source` into shards under `out`. `decode`: "cpu" (PIL in worker processes),
    "device" (JPEGs decoded and resized on the model's device — nvjpeg on a GPU), or "auto"
    (device on CUDA, else cpu). With `fine_encoder`, the same pass also stores each image's vector
    by that (stronger) model beside the model's, for the fine-ranking stage. With `tagger`, the
    metadata of every document gets its prompt-set tags; without one, the shards hold no tags."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: choose one of {', '.join(DECODE_MODES)}")
    on_device = decode == "device" or (decode == "auto" and encoder.device.type == "cuda")
    started = time.perf_counter()
    stages: defaultdict[str, float] = defaultdict(float)
    shards = ShardSet(out)
    shards.start(encoder.signature, preprocessing={"resize": encoder.images.describe(), "context_length":
                                                   encoder.context_length,
                                                   "decode": "device" if on_device else "cpu"},
                 fine_signature=fine_encoder.signature if fine_encoder else None)
    known = shards.latest()
    with _timed(stages, "scan"):
        items, hashes = _scan(source, workers=workers, progress=progress)
    todo: list[tuple[CorpusItem, str]] = []  # (item, image hash): encode the image
    redescribe: list[tuple[CorpusItem, ShardRow, str, int]] = []  # the stored vector serves the new row
    stored_tags = {}
    if tagger is not None:  # the tags of known images, from their stored vectors
        with _timed(stages, "tag"):
            stored_tags = tagger.stored_tags(shards, (known[i.id] for i in items if i.id in known and
                                                      known[i.id][1].image_hash == hashes[i.id]), progress=progress)
    for item in items:
        row = _row(item, hashes[item.id])
        entry = known.get(item.id)
        if entry is None or entry[1].image_hash != row.image_hash:
            todo.append((item, row.image_hash))
            continue
        if tagger is not None:
            row = tagged(row, stored_tags[item.id])
        if entry[1].content_hash != row.content_hash:
            redescribe.append((item, row, entry[0], entry[2]))
    unchanged = len(items) - len(todo) - len(redescribe)
    deleted = sorted(set(known) - set(hashes))
    shards.set_deleted(deleted)
    log.info("%d items in %s: %d to embed, %d with new text or metadata only, %d unchanged, %d deleted since the "
             "last run", len(items), source, len(todo), len(redescribe), unchanged, len(deleted))
    shards_before = len(shards.shard_names())
    _write_redescribed(shards, redescribe, shard_size=shard_size)

    failed = 0
    with (out / "errors.jsonl").open("w", encoding="utf-8") as errors, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer, \
            tqdm(total=len(todo), unit="img", desc="embed", disable=not progress) as bar, \
            _in_background(_staged_batches(todo, encoder, batch_size=batch_size, workers=workers,
                                           max_pixels=max_pixels, on_device=on_device, stages=stages)) as staged:
        pending: Future | None = None
        buffer_vectors: list[np.ndarray] = []
        buffer_fine: list[np.ndarray] = []
        buffer_rows: list[ShardRow] = []
        in_flight: tuple[torch.Tensor, list[ShardRow], np.ndarray | None] | None = None  # launched, not copied back

        def collect(features: torch.Tensor, rows: list[ShardRow], fine: np.ndarray | None) -> None:
            with _timed(stages, "copy_back"):
                vectors = encoder.postprocess(features)
            if tagger is not None:
                with _timed(stages, "tag"):
                    rows = tagger.apply(rows, vectors)
            buffer_vectors.append(vectors)
            buffer_rows.extend(rows)
            if fine is not None:
                buffer_fine.append(fine)

        # `staged`: a stager thread collects decoded batches (and runs the device decoder) one
        # batch ahead, so decoding overlaps the model instead of taking turns with it.
        while True:
            with _timed(stages, "stage_wait"):
                batch, decoded = next(staged, (None, None))
            if batch is None:
                break
            good = []
            for (item, digest, _, reason), pixels in zip(batch, decoded):
                if reason is None and pixels is None:
                    reason = "corrupt JPEG (device decoder)"
                if reason is not None:
                    failed += 1
                    errors.write(json.dumps({"id": item.id, "path": str(item.path), "reason": reason}) + "\n")
                else:
                    good.append((item, digest, pixels))
            if good:
                with _timed(stages, "forward"):
                    features = encoder.forward_images(stack_pixels([g[2] for g in good], encoder.device))
                rows = [_row(item, digest) for item, digest, _ in good]
                fine = None
                if fine_encoder is not None:
                    # The fine model has its own input size: its pixels come from the same files,
                    # decoded by its own preprocessing (the images passed the decode above).
                    with _timed(stages, "fine_model"):
                        fine = fine_encoder.encode_image_files([item.path.read_bytes() for item, _, _ in good],
                                                               max_pixels=max_pixels)
                # On a GPU the forward is only queued: it runs while this loop fetches and stages
                # the next batch. The previous batch, queued ahead of it, is copied back now.
                if in_flight is not None:
                    collect(*in_flight)
                in_flight = (features, rows, fine)
            bar.update(len(batch))
            if len(buffer_rows) >= shard_size:
                with _timed(stages, "write_wait"):
                    pending = _write(writer, pending, shards, buffer_vectors, buffer_rows, buffer_fine)
                buffer_vectors, buffer_rows, buffer_fine = [], [], []
        if in_flight is not None:
            collect(*in_flight)
        with _timed(stages, "write_wait"):
            if buffer_rows:
                pending = _write(writer, pending, shards, buffer_vectors, buffer_rows, buffer_fine)
            if pending is not None:
                pending.result()
    if shards.tagging != (tagger.record() if tagger else []):  # recorded once every row carries it
        shards.set_tagging(tagger.record() if tagger else [])
    embedded = len(todo) - failed
    summary = EmbedSummary(total=len(items), embedded=embedded, redescribed=len(redescribe), unchanged=unchanged,
                           failed=failed, deleted=len(deleted), shards_written=len(shards.shard_names()) - shards_before,
                           seconds=time.perf_counter() - started, stages=dict(stages))
    log.info("embed finished: %s", summary.describe())
    log.info("embed time by stage: %s", summary.describe_stages())
    return summary


@contextlib.contextmanager
def _timed(stages: defaultdict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        stages[name] += time.perf_counter() - started


def _row(item: CorpusItem, image: str) -> ShardRow:
    try:
        content = document_hash(image, item.text, item.metadata)
    except (TypeError, ValueError) as exc:
        raise CorpusError(f"item {item.id!r}: metadata cannot be stored as JSON: {exc}") from exc
    return ShardRow(id=item.id, path=str(item.path), text=item.text, metadata=item.metadata,
                    content_hash=content, image_hash=image)


def _write_redescribed(shards: ShardSet, redescribe: list[tuple[CorpusItem, ShardRow, str, int]], *,
                       shard_size: int) -> None:
    """New rows for items whose text, metadata or tags changed, each with its stored vector (no forward pass)."""
    shards.rewrite_rows([(row, name, index) for _, row, name, index in redescribe], shard_size=shard_size)


def _write(writer: ThreadPoolExecutor, pending: Future | None, shards: ShardSet,
           vectors: list[np.ndarray], rows: list[ShardRow], fine: list[np.ndarray]) -> Future:
    # One shard in flight at a time: the next batch's forward overlaps this shard's disk write.
    if pending is not None:
        pending.result()
    return writer.submit(shards.write_shard, np.concatenate(vectors), rows, np.concatenate(fine) if fine else None)


def _scan(source: Path, *, workers: int, progress: bool) -> tuple[list[CorpusItem], dict[str, str]]:
    items = list(read_corpus(source))
    hashes: dict[str, str] = {}
    # Hashing reads every file: on a large corpus that is seconds of one core, so the decode
    # worker count hashes in parallel too (small corpora are not worth the processes).
    parallel = workers > 1 and len(items) >= PARALLEL_SCAN_MIN
    with multiprocessing.get_context("fork").Pool(workers) if parallel else contextlib.nullcontext() as pool:
        paths = [item.path for item in items]
        digests = pool.imap(_hash_file, paths, chunksize=256) if pool else map(_hash_file, paths)
        for item, (digest, error) in tqdm(zip(items, digests), total=len(items), unit="file", desc="scan",
                                          disable=not progress):
            if item.id in hashes:
                raise CorpusError(f"duplicate id {item.id!r} in {source}: ids must be unique")
            if error is not None:
                raise CorpusError(f"item {item.id!r}: cannot read {item.path}: {error}")
            hashes[item.id] = digest
    return items, hashes


def _hash_file(path: Path) -> tuple[str | None, str | None]:
    try:
        return image_hash(path), None
    except OSError as exc:
        return None, exc.strerror


def _staged_batches(todo: list[tuple[CorpusItem, str]], encoder: Encoder, *,
                    stages: defaultdict[str, float], **decode_options) -> Iterator[tuple[list[tuple], list]]:
    """(batch, pixels per item) pairs: the decode workers' batches, JPEGs decoded on the device where asked."""
    batches = decoded_batches(todo, encoder.images, **decode_options)
    while True:
        with _timed(stages, "decode_wait"):
            batch = next(batches, None)
        if batch is None:
            return
        with _timed(stages, "device_decode"):
            pixels = _to_pixels(batch, encoder)
        yield batch, pixels


@contextlib.contextmanager
def _in_background(items: Iterator[T], *, depth: int = 1) -> Iterator[Iterator[T]]:
    """Iterate `items` on a thread, at most `depth` items ahead; its exceptions surface in the
    consumer. Leaving the block, normally or by an error, stops the thread and closes `items`."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    break
            else:
                put(end)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's cleanup (the decode pool) runs on the thread that ran it

    def consume() -> Iterator[T]:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item

    thread = threading.Thread(target=run, name="embed-stager", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


def _to_pixels(batch: list[tuple], encoder: Encoder) -> list:
    """Per item: uint8 pixels (host array from a worker, or a device tensor), or None."""
    jpeg_at = [i for i, (_, _, payload, _) in enumerate(batch) if isinstance(payload, bytes)]
    decoded = encoder.images.decode_on_device([batch[i][2] for i in jpeg_at], device=encoder.device)
    pixels = [payload if not isinstance(payload, bytes) else None for _, _, payload, _ in batch]
    for i, tensor in zip(jpeg_at, decoded):
        pixels[i] = tensor
    return pixels
