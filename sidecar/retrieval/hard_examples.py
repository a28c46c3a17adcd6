"""Hard examples and feedback: the queries that fail users, kept for evaluation and fine-tuning.

A searched query is hard when it found nothing, when the model finds nothing close to it (the top
cosine of a vector search under its filters is under `min_score`, whatever ranked the hits shown: a
top hit BM25 put first says nothing of the model), or when the vector and BM25 lists disagree (they share at most
`max_agreement` of their top K). A sampled share of searches is classified off the request path
(`sidecar.retrieval.monitor.BackgroundChecks`: the disagreement costs a vector and a BM25 search)
and the hard ones are appended to `hard-examples.jsonl`, each query once a while (`repeat_seconds`, remembered in
`hard-example-recent.sqlite`, which every server process shares): a
search of a query logged since is a line in `hard-example-repeats.jsonl` naming its record, so a popular
failing query neither fills the log nor leaves feedback on its later searches unresolved, and one found
not hard since is not checked again, so a popular query that does not fail leaves the checks to others; `POST
/v1/feedback` appends a clicked or judged document to `feedback.jsonl`. A query is its text (in any case
or spacing, or its image) and its filters: the documents a filtered search could show are all its
judgments mean, so the export keeps the filters and eval re-runs the query with them. All are
size-bounded rotating files that several server processes write at once. `export_examples` turns them into an evaluation set (queries and qrels
for `clip-sidecar eval`), the hard queries still to judge, and image-text pairs for open_clip's
trainer.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
from concurrent_log_handler import ConcurrentRotatingFileHandler
from PIL import Image

from sidecar.retrieval.monitor import BackgroundChecks
from sidecar.sqlite_files import identity, move_aside, one_process_at_a_time, unreadable
from sidecar.stores.base import Store
from sidecar.types import Filters

log = logging.getLogger(__name__)

HARD_EXAMPLES_FILE = "hard-examples.jsonl"
REPEATS_FILE = "hard-example-repeats.jsonl"
RECENT_FILE = "hard-example-recent.sqlite"
FEEDBACK_FILE = "feedback.jsonl"
REASONS = ("no_result", "low_score", "disagreement")
FEEDBACK_KINDS = ("click", "judgment")
MAX_RELEVANCE = 3  # judgment grades 0 (not relevant) .. 3, as TREC qrels grade
# Queries logged, and apart queries found not hard, within the repeat window that RECENT_FILE remembers (a few MB
# each for ordinary query lengths); past it the oldest is forgotten, and its next search is checked again.
MAX_REMEMBERED = 10_000
# The fields the export reads of each log's records, and the types the server writes them in (NoneType: the field
# may be null or absent). A record of another shape (another program's object, a line edited by hand) is left out
# and counted: read as the server's, it stopped the export in a traceback.
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    HARD_EXAMPLES_FILE: {"query_id": (str,), "text": (str, type(None)), "filters": (dict, type(None)),
                         "image": (str, type(None))},
    REPEATS_FILE: {"query_id": (str, type(None)), "repeat_of": (str, type(None))},
    FEEDBACK_FILE: {"query_id": (str, type(None)), "text": (str, type(None)), "filters": (dict, type(None)),
                    "doc_id": (str, type(None)), "relevance": (int, type(None)), "kind": (str, type(None))},
}
# Captions open_clip's CSV reader (pandas.read_csv with its default na_values) reads as a missing value,
# quoted or not: it would train on the caption "nan". Such pairs are left out of pairs.csv.
_CSV_MISSING = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                                "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


# ---- size-bounded JSONL, written by several processes --------------------------------------------

class _BoundedRotatingHandler(ConcurrentRotatingFileHandler):
    """concurrent-log-handler rotates once a file has reached maxBytes, before writing the next
    record; rotating when the record would take it past maxBytes keeps every file within it.
    A line left unfinished (a writer killed, or a disk full, mid-line) is ended before the next
    record: appended to it, that record would be lost with it."""

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        if self.stream is None or self.stream.closed:
            self.stream = self.do_open()
        self.stream.flush()
        size = self.stream.seek(0, os.SEEK_END)
        ending = 1 if self._unfinished() else 0
        return size > 0 and size + ending + len(record.getMessage().encode("utf-8")) + 1 > self.maxBytes

    def do_write(self, msg: str) -> None:
        super().do_write("\n" + msg if self._unfinished() else msg)

    def handleError(self, record: logging.LogRecord) -> None:
        """A write that failed (a full disk, a read-only one) is raised to the writer, not printed and
        forgotten; the stream holding its unwritten bytes is dropped, so they neither fail the next
        write nor the close."""
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
        raise  # emit() calls this within its `except`: the write's own error

    def _unfinished(self) -> bool:
        """Whether the file's last line lacks its newline (read anew: another process may have written it)."""
        try:
            with open(self.baseFilename, "rb") as file:
                if file.seek(0, os.SEEK_END) == 0:
                    return False
                file.seek(-1, os.SEEK_END)
                return file.read(1) != b"\n"
        except FileNotFoundError:
            return False


