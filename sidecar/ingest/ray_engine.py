"""The embed job on a Ray cluster: the local job's plan, decode, forward and shard files, scheduled by Ray Data.

One implementation, two schedulers: what to embed (`embed.plan_embed`: scan, identity, skips,
deletions), how an image is read and decoded and its thumbnail made (`decode_pool.read_file`,
`decode_data`), the forward (`embed.forward_batch`, `embed.fine_vectors`), the tags (`tagging.Tagger`) and a
shard's files (`shards.write_shard_files`) are the local job's own functions. Ray Data runs them: files are
hashed and decoded by CPU tasks, the model runs in actors (one per GPU, or CPU actors where the
cluster has no GPU; the pool grows from one actor as work waits and shrinks again when a node is
lost), and tasks write each shard under a name no other writer can take:
`shard-<shards before this run>-<run id>-<digest of its ids>`, the same name if Ray retries the
task, so a retry replaces the shard instead of duplicating its rows. The driver writes errors.jsonl
and the manifest, once, at the end; a killed run leaves complete shards, which the next run (of
either engine) skips, and files of shards its writers did not complete, which that run removes
(`ShardSet.start`). The driver's bar follows a counter actor that the encoder actors tell of each batch.

Every node must see the corpus and the output folder at the same paths (a shared filesystem) and
the model's weights (a pretrained tag is downloaded into each node's cache; a checkpoint path must
exist everywhere). Workers import the driver's own `sidecar` package: Ray ships it to the cluster
(`runtime_env` `py_modules`), so they run the same code as the driver.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import uuid
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn

import numpy as np
from tqdm import tqdm

from sidecar.config import Settings
from sidecar.ingest.decode_pool import READ_FAILED, decode_data, read_file
from sidecar.ingest.embed import (
    EmbedSummary,
    document_row,
    error_line,
    errors_file,
    fine_vectors,
    finish_embed,
    forward_batch,
    hash_file,
    plan_embed,
)
from sidecar.ingest.shards import ShardRow, exclusive_writer, write_shard_files
from sidecar.ingest.tagging import Tagger
from sidecar.logs import LinesToLog, adopt_library_loggers
from sidecar.model.encoder import Encoder, load_encoder, load_fine_encoder
from sidecar.model.images import ImagePreprocess

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # this `sidecar` package, shipped to the workers
LOCAL = "local"  # --address local: a Ray instance of this process's own, on this machine
HASH_CHUNK = 512  # files hashed per scan task
# How long the driver waits for the head's port to accept a connection. Ray itself retries an address
# nobody answers at for minutes (20 attempts of ~40 s each in ray 2.60's driver: GCS connect, then its
# cluster id); a plain TCP connect first answers in this long at most.
CONNECT_TIMEOUT_S = 5.0
# A port that accepts connections but holds no Ray head (another server, the dashboard's or the Ray
# Client's port) passes that check, and Ray's retries run for minutes again. Ray 2.60's driver
# (`ray._private.node.Node._init_gcs_client`) makes RAY_gcs_server_port_wait_time_s attempts (else
# NUM_REDIS_GET_RETRIES = 20), each a channel connect and a pubsub connect of up to
# gcs_rpc_server_connect_timeout_s (5 s; past it Ray only warns and goes on) and a wait of up to
# py_gcs_connect_timeout_s (30 s) for the GCS to send its cluster id, then 1 s of sleep: here one attempt of
# 1 + 1 + 3 + 1 s. A ray:// address goes through the Ray Client instead (`ray.util.client.worker`): 3 attempts
# of RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S (5 s), each 5 s longer up to RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S
# (30 s), to connect and ping: here 3 of 2 s. A head that runs answers in milliseconds. Values already in the
# environment win. They are in os.environ only while the driver connects (`_connect_settings`): left there, they
# went to every process the job's process started later and to its later ray.init calls. Ray reads the first one
# on each connect; the next two (its C++ RayConfig) when it is imported, so `_connect_settings` has Ray read them
# again where it was imported before (else such a port took 42 s to fail there, not 8); the Ray Client's two when
# `ray.util.client` is first imported, at a process's first ray:// connect, so a process that connected to a
# ray:// address before keeps the Client timeouts it had then (module constants of Ray's, not patched here).
RAY_CONNECT_SETTINGS = {"RAY_gcs_server_port_wait_time_s": "1", "RAY_gcs_rpc_server_connect_timeout_s": "1",
                        "RAY_py_gcs_connect_timeout_s": "3", "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "2",
                        "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "2"}
RAY_CONNECT_S = 6  # what those settings add up to, either way
# Per-row columns carrying each stage's seconds (the batch's time shared out over its rows, so
# sums stay right however Ray Data re-batches); the writer adds them up per shard.
STAGE_COLUMNS = ("decode", "forward", "fine_model")
# How often the driver asks how many images the actors have embedded, for its bar: a shard's rows reach the driver
# when its writer ends, 4,096 images by default, minutes apart on CPUs.
PROGRESS_POLL_S = 0.2


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster cannot run the job; the message says what to do."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RayResources:
    """What each part of the job reserves on the cluster. `actors` = 0: one per GPU, or as many
    CPU actors as the cluster's CPUs hold beside one decode task each."""

    actors: int = 0
    actor_cpus: float = 1.0
    task_cpus: float = 1.0  # each hash, decode or shard-writing task


