"""How long the embed job takes to list an image folder (`read_corpus`: ids, paths, captions): the
part of its scan that runs on one core whatever the worker count. `--checkout` times another
tree's code beside this one's (e.g. a `git worktree` of an older commit), alternating rounds in
fresh processes, so the ratio comes from one run on one machine.

    PYTHONPATH=. .venv/bin/python bench/corpus_listing.py --files 30000
    git worktree add /tmp/before HEAD~1
    PYTHONPATH=. .venv/bin/python bench/corpus_listing.py --files 30000 --checkout /tmp/before
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs in a fresh process in the tree under test.
TIMED = """
import sys, time
from sidecar.ingest.corpus import read_corpus
started = time.perf_counter()
count = sum(1 for _ in read_corpus(sys.argv[1]))
print(count, time.perf_counter() - started)
"""


def make_folder(root: Path, files: int, folders: int) -> Path:
    """`files` empty .jpg files over `folders` subfolders, every tenth with a caption (listing never
    opens an image)."""
    for i in range(files):
        folder = root / f"part-{i % folders}"
        folder.mkdir(exist_ok=True)
        (folder / f"item_{i:07d}.jpg").touch()
        if i % 10 == 0:
            (folder / f"item_{i:07d}.txt").write_text(f"caption {i}\n", encoding="utf-8")
    return root


def timed(tree: Path, folder: Path) -> tuple[int, float]:
    # `python -c` puts the working directory first on sys.path: run in the tree, or it is this one.
    out = subprocess.run([sys.executable, "-c", TIMED, str(folder)], env={**os.environ, "PYTHONPATH": str(tree)},
                         cwd=tree, check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=30000)
    parser.add_argument("--folders", type=int, default=1, help="subfolders the files are spread over")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkout", type=Path, help="another tree whose listing is timed beside this one's")
    args = parser.parse_args()
    trees = {"this tree": Path.cwd()} | ({str(args.checkout): args.checkout} if args.checkout else {})
    seconds: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp), args.files, args.folders)
        for _ in range(args.rounds):
            for name, tree in trees.items():
                count, elapsed = timed(tree, folder)
                assert count == args.files, (name, count)
                seconds[name].append(elapsed)
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:>20}: median {median:.3f} s over {args.rounds} rounds, {median / args.files * 1e6:.1f} us per "
              f"file (all: {', '.join(f'{v:.3f}' for v in values)})")
    if args.checkout:
        ratio = statistics.median(seconds[str(args.checkout)]) / statistics.median(seconds["this tree"])
        print(f"{args.checkout} / this tree: x{ratio:.2f}")


if __name__ == "__main__":
    main()
