"""Prompt sets: files (JSON, YAML, CSV) and their errors, template ensembling, the versioned vector cache, ranking."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from sidecar.errors import EncodeTimeout
from sidecar.model.prompts import (
    PromptSet,
    PromptSetError,
    PromptSetNotFound,
    PromptSetRegistry,
    PromptSetUnreadable,
    count_reaching,
    ensemble_vectors,
    load_prompt_set,
    rank_labels,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "prompt-sets"


class CountingEncoder:
    """Deterministic unit vectors per text (a hash seeds them), counting every text it is asked for."""

    def __init__(self, dim: int = 16):
        self.dim = dim
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.texts.extend(texts)
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little") for t in texts]
        rows = [np.random.default_rng(seed).normal(size=self.dim) for seed in seeds]
        vectors = np.array(rows, dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_the_same_set_reads_alike_from_yaml_json_and_csv(tmp_path):
    yaml_set = load_prompt_set(write(tmp_path / "a.yaml", "name: shapes\nversion: 2\ntemplates: ['a {}', 'a photo of a {}']\n"
                                                         "labels: [circle, {name: star, templates: ['a {} shape']}]\n"))
    json_set = load_prompt_set(write(tmp_path / "b.json", json.dumps(
        {"name": "shapes", "version": "2", "templates": ["a {}", "a photo of a {}"],
         "labels": ["circle", {"name": "star", "templates": ["a {} shape"]}]})))
    csv_set = load_prompt_set(write(tmp_path / "shapes.csv", "label,template\ncircle,a {}\ncircle,a photo of a {}\n"
                                                             "star,a {} shape\n"), version="2")
    assert yaml_set.labels == json_set.labels == csv_set.labels
    assert yaml_set.name == csv_set.name == "shapes" and yaml_set.version == csv_set.version == "2"
    assert yaml_set.labels[0].prompts == ("a circle", "a photo of a circle")
    assert yaml_set.labels[1].prompts == ("a star shape",)
    # The stored form reads back as the same set.
    assert PromptSet.from_dict(yaml_set.to_dict(), source="stored") == yaml_set


@pytest.mark.parametrize(("name", "text"), [("a.yaml", "name: s\nversion: {}\nlabels: [a]\n"),
                                           ("a.json", '{{"name": "s", "version": {}, "labels": ["a"]}}')])
def test_a_numeric_version_is_the_version_as_written_so_a_bump_from_1_1_to_1_10_is_a_new_version(
        tmp_path, name, text):
    registry = PromptSetRegistry(tmp_path / "sets")
    assert registry.add(load_prompt_set(write(tmp_path / name, text.format("1.1"))))
    bumped = load_prompt_set(write(tmp_path / name, text.format("1.10")))
    assert bumped.version == "1.10"
    assert registry.add(bumped) and registry.get("s").version == "1.10"


@pytest.mark.parametrize("written", ["010", "0x1A", "1_000", "+3"])
def test_a_yaml_integer_version_is_the_version_as_written_not_the_number_yaml_reads(tmp_path, written):
    prompt_set = load_prompt_set(write(tmp_path / "a.yaml", f"name: s\nversion: {written}\nlabels: [a]\n"))
    assert prompt_set.version == written and prompt_set.to_dict()["version"] == written


def test_a_csv_whose_labels_share_templates_has_them_as_the_set_templates(tmp_path):
    prompt_set = load_prompt_set(EXAMPLES / "colors.csv")
    assert prompt_set.templates == ("a {} shape", "something {}") and len(prompt_set.labels) == 8
    assert prompt_set.to_dict()["labels"][:2] == ["red", "orange"]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("a.yaml", "name: Shapes!\nlabels: [a]\n", "the set's name must be 1-64 characters of a-z"),
    ("a.yaml", "name: s\nlabels: []\n", "field 'labels' must be a non-empty list"),
    ("a.yaml", "name: s\nlabels: [a, a]\n", "label 'a' appears twice"),
    ("a.yaml", "name: s\nlabels: [a, '']\n", "labels[1]: a label is a non-empty string"),
    ("a.yaml", "name: s\nlabels: [\"red\\nblue\"]\n", "labels[0]: a label is one line of printable characters, got "
                                                      "'red\\nblue'"),
    ("a.yaml", "name: s\nlabels: [yes, no]\n", "labels[0]: a label is a non-empty string, got True; in YAML, quote "
                                              "a label that reads as a boolean"),
    ("a.yaml", "name: s\ntemplates: [1]\nlabels: [a]\n", "field 'templates': templates are a non-empty list"),
    ("a.yaml", "name: s\nlabels: [{name: a, prompts: [x]}]\n", "labels[0]: unknown field 'prompts'"),
    ("a.yaml", "name: s\nlabel: [a]\n", "unknown field 'label'"),
    ("a.yaml", "name: s\nversion: '  '\nlabels: [a]\n", "field 'version' must be a string or a number, printable "
                                                         "and not blank, got '  '"),
    ("a.yaml", "name: s\nversion: \"2\\nbeta\"\nlabels: [a]\n", "field 'version' must be"),
    ("a.yaml", "name: s\nlabels: [a\n", "not valid YAML"),
    ("a.json", "{\"name\": ", "not valid JSON"),
    ("a.csv", "name,template\na,b\n", "a CSV prompt set has the columns label and (optionally) template"),
    ("a.txt", "a", "a prompt set file is .json, .yaml, .yml, .csv"),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_field(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(PromptSetError) as caught:
        load_prompt_set(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


@pytest.mark.parametrize(("name", "text", "message"), [
    # Every label would be the same prompt, "a photo": their vectors identical, the ranking the set's order.
    ("a.yaml", "name: s\ntemplates: ['a photo']\nlabels: [cat, dog]\n",
     "field 'templates': template 'a photo' has no '{}'"),
    # Half of each label's vector the same for every label.
    ("a.yaml", "name: s\ntemplates: ['a photo of a {}', 'a photo']\nlabels: [cat, dog]\n",
     "field 'templates': template 'a photo' has no '{}'"),
    # str.format's placeholders are not filled in: the prompt would be "a photo of {0}" for every label.
    ("a.yaml", "name: s\ntemplates: ['a photo of {0}']\nlabels: [cat, dog]\n",
     "field 'templates': template 'a photo of {0}' has a brace that is not part of '{}'"),
    ("a.yaml", "name: s\nlabels: [{name: cat, templates: ['a {label}']}, dog]\n",
     "field 'templates' of label 'cat': template 'a {label}' has a brace that is not part of '{}'"),
    ("a.json", '{"name": "s", "templates": ["a {{}}"], "labels": ["cat", "dog"]}',
     "field 'templates': template 'a {{}}' has a brace that is not part of '{}'"),
    ("a.yaml", "name: s\nlabels: [{name: cat, templates: ['a pet']}, {name: dog, templates: ['a pet']}]\n",
     "labels 'cat' and 'dog' have the same prompts ('a pet')"),
    ("a.csv", "label,template\ncat,a pet\ndog,a pet\n", "labels 'cat' and 'dog' have the same prompts ('a pet')"),
])
def test_templates_that_would_give_labels_the_same_prompts_or_leave_braces_unfilled_are_refused(
        tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(PromptSetError) as caught:
        load_prompt_set(path)
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_a_labels_own_template_may_be_a_whole_prompt_also_in_a_csv_of_one_label(tmp_path):
    yaml_set = load_prompt_set(write(tmp_path / "a.yaml", "name: s\nlabels: [{name: cat, templates: ['a kitten', "
                                                          "'a {}']}, dog]\n"))
    assert yaml_set.labels[0].prompts == ("a kitten", "a cat") and yaml_set.labels[1].prompts == ("dog",)
    csv_set = load_prompt_set(write(tmp_path / "pets.csv", "label,template\ncat,a kitten\n"))
    assert csv_set.labels[0].prompts == ("a kitten",)


def test_a_csv_saved_with_a_byte_order_mark_or_a_quoted_multiline_cell_reads_as_written(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a BOM: the header read "\ufefflabel" and was refused.
    path = tmp_path / "pets.csv"
    path.write_bytes("label,template\ncat,a {}\n\ndog,\"a {}\nat home\"\n".encode("utf-8-sig"))
    prompt_set = load_prompt_set(path)
    assert [label.prompts for label in prompt_set.labels] == [("a cat",), ("a dog\nat home",)]
    bad = write(tmp_path / "bad.csv", "label,template\ncat,a {}\n\n,a {}\n")
    with pytest.raises(PromptSetError, match=r"bad\.csv:4: label: a label is a non-empty string"):
        load_prompt_set(bad)


@pytest.mark.parametrize("name", ["a.yaml", "a.json", "a.csv"])
def test_a_file_that_is_not_utf8_is_refused_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\xff\xfe bad")  # UTF-16's byte-order mark: was a UnicodeDecodeError traceback
    with pytest.raises(PromptSetError, match=f"{name}: not UTF-8 text \\(byte 0xff at offset 0\\)"):
        load_prompt_set(path)


def test_template_ensembling_averages_the_normalised_prompt_vectors_then_normalises():
    prompt_set = PromptSet.from_dict({"name": "s", "templates": ["a {}", "a photo of a {}", "{}"],
                                      "labels": ["circle", {"name": "star", "templates": ["a star"]}]}, source="test")
    encode = CountingEncoder()
    vectors = ensemble_vectors(prompt_set, encode)
    circle = encode(["a circle", "a photo of a circle", "circle"]).mean(axis=0)
    np.testing.assert_allclose(vectors[0], circle / np.linalg.norm(circle), atol=1e-6)
    np.testing.assert_allclose(vectors[1], encode(["a star"])[0], atol=1e-6)
    assert vectors.shape == (2, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1)


def test_vectors_are_computed_once_per_model_and_set_and_kept_on_disk(tmp_path):
    registry = PromptSetRegistry(tmp_path)
    shapes = load_prompt_set(EXAMPLES / "shapes.yaml")
    registry.add(shapes)
    encode = CountingEncoder()
    first = registry.vectors(shapes, model="m", weights="w1", encode=encode)
    assert len(encode.texts) == shapes.prompt_count == 15
    np.testing.assert_array_equal(registry.vectors(shapes, model="m", weights="w1", encode=encode), first)
    # Another process (a fresh registry on the same folder) reads them from disk.
    np.testing.assert_array_equal(PromptSetRegistry(tmp_path).vectors(shapes, model="m", weights="w1", encode=encode),
                                  first)
    assert len(encode.texts) == 15
    # Other weights are other vectors: computed, and kept beside the first ones.
    registry.vectors(shapes, model="m", weights="w2", encode=encode)
    assert len(encode.texts) == 30
    assert registry.cached_vectors(shapes, model="m", weights="w1") and registry.cached_vectors(shapes, model="m",
                                                                                                weights="w2")


def test_a_changed_template_or_version_re_embeds_only_that_set(tmp_path):
    registry = PromptSetRegistry(tmp_path)
    shapes, colors = load_prompt_set(EXAMPLES / "shapes.yaml"), load_prompt_set(EXAMPLES / "colors.csv")
    for prompt_set in (shapes, colors):
        registry.add(prompt_set)
        registry.vectors(prompt_set, model="m", weights="w", encode=CountingEncoder())
    colors_file = next((tmp_path / "vectors" / "colors").iterdir())
    colors_written = colors_file.stat().st_mtime_ns

    # A running server's registry notices the changed file on its next use.
    edited = dict(shapes.to_dict(), templates=["a {}", "a drawing of a {}"])
    (tmp_path / "shapes.json").write_text(json.dumps(edited), encoding="utf-8")
    encode = CountingEncoder()
    changed = registry.get("shapes")
    assert changed.labels[0].prompts == ("a circle", "a drawing of a circle")
    registry.vectors(changed, model="m", weights="w", encode=encode)
    registry.vectors(registry.get("colors"), model="m", weights="w", encode=encode)
    assert encode.texts == [p for label in changed.labels for p in label.prompts]  # shapes only
    assert colors_file.stat().st_mtime_ns == colors_written

    bumped = PromptSet.from_dict(changed.to_dict(), source="test", version="2")
    registry.add(bumped)
    registry.vectors(registry.get("shapes"), model="m", weights="w", encode=encode)
    assert len(encode.texts) == 2 * changed.prompt_count
    assert len(list((tmp_path / "vectors" / "shapes").iterdir())) == 1  # one file per model: replaced, not added


def test_the_fingerprint_changes_with_a_template_or_label_under_the_same_version_and_not_with_the_version():
    shapes = load_prompt_set(EXAMPLES / "shapes.yaml")
    retemplated = PromptSet.from_dict(dict(shapes.to_dict(), templates=["a drawing of a {}"]), source="test")
    relabelled = PromptSet.from_dict(dict(shapes.to_dict(), labels=["circle", "square"]), source="test")
    bumped = PromptSet.from_dict(dict(shapes.to_dict(), description="same prompts"), source="test", version="2")
    assert retemplated.version == relabelled.version == shapes.version
    assert len({shapes.fingerprint, retemplated.fingerprint, relabelled.fingerprint}) == 3
    assert bumped.fingerprint == shapes.fingerprint and re.fullmatch(r"sha256:[0-9a-f]{16}", shapes.fingerprint)
    # The vector cache's key is as it was: vectors already on disk are not embedded again.
    assert shapes.vector_key(model="m", weights="w") == hashlib.sha256(json.dumps(
        ["m", "w", "1", [[label.name, list(label.prompts)] for label in shapes.labels]],
        separators=(",", ":")).encode()).hexdigest()[:32]


def test_concurrent_first_uses_compute_the_vectors_once(tmp_path):
    registry = PromptSetRegistry(tmp_path)
    shapes = load_prompt_set(EXAMPLES / "shapes.yaml")
    registry.add(shapes)
    encode = CountingEncoder()
    threads = [threading.Thread(target=registry.vectors, args=(shapes,), kwargs=dict(model="m", weights="w",
                                                                                     encode=encode))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(encode.texts) == shapes.prompt_count


def test_a_caller_waiting_on_anothers_first_computation_gives_up_at_its_limit_and_then_finds_the_vectors(tmp_path):
    registry = PromptSetRegistry(tmp_path)
    shapes = load_prompt_set(EXAMPLES / "shapes.yaml")
    registry.add(shapes)
    started, release, encode = threading.Event(), threading.Event(), CountingEncoder()

    def slow(texts: list[str]) -> np.ndarray:  # a large set embedded for its first request
        started.set()
        release.wait()
        return encode(texts)

    first = threading.Thread(target=registry.vectors, args=(shapes,), kwargs=dict(model="m", weights="w", encode=slow))
    first.start()
    assert started.wait(timeout=60)
    with pytest.raises(EncodeTimeout, match="'shapes': its .* prompts are being embedded .* request_timeout_s=0.05"):
        registry.vectors(shapes, model="m", weights="w", encode=encode, wait_s=0.05)
    release.set()
    first.join()
    assert registry.vectors(shapes, model="m", weights="w", encode=encode, wait_s=0.05).shape[0] == len(shapes.labels)
    assert len(encode.texts) == shapes.prompt_count  # computed once, by the first caller


def test_add_reports_an_identical_set_as_unchanged_and_remove_deletes_its_vectors(tmp_path):
    registry = PromptSetRegistry(tmp_path)
    shapes = load_prompt_set(EXAMPLES / "shapes.yaml")
    assert registry.add(shapes) is True and registry.add(shapes) is False
    registry.vectors(shapes, model="m", weights="w", encode=CountingEncoder())
    assert [s.name for s in registry.summaries()] == ["shapes"] and registry.summaries()[0].models == ("m (w)",)
    registry.remove("shapes")
    assert registry.names() == [] and not (tmp_path / "vectors" / "shapes").exists()
    with pytest.raises(PromptSetNotFound, match="no prompt set named 'shapes'.*prompts add FILE"):
        registry.get("shapes")


def test_an_unknown_set_names_the_ones_there_are(tmp_path):
    registry = PromptSetRegistry(tmp_path)
    registry.add(load_prompt_set(EXAMPLES / "shapes.yaml"))
    with pytest.raises(PromptSetNotFound, match="no prompt set named 'colours'.*available: shapes"):
        registry.get("colours")
    with pytest.raises(PromptSetNotFound):
        registry.get("../shapes")  # a name is never a path


def test_a_set_removed_while_it_is_read_is_not_found_and_left_out_of_the_listing(tmp_path, monkeypatch):
    registry = PromptSetRegistry(tmp_path)
    for name in ("shapes.yaml", "colors.csv"):
        registry.add(load_prompt_set(EXAMPLES / name))
    read_text = Path.read_text

    def removed_first(path, *args, **kwargs):  # `prompts remove` in another process, just after the stat
        if path.name == "shapes.json":
            path.unlink(missing_ok=True)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", removed_first)
    with pytest.raises(PromptSetNotFound, match="no prompt set named 'shapes'.*available: colors"):
        registry.get("shapes")
    registry.add(load_prompt_set(EXAMPLES / "shapes.yaml"))
    assert [s.name for s in registry.sets()] == ["colors"]
    assert [s.name for s in registry.summaries()] == ["colors"]


@pytest.mark.parametrize(("content", "problem"), [
    (b'{"name": "shapes", "locale": "en", "labels": ["circle"]}', "unknown field 'locale'"),  # a newer version's
    (b'{"name": "shapes", "labels": [', "not valid JSON"),  # cut short
    (b'{"name": "colors", "labels": ["circle"]}', "field 'name' is 'colors', not the name it is stored under"),
    ('{"name": "shapes", "labels": ["c\u00edrculo"]}'.encode("latin-1"), "not UTF-8 text (byte 0xed"),  # hand-edited
])
def test_a_stored_set_this_version_cannot_use_is_named_logged_once_left_out_and_can_be_replaced_or_removed(
        tmp_path, caplog, content, problem):
    registry = PromptSetRegistry(tmp_path)
    registry.add(load_prompt_set(EXAMPLES / "colors.csv"))
    (tmp_path / "shapes.json").write_bytes(content)
    for _ in range(2):
        with pytest.raises(PromptSetUnreadable, match=re.escape(f"stored prompt set 'shapes': {problem}")) as caught:
            registry.get("shapes")
    assert caught.value.name == "shapes" and str(tmp_path) not in caught.value.problem
    assert "prompts add FILE" in str(caught.value) and str(tmp_path / "shapes.json") in str(caught.value)
    assert [s.name for s in registry.sets()] == ["colors"] and [s.name for s in registry.summaries()] == ["colors"]
    assert caplog.text.count("stored prompt set 'shapes'") == 1  # once per version of the file, not per use
    shapes = load_prompt_set(EXAMPLES / "shapes.yaml")
    assert registry.add(shapes) is True and registry.get("shapes") == shapes
    (tmp_path / "shapes.json").write_bytes(content)
    registry.remove("shapes")
    assert registry.names() == ["colors"]


def test_an_unwritable_registry_still_serves_the_vectors(tmp_path, caplog):
    registry = PromptSetRegistry(tmp_path)
    shapes = load_prompt_set(EXAMPLES / "shapes.yaml")
    registry.add(shapes)
    (tmp_path / "vectors").write_text("not a folder")  # the vectors' folder cannot be created
    vectors = registry.vectors(shapes, model="m", weights="w", encode=CountingEncoder())
    assert vectors.shape == (5, 16)
    assert "prompt set vectors kept in memory only" in caplog.text


def test_ranking_orders_labels_with_softmax_probabilities_at_the_logit_scale():
    labels = ["a", "b", "c"]
    label_vectors = np.eye(3, 4, dtype=np.float32)
    query = np.array([[0.6, 0.8, 0.0, 0.0]], dtype=np.float32)
    ranked = rank_labels(query, label_vectors, labels, logit_scale=10.0)[0]
    assert [r.label for r in ranked] == ["b", "a", "c"]
    assert [r.score for r in ranked] == pytest.approx([0.8, 0.6, 0.0])
    expected = np.exp(10 * np.array([0.8, 0.6, 0.0]))
    assert [r.probability for r in ranked] == pytest.approx(list(expected / expected.sum()))
    top = rank_labels(query, label_vectors, labels, logit_scale=10.0, k=1)[0]
    assert [(r.label, r.probability) for r in top] == [("b", pytest.approx(ranked[0].probability))]
    assert [r.label for r in rank_labels(query, label_vectors, labels, logit_scale=10.0, threshold=0.5)[0]] == ["b", "a"]
    assert rank_labels(query, label_vectors, labels, logit_scale=10.0, k=2, threshold=0.9) == [[]]


def test_count_reaching_counts_what_rank_labels_keeps_at_the_threshold_before_its_k_cut():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    label_vectors = rng.normal(size=(6, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    label_vectors /= np.linalg.norm(label_vectors, axis=1, keepdims=True)
    labels = [f"label {i}" for i in range(6)]
    for threshold in (-1.0, 0.0, 0.3, 0.7, 1.0):
        kept = rank_labels(vectors, label_vectors, labels, logit_scale=100.0, threshold=threshold)
        assert list(count_reaching(vectors, label_vectors, threshold=threshold)) == [len(row) for row in kept]
        cut = rank_labels(vectors, label_vectors, labels, logit_scale=100.0, k=2, threshold=threshold)
        assert [row[:2] for row in kept] == cut
