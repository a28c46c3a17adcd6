"""One decode worker's time per image, as the embed job's CPU decode runs it: read the file, decode
and resize it to the model's pixels, make its thumbnail. Photo-like JPEGs (rendered shapes plus
noise, quality 90: about 0.2 bytes per pixel, between product shots on white and camera photos) at
several sizes, since the JPEG draft scales, and so the work, differ by size.
`--checkout` times another tree's code beside this one's (e.g. a `git worktree` of an older
commit), alternating rounds in fresh processes, so the ratio comes from one run on one machine.

    PYTHONPATH=. .venv/bin/python bench/worker_decode.py
    git worktree add /tmp/before HEAD~1
    PYTHONPATH=. .venv/bin/python bench/worker_decode.py --checkout /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from sidecar.model.synthetic import iter_items

# Runs in a fresh process with the tree under test first on sys.path: only APIs both trees share.
TIMED = """
import json, sys, time
from pathlib import Path
import open_clip
from sidecar.ingest.corpus import CorpusItem
from sidecar.ingest.decode_pool import decoded_batches
from sidecar.model.images import ImagePreprocess
folder, model, thumbnail_side = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
images = ImagePreprocess(open_clip.create_model_and_transforms(model)[2])
out = {}
for size in sorted(p.name for p in folder.iterdir()):
    todo = [(CorpusItem(id=p.name, path=p, text=""), "") for p in sorted((folder / size).iterdir())]
    for _ in decoded_batches(todo[:4], images, batch_size=4, workers=0, max_pixels=10**9, on_device=False,
                             thumbnail_side=thumbnail_side):
        pass  # warm-up
    started = time.perf_counter()
    for _ in decoded_batches(todo, images, batch_size=16, workers=0, max_pixels=10**9, on_device=False,
                             thumbnail_side=thumbnail_side):
        pass
    out[size] = (time.perf_counter() - started) / len(todo) * 1000
print(json.dumps(out))
"""


def make_photos(root: Path, sizes: list[tuple[int, int]], count: int) -> None:
    """`count` JPEGs per size: rendered shapes with per-pixel noise, so they compress like photos."""
    rng = np.random.default_rng(0)
    from PIL import Image

    bases = [item.image for item in iter_items(count, seed=3, size=256)]
    for width, height in sizes:
        folder = root / f"{width:05d}x{height}"
        folder.mkdir()
        for i, base in enumerate(bases):
            pixels = np.asarray(base.resize((width, height)), dtype=np.int16)
            pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", format="JPEG", quality=90)


def timed(tree: Path, folder: Path, model: str, thumbnail_side: int) -> dict[str, float]:
    # `python -c` puts the working directory first on sys.path: run in the tree, or it is this one.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", TIMED, str(folder), model, str(thumbnail_side)], env=env, cwd=tree,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="320x320,640x480,1024x768,2000x1500,3000x2250", help="WxH,...")
    parser.add_argument("--images", type=int, default=30, help="per size")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model whose preprocessing is used")
    parser.add_argument("--thumbnail-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkout", type=Path, help="another tree timed beside this one")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    trees = {"this tree": Path.cwd()} | ({str(args.checkout): args.checkout} if args.checkout else {})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp), sizes, args.images)
        for _ in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(timed(tree, Path(tmp), args.model, args.thumbnail_size))
    print(f"{args.model} preprocessing, thumbnails {args.thumbnail_size or 'none'}; ms per image (median of "
          f"{args.rounds} rounds)")
    print(f"{'size':>10}" + "".join(f"{name:>22}" for name in trees) + ("   ratio" if args.checkout else ""))
    for key in runs["this tree"][0]:
        medians = {name: statistics.median(run[key] for run in runs[name]) for name in trees}
        ratio = f"   x{medians[str(args.checkout)] / medians['this tree']:.2f}" if args.checkout else ""
        print(f"{key.lstrip('0'):>10}" + "".join(f"{medians[name]:>22.2f}" for name in trees) + ratio)


if __name__ == "__main__":
    main()
