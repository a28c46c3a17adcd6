"""POST /v1/classify and GET /v1/prompt-sets on the real app with the trained tiny model and the example
prompt sets (examples/prompt-sets): accuracy on fresh renders, probabilities, image → text descriptions,
multi-label, the batcher, a set changed under a running app, and bad input."""

from __future__ import annotations

import base64
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import REGISTRY

import sidecar
from sidecar.model.prompts import PromptSet, PromptSetRegistry, load_prompt_set
from sidecar.model.synthetic import iter_items, jpeg_roundtrip, render
from tests.conftest import EXAMPLE_PROMPT_SETS

FRESH_SEED = 4242  # the tiny model trains on seeds from 1,000,000 up: these renders are new to it


def jpeg_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def batch_items(modality: str) -> float:
    """Items the coarse model's micro-batcher of `modality` has forwarded in this process."""
    return REGISTRY.get_sample_value("sidecar_batch_size_sum", {"modality": modality, "model": "coarse"}) or 0.0


def classify(client, **body):
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 200, response.json
    return response.json


@pytest.mark.parametrize(("prompt_set", "attribute", "labels"), [("shapes", "shape", 5), ("colors", "color", 8)])
def test_fresh_renders_are_classified_far_above_chance(client, prompt_set, attribute, labels):
    items = list(iter_items(80, seed=FRESH_SEED))
    correct = 0
    for start in range(0, len(items), 8):  # max_batch_items of the test app
        part = items[start:start + 8]
        body = classify(client, set=prompt_set, input=[jpeg_b64(item.image) for item in part], k=1)
        correct += sum(entry["labels"][0]["label"] == item.attributes[attribute]
                       for entry, item in zip(body["data"], part))
    accuracy = correct / len(items)
    print(f"{prompt_set}: top-1 accuracy {accuracy:.3f} on {len(items)} fresh renders (chance {1 / labels:.3f})")
    assert accuracy >= 0.9, f"top-1 accuracy {accuracy:.3f}, chance {1 / labels:.3f}"


def test_scores_are_cosines_and_probabilities_a_softmax_at_the_models_logit_scale(client, encoder):
    item = next(iter_items(1, seed=FRESH_SEED))
    body = classify(client, set="shapes", input=[jpeg_b64(item.image)], k=5)
    assert body["set"] == "shapes" and body["version"] == "1" and body["model"] == encoder.name
    assert body["logit_scale"] == pytest.approx(float(encoder.model.logit_scale.detach().exp()))
    labels = body["data"][0]["labels"]
    assert {entry["label"] for entry in labels} == {"circle", "square", "triangle", "star", "cross"}
    scores = np.array([entry["score"] for entry in labels])
    assert list(scores) == sorted(scores, reverse=True)
    expected = np.exp(body["logit_scale"] * scores) / np.exp(body["logit_scale"] * scores).sum()
    assert [entry["probability"] for entry in labels] == pytest.approx(list(expected), rel=1e-4)
    # The score is the cosine of the image's vector (as /v1/embeddings gives it) and the label's.
    image = client.post("/v1/embeddings", json={"modality": "image", "input": [jpeg_b64(item.image)]})
    vector = np.array(image.json["data"][0]["embedding"])
    shapes = load_prompt_set(EXAMPLE_PROMPT_SETS / "shapes.yaml")
    top = next(label for label in shapes.labels if label.name == labels[0]["label"])
    prompts = encoder.encode_texts(list(top.prompts)).mean(axis=0)
    assert labels[0]["score"] == pytest.approx(float(vector @ (prompts / np.linalg.norm(prompts))), abs=1e-4)


def test_texts_are_classified_too(client):
    body = classify(client, set="colors", modality="text", input=["red sneakers", "a blue handbag",
                                                                    {"type": "text", "text": "green grass"}], k=2)
    assert [entry["type"] for entry in body["data"]] == ["text"] * 3
    assert [entry["labels"][0]["label"] for entry in body["data"]] == ["red", "blue", "green"]
    mixed = classify(client, set="shapes", input=[{"type": "text", "text": "a star"},
                                                  {"type": "image", "image": jpeg_b64(next(iter_items(1, seed=1)).image)}])
    assert [entry["type"] for entry in mixed["data"]] == ["text", "image"]
    assert mixed["data"][0]["labels"][0]["label"] == "star"


def test_image_to_text_ranks_free_text_descriptions(client):
    descriptions = load_prompt_set(EXAMPLE_PROMPT_SETS / "descriptions.json").label_names
    # Render exactly what each description says; its own description must come first.
    phrase = {"in the center": "center", "on the left": "left", "on the right": "right", "at the top": "top",
              "at the bottom": "bottom"}
    images = []
    for i, text in enumerate(descriptions):
        size, color, shape, *rest = text.removeprefix("a ").split()
        attrs = {"size": size, "color": color, "shape": shape, "position": phrase[" ".join(rest)]}
        images.append(jpeg_b64(jpeg_roundtrip(render(attrs, rng=random.Random(i)))))
    top = []
    for start in range(0, len(images), 8):
        body = classify(client, set="descriptions", input=images[start:start + 8], k=3)
        top += [entry["labels"][0]["label"] for entry in body["data"]]
    assert top == descriptions


