"""WSGI entry point for gunicorn (`sidecar.api.wsgi:app`): settings come from SIDECAR_* variables."""

from gunicorn.errors import AppImportError

from sidecar.api.app import create_app
from sidecar.config import SettingsError
from sidecar.model.weights import ModelNotCached, ModelSettingsError
from sidecar.stores.base import QueryModelMismatch, StoreDamaged

try:
    app = create_app()
except (SettingsError, ModelSettingsError, ModelNotCached, QueryModelMismatch, StoreDamaged) as exc:
    # A setting (or a damaged store file) to fix, not a bug: gunicorn prints an AppImportError as its message
    # alone and stops the server ("App failed to load"), where any other error is a traceback from every worker.
    raise AppImportError(str(exc)) from exc
