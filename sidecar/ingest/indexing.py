"""The index step: shards → store, incrementally (by document hash), deletions applied, in one load session."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sidecar.ingest.shards import ShardError, ShardSet
from sidecar.stores.base import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IndexSummary:
    written: int
    unchanged: int
    deleted: int
    total_in_store: int
    seconds: float

    def describe(self) -> str:
        return (f"{self.written} written, {self.unchanged} unchanged, {self.deleted} deleted; "
                f"store now holds {self.total_in_store} documents ({self.seconds:.1f} s)")


def index_shards(store: Store, shard_dir: Path, *, batch_size: int = 10_000, lock_wait_s: float = 0.0,
                 progress: bool = True) -> IndexSummary:
    """Upsert every new or changed document from `shard_dir` (its document hash differs from the
    stored one) and delete the ones the embed step found gone, in one `Store.bulk_load` session.
    Refuses shards of another model, or of another fine model, than the store records (a store that
    records no fine model yet records the shards'). Safe to rerun, and to kill: a rerun
    writes what the killed run did not."""
    started = time.perf_counter()
    shards = ShardSet(shard_dir)
    shards.require_shards()
    signature = shards.signature
    shards.check_vector_files()  # before the session: a damaged shard changes nothing
    live = shards.live()
    with store.bulk_load(lock_wait_s=lock_wait_s) as load:
        # Inside the session: under OpenSearch's load lock, what is stored cannot change under us.
        store.claim(signature, fine_signature=shards.fine_signature)
        stored = store.content_hashes()
        changed = [entry for doc_id, entry in live.items() if stored.get(doc_id) != shards.document_hash(entry[1])]
        gone = [doc_id for doc_id in shards.deleted if doc_id in stored]
        log.info("%d documents in %s: %d to write, %d unchanged, %d to delete", len(live), shard_dir,
                 len(changed), len(live) - len(changed), len(gone))
        load.expect(len(changed) + len(gone))
        written = 0
        with tqdm(total=len(changed), unit="doc", desc="index", disable=not progress) as bar:
            for batch in shards.documents(batch_size=batch_size, entries=changed):
                # Advanced as the store acknowledges documents: a batch is up to batch_size of them.
                written += store.upsert(batch, progress=bar.update)
        deleted = store.delete(gone) if gone else 0
    summary = IndexSummary(written=written, unchanged=len(live) - len(changed), deleted=deleted,
                           total_in_store=store.count(), seconds=time.perf_counter() - started)
    log.info("index finished: %s", summary.describe())
    return summary


def rebuild_index(store: Store, shard_dir: Path, *, batch_size: int = 10_000, lock_wait_s: float = 0.0,
                  drop_unsharded: bool = False, progress: bool = True) -> IndexSummary:
    """Full rebuild into a fresh index (OpenSearch: a versioned index behind the alias; embedded: a
    version directory behind the `current` pointer), switched to when complete. The new index holds
    the shards' documents only: `deleted` counts the stored ones it drops. Stored documents the shards
    never held (written through OpenSearch's ingest pipeline, or from another shard directory) only
    that door can write again: ShardError names them, before anything is built, unless `drop_unsharded`
    (read under the store's load lock, so that an `index` run finishing while the rebuild waits for it counts)."""
    started = time.perf_counter()
    shards = ShardSet(shard_dir)
    shards.require_shards()
    shards.check_vector_files()
    live, deleted = shards.live(), set(shards.deleted)
    found: dict[str, int] = {}

    def refuse_unsharded() -> None:
        # Called by the store under its load lock, before it builds anything: read earlier, the stored documents
        # would miss those an `index` run from another shard directory writes before the rebuild takes the lock
        # (one it waits for with --wait-for-lock), and the rebuild would drop them unnamed.
        stored = store.content_hashes()
        # Documents no shard holds: deleted since the last embed, or written by another door (OpenSearch's
        # ingest pipeline), which only that door can write again.
        found["dropped"] = sum(doc_id not in live for doc_id in stored)
        unsharded = [doc_id for doc_id in stored if doc_id not in live and doc_id not in deleted]
        found["unsharded"] = len(unsharded)
        if unsharded and not drop_unsharded:
            counted = "1 stored document is" if len(unsharded) == 1 else f"{len(unsharded)} stored documents are"
            raise ShardError(f"{counted} in no shard of {shard_dir} (written through "
                             "OpenSearch's ingest pipeline, or from another shard directory?), e.g. "
                             f"{', '.join(map(repr, unsharded[:3]))}: a rebuild from the shards would drop them. "
                             "Nothing was changed. Pass --drop-unsharded to rebuild without them (then write them "
                             "again the way they were written), or run `index` without --rebuild, which keeps them")

    documents = (doc for batch in shards.documents(batch_size=batch_size, entries=live.values()) for doc in batch)
    with tqdm(total=len(live), unit="doc", desc="rebuild", disable=not progress) as bar:
        # Advanced as the store writes documents (OpenSearch: as it acknowledges them), not per batch pulled.
        new_index = store.rebuild(documents, signature=shards.signature, fine_signature=shards.fine_signature,
                                  lock_wait_s=lock_wait_s, before=refuse_unsharded, progress=bar.update)
    total = store.count()
    log.info("rebuilt into %s and switched to it", new_index)
    if found["unsharded"]:
        log.warning("%d documents of the previous index were in no shard of %s and are not in the rebuilt one "
                    "(--drop-unsharded): write them again the way they were written", found["unsharded"],
                    shard_dir)
    return IndexSummary(written=total, unchanged=0, deleted=found["dropped"], total_in_store=total,
                        seconds=time.perf_counter() - started)
