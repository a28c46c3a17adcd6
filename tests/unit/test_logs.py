"""Log records one line each: the formatter, and the CLI's log that uses it (gunicorn's error log:
tests/unit/api/test_gunicorn_config.py)."""

from __future__ import annotations

import io
import logging
import sqlite3
import sys

from sidecar.cli.root import configure_logging
from sidecar.logs import LinesToLog, OneLineFormatter, adopt_library_loggers

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


def test_ray_datas_errors_reach_the_clis_log_only_with_verbose_its_warnings_always(root_logging, monkeypatch):
    """Ray Data logs a failed task's error, traceback included, before the job gets it and says it in one line."""
    for name in ("ray", "ray.data"):  # as the Ray engine leaves them (adopt_library_loggers), whether Ray was imported
        for attribute, value in (("handlers", []), ("propagate", True), ("level", logging.NOTSET)):
            monkeypatch.setattr(logging.getLogger(name), attribute, value)
    for verbose in (False, True):
        stderr = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        configure_logging(verbose=verbose, quiet=False)
        logging.getLogger("ray.data._internal.execution.streaming_executor_state").error("a task failed")
        logging.getLogger("ray.data.exceptions").warning("an actor will be replaced")
        logging.getLogger("sidecar.ingest.ray_engine").error("the project's own")
        names = [line.split()[3] for line in stderr.getvalue().splitlines()]
        assert names == (["ray.data._internal.execution.streaming_executor_state:"] if verbose else []) + [
            "ray.data.exceptions:", "sidecar.ingest.ray_engine:"]


def test_an_adopted_library_logger_sends_its_records_to_the_clis_log_at_its_levels_and_keeps_its_file(
        root_logging, monkeypatch, tmp_path):
    """Ray's import gives `ray` a handler of its own on the terminal, at INFO, not propagating: its INFO lines
    bypassed -q and the CLI's format."""
    library = logging.getLogger("a_library_of_its_own")
    own_file = logging.FileHandler(tmp_path / "library.log")
    library.handlers[:] = [logging.StreamHandler(sys.stdout), own_file]
    library.setLevel(logging.INFO)
    library.propagate = False
    try:
        stderr = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        configure_logging(verbose=False, quiet=False)
        adopt_library_loggers("a_library_of_its_own")
        library.info("chatter")
        library.warning("a warning")
        assert [line.split(": ", 1)[1] for line in stderr.getvalue().splitlines()] == ["a warning"]
        assert library.handlers == [own_file]
    finally:
        own_file.close()
        library.handlers.clear()


def test_printed_lines_become_records_of_the_logger_one_per_line_partial_lines_on_close(caplog):
    caplog.set_level(logging.INFO, logger="printed")
    with LinesToLog(logging.getLogger("printed"), logging.INFO) as stream:
        print("(raylet) node died\n(raylet) last log line", file=stream)
        stream.write("\n  \nno newline")
        assert [record.getMessage() for record in caplog.records] == ["(raylet) node died", "(raylet) last log line"]
    assert [(record.name, record.levelno, record.getMessage()) for record in caplog.records][-1] == (
        "printed", logging.INFO, "no newline")
