"""Text-vector cache: in-memory LRU over a bounded persistent SQLite table; identical concurrent misses
computed once; the table read once per forward batch and written by a thread of its own."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from sidecar.errors import EncodeTimeout
from sidecar.serving import metrics
from sidecar.sqlite_files import identity, move_aside, one_process_at_a_time, unreadable
from sidecar.threads import NamedThread

log = logging.getLogger(__name__)

# Eviction takes the table down to this share of its bound, so it runs once per many inserts
# rather than on every one.
_EVICT_TO = 0.9
# Rows the writer thread puts in one transaction at most.
_WRITE_BATCH = 1024
# After a write arrives the writer waits this long for more before it commits: one transaction
# (and one wake-up of its thread) per 50 ms instead of per batch of the model. A commit per batch
# cost the server 0.3 ms of CPU per request at low concurrency (bench/RESULTS.md); the price is
# that a vector computed in the last 50 ms before a crash is computed again.
_WRITE_LINGER_S = 0.05
# SQLite leaves the write-ahead log file at the largest size one transaction gave it (an eviction
# of a tenth of the table, a prompt set's first encode: tens of MB for 20k rows); with a limit it
# cuts the file back to it when the log next starts over, so the cache's disk use stays bounded.
_WAL_SIZE_LIMIT = 8 << 20
# SQLITE_CANTOPEN: "unable to open database file", naming neither the file nor why.
_CANTOPEN = 14
# A failing read or write is logged at most this often: it recurs on every batch until the file is replaced
# (or, for writes, made writable again).
_WARNING_EVERY_S = 60.0


class CachedText(NamedTuple):
    vector: np.ndarray
    tokens: int  # the text's token count before truncation, start and end tokens included


def cache_namespace(*, model: str, weights: str, prompt_template: str, prompt_version: str) -> str:
    """Vectors are only reusable for the same model, weights and prompt template version."""
    return f"{model}|{weights}|{prompt_version}|{prompt_template}"


class NamespaceUsage(NamedTuple):
    """What the file holds under one namespace (`cache_namespace`)."""
    namespace: str
    vectors: int
    bytes: int  # the rows' contents (vector, key, namespace); SQLite's index and free pages come on top
    last_used_ns: int  # time.time_ns() of the most recent write or disk read; 0 for rows from before it was kept
    stale: bool  # rows from before token counts were kept: never read again (recomputed, then replaced)

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """model, weights, prompt version, prompt template (a template may hold "|"; it is last)."""
        model, weights, version, template = (self.namespace.split("|", 3) + ["", "", ""])[:4]
        return model, weights, version, template


def _open_file(path: Path) -> tuple[sqlite3.Connection, set[str]]:
    """A connection to an existing cache file (FileNotFoundError where there is none: it is not created
    here) and its table's columns (none where no server has created the table yet)."""
    if path.is_dir():  # SQLite would say only "unable to open database file"
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    db = TextVectorCache._connect(path)
    return db, {row[1] for row in db.execute("PRAGMA table_info(text_vectors)")}


def _stale(columns: set[str]) -> str:
    """SQL true of a row no server reads: one from before token counts were kept (it is recomputed)."""
    return "tokens IS NULL" if "tokens" in columns else "1"


