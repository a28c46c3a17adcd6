"""The real CLI on real JPEG files: embed → index → search, resume after kill -9, incremental reruns,
edits of text and metadata, kill -9 during `index` and `store repair`, `store check`."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import click
import numpy as np
import pytest
import requests
import yaml
from click.testing import CliRunner
from PIL import Image

import sidecar
from sidecar.cli import main
from sidecar.cli.ingest import embed
from sidecar.config import Settings
from sidecar.ingest.embed import PARALLEL_SCAN_MIN
from sidecar.ingest.indexing import index_shards
from sidecar.ingest.shards import ShardRow, ShardSet
from sidecar.model.synthetic import describe, iter_items, sample_items, write_corpus
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document, ModelSignature
from tests.support import cli_ok, damage_sqlite_file, ends_with_the_test_run, free_port, repeat_last_scan, write_shards


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", *args], capture_output=True, text=True,
                          timeout=600)


@contextlib.contextmanager
def sigint_caught() -> Iterator[None]:
    """Children started inside come up with Ctrl-C's default handling, as from a terminal. A test
    run launched as a background job (`nohup ... &`, as CI may be) ignores SIGINT, and an ignored
    signal stays ignored across exec: the child would then run on through the Ctrl-C. A handled
    one is reset to the default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def shard_ids(out: Path) -> list[str]:
    return [row.id for _, row, _ in ShardSet(out).rows()]


def test_embed_index_search_through_the_cli(corpus, tmp_path):
    out, store = tmp_path / "shards", tmp_path / "store"
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "embed", str(corpus), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "400 items: 400 embedded" in result.output
    result = runner.invoke(main, ["-q", "index", str(out), "--store-path", str(store)])
    assert result.exit_code == 0, result.output
    assert "store now holds 400 documents" in result.output
    result = runner.invoke(main, ["-q", "search", "blue square", "--store-path", str(store), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    assert [(h["metadata"]["color"], h["metadata"]["shape"]) for h in hits] == [("blue", "square")] * 3
    result = runner.invoke(main, ["-q", "search", "circle", "--store-path", str(store), "--mode", "bm25",
                                  "--filter", "color=green", "-k", "5"])
    assert result.exit_code == 0, result.output
    assert "green circle" in result.output and "red" not in result.output
    result = runner.invoke(main, ["-q", "eval", "--ann", "--store-path", str(store), "--samples", "50"])
    assert result.exit_code == 0 and "Recall@10 (HNSW vs exact) over 50 queries" in result.output


def test_a_rerun_naming_no_thumbnail_size_keeps_the_none_an_earlier_run_chose_and_index_rewrites_nothing(tmp_path):
    folder, out, store = tmp_path / "photos", tmp_path / "shards", tmp_path / "store"
    folder.mkdir()
    for item in sample_items(6, seed=5):
        item.image.save(folder / f"{item.id}.jpg", quality=90)
    cli_ok("embed", folder, "--out", out, "--workers", "0", "--thumbnail-size", "0")
    cli_ok("index", out, "--store-path", store)
    # The README's rerun after the folder changed, without repeating the flag: it must not decode every image
    # again for thumbnails nobody asked for, nor have `index` rewrite every document for them.
    cli_ok("embed", folder, "--out", out, "--workers", "0")
    assert ShardSet(out).thumbnail_side == 0
    assert "0 written, 6 unchanged" in cli_ok("index", out, "--store-path", store)
    # Naming a size still adds them (no forward pass), and that size is then the directory's.
    cli_ok("embed", folder, "--out", out, "--workers", "0", "--thumbnail-size", "32")
    cli_ok("embed", folder, "--out", out, "--workers", "0")
    assert ShardSet(out).thumbnail_side == 32 and not ShardSet(out).shards_without_thumbnails()


@pytest.mark.parametrize(("weight", "why"), [("nan", "nan is not a finite number."),
                                             ("inf", "inf is not in the range 0<=x<=100.")])
def test_search_refuses_a_weight_that_is_not_finite(store_path, weight, why):
    # NaN passed the non-negative check and gave NaN scores; inf made the fused scores NaN too.
    result = CliRunner().invoke(main, ["-q", "search", "red", "--store-path", str(store_path),
                                       "--vector-weight", weight])
    assert result.exit_code == 2 and f"Invalid value for '--vector-weight': {why}" in result.output


def test_search_refuses_a_filter_on_a_field_no_document_holds_naming_the_fields_held(store_path):
    result = CliRunner().invoke(main, ["-q", "search", "red", "--store-path", str(store_path), "--filter", "nofield=x"])
    assert result.exit_code == 2, result.output
    assert ("Invalid value for --filter: no stored document holds metadata field 'nofield'; the fields they hold: "
            "color, position, shape, size") in result.output


def test_search_filter_on_the_command_line_finds_numbers_and_booleans_stored_as_such(encoder, tmp_path):
    # The command line has only strings, so `year=2020` found no document whose JSONL metadata held the number
    # 2020 ("(no hits)", no error): the store reads "2020" as OpenSearch does, as the number too.
    metadata = {"int-2020": {"year": 2020, "on_sale": True}, "text-2020": {"year": "2020", "on_sale": "true"},
                "int-2021": {"year": 2021, "on_sale": False}, "price": {"year": 1999, "price": 9.5}}
    vectors = encoder.encode_texts(list(metadata))
    docs = [Document(id=doc_id, vector=vector, text=f"item {doc_id}", metadata=meta, content_hash=doc_id)
            for (doc_id, meta), vector in zip(metadata.items(), vectors)]
    shards, store_path = write_shards(tmp_path / "shards", docs, encoder.signature), tmp_path / "store"
    cli_ok("index", str(shards), "--store-path", str(store_path))

    def found(*filters: str) -> set[str]:
        args = ["search", "item", "--mode", "bm25", "--store-path", str(store_path), "--json"]
        return {hit["id"] for hit in json.loads(cli_ok(*args, *[f"--filter={item}" for item in filters]))}

    assert found("year=2020") == {"int-2020", "text-2020"}
    assert found("year=2021,1999") == {"int-2021", "price"}
    assert found("on_sale=true") == {"int-2020", "text-2020"}
    assert found("price=9.5") == {"price"}
    assert found("year=99999999999999999999") == set()  # past 64 bits: compared as the text it is
    # A value no stored kind of the field reads it as: a usage error naming the flag, as a field no document holds.
    result = CliRunner().invoke(main, ["-q", "search", "item", "--store-path", str(store_path),
                                       "--filter", "price=cheap"])
    assert result.exit_code == 2, result.output
    assert ("Invalid value for --filter: metadata field 'price' holds numbers, its filter's values are text that read "
            "as none of them, so it can match no document") in result.output


def test_search_refuses_a_path_holding_no_store_before_loading_the_model(tmp_path, monkeypatch):
    def load_encoder(*_, **__):
        raise AssertionError("the model was loaded before --store-path was checked")

    monkeypatch.setattr("sidecar.model.encoder.load_encoder", load_encoder)
    mistyped = tmp_path / "mistyped"
    result = CliRunner().invoke(main, ["-q", "search", "red", "--store-path", str(mistyped)])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"Error: no embedded store at {mistyped}: give the --store-path (or "
                                     "SIDECAR_STORE_PATH) that `clip-sidecar index` wrote to")
    assert not mistyped.exists()


def test_search_notes_a_skipped_rerank_only_when_asked_for_as_its_help_says(store_path, monkeypatch):
    monkeypatch.delenv("SIDECAR_FINE_MODEL", raising=False)
    assert "silently by default, with a note on stderr when --rerank is given" in " ".join(
        CliRunner().invoke(main, ["search", "--help"]).output.split())
    base = ["-q", "search", "red", "--store-path", str(store_path)]
    default = CliRunner().invoke(main, base)
    asked = CliRunner().invoke(main, [*base, "--rerank"])
    assert default.exit_code == asked.exit_code == 0
    assert "rerank skipped" not in default.stderr and "rerank skipped: no fine model" in asked.stderr


def test_search_candidates_come_from_the_setting_unless_the_flag_is_given(store_path, monkeypatch):
    import sidecar.retrieval.search

    searched = []
    real_search = sidecar.retrieval.search.search
    monkeypatch.setattr(sidecar.retrieval.search, "search",
                        lambda *args, options, **kwargs: searched.append(options.candidates) or real_search(
                            *args, options=options, **kwargs))
    assert "default: SIDECAR_RERANK_CANDIDATES" in CliRunner().invoke(main, ["search", "--help"]).output
    base = ["-q", "search", "red", "--store-path", str(store_path)]
    for args in (base, [*base, "--candidates", "40"]):
        result = CliRunner().invoke(main, args, env={"SIDECAR_RERANK_CANDIDATES": "30"})
        assert result.exit_code == 0, result.output
    assert searched == [30, 40]


def test_search_refuses_what_the_api_refuses_naming_the_limit_and_its_setting_before_the_model_loads(
        store_path, monkeypatch):
    # --ef-search had no upper bound and --candidates went to 10000 where /v1/search refuses over 4096 and
    # over max_k; -k stopped at 1000 whatever max_k was.
    def load_encoder(*_, **__):
        raise AssertionError("the model was loaded before the limits were checked")

    base = ["-q", "search", "red", "--store-path", str(store_path)]
    # --candidates over max_k named the setting rerank_candidates, not the flag; --vector-weight 1e308 printed
    # "score": Infinity (no JSON), a negative weight's error named neither flag, and --filter took 2000 values.
    refused = {("--ef-search", "4097"): ({}, "Invalid value for '--ef-search': 4097 is not in the range 1<=x<=4096."),
               ("--candidates", "1001"): ({}, "Invalid value for '--candidates': 1001 is over 1000, the most hits a "
                                              "search ranks (max_k: SIDECAR_MAX_K)"),
               ("--vector-weight", "1e308"): ({}, "Invalid value for '--vector-weight': 1e+308 is not in the range "
                                                  "0<=x<=100."),
               ("--bm25-weight", "-1"): ({}, "Invalid value for '--bm25-weight': -1.0 is not in the range 0<=x<=100."),
               ("--vector-weight", "0", "--bm25-weight", "0"): ({}, "Invalid value for '--vector-weight' / "
                                                                    "'--bm25-weight': both weights are 0"),
               ("--filter", "color=" + ",".join(map(str, range(1025)))): (
                   {}, "--filter: more than 1024 values in all (max_filter_values: SIDECAR_MAX_FILTER_VALUES)"),
               tuple(f"--filter=f{i}=x" for i in range(65)): (
                   {}, "--filter: 65 fields, over the limit of 64 (max_filter_fields: SIDECAR_MAX_FILTER_FIELDS)"),
               (): ({"SIDECAR_MAX_K": "50"}, "rerank_candidates=100 (the candidates of a search that names none) is "
                                             "over max_k=50"),
               ("-k", "101"): ({"SIDECAR_MAX_K": "100"}, "Invalid value for '--k': 101 is over 100, the most hits a "
                                                         "search ranks (max_k: SIDECAR_MAX_K)")}
    with monkeypatch.context() as patched:
        patched.setattr("sidecar.model.encoder.load_encoder", load_encoder)
        for args, (env, message) in refused.items():
            result = CliRunner().invoke(main, [*base, *args],
                                        env={"SIDECAR_MAX_K": None, "SIDECAR_RERANK_CANDIDATES": None, **env})
            assert result.exit_code == 2 and message in result.output, (args, result.output)
        # A blank TEXT searched an empty prompt; /v1/search reads it as no text.
        result = CliRunner().invoke(main, ["-q", "search", " \t ", "--store-path", str(store_path)])
        assert result.exit_code == 2 and "give TEXT (not blank), --image, or both" in result.output, result.output
    result = CliRunner().invoke(main, [*base, "-k", "1001", "--ef-search", "4096", "--json"],
                                env={"SIDECAR_MAX_K": "2000"})  # max_k raised: the CLI follows it, as the API
    assert result.exit_code == 0, result.output
    # max_k under the default k: no -k given is none to refuse ("'--k': 10 is over 3"), as the API's k.
    result = CliRunner().invoke(main, [*base, "--json"], env={"SIDECAR_MAX_K": "3", "SIDECAR_RERANK_CANDIDATES": "3"})
    assert result.exit_code == 0 and len(json.loads(result.output)) == 3, result.output


def test_search_refuses_a_filter_field_given_twice_where_the_later_flag_replaced_the_earlier(store_path, monkeypatch):
    # `--filter color=red --filter color=blue` searched color=blue alone, without a word.
    def load_encoder(*_, **__):
        raise AssertionError("the model was loaded before --filter was checked")

    monkeypatch.setattr("sidecar.model.encoder.load_encoder", load_encoder)
    result = CliRunner().invoke(main, ["-q", "search", "red", "--store-path", str(store_path), "--filter", "color=red",
                                       "--filter", "color=blue"])
    assert result.exit_code == 2, result.output
    assert "--filter 'color' is given twice: give it once, FIELD=a,b for either value" in result.output


def test_search_image_refusing_a_panorama_or_a_many_scan_jpeg_names_no_setting_as_the_limits_govern_uploads_only(
        store_path, tmp_path):
    # SIDECAR_MAX_RESIZED_SIDE=20000 still refused the panorama "over the limit of 8192 pixels a side
    # (max_resized_side)": the CLI holds to the built-in limits, while its message pointed at the settings.
    panorama, scans = tmp_path / "pano.jpg", tmp_path / "scans.jpg"
    Image.new("RGB", (20000, 50), (90, 120, 200)).save(panorama, quality=90)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="JPEG", progressive=True)
    scans.write_bytes(repeat_last_scan(buffer.getvalue(), 200))
    env = {"SIDECAR_MAX_RESIZED_SIDE": "20000", "SIDECAR_MAX_JPEG_SCANS": "300"}
    for image, reason in ((panorama, "image is 20000x50: the model's resize would make it 12800x32, over the built-in "
                                     "limit of 8192 pixels a side"),
                          (scans, "progressive JPEG of 209 scans, over the built-in limit of 100: each scan is a pass "
                                  "over the whole image")):
        result = CliRunner().invoke(main, ["-q", "search", "--image", str(image), "--store-path", str(store_path)],
                                    env=env)
        assert result.exit_code == 2, result.output
        assert f"Invalid value for --image: {image}: {reason}" in result.output
        assert "max_resized_side" not in result.output and "max_jpeg_scans" not in result.output


