"""The official `openai` Python client against the real app on a real HTTP server on loopback: what
the README claims about OpenAI compatibility, as a caller using that client sees it."""

from __future__ import annotations

import base64
import contextlib
import threading

import numpy as np
import openai
import pytest
from werkzeug.serving import make_server

from sidecar.api.auth import key_entry, new_key


@contextlib.contextmanager
def served(app):
    """The app on a real HTTP server on a free loopback port; yields its /v1 base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def openai_client(app):
    with served(app) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="not-checked", max_retries=0, timeout=30)
        try:
            yield client
        finally:
            client.close()


TEXTS = ["red circle", "a small blue square at the top"]


def test_embeddings_create_in_float_and_base64_gives_the_models_vectors(openai_client, encoder):
    expected = encoder.encode_texts(TEXTS)
    floats = openai_client.embeddings.create(model=encoder.name, input=TEXTS, encoding_format="float")
    assert floats.model == encoder.name and [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens > 0
    np.testing.assert_allclose([d.embedding for d in floats.data], expected, atol=1e-5)
    # Asked for explicitly, base64 comes back as sent: little-endian float32 bytes.
    packed = openai_client.embeddings.create(model=encoder.name, input=TEXTS, encoding_format="base64")
    np.testing.assert_allclose([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in packed.data],
                               expected, atol=1e-5)
    # Without encoding_format the client asks for base64 and decodes it itself.
    single = openai_client.embeddings.create(model=encoder.name, input=TEXTS[0])
    np.testing.assert_allclose(single.data[0].embedding, expected[0], atol=1e-5)


def test_models_list_and_retrieve_name_the_served_model(openai_client, encoder):
    assert [model.id for model in openai_client.models.list()] == [encoder.name]
    model = openai_client.models.retrieve(encoder.name)
    assert model.id == encoder.name and model.owned_by == "clip-sidecar"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        openai_client.models.retrieve("text-embedding-3-small")


def test_a_dimensions_the_model_cannot_give_is_refused_not_ignored(openai_client, encoder):
    with pytest.raises(openai.BadRequestError, match="Matryoshka") as info:
        openai_client.embeddings.create(model=encoder.name, input=TEXTS, dimensions=32)
    assert info.value.status_code == 400
    same = openai_client.embeddings.create(model=encoder.name, input=TEXTS, dimensions=encoder.dim)
    assert len(same.data[0].embedding) == encoder.dim


def test_the_clients_api_key_is_the_sidecars_bearer_key(build_app, encoder):
    keys = {name: new_key() for name in ("app", "web")}
    app = build_app(api_keys=f"{key_entry('app', ['embeddings'], keys['app'])},{key_entry('web', ['search'], keys['web'])}")
    with served(app) as base_url:
        for key, outcome in ((keys["app"], None), (keys["web"], openai.PermissionDeniedError),
                             (new_key(), openai.AuthenticationError)):
            with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30) as client:
                if outcome is None:
                    assert len(client.embeddings.create(model=encoder.name, input=TEXTS).data) == 2
                else:
                    with pytest.raises(outcome):
                        client.embeddings.create(model=encoder.name, input=TEXTS)
