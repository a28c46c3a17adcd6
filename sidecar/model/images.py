"""Image decoding, the one home for it: bytes → upright RGB → the model's input pixels.

Every caller goes through here — the embed job's decode workers, online queries, the CLI and
the demo — so a stored photo queried by itself gets the vector it was indexed with:
- CPU: `decode_image` (PIL; JPEGs in draft mode at the smallest DCT scale that still covers the
  model's input, several times faster for large photos), then open_clip's resize/crop steps on the
  decoded bytes by torch's uint8 kernels (within one level of open_clip's PIL steps, 2-3.5x faster).
- Device: JPEGs decoded as a batch by one of `JPEG_DECODERS` — torchvision's (nvjpeg on a GPU) or
  NVIDIA's nvImageCodec (the GPU's hardware JPEG decoders where it has them, CPU stages on a thread
  pool) — then resized as one batch per source size, following the same open_clip resize mode
  (shortest, longest, squash). On a CPU device both decode with libjpeg-turbo.
The two paths agree within a stated tolerance (tests/unit/model/test_images.py); the offline
job records which one it used in the shard manifest.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from sidecar.config import IMAGE_FORMATS, JPEG_DECODERS, MAX_JPEG_SCANS, MAX_RESIZED_SIDE

log = logging.getLogger(__name__)

# Refuse truncated files rather than silently padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; `reason` says why in a few words.

    `kind`: "format" (not an image, or a format not accepted), "corrupt" (truncated or
    broken; the decoder failed), "too_large" (a pixel, resize or memory limit).
    """

    def __init__(self, reason: str, *, kind: str):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


# Peak bytes per decoded pixel, from the decoded image to the model's pixels: PIL keeps 4 bytes a
# pixel for RGB/RGBA/LA/CMYK, and a conversion to RGB holds a second image (plus an alpha mask)
# while it runs. bench/decode_memory.py measures 4.2 (RGB) to 13 (LA) on 20 MP images; JPEGs are
# charged at their draft-decode size.
DECODE_BYTES_PER_PIXEL = 16


def open_image(data: bytes | io.BufferedIOBase, *, max_pixels: int, formats: Sequence[str] | None = None,
               draft_size: tuple[int, int] | None = None, max_scans: int | None = None) -> Image.Image:
    """Read the header only: the format must be in `formats`, the declared size within `max_pixels`, a
    progressive JPEG's scans at most `max_scans`. No pixel is decoded yet (`load_rgb` does that);
    `image.size` is then the size the decode will have.

    `formats`: those the setting image_formats allows (uploads), named so in a refusal; None: the built-in
    IMAGE_FORMATS, which no setting changes (the files the CLI reads), so a refusal names none.
    `max_scans` alike: the setting max_jpeg_scans's value, or None: the built-in MAX_JPEG_SCANS.

    `draft_size` (width, height): JPEGs are set to decode at the smallest DCT scale whose result is
    still at least this large in both directions.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    opened = tuple(formats or IMAGE_FORMATS)
    with _decoder_errors(max_pixels):
        try:
            image = Image.open(stream, formats=opened)
        except UnidentifiedImageError as exc:
            stream.seek(0)
            head = stream.read(16)
            if not head:  # a download or copy that never wrote a byte: say so, not "not a recognised image format"
                raise ImageDecodeError("empty file (0 bytes)", kind="format") from exc
            found = sniff_format(head)
            if found in opened:  # its signature, then a header its decoder could not read: not a refused format
                raise ImageDecodeError(f"corrupt or truncated image: a {found} signature, then a header that cannot "
                                       "be read", kind="corrupt") from exc
            if found:
                accepted = (f"image_formats: {', '.join(formats)}" if formats else
                            f"accepted: {', '.join(IMAGE_FORMATS)}; convert it to one of them")
                raise ImageDecodeError(f"{found} is not an accepted image format ({accepted})", kind="format") from exc
            raise ImageDecodeError("not a recognised image format", kind="format") from exc
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                                   f"{max_pixels} (max_image_pixels)", kind="too_large")
        if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
            scans = _jpeg_scans(stream)
            limit, named = _limit_in_force(max_scans, MAX_JPEG_SCANS, "max_jpeg_scans")
            if scans > limit:
                raise ImageDecodeError(f"progressive JPEG of {scans} scans, over {named}: each scan is a pass over "
                                       "the whole image", kind="too_large")
        # A file of several frames or pages (animated GIF/WEBP/PNG, multi-page TIFF) opens at its first,
        # which stands for the file. Never ask for n_frames: it walks every frame, which for TIFF takes
        # time quadratic in the page count (2 MB of 1x1 pages: 3.4 s), and none but the first is decoded.
        if draft_size:
            image.draft("RGB", draft_size)
    return image


def _jpeg_scans(stream: io.BufferedIOBase) -> int:
    """The scans of a JPEG file, counted as its 0xFF 0xDA pairs (SOS markers): entropy-coded data cannot
    hold one (a 0xFF there is followed by 0x00 or a restart marker); metadata can (an EXIF thumbnail's
    own scan), so this is an upper bound, and a close one. The stream is left where it was."""
    position = stream.tell()
    stream.seek(0)
    data = stream.read()
    stream.seek(position)
    return data.count(b"\xff\xda")


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode an image from `open_image` to upright RGB, or raise ImageDecodeError naming the problem."""
    with _decoder_errors():
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
        return _to_rgb(image)