def embed_corpus_on_ray(settings: Settings, source: Path, out: Path, *, address: str = LOCAL,
                        batch_size: int = 256, shard_size: int = 4096, resources: RayResources = RayResources(),
                        max_pixels: int = 40_000_000, thumbnail_side: int | None = None,
                        load_tagger: Callable[[Encoder], Tagger | None] | None = None,
                        allow_empty: bool = False, progress: bool = True, verbose: bool = False) -> EmbedSummary:
    """Embed `source` into shards under `out` on the Ray cluster at `address` ("local" starts one
    on this machine): the same shards, thumbnails, skips and summary as `embed.embed_corpus`.
    `load_tagger`: the tagger (`embed.embed_corpus`'s `tagger`) for the job's model, which the driver
    loads here. `verbose`: Ray's output that only -v shows (its workers' output; Ray Data's warnings about its own
    scheduling); the log's levels (`sidecar.logs.route_logs`) decide on Ray's records."""
    # The cluster's processes run in folders of their own: relative paths are the driver's, made absolute here.
    source, out = Path(source).absolute(), Path(out).absolute()
    settings = _model_files_absolute(settings)
    # Ray's driver prints the cluster's error reports (a node lost, with 20 lines of its raylet's log; a worker
    # killed) on stdout, whatever log_to_driver says: records of the `ray` logger at INFO instead, shown with -v,
    # they leave stdout to the job's summary. The lock is held by the driver alone: its tasks write shard files,
    # never the manifest.
    with LinesToLog(logging.getLogger("ray"), logging.INFO) as reports, contextlib.redirect_stdout(reports), \
            exclusive_writer(out):
        ray = _connect(address, verbose=verbose)
        try:
            return _run(ray, settings, source, out, batch_size=batch_size, shard_size=shard_size,
                        resources=resources, max_pixels=max_pixels, thumbnail_side=thumbnail_side,
                        load_tagger=load_tagger, allow_empty=allow_empty, progress=progress)
        except Exception as exc:
            _refuse_task_failure(exc)
            raise
        finally:
            ray.shutdown()


def _model_files_absolute(settings: Settings) -> Settings:
    """`settings` with the model's files (checkpoints, model configs, the cache of weights) named by absolute paths
    where this machine finds them: the actors load the models in folders of their own, where a relative one named
    no file. A pretrained tag stays a tag, as `load_encoder` tells them apart."""
    def checkpoint(value: str) -> str:
        return str(Path(value).absolute()) if value and Path(value).is_file() else value

    def config(value: str) -> str:
        return str(Path(value).absolute()) if value and Path(value).exists() else value

    return dataclasses.replace(settings, cache_dir=Path(settings.cache_dir).absolute(),
                               pretrained=checkpoint(settings.pretrained), model_config=config(settings.model_config),
                               fine_pretrained=checkpoint(settings.fine_pretrained),
                               fine_model_config=config(settings.fine_model_config))


