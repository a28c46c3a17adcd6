"""Thumbnails through ingest: made by the embed pass, kept row for row in the shards, added to shards
written without them, indexed into the store and read back by id."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.indexing import index_shards
from sidecar.ingest.shards import ShardError, ShardSet
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import ModelSignature
from tests.support import shard_rows

SIG = ModelSignature(model="fast", weights="w", dim=2)


def test_shards_keep_one_thumbnail_per_row_and_refuse_another_size(tmp_path):
    shards = ShardSet(tmp_path)
    shards.start(SIG, preprocessing={}, thumbnail_side=64)
    shards.write_shard(np.ones((3, 2), dtype=np.float32), shard_rows(3), thumbnails=[b"jpeg-0", b"", b"jpeg-2"])
    reopened = ShardSet(tmp_path)
    assert reopened.thumbnail_side == 64
    docs = next(reopened.documents())
    assert [d.thumbnail for d in docs] == [b"jpeg-0", None, b"jpeg-2"]  # b"": that image made none
    # The store records the thumbnail size in each document's hash: adding thumbnails rewrites every document.
    assert docs[0].content_hash == "h0+thumbs:64"
    with pytest.raises(ShardError, match="one thumbnail per row"):
        reopened.write_shard(np.ones((2, 2), dtype=np.float32), shard_rows(2))
    with pytest.raises(ShardError, match="holds thumbnails of 64 px, not 128; pass --thumbnail-size 64"):
        ShardSet(tmp_path).start(SIG, preprocessing={}, thumbnail_side=128)


def test_a_shard_still_waiting_for_its_thumbnails_is_not_indexed_without_them(tmp_path):
    shards = ShardSet(tmp_path)
    shards.start(SIG, preprocessing={})
    shards.write_shard(np.ones((2, 2), dtype=np.float32), shard_rows(2))
    later = ShardSet(tmp_path)
    later.start(SIG, preprocessing={}, thumbnail_side=32)  # shards without thumbnails take a size
    assert later.shards_without_thumbnails() == ["shard-00000"]
    with pytest.raises(ShardError, match="has no thumbnails yet .* run `clip-sidecar embed` again"):
        next(later.documents())
    later.write_thumbnails("shard-00000", [b"a", b"b"])
    assert later.shards_without_thumbnails() == []
    assert [d.thumbnail for d in next(later.documents())] == [b"a", b"b"]


def mean_colour(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB")).reshape(-1, 3).mean(axis=0)


def test_embed_makes_each_images_thumbnail_and_index_serves_it_by_id(encoder, corpus, tmp_path):
    summary = embed_corpus(encoder, corpus, tmp_path / "shards", workers=2, thumbnail_side=48, progress=False)
    assert summary.failed == 0
    with EmbeddedStore(tmp_path / "store") as store:
        index_shards(store, tmp_path / "shards", progress=False)
        for line in corpus.read_text().splitlines()[:20]:
            item = json.loads(line)
            thumbnail = store.thumbnail(item["id"])
            with Image.open(io.BytesIO(thumbnail)) as image:
                assert image.format == "JPEG" and max(image.size) == 48  # the 64-px renders, shrunk
            with Image.open(corpus.parent / item["path"]) as source:
                expected = np.asarray(source.convert("RGB")).reshape(-1, 3).mean(axis=0)
            np.testing.assert_allclose(mean_colour(thumbnail), expected, atol=6)  # that item's own image
        assert store.fetch([item["id"]])[0].thumbnail is None  # fetch (the search path) leaves them out
        assert store.thumbnail("no-such-id") is None


def test_shards_written_without_thumbnails_get_them_without_a_forward_pass(encoder, corpus, tmp_path):
    out = tmp_path / "shards"
    embed_corpus(encoder, corpus, out, workers=0, thumbnail_side=0, progress=False)
    with EmbeddedStore(tmp_path / "store") as store:
        index_shards(store, out, progress=False)
        first = json.loads(corpus.read_text().splitlines()[0])["id"]
        assert store.thumbnail(first) is None
        rerun = embed_corpus(encoder, corpus, out, workers=2, thumbnail_side=40, progress=False)
        assert rerun.embedded == 0 and rerun.unchanged == rerun.total  # no image encoded again
        summary = index_shards(store, out, progress=False)
        assert summary.written == summary.total_in_store  # every document now has its thumbnail
        with Image.open(io.BytesIO(store.thumbnail(first))) as image:
            assert max(image.size) == 40


def test_a_thumbnail_added_later_comes_from_where_the_rows_image_is_now_not_from_its_old_path(encoder, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(corpus / "p1.jpg")
    Image.new("RGB", (80, 60), (30, 200, 30)).save(corpus / "p2.jpg")
    manifest = corpus / "m.jsonl"
    manifest.write_text('{"id": "a", "path": "p1.jpg"}\n{"id": "b", "path": "p2.jpg"}\n')
    out = tmp_path / "shards"
    embed_corpus(encoder, manifest, out, workers=0, thumbnail_side=0, progress=False)
    # a's file moves (same bytes: its row stays, and the rerun points it at the new path); p1.jpg now holds c's
    # picture.
    (corpus / "a_moved.jpg").write_bytes((corpus / "p1.jpg").read_bytes())
    Image.new("RGB", (80, 60), (30, 30, 200)).save(corpus / "p1.jpg")
    manifest.write_text('{"id": "a", "path": "a_moved.jpg"}\n{"id": "b", "path": "p2.jpg"}\n'
                        '{"id": "c", "path": "p1.jpg"}\n')
    embed_corpus(encoder, manifest, out, workers=0, thumbnail_side=32, progress=False)
    shards = ShardSet(out)
    live = shards.live()
    thumbnail = {doc: shards.thumbnails(live[doc][0])[live[doc][2]] for doc in "abc"}
    # a's row named p1.jpg, which holds c's picture now: a's thumbnail is its own, from its new file (as a fresh
    # embed of this corpus makes it), not c's, nor none; and its row names that file now.
    assert live["a"][1].path == str(corpus / "a_moved.jpg")
    np.testing.assert_allclose(mean_colour(thumbnail["a"]), (200, 30, 30), atol=6)
    np.testing.assert_allclose(mean_colour(thumbnail["b"]), (30, 200, 30), atol=6)
    np.testing.assert_allclose(mean_colour(thumbnail["c"]), (30, 30, 200), atol=6)


def test_a_caption_edit_keeps_the_rows_thumbnail(encoder, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (80, 60), (20, 200, 40)).save(folder / "leaf.jpg")
    (folder / "leaf.txt").write_text("a leaf")
    out = tmp_path / "shards"
    embed_corpus(encoder, folder, out, workers=0, thumbnail_side=32, progress=False)
    (folder / "leaf.txt").write_text("a green leaf")
    rerun = embed_corpus(encoder, folder, out, workers=0, thumbnail_side=32, progress=False)
    assert rerun.redescribed == 1
    docs = [d for batch in ShardSet(out).documents() for d in batch]
    assert [d.text for d in docs] == ["a green leaf"]
    np.testing.assert_allclose(mean_colour(docs[0].thumbnail), (20, 200, 40), atol=6)


def test_a_thumbnail_size_change_for_a_directory_with_thumbnails_is_refused(encoder, corpus, tmp_path):
    embed_corpus(encoder, corpus, tmp_path / "shards", workers=0, thumbnail_side=32, progress=False)
    with pytest.raises(ShardError, match="pass --thumbnail-size 32, or write to a new --out directory"):
        embed_corpus(encoder, corpus, tmp_path / "shards", workers=0, thumbnail_side=64, progress=False)
    assert Path(tmp_path / "shards" / "shard-00000.thumbs.npz").exists()


@pytest.mark.parametrize("away", ["vanished", "spoilt"])
def test_an_image_back_under_its_id_after_thumbnails_came_while_it_was_away_gets_a_thumbnail(encoder, tmp_path,
                                                                                              away):
    # Its row got b"" then (the corpus held no file of its image to make one from): kept as it was, the store
    # would serve the document without a thumbnail, where a fresh embed of the same corpus has one.
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(folder / "red.jpg")
    Image.new("RGB", (80, 60), (30, 200, 30)).save(folder / "green.jpg")
    out = tmp_path / "shards"
    embed_corpus(encoder, folder, out, workers=0, thumbnail_side=0, progress=False)
    kept = (folder / "red.jpg").read_bytes()
    if away == "vanished":
        (folder / "red.jpg").unlink()
    else:
        (folder / "red.jpg").write_bytes(b"not an image")
    embed_corpus(encoder, folder, out, workers=0, thumbnail_side=32, progress=False)
    assert "red.jpg" in ShardSet(out).deleted
    (folder / "red.jpg").write_bytes(kept)

    rerun = embed_corpus(encoder, folder, out, workers=0, thumbnail_side=32, progress=False)

    assert (rerun.embedded, rerun.unchanged) == (1, 1)
    docs = {d.id: d for batch in ShardSet(out).documents() for d in batch}
    np.testing.assert_allclose(mean_colour(docs["red.jpg"].thumbnail), (200, 30, 30), atol=6)
