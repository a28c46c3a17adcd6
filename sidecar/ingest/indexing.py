"""The index step: shards → store, incrementally (by content hash), deletions applied."""

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


def index_shards(store: Store, shard_dir: Path, *, batch_size: int = 2048, progress: bool = True) -> IndexSummary:
    """Upsert every new or changed document from `shard_dir` and delete the ones the embed step
    found gone. Refuses shards of another model than the store holds. Safe to rerun."""
    started = time.perf_counter()
    shards = ShardSet(shard_dir)
    signature = shards.signature
    if signature is None:
        raise ShardError(f"{shard_dir} holds no shards (no manifest.json): run `clip-sidecar embed` first")
    store.claim(signature)
    stored = store.content_hashes()
    written = unchanged = 0
    with tqdm(unit="doc", desc="index", disable=not progress) as bar:
        for batch in shards.documents(batch_size=batch_size):
            changed = [doc for doc in batch if stored.get(doc.id) != doc.content_hash]
            if changed:
                written += store.upsert(changed)
            unchanged += len(batch) - len(changed)
            bar.update(len(batch))
    gone = [doc_id for doc_id in shards.deleted if doc_id in stored]
    deleted = store.delete(gone) if gone else 0
    summary = IndexSummary(written=written, unchanged=unchanged, deleted=deleted, total_in_store=store.count(),
                           seconds=time.perf_counter() - started)
    log.info("index finished: %s", summary.describe())
    return summary


def rebuild_index(store: Store, shard_dir: Path, *, progress: bool = True) -> IndexSummary:
    """Full rebuild into a fresh index behind the store's alias, swapped in when complete."""
    started = time.perf_counter()
    shards = ShardSet(shard_dir)
    if shards.signature is None:
        raise ShardError(f"{shard_dir} holds no shards (no manifest.json): run `clip-sidecar embed` first")
    documents = (doc for batch in tqdm(shards.documents(), unit="batch", desc="rebuild", disable=not progress)
                 for doc in batch)
    new_index = store.rebuild(documents, signature=shards.signature)
    total = store.count()
    log.info("rebuilt into %s and swapped the alias", new_index)
    return IndexSummary(written=total, unchanged=0, deleted=0, total_in_store=total,
                        seconds=time.perf_counter() - started)
