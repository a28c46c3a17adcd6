#!/usr/bin/env python3
"""Checks a secured node from `scripts/opensearch-local start --secure` (run as root, which can read
the credentials):

    eval "$(scripts/opensearch-local --secure credentials)" && .venv/bin/python scripts/check-secure-opensearch.py

- HTTPS with the instance's CA; a wrong CA fails at once with a certificate error; plain HTTP and
  anonymous or wrong-password requests are refused.
- admin may do anything (cluster settings, any index).
- clip-sidecar (role clip_sidecar): creates clip-sidecar-v1, aliases it, bulk, search, mget, scroll,
  puts a search pipeline, k-NN (lucene) and hybrid queries with an inline pipeline, deletes its
  versioned index; refused (403) reading, writing or deleting other-index, creating other indices,
  PUT _cluster/settings, the security API.
- The real OpenSearchStore as clip-sidecar (setup, claim, upsert and rebuild under the load lock,
  searches, scan, fetch, delete, check) when the sidecar package imports.
Exit status 0 when every check passed; each check prints one line.
"""

from __future__ import annotations

import os
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request

from opensearchpy import OpenSearch, helpers
from opensearchpy.exceptions import AuthorizationException, TransportError

URL = os.environ["OPENSEARCH_URL"]
CA = os.environ["OPENSEARCH_CA_CERT"]
ADMIN = (os.environ.get("OPENSEARCH_ADMIN_USER", "admin"), os.environ["OPENSEARCH_ADMIN_PASSWORD"])
SIDECAR = (os.environ.get("OPENSEARCH_SIDECAR_USER", "clip-sidecar"), os.environ["OPENSEARCH_SIDECAR_PASSWORD"])
DIM = 8
failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        failures.append(name)


def client(auth: tuple[str, str], ca: str = CA) -> OpenSearch:
    return OpenSearch(hosts=[URL], http_auth=auth, use_ssl=True, verify_certs=True, ca_certs=ca,
                      timeout=60, max_retries=0)


def refused(name: str, fn) -> None:
    """fn must raise 403 (AuthorizationException)."""
    try:
        fn()
    except AuthorizationException as exc:
        check(name, True, f"403 {str(exc.info)[:120] if exc.info else ''}")
        return
    except TransportError as exc:
        check(name, False, f"HTTP {exc.status_code} instead of 403: {str(exc.info)[:200]}")
        return
    check(name, False, "allowed")


def allowed(name: str, fn) -> object:
    try:
        result = fn()
    except TransportError as exc:
        check(name, False, f"HTTP {exc.status_code}: {str(exc.info)[:300]}")
        return None
    check(name, True)
    return result


def vec(i: int) -> list[float]:
    v = [((i * 7 + j * 3) % 11) / 10.0 + 0.1 for j in range(DIM)]
    n = sum(x * x for x in v) ** 0.5
    return [x / n for x in v]


def transport_checks() -> None:
    ctx = ssl.create_default_context(cafile=CA)
    req = urllib.request.Request(URL + "/")
    try:
        urllib.request.urlopen(req, context=ctx, timeout=10)
        check("anonymous request refused", False, "answered")
    except urllib.error.HTTPError as exc:
        check("anonymous request refused", exc.code == 401, f"HTTP {exc.code}")
    with tempfile.TemporaryDirectory() as tmp:
        # A CA of our own making that did not sign the node's certificate.
        key, cert = f"{tmp}/k.pem", f"{tmp}/c.pem"
        os.system(f"openssl req -x509 -newkey rsa:2048 -nodes -keyout {key} -out {cert} -days 1 "
                  f"-subj /CN=wrong-ca 2>/dev/null")
        start = time.monotonic()
        try:
            client(ADMIN, ca=cert).info()
            check("wrong CA refused", False, "connected")
        except Exception as exc:  # noqa: BLE001 - opensearch-py wraps the ssl error in SSLError/ConnectionError
            elapsed = time.monotonic() - start
            text = repr(exc)
            check("wrong CA refused fast with a certificate error",
                  "CERTIFICATE_VERIFY_FAILED" in text and elapsed < 5, f"{elapsed:.2f}s {type(exc).__name__}")
    try:
        urllib.request.urlopen(URL.replace("https://", "http://") + "/", timeout=10)
        check("plain HTTP refused", False, "answered")
    except Exception as exc:  # noqa: BLE001
        check("plain HTTP refused", True, type(exc).__name__)
    try:
        client((SIDECAR[0], "wrong-password")).info()
        check("wrong password refused", False, "answered")
    except TransportError as exc:
        check("wrong password refused", exc.status_code == 401, f"HTTP {exc.status_code}")


