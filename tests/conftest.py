"""Shared fixtures: a cache of the test run's own, the trained tiny model, a small synthetic corpus,
an indexed embedded store."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from sidecar.config import Settings
from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.indexing import index_shards
from sidecar.model.encoder import Encoder, load_encoder
from sidecar.model.prompts import PromptSetRegistry, load_prompt_set
from sidecar.model.synthetic import write_corpus
from sidecar.model.tiny_model import LARGE_MODEL_NAME
from sidecar.stores.embedded import EmbeddedStore
from tests.support import RecordingBar

CORPUS_ITEMS = 400
EXAMPLE_PROMPT_SETS = Path(__file__).resolve().parents[1] / "examples" / "prompt-sets"


@pytest.fixture(scope="session", autouse=True)
def test_cache_dir(tmp_path_factory) -> Path:
    """The cache every test and every process a test starts uses (tiny model, weights, text
    vectors): a folder of this test run, never the user's ~/.cache. The tiny model trains once
    per run into it. CLIP_SIDECAR_TEST_CACHE names a test-owned folder to reuse across runs
    instead (development: the model then trains once per machine)."""
    reused = os.environ.get("CLIP_SIDECAR_TEST_CACHE")
    path = Path(reused) if reused else tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIP_SIDECAR_CACHE", str(path))
        patch.setenv("MPLCONFIGDIR", str(path / "matplotlib"))  # matplotlib's font cache, not ~/.cache
        patch.delenv("SIDECAR_CACHE_DIR", raising=False)
        yield path


@pytest.fixture(scope="session")
def model_settings(test_cache_dir: Path) -> Settings:
    return Settings(cache_dir=test_cache_dir)


@pytest.fixture(scope="session")
def encoder(model_settings: Settings) -> Encoder:
    return load_encoder(model_settings)


@pytest.fixture(scope="session")
def fine_encoder(model_settings: Settings) -> Encoder:
    """The stronger tiny model (fine ranking), trained once per run into the test cache here, in
    the test process: tests that run the CLI in a subprocess then find it cached."""
    return load_encoder(Settings(cache_dir=model_settings.cache_dir, model=LARGE_MODEL_NAME))


@pytest.fixture(scope="session")
def fine_store_path(encoder, fine_encoder, corpus, tmp_path_factory) -> Path:
    """An embedded store of the test corpus with the stronger tiny model's fine vectors (the fine stage's)."""
    root = tmp_path_factory.mktemp("fine")
    embed_corpus(encoder, corpus, root / "shards", workers=0, fine_encoder=fine_encoder, progress=False)
    with EmbeddedStore(root / "store") as store:
        index_shards(store, root / "shards", progress=False)
    return root / "store"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Manifest of a synthetic corpus: JPEG files with shape/colour/size/position metadata."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), CORPUS_ITEMS, seed=11)


@pytest.fixture(scope="session")
def shards(encoder: Encoder, corpus: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    embed_corpus(encoder, corpus, out, workers=0, progress=False)
    return out


@pytest.fixture(scope="session")
def store_path(shards: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store")
    store = EmbeddedStore(path)
    try:
        index_shards(store, shards, progress=False)
    finally:
        store.close()
    return path


@pytest.fixture(scope="session")
def example_prompt_sets(tmp_path_factory) -> Path:
    """A prompt-set folder holding the examples of examples/prompt-sets (shapes, colors, descriptions),
    as `clip-sidecar prompts add` stores them; their vectors are computed by whoever first uses them."""
    folder = tmp_path_factory.mktemp("prompt-sets")
    registry = PromptSetRegistry(folder)
    for path in sorted(EXAMPLE_PROMPT_SETS.iterdir()):
        registry.add(load_prompt_set(path))
    return folder


@pytest.fixture
def root_logging():
    """`sidecar.logs.route_logs` (the CLI's configure_logging, gunicorn's post_fork) rewires the root logger
    and sets levels: put them back after the test."""
    loggers = [logging.getLogger(name) for name in ("", "sidecar", "opensearch")]
    saved = [(logger, list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def indexing_progress(monkeypatch) -> list[int]:
    """Every count indexing's progress bar reaches during the test, in order (a RecordingBar stands in for its
    tqdm)."""
    reached: list[int] = []
    monkeypatch.setattr(RecordingBar, "reached", reached)
    monkeypatch.setattr("sidecar.ingest.indexing.tqdm", RecordingBar)
    return reached
