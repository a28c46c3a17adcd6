"""Gunicorn settings for the sidecar: threaded workers, the model loaded once per worker after fork
(then frozen out of garbage collection), metrics summed over workers, a worker whose encode thread
died replaced, workers optionally pinned to CPUs."""

import gc
import json
import logging
import math
import os
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path

from gunicorn import glogging, util

from sidecar.api.auth import parse_key_entries, refusal_to_serve
from sidecar.api.healthcheck import config_bind
from sidecar.config import Settings, SettingsError, parse_variable
from sidecar.logs import OneLineFormatter, route_logs
from sidecar.model.weights import configured_models, random_weights_said_elsewhere

# Read once in the arbiter; each worker reads its own Settings again when it builds the app. A setting gunicorn
# cannot serve with stops it here, as it loads this file, in one line ("Error: <message>") before any worker;
# SIDECAR_API_KEYS too, which Settings keeps as text (sidecar.api.auth parses it).
_settings = Settings.from_env()
parse_key_entries(_settings.api_keys)


def _whole_number(variable: str, default: int, *, minimum: int = 0) -> int:
    """A GUNICORN_* variable's number (empty: the default), refused in one line naming the variable and what it
    takes: gunicorn's own refusals name neither ("invalid literal for int()", "Value must be positive: -1")."""
    value = parse_variable(variable, os.environ.get(variable) or str(default), "int")
    if value < minimum:
        raise SettingsError(f"{variable}={value}: expected a whole number >= {minimum}")
    return value


# gthread: request threads in one process share its model and micro-batcher, which is what
# lets concurrent requests batch together. The thread count also sizes the encode queue
# (Settings.encode_queue_items), so it comes from the same setting: SIDECAR_REQUEST_THREADS.
worker_class = "gthread"
threads = _settings.request_threads
# At least one: gunicorn takes 0, and then listens with no worker to answer (connections wait for ever).
workers = _whole_number("GUNICORN_WORKERS", 1, minimum=1)
bind = config_bind(os.environ)
# Never preload: CUDA does not survive fork, so each worker imports the app (and loads the
# model) after it is forked. Loading reads a cached model only (`clip-sidecar models fetch`
# puts it there); it never downloads or trains, so it fits inside the boot timeout below.
preload_app = False
# gthread's main loop tells the arbiter it lives while its threads serve, however long a request runs: this
# bounds a worker's boot (the model load) and a hung worker, not requests.
timeout = _whole_number("GUNICORN_TIMEOUT", 120)
# A stopping worker (SIGTERM, `docker stop`, HUP, a retired one) answers the requests it holds for this long,
# then is killed: a request's encode deadline (request_timeout_s) and 30 s more, the grace gunicorn gives by
# default, for the rest of it (decoding, the store's search, the answer) and worker_exit's cache commit.
graceful_timeout = _whole_number("GUNICORN_GRACEFUL_TIMEOUT", math.ceil(_settings.request_timeout_s) + 30)
keepalive = 5
# Connections the kernel queues before gunicorn accepts them. OpenSearch's ml-commons opens up to its
# connector's max_connection (30 by default) at once for a _bulk of image documents; a short queue
# drops their SYNs (1 s stalls) or resets them (bulk items failed, never retried). 2048 is gunicorn's
# default, named here because the sidecar depends on it.
backlog = _whole_number("GUNICORN_BACKLOG", 2048)
# Process titles (gunicorn sets them through setproctitle): "gunicorn: worker [clip-sidecar]" in ps and
# top, whatever app module or launcher started it.
proc_name = "clip-sidecar"
# One line per request on stdout; GUNICORN_ACCESSLOG="" turns it off (a path writes there instead).
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-") or None


class KeylessLogger(glogging.Logger):
    """gunicorn's logger, whose access lines never carry an API key. gunicorn's default line names the
    user of an `Authorization: Basic` header, which is the key itself when a client sends it that way
    (`curl -u KEY:`): the API answers 401, and the key was in the log. The header (atom `{authorization}i`,
    environ `{http_authorization}e`) is left out too, whatever access_log_format names. Its error log
    (gunicorn's lines and, from post_fork, the app's) writes every record on one line, tracebacks too."""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.error_log.handlers:
            if getattr(handler, "_gunicorn", False):  # gunicorn's own, not those of an operator's --log-config
                handler.setFormatter(OneLineFormatter(handler.formatter))

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["u"] = "-"
        for secret in ("{authorization}i", "{http_authorization}e"):
            atoms.pop(secret, None)  # a missing atom is written "-"
        return atoms