def _connect(address: str, *, verbose: bool) -> Any:
    # The driver's own opt-out: `ray start --disable-usage-stats` covers only the cluster's processes.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with _connect_settings(address):
        try:
            import ray
            import ray.data  # noqa: F401 - imported here so a missing extra fails before any work
        except ImportError as exc:
            raise RayUnavailable(f"--engine ray needs Ray ({exc}): pip install 'clip-sidecar[ray]'") from exc
        # Ray's import gave `ray` and `ray.data` handlers of their own on the terminal, at INFO: the CLI's log
        # takes them (and ray.init leaves them be), so -q and the default show their warnings, -v all of it.
        adopt_library_loggers("ray", "ray.data")
        options: dict[str, Any] = {"log_to_driver": verbose, "configure_logging": False,
                                   "runtime_env": {"py_modules": [str(PACKAGE_DIR)]}}
        if address == LOCAL:
            options["include_dashboard"] = False
        else:
            _check_reachable(address)
        if not verbose:
            # Ray Data's warnings that progress bars are off (this job turns them off: it draws its own) and that an
            # operator has had no output for 60 s ("ignore this warning if your UDF is expected to be slow": a large
            # model loading on its actors), or that blocks' schemas differ (the job's are fixed); and, on every run
            # of `--address local`, that the Ray it starts takes tokens (RAY_AUTH_MODE=disabled opts out): Ray's
            # default for a Ray of the command's own, gone when it ends, nothing for the user to do.
            for name in ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor_state",
                         "ray._private.authentication.authentication_token_setup"):
                logging.getLogger(name).setLevel(logging.ERROR)
        try:
            with _native_errors_quiet(verbose), warnings.catch_warnings():
                if not verbose:  # the Ray Client's, two lines with its source's path, before the error said in one
                    warnings.filterwarnings("ignore", "Ray Client connection timed out", UserWarning)
                ray.init(address=address, **options)
        except ConnectionError as exc:
            _refuse_no_head(address, exc)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # this job draws its own bar, as the local job does
    context.execution_options.preserve_order = False  # rows carry their ids
    return ray


@contextlib.contextmanager
def _native_errors_quiet(verbose: bool) -> Iterator[None]:
    """C's `stderr` pointed at `_fatal_lines_only` while the block starts the driver's core worker (ray.init), except
    with -v. Its C++ log writes every record to the driver's log file in the session's folder
    (logs/python-core-driver-*.log), and its ERROR ones to the `FILE *stderr` it finds as it starts too, for the
    process's life: Ray's notes to itself (an actor whose constructor arguments are in the object store), which
    reached the terminal even with -q. Python's sys.stderr writes to file descriptor 2, not through that FILE *,
    and keeps the terminal. Where the C library has no `stderr` symbol (not glibc), nothing changes."""
    try:
        stream = None if verbose else ctypes.c_void_p.in_dll(ctypes.CDLL(None), "stderr")
    except (OSError, ValueError):
        stream = None
    if stream is None:
        yield
        return
    original = stream.value
    stream.value = _fatal_lines_only()
    try:
        yield
    finally:
        stream.value = original


# Passes the lines of Ray's C++ log that say it ends the process (level F) on to the terminal, drops the rest.
_FATAL_FILTER = ("import re, signal, sys\n"
                 "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"  # Ctrl-C stops the driver; this ends at its EOF
                 "for line in sys.stdin.buffer:\n"
                 "    if re.match(rb'\\[[^\\]]* F ', line):\n"
                 "        sys.stderr.buffer.write(line)\n"
                 "        sys.stderr.buffer.flush()\n")


