import math
import re
from pathlib import Path

import pytest

from sidecar.config import Settings, SettingsError


def test_env_then_overrides():
    env = {"SIDECAR_MAX_BATCH": "8", "SIDECAR_STORE_PATH": "/tmp/x", "SIDECAR_OPENSEARCH_VERIFY_CERTS": "false"}
    settings = Settings.from_env(env, max_batch=None, max_wait_ms=1.5)
    assert settings.max_batch == 8
    assert settings.store_path == Path("/tmp/x")
    assert settings.opensearch_verify_certs is False
    assert settings.max_wait_ms == 1.5
    assert Settings.from_env(env, max_batch=4).max_batch == 4


def test_bad_values_name_the_variable_and_the_choices():
    with pytest.raises(ValueError, match="SIDECAR_MAX_BATCH='many'"):
        Settings.from_env({"SIDECAR_MAX_BATCH": "many"})
    with pytest.raises(ValueError, match="store='solr'.*embedded, opensearch"):
        Settings(store="solr")
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Settings(max_batch=0)
    with pytest.raises(ValueError, match="prompt_template"):
        Settings(prompt_template="a photo")


@pytest.mark.parametrize("template", ["a photo", "{{}}", "a {} of {x}", "{} and {}", "a {} {"])
def test_a_prompt_template_that_cannot_show_the_text_once_is_refused_naming_the_setting(template):
    # Each would fail every text request (KeyError, IndexError, ValueError) or give every text one vector.
    with pytest.raises(ValueError, match="setting prompt_template"):
        Settings(prompt_template=template)


def test_a_prompt_template_may_format_the_text_and_use_literal_braces():
    assert Settings(prompt_template="{{photo}}: {:.12}").prompt("a red circle at night") == "{photo}: a red circle"


@pytest.mark.parametrize(("name", "value", "message"), [
    ("request_timeout_s", 0.0, "must be > 0"), ("request_timeout_s", -1.0, "must be > 0"),
    ("request_timeout_s", math.inf, "finite"), ("max_wait_ms", -5.0, "must be >= 0"), ("max_wait_ms", math.nan, "finite"),
    ("api_rate_limit", math.nan, "finite"), ("hard_example_min_score", math.inf, "finite"),
    ("hard_example_repeat_seconds", -1.0, "must be >= 0"),
])
def test_time_and_rate_settings_refuse_values_no_request_could_meet(name, value, message):
    with pytest.raises(ValueError, match=f"setting {name} {message}|setting {name} must be a {message}"):
        Settings(**{name: value})


def test_max_image_pixels_over_what_pillow_opens_is_refused_naming_the_setting():
    Settings(max_image_pixels=178_956_970)  # twice PIL.Image.MAX_IMAGE_PIXELS: Pillow's own refusal starts past it
    with pytest.raises(ValueError, match="setting max_image_pixels=178956971 is over 178956970, the size Pillow"):
        Settings(max_image_pixels=178_956_971)


def test_settings_are_frozen():
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.max_batch = 2  # type: ignore[misc]


def test_image_formats_come_as_a_comma_list_and_must_be_pillows():
    settings = Settings.from_env({"SIDECAR_IMAGE_FORMATS": "jpeg, png"})
    assert settings.image_formats == ("JPEG", "PNG")
    assert Settings().image_formats == ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    with pytest.raises(ValueError, match="setting image_formats='JPEG,JPG': unknown JPG; Pillow opens .*PNG"):
        Settings(image_formats="JPEG,JPG")


@pytest.mark.parametrize("name", ["max_json_depth", "max_request_pixels", "max_resized_side", "max_jpeg_scans",
                                  "decode_memory_bytes", "max_text_chars", "max_filter_fields", "max_filter_values"])
def test_request_limits_are_positive(name):
    with pytest.raises(ValueError, match=f"setting {name} must be >= 1"):
        Settings(**{name: 0})


def test_the_encode_queue_bound_is_half_the_request_threads_at_most_one_batch_unless_set():
    assert Settings(request_threads=32, max_batch=64).encode_queue_items() == 16
    assert Settings(request_threads=512, max_batch=64).encode_queue_items() == 64
    assert Settings(request_threads=1).encode_queue_items() == 1
    assert Settings(request_threads=32, queue_items=500).encode_queue_items() == 500
    with pytest.raises(ValueError, match="queue_items must be >= 0"):
        Settings(queue_items=-1)


def test_pinned_workers_refuse_more_than_one_torch_thread_naming_both_settings():
    assert Settings.from_env({"SIDECAR_PIN_WORKERS": "true"}).pin_workers is True
    with pytest.raises(ValueError, match="pin_workers .* serve_torch_threads=2 .* set serve_torch_threads=1"):
        Settings(pin_workers=True, serve_torch_threads=2)


