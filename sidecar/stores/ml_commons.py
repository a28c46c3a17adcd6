"""OpenSearch calls the sidecar: ml-commons connectors, remote models and the ingest and search pipelines
around one index, made from plugin_config/ (`clip-sidecar opensearch connect`) and removed again.

Everything is named after the index alias, so two indices on one cluster never share or remove each
other's objects:
- connectors and deployed remote models `<alias>-texts` (a batch of texts: the text_embedding
  processor), `<alias>-text-image` (one document or query: text_image_embedding, neural queries) and
  `<alias>-rerank` (the rerank processor: by document id, or by text), in the model group `<alias>`.
  Each URL pins the index's model (`?model=…&weights=…`; the rerank-by-id one also the index), so a
  sidecar serving another model refuses every call instead of mixing two models' vectors in one index;
- ingest pipelines `<alias>-image` (text_image_embedding → `vector`; documents that arrive with a
  vector pass untouched) and `<alias>-text` (text_embedding, batched);
- search pipelines `<alias>-hybrid` (neural query enricher + min-max normalisation) and
  `<alias>-hybrid-rerank` (the same + the sidecar's rerank);
- on request, the index's default ingest and search pipelines, as settings of the index behind the alias
  (`index --rebuild` gives them to the new version itself: no index template, which would hide the
  cluster's own templates for the index's names).

Idempotent: every object is found by name and compared with what plugin_config/ renders (a
connector by a fingerprint of its whole body, credential included, kept in its parameters: OpenSearch
never shows the credential); unchanged ones are left alone (same ids), changed ones updated in place.
The last step has OpenSearch call the sidecar through the new models. Any failure (a sidecar that
cannot be reached, serves another model or dimension than the index holds, a URL the cluster does
not trust) removes everything again: connect leaves a working connection or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlencode, urlsplit

from opensearchpy.exceptions import TransportError

from sidecar.stores.base import StoreError
from sidecar.stores.opensearch import (
    DEFAULT_PIPELINE_SETTINGS,
    OpenSearchStore,
    OpenSearchUnreachable,
    render_template,
)
from sidecar.types import ModelSignature

log = logging.getLogger(__name__)

# The sidecar's URLs for each call shape (sidecar.api.opensearch_native serves them).
TEXTS_PATH = "/v1/opensearch/embeddings/texts"
TEXT_IMAGE_PATH = "/v1/opensearch/embeddings/text-image"
RERANK_PATH = "/v1/opensearch/rerank/{kind}"
# What the rerank processor sends for each hit: its `id` (the sidecar's stored vector and BM25, the
# rerank of /v1/search: needs the sidecar's store to be this index), or its `text` (CLIP text
# similarity: any sidecar of the model will do); or no rerank at all.
RERANK_BY = {"ids": "id", "texts": "text", "none": None}
# What the image pipeline embeds: the image alone (what `clip-sidecar index` stores; the text stays
# BM25's), or the image and the text fused (the text alone where a document has no image).
INGEST_FIELDS = {"image": {"image": "image"}, "image+text": {"text": "text", "image": "image"}}
# ml-commons refuses a connector without a credential; a sidecar without API keys ignores it. A sidecar
# with keys (SIDECAR_API_KEYS) needs a real one: `connect --api-key` (SIDECAR_CONNECTOR_API_KEY).
PLACEHOLDER_KEY = "no-key-configured"
FINGERPRINT = "clip_sidecar_config"
REQUIRED_PLUGINS = ("opensearch-ml", "opensearch-neural-search", "opensearch-knn")
# What ml-commons answers a call in the first seconds after its node started, and how long connect waits it out.
STARTING = "Fetching master key timed out"
STARTING_WAIT_S = 60.0
DEPLOY_TIMEOUT_S = 60.0
# ml-commons refuses to delete a connector (409, "models are still using this connector") while its model index, which
# it refreshes each second, still shows the models deleted just before: the DELETE is asked again for this long.
CONNECTOR_FREE_TIMEOUT_S = 10.0
IGNORE_404 = {"ignore": 404}  # opensearch-py: answer a 404 instead of raising (and logging) it


@dataclass(frozen=True, kw_only=True)
class ConnectOptions:
    sidecar_url: str  # as OpenSearch reaches it: http://127.0.0.1:8080 beside a local node, http://sidecar:8080 in compose
    api_key: str = PLACEHOLDER_KEY
    ingest_fields: str = "image"  # a key of INGEST_FIELDS
    batch_size: int = 16  # text_embedding: documents per call
    step_size: int = 64  # texts per call of a longer _predict (input_docs_processed_step_size)
    weights: tuple[float, float] = (0.5, 0.5)  # hybrid: (vector, text); connect passes /v1/search's defaults
    # Concurrent calls per model: a _bulk of image documents sends this many at once. 16 = what one
    # default sidecar worker (32 request threads) admits before answering 503 overloaded (queue_items).
    max_connection: int = 16
    max_retry_times: int = 3  # retries of a call the sidecar answered 429/503 (overloaded), with backoff
    read_timeout_s: int = 60  # seconds; above the sidecar's request_timeout_s, so its own 504 arrives first
    rerank: str = "ids"  # a key of RERANK_BY
    set_defaults: bool = False  # the index's default ingest and search pipelines

    def __post_init__(self) -> None:
        if self.ingest_fields not in INGEST_FIELDS:
            raise ValueError(f"ingest_fields {self.ingest_fields!r}: choose one of {', '.join(INGEST_FIELDS)}")
        if self.rerank not in RERANK_BY:
            raise ValueError(f"rerank {self.rerank!r}: choose one of {', '.join(RERANK_BY)}")
        for name in ("batch_size", "step_size", "max_connection", "read_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        _check_sidecar_url(self.sidecar_url)
        if not self.api_key:
            raise ValueError("api_key must not be empty: ml-commons refuses a connector without a credential")


def _check_sidecar_url(url: str) -> None:
    """The sidecar's base URL as each connector's URL starts (`_sidecar_url` appends the path and the pins): one
    without a host, with a port that is none, or with a query string or fragment of its own made connector URLs
    such as `http://s:8080?x=1/v1/opensearch/...`, which the cluster refused as untrusted (sending the user to its
    settings) or connect removed again after a failed call."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"sidecar_url must start with http:// or https://, got {url!r}")
    parts = urlsplit(url)
    try:
        parts.port  # reading it parses it: urllib raises for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"sidecar_url {url!r} has no valid port: {exc}") from exc
    if not parts.hostname:
        raise ValueError(f"sidecar_url {url!r} names no host: give the sidecar as OpenSearch reaches it, "
                         "e.g. http://127.0.0.1:8080")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"sidecar_url {url!r} has a query string or fragment: give the base URL only (each "
                         "connector adds its path and ?model=…)")


