"""JPEG decode + resize on the model's device (nvjpeg on CUDA), batched: decode off the CPU's
critical path. Files this path cannot take (other formats, CMYK, bombs) go to the CPU decoder."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import CenterCrop, InterpolationMode, Resize
from torchvision.transforms.v2 import functional as F


@dataclass(frozen=True, slots=True)
class ResizeSpec:
    """Resize the shortest side to `size`, then centre-crop to `crop` — open_clip's eval transform."""

    size: int
    crop: int
    interpolation: InterpolationMode

    @classmethod
    def from_transform(cls, transform) -> "ResizeSpec":
        steps = list(getattr(transform, "transforms", [transform]))
        resize = next((s for s in steps if isinstance(s, Resize)), None)
        crop = next((s for s in steps if isinstance(s, CenterCrop)), None)
        if resize is None or crop is None or not isinstance(resize.size, (int, list, tuple)):
            raise ValueError(f"device decoding needs a Resize + CenterCrop preprocess, got {steps}")
        size = resize.size if isinstance(resize.size, int) else resize.size[0]
        return cls(size=int(size), crop=int(crop.size[0]), interpolation=resize.interpolation)


def wants_device_decode(data: bytes, *, max_pixels: int) -> bool:
    """True for a plain RGB/greyscale JPEG within the pixel limit (header read only, no decode)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return image.format == "JPEG" and image.mode in ("RGB", "L") and width * height <= max_pixels
    except Exception:  # noqa: BLE001 - anything odd is the CPU decoder's to judge and report
        return False


def decode_resize(datas: list[bytes], spec: ResizeSpec, *, device: torch.device) -> list[torch.Tensor | None]:
    """uint8 [crop, crop, 3] tensors on `device`, one per JPEG; None where decoding failed."""
    if not datas:
        return []
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    try:
        images = _decode_jpeg(encoded, device)
    except RuntimeError:
        images = [_decode_one(data, device) for data in encoded]  # find the broken file(s)
    out: list[torch.Tensor | None] = [None] * len(images)
    # Same-sized images (common: one camera, one export size) resize as one batch: a handful
    # of kernel launches per size instead of per image.
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        if image is not None:
            by_size.setdefault(tuple(image.shape), []).append(i)
    for indices in by_size.values():
        resized = _resize_crop(torch.stack([images[i] for i in indices]), spec)
        for i, pixels in zip(indices, resized):
            out[i] = pixels
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode_jpeg(data, device)
    except RuntimeError:
        return None


def _decode_jpeg(data: torch.Tensor | list[torch.Tensor], device: torch.device):
    with warnings.catch_warnings():
        # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which needs
        # FFmpeg libraries; torchvision's nvjpeg path still works and is what we pin.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchCodec.*")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)


def _resize_crop(images: torch.Tensor, spec: ResizeSpec) -> torch.Tensor:
    """[N, 3, H, W] uint8 → [N, crop, crop, 3] uint8."""
    resized = F.resize(images.float(), [spec.size], interpolation=spec.interpolation, antialias=True)
    cropped = F.center_crop(resized, [spec.crop, spec.crop])
    return cropped.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
