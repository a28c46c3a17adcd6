"""The OpenSearch store without a cluster: what its client raises when none can be reached, and the k-NN
query it builds."""

from __future__ import annotations

import pytest
from opensearchpy.exceptions import ConnectionError as OSConnectionError

from sidecar.stores.base import StoreUnavailable
from sidecar.stores.opensearch import RETRYABLE, OpenSearchStore
from tests.support import free_port


def test_an_unreachable_cluster_is_a_store_error_naming_the_setting_that_the_store_still_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = OpenSearchStore(url=url)
    with pytest.raises(StoreUnavailable) as raised:
        store.client.indices.exists(index="any")  # a call outside the store's own error handling
    assert str(raised.value).startswith(f"OpenSearch at {url} cannot be reached: ")
    assert "SIDECAR_OPENSEARCH_URL or --opensearch-url" in str(raised.value)
    # Still opensearch-py's ConnectionError: the bulk load's and _with_retry's retries catch that.
    assert isinstance(raised.value, OSConnectionError) and isinstance(raised.value, RETRYABLE)


@pytest.mark.parametrize("engine", ["lucene", "faiss"])
def test_each_engines_knn_query_carries_the_ef_search_asked_for_and_never_less_than_k(engine):
    # faiss on this test node's k-NN build cannot index (no native library: docs/opensearch.md), so the
    # query body is checked here; a faiss query without method_parameters ran at the index default.
    store = OpenSearchStore(url=f"http://127.0.0.1:{free_port()}", engine=engine, ef_search=150)
    try:
        assert store._knn_clause([0.0], 10, None, ef_search=321)["method_parameters"] == {"ef_search": 321}
        assert store._knn_clause([0.0], 10, None)["method_parameters"] == {"ef_search": 150}
        assert store._knn_clause([0.0], 400, None, ef_search=16)["method_parameters"] == {"ef_search": 400}
    finally:
        store.close()
