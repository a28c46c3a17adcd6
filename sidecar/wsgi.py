"""WSGI entry point for gunicorn (`sidecar.wsgi:app`): settings come from SIDECAR_* variables."""

from sidecar.app import create_app

app = create_app()