class JsonlLog:
    """JSON lines appended to `path`, rotated before it would pass `max_bytes` into `path.1` …
    `path.<backups>` (the oldest dropped), so the log never holds more than (backups + 1) ×
    max_bytes. Gunicorn's workers append to one log: a lock file serialises writes and rotations
    (concurrent-log-handler), and a worker whose file was rotated by another reopens it."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = _BoundedRotatingHandler(str(self.path), maxBytes=max_bytes, backupCount=backups,
                                                encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> bool:
        """Append one record; False (not written) when it alone is larger than `max_bytes`; OSError
        where the file cannot take it."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        if len(line.encode("utf-8")) + 1 > self.max_bytes:
            return False
        self._handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
        return True

    def close(self) -> None:
        self._handler.close()


def read_jsonl_log(path: Path, *, skipped: Callable[[Path], None] = lambda file: None) -> Iterator[dict[str, Any]]:
    """Every record of a rotated log, oldest first (path.N … path.1, then path); a line that is not
    a whole record (cut short by a killed server or a full disk, maybe inside a character) is
    skipped and told to `skipped` with its file."""
    path = Path(path)
    rotated = [p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()]
    for file in sorted(rotated, key=lambda p: int(p.suffix[1:]), reverse=True) + ([path] if path.exists() else []):
        with file.open("rb") as handle:  # bytes: a line cut inside a character must not stop the reading
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:  # not JSON, or not UTF-8
                    record = None
                if isinstance(record, dict):
                    yield record
                elif line.strip():
                    skipped(file)


# ---- classifying searches ------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class HardExampleRules:
    min_score: float = 0.2  # the vector search's top cosine (the model's best match) below this: low_score
    max_agreement: float = 0.1  # share of the vector top k also in the BM25 top k at most this: disagreement


@dataclass(frozen=True, kw_only=True)
class SearchedQuery:
    """What a search request asked and answered, as the hard-example log sees it."""

    query_id: str
    text: str | None
    image: bytes | None
    mode: str
    k: int
    filters: Filters | None
    vector: np.ndarray | None  # the query's vector by the coarse model (None in bm25 mode)
    hits: Sequence[Any]  # sidecar.retrieval.search.Hit, best first
    model: str = ""


def agreement(first: Sequence[str], second: Sequence[str]) -> float | None:
    """The share of the shorter list's ids the other holds; None when both are empty."""
    if not first and not second:
        return None
    if not first or not second:
        return 0.0
    return len(set(first) & set(second)) / min(len(first), len(second))


