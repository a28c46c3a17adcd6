"""Text preparation: token ids and counts from one tokenisation, equal to open_clip's; graph buckets; the text
tower on the batch's longest text, equal to the whole context."""

from __future__ import annotations

import contextlib
import functools
import html
import random
import string
from typing import Iterator

import ftfy
import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import Settings
from sidecar.model.text_graphs import bucket_for, bucket_sizes


@pytest.mark.parametrize("text", ["red circle", "red ! circle !", "", "a large red circle on the left"])
def test_token_count_matches_the_tokenizer(encoder, text):
    prepared = encoder.prepare_texts([text])
    assert prepared.lengths == [len(encoder.tokenizer.encode(text)) + 2]


def test_a_text_that_exactly_fills_the_context_is_not_truncated(encoder):
    words = encoder.context_length - 2  # start and end tokens take the rest
    assert len(encoder.tokenizer.encode("a " * words)) == words
    prepared = encoder.prepare_texts(["a " * words, "a " * (words + 5)])
    assert prepared.lengths == [encoder.context_length, encoder.context_length + 5]


@functools.cache
def reference_tokenizer(context_length: int) -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's own tokenizer, built once (loading its vocabulary per example made this test take minutes)."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


# Printable ASCII but '&' (the plain-text path), with the pieces open_clip's pattern treats apart:
# contractions, special tokens in either case, digits, punctuation runs.
PLAIN_TEXTS = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126).filter(lambda c: c != "&"),
                      max_size=120) | st.lists(st.sampled_from(
    ["red", "Sneakers", "DON'T", "we're", "it's", "'ll", "'D", "<start_of_text>", "<END_OF_TEXT>", "<end_of", "42",
     "x9", "t-shirt", "...", "!?", "--", "_", "~", "a", "'", "  "]), max_size=30).map("".join)
TEXTS = PLAIN_TEXTS | st.text(alphabet=st.characters(codec="utf-8"), max_size=120) | st.text(
    alphabet=st.sampled_from("abc XYZ 09 &amp; &#39; < > ' \" \t \r\n \x1b \x00 é ﬁ ＡＢ “ ” Ã©"), max_size=400)


@settings(max_examples=500, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=4))
def test_prepared_texts_equal_open_clips_own_tokenizer(encoder, texts):
    """The batch path (one array; plain text split without ftfy and the `regex` module) gives open_clip's
    ids exactly, truncation included, and the full token counts."""
    reference = reference_tokenizer(encoder.context_length)
    prepared = encoder.prepare_texts(texts)
    assert torch.equal(prepared.tokens, reference(texts))
    assert prepared.lengths == [len(reference.encode(text)) + 2 for text in texts]


# Words of LONG_WORD_CHARS and more (the BPE of the encoder's own): alphabets of many merges (letters), of
# repeats ("aaa…": overlapping pairs), with the pieces open_clip splits them into (spaces, digits, punctuation).
LONG_WORDS = st.sampled_from(["abcdefghijklmnopqrstuvwxyz", "ab", "aab", "the", "!?.-", "é", "aa", "x1 "]).flatmap(
    lambda alphabet: st.text(alphabet=alphabet, min_size=60, max_size=700))


@settings(max_examples=200, deadline=None)
@given(text=LONG_WORDS)
def test_long_words_get_open_clips_own_tokens(encoder, text):
    reference = reference_tokenizer(encoder.context_length)
    assert encoder.tokenizer.encode(text) == reference.encode(text)
    assert torch.equal(encoder.prepare_texts([text]).tokens, reference([text]))


def test_a_word_past_long_word_chars_never_reaches_open_clips_quadratic_bpe(encoder):
    """open_clip's BPE rebuilds the whole word at each merge, O(n²): 16 texts of max_text_chars random letters
    (each one word) took it 6 s on the batcher's thread, where every request of the worker waited for them
    (the encoder's own BPE took them in well under 1 s, measured on the 2-core box; not timed here)."""
    from sidecar.model.encoder import LONG_WORD_CHARS, _long_word_bpe

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=encoder.context_length)
    original, asked = tokenizer.bpe, []
    tokenizer.bpe = lambda token: asked.append(token) or original(token)
    bpe = _long_word_bpe(tokenizer)
    long_word = "".join(random.Random(0).choices(string.ascii_lowercase, k=Settings().max_text_chars))
    short_word = "x" * LONG_WORD_CHARS
    assert bpe(long_word) == original(long_word) and bpe(short_word) == original(short_word)
    assert asked == [short_word]
    assert encoder.tokenizer.bpe.__qualname__ == bpe.__qualname__  # the served encoder splits words with it


