"""Peak memory of one image decode (bytes → the model's pixels), per pixel, by image mode: the
measurement behind `sidecar.model.images.DECODE_BYTES_PER_PIXEL`, which the per-worker decode
budget (decode_memory_bytes) charges each decode before it starts.

Each mode runs in a fresh process: the file is written first, then the growth of the process's
peak RSS (ru_maxrss) across `ImagePreprocess.decode` is divided by the image's pixels.

    .venv/bin/python bench/decode_memory.py [--megapixels 20]
"""

from __future__ import annotations

import argparse
import io
import resource
import subprocess
import sys

MODES = ("RGB", "RGBA", "LA", "P+transparency", "I;16", "CMYK", "RGB+EXIF-rotated", "JPEG")


def make(mode: str, width: int, height: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    save: dict = {"format": "PNG"}
    if mode in ("RGB", "RGB+EXIF-rotated", "JPEG"):
        image = Image.fromarray(noise)
        if mode == "JPEG":
            save["format"] = "JPEG"
        elif mode == "RGB+EXIF-rotated":
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90° on display: the decode must transpose
            save["exif"] = exif.tobytes()
    elif mode == "I;16":
        image = Image.fromarray((np.arange(width * height, dtype=np.uint32) % 65535).astype(np.uint16)
                                .reshape(height, width))
    elif mode == "P+transparency":
        image, save["transparency"] = Image.new("P", (width, height), 3), 3
    elif mode == "CMYK":
        image, save["format"] = Image.new("CMYK", (width, height), (5, 100, 3, 3)), "TIFF"
    else:
        image = Image.new(mode, (width, height), (200, 10, 10, 100)[: len(mode)])
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return buffer.getvalue()


def measure(path: str) -> None:
    """In a fresh process: the peak RSS growth of one decode, in bytes."""
    from open_clip.transform import image_transform

    from sidecar.model.images import ImagePreprocess

    preprocess = ImagePreprocess(image_transform(224, is_train=False))
    data = open(path, "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    preprocess.decode(data, max_pixels=10**10, max_resized_side=10**9)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=20.0)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    import tempfile

    from sidecar.model.images import DECODE_BYTES_PER_PIXEL

    width = int((args.megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    print(f"{width} x {height} images; estimate charged per decode: {DECODE_BYTES_PER_PIXEL} bytes/pixel")
    print("| mode | file KB | peak MB | bytes/pixel |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for mode in MODES:
            path = f"{folder}/image"
            data = make(mode, width, height)
            open(path, "wb").write(data)
            peak = int(subprocess.run([sys.executable, __file__, "--measure", path], check=True,
                                      capture_output=True, text=True).stdout)
            print(f"| {mode} | {len(data) // 1024:,} | {peak / 2**20:.0f} | {peak / (width * height):.1f} |")


if __name__ == "__main__":
    main()
