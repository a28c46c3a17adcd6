"""Text-vector cache: in-memory LRU over a bounded persistent SQLite table; identical concurrent misses
computed once."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sidecar.errors import EncodeTimeout
from sidecar.serving import metrics

log = logging.getLogger(__name__)

# Eviction takes the table down to this share of its bound, so it runs once per many inserts
# rather than on every one.
_EVICT_TO = 0.9


def cache_namespace(*, model: str, weights: str, prompt_template: str, prompt_version: str) -> str:
    """Vectors are only reusable for the same model, weights and prompt template version."""
    return f"{model}|{weights}|{prompt_version}|{prompt_template}"


class TextVectorCache:
    """`capacity` vectors in memory (LRU); with a `path`, a SQLite table under them shared by every
    process that opens the file, holding at most `max_entries` vectors (all namespaces together):
    past that, the least recently used go first. A vector's last use on disk is when it was last
    written or read from disk (a hit in memory does not touch the file)."""

    def __init__(self, path: Path | None, *, namespace: str, capacity: int, max_entries: int = 200_000):
        self.namespace = namespace
        self.capacity = capacity
        self.max_entries = max_entries
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS text_vectors (namespace TEXT, key TEXT, vector BLOB, "
                             "last_used INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (namespace, key))")
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(text_vectors)")}
            if "last_used" not in columns:  # a file from before the bound: its rows count as least recent
                self._db.execute("ALTER TABLE text_vectors ADD COLUMN last_used INTEGER NOT NULL DEFAULT 0")
            self._db.execute("CREATE INDEX IF NOT EXISTS text_vectors_last_used ON text_vectors (last_used)")
            # Rows in the file as this process last counted them, plus what it inserted since;
            # other processes' inserts show up at the next count.
            self._rows = self._db.execute("SELECT count(*) FROM text_vectors").fetchone()[0]
            self._evict_if_over()

    def get_or_compute(self, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray], *,
                       timeout_s: float) -> np.ndarray:
        """Vectors for `texts` in order; `compute` runs once for the texts nobody has or is computing.
        Texts another request is computing are awaited at most until `timeout_s` after the call
        (EncodeTimeout after), so a computation that never finishes holds nobody for ever."""
        deadline = time.monotonic() + timeout_s
        results: list[np.ndarray | None] = [None] * len(texts)
        waiting: list[tuple[int, Future]] = []
        mine: dict[str, Future] = {}
        with self._lock:
            for i, text in enumerate(texts):
                if text in self._lru:
                    self._lru.move_to_end(text)
                    results[i] = self._lru[text]
                elif text in self._inflight:
                    waiting.append((i, self._inflight[text]))
                elif text in mine:
                    waiting.append((i, mine[text]))
                else:
                    mine[text] = self._inflight[text] = Future()
                    waiting.append((i, mine[text]))
        hits = len(texts) - len(waiting)
        if mine:
            self._fill(list(mine), mine, compute)
        metrics.CACHE_LOOKUPS.labels("hit").inc(hits + (len(waiting) - len(mine)))
        metrics.CACHE_LOOKUPS.labels("miss").inc(len(mine))
        for i, future in waiting:
            try:
                results[i] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout as exc:
                raise EncodeTimeout(f"text encode took longer than request_timeout_s={timeout_s} (waiting for "
                                    "another request's encode of the same text)") from exc
        return np.stack(results) if results else np.zeros((0, 0), dtype=np.float32)

    def _fill(self, texts: list[str], futures: dict[str, Future], compute: Callable[[list[str]], np.ndarray]) -> None:
        try:
            stored = self._load(texts)
            missing = [t for t in texts if t not in stored]
            if missing:
                computed = compute(missing)
                fresh = dict(zip(missing, computed))
                self._save(fresh)
                stored.update(fresh)
        except BaseException as exc:
            with self._lock:
                for text in texts:
                    self._inflight.pop(text, None)
            for future in futures.values():
                future.set_exception(exc)
            raise
        with self._lock:
            for text in texts:
                self._lru[text] = stored[text]
                self._inflight.pop(text, None)
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
        for text, future in futures.items():
            future.set_result(stored[text])

    def _key(self, text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _load(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self._db is None:
            return {}
        keys = {self._key(t): t for t in texts}
        found: dict[str, np.ndarray] = {}
        with self._db_lock:
            for start in range(0, len(texts), 500):
                chunk = list(keys)[start:start + 500]
                rows = self._db.execute(
                    f"SELECT key, vector FROM text_vectors WHERE namespace = ? AND key IN ({','.join('?' * len(chunk))})",
                    [self.namespace, *chunk]).fetchall()
                for key, blob in rows:
                    found[keys[key]] = np.frombuffer(blob, dtype=np.float32)
                if rows:  # a use: these rows move to the recent end
                    self._db.execute(
                        f"UPDATE text_vectors SET last_used = ? WHERE namespace = ? "
                        f"AND key IN ({','.join('?' * len(rows))})",
                        [time.time_ns(), self.namespace, *(key for key, _ in rows)])
        return found

    def _save(self, vectors: dict[str, np.ndarray]) -> None:
        if self._db is None or not vectors:
            return
        now = time.time_ns()
        rows = [(self.namespace, self._key(t), np.asarray(v, dtype=np.float32).tobytes(), now)
                for t, v in vectors.items()]
        with self._db_lock:
            self._db.executemany("INSERT OR REPLACE INTO text_vectors (namespace, key, vector, last_used) "
                                 "VALUES (?, ?, ?, ?)", rows)
            self._rows += len(rows)
            self._evict_if_over()

    def _evict_if_over(self) -> None:
        """Past max_entries (as counted, other processes' inserts included), drop the least recently
        used rows down to 90 % of it. Callers hold _db_lock (or are the constructor)."""
        if self._rows <= self.max_entries:
            return
        self._rows = self._db.execute("SELECT count(*) FROM text_vectors").fetchone()[0]
        excess = self._rows - int(self.max_entries * _EVICT_TO)
        if self._rows <= self.max_entries or excess <= 0:
            return
        self._db.execute("DELETE FROM text_vectors WHERE rowid IN "
                         "(SELECT rowid FROM text_vectors ORDER BY last_used LIMIT ?)", [excess])
        log.info("text-vector cache: evicted the %d least recently used of %d vectors (limit %d, "
                 "text_cache_max_entries)", excess, self._rows, self.max_entries)
        self._rows -= excess

    def persisted_count(self) -> int:
        if self._db is None:
            return 0
        with self._db_lock:
            return self._db.execute("SELECT count(*) FROM text_vectors WHERE namespace = ?",
                                    [self.namespace]).fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
