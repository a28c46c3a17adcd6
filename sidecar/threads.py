"""Threads the operating system knows by name.

Python before 3.14 names a thread for itself only: `top -H`, `ps -L`, py-spy and /proc/PID/task/*/comm
show every thread of a worker as "python" (or the process title), so which of them burns a core —
the model thread, a request thread, the cache writer — cannot be told from outside. The project's
own threads start through `NamedThread`, and its thread pools run `name_for_the_os` first (their
`initializer`): either gives the kernel the thread's name (cut to the kernel's 15 bytes)."""

from __future__ import annotations

import threading

from setproctitle import setthreadtitle


def name_for_the_os() -> None:
    """Give the calling thread's Python name to the operating system (a thread pool's `initializer`)."""
    setthreadtitle(threading.current_thread().name)


class NamedThread(threading.Thread):
    """`threading.Thread` whose name the operating system shows too."""

    def run(self) -> None:
        name_for_the_os()
        super().run()
