"""Prompt sets: named, versioned labels with prompt templates, their vectors cached per model, and zero-shot scoring.

A prompt set is data (a JSON, YAML or CSV file): a name, a version, labels, and one or more
templates per label ("a photo of {}", "a close-up photo of {}"). A label's vector is CLIP's
zero-shot recipe: the L2-normalised vectors of its prompts averaged, then normalised again
(template ensembling). Vectors are computed once per (model, weights, set) and kept on disk under
a key of the model, the weights, the set's version and its every prompt: a changed template or a
new version is embedded again; an unchanged set never is. The serving side (`/v1/classify`) and
the offline side (`embed --tag`, `tag`, `eval --prompts`) use the same registry and scoring.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from sidecar.errors import EncodeTimeout, UserFixable, not_utf8

if TYPE_CHECKING:  # the encoder module loads torch
    from sidecar.model.encoder import PreparedTexts

log = logging.getLogger(__name__)

# A set's name is a file name and part of metadata field names (`tag_<name>`) in both stores.
SET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DEFAULT_TEMPLATES = ("{}",)
SOURCE_SUFFIXES = (".json", ".yaml", ".yml", ".csv")
MAX_LABEL_CHARS = 1000  # a label is a word or a description, not a document

# texts -> their L2-normalised vectors [n, dim], in order (an Encoder's encode_texts, or the server's batcher)
EncodeTexts = Callable[[list[str]], np.ndarray]


class PromptSetError(ValueError, UserFixable):
    """A prompt set file or definition that cannot be used; the message names the file and the field."""


class PromptSetNotFound(PromptSetError):
    """No set of that name in the registry; the message lists the ones there are."""


class PromptSetUnreadable(PromptSetError):
    """A stored set this version cannot use (saved by a newer version, edited by hand, cut short). `problem`
    names the set and the field without the server's folder, for API clients; the message adds the file."""

    def __init__(self, name: str, path: Path, problem: str):
        super().__init__(f"{problem} ({path}); {UNREADABLE_REMEDY}")
        self.name = name
        self.problem = problem


UNREADABLE_REMEDY = ("store it again from its source file (`clip-sidecar prompts add FILE`, which replaces it) or "
                     "delete it (`clip-sidecar prompts remove NAME`)")


@dataclass(frozen=True, slots=True)
class Label:
    name: str
    templates: tuple[str, ...]  # each "{}" is replaced by the label; a template without one is the prompt itself

    @property
    def prompts(self) -> tuple[str, ...]:
        """The texts the model sees for this label."""
        return tuple(template.replace("{}", self.name) for template in self.templates)


