"""captcha_fast.preprocess: the ink map and the crop to the text (against hand-made images with a
known answer), bounded work for extreme aspect ratios, scripted == eager."""
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


def test_ink_is_distance_from_the_background_whatever_the_colours():
    dark_on_white = _ink(_page())
    pastel_on_white = _ink(_page(fg=(250, 200, 220)))          # grey contrast would be ~0.13
    light_on_dark = _ink(_page(bg=(20, 20, 60), fg=(230, 230, 230)))
    for ink in (dark_on_white, pastel_on_white, light_on_dark):
        assert ink.shape == (1, 1, 80, 300)
        torch.testing.assert_close(ink, dark_on_white, atol=1e-6, rtol=0)  # glyph 1, background 0
    assert float(dark_on_white[0, 0, 40, 100]) == 1.0 and float(dark_on_white[0, 0, 5, 5]) < 1e-6


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


def test_max_width_bounds_the_work_and_names_the_image():
    with pytest.raises(ValueError, match=r"images\[1\]: a 1 x 100000 image is 3200000 px wide.*max_width = 4096"):
        pp.collate([torch.zeros(1, 10, 10), torch.zeros(1, 1, 100000)], 32, 1)
    assert pp.collate([torch.zeros(1, 1, 100000)], 32, 1, max_width=4_000_000)[1].tolist() == [3_200_000]
