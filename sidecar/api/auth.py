"""API keys: who may call the API (Bearer keys kept only as SHA-256 hashes, each with scopes) and how
often (a token bucket per key)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable
from urllib.parse import urlsplit

from sidecar.config import Settings, SettingsError
from sidecar.errors import Forbidden, RateLimited, Unauthorized, quoted

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

# A recognisable prefix lets secret scanners (and people) tell a key from its hash.
KEY_PREFIX = "csk_"
# What each scope opens (path prefixes). Endpoints in no scope (/readyz's details, /openapi.yaml) take any valid key.
# /v1/opensearch is what ml-commons calls (embeddings, and rerank scores: no document comes back), so the
# connector's key needs `embeddings` only and cannot search the index.
SCOPES = {
    "embeddings": ("/v1/embeddings", "/v1/models", "/v1/opensearch"),
    # everything that reads the index (the page's calls besides /v1/search read it too), and feedback,
    # which comes from whoever shows search results
    "search": ("/v1/search", "/v1/captions", "/v1/facets", "/v1/documents", "/v1/feedback"),
    "classify": ("/v1/classify", "/v1/prompt-sets"),
    "metrics": ("/metrics", "/v1/status"),
}
ALL_SCOPES = "*"
# Liveness answers without a key: an orchestrator's probe must not need a secret.
OPEN_PATHS = ("/healthz",)
# Readiness answers without a key too (a kubelet's httpGet probe cannot send one), but only ready or not: its
# details (model, store, documents, the reason it is not, which can name a cluster's address) need a key.
STATUS_ONLY_PATHS = ("/readyz",)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_CHALLENGE = 'Bearer realm="clip-sidecar"'
# A Host header: a name (a compose service's may hold "_") or a bracketed IPv6 address, and an optional port;
# nothing else (no userinfo: "evil.com@localhost" is not addressed to localhost).
_HOST_HEADER = re.compile(r"(?:[a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::[0-9]*)?", re.ASCII | re.IGNORECASE)


@dataclass(frozen=True)
class KeyEntry:
    """One configured key: a name (for logs and rate limits), its scopes, the SHA-256 of the key."""

    name: str
    scopes: frozenset[str]
    digest: bytes

    def allows(self, path: str) -> bool:
        if ALL_SCOPES in self.scopes:
            return True
        needed = scope_of(path)
        return needed is None or needed in self.scopes


def scope_of(path: str) -> str | None:
    """The scope a path needs, or None when any valid key may call it."""
    for scope, prefixes in SCOPES.items():
        if any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes):
            return scope
    return None


def new_key() -> str:
    """A fresh key: 256 random bits. Being random, a fast hash (SHA-256) stores it safely; slow
    password hashes (bcrypt) are for guessable secrets and would cost milliseconds per request."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_key_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"a key's name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    return name


def key_digest(key: str) -> str:
    """What SIDECAR_API_KEYS holds of a key: its SHA-256, hex (`printf %s KEY | sha256sum` agrees)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_entry(name: str, scopes: Iterable[str], key: str) -> str:
    """The SIDECAR_API_KEYS entry for `key`: `name:scope+scope:sha256-hex` (`*` = every scope)."""
    scopes = sorted(set(scopes))
    scope_text = ALL_SCOPES if not scopes or ALL_SCOPES in scopes else "+".join(scopes)
    return f"{check_key_name(name)}:{scope_text}:{key_digest(key)}"


def parse_key_entries(text: str) -> tuple[KeyEntry, ...]:
    """SIDECAR_API_KEYS: comma- or whitespace-separated `name:scopes:sha256-hex` entries (empty ones, as
    `export SIDECAR_API_KEYS="$SIDECAR_API_KEYS,..."` leaves for the first key, skipped). Errors name
    the entry by position, never by content: a plain key pasted by mistake must not reach a log."""
    entries: list[KeyEntry] = []
    for position, raw in enumerate((piece for piece in re.split(r"[\s,]+", text) if piece), start=1):
        where = f"SIDECAR_API_KEYS entry {position}"
        if raw.startswith(KEY_PREFIX):
            raise SettingsError(f"{where} is a key, not its hash: put the entry line `clip-sidecar keys create` "
                                f"printed (name:scopes:sha256), and treat that key as leaked")
        parts = raw.split(":")
        if len(parts) != 3:
            raise SettingsError(f"{where}: expected name:scopes:sha256-hex (3 fields), got {len(parts)}")
        name, scopes, digest = parts
        try:
            check_key_name(name)
        except ValueError:
            raise SettingsError(f"{where}: the name must be 1-64 letters, digits, '.', '_' or '-'") from None
        scope_set = frozenset(scopes.split("+"))
        unknown = scope_set - set(SCOPES) - {ALL_SCOPES}
        if unknown or not scopes:
            raise SettingsError(f"{where} ({name}): unknown scope {', '.join(sorted(unknown)) or '(empty)'}; "
                                f"choose {ALL_SCOPES} or some of {', '.join(SCOPES)} joined by '+'")
        if not _DIGEST.fullmatch(digest):
            raise SettingsError(f"{where} ({name}): the hash must be 64 lowercase hex digits (SHA-256)")
        if any(e.name == name for e in entries):
            raise SettingsError(f"{where}: name {name!r} is used twice (rate limits and logs go by name)")
        # The key would be checked against both, and the last one's scopes would win: the first's said nothing.
        same_key = next((e.name for e in entries if e.digest == bytes.fromhex(digest)), None)
        if same_key is not None:
            raise SettingsError(f"{where} ({name}): the hash is that of key {same_key!r} too: one entry per key")
        entries.append(KeyEntry(name=name, scopes=scope_set, digest=bytes.fromhex(digest)))
    return tuple(entries)


class TokenBucket:
    """`rate` requests a second on average, up to `burst` at once."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be (nothing taken)."""
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self.rate


