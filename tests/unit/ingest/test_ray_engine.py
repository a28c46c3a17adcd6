"""The Ray engine's pieces that need no cluster: the driver connects with short timeouts (and only while it connects), its
C++ log is quiet, an encoder actor names its node."""

from __future__ import annotations

import json
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


def test_the_drivers_cpp_log_shows_only_its_fatal_line_even_when_the_process_ends_right_after_it():
    """Ray's C++ log on the driver wrote its ERROR lines (notes to itself) straight to the terminal, even with -q; a
    fatal one (the core worker ending the process at once: the head lost) must still reach it."""
    script = textwrap.dedent("""
        import ctypes, os
        from sidecar.ingest.ray_engine import _fatal_lines_only

        libc = ctypes.CDLL(None)
        libc.fputs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        stream = _fatal_lines_only()
        libc.fputs(b"[2026-12-02 12:36:22,411 E 9300 9300] core_worker.cc:2465: Actor with class name: 'MapWorker'\\n",
                   stream)
        libc.fputs(b"[2026-12-02 12:37:22,411 F 9300 9311] gcs_client.cc:85: Failed to connect to GCS within 60 s\\n",
                   stream)
        os._exit(1)  # as the core worker ends the process: no Python clean-up, no flush of Python's own streams
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.returncode == 1
    assert process.stderr == ("[2026-12-02 12:37:22,411 F 9300 9311] gcs_client.cc:85: Failed to connect to GCS within "
                              "60 s\n")


def test_the_encoder_actors_second_read_for_the_fine_model_names_its_node_when_the_file_cannot_be_read(
        model_settings, tmp_path):
    """The fine model reads each file again on the actor's node: a node that cannot see it is named, as a decode
    task's is, so the driver stops the job saying which node must see SOURCE."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    import dataclasses

    import numpy as np
    import ray

    from sidecar.ingest.decode_pool import READ_FAILED
    from sidecar.ingest.ray_engine import _EncodeBatches

    actor = _EncodeBatches(dataclasses.replace(model_settings, fine_model=model_settings.model), max_pixels=10**7,
                           counter=None)
    side = actor.encoder.images.spec.output_size[0]
    batch = {"path": np.array([str(tmp_path / "gone.jpg")], dtype=object), "row": np.array(["{}"], dtype=object),
             "reason": np.array([""], dtype=object), "pixels": np.zeros((1, side, side, 3), dtype=np.uint8),
             "thumbnail": np.array([b""], dtype=object), "decode_s": np.zeros(1)}
    [reason] = actor(batch)["reason"]
    assert reason.startswith(f"{READ_FAILED}: ") and reason.endswith(f" on Ray node {ray.util.get_node_ip_address()}")


class _GpuCluster:
    """The two calls `_actor_pool` makes of Ray, answered as a cluster of two nodes with 4 CPUs and 1 GPU each would:
    no GPU machine is at hand here to start a real one on."""

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 8.0, "GPU": 2.0}

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}} for _ in range(2)]


@pytest.mark.parametrize(("device", "pool"), [("auto", (2, 1.0)), ("cuda", (2, 1.0)), ("cpu", (4, 0.0))])
def test_device_cpu_on_a_gpu_cluster_runs_cpu_actors_that_reserve_no_gpu(device, pool):
    # Before, every actor reserved a GPU whatever --device said: idle GPUs, and as many actors as GPUs.
    from sidecar.ingest.ray_engine import RayResources, _actor_pool

    assert _actor_pool(_GpuCluster(), RayResources(), device=device) == pool
