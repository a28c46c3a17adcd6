"""Serving under concurrency: gunicorn for real (batching, overload 503, metrics summed over workers, a
dead encode thread replaced), and the app's timeout (504) and dead-thread (503) answers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import sidecar
from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.config import Settings
from sidecar.stores.embedded import EmbeddedStore
from tests.support import ThreadKiller, damage_sqlite_file, ends_with_the_test_run, free_port, gunicorn_boot


class Server:
    """A gunicorn server of the sidecar on loopback, with its own text-vector cache and log."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value in one /metrics scrape (0 if absent)."""
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def ready_pid(self) -> int | None:
        try:
            response = requests.get(f"{self.url}/readyz", timeout=5)
        except requests.RequestException:
            return None
        return response.json()["pid"] if response.status_code == 200 else None


@pytest.fixture
def start_gunicorn(store_path, tmp_path):
    """Start the server as `clip-sidecar -q serve --workers N [--threads T]` does, or gunicorn directly
    with another config file; SIDECAR_* settings as keyword arguments; GUNICORN_LOGLEVEL `loglevel`
    (None: unset)."""
    started: list[subprocess.Popen] = []

    def start(*, workers: int = 1, threads: int | None = None, config: str | None = None,
              loglevel: str | None = "info", **settings: str) -> Server:
        port = free_port()
        env = {**os.environ, "SIDECAR_STORE_PATH": str(store_path),
               # Its own text-vector cache: no vector computed by another test or an earlier run.
               "SIDECAR_TEXT_CACHE_PATH": str(tmp_path / f"text-vectors-{port}.sqlite"),
               **{f"SIDECAR_{k.upper()}": v for k, v in settings.items()}}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.pop("GUNICORN_LOGLEVEL", None)
        if loglevel:
            env["GUNICORN_LOGLEVEL"] = loglevel
        if config is None:
            args = [sys.executable, "-m", "sidecar.cli", "-q", "serve", "--port", str(port),
                    "--workers", str(workers), *(["--threads", str(threads)] if threads else [])]
        else:
            args = [sys.executable, "-m", "gunicorn", "--config", config, "--bind", f"127.0.0.1:{port}",
                    "--workers", str(workers), "sidecar.api.wsgi:app"]
        log = tmp_path / f"gunicorn-{port}.log"
        with log.open("w") as out:
            process = subprocess.Popen(args, env=env, start_new_session=True, preexec_fn=ends_with_the_test_run,
                                       stdout=subprocess.DEVNULL, stderr=out)
        started.append(process)
        server = Server(f"http://127.0.0.1:{port}", process, log)
        wait_for_workers(server, workers)
        return server

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):  # a test may have stopped it already
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def wait_for_workers(server: Server, workers: int, *, other_than: set[int] = frozenset()) -> set[int]:
    """Poll /readyz on fresh connections until `workers` distinct ready workers (not in `other_than`)
    have answered."""
    deadline = time.monotonic() + 180
    seen: set[int] = set()
    while len(seen) < workers:
        assert server.process.poll() is None, server.log.read_text()
        assert time.monotonic() < deadline, f"only workers {seen} became ready\n{server.log.read_text()}"
        with ThreadPoolExecutor(4) as pool:
            seen |= {pid for pid in pool.map(lambda _: server.ready_pid(), range(8)) if pid} - other_than
        time.sleep(0.1)
    return seen


