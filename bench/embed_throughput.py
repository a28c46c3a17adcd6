"""Embedding throughput, side by side in one run on one device: decode-only, model-only and
end to end (JPEG files on disk → vector shards on disk), with the end-to-end / model ratio.

    .venv/bin/python bench/embed_throughput.py                          # tiny model, generated JPEGs
    .venv/bin/python bench/embed_throughput.py --model ViT-B-32 --images 20000 --batch-size 1024
    .venv/bin/python bench/embed_throughput.py --folder /data/photos    # your own images
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sidecar.config import Settings
from sidecar.corpus import read_corpus
from sidecar.embed import embed_corpus
from sidecar.encoder import load_encoder
from sidecar.images import decode_image
from sidecar.synthetic import write_corpus


def decode_only(paths: list[Path], encoder, *, limit: int) -> float:
    """One core: read + decode (draft mode) + resize/crop, as one decode worker does it."""
    sample = paths[:limit]
    started = time.perf_counter()
    for path in sample:
        encoder.prepare_image(decode_image(path.read_bytes(), max_pixels=40_000_000, min_side=encoder.image_size))
    return len(sample) / (time.perf_counter() - started)


def model_only(encoder, *, batch_size: int, batches: int) -> float:
    pixels = np.random.default_rng(0).integers(0, 255, (batch_size, encoder.image_size, encoder.image_size, 3),
                                               dtype=np.uint8)
    encoder.postprocess(encoder.forward_images(pixels))  # warm-up (kernels, autocast caches)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(batches):
        encoder.postprocess(encoder.forward_images(pixels))
    return batch_size * batches / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="open_clip model (default: the tiny model); random weights unless --pretrained")
    parser.add_argument("--pretrained", default="")
    parser.add_argument("--folder", type=Path, help="images to embed (default: generate --images JPEGs)")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--image-side", type=int, default=64, help="side of generated JPEGs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    overrides = {"model": args.model, "pretrained": args.pretrained} if args.model else {}
    encoder = load_encoder(Settings.from_env(**overrides))
    device = torch.cuda.get_device_name() if encoder.device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device}; {os.cpu_count()} CPUs; model {encoder.signature.describe()}, {encoder.precision}, "
          f"batch {args.batch_size}, {args.workers} decode workers")
    with tempfile.TemporaryDirectory() as tmp:
        source = args.folder or write_corpus(Path(tmp) / "corpus", args.images, seed=1, size=args.image_side)
        paths = [item.path for item in read_corpus(source)]
        decode_rate = decode_only(paths, encoder, limit=1000)
        model_rate = model_only(encoder, batch_size=args.batch_size, batches=max(3, 2048 // args.batch_size))
        summary = embed_corpus(encoder, source, Path(tmp) / "shards", batch_size=args.batch_size,
                               workers=args.workers, progress=True)
    print(f"decode only (1 core):  {decode_rate:10.0f} images/s")
    print(f"model only:            {model_rate:10.0f} images/s")
    print(f"end to end:            {summary.images_per_s:10.0f} images/s  ({summary.embedded} images, "
          f"{summary.seconds:.1f} s, scan and shard writes included)")
    print(f"end to end / model:    {summary.images_per_s / model_rate:10.2f}")


if __name__ == "__main__":
    main()
