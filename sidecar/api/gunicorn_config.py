"""Gunicorn settings for the sidecar: threaded workers, the model loaded once per worker after fork."""

import os

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
