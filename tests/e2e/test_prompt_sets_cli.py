"""The real CLI with the trained tiny model: `prompts add|list|show|remove`, tags written at embed time and
filtered on in the embedded store, re-tagging from stored vectors (the images gone), `eval --prompts`."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.ingest.shards import ShardRow, ShardSet
from sidecar.model.synthetic import write_corpus
from sidecar.stores.embedded import EmbeddedStore
from tests.conftest import EXAMPLE_PROMPT_SETS
from tests.support import cli_ok


@pytest.fixture
def sets(tmp_path) -> Path:
    """A prompt-set folder of this test's own, holding the three examples."""
    folder = tmp_path / "prompt-sets"
    cli_ok("prompts", "add", *sorted(EXAMPLE_PROMPT_SETS.iterdir()), "--prompt-sets", folder)
    return folder


def live_rows(out: Path) -> dict[str, dict]:
    return {doc_id: row.metadata for doc_id, (_, row, _) in ShardSet(out).live().items()}


def test_prompts_add_list_show_and_remove(tmp_path):
    folder = tmp_path / "prompt-sets"
    added = cli_ok("prompts", "add", *sorted(EXAMPLE_PROMPT_SETS.iterdir()), "--prompt-sets", folder)
    assert "colors: version 1, 8 labels, 16 prompts; added, vectors by tiny-clip computed in" in added
    assert "shapes: version 1, 5 labels, 15 prompts; added, vectors by tiny-clip computed in" in added
    listed = cli_ok("prompts", "list", "--prompt-sets", folder).splitlines()
    assert [line.split()[:4] for line in listed[1:]] == [["colors", "1", "8", "16"], ["descriptions", "1", "10", "10"],
                                                         ["shapes", "1", "5", "15"]]
    assert all("tiny-clip (sha256:" in line for line in listed[1:])
    fingerprint = listed[3].split()[4]
    shown = cli_ok("prompts", "show", "shapes", "--prompt-sets", folder)
    assert "shapes, version 1: 5 labels, 15 prompts" in shown and "templates: a {} | a photo of a {} | an image of a {}" \
        in shown
    assert json.loads(cli_ok("prompts", "show", "shapes", "--json", "--prompt-sets", folder))["labels"][0] == "circle"

    # Added again unchanged: nothing is embedded. A changed template: that set alone is embedded again.
    again = cli_ok("prompts", "add", EXAMPLE_PROMPT_SETS / "shapes.yaml", "--prompt-sets", folder)
    assert "shapes: version 1, 5 labels, 15 prompts; unchanged, vectors by tiny-clip already cached" in again
    colors_vectors = next((folder / "vectors" / "colors").iterdir())
    written = colors_vectors.stat().st_mtime_ns
    edited = yaml.safe_load((EXAMPLE_PROMPT_SETS / "shapes.yaml").read_text())
    edited["templates"] = ["a drawing of a {}"]
    (tmp_path / "shapes.yaml").write_text(yaml.safe_dump(edited))
    changed = cli_ok("prompts", "add", tmp_path / "shapes.yaml", EXAMPLE_PROMPT_SETS / "colors.csv",
                     "--prompt-sets", folder)
    assert ("shapes: version 1, 5 labels, 5 prompts; replaced version 1 (5 labels with other prompts; the same "
            f"version, so only the fingerprint ({fingerprint} before) tells them apart), vectors by tiny-clip computed "
            "in") in changed
    assert "colors: version 1, 8 labels, 16 prompts; unchanged, vectors by tiny-clip already cached" in changed
    assert colors_vectors.stat().st_mtime_ns == written
    # Its version is still 1: the fingerprint tells the changed prompts apart.
    relisted = cli_ok("prompts", "list", "--prompt-sets", folder).splitlines()[3].split()
    assert relisted[:2] == ["shapes", "1"] and relisted[4].startswith("sha256:") and relisted[4] != fingerprint

    assert "removed prompt set shapes" in cli_ok("prompts", "remove", "shapes", "--prompt-sets", folder)
    missing = CliRunner().invoke(main, ["-q", "prompts", "show", "shapes", "--prompt-sets", str(folder)])
    assert missing.exit_code == 1 and "no prompt set named 'shapes'" in missing.output and "colors" in missing.output
    bad = CliRunner().invoke(main, ["-q", "prompts", "add", str(EXAMPLE_PROMPT_SETS / "colors.csv"), "--name", "Bad!",
                                    "--prompt-sets", str(folder)])
    assert bad.exit_code == 1 and "the set's name must be 1-64 characters" in bad.output


