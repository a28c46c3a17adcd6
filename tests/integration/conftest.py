"""Fixtures for integration tests against a real OpenSearch node (scripts/opensearch-local)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from click.testing import CliRunner, Result
from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConnectionError as OSConnectionError

from sidecar.cli import main
from sidecar.ingest.embed import embed_corpus
from sidecar.model.encoder import Encoder
from sidecar.model.synthetic import write_corpus
from sidecar.stores.base import StoreError
from sidecar.stores.opensearch import OpenSearchStore
from sidecar.stores.opensearch_lock import LOCK_SUFFIX
from sidecar.types import Document, ModelSignature

URL = os.environ.get("SIDECAR_OPENSEARCH_URL", "http://127.0.0.1:9250")
DIM = 32
SIGNATURE = ModelSignature(model="synthetic", weights="clusters-v1", dim=DIM)
COLORS = ("red", "green", "blue", "yellow")


def _client() -> OpenSearch:
    return OpenSearch(hosts=[URL], http_auth=_auth(), timeout=30, max_retries=0,
                      verify_certs=os.environ.get("SIDECAR_OPENSEARCH_VERIFY_CERTS", "true") != "false")


def _auth() -> tuple[str, str] | None:
    user = os.environ.get("SIDECAR_OPENSEARCH_USER", "")
    return (user, os.environ.get("SIDECAR_OPENSEARCH_PASSWORD", "")) if user else None


@pytest.fixture(scope="session")
def node() -> str:
    """The node's URL; skips when none answers, except under CI where a missing node is a failure."""
    client = _client()
    try:
        client.cluster.health(wait_for_status="yellow", request_timeout=40)
    except OSConnectionError as exc:
        reason = f"no OpenSearch node answers at {URL} (start one: scripts/opensearch-local start): {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {reason}")
        pytest.skip(reason)
    finally:
        client.close()
    return URL


def cli(*args: object) -> Result:
    """The real CLI, quiet; its exit code must be 0."""
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def opensearch_args(alias: str) -> list[str]:
    """The options of the `opensearch` commands (OpenSearch only: no --store) for the node's `alias`."""
    return ["--opensearch-url", URL, "--opensearch-index", alias]


def store_args(alias: str) -> list[str]:
    """The CLI's store options for the node's `alias`."""
    return ["--store", "opensearch", *opensearch_args(alias)]


def make_store(**overrides: object) -> OpenSearchStore:
    kwargs: dict[str, object] = dict(url=URL, index=f"it-{uuid.uuid4().hex[:10]}", number_of_replicas=1,
                                     user=_auth()[0] if _auth() else "", password=_auth()[1] if _auth() else "")
    kwargs.update(overrides)
    return OpenSearchStore(**kwargs)  # type: ignore[arg-type]

def load_in_background(store: OpenSearchStore, docs: list[Document], *, started_after: int = 2000,
                       timeout_s: float = 120) -> tuple[threading.Thread, list[object]]:
    """`store.upsert(docs)` on a thread of its own, returned once `started_after` documents are in
    (OpenSearch's indexing count) so a fault can strike mid-load; the list gets the upsert's count
    or its StoreError."""
    outcome: list[object] = []

    def load() -> None:
        try:
            outcome.append(store.upsert(docs))
        except StoreError as exc:
            outcome.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and loader.is_alive():
        stats = store.client.indices.stats(index=store.alias, metric="indexing")
        if stats["_all"]["primaries"]["indexing"]["index_total"] >= started_after:
            break
        time.sleep(0.2)
    assert loader.is_alive(), "the load finished before the fault; raise the doc count"
    return loader, outcome



def owned_indices(alias: str) -> str:
    """Every index a store under `alias` creates: its versioned indices and its load-lock index."""
    return f"{alias}-v*,{alias}{LOCK_SUFFIX}"


def drop(store: OpenSearchStore) -> None:
    """Delete every index behind or named like the store's alias (tests own their names)."""
    store.client.indices.delete(index=owned_indices(store.alias), ignore_unavailable=True)
    store.close()


@pytest.fixture
def store(node: str) -> Iterator[OpenSearchStore]:
    s = make_store()
    s.claim(SIGNATURE)
    yield s
    drop(s)


def clustered_vectors(n: int, *, clusters: int = 8, seed: int = 0, spread: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n unit vectors around `clusters` unit centres; returns (vectors, labels, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, size=n)
    vectors = centres[labels] + spread * rng.normal(size=(n, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), labels, centres.astype(np.float32)


def make_documents(n: int, *, seed: int = 0, prefix: str = "d") -> tuple[list[Document], np.ndarray, np.ndarray]:
    vectors, labels, centres = clustered_vectors(n, seed=seed)
    docs = [
        Document(id=f"{prefix}{i}", vector=vectors[i], text=f"cluster{labels[i]} item {i} {COLORS[i % 4]} thing",
                 metadata={"color": COLORS[i % 4], "cluster": int(labels[i])}, content_hash=f"h{i}")
        for i in range(n)
    ]
    return docs, labels, centres


# --- the real model and corpus (tests/conftest.py: encoder, corpus, shards) on OpenSearch -----------

LARGE_CORPUS_ITEMS = 3000


@pytest.fixture(scope="session")
def large_corpus(tmp_path_factory) -> Path:
    """A few thousand synthetic JPEGs (every shape/colour/size/position combination several times)."""
    return write_corpus(tmp_path_factory.mktemp("large-corpus"), LARGE_CORPUS_ITEMS, seed=21)


@pytest.fixture(scope="session")
def large_shards(encoder: Encoder, large_corpus: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("large-shards")
    embed_corpus(encoder, large_corpus, out, workers=2, progress=False)
    return out


@pytest.fixture
def alias(node: str) -> Iterator[str]:
    """A fresh alias name; every index behind or named like it is deleted afterwards."""
    name = f"it-e2e-{uuid.uuid4().hex[:10]}"
    yield name
    client = _client()
    try:
        client.indices.delete(index=owned_indices(name), ignore_unavailable=True)
    finally:
        client.close()
