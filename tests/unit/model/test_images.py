"""The bad-image corpus: every awkward real-world file is converted or refused with a reason."""

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sidecar.config import JPEG_DECODERS
from sidecar.model.images import (
    ImageDecodeError,
    ImagePreprocess,
    JpegDecoderUnavailable,
    check_jpeg_decoder,
    decode_bytes,
    decode_image,
    load_rgb,
    open_image,
    stack_pixels,
)
from tests.support import repeat_last_scan

LIMIT = 10_000_000


def _png_header(width: int, height: int) -> bytes:
    """A PNG's chunks up to its (empty) image data: a size no test should have to allocate."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


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



def test_a_float_tiff_of_zero_to_one_keeps_its_range_instead_of_decoding_black():
    array = np.full((8, 8), 0.6, dtype=np.float32)
    array[0, 0], array[0, 1], array[0, 2] = 1.0, -0.5, np.nan
    image = decode_image(_encode(Image.fromarray(array), "TIFF"), max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert 145 < image.getpixel((4, 4))[0] < 160  # 0.6 of white
    assert image.getpixel((1, 0)) == image.getpixel((2, 0)) == (0, 0, 0)  # below zero and NaN: black

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



class _ReadExtent(io.BytesIO):
    """Bytes that remember the furthest offset a reader reached."""

    furthest = 0

    def read(self, size=-1):
        data = super().read(size)
        self.furthest = max(self.furthest, self.tell())
        return data


@pytest.mark.parametrize("fmt", ["TIFF", "GIF"])
def test_a_many_page_file_is_read_no_further_than_its_first_page(fmt):
    # Counting the pages walks every one (Pillow's TIFF reader in quadratic time: 2 MB of
    # 1x1 pages took 3.4 s a request), and only the first is ever decoded.
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # greyscale: GIF needs no quantising
    pages = [Image.new("RGB", (64, 64), (255, 0, 0))] + [Image.fromarray(np.roll(noise, i)) for i in range(300)]
    data = _encode(pages[0], fmt, save_all=True, append_images=pages[1:])
    stream = _ReadExtent(data)
    r, g, _ = decode_image(stream, max_pixels=LIMIT).getpixel((4, 4))
    assert r > 200 and g < 50
    # The first page and one read-ahead block of Pillow's (64 KiB): a tenth of the file.
    assert stream.furthest < len(data) // 10, f"read {stream.furthest} of {len(data)} bytes"


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [
        (b"definitely not an image", "format", "not a recognised image format"),
        (_encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:300], "corrupt", "corrupt or truncated"),
        (_encode(Image.new("L", (4000, 3000)), "PNG"), "too_large", "12000000 pixels, over the limit of 10000000"),
        # Past twice Pillow's MAX_IMAGE_PIXELS Image.open itself refuses, before the size check: its words were
        # "could be decompression bomb DOS attack", naming no setting.
        (_png_header(20000, 10000), "too_large",
         r"^image is 200000000 pixels, over the limit of 10000000 \(max_image_pixels\)$"),
    ],
    ids=["garbage", "truncated", "bomb", "pillow-bomb"],
)
def test_unusable_files_are_refused_with_a_reason(data, kind, message):
    with pytest.raises(ImageDecodeError, match=message) as info:
        decode_image(data, max_pixels=LIMIT)
    assert info.value.kind == kind


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\nbroken", b"GIF89a broken", b"BM broken"],
                         ids=["PNG", "GIF", "BMP"])
def test_an_accepted_format_whose_header_is_broken_is_called_corrupt_not_a_refused_format(data):
    # It said "PNG is not an accepted image format (image_formats: JPEG, PNG, …)": a list naming the format refused.
    with pytest.raises(ImageDecodeError, match=r"^corrupt or truncated image: a \w+ signature, then a header") as info:
        decode_image(data, max_pixels=LIMIT)
    assert info.value.kind == "corrupt"
    assert "not an accepted image format" not in info.value.reason


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
    preprocess = _preprocess("shortest")
    assert preprocess.wants_device_decode(data, max_pixels=LIMIT)
    assert not preprocess.wants_device_decode(_encode(Image.new("CMYK", (8, 8)), "JPEG"), max_pixels=LIMIT)
    assert not preprocess.wants_device_decode(_encode(_photo(0), "PNG"), max_pixels=LIMIT)
    assert not preprocess.wants_device_decode(data, max_pixels=100)


def test_wants_device_decode_leaves_a_progressive_jpeg_of_more_scans_than_max_scans_to_the_cpu_decoder():
    progressive = _encode(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG", progressive=True)  # 10 scans
    preprocess = _preprocess("shortest")
    assert preprocess.wants_device_decode(progressive, max_pixels=LIMIT)
    assert not preprocess.wants_device_decode(progressive, max_pixels=LIMIT, max_scans=9)
    assert not preprocess.wants_device_decode(repeat_last_scan(progressive, 200), max_pixels=LIMIT)  # 209 > 100


# The one place the CPU path (PIL draft decode + open_clip's PIL steps) and the device path
# (full decode + tensor resize) are held to a tolerance: mean absolute difference per channel
# value, on 0..255, below DEVICE_TOLERANCE for every resize mode open_clip builds.
DEVICE_TOLERANCE = 4.0


@pytest.mark.parametrize("decoder", JPEG_DECODERS)
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("shape", [(120, 160, 3), (160, 90, 3)], ids=["landscape", "portrait"])
def test_device_path_matches_the_cpu_path_within_tolerance_for_every_resize_mode(resize_mode, shape, decoder):

    preprocess = _preprocess(resize_mode)
    data = _encode(_photo(1, shape), "JPEG", quality=95)
    on_device, broken = preprocess.decode_on_device([data, data[:200]], device=torch.device("cpu"), decoder=decoder)
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


@pytest.mark.parametrize("decoder", JPEG_DECODERS)
def test_device_decoding_batches_same_sized_images_and_keeps_the_order(decoder):

    preprocess = _preprocess("shortest", size=24)
    rng = np.random.default_rng(1)
    jpegs = [_encode(Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)), "JPEG", quality=95)
             for shape in [(40, 48, 3), (64, 64, 3), (40, 48, 3), (30, 90, 3)]]
    cpu = torch.device("cpu")
    together = preprocess.decode_on_device(jpegs, device=cpu, decoder=decoder)
    alone = [preprocess.decode_on_device([data], device=cpu, decoder=decoder)[0] for data in jpegs]
    for got, want in zip(together, alone):
        assert got.shape == (24, 24, 3)
        assert torch.equal(got, want)


def test_the_jpeg_decoders_give_the_same_pixels_upright_in_rgb_and_the_same_failures():
    # On a CPU device both decode with libjpeg-turbo: any difference is in the wrapping (orientation,
    # greyscale to RGB, channel order, which files fail).
    preprocess = _preprocess("squash", size=24)
    rotated = _photo(2, (40, 64, 3))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees clockwise
    jpegs = [_encode(_photo(3, (48, 40, 3)), "JPEG", quality=95),
             _encode(_photo(4, (40, 40, 3)).convert("L"), "JPEG", quality=95),
             _encode(rotated, "JPEG", quality=95, exif=exif.tobytes()),
             _encode(_photo(5, (40, 40, 3)), "JPEG")[:150],
             b"\xff\xd8 not a JPEG after its first two bytes"]
    cpu = torch.device("cpu")
    by = {decoder: preprocess.decode_on_device(jpegs, device=cpu, decoder=decoder) for decoder in JPEG_DECODERS}
    for decoder, images in by.items():
        assert [image is None for image in images] == [False, False, False, True, True], decoder
    for at, name in enumerate(("colour", "grey", "exif-rotated")):
        want = preprocess.decode(jpegs[at], max_pixels=LIMIT).astype(np.float32)  # the CPU path: PIL
        for decoder, images in by.items():
            difference = np.abs(images[at].numpy().astype(np.float32) - want).mean()
            assert difference < DEVICE_TOLERANCE, (decoder, name, difference)
    assert all(torch.equal(a, b) for a, b in zip(*(images[:3] for images in by.values())))


def test_an_unknown_or_missing_jpeg_decoder_is_refused_before_any_work_naming_the_fix(monkeypatch):
    with pytest.raises(ValueError, match=r"jpeg_decoder='nvjpeg2000': choose one of torchvision, nvimagecodec"):
        check_jpeg_decoder("nvjpeg2000", torch.device("cpu"))
    check_jpeg_decoder("nvimagecodec", torch.device("cpu"))  # installed with the dev extra
    # Not installed: what a user without the extra gets (the import made to fail, as it would).
    import nvidia

    from sidecar.model import images

    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)
    monkeypatch.delattr(nvidia, "nvimgcodec")
    images._nvimagecodec.cache_clear()
    try:
        with pytest.raises(JpegDecoderUnavailable, match=r"pip install 'clip-sidecar\[nvimagecodec\]'"):
            check_jpeg_decoder("nvimagecodec", torch.device("cpu"))
    finally:
        images._nvimagecodec.cache_clear()


# ---- what an image may cost, checked from its header ------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n"


def test_only_allowed_formats_are_opened_and_a_refusal_names_image_formats_only_where_it_chose_them():
    # EPS would hand the bytes to Ghostscript; it never reaches a decoder. The built-in list (the CLI's files) is
    # no setting's: its refusal named image_formats, which only uploads follow.
    with pytest.raises(ImageDecodeError, match=r"^EPS is not an accepted image format \(accepted: JPEG, PNG, WEBP, "
                                               r"GIF, BMP, TIFF; convert it to one of them\)$") as info:
        decode_image(EPS, max_pixels=LIMIT)
    assert info.value.kind == "format"
    png = _encode(Image.new("RGB", (8, 8)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"^PNG is not an accepted image format \(image_formats: JPEG\)$"):
        decode_image(png, max_pixels=LIMIT, formats=("JPEG",))
    assert decode_image(png, max_pixels=LIMIT).size == (8, 8)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_the_cpu_pixels_are_open_clips_own_transform_within_one_level(resize_mode):
    # pixels() runs open_clip's resize and crop with torch's uint8 kernels instead of PIL's: the
    # model must see what open_clip's transform (PIL) would give it, image sizes above, at and
    # below the input size, landscape and portrait.
    preprocess = _preprocess(resize_mode)
    rng = np.random.default_rng(4)
    for height, width in [(120, 160), (160, 90), (32, 43), (20, 25), (300, 200)]:
        y, x = np.mgrid[0:height, 0:width]
        smooth = np.stack([128 + 100 * np.sin(x / 7 + c) * np.cos(y / 5 + c) for c in range(3)], axis=-1)
        image = Image.fromarray(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8))
        want = np.asarray(preprocess.pil_steps(image)).astype(np.int16)
        got = preprocess.pixels(image)
        assert got.shape == want.shape and got.dtype == np.uint8 and got.flags.c_contiguous
        difference = np.abs(got.astype(np.int16) - want)
        # Rounding between the two passes differs now and then (most where height and width shrink by
        # different factors: squash of 160 x 90, 15 % of values); never by more than one level.
        assert difference.max() <= 1 and difference.mean() < 0.2, ((height, width), difference.mean())


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(160, 120), (90, 160), (10, 400), (400, 7)], ids=str)
def test_resized_shape_is_what_the_resize_step_makes(resize_mode, size):
    preprocess = _preprocess(resize_mode)
    resize = preprocess.pil_steps.transforms[0]
    width, height = resize(Image.new("RGB", size)).size
    assert preprocess.spec.resized_shape(size[1], size[0]) == (height, width)


def test_a_jpeg_the_resize_would_stretch_past_max_resized_side_is_left_to_the_cpu_decoder_which_refuses_it():
    # The device decoder resized it (a 20000x50 panorama: 12,800 px wide) and the job stored what the CPU path and
    # the API refuse.
    preprocess = _preprocess("shortest", size=32)
    panorama = _encode(Image.new("RGB", (20000, 50), (90, 120, 200)), "JPEG")
    assert not preprocess.wants_device_decode(panorama, max_pixels=LIMIT)
    assert preprocess.wants_device_decode(panorama, max_pixels=LIMIT, max_resized_side=12_800)
    with pytest.raises(ImageDecodeError, match=r"over the built-in limit of 8192 pixels a side$"):
        preprocess.decode(panorama, max_pixels=LIMIT)


def test_an_image_the_resize_would_stretch_past_max_resized_side_is_refused_naming_the_setting_only_if_it_chose_it():
    # The CLI's decodes (no limit passed: the built-in one) named max_resized_side, which changes nothing there.
    preprocess = _preprocess("shortest", size=32)
    data = _encode(Image.new("RGB", (4000, 4)), "PNG")  # the shorter side to 32: 32,000 x 32
    with pytest.raises(ImageDecodeError, match=r"4000x4: the model's resize would make it 32000x32, over the limit of "
                                               r"8192 pixels a side \(max_resized_side\)") as info:
        preprocess.open(data, max_pixels=LIMIT, max_resized_side=8192)
    assert info.value.kind == "too_large"
    with pytest.raises(ImageDecodeError, match=r"32000x32, over the built-in limit of 8192 pixels a side$"):
        preprocess.decode(data, max_pixels=LIMIT)
    assert preprocess.decode(data, max_pixels=LIMIT, max_resized_side=32_000).shape == (32, 32, 3)


def test_open_reads_the_header_only_and_load_decodes(tmp_path):
    data = _encode(Image.new("RGB", (2000, 1500), (1, 2, 3)), "JPEG")
    image = open_image(data, max_pixels=LIMIT, draft_size=(224, 224))
    # JPEG: the size the draft decode will have, which the memory budget is charged for.
    assert image.size == (500, 375) and decode_bytes(image) == 500 * 375 * 16
    assert image.tile  # its tiles are still to be decoded
    assert load_rgb(image).size == (500, 375)


def test_running_out_of_memory_while_decoding_is_too_large_not_a_crash(tmp_path):
    # A real MemoryError: a child process whose address space ends 64 MB above its current use
    # decodes a 48-megapixel image (its pixels alone need 48 MB, the RGB conversion 192 MB).
    path = tmp_path / "big.png"
    Image.new("L", (8000, 6000)).save(path)
    script = f"""
