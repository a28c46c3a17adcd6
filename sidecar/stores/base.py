"""The one interface both stores (embedded, OpenSearch) implement, and the errors they raise."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from sidecar.errors import UserFixable, quoted
from sidecar.stores.effort import EffortPolicy
from sidecar.types import Document, Filters, ModelSignature, ScoredId


class StoreError(RuntimeError, UserFixable):
    """A store cannot do what was asked (wrong model, unreachable cluster, bad state)."""


class StoreUnavailable(StoreError):
    """The store cannot answer right now (cluster down, connection refused, timeout; an OpenSearch store
    whose index `opensearch setup` has not created yet): the caller may retry later; the API answers 503
    with Retry-After."""


class StoreQueryError(StoreError):
    """The store refused a query as malformed for what it holds (a filter value of another type than
    the stored field: a word for a numeric field, say): the request must change, not the store; the
    API answers 400."""


class UnknownFilterField(StoreQueryError):
    """A filter names a metadata field that no stored document holds a value of: it can match nothing,
    and an empty answer would hide a misspelt name. The message names the fields the documents hold."""

    def __init__(self, unknown: Sequence[str], held: Sequence[str]):
        names = ", ".join(quoted(name) for name in unknown)  # a client's names: a 70,000-character one is not echoed
        listed = ", ".join(held[:NAMED_FIELDS]) + (f", … ({len(held)} in all)" if len(held) > NAMED_FIELDS else "")
        super().__init__(f"no stored document holds metadata field{'s' if len(unknown) > 1 else ''} {names}; "
                         + (f"the fields they hold: {listed}" if held else "they hold no metadata a filter matches"))
        self.unknown = list(unknown)
        self.held = list(held)


# How many held fields an UnknownFilterField lists: a store's fields, not a page of them.
NAMED_FIELDS = 30


class StoreLocked(StoreError):
    """Another load (an `index` run, a rebuild) holds the store's load lock; the message names its
    owner and since when, and how to break the lock if that owner is gone."""


class ModelMismatchError(StoreError):
    def __init__(self, store: ModelSignature, other: ModelSignature, *, fine: bool = False):
        vectors = "fine-model vectors" if fine else "vectors"
        super().__init__(
            f"store holds {vectors} of {store.describe()}, refusing {vectors} of {other.describe()}; "
            f"index into a new store (or rebuild) to switch {'fine ' if fine else ''}models"
        )
        self.store = store
        self.other = other


class QueryModelMismatch(StoreError):
    """The store holds vectors of another model than the one that encodes the queries: of another
    dimension they cannot be searched, of the same one they would rank by unrelated vectors. `serve`
    refuses to start; the API answers 409 model_mismatch. `query`: the queries' model, or only the
    query vector's dimension where the store is handed a vector without its model."""

    def __init__(self, store: ModelSignature | int, query: ModelSignature | int):
        held = f"vectors of {store.describe()}" if isinstance(store, ModelSignature) else f"{store}-d vectors"
        asked = (f"the queries are encoded by {query.describe()}" if isinstance(query, ModelSignature)
                 else f"the query vector has {query} dimensions")
        super().__init__(f"store holds {held}, {asked}: serve (or search with) the store's model (--model / "
                         "SIDECAR_MODEL, --pretrained / SIDECAR_PRETRAINED, and --model-config / SIDECAR_MODEL_CONFIG "
                         "for a custom architecture), or index into a new store with this one")
        self.store = store
        self.query = query


@dataclass
class StoreReport:
    """What `Store.check` found, or `Store.repair` did. `problems`: the store is not consistent
    (answers may be wrong or missing); `notes`: harmless findings (leftovers of an interrupted
    write, work the next load does); `actions`: what a repair changed."""

    location: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        lines = [f"{self.location}: " + ("consistent" if self.clean else f"{len(self.problems)} problem(s)")]
        lines += [f"  problem: {line}" for line in self.problems]
        lines += [f"  note: {line}" for line in self.notes]
        lines += [f"  repaired: {line}" for line in self.actions]
        return "\n".join(lines)


class StoreDamaged(StoreError):
    """The store's own record of its documents cannot be read (the embedded store's SQLite file unreadable, or
    gone from beside its vectors): it cannot be opened, and every command refuses it in one line, but `store
    check`, which reports `report` (the damage as its problem) and exits 1."""

    def __init__(self, location: str, problem: str):
        super().__init__(problem)
        self.report = StoreReport(location=location, problems=[problem])