def admin_checks(admin: OpenSearch) -> None:
    plugins = {r["component"] for r in admin.cat.plugins(format="json")}
    check("plugins loaded", {"opensearch-knn", "opensearch-neural-search", "opensearch-security"} <= plugins,
          ", ".join(sorted(plugins)))
    for name in ("other-index", "clip-sidecar-v1", "clip-sidecar-v2"):
        admin.indices.delete(index=name, ignore_unavailable=True)
    allowed("admin creates other-index", lambda: admin.indices.create(index="other-index", body={
        "settings": {"number_of_shards": 1, "number_of_replicas": 0}}))
    admin.index(index="other-index", id="secret", body={"text": "not for the sidecar"}, refresh=True)
    allowed("admin changes cluster settings", lambda: admin.cluster.put_settings(body={
        "persistent": {"cluster.routing.allocation.disk.threshold_enabled": False}}))
    allowed("admin reads the security config", lambda: admin.transport.perform_request(
        "GET", "/_plugins/_security/api/roles/clip_sidecar"))


def sidecar_checks(sc: OpenSearch) -> None:
    mapping = {"settings": {"index": {"knn": True, "number_of_shards": 1, "number_of_replicas": 0}},
               "mappings": {"_meta": {"model": ""}, "properties": {
                   "vector": {"type": "knn_vector", "dimension": DIM, "method": {
                       "name": "hnsw", "engine": "lucene", "space_type": "innerproduct"}},
                   "text": {"type": "text"}, "id": {"type": "keyword"}}}}
    allowed("sidecar: health", lambda: sc.cluster.health())
    allowed("sidecar: GET _nodes/plugins", lambda: sc.nodes.info(metric="plugins"))
    refused("sidecar refused: _cat/plugins (needs cluster:monitor/state)", lambda: sc.cat.plugins(format="json"))
    refused("sidecar refused: _cluster/state", lambda: sc.cluster.state())
    allowed("sidecar: create clip-sidecar-v1 (knn lucene)", lambda: sc.indices.create(index="clip-sidecar-v1", body=mapping))
    allowed("sidecar: exists", lambda: sc.indices.exists(index="clip-sidecar-v1"))
    allowed("sidecar: put_alias", lambda: sc.indices.put_alias(index="clip-sidecar-v1", name="clip-sidecar"))
    check("sidecar: exists_alias on its versions",
          sc.indices.exists_alias(index="clip-sidecar-v*", name="clip-sidecar") is True)
    got = allowed("sidecar: get_alias on its versions",
                  lambda: sc.indices.get_alias(index="clip-sidecar-v*", name="clip-sidecar"))
    check("sidecar: get_alias shows only its index", got is not None and sorted(got) == ["clip-sidecar-v1"], str(got))
    refused("sidecar refused: get_alias naming no index (needs aliases/get on every index)",
            lambda: sc.indices.get_alias(name="clip-sidecar"))
    words = ["red apple", "green pear", "blue sky", "red car", "yellow sun"]
    actions = [{"_index": "clip-sidecar", "_id": str(i), "_source": {"id": str(i), "vector": vec(i), "text": words[i % 5]}}
               for i in range(40)]
    res = allowed("sidecar: bulk via alias", lambda: helpers.bulk(sc, actions, refresh=True))
    check("sidecar: bulk wrote 40", bool(res) and res[0] == 40, str(res))
    allowed("sidecar: refresh", lambda: sc.indices.refresh(index="clip-sidecar"))
    cnt = allowed("sidecar: count", lambda: sc.count(index="clip-sidecar"))
    check("sidecar: count 40", bool(cnt) and cnt["count"] == 40, str(cnt))
    allowed("sidecar: get_mapping", lambda: sc.indices.get_mapping(index="clip-sidecar"))
    allowed("sidecar: put_mapping _meta", lambda: sc.indices.put_mapping(index="clip-sidecar", body={"_meta": {"model": "m"}}))
    allowed("sidecar: get_settings", lambda: sc.indices.get_settings(index="clip-sidecar"))
    allowed("sidecar: put_settings", lambda: sc.indices.put_settings(index="clip-sidecar", body={"index": {"refresh_interval": "2s"}}))
    knn = allowed("sidecar: knn (lucene) search", lambda: sc.search(index="clip-sidecar", body={
        "size": 3, "_source": False, "query": {"knn": {"vector": {"vector": vec(3), "k": 3}}}}))
    check("sidecar: knn finds the query's own vector first", bool(knn) and knn["hits"]["hits"][0]["_id"] in
          {str(i) for i in range(40) if vec(i) == vec(3)}, str(knn and knn["hits"]["hits"][0]))
    pipeline = {"phase_results_processors": [{"normalization-processor": {
        "normalization": {"technique": "min_max"},
        "combination": {"technique": "arithmetic_mean", "parameters": {"weights": [0.5, 0.5]}}}}]}
    allowed("sidecar: PUT _search/pipeline", lambda: sc.transport.perform_request(
        "PUT", "/_search/pipeline/clip-sidecar-check", body=pipeline))
    hybrid = allowed("sidecar: hybrid query, inline search_pipeline", lambda: sc.search(index="clip-sidecar", body={
        "size": 5, "_source": False, "search_pipeline": pipeline,
        "query": {"hybrid": {"queries": [{"knn": {"vector": {"vector": vec(0), "k": 5}}},
                                         {"match": {"text": "red"}}]}}}))
    check("sidecar: hybrid returned fused hits", bool(hybrid) and len(hybrid["hits"]["hits"]) == 5
          and all(0 <= h["_score"] <= 1 for h in hybrid["hits"]["hits"]), str(hybrid and hybrid["hits"]["hits"][:2]))
    hybrid_named = allowed("sidecar: hybrid query, named pipeline", lambda: sc.search(
        index="clip-sidecar", params={"search_pipeline": "clip-sidecar-check"}, body={
            "size": 5, "_source": False, "query": {"hybrid": {"queries": [
                {"knn": {"vector": {"vector": vec(0), "k": 5}}}, {"match": {"text": "red"}}]}}}))
    check("sidecar: named and inline pipelines agree", bool(hybrid and hybrid_named) and
          [h["_id"] for h in hybrid["hits"]["hits"]] == [h["_id"] for h in hybrid_named["hits"]["hits"]])
    docs = allowed("sidecar: mget", lambda: sc.mget(index="clip-sidecar", body={"ids": ["1", "2", "999"]}))
    check("sidecar: mget found 2", bool(docs) and sum(d.get("found", False) for d in docs["docs"]) == 2)
    scanned = allowed("sidecar: scan/scroll", lambda: list(helpers.scan(sc, index="clip-sidecar", size=7,
                                                                        query={"query": {"match_all": {}}})))
    check("sidecar: scan returned 40", scanned is not None and len(scanned) == 40)
    # A second version and the alias swap, as rebuild does.
    allowed("sidecar: create clip-sidecar-v2", lambda: sc.indices.create(index="clip-sidecar-v2", body=mapping))
    allowed("sidecar: update_aliases (swap)", lambda: sc.indices.update_aliases(body={"actions": [
        {"remove": {"index": "clip-sidecar-v1", "alias": "clip-sidecar"}},
        {"add": {"index": "clip-sidecar-v2", "alias": "clip-sidecar"}}]}))
    allowed("sidecar: delete clip-sidecar-v1", lambda: sc.indices.delete(index="clip-sidecar-v1"))
    if any(p["name"] == "opensearch-ml" for node in sc.nodes.info(metric="plugins")["nodes"].values()
           for p in node["plugins"]):
        # No model exists: allowed means "not found" (404), refused would be 403.
        try:
            sc.transport.perform_request("GET", "/_plugins/_ml/models/no-such-model")
            check("sidecar: ml model get allowed", True)
        except TransportError as exc:
            check("sidecar: ml model get allowed (404, not 403)", exc.status_code != 403, f"HTTP {exc.status_code}")

    # Refusals.
    refused("sidecar refused: search other-index", lambda: sc.search(index="other-index"))
    refused("sidecar refused: get other-index doc", lambda: sc.get(index="other-index", id="secret"))
    # mget is a composite request: allowed as a whole, each shard item refused.
    res = sc.mget(index="other-index", body={"ids": ["secret"]})
    check("sidecar refused: mget other-index (item security_exception, no _source)",
          all("_source" not in d and d.get("error", {}).get("type") == "security_exception" for d in res["docs"]),
          str(res["docs"][0])[:160])
    refused("sidecar refused: count other-index", lambda: sc.count(index="other-index"))
    refused("sidecar refused: write other-index", lambda: sc.index(index="other-index", id="x", body={"a": 1}))
    res = sc.bulk(body=[{"index": {"_index": "other-index", "_id": "y"}}, {"a": 1}])
    check("sidecar refused: bulk into other-index (item 403)", res["items"][0]["index"].get("status") == 403,
          str(res["items"][0]["index"].get("error", {}).get("type")))
    refused("sidecar refused: mapping of other-index", lambda: sc.indices.get_mapping(index="other-index"))
    refused("sidecar refused: delete other-index", lambda: sc.indices.delete(index="other-index"))
    refused("sidecar refused: alias onto other-index", lambda: sc.indices.put_alias(index="other-index", name="clip-sidecar-x"))
    refused("sidecar refused: create index outside its patterns", lambda: sc.indices.create(index="someone-else"))
    refused("sidecar refused: delete its alias name's unversioned pattern (clip-sidecar-x)",
            lambda: (sc.indices.create(index="clip-sidecar-x"), sc.indices.delete(index="clip-sidecar-x")))
    refused("sidecar refused: PUT _cluster/settings", lambda: sc.cluster.put_settings(body={
        "persistent": {"cluster.routing.allocation.disk.threshold_enabled": False}}))
    refused("sidecar refused: security API", lambda: sc.transport.perform_request("GET", "/_plugins/_security/api/roles"))
    refused("sidecar refused: search all indices", lambda: sc.search(index="_all", body={"query": {"match_all": {}}}))
    refused("sidecar refused: search other-*", lambda: sc.search(index="other-*", body={"query": {"match_all": {}}}))
    got = sc.indices.get_alias(index="clip-sidecar-v*", name="clip-sidecar")
    check("sidecar: after the swap the alias names v2 only", sorted(got) == ["clip-sidecar-v2"], str(got))
    refused("sidecar refused: another index's alias", lambda: sc.indices.get_alias(index="other-index", name="*"))
    allowed("sidecar: wildcard delete of its versions matching nothing",
            lambda: sc.indices.delete(index="clip-sidecar-nothing-v*", ignore_unavailable=True))