def test_gunicorn_batches_concurrent_callers_together_and_hands_each_its_own_vectors(start_gunicorn, encoder):
    # The queue bound is not under test here (test_overload_...): leave it room.
    server = start_gunicorn(threads=16, queue_items="4096")
    run = uuid.uuid4().hex[:8]  # texts no cache has seen
    requests_sent = 96

    def call(i: int) -> tuple[list[str], list]:
        batch = [f"red circle {run} {i} a", f"blue square {run} {i} b"]
        response = requests.post(f"{server.url}/v1/embeddings", json={"input": batch}, timeout=60)
        assert response.status_code == 200, response.text
        return batch, [d["embedding"] for d in response.json()["data"]]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(requests_sent)))
    texts = [text for batch, _ in results for text in batch]
    expected = dict(zip(texts, encoder.encode_texts(texts)))
    for batch, vectors in results:
        for text, vector in zip(batch, vectors):
            np.testing.assert_allclose(vector, expected[text], atol=1e-4)
    assert server.metric("sidecar_requests_total", endpoint="/v1/embeddings", status="200") == requests_sent
    # Every text was a miss (unique), and each request brought 2: a forward pass of more than
    # 2 texts served several requests at once.
    assert server.metric("sidecar_text_cache_lookups_total", result="miss") == 2 * requests_sent
    passes = server.metric("sidecar_batch_size_count", modality="text")
    alone = server.metric("sidecar_batch_size_bucket", modality="text", le="2.0")
    assert passes - alone > 0, f"all {passes:.0f} forward passes held one request's 2 texts: nothing was batched"
    hits = requests.post(f"{server.url}/v1/search", json={"text": "red circle", "k": 3}, timeout=30).json()
    assert hits["hits"][0]["metadata"]["color"] == "red"


def test_a_workers_own_log_lines_reach_gunicorns_log_and_it_opens_no_control_socket(start_gunicorn):
    server = start_gunicorn()
    log = server.log.read_text()
    assert re.search(r"\] \[INFO\] loading tiny-clip \(pretrained=\S+\) on cpu, fp32$", log, re.MULTILINE), log
    assert re.search(r"\] \[INFO\] text forward (on cpu: |cost unclear)", log), log
    assert "Control socket" not in log  # gunicorn's per-user default is shared by every server of the user


def test_a_workers_process_and_its_own_threads_carry_names_the_operating_system_shows(start_gunicorn):
    server = start_gunicorn()
    (pid,) = wait_for_workers(server, 1)
    threads = Path(f"/proc/{pid}/task")
    names = {(task / "comm").read_text().strip() for task in threads.iterdir()}
    # the kernel keeps 15 bytes of a name: "text-cache-writer" shows as "text-cache-writ"
    assert {"batcher-text", "batcher-image", "text-cache-writ"} <= names, names
    assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"gunicorn: worker [clip-sidecar]"), "no process title"


def test_a_quiet_serve_keeps_the_workers_info_lines_out_of_its_log(start_gunicorn):
    server = start_gunicorn(loglevel=None)  # `clip-sidecar -q serve`, GUNICORN_LOGLEVEL unset
    assert requests.post(f"{server.url}/v1/embeddings", json={"input": ["red circle"]}, timeout=30).ok
    log = server.log.read_text()
    assert "[INFO]" not in log and "loading tiny-clip" not in log, log


def test_metrics_count_every_worker_of_a_two_worker_gunicorn(start_gunicorn):
    server = start_gunicorn(workers=2)
    before = server.metric("sidecar_requests_total", endpoint="/readyz", status="200")  # start-up polls
    pids: list[int] = []
    with ThreadPoolExecutor(8) as pool:
        while len(set(pids)) < 2 and len(pids) < 4000:  # until both workers have answered
            pids += [pid for pid in pool.map(lambda _: server.ready_pid(), range(64))]
    assert None not in pids and len(set(pids)) == 2, f"one worker answered all {len(pids)} requests"
    run = uuid.uuid4().hex[:8]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: requests.post(f"{server.url}/v1/embeddings",
                                                         json={"input": f"green star {run} {i}"},
                                                         timeout=60).status_code, range(40)))
    assert statuses == [200] * 40
    # One scrape, answered by one worker, counts both workers' requests.
    assert server.metric("sidecar_requests_total", endpoint="/readyz", status="200") - before == len(pids)
    assert server.metric("sidecar_requests_total", endpoint="/v1/embeddings", status="200") == 40