def test_prompts_add_says_what_a_replaced_set_changed_and_refuses_two_files_of_one_set(tmp_path):
    folder = tmp_path / "prompt-sets"
    first = tmp_path / "pets.yaml"
    first.write_text("name: pets\nversion: 1\ntemplates: ['a {}']\nlabels: [cat, dog, fish]\n")
    assert "pets: version 1, 3 labels, 3 prompts; added," in cli_ok("prompts", "add", first, "--prompt-sets", folder)
    second = tmp_path / "pets-2.yaml"
    second.write_text("name: pets\nversion: 2\ntemplates: ['a {}']\nlabels: [cat, {name: dog, templates: "
                      "['a {} barking']}, bird, frog]\n")
    replaced = cli_ok("prompts", "add", second, "--prompt-sets", folder)
    assert ("pets: version 2, 4 labels, 4 prompts; replaced version 1 (2 labels added; 1 label removed; 1 label "
            "with other prompts), vectors by tiny-clip computed in") in replaced

    # Both files hold set "pets": the second would replace the first, and both were reported stored.
    both = CliRunner().invoke(main, ["-q", "prompts", "add", str(first), str(second), "--prompt-sets", str(folder)])
    assert both.exit_code == 2 and f"{first} and {second} both hold prompt set 'pets'" in both.output
    assert cli_ok("prompts", "show", "pets", "--prompt-sets", folder).startswith("pets, version 2:")


# 30 words: the tiny model's 32-token context ends before the label's place.
LONG_PREFIX = ("a photograph taken on a sunny day in the park near the old fountain with many people walking around "
               "and children playing with a ball while dogs run after pigeons, showing")


def test_prompts_add_refuses_labels_the_model_reads_as_the_same_prompts_and_names_a_cut_label(tmp_path):
    folder = tmp_path / "prompt-sets"
    twins = tmp_path / "long.yaml"
    twins.write_text(yaml.safe_dump({"name": "long", "templates": [LONG_PREFIX + " a {}"],
                                     "labels": ["circle", "square"]}))
    refused = CliRunner().invoke(main, ["-q", "prompts", "add", str(twins), "--prompt-sets", str(folder)])
    assert refused.exit_code == 1, refused.output
    assert (f"{twins}: labels 'circle' and 'square' have the same prompts once tiny-clip cuts them at its 32-token "
            "context") in refused.output
    assert not (folder / "long.json").exists()
    # Labels told apart only by case or spacing: open_clip's tokenizer lowercases and collapses spaces.
    for labels in (["Apple", "apple"], ["apple pie", "apple  pie"]):
        alike = tmp_path / "alike.yaml"
        alike.write_text(yaml.safe_dump({"name": "alike", "labels": labels}))
        refused = CliRunner().invoke(main, ["-q", "prompts", "add", str(alike), "--prompt-sets", str(folder)])
        assert refused.exit_code == 1, refused.output
        assert (f"{alike}: labels {labels[0]!r} and {labels[1]!r} have the same prompts as tiny-clip's tokenizer "
                "reads them") in refused.output
    # One label cut, still told apart from the other: stored, and the cut said.
    cut = tmp_path / "cut.yaml"
    cut.write_text(yaml.safe_dump({"name": "cut", "labels": ["circle", LONG_PREFIX + " a square"]}))
    added = cli_ok("prompts", "add", cut, "--prompt-sets", folder)
    assert "cut: version 1, 2 labels, 2 prompts; added," in added
    assert "1 label with a prompt cut at tiny-clip's 32-token context (e.g. 'a photograph taken" in added
    assert "cut at" not in cli_ok("prompts", "add", EXAMPLE_PROMPT_SETS / "shapes.yaml", "--prompt-sets", folder)


