"""captcha_fast.preprocess: the ink map and the crop to the text (against hand-made images with a
known answer), bounded work for extreme aspect ratios, scripted == eager."""
import warnings

import numpy as np
import pytest
import torch

from captcha_fast import preprocess as pp


def _page(H=80, W=300, bg=(255, 255, 255), fg=(0, 0, 0), box=(30, 50, 60, 240)):
    """(3, H, W) uint8: background `bg` with a solid glyph block of colour `fg` in rows
    box[0]:box[1], columns box[2]:box[3]."""
    img = torch.tensor(bg, dtype=torch.uint8).view(3, 1, 1).repeat(1, H, W)
    t, b, l, r = box
    img[:, t:b, l:r] = torch.tensor(fg, dtype=torch.uint8).view(3, 1, 1)
    return img


def _ink(img):
    return pp.to_ink(pp.to_channels(img.unsqueeze(0).float() / 255, 3))


def _every_style(n, effects="none", charset=None):
    """n rendered captchas of each synthetic style (seed: its index; charset: SynthConfig's default
    unless given), as (1, 3, H, W) float images in [0, 1]."""
    from captcha_fast.synth import STYLES, SynthConfig, SyntheticCaptchas

    more = {} if charset is None else {"charset": charset}
    images = []
    for k, style in enumerate(sorted(STYLES)):
        for image, _ in SyntheticCaptchas(SynthConfig(style=style, effects=effects, seed=k, **more), n):
            rgb = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
            images.append(pp.to_channels(rgb.unsqueeze(0).float() / 255, 3))
    return images


