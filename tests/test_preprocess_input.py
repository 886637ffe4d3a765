"""Encoded images in (bytes, bytearray, memoryview, binary file objects) read as their files do;
the pixel bound refuses decompression bombs by name before decoding; one image inside a list
must not be a 4-D batch."""
import io
import struct
import typing
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from captcha_fast import api, preprocess
from captcha_fast.synth import render, sample_rng

TEXTS = ("3a7f", "0b1c", "c4d5e6")


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """Rendered captchas as PNG files: (paths, their bytes)."""
    folder = tmp_path_factory.mktemp("input")
    paths = []
    for i, text in enumerate(TEXTS):
        paths.append(folder / f"{text}.png")
        render(text, sample_rng(3, i), height=50).save(paths[-1])
    return paths, [p.read_bytes() for p in paths]


def _png(width: int, height: int, rows: int) -> bytes:
    """A grey PNG of width x height whose data holds `rows` white rows (all of them: a valid
    image; fewer: a truncated one), made without ever holding the image in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\x00" + b"\xff" * width  # filter byte 0, then the pixels
    idat = b"".join(z.compress(row) for _ in range(rows)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _Stream(io.RawIOBase):
    """A binary stream that cannot seek (a pipe, a socket, an upload)."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        return self._data.readinto(b)


def test_encoded_images_read_as_their_files(tiny_model_path, pngs):
    paths, blobs = pngs
    expected = api.predict_batch(paths, tiny_model_path)
    assert api.predict_batch(blobs, tiny_model_path) == expected
    assert api.predict_batch([bytearray(b) for b in blobs], tiny_model_path) == expected
    assert api.predict_batch([memoryview(b) for b in blobs], tiny_model_path) == expected
    assert api.predict_batch([io.BytesIO(b) for b in blobs], tiny_model_path) == expected
    assert api.predict_batch([_Stream(b) for b in blobs], tiny_model_path) == expected
    files = [open(p, "rb") for p in paths]
    try:
        assert api.predict_batch(files, tiny_model_path) == expected
    finally:
        for f in files:
            f.close()
    mixed = [blobs[0], str(paths[1]), Image.open(io.BytesIO(blobs[2]))]
    assert api.predict_batch(mixed, tiny_model_path) == expected


def test_encoded_image_tensor_equals_the_decoded_pixels(pngs):
    """Same pixels as PIL's own decode, for PNG, palette GIF with transparency and JPEG."""
    paths, blobs = pngs
    img = Image.open(paths[0])
    for fmt, kw in [("PNG", {}), ("JPEG", {"quality": 90}), ("GIF", {"transparency": 0})]:
        buf = io.BytesIO()
        (img.convert("P") if fmt == "GIF" else img.convert("RGB")).save(buf, fmt, **kw)
        want = preprocess.from_pil(Image.open(io.BytesIO(buf.getvalue())), "x")
        got = preprocess.to_tensor(buf.getvalue(), "x")
        assert got.dtype == torch.uint8 and torch.equal(got, want), fmt


@pytest.mark.parametrize("image, error, match", [
    (b"", ValueError, r"images\[1\]: the encoded image is empty \(0 bytes\)"),
    (Image.new("L", (0, 5)), ValueError, r"images\[1\]: a 0 x 5 image \(width x height\) is empty$"),
    (b"this is not an image", ValueError, r"images\[1\] \(20 bytes\) is not a readable image"),
    (io.BytesIO(b"GIF89a nonsense"), ValueError, r"images\[1\] \(BytesIO\) is not a readable image"),
    (io.StringIO("abc"), TypeError, r"images\[1\]: a text-mode file.*'rb'"),
    (torch.zeros(1, 1, 20, 40, dtype=torch.uint8), ValueError,
     r"images\[1\]: one image must be H x W or C x H x W, got a 4-D tensor of shape \(1, 1, 20, 40\)"),
    (np.zeros((1, 20, 40, 3), np.uint8), ValueError, r"images\[1\]: a numpy image must be H x W or H x W x C, got 4-D"),
    (np.array([["a"]], dtype=object), TypeError, r"images\[1\]: a numpy image must be uint8.*object"),
    (3.5, TypeError, r"images\[1\]: expected a file path, encoded image bytes.*got float"),
])
def test_bad_input_names_its_index(tiny_model_path, pngs, image, error, match):
    with pytest.raises(error, match=match):
        api.predict_batch([pngs[1][0], image], tiny_model_path)


def test_truncated_bytes_are_unreadable_by_index(tiny_model_path, pngs):
    blob = pngs[1][0]
    with pytest.raises(ValueError, match=r"images\[0\] \(60 bytes\) is not a readable image"):
        api.predict_batch([blob[:60]], tiny_model_path)


def test_bytes_alone_are_not_a_batch(tiny_model_path, pngs):
    with pytest.raises(TypeError, match="wrap one image in a list"):
        api.predict_batch(pngs[1][0], tiny_model_path)


def test_the_type_hints_take_a_batch_not_one_image():
    """One image is refused (above): the hints admit a list of images or an N x C x H x W tensor."""
    batch = typing.Union[typing.Sequence[preprocess.ImageLike], torch.Tensor]
    assert typing.get_type_hints(api.predict_batch)["images"] == batch
    assert typing.get_type_hints(preprocess.to_tensors)["images"] == batch


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, at 89 M pixels
def test_a_bomb_is_refused_from_its_header_before_decoding(tiny_model_path, pngs):
    """The issue's 20000 x 8000 white PNG, and the same header over a truncated body: were the
    body decoded, the second would fail as unreadable; it fails on its pixel count instead."""
    bomb = _png(20000, 8000, rows=8000)
    assert len(bomb) < 300_000  # a small upload
    header_only = _png(20000, 8000, rows=2)
    for image in (bomb, header_only, io.BytesIO(header_only), Image.open(io.BytesIO(header_only))):
        with pytest.raises(ValueError, match=r"images\[1\].*a 20000 x 8000 image \(width x height\) has "
                                             r"160,000,000 pixels, "
                                             r"above max_pixels = 4,000,000"):
            api.predict_batch([pngs[1][0], image], tiny_model_path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_bomb_file_is_refused_by_its_path(tiny_model_path, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(20000, 8000, rows=2))
    with pytest.raises(ValueError, match=r"bomb.png'.*160,000,000 pixels"):
        api.predict_batch([path], tiny_model_path)


def test_the_pixel_bound_is_a_setting_for_every_input_kind(monkeypatch, pngs):
    paths, blobs = pngs
    H, W = Image.open(paths[0]).size[::-1]
    pixels = torch.zeros(3, H, W, dtype=torch.uint8)
    kinds = [blobs[0], str(paths[0]), Image.open(paths[0]), pixels, pixels.permute(1, 2, 0).numpy(), pixels[None]]
    for image in kinds:
        preprocess.to_tensors(image if isinstance(image, torch.Tensor) and image.dim() == 4 else [image])
    monkeypatch.setattr(preprocess, "MAX_PIXELS", H * W - 1)  # read at call time
    for image in kinds:
        with pytest.raises(ValueError, match=rf"a {W} x {H} image \(width x height\) has {H * W:,} pixels, above "
                                             rf"max_pixels = {H * W - 1:,}"):
            preprocess.to_tensors(image if isinstance(image, torch.Tensor) and image.dim() == 4 else [image])
    assert len(preprocess.to_tensors([blobs[0]], max_pixels=H * W)) == 1  # the argument wins over the setting
