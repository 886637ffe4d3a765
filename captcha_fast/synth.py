"""Seeded synthetic captchas in many styles (PIL + numpy; no torch).

    SyntheticCaptchas(SynthConfig(style="mix", seed=1), n=1000)[7]   ->  (PIL RGB image, "K3q9X")
    SyntheticCaptchas(config, n).label(7)                           ->  "K3q9X"  (nothing rendered)

Sample i is a pure function of (config, i, the fonts found, the Pillow version and its libjpeg):
any order, any worker, any rank gives the same image. The label is drawn first from the sample's
generator, so label(i) needs no rendering.

Styles (STYLES; "mix" draws one per sample by its share, mix_shares(); or name several, drawn
uniformly: "v2,varlen"):
  captcha      the `captcha` package at the config's height/char_width/font_sizes (the default;
               `clean` drops its noise). The package draws from `secrets`; here its module-level
               `secrets` is swapped, for one render, for a shim over the sample's random.Random.
  captcha_pkg  the `captcha` package as users call it: ImageCaptcha(width, height), 80% at 160x60,
               200x50 or 280x90 with its own font sizes, else another size; sometimes another font.
  v2           like captcha_images_v2 / Java Kaptcha: 200x50, grey gradient, black ragged glyphs
               touching each other, one thick strike-through curve with a hook, slight blur.
  kaptcha      Kaptcha generalised: coloured ink, light gradients, water-ripple warp, noise
               curve, sometimes a shadow, half the time a border (Kaptcha's default).
  varlen       like varlen_upper: 80 px high, glyphs in a thin central band with wide gaps, one
               font per captcha (often decorative), vivid or pastel colours on white, thin lines;
               a third of the captchas turn their glyphs by up to 45 or 90 degrees.
  wordpress    plugin-style (Really Simple CAPTCHA and kin): small, clean, dark on a light plain
               background, a few dots or lines.
  php_heavy    heavy occlusion (Securimage/Gregwar-like): many lines and arcs in the ink colour or
               in random colours, dots, a sine warp.
  gradient     two- or three-colour gradient backgrounds, contrasting ink, sometimes a shadow.
  low_contrast ink close to the background's brightness, noisy or textured background, blur.
  textured     cloud/crosshatch/confetti backgrounds, solid or outlined glyphs, filled glyphs.
  classic      small ASP/JSP-style: per-character random colours, random-coloured lines and dots,
               sometimes a border.
  dense        overlapping wavy glyphs, no noise (reCAPTCHA-like).
  band         small glyphs in a thin band of a tall image, any background, lines and dots.
  generic      every knob drawn at random: the widest coverage.
  ramp         a dark-to-light grey (or tinted) ramp, mostly left to right, behind per-symbol
               coloured glyphs.
  sparse       small text (cap height 10-14 px) in a large image: glyphs cover < 1.6% of it.
  pale         pale grey/pastel glyphs on white or light: one colour, one per symbol, or a colour
               ramp inside the glyphs; often outlined (hollow).
  jumble       rotated (up to 45 degrees), overlapping glyphs of mixed sizes, thin (eroded) or
               bold (bold faces, wider strokes), dense arcs and dots.

Effects (EFFECTS, applied over any style's finished image; SynthConfig.effects): "mix" gives each
image each effect at its rate (scaled per style: `captcha_pkg` 0.4, the legacy `captcha` 0;
effect_rates() gives the resulting fraction of mix images), "none" none, names ("frame,jpeg")
all of them on every image. They draw from their own generator (effect_rng): an image with
effects is its effect-free twin plus the effects, and effects(i) needs no rendering.
  shade        uneven light multiplied in: dark-to-light ramp (across, down, diagonal), vignette,
               or texture.
  clutter      dense arcs and dots over everything.
  frame        1-3 px border lines, one or two (double), black, grey or a contrasting colour.
  jpeg         JPEG compression at quality 20-90, 4:2:0 or 4:4:4, decoded again in memory.
mix_table() writes the shares and rates as a Markdown table (for a model card).

Fonts (never downloaded; files already on disk only):
  * shipped with pip packages (always used):
    - `captcha` package: DroidSansMono.ttf, Apache License 2.0.
    - matplotlib (mpl-data/fonts/ttf): DejaVu Sans / Sans Mono / Serif, 12 faces (Bitstream Vera
      licence, DejaVu changes public domain); STIX General, 4 faces (SIL OFL 1.1); Computer Modern
      cmr10, cmb10, cmss10, cmtt10, cmti10, cmmi10 (BaKoMa fonts licence: free use).
  * extra font folders, only when SynthConfig.font_dirs names them (for the model-building
    script); DEBIAN_FONT_PACKAGES lists the Debian packages chosen and their licences:
        apt-get install -y --no-install-recommends <its keys>;  font_dirs=DEBIAN_FONT_DIRS
    Fonts are grouped by folder and a sample picks a group first, so a folder with many faces
    does not dominate. The set rendered depends on the folders' contents: same folders, same set.
    The fonts only shape training images; no font file ships with the package or a model.
Every font is checked against the charset before use: each symbol must render, differ from the
missing-glyph box and from every other symbol, and a font that draws lower case as upper case
(or the reverse) is dropped when the charset has lower-case letters. Symbol fonts that map ASCII
to pictures are excluded by name (_EXCLUDED_FONTS).

Synthetic images are training data, not a claim about any real site's captcha.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import random
import re
import string
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import captcha.image as _captcha_image
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageStat

DIGITS_UPPER = string.digits + string.ascii_uppercase
DIGITS_LETTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase

# Debian packages worth passing as font_dirs (apt-get install -y --no-install-recommends ...);
# all are in Debian main. name -> licence (from /usr/share/doc/<name>/copyright).
DEBIAN_FONT_PACKAGES = {
    "fonts-dejavu-core": "Bitstream Vera licence + public domain",
    "fonts-dejavu-extra": "Bitstream Vera licence + public domain",
    "fonts-liberation2": "SIL OFL 1.1",
    "fonts-freefont-ttf": "GPL-3+ with font exception",
    "fonts-urw-base35": "AGPL-3 with font exception",
    "fonts-texgyre": "GUST Font License",
    "fonts-linuxlibertine": "GPL-2+ with font exception / OFL 1.1",
    "fonts-roboto-unhinted": "Apache 2.0",
    "fonts-open-sans": "Apache 2.0",
    "fonts-courier-prime": "SIL OFL 1.1",
    "fonts-comic-neue": "SIL OFL 1.1",
    "fonts-humor-sans": "SIL OFL 1.1",
    "fonts-dustin": "GPL-2",
    "fonts-cabinsketch": "SIL OFL 1.1",
    "fonts-dancingscript": "SIL OFL 1.1",
    "fonts-kaushanscript": "SIL OFL 1.1",
    "fonts-lobster": "SIL OFL 1.1",
    "fonts-yanone-kaffeesatz": "SIL OFL 1.1",
    "fonts-bebas-neue": "SIL OFL 1.1",
    "fonts-jura": "GPL-3 / SIL OFL 1.1",
    "fonts-quicksand": "SIL OFL 1.1",
    "fonts-comfortaa": "SIL OFL 1.1",
    "fonts-staypuft": "LGPL-2+",
    "fonts-tomsontalks": "SIL OFL 1.1",
    "fonts-breip": "SIL OFL 1.0",
    "fonts-rufscript": "GPL-3 with font exception",
    "fonts-cherrybomb": "SIL OFL 1.1",
    "fonts-leckerli-one": "SIL OFL 1.1",
    "fonts-sjfonts": "GPL with font exception",
    "fonts-okolaks": "SIL OFL 1.1",
    "fonts-ocr-a": "public domain",
    "fonts-dkg-handwriting": "SIL OFL 1.1",
    "fonts-femkeklaver": "CC-BY-SA-3.0",
    "fonts-f500": "Artistic",
    "fonts-engadget": "GPL-3+",
    "fonts-3270": "BSD-3-Clause / SIL OFL 1.1",
    "fonts-adf-accanthis": "GPL-2+ with font exception",
    "fonts-adf-baskervald": "GPL-2+ with font exception",
    "fonts-adf-berenis": "GPL-2+ with font exception",
    "fonts-adf-gillius": "GPL-2+ with font exception",
    "fonts-adf-ikarius": "GPL-2+ with font exception",
    "fonts-adf-irianis": "GPL-2+ with font exception",
    "fonts-adf-libris": "GPL-2+ with font exception",
    "fonts-adf-mekanus": "GPL-2+ with font exception",
    "fonts-adf-oldania": "GPL-2+ with font exception",
    "fonts-adf-romande": "GPL-2+ with font exception",
    "fonts-adf-solothurn": "GPL-2+ with font exception",
    "fonts-adf-switzera": "GPL-2+ with font exception",
    "fonts-adf-tribun": "GPL-2+ with font exception",
    "fonts-adf-universalis": "GPL-2+ with font exception",
    "fonts-adf-verana": "GPL-2+ with font exception",
    "fonts-agave": "MIT",
    "fonts-allerta": "SIL OFL 1.1",
    "fonts-anonymous-pro": "SIL OFL 1.1",
    "fonts-apropal": "SIL OFL 1.1",
    "fonts-arapey": "SIL OFL 1.1",
    "fonts-averia-gwf": "SIL OFL 1.1",
    "fonts-averia-sans-gwf": "SIL OFL 1.1",
    "fonts-averia-serif-gwf": "SIL OFL 1.1",
    "fonts-b612": "SIL OFL 1.1 / EPL-2.0",
    "fonts-bajaderka": "SIL OFL 1.1",
    "fonts-beteckna": "GPL-3",
    "fonts-bwht": "SIL OFL 1.1",
    "fonts-cabin": "SIL OFL 1.1",
    "fonts-cantarell": "SIL OFL 1.1",
    "fonts-century-catalogue": "SIL OFL 1.1",
    "fonts-clear-sans": "Apache 2.0",
    "fonts-cmu": "SIL OFL 1.1",
    "fonts-compagnon": "SIL OFL 1.1",
    "fonts-crosextra-caladea": "SIL OFL 1.1",
    "fonts-crosextra-carlito": "SIL OFL 1.1",
    "fonts-dosis": "SIL OFL 1.1",
    "fonts-ebgaramond": "SIL OFL 1.1",
    "fonts-ecolier-court": "SIL OFL 1.1",
    "fonts-eurofurence": "SIL OFL 1.1",
    "fonts-fantasma": "CC0-1.0",
    "fonts-fantasque-sans": "SIL OFL 1.1",
    "fonts-ferrite-core": "SIL OFL 1.1",
    "fonts-firacode": "SIL OFL 1.1",
    "fonts-gnutypewriter": "SIL OFL 1.1",
    "fonts-goudybookletter": "public domain",
    "fonts-hack": "MIT + Bitstream Vera licence",
    "fonts-hermit": "GPL-3",
    "fonts-inconsolata": "SIL OFL 1.0",
    "fonts-inter": "SIL OFL 1.1 / Apache 2.0",
    "fonts-isabella": "LGPL-2+",
    "fonts-jetbrains-mono": "Apache 2.0",
    "fonts-junction": "SIL OFL 1.1",
    "fonts-karla": "SIL OFL 1.1",
    "fonts-kristi": "SIL OFL 1.1",
    "fonts-lato": "SIL OFL 1.1",
    "fonts-le-murmure": "SIL OFL 1.1",
    "fonts-league-mono": "SIL OFL 1.1",
    "fonts-league-spartan": "SIL OFL 1.1",
    "fonts-lindenhill": "MIT",
    "fonts-lobstertwo": "SIL OFL 1.1",
    "fonts-manrope": "SIL OFL 1.1",
    "fonts-millimetre": "SIL OFL 1.1",
    "fonts-monofur": "SIL OFL 1.1",
    "fonts-national-park": "SIL OFL 1.1",
    "fonts-ocr-b": "public domain",
    "fonts-opendin": "SIL OFL 1.1",
    "fonts-opendyslexic": "CC-BY-3.0 + Bitstream Vera licence",
    "fonts-osifont": "GPL-3 / LGPL-3 / GPL-2 with font exception",
    "fonts-play": "Apache 2.0",
    "fonts-prociono": "public domain",
    "fonts-quattrocento": "SIL OFL 1.1",
    "fonts-radisnoir": "SIL OFL 1.1",
    "fonts-rampart": "SIL OFL 1.1",
    "fonts-roadgeek": "MIT",
    "fonts-roboto-slab": "Apache 2.0",
    "fonts-rocknroll": "SIL OFL 1.1",
    "fonts-routed-gothic": "SIL OFL 1.1",
    "fonts-solide-mirage": "SIL OFL 1.1",
    "fonts-sora": "SIL OFL 1.1",
    "fonts-stick": "SIL OFL 1.1",
}
DEBIAN_FONT_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts/opentype")

# Fonts that map ASCII to symbols or carry no Latin glyphs, matched on the file name (matplotlib's
# DejaVu*Display faces hold a few glyphs; other families named Display are whole text faces; the last
# pattern draws small capitals).
_EXCLUDED_FONTS = re.compile(r"(STIXSiz|STIXNonUni|DejaVu\w*Display|LastResort|cmex10|cmsy10|D050000L|"
                             r"StandardSymbols|LinBiolinum_K|MathTeXGyre|aenigma|It_wasn_t_me)", re.I)
MIN_CAP = 10  # px: the smallest cap height drawn (before a too-wide run is shrunk to fit)
# Plain text faces (names): styles that imitate plain sites prefer them.
_PLAIN_FONTS = re.compile(r"(sans|serif|mono|roman|droid|liberation|free|nimbus|roboto|open.?sans|courier|"
                          r"texgyre|cm(r|b|ss|tt)10|stixgeneral|libertine|bookman|c059|p052|gothic)", re.I)


# ------------------------------------------------------------------------------------ config

@dataclass
class SynthConfig:
    charset: str = DIGITS_UPPER        # symbols the labels draw from (uniformly)
    min_len: int = 4                   # label length range, inclusive
    max_len: int = 8
    height: int = 50                   # style "captcha" only: image height in pixels
    char_width: int = 30               # style "captcha" only: width = char_width * len(label) + margin
    margin: int = 20
    font_sizes: Tuple[int, ...] = (32, 36, 40)  # style "captcha" only (its defaults clip at height 50)
    seed: int = 0
    clean: bool = False                # style "captcha" only: no noise dots or arc, dark ink
    style: str = "captcha"             # a STYLES name, "mix" (all but "captcha", by share), or names joined by ","
    font_dirs: Tuple[str, ...] = ()    # extra font folders (e.g. DEBIAN_FONT_DIRS) beside the pip fonts
    effects: str = "mix"               # "mix" (each EFFECTS entry at its rate), "none", or names joined by ","
                                       # (those on every image)

    def __post_init__(self):
        self.font_sizes = tuple(self.font_sizes)
        self.font_dirs = tuple(str(d) for d in self.font_dirs)
        if not self.charset:
            raise ValueError("synthetic captchas need a non-empty charset")
        if any(c.isspace() for c in self.charset):
            raise ValueError(f"the charset may not hold white space, got {self.charset!r}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}")
        if self.height < 16 or self.char_width < 8:
            raise ValueError(f"height must be >= 16 and char_width >= 8, got {self.height}, {self.char_width}")
        self.styles()  # names checked here, not at the first render
        self.forced_effects()
        for d in self.font_dirs:
            if not Path(d).is_dir():
                raise ValueError(f"font folder {d!r} does not exist")

    def styles(self) -> Tuple[str, ...]:
        """The style names this config draws from."""
        if self.style == "mix":
            return MIX
        names = tuple(s.strip() for s in self.style.split(","))
        unknown = [s for s in names if s not in STYLES]
        if unknown:
            raise ValueError(f"unknown synthetic style(s) {unknown}; choose from {sorted(STYLES)} or 'mix'")
        return names

    def forced_effects(self) -> Tuple[str, ...]:
        """The effects every image gets ("mix" and "none": none forced)."""
        if self.effects in ("mix", "none"):
            return ()
        names = tuple(s.strip() for s in self.effects.split(","))
        unknown = [s for s in names if s not in EFFECTS]
        if unknown:
            raise ValueError(f"unknown synthetic effect(s) {unknown}; choose from {sorted(EFFECTS)}, 'mix' or 'none'")
        return tuple(name for name in EFFECTS if name in names)  # applied in EFFECTS order

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ fonts

def pip_fonts() -> List[str]:
    """The fonts that ship inside pip packages (captcha, matplotlib), sorted."""
    import matplotlib
    paths = list(_captcha_image.DEFAULT_FONTS)
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths += sorted(str(p) for p in ttf.glob("*.ttf") if not _EXCLUDED_FONTS.search(p.name))
    return paths


def folder_fonts(dirs: Sequence[str]) -> List[str]:
    """Every .ttf/.otf under the folders (recursively), sorted, symbol fonts left out."""
    found = set()
    for d in dirs:
        for p in Path(d).rglob("*"):
            if p.suffix.lower() in (".ttf", ".otf") and not _EXCLUDED_FONTS.search(p.name):
                found.add(str(p))
    return sorted(found)


@functools.lru_cache(maxsize=1024)  # a face holds ~160 KB: this bounds the cache near 160 MB
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, max(4, size), layout_engine=ImageFont.Layout.BASIC)


def _size_step(size: float) -> int:
    """The font size rounded to steps of ~7% (4, 5, ..., 14, 15, 16, 17, 19, 20, 22, ...): fewer
    distinct (font, size) faces to load and cache."""
    return max(4, int(round(1.07 ** round(math.log(max(size, 4.0)) / math.log(1.07)))))


@functools.lru_cache(maxsize=None)
def _cap_ratio(path: str) -> float:
    """Cap height per pixel of font size ("H"), to size glyphs by the height they draw."""
    l, t, r, b = _font(path, 100).getbbox("H", anchor="ls")
    return max(0.3, min(1.2, (b - t) / 100))


def _glyph_bits(font: ImageFont.FreeTypeFont, ch: str) -> Tuple[Tuple[int, int], bytes]:
    mask = font.getmask(ch)
    return mask.size, bytes(mask)


def _same_shape(a, b) -> bool:
    """Whether glyph b, scaled to glyph a's box, covers the same pixels (IoU > 0.75)."""
    if 0 in a.size or 0 in b.size:
        return False
    ia = np.asarray(Image.frombytes("L", a.size, bytes(a))) > 96
    ib = np.asarray(Image.frombytes("L", b.size, bytes(b)).resize(a.size, Image.BILINEAR)) > 96
    union = np.logical_or(ia, ib).sum()
    return union > 0 and np.logical_and(ia, ib).sum() / union > 0.75


