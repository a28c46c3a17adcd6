"""API keys on the real app: 401 without a valid key, 403 outside a key's scopes, 429 over its rate."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import requests
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import sidecar
from sidecar.api.app import create_app
from sidecar.api.auth import OPEN_PATHS, STATUS_ONLY_PATHS, is_loopback, key_entry, new_key, scope_of
from sidecar.api.page import PUBLIC_PATHS
from sidecar.api.state import state_of
from sidecar.cli import main
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document, ModelSignature
from tests.support import free_port, gunicorn_server, store_counts

# Every endpoint that takes a key, with a request it answers 200 to.
PROTECTED = [
    ("POST", "/v1/embeddings", {"input": ["red circle"]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny-clip", None),
    ("POST", "/v1/search", {"text": "red circle", "k": 3}),
    # the search page's other calls read the index too: scope search
    ("POST", "/v1/captions", {"like": "item-000001", "k": 3}),
    ("GET", "/v1/facets", None),
    ("GET", "/v1/documents/item-000001/thumbnail", None),
    ("POST", "/v1/opensearch/embeddings/texts", {"input": ["red circle"]}),  # what ml-commons calls
    ("POST", "/v1/opensearch/rerank/texts", {"query": "red circle", "documents": ["a red circle"]}),
    ("POST", "/v1/feedback", {"text": "red circle", "doc_id": "item-000001"}),
    ("GET", "/v1/status", None),
    ("POST", "/v1/classify", {"set": "colors", "modality": "text", "input": ["red circle"]}),
    ("GET", "/v1/prompt-sets", None),
    ("GET", "/v1/prompt-sets/shapes", None),
    ("GET", "/readyz", None),
    ("GET", "/openapi.yaml", None),
    ("GET", "/metrics", None),
]
IDS = [f"{method} {path}" for method, path, _ in PROTECTED]
SEARCH_SCOPE = {"/v1/search", "/v1/captions", "/v1/facets", "/v1/documents/item-000001/thumbnail"}


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {name: new_key() for name in ("ops", "web", "opensearch", "tagger", "revoked")}


def entries(keys: dict[str, str], *names: str) -> str:
    scopes = {"ops": [], "web": ["search"], "opensearch": ["embeddings"], "tagger": ["classify"], "revoked": []}
    return ",".join(key_entry(name, scopes[name], keys[name]) for name in names)


@pytest.fixture
def keyed(build_app, keys, tmp_path):
    """The app as it runs after `revoked`'s line was removed from SIDECAR_API_KEYS (with a quality log
    folder, so that /v1/feedback answers)."""
    return build_app(api_keys=entries(keys, "ops", "web", "opensearch", "tagger"),
                     quality_log_dir=str(tmp_path / "quality")).test_client()


def call(client, method, path, body, key=None, *, header=None):
    headers = {"Authorization": header or f"Bearer {key}"} if key or header else {}
    return client.open(path, method=method, json=body, headers=headers)


@pytest.mark.parametrize("method, path, body", PROTECTED, ids=IDS)
def test_missing_wrong_revoked_and_malformed_keys_answer_401_on_every_protected_endpoint(keyed, keys, method,
                                                                                          path, body):
    missing = [] if path in STATUS_ONLY_PATHS else [(None, None)]  # /readyz answers its status without a key
    for key, header in (*missing, (new_key(), None), (keys["revoked"], None),
                        (None, f"Basic {keys['ops']}"), (None, f"Bearer{keys['ops']}")):
        response = call(keyed, method, path, body, key, header=header)
        assert response.status_code == 401, (key, header, response.json)
        assert response.json["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="clip-sidecar"')


@pytest.mark.parametrize("method, path, body", PROTECTED, ids=IDS)
def test_a_valid_key_is_served(keyed, keys, method, path, body):
    response = call(keyed, method, path, body, keys["ops"])
    assert response.status_code == 200, response.get_data(as_text=True)[:300]


def test_a_key_outside_its_scopes_gets_403_inside_them_200(keyed, keys):
    web, opensearch, tagger = keys["web"], keys["opensearch"], keys["tagger"]
    unscoped = ("/readyz", "/openapi.yaml")
    for method, path, body in PROTECTED:
        web_status = call(keyed, method, path, body, web).status_code
        opensearch_status = call(keyed, method, path, body, opensearch).status_code
        tagger_status = call(keyed, method, path, body, tagger).status_code
        assert web_status == (200 if path in (*SEARCH_SCOPE, "/v1/feedback", *unscoped) else 403), path
        assert opensearch_status == (200 if path.startswith(("/v1/embeddings", "/v1/models", "/v1/opensearch", *unscoped))
                                     else 403), path
        assert tagger_status == (200 if path.startswith(("/v1/classify", "/v1/prompt-sets", *unscoped)) else 403), path
    refused = call(keyed, "POST", "/v1/search", PROTECTED[3][2], opensearch)
    assert refused.json["error"] == {"code": "forbidden", "message": "key 'opensearch' has scope embeddings; "
                                                                     "/v1/search needs scope search"}


def test_unknown_paths_need_a_key_too_so_they_reveal_nothing(keyed, keys):
    assert keyed.get("/no-such-path").status_code == 401
    assert call(keyed, "GET", "/no-such-path", None, keys["ops"]).status_code == 404


def test_the_search_page_loads_without_a_key_and_holds_no_data(keyed, keys):
    # Its own files must load before a key can be typed into it; every call it then makes sends the key.
    for path in ("/", "/static/page.js", "/static/page.css"):
        response = keyed.get(path)
        assert response.status_code == 200 and response.headers["Content-Security-Policy"], path
    assert keyed.get("/static/other.js").status_code == 401
    assert keyed.get("/v1/documents/item-000001/thumbnail").status_code == 401


def test_the_openapi_file_says_which_paths_take_a_key_and_documents_401_403_429_where_they_can_answer():
    spec = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())
    scheme = spec["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert spec["security"] == [{"apiKey": []}]
    ref = "#/components/responses/{}".format
    for path, operations in spec["paths"].items():
        template = re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)))
        for method, operation in operations.items():
            where, responses = f"{method} {path}", operation["responses"]
            if any(template.fullmatch(open_path) for open_path in (*OPEN_PATHS, *PUBLIC_PATHS)):
                assert operation["security"] == [], where
                continue
            # /metrics may be open too (SIDECAR_METRICS_PUBLIC), /readyz answers its status alone without a key.
            may_be_open = path == "/metrics" or path in STATUS_ONLY_PATHS
            assert operation.get("security", spec["security"]) == ([{"apiKey": []}, {}] if may_be_open
                                                                   else [{"apiKey": []}]), where
            assert responses["401"] == {"$ref": ref("Unauthorized")}, where
            # A key outside its scopes: only where the path needs one (/readyz, /openapi.yaml take any key).
            assert responses.get("403") == ({"$ref": ref("Forbidden")} if scope_of(path) else None), where
            # ml-commons retries a 429 only with x-amzn-ErrorType, which every /v1/opensearch answer carries.
            throttled = "Throttled" if path.startswith("/v1/opensearch/") else "RateLimited"
            assert responses["429"] == {"$ref": ref(throttled)}, where


def test_healthz_is_open_and_metrics_opens_with_metrics_public(build_app, keys):
    client = build_app(api_keys=entries(keys, "ops"), metrics_public=True).test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_without_a_key_readyz_answers_ready_or_not_alone_and_with_one_its_details(build_app, keys, encoder, tmp_path):
    # A kubelet's httpGet probe sends no key; the details (model, store, documents, a reason that can name the
    # store's address) stay behind one.
    client = build_app(api_keys=entries(keys, "ops", "web"), store_path=tmp_path / "store").test_client()
    spec = yaml.safe_load((Path(sidecar.__file__).parent / "openapi.yaml").read_text())["paths"]["/readyz"]["get"]
    ready = client.get("/readyz")
    assert (ready.status_code, ready.json) == (200, {"status": "ready"})
    detailed = call(client, "GET", "/readyz", None, keys["web"])
    assert detailed.status_code == 200 and (detailed.json["model"], detailed.json["documents"]) == (encoder.name, 0)
    # Another model claims the store while the app serves (an `index` of its shards): not ready, keyed or not.
    other = ModelSignature(model="other-clip", weights="other-weights", dim=2 * encoder.dim)
    with EmbeddedStore(tmp_path / "store") as indexer:
        indexer.claim(other)
        indexer.upsert([Document(id="d0", vector=np.eye(other.dim, dtype=np.float32)[0], text="red circle")])
    # The keyed call first: it is answered fresh, and the keyless one within the second shares its answer.
    detailed = call(client, "GET", "/readyz", None, keys["web"])
    assert detailed.status_code == 503 and "vectors of other-clip" in detailed.json["reason"]
    not_ready = client.get("/readyz")
    assert (not_ready.status_code, not_ready.json) == (503, {"status": "not_ready"})
    for answer in (ready, not_ready):
        content = spec["responses"][str(answer.status_code)]["content"]["application/json"]
        jsonschema.validate(answer.json, content["schema"])


def test_keyless_readyz_asks_the_store_once_a_second_per_worker_and_a_keyed_one_every_time(build_app, keys,
                                                                                            tmp_path):
    # Without a key anyone reaching the port may ask; on OpenSearch each count is a cluster request.
    app = build_app(api_keys=entries(keys, "ops"), store_path=tmp_path / "store")
    state = state_of(app)
    with store_counts(state.store) as counted:
        answers = [app.test_client().get("/readyz") for _ in range(20)]
        assert {(a.status_code, a.get_data(as_text=True)) for a in answers} == {(200, '{"status":"ready"}\n')}
        assert len(counted) == 1
        now = [0.0]  # the second is counted on this clock from here on
        state.readiness.clock = lambda: now[0]
        for _ in range(3):
            assert call(app.test_client(), "GET", "/readyz", None, keys["ops"]).json["documents"] == 0
        assert len(counted) == 4
        now[0] += 0.9  # within the second since the last (keyed) answer: shared
        app.test_client().get("/readyz")
        assert len(counted) == 4
        now[0] += 0.2  # past it: counted again, so a probe sees a change within the second
        app.test_client().get("/readyz")
        assert len(counted) == 5


def latency_sum(client, key: str, endpoint: str) -> float:
    """sidecar_request_seconds_sum of `endpoint` in a scrape of the app's /metrics."""
    scrape = call(client, "GET", "/metrics", None, key).get_data(as_text=True)
    return next(sample.value for family in text_string_to_metric_families(scrape) for sample in family.samples
                if sample.name == "sidecar_request_seconds_sum" and sample.labels["endpoint"] == endpoint)


