"""Train a CRNN captcha reader with CTC.

    from captcha_fast.train import TrainConfig, train
    model_path = train(TrainConfig(data="captchas/", out="runs/a"), log=print)

(`captcha-fast train DATA --out RUN_DIR`; several processes: `torchrun --nproc_per_node 2
-m captcha_fast train DATA --out RUN_DIR`, DistributedDataParallel.)

RUN_DIR gets metrics.csv, curves.png, last.ckpt (everything needed to --resume), best.ckpt
(the weights of the best validation epoch, or of the last epoch when there is no validation
split; when fine-tuning, blended with the start model's weights: --blend) and model.pt (a
TorchScript recognizer of them).

Small sets (fewer than SMALL_SET labelled images, as a user's own hundred captchas): no
validation split unless --val-fraction asks for one (15% of 100 images is 15 images, one image
is 7 points of accuracy: too coarse to pick an epoch or stop on), a fixed budget of at least
--min-steps optimizer steps (each epoch makes as many passes over the images as that needs), the
last weights kept (the schedule anneals the learning rate to nearly zero), stronger
augmentation (data.SMALL_SET_AUGMENT), and, when fine-tuning, the half-way blend of the fine-tuned
weights with the start model's (SMALL_SET_BLEND; --probe chooses between it and the fine-tuned ones).

Determinism: the data order comes from (seed, pass), each sample's augmentation from
(seed, pass, index) and dropout from a generator reseeded with (seed, epoch, rank) at
the start of every epoch, so a resumed run repeats what an uninterrupted run does."""
from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from captcha_fast.charset import Charset
from captcha_fast.checkpoint import (INPUT_OPTIONS, PRETRAINED_CHECKPOINT, checkpoint_config,
                                     init_from_checkpoint, load_checkpoint, load_model, model_from_checkpoint,
                                     save_checkpoint)
from captcha_fast.confidence import calibrate_file
from captcha_fast.data import (SMALL_SET_AUGMENT, AugmentConfig, Batch, BucketBatchSampler, CaptchaDataset,
                               Sample, check_labels, collate, frames_needed, list_samples, split_samples,
                               synthetic_dataset)
from captcha_fast.decode import greedy_decode
from captcha_fast.distributed import Dist
from captcha_fast.files import atomic_write
from captcha_fast.machine import native_bf16
from captcha_fast.export import save_recognizer
from captcha_fast.metrics import score
from captcha_fast.model import BLOCK_CONVS, CRNN, CRNNConfig
from captcha_fast.plots import plot_curves
from captcha_fast.preprocess import MAX_WIDTH
from captcha_fast.synth import DIGITS_UPPER, SynthConfig


SMALL_SET = 200      # fewer labelled images: no validation split by default, stronger augmentation
# The weight-space ensemble of a fine-tuning run (--blend): the shares of the fine-tuned change that
# validation picks from. Without a validation split there is no default blend: measured on 100
# labels, half-way (0.5) lifts the styles the shipped model half reads (the `captcha` package at
# 160x60 84.5 -> 89.5%, varlen_upper 42.5 -> 52.5%) but costs the unseen real styles the small-set
# target is about (tii 100 -> 96%, sysu 92.9 -> 90.5% over three seeds; docs/training.md).
BLEND_CHOICES = (0.0, 0.25, 0.5, 0.75, 1.0)
VAL_FRACTION = 0.15  # the validation share of larger sets
FREEZABLE = ("convs", "blocks", "block1", "project")  # the CRNN's parts --freeze can keep (frozen_modules)
GENERAL_HEAD = "general"  # --start-head's name for a styled start model's general head
ROUTE_IMAGES = 256  # training images a styled start model's gate reads to pick the head fine-tuning starts from


