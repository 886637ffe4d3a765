"""Images -> model input, in one place, for inference and training alike.

    paths / bytes / files / PIL / numpy / tensors
                                  --to_tensors--> [(C, H, W) uint8 or float in [0, 1]]   (Python)
                                  --collate----> (N, in_channels, height, W_max) float32, widths (N,)
                                                 (TorchScript: the saved Recognizer runs it too)

collate composites RGBA on white (the alpha often carries the anti-aliasing), or light
text on black (to_channels), converts to grey (ITU-R 601 luma, as PIL's convert("L")) or
RGB, resizes to the model's height keeping the aspect ratio (antialiased bilinear) and
right-pads with PAD_VALUE, remembering each width. Training builds its batches with the
same functions, so a model sees at inference exactly what it saw in training.

Every error names the culprit (its index in the input, or its path)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

ImageLike = Any  # str | os.PathLike | bytes | binary file | PIL.Image.Image | numpy.ndarray | Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PAD_VALUE = 0.0     # the CRNN masks padding, so the value only has to be one value everywhere
MIN_WIDTH = 4       # two 2x2 pools: narrower inputs would give no frame
MAX_WIDTH = 4096    # default bound on a resized width: 128:1 at height 32, far beyond a text line


# ----------------------------------------------------------------------------- Python: anything -> tensors

MAX_PIXELS = 4_000_000
"""Default bound on an input image's pixels (H x W, any kind of input): larger ones are refused by
name -- for encoded images from the file's header, before decoding. A 175 kB PNG can hold a
20000 x 8000 white page, which takes seconds and gigabytes to decode and read; a captcha is a few
thousand pixels. Raise it here (or pass max_pixels= to to_tensors) for larger inputs."""


RAISE_MAX_PIXELS = ", or raise captcha_fast.preprocess.MAX_PIXELS"
"""check_pixels' advice where MAX_PIXELS is the limit (Python callers: the CLI, which cannot follow it, drops it)."""