def test_rerank_candidates_over_max_k_is_refused_at_start_naming_both_settings_and_the_fix():
    # Before, such a server answered every search that sent no `candidates` with a 400 about that field.
    with pytest.raises(ValueError, match=r"rerank_candidates=100 .* over max_k=50, .* set rerank_candidates to at "
                                         r"most 50 or max_k to at least 100"):
        Settings.from_env({"SIDECAR_MAX_K": "50"})
    assert Settings.from_env({"SIDECAR_MAX_K": "50", "SIDECAR_RERANK_CANDIDATES": "50"}).max_k == 50


def test_the_text_cache_file_has_its_own_path_setting_and_can_be_turned_off():
    assert Settings(cache_dir="/c").text_cache_file() == Path("/c/text-vectors.sqlite")
    env = {"SIDECAR_TEXT_CACHE_PATH": "/v/texts.sqlite", "SIDECAR_CACHE_DIR": "/c"}
    assert Settings.from_env(env).text_cache_file() == Path("/v/texts.sqlite")
    assert Settings.from_env({**env, "SIDECAR_TEXT_CACHE_PERSIST": "false"}).text_cache_file() is None


def test_api_key_and_ca_settings_come_from_the_environment():
    env = {"SIDECAR_API_KEYS": "a:*:" + "0" * 64, "SIDECAR_API_RATE_LIMIT": "2.5", "SIDECAR_API_RATE_BURST": "5",
           "SIDECAR_METRICS_PUBLIC": "true", "SIDECAR_INSECURE": "yes", "SIDECAR_OPENSEARCH_CA_CERTS": "/ca.pem"}
    settings = Settings.from_env(env)
    assert (settings.api_keys, settings.api_rate_limit, settings.api_rate_burst) == ("a:*:" + "0" * 64, 2.5, 5)
    assert settings.metrics_public is True and settings.insecure is True and settings.opensearch_ca_certs == "/ca.pem"
    with pytest.raises(ValueError, match="api_rate_limit and api_rate_burst must be >= 0"):
        Settings(api_rate_limit=-1)


@pytest.mark.parametrize("rate", [5e-324, 1e-9])
def test_a_rate_limit_under_one_request_a_day_is_refused_where_its_retry_after_would_be_infinite_or_centuries(rate):
    with pytest.raises(SettingsError, match=r"api_rate_limit=.* is under one request a day .*set 0 for no limit"):
        Settings(api_rate_limit=rate)
    assert Settings(api_rate_limit=1 / 86_400).api_rate_limit == 1 / 86_400


def test_opensearch_shards_and_replicas_come_from_the_environment_into_the_store():
    from sidecar.stores import open_store

    settings = Settings.from_env({"SIDECAR_STORE": "opensearch", "SIDECAR_OPENSEARCH_SHARDS": "3",
                                  "SIDECAR_OPENSEARCH_REPLICAS": "0"})
    store = open_store(settings)  # connects lazily: no node needed
    try:
        assert store.number_of_shards == 3
        assert store.replicas == {"number_of_replicas": 0, "auto_expand_replicas": "false"}
    finally:
        store.close()
    with pytest.raises(ValueError, match="opensearch_shards must be >= 1"):
        Settings(opensearch_shards=0)


def test_opensearch_replicas_default_to_a_range_the_nodes_expand_and_a_count_stays_fixed():
    from sidecar.stores import open_store

    for environ, replicas, index_settings in (
            ({}, "0-1", {"number_of_replicas": 0, "auto_expand_replicas": "0-1"}),
            ({"SIDECAR_OPENSEARCH_REPLICAS": "1"}, 1, {"number_of_replicas": 1, "auto_expand_replicas": "false"}),
            ({"SIDECAR_OPENSEARCH_REPLICAS": " 1-all"}, "1-all",
             {"number_of_replicas": 1, "auto_expand_replicas": "1-all"})):
        settings = Settings.from_env({"SIDECAR_STORE": "opensearch", **environ})
        assert settings.opensearch_replicas == replicas
        store = open_store(settings)  # connects lazily: no node needed
        try:
            assert store.replicas == index_settings
        finally:
            store.close()
    for wrong in (-1, "-1", "2-1", "one", "0-"):
        with pytest.raises(ValueError, match=r"opensearch_replicas must be a whole number >= 0 \(a fixed count\) or a "
                                             r"range MIN-MAX such as 0-1 or 0-all"):
            Settings(opensearch_replicas=wrong)


def test_gpu_memory_fraction_comes_from_the_environment_and_must_be_a_share():
    assert Settings.from_env({"SIDECAR_GPU_MEMORY_FRACTION": "0.45"}).gpu_memory_fraction == 0.45
    assert Settings().gpu_memory_fraction == 0.0  # no limit of its own
    with pytest.raises(ValueError, match="setting gpu_memory_fraction must be between 0 and 1, got 1.5"):
        Settings(gpu_memory_fraction=1.5)


