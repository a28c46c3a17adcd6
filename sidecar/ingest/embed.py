"""The offline embed job: corpus → decode/resize workers → batched forward → shard writer.

Resumable and incremental: a rerun skips every item whose document (image bytes, text and
metadata; `sidecar.ingest.identity`) is already in a complete shard, embeds new or changed
images, gives items whose text or metadata alone changed a new row with their stored vector
(no forward pass), gives an item whose image bytes a row of another id holds (a file renamed or moved
within the corpus, SOURCE now a parent folder: a new id) a row with that row's vector, encodes the bytes
of files copied within this run's new images once (each copy gets the row written for the first), and
records the ids the store must no longer serve: those that disappeared, and
those whose current file cannot be used (a stored row of theirs shows an image the corpus no longer
has). Each image's thumbnail (for the search page) is made by the decode workers and written into
its shard. With a tagger, every document's metadata also carries the top labels of prompt sets
(`sidecar.ingest.tagging`): from the fresh vector of a new image, from the stored vector of a known
one (a changed set re-tags without re-encoding).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import queue
import stat
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence, TextIO, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from sidecar.config import DECODE_MODES
from sidecar.ingest.corpus import CorpusError, CorpusItem, printable, read_corpus
from sidecar.ingest.decode_pool import DecodeSplit, decoded_batches, ignore_ctrl_c, read_file
from sidecar.ingest.identity import document_hash, image_hash
from sidecar.ingest.shards import ShardRow, ShardSet, exclusive_writer, naming_the_file
from sidecar.ingest.tagging import Tagger, tagged
from sidecar.ingest.thumbnails import make_thumbnail
from sidecar.model.encoder import Encoder
from sidecar.model.images import ImageDecodeError, check_jpeg_decoder, stack_pixels
from sidecar.threads import NamedThread, name_for_the_os

log = logging.getLogger(__name__)
T = TypeVar("T")
# Hashes files: (image hash, None) or (None, why it cannot be read) per path, in their order.
HashFiles = Callable[[list[Path]], Iterable[tuple[str | None, str | None]]]


@dataclass(frozen=True, slots=True)
class EmbedSummary:
    total: int
    embedded: int
    redescribed: int  # text or metadata changed, image not: new rows with the stored vectors
    # new ids whose image another id's row holds (renamed, moved or copied files; a row of an earlier run, or of this
    # one for a copy among its new files): rows with its vectors
    reused: int
    unchanged: int
    relocated: int  # of the unchanged, those found at a new path (the corpus moved): their rows now name it
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
        moved = f" ({self.relocated} at a new path: rows updated)" if self.relocated else ""
        return (f"{self.total} items: {self.embedded} embedded, {self.unchanged} unchanged{moved}, {self.failed} "
                f"failed (see errors.jsonl), {self.deleted} deleted since last run, {self.redescribed} with new text "
                f"or metadata only (vectors reused), {self.reused} renamed, moved or copied (an image embedded under "
                f"another id: vectors reused); {self.shards_written} new shards; {self.images_per_s:.1f} images/s")

    def describe_stages(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.stages.items())


PARALLEL_SCAN_MIN = 2000  # files


def embed_corpus(encoder: Encoder, source: Path, out: Path, *, batch_size: int = 256, shard_size: int = 4096,
                 workers: int = 2, max_pixels: int = 40_000_000, decode: str = "auto",
                 jpeg_decoder: str = "torchvision", fine_encoder: Encoder | None = None,
                 thumbnail_side: int | None = None, tagger: Tagger | None = None,
                 allow_empty: bool = False, progress: bool = True) -> EmbedSummary:
    """Embed `source` into shards under `out`. `decode`: "cpu" (PIL in worker processes),
    "device" (JPEGs decoded and resized on the model's device — nvjpeg on a GPU), or "auto"
    (device on CUDA, else cpu). With `fine_encoder`, the same pass also stores each image's vector
    by that (stronger) model beside the model's, for the fine-ranking stage. `thumbnail_side`: the
    longer side of each image's thumbnail (0: none; None: what `out` records, else THUMBNAIL_SIDE); shards
    written without thumbnails get theirs in this run. `decode` "split": JPEGs decoded by both at once, the
    workers taking the share that keeps pace with the device (`DecodeSplit`); `jpeg_decoder` (one of
    JPEG_DECODERS) decodes the device's share. With `tagger`, the metadata of every document gets its
    prompt-set tags; without one, the shards hold no tags."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: choose one of {', '.join(DECODE_MODES)}")
    on_device = decode in ("device", "split") or (decode == "auto" and encoder.device.type == "cuda")
    if on_device:
        check_jpeg_decoder(jpeg_decoder, encoder.device)
    elif jpeg_decoder != "torchvision":
        log.warning("--jpeg-decoder %s has no effect: the decode workers decode every image on the CPU (--decode %s "
                    "on %s)", jpeg_decoder, decode, encoder.device.type)
    split = DecodeSplit(workers) if decode == "split" else None
    if decode in ("device", "split") and encoder.device.type == "cpu":
        log.warning("--decode %s on a CPU device: the 'device' decoder (%s) runs on the cores the decode "
                    "workers use, and decodes whole images where PIL's draft mode decodes JPEGs at a reduced "
                    "scale; expect it slower than --decode cpu (bench/RESULTS.md)", decode, jpeg_decoder)
    started = time.perf_counter()
    stages: defaultdict[str, float] = defaultdict(float)
    used = "split" if split is not None else ("device" if on_device else "cpu")  # for the manifest
    if on_device:
        used = f"{used} ({jpeg_decoder})"
    with exclusive_writer(out):  # until finish_embed has written the manifest
        plan = plan_embed(encoder, source, out, decode=used, fine_encoder=fine_encoder, tagger=tagger,
                          shard_size=shard_size, workers=workers, progress=progress, stages=stages,
                          thumbnail_side=thumbnail_side, max_pixels=max_pixels, allow_empty=allow_empty)
        shards, todo = plan.shards, plan.todo

        failed: list[str] = []  # ids
        with errors_file(out, plan) as errors, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer",
                                   initializer=name_for_the_os) as writer, \
                tqdm(total=len(todo), unit="img", desc="embed", disable=not progress) as bar, \
                _in_background(_staged_batches(todo, encoder, batch_size=batch_size, workers=workers,
                                               max_pixels=max_pixels, on_device=on_device, stages=stages,
                                               thumbnail_side=shards.thumbnail_side, split=split,
                                               jpeg_decoder=jpeg_decoder)) as staged:
            pending: Future | None = None
            buffer_vectors: list[np.ndarray] = []
            buffer_fine: list[np.ndarray] = []
            buffer_rows: list[ShardRow] = []
            buffer_thumbnails: list[bytes] = []
            # launched, not copied back
            in_flight: tuple[torch.Tensor, list[ShardRow], np.ndarray | None, list[bytes]] | None = None

            def collect(features: torch.Tensor, rows: list[ShardRow], fine: np.ndarray | None,
                        thumbnails: list[bytes]) -> None:
                with _timed(stages, "copy_back"):
                    vectors = encoder.postprocess(features)
                if tagger is not None:
                    with _timed(stages, "tag"):
                        rows = tagger.apply(rows, vectors)
                buffer_vectors.append(vectors)
                buffer_rows.extend(rows)
                buffer_thumbnails.extend(thumbnails)
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
                for (item, digest, _, reason, thumbnail), pixels in zip(batch, decoded):
                    if reason is None and pixels is None:
                        reason = "corrupt JPEG (device decoder)"
                    if reason is not None:
                        failed.append(item.id)
                        errors.write(error_line(item.id, str(item.path), reason))
                    else:
                        good.append((item, digest, pixels, thumbnail))
                fine = None
                if good and fine_encoder is not None:
                    with _timed(stages, "fine_model"):
                        fine, refusals = fine_vectors(fine_encoder, [item.path for item, *_ in good],
                                                      max_pixels=max_pixels)
                    for (item, *_), reason in zip(good, refusals):
                        if reason is not None:
                            failed.append(item.id)
                            errors.write(error_line(item.id, str(item.path), reason))
                    fine = fine[[reason is None for reason in refusals]]
                    good = [g for g, reason in zip(good, refusals) if reason is None]
                if good:
                    with _timed(stages, "forward"):
                        features = forward_batch(encoder, [g[2] for g in good])
                    rows = [document_row(item, digest) for item, digest, _, _ in good]
                    # On a GPU the forward is only queued: it runs while this loop fetches and stages
                    # the next batch. The previous batch, queued ahead of it, is copied back now.
                    if in_flight is not None:
                        collect(*in_flight)
                    in_flight = (features, rows, fine, [thumbnail for *_, thumbnail in good])
                bar.update(len(batch))
                if len(buffer_rows) >= shard_size:
                    with _timed(stages, "write_wait"):
                        pending = _write(writer, pending, shards, buffer_vectors, buffer_rows, buffer_fine,
                                         buffer_thumbnails)
                    buffer_vectors, buffer_rows, buffer_fine, buffer_thumbnails = [], [], [], []
            if in_flight is not None:
                collect(*in_flight)
            with _timed(stages, "write_wait"):
                if buffer_rows:
                    pending = _write(writer, pending, shards, buffer_vectors, buffer_rows, buffer_fine,
                                     buffer_thumbnails)
                if pending is not None:
                    pending.result()
        if split is not None:
            log.info("%s", split.describe())
        return finish_embed(plan, failed=failed, started=started, stages=stages, tagger=tagger)


