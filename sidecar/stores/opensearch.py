"""OpenSearch store: k-NN HNSW + BM25 on a versioned index behind an alias, loaded through opensearch-py helpers."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import logging
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np
from opensearchpy import OpenSearch, Transport, helpers
from opensearchpy.exceptions import (
    AuthenticationException,
    AuthorizationException,
    ConnectionTimeout,
    NotFoundError,
    OpenSearchException,
    SSLError,
    TransportError,
)
from opensearchpy.exceptions import (
    ConnectionError as OSConnectionError,
)

from sidecar.config import replica_settings
from sidecar.errors import quoted
from sidecar.stores.base import (
    FacetCounts,
    ModelMismatchError,
    QueryModelMismatch,
    StoreError,
    StoreQueryError,
    StoreReport,
    StoreUnavailable,
)
from sidecar.stores.effort import REFRESH_S, EffortPolicy
from sidecar.stores.opensearch_lock import LOCK_SUFFIX, LoadLock, when
from sidecar.threads import name_for_the_os
from sidecar.types import NO_VECTOR, Document, Filters, ModelSignature, ScoredId

log = logging.getLogger(__name__)

# plugin_config/ is what an operator applies, the CLI included. A checkout (editable install) has
# it at the repository root; an installed package (Docker: `pip install .`) is pointed at a copy
# by the plugin_config_dir setting (SIDECAR_PLUGIN_CONFIG_DIR).
REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "plugin_config"
# An index's default pipelines, which a rebuild carries into the new index.
DEFAULT_PIPELINE_SETTINGS = ("default_pipeline", "search.default_pipeline")  # under `index.`
ENGINES = ("lucene", "faiss")
FUSIONS = ("minmax", "rrf")
PIPELINES = {"minmax": "hybrid-minmax", "rrf": "hybrid-rrf"}
RRF_RANK_CONSTANT = 60
# _meta key holding the settings a bulk load replaced, so a load that died half-way (node
# killed) is still undone by the next one instead of "restoring" refresh_interval -1.
SAVED_SETTINGS_KEY = "bulk_load_saved_settings"
RETRYABLE = (OSConnectionError, ConnectionTimeout)
# A bulk item's 429 that is no overload but a write block (the disk past its flood-stage watermark): rounds of
# retries spent minutes on it, then called the cluster overloaded; it stops the load at once, naming the block.
BLOCKED = frozenset({"cluster_block_exception"})
# A multi-get's per-document errors that OpenSearch answers 429 or 503 for on a request of its own (a get):
# the statuses `_read_errors` reads as unavailable. Its items carry the error's type, not its status.
UNAVAILABLE_ITEM_ERRORS = frozenset({
    "no_shard_available_action_exception",  # no copy of the document's shard is assigned: a red index
    "unavailable_shards_exception", "es_rejected_execution_exception", "circuit_breaking_exception"})
# Every search of the store is of the whole index or none: by default OpenSearch answers 200 from the shards
# that have a copy assigned (`_shards.successful` below `total`, `failed` 0), and the hits of the others would
# be missing without a sign from a ranking, a fusion's normalisation, a rerank, a recall measurement. Refused,
# it answers 503 naming the shards it misses (`_partial`).
WHOLE_INDEX = {"allow_partial_search_results": "false"}
# How OpenSearch 2.19 names those shards: "Search rejected due to missing shards [[index][1], [index][3]]. …".
MISSING_SHARDS = re.compile(r"Search rejected due to missing shards \[(.*)\]\.")
SHARD = re.compile(r"\[([^\[\]]+)\]\[(\d+)\]")
# OpenSearch's rules for an index or alias name (MetadataCreateIndexService): characters it refuses, and its
# length in bytes; the store's own names add `-v<13-digit ms>` (or `-lock`) to the alias.
ALIAS_FORBIDDEN = frozenset(' "*\\<|,>/?#:')
MAX_NAME_BYTES = 255
# How ml-commons relays the answer of a remote model (the sidecar, through a connector) that was not a 2xx, under
# that answer's own status: a 401 or 403 so prefixed is the remote service refusing the connector's key, not this
# cluster refusing the store's credentials.
REMOTE_SERVICE_ERROR = "Error from remote service: "
# Documents pulled from a rebuild's iterable at a time: the unit a dropped connection resumes within.
REBUILD_BATCH = 10_000
# refresh_interval during a large load, per engine. lucene builds each segment's HNSW graph while
# indexing, on the bulk request's thread: with refresh off the one in-memory segment's graph grows
# to the whole load and every insert gets slower (measured 2.9x fewer docs/s at 10k x 512 than at
# 1s; docs/opensearch.md), so lucene keeps segments small with a short interval. faiss builds its
# native graphs at flush and merge, where refresh off is k-NN's own advice.
BULK_REFRESH_INTERVAL = {"lucene": "2s", "faiss": "-1"}
# Documents serialised to JSON per task of the background serialiser.
SERIALISE_BATCH = 250
# Binary fields beside each document, base64 in _source only (a binary field is neither indexed nor
# searchable): the fine-ranking model's vector (float32 bytes; it never enters the HNSW graph) and
# the thumbnail (JPEG bytes; read by id only, left out of fetches).
BINARY_FIELDS = ("fine_vector", "thumbnail")
# Equal scores are common (BM25 of short captions; duplicate images), and OpenSearch orders them
# by each shard copy's internal doc ids: the k-th hit would depend on the shard layout and on which
# replica answered. Ties by id make a top-k one list. Cost: none measurable (BM25 top-100 over
# 50k captions, p50 3.8 vs 3.9 ms in one run).
BY_SCORE_THEN_ID = {"sort": [{"_score": "desc"}, {"id": "asc"}], "track_scores": True}
# Metadata field types a terms aggregation counts as facets (what `term` filters match).
FACET_FIELD_TYPES = {"keyword", "long", "integer", "short", "byte", "double", "float", "half_float",
                     "scaled_float", "unsigned_long", "boolean"}
# What a filter on a field of each type may send, as a refused filter's error tells a client.
_FILTER_VALUES = {"keyword": "strings", "boolean": "true or false",
                  **dict.fromkeys(("long", "integer", "short", "byte", "unsigned_long"), "whole numbers"),
                  **dict.fromkeys(("double", "float", "half_float", "scaled_float"), "numbers")}
# _meta key holding the search effort a calibration chose for a recall target (sidecar.stores.effort).
EFFORT_KEY = "search_effort"
# _meta key holding the fine model whose vectors the documents hold (model, weights, dim), where recorded.
FINE_MODEL_KEY = "fine_model"


def resolve_config_dir(configured: str | os.PathLike[str] | None) -> Path:
    """The configured plugin_config directory, else the checkout's; fails naming the setting when absent."""
    path = Path(configured) if configured else REPO_CONFIG_DIR
    if not (path / "index.json").is_file():
        source = f"plugin_config_dir={configured}" if configured else f"the checkout's {REPO_CONFIG_DIR}"
        raise StoreError(f"no plugin_config (index.json) in {path} ({source}); an installed package needs "
                         "SIDECAR_PLUGIN_CONFIG_DIR pointing at a copy of the repository's plugin_config/")
    return path