@functools.cache
def _fatal_lines_only() -> int:
    """A C `FILE *` (line-buffered) into a process of its own that shows only the fatal lines of what is written to
    it: the driver's core worker ending this process (the head lost for a minute) says why right before it exits,
    and a reader in a process apart still reads that line once this one is gone. Open for the process's life (each
    core worker Ray starts here keeps writing to it); the filter ends when the last writer does."""
    read_end, write_end = os.pipe()
    # Spawned, not a Popen: nothing here waits for it (it outlives this process's last Python object), and a Popen
    # left running warns as it is collected.
    os.posix_spawn(sys.executable, [sys.executable, "-c", _FATAL_FILTER], os.environ,
                   file_actions=[(os.POSIX_SPAWN_DUP2, read_end, 0),
                                 (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    os.close(read_end)
    libc = ctypes.CDLL(None)
    libc.fdopen.restype = ctypes.c_void_p
    libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
    libc.setvbuf.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t]
    stream = libc.fdopen(write_end, b"w")
    libc.setvbuf(stream, None, 1, 0)  # _IOLBF: each line out as it ends, as stderr's unbuffered writes were
    return stream


@contextlib.contextmanager
def _connect_settings(address: str) -> Iterator[None]:
    """RAY_CONNECT_SETTINGS (those not set already) in os.environ while the block connects to `address`."""
    added = {} if address == LOCAL else {name: value for name, value in RAY_CONNECT_SETTINGS.items()
                                         if name not in os.environ}
    imported = "ray" in sys.modules
    os.environ.update(added)
    try:
        if added and imported and not sys.modules["ray"].is_initialized():
            # Ray's C++ settings were read from the environment of its import; RayConfig::initialize reads
            # them all again (with no driver connected nothing else has set them; ray.init's driver reads
            # them once more, with the cluster's settings).
            from ray._raylet import Config

            Config.initialize("")
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _given(address: str) -> str:
    """How the user gave `address`, for its errors: the CLI's --address falls back to RAY_ADDRESS, which a shell
    may have set long before."""
    return f"RAY_ADDRESS={address}" if os.environ.get("RAY_ADDRESS") == address else f"--address {address}"


def _refuse_no_head(address: str, exc: ConnectionError) -> NoReturn:
    if address == "auto":  # Ray's words say it: no cluster found on this machine, or the one it recorded is gone
        raise RayUnavailable(f"{_given(address)}: {exc}") from exc
    # Past _check_reachable: something accepts connections there, but it is no Ray head (GCS) or Ray Client server.
    # Ray's own words are left out: they name the address it tried, the machine's outward one for 127.0.0.1.
    if address.startswith("ray://"):
        what, port = "no Ray Client server", "ray://HOST:PORT, its Ray Client port, 10001 by default"
    else:
        what, port = "no Ray head", "its GCS port, 6379 by default; not the dashboard's or the Ray Client's port"
    raise RayUnavailable(f"no Ray cluster answers at {address}: {what} answered there within {RAY_CONNECT_S} s: "
                         f"check that {_given(address)} is the head's address as `ray start --head` printed it "
                         f"({port}) and that the head runs (`ray status` on it)") from exc


def _refuse_task_failure(exc: BaseException) -> None:
    """Raise RayUnavailable, in one line, where `exc` is the job's task or actor failing on the cluster (Ray's error:
    its traceback and the worker's, in many lines); a worker's failed import (a dependency of the job missing from
    the Python `ray start` runs on a node) says what to install. -v shows Ray's report of it, traceback included."""
    from ray.exceptions import RayError

    if not isinstance(exc, RayError):  # the driver's own: its traceback says where
        return
    cause: BaseException | None = exc
    original = None
    while cause is not None and original is None:  # RayTaskError.cause; RaySystemError.client_exc (an unpicklable argument)
        # Not a RayTaskError(ValueError): Ray's copy of the error, whose cause is the original.
        if not isinstance(cause, RayError):
            original = cause
        cause = getattr(cause, "cause", None) or getattr(cause, "client_exc", None)
    if original is not None:
        kind, reason = type(original).__name__, str(original)
    else:
        # Text only: an actor's constructor's error (ActorDiedError), a function's under Ray Data (its
        # UserCodeException keeps the original in the worker's traceback). Its last line names the original;
        # Ray's own exceptions (ray.exceptions.UserCodeException: ...) come after it.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the colours of Ray's task names
        named = [(name, reason) for name, reason in re.findall(r"^((?:\w+\.)*\w+(?:Error|Exception)): (.+)$", text, re.M)
                 if not name.startswith("ray.")]
        kind, reason = (named[-1][0].rpartition(".")[2], named[-1][1]) if named else (type(exc).__name__,
                                                                                       text.strip().splitlines()[0])
    if isinstance(original, ImportError) or kind in ("ModuleNotFoundError", "ImportError"):
        raise RayUnavailable(f"a Ray worker cannot import what the job needs ({reason}): every node must run `ray start` "
                             "from a Python with clip-sidecar's dependencies, the versions this driver has (pip install "
                             "'clip-sidecar[ray]' there)") from exc
    raise RayUnavailable(f"the job failed on the Ray cluster ({kind}: {reason}); -v shows Ray's report of it, with "
                         "the worker's traceback") from exc


def _check_reachable(address: str) -> None:
    """Raise RayUnavailable unless HOST:PORT (or ray://HOST[:PORT]) accepts a TCP connection within
    CONNECT_TIMEOUT_S; "auto" is Ray's to resolve."""
    if address == "auto":
        return
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "ray":  # the dashboard's http://HOST:8265 is what `ray job submit` takes, not a driver
        raise RayUnavailable(f"{_given(address)}: a driver connects to the head's HOST:PORT (its GCS port, 6379 by "
                             "default) or ray://HOST:PORT (its Ray Client port, 10001 by default), not a "
                             f"{scheme}:// URL (the dashboard's, for `ray job submit`)")
    host, colon, port = (rest if sep else address).rpartition(":")
    default_port = ""
    if not colon or not port.isdigit():
        if not sep:  # Ray's own answer is a ValueError and its traceback
            raise RayUnavailable(f"{_given(address)}: not HOST:PORT; give the head's address as `ray start --head` "
                                 "printed it (its GCS port, 6379 by default), ray://HOST:PORT, auto or local")
        # The Ray Client's gRPC channel connects to 443 where the address names no port (a server behind a TLS
        # proxy), not to the Client's own 10001.
        host, port = rest, "443"
        default_port = "port 443, gRPC's default where ray:// names none, not the Ray Client's 10001: "
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = f"no answer in {CONNECT_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise RayUnavailable(f"no Ray cluster answers at {address} ({default_port}{reason}): check that its head runs "
                             "(`ray status` on it), that this machine reaches that host and port (firewall) and that "
                             f"{_given(address)} is the head's address as `ray start --head` printed it") from exc


def _run(ray: Any, settings: Settings, source: Path, out: Path, *, batch_size: int, shard_size: int,
         resources: RayResources, max_pixels: int, thumbnail_side: int | None,
         load_tagger: Callable[[Encoder], Tagger | None] | None, allow_empty: bool, progress: bool) -> EmbedSummary:
    started = time.perf_counter()
    stages: defaultdict[str, float] = defaultdict(float)
    # Before the scan: its hash tasks need a node that holds them.
    actors, actor_gpus = _actor_pool(ray, resources, device=settings.device)
    # The driver's copy of the models, on its CPU: their signatures and preprocessing for the plan and
    # the decode tasks (and the tiny model trained into the cache before any actor wants it).
    driver_settings = dataclasses.replace(settings, device="cpu", precision="fp32")
    encoder, fine_encoder = load_encoder(driver_settings), load_fine_encoder(driver_settings)
    tagger = load_tagger(encoder) if load_tagger else None
    plan = plan_embed(encoder, source, out, decode="cpu", fine_encoder=fine_encoder, tagger=tagger,
                      shard_size=shard_size,
                      workers=0, progress=progress, stages=stages, thumbnail_side=thumbnail_side,
                      max_pixels=max_pixels, allow_empty=allow_empty,
                      hash_files=lambda paths: _hash_on_cluster(ray, paths, task_cpus=resources.task_cpus,
                                                                source=source))
    shards = plan.shards
    failed: list[str] = []  # ids
    if plan.todo:  # before the bar is drawn: a record written after it went on the bar's line
        # The head's address: `--address auto` (RAY_ADDRESS) takes whichever cluster runs on this machine.
        log.info("ray: %d images to embed on %d node(s) of the cluster at %s; up to %d encoder actor(s) with %s "
                 "GPU and %s CPU each", len(plan.todo), len([n for n in ray.nodes() if n["Alive"]]),
                 ray.get_runtime_context().gcs_address, actors, actor_gpus, resources.actor_cpus)
    with errors_file(out, plan) as errors, \
            tqdm(total=len(plan.todo), unit="img", desc="embed (ray)", disable=not progress) as bar:
        if plan.todo:
            counter = _embedded_counter(ray) if progress else None
            dataset = _pipeline(ray, plan.todo, encoder.images, settings, out=out, run_base=len(shards.shard_names()),
                                batch_size=batch_size, shard_size=shard_size, resources=resources, actors=actors,
                                actor_gpus=actor_gpus, max_pixels=max_pixels, fine=fine_encoder is not None,
                                thumbnail_side=shards.thumbnail_side, tagger=tagger, counter=counter)
            pipeline_started = time.perf_counter()
            done = 0  # images the writers returned, embedded or failed
            with _bar_following(ray, counter, bar):
                for written in dataset.iter_rows():
                    errors.write(written["errors"])
                    for line in written["errors"].splitlines():
                        failure = json.loads(line)
                        if failure["reason"].startswith(READ_FAILED):  # the scan read it: on another node?
                            _refuse_unseen(Path(failure["path"]), failure["reason"], source,
                                           then="the job stopped; a rerun goes on from the shards it wrote")
                        failed.append(failure["id"])
                    for stage in (*STAGE_COLUMNS, "write"):
                        stages[f"{stage} (summed over workers)"] += float(written[f"{stage}_s"])
                    done += int(written["rows"]) + int(written["failed"])
            bar.update(done - bar.n)  # every image: the actors' counts may have missed some (the counter lost)
            stages["pipeline"] = time.perf_counter() - pipeline_started
    shards.record_shards()  # the manifest, once: every shard the writers renamed into place
    return finish_embed(plan, failed=failed, started=started, stages=stages, tagger=tagger)


class _EmbeddedCount:
    """An actor: how many images the encoder actors have embedded (failed ones too), for the driver's bar. Counted
    per batch, under the batch's first id: a batch Ray runs again (its actor lost) counts once."""

    def __init__(self) -> None:
        self.batches: dict[str, int] = {}
        self.total = 0

    def add(self, first_id: str, count: int) -> None:
        self.total += count - self.batches.get(first_id, 0)
        self.batches[first_id] = count

    def count(self) -> int:
        return self.total


def _embedded_counter(ray: Any) -> Any:
    """An `_EmbeddedCount` on the driver's node, reserving no CPU: a node lost takes it only with the driver."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(_EmbeddedCount).options(scheduling_strategy=here).remote()


@contextlib.contextmanager
def _bar_following(ray: Any, counter: Any, bar: tqdm) -> Iterator[None]:
    """`bar` set to the `counter`'s count every PROGRESS_POLL_S while the block runs (by a thread: the block waits
    on Ray Data for whole shards); no thread without a counter (no bar). A counter that cannot answer (its node
    lost) ends the following: the driver then sets the bar from the shards written."""
    if counter is None:
        yield
        return
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(PROGRESS_POLL_S):
            try:
                count = ray.get(counter.count.remote(), timeout=5 * PROGRESS_POLL_S)
            except ray.exceptions.GetTimeoutError:
                continue  # its worker still starting: asked again, and Ctrl-C waits for no answer
            except ray.exceptions.RayError as exc:
                log.debug("ray: the bar stops following the actors' count (%s)", exc)
                return
            if count != bar.n:  # each update draws the bar: in a log, a line each poll
                bar.update(count - bar.n)

    thread = threading.Thread(target=follow, name="embed-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _hash_on_cluster(ray: Any, paths: list[Path], *, task_cpus: float,
                     source: Path) -> Iterable[tuple[str | None, str | None]]:
    """Every file hashed where Ray runs the task (reading every byte of the corpus is the scan's
    cost), in order, chunk by chunk as they finish. A file the task cannot read but this machine can stops
    the scan: the nodes do not share SOURCE's files, and every item would fail."""
    hash_chunk = ray.remote(num_cpus=task_cpus)(_hash_chunk)
    chunks = [paths[start:start + HASH_CHUNK] for start in range(0, len(paths), HASH_CHUNK)]
    refs = [hash_chunk.remote(chunk) for chunk in chunks]
    for chunk, ref in zip(chunks, refs):
        node, hashes = ray.get(ref)
        for path, (digest, reason) in zip(chunk, hashes):
            if digest is None:
                _refuse_unseen(path, f"{reason} on Ray node {node}", source, then="nothing was embedded")
        yield from hashes


