"""The bad-image corpus: every awkward real-world file is converted or refused with a reason."""

import io

import numpy as np
import pytest
from PIL import Image

from sidecar.model.images import ImageDecodeError, ImagePreprocess, decode_image

LIMIT = 10_000_000


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_plain_jpeg_decodes_to_rgb():
    image = decode_image(_encode(Image.new("RGB", (40, 30), (200, 10, 10)), "JPEG"), max_pixels=LIMIT)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_cmyk_is_converted():
    image = decode_image(_encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), max_pixels=LIMIT)
    assert image.mode == "RGB"
    r, g, b = image.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_greyscale_keeps_its_range():
    array = np.full((8, 8), 40000, dtype=np.uint16)
    array[0, 0] = 65535
    image = decode_image(_encode(Image.fromarray(array), "PNG"), max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert 140 < image.getpixel((4, 4))[0] < 170  # 40000/65535 of white, not clipped to 255


def test_palette_with_transparency_goes_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] * 256)
    data = _encode(image, "PNG", transparency=0)
    assert decode_image(data, max_pixels=LIMIT).getpixel((1, 1)) == (255, 255, 255)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode_image(_encode(image, "JPEG", exif=exif.tobytes()), max_pixels=LIMIT)
    assert decoded.size == (20, 40)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    r, g, _ = decode_image(buffer.getvalue(), max_pixels=LIMIT).getpixel((5, 5))
    assert r > 200 and g < 50


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [
        (b"definitely not an image", "format", "not a recognised image format"),
        (_encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:300], "corrupt", "corrupt or truncated"),
        (_encode(Image.new("L", (4000, 3000)), "PNG"), "too_large", "12000000 pixels, over the limit of 10000000"),
    ],
    ids=["garbage", "truncated", "bomb"],
)
def test_unusable_files_are_refused_with_a_reason(data, kind, message):
    with pytest.raises(ImageDecodeError, match=message) as info:
        decode_image(data, max_pixels=LIMIT)
    assert info.value.kind == kind


def test_draft_decoding_keeps_at_least_the_model_size():
    data = _encode(Image.new("RGB", (2000, 1500), (1, 2, 3)), "JPEG")
    image = decode_image(data, max_pixels=LIMIT, draft_size=(224, 224))
    assert min(image.size) >= 224 and image.size[0] < 2000


def _photo(seed: int, shape=(120, 160, 3)) -> Image.Image:
    """Blocky random content: resizing is smooth enough that two good resamplers agree closely."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (shape[0] // 10, shape[1] // 10, 3))
    return Image.fromarray(np.kron(blocks, np.ones((10, 10, 1))).astype(np.uint8))


def _preprocess(resize_mode: str, size=32):
    from open_clip.transform import image_transform

    return ImagePreprocess(image_transform(size, is_train=False, resize_mode=resize_mode))


def test_wants_device_decode_takes_plain_jpegs_within_the_limit_only():
    data = _encode(_photo(0), "JPEG", quality=95)
    assert ImagePreprocess.wants_device_decode(data, max_pixels=LIMIT)
    assert not ImagePreprocess.wants_device_decode(_encode(Image.new("CMYK", (8, 8)), "JPEG"), max_pixels=LIMIT)
    assert not ImagePreprocess.wants_device_decode(_encode(_photo(0), "PNG"), max_pixels=LIMIT)
    assert not ImagePreprocess.wants_device_decode(data, max_pixels=100)


# The one place the CPU path (PIL draft decode + open_clip's PIL steps) and the device path
# (full decode + tensor resize) are held to a tolerance: mean absolute difference per channel
# value, on 0..255, below DEVICE_TOLERANCE for every resize mode open_clip builds.
DEVICE_TOLERANCE = 4.0


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("shape", [(120, 160, 3), (160, 90, 3)], ids=["landscape", "portrait"])
def test_device_path_matches_the_cpu_path_within_tolerance_for_every_resize_mode(resize_mode, shape):
    import torch

    preprocess = _preprocess(resize_mode)
    data = _encode(_photo(1, shape), "JPEG", quality=95)
    on_device, broken = preprocess.decode_on_device([data, data[:200]], device=torch.device("cpu"))
    on_cpu = preprocess.decode(data, max_pixels=LIMIT)
    assert broken is None
    assert on_cpu.shape == (32, 32, 3) and tuple(on_device.shape) == (32, 32, 3) and on_device.dtype == torch.uint8
    assert np.abs(on_device.numpy().astype(np.float32) - on_cpu.astype(np.float32)).mean() < DEVICE_TOLERANCE


def test_resize_spec_follows_open_clips_resize_mode():
    from torchvision.transforms import InterpolationMode

    shortest, longest, squash = (_preprocess(m).spec for m in ("shortest", "longest", "squash"))
    assert (shortest.mode, shortest.crop, shortest.pad_fill) == ("edge", (32, 32), None)
    assert (longest.mode, longest.longest, longest.crop, longest.pad_fill) == ("keep_ratio", 1.0, (32, 32), 0)
    assert (squash.mode, squash.size, squash.crop) == ("exact", (32, 32), None)
    assert shortest.interpolation == InterpolationMode.BICUBIC
    # A 120 x 160 image: shortest fits the short side (then crops), longest the long side (then pads).
    assert shortest.resized_size(120, 160) == [32]
    assert longest.resized_size(120, 160) == [24, 32]
    assert squash.resized_size(120, 160) == [32, 32]


def test_device_decoding_batches_same_sized_images_and_keeps_the_order():
    import torch

    preprocess = _preprocess("shortest", size=24)
    rng = np.random.default_rng(1)
    jpegs = [_encode(Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)), "JPEG", quality=95)
             for shape in [(40, 48, 3), (64, 64, 3), (40, 48, 3), (30, 90, 3)]]
    together = preprocess.decode_on_device(jpegs, device=torch.device("cpu"))
    alone = [preprocess.decode_on_device([data], device=torch.device("cpu"))[0] for data in jpegs]
    for got, want in zip(together, alone):
        assert got.shape == (24, 24, 3)
        assert torch.equal(got, want)
