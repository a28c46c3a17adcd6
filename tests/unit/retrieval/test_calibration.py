"""Calibrating the search effort for a recall target on a real embedded store: the effort chosen reaches
the target on fresh queries, the one below it does not, the store applies it, and it is redone after
large changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sidecar.retrieval.calibration import calibrate, recalibrate_if_changed, wilson_lower_bound
from sidecar.retrieval.evaluation import found_of_exact
from sidecar.stores.embedded import EmbeddedStore
from sidecar.types import Document, ModelSignature
from tests.support import stored_copies, unit_vectors

DIM = 64
SIGNATURE = ModelSignature(model="synthetic", weights="uniform", dim=DIM)


def uniform(n: int, *, seed: int) -> np.ndarray:
    """Uniformly random unit vectors: HNSW's worst case, where the effort matters."""
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def recall_at_10(store: EmbeddedStore, queries: np.ndarray, **options) -> float:
    return float(np.mean([found_of_exact(store.vector_search(q, 10, **options),
                                         store.vector_search(q, 10, exact=True)) / 10 for q in queries]))


@pytest.fixture(scope="module")
def uniform_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("uniform-store")
    with EmbeddedStore(path) as store:
        store.claim(SIGNATURE)
        store.upsert([Document(id=f"d{i}", vector=v) for i, v in enumerate(uniform(8000, seed=1))])
    return path


def test_wilson_lower_bound_is_below_the_observed_share_and_tightens_with_more_samples():
    assert wilson_lower_bound(99, 100) < 0.99
    assert wilson_lower_bound(99, 100) < wilson_lower_bound(990, 1000) < wilson_lower_bound(9900, 10000) < 0.99
    assert wilson_lower_bound(0, 0) == 0.0


def test_the_chosen_effort_reaches_the_target_on_fresh_queries_and_the_one_below_it_does_not(uniform_store):
    fresh = uniform(200, seed=2)
    # A low fixed ef_search (16): the recall a target is there to fix.
    with EmbeddedStore(uniform_store, ef_search=16, target_recall=0.95) as store:
        # ANN only: whether exact search is as fast is a timing, which a test on a shared machine cannot decide.
        # 10 deep, as the fresh queries below search.
        effort = calibrate(store, target_recall=0.95, k=10, depth=10, queries=150, seed=0, allow_exact=False)
        assert effort.ef_search is not None, effort.describe()
        below = [p for p in effort.curve if p.ef_search < effort.ef_search]
        assert below and max(below, key=lambda p: p.ef_search).lower_bound < 0.95, effort.describe()
        assert recall_at_10(store, fresh) < 0.9  # before: the fixed ef_search
        store.effort.save(effort)
        # Queries that name no ef_search now get the calibrated one, and reach the target on fresh draws.
        assert store.effort.ef_search(None) == effort.ef_search
        assert recall_at_10(store, fresh) >= 0.95 - 0.01  # 200 queries: within a point of the sampling error
    with EmbeddedStore(uniform_store, target_recall=0.95) as reopened:  # another process: read from the store
        assert reopened.effort.ef_search(None) == effort.ef_search
    with EmbeddedStore(uniform_store, target_recall=0.9) as other_target:  # a calibration for another target
        assert other_target.effort.applied() is None
        assert other_target.effort.ef_search(None) == other_target.effort.default_ef
        assert "calibrate" in other_target.effort.status()["note"]


def test_calibration_measures_searches_as_deep_as_the_candidates_and_no_effort_under_that_depth(tmp_path,
                                                                                                 monkeypatch):
    # An easy target on a small store: every effort reaches it. A search asks for its candidates (N, 30
    # here) and the store searches at least N wide, so efforts under N measure as N; were they tried, the
    # bisection would go down to ef_search 1, an effort with no effect on the searches that ask for N.
    with EmbeddedStore(tmp_path / "s") as store:
        store.claim(SIGNATURE)
        store.upsert([Document(id=f"d{i}", vector=v) for i, v in enumerate(uniform(500, seed=5))])
        searched = []  # (results asked for, ef_search, exact) of every search the calibration runs
        vector_search = store.vector_search
        monkeypatch.setattr(store, "vector_search", lambda vector, k, **options: searched.append(
            (k, options.get("ef_search"), options.get("exact", False))) or vector_search(vector, k, **options))
        effort = calibrate(store, target_recall=0.5, k=10, depth=30, queries=40, allow_exact=False)
    assert effort.ef_search == 30 and effort.depth == 30, effort.describe()
    assert min(p.ef_search for p in effort.curve) == 30, effort.describe()
    timed = [(k, ef) for k, ef, exact in searched if exact and k != 11]  # k + 1: the sampled vector's neighbours
    measured = [(k, ef) for k, ef, exact in searched if not exact]
    assert timed and {k for k, _ in timed} == {30}  # the truth and exact search's latency, as deep as the ANN
    assert measured and {k for k, _ in measured} == {30} and min(ef for _, ef in measured) == 30