def classify(query: SearchedQuery, *, store: Store, rules: HardExampleRules) -> dict[str, Any] | None:
    """The log record of a hard query (its reasons, top score, agreement, hits), or None."""
    reasons = []
    if not query.hits:
        reasons.append("no_result")
    # The model's best match among the documents the query may see, not the top hit's cosine: in hybrid
    # mode BM25 may rank first a hit the model scores low (or never scored) while the model found a close one.
    by_vector = store.vector_search(query.vector, query.k, filters=query.filters) if query.vector is not None else []
    top = by_vector[0].score if by_vector else None
    if top is not None and top < rules.min_score:
        reasons.append("low_score")
    shared = None
    if query.text and query.vector is not None:
        by_bm25 = [hit.id for hit in store.text_search(query.text, query.k, filters=query.filters)]
        shared = agreement([hit.id for hit in by_vector], by_bm25)
        if shared is not None and shared <= rules.max_agreement:
            reasons.append("disagreement")
    if not reasons:
        return None
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "query_id": query.query_id,
        "text": query.text, "mode": query.mode, "k": query.k, "filters": dict(query.filters or {}),
        "reasons": reasons, "vector_top_score": top, "agreement": shared, "model": query.model,
        "hits": [{"id": hit.id, "score": hit.score} for hit in query.hits]}
    if query.image is not None:
        record["image"] = base64.b64encode(query.image).decode("ascii")
    return record


