"""`clip-sidecar cache`: the text-vector cache: warm it, see what it holds, delete what is no longer read."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import click

from sidecar.cli.root import (
    MODEL_FLAGS,
    MODEL_IDENTITY_FLAGS,
    model_identity_options,
    model_options,
    settings_from,
)
from sidecar.config import Settings
from sidecar.errors import not_utf8


@click.group()
def cache() -> None:
    """The text-vector cache: query-text vectors in a SQLite file (SIDECAR_TEXT_CACHE_PATH, else
    text-vectors.sqlite in the cache dir) that a server's workers share and keep across restarts, keyed by
    model, weights, prompt version and template, and the text's hash. It holds at most
    SIDECAR_TEXT_CACHE_MAX_ENTRIES vectors, least recently used deleted first.

    \b
    warm   fill it with the vectors of a file of prompts
    stats  its size, and what it holds per model, weights and prompt version
    prune  delete what a server with the given model settings does not read
    clear  delete every vector in it
    """


@cache.command("warm")
@click.argument("prompts", type=click.File("rb"))
@model_options
@click.pass_context
def cache_warm(ctx: click.Context, prompts, **kwargs: Any) -> None:
    """Pre-compute vectors for PROMPTS (one text per line; - for stdin) so the first queries hit: the model's,
    and the fine model's where one is set (a server's fine stage encodes each query with it too)."""
    from tqdm import tqdm

    from sidecar.model.encoder import load_encoder, load_fine_encoder
    from sidecar.serving.encoding import EncodingService

    settings = settings_from(kwargs, MODEL_FLAGS)
    try:  # decoded whole, so an error's offset is the file's
        texts = list(dict.fromkeys(line.strip() for line in prompts.read().decode("utf-8").splitlines() if line.strip()))
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{prompts.name}: {not_utf8(exc)}; save it as UTF-8", param_hint="PROMPTS") from exc
    services = {"this model": EncodingService(load_encoder(settings), settings)}
    try:
        fine_encoder = load_fine_encoder(settings)
        if fine_encoder is not None:
            services["the fine model"] = EncodingService(fine_encoder, settings, role="fine")
        started = time.perf_counter()
        with tqdm(total=len(texts) * len(services), unit="prompt", desc="cache warm",
                  disable=not ctx.obj["progress"]) as bar:
            for service in services.values():
                for start in range(0, len(texts), settings.max_batch_items):
                    batch = texts[start:start + settings.max_batch_items]
                    service.encode_texts(batch)
                    bar.update(len(batch))
        stored = []
        for whose, service in services.items():
            service.cache.flush()
            if service.cache.write_error is not None:  # the server's writer only warns: serving goes on without it
                raise click.ClickException(f"the vectors could not be stored in {settings.text_cache_file()}: "
                                           f"{service.cache.write_error} (SIDECAR_TEXT_CACHE_PATH)")
            stored.append(f"{service.cache.persisted_count()} vectors stored for {whose} and prompt version")
        click.echo(f"{len(texts)} prompts cached in {time.perf_counter() - started:.1f} s; {'; '.join(stored)}")
    finally:
        for service in services.values():
            service.close()


def _cache_file(settings: Settings) -> Path | None:
    """The settings' cache file; None (said) where text_cache_persist is off or no file is there yet."""
    path = settings.text_cache_file()
    if path is None:
        click.echo("SIDECAR_TEXT_CACHE_PERSIST is false: text vectors are kept in each worker's memory only, "
                   "no file")
    elif not path.exists():
        click.echo(f"no text-vector cache at {path} yet (SIDECAR_TEXT_CACHE_PATH, else text-vectors.sqlite in the "
                   "cache dir): a server or `cache warm` creates it")
        return None
    return path


@contextlib.contextmanager
def _sqlite_errors(path: Path) -> Iterator[None]:
    """SQLite's refusals (a file that is not a cache, one this user may not write) as one line naming the file."""
    from sidecar.sqlite_files import unreadable

    try:
        yield
    except sqlite3.Error as exc:
        hint = "; a server moves a file SQLite cannot read aside when it next starts" if unreadable(exc) else ""
        raise click.ClickException(f"text-vector cache {path}: {exc} (SIDECAR_TEXT_CACHE_PATH{hint})") from exc


def _checked_model_settings(kwargs: dict[str, Any]) -> Settings:
    """The settings the flags give, refused (one line, closest names) when they name a model or weights that do not
    exist: `cache prune` of a misspelt model would otherwise delete every vector the real one's server reads."""
    from sidecar.model.weights import check_model_settings

    settings = settings_from(kwargs, MODEL_IDENTITY_FLAGS)
    check_model_settings(settings)
    fine = settings.fine_model_settings()
    if fine is not None:
        check_model_settings(fine, fine=True)
    return settings