def _refuse_unseen(path: Path, reason: str, source: Path, *, then: str) -> None:
    """Raise RayUnavailable where this machine reads `path`, which a Ray worker could not (`reason`): the nodes do not
    all see SOURCE's files, and every item a task of such a node reads would fail, or be recorded as deleted."""
    if hash_file(path)[0] is not None:
        raise RayUnavailable(f"a Ray worker cannot read {path}, which this machine reads ({reason}): every node must "
                             f"see SOURCE ({source}) and the images it lists at the same paths as this machine "
                             f"(storage shared by all, mounted at the same place); {then}")


def _hash_chunk(paths: list[Path]) -> tuple[str, list[tuple[str | None, str | None]]]:
    """(the node's address, each file's hash or the reason it cannot be read there)."""
    import ray

    return ray.util.get_node_ip_address(), [hash_file(path) for path in paths]


def _actor_pool(ray: Any, resources: RayResources, *, device: str) -> tuple[int, float]:
    """(most encoder actors, GPUs per actor): one actor per GPU where the cluster has GPUs, unless `device` is cpu:
    CPU actors then, reserving no GPU (each held one it left idle, and the GPUs' count capped the actors)."""
    total = ray.cluster_resources()
    gpus = 0 if device == "cpu" else int(total.get("GPU", 0))
    if not gpus and device.startswith("cuda"):
        # An actor reserving no GPU sees none (Ray hides them): each would fail to load its model.
        raise RayUnavailable(f"--device {device}: the cluster has no GPU; use --device auto or cpu")
    # An actor or a task reserves its CPUs on one node (an actor, with a GPU, on a GPU node): more
    # than any node has passes a check of the cluster's total, and the job then waits forever.
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for flag, cpus, hosts, kind in (
            ("--actor-cpus", resources.actor_cpus, [n for n in nodes if n.get("GPU", 0) >= 1] if gpus else nodes,
             "GPU node" if gpus else "node"),
            ("--task-cpus", resources.task_cpus, nodes, "node")):
        largest = max((node.get("CPU", 0) for node in hosts), default=0)
        if cpus > largest:
            raise RayUnavailable(f"{flag} {cpus:g}: no {kind} of the cluster has that many CPUs (the largest has "
                                 f"{largest:g}); lower {flag} or add a larger node")
    if gpus:
        return resources.actors or gpus, 1.0
    cpus = total.get("CPU", 0)
    if cpus < resources.actor_cpus + resources.task_cpus:
        raise RayUnavailable(f"the cluster has {cpus:g} CPUs: an encoder actor ({resources.actor_cpus:g} CPU) and a "
                             f"decode task ({resources.task_cpus:g} CPU) need {resources.actor_cpus + resources.task_cpus:g}; "
                             "lower --actor-cpus / --task-cpus or add nodes")
    return resources.actors or max(1, int(cpus // (resources.actor_cpus + resources.task_cpus))), 0.0


def _pipeline(ray: Any, todo: list, images: ImagePreprocess, settings: Settings, *, out: Path, run_base: int,
              batch_size: int, shard_size: int, resources: RayResources, actors: int, actor_gpus: float,
              max_pixels: int, fine: bool, thumbnail_side: int, tagger: Tagger | None, counter: Any) -> Any:
    """The plan's rows → decode (CPU tasks) → forward (actors, each batch counted by `counter` when there is
    one) → shard files (CPU tasks), one result row per shard written."""
    rows = [{"path": str(item.path), "row": json.dumps(dataclasses.asdict(document_row(item, digest)),
                                                       ensure_ascii=False)}
            for item, digest in todo]
    run = uuid.uuid4().hex[:8]
    return (ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
            .map_batches(_decode_batch, fn_kwargs={"images": images, "max_pixels": max_pixels,
                                                   "thumbnail_side": thumbnail_side},
                         batch_size=batch_size, batch_format="numpy", num_cpus=resources.task_cpus)
            .map_batches(_EncodeBatches, fn_constructor_kwargs={"settings": settings, "max_pixels": max_pixels,
                                                                "counter": counter},
                         batch_size=batch_size, batch_format="numpy", num_cpus=resources.actor_cpus,
                         num_gpus=actor_gpus, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))
            .map_batches(_write_shard, fn_kwargs={"root": str(out), "prefix": f"shard-{run_base:05d}-{run}",
                                                  "fine": fine, "thumbnails": bool(thumbnail_side),
                                                  "tagger": tagger},
                         batch_size=shard_size, batch_format="numpy", num_cpus=resources.task_cpus))


def _decode_batch(batch: dict[str, np.ndarray], *, images: ImagePreprocess, max_pixels: int,
                  thumbnail_side: int) -> dict[str, np.ndarray]:
    """A CPU task: each file read and decoded to the model's pixels (zeros, and the reason, when
    unusable), and its thumbnail (b"" when none is asked for)."""
    started = time.perf_counter()
    count = len(batch["path"])
    height, width = images.spec.output_size
    pixels = np.zeros((count, height, width, 3), dtype=np.uint8)
    reasons, thumbnails = [], []
    for index, path in enumerate(batch["path"]):
        data, reason = read_file(Path(path))
        reason = _naming_this_node(reason)
        decoded, thumbnail = None, b""
        if data is not None:
            decoded, thumbnail, reason = decode_data(images, data, max_pixels=max_pixels, thumbnail_side=thumbnail_side)
        if decoded is not None:
            pixels[index] = decoded
        reasons.append(reason or "")
        thumbnails.append(thumbnail)
    return {"path": batch["path"], "row": batch["row"], "reason": np.array(reasons, dtype=object), "pixels": pixels,
            "thumbnail": np.array(thumbnails, dtype=object),
            "decode_s": np.full(count, (time.perf_counter() - started) / max(count, 1))}


def _naming_this_node(reason: str | None) -> str | None:
    """A read failure's reason naming the Ray node that failed to read (the driver tells a node that does not
    see SOURCE by it; errors.jsonl keeps it too); any other reason as it is."""
    import ray

    if reason is None or not reason.startswith(READ_FAILED):
        return reason
    return f"{reason} on Ray node {ray.util.get_node_ip_address()}"


class _EncodeBatches:
    """An actor holding the model (and the fine model): vectors for each decoded batch, counted by `counter` (an
    `_EmbeddedCount`) where the driver draws a bar."""

    def __init__(self, settings: Settings, max_pixels: int, counter: Any):
        self.encoder = load_encoder(settings)
        self.fine_encoder = load_fine_encoder(settings)
        self.max_pixels = max_pixels
        self.counter = counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["path"])
        out = {name: batch[name] for name in ("path", "row", "thumbnail", "decode_s")}
        reasons = batch["reason"].astype(object)  # a copy; room for a longer reason
        started = time.perf_counter()
        if self.fine_encoder is not None:  # first: an image it refuses fails, and the model skips it too
            fine = np.zeros((count, self.fine_encoder.dim), dtype=np.float32)
            usable = reasons == ""
            if usable.any():
                fine[usable], refusals = fine_vectors(self.fine_encoder, [Path(p) for p in batch["path"][usable]],
                                                      max_pixels=self.max_pixels)
                # Read again here, on the actor's node: one that cannot see the file stops the job as a decode
                # task's node does.
                reasons[usable] = [_naming_this_node(reason) or "" for reason in refusals]
            out["fine"] = fine
        out["fine_model_s"] = np.full(count, (time.perf_counter() - started) / count)
        out["reason"] = reasons
        started = time.perf_counter()
        usable = reasons == ""
        vectors = np.zeros((count, self.encoder.dim), dtype=np.float32)
        if usable.any():
            vectors[usable] = self.encoder.postprocess(forward_batch(self.encoder, batch["pixels"][usable]))
        out["vector"] = vectors
        out["forward_s"] = np.full(count, (time.perf_counter() - started) / count)
        if self.counter is not None:
            self.counter.add.remote(json.loads(batch["row"][0])["id"], count)  # not awaited: the bar's alone
        return out


