"""The CLIP encoder: open_clip loading, and pre (tokenise/resize) / core (forward) / post (normalise) stages."""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from sidecar.config import Settings
from sidecar.model.images import ImagePreprocess
from sidecar.model.text_tower import TextTower
from sidecar.model.weights import ModelSettingsError
from sidecar.types import ModelSignature

log = logging.getLogger(__name__)

# Largest batch one forward pass takes; callers may hand in more, the encoder chunks.
FORWARD_CHUNK = 256
# Words whose BPE split the tokenizer remembers (a few hundred bytes each): plenty for any real
# vocabulary of queries, a bound against clients sending endless unique words.
BPE_CACHE_WORDS = 100_000


class _BoundedBpeCache(dict):
    """open_clip's SimpleTokenizer memoises the BPE split of every word it ever saw in a plain dict,
    which in a server grows with every unique word clients send. Same memo, the oldest words
    dropped past `capacity`; the special tokens it starts with stay (they must never be split)."""

    def __init__(self, pinned: dict, capacity: int):
        super().__init__(pinned)
        self._pinned = frozenset(pinned)
        self._capacity = capacity + len(pinned)
        self._lock = threading.Lock()  # request threads tokenise concurrently

    def __setitem__(self, key, value) -> None:
        with self._lock:
            super().__setitem__(key, value)
            if len(self) > self._capacity:
                # Insertion order: the pinned tokens first, then the oldest word.
                oldest = next(k for k in self if k not in self._pinned)
                del self[oldest]


def _bound_bpe_cache(tokenizer, capacity: int) -> None:
    cache = getattr(tokenizer, "cache", None)
    if type(cache) is dict:  # SimpleTokenizer; Hugging Face tokenizers keep no such memo
        tokenizer.cache = _BoundedBpeCache(cache, capacity)


# Pieces (runs of letters, of punctuation) longer than this go to `_long_word_bpe`; shorter ones,
# nearly every word, to open_clip's own BPE.
LONG_WORD_CHARS = 64