def _assert_equal_nan_too(got, want, case):
    """got == want bit for bit, NaN where want has NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape, case
    assert torch.equal(got.isnan(), want.isnan()), case
    assert torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0)), case


def test_ink_is_distance_from_the_background_whatever_the_colours():
    dark_on_white = _ink(_page())
    pastel_on_white = _ink(_page(fg=(250, 200, 220)))          # grey contrast would be ~0.13
    light_on_dark = _ink(_page(bg=(20, 20, 60), fg=(230, 230, 230)))
    for ink in (dark_on_white, pastel_on_white, light_on_dark):
        assert ink.shape == (1, 1, 80, 300)
        torch.testing.assert_close(ink, dark_on_white, atol=0.01, rtol=0)  # glyph 1, background 0
    assert float(dark_on_white[0, 0, 40, 100]) == 1.0 and float(dark_on_white[0, 0, 5, 5]) < 0.01


@pytest.mark.parametrize("image", [
    torch.zeros(3, 50, 200, dtype=torch.uint8),                             # all black
    torch.full((1, 60, 160), 200, dtype=torch.uint8),                       # uniform grey
    _page(fg=(250, 250, 250)),                                              # contrast below MIN_CONTRAST
])
def test_no_contrast_gives_no_ink(image):
    assert not pp.to_ink(pp.to_channels(image.unsqueeze(0).float() / 255, 3 if image.shape[0] == 3 else 1)).any()


def test_crop_keeps_the_text_band_with_a_margin_and_ignores_a_thin_line():
    img = _page(H=100, W=300, box=(40, 60, 50, 250))
    img[:, 10:12, :] = 0                            # a 2-px strike-through line far above the text
    crop = pp.crop_to_ink(_ink(img))
    band = 20
    m, side = round(0.15 * band), round(0.25 * band)
    # the line holds 600 px of ink against 4000 in the text: it would move a plain quantile crop
    assert crop.shape[2] <= band + 2 * m + 1 and crop.shape[2] >= band
    assert 200 <= crop.shape[3] <= 200 + 2 * side + 2
    blank = torch.zeros(1, 1, 30, 40)
    assert pp.crop_to_ink(blank).shape == blank.shape


def test_thin_band_in_a_tall_image_fills_the_model_height():
    img = _page(H=100, W=200, box=(45, 55, 20, 180))    # a 10-px text band
    x = pp.prepare_image(img, 32, 1, ink=True)
    assert x.shape[1] == 32 and x.shape[2] > 200       # widened: the band, not the page, is 32 high
    rows = x[0].sum(1)
    assert (rows > 0.5 * rows.max()).float().mean() > 0.5  # the text fills most rows


def test_scripted_collate_equals_eager_and_pads_with_pad_value():
    imgs = [_page(), _page(H=50, W=120, box=(10, 40, 10, 100)), torch.full((1, 40, 90), 255, dtype=torch.uint8)]
    scripted = torch.jit.script(pp.collate)
    for ink in (False, True):
        want = pp.collate(imgs, 32, 1, 4096, ink)
        got = scripted(imgs, 32, 1, 4096, ink)
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
        assert torch.equal(got[1], want[1])
        for n, w in enumerate(want[1].tolist()):
            assert (want[0][n, :, :, w:] == pp.PAD_VALUE).all()


def test_a_batch_of_one_size_is_prepared_together_as_each_image_alone():
    # collate stacks same-size images (one to_ink, one ink_boxes, one host sync); each row must be
    # what prepare_image makes of that image alone, whatever else is in the batch
    texts = ["7b2x", "q j!", "W4", "mmmmmm"]
    same = [_render(t, at=(10 + 9 * k, 6 + 3 * k), fg=(40 * k, 20, 160 - 30 * k))[0] for k, t in enumerate(texts)]
    same[2] = _frame(same[2], (200, 30, 30))
    other = _render("ab", size=(120, 40), font_px=24, at=(30, 4))[0]
    blank = torch.full((3, 60, 200), 222, dtype=torch.uint8)
    imgs = same[:2] + [other] + same[2:] + [blank]
    for scripted in (False, True):
        fn = torch.jit.script(pp.collate) if scripted else pp.collate
        batch, widths = fn(imgs, 32, 1, 4096, True)
        for n, img in enumerate(imgs):
            alone = pp.prepare_image(img, 32, 1, ink=True)
            assert widths[n] == alone.shape[2]
            torch.testing.assert_close(batch[n, :, :, : alone.shape[2]], alone, atol=1e-5, rtol=0)
            assert (batch[n, :, :, alone.shape[2]:] == pp.PAD_VALUE).all()
    assert len(set(widths.tolist())) > 2  # the crops differ: not one width for the whole group


def _rgba(fg, alpha_text, alpha_background=0.0, H=20, W=40):
    """(4, H, W) float: colour `fg` everywhere, opaque `alpha_text` in a text block, `alpha_background` around."""
    img = torch.tensor(list(fg) + [alpha_background]).view(4, 1, 1).repeat(1, H, W)
    img[3, 6:14, 10:30] = alpha_text
    return img


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_rgba_text_composites_on_the_background_it_contrasts_with(scripted):
    """Transparent text images, one batch of one size: light text goes on black (on white it would vanish),
    dark text on white; each image decides alone, whatever the others hold."""
    to_channels = torch.jit.script(pp.to_channels) if scripted else pp.to_channels
    batch = torch.stack([_rgba((1.0, 1.0, 1.0), 1.0),            # white text, transparent around
                         _rgba((0.0, 0.0, 0.0), 1.0),            # black text
                         _rgba((0.9, 0.8, 1.0), 0.6),            # pale, half transparent text
                         _rgba((1.0, 1.0, 1.0), 0.0)])           # nothing drawn: white, as before
    grey = to_channels(batch, 1)
    assert grey.shape == (4, 1, 20, 40)
    text, around = grey[:, 0, 10, 20].tolist(), grey[:, 0, 0, 0].tolist()
    assert around == [0.0, 1.0, 0.0, 1.0]
    assert text[0] == 1.0 and text[1] == 0.0 and 0.5 < text[2] < 0.6 and text[3] == 1.0
    # dark text on a pale, half-transparent background: on white (on black the background would darken
    # to 0.45, against 0.95); and a lone half-transparent pixel (no spread either way) on white, no warning
    page = _rgba((0.9, 0.9, 0.9), 0.5, alpha_background=0.5)
    page[:3, 6:14, 10:30], page[3, 6:14, 10:30] = 0.0, 1.0
    grey = to_channels(page[None], 1)
    torch.testing.assert_close(grey[0, 0, [0, 10], [0, 20]], torch.tensor([0.95, 0.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_channels(torch.tensor([0.2, 0.2, 0.2, 0.5]).view(1, 4, 1, 1), 1).item() == pytest.approx(0.6)


def test_opaque_rgba_is_its_rgb_bit_for_bit():
    """Whether its pixels are light (the black background) or dark (the white one), alpha 1 leaves RGB."""
    for fill in (0.2, 0.9):
        rgb = (torch.rand(2, 3, 20, 40) * 0.2 + fill - 0.1).clamp(0, 1)
        rgba = torch.cat([rgb, torch.ones(2, 1, 20, 40)], 1)
        assert torch.equal(pp.to_channels(rgba, 3), rgb)
        assert torch.equal(pp.to_channels(rgba, 1), pp.to_channels(rgb, 1))
        u8 = torch.cat([(rgb[0] * 255).round().to(torch.uint8), torch.full((1, 20, 40), 255, dtype=torch.uint8)])
        assert torch.equal(pp.prepare_image(u8, 32, 1), pp.prepare_image(u8[:3], 32, 1))


def test_max_width_bounds_the_work_and_names_the_image():
    with pytest.raises(ValueError, match=r"images\[1\]: a 100000 x 1 image \(width x height\) is 3200000 px wide at "
                                         r"the model's height 32, above max_width = 4096: crop it to its text line$"):
        pp.collate([torch.zeros(1, 10, 10), torch.zeros(1, 1, 100000)], 32, 1)
    assert pp.collate([torch.zeros(1, 1, 100000)], 32, 1, max_width=4_000_000)[1].tolist() == [3_200_000]


# ----------------------------------------------------------------------------- the ink map on rendered text
# Each case draws text with a known font at a known place; the reference is that drawing: the mask of
# the pixels the text covers (the same text drawn alone) and its bounding box.

def _font(size):
    from PIL import ImageFont

    from captcha_fast import synth
    path = next(f for f in synth.pip_fonts() if f.endswith("DejaVuSans.ttf"))
    return ImageFont.truetype(path, size)


def _render(text, size=(200, 60), font_px=32, at=(20, 8), fg=(20, 20, 20), bg=(255, 255, 255)):
    """(3, H, W) uint8 of `text` drawn at `at` on `bg` (a colour, or an H x W x 3 uint8 array),
    and the drawn text's mask (H, W) bool."""
    import numpy as np
    from PIL import Image, ImageDraw

    W, H = size
    canvas = Image.fromarray(bg) if isinstance(bg, np.ndarray) else Image.new("RGB", size, bg)
    ImageDraw.Draw(canvas).text(at, text, fill=fg, font=_font(font_px))
    alone = Image.new("L", size, 0)
    ImageDraw.Draw(alone).text(at, text, fill=255, font=_font(font_px))
    image = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()
    return image, torch.from_numpy(np.asarray(alone) > 127)