def _caps_only(font: ImageFont.FreeTypeFont) -> bool:
    """Whether the font draws lower case as upper case (or the reverse): same shapes for most
    letters (ordinary fonts share about 8-12: c o s v w x z ...), or x-height letters as tall as
    capitals (ordinary fonts: 0.45-0.85 of the cap height)."""
    same = sum(_same_shape(font.getmask(c.upper()), font.getmask(c)) for c in string.ascii_lowercase)
    ratios = []
    for c in "acemnorsuvwxz":
        lower, upper = font.getbbox(c, anchor="ls"), font.getbbox(c.upper(), anchor="ls")
        ratios.append((lower[3] - lower[1]) / max(1, upper[3] - upper[1]))
    return same > 15 or float(np.median(ratios)) > 0.9


def font_fits(path: str, charset: str) -> bool:
    """Whether the font draws every symbol of the charset as its own, real glyph."""
    try:
        font = _font(path, 40)
        missing = {_glyph_bits(font, "\uffff"), _glyph_bits(font, "\U000f0000")}
        seen = set()
        for ch in charset:
            bits = _glyph_bits(font, ch)
            if 0 in bits[0] or not any(bits[1]) or bits in missing or bits in seen:
                return False
            seen.add(bits)
        if any(c.islower() for c in charset) and _caps_only(font):
            return False
    except OSError:
        return False
    return True


class FontPool(NamedTuple):
    groups: Tuple[Tuple[str, ...], ...]   # fonts grouped by folder (one package each)
    plain: Tuple[str, ...]                # the plain text faces among them

    def pick(self, rng: random.Random) -> str:
        return rng.choice(rng.choice(self.groups))

    def pick_plain(self, rng: random.Random) -> str:
        return rng.choice(self.plain) if self.plain else self.pick(rng)