class HardExampleLog:
    """Classifies a `fraction` of the searches it is shown, off the request path (`checks`), and
    appends the hard ones to `folder/hard-examples.jsonl`. `images`: also log an image query's
    bytes (base64); without it image-only queries are not logged at all. A query with neither text
    nor image (`like`: a stored document's vector) is never logged.

    A query logged within the last `repeat_seconds` (the same text up to case and
    spacing, image, filters and model: `repeat_key`) is not classified or logged again: its search is
    a line `{query_id, repeat_of}` in `folder/hard-example-repeats.jsonl`, bounded apart, so feedback
    naming it by query_id alone still finds its query, and repeats rotate out only each other. A query
    found not hard within the window is not classified again either (skipped), so that a popular query's
    two searches per check do not keep the queue busy and crowd other queries' checks out (dropped). Either
    verdict stands for the window, in whatever mode and depth the query is searched again, except a check
    without a vector (bm25 mode), which judged only the hits and ran no search: its not-hard verdict is not
    kept. 0: every search is classified. Both verdicts are kept in `folder/hard-example-recent.sqlite`, which
    every process logging to `folder` shares (Gunicorn's workers): a popular query is checked once a window, not
    once by each worker (two workers checking it at the same moment may both log it). `clock`: seconds,
    comparable across processes and restarts. `record(outcome)` is told logged, repeated, skipped, dropped (the
    queue was full) or too_large (one record over the file's bound)."""

    def __init__(self, store: Store, *, folder: Path, checks: BackgroundChecks, fraction: float,
                 rules: HardExampleRules, images: bool, max_bytes: int, backups: int, repeat_seconds: float,
                 record: Callable[[str], None] = lambda outcome: None, seed: int | None = None,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.fraction = fraction
        self.rules = rules
        self.images = images
        self.log = JsonlLog(Path(folder) / HARD_EXAMPLES_FILE, max_bytes=max_bytes, backups=backups)
        self.repeats = JsonlLog(Path(folder) / REPEATS_FILE, max_bytes=max_bytes, backups=backups)
        self._checks = checks
        self._record = record
        self._random = random.Random(seed)
        # Repeat keys of the queries logged (-> the query_id of its record) and, apart, of those found not hard,
        # so that many of either forget none of the other.
        recent = Path(folder) / RECENT_FILE
        self._logged = _Recent(recent, "logged", repeat_seconds, clock)
        self._not_hard = _Recent(recent, "not_hard", repeat_seconds, clock)

    def offer(self, query: SearchedQuery) -> None:
        if self.fraction <= 0 or self._random.random() >= self.fraction:
            return
        if not self.images:
            query = _without_image(query)
        if not query.text and query.image is None:
            # An image-only query without images asked for, or a `like` search (a stored document's
            # vector, no text or image of its own): an exported record could not be replayed by eval.
            return
        if not self._checks.submit(lambda: self._classify(query)):
            self._record("dropped")

    def _classify(self, query: SearchedQuery) -> None:
        key = repeat_key(query)
        first = self._logged.get(key)
        if first is not None:  # not classified again either: its two searches were most of what a check costs
            written = self.repeats.write({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          "query_id": query.query_id, "repeat_of": first})
            self._record("repeated" if written else "too_large")
            return
        if self._not_hard.get(key) is not None:
            self._record("skipped")
            return
        record = classify(query, store=self.store, rules=self.rules)
        if record is None:
            if query.vector is not None:
                self._not_hard.add(key, True)
            return
        if not self.log.write(record):
            self._record("too_large")
            return
        self._record("logged")
        self._logged.add(key, query.query_id)

    def close(self) -> None:
        self.log.close()
        self.repeats.close()
        self._logged.close()
        self._not_hard.close()


class _Recent:
    """Keys (JSON-able) added within the last `seconds` (0: none kept), each with its (JSON-able) value, in a
    table of the SQLite file `path` that every process opening it shares; at most about MAX_REMEMBERED, the
    oldest forgotten first. `kind` names the table's share (the file holds several)."""

    def __init__(self, path: Path, kind: str, seconds: float, clock: Callable[[], float]):
        self.path = path
        self.kind = kind
        self.seconds = seconds
        self._clock = clock
        self._db: sqlite3.Connection | None = None  # opened by the first use: on the checks' thread, not at boot
        self._opened: tuple[int, int] | None = None  # the file `_db` is (or was to be) a connection to
        self._added = 0

    def add(self, key: Any, value: Any) -> None:
        if self.seconds <= 0:
            return

        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO recent VALUES (?, ?, ?, ?)",
                       (self.kind, json.dumps(key), json.dumps(value), self._clock()))
            self._added += 1
            if self._added % _BOUND_EVERY == 0:  # past the bound by at most this many adds of each process
                db.execute("DELETE FROM recent WHERE rowid IN (SELECT rowid FROM recent WHERE kind = ? "
                           "ORDER BY added DESC LIMIT -1 OFFSET ?)", (self.kind, MAX_REMEMBERED))
        self._transaction(insert)

    def get(self, key: Any) -> Any:
        """`key`'s value if it was added within `seconds`, else None; forgets those added before."""
        if self.seconds <= 0:
            return None

        def select(db: sqlite3.Connection) -> Any:
            db.execute("DELETE FROM recent WHERE kind = ? AND added <= ?", (self.kind, self._clock() - self.seconds))
            return db.execute("SELECT value FROM recent WHERE kind = ? AND key = ?",
                              (self.kind, json.dumps(key))).fetchone()
        row = self._transaction(select)
        return json.loads(row[0]) if row is not None else None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def _transaction(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """`work` in one transaction. A file SQLite cannot read, when opened or under a running server (a disk
        fault, a copy cut short), is moved aside and `work` runs again on a new one: left alone, it would fail
        every check until the worker restarted, and nothing more would be logged."""
        try:
            with self._connection() as db:
                return work(db)
        except sqlite3.DatabaseError as exc:
            if not unreadable(exc):
                raise
            self._begin_again(exc)
        with self._connection() as db:
            return work(db)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            with one_process_at_a_time(self.path):
                try:
                    self._db = self._open()
                finally:
                    self._opened = identity(self.path)  # the file opened, or found unreadable: none else moves it now
        return self._db

    def _begin_again(self, exc: sqlite3.DatabaseError) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        with one_process_at_a_time(self.path):
            if identity(self.path) == self._opened:  # else another worker (or the other kind) has begun it again
                aside = move_aside(self.path)
                log.warning("hard examples: %s cannot be read (%s); moved to %s and began a new one (queries "
                            "logged or found not hard before are checked again)", self.path, exc, aside.name)

    def _open(self) -> sqlite3.Connection:
        # WAL: the workers' checks read while another writes; the timeout waits out another's write. A commit
        # lost with the machine only costs a query checked again: no fsync per commit (synchronous=NORMAL).
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                db.execute("CREATE TABLE IF NOT EXISTS recent (kind TEXT, key TEXT, value TEXT, added REAL, "
                           "PRIMARY KEY (kind, key))")
                db.execute("CREATE INDEX IF NOT EXISTS recent_by_age ON recent (kind, added)")
        except sqlite3.Error:
            db.close()
            raise
        return db


_T = TypeVar("_T")

# How many adds of one process pass between trims of _Recent's table to MAX_REMEMBERED (a trim reads that many rows).
_BOUND_EVERY = 100


def normalised_text(text: str) -> str:
    """A query's text as one query: casefolded, its whitespace runs one space. CLIP's tokenizer lowercases and
    splits on whitespace, as BM25's analyser does: "Red Circle" and "red  circle" search alike."""
    return " ".join(text.casefold().split())


def repeat_key(query: SearchedQuery) -> tuple[str | None, ...]:
    """What makes two searches one query for the hard-example log: the normalised text, the image's bytes, the
    filters (they decide which documents could be found) and the model (another model is another verdict). The
    mode and depth are not: the record of its first search stands for it."""
    image = hashlib.sha1(query.image).hexdigest() if query.image is not None else None
    return (normalised_text(query.text) if query.text else None, image,
            json.dumps(dict(query.filters or {}), sort_keys=True, ensure_ascii=False), query.model)


def _without_image(query: SearchedQuery) -> SearchedQuery:
    return SearchedQuery(query_id=query.query_id, text=query.text, image=None, mode=query.mode, k=query.k,
                         filters=query.filters, vector=query.vector, hits=query.hits, model=query.model)


def feedback_record(*, query_id: str | None, text: str | None, doc_id: str, relevance: int, kind: str,
                    filters: Filters | None = None) -> dict[str, Any]:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "query_id": query_id, "text": text,
            "filters": dict(filters) if filters else None, "doc_id": doc_id, "relevance": relevance, "kind": kind}