@dataclass(slots=True)
class EmbedPlan:
    """What a run must do, decided the same way whichever engine runs it (`plan_embed`)."""

    shards: ShardSet  # claimed for the model; deletions recorded, redescribed rows written
    total: int
    todo: list[tuple[CorpusItem, str]]  # (item, image hash): encode the image
    # (row, id of the item of `todo` with the same image): once that item's row is written, a row with its vectors
    copies: list[tuple[ShardRow, str]]
    unusable: list[CorpusItem]  # listed in errors.jsonl; recorded as deleted, as any file that cannot be used
    redescribed: int
    reused: int  # new ids whose image another id's row holds: rows with its vectors written
    unchanged: int
    relocated: int  # of the unchanged, those found at a new path: their rows now name it
    deleted: list[str]  # ids whose file vanished
    newly_deleted: int  # of them, those not recorded as deleted before this run (the summary's count)
    shards_before: int
    shard_size: int


def plan_embed(encoder: Encoder, source: Path, out: Path, *, decode: str, fine_encoder: Encoder | None,
               shard_size: int, workers: int, progress: bool, stages: defaultdict[str, float],
               hash_files: HashFiles | None = None, tagger: Tagger | None = None, thumbnail_side: int | None = 0,
               max_pixels: int = 40_000_000, allow_empty: bool = False) -> EmbedPlan:
    """Claim `out` for the model (and `thumbnail_side`), scan `source` (hashing every file, by
    `hash_files` when given; shards written without thumbnails then get theirs from the files found)
    and compare it with the shards there: what to encode, what only needs a stored vector under a
    new text or metadata, or under a new id (its image held by another id's row: written here), what
    vanished (recorded). `decode` names where images are
    decoded ("cpu" or "device"), for the manifest. A SOURCE with no items while `out` holds some is refused
    (EmptyCorpus) unless `allow_empty`."""
    # Rows name each image by its absolute path: what reads them (`hard-examples export`'s pairs.csv, a
    # trainer) runs from other folders than this run did.
    source = Path(source).absolute()
    shards = ShardSet(out)
    shards.start(encoder.signature, preprocessing={"resize": encoder.images.describe(), "context_length":
                                                   encoder.context_length, "decode": decode},
                 fine_signature=fine_encoder.signature if fine_encoder else None, thumbnail_side=thumbnail_side)
    known = shards.latest()
    with _timed(stages, "scan"):
        scanned, hashes = _scan(source, workers=workers, progress=progress, hash_files=hash_files, tagger=tagger)
    if not scanned and not allow_empty:
        _refuse_empty(source, out, live=len(set(known) - set(shards.deleted)))
        # A first run over a mistyped or unmounted folder otherwise ends "0 items" among its usual INFO lines.
        log.warning("corpus %s holds no images (in a folder: files named *.jpg, *.png, *.webp and the like; in a "
                    "manifest: rows): nothing to embed", source)
    unusable = [item for item in scanned if item.unusable]  # not vanished: finish_embed records them
    items = [item for item in scanned if not item.unusable]
    with _timed(stages, "thumbnails"):
        _add_missing_thumbnails(shards, {hashes[item.id]: item.path for item in items}, workers=workers,
                                max_pixels=max_pixels, progress=progress)
    todo: list[tuple[CorpusItem, str]] = []
    # The stored row whose vector serves each item with a known image: its own id's, else a row of another id holding
    # the same bytes (the file renamed or moved within the corpus, SOURCE now a parent folder: the item has a new id).
    # The scan's hashes are of the files' bytes, so finding it decodes nothing; every row here is by the model (and
    # fine model) the manifest pins (`ShardSet.start`), and a vanished id's row stays in its shard to be read.
    by_image = {entry[1].image_hash: entry for entry in known.values()}
    found: list[tuple[CorpusItem, ShardRow, tuple[str, ShardRow, int]]] = []
    for item in items:
        row = document_row(item, hashes[item.id])
        own = known.get(item.id)
        entry = own if own is not None and own[1].image_hash == row.image_hash else by_image.get(row.image_hash)
        if entry is None:
            todo.append((item, row.image_hash))
        else:
            found.append((item, row, entry))
    found, embed_again = _with_thumbnails(shards, found)
    todo.extend(embed_again)
    todo, copies = _copies_apart(todo)
    stored_tags = {}
    if tagger is not None:  # the tags of known images, from their stored vectors
        with _timed(stages, "tag"):
            stored_tags = tagger.stored_tags(shards, {entry[1].id: entry for *_, entry in found}.values(),
                                             progress=progress)
    redescribe: list[tuple[ShardRow, str, int]] = []  # the stored vector serves the new row
    reuse: list[tuple[ShardRow, str, int]] = []  # the stored vector of another id serves the new row
    # Unchanged documents whose file the scan found at another path than their row names (the corpus moved, or
    # an older version's row names it relative to the folder that run was in): shard name → {row index: path}.
    moved: defaultdict[str, dict[int, str]] = defaultdict(dict)
    for item, row, (name, stored, index) in found:
        if tagger is not None:
            row = tagged(row, stored_tags[stored.id])
        if stored.id != item.id:
            reuse.append((row, name, index))
        elif stored.content_hash != row.content_hash:
            redescribe.append((row, name, index))
        elif stored.path != row.path:
            moved[name][index] = row.path
    unchanged = len(items) - len(todo) - len(copies) - len(redescribe) - len(reuse)
    deleted = sorted(set(known) - set(hashes))
    newly_deleted = len(set(deleted) - set(shards.deleted))  # rows of earlier runs' deletions stay in `known`
    # An id recorded as deleted (its file vanished, or could not be used) stays deleted until its current
    # file has a row (`finish_embed` records the run's outcome): a run killed before then must not let
    # `index` serve the old row again.
    withheld = set(shards.deleted) & {*(item.id for item, _ in todo), *(row.id for row, *_ in reuse),
                                      *(row.id for row, _ in copies), *(item.id for item in unusable)}
    shards.set_deleted(sorted(set(deleted) | withheld))
    relocated = sum(map(len, moved.values()))
    log.info("%d items in %s: %d to embed (and %d copies of them, which get their vectors), %d with new text or "
             "metadata only, %d renamed, moved or copied (an image embedded under another id: stored vectors reused), "
             "%d unchanged (%d at a new path), %d unusable (see errors.jsonl), %d deleted since the last run",
             len(scanned), source, len(todo), len(copies), len(redescribe), len(reuse), unchanged, relocated,
             len(unusable), newly_deleted)
    shards.set_paths(moved)
    shards_before = len(shards.shard_names())
    if tagger is not None:  # a run killed from here leaves rows tagged with sets `tagging` may not name yet
        shards.begin_tagging(tagger.set_names)
    shards.rewrite_rows(redescribe + reuse, shard_size=shard_size)
    return EmbedPlan(shards=shards, total=len(scanned), todo=todo, copies=copies, unusable=unusable,
                     redescribed=len(redescribe), reused=len(reuse), unchanged=unchanged, relocated=relocated,
                     deleted=deleted, newly_deleted=newly_deleted, shards_before=shards_before, shard_size=shard_size)