def test_sigterm_to_gunicorn_commits_the_text_vectors_its_last_request_computed_to_the_cache_file(start_gunicorn,
                                                                                                  tmp_path):
    # What `docker stop` and a rolling restart do: SIGTERM to the master right after an answer. The cache
    # writer commits in batches a moment later; the worker must commit them before it exits, or the next
    # worker encodes these texts again.
    cache_file = tmp_path / "text-vectors.sqlite"
    server = start_gunicorn(text_cache_path=str(cache_file))
    texts = [f"orange triangle {uuid.uuid4().hex} {i}" for i in range(20)]
    assert requests.post(f"{server.url}/v1/embeddings", json={"input": texts}, timeout=60).status_code == 200
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, server.log.read_text()
    with contextlib.closing(sqlite3.connect(cache_file)) as db:
        assert db.execute("SELECT count(*) FROM text_vectors").fetchone()[0] == len(texts)


def test_a_usr2_upgrade_of_serve_boots_new_workers_that_count_on_from_the_old_workers_metrics(start_gunicorn):
    server = start_gunicorn(workers=1)
    old_worker = server.ready_pid()
    run = uuid.uuid4().hex[:8]
    for i in range(5):
        assert requests.post(f"{server.url}/v1/embeddings", json={"input": f"red ring {run} {i}"},
                             timeout=60).status_code == 200
    os.kill(server.process.pid, signal.SIGUSR2)  # the master: `serve` execs gunicorn in its own process
    wait_for_workers(server, 1, other_than={old_worker})
    server.process.send_signal(signal.SIGTERM)  # the old master and its worker go; the new master serves on
    server.process.wait(timeout=60)
    deadline = time.monotonic() + 60
    while server.ready_pid() in (old_worker, None):
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.1)
    assert server.metric("sidecar_requests_total", endpoint="/v1/embeddings", status="200") == 5


def test_pinned_workers_each_run_on_their_own_cpu_and_a_replacement_takes_the_freed_one(start_gunicorn):
    cpus = sorted(os.sched_getaffinity(0))
    server = start_gunicorn(workers=2, pin_workers="true")
    pids = wait_for_workers(server, 2)
    pinned = {pid: os.sched_getaffinity(pid) for pid in pids}
    # Spread evenly: two CPUs for two workers wherever the server may use two.
    assert sorted(cpu for cpu_set in pinned.values() for cpu in cpu_set) == sorted(cpus[i % len(cpus)]
                                                                                   for i in range(2)), pinned
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    (replacement,) = wait_for_workers(server, 1, other_than=pids)
    assert os.sched_getaffinity(replacement) == pinned[victim]
    run = uuid.uuid4().hex[:8]
    response = requests.post(f"{server.url}/v1/embeddings", json={"input": f"pinned {run}"}, timeout=60)
    assert response.status_code == 200, response.text



def test_a_two_worker_random_weights_server_says_so_once_and_its_master_never_loads_torch(start_gunicorn,
                                                                                         tmp_path):
    config = tmp_path / "tiny-random.json"
    shutil.copy(Path(sidecar.__file__).parent / "model" / "model_configs" / "tiny-clip.json", config)
    server = start_gunicorn(workers=2, model="tiny-random", model_config=str(config), pretrained="",
                            store_path=str(tmp_path / "store"))  # an architecture with no weights given
    log = server.log.read_text()  # both workers have loaded the model: both have answered /readyz
    assert log.count("tiny-random runs with random weights") == 1, log
    assert "libtorch" not in Path(f"/proc/{server.process.pid}/maps").read_text()  # `serve` execs the master