def _frame(img, colour, at=0, width=1):
    """Draws a rectangle `width` px wide, `at` px in from the edges, in place."""
    c = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    H, W = img.shape[1:]
    img[:, at: at + width, at: W - at] = c
    img[:, H - at - width: H - at, at: W - at] = c
    img[:, at: H - at, at: at + width] = c
    img[:, at: H - at, W - at - width: W - at] = c
    return img


def _iou(ink, mask):
    found = ink[0, 0] > 0.5
    return float((found & mask).sum()) / float((found | mask).sum())


def _around(mask):
    """The pixels at least 2 px from the drawn text (its anti-aliased rim is neither ink nor not)."""
    return ~torch.nn.functional.max_pool2d(mask[None].float(), 5, 1, 2)[0].bool()


def _box(mask):
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _horizontal_gradient(W, H, lo, hi):
    import numpy as np
    return np.linspace(lo, hi, W).astype(np.uint8)[None, :, None].repeat(H, 0).repeat(3, 2)


PASTEL = (225, 240, 200)


@pytest.mark.parametrize("frame", ["black 1 px", "red 2 px", "double"])
def test_a_thin_frame_of_any_colour_is_not_the_background(frame):
    img, mask = _render("4827", bg=PASTEL)
    if frame == "black 1 px":
        _frame(img, (0, 0, 0))
    elif frame == "red 2 px":
        _frame(img, (200, 30, 30), width=2)
    else:  # black outside, a grey line 2 px in
        _frame(_frame(img, (0, 0, 0)), (120, 120, 120), at=2)
    ink = _ink(img)
    assert _iou(ink, mask) > 0.8                       # the digits, not the pastel background, are the ink
    assert float(ink[0, 0, :3].max()) < 0.01 and float(ink[0, 0, :, -3:].max()) < 0.01  # no frame


