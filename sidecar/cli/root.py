"""The `clip-sidecar` group: logging, the errors a user can fix, and the options commands share."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import click

from sidecar.config import PRECISIONS, STORES, Settings, is_unwritable_path, path_settings, unwritable_path_message
from sidecar.errors import UserFixable
from sidecar.logs import OneLineFormatter, route_logs

MODEL_FLAGS = ("model", "pretrained", "model_config", "device", "precision", "fine_model", "fine_pretrained")
MODEL_IDENTITY_FLAGS = ("model", "pretrained", "fine_model", "fine_pretrained")
OPENSEARCH_FLAGS = ("opensearch_url", "opensearch_index")
STORE_LOCATION_FLAGS = ("store", "store_path", *OPENSEARCH_FLAGS)
STORE_FLAGS = (*STORE_LOCATION_FLAGS, "target_recall")
PROMPT_FLAGS = ("prompt_sets_dir",)


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN, which it lets through (NaN fails both bound comparisons), and infinity."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


_MODEL = click.option("--model", help="open_clip model name, e.g. ViT-B-32 (default: the tiny synthetic model).")
_PRETRAINED = click.option("--pretrained", help="Pretrained tag (e.g. laion2b_s34b_b79k) or a checkpoint file path.")
_FINE_MODEL = click.option("--fine-model", help="A stronger model for the fine-ranking stage (e.g. ViT-L-14, or "
                                                "tiny-clip-large): embed stores its image vectors beside each document, "
                                                "search re-scores the coarse candidates with it.")
_FINE_PRETRAINED = click.option("--fine-pretrained", help="Pretrained tag or checkpoint of --fine-model.")


def _coarse_model_option_list() -> list[Callable]:
    return [
        _MODEL,
        _PRETRAINED,
        click.option("--model-config", type=click.Path(exists=True, dir_okay=True),
                     help="JSON model config (or folder of them) for architectures open_clip lacks."),
        click.option("--device", help="auto (default: CUDA if present), cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(PRECISIONS),
                     help="auto = bf16/fp16 autocast on GPU, fp32 on CPU."),
    ]


def coarse_model_options(func: Callable) -> Callable:
    """The model options of a command that runs the model alone (prompt sets, the index's mapping): no
    fine-model flags it would ignore."""
    return functools.reduce(lambda f, option: option(f), reversed(_coarse_model_option_list()), func)


def model_options(func: Callable) -> Callable:
    options = [*_coarse_model_option_list(), _FINE_MODEL, _FINE_PRETRAINED]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def model_identity_options(func: Callable) -> Callable:
    """The model options of a command that names models without loading them (MODEL_IDENTITY_FLAGS, what the
    text-vector cache is keyed by): no device, precision or config it would ignore."""
    return functools.reduce(lambda f, option: option(f), reversed([_MODEL, _PRETRAINED, _FINE_MODEL, _FINE_PRETRAINED]),
                            func)


def _opensearch_option_list() -> list[Callable]:
    return [
        click.option("--opensearch-url", help="OpenSearch URL (default: SIDECAR_OPENSEARCH_URL, else http://127.0.0.1:9250)."),
        click.option("--opensearch-index", help="OpenSearch alias to read and write (default: SIDECAR_OPENSEARCH_INDEX, else clip-sidecar)."),
    ]


def opensearch_options(func: Callable) -> Callable:
    """The store options of a command that works on OpenSearch only (OPENSEARCH_FLAGS): no store choice."""
    return functools.reduce(lambda f, option: option(f), reversed(_opensearch_option_list()), func)


def _store_location_option_list() -> list[Callable]:
    return [
        click.option("--store", type=click.Choice(STORES), help="Where vectors live (default: SIDECAR_STORE, else embedded)."),
        click.option("--store-path", type=click.Path(path_type=Path), help="Embedded store directory (default data/store)."),
        *_opensearch_option_list(),
    ]


def store_location_options(func: Callable) -> Callable:
    """The store options of a command that runs no vector query (STORE_LOCATION_FLAGS): no --target-recall."""
    return functools.reduce(lambda f, option: option(f), reversed(_store_location_option_list()), func)


def store_options(func: Callable) -> Callable:
    options = [
        *_store_location_option_list(),
        click.option("--target-recall", type=FiniteFloatRange(0, 1),
                     help="Recall@K target (e.g. 0.99): vector queries that name no ef_search get the effort a "
                          "calibration chose for it (`store calibrate`; `index` calibrates after large changes); "
                          "0 = the store's fixed ef_search (default)."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def prompt_sets_option(func: Callable) -> Callable:
    return click.option("--prompt-sets", "prompt_sets_dir", type=click.Path(file_okay=False, path_type=Path),
                        help="Folder of prompt sets and their cached vectors (default data/prompt-sets; "
                             "SIDECAR_PROMPT_SETS_DIR).")(func)


# ctx.meta (one dict for the group's and the command's contexts): the running command's context and settings,
# whose paths a path error names (_Group).
_RUNNING = "sidecar.running"


def settings_from(kwargs: dict[str, Any], names: tuple[str, ...]) -> Settings:
    """Settings from the environment with the named command-line flags (popped from kwargs) on top."""
    try:
        settings = Settings.from_env(**{name: kwargs.pop(name, None) for name in names})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_RUNNING] = (ctx, settings)
    return settings


def writable_folder(path: Path) -> Path:
    """`path`, a command's output folder, created and checked writable before the work: a folder under a
    file or on a read-only disk fails here in one line (as `_Group` tells any path it cannot write, naming
    the flag or setting), not after minutes of embedding or evaluating."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        ctx = click.get_current_context(silent=True)
        raise click.ClickException(_path_error(exc, ctx.meta.get(_RUNNING) if ctx else None)) from exc
    return path


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C
TERMINATED = 143  # by SIGTERM (128 + 15), as a shell reports it


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt is: `docker stop`, a Kubernetes Job deleted, `kill`.
    Without a handler the command, as a container's first process, ignored it (the kernel drops signals a
    PID 1 does not handle) and was killed at the grace's end; elsewhere it died at once, leaving the decode
    workers and half-written `.tmp` files a Ctrl-C cleans up. Every path that stops cleanly on Ctrl-C now
    stops the same way on SIGTERM."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def _redeliver_swallowed_stop(previous_hook: Any, unraisable: Any) -> None:
    # Python runs weakref callbacks and __del__ methods at any bytecode (an import's module-lock release
    # among them) and drops what they raise after printing "Exception ignored in". A Ctrl-C or SIGTERM whose
    # exception is raised in one would be lost and the command run on (CI once saw `cache warm` go on
    # waiting for its prompts after SIGTERM). The signal is sent again a moment later, from a thread: sent
    # from here it would raise inside this hook, whose exceptions Python drops too.
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
        resend = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        resend.daemon = True
        resend.start()
    else:
        previous_hook(unraisable)


