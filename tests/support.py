"""Helpers for tests: base64 images."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image


def image_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def png_b64(colour=(255, 0, 0), size=(32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
