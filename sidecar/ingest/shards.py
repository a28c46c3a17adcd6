"""Vector shards on disk: vectors (.npy) + rows (.jsonl) per shard, a manifest naming the model.

Layout of an output directory:
  manifest.json        model signature, preprocessing, dtype, normalisation, shard list, deleted ids
  shard-00000.npy      float32 [n, dim], L2-normalised
  shard-00000.jsonl    n rows: id, path, text, metadata, image_hash, content_hash (row i ↔ vector i)
  errors.jsonl         images that could not be used, with the reason (rewritten each run)
A shard is written under temporary names and renamed into place, .npy before .jsonl, and the
manifest after both: a run killed at any point leaves only complete shards behind.

Format 2 rows carry two hashes (`sidecar.ingest.identity`): `image_hash` (the image's bytes) and
`content_hash` (the document: image, text and metadata). Format 1 rows, written before text and
metadata counted, have only `content_hash`, which was the image's hash; they are read in place
(the document hash is derived from their text and metadata), so an old directory keeps working
and a rerun of `embed` re-encodes nothing that did not change.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from sidecar.ingest.identity import document_hash
from sidecar.types import Document, ModelSignature

FORMAT_VERSION = 2


class ShardError(ValueError):
    """Shards that cannot be used here (another model, damaged files)."""


@dataclass(frozen=True, slots=True)
class ShardRow:
    id: str
    path: str
    text: str
    metadata: dict[str, Any]
    content_hash: str  # the document: image, text and metadata
    image_hash: str  # the image's bytes alone

    @classmethod
    def from_json(cls, line: str) -> ShardRow:
        fields = json.loads(line)
        if "image_hash" not in fields:  # format 1: content_hash was the image's hash
            fields["image_hash"] = fields["content_hash"]
            fields["content_hash"] = document_hash(fields["image_hash"], fields["text"], fields["metadata"])
        return cls(**fields)


class ShardSet:
    """An output directory of shards: read what is there, append new shards, record deletions."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.manifest: dict[str, Any] = {}
        if self.manifest_path.exists():
            self.manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        found = self.manifest.get("format_version", 1)
        if found > FORMAT_VERSION:
            raise ShardError(f"{self.root} holds shards of format {found}, written by a newer clip-sidecar; "
                             f"this version reads formats up to {FORMAT_VERSION}")

    @property
    def signature(self) -> ModelSignature | None:
        model = self.manifest.get("model")
        return ModelSignature(**model) if model else None

    def shard_names(self) -> list[str]:
        """Complete shards: named in the manifest, or fully renamed into place after it was written."""
        names = list(self.manifest.get("shards", []))
        for npy in sorted(self.root.glob("shard-*.npy")):
            if npy.stem not in names and npy.with_suffix(".jsonl").exists():
                names.append(npy.stem)  # killed after both renames, before the manifest update
        return names

    def start(self, signature: ModelSignature, *, preprocessing: dict[str, Any]) -> None:
        """Claim the directory for a model; refuse one written by another model."""
        existing = self.signature
        if existing is not None and existing != signature:
            raise ShardError(f"{self.root} holds shards of {existing.describe()}, not {signature.describe()}; "
                             "write to a new --out directory to embed with another model")
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("*.tmp"):
            stale.unlink()  # leftovers of a killed run
        self.manifest = {"format_version": FORMAT_VERSION, "model": asdict(signature), "dtype": "float32",
                         "normalised": "l2", "preprocessing": preprocessing, "shards": self.shard_names(),
                         "deleted": self.manifest.get("deleted", [])}
        self._write_manifest()

    def rows(self) -> Iterator[tuple[str, ShardRow, int]]:
        """(shard name, row, index within shard) for every row, oldest shard first."""
        for name in self.shard_names():
            with (self.root / f"{name}.jsonl").open(encoding="utf-8") as fh:
                for index, line in enumerate(fh):
                    yield name, ShardRow.from_json(line), index

    def latest(self) -> dict[str, tuple[str, ShardRow, int]]:
        """id → its newest row: a changed file's later shard supersedes the earlier one."""
        return {row.id: (name, row, index) for name, row, index in self.rows()}

    def write_shard(self, vectors: np.ndarray, rows: list[ShardRow]) -> str:
        if len(vectors) != len(rows):
            raise ShardError(f"shard has {len(vectors)} vectors but {len(rows)} rows")
        name = f"shard-{len(self.shard_names()):05d}"
        npy, jsonl = self.root / f"{name}.npy", self.root / f"{name}.jsonl"
        with open(npy.with_suffix(".npy.tmp"), "wb") as fh:
            np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32))
            fh.flush()
            os.fsync(fh.fileno())
        with open(jsonl.with_suffix(".jsonl.tmp"), "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(npy.with_suffix(".npy.tmp"), npy)
        os.replace(jsonl.with_suffix(".jsonl.tmp"), jsonl)
        self.manifest["shards"] = self.shard_names()
        self._write_manifest()
        return name

    def set_deleted(self, ids: list[str]) -> None:
        self.manifest["deleted"] = sorted(ids)
        self._write_manifest()

    @property
    def deleted(self) -> list[str]:
        return list(self.manifest.get("deleted", []))

    def live(self) -> dict[str, tuple[str, ShardRow, int]]:
        """id → its newest row, deleted ids left out: what the store should hold."""
        deleted = set(self.deleted)
        return {doc_id: entry for doc_id, entry in self.latest().items() if doc_id not in deleted}

    def documents(self, *, batch_size: int = 2048,
                  entries: Iterable[tuple[str, ShardRow, int]] | None = None) -> Iterator[list[Document]]:
        """Documents in batches, for indexing: `entries` (rows from `live()`), else every live one."""
        by_shard: dict[str, list[tuple[ShardRow, int]]] = {}
        for name, row, index in (self.live().values() if entries is None else entries):
            by_shard.setdefault(name, []).append((row, index))
        batch: list[Document] = []
        for name, rows in by_shard.items():
            vectors = self.vectors(name)
            for row, index in rows:
                batch.append(Document(id=row.id, vector=np.asarray(vectors[index], dtype=np.float32),
                                      text=row.text, metadata=row.metadata, content_hash=row.content_hash))
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def vectors(self, name: str) -> np.ndarray:
        """A shard's vectors, memory-mapped (row i ↔ line i of its .jsonl)."""
        return np.load(self.root / f"{name}.npy", mmap_mode="r")

    def _write_manifest(self) -> None:
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2), encoding="utf-8")
        os.replace(tmp, self.manifest_path)