class EmptyCorpus(CorpusError):
    """SOURCE lists nothing while the shards hold documents (`plan_embed`'s `allow_empty`)."""


def _refuse_empty(source: Path, out: Path, *, live: int) -> None:
    # An unmounted disk, a mistyped path or a manifest cut to its header reads as a corpus emptied on purpose:
    # the run would record every document deleted, and the next `index` would empty the store.
    if live:
        raise EmptyCorpus(f"corpus {source} holds no images, while {out} holds {live} embedded documents: this run "
                          "would record every one deleted, and the next `index` remove them from the store. Check "
                          "that SOURCE is the corpus (a disk not mounted shows an empty folder); to empty the corpus "
                          "on purpose, rerun with --allow-empty")


def _copies_apart(todo: list[tuple[CorpusItem, str]]) -> tuple[list[tuple[CorpusItem, str]], list[tuple[ShardRow, str]]]:
    """`todo` with one item per image (the first), and the others' rows, each with the id of the first item of its
    image: files copied within the corpus, none of whose bytes a stored row holds, are encoded once
    (`_write_copies` gives the copies the first's vectors once they are written)."""
    first: dict[str, str] = {}  # image hash -> id
    unique, copies = [], []
    for item, digest in todo:
        if digest in first:
            copies.append((document_row(item, digest), first[digest]))
        else:
            first[digest] = item.id
            unique.append((item, digest))
    return unique, copies


