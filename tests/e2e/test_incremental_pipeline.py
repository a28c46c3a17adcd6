"""A property of the offline pipeline: whatever edits a corpus goes through (images added, repainted, spoilt,
deleted, renamed; titles and metadata edited) and whichever `embed` and `index` runs come between, the embedded
store after a final `embed` + `index` equals what a fresh full `embed` + `index` of the final corpus gives. The
real CLI on real JPEG files, in a folder or a JSONL or CSV manifest, with and without `--tag`."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from PIL import Image

from sidecar.ingest.tagging import label_field, score_field
from sidecar.model.synthetic import sample_items
from sidecar.stores.embedded import EmbeddedStore
from tests.support import cli_ok

# Title words: few, so that titles share words and a BM25 query for an old title's word tells whether the
# store still answers with the document that had it.
WORDS = ("amber", "birch", "cobalt", "dune", "ember", "fjord")
BRANDS = ("acme", "globex", "initech")
PIXELS = 40  # the images' side: tiny, so a step costs the model little
THUMBNAIL = "16"  # --thumbnail-size, once a run has asked for thumbnails, and of the fresh build
TAG_SET = "shapes"
TITLES = st.none() | st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join)
SEEDS = st.integers(0, 12)  # few pictures: two items often hold the very same bytes


@dataclass(frozen=True)
class Item:
    """One item of the corpus as the test wrote it."""

    file: str  # relative to the corpus folder (a folder corpus: also the id)
    seed: int  # its picture: sample_items(1, seed=seed)
    title: str | None  # a folder's caption .txt (None: none, the text is the file's stem); a manifest's text
    brand: str | None = None  # metadata (manifests only)
    broken: bool = False  # its file holds bytes that are no image


def write_image(path: Path, item: Item) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if item.broken:
        path.write_bytes(b"not an image at all")
        return
    sample_items(1, seed=item.seed, size=PIXELS)[0].image.save(path, quality=90)


def assert_same_picture(got: bytes | None, want: bytes | None, doc_id: str) -> None:
    """Two thumbnails of one image: not byte-equal, as a thumbnail is made from the model's decode when `embed`
    encodes the image, from the file when shards get theirs later. Two of one picture (SEEDS) differ by at most
    6 levels on average, two of different pictures by 11 or more."""
    assert (got is None) == (want is None), doc_id
    if got is not None:
        with Image.open(io.BytesIO(got)) as a, Image.open(io.BytesIO(want)) as b:
            assert a.size == b.size, doc_id
            assert np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean() < 8, doc_id


class IncrementalPipeline(RuleBasedStateMachine):
    """The corpus the test keeps (id -> Item) and the two directories an incremental user keeps (shards,
    store), under `base`; `base` and `prompt_sets` (a folder holding the set `shapes`) are set by the test."""

    base: Path
    prompt_sets: Path

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(dir=self.base))
        self.corpus = self.root / "corpus"
        self.corpus.mkdir()
        self.items: dict[str, Item] = {}
        self.names = 0
        self.kind = "folder"
        self.tags = False
        self.thumbnails = False  # whether the shards have been asked for thumbnails
        self.embedded: dict[str, tuple[str, dict]] | None = None  # what the last embed saw: id -> (text, metadata)
        self.indexed: dict[str, tuple[str, dict]] | None = None  # what the store should hold since the last index

    # -- the corpus ----------------------------------------------------------------------------------

    def new_name(self, suffix: str, folder: str) -> str:
        self.names += 1
        return f"{folder}img{self.names}{suffix}"

    def source(self) -> Path:
        return self.corpus if self.kind == "folder" else self.corpus / f"manifest.{self.kind}"

    def write_manifest(self) -> None:
        if self.kind == "jsonl":
            self.source().write_text("".join(
                json.dumps({"id": item_id, "path": item.file, "text": item.title or "",
                            "metadata": {"brand": item.brand} if item.brand else {}}) + "\n"
                for item_id, item in self.items.items()))
        elif self.kind == "csv":
            with self.source().open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["id", "path", "text", "brand"])
                writer.writerows([item_id, item.file, item.title or "", item.brand or ""]
                                 for item_id, item in self.items.items())

    def caption(self, item: Item) -> Path:
        return (self.corpus / item.file).with_suffix(".txt")

    def put(self, item_id: str, item: Item) -> None:
        """Write the item's image, caption and manifest row (replacing the id's earlier ones)."""
        old = self.items.get(item_id)
        if old is not None and old.file != item.file:
            self.remove(item_id)
        write_image(self.corpus / item.file, item)
        if self.kind == "folder":
            if item.title is None:
                self.caption(item).unlink(missing_ok=True)
            else:
                self.caption(item).write_text(item.title)
        self.items[item_id] = item
        self.write_manifest()

    def remove(self, item_id: str) -> None:
        item = self.items.pop(item_id)
        (self.corpus / item.file).unlink()
        if self.kind == "folder":
            self.caption(item).unlink(missing_ok=True)
        self.write_manifest()

    def expected(self) -> dict[str, tuple[str, dict]]:
        """id -> (text, metadata without tags) of every usable item, as the corpus reader reads them."""
        out = {}
        for item_id, item in self.items.items():
            if item.broken:
                continue  # unusable: listed in errors.jsonl, never stored
            if self.kind == "folder":
                text = item.title if item.title is not None else \
                    Path(item.file).stem.replace("_", " ").replace("-", " ")
            else:
                text = item.title or ""
            out[item_id] = (text, {"brand": item.brand} if item.brand else {})
        return out

    # -- rules ---------------------------------------------------------------------------------------

    @initialize(kind=st.sampled_from(["folder", "jsonl", "csv"]), tags=st.booleans(),
                seeds=st.lists(SEEDS, min_size=1, max_size=4))
    def start(self, kind: str, tags: bool, seeds: list[int]) -> None:
        self.kind, self.tags = kind, tags
        for seed in seeds:
            self.add(seed=seed, title=None, brand=None, suffix=".jpg", folder="")

    @rule(seed=SEEDS, title=TITLES, brand=st.none() | st.sampled_from(BRANDS), suffix=st.sampled_from([".jpg", ".png"]),
          folder=st.sampled_from(["", "sub/"]))
    def add(self, seed: int, title: str | None, brand: str | None, suffix: str, folder: str) -> None:
        file = self.new_name(suffix, folder)
        item_id = file if self.kind == "folder" else f"doc{self.names}"
        self.put(item_id, Item(file=file, seed=seed, title=title, brand=brand if self.kind != "folder" else None))

    @precondition(lambda self: self.items)
    @rule(data=st.data(), seed=SEEDS)
    def repaint(self, data: st.DataObject, seed: int) -> None:
        """New pixels under the same name (a broken file fixed, too); the same seed rewrites the same bytes."""
        item_id = data.draw(st.sampled_from(sorted(self.items)), label="item")
        self.put(item_id, replace(self.items[item_id], seed=seed, broken=False))

    @precondition(lambda self: self.items)
    @rule(data=st.data())
    def spoil(self, data: st.DataObject) -> None:
        item_id = data.draw(st.sampled_from(sorted(self.items)), label="item")
        self.put(item_id, replace(self.items[item_id], broken=True))

    @precondition(lambda self: self.items)
    @rule(data=st.data(), title=TITLES)
    def retitle(self, data: st.DataObject, title: str | None) -> None:
        item_id = data.draw(st.sampled_from(sorted(self.items)), label="item")
        self.put(item_id, replace(self.items[item_id], title=title))

    @precondition(lambda self: self.items and self.kind != "folder")
    @rule(data=st.data(), brand=st.none() | st.sampled_from(BRANDS))
    def rebrand(self, data: st.DataObject, brand: str | None) -> None:
        item_id = data.draw(st.sampled_from(sorted(self.items)), label="item")
        self.put(item_id, replace(self.items[item_id], brand=brand))

    @precondition(lambda self: self.items)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        self.remove(data.draw(st.sampled_from(sorted(self.items)), label="item"))

    @precondition(lambda self: self.items)
    @rule(data=st.data(), new_id=st.booleans())
    def rename(self, data: st.DataObject, new_id: bool) -> None:
        """A folder's file moved (a new id); a manifest's item under a new id, or its file moved under the same id."""
        item_id = data.draw(st.sampled_from(sorted(self.items)), label="item")
        if self.kind != "folder" and new_id:
            self.names += 1
            self.items[f"doc{self.names}"] = self.items.pop(item_id)
            self.write_manifest()
            return
        moved = replace(self.items[item_id], file=self.new_name(Path(self.items[item_id].file).suffix, ""))
        if self.kind == "folder":
            self.remove(item_id)
            self.put(moved.file, moved)
        else:
            self.put(item_id, moved)

    @rule(batch_size=st.sampled_from(["1", "3", "256"]), shard_size=st.sampled_from(["1", "2", "4096"]),
          tag=st.booleans(), thumbnails=st.booleans())
    def embed(self, batch_size: str, shard_size: str, tag: bool, thumbnails: bool) -> None:
        """Without --tag, embed keeps the tagging the shards were last tagged with. Thumbnails: none until a
        run asks for them (shards written without them get theirs then), that size from then on."""
        self.thumbnails = self.thumbnails or thumbnails
        self.run_embed(self.root / "shards", ["--batch-size", batch_size, "--shard-size", shard_size,
                                              "--thumbnail-size", THUMBNAIL if self.thumbnails else "0"],
                       tag=self.tags and tag)
        self.embedded = self.expected()

    @precondition(lambda self: self.embedded is not None)
    @rule()
    def index(self) -> None:
        cli_ok("index", str(self.root / "shards"), "--store-path", str(self.root / "store"))
        self.indexed = self.embedded

    @rule(tag=st.booleans())
    def embed_and_index(self, tag: bool) -> None:
        self.embed(batch_size="256", shard_size="4096", tag=tag, thumbnails=self.thumbnails)
        self.index()

    def run_embed(self, out: Path, args: list[str], *, tag: bool) -> None:
        # --prompt-sets every time, as SIDECAR_PROMPT_SETS_DIR would give it: a rerun without --tag tags with the
        # sets the shards were last tagged with, found there.
        # --allow-empty: the machine may delete every item, which a fresh build of the empty corpus must equal.
        cli_ok("embed", str(self.source()), "--out", str(out), "--workers", "0", "--allow-empty", "--prompt-sets",
               str(self.prompt_sets), *args, *(["--tag", TAG_SET] if tag else []))

    # -- checks --------------------------------------------------------------------------------------

    @invariant()
    def the_store_holds_what_the_last_embed_saw(self) -> None:
        """Between the final checks: after `index`, the store holds the corpus as the last `embed` read it."""
        if self.indexed is None:
            return
        with EmbeddedStore(self.root / "store") as store:
            stored = {doc.id: (doc.text, self.untagged(doc.metadata))
                      for doc in store.fetch(sorted(store.content_hashes()), vectors=False)}
        assert stored == self.indexed

    def untagged(self, metadata: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in metadata.items() if key not in (label_field(TAG_SET), score_field(TAG_SET))}

    def teardown(self) -> None:
        try:  # a user's last embed + index, then a fresh build beside it
            self.embed(batch_size="256", shard_size="4096", tag=True, thumbnails=True)
            self.index()
            self.run_embed(self.root / "fresh-shards", ["--thumbnail-size", THUMBNAIL], tag=self.tags)
            cli_ok("index", str(self.root / "fresh-shards"), "--store-path", str(self.root / "fresh-store"))
            self.assert_stores_equal()
        finally:
            shutil.rmtree(self.root)

    def assert_stores_equal(self) -> None:
        queries = sorted({word for text, _ in self.expected().values() for word in text.split()} | set(WORDS))
        with EmbeddedStore(self.root / "store") as kept, EmbeddedStore(self.root / "fresh-store") as fresh:
            ids = sorted(fresh.content_hashes())
            assert sorted(kept.content_hashes()) == ids == sorted(self.expected())
            assert kept.count() == fresh.count() == len(ids)
            if not self.tags:  # tag scores come from vectors equal only to float tolerance
                assert kept.content_hashes() == fresh.content_hashes()
            for got, want in zip(kept.fetch(ids), fresh.fetch(ids)):
                assert (got.id, got.text) == (want.id, want.text)
                assert self.untagged(got.metadata) == self.untagged(want.metadata) == self.expected()[got.id][1]
                if self.tags:
                    assert got.metadata[label_field(TAG_SET)] == want.metadata[label_field(TAG_SET)], got.id
                    np.testing.assert_allclose(got.metadata[score_field(TAG_SET)],
                                               want.metadata[score_field(TAG_SET)], atol=2e-4)
                np.testing.assert_allclose(got.vector, want.vector, atol=1e-5, err_msg=got.id)
                assert_same_picture(kept.thumbnail(got.id), fresh.thumbnail(got.id), got.id)
                nearest = kept.vector_search(got.vector, 1)
                assert nearest and nearest[0].score == pytest.approx(1.0, abs=1e-4), got.id
            for word in queries:  # the current titles are found, old ones not
                assert sorted(hit.id for hit in kept.text_search(word, 100)) == \
                    sorted(hit.id for hit in fresh.text_search(word, 100)), word
            assert {name: counts for name, counts in kept.facets(size=100).items() if name != score_field(TAG_SET)} == \
                {name: counts for name, counts in fresh.facets(size=100).items() if name != score_field(TAG_SET)}
            report = kept.check()
            assert report.clean, report.describe()


INCREMENTAL = settings(max_examples=15, stateful_step_count=10, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.too_slow])


def test_incremental_embed_and_index_leave_the_store_a_fresh_build_of_the_final_corpus_gives(tmp_path,
                                                                                             example_prompt_sets):
    class Pipeline(IncrementalPipeline):
        base = tmp_path
        prompt_sets = example_prompt_sets

    run_state_machine_as_test(Pipeline, settings=INCREMENTAL)
