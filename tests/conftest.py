"""Shared fixtures: the trained tiny model, a small synthetic corpus, an indexed embedded store."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import Settings
from sidecar.ingest.embed import embed_corpus
from sidecar.ingest.indexing import index_shards
from sidecar.model.encoder import Encoder, load_encoder
from sidecar.model.synthetic import write_corpus
from sidecar.stores.embedded import EmbeddedStore

CORPUS_ITEMS = 400


@pytest.fixture(scope="session")
def model_settings() -> Settings:
    """Default cache dir: the tiny model is trained once per machine and reused."""
    return Settings()


@pytest.fixture(scope="session")
def encoder(model_settings: Settings) -> Encoder:
    return load_encoder(model_settings)


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
