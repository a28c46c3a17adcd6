"""Image decoding that survives real-world files: EXIF rotation, odd modes, bombs, truncation."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse truncated files rather than silently padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; `reason` says why in a few words.

    `kind`: "format" (not an image at all), "corrupt" (truncated/broken), "too_large" (pixel limit).
    """

    def __init__(self, reason: str, *, kind: str):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def decode_image(data: bytes | io.BufferedIOBase, *, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Decode to an upright RGB image, or raise ImageDecodeError naming the problem.

    `min_side`: the model's input size; JPEGs are then decoded at the smallest DCT scale
    that still covers it (draft mode), which is several times faster for large photos.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) between its two limits; ours is explicit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                                      f"{max_pixels} (max_image_pixels)", kind="too_large")
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated: the first frame stands for the file
            if min_side:
                image.draft("RGB", (min_side, min_side))
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not a recognised image format", kind="format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}", kind="too_large") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}", kind="corrupt") from exc
    return _to_rgb(ImageOps.exif_transpose(image))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: PIL's convert("RGB") clips at 255, so rescale by the real range.
        array = np.asarray(image, dtype=np.float32)
        top = float(array.max()) or 1.0
        image = Image.fromarray((array * (255.0 / top)).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image
