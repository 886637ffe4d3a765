"""Synthetic captchas: seeded, every style draws every symbol inside its size range, labels
without rendering, fonts checked against the charset."""
import random
import string

import numpy as np
import pytest

from captcha_fast import synth
from captcha_fast.synth import MIX, STYLES, SynthConfig, SyntheticCaptchas

LETTERS = string.digits + string.ascii_letters


def _pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("style", sorted(STYLES) + ["mix"])
def test_same_seed_same_bytes_in_any_order(style):
    config = SynthConfig(style=style, charset=LETTERS, min_len=3, max_len=10, seed=5)
    a, b = SyntheticCaptchas(config, 6), SyntheticCaptchas(config, 6)
    firsts = {i: a[i] for i in range(6)}
    for i in (5, 2, 0):
        image, label = b[i]
        assert label == firsts[i][1]
        assert image.size == firsts[i][0].size and image.tobytes() == firsts[i][0].tobytes()


def test_other_seeds_give_other_captchas():
    first, second = (SyntheticCaptchas(SynthConfig(style="mix", charset=LETTERS, seed=s), 4) for s in (1, 2))
    assert [first.label(i) for i in range(4)] != [second.label(i) for i in range(4)]
    assert all(first[i][0].tobytes() != second[i][0].tobytes() for i in range(4))


def _no_glyphs(monkeypatch):
    """Make Run.draw place the glyphs (same boxes, same random draws) on a throw-away copy."""
    draw = synth.Run.draw
    monkeypatch.setattr(synth.Run, "draw", lambda self, image, *a, **k: draw(self, image.copy(), *a, **k))


@pytest.mark.parametrize("style", MIX)
def test_every_style_draws_each_symbol_inside_its_size_range(style, monkeypatch):
    min_w, max_w, min_h, max_h = STYLES[style].size
    captchas = SyntheticCaptchas(SynthConfig(style=style, charset=LETTERS, min_len=3, max_len=10, seed=9), 8)
    drawn = [captchas.rendered(i) for i in range(len(captchas))]
    _no_glyphs(monkeypatch)
    for i, (out, label, name) in enumerate(drawn):
        assert name == style
        w, h = out.image.size
        assert min_w <= w <= max_w and min_h <= h <= max_h, (style, label, out.image.size)
        if out.boxes is None:  # the captcha package draws its own glyphs: some ink at least
            assert _pixels(out.image).std() > 10
            continue
        assert len(out.boxes) == len(label)
        # the same sample without glyphs: each symbol's box must change visibly
        bare = _pixels(captchas.rendered(i)[0].image)
        changed = np.abs(_pixels(out.image) - bare).sum(axis=2) > 40
        for symbol, (x0, y0, x1, y1) in zip(label, out.boxes):
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (style, label, symbol, out.boxes)
            area = changed[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3]  # warps move ink a little
            assert area.sum() >= max(8, 0.03 * (x1 - x0) * (y1 - y0)), (style, label, symbol)


def test_lengths_and_charset_respected():
    captchas = SyntheticCaptchas(SynthConfig(style="mix", charset="aB3", min_len=3, max_len=10, seed=0), 400)
    labels = [captchas.label(i) for i in range(400)]
    assert {len(t) for t in labels} == set(range(3, 11))
    assert set("".join(labels)) == set("aB3")
    assert {captchas.style(i) for i in range(400)} == set(MIX)


def test_label_and_style_do_not_render(monkeypatch):
    config = SynthConfig(style="mix", charset=LETTERS, min_len=3, max_len=10, seed=3)
    expected = [SyntheticCaptchas(config, 30).rendered(i)[1:] for i in range(30)]

    def fail(*args, **kwargs):
        raise AssertionError("rendered")
    for name, style in STYLES.items():
        monkeypatch.setitem(STYLES, name, style._replace(draw=fail))
    monkeypatch.setattr(synth, "render", fail)
    monkeypatch.setattr(synth, "font_pool", fail)
    captchas = SyntheticCaptchas(config, 30)
    assert [(captchas.label(i), captchas.style(i)) for i in range(30)] == expected
    with pytest.raises(AssertionError, match="rendered"):
        captchas[0]


def test_default_style_is_the_captcha_package_at_the_configured_size():
    image, label = SyntheticCaptchas(SynthConfig(seed=1, min_len=4, max_len=4), 1)[0]
    assert image.size == (4 * 30 + 20, 50) and len(label) == 4 and set(label) <= set(synth.DIGITS_UPPER)