logger_class = KeylessLogger
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL") or "info"
# gunicorn reads a level it does not know ("warn", "verbose") as info without a word.
if loglevel.lower() not in KeylessLogger.LOG_LEVELS:
    raise SettingsError(f"GUNICORN_LOGLEVEL={loglevel!r}: choose one of {', '.join(KeylessLogger.LOG_LEVELS)}")
# gunicorn's control socket (for `gunicornc`) lives by default at one path per user ($XDG_RUNTIME_DIR
# or ~/.gunicorn/gunicorn.ctl), so a second server of that user takes it over. Off unless the operator
# names a socket of this server's own in GUNICORN_CONTROL_SOCKET.
control_socket = os.environ.get("GUNICORN_CONTROL_SOCKET", "")
control_socket_disable = not control_socket

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when a worker imports it
# Set only in the environment a USR2 upgrade execs the new master with: the folder is one this server made.
_OWNED_ENV = "CLIP_SIDECAR_OWNED_METRICS_DIR"
_owned_metrics_dir: str | None = None


def _unservable(cfg) -> str | None:
    """Why gunicorn cannot serve with its effective settings (this file's, GUNICORN_CMD_ARGS' flags and the command
    line's, which override it), checked on them where this file's own checks see only the GUNICORN_* variables."""
    if cfg.workers < 1:  # gunicorn takes 0, and listens with no worker to answer: connections wait for ever
        return f"workers={cfg.workers} (GUNICORN_WORKERS, or --workers in GUNICORN_CMD_ARGS): at least 1 is needed"
    for host, port in (address for address in cfg.address if isinstance(address, tuple)):
        if not 0 <= port <= 65535:  # gunicorn finds out only as it binds: a traceback
            return f"bind {host}:{port} (GUNICORN_BIND, or --bind in GUNICORN_CMD_ARGS): the port must be 0-65535"
    return None


def on_starting(server):
    """Before any socket is bound: the effective settings (`_unservable`) and the exposure rule, then Prometheus
    multiprocess mode: every worker writes its series to files in one folder and a scrape sums them
    (sidecar.serving.metrics). Set before any worker imports prometheus_client;
    a folder the operator names is emptied first, since files of a previous run would add to
    this run's counts. The new master of a USR2 upgrade (master_pid set) empties nothing: the files
    are the old master's workers', which still serve and count (pre_exec hands it the folder)."""
    global _owned_metrics_dir
    # The rule `clip-sidecar serve` applies, for gunicorn started directly (the Docker image): no
    # listening beyond loopback without API keys unless SIDECAR_INSECURE.
    refusal = (_unservable(server.cfg)
               or refusal_to_serve(_settings, [address[0] for address in server.cfg.address
                                               if isinstance(address, tuple)]))
    if refusal:
        raise RuntimeError(refusal)  # gunicorn prints "Error: <message>" and exits 1
    configured = os.environ.get(_MULTIPROC_ENV)
    if configured and server.master_pid:
        if os.environ.get(_OWNED_ENV) == configured:
            _owned_metrics_dir = configured  # the old master's own folder: whichever master exits last removes it
    elif configured:
        Path(configured).mkdir(parents=True, exist_ok=True)
        for stale in Path(configured).glob("*.db"):
            stale.unlink()
    else:
        _owned_metrics_dir = tempfile.mkdtemp(prefix="clip-sidecar-metrics-")
        os.environ[_MULTIPROC_ENV] = _owned_metrics_dir
    server.log.info("Prometheus multiprocess metrics in %s", os.environ[_MULTIPROC_ENV])
    # Workers load cached weights only: open_clip's hub lookups must not wait on the network
    # (huggingface_hub reads this when a worker imports it).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pre_exec(server):
    """USR2, in the forked child about to exec the new master: gunicorn execs it with the environment
    from before on_starting, so name the metrics folder there: old and new workers then count into
    one folder and a scrape of either sums both, as it does for workers of one master."""
    server.cfg.env_orig[_MULTIPROC_ENV] = os.environ[_MULTIPROC_ENV]
    if _owned_metrics_dir:
        server.cfg.env_orig[_OWNED_ENV] = _owned_metrics_dir


def on_exit(server):
    # A folder this server made outlives a master while the other master of a USR2 upgrade runs
    # (gunicorn's own test before it unlinks a shared unix socket).
    if _owned_metrics_dir and server.reexec_pid == server.master_pid == 0:
        shutil.rmtree(_owned_metrics_dir, ignore_errors=True)


def worker_exit(server, worker):
    """A worker that stops (SIGTERM, HUP, a USR2 upgrade's old one, a retired one) once its requests are done:
    its app commits what its background threads still hold, the text-vector cache's queued writes above all,
    which the exit would otherwise drop (the writer waits a moment to batch them). gunicorn calls this in
    the arbiter too, for a worker that was already gone: no app there."""
    from flask import Flask

    from sidecar.api.state import state_of

    app = getattr(worker, "wsgi", None)  # gunicorn's error app where the app failed to load: nothing to close
    if isinstance(app, Flask):
        state_of(app).close()