import resource
from sidecar.model.images import ImageDecodeError, decode_image
data = open({str(path)!r}, "rb").read()
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (used + 64 * 2**20, resource.RLIM_INFINITY))
try:
    decode_image(data, max_pixels=10**9)
except ImageDecodeError as exc:
    print(exc.kind, exc.reason)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parents[3])
    assert result.stdout.strip() == "too_large not enough memory to decode the image", result.stderr


def test_a_batch_of_host_arrays_and_device_tensors_stacks_in_the_items_order():
    # A split decode hands the model some pixels from the workers (arrays), the rest from the device.
    pixels = [np.full((4, 4, 3), i, dtype=np.uint8) if i % 3 else torch.full((4, 4, 3), i, dtype=torch.uint8)
              for i in range(7)]
    batch = stack_pixels(pixels, torch.device("cpu"))
    assert isinstance(batch, torch.Tensor) and batch.shape == (7, 4, 4, 3) and batch.dtype == torch.uint8
    assert batch[:, 0, 0, 0].tolist() == list(range(7))
    assert isinstance(stack_pixels(pixels[1:3], torch.device("cpu")), np.ndarray)  # arrays only: one host array


def test_a_progressive_jpeg_of_more_scans_than_max_scans_is_refused_from_its_bytes_alone():
    progressive = _encode(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG", progressive=True)
    assert progressive.count(b"\xff\xda") == 10  # libjpeg's script for colour
    bomb = repeat_last_scan(progressive, 200)
    with pytest.raises(ImageDecodeError, match=r"progressive JPEG of 209 scans, over the limit of 100 "
                                               r"\(max_jpeg_scans\)") as info:
        open_image(bomb, max_pixels=LIMIT, max_scans=100)
    assert info.value.kind == "too_large"
    # No limit passed (the CLI's decodes): the built-in one, and no setting named, as none changes it there.
    with pytest.raises(ImageDecodeError, match=r"209 scans, over the built-in limit of 100: each scan"):
        open_image(bomb, max_pixels=LIMIT)
    assert load_rgb(open_image(progressive, max_pixels=LIMIT, max_scans=10)).size == (64, 64)
    assert load_rgb(open_image(bomb, max_pixels=LIMIT, max_scans=209)).size == (64, 64)  # the limit refused it


# The start of an iPhone photo: an ISO base media file whose major brand is HEIC. Pillow has no plugin for it.
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)


def test_a_heic_photo_is_refused_naming_heif_not_as_an_unrecognised_file():
    with pytest.raises(ImageDecodeError, match=r"^HEIF is not an accepted image format \(accepted: JPEG") as info:
        decode_image(HEIC, max_pixels=LIMIT)
    assert info.value.kind == "format"
