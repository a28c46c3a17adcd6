"""CUDA graphs of the text tower give the eager tower's vectors (runs only where a GPU is)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from sidecar.config import Settings
from sidecar.model.encoder import load_encoder

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """ViT-B-32 with random weights (speed and equivalence do not depend on weight values)."""
    settings = Settings(model="ViT-B-32", device="cuda", cache_dir=tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    graphed = load_encoder(settings)
    graphed.text_tower.capture_graphs(64)
    assert graphed.text_tower.graphs is not None, "capture failed: see the warning logged"
    eager = load_encoder(settings)
    eager.model.load_state_dict(graphed.model.state_dict())
    return graphed, eager


def tokens_for(encoder, n: int, offset: int = 0) -> torch.Tensor:
    return encoder.prepare_texts([f"photo number {offset + i} of a red sneaker" for i in range(n)]).tokens


@pytest.mark.parametrize("n", [1, 3, 16, 64, 100])
def test_graph_replay_matches_eager(encoders, n):
    graphed, eager = encoders
    tokens = tokens_for(graphed, n)
    got = graphed.postprocess(graphed.forward_texts(tokens))
    want = eager.postprocess(eager.forward_texts(tokens))
    assert got.shape == want.shape == (n, graphed.dim)
    np.testing.assert_allclose((got * want).sum(axis=1), 1.0, atol=2e-3)


def test_concurrent_replays_keep_their_own_rows(encoders):
    graphed, eager = encoders
    batches = [tokens_for(graphed, 1 + i % 7, offset=100 * i) for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: graphed.postprocess(graphed.forward_texts(t)), batches))
    for tokens, got in zip(batches, results):
        want = eager.postprocess(eager.forward_texts(tokens))
        np.testing.assert_allclose((got * want).sum(axis=1), 1.0, atol=2e-3)