def test_a_threshold_returns_every_label_that_clears_it(client):
    item = next(iter_items(1, seed=FRESH_SEED))
    every = classify(client, set="shapes", input=[jpeg_b64(item.image)], k=5)["data"][0]["labels"]
    threshold = (every[1]["score"] + every[2]["score"]) / 2  # between the second and the third
    some = classify(client, set="shapes", input=[jpeg_b64(item.image)], threshold=threshold)["data"][0]["labels"]
    assert [entry["label"] for entry in some] == [entry["label"] for entry in every[:2]]
    capped = classify(client, set="shapes", input=[jpeg_b64(item.image)], threshold=-1, k=3)["data"][0]["labels"]
    assert len(capped) == 3


def test_a_threshold_over_a_set_of_more_labels_than_max_k_counts_the_labels_left_out(build_app):
    client = build_app(max_k=3, rerank_candidates=3).test_client()  # the shapes set has 5 labels
    item = jpeg_b64(next(iter_items(1, seed=FRESH_SEED)).image)
    every = classify(client, set="shapes", input=[item], threshold=-1)["data"][0]
    assert len(every["labels"]) == 3 and every["omitted"] == 2
    documented = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())
    assert set(every) <= set(documented["components"]["schemas"]["ClassifyResponse"]["properties"]["data"]["items"][
        "properties"])
    # Fewer labels clear it than the list can hold: nothing was left out, nothing is said.
    scores = [entry["score"] for entry in every["labels"]]
    some = classify(client, set="shapes", input=[item], threshold=(scores[1] + scores[2]) / 2)["data"][0]
    assert len(some["labels"]) == 2 and "omitted" not in some


def test_a_request_without_k_on_a_server_whose_max_k_is_under_the_default_gets_max_k_labels_not_a_400(build_app):
    client = build_app(max_k=3, rerank_candidates=3).test_client()  # classify's default k is 5, search's 10
    star = [{"type": "text", "text": "a star"}]
    assert [len(entry["labels"]) for entry in classify(client, set="shapes", input=star)["data"]] == [3]
    searched = client.post("/v1/search", json={"text": "a star"})
    assert searched.status_code == 200 and len(searched.json["hits"]) == 3, searched.json
    # A k the client sends over the limit is still its mistake.
    over = client.post("/v1/classify", json={"set": "shapes", "input": star, "k": 4})
    assert over.status_code == 400 and "field 'k' must be between 1 and 3 (max_k), got 4" in over.json["error"]["message"]


def test_images_go_through_the_micro_batcher_and_set_vectors_are_computed_once(client):
    items = [jpeg_b64(item.image) for item in iter_items(6, seed=FRESH_SEED)]
    images_before, texts_before = batch_items("image"), batch_items("text")
    classify(client, set="descriptions", input=items[:3])
    classify(client, set="descriptions", input=items[3:])
    assert batch_items("image") - images_before == 6
    # The set's 10 prompts went through the text batcher once (or not at all, had another test
    # computed them first): never once per request.
    assert batch_items("text") - texts_before in (0, 10)


def test_a_set_changed_under_a_running_app_is_used_at_its_new_version(build_app, tmp_path):
    folder = tmp_path / "sets"
    registry = PromptSetRegistry(folder)
    for path in sorted(EXAMPLE_PROMPT_SETS.iterdir()):
        registry.add(load_prompt_set(path))
    client = build_app(prompt_sets_dir=folder).test_client()
    star = [{"type": "text", "text": "a star"}]
    assert classify(client, set="shapes", input=star)["version"] == "1"
    classify(client, set="colors", input=star)
    texts_before = batch_items("text")
    edited = json.loads((folder / "shapes.json").read_text())
    edited.update(version="2", templates=["a drawing of a {}"])
    registry.add(PromptSet.from_dict(edited, source="edited"))  # as `prompts add` beside the server does
    body = classify(client, set="shapes", input=star)
    assert body["version"] == "2" and body["data"][0]["labels"][0]["label"] == "star"
    classify(client, set="colors", input=star)
    # Only the changed set was embedded again, its 5 prompts (the query text is in the text-vector cache).
    assert batch_items("text") - texts_before == 5


def test_a_set_whose_templates_changed_under_the_same_version_answers_another_fingerprint(build_app, tmp_path):
    folder = tmp_path / "sets"
    registry = PromptSetRegistry(folder)
    registry.add(load_prompt_set(EXAMPLE_PROMPT_SETS / "shapes.yaml"))
    client = build_app(prompt_sets_dir=folder).test_client()
    star = [{"type": "text", "text": "a star"}]
    before = classify(client, set="shapes", input=star)
    edited = json.loads((folder / "shapes.json").read_text())
    edited.update(templates=["a drawing of a {}"])  # version 1 still
    registry.add(PromptSet.from_dict(edited, source="edited"))
    after = classify(client, set="shapes", input=star)
    assert before["version"] == after["version"] == "1"
    assert before["data"][0]["labels"][0]["score"] != after["data"][0]["labels"][0]["score"]
    assert before["fingerprint"] != after["fingerprint"] == registry.get("shapes").fingerprint
    assert client.get("/v1/prompt-sets").json["data"][0]["fingerprint"] == after["fingerprint"]
    assert client.get("/v1/prompt-sets/shapes").json["fingerprint"] == after["fingerprint"]