_POOLS: Dict[Tuple[Tuple[str, ...], str], FontPool] = {}
_POOL_LOCK = threading.Lock()


def font_pool(charset: str, font_dirs: Sequence[str] = ()) -> FontPool:
    """The usable fonts for `charset`: the pip fonts plus those under font_dirs (cached)."""
    key = (tuple(font_dirs), "".join(sorted(set(charset))))
    with _POOL_LOCK:
        if key not in _POOLS:
            by_folder: Dict[str, List[str]] = {}
            for path in pip_fonts() + folder_fonts(font_dirs):
                if font_fits(path, key[1]):
                    folder = Path(path).parent.name
                    if folder == "ttf":  # matplotlib's folder: one group per family
                        stem = Path(path).stem
                        folder = "cm" if stem.startswith("cm") else re.sub(r"-.*|(Bol|Ita).*", "", stem)
                    by_folder.setdefault(folder, []).append(path)
            if not by_folder:
                raise ValueError(f"no font draws every symbol of the charset {charset!r}")
            groups = tuple(tuple(v) for _, v in sorted(by_folder.items()))
            plain = tuple(p for g in groups for p in g if _PLAIN_FONTS.search(Path(p).name))
            _POOLS[key] = FontPool(groups, plain)
        return _POOLS[key]


# ------------------------------------------------------------------------------------ colours

Colour = Tuple[int, int, int]


def _hsv(h: float, s: float, v: float) -> Colour:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _dark(rng: random.Random) -> Colour:
    return _hsv(rng.random(), rng.uniform(0, 0.9), rng.uniform(0, 0.45))


def _vivid(rng: random.Random) -> Colour:
    return _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.35, 0.95))


def _pastel(rng: random.Random) -> Colour:
    return _hsv(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.75, 0.98))


def _light(rng: random.Random) -> Colour:
    return _hsv(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.85, 1.0))


def _luma(c: Colour) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _ink(rng: random.Random, backgrounds: Sequence[Colour], contrast: float = 60.0,
         kinds: Sequence[Callable[[random.Random], Colour]] = (_dark, _vivid, _light)) -> Colour:
    """An ink colour whose brightness differs by >= contrast from every background colour given
    (a few tries among `kinds`; then black or white, whichever is further)."""
    lumas = [_luma(c) for c in backgrounds]
    for _ in range(12):
        c = rng.choice(kinds)(rng)
        if min(abs(_luma(c) - l) for l in lumas) >= contrast:
            return c
    return (0, 0, 0) if sum(lumas) / len(lumas) > 128 else (255, 255, 255)


def _np_rng(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.getrandbits(63))


# ------------------------------------------------------------------------------------ backgrounds

def _solid(size, colour: Colour) -> Image.Image:
    return Image.new("RGB", size, colour)


def _gradient(size, colours: Sequence[Colour], angle: float) -> Image.Image:
    """A linear gradient through `colours` along the direction `angle` (radians; 0: left to right).
    Computed at a quarter of the size and upsampled: a linear ramp survives bilinear scaling."""
    w, h = size
    sw, sh = max(2, w // 4), max(2, h // 4)
    t = (np.arange(sw, dtype=np.float32)[None, :] * (w / sw) * math.cos(angle)
         + np.arange(sh, dtype=np.float32)[:, None] * (h / sh) * math.sin(angle))
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    stops = np.asarray(colours, dtype=np.float32)
    k = len(colours) - 1
    seg = np.minimum((t * k).astype(np.int32), k - 1)
    frac = (t * k - seg)[..., None]
    out = stops[seg] * (1 - frac) + stops[seg + 1] * frac
    return Image.fromarray(out.astype(np.uint8), "RGB").resize((w, h), Image.BILINEAR)


def _noisy(image: Image.Image, rng: random.Random, sigma: float, mono: bool = True) -> Image.Image:
    a = np.asarray(image, dtype=np.int16)
    shape = a.shape[:2] + ((1,) if mono else (3,))
    noise = _np_rng(rng).integers(-int(sigma), int(sigma) + 1, size=shape, dtype=np.int16)
    return Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8), "RGB")


