"""The default zero-setup store, in one folder: `store` (versions, the pointer, rebuilds, locks) over
`version` (one version's SQLite, BM25, vectors and HNSW graph) and `exact` (exact vector search)."""

from sidecar.stores.embedded.store import EmbeddedStore

__all__ = ["EmbeddedStore"]
