"""Request validation's own costs: checking a body holds memory for its nesting, not for its values."""

import subprocess
import sys

# tracemalloc counts every Python thread's allocations; in a full run, threads left by session fixtures
# (servers, Ray's driver) allocated 367 KB inside the window, so the check is measured in a process of its own.
MEASURE_PEAK = """
import tracemalloc
from sidecar.api.validation import check_json_values
body = {"input": [0] * 200_000, "filters": {"size": [[1.5, "x"]] * 1000}}
tracemalloc.start()
check_json_values(body, max_depth=32)
print(tracemalloc.get_traced_memory()[1])
"""


def test_checking_a_long_list_holds_memory_for_its_nesting_not_for_its_values():
    # 200,000 zeros is 400 KB of JSON; at max_body_bytes (32 MB) a walk holding an entry and a path per
    # value grew by 2 GiB.
    peak = int(subprocess.run([sys.executable, "-c", MEASURE_PEAK], capture_output=True, text=True,
                              check=True).stdout)
    assert peak < 64 * 1024, f"{peak} bytes held"