def check_pixels(H: int, W: int, name: str, max_pixels: Optional[int] = None) -> None:
    """ValueError naming the image if its H * W pixels exceed max_pixels (None: MAX_PIXELS, and the advice to
    raise it; a caller with its own limit, as the server's --max-pixels, knows how that is set)."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if H * W > limit:
        raise ValueError(f"{name}: a {W} x {H} image (width x height) has {H * W:,} pixels, above max_pixels = "
                         f"{limit:,} (a decompression bomb?): crop or shrink it"
                         f"{RAISE_MAX_PIXELS if max_pixels is None else ''}")


def _check_range(t: Tensor, name: str) -> None:
    """ValueError naming the image unless a float image holds values in [0, 1] (NaN fails): the
    scripted path leaves this check out for speed."""
    if t.is_floating_point():
        lo, hi = torch.aminmax(t)
        if not (0.0 <= float(lo) and float(hi) <= 1.0):  # also catches NaN
            raise ValueError(f"{name}: a float image must hold values in [0, 1], got [{float(lo):.4g}, {float(hi):.4g}]")


def _check_tensor(t: Tensor, name: str, max_pixels: Optional[int] = None) -> Tensor:
    """A (C, H, W) view of the one image `t` (H x W or C x H x W), after the scripted checks (on `t`
    as given, so that errors quote the caller's shape), the pixel bound and the value range."""
    if t.dim() == 4:  # check_image takes N x C x H x W (a batch): one image is not one
        raise ValueError(f"{name}: one image must be H x W or C x H x W, got a 4-D tensor of shape "
                         f"{tuple(t.shape)}; pass an N x C x H x W batch as the whole `images`, not inside a list")
    check_image(t, name)
    check_pixels(t.shape[-2], t.shape[-1], name, max_pixels)
    _check_range(t, name)
    return t.unsqueeze(0) if t.dim() == 2 else t


NUMPY_DTYPES = ("uint8", "float16", "float32", "float64")
"""The dtypes of numpy images to_tensor takes (floats hold values in [0, 1]), in either byte order."""


def _check_numpy(a, name: str, max_pixels: Optional[int] = None) -> None:
    """ValueError (TypeError for the dtype) naming the image unless the numpy array `a` is one that
    to_tensor takes -- H x W or H x W x C (C = 1, 3 or 4, channels last, as PIL and OpenCV give them),
    not empty, a dtype of NUMPY_DTYPES, at most max_pixels pixels -- in the caller's terms: numpy's
    shape and dtype, before any conversion. (The value range of a float image is _check_range's.)"""
    if a.ndim not in (2, 3):
        raise ValueError(f"{name}: a numpy image must be H x W or H x W x C, got {a.ndim}-D, shape {a.shape}")
    if a.ndim == 3 and a.shape[2] not in (1, 3, 4):
        hint = ("; numpy images are height x width x channels (PIL's and OpenCV's order): for a channels-first "
                "array, pass a.transpose(1, 2, 0)") if a.shape[0] in (1, 3, 4) else ""
        raise ValueError(f"{name}: a numpy image must be H x W or H x W x C with C = 1 (grey), 3 (RGB) or 4 (RGBA), "
                         f"got shape {a.shape}{hint}")
    if a.size == 0:
        raise ValueError(f"{name}: the numpy image is empty, shape {a.shape}")
    if a.dtype.name not in NUMPY_DTYPES:
        raise TypeError(f"{name}: a numpy image must be uint8, or float16, float32 or float64 with values in [0, 1], "
                        f"got dtype {a.dtype}")
    check_pixels(a.shape[0], a.shape[1], name, max_pixels)


def from_pil(img, name: str, max_pixels: Optional[int] = None) -> Tensor:
    """A PIL image as a (C, H, W) uint8 tensor, C = 1 (L), 3 (RGB) or 4 (RGBA). The pixel bound is
    checked on its size first, so a lazily opened image (Image.open) is not decoded when too large."""
    import numpy as np

    check_pixels(img.height, img.width, name, max_pixels)
    if img.mode not in ("L", "RGB", "RGBA"):
        # palette / grey+alpha / 1-bit / 16-bit: RGBA keeps any transparency, L the rest
        has_alpha = img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        img = img.convert("RGBA" if has_alpha else ("L" if img.mode in ("1", "I", "I;16", "F") else "RGB"))
    a = np.asarray(img)
    if a.size == 0:
        raise ValueError(f"{name}: a {img.width} x {img.height} image (width x height) is empty")
    t = torch.from_numpy(a.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()  # (C, H, W)


def decode_image(source, name: str, max_pixels: Optional[int] = None) -> Tensor:
    """An encoded image -- a path, or a binary file object, seekable or not -- as a (C, H, W) uint8
    tensor; ValueError naming it if it is not a readable image, or if its header gives more than
    max_pixels pixels (None: MAX_PIXELS): then nothing is decoded."""
    from PIL import Image, UnidentifiedImageError

    unreadable = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
    try:
        img = Image.open(source)  # reads the header only
    except UnidentifiedImageError:  # (PIL's message names a file object by its repr: <_io.BytesIO object at 0x...>)
        raise ValueError(f"{name} is not a readable image (not in an image format PIL knows)") from None
    except unreadable as e:
        raise ValueError(f"{name} is not a readable image ({type(e).__name__}: {e})") from None
    with img:
        check_pixels(img.height, img.width, name, max_pixels)
        try:
            img.load()  # decodes now, so a truncated/corrupt image fails here with its name
        except unreadable as e:
            raise ValueError(f"{name} is not a readable image ({type(e).__name__}: {e})") from None
        return from_pil(img, name, max_pixels)


def load_image(path: str | os.PathLike, max_pixels: Optional[int] = None) -> Tensor:
    """The image file at `path` as a (C, H, W) uint8 tensor (C = 1, 3 or 4).
    A pipe is read as it streams (`captcha-fast predict <(curl -s URL)`).
    FileNotFoundError (IsADirectoryError for a folder), or ValueError naming the file if it is not
    a readable image or has more than max_pixels pixels (None: MAX_PIXELS)."""
    p = Path(path)
    if not p.is_file():  # (one stat for the usual case, a file)
        if p.is_dir():  # (the CLI's predict expands folders; predict_batch takes their files)
            raise IsADirectoryError(f"{str(p)!r} is a folder, not an image file: pass the image files in it "
                                    f"(`captcha-fast predict {p}` reads a folder)")
        if not p.exists():
            raise FileNotFoundError(f"image file not found: {str(p)!r}")
        with open(p, "rb") as stream:  # a pipe or a device: PIL would seek in it
            return decode_image(stream, repr(str(p)), max_pixels)
    return decode_image(p, repr(str(p)), max_pixels)


def to_tensor(image: ImageLike, name: str = "image", max_pixels: Optional[int] = None) -> Tensor:
    """One image -- a path, encoded bytes (bytes, bytearray, memoryview) or a binary file object,
    a PIL image, a numpy H x W [x C] array, or an H x W / C x H x W tensor -- as a (C, H, W) tensor,
    uint8 or float in [0, 1]. Images of more than max_pixels pixels (None: MAX_PIXELS) are refused."""
    if isinstance(image, Tensor):
        return _check_tensor(image, name, max_pixels)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        size = memoryview(image).nbytes
        if size == 0:
            raise ValueError(f"{name}: the encoded image is empty (0 bytes)")
        return decode_image(io.BytesIO(image), f"{name} ({size} bytes)", max_pixels)
    if isinstance(image, io.TextIOBase):
        raise TypeError(f"{name}: a text-mode file; open images in binary mode ('rb')")
    if hasattr(image, "read"):  # a binary file object: open file, BytesIO, a stream
        return decode_image(image, f"{name} ({getattr(image, 'name', type(image).__name__)})", max_pixels)
    from PIL import Image

    if isinstance(image, Image.Image):
        return from_pil(image, name, max_pixels)
    if type(image).__module__ == "numpy":
        _check_numpy(image, name, max_pixels)
        a = image.transpose(2, 0, 1) if image.ndim == 3 else image[None]  # numpy images are H x W x C (PIL, OpenCV)
        t = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), order="C"))  # a copy, in native byte order
        _check_range(t, name)
        return t
    raise TypeError(f"{name}: expected a file path, encoded image bytes, a binary file object, a PIL image, "
                    f"a numpy array or a tensor, got {type(image).__name__}")