def _write_shard(batch: dict[str, np.ndarray], *, root: str, prefix: str, fine: bool,
                 thumbnails: bool, tagger: Tagger | None) -> dict[str, list]:
    """A CPU task: one shard of the batch's usable rows (with their tags, given a tagger), named by the run and
    its ids; the failures as errors.jsonl lines for the driver."""
    started = time.perf_counter()
    usable = batch["reason"] == ""
    rows = [ShardRow.from_json(line) for line in batch["row"][usable]]
    if tagger is not None:
        rows = tagger.apply(rows, batch["vector"][usable])
    failures = "".join(error_line(json.loads(line)["id"], str(path), str(reason))
                       for line, path, reason in zip(batch["row"][~usable], batch["path"][~usable],
                                                     batch["reason"][~usable]))
    name = ""
    if rows:
        digest = hashlib.sha256("\n".join(row.id for row in rows).encode("utf-8")).hexdigest()[:12]
        name = write_shard_files(Path(root), f"{prefix}-{digest}", batch["vector"][usable], rows,
                                 batch["fine"][usable] if fine else None,
                                 [bytes(t) for t in batch["thumbnail"][usable]] if thumbnails else None)
    result = {"shard": [name], "rows": [len(rows)], "failed": [int((~usable).sum())], "errors": [failures]}
    for stage in STAGE_COLUMNS:
        result[f"{stage}_s"] = [float(np.sum(batch[f"{stage}_s"]))]
    result["write_s"] = [time.perf_counter() - started]
    return result
