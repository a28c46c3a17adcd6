"""`tag` after a killed job: the fields a tagging began writing are known as tagging's (the manifest records the
sets before any row is written), so the rerun replaces them and refuses only a field the corpus gave. What an older
version's killed run left unrecorded cannot be told from a corpus field: refused too, until `embed` reruns."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from sidecar.config import THUMBNAIL_SIDE
from sidecar.ingest.corpus import CorpusError
from sidecar.ingest.embed import embed_corpus, plan_embed
from sidecar.ingest.shards import ShardSet
from sidecar.ingest.tagging import Tagger, TagSpec, retag_shards, tagged
from sidecar.model.prompts import PromptSetRegistry
from sidecar.model.synthetic import write_corpus


@pytest.fixture
def untagged(encoder, tmp_path) -> Path:
    out = tmp_path / "shards"
    embed_corpus(encoder, write_corpus(tmp_path / "corpus", 6, seed=35), out, workers=0, progress=False)
    return out


def tagger_of(encoder, prompt_sets: Path, *, k: int = 1, name: str = "shapes") -> Tagger:
    return Tagger.load([TagSpec(name, k=k)], PromptSetRegistry(prompt_sets), encoder)


def tag_counts(out: Path) -> list[int]:
    return sorted(len(row.metadata.get("tag_shapes", [])) for _, row, _ in ShardSet(out).live().values())


def test_tag_after_an_embed_killed_once_its_plan_wrote_tagged_rows_replaces_those_tags(
        encoder, example_prompt_sets, untagged, tmp_path):
    # Killed right after its plan: every known image's row is rewritten with tags, the tagging not yet recorded.
    ids = set(ShardSet(untagged).live())
    plan_embed(encoder, tmp_path / "corpus" / "manifest.jsonl", untagged, decode="cpu", fine_encoder=None, shard_size=64, workers=0,
               progress=False, stages=defaultdict(float), thumbnail_side=THUMBNAIL_SIDE,
               tagger=tagger_of(encoder, example_prompt_sets))
    assert set(ShardSet(untagged).live()) == ids  # the same documents' rows, rewritten
    assert ShardSet(untagged).tagging == [] and tag_counts(untagged) == [1] * 6

    retag_shards(untagged, tagger_of(encoder, example_prompt_sets, k=2), progress=False)
    assert tag_counts(untagged) == [2] * 6
    assert ShardSet(untagged).tagging_begun == []


def test_tag_rerun_after_a_tag_killed_before_recording_its_tagging_replaces_its_tags_and_clear_removes_them(
        encoder, example_prompt_sets, untagged, monkeypatch):
    def killed(self, record):
        raise KeyboardInterrupt  # rows written, the tagging not recorded: a kill cannot be timed for real

    with monkeypatch.context() as patched:
        patched.setattr(ShardSet, "set_tagging", killed)
        with pytest.raises(KeyboardInterrupt):
            retag_shards(untagged, tagger_of(encoder, example_prompt_sets), progress=False)
    assert ShardSet(untagged).tagging == [] and tag_counts(untagged) == [1] * 6

    retag_shards(untagged, tagger_of(encoder, example_prompt_sets, k=2), progress=False)
    assert tag_counts(untagged) == [2] * 6
    # Killed while replacing shapes with colors: --clear removes both, the set not recorded too.
    with monkeypatch.context() as patched:
        patched.setattr(ShardSet, "set_tagging", killed)
        with pytest.raises(KeyboardInterrupt):
            retag_shards(untagged, tagger_of(encoder, example_prompt_sets, name="colors"), progress=False)
    assert all("tag_colors" in row.metadata for _, row, _ in ShardSet(untagged).live().values())
    retag_shards(untagged, None, progress=False)
    assert not any(key.startswith("tag_") for _, row, _ in ShardSet(untagged).live().values() for key in row.metadata)


def test_tag_in_a_folder_an_older_versions_killed_tag_left_is_refused_until_an_embed_rerun_which_keeps_every_vector(
        encoder, example_prompt_sets, untagged, tmp_path):
    # What `tag` before `tagging_begun` left when killed while writing its rows: some rows rewritten with the
    # set's labels and scores, the manifest naming neither the tagging nor a tagging begun. A corpus may hold such
    # lists too (the e2e test of the refusal): replacing them would lose the user's data.
    shards = ShardSet(untagged)
    entries = list(shards.live().values())
    vectors_before = {row.id: shards.vectors(name)[index].copy() for name, row, index in entries}
    tags = tagger_of(encoder, example_prompt_sets).stored_tags(shards, entries)
    shards.rewrite_rows([(tagged(row, tags[row.id]), name, index) for name, row, index in entries[:3]], shard_size=64)
    assert "tagging_begun" not in ShardSet(untagged).manifest and tag_counts(untagged) == [0, 0, 0, 1, 1, 1]
    names = ShardSet(untagged).shard_names()

    with pytest.raises(CorpusError, match="which tagging with prompt set 'shapes' writes; rename it in the corpus "
                                          "and rerun `clip-sidecar embed`"):
        retag_shards(untagged, tagger_of(encoder, example_prompt_sets, k=2), progress=False)
    assert ShardSet(untagged).shard_names() == names and tag_counts(untagged) == [0, 0, 0, 1, 1, 1]

    # The way on the error names: the rerun rebuilds the rows' metadata from the corpus, from the stored vectors.
    summary = embed_corpus(encoder, tmp_path / "corpus" / "manifest.jsonl", untagged, workers=0, progress=False)
    assert summary.embedded == 0 and tag_counts(untagged) == [0] * 6
    retag_shards(untagged, tagger_of(encoder, example_prompt_sets, k=2), progress=False)
    after = ShardSet(untagged)
    assert tag_counts(untagged) == [2] * 6 and [record["set"] for record in after.tagging] == ["shapes"]
    live = after.live().values()
    assert {row.id: after.vectors(name)[index].tolist() for name, row, index in live} == {
        doc_id: vector.tolist() for doc_id, vector in vectors_before.items()}
