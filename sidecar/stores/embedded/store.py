"""The embedded store: versions of `VersionStore` in one folder, the `current` pointer readers follow,
zero-downtime rebuilds beside the current version, and the locks between processes."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import logging
import os
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from sidecar.sqlite_files import unreadable
from sidecar.stores.base import (
    FacetCounts,
    QueryModelMismatch,
    StoreError,
    StoreLocked,
    StoreReport,
)
from sidecar.stores.effort import EffortPolicy
from sidecar.stores.embedded.version import (
    BM25_DIR,
    CALIBRATION_FILE,
    DB_FILE,
    LOCK_FILE,
    MAX_READ_RETRIES,
    REINDEX_ADVICE,
    VECTORS_FILE,
    EmbeddedLoad,
    VersionStore,
    fsync_directory,
    written_beside_database,
)
from sidecar.threads import NamedThread
from sidecar.types import Document, Filters, ModelSignature, ScoredId

log = logging.getLogger(__name__)

# -- versions: what `EmbeddedStore` follows ---------------------------------------------------

# The symlink naming the version directory readers open; absent: version 0, the store's own directory.
_POINTER = "current"
_POINTER_NEW = ".current.new"  # the next pointer, renamed over `current` (not *.tmp: version 0 removes those)
_VERSION_PREFIX = "version."
# Per version: each process with the version open holds it shared; removing the version takes it exclusive.
_READ_LOCK_FILE = "read.lock"
# `index` sessions hold it shared, a rebuild exclusive; the rebuild writes who it is into it.
_LOAD_LOCK_FILE = "load.lock"
# Version 0's files beside the pointer and the version directories (besides hnsw.*, *.tmp and bm25/).
_ROOT_VERSION_FILES = (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-journal", VECTORS_FILE,
                       CALIBRATION_FILE, LOCK_FILE)
# Documents a rebuild writes per commit into the new version (one SQLite transaction, one BM25 commit).
_REBUILD_BATCH = 10_000
_LOAD_LOCK_POLL_S = 0.1


@dataclasses.dataclass(eq=False)
class _Opened:
    """A version this process has open: its store, the descriptor holding its read.lock shared (so no
    process removes its files meanwhile), and how many calls are using it now."""

    number: int
    store: VersionStore
    handle: int
    users: int = 0


class _Using:
    """`with store._version() as opened:` — the current version, in use until the block ends. A class, not
    a generator-based context manager: it wraps every store call, and costs a third of one."""

    __slots__ = ("_store", "_opened")

    def __init__(self, store: EmbeddedStore):
        self._store = store

    def __enter__(self) -> _Opened:
        self._opened = self._store._follow()
        return self._opened

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        self._store._release(self._opened)
        # Every store call passes here: the one place a damaged store.sqlite becomes one error naming the file.
        if isinstance(exc, sqlite3.DatabaseError) and unreadable(exc):
            raise self._opened.store.unreadable_error(exc) from exc


class _OneVersion:
    """`EmbeddedStore.one_version`'s block. A class, as `_Using`: the app enters one around every request."""

    __slots__ = ("_store", "_outer")

    def __init__(self, store: EmbeddedStore):
        self._store = store

    def __enter__(self) -> None:
        pin = self._store._pinned
        self._outer = not getattr(pin, "active", False)
        if self._outer:
            pin.active, pin.opened = True, None

    def __exit__(self, *exc_info: object) -> None:
        if self._outer:
            pin = self._store._pinned
            opened, pin.active, pin.opened = pin.opened, False, None
            if opened is not None:
                self._store._release(opened)


class _VersionGone(Exception):
    """The version being opened was replaced and removed meanwhile: read the pointer again."""


