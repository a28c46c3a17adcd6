"""The gunicorn config's metrics-folder hooks across a USR2 upgrade, driven with stand-ins for gunicorn's
arbiter (the attributes gunicorn sets: master_pid in the new master, reexec_pid in the old one)."""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from gunicorn import glogging
from gunicorn.config import Config

import sidecar
from sidecar.api import gunicorn_config
from sidecar.cli.serve import GUNICORN_CONFIG
from sidecar.config import Settings
from sidecar.model import weights
from sidecar.model.encoder import load_encoder

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def arbiter(*, master_pid: int = 0, reexec_pid: int = 0) -> SimpleNamespace:
    return SimpleNamespace(cfg=SimpleNamespace(address=[], workers=1, env_orig={}), master_pid=master_pid,
                           reexec_pid=reexec_pid, log=logging.getLogger("test.gunicorn"))


def worker(logger: glogging.Logger, *, age: int = 1) -> SimpleNamespace:
    """A stand-in for a gunicorn worker: its log, and its age (1 for the first worker an arbiter forks)."""
    return SimpleNamespace(log=logger, age=age)


@pytest.fixture(autouse=True)
def _environment(monkeypatch, tmp_path):
    # The hooks set these in os.environ themselves: setenv first, so that monkeypatch puts back their
    # absence after the test (delenv of an unset variable records nothing to undo).
    for name in ("HF_HUB_OFFLINE", MULTIPROC_ENV, "CLIP_SIDECAR_OWNED_METRICS_DIR"):  # the last: the handover marker
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(gunicorn_config, "_owned_metrics_dir", None)


def test_a_fresh_start_empties_a_named_metrics_folder_but_a_usr2_new_master_keeps_the_old_workers_files(
        monkeypatch, tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(folder))
    (folder / "counter_101.db").write_bytes(b"old worker, still serving")
    gunicorn_config.on_starting(arbiter(master_pid=100))
    assert [path.name for path in folder.iterdir()] == ["counter_101.db"]
    gunicorn_config.on_starting(arbiter())
    assert list(folder.iterdir()) == []


def test_usr2_hands_the_servers_own_metrics_folder_to_the_new_master_and_the_last_master_out_removes_it(
        monkeypatch):
    old = arbiter()
    gunicorn_config.on_starting(old)
    folder = gunicorn_config._owned_metrics_dir
    gunicorn_config.pre_exec(old)  # in the forked child, which execs the new master with env_orig
    assert old.cfg.env_orig[MULTIPROC_ENV] == folder
    old.reexec_pid = 200
    gunicorn_config.on_exit(old)  # the old master stops first, the new one still runs
    assert folder is not None and os.path.isdir(folder)

    monkeypatch.setattr(gunicorn_config, "_owned_metrics_dir", None)  # the new master: a process of its own
    for name, value in old.cfg.env_orig.items():
        monkeypatch.setenv(name, value)
    new = arbiter(master_pid=100)
    gunicorn_config.on_starting(new)
    assert os.path.isdir(folder)
    new.master_pid = 0  # promoted once the old master is gone
    gunicorn_config.on_exit(new)
    assert not os.path.exists(folder)


def config_file_settings() -> Config:
    """gunicorn's settings from the config file, as gunicorn reads it."""
    cfg = Config()
    for name, value in vars(gunicorn_config).items():
        if name in cfg.settings:
            cfg.set(name, value)
    return cfg


@pytest.fixture
def error_logger(tmp_path, root_logging) -> Iterator[glogging.Logger]:
    """gunicorn's logger as the config file sets it up, its error log in tmp_path / "error.log"; the test's
    post_fork routes the root logger to it (root_logging puts that back after this closes the file)."""
    cfg = config_file_settings()
    cfg.set("errorlog", str(tmp_path / "error.log"))
    logger = cfg.logger_class(cfg)
    yield logger
    for handler in logger.error_log.handlers:
        handler.close()


