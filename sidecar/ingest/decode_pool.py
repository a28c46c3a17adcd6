"""Decode workers for the embed job: fork-pool processes read and decode images ahead of the model.

Workers run PIL only (no torch ops), so forking after torch started is safe. Decoded pixels
travel through shared-memory slots; JPEGs meant for the device decoder travel as bytes; each
image's thumbnail (a few KB, when asked for) travels as bytes too.
"""

from __future__ import annotations

import mmap
import multiprocessing
import queue
import signal
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from sidecar.ingest.corpus import CorpusItem
from sidecar.ingest.thumbnails import make_thumbnail
from sidecar.model.images import ImageDecodeError, ImagePreprocess

# Set in each worker by _init_worker (and in the parent when workers=0).
_images: ImagePreprocess | None = None
_max_pixels = 0
_on_device = False
_slots: np.ndarray | None = None  # [slot, h, w, 3] uint8 in memory shared with the parent
_thumbnail_side = 0  # 0: no thumbnails


def _init_worker(images: ImagePreprocess, max_pixels: int, on_device: bool, slots: np.ndarray,
                 thumbnail_side: int) -> None:
    global _images, _max_pixels, _on_device, _slots, _thumbnail_side
    _images, _max_pixels, _on_device, _slots, _thumbnail_side = images, max_pixels, on_device, slots, thumbnail_side
    if multiprocessing.parent_process() is not None:
        # Ctrl-C reaches the whole process group: the parent stops the job and terminates the
        # pool. A worker dying of it instead would lose its task and leave the parent waiting.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _load(job: tuple[Path, int]) -> tuple[bytes | None, str | None, int, bytes]:
    """Read and decode one file into its slot, and make its thumbnail. Returns (None, None, slot,
    thumbnail): pixels in the slot; (JPEG bytes, None, slot, thumbnail): for the device decoder;
    (None, reason, slot, b""): unusable."""
    path, slot = job
    data, reason = read_file(path)
    if reason is not None:
        return None, reason, slot, b""
    if _on_device and _images.wants_device_decode(data, max_pixels=_max_pixels):
        return data, None, slot, _thumbnail(data)
    pixels, reason = decode_data(_images, data, max_pixels=_max_pixels)
    if pixels is None:
        return None, reason, slot, b""
    _slots[slot] = pixels
    return None, None, slot, _thumbnail(data)


def _thumbnail(data: bytes) -> bytes:
    return make_thumbnail(data, side=_thumbnail_side, max_pixels=_max_pixels) if _thumbnail_side else b""


def read_file(path: Path) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None), or (None, why it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(), None
    except OSError as exc:
        return None, f"cannot read file: {exc}"


def decode_data(images: ImagePreprocess, data: bytes, *, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """An image file's bytes as the model's uint8 pixels, decoded as every engine of the embed job
    decodes them: (pixels, None), or (None, why the image is unusable)."""
    try:
        return images.decode(data, max_pixels=max_pixels), None
    except ImageDecodeError as exc:
        return None, exc.reason


def decoded_batches(todo: list[tuple[CorpusItem, str]], images: ImagePreprocess, *, batch_size: int, workers: int,
                    max_pixels: int, on_device: bool, thumbnail_side: int = 0) -> Iterator[list[tuple]]:
    """Batches of (item, hash, payload | None, error | None, thumbnail); workers read and decode ahead
    of the model. `thumbnail_side` 0 makes no thumbnails (b"")."""
    # Bounded read-ahead: workers stay at most two batches ahead of the model, so a slow model
    # never lets decoded images pile up in memory. Each image in flight owns one slot of an
    # anonymous shared mapping made before the fork: a worker writes the pixels there and
    # returns only the slot's number. (Pickling the 150 KB arrays through the pool's pipe
    # capped the parent at ~2,200 images/s, 400 us of its CPU per image.)
    count, (height, width) = max(2 * batch_size, 64 * max(workers, 1)), images.spec.output_size
    slots = np.frombuffer(mmap.mmap(-1, count * height * width * 3), dtype=np.uint8).reshape(count, height, width, 3)
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(count):
        free.put(slot)
    stop = threading.Event()

    def jobs() -> Iterator[tuple[Path, int]]:
        for item, _ in todo:
            slot = free.get()
            if stop.is_set():
                return
            yield item.path, slot

    init = (images, max_pixels, on_device, slots, thumbnail_side)
    if workers <= 0:
        _init_worker(*init)
        results = map(_load, jobs())
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init)
        results = pool.imap(_load, jobs(), chunksize=16)
    try:
        batch = []
        for (item, digest), (data, reason, slot, thumbnail) in zip(todo, results):
            pixels = data if data is not None or reason is not None else slots[slot].copy()
            free.put(slot)
            batch.append((item, digest, pixels, reason, thumbnail))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        stop.set()
        free.put(-1)  # wake the feeder if it waits, so the pool can shut down
        if pool is not None:
            pool.terminate()
