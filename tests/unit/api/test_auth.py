"""API keys: the entry format, what a key's hash is, scopes, the token bucket."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

import pytest
import yaml

import sidecar
from sidecar.api.auth import (
    SCOPES,
    KeyGuard,
    TokenBucket,
    init_app,
    key_digest,
    key_entry,
    new_key,
    parse_key_entries,
    scope_of,
)
from sidecar.config import Settings
from sidecar.errors import Forbidden, RateLimited, Unauthorized


def test_the_readme_and_the_openapi_file_list_every_path_each_scope_opens():
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    bullet = readme[readme.index("- **Scopes**"):]
    bullet = bullet[:bullet.index("\n- **")]
    spec = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())["info"]["description"]
    for scope, prefixes in SCOPES.items():
        readme_list = re.search(rf"`{scope}`\s+\(([^)]*)\)", bullet).group(1)
        spec_list = re.search(rf"`{scope}`:\s+([^;)]*)", spec).group(1)
        for prefix in prefixes:
            assert f"`{prefix}" in readme_list, (scope, prefix, readme_list)
            assert prefix in spec_list, (scope, prefix, spec_list)


def test_a_created_entry_parses_back_to_its_name_scopes_and_the_keys_sha256():
    key = new_key()
    entry = key_entry("web", ["search", "embeddings"], key)
    (parsed,) = parse_key_entries(entry)
    assert parsed.name == "web" and parsed.scopes == {"search", "embeddings"}
    assert key not in entry
    # The documented way to hash a key by hand gives the same digest.
    by_hand = subprocess.run(["sha256sum"], input=key.encode(), capture_output=True, check=True).stdout.split()[0]
    assert parsed.digest.hex() == by_hand.decode() == key_digest(key)


def test_no_scope_or_star_means_every_scope():
    key = new_key()
    assert key_entry("a", [], key).split(":")[1] == "*" == key_entry("a", ["search", "*"], key).split(":")[1]


def test_entries_separated_by_commas_or_whitespace():
    text = f"a:*:{'0' * 64}, b:search:{'1' * 64}\nc:metrics+search:{'2' * 64}"
    assert [e.name for e in parse_key_entries(text)] == ["a", "b", "c"]
    assert parse_key_entries("  ") == ()
    # `export SIDECAR_API_KEYS="$SIDECAR_API_KEYS,<entry>"` (keys create's recipe) on an unset variable.
    assert [e.name for e in parse_key_entries(f",a:*:{'0' * 64},")] == ["a"]


@pytest.mark.parametrize("text, message", [
    ("a:*", "expected name:scopes:sha256-hex (3 fields), got 2"),
    (f"a b:*:{'0' * 64}", "entry 1: expected name:scopes:sha256-hex (3 fields), got 1"),  # a space splits
    (f"a/b:*:{'0' * 64}", "entry 1: the name must be"),
    (f"a:admin:{'0' * 64}", "unknown scope admin; choose * or some of embeddings, search, classify, metrics"),
    (f"a::{'0' * 64}", "unknown scope (empty)"),
    ("a:*:abc", "the hash must be 64 lowercase hex digits"),
    (f"a:*:{'0' * 64},a:search:{'1' * 64}", "entry 2: name 'a' is used twice"),
    # Was kept, and the key had the second's scopes only.
    (f"ops:*:{'0' * 64},web:search:{'0' * 64}", "entry 2 (web): the hash is that of key 'ops' too: one entry per key"),
])
def test_a_malformed_entry_is_refused_naming_its_position_and_the_rule(text, message):
    with pytest.raises(ValueError, match="SIDECAR_API_KEYS entry") as info:
        parse_key_entries(text)
    assert message in str(info.value)


def test_a_plain_key_pasted_as_an_entry_is_refused_without_repeating_it():
    key = new_key()
    with pytest.raises(ValueError) as info:
        parse_key_entries(f"a:*:{'0' * 64},{key}")
    assert "entry 2 is a key, not its hash" in str(info.value) and key not in str(info.value)


def test_scopes_map_paths_and_unscoped_paths_take_any_key():
    assert scope_of("/v1/embeddings") == scope_of("/v1/models") == scope_of("/v1/models/tiny-clip") == "embeddings"
    assert scope_of("/v1/opensearch/embeddings/texts") == scope_of("/v1/opensearch/rerank/ids") == "embeddings"
    assert scope_of("/v1/search") == scope_of("/v1/captions") == scope_of("/v1/facets") == "search"
    assert scope_of("/v1/documents/item-1/thumbnail") == "search" and scope_of("/metrics") == "metrics"
    assert scope_of("/v1/feedback") == "search" and scope_of("/v1/status") == "metrics"
    assert scope_of("/v1/classify") == scope_of("/v1/prompt-sets") == scope_of("/v1/prompt-sets/shapes") == "classify"
    assert scope_of("/readyz") is None and scope_of("/v1/searchx") is None


def guard_with(*scopes_per_key: list[str], **kwargs) -> tuple[KeyGuard, list[str]]:
    keys = [new_key() for _ in scopes_per_key]
    entries = ",".join(key_entry(f"k{i}", scopes, key) for i, (scopes, key) in enumerate(zip(scopes_per_key, keys)))
    return KeyGuard(parse_key_entries(entries), **kwargs), keys


def test_the_guard_tells_missing_malformed_unknown_and_out_of_scope_apart():
    guard, (search_key, all_key) = guard_with(["search"], [])
    assert guard.check(f"Bearer {search_key}", "/v1/search").name == "k0"
    assert guard.check(f"bearer   {all_key} ", "/metrics").name == "k1"  # the scheme is case-insensitive
    assert guard.check(None, "/healthz") is None
    for header, challenge in ((None, 'Bearer realm="clip-sidecar"'), (f"Basic {search_key}", 'error="invalid_request"'),
                              ("Bearer", 'error="invalid_request"'), (f"Bearer {new_key()}", 'error="invalid_token"')):
        with pytest.raises(Unauthorized) as info:
            guard.check(header, "/v1/search")
        assert challenge in info.value.headers["WWW-Authenticate"]
    with pytest.raises(Forbidden, match="key 'k0' has scope search; /v1/embeddings needs scope embeddings"):
        guard.check(f"Bearer {search_key}", "/v1/embeddings")


def test_token_bucket_allows_the_burst_then_refills_at_the_rate():
    now = [100.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token takes 1/rate seconds
    now[0] += 0.25
    assert bucket.take() == pytest.approx(0.25)  # half a token has come back; a refusal takes nothing
    now[0] += 0.25
    assert bucket.take() == 0.0
    now[0] += 60
    assert [bucket.take() for _ in range(4)][-1] > 0  # never more than the burst banked


def test_each_key_has_its_own_bucket_and_the_refusal_says_when_to_retry():
    guard, (busy, quiet) = guard_with([], [], rate=0.01, burst=2)
    for _ in range(2):
        guard.check(f"Bearer {busy}", "/v1/search")
    with pytest.raises(RateLimited) as info:
        guard.check(f"Bearer {busy}", "/v1/search")
    assert 99 <= info.value.retry_after_s <= 100 and "key 'k0' is over its limit of 0.01 requests/s" in info.value.message
    assert guard.check(f"Bearer {quiet}", "/v1/search").name == "k1"


@pytest.mark.parametrize(("allowed_hosts", "hosts"), [
    ("", "localhost or an IP address"),
    (".example.com", "localhost, an IP address or .example.com"),
])
def test_the_open_server_says_in_one_sentence_which_hosts_it_answers(caplog, allowed_hosts, hosts):
    from flask import Flask

    caplog.set_level(logging.INFO, logger="sidecar.api.auth")
    init_app(Flask(__name__), Settings(allowed_hosts=allowed_hosts))
    assert caplog.messages == [f"no API keys configured (SIDECAR_API_KEYS): every endpoint is open to requests "
                               f"addressed to {hosts}"]


def test_a_rate_limit_without_keys_is_warned_about_as_limiting_nothing(caplog):
    from flask import Flask

    init_app(Flask(__name__), Settings(api_rate_limit=5))
    assert "SIDECAR_API_RATE_LIMIT=5 limits nothing: rate limits count per API key, and SIDECAR_API_KEYS names " \
        "none" in caplog.messages


def test_serve_help_the_openapi_file_and_the_readme_name_every_page_file_served_without_a_key():
    from sidecar.api.page import PUBLIC_PATHS
    from sidecar.cli.serve import serve

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    readme = readme[readme.index("**With API keys** the page's own files"):][:200]
    spec = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())
    static = spec["paths"]["/static/{name}"]["get"]
    help_text = " ".join(serve.help.split())
    for path in PUBLIC_PATHS:
        assert path in help_text, path
        assert path in " ".join(spec["info"]["description"].split()), path
        assert f"`{path}`" in readme, path
        if path.startswith("/static/"):
            assert path.removeprefix("/static/") in static["description"], path