@pytest.mark.parametrize("access_format", [
    None,  # gunicorn's default line, whose user field is the Basic header's user
    '%(u)s %({authorization}i)s %({Authorization}i)s %({http_authorization}e)s "%(r)s" %(s)s',
])
def test_an_access_log_line_never_carries_an_api_key_sent_as_basic_auth(tmp_path, access_format):
    key = "csk_" + "k" * 43
    header = "Basic " + base64.b64encode(f"{key}:".encode()).decode()  # what `curl -u KEY:` sends
    cfg = config_file_settings()
    cfg.set("accesslog", str(tmp_path / "access.log"))
    if access_format:
        cfg.set("access_log_format", access_format)
    logger = cfg.logger_class(cfg)
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": "/v1/models", "SERVER_PROTOCOL": "HTTP/1.1",
               "REMOTE_ADDR": "127.0.0.1", "HTTP_AUTHORIZATION": header}
    logger.access(SimpleNamespace(status="401 UNAUTHORIZED", sent=94, headers=[]),
                  SimpleNamespace(headers=[("AUTHORIZATION", header)]), environ, timedelta(milliseconds=3))
    for handler in logger.access_log.handlers:
        handler.close()
    line = (tmp_path / "access.log").read_text()
    assert '"GET /v1/models HTTP/1.1" 401' in line, line  # the request was logged
    assert key not in line and header.split()[1] not in line, line


def test_the_error_log_writes_a_traceback_in_its_record_on_one_line_for_gunicorns_and_the_workers_app_lines(
        tmp_path, error_logger):
    gunicorn_config.post_fork(arbiter(), worker(error_logger))  # the app's lines into gunicorn's log
    try:
        raise sqlite3.DatabaseError("file is not a database")
    except sqlite3.DatabaseError:
        error_logger.exception("Exception in worker process")  # gunicorn's own
        logging.getLogger("sidecar.api.app").exception("unhandled error on POST /v1/embeddings")
    lines = (tmp_path / "error.log").read_text().splitlines()
    assert [re.sub(r".*?\] \[ERROR\] ", "", line).split("\\n")[:2] for line in lines] == [
        ["Exception in worker process", "Traceback (most recent call last):"],
        ["unhandled error on POST /v1/embeddings", "Traceback (most recent call last):"]], lines
    assert all(line.endswith("sqlite3.DatabaseError: file is not a database") for line in lines), lines


def test_a_workers_third_party_warnings_reach_gunicorns_log_in_its_format_but_opensearch_pys_per_request_ones_do_not(
        tmp_path, error_logger):
    gunicorn_config.post_fork(arbiter(), worker(error_logger))
    # open_clip logs through the module-level functions, which install basicConfig's
    # `WARNING:name:message` handler on a root logger without one.
    logging.info("Loaded built-in tiny-clip model config.")
    logging.getLogger("opensearch").warning("POST http://127.0.0.1:9200/clip/_count [status:404 request:0.006s]")
    logging.getLogger("timm").warning("a third party's warning")
    assert logging.getLogger().handlers == error_logger.error_log.handlers  # basicConfig added none
    (line,) = (tmp_path / "error.log").read_text().splitlines()
    assert re.fullmatch(r"\[[^]]+\] \[\d+\] \[WARNING\] a third party's warning", line), line


