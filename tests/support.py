"""Helpers for tests: base64 images, the environment as the test run found it."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from PIL import Image


def image_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def png_b64(colour=(255, 0, 0), size=(32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Taken when the first test module imports this, before any fixture changes the environment:
# scripts that manage machine-wide things (the OpenSearch node) must see the real cache path.
ORIGINAL_ENVIRON = dict(os.environ)


class ThreadKiller(BaseException):
    """Not an Exception: the micro-batcher isolates failing requests with `except Exception`, so this
    one escapes its loop and ends the encode thread for real, through the real code path — what a
    bug in the loop or an interpreter-level error would do — without patching the batcher."""
