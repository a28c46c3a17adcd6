"""Tokenising, side by side in one run: CPU µs per text of open_clip's own SimpleTokenizer (what
`tokenizer(texts)` costs) and of `Encoder.prepare_texts` (what the serving batcher and the embed
job's prompts run), one text per call and 64 per call, for plain queries (printable ASCII without
'&': the fast path) and for texts with an accent (open_clip's path in both). Every text is unique
(a number in it) while its words repeat, as queries' do, so the tokenizer's word memo serves both
sides alike; the ids are checked equal.

    .venv/bin/python bench/tokenise.py                      # tiny model (open_clip's CLIP tokenizer)
    .venv/bin/python bench/tokenise.py --texts 20000
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from typing import Callable, Sequence

import torch

from sidecar.config import Settings
from sidecar.model.encoder import load_encoder


def us_per_text(tokenise: Callable[[Sequence[str]], object], texts: list[str], batch: int) -> float:
    started = time.thread_time()
    for start in range(0, len(texts), batch):
        tokenise(texts[start:start + batch])
    return (time.thread_time() - started) / len(texts) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="open_clip model whose tokenizer to use (default: the tiny model)")
    parser.add_argument("--texts", type=int, default=6400, help="texts per measurement")
    args = parser.parse_args()

    encoder = load_encoder(Settings.from_env(**({"model": args.model} if args.model else {})))
    tokenizer = encoder.tokenizer
    print(f"{platform.processor() or 'cpu'}; model {encoder.name}; {type(tokenizer).__name__}; "
          f"{args.texts} texts per measurement")
    run = random.randrange(10**6)  # texts no earlier run tokenised
    kinds = {"plain query": "red running sneakers size {} for men",
             "with an accent": "café au lait mug number {} in stoneware"}
    print(f"{'texts':>15} {'batch':>6} {'open_clip µs/text':>18} {'prepare_texts µs/text':>22} {'speed-up':>9}")
    for kind, template in kinds.items():
        for batch in (1, 64):
            texts = [template.format(f"{run}-{batch}-{i}") for i in range(args.texts)]
            assert torch.equal(encoder.prepare_texts(texts[:64]).tokens, tokenizer(texts[:64]))
            open_clip_us = us_per_text(tokenizer, texts, batch)
            prepare_us = us_per_text(encoder.prepare_texts, texts, batch)
            print(f"{kind:>15} {batch:>6} {open_clip_us:>18.1f} {prepare_us:>22.1f} {open_clip_us / prepare_us:>8.2f}x")


if __name__ == "__main__":
    main()