def test_a_random_weights_server_says_so_once_in_gunicorns_log_from_its_first_worker_and_no_other_adds_it(
        tmp_path, monkeypatch, error_logger):
    config = tmp_path / "tiny-random.json"
    shutil.copy(Path(sidecar.__file__).parent / "model" / "model_configs" / "tiny-clip.json", config)
    settings = Settings(model="tiny-random", model_config=str(config), pretrained="", device="cpu",
                        cache_dir=tmp_path / "cache")  # an architecture with no weights given
    monkeypatch.setattr(gunicorn_config, "_settings", settings)
    monkeypatch.setattr(weights, "_TOLD_RANDOM", set())  # a fresh arbiter
    server = arbiter()
    server.log = error_logger
    gunicorn_config.on_starting(server)
    arbiters_told = set(weights._TOLD_RANDOM)
    for age in (1, 2, 3):  # the first worker, a second one, a replacement
        monkeypatch.setattr(weights, "_TOLD_RANDOM", set(arbiters_told))  # forked from the arbiter
        gunicorn_config.post_fork(server, worker(error_logger, age=age))
        load_encoder(settings, fetch=False)  # what the worker's app does
    warnings = [line for line in (tmp_path / "error.log").read_text().splitlines() if "[WARNING]" in line]
    assert len(warnings) == 1, warnings  # open_clip's "… initialized randomly" not among them, in any format
    weights_named = weights.random_weights_id(settings)  # "random:<digest of the config>"
    assert f'tiny-random runs with random weights (weights "{weights_named}"): no --pretrained / SIDECAR_PRETRAINED' in \
        warnings[0], warnings


def test_gunicorns_arbiter_runs_its_hooks_for_a_random_weights_server_without_importing_torch(tmp_path):
    # The arbiter forks workers and loads no model: importing open_clip (torch with it) for the notice's
    # wording cost it seconds of start-up and ~900 MB before the first worker booted. The notice is the
    # first worker's to say (test above), so the arbiter does not say it either.
    arbiter_hooks = textwrap.dedent("""
        import logging, sys
        from types import SimpleNamespace
        from sidecar.api import gunicorn_config
        logging.basicConfig()
        server = SimpleNamespace(cfg=SimpleNamespace(address=[], workers=1, env_orig={}), master_pid=0, reexec_pid=0,
                                 WORKERS={}, log=logging.getLogger("gunicorn.error"))
        gunicorn_config.on_starting(server)
        gunicorn_config.pre_fork(server, SimpleNamespace())
        print(sorted({"torch", "open_clip"} & set(sys.modules)))
    """)
    clean = {name: value for name, value in os.environ.items() if not name.startswith(("SIDECAR_", "GUNICORN_"))}
    random_weights = {"SIDECAR_MODEL": "ViT-B-32", "SIDECAR_PRETRAINED": "", "SIDECAR_FINE_MODEL": "ViT-B-16",
                      "SIDECAR_PIN_WORKERS": "true", "SIDECAR_CACHE_DIR": str(tmp_path / "cache"),
                      MULTIPROC_ENV: str(tmp_path / "metrics")}
    ran = subprocess.run([sys.executable, "-c", arbiter_hooks], env={**clean, **random_weights},
                         capture_output=True, text=True, timeout=120, check=True)
    assert ran.stdout.strip() == "[]", ran.stdout
    assert "random weights" not in ran.stderr, ran.stderr