def finish_embed(plan: EmbedPlan, *, failed: list[str], started: float, stages: dict[str, float],
                 tagger: Tagger | None = None) -> EmbedSummary:
    """Once every shard is written: records the deletions (the `failed` ids and the plan's unusable
    items too: their current file cannot be used, so a stored row of theirs shows an image the corpus no
    longer has; a rerun after the file is fixed embeds it again) and the tagging (once every row carries
    it); the run's summary, logged. `failed`: the images the run could not decode. The plan's copies get their rows
    first (`_write_copies`)."""
    copied, failed_copies = _write_copies(plan, tagger=tagger)
    unusable = [item.id for item in plan.unusable]
    plan.shards.set_deleted(sorted(set(plan.deleted) | set(failed) | set(failed_copies) | set(unusable)))
    if plan.shards.tagging != (tagger.record() if tagger else []) or plan.shards.tagging_begun:
        plan.shards.set_tagging(tagger.record() if tagger else [])
    summary = EmbedSummary(total=plan.total, embedded=len(plan.todo) - len(failed), redescribed=plan.redescribed,
                           reused=plan.reused + copied, unchanged=plan.unchanged, relocated=plan.relocated,
                           failed=len(failed) + len(failed_copies) + len(unusable), deleted=plan.newly_deleted,
                           shards_written=len(plan.shards.shard_names()) - plan.shards_before,
                           seconds=time.perf_counter() - started, stages=dict(stages))
    log.info("embed finished: %s", summary.describe())
    log.info("embed time by stage: %s", summary.describe_stages())
    return summary


