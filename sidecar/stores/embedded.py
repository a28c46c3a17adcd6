"""Embedded store: SQLite (documents, FTS5 BM25) + memmapped float32 vectors + FAISS HNSW, in one directory."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import faiss
import numpy as np

from sidecar.stores.base import ModelMismatchError, StoreError
from sidecar.types import Document, Filters, ModelSignature, ScoredId

log = logging.getLogger(__name__)

_DB_FILE = "store.sqlite"
_VECTORS_FILE = "vectors.f32"
_LOCK_FILE = "write.lock"
_FORMAT_VERSION = "1"
# 32k rows of 512-d float32 = 64 MiB per step: exact search over 1M rows stays bounded.
_EXACT_CHUNK_ROWS = 32_768
# Rows per HNSW add call: bounds the float32 copies handed to faiss.
_HNSW_ADD_BATCH = 16_384
# Stay well under SQLite's host-parameter limit.
_SQL_BATCH = 500
_MAX_QUERY_TERMS = 64
_MAX_READ_RETRIES = 5
_WORD = re.compile(r"\w+")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS docs_live_id ON docs(id) WHERE deleted = 0;
CREATE INDEX IF NOT EXISTS docs_dead ON docs(row) WHERE deleted = 1;
CREATE VIRTUAL TABLE IF NOT EXISTS docs_fts USING fts5(text, tokenize = 'unicode61 remove_diacritics 2');
"""


@dataclasses.dataclass(frozen=True, slots=True)
class _State:
    """What one committed generation looks like to this process (cached until the generation changes)."""

    generation: int
    n_rows: int
    dim: int | None
    signature: ModelSignature | None
    hnsw_file: str | None
    hnsw_dead: int  # tombstoned rows still inside the HNSW graph
    live: np.ndarray  # bool per row number
    live_bits: np.ndarray  # `live` packed for faiss.IDSelectorBitmap, built once per generation
    vectors: np.ndarray  # (n_rows, dim) float32, memmapped
    index: Any  # faiss.IndexIDMap over IndexHNSWFlat (ids are row numbers), or None when empty


