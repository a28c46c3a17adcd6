"""The container's health probe (the HEALTHCHECK of docker/Dockerfile.cpu and .gpu): GET /healthz where gunicorn
listens, read as gunicorn reads it (a --bind in GUNICORN_CMD_ARGS, else GUNICORN_BIND, else 0.0.0.0:8080), over
HTTPS where gunicorn was given a certificate (`--certfile` in GUNICORN_CMD_ARGS, as the README's TLS section
tells the image's users), and exit 0 when it answers 200. The certificate is not verified: the probe asks
whether this server is alive, not whether a client would trust it.

    python -m sidecar.api.healthcheck
"""

from __future__ import annotations

import os
import shlex
import ssl
import sys
import urllib.request
from collections.abc import Mapping

# A wildcard address listens on every interface; the probe, inside the container, asks the loopback one.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def config_bind(environ: Mapping[str, str]) -> str:
    """The address sidecar/api/gunicorn_config.py binds: GUNICORN_BIND, else every interface's port 8080."""
    return environ.get("GUNICORN_BIND", "0.0.0.0:8080")


def probe_url(environ: Mapping[str, str]) -> str:
    """/healthz at the first address gunicorn binds: GUNICORN_CMD_ARGS overrides the config file, as in gunicorn."""
    from gunicorn.config import Config
    from gunicorn.util import parse_address

    args = Config().parser().parse_args(shlex.split(environ.get("GUNICORN_CMD_ARGS", "")))
    address = parse_address((args.bind or [config_bind(environ)])[0])
    if not isinstance(address, tuple):
        raise ValueError(f"gunicorn binds {address}, not a TCP port: the probe speaks HTTP over TCP only")
    host, port = _LOOPBACK.get(address[0], address[0]), address[1]
    return f"{'https' if args.certfile else 'http'}://{f'[{host}]' if ':' in host else host}:{port}/healthz"


def healthy(environ: Mapping[str, str]) -> bool:
    url = probe_url(environ)
    context = ssl._create_unverified_context() if url.startswith("https:") else None  # liveness, not trust
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as answer:
            return answer.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(0 if healthy(os.environ) else 1)
