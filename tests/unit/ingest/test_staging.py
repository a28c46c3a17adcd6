"""The embed job's stager: the device decoder runs on its own thread while another thread collects
the decode workers' next batch, so the two overlap instead of taking turns."""

from __future__ import annotations

import threading
from collections import defaultdict

from sidecar.ingest import decode_pool, embed
from sidecar.ingest.corpus import read_corpus

BATCH = 8


def test_the_next_batch_is_collected_while_the_device_decodes_this_one(encoder, corpus, monkeypatch):
    todo = [(item, "") for item in read_corpus(corpus)][:5 * BATCH]
    next_batch_loading = threading.Event()
    load_threads: list[str] = []
    load = decode_pool._load

    def recording_load(job):
        load_threads.append(threading.current_thread().name)
        if len(load_threads) > BATCH:
            next_batch_loading.set()
        return load(job)

    decode_threads: list[str] = []
    overlapped: list[bool] = []
    decode_on_device = encoder.images.decode_on_device

    def waiting_decode(jpegs, *, device):
        decode_threads.append(threading.current_thread().name)
        if len(decode_threads) == 1:  # inside the first batch's device decode: is the second one loading?
            overlapped.append(next_batch_loading.wait(timeout=10))
        return decode_on_device(jpegs, device=device)

    monkeypatch.setattr(decode_pool, "_load", recording_load)  # workers=0: loads run in this process
    monkeypatch.setattr(encoder.images, "decode_on_device", waiting_decode)
    staged = list(embed._staged_batches(todo, encoder, stages=defaultdict(float), batch_size=BATCH, workers=0,
                                        max_pixels=10**8, on_device=True))

    assert overlapped == [True]
    assert set(load_threads) == {"embed-collector"}
    assert set(decode_threads) == {threading.current_thread().name}
    assert [len(batch) for batch, _ in staged] == [BATCH] * 5
    assert all(pixels is not None for _, decoded in staged for pixels in decoded)
