"""Online encoding: prompt template, text-vector cache, then the micro-batchers in front of the encoder."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from sidecar.config import Settings
from sidecar.errors import EncodeTimeout
from sidecar.model.encoder import Encoder
from sidecar.model.images import ImageDecodeError, decode_bytes, load_rgb
from sidecar.serving.batching import MicroBatcher
from sidecar.serving.cache import TextVectorCache, cache_namespace
from sidecar.serving.memory_budget import MemoryBudget

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TextVectors:
    vectors: np.ndarray
    truncated: list[int]  # indices of texts cut (to max_text_chars or to the model's context length)
    tokens: int  # tokens the model saw, summed over texts


class EncodingService:
    """What request handlers call; safe to call from many threads at once."""

    def __init__(self, encoder: Encoder, settings: Settings):
        self.encoder = encoder
        self.settings = settings
        if settings.cuda_graphs:
            encoder.capture_text_graphs(settings.max_batch)
        if encoder.device.type == "cpu":
            # Process-wide (torch has no per-thread setting): a process that builds this service
            # is a serving process, and its forwards run on the batcher threads.
            torch.set_num_threads(settings.serve_torch_threads)
        batching = dict(max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                        queue_items=settings.encode_queue_items())
        self._texts = MicroBatcher(self._forward_texts, modality="text", **batching)
        self._images = MicroBatcher(self._forward_images, modality="image", **batching)
        self.cache = TextVectorCache(
            settings.text_cache_file(),
            namespace=cache_namespace(model=encoder.name, weights=encoder.weights,
                                      prompt_template=settings.prompt_template,
                                      prompt_version=settings.prompt_version),
            capacity=settings.text_cache_size, max_entries=settings.text_cache_max_entries)
        self.decode_memory = MemoryBudget(settings.decode_memory_bytes)

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
        before tokenising (the model keeps only its first context_length tokens anyway); tokenising
        that outlasts request_timeout_s answers 504 before the encode, which has its own
        request_timeout_s in the batcher."""
        started = time.monotonic()
        limit, timeout_s = self.settings.max_text_chars, self.settings.request_timeout_s
        prompts = [self.settings.prompt(text[:limit]) for text in texts]
        prepared = {p: self.encoder.prepare_text(p) for p in prompts}
        truncated = [i for i, p in enumerate(prompts) if prepared[p].truncated or len(texts[i]) > limit]
        if truncated:
            log.info("%d of %d texts exceed the model's %d-token context (or max_text_chars=%d) and were truncated",
                     len(truncated), len(texts), self.encoder.context_length, limit)
        if time.monotonic() - started > timeout_s:
            raise EncodeTimeout(f"tokenising {len(texts)} texts took longer than request_timeout_s={timeout_s}")

        def encode_missing(missing: list[str]) -> np.ndarray:
            return self._texts.submit([prepared[p].tokens for p in missing], timeout_s=self.settings.request_timeout_s)

        tokens = sum(min(prepared[p].length, self.encoder.context_length) for p in prompts)
        vectors = self.cache.get_or_compute(prompts, encode_missing, timeout_s=self.settings.request_timeout_s)
        return TextVectors(vectors=vectors, truncated=truncated, tokens=tokens)

    def encode_prompt_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for a prompt set's prompts, as written (no prompt_template: the set has its own
        templates; no text-vector cache: the set's vectors are cached whole). Sent through the text
        batcher in turns of a quarter of queue_items, so a large set shares the model with requests
        and leaves most of the queue to them, each turn with its own request_timeout_s. (`serve`
        computes every set's vectors before the workers start: this is for sets added later.)"""
        turn = max(1, self.settings.encode_queue_items() // 4)
        parts = []
        for start in range(0, len(texts), turn):
            tokens = [self.encoder.prepare_text(text).tokens for text in texts[start:start + turn]]
            parts.append(self._texts.submit(tokens, timeout_s=self.settings.request_timeout_s))
        return np.concatenate(parts) if parts else np.zeros((0, self.encoder.dim), dtype=np.float32)

    def open_image(self, data: bytes) -> Image.Image:
        """Uploaded file bytes, header only: format (image_formats), declared size (max_image_pixels),
        resized size (max_resized_side) and decode memory (decode_memory_bytes) are checked before
        any pixel is decoded; ImageDecodeError names the one that failed. `image.size` is the size the
        decode will have (JPEGs decode at a reduced scale)."""
        settings = self.settings
        image = self.encoder.images.open(data, max_pixels=settings.max_image_pixels,
                                         max_resized_side=settings.max_resized_side, formats=settings.image_formats)
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

    def _forward_texts(self, tokens: Sequence[torch.Tensor]) -> np.ndarray:
        return self.encoder.postprocess(self.encoder.forward_texts(torch.stack(list(tokens))))

    def _forward_images(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        return self.encoder.postprocess(self.encoder.forward_images(np.stack(pixels)))

    def close(self) -> None:
        self._texts.close()
        self._images.close()
        self.cache.close()
