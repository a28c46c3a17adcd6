"""Online encoding: prompt template, text-vector cache, then the micro-batchers in front of the encoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from sidecar.config import Settings
from sidecar.model.encoder import Encoder
from sidecar.serving.batching import MicroBatcher
from sidecar.serving.cache import TextVectorCache, cache_namespace

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TextVectors:
    vectors: np.ndarray
    truncated: list[int]  # indices of texts cut to the model's context length
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

    @property
    def stopped(self) -> str | None:
        """None while both encode threads run; else why one stopped (the worker cannot serve)."""
        return self._texts.stopped or self._images.stopped

    def on_stop(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` when an encode thread dies (once per thread)."""
        self._texts.on_stop(callback)
        self._images.on_stop(callback)

    def encode_texts(self, texts: Sequence[str]) -> TextVectors:
        prompts = [self.settings.prompt(text) for text in texts]
        prepared = {p: self.encoder.prepare_text(p) for p in prompts}
        truncated = [i for i, p in enumerate(prompts) if prepared[p].truncated]
        if truncated:
            log.info("%d of %d texts exceed the model's %d-token context and were truncated",
                     len(truncated), len(texts), self.encoder.context_length)

        def encode_missing(missing: list[str]) -> np.ndarray:
            return self._texts.submit([prepared[p].tokens for p in missing], timeout_s=self.settings.request_timeout_s)

        tokens = sum(min(prepared[p].length, self.encoder.context_length) for p in prompts)
        vectors = self.cache.get_or_compute(prompts, encode_missing, timeout_s=self.settings.request_timeout_s)
        return TextVectors(vectors=vectors, truncated=truncated, tokens=tokens)

    def decode_image(self, data: bytes) -> np.ndarray:
        """Uploaded file bytes → model pixels, decoded as the embed job decodes files (ImageDecodeError
        if unusable). Runs in the request thread, so the model thread only runs forwards."""
        return self.encoder.images.decode(data, max_pixels=self.settings.max_image_pixels)

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
