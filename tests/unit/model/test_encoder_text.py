"""Text preparation: token counts and truncation reporting from one tokenisation; graph buckets."""

from __future__ import annotations

import pytest

from sidecar.model.text_graphs import bucket_for, bucket_sizes


@pytest.mark.parametrize("text", ["red circle", "red ! circle !", "", "a large red circle on the left"])
def test_token_count_matches_the_tokenizer(encoder, text):
    prepared = encoder.prepare_text(text)
    assert prepared.length == len(encoder.tokenizer.encode(text)) + 2
    assert not prepared.truncated


def test_a_text_that_exactly_fills_the_context_is_not_truncated(encoder):
    words = encoder.context_length - 2  # start and end tokens take the rest
    assert len(encoder.tokenizer.encode("a " * words)) == words
    exact = encoder.prepare_text("a " * words)
    assert exact.length == encoder.context_length and not exact.truncated
    over = encoder.prepare_text("a " * (words + 5))
    assert over.length == encoder.context_length + 5 and over.truncated


def test_bucket_sizes_cover_every_batch_up_to_max_batch():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert bucket_sizes(1) == [1]
    sizes = bucket_sizes(48)
    for n in range(1, 49):
        size = bucket_for(n, sizes)
        assert n <= size <= max(2 * n, 1)
    assert bucket_for(49, sizes) is None


def test_the_tokenizers_word_memo_is_bounded_and_keeps_the_special_tokens():
    import open_clip

    from sidecar.model.encoder import _bound_bpe_cache

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    _bound_bpe_cache(tokenizer, 50)
    before = tokenizer(["<start_of_text> red circle"])
    for i in range(500):
        tokenizer([f"word{chr(97 + i % 26)}{chr(97 + i // 26)}x"])
    assert len(tokenizer.cache) == 52  # 50 words and the two special tokens
    assert {"<start_of_text>", "<end_of_text>"} <= tokenizer.cache.keys()
    assert (tokenizer(["<start_of_text> red circle"]) == before).all()


def test_the_served_encoders_tokenizer_memo_is_bounded(encoder):
    from sidecar.model.encoder import BPE_CACHE_WORDS

    assert encoder.tokenizer.cache._capacity == BPE_CACHE_WORDS + 2
