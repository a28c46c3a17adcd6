"""Helpers for tests: base64 images, vectors stored under several ids, the environment as the test run
found it, a gunicorn server."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import inspect
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import requests
from PIL import Image
from tqdm import tqdm

from sidecar.ingest.shards import ShardRow, ShardSet
from sidecar.retrieval.search import SearchOptions, search
from sidecar.types import Document, ModelSignature


def shard_rows(n: int) -> list[ShardRow]:
    """`n` shard rows d0, d1, ... of distinct images, for shard tests that write their own vectors."""
    return [ShardRow(id=f"d{i}", path=f"{i}.jpg", text="t", metadata={}, content_hash=f"h{i}", image_hash=f"i{i}")
            for i in range(n)]


def write_shards(out: Path, docs: Sequence[Document], signature: ModelSignature) -> Path:
    """Shards of `signature` holding `docs` as they are (vectors, text, metadata, hashes), as `embed` writes them."""
    shards = ShardSet(out)
    shards.start(signature, preprocessing={})
    shards.write_shard(np.stack([d.vector for d in docs]),
                       [ShardRow(id=d.id, path=f"{d.id}.jpg", text=d.text, metadata=dict(d.metadata),
                                 content_hash=d.content_hash, image_hash=d.content_hash) for d in docs])
    return out


class RecordingBar(tqdm):
    """A progress bar (put in place of indexing's tqdm) remembering every count it reached."""

    reached: list[int] = []

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        RecordingBar.reached.append(int(self.n))
        return shown


def removed_soon(path: Path, *, timeout_s: float = 30) -> bool:
    """Whether `path` is gone, or goes within `timeout_s`: a process that lets go of a replaced version of an
    embedded store removes it on a thread of its own, after the call that let go has returned."""
    deadline = time.monotonic() + timeout_s
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def search_pages(client, query: dict, *, k: int, limit: int | None = None) -> list[dict]:
    """The /v1/search answers for `query`, `k` hits a page from offset 0, while each names a next_offset
    (and, with `limit`, while the next page starts before it)."""
    pages, offset = [], 0
    while offset is not None and (limit is None or offset < limit):
        pages.append(client.post("/v1/search", json={**query, "k": k, "offset": offset}).json)
        offset = pages[-1].get("next_offset")
    return pages


@contextlib.contextmanager
def coarse_depths(store) -> Iterator[list[int]]:
    """The depth (`k`) of each coarse ranking asked of the real `store` meanwhile by this thread: vector, BM25
    and native hybrid searches, not BM25 restricted to given ids (the lexical scores of candidates already
    found). Not another thread's: the recall monitor's background checks search the store too."""
    depths: list[int] = []
    thread = threading.get_ident()

    def spy(method: str):
        real = getattr(store, method)

        def recorded(*args, **kwargs):
            arguments = inspect.signature(real).bind(*args, **kwargs).arguments
            if arguments.get("ids") is None and threading.get_ident() == thread:
                depths.append(arguments["k"])
            return real(*args, **kwargs)
        return recorded

    methods = ("vector_search", "text_search", "hybrid_search")
    for method in methods:
        setattr(store, method, spy(method))
    try:
        yield depths
    finally:
        for method in methods:
            delattr(store, method)  # the class's own method again


@contextlib.contextmanager
def store_counts(store) -> Iterator[list[int]]:
    """Each count of its documents the real `store` answers meanwhile (what /readyz asks of it)."""
    counted: list[int] = []
    real = store.count

    def recorded(*args, **kwargs):
        counted.append(real(*args, **kwargs))
        return counted[-1]

    store.count = recorded
    try:
        yield counted
    finally:
        del store.count  # the class's own method again


def image_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def png_b64(colour=(255, 0, 0), size=(32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Taken when the first test module imports this, before any fixture changes the environment:
# scripts that manage machine-wide things (the OpenSearch node) must see the real cache path.
ORIGINAL_ENVIRON = dict(os.environ)


def unit_vectors(n: int, *, dim: int = 32, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def tied_captions(*, dim: int = 32) -> tuple[list[Document], np.ndarray]:
    """Documents whose BM25 scores for "red" tie (the same caption), ranked the other way round by their
    vectors, two with one vector (a vector tie), and some no BM25 query matches; and the query vector."""
    basis = np.eye(dim, dtype=np.float32)

    def toward_query(cosine: float, axis: int) -> np.ndarray:
        return (cosine * basis[0] + np.sqrt(1 - cosine**2) * basis[axis]).astype(np.float32)

    captions = [("tied0", "a red square", 0.5), ("tied1", "a red square", 0.6), ("tied2", "a red square", 0.7),
                ("tied3", "a red square", 0.8), ("tied4", "a red square", 0.9), ("strong", "red red red", 0.1),
                ("twin0", "a blue circle", 0.95), ("twin1", "a red circle", 0.95),
                ("other0", "a green triangle", 0.3), ("other1", "a green triangle", 0.2)]
    docs = [Document(id=doc_id, vector=toward_query(cosine, 1 if doc_id.startswith("twin") else 2 + i), text=text,
                     content_hash=doc_id) for i, (doc_id, text, cosine) in enumerate(captions)]
    return docs, basis[0]


def assert_a_zero_weight_ranks_as_the_other_list(store: Any, query: np.ndarray, *, depth: int, fusion: str) -> None:
    """Hybrid search on `store` (holding `tied_captions`) with weights 0/1 ranks exactly as BM25 does, its ties in
    its own order, then what only the vector side found, in that side's order; 1/0 exactly as the vector side."""
    bm25_hits = store.text_search("red", depth)
    bm25, vector = [hit.id for hit in bm25_hits], [hit.id for hit in store.vector_search(query, depth)]
    assert len({hit.score for hit in bm25_hits}) < len(bm25_hits) - 3  # the five captions tie

    def ranked(weights: tuple[float, float]) -> list[str]:
        options = SearchOptions(mode="hybrid", k=depth, candidates=depth, fusion=fusion, weights=weights, rerank=False)
        return [hit.id for hit in search(store, vector=query, text="red", options=options).hits]

    assert ranked((0, 1)) == bm25 + [doc_id for doc_id in vector if doc_id not in bm25]
    assert ranked((1, 0)) == vector


def stored_copies(vectors: np.ndarray, *, copies: int) -> list[Document]:
    """Every vector under `copies` ids (a0, b0, …): the same image stored several times, so a top K
    whose size is no multiple of `copies` ends inside a group of equal scores."""
    return [Document(id=f"{'abcdefgh'[copy]}{i}", vector=v) for i, v in enumerate(vectors) for copy in range(copies)]


def repeat_last_scan(jpeg: bytes, times: int) -> bytes:
    """A progressive JPEG whose last scan comes `times` times: each copy is one more pass over every block."""
    start = jpeg.rindex(b"\xff\xda")  # the last scan's marker (entropy-coded data never holds 0xFF 0xDA)
    return jpeg[:start] + jpeg[start:-2] * times + jpeg[-2:]  # then EOI


def damage_sqlite_file(path: Path) -> None:
    """What a disk fault or a copy cut short leaves of the SQLite file `path`: bytes SQLite does not recognise, in
    it and in its write-ahead log and shared memory (the lock beside them is the server's own, not SQLite's)."""
    for part in path.parent.glob(path.name + "*"):
        if not part.name.endswith(".lock"):
            part.write_bytes(b"not a database" * 512)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gunicorn_boot(env: dict[str, str], *, config: bool = True) -> subprocess.CompletedProcess:
    """gunicorn started directly (as the Docker image's CMD does, past `serve`'s checks), one worker, on a
    free loopback port, with `env`, for a boot that must fail: it runs until gunicorn stops. Without `config`,
    gunicorn's defaults (its per-user control socket off) and the app module alone."""
    from sidecar.cli.serve import GUNICORN_CONFIG

    options = ["--config", GUNICORN_CONFIG] if config else ["--no-control-socket"]
    return subprocess.run([sys.executable, "-m", "gunicorn", *options, "--bind", f"127.0.0.1:{free_port()}",
                           "sidecar.api.wsgi:app"], capture_output=True, text=True, timeout=300, env=env)


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a child between fork and exec should not dlopen
_PR_SET_PDEATHSIG = 1
_TEST_RUN = os.getpid()


def ends_with_the_test_run() -> None:
    """A `preexec_fn` for a server a test starts in a session of its own: SIGTERM reaches it when the test run
    dies. Fixture teardown, which stops it otherwise, never runs in a pytest killed by a signal, and a gunicorn
    left behind holds its port, its store and two cores' worth of workers until someone finds it."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != _TEST_RUN:  # the run died before the request took effect
        os._exit(1)


@contextlib.contextmanager
def gunicorn_server(env: dict[str, str], log: Path, *, workers: int = 1, threads: int = 8,
                    host: str = "127.0.0.1", port: int | None = None, log_flag: str = "-q",
                    serve_args: Sequence[str] = (), api_key: str | None = None, ca_file: Path | None = None,
                    ready_status: int = 200) -> Iterator[str]:
    """`clip-sidecar serve` (gunicorn, this checkout's code) on a loopback `host`'s port (a free one unless
    given: a restart on the same port keeps a URL others hold, and appends to `log`) until the block
    ends; yields its URL once /readyz answers `ready_status` (503: a worker is up, not ready). Its stdout
    (gunicorn's access log) and stderr go to `log`. Settings come in `env` (SIDECAR_*); `log_flag` is the
    CLI's verbosity (-q, -v or ""); `serve_args` more flags for `serve`. The readiness poll sends
    `api_key` when the server takes keys, and speaks HTTPS, verifying against `ca_file`, when one is
    given (serve_args then carry --certfile/--keyfile)."""
    port = port or free_port()
    with log.open("a") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "sidecar.cli", *([log_flag] if log_flag else []), "serve",
                                    "--host", host, "--port", str(port), "--workers", str(workers),
                                    "--threads", str(threads), *serve_args],
                                   env={**os.environ, "GUNICORN_LOGLEVEL": "warning", **env},
                                   start_new_session=True, preexec_fn=ends_with_the_test_run, stdout=stderr,
                                   stderr=stderr)
    url = f"{'https' if ca_file else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ready = requests.get(f"{url}/readyz", headers=headers, timeout=2, verify=str(ca_file or True))
                if ready.status_code == ready_status:
                    break
            except requests.RequestException:
                pass  # the worker is still loading the model
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "gunicorn did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


class ThreadKiller(BaseException):
    """Not an Exception: the micro-batcher isolates failing requests with `except Exception`, so this
    one escapes its loop and ends the encode thread for real, through the real code path — what a
    bug in the loop or an interpreter-level error would do — without patching the batcher."""


def cli_ok(*args: object) -> str:
    """`clip-sidecar -q ARGS` in-process (click's runner): its output, asserting it exited 0."""
    from click.testing import CliRunner

    from sidecar.cli import main

    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output