def _cli_variables(command) -> set[str]:
    """The environment variables the command line's options read (click's envvar), over every subcommand."""
    found = {param.envvar for param in command.params if isinstance(param.envvar, str)}
    for sub in getattr(command, "commands", {}).values():
        found |= _cli_variables(sub)
    return found


def test_every_sidecar_variable_the_docs_and_the_images_name_is_a_setting_or_a_flags_variable():
    from sidecar.cli import main

    known = {f"SIDECAR_{name.upper()}" for name in Settings.__dataclass_fields__} | _cli_variables(main)
    root = Path(__file__).parents[2]
    paths = [root / "README.md", *root.glob("docker-compose*.yml"), *(root / "docs").glob("*.md"),
             *(path for path in (root / "docker").rglob("*") if path.is_file())]
    # Whole names only: not CLIP_SIDECAR_CACHE, not a prefix such as SIDECAR_OPENSEARCH_*.
    named = {(path.name, name) for path in paths
             for name in re.findall(r"(?<![A-Z0-9_])SIDECAR_[A-Z0-9_]+(?![A-Z0-9_*])", path.read_text(encoding="utf-8"))}
    assert {(file, name) for file, name in named if name not in known} == set()


def test_readme_names_every_gunicorn_variable_the_config_file_and_the_health_probe_read_and_no_other():
    root = Path(__file__).parents[2]
    read = {name for path in ("sidecar/api/gunicorn_config.py", "sidecar/api/healthcheck.py")
            for name in re.findall(r"\bGUNICORN_[A-Z_]+", (root / path).read_text(encoding="utf-8"))}
    named = set(re.findall(r"\bGUNICORN_[A-Z_]+", (root / "README.md").read_text(encoding="utf-8")))
    assert {"GUNICORN_WORKERS", "GUNICORN_BIND"} <= read and named == read


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_the_images_keep_every_path_the_server_and_cli_write_on_the_data_volume(dockerfile):
    # The image runs as `sidecar`, which may write /data (its volume) and nothing of /app, the working
    # directory every relative default (data/store, data/prompt-sets) would land in.
    text = (Path(__file__).parents[2] / "docker" / dockerfile).read_text(encoding="utf-8")
    env = dict(re.findall(r"\b(SIDECAR_[A-Z0-9_]+)=(\S+)", text.replace("\\\n", " ")))
    for name in ("store_path", "text_cache_path", "prompt_sets_dir"):
        assert env.get(f"SIDECAR_{name.upper()}", "").startswith("/data/"), (name, env)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_the_images_run_as_the_non_root_uid_they_create_named_by_number_as_runasnonroot_requires(dockerfile):
    text = (Path(__file__).parents[2] / "docker" / dockerfile).read_text(encoding="utf-8")
    users = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert len(users) == 1 and re.fullmatch(r"[1-9][0-9]*:[0-9]+", users[0]), users  # a name cannot be verified
    uid, gid = users[0].split(":")
    assert f"useradd --create-home --uid {uid} --gid {gid} " in text and f"groupadd --gid {gid} " in text


def test_a_misspelt_sidecar_variable_is_warned_about_once_naming_the_setting_it_resembles(caplog, monkeypatch):
    from sidecar import config

    monkeypatch.setattr(config, "_warned_unknown", set())
    env = {"SIDECAR_STORE_PTH": "/srv/store", "SIDECAR_MAX_BATCH": "8", "SIDECAR_CONNECTOR_API_KEY": "k", "HOME": "/"}
    with caplog.at_level("WARNING", logger="sidecar.config"):
        settings = Settings.from_env(env)
        Settings.from_env(env)
    assert settings.store_path == Path("data/store")  # ignored, as the warning says
    assert [r.getMessage() for r in caplog.records] == [
        "environment variable SIDECAR_STORE_PTH is no clip-sidecar setting and is ignored; did you mean "
        "SIDECAR_STORE_PATH? (README: Configuration)"]


def test_the_sidecar_variables_that_are_no_setting_are_exactly_the_command_lines_own():
    from sidecar.cli import main
    from sidecar.config import FLAG_VARIABLES

    assert {name for name in _cli_variables(main) if name.startswith("SIDECAR_")} == set(FLAG_VARIABLES)


@pytest.mark.parametrize("entry", ["*.example.com", "example.com:8080", "http://example.com", "[::1]:8080"])
def test_an_allowed_hosts_entry_no_host_header_could_match_is_refused_naming_the_setting(entry):
    # Each was kept, and every request addressed to the name meant answered 403 (the check compares names alone).
    with pytest.raises(SettingsError, match=f"setting allowed_hosts entry {re.escape(repr(entry))}: expected a host "
                                            "name without scheme or port"):
        Settings.from_env({"SIDECAR_ALLOWED_HOSTS": f"sidecar, {entry}"})
    for admitted in ("sidecar, .example.com", "clip_sidecar", "search.example.com.", "*", " , ", "::1, [::1]"):
        Settings(allowed_hosts=admitted)
