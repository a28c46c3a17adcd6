"""`clip-sidecar prompts` (add, list, show, remove prompt sets) and `tag` (re-tag shards from their stored vectors)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from sidecar.cli.root import MODEL_FLAGS, PROMPT_FLAGS, coarse_model_options, prompt_sets_option, settings_from


@click.group()
def prompts() -> None:
    """Prompt sets: named, versioned labels with templates, for zero-shot classification
    (POST /v1/classify) and tagging (`embed --tag`, `tag`).

    \b
    A set is a JSON or YAML file:
      name: shapes
      version: 1
      templates: ["a photo of a {}", "a drawing of a {}"]
      labels: [circle, square, {name: star, templates: ["a {} shape"]}]
    or a CSV file with a `label` and an optional `template` column (one row per template).
    '{}' stands for the label: each of the set's templates needs one, a label's own may be a
    whole prompt; other braces ({0}, {label}) are refused, as are two labels of the same prompts,
    also as the model reads them: cut at its context length, or told apart only by case or
    spacing (a label with a prompt cut is named).
    A label's vector averages its templates' vectors (CLIP's template ensembling). Vectors are
    computed once per model and set, and again only when a template, a label or the version changes.
    """


@prompts.command("add")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="The set's name (default: the file's `name`; a CSV's file name). One FILE only.")
@click.option("--version", "version", help="The set's version (default: the file's, else 1). One FILE only.")
@prompt_sets_option
@coarse_model_options
def prompts_add(files: tuple[Path, ...], name: str | None, version: str | None, **kwargs: Any) -> None:
    """Add (or replace) the prompt sets in FILES, and embed their prompts with the configured model.
    Each line says whether the set was added, unchanged, or replaced (from which version, and what
    changed: labels added or removed, labels with other prompts).

    A running server classifies with a replaced set from its next request, no restart. Tags already
    written with it change only when `clip-sidecar tag SHARDS` (or the next `embed`) re-tags the
    shards, from their stored vectors, and `clip-sidecar index SHARDS` loads them."""
    from sidecar.model.encoder import load_encoder
    from sidecar.model.prompts import (
        PromptSetNotFound,
        PromptSetRegistry,
        PromptSetUnreadable,
        check_prompt_tokens,
        load_prompt_set,
    )

    if len(files) > 1 and (name or version):
        raise click.UsageError("--name and --version name one set: give one FILE with them")
    settings = settings_from(kwargs, MODEL_FLAGS + PROMPT_FLAGS)
    loaded = [load_prompt_set(path, name=name, version=version) for path in files]  # all valid before any is stored
    sources: dict[str, Path] = {}
    for path, prompt_set in zip(files, loaded):
        first = sources.setdefault(prompt_set.name, path)
        if first != path:  # the last would replace the others, which the output would show as stored too
            raise click.UsageError(f"{first} and {path} both hold prompt set {prompt_set.name!r}: give one of them, "
                                   "or add the other alone with --name")
    registry = PromptSetRegistry(settings.prompt_sets_dir)
    encoder = load_encoder(settings)
    cut = [check_prompt_tokens(prompt_set, encoder.prepare_texts, context_length=encoder.context_length,
                               model=encoder.name, source=str(path)) for path, prompt_set in zip(files, loaded)]
    for prompt_set, cut_labels in zip(loaded, cut):
        try:
            previous = registry.get(prompt_set.name)
            stored = "unchanged" if previous == prompt_set else prompt_set.changes_from(previous)
        except PromptSetUnreadable:
            stored = "replaced a stored set this version could not use"
        except PromptSetNotFound:
            stored = "added"
        registry.add(prompt_set)
        cached = registry.cached_vectors(prompt_set, model=encoder.name, weights=encoder.weights)
        started = time.perf_counter()
        registry.vectors(prompt_set, model=encoder.name, weights=encoder.weights, encode=encoder.encode_texts)
        vectors = (f"vectors by {encoder.name} already cached" if cached else
                   f"vectors by {encoder.name} computed in {time.perf_counter() - started:.2f} s")
        click.echo(f"{prompt_set.name}: version {prompt_set.version}, {len(prompt_set.labels)} labels, "
                   f"{prompt_set.prompt_count} prompts; {stored}, {vectors}"
                   + (f"; {len(cut_labels)} label{'s' * (len(cut_labels) != 1)} with a prompt cut at "
                      f"{encoder.name}'s {encoder.context_length}-token context (e.g. {cut_labels[0].name!r}): the "
                      "model sees none of its words past the cut" if cut_labels else ""))


@prompts.command("list")
@prompt_sets_option
def prompts_list(**kwargs: Any) -> None:
    """The stored prompt sets, with the models whose vectors of them are cached. A set's fingerprint (a hash of
    its labels and prompts) changes with any template or label, also where the version was not bumped."""
    from sidecar.model.prompts import PromptSetRegistry

    settings = settings_from(kwargs, PROMPT_FLAGS)
    summaries = PromptSetRegistry(settings.prompt_sets_dir).summaries()
    if not summaries:
        click.echo(f"no prompt sets in {settings.prompt_sets_dir} (add one: prompts add FILE)")
        return
    click.echo(f"{'name':<20}  {'version':<8}  {'labels':>6}  {'prompts':>7}  {'fingerprint':<23}  vectors cached for")
    for s in summaries:
        click.echo(f"{s.name:<20}  {s.version:<8}  {s.labels:>6}  {s.prompts:>7}  {s.fingerprint:<23}  "
                   f"{', '.join(s.models) or '-'}")


@prompts.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True,
              help="The set in its file form (what `prompts add` takes). The version is written as a string: a "
                   "set's version is a name, and a number in its file is read as the text it was written as (1.10 "
                   "is not 1.1), so version: 1 shows as \"1\", the same version.")
@prompt_sets_option
def prompts_show(name: str, as_json: bool, **kwargs: Any) -> None:
    """A prompt set's labels and templates."""
    from sidecar.model.prompts import PromptSetRegistry

    settings = settings_from(kwargs, PROMPT_FLAGS)
    prompt_set = PromptSetRegistry(settings.prompt_sets_dir).get(name)
    if as_json:
        click.echo(json.dumps(prompt_set.to_dict(), ensure_ascii=False, indent=2))
        return
    click.echo(f"{prompt_set.name}, version {prompt_set.version}: {len(prompt_set.labels)} labels, "
               f"{prompt_set.prompt_count} prompts, fingerprint {prompt_set.fingerprint}"
               + (f"\n{prompt_set.description}" if prompt_set.description else ""))
    click.echo(f"templates: {' | '.join(prompt_set.templates)}")
    for label in prompt_set.labels:
        own = "" if label.templates == prompt_set.templates else f"  (templates: {' | '.join(label.templates)})"
        click.echo(f"  {label.name}{own}")


