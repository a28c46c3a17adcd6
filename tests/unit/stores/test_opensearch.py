"""The OpenSearch store without a cluster: what its client raises when none can be reached or its
certificate does not verify, the k-NN query it builds, and OpenSearch's refusals read as its own errors."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from opensearchpy.exceptions import ConnectionError as OSConnectionError
from opensearchpy.exceptions import TransportError

from sidecar.stores.base import StoreError, StoreQueryError, StoreUnavailable
from sidecar.stores.opensearch import RETRYABLE, OpenSearchStore, knn_score_to_inner_product
from sidecar.types import Document
from tests.support import free_port


def test_an_unreachable_cluster_is_a_store_error_naming_the_setting_that_the_store_still_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = OpenSearchStore(url=url)
    with pytest.raises(StoreUnavailable) as raised:
        store.client.indices.exists(index="any")  # a call outside the store's own error handling
    assert str(raised.value).startswith(f"OpenSearch at {url} cannot be reached: ")
    assert "SIDECAR_OPENSEARCH_URL or --opensearch-url" in str(raised.value)
    # Still opensearch-py's ConnectionError: the bulk load's and _with_retry's retries catch that.
    assert isinstance(raised.value, OSConnectionError) and isinstance(raised.value, RETRYABLE)


@pytest.mark.parametrize(("url", "reason"), [("", "it names no host"), ("http://", "it names no host"),
                                             ("http://:9200", "it names no host"),
                                             ("http://h:notaport", "Port could not be cast"),
                                             ("http://h:99999", "Port out of range")])
def test_a_url_without_a_host_or_port_is_refused_naming_the_setting(url, reason):
    # SIDECAR_OPENSEARCH_URL= (a compose variable left unset) ended in a TypeError inside opensearch-py.
    with pytest.raises(StoreError, match=f"OpenSearch URL '{url}' is no URL: {reason}.*SIDECAR_OPENSEARCH_URL or "
                                         "--opensearch-url"):
        OpenSearchStore(url=url)


@pytest.mark.parametrize(("alias", "reason"), [("MyIndex", "it has upper-case letters"), ("a b", "it has ' '"),
                                               ("photos:2024", "it has ':'"), ("_x", "it starts with '_'"),
                                               ("-x", "it starts with '-'"), ("", "it is empty"), ("..", "it is . or .."),
                                               ("a" * 241, "it is over 240 bytes")])
def test_an_alias_opensearch_cannot_name_is_refused_naming_the_setting_and_the_rule(alias, reason):
    # A read answered that the alias did not exist (run `opensearch setup`), which then failed on the load lock's
    # index ("MyIndex-lock") or with a bare 400 ("_x").
    with pytest.raises(StoreError, match=f"cannot be an OpenSearch alias: {re.escape(reason)}[^;]*; set "
                                         "SIDECAR_OPENSEARCH_INDEX or --opensearch-index"):
        OpenSearchStore(url="http://127.0.0.1:9200", index=alias)


def test_the_longest_alias_opensearch_takes_with_the_stores_suffixes_is_taken():
    OpenSearchStore(url="http://127.0.0.1:9200", index="a" * 240).close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9200/prefix", "127.0.0.1:9200", "https://search.example"])
def test_urls_opensearch_py_takes_are_taken(url):
    OpenSearchStore(url=url).close()


@contextlib.contextmanager
def not_opensearch() -> Iterator[str]:
    """The URL of an HTTP server on loopback that is not OpenSearch (a --opensearch-url of another service's
    port): it answers every request 404 with a JSON error of its own."""

    class NoRoute(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"error": {"code": "not_found", "message": f"no route for {self.path!r}"}}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoRoute)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_server_that_is_not_opensearch_fails_a_load_setup_and_check_in_one_store_error_naming_it():
    # Each ended in opensearch-py's NotFoundError traceback (the load lock's index could not be made).
    with not_opensearch() as url:
        store = OpenSearchStore(url=url, index="clip")
        try:
            for operation, call in (("index", lambda: store.upsert([Document(id="a", vector=np.ones(2))])),
                                    ("setup", lambda: store.setup(2)), ("check", store.check)):
                with pytest.raises(StoreError, match=f"^{operation} of clip failed: OpenSearch at {url} answered 404 "
                                                     ".*no route for"):
                    call()
        finally:
            store.close()


@pytest.mark.parametrize("inner_product", [0.6823234558105469, 0.0, -0.25, -0.999])
def test_a_knn_score_inverts_to_the_float32_inner_product_it_was_computed_from(inner_product):
    ip = np.float32(inner_product)
    # What OpenSearch computes (1 + ip, or 1 / (1 - ip) below 0) in float32, as the shortest decimal it writes.
    score = float(str(np.float32(1) + ip if ip >= 0 else np.float32(1) / (np.float32(1) - ip)))
    found = knn_score_to_inner_product(score)
    assert float(np.float32(found)) == found and abs(found - float(ip)) <= 2.4e-7


@pytest.mark.parametrize("engine", ["lucene", "faiss"])
def test_each_engines_knn_query_carries_the_ef_search_asked_for_and_never_less_than_k(engine):
    # faiss on this test node's k-NN build cannot index (no native library: docs/opensearch.md), so the
    # query body is checked here; a faiss query without method_parameters ran at the index default.
    store = OpenSearchStore(url=f"http://127.0.0.1:{free_port()}", engine=engine, ef_search=150)
    try:
        assert store._knn_clause([0.0], 10, None, ef_search=321)["method_parameters"] == {"ef_search": 321}
        assert store._knn_clause([0.0], 10, None)["method_parameters"] == {"ef_search": 150}
        assert store._knn_clause([0.0], 400, None, ef_search=16)["method_parameters"] == {"ef_search": 400}
    finally:
        store.close()


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@contextlib.contextmanager
def tls_listener(cert: Path, key: Path) -> Iterator[str]:
    """An https URL on loopback whose server presents `cert` (self-signed) and answers nothing: enough for
    the client's certificate check to fail for real."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with connection, contextlib.suppress(ssl.SSLError, OSError):  # the client refuses the certificate
                context.wrap_socket(connection, server_side=True).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (close alone does not, on Linux)
        listener.close()
        thread.join()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """The server's self-signed certificate and key, and a CA file that did not sign it."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(folder, "server")
    other, _ = _self_signed(folder, "other-ca")
    return {"cert": cert, "key": key, "other_ca": other}


def _certificate_error(url: str, **store_args: object) -> str:
    store = OpenSearchStore(url=url, **store_args)  # type: ignore[arg-type]
    try:
        with pytest.raises(StoreError) as raised:
            store.count()
    finally:
        store.close()
    # Not StoreUnavailable: retrying cannot fix a certificate.
    assert not isinstance(raised.value, StoreUnavailable)
    assert "certificate verify failed" in str(raised.value)
    return str(raised.value)


def test_a_certificate_no_system_ca_signed_fails_naming_the_system_cas_and_the_setting(certificates):
    with tls_listener(certificates["cert"], certificates["key"]) as url:
        message = _certificate_error(url)
    assert "checked against this machine's system CAs (SIDECAR_OPENSEARCH_CA_CERTS is not set)" in message
    assert "set SIDECAR_OPENSEARCH_CA_CERTS to the PEM file of the CA that signed it" in message
    assert "none of" not in message


def test_an_https_url_with_its_scheme_in_capitals_verifies_the_certificate_too(certificates):
    # Schemes are case-insensitive, and opensearch-py connected to HTTPS://… over TLS; the store tested for
    # "https://" alone and so turned certificate verification off for it.
    with tls_listener(certificates["cert"], certificates["key"]) as url:
        _certificate_error(url.replace("https://", "HTTPS://"))


def test_a_ca_file_that_does_not_exist_is_refused_naming_the_setting_not_as_a_cluster_down(certificates, tmp_path):
    # It failed every request as "cannot be reached: [Errno 2] No such file or directory (is it up?)", retried as a
    # cluster down is (StoreUnavailable: 503, loads waiting).
    missing = tmp_path / "ca.pem"
    with tls_listener(certificates["cert"], certificates["key"]) as url:
        with pytest.raises(StoreError) as raised:
            OpenSearchStore(url=url, ca_certs=str(missing))
        assert str(raised.value) == (f"SIDECAR_OPENSEARCH_CA_CERTS={str(missing)!r} is no file: set it to the PEM "
                                     f"file of the CA that signed the certificate of OpenSearch at {url}")
        OpenSearchStore(url=url, ca_certs=str(missing), verify_certs=False).close()  # not read: no refusal
    assert not isinstance(raised.value, StoreUnavailable)


def test_a_certificate_the_given_ca_file_did_not_sign_fails_naming_that_file_and_the_setting(certificates):
    ca_file = certificates["other_ca"]
    with tls_listener(certificates["cert"], certificates["key"]) as url:
        message = _certificate_error(url, ca_certs=str(ca_file))
    assert f"checked against the CA file {ca_file} only (SIDECAR_OPENSEARCH_CA_CERTS" in message
    assert "system CAs" in message and "not consulted" in message
    assert "set SIDECAR_OPENSEARCH_CA_CERTS to the PEM file of the CA that signed it" in message


def test_a_filter_the_cluster_refuses_is_named_by_its_fields_and_their_stored_types_not_by_the_index(monkeypatch):
    # The message was "search on clip-sidecar: OpenSearch refused the query: ...": the index, which is the server's
    # own, rather than the field and what it takes. No cluster here: its client answers as a node does.
    store = OpenSearchStore(url=f"http://127.0.0.1:{free_port()}", index="private-index-name")
    refusal = TransportError(400, "search_phase_execution_exception", {"error": {"root_cause": [
        {"type": "query_shard_exception", "reason": 'failed to create query: For input string: "big"',
         "index": "private-index-name-v2"}]}})
    mapping = {"private-index-name-v2": {"mappings": {"properties": {"metadata": {"properties": {
        "size": {"type": "long"}, "color": {"type": "keyword"}, "ripe": {"type": "boolean"}}}}}}}
    monkeypatch.setattr(store.client, "search", lambda **_: (_ for _ in ()).throw(refusal))
    monkeypatch.setattr(store.client.indices, "get_mapping", lambda **_: mapping)
    try:
        searches = {"text": lambda filters: store.text_search("red", 5, filters=filters),
                    "exact vector": lambda filters: store.vector_search(np.ones(4), 5, filters=filters, exact=True)}
        for search in searches.values():
            with pytest.raises(StoreQueryError) as raised:
                search({"size": "big", "color": "red", "unheld": 1})
            message = str(raised.value)
            assert message == ("metadata field 'size' holds whole numbers (long); metadata field 'color' holds "
                               "strings (keyword); OpenSearch refused the query: "
                               """'failed to create query: For input string: "big"'""")
            assert "private-index-name" not in message
        # Without filters the refusal is not the client's to fix: the store's own error, naming where it happened.
        with pytest.raises(StoreQueryError, match="search on private-index-name: OpenSearch refused the query"):
            store.text_search("red", 5)
    finally:
        store.close()


def test_an_unavailable_search_whose_reason_is_only_in_its_cause_is_named_by_that_cause(monkeypatch):
    # A search refused for missing shards answers an empty reason and no root cause, its reason in `caused_by`:
    # the message said only the type. The missing-shards refusal itself (named by its shards) is tested on a node.
    store = OpenSearchStore(url=f"http://127.0.0.1:{free_port()}", index="an-alias")
    refusal = TransportError(503, "search_phase_execution_exception", {"error": {
        "root_cause": [], "type": "search_phase_execution_exception", "reason": "",
        "caused_by": {"type": "search_phase_execution_exception", "reason": "Partial shards failure"}}})
    monkeypatch.setattr(store.client, "search", lambda **_: (_ for _ in ()).throw(refusal))
    try:
        with pytest.raises(StoreUnavailable) as raised:
            store.text_search("red", 5)
    finally:
        store.close()
    assert str(raised.value) == (f"search on an-alias failed: OpenSearch at {store.url} answered 503 "
                                 "search_phase_execution_exception: 'Partial shards failure'")