def to_tensors(images: Sequence[ImageLike] | Tensor, max_pixels: Optional[int] = None) -> List[Tensor]:
    """A batch of images as a list of (C, H, W) tensors.

    `images` is an N x C x H x W tensor, or a list/tuple of images of any kind that
    `to_tensor` takes (widths and heights may differ). A single path or image is
    not a batch: wrap it in a list. Images of more than max_pixels pixels (None: MAX_PIXELS,
    read at call time) are refused by name."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images: a batch tensor must be N x C x H x W, got a {images.dim()}-D tensor of shape "
                             f"{tuple(images.shape)}; pass a list for single images")
        if images.shape[0] == 0:
            raise ValueError("images: the batch is empty (N = 0)")
        check_image(images, "images")  # one set of checks for the whole batch
        check_pixels(images.shape[-2], images.shape[-1], "images", max_pixels)
        _check_range(images, "images")
        return list(images.unbind(0))
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected a list of images or an N x C x H x W tensor, got {type(images).__name__}"
                        + ("; wrap one image in a list" if isinstance(images, (str, os.PathLike, bytes)) else ""))
    if len(images) == 0:
        raise ValueError("images: the list is empty")
    return [to_tensor(img, f"images[{i}]", max_pixels) for i, img in enumerate(images)]


# ----------------------------------------------------------------------------- TorchScript: tensors -> batch

def check_image(img: Tensor, name: str):
    """ValueError naming the image unless it is H x W or C x H x W (C = 1, 3, 4 channels first,
    or N x C x H x W for a batch), non-empty, uint8 or floating point."""
    if img.dim() < 2 or img.dim() > 4:
        raise ValueError(name + ": an image must be H x W or C x H x W, got a " + str(img.dim()) + "-D tensor of shape "
                         + str(list(img.shape)))
    if img.dim() >= 3 and img.shape[-3] != 1 and img.shape[-3] != 3 and img.shape[-3] != 4:
        raise ValueError(name + ": an image must have 1 (grey), 3 (RGB) or 4 (RGBA) channels first (C x H x W), "
                         "got shape " + str(list(img.shape)))
    if img.shape[-1] == 0 or img.shape[-2] == 0:
        raise ValueError(name + ": the image is empty, shape " + str(list(img.shape)))
    if img.dtype != torch.uint8 and not img.is_floating_point():
        raise ValueError(name + ": an image must be uint8 or float in [0, 1], got dtype " + str(img.dtype))


def resized_width(H: int, W: int, height: int) -> int:
    """The width of an H x W image resized to `height` (aspect kept, rounded), at least MIN_WIDTH."""
    return max(4, int(W * height / H + 0.5))  # 4 = MIN_WIDTH (TorchScript can't read globals)


def check_width(H: int, W: int, height: int, max_width: int, name: str) -> int:
    """resized_width, or a ValueError naming the image when it exceeds max_width: the work of
    the resize and the model grows with it (a 100000 x 1 strip is 3.2 million px wide at 32). Messages
    give sizes width x height, PIL's order, and say so."""
    new_w = resized_width(H, W, height)
    if new_w > max_width:
        raise ValueError(name + ": a " + str(W) + " x " + str(H) + " image (width x height) is " + str(new_w)
                         + " px wide at the model's height " + str(height) + ", above max_width = "
                         + str(max_width) + ": crop it to its text line")  # (a loaded model's max_width is fixed)
    return new_w


