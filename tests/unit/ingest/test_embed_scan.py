"""The embed job's scan (image hashes, serial or across processes, named errors), its stager thread and its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.ingest import embed
from sidecar.ingest.corpus import CorpusError, CorpusItem
from sidecar.ingest.identity import image_hash


@pytest.fixture(params=["serial", "parallel"])
def workers(request, monkeypatch) -> int:
    if request.param == "parallel":
        monkeypatch.setattr(embed, "PARALLEL_SCAN_MIN", 1)
        return 2
    return 1


def write_manifest(folder, rows) -> object:
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return manifest


def test_scan_hashes_every_file_in_order(tmp_path, workers):
    for i in range(20):
        (tmp_path / f"{i}.jpg").write_bytes(bytes([i]) * (100 + i))
    manifest = write_manifest(tmp_path, [{"id": f"item-{i}", "path": f"{i}.jpg"} for i in range(20)])
    items, hashes = embed._scan(manifest, workers=workers, progress=False)
    assert [item.id for item in items] == [f"item-{i}" for i in range(20)]
    assert hashes == {f"item-{i}": image_hash(tmp_path / f"{i}.jpg") for i in range(20)}


def test_scan_names_the_item_whose_file_cannot_be_read(tmp_path, workers):
    (tmp_path / "a.jpg").write_bytes(b"a")
    manifest = write_manifest(tmp_path, [{"id": "a", "path": "a.jpg"}, {"id": "gone", "path": "missing.jpg"}])
    with pytest.raises(CorpusError, match=r"^item 'gone': cannot read .*missing\.jpg: No such file or directory\. "
                                          r"Make each readable \(or take it out of SOURCE\), then rerun"):
        embed._scan(manifest, workers=workers, progress=False)


def test_scan_refuses_once_counting_every_file_it_cannot_read_and_naming_the_first_few(tmp_path, workers):
    rows = [{"id": f"gone-{i}", "path": f"missing-{i}.jpg"} for i in range(embed.UNREADABLE_SHOWN + 2)]
    with pytest.raises(CorpusError) as refused:
        embed._scan(write_manifest(tmp_path, rows), workers=workers, progress=False)
    message = str(refused.value)
    assert message.startswith(f"{len(rows)} files cannot be read: item 'gone-0': cannot read ")
    assert [f"'gone-{i}'" in message for i in range(len(rows))] == [True] * embed.UNREADABLE_SHOWN + [False] * 2
    assert "; and 2 more. Make each readable" in message


def test_scan_refuses_duplicate_ids(tmp_path, workers):
    (tmp_path / "a.jpg").write_bytes(b"a")
    manifest = write_manifest(tmp_path, [{"id": "x", "path": "a.jpg"}, {"id": "x", "path": "a.jpg"}])
    with pytest.raises(CorpusError, match="duplicate id 'x'"):
        embed._scan(manifest, workers=workers, progress=False)


def test_background_stager_keeps_order_raises_its_errors_and_cleans_up():
    with embed._in_background(iter(range(50)), depth=2) as staged:
        assert list(staged) == list(range(50))

    def failing():
        yield 1
        raise CorpusError("bad manifest line 2")

    with pytest.raises(CorpusError, match="line 2"), embed._in_background(failing()) as staged:
        list(staged)

    cleaned = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.append(True)  # where the decode pool is terminated

    with pytest.raises(RuntimeError, match="model failed"), embed._in_background(endless()) as staged:
        assert next(staged) == 0
        raise RuntimeError("model failed")  # the consumer stops early: an error, Ctrl-C
    assert cleaned == [True]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1.0, float("-inf")]])
def test_metadata_nan_or_infinity_is_refused_naming_the_item_and_field(tmp_path, value):
    # The stores refuse NaN and Infinity: a row carrying them would make every `index` run fail.
    item = CorpusItem(id="a", path=tmp_path / "a.jpg", metadata={"color": "red", "x": value})
    with pytest.raises(CorpusError, match="item 'a': metadata field 'x' cannot be stored as JSON: Out of range float"):
        embed.document_row(item, "hash")


def test_shard_rows_name_each_image_by_its_absolute_path_whatever_folder_embed_ran_from(encoder, tmp_path,
                                                                                       monkeypatch):
    from sidecar.ingest.shards import ShardSet
    from sidecar.model.synthetic import sample_items

    (tmp_path / "photos").mkdir()
    for i, item in enumerate(sample_items(2, seed=5)):
        item.image.save(tmp_path / "photos" / f"{i}.jpg")
    monkeypatch.chdir(tmp_path)
    embed.embed_corpus(encoder, Path("photos"), Path("shards"), workers=0, progress=False)
    monkeypatch.chdir(tmp_path / "photos")  # where `hard-examples export` might run: the rows still find them
    paths = {doc_id: row.path for doc_id, (_, row, _) in ShardSet(tmp_path / "shards").live().items()}
    assert paths == {f"{i}.jpg": str(tmp_path / "photos" / f"{i}.jpg") for i in range(2)}


def test_a_rerun_after_the_corpus_and_shards_moved_points_the_rows_at_the_new_paths_without_embedding(encoder,
                                                                                                      tmp_path):
    import shutil

    from sidecar.ingest.shards import ShardSet
    from sidecar.model.synthetic import sample_items

    (tmp_path / "m1" / "photos").mkdir(parents=True)
    for i, item in enumerate(sample_items(3, seed=5)):
        item.image.save(tmp_path / "m1" / "photos" / f"{i}.jpg")
    embed.embed_corpus(encoder, tmp_path / "m1" / "photos", tmp_path / "m1" / "shards", workers=0, progress=False)
    shutil.move(tmp_path / "m1", tmp_path / "m2")  # another machine: images and shards copied under another root
    shutil.move(tmp_path / "m2" / "photos", tmp_path / "m2" / "pictures")
    vectors = (tmp_path / "m2" / "shards" / "shard-00000.npy").read_bytes()
    summary = embed.embed_corpus(encoder, tmp_path / "m2" / "pictures", tmp_path / "m2" / "shards", workers=0,
                                 progress=False)
    paths = {doc_id: row.path for doc_id, (_, row, _) in ShardSet(tmp_path / "m2" / "shards").live().items()}
    assert paths == {f"{i}.jpg": str(tmp_path / "m2" / "pictures" / f"{i}.jpg") for i in range(3)}
    assert (summary.embedded, summary.unchanged, summary.relocated, summary.shards_written) == (0, 3, 3, 0)
    assert "3 unchanged (3 at a new path: rows updated)" in summary.describe()
    assert (tmp_path / "m2" / "shards" / "shard-00000.npy").read_bytes() == vectors  # the vectors stay as they were


def test_a_rerun_over_an_older_versions_rows_naming_images_relative_to_its_folder_makes_them_absolute(encoder,
                                                                                                    tmp_path):
    from sidecar.ingest.shards import ShardSet
    from sidecar.model.synthetic import sample_items

    (tmp_path / "photos").mkdir()
    for i, item in enumerate(sample_items(2, seed=5)):
        item.image.save(tmp_path / "photos" / f"{i}.jpg")
    embed.embed_corpus(encoder, tmp_path / "photos", tmp_path / "shards", workers=0, progress=False)
    rows = tmp_path / "shards" / "shard-00000.jsonl"  # as versions before 0f622ce wrote them, from tmp_path
    rows.write_text(rows.read_text().replace(str(tmp_path) + "/", ""))
    assert '"path": "photos/0.jpg"' in rows.read_text()
    summary = embed.embed_corpus(encoder, tmp_path / "photos", tmp_path / "shards", workers=0, progress=False)
    paths = {doc_id: row.path for doc_id, (_, row, _) in ShardSet(tmp_path / "shards").live().items()}
    assert paths == {f"{i}.jpg": str(tmp_path / "photos" / f"{i}.jpg") for i in range(2)}
    assert (summary.embedded, summary.relocated, summary.shards_written) == (0, 2, 0)
