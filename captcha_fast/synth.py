"""Seeded synthetic captchas from the `captcha` package (its bundled DroidSansMono font).

The package draws its randomness from `secrets`, so as shipped it cannot be
reproduced; here its module-level `secrets` is swapped, for the length of one
render, for a shim over a seeded random.Random. Sample i of a SyntheticCaptchas
set depends only on (seed, i): any order, any worker, any rank gives the same
image.

    SyntheticCaptchas(SynthConfig(seed=1), n=1000)[7]   ->  (PIL RGB image, "K3Q9X")
"""
from __future__ import annotations

import random
import string
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import captcha.image as _captcha_image
from PIL import Image

DIGITS_UPPER = string.digits + string.ascii_uppercase


@dataclass
class SynthConfig:
    charset: str = DIGITS_UPPER        # symbols the labels draw from (uniformly)
    min_len: int = 4                   # label length range, inclusive
    max_len: int = 8
    height: int = 50                   # image height in pixels
    char_width: int = 30               # image width = char_width * len(label) + margin
    margin: int = 20
    font_sizes: Tuple[int, ...] = (32, 36, 40)  # the package's defaults clip glyphs at height 50
    seed: int = 0
    clean: bool = False                # no noise dots or arc, dark ink: an easy start for training

    def __post_init__(self):
        self.font_sizes = tuple(self.font_sizes)
        if not self.charset:
            raise ValueError("synthetic captchas need a non-empty charset")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}")
        if self.height < 16 or self.char_width < 8:
            raise ValueError(f"height must be >= 16 and char_width >= 8, got {self.height}, {self.char_width}")

    def to_dict(self) -> dict:
        return asdict(self)


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
_GENERATORS = {}          # (height, width, font_sizes) -> ImageCaptcha (fonts load once)


def _generator(width: int, height: int, font_sizes: Tuple[int, ...], clean: bool) -> _captcha_image.ImageCaptcha:
    key = (width, height, font_sizes, clean)
    if key not in _GENERATORS:
        cls = _CleanCaptcha if clean else _captcha_image.ImageCaptcha
        _GENERATORS[key] = cls(width=width, height=height, font_sizes=font_sizes)
    return _GENERATORS[key]


def render(text: str, rng: random.Random, height: int = 50, width: Optional[int] = None,
           font_sizes: Tuple[int, ...] = (32, 36, 40), clean: bool = False) -> Image.Image:
    """One captcha image of `text` (RGB), every random choice drawn from `rng`.
    clean: no noise dots or arc, dark ink on white."""
    if not text:
        raise ValueError("cannot render an empty captcha text")
    width = width or 30 * len(text) + 20
    gen = _generator(width, height, tuple(font_sizes), clean)
    with _LOCK:
        saved = _captcha_image.secrets
        _captcha_image.secrets = _SeededSecrets(rng)
        try:
            if clean:
                ink = tuple(rng.randrange(0, 80) for _ in range(3)) + (255,)
                image = gen.generate_image(text, bg_color=(255, 255, 255), fg_color=ink)
            else:
                image = gen.generate_image(text)
        finally:
            _captcha_image.secrets = saved
    return image


def sample_rng(seed: int, index: int) -> random.Random:
    """The generator of sample `index` of the set with `seed` (independent streams)."""
    return random.Random(f"captcha_fast.synth:{seed}:{index}")


class SyntheticCaptchas:
    """n seeded captchas; item i is (PIL image, label), a pure function of (config, i)."""

    def __init__(self, config: SynthConfig, n: int):
        if n < 1:
            raise ValueError(f"a synthetic set needs n >= 1 images, got {n}")
        self.config = config
        self.n = n

    def __len__(self) -> int:
        return self.n

    def label(self, index: int) -> str:
        return self.item(index)[1]

    def item(self, index: int) -> Tuple[Image.Image, str]:
        if not 0 <= index < self.n:
            raise IndexError(f"synthetic captcha index {index} out of range 0..{self.n - 1}")
        c = self.config
        rng = sample_rng(c.seed, index)
        length = rng.randint(c.min_len, c.max_len)
        text = "".join(rng.choice(c.charset) for _ in range(length))
        image = render(text, rng, height=c.height, width=c.char_width * length + c.margin, font_sizes=c.font_sizes,
                       clean=c.clean)
        return image, text

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