def to_channels(x: Tensor, in_channels: int) -> Tensor:
    """(N, C, H, W) float, C = 1/3/4 -> (N, in_channels, H, W). RGBA is composited on white, or on
    black where that shows more of the image (its composited luma varies more): white text on a
    transparent background, laid by a site over its CSS background, would vanish on white, while
    dark text on a pale, half-transparent background stays on white. Each image decides alone,
    from all of its pixels: callers pass images of one size, never a padded batch. An opaque
    image gives its RGB exactly (both backgrounds tie; ties go to white)."""
    C = x.shape[1]
    if C == 4:  # composite: the alpha often carries the anti-aliasing
        rgb, alpha = x[:, :3], x[:, 3:4]
        on_black = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]) * alpha
        on_white = on_black + (1.0 - alpha)
        spread_white, spread_black = on_white.var([1, 2, 3], False, True), on_black.var([1, 2, 3], False, True)
        white = (spread_white >= spread_black).to(x.dtype)  # (N, 1, 1, 1): 1 white, 0 black
        x = rgb * alpha + white * (1.0 - alpha)
        C = 3
    if in_channels == 1 and C == 3:  # ITU-R 601 luma, as PIL's convert("L")
        x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    elif in_channels == 3 and C == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


MIN_CONTRAST = 0.06  # ink below this distance from the background everywhere: a blank image
FRAME = 3            # px at each edge where a line along the side is a frame (1-3 px, any colour), not ink
BG_SAMPLES = 8       # the background is sampled on a grid this many points high (twice the spacing across) ...
BG_WINDOW = 7        # ... and is the median of a window of 7 x 7 samples around each point


