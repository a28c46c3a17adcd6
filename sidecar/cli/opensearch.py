"""`clip-sidecar opensearch`: apply the project's plugin_config to a cluster."""

from __future__ import annotations

import json
from typing import Any

import click

from sidecar.cli.root import (
    MODEL_FLAGS,
    OPENSEARCH_FLAGS,
    coarse_model_options,
    opensearch_options,
    settings_from,
)
from sidecar.config import Settings
from sidecar.stores.ml_commons import INGEST_FIELDS, PLACEHOLDER_KEY, RERANK_BY


@click.group()
def opensearch() -> None:
    """OpenSearch: create the index, its alias and the hybrid search pipelines (setup); let OpenSearch call the
    sidecar (connect)."""


@opensearch.command("setup")
@coarse_model_options
@opensearch_options
def opensearch_setup(**kwargs: Any) -> None:
    """Create (idempotently) the k-NN index and alias, sized for the model, and the hybrid
    search pipelines. Safe to rerun."""
    from sidecar.model.encoder import load_encoder
    from sidecar.stores import open_store

    settings = settings_from({**kwargs, "store": "opensearch"}, MODEL_FLAGS + OPENSEARCH_FLAGS + ("store",))
    encoder = load_encoder(settings)
    store = open_store(settings)
    try:
        store.claim(encoder.signature)  # creates index, alias and pipelines if missing
    finally:
        store.close()
    click.echo(f"OpenSearch index {settings.opensearch_index} ready for {encoder.signature.describe()}")


@opensearch.command("connect")
@click.option("--sidecar-url", default="http://127.0.0.1:8080", show_default=True,
              help="The sidecar as OpenSearch reaches it (not as this machine does): loopback beside a local node, "
                   "http://sidecar:8080 inside docker compose. The cluster must trust it "
                   "(plugins.ml_commons.trusted_connector_endpoints_regex).")
@click.option("--api-key", envvar="SIDECAR_CONNECTOR_API_KEY", default=PLACEHOLDER_KEY,
              help="Bearer key the connectors send, for a sidecar with API keys (kept in the connectors' "
                   "credential, encrypted by ml-commons, never shown): one made by `clip-sidecar keys create "
                   "--name opensearch --scope embeddings`. Checked against SIDECAR_API_KEYS where this shell sets "
                   "it. Env: SIDECAR_CONNECTOR_API_KEY.")
@click.option("--ingest", "ingest_fields", type=click.Choice(tuple(INGEST_FIELDS)), default="image", show_default=True,
              help="What the image pipeline embeds into `vector`: the image alone (what `clip-sidecar index` stores), "
                   "or image+text fused (the text alone where a document has no image).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Text pipeline: documents per call to the sidecar (at most its max_batch_items, as "
                   "SIDECAR_MAX_BATCH_ITEMS in this shell says: default 256).")
@click.option("--step-size", type=click.IntRange(1), default=64, show_default=True,
              help="Texts per call when a _predict sends more (the connector's input_docs_processed_step_size; at "
                   "most the sidecar's max_batch_items: connect has OpenSearch send the running sidecar one call of "
                   "this many texts, and refuses the step it answers 413).")
@click.option("--max-connection", type=click.IntRange(1), default=16, show_default=True,
              help="Concurrent calls per model: a _bulk of image documents sends this many at once. The default "
                   "is what one sidecar worker with 32 request threads admits before answering 503; raise it "
                   "with the sidecar's workers.")
@click.option("--retries", type=click.IntRange(0), default=3, show_default=True,
              help="Retries of a call the sidecar answered 503 overloaded (with backoff).")
@click.option("--rerank", type=click.Choice(tuple(RERANK_BY)), default="ids", show_default=True,
              help="What the hybrid + rerank pipeline's rerank scores each hit by: ids = its stored vector and BM25, "
                   "as /v1/search reranks (the sidecar's store must be this index); texts = CLIP similarity of its "
                   "`text` field (any sidecar of the model); none = no rerank model or pipeline.")
@click.option("--set-defaults", is_flag=True,
              help="Make the image pipeline the index's default ingest pipeline and the hybrid pipeline its default "
                   "search pipeline (also for later versions: --rebuild); refused where the index already has a "
                   "default pipeline of another's.")
