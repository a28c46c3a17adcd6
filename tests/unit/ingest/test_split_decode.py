"""Split decode: the decode workers and the device decode JPEGs at the same time, in the share that
keeps both sides equally busy; and every decode refuses the files the workers refuse."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from sidecar.ingest.decode_pool import DecodeSplit
from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.shards import ShardSet
from tests.support import repeat_last_scan


def test_the_share_balances_the_workers_time_against_the_devices():
    # 2 workers: 1 ms per JPEG passed on, 5 ms per JPEG decoded; the device 2 ms per JPEG. At 3/8
    # on the CPU both sides take 1.25 ms per JPEG: (3/8 * 5 + 5/8 * 1) / 2 = 5/8 * 2.
    share = DecodeSplit.balance(pass_s=0.001, cpu_s=0.005, device_s=0.002, workers=2)
    assert share == pytest.approx(3 / 8)
    assert (share * 0.005 + (1 - share) * 0.001) / 2 == pytest.approx((1 - share) * 0.002)
    # A device far faster than the workers' reading alone takes (nearly) all; one far slower, (nearly) none.
    assert DecodeSplit.balance(pass_s=0.001, cpu_s=0.005, device_s=0.0001, workers=2) == DecodeSplit.BOUNDS[0]
    assert DecodeSplit.balance(pass_s=0.001, cpu_s=0.005, device_s=1.0, workers=64) == DecodeSplit.BOUNDS[1]


def test_the_share_starts_at_one_half_and_moves_to_the_balance_as_batches_are_measured():
    split = DecodeSplit(workers=2)
    assert split.share == 0.5
    for _ in range(30):  # each batch: 8 JPEGs passed on, 8 decoded, the device's time for its 8
        for route, seconds in [("device", 0.001), ("cpu", 0.005)] * 8:
            split.record_worker(route, seconds)
        split.record_device(8, 8 * 0.002)
    assert split.share == pytest.approx(3 / 8)
    assert (split.on_cpu, split.on_device) == (240, 240)


def test_a_split_embed_decodes_on_both_sides_and_matches_the_cpu_decode(encoder, corpus, shards, tmp_path, caplog):
    # On a CPU-only machine the "device" decoder is torchvision's JPEG decoder in the job's own
    # process: the split's plumbing and its pixels are what is under test here.
    out = tmp_path / "split"
    with caplog.at_level(logging.INFO, logger="sidecar.ingest.embed"):
        summary = embed_corpus(encoder, corpus, out, workers=2, batch_size=64, decode="split", progress=False)
    assert summary.failed == 0 and summary.embedded == summary.total
    message = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("split decode"))
    on_cpu, total = (int(word) for word in message.split()[2:5:2])
    assert total == summary.embedded and 0 < on_cpu < total, message
    assert json.loads((out / "manifest.json").read_text())["preprocessing"]["decode"] == "split (torchvision)"
    assert any("--decode split on a CPU device" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")

    split_vectors = {doc.id: doc.vector for batch in ShardSet(out).documents() for doc in batch}
    cpu_vectors = {doc.id: doc.vector for batch in ShardSet(shards).documents() for doc in batch}
    assert split_vectors.keys() == cpu_vectors.keys()
    ids = sorted(cpu_vectors)
    cosines = np.einsum("ij,ij->i", np.stack([split_vectors[i] for i in ids]), np.stack([cpu_vectors[i] for i in ids]))
    # Identical where the worker decoded; within the device path's pixel tolerance elsewhere.
    assert np.isclose(cosines, 1.0, atol=1e-5).sum() >= on_cpu
    assert cosines.min() > 0.98, cosines.min()


def test_a_device_embed_with_nvimagecodec_records_it_and_matches_the_cpu_decode(encoder, corpus, shards, tmp_path):
    # On a CPU-only machine nvImageCodec runs its CPU-only decoder in the job's own process: the
    # --jpeg-decoder plumbing and its pixels are under test (tests/gpu runs it on nvjpeg / hardware).
    out = tmp_path / "nvimagecodec"
    summary = embed_corpus(encoder, corpus, out, workers=2, batch_size=64, decode="device",
                           jpeg_decoder="nvimagecodec", progress=False)
    assert summary.failed == 0 and summary.embedded == summary.total
    assert json.loads((out / "manifest.json").read_text())["preprocessing"]["decode"] == "device (nvimagecodec)"
    device_vectors = {doc.id: doc.vector for batch in ShardSet(out).documents() for doc in batch}
    cpu_vectors = {doc.id: doc.vector for batch in ShardSet(shards).documents() for doc in batch}
    ids = sorted(cpu_vectors)
    assert sorted(device_vectors) == ids
    cosines = np.einsum("ij,ij->i", np.stack([device_vectors[i] for i in ids]), np.stack([cpu_vectors[i] for i in ids]))
    assert cosines.min() > 0.98, cosines.min()


@pytest.mark.parametrize("decode", ["cpu", "device", "split"])
def test_a_progressive_jpeg_of_too_many_scans_is_listed_unusable_by_every_decode_not_embedded(encoder, tmp_path,
                                                                                               decode):
    # The decode workers refuse it before decoding (the built-in max scans); the device decoder would make each scan's
    # pass over the image and store it. On a CPU-only machine the "device" decoder is torchvision's.
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="JPEG", progressive=True)
    images = tmp_path / "images"
    images.mkdir()
    (images / "fine.jpg").write_bytes(buffer.getvalue())
    (images / "bomb.jpg").write_bytes(repeat_last_scan(buffer.getvalue(), 200))
    out = tmp_path / "shards"
    summary = embed_corpus(encoder, images, out, workers=0, decode=decode, progress=False)
    assert (summary.embedded, summary.failed) == (1, 1)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["reason"]) for e in errors] == [("bomb.jpg", "progressive JPEG of 209 scans, over the built-in "
                                                        "limit of 100: each scan is a pass over the whole image")]