def _clouds(size, rng: random.Random, c0: Colour, c1: Colour, cell: int) -> Image.Image:
    """Smooth random blotches between two colours (low-resolution noise, upsampled)."""
    w, h = size
    small = _np_rng(rng).random((h // cell + 2, w // cell + 2), dtype=np.float32)
    t = np.asarray(Image.fromarray((small * 255).astype(np.uint8), "L").resize((w, h), Image.BICUBIC),
                   dtype=np.float32)[..., None] / 255
    out = np.asarray(c0, np.float32) * (1 - t) + np.asarray(c1, np.float32) * t
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _texture(size, rng: random.Random, base: Colour) -> Image.Image:
    """A light patterned background: clouds, crosshatch, confetti shapes or grid."""
    kind = rng.choice(("clouds", "hatch", "confetti", "grid"))
    if kind == "clouds":
        return _clouds(size, rng, base, _light(rng) if rng.random() < 0.5 else _pastel(rng), rng.randint(4, 20))
    image = _solid(size, base)
    draw = ImageDraw.Draw(image)
    w, h = size
    ink = lambda: _hsv(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.6, 0.9))  # noqa: E731
    if kind == "hatch":
        step, colour = rng.randint(4, 10), ink()
        for k in range(-h, w + h, step):
            draw.line([(k, 0), (k + h, h)], fill=colour)
            if rng.random() < 0.5:
                draw.line([(k, h), (k + h, 0)], fill=colour)
    elif kind == "confetti":
        for _ in range(w * h // rng.randint(60, 200)):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randint(1, 5)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_pastel(rng) if rng.random() < 0.7 else _light(rng))
    else:
        step, colour = rng.randint(6, 16), ink()
        for x in range(rng.randrange(step), w, step):
            draw.line([(x, 0), (x, h)], fill=colour)
        for y in range(rng.randrange(step), h, step):
            draw.line([(0, y), (w, y)], fill=colour)
    return image


# ------------------------------------------------------------------------------------ glyphs

class Glyph(NamedTuple):
    mask: Image.Image   # "L" coverage, cropped to the ink
    ref: Tuple[float, float]  # the middle of the cap band (centre of the letter body) in mask pixels


def _glyph(ch: str, font: ImageFont.FreeTypeFont, cap: float, angle: float, stroke: int = 0,
           hollow: bool = False, thin: bool = False) -> Glyph:
    l, t, r, b = font.getbbox(ch, anchor="ls", stroke_width=stroke)
    pad = 2 + stroke
    mask = Image.new("L", (r - l + 2 * pad, b - t + 2 * pad), 0)
    origin = (pad - l, pad - t)  # where the baseline-left point lands
    ImageDraw.Draw(mask).text(origin, ch, font=font, anchor="ls", fill=0 if hollow else 255,
                              stroke_width=stroke, stroke_fill=255)
    if thin and cap >= 18:  # a lighter weight than the face has: erode by a pixel, if a stroke survives
        eroded = mask.filter(ImageFilter.MinFilter(3))
        if eroded.getbbox() is not None and np.count_nonzero(np.asarray(eroded) > 128) >= 0.3 * cap:
            mask = eroded
    rx, ry = mask.width / 2, origin[1] - cap / 2
    if angle:
        cx, cy = mask.width / 2, mask.height / 2
        mask = mask.rotate(angle, Image.BILINEAR, expand=True)
        a = math.radians(angle)
        dx, dy = rx - cx, ry - cy
        rx = mask.width / 2 + dx * math.cos(a) + dy * math.sin(a)
        ry = mask.height / 2 - dx * math.sin(a) + dy * math.cos(a)
    box = mask.getbbox()
    if box is None:  # cannot happen for fonts that passed font_fits; keep a dot rather than fail
        box = (0, 0, 1, 1)
    return Glyph(mask.crop(box), (rx - box[0], ry - box[1]))


class Run:
    """A line of glyphs laid out left to right: gaps[i] is the space before glyph i+1 (< 0: overlap)."""

    def __init__(self, glyphs: List[Glyph], gaps: List[float]):
        self.glyphs, self.gaps = glyphs, gaps

    @property
    def width(self) -> float:
        return sum(g.mask.width for g in self.glyphs) + sum(self.gaps)

    @property
    def height(self) -> int:
        return max(g.mask.height for g in self.glyphs)

    def scaled(self, factor: float) -> "Run":
        out = []
        for g in self.glyphs:
            size = (max(1, round(g.mask.width * factor)), max(1, round(g.mask.height * factor)))
            out.append(Glyph(g.mask.resize(size, Image.BILINEAR), (g.ref[0] * factor, g.ref[1] * factor)))
        return Run(out, [gap * factor for gap in self.gaps])

    def fit(self, width: float, height: float) -> "Run":
        """Shrunk (never grown) so that it fits width x height."""
        factor = min(1.0, width / max(1.0, self.width), height / max(1, self.height))
        return self.scaled(factor) if factor < 0.98 else self

    def draw(self, image: Image.Image, x: float, cy: float, fills: Sequence, jitter_y: Sequence[float] = (),
             shadow: Optional[Tuple[int, int, Colour]] = None) -> List[Tuple[int, int, int, int]]:
        """Paste the glyphs starting at x with their band centres on cy (+ jitter, kept inside the
        image); fills[i] is a colour or an image of the canvas size. Returns the glyph boxes."""
        boxes = []
        w, h = image.size
        for i, g in enumerate(self.glyphs):
            gx = int(round(x))
            gy = int(round(cy + (jitter_y[i] if jitter_y else 0) - g.ref[1]))
            gy = max(0, min(h - g.mask.height, gy))
            gx = max(0, min(w - g.mask.width, gx))
            if shadow is not None:
                image.paste(shadow[2], (gx + shadow[0], gy + shadow[1]), g.mask)
            fill = fills[i % len(fills)]
            box = (gx, gy, gx + g.mask.width, gy + g.mask.height)
            if isinstance(fill, Image.Image):
                image.paste(fill.crop(box), box[:2], g.mask)
            else:
                image.paste(fill, box[:2], g.mask)
            boxes.append(box)
            x += g.mask.width + (self.gaps[i] if i < len(self.gaps) else 0)
        return boxes


def _run(text: str, rng: random.Random, fonts: Sequence[str], cap: float, *, rotate: float = 0.0,
         scale_jitter: float = 0.0, gap: Tuple[float, float] = (0.05, 0.2), stroke: int = 0,
         hollow_p: float = 0.0, thin: bool = False) -> Run:
    """Glyphs of `text` whose cap height is about `cap` px; fonts[i % len] draws symbol i.
    gap: the space between glyphs as a fraction of cap, drawn uniformly per gap (< 0: overlap);
    stroke: px added around each glyph (bolder); thin: a pixel eroded (lighter)."""
    glyphs = []
    cap = max(cap, MIN_CAP)
    for i, ch in enumerate(text):
        path = fonts[i % len(fonts)]
        size = _size_step(cap * (1 + rng.uniform(-scale_jitter, scale_jitter)) / _cap_ratio(path))
        c, font = size * _cap_ratio(path), _font(path, size)
        hollow = hollow_p > 0 and rng.random() < hollow_p
        glyphs.append(_glyph(ch, font, c, rng.uniform(-rotate, rotate) if rotate else 0.0,
                             stroke=max(stroke, 1 if hollow else 0), hollow=hollow, thin=thin and not hollow))
    gaps = [rng.uniform(*gap) * cap for _ in range(len(text) - 1)]
    return Run(glyphs, gaps)


# ------------------------------------------------------------------------------------ noise

def _lines(draw: ImageDraw.ImageDraw, rng: random.Random, size, n: int, colour: Callable[[], Colour],
           width: Tuple[int, int] = (1, 1), across: bool = True) -> None:
    """n straight lines; across: from the left part to the right part, else anywhere."""
    w, h = size
    for _ in range(n):
        if across:
            p = (rng.uniform(-0.1, 0.3) * w, rng.uniform(0, h))
            q = (rng.uniform(0.7, 1.1) * w, rng.uniform(0, h))
        else:
            p = (rng.uniform(0, w), rng.uniform(0, h))
            q = (p[0] + rng.uniform(-0.5, 0.5) * w, p[1] + rng.uniform(-1, 1) * h)
        draw.line([p, q], fill=colour(), width=rng.randint(*width))


def _arcs(draw: ImageDraw.ImageDraw, rng: random.Random, size, n: int, colour: Callable[[], Colour],
          width: Tuple[int, int] = (1, 2)) -> None:
    w, h = size
    for _ in range(n):
        x0, y0 = rng.uniform(-0.3, 0.6) * w, rng.uniform(-0.5, 0.6) * h
        x1, y1 = x0 + rng.uniform(0.3, 1.0) * w, y0 + rng.uniform(0.4, 1.5) * h
        start = rng.uniform(0, 360)
        draw.arc([x0, y0, x1, y1], start, start + rng.uniform(60, 240), fill=colour(), width=rng.randint(*width))


def _curve_points(rng: random.Random, size, x0: float, x1: float, cy: float, amp: float, n: int = 24):
    """A smooth wavy path from x0 to x1 around height cy (a sine plus a parabola)."""
    period = rng.uniform(0.6, 2.0) * (x1 - x0)
    phase, bend = rng.uniform(0, 2 * math.pi), rng.uniform(-1, 1) * amp
    pts = []
    for k in range(n + 1):
        u = k / n
        x = x0 + u * (x1 - x0)
        y = cy + amp * math.sin(2 * math.pi * (x - x0) / period + phase) + bend * (2 * u - 1) ** 2
        pts.append((x, y))
    return pts


def _curves(draw: ImageDraw.ImageDraw, rng: random.Random, size, n: int, colour: Callable[[], Colour],
            width: Tuple[int, int] = (1, 3)) -> None:
    w, h = size
    for _ in range(n):
        x0 = rng.uniform(-0.05, 0.3) * w
        pts = _curve_points(rng, size, x0, rng.uniform(0.7, 1.05) * w, rng.uniform(0.25, 0.75) * h,
                            rng.uniform(0.05, 0.3) * h)
        draw.line(pts, fill=colour(), width=rng.randint(*width), joint="curve")


def _dots(draw: ImageDraw.ImageDraw, rng: random.Random, size, n: int, colour: Callable[[], Colour],
          radius: Tuple[float, float] = (0.5, 1.5)) -> None:
    w, h = size
    for _ in range(n):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(*radius)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour())


def _speckle(image: Image.Image, rng: random.Random, amount: float) -> Image.Image:
    """Salt-and-pepper: `amount` of the pixels set to black or white."""
    a = np.array(image)
    g = _np_rng(rng)
    hit = g.random(a.shape[:2]) < amount
    a[hit] = np.where(g.random((int(hit.sum()), 1)) < 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


# ------------------------------------------------------------------------------------ warps

def _warp(image: Image.Image, rng: random.Random, amp_x: float, amp_y: float) -> Image.Image:
    """Sine ripple: row y moves across by amp_x sin(y), column x moves down by amp_y sin(x).
    Nearest pixel, as PHP's GD warps do (and 10x cheaper than bilinear in numpy)."""
    w, h = image.size
    px, py = rng.uniform(0.3, 1.0) * w, rng.uniform(0.5, 2.0) * h
    fx, fy = rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
    xs = np.arange(w)[None, :] + amp_x * np.sin(2 * np.pi * np.arange(h)[:, None] / py + fy)
    ys = np.arange(h)[:, None] + amp_y * np.sin(2 * np.pi * np.arange(w)[None, :] / px + fx)
    xs = np.clip(np.rint(xs), 0, w - 1).astype(np.intp)
    ys = np.clip(np.rint(ys), 0, h - 1).astype(np.intp)
    return Image.fromarray(np.asarray(image)[ys, xs], "RGB")


def _ragged(image: Image.Image, rng: random.Random, radius: int) -> Image.Image:
    """Every pixel copied from a random neighbour up to `radius` away: hairy, torn glyph edges."""
    a = np.asarray(image)
    h, w = a.shape[:2]
    g = _np_rng(rng)
    ys = np.clip(np.arange(h)[:, None] + g.integers(-radius, radius + 1, (h, w)), 0, h - 1)
    xs = np.clip(np.arange(w)[None, :] + g.integers(-radius, radius + 1, (h, w)), 0, w - 1)
    return Image.fromarray(a[ys, xs], "RGB")


def _blur(image: Image.Image, radius: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0.15 else image


def _grey(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


# ------------------------------------------------------------------------------------ effects
# Applied over a finished image of any style (EFFECTS, below): none moves a pixel, so the glyph
# boxes stay right.

def _median_colour(image: Image.Image) -> Colour:
    return tuple(ImageStat.Stat(image).median)  # per channel, from the histogram (fast)


def _frame(image: Image.Image, rng: random.Random) -> Image.Image:
    """1-3 px lines around the edge, sometimes two (a double frame), sometimes a pixel in: black,
    grey or a colour that stands out from the background (Kaptcha's default, PHP/ASP sites)."""
    image = image.copy()
    bg = _median_colour(image)
    draw = ImageDraw.Draw(image)
    w, h = image.size
    at = rng.choice((0, 0, 0, 1))
    for _ in range(2 if rng.random() < 0.25 else 1):
        colour = rng.choice(((0, 0, 0), (rng.randint(40, 140),) * 3, None))
        if colour is None or abs(_luma(colour) - _luma(bg)) < 60:
            colour = _ink(rng, [bg], 60, (_dark, _vivid))
        width = rng.choice((1, 1, 2, 3))
        draw.rectangle([at, at, w - 1 - at, h - 1 - at], outline=colour, width=width)
        at += width + rng.randint(1, 2)
    return image


def _shade(image: Image.Image, rng: random.Random) -> Image.Image:
    """Multiplied by uneven light: a dark-to-light ramp (across, down or diagonal), a vignette, or
    a texture; light ink on a dark background darkens with it."""
    w, h = image.size
    kind = rng.choice(("ramp", "ramp", "vignette", "texture"))
    low = rng.randint(90, 210)
    if kind == "ramp":
        tint = (low,) * 3 if rng.random() < 0.6 else tuple(min(255, low + rng.randint(-30, 30)) for _ in range(3))
        angle = rng.choice((0.0, math.pi, math.pi / 2, -math.pi / 2, rng.uniform(0, 2 * math.pi)))
        light = np.asarray(_gradient((w, h), [tint, (255, 255, 255)], angle), np.float32)
    elif kind == "vignette":
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        r2 = ((np.arange(w)[None, :] - cx) / w) ** 2 + ((np.arange(h)[:, None] - cy) / h) ** 2
        light = (255 - (255 - low) * np.minimum(1.0, 2.5 * r2))[..., None].astype(np.float32)
    else:
        light = np.asarray(_texture((w, h), rng, (255, 255, 255)), np.float32)
    return Image.fromarray((np.asarray(image, np.float32) * (light / 255)).astype(np.uint8), "RGB")


def _clutter(image: Image.Image, rng: random.Random) -> Image.Image:
    """Dense arcs and dots over everything, in one colour or many."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    one = _ink(rng, [_median_colour(image)], 60, (_dark, _vivid))
    colour = (lambda: one) if rng.random() < 0.5 else (lambda: _vivid(rng) if rng.random() < 0.6 else _dark(rng))
    _arcs(draw, rng, image.size, rng.randint(3, 10), colour, (1, 2))
    _dots(draw, rng, image.size, image.width * image.height // rng.randint(40, 160), colour, (0.4, 1.4))
    return image


def _jpeg(image: Image.Image, rng: random.Random) -> Image.Image:
    """Encoded as JPEG at quality 20-90 (4:2:0 or 4:4:4 chroma) and decoded again, in memory."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=rng.randint(20, 90), subsampling=rng.choice((0, 2)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


class Effect(NamedTuple):
    apply: Callable[[Image.Image, random.Random], Image.Image]
    rate: float   # the chance that a style with effect weight 1 gets it (SynthConfig.effects == "mix")
    about: str


# Applied in this order (JPEG last: it compresses what a site would serve).
EFFECTS: Dict[str, Effect] = {
    "shade": Effect(_shade, 0.15, "uneven light: dark-to-light ramp, vignette or texture, multiplied in"),
    "clutter": Effect(_clutter, 0.10, "dense arcs and dots over the text"),
    "frame": Effect(_frame, 0.20, "1-3 px border lines, single or double, black, grey or coloured"),
    "jpeg": Effect(_jpeg, 0.25, "JPEG artefacts, quality 20-90"),
}


def apply_effects(image: Image.Image, names: Sequence[str], rng: random.Random) -> Image.Image:
    """`image` with the EFFECTS `names` applied in order, every choice drawn from `rng`."""
    for name in names:
        image = EFFECTS[name].apply(image, rng)
    return image


def effect_rng(seed: int, index: int) -> random.Random:
    """The generator of sample `index`'s effects: apart from the style's, so that an image with
    effects is its effect-free twin plus the effects."""
    return random.Random(f"captcha_fast.synth:{seed}:{index}:effects")


# ------------------------------------------------------------------------------------ styles

class Rendered(NamedTuple):
    image: Image.Image
    boxes: Optional[List[Tuple[int, int, int, int]]]  # one per symbol (before warps); None: not known


class Style(NamedTuple):
    draw: Callable[[str, random.Random, FontPool], Rendered]
    size: Tuple[int, int, int, int]   # (min width, max width, min height, max height) of its images
    about: str
    share: int = 0          # its weight in the mix (percent; 0: not in the mix)
    effects: float = 1.0    # scales the EFFECTS rates in the mix (0: never any)


STYLES: Dict[str, Style] = {}


PACKAGE_SIZES = ((160, 60), (200, 50), (280, 90))  # the `captcha` package's most common ImageCaptcha sizes


def _style(name: str, size: Tuple[int, int, int, int], about: str, share: int, effects: float = 1.0):
    def register(fn):
        STYLES[name] = Style(fn, size, about, share, effects)
        return fn
    return register


def _width_for(run: Run, rng: random.Random, size: Tuple[int, int], margin: Tuple[float, float], h: int) -> int:
    """An image width around the run with margins (fractions of h), inside size=(min, max)."""
    return int(min(size[1], max(size[0], run.width + rng.uniform(*margin) * h * 2)))


def _place(run: Run, image: Image.Image, rng: random.Random, fills, cy: float, jitter: float = 0.0,
           pad: float = 2, shadow=None) -> List[Tuple[int, int, int, int]]:
    """Shrink the run to the image if needed, put it at a random x with the slack, draw it."""
    w, h = image.size
    run = run.fit(w - 2 * pad, h - 2)
    x = pad + rng.uniform(0, max(0.0, w - 2 * pad - run.width))
    jit = [rng.uniform(-jitter, jitter) for _ in run.glyphs]
    return run.draw(image, x, cy, fills, jit, shadow)


def _text_fonts(rng: random.Random, pool: FontPool, n: int, per_char: float) -> List[str]:
    """One font for the captcha, or (with probability per_char) one per symbol."""
    if rng.random() < per_char:
        return [pool.pick(rng) for _ in range(n)]
    return [pool.pick(rng)]


# The most common generator, and the hardest of the targets to learn: at a share of 14 the model read
# 65-69% of its renders after 2 CPU-hours, where one round of them alone lifted it to 79-83%; 40 gives
# it about a third of the mix.
@_style("captcha_pkg", (120, 320, 40, 100), "the captcha package's ImageCaptcha at common sizes", 40, effects=0.4)
def _captcha_pkg(text, rng, pool):
    if rng.random() < 0.8:  # as its users call it: ImageCaptcha(width, height) at the sizes most seen
        width, height = rng.choice(PACKAGE_SIZES)
        sizes = None  # the package's own (42, 50, 56)
    else:
        height = rng.randint(40, 100)
        width = min(320, max(120, int(height * rng.uniform(2.2, 4.0))))
        sizes = tuple(int(height * f) for f in (0.7, 0.83, 0.93))
    font = None if rng.random() < 0.85 else pool.pick(rng)
    return Rendered(render_package(text, rng, width, height, font, sizes), None)


@_style("v2", (150, 260, 40, 70), "captcha_images_v2 / Kaptcha: grey gradient, ragged black glyphs, hooked strike", 6)
def _v2(text, rng, pool):
    w, h = (200, 50) if rng.random() < 0.7 else (rng.randint(150, 260), rng.randint(40, 70))
    left, right = rng.randint(175, 210), rng.randint(235, 255)
    image = _gradient((w, h), [(left,) * 3, (right,) * 3], 0.0 if rng.random() < 0.7 else math.pi)
    font = pool.pick_plain(rng)
    run = _run(text, rng, [font], h * rng.uniform(0.5, 0.62), rotate=8, scale_jitter=0.08, gap=(-0.2, 0.0))
    x0 = rng.uniform(0.08, 0.2) * w
    run = run.fit(w - x0 - 4, h - 2)
    ink = (rng.randint(0, 30),) * 3
    boxes = run.draw(image, x0, h * rng.uniform(0.55, 0.65), [ink], [rng.uniform(-2, 2) for _ in text])
    image = _ragged(image, rng, 1 if rng.random() < 0.8 else 2)
    # the strike-through: a short hook down from the top-left, then a wide sweep to the right
    hx, hy = x0 + rng.uniform(-8, 4), rng.uniform(0.05, 0.35) * h
    start = (hx + rng.uniform(0, 6), hy + rng.uniform(0.2, 0.45) * h)
    end = (rng.uniform(0.8, 0.95) * w, rng.uniform(0.15, 0.6) * h)
    ctrl = (w * rng.uniform(0.35, 0.6), h * rng.uniform(0.4, 1.0))
    pts = [(hx, hy)] + [((1 - u) ** 2 * start[0] + 2 * u * (1 - u) * ctrl[0] + u * u * end[0],
                         (1 - u) ** 2 * start[1] + 2 * u * (1 - u) * ctrl[1] + u * u * end[1])
                        for u in (k / 16 for k in range(17))]
    ImageDraw.Draw(image).line(pts, fill=ink, width=rng.randint(2, 3), joint="curve")
    return Rendered(_grey(_blur(image, rng.uniform(0.3, 0.8))), boxes)


@_style("kaptcha", (120, 260, 40, 80), "Kaptcha generalised: light gradient, coloured ink, ripple, noise curve, border",
        6)
def _kaptcha(text, rng, pool):
    h = rng.randint(40, 80)
    image_bg = [_light(rng), _light(rng)] if rng.random() < 0.6 else [(rng.randint(180, 230),) * 3, (255, 255, 255)]
    run = _run(text, rng, [pool.pick_plain(rng)], h * rng.uniform(0.45, 0.65), rotate=10, scale_jitter=0.1,
               gap=(-0.15, 0.15))
    w = _width_for(run, rng, (120, 260), (0.15, 0.6), h)
    image = _gradient((w, h), image_bg, rng.uniform(0, 2 * math.pi))
    ink = rng.choice([(0, 0, 0), _dark(rng), _vivid(rng)])
    shadow = (rng.randint(1, 3), rng.randint(1, 3), _light(rng) if rng.random() < 0.5 else (128, 128, 128)) \
        if rng.random() < 0.3 else None
    boxes = _place(run, image, rng, [ink], h * rng.uniform(0.45, 0.6), jitter=h * 0.04, shadow=shadow)
    draw = ImageDraw.Draw(image)
    _curves(draw, rng, image.size, rng.randint(1, 2), lambda: ink, (1, 2))
    image = _warp(image, rng, rng.uniform(0, 2), rng.uniform(1.5, 4))
    image = _blur(image, rng.uniform(0, 0.6))
    return Rendered(_frame(image, rng) if rng.random() < 0.5 else image, boxes)  # Kaptcha's default has a border


@_style("varlen", (100, 900, 60, 100), "varlen_upper: thin central band, wide gaps, many fonts, pastel on white, "
                                       "glyphs turned up to 90 degrees", 10)
def _varlen(text, rng, pool):
    h = 80 if rng.random() < 0.7 else rng.randint(60, 100)
    fonts = _text_fonts(rng, pool, len(text), 0.15)
    pastel = rng.random() < 0.5
    fills = [_pastel(rng) if (pastel or rng.random() < 0.2) else _vivid(rng) for _ in text]
    # varlen_upper turns some captchas' glyphs far: a 7 lying on its side, a Z read as N
    turn = rng.choice((0, 8, 20, 20, 45, 90))
    run = _run(text, rng, fonts, h * rng.uniform(0.18, 0.42), rotate=turn, scale_jitter=0.1, gap=(0.4, 1.6),
               hollow_p=0.1, stroke=rng.choice((0, 0, 0, 1)))
    w = _width_for(run, rng, (100, 900), (0.3, 1.4), h)
    image = _solid((w, h), (255, 255, 255))
    boxes = _place(run, image, rng, fills, h * rng.uniform(0.4, 0.6), jitter=h * 0.04)
    draw = ImageDraw.Draw(image)
    _lines(draw, rng, image.size, rng.choice((0, 1, 2, 3, 4, 6)), lambda: (0, 0, 0), (1, 1), across=True)
    _lines(draw, rng, image.size, rng.randint(0, 2), lambda: (0, 0, 0), (1, 1), across=False)
    return Rendered(image, boxes)


@_style("wordpress", (90, 200, 30, 60), "plugin-style: small, clean, dark ink on a light plain background", 6)
def _wordpress(text, rng, pool):
    h = rng.randint(30, 60)
    font = pool.pick_plain(rng) if rng.random() < 0.7 else pool.pick(rng)
    run = _run(text, rng, [font], h * rng.uniform(0.45, 0.7), rotate=rng.choice((0, 5, 12)), scale_jitter=0.05,
               gap=(-0.05, 0.3))
    w = _width_for(run, rng, (90, 200), (0.1, 0.5), h)
    bg = (255, 255, 255) if rng.random() < 0.4 else _light(rng)
    image = _solid((w, h), bg)
    ink = _dark(rng) if rng.random() < 0.8 else _vivid(rng)
    boxes = _place(run, image, rng, [ink], h * rng.uniform(0.45, 0.55), jitter=h * 0.05)
    draw = ImageDraw.Draw(image)
    noise = lambda: ink if rng.random() < 0.5 else _vivid(rng)  # noqa: E731
    _dots(draw, rng, image.size, rng.choice((0, 0, 10, 40)), noise, (0.5, 1.2))
    _lines(draw, rng, image.size, rng.choice((0, 0, 1, 3)), noise, (1, 1))
    if rng.random() < 0.3:  # shown enlarged by the page
        size = (min(200, int(w * 1.4)), min(60, int(h * 1.4)))
        fx, fy = size[0] / w, size[1] / h
        image = image.resize(size, Image.NEAREST)
        boxes = [(int(x0 * fx), int(y0 * fy), math.ceil(x1 * fx), math.ceil(y1 * fy)) for x0, y0, x1, y1 in boxes]
    return Rendered(image, boxes)


@_style("php_heavy", (150, 300, 50, 100), "heavy occlusion: many lines and arcs over the text, dots, sine warp", 5)
def _php_heavy(text, rng, pool):
    h = rng.randint(50, 100)
    w = min(300, max(150, int(h * rng.uniform(2.2, 3.6))))
    securimage = rng.random() < 0.5   # lines in the ink colour; else Gregwar-like random colours
    bg = (255, 255, 255) if rng.random() < 0.4 else (_light(rng) if securimage else _pastel(rng))
    image = _texture((w, h), rng, bg) if rng.random() < 0.2 else _solid((w, h), bg)
    ink = (rng.randint(40, 110),) * 3 if securimage and rng.random() < 0.5 else _dark(rng)
    fills = [ink] if securimage else [_dark(rng) if rng.random() < 0.6 else _vivid(rng) for _ in text]
    run = _run(text, rng, [pool.pick(rng)], h * rng.uniform(0.45, 0.65), rotate=20, scale_jitter=0.15,
               gap=(-0.15, 0.15))
    boxes = _place(run, image, rng, fills, h * rng.uniform(0.45, 0.55), jitter=h * 0.06)
    draw = ImageDraw.Draw(image)
    colour = (lambda: ink) if securimage else (lambda: _vivid(rng) if rng.random() < 0.6 else _dark(rng))
    _lines(draw, rng, image.size, rng.randint(3, 10), colour, (1, 3))
    _curves(draw, rng, image.size, rng.randint(1, 5), colour, (1, 3))
    _arcs(draw, rng, image.size, rng.randint(0, 4), colour, (1, 2))
    _dots(draw, rng, image.size, rng.randint(0, 80), colour, (0.5, 1.8))
    image = _warp(image, rng, rng.uniform(0, 3), rng.uniform(2, 6))
    return Rendered(_blur(image, rng.choice((0, 0, 0.5))), boxes)


@_style("gradient", (110, 320, 35, 90), "two- or three-colour gradient background, contrasting ink", 5)
def _gradient_style(text, rng, pool):
    h = rng.randint(35, 90)
    dark_bg = rng.random() < 0.4
    if dark_bg:
        stops = [_hsv(rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.15, 0.5)) for _ in range(rng.choice((2, 3)))]
    else:
        stops = [_pastel(rng) if rng.random() < 0.6 else _light(rng) for _ in range(rng.choice((2, 3)))]
    run = _run(text, rng, _text_fonts(rng, pool, len(text), 0.2), h * rng.uniform(0.4, 0.7),
               rotate=rng.choice((0, 10, 25)), scale_jitter=0.1, gap=(-0.1, 0.4))
    w = _width_for(run, rng, (110, 320), (0.1, 0.8), h)
    image = _gradient((w, h), stops, rng.uniform(0, 2 * math.pi))
    fills = [_ink(rng, stops, 70)] if rng.random() < 0.5 else [_ink(rng, stops, 70) for _ in text]
    shadow = (rng.randint(1, 2), rng.randint(1, 2), (0, 0, 0) if dark_bg else (255, 255, 255)) \
        if rng.random() < 0.3 else None
    boxes = _place(run, image, rng, fills, h * rng.uniform(0.42, 0.58), jitter=h * 0.06, shadow=shadow)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        _lines(draw, rng, image.size, rng.randint(1, 4), lambda: rng.choice(fills), (1, 2))
    if rng.random() < 0.4:
        image = _warp(image, rng, rng.uniform(0, 2), rng.uniform(0, 3))
    return Rendered(_blur(image, rng.choice((0, 0, 0.4))), boxes)


@_style("low_contrast", (100, 320, 30, 90), "ink close to the background's brightness, noise, blur", 5)
def _low_contrast(text, rng, pool):
    h = rng.randint(30, 90)
    run = _run(text, rng, [pool.pick(rng)], h * rng.uniform(0.4, 0.7), rotate=rng.choice((0, 10, 20)),
               scale_jitter=0.1, gap=(-0.1, 0.3))
    w = _width_for(run, rng, (100, 320), (0.1, 0.6), h)
    base = rng.uniform(70, 235)
    bg = tuple(int(min(255, max(0, base + rng.uniform(-20, 20)))) for _ in range(3))
    delta = rng.uniform(30, 70) * (1 if base < 140 else -1)  # ink lighter on dark, darker on light
    ink = tuple(int(min(255, max(0, c + delta + rng.uniform(-15, 15)))) for c in bg)
    kind = rng.random()
    if kind < 0.4:
        image = _noisy(_solid((w, h), bg), rng, rng.uniform(8, 30), mono=rng.random() < 0.5)
    elif kind < 0.7:
        lighter = tuple(int(min(255, c + rng.uniform(10, 30))) for c in bg)
        image = _clouds((w, h), rng, bg, lighter, rng.randint(3, 12))
    else:
        image = _solid((w, h), bg)
    boxes = _place(run, image, rng, [ink], h * rng.uniform(0.45, 0.55), jitter=h * 0.05)
    draw = ImageDraw.Draw(image)
    _dots(draw, rng, image.size, rng.randint(0, 60), lambda: ink, (0.5, 1.5))
    _lines(draw, rng, image.size, rng.randint(0, 3), lambda: ink, (1, 2))
    image = _blur(image, rng.uniform(0.2, 1.0))
    return Rendered(_grey(image) if rng.random() < 0.3 else image, boxes)


@_style("textured", (120, 360, 40, 100), "patterned backgrounds, solid, outlined or pattern-filled glyphs", 5)
def _textured(text, rng, pool):
    h = rng.randint(40, 100)
    run = _run(text, rng, _text_fonts(rng, pool, len(text), 0.3), h * rng.uniform(0.4, 0.7),
               rotate=rng.choice((0, 15, 30)), scale_jitter=0.15, gap=(-0.05, 0.5), hollow_p=rng.choice((0, 0.5)),
               stroke=rng.choice((1, 2)))
    w = _width_for(run, rng, (120, 360), (0.1, 0.7), h)
    image = _texture((w, h), rng, _light(rng))
    if rng.random() < 0.3:  # glyphs filled with a dark pattern of their own
        fills = [_clouds((w, h), rng, _dark(rng), _vivid(rng), rng.randint(2, 6))]
    else:
        fills = [_dark(rng) if rng.random() < 0.6 else _vivid(rng) for _ in text]
    boxes = _place(run, image, rng, fills, h * rng.uniform(0.42, 0.58), jitter=h * 0.08)
    if rng.random() < 0.4:
        image = _warp(image, rng, rng.uniform(0, 2), rng.uniform(0, 4))
    return Rendered(_blur(image, rng.choice((0, 0, 0.5))), boxes)


@_style("classic", (80, 180, 30, 50), "small ASP/JSP-style: per-symbol colours, coloured lines and dots, border", 6)
def _classic(text, rng, pool):
    h = rng.randint(30, 50)
    run = _run(text, rng, [pool.pick_plain(rng) if rng.random() < 0.6 else pool.pick(rng)],
               h * rng.uniform(0.5, 0.72), rotate=rng.choice((10, 25)), scale_jitter=0.1, gap=(0.0, 0.35))
    w = _width_for(run, rng, (80, 180), (0.1, 0.4), h)
    image = _solid((w, h), _light(rng))
    fills = [_dark(rng) if rng.random() < 0.5 else _vivid(rng) for _ in text]
    boxes = _place(run, image, rng, fills, h * rng.uniform(0.45, 0.55), jitter=h * 0.08)
    draw = ImageDraw.Draw(image)
    _lines(draw, rng, image.size, rng.randint(2, 6), lambda: _vivid(rng) if rng.random() < 0.7 else _pastel(rng),
           (1, 1), across=rng.random() < 0.5)
    _dots(draw, rng, image.size, rng.randint(20, 100), lambda: _vivid(rng), (0.3, 1.0))
    return Rendered(_frame(image, rng) if rng.random() < 0.3 else image, boxes)


@_style("dense", (110, 300, 40, 90), "overlapping, wavy glyphs, no noise (reCAPTCHA-like)", 5)
def _dense(text, rng, pool):
    h = rng.randint(40, 90)
    run = _run(text, rng, [pool.pick_plain(rng) if rng.random() < 0.7 else pool.pick(rng)],
               h * rng.uniform(0.45, 0.65), rotate=12, scale_jitter=0.12, gap=(-0.3, -0.05))
    w = _width_for(run, rng, (110, 300), (0.2, 0.6), h)
    image = _solid((w, h), (255, 255, 255) if rng.random() < 0.7 else _light(rng))
    boxes = _place(run, image, rng, [_dark(rng)], h * rng.uniform(0.45, 0.55), jitter=h * 0.06)
    image = _warp(image, rng, rng.uniform(1, 3), rng.uniform(2, 0.12 * h))
    return Rendered(_blur(image, rng.uniform(0, 0.6)), boxes)


@_style("band", (150, 400, 60, 100), "small glyphs in a thin band of a tall image, any background", 4)
def _band(text, rng, pool):
    h = rng.randint(60, 100)
    run = _run(text, rng, _text_fonts(rng, pool, len(text), 0.2), h * rng.uniform(0.15, 0.3),
               rotate=rng.choice((0, 10, 20)), scale_jitter=0.1, gap=(0.1, 1.0))
    w = _width_for(run, rng, (150, 400), (0.2, 1.0), h)
    backgrounds = [_light(rng), _light(rng)]
    if rng.random() < 0.5:
        image = _gradient((w, h), backgrounds, rng.uniform(0, 2 * math.pi))
    else:
        image = _solid((w, h), backgrounds[0])
    fills = [_ink(rng, backgrounds, rng.choice((40, 80)), (_dark, _vivid, _pastel)) for _ in text]
    boxes = _place(run, image, rng, fills, h * rng.uniform(0.35, 0.65), jitter=h * 0.03)
    draw = ImageDraw.Draw(image)
    _lines(draw, rng, image.size, rng.randint(0, 5), lambda: _dark(rng), (1, 1))
    _dots(draw, rng, image.size, rng.randint(0, 60), lambda: _vivid(rng), (0.5, 1.2))
    return Rendered(image, boxes)


@_style("generic", (100, 400, 30, 100), "every knob at random", 6)
def _generic(text, rng, pool):
    h = rng.randint(30, 100)
    hard = rng.random() < 0.5  # the noise budget: light or heavy, never everything at once
    run = _run(text, rng, _text_fonts(rng, pool, len(text), 0.3), h * rng.uniform(0.25 if hard else 0.2, 0.75),
               rotate=rng.choice((0, 5, 15, 30)), scale_jitter=rng.choice((0, 0.1, 0.25)),
               gap=rng.choice(((-0.25, 0.0), (-0.05, 0.3), (0.2, 1.0))), hollow_p=0 if hard else rng.choice((0, 0.3)),
               stroke=rng.choice((0, 0, 1, 2)))
    w = _width_for(run, rng, (100, 400), (0.05, 0.8), h)
    kind = rng.choice(("solid", "gradient", "noisy", "texture", "clouds"))
    bg = _light(rng) if rng.random() < 0.75 else _hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.2, 0.8))
    other = _light(rng) if _luma(bg) > 128 else _hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.2, 0.6))
    if kind == "solid":
        image = _solid((w, h), bg)
    elif kind == "gradient":
        image = _gradient((w, h), [bg, other], rng.uniform(0, 2 * math.pi))
    elif kind == "noisy":
        image = _noisy(_solid((w, h), bg), rng, rng.uniform(5, 30), mono=rng.random() < 0.5)
    elif kind == "texture":
        image = _texture((w, h), rng, bg)
    else:
        image = _clouds((w, h), rng, bg, other, rng.randint(3, 20))
    backgrounds = [bg] if kind in ("solid", "noisy") else [bg, other]
    fills = [_ink(rng, backgrounds, 80)] if rng.random() < 0.5 else [_ink(rng, backgrounds, 80) for _ in text]
    boxes = _place(run, image, rng, fills, h * rng.uniform(0.4, 0.6), jitter=h * rng.uniform(0, 0.1))
    draw = ImageDraw.Draw(image)
    noise = (lambda: fills[0]) if rng.random() < 0.4 else (lambda: _ink(rng, backgrounds, 50))
    lines, curves, dots = (rng.choice((2, 5, 10)), rng.choice((0, 1, 2)), rng.choice((0, 20, 80))) if hard \
        else (rng.choice((0, 0, 1, 3)), rng.choice((0, 0, 1)), rng.choice((0, 0, 20)))
    _lines(draw, rng, image.size, lines, noise, (1, 3 if hard else 2), across=rng.random() < 0.6)
    _curves(draw, rng, image.size, curves, noise, (1, 3))
    _arcs(draw, rng, image.size, rng.choice((0, 0, 1, 3)) if hard else 0, noise, (1, 2))
    _dots(draw, rng, image.size, dots, noise, (0.4, 1.6))
    if rng.random() < 0.4:
        image = _warp(image, rng, rng.uniform(0, 3), rng.uniform(0, 0.08 * h))
    if rng.random() < 0.15:
        image = _ragged(image, rng, 1)
    if not hard and rng.random() < 0.3:
        image = _speckle(image, rng, rng.uniform(0.005, 0.03))
    image = _blur(image, rng.choice((0, 0, 0.4, 0.8, 1.2)))
    return Rendered(_grey(image) if rng.random() < 0.2 else image, boxes)


