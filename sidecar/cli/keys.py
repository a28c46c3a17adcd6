"""`clip-sidecar keys`: API keys for the HTTP API (created here, kept by the server only as hashes)."""

from __future__ import annotations

import click

from sidecar.api.auth import ALL_SCOPES, SCOPES, check_key_name, key_digest, key_entry, new_key


@click.group()
def keys() -> None:
    """API keys: the server keeps only their hashes (SIDECAR_API_KEYS); callers send
    `Authorization: Bearer <key>`."""


@keys.command("create")
@click.option("--name", help="Who holds the key (letters, digits, . _ -): logs, errors and rate limits name it "
                             "(default: key-<the hash's first 8 hex digits>).")
@click.option("--scope", "scopes", multiple=True, type=click.Choice((ALL_SCOPES, *SCOPES)),
              help="What the key may call, repeatable: "
                   + "; ".join(f"{scope} ({', '.join(paths)})" for scope, paths in SCOPES.items())
                   + "; * (default) = everything. Any key may read /readyz's details and /openapi.yaml.")
def keys_create(name: str | None, scopes: tuple[str, ...]) -> None:
    """Create a key. Prints it once (give it to the caller; it is stored nowhere) and the line to
    append to SIDECAR_API_KEYS (comma-separated), which holds only its SHA-256.

    \b
    clip-sidecar keys create --name opensearch --scope embeddings
    export SIDECAR_API_KEYS="$SIDECAR_API_KEYS,opensearch:embeddings:9f86d0…"

    Revoke a key by removing its line and restarting the server.
    """
    try:
        if name is not None:
            check_key_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from exc
    key = new_key()
    entry = key_entry(name or f"key-{key_digest(key)[:8]}", scopes, key)
    click.echo(f"key (shown once, not stored): {key}")
    click.echo(f"SIDECAR_API_KEYS entry:        {entry}")
