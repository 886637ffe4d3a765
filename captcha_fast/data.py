"""Captcha data sets: labelled image folders, TSV manifests, synthetic captchas.

    folder/24pew.png, folder/24pew_2.png, folder/24pew-b.png   label = name up to the first _ or -
    manifest.tsv: path<TAB>label per line (paths relative to the manifest)

Images are read with captcha_fast.preprocess (load_image, prepare_image) and batched
with preprocess.collate, the functions the Recognizer runs, so a model sees at
inference what it saw in training. A data set keeps each image resized to the
model's height (aspect kept) as uint8; a batch right-pads to its widest image:

    collate([(image (C,H,W_i), label, targets)]) -> Batch(images (N,C,H,max W_i), widths (N,),
                                                         targets (sum L_i,), target_lengths (N,), labels)
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from captcha_fast import preprocess
from captcha_fast.charset import Charset
from captcha_fast.files import atomic_write
from captcha_fast.preprocess import IMAGE_SUFFIXES, MAX_WIDTH


class Sample(NamedTuple):
    path: str    # image file (or "synthetic:<seed>:<i>")
    label: str   # the text in the image


# ---------------------------------------------------------------------------- listing

def label_from_name(path) -> str:
    """`24pew.png` -> 24pew; `24pew_3.png` / `24pew-b.png` -> 24pew (repeated labels)."""
    stem = Path(path).stem
    cut = min((i for i in (stem.find("_"), stem.find("-")) if i >= 0), default=len(stem))
    return stem[:cut]


SAME_NAME_MIN = 10  # a folder with at least this many images of one label, over half of it, is misnamed


def scan_folder(folder) -> List[Sample]:
    """Image files of `folder` (not recursive), labelled by their names, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"data folder {str(folder)!r} has no image files ({', '.join(IMAGE_SUFFIXES)})")
    samples = []
    for p in files:
        label = label_from_name(p)
        if not label:
            raise ValueError(f"image {str(p)!r} has no label in its name (expected LABEL.png or LABEL_anything.png)")
        samples.append(Sample(str(p), label))
    label, count = Counter(s.label for s in samples).most_common(1)[0]
    if count >= SAME_NAME_MIN and count > len(samples) // 2:  # captcha_001.png, ...: names that are not labels
        example = next(Path(s.path).name for s in samples if s.label == label)
        raise ValueError(f"{count} of the {len(samples)} images in {str(folder)!r} are labelled {label!r} by their "
                         f"names (the label is the name up to the first _ or -, e.g. {example}): "
                         f"name each image by its text (TEXT.png or TEXT_2.png), or list path<TAB>label in a .tsv")
    return samples


