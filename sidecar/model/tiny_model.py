"""The tiny CLIPs: open_clip models the project trains on synthetic shapes, since no weights can be downloaded.

Two of them: `tiny-clip`, the fast model every store is built with by default, and
`tiny-clip-large` (more capacity, twice the input resolution), the stronger model the
fine-ranking stage and the relevance benchmark use. Both are trained the same way, on the same
data, with the same (colour, shape) pairs held out (`synthetic.HELD_OUT_PAIRS`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from sidecar.config import TINY_MODELS
from sidecar.model import synthetic

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
# The fast model and the stronger one (for fine ranking): the names open_clip knows them by once registered.
MODEL_NAME, LARGE_MODEL_NAME = TINY_MODELS
# Bump when the training code changes what a given recipe and seed produce: old caches then miss.
CODE_VERSION = "1"
# Training items come from synthetic seeds TRAIN_SEED_OFFSET + seed; evaluation uses a seed
# below the offset, so its renders are never ones the model was trained on.
TRAIN_SEED_OFFSET = 1_000_000
HELDOUT_SEED = 7


@dataclass(frozen=True, kw_only=True)
class TrainRecipe:
    """Everything besides the architecture and the seed that decides the trained weights."""

    steps: int = 500
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    train_images: int = 5000
    render_size: int = 64  # as write_corpus renders; preprocessing resizes to the model's input
    jpeg_quality: int = synthetic.JPEG_QUALITY
    # Share of training images decoded with JPEG draft mode (DCT-domain downscale), the way a
    # reader that asks PIL for the model's size decodes them; the rest are fully decoded.
    draft_fraction: float = 0.5
    # (colour, shape) pairs no training image shows: queries for them are out of distribution.
    held_out_pairs: tuple[tuple[str, str], ...] = synthetic.HELD_OUT_PAIRS


DEFAULT_RECIPE = TrainRecipe()
LARGE_STEPS = 900
LARGE_TRAIN_IMAGES = 8000
# Each tiny model with the recipe that trains it: the config file is model_configs/<name>.json.
RECIPES: dict[str, TrainRecipe] = {
    MODEL_NAME: DEFAULT_RECIPE,
    LARGE_MODEL_NAME: TrainRecipe(steps=LARGE_STEPS, train_images=LARGE_TRAIN_IMAGES, warmup_steps=90),
}


def register_tiny_config() -> None:
    """Make the tiny models known to open_clip (add_model_config), once per process."""
    import open_clip

    if not set(RECIPES) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


def _recipe(model: str, recipe: TrainRecipe | None) -> TrainRecipe:
    if model not in RECIPES:
        raise ValueError(f"unknown tiny model {model!r}; available: {', '.join(RECIPES)}")
    return RECIPES[model] if recipe is None else recipe


def cache_key(*, model: str = MODEL_NAME, seed: int = 0, recipe: TrainRecipe | None = None) -> str:
    """Hash of everything that decides the weights: config, recipe, seed, code version."""
    recipe = _recipe(model, recipe)
    config = json.loads((CONFIG_DIR / f"{model}.json").read_text(encoding="utf-8"))
    payload = json.dumps({"config": config, "recipe": asdict(recipe), "seed": seed, "code": CODE_VERSION},
                         sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def checkpoint_path(cache_dir: Path, *, model: str = MODEL_NAME, seed: int = 0,
                    recipe: TrainRecipe | None = None) -> Path:
    return Path(cache_dir) / "tiny-clip" / f"{model}-{cache_key(model=model, seed=seed, recipe=recipe)}.pt"


def ensure_tiny_model(cache_dir: Path, *, model: str = MODEL_NAME, seed: int = 0, recipe: TrainRecipe | None = None,
                      progress: bool = True, threads: int | None = None) -> Path:
    """Path of the trained checkpoint of tiny model `model`, training it first if the cache lacks it.

    A file lock makes concurrent callers wait for one trainer instead of training twice; the
    checkpoint appears by atomic rename, so a killed run leaves no partial file behind.
    """
    recipe = _recipe(model, recipe)
    path = checkpoint_path(cache_dir, model=model, seed=seed, recipe=recipe)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path.with_suffix(".lock")):
        if path.is_file():  # another process finished it while we waited
            return path
        # No fixed duration: tiny-clip trains in about a minute on 2 cores, tiny-clip-large in about 15 (the
        # checkpoint's .json records train_seconds), and far longer on a busy machine.
        log.info("%s not cached at %s: training it, once (seed=%d, %d steps; the progress bar shows the time left)",
                 model, path, seed, recipe.steps)
        started = time.perf_counter()
        trained = train_tiny_model(model=model, seed=seed, recipe=recipe, progress=progress, threads=threads)
        train_seconds = time.perf_counter() - started
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                torch.save(trained.state_dict(), fh)  # a plain state dict: what open_clip's loader reads
                fh.flush()
                os.fsync(fh.fileno())
            # Evaluate the file through the users' loading path, so a checkpoint that open_clip
            # cannot load (or loads differently) never lands in the cache.
            metrics = evaluate_tiny_model(*load_tiny_model(tmp, model=model))
            log.info("%s trained in %.0f s; held-out text→image %s", model, train_seconds,
                     ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
            import open_clip

            info = {"model": model, "seed": seed, "recipe": asdict(recipe), "code_version": CODE_VERSION,
                    "train_seconds": round(train_seconds, 1), "heldout_metrics": metrics,
                    "torch": torch.__version__, "open_clip": open_clip.__version__}
            _atomic_write(path.with_suffix(".json"), json.dumps(info, indent=2).encode("utf-8"))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is training this tiny model (%s); waiting for it", lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    # Training wants both cores; restore the caller's setting so a server's own choice survives.
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _create_untrained(name: str, seed: int):
    import open_clip

    register_tiny_config()
    torch.manual_seed(seed)
    # Random init is the point here, but open_clip says "No pretrained weights loaded ... initialized randomly"
    # at WARNING on the root logger, which the CLI shows: in the middle of a first run's training it reads as
    # a fault. Only that record is dropped, only while the model is created.
    def not_random_init(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(not_random_init)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    finally:
        root.removeFilter(not_random_init)
    return model, preprocess, open_clip.get_tokenizer(name)


def load_tiny_model(checkpoint: Path | str, *, model: str = MODEL_NAME):
    """(model, tokenizer, preprocess_val) for a checkpoint, loaded exactly as users load theirs."""
    import open_clip

    register_tiny_config()
    loaded, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=os.fspath(checkpoint))
    return loaded.eval(), open_clip.get_tokenizer(model), preprocess


def _decode_like_reader(image: Image.Image, *, quality: int, draft_side: int | None) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    decoded = Image.open(buffer)
    if draft_side:
        decoded.draft("RGB", (draft_side, draft_side))
    decoded.load()
    return decoded.convert("RGB")


class _Dataset(NamedTuple):
    pixels: torch.Tensor  # [N, 3, H, W], already through preprocess_val
    attributes: list[dict[str, str]]
    codes: torch.Tensor  # [N, len(ATTRIBUTES)] int64 value index per attribute


def _attribute_codes(attrs: Mapping[str, str]) -> list[int]:
    """Value index per attribute, -1 where the attribute is not named (caption subsets)."""
    return [values.index(attrs[name]) if name in attrs else -1 for name, values in synthetic.ATTRIBUTES.items()]


def _render_dataset(preprocess, *, n: int, seed: int, recipe: TrainRecipe, input_side: int) -> _Dataset:
    rng = random.Random(f"tiny-model/decode/{seed}")
    pixels, attributes = [], []
    for item in synthetic.iter_items(n, seed=seed, size=recipe.render_size, exclude=recipe.held_out_pairs):
        draft = input_side if rng.random() < recipe.draft_fraction else None
        pixels.append(preprocess(_decode_like_reader(item.image, quality=recipe.jpeg_quality, draft_side=draft)))
        attributes.append(item.attributes)
    codes = torch.tensor([_attribute_codes(a) for a in attributes], dtype=torch.long)
    return _Dataset(torch.stack(pixels), attributes, codes)


def _positives(caption_codes: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
    """[captions, images] bool: image j satisfies every attribute caption i names."""
    named = caption_codes[:, None, :] < 0
    return (named | (caption_codes[:, None, :] == image_codes[None, :, :])).all(dim=-1)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     positives: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, with every matching pair in the batch counted as a positive.

    Plain CLIP loss treats "red circle" vs another red circle in the batch as a negative; with
    partial captions that is common, so targets spread evenly over all true matches instead.
    With one positive per row this is exactly open_clip's ClipLoss.
    """
    logits = logit_scale * text_features @ image_features.T  # [texts, images]
    target = positives.float()
    text_to_image = torch.sum(-target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1), dim=1)
    image_to_text = torch.sum(-target.T / target.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1), dim=1)
    return (text_to_image.mean() + image_to_text.mean()) / 2