def test_a_request_refused_for_its_key_adds_its_own_positive_time_to_the_endpoints_latency(build_app, keys):
    # The key check runs before the request's handler; the latency clock must start before it.
    client = build_app(api_keys=entries(keys, "ops")).test_client()
    assert call(client, "POST", "/v1/search", {"text": "red circle"}, keys["ops"]).status_code == 200
    before = latency_sum(client, keys["ops"], "/v1/search")
    assert all(call(client, "POST", "/v1/search", {"text": "red circle"}).status_code == 401 for _ in range(20))
    assert latency_sum(client, keys["ops"], "/v1/search") > before


def test_without_keys_every_endpoint_is_open(build_app, tmp_path):
    client = build_app(quality_log_dir=str(tmp_path / "quality")).test_client()
    for method, path, body in PROTECTED:
        assert call(client, method, path, body).status_code == 200, path


REBOUND = "rebound.example:8080"  # what a page's requests carry once its domain resolves to 127.0.0.1


@pytest.mark.parametrize("method, path, body", PROTECTED, ids=IDS)
def test_without_keys_a_request_addressed_to_another_host_gets_403_naming_it_and_the_setting(build_app, tmp_path,
                                                                                           method, path, body):
    client = build_app(quality_log_dir=str(tmp_path / "quality")).test_client()
    response = client.open(path, method=method, json=body, headers={"Host": REBOUND})
    assert response.status_code == 403, response.json
    assert response.json["error"]["code"] == "forbidden"
    assert repr(REBOUND) in response.json["error"]["message"]
    assert "SIDECAR_ALLOWED_HOSTS" in response.json["error"]["message"]


