r"""Embedding throughput, side by side in one run on one device: decode-only, the decode pool alone,
the device's JPEG decoders alone, model-only and end to end (JPEG files on disk → vector shards on
disk), with the end-to-end / model ratio.

    .venv/bin/python bench/embed_throughput.py                          # tiny model, generated JPEGs
    .venv/bin/python bench/embed_throughput.py --model ViT-B-32 --images 20000 --batch-size 1024 \
        --image-side 320 --decode cpu,device,split --thumbnail-size 128,0   # with thumbnails and without
    .venv/bin/python bench/embed_throughput.py --model ViT-B-32 --decode device \
        --jpeg-decoder torchvision,nvimagecodec                          # the device's JPEG decoders
    .venv/bin/python bench/embed_throughput.py --folder /data/photos    # your own images

Generated images are rendered shapes: flat colour compresses well, so they decode faster than
photographs of the same size; `--folder` measures your own.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sidecar.config import JPEG_DECODERS, THUMBNAIL_SIDE, Settings
from sidecar.ingest.corpus import CorpusItem, read_corpus
from sidecar.ingest.decode_pool import decoded_batches
from sidecar.ingest.embed import embed_corpus
from sidecar.model.encoder import load_encoder
from sidecar.model.images import JpegDecoderUnavailable, check_jpeg_decoder
from sidecar.model.synthetic import iter_items


def _render(job: tuple[Path, int, int, int]) -> None:
    folder, start, n, side = job
    for item in iter_items(n, seed=1, size=side, start=start):
        item.image.save(folder / f"{item.id}.jpg", format="JPEG", quality=90)


def generate_jpegs(folder: Path, n: int, *, side: int, processes: int) -> Path:
    """`n` rendered JPEGs in `folder`, rendered on all cores (the corpus, not the measurement)."""
    folder.mkdir(parents=True)
    step = max(1, -(-n // (processes * 4)))
    jobs = [(folder, start, min(step, n - start), side) for start in range(0, n, step)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_render, jobs)
    return folder


def decode_only(paths: list[Path], encoder, *, limit: int) -> float:
    """One core: read + decode (draft mode) + resize/crop, as one decode worker does it."""
    sample = paths[:limit]
    started = time.perf_counter()
    for path in sample:
        encoder.images.decode(path.read_bytes(), max_pixels=40_000_000)
    return len(sample) / (time.perf_counter() - started)


def decode_pool_only(paths: list[Path], encoder, *, workers: int, batch_size: int, thumbnail_side: int) -> float:
    """The embed job's decode workers with no model behind them (CPU decode and thumbnails, as the
    job makes them): the most images per second CPU decoding can feed on this machine."""
    todo = [(CorpusItem(id=path.stem, path=path, text=""), "") for path in paths]
    started, received = time.perf_counter(), 0
    for batch in decoded_batches(todo, encoder.images, batch_size=batch_size, workers=workers,
                                 max_pixels=40_000_000, on_device=False, thumbnail_side=thumbnail_side):
        received += len(batch)
    return received / (time.perf_counter() - started)


def pool_start_seconds(workers: int) -> float:
    """Forking `workers` processes from this one (model loaded) and ending them, as the embed job's
    scan and decode pools each do once per run."""
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(abs, range(workers))
    return time.perf_counter() - started


def device_decode_only(paths: list[Path], encoder, *, decoder: str, batch_size: int) -> float:
    """The device's JPEG decoder alone, as the embed job's stager thread calls it (decode and resize a
    batch of file bytes already in memory), over up to 8 batches after a warm-up one."""
    batches = [[path.read_bytes() for path in paths[start:start + batch_size]]
               for start in range(0, min(len(paths), 9 * batch_size), batch_size)]
    encoder.images.decode_on_device(batches[0], device=encoder.device, decoder=decoder)  # warm-up
    _sync(encoder.device)
    started = time.perf_counter()
    for jpegs in batches[1:] or batches:
        encoder.images.decode_on_device(jpegs, device=encoder.device, decoder=decoder)
    _sync(encoder.device)
    return sum(map(len, batches[1:] or batches)) / (time.perf_counter() - started)


def model_only(encoder, *, batch_size: int, batches: int) -> float:
    pixels = np.random.default_rng(0).integers(0, 255, (batch_size, *encoder.images.spec.output_size, 3),
                                               dtype=np.uint8)
    encoder.postprocess(encoder.forward_images(pixels))  # warm-up (kernels, autocast caches)
    _sync(encoder.device)
    started = time.perf_counter()
    for _ in range(batches):
        encoder.postprocess(encoder.forward_images(pixels))
    return batch_size * batches / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="open_clip model (default: the tiny model); random weights unless --pretrained")
    parser.add_argument("--pretrained", default="")
    parser.add_argument("--folder", type=Path, help="images to embed (default: generate --images JPEGs)")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--image-side", type=int, default=64, help="side of generated JPEGs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--decode", default="auto", help="end-to-end runs, comma-separated: auto, cpu, device, split")
    parser.add_argument("--jpeg-decoder", default="torchvision",
                        help=f"the device's JPEG decoders, comma-separated, from {', '.join(JPEG_DECODERS)}: each "
                             "runs alone and in each device or split end-to-end run")
    parser.add_argument("--thumbnail-size", default=str(THUMBNAIL_SIDE),
                        help="thumbnails the job makes, as `clip-sidecar embed --thumbnail-size` (0: none); "
                             "comma-separated: each decode mode runs with each size, e.g. 128,0")
    args = parser.parse_args()
    thumbnail_sizes = [int(size) for size in args.thumbnail_size.split(",")]
    jpeg_decoders = args.jpeg_decoder.split(",")
    if unknown := set(jpeg_decoders) - set(JPEG_DECODERS):
        parser.error(f"--jpeg-decoder: unknown {', '.join(sorted(unknown))}; choose from {', '.join(JPEG_DECODERS)}")
    if len(set(jpeg_decoders)) < len(jpeg_decoders):
        parser.error("--jpeg-decoder: each decoder once (a second run of one would find its images done)")
    # The job's own summary lines (stages; a split decode's share) go with the figures.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("sidecar.ingest.embed").setLevel(logging.INFO)

    overrides = {"model": args.model, "pretrained": args.pretrained} if args.model else {}
    encoder = load_encoder(Settings.from_env(**overrides))
    device = torch.cuda.get_device_name() if encoder.device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device}; {os.cpu_count()} CPUs; model {encoder.signature.describe()}, {encoder.precision}, "
          f"batch {args.batch_size}, {args.workers} decode workers")
    for decoder in list(jpeg_decoders):
        try:
            check_jpeg_decoder(decoder, encoder.device)
        except JpegDecoderUnavailable as exc:  # the other figures still stand
            print(f"jpeg decoder {decoder}: not measured ({exc})")
            jpeg_decoders.remove(decoder)
    runs = [(mode, decoder) for mode in args.decode.split(",")
            for decoder in (jpeg_decoders if mode in ("device", "split") else [None])]
    with tempfile.TemporaryDirectory() as tmp:
        source = args.folder or generate_jpegs(Path(tmp) / "corpus", args.images, side=args.image_side,
                                               processes=os.cpu_count() or 1)
        started = time.perf_counter()
        paths = [item.path for item in read_corpus(source)]
        listing_s = time.perf_counter() - started
        decode_rate = decode_only(paths, encoder, limit=1000)
        pool_rates = {size: decode_pool_only(paths[:10_000], encoder, workers=args.workers,
                                             batch_size=args.batch_size, thumbnail_side=size)
                      for size in thumbnail_sizes}
        fork_s = pool_start_seconds(args.workers)
        device_rates = {decoder: device_decode_only(paths, encoder, decoder=decoder, batch_size=args.batch_size)
                        for decoder in jpeg_decoders}
        model_rate = model_only(encoder, batch_size=args.batch_size, batches=max(3, 2048 // args.batch_size))
        end_to_end = {(mode, decoder, size): embed_corpus(
                          encoder, source, Path(tmp) / f"shards-{mode}-{decoder}-{size}", batch_size=args.batch_size,
                          workers=args.workers, decode=mode, jpeg_decoder=decoder or "torchvision",
                          thumbnail_side=size, progress=True)
                      for size in thumbnail_sizes for mode, decoder in runs}
    print(f"folder listing:           {listing_s:10.2f} s  ({len(paths)} files: ids, paths, captions)")
    print(f"decode only (1 core):     {decode_rate:10.0f} images/s")
    for size, rate in pool_rates.items():
        print(f"decode pool only:         {rate:10.0f} images/s  ({args.workers} workers, CPU decode, "
              f"thumbnails {size or 'none'}; no model)")
    print(f"worker pool start:        {fork_s:10.2f} s  ({args.workers} processes forked and ended)")
    for decoder, rate in device_rates.items():
        print(f"device decode only:       {rate:10.0f} images/s  ({decoder}: decode and resize on "
              f"{encoder.device.type}, file bytes in memory)")
    print(f"model only:               {model_rate:10.0f} images/s")
    for (mode, decoder, size), summary in end_to_end.items():
        label = f"{mode}{f' ({decoder})' if decoder else ''}, thumbnails {size or 'none'}"
        print(f"end to end, decode {label + ':':24s}{summary.images_per_s:8.0f} images/s  "
              f"({summary.embedded} images, {summary.seconds:.1f} s, scan and shard writes included; "
              f"{summary.images_per_s / model_rate:.2f} of model)")
        print(f"  seconds by stage, decode {label}: {summary.describe_stages()}")


if __name__ == "__main__":
    main()
