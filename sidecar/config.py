"""Settings: one frozen object, read from SIDECAR_* environment variables in one place."""

from __future__ import annotations

import dataclasses
import difflib
import errno
import ipaddress
import logging
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from sidecar.errors import UserFixable

log = logging.getLogger(__name__)

TINY_MODEL = "tiny-clip"
# The project's own models, trained into the cache (sidecar.model.tiny_model.RECIPES has their recipes):
# the default one, and a stronger one for fine ranking.
TINY_MODELS = (TINY_MODEL, "tiny-clip-large")
# The choices settings and command-line flags share, defined once.
STORES = ("embedded", "opensearch")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
OPENSEARCH_ENGINES = ("lucene", "faiss")  # faiss needs the k-NN native library
# Where the embed job decodes JPEGs: cpu (PIL in worker processes), device (batched on the
# model's device: nvjpeg on a GPU), split (both at once, shared as measured), auto (device on
# CUDA, else cpu).
DECODE_MODES = ("auto", "cpu", "device", "split")
# What decodes JPEGs on the device (`embed --jpeg-decoder`); sidecar.model.images.
JPEG_DECODERS = ("torchvision", "nvimagecodec")
# What runs the embed job: this machine's processes, or a Ray cluster (the `ray` extra).
EMBED_ENGINES = ("local", "ray")
# Image formats decoded by default: what cameras, phones and the web produce. Pillow knows forty
# more, some through external programs (EPS hands off to Ghostscript) or rarely exercised decoders;
# an upload is opened only by the decoders named here (setting image_formats).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Longer side of an image after the model's resize step: 100 x 400,000 would resize to
# 224 x 896,000 under a shortest-side resize; 8192 allows panoramas up to ~36:1 at 224 px.
MAX_RESIZED_SIDE = 8192
# Scans of one progressive JPEG: each is a pass over every block of the image, so a file that repeats
# a 14-byte scan is a CPU bomb (38 KB of 1000 scans over 2000x2000: 4.2 s to decode). Encoders write
# 6-18 (libjpeg's script: 10 for colour); libjpeg-turbo's own fuzzers stop at 500 for images of 1 MP.
MAX_JPEG_SCANS = 100
# Longer side of the thumbnail `embed` keeps of each image for the search page: a results grid shows
# them at about 150 CSS pixels, and 128-px JPEGs weigh 3-6 KB (a million documents: a few GB).
THUMBNAIL_SIDE = 128
# A replicas setting that is a range (`replica_settings`): MIN-MAX, MAX a count or `all`.
_REPLICA_RANGE = re.compile(r"(\d+)-(\d+|all)")
# An allowed_hosts entry: a host name as the Host header carries it without its port (a compose service's may hold
# "_"), with a leading "." for its subdomains too; or an IP address (admitted whether listed or not).
_ALLOWED_HOST = re.compile(r"\.?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?", re.ASCII | re.IGNORECASE)
# SIDECAR_* variables that are no setting: a command-line flag's own (`opensearch connect --api-key`).
FLAG_VARIABLES = ("SIDECAR_CONNECTOR_API_KEY",)
MIN_API_RATE_LIMIT = 1 / 86_400  # requests/s: one a day
# Unknown SIDECAR_* variables this process has warned about: Settings are built several times per process
# (gunicorn's arbiter and each worker, a CLI command and its helpers), one warning per name is enough.
_warned_unknown: set[str] = set()


class SettingsError(ValueError, UserFixable):
    """A setting's value the user fixes (from its SIDECAR_* variable, a flag or a key list): the message names
    the setting and what it takes. Every command and gunicorn (wsgi, the config's own module) say it in one line."""


