"""Fuzzing, bounded to well under a minute each: no body whatever gets a 5xx (hypothesis, the real
app in process), and the OpenAPI file and the server agree (schemathesis against gunicorn on
loopback: every response documented and of its schema, schema-violating requests refused,
schema-valid ones served, every path the file says takes a key refused without one)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sidecar
from sidecar.api.auth import key_entry, new_key
from sidecar.model.tiny_model import checkpoint_path
from tests.support import gunicorn_server, png_b64

PNG = png_b64(size=(16, 16))
# Strings as clients may send them: any code point, and often the ones that used to break things
# (lone surrogates, which json.dumps escapes as \ud800; NUL; quotes; backslashes; blanks).
TEXT = (st.text(st.characters(exclude_categories=()), max_size=40)
        | st.text(st.sampled_from(["\ud800", "\udfff", "\x00", '"', "\\", " ", "\u2028", "a", "é"]), max_size=6))
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 2, max_value=2**64)
           | st.floats() | TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
IMAGES = st.sampled_from([PNG, base64.encodebytes(base64.b64decode(PNG)).decode(), f"data:image/png;base64,{PNG}",
                          base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n").decode(), png_b64(size=(2, 3000))]) \
    | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | TEXT
ITEMS = TEXT | IMAGES | st.fixed_dictionaries({}, optional={"type": st.sampled_from(["text", "image"]),
                                                             "text": TEXT, "image": IMAGES})
FILTERS = st.dictionaries(TEXT, SCALARS | st.lists(SCALARS, max_size=5), max_size=6)


def bodies(required: dict, optional: dict) -> st.SearchStrategy:
    """Bodies of an endpoint's shape, each field plausible (so generation gets past the first check
    into every later one, the store's included); the same with one field anything at all; anything."""
    valid = st.fixed_dictionaries(required, optional=optional)
    spoiled = st.builds(lambda body, field, value: {**body, field: value},
                        valid, st.sampled_from(sorted({*required, *optional})), JSON)
    return valid | spoiled | JSON


EMBEDDINGS = bodies({"input": st.lists(ITEMS, min_size=1, max_size=10) | ITEMS}, {
    "modality": st.sampled_from(["text", "image"]), "encoding_format": st.sampled_from(["float", "base64"]),
    "dimensions": st.integers(-2, 100), "model": TEXT, "user": TEXT})
SEARCH = bodies({}, {
    "text": TEXT, "image": IMAGES, "mode": st.sampled_from(["vector", "bm25", "hybrid"]),
    "k": st.integers(-5, 1100), "candidates": st.integers(-5, 1100),
    "fusion": st.sampled_from(["minmax", "zscore", "rrf"]),
    "weights": st.fixed_dictionaries({}, optional={"vector": st.floats(), "bm25": st.floats()}),
    "rerank": st.booleans(), "exact": st.booleans(), "filters": FILTERS})
# What ml-commons sends the OpenSearch endpoints: lists of texts, nulls and images; rerank pages.
ML_INPUT = bodies({"input": st.lists(TEXT | IMAGES | st.none(), min_size=1, max_size=4)},
                  {"model": TEXT, "user": TEXT, "encoding_format": st.sampled_from(["float", "base64"])})
RERANK = bodies({"query": TEXT, "documents": st.lists(TEXT | IMAGES | st.sampled_from(["item-000000", ""]),
                                                      max_size=5)},
                {"top_n": st.integers(-1, 6), "model": TEXT, "return_documents": st.booleans()})
CLASSIFY = bodies({"set": st.sampled_from(["shapes", "colors", "descriptions", "nope"]) | TEXT,
                   "input": st.lists(ITEMS, min_size=1, max_size=10) | ITEMS}, {
    "modality": st.sampled_from(["text", "image"]), "k": st.integers(-5, 1100),
    "threshold": st.floats() | st.integers(-3, 3)})
NESTED = st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth)

FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_answered_without_5xx(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        error = response.json["error"]
        assert error["code"] and error["message"]


@pytest.mark.parametrize(("path", "bodies"), [
    ("/v1/embeddings", EMBEDDINGS), ("/v1/search", SEARCH), ("/v1/classify", CLASSIFY),
    ("/v1/opensearch/embeddings/texts", ML_INPUT), ("/v1/opensearch/embeddings/text-image", ML_INPUT),
    ("/v1/opensearch/rerank/ids", RERANK), ("/v1/opensearch/rerank/texts", RERANK),
    ("/v1/opensearch/rerank/images", RERANK)])
def test_no_json_body_gets_a_5xx(client, path, bodies):
    @FUZZ
    @given(body=bodies)
    def post(body):
        raw = json.dumps(body)  # NaN and Infinity as Python writes them; surrogates escaped
        assert_answered_without_5xx(client.post(path, data=raw, content_type="application/json"))

    post()


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/search", "/v1/classify",
                                  "/v1/opensearch/embeddings/text-image", "/v1/opensearch/rerank/ids"])
def test_no_raw_body_gets_a_5xx(client, path):
    @FUZZ
    @given(raw=st.binary(max_size=200) | TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")) | NESTED.map(str.encode))
    def post(raw):
        assert_answered_without_5xx(client.post(path, data=raw, content_type="application/json"))

    post()


# ---- schemathesis: the OpenAPI file against the real server -------------------------------------

HERE = Path(__file__).parent
SCHEMATHESIS = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(HERE / "schemathesis.toml")]


@pytest.fixture(scope="module")
def default_server(store_path, test_cache_dir, example_prompt_sets, tmp_path_factory):
    """gunicorn with every limit at its default (the OpenAPI file states those), a text-vector cache
    of its own, the test run's tiny model, the example prompt sets, and API keys (the file declares
    them): yields its URL, its log and a key of every scope."""
    folder = tmp_path_factory.mktemp("schemathesis-server")
    key = new_key()
    env = {"SIDECAR_STORE_PATH": str(store_path), "SIDECAR_CACHE_DIR": str(folder / "cache"),
           "SIDECAR_API_KEYS": key_entry("fuzz", [], key),
           "SIDECAR_PRETRAINED": str(checkpoint_path(test_cache_dir)),
           "SIDECAR_PROMPT_SETS_DIR": str(example_prompt_sets),
           # Not a limit the file states: a fuzzing worker sending up to 256 texts a request would
           # otherwise meet the default encode queue (8 threads: 4 items) and get 503 overloaded.
           "SIDECAR_QUEUE_ITEMS": "1024",
           # /v1/feedback on (it answers 404 not_enabled without a log folder), hard examples logged
           "SIDECAR_QUALITY_LOG_DIR": str(folder / "quality")}
    with gunicorn_server(env, folder / "server.log", api_key=key) as url:
        yield url, folder / "server.log", key


def test_the_openapi_file_and_the_server_agree(default_server, tmp_path):
    url, log, key = default_server
    # Every check but positive_data_acceptance, which the hook replaces: schema-valid requests are
    # served except where they carry image bytes or `dimensions` (tests/e2e/schemathesis_hooks.py).
    result = subprocess.run(
        [*SCHEMATHESIS, "run", str(Path(sidecar.__file__).parent / "openapi.yaml"), "--url", url,
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         # The key as an explicit header: ignored_auth then also sends each path without it and with a wrong one.
         "--header", f"Authorization: Bearer {key}",
         # One worker: with two, hypothesis describes strategies (ast.parse) on two threads at once, which
         # CPython 3.11 can fail with "SystemError: AST constructor recursion depth mismatch" (seen in CI).
         "--phases", "examples,coverage,fuzzing", "--max-examples", "150", "--seed", "1", "--workers", "1"],
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HERE / "schemathesis_hooks.py"), "NO_COLOR": "1"},
        capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its caches (.schemathesis/, .hypothesis/) go there
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-5000:]
    assert "Traceback" not in log.read_text()