@_style("ramp", (100, 320, 30, 90), "a dark-to-light grey (or tinted) ramp behind per-symbol coloured glyphs", 5)
def _ramp(text, rng, pool):
    h = rng.randint(30, 90)
    run = _run(text, rng, _text_fonts(rng, pool, len(text), 0.2), h * rng.uniform(0.45, 0.7),
               rotate=rng.choice((0, 10, 20)), scale_jitter=0.1, gap=(-0.1, 0.3), stroke=rng.choice((0, 0, 1)))
    w = _width_for(run, rng, (100, 320), (0.1, 0.6), h)
    dark, light = rng.randint(30, 120), rng.randint(190, 255)
    stops = [(dark,) * 3, (light,) * 3]
    if rng.random() < 0.3:
        stops = [tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in c) for c in stops]
    angle = rng.choice((0.0, 0.0, math.pi, math.pi / 2, rng.uniform(0, 2 * math.pi)))  # mostly across
    image = _gradient((w, h), stops[::-1] if rng.random() < 0.5 else stops, angle)
    fills = [_hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)) for _ in text]
    boxes = _place(run, image, rng, fills, h * rng.uniform(0.45, 0.55), jitter=h * 0.06)
    draw = ImageDraw.Draw(image)
    _lines(draw, rng, image.size, rng.choice((0, 0, 1, 3)), lambda: rng.choice(fills), (1, 2))
    _dots(draw, rng, image.size, rng.choice((0, 0, 30)), lambda: rng.choice(fills), (0.5, 1.2))
    return Rendered(_blur(image, rng.choice((0, 0, 0.4))), boxes)


