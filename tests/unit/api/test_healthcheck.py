"""The images' health probe finds the server where gunicorn listens, whatever port GUNICORN_BIND or
GUNICORN_CMD_ARGS gives it."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sidecar.api.healthcheck import healthy, probe_url


class _Alive(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_probe_asks_the_port_gunicorn_binds_not_8080():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Alive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert healthy({"GUNICORN_BIND": f"0.0.0.0:{port}"})
        assert healthy({"GUNICORN_BIND": "0.0.0.0:1", "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port}"})
        assert not healthy({"GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_CMD_ARGS": "--bind 127.0.0.1:1"})
    finally:
        server.shutdown()
        server.server_close()


def test_the_probe_url_follows_the_bind_and_the_certificate_as_gunicorn_reads_them():
    assert probe_url({}) == "http://127.0.0.1:8080/healthz"
    assert probe_url({"GUNICORN_BIND": "[::]:9000"}) == "http://[::1]:9000/healthz"
    assert probe_url({"GUNICORN_BIND": "10.0.0.5:9001", "GUNICORN_CMD_ARGS": "--certfile=/c.pem --keyfile=/k.pem"}) \
        == "https://10.0.0.5:9001/healthz"
    with pytest.raises(ValueError, match="gunicorn binds /run/sidecar.sock, not a TCP port"):
        probe_url({"GUNICORN_BIND": "unix:/run/sidecar.sock"})


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_the_images_healthcheck_names_no_port_of_its_own(dockerfile):
    text = (Path(__file__).parents[3] / "docker" / dockerfile).read_text(encoding="utf-8")
    assert re.search(r"^HEALTHCHECK .* CMD (.*)$", text, flags=re.MULTILINE).group(1) == "python -m sidecar.api.healthcheck"
