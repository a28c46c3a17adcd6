"""Retrieval stores: one interface, embedded (default) and OpenSearch."""

from __future__ import annotations

from sidecar.config import Settings
from sidecar.stores.base import Store


def open_store(settings: Settings, *, progress: bool = False) -> Store:
    """The store the settings name; imports only what that store needs. `progress`: a command's progress bars
    for the store's own long work (the embedded store's HNSW graph builds; OpenSearch builds its graphs itself)."""
    if settings.store == "embedded":
        from sidecar.stores.embedded import EmbeddedStore

        return EmbeddedStore(settings.store_path, target_recall=settings.target_recall,
                             target_k=settings.target_recall_k, progress=progress)
    from sidecar.stores.opensearch import OpenSearchStore

    return OpenSearchStore(url=settings.opensearch_url, index=settings.opensearch_index,
                           user=settings.opensearch_user or None, password=settings.opensearch_password or None,
                           verify_certs=settings.opensearch_verify_certs,
                           ca_certs=settings.opensearch_ca_certs or None, engine=settings.opensearch_engine,
                           number_of_shards=settings.opensearch_shards,
                           number_of_replicas=settings.opensearch_replicas,
                           config_dir=settings.plugin_config_dir or None, target_recall=settings.target_recall,
                           target_k=settings.target_recall_k)