SPARSE_INK = 0.016  # style "sparse": the most of the image its glyphs may cover


@_style("sparse", (160, 640, 60, 200), "small text in a large image: glyphs cover under 1.6% of the pixels", 4)
def _sparse(text, rng, pool):
    run = _run(text, rng, [pool.pick_plain(rng) if rng.random() < 0.7 else pool.pick(rng)],
               rng.uniform(MIN_CAP, 14), rotate=rng.choice((0, 5, 10)), scale_jitter=0.05, gap=(0.05, 0.5))
    ink = sum(int(np.count_nonzero(np.asarray(g.mask) > 0)) for g in run.glyphs)
    h = rng.randint(60, 140)  # the width grows first to keep the ink sparse, then the height
    w = min(640, max(rng.randint(160, 400), int(run.width * rng.uniform(1.5, 3)), math.ceil(ink / SPARSE_INK / h)))
    h = min(200, max(h, math.ceil(ink / SPARSE_INK / w)))
    run = run.scaled(min(1.0, math.sqrt(SPARSE_INK * w * h / max(1, ink))))  # the largest labels only
    bg = (255, 255, 255) if rng.random() < 0.4 else _light(rng)
    image = _clouds((w, h), rng, bg, _light(rng), rng.randint(8, 30)) if rng.random() < 0.3 else _solid((w, h), bg)
    ink_colour = _dark(rng) if rng.random() < 0.7 else _ink(rng, [bg], 80, (_vivid,))
    x = rng.uniform(2, max(2.0, w - 2 - run.width))
    boxes = run.draw(image, x, rng.uniform(0.15, 0.85) * h, [ink_colour])
    _dots(ImageDraw.Draw(image), rng, image.size, rng.choice((0, 0, 20)), lambda: _pastel(rng), (0.5, 1.0))
    return Rendered(image, boxes)


