"""Vector shards on disk: vectors (.npy) + rows (.jsonl) per shard, a manifest naming the model.

Layout of an output directory:
  manifest.json        model signature, preprocessing, dtype, normalisation, shard list, deleted ids (the
                       store must not hold them: their file vanished, or its current bytes cannot be used)
  shard-00000.npy      float32 [n, dim], L2-normalised
  shard-00000.jsonl    n rows: id, path, text, metadata, image_hash, content_hash (row i ↔ vector i); the
                       path is absolute (rows of older versions: relative to the folder their embed ran
                       in), and rewritten in place by the next run that finds the image elsewhere
  shard-00000.fine.npy float32 [n, fine dim]: the fine-ranking model's vectors, when the manifest names one
  shard-00000.thumbs.npz  the rows' thumbnails (JPEG bytes, `offsets` into `data`), when the manifest names a size
  errors.jsonl         images that could not be used, with the reason (rewritten each run)
  .lock                held (flock) by the one job that writes the directory (`exclusive_writer`)
A shard is written under temporary names and renamed into place, the .npy/.npz files before .jsonl,
and the manifest after both: a run killed at any point leaves only complete shards behind, and files
of shards it did not complete (temporary ones; a .npy, .fine.npy or .thumbs.npz renamed before the
kill, whose .jsonl never was), which the next `ShardSet.start` removes.
Writers in other processes (the Ray engine's tasks) name their shards themselves
(`shard-<n>-<run>-<digest of the ids>`, `write_shard_files`); the manifest lists them when the
run ends, and until then they are found by their complete .npy + .jsonl pair like any other.

Format 2 rows carry two hashes (`sidecar.ingest.identity`): `image_hash` (the image's bytes) and
`content_hash` (the document: image, text and metadata). Format 1 rows, written before text and
metadata counted, have only `content_hash`, which was the image's hash; they are read in place
(the document hash is derived from their text and metadata), so an old directory keeps working
and a rerun of `embed` re-encodes nothing that did not change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from sidecar.config import THUMBNAIL_SIDE
from sidecar.errors import UserFixable
from sidecar.ingest.identity import document_hash
from sidecar.types import Document, ModelSignature

FORMAT_VERSION = 2

log = logging.getLogger(__name__)


class ShardError(ValueError, UserFixable):
    """Shards that cannot be used here (another model, damaged files)."""


class ShardsBusy(ShardError):
    """Another job writes the directory."""


# The file descriptors of the writer locks this process holds. A forked child (decode workers, the hash
# pool) shares each lock's open file description, so the lock lasted until the last of them exited, not
# with a killed job; children point these descriptors at /dev/null instead, keeping nothing locked.
_held_locks: set[int] = set()


def _drop_held_locks_in_child() -> None:
    if not _held_locks:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _held_locks:
        os.dup2(null, fd)  # the number stays valid (a later close closes /dev/null), the lock is not held
    os.close(null)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_held_locks_in_child)


@contextlib.contextmanager
def naming_the_file(path: Path) -> Iterator[None]:
    """Writes to `path` in the block: an OSError they raise names it. A full disk's ENOSPC (a quota's EDQUOT)
    comes from write(), flush(), close() or fsync(), which name no file, so it reached the user as a
    traceback, where the CLI says in one line which path cannot be written (`is_unwritable_path`)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