def read_manifest(path) -> List[Sample]:
    """path<TAB>label lines (blank lines and lines starting with # skipped; an empty label is an image
    with no text); paths relative to the manifest."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    samples = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0]:  # a path is needed; an empty label is an image with no text
                raise ValueError(f"{path}:{lineno}: expected 'path<TAB>label', got {line!r}")
            image = Path(parts[0])
            if not image.is_absolute():
                image = path.parent / image
            samples.append(Sample(str(image), parts[1]))
    if not samples:
        raise ValueError(f"manifest {str(path)!r} lists no images")
    return samples


def list_samples(data) -> List[Sample]:
    """A folder of labelled images or a .tsv manifest."""
    data = Path(data)
    if data.is_dir():
        return scan_folder(data)
    if data.suffix.lower() in (".tsv", ".txt"):
        return read_manifest(data)
    if not data.exists():
        raise FileNotFoundError(f"data {str(data)!r} does not exist (expected a folder of images or a .tsv manifest)")
    raise ValueError(f"data {str(data)!r} is neither a folder of images nor a .tsv manifest")


def split_samples(samples: Sequence[Sample], val_fraction: float, seed: int = 0) -> Tuple[List[Sample], List[Sample]]:
    """Deterministic train/validation split by a hash of (seed, file name): independent of
    listing order, and a file stays on its side when others are added."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for s in samples:
        digest = hashlib.sha256(f"{seed}:{Path(s.path).name}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
        (val if u < val_fraction else train).append(s)
    return train, val


def check_labels(samples: Sequence[Sample], charset: Charset, skip_bad: bool = False) -> List[Sample]:
    """Samples whose labels are inside `charset`; a bad one is an error naming its file, or
    (skip_bad) dropped with a warning."""
    kept = []
    for s in samples:
        bad = charset.unknown(s.label)
        if bad:
            msg = f"label {s.label!r} of {s.path!r} has characters outside the charset {charset.symbols!r}: {bad!r}"
            if not skip_bad:
                raise ValueError(msg)
            warnings.warn(f"skipping: {msg}")
            continue
        kept.append(s)
    return kept


# ---------------------------------------------------------------------------- loading

def load_samples(samples: Sequence[Sample], skip_bad: bool = False,
                 prepare: Optional[Callable[[Tensor, str], Tensor]] = None) -> Tuple[List[Sample], List[Tensor]]:
    """The samples whose files load, and their images: preprocess.load_image ((C, H, W) uint8),
    then prepare(image, path) when given. A bad file (unreadable, or refused by `prepare`) is an
    error naming it, or (skip_bad) skipped with a warning."""
    kept, images = [], []
    for s in samples:
        try:
            image = preprocess.load_image(s.path)
            images.append(prepare(image, s.path) if prepare is not None else image)
        except (ValueError, FileNotFoundError) as e:
            if not skip_bad:
                raise
            warnings.warn(f"skipping: {e}")
            continue
        kept.append(s)
    return kept, images


def _resized_uint8(image: Tensor, height: int, in_channels: int, max_width: int, name: str, ink: bool) -> Tensor:
    """preprocess.prepare_image, kept as uint8 (4x less memory; at most 1/510 off)."""
    x = preprocess.prepare_image(image, height, in_channels, max_width, name, ink)
    return (x * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------- augmentation

@dataclass
class AugmentConfig:
    """Small, readability-keeping distortions (no flips: mirrored glyphs are other glyphs)."""
    rotate_deg: float = 3.0
    shear: float = 0.15          # x shift per unit of y
    scale: float = 0.08          # +- relative zoom
    translate_y: float = 0.06    # fraction of height
    width_scale: float = 0.10    # +- horizontal stretch (changes the width)
    brightness: float = 0.15
    contrast: float = 0.25
    noise: float = 0.04          # max std of added Gaussian noise
    p: float = 0.9               # probability that a sample is distorted at all


# For small sets (train.SMALL_SET): a hundred images of one style show the model few glyph
# shapes, positions and stroke widths; larger distortions keep it from memorising them.
SMALL_SET_AUGMENT = AugmentConfig(rotate_deg=5.0, shear=0.3, scale=0.12, translate_y=0.08, width_scale=0.2,
                                  brightness=0.2, contrast=0.35, noise=0.06, p=0.95)


def frames_needed(label: str) -> int:
    """CTC needs one frame per symbol plus a blank between equal neighbours."""
    return len(label) + sum(a == b for a, b in zip(label, label[1:]))


def background_level(image: Tensor, ink: bool) -> Tensor:
    """(C, 1, 1): the value of the image's background. An ink map's is 0 by construction; a grey
    or colour image's is the median of its border pixels, per channel."""
    C, H, W = image.shape
    if ink:
        return image.new_zeros(C, 1, 1)
    border = torch.cat([image[:, 0, :], image[:, H - 1, :], image[:, :, 0], image[:, :, W - 1]], 1)  # (C, 2W + 2H)
    return border.median(1).values.view(C, 1, 1)


def augment(image: Tensor, g: torch.Generator, cfg: AugmentConfig, min_width: int = 8, ink: bool = False) -> Tensor:
    """(C, H, W) in [0, 1] -> a distorted copy (C, H, W'), all randomness from `g`.
    W' >= min_width (or W if that is smaller), so a label never outgrows its frames.

    Pixels pulled in from outside the image take its background (background_level), and the
    photometric jitter scales contrast around that background, so the edges and the background
    look as they do at inference. An ink map (ink=True: background 0, ink up to 1) gets a gain
    instead of a brightness shift, which would lift its black background everywhere."""
    def u(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=g))

    if u(0, 1) >= cfg.p:
        return image
    C, H, W = image.shape
    new_w = max(min(min_width, W), round(W * (1 + u(-cfg.width_scale, cfg.width_scale))))
    if new_w != W:
        image = F.interpolate(image[None], size=(H, new_w), mode="bilinear", align_corners=False)[0]
        W = new_w
    background = background_level(image, ink)
    # Affine in normalised coordinates, sampling the difference from the background (zeros
    # outside the image: the background there).
    angle = math.radians(u(-cfg.rotate_deg, cfg.rotate_deg))
    s = 1 + u(-cfg.scale, cfg.scale)
    sh = u(-cfg.shear, cfg.shear)
    ty = u(-cfg.translate_y, cfg.translate_y) * 2
    aspect = W / H
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    theta = torch.tensor([[cos, -sin / aspect + sh / aspect, 0.0],
                          [sin * aspect, cos, ty]], dtype=image.dtype)
    grid = F.affine_grid(theta[None], [1, C, H, W], align_corners=False)
    detail = F.grid_sample((image - background)[None], grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)[0]
    # Photometric: contrast around the background, brightness (grey/colour only), sensor noise.
    gain = 1 + u(-cfg.contrast, cfg.contrast)
    shift = 0.0 if ink else u(-cfg.brightness, cfg.brightness)
    image = background + shift + gain * detail
    std = u(0, cfg.noise)
    if std > 0:
        image = image + std * torch.randn(image.shape, generator=g)
    return image.clamp_(0, 1)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation stream of one sample in one epoch (same on every rank and after resume)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + index) % (2 ** 63 - 1))
    return g