def store_checks() -> None:
    """The real store as clip-sidecar, verifying the node's certificate with the instance's CA."""
    try:
        import numpy as np

        from sidecar.stores import opensearch as store_module
        # The classes the store itself uses (the package is being reorganised around them).
        OpenSearchStore, Document, ModelSignature = (store_module.OpenSearchStore, store_module.Document,
                                                     store_module.ModelSignature)
    except (ImportError, AttributeError) as exc:
        print(f"skip store checks: {exc}")
        return
    store = OpenSearchStore(url=URL, index="it-secure-check", user=SIDECAR[0], password=SIDECAR[1], ca_certs=CA,
                            number_of_replicas=0, large_load_threshold=50)
    sig = ModelSignature(model="check", weights="w", dim=DIM)
    rng = np.random.default_rng(0)

    def docs(n: int, offset: int = 0) -> list:
        out = []
        for i in range(n):
            v = rng.normal(size=DIM).astype(np.float32)
            out.append(Document(id=f"d{i + offset}", vector=v / np.linalg.norm(v), text=f"doc {i} red" if i % 2 else f"doc {i} blue",
                                metadata={"color": "red" if i % 2 else "blue"}, content_hash=f"h{i}"))
        return out

    try:
        allowed("store: setup (pipelines, index, alias)", lambda: store.setup(DIM))
        allowed("store: claim (_meta)", lambda: store.claim(sig))
        check("store: signature", store.signature() == sig, f"{store.signature()} vs {sig}")
        data = docs(60)
        allowed("store: upsert 60 (relaxed settings path)", lambda: store.upsert(data))
        check("store: count 60", store.count() == 60)
        q = data[5].vector
        check("store: vector_search", store.vector_search(q, 3)[0].id == "d5")
        check("store: vector_search exact", store.vector_search(q, 3, exact=True)[0].id == "d5")
        check("store: text_search", len(store.text_search("red", 5)) == 5)
        hits = allowed("store: hybrid_search minmax", lambda: store.hybrid_search(q, "blue", 5))
        check("store: hybrid_search returned 5", hits is not None and len(hits) == 5)
        allowed("store: hybrid_search rrf", lambda: store.hybrid_search(q, "blue", 5, fusion="rrf"))
        check("store: fetch", [d.id for d in store.fetch(["d1", "d2"])] == ["d1", "d2"])
        check("store: content_hashes (scan)", len(store.content_hashes()) == 60)
        check("store: delete", store.delete(["d1", "d2"]) == 2)
        new = allowed("store: rebuild (new version, alias swap, old deleted)", lambda: store.rebuild(docs(30, 100), signature=sig))
        check("store: after rebuild", bool(new) and store.count() == 30 and store.alias_indices() == [new])
        report = allowed("store: check (alias, load lock, relaxed settings)", store.check)
        check("store: check is clean", report is not None and report.clean, report.describe() if report else "")
    finally:
        admin = client(ADMIN)
        admin.indices.delete(index="it-secure-check-v*,it-secure-check-lock", ignore_unavailable=True)
        admin.close()


def main() -> int:
    transport_checks()
    admin = client(ADMIN)
    admin_checks(admin)
    sc = client(SIDECAR)
    try:
        store_checks()   # first: the sidecar user sees no index of its own yet (a fresh setup)
        sidecar_checks(sc)
    finally:
        for name in ("other-index", "clip-sidecar-v1", "clip-sidecar-v2", "clip-sidecar-x", "someone-else"):
            admin.indices.delete(index=name, ignore_unavailable=True)
        admin.transport.perform_request("DELETE", "/_search/pipeline/clip-sidecar-check")
    print(f"{len(failures)} failure(s)" + (f": {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