def test_tags_written_at_embed_time_are_filtered_on_in_the_embedded_store(corpus, sets, tmp_path):
    out, store_path = tmp_path / "shards", tmp_path / "store"
    result = cli_ok("embed", corpus, "--out", out, "--workers", "0", "--tag", "shapes", "--tag", "colors:2",
                 "--prompt-sets", sets)
    assert "400 items: 400 embedded" in result
    rows = live_rows(out)
    assert all(len(m["tag_shapes"]) == len(m["tag_shapes_score"]) == 1 and len(m["tag_colors"]) == 2
               for m in rows.values())
    agree = sum(m["tag_shapes"][0] == m["shape"] for m in rows.values()) / len(rows)
    assert agree >= 0.9, f"shape tags agree with the truth for {agree:.3f} of the documents"
    assert ShardSet(out).tagging[0]["set"] == "shapes" and ShardSet(out).tagging[1]["k"] == 2

    cli_ok("index", out, "--store-path", store_path)
    tagged_circles = {doc_id for doc_id, m in rows.items() if m["tag_shapes"] == ["circle"]}
    for mode in ("vector", "hybrid"):
        hits = json.loads(cli_ok("search", "shape", "--mode", mode, "-k", "1000", "--candidates", "1000", "--filter",
                              "tag_shapes=circle", "--store-path", store_path, "--json"))
        assert {h["id"] for h in hits} == tagged_circles, mode
    lexical = json.loads(cli_ok("search", "circle", "--mode", "bm25", "-k", "1000", "--filter", "tag_shapes=circle",
                             "--store-path", store_path, "--json"))
    assert lexical and {h["id"] for h in lexical} <= tagged_circles
    either = json.loads(cli_ok("search", "--image", corpus.parent / "item-000000.jpg", "-k", "1000", "--filter",
                            "tag_colors=red", "--filter", "tag_shapes=star,cross", "--store-path", store_path,
                            "--json"))
    assert either and all("red" in h["metadata"]["tag_colors"] and h["metadata"]["tag_shapes"][0] in ("star", "cross")
                          for h in either)
    # A rerun with nothing changed keeps the tags (the shards recorded them) and re-encodes nothing.
    rerun = cli_ok("embed", corpus, "--out", out, "--workers", "0", "--prompt-sets", sets)
    assert "400 items: 0 embedded, 400 unchanged" in rerun


def test_the_tag_help_examples_run_as_written_after_adding_the_example_prompt_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples' default paths: data/shards, data/prompt-sets, data/store
    cli_ok("prompts", "add", *sorted(EXAMPLE_PROMPT_SETS.iterdir()))
    cli_ok("embed", write_corpus(tmp_path / "corpus", 20, seed=4), "--out", "data/shards", "--workers", "0")
    help_text = CliRunner().invoke(main, ["tag", "--help"]).output
    examples = [line.split("#")[0].split()[1:] for line in help_text.splitlines()
                if line.strip().startswith("clip-sidecar ")]
    assert len(examples) == 3
    for example in examples:
        cli_ok(*example)
    assert all(metadata["tag_shapes"] for metadata in live_rows(tmp_path / "data" / "shards").values())


def test_retagging_after_a_set_changes_reuses_the_stored_vectors_and_reads_no_image(sets, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 60, seed=31)
    out, store_path = tmp_path / "shards", tmp_path / "store"
    cli_ok("embed", corpus, "--out", out, "--workers", "0", "--tag", "shapes", "--prompt-sets", sets)
    assert "60 written" in cli_ok("index", out, "--store-path", store_path)
    store = EmbeddedStore(store_path)
    before = {doc.id: doc for doc in store.fetch(list(live_rows(out)))}
    store.close()
    circles = {doc_id for doc_id, doc in before.items() if doc.metadata["tag_shapes"] == ["circle"]}
    assert 0 < len(circles) < 60

    # Version 2 of the set calls circles discs (its prompts still describe a circle).
    edited = yaml.safe_load((EXAMPLE_PROMPT_SETS / "shapes.yaml").read_text())
    edited["version"] = 2
    edited["labels"][0] = {"name": "disc", "templates": ["a circle", "a photo of a circle"]}
    (tmp_path / "shapes.yaml").write_text(yaml.safe_dump(edited))
    cli_ok("prompts", "add", tmp_path / "shapes.yaml", "--prompt-sets", sets)
    shutil.rmtree(corpus.parent)  # no image left to read: tagging can only use the stored vectors

    result = cli_ok("tag", out, "--prompt-sets", sets)
    assert f"60 documents: {len(circles)} with new tags (stored vectors reused), {60 - len(circles)} unchanged" \
        in result
    assert ShardSet(out).tagging[0]["version"] == "2"
    result = cli_ok("index", out, "--store-path", store_path)
    assert f"{len(circles)} written, {60 - len(circles)} unchanged, 0 deleted" in result
    store = EmbeddedStore(store_path)
    after = {doc.id: doc for doc in store.fetch(list(before))}
    store.close()
    for doc_id, doc in after.items():
        np.testing.assert_array_equal(doc.vector, before[doc_id].vector)
        assert doc.metadata["tag_shapes"] == (["disc"] if doc_id in circles else before[doc_id].metadata["tag_shapes"])
    hits = json.loads(cli_ok("search", "shape", "--mode", "vector", "-k", "100", "--filter", "tag_shapes=disc",
                          "--store-path", store_path, "--json"))
    assert {h["id"] for h in hits} == circles

    # --clear removes every tag, again from the stored vectors alone.
    assert "60 documents: 60 with their tags removed" in cli_ok("tag", out, "--clear", "--prompt-sets", sets)
    assert not any(key.startswith("tag_") for m in live_rows(out).values() for key in m)


