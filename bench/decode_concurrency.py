"""A gunicorn worker's peak memory under concurrent requests of large, small-on-the-wire images: the
effect of the per-worker decode budget (decode_memory_bytes).

A solid-colour 40-megapixel PNG is ~120 KB on the wire and ~160 MB decoded. This starts
`clip-sidecar serve` (1 worker, 16 threads, tiny model, empty embedded store) from a checkout,
sends `--requests` such images at once to /v1/embeddings, and reports the statuses and the
worker's resident memory before and at its peak (VmHWM, reset once the model is loaded; Linux). `--checkout` runs another tree's code
(e.g. a `git worktree` of an older commit) for a side-by-side comparison.

    PYTHONPATH=. .venv/bin/python bench/decode_concurrency.py [--requests 8] [--checkout PATH]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image


def large_png(megapixels: float) -> str:
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    buffer = io.BytesIO()
    Image.new("RGB", (width, int(megapixels * 1e6) // width), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def memory_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--megapixels", type=float, default=39.9)
    parser.add_argument("--checkout", type=Path, default=Path.cwd(), help="tree whose sidecar/ serves")
    args = parser.parse_args()
    if not (args.checkout / "sidecar" / "__init__.py").is_file():
        # Python would fall back on the installed sidecar, and the run would measure another tree than it names.
        parser.error(f"--checkout {args.checkout}: no sidecar/ package there")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    image = large_png(args.megapixels)
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "PYTHONPATH": str(args.checkout.resolve()), "SIDECAR_STORE_PATH": f"{folder}/store",
               "GUNICORN_LOGLEVEL": "warning"}
        log = open(f"{folder}/server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "-q", "serve", "--port", str(port),
                                   "--workers", "1", "--threads", "16"], env=env, start_new_session=True,
                                  stdout=log, stderr=log, cwd=args.checkout)  # gunicorn imports from its cwd
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.3)
                if server.poll() is not None:  # it never will be ready: say why, do not wait forever
                    log.flush()
                    raise SystemExit(f"the sidecar exited: {Path(folder, 'server.log').read_text()[-2000:]}")
            pid = worker_pid(server.pid)
            before = memory_kb(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS from here on, not the model load's

            def post(_: int) -> int:
                return requests.post(f"{url}/v1/embeddings", json={"input": [image], "modality": "image"},
                                     timeout=300).status_code

            started = time.perf_counter()
            with ThreadPoolExecutor(args.requests) as pool:
                statuses = Counter(pool.map(post, range(args.requests)))
            took = time.perf_counter() - started
            peak = memory_kb(pid, "VmHWM")
        finally:
            with contextlib.suppress(ProcessLookupError):  # a server that exited has no group left
                os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
            log.close()
    print(f"checkout {args.checkout.resolve()}: {args.requests} concurrent requests, one "
          f"{args.megapixels:g} MP PNG each ({len(image) * 3 // 4 // 1024} KB)")
    print(f"statuses {dict(statuses)}; worker RSS {before / 1024:.0f} MB before, peak {peak / 1024:.0f} MB; "
          f"{took:.1f} s")


if __name__ == "__main__":
    main()