@click.option("--disconnect", is_flag=True, help="Remove everything connect made for the index, and nothing else.")
@opensearch_options
def opensearch_connect(sidecar_url: str, api_key: str, ingest_fields: str, batch_size: int, step_size: int,
                       max_connection: int, retries: int, rerank: str, set_defaults: bool, disconnect: bool,
                       **kwargs: Any) -> None:
    """Let OpenSearch call the sidecar: ml-commons connectors and remote models for embeddings and
    rerank, an ingest pipeline (documents with a base64 `image` get their `vector` on the way in),
    and search pipelines (`neural` and `hybrid` queries from any client; hybrid + rerank).

    \b
    Needs the index (`clip-sidecar opensearch setup`) and a running sidecar of the index's model
    (`clip-sidecar serve`): the last step embeds through OpenSearch and refuses a sidecar that cannot
    be reached or serves another model, removing what the run made. Rerun: same ids, nothing
    duplicated; changed options are tried through probe copies of the connectors first, then update
    in place, so a change that cannot work (a --sidecar-url the cluster cannot reach, a key refused)
    fails with the connection kept as it was; a rerun that changed nothing removes nothing when it
    fails (the sidecar down: the connection stays for when it is back).

    \b
      clip-sidecar opensearch connect --set-defaults
      clip-sidecar opensearch connect --sidecar-url http://sidecar:8080      # docker compose
      clip-sidecar opensearch connect --disconnect
    """
    from sidecar.api.search import DEFAULT_WEIGHTS
    from sidecar.stores import open_store
    from sidecar.stores.ml_commons import ConnectOptions, connect
    from sidecar.stores.ml_commons import disconnect as remove

    settings = settings_from({**kwargs, "store": "opensearch"}, OPENSEARCH_FLAGS + ("store",))
    if not disconnect:  # removing calls no sidecar: a shell set up as the sidecar's (its keys, limits) may run it
        _check_connector_key(settings, api_key)
        # Texts per call to the texts URL, which refuses more than max_batch_items with 413. The step size is checked
        # against the running sidecar instead (`check_models` sends one full step); a text pipeline's batch cannot be
        # sent without writing a document, so its limit is the one this shell configures.
        if batch_size > settings.max_batch_items:
            raise click.UsageError(f"--batch-size {batch_size} is over the sidecar's max_batch_items "
                                   f"({settings.max_batch_items}): it answers 413 to a call of more texts than that")
    store = open_store(settings)
    try:
        if disconnect:
            removed = remove(store)
            for line in removed:
                click.echo(f"removed {line}")
            click.echo(f"OpenSearch no longer calls the sidecar for {settings.opensearch_index}"
                       + ("" if removed else " (nothing was connected)"))
            return
        try:
            options = ConnectOptions(sidecar_url=sidecar_url, api_key=api_key, ingest_fields=ingest_fields,
                                     batch_size=batch_size, step_size=step_size,
                                     weights=(DEFAULT_WEIGHTS["vector"], DEFAULT_WEIGHTS["bm25"]),
                                     max_connection=max_connection, max_retry_times=retries, rerank=rerank,
                                     set_defaults=set_defaults)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        connection = connect(store, options)
    finally:
        store.close()
    for line in connection.changes:
        click.echo(line)
    click.echo(json.dumps({"models": connection.models, "ingest_pipelines": connection.ingest_pipelines,
                           "search_pipelines": connection.search_pipelines}, indent=2))
    click.echo(f"OpenSearch calls the sidecar at {sidecar_url} for {settings.opensearch_index}"
               + ("" if connection.changed else " (nothing changed)"))


def _check_connector_key(settings: Settings, api_key: str) -> None:
    """Where SIDECAR_API_KEYS is set here (as for the sidecar), the key must be one it admits to the
    URLs OpenSearch calls: found now, not as a 401 inside OpenSearch's check (or a user's _bulk)."""
    from sidecar.api.auth import KeyGuard, parse_key_entries
    from sidecar.errors import Forbidden, Unauthorized
    from sidecar.stores.ml_commons import RERANK_PATH, TEXTS_PATH

    try:
        entries = parse_key_entries(settings.api_keys)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if not entries:
        return
    create = "`clip-sidecar keys create --name opensearch --scope embeddings`"
    if api_key == PLACEHOLDER_KEY:
        raise click.UsageError(f"SIDECAR_API_KEYS is set, so the sidecar takes keys: pass the connectors' key with "
                               f"--api-key (SIDECAR_CONNECTOR_API_KEY), one made by {create}")
    try:
        for path in (TEXTS_PATH, RERANK_PATH.format(kind="ids")):
            KeyGuard(entries).check(f"Bearer {api_key}", path)
    except (Unauthorized, Forbidden) as exc:
        raise click.UsageError(f"--api-key: {exc.message} (checked against SIDECAR_API_KEYS); make one with "
                               f"{create}") from exc
