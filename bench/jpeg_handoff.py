"""What handing JPEG bytes to the device decoder costs the embed job's stager thread, per file, by
file size: each file's bytes shared with its tensor (what `ImagePreprocess.decode_on_device` does)
against a bytearray copy per file (what it did until 2026-11-30). Photo-like JPEGs (noise, quality
90); the decode itself is not included.

    PYTHONPATH=. .venv/bin/python bench/jpeg_handoff.py
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from sidecar.model.images import jpeg_tensors


def copied(jpegs: list[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]


def best_us(handoff, jpegs: list[bytes], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        handoff(jpegs)
        best = min(best, time.perf_counter() - started)
    return best / len(jpegs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="320x320,1024x768,3000x2250", help="WxH,...")
    parser.add_argument("--files", type=int, default=256, help="per size (one batch's worth)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'size':>10} {'KB per file':>12} {'copied us':>10} {'shared us':>10} {'ratio':>7}")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        out = io.BytesIO()
        pixels = np.asarray(Image.fromarray(base).resize((width, height)), dtype=np.int16)
        Image.fromarray(np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)).save(
            out, format="JPEG", quality=90)
        data = out.getvalue()
        jpegs = [bytes(bytearray(data)) for _ in range(args.files)]  # distinct objects, as files read are
        before, now = best_us(copied, jpegs, args.rounds), best_us(jpeg_tensors, jpegs, args.rounds)
        print(f"{size:>10} {len(jpegs[0]) / 1024:>12.0f} {before:>10.1f} {now:>10.1f} {before / now:>6.2f}x")


if __name__ == "__main__":
    main()