class KeyGuard:
    """Checks a request's `Authorization: Bearer` key against the entries, its scope and its rate."""

    def __init__(self, entries: tuple[KeyEntry, ...], *, rate: float = 0.0, burst: int = 0,
                 open_paths: tuple[str, ...] = OPEN_PATHS):
        self.entries = entries
        self.open_paths = open_paths
        # One bucket per configured key, made up front: the set is fixed, so it cannot grow.
        self.buckets = ({e.name: TokenBucket(rate, burst or max(1, math.ceil(rate))) for e in entries}
                        if rate > 0 else {})

    def identify(self, authorization: str | None) -> KeyEntry:
        """The entry the header's key matches; Unauthorized when there is none."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        if not authorization:
            raise Unauthorized("missing API key: send the header `Authorization: Bearer <key>`",
                               headers={"WWW-Authenticate": _CHALLENGE})
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be `Bearer <key>`",
                               headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_request"'})
        digest = bytes.fromhex(key_digest(key.strip()))
        found = None
        # Every entry is compared, each in constant time: how long this takes says nothing about
        # which entry (or how much of one) matched.
        for entry in self.entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise Unauthorized("API key not recognised (revoked, or not the one created)",
                               headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'})
        return found

    def check(self, authorization: str | None, path: str) -> KeyEntry | None:
        """The caller's entry (None on an open path, and on a status-only path asked without a key); raises
        Unauthorized, Forbidden or RateLimited. A key sent to a status-only path is checked like any other."""
        if path in self.open_paths or (not authorization and path in STATUS_ONLY_PATHS):
            return None
        entry = self.identify(authorization)
        if not entry.allows(path):
            raise Forbidden(f"key {entry.name!r} has scope {'+'.join(sorted(entry.scopes))}; "
                            f"{path} needs scope {scope_of(path)}")
        bucket = self.buckets.get(entry.name)
        wait = bucket.take() if bucket else 0.0
        if wait:
            raise RateLimited(f"key {entry.name!r} is over its limit of {bucket.rate:g} requests/s "
                              f"(burst {bucket.burst}); retry after the Retry-After seconds",
                              retry_after_s=math.ceil(wait))
        return entry


def is_loopback(host: str) -> bool:
    """Whether only this machine reaches a listener on `host`; a name counts when every address
    it resolves to is loopback (`localhost`), an unresolvable one does not."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def refusal_to_serve(settings: Settings, hosts: Iterable[str]) -> str | None:
    """Why the API must not listen on `hosts`: beyond loopback without API keys, unless
    settings.insecure says so on purpose. None when it may."""
    exposed = [host for host in hosts if not is_loopback(host)]
    if not exposed or parse_key_entries(settings.api_keys) or settings.insecure:
        return None
    return (f"not serving on {', '.join(exposed)} without API keys: whoever reaches the port could embed at "
            f"your cost and read the index through search. Create keys (`clip-sidecar keys create`, then "
            f"SIDECAR_API_KEYS), listen on 127.0.0.1 behind your own gateway, or pass --insecure "
            f"(SIDECAR_INSECURE=true) to serve open on purpose")