def test_without_keys_liveness_answers_any_host(build_app):
    assert build_app().test_client().get("/healthz", headers={"Host": REBOUND}).status_code == 200


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "LocalHost.:8080", "page.localhost:8080",
                                  "127.0.0.1:8080", "[::1]:8080", "10.1.2.3", "[fd00::5]:80"])
def test_without_keys_localhost_its_subdomains_and_ip_addresses_are_answered(build_app, host):
    assert build_app().test_client().get("/v1/models", headers={"Host": host}).status_code == 200


def test_allowed_hosts_admits_its_names_and_domains_and_star_admits_any(build_app):
    client = build_app(allowed_hosts="sidecar, .example.com").test_client()
    statuses = {host: client.get("/v1/models", headers={"Host": host}).status_code
                for host in ("sidecar:8080", "example.com", "api.example.com", "notexample.com", "sidecar.evil")}
    assert statuses == {"sidecar:8080": 200, "example.com": 200, "api.example.com": 200, "notexample.com": 403,
                        "sidecar.evil": 403}
    anything = build_app(allowed_hosts="*").test_client()
    assert anything.get("/v1/models", headers={"Host": REBOUND}).status_code == 200


def test_allowed_hosts_admits_a_name_with_an_underscore_and_a_refused_host_is_named_as_sent(build_app):
    client = build_app(allowed_hosts="clip_sidecar").test_client()  # a compose service's name
    assert client.get("/v1/models", headers={"Host": "clip_sidecar:8080"}).status_code == 200
    for host in ("other_sidecar:8080", "rebound.example:80@localhost"):  # userinfo: addressed to rebound.example
        refused = client.get("/v1/models", headers={"Host": host})
        assert refused.status_code == 403 and f"Host {host!r} is not" in refused.json["error"]["message"]


