"""Soak: minutes of mixed valid and invalid traffic against gunicorn (2 workers) on loopback.

Builds a small embedded store (synthetic corpus → `clip-sidecar embed` → `index`), starts gunicorn
as `clip-sidecar serve` would, then keeps `--concurrency` keep-alive connections busy with a mix of
text, image and batched embeddings (new texts and repeated ones), searches in every mode, and
invalid requests (bad JSON, missing and wrong fields, bad base64, bytes that are not an image,
over-limit batches, unknown modes, wrong methods and paths). Reports requests, status counts,
each worker's RSS after the warm-up and at the end, worker restarts and batcher stops.

Goals (issue 10): no 5xx but 503/504; worker RSS growth ≤ 10 % after warm-up; no worker restarts.

    PYTHONPATH=. .venv/bin/python bench/soak.py        # 5 minutes, concurrency 16, 2 workers
    PYTHONPATH=. .venv/bin/python bench/soak.py --minutes 1 --concurrency 8
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from serve_load import Connection, start_server, stop_server

from sidecar.config import Settings
from sidecar.model.synthetic import write_corpus
from sidecar.model.weights import missing_weights

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
EXPECTED_5XX = {503, 504}  # overloaded, deadline passed: answers a caller should retry


def png_b64(rng: random.Random) -> str:
    buffer = io.BytesIO()
    colour = tuple(rng.randrange(256) for _ in range(3))
    Image.new("RGB", (rng.randrange(16, 96), rng.randrange(16, 96)), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def request_mix(rng: random.Random, serial: int, max_batch_items: int) -> tuple[str, str, bytes, str]:
    """One request: (kind, method, path, payload), drawn uniformly from 8 valid and 11 invalid kinds."""
    text = f"{rng.choice(COLOURS)} {rng.choice(SHAPES)}"
    unique = f"{text} soak {serial}"  # a cache miss
    choices = [
        ("embed text, new", "POST", "/v1/embeddings", {"input": unique, "encoding_format": "base64"}),
        ("embed text, repeated", "POST", "/v1/embeddings", {"input": [text]}),
        ("embed 4 texts", "POST", "/v1/embeddings", {"input": [f"{unique} {j}" for j in range(4)]}),
        ("embed image", "POST", "/v1/embeddings", {"input": [png_b64(rng)], "modality": "image"}),
        ("search vector", "POST", "/v1/search", {"text": text, "k": 5}),
        ("search hybrid + rerank", "POST", "/v1/search",
         {"text": unique, "mode": "hybrid", "fusion": rng.choice(["minmax", "zscore", "rrf"]), "rerank": True,
          "filters": {"color": [rng.choice(COLOURS)]}}),
        ("search bm25", "POST", "/v1/search", {"text": text, "mode": "bm25", "k": 3}),
        ("search image", "POST", "/v1/search", {"image": png_b64(rng), "k": 5}),
        # invalid
        ("bad: not JSON", "POST", "/v1/embeddings", b'{"input": ["red circle"'),
        ("bad: no input", "POST", "/v1/embeddings", {"inputs": ["red circle"]}),
        ("bad: input type", "POST", "/v1/embeddings", {"input": 42}),
        ("bad: empty batch", "POST", "/v1/embeddings", {"input": []}),
        ("bad: over max_batch_items", "POST", "/v1/embeddings", {"input": ["x"] * (max_batch_items + 1)}),
        ("bad: base64", "POST", "/v1/embeddings", {"input": ["%%%not base64%%%"], "modality": "image"}),
        ("bad: not an image", "POST", "/v1/embeddings",
         {"input": [base64.b64encode(b"plain text, not an image").decode()], "modality": "image"}),
        ("bad: unknown mode", "POST", "/v1/search", {"text": text, "mode": "telepathy"}),
        ("bad: k", "POST", "/v1/search", {"text": text, "k": -1}),
        ("bad: method", "GET", "/v1/search", b""),
        ("bad: path", "POST", "/v2/nothing", {"text": text}),
    ]
    kind, method, path, body = rng.choice(choices)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return kind, method, path, payload


def worker_pids(master: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == master:
                pids.add(int(entry.name))
    return pids


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def metric_sum(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def build_store(workdir: Path, items: int) -> Path:
    corpus = write_corpus(workdir / "corpus", items, seed=5)
    for args in (["embed", str(corpus), "--out", str(workdir / "shards")],
                 ["index", str(workdir / "shards"), "--store-path", str(workdir / "store")]):
        subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", *args], check=True, cwd=ROOT)
    return workdir / "store"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the measured run, warm-up included")
    parser.add_argument("--warmup-minutes", type=float, default=1.0,
                        help="traffic before the first RSS reading (the model's and the caches' first growth)")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive client connections")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=32, help="request threads per worker")
    parser.add_argument("--items", type=int, default=500, help="documents in the store")
    parser.add_argument("--port", type=int, default=8741)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    settings = Settings.from_env()
    missing = missing_weights(settings)
    if missing:
        sys.exit(f"soak: {missing}")
    with tempfile.TemporaryDirectory(prefix="clip-sidecar-soak-") as tmp:
        workdir = Path(tmp)
        store = build_store(workdir, args.items)
        # The run's own text-vector cache: no hit from earlier runs.
        variant = {"SIDECAR_TEXT_CACHE_PATH": str(workdir / "text-vectors.sqlite")}
        server = start_server(args.port, variant=variant, workers=args.workers, threads=args.threads, model=None,
                              store_path=store)
        try:
            report = soak(args, server.pid, settings.max_batch_items)
        finally:
            stop_server(server)
    print_report(args, report)


def soak(args: argparse.Namespace, master: int, max_batch_items: int) -> dict:
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()
    serial = iter(range(10**12))
    started = time.monotonic()
    end = started + args.minutes * 60
    warm_at = started + min(args.warmup_minutes, args.minutes / 2) * 60

    def client(index: int) -> None:
        rng = random.Random(f"{args.seed}/{index}")
        connection = Connection(args.port)
        while time.monotonic() < end:
            with lock:
                n = next(serial)
            kind, method, path, body = request_mix(rng, n, max_batch_items)
            try:
                status = str(connection.request(method, path, body))
            except OSError:  # the server closed the connection (a worker restarting): count it, reconnect
                status = "connection closed"
                connection.close()
                connection = Connection(args.port)
            with lock:
                statuses[kind][status] += 1
        connection.close()

    first_pids = worker_pids(master)
    with ThreadPoolExecutor(args.concurrency) as pool:
        clients = [pool.submit(client, i) for i in range(args.concurrency)]
        time.sleep(max(0.0, warm_at - time.monotonic()))
        warm_pids = worker_pids(master)
        warm_rss = {pid: rss_mb(pid) for pid in warm_pids}
        warm_requests = sum(sum(c.values()) for c in statuses.values())
        for future in clients:
            future.result()
    end_pids = worker_pids(master)
    return {"statuses": statuses, "first_pids": first_pids, "warm_rss": warm_rss,
            "end_rss": {pid: rss_mb(pid) for pid in end_pids}, "end_pids": end_pids,
            "warm_requests": warm_requests, "seconds": time.monotonic() - started,
            "batcher_stops": metric_sum(args.port, "sidecar_batcher_stops_total"),
            "server_5xx": metric_sum_5xx(args.port)}


def metric_sum_5xx(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counts: dict[str, float] = collections.Counter()
    for m in re.finditer(r'^sidecar_requests_total\{endpoint="[^"]*",status="(5\d\d)"\} (\S+)$', text, re.MULTILINE):
        counts[m.group(1)] += float(m.group(2))
    return dict(counts)


def print_report(args: argparse.Namespace, report: dict) -> None:
    statuses = report["statuses"]
    total = collections.Counter()
    for counts in statuses.values():
        total.update(counts)
    requests = sum(total.values())
    print(f"soak: {args.minutes:g} min ({report['seconds']:.0f} s), concurrency {args.concurrency}, gunicorn "
          f"{args.workers} workers x {args.threads} threads, {os.cpu_count()} CPUs")
    print(f"requests: {requests} ({requests / report['seconds']:.1f}/s), {report['warm_requests']} in the warm-up")
    print("status counts: " + ", ".join(f"{s}: {n}" for s, n in sorted(total.items())))
    print("by kind:")
    for kind in sorted(statuses):
        print(f"  {kind:<28} " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses[kind].items())))
    unexpected = {s: n for s, n in total.items() if s.startswith("5") and int(s) not in EXPECTED_5XX}
    print(f"5xx other than 503/504: {unexpected or 'none'} (server-side counters: {report['server_5xx'] or 'none'})")
    growth = []
    for pid in sorted(report["warm_rss"]):
        start, end = report["warm_rss"][pid], report["end_rss"].get(pid)
        if end is None:
            print(f"worker {pid}: RSS {start:.0f} MB after warm-up, gone at the end")
            continue
        growth.append((end - start) / start)
        print(f"worker {pid}: RSS {start:.0f} MB after warm-up, {end:.0f} MB at the end ({growth[-1]:+.1%})")
    restarts = len(report["end_pids"] - report["first_pids"])
    print(f"worker restarts: {restarts}; batcher stops: {report['batcher_stops']:.0f}")
    met = not unexpected and restarts == 0 and growth and max(growth) <= 0.10
    print(f"goals (no 5xx but 503/504, RSS growth <= 10 %, no restarts): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
