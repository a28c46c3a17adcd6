"""Decode workers for the embed job: forked processes read and decode images ahead of the model.

Workers run PIL only (no torch ops), so forking after torch started is safe. Decoded pixels
travel through shared-memory slots; JPEGs meant for the device decoder travel as bytes; each
image's thumbnail (a few KB, when asked for) travels as bytes too. With a `DecodeSplit` the
workers decode a share of those JPEGs themselves, so CPU and device decode at the same time.
"""

from __future__ import annotations

import collections
import mmap
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from setproctitle import setproctitle

from sidecar.errors import UserFixable
from sidecar.ingest.corpus import CorpusItem
from sidecar.ingest.thumbnails import covers, make_thumbnail, thumbnail_of
from sidecar.model.images import ImageDecodeError, ImagePreprocess


class DecodeSplit:
    """Which JPEGs the decode workers decode themselves when the device could too (decode "split"):
    a share, set so that both sides spend as long per batch. Nobody waits on the other while the
    pool's CPUs and the device's decoder (nvjpeg) both run.

    Measured as the job runs, as moving averages: a worker's seconds per JPEG it passes on (read,
    header, thumbnail) `w` and per JPEG it decodes (the same, plus decode and resize) `c`, and the
    device's seconds per JPEG `d` — the stager thread's time in the decode call, the side's
    bottleneck (the GPU kernels queued after it run beside the model's; they show in its stages).
    With share `s` on the CPU, `n` workers spend (s·c + (1−s)·w) / n per JPEG and the device (1−s)·d:
    equal at s = (n·d − w) / (c − w + n·d). The share starts at one half, so the first batch measures
    both sides, and stays within [0.02, 0.98] so both keep being measured."""

    SMOOTHING = 0.3  # weight of the latest batch in the moving averages
    BOUNDS = (0.02, 0.98)

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        # The share in shared memory, made before the fork: the parent sets it, the workers read it.
        self.shared = multiprocessing.RawValue("d", 0.5)
        self.pass_s: float | None = None
        self.cpu_s: float | None = None
        self.device_s: float | None = None
        self.on_cpu = self.on_device = 0  # JPEGs decoded by each side so far
        self._batch = {"cpu": [0.0, 0], "device": [0.0, 0]}  # worker seconds, JPEGs since the last batch

    @property
    def share(self) -> float:
        """The share of eligible JPEGs the workers decode now."""
        return self.shared.value

    def record_worker(self, route: str, seconds: float) -> None:
        """A worker's time for one JPEG it decoded ("cpu") or passed on ("device")."""
        totals = self._batch[route]
        totals[0] += seconds
        totals[1] += 1
        if route == "cpu":
            self.on_cpu += 1

    def record_device(self, count: int, seconds: float) -> None:
        """The device decoded `count` JPEGs of a batch in `seconds`; the share is set again."""
        self.on_device += count
        if count:
            self.device_s = self._average(self.device_s, seconds / count)
        (cpu_total, cpu_count), (pass_total, pass_count) = self._batch["cpu"], self._batch["device"]
        if cpu_count:
            self.cpu_s = self._average(self.cpu_s, cpu_total / cpu_count)
        if pass_count:
            self.pass_s = self._average(self.pass_s, pass_total / pass_count)
        self._batch = {"cpu": [0.0, 0], "device": [0.0, 0]}
        if None not in (self.pass_s, self.cpu_s, self.device_s):
            self.shared.value = self.balance(pass_s=self.pass_s, cpu_s=self.cpu_s, device_s=self.device_s,
                                             workers=self.workers)

    @classmethod
    def balance(cls, *, pass_s: float, cpu_s: float, device_s: float, workers: int) -> float:
        """The share at which the workers and the device take as long per JPEG (see the class)."""
        low, high = cls.BOUNDS
        span = cpu_s - pass_s + workers * device_s
        if span <= 0:
            return high
        return min(high, max(low, (workers * device_s - pass_s) / span))

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.SMOOTHING * (new - old)

    def describe(self) -> str:
        total = self.on_cpu + self.on_device
        return (f"split decode: {self.on_cpu} of {total} JPEGs decoded by the CPU workers "
                f"({100 * self.on_cpu / max(1, total):.0f} %), {self.on_device} on the device; share at the end "
                f"{self.share:.2f}")


