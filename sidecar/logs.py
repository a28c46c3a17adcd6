"""Which records reach the log (the project's, third parties' from WARNING), each one line, tracebacks included, for
log shippers that read a record per line."""

from __future__ import annotations

import io
import logging
import threading


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
    `logging.basicConfig`, whose `WARNING:name:message` lines bypassed these handlers and their format.
    Ray Data's errors (a failed task's traceback, logged before the job gets the error, which says it in one line)
    only when `verbose`: see `adopt_library_loggers` for how Ray's records get here."""
    root = logging.getLogger()
    for handler in handlers:
        (handler.removeFilter if verbose else handler.addFilter)(_said_by_the_job)
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("sidecar").setLevel(app_level)
    logging.getLogger("opensearch").setLevel(logging.DEBUG if verbose else logging.ERROR)


def _said_by_the_job(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.name.startswith("ray.data"))


def adopt_library_loggers(*names: str) -> None:
    """The named loggers, which a library configured at its import (Ray's `ray` and `ray.data`: a handler of their own
    on the terminal, not propagating, at INFO), routed as `route_logs` routes the others': their records go to the
    root's handlers, from the root's level (WARNING; DEBUG with -v). Their file handlers (Ray Data's log in the Ray
    session's folder) stay."""
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler for handler in logger.handlers
                              if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler)]
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


class LinesToLog(io.TextIOBase):
    """A text stream whose every non-blank line becomes a record of `logger` at `level`: for a library that prints
    what it has to say (Ray's driver prints the cluster's error reports) where its logger's level decides."""

    def __init__(self, logger: logging.Logger, level: int):
        super().__init__()
        self.logger, self.level = logger, level
        self.pending = ""
        self.lock = threading.Lock()  # Ray prints from threads of its own

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.log(self.level, line.rstrip())
        return len(text)

    def close(self) -> None:
        with self.lock:
            rest, self.pending = self.pending, ""
        if rest.strip():
            self.logger.log(self.level, rest.rstrip())
        super().close()
