"""Zero-shot tags in the shards: the top labels of prompt sets, written into each document's metadata.

`embed --tag SET[:K|THRESHOLD]` ranks a set's labels for every image it embeds (and, on a rerun,
for every image it already holds, from the stored vectors) and writes two metadata fields per set:
`tag_<set>` (the labels, best first) and `tag_<set>_score` (their cosine scores). `index` loads them
like any metadata (keyword fields in OpenSearch), so filters work on them in both stores. The
manifest records which sets, versions and vectors the tags came from; `clip-sidecar tag SHARDS`
re-tags from the stored vectors alone (no image is read), after a set changed. A row's metadata holds the
corpus's fields and the tags together: the sets the manifest records (and those of a killed job's tagging,
recorded before any row is written) tell which fields are tags. Any other field, whatever its name or value, is
the corpus's: tagging refuses to write over it and `tag --clear` keeps it. A tag change changes
the document hash, so `index` rewrites exactly the documents whose tags moved.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from sidecar.ingest.corpus import CorpusError, CorpusItem
from sidecar.ingest.identity import document_hash
from sidecar.ingest.shards import ShardError, ShardRow, ShardSet, exclusive_writer
from sidecar.model.encoder import Encoder
from sidecar.model.prompts import SET_NAME, PromptSet, PromptSetNotFound, PromptSetRegistry, rank_labels
from sidecar.types import ModelSignature

log = logging.getLogger(__name__)

# Stored vectors ranked per step when tagging what the shards hold.
_TAG_CHUNK = 65_536


def label_field(set_name: str) -> str:
    """The metadata field holding a set's labels for a document, best first."""
    return f"tag_{set_name}"


def score_field(set_name: str) -> str:
    """The metadata field holding those labels' cosine scores, in the same order."""
    return f"tag_{set_name}_score"


def check_tag_specs(specs: Sequence[TagSpec]) -> None:
    """Each set once, and no set's fields another's: set `color_score`'s labels would land in `color`'s
    scores (tag_color_score), replacing them silently."""
    names = [spec.set for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"set {repeated[0]!r} is given twice to tag with; give each set once")
    owner: dict[str, str] = {}
    for name in names:
        for field_name in (label_field(name), score_field(name)):
            if field_name in owner:
                raise ValueError(f"sets {owner[field_name]!r} and {name!r} would both write metadata field "
                                 f"{field_name!r}; tag with one of them, or rename a set")
            owner[field_name] = name


@dataclass(frozen=True, slots=True)
class TagSpec:
    """Which labels of a set a document gets: the top `k`, or every label scoring at least `threshold`."""

    set: str
    k: int | None = 1
    threshold: float | None = None

    @classmethod
    def parse(cls, text: str) -> TagSpec:
        """SET (its best label), SET:K (the top K) or SET:THRESHOLD (a number with a point: every label
        whose cosine score reaches it)."""
        name, sep, rest = text.partition(":")
        if not SET_NAME.match(name):
            raise ValueError(f"tag {text!r}: SET[:K or THRESHOLD], the set named as `clip-sidecar prompts list` "
                             "shows it")
        if not sep:
            return cls(name)
        try:
            if "." in rest or "e" in rest.lower():
                threshold = float(rest)
                if not -1 <= threshold <= 1:
                    raise ValueError
                return cls(name, k=None, threshold=threshold)
            k = int(rest)
            if k < 1:
                raise ValueError
            return cls(name, k=k)
        except ValueError:
            raise ValueError(f"tag {text!r}: after ':' comes a count of labels (e.g. 3) or a cosine score threshold "
                             "between -1 and 1 with a decimal point (e.g. 0.25)") from None

    def describe(self) -> str:
        return self.set if self.k == 1 and self.threshold is None else \
            f"{self.set}:{self.k if self.threshold is None else self.threshold}"

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TagSpec:
        return cls(set=record["set"], k=record.get("k"), threshold=record.get("threshold"))


@dataclass(frozen=True, slots=True)
class _SetTagging:
    spec: TagSpec
    prompt_set: PromptSet
    vectors: np.ndarray  # one per label, by the shards' model
    key: str  # PromptSet.vector_key: the model, weights, version and prompts the vectors came from