def _default_cache_dir() -> Path:
    return Path(os.environ.get("CLIP_SIDECAR_CACHE", Path.home() / ".cache" / "clip-sidecar"))


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the sidecar can be told. Env var = SIDECAR_<FIELD NAME IN CAPITALS>."""

    # Model: an open_clip name plus a pretrained tag (e.g. ViT-B-32 + laion2b_s34b_b79k), or a
    # local checkpoint path; `model_config` is a JSON file for architectures open_clip lacks.
    # The default is the project's tiny synthetic-data CLIP, trained on first use.
    model: str = TINY_MODEL
    pretrained: str = ""
    model_config: str = ""
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    cache_dir: Path = dataclasses.field(default_factory=_default_cache_dir)
    # Fine ranking: a stronger model (name, pretrained tag or checkpoint, config) whose image vectors
    # `embed` stores beside each document, outside the ANN index, and whose text vector re-scores
    # the coarse candidates of a query. "" = no fine stage (rerank is then skipped, and says so).
    fine_model: str = ""
    fine_pretrained: str = ""
    fine_model_config: str = ""

    # Store
    store: str = "embedded"  # one of STORES
    store_path: Path = Path("data/store")
    opensearch_url: str = "http://127.0.0.1:9250"
    opensearch_index: str = "clip-sidecar"
    opensearch_user: str = ""
    opensearch_password: str = ""
    opensearch_verify_certs: bool = True
    # PEM file of the CA(s) that signed the cluster's HTTPS certificate (a private CA); "" = the system's CAs.
    opensearch_ca_certs: str = ""
    opensearch_engine: str = "lucene"  # one of OPENSEARCH_ENGINES
    # Primary shards and replicas of each index the store creates (setup, rebuild); docs/scaling.md
    # sizes them. One shard holds ~10-50 GB; a replica per shard keeps a lost node's shards searchable.
    # Replicas: a whole number is a fixed count, a range as many as the nodes hold (`replica_settings`).
    opensearch_shards: int = 1
    opensearch_replicas: int | str = "0-1"
    # plugin_config/ (index template, search pipelines): "" = the checkout's; an installed
    # package (Docker) needs the path of a copy.
    plugin_config_dir: str = ""

    # Request limits, each checked before the work it bounds (the API answers 400/413 naming them)
    max_batch_items: int = 256
    max_body_bytes: int = 32 * 1024 * 1024
    max_json_depth: int = 32  # nesting of the request's JSON; the API's own bodies need 4
    max_image_pixels: int = 40_000_000  # one image's declared size (decompression bombs)
    max_request_pixels: int = 200_000_000  # decoded pixels summed over a request's images
    max_resized_side: int = MAX_RESIZED_SIDE
    max_jpeg_scans: int = MAX_JPEG_SCANS
    # Bytes the image decodes of one worker may hold at once (estimated per image before decoding);
    # a decode waits for room until request_timeout_s, then answers 503.
    decode_memory_bytes: int = 1024 * 1024 * 1024
    image_formats: tuple[str, ...] = IMAGE_FORMATS
    # Characters of a text kept before tokenising: the model sees its first context_length tokens
    # (77 for CLIP, a few hundred characters) anyway; longer texts are cut and reported as truncated.
    max_text_chars: int = 4096
    max_filter_fields: int = 64
    max_filter_values: int = 1024  # summed over every field's list
    max_k: int = 1000

    # Micro-batching of concurrent requests
    max_batch: int = 64
    max_wait_ms: float = 2.0
    # Items (texts or images, not requests) that may wait for each micro-batcher before a request
    # answers 503 + Retry-After; 0 = sized from request_threads and max_batch (encode_queue_items).
    queue_items: int = 0
    request_timeout_s: float = 30.0
    # Request threads per gunicorn worker (gunicorn's `threads`; `serve --threads` sets it).
    request_threads: int = 32
    # GPU only: replay captured CUDA graphs of the text tower (batch sizes 1, 2, 4 … max_batch)
    # instead of launching its kernels one by one; false = eager.
    cuda_graphs: bool = True
    # GPU only: the share of the GPU's memory each gunicorn worker may allocate (torch's per-process
    # memory fraction), for several workers on one GPU (e.g. 0.12 for 8); 0 = no limit of its own.
    gpu_memory_fraction: float = 0.0
    # CPU only: torch intra-op threads per serving worker. Forwards run on the batcher thread
    # beside the request threads; more than one thread there only adds hand-off cost (the tiny
    # model's batch-1 forward: 0.9 ms with 1 thread, 1.9 ms with 2, on the 2-core dev box).
    serve_torch_threads: int = 1
    # Each gunicorn worker process on one CPU of those the server may use (the one the fewest
    # workers have): its request threads, gunicorn's own thread and the batcher thread then hand
    # requests to each other on one core, where a wake-up is a context switch, instead of across
    # cores, where it is an inter-processor interrupt (costly on VMs; bench/RESULTS.md). Off by
    # default: servers sharing a host without a CPU set each (containers) would all pin to the same CPUs.
    pin_workers: bool = False

    # Text-vector cache: keyed by model, weights, prompt template version and text. An in-memory
    # LRU of text_cache_size entries per worker, over a SQLite file shared by the workers (unless
    # text_cache_persist is false) that keeps at most text_cache_max_entries vectors, dropping the
    # least recently used first. text_cache_path: "" = <cache_dir>/text-vectors.sqlite.
    text_cache_size: int = 10_000
    text_cache_persist: bool = True
    text_cache_path: str = ""
    text_cache_max_entries: int = 200_000
    prompt_template: str = "{}"
    prompt_version: str = "1"

    # Search defaults
    rerank_candidates: int = 100

    # Quality in production (README "Monitoring quality"). A recall target makes the store answer
    # queries that name no ef_search with the lowest HNSW effort (or exact search, where cheaper)
    # that reached target_recall at k target_recall_k on calibration_queries of its own vectors
    # (`clip-sidecar store calibrate`, and after each index run that changed much); 0 = off: the
    # store's fixed ef_search.
    target_recall: float = 0.0
    target_recall_k: int = 10
    calibration_queries: int = 300
    # Live Recall@K: this share of /v1/search queries that searched by vector is searched again in
    # the background, ANN and exact, at most monitor_queue waiting (more are dropped, counted). The
    # hard-example checks have a queue of their own, as long.
    monitor_fraction: float = 0.01
    monitor_queue: int = 16
    # Hard examples (queries the model matches nothing close to, vector/BM25 disagreement or no result) and
    # POST /v1/feedback go to rotating JSONL files in this folder; "" = off. Texts only, unless
    # hard_example_images (then an image query's bytes, base64, are logged too).
    quality_log_dir: str = ""
    hard_example_fraction: float = 1.0  # share of searches checked
    hard_example_min_score: float = 0.2  # the model's best match (a vector search's top cosine) below it: low score
    hard_example_max_agreement: float = 0.1  # shared share of the vector and BM25 top k at most this: disagreement
    hard_example_images: bool = False
    # A query (text up to case and spacing, image, filters, model) a worker logged is not logged again for
    # this long: its searches only name its record in hard-example-repeats.jsonl; one it found not hard is not
    # checked again. 0 = every search checked.
    hard_example_repeat_seconds: float = 3600.0
    quality_log_max_bytes: int = 10 * 1024 * 1024  # per file; a log keeps quality_log_backups more
    quality_log_backups: int = 4

    # Who may call the API (sidecar/api/auth.py; README "API keys"): `name:scopes:sha256` entries that
    # `clip-sidecar keys create` prints, comma-separated; "" = no keys, every endpoint open (loopback only
    # unless `serve --insecure`). Each key's requests a second (a token bucket per key in each worker;
    # 0 = unlimited) and burst (0 = one second's worth). /metrics takes a key unless metrics_public.
    api_keys: str = ""
    api_rate_limit: float = 0.0
    api_rate_burst: int = 0
    metrics_public: bool = False
    # Serve without API keys on an address other than loopback (`serve --insecure`): on purpose only.
    insecure: bool = False
    # Without API keys, the Host names a request may be addressed to besides localhost and IP addresses
    # (comma-separated; ".example.com" takes its subdomains too; "*" any): a web page could otherwise read
    # an open API through DNS rebinding (sidecar/api/auth.py). Unused once api_keys names any key.
    allowed_hosts: str = ""

    # Prompt sets (`clip-sidecar prompts`, /v1/classify, `embed --tag`): one file per set, and their
    # vectors per model, in this folder.
    prompt_sets_dir: Path = Path("data/prompt-sets")

    def encode_queue_items(self) -> int:
        """The bound on items waiting for each micro-batcher: queue_items, or by default half the
        request threads (one item each), at most one full batch. It must sit below what the request
        threads can enqueue — they are the only way in, so a larger bound never fills and overload
        only shows as latency — and the threads it leaves free keep answering /readyz, /metrics and
        cache hits while the model is saturated."""
        return self.queue_items or max(1, min(self.max_batch, self.request_threads // 2))

    def text_cache_file(self) -> Path | None:
        """The persistent text-vector cache's SQLite file, or None when persistence is off."""
        if not self.text_cache_persist:
            return None
        return Path(self.text_cache_path) if self.text_cache_path else self.cache_dir / "text-vectors.sqlite"

    def fine_model_settings(self) -> "Settings | None":
        """These settings with the fine model as the model, or None when no fine model is configured."""
        if not self.fine_model:
            return None
        return dataclasses.replace(self, model=self.fine_model, pretrained=self.fine_pretrained,
                                   model_config=self.fine_model_config, fine_model="", fine_pretrained="",
                                   fine_model_config="")

    def prompt(self, text: str) -> str:
        """The text the model sees for a query or document text: the prompt template applied."""
        return self.prompt_template.format(text)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build from SIDECAR_* variables, then explicit overrides (CLI flags, tests) on top."""
        environ = os.environ if environ is None else environ
        _warn_unknown_variables(environ)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"SIDECAR_{f.name.upper()}")
            if raw is not None:
                values[f.name] = parse_variable(f"SIDECAR_{f.name.upper()}", raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        choices = {"store": STORES, "precision": PRECISIONS, "opensearch_engine": OPENSEARCH_ENGINES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SettingsError(f"setting {name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise SettingsError(f"setting device={self.device!r}: choose auto, cpu, cuda or cuda:N (N counts from 0)")
        for name in ("max_batch_items", "max_body_bytes", "max_json_depth", "max_image_pixels", "max_request_pixels",
                     "max_resized_side", "max_jpeg_scans", "decode_memory_bytes", "max_text_chars", "max_filter_fields",
                     "max_filter_values", "max_k", "max_batch", "request_threads", "text_cache_size",
                     "text_cache_max_entries", "rerank_candidates", "serve_torch_threads", "opensearch_shards",
                     "target_recall_k",
                     "calibration_queries", "monitor_queue", "quality_log_max_bytes"):
            if getattr(self, name) < 1:
                raise SettingsError(f"setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("target_recall", "monitor_fraction", "hard_example_fraction", "gpu_memory_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingsError(f"setting {name} must be between 0 and 1, got {getattr(self, name)}")
        if self.pin_workers and self.serve_torch_threads > 1:
            raise SettingsError(f"setting pin_workers runs each worker on one CPU, where serve_torch_threads="
                                f"{self.serve_torch_threads} torch threads would take turns: set serve_torch_threads=1 "
                                "or pin_workers=false")
        if self.rerank_candidates > self.max_k:
            # It is the `candidates` of every search that names none, which the API and `search` refuse over max_k:
            # such a server would answer 400 to requests that never sent the field.
            raise SettingsError(f"setting rerank_candidates={self.rerank_candidates} (the candidates of a search that "
                                f"names none) is over max_k={self.max_k}, the most hits a search ranks: set "
                                f"rerank_candidates to at most {self.max_k} or max_k to at least "
                                f"{self.rerank_candidates}")
        if self.hard_example_repeat_seconds < 0:
            raise SettingsError(f"setting hard_example_repeat_seconds must be >= 0 (0 = every search checked), "
                                f"got {self.hard_example_repeat_seconds}")
        if self.quality_log_backups < 0:
            raise SettingsError(f"setting quality_log_backups must be >= 0, got {self.quality_log_backups}")
        # A count as an int ("2" from the environment), a range as its text.
        replicas = replica_settings(self.opensearch_replicas)
        fixed = replicas["auto_expand_replicas"] == "false"
        object.__setattr__(self, "opensearch_replicas",
                           replicas["number_of_replicas"] if fixed else replicas["auto_expand_replicas"])
        if self.queue_items < 0:
            raise SettingsError(f"setting queue_items must be >= 0 (0 = sized from request_threads), "
                                f"got {self.queue_items}")
        # A comma-separated string (SIDECAR_IMAGE_FORMATS=JPEG,PNG) or a sequence of names.
        formats = self.image_formats.split(",") if isinstance(self.image_formats, str) else self.image_formats
        object.__setattr__(self, "image_formats", tuple(f.strip().upper() for f in formats if f.strip()))
        unknown = sorted(set(self.image_formats) - set(_pillow_formats()))
        if unknown or not self.image_formats:
            raise SettingsError(f"setting image_formats={','.join(self.image_formats)!r}: unknown "
                                f"{', '.join(unknown) or '(empty)'}; Pillow opens "
                                f"{', '.join(sorted(_pillow_formats()))}")
        if self.max_image_pixels > _pillow_pixel_limit():
            raise SettingsError(f"setting max_image_pixels={self.max_image_pixels} is over {_pillow_pixel_limit()}, "
                                "the size Pillow itself refuses to open (as a decompression bomb) before this check "
                                "runs")
        if self.api_rate_limit < 0 or self.api_rate_burst < 0:
            raise SettingsError(f"settings api_rate_limit and api_rate_burst must be >= 0 (0 = no limit / one second's "
                                f"worth), got {self.api_rate_limit} and {self.api_rate_burst}")
        if 0 < self.api_rate_limit < MIN_API_RATE_LIMIT:
            # A 429's Retry-After is the wait for one token, 1/rate seconds: a rate near zero made it infinite
            # (a 500 on the first refused request) or centuries long.
            raise SettingsError(f"setting api_rate_limit={self.api_rate_limit:g} is under one request a day "
                                f"({MIN_API_RATE_LIMIT:.3g}/s): set 0 for no limit, or at least that")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"setting {f.name} must be a finite number, got {value}")
        if self.request_timeout_s <= 0:
            raise SettingsError(f"setting request_timeout_s must be > 0 seconds, got {self.request_timeout_s}")
        if self.max_wait_ms < 0:
            raise SettingsError(f"setting max_wait_ms must be >= 0 (0 = no wait for company), got {self.max_wait_ms}")
        self._check_prompt_template()
        self._check_allowed_hosts()
        # Paths may arrive as strings from the environment or tests.
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "store_path", Path(self.store_path))
        object.__setattr__(self, "prompt_sets_dir", Path(self.prompt_sets_dir))

    def _check_prompt_template(self) -> None:
        """The template is str.format'ed with each text (`prompt`): it must take exactly that one
        argument and show it, or every text request would fail, or every text get one vector."""
        try:
            filled = self.prompt_template.format("\0")
        except (IndexError, KeyError, ValueError) as exc:
            raise SettingsError(f"setting prompt_template={self.prompt_template!r} cannot take the text ({exc}): write "
                                "'{}' where the text goes and double any other brace ('{{', '}}')") from exc
        if "\0" not in filled:
            raise SettingsError(f"setting prompt_template must contain '{{}}' for the text, "
                                f"got {self.prompt_template!r}")

    def _check_allowed_hosts(self) -> None:
        """An entry the Host check could never match (a port, a scheme, a `*.` wildcard) would answer 403 to every
        request addressed to the name meant, and say so only then."""
        for entry in (name.strip() for name in self.allowed_hosts.split(",")):
            if entry and entry != "*" and not _ALLOWED_HOST.fullmatch(entry) and not _is_ip_address(entry):
                raise SettingsError(f"setting allowed_hosts entry {entry!r}: expected a host name without scheme or "
                                    "port (search.example.com), .example.com for a domain and its subdomains, or * "
                                    "for any host")


def replica_settings(replicas: int | str) -> dict[str, int | str]:
    """The index settings for a replicas setting. A whole number is that fixed count (auto-expansion off). A
    range MIN-MAX (MAX a count or `all`) is OpenSearch's index.auto_expand_replicas, which keeps as many
    replicas within it as the cluster has other nodes for: with 0-1, the default, a lone node's index is
    green with none (a replica is never placed beside its primary, so a fixed 1 leaves it yellow for good)
    and a cluster's index gets one. ValueError, naming the setting, for anything else."""
    text = str(replicas).strip()
    if text.isdigit():
        return {"number_of_replicas": int(text), "auto_expand_replicas": "false"}
    found = _REPLICA_RANGE.fullmatch(text)
    if found is None or (found[2] != "all" and int(found[1]) > int(found[2])):
        raise SettingsError(f"setting opensearch_replicas must be a whole number >= 0 (a fixed count) or a range "
                            f"MIN-MAX such as 0-1 or 0-all (as many as the nodes hold), got {replicas!r}")
    return {"number_of_replicas": int(found[1]), "auto_expand_replicas": text}


