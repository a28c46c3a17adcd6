"""HTTP edges under the real server (gunicorn, as `clip-sidecar serve` runs it), spoken byte by byte:
chunked bodies, malformed framing, and the errors gunicorn answers before the app sees a request."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support import gunicorn_server

BODY_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def server(store_path, tmp_path_factory):
    env = {"SIDECAR_STORE_PATH": str(store_path), "SIDECAR_MAX_BODY_BYTES": str(BODY_LIMIT)}
    with gunicorn_server(env, tmp_path_factory.mktemp("gunicorn") / "server.log") as url:
        yield url


def exchange(url: str, head: bytes, chunks: list[bytes] = (), *, finish: bool = True) -> tuple[int, dict, dict]:
    """Send a request as raw bytes (`chunks` as a chunked body; `finish=False` never ends it) and
    read one response: (status, headers, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        if finish and chunks:
            sock.sendall(b"0\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            received = sock.recv(65536)
            assert received, f"connection closed before a response: {data!r}"
            data += received
        raw_head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        while len(body) < int(headers["content-length"]):
            received = sock.recv(65536)
            assert received, "connection closed inside the response body"
            body += received
    return int(status_line.split()[1]), headers, json.loads(body)


def chunked_head(path: str = "/v1/embeddings") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_chunked_body_within_the_limit_is_served(server):
    body = json.dumps({"input": ["red circle", "blue square"]}).encode()
    status, _, answer = exchange(server, chunked_head(), [chunk(body[:10]), chunk(body[10:])])
    assert status == 200, answer
    assert len(answer["data"]) == 2


def test_a_chunked_body_over_the_limit_answers_413_before_its_end(server):
    # 300 kB sent and the body never finished: the answer comes once the limit is passed, so the
    # server neither waits for the end nor buffers past the limit (it used to cut the body at the
    # limit and serve the rest, or answer 400 "not valid JSON").
    text = b"x" * 1024
    body = [chunk(b'{"input": ["')] + [chunk(text)] * 300
    status, headers, answer = exchange(server, chunked_head(), body, finish=False)
    assert status == 413, answer
    assert headers["content-type"] == "application/json"
    assert answer["error"]["message"] == f"request body is over the limit of {BODY_LIMIT} bytes (max_body_bytes)"


def test_a_bad_chunk_size_answers_400_json(server):
    status, _, answer = exchange(server, chunked_head(), [chunk(b'{"input": '), b"zz\r\nabc\r\n"])
    assert status == 400, answer
    assert "request body could not be read" in answer["error"]["message"]
    assert "InvalidChunkSize" in answer["error"]["message"]


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 414, "uri_too_long"),
        (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
         "request_header_fields_too_large"),
        (b"NOT AN HTTP REQUEST\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nBad Header: x\r\n\r\n", 400, "bad_request"),
    ],
    ids=["request-line-414", "header-431", "garbage-400", "bad-header-400"],
)
def test_gunicorns_own_errors_are_the_apis_json(server, request_bytes, status, code):
    got, headers, answer = exchange(server, request_bytes)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert answer["error"]["code"] == code and answer["error"]["message"]
