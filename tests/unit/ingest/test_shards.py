import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from sidecar.ingest.identity import document_hash
from sidecar.ingest.shards import (
    FORMAT_VERSION,
    ShardError,
    ShardRow,
    ShardsBusy,
    ShardSet,
    exclusive_writer,
    write_shard_files,
)
from sidecar.types import ModelSignature

SIG = ModelSignature(model="tiny-clip", weights="sha256:abc", dim=4)


def rows(*ids: str, digest: str = "h") -> list[ShardRow]:
    return [ShardRow(id=i, path=f"{i}.jpg", text=f"text {i}", metadata={"n": i}, content_hash=digest,
                     image_hash=f"image-{digest}") for i in ids]


def unit(n: int) -> np.ndarray:
    vectors = np.random.default_rng(n).normal(size=(n, 4)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_newest_row_wins_and_deleted_ids_are_left_out(tmp_path):
    shards = ShardSet(tmp_path)
    shards.start(SIG, preprocessing={})
    shards.write_shard(unit(3), rows("a", "b", "c", digest="v1"))
    shards.write_shard(unit(1), rows("b", digest="v2"))
    shards.set_deleted(["c"])
    reopened = ShardSet(tmp_path)
    assert reopened.signature == SIG
    documents = {d.id: d for batch in reopened.documents(batch_size=2) for d in batch}
    assert set(documents) == {"a", "b"}
    assert documents["b"].content_hash == "v2"
    np.testing.assert_allclose(np.linalg.norm(documents["a"].vector), 1.0, rtol=1e-6)


def test_a_run_killed_between_renames_and_manifest_keeps_complete_shards_only(tmp_path):
    shards = ShardSet(tmp_path)
    shards.start(SIG, preprocessing={})
    shards.write_shard(unit(2), rows("a", "b"))
    # Killed after both renames of shard 1 but before the manifest update…
    np.save(tmp_path / "shard-00001.npy", unit(1))
    row = {"id": "c", "path": "c.jpg", "text": "", "metadata": {}, "content_hash": "h"}
    (tmp_path / "shard-00001.jsonl").write_text(json.dumps(row) + "\n")
    # …and mid-write of shard 2: only a temporary file exists.
    (tmp_path / "shard-00002.npy.tmp").write_bytes(b"partial")
    (tmp_path / "shard-00003.npy").write_bytes(b"no rows file: incomplete")
    resumed = ShardSet(tmp_path)
    resumed.start(SIG, preprocessing={})
    assert resumed.shard_names() == ["shard-00000", "shard-00001"]
    assert not list(tmp_path.glob("*.tmp"))
    assert set(resumed.latest()) == {"a", "b", "c"}


def test_start_removes_the_files_of_shards_a_killed_ray_writer_renamed_before_their_rows(tmp_path, caplog):
    """A Ray writer task killed between its renames (Ctrl-C on the driver, a node lost) left the shard's .npy,
    .fine.npy and .thumbs.npz with no .jsonl, under its run's name, which no later run takes again: they stayed
    in the folder forever."""
    shards = ShardSet(tmp_path)
    shards.start(SIG, preprocessing={}, fine_signature=SIG, thumbnail_side=64)
    shards.write_shard(unit(1), rows("a"), unit(1), [b"jpeg a"])
    write_shard_files(tmp_path, "shard-00001-run1-done", unit(1), rows("b"), unit(1), [b"jpeg b"])  # not recorded
    # Killed before the last rename: every file of the shard in place but its rows, still under their temporary name.
    write_shard_files(tmp_path, "shard-00001-run1-cut", unit(2), rows("c", "d"), unit(2), [b"c", b"d"])
    os.replace(tmp_path / "shard-00001-run1-cut.jsonl", tmp_path / "shard-00001-run1-cut.jsonl.tmp")
    # Killed after the first rename: the thumbnails alone.
    write_shard_files(tmp_path, "shard-00001-run1-early", unit(1), rows("e"), unit(1), [b"e"])
    for suffix in (".npy", ".fine.npy", ".jsonl"):
        (tmp_path / f"shard-00001-run1-early{suffix}").unlink()
    caplog.set_level("INFO", logger="sidecar.ingest.shards")
    ShardSet(tmp_path).start(SIG, preprocessing={}, fine_signature=SIG, thumbnail_side=64)
    assert sorted(path.name for path in tmp_path.glob("shard-*")) == [
        f"{name}{suffix}" for name in ("shard-00000", "shard-00001-run1-done")
        for suffix in (".fine.npy", ".jsonl", ".npy", ".thumbs.npz")]
    assert caplog.messages == ["removed 4 file(s) of shards a killed run left incomplete (no .jsonl): "
                               "shard-00001-run1-cut.fine.npy, shard-00001-run1-cut.npy, "
                               "shard-00001-run1-cut.thumbs.npz, shard-00001-run1-early.thumbs.npz"]
    resumed = ShardSet(tmp_path)
    assert sorted(resumed.latest()) == ["a", "b"]
    assert resumed.thumbnails("shard-00001-run1-done") == [b"jpeg b"]
    # A later start finds nothing to remove and says nothing.
    caplog.clear()
    resumed.start(SIG, preprocessing={}, fine_signature=SIG, thumbnail_side=64)
    assert caplog.messages == []


def test_shards_other_writers_named_are_found_listed_once_and_a_rewrite_replaces_them(tmp_path):
    shards = ShardSet(tmp_path)
    shards.start(SIG, preprocessing={})
    shards.write_shard(unit(1), rows("a"))
    # Two workers of one run (the Ray engine), one of them retried: the same name written twice.
    write_shard_files(tmp_path, "shard-00001-run1-x", unit(2), rows("b", "c"))
    write_shard_files(tmp_path, "shard-00001-run1-y", unit(1), rows("d"))
    write_shard_files(tmp_path, "shard-00001-run1-x", unit(2), rows("b", "c", digest="again"))
    assert ShardSet(tmp_path).manifest["shards"] == ["shard-00000"]  # not listed until recorded…
    assert sorted(ShardSet(tmp_path).latest()) == ["a", "b", "c", "d"]  # …but found and used
    shards.record_shards()
    assert ShardSet(tmp_path).manifest["shards"] == ["shard-00000", "shard-00001-run1-x", "shard-00001-run1-y"]
    assert [row.id for _, row, _ in ShardSet(tmp_path).rows()] == ["a", "b", "c", "d"]
    assert ShardSet(tmp_path).latest()["b"][1].content_hash == "again"
    assert shards.write_shard(unit(1), rows("e")) == "shard-00003"


def test_a_directory_of_another_model_is_refused(tmp_path):
    ShardSet(tmp_path).start(SIG, preprocessing={})
    other = ModelSignature(model="ViT-B-32", weights="openai", dim=512)
    with pytest.raises(ShardError, match="holds shards of tiny-clip .* not ViT-B-32"):
        ShardSet(tmp_path).start(other, preprocessing={})


def test_vectors_and_rows_must_pair_up(tmp_path):
    shards = ShardSet(tmp_path)
    shards.start(SIG, preprocessing={})
    with pytest.raises(ShardError, match="2 vectors but 1 rows"):
        shards.write_shard(unit(2), rows("a"))


def test_format_1_rows_are_read_with_their_hash_as_the_image_hash(tmp_path):
    # Written before text and metadata counted: one hash, of the image bytes only.
    np.save(tmp_path / "shard-00000.npy", unit(1))
    old = {"id": "a", "path": "a.jpg", "text": "red circle", "metadata": {"color": "red"}, "content_hash": "bytes"}
    (tmp_path / "shard-00000.jsonl").write_text(json.dumps(old) + "\n")
    manifest = {"format_version": 1, "model": {"model": SIG.model, "weights": SIG.weights, "dim": SIG.dim},
                "shards": ["shard-00000"], "deleted": []}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (row,) = [row for _, row, _ in ShardSet(tmp_path).rows()]
    assert row.image_hash == "bytes"
    assert row.content_hash == document_hash("bytes", "red circle", {"color": "red"})
    resumed = ShardSet(tmp_path)
    resumed.start(SIG, preprocessing={})
    assert resumed.manifest["format_version"] == FORMAT_VERSION
    assert [d.content_hash for batch in resumed.documents() for d in batch] == [row.content_hash]


def test_a_directory_of_a_newer_format_is_refused_saying_to_upgrade(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ShardError, match=f"format {FORMAT_VERSION + 1}, written by a newer clip-sidecar.*"
                                         "upgrade clip-sidecar"):
        ShardSet(tmp_path)


@pytest.mark.parametrize(("manifest", "message"), [
    ('{"format_version": 2, "model": ', "cannot be read"),
    (b"\xff\xfe", "cannot be read"),
    ('{"format_version": "2"}', "format_version '2' is no shard format"),
    ('{"format_version": null}', "format_version None is no shard format"),
    ('{"format_version": 0}', "format_version 0 is no shard format"),
    ("[2]", "format_version None is no shard format"),
])
def test_a_damaged_manifest_or_format_version_is_refused_naming_the_manifest(tmp_path, manifest, message):
    path = tmp_path / "manifest.json"
    path.write_bytes(manifest if isinstance(manifest, bytes) else manifest.encode())
    with pytest.raises(ShardError, match=f"^{path}:? .*{message}"):
        ShardSet(tmp_path)


def test_a_second_writer_is_refused_at_once_naming_the_folder_and_the_holder(tmp_path):
    with exclusive_writer(tmp_path):
        # a second open file description conflicts with the first, in this process as in another
        with pytest.raises(ShardsBusy, match=f"another job writes {tmp_path}: pid {os.getpid()} "):
            with exclusive_writer(tmp_path):
                pass
    with exclusive_writer(tmp_path):  # released when the first job ended
        pass


def test_a_killed_holder_leaves_the_folder_free_at_once_while_its_forked_children_live_on(tmp_path):
    # As a killed embed's decode workers do, for up to a few images: they were forked while it held the lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import multiprocessing, time; from sidecar.ingest.shards import exclusive_writer\n"
         "def work(started):\n    started.set(); time.sleep(600)\n"  # set once the child's fork hooks ran
         f"with exclusive_writer({str(tmp_path)!r}):\n"
         "    context = multiprocessing.get_context('fork'); started = context.Event()\n"
         "    child = context.Process(target=work, args=(started,)); child.start(); started.wait(60)\n"
         "    print(child.pid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(holder.stdout.readline())
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # still alive
        with exclusive_writer(tmp_path):
            pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.stdout.close()


def test_a_killed_holder_leaves_the_folder_free_for_a_rerun_at_once(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sidecar.ingest.shards import exclusive_writer\n"
         f"with exclusive_writer({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ShardsBusy, match=f"pid {holder.pid} "):
            with exclusive_writer(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    with exclusive_writer(tmp_path):
        pass


def test_rewritten_rows_carry_their_stored_vectors_and_thumbnails_reading_each_shard_once(tmp_path):
    # A shard's thumbnails are one file: read per row, rewriting a shard of 4096 rows took minutes.
    class CountingReads(ShardSet):
        def __init__(self, root):
            super().__init__(root)
            self.reads: dict[str, int] = {}

        def thumbnails(self, name):
            self.reads[name] = self.reads.get(name, 0) + 1
            return super().thumbnails(name)

    shards = CountingReads(tmp_path)
    shards.start(SIG, preprocessing={}, thumbnail_side=16)
    first = shards.write_shard(unit(30), rows(*(f"a{i}" for i in range(30))), thumbnails=[b"a%d" % i for i in range(30)])
    second = shards.write_shard(unit(20), rows(*(f"b{i}" for i in range(20))),
                                thumbnails=[b"b%d" % i for i in range(20)])
    # Interleaved, as a rerun finds them: every row of both shards under a new id.
    entries = [(row, name, index) for index in range(30) for name, count in ((first, 30), (second, 20))
               if index < count for row in [rows(f"new-{name}-{index}")[0]]]
    shards.rewrite_rows(entries, shard_size=1000)
    assert shards.reads == {first: 1, second: 1}
    new = {row.id: (name, index) for name, row, index in shards.rows() if row.id.startswith("new-")}
    assert len(new) == 50
    for _, name, index in entries:
        at, row_index = new[f"new-{name}-{index}"]
        assert shards.vectors(at)[row_index].tobytes() == shards.vectors(name)[index].tobytes()
        assert shards.thumbnails(at)[row_index] == shards.thumbnails(name)[index]


# Linux's /dev/full takes every write with ENOSPC, as a full disk does: write(), flush() and close() name no file.
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@needs_dev_full
@pytest.mark.parametrize("tmp_name", ["shard-00000.npy.tmp", "shard-00000.fine.npy.tmp",
                                      "shard-00000.thumbs.npz.tmp", "shard-00000.jsonl.tmp"])
def test_a_shard_file_a_full_disk_cannot_take_is_named_in_the_error(tmp_path, tmp_name):
    (tmp_path / tmp_name).symlink_to("/dev/full")
    with pytest.raises(OSError) as caught:
        write_shard_files(tmp_path, "shard-00000", unit(2), rows("a", "b"), unit(2), [b"t1", b"t2"])
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / tmp_name)


@needs_dev_full
def test_a_manifest_a_full_disk_cannot_take_is_named_in_the_error(tmp_path):
    shards = ShardSet(tmp_path)
    shards.start(SIG, preprocessing={})
    (tmp_path / "manifest.json.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError) as caught:
        shards.set_deleted(["a"])
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "manifest.json.tmp")
