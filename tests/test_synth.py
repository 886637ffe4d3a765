"""Synthetic captchas: seeded, every style draws every symbol inside its size range, labels
without rendering, fonts checked against the charset."""
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
    assert SynthConfig(style="v2, varlen").styles() == ("v2", "varlen")


def test_extra_font_folders_join_the_pool(tmp_path):
    import shutil
    shutil.copy(synth.pip_fonts()[0], tmp_path / "Extra.ttf")
    pool = synth.font_pool(LETTERS, [str(tmp_path)])
    assert (str(tmp_path / "Extra.ttf"),) in pool.groups
