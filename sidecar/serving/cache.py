"""Text-vector cache: in-memory LRU over a persistent SQLite table; identical concurrent misses computed once."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sidecar.serving import metrics


def cache_namespace(*, model: str, weights: str, prompt_template: str, prompt_version: str) -> str:
    """Vectors are only reusable for the same model, weights and prompt template version."""
    return f"{model}|{weights}|{prompt_version}|{prompt_template}"


class TextVectorCache:
    def __init__(self, path: Path | None, *, namespace: str, capacity: int):
        self.namespace = namespace
        self.capacity = capacity
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS text_vectors (namespace TEXT, key TEXT, vector BLOB, "
                             "PRIMARY KEY (namespace, key))")
            self._db_lock = threading.Lock()

    def get_or_compute(self, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Vectors for `texts` in order; `compute` runs once for the texts nobody has or is computing."""
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
            results[i] = future.result()
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
        return found

    def _save(self, vectors: dict[str, np.ndarray]) -> None:
        if self._db is None or not vectors:
            return
        rows = [(self.namespace, self._key(t), np.asarray(v, dtype=np.float32).tobytes()) for t, v in vectors.items()]
        with self._db_lock:
            self._db.executemany("INSERT OR REPLACE INTO text_vectors VALUES (?, ?, ?)", rows)

    def persisted_count(self) -> int:
        if self._db is None:
            return 0
        with self._db_lock:
            return self._db.execute("SELECT count(*) FROM text_vectors WHERE namespace = ?",
                                    [self.namespace]).fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
