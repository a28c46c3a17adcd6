"""Zero-shot classification: POST /v1/classify (images and/or texts → the top labels of a named prompt set),
GET /v1/prompt-sets and /v1/prompt-sets/<name>."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from flask import Blueprint, jsonify, request

from sidecar.api.embeddings import ITEM_KINDS, input_items
from sidecar.api.state import current_state
from sidecar.api.validation import (
    bounded_int,
    choice,
    decode_images,
    image_bytes,
    json_body,
    known_fields,
    optional,
)
from sidecar.errors import BadRequest, PromptSetMissing, PromptSetUnusable, quoted
from sidecar.model.prompts import (
    UNREADABLE_REMEDY,
    PromptSet,
    PromptSetNotFound,
    PromptSetRegistry,
    PromptSetUnreadable,
    count_reaching,
    rank_labels,
)

bp = Blueprint("classify", __name__)

FIELDS = ("set", "input", "modality", "k", "threshold")
DEFAULT_LABELS = 5  # labels a classification answers without k or a threshold


@bp.post("/v1/classify")
def classify():
    state = current_state()
    settings = state.settings
    body = json_body(request, settings)
    known_fields(body, FIELDS)
    name = optional(body, "set", str)
    if name is None:
        raise BadRequest("field 'set' is required: the name of a prompt set (GET /v1/prompt-sets lists them)")
    # Plain strings are images here: a photo is what one classifies, and base64 sent as text would
    # rank labels for the base64 characters, silently.
    modality = choice(body, "modality", choices=ITEM_KINDS, default="image")
    items = input_items(body, modality=modality, limit=settings.max_batch_items)
    threshold = optional(body, "threshold", (int, float))
    if threshold is not None and not -1 <= threshold <= 1:
        raise BadRequest(f"field 'threshold' is a cosine similarity, between -1 and 1; got {threshold}")
    # With a threshold, every label that clears it (multi-label), unless k caps them.
    k = bounded_int(body, "k", default=DEFAULT_LABELS if threshold is None else settings.max_k, low=1,
                    high=settings.max_k, setting="max_k")
    prompt_set = _prompt_set(state.prompt_sets, name)

    texts = [(i, value) for i, (kind, value) in enumerate(items) if kind == "text"]
    images = [(i, image_bytes(value, field=f"input[{i}]", max_bytes=settings.max_body_bytes))
              for i, (kind, value) in enumerate(items) if kind == "image"]
    pixels = decode_images([(f"input[{i}]", data) for i, data in images], encoding=state.encoding,
                           settings=settings)
    encoder = state.encoding.encoder
    label_vectors = state.prompt_sets.vectors(prompt_set, model=encoder.name, weights=encoder.weights,
                                              encode=state.encoding.encode_prompt_texts,
                                              wait_s=settings.request_timeout_s)
    vectors = np.zeros((len(items), encoder.dim), dtype=np.float32)
    truncated: list[int] = []
    if texts:
        encoded = state.encoding.encode_texts([t for _, t in texts])
        vectors[[i for i, _ in texts]] = encoded.vectors
        truncated = [texts[j][0] for j in encoded.truncated]
    if images:
        vectors[[i for i, _ in images]] = state.encoding.encode_images(pixels)
    ranked = rank_labels(vectors, label_vectors, prompt_set.label_names, logit_scale=encoder.logit_scale, k=k,
                         threshold=threshold)
    data = [{"index": i, "type": kind, "labels": [asdict(score) for score in labels]}
            for i, ((kind, _), labels) in enumerate(zip(items, ranked))]
    if threshold is not None and k < len(prompt_set.labels):
        # The list stops at k (max_k when none was given): a set of more labels can have more that
        # clear the threshold, and a client reading the list as "every label that clears it" must be told.
        for entry, reaching in zip(data, count_reaching(vectors, label_vectors, threshold=threshold)):
            if reaching > len(entry["labels"]):
                entry["omitted"] = int(reaching) - len(entry["labels"])
    return jsonify({
        "object": "list",
        "set": prompt_set.name,
        "version": prompt_set.version,
        "fingerprint": prompt_set.fingerprint,
        "model": encoder.name,
        "weights": encoder.weights,
        "logit_scale": encoder.logit_scale,
        "data": data,
        "truncated": truncated,
    })


@bp.get("/v1/prompt-sets")
def list_prompt_sets():
    registry = current_state().prompt_sets
    return jsonify({"object": "list", "data": [_summary(prompt_set) for prompt_set in registry.sets()]})


@bp.get("/v1/prompt-sets/<name>")
def show_prompt_set(name: str):
    prompt_set = _prompt_set(current_state().prompt_sets, name)
    return jsonify({**prompt_set.to_dict(), "fingerprint": prompt_set.fingerprint, "prompts": prompt_set.prompt_count})


def _summary(prompt_set: PromptSet) -> dict:
    return {"name": prompt_set.name, "version": prompt_set.version, "fingerprint": prompt_set.fingerprint,
            "description": prompt_set.description,
            "labels": len(prompt_set.labels), "prompts": prompt_set.prompt_count}


def _prompt_set(registry: PromptSetRegistry, name: str) -> PromptSet:
    try:
        return registry.get(name)
    except PromptSetNotFound as exc:
        available = registry.names()
        # Not the registry's message: it names the server's folder.
        raise PromptSetMissing(f"no prompt set named {quoted(name)} on this server; available: "
                               f"{', '.join(available) if available else 'none'} (GET /v1/prompt-sets)") from exc
    except PromptSetUnreadable as exc:
        # Its problem, not the registry's message: that names the server's folder.
        raise PromptSetUnusable(f"{exc.problem}. This server's version cannot use the set (saved by a newer "
                                f"version, or edited by hand); its operator can {UNREADABLE_REMEDY}") from exc
