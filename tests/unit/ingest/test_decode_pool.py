"""Decode workers hand each item its own pixels (through shared-memory slots) and thumbnail, in order."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sidecar.ingest.corpus import CorpusItem
from sidecar.ingest.decode_pool import DecodeWorkerLost, decoded_batches
from sidecar.model.images import decode_image


class SmallImages:
    """What decoded_batches needs of an ImagePreprocess: the output size and the CPU decode."""

    spec = SimpleNamespace(output_size=(16, 16))

    def load(self, data: bytes, *, max_pixels: int) -> Image.Image:
        return decode_image(data, max_pixels=max_pixels)

    def pixels(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.resize((16, 16)), dtype=np.uint8)

    def wants_device_decode(self, data: bytes, *, max_pixels: int) -> bool:
        return False


def colour(i: int) -> tuple[int, int, int]:
    return (i * 37) % 256, (i * 91) % 256, (i * 53) % 256


# Thumbnail side 12: made from the 24-px decode the pixels came from; 32: the decode does not cover
# it, so the thumbnail decodes the file itself (and keeps the image's 24 px: never enlarged).
@pytest.mark.parametrize(("workers", "thumbnail_side"), [(0, 12), (2, 12), (0, 32)])
def test_every_item_gets_its_own_pixels_and_thumbnail_even_when_slots_are_reused(tmp_path, workers, thumbnail_side):
    todo = []
    for i in range(300):  # more items than slots (64 per worker): every slot is reused
        path = tmp_path / f"{i}.jpg"
        if i % 7 == 3:
            path.write_bytes(b"not a jpeg")
        else:
            Image.new("RGB", (24, 24), colour(i)).save(path, quality=95)
        todo.append((CorpusItem(id=str(i), path=path, text=""), f"hash-{i}"))

    # Keep every batch until the end: pixels must stay an item's own after its slot is reused.
    batches = list(decoded_batches(todo, SmallImages(), batch_size=8, workers=workers, max_pixels=10_000,
                                   on_device=False, thumbnail_side=thumbnail_side))
    seen = []
    for batch in batches:
        for item, digest, pixels, reason, thumbnail in batch:
            i = int(item.id)
            assert digest == f"hash-{i}"
            if i % 7 == 3:
                assert pixels is None and "not a recognised image format" in reason and thumbnail == b""
            else:
                assert reason is None and pixels.shape == (16, 16, 3)
                np.testing.assert_allclose(pixels.reshape(-1, 3).mean(axis=0), colour(i), atol=3)
                with Image.open(io.BytesIO(thumbnail)) as small:  # the item's own image, shrunk
                    assert small.format == "JPEG" and small.size == (min(thumbnail_side, 24),) * 2
                    np.testing.assert_allclose(np.asarray(small.convert("RGB")).reshape(-1, 3).mean(axis=0),
                                               colour(i), atol=4)
            seen.append(i)
    assert seen == list(range(300))


def test_each_decode_worker_is_titled_for_ps_and_top(tmp_path):
    todo = []
    for i in range(200):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (24, 24), colour(i)).save(path, quality=95)
        todo.append((CorpusItem(id=str(i), path=path, text=""), f"hash-{i}"))
    batches = decoded_batches(todo, SmallImages(), batch_size=8, workers=2, max_pixels=10_000, on_device=False)
    next(batches)  # the workers run; the rest of the job waits on its slots
    try:
        titles = sorted(Path(f"/proc/{child.pid}/cmdline").read_bytes().split(b"\0")[0]
                        for child in multiprocessing.active_children() if child.name.startswith("decode-"))
    finally:
        batches.close()
    assert titles == [b"clip-sidecar: decode worker 1 of 2", b"clip-sidecar: decode worker 2 of 2"]


def _images_with_a_crash(folder: Path) -> list[tuple[CorpusItem, str]]:
    """40 small JPEGs, the 26th of them the bytes b"crash" that a crashing decoder below takes its process down on."""
    todo = []
    for i in range(40):
        path = folder / f"{i}.jpg"
        if i == 25:
            path.write_bytes(b"crash")
        else:
            Image.new("RGB", (24, 24), colour(i)).save(path, quality=95)
        todo.append((CorpusItem(id=str(i), path=path, text=""), f"hash-{i}"))
    return todo


class DyingImages(SmallImages):
    """A decoder that takes its whole process down on one file, as a crash in a C decoder would."""

    def load(self, data: bytes, *, max_pixels: int) -> Image.Image:
        if data == b"crash":
            os._exit(3)
        return super().load(data, max_pixels=max_pixels)


def test_a_worker_that_dies_mid_job_stops_the_job_with_its_exit_code_instead_of_hanging(tmp_path):
    todo = _images_with_a_crash(tmp_path)
    with pytest.raises(RuntimeError, match=r"decode worker \d+ exited \(exit code 3\)"):
        list(decoded_batches(todo, DyingImages(), batch_size=8, workers=2, max_pixels=10_000, on_device=False))


class KilledImages(SmallImages):
    """A worker the kernel kills on one file (SIGKILL, as its out-of-memory killer does): nothing is printed."""

    def load(self, data: bytes, *, max_pixels: int) -> Image.Image:
        if data == b"crash":
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load(data, max_pixels=max_pixels)


def test_a_worker_killed_by_a_signal_is_named_with_the_signal_not_an_error_above_that_was_never_printed(tmp_path):
    todo = _images_with_a_crash(tmp_path)
    with pytest.raises(DecodeWorkerLost, match=r"decode worker \d+ was killed by SIGKILL \(the kernel's out-of-memory "
                                               r"killer sends it: fewer --workers need less memory\) before its files "
                                               r"were done; the shards written so far are kept: rerun to continue"):
        list(decoded_batches(todo, KilledImages(), batch_size=8, workers=2, max_pixels=10_000, on_device=False))


KILLED_JOB = """
import sys, time, multiprocessing
from pathlib import Path
from types import SimpleNamespace
import numpy as np
from sidecar.ingest.corpus import CorpusItem
from sidecar.ingest.decode_pool import decoded_batches

on_device = sys.argv[2] == "device"

class Images:
    spec = SimpleNamespace(output_size=(8, 8))
    def load(self, data, *, max_pixels): return None
    def pixels(self, image): return np.zeros((8, 8, 3), dtype=np.uint8)
    def wants_device_decode(self, data, *, max_pixels): return on_device  # results then carry the file's bytes

todo = [(CorpusItem(id=str(i), path=Path(sys.argv[1]), text=""), "") for i in range(100_000)]
batches = decoded_batches(todo, Images(), batch_size=8, workers=2, max_pixels=1, on_device=on_device)
next(batches)
print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
time.sleep(600)  # the workers fill their slots, or their pipes, and wait for the parent
"""


# cpu: small results; the workers end up waiting for a slot. device: each result carries a 64 KB
# file, so a worker blocks writing to its pipe, which the parent no longer reads.
@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_the_workers_end_when_the_job_is_killed_outright(tmp_path, decode):
    (tmp_path / "file").write_bytes(b"x" * (64 << 10 if decode == "device" else 1))
    with subprocess.Popen([sys.executable, "-c", KILLED_JOB, str(tmp_path / "file"), decode], stdout=subprocess.PIPE,
                          text=True, cwd=Path(__file__).parents[3]) as job:
        workers = [int(pid) for pid in job.stdout.readline().split()]
        assert len(workers) == 2
        job.kill()
    deadline = time.monotonic() + 20
    try:
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "a decode worker outlived its killed job"
            time.sleep(0.1)
    finally:  # a failure leaves no orphan behind
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
