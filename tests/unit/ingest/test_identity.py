"""Identity of an item: the image's bytes, and the document (image + text + metadata) the store holds."""

from __future__ import annotations

from sidecar.ingest.identity import document_hash, image_hash


def test_image_hash_follows_bytes_not_timestamps(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"one")
    first = image_hash(path)
    path.write_bytes(b"one")
    assert image_hash(path) == first
    path.write_bytes(b"two")
    assert image_hash(path) != first


def test_document_hash_changes_with_image_text_and_metadata_but_not_key_order():
    base = document_hash("img", "a red circle", {"color": "red", "size": "large"})
    assert document_hash("img", "a red circle", {"size": "large", "color": "red"}) == base
    assert document_hash("img2", "a red circle", {"color": "red", "size": "large"}) != base
    assert document_hash("img", "a red square", {"color": "red", "size": "large"}) != base
    assert document_hash("img", "a red circle", {"color": "blue", "size": "large"}) != base
    assert document_hash("img", "a red circle", {"color": "red", "size": "large", "brand": "x"}) != base
    # The parts cannot run into each other: text "ab" + image "" is not text "b" + image "a".
    assert document_hash("a", "b", {}) != document_hash("", "ab", {})
