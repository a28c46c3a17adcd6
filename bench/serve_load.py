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

    .venv/bin/python bench/serve_load.py --variants floor,batched,unbatched   # tiny model, CPU
    .venv/bin/python bench/serve_load.py --model ViT-B-32 --requests 4000 --concurrency 1,16,64 \
        --workers 4 --client-processes 4 --variants batched,unbatched,no-graphs
    .venv/bin/python bench/serve_load.py --modality image --requests 500 --variants floor,batched,unbatched
"""

from __future__ import annotations

import argparse
import base64
import io
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
                 store_path: Path, app: str = "sidecar.api.wsgi:app") -> subprocess.Popen:
    env = {**os.environ, **variant, "SIDECAR_STORE_PATH": str(store_path), "GUNICORN_LOGLEVEL": "warning",
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
            "--pythonpath", str(ROOT / "bench"), app]
    # The access log goes to stdout, as the config writes it for users, read off a pipe as a
    # container runtime or systemd reads it.
    process = subprocess.Popen(args, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE)
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
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


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
        self.sock.sendall(b"%s %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
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


def drive(port: int, *, concurrency: int, requests: int, seed: int, encoding_format: str, modality: str,
          image_side: int, long_every: int) -> dict:
    """Runs in a client process: `requests` POSTs over `concurrency` keep-alive connections."""
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

    return post_concurrently(port, "/v1/embeddings", body, concurrency=concurrency, requests=requests)


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


def post_concurrently(port: int, path: str, body: Callable[[int, int], bytes], *, concurrency: int,
                      requests: int) -> dict:
    """`requests` POSTs of `body(worker id, request number)` to `path` over `concurrency` keep-alive
    connections: wall and client CPU seconds, errors (non-200 answers), the 200s' latencies."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = 0

    def worker(worker_id: int) -> None:
        nonlocal errors
        connection = Connection(port)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            payload = body(worker_id, i)
            started = time.perf_counter()
            status = connection.post(path, payload)
            elapsed = time.perf_counter() - started
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors += 1
        connection.close()

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return {"started": started, "wall": time.perf_counter() - started, "cpu": time.process_time() - cpu,
            "errors": errors, "latencies": latencies}


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def forward_cpu_seconds(port: int, modality: str) -> float:
    """CPU the forward passes of `modality` have taken so far, summed over the workers (0 for the floor)."""
    found = re.search(r'sidecar_forward_cpu_seconds_total\{modality="%s"\} (\S+)' % modality, scrape(port))
    return float(found.group(1)) if found else 0.0


def batch_histogram(port: int, modality: str) -> dict[str, float]:
    text = scrape(port)
    buckets = {m.group(1): float(m.group(2)) for m in
               re.finditer(r'sidecar_batch_size_bucket\{le="([^"]+)",modality="%s"\} (\S+)' % modality, text)}
    histogram, previous = {}, 0.0
    for le, cumulative in buckets.items():
        if cumulative - previous > 0:
            histogram[f"<={le}"] = cumulative - previous
        previous = cumulative
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


