"""Where a lone text request's CPU goes, in-process: the app through Flask's test client (no gunicorn,
no sockets), unique texts one at a time, each piece of the path timed by thread CPU on the thread that
runs it (the request thread, the text batcher's model thread), the process's CPU per request, and the
floor's (bench/serve_floor.py: the same app answering from a precomputed vector) beside it. The pieces
overlap (a batch holds the tokenising, the forward, the cache file), so they do not add up.

Each measurement runs in a fresh process. `--checkout` times another tree's code beside this one's
(e.g. a `git worktree` of an older commit), rounds alternating, so the ratio comes from one run on one
machine; a piece that tree lacks shows as "–".

    PYTHONPATH=. .venv/bin/python bench/request_pieces.py
    git worktree add /tmp/before HEAD~1
    PYTHONPATH=. .venv/bin/python bench/request_pieces.py --checkout /tmp/before
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

# Runs in a fresh process with the tree under test first on sys.path and as the working directory.
TIMED = r"""
import collections, functools, json, random, sys, time
sys.path.insert(1, "bench")
mode, n = sys.argv[1], int(sys.argv[2])
cpu = collections.Counter()

def timing(original, label):
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        started = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            cpu[label] += time.thread_time() - started
    return wrapper

def timed(owner, name, label, static=False):
    if not hasattr(owner, name):
        return  # another tree's code without this piece
    wrapper = timing(getattr(owner, name), label)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)

if mode == "floor":
    from serve_floor import app
else:
    import prometheus_client.metrics as prometheus
    from sidecar.api.wsgi import app
    from sidecar.model.encoder import Encoder
    from sidecar.serving.batching import MicroBatcher
    from sidecar.serving.cache import TextVectorCache
    timed(TextVectorCache, "get_or_compute", "request thread: cache lookup, incl. the wait")
    timed(MicroBatcher, "submit", "request thread: hand-off and wait")
    timed(MicroBatcher, "_execute", "model thread: the batch")
    timed(Encoder, "prepare_texts", "model thread: tokenise")
    timed(Encoder, "forward_texts", "model thread: forward")
    timed(Encoder, "postprocess", "model thread: normalise", static=True)
    timed(TextVectorCache, "_load", "model thread: cache file read")
    timed(TextVectorCache, "_save", "model thread: cache file write queued")
    for kind, method in ((prometheus.Histogram, "observe"), (prometheus.Counter, "inc"), (prometheus.Gauge, "set")):
        timed(kind, method, "metrics (all threads)")
views = app.view_functions
views["embeddings.create_embeddings"] = timing(views["embeddings.create_embeddings"], "request thread: handler")
client = app.test_client()
seed = random.randrange(10**9)
def post(i):
    response = client.post("/v1/embeddings", json={"input": [f"red circle number {seed}-{i}"],
                                                   "encoding_format": "base64"})
    assert response.status_code == 200, response.data
for i in range(300):
    post(-i - 1)  # warm-up: first calls, caches, the batcher's first batches
cpu.clear()
process, thread = time.process_time(), time.thread_time()
for i in range(n):
    post(i)
out = {"process": time.process_time() - process, "request thread (all)": time.thread_time() - thread, **cpu}
print(json.dumps({label: seconds / n * 1e6 for label, seconds in out.items()}))
"""


def measure(tree: Path, mode: str, requests: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        # A store and a text-vector cache file of its own, empty: no hits from earlier runs.
        env = {**os.environ, "PYTHONPATH": str(tree), "SIDECAR_STORE_PATH": f"{scratch}/store",
               "SIDECAR_TEXT_CACHE_PATH": f"{scratch}/text-vectors.sqlite"}
        out = subprocess.run([sys.executable, "-c", TIMED, mode, str(requests)], env=env, cwd=tree, check=True,
                             capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkout", type=Path, help="another tree timed beside this one")
    args = parser.parse_args()
    trees = {"this tree": Path.cwd()} | ({str(args.checkout): args.checkout.resolve()} if args.checkout else {})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    floors: list[float] = []
    for _ in range(args.rounds):
        floors.append(measure(Path.cwd(), "floor", args.requests)["process"])
        for name, tree in trees.items():
            runs[name].append(measure(tree, "sidecar", args.requests))
    floor = statistics.median(floors)
    print(f"CPU µs per request, median of {args.rounds} rounds of {args.requests} unique texts; "
          f"the floor: {floor:.0f} µs per request (rounds: {', '.join(f'{f:.0f}' for f in floors)})")
    print(f"{'piece':>45}" + "".join(f"{name[-22:]:>24}" for name in trees) + ("   ratio" if args.checkout else ""))
    order = ["process", "request thread (all)", "request thread: handler",
             "request thread: cache lookup, incl. the wait", "request thread: hand-off and wait",
             "model thread: the batch", "model thread: cache file read", "model thread: tokenise",
             "model thread: forward", "model thread: normalise", "model thread: cache file write queued",
             "metrics (all threads)"]
    labels = sorted({label for name in trees for run in runs[name] for label in run},
                    key=lambda label: order.index(label) if label in order else len(order))
    medians = {name: {label: statistics.median(run.get(label, float("nan")) for run in runs[name])
                      for label in labels} for name in trees}
    for label in labels:
        cells = "".join(f"{medians[name][label]:>24.1f}" if medians[name][label] == medians[name][label]
                        else f"{'–':>24}" for name in trees)
        ratio = (f"   x{medians[str(args.checkout)][label] / medians['this tree'][label]:.2f}"
                 if args.checkout and medians["this tree"][label] else "")
        print(f"{label:>45}{cells}{ratio}")
    for name in trees:
        # The forward's CPU as the batcher's metric counts it: forward and normalise.
        outside = medians[name]["process"] - medians[name].get("model thread: forward", 0.0) \
            - medians[name].get("model thread: normalise", 0.0)
        print(f"{name}: outside the forward {outside:.0f} µs per request, x{outside / floor:.2f} the floor's")


if __name__ == "__main__":
    main()
