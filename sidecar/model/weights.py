"""Where the configured model's weights come from, whether this machine has them, and fetching them:
an open_clip pretrained tag (downloaded into <cache_dir>/weights), a checkpoint file, the tiny
model (trained into the cache), or none (random weights).

`clip-sidecar models fetch` runs `fetch_weights` as an explicit step (the Docker build runs it);
the server only ever loads weights `missing_weights` finds present, so a gunicorn worker never
downloads or trains inside its boot timeout.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sidecar.config import TINY_MODELS, Settings

log = logging.getLogger(__name__)

FETCH_COMMAND = "clip-sidecar models fetch"


class ModelNotCached(RuntimeError):
    """The configured model's weights are not on this machine (the message names the command to run)."""


class FetchFailed(RuntimeError):
    """Downloading weights failed (the message says what was asked for and why it failed)."""


class ModelSettingsError(ValueError):
    """The settings name a model open_clip does not know, or weights that are neither a file nor one of
    its pretrained tags: a mistake the user fixes (the message names the flag, the variable and the choices)."""


# The flag and variable of each model setting, by whether the settings are the fine-ranking model's
# (Settings.fine_model_settings moves those into `model` and `pretrained`).
_SETTING_NAMES = {
    False: {"model": "--model / SIDECAR_MODEL", "pretrained": "--pretrained / SIDECAR_PRETRAINED",
            "model_config": "--model-config"},
    True: {"model": "--fine-model / SIDECAR_FINE_MODEL", "pretrained": "--fine-pretrained / SIDECAR_FINE_PRETRAINED",
           "model_config": "SIDECAR_FINE_MODEL_CONFIG"},
}


def weights_dir(settings: Settings) -> Path:
    """Where open_clip keeps downloaded weights (its cache_dir)."""
    return settings.cache_dir / "weights"


def configured_models(settings: Settings) -> list[tuple[Settings, bool]]:
    """The settings of each model `settings` configure, with whether it is the fine-ranking model."""
    fine = settings.fine_model_settings()
    return [(settings, False)] + ([(fine, True)] if fine is not None else [])


def check_model_settings(settings: Settings, *, fine: bool = False) -> None:
    """Raise ModelSettingsError unless open_clip knows the model (its own, the tiny ones, or one from
    the model config) and `pretrained` is empty, a file, or one of the model's tags. Touches no network."""
    import open_clip

    from sidecar.model.tiny_model import register_tiny_config

    names = _SETTING_NAMES[fine]
    if settings.model_config:
        open_clip.add_model_config(settings.model_config)
    register_tiny_config()
    # The project's own models first: the ones a user new to open_clip's names can run at once.
    available = [*TINY_MODELS, *(name for name in open_clip.list_models() if name not in TINY_MODELS)]
    if settings.model not in available:
        raise ModelSettingsError(
            f"unknown model {settings.model!r} ({names['model']}); available: {', '.join(available[:12])}, … "
            f"({len(available)} in all; {names['model_config']} adds a custom architecture)")
    pretrained = settings.pretrained
    if pretrained and not Path(pretrained).is_file() and _tag_config(settings.model, pretrained) is None:
        raise ModelSettingsError(
            f"pretrained {pretrained!r} ({names['pretrained']}) is neither a checkpoint file nor a pretrained tag "
            f"of {settings.model}; its tags: {', '.join(_tags(settings.model)) or 'none'}")


def unloadable_checkpoint(settings: Settings, exc: Exception, *, fine: bool = False) -> ModelSettingsError:
    """The error for a `pretrained` file that does not load into the model: torch and open_clip each say
    so in their own way (a file cut short, not a checkpoint at all, one of another architecture), in a
    traceback, and torch's advice for some of them (weights_only=False) is not the user's remedy."""
    names = _SETTING_NAMES[fine]
    said = str(exc).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(exc).strip() else ""
    return ModelSettingsError(
        f"checkpoint {settings.pretrained!r} ({names['pretrained']}) does not load into {settings.model} "
        f"({type(exc).__name__}{': ' + said[:200] if said else ''}): give a complete checkpoint file of "
        f"{settings.model}, or the model it was saved from ({names['model']})")


# The models this process has already said, or leaves another process to say, run with random weights
# (random_weights_notice, random_weights_said_elsewhere).
_TOLD_RANDOM: set[tuple[str, bool]] = set()