def file_bytes(path: Path) -> int:
    """The file's size on disk with its write-ahead log."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def usage(path: Path) -> list[NamespaceUsage]:
    """Per namespace (stale rows apart), what the file at `path` holds, most vectors first. Reads only:
    safe beside a running server."""
    db, columns = _open_file(path)
    try:
        if not columns:
            return []
        last_used = "max(last_used)" if "last_used" in columns else "0"  # a file from before the bound
        rows = db.execute(f"SELECT namespace, count(*), sum(length(vector) + length(key) + length(namespace)), "
                          f"{last_used}, {_stale(columns)} AS stale FROM text_vectors GROUP BY namespace, stale "
                          "ORDER BY count(*) DESC, namespace").fetchall()
    finally:
        db.close()
    return [NamespaceUsage(ns, count, size or 0, used or 0, bool(stale)) for ns, count, size, used, stale in rows]


def remove(path: Path, *, keep: Sequence[str] | None) -> int:
    """Delete the rows of every namespace but those in `keep` (None: every row), and stale rows, then
    give the space back to the disk; returns how many rows went.

    A server sharing the file goes on: its reads see the rows until the delete commits, then miss and
    encode again (what it holds in memory it still answers from); its writes wait for the delete and
    the VACUUM (SQLite's busy timeout, 30 s) and one that waits longer is dropped with a warning.
    VACUUM needs free disk space of about the remaining rows' size while it runs."""
    db, columns = _open_file(path)
    try:
        if not columns:
            return 0
        if keep is None:
            deleted = db.execute("DELETE FROM text_vectors").rowcount
        else:
            others = f"namespace NOT IN ({','.join('?' * len(keep))})" if keep else "1"
            deleted = db.execute(f"DELETE FROM text_vectors WHERE {_stale(columns)} OR {others}", list(keep)).rowcount
        if deleted:
            db.execute("VACUUM")
            # VACUUM writes the whole file again into the write-ahead log; a checkpoint copies it back
            # and empties the log (as far as no reader still needs the old pages).
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return deleted


class TextVectorCache:
    """`capacity` vectors in memory (LRU); with a `path`, a SQLite table under them shared by every
    process that opens the file, holding at most `max_entries` vectors (all namespaces together):
    past that, the least recently used go first. A vector's last use on disk is when it was last
    written or read from disk (a hit in memory does not touch the file).

    `get_or_compute` answers from memory and hands the rest to `compute` (the micro-batcher);
    `through_disk(encode)` is what the batcher runs: one table lookup for the whole batch, `encode`
    for what the table lacks. Writes (new vectors, and the last-use times of rows read) go to a
    writer thread that commits them in batches, off the request path: a vector computed moments
    before a crash may be computed again after it, nothing worse."""

    def __init__(self, path: Path | None, *, namespace: str, capacity: int, max_entries: int = 200_000,
                 role: metrics.ModelRole = "coarse"):
        self.namespace = namespace
        self.capacity = capacity
        self.max_entries = max_entries
        # Resolved once, under this cache's `model` label: a labels() call per request is measurable on
        # the request path.
        self._hits = metrics.CACHE_LOOKUPS.labels("hit", role)
        self._disk_hits = metrics.CACHE_LOOKUPS.labels("disk_hit", role)
        self._misses = metrics.CACHE_LOOKUPS.labels("miss", role)
        self._lru: OrderedDict[str, CachedText] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._path = path
        # Two connections, each under its lock; a thread replacing an unreadable file takes both, in this order.
        self._db: sqlite3.Connection | None = None  # reads (the batcher thread), counts
        self._db_lock = threading.Lock()
        self._write_db: sqlite3.Connection | None = None  # the writer thread's
        self._write_lock = threading.Lock()
        self._opened: tuple[int, int] | None = None  # the file the connections are to (`sqlite_files.identity`)
        self._read_warned_at = self._write_warned_at = -_WARNING_EVERY_S
        self._failed_writes = 0  # rows the writer could not write since it last said so
        self.write_error: sqlite3.Error | None = None  # the last write that failed (`cache warm` reports it)
        self._writes: queue.Queue[tuple[str, list] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # gunicorn boots its workers together, each opening the file here: a collision would stop a
            # worker from booting (tests/unit/serving/test_cache.py).
            with one_process_at_a_time(path):
                self._open_tables(path)
            self._writer = NamedThread(target=self._write_loop, name=f"{'text' if role == 'coarse' else role}-cache-writer",
                                       daemon=True)
            self._writer.start()

    def _open_tables(self, path: Path) -> None:
        """Connects, creating or upgrading the table. A file SQLite cannot read (a disk fault, a copy cut
        short) is moved aside and a new one begun: every row can be computed again, and a worker that
        refused to boot over its cache would stop serving for want of an optimisation."""
        try:
            self._create_tables(path)
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) == _CANTOPEN:
                # A folder at the path, one the process may not write: the operator's to fix. The OS says which
                # file and why, where SQLite does not (the CLI turns it into one line naming the setting).
                with open(path, "ab"):
                    pass
            if not unreadable(exc):
                raise  # a locked file: the operator's to fix, said as SQLite says it
            self._begin_again(exc)

    def _begin_again(self, exc: sqlite3.DatabaseError) -> None:
        """Under `one_process_at_a_time`: move aside the unreadable file the connections are to, unless another
        process has begun a new one at the path since, and connect to the file now there."""
        for db in (self._db, self._write_db):
            if db is not None:
                db.close()
        self._db = self._write_db = None
        if identity(self._path) == self._opened:
            aside = move_aside(self._path)
            log.warning("text-vector cache: %s cannot be read (%s); moved to %s and began a new one (texts are "
                        "encoded again as they come)", self._path, exc, aside.name)
        self._create_tables(self._path)

    def _replace_unreadable(self, exc: sqlite3.DatabaseError, opened: tuple[int, int] | None) -> None:
        """The file `opened`, found unreadable under the running server (a disk fault), begun again as at start-up,
        where every read missed and every write failed until the worker restarted. Each worker sharing the file
        finds it unreadable; the first moves it aside, the others connect to the new one."""
        with self._db_lock, self._write_lock, one_process_at_a_time(self._path):
            if self._db is None or self._opened != opened:
                return  # the other thread of this worker has begun it again (or given up) since
            try:
                self._begin_again(exc)
            except sqlite3.Error as again:
                for db in (self._db, self._write_db):
                    if db is not None:
                        db.close()
                self._db = self._write_db = None
                log.warning("text-vector cache: %s cannot be read (%s) nor begun again (%s); this worker keeps "
                            "vectors in memory only until it restarts", self._path, exc, again)

    def _create_tables(self, path: Path) -> None:
        try:
            self._db = self._connect(path)
        finally:  # under one_process_at_a_time: the file connected to, or found unreadable (`_begin_again`)
            self._opened = identity(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS text_vectors (namespace TEXT, key TEXT, vector BLOB, "
                         "last_used INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (namespace, key))")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(text_vectors)")}
        if "last_used" not in columns:  # a file from before the bound: its rows count as least recent
            self._db.execute("ALTER TABLE text_vectors ADD COLUMN last_used INTEGER NOT NULL DEFAULT 0")
        if "tokens" not in columns:  # a file from before token counts were kept: such rows are recomputed
            self._db.execute("ALTER TABLE text_vectors ADD COLUMN tokens INTEGER")
        self._db.execute("CREATE INDEX IF NOT EXISTS text_vectors_last_used ON text_vectors (last_used)")
        # Rows in the file as this process last counted them, plus what it inserted since;
        # other processes' inserts show up at the next count.
        self._rows = self._db.execute("SELECT count(*) FROM text_vectors").fetchone()[0]
        self._uncounted = 0  # rows this process inserted since it last counted the file's
        self._write_db = self._connect(path)
        self._evict_if_over()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        return db

    def get_or_compute(self, texts: Sequence[str], compute: Callable[[list[str]], Sequence[CachedText]], *,
                       timeout_s: float) -> list[CachedText]:
        """Entries for `texts` in order; `compute` runs once for the texts nobody has in memory or is
        computing. Texts another request is computing are awaited at most until `timeout_s` after the
        call (EncodeTimeout after), so a computation that never finishes holds nobody for ever."""
        deadline = time.monotonic() + timeout_s
        results: list[CachedText | None] = [None] * len(texts)
        waiting: list[tuple[int, Future]] = []
        mine: dict[str, Future] = {}
        with self._lock:
            for i, text in enumerate(texts):
                entry = self._lru.get(text)
                if entry is not None:
                    self._lru.move_to_end(text)
                    results[i] = entry
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
        self._hits.inc(hits + (len(waiting) - len(mine)))  # what `mine` holds, through_disk counts
        for i, future in waiting:
            try:
                results[i] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout as exc:
                raise EncodeTimeout(f"text encode took longer than request_timeout_s={timeout_s} (waiting for "
                                    "another request's encode of the same text)") from exc
        return results  # type: ignore[return-value]  # every slot is filled above

    def _fill(self, texts: list[str], futures: dict[str, Future],
              compute: Callable[[list[str]], Sequence[CachedText]]) -> None:
        try:
            computed = compute(texts)
        except BaseException as exc:
            with self._lock:
                for text in texts:
                    self._inflight.pop(text, None)
            for future in futures.values():
                future.set_exception(exc)
            raise
        # Each vector a copy of its own: a forward's rows are views of the batch's array, and one row kept in
        # memory kept the whole batch alive (up to max_batch vectors an entry, past text_cache_size's bound).
        computed = [CachedText(np.array(entry.vector, dtype=np.float32), entry.tokens) for entry in computed]
        with self._lock:
            for text, entry in zip(texts, computed):
                self._lru[text] = entry
                self._inflight.pop(text, None)
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
        for text, entry in zip(texts, computed):
            futures[text].set_result(entry)

    def through_disk(self, encode: Callable[[list[str]], Sequence[CachedText]]
                     ) -> Callable[[Sequence[str]], list[CachedText]]:
        """`encode` behind the persistent table: the returned function reads the table once for all
        its texts, encodes the others and queues them for the writer thread."""
        def load_or_encode(texts: Sequence[str]) -> list[CachedText]:
            found = self._load(texts)
            missing = [t for t in dict.fromkeys(texts) if t not in found]
            self._disk_hits.inc(len(found))
            self._misses.inc(len(missing))
            if missing:
                fresh = dict(zip(missing, encode(missing)))
                self._save(fresh)
                found.update(fresh)
            return [found[t] for t in texts]
        return load_or_encode

    def _key(self, text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _load(self, texts: Sequence[str]) -> dict[str, CachedText]:
        keys = {self._key(t): t for t in texts}
        found: dict[str, CachedText] = {}
        touched: list[str] = []
        damaged: sqlite3.DatabaseError | None = None
        with self._db_lock:
            if self._db is None:
                return {}
            try:
                for start in range(0, len(keys), 500):
                    chunk = list(keys)[start:start + 500]
                    for key, blob, tokens in self._db.execute(
                            f"SELECT key, vector, tokens FROM text_vectors WHERE namespace = ? AND key IN "
                            f"({','.join('?' * len(chunk))}) AND tokens IS NOT NULL", [self.namespace, *chunk]):
                        found[keys[key]] = CachedText(np.frombuffer(blob, dtype=np.float32), tokens)
                        touched.append(key)
            except sqlite3.DatabaseError as exc:
                if unreadable(exc):
                    damaged, opened = exc, self._opened
                else:  # an I/O error: misses, as a failed write is
                    now = time.monotonic()
                    if now - self._read_warned_at >= _WARNING_EVERY_S:
                        self._read_warned_at = now
                        log.warning("text-vector cache: reading the file failed (%s); its texts are encoded again",
                                    exc)
        if damaged is not None:  # these texts miss; the file is begun again (outside the read lock: it takes both)
            self._replace_unreadable(damaged, opened)
            return {}
        if touched:  # a use: these rows move to the recent end
            self._writes.put(("touch", touched))
        return found

    def _save(self, entries: dict[str, CachedText]) -> None:
        if self._db is None or not entries:
            return
        self._writes.put(("insert", [(self.namespace, self._key(t), np.asarray(e.vector, dtype=np.float32).tobytes(),
                                      e.tokens) for t, e in entries.items()]))

    def flush(self) -> None:
        """Wait until every write queued so far is committed."""
        if self._writer is not None:
            self._writes.join()

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            if item is not None:
                time.sleep(_WRITE_LINGER_S)
            batch = [item]
            while item is not None and sum(len(rows) for _, rows in batch) < _WRITE_BATCH:
                try:
                    item = self._writes.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            try:
                self._write_or_begin_again([work for work in batch if work is not None])
            except sqlite3.Error as exc:  # a full disk, a read-only file: the cache misses, serving goes on
                self.write_error = exc
                self._failed_writes += sum(len(rows) for _, rows in (work for work in batch if work is not None))
                now = time.monotonic()
                if now - self._write_warned_at >= _WARNING_EVERY_S:
                    self._write_warned_at = now
                    log.warning("text-vector cache: %d vectors (or their last-use times) could not be written: %s "
                                "(their texts are encoded again; said at most once a minute)",
                                self._failed_writes, exc)
                    self._failed_writes = 0
            finally:
                for _ in batch:
                    self._writes.task_done()
            if batch[-1] is None:
                return

    def _write_or_begin_again(self, batch: list[tuple[str, list]]) -> None:
        """`batch` written; into a new file where the file turns out unreadable (`_replace_unreadable`)."""
        opened = self._opened
        try:
            self._write(batch)
        except sqlite3.DatabaseError as exc:
            if not unreadable(exc):
                raise
            self._replace_unreadable(exc, opened)
            self._write(batch)

    def _write(self, batch: list[tuple[str, list]]) -> None:
        if not batch:
            return
        with self._write_lock:
            if self._write_db is not None:
                self._write_in(self._write_db, batch)

    def _write_in(self, db: sqlite3.Connection, batch: list[tuple[str, list]]) -> None:
        now = time.time_ns()
        db.execute("BEGIN")
        try:
            for kind, rows in batch:
                if kind == "insert":
                    db.executemany("INSERT OR REPLACE INTO text_vectors (namespace, key, vector, tokens, last_used) "
                                   "VALUES (?, ?, ?, ?, ?)", [(*row, now) for row in rows])
                    self._rows += len(rows)
                    self._uncounted += len(rows)
                else:
                    db.executemany("UPDATE text_vectors SET last_used = ? WHERE namespace = ? AND key = ?",
                                   [(now, self.namespace, key) for key in rows])
            self._evict_if_over()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite ends it itself on some errors (an unreadable file's among them)
                db.execute("ROLLBACK")
            raise

    def _evict_if_over(self) -> None:
        """Past max_entries, drop the least recently used rows down to 90 % of it. Runs on the writer
        thread (or in the constructor).

        The rows are counted in the file (other processes' inserts included) whenever this process's own
        count says the bound is passed, and after each hundredth of it this process inserted: the workers
        sharing a file each insert a share, and none would otherwise see the file pass the bound (N
        workers took it to N times it). The file passes it by at most a hundredth per process; a
        count costs ~10 ms at 200,000 rows, once per 2,000 inserts of each process."""
        if self._rows <= self.max_entries and self._uncounted < max(1, self.max_entries // 100):
            return
        db = self._write_db
        self._rows = db.execute("SELECT count(*) FROM text_vectors").fetchone()[0]
        self._uncounted = 0
        excess = self._rows - int(self.max_entries * _EVICT_TO)
        if self._rows <= self.max_entries or excess <= 0:
            return
        db.execute("DELETE FROM text_vectors WHERE rowid IN "
                   "(SELECT rowid FROM text_vectors ORDER BY last_used LIMIT ?)", [excess])
        log.info("text-vector cache: evicted the %d least recently used of %d vectors (limit %d, "
                 "text_cache_max_entries)", excess, self._rows, self.max_entries)
        self._rows -= excess

    def persisted_count(self) -> int:
        self.flush()
        with self._db_lock:
            if self._db is None:
                return 0
            return self._db.execute("SELECT count(*) FROM text_vectors WHERE namespace = ?",
                                    [self.namespace]).fetchone()[0]

    def close(self) -> None:
        """Commit the queued writes, stop the writer thread, close the file."""
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join()
            self._writer = None
        if self._write_db is not None:
            self._write_db.close()
            self._write_db = None
        if self._db is not None:
            self._db.close()
            self._db = None
