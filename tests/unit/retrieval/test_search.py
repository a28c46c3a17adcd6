"""Two-stage retrieval over the embedded store: the coarse stage's hybrid ranking."""

from __future__ import annotations

import pytest

from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import ModelSignature
from tests.support import assert_a_zero_weight_ranks_as_the_other_list, tied_captions

SIGNATURE = ModelSignature(model="synthetic", weights="ties", dim=32)


@pytest.mark.parametrize("fusion", ["minmax", "zscore", "rrf"])
def test_hybrid_with_one_list_weighted_zero_ranks_exactly_as_the_other_list_ties_included(tmp_path, fusion):
    docs, query = tied_captions(dim=SIGNATURE.dim)
    with EmbeddedStore(tmp_path / "store") as store:
        store.claim(SIGNATURE)
        store.upsert(docs)
        assert_a_zero_weight_ranks_as_the_other_list(store, query, depth=len(docs), fusion=fusion)