@contextlib.contextmanager
def exclusive_writer(root: Path) -> Iterator[None]:
    """Hold `root` for one job that writes it (`embed`, `tag`), refusing at once while another holds it:
    two writers would delete each other's temporary files, pick the same shard names and rewrite the
    manifest from stale copies. Readers (`index`) need no lock. The kernel drops a flock when its holder
    dies (its forked children do not hold it), so a killed run's directory is free at once; the holder's
    pid and command in the file only name it in the refusal."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "holder unknown"
            raise ShardsBusy(f"another job writes {root}: {holder}; wait for it, or write to another folder") from None
        handle.truncate(0)  # "a+" writes at the end: the file now holds this job alone
        with naming_the_file(root / ".lock"):
            handle.write(f"pid {os.getpid()} ({shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]})\n")
            handle.flush()
        _held_locks.add(handle.fileno())
        try:
            yield  # closing the file releases the lock
        finally:
            _held_locks.discard(handle.fileno())


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
            try:
                self.manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except ValueError as exc:  # not JSON, or not UTF-8
                raise ShardError(f"{self.manifest_path} cannot be read ({exc}); it names the shards' model: restore "
                                 "it, or embed into a new --out folder") from exc
        found = self.manifest.get("format_version", 1) if isinstance(self.manifest, dict) else None
        if not isinstance(found, int) or isinstance(found, bool) or found < 1:
            raise ShardError(f"{self.manifest_path}: format_version {found!r} is no shard format; this version "
                             f"reads formats 1 to {FORMAT_VERSION}")
        if found > FORMAT_VERSION:
            raise ShardError(f"{self.root} holds shards of format {found}, written by a newer clip-sidecar; "
                             f"this version reads formats up to {FORMAT_VERSION}: upgrade clip-sidecar to use them")

    @property
    def signature(self) -> ModelSignature | None:
        model = self.manifest.get("model")
        return ModelSignature(**model) if model else None

    @property
    def thumbnail_side(self) -> int:
        """The longer side of every shard's thumbnails in pixels, or 0 where shards hold none."""
        return int(self.manifest.get("thumbnails", {}).get("side", 0))

    @property
    def fine_signature(self) -> ModelSignature | None:
        """The fine-ranking model whose vectors every shard holds beside the model's, or None."""
        model = self.manifest.get("fine_model")
        return ModelSignature(**model) if model else None

    def document_hash(self, row: ShardRow) -> str:
        """What the store records for the row: its content hash, plus the fine model when there is
        one, so indexing the same corpus with a fine model (or another one) rewrites every document."""
        digest = row.content_hash
        fine = self.fine_signature
        if fine is not None:
            tag = hashlib.sha256(json.dumps(asdict(fine), sort_keys=True).encode("utf-8")).hexdigest()[:12]
            digest = f"{digest}+fine:{tag}"
        if self.thumbnail_side:
            # Thumbnails added to shards that had none (or of another size) reach the store on the next index.
            digest = f"{digest}+thumbs:{self.thumbnail_side}"
        return digest

    def shard_names(self) -> list[str]:
        """Complete shards: named in the manifest, or fully renamed into place after it was written."""
        names = list(self.manifest.get("shards", []))
        for npy in sorted(self.root.glob("shard-*.npy")):
            if npy.stem not in names and npy.with_suffix(".jsonl").exists():
                names.append(npy.stem)  # killed after both renames, before the manifest update
        return names

    def start(self, signature: ModelSignature, *, preprocessing: dict[str, Any],
              fine_signature: ModelSignature | None = None, thumbnail_side: int | None = 0) -> None:
        """Claim the directory for a model (and fine model); refuse one written by other models, or with
        thumbnails of another size. Shards written without thumbnails get theirs later
        (`shards_without_thumbnails`, then `write_thumbnails`) when `thumbnail_side` asks for them.
        `thumbnail_side` None: the size the directory records, none where it records that choice (0),
        else THUMBNAIL_SIDE."""
        if thumbnail_side is None:
            # A rerun that names no size keeps the one chosen: `embed --thumbnail-size 0` once, then plain reruns,
            # must not decode the whole corpus again for thumbnails (and rewrite every document on `index`).
            thumbnail_side = self.thumbnail_side if "thumbnails" in self.manifest else THUMBNAIL_SIDE
        existing = self.signature
        if existing is not None and existing != signature:
            raise ShardError(f"{self.root} holds shards of {existing.describe()}, not {signature.describe()}; "
                             "write to a new --out directory to embed with another model")
        if existing is not None and self.shard_names() and self.fine_signature != fine_signature:
            def name(sig: ModelSignature | None) -> str:
                return sig.describe() if sig else "no fine model"

            raise ShardError(f"{self.root} holds shards with {name(self.fine_signature)}, not "
                             f"{name(fine_signature)}; write to a new --out directory to embed with another "
                             "fine model")
        if self.shard_names() and self.thumbnail_side and self.thumbnail_side != thumbnail_side:
            raise ShardError(f"{self.root} holds thumbnails of {self.thumbnail_side} px, not {thumbnail_side or 'none'}; "
                             f"pass --thumbnail-size {self.thumbnail_side}, or write to a new --out directory")
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("*.tmp"):
            stale.unlink()  # leftovers of a killed run
        self._remove_incomplete_shards()
        begun = self.tagging_begun
        self.manifest = {"format_version": FORMAT_VERSION, "model": asdict(signature), "dtype": "float32",
                         "normalised": "l2", "preprocessing": preprocessing, "shards": self.shard_names(),
                         "deleted": self.manifest.get("deleted", []), "tagging": self.tagging}
        if begun:
            self.manifest["tagging_begun"] = begun
        if fine_signature is not None:
            self.manifest["fine_model"] = asdict(fine_signature)
        # Recorded when 0 too, so that a rerun naming no size keeps "none"; a manifest without the key (shards
        # written before thumbnails, or by a version that did not record "none") gets the default size.
        self.manifest["thumbnails"] = {"side": thumbnail_side, "format": "JPEG"} if thumbnail_side else {"side": 0}
        self._write_manifest()

    def _remove_incomplete_shards(self) -> None:
        """Delete the vector and thumbnail files of shards a killed writer renamed into place before their .jsonl
        (the rename that completes a shard), which no shard list names. The local job's next shard takes such a
        name again and overwrites them; a Ray writer's name is its run's alone, so they stayed forever."""
        complete = set(self.shard_names())
        incomplete = sorted(path for path in self.root.glob("shard-*") if path.suffix in (".npy", ".npz")
                            and path.name.partition(".")[0] not in complete)
        if not incomplete:
            return
        for path in incomplete:
            path.unlink()
        log.info("removed %d file(s) of shards a killed run left incomplete (no .jsonl): %s", len(incomplete),
                 ", ".join(path.name for path in incomplete))

    def rows(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, ShardRow, int]]:
        """(shard name, row, index within shard) for every row (of the shards `names`, else of all), oldest shard
        first. A line that is no row (a disk fault, an edit) is a ShardError naming the file and the line."""
        for name in self.shard_names() if names is None else names:
            path = self.root / f"{name}.jsonl"
            index = 0
            try:
                with path.open(encoding="utf-8") as fh:
                    for index, line in enumerate(fh):
                        yield name, ShardRow.from_json(line), index
            except (ValueError, TypeError, KeyError) as exc:  # not JSON or UTF-8, or not a row's fields
                raise self._damaged(path, f"line {index + 1} is no shard row ({type(exc).__name__}: {exc})") from exc
            except FileNotFoundError as exc:
                raise self._damaged(path, "is missing") from exc

    def require_shards(self) -> None:
        """A ShardError unless an embed wrote shards here (its manifest.json, naming the model): a folder of
        something else reads as shards holding no documents."""
        if self.signature is None:
            raise ShardError(f"{self.root} holds no shards (no manifest.json): run `clip-sidecar embed` first")

    def check_vector_files(self) -> None:
        """A ShardError for the first shard whose vector files (.npy, .fine.npy) do not hold one vector of the
        model's size per line of its .jsonl: read before an index changes anything, where a damaged file
        failed in a traceback midway, or (its rows unchanged since indexed) went unnoticed until a --rebuild.
        Memory-maps each file: its header is read, not its vectors."""
        for name in self.shard_names():
            jsonl = self.root / f"{name}.jsonl"
            try:
                with jsonl.open("rb") as fh:
                    rows = sum(1 for _ in fh)
            except FileNotFoundError as exc:
                raise self._damaged(jsonl, "is missing") from exc
            for suffix, signature in ((".npy", self.signature), (".fine.npy", self.fine_signature)):
                if signature is None:
                    continue
                vectors = self._load_vectors(name, suffix)
                if vectors.shape != (rows, signature.dim):
                    raise self._damaged(self.root / f"{name}{suffix}", f"holds vectors of shape {vectors.shape} "
                                        f"where its {rows} rows need ({rows}, {signature.dim})")

    def latest(self) -> dict[str, tuple[str, ShardRow, int]]:
        """id → its newest row: a changed file's later shard supersedes the earlier one."""
        return {row.id: (name, row, index) for name, row, index in self.rows()}

    def write_shard(self, vectors: np.ndarray, rows: list[ShardRow], fine_vectors: np.ndarray | None = None,
                    thumbnails: list[bytes] | None = None) -> str:
        if len(vectors) != len(rows):
            raise ShardError(f"shard has {len(vectors)} vectors but {len(rows)} rows")
        if (fine_vectors is None) != (self.fine_signature is None) or (
                fine_vectors is not None and len(fine_vectors) != len(rows)):
            raise ShardError(f"shard needs one fine vector per row exactly when the manifest names a fine model "
                             f"({self.fine_signature.describe() if self.fine_signature else 'none'})")
        if (thumbnails is None) != (not self.thumbnail_side) or (thumbnails is not None and len(thumbnails) != len(rows)):
            raise ShardError(f"shard needs one thumbnail per row exactly when the manifest names a thumbnail size "
                             f"({self.thumbnail_side or 'none'})")
        name = write_shard_files(self.root, f"shard-{len(self.shard_names()):05d}", vectors, rows, fine_vectors,
                                 thumbnails)
        self.record_shards()
        return name

    def record_shards(self) -> None:
        """Name every complete shard in the manifest, those other processes wrote under names of
        their own (`write_shard_files`) included."""
        self.manifest["shards"] = self.shard_names()
        self._write_manifest()

    def rewrite_rows(self, entries: list[tuple[ShardRow, str, int]], *, shard_size: int) -> None:
        """New rows for documents whose image did not change (new text, metadata or tags), each with the
        vectors (and thumbnail) stored for it at (shard name, index): no forward pass, no decode."""
        # In the order they are stored, each shard read once per new shard: its thumbnails are one file, read whole
        # (read per row, a shard's 4096 rows took minutes to rewrite).
        position = {name: i for i, name in enumerate(self.shard_names())}
        entries = sorted(entries, key=lambda entry: (position[entry[1]], entry[2]))
        for start in range(0, len(entries), shard_size):
            part = entries[start:start + shard_size]
            stored = {name: (self.vectors(name), self.fine_vectors(name), self.thumbnails(name))
                      for name in dict.fromkeys(name for _, name, _ in part)}
            vectors = np.stack([stored[name][0][index] for _, name, index in part])
            fine = None
            if self.fine_signature is not None:
                fine = np.stack([stored[name][1][index] for _, name, index in part])
            thumbnails = None
            if self.thumbnail_side:
                thumbnails = [stored[name][2][index] for _, name, index in part]
            self.write_shard(vectors, [row for row, _, _ in part], fine, thumbnails)

    def set_paths(self, paths: Mapping[str, Mapping[int, str]]) -> None:
        """Point rows at where their image is now (shard name → {row index: path}): each such shard's .jsonl
        is rewritten in place (under a temporary name, renamed over it), its vectors and thumbnails untouched.
        A path is no part of a document's identity, so neither the hashes nor the store change."""
        for name, changed in paths.items():
            jsonl = self.root / f"{name}.jsonl"
            with jsonl.open(encoding="utf-8") as fh:
                lines = fh.readlines()
            with naming_the_file(jsonl.with_suffix(".jsonl.tmp")), \
                    open(jsonl.with_suffix(".jsonl.tmp"), "w", encoding="utf-8") as fh:
                for index, line in enumerate(lines):
                    if index in changed:
                        fields = json.loads(line)  # as stored: a format 1 row stays one
                        fields["path"] = changed[index]
                        line = json.dumps(fields, ensure_ascii=False) + "\n"
                    fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(jsonl.with_suffix(".jsonl.tmp"), jsonl)

    @property
    def tagging(self) -> list[dict[str, Any]]:
        """The prompt-set tagging (`sidecar.ingest.tagging`) the rows' metadata carries, as last completed."""
        return list(self.manifest.get("tagging", []))

    def set_tagging(self, record: list[dict[str, Any]]) -> None:
        """Record a tagging every live row now carries (no longer only begun)."""
        self.manifest["tagging"] = record
        self.manifest.pop("tagging_begun", None)
        self._write_manifest()

    @property
    def tagging_begun(self) -> list[str]:
        """Sets whose tags a job began writing into rows and did not finish (a killed `tag` or `embed`): some rows
        may hold their fields though `tagging` does not name them."""
        return list(self.manifest.get("tagging_begun", []))

    def begin_tagging(self, sets: Iterable[str]) -> None:
        """Record, before any row is written, that rows may get these sets' tags: a rerun after a kill then
        knows those fields as tagging's, not the corpus's (`Tagger.check_metadata`)."""
        begun = set(self.tagging_begun) | (set(sets) - {record["set"] for record in self.tagging})
        if begun != set(self.tagging_begun):  # a rerun with the recorded sets writes no manifest
            self.manifest["tagging_begun"] = sorted(begun)
            self._write_manifest()

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
            fine = self.fine_vectors(name)
            thumbnails = self.thumbnails(name)
            for row, index in rows:
                batch.append(Document(id=row.id, vector=np.asarray(vectors[index], dtype=np.float32),
                                      text=row.text, metadata=row.metadata, content_hash=self.document_hash(row),
                                      fine_vector=None if fine is None else np.asarray(fine[index], dtype=np.float32),
                                      thumbnail=(thumbnails[index] or None) if thumbnails is not None else None))
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def vectors(self, name: str) -> np.ndarray:
        """A shard's vectors, memory-mapped (row i ↔ line i of its .jsonl)."""
        return self._load_vectors(name, ".npy")

    def fine_vectors(self, name: str) -> np.ndarray | None:
        """A shard's fine-model vectors, memory-mapped, or None when the manifest names no fine model."""
        if self.fine_signature is None:
            return None
        return self._load_vectors(name, ".fine.npy")

    def _load_vectors(self, name: str, suffix: str) -> np.ndarray:
        path = self.root / f"{name}{suffix}"
        try:
            return np.load(path, mmap_mode="r")
        except FileNotFoundError as exc:
            raise self._damaged(path, "is missing") from exc
        except (ValueError, OSError, EOFError) as exc:  # cut short ("mmap length is greater than file size"), no .npy
            raise self._damaged(path, f"cannot be read ({exc})") from exc

    def _damaged(self, path: Path, what: str) -> ShardError:
        # Shard files are written whole (renamed into place): damage is a disk fault, a copy cut short or an edit.
        return ShardError(f"{path} {what}: the shard is damaged. Embed the corpus into a new folder (clip-sidecar "
                          "embed SOURCE --out NEW) and index from it; documents already in the store stay as they are")

    def thumbnails(self, name: str) -> list[bytes] | None:
        """A shard's thumbnails (b"" for a row whose image could not make one), or None when the manifest
        names no thumbnail size."""
        if not self.thumbnail_side:
            return None
        path = thumbnails_path(self.root, name)
        if not path.exists():
            raise ShardError(f"{self.root}: {name} has no thumbnails yet ({path.name}); run `clip-sidecar embed` "
                             "again to write them")
        with np.load(path) as stored:
            offsets, data = stored["offsets"], stored["data"].tobytes()
        return [data[start:stop] for start, stop in zip(offsets[:-1], offsets[1:])]

    def shards_without_thumbnails(self) -> list[str]:
        """Shards written before the manifest named a thumbnail size (or by a run killed while adding them)."""
        if not self.thumbnail_side:
            return []
        return [name for name in self.shard_names() if not thumbnails_path(self.root, name).exists()]

    def write_thumbnails(self, name: str, thumbnails: list[bytes]) -> None:
        """Add thumbnails to a shard written without them, one per row in order."""
        write_thumbnails_file(self.root, name, thumbnails, rename=True)

    def _write_manifest(self) -> None:
        tmp = self.manifest_path.with_suffix(".json.tmp")
        with naming_the_file(tmp):
            tmp.write_text(json.dumps(self.manifest, indent=2), encoding="utf-8")
        os.replace(tmp, self.manifest_path)


