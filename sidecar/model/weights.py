"""Where the configured model's weights come from, whether this machine has them, and fetching them:
an open_clip pretrained tag (downloaded into <cache_dir>/weights), a checkpoint file, the tiny
model (trained into the cache), or none (random weights).

`clip-sidecar models fetch` runs `fetch_weights` as an explicit step (the Docker build runs it);
the server only ever loads weights `missing_weights` finds present, so a gunicorn worker never
downloads or trains inside its boot timeout.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
from pathlib import Path

from sidecar.config import TINY_MODELS, Settings
from sidecar.errors import UserFixable

log = logging.getLogger(__name__)

FETCH_COMMAND = "clip-sidecar models fetch"
LIST_COMMAND = "clip-sidecar models list"


class ModelNotCached(RuntimeError, UserFixable):
    """The configured model's weights are not on this machine (the message names the command to run)."""


class FetchFailed(RuntimeError, UserFixable):
    """Downloading weights failed (the message says what was asked for and why it failed)."""


class ModelSettingsError(ValueError, UserFixable):
    """The settings name a model open_clip does not know, weights that are neither a file nor one of its
    pretrained tags, or a device or precision this machine lacks: a mistake the user fixes (the message
    names the flag, the variable and the choices)."""


# The flag and variable of each model setting, by whether the settings are the fine-ranking model's
# (Settings.fine_model_settings moves those into `model` and `pretrained`).
_SETTING_NAMES = {
    False: {"model": "--model / SIDECAR_MODEL", "pretrained": "--pretrained / SIDECAR_PRETRAINED",
            "model_config": "--model-config / SIDECAR_MODEL_CONFIG"},
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
    names = _SETTING_NAMES[fine]
    for value, setting in ((settings.model, names["model"]), (settings.pretrained, names["pretrained"])):
        if value.startswith(_SCHEMES):
            raise ModelSettingsError(_schema_refusal(value, setting, names))
    available = available_models(settings, setting=names["model_config"])
    if settings.model not in available:
        raise ModelSettingsError(
            f"unknown model {settings.model!r} ({names['model']}); "
            f"{_choices(settings.model, available, what='models', listing=LIST_COMMAND)}; the tiny ones, trained "
            f"here: {', '.join(TINY_MODELS)} ({names['model_config']} adds a custom architecture)")
    pretrained = settings.pretrained
    if pretrained and not Path(pretrained).is_file() and _tag_config(settings.model, pretrained) is None:
        path = Path(pretrained)
        if path.is_dir():
            raise ModelSettingsError(f"pretrained {pretrained!r} ({names['pretrained']}) is a directory: give the "
                                     "checkpoint file in it (.pt, .bin or .safetensors)")
        what = ("no such checkpoint file" if os.sep in pretrained or path.suffix
                else f"neither a checkpoint file nor a pretrained tag of {settings.model}")
        tags = _choices(Path(pretrained).name, tags_of(settings.model), what=f"pretrained tags of {settings.model}",
                        listing=f"{LIST_COMMAND} --model {settings.model}")
        raise ModelSettingsError(f"pretrained {pretrained!r} ({names['pretrained']}): {what}; {tags}")


def available_models(settings: Settings, *, setting: str = _SETTING_NAMES[False]["model_config"]) -> list[str]:
    """Every model name the settings can load: the tiny ones first (what a user new to open_clip's names can
    run at once), then open_clip's architectures and the model config's (registered, checked, here)."""
    import open_clip

    from sidecar.model.tiny_model import register_tiny_config

    if settings.model_config:
        _register_model_config(settings.model_config, setting)
    register_tiny_config()
    return [*TINY_MODELS, *(name for name in open_clip.list_models() if name not in TINY_MODELS)]


def _choices(given: str, choices: list[str], *, what: str, listing: str) -> str:
    """The choices a refused `given` had, for its error message: all of a short list; of a long one (open_clip
    has over a hundred models, ViT-B-32 over twenty tags), the closest few and the command that lists them."""
    if len(choices) <= _LISTED_IN_FULL:
        return f"the {what}: {', '.join(choices) or 'none'}"
    lowered = {choice.lower(): choice for choice in choices}
    # A prefix (a tag's dataset without its schedule, `laion2b`) first, then what is spelt alike.
    closest = [choice for choice in choices if choice.lower().startswith(given.lower())]
    closest += [lowered[name] for name in difflib.get_close_matches(given.lower(), list(lowered), n=4, cutoff=0.5)
                if lowered[name] not in closest]
    near = f"closest: {', '.join(closest[:4])}; " if closest else ""
    return f"{near}`{listing}` lists all {len(choices)} {what}"


# How many choices an error message lists whole (_choices); past that, the closest few.
_LISTED_IN_FULL = 8


# open_clip's model-name schemes, which fetch config and weights from the Hub (or a folder) on every load:
# the server loads offline, from the cache, what `models fetch` put there by model name and tag.
_SCHEMES = ("hf-hub:", "local-dir:")
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _schema_refusal(value: str, setting: str, names: dict[str, str]) -> str:
    scheme, _, identifier = value.partition(":")
    repo = identifier.strip("/")
    known = [f"{names['model']} {model} {names['pretrained']} {tag}" for model, tag in _hub_tags(repo)]
    instead = (f"the same weights by open_clip's name and tag: {known[0]}" if known else
               f"its open_clip_config.json's \"model_cfg\" saved as <name>.json ({names['model_config']}, with "
               f"{names['model']} <name>) and its weights file ({names['pretrained']} "
               "/path/to/open_clip_model.safetensors)")
    return f"{value!r} ({setting}): open_clip's {scheme}: names are not supported (the server loads only what " \
           f"`{FETCH_COMMAND}` cached, offline); give {instead}"


def _hub_tags(repo: str) -> list[tuple[str, str]]:
    """The (model, tag) pairs of open_clip's list whose weights are the Hub repository `repo`."""
    import open_clip

    return [(model, tag) for model, tag in open_clip.list_pretrained()
            if (open_clip.get_pretrained_cfg(model, tag).get("hf_hub") or "").strip("/").lower() == repo.lower()]


def _builtin_configs() -> dict[str, Path]:
    """open_clip's own architectures (the JSON files it ships), by name."""
    import open_clip

    return {path.stem: path for path in (Path(open_clip.__file__).parent / "model_configs").glob("*.json")}


def _config_files(model_config: str) -> list[Path]:
    """The JSON files open_clip reads for a model config setting: the file, or a folder's *.json."""
    path = Path(model_config)
    return sorted(path.glob("*.json")) if path.is_dir() else [path]


def _register_model_config(model_config: str, setting: str) -> None:
    """add_model_config once each file is checked: open_clip fails on a file that is not JSON with a
    traceback (and on every later scan in the process, the file staying on its list), skips one that
    lacks a key without a word (the model is then "unknown"), and lets one named as one of its own models
    (or the tiny ones) replace that architecture, whose name, tags and weights id then mean another model."""
    import open_clip

    if not Path(model_config).exists():
        raise ModelSettingsError(f"model config {model_config!r} ({setting}): no such file or folder")
    from sidecar.model.tiny_model import CONFIG_DIR

    taken = {**_builtin_configs(), **{path.stem: path for path in CONFIG_DIR.glob("*.json")}}
    folder = Path(model_config).is_dir()
    for path in _config_files(model_config):
        config = _read_config(path, setting)
        missing = [key for key in _CONFIG_KEYS if not isinstance(config, dict) or key not in config]
        # In a folder, open_clip passes over JSON that is no architecture at all; a file named alone must be one.
        if missing and (not folder or len(missing) < len(_CONFIG_KEYS)):
            raise ModelSettingsError(f"model config {str(path)!r} ({setting}) lacks {', '.join(missing)}: an "
                                     f"open_clip architecture has {', '.join(_CONFIG_KEYS)}")
        clash = taken.get(path.stem)
        if clash is not None and clash.resolve() != path.resolve():
            raise ModelSettingsError(f"model config {str(path)!r} ({setting}) is named as the built-in model "
                                     f"{path.stem!r}: rename the file (a model's name is its config file's, less "
                                     ".json) and give that name as the model")
    # Added again on each check: open_clip's last path wins a name, so this config is the one the model loads
    # (the process may have read another config of the same name before: tests, a benchmark's models).
    open_clip.add_model_config(model_config)


def _read_config(path: Path, setting: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSettingsError(f"model config {str(path)!r} ({setting}) is not a JSON file: {exc}") from exc


def custom_config_digest(settings: Settings) -> str | None:
    """A digest of the architecture the model config gives `settings.model` (its JSON, key order and spacing
    aside), None where the model is not the config's: random weights of two configs under one name are two
    models, which the text-vector cache and the store must not take for one another. Reads the file alone
    (no open_clip): a server's master names the cache namespace without importing torch."""
    if not settings.model_config:
        return None
    path = next((path for path in _config_files(settings.model_config) if path.stem == settings.model), None)
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # check_model_settings says what is wrong with it
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def random_weights_id(settings: Settings) -> str:
    """The weights id of the settings' model with random weights (drawn from one seed): "random" for an
    architecture of open_clip's, "random:<config digest>" for one of the model config's (custom_config_digest)."""
    digest = custom_config_digest(settings)
    return "random" if digest is None else f"random:{digest}"


def _load_failure(exc: Exception) -> str:
    """What torch or open_clip said of a file that does not load, in a few words: its first sentence (torch's
    advice that follows, weights_only=False and the like, is not the user's remedy)."""
    said = str(exc).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(exc).strip() else ""
    return f"{type(exc).__name__}{': ' + said[:200] if said else ''}"


def unloadable_checkpoint(settings: Settings, exc: Exception, *, fine: bool = False) -> ModelSettingsError:
    """The error for a `pretrained` file that does not load into the model: torch and open_clip each say
    so in their own way (a file cut short, not a checkpoint at all, one of another architecture), in a
    traceback."""
    names = _SETTING_NAMES[fine]
    return ModelSettingsError(
        f"checkpoint {settings.pretrained!r} ({names['pretrained']}) does not load into {settings.model} "
        f"({_load_failure(exc)}): give a complete checkpoint file of {settings.model}, or the model it was saved "
        f"from ({names['model']})")


def unloadable_cached_weights(settings: Settings, path: Path, exc: Exception) -> ModelNotCached:
    """The error for weights in the cache (`cached_weights_file`) that do not load: a copy of the cache dir that
    did not finish, a disk fault. Found present, so `missing_weights` passed them and `models fetch` would
    leave them be: the file has to go before the command that puts it there again can."""
    what = f"{settings.model} / {settings.pretrained}" if settings.pretrained else settings.model
    again = "download" if settings.pretrained else "train"
    return ModelNotCached(f"the cached weights of {what} do not load ({_load_failure(exc)}): {path} is cut short or "
                          f"damaged; delete it and run `{FETCH_COMMAND}` with the same model settings to {again} it "
                          "again")


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
    tags = tags_of(settings.model)
    choices = f"one of its pretrained tags ({', '.join(tags[:3])}{', …' if len(tags) > 3 else ''}) or " if tags else ""
    return (f"{settings.model} runs with random weights (weights \"{random_weights_id(settings)}\"): no "
            f"{names['pretrained']} was given. "
            f"Its vectors mean nothing, so search and zero-shot answers are noise: right for benchmarks only. Give "
            f"{names['pretrained']} {choices}a checkpoint file")


def random_weights_said_elsewhere(settings: Settings, *, fine: bool = False) -> None:
    """Another process says the random-weights notice for this model (a server's: its first gunicorn worker),
    so this one's random_weights_notice returns None for it. From the settings alone: no open_clip import."""
    _TOLD_RANDOM.add((settings.model, fine))


def cached_weights_file(settings: Settings) -> Path | None:
    """The file in the cache the settings' weights load from, where it is there: the tiny model's trained
    checkpoint, or a pretrained tag's download. None for random weights and a checkpoint file of the user's."""
    model, pretrained = settings.model, settings.pretrained
    if model in TINY_MODELS and not pretrained:
        from sidecar.model.tiny_model import checkpoint_path

        path = checkpoint_path(settings.cache_dir, model=model)
        return path if path.is_file() else None
    cfg = _tag_config(model, pretrained) if pretrained and not Path(pretrained).is_file() else None
    cached = _cached_file(cfg, weights_dir(settings)) if cfg is not None else None
    return Path(cached) if cached is not None else None


def missing_weights(settings: Settings, *, fine: bool = False) -> str | None:
    """None if the configured model can load without a download or training; else what is missing
    and the command that puts it there. Touches no network; ModelSettingsError for a model or
    weights that do not exist at all."""
    check_model_settings(settings, fine=fine)
    model, pretrained = settings.model, settings.pretrained
    if not pretrained and model not in TINY_MODELS:
        return None  # random weights: nothing to fetch
    if (pretrained and Path(pretrained).is_file()) or cached_weights_file(settings) is not None:
        return None
    if not pretrained:  # a tiny model
        from sidecar.model.tiny_model import checkpoint_path

        path = checkpoint_path(settings.cache_dir, model=model)
        return (f"the tiny model is not trained yet ({model}: no {path}); run `clip-sidecar models train` "
                f"(or `{FETCH_COMMAND}`) with the same model settings first: it trains in minutes on CPU")
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
    unreachable = _unreachable(cfg)
    if unreachable:
        raise FetchFailed(f"could not download {model} / {pretrained}: {unreachable}. Run `{FETCH_COMMAND}` where it "
                          "is reachable (the weights land in the cache dir, which can be copied), or pass "
                          "--pretrained /path/to/checkpoint")
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


# Seconds the reachability check of a download's host waits for an answer.
PROBE_TIMEOUT_S = 10.0


def _unreachable(cfg: dict) -> str | None:
    """Why the host a tag downloads from cannot be reached (offline, a name that does not resolve, a refused
    connection), or None. One request, no retries: huggingface_hub retries a connection error with back-off,
    once per file it tries, about a minute before it says the file is neither online nor cached, in words
    that a missing file would have too. Any HTTP answer counts as reachable: a missing file is the download's to say."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants
    from open_clip.pretrained import has_hf_hub

    if cfg.get("hf_hub") and has_hf_hub():
        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set, so the Hugging Face Hub is not asked"
        url, host = constants.ENDPOINT, f"the Hugging Face Hub ({constants.ENDPOINT})"
    else:
        url, host = cfg["url"], cfg["url"]
    try:
        # urllib goes through the proxy variables (HTTPS_PROXY, …) as the download does.
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{host} is unreachable from this machine (offline, or blocked: {reason})"
    return None


def pretrained_tags(settings: Settings) -> list[tuple[str, bool]]:
    """The configured model's pretrained tags, each with whether its weights are in the cache (no network).
    The model alone is checked: the tags listed are what to choose `pretrained` from."""
    check_model_settings(dataclasses.replace(settings, pretrained=""))
    return [(tag, _cached_file(_tag_config(settings.model, tag), weights_dir(settings)) is not None)
            for tag in tags_of(settings.model)]


def _tag_config(model: str, tag: str) -> dict | None:
    import open_clip

    return open_clip.get_pretrained_cfg(model, tag) or None


def tags_of(model: str) -> list[str]:
    """open_clip's pretrained tags of `model` (none for the tiny models and a model config's)."""
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