def test_search_image_refusing_a_format_names_no_setting_as_image_formats_governs_uploads_only(store_path, tmp_path):
    # The refusal said "(image_formats: JPEG, PNG, WEBP, GIF, BMP, TIFF)": SIDECAR_IMAGE_FORMATS=...,ICO changed
    # nothing for the CLI, while its own message pointed there.
    icon = tmp_path / "favicon.ico"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(icon)
    result = CliRunner().invoke(main, ["-q", "search", "--image", str(icon), "--store-path", str(store_path)],
                                env={"SIDECAR_IMAGE_FORMATS": "JPEG,PNG,ICO"})
    assert result.exit_code == 2, result.output
    assert (f"Invalid value for --image: {icon}: ICO is not an accepted image format (accepted: JPEG, PNG, WEBP, GIF, "
            "BMP, TIFF; convert it to one of them)") in result.output
    assert "image_formats" not in result.output


def test_search_refuses_an_image_mode_bm25_would_ignore_without_a_fine_stage(store_path, tmp_path, monkeypatch):
    # Was ranked by the text alone, the image read and dropped without a word.
    monkeypatch.delenv("SIDECAR_FINE_MODEL", raising=False)
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    result = CliRunner().invoke(main, ["-q", "search", "red", "--image", str(image), "--mode", "bm25",
                                       "--store-path", str(store_path)])
    assert result.exit_code == 2, result.output
    assert "Invalid value for --image: mode bm25 ranks by the text alone" in result.output


def test_embed_continues_after_kill_minus_9_without_duplicates_or_gaps(tmp_path):
    manifest = write_corpus(tmp_path / "corpus", 3000, seed=5)
    out = tmp_path / "shards"
    args = [sys.executable, "-m", "sidecar.cli", "-q", "embed", str(manifest), "--out", str(out),
            "--shard-size", "100", "--batch-size", "20", "--workers", "0"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "shard-00003.jsonl").exists():
        assert process.poll() is None, "embed exited before it could be killed"
        assert time.monotonic() < deadline, "embed never wrote its fourth shard"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(shard_ids(out))
    assert 400 <= done_before < 3000, "the kill must land in the middle of the run"

    result = run_cli("embed", str(manifest), "--out", str(out), "--shard-size", "100", "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert f"3000 items: {3000 - done_before} embedded, {done_before} unchanged" in result.stdout
    ids = shard_ids(out)
    assert len(ids) == len(set(ids)) == 3000
    assert not list(out.glob("*.tmp"))


def _stop(process: subprocess.Popen, how: str) -> None:
    if how == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    else:
        process.send_signal(signal.SIGTERM)  # what `docker stop` (through the container's init) and `kill` do


@pytest.mark.parametrize(("how", "said"), [("ctrl-c", "Aborted!"), ("sigterm", "Terminated.")])
def test_ctrl_c_or_sigterm_stops_embed_promptly_leaving_no_worker_and_the_rerun_completes_it(tmp_path, how, said):
    # Small batches and many images: the fourth shard comes at ~7 % of the job, so the signal lands
    # mid-job however fast the machine (a busy CI box once starved the poll below until the job,
    # then 3,000 images at 256 a batch, had finished). SIGTERM goes to the command alone, as from a
    # container's init: the decode workers are the command's to stop.
    manifest = write_corpus(tmp_path / "corpus", 6000, seed=6)
    out = tmp_path / "shards"
    args = [sys.executable, "-m", "sidecar.cli", "-q", "embed", str(manifest), "--out", str(out),
            "--shard-size", "100", "--batch-size", "64", "--workers", "2"]
    with sigint_caught():
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "shard-00003.jsonl").exists():
        assert process.poll() is None, "embed exited before Ctrl-C"
        assert time.monotonic() < deadline, "embed never wrote its fourth shard"
        time.sleep(0.02)
    assert process.poll() is None, "embed finished before the signal could interrupt it"
    _stop(process, how)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr.strip().splitlines()[-1]) == ({"ctrl-c": 130, "sigterm": 143}[how], said)
    with pytest.raises(ProcessLookupError):  # no decode worker left behind
        os.killpg(process.pid, 0)

    result = run_cli("embed", str(manifest), "--out", str(out), "--shard-size", "100", "--workers", "2")
    assert result.returncode == 0, result.stderr
    ids = shard_ids(out)
    assert len(ids) == len(set(ids)) == 6000


@pytest.mark.parametrize(("how", "status", "said"), [("ctrl-c", 130, "Aborted!"), ("sigterm", 143, "Terminated.")])
def test_ctrl_c_exits_130_and_sigterm_143_not_1_the_status_of_an_error_to_fix(tmp_path, how, status, said):
    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    with sigint_caught():
        process = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "-q", "cache", "warm", str(fifo)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None:  # opening the FIFO's write end succeeds once the command has it open to read
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "cache warm never opened PROMPTS"
            with contextlib.suppress(OSError):
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            time.sleep(0.02)
        _stop(process, how)  # while it waits for the prompts
        _, stderr = process.communicate(timeout=60)
    finally:
        if writer is not None:
            os.close(writer)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.stderr.close()  # left open by a timed-out communicate, it would warn in a later test
    assert (process.returncode, stderr.strip()) == (status, said)


# A command whose stop signal arrives inside a weakref callback, where Python prints and drops what a
# callback raises (as it may inside an import's module-lock release), then would go on for a minute.
_STOPPED_IN_A_CALLBACK = """
import os, signal, sys, time, weakref
from sidecar.cli import main
signum = getattr(signal, sys.argv[1])

class Resource:
    pass

@main.command()
def linger():
    resource = Resource()
    ref = weakref.ref(resource, lambda _: (os.kill(os.getpid(), signum), time.sleep(5)))
    del resource  # runs the callback, in which the signal's exception is raised and dropped
    time.sleep(60)

main(["linger"])
"""


@pytest.mark.parametrize(("signame", "status", "said"), [("SIGINT", 130, "Aborted!"), ("SIGTERM", 143, "Terminated.")])
def test_a_stop_signal_whose_exception_python_drops_in_a_callback_still_stops_the_command(signame, status, said):
    with sigint_caught():
        result = subprocess.run([sys.executable, "-c", _STOPPED_IN_A_CALLBACK, signame], capture_output=True,
                                text=True, timeout=50)
    assert (result.returncode, result.stderr.strip()) == (status, said)


# `clip-sidecar embed` with every image's hashing slowed down, so that the Ctrl-C lands while the scan's
# pool hashes: the first hash in a worker touches STARTED.
_SLOW_SCAN_EMBED = """
import sys, time
from pathlib import Path
import sidecar.ingest.embed as embed
from sidecar.cli import main
started, real_hash = Path(sys.argv[1]), embed.image_hash
def slow_hash(path):
    started.touch()
    time.sleep(0.02)
    return real_hash(path)
embed.image_hash = slow_hash
main(["-q", "embed", *sys.argv[2:]])
"""