def _as_store_errors(operation: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An OpenSearchStore method whose client errors are StoreErrors naming `operation` (`_write_errors`)."""
    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapped(self: OpenSearchStore, *args: Any, **kwargs: Any) -> Any:
            with self._write_errors(operation):
                return method(self, *args, **kwargs)
        return wrapped
    return decorate


class OpenSearchStore:
    """The Store protocol on OpenSearch; `index` is an alias over `<index>-v<N>` indices."""

    name = "opensearch"

    def __init__(
        self,
        *,
        url: str = "http://127.0.0.1:9250",
        index: str = "clip-sidecar",
        user: str = "",
        password: str = "",
        verify_certs: bool = True,
        ca_certs: str | None = None,
        engine: str = "lucene",
        m: int = 16,
        ef_construction: int = 128,
        ef_search: int = 100,
        number_of_shards: int = 1,
        number_of_replicas: int | str = "0-1",
        chunk_size: int = 500,
        max_chunk_bytes: int = 20 * 1024 * 1024,
        max_retries: int = 5,
        retry_rounds: int = 5,
        initial_backoff: float = 1.0,
        connection_retries: int = 8,
        large_load_threshold: int = 5000,
        bulk_refresh_interval: str | None = None,
        lock_stale_s: float = 120.0,
        lock_heartbeat_s: float = 10.0,
        timeout_s: float = 60.0,
        config_dir: Path | None = None,
        target_recall: float = 0.0,
        target_k: int = 10,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
        for field_name, value in (("m", m), ("ef_construction", ef_construction), ("ef_search", ef_search),
                                  ("chunk_size", chunk_size), ("connection_retries", connection_retries),
                                  ("number_of_shards", number_of_shards)):
            if value < 1:
                raise ValueError(f"{field_name} must be >= 1, got {value}")
        self.url = url
        self.alias = index
        self.engine = engine
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.number_of_shards = number_of_shards
        # A fixed count, or a range OpenSearch expands to the nodes (`replica_settings`).
        self.replicas = replica_settings(number_of_replicas)
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        # 429s: streaming_bulk retries a chunk's rejected items max_retries times (with backoff, so an
        # overloaded cluster gets a pause); what is still rejected then waits in this store's own
        # queue and is sent again after the pass, up to retry_rounds times.
        self.max_retries = max_retries
        self.retry_rounds = retry_rounds
        self.initial_backoff = initial_backoff
        self.connection_retries = connection_retries
        self.large_load_threshold = large_load_threshold
        self.bulk_refresh_interval = bulk_refresh_interval or BULK_REFRESH_INTERVAL[engine]
        if not 0 < lock_heartbeat_s < lock_stale_s:
            raise ValueError(f"lock_heartbeat_s ({lock_heartbeat_s}) must be > 0 and below lock_stale_s "
                             f"({lock_stale_s})")
        # The load lock counts as stale (another load breaks it) after lock_stale_s without a
        # heartbeat; its holder renews it every lock_heartbeat_s from a thread of its own.
        self.lock_stale_s = lock_stale_s
        self.lock_heartbeat_s = lock_heartbeat_s
        self.lock_index = f"{index}{LOCK_SUFFIX}"
        self.config_dir = resolve_config_dir(config_dir)
        # As opensearch-py reads the URL (a scheme in any case): a test of "https://" alone let HTTPS://… connect
        # over TLS without verifying the certificate (verify_certs below applies to https URLs only).
        use_ssl = _url_scheme(url) == "https"
        _check_alias(index)
        if use_ssl and verify_certs and ca_certs and not Path(ca_certs).is_file():
            # Else every request failed as "cannot be reached: [Errno 2] No such file or directory (is it up?)",
            # retried as a cluster down would be.
            raise StoreError(f"SIDECAR_OPENSEARCH_CA_CERTS={ca_certs!r} is no file: set it to the PEM file of the CA "
                             f"that signed the certificate of OpenSearch at {url}")
        self.client = OpenSearch(
            hosts=[url],
            http_auth=(user, password) if user else None,
            use_ssl=use_ssl,
            verify_certs=verify_certs if use_ssl else False,
            # The CA file that signed the cluster's certificate (a private CA); None = the system's CAs.
            ca_certs=ca_certs if use_ssl and verify_certs else None,
            # A deliberate verify_certs=False (self-signed dev cluster) should not warn per request.
            ssl_show_warn=verify_certs,
            transport_class=_SecuredTransport,
            store_identity=_Identity(url=url, user=user or "", ca_certs=ca_certs),
            timeout=timeout_s,
            max_retries=2,
            retry_on_timeout=True,
            # Connections kept open: a load's requests beside its lock's heartbeat, a serving
            # worker's concurrent searches (urllib3's default of 1 drops and reopens the others).
            pool_maxsize=16,
        )
        self._plugins: set[str] | None = None
        self._primary_shards: tuple[int, float] | None = None  # (shards, when read)
        self._models_read: _Record | None = None  # what signature() and fine_signature() answer from
        # Queries that name no ef_search: the calibrated effort for target_recall (in the index's _meta,
        # so a rebuilt index starts uncalibrated), else ef_search.
        self.effort = EffortPolicy(target_recall=target_recall, k=target_k, default_ef=ef_search,
                                   load=lambda: (self._meta() or {}).get(EFFORT_KEY), save=self._save_effort)
        self._session: _OpenSearchLoad | None = None
        self._session_guard = threading.Lock()

    # --- setup and model signature -------------------------------------------------------

    @_as_store_errors("setup")
    def setup(self, dim: int) -> None:
        """Create the search pipelines (when neural-search is present), the load lock's index and the
        first index + alias; idempotent."""
        self._ensure_lock_index()
        if self.has_neural_search():
            self.client.transport.perform_request(
                "PUT", f"/_search/pipeline/{PIPELINES['minmax']}", body=self._pipeline_body("minmax", (0.5, 0.5)))
            self.client.transport.perform_request(
                "PUT", f"/_search/pipeline/{PIPELINES['rrf']}", body=self._pipeline_body("rrf", (0.5, 0.5)))
        if self.alias_indices():
            stored = self._mapping_dim()
            if stored != dim:
                raise StoreError(f"alias {self.alias} holds dim-{stored} vectors; setup asked for dim {dim}")
            return
        if self.client.indices.exists(index=self.alias):
            raise StoreError(f"{self.alias} is a concrete index, not an alias; the store needs the name free for an alias")
        name = self._new_index_name()
        self._create_index(name, dim=dim, signature=None)
        self.client.indices.put_alias(index=name, name=self.alias)
        log.info("created index %s behind alias %s (dim %d, engine %s)", name, self.alias, dim, self.engine)

    def _ensure_lock_index(self) -> None:
        """The hidden index holding the alias's load lock (`LoadLock`); created once, by `setup` or
        by the first load."""
        if self.client.indices.exists(index=self.lock_index):
            return
        # ignore=400: another process may create it first (resource_already_exists_exception), which
        # is no failure, and opensearch-py would log it as one.
        result = self.client.indices.create(index=self.lock_index, ignore=400, body={
            "settings": {"index": {"number_of_shards": 1, "auto_expand_replicas": "0-1", "hidden": True}},
            "mappings": {"dynamic": False, "properties": {"operation": {"type": "keyword"}}}})
        error = result.get("error") if isinstance(result, dict) else None
        if error and (not isinstance(error, dict) or error.get("type") != "resource_already_exists_exception"):
            raise StoreError(f"could not create the load lock's index {self.lock_index}: {error}")

    def signature(self) -> ModelSignature | None:
        """The model recorded in the index mapping's _meta, or None while unclaimed or absent; read as
        `fine_signature` is."""
        return self._recorded_models().signature

    def fine_signature(self) -> ModelSignature | None:
        """The fine model recorded in the index mapping's _meta, or None."""
        return self._recorded_models().fine_signature

    def _recorded_models(self) -> _Record:
        """What the mapping of the index behind the alias records. Read again every REFRESH_S, not per call:
        the server checks the model on every vector search and the fine stage asks for its model, and a
        mapping request costs milliseconds; while the index serves, only another process's rebuild (another
        index) changes them, and a vector search notices it at once (`_vector_hits`). A record of no model
        is read again on every call: another process's first `index` claims the store for its model, and
        nothing in a search's answer tells which (an unclaimed index takes any), so a cached one would let
        this server's vectors rank another model's of the same size until the next read. An unclaimed
        store is an empty one, the rare case: the extra request is its alone."""
        known = self._models_read
        if known is not None and known.signature is not None and time.monotonic() - known.read_at < REFRESH_S:
            return known
        return self._read_models()

    def _read_models(self) -> _Record:
        now = time.monotonic()
        with self._read_errors(f"reading the mapping of {self.alias}"):
            found = self._mapping()
        index, mapping = found if found is not None else (None, {})
        meta = mapping.get("_meta", {})
        dim = mapping.get("properties", {}).get("vector", {}).get("dimension")
        self._models_read = _Record(index=index, signature=_signature_in(meta), fine_signature=_fine_signature_in(meta),
                                    dim=None if dim is None else int(dim), read_at=now)
        return self._models_read

    @_as_store_errors("claim")
    def claim(self, signature: ModelSignature, *, fine_signature: ModelSignature | None = None) -> None:
        """Record the model in _meta on first use, and the fine model where none is recorded; another
        model's vectors, or another fine model's, are refused."""
        if not self.alias_indices():
            self.setup(signature.dim)
        meta = self._meta() or {}  # not the cached read: a claim compares with what is recorded now
        stored = _signature_in(meta)
        if stored is not None and stored != signature:
            raise ModelMismatchError(stored, signature)
        if stored is None and (dim := self._mapping_dim()) != signature.dim:
            raise ModelMismatchError(ModelSignature(model="(unclaimed)", weights="", dim=dim), signature)
        stored_fine = _fine_signature_in(meta)
        if fine_signature is not None and stored_fine not in (None, fine_signature):
            raise ModelMismatchError(stored_fine, fine_signature, fine=True)
        if stored is None or (fine_signature is not None and stored_fine is None):
            meta.update(model=signature.model, weights=signature.weights, dim=signature.dim)
            if fine_signature is not None:
                meta[FINE_MODEL_KEY] = dataclasses.asdict(fine_signature)
            self._put_meta(meta)
            self._models_read = None  # the next signature() and fine_signature() read what was recorded

    def has_neural_search(self) -> bool:
        """Whether every node runs neural-search (hybrid query, normalisation and RRF processors)."""
        if self._plugins is None:
            # _nodes/plugins, not _cat/plugins: the latter also needs cluster:monitor/state, which
            # would let the store's user read every index's mappings (plugin_config/security/roles.yml).
            with self._read_errors("listing plugins"):
                nodes = self.client.nodes.info(metric="plugins")["nodes"].values()
            per_node = [{plugin["name"] for plugin in node.get("plugins", [])} for node in nodes]
            self._plugins = set.intersection(*per_node) if per_node else set()
        return "opensearch-neural-search" in self._plugins

    # --- writes ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def bulk_load(self, *, lock_wait_s: float = 0.0) -> Iterator[_OpenSearchLoad]:
        """A loading session (Store protocol) under the alias's load lock: a concurrent rebuild or
        `index` run waits up to `lock_wait_s`, then is refused (StoreLocked). `expect(n)` with n at
        least `large_load_threshold` relaxes refresh and replicas once for the session; the end
        restores them, refreshes, and checks the count. Nested sessions join the outer one."""
        with self._session_guard:
            outer = self._session
            if outer is not None:
                outer.depth += 1
        if outer is not None:
            try:
                yield outer
            finally:
                outer.depth -= 1
            return
        with self._load_lock("index", lock_wait_s=lock_wait_s) as lock:
            session = _OpenSearchLoad(self, lock)
            with self._session_guard:
                self._session = session
            try:
                try:
                    yield session
                except BaseException:
                    # Most often the cluster went away and the load has just spent its retries on it: one
                    # attempt, not another round of them (the values stay in _meta for the next load).
                    session.restore(retry=False)
                    raise
                session.restore()
                session.finish()
            finally:
                with self._session_guard:
                    self._session = None

    def upsert(self, documents: Sequence[Document], *, progress: Callable[[int], None] | None = None) -> int:
        """Insert or replace by id (the last of repeated ids wins), in a load session (this call's
        own, relaxed for a large load, when none is open); `progress(1)` per document acknowledged."""
        if not documents:
            return 0
        with self.bulk_load() as load:
            if load.depth == 0:
                load.expect(len(documents))
            if not self.alias_indices():
                raise StoreError(f"alias {self.alias} does not exist; run setup (clip-sidecar opensearch setup) "
                                 "or claim first")
            binary = [name for name in BINARY_FIELDS if any(getattr(doc, name) is not None for doc in documents)]
            if binary:
                # Indices created before these fields existed lack them: add them (idempotent), or
                # dynamic mapping would index the base64 as text.
                mapping = {"properties": {name: {"type": "binary"} for name in binary}}
                self._with_retry(lambda: self.client.indices.put_mapping(index=self.alias, body=mapping))
            ops = {d.id: d for d in documents}
            written, _ = self._bulk(self.alias, ops, lock=load.lock, progress=progress)
            load.written.update(ops)
        return written

    def delete(self, ids: Sequence[str]) -> int:
        """Remove by id; unknown ids are ignored; returns how many were removed."""
        if not ids:
            return 0
        with self.bulk_load() as load:
            _, deleted = self._bulk(self.alias, dict.fromkeys(ids), lock=load.lock)
            load.written.difference_update(ids)
        return deleted

    def rebuild(self, documents: Iterable[Document], *, signature: ModelSignature,
                fine_signature: ModelSignature | None = None, lock_wait_s: float = 0.0,
                before: Callable[[], None] | None = None, progress: Callable[[int], None] | None = None) -> str:
        """Under the load lock: call `before`, load a new versioned index, check its count, swap the alias
        atomically, then drop the old index. An `index` run started meanwhile waits or is refused
        (its writes would land in the index the swap drops). `progress(1)` per document acknowledged."""
        with self._load_lock("rebuild", lock_wait_s=lock_wait_s) as lock:
            if before is not None:
                before()
            old = self.alias_indices()
            # A rebuild killed past its own cleanup (SIGKILL, a lost machine) left its index behind; under the lock
            # no other rebuild is building one, so each unaliased version is such a leftover, as `store repair` says.
            for leftover in self._unaliased_versions(old):
                self.client.indices.delete(index=leftover, ignore_unavailable=True)
                log.warning("deleted %s, a versioned index no alias names (an interrupted rebuild's)", leftover)
            name = self._new_index_name()
            self._create_index(name, dim=signature.dim, signature=signature, fine_signature=fine_signature,
                               settings=self._default_pipelines(old))
            try:
                ids: set[str] = set()
                # A fresh index nobody reads yet: load all of it with refresh relaxed and no replicas.
                saved = self._relax_settings(name)
                for batch in _batches(documents, REBUILD_BATCH):
                    ops = {d.id: d for d in batch}
                    ids.update(ops)
                    self._bulk(name, ops, lock=lock, progress=progress)
                # Only once loaded: a failed load deletes the index below, relaxed or not.
                self._restore_settings(name, saved)
                self.client.indices.refresh(index=name)
                total = self.client.count(index=name)["count"]
                if total != len(ids):
                    raise StoreError(f"rebuilt index {name} counts {total} documents, expected {len(ids)} unique ids")
            except BaseException as exc:
                # Ctrl-C ends with a bare "Aborted!": say that nothing changed.
                try:
                    self.client.indices.delete(index=name, ignore_unavailable=True)
                except OpenSearchException as cleanup:
                    # The cluster lost mid-load: the load's own error is the one to raise, below.
                    log.warning("rebuild of %s stopped (%s); its unfinished index %s could not be deleted (%s): "
                                "the next rebuild, or `clip-sidecar store repair`, deletes it; the alias still "
                                "names %s", self.alias, type(exc).__name__, name, cleanup, ", ".join(old) or "nothing")
                else:
                    log.warning("rebuild of %s stopped (%s): deleted its unfinished index %s; the alias still names %s",
                                self.alias, type(exc).__name__, name, ", ".join(old) or "nothing")
                raise
            lock.ensure_held()
            actions = [{"remove": {"index": i, "alias": self.alias}} for i in old]
            actions.append({"add": {"index": name, "alias": self.alias}})
            self.client.indices.update_aliases(body={"actions": actions})
            self._models_read = None  # the new index records its own models
            for i in old:
                self.client.indices.delete(index=i, ignore_unavailable=True)
        log.info("rebuilt %s: alias now on %s (%d docs), removed %s", self.alias, name, len(ids), old or "nothing")
        return name

    @contextlib.contextmanager
    def _load_lock(self, operation: str, *, lock_wait_s: float) -> Iterator[LoadLock]:
        with self._write_errors(operation):
            self._ensure_lock_index()
            lock = self._lock_for(operation)
            lock.acquire(wait_s=lock_wait_s)
            try:
                yield lock
            finally:
                lock.release()

    @contextlib.contextmanager
    def _write_errors(self, operation: str) -> Iterator[None]:
        """The client errors of a load, a setup or a check (calls of their own, outside the read path's
        `_read_errors`) as one StoreError naming the operation, the cluster and OpenSearch's reason: a write block
        (the disk past its flood-stage watermark), a server at the URL that is not OpenSearch. What is a store
        error already passes as it is, so does a cluster that cannot be reached (OpenSearchUnreachable)."""
        try:
            yield
        except OpenSearchUnreachable:
            raise
        except TransportError as exc:
            reason = _root_cause(exc)
            said = "" if reason == str(exc.error) else f": {quoted(reason)}"
            raise StoreError(f"{operation} of {self.alias} failed: OpenSearch at {self.url} answered "
                             f"{exc.status_code} {exc.error}{said}") from exc

    def _lock_for(self, operation: str) -> LoadLock:
        return LoadLock(self.client, index=self.lock_index, alias=self.alias, operation=operation,
                        stale_s=self.lock_stale_s, heartbeat_s=self.lock_heartbeat_s)

    # --- reads -----------------------------------------------------------------------------

    def count(self) -> int:
        # A search, not _count: _count takes no allow_partial_search_results, and counted the shards left alone.
        body = {"size": 0, "track_total_hits": True, "query": {"match_all": {}}}
        return int(self._search(body, what=f"counting {self.alias}")["hits"]["total"]["value"])

    def content_hashes(self) -> dict[str, str]:
        """id -> content_hash for every stored document, via the scan helper (none before the alias exists:
        a first rebuild creates it), of every shard or none as the searches are (WHOLE_INDEX): `index` would
        take a document on a shard left out for one not stored, and load it again."""
        what = f"reading the content hashes of {self.alias}"
        hits = helpers.scan(self.client, index=self.alias, query={"query": {"match_all": {}}},
                            _source=["content_hash"], size=1000, params=WHOLE_INDEX)
        with self._read_errors(what):
            try:
                return {h["_id"]: h["_source"].get("content_hash", "") for h in hits}
            except NotFoundError as exc:
                if exc.error != "index_not_found_exception":
                    raise
                return {}
            except helpers.ScanError as exc:  # a shard lost between two pages of the scroll
                raise StoreUnavailable(f"{what} failed: {exc}") from exc

    def vector_search(
        self, vector: np.ndarray, k: int, *, filters: Filters | None = None, exact: bool = False,
        ef_search: int | None = None,
    ) -> list[ScoredId]:
        """Top-k by inner product (raw, in [-1, 1]); exact=True is a knn_score script over every match."""
        query_vector = _as_list(vector)
        if exact or self.effort.exact(ef_search):
            # Only documents holding a vector: the ingest pipeline writes some without one, which the script
            # would score 0 (no inner product maps to it) where a knn query leaves them out.
            present = [{"exists": {"field": "vector"}}, *(_filter_clauses(filters) if filters else [])]
            query = {"script_score": {
                "query": {"bool": {"filter": present}},
                "script": {"source": "knn_score", "lang": "knn", "params": {
                    "field": "vector", "query_value": query_vector, "space_type": "innerproduct"}},
            }}
        else:
            query = {"knn": {"vector": self._knn_clause(query_vector, k, filters, ef_search=ef_search)}}
        with self._filter_refusals(filters):
            hits = self._vector_hits({"size": k, "query": query, "_source": False, **BY_SCORE_THEN_ID},
                                     dim=len(query_vector))
        return [ScoredId(h["_id"], knn_score_to_inner_product(h["_score"])) for h in hits]

    def searches_exactly(self, filters: Filters | None) -> bool:
        return False  # k-NN's filtered exact search is its choice per segment, which a search's answer does not say

    def text_search(self, query: str, k: int, *, filters: Filters | None = None,
                    ids: Sequence[str] | None = None) -> list[ScoredId]:
        """Top-k by raw BM25 over `text`; filters do not score. `ids` restricts the search to those
        documents (the lexical evidence of a native hybrid's candidates) without changing their scores."""
        clauses = _filter_clauses(filters)
        if ids is not None:
            clauses.append({"ids": {"values": list(ids)}})
        body = {"size": k, "_source": False, **BY_SCORE_THEN_ID,
                "query": {"bool": {"must": [{"match": {"text": query}}], "filter": clauses}}}
        # dfs: BM25 from the index's term statistics, not each shard's, so an index of several
        # shards scores as one shard does (OpenSearch skips the extra phase on one shard).
        with self._filter_refusals(filters):
            hits = self._search(body, search_type="dfs_query_then_fetch")["hits"]["hits"]
        return [ScoredId(h["_id"], float(h["_score"])) for h in hits]

    def filtered_ids(self, ids: Sequence[str], filters: Filters) -> list[str]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return []
        body = {"size": len(wanted), "_source": False,
                "query": {"bool": {"filter": [*_filter_clauses(filters), {"ids": {"values": wanted}}]}}}
        with self._filter_refusals(filters):
            return [hit["_id"] for hit in self._search(body)["hits"]["hits"]]

    def one_version(self) -> contextlib.nullcontext[None]:
        # Each call reads the alias: a request's calls may straddle a rebuild's alias swap (pinning would cost a
        # lookup of the alias per request).
        return contextlib.nullcontext()

    def supports_native_hybrid(self, *, fusion: str, weights: tuple[float, float], exact: bool) -> bool:
        """Whether `hybrid_search` can fuse these options in the cluster (hybrid query + a
        normalisation or score-ranker pipeline): min-max with any weights but 0, RRF with equal weights
        (2.19's score-ranker takes none); never exact search (the hybrid query's vector side is
        ANN); only where neural-search is installed, and only on an index of one primary shard."""
        if exact or self.effort.exact(None) or fusion not in FUSIONS or (fusion == "rrf" and weights[0] != weights[1]):
            return False
        # A weight of 0 asks for the other list's ranking, ties included. neural-search 2.19 orders equal fused
        # scores as its HashMap of Lucene doc ids iterates (doc order only while ids stay under the map's size),
        # which no request option changes; the Python fusion breaks them by that list's own rank.
        if min(weights) == 0:
            return False
        # On several shards the hybrid query's fused ranking depends on the shard count: neural-search
        # 2.19 takes min-max bounds over the union of every shard's top hits per sub-query, and RRF
        # ranks within each shard. k-NN and BM25 (dfs_query_then_fetch) are shard-independent, so the
        # Python fusion over them ranks on 3 shards as on 1 (tests/integration/test_opensearch_cluster.py).
        return self.has_neural_search() and self.primary_shards() == 1

    def primary_shards(self) -> int:
        """Primary shards of the index behind the alias (the configured number while there is no
        index). Read again every REFRESH_S: a rebuild by another process may change it."""
        now = time.monotonic()
        known = self._primary_shards
        if known is not None and now - known[1] < REFRESH_S:
            return known[0]
        with self._read_errors(f"reading the settings of {self.alias}"):
            try:
                settings = self.client.indices.get_settings(index=self.alias, name="index.number_of_shards")
            except NotFoundError:
                return self.number_of_shards
        shards = max(int(index["settings"]["index"]["number_of_shards"]) for index in settings.values())
        self._primary_shards = (shards, now)
        return shards

    def hybrid_search(
        self,
        vector: np.ndarray,
        query: str,
        k: int,
        *,
        filters: Filters | None = None,
        fusion: str = "minmax",
        weights: tuple[float, float] = (0.5, 0.5),
        ef_search: int | None = None,
    ) -> list[ScoredId]:
        """OpenSearch's hybrid query (k-NN + BM25) fused by a search pipeline. Scores are on
        `sidecar.retrieval.fusion`'s scale (weighted sum of min-max scores; weighted RRF), so a
        fused score means the same whichever side computed it. `ef_search`: the k-NN side's breadth
        (None: the store's effort), as in `vector_search`."""
        if fusion not in FUSIONS:
            raise ValueError(f"fusion={fusion!r}: choose one of {', '.join(FUSIONS)}")
        if not self.has_neural_search():
            raise StoreError(f"hybrid_search needs the neural-search plugin, which {self.url} lacks; "
                             "fuse in Python (sidecar.retrieval.fusion) instead")
        if fusion == "rrf" and weights[0] != weights[1]:
            raise StoreError("fusion=rrf on OpenSearch 2.19 takes no weights (score-ranker-processor); "
                             f"got {weights}; use fusion=minmax for weighted fusion")
        total = float(sum(weights))
        text_query: dict[str, Any] = {"bool": {"must": [{"match": {"text": query}}], "filter": _filter_clauses(filters)}}
        body = {
            "size": k,
            "_source": False,
            # An inline (temporary) pipeline: the weights are per request, not per named pipeline.
            # arithmetic_mean wants weights summing to 1 (the ranking is the same).
            "search_pipeline": self._pipeline_body(fusion, (weights[0] / total, weights[1] / total)),
            "query": {"hybrid": {"queries": [
                {"knn": {"vector": self._knn_clause(_as_list(vector), k, filters, ef_search=ef_search)}},
                text_query,
            ]}},
        }
        # Back to the Python fusion's scale: arithmetic_mean divided by the weights' sum (1 here),
        # and the score-ranker's RRF is unweighted (1 / (rank constant + rank)).
        scale = total if fusion == "minmax" else weights[0]
        with self._filter_refusals(filters):
            hits = self._vector_hits(body, dim=len(vector))
        return [ScoredId(h["_id"], float(h["_score"]) * scale) for h in hits]

    def fetch(self, ids: Sequence[str], *, vectors: bool = True) -> list[Document]:
        """Full documents in the order asked (vectors from _source, unless `vectors=False`; NO_VECTOR for
        a document written without one); unknown ids are skipped, ids OpenSearch could not read raise."""
        if not ids:
            return []
        excludes = ["thumbnail"] if vectors else ["thumbnail", "vector"]
        what = f"fetch from {self.alias}"
        with self._read_errors(what):
            docs = self.client.mget(index=self.alias, body={"ids": list(ids)}, _source_excludes=excludes)["docs"]
        failed = [d for d in docs if "error" in d]
        if failed:
            raise self._fetch_errors(what, failed, asked=len(docs))
        known = self._models_read
        if known is not None and any(d.get("found") and d["_index"] != known.index for d in docs):
            # Read from another index than the record's (another process's rebuild moved the alias): the vectors
            # are that index's model's. The record is read again at once, as `_vector_hits` does for hits, so a
            # `like` search by one is held to its own model, and a check of the server's model refuses at once.
            self._read_models()
        found = []
        for d in docs:
            if not d.get("found"):
                continue
            src = d["_source"]
            fine = src.get("fine_vector")
            # A document an ingest pipeline wrote without the field it embeds has no `vector` at all.
            vector = src.get("vector") if vectors else None
            found.append(Document(id=d["_id"], vector=NO_VECTOR if vector is None else np.asarray(vector, dtype=np.float32),
                                  text=src.get("text", ""), metadata=src.get("metadata", {}),
                                  content_hash=src.get("content_hash", ""),
                                  fine_vector=None if fine is None else np.frombuffer(base64.b64decode(fine),
                                                                                      dtype=np.float32)))
        return found

    def thumbnail(self, doc_id: str) -> bytes | None:
        with self._read_errors(f"thumbnail of {quoted(doc_id)} from {self.alias}"):
            try:
                found = self.client.get(index=self.alias, id=doc_id, _source_includes=["thumbnail"])
            except NotFoundError as exc:
                if exc.error == "index_not_found_exception":
                    raise  # no index yet (unavailable, as `_read_errors` says), not an unknown id
                return None
        encoded = found.get("_source", {}).get("thumbnail")
        return base64.b64decode(encoded) if encoded else None

    def facets(self, *, size: int = 20) -> dict[str, FacetCounts]:
        """One terms aggregation per metadata field the mapping holds as a keyword, number or boolean."""
        with self._read_errors(f"facets of {self.alias}"):
            fields = {name: kind for name, kind in self._metadata_types().items() if kind in FACET_FIELD_TYPES}
            if not fields:
                return {}
            names = sorted(fields)
            aggregations = {f"f{i}": {"terms": {"field": f"metadata.{name}", "size": size}}
                            for i, name in enumerate(names)}
            answer = self._search({"size": 0, "aggs": aggregations}, what=f"facets of {self.alias}")["aggregations"]
        facets = {}
        for i, name in enumerate(names):
            buckets = answer[f"f{i}"]
            if not buckets["buckets"]:
                continue
            counts = FacetCounts.ranked((_facet_value(bucket, fields[name]), bucket["doc_count"])
                                        for bucket in buckets["buckets"])
            facets[name] = FacetCounts(values=counts.values, other=buckets["sum_other_doc_count"])
        return facets

    def _metadata_types(self) -> dict[str, str]:
        """The mapped type of each metadata field (keyword, long, double, boolean...) in the index behind the alias."""
        mappings = self.client.indices.get_mapping(index=self.alias)
        return {name: spec.get("type", "object") for mapping in mappings.values()
                for name, spec in mapping["mappings"].get("properties", {}).get("metadata", {})
                .get("properties", {}).items()}

    @contextlib.contextmanager
    def _filter_refusals(self, filters: Filters | None) -> Iterator[None]:
        """A filtered query OpenSearch refuses (400: a word for a field of numbers, say) as the filters' error:
        named by each filter field and what the index holds in it, which the client can fix, and not by the index,
        which is this server's own (the chained refusal still names it)."""
        try:
            yield
        except StoreQueryError as exc:
            if not filters or not isinstance(exc.__cause__, TransportError):
                raise
            with self._read_errors(f"reading the mapping of {self.alias}"):
                types = self._metadata_types()
            held = [f"metadata field {quoted(name)} holds {_FILTER_VALUES.get(types[name], f'{types[name]} values')} "
                    f"({types[name]}); " for name in filters if name in types]
            raise StoreQueryError("".join(held) + f"OpenSearch refused the query: {quoted(_root_cause(exc.__cause__))}"
                                  ) from exc

    def close(self) -> None:
        self.client.close()

    # --- check and repair ------------------------------------------------------------------

    @_as_store_errors("check")
    def check(self) -> StoreReport:
        """Read-only: the alias and its index (one, not red, its vector a knn_vector), the load lock, refresh/replica
        settings an interrupted load left relaxed, versioned indices no alias names (an
        interrupted rebuild's)."""
        report = StoreReport(location=f"OpenSearch {self.url}, alias {self.alias}")
        probe = self._lock_for("check")
        held = probe.held()
        stale = probe.stale_reason(held[0]) if held is not None else None
        if held is not None:
            body, _ = held
            report.notes.append(f"the load lock is held by the {body.get('operation')} of {body.get('owner')} since "
                                f"{when(body.get('started_at'))}" + (f"; stale ({stale}): the next load or "
                                                                       "`store repair` breaks it" if stale else ""))
        running = held is not None and stale is None
        self._inspect(report, running=running, repair=False)
        return report

    def repair(self) -> StoreReport:
        """Under the load lock (a stale one is broken): restore refresh/replica settings an
        interrupted load left relaxed, delete versioned indices no alias names. Documents are not
        touched: a rerun of `clip-sidecar index` writes whatever is missing."""
        report = StoreReport(location=f"OpenSearch {self.url}, alias {self.alias}")
        with self._load_lock("repair", lock_wait_s=0.0):
            self._inspect(report, running=False, repair=True)
        return report

    def _inspect(self, report: StoreReport, *, running: bool, repair: bool) -> None:
        indices = self.alias_indices()
        if not indices:
            report.notes.append("the alias does not exist yet (nothing indexed)")
        elif len(indices) > 1:
            report.problems.append(f"the alias points at {len(indices)} indices ({', '.join(indices)}); expected one")
        for name in indices:
            if self.client.cluster.health(index=name)["status"] == "red":
                report.problems.append(f"index {name} is red (a primary shard is unassigned)")
            found = self._mapping(name)
            if found is not None and (problem := self._vector_mapping_problem(*found)) is not None:
                report.problems.append(problem)
            saved = (self._meta(name) or {}).get(SAVED_SETTINGS_KEY)
            if saved is None:
                continue
            if repair:
                self._restore_settings(name, saved)
                report.actions.append(f"restored {saved} on {name} (relaxed by an interrupted load)")
            elif running:
                report.notes.append(f"{name} runs with relaxed settings while the load that holds the lock lasts")
            else:
                report.problems.append(f"{name} still runs with the settings an interrupted load relaxed (saved: "
                                       f"{saved}); `store repair` restores them")
        for name in self._unaliased_versions(indices):
            if repair:
                self.client.indices.delete(index=name, ignore_unavailable=True)
                report.actions.append(f"deleted {name}, a versioned index no alias names (an interrupted rebuild)")
            elif running:
                report.notes.append(f"{name} is not behind the alias (being built by the running load?)")
            else:
                report.notes.append(f"{name} is a versioned index no alias names (an interrupted rebuild); "
                                    "`store repair` deletes it")

    # --- internals -------------------------------------------------------------------------

    def _bulk(self, index: str, ops: dict[str, Document | None], *, lock: LoadLock,
              progress: Callable[[int], None] | None = None) -> tuple[int, int]:
        """Index (a Document) or delete (None) every id of `ops` through streaming_bulk until each
        one is acknowledged; returns (written, deleted), and calls `progress(1)` per document written
        as streaming_bulk yields it (a chunk's items as its response arrives).

        streaming_bulk retries per-item 429s within a chunk (max_retries, with backoff). Items still
        rejected after that stay pending and are sent again in a later round, after a backoff
        (up to retry_rounds rounds). A dropped connection, or a whole request answered 429, resumes
        with the pending ids after a backoff (connection_retries). Pending is a set of ids, not an
        offset: acknowledgements come back out of order (retried items after later ones), and
        resuming "after the last one" would skip those still unacknowledged. Any other item error
        stops the load (StoreError, its cause a BulkIndexError carrying the item errors), a 429 that is a write
        block (BLOCKED) included."""
        pending = dict(ops)
        written = deleted = rounds = drops = 0
        while pending:
            rejected = 0
            failures: list[dict[str, Any]] = []
            try:
                for ok, item in helpers.streaming_bulk(
                    self.client, self._serialised_actions(index, list(pending.items())),
                    chunk_size=self.chunk_size, max_chunk_bytes=self.max_chunk_bytes, raise_on_error=False,
                    max_retries=self.max_retries, initial_backoff=self.initial_backoff, max_backoff=30.0,
                ):
                    lock.ensure_held()
                    op, info = next(iter(item.items()))
                    status = info.get("status")
                    if ok or (op == "delete" and status == 404):
                        pending.pop(info["_id"], None)
                        if op == "index":
                            written += 1
                            if progress is not None:
                                progress(1)
                        elif info.get("result") == "deleted":
                            deleted += 1
                    elif status == 429 and info.get("error", {}).get("type") not in BLOCKED:
                        rejected += 1
                    else:
                        failures.append(item)
                        break
            except TransportError as exc:
                if not isinstance(exc, RETRYABLE) and exc.status_code != 429:
                    raise StoreError(f"bulk load into {index} failed: {exc.status_code} {exc.error}") from exc
                drops += 1
                if drops > self.connection_retries:
                    raise StoreUnavailable(f"bulk load into {index} lost the cluster at {self.url}: "
                                           f"{len(ops) - len(pending)} of {len(ops)} operations acknowledged "
                                           f"({drops - 1} retries); rerun once it answers") from exc
                delay = min(self.initial_backoff * 2 ** (drops - 1), 30.0)
                log.warning("bulk load into %s: %s; retry %d/%d in %.1fs with the %d unacknowledged operations",
                            index, exc.__class__.__name__, drops, self.connection_retries, delay, len(pending))
                time.sleep(delay)
                continue
            if failures:
                error = helpers.BulkIndexError(f"{len(failures)} document(s) failed to index.", failures)
                raise StoreError(f"bulk load into {index} failed; first error: {failures[0]}") from error
            if pending:
                rounds += 1
                if rounds > self.retry_rounds:
                    raise StoreError(f"{len(pending)} operations on {index} were still rejected (429 Too Many "
                                     f"Requests) after {rounds} rounds of retries: the cluster is overloaded; rerun "
                                     "later (only what is missing is written again)")
                delay = min(self.initial_backoff * 2 ** rounds, 30.0)
                log.warning("bulk load into %s: %d operations rejected with 429; sending them again in %.1fs "
                            "(round %d/%d)", index, rejected, delay, rounds, self.retry_rounds)
                time.sleep(delay)
        return written, deleted

    def _serialised_actions(self, index: str, ops: Sequence[tuple[str, Document | None]]) -> Iterator[dict[str, Any]]:
        """Bulk actions whose _source is already JSON, serialised one batch ahead on a second thread.

        streaming_bulk waits for each chunk's response; serialising 512 floats per document
        (~0.35 ms) in that same loop left the cluster idle meanwhile. json.dumps runs while the
        main thread blocks on the socket (GIL released), so the two overlap."""
        dumps = self.client.transport.serializer.dumps

        def serialise(batch: Sequence[tuple[str, Document | None]]) -> list[dict[str, Any]]:
            return [_index_action(index, doc, dumps=dumps) if doc is not None else
                    {"_op_type": "delete", "_index": index, "_id": doc_id} for doc_id, doc in batch]

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-serialise", initializer=name_for_the_os)
        try:
            pending: deque = deque()
            for start in range(0, len(ops), SERIALISE_BATCH):
                pending.append(pool.submit(serialise, ops[start:start + SERIALISE_BATCH]))
                if len(pending) > 2:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            # Also on a dropped connection (the resume starts a new generator): no orphan work.
            pool.shutdown(wait=False, cancel_futures=True)

    def _relax_settings(self, index: str) -> dict[str, Any]:
        """Relax refresh (bulk_refresh_interval) and replicas to 0; remember the previous values in _meta first.
        Replicas that auto-expand are fixed at 0 for the load: OpenSearch would expand them back at once."""
        meta = self._meta(index) or {}
        saved = meta.get(SAVED_SETTINGS_KEY)
        if saved is None:
            current = self._with_retry(lambda: self.client.indices.get_settings(index=index))
            settings = next(iter(current.values()))["settings"]["index"]
            saved = {"refresh_interval": settings.get("refresh_interval", "1s"),
                     "number_of_replicas": settings.get("number_of_replicas", "1"),
                     "auto_expand_replicas": settings.get("auto_expand_replicas", "false")}
            meta[SAVED_SETTINGS_KEY] = saved
            self._put_meta(meta, index=index)
        else:
            log.warning("%s still carries settings saved by an interrupted load (%s); restoring those after this one",
                        index, saved)
        self.client.indices.put_settings(index=index, body={"index": {
            "refresh_interval": self.bulk_refresh_interval, "number_of_replicas": 0, "auto_expand_replicas": "false"}})
        return saved

    def _restore_settings(self, index: str, saved: dict[str, Any], *, retry: bool = True) -> None:
        def restore() -> None:
            if int(saved.get("number_of_replicas", 0)):
                # A commit first: replicas then recover by copying its segments, HNSW graphs included,
                # instead of replaying the translog, which indexes every document a second time
                # (green in 9 s instead of 44 s at 20k x 512 on 3 nodes: bench/RESULTS.md). Replicas that
                # auto-expand saved the count they had expanded to.
                self.client.indices.flush(index=index)
            self.client.indices.put_settings(index=index, body={"index": saved})
            meta = self._meta(index) or {}
            meta.pop(SAVED_SETTINGS_KEY, None)
            self._put_meta(meta, index=index)

        try:
            if retry:
                self._with_retry(restore)
            else:
                restore()
        except OpenSearchException as exc:
            # Must not hide the load's own error; the saved values in _meta let the next load restore them.
            log.warning("could not restore %s on %s (%s); the next load, or `clip-sidecar store repair`, will",
                        saved, index, exc)

    def _with_retry(self, call: Any) -> Any:
        for attempt in range(self.connection_retries + 1):
            try:
                return call()
            except RETRYABLE:
                if attempt == self.connection_retries:
                    raise
                time.sleep(min(self.initial_backoff * 2 ** attempt, 30.0))
        return None

    def _search(self, body: dict[str, Any], *, search_type: str | None = None,
                what: str | None = None) -> dict[str, Any]:
        """OpenSearch's answer to a search of the index behind the alias, of every shard (WHOLE_INDEX) or none."""
        params = {**WHOLE_INDEX, **({"search_type": search_type} if search_type else {})}
        with self._read_errors(what or f"search on {self.alias}"):
            return self.client.search(index=self.alias, body=body, params=params)

    def _vector_hits(self, body: dict[str, Any], *, dim: int) -> list[dict[str, Any]]:
        """`_search` for a query by a `dim`-d vector, held to the record its caller checked the query's model
        against (`signature()`, read at most every REFRESH_S): another model's rebuild moves the alias onto
        an index recording that model, and a record up to REFRESH_S old would let this server's vectors
        rank the other model's (same size) or let OpenSearch refuse them (400, another size). Each hit
        names the index that answered (`_index`), so a move is seen in the answer itself, and only then
        (or on a refusal) is the mapping read again: the common path costs no request more. A record of no
        model is never cached (`_recorded_models`): the caller checked against one read just now. The record
        held to is the last one read, whatever its age: a search checked before another thread's search read
        the new record is held to the new one (it may rank the new index's vectors once: requests in flight
        while the alias moves, or while another process's first `index` claims the store)."""
        checked = self._models_read or self._read_models()
        try:
            hits = self._search(body)["hits"]["hits"]
        except StoreQueryError as exc:
            current = self._read_models()
            if current.dim is not None and current.dim != dim:
                # A caller that checked passed a model `checked` named: where the record names another one
                # now, that is the query's model; else only the vector's size is known.
                stale = checked.signature
                query: ModelSignature | int = stale if stale is not None and stale != current.signature else dim
                raise QueryModelMismatch(current.signature or current.dim, query) from exc
            raise
        if any(hit["_index"] != checked.index for hit in hits):
            current = self._read_models()
            if checked.signature is not None and current.signature not in (None, checked.signature):
                # A `like` query's stored vector read from the new index made `fetch` read the new record; one
                # read from the old index before the move is the old model's, refused here as the server's are.
                raise QueryModelMismatch(current.signature, checked.signature)
        return hits

    @contextlib.contextmanager
    def _read_errors(self, what: str) -> Iterator[None]:
        """The query path's client errors as the store's: a cluster that cannot answer now (down,
        timing out, rejecting under load, missing shards of the index), an index that cannot be read in
        its present state (none yet, closed: `_index_state`) → StoreUnavailable; a query it refuses (400)
        → StoreQueryError; anything else → StoreError."""
        try:
            yield
        except OpenSearchUnreachable as exc:
            raise StoreUnavailable(f"{what} failed: {exc}") from exc
        except TransportError as exc:
            state = self._index_state(what, exc.info.get("error") if isinstance(exc.info, dict) else None)
            if state is not None:
                raise state from exc
            if exc.status_code == 503 and (missing := _missing_shards(exc)):
                raise self._partial(what, missing) from exc
            if exc.status_code in (429, 502, 503, 504):
                # The reason names what could not answer (`No shard available for [get [index][id]…]`).
                reason = _root_cause(exc)
                said = "" if reason == exc.error else f": {quoted(reason)}"
                raise StoreUnavailable(f"{what} failed: OpenSearch at {self.url} answered {exc.status_code} "
                                       f"{exc.error}{said}") from exc
            if exc.status_code == 400:
                # The reason can hold a client's filter value whole (`For input string: "…"`): cut as one is.
                raise StoreQueryError(f"{what}: OpenSearch refused the query: {quoted(_root_cause(exc))}") from exc
            raise StoreError(f"{what} failed: {exc.status_code} {exc.error}: {exc.info}") from exc

    def _fetch_errors(self, what: str, failed: list[dict[str, Any]], *, asked: int) -> StoreError:
        """A multi-get's per-document errors as the store's: mget answers 200 with an error in place of each
        document it could not read, which skipped would read as not stored (404 for `like`, hits dropped
        from the fine stage or a page). An index that cannot be read in its present state as `_read_errors`
        says it; a shard that cannot answer now (UNAVAILABLE_ITEM_ERRORS: a red index, as a search there
        answers 503) → StoreUnavailable; anything else → StoreError. The first such document is named, with
        its index and OpenSearch's reason."""
        for d in failed:
            if (state := self._index_state(what, d["error"])) is not None:
                return state
        first, error = failed[0], failed[0]["error"]
        message = (f"{what} failed: OpenSearch at {self.url} could not read {len(failed)} of {asked} documents, the "
                   f"first {quoted(first['_id'])} of index {first.get('_index', self.alias)}: {error.get('type')}: "
                   f"{quoted(str(error.get('reason')))}")
        return StoreUnavailable(message) if error.get("type") in UNAVAILABLE_ITEM_ERRORS else StoreError(message)

    def _index_state(self, what: str, error: Any) -> StoreUnavailable | None:
        """OpenSearch's error (a response's or a multi-get item's) where it says the index behind the alias cannot
        be read in its present state, as StoreUnavailable; None for any other. No index yet (`_no_index`), or a
        closed one: OpenSearch answers 400 index_closed_exception, as to a bad request, but the request is fine
        and answers once an operator opens the index (a 502 would tell clients not to retry)."""
        kind = error.get("type") if isinstance(error, dict) else None
        if kind == "index_not_found_exception":
            return self._no_index(what)
        if kind == "index_closed_exception":
            index = error.get("index") or self.alias
            return StoreUnavailable(f"{what} failed: index {index} behind alias {self.alias} on OpenSearch at "
                                    f"{self.url} is closed: it answers no reads until it is opened "
                                    f"(`POST /{index}/_open`)")
        return None

    def _partial(self, what: str, missing: dict[str, list[int]]) -> StoreUnavailable:
        """A search refused (WHOLE_INDEX) for shards of the index that have no copy assigned (a red index)."""
        index, shards = next(iter(missing.items()))
        total = self.primary_shards()
        named = f"shard {shards[0]}" if len(shards) == 1 else f"shards {', '.join(map(str, shards))}"
        return StoreUnavailable(f"{what} failed: OpenSearch at {self.url} has no copy of {named} of index {index}: "
                                f"{total - len(shards)} of its {total} shards could answer, and the store reads all "
                                "of an index or none of it (the documents of the others would be missing without a "
                                "sign); retry once every shard is assigned (`GET _cluster/allocation/explain` says "
                                "why one is not)")

    def _no_index(self, what: str) -> StoreUnavailable:
        """A read of an alias that does not exist. A server started before its index (docker compose,
        Kubernetes): say the step, not the dump. Unavailable, not failed: the request is fine and answers
        once setup has run, so the API says 503 with Retry-After (retry), as /readyz says not ready; a 502
        would tell clients not to retry, and a 404 that the document they named is not stored."""
        return StoreUnavailable(f"{what} failed: OpenSearch at {self.url} has no index or alias {self.alias}: "
                                "run `clip-sidecar opensearch setup` (it creates them, sized for the model)")

    def _knn_clause(self, vector: list[float], k: int, filters: Filters | None, *,
                    ef_search: int | None = None) -> dict[str, Any]:
        clause: dict[str, Any] = {"vector": vector, "k": k}
        # Per query for both engines (k-NN >= 2.16); without it faiss searches at the index's
        # knn.algo_param.ef_search (100), whatever the request, the setting or the calibration asked.
        # HNSW needs at least k candidates: lucene takes max(k, ef_search) itself, faiss is given it.
        clause["method_parameters"] = {"ef_search": max(self.effort.ef_search(ef_search), k)}
        if filters:
            # Inside knn = efficient filtering (lucene, faiss): k results that all pass the filter.
            clause["filter"] = {"bool": {"filter": _filter_clauses(filters)}}
        return clause

    def _pipeline_body(self, fusion: str, weights: tuple[float, float]) -> dict[str, Any]:
        template = json.loads((self.config_dir / f"search_pipeline_{PIPELINES[fusion]}.json").read_text())
        return render_template(template, vector_weight=float(weights[0]), text_weight=float(weights[1]),
                               rank_constant=RRF_RANK_CONSTANT)

    def _create_index(self, name: str, *, dim: int, signature: ModelSignature | None,
                      fine_signature: ModelSignature | None = None, settings: dict[str, str] | None = None) -> None:
        template = json.loads((self.config_dir / "index.json").read_text())
        body = render_template(template, dim=dim, engine=self.engine, m=self.m, ef_construction=self.ef_construction,
                               number_of_shards=self.number_of_shards, **self.replicas,
                               model=signature.model if signature else "",
                               weights=signature.weights if signature else "")
        if fine_signature is not None:
            body["mappings"]["_meta"][FINE_MODEL_KEY] = dataclasses.asdict(fine_signature)
        body["settings"]["index"].update(settings or {})
        self.client.indices.create(index=name, body=body)

    def _default_pipelines(self, indices: list[str]) -> dict[str, str]:
        """The default ingest and search pipelines of the index behind the alias (`opensearch connect
        --set-defaults`, or set by hand), for the index a rebuild makes: given at creation, beside whatever
        index template of the cluster's matches it (connect makes none, which would hide the cluster's)."""
        if not indices:
            return {}
        found = self.client.indices.get_settings(index=indices[-1], flat_settings=True,
                                                 name=",".join(f"index.{key}" for key in DEFAULT_PIPELINE_SETTINGS))
        # An index with neither setting is left out of the answer.
        settings = found.get(indices[-1], {}).get("settings", {})
        return {key.removeprefix("index."): value for key, value in settings.items()}

    def _new_index_name(self) -> str:
        # Millisecond versions sort by creation; the loop guards two rebuilds in one millisecond.
        while True:
            name = f"{self.alias}-v{int(time.time() * 1000)}"
            if not self.client.indices.exists(index=name):
                return name
            time.sleep(0.002)

    def _unaliased_versions(self, behind: list[str]) -> list[str]:
        """This alias's versioned indices (`_new_index_name`) not in `behind`, sorted. Matched by the whole name:
        `<alias>-v*` also matches another alias's, e.g. `clip-vision-v…` for the alias `clip`, which are not ours to
        report or delete."""
        version = re.compile(re.escape(self.alias) + r"-v\d+")
        found = self.client.indices.get(index=f"{self.alias}-v*", filter_path="*.settings.index.provided_name")
        return sorted(name for name in found if version.fullmatch(name) and name not in behind)

    def alias_indices(self) -> list[str]:
        """The indices behind the alias, sorted; [] before the first setup or rebuild."""
        # Only the store's own versions are asked about: an index-less _alias/<name> is checked
        # against every index, which a least-privilege user may not read (roles.yml).
        versions = f"{self.alias}-v*"
        if not self.client.indices.exists_alias(index=versions, name=self.alias):
            return []
        return sorted(self.client.indices.get_alias(index=versions, name=self.alias))

    def _meta(self, index: str | None = None) -> dict[str, Any] | None:
        found = self._mapping(index)
        return None if found is None else dict(found[1].get("_meta", {}))

    def _mapping(self, index: str | None = None) -> tuple[str, dict[str, Any]] | None:
        """(the concrete index, its mapping) of `index` or of the one behind the alias; None where absent."""
        try:
            mappings = self.client.indices.get_mapping(index=index or self.alias)
        except NotFoundError:
            return None
        if len(mappings) > 1:
            raise StoreError(f"alias {self.alias} points at several indices {sorted(mappings)}; expected one")
        name, mapping = next(iter(mappings.items()))
        return name, mapping["mappings"]

    def _put_meta(self, meta: dict[str, Any], *, index: str | None = None) -> None:
        # PUT _mapping replaces _meta whole, hence read-modify-write of the full dict.
        self.client.indices.put_mapping(index=index or self.alias, body={"_meta": meta})

    def _save_effort(self, data: dict[str, Any]) -> None:
        meta = self._meta() or {}
        meta[EFFORT_KEY] = data
        self._put_meta(meta)

    def _mapping_dim(self) -> int:
        found = self._mapping()
        if found is None:
            raise StoreError(f"no index behind {self.alias}: run `clip-sidecar opensearch setup`")
        if (problem := self._vector_mapping_problem(*found)) is not None:
            raise StoreError(problem)
        return int(found[1]["properties"]["vector"]["dimension"])

    def _vector_mapping_problem(self, index: str, mapping: dict[str, Any]) -> str | None:
        """What is wrong with `index`'s `vector` field where it is no knn_vector (an index made or mapped by hand,
        or by dynamic mapping from the first document), else None: nothing of the store can use such an index."""
        kind = mapping.get("properties", {}).get("vector", {}).get("type")
        if kind == "knn_vector":
            return None
        return (f"index {index} behind alias {self.alias} maps field 'vector' as {kind or 'nothing'}, not as a "
                "knn_vector (the index was not made by clip-sidecar, or its mapping by hand): `clip-sidecar index "
                "SHARDS --rebuild` builds a new index beside it and moves the alias onto it")


@dataclasses.dataclass(frozen=True)
class _Record:
    """What the mapping of the index behind the alias records, and when it was read: `index`, the concrete
    index (None: no alias yet), as search hits name it in `_index`; `dim`, its vectors' dimension."""

    index: str | None
    signature: ModelSignature | None
    fine_signature: ModelSignature | None
    dim: int | None
    read_at: float


@dataclasses.dataclass(frozen=True)
class _Identity:
    """Who the store connects as, for error messages (never the password)."""

    url: str
    user: str
    ca_certs: str | None


class OpenSearchUnreachable(StoreUnavailable, OSConnectionError):
    """No connection to the cluster after the client's own retries (refused, timed out, a TLS handshake
    cut): a StoreUnavailable whose message names the URL and its setting, for every command and endpoint
    alike; and still the client's ConnectionError (same status, error, info), so the store's retries and
    opensearch-py's helpers, which catch that, treat it as before."""

    def __init__(self, message: str, cause: OSConnectionError):
        OSConnectionError.__init__(self, cause.status_code, cause.error, cause.info)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _SecuredTransport(Transport):
    """opensearch-py's transport, raising what no retry can fix as a StoreError that names the setting
    to change, whichever store call or helper made the request: a certificate that does not verify,
    credentials refused (401), a permission the user's role lacks (403 security_exception). A cluster
    that cannot be reached raises OpenSearchUnreachable (which the store's retries still retry)."""

    def __init__(self, hosts: Any, *, store_identity: _Identity, **kwargs: Any):
        super().__init__(hosts, **kwargs)
        self.identity = store_identity

    def perform_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        who = self.identity
        try:
            return super().perform_request(method, url, *args, **kwargs)
        except OSConnectionError as exc:  # SSLError and ConnectionTimeout included
            if isinstance(exc, SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc.error):
                # Which trust store refused it: opensearch-py's ca_certs replaces the system's CAs, not adds to them.
                trusted = (f"the CA file {who.ca_certs} only (SIDECAR_OPENSEARCH_CA_CERTS; the system CAs are not "
                           f"consulted when it is set): it must be signed by a CA in that file" if who.ca_certs else
                           "this machine's system CAs (SIDECAR_OPENSEARCH_CA_CERTS is not set): it must be signed "
                           "by one of them")
                raise StoreError(f"TLS to OpenSearch at {who.url}: {exc.error}. Its certificate was checked against "
                                 f"{trusted} and name the URL's host; set SIDECAR_OPENSEARCH_CA_CERTS to the PEM file "
                                 f"of the CA that signed it") from exc
            raise OpenSearchUnreachable(f"OpenSearch at {who.url} cannot be reached: {exc.error} (is it up? "
                                        f"SIDECAR_OPENSEARCH_URL or --opensearch-url sets where)", exc) from exc
        except AuthenticationException as exc:
            if _root_cause(exc).startswith(REMOTE_SERVICE_ERROR):
                raise  # the caller names the remote service and its answer (connect: the sidecar's key)
            if not who.user:
                raise StoreError(f"OpenSearch at {who.url} asks for credentials (401): set "
                                 f"SIDECAR_OPENSEARCH_USER and SIDECAR_OPENSEARCH_PASSWORD") from exc
            raise StoreError(f"OpenSearch at {who.url} refused the credentials of user {who.user!r} (401): check "
                             f"SIDECAR_OPENSEARCH_USER and SIDECAR_OPENSEARCH_PASSWORD") from exc
        except AuthorizationException as exc:
            if method == "HEAD" and not exc.error:
                # A HEAD answer has no body, so its 403 cannot say which permission is missing: the
                # same URL asked with GET (the same permission, indices:admin/get) names it.
                return self.perform_request("GET", url, *args, **kwargs)
            if exc.error != "security_exception":
                raise  # e.g. a cluster_block_exception (a read-only index) is a 403 too
            raise StoreError(f"OpenSearch at {who.url} refused {method} {url} to user {who.user!r}: "
                             f"{_root_cause(exc)}; the user needs the role in "
                             f"plugin_config/security/roles.yml (docs/opensearch.md)") from exc


def _url_scheme(url: str) -> str:
    """The URL's scheme, lower case ("" for "host:port"). Refuses a URL without a host, or with a port that is no
    port, naming the setting: opensearch-py parses it as here and failed on the first request with a TypeError,
    or at once with urllib's ValueError."""
    try:
        parts = urlsplit(url if "://" in url else f"//{url}")  # opensearch-py takes "host:port" as well
        host, _ = parts.hostname, parts.port
    except ValueError as exc:
        host, reason = None, str(exc)
    else:
        reason = "it names no host"
    if not host:
        raise StoreError(f"OpenSearch URL {url!r} is no URL: {reason}; set SIDECAR_OPENSEARCH_URL or "
                         "--opensearch-url to the cluster's, e.g. http://127.0.0.1:9200")
    return parts.scheme


def _check_alias(alias: str) -> None:
    """Refuse an alias OpenSearch cannot name (its rules for index and alias names), naming the setting: reads
    answered that it did not exist (run setup), and setup failed on the load lock's index or with a bare 400."""
    forbidden = sorted({char for char in alias if char in ALIAS_FORBIDDEN})
    longest = MAX_NAME_BYTES - len(f"-v{int(time.time() * 1000)}")  # `_new_index_name`'s suffix, longer than LOCK_SUFFIX
    reason = ("it is empty" if not alias else
              "it has upper-case letters" if alias != alias.lower() else
              f"it has {', '.join(map(repr, forbidden))}" if forbidden else
              f"it starts with {alias[0]!r}" if alias[0] in "_-+" else
              "it is . or .." if alias in (".", "..") else
              f"it is over {longest} bytes (OpenSearch's {MAX_NAME_BYTES}, less the '-v<version>' of its indices)"
              if len(alias.encode("utf-8")) > longest else None)
    if reason is not None:
        raise StoreError(f"OpenSearch index {alias!r} cannot be an OpenSearch alias: {reason}; set "
                         "SIDECAR_OPENSEARCH_INDEX or --opensearch-index to a lower-case name without spaces or any of "
                         f"{' '.join(sorted(ALIAS_FORBIDDEN - {' '}))}, not starting with _, - or +")


def knn_score_to_inner_product(score: float) -> float:
    """Invert k-NN's innerproduct score (ip >= 0: 1 + ip; ip < 0: 1 / (1 - ip)), same for knn and knn_score.
    The score is a float32 that OpenSearch writes as its shortest decimal: read back as that float32, as the
    embedded store's scores are float32 values, not as the float64 nearest the decimal (1.6823235 - 1.0 is
    0.6823235000000001 there; from the float32, 0.6823234558105469 exactly)."""
    computed = float(np.float32(score))
    return computed - 1.0 if computed >= 1.0 else float(np.float32(1.0 - 1.0 / computed))


def render_template(template: Any, **values: Any) -> Any:
    """Replace every string "{{name}}" in a JSON template with values[name], keeping its type."""
    if isinstance(template, dict):
        return {key: render_template(v, **values) for key, v in template.items()}
    if isinstance(template, list):
        return [render_template(v, **values) for v in template]
    if isinstance(template, str) and template.startswith("{{") and template.endswith("}}"):
        key = template[2:-2]
        if key not in values:
            raise KeyError(f"template placeholder {template} has no value; given: {', '.join(sorted(values))}")
        return copy.deepcopy(values[key])
    return template


def _signature_in(meta: dict[str, Any]) -> ModelSignature | None:
    if not meta.get("model"):
        return None
    return ModelSignature(model=meta["model"], weights=meta.get("weights", ""), dim=int(meta["dim"]))


def _fine_signature_in(meta: dict[str, Any]) -> ModelSignature | None:
    fine = meta.get(FINE_MODEL_KEY)
    return ModelSignature(**fine) if fine else None


def _root_cause(exc: TransportError) -> str:
    """OpenSearch's first root-cause reason (e.g. 'failed to create query: For input string: "big"'), else
    its error's reason (a search on a red index lists no root cause: 'all shards failed'), else the first reason
    of its chain of causes (a search refused for missing shards has an empty one), else its type."""
    error = exc.info.get("error") if isinstance(exc.info, dict) else None
    if not isinstance(error, dict):
        return str(exc.error)
    causes = error.get("root_cause") or [{}]
    return str(causes[0].get("reason") or next((reason for reason in _reasons(error) if reason), exc.error))


def _reasons(error: Any) -> Iterator[str]:
    """The reasons of an OpenSearch error and of its causes (`caused_by`), outermost first."""
    while isinstance(error, dict):
        yield str(error.get("reason") or "")
        error = error.get("caused_by")


def _missing_shards(exc: TransportError) -> dict[str, list[int]]:
    """index -> the shard numbers a search was refused for (WHOLE_INDEX) as they have no copy assigned, as the
    error's reasons list them; {} for another error."""
    missing: dict[str, list[int]] = {}
    for reason in _reasons(exc.info.get("error") if isinstance(exc.info, dict) else None):
        if (listed := MISSING_SHARDS.search(reason)) is not None:
            for index, shard in SHARD.findall(listed.group(1)):
                missing.setdefault(index, []).append(int(shard))
            break
    return missing


def _facet_value(bucket: dict[str, Any], field_type: str) -> Any:
    """A terms bucket's key as the value a filter takes: booleans come back as 1/0 with key_as_string."""
    if field_type == "boolean":
        return bucket["key_as_string"] == "true"
    return bucket["key"]


def _filter_clauses(filters: Filters | None) -> list[dict[str, Any]]:
    clauses = []
    for field_name, value in (filters or {}).items():
        path = f"metadata.{field_name}"
        if isinstance(value, (list, tuple, set)):
            clauses.append({"terms": {path: list(value)}})
        else:
            clauses.append({"term": {path: value}})
    return clauses


def _index_action(index: str, doc: Document, *, dumps: Any = None) -> dict[str, Any]:
    """The bulk action for one document; with `dumps`, its _source is already a JSON string."""
    source = {"id": doc.id, "vector": _as_list(doc.vector), "text": doc.text,
              "metadata": dict(doc.metadata), "content_hash": doc.content_hash}
    if doc.fine_vector is not None:
        source["fine_vector"] = base64.b64encode(np.asarray(doc.fine_vector, dtype=np.float32).tobytes()).decode("ascii")
    if doc.thumbnail:
        source["thumbnail"] = base64.b64encode(doc.thumbnail).decode("ascii")
    return {"_op_type": "index", "_index": index, "_id": doc.id, "_source": dumps(source) if dumps else source}


def _as_list(vector: np.ndarray) -> list[float]:
    return np.asarray(vector, dtype=np.float32).ravel().tolist()


def _batches(items: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class _OpenSearchLoad:
    """A load session of the OpenSearch store (`OpenSearchStore.bulk_load`)."""

    def __init__(self, store: OpenSearchStore, lock: LoadLock):
        self.store = store
        self.lock = lock
        self.depth = 0  # sessions joined to this one (an upsert inside an `index` run's session)
        self.written: set[str] = set()
        self._relaxed: tuple[str, dict[str, Any]] | None = None

    def expect(self, count: int) -> None:
        """Relax refresh and replicas once, for the whole session, when it is a large load; else restore what a
        killed load left relaxed (a large one restores it as it ends), or nothing would until `store repair`."""
        store = self.store
        if self._relaxed is not None:
            return
        indices = store.alias_indices()
        if len(indices) != 1:
            return
        if count >= store.large_load_threshold:
            self._relaxed = (indices[0], store._relax_settings(indices[0]))
            log.info("large load (%d documents) into %s: refresh_interval %s and 0 replicas until it ends",
                     count, indices[0], store.bulk_refresh_interval)
        elif (saved := (store._meta(indices[0]) or {}).get(SAVED_SETTINGS_KEY)) is not None:
            log.warning("%s still runs with the settings an interrupted load relaxed; restoring %s", indices[0], saved)
            store._restore_settings(indices[0], saved)

    def restore(self, *, retry: bool = True) -> None:
        if self._relaxed is not None:
            self.store._restore_settings(*self._relaxed, retry=retry)
            self._relaxed = None

    def finish(self) -> None:
        """Make the session's writes searchable, and check that none went missing."""
        store = self.store
        if not store.alias_indices():
            return
        store.client.indices.refresh(index=store.alias)
        total = store.count()
        if total < len(self.written):
            raise StoreError(f"after writing {len(self.written)} unique ids, {store.alias} counts only {total} "
                             "documents")
