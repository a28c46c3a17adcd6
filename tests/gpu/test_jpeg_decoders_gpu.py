"""The device's JPEG decoders on a GPU: nvImageCodec (hardware decoders where the GPU has them)
against torchvision's nvjpeg, image by image and through the embed job (runs only where a GPU is
and nvImageCodec is installed: the `nvimagecodec` extra)."""

from __future__ import annotations

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


@pytest.fixture(autouse=True)
def nvimagecodec():
    # At test time, after the CUDA skip: a machine without a GPU never loads the library (collection
    # imports every test module into the one pytest process).
    pytest.importorskip("nvidia.nvimgcodec", reason="needs nvImageCodec (pip install 'clip-sidecar[nvimagecodec]')")


def vectors(folder) -> dict[str, np.ndarray]:
    return {doc.id: doc.vector for batch in ShardSet(folder).documents() for doc in batch}


def test_nvimagecodec_on_the_gpu_decodes_as_nvjpeg_does_and_fails_the_same_files(tmp_path):
    torch.manual_seed(0)  # random weights: the decode is under test, not the ranking
    encoder = load_encoder(Settings(model="ViT-B-32", device="cuda", cache_dir=tmp_path / "cache"))
    write_corpus(tmp_path / "corpus", 64, seed=7, size=320)
    jpegs = [path.read_bytes() for path in sorted((tmp_path / "corpus").glob("*.jpg"))]
    assert len(jpegs) == 64
    jpegs.append(jpegs[0][:200])  # cut inside its headers
    by = {decoder: encoder.images.decode_on_device(jpegs, device=encoder.device, decoder=decoder)
          for decoder in ("torchvision", "nvimagecodec")}
    assert by["nvimagecodec"][-1] is None and by["torchvision"][-1] is None
    for ours, theirs in zip(by["nvimagecodec"][:-1], by["torchvision"][:-1]):
        assert ours.device.type == "cuda" and ours.shape == theirs.shape and ours.dtype == torch.uint8
        # Hardware and CUDA IDCTs may round differently; the pictures are the same.
        assert (ours.float() - theirs.float()).abs().mean().item() < 2.0


def test_a_device_embed_with_nvimagecodec_on_the_gpu_matches_the_cpu_decode(tmp_path):
    torch.manual_seed(0)
    encoder = load_encoder(Settings(model="ViT-B-32", device="cuda", cache_dir=tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", 600, seed=5, size=320)
    cpu = embed_corpus(encoder, corpus, tmp_path / "cpu", workers=2, batch_size=128, decode="cpu", progress=False)
    device = embed_corpus(encoder, corpus, tmp_path / "device", workers=2, batch_size=128, decode="device",
                          jpeg_decoder="nvimagecodec", progress=False)
    assert cpu.failed == device.failed == 0 and device.embedded == 600
    by_cpu, by_device = vectors(tmp_path / "cpu"), vectors(tmp_path / "device")
    ids = sorted(by_cpu)
    cosines = np.einsum("ij,ij->i", np.stack([by_device[i] for i in ids]), np.stack([by_cpu[i] for i in ids]))
    assert np.median(cosines) > 0.99 and cosines.min() > 0.9, (np.median(cosines), cosines.min())