class Tagger:
    """Ranks prompt-set labels for image vectors and writes them into rows' metadata."""

    def __init__(self, sets: Sequence[_SetTagging], *, logit_scale: float, signature: ModelSignature):
        self._sets = list(sets)
        self.logit_scale = logit_scale
        self.signature = signature
        # field -> the set that writes it: a clash with the corpus names both
        self.fields = {f: s.spec.set for s in self._sets for f in (label_field(s.spec.set), score_field(s.spec.set))}

    @classmethod
    def load(cls, specs: Sequence[TagSpec], registry: PromptSetRegistry, encoder: Encoder, *,
             recorded_in: Path | None = None) -> Tagger:
        """The sets' label vectors by `encoder` (from the registry's cache, computed once where missing).
        `recorded_in`: the shards whose recorded tagging `specs` are (no --tag given), for the error of a
        set removed since: the user named no set, so it says whose set it is and the ways on."""
        check_tag_specs(specs)
        sets = []
        for spec in specs:
            try:
                prompt_set = registry.get(spec.set)
            except PromptSetNotFound:
                if recorded_in is None:
                    raise
                raise PromptSetNotFound(
                    f"{recorded_in} was last tagged with prompt set {spec.set!r}, which {registry.root} no longer "
                    f"holds: add it again (`clip-sidecar prompts add FILE`), name the sets to tag with (--tag SET), "
                    f"or remove every tag (`clip-sidecar tag {recorded_in} --clear`)") from None
            vectors = registry.vectors(prompt_set, model=encoder.name, weights=encoder.weights,
                                       encode=encoder.encode_texts)
            sets.append(_SetTagging(spec=spec, prompt_set=prompt_set, vectors=vectors,
                                    key=prompt_set.vector_key(model=encoder.name, weights=encoder.weights)))
        tagger = cls(sets, logit_scale=encoder.logit_scale, signature=encoder.signature)
        log.info("tagging with %s", tagger.describe())
        return tagger

    @property
    def set_names(self) -> list[str]:
        return [s.spec.set for s in self._sets]

    def check_metadata(self, items: Iterable[CorpusItem | ShardRow], *, tagged_fields: Collection[str] = ()) -> None:
        """Refuse a corpus whose metadata has a field this tagging writes (its value would be replaced). `embed`
        checks the corpus as read, before any file is hashed or encoded: on Ray, on the driver, not in a task.
        `tag` checks the shards' rows, whose metadata also holds `tagged_fields`, an earlier tagging's
        (`recorded_fields`): those it may replace; any other field it writes came from the corpus, whatever its
        value: a list of labels with as many scores is no proof of tagging (a corpus may hold one, and replacing
        it loses the user's data). The pairs a killed `tag` of a version before `tagging_begun` left unrecorded
        are refused too: the `embed` rerun the error names rebuilds the rows' metadata from the corpus."""
        fields = self.fields.keys() - set(tagged_fields)
        for item in items:
            clash = sorted(item.metadata.keys() & fields)
            if clash:
                rename = ("rename it in the corpus and rerun `clip-sidecar embed` (it rebuilds each row's metadata "
                          "from the corpus)" if isinstance(item, ShardRow) else "rename it in the corpus")
                raise CorpusError(f"item {item.id!r}: its metadata has a field {clash[0]!r}, which tagging with prompt "
                                  f"set {self.fields[clash[0]]!r} writes; {rename}, or tag with another set")

    def describe(self) -> str:
        return ", ".join(f"{s.spec.describe()} (version {s.prompt_set.version}, {len(s.prompt_set.labels)} labels)"
                         for s in self._sets)

    def record(self) -> list[dict[str, Any]]:
        """What the manifest keeps: per set, the spec, the version and the key of the vectors used."""
        return [{"set": s.spec.set, "k": s.spec.k, "threshold": s.spec.threshold, "version": s.prompt_set.version,
                 "vectors": s.key} for s in self._sets]

    def tags(self, vectors: np.ndarray) -> list[dict[str, list]]:
        """Per image vector, its tag fields."""
        out: list[dict[str, list]] = [{} for _ in range(len(vectors))]
        for s in self._sets:
            ranked = rank_labels(vectors, s.vectors, s.prompt_set.label_names, logit_scale=self.logit_scale,
                                 k=s.spec.k, threshold=s.spec.threshold)
            for fields, labels in zip(out, ranked):
                fields[label_field(s.spec.set)] = [label.label for label in labels]
                fields[score_field(s.spec.set)] = [round(label.score, 4) for label in labels]
        return out

    def apply(self, rows: Sequence[ShardRow], vectors: np.ndarray) -> list[ShardRow]:
        """`rows` (whose images `vectors` are) with their tags in the metadata and the document hash to match."""
        return [tagged(row, fields) for row, fields in zip(rows, self.tags(vectors))]

    def stored_tags(self, shards: ShardSet, entries: Iterable[tuple[str, ShardRow, int]], *,
                    progress: bool = False) -> dict[str, dict[str, list]]:
        """id -> tag fields for rows the shards hold (shard name, row, index), ranked from their stored vectors."""
        by_shard: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for name, row, index in entries:
            by_shard[name].append((row.id, index))
        out: dict[str, dict[str, list]] = {}
        with tqdm(total=sum(map(len, by_shard.values())), unit="doc", desc="tag", disable=not progress) as bar:
            for name, rows in by_shard.items():
                stored = shards.vectors(name)
                for start in range(0, len(rows), _TAG_CHUNK):
                    part = rows[start:start + _TAG_CHUNK]
                    vectors = np.asarray(stored[[index for _, index in part]], dtype=np.float32)
                    out.update(zip((doc_id for doc_id, _ in part), self.tags(vectors)))
                    bar.update(len(part))
        return out