# ---------------------------------------------------------------------------- datasets

class CaptchaDataset(torch.utils.data.Dataset):
    """Labelled images, preloaded (decoded and resized once) so bad files fail up front.

    images: already prepared (in_channels, height, W) uint8 tensors (e.g. a synthetic cache);
    None reads the files and prepares them as the Recognizer does (preprocess.prepare_image with
    height, in_channels, max_width and ink: the model's input options).
    join: the share of items that are two samples side by side (labels joined, a gap of background
    between), the partner drawn per (seed, epoch, item): a BiGRU that has memorised the whole images of
    a small set (it can: the shipped model reads 98% of varlen_upper's training split, half of its
    validation split) must then read each glyph in a context it has not seen.
    item i -> (image (C, H, W_i) float [0, 1], label str, targets (L_i,) int64)."""

    def __init__(self, samples: Sequence[Sample], charset: Charset, height: int = 32, in_channels: int = 1,
                 augment: Optional[AugmentConfig] = None, seed: int = 0, skip_bad: bool = False,
                 images: Optional[Sequence[Tensor]] = None, max_width: int = MAX_WIDTH, ink: bool = False,
                 join: float = 0.0):
        samples = check_labels(samples, charset, skip_bad)
        if not 0.0 <= join <= 1.0:
            raise ValueError(f"join must be a share in [0, 1], got {join}")
        self.charset, self.height, self.in_channels = charset, height, in_channels
        self.augment, self.seed, self.epoch, self.ink, self.join = augment, seed, 0, ink, join
        if images is None:
            samples, images = load_samples(
                samples, skip_bad, lambda image, name: _resized_uint8(image, height, in_channels, max_width, name, ink))
        if not samples:
            raise ValueError("the data set is empty (no usable images)")
        self.samples = list(samples)
        self.images = list(images)
        self.targets = [torch.tensor(charset.encode(s.label), dtype=torch.long) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def drop(self, indices: Sequence[int]) -> None:
        """Remove these items (e.g. images too narrow for their labels)."""
        gone = set(indices)
        keep = [i for i in range(len(self.samples)) if i not in gone]
        self.samples, self.images, self.targets = ([xs[i] for i in keep] for xs in (self.samples, self.images,
                                                                                    self.targets))

    def width(self, index: int) -> int:
        return self.images[index].shape[-1]

    def __getitem__(self, index: int) -> Tuple[Tensor, str, Tensor]:
        item = self._item(index)
        if self.join > 0:
            g = item_generator(self.seed + 1, self.epoch, index)  # not the item's own augmentation stream
            if float(torch.rand((), generator=g)) < self.join:
                other = self._item(int(torch.randint(len(self), (), generator=g)))
                gap = int(torch.randint(4, 13, (), generator=g))  # >= 4 px: a frame for the blank between
                image = item[0]
                fill = background_level(image, self.ink).expand(image.shape[0], image.shape[1], gap)
                return (torch.cat([image, fill, other[0]], dim=-1), item[1] + other[1],
                        torch.cat([item[2], other[2]]))
        return item

    def _item(self, index: int) -> Tuple[Tensor, str, Tensor]:
        image = self.images[index].float() / 255.0
        if self.augment is not None:
            min_width = 4 * frames_needed(self.samples[index].label) + 4  # the CRNN gives W // 4 frames
            image = augment(image, item_generator(self.seed, self.epoch, index), self.augment, min_width, self.ink)
        return image, self.samples[index].label, self.targets[index]


_SYNTH_CACHE_FORMAT = 4  # bump when rendering or preprocessing changes what a cached set holds


def synth_cache_key(config, n: int, height: int, in_channels: int, ink: bool = False) -> str:
    """The cache file name of a rendered set: a hash of every SynthConfig field, n and the
    model's input options (height, in_channels, ink), and the cache format."""
    what = {"synth": asdict(config), "n": n, "height": height, "in_channels": in_channels, "ink": ink,
            "format": _SYNTH_CACHE_FORMAT}
    return "synth_" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20] + ".pt"