def frozen_modules(model: CRNN, part: str) -> List[nn.Module]:
    """The modules of `model` that --freeze PART keeps: "convs" the whole conv stack, "blocks" its two
    pooled blocks (residual blocks after them still train), "block1" the first pooled block alone (the
    second and the rest train), "project" the projection before the GRU."""
    if part in ("blocks", "block1"):
        return list(model.convs[:BLOCK_CONVS if part == "blocks" else BLOCK_CONVS // 2])
    return [getattr(model, part)]


def _opt(default, help: str, **cli):
    """A TrainConfig field: its default and the help of its CLI flag (cli.py generates the flags).
    cli: flag (another flag name), metavar, choices, required, also ({flag: value} shortcuts)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """What to train and how. Every field is a `captcha-fast train` flag (--field-name), made by
    cli.add_config_arguments from the field's type, default and help."""
    data: str = field(metadata={"help": "folder of labelled images (LABEL.png, LABEL_x.png), a .tsv manifest "
                                        "(path<TAB>label) or `synthetic`"})
    out: str = _opt("runs/train", "run directory: metrics.csv, curves.png, best.ckpt, last.ckpt, model.pt",
                    required=True)
    # model
    height: int = _opt(32, "model input height in pixels (a multiple of 4)")
    in_channels: int = _opt(1, "input channels: 1 grey, 3 colour (--color)", choices=(1, 3), also={"--color": 3})
    ink: bool = _opt(True, "input: the ink map cropped to the text (preprocess.to_ink; grey models only, off "
                           "with --color)")
    channels: Optional[Tuple[int, int]] = _opt(None, "widths of the two conv blocks (default: the start model's "
                                                     "when fine-tuning, else 32 64; wider than the start model's "
                                                     "grows it: model.widen)", metavar=("C1", "C2"))
    hidden_dim: Optional[int] = _opt(None, "GRU size (default: the start model's when fine-tuning, else 128; as "
                                           "--channels)", flag="--hidden")
    res_blocks: Optional[int] = _opt(None, "residual blocks after the conv blocks (default: the start model's when "
                                           "fine-tuning, else 0; more than the start model's grows it: each new "
                                           "block starts as the identity)")
    dropout: float = _opt(0.1, "dropout before the GRU and the classifier")
    freeze: Tuple[str, ...] = _opt((), "fine-tuning: parts kept as the start model has them, from "
                                       f"{', '.join(FREEZABLE)} (the conv stack with its batch-norm statistics; "
                                       "its two pooled blocks, residual blocks after them still training; the "
                                       "first pooled block alone; the projection before the GRU); e.g. a head for "
                                       "one style on shared convs",
                                   metavar="PART", choices=FREEZABLE)
    charset: Optional[str] = _opt(None, "symbols in class order (default: the sorted symbols of all labels)")
    init_from: Optional[str] = _opt(None, "start from this checkpoint's weights (RUN_DIR or .ckpt; default: the "
                                          "shipped model's, captcha_fast/pretrained/default.ckpt); classifier rows "
                                          "are mapped per symbol (a symbol whose other case is known starts from "
                                          "it), new symbols start fresh")
    start_head: Optional[str] = _opt(None, "a start model with style heads (the shipped one has a head for the "
                                           "`captcha` package): the head whose model fine-tuning starts from, "
                                           f"{GENERAL_HEAD!r} or a style's name, e.g. captcha_pkg (default: the one "
                                           "its gate sends most of the training images to)", metavar="HEAD")
    from_scratch: bool = _opt(False, "start from random weights (with the character warm-up) instead of "
                                     "fine-tuning the shipped model")
    max_width: int = _opt(MAX_WIDTH, "widest image allowed after resizing to --height: a wider one is an error "
                                     "naming its file (skipped with --skip-bad)")
    # optimisation
    epochs: int = _opt(30, "epochs (the OneCycle schedule spans them all); an epoch is one pass over the training "
                           "images, or several when one pass per epoch would give fewer than --min-steps steps")
    min_steps: int = _opt(1000, "fewest optimizer steps of a run: a small set makes several passes per epoch (0: "
                                "one pass per epoch)")
    batch_size: int = _opt(32, "global batch size (split over torchrun ranks)")
    lr: Optional[float] = _opt(None, "peak learning rate (OneCycle; default 3e-3 from scratch, 1e-3 when "
                                     "fine-tuning)")
    weight_decay: float = _opt(0.01, "AdamW weight decay (of weight matrices and kernels only)")
    rehearse: float = _opt(0.25, "fine-tuning on labels too few to show every symbol (REHEARSE_BELOW): this "
                                 "share of the training items are renders of the synthetic mix in the start "
                                 "model's symbols (the labels' case), so symbols the labels lack by chance are "
                                 "not unlearned (0: off)")
    blend: Optional[float] = _opt(None, "fine-tuning: save start + A (fine-tuned - start), a weight-space ensemble "
                                        "that keeps what the start model read (WiSE-FT); default: A from "
                                        "0, 0.25, 0.5, 0.75, 1 by validation accuracy, or for a small set "
                                        "without a validation split 0.5 (--probe: 0.5 or 1 by a probe)",
                                  metavar="A")
    probe: bool = _opt(False, "fine-tuning a small set without a validation split: instead of the half-way blend, "
                              "two runs of half the steps on half the labels each read the other half, and the "
                              "fine-tuned weights are saved where they read it at least as well as half-way; about "
                              "2.4x the time of the run alone, for no gain on average (docs/accuracy.md)")
    warmup: float = _opt(0.15, "fraction of the steps spent warming the learning rate up")
    clip: float = _opt(5.0, "gradient norm clip")
    patience: int = _opt(10, "stop after this many epochs without a better validation score")
    max_minutes: Optional[float] = _opt(None, "stop (as early stopping does) after this much training time")
    stop_after: Optional[int] = _opt(None, "end this invocation after this many epochs (continue with --resume)")
    stop_at_accuracy: Optional[float] = _opt(None, "stop once validation accuracy reaches this (0-1)")
    augment: bool = _opt(True, f"small random distortions of the training images (stronger for sets of fewer than "
                               f"{SMALL_SET} images)")
    join: float = _opt(0.0, "share of training items made of two images side by side, labels joined (against a "
                            "model memorising whole images of a small set; data.CaptchaDataset)")
    teacher: Optional[str] = _opt(None, "knowledge distillation: a checkpoint of the same charset, height and input "
                                        "whose per-frame output the model also learns (KL divergence, weighted "
                                        "--teacher-weight) on the training items whose path matches --teacher-on")
    teacher_weight: float = _opt(1.0, "weight of the distillation term beside the CTC loss")
    teacher_on: str = _opt("", "regular expression searched in each training item's path: the items the teacher's "
                               "output is learnt on ('': all)")
    char_warmup: int = _opt(200, "steps of single-character pretraining on rendered captchas of the charset "
                                 "before CTC, when training from scratch (0: off)")
    char_warmup_lr: float = _opt(2e-3, "learning rate of the single-character warm-up")
    # data
    val_fraction: Optional[float] = _opt(None, f"share of the images held out for validation (by a hash of name and "
                                               f"seed); default {VAL_FRACTION}, or 0 for fewer than {SMALL_SET} images "
                                               f"(a fixed budget, the last weights kept)")
    seed: int = _opt(0, "seed of the split, the initialisation, the data order and the augmentation")
    skip_bad: bool = _opt(False, "skip unreadable or too wide images and labels outside the charset, with a warning")
    bucket: int = _opt(0, "sort windows of this many batches by width (less padding for variable widths; 0: off)")
    # synthetic data (data == "synthetic")
    synth_train: int = _opt(20000, "synthetic: training images")
    synth_val: int = _opt(1000, "synthetic: validation images (another seed)")
    synth_min_len: int = _opt(4, "synthetic: shortest label")
    synth_max_len: int = _opt(8, "synthetic: longest label")
    synth_charset: str = _opt(DIGITS_UPPER, "synthetic: symbols the labels draw from")
    synth_cache: Optional[str] = _opt(None, "folder to keep rendered synthetic sets in (reused by later runs)")
    # runtime
    device: str = _opt("auto", "where to train (auto: CUDA when available)", choices=("auto", "cpu", "cuda"))
    threads: int = _opt(0, "torch CPU threads (0: torch's default; 1 is best on a busy machine)")
    amp: bool = _opt(True, "autocast: bf16 on CUDA where supported (else fp16 with a gradient scaler), bf16 on CPUs "
                           "with native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo); float32 elsewhere")
    resume: bool = _opt(False, "continue the run in --out from its last.ckpt")
    progress: bool = _opt(True, "progress bars (--quiet: none)", also={"--quiet": False})
    export: bool = _opt(True, "write model.pt, a TorchScript recognizer of the best weights, at the end")

    def __post_init__(self):
        self.channels = tuple(self.channels) if self.channels is not None else None
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError(f"epochs, batch_size and patience must be >= 1, got {self.epochs}, {self.batch_size}, "
                             f"{self.patience}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey) or 3 (colour), got {self.in_channels}")
        if self.blend is not None and not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"blend must be in [0, 1], got {self.blend}")
        self.freeze = tuple(self.freeze)
        if set(self.freeze) - set(FREEZABLE):
            raise ValueError(f"freeze takes {', '.join(FREEZABLE)}, got {', '.join(self.freeze)}")
        if self.freeze and self.from_scratch:
            raise ValueError("freeze keeps parts of the start model: it cannot train from scratch")
        if self.start_head is not None and self.from_scratch:
            raise ValueError(f"--start-head {self.start_head!r} names a head of the start model: --from-scratch has "
                             f"none")
        if self.in_channels != 1:
            self.ink = False  # the ink map is one channel: a colour model reads the image itself

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# What a --resume must share with the run it continues.
_RESUME_MUST_MATCH = ("data", "seed", "batch_size", "epochs", "min_steps", "lr", "height", "in_channels", "ink",
                      "channels", "hidden_dim", "res_blocks", "freeze", "val_fraction", "warmup", "bucket", "synth_train",
                      "augment", "rehearse", "join", "teacher", "teacher_weight", "teacher_on")
_CSV_KEYS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_cer", "val_n", "lr", "seconds"]


# ---------------------------------------------------------------------------- RNG

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of the training forward (None: float32), per --amp and the device."""
    if not cfg.amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and native_bf16(device) else None


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2 ** 31)


# ---------------------------------------------------------------------------- data and model

def val_fraction(cfg: TrainConfig, n: int) -> float:
    """The validation share of a set of n labelled images: --val-fraction, else VAL_FRACTION, or
    0 for a small set (fewer than SMALL_SET images)."""
    if cfg.val_fraction is not None:
        return cfg.val_fraction
    return 0.0 if n < SMALL_SET else VAL_FRACTION


def augment_config(cfg: TrainConfig, n: int) -> Optional[AugmentConfig]:
    """The augmentation of a set of n labelled images (None: --no-augment)."""
    if not cfg.augment:
        return None
    return SMALL_SET_AUGMENT if n < SMALL_SET else AugmentConfig()


class Data(NamedTuple):
    train: CaptchaDataset
    val: Optional[CaptchaDataset]
    charset: Charset
    samples: List[Sample]  # a folder's or manifest's images that passed the label checks ([]: synthetic)

    @property
    def labelled(self) -> int:
        """The count every small-set rule (SMALL_SET) reads."""
        return len(self.samples)


def build_data(cfg: TrainConfig) -> Data:
    """Train and validation sets, the charset and the labelled samples for `cfg`."""
    if cfg.data == "synthetic":  # rendered sets are as large as asked for: the usual augmentation
        aug = AugmentConfig() if cfg.augment else None
        charset = Charset(cfg.charset or "".join(sorted(set(cfg.synth_charset))))
        if charset.unknown(cfg.synth_charset):
            raise ValueError(f"synthetic charset has symbols outside --charset: {charset.unknown(cfg.synth_charset)!r}")
        sc = dict(charset=cfg.synth_charset, min_len=cfg.synth_min_len, max_len=cfg.synth_max_len)
        # Validation uses another seed: no image or label sequence is shared with training.
        train_ds = _synthetic(cfg, SynthConfig(seed=cfg.seed, **sc), cfg.synth_train, charset, aug)
        val_ds = (_synthetic(cfg, SynthConfig(seed=cfg.seed + 1_000_000, **sc), cfg.synth_val, charset, None)
                  if cfg.synth_val > 0 else None)
        return Data(train_ds, val_ds, charset, [])
    samples = list_samples(cfg.data)
    labelled = "".join(sorted(set("".join(s.label for s in samples))))
    start = start_config(cfg)
    known = start_symbols(labelled, start.charset) if start else ""
    rehearse = cfg.rehearse > 0 and 0 < sum(len(s.label) for s in samples) < REHEARSE_BELOW * len(known)
    charset = Charset(cfg.charset or "".join(sorted(set(labelled) | set(known if rehearse else ""))))
    missing = "".join(c for c in known if c not in labelled)
    if missing and not rehearse:
        warnings.warn(f"the labels of {cfg.data!r} never show {missing!r}, which the start model reads: fine-tuning "
                      f"teaches it that they never occur; if your captchas can hold them, label some images that do")
    new = [c for c in labelled if c.lower() not in start.charset.lower()] if start and not cfg.charset else []
    if new:  # each becomes a class learnt from these labels alone: say so, a typo in a file name does it too
        where = {c: next(s.path for s in samples if c in s.label) for c in new}
        warnings.warn(f"the labels of {cfg.data!r} hold symbols the start model does not read, each a new class "
                      f"learnt from these labels alone: " + ", ".join(f"{c!r} ({where[c]})" for c in new))
    samples = check_labels(samples, charset, cfg.skip_bad)
    train_s, val_s = split_samples(samples, val_fraction(cfg, len(samples)), cfg.seed)
    if not train_s:
        raise ValueError(f"no training images left after the validation split of {cfg.data!r}")
    kw = dict(height=cfg.height, in_channels=cfg.in_channels, seed=cfg.seed, skip_bad=cfg.skip_bad,
              max_width=cfg.max_width, ink=cfg.ink)
    train_ds = CaptchaDataset(train_s, charset, augment=augment_config(cfg, len(samples)), join=cfg.join, **kw)
    if rehearse:
        train_ds = _with_rehearsal(cfg, train_ds, "".join(c for c in known if not charset.unknown(c)))
    val_ds = CaptchaDataset(val_s, charset, **kw) if val_s else None
    return Data(train_ds, val_ds, charset, samples)


def _describe(ds: CaptchaDataset, data: str) -> str:
    """'N training images', and how a rehearsal (_with_rehearsal) mixed them with renders."""
    renders = sum(s.path.startswith("synthetic:") for s in ds.samples) if data != "synthetic" else 0
    if not renders:
        return f"{len(ds)} training images"
    images = len({s.path for s in ds.samples}) - renders
    return (f"{images} training images (each {(len(ds) - renders) // images} times) and {renders} renders of the "
            f"synthetic mix (--rehearse)")


REHEARSAL_RENDERS = 300  # synthetic captchas beside a small set (--rehearse)
# Rehearse while the labels hold fewer than this many characters per symbol of the start model's they
# could use: a symbol in use is then missing by chance (P = e^-8 ~ 0.03% at 8: the package's 25 labels
# hold 3.2 per symbol and lacked the 7), while one missing from more labels is missing by design
# (sysu's 100 labels, 11 per symbol, never show 0, 1 or o), where rehearsing them cost 1.4 points
# (three seeds: 87.1, 87.1, 90.0% against 89.3, 89.3, 90.0%).
REHEARSE_BELOW = 8


def _with_rehearsal(cfg: TrainConfig, ds: CaptchaDataset, symbols: str) -> CaptchaDataset:
    """ds's images repeated, plus REHEARSAL_RENDERS renders of the synthetic mix in `symbols` (the
    labels' lengths) that fit the model's frames, so that about --rehearse of the items are renders:
    a few labelled images teach their style while the renders keep every symbol in use (25 labels
    without a 7 otherwise teach the model to read every 7 as 1)."""
    lengths = [len(s.label) for s in ds.samples]
    sc = SynthConfig(style="mix", charset=symbols, min_len=max(1, min(lengths)), max_len=max(lengths),
                     seed=cfg.seed + 2_000_000)
    renders = _synthetic(cfg, sc, REHEARSAL_RENDERS, ds.charset, None)
    fit = [i for i in range(len(renders)) if renders.width(i) // 4 >= frames_needed(renders.samples[i].label)]
    copies = max(1, math.ceil(len(fit) * (1 - cfg.rehearse) / (cfg.rehearse * len(ds))))
    return CaptchaDataset(ds.samples * copies + [renders.samples[i] for i in fit], ds.charset, ds.height,
                          ds.in_channels, ds.augment, ds.seed, images=ds.images * copies + [renders.images[i] for i in fit],
                          ink=ds.ink, join=ds.join)


def start_symbols(labels: str, start: str) -> str:
    """The start model's symbols of the labels' kinds: its digits if the labels have digits, its
    letters if they have letters (in the labels' case when they use one; a symbol the labels show
    in the other case counts as shown)."""
    letters = [c for c in labels if c.isalpha()]
    case = (str.upper if all(c.isupper() for c in letters) else str.lower if all(c.islower() for c in letters)
            else str)
    shown = {c.lower(): c for c in labels}
    return "".join(sorted({shown.get(c.lower(), case(c)) for c in start
                           if c.isdigit() and any(d.isdigit() for d in labels) or c.isalpha() and letters}))


def _synthetic(cfg: TrainConfig, sc: SynthConfig, n: int, charset: Charset, aug) -> CaptchaDataset:
    return synthetic_dataset(sc, n, charset, cfg.height, cfg.in_channels, aug, cfg.seed, cfg.progress, cfg.synth_cache,
                             cfg.ink)


def check_lengths(ds: CaptchaDataset, model: CRNN, skip_bad: bool = False) -> None:
    """Every label must fit its image's frame sequence (CTC: T >= L + repeats): an error naming the
    first that does not, or (skip_bad) those dropped with one warning."""
    frames = model.output_lengths(torch.tensor([ds.width(i) for i in range(len(ds))])).tolist()
    bad = [i for i, (s, t) in enumerate(zip(ds.samples, frames)) if t < frames_needed(s.label)]
    if bad and not skip_bad:
        i, s = bad[0], ds.samples[bad[0]]
        raise ValueError(f"label {s.label!r} of {s.path!r} needs {frames_needed(s.label)} CTC frames but its "
                         f"image gives {frames[i]} ({ds.width(i)} px wide at height {ds.height}, one frame per 4 px): "
                         f"use a larger --height or wider images (or --skip-bad)")
    if bad:
        warnings.warn(f"skipping {len(bad)} images too narrow for their labels, e.g. {ds.samples[bad[0]].path!r}")
        ds.drop(bad)


def build_model(cfg: TrainConfig, charset: Charset) -> CRNN:
    # the start model's size unless asked for another; CRNNConfig's defaults from scratch
    size = start_config(cfg) or CRNNConfig(charset.symbols)
    model = CRNN(CRNNConfig(charset=charset.symbols, height=cfg.height, in_channels=cfg.in_channels,
                            channels=cfg.channels or size.channels, hidden_dim=cfg.hidden_dim or size.hidden_dim,
                            res_blocks=size.res_blocks if cfg.res_blocks is None else cfg.res_blocks,
                            dropout=cfg.dropout, ink=cfg.ink))
    # Start the classifier near uniform: big random logits push CTC onto the all-blank plateau.
    nn.init.normal_(model.classifier.weight, std=0.01)
    nn.init.zeros_(model.classifier.bias)
    return model


def char_warmup(run: "_Run") -> None:
    """Pretrain on rendered single-character captchas of the charset with cross-entropy on the
    frame-averaged log-probs. A fresh CRNN sits on the CTC plateau (blank everywhere) for
    hundreds of steps; this signal teaches it to tell the symbols apart in a few hundred cheap
    steps, after which CTC aligns them within about a hundred more."""
    cfg, device = run.cfg, run.device
    n = min(4096, max(512, cfg.char_warmup * cfg.batch_size // 4))
    sc = SynthConfig(charset=run.charset.symbols, min_len=1, max_len=1, seed=cfg.seed + 2_000_000)
    ones = _synthetic(cfg, sc, n, run.charset, AugmentConfig() if cfg.augment else None)
    sampler = BucketBatchSampler([ones.width(i) for i in range(n)], cfg.batch_size, cfg.seed + 2_000_000,
                                 rank=run.ddp.rank, world=run.ddp.world)
    opt = torch.optim.AdamW(run.model.parameters(), lr=cfg.char_warmup_lr, weight_decay=cfg.weight_decay)
    run.net.train()
    torch.manual_seed(_epoch_seed(cfg.seed, 1_000_000, run.ddp.rank))
    step = 0
    while step < cfg.char_warmup:
        sampler.set_epoch(step)
        ones.set_epoch(step)
        for idx in sampler:
            b = collate([ones[i] for i in idx])
            log_probs, lengths = run.net(_on(device, b.images), b.widths.to(device))
            mask = (torch.arange(log_probs.shape[0], device=device)[:, None] < lengths[None]).float()  # (T, N)
            # Symbols only, renormalised without the blank: the warm-up teaches which symbol, and
            # leaves where (blank or not) to CTC.
            symbols = log_probs[:, :, 1:].float().log_softmax(-1)                                   # (T, N, K - 1)
            pooled = (symbols * mask[..., None]).sum(0) / lengths[:, None]                           # (N, K - 1)
            loss = nn.functional.cross_entropy(pooled, b.targets.to(device) - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip)
            opt.step()
            step += 1
            if step >= cfg.char_warmup:
                break


# ---------------------------------------------------------------------------- the run

@dataclass
class _Run:
    """Everything an epoch needs, made by _setup."""
    cfg: TrainConfig
    ddp: Dist
    out: Path
    train_ds: CaptchaDataset
    val_ds: Optional[CaptchaDataset]
    charset: Charset
    model: CRNN
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    sampler: BucketBatchSampler
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    passes: int = 1  # passes over the training images per epoch
    samples: List[Sample] = field(default_factory=list)  # Data.samples
    head_note: str = ""  # which head of a styled start model the run started from, and why (start_head)
    ctc: nn.CTCLoss = field(default_factory=lambda: nn.CTCLoss(blank=0, reduction="mean"))
    teacher: Optional[CRNN] = None         # --teacher, frozen
    distilled: Optional[Tensor] = None     # (len(train_ds),) bool: the items --teacher-on matches
    start_epoch: int = 0
    rows: List[dict] = field(default_factory=list)
    best: Optional[dict] = None
    bad_epochs: int = 0
    elapsed: float = 0.0

    @property
    def device(self) -> torch.device:
        return self.ddp.device


def _resume_state(cfg: TrainConfig, out: Path) -> Optional[dict]:
    if not cfg.resume:
        if (out / "last.ckpt").exists():  # a run killed by mistake is not to be lost to a retyped command
            raise FileExistsError(f"{str(out)!r} holds a training run already (last.ckpt): --resume continues it; "
                                  f"to start another, choose another --out (or delete that one)")
        return None
    if not (out / "last.ckpt").exists():
        raise FileNotFoundError(f"--resume: no checkpoint {str(out / 'last.ckpt')!r} to resume from")
    state = load_checkpoint(out / "last.ckpt")
    saved = TrainConfig.from_dict(state["config"])
    for key in _RESUME_MUST_MATCH:
        if getattr(saved, key) != getattr(cfg, key):
            raise ValueError(f"--resume: {key} is {getattr(cfg, key)!r} but the run in {str(out)!r} used "
                             f"{getattr(saved, key)!r}")
    return state


def _setup(cfg: TrainConfig, ddp: Dist) -> _Run:
    out = Path(cfg.out)
    state = _resume_state(cfg, out)
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_ds, val_ds, charset, samples = build_data(cfg)
    if state is not None and state["charset"] != charset.symbols:
        raise ValueError(f"--resume: the data gives charset {charset.symbols!r} but the run used {state['charset']!r}")
    model = build_model(cfg, charset)
    init = start_weights(cfg)
    head_note = ""
    if init is not None:
        if state is not None:  # a resumed run keeps the head it started from (before --start-head: the general one)
            saved = TrainConfig.from_dict(state["config"]).start_head or GENERAL_HEAD
            if cfg.start_head not in (None, saved):
                raise ValueError(f"--resume: start_head is {cfg.start_head!r} but the run in {str(out)!r} used "
                                 f"{saved!r}")
            cfg = replace(cfg, start_head=saved)
        head, head_note = start_head(cfg, init, train_ds)
        cfg = replace(cfg, start_head=head)
    if init is not None and state is None:
        # residual convs the start model lacks are new blocks (the identity at first), not a mismatch
        skipped = [n for n in init_from_checkpoint(model, init, _start_style(cfg))
                   if not (n.startswith("convs.") and int(n.split(".")[1]) >= BLOCK_CONVS)]
        if skipped:
            warnings.warn(f"starting from {init}: kept the fresh init of {', '.join(skipped)} (shapes differ)")
    for module in (m for part in cfg.freeze for m in frozen_modules(model, part)):
        module.requires_grad_(False)  # AdamW skips them (no gradient, so no decay either)
    for ds in (train_ds, val_ds):
        if ds is not None:
            check_lengths(ds, model, cfg.skip_bad)
    # Channels-last is oneDNN's (and cuDNN's) native layout: no reorders around each conv.
    model = model.to(ddp.device, memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=peak_lr(cfg))
    sampler = BucketBatchSampler([train_ds.width(i) for i in range(len(train_ds))], cfg.batch_size, cfg.seed,
                                 shuffle=True, bucket=cfg.bucket, rank=ddp.rank, world=ddp.world)
    passes = passes_per_epoch(cfg, len(sampler))
    steps = cfg.epochs * passes * len(sampler)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak_lr(cfg), total_steps=steps, pct_start=cfg.warmup,
                                                div_factor=20, final_div_factor=200)
    amp_dtype = autocast_dtype(cfg, ddp.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    run = _Run(cfg, ddp, out, train_ds, val_ds, charset, model, ddp.wrap(model), opt, sampler, sched, scaler, amp_dtype,
               passes, samples, head_note=head_note)
    if cfg.teacher:
        run.teacher, run.distilled = load_teacher(cfg, model, train_ds, ddp.device)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        run.start_epoch, run.rows = state["epoch"] + 1, list(state["metrics"])
        run.best, run.bad_epochs, run.elapsed = state["best"], state["bad_epochs"], state["elapsed"]
    elif cfg.char_warmup > 0 and init is None:
        char_warmup(run)
    return run


def load_teacher(cfg: TrainConfig, model: CRNN, train_ds: CaptchaDataset, device: torch.device
                 ) -> Tuple[CRNN, Tensor]:
    """The --teacher model (frozen, eval mode) and which training items it teaches (--teacher-on).
    Its frames must be the model's own: the same charset, height and input (any CRNN gives W / 4
    frames of an image W wide)."""
    teacher = load_model(cfg.teacher)
    for key in ("charset", "height", "in_channels", "ink"):
        if getattr(teacher.config, key) != getattr(model.config, key):
            raise ValueError(f"--teacher {cfg.teacher!r}: its {key} is {getattr(teacher.config, key)!r}, the "
                             f"model's {getattr(model.config, key)!r}; distillation needs the same frames and symbols")
    teacher = teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    pattern = re.compile(cfg.teacher_on)
    distilled = torch.tensor([bool(pattern.search(s.path)) for s in train_ds.samples], dtype=torch.bool)
    if not distilled.any():
        raise ValueError(f"--teacher-on {cfg.teacher_on!r} matches none of the {len(distilled)} training items' paths")
    return teacher, distilled


def distillation_loss(run: "_Run", images: Tensor, widths: Tensor, log_probs: Tensor, lengths: Tensor,
                      idx: List[int]) -> Tensor:
    """KL(teacher || model) per frame, the mean over the frames of the batch's --teacher-on items
    (frame-level distillation of a CTC model: the teacher's frames are the model's own)."""
    keep = run.distilled[idx].to(images.device)
    if not bool(keep.any()):
        return log_probs.new_zeros(())
    with torch.no_grad(), torch.autocast(images.device.type, dtype=run.amp_dtype or torch.float32,
                                         enabled=run.amp_dtype is not None):
        target, _ = run.teacher(images[keep], widths[keep])
    student = log_probs[: target.shape[0], keep].float()
    frames = (torch.arange(target.shape[0], device=lengths.device)[:, None] < lengths[keep][None, :]).float()
    kl = nn.functional.kl_div(student, target.float(), log_target=True, reduction="none").sum(-1)  # (T, n)
    return (kl * frames).sum() / frames.sum()


def passes_per_epoch(cfg: TrainConfig, batches_per_pass: int) -> int:
    """One pass over the data per epoch, or as many as --epochs epochs need to reach --min-steps
    optimizer steps: a set of 100 images gives 4 batches of 32, and 30 epochs of 4 steps cannot
    move a model; an epoch of several passes keeps the epoch count (validation, checkpoints)."""
    return max(1, math.ceil(cfg.min_steps / (cfg.epochs * batches_per_pass)))


def start_weights(cfg: TrainConfig) -> Optional[Path]:
    """The checkpoint training starts from: --init-from, else the shipped model's (None: from scratch)."""
    if cfg.from_scratch:
        if cfg.init_from:
            raise ValueError("--from-scratch and --init-from contradict each other: pick one")
        return None
    if cfg.init_from:
        return Path(cfg.init_from)
    if not PRETRAINED_CHECKPOINT.is_file():
        raise FileNotFoundError(f"the shipped model's weights {str(PRETRAINED_CHECKPOINT)!r}, where fine-tuning "
                                f"starts, are missing: reinstall captcha_fast, or pass --from-scratch")
    return PRETRAINED_CHECKPOINT