@prompts.command("remove")
@click.argument("name")
@prompt_sets_option
def prompts_remove(name: str, **kwargs: Any) -> None:
    """Delete a prompt set and its cached vectors. Tags already written to shards stay; shards last tagged
    with it need `clip-sidecar tag SHARDS --clear` (or --tag other sets) before `embed` or `tag` runs on
    them without --tag."""
    from sidecar.model.prompts import PromptSetRegistry

    settings = settings_from(kwargs, PROMPT_FLAGS)
    PromptSetRegistry(settings.prompt_sets_dir).remove(name)
    click.echo(f"removed prompt set {name}")


def parse_tag_specs(values: tuple[str, ...]) -> list:
    """--tag values → TagSpecs (a usage error names the bad one)."""
    from sidecar.ingest.tagging import TagSpec, check_tag_specs

    try:
        specs = [TagSpec.parse(value) for value in values]
        check_tag_specs(specs)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tag") from exc
    return specs


TAG_HELP = ("Write the top labels of prompt set SET into each document's metadata (tag_SET, and their cosine scores "
            "in tag_SET_score): SET its best label, SET:3 the top 3, SET:0.25 every label scoring at least 0.25. "
            "Repeatable.")


@click.command("tag")
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("data/shards"))
@click.option("--tag", "tags", multiple=True, metavar="SET[:K|THRESHOLD]",
              help=TAG_HELP + " Default: the sets the shards were last tagged with, at their current versions.")
@click.option("--clear", is_flag=True,
              help="Remove every tag from the shards: the fields of the sets they were tagged with, and of a killed "
                   "run's. Corpus fields stay, tag_SET-named ones too.")
@click.option("--shard-size", type=click.IntRange(1), default=4096, show_default=True,
              help="Rows per shard file written for the documents whose tags change.")
@prompt_sets_option
@coarse_model_options
@click.pass_context
def tag(ctx: click.Context, shards: Path, tags: tuple[str, ...], clear: bool, shard_size: int, **kwargs: Any) -> None:
    """Re-tag SHARDS (from `embed`) with prompt sets, from the stored image vectors alone: no image is
    read or encoded, only the sets' prompts (once per set version). Documents whose tags change get a
    new row; `clip-sidecar index` then rewrites exactly those. Run it after a set changed
    (`prompts add`), or to tag shards embedded without --tag. It replaces the tags of the sets SHARDS
    were tagged with; a corpus field named as a tag field of another set (tag_SET), whatever its value,
    is refused before anything is written. One job at a time writes SHARDS: while an `embed` or another
    `tag` writes them, this is refused at once, naming that job.

    \b
      clip-sidecar tag data/shards --tag shapes --tag colors:0.3
      clip-sidecar tag data/shards          # the same sets again, after `prompts add` changed one
      clip-sidecar index data/shards
    """
    from sidecar.ingest.shards import ShardSet
    from sidecar.ingest.tagging import Tagger, recorded_specs, retag_shards
    from sidecar.model.encoder import load_encoder
    from sidecar.model.prompts import PromptSetRegistry

    if clear and tags:
        raise click.UsageError("--clear removes every tag: give it without --tag")
    specs = parse_tag_specs(tags)
    recorded_in = None if specs or clear else shards
    specs = specs or ([] if clear else recorded_specs(ShardSet(shards)))
    if not specs and not clear:
        raise click.UsageError(f"{shards} was never tagged: name the sets with --tag SET")
    settings = settings_from(kwargs, MODEL_FLAGS + PROMPT_FLAGS)
    tagger = None
    if specs:
        tagger = Tagger.load(specs, PromptSetRegistry(settings.prompt_sets_dir), load_encoder(settings),
                             recorded_in=recorded_in)
    summary = retag_shards(shards, tagger, shard_size=shard_size, progress=ctx.obj["progress"])
    click.echo(summary.describe())