def random_weights_notice(settings: Settings, *, fine: bool = False) -> str | None:
    """What to tell a user whose model runs with random weights: an architecture of open_clip's (or the
    model config's) with no `pretrained`, which a user forgets more often than wants (benchmarks and the
    random-weight tests do want it). The first time this process asks for that model; None after, and
    for the tiny models (trained into the cache) and any model with weights."""
    if settings.pretrained or settings.model in TINY_MODELS or (settings.model, fine) in _TOLD_RANDOM:
        return None
    _TOLD_RANDOM.add((settings.model, fine))
    names = _SETTING_NAMES[fine]
    tags = _tags(settings.model)
    choices = f"one of its pretrained tags ({', '.join(tags[:3])}{', …' if len(tags) > 3 else ''}) or " if tags else ""
    return (f"{settings.model} runs with random weights (weights \"random\"): no {names['pretrained']} was given. "
            f"Its vectors mean nothing, so search and zero-shot answers are noise: right for benchmarks only. Give "
            f"{names['pretrained']} {choices}a checkpoint file")


def random_weights_said_elsewhere(settings: Settings, *, fine: bool = False) -> None:
    """Another process says the random-weights notice for this model (a server's: its first gunicorn worker),
    so this one's random_weights_notice returns None for it. From the settings alone: no open_clip import."""
    _TOLD_RANDOM.add((settings.model, fine))


def missing_weights(settings: Settings, *, fine: bool = False) -> str | None:
    """None if the configured model can load without a download or training; else what is missing
    and the command that puts it there. Touches no network; ModelSettingsError for a model or
    weights that do not exist at all."""
    check_model_settings(settings, fine=fine)
    model, pretrained = settings.model, settings.pretrained
    if model in TINY_MODELS and not pretrained:
        from sidecar.model.tiny_model import checkpoint_path

        path = checkpoint_path(settings.cache_dir, model=model)
        if path.is_file():
            return None
        return (f"the tiny model is not trained yet ({model}: no {path}); run `clip-sidecar models train` "
                f"(or `{FETCH_COMMAND}`) with the same model settings first: it trains in minutes on CPU")
    if not pretrained:
        return None  # random weights: nothing to fetch
    if Path(pretrained).is_file():
        return None
    if _cached_file(_tag_config(model, pretrained), weights_dir(settings)) is not None:
        return None
    return (f"weights {model} / {pretrained} are not in {weights_dir(settings)}; run `{FETCH_COMMAND}` "
            f"with the same model settings first (or pass --pretrained /path/to/checkpoint)")


def fetch_weights(settings: Settings, *, progress: bool = True, fine: bool = False) -> str:
    """Put the configured model's weights in the cache (download a tag, train the tiny model); returns
    where they are (a checkpoint file: itself, unread). FetchFailed says why a download failed,
    ModelSettingsError that there is no such model or tag."""
    check_model_settings(settings, fine=fine)
    model, pretrained = settings.model, settings.pretrained
    if model in TINY_MODELS and not pretrained:
        from sidecar.model.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(settings.cache_dir, model=model, progress=progress))
    if not pretrained:
        return f"{model} has no pretrained weights configured (random init): nothing to fetch"
    if Path(pretrained).is_file():
        return pretrained
    cfg = _tag_config(model, pretrained)
    cached = _cached_file(cfg, weights_dir(settings))
    if cached is not None:
        return cached
    from open_clip.pretrained import download_pretrained

    source = f"the Hugging Face Hub ({cfg['hf_hub'].rstrip('/')})" if cfg.get("hf_hub") else cfg.get("url")
    log.info("downloading %s / %s from %s into %s", model, pretrained, source, weights_dir(settings))
    try:
        path = download_pretrained(cfg, cache_dir=os.fspath(weights_dir(settings)))
    except Exception as exc:  # noqa: BLE001 - network, HTTP and hub errors alike: say which download failed
        raise FetchFailed(f"could not download {model} / {pretrained} from {source}: {exc}. Run this where that "
                          "host is reachable (the weights land in the cache dir, which can be copied), or pass "
                          "--pretrained /path/to/checkpoint") from exc
    if not path:
        raise FetchFailed(f"open_clip names no download for {model} / {pretrained}")
    return path


def _tag_config(model: str, tag: str) -> dict | None:
    import open_clip

    return open_clip.get_pretrained_cfg(model, tag) or None


def _tags(model: str) -> list[str]:
    import open_clip

    return open_clip.list_pretrained_tags_by_model(model)


def _cached_file(cfg: dict, cache_dir: Path) -> str | None:
    """The file open_clip would load for a tag, if it is in `cache_dir` (no network)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import has_hf_hub

    if cfg.get("hf_hub") and has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")  # open_clip prefers it where it exists
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=os.fspath(cache_dir))
            if isinstance(found, str):
                return found
        return None
    if cfg.get("url"):
        path = cache_dir / os.path.basename(cfg["url"])
        return str(path) if path.is_file() else None
    return None
