"""Image loading and validation: paths, PIL images, numpy arrays and tensors ->
a list of (C, H, W) tensors (uint8, or float in [0, 1]) that a Recognizer takes.

Every error names the culprit (its index in the input, or its path)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Sequence

import torch
from torch import Tensor

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | numpy.ndarray | Tensor

_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def _check_tensor(t: Tensor, name: str) -> Tensor:
    """A (C, H, W) view of `t` (H x W or C x H x W, C in 1/3/4), uint8 or float in [0, 1]."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"{name}: an image must be H x W or C x H x W, got a {t.dim()}-D tensor of shape {tuple(t.shape)}")
    C, H, W = t.shape
    if C not in _CHANNELS:
        raise ValueError(f"{name}: an image must have 1 (grey), 3 (RGB) or 4 (RGBA) channels first (C x H x W), "
                         f"got shape {tuple(t.shape)}")
    if H == 0 or W == 0:
        raise ValueError(f"{name}: the image is empty (shape {tuple(t.shape)})")
    if t.dtype == torch.uint8:
        return t
    if not t.is_floating_point():
        raise ValueError(f"{name}: an image must be uint8 or float in [0, 1], got dtype {t.dtype}")
    lo, hi = torch.aminmax(t)
    if not (0.0 <= float(lo) and float(hi) <= 1.0):  # also catches NaN
        raise ValueError(f"{name}: a float image must hold values in [0, 1], got [{float(lo):.4g}, {float(hi):.4g}]")
    return t


def _from_pil(img, name: str) -> Tensor:
    import numpy as np

    if img.mode not in ("L", "RGB", "RGBA"):
        # palette / grey+alpha / 1-bit / 16-bit: RGBA keeps any transparency, L the rest
        has_alpha = img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        img = img.convert("RGBA" if has_alpha else ("L" if img.mode in ("1", "I", "I;16", "F") else "RGB"))
    a = np.asarray(img)
    if a.size == 0:
        raise ValueError(f"{name}: the image is empty ({img.width} x {img.height})")
    t = torch.from_numpy(a.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()  # (C, H, W)


def load_image(path: str | os.PathLike) -> Tensor:
    """The image file at `path` as a (C, H, W) uint8 tensor (C = 1, 3 or 4)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {str(p)!r}")
    try:
        with Image.open(p) as img:
            img.load()  # decodes now, so a truncated/corrupt file fails here with its name
            return _from_pil(img, str(p))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(p)):
            raise
        raise ValueError(f"{str(p)!r} is not a readable image ({type(e).__name__}: {e})") from e


def to_tensor(image: ImageLike, name: str = "image") -> Tensor:
    """One image (path, PIL image, numpy H x W [x C] array, or H x W / C x H x W tensor)
    as a (C, H, W) tensor, uint8 or float in [0, 1]."""
    if isinstance(image, Tensor):
        return _check_tensor(image, name)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    try:
        from PIL import Image
        if isinstance(image, Image.Image):
            return _from_pil(image, name)
    except ImportError:  # pragma: no cover
        pass
    if type(image).__module__ == "numpy":
        a = image
        if a.ndim == 3:  # numpy images are H x W x C (PIL / OpenCV order)
            a = a.transpose(2, 0, 1)
        return _check_tensor(torch.from_numpy(a.copy()), f"{name} (numpy, H x W x C)")
    raise TypeError(f"{name}: expected a file path, PIL image, numpy array or tensor, got {type(image).__name__}")


def to_tensors(images: ImageLike | Sequence[ImageLike]) -> List[Tensor]:
    """A batch of images as a list of (C, H, W) tensors.

    `images` is an N x C x H x W tensor, or a list/tuple of images of any kind that
    `to_tensor` takes (widths and heights may differ). A single path or image is
    not a batch: wrap it in a list."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images: a batch tensor must be N x C x H x W, got a {images.dim()}-D tensor of shape "
                             f"{tuple(images.shape)}; pass a list for single images")
        if images.shape[0] == 0:
            raise ValueError("images: the batch is empty (N = 0)")
        _check_tensor(images[0], "images[0]")  # shape and dtype are shared by the batch
        if images.is_floating_point():
            lo, hi = torch.aminmax(images)  # one range check for the whole batch
            if not (0.0 <= float(lo) and float(hi) <= 1.0):
                raise ValueError(f"images: a float batch must hold values in [0, 1], got [{float(lo):.4g}, {float(hi):.4g}]")
        return list(images.unbind(0))
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected a list of images or an N x C x H x W tensor, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images: the list is empty")
    return [to_tensor(img, f"images[{i}]") for i, img in enumerate(images)]
