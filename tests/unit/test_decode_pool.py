"""Decode workers hand each item its own pixels through shared-memory slots, in order."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sidecar.corpus import CorpusItem
from sidecar.decode_pool import decoded_batches


class SmallEncoder:
    """What decoded_batches needs from an encoder: the input side and the resize step."""

    image_size = 16

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.uint8)


def colour(i: int) -> tuple[int, int, int]:
    return (i * 37) % 256, (i * 91) % 256, (i * 53) % 256


@pytest.mark.parametrize("workers", [0, 2])
def test_every_item_gets_its_own_pixels_even_when_slots_are_reused(tmp_path, workers):
    todo = []
    for i in range(300):  # more items than slots (64 per worker): every slot is reused
        path = tmp_path / f"{i}.jpg"
        if i % 7 == 3:
            path.write_bytes(b"not a jpeg")
        else:
            Image.new("RGB", (24, 24), colour(i)).save(path, quality=95)
        todo.append((CorpusItem(id=str(i), path=path, text=""), f"hash-{i}"))

    # Keep every batch until the end: pixels must stay an item's own after its slot is reused.
    batches = list(decoded_batches(todo, SmallEncoder(), batch_size=8, workers=workers, max_pixels=10_000,
                                   on_device=False))
    seen = []
    for batch in batches:
        for item, digest, pixels, reason in batch:
            i = int(item.id)
            assert digest == f"hash-{i}"
            if i % 7 == 3:
                assert pixels is None and "not a recognised image format" in reason
            else:
                assert reason is None and pixels.shape == (16, 16, 3)
                np.testing.assert_allclose(pixels.reshape(-1, 3).mean(axis=0), colour(i), atol=3)
            seen.append(i)
    assert seen == list(range(300))
