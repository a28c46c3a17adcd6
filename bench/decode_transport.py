"""How many decoded images per second the embed job's decode pool can hand to the model.

The decoder itself is stubbed (each worker produces a fresh 224 x 224 x 3 uint8 array at once),
so what is measured is only the transport from worker processes to the parent and the
parent's CPU per image — the ceiling for CPU decoding on a machine with many cores. With
`--jpeg-kb`, each file is that many KB handed on as bytes, as JPEGs go to the device decoder.

    .venv/bin/python bench/decode_transport.py --images 20000 --workers 2
    .venv/bin/python bench/decode_transport.py --images 20000 --workers 2 --jpeg-kb 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from sidecar.ingest import decode_pool
from sidecar.ingest.corpus import CorpusItem


class StubImages:
    """What `decoded_batches` needs of an ImagePreprocess, with no decoding: only the transport."""

    def __init__(self, side: int, *, device: bool):
        self.spec = SimpleNamespace(output_size=(side, side))
        self._pixels = np.zeros((side, side, 3), dtype=np.uint8)
        self._device = device

    def load(self, data: bytes, *, max_pixels: int) -> None:
        return None

    def pixels(self, image: None) -> np.ndarray:
        return self._pixels.copy()  # a fresh array per image, as a real resize returns

    def wants_device_decode(self, data: bytes, *, max_pixels: int) -> bool:
        return self._device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--side", type=int, default=224, help="model input side (ViT-B-32, ViT-L-14: 224)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--jpeg-kb", type=int, default=0, help="files handed on as bytes of this size (device decode)")
    args = parser.parse_args()

    with tempfile.NamedTemporaryFile() as file:
        file.write(os.urandom(args.jpeg_kb * 1024))
        file.flush()
        todo = [(CorpusItem(id=str(i), path=Path(file.name), text=""), "") for i in range(args.images)]
        started, cpu, received = time.perf_counter(), time.process_time(), 0
        images = StubImages(args.side, device=args.jpeg_kb > 0)
        for batch in decode_pool.decoded_batches(todo, images, batch_size=args.batch_size, workers=args.workers,
                                                 max_pixels=1, on_device=args.jpeg_kb > 0):
            received += len(batch)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    what = f"{args.jpeg_kb} KB files as bytes" if args.jpeg_kb else f"{args.side}-px images"
    print(f"{args.workers} workers, {what}: {received / wall:,.0f} per second through the pool; "
          f"parent CPU {cpu / received * 1e6:.0f} us each")


if __name__ == "__main__":
    main()
