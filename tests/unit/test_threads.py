"""NamedThread: the operating system shows a thread by the name Python gives it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sidecar.threads import NamedThread, name_for_the_os


def _os_name_inside(name: str) -> str:
    seen = {}

    def read() -> None:
        seen["comm"] = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    thread = NamedThread(target=read, name=name)
    thread.start()
    thread.join()
    return seen["comm"]


def test_a_named_thread_shows_its_name_to_the_operating_system():
    assert _os_name_inside("batcher-text") == "batcher-text"


def test_a_name_longer_than_the_kernel_keeps_is_cut_to_its_first_15_bytes():
    assert _os_name_inside("text-cache-writer") == "text-cache-writ"


def test_a_pool_thread_that_runs_name_for_the_os_first_shows_its_pools_name():
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer", initializer=name_for_the_os) as pool:
        comm = pool.submit(lambda: Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text()).result()
    assert comm.strip() == "shard-writer_0"
