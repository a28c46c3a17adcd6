"""Log records one line each: the formatter, and the CLI's log that uses it (gunicorn's error log:
tests/unit/api/test_gunicorn_config.py)."""

from __future__ import annotations

import io
import logging
import sqlite3
import sys

from sidecar.cli.root import configure_logging
from sidecar.logs import OneLineFormatter

FORMAT = "%(levelname)s %(name)s: %(message)s"


def failed_record(message: str) -> logging.LogRecord:
    try:
        raise sqlite3.DatabaseError("file is not a database")
    except sqlite3.DatabaseError:
        return logging.LogRecord("sidecar.api.app", logging.ERROR, __file__, 1, message, (), sys.exc_info())


def test_a_record_with_a_traceback_is_one_line_that_unfolds_to_the_usual_record():
    record = failed_record("unhandled error on POST /v1/embeddings\r\nsecond line")
    line = OneLineFormatter(logging.Formatter(FORMAT)).format(record)
    assert "\n" not in line and "\r" not in line
    assert "\\nTraceback (most recent call last):\\n" in line and line.endswith("file is not a database")
    assert line.replace("\\n", "\n") == logging.Formatter(FORMAT).format(record).replace("\r\n", "\n")


def test_the_clis_log_writes_an_unhandled_errors_traceback_in_its_record_on_one_line(root_logging, monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    configure_logging(verbose=False, quiet=False)
    logging.getLogger("sidecar.api.app").handle(failed_record("unhandled error on POST /v1/embeddings"))
    (line,) = stderr.getvalue().splitlines()
    assert " ERROR sidecar.api.app: unhandled error on POST /v1/embeddings\\nTraceback" in line
    assert line.endswith("sqlite3.DatabaseError: file is not a database")
