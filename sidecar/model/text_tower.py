"""The text tower as the encoder runs it: open_clip's encode_text on each batch's longest text where
the tower allows it, as forwards of similar width once its cost is measured (`text_split`), or
replayed from CUDA graphs (`text_graphs`, GPU serving)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import numpy as np
import torch

from sidecar.model.text_split import ForwardCost, width_groups

log = logging.getLogger(__name__)


def pools_a_causal_prefix(model: torch.nn.Module) -> bool:
    """Whether the text tower's output for a text depends only on its tokens up to the pooled one:
    open_clip's CLIP with a causal attention mask (each position sees only those before it), pooling
    at the end-of-text token ('argmax': the highest id; 'eos': the first eos id). Such a tower gives
    the same vectors on any prefix of the tokens that holds every text's pooled position. Towers
    that see the whole context (SigLIP's bidirectional one, Hugging Face text models) do not."""
    from open_clip.model import CLIP

    return (isinstance(model, CLIP) and getattr(model, "attn_mask", None) is not None
            and model.text_pool_type in ("argmax", "eos"))


def pooled_positions(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's pooled position, chosen as open_clip's text_global_pool chooses it."""
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == model.text_eos_id).int().argmax(dim=-1)


def encode_text_prefix(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text (3.3.0) on the first `tokens.shape[1]` positions of the context:
    the positional embedding and the causal mask cut to that width, the rest as encode_text does it.
    Only for towers `pools_a_causal_prefix` accepts, with every row's pooled position in `tokens`
    (tests/unit/model/test_encoder_text.py holds it equal to encode_text)."""
    from open_clip.transformer import text_global_pool

    width = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:width].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:width, :width])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=model.text_eos_id)
    if model.text_projection is None:
        return x
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


class TextTower:
    """Text features (not normalised) for token ids, on the model's device and precision."""

    def __init__(self, model: torch.nn.Module, *, tokenizer, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        self.model = model
        self.tokenizer = tokenizer  # open_clip's: only to build the texts measure_cost() times
        self.context_length = int(tokenizer.context_length)
        self.device = device
        self.autocast = autocast
        self.prefix_only = pools_a_causal_prefix(model)
        self.graphs = None  # TextGraphs once capture_graphs() ran (GPU serving)
        self.cost: ForwardCost | None = None  # measure_cost() sets it (serving)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features for host token ids [n, context_length]."""
        if self.graphs is not None and tokens.shape[0] <= self.graphs.sizes[-1]:
            return self.graphs(tokens)  # captured at the whole context's width
        if not (self.prefix_only and tokens.shape[0]):
            return self.run(tokens.to(self.device, non_blocking=True))
        # Queries are a few tokens of a 77-token context: the tower runs on the batch's longest text
        # instead (ViT-B-32 served on CPU: x1.8-1.9 queries/s one at a time, x3 at concurrency 16;
        # bench/RESULTS.md) — or, once the forward's cost is measured, on groups of similar width
        # where one long text would make the whole batch pay for its width.
        widths = (pooled_positions(self.model, tokens) + 1).numpy()
        groups = [] if self.cost is None else width_groups(widths, self.cost.fixed_token_rows)
        if len(groups) < 2:
            return self.run(tokens[:, :widths.max()].to(self.device, non_blocking=True))
        parts = [self.run(tokens[rows, :widths[rows].max()].to(self.device, non_blocking=True)) for rows in groups]
        return torch.cat(parts)[torch.from_numpy(np.argsort(np.concatenate(groups)))]

    def run(self, tokens: torch.Tensor) -> torch.Tensor:
        """One forward of `tokens` on the device as they are: the whole context, or (towers that pool
        a causal prefix) a prefix holding every row's pooled position."""
        with torch.inference_mode(), self.autocast():
            if self.prefix_only and tokens.shape[1] < self.context_length:
                return encode_text_prefix(self.model, tokens)
            return self.model.encode_text(tokens)

    def capture_graphs(self, max_batch: int) -> None:
        """Capture CUDA graphs of the tower for batches of 1..max_batch (GPU only; a no-op on CPU)."""
        if self.device.type != "cuda":
            return
        from sidecar.model.text_graphs import TextGraphs, bucket_sizes

        started = time.perf_counter()
        try:
            self.graphs = TextGraphs(self.run, context_length=self.context_length, device=self.device,
                                     sizes=bucket_sizes(max_batch))
        except RuntimeError as exc:  # an op the graph cannot hold: serve eagerly, slower but correct
            log.warning("CUDA graph capture of the text tower failed, running it eagerly: %s", exc)
            return
        log.info("captured text-tower CUDA graphs for batch sizes %s in %.1f s",
                 self.graphs.sizes, time.perf_counter() - started)

    def measure_cost(self) -> None:
        """Time the tower (under a second for ViT-B-32 on CPU) so that a batch of mixed text lengths
        is split where two forwards cost less than one (`sidecar.model.text_split`). For serving,
        after `capture_graphs`: batches the graphs replay run at the whole context whatever they
        hold, so with graphs — and for towers that always run whole — it does nothing."""
        if not self.prefix_only or self.graphs is not None:
            return
        narrow = self.tokenizer(["a photo of red sneakers"])
        narrow = narrow[:, :int(pooled_positions(self.model, narrow).max()) + 1]
        wide = self.tokenizer(["a photo " * self.context_length] * max(1, 256 // self.context_length))
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        self.cost = ForwardCost.measure(lambda tokens: self.run(tokens.to(self.device)), narrow=narrow, wide=wide,
                                        synchronize=synchronize)
        if self.cost is None:
            log.info("text forward cost unclear from its timings: batches of mixed text lengths run whole")
            return
        log.info("text forward on %s: %.2f ms + %.4f ms per token of each text; a batch of mixed lengths "
                 "is split where that saves more than %.0f padded tokens", self.device, self.cost.fixed_ms,
                 self.cost.per_token_row_ms, self.cost.fixed_token_rows)
