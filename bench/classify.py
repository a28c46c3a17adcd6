"""Zero-shot classification benchmark: images/s classified online, and the cost of tagging at embed time.

Online: gunicorn + the sidecar with a 1,000-label prompt set (its vectors computed before the server
starts, as `clip-sidecar serve` does), driven over keep-alive loopback connections with one JPEG per
POST /v1/classify, at several concurrencies, batched (max_batch 64) and unbatched (max_batch 1).

Offline: `embed` of the same rendered corpus without and with `--tag` of that set, in alternating
rounds (shared machines drift); the overhead is the median of the paired ratios, and the tagging
stage's own seconds against the plain run's.

    PYTHONPATH=. .venv/bin/python bench/classify.py                   # tiny model, CPU
    PYTHONPATH=. .venv/bin/python bench/classify.py --model ViT-B-32 --images 20000 --requests 4000 --concurrency 1,16,64
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import post_concurrently, start_server, stop_server  # noqa: E402  (bench/ is not a package)

from sidecar.config import Settings  # noqa: E402
from sidecar.ingest.embed import embed_corpus  # noqa: E402
from sidecar.ingest.tagging import Tagger, TagSpec  # noqa: E402
from sidecar.model.encoder import load_encoder  # noqa: E402
from sidecar.model.prompts import PromptSet, PromptSetRegistry  # noqa: E402
from sidecar.model.synthetic import ATTRIBUTES, CAPTION_TEMPLATES, compose_caption, iter_items, write_corpus  # noqa: E402

SET_NAME = "bench-1000"
VARIANTS = {"batched": "64", "unbatched": "1"}


def thousand_labels(count: int) -> PromptSet:
    """`count` distinct descriptions of the synthetic shapes (every attribute combination, in every phrasing)."""
    labels: list[str] = []
    combos = [dict(zip(ATTRIBUTES, values)) for values in
              np.array(np.meshgrid(*ATTRIBUTES.values(), indexing="ij")).reshape(len(ATTRIBUTES), -1).T]
    for template in range(len(CAPTION_TEMPLATES)):
        for phrase in range(2):
            for attrs in combos:
                text = compose_caption(attrs, template=template, position_phrase=phrase)
                if text not in labels:
                    labels.append(text)
                if len(labels) == count:
                    return PromptSet.from_dict({"name": SET_NAME, "labels": labels}, source="bench")
    raise ValueError(f"only {len(labels)} distinct descriptions, asked for {count}")


def online(args, sets_dir: Path) -> dict[str, list[dict]]:
    bodies = []
    for item in iter_items(64, seed=99):
        buffer = io.BytesIO()
        item.image.save(buffer, format="JPEG", quality=90)
        image = base64.b64encode(buffer.getvalue()).decode()
        bodies.append(f'{{"set": "{SET_NAME}", "input": ["{image}"], "k": 5}}'.encode())
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as store_dir:
        for name, max_batch in VARIANTS.items():
            # The same queue bound for both: by default it is at most one batch, so max_batch 1 would
            # answer 503 to all but one waiting request, and the ratio would measure shedding, not batching.
            variant = {"SIDECAR_MAX_BATCH": max_batch, "SIDECAR_QUEUE_ITEMS": str(max(1, args.threads // 2)),
                       "SIDECAR_PROMPT_SETS_DIR": str(sets_dir), "SIDECAR_TEXT_CACHE_PERSIST": "false"}
            server = start_server(args.port, variant=variant, workers=args.workers, threads=args.threads,
                                  model=args.model, store_path=Path(store_dir))
            try:
                drive(args.port, bodies, concurrency=4, requests=100)  # warm-up
                results[name] = [drive(args.port, bodies, concurrency=c, requests=args.requests)
                                 for c in args.concurrency]
            finally:
                stop_server(server)
    return results


def drive(port: int, bodies: list[bytes], *, concurrency: int, requests: int) -> dict:
    sent = post_concurrently([port], "/v1/classify", lambda _, i: bodies[i % len(bodies)], concurrency=concurrency,
                             requests=requests)
    ms = np.asarray(sent["latencies"][0]) * 1000
    return {"concurrency": concurrency, "requests": len(ms), "errors": sent["errors"][0],
            "images_per_s": len(ms) / sent["wall"], "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95))}


def offline(args, settings: Settings, registry: PromptSetRegistry, workdir: Path) -> list[dict]:
    encoder = load_encoder(settings)
    tagger = Tagger.load([TagSpec(SET_NAME, k=args.k)], registry, encoder)
    corpus = write_corpus(workdir / "corpus", args.images, seed=5)
    rounds = []
    for r in range(args.rounds):
        row = {}
        for tagged in ((False, True) if r % 2 == 0 else (True, False)):
            out = workdir / f"shards-{r}-{tagged}"
            summary = embed_corpus(encoder, corpus, out, batch_size=256, workers=args.decode_workers,
                                   tagger=tagger if tagged else None, progress=False)
            row["tagged" if tagged else "plain"] = summary.seconds
            if tagged:
                row["tag_stage"] = summary.stages.get("tag", 0.0)
        rounds.append(row)
        print(f"  round {r + 1}: plain {row['plain']:.2f} s, --tag {row['tagged']:.2f} s "
              f"(tag stage {row['tag_stage']:.3f} s)", flush=True)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="SIDECAR_MODEL (default: tiny-clip)")
    parser.add_argument("--labels", type=int, default=1000, help="labels in the prompt set")
    parser.add_argument("--concurrency", default="1,16", help="online: comma-separated concurrencies")
    parser.add_argument("--requests", type=int, default=600, help="online: requests per concurrency level")
    parser.add_argument("--workers", type=int, default=1, help="online: gunicorn workers")
    parser.add_argument("--threads", type=int, default=32, help="online: gunicorn threads per worker")
    parser.add_argument("--images", type=int, default=2000, help="offline: images in the corpus")
    parser.add_argument("--rounds", type=int, default=3, help="offline: alternating plain / --tag rounds")
    parser.add_argument("--decode-workers", type=int, default=2, help="offline: embed --workers")
    parser.add_argument("-k", type=int, default=3, help="offline: labels written per document")
    parser.add_argument("--skip", choices=("online", "offline"), help="run one half only")
    parser.add_argument("--port", type=int, default=8741)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        settings = Settings.from_env(model=args.model)
        registry = PromptSetRegistry(workdir / "prompt-sets")
        prompt_set = thousand_labels(args.labels)
        registry.add(prompt_set)
        encoder = load_encoder(settings)
        started = time.perf_counter()
        registry.vectors(prompt_set, model=encoder.name, weights=encoder.weights, encode=encoder.encode_texts)
        print(f"model {encoder.name}; {len(prompt_set.labels)}-label set embedded once in "
              f"{time.perf_counter() - started:.2f} s; {os.cpu_count()} CPUs", flush=True)
        del encoder
        if args.skip != "online":
            print(f"\nonline: POST /v1/classify, one JPEG per request, k=5; gunicorn {args.workers} worker(s) x "
                  f"{args.threads} threads")
            results = online(args, workdir / "prompt-sets")
            print(f"{'variant':<10} {'conc':>5} {'reqs':>6} {'err':>4} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8}")
            for name, rows in results.items():
                for r in rows:
                    print(f"{name:<10} {r['concurrency']:>5} {r['requests']:>6} {r['errors']:>4} "
                          f"{r['images_per_s']:>9.1f} {r['p50']:>8.2f} {r['p95']:>8.2f}")
            for batched, unbatched in zip(results["batched"], results["unbatched"]):
                print(f"batched / unbatched at concurrency {batched['concurrency']}: "
                      f"x{batched['images_per_s'] / unbatched['images_per_s']:.2f} images/s")
        if args.skip != "offline":
            print(f"\noffline: embed {args.images} images, plain vs --tag {SET_NAME}:{args.k}, "
                  f"{args.rounds} alternating rounds")
            rounds = offline(args, settings, registry, workdir)
            ratios = [r["tagged"] / r["plain"] for r in rounds]
            stage = [r["tag_stage"] / r["plain"] for r in rounds]
            print(f"--tag / plain wall time: median x{statistics.median(ratios):.3f} "
                  f"({', '.join(f'{x:.3f}' for x in ratios)}); tagging stage alone: median "
                  f"{100 * statistics.median(stage):.2f} % of a plain embed")


if __name__ == "__main__":
    main()
