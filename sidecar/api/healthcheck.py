"""The container's health probe (the HEALTHCHECK of docker/Dockerfile.cpu and .gpu): GET /healthz on the
loopback port, over HTTPS where gunicorn was given a certificate (`--certfile` in GUNICORN_CMD_ARGS, as
the README's TLS section tells the image's users), and exit 0 when it answers 200. The certificate is not
verified: the probe asks whether this server is alive, not whether a client would trust it.

    python -m sidecar.api.healthcheck [PORT]      (default 8080, the image's port)
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def healthy(port: int) -> bool:
    tls = "--certfile" in os.environ.get("GUNICORN_CMD_ARGS", "")
    context = ssl._create_unverified_context() if tls else None  # our own loopback port: liveness, not trust
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as answer:
            return answer.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(0 if healthy(int(sys.argv[1]) if len(sys.argv) > 1 else 8080) else 1)
