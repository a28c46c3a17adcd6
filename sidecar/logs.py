"""Which records reach the log (the project's, third parties' from WARNING), each one line, tracebacks included, for
log shippers that read a record per line."""

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


def route_logs(handlers: list[logging.Handler], *, app_level: int, verbose: bool) -> None:
    """Every logger's records to `handlers` (the CLI's stderr; a gunicorn worker's error log): the project's own
    (`sidecar`) from `app_level`; third-party ones (faiss's loader, open_clip, opensearch-py's request log) only
    from WARNING unless `verbose`, so their chatter does not interleave with the progress a user is watching.
    opensearch-py's failed-request warnings (a line, or a traceback, per attempt: each /readyz probe while the
    index is missing) only from ERROR: the store reports each failure itself, in one line. The root logger gets
    handlers here, so a library's `logging.info(...)` (open_clip's) finds it configured and does not call
    `logging.basicConfig`, whose `WARNING:name:message` lines bypassed these handlers and their format."""
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("sidecar").setLevel(app_level)
    logging.getLogger("opensearch").setLevel(logging.DEBUG if verbose else logging.ERROR)
