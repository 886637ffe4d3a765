"""The fast ink preprocessing gives what the model was trained on: preprocess.collate(..., ink=True)
against tests/ink_reference.py (the implementation before it was made faster, kept verbatim) on
rendered captchas of many kinds and sizes -- framed, gradient, sparse, pale, plain, dense, tall
bands, grey, RGBA, float, tiny -- one at a time and in batches, eager and scripted. Equal up to
float rounding: the same crop boxes and widths, values within 1e-5."""
import numpy as np
import pytest
import torch

import ink_reference as ref
from captcha_fast import preprocess as pp
from captcha_fast.synth import SynthConfig, SyntheticCaptchas

# (style, effects, images): each a kind the ink map has a rule for
KINDS = [
    ("captcha_pkg", "none", 4),        # the captcha package at 160x60, 200x50, 280x90: noise, arcs
    ("v2", "none", 2),                 # grey gradient, ragged black glyphs, strike-through
    ("gradient", "none", 3),           # two- or three-colour gradient backgrounds
    ("sparse", "none", 3),             # small text in a large image
    ("pale", "none", 3),               # pastel glyphs on white
    ("wordpress", "none", 2),          # plain: dark on a light plain background
    ("kaptcha", "frame", 3),           # framed: 1-3 px border lines of any colour
    ("classic", "frame,shade", 2),     # framed and unevenly lit
    ("band", "none", 2),               # a thin band of text in a tall image
    ("dense", "none", 2),
    ("low_contrast", "none", 2),
    ("ramp", "jpeg", 2),
]


def _rendered():
    images = []
    for k, (style, effects, n) in enumerate(KINDS):
        captchas = SyntheticCaptchas(SynthConfig(style=style, effects=effects, seed=100 + k, charset="abc123xyz"), n)
        for image, _ in captchas:
            images.append((f"{style}[{len(images)}]", torch.from_numpy(np.asarray(image.convert("RGB")).copy())
                           .permute(2, 0, 1).contiguous()))
    return images


RENDERED = _rendered()


def _variants():
    """Each rendered image as RGB uint8, plus grey, RGBA, float and tiny versions of a few."""
    out = list(RENDERED)
    for name, img in RENDERED[::5]:
        grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).round().to(torch.uint8).unsqueeze(0)
        alpha = torch.linspace(120, 255, img.shape[2]).round().to(torch.uint8).expand(1, img.shape[1], -1)
        out += [(name + " grey", grey), (name + " RGBA", torch.cat([img, alpha])), (name + " float", img.float() / 255)]
    g = torch.Generator().manual_seed(0)
    out += [("tiny 5x5", torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8, generator=g)),
            ("thin 1x40", torch.randint(0, 256, (1, 1, 40), dtype=torch.uint8, generator=g)),
            ("small 9x30", RENDERED[0][1][:, 20:29, 40:70].contiguous()),
            ("blank", torch.full((3, 50, 200), 230, dtype=torch.uint8))]
    return out


VARIANTS = _variants()


def _assert_same(got: torch.Tensor, want: torch.Tensor, name: str):
    assert got.shape == want.shape, f"{name}: the crop or width differs: {tuple(got.shape)} vs {tuple(want.shape)}"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name, img", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_each_image_alone_as_the_reference(name, img):
    batch, widths = pp.collate([img], 32, 1, 4096, True)
    _assert_same(batch[0, :, :, : int(widths[0])], ref.prepare(img, 32), name)


def test_the_ink_map_itself_as_the_reference():
    """to_ink before the crop, on whole images: every pixel, the frame and the band included."""
    for name, img in VARIANTS:
        x = img.unsqueeze(0)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        x = pp.to_channels(x, 3 if x.shape[1] >= 3 else 1)
        _assert_same(pp.to_ink(x), ref.to_ink(x), name)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_batches_as_the_reference(scripted):
    """Mixed sizes and kinds in one call, and same-size groups (one ink map for the group)."""
    collate = torch.jit.script(pp.collate) if scripted else pp.collate
    same_size = [(name + " 40x120", img[:, :40, :120].contiguous()) for name, img in RENDERED]
    for group in (RENDERED, same_size):
        batch, widths = collate([img for _, img in group], 32, 1, 4096, True)
        for n, (name, img) in enumerate(group):
            _assert_same(batch[n, :, :, : int(widths[n])], ref.prepare(img, 32), name)
            assert (batch[n, :, :, int(widths[n]):] == pp.PAD_VALUE).all()
