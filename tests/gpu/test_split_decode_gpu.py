"""Split decode on a GPU: nvjpeg and the CPU workers decode one job's JPEGs together, and a batch
mixing their pixels reaches the model intact (runs only where a GPU is)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sidecar.config import Settings
from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.shards import ShardSet
from sidecar.model.encoder import load_encoder
from sidecar.model.synthetic import write_corpus

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def vectors(folder) -> dict[str, np.ndarray]:
    return {doc.id: doc.vector for batch in ShardSet(folder).documents() for doc in batch}


def test_a_split_embed_on_the_gpu_uses_both_decoders_and_matches_the_cpu_decode(tmp_path, caplog):
    torch.manual_seed(0)  # ViT-B-32 with random weights: the plumbing is under test, not the ranking
    encoder = load_encoder(Settings(model="ViT-B-32", device="cuda", cache_dir=tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", 600, seed=5, size=320)
    cpu = embed_corpus(encoder, corpus, tmp_path / "cpu", workers=2, batch_size=128, decode="cpu", progress=False)
    with caplog.at_level(logging.INFO, logger="sidecar.ingest.embed"):
        split = embed_corpus(encoder, corpus, tmp_path / "split", workers=2, batch_size=128, decode="split",
                             progress=False)
    assert cpu.failed == split.failed == 0 and split.embedded == split.total == 600
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("split decode"))
    on_cpu, total = (int(word) for word in message.split()[2:5:2])
    assert total == 600 and 0 < on_cpu < total, message

    by_cpu, by_split = vectors(tmp_path / "cpu"), vectors(tmp_path / "split")
    ids = sorted(by_cpu)
    got = np.stack([by_split[i] for i in ids])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    cosines = np.einsum("ij,ij->i", got, np.stack([by_cpu[i] for i in ids]))
    assert np.median(cosines) > 0.99 and cosines.min() > 0.9, (np.median(cosines), cosines.min())