def test_overload_answers_503_with_retry_after_from_gunicorn(start_gunicorn):
    # 4 request threads: by default at most 2 items (half the threads) wait for the model. 32
    # clients each send 4 texts, so whenever two requests meet in the queue the later one is refused.
    server = start_gunicorn(threads=4)
    run = uuid.uuid4().hex[:8]

    def call(i: int) -> requests.Response:
        texts = [f"purple cross {run} {i} {j}" for j in range(4)]
        return requests.post(f"{server.url}/v1/embeddings", json={"input": texts}, timeout=60)

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(call, range(320)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert 200 in statuses and 503 in statuses, f"{statuses.count(200)} answered 200, {statuses.count(503)} 503"
    for refused in (r for r in responses if r.status_code == 503):
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        assert "limit of 2 (queue_items)" in refused.json()["error"]["message"]


# Gunicorn's own config and hooks, then what the collector tracks once they ran.
GC_PROBE_CONFIG = """
import gc
import json
from pathlib import Path

from sidecar.api import gunicorn_config as _real
from sidecar.api.gunicorn_config import *  # noqa: F403 - the real settings and hooks


def post_worker_init(worker):
    _real.post_worker_init(worker)
    Path({out!r}).write_text(json.dumps({{"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}}))
"""


def test_a_gunicorn_worker_freezes_its_start_up_objects_out_of_garbage_collection(start_gunicorn, tmp_path):
    probe = tmp_path / "gc.json"
    config = tmp_path / "gc_probe_config.py"
    config.write_text(GC_PROBE_CONFIG.format(out=str(probe)))
    server = start_gunicorn(config=f"file:{config}")
    counts = json.loads(probe.read_text())
    # torch, open_clip and the model: hundreds of thousands of objects a full collection no longer walks.
    assert counts["frozen"] > 100_000 and counts["tracked"] < counts["frozen"] / 10, counts
    response = requests.post(f"{server.url}/v1/embeddings", json={"input": f"frozen {uuid.uuid4().hex}"}, timeout=60)
    assert response.status_code == 200, response.text


# Gunicorn's own config and hooks, plus a fault: while TRIGGER exists, the next text forward
# raises a BaseException the batcher's per-request isolation does not catch, which ends the
# encode thread for real (as tests.support.ThreadKiller does in-process).
FAULT_CONFIG = """
from pathlib import Path

from sidecar.api import gunicorn_config as _real
from sidecar.api.gunicorn_config import *  # noqa: F403 - the real settings and hooks

TRIGGER = Path({trigger!r})


class ThreadKiller(BaseException):
    pass


def post_worker_init(worker):
    _real.post_worker_init(worker)
    from sidecar.api.state import state_of

    encoder = state_of(worker.wsgi).encoding.encoder
    forward = encoder.forward_texts

    def faulty_forward(tokens):
        if TRIGGER.exists():
            TRIGGER.unlink()
            raise ThreadKiller("injected fault")
        return forward(tokens)

    encoder.forward_texts = faulty_forward
"""


def test_a_dead_encode_thread_answers_503_and_gunicorn_replaces_the_worker(start_gunicorn, tmp_path):
    trigger = tmp_path / "kill-the-encode-thread"
    config = tmp_path / "fault_config.py"
    config.write_text(textwrap.dedent(FAULT_CONFIG.format(trigger=str(trigger))))
    server = start_gunicorn(config=f"file:{config}")
    (first,) = wait_for_workers(server, 1)
    run = uuid.uuid4().hex[:8]

    trigger.touch()
    response = requests.post(f"{server.url}/v1/embeddings", json={"input": f"dead {run}"}, timeout=60)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "not_ready"
    assert "ThreadKiller: injected fault" in response.json()["error"]["message"]

    (second,) = wait_for_workers(server, 1, other_than={first})  # the worker retired, a fresh one serves
    response = requests.post(f"{server.url}/v1/embeddings", json={"input": f"alive {run}"}, timeout=60)
    assert response.status_code == 200, response.text
    assert server.metric("sidecar_batcher_stops_total", modality="text") == 1
    assert f"worker {first} retires" in server.log.read_text()


@pytest.fixture
def build_app(tmp_path, store_path, encoder):
    built = []

    def build(**settings):
        settings = Settings(cache_dir=tmp_path / "cache", store_path=store_path, **settings)
        built.append(create_app(settings, encoder=encoder, store=EmbeddedStore(store_path)))
        return built[-1]

    yield build
    for app in built:  # join the batcher threads: one may still be inside a slow forward
        state = state_of(app)
        state.encoding.close()
        state.store.close()


@pytest.fixture
def slow_forward(encoder, monkeypatch):
    """The shared encoder's text forward takes 200 ms: deadlines pass."""
    real_forward = encoder.forward_texts

    def slow(tokens):
        time.sleep(0.2)
        return real_forward(tokens)

    monkeypatch.setattr(encoder, "forward_texts", slow)


def test_an_encode_past_the_deadline_answers_504(build_app, slow_forward):
    client = build_app(request_timeout_s=0.05).test_client()
    response = client.post("/v1/embeddings", json={"input": ["red circle"]})
    assert response.status_code == 504
    assert "request_timeout_s=0.05" in response.json["error"]["message"]


def test_a_dead_encode_thread_takes_the_app_out_of_readyz_and_fails_requests_at_once(build_app, encoder,
                                                                                     monkeypatch):
    def dies(tokens):
        raise ThreadKiller("injected fault")

    monkeypatch.setattr(encoder, "forward_texts", dies)
    client = build_app(request_timeout_s=20).test_client()
    assert client.get("/readyz").status_code == 200
    for text in ("first", "second"):  # the one in the dying forward, then one after
        response = client.post("/v1/embeddings", json={"input": [text]})  # 503 at once, not 504 after 20 s
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "text encode thread stopped (ThreadKiller: injected fault)" in response.json["error"]["message"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json["status"] == "not_ready"
    assert "ThreadKiller" in ready.json["reason"]


def test_a_dead_fine_model_encode_thread_takes_the_worker_out_of_readyz_naming_it(app_settings, encoder,
                                                                                  fine_encoder, monkeypatch):
    def dies(tokens):
        raise ThreadKiller("injected fault")

    monkeypatch.setattr(fine_encoder, "forward_texts", dies)
    store = EmbeddedStore(app_settings.store_path)
    app = create_app(dataclasses.replace(app_settings, request_timeout_s=20), encoder=encoder, store=store,
                     fine_encoder=fine_encoder)
    state = state_of(app)
    try:
        client = app.test_client()
        assert client.get("/readyz").status_code == 200
        # A search reranks through the fine model by default: every one would fail on this worker.
        response = client.post("/v1/search", json={"text": "red circle"})
        assert response.status_code == 503
        assert "text encode thread of the fine model stopped (ThreadKiller" in response.json["error"]["message"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "of the fine model stopped" in ready.json["reason"]
        # One decode_memory_bytes budget for the worker's decodes, whichever model they are for.
        assert state.fine_encoding.decode_memory is state.encoding.decode_memory
    finally:
        state.quality.close()
        state.encoding.close()
        state.fine_encoding.close()
        store.close()


def test_gunicorn_started_directly_stops_in_one_line_against_a_store_whose_sqlite_file_is_unreadable(
        store_path, tmp_path):
    # The Docker image's way: no `serve` (which refuses it as every command does) before the workers' app factory.
    copy = tmp_path / "store"
    shutil.copytree(store_path, copy)
    damage_sqlite_file(copy / "store.sqlite")
    result = gunicorn_boot({**os.environ, "SIDECAR_STORE_PATH": str(copy), "GUNICORN_LOGLEVEL": "warning"})
    assert result.returncode != 0
    assert f"{copy / 'store.sqlite'} is not a readable SQLite database (file is not a database)" in result.stderr
    assert "Traceback" not in result.stderr and "App failed to load" in result.stderr  # was a worker's traceback


def test_gunicorn_started_directly_stops_in_one_line_for_an_opensearch_ca_file_that_does_not_exist(tmp_path):
    # The store is built as each worker builds the app: its StoreError was a traceback from every worker.
    missing = tmp_path / "ca.pem"
    result = gunicorn_boot({**os.environ, "SIDECAR_STORE": "opensearch", "SIDECAR_OPENSEARCH_URL": "https://127.0.0.1:9",
                            "SIDECAR_OPENSEARCH_CA_CERTS": str(missing), "GUNICORN_LOGLEVEL": "warning"})
    assert result.returncode != 0
    assert f"SIDECAR_OPENSEARCH_CA_CERTS={str(missing)!r} is no file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "App failed to load" in result.stderr


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("SIDECAR_DEVICE", "gpu", "setting device='gpu': choose auto, cpu, cuda or cuda:N (N counts from 0)"),
    ("SIDECAR_MAX_BATCH", "0", "setting max_batch must be >= 1, got 0"),
    ("SIDECAR_API_KEYS", "web:search:abc", "SIDECAR_API_KEYS entry 1 (web): the hash must be 64 lowercase hex digits"),
])
def test_gunicorn_started_without_its_config_stops_in_one_line_naming_a_malformed_setting(
        store_path, variable, value, message):
    # The app module alone (`gunicorn sidecar.api.wsgi:app`): each worker's app factory reads the settings, and
    # stopped in a traceback, as gunicorn shows any error but an AppImportError.
    result = gunicorn_boot({**os.environ, "SIDECAR_STORE_PATH": str(store_path), variable: value}, config=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "App failed to load" in result.stderr


@pytest.mark.parametrize(("variable", "name", "failed"), [
    ("SIDECAR_STORE_PATH", "store", "file/store: Not a directory"),
    ("SIDECAR_TEXT_CACHE_PATH", "vectors.sqlite", "file: File exists"),  # its folder, the file, cannot be made
    ("SIDECAR_QUALITY_LOG_DIR", "quality", "file/quality: Not a directory"),
])
def test_gunicorn_started_directly_stops_in_one_line_naming_a_path_setting_it_cannot_write(
        store_path, tmp_path, variable, name, failed):
    # Each worker's app factory stopped in a traceback (`serve` names the first two itself, not the log folder).
    (tmp_path / "file").write_text("a regular file, not a folder")
    blocked = tmp_path / "file" / name
    result = gunicorn_boot({**os.environ, "SIDECAR_STORE_PATH": str(store_path), variable: str(blocked),
                            "GUNICORN_LOGLEVEL": "warning"})
    assert result.returncode != 0
    assert f"cannot write {tmp_path}/{failed} ({variable} is {blocked})" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "App failed to load" in result.stderr


def test_text_cache_persistence_follows_its_settings(build_app, tmp_path):
    own_path = tmp_path / "elsewhere" / "vectors.sqlite"
    client = build_app(text_cache_path=str(own_path)).test_client()
    assert client.post("/v1/embeddings", json={"input": ["red circle"]}).status_code == 200
    assert own_path.is_file() and not (tmp_path / "cache" / "text-vectors.sqlite").exists()

    client = build_app(text_cache_persist=False).test_client()
    assert client.post("/v1/embeddings", json={"input": ["red circle"]}).status_code == 200
    assert not (tmp_path / "cache" / "text-vectors.sqlite").exists()
    assert state_of(client.application).encoding.cache.persisted_count() == 0


def test_a_text_cache_file_damaged_under_the_server_costs_encodes_not_errors_and_is_replaced_at_once(
        build_app, tmp_path, caplog):
    # It was a 500; then its reads missed and its writes failed until the server restarted.
    path = tmp_path / "vectors.sqlite"
    client = build_app(text_cache_path=str(path)).test_client()
    assert client.post("/v1/embeddings", json={"input": ["red circle"]}).status_code == 200
    cache = state_of(client.application).encoding.cache
    cache.flush()
    damage_sqlite_file(path)
    caplog.set_level(logging.WARNING, logger="sidecar.serving.cache")
    assert client.post("/v1/embeddings", json={"input": ["blue square", "green"]}).status_code == 200
    assert client.post("/v1/embeddings", json={"input": ["yellow"]}).status_code == 200
    assert cache.persisted_count() == 3  # a new file, holding what was encoded since
    assert path.with_name("vectors.sqlite.unreadable").read_bytes().startswith(b"not a database")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"text-vector cache: {path} cannot be read (file is not a database); moved to vectors.sqlite.unreadable and "
        "began a new one (texts are encoded again as they come)"]