@dataclass(frozen=True)
class FacetCounts:
    """One metadata field's values, each with how many documents hold it (a list field counts each
    element), most frequent first; `other`: how many more such counts lie beyond the values listed
    (0: the list is complete)."""

    values: tuple[tuple[Any, int], ...]
    other: int = 0

    @classmethod
    def ranked(cls, counts: Iterable[tuple[Any, int]]) -> FacetCounts:
        # Ties break by value ascending, numbers by value (9 before 10), as OpenSearch's terms aggregation
        # breaks them before it cuts at `size`: both stores then list, and cut, a field alike.
        return cls(values=tuple(sorted(counts, key=lambda item: (-item[1], *_value_order(item[0])))))

    def top(self, size: int) -> FacetCounts:
        return FacetCounts(values=self.values[:size], other=self.other + sum(n for _, n in self.values[size:]))


def _value_order(value: Any) -> tuple[int, float, str]:
    """A facet value's place among its count's ties: booleans (false first), numbers by value, then text."""
    if isinstance(value, (bool, int, float)):
        return (0 if isinstance(value, bool) else 1, float(value), "")
    return (2, 0.0, str(value))


class BulkLoad(Protocol):
    """A loading session (see `Store.bulk_load`)."""

    def expect(self, count: int) -> None:
        """How many documents the session will write or delete, once the caller knows (after
        comparing hashes inside the session); a store may prepare itself once for a large load."""


