"""Fine-model vectors through ingest: computed in the embed pass, kept in shards, indexed beside each document."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sidecar.ingest.decode_pool import READ_FAILED
from sidecar.ingest.embed import embed_corpus, fine_vectors
from sidecar.ingest.indexing import index_shards
from sidecar.ingest.shards import ShardError, ShardSet
from sidecar.stores.base import ModelMismatchError
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import ModelSignature
from tests.support import shard_rows

FAST = ModelSignature(model="fast", weights="w", dim=2)
FINE = ModelSignature(model="fine", weights="w", dim=3)


def test_shards_keep_fine_vectors_row_for_row_and_refuse_a_mismatch(tmp_path):
    shards = ShardSet(tmp_path)
    shards.start(FAST, preprocessing={}, fine_signature=FINE)
    fine = np.arange(6, dtype=np.float32).reshape(2, 3)
    shards.write_shard(np.ones((2, 2), dtype=np.float32), shard_rows(2), fine)
    reopened = ShardSet(tmp_path)
    assert reopened.fine_signature == FINE
    docs = next(reopened.documents())
    assert [d.fine_vector.tolist() for d in docs] == fine.tolist()
    # The store records the fine model in each document's hash: adding one rewrites every document.
    assert docs[0].content_hash.startswith("h0+fine:")
    with pytest.raises(ShardError, match="one fine vector per row"):
        reopened.write_shard(np.ones((2, 2), dtype=np.float32), shard_rows(2))
    with pytest.raises(ShardError, match="holds shards with fine .* not no fine model"):
        ShardSet(tmp_path).start(FAST, preprocessing={})


def fine_shards(out, fine: ModelSignature, *, n: int = 2) -> None:
    shards = ShardSet(out)
    shards.start(FAST, preprocessing={}, fine_signature=fine)
    shards.write_shard(np.ones((n, 2), dtype=np.float32), shard_rows(n), np.ones((n, fine.dim), dtype=np.float32))


def test_index_records_the_shards_fine_model_and_refuses_shards_of_another_one_of_the_same_size(tmp_path):
    other = ModelSignature(model="other fine", weights="w", dim=FINE.dim)
    fine_shards(tmp_path / "fine", FINE)
    fine_shards(tmp_path / "other", other, n=3)
    with EmbeddedStore(tmp_path / "store") as store:
        index_shards(store, tmp_path / "fine", progress=False)
        assert store.fine_signature() == FINE
        with pytest.raises(ModelMismatchError, match="fine-model vectors of fine .*refusing fine-model vectors of "
                                                     "other fine"):
            index_shards(store, tmp_path / "other", progress=False)
        assert store.count() == 2 and store.fine_signature() == FINE


def test_a_store_indexed_before_fine_models_were_recorded_records_the_next_index_runs(tmp_path):
    fine_shards(tmp_path / "fine", FINE)
    with EmbeddedStore(tmp_path / "store") as store:
        store.claim(FAST)  # what index did before: fine vectors stored, their model not recorded
        store.upsert(next(ShardSet(tmp_path / "fine").documents()))
        assert store.fine_signature() is None
        summary = index_shards(store, tmp_path / "fine", progress=False)
        assert summary.unchanged == 2 and store.fine_signature() == FINE


def test_embed_with_a_fine_model_stores_its_vectors_and_index_puts_them_beside_each_document(encoder, corpus,
                                                                                              tmp_path):
    # The tiny model stands in for the fine one: the plumbing is what is under test, so its fine
    # vectors must equal its own vectors.
    summary = embed_corpus(encoder, corpus, tmp_path / "shards", workers=0, fine_encoder=encoder, progress=False)
    assert summary.failed == 0
    with EmbeddedStore(tmp_path / "store") as store:
        index_shards(store, tmp_path / "shards", progress=False)
        docs = store.fetch(sorted(store.content_hashes())[:20])
        assert all(doc.fine_vector is not None for doc in docs)
        for doc in docs:
            np.testing.assert_allclose(doc.fine_vector, doc.vector, atol=1e-5)
        # Indexed without a fine model: no fine vectors, and the rerank has nothing to read.
    embed_corpus(encoder, corpus, tmp_path / "plain", workers=0, progress=False)
    with EmbeddedStore(tmp_path / "store") as store:
        summary = index_shards(store, tmp_path / "plain", progress=False)
        assert summary.written == summary.total_in_store  # the hash changed: every document rewritten
        assert all(doc.fine_vector is None for doc in store.fetch(sorted(store.content_hashes())[:5]))


def test_an_image_only_the_fine_model_refuses_is_a_failed_item_and_the_rest_of_the_batch_is_embedded(
        encoder, fine_encoder, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (64, 48), colour).save(folder / f"img{index}.jpg")
    # 200:1: the model's resize keeps it within the side limit, the fine model's larger input size does not.
    Image.new("RGB", (2000, 10), (200, 30, 30)).save(folder / "wide.png")
    for _ in range(2):  # a rerun neither dies on it nor embeds it
        summary = embed_corpus(encoder, folder, tmp_path / "out", workers=0, fine_encoder=fine_encoder,
                               progress=False)
        assert summary.failed == 1
        errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
        assert [e["id"] for e in errors] == ["wide.png"]
        assert errors[0]["reason"].startswith("fine model: image is 2000x10")
    shards = ShardSet(tmp_path / "out")
    assert shards.deleted == ["wide.png"]
    assert sorted(shards.live()) == ["img0.jpg", "img1.jpg", "img2.jpg"]


def test_a_file_gone_before_the_fine_model_reads_it_again_is_a_failed_item_with_the_read_failure_not_an_error(
        encoder, tmp_path):
    kept, gone = tmp_path / "kept.png", tmp_path / "gone.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(kept)
    vectors, reasons = fine_vectors(encoder, [gone, kept], max_pixels=10**7)
    assert reasons[0].startswith(f"{READ_FAILED}: ") and "No such file" in reasons[0] and reasons[1] is None
    assert not vectors[0].any() and np.allclose(vectors[1], fine_vectors(encoder, [kept], max_pixels=10**7)[0][0])
