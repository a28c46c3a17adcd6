"""The embedded store's BM25 index: a tantivy index (block-max WAND top-k, so a query does not score
every matching document) keyed by the store's row numbers.

SQLite stays the store's source of truth; this index mirrors its live rows' texts. Each tantivy
commit has an opstamp, which the store records in the SQLite transaction of the same generation:
a searcher is known to show generation G when the index's committed opstamp is the one G names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tantivy

# A tokenizer as close to the former SQLite FTS5 `unicode61 remove_diacritics 2` as tantivy has:
# split on anything not alphanumeric, lowercase, fold accents; words over 40 bytes are dropped.
TOKENIZER = "sidecar_words"
_MAX_TOKEN_BYTES = 40
MAX_QUERY_TERMS = 64
# A filtered query restricts the index to at most this many candidate rows by a term set; past it
# the unfiltered ranking is read deeper and filtered here (a term set of 50k rows costs ~70 ms).
_TERM_SET_ROWS = 4096
# tantivy's indexing memory per write; one indexing thread (writes are batched by the caller).
_WRITER_HEAP_BYTES = 50_000_000
_ADD_CHUNK = 10_000


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    # Term frequencies without positions: BM25 needs no more (no phrase queries here).
    builder.add_text_field("text", tokenizer_name=TOKENIZER, index_option="freq")
    builder.add_unsigned_field("row", indexed=True, fast=True)
    builder.add_unsigned_field("text_hash", fast=True)  # lets `check` compare texts without storing them
    return builder.build()


SCHEMA = _schema()
_ANALYZER = (tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
             .filter(tantivy.Filter.remove_long(_MAX_TOKEN_BYTES))
             .filter(tantivy.Filter.lowercase())
             .filter(tantivy.Filter.ascii_fold())
             .build())


def query_terms(text: str) -> list[str]:
    """User text → the index's terms, each once (BM25 "match" semantics: any term may match).
    Terms go into term queries directly, so no character of user text is a query operator."""
    return list(dict.fromkeys(_ANALYZER.analyze(text)))[:MAX_QUERY_TERMS]


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class Bm25Index:
    """The tantivy index in one folder. Open it once per store object; `snapshot()` for readers,
    `writer()` for the store's writer (which holds the store's write lock meanwhile)."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._index = tantivy.Index(SCHEMA, path=str(path), reuse=True)
        self._index.register_tokenizer(TOKENIZER, _ANALYZER)
        # Searchers are taken when the store loads a generation, never behind its back.
        self._index.config_reader(reload_policy="Manual", num_warmers=0)

    def committed_opstamp(self) -> int:
        """The opstamp of the last commit on disk (any process's)."""
        return int(json.loads((self.path / "meta.json").read_text())["opstamp"])

    def snapshot(self) -> Bm25Snapshot:
        """A searcher over the index as committed now; it keeps seeing that commit whatever is
        written after."""
        self._index.reload()
        return Bm25Snapshot(self._index.searcher())

    @contextlib.contextmanager
    def writer(self) -> Iterator[Bm25Writer]:
        """A tantivy writer for one store write; uncommitted changes are rolled back when it ends.
        tantivy allows one writer per index across processes: the caller holds the store's write lock."""
        writer = self._index.writer(_WRITER_HEAP_BYTES, 1)
        session = Bm25Writer(writer)
        try:
            yield session
        finally:
            if session.pending:
                writer.rollback()
            writer.wait_merging_threads()  # releases tantivy's writer lock for the next writer


class Bm25Writer:
    def __init__(self, writer: tantivy.IndexWriter):
        self._writer = writer
        self.pending = False

    def add(self, rows: Sequence[int], texts: Sequence[str]) -> None:
        for row, text in zip(rows, texts):
            doc = tantivy.Document()
            doc.add_text("text", text)
            doc.add_unsigned("row", int(row))
            doc.add_unsigned("text_hash", text_hash(text))
            self._writer.add_document(doc)
        self.pending = True

    def delete(self, rows: Iterable[int]) -> None:
        rows = [int(r) for r in rows]
        if rows:
            self._writer.delete_documents_by_query(tantivy.Query.term_set_query(SCHEMA, "row", rows))
            self.pending = True

    def replace_all(self, rows_and_texts: Iterable[tuple[int, str]]) -> None:
        self._writer.delete_all_documents()
        chunk: list[tuple[int, str]] = []
        for item in rows_and_texts:
            chunk.append(item)
            if len(chunk) == _ADD_CHUNK:
                self.add(*zip(*chunk))
                chunk = []
        if chunk:
            self.add(*zip(*chunk))
        self.pending = True

    def commit(self) -> int:
        """Make the changes durable and visible to new snapshots; returns the commit's opstamp."""
        opstamp = int(self._writer.commit())
        self.pending = False
        return opstamp


class Bm25Snapshot:
    """One committed state of the index, for any number of reader threads (searches release the GIL)."""

    def __init__(self, searcher: tantivy.Searcher):
        self._searcher = searcher

    def search(self, terms: Sequence[str], k: int, *, live: np.ndarray,
               rows: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The top k (row, score) by BM25 among rows that are `live` (and in `rows`, sorted, if given),
        best first; the k returned are ordered by row among equal scores, but which of a tie group crossing
        the k-th place make the cut is tantivy's choice (by its segments), so a smaller k need not be a
        prefix of a larger one there. Cutting by row would mean reading the whole tie group: on short,
        templated texts that doubled a query's time (bench/RESULTS.md). tantivy's top-k prunes with
        block-max WAND: documents that cannot enter the top k are skipped, not scored."""
        if not terms:
            return []
        text = tantivy.Query.boolean_query(
            [(tantivy.Occur.Should, tantivy.Query.term_query(SCHEMA, "text", term)) for term in terms])
        keep = live
        query = text
        if rows is not None:
            if len(rows) <= _TERM_SET_ROWS:
                # Scores stay the text's own: the restriction adds a constant 0.
                restrict = tantivy.Query.const_score_query(
                    tantivy.Query.term_set_query(SCHEMA, "row", rows.tolist()), 0.0)
                query = tantivy.Query.boolean_query([(tantivy.Occur.Must, text), (tantivy.Occur.Must, restrict)])
            else:
                keep = np.zeros(len(live), dtype=bool)
                keep[rows[rows < len(live)]] = True
                keep &= live
        # Rows outside `keep` (dead or filtered out, or newer than this generation after a crash
        # between the two commits) are skipped; read deeper until k remain or the ranking ends.
        limit = k if keep is live else k * max(1, min(64, int(live.sum()) // max(1, int(keep.sum()))))
        while True:
            hits = self._searcher.search(query, limit, count=False).hits
            found = self._searcher.fast_field_values("row", [address for _, address in hits])
            good = [(row, float(score)) for (score, _), row in zip(hits, found)
                    if row is not None and row < len(keep) and keep[row]]
            if len(good) >= k or len(hits) < limit:
                break
            limit *= 4
        good.sort(key=lambda hit: (-hit[1], hit[0]))
        return good[:k]

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Every document's (row, text hash), for `check`."""
        total = self._searcher.num_docs
        if total == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
        addresses = [address for _, address in self._searcher.search(tantivy.Query.all_query(), total,
                                                                      count=False).hits]
        rows = np.asarray(self._searcher.fast_field_values("row", addresses), dtype=np.int64)
        hashes = np.asarray(self._searcher.fast_field_values("text_hash", addresses), dtype=np.uint64)
        return rows, hashes