def _border_band(H: int, W: int) -> int:
    """The FRAME band, narrower on images too small to lose 3 px at each side."""
    return min(3, (H - 1) // 4, (W - 1) // 4)  # 3 = FRAME (TorchScript can't read globals)


def _grid_medians(samples: Tensor) -> Tensor:
    """_grid_medians_aten; on the CPU one op (csrc/cpu/ink_cpu.cpp: the same values, 15x faster than
    its ~25 small ops and a sort per window, which were half of one image's preprocessing)."""
    if samples.device.type == "cpu":
        return torch.ops.captcha_fast.grid_medians(samples)
    return _grid_medians_aten(samples)


def _grid_medians_aten(samples: Tensor) -> Tensor:
    """(N, C, sh, sw) samples -> (N, C, sh, sw): at each grid point the per-channel median of the
    7 x 7 samples around it (edges replicated), then the median of those without the samples more
    than 0.1 beyond it on the ink's side (see background). Exact lower medians, by one sort per
    window: the median is the 25th of 49 values, and the samples left out are the top of the
    order (ink brighter than the background) or its bottom (darker), so the second median is the
    ceil(k / 2)-th of the k values kept, read from the same order."""
    N, C, sh, sw = samples.shape
    padded = F.pad(samples, [3, 3, 3, 3], mode="replicate")              # BG_WINDOW // 2 at each side
    windows = padded.unfold(2, 7, 1).unfold(3, 7, 1).reshape(N, C, sh * sw, 49)   # 7 x 7 = BG_WINDOW
    ordered = windows.sort(3).values                                     # (N, C, sh * sw, 49) ascending
    median = ordered[:, :, :, 24:25]                                     # the 25th of 49
    # Dense text can hold half a window. The ink's side of each channel (darker or brighter than the
    # background) shows in its skew over the image (Pearson's median skewness; a ramp or a plain
    # background has none); the second median leaves out the samples more than 0.1 beyond the first
    # on that side, so the text cannot pull the background towards itself.
    flat = samples.flatten(2)
    # one sample (a 1 x 1 image) has no spread: std() would warn and give NaN; zero gives the same side,
    # as the C++ op does
    spread = flat.std(2) if flat.shape[2] > 1 else torch.zeros_like(flat[:, :, 0])
    skew = 3.0 * (flat.mean(2) - flat.quantile(0.5, dim=2)) / spread.clamp_min(1e-6)   # (N, C)
    side = torch.where(skew > 0.5, 1.0, torch.where(skew < -0.5, -1.0, 0.0)).view(N, C, 1, 1)
    dropped = (side * (ordered - median) > 0.1).sum(3, keepdim=True)     # the top or the bottom of the order
    kept = 49 - dropped
    rank = (kept + 1) // 2 - 1 + torch.where(side < 0.0, dropped, torch.zeros_like(dropped))
    return ordered.gather(3, rank).view(N, C, sh, sw)


def background(x: Tensor) -> Tensor:
    """(N, C, h, w) float -> (N, C, h, w): each image's local background colour, estimated as document
    binarisation does. The image is sampled on a grid (8 points high, twice that spacing across); each
    grid point takes the per-channel median of the 7 x 7 samples around it (a window about as high
    as the image and twice as wide, so text covers well under half of it; _grid_medians), and the
    grid is interpolated back bilinearly. A median over a symmetric window follows a linear ramp
    exactly (with replicated edges, any monotone one), so gradients, mild vignettes and slowly
    varying textures are background, while glyph strokes, far thinner than the window, are not.
    Cost: a few thousand samples per image whatever its size, then one bilinear resize. (The resize
    stays F.interpolate, bit for bit: the ink map has ties at its thresholds on uint8 images, which
    other arithmetic with the same weights, rounding differently, would break.)"""
    h, w = x.shape[2], x.shape[3]
    step = max(1.0, (h - 1) / 7.0)  # 7 = BG_SAMPLES - 1
    rows = torch.linspace(0.0, h - 1.0, int((h - 1) / step + 0.5) + 1, device=x.device).round().long()
    cols = torch.linspace(0.0, w - 1.0, int((w - 1) / (2.0 * step) + 0.5) + 1, device=x.device).round().long()
    grid = _grid_medians(x.index_select(2, rows).index_select(3, cols))   # (N, C, sh, sw)
    return F.interpolate(grid, size=[h, w], mode="bilinear", align_corners=True)


def to_ink(x: Tensor) -> Tensor:
    """(N, C, H, W) float in [0, 1], RGB or grey (after compositing) -> (N, 1, H, W) ink in [0, 1]:
    each pixel's distance from the local background (`background`; the largest channel difference),
    divided by the image's ink strength: the mean distance of the pixels within half of the peak,
    the strongest distance two neighbouring pixels share (so a lone noisy pixel cannot set it, a
    1-px stroke can). Pastel glyphs on white, light text on dark, dark text on colour and text on
    a gradient all become the same bright ink on black, however little of the image the text
    covers. A thin frame of any colour is not ink: the background is estimated inside the outer
    3 px (FRAME), and a row or column there that stands out along 80% of its length is a frame
    line. An image whose peak is below MIN_CONTRAST (blank, uniform, a gradient) becomes all zero.
    Each image of the batch is treated on its own, without a host sync."""
    H, W = x.shape[2], x.shape[3]
    b = _border_band(H, W)
    # the background from the inside only (a frame there would pass for background)
    bg = background(x[:, :, b: H - b, b: W - b])
    if x.device.type == "cpu":  # the rest as one op (csrc/cpu/ink_cpu.cpp: the same values)
        return torch.ops.captcha_fast.ink_from_background(x, bg, b)
    return _ink_from_background_aten(x, bg, b)


def _ink_from_background_aten(x: Tensor, bg: Tensor, b: int) -> Tensor:
    """to_ink after the background `bg` of x inside its border band of b px: the distance, frame
    lines of the band removed, divided by the ink's strength."""
    H, W = x.shape[2], x.shape[3]
    # the background extended linearly over the band (2 f(edge) - f(edge + k) at edge - k: a ramp
    # goes on to the edges)
    if b > 0:
        bg = 2.0 * F.pad(bg, [b, b, b, b], mode="replicate") - F.pad(bg, [b, b, b, b], mode="reflect")
    diff = (x - bg).abs_()
    dist = diff[:, :1]
    for c in range(1, x.shape[1]):  # the largest channel difference (amax over 3 channels costs 10x more)
        dist = torch.maximum(dist, diff[:, c: c + 1])                    # (N, 1, H, W)
    if b > 0:  # a frame: a row or column of the border band that stands out along 80% of its length
        top, bottom, left, right = dist[:, :, :b], dist[:, :, H - b:], dist[:, :, :, :b], dist[:, :, :, W - b:]
        keep = [((edge > 0.06).float().mean(3 if k < 2 else 2, keepdim=True) < 0.8).float()  # 0.06 = MIN_CONTRAST
                for k, edge in enumerate([top, bottom, left, right])]
        for edge, kept in zip([top, bottom, left, right], keep):  # in place: dist is ours, the edges views of it
            edge.mul_(kept)
    peak = dist.amax([1, 2, 3], keepdim=True)                            # 1-px-thin images: the strongest
    if H > 1 and W > 1:  # the strongest distance two neighbours share, down or across
        peak = torch.maximum(torch.minimum(dist[:, :, 1:, :], dist[:, :, :-1, :]).amax([1, 2, 3], keepdim=True),
                             torch.minimum(dist[:, :, :, 1:], dist[:, :, :, :-1]).amax([1, 2, 3], keepdim=True))
    strong = (dist >= 0.5 * peak).float()
    strength = (dist * strong).sum([1, 2, 3], keepdim=True) / strong.sum([1, 2, 3], keepdim=True)
    ink = (dist / strength.clamp_min(0.06)).clamp_max_(1.0)              # 0.06 = MIN_CONTRAST; dist >= 0
    return ink.mul_((peak >= 0.06).float())                              # no ink where the peak is below it


def _quantile_index(mass: Tensor, q: float) -> Tensor:
    """(N, L) mass >= 0 with positive sums -> (N,) the first index where the cumulative share reaches q."""
    share = mass.cumsum(1) / mass.sum(1, keepdim=True)
    return (share < q).sum(1).clamp_max(mass.shape[1] - 1)


def _reach_back(inked: Tensor, start: Tensor, gap: Tensor, limit: Tensor) -> Tensor:
    """(N, L) bool, (N,) start/gap/limit -> (N,) the lowest index reached from `start` stepping back
    through inked positions no more than `gap` apart, at most `limit` before `start`."""
    L = inked.shape[1]
    idx = torch.arange(L, device=inked.device).expand(inked.shape[0], L)
    inked = inked | (idx == start.unsqueeze(1))
    previous = torch.where(inked, idx, torch.full_like(idx, -L - 1)).cummax(1).values  # last inked at or before
    previous = torch.cat([torch.full_like(idx[:, :1], -L - 1), previous[:, :-1]], 1)   # last inked before
    opens_run = inked & (idx - previous - 1 > gap.unsqueeze(1))  # an inked index after a wider gap
    first = torch.where(opens_run & (idx <= start.unsqueeze(1)), idx, torch.full_like(idx, -1)).amax(1)
    return torch.maximum(first, start - limit)


def _vertical_opening(x: Tensor) -> Tensor:
    """(N, C, H, W) -> the minimum then the maximum over 3 px down each column (windows clipped at
    the edges): what two (3, 1) max_pool2d give, in a few elementwise ops (max_pool2d's generic
    CPU kernel costs ~150 instructions a pixel)."""
    p = F.pad(x, [0, 0, 1, 1], mode="replicate")
    eroded = torch.minimum(torch.minimum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    p = F.pad(eroded, [0, 0, 1, 1], mode="replicate")
    return torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])