def _write_copies(plan: EmbedPlan, *, tagger: Tagger | None) -> tuple[int, list[str]]:
    """Rows for the plan's copies, each with the vectors, fine vectors and thumbnail this run wrote for the item
    whose image it holds: no decode, no forward pass. (rows written, ids of the copies that failed): where that
    item could not be used (listed in errors.jsonl), its bytes cannot be used under another name either; each is
    listed after it, with its reason. A run killed before this leaves the copies without rows: the next run finds
    their image in a stored row and reuses it then."""
    if not plan.copies:
        return 0, []
    shards = plan.shards
    wanted = {first for _, first in plan.copies}
    # This run's shards: a row of a first item there is the one it wrote; one it could not use has none.
    written = {row.id: (name, row, index) for name, row, index in shards.rows(shards.shard_names()[plan.shards_before:])
               if row.id in wanted}
    served = [(row, written[first]) for row, first in plan.copies if first in written]
    if tagger is not None:  # the tags of the image, from its stored vector, as for a file renamed since an earlier run
        tags = tagger.stored_tags(shards, {first[1].id: first for _, first in served}.values())
        served = [(tagged(row, tags[first[1].id]), first) for row, first in served]
    shards.rewrite_rows([(row, name, index) for row, (name, _, index) in served], shard_size=plan.shard_size)
    lost = [(row, first) for row, first in plan.copies if first not in written]
    if lost:
        errors_path = shards.root / "errors.jsonl"
        reasons = {entry["id"]: entry["reason"] for entry in map(json.loads, errors_path.read_text("utf-8").splitlines())}
        with naming_the_file(errors_path), errors_path.open("a", encoding="utf-8") as errors:
            errors.writelines(error_line(row.id, row.path, f"a copy of {first!r}, which could not be used: "
                                                           f"{reasons.get(first, 'see its line')}")
                              for row, first in lost)
    return len(served), [row.id for row, _ in lost]