def _pale_ink(rng: random.Random, bg: Colour) -> Colour:
    """A colour 25-90 levels of brightness below the (light) background: pale grey, pastel."""
    for _ in range(12):
        c = _hsv(rng.random(), rng.uniform(0, 0.7), rng.uniform(0.55, 0.92))
        if 25 <= _luma(bg) - _luma(c) <= 90:
            return c
    return tuple(max(0, int(_luma(bg)) - 60) for _ in range(3))


@_style("pale", (100, 320, 30, 90), "pale glyphs on white or light: one colour, per symbol or a ramp, often hollow", 5)
def _pale(text, rng, pool):
    h = rng.randint(30, 90)
    hollow = rng.choice((0, 0, 0.5, 1.0))
    run = _run(text, rng, _text_fonts(rng, pool, len(text), 0.2), h * rng.uniform(0.45, 0.7),
               rotate=rng.choice((0, 10, 20)), scale_jitter=0.1, gap=(-0.05, 0.4), hollow_p=hollow,
               stroke=rng.choice((1, 2)) if hollow else rng.choice((0, 0, 1)))
    w = _width_for(run, rng, (100, 320), (0.1, 0.6), h)
    bg = (255, 255, 255) if rng.random() < 0.6 else _light(rng)
    image = _solid((w, h), bg)
    kind = rng.choice(("one", "each", "ramp"))
    if kind == "ramp":  # colour changing across the text, inside the glyphs
        fills = [_gradient((w, h), [_pale_ink(rng, bg) for _ in range(3)], rng.uniform(-0.5, 0.5))]
    else:
        fills = [_pale_ink(rng, bg) for _ in (text if kind == "each" else "x")]
    boxes = _place(run, image, rng, fills, h * rng.uniform(0.45, 0.55), jitter=h * 0.06)
    draw = ImageDraw.Draw(image)
    _lines(draw, rng, image.size, rng.choice((0, 0, 2)), lambda: _pale_ink(rng, bg), (1, 1))
    _dots(draw, rng, image.size, rng.choice((0, 0, 40)), lambda: _pale_ink(rng, bg), (0.5, 1.2))
    return Rendered(image, boxes)


_BOLD = re.compile(r"(bold|black|heavy|cmb10)", re.I)


@_style("jumble", (100, 320, 35, 90), "rotated, overlapping glyphs of mixed sizes, thin or bold, dense arcs, dots", 7)
def _jumble(text, rng, pool):
    h = rng.randint(35, 90)
    weight = rng.choice(("thin", "regular", "bold", "bold"))
    bold_faces = [p for g in pool.groups for p in g if _BOLD.search(Path(p).name)]
    fonts = [rng.choice(bold_faces)] if weight == "bold" and bold_faces and rng.random() < 0.6 else [pool.pick(rng)]
    run = _run(text, rng, fonts, h * rng.uniform(0.45, 0.62), rotate=rng.choice((20, 30, 45)),
               scale_jitter=rng.uniform(0.15, 0.35), gap=(-0.4, -0.1), thin=weight == "thin",
               stroke=rng.choice((1, 2)) if weight == "bold" and fonts[0] not in bold_faces else 0)
    w = _width_for(run, rng, (100, 320), (0.1, 0.5), h)
    bg = _light(rng)
    image = _gradient((w, h), [bg, _light(rng)], rng.uniform(0, 2 * math.pi)) if rng.random() < 0.4 \
        else _solid((w, h), bg)
    fills = [_dark(rng)] if rng.random() < 0.5 else [_dark(rng) if rng.random() < 0.5 else _vivid(rng) for _ in text]
    boxes = _place(run, image, rng, fills, h * rng.uniform(0.45, 0.55), jitter=h * 0.1)
    draw = ImageDraw.Draw(image)
    noise = (lambda: fills[0]) if rng.random() < 0.5 else (lambda: _ink(rng, [bg], 60, (_dark, _vivid)))
    _arcs(draw, rng, image.size, rng.randint(0, 8), noise, (1, 2))
    _dots(draw, rng, image.size, rng.choice((0, 50, 200)), noise, (0.4, 1.4))
    return Rendered(_blur(image, rng.choice((0, 0, 0.5))), boxes)