def ink_boxes(ink: Tensor) -> Tensor:
    """(N, 1, H, W) ink -> (N, 4) int64 [top, bottom, left, right] (inclusive): the box around each
    image's text (_ink_boxes_aten; on the CPU one op, csrc/cpu/ink_cpu.cpp: the same boxes)."""
    if ink.device.type == "cpu":
        return torch.ops.captcha_fast.ink_boxes(ink)
    return _ink_boxes_aten(ink)


def _ink_boxes_aten(ink: Tensor) -> Tensor:
    """(N, 1, H, W) ink -> (N, 4) int64 [top, bottom, left, right] (inclusive): the box around each
    image's text.

    The text's core is the rows and columns holding all but 2% / 1% of the ink mass at either end,
    measured after a vertical opening (3 px) that erases strike-through lines up to 2 px thick, and
    above a haze of 0.1 (what a background estimate leaves). The core then grows up and down over
    the glyph parts the trim cut (the dots of i, j, !, ;, descenders): rows holding strong ink
    (> 0.5 after the opening, so no lone pixels nor thin lines) reached from the core across gaps
    of at most 40% of the core's height, up to 60% of it. Margins of 15% of the core's height (25%
    at the sides) are kept around the core. An image without ink keeps its whole extent."""
    N, H, W = ink.shape[0], ink.shape[2], ink.shape[3]
    opened = _vertical_opening(ink)
    opened, faint = (opened - 0.1).clamp_min(0.0), (ink - 0.1).clamp_min(0.0)  # a faint haze does not count
    mass = torch.where(opened.sum([1, 2, 3], keepdim=True) > 0.0, opened, faint)[:, 0]    # (N, H, W)
    has_ink = mass.sum([1, 2]) > 0.0
    mass = torch.where(has_ink.view(N, 1, 1), mass, torch.ones_like(mass))                # blank: all of it
    rows, cols = mass.sum(2), mass.sum(1)
    top, bottom = _quantile_index(rows, 0.02), _quantile_index(rows, 0.98)
    left, right = _quantile_index(cols, 0.01), _quantile_index(cols, 0.99)
    band = bottom - top + 1
    solid = opened[:, 0] > 0.4                                   # strong ink (> 0.5) at least 3 px tall
    gap, reach = (0.4 * band.float() + 0.5).floor().long(), (0.6 * band.float() + 0.5).floor().long()
    row_ink = solid.any(2)
    up = _reach_back(row_ink, top, gap, reach)                   # the bottom: reach back along flipped rows
    down = H - 1 - _reach_back(row_ink.flip(1), H - 1 - bottom, gap, reach)
    m = (0.15 * band.float() + 0.5).floor().long().clamp_min(2)
    side = (0.25 * band.float() + 0.5).floor().long().clamp_min(2)
    box = torch.stack([torch.minimum(up, top - m).clamp_min(0), torch.maximum(down, bottom + m).clamp_max(H - 1),
                       (left - side).clamp_min(0), (right + side).clamp_max(W - 1)], 1)
    full = torch.tensor([0, H - 1, 0, W - 1], device=ink.device).expand(N, 4)
    return torch.where(has_ink.view(N, 1), box, full)


