"""Request validation's own costs: checking a body holds memory for its nesting, not for its values."""

import tracemalloc

from sidecar.api.validation import check_json_values


def test_checking_a_long_list_holds_memory_for_its_nesting_not_for_its_values():
    # 200,000 zeros is 400 KB of JSON; at max_body_bytes (32 MB) a walk holding an entry and a path per
    # value grew by 2 GiB.
    body = {"input": [0] * 200_000, "filters": {"size": [[1.5, "x"]] * 1000}}
    tracemalloc.start()
    try:
        check_json_values(body, max_depth=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes held"
