"""What identifies an item's indexed form: the image's bytes, and the document (image + text + metadata).

Two hashes, because they decide two different things. The image hash decides whether the image
must be encoded again; the document hash decides whether the store must be written again. A
caption or metadata edit changes the document hash only: the item is re-indexed with its
stored vector, without running the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping


def image_hash(source: Path | bytes) -> str:
    """Identity of a file's bytes (read from `source`, or `source` itself): an edited image is
    re-embedded, a touched one is not."""
    digest = hashlib.sha256()
    if isinstance(source, bytes):
        digest.update(source)
    else:
        with Path(source).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def document_hash(image: str, text: str, metadata: Mapping[str, Any]) -> str:
    """Identity of everything a store holds for an item: its image hash, text and metadata
    (key order does not matter). Raises TypeError or ValueError for metadata JSON cannot represent,
    NaN and Infinity included: the stores refuse them, so a hash of them would name a document no
    store can hold."""
    canonical = json.dumps([image, text, metadata], ensure_ascii=False, allow_nan=False, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]
