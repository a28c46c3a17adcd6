"""Images renamed or moved within the corpus (a new id, the same bytes): a rerun of `embed` gives the new id a row
with the stored vectors, fine vectors and thumbnail (no decode, no forward pass), and records the old id deleted.
Copies of a new image within one run: the image is encoded once, each copy gets its row's vectors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.indexing import index_shards
from sidecar.ingest.shards import ShardSet
from sidecar.ingest.tagging import Tagger, TagSpec
from sidecar.model.prompts import PromptSetRegistry
from sidecar.model.synthetic import sample_items
from sidecar.stores.embedded import EmbeddedStore


@pytest.fixture
def encoded(encoder, monkeypatch) -> list[int]:
    """How many images each forward pass of `encoder` was given (the test's encoder is shared: restored after)."""
    sizes: list[int] = []
    forward = encoder.forward_images

    def counting(pixels):
        sizes.append(len(pixels))
        return forward(pixels)

    monkeypatch.setattr(encoder, "forward_images", counting)
    return sizes


def photos(folder: Path) -> Path:
    """top.jpg, and sub/one.jpg and sub/two.jpg, each a different picture."""
    (folder / "sub").mkdir(parents=True)
    images = [item.image for item in sample_items(4, seed=41)]
    images[0].save(folder / "top.jpg", quality=90)
    images[1].save(folder / "sub" / "one.jpg", quality=90)
    images[2].save(folder / "sub" / "two.jpg", quality=90)
    return folder


def stored(out: Path) -> dict[str, tuple[str, bytes, bytes | None, bytes | None]]:
    """id -> (image hash, vector bytes, fine vector bytes, thumbnail) of every live row (None: the shards keep none)."""
    shards = ShardSet(out)
    found = {}
    for doc_id, (name, row, index) in shards.live().items():
        fine, thumbnails = shards.fine_vectors(name), shards.thumbnails(name)
        found[doc_id] = (row.image_hash, shards.vectors(name)[index].tobytes(),
                       None if fine is None else fine[index].tobytes(), None if thumbnails is None else thumbnails[index])
    return found


def test_a_renamed_file_and_subfolder_get_their_stored_vectors_under_the_new_ids_without_a_forward_pass(
        encoder, encoded, tmp_path):
    folder = photos(tmp_path / "photos")
    out = tmp_path / "shards"
    # The tiny model stands in for the fine one: what is under test is that its vectors travel with the row.
    embed_corpus(encoder, folder, out, workers=0, fine_encoder=encoder, thumbnail_side=32, progress=False)
    before = stored(out)
    encoded.clear()

    (folder / "top.jpg").rename(folder / "renamed.jpg")
    (folder / "sub").rename(folder / "moved")
    rerun = embed_corpus(encoder, folder, out, workers=0, fine_encoder=encoder, thumbnail_side=32, progress=False)

    assert encoded == []  # no image went through the model
    assert (rerun.embedded, rerun.reused, rerun.unchanged, rerun.deleted) == (0, 3, 0, 3)
    assert "3 renamed, moved or copied (an image embedded under another id: vectors reused)" in rerun.describe()
    after = stored(out)
    assert sorted(after) == ["moved/one.jpg", "moved/two.jpg", "renamed.jpg"]
    assert sorted(ShardSet(out).deleted) == ["sub/one.jpg", "sub/two.jpg", "top.jpg"]
    # Byte for byte the old rows' vectors, fine vectors and thumbnails.
    assert after["renamed.jpg"] == before["top.jpg"]
    assert after["moved/one.jpg"] == before["sub/one.jpg"]
    assert after["moved/two.jpg"] == before["sub/two.jpg"]
    rows = {doc_id: row for doc_id, (_, row, _) in ShardSet(out).live().items()}
    assert (rows["renamed.jpg"].path, rows["renamed.jpg"].text) == (str(folder / "renamed.jpg"), "renamed")

    with EmbeddedStore(tmp_path / "store") as store:
        index_shards(store, out, progress=False)
        assert sorted(store.content_hashes()) == sorted(after)
        for doc in store.fetch(sorted(after)):
            assert doc.vector.tobytes() == after[doc.id][1]


def test_embedding_the_parent_folder_reuses_every_vector_under_the_longer_ids(encoder, encoded, tmp_path):
    folder = photos(tmp_path / "corpus" / "photos")
    out = tmp_path / "shards"
    embed_corpus(encoder, folder, out, workers=0, progress=False)
    before = stored(out)
    encoded.clear()

    rerun = embed_corpus(encoder, tmp_path / "corpus", out, workers=0, progress=False)

    assert encoded == [] and (rerun.embedded, rerun.reused, rerun.deleted) == (0, 3, 3)
    assert stored(out) == {f"photos/{doc_id}": row for doc_id, row in before.items()}


def test_a_file_under_a_new_name_with_changed_bytes_is_embedded(encoder, encoded, tmp_path):
    folder = photos(tmp_path / "photos")
    out = tmp_path / "shards"
    embed_corpus(encoder, folder, out, workers=0, progress=False)
    encoded.clear()

    (folder / "top.jpg").unlink()
    sample_items(4, seed=41)[3].image.save(folder / "renamed.jpg", quality=90)  # a picture no row holds
    rerun = embed_corpus(encoder, folder, out, workers=0, progress=False)

    assert sum(encoded) == 1 and (rerun.embedded, rerun.reused, rerun.unchanged, rerun.deleted) == (1, 0, 2, 1)


def test_a_stored_row_without_a_thumbnail_gives_a_renamed_file_no_vector_it_is_embedded_for_its_thumbnail(
        encoder, encoded, tmp_path):
    folder = photos(tmp_path / "photos")
    out = tmp_path / "shards"
    embed_corpus(encoder, folder, out, workers=0, thumbnail_side=0, progress=False)
    kept = (folder / "top.jpg").read_bytes()
    (folder / "top.jpg").unlink()
    # Thumbnails asked for while top.jpg is away: its row gets none (b""), the corpus holding no file to make it from.
    embed_corpus(encoder, folder, out, workers=0, thumbnail_side=32, progress=False)
    (folder / "back.jpg").write_bytes(kept)
    encoded.clear()

    rerun = embed_corpus(encoder, folder, out, workers=0, thumbnail_side=32, progress=False)

    assert sum(encoded) == 1 and (rerun.embedded, rerun.reused) == (1, 0)
    assert stored(out)["back.jpg"][3] != b""


def copies(folder: Path) -> Path:
    """photos() with two copies of top.jpg (one in sub/) and one of sub/one.jpg, each listed after its original."""
    photos(folder)
    shutil.copy(folder / "top.jpg", folder / "top2.jpg")
    shutil.copy(folder / "top.jpg", folder / "sub" / "top3.jpg")
    shutil.copy(folder / "sub" / "one.jpg", folder / "sub" / "one2.jpg")
    return folder


@pytest.mark.parametrize("workers", [0, 2])
def test_copies_of_new_images_in_one_run_get_the_first_copys_vectors_fine_vectors_and_thumbnail_without_a_forward_pass(
        encoder, encoded, tmp_path, workers):
    folder = copies(tmp_path / "photos")
    out = tmp_path / "shards"
    summary = embed_corpus(encoder, folder, out, workers=workers, fine_encoder=encoder, thumbnail_side=32,
                           progress=False)

    # Three images (top.jpg, one.jpg, two.jpg) through the model, and through the fine model (the same tiny model).
    assert sum(encoded) == 3 + 3
    assert (summary.total, summary.embedded, summary.reused, summary.failed) == (6, 3, 3, 0)
    assert "3 renamed, moved or copied (an image embedded under another id: vectors reused)" in summary.describe()
    after = stored(out)
    assert len(after) == 6 and after["top2.jpg"] == after["sub/top3.jpg"] == after["top.jpg"]
    assert after["sub/one2.jpg"] == after["sub/one.jpg"] != after["top.jpg"]
    assert after["top.jpg"][3]  # a thumbnail, shared
    rows = {doc_id: row for doc_id, (_, row, _) in ShardSet(out).live().items()}
    assert (rows["sub/top3.jpg"].path, rows["sub/top3.jpg"].text) == (str(folder / "sub" / "top3.jpg"), "top3")

    encoded.clear()
    rerun = embed_corpus(encoder, folder, out, workers=workers, fine_encoder=encoder, thumbnail_side=32,
                         progress=False)
    assert encoded == [] and (rerun.embedded, rerun.reused, rerun.unchanged) == (0, 0, 6)


def test_copies_get_the_tags_of_their_image(encoder, encoded, example_prompt_sets, tmp_path):
    folder = copies(tmp_path / "photos")
    out = tmp_path / "shards"
    tagger = Tagger.load([TagSpec("shapes", k=2)], PromptSetRegistry(example_prompt_sets), encoder)
    embed_corpus(encoder, folder, out, workers=0, tagger=tagger, progress=False)

    assert sum(encoded) == 3
    rows = {doc_id: row for doc_id, (_, row, _) in ShardSet(out).live().items()}
    assert rows["top2.jpg"].metadata["tag_shapes"] == rows["top.jpg"].metadata["tag_shapes"]
    assert rows["top2.jpg"].metadata["tag_shapes_score"] == rows["top.jpg"].metadata["tag_shapes_score"]
    assert len(rows["top2.jpg"].metadata["tag_shapes"]) == 2


def test_copies_of_a_file_that_cannot_be_decoded_fail_with_it_each_listed_in_errors_jsonl(encoder, encoded, tmp_path):
    folder = photos(tmp_path / "photos")
    (folder / "broken.jpg").write_bytes(b"not a JPEG")
    shutil.copy(folder / "broken.jpg", folder / "broken2.jpg")
    out = tmp_path / "shards"
    summary = embed_corpus(encoder, folder, out, workers=0, progress=False)

    assert sum(encoded) == 3 and (summary.embedded, summary.reused, summary.failed) == (3, 0, 2)
    errors = {entry["id"]: entry for entry in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == ["broken.jpg", "broken2.jpg"]
    assert errors["broken2.jpg"]["reason"] == f"a copy of 'broken.jpg', which could not be used: " \
                                              f"{errors['broken.jpg']['reason']}"
    assert errors["broken2.jpg"]["path"] == str(folder / "broken2.jpg")
    assert sorted(ShardSet(out).deleted) == ["broken.jpg", "broken2.jpg"] and len(stored(out)) == 3