def run_load(port: int, concurrency: int, requests: int, seed: int, processes: int, *, server_pid: int,
             encoding_format: str, modality: str = "text", image_side: int = 256, long_every: int = 0) -> dict:
    """Split the connections over client processes (separate GILs) and merge their latencies."""
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    (server_cpu, threads_cpu), forward_cpu = cpu_seconds(server_pid), forward_cpu_seconds(port, modality)
    children = [subprocess.Popen([sys.executable, __file__, "--client", json.dumps(dict(
                                      port=port, concurrency=share, requests=requests * share // concurrency,
                                      seed=seed * 1000 + i, encoding_format=encoding_format, modality=modality,
                                      image_side=image_side, long_every=long_every))],
                                 stdout=subprocess.PIPE, text=True)
                for i, share in enumerate(shares)]
    parts = [json.loads(child.communicate(timeout=900)[0]) for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError("a load-generator process failed")
    server_cpu_after, threads_cpu_after = cpu_seconds(server_pid)
    server_cpu, threads_cpu = server_cpu_after - server_cpu, threads_cpu_after - threads_cpu
    forward_cpu = forward_cpu_seconds(port, modality) - forward_cpu
    client_cpu = sum(p["cpu"] for p in parts)  # the request loops only, not process start-up
    wall = max(p["started"] + p["wall"] for p in parts) - min(p["started"] for p in parts)
    ms = np.asarray([x for p in parts for x in p["latencies"]]) * 1000
    return {"concurrency": concurrency, "requests": len(ms), "errors": sum(p["errors"] for p in parts),
            "qps": len(ms) / wall, "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "server_cpu_ms": server_cpu / len(ms) * 1000,
            "forward_cpu_ms": forward_cpu / len(ms) * 1000, "client_cpu_ms": client_cpu / len(ms) * 1000,
            "threads_cpu_ms": {name: seconds / len(ms) * 1000 for name, seconds in threads_cpu.most_common()},
            "model_thread_busy": threads_cpu[f"batcher-{modality}"] / wall}


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
    parser.add_argument("--port", type=int, default=8731)
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
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    if args.long_every < 0 or (args.long_every and args.modality != "text"):
        parser.error(f"--long-every: {args.long_every}; a count of 0 (all short) or more, with --modality text")
    print(f"model {args.model or 'tiny-clip'}; gunicorn {args.workers} worker(s) x {args.threads} threads; "
          f"{args.client_processes} client process(es); {os.cpu_count()} CPUs; encoding_format {args.encoding_format}; "
          f"modality {args.modality}" + (f" ({args.image_side} px JPEGs)" if args.modality == "image" else "")
          + (f"; 1 text in {args.long_every} a long description" if args.long_every else ""))
    # Texts never seen before, by any variant or earlier run: no cache hit, in memory or on disk.
    run_id = time.time_ns() % 10**6 * 100
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as store_dir:
        for v, label in enumerate(variants):
            seed = run_id + 10 * v
            server = start_server(args.port, variant=VARIANTS[label], workers=args.workers, threads=args.threads,
                                  model=args.model, store_path=Path(store_dir),
                                  app="serve_floor:app" if label.startswith("floor") else "sidecar.api.wsgi:app")
            try:
                load = dict(server_pid=server.pid, encoding_format=args.encoding_format, modality=args.modality,
                            image_side=args.image_side, long_every=args.long_every)
                run_load(args.port, 4 * args.workers, 200 * args.workers, seed, args.client_processes, **load)  # warm-up
                results[label] = [run_load(args.port, c, args.requests,
                                           seed + 1 + i, args.client_processes, **load) for i, c in enumerate(levels)]
                print(f"\n{label} ({VARIANTS[label]}); batch sizes seen (all workers): {batch_histogram(args.port, args.modality)}")
            finally:
                stop_server(server)
            print(f"{'conc':>5} {'reqs':>6} {'err':>4} {'QPS':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
                  f"{'server CPU ms/req':>18} {'of it forward':>14} {'outside forward':>16} {'client CPU ms/req':>18}")
            for r in results[label]:
                print(f"{r['concurrency']:>5} {r['requests']:>6} {r['errors']:>4} {r['qps']:>8.1f} {r['p50']:>8.2f} "
                      f"{r['p95']:>8.2f} {r['p99']:>8.2f} {r['server_cpu_ms']:>18.3f} {r['forward_cpu_ms']:>14.3f} "
                      f"{r['server_cpu_ms'] - r['forward_cpu_ms']:>16.3f} {r['client_cpu_ms']:>18.2f}")
            for r in results[label]:
                # Which thread a request's CPU goes to, and how busy the model thread is: near one core
                # per worker, the model thread, not the request path, bounds the worker.
                shares = " · ".join(f"{name} {ms:.3f}" for name, ms in r["threads_cpu_ms"].items() if ms >= 0.005)
                busy = r["model_thread_busy"] / args.workers
                print(f"  concurrency {r['concurrency']:>3}, server CPU ms/req by thread: {shares}"
                      + (f"; model thread busy {busy:.0%} of a core (mean of the workers)" if busy else ""))
    for a, b in RATIOS:
        if a in results and b in results:
            print(f"\n{a} / {b}:")
            for x, y in zip(results[a], results[b]):
                outside = (x["server_cpu_ms"] - x["forward_cpu_ms"]) / max(1e-9, y["server_cpu_ms"] - y["forward_cpu_ms"])
                print(f"  concurrency {x['concurrency']:>3}: QPS x{x['qps'] / y['qps']:.2f}, "
                      f"p50 {x['p50']:.2f} vs {y['p50']:.2f} ms ({x['p50'] - y['p50']:+.2f} ms), "
                      f"server CPU outside the forward x{outside:.2f}")


if __name__ == "__main__":
    main()