def test_a_tokenizer_cleaned_otherwise_keeps_open_clips_own_path():
    from sidecar.model.encoder import _plain_text_encoder

    kept_case = open_clip.tokenizer.SimpleTokenizer(clean="whitespace")  # no lowercasing: ASCII classes would differ
    assert _plain_text_encoder(kept_case) == kept_case.encode
    lowered = reference_tokenizer(77)
    assert _plain_text_encoder(lowered) != lowered.encode


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126).filter(lambda c: c != "&")))
def test_ftfy_and_html_unescape_leave_printable_ascii_without_ampersands_unchanged(text):
    assert html.unescape(html.unescape(ftfy.fix_text(text))) == text


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


def test_the_tokenizers_memo_keeps_ordinary_words_but_not_words_of_thousands_of_letters(encoder):
    """The memo is bounded in words: 100,000 words of max_text_chars letters held about 1 GB."""
    from sidecar.model.encoder import LONG_WORD_CHARS

    long_word = "".join(random.Random(1).choices(string.ascii_lowercase, k=Settings().max_text_chars))
    short_word = "x" * LONG_WORD_CHARS
    encoder.prepare_texts([f"{short_word} {long_word}"])
    assert short_word in encoder.tokenizer.cache
    assert long_word not in encoder.tokenizer.cache


def test_the_served_encoders_tokenizer_memo_is_bounded(encoder):
    from sidecar.model.encoder import BPE_CACHE_WORDS

    assert encoder.tokenizer.cache._capacity == BPE_CACHE_WORDS + 2


@contextlib.contextmanager
def _widths_seen_by(transformer: torch.nn.Module) -> Iterator[list[int]]:
    """The token widths the transformer is run on inside the block (a forward pre-hook, removed after:
    the encoder is shared by the session)."""
    widths: list[int] = []
    hook = transformer.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    try:
        yield widths
    finally:
        hook.remove()


def test_the_text_tower_runs_on_the_batchs_longest_text_and_gives_the_whole_contexts_vectors(encoder, monkeypatch):
    # Unsplit: an app built on the shared encoder earlier in the session may have measured its cost.
    monkeypatch.setattr(encoder.text_tower, "cost", None)
    texts = ["red", "a large red circle on the left", "blue square " * 40, ""]  # the third fills the context
    tokens = encoder.prepare_texts(texts).tokens
    with torch.inference_mode():
        whole = encoder.model.encode_text(tokens)
    short = encoder.prepare_texts(texts[:2]).tokens
    with _widths_seen_by(encoder.model.transformer) as widths:
        torch.testing.assert_close(encoder.forward_texts(tokens), whole)
        torch.testing.assert_close(encoder.forward_texts(short), whole[:2])
    assert widths == [encoder.context_length, int(short.argmax(dim=-1).max()) + 1]
    assert widths[1] < encoder.context_length


def _small_clip(**text_cfg) -> open_clip.model.CLIP:
    torch.manual_seed(0)
    text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=40, width=32, heads=2, layers=2, **text_cfg)
    vision = open_clip.model.CLIPVisionCfg(image_size=16, patch_size=8, width=32, layers=1, head_width=16)
    return open_clip.model.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text).eval()


def test_a_tower_pooling_the_first_eos_token_gives_the_same_vectors_on_the_prefix():
    from sidecar.model.text_tower import encode_text_prefix, pooled_positions, pools_a_causal_prefix

    model = _small_clip(pool_type="eos", eos_id=3)
    tokens = torch.tensor([[1, 5, 6, 3] + [0] * 12, [1, 7, 8, 9, 10, 3, 11] + [0] * 9])
    width = int(pooled_positions(model, tokens).max()) + 1
    assert pools_a_causal_prefix(model) and width == 6
    with torch.inference_mode():
        torch.testing.assert_close(encode_text_prefix(model, tokens[:, :width]), model.encode_text(tokens))


def test_a_tower_that_sees_the_whole_context_is_never_run_on_a_prefix():
    from sidecar.model.text_tower import pools_a_causal_prefix

    bidirectional = _small_clip(no_causal_mask=True, pool_type="last")  # as SigLIP's text tower
    tokens = torch.tensor([[1, 5, 6, 39] + [0] * 12])
    padding_changed = tokens.clone()
    padding_changed[0, 8] = 7
    with torch.inference_mode():  # its vector depends on the positions after the text: no prefix gives it
        assert not torch.allclose(bidirectional.encode_text(tokens), bidirectional.encode_text(padding_changed))
    assert not pools_a_causal_prefix(bidirectional)
    assert not pools_a_causal_prefix(_small_clip(pool_type="last"))