def child_exit(server, worker):
    """A dead worker's live gauges (queue depth) stop counting; its counters stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def pre_fork(server, worker):
    """With pin_workers, the CPU this worker will run on: the one the fewest live workers have
    (chosen here, in the arbiter, which knows them all; a replacement takes its predecessor's)."""
    if _settings.pin_workers:
        taken = Counter(getattr(w, "sidecar_cpu", None) for w in server.WORKERS.values())
        worker.sidecar_cpu = min(sorted(os.sched_getaffinity(0)), key=lambda cpu: taken[cpu])


def post_fork(server, worker):
    """The app's log lines into gunicorn's log. The random-weights notice from the first worker alone. Pin the
    worker to its CPU (pin_workers). Split the GPU between workers: gpu_memory_fraction (e.g. 0.45 with two
    workers)."""
    # A worker's own account of itself (the model it loaded, the text tower's measured cost, the CUDA
    # graphs, API keys, store maintenance) in gunicorn's format and at its level (GUNICORN_LOGLEVEL), and
    # third parties' warnings as the CLI lets them through: without this the app's warnings reached stderr
    # bare (Python's last-resort handler), and opensearch-py's per-request ones in basicConfig's
    # `WARNING:opensearch:…` format (open_clip's `logging.info` calls it), on every /readyz probe.
    level = worker.log.error_log.level
    route_logs(worker.log.error_log.handlers, app_level=level, verbose=level <= logging.DEBUG)
    # A model run with random weights is said once per server: by the first worker this arbiter forks (age 1),
    # as it loads the model (load_encoder), in the log routed above. Not by the arbiter, which loads no model:
    # the notice's wording (the model's pretrained tags) would import open_clip and torch there, seconds of
    # start-up and ~900 MB of memory before any worker boots.
    if worker.age > 1:
        for model_settings, fine in configured_models(_settings):
            random_weights_said_elsewhere(model_settings, fine=fine)
    cpu = getattr(worker, "sidecar_cpu", None)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
        server.log.info("worker %s: pinned to CPU %d (pin_workers)", worker.pid, cpu)
    fraction = _settings.gpu_memory_fraction
    if fraction:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(fraction)
            server.log.info("worker %s: GPU memory budget %.0f%% (gpu_memory_fraction)", worker.pid, 100 * fraction)



def write_json_error(sock, status_int, reason, mesg):
    """gunicorn.util.write_error's signature and framing, the API's {"error": {"code", "message"}} body."""
    code = reason.lower().replace(" ", "_")  # "URI Too Long" -> uri_too_long, as the app names HTTP errors
    body = json.dumps({"error": {"code": code, "message": mesg or reason}}).encode("utf-8")
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


# Gunicorn answers a request it cannot parse (400; 414 for a request line over 4094 bytes; 431 for a
# header over 8190 bytes; 417) itself, before the app sees it, with an HTML page. It has no hook for
# that page; its workers write it through `gunicorn.util.write_error`, replaced here, in the arbiter
# that reads this file, before any worker is forked.
util.write_error = write_json_error


def post_worker_init(worker):
    """The app is loaded: its objects leave the cyclic garbage collector's view. A worker whose encode
    thread died answers 503 and leaves /readyz; it then stops gracefully (SIGTERM to itself: requests in
    flight finish) and gunicorn starts a fresh one in its place."""
    from sidecar.api.state import state_of

    # torch, open_clip, the model and the tokeniser leave ~435k objects the collector tracks, all
    # living as long as the worker. Every full collection walked them: a ~210 ms stop of the whole
    # worker, which 1-2 % of requests waited out at concurrency 16 (bench/RESULTS.md). Collect the
    # start-up garbage once, then freeze the rest: later collections see only what requests made.
    gc.collect()
    gc.freeze()
    worker.log.info("worker %s: %d start-up objects frozen out of garbage collection", os.getpid(),
                    gc.get_freeze_count())

    if worker.cfg.threads != threads:
        worker.log.warning("gunicorn runs %d threads per worker but SIDECAR_REQUEST_THREADS is %d: the encode "
                           "queue is sized from the latter; set the variable instead of --threads",
                           worker.cfg.threads, threads)

    def retire(reason: str) -> None:
        worker.log.error("worker %s retires: %s", os.getpid(), reason)
        os.kill(os.getpid(), signal.SIGTERM)

    for service in state_of(worker.wsgi).encodings():
        service.on_stop(retire)
