"""One version of the embedded store, in one directory: SQLite (documents, metadata, thumbnails), a tantivy
BM25 index, memmapped float32 vectors and a FAISS HNSW graph over them; its reads, writes, check and repair."""


from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import faiss
import numpy as np
from tqdm import tqdm

from sidecar.errors import quoted
from sidecar.sqlite_files import unreadable
from sidecar.stores.base import (
    FacetCounts,
    ModelMismatchError,
    QueryModelMismatch,
    StoreDamaged,
    StoreError,
    StoreQueryError,
    StoreReport,
)
from sidecar.stores.bm25 import Bm25Index, Bm25Snapshot, Bm25Writer, query_terms, text_hash
from sidecar.stores.effort import EffortPolicy
from sidecar.stores.embedded.exact import EXACT_CHUNK_ROWS, exact_all, exact_over_rows, merged
from sidecar.types import NO_VECTOR, Document, Filters, ModelSignature, ScoredId

log = logging.getLogger(__name__)

DB_FILE = "store.sqlite"
VECTORS_FILE = "vectors.f32"
LOCK_FILE = "write.lock"
BM25_DIR = "bm25"
CALIBRATION_FILE = "calibration.json"  # the search effort chosen for a recall target (sidecar.stores.effort)
# Format 3 keeps BM25 in a tantivy index (bm25/) instead of SQLite FTS5; format 2 records
# `hnsw_rows`: the graph covers rows below it, later rows are searched exactly. Format 1 and 2
# stores are read: opening one builds its BM25 index (and drops the FTS5 table); format 1's graph
# covered every row. An older reader refuses a newer format instead of misreading it.
_FORMAT_VERSION = "3"
_READABLE_FORMATS = ("1", "2", "3")
# Rows per HNSW add call: bounds the float32 copies handed to faiss.
_HNSW_ADD_BATCH = 16_384
# Stay well under SQLite's host-parameter limit.
_SQL_BATCH = 500
MAX_READ_RETRIES = 5
# Graph vectors compared with vectors.f32 by `check` (a sample: the graph holds a copy of every row).
_CHECK_SAMPLE_ROWS = 1024
# SQLite leaves the write-ahead log at the largest size one transaction gave it (an `index` batch of
# 10,000 documents with thumbnails: ~40-100 MB) for as long as any connection, a server's say, stays
# open; with a limit it cuts the file back when the log next starts over.
_WAL_SIZE_LIMIT = 8 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    fine_vector BLOB,
    thumbnail BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS docs_live_id ON docs(id) WHERE deleted = 0;
CREATE INDEX IF NOT EXISTS docs_dead ON docs(row) WHERE deleted = 1;
"""


@dataclasses.dataclass(frozen=True, slots=True)
class _State:
    """One committed generation, as this process sees it: immutable, shared by every reader of
    that generation (a writer builds a new one, never changes this one)."""

    generation: int
    n_rows: int
    dim: int | None
    signature: ModelSignature | None
    fine_signature: ModelSignature | None  # the fine model of the documents' fine vectors, where recorded
    hnsw_file: str | None
    hnsw_rows: int  # the graph covers rows below this; live rows from here on are searched exactly
    hnsw_dead: int  # tombstoned rows still inside the HNSW graph
    live: np.ndarray  # bool per row number
    live_bits: np.ndarray  # `live` packed for faiss.IDSelectorBitmap, built once per generation
    tail: np.ndarray  # live rows >= hnsw_rows (not in the graph yet)
    vectors: np.ndarray  # (n_rows, dim) float32, memmapped
    index: Any  # faiss.IndexIDMap over IndexHNSWFlat (ids are row numbers), or None when empty
    bm25: Bm25Snapshot  # the BM25 index as of bm25_opstamp
    bm25_opstamp: int  # the tantivy commit `bm25` shows (the generation's own, unless a write was cut off)


class _Bm25OutOfStep(Exception):
    """The BM25 index's committed opstamp is not the one this generation names (a writer is between
    its tantivy commit and its SQLite commit, or was killed there)."""


@dataclasses.dataclass
class _Write:
    """A write transaction: the connection, the state it started from, the state it commits, and the
    BM25 writer, opened on first use and committed just before SQLite commits."""

    conn: sqlite3.Connection
    state: _State
    stack: contextlib.ExitStack
    bm25_index: Bm25Index
    committed: _State | None = None
    _bm25: Bm25Writer | None = None

    def bm25(self) -> Bm25Writer:
        if self._bm25 is None:
            self._bm25 = self.stack.enter_context(self.bm25_index.writer())
        return self._bm25

    @property
    def bm25_pending(self) -> bool:
        return self._bm25 is not None and self._bm25.pending


@dataclasses.dataclass
class _Findings:
    """What `_inspect` read from the files; `check` reports it, `repair` acts on it."""

    sqlite: str = "ok"
    n_rows: int = 0
    dim: int | None = None
    rows_problem: str | None = None
    vector_rows: int = 0  # complete rows in vectors.f32
    extra_bytes: int = 0  # past the committed rows: an interrupted append
    bad_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    graph_problems: list[str] = dataclasses.field(default_factory=list)
    tail_rows: int = 0
    graph_tombstones: int = 0  # deleted rows in the graph, where over rebuild_tombstone_fraction (else 0)
    leftovers: list[str] = dataclasses.field(default_factory=list)
    bm25_problems: list[str] = dataclasses.field(default_factory=list)


class EmbeddedLoad:
    """The embedded store's `BulkLoad`: nothing to prepare; the graph is saved when the session ends."""

    def expect(self, count: int) -> None:
        return None


