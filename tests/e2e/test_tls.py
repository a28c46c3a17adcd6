"""HTTPS from gunicorn itself (`serve --certfile/--keyfile`), the README's single-box example: a client
that verifies the server's self-signed certificate is served, one that does not know it is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from sidecar.api.auth import key_entry, new_key
from tests.support import gunicorn_server


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost and its key, made as the README makes one."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_gunicorn_serves_https_to_a_client_that_verifies_its_certificate(store_path, tmp_path, self_signed):
    cert, key = self_signed
    api_key = new_key()
    env = {"SIDECAR_STORE_PATH": str(store_path), "SIDECAR_TEXT_CACHE_PERSIST": "false",
           "SIDECAR_API_KEYS": key_entry("client", [], api_key)}
    with gunicorn_server(env, tmp_path / "server.log", serve_args=["--certfile", str(cert), "--keyfile", str(key)],
                         api_key=api_key, ca_file=cert) as url:
        assert url.startswith("https://127.0.0.1:")
        answer = requests.post(f"{url}/v1/search", json={"text": "red circle", "k": 3}, verify=str(cert), timeout=60,
                               headers={"Authorization": f"Bearer {api_key}"})
        assert answer.status_code == 200 and len(answer.json()["hits"]) == 3
        # The system's CAs do not know a self-signed certificate: verification fails, nothing is sent.
        with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            requests.get(f"{url}/healthz", timeout=10)
        # Plain HTTP to the TLS port gets no answer.
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"{url.replace('https://', 'http://')}/healthz", timeout=10)
        # The image's HEALTHCHECK speaks HTTPS where GUNICORN_CMD_ARGS gives gunicorn a certificate.
        port = url.rsplit(":", 1)[1]
        for args, healthy in (("", 1), (f"--certfile={cert} --keyfile={key}", 0)):
            probe = subprocess.run([sys.executable, "-m", "sidecar.api.healthcheck"], timeout=60,
                                   env={**os.environ, "GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_CMD_ARGS": args})
            assert probe.returncode == healthy, args


def test_certfile_without_keyfile_is_refused(self_signed):
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "serve", "--certfile", str(self_signed[0])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--certfile and --keyfile go together" in result.stderr