def synthetic_dataset(config, n: int, charset: Charset, height: int = 32, in_channels: int = 1,
                      augment: Optional[AugmentConfig] = None, seed: int = 0, progress: bool = False,
                      cache_dir=None, ink: bool = False) -> CaptchaDataset:
    """n seeded synthetic captchas (captcha_fast.synth.SynthConfig), rendered once and kept in
    memory; with cache_dir, kept there too and reused by any run that asks for the same set."""
    from captcha_fast.synth import SyntheticCaptchas
    cache = Path(cache_dir) / synth_cache_key(config, n, height, in_channels, ink) if cache_dir else None
    if cache is not None and cache.exists():
        blob = torch.load(cache, weights_only=True)
        labels, images = blob["labels"], blob["images"]
    else:
        indices: Iterator[int] = range(n)
        if progress:
            from tqdm import tqdm
            indices = tqdm(indices, desc=f"rendering {n} captchas", leave=False, disable=None)  # None: terminals only
        gen, labels, images = SyntheticCaptchas(config, n), [], []
        for i in indices:
            image, text = gen[i]
            name = f"synthetic:{config.seed}:{i}"
            labels.append(text)
            images.append(_resized_uint8(preprocess.from_pil(image, name), height, in_channels, MAX_WIDTH, name, ink))
        if cache is not None:
            atomic_write(cache, lambda tmp: torch.save({"labels": labels, "images": images}, tmp))
    samples = [Sample(f"synthetic:{config.seed}:{i}", text) for i, text in enumerate(labels)]
    return CaptchaDataset(samples, charset, height, in_channels, augment, seed, images=images, ink=ink)


class Batch(NamedTuple):
    images: Tensor          # (N, C, H, W_max) float, right-padded with preprocess.PAD_VALUE
    widths: Tensor          # (N,) int64, each image's own width
    targets: Tensor         # (sum L_i,) int64 class indices, concatenated
    target_lengths: Tensor  # (N,) int64
    labels: List[str]


def collate(items: Sequence[Tuple[Tensor, str, Tensor]]) -> Batch:
    """Data set items (images already at the model's height) -> a Batch: images padded by
    preprocess.collate, concatenated targets and their lengths."""
    images = [im for im, _, _ in items]
    C, H = images[0].shape[:2]
    widest = max(preprocess.MIN_WIDTH, max(im.shape[-1] for im in images))
    batch, widths = preprocess.collate(images, H, C, widest)
    targets = torch.cat([t for _, _, t in items])
    lengths = torch.tensor([len(t) for _, _, t in items], dtype=torch.long)
    return Batch(batch, widths, targets, lengths, [label for _, label, _ in items])


# ---------------------------------------------------------------------------- batching

class BucketBatchSampler(torch.utils.data.Sampler):
    """Deterministic batches for (seed, epoch), sharded over ranks.

    Shuffles with a seed+epoch generator, sorts each window of `bucket` batches by
    width (less padding for variable-width data) and shuffles the batches. With
    world > 1, `batch_size` is the global batch: rank r takes items r, r+world, ...
    of every batch, so the DDP-averaged gradient is the one-process gradient (a
    batch with fewer items than ranks is dropped, keeping the ranks in lockstep)."""

    def __init__(self, widths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 bucket: int = 0, rank: int = 0, world: int = 1):
        if batch_size < world:
            raise ValueError(f"batch_size ({batch_size}) must be at least the number of ranks ({world})")
        self.widths, self.batch_size, self.seed, self.shuffle = list(widths), batch_size, seed, shuffle
        self.bucket, self.rank, self.world, self.epoch = bucket, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> List[List[int]]:
        """The global batches of this epoch (before sharding)."""
        n = len(self.widths)
        order = list(range(n))
        rng = random.Random(f"captcha_fast.batches:{self.seed}:{self.epoch}")
        if self.shuffle:
            rng.shuffle(order)
        if self.bucket > 1:
            window = self.bucket * self.batch_size
            order = [i for k in range(0, n, window)
                     for i in sorted(order[k:k + window], key=lambda j: self.widths[j])]
        batches = [order[k:k + self.batch_size] for k in range(0, n, self.batch_size)]
        if self.shuffle and self.bucket > 1:
            rng.shuffle(batches)
        return [b for b in batches if len(b) >= self.world]

    def __iter__(self) -> Iterator[List[int]]:
        return iter([b[self.rank::self.world] for b in self.batches()])

    def __len__(self) -> int:
        return len(self.batches())
