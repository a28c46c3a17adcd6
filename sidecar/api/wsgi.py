"""WSGI entry point for gunicorn (`sidecar.api.wsgi:app`): settings come from SIDECAR_* variables."""

from gunicorn.errors import AppImportError

from sidecar.api.app import create_app
from sidecar.config import Settings, SettingsError, is_unwritable_path, path_settings, unwritable_path_message
from sidecar.model.weights import ModelNotCached, ModelSettingsError
from sidecar.stores.base import StoreError

try:
    app = create_app()
except (SettingsError, ModelSettingsError, ModelNotCached, StoreError) as exc:
    # A setting (or a store the user fixes: another model's, a damaged file, a missing CA file) to fix, not a bug:
    # gunicorn prints an AppImportError as its message alone and stops the server ("App failed to load"), where any
    # other error is a traceback from every worker.
    raise AppImportError(str(exc)) from exc
except OSError as exc:
    if not is_unwritable_path(exc):
        raise
    # A store, cache or log path that cannot be written, named by its setting, as every command names it.
    raise AppImportError(unwritable_path_message(exc, path_settings(Settings.from_env()))) from exc
