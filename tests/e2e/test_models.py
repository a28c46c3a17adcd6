"""`clip-sidecar models fetch|train` and the server's refusal to download or train a missing model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli.serve import GUNICORN_CONFIG
from sidecar.model.tiny_model import checkpoint_path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fetch_and_train_report_the_cached_tiny_model(test_cache_dir):
    result = run_cli("models", "fetch")
    assert result.returncode == 0, result.stderr
    assert f"tiny-clip is cached: {checkpoint_path(test_cache_dir)}" in result.stdout
    result = run_cli("models", "train")
    assert result.returncode == 0, result.stderr
    assert f"tiny-clip is already trained: {checkpoint_path(test_cache_dir)}" in result.stdout


def test_serve_refuses_a_model_that_is_not_cached_and_names_the_command(tmp_path):
    empty = {"SIDECAR_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = run_cli("serve", "--port", str(closed_port()), env=empty, timeout=60)
    assert result.returncode == 1
    assert "not starting the server: the tiny model is not trained yet" in result.stderr
    assert "clip-sidecar models train" in result.stderr
    assert not any((tmp_path / "empty-cache").rglob("*.pt"))

    result = run_cli("serve", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k", env=empty, timeout=60)
    assert result.returncode == 1
    assert "weights ViT-B-32 / laion2b_s34b_b79k are not in" in result.stderr
    assert "clip-sidecar models fetch" in result.stderr


def test_a_gunicorn_worker_without_the_model_fails_to_boot_instead_of_training(tmp_path, store_path):
    # gunicorn started directly (as a container's CMD does), past `serve`'s check.
    env = {**os.environ, "SIDECAR_CACHE_DIR": str(tmp_path / "empty-cache"), "SIDECAR_STORE_PATH": str(store_path)}
    result = subprocess.run([sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG,
                             "--bind", f"127.0.0.1:{closed_port()}", "sidecar.api.wsgi:app"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "ModelNotCached" in result.stderr and "clip-sidecar models train" in result.stderr
    assert not any((tmp_path / "empty-cache").rglob("*.pt")), "a worker trained the model"


@pytest.mark.slow  # huggingface_hub retries a refused connection with back-off (~45 s)
def test_fetch_fails_with_a_clear_message_when_the_hub_is_unreachable(tmp_path):
    cache = tmp_path / "cache"
    unreachable = {"SIDECAR_CACHE_DIR": str(cache), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    result = run_cli("models", "fetch", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k",
                     env=unreachable)
    assert result.returncode == 1
    message = result.stderr.splitlines()[-1]
    assert message.startswith("Error: could not download ViT-B-32 / laion2b_s34b_b79k from the Hugging Face Hub "
                              "(laion/CLIP-ViT-B-32-laion2B-s34B-b79K)"), message
    assert "pass --pretrained /path/to/checkpoint" in message
    assert not [p for p in Path(cache).rglob("*") if p.is_file() and p.stat().st_size > 0 and "lock" not in p.name]
