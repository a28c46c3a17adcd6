"""Online encoding: prompt template, text-vector cache, then the micro-batchers in front of the encoder.

A text request costs its thread a cache lookup in memory and, for texts nobody has, one hand-off
to the text batcher; the batcher thread reads the persistent cache once per batch, tokenises what
it lacks in one call and runs the forward (the cache's writer thread stores the new vectors)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from sidecar.config import Settings
from sidecar.model.encoder import Encoder, configured_weights_id
from sidecar.model.images import ImageDecodeError, decode_bytes, load_rgb
from sidecar.serving import metrics
from sidecar.serving.batching import MicroBatcher
from sidecar.serving.cache import CachedText, TextVectorCache, cache_namespace
from sidecar.serving.memory_budget import MemoryBudget

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TextVectors:
    vectors: np.ndarray
    truncated: list[int]  # indices of texts cut (to max_text_chars or to the model's context length)
    tokens: int  # tokens the model saw, summed over texts


def text_cache_namespaces(settings: Settings) -> list[str]:
    """The text-vector cache namespaces a server of these settings reads (its model's, and its fine
    model's), found without loading either model."""
    return [cache_namespace(model=model.model, weights=configured_weights_id(model),
                            prompt_template=settings.prompt_template, prompt_version=settings.prompt_version)
            for model in (settings, settings.fine_model_settings()) if model is not None]


class EncodingService:
    """What request handlers call; safe to call from many threads at once."""

    def __init__(self, encoder: Encoder, settings: Settings, *, role: metrics.ModelRole = "coarse",
                 decode_memory: MemoryBudget | None = None):
        """`role` is the `model` label of this service's series: "fine" for the fine-ranking model,
        whose batchers and cache would otherwise count under the coarse model's series.
        `decode_memory`: the worker's one decode_memory_bytes budget, where another service shares it
        (the fine model's decodes hold memory from the same budget as the coarse model's)."""
        self.encoder = encoder
        self.settings = settings
        if settings.cuda_graphs:
            encoder.text_tower.capture_graphs(settings.max_batch)
        if encoder.device.type == "cpu":
            # Process-wide (torch has no per-thread setting): a process that builds this service
            # is a serving process, and its forwards run on the batcher threads.
            torch.set_num_threads(settings.serve_torch_threads)
        encoder.text_tower.measure_cost()  # with the threads the forwards will run on
        self.cache = TextVectorCache(
            settings.text_cache_file(),
            namespace=cache_namespace(model=encoder.name, weights=encoder.weights,
                                      prompt_template=settings.prompt_template,
                                      prompt_version=settings.prompt_version),
            capacity=settings.text_cache_size, max_entries=settings.text_cache_max_entries, role=role)
        batching = dict(max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                        queue_items=settings.encode_queue_items(), role=role)
        self._texts = MicroBatcher(self.cache.through_disk(self._forward_texts), modality="text", **batching)
        self._images = MicroBatcher(self._forward_images, modality="image", **batching)
        self._text_passes = metrics.ForwardSeries("text", role)
        self._image_passes = metrics.ForwardSeries("image", role)
        self.decode_memory = decode_memory if decode_memory is not None else MemoryBudget(settings.decode_memory_bytes)

    @property
    def stopped(self) -> str | None:
        """None while both encode threads run; else why one stopped (the worker cannot serve)."""
        return self._texts.stopped or self._images.stopped

    def on_stop(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` when an encode thread dies (once per thread)."""
        self._texts.on_stop(callback)
        self._images.on_stop(callback)

    def encode_texts(self, texts: Sequence[str]) -> TextVectors:
        """Vectors for texts, cached or batched with other requests'. Each text is cut to max_text_chars
        before tokenising (the model keeps only its first context_length tokens anyway)."""
        limit, timeout_s = self.settings.max_text_chars, self.settings.request_timeout_s
        prompts = [self.settings.prompt(text[:limit]) for text in texts]
        entries = self.cache.get_or_compute(prompts, lambda missing: self._texts.submit(missing, timeout_s=timeout_s),
                                            timeout_s=timeout_s)
        context = self.encoder.context_length
        truncated = [i for i, entry in enumerate(entries) if entry.tokens > context or len(texts[i]) > limit]
        if truncated:
            # DEBUG: the response names them, and an ingest of long texts would log a line per request.
            log.debug("%d of %d texts exceed the model's %d-token context (or max_text_chars=%d) and were truncated",
                      len(truncated), len(texts), context, limit)
        return TextVectors(vectors=np.stack([entry.vector for entry in entries]) if entries
                           else np.zeros((0, self.encoder.dim), dtype=np.float32),
                           truncated=truncated, tokens=sum(min(entry.tokens, context) for entry in entries))

    def encode_prompt_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for a prompt set's prompts, as written (no prompt_template: the set has its own
        templates; not through the in-memory text-vector cache: the set's vectors are cached whole;
        the batcher's disk table keys each text as fed to the model, so it serves them like any
        text). Sent through the text batcher in turns of a quarter of queue_items, so a large set
        shares the model with requests and leaves most of the queue to them, each turn with its own
        request_timeout_s. (`serve` computes every set's vectors before the workers start: this is
        for sets added later.)"""
        turn = max(1, self.settings.encode_queue_items() // 4)
        parts = []
        for start in range(0, len(texts), turn):
            entries = self._texts.submit(list(texts[start:start + turn]), timeout_s=self.settings.request_timeout_s)
            parts.append(np.stack([entry.vector for entry in entries]))
        return np.concatenate(parts) if parts else np.zeros((0, self.encoder.dim), dtype=np.float32)

    def open_image(self, data: bytes) -> Image.Image:
        """Uploaded file bytes, header only: format (image_formats), declared size (max_image_pixels),
        resized size (max_resized_side), a progressive JPEG's scans (max_jpeg_scans) and decode memory
        (decode_memory_bytes) are checked before any pixel is decoded; ImageDecodeError names the one
        that failed. `image.size` is the size the decode will have (JPEGs decode at a reduced scale)."""
        settings = self.settings
        image = self.encoder.images.open(data, max_pixels=settings.max_image_pixels,
                                         max_resized_side=settings.max_resized_side, formats=settings.image_formats,
                                         max_scans=settings.max_jpeg_scans)
        if decode_bytes(image) > settings.decode_memory_bytes:
            raise ImageDecodeError(f"decoding this {image.width}x{image.height} image needs about "
                                   f"{decode_bytes(image)} bytes, over the limit of {settings.decode_memory_bytes} "
                                   "(decode_memory_bytes)", kind="too_large")
        return image

    def decode_image(self, image: Image.Image) -> np.ndarray:
        """An image from `open_image` → model pixels, decoded as the embed job decodes files. Runs in the
        request thread (the model thread only runs forwards), holding the decode's estimated memory
        from the worker's decode_memory_bytes meanwhile: Overloaded (503) if no room frees up within
        request_timeout_s."""
        with self.decode_memory.reserve(decode_bytes(image), timeout_s=self.settings.request_timeout_s):
            return self.encoder.images.pixels(load_rgb(image))

    def encode_images(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Vectors for model pixels from `decode_image`, batched with other requests'."""
        return self._images.submit(list(pixels), timeout_s=self.settings.request_timeout_s)

    def _forward_texts(self, prompts: Sequence[str]) -> list[CachedText]:
        """On the text batcher's thread: tokenise the batch in one call, then one forward pass."""
        with self._text_passes.timed(len(prompts)):
            prepared = self.encoder.prepare_texts(prompts)
            with self._text_passes.cpu():
                vectors = self.encoder.postprocess(self.encoder.forward_texts(prepared.tokens))
        return [CachedText(vector, tokens) for vector, tokens in zip(vectors, prepared.lengths)]

    def _forward_images(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        with self._image_passes.timed(len(pixels)):
            batch = np.stack(pixels)
            with self._image_passes.cpu():
                return self.encoder.postprocess(self.encoder.forward_images(batch))

    def close(self) -> None:
        self._texts.close()
        self._images.close()
        self.cache.close()