def decode_image(data: bytes | io.BufferedIOBase, *, max_pixels: int, formats: Sequence[str] | None = None,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode to an upright RGB image (`open_image`, then `load_rgb`), or raise ImageDecodeError."""
    return load_rgb(open_image(data, max_pixels=max_pixels, formats=formats, draft_size=draft_size))


def decode_bytes(image: Image.Image) -> int:
    """Peak memory a decode of this (opened, not yet loaded) image will hold, estimated from its size."""
    width, height = image.size
    return width * height * DECODE_BYTES_PER_PIXEL


def _limit_in_force(value: int | None, built_in: int, setting: str, unit: str = "") -> tuple[int, str]:
    """A limit and how a refusal names it: `value`, the setting's (uploads), named with the setting; None: the
    built-in one, which no setting changes on that path (the files the CLI reads), so the refusal names no
    setting: changing it would change nothing there."""
    if value is None:
        return built_in, f"the built-in limit of {built_in}{unit}"
    return value, f"the limit of {value}{unit} ({setting})"


# Pillow's DecompressionBombError: "Image size (400000000 pixels) exceeds limit of 178956970 pixels, …".
PILLOW_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")


@contextmanager
def _decoder_errors(max_pixels: int | None = None) -> Iterator[None]:
    """Whatever a decoder raises on hostile bytes becomes ImageDecodeError: the bytes are the cause.
    `max_pixels`: the limit the caller checks, named where Pillow refuses an image first."""
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) between its two limits; ours is explicit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow refuses past twice its MAX_IMAGE_PIXELS, in Image.open before our own check (max_image_pixels is
        # at most that: config.py), in its own words ("… could be decompression bomb DOS attack"): say ours.
        size = PILLOW_BOMB_SIZE.search(str(exc))
        pixels = f"{size.group(1)} pixels" if size else "more pixels than Pillow opens"
        limit = f"{max_pixels} (max_image_pixels)" if max_pixels else f"{2 * Image.MAX_IMAGE_PIXELS}, Pillow's own"
        raise ImageDecodeError(f"image is {pixels}, over the limit of {limit}", kind="too_large") from exc
    except MemoryError as exc:
        raise ImageDecodeError("not enough memory to decode the image", kind="too_large") from exc
    except Exception as exc:  # noqa: BLE001 - plugins raise OSError, SyntaxError, struct.error, IndexError, ...
        raise ImageDecodeError(f"corrupt or truncated image: {type(exc).__name__}: {exc}", kind="corrupt") from exc


def sniff_format(prefix: bytes) -> str | None:
    """The format Pillow would take these first bytes for, by its plugins' signature checks only
    (nothing is opened): names the format that was refused."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix) is True:
                return name
        except Exception:  # noqa: BLE001 - a signature check that fails is not a match
            continue
    # HEIC/HEIF (iPhone photos) has no Pillow plugin to recognise it: named here, as no refusal would say it.
    if prefix[4:8] == b"ftyp" and prefix[8:12] in HEIF_BRANDS:
        return "HEIF"
    return None


# ISO base media files' major brands for HEIF images (ISO/IEC 23008-12), HEVC-coded or not; "mif1" is AVIF's too,
# where Pillow's AVIF check answers first.
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit integer or float greyscale: PIL's convert("RGB") clips at 255 (a float TIFF of 0..1 came out
        # black), so rescale by the real range; below zero and NaN are black.
        array = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(array.max())
        scaled = np.clip(array * (255.0 / top), 0, 255) if top > 0 else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


@dataclass(frozen=True, slots=True)
class ResizeSpec:
    """open_clip's eval resize as data, so it can run on device tensors as well as PIL images.

    open_clip builds one of (transform.image_transform): `shortest` = Resize(side) + CenterCrop
    (or ResizeKeepRatio(longest=0) + CenterCrop for a non-square input), `longest` =
    ResizeKeepRatio(longest=1) + CenterCropOrPad, `squash` = Resize((h, w)).
    """

    mode: str  # "edge" (shorter side to `size[0]`), "exact" (to `size`), or "keep_ratio"
    size: tuple[int, int]  # (height, width) the resize aims at
    longest: float  # keep_ratio: 0 = fit the shorter side, 1 = fit the longer one
    crop: tuple[int, int] | None  # (height, width) of the centre crop, if any
    pad_fill: int | None  # CenterCropOrPad's fill (pads images smaller than the crop); None = crop only
    interpolation: Any  # torchvision InterpolationMode

    @classmethod
    def from_transform(cls, steps: Sequence[Callable]) -> ResizeSpec:
        from open_clip.transform import CenterCropOrPad, ResizeKeepRatio
        from torchvision.transforms import CenterCrop, Resize

        resize = next((s for s in steps if isinstance(s, (Resize, ResizeKeepRatio))), None)
        crop = next((s for s in steps if isinstance(s, (CenterCrop, CenterCropOrPad))), None)
        if resize is None:
            raise ValueError(f"unsupported preprocessing {list(steps)}: expected open_clip's Resize or ResizeKeepRatio")
        if isinstance(resize, ResizeKeepRatio):
            mode, size, longest = "keep_ratio", tuple(resize.size), resize.longest
        elif isinstance(resize.size, int) or len(resize.size) == 1:
            side = resize.size if isinstance(resize.size, int) else resize.size[0]
            mode, size, longest = "edge", (side, side), 0.0
        else:
            mode, size, longest = "exact", tuple(resize.size), 0.0
        crop_size = tuple(crop.size) if crop is not None else None
        pad_fill = crop.fill if isinstance(crop, CenterCropOrPad) else None
        return cls(mode=mode, size=(int(size[0]), int(size[1])), longest=float(longest),
                   crop=(int(crop_size[0]), int(crop_size[1])) if crop_size else None, pad_fill=pad_fill,
                   interpolation=resize.interpolation)

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the pixels the model sees."""
        return self.crop or self.size

    @property
    def draft_size(self) -> tuple[int, int]:
        """(width, height) a JPEG draft decode must keep: at least the resize target both ways."""
        height, width = self.size
        return (width, height)

    def resized_size(self, height: int, width: int) -> list[int]:
        """The size the resize step asks for, as torchvision's resize takes it."""
        if self.mode == "edge":
            return [self.size[0]]  # shorter side; torchvision computes the other one as for PIL
        if self.mode == "exact":
            return list(self.size)
        ratio_h, ratio_w = height / self.size[0], width / self.size[1]
        ratio = max(ratio_h, ratio_w) * self.longest + min(ratio_h, ratio_w) * (1.0 - self.longest)
        return [round(height / ratio), round(width / ratio)]

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of this size after the resize step, before any crop."""
        if self.mode != "edge":
            resized_height, resized_width = self.resized_size(height, width)
            return resized_height, resized_width
        # torchvision's Resize(int): the shorter side to `size`, the longer one scaled and floored.
        side = self.size[0]
        longer = int(side * max(height, width) / min(height, width))
        return (longer, side) if height >= width else (side, longer)

    def resize_batch(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] uint8 of one size → [N, h, w, 3] uint8 at `output_size`.

        On the CPU torch's antialiased uint8 kernels resize the bytes themselves: within one level
        of PIL's resize (what open_clip's transform runs) and 2-3.5x faster than it on this project's
        CPU box (bench/RESULTS.md); they are fastest on channels-last input ([H, W, 3] memory).
        Elsewhere the resize runs in float."""
        from open_clip.transform import center_crop_or_pad
        from torchvision.transforms.v2 import functional as F

        on_cpu = images.device.type == "cpu"
        size = self.resized_size(images.shape[-2], images.shape[-1])
        resized = F.resize(images if on_cpu else images.float(), size, interpolation=self.interpolation,
                           antialias=True)
        if self.crop is not None:
            if self.pad_fill is not None:
                resized = center_crop_or_pad(resized, list(self.crop), fill=self.pad_fill)
            else:
                resized = F.center_crop(resized, list(self.crop))
        if not on_cpu:
            resized = resized.round_().clamp_(0, 255).to(torch.uint8)
        return resized.permute(0, 2, 3, 1)


class ImagePreprocess:
    """The model's image input, split from open_clip's transform: its resize and crop here (as a
    `ResizeSpec`, run on uint8 tensors), mean/std on the device over whole batches, so workers and
    queues carry uint8 pixels (a quarter of float32's bytes)."""

    def __init__(self, transform: Any):
        from torchvision.transforms import Compose, Normalize

        steps = list(getattr(transform, "transforms", [transform]))
        names = [type(step).__name__ for step in steps]
        cut = next((i for i, name in enumerate(names) if "ToTensor" in name), None)
        if cut is None or len(steps) != cut + 2 or not isinstance(steps[-1], Normalize):
            raise ValueError(f"unsupported preprocessing {names}: expected PIL steps, ToTensor, Normalize")
        self.pil_steps = Compose(steps[:cut])
        self.mean, self.std = tuple(steps[-1].mean), tuple(steps[-1].std)
        self.spec = ResizeSpec.from_transform(steps[:cut])

    def describe(self) -> str:
        return repr(self.pil_steps)

    # ---- CPU ----
    def pixels(self, image: Image.Image) -> np.ndarray:
        """An RGB image (any size) → uint8 [h, w, 3] at the model's input size: open_clip's resize
        and crop (`pil_steps`, as `spec`) on the image's bytes, with torch's uint8 kernels."""
        hwc = torch.from_numpy(np.array(image, dtype=np.uint8))  # np.array: a writable copy torch may share
        return np.ascontiguousarray(self.spec.resize_batch(hwc.permute(2, 0, 1)[None])[0].numpy())

    def open(self, data: bytes, *, max_pixels: int, max_resized_side: int | None = None,
             formats: Sequence[str] | None = None, max_scans: int | None = None) -> Image.Image:
        """`open_image` at this model's draft size, plus the resize step's cost: an image whose longer
        side would pass `max_resized_side` after the resize (an extreme aspect ratio) is refused. None (the
        limits, as the formats): the built-in ones, which no setting changes, named so in a refusal."""
        image = open_image(data, max_pixels=max_pixels, formats=formats, draft_size=self.spec.draft_size,
                           max_scans=max_scans)
        height, width = self.spec.resized_shape(image.height, image.width)
        limit, named = _limit_in_force(max_resized_side, MAX_RESIZED_SIDE, "max_resized_side", " pixels a side")
        if max(height, width) > limit:
            raise ImageDecodeError(f"image is {image.width}x{image.height}: the model's resize would make it "
                                   f"{width}x{height}, over {named}", kind="too_large")
        return image

    def decode(self, data: bytes, *, max_pixels: int, max_resized_side: int | None = None,
               formats: Sequence[str] | None = None) -> np.ndarray:
        """Image file bytes → uint8 model pixels: the CPU path of the embed job and of queries."""
        return self.pixels(self.load(data, max_pixels=max_pixels, max_resized_side=max_resized_side,
                                     formats=formats))

    def load(self, data: bytes, *, max_pixels: int, max_resized_side: int | None = None,
             formats: Sequence[str] | None = None) -> Image.Image:
        """Image file bytes → the upright RGB image `pixels` takes, decoded at this model's draft size."""
        return load_rgb(self.open(data, max_pixels=max_pixels, max_resized_side=max_resized_side, formats=formats))

    # ---- device ----
    def wants_device_decode(self, data: bytes, *, max_pixels: int, max_scans: int | None = None,
                            max_resized_side: int | None = None) -> bool:
        """True for a plain RGB/greyscale JPEG within `open`'s limits: pixels, the resize's longer side and,
        progressive, `max_scans` (header and scan markers read only, no decode; None, as `open`: built in)."""
        max_scans = MAX_JPEG_SCANS if max_scans is None else max_scans
        max_resized_side = MAX_RESIZED_SIDE if max_resized_side is None else max_resized_side
        stream = io.BytesIO(data)
        try:
            with Image.open(stream, formats=("JPEG",)) as image:
                width, height = image.size
                # Past a limit the CPU decoder refuses the file (`open`) and the job lists it; the device decoder
                # would decode and resize it (too many scans: every scan a pass over the image), and store it.
                plain = (image.format == "JPEG" and image.mode in ("RGB", "L") and width * height <= max_pixels
                         and max(self.spec.resized_shape(height, width)) <= max_resized_side)
                return plain and not (image.info.get("progressive") and _jpeg_scans(stream) > max_scans)
        except Exception:  # noqa: BLE001 - anything odd is the CPU decoder's to judge and report
            return False

    def decode_on_device(self, jpegs: list[bytes], *, device: torch.device,
                         decoder: str = "torchvision") -> list[torch.Tensor | None]:
        """uint8 [h, w, 3] tensors on `device`, one per JPEG, decoded by `decoder` (one of
        JPEG_DECODERS); None where decoding failed."""
        if not jpegs:
            return []
        images = _BATCH_DECODERS[decoder](jpegs, device)
        out: list[torch.Tensor | None] = [None] * len(images)
        # Same-sized images (common: one camera, one export size) resize as one batch: a handful
        # of kernel launches per size instead of per image.
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            if image is not None:
                by_size.setdefault(tuple(image.shape), []).append(i)
        for indices in by_size.values():
            resized = self.spec.resize_batch(torch.stack([images[i] for i in indices]))
            for i, pixels in zip(indices, resized):
                out[i] = pixels
        return out


def jpeg_tensors(jpegs: Sequence[bytes]) -> list[torch.Tensor]:
    """The uint8 tensors the JPEG decoder takes, each sharing its file's bytes (kept alive by the
    tensor). The decoder only reads them; a bytearray copy per file cost the stager thread 55 us at
    120 KB and grows with file size (bench/jpeg_handoff.py)."""
    with warnings.catch_warnings():
        # torch warns because bytes are read-only.
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return [torch.frombuffer(data, dtype=torch.uint8) for data in jpegs]


def stack_pixels(pixels: Sequence[np.ndarray | torch.Tensor], device: torch.device) -> np.ndarray | torch.Tensor:
    """One [B, h, w, 3] batch from host arrays (CPU path) and/or device tensors (device path)."""
    host_at = [i for i, p in enumerate(pixels) if isinstance(p, np.ndarray)]
    if len(host_at) == len(pixels):
        return np.stack(pixels)  # one pinned host-to-device copy in the encoder's forward
    if not host_at:
        return torch.stack(list(pixels))
    # Both (a split decode): the workers' arrays cross to the device in one copy, not one per image.
    host = torch.from_numpy(np.stack([pixels[i] for i in host_at]))
    if device.type == "cuda":
        host = host.pin_memory()
    batch = torch.empty((len(pixels), *host.shape[1:]), dtype=torch.uint8, device=device)
    batch[host_at] = host.to(device, non_blocking=True)
    device_at = [i for i, p in enumerate(pixels) if not isinstance(p, np.ndarray)]
    batch[device_at] = torch.stack([pixels[i] for i in device_at])
    return batch


class JpegDecoderUnavailable(RuntimeError):
    """The JPEG decoder asked for cannot run here; the message says what to install."""


def check_jpeg_decoder(decoder: str, device: torch.device) -> None:
    """Fail before a job starts, naming the fix, if `decoder` cannot decode on `device`."""
    if decoder not in JPEG_DECODERS:
        raise ValueError(f"jpeg_decoder={decoder!r}: choose one of {', '.join(JPEG_DECODERS)}")
    if decoder == "nvimagecodec":
        _nvimagecodec(device)


def _decode_with_torchvision(jpegs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """[3, H, W] uint8 per JPEG: one batched call (nvjpeg on CUDA), or one call per file to find
    the broken ones when the batch fails."""
    encoded = jpeg_tensors(jpegs)
    try:
        return _decode_jpeg(encoded, device)
    except RuntimeError:
        return [_decode_one(data, device) for data in encoded]


def _decode_with_nvimagecodec(jpegs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """[3, H, W] uint8 per JPEG (a view of nvImageCodec's [H, W, 3] buffer), None for a file it
    cannot decode. On CUDA the decode is ordered before torch's current stream."""
    decoder, params, host = _nvimagecodec(device)
    # Decoded on torch's current stream: the images' buffers are ready, and (stream-ordered) freed,
    # in order with the resize kernels that read them.
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    images = decoder.decode(list(jpegs), params=params, cuda_stream=stream)
    # Host buffers (the CPU-only decoder) are read through the array interface: their DLPack export
    # calls into the CUDA runtime even for host memory.
    return [None if image is None
            else (torch.from_numpy(np.asarray(image)).to(device) if image.buffer_kind == host
                  else torch.from_dlpack(image)).permute(2, 0, 1) for image in images]


_BATCH_DECODERS = {"torchvision": _decode_with_torchvision, "nvimagecodec": _decode_with_nvimagecodec}
assert tuple(_BATCH_DECODERS) == JPEG_DECODERS


@functools.cache
def _nvimagecodec(device: torch.device):
    """One nvImageCodec decoder per device, built on first use and reused (it owns CUDA streams and
    a CPU thread pool): (decoder, decode params, the buffer kind of host images)."""
    # Its messages would go straight to the terminal: per-file decode failures (a file it cannot
    # decode comes back as None and is reported like any unusable image), and at import the codec
    # extensions it finds no library for (JPEG 2000, TIFF: not used here).
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    try:
        with _native_stderr_to_debug_log("nvImageCodec"):
            from nvidia import nvimgcodec
    except ImportError as exc:
        raise JpegDecoderUnavailable("the nvimagecodec JPEG decoder needs NVIDIA's nvImageCodec: pip install "
                                     "'clip-sidecar[nvimagecodec]' (CUDA 13 builds; nvidia-nvimgcodec-cu12 and "
                                     "nvidia-nvjpeg-cu12 for CUDA 12)") from exc
    if device.type not in ("cuda", "cpu"):
        raise JpegDecoderUnavailable(f"the nvimagecodec JPEG decoder decodes on CUDA or the CPU, not on {device}")
    try:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            decoder = nvimgcodec.Decoder(device_id=index)
        else:
            decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                         backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
    except RuntimeError as exc:  # e.g. its CUDA build is newer than the driver
        raise JpegDecoderUnavailable(f"nvImageCodec cannot start a decoder on {device}: {exc}") from exc
    params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB,
                                     sample_format=nvimgcodec.SampleFormat.I_RGB)
    return decoder, params, nvimgcodec.ImageBufferKind.STRIDED_HOST


@contextmanager
def _native_stderr_to_debug_log(library: str) -> Iterator[None]:
    """What native code writes to file descriptor 2 during the block goes to this module's debug log."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace").strip()
            if text:
                log.debug("%s: %s", library, text)


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode_jpeg(data, device)
    except RuntimeError:
        return None


def _decode_jpeg(data: torch.Tensor | list[torch.Tensor], device: torch.device):
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which needs
        # FFmpeg libraries; torchvision's nvjpeg path still works and is what we pin.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchCodec.*")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
