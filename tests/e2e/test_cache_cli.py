"""`clip-sidecar cache stats / prune / clear` against a real cache file, written by `cache warm` and by
the cache a server's workers run (TextVectorCache, EncodingService), open while the commands run."""

from __future__ import annotations

import os
import sqlite3
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.config import Settings
from sidecar.serving.cache import CachedText, TextVectorCache, file_bytes, usage
from sidecar.serving.encoding import EncodingService, text_cache_namespaces


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "text-vectors.sqlite"
    monkeypatch.setenv("SIDECAR_TEXT_CACHE_PATH", str(path))
    return path


def cli(*args: str, ok: bool = True, **env: str):
    result = CliRunner().invoke(main, ["-q", *args], env=env)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def warm(tmp_path, texts: list[str], **env: str) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{text}\n" for text in texts))
    cli("cache", "warm", str(prompts), **env)


def table(output: str) -> list[list[str]]:
    """stats' table rows (after its header), cells split on runs of two spaces or more."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    return [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in lines[start + 1:]
            if not line.startswith("stale:")]


def add_rows(path, namespace: str, count: int, *, tokens: int | None = 3, dim: int = 512) -> None:
    """Rows another server (another model) or an older version of this one wrote."""
    with sqlite3.connect(path) as db:
        db.executemany("INSERT INTO text_vectors (namespace, key, vector, tokens, last_used) VALUES (?, ?, ?, ?, 1)",
                       [(namespace, f"{namespace}-{i}", np.ones(dim, np.float32).tobytes(), tokens)
                        for i in range(count)])
    db.close()


def test_cache_stats_lists_each_prompt_version_with_its_vectors_and_whether_these_settings_read_it(
        tmp_path, cache_file):
    warm(tmp_path, ["red circle", "blue square", "green"])
    warm(tmp_path, ["red circle"], SIDECAR_PROMPT_VERSION="2")
    result = cli("cache", "stats")
    assert result.output.startswith(f"{cache_file}: 4 vectors, ")
    assert "it keeps at most 200,000 (SIDECAR_TEXT_CACHE_MAX_ENTRIES)" in result.output
    rows = table(result.output)
    assert [(row[0], row[2], row[3], row[4], row[-1]) for row in rows] == [
        ("tiny-clip", "1", "{}", "3", "read"), ("tiny-clip", "2", "{}", "1", "not read")]
    assert rows[0][1].startswith("sha256:")  # the weights: the trained checkpoint's hash
    # The same file seen with the server's new prompt version: the other rows are the ones read.
    rows = table(cli("cache", "stats", SIDECAR_PROMPT_VERSION="2").output)
    assert [(row[2], row[-1]) for row in rows] == [("1", "not read"), ("2", "read")]


def test_cache_prune_deletes_other_versions_models_and_stale_rows_keeps_what_is_read_and_shrinks_the_file(
        tmp_path, cache_file):
    warm(tmp_path, ["red circle", "blue square"])
    warm(tmp_path, ["red circle"], SIDECAR_PROMPT_VERSION="2", SIDECAR_PROMPT_TEMPLATE="a photo of {}")
    (read,) = text_cache_namespaces(Settings.from_env())
    add_rows(cache_file, "ViT-B-32|laion2b_s34b_b79k|1|{}", 5000)  # a model no longer served: ~10 MB
    add_rows(cache_file, read, 7, tokens=None)  # from before token counts were kept: never read
    stats = cli("cache", "stats").output
    assert [(row[2], row[4], row[-1]) for row in table(stats)] == [
        ("1", "5,000", "not read"), ("1", "7", "stale"), ("1", "2", "read"), ("2", "1", "not read")]
    assert "stale: written before token counts were kept; never read again (`cache prune` deletes them)" in stats
    before = file_bytes(cache_file)
    dry = cli("cache", "prune", "--dry-run").output
    assert dry.startswith(f"would delete 5,008 vectors of {cache_file}") and "(stale)" in dry
    assert file_bytes(cache_file) == before and sum(row.vectors for row in usage(cache_file)) == 5010

    result = cli("cache", "prune")
    assert result.output.startswith(f"deleted 5,008 vectors not read with these settings; {cache_file}: ")
    assert [(row.namespace, row.vectors, row.stale) for row in usage(cache_file)] == [(read, 2, False)]
    assert file_bytes(cache_file) < before / 4  # VACUUM gave the space back, the write-ahead log is emptied
    # What stayed is still served from the file: a warm of the same prompts encodes nothing new.
    assert "2 vectors stored" in cli("cache", "warm", str(tmp_path / "prompts.txt")).output


def test_cache_prune_keeps_the_fine_models_vectors_when_given_the_fine_model(
        tmp_path, cache_file, fine_encoder, model_settings):
    settings = Settings.from_env(cache_dir=model_settings.cache_dir)
    fine = EncodingService(fine_encoder, settings, role="fine")  # the fine-ranking cache of a server
    try:
        fine.encode_texts(["red circle"])
        fine.cache.flush()
    finally:
        fine.close()
    assert [row.vectors for row in usage(cache_file)] == [1]
    cli("cache", "prune", "--fine-model", fine_encoder.name)
    assert [row.vectors for row in usage(cache_file)] == [1]
    cli("cache", "prune")  # a server without that fine model does not read them
    assert usage(cache_file) == []


def encode_counting(calls: list[str]):
    def encode(texts):
        calls.extend(texts)
        return [CachedText(np.array([len(t), 1.0], dtype=np.float32), len(t) + 2) for t in texts]
    return encode


def test_cache_prune_and_stats_of_a_misspelt_model_or_tag_are_refused_naming_the_closest_and_delete_nothing(
        tmp_path, cache_file):
    warm(tmp_path, ["red circle"])
    before = cli("cache", "stats").output
    for command, refusal in ((["prune", "--model", "ViT-B-33"], "unknown model 'ViT-B-33'"),
                             (["stats", "--model", "ViT-B-33"], "unknown model 'ViT-B-33'"),
                             (["prune", "--model", "ViT-B-32", "--pretrained", "nosuchtag"], "pretrained 'nosuchtag'")):
        result = cli("cache", *command, ok=False)
        assert result.exit_code == 1 and refusal in result.output, result.output
    assert cli("cache", "stats").output == before  # before, the prune deleted the tiny model's vectors


@pytest.mark.parametrize("command", [["clear"], ["prune", "--model", "ViT-B-32", "--pretrained", "openai"]])
def test_a_server_sharing_the_file_keeps_serving_after_its_rows_are_deleted_and_writes_them_again(
        cache_file, command):
    (namespace,) = text_cache_namespaces(Settings.from_env())
    worker = TextVectorCache(cache_file, namespace=namespace, capacity=0)  # a worker's cache, its file open
    calls: list[str] = []
    load_or_encode = worker.through_disk(encode_counting(calls))
    try:
        load_or_encode(["red circle", "blue square"])
        worker.flush()
        assert worker.persisted_count() == 2
        result = cli("cache", *command)
        assert result.output.startswith("deleted 2 vectors")
        assert worker.persisted_count() == 0
        # The rows are gone under the worker: it misses, encodes again and writes them back.
        entries = load_or_encode(["red circle", "blue square"])
        assert calls == ["red circle", "blue square"] * 2
        np.testing.assert_array_equal(entries[0].vector, [10, 1.0])
        worker.flush()
        assert worker.persisted_count() == 2
    finally:
        worker.close()


def test_cache_stats_prune_and_clear_without_a_file_say_so_and_create_none(cache_file, monkeypatch):
    for command in (["stats"], ["prune"], ["clear"]):
        result = cli("cache", *command)
        assert result.output == (f"no text-vector cache at {cache_file} yet (SIDECAR_TEXT_CACHE_PATH, else "
                                 "text-vectors.sqlite in the cache dir): a server or `cache warm` creates it\n")
    assert not cache_file.exists()
    monkeypatch.setenv("SIDECAR_TEXT_CACHE_PERSIST", "false")
    assert cli("cache", "stats").output.startswith("SIDECAR_TEXT_CACHE_PERSIST is false")


def test_a_cache_path_that_is_a_folder_or_not_a_cache_file_is_refused_in_one_line(tmp_path, cache_file, monkeypatch):
    cache_file.write_bytes(b"not a database, a file of something else " * 100)
    for command in (["stats"], ["prune"], ["clear"]):
        result = cli("cache", *command, ok=False)
        assert result.exit_code == 1 and result.output.splitlines() == [
            f"Error: text-vector cache {cache_file}: file is not a database (SIDECAR_TEXT_CACHE_PATH; a server moves "
            "a file SQLite cannot read aside when it next starts)"]
    assert cache_file.read_bytes().startswith(b"not a database")  # left as it was
    folder = tmp_path / "folder"
    folder.mkdir()
    monkeypatch.setenv("SIDECAR_TEXT_CACHE_PATH", str(folder))
    result = cli("cache", "stats", ok=False)
    assert result.exit_code == 1 and result.output.splitlines() == [
        f"Error: cannot write {folder}: Is a directory (SIDECAR_TEXT_CACHE_PATH is {folder})"]


@pytest.fixture
def read_only(tmp_path):
    """Makes a file one this process may not write: chmod where it is not root, else the immutable attribute."""
    made: list = []

    def make(path) -> None:
        if os.geteuid() != 0:
            path.chmod(0o444)
        elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
            made.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
        else:
            pytest.skip("root, on a file system without the immutable attribute: every file is writable")

    yield make
    for undo in made:
        undo()


def test_prune_and_clear_of_a_file_this_user_may_not_write_fail_in_one_line_and_stats_still_reads_it(
        tmp_path, cache_file, read_only):
    warm(tmp_path, ["red circle"], SIDECAR_PROMPT_VERSION="2")
    read_only(cache_file)
    for command in (["prune"], ["clear"]):
        result = cli("cache", *command, ok=False)
        assert result.exit_code == 1 and result.output.splitlines() == [
            f"Error: text-vector cache {cache_file}: attempt to write a readonly database (SIDECAR_TEXT_CACHE_PATH)"]
    assert [row[-1] for row in table(cli("cache", "stats").output)] == ["not read"]


def test_cache_warm_into_a_file_this_user_may_not_write_fails_in_one_line_not_exit_0(tmp_path, cache_file, read_only):
    # A server's writer only warns (serving goes on without the file); `cache warm` exists to fill the file, and
    # said "N prompts cached" with exit 0 while nothing was stored.
    warm(tmp_path, ["red circle"])
    read_only(cache_file)
    prompts = tmp_path / "more.txt"
    prompts.write_text("blue square\n")
    result = cli("cache", "warm", str(prompts), ok=False)
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (f"Error: the vectors could not be stored in {cache_file}: attempt to "
                                              "write a readonly database (SIDECAR_TEXT_CACHE_PATH)")
