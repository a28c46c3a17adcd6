"""Text tower alone, side by side in one run: ms per batch and texts/s of open_clip's encode_text
over the whole context, of the eager tower on the batch's longest text (what serving runs on CPU,
and on a GPU above the graphed sizes) and, on a GPU, of the CUDA graphs.

What the serving path's forward costs per batch size, without HTTP, for query-like texts (about ten
tokens of the model's 77). The graphs replay one captured graph per call, at the whole context.
Then batches of mixed lengths (one text filling the context, the rest queries), eager: one forward
at the longest text against forwards split by width as the serving worker's measured cost splits
them (`sidecar.model.text_split`; the cost line is printed).

    .venv/bin/python bench/text_tower.py                              # tiny model
    .venv/bin/python bench/text_tower.py --model ViT-B-32 --sizes 1,8,64,1024
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from sidecar.config import Settings
from sidecar.model.encoder import load_encoder


def ms_per_call(forward, tokens: torch.Tensor, *, seconds: float, cuda: bool) -> float:
    """Mean wall time of forward + copy of the vectors to the host (what a request waits for)."""
    for _ in range(3):
        forward(tokens).cpu()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        forward(tokens).cpu()  # .cpu() synchronises, so each call is timed whole
        calls += 1
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="open_clip model (default: the tiny model); random weights")
    parser.add_argument("--sizes", default="1,8,64", help="batch sizes; those up to 64 are also graphed")
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent per measurement")
    args = parser.parse_args()

    encoder = load_encoder(Settings.from_env(**({"model": args.model} if args.model else {})))
    cuda = encoder.device.type == "cuda"
    sizes = [int(s) for s in args.sizes.split(",")]
    device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    print(f"device: {device}; model {encoder.signature.describe()}, {encoder.precision}; "
          f"{torch.get_num_threads()} torch threads")
    batches = {n: encoder.prepare_texts([f"a photo of item {i}, red sneakers" for i in range(n)]).tokens for n in sizes}
    # encode_text on all 77 positions, as open_clip runs it (TextTower.run does for a whole-width batch).
    whole = {n: ms_per_call(lambda tokens: encoder.text_tower.run(tokens.to(encoder.device)), batches[n],
                            seconds=args.seconds, cuda=cuda) for n in sizes}
    eager = {n: ms_per_call(encoder.forward_texts, batches[n], seconds=args.seconds, cuda=cuda) for n in sizes}
    encoder.text_tower.measure_cost()  # before the graphs: with them, serving never splits
    cost = encoder.text_tower.cost
    long_text = "a long product description that fills the context " * 12
    mixed = {n: encoder.prepare_texts([f"a photo of item {i}, red sneakers" for i in range(n - 1)] + [long_text]).tokens
             for n in sizes if n > 1}
    split = {n: ms_per_call(encoder.forward_texts, tokens, seconds=args.seconds, cuda=cuda) for n, tokens in mixed.items()}
    encoder.text_tower.cost = None
    longest = {n: ms_per_call(encoder.forward_texts, tokens, seconds=args.seconds, cuda=cuda)
               for n, tokens in mixed.items()}
    graphed: dict[int, float] = {}
    if cuda:
        encoder.text_tower.capture_graphs(64)
        graphed = {n: ms_per_call(encoder.forward_texts, batches[n], seconds=args.seconds, cuda=cuda)
                   for n in sizes if n <= 64}
    print(f"{'batch':>6} {'whole ms':>9} {'texts/s':>9} {'prefix ms':>10} {'texts/s':>9} {'speed-up':>9}"
          + (f" {'graph ms':>9} {'texts/s':>9} {'vs whole':>9}" if graphed else ""))
    for n in sizes:
        row = (f"{n:>6} {whole[n]:>9.2f} {n / whole[n] * 1000:>9.0f} {eager[n]:>10.2f} {n / eager[n] * 1000:>9.0f}"
               f" {whole[n] / eager[n]:>8.1f}x")
        if n in graphed:
            row += f" {graphed[n]:>9.2f} {n / graphed[n] * 1000:>9.0f} {whole[n] / graphed[n]:>8.1f}x"
        print(row)
    print("\nmixed batches, one text filling the context; measured cost: "
          + ("unclear, no split" if cost is None else
             f"{cost.fixed_ms:.2f} ms + {cost.per_token_row_ms:.4f} ms per token row "
             f"(a split must save {cost.fixed_token_rows:.0f} padded tokens)"))
    print(f"{'batch':>6} {'longest ms':>11} {'split ms':>9} {'speed-up':>9}")
    for n in mixed:
        print(f"{n:>6} {longest[n]:>11.2f} {split[n]:>9.2f} {longest[n] / split[n]:>8.1f}x")


if __name__ == "__main__":
    main()
