"""Serving benchmark: gunicorn + the sidecar, driven over loopback at several concurrencies.

Runs the same load against micro-batched serving and against max_batch=1 (unbatched) in one
run and prints QPS, p50/p95/p99 and the batch-size histogram, and the batched/unbatched ratio.
Every request is a cache miss (unique text), so the encoder does the work.

    .venv/bin/python bench/serve_load.py                       # tiny model, CPU
    .venv/bin/python bench/serve_load.py --model ViT-B-32 --requests 4000 --concurrency 1,16,64
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]


def start_server(port: int, *, max_batch: int, threads: int, model: str | None, store_path: Path) -> subprocess.Popen:
    env = {**os.environ, "SIDECAR_MAX_BATCH": str(max_batch), "SIDECAR_STORE_PATH": str(store_path),
           "GUNICORN_LOGLEVEL": "warning"}
    if model:
        env["SIDECAR_MODEL"] = model
    args = [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "docker" / "gunicorn.conf.py"),
            "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", str(threads),
            "--access-logfile", "/dev/null", "sidecar.wsgi:app"]
    process = subprocess.Popen(args, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.3)
    stop_server(process)
    raise RuntimeError("server did not become ready in 300 s")


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def drive(port: int, *, concurrency: int, requests: int, seed: int) -> dict:
    """Runs in this (client) process: `requests` POSTs over `concurrency` keep-alive connections."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = 0

    def worker(worker_id: int) -> None:
        nonlocal errors
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            text = f"{COLOURS[i % 8]} {SHAPES[(i // 8) % 5]} number {seed}-{worker_id}-{i}"
            body = json.dumps({"input": [text]})
            started = time.perf_counter()
            connection.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                if response.status == 200:
                    latencies.append(elapsed)
                else:
                    errors += 1
        connection.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": requests, "errors": errors, "qps": len(latencies) / wall,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99))}


def batch_histogram(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    buckets = {m.group(1): float(m.group(2)) for m in
               re.finditer(r'sidecar_batch_size_bucket\{le="([^"]+)",modality="text"\} (\S+)', text)}
    histogram, previous = {}, 0.0
    for le, cumulative in buckets.items():
        if cumulative - previous > 0:
            histogram[f"<={le}"] = cumulative - previous
        previous = cumulative
    return histogram


def run_client(port: int, concurrency: int, requests: int, seed: int) -> dict:
    """The load comes from a separate process, so client threads don't share the server's GIL."""
    out = subprocess.run([sys.executable, __file__, "--client", str(port), str(concurrency), str(requests),
                          str(seed)], capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="SIDECAR_MODEL for the server (default: tiny-clip)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=1500, help="requests per concurrency level")
    parser.add_argument("--threads", type=int, default=64, help="gunicorn threads per worker")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        port, concurrency, requests, seed = map(int, args.client)
        print(json.dumps(drive(port, concurrency=concurrency, requests=requests, seed=seed)))
        return

    levels = [int(c) for c in args.concurrency.split(",")]
    run_id = time.time_ns() % 10**9  # texts never seen before: no cache hit, in memory or on disk
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as store_dir:
        for label, max_batch in (("batched", 64), ("unbatched", 1)):
            server = start_server(args.port, max_batch=max_batch, threads=args.threads, model=args.model,
                                  store_path=Path(store_dir))
            try:
                run_client(args.port, 4, 100, seed=run_id - 1)  # warm-up
                results[label] = [run_client(args.port, c, min(args.requests, 50 * c if c == 1 else args.requests),
                                             seed=run_id + i) for i, c in enumerate(levels)]
                print(f"\n{label} (max_batch={max_batch}); batch sizes seen: {batch_histogram(args.port)}")
            finally:
                stop_server(server)
            print(f"{'conc':>5} {'reqs':>6} {'err':>4} {'QPS':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
            for r in results[label]:
                print(f"{r['concurrency']:>5} {r['requests']:>6} {r['errors']:>4} {r['qps']:>8.1f} {r['p50']:>8.2f} "
                      f"{r['p95']:>8.2f} {r['p99']:>8.2f}")
    print("\nbatched / unbatched:")
    for b, u in zip(results["batched"], results["unbatched"]):
        print(f"  concurrency {b['concurrency']:>3}: QPS x{b['qps'] / u['qps']:.2f}, "
              f"p50 {b['p50']:.2f} vs {u['p50']:.2f} ms ({b['p50'] - u['p50']:+.2f} ms)")


if __name__ == "__main__":
    main()