def test_tag_rerun_with_nothing_changed_changes_no_row_whatever_the_shard_layout(encoder, sets, tmp_path):
    # Scores came from a float32 matrix product, whose last bits depend on how many rows it multiplies at once:
    # a rerun over the shards the first run wrote (another layout) moved a rounded score or a threshold's cut,
    # and wrote new rows for documents nothing had changed.
    out, rng = tmp_path / "shards", np.random.default_rng(7)
    shards = ShardSet(out)
    shards.start(encoder.signature, preprocessing={})
    for start in range(0, 5920, 37):  # small shards: the first run reads 37 rows at a time, the rerun 4096
        vectors = rng.standard_normal((37, encoder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        shards.write_shard(vectors, [ShardRow(id=f"doc{start + i}", path=f"{start + i}.jpg", text="", metadata={},
                                              content_hash=f"c{start + i}", image_hash=f"i{start + i}")
                                     for i in range(37)])
    first = cli_ok("tag", out, "--tag", "colors:0.1", "--tag", "shapes:3", "--prompt-sets", sets)
    assert "5920 documents: 5920 with new tags" in first
    assert "5920 documents: 0 with new tags (stored vectors reused), 5920 unchanged; nothing to load" in cli_ok(
        "tag", out, "--prompt-sets", sets)


def test_embed_rerun_after_a_set_changes_retags_without_encoding(sets, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 40, seed=32)
    out = tmp_path / "shards"
    cli_ok("embed", corpus, "--out", out, "--workers", "0", "--tag", "colors", "--prompt-sets", sets)
    reds = {doc_id for doc_id, m in live_rows(out).items() if m["tag_colors"] == ["red"]}
    edited = dict(json.loads(cli_ok("prompts", "show", "colors", "--json", "--prompt-sets", sets)), version="2")
    edited["labels"][0] = {"name": "crimson", "templates": ["a red shape", "something red"]}
    (tmp_path / "colors.json").write_text(json.dumps(edited))
    cli_ok("prompts", "add", tmp_path / "colors.json", "--prompt-sets", sets)
    result = cli_ok("embed", corpus, "--out", out, "--workers", "0", "--prompt-sets", sets)
    assert f"40 items: 0 embedded, {40 - len(reds)} unchanged" in result
    assert f"{len(reds)} with new text or metadata only (vectors reused)" in result
    assert {doc_id for doc_id, m in live_rows(out).items() if m["tag_colors"] == ["crimson"]} == reds


def test_tagging_refuses_a_corpus_field_of_the_same_name(sets, tmp_path):
    folder = tmp_path / "corpus"
    manifest = write_corpus(folder, 5, seed=33)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines[2]["metadata"]["tag_shapes"] = "hand-written"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = CliRunner().invoke(main, ["-q", "embed", str(manifest), "--out", str(tmp_path / "shards"), "--workers",
                                       "0", "--tag", "shapes", "--prompt-sets", str(sets)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: item 'item-000002': its metadata has a field 'tag_shapes', which tagging with prompt set 'shapes' "
        "writes; rename it in the corpus, or tag with another set")


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != ".lock"}


# The user's own fields named as set shapes' tag fields: a string, and a list of labels with as many scores, the
# very shape tagging writes (which `tag` took for an earlier tagging's and replaced, and --clear then deleted).
@pytest.mark.parametrize("mine", [{"tag_shapes": "hand-written"},
                                  {"tag_shapes": ["my circle"], "tag_shapes_score": [0.5]}])
def test_tag_refuses_a_corpus_field_named_for_a_set_the_shards_were_never_tagged_with_and_writes_nothing(
        sets, tmp_path, mine):
    folder = tmp_path / "corpus"
    manifest = write_corpus(folder, 5, seed=33)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines[2]["metadata"].update(mine)
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "shards"
    cli_ok("embed", manifest, "--out", out, "--workers", "0", "--prompt-sets", sets)
    before = files_of(out)

    result = CliRunner().invoke(main, ["-q", "tag", str(out), "--tag", "shapes", "--prompt-sets", str(sets)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: item 'item-000002': its metadata has a field 'tag_shapes', which tagging with prompt set 'shapes' "
        "writes; rename it in the corpus and rerun `clip-sidecar embed` (it rebuilds each row's metadata from the "
        "corpus), or tag with another set")
    assert files_of(out) == before
    # Another set tags the folder; the corpus's fields stay, through a retag and through --clear.
    cli_ok("tag", out, "--tag", "colors", "--prompt-sets", sets)
    assert {key: live_rows(out)["item-000002"][key] for key in mine} == mine
    assert all(len(m["tag_colors"]) == 1 for m in live_rows(out).values())
    cli_ok("tag", out, "--tag", "colors:2", "--prompt-sets", sets)
    assert all(len(m["tag_colors"]) == 2 for m in live_rows(out).values())
    cli_ok("tag", out, "--clear", "--prompt-sets", sets)
    assert {doc_id: {key: m[key] for key in mine} for doc_id, m in live_rows(out).items() if "tag_shapes" in m} == {
        "item-000002": mine}
    assert not any(key.startswith("tag_colors") for m in live_rows(out).values() for key in m)
    # The embed rerun that tagging would have made refuse the corpus still runs.
    cli_ok("embed", manifest, "--out", out, "--workers", "0", "--prompt-sets", sets)


def killed(monkeypatch: pytest.MonkeyPatch, *args: object) -> None:
    """`clip-sidecar ARGS` killed once its rows are written, before the manifest records their tagging: a kill
    cannot be timed for real, so recording it raises as Ctrl-C would."""
    def interrupt(self, record):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(ShardSet, "set_tagging", interrupt)
        result = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert result.exit_code == 130, result.output  # click's Abort


def test_tag_clear_after_killed_tag_and_embed_runs_leaves_every_row_as_an_untagged_embed_wrote_it(
        sets, tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", 6, seed=36)
    out = tmp_path / "shards"
    cli_ok("embed", corpus, "--out", out, "--workers", "0", "--prompt-sets", sets)
    untagged = {doc_id: (row.metadata, row.content_hash) for doc_id, (_, row, _) in ShardSet(out).live().items()}
    cli_ok("tag", out, "--tag", "shapes", "--prompt-sets", sets)
    killed(monkeypatch, "tag", out, "--tag", "colors:2", "--prompt-sets", sets)
    killed(monkeypatch, "embed", corpus, "--out", out, "--workers", "0", "--tag", "descriptions",
           "--prompt-sets", sets)
    assert all("tag_descriptions" in m for m in live_rows(out).values())
    assert ShardSet(out).tagging_begun == ["colors", "descriptions"]

    cli_ok("tag", out, "--clear", "--prompt-sets", sets)
    shards = ShardSet(out)
    assert {doc_id: (row.metadata, row.content_hash) for doc_id, (_, row, _) in shards.live().items()} == untagged
    assert shards.tagging == [] and shards.tagging_begun == []


def test_tag_replaces_the_tags_of_a_set_the_shards_were_tagged_with(sets, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 5, seed=34)
    out = tmp_path / "shards"
    cli_ok("embed", corpus, "--out", out, "--workers", "0", "--tag", "shapes", "--prompt-sets", sets)
    assert "5 documents: 5 with new tags" in cli_ok("tag", out, "--tag", "shapes:2", "--prompt-sets", sets)
    assert all(len(m["tag_shapes"]) == len(m["tag_shapes_score"]) == 2 for m in live_rows(out).values())


@pytest.mark.parametrize(("args", "message"), [
    (["--tag", "shapes:0"], "after ':' comes a count of labels"),
    (["--tag", "shapes:1.5"], "after ':' comes a count of labels (e.g. 3) or a cosine score threshold"),
    (["--tag", "shapes", "--tag", "shapes:2"], "set 'shapes' is given twice to tag with"),
    # set `shapes_score`'s labels would overwrite set `shapes`'s scores (both tag_shapes_score)
    (["--tag", "shapes", "--tag", "shapes_score"], "sets 'shapes' and 'shapes_score' would both write metadata "
                                                   "field 'tag_shapes_score'"),
    (["--tag", "nope"], "no prompt set named 'nope'"),
])
def test_bad_tag_options_are_refused(corpus, sets, tmp_path, args, message):
    result = CliRunner().invoke(main, ["-q", "embed", str(corpus), "--out", str(tmp_path / "shards"), "--workers", "0",
                                       "--prompt-sets", str(sets), *args])
    assert result.exit_code != 0 and message in result.output, result.output


def test_eval_scores_prompt_sets_on_a_labelled_sample(sets, tmp_path):
    sample = write_corpus(tmp_path / "sample", 150, seed=77)  # fresh renders
    plain = {"name": "shapes-plain", "labels": ["circle", "square", "triangle", "star", "cross"]}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    cli_ok("prompts", "add", tmp_path / "plain.json", "--prompt-sets", sets)
    out = tmp_path / "report"
    result = cli_ok("eval", "--prompts", "shapes", "--prompts", "shapes-plain", "--labels", sample, "--label-field",
                 "shape", "--prompt-sets", sets, "--out", out)
    assert "| prompt set | version | labels | prompts | samples | top-1 | top-5 | chance top-1 |" in result
    report = json.loads((out / "results.json").read_text())
    by_set = {r["set"]: r for r in report["results"]}
    truth = Counter(json.loads(line)["metadata"]["shape"] for line in sample.read_text().splitlines())
    for name in ("shapes", "shapes-plain"):
        assert by_set[name]["samples"] == 150 and by_set[name]["top5"] == 1.0  # five labels: always in the top 5
        assert by_set[name]["top1"] >= 0.9, by_set[name]  # chance: 0.2
        assert {label: entry["samples"] for label, entry in by_set[name]["per_label"].items()} == dict(truth)
    assert f"| shapes | 1 | 5 | 15 | 150 | {by_set['shapes']['top1']:.3f} |" in result
    wrong = CliRunner().invoke(main, ["-q", "eval", "--prompts", "shapes", "--labels", str(sample), "--label-field",
                                      "color", "--prompt-sets", str(sets), "--out", str(out)])
    assert wrong.exit_code == 2 and "are not labels of prompt set 'shapes'" in wrong.output


def test_eval_of_prompt_sets_skips_and_counts_a_missing_or_broken_image_of_the_sample(sets, tmp_path):
    sample = write_corpus(tmp_path / "sample", 12, seed=78)
    rows = [json.loads(line) for line in sample.read_text().splitlines()]
    (sample.parent / rows[0]["path"]).unlink()  # was a FileNotFoundError traceback
    (sample.parent / rows[1]["path"]).write_bytes(b"not an image")  # was an ImageDecodeError traceback
    out = tmp_path / "report"
    result = cli_ok("eval", "--prompts", "shapes", "--labels", sample, "--label-field", "shape", "--prompt-sets", sets,
                 "--out", out)
    assert "2 of 12 images skipped as unusable" in result
    assert "| shapes | 1 | 5 | 15 | 10 |" in result
    report = json.loads((out / "results.json").read_text())
    assert [Path(s["path"]).name for s in report["skipped"]] == [Path(rows[0]["path"]).name,
                                                                  Path(rows[1]["path"]).name]
    assert report["skipped"][0]["reason"].startswith("cannot read file")
    assert "2 of 12 images skipped as unusable" in (out / "results.md").read_text()


def test_embed_and_tag_without_tag_after_the_recorded_set_was_removed_name_it_as_the_shards_and_the_ways_on(
        sets, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 5, seed=34)
    out = tmp_path / "shards"
    cli_ok("embed", corpus, "--out", out, "--workers", "0", "--tag", "colors", "--prompt-sets", sets)
    cli_ok("prompts", "remove", "colors", "--prompt-sets", sets)
    for args in (["embed", str(corpus), "--out", str(out), "--workers", "0"], ["tag", str(out)]):
        result = CliRunner().invoke(main, ["-q", *args, "--prompt-sets", str(sets)])
        assert result.exit_code == 1
        assert f"{out} was last tagged with prompt set 'colors', which {sets} no longer holds" in result.output
        assert f"`clip-sidecar tag {out} --clear`" in result.output
    # The way out it names works: the tags go, and embed runs again without --tag.
    cli_ok("tag", out, "--clear", "--prompt-sets", sets)
    assert "5 items: 0 embedded, 5 unchanged" in cli_ok("embed", corpus, "--out", out, "--workers", "0",
                                                          "--prompt-sets", sets)
