"""The rolling window /v1/status reports from (sidecar.serving.metric_window)."""

from __future__ import annotations

import time

from sidecar.serving.metric_window import MetricWindow, read_series
from sidecar.serving.metrics import MULTIPROC_ENV


def test_snapshots_go_on_after_a_read_of_the_multiprocess_files_failed(tmp_path, monkeypatch):
    # A worker's series file is empty between its creation and its sizing: a read catching it then fails. The
    # snapshot thread ended there, and the window's base stayed its last snapshot: an ever longer "last hour".
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    reads: list[float] = []

    def read():
        reads.append(time.monotonic())
        return read_series()

    window = MetricWindow(window_s=0.5, every_s=0.01, read=read)
    caught = tmp_path / "counter_99999.db"
    caught.touch()
    window.start()
    try:
        deadline = time.monotonic() + 10
        while len(reads) < 3 and time.monotonic() < deadline:  # the first read and a failed snapshot at least
            time.sleep(0.01)
        caught.unlink()
        failed = len(reads)
        while len(reads) < failed + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(reads) >= failed + 3, "no snapshot was taken after a failed one"
    finally:
        window.close()


def test_a_window_whose_first_read_of_the_multiprocess_files_failed_boots_and_reports_from_its_next_snapshot(
        tmp_path, monkeypatch):
    # The first snapshot is taken as the app is built: its failure failed the worker's boot, and gunicorn stops a
    # server whose worker cannot boot.
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    caught = tmp_path / "counter_99999.db"
    caught.touch()
    clock = [1000.0]
    window = MetricWindow(window_s=60, every_s=10, clock=lambda: clock[0])
    caught.unlink()
    assert window.summary()["window_s"] == 0 and window.summary()["recall"]["checked"] == 0
    window.take_snapshot()
    clock[0] += 30
    assert window.summary()["window_s"] == 30