class EmbeddedStore:
    """The default zero-setup store; see the Store protocol in `sidecar.stores.base`.

    `path` holds versions of the store, each a `VersionStore` directory (SQLite, BM25, vectors, the
    HNSW graph): version 0 is `path` itself (a store never rebuilt is only that), version N is
    `path/version.N`, and the `current` symlink names the one to read (absent: version 0). `index`
    writes into the current version in place; `rebuild` (`index --rebuild`) builds a new version
    beside it, then points `current` at it with one rename: readers answer from the old contents
    until then and from the new ones after, never a mix. Every call reads the pointer (one readlink)
    and moves this process to a newer version when there is one; calls already running finish on the
    version they started on, and its files stay while any process has it open (a shared lock on its
    `read.lock`). The last process to let go of a replaced version removes it (on a thread of its own:
    `_let_go_unused`; `close` waits for it); else the next rebuild or `store repair` does. A rebuild killed at any point leaves the
    current version serving as it was and a version directory no pointer names, which the next rebuild
    removes. `load.lock`:
    `index` sessions hold it shared and a rebuild exclusive, so no `index` writes into a version that
    a rebuild is replacing (`lock_wait_s` waits for the other side, then StoreLocked).

    Keyword options (m, ef_construction, ef_search, rebuild_tombstone_fraction, exact_filter_rows,
    target_recall, target_k, progress) are `VersionStore`'s, for every version this store opens.
    """

    name = "embedded"

    @staticmethod
    def exists_at(path: str | os.PathLike[str]) -> bool:
        """Whether `path` holds an embedded store (opening one elsewhere creates it); one whose store.sqlite is
        gone from beside its other files too, which opening refuses as damaged (`store check` reports it)."""
        path = Path(path)
        return (path / DB_FILE).is_file() or (path / _POINTER).is_symlink() or bool(written_beside_database(path))

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._pointer = str(self.path / _POINTER)  # read on every call: a Path join per call costs more than the read
        self._options = options
        self._lock = threading.Lock()
        self._opened: list[_Opened] = []  # the newest last; older ones until their last call returns
        self._letting_go: list[threading.Thread] = []  # closing and removing replaced versions (`_let_go_unused`)
        self._closed = False
        self._session_lock = threading.Lock()
        self._sessions = 0  # load sessions of this object: the first takes load.lock shared, the last lets go
        self._load_handle: int | None = None
        # Per thread (`checked`: the version and model `signature()` last answered it): a vector search on a
        # newer version of another model is refused once, to the thread that checked its query's model
        # against the old one. Shared by threads, another request's check cleared the refusal.
        self._checked = threading.local()
        # `active` inside this thread's `one_version` block; `opened`: the version it answers from, from its first call.
        self._pinned = threading.local()
        with self._version():  # bad options, or a format this version cannot read, fail here
            pass

    def __enter__(self) -> EmbeddedStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Refuse new calls; close the versions no call uses (removing the replaced ones) before returning. A
        version a call still runs on is closed when that call returns (`_release`): closing its SQLite connections
        under a running statement crashed the process (SIGSEGV: the sqlite3 module reads the closed handle)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = [version for version in self._opened if version.users == 0]
            self._opened = [version for version in self._opened if version.users]
            letting_go, self._letting_go = self._letting_go, []
        for thread in letting_go:  # a replaced version this process let go of is removed before it exits
            thread.join()
        self._close_and_remove(idle)
        with self._session_lock:
            if self._load_handle is not None:
                os.close(self._load_handle)
                self._load_handle = None

    # -- following the current version -----------------------------------------------------------

    def _folder(self, number: int) -> Path:
        return self.path / f"{_VERSION_PREFIX}{number}" if number else self.path

    def _version_name(self, number: int) -> str:
        """How messages name version `number`: its folder's name; version 0 has no folder of its own (its files
        lie in the store's), which its folder, STORE_PATH itself, would misname as the whole store."""
        return self._folder(number).name if number else "version 0 (the store's own files)"

    def _pointed(self) -> int:
        """The current version's number."""
        try:
            target = os.readlink(self._pointer)
        except FileNotFoundError:
            return 0
        number = _version_number(target)
        if number is None:
            raise StoreError(f"{self.path / _POINTER} names {target!r}, not a version directory ({_VERSION_PREFIX}N)")
        return number

    def _versions_on_disk(self) -> list[int]:
        found = [0] if any((self.path / name).exists() for name in (DB_FILE, _READ_LOCK_FILE)) else []
        found += [number for entry in self.path.iterdir() if (number := _version_number(entry.name)) is not None]
        return sorted(found)

    def _version(self) -> _Using:
        """The current version, kept open (and on disk) until the `with` block ends."""
        return _Using(self)

    def _follow(self) -> _Opened:
        pin = self._pinned
        if getattr(pin, "active", False):
            if pin.opened is None:  # the block's first call: the version it answers from, held until it ends
                pin.opened = self._newest()
            with self._lock:
                if self._closed:  # the block's version may be closing as its last call returns
                    raise StoreError(f"embedded store at {self.path} is closed")
                pin.opened.users += 1
            return pin.opened
        return self._newest()

    def _newest(self) -> _Opened:
        for _ in range(MAX_READ_RETRIES):
            number = self._pointed()
            with self._lock:
                if self._closed:
                    raise StoreError(f"embedded store at {self.path} is closed")
                newest = self._opened[-1] if self._opened else None
                # Only forward: a thread that read the pointer before a rebuild moved it keeps the newer one.
                if newest is None or number > newest.number:
                    try:
                        newest = self._open(number)
                    except _VersionGone:
                        continue
                    self._opened.append(newest)
                newest.users += 1
                if len(self._opened) > 1:
                    self._let_go_unused()
            return newest
        number = self._pointed()
        if not self._folder(number).is_dir():  # a rebuild never removes the version `current` names: none raced
            on_disk = ", ".join(self._version_name(n) for n in self._versions_on_disk()) or "none"
            raise StoreError(f"{self.path / _POINTER} names {self._version_name(number)}, which is not on disk "
                             f"(removed by hand, or left out of a copy of the store; versions on disk: {on_disk}): "
                             f"point it at one of them (ln -sfn version.N {self.path / _POINTER}), or {REINDEX_ADVICE}")
        raise StoreError(f"{self.path}: the version {_POINTER} names was replaced {MAX_READ_RETRIES} times while "
                         "this process opened it; try again")

    def _open(self, number: int) -> _Opened:
        folder = self._folder(number)
        try:
            # Version 0 of a new store (or of one made before versions) gets its read.lock here.
            handle = os.open(folder / _READ_LOCK_FILE, os.O_RDWR | (os.O_CREAT if number == 0 else 0), 0o644)
        except FileNotFoundError as exc:
            raise _VersionGone from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)  # a removal holds it exclusive only while it removes
            if os.fstat(handle).st_nlink == 0 or (number == 0 and self._pointed() != 0):
                raise _VersionGone  # removed while this process waited for the lock, or replaced before it
            return _Opened(number=number, store=VersionStore(folder, **self._options), handle=handle)
        except BaseException:
            os.close(handle)
            raise

    def _release(self, opened: _Opened) -> None:
        """A call on `opened` has returned: a replaced version nobody uses any more is let go; after `close`, the
        last call on a version closes it (and removes it if replaced), here: no `close` is left to join a thread."""
        with self._lock:
            opened.users -= 1
            last_after_close = self._closed and opened.users == 0
            if last_after_close:
                self._opened.remove(opened)
            elif len(self._opened) > 1:
                self._let_go_unused()
        if last_after_close:
            self._close_and_remove([opened])

    def _let_go_unused(self) -> None:
        """Under self._lock: take the replaced versions no call uses any more off the list, then close them and
        remove those no process has open on a thread of its own: the call that let go of them is a request's,
        and unlinking a version of 100k 512-d documents (430 MB of vectors, graph, SQLite and BM25 files) added
        50-200 ms to that request. Started under the lock that took them off the list, so `close`, which takes
        it too, finds either the versions (and removes them itself) or the started thread (and joins it); a
        thread started after `close` had looked was left removing, or killed at exit with the files behind."""
        done = [version for version in self._opened[:-1] if version.users == 0]
        if not done:
            return
        self._opened = [version for version in self._opened if version not in done]
        thread = NamedThread(target=self._close_and_remove, args=(done,), name="version-removal", daemon=True)
        self._letting_go = [*(running for running in self._letting_go if running.is_alive()), thread]
        thread.start()

    def _close_and_remove(self, done: list[_Opened]) -> None:
        try:
            for version in done:
                version.store.close()
                os.close(version.handle)
            self._remove_replaced()
        except Exception:  # what is left the next rebuild or `store repair` removes
            log.exception("could not remove the versions of %s that a rebuild replaced", self.path)

    def _remove_replaced(self, *, unfinished: bool = False) -> list[str]:
        """Remove the versions older than the current one that no process has open; with `unfinished` (only
        under load.lock held exclusive: no rebuild is running) the newer ones too, which interrupted
        rebuilds left. Returns the names removed."""
        current = self._pointed()
        removed = []
        for number in self._versions_on_disk():
            if (number < current or (unfinished and number > current)) and self._remove(number):
                removed.append(self._version_name(number))
        return removed

    def _remove(self, number: int) -> bool:
        """Remove version `number` unless a process has it open; a version without read.lock (a removal cut
        off after its first step) has nobody reading it."""
        folder = self._folder(number)
        try:
            handle: int | None = os.open(folder / _READ_LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:
            handle = None
        try:
            if handle is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                # First: a process opening the version from now on finds it gone (and reads the pointer again).
                (folder / _READ_LOCK_FILE).unlink()
            if number:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                # store.sqlite last: while it is there `_versions_on_disk` finds version 0, so the next removal
                # finishes one that was killed midway instead of leaving its vectors and BM25 index unnamed.
                for file in [*(self.path / name for name in _ROOT_VERSION_FILES if name != DB_FILE),
                             *self.path.glob("hnsw.*"), *self.path.glob("*.tmp")]:
                    file.unlink(missing_ok=True)
                shutil.rmtree(self.path / BM25_DIR, ignore_errors=True)
                (self.path / DB_FILE).unlink(missing_ok=True)
        finally:
            if handle is not None:
                os.close(handle)
        log.info("removed %s of %s, which a rebuild replaced", self._version_name(number), self.path)
        return True

    def one_version(self) -> _OneVersion:
        """Store protocol: this thread's calls inside the block answer from the version current at its first
        call (kept open, and on disk, until the block ends; a block without calls reads nothing); a nested
        block keeps the outer one's."""
        return _OneVersion(self)

    # -- the load lock ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _load_session(self, wait_s: float) -> Iterator[None]:
        """load.lock held shared for as long as a load session of this object is open."""
        with self._session_lock:
            if self._sessions == 0:
                self._load_handle = self._take_load_lock(fcntl.LOCK_SH, wait_s, "this index run")
                # Held shared, so no rebuild runs: a name in the file is a killed one's, which a rebuild refused
                # beside this session would name as the holder (index sessions leave it empty: "an index run").
                os.ftruncate(self._load_handle, 0)
            self._sessions += 1
        try:
            yield
        finally:
            with self._session_lock:
                self._sessions -= 1
                if self._sessions == 0 and self._load_handle is not None:
                    os.close(self._load_handle)
                    self._load_handle = None

    @contextlib.contextmanager
    def _exclusive_load(self, wait_s: float, operation: str) -> Iterator[None]:
        handle = self._take_load_lock(fcntl.LOCK_EX, wait_s, operation)
        try:
            os.ftruncate(handle, 0)
            os.pwrite(handle, f"a {operation} by {socket.gethostname()} pid {os.getpid()} since "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}".encode(), 0)
            yield
        finally:
            os.ftruncate(handle, 0)  # a name in the file: its holder runs, or was killed (the next session clears it)
            os.close(handle)

    def _take_load_lock(self, mode: int, wait_s: float, operation: str) -> int:
        handle = os.open(self.path / _LOAD_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(_LOAD_LOCK_POLL_S)
                    continue
                holder = os.pread(handle, 4096, 0).decode(errors="replace") or "an index run"
                os.close(handle)
                raise StoreLocked(f"{self.path} is being loaded by {holder}; {operation} would write beside it. "
                                  "Rerun when it has finished, or let the run wait for it (clip-sidecar index "
                                  "--wait-for-lock SECONDS); a killed process holds nothing") from None

    # -- the Store protocol, on the current version --------------------------------------------------

    @property
    def effort(self) -> EffortPolicy:
        """The current version's: a rebuilt version is calibrated anew (`index` does it with a recall target)."""
        with self._version() as opened:
            return opened.store.effort

    def signature(self) -> ModelSignature | None:
        with self._version() as opened:
            found = opened.store.signature()
        self._checked.checked = (opened.number, found)
        return found

    def fine_signature(self) -> ModelSignature | None:
        with self._version() as opened:
            return opened.store.fine_signature()

    def claim(self, signature: ModelSignature, *, fine_signature: ModelSignature | None = None) -> None:
        with self._version() as opened:
            opened.store.claim(signature, fine_signature=fine_signature)

    @contextlib.contextmanager
    def bulk_load(self, *, lock_wait_s: float = 0.0) -> Iterator[EmbeddedLoad]:
        """A loading session (Store protocol) under load.lock held shared: a rebuild running now is waited
        for up to `lock_wait_s`, then StoreLocked; sessions of several processes run side by side, their
        writes serialised on the version's write.lock."""
        with self._load_session(lock_wait_s), self._version() as opened, opened.store.bulk_load() as load:
            yield load

    def upsert(self, documents: Sequence[Document], *, progress: Callable[[int], None] | None = None) -> int:
        with self._load_session(0.0), self._version() as opened:
            written = opened.store.upsert(documents)  # one commit: written all at once
        if progress is not None:
            progress(written)
        return written

    def delete(self, ids: Sequence[str]) -> int:
        with self._load_session(0.0), self._version() as opened:
            return opened.store.delete(ids)

    def rebuild(self, documents: Iterable[Document], *, signature: ModelSignature,
                fine_signature: ModelSignature | None = None, lock_wait_s: float = 0.0,
                before: Callable[[], None] | None = None, progress: Callable[[int], None] | None = None) -> str:
        """Under load.lock held exclusive: call `before`, build the next version from `documents` beside the
        current one (which keeps serving), check its count, point `current` at it, then remove the replaced
        version unless a process still reads it. Returns the new version's directory; `progress` is called
        with each committed batch's count."""
        with self._exclusive_load(lock_wait_s, "rebuild"):
            if before is not None:
                before()
            self._remove_replaced(unfinished=True)
            number = max([self._pointed(), *self._versions_on_disk()]) + 1
            folder = self._folder(number)
            folder.mkdir()
            handle = os.open(folder / _READ_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)  # nobody removes it while it is built
                try:
                    total = self._build(folder, documents, signature=signature, fine_signature=fine_signature,
                                        progress=progress)
                except BaseException:
                    shutil.rmtree(folder, ignore_errors=True)
                    raise
                fsync_directory(folder)
                new = self.path / _POINTER_NEW
                new.unlink(missing_ok=True)
                os.symlink(folder.name, new)
                os.replace(new, self.path / _POINTER)
                fsync_directory(self.path)
            finally:
                os.close(handle)
        with self._version():  # this process moves to it now; the replaced version goes with its last call
            pass
        log.info("rebuilt %s into %s (%d documents)", self.path, folder.name, total)
        return str(folder)

    def _build(self, folder: Path, documents: Iterable[Document], *, signature: ModelSignature,
               fine_signature: ModelSignature | None, progress: Callable[[int], None] | None) -> int:
        built = VersionStore(folder, **self._options)
        try:
            built.claim(signature, fine_signature=fine_signature)
            ids: set[str] = set()
            with built.bulk_load():  # the graph is built once, from every row, when the session ends
                iterator = iter(documents)
                while batch := list(itertools.islice(iterator, _REBUILD_BATCH)):
                    ids.update(doc.id for doc in batch)
                    written = built.upsert(batch)
                    if progress is not None:
                        progress(written)
            total = built.count()
        finally:
            built.close()
        if total != len(ids):
            raise StoreError(f"the rebuilt version {folder} holds {total} documents, expected {len(ids)} unique ids")
        return total

    def count(self) -> int:
        with self._version() as opened:
            return opened.store.count()

    def content_hashes(self) -> dict[str, str]:
        with self._version() as opened:
            return opened.store.content_hashes()

    def fetch(self, ids: Sequence[str], *, vectors: bool = True) -> list[Document]:
        with self._version() as opened:
            return opened.store.fetch(ids, vectors=vectors)

    def thumbnail(self, doc_id: str) -> bytes | None:
        with self._version() as opened:
            return opened.store.thumbnail(doc_id)

    def facets(self, *, size: int = 20) -> dict[str, FacetCounts]:
        with self._version() as opened:
            return opened.store.facets(size=size)

    def vector_search(
        self, vector: np.ndarray, k: int, *, filters: Filters | None = None, exact: bool = False,
        ef_search: int | None = None,
    ) -> list[ScoredId]:
        with self._version() as opened:
            checked = getattr(self._checked, "checked", None)
            if checked is not None and checked[0] != opened.number and checked[1] is not None:
                # A rebuild with another model moved the store since the caller checked its queries' model
                # (`signature()`): refused once, as the caller's own check refuses from now on.
                held = opened.store.signature()
                self._checked.checked = (opened.number, held)
                if held is not None and held != checked[1]:
                    raise QueryModelMismatch(held, checked[1])
            return opened.store.vector_search(vector, k, filters=filters, exact=exact, ef_search=ef_search)

    def searches_exactly(self, filters: Filters | None) -> bool:
        with self._version() as opened:
            return opened.store.searches_exactly(filters)

    def text_search(self, query: str, k: int, *, filters: Filters | None = None,
                    ids: Sequence[str] | None = None) -> list[ScoredId]:
        with self._version() as opened:
            return opened.store.text_search(query, k, filters=filters, ids=ids)

    def filtered_ids(self, ids: Sequence[str], filters: Filters) -> list[str]:
        with self._version() as opened:
            return opened.store.filtered_ids(ids, filters)

    def supports_native_hybrid(self, *, fusion: str, weights: tuple[float, float], exact: bool) -> bool:
        return False  # vector and BM25 lists are fused in Python (sidecar.retrieval.fusion)

    def hybrid_search(self, vector: np.ndarray, query: str, k: int, *, filters: Filters | None = None,
                      fusion: str = "minmax", weights: tuple[float, float] = (0.5, 0.5),
                      ef_search: int | None = None) -> list[ScoredId]:
        raise StoreError("the embedded store has no native hybrid query; sidecar.retrieval.search fuses its "
                         "vector and BM25 results")

    def check(self) -> StoreReport:
        """The current version's check (`VersionStore.check`), and the other versions on disk."""
        with self._version() as opened:
            report = opened.store.check()
        for number in self._versions_on_disk():
            name = self._version_name(number)
            if number < opened.number:
                report.notes.append(f"{name} was replaced by a rebuild; it stays while a process still reads it "
                                    "(a server's idle worker lets go at its next request), and the last one to "
                                    "let go, the next rebuild or `store repair` removes it")
            elif number > opened.number:
                report.notes.append(f"{name} is a rebuild's unfinished version (one running now, or one that was "
                                    "interrupted); the next `index --rebuild` or `store repair` removes it")
        return report

    def repair(self) -> StoreReport:
        """The current version's repair (`VersionStore.repair`); then the versions no process reads are
        removed: replaced ones, and interrupted rebuilds' where no load runs now."""
        with self._version() as opened:
            report = opened.store.repair()
        try:
            with self._exclusive_load(0.0, "repair"):
                removed = self._remove_replaced(unfinished=True)
        except StoreLocked:  # a load runs: an unfinished version may be its rebuild's
            removed = self._remove_replaced()
        report.actions.extend(f"removed {name}, a version no current pointer names" for name in removed)
        return report


def _version_number(name: str) -> int | None:
    """N for a version directory's name (version.N), else None."""
    digits = name[len(_VERSION_PREFIX):]
    return int(digits) if name.startswith(_VERSION_PREFIX) and digits.isdigit() and digits[0] != "0" else None