class VersionStore:
    """One version of the embedded store (`EmbeddedStore` follows the current one): the Store protocol's
    reads and writes, over one directory.

    Layout of `path`: `store.sqlite` (WAL, synchronous=FULL; meta, docs with tombstones and the
    fine-ranking model's vectors as blobs), `bm25/` (a tantivy index of the live rows' texts, keyed
    by row number: BM25 with top-k pruning, `sidecar.stores.bm25`),
    `vectors.f32` (append-only float32 rows, row number = SQLite row), `hnsw.<generation>.faiss`
    (the ANN graph over rows below `hnsw_rows`, ids = row numbers), `calibration.json` (the search
    effort), `write.lock` (fcntl lock serialising writer processes), `read.lock` (`EmbeddedStore`'s:
    held shared by every process that has this version open).

    Writes: every upsert or delete commits its rows at once (vectors fsynced, then SQLite), but the
    HNSW graph is brought up to date and saved only when a `bulk_load` session ends (an upsert
    outside one is a session of its own): an `index` run of many batches writes the graph file
    once, not once per batch. Rows the graph does not cover yet are searched exactly, so every
    committed row answers searches at once. A new graph file is written and fsynced under a new
    name before the commit that names it; the old one is removed only after that commit is on
    disk. The BM25 index commits just before SQLite does, and SQLite records that commit's opstamp
    in the same transaction: a reader's BM25 searcher is checked against it, and a write that finds
    the index out of step (a process killed between the two commits) first rebuilds it from the
    live rows. A process killed at any point leaves the last committed generation readable.

    Reads take no lock: each thread reads through its own SQLite connection, in a read
    transaction, against the immutable `_State` of that transaction's generation, so readers
    never wait for each other or for a writer.

    `m` and `ef_construction` apply to graphs built by this instance; `ef_search` applies to every
    query that names none, unless `target_recall` is set and `calibration.json` holds a calibration
    for it (`effort`: the calibrated efSearch, or exact search). The HNSW graph is rebuilt from the live rows when tombstones exceed
    `rebuild_tombstone_fraction` of it. Filtered vector searches whose candidates number at most
    `exact_filter_rows` are answered exactly. `progress`: a progress bar while the graph is built or
    extended (a command's; minutes for millions of rows), never in a server.
    """

    def __init__(
        self,
        path: Path,
        *,
        m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        rebuild_tombstone_fraction: float = 0.2,
        exact_filter_rows: int = 20_000,
        target_recall: float = 0.0,
        target_k: int = 10,
        progress: bool = False,
    ) -> None:
        for label, value in (("m", m), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            _require_positive_int(label, value)
        _require_positive_int("exact_filter_rows", exact_filter_rows)
        if not 0.0 < rebuild_tombstone_fraction <= 1.0:
            raise ValueError(f"rebuild_tombstone_fraction must be in (0, 1], got {rebuild_tombstone_fraction}")
        self.path = Path(path)
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.rebuild_tombstone_fraction = rebuild_tombstone_fraction
        self.exact_filter_rows = exact_filter_rows
        self.progress = progress
        self.effort = EffortPolicy(target_recall=target_recall, k=target_k, default_ef=ef_search,
                                   load=self._load_calibration, save=self._save_calibration)
        self.path.mkdir(parents=True, exist_ok=True)
        self._closed = False
        self._state: _State | None = None  # the newest generation loaded; readers of older ones keep theirs
        self._state_lock = threading.Lock()  # one thread loads a new generation, the others reuse it
        self._write_lock = threading.Lock()  # writer threads of this process (write.lock: other processes)
        self._sessions = 0
        self._sessions_lock = threading.Lock()
        self._local = threading.local()
        # (generation, every field's counts, the kinds of value each holds: `_FILTER_KINDS`' names)
        self._facets: tuple[int, dict[str, FacetCounts], dict[str, frozenset[str]]] | None = None
        self._readers: list[sqlite3.Connection] = []
        self._refuse_lost_documents()
        self._writer = self._connect()
        self._bm25: Bm25Index
        try:
            # A commit is on disk when COMMIT returns (WAL fsynced), before an old graph file is removed.
            self._writer.execute("PRAGMA synchronous = FULL")  # the first statement that reads the file
            self._initialise()
        except BaseException as exc:
            self._writer.close()
            if isinstance(exc, sqlite3.DatabaseError) and unreadable(exc):
                raise self.unreadable_error(exc) from exc
            raise

    # -- lifecycle -------------------------------------------------------------------------

    def _refuse_lost_documents(self) -> None:
        """Refuse a store.sqlite that is missing or empty beside the files a version writes only once it holds
        its schema: SQLite would begin an empty database there (deleting the write-ahead log beside an empty
        one), which reads as a consistent store of no documents, and over whose vectors an `index` writes its own."""
        database = self.path / DB_FILE
        try:
            size: int | None = database.stat().st_size
        except FileNotFoundError:
            size = None
        if not size and (written := written_beside_database(self.path)):
            raise self._damaged(f"is {'missing' if size is None else 'empty'}, though the folder holds the "
                                f"store's {', '.join(written)}")
        if size:
            # A file whose header is not SQLite's: refused before SQLite opens it, whose closing connection
            # deletes the write-ahead log beside it (commits a recovery of the file could still use).
            with database.open("rb") as handle:
                if handle.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
                    raise self._damaged("is not a readable SQLite database (file is not a database)")  # SQLite's words

    def unreadable_error(self, exc: sqlite3.DatabaseError) -> StoreDamaged:
        """The error for SQLite's refusal of store.sqlite's contents (`sqlite_files.unreadable`), at opening or
        in a later read: a damaged page past the header opens, and fails the first statement that reads it."""
        return self._damaged(f"is not a readable SQLite database ({exc})")

    def _damaged(self, what: str) -> StoreDamaged:
        # Only reported: the file holds the user's documents (where readable at all), never moved aside or begun anew.
        return StoreDamaged(
            f"embedded store {self.path}",
            f"{self.path / DB_FILE} {what}: the store's documents cannot be read, and `clip-sidecar store repair` "
            "cannot rebuild them (it rebuilds the HNSW graph and the BM25 index from them). Restore the file "
            f"from a backup, or {REINDEX_ADVICE}")

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False only so that close() may close every thread's connection.
        conn = sqlite3.connect(self.path / DB_FILE, isolation_level=None, check_same_thread=False, timeout=60.0)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        return conn

    def _initialise(self) -> None:
        conn = self._writer
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if not exists:
            # Creating the schema is a write: take the writer lock so two processes creating the
            # same store at once do not race.
            with self._file_lock():
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # executescript() would COMMIT first; run statement by statement inside our transaction.
                    for statement in _SCHEMA.split(";\n"):
                        if statement.strip():
                            conn.execute(statement)
                    for key, value in (("format", _FORMAT_VERSION), ("generation", "0"), ("n_rows", "0"),
                                       ("hnsw_rows", "0"), ("hnsw_dead", "0")):
                        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
                    conn.execute("COMMIT")
                except BaseException:
                    _roll_back(conn)
                    raise
        row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is None or row[0] not in _READABLE_FORMATS:
            found = None if row is None else row[0]
            newer = found is not None and found.isdigit() and int(found) > int(_FORMAT_VERSION)
            raise StoreError(f"{self.path} holds embedded-store format {found!r}; this version reads "
                             f"{', '.join(map(repr, _READABLE_FORMATS))}"
                             + (": a newer clip-sidecar wrote it, upgrade clip-sidecar to open it" if newer else ""))
        columns = {column for _, column, *_ in conn.execute("PRAGMA table_info(docs)")}
        # Stores made before fine ranking, or before thumbnails: the column is NULL for every existing document.
        for column in ("fine_vector", "thumbnail"):
            if column not in columns:
                with self._file_lock():
                    conn.execute(f"ALTER TABLE docs ADD COLUMN {column} BLOB")
        self._open_bm25()

    def _open_bm25(self) -> None:
        """Open the BM25 index; a new store, or one of format 1 or 2 (BM25 in SQLite FTS5), gets it
        built from its live rows here, once, under the writer lock. So does an index tantivy cannot open
        (a file of it lost or cut short: a power loss, a copy of the store that did not finish): it holds
        nothing SQLite does not, and every command, `store check` and `store repair` included, failed on it."""
        conn = self._writer
        folder = self.path / BM25_DIR

        def current() -> bool:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            return meta["format"] == _FORMAT_VERSION and "bm25_opstamp" in meta and (folder / "meta.json").exists()

        if current():
            # Unopenable outside the lock may be a writer's commit removing the files of the commit read: judged below.
            with contextlib.suppress(ValueError):
                self._bm25 = Bm25Index(folder)
                return
        with self._file_lock():
            conn.execute("BEGIN IMMEDIATE")
            try:
                if current():  # another process built it meanwhile, or the index is damaged
                    try:
                        self._bm25 = Bm25Index(folder)
                    except ValueError as exc:  # tantivy's error for a damaged index; no writer runs meanwhile
                        log.warning("the BM25 index of %s cannot be opened (%s): building it again from the "
                                    "documents", self.path, exc)
                        shutil.rmtree(folder)
                    else:
                        conn.execute("COMMIT")
                        return
                self._bm25 = Bm25Index(folder)
                live = conn.execute("SELECT count(*) FROM docs WHERE deleted = 0").fetchone()[0]
                if live:
                    log.info("building the BM25 index of %s from %d documents", self.path, live)
                self._rebuild_bm25(conn)
                conn.execute("DROP TABLE IF EXISTS docs_fts")
                generation = int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
                conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?) "
                                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                                 [("format", _FORMAT_VERSION), ("generation", str(generation + 1))])
                conn.execute("COMMIT")
            except BaseException:
                _roll_back(conn)
                raise

    def _rebuild_bm25(self, conn: sqlite3.Connection) -> int:
        """Write the BM25 index anew from the live rows (in the caller's write transaction) and
        record its opstamp."""
        with self._bm25.writer() as writer:
            writer.replace_all(conn.execute("SELECT row, text FROM docs WHERE deleted = 0 ORDER BY row"))
            opstamp = writer.commit()
        conn.execute("INSERT INTO meta(key, value) VALUES ('bm25_opstamp', ?) "
                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(opstamp),))
        return opstamp

    def close(self) -> None:
        with self._write_lock, self._state_lock:
            if self._closed:
                return
            self._closed = True
            for conn in [self._writer, *self._readers]:
                conn.close()
            self._readers.clear()
            self._state = None

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (SQLite connections must not be shared by concurrent threads)."""
        if self._closed:
            raise StoreError(f"embedded store at {self.path} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            with self._state_lock:
                if self._closed:
                    conn.close()
                    raise StoreError(f"embedded store at {self.path} is closed")
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    # -- snapshots and locking ----------------------------------------------------------------

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        with open(self.path / LOCK_FILE, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _read(self) -> Iterator[tuple[sqlite3.Connection, _State]]:
        """A consistent snapshot without a lock: this thread's SQLite read transaction + the
        vectors/HNSW of that transaction's generation."""
        conn = self._reader()
        missing: FileNotFoundError | None = None
        for attempt in range(MAX_READ_RETRIES):
            conn.execute("BEGIN")
            try:
                state = self._snapshot(conn, strict_bm25=attempt < MAX_READ_RETRIES - 1)
            except FileNotFoundError as exc:
                # A writer committed a newer graph and removed ours after our snapshot began;
                # a fresh snapshot names the file that exists now.
                conn.execute("ROLLBACK")
                missing = exc
                continue
            except _Bm25OutOfStep:
                # A writer is between its BM25 commit and its SQLite commit: the latter follows
                # within milliseconds, and a fresh snapshot sees both.
                conn.execute("ROLLBACK")
                time.sleep(0.005 * (attempt + 1))
                continue
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                yield conn, state
            finally:
                conn.execute("ROLLBACK")
            return
        raise self._graph_missing(missing)

    def _graph_missing(self, missing: FileNotFoundError | None) -> StoreError:
        name = Path(missing.filename).name if missing is not None and missing.filename else "file"
        return StoreError(f"{self.path}: the graph file {name} named by the committed generation is missing; "
                          "run `clip-sidecar store repair` (it rebuilds the graph from the stored vectors)")

    def _snapshot(self, conn: sqlite3.Connection, *, strict_bm25: bool = True) -> _State:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        generation = int(meta["generation"])
        cached = self._state
        if cached is not None and cached.generation == generation:
            return cached
        with self._state_lock:
            cached = self._state
            if cached is not None and cached.generation == generation:
                return cached
            state = self._load_state(conn, meta, cached, strict_bm25=strict_bm25)
            if cached is None or generation > cached.generation:
                self._state = state
            return state

    def _load_state(self, conn: sqlite3.Connection, meta: dict[str, str], cached: _State | None, *,
                    load_graph: bool = True, strict_bm25: bool = True) -> _State:
        n_rows = int(meta["n_rows"])
        dim = int(meta["dim"]) if "dim" in meta else None
        signature, fine_signature = (ModelSignature(**json.loads(meta[key])) if key in meta else None
                                     for key in ("signature", "fine_signature"))
        hnsw_file = meta.get("hnsw_file")
        hnsw_rows = _hnsw_rows(meta)
        if cached is not None and cached.index is not None and cached.hnsw_file == hnsw_file:
            index = cached.index
        elif hnsw_file is not None and load_graph:
            index = self._read_graph(hnsw_file)
        else:
            index = None
        bm25, bm25_opstamp = self._bm25_snapshot(int(meta["bm25_opstamp"]), cached, strict=strict_bm25)
        live = np.ones(n_rows, dtype=bool)
        dead = np.fromiter((r for (r,) in conn.execute("SELECT row FROM docs WHERE deleted = 1")), dtype=np.int64)
        live[dead] = False
        return _State(
            generation=int(meta["generation"]), n_rows=n_rows, dim=dim, signature=signature,
            fine_signature=fine_signature, hnsw_file=hnsw_file,
            hnsw_rows=hnsw_rows, hnsw_dead=int(meta["hnsw_dead"]), live=live, live_bits=_pack_bits(live),
            tail=np.flatnonzero(live[hnsw_rows:]).astype(np.int64) + hnsw_rows,
            vectors=self._map_vectors(n_rows, dim), index=index, bm25=bm25, bm25_opstamp=bm25_opstamp,
        )

    def _bm25_snapshot(self, expected: int, cached: _State | None, *, strict: bool) -> tuple[Bm25Snapshot, int]:
        """A BM25 searcher showing the commit `expected` (the generation's own). The committed opstamp
        is read before and after taking the searcher: equal to `expected` both times, the searcher
        shows that commit. Otherwise _Bm25OutOfStep (the caller retries on a fresh snapshot), or,
        with strict=False, the searcher as it is: searches keep to the generation's live rows, but
        miss what the interrupted write already deleted from it, until a write or `repair` rebuilds it."""
        if cached is not None and cached.bm25_opstamp == expected:
            return cached.bm25, expected
        try:
            before = self._bm25.committed_opstamp()
            snapshot = self._bm25.snapshot()
            after = self._bm25.committed_opstamp()
        except (OSError, ValueError) as exc:  # a merge removed segment files while we reloaded
            if strict:
                raise _Bm25OutOfStep(str(exc)) from exc
            raise StoreError(f"{self.path}: the BM25 index cannot be read ({exc}); run `clip-sidecar store repair`") \
                from exc
        if before == after == expected:
            return snapshot, expected
        if strict:
            raise _Bm25OutOfStep(f"BM25 index at commit {after}, generation expects {expected}")
        log.warning("the BM25 index of %s is at commit %d but the committed generation names %d (a write was cut "
                    "off between its two commits); text searches keep to the generation's live rows, and the next "
                    "write or `clip-sidecar store repair` rebuilds it", self.path, after, expected)
        return snapshot, after

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Write]:
        """Exclusive writer: this process's writer lock, the fcntl lock across processes, then an
        IMMEDIATE SQLite transaction. BM25 changes commit just before SQLite, which records their
        opstamp. The state it commits is published to readers only after COMMIT."""
        with self._write_lock, self._file_lock(), contextlib.ExitStack() as stack:
            if self._closed:
                raise StoreError(f"embedded store at {self.path} is closed")
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                try:
                    write = self._begin_write(conn, stack)
                except FileNotFoundError as exc:  # under the writer lock no writer removed it: it is lost
                    raise self._graph_missing(exc) from exc
                yield write
                if write.bm25_pending:
                    opstamp = write.bm25().commit()
                    if write.committed is None:
                        self._commit(write)
                    write.committed = dataclasses.replace(write.committed, bm25=self._bm25.snapshot(),
                                                          bm25_opstamp=opstamp)
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'bm25_opstamp'", (str(opstamp),))
                conn.execute("COMMIT")
            except BaseException:
                _roll_back(conn)
                raise
            if write.committed is not None:
                with self._state_lock:
                    self._state = write.committed
                self._remove_leftovers(keep=write.committed.hnsw_file)

    def _begin_write(self, conn: sqlite3.Connection, stack: contextlib.ExitStack) -> _Write:
        """The write's starting state; a BM25 index out of step with the committed generation (a
        writer killed between its two commits) is rebuilt first, in a generation of its own."""
        recorded = int(conn.execute("SELECT value FROM meta WHERE key = 'bm25_opstamp'").fetchone()[0])
        found = self._bm25.committed_opstamp()
        if found == recorded:
            return _Write(conn=conn, state=self._snapshot(conn), stack=stack, bm25_index=self._bm25)
        log.warning("the BM25 index of %s is at commit %d, the committed generation names %d (a write was cut off "
                    "between its two commits): rebuilding it from the live rows", self.path, found, recorded)
        opstamp = self._rebuild_bm25(conn)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        state = self._load_state(conn, meta, self._state)
        write = _Write(conn=conn, state=state, stack=stack, bm25_index=self._bm25)
        self._commit(write, bm25_opstamp=opstamp)
        return write

    def _commit(self, write: _Write, **changes: Any) -> None:
        """Record a new generation with `changes` applied to the state the write has reached."""
        state = write.committed or write.state
        generation = state.generation + 1
        new = dataclasses.replace(state, generation=generation, **changes)
        if "live" in changes:
            new = dataclasses.replace(new, live_bits=_pack_bits(new.live))
        if "live" in changes or "hnsw_rows" in changes:
            tail = np.flatnonzero(new.live[new.hnsw_rows:]).astype(np.int64) + new.hnsw_rows
            new = dataclasses.replace(new, tail=tail)
        values: dict[str, object] = {"format": _FORMAT_VERSION, "generation": generation, "n_rows": new.n_rows,
                                     "hnsw_rows": new.hnsw_rows, "hnsw_dead": new.hnsw_dead,
                                     "bm25_opstamp": new.bm25_opstamp}
        if new.dim is not None:
            values["dim"] = new.dim
        for key in ("signature", "fine_signature"):
            if getattr(new, key) is not None:
                values[key] = json.dumps(dataclasses.asdict(getattr(new, key)))
        if new.hnsw_file is not None:
            values["hnsw_file"] = new.hnsw_file
        write.conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [(key, str(value)) for key, value in values.items()],
        )
        write.committed = new

    def _read_graph(self, name: str) -> faiss.Index:
        """The graph file `name`; FileNotFoundError if a writer has removed it (a reader's cue to take a
        fresh snapshot). Python opens the file, not faiss: a removal between a check and faiss's own
        open surfaced as faiss's RuntimeError, which no reader retried, and once the file is open here
        a removal cannot cut the read short."""
        with open(self.path / name, "rb") as handle:
            return faiss.read_index(faiss.PyCallbackIOReader(handle.read))

    def _map_vectors(self, n_rows: int, dim: int | None) -> np.ndarray:
        if n_rows == 0 or dim is None:
            return np.zeros((0, dim or 0), dtype=np.float32)
        file = self.path / VECTORS_FILE
        size = file.stat().st_size if file.exists() else 0
        if size < n_rows * dim * 4:
            raise StoreError(f"{file} holds {size // (dim * 4)} of the {n_rows} committed rows' vectors; run "
                             "`clip-sidecar store repair` (it removes the documents whose vectors were lost, "
                             "and a rerun of `clip-sidecar index` writes them again)")
        # Map only the committed rows: a writer may be appending past them right now.
        return np.memmap(file, dtype=np.float32, mode="r", shape=(n_rows, dim))

    def _remove_leftovers(self, *, keep: str | None) -> list[str]:
        """Graph files other than the committed one, and temporary files of interrupted writes.
        Called under the write lock, after the commit that stopped naming them is on disk."""
        removed = []
        for file in [*self.path.glob("hnsw.*"), *self.path.glob("*.tmp")]:
            if file.name != keep:
                # Readers that already loaded a graph keep their copy; late readers retry on a new snapshot.
                file.unlink(missing_ok=True)
                removed.append(file.name)
        return removed

    # -- model signature -----------------------------------------------------------------------

    def signature(self) -> ModelSignature | None:
        with self._read() as (_, state):
            return state.signature

    def fine_signature(self) -> ModelSignature | None:
        with self._read() as (_, state):
            return state.fine_signature

    def claim(self, signature: ModelSignature, *, fine_signature: ModelSignature | None = None) -> None:
        given = {"signature": signature, **({"fine_signature": fine_signature} if fine_signature is not None else {})}
        for name, value in given.items():
            if not isinstance(value, ModelSignature):
                raise TypeError(f"claim expects {name} to be a ModelSignature, got {type(value).__name__}")
            _require_positive_int(f"{name}.dim", value.dim)
        with self._write() as write:
            state = write.state
            changes: dict[str, Any] = {}
            if state.signature is not None:
                if state.signature != signature:
                    raise ModelMismatchError(state.signature, signature)
            elif state.dim is not None and state.dim != signature.dim:
                raise ValueError(
                    f"vector dimension mismatch: store holds {state.dim}-d vectors, "
                    f"got {signature.dim}-d model {signature.describe()}"
                )
            else:
                changes.update(signature=signature, dim=signature.dim)
            if fine_signature is not None:
                if state.fine_signature is None:
                    changes["fine_signature"] = fine_signature
                elif state.fine_signature != fine_signature:
                    raise ModelMismatchError(state.fine_signature, fine_signature, fine=True)
            if changes:
                self._commit(write, **changes)

    # -- writes ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def bulk_load(self) -> Iterator[EmbeddedLoad]:
        """A loading session: rows commit as they are written; the HNSW graph is brought up to date
        and saved once, when the outermost session of this store object ends without an error (after
        an error or a kill, the next session or `repair` does it). Writers of several processes
        serialise on write.lock per write (`EmbeddedStore.bulk_load` adds the load lock)."""
        with self._sessions_lock:
            self._sessions += 1
        ok = False
        try:
            yield EmbeddedLoad()
            ok = True
        finally:
            with self._sessions_lock:
                self._sessions -= 1
                last = self._sessions == 0
            if ok and last:
                self._update_graph()

    def upsert(self, documents: Sequence[Document]) -> int:
        docs = _dedupe_last_wins(documents)
        if not docs:
            return 0
        matrix = _stack_document_vectors(docs)
        rows_payload = [_document_row(doc) for doc in docs]
        with self.bulk_load(), self._write() as write:
            state = write.state
            expected = state.dim if state.dim is not None else matrix.shape[1]
            if matrix.shape[1] != expected:
                raise ValueError(_dim_message(expected, matrix.shape[1], state.signature))
            old_rows = self._live_rows_for(write.conn, [doc.id for doc in docs])
            start = state.n_rows
            self._append_vectors(start, matrix)
            self._tombstone(write.conn, old_rows)
            write.conn.executemany(
                "INSERT INTO docs(row, id, text, metadata, content_hash, fine_vector, thumbnail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(start + i, *payload) for i, payload in enumerate(rows_payload)],
            )
            # Dead rows leave the BM25 index so its statistics describe live documents only.
            write.bm25().delete(old_rows)
            write.bm25().add(range(start, start + len(docs)), [doc.text for doc in docs])
            n_rows = start + len(docs)
            live = np.concatenate([state.live, np.ones(len(docs), dtype=bool)])
            live[old_rows] = False
            self._commit(write, n_rows=n_rows, dim=expected, live=live, vectors=self._map_vectors(n_rows, expected),
                         hnsw_dead=state.hnsw_dead + int((old_rows < state.hnsw_rows).sum()))
        return len(docs)

    def delete(self, ids: Sequence[str]) -> int:
        wanted = list(dict.fromkeys(_validate_ids(ids)))
        if not wanted:
            return 0
        with self.bulk_load(), self._write() as write:
            state = write.state
            rows = self._live_rows_for(write.conn, wanted)
            if len(rows) == 0:
                return 0
            self._tombstone(write.conn, rows)
            write.bm25().delete(rows)
            live = state.live.copy()
            live[rows] = False
            self._commit(write, live=live, hnsw_dead=state.hnsw_dead + int((rows < state.hnsw_rows).sum()))
        return len(rows)

    def _update_graph(self) -> None:
        """Bring the HNSW graph up to date with the committed rows and save it, once: add the rows
        written since it was last saved, or rebuild it from the live rows when tombstones exceed
        `rebuild_tombstone_fraction` of it."""
        with self._write() as write:
            state = write.state
            if state.index is None:
                rebuild = bool(len(state.tail))
            else:
                rebuild = self._graph_mostly_tombstones(state.hnsw_dead, state.index.ntotal)
            if rebuild:
                self._save_graph(write, self._build_index(state.vectors, state.live), rebuilt=True)
            elif state.hnsw_rows == state.n_rows or (state.index is None and len(state.tail) == 0):
                # Without a graph, hnsw_rows stays 0: rows it covered would need a graph file (`store check`).
                return
            elif len(state.tail) == 0:
                self._commit(write, hnsw_rows=state.n_rows)  # only dead rows since: nothing to add
            else:
                started = time.perf_counter()
                log.info("adding %d rows to the HNSW graph of %s", len(state.tail), self.path)
                index = faiss.clone_index(state.index)  # readers keep searching the committed graph
                faiss.downcast_index(index.index).hnsw.efConstruction = self.ef_construction
                self._add_tail(index, state)
                log.info("added %d rows to the HNSW graph of %s (now %d) in %.1f s", len(state.tail), self.path,
                         index.ntotal, time.perf_counter() - started)
                self._save_graph(write, index, rebuilt=False)

    def _graph_mostly_tombstones(self, dead: int, graph_rows: int) -> bool:
        """Whether the graph holds more deleted rows than `rebuild_tombstone_fraction` of it: rebuild it."""
        return dead > self.rebuild_tombstone_fraction * graph_rows

    def _save_graph(self, write: _Write, index: Any, *, rebuilt: bool) -> None:
        state = write.state
        name = f"hnsw.{state.generation + 1}.faiss"
        self._save_index(index, name)
        self._commit(write, hnsw_file=name, hnsw_rows=state.n_rows, index=index,
                     hnsw_dead=0 if rebuilt else state.hnsw_dead)

    def _live_rows_for(self, conn: sqlite3.Connection, ids: Sequence[str]) -> np.ndarray:
        rows: list[int] = []
        for batch in _batched(ids, _SQL_BATCH):
            marks = ",".join("?" * len(batch))
            rows.extend(r for (r,) in conn.execute(
                f"SELECT row FROM docs WHERE deleted = 0 AND id IN ({marks})", batch
            ))
        return np.asarray(sorted(rows), dtype=np.int64)

    def _tombstone(self, conn: sqlite3.Connection, rows: np.ndarray) -> None:
        conn.executemany("UPDATE docs SET deleted = 1 WHERE row = ?", [(int(r),) for r in rows])

    def _append_vectors(self, start: int, matrix: np.ndarray) -> None:
        file = self.path / VECTORS_FILE
        expected_bytes = start * matrix.shape[1] * 4
        created = not file.exists()
        with open(file, "ab") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size < expected_bytes:
                raise StoreError(f"{file} holds {size} bytes but {start} committed rows need {expected_bytes}; "
                                 "run `clip-sidecar store repair`")
            if size > expected_bytes:
                # Rows a killed writer appended but never committed.
                handle.truncate(expected_bytes)
            handle.write(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            fsync_directory(self.path)

    def _new_index(self, dim: int) -> Any:
        hnsw = faiss.IndexHNSWFlat(dim, self.m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.ef_construction
        return faiss.IndexIDMap(hnsw)

    def _build_index(self, vectors: np.ndarray, live: np.ndarray) -> Any:
        rows = np.flatnonzero(live).astype(np.int64)
        started = time.perf_counter()
        log.info("building the HNSW graph of %s from %d live rows", self.path, len(rows))
        index = self._new_index(vectors.shape[1])
        with self._graph_bar(len(rows), "HNSW graph") as bar:
            for batch in _batched(rows, _HNSW_ADD_BATCH):
                _add_to_index(index, np.asarray(vectors[batch]), batch, bar)
        log.info("built the HNSW graph of %s in %.1f s", self.path, time.perf_counter() - started)
        return index

    def _add_tail(self, index: Any, state: _State) -> None:
        """Add the live rows the graph does not cover yet (`state.tail`) to `index`."""
        with self._graph_bar(len(state.tail), "HNSW graph (adding)") as bar:
            _add_to_index(index, np.asarray(state.vectors[state.tail]), state.tail, bar)

    def _graph_bar(self, rows: int, desc: str) -> tqdm:
        return tqdm(total=rows, unit="row", desc=desc, disable=not self.progress)

    def _save_index(self, index: Any, name: str) -> None:
        final = self.path / name
        tmp = final.with_name(final.name + ".tmp")
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        # Readers open only names recorded in a committed generation, so they never see a partial
        # file; the directory is fsynced so the name is on disk before the commit that records it.
        os.replace(tmp, final)
        fsync_directory(self.path)

    # -- reads ---------------------------------------------------------------------------------

    def count(self) -> int:
        with self._read() as (_, state):
            return int(state.live.sum())

    def content_hashes(self) -> dict[str, str]:
        with self._read() as (conn, _):
            return dict(conn.execute("SELECT id, content_hash FROM docs WHERE deleted = 0"))

    def fetch(self, ids: Sequence[str], *, vectors: bool = True) -> list[Document]:
        wanted = _validate_ids(ids)
        with self._read() as (conn, state):
            found: dict[str, Document] = {}
            for batch in _batched(list(dict.fromkeys(wanted)), _SQL_BATCH):
                marks = ",".join("?" * len(batch))
                for row, doc_id, text, metadata, content_hash, fine in conn.execute(
                    "SELECT row, id, text, metadata, content_hash, fine_vector FROM docs "
                    f"WHERE deleted = 0 AND id IN ({marks})", batch,
                ):
                    found[doc_id] = Document(
                        id=doc_id, vector=np.array(state.vectors[row]) if vectors else NO_VECTOR, text=text,
                        metadata=json.loads(metadata), content_hash=content_hash,
                        fine_vector=None if fine is None else np.frombuffer(fine, dtype=np.float32).copy(),
                    )
        return [found[doc_id] for doc_id in wanted if doc_id in found]

    def thumbnail(self, doc_id: str) -> bytes | None:
        with self._read() as (conn, _):
            row = conn.execute("SELECT thumbnail FROM docs WHERE deleted = 0 AND id = ?", (doc_id,)).fetchone()
        return bytes(row[0]) if row and row[0] else None

    def facets(self, *, size: int = 20) -> dict[str, FacetCounts]:
        _require_positive_int("size", size)
        with self._read() as (conn, state):
            counts, _ = self._metadata_values(conn, state)
        return {name: field.top(size) for name, field in counts.items()}

    def _metadata_values(self, conn: sqlite3.Connection,
                         state: _State) -> tuple[dict[str, FacetCounts], dict[str, frozenset[str]]]:
        """Every field's value counts and the kinds of value it holds: counted once per committed generation (a
        scan of every document's metadata), then kept."""
        cached = self._facets
        if cached is None or cached[0] != state.generation:
            counts = _count_metadata_values(conn)
            kinds = {name: frozenset(_filter_kind(value) for value, _ in field.values)
                     for name, field in counts.items()}
            cached = self._facets = (state.generation, counts, kinds)
        return cached[1], cached[2]

    def vector_search(
        self, vector: np.ndarray, k: int, *, filters: Filters | None = None, exact: bool = False,
        ef_search: int | None = None,
    ) -> list[ScoredId]:
        _require_positive_int("k", k)
        k = int(k)
        exact = exact or self.effort.exact(ef_search)
        with self._read() as (conn, state):
            if state.dim is None:
                return []
            query = _query_vector(vector, state.dim, state.signature)
            if filters:
                candidates = self._filtered_rows(conn, state, filters)
                if len(candidates) == 0:
                    return []
                if exact or state.index is None or len(candidates) <= self.exact_filter_rows:
                    hits = exact_over_rows(state.vectors, query, k, candidates)
                else:
                    in_graph = candidates[candidates < state.hnsw_rows]
                    hits = merged(self._ann(state, query, k, _bitmap(in_graph, state.n_rows), ef_search),
                                   exact_over_rows(state.vectors, query, k, candidates[candidates >= state.hnsw_rows]),
                                   k)
                    if len(hits) < min(k, len(candidates)):
                        # HNSW under a selective filter can run out of candidates: fall back to exact.
                        hits = exact_over_rows(state.vectors, query, k, candidates)
            elif exact or state.index is None:
                hits = exact_all(state.vectors, state.live, query, k)
            else:
                allowed = state.live_bits if state.hnsw_dead else None
                hits = merged(self._ann(state, query, k, allowed, ef_search),
                               exact_over_rows(state.vectors, query, k, state.tail), k)
                if len(hits) < k and len(hits) < int(state.live.sum()):
                    # A graph that is mostly deleted rows (a load session's deletes before its rebuild,
                    # or one killed before it) leaves HNSW too few live neighbours to walk: exact.
                    hits = exact_all(state.vectors, state.live, query, k)
            return self._scored(conn, hits)

    def searches_exactly(self, filters: Filters | None) -> bool:
        with self._read() as (conn, state):
            if state.index is None:
                return True
            return bool(filters) and len(self._filtered_rows(conn, state, filters)) <= self.exact_filter_rows

    def _ann(self, state: _State, query: np.ndarray, k: int, allowed: np.ndarray | None,
             ef_search: int | None = None) -> list[tuple[int, float]]:
        params = faiss.SearchParametersHNSW()
        # HNSW returns at most efSearch results.
        params.efSearch = max(self.effort.ef_search(ef_search), k)
        if allowed is not None:
            selector = faiss.IDSelectorBitmap(state.n_rows, faiss.swig_ptr(allowed))
            params.sel = selector
        scores, labels = state.index.search(query[None, :], k, params=params)
        return [(int(row), float(score)) for row, score in zip(labels[0], scores[0]) if row >= 0]

    def text_search(self, query: str, k: int, *, filters: Filters | None = None,
                    ids: Sequence[str] | None = None) -> list[ScoredId]:
        _require_positive_int("k", k)
        k = int(k)
        if not isinstance(query, str):
            raise TypeError(f"text query must be a str, got {type(query).__name__}")
        terms = query_terms(query)
        if not terms:
            return []
        wanted = None if ids is None else _validate_ids(ids)
        if wanted is not None and not wanted:
            return []
        with self._read() as (conn, state):
            rows = None
            if filters or wanted is not None:
                rows = self._filtered_rows(conn, state, filters or {}, ids=wanted)
                if len(rows) == 0:
                    return []
            return self._scored(conn, state.bm25.search(terms, k, live=state.live, rows=rows))

    def filtered_ids(self, ids: Sequence[str], filters: Filters) -> list[str]:
        wanted = _validate_ids(ids)
        if not wanted:
            return []
        with self._read() as (conn, state):
            rows = self._filtered_rows(conn, state, filters, ids=wanted)
            return [hit.id for hit in self._scored(conn, [(int(row), 0.0) for row in rows])]

    def _filtered_rows(self, conn: sqlite3.Connection, state: _State, filters: Filters, *,
                       ids: Sequence[str] | None = None) -> np.ndarray:
        """Live rows matching `filters` (and among `ids`, where given), sorted. None matching, a filter that
        could match none is refused (`_refuse_unmatchable_filters`)."""
        where, params = _filter_sql(filters)
        sql = f"SELECT d.row FROM docs d WHERE d.deleted = 0{where}"
        if ids is None:
            cursor = conn.execute(sql + " ORDER BY d.row", params)
            found = np.fromiter((r for (r,) in cursor), dtype=np.int64)
        else:
            rows: list[int] = []
            for batch in _batched(list(dict.fromkeys(ids)), _SQL_BATCH):
                rows.extend(r for (r,) in conn.execute(f"{sql} AND d.id IN ({','.join('?' * len(batch))})",
                                                       [*params, *batch]))
            found = np.asarray(sorted(rows), dtype=np.int64)
        if not len(found) and filters:
            self._refuse_unmatchable_filters(conn, state, filters)
        return found

    def _refuse_unmatchable_filters(self, conn: sqlite3.Connection, state: _State, filters: Filters) -> None:
        """Raise StoreQueryError where a filter has no value of a kind its field holds (a word for a field of
        numbers): it can match no document, and OpenSearch refuses such a query (400 naming `filters` in the API)
        where an empty answer would read as "nothing matched". A field holding several kinds (numbers in some
        documents, words in others) takes a value of any of them; a field no document holds is left to
        `check_filter_fields`, which names the fields held. Asked only of an empty answer: one that found
        anything matched every field, so each had a value of a kind its field holds."""
        _, held = self._metadata_values(conn, state)
        for name, value in filters.items():
            values = _filter_values(name, value)
            if name in held and not {_filter_kind(item) for item in _as_opensearch_reads(values)} & held[name]:
                given = {_filter_kind(item) for item in values}
                raise StoreQueryError(f"metadata field {quoted(name)} holds {_kinds_named(held[name])}, its filter's "
                                      f"values are {_kinds_named(given)} that read as none of them, so it can match "
                                      "no document")

    def _scored(self, conn: sqlite3.Connection, hits: list[tuple[int, float]]) -> list[ScoredId]:
        if not hits:
            return []
        marks = ",".join("?" * len(hits))
        ids = dict(conn.execute(f"SELECT row, id FROM docs WHERE row IN ({marks})", [r for r, _ in hits]))
        return [ScoredId(id=ids[row], score=score) for row, score in hits]

    # -- the search effort's calibration ---------------------------------------------------------

    def _load_calibration(self) -> dict[str, Any] | None:
        file = self.path / CALIBRATION_FILE
        return json.loads(file.read_text(encoding="utf-8")) if file.exists() else None

    def _save_calibration(self, data: dict[str, Any]) -> None:
        final = self.path / CALIBRATION_FILE
        tmp = final.with_name(final.name + ".tmp")  # a *.tmp left by a kill is removed as a leftover
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, final)

    # -- check and repair ------------------------------------------------------------------------

    def check(self) -> StoreReport:
        """Read-only: SQLite integrity, row numbering, vectors.f32 against the committed rows, the
        graph against the live rows and their vectors, the BM25 index against the live texts, leftovers.
        Under the write lock, though it writes nothing: a read transaction pins SQLite's generation but
        not the files beside it, and a write committed meanwhile (an `index` run's next batch) moved the
        BM25 index past that generation and removed the graph file it names, which read as damage.
        Searches take no lock and go on; writers wait for the check, as for any write."""
        with self._write_lock, self._file_lock():
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                found = self._inspect(conn)
            finally:
                conn.execute("ROLLBACK")
        report = StoreReport(location=f"embedded store {self.path}")
        if found.sqlite != "ok":
            report.problems.append(f"SQLite integrity check failed: {found.sqlite}")
            return report
        if found.rows_problem:
            report.problems.append(found.rows_problem)
        if found.vector_rows < found.n_rows:
            report.problems.append(f"{VECTORS_FILE} holds vectors for {found.vector_rows} of the {found.n_rows} "
                                   "committed rows")
        if found.extra_bytes:
            report.notes.append(f"{VECTORS_FILE} has {found.extra_bytes} bytes past the committed rows (an "
                                "interrupted write; the next write discards them)")
        if len(found.bad_rows):
            report.problems.append(f"{len(found.bad_rows)} live rows have zero or non-finite vectors (lost writes)")
        report.problems.extend(found.graph_problems)
        if found.tail_rows:
            report.notes.append(f"{found.tail_rows} live rows written since the graph was last saved are searched "
                                "exactly; the next `index` run or `store repair` adds them to the graph")
        if found.graph_tombstones:
            report.notes.append(f"the HNSW graph still holds {found.graph_tombstones} deleted documents, over "
                                f"rebuild_tombstone_fraction={self.rebuild_tombstone_fraction} of it (a load "
                                "session ended before its rebuild); searches skip them, falling back to exact "
                                "search where the graph finds too few live rows; the next `index` run or "
                                "`store repair` rebuilds the graph")
        report.problems.extend(found.bm25_problems)
        report.notes.extend(f"leftover file {name} (an interrupted write; the next write removes it)"
                            for name in found.leftovers)
        return report

    def repair(self) -> StoreReport:
        """Under the write lock: discard an uncommitted vectors tail; remove (tombstone) documents
        whose vectors were lost, so a rerun of `clip-sidecar index` writes them again; rebuild the
        BM25 index from the live rows when it is out of step; rebuild the graph when it is missing,
        unreadable or does not match, else add the rows it lacks; remove leftover files."""
        report = StoreReport(location=f"embedded store {self.path}")
        with self._write_lock, self._file_lock():
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                committed = self._repair(conn, report)
                conn.execute("COMMIT")
            except BaseException:
                _roll_back(conn)
                raise
            if committed is not None:
                with self._state_lock:
                    self._state = committed
            keep = conn.execute("SELECT value FROM meta WHERE key = 'hnsw_file'").fetchone()
            report.actions.extend(f"removed leftover file {name}"
                                  for name in self._remove_leftovers(keep=keep[0] if keep else None))
        return report

    def _repair(self, conn: sqlite3.Connection, report: StoreReport) -> _State | None:
        found = self._inspect(conn)
        if found.sqlite != "ok" or found.rows_problem:
            damage = found.rows_problem or f"SQLite integrity check failed: {found.sqlite}"
            report.problems.append(f"cannot repair: {damage}; {REINDEX_ADVICE}")
            return None
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if found.dim is None or found.n_rows == 0:
            return None
        file = self.path / VECTORS_FILE
        row_bytes = found.dim * 4
        if found.extra_bytes or found.vector_rows < found.n_rows:
            with open(file, "ab") as handle:
                handle.truncate(found.n_rows * row_bytes)  # cuts an uncommitted tail, or pads lost rows with zeros
                os.fsync(handle.fileno())
            report.actions.append(f"{VECTORS_FILE}: " + (f"discarded {found.extra_bytes} uncommitted bytes"
                                  if found.extra_bytes else f"padded the {found.n_rows - found.vector_rows} lost rows"))
        lost = np.union1d(found.bad_rows, np.arange(found.vector_rows, found.n_rows, dtype=np.int64))
        lost_ids = [doc_id for (doc_id,) in conn.execute(
            f"SELECT id FROM docs WHERE deleted = 0 AND row IN ({','.join(map(str, lost.tolist())) or 'NULL'})")]
        if lost_ids:
            self._tombstone(conn, lost)
            shown = ", ".join(lost_ids[:5]) + (" …" if len(lost_ids) > 5 else "")
            report.actions.append(f"removed {len(lost_ids)} documents whose vectors were lost ({shown}); rerun "
                                  "`clip-sidecar index` to write them again")
        bm25_rebuilt = bool(found.bm25_problems or lost_ids)
        if bm25_rebuilt:
            meta["bm25_opstamp"] = str(self._rebuild_bm25(conn))
            if found.bm25_problems:
                report.actions.append("rebuilt the BM25 index from the live rows")
        state = self._load_state(conn, meta, None, load_graph=not found.graph_problems)
        if found.graph_problems or lost_ids or state.hnsw_file is None or found.graph_tombstones:
            index = self._build_index(state.vectors, state.live)
            rebuilt = True
            report.actions.append(f"rebuilt the HNSW graph from {int(state.live.sum())} live rows"
                                  + (f" ({found.graph_tombstones} of its rows were deleted documents)"
                                     if found.graph_tombstones else ""))
        elif found.tail_rows:
            index = faiss.read_index(str(self.path / state.hnsw_file))
            self._add_tail(index, state)
            rebuilt = False
            report.actions.append(f"added {len(state.tail)} rows to the HNSW graph")
        elif bm25_rebuilt:  # a generation of its own, so every process takes the rebuilt index
            write = _Write(conn=conn, state=state, stack=contextlib.ExitStack(), bm25_index=self._bm25)
            self._commit(write)
            return write.committed
        else:
            return None
        write = _Write(conn=conn, state=state, stack=contextlib.ExitStack(), bm25_index=self._bm25)
        self._save_graph(write, index, rebuilt=rebuilt)
        return write.committed

    def _inspect(self, conn: sqlite3.Connection) -> _Findings:
        try:
            found = _Findings(sqlite=conn.execute("PRAGMA quick_check").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            return _Findings(sqlite=str(exc))
        if found.sqlite != "ok":
            return found
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        found.n_rows = n_rows = int(meta["n_rows"])
        found.dim = dim = int(meta["dim"]) if "dim" in meta else None
        hnsw_file = meta.get("hnsw_file")
        hnsw_rows = _hnsw_rows(meta)
        count, top = conn.execute("SELECT count(*), coalesce(max(row) + 1, 0) FROM docs").fetchone()
        if count != n_rows or top != n_rows:
            found.rows_problem = f"the docs table holds {count} rows numbered up to {top - 1}; meta says {n_rows}"
        found.leftovers = sorted(f.name for f in [*self.path.glob("hnsw.*"), *self.path.glob("*.tmp")]
                                 if f.name != hnsw_file)
        if dim is None or found.rows_problem:
            return found
        file = self.path / VECTORS_FILE
        size = file.stat().st_size if file.exists() else 0
        found.vector_rows = min(size // (dim * 4), n_rows)
        found.extra_bytes = max(0, size - n_rows * dim * 4)
        live = np.ones(n_rows, dtype=bool)
        dead = conn.execute("SELECT row FROM docs WHERE deleted = 1")
        live[np.fromiter((r for (r,) in dead), dtype=np.int64)] = False
        vectors = (np.memmap(file, dtype=np.float32, mode="r", shape=(found.vector_rows, dim))
                   if found.vector_rows else np.zeros((0, dim), dtype=np.float32))
        bad = []
        for start in range(0, found.vector_rows, EXACT_CHUNK_ROWS):
            chunk = np.asarray(vectors[start:start + EXACT_CHUNK_ROWS])
            broken = ~np.isfinite(chunk).all(axis=1) | ~chunk.any(axis=1)
            bad.append(np.flatnonzero(broken & live[start:start + len(chunk)]) + start)
        found.bad_rows = np.concatenate(bad).astype(np.int64) if bad else found.bad_rows
        found.graph_problems, graph_rows = self._inspect_graph(hnsw_file, hnsw_rows, int(meta["hnsw_dead"]), live,
                                                               vectors, dim)
        if not found.graph_problems and self._graph_mostly_tombstones(int(meta["hnsw_dead"]), graph_rows):
            found.graph_tombstones = int(meta["hnsw_dead"])
        found.tail_rows = int(live[hnsw_rows:].sum())
        found.bm25_problems = self._inspect_bm25(conn, int(meta["bm25_opstamp"]))
        return found

    def _inspect_bm25(self, conn: sqlite3.Connection, recorded: int) -> list[str]:
        """The BM25 index as committed on disk against the live rows' texts (by hash) and the opstamp
        the committed generation names."""
        try:
            at = self._bm25.committed_opstamp()
            rows, hashes = self._bm25.snapshot().entries()
        except (OSError, ValueError) as exc:
            return [f"the BM25 index cannot be read: {exc}"]
        problems = []
        if at != recorded:
            problems.append(f"the BM25 index is at commit {at}, the committed generation names {recorded} (a write "
                            "was cut off between its two commits)")
        expected = {row: text_hash(text) for row, text in conn.execute("SELECT row, text FROM docs WHERE deleted = 0")}
        indexed: dict[int, int] = {}
        extra = 0
        for row, digest in zip(rows.tolist(), hashes.tolist()):
            if row in indexed or row not in expected:
                extra += 1
            else:
                indexed[row] = digest
        missing = len(expected.keys() - indexed.keys())
        differ = sum(1 for row, digest in indexed.items() if expected[row] != digest)
        for number, what in ((missing, "live documents are missing from the BM25 index"),
                             (extra, "BM25 entries belong to no live document (or repeat one)"),
                             (differ, "BM25 entries hold another text than their document")):
            if number:
                problems.append(f"{number} {what}")
        return problems

    def _inspect_graph(self, hnsw_file: str | None, hnsw_rows: int, hnsw_dead: int, live: np.ndarray,
                       vectors: np.ndarray, dim: int) -> tuple[list[str], int]:
        """The graph's problems, and the rows it holds (0 where there is no readable graph)."""
        if hnsw_file is None:
            return ([f"no HNSW graph recorded, though it should cover {hnsw_rows} rows"] if hnsw_rows else []), 0
        path = self.path / hnsw_file
        if not path.exists():
            return [f"the HNSW graph file {hnsw_file} named by the committed generation is missing"], 0
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            return [f"the HNSW graph file {hnsw_file} cannot be read: {str(exc).splitlines()[0]}"], 0
        if index.d != dim:
            return [f"the HNSW graph holds {index.d}-d vectors, the store {dim}-d"], 0
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        if len(np.unique(ids)) != len(ids) or (len(ids) and (ids.min() < 0 or ids.max() >= hnsw_rows)):
            return [f"the HNSW graph holds ids outside its {hnsw_rows} rows, or duplicates"], len(ids)
        problems = []
        in_graph = np.zeros(len(live), dtype=bool)
        in_graph[ids] = True
        absent = int((live[:hnsw_rows] & ~in_graph[:hnsw_rows]).sum())
        if absent:
            problems.append(f"{absent} live rows are missing from the HNSW graph")
        dead = int((in_graph & ~live).sum())
        if dead != hnsw_dead:
            problems.append(f"the HNSW graph holds {dead} tombstoned rows; the store recorded {hnsw_dead}")
        storage = faiss.downcast_index(faiss.downcast_index(index.index).storage)
        positions = np.linspace(0, len(ids) - 1, num=min(len(ids), _CHECK_SAMPLE_ROWS)).astype(np.int64)
        positions = positions[ids[positions] < len(vectors)]
        if len(positions):
            stored = np.stack([storage.reconstruct(int(p)) for p in positions])
            if not np.allclose(stored, np.asarray(vectors[ids[positions]]), atol=1e-6):
                problems.append("the HNSW graph's vectors do not match vectors.f32")
        return problems, len(ids)


# -- helpers ---------------------------------------------------------------------------------


# The first bytes of every SQLite database file (sqlite.org/fileformat.html, 1.3).
_SQLITE_HEADER = b"SQLite format 3\x00"

# What recovers the documents of a version whose SQLite file is lost: `index` writes them from shards alone.
REINDEX_ADVICE = "index the shards it was built from into a new store (clip-sidecar index SHARDS --store-path NEW)"


def written_beside_database(folder: Path) -> list[str]:
    """The files in `folder` a version writes only after its store.sqlite holds the schema (vectors, graph, BM25
    index, calibration, a non-empty write-ahead log): beside a missing or empty store.sqlite they are a store whose
    documents are lost; without them, a store not created yet (or whose creation was cut off before its schema)."""
    found = [name for name in (VECTORS_FILE, f"{BM25_DIR}/", CALIBRATION_FILE) if (folder / name).exists()]
    found += sorted(path.name for path in folder.glob("hnsw.*"))
    wal = folder / f"{DB_FILE}-wal"
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # the last connection to close removes it
        if wal.stat().st_size:
            found.append(wal.name)
    return found


# JSON types a metadata value (or a list's element) may have to be counted as a facet: what filters match.
_FACET_TYPES = "('text', 'integer', 'real', 'true', 'false')"


def _count_metadata_values(conn: sqlite3.Connection) -> dict[str, FacetCounts]:
    """Every top-level metadata field → (value, documents holding it) for its scalar values and the
    elements of its list values (what `_filter_sql` matches), most frequent first."""
    rows = conn.execute(
        "SELECT key, type, atom, count(DISTINCT row) FROM ("
        "  SELECT d.row AS row, j.key AS key, j.type AS type, j.atom AS atom"
        "  FROM docs d, json_each(d.metadata) j"
        f"  WHERE d.deleted = 0 AND j.type IN {_FACET_TYPES}"
        "  UNION ALL"
        "  SELECT d.row, j.key, e.type, e.atom FROM docs d, json_each(d.metadata) j, json_each(j.value) e"
        f"  WHERE d.deleted = 0 AND j.type = 'array' AND e.type IN {_FACET_TYPES}"
        ") GROUP BY key, type, atom")
    found: dict[str, list[tuple[Any, int]]] = {}
    for key, kind, atom, count in rows:
        value = {"true": True, "false": False}.get(kind, atom)
        found.setdefault(key, []).append((value, count))
    return {key: FacetCounts.ranked(values) for key, values in found.items()}


def _filter_sql(filters: Filters) -> tuple[str, list[Any]]:
    """Metadata filters -> SQL over alias `d`: a top-level field matches if it (or any element of a list field)
    equals a value; a field holding an object matches nothing, as a term filter on an object field."""
    if not isinstance(filters, dict) and not hasattr(filters, "items"):
        raise TypeError(f"filters must be a mapping of field -> value(s), got {type(filters).__name__}")
    clauses: list[str] = []
    params: list[Any] = []
    for field, value in filters.items():
        if not isinstance(field, str) or not field:
            raise ValueError(f"filter field must be a non-empty string, got {field!r}")
        values = _as_opensearch_reads(_filter_values(field, value))
        # The field is found by json_each's key, the name as decoded, bound as a parameter: a JSON path
        # ($."name") compares the name as escaped in the JSON text, so a backslash in it matched nothing.
        # The members' own walk (`json_each(j.value)`) runs on arrays only: on an object it would match its
        # members' values. SQLite reads JSON true as 1: the JSON type keeps a boolean from matching a number.
        scalar, element = [], []
        for _, types, kind in _FILTER_TYPES:
            same = [item for item in values if kind(item)]
            if same:
                marks = ",".join("?" * len(same))
                scalar.append((f"(j.type IN {types} AND j.value IN ({marks}))", same))
                element.append((f"(e.type IN {types} AND e.value IN ({marks}))", same))
        clauses.append(
            " AND EXISTS (SELECT 1 FROM json_each(d.metadata) AS j WHERE j.key = ? AND ("
            f"{' OR '.join(sql for sql, _ in scalar)} OR (j.type = 'array' AND EXISTS (SELECT 1 FROM "
            f"json_each(j.value) AS e WHERE {' OR '.join(sql for sql, _ in element)}))))")
        params.append(field)
        params.extend(item for _, same in scalar for item in same)
        params.extend(item for _, same in element for item in same)
    return "".join(clauses), params


def _filter_values(field: str, value: Any) -> list[Any]:
    """One filter's values (a value or a list of them) as SQLite binds them, each a string, number or boolean."""
    values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
    # numpy scalars (np.int64 from a DataFrame, say) become Python values SQLite can bind.
    values = [item.item() if isinstance(item, np.generic) else item for item in values]
    if not values:
        raise ValueError(f"filter {field!r} has an empty list of values")
    for item in values:
        if not isinstance(item, (str, int, float)) or (isinstance(item, float) and not math.isfinite(item)):
            raise ValueError(f"filter {field!r}: values must be strings, numbers or booleans, got {item!r}")
    return values


# A word Java's number parsing reads (OpenSearch's, for a term on a number field): "+5", "05", "2020.", "2.5e0";
# not " 5", "1_000" or "inf", which Python's would.
_NUMBER_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _as_opensearch_reads(values: list[Any]) -> list[Any]:
    """Filter values with the other forms OpenSearch's term query reads them as, by the field's type: a word that
    Java reads as a number matches a number field ("2020" a stored 2020), "true"/"false" a boolean one, and a number or
    boolean matches a keyword field as its text (5 a stored "5", true "true"). A user moving a corpus between the
    stores gets the same hits, where a value matched only stored values of its own JSON type."""
    forms: list[Any] = []
    for item in values:
        forms.append(item)
        if isinstance(item, bool):
            forms.append("true" if item else "false")
        elif isinstance(item, (int, float)):
            forms.append(repr(item))  # as Java writes a JSON 5 or 2.5 (not 1e20: "1.0E20" there)
        elif item in ("true", "false"):
            forms.append(item == "true")
        elif _NUMBER_TEXT.fullmatch(item):
            number = int(item) if item.lstrip("+-").isdigit() else float(item)
            if isinstance(number, float) and math.isfinite(number) or -2 ** 63 <= number < 2 ** 63:
                forms.append(number)
    return forms


# A filter value's kind, named, with the JSON types it may match in a document's metadata: a stored value's kind
# is the one whose JSON types it has.
_FILTER_TYPES = (("true or false", "('true', 'false')", lambda item: isinstance(item, bool)),
                 ("numbers", "('integer', 'real')",
                  lambda item: isinstance(item, (int, float)) and not isinstance(item, bool)),
                 ("text", "('text')", lambda item: isinstance(item, str)))


def _filter_kind(value: Any) -> str:
    """The name of the kind of a filter value, or of a stored value as facets count it."""
    return next(name for name, _, is_kind in _FILTER_TYPES if is_kind(value))


def _kinds_named(kinds: frozenset[str] | set[str]) -> str:
    return " and ".join(name for name, _, _ in _FILTER_TYPES if name in kinds)


def _hnsw_rows(meta: dict[str, str]) -> int:
    """Rows the graph covers; format 1 had no such key: its graph covered every row."""
    if "hnsw_rows" in meta:
        return int(meta["hnsw_rows"])
    return int(meta["n_rows"]) if "hnsw_file" in meta else 0


def _roll_back(conn: sqlite3.Connection) -> None:
    """Undo a write transaction that an exception cut short, if it is still open: a Ctrl-C that arrives
    while COMMIT runs is raised only once COMMIT has returned, with the write committed and nothing left
    to roll back (a ROLLBACK then fails, and its error would replace the interrupt)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in `path` durable (its directory entry is data too)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _require_positive_int(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{label} must be an integer >= 1, got {value!r}")


def _validate_ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise TypeError("ids must be a sequence of strings, not a single string")
    out = list(ids)
    for doc_id in out:
        if not isinstance(doc_id, str) or not doc_id:
            raise ValueError(f"document ids must be non-empty strings, got {doc_id!r}")
    return out


def _dedupe_last_wins(documents: Sequence[Document]) -> list[Document]:
    # Like a bulk request naming one id twice: the later document wins.
    by_id: dict[str, Document] = {}
    for doc in documents:
        if not isinstance(doc, Document):
            raise TypeError(f"upsert expects Document objects, got {type(doc).__name__}")
        if not isinstance(doc.id, str) or not doc.id:
            raise ValueError(f"document ids must be non-empty strings, got {doc.id!r}")
        by_id.pop(doc.id, None)
        by_id[doc.id] = doc
    return list(by_id.values())


def _stack_document_vectors(docs: Sequence[Document]) -> np.ndarray:
    first_dim: int | None = None
    for doc in docs:
        vector = np.asarray(doc.vector)
        if vector.ndim != 1 or vector.dtype.kind != "f":
            raise ValueError(
                f"document {doc.id!r}: vector must be a 1-D float array, got shape {vector.shape} dtype {vector.dtype}"
            )
        if first_dim is None:
            first_dim = vector.shape[0]
        elif vector.shape[0] != first_dim:
            raise ValueError(
                f"vector dimension mismatch in one batch: expected {first_dim}, got {vector.shape[0]} (document {doc.id!r})"
            )
    matrix = np.stack([np.asarray(doc.vector, dtype=np.float32) for doc in docs])
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise ValueError(f"document {docs[int(np.argmax(bad))].id!r}: vector has NaN or infinite values")
    return matrix


def _document_row(doc: Document) -> tuple[str, str, str, str, bytes | None, bytes | None]:
    if not isinstance(doc.text, str) or not isinstance(doc.content_hash, str):
        raise ValueError(f"document {doc.id!r}: text and content_hash must be strings")
    try:
        metadata = json.dumps(dict(doc.metadata), ensure_ascii=False, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"document {doc.id!r}: metadata must be JSON-serialisable: {exc}") from exc
    fine = None
    if doc.fine_vector is not None:
        # The fine model's vector lives in its row (read only for the fine stage's N candidates),
        # never in the HNSW graph or vectors.f32.
        vector = np.asarray(doc.fine_vector, dtype=np.float32)
        if vector.ndim != 1 or not np.isfinite(vector).all():
            raise ValueError(f"document {doc.id!r}: fine_vector must be one finite float vector")
        fine = vector.tobytes()
    return doc.id, doc.text, metadata, doc.content_hash, fine, doc.thumbnail or None


def _dim_message(expected: int, got: int, signature: ModelSignature | None) -> str:
    source = f" ({signature.describe()})" if signature is not None else ""
    return f"vector dimension mismatch: store expects {expected}{source}, got {got}"


def _query_vector(vector: np.ndarray, dim: int, signature: ModelSignature | None) -> np.ndarray:
    query = np.asarray(vector)
    if query.ndim == 2 and query.shape[0] == 1:
        query = query[0]
    if query.ndim != 1 or query.dtype.kind != "f":
        raise ValueError(f"query vector must be a 1-D float array (or shape (1, dim)), got shape {np.shape(vector)} "
                         f"dtype {query.dtype}")
    if query.shape[0] != dim:
        # The query's model is not the one of the store's vectors (the API answers 409, not 500).
        raise QueryModelMismatch(signature or dim, query.shape[0])
    if not np.isfinite(query).all():
        raise ValueError("query vector has NaN or infinite values")
    return np.ascontiguousarray(query, dtype=np.float32)


def _add_to_index(index: Any, matrix: np.ndarray, rows: np.ndarray, bar: tqdm) -> None:
    for start in range(0, len(rows), _HNSW_ADD_BATCH):
        stop = start + _HNSW_ADD_BATCH
        index.add_with_ids(np.ascontiguousarray(matrix[start:stop], dtype=np.float32), rows[start:stop])
        bar.update(len(rows[start:stop]))


def _bitmap(rows: np.ndarray, n_rows: int) -> np.ndarray:
    mask = np.zeros(n_rows, dtype=bool)
    mask[rows] = True
    return _pack_bits(mask)


def _pack_bits(mask: np.ndarray) -> np.ndarray:
    # faiss.IDSelectorBitmap reads bit (i & 7) of byte i >> 3: little bit order.
    return np.packbits(mask, bitorder="little")


def _batched(items: Any, size: int) -> Iterator[Any]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
