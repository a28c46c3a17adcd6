"""Zero-shot label scores (`sidecar.model.prompts._label_scores`: every input vector against every label's): the
project's float64 BLAS product against a float32 BLAS product and np.einsum, side by side in one run, for a
prompt set of a few labels and one of 1,000, over one shard's worth of rows (4,096, as `tag` reads them); and
whether each gives a row the same scores whatever batch it is computed in: every bit, and rounded to the 4
decimals a tag's score is stored with (what keeps a `tag` rerun over another shard layout from rewriting
unchanged rows).

    PYTHONPATH=. .venv/bin/python bench/label_scores.py
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np

from sidecar.model.prompts import _label_scores

VARIANTS = {
    "float64 BLAS (the project's)": _label_scores,
    "float32 BLAS": lambda vectors, labels: vectors @ labels.T,
    "np.einsum": lambda vectors, labels: np.einsum("ij,kj->ik", vectors, labels),
}


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--labels", default="20,1000", help="label counts, comma-separated")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5, help="best of this many timings of 3 calls")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, args.rows, args.dim)
    print(f"ms per {args.rows} rows (best of {args.repeat}); 'same in any batch': each row's scores computed in "
          "batches of 1, 37 and 4,098 rows equal the whole product's, bit for bit / rounded to 4 decimals")
    for n_labels in map(int, args.labels.split(",")):
        labels = unit_rows(rng, n_labels, args.dim)
        for name, scores in VARIANTS.items():
            took = min(timeit.repeat(lambda: scores(vectors, labels), number=3, repeat=args.repeat)) / 3
            whole = scores(vectors, labels)
            batched = [np.concatenate([scores(vectors[i:i + size], labels) for i in range(0, len(vectors), size)])
                       for size in (1, 37, 4098)]
            bits = all(np.array_equal(other, whole) for other in batched)
            rounded = all(np.array_equal(other.round(4), whole.round(4)) for other in batched)
            print(f"{n_labels:>6} labels  {name:<30} {took * 1e3:8.1f} ms   same in any batch: {bits} / {rounded}")


if __name__ == "__main__":
    main()