class EmbeddedStore:
    """The default zero-setup store; see the Store protocol in `sidecar.stores.base`.

    Layout of `path`: `store.sqlite` (WAL; meta, docs with tombstones, FTS5), `vectors.f32`
    (append-only float32 rows, row number = SQLite row), `hnsw.<generation>.faiss` (the ANN
    graph, ids = row numbers), `write.lock` (fcntl lock serialising writer processes).

    `m` and `ef_construction` apply to graphs built by this instance (new stores, rebuilds);
    `ef_search` applies to every query. The HNSW graph is rebuilt from the live rows when
    tombstones exceed `rebuild_tombstone_fraction` of it. Filtered vector searches whose
    candidates number at most `exact_filter_rows` are answered exactly.
    """

    name = "embedded"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        rebuild_tombstone_fraction: float = 0.2,
        exact_filter_rows: int = 20_000,
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
        self.path.mkdir(parents=True, exist_ok=True)
        # One connection shared by request threads; self._lock serialises every use of it.
        self._lock = threading.RLock()
        self._state: _State | None = None
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path / _DB_FILE, isolation_level=None, check_same_thread=False, timeout=60.0
        )
        self._conn.execute("PRAGMA busy_timeout = 60000")
        self._initialise()

    # -- lifecycle -------------------------------------------------------------------------

    def _initialise(self) -> None:
        conn = self._db()
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if exists:
            self._check_format()
            return
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
                for key, value in (("format", _FORMAT_VERSION), ("generation", "0"), ("n_rows", "0"), ("hnsw_dead", "0")):
                    conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._check_format()

    def _check_format(self) -> None:
        row = self._db().execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is None or row[0] != _FORMAT_VERSION:
            found = None if row is None else row[0]
            raise StoreError(f"{self.path} holds embedded-store format {found!r}; this version reads {_FORMAT_VERSION!r}")
        self._db().execute("PRAGMA synchronous = NORMAL")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._state = None

    def __enter__(self) -> EmbeddedStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"embedded store at {self.path} is closed")
        return self._conn

    # -- snapshots and locking ----------------------------------------------------------------

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        with open(self.path / _LOCK_FILE, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _read(self) -> Iterator[_State]:
        """A consistent snapshot: SQLite read transaction + the vectors/HNSW of that generation."""
        with self._lock:
            conn = self._db()
            for _ in range(_MAX_READ_RETRIES):
                conn.execute("BEGIN")
                try:
                    state = self._refresh()
                except FileNotFoundError:
                    # A writer committed a newer graph and removed ours after our snapshot began;
                    # a fresh snapshot names the file that exists now.
                    conn.execute("ROLLBACK")
                    self._state = None
                    continue
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                try:
                    yield state
                finally:
                    conn.execute("ROLLBACK")
                return
            raise StoreError(f"could not load a consistent snapshot of {self.path}: writers kept replacing it")

    @contextlib.contextmanager
    def _write(self) -> Iterator[_State]:
        """Exclusive writer: fcntl lock across processes, then an IMMEDIATE SQLite transaction."""
        with self._lock, self._file_lock():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._refresh()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                # The in-memory graph may hold rows that never committed: reload from disk next time.
                self._state = None
                raise
            self._remove_stale_graphs()

    def _refresh(self) -> _State:
        meta = dict(self._db().execute("SELECT key, value FROM meta").fetchall())
        generation = int(meta["generation"])
        cached = self._state
        if cached is not None and cached.generation == generation:
            return cached
        n_rows = int(meta["n_rows"])
        dim = int(meta["dim"]) if "dim" in meta else None
        signature = ModelSignature(**json.loads(meta["signature"])) if "signature" in meta else None
        hnsw_file = meta.get("hnsw_file")
        if cached is not None and cached.index is not None and cached.hnsw_file == hnsw_file:
            index = cached.index
        elif hnsw_file is not None:
            index = faiss.read_index(str(self._existing(hnsw_file)))
            faiss.downcast_index(index.index).hnsw.efConstruction = self.ef_construction
        else:
            index = None
        live = np.ones(n_rows, dtype=bool)
        dead = np.fromiter((r for (r,) in self._db().execute("SELECT row FROM docs WHERE deleted = 1")), dtype=np.int64)
        live[dead] = False
        self._state = _State(
            generation=generation,
            n_rows=n_rows,
            dim=dim,
            signature=signature,
            hnsw_file=hnsw_file,
            hnsw_dead=int(meta["hnsw_dead"]),
            live=live,
            live_bits=_pack_bits(live),
            vectors=self._map_vectors(n_rows, dim),
            index=index,
        )
        return self._state

    def _existing(self, name: str) -> Path:
        file = self.path / name
        if not file.exists():
            raise FileNotFoundError(file)
        return file

    def _map_vectors(self, n_rows: int, dim: int | None) -> np.ndarray:
        if n_rows == 0 or dim is None:
            return np.zeros((0, dim or 0), dtype=np.float32)
        # Map only the committed rows: a writer may be appending past them right now.
        return np.memmap(self.path / _VECTORS_FILE, dtype=np.float32, mode="r", shape=(n_rows, dim))

    def _remove_stale_graphs(self) -> None:
        current = self._state.hnsw_file if self._state is not None else None
        for file in self.path.glob("hnsw.*"):
            if file.name != current:
                # Readers that already loaded it keep their copy; late readers retry on a new snapshot.
                file.unlink(missing_ok=True)

    def _set_meta(self, **values: object) -> None:
        self._db().executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [(key, str(value)) for key, value in values.items()],
        )

    # -- model signature -----------------------------------------------------------------------

    def signature(self) -> ModelSignature | None:
        with self._read() as state:
            return state.signature

    def claim(self, signature: ModelSignature) -> None:
        if not isinstance(signature, ModelSignature):
            raise TypeError(f"claim expects a ModelSignature, got {type(signature).__name__}")
        _require_positive_int("signature.dim", signature.dim)
        with self._write() as state:
            if state.signature is not None:
                if state.signature != signature:
                    raise ModelMismatchError(state.signature, signature)
                return
            if state.dim is not None and state.dim != signature.dim:
                raise ValueError(
                    f"vector dimension mismatch: store holds {state.dim}-d vectors, "
                    f"got {signature.dim}-d model {signature.describe()}"
                )
            generation = state.generation + 1
            self._set_meta(
                signature=json.dumps({"model": signature.model, "weights": signature.weights, "dim": signature.dim}),
                dim=signature.dim,
                generation=generation,
            )
            self._state = dataclasses.replace(state, generation=generation, signature=signature, dim=signature.dim)

    # -- writes ------------------------------------------------------------------------------

    def upsert(self, documents: Sequence[Document]) -> int:
        docs = _dedupe_last_wins(documents)
        if not docs:
            return 0
        matrix = _stack_document_vectors(docs)
        rows_payload = [_document_row(doc) for doc in docs]
        with self._write() as state:
            expected = state.dim if state.dim is not None else matrix.shape[1]
            if matrix.shape[1] != expected:
                raise ValueError(_dim_message(expected, matrix.shape[1], state.signature))
            conn = self._db()
            old_rows = self._live_rows_for([doc.id for doc in docs])
            start = state.n_rows
            self._append_vectors(start, matrix)
            self._tombstone(old_rows)
            conn.executemany(
                "INSERT INTO docs(row, id, text, metadata, content_hash) VALUES (?, ?, ?, ?, ?)",
                [(start + i, *payload) for i, payload in enumerate(rows_payload)],
            )
            conn.executemany(
                "INSERT INTO docs_fts(rowid, text) VALUES (?, ?)",
                [(start + i, doc.text) for i, doc in enumerate(docs)],
            )
            n_rows = start + len(docs)
            live = np.concatenate([state.live, np.ones(len(docs), dtype=bool)])
            live[old_rows] = False
            vectors = self._map_vectors(n_rows, expected)
            index = state.index if state.index is not None else self._new_index(expected)
            hnsw_dead = state.hnsw_dead + len(old_rows)
            if hnsw_dead > self.rebuild_tombstone_fraction * (index.ntotal + len(docs)):
                index, hnsw_dead = self._build_index(vectors, live), 0
            else:
                _add_to_index(index, matrix, np.arange(start, n_rows, dtype=np.int64))
            self._commit_state(state, n_rows=n_rows, dim=expected, live=live, vectors=vectors,
                               index=index, hnsw_dead=hnsw_dead, graph_changed=True)
        return len(docs)

    def delete(self, ids: Sequence[str]) -> int:
        wanted = list(dict.fromkeys(_validate_ids(ids)))
        if not wanted:
            return 0
        with self._write() as state:
            rows = self._live_rows_for(wanted)
            if len(rows) == 0:
                return 0
            self._tombstone(rows)
            live = state.live.copy()
            live[rows] = False
            index, hnsw_dead, graph_changed = state.index, state.hnsw_dead + len(rows), False
            if index is not None and hnsw_dead > self.rebuild_tombstone_fraction * index.ntotal:
                index, hnsw_dead, graph_changed = self._build_index(state.vectors, live), 0, True
            self._commit_state(state, n_rows=state.n_rows, dim=state.dim, live=live, vectors=state.vectors,
                               index=index, hnsw_dead=hnsw_dead, graph_changed=graph_changed)
        return len(rows)

    def _commit_state(
        self,
        state: _State,
        *,
        n_rows: int,
        dim: int | None,
        live: np.ndarray,
        vectors: np.ndarray,
        index: Any,
        hnsw_dead: int,
        graph_changed: bool,
    ) -> None:
        """Save the graph (if it changed) under a new name, then record the new generation."""
        generation = state.generation + 1
        hnsw_file = state.hnsw_file
        if graph_changed:
            hnsw_file = f"hnsw.{generation}.faiss"
            self._save_index(index, hnsw_file)
        values: dict[str, object] = {"generation": generation, "n_rows": n_rows, "hnsw_dead": hnsw_dead}
        if dim is not None:
            values["dim"] = dim
        if hnsw_file is not None:
            values["hnsw_file"] = hnsw_file
        self._set_meta(**values)
        self._state = _State(
            generation=generation, n_rows=n_rows, dim=dim, signature=state.signature, hnsw_file=hnsw_file,
            hnsw_dead=hnsw_dead, live=live, live_bits=_pack_bits(live), vectors=vectors, index=index,
        )

    def _live_rows_for(self, ids: Sequence[str]) -> np.ndarray:
        rows: list[int] = []
        for batch in _batched(ids, _SQL_BATCH):
            marks = ",".join("?" * len(batch))
            rows.extend(r for (r,) in self._db().execute(
                f"SELECT row FROM docs WHERE deleted = 0 AND id IN ({marks})", batch
            ))
        return np.asarray(sorted(rows), dtype=np.int64)

    def _tombstone(self, rows: np.ndarray) -> None:
        params = [(int(r),) for r in rows]
        self._db().executemany("UPDATE docs SET deleted = 1 WHERE row = ?", params)
        # Dead rows leave the FTS index so BM25 statistics describe live documents only.
        self._db().executemany("DELETE FROM docs_fts WHERE rowid = ?", params)

    def _append_vectors(self, start: int, matrix: np.ndarray) -> None:
        file = self.path / _VECTORS_FILE
        expected_bytes = start * matrix.shape[1] * 4
        with open(file, "ab") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size < expected_bytes:
                raise StoreError(f"{file} holds {size} bytes but {start} committed rows need {expected_bytes}")
            if size > expected_bytes:
                # Rows a crashed writer appended but never committed.
                handle.truncate(expected_bytes)
            handle.write(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
            handle.flush()
            os.fsync(handle.fileno())

    def _new_index(self, dim: int) -> Any:
        hnsw = faiss.IndexHNSWFlat(dim, self.m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.ef_construction
        return faiss.IndexIDMap(hnsw)

    def _build_index(self, vectors: np.ndarray, live: np.ndarray) -> Any:
        rows = np.flatnonzero(live).astype(np.int64)
        log.info("rebuilding HNSW of %s from %d live rows (dropping tombstones)", self.path, len(rows))
        index = self._new_index(vectors.shape[1])
        for batch in _batched(rows, _HNSW_ADD_BATCH):
            _add_to_index(index, np.asarray(vectors[batch]), batch)
        return index

    def _save_index(self, index: Any, name: str) -> None:
        final = self.path / name
        tmp = final.with_name(final.name + ".tmp")
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        # Readers open only names recorded in a committed generation, so they never see a partial file.
        os.replace(tmp, final)

    # -- reads ---------------------------------------------------------------------------------

    def count(self) -> int:
        with self._read() as state:
            return int(state.live.sum())

    def content_hashes(self) -> dict[str, str]:
        with self._read():
            return dict(self._db().execute("SELECT id, content_hash FROM docs WHERE deleted = 0"))

    def fetch(self, ids: Sequence[str]) -> list[Document]:
        wanted = _validate_ids(ids)
        with self._read() as state:
            found: dict[str, Document] = {}
            for batch in _batched(list(dict.fromkeys(wanted)), _SQL_BATCH):
                marks = ",".join("?" * len(batch))
                for row, doc_id, text, metadata, content_hash in self._db().execute(
                    f"SELECT row, id, text, metadata, content_hash FROM docs WHERE deleted = 0 AND id IN ({marks})",
                    batch,
                ):
                    found[doc_id] = Document(
                        id=doc_id, vector=np.array(state.vectors[row]), text=text,
                        metadata=json.loads(metadata), content_hash=content_hash,
                    )
        return [found[doc_id] for doc_id in wanted if doc_id in found]

    def vector_search(
        self, vector: np.ndarray, k: int, *, filters: Filters | None = None, exact: bool = False,
        ef_search: int | None = None,
    ) -> list[ScoredId]:
        _require_positive_int("k", k)
        k = int(k)
        with self._read() as state:
            if state.dim is None:
                return []
            query = _query_vector(vector, state.dim, state.signature)
            if filters:
                candidates = self._filtered_rows(filters)
                if len(candidates) == 0:
                    return []
                if exact or len(candidates) <= self.exact_filter_rows:
                    hits = _exact_over_rows(state.vectors, query, k, candidates)
                else:
                    hits = self._ann(state, query, k, _bitmap(candidates, state.n_rows), ef_search)
                    if len(hits) < min(k, len(candidates)):
                        # HNSW under a selective filter can run out of candidates: fall back to exact.
                        hits = _exact_over_rows(state.vectors, query, k, candidates)
            elif exact or state.index is None:
                hits = _exact_all(state.vectors, state.live, query, k)
            else:
                allowed = state.live_bits if state.hnsw_dead else None
                hits = self._ann(state, query, k, allowed, ef_search)
            return self._scored(hits)

    def _ann(self, state: _State, query: np.ndarray, k: int, allowed: np.ndarray | None,
             ef_search: int | None = None) -> list[tuple[int, float]]:
        params = faiss.SearchParametersHNSW()
        # HNSW returns at most efSearch results.
        params.efSearch = max(ef_search or self.ef_search, k)
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
        match = fts_match_expression(query)
        if match is None:
            return []
        where, params = _filter_sql(filters or {})
        if ids is not None:
            wanted = _validate_ids(ids)
            if not wanted:
                return []
            where += f" AND d.id IN ({','.join('?' * len(wanted))})"
            params.extend(wanted)
        if where:
            sql = (
                "SELECT d.id, -bm25(docs_fts) AS score FROM docs_fts JOIN docs d ON d.row = docs_fts.rowid "
                f"WHERE docs_fts MATCH ? AND d.deleted = 0{where} ORDER BY bm25(docs_fts), d.row LIMIT ?"
            )
        else:
            # Rank inside FTS5 first and join only the top k: bm25() is then computed once per
            # match and the join runs k times, not once per match (45 -> 25 ms for a query
            # matching 30k of 100k documents). Deleted rows are already gone from docs_fts.
            sql = (
                "SELECT d.id, -f.score FROM (SELECT rowid, bm25(docs_fts) AS score FROM docs_fts "
                "WHERE docs_fts MATCH ? ORDER BY score, rowid LIMIT ?) f JOIN docs d ON d.row = f.rowid "
                "ORDER BY f.score, d.row"
            )
        with self._read():
            rows = self._db().execute(sql, [match, *params, k]).fetchall()
        return [ScoredId(id=doc_id, score=float(score)) for doc_id, score in rows]

    def supports_native_hybrid(self, *, fusion: str, weights: tuple[float, float], exact: bool) -> bool:
        return False  # vector and BM25 lists are fused in Python (sidecar.retrieval.fusion)

    def hybrid_search(self, vector: np.ndarray, query: str, k: int, *, filters: Filters | None = None,
                      fusion: str = "minmax", weights: tuple[float, float] = (0.5, 0.5)) -> list[ScoredId]:
        raise StoreError("the embedded store has no native hybrid query; sidecar.retrieval.search fuses its "
                         "vector and BM25 results")

    def rebuild(self, documents: Iterable[Document], *, signature: ModelSignature) -> str:
        raise StoreError(f"the embedded store at {self.path} is updated in place (readers always see a complete "
                         "generation); --rebuild is for OpenSearch's versioned indices")

    def _filtered_rows(self, filters: Filters) -> np.ndarray:
        where, params = _filter_sql(filters)
        cursor = self._db().execute(f"SELECT d.row FROM docs d WHERE d.deleted = 0{where} ORDER BY d.row", params)
        return np.fromiter((r for (r,) in cursor), dtype=np.int64)

    def _scored(self, hits: list[tuple[int, float]]) -> list[ScoredId]:
        if not hits:
            return []
        marks = ",".join("?" * len(hits))
        ids = dict(self._db().execute(f"SELECT row, id FROM docs WHERE row IN ({marks})", [r for r, _ in hits]))
        return [ScoredId(id=ids[row], score=score) for row, score in hits]


# -- helpers ---------------------------------------------------------------------------------


def fts_match_expression(query: str) -> str | None:
    """User text -> an FTS5 MATCH expression: each word quoted, OR-combined (BM25 "match" semantics).

    Quoting makes FTS5 operators and punctuation in user text inert; None when no word remains.
    """
    words = list(dict.fromkeys(_WORD.findall(query.lower())))[:_MAX_QUERY_TERMS]
    if not words:
        return None
    return " OR ".join(f'"{word}"' for word in words)


def _filter_sql(filters: Filters) -> tuple[str, list[Any]]:
    """Metadata filters -> SQL over alias `d`; a field matches if it (or any element of a list field) equals a value."""
    if not isinstance(filters, dict) and not hasattr(filters, "items"):
        raise TypeError(f"filters must be a mapping of field -> value(s), got {type(filters).__name__}")
    clauses: list[str] = []
    params: list[Any] = []
    for field, value in filters.items():
        if not isinstance(field, str) or not field or '"' in field:
            raise ValueError(f"filter field must be a non-empty string without '\"', got {field!r}")
        values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        # numpy scalars (np.int64 from a DataFrame, say) become Python values SQLite can bind.
        values = [item.item() if isinstance(item, np.generic) else item for item in values]
        if not values:
            raise ValueError(f"filter {field!r} has an empty list of values")
        for item in values:
            if not isinstance(item, (str, int, float)) or (isinstance(item, float) and not math.isfinite(item)):
                raise ValueError(f"filter {field!r}: values must be strings, numbers or booleans, got {item!r}")
        # json_each yields the scalar itself, or each element of a JSON array: term-filter semantics.
        clauses.append(
            f" AND EXISTS (SELECT 1 FROM json_each(d.metadata, ?) AS j WHERE j.value IN ({','.join('?' * len(values))}))"
        )
        params.extend([f'$."{field}"', *values])
    return "".join(clauses), params


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


def _document_row(doc: Document) -> tuple[str, str, str, str]:
    if not isinstance(doc.text, str) or not isinstance(doc.content_hash, str):
        raise ValueError(f"document {doc.id!r}: text and content_hash must be strings")
    try:
        metadata = json.dumps(dict(doc.metadata), ensure_ascii=False, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"document {doc.id!r}: metadata must be JSON-serialisable: {exc}") from exc
    return doc.id, doc.text, metadata, doc.content_hash


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
        raise ValueError(_dim_message(dim, query.shape[0], signature))
    if not np.isfinite(query).all():
        raise ValueError("query vector has NaN or infinite values")
    return np.ascontiguousarray(query, dtype=np.float32)


def _add_to_index(index: Any, matrix: np.ndarray, rows: np.ndarray) -> None:
    for start in range(0, len(rows), _HNSW_ADD_BATCH):
        stop = start + _HNSW_ADD_BATCH
        index.add_with_ids(np.ascontiguousarray(matrix[start:stop], dtype=np.float32), rows[start:stop])


def _bitmap(rows: np.ndarray, n_rows: int) -> np.ndarray:
    mask = np.zeros(n_rows, dtype=bool)
    mask[rows] = True
    return _pack_bits(mask)


def _pack_bits(mask: np.ndarray) -> np.ndarray:
    # faiss.IDSelectorBitmap reads bit (i & 7) of byte i >> 3: little bit order.
    return np.packbits(mask, bitorder="little")


def _top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(scores) > k:
        keep = np.argpartition(-scores, k - 1)[:k]
        scores, rows = scores[keep], rows[keep]
    return scores, rows


def _ranked(scores: np.ndarray, rows: np.ndarray) -> list[tuple[int, float]]:
    # Ties break by row number so exact results are deterministic.
    order = np.lexsort((rows, -scores))
    return [(int(rows[i]), float(scores[i])) for i in order if np.isfinite(scores[i])]


def _exact_all(vectors: np.ndarray, live: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    best_scores = np.empty(0, dtype=np.float32)
    best_rows = np.empty(0, dtype=np.int64)
    for start in range(0, len(vectors), _EXACT_CHUNK_ROWS):
        stop = min(start + _EXACT_CHUNK_ROWS, len(vectors))
        scores = np.asarray(vectors[start:stop]) @ query
        scores[~live[start:stop]] = -np.inf
        scores, rows = _top_k(scores, np.arange(start, stop, dtype=np.int64), k)
        best_scores, best_rows = _top_k(np.concatenate([best_scores, scores]), np.concatenate([best_rows, rows]), k)
    return _ranked(best_scores, best_rows)


def _exact_over_rows(vectors: np.ndarray, query: np.ndarray, k: int, rows: np.ndarray) -> list[tuple[int, float]]:
    best_scores = np.empty(0, dtype=np.float32)
    best_rows = np.empty(0, dtype=np.int64)
    for batch in _batched(rows, _EXACT_CHUNK_ROWS):
        scores, kept = _top_k(vectors[batch] @ query, batch, k)
        best_scores, best_rows = _top_k(np.concatenate([best_scores, scores]), np.concatenate([best_rows, kept]), k)
    return _ranked(best_scores, best_rows)


def _batched(items: Any, size: int) -> Iterator[Any]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