def _default_sigterm_in_forked_child() -> None:
    # A forked worker (the scan's and the decoders' pools) is stopped by its parent with SIGTERM
    # (Pool.terminate): it should die at once, as before, not raise Terminated into its task.
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_forked_child)


def _path_error(exc: OSError, running: tuple[click.Context, Settings] | None) -> str:
    """One line: the path, why, and the flag or setting it lies in (the nearest that holds it)."""
    sources: dict[str, str] = {}  # absolute path -> "--flag or SIDECAR_VARIABLE"
    if running is not None:
        command, settings = running
        flags = {param.name: param.opts[-1] for param in command.command.params if param.opts}
        sources = path_settings(settings, flags=flags)
        for name, value in command.params.items():
            if isinstance(value, Path) and name in flags:
                sources.setdefault(os.path.abspath(value), flags[name])
    return unwritable_path_message(exc, sources)


def configure_logging(*, verbose: bool, quiet: bool) -> None:
    """The project's own INFO lines on stderr, third parties' as `route_logs` lets them through;
    every record is one line, a traceback's too (`OneLineFormatter`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")))
    route_logs([handler], app_level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
               verbose=verbose)


class _Group(click.Group):
    """Turns the errors a user can fix (`UserFixable`: unknown model or weights, a store of another model, bad
    corpus, unreachable store, bad prompt set; a folder it cannot create or write) into one clear line and exit
    code 1, instead of a traceback;
    Ctrl-C into "Aborted!" and exit code 130; SIGTERM, stopping the command as Ctrl-C does, into "Terminated."
    and exit code 143."""

    def invoke(self, ctx: click.Context) -> Any:
        # Only the main thread may set a handler; the previous one comes back when the command returns (a
        # test's CliRunner runs commands inside pytest's process). `serve` replaces this process with gunicorn,
        # which handles SIGTERM its own way.
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        previous_unraisablehook = sys.unraisablehook
        if main_thread:
            sys.unraisablehook = functools.partial(_redeliver_swallowed_stop, previous_unraisablehook)
        try:
            return super().invoke(ctx)
        except Terminated:
            click.echo("\nTerminated.", err=True)
            raise click.exceptions.Exit(TERMINATED) from None
        except KeyboardInterrupt:
            # click's own handling says "Aborted!" but exits 1, the status of an error to fix: a script
            # could not tell Ctrl-C from a failure. 130 (128 + SIGINT) is what shells give it.
            click.echo("\nAborted!", err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None
        except UserFixable as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            if not is_unwritable_path(exc):
                raise
            raise click.ClickException(_path_error(exc, ctx.meta.get(_RUNNING))) from exc
        finally:
            if main_thread:  # None: a handler set outside Python, which leaves the default's behaviour
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
                sys.unraisablehook = previous_unraisablehook


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, third-party libraries' included.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings only, no progress bars.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """CLIP image/text search: embed images offline, index them into the embedded store or
    OpenSearch, and search by text, image or both (vector, BM25, hybrid, rerank).

    \b
    First run (no cluster, no downloads):   clip-sidecar demo
    Your own images:
      clip-sidecar embed photos/ --out data/shards --model ViT-B-32 --pretrained laion2b_s34b_b79k
      clip-sidecar index data/shards
      clip-sidecar search "red sneakers" --model ViT-B-32 --pretrained laion2b_s34b_b79k
      clip-sidecar serve --workers 1 --model ViT-B-32 --pretrained laion2b_s34b_b79k

    The settings of the model, the store, the prompt sets and the server (README: Configuration)
    come from SIDECAR_* environment variables too; a flag given overrides its variable.
    """
    configure_logging(verbose=verbose, quiet=quiet)
    ctx.obj = {"progress": not quiet, "verbose": verbose}


def open_existing_store(settings: Settings, *, progress: bool = False):
    """The store the settings name, for a command that reads one (`progress`: as `open_store`). An embedded
    store path that holds none is refused: opening it would create an empty store there, and answer (nothing)
    from it."""
    from sidecar.stores import open_store
    from sidecar.stores.embedded import EmbeddedStore

    if settings.store == "embedded" and not EmbeddedStore.exists_at(settings.store_path):
        raise click.ClickException(f"no embedded store at {settings.store_path}: give the --store-path (or "
                                   "SIDECAR_STORE_PATH) that `clip-sidecar index` wrote to")
    return open_store(settings, progress=progress)