@dataclass(frozen=True)
class Names:
    """The names of everything connect makes for one alias."""

    alias: str

    @property
    def group(self) -> str:
        return self.alias

    @property
    def roles(self) -> tuple[str, ...]:
        return ("texts", "text-image", "rerank")

    def model(self, role: str) -> str:
        return f"{self.alias}-{role}"  # connector and model share the name

    def probe(self, role: str) -> str:
        """The throwaway copy of a role's connector and model that a rerun tries a change through first."""
        return f"{self.model(role)}-probe"

    @property
    def ingest_image(self) -> str:
        return f"{self.alias}-image"

    @property
    def ingest_text(self) -> str:
        return f"{self.alias}-text"

    @property
    def hybrid(self) -> str:
        return f"{self.alias}-hybrid"

    @property
    def hybrid_rerank(self) -> str:
        return f"{self.alias}-hybrid-rerank"

    @property
    def pipelines(self) -> set[str]:
        """Every ingest and search pipeline connect makes: what the index's default pipeline settings may name."""
        return {self.ingest_image, self.ingest_text, self.hybrid, self.hybrid_rerank}

    @property
    def template(self) -> str:
        """The index template of the default pipelines that connect made before rebuilds carried them."""
        return f"{self.alias}-pipelines"


@dataclass
class Connection:
    """What connect made or found: ids and names, and one line per object saying what happened to it."""

    model_group: str = ""
    connectors: dict[str, str] = field(default_factory=dict)  # role -> id
    models: dict[str, str] = field(default_factory=dict)  # role -> id
    ingest_pipelines: dict[str, str] = field(default_factory=dict)  # "image" | "text" -> name
    search_pipelines: dict[str, str] = field(default_factory=dict)  # "hybrid" | "hybrid-rerank" -> name
    changes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether this run made, changed, deployed or removed anything (a warning changes nothing)."""
        return any(not line.startswith(("unchanged", "warning:")) for line in self.changes)


def connect(store: OpenSearchStore, options: ConnectOptions) -> Connection:
    """Make (or find unchanged) everything OpenSearch needs to call the sidecar for `store`'s index.
    Either all of it is there and OpenSearch has embedded through it, or (StoreError) none of what this run
    made or changed is: a run that changed nothing before it failed leaves what was there as it was, and a
    rerun tries its changes through probes first (`_try_changes_first`), so one that cannot work changes nothing."""
    cluster = _Cluster(store)
    signature = cluster.index_signature()
    if options.set_defaults:
        _check_defaults_free(cluster, Names(store.alias))
    connection = Connection()
    try:
        return _connect(cluster, signature, options, connection)
    except StoreError as exc:
        if not connection.changed:
            # A rerun that found everything as asked fails on what is already running (most often the sidecar
            # is down or restarting): removing the connection would turn a pause into an outage, and every
            # ingest through the index's default pipeline would fail on a missing pipeline instead of retrying.
            raise StoreError(f"{exc}; this run changed nothing, so it removed nothing (`--disconnect` removes what "
                             "an earlier connect made)") from exc
        try:
            disconnect(store)
        except StoreError as cleanup:
            log.error("could not remove what connect made for %s: %s", store.alias, cleanup)
            raise
        raise StoreError(f"{exc}; refusing the connection (nothing was kept)") from exc


def _connect(cluster: "_Cluster", signature: ModelSignature, options: ConnectOptions,
             connection: Connection) -> Connection:
    """Fills `connection` as it goes, so that a failure leaves a record of what this run changed."""
    store = cluster.store
    names = Names(store.alias)
    connection.model_group = cluster.ensure_group(names.group, connection.changes)
    roles = [role for role in names.roles if role != "rerank" or options.rerank != "none"]
    connectors = {role: cluster.render(f"ml_connector_{'rerank' if role == 'rerank' else 'embeddings'}.json",
                                       name=names.model(role), description=DESCRIPTIONS[role],
                                       parameters={"input_docs_processed_step_size": options.step_size}
                                       if role == "texts" else {},
                                       api_key=options.api_key, url=_sidecar_url(options.sidecar_url, role, signature,
                                                                                 store.alias, rerank=options.rerank),
                                       read_timeout=options.read_timeout_s, max_connection=options.max_connection,
                                       max_retry_times=options.max_retry_times)
                  for role in roles}

    def model(role: str, name: str, connector_id: str) -> dict[str, Any]:
        return cluster.render("ml_model.json", name=name, model_group_id=connection.model_group,
                              description=DESCRIPTIONS[role], connector_id=connector_id)

    # Before anything else changes: a change that fails here leaves the connection in place as it was.
    _try_changes_first(cluster, names, connectors, model, signature=signature, options=options)
    # Connect made an index template of priority 100 for `<alias>-v*` until rebuilds carried the default pipelines:
    # OpenSearch applies one composable template per new index (and then no legacy one), so it hid the cluster's
    # own templates for those names (replicas, ISM policies), and refused to be made beside one of priority 100.
    if cluster.delete(f"/_index_template/{names.template}"):
        connection.changes.append(f"removed index template {names.template} (an earlier connect's; a rebuild "
                                  "carries the default pipelines)")
    connection.changes.extend(cluster.ensure_image_field())
    if options.rerank == "none":  # a rerun that no longer wants the rerank removes it
        connection.changes.extend(cluster.remove_models(names.model("rerank")))
        if cluster.delete(f"/_search/pipeline/{names.hybrid_rerank}"):
            connection.changes.append(f"removed search pipeline {names.hybrid_rerank}")
    for role, body in connectors.items():
        connection.connectors[role] = cluster.ensure_connector(body, connection.changes)
        connection.models[role] = cluster.ensure_model(model(role, names.model(role), connection.connectors[role]),
                                                       connection.changes)
    cluster.check_models(connection.models, signature=signature, options=options)
    _ensure_pipelines(cluster, names, connection, options)
    if options.set_defaults:
        _ensure_defaults(cluster, names, connection.changes)
    return connection


def _try_changes_first(cluster: "_Cluster", names: Names, connectors: dict[str, dict[str, Any]],
                       model: Callable[[str, str, str], dict[str, Any]], *, signature: ModelSignature,
                       options: ConnectOptions) -> None:
    """On a rerun, the connectors it would change or add are first made under probe names (`Names.probe`), with a
    model each, and OpenSearch embeds through them as `check_models` does; the probes are removed after, pass or
    fail. A change that cannot work (a sidecar URL the cluster cannot reach, a key it refuses, another model) so
    fails before anything in place is touched: the connection that works stays, and ingest through the index's
    default pipeline goes on. (OpenSearch never shows a connector's credential, so one changed in place could
    not be put back.) A first run has nothing to keep and makes its objects directly. Probes a run killed while it tried
    its change left are removed first, also by a run that changes nothing (no part of the connection: no change)."""
    for line in cluster.remove_models(*(names.probe(role) for role in names.roles)):
        log.info("%s: a probe left by a connect that was interrupted", line)
    found = {role: cluster.find("connectors", body["name"]) for role, body in connectors.items()}
    if not any(found.values()):
        return
    changing = [role for role, body in connectors.items() if not found[role] or cluster.differs(found[role][0], body)]
    if not changing:
        return
    try:
        models = {}
        for role in changing:
            connector_id = cluster.ensure_connector({**connectors[role], "name": names.probe(role)}, [])
            models[role] = cluster.ensure_model(model(role, names.probe(role), connector_id), [])
        cluster.check_models(models, signature=signature, options=options)
    except StoreError as exc:
        raise StoreError(f"{exc} (tried through probe copies of the connectors this run would change: "
                         f"{', '.join(changing)})") from exc
    finally:
        cluster.remove_models(*(names.probe(role) for role in changing))


def disconnect(store: OpenSearchStore) -> list[str]:
    """Remove everything connect made for `store`'s index (and the index's defaults that name it);
    what was not there is skipped. Returns one line per object removed."""
    cluster = _Cluster(store)
    names = Names(store.alias)
    removed: list[str] = []
    for index, settings in cluster.alias_settings().items():
        for setting in DEFAULT_PIPELINE_SETTINGS:
            if _setting(settings, setting) in names.pipelines:
                cluster.request("PUT", f"/{index}/_settings", {"index": {setting: None}})
                removed.append(f"index {index} setting {setting}")
    if cluster.delete(f"/_index_template/{names.template}"):
        removed.append(f"index template {names.template}")
    for name in (names.hybrid_rerank, names.hybrid):
        if cluster.delete(f"/_search/pipeline/{name}"):
            removed.append(f"search pipeline {name}")
    for name in (names.ingest_image, names.ingest_text):
        if cluster.delete(f"/_ingest/pipeline/{name}"):
            removed.append(f"ingest pipeline {name}")
    groups = cluster.find("model_groups", names.group)
    # The probes too: a connect killed while it tried a change leaves them.
    named = [name for role in names.roles for name in (names.model(role), names.probe(role))]
    for hit in cluster.search("models", {"term": {"model_group_id": groups[0]["_id"]}}) if groups else []:
        if hit["_source"].get("name") not in named:  # registered into the group by someone else: it must go too
            cluster.delete_model(hit["_id"])
            removed.append(f"model {hit['_source'].get('name')} ({hit['_id']})")
    removed.extend(line.removeprefix("removed ") for line in cluster.remove_models(*named))
    for hit in groups:
        cluster.delete(f"/_plugins/_ml/model_groups/{hit['_id']}")
        removed.append(f"model group {hit['_source']['name']} ({hit['_id']})")
    return removed


DESCRIPTIONS = {
    "texts": "clip-sidecar: a batch of texts -> one CLIP vector each (text_embedding processor, _predict)",
    "text-image": "clip-sidecar: one document or query [text], [null, image] or [text, image] -> exactly one CLIP "
                  "vector (text_image_embedding processor, neural query_text / query_image)",
    "rerank": "clip-sidecar: rerank the hits of a page with the sidecar's rerank stage (by id: the same as "
              "/v1/search); every request needs ext.rerank.query_context",
}


def _sidecar_url(base: str, role: str, signature: ModelSignature, alias: str, *, rerank: str = "ids") -> str:
    path = {"texts": TEXTS_PATH, "text-image": TEXT_IMAGE_PATH, "rerank": RERANK_PATH.format(kind=rerank)}[role]
    pins = {"model": signature.model, "weights": signature.weights}
    if role == "rerank" and rerank == "ids":
        pins["index"] = alias
    return f"{base.rstrip('/')}{path}?{urlencode(pins)}"


def _ensure_pipelines(cluster: "_Cluster", names: Names, connection: Connection, options: ConnectOptions) -> None:
    embedding = connection.models["text-image"]
    fields = INGEST_FIELDS[options.ingest_fields]
    bodies = {
        ("_ingest/pipeline", names.ingest_image): cluster.render(
            "ingest_pipeline_text_image.json", model_id=embedding, field_map=fields,
            description=f"clip-sidecar: one CLIP vector per document into `vector` from {' and '.join(fields)} "
                        f"(made by clip-sidecar opensearch connect for {names.alias})"),
        ("_ingest/pipeline", names.ingest_text): cluster.render(
            "ingest_pipeline_text.json", model_id=connection.models["texts"], batch_size=options.batch_size,
            description=f"clip-sidecar: text-only documents, {options.batch_size} per call (made by clip-sidecar "
                        f"opensearch connect for {names.alias})"),
        ("_search/pipeline", names.hybrid): cluster.render(
            "search_pipeline_neural_hybrid.json", embedding_model_id=embedding, vector_weight=options.weights[0],
            text_weight=options.weights[1],
            description="clip-sidecar: neural queries embed through the sidecar; hybrid min-max normalisation "
                        "(weights: vector, text)"),
    }
    if options.rerank != "none":
        field_name = RERANK_BY[options.rerank]
        bodies[("_search/pipeline", names.hybrid_rerank)] = cluster.render(
            "search_pipeline_neural_hybrid_rerank.json", embedding_model_id=embedding,
            vector_weight=options.weights[0], text_weight=options.weights[1],
            rerank_model_id=connection.models["rerank"], document_fields=[field_name],
            description=f"clip-sidecar: hybrid + the sidecar's rerank of the returned page (by the `{field_name}` "
                        "field); every request needs ext.rerank.query_context")
    for (kind, name), body in bodies.items():
        what = "ingest pipeline" if kind.startswith("_ingest") else "search pipeline"
        connection.changes.append(cluster.ensure_document(f"/{kind}/{name}", body, what=what))
    connection.ingest_pipelines = {"image": names.ingest_image, "text": names.ingest_text}
    connection.search_pipelines = {"hybrid": names.hybrid}
    if options.rerank != "none":
        connection.search_pipelines["hybrid-rerank"] = names.hybrid_rerank


def _check_defaults_free(cluster: "_Cluster", names: Names) -> None:
    """Before anything changes: --set-defaults would replace a default pipeline of the user's own without a word (every
    later document or search skipping it), and `--disconnect` would then leave the index with none."""
    for index, settings in cluster.alias_settings().items():
        for setting in DEFAULT_PIPELINE_SETTINGS:
            current = _setting(settings, setting)
            if current not in (None, "_none", *names.pipelines):
                raise StoreError(f"index {index}'s index.{setting} is {current}, a pipeline connect did not make: "
                                 "--set-defaults would replace it; run connect without --set-defaults and name "
                                 f"connect's pipelines per request (?pipeline=, ?search_pipeline=), or remove the "
                                 f"setting first (PUT /{index}/_settings {{\"index.{setting}\": null}})")


def _ensure_defaults(cluster: "_Cluster", names: Names, changes: list[str]) -> None:
    """The default pipelines as settings of the index behind the alias; a rebuild gives the new index the
    old one's (`OpenSearchStore._default_pipelines`)."""
    wanted = {"default_pipeline": names.ingest_image, "search.default_pipeline": names.hybrid}
    for index, settings in cluster.alias_settings().items():
        differing = {key: value for key, value in wanted.items() if _setting(settings, key) != value}
        if differing:
            cluster.request("PUT", f"/{index}/_settings", {"index": differing})
            changes.append(f"set index {index} default pipelines ({names.ingest_image}, {names.hybrid})")
        else:
            changes.append(f"unchanged index {index} default pipelines")