def test_on_a_store_of_duplicates_an_exhaustive_effort_reaches_the_target(tmp_path):
    # Every vector under three ids: the exact top 10 ends inside a group of equal scores, where an
    # equally good hit under another id is no miss; counted as one, no effort would reach 0.95.
    with EmbeddedStore(tmp_path / "s") as store:
        store.upsert(stored_copies(unit_vectors(300, seed=6), copies=3))
        effort = calibrate(store, target_recall=0.95, k=10, queries=60, max_ef=1024, allow_exact=False)
    assert effort.ef_search is not None, effort.describe()  # at the latest 1024, over the 900 documents


def test_where_no_effort_reaches_the_target_queries_are_answered_exactly(uniform_store):
    with EmbeddedStore(uniform_store, target_recall=0.999) as store:
        effort = calibrate(store, target_recall=0.999, k=10, depth=10, queries=50, max_ef=16)
        assert effort.exact and "no ef_search up to 16" in effort.reason
        store.effort.save(effort)
        fresh = uniform(30, seed=3)
        assert recall_at_10(store, fresh) == 1.0
        assert recall_at_10(store, fresh, ef_search=10) < 1.0  # a query's own ef_search still runs the ANN
    (uniform_store / "calibration.json").unlink()  # the module's store, uncalibrated again


def test_a_target_measured_but_too_few_vectors_to_show_it_says_the_sample_is_too_small(tmp_path):
    # 40 documents: every effort found all of the exact top 10 (recall 1.0000), but 40 queries show 0.99 at 95 %
    # confidence for none of them. The reason said "no ef_search reached it (best: 1.0000 ...)", a contradiction.
    with EmbeddedStore(tmp_path / "s") as store:
        store.claim(SIGNATURE)
        store.upsert([Document(id=f"d{i}", vector=v) for i, v in enumerate(uniform(40, seed=7))])
        whole = calibrate(store, target_recall=0.99, k=10, queries=300, max_ef=256)
        sampled = calibrate(store, target_recall=0.99, k=10, queries=20, max_ef=256)
    assert whole.exact and max(p.recall for p in whole.curve) == 1.0, whole.describe()
    assert whole.reason.endswith("; the store's 40 documents are too few to show 0.99"), whole.reason
    assert sampled.reason.endswith("; 20 sampled vectors are too few to show 0.99: sample more (--queries, "
                                   "SIDECAR_CALIBRATION_QUERIES)"), sampled.reason


def test_an_index_run_calibrates_again_after_large_changes_only(tmp_path):
    vectors = uniform(1100, seed=4)
    with EmbeddedStore(tmp_path / "s", target_recall=0.9) as store:
        store.claim(SIGNATURE)
        store.upsert([Document(id=f"d{i}", vector=v) for i, v in enumerate(vectors[:1000])])
        effort, decision = recalibrate_if_changed(store, changed=1000, queries=50)
        assert effort is not None and "no calibration" in decision
        store.upsert([Document(id=f"d{i}", vector=v) for i, v in enumerate(vectors[1000:1050], start=1000)])
        kept, decision = recalibrate_if_changed(store, changed=50, queries=50)
        assert kept is None and "kept" in decision
        store.upsert([Document(id=f"d{i}", vector=v) for i, v in enumerate(vectors[1050:], start=1050)])
        again, decision = recalibrate_if_changed(store, changed=100, queries=50)
        assert again is not None and again.documents == 1100 and "calibrated" in decision
        deeper, decision = recalibrate_if_changed(store, changed=0, depth=200, queries=50)  # searches ask for more
        assert deeper is not None and deeper.depth == 200 and "100 deep" in decision
    with EmbeddedStore(tmp_path / "s") as untargeted:
        assert recalibrate_if_changed(untargeted, changed=5000)[0] is None


def test_calibration_shows_progress_through_the_side_by_side_timing_of_the_chosen_effort_and_exact_search(
        tmp_path, capsys):
    # The timing searches every sampled vector twice more (by HNSW and exactly): on a large store as long a wait
    # as the truth's, which has its bar.
    with EmbeddedStore(tmp_path / "s") as store:
        store.claim(SIGNATURE)
        store.upsert([Document(id=f"d{i}", vector=v) for i, v in enumerate(uniform(500, seed=5))])
        effort = calibrate(store, target_recall=0.5, k=10, depth=30, queries=40, progress=True)
        shown = capsys.readouterr().err
        calibrate(store, target_recall=0.5, k=10, depth=30, queries=40, progress=False)
        quiet = capsys.readouterr().err
    assert "exact search (the truth)" in shown and "timing ef_search 30 against exact search" in shown, shown
    assert effort.curve and quiet == ""