def train_tiny_model(*, model: str = MODEL_NAME, seed: int = 0, recipe: TrainRecipe | None = None,
                     progress: bool = True, threads: int | None = None):
    """Train tiny model `model` from scratch on synthetic renders; returns the open_clip model (eval mode).

    Deterministic for a given seed and recipe on a given machine: seeded init, data and batches,
    and a fixed thread count (`threads`, default: up to 2, the cores these machines have; not part
    of the cache key, since it changes float summation order, not what the model learns). Images pass through the model's own validation preprocess
    (after a JPEG round trip), so inference on written corpora sees what training saw.
    """
    recipe = _recipe(model, recipe)
    name = model
    # fork_rng: seeding here must not change the caller's random stream.
    with _torch_threads(threads or min(2, os.cpu_count() or 1)), torch.random.fork_rng(devices=[]):
        model, preprocess, tokenizer = _create_untrained(name, seed)
        input_side = int(model.visual.image_size[0])
        started = time.perf_counter()
        data = _render_dataset(preprocess, n=recipe.train_images, seed=TRAIN_SEED_OFFSET + seed,
                               recipe=recipe, input_side=input_side)
        log.info("rendered %d training images in %.1f s", len(data.attributes), time.perf_counter() - started)

        rng = random.Random(f"tiny-model/captions/{seed}")
        generator = torch.Generator().manual_seed(seed)
        token_cache: dict[str, torch.Tensor] = {}
        optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98),
                                      eps=1e-6)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
        model.train()
        order = torch.randperm(len(data.attributes), generator=generator)
        cursor = 0
        bar = tqdm(range(recipe.steps), desc=f"train {name}", unit="step", disable=not progress)
        for step in bar:
            if cursor + recipe.batch_size > len(order):
                order, cursor = torch.randperm(len(data.attributes), generator=generator), 0
            batch = order[cursor:cursor + recipe.batch_size]
            cursor += recipe.batch_size
            captions, caption_codes = [], []
            for index in batch.tolist():
                caption, subset = synthetic.random_caption(data.attributes[index], rng)
                captions.append(caption)
                caption_codes.append(_attribute_codes(subset))
            tokens = _tokenize_cached(tokenizer, captions, token_cache)
            positives = _positives(torch.tensor(caption_codes), data.codes[batch])

            image_features = F.normalize(model.encode_image(data.pixels[batch]), dim=-1)
            text_features = F.normalize(model.encode_text(tokens), dim=-1)
            loss = contrastive_loss(image_features, text_features, model.logit_scale.exp(), positives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if step % 10 == 0 or step == recipe.steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
            if step % 100 == 0 or step == recipe.steps - 1:
                log.debug("step %d loss %.4f", step, loss.item())
        log.info("trained %d steps in %.1f s, final loss %.4f", recipe.steps, time.perf_counter() - started,
                 loss.item())
    return model.eval()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # As open_clip's training script: no decay on gains, biases, embeddings and the logit scale.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
            or "embedding" in name or "token" in name
        (no_decay if skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _lr_factor(step: int, recipe: TrainRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _tokenize_cached(tokenizer, texts: Sequence[str], cache: dict[str, torch.Tensor]) -> torch.Tensor:
    missing = [t for t in dict.fromkeys(texts) if t not in cache]
    if missing:
        for text, tokens in zip(missing, tokenizer(missing)):
            cache[text] = tokens
    return torch.stack([cache[t] for t in texts])


def evaluate_tiny_model(model, tokenizer, preprocess, *, n: int = 200, seed: int = HELDOUT_SEED,
                        partial_queries: bool = True) -> dict[str, float]:
    """Text→image recall on `n` fresh renders (JPEG round trip, then `preprocess`).

    Each item's full caption queries all `n` images. Metrics:
      - "recall@K": a hit if any of the top K images has the query item's attributes. With 400
        attribute combinations, n=200 draws repeat some; those images are equally correct answers.
      - "exact_recall@K": a hit only if the query's own image is in the top K (ceiling below 1
        when combinations repeat, since ties among identical-attribute images are arbitrary).
      - "partial_recall@K" (if `partial_queries`): one random partial caption per item (e.g. "red
        circle"), a hit if a top-K image has every attribute the caption names.
      - "held_out_recall@K": "recall@K" over the items whose (colour, shape) pair training held
        out (`synthetic.HELD_OUT_PAIRS`; about 1 in 8 items): combinations the model never saw.
    """
    items = synthetic.sample_items(n, seed=seed)
    pixels = torch.stack([preprocess(synthetic.jpeg_roundtrip(item.image)) for item in items])
    image_codes = torch.tensor([_attribute_codes(item.attributes) for item in items])
    queries = [(item.caption, item.attributes) for item in items]
    rng = random.Random(f"tiny-model/eval/{seed}")
    partial = [synthetic.random_caption(item.attributes, rng) for item in items] if partial_queries else []
    model.eval()
    with torch.inference_mode():
        images = F.normalize(model.encode_image(pixels), dim=-1)
        texts = F.normalize(model.encode_text(tokenizer([q for q, _ in queries + partial])), dim=-1)
    scores = texts @ images.T
    ks = [k for k in (1, 10) if k <= n]
    metrics: dict[str, float] = {}
    full_scores, partial_scores = scores[:n], scores[n:]
    match = _positives(image_codes, image_codes)
    own = torch.eye(n, dtype=torch.bool)
    held_out = torch.tensor([synthetic.is_held_out(item.attributes) for item in items])
    for k in ks:
        top = full_scores.topk(k, dim=1).indices
        hits = match.gather(1, top).any(1).float()
        metrics[f"recall@{k}"] = hits.mean().item()
        metrics[f"exact_recall@{k}"] = own.gather(1, top).any(1).float().mean().item()
        if held_out.any():
            metrics[f"held_out_recall@{k}"] = hits[held_out].mean().item()
    if partial:
        partial_match = _positives(torch.tensor([_attribute_codes(s) for _, s in partial]), image_codes)
        for k in ks:
            top = partial_scores.topk(k, dim=1).indices
            metrics[f"partial_recall@{k}"] = partial_match.gather(1, top).any(1).float().mean().item()
    return {key: round(value, 4) for key, value in metrics.items()}
