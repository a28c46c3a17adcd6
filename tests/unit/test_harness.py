"""The test harness itself, where a fault in it costs more than one test: a server left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# A stand-in for a pytest run that starts a server as the fixtures do, prints the server's pid, then waits.
_RUN_STARTING_A_SERVER = """
import subprocess, sys, time
from tests.support import ends_with_the_test_run
server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                          preexec_fn=ends_with_the_test_run)
print(server.pid, flush=True)
time.sleep(300)
"""


def test_a_server_a_test_started_gets_sigterm_when_the_test_run_is_killed():
    run = subprocess.Popen([sys.executable, "-c", _RUN_STARTING_A_SERVER], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                           text=True)
    with run:
        server = int(run.stdout.readline())
        run.kill()  # SIGKILL: no teardown runs
    deadline = time.monotonic() + 30
    while _running(server):
        if time.monotonic() > deadline:
            os.kill(server, signal.SIGKILL)
            raise AssertionError("the server outlived the test run that started it")
        time.sleep(0.05)


def _running(pid: int) -> bool:
    # A dead orphan stays a zombie until init reaps it, which a container's init may never do.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")