def test_fonts_are_checked_against_the_charset():
    fonts = synth.pip_fonts()
    assert any(f.endswith("DroidSansMono.ttf") for f in fonts) and any("DejaVuSans" in f for f in fonts)
    assert not any("cmsy10" in f or "STIXSiz" in f for f in fonts)  # symbol fonts left out by name
    droid = next(f for f in fonts if f.endswith("DroidSansMono.ttf"))
    assert synth.font_fits(droid, LETTERS)
    assert not synth.font_fits(droid, "AB\u4e00")  # no CJK glyph: the missing-glyph box
    pool = synth.font_pool(LETTERS)
    assert sum(len(g) for g in pool.groups) >= 15 and set(pool.plain) <= {f for g in pool.groups for f in g}


def test_bad_configs_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic style"):
        SynthConfig(style="v2,nope")
    with pytest.raises(ValueError, match="does not exist"):
        SynthConfig(font_dirs=(str(tmp_path / "missing"),))
    with pytest.raises(ValueError, match="white space"):
        SynthConfig(charset="ab c")
    with pytest.raises(ValueError, match="min_len"):
        SynthConfig(min_len=0)
    with pytest.raises(ValueError, match="unknown synthetic effect"):
        SynthConfig(effects="jpeg,blurry")
    assert SynthConfig(effects="jpeg, frame").forced_effects() == ("frame", "jpeg")  # EFFECTS order
    assert SynthConfig(style="v2, varlen").styles() == ("v2", "varlen")


def test_extra_font_folders_join_the_pool(tmp_path):
    """A folder's faces join the pool, families named Display too (Playfair Display is a text face),
    in folders of any name; matplotlib's DejaVu*Display faces (a few glyphs) are left out by name."""
    import shutil
    face = synth.pip_fonts()[0]
    shutil.copy(face, tmp_path / "Extra.ttf")
    (tmp_path / "playfair-display").mkdir()
    shutil.copy(face, tmp_path / "playfair-display" / "PlayfairDisplay_400Regular.ttf")
    shutil.copy(face, tmp_path / "DejaVuSansDisplay.ttf")
    pool = synth.font_pool(LETTERS, [str(tmp_path)])
    faces = {f for g in pool.groups for f in g}
    assert str(tmp_path / "Extra.ttf") in faces
    assert str(tmp_path / "playfair-display" / "PlayfairDisplay_400Regular.ttf") in faces
    assert str(tmp_path / "DejaVuSansDisplay.ttf") not in faces


# ------------------------------------------------------------------------------------ the mix's breadth

def _glyph_ink(captchas, index, monkeypatch):
    """(rendered, label, the pixels the glyphs changed): the sample against its glyph-free twin."""
    out, label, _ = captchas.rendered(index)
    with monkeypatch.context() as m:
        _no_glyphs(m)
        bare = _pixels(captchas.rendered(index)[0].image)
    return out, label, np.abs(_pixels(out.image) - bare).sum(axis=2) > 40


def _luma(pixels):
    return pixels[..., 0] * 0.299 + pixels[..., 1] * 0.587 + pixels[..., 2] * 0.114


def test_mix_draws_styles_by_share_and_effects_by_rate():
    n = 3000
    captchas = SyntheticCaptchas(SynthConfig(style="mix", charset=LETTERS, seed=4), n)
    styles = [captchas.style(i) for i in range(n)]
    for name, share in synth.mix_shares().items():
        assert abs(styles.count(name) / n - share) < 4 * (share / n) ** 0.5 + 1e-3, name
    effects = [e for i in range(n) for e in captchas.effects(i)]
    for name, rate in synth.effect_rates().items():
        assert abs(effects.count(name) / n - rate) < 4 * (rate / n) ** 0.5, name
    assert abs(sum(synth.mix_shares().values()) - 1) < 1e-9 and "captcha" not in synth.mix_shares()
    table = synth.mix_table()
    assert all(f"`{name}`" in table for name in list(MIX) + list(synth.EFFECTS))