def crop_to_ink(ink: Tensor) -> Tensor:
    """(1, 1, H, W) ink -> the part inside its box (ink_boxes)."""
    box: List[int] = ink_boxes(ink)[0].tolist()
    return ink[:, :, box[0]: box[1] + 1, box[2]: box[3] + 1]


def _crop_and_resize(ink: Tensor, box: List[int], height: int, in_channels: int, max_width: int) -> Tensor:
    """(1, 1, H, W) ink and its box [top, bottom, left, right] -> (1, in_channels, height, W') the crop
    resized, aspect kept; a text line wider than max_width at `height` is squeezed to it."""
    x = ink[:, :, box[0]: box[1] + 1, box[2]: box[3] + 1]
    return _resize(x, height, in_channels, min(resized_width(x.shape[2], x.shape[3], height), max_width))


def _resize(x: Tensor, height: int, in_channels: int, new_w: int) -> Tensor:
    """(N, C, H, W) uint8 or float -> (N, in_channels, height, new_w) float32 in [0, 1]."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = to_channels(x, in_channels)
    if x.shape[2] != height or x.shape[3] != new_w:
        x = F.interpolate(x, size=[height, new_w], mode="bilinear", align_corners=False, antialias=True)
    return x


def prepare_image(img: Tensor, height: int, in_channels: int, max_width: int = 4096, name: str = "image",
                  ink: bool = False) -> Tensor:
    """One H x W or (C, H, W) image (uint8, or float in [0, 1]) -> (in_channels, height, W') float32
    in [0, 1], resized to `height` keeping the aspect ratio, MIN_WIDTH <= W' <= max_width.
    ink=True (grey models only): the ink map cropped to the text (to_ink, crop_to_ink) instead of
    the grey image. max_width is checked on the image as given (so the error quotes the caller's
    H x W); a crop whose text line is still wider at `height` is squeezed to max_width."""
    check_image(img, name)
    if img.dim() == 2:
        img = img.unsqueeze(0)
    new_w = check_width(img.shape[1], img.shape[2], height, max_width, name)
    x = img.unsqueeze(0)
    if ink:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = to_ink(to_channels(x, 3 if x.shape[1] >= 3 else 1))
        return _crop_and_resize(x, ink_boxes(x)[0].tolist(), height, in_channels, max_width)[0]
    return _resize(x, height, in_channels, new_w)[0]


def collate(images: List[Tensor], height: int, in_channels: int, max_width: int = 4096,
            ink: bool = False) -> Tuple[Tensor, Tensor]:
    """Images (H x W or C x H x W, any sizes) -> (N, in_channels, height, W_max) float32 right-padded
    with PAD_VALUE, and each image's own width (N,) int64. ink: see prepare_image.

    Images of one size, dtype and device (a server's batch of one site's captchas) go through
    together: one resize, or one to_ink and ink_boxes; the boxes of all of them come to the host
    in one transfer (the only host sync), then each image is cropped and resized on its own."""
    if len(images) == 0:
        raise ValueError("images: the list is empty")
    groups: Dict[str, List[int]] = {}
    new_widths: List[int] = []
    for i, img in enumerate(images):
        check_image(img, "images[" + str(i) + "]")
        new_widths.append(check_width(img.shape[-2], img.shape[-1], height, max_width, "images[" + str(i) + "]"))
        key = str(img.shape[-3] if img.dim() == 3 else 1) + "x" + str(img.shape[-2]) + "x" + str(img.shape[-1]) \
            + str(img.dtype) + str(img.device)
        if key in groups:
            groups[key].append(i)
        else:
            groups[key] = [i]
    prepared: List[Tensor] = [images[0]] * len(images)
    inks: List[Tensor] = []
    boxes: List[Tensor] = []
    members: List[List[int]] = []
    for idx in groups.values():
        if len(idx) == 1:  # one image per call: no copy unless it is a strided view
            x = (images[idx[0]] if images[idx[0]].dim() == 3 else images[idx[0]].unsqueeze(0)).unsqueeze(0).contiguous()
        else:
            x = torch.stack([images[i] if images[i].dim() == 3 else images[i].unsqueeze(0) for i in idx])
        if not ink:
            if len(groups) == 1:  # no copy into a padded batch
                return _resize(x, height, in_channels, new_widths[0]).contiguous(), \
                    torch.full([len(images)], new_widths[0], dtype=torch.int64, device=x.device)
            x = _resize(x, height, in_channels, new_widths[idx[0]])
            for k, i in enumerate(idx):
                prepared[i] = x[k]
        else:
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            x = to_ink(to_channels(x, 3 if x.shape[1] >= 3 else 1))
            inks.append(x)
            boxes.append(ink_boxes(x))
            members.append(idx)
    if ink:
        all_boxes: List[List[int]] = torch.cat(boxes).tolist()  # the one host sync
        n = 0
        for x, idx in zip(inks, members):
            for k, i in enumerate(idx):
                prepared[i] = _crop_and_resize(x[k: k + 1], all_boxes[n], height, in_channels, max_width)[0]
                n += 1
    widths = [p.shape[2] for p in prepared]
    batch = prepared[0].new_full([len(prepared), in_channels, height, max(widths)], 0.0)  # 0.0 = PAD_VALUE
    for i, p in enumerate(prepared):
        batch[i, :, :, : widths[i]] = p
    return batch, torch.tensor(widths, dtype=torch.int64, device=batch.device)
