from __future__ import annotations

import dataclasses

import pytest

from sidecar.api.app import create_app
from sidecar.api.state import state_of
from sidecar.config import Settings
from sidecar.stores.embedded import EmbeddedStore


@pytest.fixture
def app_settings(tmp_path, store_path, example_prompt_sets) -> Settings:
    # Own cache dir: the text-vector cache of one test never serves another.
    return Settings(cache_dir=tmp_path / "cache", store_path=store_path, max_batch_items=8,
                    max_body_bytes=256 * 1024, max_image_pixels=1_000_000, prompt_sets_dir=example_prompt_sets)


@pytest.fixture
def app(app_settings, encoder):
    store = EmbeddedStore(app_settings.store_path)
    app = create_app(app_settings, encoder=encoder, store=store)
    yield app
    state_of(app).close()  # its threads, the log files where quality_log_dir is set, the store


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def build_app(app_settings, encoder):
    """Apps of their own settings (app_settings with overrides), each closed after the test."""
    built = []

    def build(**overrides):
        settings = dataclasses.replace(app_settings, **overrides)
        store = EmbeddedStore(settings.store_path)
        built.append(create_app(settings, encoder=encoder, store=store))
        return built[-1]

    yield build
    for app in built:
        state_of(app).close()