def start_head(cfg: TrainConfig, init: Path, train_ds: CaptchaDataset) -> Tuple[Optional[str], str]:
    """The head of a start model with style heads that fine-tuning starts from (model.style_model, or
    GENERAL_HEAD: model.general_model; None for a start without heads) and a line saying why:
    --start-head, else the head the start model's gate sends most of the training images to (up to
    ROUTE_IMAGES of them, unaugmented; a rehearsal's renders aside). A user's labels are one style; the
    shipped model reads the `captcha` package with a head of its own, and 100 package labels fine-tuned
    from the general head's model read 93.0% of 200 held-out renders, from the package head's 94.0%."""
    ckpt = load_checkpoint(init)
    source = checkpoint_config(ckpt)
    styles = source.style_heads
    names = (GENERAL_HEAD,) + tuple(styles)
    if cfg.start_head is not None:
        if cfg.start_head not in names:
            heads = f"the heads {', '.join(names)}" if styles else "no style heads"
            raise ValueError(f"start head {cfg.start_head!r} (--start-head, or the one a resumed run started from): "
                             f"the start model {str(init)!r} has {heads}")
        return (cfg.start_head if styles else None), ""
    own = [s for s in dict.fromkeys(train_ds.samples) if not s.path.startswith("synthetic:")]
    own = own[::max(1, math.ceil(len(own) / ROUTE_IMAGES))]  # spread over the list: sources may come in runs
    other_input = any(getattr(source, k) != getattr(cfg, k) for k in INPUT_OPTIONS)  # init_from_checkpoint says so
    if not styles or not own or other_input:
        return (GENERAL_HEAD if styles else None), ""
    ds = CaptchaDataset(own, train_ds.charset, height=cfg.height, in_channels=cfg.in_channels, ink=cfg.ink,
                        max_width=cfg.max_width, skip_bad=cfg.skip_bad)
    model = model_from_checkpoint(ckpt)  # eval mode
    votes = torch.zeros(1 + len(styles), dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(ds), 64):
            b = collate([ds[j] for j in range(i, min(i + 64, len(ds)))])
            votes += torch.bincount(model.route(*model.features(b.images, b.widths)), minlength=len(votes))
    pick = names[int(votes.argmax())]
    others = ", ".join(n for n in names if n != pick)
    return pick, (f"fine-tuning the start model's {pick} head: its gate sends {int(votes.max())} of the {len(ds)} "
                  f"training images it read there (--start-head picks another: {others})")