def tagged(row: ShardRow, fields: Mapping[str, list]) -> ShardRow:
    """The row with `fields` added to its metadata and its document hash recomputed. A corpus field of the same
    name never gets here: `embed` and `tag` refuse it (`Tagger.check_metadata`); `tag` removes an earlier
    tagging's fields first."""
    metadata = {**row.metadata, **fields}
    return dataclasses.replace(row, metadata=metadata,
                               content_hash=document_hash(row.image_hash, row.text, metadata))


def recorded_specs(shards: ShardSet) -> list[TagSpec]:
    """The tagging the shards were last tagged with (`embed` keeps it on reruns without --tag)."""
    return [TagSpec.from_record(record) for record in shards.tagging]


def recorded_fields(shards: ShardSet) -> set[str]:
    """The fields tagging wrote into the shards' rows: the recorded tagging's, and those of a tagging begun and not
    finished (`ShardSet.tagging_begun`). No other field in a row is tagging's: the corpus gave it."""
    sets = {record["set"] for record in shards.tagging} | set(shards.tagging_begun)
    return {f for name in sets for f in (label_field(name), score_field(name))}


@dataclass(frozen=True, slots=True)
class RetagSummary:
    total: int
    retagged: int
    unchanged: int
    cleared: bool = False  # `tag --clear`: the changed documents lost their tags

    def describe(self) -> str:
        change = "with their tags removed" if self.cleared else "with new tags (stored vectors reused)"
        then = "run `clip-sidecar index` to load them" if self.retagged else "nothing to load"
        return f"{self.total} documents: {self.retagged} {change}, {self.unchanged} unchanged; {then}"


def retag_shards(root: Path, tagger: Tagger | None, *, shard_size: int = 4096, progress: bool = True) -> RetagSummary:
    """Tag every live document of the shards under `root` from its stored vector — no image is read —
    replacing the tags of earlier tagging; None removes every tag. Documents whose tags changed get a
    new row (their stored vectors, a new document hash); the manifest then records the tagging."""
    if not (Path(root) / "manifest.json").exists():  # before the lock, which would create the directory
        raise ShardError(f"{root} holds no shards (no manifest.json): run `clip-sidecar embed` first")
    with exclusive_writer(root):  # the manifest is read under the lock: no other job's update is lost
        return _retag(ShardSet(root), tagger, shard_size=shard_size, progress=progress)


def _retag(shards: ShardSet, tagger: Tagger | None, *, shard_size: int, progress: bool) -> RetagSummary:
    root = shards.root
    if tagger is not None and tagger.signature != shards.signature:
        raise ShardError(f"{root} holds vectors of {shards.signature.describe()}, not {tagger.signature.describe()}: "
                         "tag with the model the shards were embedded with (--model, --pretrained)")
    stale = recorded_fields(shards)
    entries = list(shards.live().values())
    if tagger is not None:  # before anything is written: a corpus field of a tag field's name would be lost
        tagger.check_metadata((row for _, row, _ in entries), tagged_fields=stale)
    fresh = tagger.stored_tags(shards, entries, progress=progress) if tagger else {}
    changed = []
    for name, row, index in entries:
        base = dataclasses.replace(row, metadata={k: v for k, v in row.metadata.items() if k not in stale})
        new = tagged(base, fresh.get(row.id, {}))
        if new.content_hash != row.content_hash:
            changed.append((new, name, index))
    if tagger is not None:
        shards.begin_tagging(tagger.set_names)
    shards.rewrite_rows(changed, shard_size=shard_size)
    shards.set_tagging(tagger.record() if tagger else [])
    summary = RetagSummary(total=len(entries), retagged=len(changed), unchanged=len(entries) - len(changed),
                           cleared=tagger is None)
    log.info("tag finished: %s", summary.describe())
    return summary