@dataclass(frozen=True, slots=True)
class PromptSet:
    name: str
    # A name, not a number: one written as a number in a file is kept as the text it was written as
    # (_Written: 1.10 is not 1.1, 010 is not 8), and the file form (to_dict) and the API give it as that string.
    version: str
    labels: tuple[Label, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # the set's default, for labels without their own
    description: str = ""
    # fingerprint and vector_key, hashed once per set: the registry keeps a set until its file changes, and
    # every /v1/classify reads both (1.5 ms each for 1,000 labels of 3 templates).
    _digests: dict[tuple[str, ...], str] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def prompt_count(self) -> int:
        return sum(len(label.templates) for label in self.labels)

    @property
    def fingerprint(self) -> str:
        """What the set's results depend on besides the model: its labels and their every prompt, hashed. Reported
        beside the version, which is declared: a set whose templates changed under the same version has another."""
        if ("fingerprint",) not in self._digests:
            self._digests[("fingerprint",)] = "sha256:" + _digest([self._prompts()])[:16]
        return self._digests[("fingerprint",)]

    def vector_key(self, *, model: str, weights: str) -> str:
        """What the set's vectors depend on: the model, its weights, the version and every prompt."""
        if (model, weights) not in self._digests:
            self._digests[(model, weights)] = _digest([model, weights, self.version, self._prompts()])[:32]
        return self._digests[(model, weights)]

    def _prompts(self) -> list[list[Any]]:
        return [[label.name, label.prompts] for label in self.labels]

    def changes_from(self, old: PromptSet) -> str:
        """What differs from `old` (the set this one replaces), in a few words: what `prompts add` says."""
        names, old_names = set(self.label_names), set(old.label_names)
        old_prompts = {label.name: label.prompts for label in old.labels}
        changes = [f"{count} label{'s' * (count != 1)} {what}" for count, what in
                   ((len(names - old_names), "added"), (len(old_names - names), "removed"),
                    (sum(label.prompts != old_prompts[label.name] for label in self.labels if label.name in old_names),
                     "with other prompts")) if count]
        if not changes and self.label_names != old.label_names:
            changes.append("labels reordered")
        if self.description != old.description:
            changes.append("description changed")
        if self.version == old.version and self.fingerprint != old.fingerprint:
            # Clients that compare versions would take the two for the same prompts.
            changes.append(f"the same version, so only the fingerprint ({old.fingerprint} before) tells them apart")
        return f"replaced version {old.version}" + (f" ({'; '.join(changes)})" if changes else "")

    def to_dict(self) -> dict[str, Any]:
        """The file form (JSON/YAML); a label carries its own templates only where they differ from the set's."""
        labels: list[Any] = [label.name if label.templates == self.templates else
                             {"name": label.name, "templates": list(label.templates)} for label in self.labels]
        data: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.description:
            data["description"] = self.description
        data["templates"] = list(self.templates)
        data["labels"] = labels
        return data

    @classmethod
    def from_dict(cls, data: Any, *, source: str, name: str | None = None, version: str | None = None) -> PromptSet:
        """A set from its file form; `name` and `version`, where given, override the file's."""
        if not isinstance(data, dict):
            raise PromptSetError(f"{source}: a prompt set is an object with name, version, templates and labels")
        unknown = sorted(set(data) - {"name", "version", "description", "templates", "labels"})
        if unknown:
            raise PromptSetError(f"{source}: unknown field {unknown[0]!r}; a prompt set has name, version, "
                                 "description, templates and labels")
        set_name = _set_name(name if name is not None else data.get("name"), source=source)
        set_version = version if version is not None else data.get("version", "1")
        # Not blank and one line: `prompts list` shows it in a column, /v1/classify answers it.
        if isinstance(set_version, bool) or not isinstance(set_version, (str, int, float)) or \
                not str(set_version).strip() or not str(set_version).isprintable():
            raise PromptSetError(f"{source}: field 'version' must be a string or a number, printable and not blank, "
                                 f"got {set_version!r}")
        description = data.get("description") or ""
        if not isinstance(description, str):
            raise PromptSetError(f"{source}: field 'description' must be a string")
        templates = _templates(data.get("templates", list(DEFAULT_TEMPLATES)), where=f"{source}: field 'templates'")
        raw_labels = data.get("labels")
        if not isinstance(raw_labels, list) or not raw_labels:
            raise PromptSetError(f"{source}: field 'labels' must be a non-empty list of labels (a string, or "
                                 "{\"name\", \"templates\"})")
        labels = []
        for i, raw in enumerate(raw_labels):
            where = f"{source}: labels[{i}]"
            if isinstance(raw, dict):
                extra = sorted(set(raw) - {"name", "templates"})
                if extra:
                    raise PromptSetError(f"{where}: unknown field {extra[0]!r}; a label has name and templates")
                own = _templates(raw["templates"], where=f"{where}.templates") if "templates" in raw else templates
                labels.append(Label(name=_label_name(raw.get("name"), where=f"{where}.name"), templates=own))
            else:
                labels.append(Label(name=_label_name(raw, where=where), templates=templates))
        _check_unique(labels, source=source)
        return cls(name=set_name, version=getattr(set_version, "written", str(set_version)), labels=tuple(labels),
                   templates=templates, description=description)


def _digest(value: Any) -> str:
    canonical = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_prompt_set(path: Path, *, name: str | None = None, version: str | None = None) -> PromptSet:
    """A set from a .json, .yaml/.yml or .csv file. A CSV has a `label` column and optionally a
    `template` column (one template per row; a label's rows together make its templates); its name
    is `name` or the file's stem, its version `version` or "1"."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SOURCE_SUFFIXES:
        raise PromptSetError(f"{path}: a prompt set file is {', '.join(SOURCE_SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel's "CSV UTF-8" (and Notepad) begin with a BOM
    except OSError as exc:
        raise PromptSetError(f"{path}: cannot read it: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"{path}: {not_utf8(exc)}; save it as UTF-8") from exc
    if suffix == ".csv":
        prompt_set = _from_csv(text, source=str(path), name=name if name is not None else path.stem, version=version)
        _check_prompts(prompt_set, source=str(path), templates_field="column 'template'")
        return prompt_set
    if suffix == ".json":
        try:
            data = json.loads(text, parse_float=lambda written: _WrittenFloat.of(written, float(written)))
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{path}: not valid JSON: {exc}") from exc
    else:
        import yaml  # only for YAML files

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_constructor("tag:yaml.org,2002:float", lambda loader, node: _WrittenFloat.of(
            node.value, loader.construct_yaml_float(node)))
        Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: _WrittenInt.of(
            node.value, loader.construct_yaml_int(node)))
        try:
            data = yaml.load(text, Loader=Loader)  # safe_load's loader, its numbers keeping their text
        except yaml.YAMLError as exc:
            raise PromptSetError(f"{path}: not valid YAML: {exc}") from exc
    prompt_set = PromptSet.from_dict(data, source=str(path), name=name, version=version)
    _check_prompts(prompt_set, source=str(path), templates_field="field 'templates'")
    return prompt_set


def _check_prompts(prompt_set: PromptSet, *, source: str, templates_field: str) -> None:
    """Templates a file can hold that would silently give labels prompts that do not tell them apart. Checked
    where a file is added, not where a stored set is read: a set stored before keeps serving."""
    for label in prompt_set.labels:
        own = label.templates != prompt_set.templates
        where = f"{source}: {templates_field}" + (f" of label {label.name!r}" if own else "")
        for template in label.templates:
            if re.search(r"[{}]", template.replace("{}", "")):
                raise PromptSetError(f"{where}: template {template!r} has a brace that is not part of '{{}}': '{{}}' "
                                     "stands for the label (\"a photo of a {}\"); {0}, {label} or {{}} are not filled in "
                                     "but kept in the prompt as written")
            if not own and "{}" not in template:
                raise PromptSetError(f"{where}: template {template!r} has no '{{}}': a set's templates apply to "
                                     "every label, so each needs '{}' where the label goes (a whole prompt of one "
                                     "label's own goes in that label's templates)")
    twins = _first_twins(prompt_set.labels, [label.prompts for label in prompt_set.labels])
    if twins:
        raise PromptSetError(f"{source}: labels {twins[0].name!r} and {twins[1].name!r} have the same prompts "
                             f"({', '.join(map(repr, twins[1].prompts))}): their vectors would be identical, so "
                             "neither could rank above the other; give their templates '{}' for the label")


def check_prompt_tokens(prompt_set: PromptSet, prepare: Callable[[list[str]], PreparedTexts], *, context_length: int,
                        model: str, source: str) -> list[Label]:
    """The set's prompts as `model` reads them (`prepare`: its prepare_texts), checked where a file is added, as
    _check_prompts. Two labels whose prompts it reads as the same tokens (cut at its `context_length`, or told apart
    only by case or spacing, which open_clip's tokenizer drops) would get identical vectors, so neither could rank
    above the other: refused. Returns the labels with a prompt cut (the model sees none of its words past the cut)."""
    prompts = [prompt for label in prompt_set.labels for prompt in label.prompts]
    prepared = prepare(prompts)
    rows = iter(zip(np.asarray(prepared.tokens).tolist(), prepared.lengths))
    seen: list[tuple[tuple[int, ...], ...]] = []  # per label, the token ids of its prompts as the model sees them
    cut: list[Label] = []
    for label in prompt_set.labels:
        tokens, lengths = zip(*(next(rows) for _ in label.prompts))
        seen.append(tuple(map(tuple, tokens)))
        if max(lengths) > context_length:
            cut.append(label)
    twins = _first_twins(prompt_set.labels, seen)
    if twins:
        if any(label in cut for label in twins):
            how = (f"once {model} cuts them at its {context_length}-token context (e.g. {twins[1].prompts[0]!r})",
                   "shorten the templates or the labels so the words that tell the labels apart come first")
        else:  # open_clip's tokenizer reads text lowercased, its runs of spaces as one
            how = (f"as {model}'s tokenizer reads them (e.g. {twins[0].prompts[0]!r} and {twins[1].prompts[0]!r}: "
                   "it may not tell case or spacing apart)", "give the labels words that tell them apart")
        raise PromptSetError(f"{source}: labels {twins[0].name!r} and {twins[1].name!r} have the same prompts "
                             f"{how[0]}: their vectors would be identical, so neither could rank above the other; "
                             f"{how[1]}")
    return cut


def _first_twins(labels: Sequence[Label], keys: Sequence[Any]) -> tuple[Label, Label] | None:
    """The first label whose key (its prompts, as written or as tokens) an earlier label has, with that label."""
    first: dict[Any, Label] = {}
    for label, key in zip(labels, keys):
        other = first.setdefault(key, label)
        if other is not label:
            return other, label
    return None


class _Written:
    """A number read from a file, with its text: YAML and JSON read `version: 1.10` as 1.1, and YAML reads
    `version: 010` as 8 (an octal number), so a set bumped from 1.1 to 1.10 would read as unchanged, its
    version shown as 1.1, and one at 010 would show as 8."""

    written: str

    @classmethod
    def of(cls, written: str, value: float) -> Any:
        number = cls(value)
        number.written = written
        return number


class _WrittenFloat(_Written, float):
    pass


class _WrittenInt(_Written, int):
    pass


def _from_csv(text: str, *, source: str, name: str, version: str | None) -> PromptSet:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # not splitlines(): a quoted cell may hold a newline
    columns = set(reader.fieldnames or [])
    if "label" not in columns or columns - {"label", "template"}:
        raise PromptSetError(f"{source}: a CSV prompt set has the columns label and (optionally) template; "
                             f"found {', '.join(sorted(columns)) or 'none'}")
    templates: dict[str, list[str]] = {}
    for row in reader:
        label = _label_name(row.get("label"), where=f"{source}:{reader.line_num}: label")
        template = (row.get("template") or "").strip()
        templates.setdefault(label, [])
        if template:
            templates[label].append(template)
    shared = {tuple(own) for own in templates.values()}
    # Every label has the same templates, each with the label's place: the set's. Whole prompts stay the labels'.
    if len(shared) == 1 and next(iter(shared)) and all("{}" in t for t in next(iter(shared))):
        return PromptSet.from_dict({"name": name, "version": version or "1", "templates": list(next(iter(shared))),
                                    "labels": list(templates)}, source=source)
    labels = [{"name": label, "templates": own} if own else label for label, own in templates.items()]
    return PromptSet.from_dict({"name": name, "version": version or "1", "labels": labels}, source=source)


def _set_name(value: Any, *, source: str) -> str:
    if not isinstance(value, str) or not SET_NAME.match(value):
        raise PromptSetError(f"{source}: the set's name must be 1-64 characters of a-z, 0-9, '_' and '-', starting "
                             f"with a letter or digit (it names a file and the metadata field tag_<name>); "
                             f"got {value!r}")
    return value


def _label_name(value: Any, *, where: str) -> str:
    if value is None or isinstance(value, (bool, int, float)):
        # YAML reads yes, no, on, off, null and numbers unquoted as such: the label the file means is a word.
        raise PromptSetError(f"{where}: a label is a non-empty string, got {value!r}; in YAML, quote a label that "
                             "reads as a boolean, a number or null (\"yes\", \"no\", \"on\", \"off\", \"1\")")
    if not isinstance(value, str) or not value.strip():
        raise PromptSetError(f"{where}: a label is a non-empty string, got {value!r}")
    value = value.strip()
    if not value.isprintable():  # `prompts show` and `list` lay labels out in lines; tags hold them as values
        raise PromptSetError(f"{where}: a label is one line of printable characters, got {value!r}")
    if len(value) > MAX_LABEL_CHARS:
        raise PromptSetError(f"{where}: a label has at most {MAX_LABEL_CHARS} characters, got {len(value)}")
    return value


def _templates(value: Any, *, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
        raise PromptSetError(f"{where}: templates are a non-empty list of non-empty strings, '{{}}' standing for the "
                             "label (e.g. \"a photo of {}\")")
    return tuple(dict.fromkeys(t.strip() for t in value))


def _check_unique(labels: Sequence[Label], *, source: str) -> None:
    seen: set[str] = set()
    for label in labels:
        if label.name in seen:
            raise PromptSetError(f"{source}: label {label.name!r} appears twice; labels are unique within a set")
        seen.add(label.name)


# ---- vectors -------------------------------------------------------------------------------------

def ensemble_vectors(prompt_set: PromptSet, encode: EncodeTexts) -> np.ndarray:
    """One L2-normalised vector per label [labels, dim]: the mean of its prompts' normalised vectors,
    normalised again (CLIP's zero-shot template ensembling). All prompts go to `encode` in one call."""
    prompts = [prompt for label in prompt_set.labels for prompt in label.prompts]
    vectors = np.asarray(encode(prompts), dtype=np.float32)
    if len(vectors) != len(prompts):
        raise RuntimeError(f"encoding {len(prompts)} prompts returned {len(vectors)} vectors")
    starts = np.cumsum([0] + [len(label.templates) for label in prompt_set.labels[:-1]])
    counts = np.array([len(label.templates) for label in prompt_set.labels], dtype=np.float32)
    means = np.add.reduceat(vectors, starts, axis=0) / counts[:, None]
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True, slots=True)
class SetSummary:
    name: str
    version: str
    fingerprint: str  # PromptSet.fingerprint
    labels: int
    prompts: int
    description: str
    models: tuple[str, ...]  # "model (weights)" whose vectors are on disk for the current definition


class PromptSetRegistry:
    """The prompt sets under `root`: `<name>.json` per set (the file form), and their vectors under
    `vectors/<name>/` (one .npz per model and weights, holding the key it was computed for; a changed
    set overwrites it). Safe to use from many threads and processes: files are replaced atomically,
    and a set changed on disk (`prompts add` beside a running server) is read again on its next use."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        # name -> (file stat, the set, or why its file cannot be used: told once per version of the file)
        self._sets: dict[str, tuple[tuple[int, int, int], PromptSet | str]] = {}
        self._vectors: dict[tuple[str, str], tuple[str, np.ndarray]] = {}  # (name, model file) -> (key, vectors)
        self._computing: dict[tuple[str, str], threading.Lock] = {}

    # ---- definitions ----
    def _path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if SET_NAME.match(p.stem))

    def get(self, name: str) -> PromptSet:
        """The set as its file holds it now (re-read when the file changed); PromptSetUnreadable where
        this version cannot use the file."""
        path = self._path(name) if SET_NAME.match(name) else None
        try:
            stat = path.stat() if path is not None else None
        except (FileNotFoundError, NotADirectoryError):  # the folder is a file: no set there (`add` names it)
            stat = None
        if stat is None:
            raise self._not_found(name)
        marker = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            cached = self._sets.get(name)
        if cached is None or cached[0] != marker:
            cached = (marker, self._read(name, path))
            with self._lock:
                self._sets[name] = cached
        if isinstance(cached[1], str):
            raise PromptSetUnreadable(name, path, cached[1])
        return cached[1]

    def _read(self, name: str, path: Path) -> PromptSet | str:
        """The set in the file, or what makes it unusable (logged: the operator's to repair)."""
        source = f"stored prompt set {name!r}"
        try:
            prompt_set = PromptSet.from_dict(json.loads(path.read_text(encoding="utf-8")), source=source)
            if prompt_set.name == name:
                return prompt_set
            # A file renamed or edited by hand: under both names the listing would show it twice, and its
            # vectors and tags (tag_<name>) would be those of the other set.
            problem = (f"{source}: field 'name' is {prompt_set.name!r}, not the name it is stored under ({name}.json)")
        except FileNotFoundError:  # removed since the stat (`prompts remove` beside a server)
            raise self._not_found(name) from None
        except PromptSetError as exc:
            problem = str(exc)
        except json.JSONDecodeError as exc:
            problem = f"{source}: not valid JSON: {exc}"
        except UnicodeDecodeError as exc:
            problem = f"{source}: {not_utf8(exc)}"
        except OSError as exc:
            problem = f"{source}: cannot read it: {exc.strerror}"
        log.warning("%s", PromptSetUnreadable(name, path, problem))
        return problem

    def _not_found(self, name: str) -> PromptSetNotFound:
        available = self.names()
        return PromptSetNotFound(f"no prompt set named {name!r} in {self.root}; "
                                 + (f"available: {', '.join(available)}" if available else
                                    "none yet (add one with `clip-sidecar prompts add FILE`)"))

    def sets(self) -> list[PromptSet]:
        """Every stored set, by name; one removed while they are read, or one this version cannot use
        (logged), is left out, not an error."""
        found = []
        for name in self.names():
            try:
                found.append(self.get(name))
            except (PromptSetNotFound, PromptSetUnreadable):
                continue
        return found

    def add(self, prompt_set: PromptSet) -> bool:
        """Store the set (replacing one of the same name, also one this version cannot use); False when the
        stored one is identical."""
        path = self._path(prompt_set.name)
        try:
            if self.get(prompt_set.name) == prompt_set:
                return False
        except (PromptSetNotFound, PromptSetUnreadable):
            pass
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, lambda fh: fh.write(json.dumps(prompt_set.to_dict(), ensure_ascii=False,
                                                               indent=2).encode("utf-8")))
        return True

    def remove(self, name: str) -> None:
        """Delete the set and its vectors (PromptSetNotFound if there is none), also one this version cannot use."""
        if not SET_NAME.match(name):  # a name is never a path
            raise self._not_found(name)
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            raise self._not_found(name) from None
        folder = self.root / "vectors" / name
        if folder.is_dir():
            for file in folder.glob("*"):
                file.unlink()
            folder.rmdir()
        with self._lock:
            self._sets.pop(name, None)
            for key in [k for k in self._vectors if k[0] == name]:
                del self._vectors[key]

    def summaries(self) -> list[SetSummary]:
        out = []
        for prompt_set in self.sets():
            models = []
            for file in sorted((self.root / "vectors" / prompt_set.name).glob("*.npz")):
                stored = _read_vectors(file)
                if stored is not None and stored[0] == prompt_set.vector_key(model=stored[2], weights=stored[3]):
                    models.append(f"{stored[2]} ({stored[3]})")
            out.append(SetSummary(name=prompt_set.name, version=prompt_set.version, fingerprint=prompt_set.fingerprint,
                                  labels=len(prompt_set.labels),
                                  prompts=prompt_set.prompt_count, description=prompt_set.description,
                                  models=tuple(models)))
        return out

    # ---- vectors ----
    def vectors(self, prompt_set: PromptSet, *, model: str, weights: str, encode: EncodeTexts,
                wait_s: float | None = None) -> np.ndarray:
        """The set's label vectors by this model and weights: from memory, else from disk, else
        computed by `encode` (once: concurrent callers wait for the first) and written to disk.
        `wait_s`: how long a caller waits for another's computation (None: as long as it takes), then
        EncodeTimeout — a request's limit; the computation goes on, and a later call finds its vectors."""
        key = prompt_set.vector_key(model=model, weights=weights)
        slot = (prompt_set.name, _model_file(model, weights))
        with self._lock:
            cached = self._vectors.get(slot)
            if cached is not None and cached[0] == key:
                return cached[1]
            computing = self._computing.setdefault(slot, threading.Lock())
        if not computing.acquire(timeout=-1 if wait_s is None else wait_s):
            raise EncodeTimeout(f"prompt set {prompt_set.name!r}: its {prompt_set.prompt_count} prompts are being "
                                f"embedded for its first use, for longer than request_timeout_s={wait_s}; try again "
                                "shortly (`clip-sidecar prompts add` embeds a set before it is used)")
        try:
            with self._lock:
                cached = self._vectors.get(slot)
            if cached is not None and cached[0] == key:
                return cached[1]
            file = self.root / "vectors" / slot[0] / slot[1]
            stored = _read_vectors(file)
            if stored is not None and stored[0] == key:
                vectors = stored[1]
            else:
                started = time.perf_counter()
                vectors = ensemble_vectors(prompt_set, encode)
                log.info("prompt set %s (version %s): %d labels, %d prompts embedded by %s in %.2f s",
                         prompt_set.name, prompt_set.version, len(prompt_set.labels), prompt_set.prompt_count,
                         model, time.perf_counter() - started)
                self._write_vectors(file, key=key, vectors=vectors, model=model, weights=weights)
            with self._lock:
                self._vectors[slot] = (key, vectors)
            return vectors
        finally:
            computing.release()

    def cached_vectors(self, prompt_set: PromptSet, *, model: str, weights: str) -> bool:
        """Whether the set's current vectors by this model are on disk (nothing to compute)."""
        stored = _read_vectors(self.root / "vectors" / prompt_set.name / _model_file(model, weights))
        return stored is not None and stored[0] == prompt_set.vector_key(model=model, weights=weights)

    def _write_vectors(self, file: Path, *, key: str, vectors: np.ndarray, model: str, weights: str) -> None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(file, lambda fh: np.savez(fh, vectors=vectors, key=np.array(key), model=np.array(model),
                                                        weights=np.array(weights)))
        except OSError as exc:  # a read-only registry still serves, computing once per process
            log.warning("prompt set vectors kept in memory only: cannot write %s: %s", file, exc)


def _model_file(model: str, weights: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model)[:48]
    return f"{slug}-{hashlib.sha256(f'{model}|{weights}'.encode('utf-8')).hexdigest()[:12]}.npz"


def _read_vectors(file: Path) -> tuple[str, np.ndarray, str, str] | None:
    """(key, vectors, model, weights) of a vector file, or None where there is none (or it is unreadable)."""
    try:
        with np.load(file, allow_pickle=False) as data:
            return str(data["key"]), np.asarray(data["vectors"], dtype=np.float32), str(data["model"]), \
                str(data["weights"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable prompt set vectors %s (%s); computing them again", file, exc)
        return None


def _write_atomically(path: Path, write: Callable[[Any], Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- zero-shot scoring ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LabelScore:
    label: str
    score: float  # cosine similarity of the input's vector and the label's
    probability: float  # softmax over every label of the set, at the model's logit scale


def rank_labels(vectors: np.ndarray, label_vectors: np.ndarray, labels: Sequence[str], *, logit_scale: float,
                k: int | None = None, threshold: float | None = None) -> list[list[LabelScore]]:
    """Per input vector, its labels best first: the top `k` (every label when None), of those only the
    ones scoring at least `threshold` where one is given (multi-label tagging)."""
    if len(labels) != len(label_vectors):
        raise ValueError(f"{len(labels)} labels for {len(label_vectors)} label vectors")
    scores = _label_scores(vectors, label_vectors)
    probabilities = _softmax(logit_scale * scores)
    kept = np.ones(scores.shape, dtype=bool) if threshold is None else _reaching(scores, threshold)
    k = len(labels) if k is None else min(k, len(labels))
    if k < len(labels):
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(len(labels)), scores.shape)
    ranked = []
    for row, candidates in enumerate(top):
        order = candidates[np.lexsort((candidates, -scores[row, candidates]))]  # ties: the set's order
        ranked.append([LabelScore(label=labels[j], score=float(scores[row, j]), probability=float(probabilities[row, j]))
                       for j in order if kept[row, j]])
    return ranked


def count_reaching(vectors: np.ndarray, label_vectors: np.ndarray, *, threshold: float) -> np.ndarray:
    """Per input vector, how many labels score at least `threshold`: what rank_labels keeps before its `k` cut."""
    return np.count_nonzero(_reaching(_label_scores(vectors, label_vectors), threshold), axis=1)


def _label_scores(vectors: np.ndarray, label_vectors: np.ndarray) -> np.ndarray:
    """[inputs, labels]: the cosine similarity of each input's vector and each label's (both L2-normalised)."""
    # A float32 BLAS product's last bits depend on how many rows it multiplies at once (~1e-8 apart), which moved a
    # tag's score rounded to 4 decimals or a threshold's cut between runs that read the same vector in other batches
    # (`tag` rerun over another shard layout), rewriting rows nothing had changed. In float64 each product of two
    # float32 values is exact and the sums differ by ~1e-16: below float32's resolution but for scores near 0, and
    # ~1e-12 short of moving a 4-decimal score. np.einsum (one order, every bit the same) took ×4–8 as long for a
    # 1,000-label set, where the stage would rival a GPU's embed rate (bench/label_scores.py).
    products = np.asarray(vectors, dtype=np.float64) @ np.asarray(label_vectors, dtype=np.float64).T
    return products.astype(np.float32)


def _reaching(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Which scores clear a `threshold`: the one rule of rank_labels' cut and count_reaching's count."""
    return scores >= threshold


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