def test_text_on_a_dark_to_light_gradient_is_the_only_ink_and_the_crop_narrows_to_it():
    import numpy as np
    img, mask = _render("k7pw", size=(240, 60), at=(80, 8), fg=(200, 30, 30),
                        bg=np.ascontiguousarray(_horizontal_gradient(240, 60, 40, 235)))
    ink = _ink(img)
    assert _iou(ink, mask) > 0.7
    assert float(ink[0, 0][_around(mask)].mean()) < 0.02  # the ramp itself is (nearly) no ink
    top, bottom, left, right = pp.ink_boxes(ink)[0].tolist()
    t, b, l, r = _box(mask)
    assert left <= l and right >= r and top <= t and bottom >= b
    assert right - left + 1 < (r - l + 1) + 2 * (b - t + 1)  # at most a text height of margin, not the width


@pytest.mark.parametrize("fg", [(20, 20, 20), (200, 200, 235)], ids=["dark", "pale"])
def test_text_covering_under_one_percent_of_the_image_is_found(fg):
    img, mask = _render("a7k3", size=(600, 300), font_px=14, at=(260, 140), fg=fg)
    assert float(mask.float().mean()) < 0.01
    ink = _ink(img)
    assert _iou(ink, mask) > 0.5
    assert float(ink[0, 0][_around(mask)].max()) < 0.1  # no noise stretched to ink
    top, bottom, left, right = pp.ink_boxes(ink)[0].tolist()
    t, b, l, r = _box(mask)
    assert top <= t and bottom >= b and left <= l and right >= r


@pytest.mark.parametrize("text", ["maximummum", "wwwwwi", "mmmmj", "mmmmm!", "nmnm;"])
def test_the_crop_keeps_the_dots(text):
    img, mask = _render(text, size=(260, 64), font_px=30, at=(20, 10))
    top, bottom, left, right = pp.ink_boxes(_ink(img))[0].tolist()
    t, b, l, r = _box(mask)
    assert top <= t and bottom >= b and left <= l and right >= r, ((top, bottom, left, right), (t, b, l, r))


def _vignette(H, W):
    import numpy as np
    y, x = np.mgrid[0:H, 0:W]
    r2 = ((y - H / 2) / H) ** 2 + ((x - W / 2) / W) ** 2
    return (235 - 80 * r2).astype(np.uint8)[:, :, None].repeat(3, 2)  # 40 grey levels darker in the corners


@pytest.mark.parametrize("background", ["white", "one colour", "dark to light", "light to dark, steep", "vignette"])
def test_an_image_without_text_has_no_ink(background):
    import numpy as np
    image = {"white": np.full((50, 200, 3), 255, np.uint8),
             "one colour": np.full((60, 160, 3), (120, 160, 200), np.uint8),
             "dark to light": _horizontal_gradient(200, 50, 0, 255),
             "light to dark, steep": _horizontal_gradient(120, 60, 255, 0),
             "vignette": _vignette(60, 200)}[background]
    assert not _ink(torch.from_numpy(image.copy()).permute(2, 0, 1)).any()


