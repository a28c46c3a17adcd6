"""What the embed job records as deleted (the ids `index` removes), for a run that finishes and one killed
after its plan: a kill never brings an old document back and never withdraws an indexed one."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from sidecar.config import THUMBNAIL_SIDE
from sidecar.ingest.embed import embed_corpus, plan_embed
from sidecar.ingest.identity import image_hash
from sidecar.ingest.shards import ShardsBusy, ShardSet, exclusive_writer
from sidecar.ingest.tagging import retag_shards
from sidecar.model.synthetic import sample_items


def photos(tmp_path: Path, seed: int) -> tuple[Path, list]:
    """A folder with a.jpg and b.jpg, and a third image to put under b.jpg later."""
    folder = tmp_path / "photos"
    folder.mkdir()
    images = [item.image for item in sample_items(3, seed=seed)]
    images[0].save(folder / "a.jpg", quality=90)
    images[1].save(folder / "b.jpg", quality=90)
    return folder, images


def plan_only(encoder, folder: Path, out: Path) -> ShardSet:
    """The manifest a run killed right after its plan leaves behind."""
    plan_embed(encoder, folder, out, decode="cpu", fine_encoder=None, shard_size=64, workers=0, progress=False,
               stages=defaultdict(float), thumbnail_side=THUMBNAIL_SIDE)  # embed_corpus's default
    return ShardSet(out)


def test_a_deleted_id_stays_deleted_through_a_killed_run_until_its_new_file_has_a_row(encoder, tmp_path):
    folder, images = photos(tmp_path, seed=31)
    out = tmp_path / "shards"
    embed_corpus(encoder, folder, out, workers=0, progress=False)
    (folder / "b.jpg").unlink()
    embed_corpus(encoder, folder, out, workers=0, progress=False)
    images[2].save(folder / "b.jpg", quality=90)

    killed = plan_only(encoder, folder, out)
    assert "b.jpg" in killed.deleted and "b.jpg" not in killed.live()  # its old row is not served again

    embed_corpus(encoder, folder, out, workers=0, progress=False)
    finished = ShardSet(out)
    assert finished.deleted == []
    assert finished.live()["b.jpg"][1].image_hash == image_hash(folder / "b.jpg")


def test_an_unusable_file_withdraws_its_id_when_the_run_finishes_not_when_it_is_killed(encoder, tmp_path):
    folder, _ = photos(tmp_path, seed=32)
    out = tmp_path / "shards"
    embed_corpus(encoder, folder, out, workers=0, progress=False)
    (folder / "b.jpg").write_bytes(b"this is not a jpeg")

    assert "b.jpg" in plan_only(encoder, folder, out).live()  # a killed run withdraws nothing indexed

    summary = embed_corpus(encoder, folder, out, workers=0, progress=False)
    assert (summary.failed, summary.deleted) == (1, 0)  # failed, not counted as vanished
    assert ShardSet(out).deleted == ["b.jpg"]
    assert set(ShardSet(out).live()) == {"a.jpg"}


def test_the_summary_counts_an_id_deleted_in_the_run_that_found_it_gone_and_not_again_after(encoder, tmp_path):
    folder, _ = photos(tmp_path, seed=33)
    out = tmp_path / "shards"
    embed_corpus(encoder, folder, out, workers=0, progress=False)
    (folder / "b.jpg").unlink()
    assert embed_corpus(encoder, folder, out, workers=0, progress=False).deleted == 1
    rerun = embed_corpus(encoder, folder, out, workers=0, progress=False)
    assert rerun.deleted == 0 and "0 deleted since last run" in rerun.describe()
    assert ShardSet(out).deleted == ["b.jpg"]  # still recorded: index keeps it out


def test_embed_and_tag_are_refused_and_write_nothing_while_another_job_writes_the_folder(encoder, tmp_path):
    folder, _ = photos(tmp_path, seed=37)
    out = tmp_path / "shards"
    embed_corpus(encoder, folder, out, workers=0, progress=False)
    (folder / "a.jpg").unlink()
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir() if p.name != ".lock")
    with exclusive_writer(out):
        with pytest.raises(ShardsBusy, match=f"another job writes {out}"):
            embed_corpus(encoder, folder, out, workers=0, progress=False)
        with pytest.raises(ShardsBusy, match=f"another job writes {out}"):
            retag_shards(out, None, progress=False)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir() if p.name != ".lock") == before