def test_prompt_sets_are_listed_and_shown(client):
    listed = client.get("/v1/prompt-sets").json
    assert [(s["name"], s["labels"], s["prompts"]) for s in listed["data"]] == [
        ("colors", 8, 16), ("descriptions", 10, 10), ("shapes", 5, 15)]
    shown = client.get("/v1/prompt-sets/shapes").json
    assert shown["labels"] == ["circle", "square", "triangle", "star", "cross"]
    assert shown["templates"] == ["a {}", "a photo of a {}", "an image of a {}"] and shown["prompts"] == 15
    missing = client.get("/v1/prompt-sets/nope")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "prompt_set_not_found"


def test_a_set_removed_while_a_request_reads_it_is_left_out_or_not_found_not_a_500(build_app, tmp_path, monkeypatch):
    folder = tmp_path / "prompt-sets"
    registry = PromptSetRegistry(folder)
    for name in ("shapes.yaml", "colors.csv"):
        registry.add(load_prompt_set(EXAMPLE_PROMPT_SETS / name))
    client = build_app(prompt_sets_dir=folder).test_client()
    read_text = Path.read_text

    def removed_first(path, *args, **kwargs):  # `clip-sidecar prompts remove shapes`, between the stat and the read
        if path.name == "shapes.json":
            path.unlink(missing_ok=True)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", removed_first)
    listed = client.get("/v1/prompt-sets")
    assert listed.status_code == 200 and [s["name"] for s in listed.json["data"]] == ["colors"]
    registry.add(load_prompt_set(EXAMPLE_PROMPT_SETS / "shapes.yaml"))
    missing = client.post("/v1/classify", json={"set": "shapes", "input": [{"type": "text", "text": "a star"}]})
    assert missing.status_code == 404 and missing.json["error"]["code"] == "prompt_set_not_found"


def test_a_stored_set_this_version_cannot_use_answers_409_naming_it_and_the_field_and_is_left_out_of_the_listing(
        build_app, tmp_path):
    folder = tmp_path / "prompt-sets"
    registry = PromptSetRegistry(folder)
    for name in ("shapes.yaml", "colors.csv"):
        registry.add(load_prompt_set(EXAMPLE_PROMPT_SETS / name))
    stored = json.loads((folder / "shapes.json").read_text())
    (folder / "shapes.json").write_text(json.dumps({**stored, "locale": "en"}))  # a field of a newer version
    client = build_app(prompt_sets_dir=folder).test_client()
    listed = client.get("/v1/prompt-sets")
    assert listed.status_code == 200 and [s["name"] for s in listed.json["data"]] == ["colors"]
    star = [{"type": "text", "text": "a star"}]
    for response in (client.get("/v1/prompt-sets/shapes"), client.post("/v1/classify", json={"set": "shapes",
                                                                                              "input": star})):
        assert response.status_code == 409 and response.json["error"]["code"] == "prompt_set_unusable"
        message = response.json["error"]["message"]
        assert "stored prompt set 'shapes': unknown field 'locale'" in message and "prompts add" in message
        assert str(folder) not in message  # the server's folder is not the client's business
    registry.add(load_prompt_set(EXAMPLE_PROMPT_SETS / "shapes.yaml"))  # the remedy the message names
    assert classify(client, set="shapes", input=star)["data"][0]["labels"][0]["label"] == "star"


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"input": ["x"]}, 400, "field 'set' is required"),
    ({"set": "nope", "input": [{"type": "text", "text": "a"}]}, 404,
     "no prompt set named 'nope' on this server; available: colors, descriptions, shapes"),
    ({"set": "shapes", "input": ["red sneakers"]}, 400, "field 'input[0]' is not valid base64"),
    ({"set": "shapes", "input": [{"type": "text", "text": "a"}], "k": 0}, 400, "field 'k' must be between 1 and 1000"),
    ({"set": "shapes", "input": [{"type": "text", "text": "a"}], "threshold": 2}, 400,
     "field 'threshold' is a cosine similarity, between -1 and 1; got 2"),
    ({"set": "shapes", "input": [{"type": "text", "text": "a"}], "threshold": "high"}, 400,
     "field 'threshold' must be an integer or a number"),
    ({"set": "shapes", "input": ["a"] * 9, "modality": "text"}, 413, "over the limit of 8 (max_batch_items)"),
    ({"set": "shapes", "input": [{"type": "text", "text": "a"}], "labels": ["a"]}, 400, "unknown field 'labels'"),
    ({"set": "shapes", "input": [base64.b64encode(b"not an image").decode()]}, 415, "field 'input[0]'"),
])
def test_bad_requests_name_the_field(client, body, status, message):
    response = client.post("/v1/classify", json=body)
    assert response.status_code == status, response.json
    assert re.search(re.escape(message), response.json["error"]["message"]), response.json
