"""The Ray engine's driver connects with short timeouts, and only while it connects."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def test_a_port_without_a_ray_head_fails_within_seconds_in_a_process_that_imported_ray_and_leaves_no_setting():
    pytest.importorskip("ray", reason="the ray extra is not installed")
    with socket.socket() as listening:  # accepts connections (the kernel's backlog), answers nothing: not a Ray head
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        # A process of its own (a failed ray.init leaves Ray's state behind), which imported Ray before the job.
        script = textwrap.dedent(f"""
            import json, os, time
            import ray
            from sidecar.ingest.ray_engine import RAY_CONNECT_SETTINGS, RayUnavailable, _connect

            started = time.monotonic()
            try:
                _connect({address!r}, verbose=False)
            except RayUnavailable as exc:
                error = str(exc)
            print(json.dumps({{"seconds": time.monotonic() - started, "error": error,
                              "left": sorted(name for name in RAY_CONNECT_SETTINGS if name in os.environ)}}))
        """)
        env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                cwd=REPO, env={**env, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["error"].startswith(f"no Ray cluster answers at {address}: no Ray head answered there within 6 s")
    assert outcome["seconds"] < 25  # 42 s while Ray kept the settings it read at its import; room for a busy machine
    assert outcome["left"] == []  # children of the job's process and its later ray.init calls get Ray's own


def test_the_drivers_cpp_log_lines_become_debug_records_and_a_fatal_one_a_critical_record(caplog):
    """Ray's C++ log on the driver wrote its ERROR lines (notes to itself) straight to the terminal, even with -q; a
    fatal one (the core worker ending the process) must still reach it."""
    from sidecar.ingest.ray_engine import _log_native_lines

    read_end, write_end = os.pipe()
    with open(write_end, "w") as native:
        native.write("[2026-12-02 12:36:22,411 E 9300 9300] core_worker.cc:2465: Actor with class name: 'MapWorker'\n"
                     "\n[2026-12-02 12:37:22,411 F 9300 9311] gcs_client.cc:85: Failed to connect to GCS within 60 s\n")
    caplog.set_level(logging.DEBUG, logger="ray.core_worker")
    _log_native_lines(read_end)
    assert [(record.name, record.levelno, record.getMessage()[:40]) for record in caplog.records] == [
        ("ray.core_worker", logging.DEBUG, "[2026-12-02 12:36:22,411 E 9300 9300] co"),
        ("ray.core_worker", logging.CRITICAL, "[2026-12-02 12:37:22,411 F 9300 9311] gc")]
