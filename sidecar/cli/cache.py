"""`clip-sidecar cache`: the text-vector cache."""

from __future__ import annotations

import time
from typing import Any

import click

from sidecar.cli.root import MODEL_FLAGS, coarse_model_options, settings_from
from sidecar.errors import not_utf8


@click.group()
def cache() -> None:
    """The text-vector cache (keyed by model, weights, prompt template version and text)."""


@cache.command("warm")
@click.argument("prompts", type=click.File("rb"))
@coarse_model_options
@click.pass_context
def cache_warm(ctx: click.Context, prompts, **kwargs: Any) -> None:
    """Pre-compute vectors for PROMPTS (one text per line; - for stdin) so the first queries hit."""
    from tqdm import tqdm

    from sidecar.model.encoder import load_encoder
    from sidecar.serving.encoding import EncodingService

    settings = settings_from(kwargs, MODEL_FLAGS)
    try:  # decoded whole, so an error's offset is the file's
        texts = list(dict.fromkeys(line.strip() for line in prompts.read().decode("utf-8").splitlines() if line.strip()))
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{prompts.name}: {not_utf8(exc)}; save it as UTF-8", param_hint="PROMPTS") from exc
    service = EncodingService(load_encoder(settings), settings)
    try:
        started = time.perf_counter()
        with tqdm(total=len(texts), unit="prompt", desc="cache warm", disable=not ctx.obj["progress"]) as bar:
            for start in range(0, len(texts), settings.max_batch_items):
                batch = texts[start:start + settings.max_batch_items]
                service.encode_texts(batch)
                bar.update(len(batch))
        click.echo(f"{len(texts)} prompts cached in {time.perf_counter() - started:.1f} s; "
                   f"{service.cache.persisted_count()} vectors stored for this model and prompt version")
    finally:
        service.close()
