"""Gunicorn settings for the sidecar: threaded workers, the model loaded once per worker after fork."""

import json
import os

from gunicorn import util

# gthread: request threads in one process share its model and micro-batcher, which is what
# lets concurrent requests batch together.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
workers = int(os.environ.get("GUNICORN_WORKERS", "1"))
bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8080")
# Never preload: CUDA does not survive fork, so each worker imports the app (and loads the
# model) after it is forked.
preload_app = False
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))  # first request may wait for model load
graceful_timeout = 30
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")


def post_fork(server, worker):
    """Split the GPU between workers: SIDECAR_GPU_MEMORY_FRACTION (e.g. 0.45 with two workers)."""
    fraction = os.environ.get("SIDECAR_GPU_MEMORY_FRACTION")
    if fraction:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(float(fraction))
            server.log.info("worker %s: GPU memory budget %.0f%%", worker.pid, 100 * float(fraction))



def write_json_error(sock, status_int, reason, mesg):
    """gunicorn.util.write_error's signature and framing, the API's {"error": {"code", "message"}} body."""
    code = reason.lower().replace(" ", "_")  # "URI Too Long" -> uri_too_long, as the app names HTTP errors
    body = json.dumps({"error": {"code": code, "message": mesg or reason}}).encode("utf-8")
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


# Gunicorn answers a request it cannot parse (400; 414 for a request line over 4094 bytes; 431 for a
# header over 8190 bytes; 417) itself, before the app sees it, with an HTML page. It has no hook for
# that page; its workers write it through `gunicorn.util.write_error`, replaced here, in the arbiter
# that reads this file, before any worker is forked.
util.write_error = write_json_error