class DecodeWorkerLost(RuntimeError, UserFixable):
    """A decode worker ended before its files were done: a crash in a C decoder (its error printed above), or
    a signal (the kernel's out-of-memory killer sends SIGKILL, and prints nothing). The job stops; the shards
    written so far are kept, and a rerun continues from them."""

    def __init__(self, pid: int | None, exitcode: int | None):
        if exitcode is not None and exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-exitcode}"
            if exitcode == -signal.SIGKILL:
                how += " (the kernel's out-of-memory killer sends it: fewer --workers need less memory)"
            how += " before its files were done"
        else:
            how = f"exited (exit code {exitcode}) before its files were done; see its error above"
        super().__init__(f"decode worker {pid} {how}; the shards written so far are kept: rerun to continue")


class Loaded(NamedTuple):
    """What a worker hands back for one file."""

    jpeg: bytes | None  # the file, for the device decoder; None: pixels in the slot, or unusable
    reason: str | None  # why the file is unusable; None: it is usable
    slot: int
    thumbnail: bytes
    route: str | None  # with a DecodeSplit, for a JPEG either side could decode: "cpu" or "device"
    seconds: float  # the worker's time on this file


# Set in each worker by _init_worker (and in the parent when workers=0).
_images: ImagePreprocess | None = None
_max_pixels = 0
_on_device = False
_slots: np.ndarray | None = None  # [slot, h, w, 3] uint8 in memory shared with the parent
_thumbnail_side = 0  # 0: no thumbnails
_split_share = None  # the DecodeSplit's shared share, or None: every eligible JPEG goes to the device
_cpu_credit = 0.0  # this worker's running count of JPEGs owed to the CPU under the share