def write_shard_files(root: Path, name: str, vectors: np.ndarray, rows: list[ShardRow],
                      fine_vectors: np.ndarray | None = None, thumbnails: list[bytes] | None = None) -> str:
    """Write one shard's files under `root`, each under a temporary name renamed into place (the
    .npy/.npz files first, the .jsonl last: a complete pair implies the rest). The manifest is not
    touched: `ShardSet.shard_names` finds the shard, `ShardSet.record_shards` lists it. Writing the
    same name again replaces the shard whole, so a retried writer cannot duplicate its rows."""
    root = Path(root)
    npy, jsonl = root / f"{name}.npy", root / f"{name}.jsonl"
    arrays = [(npy, vectors)] + ([(root / f"{name}.fine.npy", fine_vectors)] if fine_vectors is not None else [])
    for path, array in arrays:
        with naming_the_file(path.with_suffix(".npy.tmp")), open(path.with_suffix(".npy.tmp"), "wb") as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=np.float32))
            fh.flush()
            os.fsync(fh.fileno())
    if thumbnails is not None:
        write_thumbnails_file(root, name, thumbnails, rename=False)
    rows_tmp = jsonl.with_suffix(".jsonl.tmp")
    with naming_the_file(rows_tmp), open(rows_tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    # The thumbnails and fine vectors first: a complete .npy + .jsonl pair implies them.
    if thumbnails is not None:
        os.replace(thumbnails_path(root, name).with_suffix(".npz.tmp"), thumbnails_path(root, name))
    for path, _ in reversed(arrays):
        os.replace(path.with_suffix(".npy.tmp"), path)
    os.replace(jsonl.with_suffix(".jsonl.tmp"), jsonl)
    return name


def thumbnails_path(root: Path, name: str) -> Path:
    return root / f"{name}.thumbs.npz"


def write_thumbnails_file(root: Path, name: str, thumbnails: list[bytes], *, rename: bool) -> None:
    """A shard's thumbnails as one .npz (JPEG bytes back to back, `offsets` into them), under a temporary
    name that `rename` (or the shard's writer, in its order) renames into place."""
    path = thumbnails_path(root, name)
    offsets = np.zeros(len(thumbnails) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(t) for t in thumbnails])
    with naming_the_file(path.with_suffix(".npz.tmp")), open(path.with_suffix(".npz.tmp"), "wb") as fh:
        np.savez(fh, offsets=offsets, data=np.frombuffer(b"".join(thumbnails), dtype=np.uint8))
        fh.flush()
        os.fsync(fh.fileno())
    if rename:
        os.replace(path.with_suffix(".npz.tmp"), path)