def effective_config(**env: str) -> dict[str, str]:
    """What gunicorn itself makes of the config file (its --print-config), in a process with only these
    SIDECAR_/GUNICORN_ variables."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith(("SIDECAR_", "GUNICORN_"))}
    printed = subprocess.run([sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG, "--print-config",
                              "sidecar.api.wsgi:app"], env={**clean, **env}, capture_output=True, text=True,
                             timeout=120, check=True).stdout
    return dict(re.findall(r"^(\w+) += (.*)$", printed, flags=re.MULTILINE))


@pytest.mark.parametrize("bind", ["127.0.0.1:18207", "0.0.0.0:18207"])
def test_a_malformed_api_key_list_stops_gunicorn_as_it_reads_its_config_in_one_line(bind):
    # Was a traceback from each worker's app factory on loopback, and from the arbiter's on_starting beyond it.
    clean = {name: value for name, value in os.environ.items() if not name.startswith(("SIDECAR_", "GUNICORN_"))}
    ran = subprocess.run([sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG, "--bind", bind,
                          "--print-config", "sidecar.api.wsgi:app"], env={**clean, "SIDECAR_API_KEYS": "web:search"},
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1
    assert ran.stderr.strip() == "Error: SIDECAR_API_KEYS entry 1: expected name:scopes:sha256-hex (3 fields), got 2"


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("GUNICORN_WORKERS", "0", "GUNICORN_WORKERS=0: expected a whole number >= 1"),  # was a server of no worker
    ("GUNICORN_WORKERS", "two", "GUNICORN_WORKERS='two': expected a whole number"),
    ("GUNICORN_TIMEOUT", "-5", "GUNICORN_TIMEOUT=-5: expected a whole number >= 0"),
    ("GUNICORN_GRACEFUL_TIMEOUT", "1.5", "GUNICORN_GRACEFUL_TIMEOUT='1.5': expected a whole number"),
    ("SIDECAR_MAX_WAIT_MS", "soon", "SIDECAR_MAX_WAIT_MS='soon': expected a number"),
    ("SIDECAR_PIN_WORKERS", "on", "SIDECAR_PIN_WORKERS='on': expected true or false (also 1/0, yes/no)"),
    # Was taken as info without a word.
    ("GUNICORN_LOGLEVEL", "warn", "GUNICORN_LOGLEVEL='warn': choose one of critical, error, warning, info, debug"),
])
def test_a_malformed_value_stops_gunicorn_in_one_line_naming_the_variable_and_what_it_takes(variable, value, message):
    # Numbers were Python's words ("invalid literal for int() with base 10: 'two'"), naming neither.
    clean = {name: value for name, value in os.environ.items() if not name.startswith(("SIDECAR_", "GUNICORN_"))}
    ran = subprocess.run([sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG, "--print-config",
                          "sidecar.api.wsgi:app"], env={**clean, variable: value}, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 1
    assert ran.stderr.strip() == f"Error: {message}"


@pytest.mark.parametrize(("env", "message"), [
    ({"GUNICORN_CMD_ARGS": "--workers 0"},  # was a server listening with no worker: connections waited for ever
     "workers=0 (GUNICORN_WORKERS, or --workers in GUNICORN_CMD_ARGS): at least 1 is needed"),
    ({"GUNICORN_BIND": "127.0.0.1:99999"},  # was a traceback as gunicorn bound it
     "bind 127.0.0.1:99999 (GUNICORN_BIND, or --bind in GUNICORN_CMD_ARGS): the port must be 0-65535"),
    ({"GUNICORN_CMD_ARGS": "--bind 127.0.0.1:70000"},
     "bind 127.0.0.1:70000 (GUNICORN_BIND, or --bind in GUNICORN_CMD_ARGS): the port must be 0-65535"),
])
def test_gunicorn_refuses_to_start_in_one_line_with_no_worker_or_a_port_past_65535_from_any_source(env, message):
    clean = {name: value for name, value in os.environ.items() if not name.startswith(("SIDECAR_", "GUNICORN_"))}
    ran = subprocess.run([sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG, "sidecar.api.wsgi:app"],
                         env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines()[-1] == f"Error: {message}", ran.stderr


def test_a_stopping_worker_lets_requests_run_past_their_encode_deadline_unless_the_grace_is_set():
    assert effective_config()["graceful_timeout"] == "60"
    assert effective_config(SIDECAR_REQUEST_TIMEOUT_S="120")["graceful_timeout"] == "150"
    assert effective_config(SIDECAR_REQUEST_TIMEOUT_S="120", GUNICORN_GRACEFUL_TIMEOUT="45")["graceful_timeout"] == "45"
    # docker compose kills a container 10 s after SIGTERM unless told to wait: past the grace of its settings.
    # (docker-compose.gpu.yml changes this service's image only: it keeps the grace.)
    sidecar = yaml.safe_load((Path(__file__).parents[3] / "docker-compose.yml").read_text())["services"]["sidecar"]
    assert int(sidecar["stop_grace_period"].removesuffix("s")) > 60
