"""WSGI entry point for gunicorn (`sidecar.api.wsgi:app`): settings come from SIDECAR_* variables."""

from gunicorn.errors import AppImportError

from sidecar.api.app import create_app
from sidecar.config import Settings, is_unwritable_path, path_settings, unwritable_path_message
from sidecar.errors import UserFixable

try:
    app = create_app()
except UserFixable as exc:
    # A setting, model or store to fix (another model's store, a damaged file, a missing CA file), not a bug:
    # gunicorn prints an AppImportError as its message alone and stops the server ("App failed to load"), where any
    # other error is a traceback from every worker.
    raise AppImportError(str(exc)) from exc
except OSError as exc:
    if not is_unwritable_path(exc):
        raise
    # A store, cache or log path that cannot be written, named by its setting, as every command names it.
    raise AppImportError(unwritable_path_message(exc, path_settings(Settings.from_env()))) from exc
