"""`clip-sidecar models`: the models there are, and putting one's weights in the cache before serving (download
or train)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sidecar.cli.root import MODEL_FLAGS, model_options, settings_from
from sidecar.config import TINY_MODELS


@click.group()
def models() -> None:
    """The model's weights, fetched as a step of its own (at image build time, or before `serve`).

    \b
    `serve` loads only a cached model: a download or a training run inside a gunicorn worker
    would outlast its boot timeout and be killed and retried. The cache is SIDECAR_CACHE_DIR
    (or CLIP_SIDECAR_CACHE, default ~/.cache/clip-sidecar).
    """


@models.command("fetch")
@model_options
@click.pass_context
def models_fetch(ctx: click.Context, **kwargs: Any) -> None:
    """Put the configured model in the cache: download an open_clip pretrained tag, or train the tiny model
    (which cannot be downloaded; as `models train`); then check that its weights (or a checkpoint file)
    load into the model, as the server will load them.

    \b
      clip-sidecar models fetch --model ViT-B-32 --pretrained laion2b_s34b_b79k
      clip-sidecar models fetch          # the default tiny model
    """
    from sidecar.model.encoder import load_encoder
    from sidecar.model.weights import configured_models, fetch_weights

    settings = settings_from(kwargs, MODEL_FLAGS)
    # The fine-ranking model too, where one is configured: serve loads it from the cache as well.
    for model_settings, fine in configured_models(settings):
        where = fetch_weights(model_settings, progress=ctx.obj["progress"], fine=fine)
        pretrained = model_settings.pretrained
        if Path(where).is_file():
            # Loaded as the server will load it, so that a file cut short or of another model fails here (one line
            # naming the setting or the file), not at the server's boot: the user's own file, which nothing checked
            # yet, and weights in the cache, which a copy of the cache dir that did not finish leaves damaged.
            load_encoder(model_settings, fetch=False, fine=fine)
        click.echo(f"{model_settings.model}{' / ' + pretrained if pretrained else ''} is cached: {where}")


@models.command("train")
@click.option("--model", help="The tiny model to train: tiny-clip (default) or tiny-clip-large.")
@click.option("--fine-model", help="A tiny fine-ranking model to train too (tiny-clip-large).")
@click.pass_context
def models_train(ctx: click.Context, **kwargs: Any) -> None:
    """Train the tiny synthetic-data CLIPs the settings name into the cache: the model and, where it is one,
    the fine-ranking model (minutes on CPU, about 13 for tiny-clip-large; nothing to do for one already there).

    The tiny model is what the demo, the tests and the default settings use; tiny-clip-large is the
    fine-ranking model of `eval --benchmark`. Real models come from `models fetch`.

    \b
      clip-sidecar models train
      clip-sidecar models train --fine-model tiny-clip-large
    """
    from sidecar.model.tiny_model import checkpoint_path, ensure_tiny_model
    from sidecar.model.weights import configured_models

    settings = settings_from(kwargs, ("model", "fine_model"))
    # The fine model too: `serve --fine-model tiny-clip-large` names this command when that one is missing.
    tiny = [one.model for one, _ in configured_models(settings) if one.model in TINY_MODELS]
    if not tiny:
        raise click.UsageError(f"only the tiny models ({', '.join(TINY_MODELS)}) are trained here; --model / "
                               f"SIDECAR_MODEL is {settings.model!r}: use `clip-sidecar models fetch` for its weights")
    for model in tiny:
        path = checkpoint_path(settings.cache_dir, model=model)
        if path.is_file():
            click.echo(f"{model} is already trained: {path}")
            continue
        path = ensure_tiny_model(settings.cache_dir, model=model, progress=ctx.obj["progress"])
        click.echo(f"{model} trained: {path}")


@models.command("list")
@click.option("--model", help="List this model's pretrained tags, each marked cached or not (default: every model "
                              "with its tags).")
@click.option("--model-config", type=click.Path(exists=True, dir_okay=True),
              help="JSON model config (or folder of them): its architectures are listed too.")
def models_list(**kwargs: Any) -> None:
    """The models `--model` takes, with their pretrained tags (`--pretrained`); or, given `--model`, that model's
    tags, each marked as cached on this machine or not (`models fetch` downloads one). Touches no network.

    \b
      clip-sidecar models list
      clip-sidecar models list --model ViT-B-32
    """
    from sidecar.model.tiny_model import checkpoint_path
    from sidecar.model.weights import available_models, pretrained_tags, tags_of, weights_dir

    one = kwargs["model"]
    settings = settings_from(kwargs, ("model", "model_config"))
    if one in TINY_MODELS:
        path = checkpoint_path(settings.cache_dir, model=one)
        click.echo(f"{one}: trained here, not downloaded: " + (
            f"cached ({path})" if path.is_file() else f"not trained yet (`clip-sidecar models train --model {one}`)"))
    elif one:
        tags = pretrained_tags(settings)
        click.echo(f"{one}: {len(tags)} pretrained tags (cache: {weights_dir(settings)})" if tags else
                   f"{one}: no pretrained tags (give --pretrained /path/to/checkpoint)")
        for tag, cached in tags:
            click.echo(f"  {tag:<40} {'cached' if cached else 'not cached'}")
    else:
        for name in available_models(settings):
            tags = (f"trained here (`clip-sidecar models train --model {name}`)" if name in TINY_MODELS
                    else ", ".join(tags_of(name)) or "no pretrained tags")
            click.echo(f"{name:<36} {tags}")
