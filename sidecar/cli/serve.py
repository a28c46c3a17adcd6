"""`clip-sidecar serve`: the HTTP API under gunicorn (or Flask's development server)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import sysconfig
from pathlib import Path
from typing import Any

import click

from sidecar.api.auth import is_loopback, parse_key_entries, refusal_to_serve
from sidecar.cli.root import (
    MODEL_FLAGS,
    PROMPT_FLAGS,
    STORE_FLAGS,
    model_options,
    prompt_sets_option,
    settings_from,
    store_options,
    writable_folder,
)
from sidecar.config import Settings

log = logging.getLogger(__name__)
GUNICORN_CONFIG = "python:sidecar.api.gunicorn_config"
# Settings `serve` takes as flags beside the model's and the store's (the gunicorn config reads
# them from Settings, so they reach gunicorn through the environment too).
SERVE_FLAGS = ("request_threads", "pin_workers", "insecure") + PROMPT_FLAGS


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; one other than loopback needs API keys, or --insecure.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Gunicorn worker processes; each loads the model once, after the fork. With a GPU the "
                   "request path's CPU sets the ceiling: about one worker per two cores (8 on 16 vCPUs).")
@click.option("--threads", "request_threads", type=click.IntRange(1, 1024),
              help="Request threads per worker (default: SIDECAR_REQUEST_THREADS, else 32); they share that worker's "
                   "micro-batcher, and half of them (at most max_batch items) may wait on the model before "
                   "requests answer 503 (SIDECAR_QUEUE_ITEMS overrides that bound).")
@click.option("--pin-workers", is_flag=True, default=None,
              help="Run each worker on one CPU of those the server may use, spread evenly (SIDECAR_PIN_WORKERS): "
                   "its threads then hand requests to each other on one core. On the 2-vCPU test VM: text encodes "
                   "1.1-1.5x per second, images no gain. Only where no other server pins the same CPUs.")
@click.option("--insecure", is_flag=True, default=None,
              help="Serve without API keys on an address other than loopback (SIDECAR_INSECURE): on purpose only.")
@click.option("--certfile", type=click.Path(exists=True, dir_okay=False),
              help="HTTPS: the server's certificate chain (PEM), gunicorn's own TLS; with --keyfile.")
@click.option("--keyfile", type=click.Path(exists=True, dir_okay=False), help="HTTPS: its private key (PEM).")
@click.option("--dev", is_flag=True, help="Flask's development server instead of gunicorn (development only).")
@prompt_sets_option
@model_options
@store_options
def serve(host: str, port: int, workers: int, certfile: str | None, keyfile: str | None, dev: bool,
          **kwargs: Any) -> None:
    """Serve the search page at / and the HTTP API: every route of the OpenAPI file it serves at
    /openapi.yaml, among them /v1/search, /v1/embeddings, /v1/classify, /v1/opensearch/* (what
    OpenSearch calls: `clip-sidecar opensearch connect`), /healthz, /readyz and /metrics.

    The model must be in the cache first (`clip-sidecar models fetch`): the server never
    downloads or trains one, which could outlast a worker's boot timeout. The vectors of the
    prompt sets (`clip-sidecar prompts`) are computed here, before the workers start, where missing.

    With API keys (SIDECAR_API_KEYS, `clip-sidecar keys create`) every endpoint but /healthz, the
    search page's own files (/, /static/page.js, /static/page.css, /static/favicon.svg) and, with
    SIDECAR_METRICS_PUBLIC, /metrics takes `Authorization: Bearer <key>`; /readyz answers ready or not without one, its details
    with one. Without keys it listens on loopback only, unless
    --insecure.
    """
    settings = settings_from(kwargs, MODEL_FLAGS + STORE_FLAGS + SERVE_FLAGS)
    if (certfile is None) != (keyfile is None):
        raise click.UsageError("--certfile and --keyfile go together")
    run_server(settings, host=host, port=port, workers=workers, certfile=certfile, keyfile=keyfile, dev=dev)


def run_server(settings: Settings, *, host: str, port: int, workers: int = 1, certfile: str | None = None,
               keyfile: str | None = None, dev: bool = False) -> None:
    """Serve `settings` until stopped: gunicorn in place of this process, or Flask's development server."""
    from sidecar.model.weights import configured_models, missing_weights, random_weights_said_elsewhere

    try:
        keys = parse_key_entries(settings.api_keys)
        refusal = refusal_to_serve(settings, [host])
    except ValueError as exc:  # a malformed SIDECAR_API_KEYS
        raise click.UsageError(str(exc)) from exc
    if refusal:
        raise click.ClickException(refusal)
    if keys and not is_loopback(host) and not certfile:
        log.warning("API keys cross the network in clear text on %s unless TLS terminates in front of it "
                    "(README: TLS) or --certfile/--keyfile are given", host)
    for model_settings, fine in configured_models(settings):
        missing = missing_weights(model_settings, fine=fine)
        if missing:
            raise click.ClickException(f"not starting the server: {missing}")
        if not dev:
            # Not said by the model check below: gunicorn, which replaces this process, says it once for all its
            # workers (gunicorn_config.post_fork).
            random_weights_said_elsewhere(model_settings, fine=fine)
    refuse_an_address_taken(host, port)  # before the store's model check loads the model
    _open_text_cache(settings)
    if settings.quality_log_dir:
        # As the text cache's: one line here (exit 1), not each worker failing after its model loaded, the line
        # among gunicorn's and the command's status gunicorn's "App failed to load" (4).
        writable_folder(Path(settings.quality_log_dir))
    encoder = _check_store_model(settings)
    _embed_prompt_sets(settings, encoder)
    if dev:
        from sidecar.api.app import create_app

        create_app(settings).run(host=host, port=port, threaded=True,
                                 ssl_context=(certfile, keyfile) if certfile else None)
        return
    # Gunicorn workers rebuild Settings from the environment: hand the flags over that way.
    overrides = {name: getattr(settings, name) for name in MODEL_FLAGS + STORE_FLAGS + SERVE_FLAGS}
    env = {**os.environ, **{f"SIDECAR_{k.upper()}": str(v) for k, v in overrides.items()}}
    # -q / -v reach the workers' log (gunicorn's and the app's lines) unless GUNICORN_LOGLEVEL says otherwise.
    env.setdefault("GUNICORN_LOGLEVEL", logging.getLevelName(log.getEffectiveLevel()).lower())
    # The config is a module of the package, so an installed (non-editable) package finds it too.
    args = [sys.executable, *_gunicorn_entry(), "--config", GUNICORN_CONFIG, "--bind", host_port(host, port),
            "--workers", str(workers), *(("--certfile", certfile, "--keyfile", keyfile) if certfile else ()),
            "sidecar.api.wsgi:app"]
    log.info("starting gunicorn: %s", " ".join(args[1:]))
    sys.stdout.flush()  # what was printed before must not be lost with this process's buffers
    sys.stderr.flush()
    os.execve(sys.executable, args, env)


def host_port(host: str, port: int) -> str:
    """host:port as gunicorn's --bind reads it: an IPv6 address in brackets ("::1:8080" is no address to it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def refuse_an_address_taken(host: str, port: int) -> None:
    """One line, before the model loads, where the server could not listen on host:port: gunicorn finds out
    only once started (after a demo's minutes of work) and says it in ten ERROR lines of retries ending
    "Can't connect to", without naming the flag to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host_port(host, port)}: {exc.strerror} (--host)") from exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds: TIME_WAIT is no refusal
        try:
            probe.bind(address)
        except OSError as exc:
            hint = ("another process listens there: stop it or choose another --port" if exc.errno == errno.EADDRINUSE
                    else "choose another --host or --port")
            raise click.ClickException(f"cannot listen on {host_port(host, port)}: {exc.strerror} ({hint})") from exc


def _gunicorn_entry() -> list[str]:
    """How this interpreter runs gunicorn: its `gunicorn` script, so that a USR2 upgrade works (gunicorn
    re-executes its own command line; as `-m gunicorn` that is gunicorn/__main__.py, whose folder then
    shadows the standard library's `http` and the new master's workers fail to boot:
    benoitc/gunicorn#3281). `-m gunicorn` where the script is not installed beside the interpreter."""
    script = Path(sysconfig.get_path("scripts")) / "gunicorn"
    if script.is_file():
        return [str(script)]
    log.warning("no gunicorn script at %s: running `python -m gunicorn`, under which a USR2 upgrade fails", script)
    return ["-m", "gunicorn"]


def _open_text_cache(settings: Settings) -> None:
    """Open (and close) the text-vector cache file here, where a path that cannot hold it is one line naming
    the setting: in each worker it stops the boot, and gunicorn's last words are "Worker failed to boot"."""
    from sidecar.serving.cache import TextVectorCache

    path = settings.text_cache_file()
    if path is not None:
        TextVectorCache(path, namespace="", capacity=0, max_entries=settings.text_cache_max_entries).close()


def _check_store_model(settings: Settings):
    """Refuse to start where the store records another model than the one served (each worker would
    refuse to boot; before that, /readyz would not tell). Returns the served model's encoder where it
    was loaded for the check: a store that records no model takes any, and none is loaded. A store that
    cannot say now (a cluster still starting) is left to the workers, which check when they boot."""
    from sidecar.model.encoder import load_encoder
    from sidecar.stores import open_store
    from sidecar.stores.base import QueryModelMismatch, StoreError, check_query_model

    store = open_store(settings)
    try:
        if store.signature() is None:
            return None
        encoder = load_encoder(settings, fetch=False)
        check_query_model(store, encoder.signature)
        return encoder
    except QueryModelMismatch as exc:
        raise click.ClickException(f"not starting the server: {exc}") from exc
    except StoreError as exc:
        log.warning("could not read the model the store records (%s): each worker checks it when it boots", exc)
        return None
    finally:
        store.close()


def _embed_prompt_sets(settings, encoder) -> None:
    """Every prompt set's vectors by the served model (`encoder`, loaded here where None), computed now
    where missing (read where cached): outside gunicorn's boot timeout, and before any request could
    wait for them."""
    from sidecar.model.prompts import PromptSetRegistry

    registry = PromptSetRegistry(settings.prompt_sets_dir)
    prompt_sets = registry.sets()
    if not prompt_sets:
        return
    from sidecar.model.encoder import load_encoder

    encoder = encoder or load_encoder(settings, fetch=False)
    for prompt_set in prompt_sets:
        registry.vectors(prompt_set, model=encoder.name, weights=encoder.weights, encode=encoder.encode_texts)
    log.info("prompt sets ready for %s: %s", encoder.name, ", ".join(s.name for s in prompt_sets))