def _size(size: float) -> str:
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} GB"


@cache.command("stats")
@model_identity_options
def cache_stats(**kwargs: Any) -> None:
    """Show the cache file's size and what it holds, per model, weights and prompt version.

    Per model, weights, prompt version and template: its vectors, their size (the rows' contents; the file
    adds SQLite's index and free pages) and when one was last written or read from the file; and whether a
    server with these model settings reads them ("read", "not read"; "stale": rows of an older release that
    nothing reads). Give the model settings the server runs with (flags, else the same SIDECAR_* variables,
    SIDECAR_PROMPT_VERSION and SIDECAR_PROMPT_TEMPLATE included); `cache prune` deletes what it does not read.
    Reads only: safe while a server uses the file.
    """
    from sidecar.serving.cache import file_bytes, usage
    from sidecar.serving.encoding import text_cache_namespaces

    settings = _checked_model_settings(kwargs)
    path = _cache_file(settings)
    if path is None:
        return
    with _sqlite_errors(path):
        rows = usage(path)
    read = set(text_cache_namespaces(settings))
    click.echo(f"{path}: {sum(row.vectors for row in rows):,} vectors, {_size(file_bytes(path))} on disk; it keeps at "
               f"most {settings.text_cache_max_entries:,} (SIDECAR_TEXT_CACHE_MAX_ENTRIES), least recently used "
               "deleted first")
    if not rows:
        return
    table = [("model", "weights", "prompt version", "template", "vectors", "size", "last used", "these settings")]
    for row in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.last_used_ns / 1e9)) if row.last_used_ns else "-"
        state = "stale" if row.stale else "read" if row.namespace in read else "not read"
        table.append((*row.parts, f"{row.vectors:,}", _size(row.bytes), used, state))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    right = {4, 5}  # the numbers
    for line in table:
        click.echo("  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                             for i, cell in enumerate(line)).rstrip())
    if any(row.stale for row in rows):
        click.echo("stale: written before token counts were kept; never read again (`cache prune` deletes them)")


@cache.command("prune")
@model_identity_options
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
def cache_prune(dry_run: bool, **kwargs: Any) -> None:
    """Delete the vectors a server with these model settings does not read.

    Those of other models or weights, of other prompt versions or templates (SIDECAR_PROMPT_VERSION,
    SIDECAR_PROMPT_TEMPLATE), and stale rows go; then their space goes back to the disk (SQLite's VACUUM:
    it needs free space of about the remaining rows' size while it runs). Give the settings the server runs
    with (flags, else the same SIDECAR_* variables): its model's and its fine model's vectors are kept.
    Servers of other models sharing the file lose theirs: they encode those texts again as queries come.
    Safe while a server uses the file: what it no longer finds it encodes again, and its writes wait for
    the prune. `cache stats` shows what would go ("not read", "stale").
    A model or weights tag that does not exist (a misspelling) is refused: it would delete every vector.
    """
    from sidecar.serving.cache import file_bytes, remove, usage
    from sidecar.serving.encoding import text_cache_namespaces

    settings = _checked_model_settings(kwargs)
    path = _cache_file(settings)
    if path is None:
        return
    keep = text_cache_namespaces(settings)
    with _sqlite_errors(path):
        going = [row for row in usage(path) if row.stale or row.namespace not in keep]
        if dry_run:
            click.echo(f"would delete {sum(row.vectors for row in going):,} vectors of {path}"
                       + "".join(f"\n  {row.vectors:>10,}  {' | '.join(row.parts)}{' (stale)' if row.stale else ''}"
                                 for row in going))
            return
        before = file_bytes(path)
        deleted = remove(path, keep=keep)
    click.echo(f"deleted {deleted:,} vectors not read with these settings; {path}: {_size(before)} -> "
               f"{_size(file_bytes(path))}")


@cache.command("clear")
def cache_clear() -> None:
    """Delete every vector in the cache file.

    Every model's and prompt version's; then the space goes back to the disk. The file stays: servers that use it keep working and encode their queries
    again (each worker still answers what it holds in memory, up to SIDECAR_TEXT_CACHE_SIZE texts, until
    it restarts). The file is SIDECAR_TEXT_CACHE_PATH, else text-vectors.sqlite in SIDECAR_CACHE_DIR."""
    from sidecar.serving.cache import file_bytes, remove

    path = _cache_file(settings_from({}, ()))
    if path is None:
        return
    with _sqlite_errors(path):
        before = file_bytes(path)
        deleted = remove(path, keep=None)
    click.echo(f"deleted {deleted:,} vectors; {path}: {_size(before)} -> {_size(file_bytes(path))}")