def test_with_keys_the_host_is_not_checked(keyed, keys):
    assert keyed.get("/v1/models", headers={"Host": REBOUND, "Authorization": f"Bearer {keys['ops']}"}
                     ).status_code == 200


def test_serve_listens_on_an_ipv6_address(store_path, tmp_path):
    # `serve --host ::1` handed gunicorn `--bind ::1:PORT`, which it refused ("'' is not a valid port number").
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    env = {"SIDECAR_STORE_PATH": str(store_path), "SIDECAR_TEXT_CACHE_PATH": str(tmp_path / "text.sqlite")}
    with gunicorn_server(env, tmp_path / "server.log", host="::1") as url:
        assert url.startswith("http://[::1]:")
        assert requests.get(f"{url}/v1/models", timeout=60).status_code == 200


def test_the_served_open_api_refuses_a_rebound_host_and_answers_its_own_address(store_path, tmp_path):
    env = {"SIDECAR_STORE_PATH": str(store_path), "SIDECAR_TEXT_CACHE_PATH": str(tmp_path / "text.sqlite")}
    with gunicorn_server(env, tmp_path / "server.log") as url:
        rebound = requests.get(f"{url}/v1/models", headers={"Host": REBOUND}, timeout=60)
        direct = requests.get(f"{url}/v1/models", timeout=60)
    assert (rebound.status_code, direct.status_code) == (403, 200)
    assert repr(REBOUND) in rebound.json()["error"]["message"]


def test_over_the_rate_a_key_gets_429_with_retry_after_and_other_keys_are_still_served(build_app, keys):
    # 0.01 requests/s: no token comes back while the test runs, however slow the machine.
    client = build_app(api_keys=entries(keys, "ops", "web"), api_rate_limit=0.01, api_rate_burst=3).test_client()
    search = PROTECTED[3][2]
    assert [call(client, "POST", "/v1/search", search, keys["web"]).status_code for _ in range(3)] == [200] * 3
    refused = call(client, "POST", "/v1/search", search, keys["web"])
    assert refused.status_code == 429 and refused.json["error"]["code"] == "rate_limited"
    assert 99 <= int(refused.headers["Retry-After"]) <= 100
    assert call(client, "POST", "/v1/search", search, keys["ops"]).status_code == 200
    assert client.get("/healthz").status_code == 200  # open paths take no token


