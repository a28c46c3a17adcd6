"""The per-worker decode memory budget: holds, waits for room, gives up with 503, always gives back."""

from __future__ import annotations

import threading

import pytest

from sidecar.errors import Overloaded
from sidecar.serving.memory_budget import MemoryBudget


def test_a_reservation_waits_until_enough_is_given_back():
    budget = MemoryBudget(100)
    first_held, release_first, second_in = threading.Event(), threading.Event(), threading.Event()

    def hold_first():
        with budget.reserve(70, timeout_s=5):
            first_held.set()
            release_first.wait(5)

    def then_second():
        first_held.wait(5)
        with budget.reserve(50, timeout_s=30):
            second_in.set()

    threads = [threading.Thread(target=hold_first), threading.Thread(target=then_second)]
    for thread in threads:
        thread.start()
    first_held.wait(5)
    # 70 + 50 > 100: the second waits however long it is given, until the first gives back.
    assert not second_in.wait(0.2) and budget.held == 70
    release_first.set()
    for thread in threads:
        thread.join(10)
    assert second_in.is_set() and budget.held == 0


def test_no_room_within_the_timeout_is_overloaded_naming_the_setting():
    budget = MemoryBudget(100)
    with budget.reserve(100, timeout_s=0):
        with pytest.raises(Overloaded, match=r"memory budget \(decode_memory_bytes=100\): 100 bytes in use") as info:
            with budget.reserve(1, timeout_s=0.01):
                pass
    assert info.value.status == 503 and info.value.retry_after_s == 1.0
    assert budget.held == 0


def test_a_failed_decode_gives_its_share_back():
    budget = MemoryBudget(100)
    with pytest.raises(RuntimeError):
        with budget.reserve(60, timeout_s=0):
            raise RuntimeError("decoder crashed")
    assert budget.held == 0


def test_more_than_the_whole_budget_is_refused_at_once():
    with pytest.raises(ValueError, match="cannot reserve 101 bytes of a budget of 100"):
        with MemoryBudget(100).reserve(101, timeout_s=10):
            pass