def test_ctrl_c_during_the_parallel_scan_ends_embed_in_one_line_leaving_no_worker(tmp_path):
    manifest = write_corpus(tmp_path / "corpus", PARALLEL_SCAN_MIN, seed=7, size=32)
    started = tmp_path / "scan-started"
    args = [sys.executable, "-c", _SLOW_SCAN_EMBED, str(started), str(manifest), "--out", str(tmp_path / "shards"),
            "--workers", "2"]
    with sigint_caught():
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not started.exists():
            assert process.poll() is None, "embed exited before its scan began"
            assert time.monotonic() < deadline, "the scan never began"
            time.sleep(0.02)
        time.sleep(0.5)  # both workers hashing
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        _, stderr = process.communicate(timeout=60)  # a hang (a worker killed holding the pool's lock) fails here
        with pytest.raises(ProcessLookupError):  # no scan worker left behind
            os.killpg(process.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a hung run must not outlive the test
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0 and stderr.strip() == "Aborted!", stderr


def test_incremental_rerun_embeds_only_new_and_changed_files_and_index_removes_deleted(encoder, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for item in sample_items(60, seed=3):
        item.image.save(folder / f"{item.id}.jpg", quality=90)
    out, store_path = tmp_path / "shards", tmp_path / "store"
    runner = CliRunner()
    assert runner.invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0"]).exit_code == 0
    assert runner.invoke(main, ["-q", "index", str(out), "--store-path", str(store_path)]).exit_code == 0

    files = sorted(folder.glob("*.jpg"))
    for path in files[:3]:
        path.unlink()
    for path, item in zip(files[3:5], sample_items(2, seed=99)):
        item.image.save(path, quality=90)  # same name, new content
    for item in sample_items(4, seed=123):
        item.image.save(folder / f"new-{item.id}.jpg", quality=90)
    (folder / "touched.txt").write_text("not an image, ignored")
    os.utime(files[10])  # touched but unchanged: not re-embedded

    result = runner.invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "61 items: 6 embedded, 55 unchanged, 0 failed (see errors.jsonl), 3 deleted" in result.output
    result = runner.invoke(main, ["-q", "index", str(out), "--store-path", str(store_path)])
    assert result.exit_code == 0, result.output
    assert "6 written, 55 unchanged, 3 deleted; store now holds 61 documents" in result.output

    store = EmbeddedStore(store_path)
    try:
        stored = store.content_hashes()
        assert not {p.name for p in files[:3]} & stored.keys()
        changed = store.fetch([files[3].name])[0]
        with Image.open(files[3]) as changed_image:
            image = encoder.encode_images([changed_image.convert("RGB")])
        assert float(np.dot(changed.vector, image[0])) > 0.999
    finally:
        store.close()


def test_an_empty_source_over_embedded_shards_is_refused_deleting_nothing_unless_allow_empty(tmp_path):
    folder, empty = tmp_path / "photos", tmp_path / "mnt"  # `empty`: a disk that did not mount
    folder.mkdir()
    empty.mkdir()
    for item in sample_items(4, seed=5):
        item.image.save(folder / f"{item.id}.jpg", quality=90)
    out, store_path = tmp_path / "shards", tmp_path / "store"
    runner = CliRunner()
    assert runner.invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0"]).exit_code == 0
    manifest = (out / "manifest.json").read_bytes()

    refused = runner.invoke(main, ["-q", "embed", str(empty), "--out", str(out), "--workers", "0"])
    assert refused.exit_code == 1, refused.output
    assert f"corpus {empty.absolute()} holds no images, while {out} holds 4 embedded documents" in refused.output
    assert "--allow-empty" in refused.output
    assert (out / "manifest.json").read_bytes() == manifest and ShardSet(out).deleted == []

    emptied = runner.invoke(main, ["-q", "embed", str(empty), "--out", str(out), "--workers", "0", "--allow-empty"])
    assert emptied.exit_code == 0, emptied.output
    assert "4 deleted" in emptied.output
    indexed = runner.invoke(main, ["-q", "index", str(out), "--store-path", str(store_path)])
    assert indexed.exit_code == 0 and "store now holds 0 documents" in indexed.output, indexed.output


@contextlib.contextmanager
def unlistable(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`folder` without permissions (mode 000). No mode stops root: run as root, os.scandir refuses it as the
    kernel refuses anyone else."""
    folder.chmod(0)
    if os.geteuid() == 0:
        scandir = os.scandir

        def refusing(path="."):
            if os.fspath(path) == str(folder):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", refusing)
    try:
        yield
    finally:
        monkeypatch.undo()
        folder.chmod(0o755)


def test_a_subfolder_embed_cannot_list_is_refused_naming_it_not_its_images_recorded_deleted(tmp_path, monkeypatch):
    # os.walk skipped it without a word: its images counted as deleted, and the next `index` removed them.
    folder, out = tmp_path / "photos", tmp_path / "shards"
    locked = folder / "b" / "locked"
    locked.mkdir(parents=True)
    first, second = sample_items(2, seed=9)
    first.image.save(folder / "a.jpg", quality=90)
    second.image.save(locked / "c.jpg", quality=90)
    cli_ok("embed", str(folder), "--out", str(out), "--workers", "0")
    manifest = (out / "manifest.json").read_bytes()

    with unlistable(locked, monkeypatch):
        result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: cannot list folder {locked.absolute()}: Permission denied: its images would count as deleted; "
        "make it readable (or move it out of SOURCE), then rerun")
    assert (out / "manifest.json").read_bytes() == manifest and ShardSet(out).deleted == []


def test_embed_refuses_once_naming_every_file_it_cannot_read_and_a_broken_link_as_such(tmp_path):
    # It stopped at the first, so each rerun (the model loaded, the corpus hashed again) found the next one; a
    # dangling link, which `ls` lists, was "No such file or directory".
    folder, out = tmp_path / "photos", tmp_path / "shards"
    folder.mkdir()
    sample_items(1, seed=9)[0].image.save(folder / "a.jpg", quality=90)
    (folder / "gone.jpg").symlink_to(tmp_path / "moved" / "gone.jpg")
    (folder / "lost.png").symlink_to("nowhere.png")
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: 2 files cannot be read: item 'gone.jpg': cannot read {folder / 'gone.jpg'}: a symbolic link to "
        f"{tmp_path / 'moved' / 'gone.jpg'}, which does not exist; item 'lost.png': cannot read "
        f"{folder / 'lost.png'}: a symbolic link to nowhere.png, which does not exist. Make each readable (or take "
        "it out of SOURCE), then rerun; nothing was embedded")
    assert ShardSet(out).shard_names() == []


def test_embed_refuses_a_named_pipe_in_the_folder_naming_it_instead_of_waiting_on_it_forever(tmp_path):
    folder, out = tmp_path / "photos", tmp_path / "shards"
    folder.mkdir()
    sample_items(1, seed=9)[0].image.save(folder / "a.jpg", quality=90)
    os.mkfifo(folder / "pipe.jpg")  # its read waited for a writer: the scan never ended
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", "embed", str(folder), "--out", str(out),
                             "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"Error: item 'pipe.jpg': cannot read {folder / 'pipe.jpg'}: not a regular file (a folder, pipe, socket or "
        "device). Make each readable (or take it out of SOURCE), then rerun; nothing was embedded")


def test_bad_images_are_skipped_listed_and_counted(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for item in sample_items(5, seed=8):
        item.image.save(folder / f"{item.id}.jpg")
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg")
    good = next(folder.glob("item-*.jpg")).read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "empty.jpg").write_bytes(b"")  # a download that never wrote a byte
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "8 items: 5 embedded, 0 unchanged, 3 failed" in result.output
    lines = (out / "errors.jsonl").read_text().splitlines()
    errors = {json.loads(line)["id"]: json.loads(line)["reason"] for line in lines}
    assert set(errors) == {"garbage.jpg", "truncated.jpg", "empty.jpg"}
    assert "not a recognised image format" in errors["garbage.jpg"]
    assert "corrupt or truncated" in errors["truncated.jpg"]
    assert errors["empty.jpg"] == "empty file (0 bytes)"


# The header of an AppleDouble file (RFC 1740): what macOS writes as `._NAME` beside each file it copies onto a
# volume (or into an archive) that cannot hold its resource fork and Finder info.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)


def test_embed_of_a_folder_without_images_warns_that_it_holds_none(tmp_path):
    # It ended with "0 items: 0 embedded, …" among the INFO lines, which -q hides: no word of the mistyped folder.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not an image")
    result = CliRunner().invoke(main, ["-q", "embed", str(tmp_path / "empty"), "--out", str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    assert f"corpus {tmp_path / 'empty'} holds no images (in a folder: files named *.jpg" in result.stderr


def test_embed_leaves_out_macos_appledouble_twins_and_macosx_folders_but_embeds_hidden_images(tmp_path):
    # A folder copied from a Mac listed each `._photo.jpg` twin in errors.jsonl as "not a recognised image
    # format": as many refusals as photos.
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    (folder / "__MACOSX" / "trip").mkdir(parents=True)
    (folder / ".edits").mkdir()
    images = [item.image for item in sample_items(4, seed=33)]
    for image, name in zip(images, ["beach.jpg", "trip/hill.png", ".cover.jpg", ".edits/crop.jpg"]):
        image.save(folder / name)
    for twin in ["._beach.jpg", "trip/._hill.png", "__MACOSX/._beach.jpg", "__MACOSX/trip/._hill.png",
                 ".edits/._crop.jpg"]:
        (folder / twin).write_bytes(APPLEDOUBLE)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(32))
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "4 items: 4 embedded, 0 unchanged, 0 failed" in result.output
    assert (out / "errors.jsonl").read_text() == ""
    assert shard_ids(out) == [".cover.jpg", ".edits/crop.jpg", "beach.jpg", "trip/hill.png"]


def embedded_and_indexed(folder: Path, out: Path, store_path: Path) -> tuple[str, str]:
    """The summaries of an `embed` rerun of `folder` and the `index` run after it."""
    return (cli_ok("embed", str(folder), "--out", str(out), "--workers", "0"),
            cli_ok("index", str(out), "--store-path", str(store_path)))


def stored_vectors(store_path: Path) -> dict[str, np.ndarray]:
    store = EmbeddedStore(store_path)
    try:
        return {doc.id: doc.vector for doc in store.fetch(sorted(store.content_hashes()))}
    finally:
        store.close()


def assert_a_fixed_file_is_embedded_and_indexed_again(encoder, image: Image.Image, folder: Path, out: Path,
                                                      store_path: Path) -> None:
    image.save(folder / "b.jpg", quality=90)
    embedded, indexed = embedded_and_indexed(folder, out, store_path)
    assert "2 items: 1 embedded, 1 unchanged, 0 failed" in embedded
    assert "1 written, 1 unchanged, 0 deleted; store now holds 2 documents" in indexed
    with Image.open(folder / "b.jpg") as fixed:
        expected = encoder.encode_images([fixed.convert("RGB")])[0]
    assert float(np.dot(stored_vectors(store_path)["b.jpg"], expected)) > 0.999


def two_images_indexed(tmp_path: Path, *, seed: int) -> tuple[Path, Path, Path, Image.Image]:
    """photos/a.jpg and b.jpg embedded and indexed: (folder, shards, store, a third image to fix b.jpg with)."""
    folder, out, store_path = tmp_path / "photos", tmp_path / "shards", tmp_path / "store"
    folder.mkdir()
    first, second, fixed = (item.image for item in sample_items(3, seed=seed))
    first.save(folder / "a.jpg", quality=90)
    second.save(folder / "b.jpg", quality=90)
    embedded_and_indexed(folder, out, store_path)
    return folder, out, store_path, fixed


def test_an_unusable_file_back_under_a_deleted_id_does_not_bring_its_old_document_back(encoder, tmp_path):
    folder, out, store_path, fixed = two_images_indexed(tmp_path, seed=21)
    (folder / "b.jpg").unlink()
    assert "1 deleted; store now holds 1 documents" in embedded_and_indexed(folder, out, store_path)[1]

    (folder / "b.jpg").write_bytes(b"this is not a jpeg")
    embedded, indexed = embedded_and_indexed(folder, out, store_path)
    assert "2 items: 0 embedded, 1 unchanged, 1 failed" in embedded
    assert "0 written, 1 unchanged, 0 deleted; store now holds 1 documents" in indexed
    assert [json.loads(line)["id"] for line in (out / "errors.jsonl").read_text().splitlines()] == ["b.jpg"]
    assert set(stored_vectors(store_path)) == {"a.jpg"}
    assert_a_fixed_file_is_embedded_and_indexed_again(encoder, fixed, folder, out, store_path)


def test_an_indexed_image_replaced_by_an_unusable_file_leaves_the_store_until_fixed(encoder, tmp_path):
    folder, out, store_path, fixed = two_images_indexed(tmp_path, seed=22)
    good = (folder / "b.jpg").read_bytes()
    (folder / "b.jpg").write_bytes(good[: len(good) // 3])  # truncated in place
    embedded, indexed = embedded_and_indexed(folder, out, store_path)
    assert "2 items: 0 embedded, 1 unchanged, 1 failed" in embedded
    assert "0 written, 1 unchanged, 1 deleted; store now holds 1 documents" in indexed
    assert [json.loads(line)["id"] for line in (out / "errors.jsonl").read_text().splitlines()] == ["b.jpg"]
    assert set(stored_vectors(store_path)) == {"a.jpg"}
    assert_a_fixed_file_is_embedded_and_indexed_again(encoder, fixed, folder, out, store_path)


def test_a_file_whose_name_is_not_utf8_is_listed_in_errors_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for item in sample_items(2, seed=8):
        item.image.save(folder / f"{item.id}.jpg")
    shutil.copy(next(folder.glob("*.jpg")), os.path.join(os.fsencode(folder), b"caf\xe9.jpg"))
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "w") as caption:
        caption.write("a caption")  # its text is fine: only the id and path cannot be stored
    out, store = tmp_path / "shards", tmp_path / "store"
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "3 items: 2 embedded, 0 unchanged, 1 failed" in result.output
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert errors == [{"id": "caf\\xe9.jpg", "path": str(folder / "caf\\xe9.jpg"),
                       "reason": "file or folder name is not valid UTF-8: rename it"}]
    assert not list(out.glob("*.tmp"))
    result = CliRunner().invoke(main, ["-q", "index", str(out), "--store-path", str(store)])
    assert result.exit_code == 0, result.output
    assert "store now holds 2 documents" in result.output


def test_embed_takes_jfif_and_jpe_jpegs_and_lists_heic_avif_ico_and_svg_files_in_errors_naming_why(encoder, tmp_path):
    # The scan left these out without a word: a .jfif (what browsers save JPEGs as on Windows) was never
    # embedded, an iPhone's .heic never reported.
    folder = tmp_path / "photos"
    folder.mkdir()
    first, second = (item.image for item in sample_items(2, seed=31))
    first.save(folder / "saved.jfif", format="JPEG", quality=90)
    second.save(folder / "camera.JPE", format="JPEG", quality=90)
    first.save(folder / "phone.avif")
    first.save(folder / "favicon.ico", sizes=[(32, 32)])
    (folder / "iphone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    (folder / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "6 items: 2 embedded, 0 unchanged, 4 failed" in result.output
    reasons = {row["id"]: row["reason"] for row in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    accepted = "is not an accepted image format (accepted: JPEG, PNG, WEBP, GIF, BMP, TIFF; convert it to one of them)"
    assert reasons == {"phone.avif": f"AVIF {accepted}", "favicon.ico": f"ICO {accepted}",
                       "iphone.heic": f"HEIF {accepted}", "logo.svg": "not a recognised image format"}
    shards = ShardSet(out)
    vectors = {row.id: shards.vectors(name)[index] for name, row, index in shards.rows()}
    assert set(vectors) == {"saved.jfif", "camera.JPE"}
    np.testing.assert_allclose(vectors["saved.jfif"],
                               encoder.encode_image_files([(folder / "saved.jfif").read_bytes()], max_pixels=10**8)[0],
                               atol=1e-6)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_embed_lists_a_panorama_past_the_built_in_max_resized_side_in_errors_whichever_decoder_would_take_it(
        tmp_path, decode):
    # The device decoder (here libjpeg-turbo on the CPU, nvjpeg on a GPU) stored it: a vector the API refuses to
    # compute for the same file (413), resized to 12,800 px wide first. The CLI holds to the built-in limit whatever
    # SIDECAR_MAX_RESIZED_SIDE says (an upload's limit), and its reason named that setting as if it applied.
    folder = tmp_path / "photos"
    folder.mkdir()
    sample_items(1, seed=32)[0].image.save(folder / "photo.jpg", quality=90)
    Image.new("RGB", (20000, 50), (90, 120, 200)).save(folder / "panorama.jpg", quality=90)
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0",
                                       "--decode", decode], env={"SIDECAR_MAX_RESIZED_SIDE": "20000"})
    assert result.exit_code == 0, result.output
    assert "2 items: 1 embedded, 0 unchanged, 1 failed" in result.output
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(row["id"], row["reason"]) for row in errors] == [
        ("panorama.jpg", "image is 20000x50: the model's resize would make it 12800x32, over the built-in limit of 8192 "
                         "pixels a side")]
    assert shard_ids(out) == ["photo.jpg"]


def test_embed_whose_decode_worker_the_kernel_kills_fails_in_one_line_naming_the_signal(tmp_path, monkeypatch):
    # The out-of-memory killer's SIGKILL prints nothing: the traceback's "see its error above" pointed at nothing.
    from sidecar.model.images import ImagePreprocess

    load = ImagePreprocess.load

    def killed_on_crash(self, data, **kwargs):
        if data == b"crash":
            os.kill(os.getpid(), signal.SIGKILL)  # in the forked worker, which inherits this patch
        return load(self, data, **kwargs)

    monkeypatch.setattr(ImagePreprocess, "load", killed_on_crash)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, item in enumerate(sample_items(3, seed=34)):
        item.image.save(folder / f"photo{i}.jpg", quality=90)
    (folder / "photo1.jpg").write_bytes(b"crash")
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(tmp_path / "shards"), "--workers", "2"])
    assert result.exit_code == 1, result.output
    assert re.fullmatch(r"Error: decode worker \d+ was killed by SIGKILL \(the kernel's out-of-memory killer sends it: "
                        r"fewer --workers need less memory\) before its files were done; the shards written so far are "
                        r"kept: rerun to continue", result.output.splitlines()[-1]), result.output


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), whose writes fail as a full disk's")
def test_embed_onto_a_full_disk_fails_in_one_line_naming_the_file_and_the_flag(tmp_path):
    # A full disk's ENOSPC comes from write() or close(), which name no file: it was a traceback.
    folder = tmp_path / "photos"
    folder.mkdir()
    sample_items(1, seed=33)[0].image.save(folder / "photo.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"not an image")  # a line for errors.jsonl
    out = tmp_path / "shards"
    out.mkdir()
    (out / "errors.jsonl").symlink_to("/dev/full")
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (f"Error: cannot write {out / 'errors.jsonl'}: No space left on device "
                                              f"(--out is {out})")


@pytest.mark.parametrize(("out", "exit_code", "message"), [
    ("afile", 2, "Invalid value for '--out': Directory '{out}' is a file."),  # click's own check
    ("afile/sub", 1, "Error: cannot write {out}: Not a directory (--out is {out})"),
])
def test_embed_refuses_an_out_that_cannot_be_a_directory_before_loading_the_model(corpus, tmp_path, monkeypatch, out,
                                                                                   exit_code, message):
    (tmp_path / "afile").write_text("not a directory")

    def load_encoder(*_, **__):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("sidecar.model.encoder.load_encoder", load_encoder)
    result = CliRunner().invoke(main, ["-q", "embed", str(corpus), "--out", str(tmp_path / out)])
    assert result.exit_code == exit_code and message.format(out=tmp_path / out) in result.output, result.output


def test_shard_size_help_tells_the_largest_shard_the_local_engine_writes(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for item in sample_items(8, seed=8):
        item.image.save(folder / f"{item.id}.jpg")
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "0",
                                       "--shard-size", "3", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    sizes = [len(np.load(out / f"{name}.npy")) for name in ShardSet(out).shard_names()]
    assert sizes == [3 + 2 - 1] * 2  # a shard is written once 3 are waiting, and batches come in twos
    shard_size = next(param for param in embed.params if param.name == "shard_size")
    assert "shards hold up to --shard-size + --batch-size - 1" in shard_size.help


def test_embed_help_names_every_manifest_kind_the_reader_takes():
    assert ".jsonl / .csv / .parquet manifest" in embed.help


def _garbage_line(shards: Path) -> None:
    jsonl = shards / "shard-00000.jsonl"
    lines = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
    jsonl.write_text("".join(lines[:2] + ["garbage{\n"] + lines[3:]), encoding="utf-8")


@pytest.mark.parametrize(("damage", "message"), [
    (_garbage_line, "shard-00000.jsonl line 3 is no shard row (JSONDecodeError: Expecting value"),
    (lambda shards: os.truncate(shards / "shard-00000.npy", 1000),
     "shard-00000.npy cannot be read (mmap length is greater than file size)"),
    (lambda shards: (shards / "shard-00000.npy").unlink(), "shard-00000.npy is missing"),
], ids=["garbage-jsonl-line", "truncated-npy", "missing-npy"])
@pytest.mark.parametrize("rebuild", [False, True], ids=["index", "rebuild"])
def test_index_of_a_damaged_shard_fails_in_one_line_naming_the_file_and_changes_nothing(shards, tmp_path, damage,
                                                                                        message, rebuild):
    # A garbage line was a JSONDecodeError traceback; a cut or missing .npy a traceback midway through a
    # --rebuild, and for a plain index (its rows unchanged since indexed) "20 unchanged", unnoticed.
    store_path = tmp_path / "store"
    cli_ok("-q", "index", str(shards), "--store-path", str(store_path))
    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    damage(damaged)
    result = CliRunner().invoke(main, ["-q", "index", str(damaged), "--store-path", str(store_path),
                                       *(["--rebuild"] if rebuild else [])])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.startswith(f"Error: {damaged}/{message}") and result.output.rstrip().endswith(
        "the shard is damaged. Embed the corpus into a new folder (clip-sidecar embed SOURCE --out NEW) and index "
        "from it; documents already in the store stay as they are"), result.output
    with EmbeddedStore(store_path) as store:
        assert store.count() == len(ShardSet(shards).live())


def test_index_refuses_shards_of_another_model(shards, tmp_path):
    store_path = tmp_path / "store"
    store = EmbeddedStore(store_path)
    store.claim(ModelSignature(model="ViT-B-32", weights="laion2b_s34b_b79k", dim=512))
    store.close()
    result = CliRunner().invoke(main, ["-q", "index", str(shards), "--store-path", str(store_path)])
    assert result.exit_code == 1
    assert "store holds vectors of ViT-B-32 (weights laion2b_s34b_b79k, dim 512)" in result.output
    assert "refusing vectors of tiny-clip" in result.output


def test_index_and_store_repair_show_a_progress_bar_while_they_build_the_hnsw_graph_unless_quiet(shards, tmp_path):
    # The graph build is most of an index run's time on a large store (minutes for millions of rows): it showed
    # two log lines and no bar.
    store_path = tmp_path / "store"
    indexed = CliRunner().invoke(main, ["index", str(shards), "--store-path", str(store_path)])
    assert indexed.exit_code == 0, indexed.output
    assert "HNSW graph: 100%" in indexed.stderr, indexed.stderr
    for graph in store_path.glob("hnsw.*.faiss"):
        graph.unlink()  # lost: repair builds it again
    repaired = CliRunner().invoke(main, ["store", "repair", "--store-path", str(store_path)])
    assert repaired.exit_code == 0, repaired.output
    assert "rebuilt the HNSW graph" in repaired.stdout and "HNSW graph: 100%" in repaired.stderr, repaired.stderr
    (tmp_path / "quiet").mkdir()
    quiet = CliRunner().invoke(main, ["-q", "index", str(shards), "--store-path", str(tmp_path / "quiet")])
    assert quiet.exit_code == 0 and "HNSW graph" not in quiet.stderr, quiet.stderr


def test_embed_refuses_a_shard_directory_of_another_model(shards, corpus, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["weights"] = "sha256:0000"
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["-q", "embed", str(corpus), "--out", str(out)])
    assert result.exit_code == 1
    assert "holds shards of tiny-clip (weights sha256:0000" in result.output and "new --out directory" in result.output


@pytest.mark.parametrize("command", ["setup", "connect"])
def test_the_opensearch_commands_offer_no_store_choice_they_would_ignore(command, tmp_path):
    help_text = CliRunner().invoke(main, ["opensearch", command, "--help"]).output
    assert "--opensearch-url" in help_text and "--opensearch-index" in help_text
    assert not {"--store", "--store-path", "--target-recall"} & set(help_text.split())
    # Before, --store embedded was taken and ignored: the command still dialled OpenSearch.
    result = CliRunner().invoke(main, ["-q", "opensearch", command, "--store", "embedded",
                                       "--store-path", str(tmp_path / "store")])
    assert result.exit_code == 2 and "No such option" in result.output and "--store" in result.output, result.output


def test_connect_refuses_a_text_pipeline_batch_over_max_batch_items_before_it_calls_the_cluster():
    # The number of texts one call sends to the texts URL, which answers 413 over max_batch_items. (The step size
    # is checked against the running sidecar instead: tests/integration/test_opensearch_native_failures.py.)
    result = CliRunner().invoke(main, ["opensearch", "connect", "--batch-size", "9", "--opensearch-url",
                                       "http://127.0.0.1:9"], env={"SIDECAR_MAX_BATCH_ITEMS": "8"})
    assert result.exit_code == 2, result.output
    assert "--batch-size 9 is over the sidecar's max_batch_items (8)" in result.output
    assert "cannot be reached" not in result.output


@pytest.mark.parametrize("command", [["prompts", "add"], ["tag"], ["opensearch", "setup"]])
def test_commands_that_run_the_model_alone_offer_no_fine_model_flags_they_would_ignore(command):
    help_text = CliRunner().invoke(main, [*command, "--help"]).output
    assert "--model" in help_text and not {"--fine-model", "--fine-pretrained"} & set(help_text.split())


@pytest.mark.parametrize("command", ["check", "repair"])
def test_store_check_and_repair_offer_no_target_recall_they_would_ignore(command, store_path):
    help_text = CliRunner().invoke(main, ["store", command, "--help"]).output
    assert {"--store", "--store-path", "--opensearch-url", "--opensearch-index"} <= set(help_text.split())
    assert "--target-recall" not in help_text
    # Before, it was taken and ignored: neither command runs a vector query.
    result = CliRunner().invoke(main, ["-q", "store", command, "--store-path", str(store_path), "--target-recall", "0.9"])
    assert result.exit_code == 2 and "No such option" in result.output and "--target-recall" in result.output, result.output


def test_index_drop_unsharded_without_rebuild_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["-q", "index", str(tmp_path), "--drop-unsharded", "--store-path",
                                       str(tmp_path / "store")])
    assert result.exit_code == 2 and "--drop-unsharded goes with --rebuild" in result.output, result.output
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(("command", "env", "origin"), [
    (["prompts", "add", "{examples}/shapes.yaml"], {"SIDECAR_PROMPT_SETS_DIR": "{blocked}"},
     "--prompt-sets or SIDECAR_PROMPT_SETS_DIR"),
    (["index", "{shards}"], {"SIDECAR_STORE_PATH": "{blocked}"}, "--store-path or SIDECAR_STORE_PATH"),
    (["eval", "--ann", "--samples", "3", "-k", "1", "--store-path", "{store}", "--out", "{blocked}"], {}, "--out"),
    # Before the run: --benchmark embedded, indexed and evaluated its catalogue, then failed writing the report.
    (["eval", "--benchmark", "--out", "{blocked}"], {}, "--out"),
])
def test_a_folder_under_a_regular_file_is_refused_in_one_line_naming_the_flag_or_setting_and_the_path(
        command, env, origin, shards, store_path, tmp_path):
    (tmp_path / "file").write_text("a regular file, not a folder")
    blocked = tmp_path / "file" / "sub"
    names = {"examples": Path(sidecar.__file__).parents[1] / "examples" / "prompt-sets", "shards": shards,
             "store": store_path, "blocked": blocked}
    result = CliRunner().invoke(main, ["-q", *(arg.format(**names) for arg in command)],
                                env={name: value.format(**names) for name, value in env.items()})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.splitlines()[-1] == f"Error: cannot write {blocked}: Not a directory ({origin} is {blocked})"


@pytest.mark.parametrize("command", [["embed", "{corpus}", "--out", "{out}"], ["search", "red", "--store-path", "{store}"]])
@pytest.mark.parametrize(("flags", "exit_code", "message"), [
    (["--device", "gpu"], 2, "setting device='gpu': choose auto, cpu, cuda or cuda:N (N counts from 0)"),
    (["--device", "cuda:99"], 1, "Error: --device / SIDECAR_DEVICE is 'cuda:99', but this machine has "),
    (["--device", "cpu", "--precision", "fp16"], 1, "Error: --precision / SIDECAR_PRECISION is 'fp16', which needs a "
     "GPU, and the model runs on the CPU: use fp32 or auto"),
], ids=["unknown-device", "absent-cuda-device", "half-precision-on-cpu"])
def test_a_device_or_precision_this_machine_cannot_run_is_refused_in_one_line_naming_the_flag(
        command, flags, exit_code, message, corpus, store_path, tmp_path):
    # Each was a traceback: torch's RuntimeError for the name, the settings' ValueError for the rest.
    names = {"corpus": corpus, "out": tmp_path / "shards", "store": store_path}
    result = CliRunner().invoke(main, ["-q", *(arg.format(**names) for arg in command), *flags])
    assert result.exit_code == exit_code and isinstance(result.exception, SystemExit), result.exception
    assert message in result.output


@pytest.mark.parametrize("command", [["index", "{shards}", "--wait-for-lock", "nan"],
                                     ["search", "red", "--store-path", "{store}", "--target-recall", "nan"],
                                     ["embed", "{corpus}", "--engine", "ray", "--task-cpus", "nan"]])
def test_a_nan_seconds_cpus_or_recall_is_refused_naming_the_flag(command, corpus, shards, store_path):
    # click's FloatRange lets NaN through: it fails both of the range's comparisons.
    names = {"corpus": corpus, "shards": shards, "store": store_path}
    result = CliRunner().invoke(main, ["-q", *(arg.format(**names) for arg in command)])
    assert result.exit_code == 2 and f"Invalid value for '{command[-2]}': nan is not a finite number." \
        in result.output, result.output


def test_embed_refuses_more_decode_workers_than_its_bound_before_starting_any(corpus, tmp_path):
    # A trillion workers failed with ENOMEM (a traceback) once the pool began forking.
    result = CliRunner().invoke(main, ["-q", "embed", str(corpus), "--out", str(tmp_path / "s"), "--workers",
                                       "1000000000000"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--workers': 1000000000000 is not in the range 0<=x<=256." in result.output


def test_a_jpeg_decoder_that_would_not_be_used_is_refused_or_named(corpus, tmp_path):
    # The Ray engine decodes on CPU tasks: asking it for a device decoder is a usage error, before any work.
    result = CliRunner().invoke(main, ["-q", "embed", str(corpus), "--out", str(tmp_path / "ray"), "--engine", "ray",
                                       "--jpeg-decoder", "nvimagecodec"])
    assert result.exit_code == 2 and "--jpeg-decoder nvimagecodec is for the local engine" in result.output
    # The local engine decoding on the CPU runs, and says (on stderr, -q keeps warnings) the decoder went unused.
    result = CliRunner().invoke(main, ["-q", "embed", str(corpus), "--out", str(tmp_path / "cpu"), "--workers", "0",
                                       "--decode", "cpu", "--jpeg-decoder", "nvimagecodec"])
    assert result.exit_code == 0, result.output
    assert "--jpeg-decoder nvimagecodec has no effect: the decode workers decode every image on the CPU" in result.stderr


def test_every_command_teaches_with_help():
    runner = CliRunner()
    for command in (["--help"], ["embed", "--help"], ["index", "--help"], ["search", "--help"], ["serve", "--help"],
                    ["demo", "--help"], ["eval", "--help"], ["cache", "warm", "--help"],
                    ["cache", "stats", "--help"], ["cache", "prune", "--help"], ["cache", "clear", "--help"],
                    ["opensearch", "setup", "--help"], ["store", "check", "--help"], ["store", "repair", "--help"],
                    ["keys", "create", "--help"]):
        result = runner.invoke(main, command)
        assert result.exit_code == 0 and "Usage:" in result.output, command


def test_every_option_of_every_command_says_what_it_does():
    # embed --batch-size, tag --shard-size, search -k, --fusion and the weights, serve --host and --port
    # showed only their type and default.
    def commands(command: click.Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], click.Command]]:
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, (*path, name))
        yield path, command

    silent = [(" ".join(path), option.opts[0]) for path, command in commands(main, ())
              for option in command.params if isinstance(option, click.Option) and not option.help]
    assert silent == []


def test_serve_help_sends_to_the_openapi_file_for_the_routes_and_names_only_routes_in_it():
    # A hand-kept list of every route drifts (it lacked /v1/feedback, /v1/status, /v1/models, ...).
    text = CliRunner().invoke(main, ["serve", "--help"]).output
    paths = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())["paths"]
    assert "/openapi.yaml" in text
    for named in re.findall(r"(?<![\w.])/(?:v1/[\w/*-]+|healthz|readyz|metrics)", text):
        assert any(path == named or (named.endswith("/*") and path.startswith(named[:-1])) for path in paths), named


@pytest.mark.slow
def test_demo_prints_ranked_results_in_every_mode(tmp_path):
    result = run_cli("demo", "--workdir", str(tmp_path / "demo"), "--items", "300")
    assert result.returncode == 0, result.stderr
    for header in ("mode vector", "mode bm25", "mode hybrid", "more like this photo",
                   "Recall@10 (HNSW vs exact)"):
        assert header in result.stdout
    assert "red circle" in result.stdout


def test_a_demo_rerun_with_other_items_and_seed_serves_that_corpus_and_with_the_same_embeds_nothing(tmp_path):
    from sidecar.cli.demo import run_demo

    summaries = []
    for items, seed in ((40, 0), (20, 1), (20, 1)):
        echoed: list[str] = []
        run_demo(tmp_path / "demo", items=items, seed=seed, progress=False, echo=echoed.append)
        summaries.append([line.strip() for line in echoed if " items: " in line or "store now holds" in line])
    assert summaries[1][0].startswith("20 items: 20 embedded") and "20 deleted since last run" in summaries[1][0]
    assert "20 deleted; store now holds 20 documents" in summaries[1][1], summaries[1]
    assert summaries[2][0].startswith("20 items: 0 embedded, 20 unchanged"), summaries[2]
    texts = [json.loads(line)["text"] for line in (tmp_path / "demo/corpus/manifest.jsonl").read_text().splitlines()]
    assert texts == [describe(item.attributes) for item in iter_items(20, seed=1)]


def test_the_commands_a_demo_ends_with_are_of_its_own_workdir_items_and_seed_even_with_a_space_in_the_path(tmp_path):
    # They were `demo --serve` alone, which runs another demo (data/demo, 2,000 items), and an unquoted --store-path,
    # which a shell splits at the space.
    workdir = tmp_path / "my demo"
    result = CliRunner().invoke(main, ["-q", "demo", "--workdir", str(workdir), "--items", "10", "--seed", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    search = shlex.split(lines[-3].removeprefix("Next: "))
    serve = shlex.split(lines[-2].split("   (then open")[0])
    again = shlex.split(lines[-1].strip().removeprefix("or ").rsplit(": this demo", 1)[0])
    assert search[-4:] == ["search", "red circle", "--store-path", str(workdir / "store")], lines
    assert serve[-3:] == ["serve", "--store-path", str(workdir / "store")], lines
    assert again[-8:] == ["demo", "--workdir", str(workdir), "--items", "10", "--seed", "2", "--serve"], lines


@pytest.mark.slow
def test_demo_serve_ends_by_naming_the_page_and_serves_it(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "-q", "demo", "--workdir", str(tmp_path / "demo"),
                                "--items", "60", "--serve", "--port", str(port)],
                               env={**os.environ, "GUNICORN_LOGLEVEL": "warning"}, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                               preexec_fn=ends_with_the_test_run)
    try:
        printed = []
        for line in process.stdout:
            printed.append(line)
            if line.startswith("Search page:"):
                break
        assert line.startswith(f"Search page: http://127.0.0.1:{port}/  (open it in a browser"), line
        # What to run on the demo's store once Ctrl-C ends the server: `search` and `serve` default elsewhere.
        store = tmp_path / "demo" / "store"
        after = next(i for i, text in enumerate(printed) if text.startswith("After Ctrl-C: "))
        assert printed[after].endswith(f' search "red circle" --store-path {store}\n'), printed
        assert printed[after + 1].endswith(f" serve --store-path {store} --port {port}\n"), printed
        deadline = time.monotonic() + 120
        while True:
            try:
                page = requests.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except (requests.ConnectionError, requests.Timeout):  # bound, but the worker still loads the model
                assert process.poll() is None and time.monotonic() < deadline, "the demo's server did not start"
                time.sleep(0.5)
        assert page.status_code == 200 and "<title>clip-sidecar search</title>" in page.text
        found = requests.post(f"http://127.0.0.1:{port}/v1/search", json={"text": "red circle"}, timeout=30).json()
        assert found["hits"] and found["store"] == "embedded"
        thumbnail = requests.get(f"http://127.0.0.1:{port}/v1/documents/{found['hits'][0]['id']}/thumbnail", timeout=10)
        assert thumbnail.headers["Content-Type"] == "image/jpeg"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        process.stdout.close()


@pytest.mark.parametrize("command", [("serve",), ("demo", "--serve")])
def test_a_port_another_process_listens_on_is_refused_in_one_line_naming_port_before_any_work(tmp_path, command):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run_cli(*command, "--port", str(port), "--store-path" if command == ("serve",) else "--workdir",
                         str(tmp_path / "work"))
    assert result.returncode == 1 and time.monotonic() - started < 30, result.stderr
    assert result.stderr == (f"Error: cannot listen on 127.0.0.1:{port}: Address already in use (another process "
                             "listens there: stop it or choose another --port)\n")
    assert not (tmp_path / "work").exists()  # refused before the demo rendered or the server opened anything


def test_cache_warm_persists_prompt_vectors_and_a_new_prompt_version_re_embeds(tmp_path, monkeypatch, encoder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\nblue square\n\nred circle\n")
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SIDECAR_PRETRAINED", str(_tiny_checkpoint()))
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "cache", "warm", str(prompts)])
    assert result.exit_code == 0, result.output
    assert "2 prompts cached" in result.output and "2 vectors stored" in result.output
    monkeypatch.setenv("SIDECAR_PROMPT_VERSION", "2")
    monkeypatch.setenv("SIDECAR_PROMPT_TEMPLATE", "a photo of a {}")
    result = runner.invoke(main, ["-q", "cache", "warm", str(prompts)])
    assert result.exit_code == 0, result.output
    assert "2 vectors stored for this model and prompt version" in result.output
    # What the new version stored are the vectors of the new prompts, not the old ones reused.
    stored = _stored_vectors(Settings.from_env(), ["red circle", "blue square"], encoder)
    recomputed = encoder.encode_texts(["a photo of a red circle", "a photo of a blue square"])
    np.testing.assert_allclose(stored, recomputed, atol=1e-5)
    assert not np.allclose(stored, encoder.encode_texts(["red circle", "blue square"]), atol=1e-3)


def test_cache_warm_stores_the_fine_models_vectors_too_which_a_servers_fine_stage_reads(tmp_path, monkeypatch,
                                                                                        encoder, fine_encoder):
    from sidecar.model.tiny_model import LARGE_MODEL_NAME, ensure_tiny_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\nblue square\n")
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SIDECAR_PRETRAINED", str(_tiny_checkpoint()))
    large = ensure_tiny_model(Settings().cache_dir, model=LARGE_MODEL_NAME)
    result = CliRunner().invoke(main, ["-q", "cache", "warm", str(prompts), "--fine-model", LARGE_MODEL_NAME,
                                       "--fine-pretrained", str(large)])
    assert result.exit_code == 0, result.output
    assert "2 vectors stored for this model and prompt version; 2 vectors stored for the fine model" in result.output
    settings = Settings.from_env()
    np.testing.assert_allclose(_stored_vectors(settings, ["red circle", "blue square"], fine_encoder),
                               fine_encoder.encode_texts(["red circle", "blue square"]), atol=1e-5)
    np.testing.assert_allclose(_stored_vectors(settings, ["red circle", "blue square"], encoder),
                               encoder.encode_texts(["red circle", "blue square"]), atol=1e-5)


@pytest.mark.parametrize("command", [("cache", "warm", "PROMPTS"), ("serve", "--port", "8789")])
def test_a_text_cache_path_that_is_a_folder_is_refused_in_one_line_naming_the_setting(tmp_path, command):
    # Was SQLite's traceback "unable to open database file" (serve: in each worker, then "Worker failed to boot").
    folder = tmp_path / "vectors"
    folder.mkdir()
    (tmp_path / "prompts.txt").write_text("red circle\n")
    env = {**os.environ, "SIDECAR_TEXT_CACHE_PATH": str(folder), "SIDECAR_STORE_PATH": str(tmp_path / "store")}
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "-q",
                             *[str(tmp_path / "prompts.txt") if arg == "PROMPTS" else arg for arg in command]],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1 and result.stderr == (f"Error: cannot write {folder}: Is a directory "
                                                        f"(SIDECAR_TEXT_CACHE_PATH is {folder})\n")


def test_a_text_cache_path_under_a_regular_file_is_refused_in_one_line_naming_the_setting(tmp_path):
    # The folder that failed holds the setting's file rather than lying inside a setting's path: the line
    # named no setting at all.
    (tmp_path / "file").write_text("a regular file, not a folder")
    path = tmp_path / "file" / "sub" / "text-vectors.sqlite"
    (tmp_path / "prompts.txt").write_text("red circle\n")
    result = CliRunner().invoke(main, ["-q", "cache", "warm", str(tmp_path / "prompts.txt")],
                                env={"SIDECAR_TEXT_CACHE_PATH": str(path)})
    assert result.exit_code == 1 and result.output.splitlines() == [
        f"Error: cannot write {path.parent}: Not a directory (SIDECAR_TEXT_CACHE_PATH is {path})"]


def test_serve_refuses_a_quality_log_dir_it_cannot_write_in_one_line_before_gunicorn_starts(store_path, tmp_path):
    # Was each worker failing after loading its model, the line among gunicorn's, and serve's status 4 (gunicorn's
    # "App failed to load"), not the 1 of an error to fix.
    (tmp_path / "file").write_text("a regular file, not a folder")
    folder = tmp_path / "file" / "quality"
    env = {**os.environ, "SIDECAR_QUALITY_LOG_DIR": str(folder), "SIDECAR_STORE_PATH": str(store_path)}
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", "serve", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1 and result.stderr == (f"Error: cannot write {folder}: Not a directory "
                                                        f"(SIDECAR_QUALITY_LOG_DIR is {folder})\n")


def test_cache_warm_shows_a_progress_bar_over_its_prompts_unless_quiet(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(300)))
    monkeypatch.setenv("SIDECAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SIDECAR_PRETRAINED", str(_tiny_checkpoint()))
    monkeypatch.setenv("SIDECAR_MAX_BATCH_ITEMS", "64")  # five batches: the bar moves between them
    shown = CliRunner().invoke(main, ["cache", "warm", str(prompts)])
    assert shown.exit_code == 0, shown.output
    assert "cache warm: 100%" in shown.stderr and "300/300" in shown.stderr, shown.stderr
    quiet = CliRunner().invoke(main, ["-q", "cache", "warm", str(prompts)])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr


def test_cache_warm_refuses_a_prompts_file_that_is_not_utf8_naming_it(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("red circle\ncafé au lait\n".encode("latin-1"))
    result = CliRunner().invoke(main, ["-q", "cache", "warm", str(prompts)])
    assert result.exit_code == 2 and "prompts.txt: not UTF-8 text (byte 0xe9 at offset 14); save it as UTF-8" in result.output


def _stored_vectors(settings, texts: list[str], encoder) -> np.ndarray:
    """The persisted text vectors of `settings`' model and prompt version (none computed here)."""
    from sidecar.serving.cache import TextVectorCache, cache_namespace

    def refuse(missing):
        raise AssertionError(f"not in the persistent cache: {missing}")

    cache = TextVectorCache(settings.text_cache_file(), capacity=10, namespace=cache_namespace(
        model=encoder.name, weights=encoder.weights, prompt_template=settings.prompt_template,
        prompt_version=settings.prompt_version))
    try:
        entries = cache.get_or_compute([settings.prompt(t) for t in texts], cache.through_disk(refuse), timeout_s=10)
        return np.stack([entry.vector for entry in entries])
    finally:
        cache.close()


def _tiny_checkpoint() -> Path:
    from sidecar.config import Settings
    from sidecar.model.tiny_model import ensure_tiny_model

    return ensure_tiny_model(Settings().cache_dir)  # the test run's cache (CLIP_SIDECAR_CACHE, tests/conftest.py)


def test_terminal_shows_the_projects_own_lines_not_third_party_info(store_path, corpus):
    # Without -q: the project's INFO lines are wanted; faiss's loader, open_clip and
    # opensearch-py chatter at INFO is not (only with -v).
    image = corpus.parent / json.loads(corpus.read_text().splitlines()[0])["path"]
    args = [sys.executable, "-m", "sidecar.cli", "search", "--image", str(image), "--store-path", str(store_path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    info_lines = [line for line in result.stderr.splitlines() if " INFO " in line]
    assert info_lines and all(" INFO sidecar." in line for line in info_lines), result.stderr
    verbose = subprocess.run([*args[:3], "-v", *args[3:]], capture_output=True, text=True, timeout=600)
    assert any(" faiss" in line for line in verbose.stderr.splitlines()), verbose.stderr


# -- edits to text and metadata reach the store (identity = image bytes + text + metadata) --------


def bm25_ids(store_path: Path, text: str, *filters: str) -> list[str]:
    args = ["search", text, "--mode", "bm25", "--store-path", str(store_path), "-k", "50", "--json"]
    for item in filters:
        args += ["--filter", item]
    return [hit["id"] for hit in json.loads(cli_ok(*args))]


def shard_vectors(out: Path) -> dict[str, np.ndarray]:
    return {doc.id: doc.vector for batch in ShardSet(out).documents() for doc in batch}


def test_an_edited_caption_beside_an_image_reaches_the_store_without_re_encoding(tmp_path):
    folder, out, store_path = tmp_path / "photos", tmp_path / "shards", tmp_path / "store"
    folder.mkdir()
    for item in sample_items(12, seed=4):
        item.image.save(folder / f"{item.id}.jpg", quality=90)
        (folder / f"{item.id}.txt").write_text(f"plain caption {item.id}")
    cli_ok("embed", str(folder), "--out", str(out), "--workers", "0")
    cli_ok("index", str(out), "--store-path", str(store_path))
    vectors_before = shard_vectors(out)
    edited = sorted(folder.glob("*.txt"))[3]
    edited.write_text("a zebra crossing the savanna")

    summary = cli_ok("embed", str(folder), "--out", str(out), "--workers", "0")
    assert "12 items: 0 embedded, 11 unchanged" in summary and "1 with new text or metadata" in summary
    assert "1 written, 11 unchanged, 0 deleted; store now holds 12 documents" in \
        cli_ok("index", str(out), "--store-path", str(store_path))
    image_id = edited.with_suffix(".jpg").name
    assert bm25_ids(store_path, "zebra") == [image_id]
    assert image_id not in bm25_ids(store_path, "plain")
    np.testing.assert_array_equal(shard_vectors(out)[image_id], vectors_before[image_id])  # reused, not re-encoded


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_manifest_text_and_metadata_edits_reach_the_store(tmp_path, kind):
    folder, out, store_path = tmp_path / "corpus", tmp_path / "shards", tmp_path / "store"
    folder.mkdir()
    rows = []
    for item in sample_items(10, seed=5):
        item.image.save(folder / f"{item.id}.jpg", quality=90)
        rows.append({"id": item.id, "path": f"{item.id}.jpg", "text": f"{item.attributes['color']} shape",
                     "brand": "acme"})

    def write(manifest_rows: list[dict]) -> Path:
        if kind == "jsonl":
            path = folder / "manifest.jsonl"
            path.write_text("".join(json.dumps({"id": r["id"], "path": r["path"], "text": r["text"],
                                                "metadata": {"brand": r["brand"]}}) + "\n" for r in manifest_rows))
        else:
            path = folder / "manifest.csv"
            path.write_text("id,path,text,brand\n" + "".join(f"{r['id']},{r['path']},{r['text']},{r['brand']}\n"
                                                            for r in manifest_rows))
        return path

    manifest = write(rows)
    cli_ok("embed", str(manifest), "--out", str(out), "--workers", "0")
    cli_ok("index", str(out), "--store-path", str(store_path))
    rows[2]["text"] = "a zebra shape"
    rows[7]["brand"] = "globex"
    write(rows)

    summary = cli_ok("embed", str(manifest), "--out", str(out), "--workers", "0")
    assert "10 items: 0 embedded, 8 unchanged" in summary and "2 with new text or metadata" in summary
    assert "2 written, 8 unchanged" in cli_ok("index", str(out), "--store-path", str(store_path))
    assert bm25_ids(store_path, "zebra") == [rows[2]["id"]]
    assert bm25_ids(store_path, "shape", "brand=globex") == [rows[7]["id"]]
    assert rows[7]["id"] not in bm25_ids(store_path, "shape", "brand=acme")


# -- kill -9 during `index`: the embedded store stays readable and consistent ---------------------

KILL_DIM = 64
KILL_SIGNATURE = ModelSignature(model="synthetic", weights="kill-test", dim=KILL_DIM)


def synthetic_shards(out: Path, n: int, *, seed: int, version: int = 0, shard_rows: int = 10_000) -> ShardSet:
    """Shards of `n` random unit vectors as `embed` writes them (no model needed to index them)."""
    shards = ShardSet(out)
    shards.start(KILL_SIGNATURE, preprocessing={})
    rng = np.random.default_rng(seed)
    for start in range(0, n, shard_rows):
        ids = range(start, min(start + shard_rows, n))
        vectors = rng.standard_normal((len(ids), KILL_DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        shards.write_shard(vectors, [ShardRow(id=f"doc{i}", path=f"{i}.jpg", text=f"item {i} group{i % 7} v{version}",
                                              metadata={"group": i % 7}, content_hash=f"c{i}v{version}",
                                              image_hash=f"i{i}v{version}") for i in ids])
    return shards


def committed_rows(store_path: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{store_path / 'store.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT value FROM meta WHERE key = 'n_rows'").fetchone()[0])
        finally:
            conn.close()
    except (sqlite3.Error, TypeError):
        return 0  # not created yet


def cli_until_killed(*args: str, when) -> str:
    """Start `clip-sidecar ARGS`, kill -9 it as soon as `when(stderr so far)` holds; its stderr."""
    process = subprocess.Popen([sys.executable, "-m", "sidecar.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    seen: list[bytes] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stderr.read1(4096), b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while not when(b"".join(seen).decode(errors="replace")):
        assert process.poll() is None, f"{args} finished before the kill point: " + b"".join(seen).decode()[-2000:]
        assert time.monotonic() < deadline, f"{args} never reached the kill point"
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    reader.join(10)
    process.stderr.close()
    return b"".join(seen).decode(errors="replace")


def live_hashes(store_path: Path) -> dict[str, str]:
    """id -> content_hash of the live documents, read from SQLite alone."""
    with contextlib.closing(sqlite3.connect(f"file:{store_path / 'store.sqlite'}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT id, content_hash FROM docs WHERE deleted = 0"))


def bm25_opstamps(store_path: Path) -> tuple[int, int]:
    """The BM25 (tantivy) index's last commit on disk, and the one SQLite's committed generation names."""
    with contextlib.closing(sqlite3.connect(f"file:{store_path / 'store.sqlite'}?mode=ro", uri=True)) as conn:
        recorded = int(conn.execute("SELECT value FROM meta WHERE key = 'bm25_opstamp'").fetchone()[0])
    return json.loads((store_path / "bm25" / "meta.json").read_text())["opstamp"], recorded


def index_until_killed(shards: Path, store_path: Path, *, when) -> str:
    return cli_until_killed("index", str(shards), "--store-path", str(store_path), when=when)


def assert_readable_and_checked_clean(store_path: Path) -> int:
    """The store opens, answers every kind of search, and `clip-sidecar store check` finds no problem."""
    with EmbeddedStore(store_path) as store:
        count = store.count()
        assert count > 0
        query = np.ones(KILL_DIM, dtype=np.float32) / np.sqrt(KILL_DIM)
        assert len(store.vector_search(query, 5)) == 5
        assert len(store.vector_search(query, 5, exact=True)) == 5
        assert len(store.text_search("group3", 5)) == 5
    result = run_cli("store", "check", "--store-path", str(store_path))
    assert result.returncode == 0, result.stdout + result.stderr
    return count


@pytest.mark.parametrize("command", [["check"], ["repair"], ["calibrate", "--target-recall", "0.9"]])
def test_store_commands_refuse_a_path_that_holds_no_store_and_create_none(tmp_path, command):
    for path in (tmp_path / "mistyped", tmp_path / "a-file"):
        if path.name == "a-file":
            path.write_text("not a store")
        result = CliRunner().invoke(main, ["-q", "store", *command, "--store-path", str(path)])
        assert result.exit_code == 1 and f"no embedded store at {path}" in result.output, result.output
    assert not (tmp_path / "mistyped").exists()


def lose_store_sqlite(store_path: Path, copy: Path, damage: str) -> Path:
    """A copy of the store at `store_path` whose store.sqlite a disk fault left unreadable, or emptied."""
    shutil.copytree(store_path, copy)
    if damage == "unreadable":
        # With its write-ahead log and shared memory, as a store left open elsewhere has them (CI's session store
        # had): SQLite's closing connection deleted the log beside the damaged file.
        for part in ("store.sqlite-wal", "store.sqlite-shm"):
            (copy / part).touch()
        damage_sqlite_file(copy / "store.sqlite")
    else:
        (copy / "store.sqlite").write_bytes(b"")
    return copy


@pytest.mark.parametrize("damage", ["unreadable", "empty"])
@pytest.mark.parametrize("command", [["search", "red"], ["store", "repair"], ["index", "{shards}"],
                                     ["index", "{shards}", "--rebuild"]])
def test_every_command_on_a_store_whose_sqlite_file_is_lost_fails_in_one_line_naming_it_and_what_to_do(
        store_path, shards, tmp_path, command, damage):
    copy = lose_store_sqlite(store_path, tmp_path / "store", damage)
    before = {file.name: file.read_bytes() for file in copy.iterdir() if file.is_file()}
    args = [arg.format(shards=shards) for arg in command]
    result = CliRunner().invoke(main, ["-q", *args, "--store-path", str(copy)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception  # was a traceback
    line = result.output.splitlines()[-1]
    what = "is not a readable SQLite database" if damage == "unreadable" else "is empty, though the folder holds"
    assert line.startswith(f"Error: {copy / 'store.sqlite'} {what}"), result.output
    assert "clip-sidecar index SHARDS --store-path NEW" in line
    # `index` over the empty file began a new database and overwrote the vectors; nothing is changed now.
    assert {file.name: file.read_bytes() for file in copy.iterdir() if file.is_file()} == before


@pytest.mark.parametrize("damage", ["unreadable", "empty"])
def test_store_check_reports_a_lost_store_sqlite_as_a_problem_and_exits_1(store_path, tmp_path, damage):
    copy = lose_store_sqlite(store_path, tmp_path / "store", damage)
    result = CliRunner().invoke(main, ["-q", "store", "check", "--store-path", str(copy)])
    # Unreadable: a traceback; empty: "consistent" and exit 0 (SQLite took it for a new database).
    assert result.exit_code == 1 and not isinstance(result.exception, sqlite3.Error), result.output
    lines = result.output.splitlines()
    assert lines[0] == f"embedded store {copy}: 1 problem(s)"
    assert lines[1].startswith(f"  problem: {copy / 'store.sqlite'} is "), result.output


@pytest.mark.parametrize("command", [["opensearch", "setup"], ["opensearch", "connect"], ["index", "{shards}"],
                                     ["store", "check"], ["store", "repair"], ["search", "red"]])
def test_every_command_says_in_one_line_that_opensearch_cannot_be_reached_naming_the_setting(shards, command):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = [arg.format(shards=shards) for arg in command]
    store = [] if command[0] == "opensearch" else ["--store", "opensearch"]
    result = CliRunner().invoke(main, ["-q", *args, *store, "--opensearch-url", url])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    line = result.output.splitlines()[-1]
    assert line.startswith("Error: ") and f"OpenSearch at {url} cannot be reached" in line, result.output
    assert "SIDECAR_OPENSEARCH_URL or --opensearch-url" in line


def test_kill_minus_9_during_index_leaves_a_readable_store_and_a_rerun_converges_exactly(tmp_path):
    out, store_path = tmp_path / "shards", tmp_path / "store"
    n = 40_000
    synthetic_shards(out, n, seed=1)
    # 1. In the middle of the row writes (batches committed, more to come, no graph yet).
    index_until_killed(out, store_path, when=lambda _: committed_rows(store_path) >= 10_000)
    assert assert_readable_and_checked_clean(store_path) == committed_rows(store_path) < n
    # 2. While the HNSW graph is being built from all rows (every row committed, graph not saved).
    index_until_killed(out, store_path, when=lambda err: "building the HNSW graph" in err)
    assert assert_readable_and_checked_clean(store_path) == n
    # The shards change before the next run: new text for some ids, some ids gone.
    shards = ShardSet(out)
    changed = synthetic_shards(tmp_path / "changed", 500, seed=2, version=1)
    for name in changed.shard_names():
        vectors = changed.vectors(name)
        shards.write_shard(np.asarray(vectors), [row for _, row, _ in changed.rows()])
    shards.set_deleted([f"doc{i}" for i in range(39_000, 40_000)])
    # 3. While the new graph file is written (rows and deletions committed, the commit naming it not yet).
    index_until_killed(out, store_path, when=lambda _: any(store_path.glob("hnsw.*.tmp")))
    assert assert_readable_and_checked_clean(store_path) == n - 1000
    # 4. Right at the start of a run, and then a run to the end.
    index_until_killed(out, store_path, when=lambda err: "to write" in err)
    assert_readable_and_checked_clean(store_path)
    result = run_cli("index", str(out), "--store-path", str(store_path))
    assert result.returncode == 0, result.stderr

    expected = {doc.id: doc for batch in ShardSet(out).documents() for doc in batch}
    assert len(expected) == n - 1000
    with EmbeddedStore(store_path) as store:
        assert store.content_hashes() == {doc_id: doc.content_hash for doc_id, doc in expected.items()}
        fetched = store.fetch(sorted(expected))
        np.testing.assert_array_equal(np.stack([d.vector for d in fetched]),
                                      np.stack([expected[d.id].vector for d in fetched]))
        assert [d.text for d in fetched] == [expected[d.id].text for d in fetched]
        report = store.check()
        assert report.clean and report.notes == [], report.describe()
        for query in np.stack([expected[f"doc{i}"].vector for i in (5, 500, 30_000)]):
            assert store.vector_search(query, 1)[0].score == pytest.approx(1.0, abs=1e-5)


def test_kill_minus_9_during_store_repair_loses_no_document_and_a_rerun_repairs_the_store(tmp_path):
    out, store_path = tmp_path / "shards", tmp_path / "store"
    n = 20_000  # the graph's rebuild then takes seconds: room to kill inside it
    synthetic_shards(out, n, seed=3)
    with EmbeddedStore(store_path) as store:
        index_shards(store, out, progress=False)
        indexed = store.content_hashes()
    # Work for every step of a repair: a graph file lost, the BM25 index out of step (as a writer killed
    # between its two commits leaves it), vectors a killed writer appended but never committed.
    for graph in store_path.glob("hnsw.*"):
        graph.unlink()
    with contextlib.closing(sqlite3.connect(store_path / "store.sqlite")) as conn, conn:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'bm25_opstamp'")
    with open(store_path / "vectors.f32", "ab") as handle:
        handle.write(b"\x01" * KILL_DIM * 4 * 3)
    repair = ("store", "repair", "--store-path", str(store_path))
    bm25_commit = bm25_opstamps(store_path)
    # 1. The BM25 index rebuilt and committed to tantivy, SQLite's transaction still open, the graph being built.
    cli_until_killed(*repair, when=lambda err: "building the HNSW graph" in err)
    tantivy, recorded = bm25_opstamps(store_path)
    assert tantivy > bm25_commit[0] and recorded == bm25_commit[1], "the kill must land between the two commits"
    assert live_hashes(store_path) == indexed  # SQLite's own: the store answers no read until its graph is back
    # 2. While the rebuilt graph's file is written (the commit naming it not yet made).
    cli_until_killed(*repair, when=lambda _: any(store_path.glob("hnsw.*.tmp")))
    assert any(store_path.glob("hnsw.*.tmp")), "the kill must land before the graph file is complete"
    assert live_hashes(store_path) == indexed

    result = run_cli(*repair)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"rebuilt the HNSW graph from {n} live rows" in result.stdout
    assert "rebuilt the BM25 index from the live rows" in result.stdout
    assert assert_readable_and_checked_clean(store_path) == n
    expected = {doc.id: doc for batch in ShardSet(out).documents() for doc in batch}
    with EmbeddedStore(store_path) as store:
        assert store.content_hashes() == indexed
        fetched = store.fetch(sorted(expected))
        np.testing.assert_array_equal(np.stack([d.vector for d in fetched]),
                                      np.stack([expected[d.id].vector for d in fetched]))
        assert store.text_search(expected["doc123"].text, 1)[0].id == "doc123"
        assert store.vector_search(expected["doc4567"].vector, 1)[0].id == "doc4567"
        report = store.check()
        assert report.clean and report.notes == [], report.describe()  # no leftover file of the killed runs


@pytest.mark.parametrize("scheme", ["", "ray://"])
@pytest.mark.parametrize("given", ["--address", "RAY_ADDRESS"])
def test_embed_on_ray_at_an_address_nobody_answers_fails_within_seconds_naming_it_and_where_it_was_given(
        tmp_path: Path, monkeypatch, scheme, given):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    with socket.socket() as reserved:  # bound, never listening: a connect to it is refused
        reserved.bind(("127.0.0.1", 0))
        address = f"{scheme}127.0.0.1:{reserved.getsockname()[1]}"
        folder = tmp_path / "images"
        folder.mkdir()
        monkeypatch.setenv("RAY_ADDRESS", address if given == "RAY_ADDRESS" else "127.0.0.1:6379")
        started = time.monotonic()
        result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(tmp_path / "shards"),
                                           "--engine", "ray", *(["--address", address] if given == "--address" else [])])
        elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert f"Error: no Ray cluster answers at {address} (Connection refused): check that its head " \
           "runs" in result.output
    # Before, the line said --address whichever had given it: a RAY_ADDRESS set long ago went unnoticed.
    assert (f"that --address {address} is the head's address" if given == "--address" else
            f"that RAY_ADDRESS={address} is the head's address") in result.output
    assert len(result.output.strip().splitlines()) == 1
    # Ray alone retries such an address for minutes; the bound leaves room for importing Ray on a busy machine.
    assert elapsed < 30


@pytest.mark.parametrize(("address", "says"), [
    ("127.0.0.1", "--address 127.0.0.1: not HOST:PORT; give the head's address as `ray start --head` printed it"),
    ("http://127.0.0.1:8265", "--address http://127.0.0.1:8265: a driver connects to the head's HOST:PORT"),
])
def test_embed_on_ray_at_an_address_of_another_form_fails_in_one_line_saying_which_form_to_give(tmp_path: Path, address,
                                                                                                  says):
    # Before: a bare host ended in Ray's ValueError traceback; the dashboard's URL in "Name or service not known".
    pytest.importorskip("ray", reason="the ray extra is not installed")
    folder = tmp_path / "images"
    folder.mkdir()
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(tmp_path / "shards"),
                                       "--engine", "ray", "--address", address])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith(f"Error: {says}")


def test_embed_on_ray_client_address_without_a_port_checks_grpcs_443_at_once_and_says_so(tmp_path: Path):
    """gRPC's channel connects to 443 where ray:// names no port. Before, no port meant no check: Ray's Client
    retries (11 s here) and its UserWarning, two lines with its source's path, before the error."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    folder = tmp_path / "images"
    folder.mkdir()
    address = "ray://nosuchhost.invalid"  # .invalid never resolves (RFC 2606)
    result = subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", "embed", str(folder), "--out",
                             str(tmp_path / "shards"), "--engine", "ray", "--address", address],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"Error: no Ray cluster answers at {address} (port 443, gRPC's default where "
                                    "ray:// names none, not the Ray Client's 10001: ")


@pytest.mark.parametrize(("scheme", "what", "port"), [
    ("", "no Ray head", "its GCS port, 6379 by default; not the dashboard's or the Ray Client's port"),
    ("ray://", "no Ray Client server", "ray://HOST:PORT, its Ray Client port, 10001 by default")])
def test_embed_on_ray_at_a_port_that_accepts_connections_but_holds_no_ray_head_fails_within_seconds_in_one_line(
        tmp_path: Path, scheme, what, port):
    """Before, a ray:// address printed the Ray Client's UserWarning (two lines) before the error, and the error
    quoted Ray's words naming another address (the machine's outward one for 127.0.0.1)."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    with socket.socket() as listening:  # accepts connections (the kernel's backlog), answers nothing: not a Ray head
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"{scheme}127.0.0.1:{listening.getsockname()[1]}"
        folder = tmp_path / "images"
        folder.mkdir()
        started = time.monotonic()
        # A process of its own, as the command runs (a failed ray.init leaves Ray's state behind in the process).
        result = subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", "embed", str(folder), "--out",
                                 str(tmp_path / "shards"), "--engine", "ray", "--address", address],
                                capture_output=True, text=True, timeout=90)
        elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"Error: no Ray cluster answers at {address}: {what} answered there within 6 s: check that --address "
        f"{address} is the head's address as `ray start --head` printed it ({port}) and that the head runs (`ray "
        "status` on it)"], result.stderr
    # Ray alone retries it for minutes (20 attempts of ~40 s); the bound leaves room for importing Ray on a busy machine.
    assert elapsed < 45


def test_search_past_the_candidates_gives_the_hits_and_scores_v1_search_gives_for_the_same_options(
        store_path, client, monkeypatch):
    # The hits past the candidates came from a coarse search -k deep on the command line and max_k deep in
    # the API: hybrid's fused scores (min-max over each list) and so the order there differed from rank 21.
    monkeypatch.delenv("SIDECAR_FINE_MODEL", raising=False)
    for mode in ("hybrid", "vector"):
        result = CliRunner().invoke(main, ["-q", "search", "red circle", "--mode", mode, "-k", "30", "--candidates",
                                           "20", "--json", "--store-path", str(store_path)])
        assert result.exit_code == 0, result.output
        api = client.post("/v1/search", json={"text": "red circle", "mode": mode, "k": 30, "candidates": 20}).json
        assert [(h["id"], h["scores"]) for h in json.loads(result.stdout)] == [(h["id"], h["scores"])
                                                                               for h in api["hits"]]