def _start_style(cfg: TrainConfig) -> Optional[str]:
    """init_from_checkpoint's style for the head start_head picked (None: the general head)."""
    return None if cfg.start_head in (None, GENERAL_HEAD) else cfg.start_head


def start_config(cfg: TrainConfig) -> Optional[CRNNConfig]:
    """The configuration (size, charset) of the model training starts from; None from scratch."""
    start = start_weights(cfg)
    return checkpoint_config(load_checkpoint(start)) if start else None


def peak_lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else (3e-3 if cfg.from_scratch else 1e-3)


def _on(device: torch.device, images: Tensor) -> Tensor:
    """A batch of images on the device, channels-last (the model's layout)."""
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def _exact_reads(log_probs: Tensor, lengths: Tensor, b: Batch) -> Tensor:
    """How many greedy reads (the C++/CUDA op, no strings) equal their targets, on the device."""
    tokens, token_lengths, _ = torch.ops.captcha_fast.ctc_greedy_decode(log_probs, lengths, 0)  # (N, T), -1 padded
    L = int(b.target_lengths.max())
    want = torch.full((len(b.labels), L), -1, dtype=torch.long)
    want[torch.arange(L)[None, :] < b.target_lengths[:, None]] = b.targets  # row-major: the concatenation order
    want, target_lengths = want.to(tokens.device), b.target_lengths.to(tokens.device)
    return ((token_lengths == target_lengths) & (tokens[:, :L] == want).all(1)).sum()


