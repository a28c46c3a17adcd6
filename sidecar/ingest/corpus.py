"""Corpus readers: an image folder, or a JSONL/CSV/Parquet manifest of id, path, text and metadata."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from sidecar.errors import UserFixable, not_utf8

log = logging.getLogger(__name__)

# A folder's files by name: every name Pillow gives the formats decoded by default (config.IMAGE_FORMATS: .jfif
# and .jpe are JPEGs, .apng a PNG), and the photo formats of phones and the web that are not decoded (HEIC/HEIF,
# AVIF, ICO, SVG): those are picked up to be refused by the decoder and listed in errors.jsonl, not left out
# of the corpus without a word.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                  ".heic", ".heif", ".avif", ".ico", ".svg"}
RESERVED = ("id", "path", "text", "metadata")
# What macOS writes beside files on volumes and into archives that cannot hold its metadata: an AppleDouble twin
# `._photo.jpg` per file (resource fork and Finder info, no image) and, in a zip, a `__MACOSX/` folder of them.
# Finder never shows them; listed as images, each would be refused as "not a recognised image format", as many
# refusals as photos. Other hidden files and folders are ordinary files of the corpus.
APPLEDOUBLE_PREFIX = "._"
# UTF-8, with the byte-order mark that Excel's "CSV UTF-8" and Windows' Notepad write at the start dropped: read as
# plain UTF-8 it stays on the first header name ("\ufeffid"), so every id falls back to the path, and the id column
# becomes metadata.
MANIFEST_ENCODING = "utf-8-sig"
MACOS_ARCHIVE_FOLDER = "__MACOSX"


@dataclass(frozen=True, slots=True)
class CorpusItem:
    id: str
    path: Path
    text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    unusable: str = ""  # why the item cannot be embedded (listed in errors.jsonl); empty when it can


class CorpusError(ValueError, UserFixable):
    """The corpus source cannot be read; the message names the file, line and field."""


def read_corpus(source: Path) -> Iterator[CorpusItem]:
    """Items from a folder (ids = relative paths, text = a .txt beside the image or the file
    name; a file whose name is not UTF-8, or whose caption cannot be read, comes as an `unusable`
    item), or a .jsonl, .csv or .parquet manifest (fields id, path, text, metadata; other
    columns → metadata)."""
    source = Path(source)
    if source.is_dir():
        return _read_folder(source)
    if not source.exists():
        raise CorpusError(f"corpus {source} does not exist")
    if source.suffix == ".jsonl":
        return _read_jsonl(source)
    if source.suffix == ".csv":
        return _read_csv(source)
    if source.suffix == ".parquet":
        return _read_parquet(source)
    raise CorpusError(f"corpus {source}: expected a folder, or a .jsonl, .csv or .parquet manifest")


def _read_folder(root: Path) -> Iterator[CorpusItem]:
    # One directory listing per folder, no stat per file: a caption is known to exist from the
    # listing itself (large folders: seconds saved per 100k images). Ids and names are built as
    # strings and each image gets one Path: Path.relative_to, .stem and .with_suffix per file cost
    # more than the listing itself (bench/corpus_listing.py).
    found: list[tuple[str, str, str, bool]] = []  # (id, folder, file name, has a caption)
    macos_twins = macos_folders = 0
    # A symbolic link to a folder is followed as a link to a file is: a subfolder moved to another disk and linked
    # back must not read as its images deleted. One that leads back to a folder it is in is not (os.walk would loop).
    for folder, subfolders, names in os.walk(root, onerror=_unlistable, followlinks=True):
        if MACOS_ARCHIVE_FOLDER in subfolders:
            subfolders.remove(MACOS_ARCHIVE_FOLDER)  # in place: os.walk then never enters it
            macos_folders += 1
        subfolders[:] = [name for name in subfolders if not _leads_back(root, folder, name)]
        present = set(names)
        relative = os.path.relpath(folder, root)
        prefix = "" if relative == os.curdir else relative.replace(os.sep, "/") + "/"
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                if name.startswith(APPLEDOUBLE_PREFIX):
                    macos_twins += 1
                    continue
                found.append((prefix + name, folder, name, f"{stem}.txt" in present))
    if macos_twins or macos_folders:
        log.debug("%s: macOS metadata left out of the corpus: AppleDouble files (._NAME) %d, %s/ folders %d",
                  root, macos_twins, MACOS_ARCHIVE_FOLDER, macos_folders)
    found.sort()
    for item_id, folder, name, has_caption in found:
        path = Path(folder, name)
        if not _is_utf8(str(path)):
            # Ids, paths and the stores are UTF-8 text: such a name cannot be stored, only reported.
            yield CorpusItem(id=printable(item_id), path=path, unusable="file or folder name is not valid UTF-8: rename it")
            continue
        stem = os.path.splitext(name)[0]
        if has_caption:
            try:
                with open(os.path.join(folder, f"{stem}.txt"), encoding="utf-8") as fh:
                    text = fh.read().strip()
            except UnicodeDecodeError as exc:
                yield CorpusItem(id=item_id, path=path, unusable=f"caption {stem}.txt is {not_utf8(exc)}")
                continue
            except OSError as exc:
                yield CorpusItem(id=item_id, path=path, unusable=f"caption {stem}.txt cannot be read: {exc.strerror}")
                continue
        else:
            text = stem.replace("_", " ").replace("-", " ")
        yield CorpusItem(id=item_id, path=path, text=text)


def _leads_back(root: Path, folder: str, name: str) -> bool:
    """Whether `name` in `folder` is a symbolic link to a folder the walk is in: one of `folder`'s own (real)
    ancestors, or a folder the walk came through to reach `folder` (links that point at each other's folders)."""
    path = os.path.join(folder, name)
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    relative = os.path.relpath(folder, root)
    parts = [] if relative == os.curdir else relative.split(os.sep)
    walked = {os.path.realpath(os.path.join(root, *parts[:depth])) for depth in range(len(parts) + 1)}
    here = os.path.realpath(folder)
    if target in walked or here.startswith(target.rstrip(os.sep) + os.sep):
        log.warning("%s: a symbolic link to %s, a folder it is in: not followed (its images would be listed again "
                    "and again)", printable(path), printable(target))
        return True
    return False


def _unlistable(error: OSError) -> None:
    # os.walk skips a folder it cannot list: its images would read as vanished, and the next `index` would remove
    # them from the store.
    raise CorpusError(f"cannot list folder {error.filename}: {error.strerror}: its images would count as deleted; "
                      "make it readable (or move it out of SOURCE), then rerun") from error


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name's undecodable bytes, held as surrogate escapes
        return False
    return True


def printable(name: str) -> str:
    """A file name with the bytes that are not UTF-8 written as \\xNN (os.walk holds them as surrogate escapes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_jsonl(manifest: Path) -> Iterator[CorpusItem]:
    with manifest.open(encoding=MANIFEST_ENCODING, errors="surrogateescape") as fh:
        for line_no, line in enumerate(_utf8_lines(fh, manifest), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{manifest}:{line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise CorpusError(f"{manifest}:{line_no}: each line must be a JSON object")
            yield _item(row, manifest=manifest, where=f"{manifest}:{line_no}")


def _read_csv(manifest: Path) -> Iterator[CorpusItem]:
    with manifest.open(encoding=MANIFEST_ENCODING, errors="surrogateescape", newline="") as fh:
        # strict: a quote never closed is an error, where it made every line after it part of its cell, rows that
        # then read as deleted
        reader = csv.DictReader(_utf8_lines(fh, manifest), strict=True)
        line_no = 1
        while True:
            try:
                if reader.fieldnames is None:  # reads the header
                    return
                line_no = reader.line_num + 1  # where the next row starts: a quoted cell may span lines
                row = next(reader, None)
            except csv.Error as exc:  # a quote not closed, a field past csv's size limit, a NUL byte
                raise CorpusError(f"{manifest}:{line_no}: not valid CSV ({exc})") from exc
            if row is None:
                return
            if None in row:  # DictReader's key for the fields past the header's
                raise CorpusError(f"{manifest}:{line_no}: more fields than the header "
                                  f"({len(reader.fieldnames) + len(row[None])}, header {len(reader.fieldnames)})")
            yield _item(row, manifest=manifest, where=f"{manifest}:{line_no}")


def _read_parquet(manifest: Path) -> Iterator[CorpusItem]:
    import pyarrow as pa  # only for Parquet manifests
    import pyarrow.parquet as pq

    row_no = 0  # across batches: an error names the row of the file
    try:
        for batch in pq.ParquetFile(manifest).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield _item(row, manifest=manifest, where=f"{manifest} row {row_no}")
                row_no += 1
    except (pa.ArrowException, OSError) as exc:
        where = f"{manifest} row {row_no}" if row_no else str(manifest)
        raise CorpusError(f"{where}: cannot be read as Parquet: {exc}") from exc


def _utf8_lines(fh: Iterable[str], manifest: Path) -> Iterator[str]:
    """The lines of a manifest opened with errors="surrogateescape"; a line holding bytes that are not
    UTF-8 (there as surrogates) is refused by its number, which a strict decoder, reading in blocks,
    cannot tell."""
    for line_no, line in enumerate(fh, start=1):
        if not _is_utf8(line):
            byte = next(ord(char) - 0xDC00 for char in line if "\udc80" <= char <= "\udcff")
            raise CorpusError(f"{manifest}:{line_no}: not UTF-8 text (byte {byte:#04x}); save the manifest as UTF-8")
        yield line


def _item(row: dict[str, Any], *, manifest: Path, where: str) -> CorpusItem:
    path = row.get("path")
    if not isinstance(path, str) or not path:
        raise CorpusError(f"{where}: field 'path' is required (image file, relative to the manifest)")
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CorpusError(f"{where}: field 'metadata' must be an object")
    metadata = {**metadata, **{k: v for k, v in row.items() if k not in RESERVED and v not in (None, "")}}
    item_id = row.get("id")
    if item_id is None or item_id == "":
        item_id = path
    elif isinstance(item_id, bool) or not isinstance(item_id, (str, int, float)):
        # 0 is an id like any other (a falsy one is not absent); a list or object would be stored as its Python repr
        raise CorpusError(f"{where}: field 'id' must be a string or a number, not {type(item_id).__name__}")
    text = row.get("text")
    text = "" if text is None else text
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field 'text' must be a string")
    return CorpusItem(id=str(item_id), path=(manifest.parent / path), text=text, metadata=metadata)