def ignore_ctrl_c() -> None:
    """A worker process's start: Ctrl-C reaches the whole process group, and the parent stops the job
    and terminates its workers. A worker dying of it instead prints a traceback of its own, loses its
    task and can leave the parent waiting for ever (a pool worker killed holding its queue's lock)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _init_worker(images: ImagePreprocess, max_pixels: int, on_device: bool, slots: np.ndarray,
                 thumbnail_side: int, split_share=None) -> None:
    global _images, _max_pixels, _on_device, _slots, _thumbnail_side, _split_share, _cpu_credit
    _images, _max_pixels, _on_device, _slots, _thumbnail_side = images, max_pixels, on_device, slots, thumbnail_side
    _split_share, _cpu_credit = split_share, 0.0
    if multiprocessing.parent_process() is not None:
        ignore_ctrl_c()
        # Each worker resizes on one core (torch's uint8 kernels): the pool is the parallelism.
        torch.set_num_threads(1)


def _decode_here() -> bool:
    """Under a split: whether this eligible JPEG is the worker's to decode. A running credit, not a
    coin: each worker decodes exactly its share, spread evenly."""
    global _cpu_credit
    _cpu_credit += _split_share.value
    if _cpu_credit >= 1.0:
        _cpu_credit -= 1.0
        return True
    return False


def _load(job: tuple[Path, int]) -> Loaded:
    """Read and decode one file into its slot (or pass a JPEG on to the device decoder), and make
    its thumbnail."""
    path, slot = job
    started = time.perf_counter()
    data, reason = read_file(path)
    if reason is not None:
        return Loaded(None, reason, slot, b"", None, time.perf_counter() - started)
    route = None
    if _on_device and _images.wants_device_decode(data, max_pixels=_max_pixels):
        if _split_share is None:
            return Loaded(data, None, slot, _thumbnail(data), None, time.perf_counter() - started)
        route = "cpu" if _decode_here() else "device"
        if route == "device":
            return Loaded(data, None, slot, _thumbnail(data), route, time.perf_counter() - started)
    pixels, thumbnail, reason = decode_data(_images, data, max_pixels=_max_pixels, thumbnail_side=_thumbnail_side)
    if pixels is None:
        return Loaded(None, reason, slot, b"", None, time.perf_counter() - started)
    _slots[slot] = pixels
    return Loaded(None, None, slot, thumbnail, route, time.perf_counter() - started)


def _thumbnail(data: bytes) -> bytes:
    return make_thumbnail(data, side=_thumbnail_side, max_pixels=_max_pixels) if _thumbnail_side else b""


READ_FAILED = "cannot read file"  # how read_file's reasons start


def read_file(path: Path) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None), or (None, why it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(), None
    except OSError as exc:
        return None, f"{READ_FAILED}: {exc}"


def decode_data(images: ImagePreprocess, data: bytes, *, max_pixels: int,
                thumbnail_side: int = 0) -> tuple[np.ndarray | None, bytes, str | None]:
    """An image file's bytes as the model's uint8 pixels and its thumbnail (b"" with `thumbnail_side`
    0), decoded as every engine of the embed job decodes them: (pixels, thumbnail, None), or (None,
    b"", why the image is unusable). The thumbnail comes from the model's decode when that covers
    it (large photos: the same JPEG draft scale), saving a second decode (bench/RESULTS.md)."""
    try:
        image = images.load(data, max_pixels=max_pixels)
        pixels = images.pixels(image)
    except ImageDecodeError as exc:
        return None, b"", exc.reason
    if not thumbnail_side:
        return pixels, b"", None
    if covers(image, side=thumbnail_side):
        return pixels, thumbnail_of(image, side=thumbnail_side), None
    return pixels, make_thumbnail(data, side=thumbnail_side, max_pixels=max_pixels), None


def decoded_batches(todo: list[tuple[CorpusItem, str]], images: ImagePreprocess, *, batch_size: int, workers: int,
                    max_pixels: int, on_device: bool, thumbnail_side: int = 0,
                    split: DecodeSplit | None = None) -> Iterator[list[tuple]]:
    """Batches of (item, hash, payload | None, error | None, thumbnail); workers read and decode ahead
    of the model. `thumbnail_side` 0 makes no thumbnails (b""). With `on_device`, the payload of a
    plain JPEG is its bytes, for the device decoder — or, with `split`, the pixels for its share."""
    # Bounded read-ahead: workers stay at most two batches ahead of the model, so a slow model
    # never lets decoded images pile up in memory. Each image in flight owns one slot of an
    # anonymous shared mapping made before the fork: a worker writes the pixels there and
    # returns only the slot's number. (Pickling the 150 KB arrays through a pipe capped the
    # parent at ~2,200 images/s, 400 us of its CPU per image.)
    count, (height, width) = max(2 * batch_size, 64 * max(workers, 1)), images.spec.output_size
    slots = np.frombuffer(mmap.mmap(-1, count * height * width * 3), dtype=np.uint8).reshape(count, height, width, 3)
    init = (images, max_pixels, on_device, slots, thumbnail_side, split.shared if split is not None else None)
    if workers <= 0:
        _init_worker(*init)
        # In this process each load runs when the loop below asks for it, after the last is copied.
        results = (_load((item.path, 0)) for item, _ in todo)
        pool = None
    else:
        pool = _Workers(workers, [item.path for item, _ in todo], slots=count, init=init)
        results = pool.results()
    try:
        batch = []
        for (item, digest), loaded in zip(todo, results):
            pixels = loaded.jpeg if loaded.jpeg is not None or loaded.reason is not None else slots[loaded.slot].copy()
            if pool is not None:
                pool.free(loaded.slot)
            if split is not None and loaded.route is not None:
                split.record_worker(loaded.route, loaded.seconds)
            batch.append((item, digest, pixels, loaded.reason, loaded.thumbnail))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        if pool is not None:
            pool.close()


class _Workers:
    """The decode worker processes. Worker k of n takes the job's files k, k + n, k + 2n, … in
    order — the paths come with the fork, so no task is ever sent — writes each into the next of
    its own slots and sends its results a few at a time through a pipe of its own; the parent reads
    them back in file order, taking turns between workers. A worker reuses a slot once the parent
    has freed it (a semaphore per worker counts its free slots); freed slots go back a few at a
    time, since each release that wakes a waiting worker costs the parent a cross-CPU wake-up.

    multiprocessing.Pool spent a third of the parent's time in its own threads (tasks pickled one by
    one, results handed between threads): per JPEG handed on to the device decoder it cost the parent
    59–90 us of CPU where this costs 17–22 (20 KB files; bench/decode_transport.py --jpeg-kb, CPU box).
    At GPU rates the parent's one core is the limit."""

    RESULTS_PER_MESSAGE = 16  # fewer wake-ups of the parent; a worker about to wait sends what it has
    SLOTS_PER_RELEASE = 16  # fewer wake-ups of the workers; all go back before the parent waits

    def __init__(self, workers: int, paths: list[Path], *, slots: int, init: tuple):
        context = multiprocessing.get_context("fork")
        per_worker = slots // workers
        self._free, self._results, self._processes = [], [], []
        for worker in range(workers):
            free = context.Semaphore(per_worker)
            receive, send = context.Pipe(duplex=False)
            own_slots = list(range(worker, per_worker * workers, workers))  # slot % workers == worker
            # The worker closes the reading ends it inherits (its own, earlier workers'): while it held its
            # own, a write to a pipe the parent no longer reads blocked for ever instead of failing.
            process = context.Process(target=_work, args=(worker, workers, paths, own_slots, free, send, init,
                                                          [*self._results, receive]),
                                      name=f"decode-{worker}", daemon=True)
            process.start()
            send.close()  # the parent keeps only its reading end: a worker's exit then reads as EOF
            self._free.append(free)
            self._results.append(receive)
            self._processes.append(process)
        self._total = len(paths)
        self._held = [0] * workers  # slots freed by the parent, not yet given back to their worker

    def results(self) -> Iterator[Loaded]:
        """Every file's Loaded, in the job's order."""
        workers = len(self._processes)
        waiting: list[collections.deque[Loaded]] = [collections.deque() for _ in range(workers)]
        for index in range(self._total):
            worker = index % workers
            if not waiting[worker]:
                self._give_back(worker)  # it may be waiting for a slot to make what we wait for
                try:
                    waiting[worker].extend(self._results[worker].recv())
                except EOFError:
                    process = self._processes[worker]
                    process.join(timeout=5)
                    raise DecodeWorkerLost(process.pid, process.exitcode) from None
            yield waiting[worker].popleft()

    def free(self, slot: int) -> None:
        """The parent has copied what the slot held: its worker may reuse it."""
        worker = slot % len(self._processes)
        self._held[worker] += 1
        if self._held[worker] == self.SLOTS_PER_RELEASE:
            self._give_back(worker)

    def _give_back(self, worker: int) -> None:
        for _ in range(self._held[worker]):
            self._free[worker].release()
        self._held[worker] = 0

    def close(self) -> None:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.join(timeout=5)
        for receive in self._results:
            receive.close()