@pytest.mark.parametrize("effect", list(synth.EFFECTS))
def test_each_effect_is_seeded_and_changes_only_the_look(effect, monkeypatch):
    config = dict(style="mix", charset=LETTERS, min_len=3, max_len=10, seed=21)
    plain = SyntheticCaptchas(SynthConfig(effects="none", **config), 8)
    a, b = (SyntheticCaptchas(SynthConfig(effects=effect, **config), 8) for _ in range(2))
    firsts = [a.rendered(i) for i in range(8)]
    for i in (7, 3, 0):
        assert b[i][0].tobytes() == firsts[i][0].image.tobytes()
    for i, (out, label, style) in enumerate(firsts):
        assert a.effects(i) == (effect,)
        base, base_label, base_style = plain.rendered(i)
        assert (label, style, out.boxes) == (base_label, base_style, base.boxes)  # same captcha underneath
        assert out.image.size == base.image.size and out.image.tobytes() != base.image.tobytes()


def test_frame_draws_a_line_round_every_edge():
    captchas = SyntheticCaptchas(SynthConfig(style="mix", charset=LETTERS, seed=2, effects="frame"), 40)
    for i in range(len(captchas)):
        a = _pixels(captchas[i][0])
        # the background as _frame judges it: the median colour (a middle full of bold ink is dark)
        centre = _luma(np.median(a.reshape(-1, 3), axis=0))
        for edge in (a[:4], a[-4:][::-1], a[:, :4].transpose(1, 0, 2), a[:, -4:][:, ::-1].transpose(1, 0, 2)):
            # some line among the 4 outermost is one colour all along, standing out from the background
            uniform = [np.all(line == line[line.shape[0] // 2]) for line in edge[:, 2:-2]]
            contrast = [abs(_luma(line[line.shape[0] // 2]) - centre) >= 40 for line in edge]
            assert any(u and c for u, c in zip(uniform, contrast)), (i, captchas.style(i))


def _mse(a, b):
    return float(((_pixels(a) - _pixels(b)).astype(np.float64) ** 2).mean())


def test_jpeg_stays_close_to_the_image_it_compresses():
    config = dict(style="mix", charset=LETTERS, seed=6)
    plain = SyntheticCaptchas(SynthConfig(effects="none", **config), 30)
    jpeg = SyntheticCaptchas(SynthConfig(effects="jpeg", **config), 30)
    for i in range(30):
        mse = _mse(jpeg[i][0], plain[i][0])
        assert 0 < mse and 10 * np.log10(255 ** 2 / mse) > 18, i  # lossy, never wrecked
    # one image, many draws: many qualities (each its own error), not one or two settings
    errors = {_mse(synth.apply_effects(plain[0][0], ["jpeg"], random.Random(k)), plain[0][0]) for k in range(20)}
    assert len(errors) >= 10 and max(errors) > 2 * min(errors)


def test_sparse_text_covers_under_two_percent(monkeypatch):
    captchas = SyntheticCaptchas(SynthConfig(style="sparse", charset=LETTERS, min_len=3, max_len=10, seed=8,
                                             effects="none"), 20)
    for i in range(len(captchas)):
        out, label, ink = _glyph_ink(captchas, i, monkeypatch)
        assert 0 < ink.mean() < 0.02, (label, out.image.size, ink.mean())
        assert len(out.boxes) == len(label)
        assert max(y1 - y0 for _, y0, _, y1 in out.boxes) < 0.4 * out.image.height  # small text, large image


def test_pale_glyphs_are_pale(monkeypatch):
    captchas = SyntheticCaptchas(SynthConfig(style="pale", charset=LETTERS, seed=10, effects="none"), 20)
    for i in range(len(captchas)):
        out, label, ink = _glyph_ink(captchas, i, monkeypatch)
        lumas = _luma(_pixels(out.image)[ink])
        assert ink.sum() > 0 and lumas.min() > 90, (label, lumas.min())


def test_ramp_runs_dark_to_light_behind_coloured_glyphs(monkeypatch):
    captchas = SyntheticCaptchas(SynthConfig(style="ramp", charset=LETTERS, seed=12, effects="none"), 20)
    for i in range(len(captchas)):
        out, label, ink = _glyph_ink(captchas, i, monkeypatch)
        a = _luma(_pixels(out.image)).astype(np.float64)
        a[ink] = np.nan  # the background alone
        spread = [np.nanmax(m) - np.nanmin(m) for m in (np.nanmedian(a, axis=0), np.nanmedian(a, axis=1))]
        assert max(spread) > 40, (label, spread)  # across (mostly) or down
        colours = {tuple(c) for c in _pixels(out.image)[ink].tolist()}
        assert len(colours) > 5  # coloured (and antialiased), not one grey


def test_jumble_overlaps_rotated_glyphs_of_mixed_sizes():
    # one symbol only, so that box heights differ by rotation (at most ~1.3x here) and size alone
    captchas = SyntheticCaptchas(SynthConfig(style="jumble", charset="H", min_len=4, max_len=8, seed=14,
                                             effects="none"), 40)
    spreads = []
    for i in range(len(captchas)):
        out, label, _ = captchas.rendered(i)
        overlaps = [a[2] > b[0] for a, b in zip(out.boxes, out.boxes[1:])]
        assert sum(overlaps) >= len(overlaps) / 2, (label, out.boxes)
        heights = [y1 - y0 for _, y0, _, y1 in out.boxes]
        spreads.append(max(heights) / min(heights))
    assert np.median(spreads) > 1.35


def test_varlen_turns_some_glyphs_on_their_side():
    # an upright I is a tall box, and up to 20 degrees keeps it so; lying down (over ~70) it is wide
    captchas = SyntheticCaptchas(SynthConfig(style="varlen", charset="I", min_len=6, max_len=6, seed=17,
                                             effects="none"), 60)
    lying = [sum(x1 - x0 > y1 - y0 for x0, y0, x1, y1 in captchas.rendered(i)[0].boxes) for i in range(60)]
    assert 0 < sum(n > 0 for n in lying) < 30, lying  # some captchas, not most


def test_thin_glyphs_have_less_ink_than_regular_ones():
    font = next(f for f in synth.pip_fonts() if f.endswith("DejaVuSans.ttf"))
    regular, thin = (synth._glyph("W", synth._font(font, 40), 29, 0, thin=t) for t in (False, True))
    ink = [np.count_nonzero(np.asarray(g.mask) > 128) for g in (regular, thin)]
    assert 0.3 * ink[0] < ink[1] < 0.8 * ink[0]


def test_captcha_package_style_is_mostly_at_its_common_sizes():
    captchas = SyntheticCaptchas(SynthConfig(style="captcha_pkg", charset=LETTERS, seed=16), 60)
    sizes = [captchas[i][0].size for i in range(len(captchas))]
    assert set(synth.PACKAGE_SIZES) <= set(sizes)
    assert sum(s in synth.PACKAGE_SIZES for s in sizes) >= 0.6 * len(sizes)


def test_package_captcha_streams_are_seeded_and_weighted_by_their_alphabet():
    a = [synth.package_captcha(7, i) for i in range(12)]
    assert [t for _, t in a] == [t for _, t in (synth.package_captcha(7, i) for i in range(12))]  # a stream
    assert [t for _, t in a] != [synth.package_captcha(8, i)[1] for i in range(12)]  # another seed, another one
    assert all(4 <= len(t) <= 6 and set(t) <= set(synth.DIGITS_LETTERS) for _, t in a)
    assert {im.size for im, _ in a} <= set(synth.PACKAGE_SIZES) and len({im.size for im, _ in a}) > 1
    assert {synth.package_captcha(7, i, (120, 40))[0].size for i in range(3)} == {(120, 40)}
    # "0" listed 9 times more: about 9 of 10 symbols are zeros; the text comes before the image
    zeros = "".join(synth.package_text(7, i, "0" * 9 + "x")[0] for i in range(40))
    assert 0.8 < zeros.count("0") / len(zeros) < 0.97
    for i, size in ((0, None), (1, None), (2, (200, 50))):  # the stream as drawn by hand: length, symbols, size
        rng = synth.sample_rng(7, i)
        text = "".join(rng.choice(synth.DIGITS_LETTERS) for _ in range(rng.randint(4, 6)))
        want = synth.render_package(text, rng, *(size or rng.choice(synth.PACKAGE_SIZES)))
        image, got = synth.package_captcha(7, i, size)
        assert got == text and image.tobytes() == want.tobytes()


@pytest.mark.parametrize("style", MIX)
def test_every_style_renders_every_label_length(style):
    min_w, max_w, min_h, max_h = STYLES[style].size
    for length in range(1, 13):
        config = SynthConfig(style=style, charset=LETTERS, min_len=length, max_len=length, seed=length)
        image, label = SyntheticCaptchas(config, 1)[0]
        assert len(label) == length
        assert min_w <= image.width <= max_w and min_h <= image.height <= max_h, (length, image.size)
        assert _pixels(image).std() > 5, length
