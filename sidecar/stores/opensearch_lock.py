"""The load lock of an OpenSearch alias: one `index` run or rebuild at a time writes into it, across
processes and hosts, and a holder that died is found out (no heartbeat, or no such process on its host)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConflictError, NotFoundError, OpenSearchException

from sidecar.stores.base import StoreError, StoreLocked
from sidecar.threads import NamedThread

log = logging.getLogger(__name__)

# The load lock: one document in `<alias>-lock`, held by an `index` run or a rebuild.
LOCK_SUFFIX = "-lock"
LOCK_ID = "load"
# Tokens of the locks this process holds now: a lock naming this process with another token was
# left by a load of this process that could not release it (the cluster was down), so it is stale.
_HELD_TOKENS: set[str] = set()


class LoadLock:
    """The alias's load lock: the document `load` in the index `<alias>-lock`, created with
    op_type=create (only one creator wins) and deleted by its holder.

    It names its owner (host and pid), the operation (`index` or `rebuild`) and when it started. A
    thread renews `heartbeat_at` every `heartbeat_s`, with if_seq_no, so a holder that lost
    the lock (broken as stale) finds out and stops (StoreError) instead of writing on. Another load
    breaks the lock, with a warning naming it, when it is stale: no heartbeat for `stale_s`,
    or its owner is a process of this host that no longer runs (or an earlier load of this very
    process that could not release it). The store creates the lock's index before the first `acquire`."""

    def __init__(self, client: OpenSearch, *, index: str, alias: str, operation: str, stale_s: float,
                 heartbeat_s: float):
        self.client = client
        self.index = index
        self.alias = alias
        self.operation = operation
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self.body: dict[str, Any] = {}
        self.version: tuple[int, int] | None = None  # (seq_no, primary_term) of our last write
        self.lost: str | None = None
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def acquire(self, *, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        waiting = False
        while True:
            now = time.time()
            self.body = {"operation": self.operation, "owner": f"{socket.gethostname()} pid {os.getpid()}",
                         "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                         "started_at": now, "heartbeat_at": now}
            try:
                result = self.client.create(index=self.index, id=LOCK_ID, body=self.body)
            except ConflictError:
                held = self.held()
                if held is None:
                    continue  # released between our create and our read
                body, version = held
                stale = self.stale_reason(body)
                if stale is not None:
                    log.warning("breaking the load lock on %s held by the %s of %s since %s: %s", self.alias,
                                body.get("operation"), body.get("owner"), when(body.get("started_at")), stale)
                    with contextlib.suppress(ConflictError, NotFoundError):
                        self.client.delete(index=self.index, id=LOCK_ID, if_seq_no=version[0],
                                           if_primary_term=version[1])
                    continue
                if time.monotonic() >= deadline:
                    raise StoreLocked(self._refusal(body)) from None
                if not waiting:
                    log.info("%s; waiting up to %.0f s", self._refusal(body).split(";")[0], wait_s)
                    waiting = True
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            self.version = (result["_seq_no"], result["_primary_term"])
            _HELD_TOKENS.add(self.token)
            self._beater = NamedThread(target=self._beat, name="load-lock-heartbeat", daemon=True)
            self._beater.start()
            return

    def ensure_held(self) -> None:
        if self.lost is not None:
            raise StoreError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
        _HELD_TOKENS.discard(self.token)
        if self.version is None or self.lost is not None:
            return
        try:
            self.client.delete(index=self.index, id=LOCK_ID, if_seq_no=self.version[0],
                               if_primary_term=self.version[1])
        except (ConflictError, NotFoundError):
            log.warning("the load lock on %s was broken by another process before this %s ended",
                        self.alias, self.operation)
        except OpenSearchException as exc:
            log.warning("could not release the load lock on %s (%s); the next load breaks it (this process "
                        "ended or %.0f s without a heartbeat)", self.alias, exc.__class__.__name__,
                        self.stale_s)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self.version is not None:
            body = {**self.body, "heartbeat_at": time.time()}
            try:
                result = self.client.index(index=self.index, id=LOCK_ID, body=body,
                                           if_seq_no=self.version[0], if_primary_term=self.version[1])
            except (ConflictError, NotFoundError):
                self.lost = (f"the {self.operation} on {self.alias} lost its load lock: another process broke "
                             f"it as stale (no heartbeat for {self.stale_s:.0f} s); stopping so as not "
                             "to write beside that process; rerun when it has finished")
                return
            except OpenSearchException as exc:
                log.warning("load lock heartbeat on %s failed (%s); retrying", self.alias, exc.__class__.__name__)
                continue
            self.body, self.version = body, (result["_seq_no"], result["_primary_term"])

    def held(self) -> tuple[dict[str, Any], tuple[int, int]] | None:
        """The lock document and its (seq_no, primary_term), or None when nobody holds it."""
        try:
            doc = self.client.get(index=self.index, id=LOCK_ID)
        except NotFoundError:  # no lock document, or no lock index yet
            return None
        return doc["_source"], (doc["_seq_no"], doc["_primary_term"])

    def stale_reason(self, body: dict[str, Any]) -> str | None:
        silent = time.time() - float(body.get("heartbeat_at", 0))
        if silent > self.stale_s:
            return f"no heartbeat for {silent:.0f} s (stale after {self.stale_s:.0f} s)"
        if body.get("host") == socket.gethostname():
            pid = int(body.get("pid", -1))
            if pid == os.getpid():
                if body.get("token") not in _HELD_TOKENS:
                    return "an earlier load of this process left it behind"
            elif not _process_exists(pid):
                return f"its process {pid} on this host is gone"
        return None

    def _refusal(self, body: dict[str, Any]) -> str:
        silent = time.time() - float(body.get("heartbeat_at", 0))
        operation = str(body.get("operation"))
        article = "an" if operation[:1] in "aeiou" else "a"
        return (f"{self.alias} is locked by {article} {operation} run by {body.get('owner')} since "
                f"{when(body.get('started_at'))} (last heartbeat {silent:.0f} s ago); this {self.operation} would "
                "write beside it. Rerun when it has finished, or let the run wait for it (clip-sidecar index "
                "--wait-for-lock SECONDS); if that process is gone, its lock counts as stale and is broken "
                f"{self.stale_s:.0f} s after its last heartbeat")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def when(epoch: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(epoch)))
    except (TypeError, ValueError):
        return "(unknown)"
