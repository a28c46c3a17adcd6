"""The real CLI on real JPEG files: embed → index → search, resume after kill -9, incremental reruns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sidecar.cli import main
from sidecar.config import Settings
from sidecar.ingest.shards import ShardSet
from sidecar.model.synthetic import sample_items, write_corpus
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import ModelSignature


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", *args], capture_output=True, text=True,
                          timeout=600)


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
    result = runner.invoke(main, ["-q", "eval", "--store-path", str(store), "--queries", "50"])
    assert result.exit_code == 0 and "Recall@10 (HNSW vs exact) over 50 queries" in result.output


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


def test_ctrl_c_stops_embed_promptly_and_the_rerun_completes_it(tmp_path):
    manifest = write_corpus(tmp_path / "corpus", 3000, seed=6)
    out = tmp_path / "shards"
    args = [sys.executable, "-m", "sidecar.cli", "-q", "embed", str(manifest), "--out", str(out),
            "--shard-size", "100", "--batch-size", "256", "--workers", "2"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "shard-00003.jsonl").exists():
        assert process.poll() is None, "embed exited before Ctrl-C"
        assert time.monotonic() < deadline, "embed never wrote its fourth shard"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "Aborted" in stderr, stderr
    with pytest.raises(ProcessLookupError):  # no decode worker left behind
        os.killpg(process.pid, 0)

    result = run_cli("embed", str(manifest), "--out", str(out), "--shard-size", "100", "--workers", "2")
    assert result.returncode == 0, result.stderr
    ids = shard_ids(out)
    assert len(ids) == len(set(ids)) == 3000


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


def test_bad_images_are_skipped_listed_and_counted(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for item in sample_items(5, seed=8):
        item.image.save(folder / f"{item.id}.jpg")
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg")
    good = next(folder.glob("item-*.jpg")).read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["-q", "embed", str(folder), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "7 items: 5 embedded, 0 unchanged, 2 failed" in result.output
    lines = (out / "errors.jsonl").read_text().splitlines()
    errors = {json.loads(line)["id"]: json.loads(line)["reason"] for line in lines}
    assert set(errors) == {"garbage.jpg", "truncated.jpg"}
    assert "not a recognised image format" in errors["garbage.jpg"]
    assert "corrupt or truncated" in errors["truncated.jpg"]


def test_index_refuses_shards_of_another_model(shards, tmp_path):
    store_path = tmp_path / "store"
    store = EmbeddedStore(store_path)
    store.claim(ModelSignature(model="ViT-B-32", weights="laion2b_s34b_b79k", dim=512))
    store.close()
    result = CliRunner().invoke(main, ["-q", "index", str(shards), "--store-path", str(store_path)])
    assert result.exit_code == 1
    assert "store holds vectors of ViT-B-32 (weights laion2b_s34b_b79k, dim 512)" in result.output
    assert "refusing vectors of tiny-clip" in result.output


def test_embed_refuses_a_shard_directory_of_another_model(shards, corpus, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["weights"] = "sha256:0000"
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["-q", "embed", str(corpus), "--out", str(out)])
    assert result.exit_code == 1
    assert "holds shards of tiny-clip (weights sha256:0000" in result.output and "new --out directory" in result.output


def test_every_command_teaches_with_help():
    runner = CliRunner()
    for command in (["--help"], ["embed", "--help"], ["index", "--help"], ["search", "--help"], ["serve", "--help"],
                    ["demo", "--help"], ["eval", "--help"], ["cache", "warm", "--help"],
                    ["opensearch", "setup", "--help"], ["keys", "create", "--help"]):
        result = runner.invoke(main, command)
        assert result.exit_code == 0 and "Usage:" in result.output, command


@pytest.mark.slow
def test_demo_prints_ranked_results_in_every_mode(tmp_path):
    result = run_cli("demo", "--workdir", str(tmp_path / "demo"), "--items", "300")
    assert result.returncode == 0, result.stderr
    for header in ("mode vector", "mode bm25", "mode hybrid", "mode hybrid + rerank", "more like this photo",
                   "Recall@10 (HNSW vs exact)"):
        assert header in result.stdout
    assert "red circle" in result.stdout


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


def _stored_vectors(settings, texts: list[str], encoder) -> np.ndarray:
    """The persisted text vectors of `settings`' model and prompt version (none computed here)."""
    from sidecar.serving.cache import TextVectorCache, cache_namespace

    def refuse(missing):
        raise AssertionError(f"not in the persistent cache: {missing}")

    cache = TextVectorCache(settings.text_cache_file(), capacity=10, namespace=cache_namespace(
        model=encoder.name, weights=encoder.weights, prompt_template=settings.prompt_template,
        prompt_version=settings.prompt_version))
    try:
        return cache.get_or_compute([settings.prompt(t) for t in texts], refuse, timeout_s=10)
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
