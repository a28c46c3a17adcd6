import pytest

from sidecar.retrieval.fusion import fuse, fused_ranking, minmax, rrf, zscore


def test_minmax_scales_to_unit_range_and_respects_bounds():
    assert minmax({"a": 2.0, "b": 4.0, "c": 3.0}) == {"a": 0.0, "b": 1.0, "c": 0.5}
    # With fixed bounds a lone weak hit stays weak instead of being stretched to 1.
    assert minmax({"a": 0.2}, bounds=(0.0, 1.0)) == {"a": pytest.approx(0.2)}
    assert minmax({"a": 1.0, "b": 1.0}) == {"a": 1.0, "b": 1.0}


def test_zscore_centres_and_scales():
    scores = zscore({"a": 1.0, "b": 2.0, "c": 3.0})
    assert scores["b"] == pytest.approx(0.0)
    assert scores["a"] == pytest.approx(-scores["c"])


def test_zscore_of_equal_scores_is_zero_whatever_their_float_value():
    # 100 x 2.0599723 (OpenSearch's BM25 of one word in equal captions) has a mean that is not 2.0599723:
    # the std was rounding noise, and every score came out 1.0 (-1.0 for other values), not 0.
    for value in (2.0599723, 2.0599722862243652, 0.1):
        assert set(zscore({f"d{i}": value for i in range(100)}).values()) == {0.0}


def test_rrf_rewards_agreement_between_lists():
    fused = rrf([["a", "b", "c"], ["b", "a", "d"]], weights=[1.0, 1.0])
    assert max(fused, key=fused.get) in ("a", "b")
    assert fused["a"] == pytest.approx(fused["b"])
    assert fused["c"] < fused["a"] and fused["d"] < fused["a"]


@pytest.mark.parametrize("method", ["minmax", "zscore", "rrf"])
def test_fuse_prefers_documents_both_retrievers_like(method):
    vector = {"both": 0.9, "vec_only": 0.95, "weak": 0.1}
    bm25 = {"both": 8.0, "bm25_only": 9.0, "weak": 0.5}
    fused = fuse([vector, bm25], method=method, weights=[0.5, 0.5])
    assert max(fused, key=fused.get) == "both"
    assert set(fused) == {"both", "vec_only", "weak", "bm25_only"}


def test_fuse_weights_decide_between_retrievers():
    vector = {"v": 1.0, "t": 0.0}
    bm25 = {"v": 0.0, "t": 1.0}
    assert max(fuse([vector, bm25], method="minmax", weights=[0.9, 0.1]).items(), key=lambda kv: kv[1])[0] == "v"
    assert max(fuse([vector, bm25], method="minmax", weights=[0.1, 0.9]).items(), key=lambda kv: kv[1])[0] == "t"


def test_fuse_rejects_unknown_method_naming_the_choices():
    with pytest.raises(ValueError, match="minmax, zscore, rrf"):
        fuse([{}], method="max", weights=[1.0])


@pytest.mark.parametrize("method", ["minmax", "zscore", "rrf"])
def test_a_zero_weight_leaves_the_other_lists_ranking_ties_included(method):
    # "b" and "c" tie on BM25 (BM25 ranks b first); the vector list ranks c first and holds "v", no BM25 hit.
    vector = {"c": 0.9, "v": 0.8, "b": 0.7, "a": 0.1}
    bm25 = {"a": 9.0, "b": 4.0, "c": 4.0}
    ranked = fused_ranking(fuse([vector, bm25], method=method, weights=[0, 1]), [vector, bm25], weights=[0, 1])
    assert ranked == ["a", "b", "c", "v"]  # was a, c, b, v: tied fused scores kept the vector list's order
    assert fused_ranking(fuse([vector, bm25], method=method, weights=[1, 0]), [vector, bm25],
                         weights=[1, 0]) == ["c", "v", "b", "a"]


def test_equal_fused_scores_go_by_the_heavier_lists_rank_then_the_others_then_id():
    fused = {"x": 1.0, "y": 1.0, "z": 1.0, "w": 1.0}
    assert fused_ranking(fused, [{"y": 2.0, "x": 1.0}, {"x": 5.0, "z": 3.0}], weights=[0.2, 0.8]) == ["x", "z", "y", "w"]
    assert fused_ranking(fused, [{"y": 2.0, "x": 1.0}, {"x": 5.0, "z": 3.0}], weights=[0.5, 0.5]) == ["y", "x", "z", "w"]


@pytest.mark.parametrize("bm25", [{"lone": 2.5}, {"lone": 1.7, "d": 1.7}])
def test_zscore_counts_a_lists_hits_over_the_documents_it_lacks_when_they_all_tie(bm25):
    # BM25's one match (or matches of equal score) have z-scores of 0, as had the floor given to the documents
    # BM25 lacks: the lexical evidence vanished, and "lone" ranked last, by its vector score alone.
    vector = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.66, "lone": 0.65}
    ranked = fused_ranking(fuse([vector, bm25], method="zscore", weights=[0.5, 0.5]), [vector, bm25],
                           weights=[0.5, 0.5])
    assert ranked.index("lone") < ranked.index("c")
    assert ranked[-1] not in bm25