class Store(Protocol):
    """Vector (ANN + exact) and BM25 retrieval over one collection of Documents.

    Scores: `vector_search` returns inner product of normalised vectors (cosine, in [-1, 1]);
    `text_search` returns raw BM25 (higher is better). Fusion and rerank live in
    `sidecar.retrieval.search`, the same for every store.
    """

    name: str
    # The effort of vector queries that name no ef_search: the fixed ef_search, or the one a
    # calibration chose for the store's recall target (sidecar.stores.effort), saved with its data.
    effort: EffortPolicy

    def signature(self) -> ModelSignature | None:
        """The model whose vectors the store holds, or None while empty and unclaimed."""

    def fine_signature(self) -> ModelSignature | None:
        """The fine-ranking model whose vectors the documents hold beside the model's, or None where
        none is recorded: no fine vectors loaded yet, or loaded before the store recorded their model."""

    def claim(self, signature: ModelSignature, *, fine_signature: ModelSignature | None = None) -> None:
        """Record the model on first use, and the fine model (`fine_signature`, where the documents to
        load hold its vectors) where none is recorded; raise ModelMismatchError if another model, or
        another fine model, is recorded. None leaves the recorded fine model as it is."""

    def bulk_load(self, *, lock_wait_s: float = 0.0) -> AbstractContextManager[BulkLoad]:
        """A loading session around the writes of one `index` run; upserts and deletes outside one
        are sessions of their own. It makes a run of many upsert batches cost what one large load
        costs: the embedded store brings its HNSW graph up to date and saves it once, when the
        session ends (rows written before are searched exactly meanwhile); OpenSearch takes the
        alias's load lock (a rebuild or another `index` run holding it is waited for up to
        `lock_wait_s`, then StoreLocked), relaxes refresh and replicas once for a large load, and
        refreshes and restores at the end."""

    def upsert(self, documents: Sequence[Document], *, progress: Callable[[int], None] | None = None) -> int:
        """Insert or replace by id; returns how many were written. `progress` is called with counts of documents
        as they are written (OpenSearch: as each is acknowledged; they add up to the return value), so that a
        progress bar moves through a large batch instead of jumping at its end."""

    def delete(self, ids: Sequence[str]) -> int:
        """Remove by id; unknown ids are ignored; returns how many were removed."""

    def count(self) -> int: ...

    def content_hashes(self) -> dict[str, str]:
        """id -> content_hash for every stored document (drives incremental indexing)."""

    def vector_search(
        self, vector: np.ndarray, k: int, *, filters: Filters | None = None, exact: bool = False,
        ef_search: int | None = None,
    ) -> list[ScoredId]:
        """Top-k by inner product; exact=True is brute force (the ANN's ground truth); `ef_search`
        widens or narrows the HNSW search for this query (None: the store's setting)."""

    def searches_exactly(self, filters: Filters | None) -> bool:
        """Whether `vector_search` under `filters` is answered by exact search whatever its ef_search (the
        embedded store's: no graph built yet, or filters matching so few documents that exact search is the
        faster); False where the store does not know (OpenSearch's k-NN decides per segment, out of sight)."""

    def text_search(self, query: str, k: int, *, filters: Filters | None = None,
                    ids: Sequence[str] | None = None) -> list[ScoredId]:
        """Top-k by BM25 over Document.text; `ids` restricts the search to those documents without
        changing their scores (the lexical evidence for candidates another stage found)."""

    def supports_native_hybrid(self, *, fusion: str, weights: tuple[float, float], exact: bool) -> bool:
        """Whether `hybrid_search` can fuse vector and BM25 results in the store for these options;
        where not, `sidecar.retrieval.search` fuses the two lists in Python."""

    def hybrid_search(self, vector: np.ndarray, query: str, k: int, *, filters: Filters | None = None,
                      fusion: str = "minmax", weights: tuple[float, float] = (0.5, 0.5),
                      ef_search: int | None = None) -> list[ScoredId]:
        """Top-k fused in the store, on `sidecar.retrieval.fusion`'s scale (the vector side searched
        with `ef_search` as `vector_search` takes it); raises StoreError where `supports_native_hybrid`
        is False."""

    def rebuild(self, documents: Iterable[Document], *, signature: ModelSignature,
                fine_signature: ModelSignature | None = None, lock_wait_s: float = 0.0,
                before: Callable[[], None] | None = None, progress: Callable[[int], None] | None = None) -> str:
        """Load `documents` into a fresh index recording `signature` (and `fine_signature`, the fine
        model of their fine vectors) and swap it in whole (zero downtime), under the same
        load lock as `bulk_load`; returns its name (OpenSearch: the new index; embedded: the new version's
        directory). `before` is called once the lock is held, before anything is built: a check of what
        is stored that no load changes until the swap; what it raises refuses the rebuild, nothing changed.
        `progress` is called with counts of documents as they are written, as `upsert`'s is."""

    def fetch(self, ids: Sequence[str], *, vectors: bool = True) -> list[Document]:
        """Full documents (full-precision vectors included, and the fine model's where stored) in the
        order asked; unknown ids skipped. Thumbnails are left out (`thumbnail` reads one).
        `vectors=False` leaves the model's vectors out too (`Document.vector` is NO_VECTOR), for
        callers that read text, metadata or fine vectors only: on OpenSearch a vector is 512+
        numbers of JSON per document, most of an mget's time."""

    def filtered_ids(self, ids: Sequence[str], filters: Filters) -> list[str]:
        """Those of `ids` that `filters` let through, as a search under them matches (unknown ids left out); a
        StoreQueryError where the store refuses the filters, as its searches do (OpenSearch: a word for a field
        of numbers)."""

    def thumbnail(self, doc_id: str) -> bytes | None:
        """The stored thumbnail (JPEG bytes) of a document, or None for an unknown id or a document
        indexed without one."""

    def facets(self, *, size: int = 20) -> dict[str, FacetCounts]:
        """Value counts over every stored document for each top-level metadata field whose values (or
        list elements) are strings, numbers or booleans — the values `filters` match — the `size`
        most frequent per field."""

    def one_version(self) -> AbstractContextManager[None]:
        """Every call of this thread inside the block answers from the contents current at its first call, so
        that the several calls of one request (vector and BM25 search, fetch) never straddle a rebuild's
        switch (the embedded store pins its current version; OpenSearch's calls each read the alias)."""

    def check(self) -> StoreReport:
        """Read-only consistency check of what the store holds (`clip-sidecar store check`)."""

    def repair(self) -> StoreReport:
        """Rebuild what can be rebuilt from what the store committed (`clip-sidecar store repair`);
        says what it did and what it could not restore."""

    def close(self) -> None: ...


def check_query_model(store: Store, model: ModelSignature) -> None:
    """Raise QueryModelMismatch where the store records another model than `model`, the one that encodes
    its queries; an empty, unclaimed store takes any."""
    stored = store.signature()
    if stored is not None and stored != model:
        raise QueryModelMismatch(stored, model)


def check_filter_fields(store: Store, filters: Filters) -> None:
    """Raise UnknownFilterField where `filters` names a field that no stored document holds (a field
    `facets` does not count: no top-level value a filter matches). A search asks for an empty answer only: one
    that found anything matched every field, and facets cost a scan of the metadata (embedded, once per
    write) or an aggregation (OpenSearch) that a search which found hits need not pay. A caller
    that runs no search with the filters (feedback recording them) asks every time."""
    held = store.facets(size=1)
    unknown = [name for name in filters if name not in held]
    if unknown:
        raise UnknownFilterField(unknown, sorted(held))
