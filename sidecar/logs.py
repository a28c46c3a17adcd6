"""Log records one line each, tracebacks included, for log shippers that read a record per line."""

from __future__ import annotations

import logging


class OneLineFormatter(logging.Formatter):
    """`inner`'s lines, every line break of the record written as the two characters `\\n`: an unhandled
    error's traceback (a 500, a bug) then stays in its record instead of arriving as one record per frame
    (Kubernetes, journald and most shippers read a record per line). `sed 's/\\\\n/\\n/g'` unfolds one."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return self.inner.format(record).replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