# A folder or file a setting or flag points at that cannot be created or written: the user's to fix, not a bug.
_UNWRITABLE = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
               errno.EDQUOT}


def is_unwritable_path(exc: OSError) -> bool:
    """Whether `exc` is a path that cannot be created or written (one `unwritable_path_message` can name)."""
    return exc.errno in _UNWRITABLE and exc.filename is not None


def path_settings(settings: Settings, *, flags: Mapping[str, str] | None = None) -> dict[str, str]:
    """Absolute path -> the variable of each path setting that is set ("--flag or SIDECAR_VARIABLE" where
    `flags`, setting name -> flag, names a flag for it)."""
    flags = flags or {}
    sources = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value and (isinstance(value, Path) or f.name.endswith(("_path", "_dir"))):
            variable = f"SIDECAR_{f.name.upper()}"
            sources[os.path.abspath(value)] = f"{flags[f.name]} or {variable}" if f.name in flags else variable
    return sources


def unwritable_path_message(exc: OSError, sources: Mapping[str, str]) -> str:
    """One line: the path, why, and the setting or flag of `sources` (absolute path -> its name) it lies in,
    the nearest that holds it."""
    failed = Path(os.path.abspath(exc.filename))
    holding = [path for path in sources if failed.is_relative_to(path)]
    # Else a folder on the way to one path only (the folder of SIDECAR_TEXT_CACHE_PATH's file): it is that
    # setting's; a folder on the way to several could be any of theirs.
    needing = [path for path in sources if Path(path).is_relative_to(failed)]
    origin = max(holding, key=len) if holding else needing[0] if len(needing) == 1 else None
    return f"cannot write {exc.filename}: {exc.strerror}{f' ({sources[origin]} is {origin})' if origin else ''}"


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """A misspelt or renamed variable (SIDECAR_STORE_PTH, SIDECAR_API_KEY) would otherwise leave its setting
    at the default without a word: a store in ./data/store, a server without keys, a cache off the volume."""
    known = {f"SIDECAR_{f.name.upper()}" for f in fields(Settings)} | set(FLAG_VARIABLES)
    for name in sorted(environ):
        if name.startswith("SIDECAR_") and name not in known and name not in _warned_unknown:
            _warned_unknown.add(name)
            # Compared without the prefix every name shares, which would make any two look alike.
            close = difflib.get_close_matches(name.removeprefix("SIDECAR_"),
                                              sorted(k.removeprefix("SIDECAR_") for k in known), n=1)
            log.warning("environment variable %s is no clip-sidecar setting and is ignored%s (README: Configuration)",
                        name, f"; did you mean SIDECAR_{close[0]}?" if close else "")


def _pillow_formats() -> list[str]:
    from PIL import Image

    Image.init()
    return list(Image.OPEN)


def _pillow_pixel_limit() -> float:
    """Pillow refuses to open an image of more than twice Image.MAX_IMAGE_PIXELS (it warns between)."""
    from PIL import Image

    return math.inf if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def parse_variable(variable: str, raw: str, type_name: Any) -> Any:
    """An environment variable's text as the type named ("int", "float", "bool", "Path"; any other: the text);
    SettingsError naming the variable and what it takes. Python's own words ("invalid literal for int() with
    base 10") said neither."""
    type_name = str(type_name)
    parsers = {"bool": (_parse_bool, "true or false (also 1/0, yes/no)"), "int": (int, "a whole number"),
               "float": (float, "a number")}
    if type_name in parsers:
        parse, expected = parsers[type_name]
        try:
            return parse(raw)
        except ValueError:
            raise SettingsError(f"{variable}={raw!r}: expected {expected}") from None
    if type_name == "Path":
        return Path(raw)
    return raw


def _parse_bool(raw: str) -> bool:
    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(raw)
    return raw.lower() in ("1", "true", "yes")
