r"""Serving benchmark: gunicorn + the sidecar, driven over loopback at several concurrencies.

Runs the same load against several server variants in one run — `floor` (the same app and
gunicorn config, /v1/embeddings answered from a precomputed vector: bench/serve_floor.py), the
floor plus the model's forward on one fixed text (`floor-forward`: what the forward alone adds),
micro-batched, unbatched (max_batch=1), batched without the text-vector cache's SQLite file
(`no-disk-cache`), batched, the floor and unbatched with each worker pinned to one CPU (`pinned`,
`floor-pinned`, `unbatched-pinned`: pin_workers), batched without the access log (`no-access-log`;
every other variant writes it to stdout, read off a pipe, as users run it) and, on a GPU, batched
without CUDA graphs — and prints QPS, p50/p95/p99, server CPU per request and the part of it the
forward passes took (the batcher's sidecar_forward_cpu_seconds_total), that CPU by thread (gunicorn's
request threads, the model thread, the cache writer: by thread name, sidecar/threads.py) with how
busy the model thread was, the batch-size histogram and the ratios between variants. Every text
request is a cache miss (unique text), so the encoder does the work; with `--modality image` each
request carries one base64 JPEG (`--image-side` px, from a set of 64 drawn per client process;
images are not cached), decoded on the request thread and batched. The load comes from separate
client processes speaking keep-alive HTTP/1.1 over raw sockets, so the load generator costs little
CPU beside the server.

With `--interleave` the variants' servers run at once (ports --port, --port + 1, …) and every
connection sends its requests to each in turn, so a change in the machine's speed (a shared VM's
drifts by a third within minutes) hits every variant alike: use it for CPU per request and its
ratios. Each server then holds about concurrency / variants requests at a time (at concurrency 1 one
request at a time across them all), and its QPS is its share of the one load. Each server also
runs in the caches the others' requests leave behind, so compare like with like (two builds of the
sidecar, batched with pinned), not the floor with the sidecar (the floor would pay for the other's
forward). A variant written `NAME@PATH` runs from the checkout at PATH (a git worktree of another
commit: `git worktree add /tmp/before HEAD~1`), so two builds can be compared side by side.

    .venv/bin/python bench/serve_load.py --variants floor,batched,unbatched   # tiny model, CPU
    .venv/bin/python bench/serve_load.py --model ViT-B-32 --requests 4000 --concurrency 1,16,64 \
        --workers 4 --client-processes 4 --variants batched,unbatched,no-graphs
    .venv/bin/python bench/serve_load.py --modality image --requests 500 --variants floor,batched,unbatched
    .venv/bin/python bench/serve_load.py --interleave --requests 3000 --variants batched@/tmp/before,batched
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sidecar.cli.serve import GUNICORN_CONFIG

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
# --long-every's text: a product description as an ingest pipeline sends it, longer than the
# 77-token context of open_clip's CLIP models, so the model sees the whole context.
DESCRIPTION = ("lightweight everyday running shoe with a breathable knitted upper, a cushioned foam midsole "
               "that keeps its bounce over long distances, a grippy rubber outsole for wet city streets, "
               "reflective details for evening runs and a padded collar; machine washable, vegan materials, "
               "available in half sizes from 36 to 47, ships in recycled packaging within two working days")
# Server variants: SIDECAR_* settings each one runs with.
VARIANTS = {
    "floor": {"SIDECAR_MAX_BATCH": "64"},  # served by bench/serve_floor.py's app
    "floor-forward": {"SIDECAR_MAX_BATCH": "64", "FLOOR_FORWARD": "1"},  # serve_floor.py, forward on the request thread
    "batched": {"SIDECAR_MAX_BATCH": "64"},
    "unbatched": {"SIDECAR_MAX_BATCH": "1"},
    "no-graphs": {"SIDECAR_MAX_BATCH": "64", "SIDECAR_CUDA_GRAPHS": "false"},
    # Batched without the text-vector cache's SQLite file (memory LRU only): what the file costs.
    "no-disk-cache": {"SIDECAR_MAX_BATCH": "64", "SIDECAR_TEXT_CACHE_PERSIST": "false"},
    # Batched, the floor and unbatched with each worker on one CPU (pin_workers).
    "pinned": {"SIDECAR_MAX_BATCH": "64", "SIDECAR_PIN_WORKERS": "true"},
    "floor-pinned": {"SIDECAR_MAX_BATCH": "64", "SIDECAR_PIN_WORKERS": "true"},
    "unbatched-pinned": {"SIDECAR_MAX_BATCH": "1", "SIDECAR_PIN_WORKERS": "true"},
    # Batched without gunicorn's access log (one line per request on stdout otherwise).
    "no-access-log": {"SIDECAR_MAX_BATCH": "64", "GUNICORN_ACCESSLOG": ""},
}
RATIOS = [("batched", "unbatched"), ("batched", "no-graphs"), ("batched", "no-disk-cache"), ("batched", "floor"),
          ("floor-forward", "floor"), ("batched", "floor-forward"),
          ("pinned", "batched"), ("pinned", "floor-pinned"), ("pinned", "unbatched-pinned"),
          ("no-access-log", "batched")]


def start_server(port: int, *, variant: dict[str, str], workers: int, threads: int, model: str | None,
                 store_path: Path, app: str = "sidecar.api.wsgi:app", root: Path = ROOT) -> subprocess.Popen:
    """gunicorn serving `app` from the checkout at `root` (its `sidecar` package and bench/)."""
    store_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **variant, "SIDECAR_STORE_PATH": str(store_path), "GUNICORN_LOGLEVEL": "warning",
           # A text-vector cache file of its own, empty: no hits from earlier runs, no lock shared with
           # a server running beside it.
           "SIDECAR_TEXT_CACHE_PATH": str(store_path / "text-vectors.sqlite"),
           "SIDECAR_REQUEST_THREADS": str(threads),  # gunicorn's threads
           # Admit every request a worker's threads can hold (the default bound, half of them, answers
           # 503 under this load, and for max_batch 1 admits one item): measured here is throughput.
           "SIDECAR_QUEUE_ITEMS": str(threads)}
    if model:
        env["SIDECAR_MODEL"] = model
    with socket.socket() as probe:
        # gunicorn retries a taken port for seconds while the readiness poll below would be answered
        # by whatever holds it (on the H200, a server left by a run killed at its time limit).
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} already answers: stop what listens there or pass --port")
    args = [sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG,
            "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
            "--pythonpath", str(root / "bench"), app]
    # The access log goes to stdout, as the config writes it for users, read off a pipe as a
    # container runtime or systemd reads it.
    process = subprocess.Popen(args, env=env, cwd=root, start_new_session=True, stdout=subprocess.PIPE)
    threading.Thread(target=_discard, args=(process.stdout,), daemon=True).start()
    deadline = time.monotonic() + 300
    ready: set[int] = set()
    while time.monotonic() < deadline and process.poll() is None:
        # A worker accepts connections once its model is loaded; poll on fresh connections until
        # every worker has answered, so no level runs on fewer workers than asked for.
        with ThreadPoolExecutor(4 * workers) as pool:
            ready |= {pid for pid in pool.map(lambda _: _ready_pid(port), range(4 * workers)) if pid}
        if len(ready) >= workers:
            return process
        time.sleep(0.3)
    if process.poll() is not None:  # its process group is gone: nothing to stop
        raise RuntimeError(f"the server exited with code {process.returncode} before {workers} worker(s) were "
                           "ready (gunicorn's log above says why)")
    stop_server(process)
    raise RuntimeError(f"{len(ready)} of {workers} workers became ready in 300 s")


def _discard(stream) -> None:
    """Read a stream to its end, keeping nothing."""
    while stream.read(1 << 16):
        pass


def _ready_pid(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return json.loads(response.read())["pid"] if response.status == 200 else None
    except OSError:
        return None


def stop_server(process: subprocess.Popen) -> None:
    """End the server's whole process group, killed where gunicorn's graceful stop has not ended it in
    30 s (workers still loading a model ignore SIGTERM): its store folder is removed next, under it."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Connection:
    """One keep-alive HTTP/1.1 connection over a raw socket: a request costs one send and a few
    recv calls, far less client CPU than http.client, which matters on a two-core machine."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def post(self, path: str, body: bytes) -> int:
        return self.request("POST", path, body)

    def request(self, method: str, path: str, body: bytes = b"") -> int:
        """Send one request, read its response whole; returns the status code."""
        self.sock.sendall(b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (method.encode(), path.encode(), len(body), body))
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
        while len(self.buffer) < length:
            self.buffer += self._recv()
        self.buffer = self.buffer[length:]
        return int(head[9:12])

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def drive(ports: list[int], *, concurrency: int, requests: int, seed: int, encoding_format: str, modality: str,
          image_side: int, long_every: int) -> dict:
    """Runs in a client process: `requests` POSTs over `concurrency` keep-alive connections, each
    sending its requests to `ports` in turn."""
    if modality == "image":
        images = [json.dumps(base64.b64encode(jpeg).decode("ascii")) for jpeg in drawn_jpegs(64, image_side, seed)]

        def body(worker_id: int, i: int) -> bytes:
            image = images[(worker_id * 7 + i) % len(images)]
            return b'{"input": [{"image": %s}], "encoding_format": "%s"}' % (image.encode(), encoding_format.encode())
    else:
        def body(worker_id: int, i: int) -> bytes:
            text = f"{COLOURS[i % 8]} {SHAPES[(i // 8) % 5]} number {seed}-{worker_id}-{i}"
            if long_every and i % long_every == long_every - 1:
                text = f"{text}: {DESCRIPTION}"
            return json.dumps({"input": [text], "encoding_format": encoding_format}).encode()

    return post_concurrently(ports, "/v1/embeddings", body, concurrency=concurrency, requests=requests)


def drawn_jpegs(count: int, side: int, seed: int) -> list[bytes]:
    """`count` JPEGs (quality 90) of a coloured disc on noise, `side` px square. Noise is JPEG's
    worst case, so decoding costs what a detailed photo of that size costs, or a little more."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        x, y = rng.integers(0, side // 2, size=2)
        draw.ellipse((int(x), int(y), int(x) + side // 2, int(y) + side // 2), fill=COLOURS[i % len(COLOURS)])
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def post_concurrently(ports: list[int], path: str, body: Callable[[int, int], bytes], *, concurrency: int,
                      requests: int) -> dict:
    """`requests` POSTs of `body(worker id, request number)` to `path` over `concurrency` keep-alive
    connections, each sending its requests to `ports` in turn: wall and client CPU seconds, and per
    port the errors (non-200 answers) and the 200s' latencies."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[list[float]] = [[] for _ in ports]
    errors = [0] * len(ports)

    def worker(worker_id: int) -> None:
        connections = [Connection(port) for port in ports]
        for sent in itertools.count():
            with lock:
                i = next(counter, None)
            if i is None:
                break
            payload = body(worker_id, i)
            server = (worker_id + sent) % len(ports)  # this connection's turn, whatever the others drew
            started = time.perf_counter()
            status = connections[server].post(path, payload)
            elapsed = time.perf_counter() - started
            with lock:
                if status == 200:
                    latencies[server].append(elapsed)
                else:
                    errors[server] += 1
        for connection in connections:
            connection.close()

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return {"started": started, "wall": time.perf_counter() - started, "cpu": time.process_time() - cpu,
            "errors": errors, "latencies": latencies}


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def coarse_samples(text: str, name: str, modality: str) -> list[Sample]:
    """The samples called `name` of `modality` that the coarse model recorded (`model="coarse"`: these
    servers load no fine model; a build from before that label, run as NAME@PATH, has none)."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and sample.labels.get("modality") == modality
            and sample.labels.get("model", "coarse") == "coarse"]


def forward_cpu_seconds(port: int, modality: str) -> float:
    """CPU the forward passes of `modality` have taken so far, summed over the workers (0 for the floor)."""
    return sum(sample.value for sample in coarse_samples(scrape(port), "sidecar_forward_cpu_seconds_total", modality))


def batch_histogram(port: int, modality: str) -> dict[str, float]:
    buckets = coarse_samples(scrape(port), "sidecar_batch_size_bucket", modality)
    histogram, previous = {}, 0.0
    for bucket in sorted(buckets, key=lambda sample: float(sample.labels["le"])):
        if bucket.value - previous > 0:
            histogram[f"<={bucket.labels['le']}"] = bucket.value - previous
        previous = bucket.value
    return histogram


def cpu_seconds(pid: int) -> tuple[float, Counter[str]]:
    """User + system CPU of a process and its children (the gunicorn master and its workers), and of
    their live threads summed by thread name: the project's threads are named (sidecar/threads.py:
    "batcher-text", "text-cache-writ"…), gunicorn's own (its poller and request threads) carry the
    worker's title ("gunicorn: worke")."""
    def used(stat: str) -> tuple[str, float]:  # a /proc stat line: the name, utime + stime in seconds
        fields = stat[stat.rindex(")") + 2:].split()
        return stat[stat.index("(") + 1:stat.rindex(")")], (int(fields[11]) + int(fields[12])) / tick

    tick = os.sysconf("SC_CLK_TCK")
    total, threads = 0.0, Counter()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(entry.name) != pid and int(stat[stat.rindex(")") + 2:].split()[1]) != pid:
                continue
            total += used(stat)[1]
            for task in (entry / "task").iterdir():
                name, seconds = used((task / "stat").read_text())
                threads[name] += seconds
        except OSError:  # a process or thread that ended meanwhile
            continue
    return total, threads


def run_load(ports: list[int], concurrency: int, requests: int, seed: int, processes: int, *, server_pids: list[int],
             encoding_format: str, modality: str = "text", image_side: int = 256, long_every: int = 0) -> list[dict]:
    """`requests` per server, sent to the servers in turn, the connections split over client processes
    (separate GILs): one result per server, each from its own CPU, forward CPU and latencies."""
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    total = requests * len(ports)

    def snapshot() -> list[tuple[float, Counter[str], float]]:
        return [(*cpu_seconds(pid), forward_cpu_seconds(port, modality)) for port, pid in zip(ports, server_pids)]

    before = snapshot()
    children = [subprocess.Popen([sys.executable, __file__, "--client", json.dumps(dict(
                                      ports=ports, concurrency=share, requests=total * share // concurrency,
                                      seed=seed * 1000 + i, encoding_format=encoding_format, modality=modality,
                                      image_side=image_side, long_every=long_every))],
                                 stdout=subprocess.PIPE, text=True)
                for i, share in enumerate(shares)]
    parts = [json.loads(child.communicate(timeout=900)[0]) for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError("a load-generator process failed")
    after = snapshot()
    client_cpu = sum(p["cpu"] for p in parts)  # the request loops only, not process start-up
    wall = max(p["started"] + p["wall"] for p in parts) - min(p["started"] for p in parts)
    results = []
    for server, ((cpu0, threads0, forward0), (cpu1, threads1, forward1)) in enumerate(zip(before, after)):
        threads_cpu = threads1 - threads0
        ms = np.asarray([x for p in parts for x in p["latencies"][server]]) * 1000
        if not len(ms):
            raise RuntimeError(f"server {server} answered none of its requests with 200 "
                               f"({sum(p['errors'][server] for p in parts)} other answers): see its log")
        results.append({
            "concurrency": concurrency, "requests": len(ms), "errors": sum(p["errors"][server] for p in parts),
            "qps": len(ms) / wall, "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "server_cpu_ms": (cpu1 - cpu0) / len(ms) * 1000,
            "forward_cpu_ms": (forward1 - forward0) / len(ms) * 1000,
            "client_cpu_ms": client_cpu / len(ms) / len(ports) * 1000,
            "threads_cpu_ms": {name: seconds / len(ms) * 1000 for name, seconds in threads_cpu.most_common()},
            "model_thread_busy": threads_cpu[f"batcher-{modality}"] / wall})
    return results


def print_variant(label: str, levels: list[dict], histogram: dict[str, float], *, workers: int) -> None:
    print(f"\n{label} ({VARIANTS[label.partition('@')[0]]}); batch sizes seen (all workers): {histogram}")
    print(f"{'conc':>5} {'reqs':>6} {'err':>4} {'QPS':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'server CPU ms/req':>18} {'of it forward':>14} {'outside forward':>16} {'client CPU ms/req':>18}")
    for r in levels:
        print(f"{r['concurrency']:>5} {r['requests']:>6} {r['errors']:>4} {r['qps']:>8.1f} {r['p50']:>8.2f} "
              f"{r['p95']:>8.2f} {r['p99']:>8.2f} {r['server_cpu_ms']:>18.3f} {r['forward_cpu_ms']:>14.3f} "
              f"{r['server_cpu_ms'] - r['forward_cpu_ms']:>16.3f} {r['client_cpu_ms']:>18.2f}")
    for r in levels:
        # Which thread a request's CPU goes to, and how busy the model thread is: near one core
        # per worker, the model thread, not the request path, bounds the worker.
        shares = " · ".join(f"{name} {ms:.3f}" for name, ms in r["threads_cpu_ms"].items() if ms >= 0.005)
        busy = r["model_thread_busy"] / workers
        print(f"  concurrency {r['concurrency']:>3}, server CPU ms/req by thread: {shares}"
              + (f"; model thread busy {busy:.0%} of a core (mean of the workers)" if busy else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="SIDECAR_MODEL for the server (default: tiny-clip)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=1500,
                        help="requests per concurrency level")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes (one model each)")
    parser.add_argument("--threads", type=int, default=64, help="gunicorn threads per worker")
    parser.add_argument("--client-processes", type=int, default=1, help="load-generator processes")
    parser.add_argument("--variants", default="floor,batched,unbatched", help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--encoding-format", default="base64", choices=("base64", "float"),
                        help="response vectors as OpenAI's clients ask for them (base64) or JSON floats")
    parser.add_argument("--modality", default="text", choices=("text", "image"),
                        help="what each request asks to encode: one unique text, or one base64 JPEG")
    parser.add_argument("--image-side", type=int, default=256, help="--modality image: the JPEGs' side in px")
    parser.add_argument("--long-every", type=int, default=0, metavar="N",
                        help="--modality text: every Nth request's text is a product description longer than "
                             "the model's context, the rest short queries (0: all short)")
    parser.add_argument("--port", type=int, default=8731, help="the first server's port (--interleave: one per variant)")
    parser.add_argument("--interleave", action="store_true",
                        help="run the variants' servers at once, each connection sending to them in turn (see above)")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # a client process: drive()'s arguments as JSON
    args = parser.parse_args()
    if args.client:
        print(json.dumps(drive(**json.loads(args.client))))
        return

    # A time limit's SIGTERM (gpu_run.sh's `timeout`) unwinds through the `finally` that stops the
    # server: it runs in its own session, so nothing else would end it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = args.variants.split(",")
    unknown = {label.partition("@")[0] for label in variants} - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    for label in variants:
        tree = label.partition("@")[2]
        if tree and not (Path(tree) / "sidecar").is_dir():
            parser.error(f"--variants: {label}: {tree} is not a checkout of this project (no sidecar/ in it)")
    if args.long_every < 0 or (args.long_every and args.modality != "text"):
        parser.error(f"--long-every: {args.long_every}; a count of 0 (all short) or more, with --modality text")
    print(f"model {args.model or 'tiny-clip'}; gunicorn {args.workers} worker(s) x {args.threads} threads; "
          f"{args.client_processes} client process(es); {os.cpu_count()} CPUs; encoding_format {args.encoding_format}; "
          f"modality {args.modality}" + (f" ({args.image_side} px JPEGs)" if args.modality == "image" else "")
          + (f"; 1 text in {args.long_every} a long description" if args.long_every else ""))
    # Texts never seen before, by any variant or earlier run: no cache hit, in memory or on disk.
    run_id = time.time_ns() % 10**6 * 100
    results: dict[str, list[dict]] = {}
    groups = [variants] if args.interleave else [[label] for label in variants]
    with tempfile.TemporaryDirectory() as store_dir:
        for g, group in enumerate(groups):
            seed = run_id + 10 * g
            ports = [args.port + i for i in range(len(group))]
            servers: list[subprocess.Popen] = []
            try:
                for i, (port, label) in enumerate(zip(ports, group)):
                    name, _, tree = label.partition("@")
                    servers.append(start_server(
                        port, variant=VARIANTS[name], workers=args.workers, threads=args.threads, model=args.model,
                        store_path=Path(store_dir) / f"{g}-{i}", root=Path(tree).resolve() if tree else ROOT,
                        app="serve_floor:app" if name.startswith("floor") else "sidecar.api.wsgi:app"))
                load = dict(server_pids=[server.pid for server in servers], encoding_format=args.encoding_format,
                            modality=args.modality, image_side=args.image_side, long_every=args.long_every)
                run_load(ports, 4 * args.workers, 200 * args.workers, seed, args.client_processes, **load)  # warm-up
                levels_run = [run_load(ports, c, args.requests, seed + 1 + i, args.client_processes, **load)
                              for i, c in enumerate(levels)]
                histograms = [batch_histogram(port, args.modality) for port in ports]
            finally:
                for server in servers:
                    stop_server(server)
            for index, label in enumerate(group):
                results[label] = [level[index] for level in levels_run]
                print_variant(label, results[label], histograms[index], workers=args.workers)
    # Each variant from another checkout against the same variant from this one.
    builds = [(label, label.partition("@")[0]) for label in results if "@" in label]
    for a, b in RATIOS + builds:
        if a in results and b in results:
            print(f"\n{a} / {b}:")
            for x, y in zip(results[a], results[b]):
                outside = (x["server_cpu_ms"] - x["forward_cpu_ms"]) / max(1e-9, y["server_cpu_ms"] - y["forward_cpu_ms"])
                print(f"  concurrency {x['concurrency']:>3}: QPS x{x['qps'] / y['qps']:.2f}, "
                      f"p50 {x['p50']:.2f} vs {y['p50']:.2f} ms ({x['p50'] - y['p50']:+.2f} ms), "
                      f"server CPU outside the forward x{outside:.2f}")


if __name__ == "__main__":
    main()