# ---- export --------------------------------------------------------------------------------------

@dataclass
class ExportSummary:
    queries: int = 0  # judged queries written to queries.jsonl
    judgments: int = 0  # qrels lines
    to_judge: int = 0  # hard queries without feedback
    pairs: int = 0  # image-text pairs for fine-tuning
    skipped: dict[str, int] = field(default_factory=dict)  # why feedback or pairs were left out -> how many
    files: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{self.queries} judged queries ({self.judgments} judgments), {self.to_judge} hard queries still to "
                 f"judge, {self.pairs} image-text pairs"]
        lines += [f"  left out: {count} {why}" for why, count in self.skipped.items()]
        lines += [f"  {path}" for path in self.files]
        return "\n".join(lines)


def export_examples(log_dir: Path, out: Path, *, image_paths: Mapping[str, str] | None = None,
                    min_relevance: int = 1) -> ExportSummary:
    """Write, from the logs in `log_dir`:
    - `queries.jsonl` + `qrels.jsonl`: every query with feedback, as `clip-sidecar eval --queries
      --qrels` reads them (category: its first hard-example reason, or `feedback`; tags: all of
      them; a logged query image is written to `images/`; filters: the feedback's, else those of
      the logged search its query_id names, itself or by a repeat line); a document's grade is its
      latest judgment, else its highest click (a click's relevance: 1 unless it carried its own). The
      same text under other filters, or searched with another image (or none), is another query, in another
      case or spacing the same one; feedback on a search with an image, named by its query_id, judges that query;
    - `to_judge.jsonl`: hard queries without feedback, the most searched first (`searches`: their
      records and repeat lines), with their filters, the hits they were shown and a query image's file
      in `images/`;
    - `pairs.csv`: (document image, query text) for judgments of at least `min_relevance`, in
      open_clip's CSV format (tab-separated `filepath`, `title`), where `image_paths` (document id
      → image file, from the shards) knows the document's image, an absolute path to a file that
      exists, and open_clip's reader would not read the text as a missing value (NA, null, …); each
      (image, text) once, however many filters it was judged under."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary()
    hard: dict[str, dict[str, Any]] = {}  # query key -> its latest hard-example record
    # Every logged query_id -> its query key, the earlier searches of a text searched again and its repeats too:
    # feedback names the query_id of the answer it was given, which need not be the one its record holds.
    by_query_id: dict[str, str] = {}
    searches: dict[str, int] = {}  # query key -> its records and repeats
    for record in _server_records(Path(log_dir), HARD_EXAMPLES_FILE, summary):
        key = _query_key(record.get("text"), record["query_id"], record.get("filters"), image=record.get("image"))
        hard[key] = record
        searches[key] = searches.get(key, 0) + 1
        by_query_id[record["query_id"]] = key
    for repeat in _server_records(Path(log_dir), REPEATS_FILE, summary):
        key = by_query_id.get(repeat.get("repeat_of") or "")
        if key is not None and repeat.get("query_id"):  # else its record rotated out: feedback on it is left out
            by_query_id[repeat["query_id"]] = key
            searches[key] += 1

    queries: dict[str, dict[str, Any]] = {}  # key -> {"text", "image", "reasons", "filters"}
    grades: dict[tuple[str, str], tuple[int, bool]] = {}  # (key, doc) -> (grade, from a judgment)
    for record in _server_records(Path(log_dir), FEEDBACK_FILE, summary):
        text, query_id, doc_id = record.get("text"), record.get("query_id"), record.get("doc_id")
        named = hard.get(by_query_id.get(query_id or ""), {})  # the logged search its query_id names, if any
        # The documents the user could see: the feedback's filters, else those of the logged search it names.
        filters = record.get("filters") or named.get("filters")
        # The logged search's image, where the feedback's text is that search's too (or it gives none): feedback
        # cannot carry the image, and the same text searched with another image, or none, is another query.
        image = named.get("image") if not text or named.get("text") and \
            normalised_text(named["text"]) == normalised_text(text) else None
        # A query_id alone names the logged search's text: under the feedback's own filters, another query.
        text = text or named.get("text")
        key = _query_key(text, None, filters, image=image) if text else by_query_id.get(query_id or "")
        if key is None or not doc_id:
            _count(summary.skipped, "feedback without query text whose query_id names no logged query")
            continue
        logged = hard.get(key, {})
        queries.setdefault(key, {"text": text or logged.get("text"), "image": logged.get("image"),
                                 "reasons": logged.get("reasons", []), "filters": filters})
        relevance = record.get("relevance")
        grade, judged = 1 if relevance is None else relevance, record.get("kind") == "judgment"
        previous = grades.get((key, doc_id))
        if judged or previous is None or (not previous[1] and grade > previous[0]):
            grades[(key, doc_id)] = (grade, judged)  # the latest judgment, else the highest click

    with (out / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for key, query in queries.items():
            row: dict[str, Any] = {"id": key, "category": (query["reasons"] or ["feedback"])[0],
                                   "tags": query["reasons"]}
            if query["text"]:
                row["text"] = query["text"]
            if query["filters"]:
                row["filters"] = query["filters"]
            if query["image"]:
                row["image"] = _write_image(out, key, query["image"])
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary.queries = len(queries)
    with (out / "qrels.jsonl").open("w", encoding="utf-8") as handle:
        for (key, doc_id), (grade, _) in grades.items():
            handle.write(json.dumps({"query_id": key, "doc_id": doc_id, "relevance": grade}) + "\n")
    summary.judgments = len(grades)
    with (out / "to_judge.jsonl").open("w", encoding="utf-8") as handle:
        # The most searched first: judging a query that fails many users is worth the most.
        for key, record in sorted(hard.items(), key=lambda item: -searches[item[0]]):
            if key not in queries:
                row = {"id": key, "text": record.get("text"), "filters": record.get("filters") or None,
                       "reasons": record.get("reasons"), "searches": searches[key], "hits": record.get("hits", [])}
                if record.get("image"):  # an image query: what the judge looks at
                    row["image"] = _write_image(out, key, record["image"])
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                summary.to_judge += 1
    with (out / "pairs.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["filepath", "title"])
        written: set[tuple[str, str]] = set()
        for (key, doc_id), (grade, _) in grades.items():
            text = queries[key]["text"]
            if grade < min_relevance or not text:
                continue
            if image_paths is None:
                _count(summary.skipped, "pairs whose document image is unknown (pass the shards)")
                continue
            path = image_paths.get(doc_id)
            if path is None:
                _count(summary.skipped, "pairs whose document the shards do not hold (deleted since, or an id feedback "
                                        "named that was never indexed)")
                continue
            if not (Path(path).is_absolute() and Path(path).is_file()):
                # The trainer would stop at the first such pair. A relative path is an older version's, relative
                # to the folder its embed ran in, which the shards do not record.
                _count(summary.skipped, "pairs whose image is not at the path the shards name (moved since, or "
                                        "named relative to an older embed's folder): rerun `clip-sidecar embed "
                                        "SOURCE --out SHARDS` with SOURCE where it is now to update the paths")
                continue
            caption = " ".join(text.split())
            if caption in _CSV_MISSING:
                _count(summary.skipped, "pairs whose text open_clip's CSV reader reads as missing (NA, null, None, …)")
                continue
            pair = (str(Path(path).resolve()), caption)
            if pair in written:
                # The same text judged under other filters is another query, but the same pair to train on: copies
                # weigh it more and, in one batch, are each other's negatives.
                _count(summary.skipped, "pairs already written (the same image and text, judged under other filters)")
                continue
            written.add(pair)
            writer.writerow(pair)
            summary.pairs += 1
    summary.files = [out / name for name in ("queries.jsonl", "qrels.jsonl", "to_judge.jsonl", "pairs.csv")]
    return summary


def _server_records(log_dir: Path, name: str, summary: ExportSummary) -> Iterator[dict[str, Any]]:
    """The records of the log `name` in `log_dir` whose fields the export reads are of the types the server writes
    (_FIELDS; an image, base64: decoded here); the others, and lines that are not a whole record, are counted in
    `summary` as left out."""
    def unreadable(file: Path) -> None:
        _count(summary.skipped, f"lines of {file.name} that are not a whole record (cut short by a killed server "
                                "or a full disk)")

    for record in read_jsonl_log(log_dir / name, skipped=unreadable):
        wrong = next((field for field, kinds in _FIELDS[name].items() if not isinstance(record.get(field), kinds)),
                     None)
        if wrong is None and "image" in _FIELDS[name] and record.get("image"):
            try:
                record["image"] = base64.b64decode(record["image"], validate=True)  # as the server encoded it
            except binascii.Error:
                wrong = "image"
        if wrong is None:
            yield record
        else:
            _count(summary.skipped, f"records of {name} whose {wrong} is not the server's (missing, or of another "
                                    "type: another program's record, or one edited by hand)")


def _query_key(text: str | None, query_id: str | None, filters: Filters | None, *, image: bytes | None = None) -> str:
    """One id per query: its normalised text's, filters' and image's (the same words in any case or spacing searched
    twice under the same filters and with the same image, or none, are one query; under other filters they judge
    other documents, with another image they ask for others: `repeat_key` logs each apart), else its query_id."""
    if text:
        words = normalised_text(text)
        if filters:  # an unfiltered query keeps the id it had before filters were part of it
            words += "\0" + json.dumps(filters, sort_keys=True, ensure_ascii=False)
        if image:  # a text-only query keeps the id it had before images were part of it
            words += "\0image:" + hashlib.sha1(image).hexdigest()
        return "q-" + hashlib.sha1(words.encode("utf-8")).hexdigest()[:12]
    return f"q-{query_id}"


def _write_image(out: Path, key: str, data: bytes) -> str:
    """A logged query image written to `out/images/`, named by its query key: its path relative to `out`."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    try:
        extension = (Image.open(io.BytesIO(data)).format or "img").lower()
    except Exception:  # noqa: BLE001 - the bytes are kept as they came; eval reports an undecodable image
        extension = "img"
    path = Path("images") / f"{key}.{extension}"
    (out / path).write_bytes(data)
    return str(path)


def _count(counts: dict[str, int], why: str) -> None:
    counts[why] = counts.get(why, 0) + 1