def test_max_width_is_checked_on_the_callers_image_and_names_it():
    # 2000 x 10 (width x height) is 6400 px wide at height 32: refused, quoting that size, whatever its crop
    thin, _ = _render("abc", size=(2000, 10), font_px=8, at=(900, 0))
    with pytest.raises(ValueError,
                       match=r"images\[1\]: a 2000 x 10 image \(width x height\) is 6400 px wide.*max_width = 4096"):
        pp.collate([_page(), thin], 32, 1, 4096, True)
    # a 60 x 6000 image fits (3200 px), though its 20-px text band alone would not: kept, squeezed
    wide, _ = _render("textline " * 60, size=(6000, 60), font_px=16, at=(4, 20))
    batch, widths = pp.collate([wide], 32, 1, 4096, True)
    assert widths.tolist() == [4096] and batch.shape == (1, 1, 32, 4096)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_background_grids_cpu_op_equals_its_aten_ops(dtype):
    """csrc/cpu/ink_cpu.cpp picks the same samples as the ATen path (sort, skew, gather) on grids of
    any size: ties (uint8-like levels), ink brighter or darker than the background on part of the
    grid (both sides of the second median), grids smaller than the window, and NaN samples."""
    g = torch.Generator().manual_seed(0)
    for k in range(120):
        N, C = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        sh, sw = int(torch.randint(2, 10, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        x = torch.rand(N, C, sh, sw, generator=g, dtype=dtype)
        if k % 3 == 0:
            x = (x * 8).round() / 8
        elif k % 3 == 1:  # a bright or dark patch over part of each channel: a skewed grid
            x[:, :, :, : sw // 3] = torch.where(torch.rand(N, C, 1, 1, generator=g, dtype=dtype) > 0.5, 1.0, 0.0)
        if k % 10 == 0:
            x[0, 0, 0, 0] = float("nan")
        got, want = pp._grid_medians(x), pp._grid_medians_aten(x)
        assert got.dtype == dtype
        _assert_equal_nan_too(got, want, k)


def test_the_crops_cpu_op_equals_its_aten_ops():
    """csrc/cpu/ink_cpu.cpp's ink_boxes gives the ATen path's boxes: on ink maps of rendered captchas
    of every style (one at a time and as a batch), on random maps (sparse, level-quantised: ties at
    the thresholds), blank ones, lines 1 px high or wide, float64, and maps holding NaN."""
    inks = [pp.to_ink(x) for x in _every_style(2, charset="abcil1ij!")]
    g = torch.Generator().manual_seed(0)
    for k in range(60):
        H, W = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 120, (1,), generator=g))
        x = torch.rand(2, 1, H, W, generator=g) * (torch.rand(2, 1, H, W, generator=g) < 0.1 * (k % 5))
        inks.append((x * 10).round() / 10 if k % 2 else x)
    inks += [torch.zeros(1, 1, 30, 90), torch.full((1, 1, 1, 50), 0.7), torch.full((1, 1, 50, 1), 0.7)]
    nan = torch.rand(2, 1, 20, 60, generator=g)
    nan[1, 0, 5, 7] = float("nan")
    inks += [nan, inks[0].double()]
    for k, ink in enumerate(inks):
        assert torch.equal(pp.ink_boxes(ink), pp._ink_boxes_aten(ink)), k
    same_size = [i for i in inks if i.shape[2:] == inks[0].shape[2:]]
    batch = torch.cat(same_size)
    assert torch.equal(pp.ink_boxes(batch), pp._ink_boxes_aten(batch))


def test_the_ink_maps_cpu_op_equals_its_aten_ops():
    """csrc/cpu/ink_cpu.cpp's ink_from_background gives the ATen path's ink map bit for bit: rendered
    captchas of every style, framed (frame lines dropped) and not, one at a time and as a batch; random
    and level-quantised images; images 1-4 px thin (no border band, no neighbour pairs); float64;
    a NaN pixel."""
    def both(x):
        H, W = x.shape[2], x.shape[3]
        b = pp._border_band(H, W)
        bg = pp.background(x[:, :, b: H - b, b: W - b])
        return torch.ops.captcha_fast.ink_from_background(x, bg, b), pp._ink_from_background_aten(x, bg, b)

    images = [x for pair in zip(_every_style(1), _every_style(1, effects="frame")) for x in pair]
    g = torch.Generator().manual_seed(0)
    for k in range(30):
        H, W = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 90, (1,), generator=g))
        x = torch.rand(2, 1 + 2 * (k % 2), H, W, generator=g)
        images.append((x * 4).round() / 4 if k % 3 == 0 else x)
    nan = images[0].clone()
    nan[0, 1, 10, 20] = float("nan")
    images += [images[1].double(), nan, torch.cat([images[0], images[0].flip(3)])]
    for k, x in enumerate(images):
        _assert_equal_nan_too(*both(x), k)


