"""Zero-shot accuracy of prompt sets on a labelled sample (top-1 / top-5), so template choices are measured."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from sidecar.model.encoder import FORWARD_CHUNK, Encoder
from sidecar.model.images import ImageDecodeError
from sidecar.model.prompts import PromptSet, PromptSetRegistry, rank_labels
from sidecar.retrieval.relevance import EvaluationInputError
from sidecar.retrieval.report import Table

TOP = (1, 5)


@dataclass(frozen=True, slots=True)
class PromptSetAccuracy:
    set: str
    version: str
    labels: int
    prompts: int
    samples: int
    top1: float
    top5: float
    chance_top1: float  # what guessing scores: 1 / labels
    per_label: dict[str, dict[str, float]]  # true label -> {"samples", "top1"}
    seconds: float  # ranking the sample's vectors against the set (the images are encoded once for every set)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def encode_labelled_images(encoder: Encoder, paths: Sequence[Path], *, max_pixels: int,
                           progress: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """Image vectors of the sample's usable images, decoded as the embed job decodes its files, and why
    each other one (by its index in `paths`) is unusable: skipped and counted, as embed skips them."""
    parts, unusable = [], {}
    with tqdm(total=len(paths), unit="img", desc="encode sample", disable=not progress) as bar:
        for start in range(0, len(paths), FORWARD_CHUNK):
            images = []
            for index in range(start, min(start + FORWARD_CHUNK, len(paths))):
                try:
                    images.append(encoder.images.load(paths[index].read_bytes(), max_pixels=max_pixels))
                except OSError as exc:
                    unusable[index] = f"cannot read file: {exc.strerror}"
                except ImageDecodeError as exc:
                    unusable[index] = exc.reason
            parts.append(encoder.encode_images(images))
            bar.update(min(FORWARD_CHUNK, len(paths) - start))
    return (np.concatenate(parts) if parts else np.zeros((0, encoder.dim), dtype=np.float32)), unusable


def prompt_set_accuracy(prompt_set: PromptSet, label_vectors: np.ndarray, image_vectors: np.ndarray,
                        truths: Sequence[str], *, logit_scale: float) -> PromptSetAccuracy:
    """Top-1 and top-5 accuracy of the set's labels on images whose true labels are `truths`."""
    unknown = sorted(set(truths) - set(prompt_set.label_names))
    if unknown:
        names = prompt_set.label_names
        raise EvaluationInputError(f"the sample's labels {', '.join(map(repr, unknown[:5]))} are not labels of prompt "
                                   f"set {prompt_set.name!r} ({', '.join(names[:10] + ['…'] * (len(names) > 10))})")
    started = time.perf_counter()
    ranked = rank_labels(image_vectors, label_vectors, prompt_set.label_names, logit_scale=logit_scale, k=max(TOP))
    hits = {k: [truth in [label.label for label in labels[:k]] for truth, labels in zip(truths, ranked)] for k in TOP}
    seconds = time.perf_counter() - started
    per_label: dict[str, dict[str, float]] = {}
    for truth, hit in zip(truths, hits[1]):
        entry = per_label.setdefault(truth, {"samples": 0, "top1": 0.0})
        entry["samples"] += 1
        entry["top1"] += hit
    for entry in per_label.values():
        entry["top1"] /= entry["samples"]
    return PromptSetAccuracy(set=prompt_set.name, version=prompt_set.version, labels=len(prompt_set.labels),
                             prompts=prompt_set.prompt_count, samples=len(truths),
                             top1=float(np.mean(hits[1])), top5=float(np.mean(hits[5])),
                             chance_top1=1 / len(prompt_set.labels), per_label=dict(sorted(per_label.items())),
                             seconds=seconds)


def score_prompt_sets(encoder: Encoder, registry: PromptSetRegistry, names: Sequence[str],
                      sample: Sequence[tuple[Path, str]], *, max_pixels: int,
                      progress: bool = False) -> tuple[list[PromptSetAccuracy], list[tuple[Path, str]]]:
    """Each named set's accuracy on the same labelled sample (image path, true label), and the images
    skipped as unusable (path, why)."""
    if not sample:
        raise EvaluationInputError("the labelled sample holds no images")
    sets = [registry.get(name) for name in names]
    vectors, unusable = encode_labelled_images(encoder, [path for path, _ in sample], max_pixels=max_pixels,
                                               progress=progress)
    skipped = [(sample[index][0], reason) for index, reason in sorted(unusable.items())]
    if len(skipped) == len(sample):
        raise EvaluationInputError(f"none of the {len(sample)} images of the labelled sample is usable "
                                   f"(e.g. {skipped[0][0]}: {skipped[0][1]})")
    truths = [label for index, (_, label) in enumerate(sample) if index not in unusable]
    return [prompt_set_accuracy(s, registry.vectors(s, model=encoder.name, weights=encoder.weights,
                                                    encode=encoder.encode_texts),
                                vectors, truths, logit_scale=encoder.logit_scale) for s in sets], skipped


def accuracy_table(results: Sequence[PromptSetAccuracy]) -> Table:
    """For `sidecar.retrieval.report.markdown`: one row per set."""
    header = ["prompt set", "version", "labels", "prompts", "samples", "top-1", "top-5", "chance top-1"]
    rows = [[r.set, r.version, str(r.labels), str(r.prompts), str(r.samples), f"{r.top1:.3f}", f"{r.top5:.3f}",
             f"{r.chance_top1:.3f}"] for r in results]
    return header, rows