def _work(worker: int, workers: int, paths: list[Path], own_slots: list[int], free, results, init: tuple,
          parent_ends: list) -> None:
    """A decode worker's life: its share of the files, in order, each into its next slot. It ends
    with the job: a parent killed outright (kill -9) frees no slot (the wait below looks for it) and
    reads no pipe again (with `parent_ends`, the pipes' reading ends, closed here, a write then fails)."""
    for end in parent_ends:
        end.close()
    # What `ps` and `top` show for it: otherwise the parent's command line, the same for every worker.
    setproctitle(f"clip-sidecar: decode worker {worker + 1} of {workers}")
    _init_worker(*init)
    parent = os.getppid()
    ready: list[Loaded] = []
    try:
        for turn, index in enumerate(range(worker, len(paths), workers)):
            if not free.acquire(block=False):
                if ready:  # the parent may be waiting for these before it can free a slot
                    results.send(ready)
                    ready = []
                while not free.acquire(timeout=1.0):
                    if os.getppid() != parent:
                        return
            ready.append(_load((paths[index], own_slots[turn % len(own_slots)])))
            if len(ready) == _Workers.RESULTS_PER_MESSAGE:
                results.send(ready)
                ready = []
        if ready:
            results.send(ready)
    except BrokenPipeError:  # the parent is gone
        return
    finally:
        results.close()