def host_guard(allowed_hosts: str) -> Callable[[str], None]:
    """A check of a request's Host header for an API without keys: `check(host)` raises Forbidden
    unless the host is localhost (or a subdomain of it), an IP address, or in `allowed_hosts`.

    Why: a web page the user opens can rename its own domain to 127.0.0.1 (DNS rebinding) and then
    read an open API on loopback as same-origin; its requests still carry the page's domain in Host.
    No browser lets a page set Host, so requests from programs (curl, OpenSearch, the tests) pass."""
    names = {name.strip().lower().rstrip(".") for name in allowed_hosts.split(",") if name.strip()}
    if "*" in names:
        return lambda host: None
    suffixes = tuple(name for name in names if name.startswith(".")) + (".localhost",)
    exact = {name.lstrip(".") for name in names} | {"localhost"}

    # Clients address a server by a handful of names: remembered, the check costs a dict lookup per
    # request instead of ~7 µs of parsing an IP address.
    @functools.lru_cache(maxsize=256)
    def admitted(host: str) -> bool:
        if not _HOST_HEADER.fullmatch(host):
            return False
        try:
            name = (urlsplit(f"//{host}").hostname or "").rstrip(".")
        except ValueError:  # a malformed bracketed address
            return False
        if name in exact or name.endswith(suffixes):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def check(host: str) -> None:
        if not admitted(host):
            raise Forbidden(f"Host {quoted(host)} is not localhost, an IP address or in allowed_hosts: an API without keys "
                            f"answers only requests addressed to those (a web page could otherwise read it through "
                            f"DNS rebinding). Add the name to SIDECAR_ALLOWED_HOSTS, or configure API keys")
    return check


def init_app(app: Flask, settings: Settings, *, public_paths: tuple[str, ...] = ()) -> None:
    """Require a key on every request (but /healthz, `public_paths`, /metrics when metrics_public, and /readyz's
    status alone) once SIDECAR_API_KEYS names any; without keys the API is open, as `serve` allows only on loopback,
    to requests addressed to a host `host_guard` admits."""
    from flask import g, request  # here, not at the top: the CLI imports this module for `keys create`

    entries = parse_key_entries(settings.api_keys)
    if not entries:
        log.info("no API keys configured (SIDECAR_API_KEYS): every endpoint is open to requests addressed to %s",
                 f"localhost, an IP address or {settings.allowed_hosts}" if settings.allowed_hosts
                 else "localhost or an IP address")
        if settings.api_rate_limit > 0:  # the limit counts per key: set alone, it would limit nothing without a word
            log.warning("SIDECAR_API_RATE_LIMIT=%g limits nothing: rate limits count per API key, and "
                        "SIDECAR_API_KEYS names none", settings.api_rate_limit)
        check_host = host_guard(settings.allowed_hosts)

        @app.before_request
        def require_local_host():
            if request.path not in OPEN_PATHS:  # liveness probes address the pod or container by any name
                # The header as sent: werkzeug's request.host is "" for a name outside [a-z0-9.-] (a compose
                # service `clip_sidecar`), which no allowed_hosts entry could then admit, and which the 403 named ''.
                check_host(request.headers.get("Host") or request.host)
        return
    open_paths = OPEN_PATHS + public_paths + (("/metrics",) if settings.metrics_public else ())
    guard = KeyGuard(entries, rate=settings.api_rate_limit, burst=settings.api_rate_burst, open_paths=open_paths)
    log.info("API keys required: %d key(s) (%s); rate limit %s", len(entries), ", ".join(e.name for e in entries),
             f"{settings.api_rate_limit:g}/s per key and worker" if settings.api_rate_limit > 0 else "none")

    @app.before_request
    def require_key():
        g.without_key = guard.check(request.headers.get("Authorization"), request.path) is None


def sent_without_key() -> bool:
    """Whether this request came without a key to an API that takes keys: it may see only what needs none (the
    status alone of a STATUS_ONLY_PATHS path). An API without keys shows everything to whoever it answers."""
    from flask import g

    return g.get("without_key", False)