def _setting(settings: dict[str, Any], dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _fingerprint(body: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()[:24]


class _Cluster:
    """The REST calls connect and disconnect make, each error turned into a StoreError naming the call."""

    def __init__(self, store: OpenSearchStore):
        self.store = store
        self.client = store.client

    def request(self, method: str, path: str, body: Any = None, *, params: dict[str, str] | None = None,
                refused: Callable[[TransportError], str] | None = None) -> Any:
        """The answer to one call; an error as a StoreError saying `refused(exc)` (by default the call and
        OpenSearch's reason). A cluster that cannot be reached stays the transport's OpenSearchUnreachable
        (its message names the URL's setting): that is no failure of this call's own."""
        try:
            # A copy: the transport pops `ignore` out of the dict it is given.
            return self.client.transport.perform_request(method, path, body=body, params=dict(params or {}))
        except OpenSearchUnreachable:
            raise
        except TransportError as exc:
            message = refused(exc) if refused else f"{method} {path} failed: {exc.status_code} {_reason(exc)}"
            raise StoreError(message) from exc

    def delete(self, path: str) -> bool:
        """DELETE `path`; False when there was nothing to delete (a 404, not logged as a failure)."""
        result = self.request("DELETE", path, params=IGNORE_404)
        return not (isinstance(result, dict) and (result.get("status") == 404 or result.get("result") == "not_found"))

    def get(self, path: str) -> Any:
        """GET `path`, or None where there is nothing (pipelines answer 404 with `{}`, others with an error)."""
        result = self.request("GET", path, params=IGNORE_404)
        return None if not result or (isinstance(result, dict) and "error" in result) else result

    def render(self, template: str, **values: Any) -> dict[str, Any]:
        return render_template(json.loads((self.store.config_dir / template).read_text()), **values)

    # --- the index -------------------------------------------------------------------------

    def index_signature(self) -> ModelSignature:
        plugins = {row["component"] for row in self.request("GET", "/_cat/plugins", params={"format": "json"})}
        missing = [name for name in REQUIRED_PLUGINS if name not in plugins]
        if missing:
            raise StoreError(f"{self.store.url} lacks the plugin(s) {', '.join(missing)}: OpenSearch can call the "
                             "sidecar only with ml-commons, neural-search and k-NN installed")
        # The store's own question (alias_indices): a least-privilege user may not ask it of every index.
        if not self.store.alias_indices():
            raise StoreError(f"index {self.store.alias} does not exist at {self.store.url}: run `clip-sidecar "
                             "opensearch setup` first (it creates the index sized for the model)")
        signature = self.store.signature()
        if signature is None:
            raise StoreError(f"index {self.store.alias} records no model yet: run `clip-sidecar opensearch setup` "
                             "with the sidecar's model first")
        return signature

    def ensure_image_field(self) -> list[str]:
        """The `image` field the pipeline reads, mapped as binary (never analysed as text). An index made
        before it existed gets the field; keeping images out of _source needs a new index (rebuild)."""
        notes = []
        for index, mapping in self.request("GET", f"/{self.store.alias}/_mapping").items():
            mappings = mapping["mappings"]
            if "image" not in mappings.get("properties", {}):
                self.request("PUT", f"/{index}/_mapping", {"properties": {"image": {"type": "binary"}}})
                notes.append(f"mapped field image (binary) in index {index}")
            if "image" not in mappings.get("_source", {}).get("excludes", []):
                notes.append(f"warning: index {index} keeps base64 images in _source (it predates the mapping "
                             "that excludes them); `clip-sidecar index --rebuild` makes a new index without")
        return notes

    def alias_settings(self) -> dict[str, dict[str, Any]]:
        """index -> its `index` settings, for every index behind the alias; {} once the index is deleted (a
        teardown deletes it before `--disconnect`, which must still remove everything else)."""
        found = self.request("GET", f"/{self.store.alias}/_settings", params=IGNORE_404)
        if "error" in found:
            return {}
        return {index: body["settings"]["index"] for index, body in found.items()}

    # --- ml-commons objects ------------------------------------------------------------------

    def search(self, kind: str, query: dict[str, Any]) -> list[dict[str, Any]]:
        # ml-commons creates its system indices with the first object: none yet answers 404.
        found = self.request("POST", f"/_plugins/_ml/{kind}/_search", {"size": 1000, "query": query},
                             params=IGNORE_404)
        return found.get("hits", {}).get("hits", [])

    def find(self, kind: str, *names: str) -> list[dict[str, Any]]:
        return self.search(kind, {"terms": {"name.keyword": list(names)}})

    def models_of(self, connector_id: str) -> list[dict[str, Any]]:
        """The models that call through a connector. ml-commons maps `connector_id` as analysed text
        (lower-cased tokens), so a term query on it never matches a mixed-case id: ask its keyword."""
        return self.search("models", {"term": {"connector_id.keyword": connector_id}})

    def ensure_group(self, name: str, changes: list[str]) -> str:
        found = self.find("model_groups", name)
        if found:
            changes.append(f"unchanged model group {name} ({found[0]['_id']})")
            return found[0]["_id"]
        group_id = self.request("POST", "/_plugins/_ml/model_groups/_register",
                                self.render("ml_model_group.json", name=name))["model_group_id"]
        changes.append(f"created model group {name} ({group_id})")
        return group_id

    @staticmethod
    def differs(found: dict[str, Any], body: dict[str, Any]) -> bool:
        """Whether a connector found on the cluster was made from another body than `body` (as rendered)."""
        return found["_source"].get("parameters", {}).get(FINGERPRINT) != _fingerprint(body)

    def ensure_connector(self, body: dict[str, Any], changes: list[str]) -> str:
        # The fingerprint of the body as rendered, kept with it: OpenSearch never shows the credential again.
        stamped = {**body, "parameters": {**body["parameters"], FINGERPRINT: _fingerprint(body)}}
        name = body["name"]
        found = self.find("connectors", name)
        for extra in found[1:]:  # a run killed between create and the next search; keep the first
            self._delete_connector(extra["_id"])
        if not found:
            created = self.request("POST", "/_plugins/_ml/connectors/_create", stamped,
                                   refused=lambda exc: _connector_refused(exc, body["actions"][0]["url"]))
            connector_id = created["connector_id"]
            changes.append(f"created connector {name} ({connector_id})")
            return connector_id
        connector_id = found[0]["_id"]
        if not self.differs(found[0], body):
            changes.append(f"unchanged connector {name} ({connector_id})")
            return connector_id
        # ml-commons refuses to update a connector a deployed model uses: undeploy them first (their
        # ensure_model step deploys them again).
        for model in self.models_of(connector_id):
            self.request("POST", f"/_plugins/_ml/models/{model['_id']}/_undeploy")
        self.request("PUT", f"/_plugins/_ml/connectors/{connector_id}", stamped,
                     refused=lambda exc: _connector_refused(exc, body["actions"][0]["url"]))
        changes.append(f"updated connector {name} ({connector_id})")
        return connector_id

    def ensure_model(self, body: dict[str, Any], changes: list[str]) -> str:
        name = body["name"]
        found = self.find("models", name)
        keep = next((hit for hit in found if hit["_source"].get("connector_id") == body["connector_id"]
                     and hit["_source"].get("model_group_id") == body["model_group_id"]), None)
        for stale in (hit for hit in found if hit is not keep):  # made for a connector that is gone
            self.delete_model(stale["_id"])
            changes.append(f"removed stale model {name} ({stale['_id']})")
        if keep is None:
            model_id = self.request("POST", "/_plugins/_ml/models/_register", body, params={"deploy": "true"})["model_id"]
            self._wait_deployed(model_id, name)
            changes.append(f"created and deployed model {name} ({model_id})")
            return model_id
        model_id = keep["_id"]
        state = self.request("GET", f"/_plugins/_ml/models/{model_id}").get("model_state")
        if state == "DEPLOYING":
            # ml-commons redeploys its models by itself after a node (re)starts; a deploy of ours beside its own
            # fails as a duplicate task (DEPLOY_FAILED), and connect would then remove the whole connection.
            self._wait_deployed(model_id, name)
            changes.append(f"unchanged model {name} ({model_id}; OpenSearch was redeploying it)")
        elif state != "DEPLOYED":
            self.request("POST", f"/_plugins/_ml/models/{model_id}/_deploy")
            self._wait_deployed(model_id, name)
            changes.append(f"deployed model {name} ({model_id})")
        else:
            changes.append(f"unchanged model {name} ({model_id})")
        return model_id

    def delete_model(self, model_id: str) -> None:
        """Undeploy, delete, and delete its task records (register, deploy): nothing of it is left."""
        self.request("POST", f"/_plugins/_ml/models/{model_id}/_undeploy")  # answers 200 when not deployed
        self.delete(f"/_plugins/_ml/models/{model_id}")
        for task in self.search("tasks", {"term": {"model_id": model_id}}):
            self.delete(f"/_plugins/_ml/tasks/{task['_id']}")

    def remove_models(self, *names: str) -> list[str]:
        """Remove the models and connectors of these names; one line per object removed."""
        removed = []
        for hit in self.find("models", *names):
            self.delete_model(hit["_id"])
            removed.append(f"removed model {hit['_source']['name']} ({hit['_id']})")
        for hit in self.find("connectors", *names):
            self.delete_connector(hit["_id"])
            removed.append(f"removed connector {hit['_source']['name']} ({hit['_id']})")
        return removed

    def _delete_connector(self, connector_id: str) -> None:
        for model in self.models_of(connector_id):
            self.delete_model(model["_id"])
        self.delete_connector(connector_id)

    def delete_connector(self, connector_id: str) -> None:
        """DELETE a connector whose models were just deleted, asked again while ml-commons still counts them
        (CONNECTOR_FREE_TIMEOUT_S): on a quick machine the DELETE came within its model index's refresh."""
        deadline = time.monotonic() + CONNECTOR_FREE_TIMEOUT_S
        while True:
            try:
                self.delete(f"/_plugins/_ml/connectors/{connector_id}")
                return
            except StoreError as exc:
                in_use = isinstance(exc.__cause__, TransportError) and exc.__cause__.status_code == 409
                if not in_use or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def _wait_deployed(self, model_id: str, name: str) -> None:
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while True:
            state = self.request("GET", f"/_plugins/_ml/models/{model_id}").get("model_state")
            if state == "DEPLOYED":
                return
            if state == "DEPLOY_FAILED" or time.monotonic() > deadline:
                raise StoreError(f"model {name} ({model_id}) did not deploy (state {state}); see the node's log")
            time.sleep(0.1)

    def check_models(self, models: dict[str, str], *, signature: ModelSignature, options: ConnectOptions) -> None:
        """OpenSearch embeds through the new models (and reranks nothing through the rerank one): the
        sidecar is reachable from the cluster, serves the index's model, and its vectors fit the index. The texts
        model is sent a full step (`step_size` texts in one call), so a step over the running sidecar's own
        max_batch_items is refused now (its 413), not on the first long `_predict`."""
        sidecar_url = options.sidecar_url
        step = [f"connect check {i}" for i in range(options.step_size)]
        checks = {
            "text-image": ("/_plugins/_ml/_predict/text_embedding/", {"text_docs": ["connect check"]}, 1),
            "texts": ("/_plugins/_ml/_predict/text_embedding/", {"text_docs": step}, len(step)),
            "rerank": ("/_plugins/_ml/_predict/text_similarity/", {"query_text": "connect check", "text_docs": [""]},
                       1),
        }
        for role, (path, body, answers) in checks.items():
            if role not in models:
                continue
            deadline = time.monotonic() + STARTING_WAIT_S
            while True:
                try:
                    result = self.request("POST", path + models[role], body, refused=lambda exc, role=role: (
                        f"OpenSearch could not call the sidecar at {sidecar_url} through model {models[role]} "
                        f"({role}): {exc.status_code} {_reason(exc)}{_call_hint(_reason(exc))}"))
                    break
                except StoreError as exc:
                    # A node that has just started answers this until ml-commons has read its encryption key
                    # (seconds): no fault of the sidecar's, and refusing would remove a connection that works.
                    if STARTING not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
            outputs = [out for item in result["inference_results"] for out in item["output"]]
            if len(outputs) != answers:
                raise StoreError(f"the sidecar at {sidecar_url} answered {len(outputs)} results for {answers} "
                                 f"({role})")
            if role != "rerank" and any(len(out["data"]) != signature.dim for out in outputs):
                raise StoreError(f"the sidecar at {sidecar_url} answers {len(outputs[0]['data'])}-dimensional "
                                 f"vectors, but index {self.store.alias} holds {signature.dim}-dimensional ones "
                                 f"({signature.describe()})")

    # --- pipelines ---------------------------------------------------------------------------

    def ensure_document(self, path: str, body: dict[str, Any], *, what: str) -> str:
        """PUT `body` at `path` unless the same body is there already; says which."""
        name = path.rsplit("/", 1)[1]
        found = self.get(path)
        current = next(iter(found.values())) if found is not None else None
        if current == body:
            return f"unchanged {what} {name}"
        self.request("PUT", path, body)
        return f"{'created' if current is None else 'updated'} {what} {name}"


def _reason(exc: TransportError) -> str:
    try:
        reason = exc.info["error"]["root_cause"][0]["reason"]
    except (KeyError, IndexError, TypeError):
        try:
            reason = exc.info["error"]["reason"]
        except (KeyError, TypeError):
            reason = exc.info or exc.error
    return str(reason).strip()  # the sidecar's JSON body arrives with its trailing newline


# What ml-commons answers when its call never reached a sidecar: refused, unknown host, connect timeout.
UNREACHED = ("Connection refused", "Fail to execute http connector", "No response from model",
             "Error communicating with remote model")


def _call_hint(reason: str) -> str:
    """What to do about a check call that did not reach the sidecar; "" for the sidecar's own answers, which say."""
    if "private ip address" in reason:
        return (". Let the cluster call a sidecar on a private address: PUT _cluster/settings {\"persistent\": "
                "{\"plugins.ml_commons.connector.private_ip_enabled\": true}}")
    if any(marker in reason for marker in UNREACHED):
        return (". Check that the sidecar runs there and that --sidecar-url is the address OpenSearch's nodes reach "
                "it at (not necessarily this machine's: http://sidecar:8080 inside docker compose)")
    return ""


def _connector_refused(exc: TransportError, url: str) -> str:
    reason = _reason(exc)
    if "trusted connector endpoint" in reason:
        return (f"OpenSearch refuses the connector URL {url}: {reason}. Allow the sidecar on the cluster (keep the "
                "patterns already there): PUT _cluster/settings {\"persistent\": {\"plugins.ml_commons."
                "trusted_connector_endpoints_regex\": [\"^http://<sidecar host>:<port>/.*$\"]}}")
    return f"creating connector for {url} failed: {exc.status_code} {reason}"