@_style("captcha", (20, 10_000, 16, 10_000),
        "the captcha package at the config's fixed size (legacy default)", 0, effects=0.0)
def _captcha_legacy(text, rng, pool):  # rendered through render() with the config; see SyntheticCaptchas
    return Rendered(render(text, rng), None)


MIX = tuple(name for name, style in STYLES.items() if style.share > 0)
_MIX_CUMULATIVE = tuple(np.cumsum([STYLES[name].share for name in MIX]).tolist())


def mix_shares() -> Dict[str, float]:
    """style -> the fraction of "mix" images drawn in it (sums to 1)."""
    total = sum(STYLES[name].share for name in MIX)
    return {name: STYLES[name].share / total for name in MIX}


def effect_rates() -> Dict[str, float]:
    """effect -> the fraction of "mix" images (SynthConfig.effects "mix") that get it."""
    shares = mix_shares()
    return {e: sum(share * min(1.0, effect.rate * STYLES[s].effects) for s, share in shares.items())
            for e, effect in EFFECTS.items()}


def mix_table() -> str:
    """The mix as a Markdown table (for a model card): each style's share, each effect's rate."""
    rows = [f"| style `{name}` | {100 * share:.0f}% of images | {STYLES[name].about} |"
            for name, share in mix_shares().items()]
    rows += [f"| effect `{name}` | {100 * rate:.1f}% of images | {EFFECTS[name].about} |"
             for name, rate in effect_rates().items()]
    return "| synthetic | share | what |\n|---|---:|---|\n" + "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------ the captcha package

class _SeededSecrets:
    """The three `secrets` functions captcha.image calls, drawn from a random.Random."""

    def __init__(self, rng: random.Random):
        self._rng = rng

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, seq):
        return self._rng.choice(seq)


class _CleanCaptcha(_captcha_image.ImageCaptcha):
    """The package's captchas without the noise dots and arc."""

    @staticmethod
    def create_noise_curve(image, color):
        return image

    @staticmethod
    def create_noise_dots(image, color, width=3, number=30):
        return image


_LOCK = threading.Lock()  # the swap is module-global: one render at a time per process


@functools.lru_cache(maxsize=256)
def _generator(width: int, height: int, font_sizes: Tuple[int, ...], clean: bool) -> _captcha_image.ImageCaptcha:
    cls = _CleanCaptcha if clean else _captcha_image.ImageCaptcha
    return cls(width=width, height=height, font_sizes=font_sizes)


@functools.lru_cache(maxsize=256)
def _package_generator(width: int, height: int, font_sizes: Optional[Tuple[int, ...]],
                       font: str) -> _captcha_image.ImageCaptcha:
    return _captcha_image.ImageCaptcha(width=width, height=height, fonts=[font], font_sizes=font_sizes)


@contextlib.contextmanager
def _seeded_package(rng: random.Random):
    """Inside: every random choice of the `captcha` package comes from `rng` (one thread at a time)."""
    with _LOCK:
        saved = _captcha_image.secrets
        _captcha_image.secrets = _SeededSecrets(rng)
        try:
            yield
        finally:
            _captcha_image.secrets = saved


def _seeded_generate(gen: _captcha_image.ImageCaptcha, text: str, rng: random.Random, **colours) -> Image.Image:
    with _seeded_package(rng):
        return gen.generate_image(text, **colours)


def render(text: str, rng: random.Random, height: int = 50, width: Optional[int] = None,
           font_sizes: Tuple[int, ...] = (32, 36, 40), clean: bool = False) -> Image.Image:
    """One `captcha`-package image of `text` (RGB), every random choice drawn from `rng`.
    clean: no noise dots or arc, dark ink on white."""
    if not text:
        raise ValueError("cannot render an empty captcha text")
    width = width or 30 * len(text) + 20
    gen = _generator(width, height, tuple(font_sizes), clean)
    if clean:
        ink = tuple(rng.randrange(0, 80) for _ in range(3)) + (255,)
        return _seeded_generate(gen, text, rng, bg_color=(255, 255, 255), fg_color=ink)
    return _seeded_generate(gen, text, rng)


def render_package(text: str, rng: random.Random, width: int = 160, height: int = 60, font: Optional[str] = None,
                   font_sizes: Optional[Tuple[int, ...]] = None) -> Image.Image:
    """The `captcha` package as its users call it, ImageCaptcha(width, height, fonts=[font],
    font_sizes).generate_image(text), with every random choice drawn from `rng`.
    font: default the package's DroidSansMono; font_sizes: default the package's (42, 50, 56)."""
    if not text:
        raise ValueError("cannot render an empty captcha text")
    gen = _package_generator(width, height, tuple(font_sizes) if font_sizes else None,
                             font or _captcha_image.DEFAULT_FONTS[0])
    return _seeded_generate(gen, text, rng)


def sample_rng(seed: int, index: int) -> random.Random:
    """The generator of sample `index` of the set with `seed` (independent streams)."""
    return random.Random(f"captcha_fast.synth:{seed}:{index}")


def package_text(seed: int, index: int, alphabet: str = DIGITS_LETTERS,
                 lengths: Tuple[int, int] = (4, 6)) -> Tuple[str, random.Random]:
    """The text of captcha `index` of the `captcha` package stream `seed` (4-6 symbols of `alphabet`; a
    symbol listed twice is drawn twice as often) and the generator its image is drawn from after it."""
    rng = sample_rng(seed, index)
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(*lengths))), rng


def package_captcha(seed: int, index: int, size: Optional[Tuple[int, int]] = None, alphabet: str = DIGITS_LETTERS,
                    lengths: Tuple[int, int] = (4, 6)) -> Tuple[Image.Image, str]:
    """Captcha `index` of the `captcha` package stream `seed`, (image, text): at `size` (width, height) or,
    if None, one of PACKAGE_SIZES drawn after the text. The held-out renders, the build's pkg group and
    the style gate's package images are such streams, each with its own seed."""
    text, rng = package_text(seed, index, alphabet, lengths)
    return render_package(text, rng, *(size if size is not None else rng.choice(PACKAGE_SIZES))), text


# ------------------------------------------------------------------------------------ data sets

class SyntheticCaptchas:
    """n seeded captchas; item i is (PIL image, label), a pure function of (config, i)."""

    def __init__(self, config: SynthConfig, n: int):
        if n < 1:
            raise ValueError(f"a synthetic set needs n >= 1 images, got {n}")
        self.config = config
        self.n = n
        self._styles = config.styles()
        self._forced = config.forced_effects()

    def __len__(self) -> int:
        return self.n

    def _check(self, index: int) -> None:
        if not 0 <= index < self.n:
            raise IndexError(f"synthetic captcha index {index} out of range 0..{self.n - 1}")

    def _draw_label(self, rng: random.Random) -> str:
        c = self.config
        length = rng.randint(c.min_len, c.max_len)
        return "".join(rng.choice(c.charset) for _ in range(length))

    def label(self, index: int) -> str:
        """The label of item `index`, without rendering it."""
        self._check(index)
        return self._draw_label(sample_rng(self.config.seed, index))

    def _draw_style(self, rng: random.Random) -> str:
        if self.config.style == "mix":  # by share
            return rng.choices(MIX, cum_weights=_MIX_CUMULATIVE)[0]
        return rng.choice(self._styles) if len(self._styles) > 1 else self._styles[0]

    def style(self, index: int) -> str:
        """The style item `index` is drawn in, without rendering it."""
        self._check(index)
        rng = sample_rng(self.config.seed, index)
        self._draw_label(rng)
        return self._draw_style(rng)

    def _effect_plan(self, index: int, style: str) -> Tuple[Tuple[str, ...], random.Random]:
        """The effects item `index` gets and the generator, drawn that far, that applies them."""
        rng = effect_rng(self.config.seed, index)
        if self.config.effects == "none":
            return (), rng
        if self.config.effects == "mix":
            weight = STYLES[style].effects
            draws = [(name, rng.random()) for name in EFFECTS]  # one draw each, applied or not
            return tuple(name for name, u in draws if u < EFFECTS[name].rate * weight), rng
        return self._forced, rng

    def effects(self, index: int) -> Tuple[str, ...]:
        """The EFFECTS item `index` gets, in the order applied, without rendering it."""
        return self._effect_plan(index, self.style(index))[0]

    def rendered(self, index: int) -> Tuple[Rendered, str, str]:
        """(Rendered(image, glyph boxes), label, style) of item `index`."""
        self._check(index)
        c = self.config
        rng = sample_rng(c.seed, index)
        text = self._draw_label(rng)
        style = self._draw_style(rng)
        if style == "captcha":
            out = Rendered(render(text, rng, height=c.height, width=c.char_width * len(text) + c.margin,
                                  font_sizes=c.font_sizes, clean=c.clean), None)
        else:
            out = STYLES[style].draw(text, rng, font_pool(c.charset, c.font_dirs))
        names, fx_rng = self._effect_plan(index, style)
        if names:
            out = out._replace(image=apply_effects(out.image, names, fx_rng))
        return out, text, style

    def item(self, index: int) -> Tuple[Image.Image, str]:
        out, text, _ = self.rendered(index)
        return out.image, text

    __getitem__ = item

    def __iter__(self) -> Iterator[Tuple[Image.Image, str]]:
        for i in range(self.n):
            yield self.item(i)


def write_synthetic(folder, config: SynthConfig, n: int) -> List[Path]:
    """Write n seeded captchas as folder/LABEL_i.png (the folder-dataset naming); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, text) in enumerate(SyntheticCaptchas(config, n)):
        path = folder / f"{text}_{i:06d}.png"
        image.save(path)
        paths.append(path)
    return paths