def test_the_ink_ops_border_check_gives_width_then_height():
    """A border band too wide for the image is refused with the image's size as every other message
    gives it: width x height."""
    x = torch.rand(1, 1, 8, 30)
    with pytest.raises(RuntimeError, match=r"border 4 too wide for a 30 x 8 \(width x height\) image"):
        torch.ops.captcha_fast.ink_from_background(x, torch.rand(1, 1, 0, 22), 4)


def test_a_one_pixel_image_is_read_without_a_warning(capfd):
    """A 1 x 1 image's background grid is one sample: its own median, as the op and the ATen path
    give it (their skew's std of one value is NaN, side 0), without torch's "degrees of freedom"
    warning -- eager and scripted (what .pt2 recognizers run)."""
    import warnings

    from captcha_fast.formats import scripted_collate

    one = torch.rand(2, 3, 1, 1, dtype=torch.float64)
    want = torch.ops.captcha_fast.grid_medians(one)  # the op too: recognizers saved before the guard call it
    assert "degrees of freedom" not in capfd.readouterr().err  # (its warnings go to the process's stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ATen path's std of one value warns: the guard keeps it away
        aten = pp._grid_medians_aten(one)
    assert torch.equal(want, one) and torch.equal(aten, one)
    image, script = torch.full((3, 1, 1), 90, dtype=torch.uint8), scripted_collate()  # (torch.jit's deprecation)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(pp._grid_medians(one), want)  # (on CUDA it would call the ATen path: the same guard)
        eager = pp.collate([image], 32, 1, 4096, True)
        scripted = script([image], 32, 1, 4096, True)
    assert torch.equal(eager[0], scripted[0]) and eager[1].tolist() == [32]  # resized to 32 x 32


def test_the_pixel_limits_advice_is_for_the_caller():
    """Raising captcha_fast.preprocess.MAX_PIXELS is advice for the callers it bounds; a caller with its
    own limit (the server's --max-pixels) gets the advice that holds for everyone: crop or shrink."""
    with pytest.raises(ValueError, match=r"above max_pixels = 4,000,000 \(a decompression bomb\?\): crop or shrink "
                                         r"it, or raise captcha_fast\.preprocess\.MAX_PIXELS$"):
        pp.check_pixels(2000, 2001, "'big.png'")
    with pytest.raises(ValueError, match=r"above max_pixels = 100 \(a decompression bomb\?\): crop or shrink it$"):
        pp.check_pixels(20, 20, "image", 100)


def test_a_tensor_image_is_checked_as_given():
    """An H x W tensor's error quotes its own shape, not the 1 x H x W view it becomes."""
    with pytest.raises(ValueError, match=r"^x: the image is empty, shape \[8, 0\]$"):
        pp.to_tensor(torch.zeros(8, 0), "x")


def test_numpy_images_in_either_byte_order():
    """A big-endian float32 array is a float32 image (torch.from_numpy refuses it, unnamed)."""
    a = np.linspace(0, 1, 5 * 8 * 3, dtype=np.float32).reshape(5, 8, 3)
    t = pp.to_tensor(a.astype(">f4"), "x")
    assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(a).permute(2, 0, 1))
