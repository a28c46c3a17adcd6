"""`clip-sidecar opensearch`: apply the project's plugin_config to a cluster."""

from __future__ import annotations

from typing import Any

import click

from sidecar.cli.root import (
    MODEL_FLAGS,
    STORE_FLAGS,
    model_options,
    settings_from,
    store_options,
)
from sidecar.config import Settings


@click.group()
def opensearch() -> None:
    """OpenSearch: apply the project's index template, mapping and search pipelines."""


@opensearch.command("setup")
@model_options
@store_options
def opensearch_setup(**kwargs: Any) -> None:
    """Create (idempotently) the k-NN index and alias, sized for the model, and the hybrid
    search pipelines. Safe to rerun."""
    from sidecar.model.encoder import load_encoder
    from sidecar.stores import open_store

    settings = settings_from(kwargs, MODEL_FLAGS + STORE_FLAGS)
    settings = Settings.from_env(**{**{n: getattr(settings, n) for n in MODEL_FLAGS + STORE_FLAGS},
                                    "store": "opensearch"})
    encoder = load_encoder(settings)
    store = open_store(settings)
    try:
        store.claim(encoder.signature)  # creates index, alias and pipelines if missing
    finally:
        store.close()
    click.echo(f"OpenSearch index {settings.opensearch_index} ready for {encoder.signature.describe()}")