def _passes(run: _Run, epoch: int) -> Iterator[List[int]]:
    """The batches of an epoch's passes; pass k of the run has its own order and augmentation."""
    for k in range(epoch * run.passes, (epoch + 1) * run.passes):
        run.sampler.set_epoch(k)
        run.train_ds.set_epoch(k)
        yield from run.sampler


def _train_epoch(run: _Run, epoch: int) -> dict:
    cfg, device = run.cfg, run.device
    torch.manual_seed(_epoch_seed(cfg.seed, epoch, run.ddp.rank))  # dropout stream of this epoch
    run.net.train()
    for module in (m for part in cfg.freeze for m in frozen_modules(run.model, part)):
        module.eval()  # frozen batch norms keep their statistics too
    batches = _passes(run, epoch)
    bar = None
    if cfg.progress and run.ddp.main:
        from tqdm import tqdm
        batches = bar = tqdm(batches, total=run.passes * len(run.sampler), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                             leave=False, disable=None)  # None: no bar where stderr is not a terminal (a log file)
    loss_sum, correct, n = 0.0, torch.zeros((), dtype=torch.long, device=device), 0
    for idx in batches:
        b = collate([run.train_ds[i] for i in idx])
        images, widths = _on(device, b.images), b.widths.to(device)
        with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
            log_probs, lengths = run.net(images, widths)
        loss = run.ctc(log_probs.float(), b.targets.to(device), lengths, b.target_lengths.to(device))
        if run.teacher is not None:
            loss = loss + cfg.teacher_weight * distillation_loss(run, images, widths, log_probs, lengths, idx)
        if not torch.isfinite(loss):
            raise RuntimeError(f"CTC loss is {float(loss)} at epoch {epoch + 1} on labels {b.labels}: "
                               f"lower --lr or check the data")
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.opt)
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip)
        run.scaler.step(run.opt)
        run.scaler.update()
        run.sched.step()
        loss_sum += float(loss.detach()) * len(idx)
        correct += _exact_reads(log_probs.detach(), lengths, b)
        n += len(idx)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum / n:.3f}")
    run.ddp.average_buffers(run.model)
    loss_sum, correct, n = run.ddp.sum([loss_sum, float(correct), n])
    return {"train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1), "lr": run.sched.get_last_lr()[0]}


def _read(model: CRNN, charset: Charset, ds: CaptchaDataset, batches, device: torch.device,
          ctc: Optional[nn.CTCLoss] = None) -> Tuple[List[str], List[str], float]:
    """The model's greedy reads (the C++ op) of ds's images, batch by batch (lists of indices), in eval
    mode: their labels, the reads, and the CTC loss summed over the images (0 without ctc)."""
    model.eval()
    loss_sum, truths, reads = 0.0, [], []
    with torch.no_grad():
        for idx in batches:
            b = collate([ds[i] for i in idx])
            log_probs, lengths = model(_on(device, b.images), b.widths.to(device))
            if ctc is not None:
                loss_sum += float(ctc(log_probs, b.targets.to(device), lengths, b.target_lengths.to(device))) * len(idx)
            reads += greedy_decode(log_probs, lengths, charset)
            truths += b.labels
    return truths, reads, loss_sum


def _validate(run: _Run) -> dict:
    """CTC loss, and accuracy and CER of the greedy reads (the C++ op) scored by metrics.score."""
    ds, device, ddp = run.val_ds, run.device, run.ddp
    sampler = BucketBatchSampler([ds.width(i) for i in range(len(ds))], max(run.cfg.batch_size * 2, ddp.world),
                                 shuffle=False, bucket=8, rank=ddp.rank, world=ddp.world)
    # Every sample is read once: leftovers (batches smaller than the world) go to rank 0.
    batches = list(sampler)
    seen = {i for b in sampler.batches() for i in b}
    if ddp.main and len(seen) < len(ds):
        batches.append([i for i in range(len(ds)) if i not in seen])
    truths, reads, loss_sum = _read(run.model, run.charset, ds, batches, device, run.ctc)
    r = score(truths, reads)
    n, correct, errors, chars, loss_sum = ddp.sum([r.n, r.correct, r.char_errors, r.chars, loss_sum])
    return {"val_loss": loss_sum / max(n, 1), "val_acc": correct / max(n, 1), "val_cer": errors / max(chars, 1),
            "val_n": int(n)}


def _rank(row: dict) -> tuple:
    """The one rule for the best epoch: more exact reads, then a lower CER, then a lower loss.
    (Without a validation split, _record keeps the last epoch.)"""
    return row["val_acc"], -row["val_cer"], -row["val_loss"]


def _checkpoint(run: _Run, epoch: int, resumable: bool) -> dict:
    """The checkpoint dict (see captcha_fast.checkpoint); resumable adds the optimizer, scheduler,
    scaler and RNG states that --resume needs."""
    ckpt = {"config": asdict(run.cfg), "model_config": run.model.config.to_dict(), "charset": run.charset.symbols,
            "model": run.model.state_dict(), "epoch": epoch, "metrics": run.rows, "best": run.best,
            "bad_epochs": run.bad_epochs, "elapsed": run.elapsed}
    if resumable:
        ckpt.update(optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(), scaler=run.scaler.state_dict(),
                    rng=_rng_state())
    return ckpt


def _record(run: _Run, epoch: int, row: dict) -> bool:
    """Keep the row, write the checkpoints, metrics.csv and curves.png; True if the epoch is the best."""
    run.rows.append(row)
    # Without a validation split the latest epoch is the model (the schedule ends annealed).
    improved = run.best is None or row["val_n"] == 0 or _rank(row) > _rank(run.best)
    run.best, run.bad_epochs = (dict(row), 0) if improved else (run.best, run.bad_epochs + 1)
    if run.ddp.main:
        if improved:
            save_checkpoint(_checkpoint(run, epoch, resumable=False), run.out / "best.ckpt")
        save_checkpoint(_checkpoint(run, epoch, resumable=True), run.out / "last.ckpt")
        atomic_write(run.out / "metrics.csv", lambda tmp: _write_csv(run.rows, tmp))
        atomic_write(run.out / "curves.png", lambda tmp: plot_curves(run.rows, tmp))
    return improved


def _write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _stop_reason(run: _Run, row: dict) -> Optional[str]:
    cfg = run.cfg
    if row["val_n"] and run.bad_epochs >= cfg.patience:
        return f"no better validation score for {cfg.patience} epochs (--patience)"
    # Ranks time themselves apart: stop when any of them is out of time, all together.
    if cfg.max_minutes is not None and run.ddp.sum([float(run.elapsed >= cfg.max_minutes * 60)])[0] > 0:
        return f"{run.elapsed / 60:.2f} minutes of training (--max-minutes {cfg.max_minutes:g})"
    if cfg.stop_at_accuracy is not None and row["val_n"] > 0 and row["val_acc"] >= cfg.stop_at_accuracy:
        return f"validation accuracy {row['val_acc']:.4f} >= {cfg.stop_at_accuracy:g} (--stop-at-accuracy)"
    return None


def _count(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _epoch_line(row: dict, epochs: int, improved: bool) -> str:
    val = (f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} cer {row['val_cer']:.4f}" if row["val_n"]
           else "no validation split")
    return (f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | {val} | "
            f"{row['seconds']:.0f}s{' (best)' if improved else ''}")


def _blended(start: Dict[str, Tensor], tuned: Dict[str, Tensor], a: float) -> Dict[str, Tensor]:
    """start + a (tuned - start) for the floating-point tensors (batch-norm statistics too); the rest tuned's."""
    return {k: start[k] + a * (v - start[k]) if v.is_floating_point() else v for k, v in tuned.items()}


def _start_of(model: CRNN, tuned: Dict[str, Tensor], init: Path, cfg: TrainConfig) -> Dict[str, Tensor]:
    """The start checkpoint's weights (its head start_head picked) in `model`'s classes (classifier rows of
    symbols it lacks: tuned's)."""
    model.load_state_dict(tuned)
    init_from_checkpoint(model, init, _start_style(cfg))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


PROBE_STEPS = 0.5  # each probe run's share of the run's epochs and --min-steps: of its optimizer steps
# The blend a small set saves without a validation split: half-way, WiSE-FT's default where nothing says
# better. Over 17 runs of 25 and 100 labels (two models, five styles; docs/accuracy.md) it read 85.3% held
# out, the probe's choice 85.4% in 2.4x the time, the fine-tuned weights 82.3%, the best share of each 86.1%.
SMALL_SET_BLEND = 0.5


def _probe_share(run: _Run, init: Path, say: Callable[[str], None]) -> Optional[float]:
    """The blend share for a small set fine-tuned without a validation split (--probe), from a
    two-fold probe: two short runs (PROBE_STEPS of the run's steps each), each fine-tuned on one half
    of the labels (split by a hash of the name, as the validation split is), read the other half at
    every share of BLEND_CHOICES (greedy reads, exact); both halves' counts are pooled, and
    probe_rule picks the share from them. OUT/probe/probe.json keeps the counts (a resumed run
    reads them). None: too few images to halve."""
    cfg = run.cfg
    record = run.out / "probe" / "probe.json"
    if cfg.resume and record.is_file():
        result = json.loads(record.read_text())
    else:
        halves = split_samples(run.samples, 0.5, cfg.seed)
        if min(len(h) for h in halves) < 2:
            return None
        correct = dict.fromkeys(BLEND_CHOICES, 0)
        for i, (fit, held) in enumerate((halves, halves[::-1])):
            folder = run.out / "probe" / str(i)
            folder.mkdir(parents=True, exist_ok=True)
            manifest = folder / "labels.tsv"
            if run.ddp.main:
                atomic_write(manifest, lambda tmp: Path(tmp).write_text(
                    "".join(f"{Path(s.path).resolve()}\t{s.label}\n" for s in fit)))
            run.ddp.barrier()
            # Fewer epochs as well as fewer --min-steps: a rehearsed half is one pass per epoch already.
            probe_cfg = replace(cfg, data=str(manifest), out=str(folder), val_fraction=0.0, blend=1.0, probe=False,
                                epochs=max(1, round(cfg.epochs * PROBE_STEPS)),
                                min_steps=max(1, round(cfg.min_steps * PROBE_STEPS)), export=False, stop_after=None,
                                progress=False, resume=cfg.resume and (folder / "last.ckpt").is_file())
            tuned = load_checkpoint(train(probe_cfg))
            model = model_from_checkpoint(tuned).to(run.device)
            start = _start_of(model, tuned["model"], init, cfg)
            data = CaptchaDataset(held, run.charset, height=cfg.height, in_channels=cfg.in_channels, ink=cfg.ink,
                                  max_width=cfg.max_width, skip_bad=cfg.skip_bad)  # images and labels; reads: below
            for a in BLEND_CHOICES:
                model.load_state_dict(_blended(start, tuned["model"], a))
                correct[a] += _exact_count(model, Charset(tuned["charset"]), data, run.device, cfg.batch_size)
        result = {"images": [len(h) for h in halves], "correct": {str(a): c for a, c in correct.items()},
                  "share": probe_rule(correct)}
        if run.ddp.main:
            atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    n = sum(result["images"])
    say("probe (half the labels each, read by the other half's run): " + ", ".join(
        f"{a}: {c}/{n}" for a, c in result["correct"].items()))
    return result["share"]


def probe_rule(correct: Dict[float, int]) -> float:
    """The probe's share from its pooled counts per share: the fine-tuned weights (1) where they read
    the held-out halves at least as well as the half-way blend, else the half-way blend (1/2).
    The probes' few images cannot pick among five shares (sysu from 25 labels: 13-image halves
    chose the start model, which read 70% where every blend read 79-84%); this choice of two is
    the most they can make, and over 17 runs it read no better than half-way always
    (SMALL_SET_BLEND, the default; docs/accuracy.md)."""
    return 1.0 if correct[1.0] >= correct[0.5] else 0.5


def _exact_count(model: CRNN, charset: Charset, data: CaptchaDataset, device: torch.device, batch_size: int) -> int:
    """How many of `data`'s images the model (of `charset`'s classes) reads exactly right (greedy)."""
    batches = [range(i, min(i + batch_size, len(data))) for i in range(0, len(data), batch_size)]
    truths, reads, _ = _read(model, charset, data, batches, device)
    return score(truths, reads).correct


def _blend_with_start(run: _Run, say: Callable[[str], None]) -> None:
    """Fine-tuning: best.ckpt's weights become start + a (best - start), the weight-space ensemble of
    the start model and the fine-tuned one (Wortsman et al., WiSE-FT, 2022): a few labels pull the
    weights towards their images, and part of the way back keeps what the start model read of
    everything else. a: --blend, else the best of BLEND_CHOICES on the validation split (ties: the
    larger; 0 keeps the start model when fine-tuning only lost accuracy), else for a small set
    SMALL_SET_BLEND or, with --probe, the probe's share (1/2 or 1: probe_rule), else none. Floating-point
    tensors (batch-norm statistics too) are blended; classifier rows of symbols the start model
    lacks stay fine-tuned. best.ckpt records it ("blend"), so a finished run that is resumed is not
    blended twice; last.ckpt keeps the fine-tuned weights (--resume continues from them)."""
    init = start_weights(run.cfg)
    share, by = run.cfg.blend, "--blend"
    if init is None or share == 1.0:
        return
    best = load_checkpoint(run.out / "best.ckpt")
    if "blend" in best:
        return
    if share is None and run.val_ds is None:
        if run.cfg.data == "synthetic" or len(run.samples) >= SMALL_SET:
            return  # a large set without a validation split (--val-fraction 0): the fine-tuned weights
        probed = _probe_share(run, init, say) if run.cfg.probe else None
        share, by = (probed, "--probe") if probed is not None else (SMALL_SET_BLEND, "small set")
        if share == 1.0:
            return
    model = run.model
    tuned = {k: v.to(run.device) for k, v in best["model"].items()}
    start = _start_of(model, tuned, init, run.cfg)
    rows, how = {}, by
    if share is not None:
        a = share
    else:
        by = "validation"
        for choice in BLEND_CHOICES:
            model.load_state_dict(_blended(start, tuned, choice))
            rows[choice] = _validate(run)
        a = max(BLEND_CHOICES, key=lambda c: (_rank(rows[c]), c))
        how = "validation accuracy " + ", ".join(f"{c:g}: {r['val_acc']:.4f}" for c, r in rows.items())
    model.load_state_dict(_blended(start, tuned, a))
    if run.ddp.main:
        save_checkpoint({**best, "model": model.state_dict(),
                         "blend": {"share": a, "start": str(init), "head": run.cfg.start_head, "by": by,
                                   "val_acc": {str(c): r["val_acc"] for c, r in rows.items()}}},
                        run.out / "best.ckpt")
    say(f"saved start + {a:g} (fine-tuned - start) ({how})")


def train(config: TrainConfig, log: Optional[Callable[[str], None]] = None) -> Path:
    """Train per `config`. Returns RUN_DIR/model.pt (a TorchScript recognizer of best.ckpt's
    weights); best.ckpt with export=False; last.ckpt when stop_after ended this invocation.
    log(line), if given, receives a line per epoch and the reason for stopping (rank 0 only)."""
    cfg = config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ddp = Dist(device)
    try:
        run = _setup(cfg, ddp)
        say = log if log is not None and ddp.main else (lambda line: None)
        if run.head_note:
            say(run.head_note)
        n_val = len(run.val_ds) if run.val_ds is not None else 0
        say(f"{_describe(run.train_ds, cfg.data)}, {n_val} for validation; {_count(cfg.epochs, 'epoch')} of "
            f"{_count(run.passes, 'pass', 'passes')} = "
            f"{_count(cfg.epochs * run.passes * len(run.sampler), 'optimizer step')}"
            + ("" if n_val else "; no validation split: the last epoch's weights are the fine-tuned model "
                                "(no epoch is picked)"))
        for epoch in range(run.start_epoch, cfg.epochs):
            if cfg.stop_after is not None and epoch - run.start_epoch >= cfg.stop_after:
                ddp.barrier()
                return run.out / "last.ckpt"
            t0 = time.time()
            row = {"epoch": epoch + 1, **_train_epoch(run, epoch)}
            row.update(_validate(run) if run.val_ds is not None else {"val_loss": float("nan"), "val_acc": float("nan"),
                                                                      "val_cer": float("nan"), "val_n": 0})
            run.elapsed += time.time() - t0
            row["seconds"] = round(run.elapsed, 2)
            improved = _record(run, epoch, row)
            say(_epoch_line(row, cfg.epochs, improved and row["val_n"] > 0))  # without validation each epoch is kept
            stop = _stop_reason(run, row)
            if stop:
                say(f"stopped after epoch {epoch + 1}: {stop}")
                break
        if os.environ.get("CAPTCHA_FAST_DUMP_RANKS") == "1":  # test hook: every rank's final weights
            torch.save(run.model.state_dict(), run.out / f"rank{ddp.rank}.pt")
        ddp.barrier()
        _blend_with_start(run, say)
        ddp.barrier()
        if not cfg.export:
            return run.out / "best.ckpt"
        if ddp.main:
            save_recognizer(load_model(run.out / "best.ckpt"), run.out / "model.pt")
            if run.val_ds is not None:  # the confidence of reads, fitted on the validation split (both files)
                calibrate_file(run.out / "model.pt", run.val_ds.images, [s.label for s in run.val_ds.samples],
                               source="the validation split", prepared=True, also=[run.out / "best.ckpt"])
        ddp.barrier()
        return run.out / "model.pt"
    finally:
        ddp.close()