def _long_word_bpe(tokenizer) -> Callable[[str], str]:
    """open_clip's SimpleTokenizer.bpe, the same splits in O(n log n) for a word of n characters where
    open_clip's takes O(n²): each of its merge steps finds the best-ranked pair over the whole word and
    rebuilds it. A word of 4,096 random letters (a text of max_text_chars, all one piece) took 0.37 s,
    on the batcher's thread, so one request of 64 such texts held every request of the worker past
    request_timeout_s. Here a heap holds the pairs; each step takes every pair of the lowest rank left
    to right, as open_clip's does, before the pairs those merges make join the heap."""
    original, ranks, memo = tokenizer.bpe, tokenizer.bpe_ranks, tokenizer.cache

    def bpe(token: str) -> str:
        if len(token) <= LONG_WORD_CHARS:
            word = memo.get(token)  # as open_clip's looks it up, without a second call for each word
            return original(token) if word is None else word
        symbols: list[str | None] = [*token[:-1], token[-1] + "</w>"]
        following = [*range(1, len(symbols)), -1]
        preceding = list(range(-1, len(symbols) - 1))
        heap = [(rank, i) for i in range(len(symbols) - 1)
                if (rank := ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank, merged = heap[0][0], []
            while heap and heap[0][0] == rank:  # in position order: a symbol keeps its first character's
                i = heapq.heappop(heap)[1]
                j = following[i]
                if symbols[i] is None or j < 0 or ranks.get((symbols[i], symbols[j])) != rank:
                    continue  # a pair a merge has changed since
                symbols[i], symbols[j] = symbols[i] + symbols[j], None
                following[i] = following[j]
                if following[j] >= 0:
                    preceding[following[j]] = i
                merged.append(i)
            for i in merged:
                for left, right in ((preceding[i], i), (i, following[i])):
                    if left >= 0 and right >= 0 and (pair := ranks.get((symbols[left], symbols[right]))) is not None:
                        heapq.heappush(heap, (pair, left))
        # Not memoised: the memo counts words, and 100,000 words of max_text_chars held about 1 GB; such a word
        # is split again in milliseconds, and a text sent again is the text-vector cache's.
        return " ".join(symbol for symbol in symbols if symbol is not None)

    return bpe


# Printable ASCII but '&': text that ftfy.fix_text and html.unescape return unchanged (ftfy's fixes
# concern non-ASCII text, control characters, line breaks and HTML entities).
_PLAIN_TEXT = re.compile(r"[ -%'-~]*")


def _plain_text_encoder(tokenizer) -> Callable[[str], list[int]]:
    """open_clip's SimpleTokenizer.encode, about five times faster for plain text (printable ASCII
    without '&': most queries and product titles). SimpleTokenizer cleans every text with ftfy and
    html.unescape (twice), then splits it with Unicode classes of the `regex` module and maps each
    piece's bytes to its alphabet: for plain text the cleaning changes nothing, the Unicode classes
    match what these ASCII ones do on the lowercased text, and the byte map is the identity on
    printable ASCII (spaces never reach it), so the same pieces go to the tokenizer's own BPE. Other
    text takes open_clip's path. tests/unit/model/test_encoder_text.py checks the equality over
    generated texts."""
    from open_clip import tokenizer as open_clip_tokenizer

    # open_clip's private "lower" cleaning (ftfy, html.unescape, whitespace, lowercase): pinned in
    # pyproject.toml; should a release rename it, every text takes open_clip's path.
    lower = getattr(open_clip_tokenizer, "_clean_lower", None)
    specials = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
    if lower is None or tokenizer.clean_fn is not lower or not all(re.fullmatch(r"[a-z_<>]+", t) for t in specials):
        return tokenizer.encode  # another cleaning, or special tokens these patterns would not match alike
    # open_clip's pattern with ASCII classes: \p{L} is a-z once lowercased, \p{N} 0-9.
    pieces = re.compile("|".join(specials) + r"|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", re.IGNORECASE)
    vocabulary, bpe = tokenizer.encoder, tokenizer.bpe

    def encode(text: str) -> list[int]:
        if not _PLAIN_TEXT.fullmatch(text):
            return tokenizer.encode(text)
        return [vocabulary[part] for piece in pieces.findall(text.lower()) for part in bpe(piece).split(" ")]

    return encode


@dataclass(frozen=True, slots=True)
class PreparedTexts:
    tokens: torch.Tensor  # [n, context_length] int64
    lengths: list[int]  # tokens before truncation per text, start and end tokens included


class Encoder:
    """A loaded open_clip model with batched, L2-normalised text and image encoding."""

    def __init__(self, model: torch.nn.Module, *, tokenizer, preprocess, name: str, weights: str,
                 device: torch.device, precision: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.weights = weights
        self.device = device
        self.precision = precision
        self.context_length = int(tokenizer.context_length)
        _bound_bpe_cache(tokenizer, BPE_CACHE_WORDS)
        simple = _is_simple_tokenizer(tokenizer)
        if simple:
            tokenizer.bpe = _long_word_bpe(tokenizer)  # before the plain-text path takes it
        # The plain-text path truncates: a tokenizer with a reduction strategy chooses its tokens itself.
        plain = simple and tokenizer.reduction_fn is None
        self._encode_text = _plain_text_encoder(tokenizer) if plain else None
        # Serving captures its CUDA graphs and measures its cost (for splitting mixed batches).
        self.text_tower = TextTower(self.model, tokenizer=tokenizer, device=device, autocast=self._autocast)
        self.images = ImagePreprocess(preprocess)
        # Normalisation runs on the model's device, over the whole batch, after a uint8 copy.
        self._mean = torch.tensor(self.images.mean, device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.images.std, device=device).view(1, 3, 1, 1) * 255.0
        with torch.inference_mode():
            probe = self.forward_texts(self.tokenizer([""]))
        self.dim = int(probe.shape[-1])
        self.signature = ModelSignature(model=name, weights=weights, dim=self.dim)
        self.logit_scale = _logit_scale(model)

    # ---- pre: CPU work, safe to run in request threads or worker processes ----
    def prepare_texts(self, texts: Sequence[str]) -> PreparedTexts:
        """Token ids [n, context_length] and each text's full token count, from one tokenisation."""
        tokenizer = self.tokenizer
        if self._encode_text is not None:
            # open_clip's SimpleTokenizer.__call__, its truncation included, with one array for the
            # batch instead of a tensor per text (which took as long as the tokenising itself).
            start, end = tokenizer.sot_token_id, tokenizer.eot_token_id
            ids = [[start, *self._encode_text(text), end] for text in texts]
            out = np.zeros((len(texts), self.context_length), dtype=np.int64)
            for row, sequence in zip(out, ids):
                if len(sequence) > self.context_length:
                    sequence = sequence[:self.context_length]
                    sequence[-1] = end
                row[:len(sequence)] = sequence
            return PreparedTexts(tokens=torch.from_numpy(out), lengths=[len(sequence) for sequence in ids])
        tokens = tokenizer(list(texts))
        lengths = []
        for text, row in zip(texts, tokens):
            if int(row[-1]) == 0:  # padding left at the end: nothing was cut
                lengths.append(int(row.nonzero().max()) + 1)
            else:
                encode = getattr(tokenizer, "encode", None)
                # A tokenizer without `encode`: a sequence that fills the context was (probably) cut.
                lengths.append(len(encode(text)) + 2 if encode is not None else self.context_length + 1)
        return PreparedTexts(tokens=tokens, lengths=lengths)

    # ---- core: forward passes on the model's device and precision ----
    def forward_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text features (not normalised) for host token ids [n, context_length] from `prepare_texts`."""
        return self.text_tower(tokens)

    def forward_images(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Forward a uint8 batch [B, H, W, 3] of model pixels (`sidecar.model.images`), host or device."""
        batch = torch.as_tensor(pixels)
        if batch.device.type == "cpu" and self.device.type == "cuda":
            batch = batch.pin_memory()  # lets the copy below run asynchronously
        batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        batch = (batch - self._mean) / self._std
        with torch.inference_mode(), self._autocast():
            return self.model.encode_image(batch)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            # No weight-cast cache: CUDA graph capture needs the casts inside the graph, and
            # each weight is used once per forward anyway.
            return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=False)
        return contextlib.nullcontext()

    # ---- post: normalise once, here, so every store can use inner product ----
    @staticmethod
    def postprocess(features: torch.Tensor) -> np.ndarray:
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        if features.device.type == "cuda":
            # A plain .cpu() spin-waits for the GPU, burning a core per waiting thread — with
            # several serving workers, the cores their request threads need. A blocking event
            # sleeps until the copy lands instead.
            host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
            host.copy_(features, non_blocking=True)
            done = torch.cuda.Event(blocking=True)
            done.record()
            done.synchronize()
            return host.numpy().copy()  # hand the pinned block back to torch's cache at once
        return features.detach().cpu().numpy()

    # ---- whole pipeline, for callers that hold all inputs at once ----
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = [self.postprocess(self.forward_texts(self.prepare_texts(chunk).tokens))
               for chunk in _chunks(texts, FORWARD_CHUNK)]
        return np.concatenate(out)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Vectors for decoded RGB images (in memory); files and uploads go through `encode_image_files`."""
        return self.encode_pixels([self.images.pixels(image) for image in images])

    def encode_image_files(self, datas: Sequence[bytes], *, max_pixels: int) -> np.ndarray:
        """Vectors for image file bytes, decoded as the embed job decodes them (ImageDecodeError if unusable)."""
        return self.encode_pixels([self.images.decode(data, max_pixels=max_pixels) for data in datas])

    def encode_pixels(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Vectors for uint8 model pixels (`images.decode`), forwarded in chunks."""
        if not pixels:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = [self.postprocess(self.forward_images(np.stack(chunk))) for chunk in _chunks(pixels, FORWARD_CHUNK)]
        return np.concatenate(out)


def _is_simple_tokenizer(tokenizer) -> bool:
    """open_clip's own BPE tokenizer, whose internals `_long_word_bpe` and `_plain_text_encoder` use."""
    from open_clip.tokenizer import SimpleTokenizer

    return isinstance(tokenizer, SimpleTokenizer)


def _logit_scale(model: torch.nn.Module) -> float:
    """The model's learnt temperature (open_clip keeps its log): zero-shot probabilities are a softmax of
    cosine similarities times it. Models without one get CLIP's ceiling, 100."""
    log_scale = getattr(model, "logit_scale", None)
    if log_scale is None:
        log.warning("%s has no logit_scale: zero-shot probabilities use CLIP's 100", type(model).__name__)
        return 100.0
    return float(torch.as_tensor(log_scale).detach().float().exp())


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def resolve_device(name: str) -> torch.device:
    """The torch device a `device` setting names, refused in one line (ModelSettingsError) where this machine
    has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelSettingsError(f"{_DEVICE_SETTING} is {name!r}, but this machine has no CUDA device: "
                                     "use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ModelSettingsError(f"{_DEVICE_SETTING} is {name!r}, but this machine has {count} CUDA "
                                     f"device(s): cuda:0 to cuda:{count - 1}")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name != "fp32" and device.type == "cpu":
            raise ModelSettingsError(f"--precision / SIDECAR_PRECISION is {name!r}, which needs a GPU, and the "
                                     "model runs on the CPU: use fp32 or auto")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


_DEVICE_SETTING = "--device / SIDECAR_DEVICE"

# The seed random weights are drawn from (load_encoder): "random" names one model, not one per process.
RANDOM_INIT_SEED = 0


def weights_id(pretrained: str) -> str:
    """A stable name for the weights: the tag itself, the checkpoint file's content hash, or "random"
    (drawn from RANDOM_INIT_SEED; random weights of a model config's architecture: weights.random_weights_id)"""
    path = Path(pretrained)
    if not path.is_file():
        return pretrained or "random"
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def configured_weights_id(settings: Settings) -> str:
    """The weights id load_encoder gives the settings' model, found without loading it (a checkpoint file
    is hashed): a tiny model without `pretrained` has its trained checkpoint's, random weights
    weights.random_weights_id (which tells the model config's architectures apart)."""
    from sidecar.model.tiny_model import RECIPES, checkpoint_path

    if settings.model in RECIPES and not settings.pretrained:
        return _weights_id_of(settings, str(checkpoint_path(settings.cache_dir, model=settings.model)))
    return _weights_id_of(settings, settings.pretrained)


def _weights_id_of(settings: Settings, pretrained: str) -> str:
    """weights_id of `pretrained` (the file loaded, the tag), random weights' weights.random_weights_id; a checkpoint
    file loaded into an architecture of the model config adds that config's digest: one file loads into two configs
    of one name (an activation or a pooling changed) as two models, which the text-vector cache and the store must
    not take for one another."""
    from sidecar.model.weights import custom_config_digest, random_weights_id

    if not pretrained:
        return random_weights_id(settings)
    digest = custom_config_digest(settings)
    return weights_id(pretrained) + (f"+config:{digest}" if digest is not None else "")


class _RandomInitWarning(logging.Filter):
    """open_clip's "No pretrained weights loaded … initialized randomly", logged on the root logger: said
    once in the project's words instead (weights.random_weights_notice), which name the flag that fixes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    root, quiet = logging.getLogger(), _RandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def load_encoder(settings: Settings, *, fetch: bool = True, fine: bool = False) -> Encoder:
    """Load the configured model: by name + pretrained tag, a checkpoint file, or the tiny model.

    fetch=True downloads missing weights (or trains the tiny model) first, as the command-line
    tools do (FetchFailed says why a download failed); fetch=False (the server) loads only what is
    cached and raises ModelNotCached, naming the command to run, otherwise. A model or weights that
    do not exist raise ModelSettingsError naming the setting (the fine model's where `fine`).
    """
    import open_clip  # heavy import, deferred so `--help` stays fast

    from sidecar.model.weights import (
        ModelNotCached,
        cached_weights_file,
        fetch_weights,
        missing_weights,
        random_weights_notice,
        unloadable_cached_weights,
        unloadable_checkpoint,
        weights_dir,
    )

    if fetch:
        # Says in one line (FetchFailed) why a download failed, and fast where the host is unreachable.
        fetch_weights(settings, fine=fine)
    else:
        missing = missing_weights(settings, fine=fine)  # checks the model settings first
        if missing:
            raise ModelNotCached(missing)
    model_name, pretrained = settings.model, settings.pretrained
    from sidecar.model.tiny_model import RECIPES, ensure_tiny_model

    if model_name in RECIPES and not pretrained:  # a tiny model of the project's: trained on first use, then cached
        pretrained = str(ensure_tiny_model(settings.cache_dir, model=model_name))
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    log.info("loading %s (pretrained=%s) on %s, %s", model_name, pretrained or "none", device, precision)
    notice = random_weights_notice(settings, fine=fine)
    if notice:
        log.warning("%s", notice)
    # Random weights (no pretrained) come from one fixed seed, so every worker and every restart builds
    # the same model: the text-vector cache and the store may key its vectors by the name "random".
    try:
        # fork_rng of the CPU generator alone: open_clip initialises on the CPU.
        with torch.random.fork_rng(devices=[], enabled=not pretrained), _without_random_init_warning():
            if not pretrained:
                torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, device=device,
                cache_dir=os.fspath(weights_dir(settings)),
            )
    except Exception as exc:  # noqa: BLE001 - torch and open_clip refuse a bad file with any of several types
        if settings.pretrained and Path(settings.pretrained).is_file():  # the user's file, not a download's
            raise unloadable_checkpoint(settings, exc, fine=fine) from exc
        cached = cached_weights_file(settings)
        if cached is not None:  # the tiny model's checkpoint or a download, damaged since it was cached
            raise unloadable_cached_weights(settings, cached, exc) from exc
        raise
    tokenizer = open_clip.get_tokenizer(model_name)
    return Encoder(model, tokenizer=tokenizer, preprocess=preprocess, name=model_name,
                   weights=_weights_id_of(settings, pretrained), device=device,
                   precision=precision)


def load_fine_encoder(settings: Settings, *, fetch: bool = True) -> Encoder | None:
    """The fine-ranking model the settings name (`fine_model`), loaded like any model; None without one."""
    fine = settings.fine_model_settings()
    return None if fine is None else load_encoder(fine, fetch=fetch, fine=True)