def test_over_the_rate_the_connectors_key_gets_429_that_ml_commons_retries(build_app, keys):
    client = build_app(api_keys=entries(keys, "opensearch"), api_rate_limit=0.01, api_rate_burst=1).test_client()
    texts = ("POST", "/v1/opensearch/embeddings/texts", {"input": ["red circle"]})
    assert call(client, *texts, keys["opensearch"]).status_code == 200
    refused = call(client, *texts, keys["opensearch"])
    assert refused.status_code == 429 and refused.headers["x-amzn-ErrorType"] == "ThrottlingException"


@pytest.mark.parametrize(("key_name", "exit_code", "message"), [
    (None, 2, "SIDECAR_API_KEYS is set, so the sidecar takes keys: pass the connectors' key with --api-key"),
    ("revoked", 2, "--api-key: API key not recognised"),
    ("web", 2, "--api-key: key 'web' has scope search; /v1/opensearch/embeddings/texts needs scope embeddings"),
    ("opensearch", 1, "port=9): Failed to establish a new connection"),  # admitted: on to the (absent) cluster
])
def test_connect_checks_the_connectors_key_against_the_sidecars_keys(keys, key_name, exit_code, message):
    env = {"SIDECAR_API_KEYS": entries(keys, "web", "opensearch"),
           "SIDECAR_CONNECTOR_API_KEY": keys[key_name] if key_name else None}
    result = CliRunner().invoke(main, ["-q", "opensearch", "connect", "--opensearch-url", "http://127.0.0.1:9"],
                                env=env)
    assert result.exit_code == exit_code and message in result.output, result.output
    assert all(key not in result.output for key in keys.values())


def test_malformed_api_keys_setting_fails_the_app_before_the_model_loads(app_settings, keys):
    settings = dataclasses.replace(app_settings, api_keys=f"{entries(keys, 'ops')},{keys['web']}")
    # No encoder is passed: reaching the model load would take seconds and a different error.
    with pytest.raises(ValueError, match="SIDECAR_API_KEYS entry 2 is a key, not its hash") as info:
        create_app(settings, store=object())
    assert keys["web"] not in str(info.value)


def test_no_answer_carries_a_key_or_its_hash(keyed, keys):
    digest_of_web = entries(keys, "web").split(":")[2]
    for method, path, body in PROTECTED:
        for key in keys.values():
            data = call(keyed, method, path, body, key).get_data()  # bytes: a thumbnail is a JPEG
            assert all(k.encode() not in data for k in keys.values()) and digest_of_web.encode() not in data, path


