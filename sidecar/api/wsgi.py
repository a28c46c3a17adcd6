"""WSGI entry point for gunicorn (`sidecar.api.wsgi:app`): settings come from SIDECAR_* variables."""

from sidecar.api.app import create_app

app = create_app()
