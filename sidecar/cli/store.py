"""`clip-sidecar store check` and `store repair`: is the store consistent, and rebuild what can be rebuilt."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import click

from sidecar.cli.root import STORE_FLAGS, settings_from, store_options
from sidecar.stores.base import Store


@click.group()
def store() -> None:
    """Check the store's consistency, or repair it (after a crash, a power loss, a killed run)."""


@store.command()
@store_options
def check(**kwargs: Any) -> None:
    """Report whether the store is consistent; exit status 1 when it is not.

    Embedded: SQLite integrity, committed rows against vectors.f32, the HNSW graph against the
    live rows and their vectors, the FTS5 (BM25) index against the live texts; notes name harmless
    leftovers of an interrupted write and rows the graph does not cover yet (searched exactly).
    OpenSearch: the alias and its index, the load lock, settings an interrupted load left relaxed,
    versioned indices no alias names. Reads only; safe while the store serves.
    """
    with _opened(kwargs) as opened:
        report = opened.check()
    click.echo(report.describe())
    if not report.clean:
        raise SystemExit(1)


@store.command()
@store_options
def repair(**kwargs: Any) -> None:
    """Rebuild what can be rebuilt from what the store committed, say what was done, then check.

    Embedded: discards an uncommitted tail of vectors.f32, removes documents whose vectors were
    lost (a rerun of `clip-sidecar index` writes them again), rebuilds the FTS5 index when it is
    out of step, rebuilds the HNSW graph when it is missing or does not match (else adds the rows
    it lacks), removes leftover files. OpenSearch: restores settings an interrupted load left
    relaxed, deletes versioned indices no alias names. Takes the store's write lock.
    """
    with _opened(kwargs) as opened:
        report = opened.repair()
        click.echo(report.describe() if report.actions or report.problems else f"{report.location}: nothing to repair")
        after = opened.check()
    click.echo(after.describe())
    if not after.clean:
        raise SystemExit(1)


@contextlib.contextmanager
def _opened(kwargs: dict[str, Any]) -> Iterator[Store]:
    from sidecar.stores import open_store

    opened = open_store(settings_from(kwargs, STORE_FLAGS))
    try:
        yield opened
    finally:
        opened.close()