def forward_batch(encoder: Encoder, pixels: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """The model's forward over one batch of decoded images (on a GPU only queued:
    `encoder.postprocess` waits for it)."""
    return encoder.forward_images(stack_pixels(pixels, encoder.device))


def fine_vectors(fine_encoder: Encoder, paths: Sequence[Path], *,
                 max_pixels: int) -> tuple[np.ndarray, list[str | None]]:
    """The fine model's vectors for the same files (a row of zeros where it refuses one), and per file None
    or why it has none. It has its own input size: its pixels come from the files, read again and decoded by
    its own preprocessing, whose resize limit can refuse an image the model took; such an image, or a file
    that cannot be read this time (read_file's reason), is a failed item like any unusable one, not the end
    of the run."""
    vectors = np.zeros((len(paths), fine_encoder.dim), dtype=np.float32)
    pixels: list[np.ndarray] = []
    reasons: list[str | None] = []
    for path in paths:
        data, reason = read_file(Path(path))
        if data is not None:
            try:
                pixels.append(fine_encoder.images.decode(data, max_pixels=max_pixels))
            except ImageDecodeError as exc:
                reason = f"fine model: {exc.reason}"
        reasons.append(reason)
    if pixels:
        vectors[[reason is None for reason in reasons]] = fine_encoder.encode_pixels(pixels)
    return vectors, reasons


class ErrorsFile:
    """errors.jsonl open for writing: a write that fails (a full disk) names the file."""

    def __init__(self, path: Path):
        self.path = path
        with naming_the_file(path):
            self._handle: TextIO = path.open("w", encoding="utf-8")

    def write(self, lines: str) -> None:
        with naming_the_file(self.path):
            self._handle.write(lines)

    def close(self) -> None:
        with naming_the_file(self.path):
            self._handle.close()


@contextlib.contextmanager
def errors_file(out: Path, plan: EmbedPlan) -> Iterator[ErrorsFile]:
    """<out>/errors.jsonl, rewritten each run, opening with the items the scan found unusable. Only its own
    writes name it when they fail: an OSError of the work in the block is left as it is."""
    errors = ErrorsFile(out / "errors.jsonl")
    try:
        errors.write("".join(error_line(item.id, printable(str(item.path)), item.unusable) for item in plan.unusable))
        yield errors
    finally:
        errors.close()


def error_line(item_id: str, path: str, reason: str) -> str:
    """One line of errors.jsonl: an image that could not be used, and why."""
    return json.dumps({"id": item_id, "path": path, "reason": reason}) + "\n"


@contextlib.contextmanager
def _timed(stages: defaultdict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        stages[name] += time.perf_counter() - started


def document_row(item: CorpusItem, image: str) -> ShardRow:
    """The shard row of an item whose image has hash `image`."""
    try:
        content = document_hash(image, item.text, item.metadata)
    except (TypeError, ValueError) as exc:
        where = next((f"metadata field {key!r}" for key, value in item.metadata.items()
                      if not _json_storable(value)), "text or metadata")
        raise CorpusError(f"item {item.id!r}: {where} cannot be stored as JSON: {exc}") from exc
    return ShardRow(id=item.id, path=str(item.path), text=item.text, metadata=item.metadata,
                    content_hash=content, image_hash=image)


def _json_storable(value: object) -> bool:
    """Whether the stores can hold `value` as JSON (no NaN or Infinity, UTF-8 text)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError):
        return False
    return True


def _with_thumbnails(shards: ShardSet, found: list[tuple[CorpusItem, ShardRow, tuple[str, ShardRow, int]]]
                     ) -> tuple[list[tuple[CorpusItem, ShardRow, tuple[str, ShardRow, int]]], list[tuple[CorpusItem, str]]]:
    """`found` (item, its row, the stored row whose vectors serve it) split in two: those the stored row serves, and
    (item, image hash) to embed again: items whose stored row holds no thumbnail (b"": its shard got thumbnails while
    the corpus lacked its image), where the shards keep thumbnails. Their stored row cannot give them one; the decode
    that embeds them does. Only rows that may lack one are read: another id's, and those of ids recorded deleted
    (vanished, or their file unusable, when thumbnails came: back now with the same bytes)."""
    if not shards.thumbnail_side:
        return found, []
    withdrawn = set(shards.deleted)

    def may_lack(item: CorpusItem, stored: ShardRow) -> bool:
        return stored.id != item.id or stored.id in withdrawn

    sources = {name for item, _, (name, stored, _) in found if may_lack(item, stored)}
    blank = {(name, index) for name in sources for index, thumbnail in enumerate(shards.thumbnails(name))
             if not thumbnail}
    served, again = [], []
    for item, row, (name, stored, index) in found:
        if may_lack(item, stored) and (name, index) in blank:
            again.append((item, row.image_hash))
        else:
            served.append((item, row, (name, stored, index)))
    return served, again


def _add_missing_thumbnails(shards: ShardSet, files: Mapping[str, Path], *, workers: int, max_pixels: int,
                            progress: bool) -> None:
    """Thumbnails for shards written without them (before thumbnails existed, or by a run killed while
    adding them), each made from the corpus file that holds its row's image now (`files`: image hash →
    path, from this run's scan): no forward pass, and a file moved since the row was written still gives
    it. A row whose image the corpus no longer holds (its document is embedded again or deleted) gets b""
    (no thumbnail)."""
    missing = shards.shards_without_thumbnails()
    if not missing:
        return
    rows: dict[str, list[ShardRow]] = {name: [] for name in missing}
    for name, row, _ in shards.rows():
        if name in rows:
            rows[name].append(row)
    log.info("adding %d px thumbnails to %d shards written without them (%d images)", shards.thumbnail_side,
             len(missing), sum(map(len, rows.values())))

    def thumbnail(row: ShardRow) -> bytes:
        path = files.get(row.image_hash)
        if path is None:
            return b""
        try:
            data = path.read_bytes()
        except OSError:
            return b""
        # The file may have changed since the scan: a thumbnail must show the image the row holds, or none.
        if image_hash(data) != row.image_hash:
            return b""
        return make_thumbnail(data, side=shards.thumbnail_side, max_pixels=max_pixels)

    # PIL releases the GIL while it decodes, resizes and encodes: threads share the work.
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="thumbnails",
                            initializer=name_for_the_os) as pool, \
            tqdm(total=sum(map(len, rows.values())), unit="img", desc="thumbnails", disable=not progress) as bar:
        for name, shard_rows in rows.items():
            thumbnails = []
            for made in pool.map(thumbnail, shard_rows):
                thumbnails.append(made)
                bar.update(1)
            shards.write_thumbnails(name, thumbnails)


def _write(writer: ThreadPoolExecutor, pending: Future | None, shards: ShardSet, vectors: list[np.ndarray],
           rows: list[ShardRow], fine: list[np.ndarray], thumbnails: list[bytes]) -> Future:
    # One shard in flight at a time: the next batch's forward overlaps this shard's disk write.
    if pending is not None:
        pending.result()
    return writer.submit(shards.write_shard, np.concatenate(vectors), rows, np.concatenate(fine) if fine else None,
                         thumbnails if shards.thumbnail_side else None)


def _scan(source: Path, *, workers: int, progress: bool, hash_files: HashFiles | None = None,
          tagger: Tagger | None = None) -> tuple[list[CorpusItem], dict[str, str]]:
    items = list(read_corpus(source))
    if tagger is not None:  # before any work: a clash found by a Ray task would reach the user as a task's traceback
        tagger.check_metadata(items)
    hashes: dict[str, str] = {}
    # Hashing reads every file: on a large corpus that is seconds of one core, so the decode
    # worker count hashes in parallel too (small corpora are not worth the processes).
    parallel = hash_files is None and workers > 1 and len(items) >= PARALLEL_SCAN_MIN
    with (multiprocessing.get_context("fork").Pool(workers, initializer=ignore_ctrl_c) if parallel
          else contextlib.nullcontext()) as pool:
        paths = [item.path for item in items]
        if hash_files is not None:
            digests = hash_files(paths)
        else:
            digests = pool.imap(hash_file, paths, chunksize=256) if pool else map(hash_file, paths)
        unreadable: list[str] = []
        for item, (digest, error) in tqdm(zip(items, digests), total=len(items), unit="file", desc="scan",
                                          disable=not progress):
            if item.id in hashes:
                raise CorpusError(f"duplicate id {item.id!r} in {source}: ids must be unique")
            if error is not None:
                unreadable.append(f"item {item.id!r}: cannot read {item.path}: {error}")
            hashes[item.id] = digest
    if unreadable:
        # All of them at once: one per rerun would hash the whole corpus again for each.
        shown = "; ".join(unreadable[:UNREADABLE_SHOWN])
        more = f"; and {len(unreadable) - UNREADABLE_SHOWN} more" if len(unreadable) > UNREADABLE_SHOWN else ""
        count = f"{len(unreadable)} files cannot be read: " if len(unreadable) > 1 else ""
        raise CorpusError(f"{count}{shown}{more}. Make each readable (or take it out of SOURCE), then rerun; nothing "
                          "was embedded")
    return items, hashes


UNREADABLE_SHOWN = 5  # files an unreadable corpus's error names


def hash_file(path: Path) -> tuple[str | None, str | None]:
    """(image hash, None), or (None, the reason the file cannot be read)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe's read waits for a writer that never comes
            return None, "not a regular file (a folder, pipe, socket or device)"
        return image_hash(path), None
    except FileNotFoundError as exc:
        if os.path.islink(path):  # listed, yet "No such file": say why
            return None, f"a symbolic link to {os.readlink(path)}, which does not exist"
        return None, exc.strerror
    except OSError as exc:
        return None, exc.strerror


def _staged_batches(todo: list[tuple[CorpusItem, str]], encoder: Encoder, *, stages: defaultdict[str, float],
                    split: DecodeSplit | None = None, jpeg_decoder: str = "torchvision",
                    **decode_options) -> Iterator[tuple[list[tuple], list]]:
    """(batch, pixels per item) pairs: the decode workers' batches, JPEGs decoded on the device by
    `jpeg_decoder` where asked (the device's time per JPEG goes to `split`)."""
    batches = decoded_batches(todo, encoder.images, split=split, **decode_options)
    while True:
        with _timed(stages, "decode_wait"):
            batch = next(batches, None)
        if batch is None:
            return
        started = time.perf_counter()
        pixels, on_device = _to_pixels(batch, encoder, jpeg_decoder)
        seconds = time.perf_counter() - started
        stages["device_decode"] += seconds
        if split is not None:
            split.record_device(on_device, seconds)
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

    thread = NamedThread(target=run, name="embed-stager", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


def _to_pixels(batch: list[tuple], encoder: Encoder, jpeg_decoder: str) -> tuple[list, int]:
    """Per item: uint8 pixels (host array from a worker, or a device tensor), or None; and how many
    JPEGs the device decoded."""
    jpeg_at = [i for i, (_, _, payload, *_) in enumerate(batch) if isinstance(payload, bytes)]
    decoded = encoder.images.decode_on_device([batch[i][2] for i in jpeg_at], device=encoder.device,
                                              decoder=jpeg_decoder)
    pixels = [payload if not isinstance(payload, bytes) else None for _, _, payload, *_ in batch]
    for i, tensor in zip(jpeg_at, decoded):
        pixels[i] = tensor
    return pixels, len(jpeg_at)