def test_keys_create_prints_the_key_once_and_the_entry_that_admits_it(build_app):
    result = CliRunner().invoke(main, ["keys", "create", "--name", "web", "--scope", "search"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in result.output.splitlines())
    key = lines["key (shown once, not stored)"].strip()
    entry = lines["SIDECAR_API_KEYS entry"].strip()
    assert key.startswith("csk_") and entry.startswith("web:search:") and key not in entry
    client = build_app(api_keys=entry).test_client()
    assert call(client, "POST", "/v1/search", PROTECTED[3][2], key).status_code == 200
    assert call(client, "POST", "/v1/embeddings", PROTECTED[0][2], key).status_code == 403
    unnamed = CliRunner().invoke(main, ["keys", "create"]).output
    assert "SIDECAR_API_KEYS entry:        key-" in unnamed and ":*:" in unnamed
    refused = CliRunner().invoke(main, ["keys", "create", "--name", "a b"])
    assert refused.exit_code == 2 and "Invalid value for --name" in refused.output


# ---- the real server: logs, the exposure rule, TLS --------------------------------------------

QUERY = "quokka-umbrella-7731"  # a text no log line has any other reason to hold


@pytest.mark.parametrize("log_flag, gunicorn_level", [("", "info"), ("-v", "debug")], ids=["info", "debug"])
def test_keys_never_reach_the_logs_and_query_text_stays_out_of_info(store_path, tmp_path, keys, log_flag,
                                                                     gunicorn_level):
    log = tmp_path / "server.log"
    env = {"SIDECAR_STORE_PATH": str(store_path), "SIDECAR_TEXT_CACHE_PATH": str(tmp_path / "text.sqlite"),
           "SIDECAR_API_KEYS": entries(keys, "ops", "web", "opensearch"), "GUNICORN_LOGLEVEL": gunicorn_level}
    with gunicorn_server(env, log, log_flag=log_flag, api_key=keys["ops"]) as url:
        for key in (keys["ops"], keys["web"], keys["revoked"], keys["opensearch"]):
            for path, body in (("/v1/search", {"text": QUERY, "k": 3}), ("/v1/embeddings", {"input": [QUERY]})):
                requests.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        requests.post(f"{url}/v1/search", json={"text": QUERY}, timeout=60,
                      headers={"Authorization": f"Basic {keys['ops']}"})
        # HTTP Basic as clients send it (`curl -u KEY:`): gunicorn's access line names the Basic user.
        requests.post(f"{url}/v1/search", json={"text": QUERY}, timeout=60, auth=(keys["web"], ""))
        statuses = [requests.post(f"{url}/v1/search", json={"text": QUERY, "k": 3}, timeout=60,
                                  headers={"Authorization": f"Bearer {keys[name]}"}).status_code
                    for name in ("ops", "web", "opensearch", "revoked")]
    assert statuses == [200, 200, 403, 401]  # the requests did reach the checks the log would record
    text = log.read_text()
    assert '"POST /v1/search HTTP/1.1" 401' in text  # the access log was captured
    assert not [name for name, key in keys.items() if key in text]
    if gunicorn_level == "info":
        assert QUERY not in text


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "-q", "serve", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_serve_refuses_a_non_loopback_address_without_keys_unless_insecure(keys, tmp_path):
    refused = run_serve("--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.returncode == 1
    assert "not serving on 0.0.0.0 without API keys" in refused.stderr and "--insecure" in refused.stderr
    # Past the rule, serve checks the model next: a model that is not there stops it before it binds.
    absent = {"SIDECAR_CACHE_DIR": str(tmp_path / "empty-cache")}
    for args, env in ((["--insecure"], absent), ([], {**absent, "SIDECAR_API_KEYS": entries(keys, "ops")}),
                      ([], {**absent, "SIDECAR_INSECURE": "true"})):
        passed = run_serve("--host", "0.0.0.0", "--port", str(free_port()), *args, env=env)
        assert passed.returncode == 1 and "the tiny model is not trained yet" in passed.stderr, passed.stderr
    on_loopback = run_serve("--host", "localhost", "--port", str(free_port()), env=absent)
    assert "the tiny model is not trained yet" in on_loopback.stderr


def test_serve_on_loopback_refuses_malformed_keys_naming_the_entry_without_a_traceback():
    refused = run_serve("--port", str(free_port()), env={"SIDECAR_API_KEYS": "garbage"})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "SIDECAR_API_KEYS entry 1: expected name:scopes:sha256-hex" in refused.stderr


def test_gunicorn_started_directly_refuses_to_bind_beyond_loopback_without_keys(tmp_path):
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "gunicorn", "--config", "python:sidecar.api.gunicorn_config",
                             "--bind", f"0.0.0.0:{port}", "sidecar.api.wsgi:app"],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2],
                            env={**os.environ, "SIDECAR_API_KEYS": "", "SIDECAR_INSECURE": "false"})
    assert result.returncode == 1 and "not serving on 0.0.0.0 without API keys" in result.stderr, result.stderr
    assert "Listening at" not in result.stderr


def test_the_loopback_rule_resolves_names():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("no-such-host.invalid")
