"""Train a CRNN captcha reader with CTC.

    captcha-fast train DATA --out RUN_DIR        DATA: folder of LABEL.png, a .tsv manifest, or `synthetic`
    torchrun --nproc_per_node 2 -m captcha_fast.train DATA --out RUN_DIR   (DistributedDataParallel)

    from captcha_fast.train import TrainConfig, train
    model_path = train(TrainConfig(data="captchas/", out="runs/a"))

RUN_DIR gets metrics.csv, curves.png, last.ckpt (everything needed to --resume),
best.ckpt (best validation weights) and model.pt (TorchScript recognizer of the best
weights, written by captcha_fast.export when that module is present).

Determinism: the data order comes from (seed, epoch), each sample's augmentation from
(seed, epoch, index) and dropout from a generator reseeded with (seed, epoch, rank) at
the start of every epoch, so a resumed run repeats what an uninterrupted run does."""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from captcha_fast.charset import Charset
from captcha_fast.data import (AugmentConfig, BucketBatchSampler, CaptchaDataset, check_labels, collate,
                               frames_needed, list_samples, split_samples, synthetic_dataset)
from captcha_fast.export import atomic_write
from captcha_fast.model import CRNN, CRNNConfig

CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    data: str                           # folder, .tsv manifest, or "synthetic"
    out: str = "runs/train"             # run directory
    # model
    height: int = 32
    in_channels: int = 1                # 1 grey, 3 colour
    channels: Tuple[int, int] = (16, 32)
    hidden_dim: int = 128
    dropout: float = 0.1
    charset: Optional[str] = None       # default: the sorted symbols of all labels
    init_from: Optional[str] = None     # start from this checkpoint's weights (e.g. a synthetic pretraining run)
    # optimisation
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3                    # peak learning rate
    weight_decay: float = 0.01
    warmup: float = 0.15                # fraction of steps spent warming up (OneCycle)
    clip: float = 5.0                   # gradient norm clip
    patience: int = 10                  # epochs without validation improvement before stopping
    max_minutes: Optional[float] = None # stop (as early stopping) after this much training time
    stop_after: Optional[int] = None    # end this invocation after this many epochs (resume later)
    stop_at_accuracy: Optional[float] = None  # stop once validation accuracy reaches this (0-1)
    augment: bool = True
    char_warmup: int = 200              # steps of single-character pretraining before CTC (0: off)
    char_warmup_lr: float = 2e-3
    # data
    val_fraction: float = 0.15
    seed: int = 0
    skip_bad: bool = False              # skip unreadable images / bad labels with a warning
    bucket: int = 0                     # sort windows of this many batches by width (0: off)
    # synthetic data (data == "synthetic")
    synth_train: int = 20000
    synth_val: int = 1000
    synth_min_len: int = 4
    synth_max_len: int = 8
    synth_charset: str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    synth_cache: Optional[str] = None   # folder for rendered synthetic sets (reused across runs)
    # runtime
    device: str = "auto"                # auto | cpu | cuda
    threads: int = 0                    # torch CPU threads (0: torch's default; 1 is best on a busy machine)
    amp: bool = True                    # autocast on CUDA (bf16 when supported, else fp16 + GradScaler)
    resume: bool = False
    progress: bool = True
    export: bool = True                 # write model.pt (TorchScript) at the end

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey) or 3 (colour), got {self.in_channels}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------- helpers

def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def greedy_texts(log_probs: Tensor, lengths: Tensor, charset: Charset) -> List[str]:
    """Best-path decoding of (T, N, K) log-probs (argmax, merge repeats, drop blanks)."""
    best = log_probs.argmax(-1).T.cpu()  # (N, T)
    texts = []
    for row, n in zip(best.tolist(), lengths.tolist()):
        out, prev = [], 0
        for k in row[:n]:
            if k != prev and k != 0:
                out.append(k)
            prev = k
        texts.append(charset.decode(out))
    return texts


def _save_atomic(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2 ** 31)


class _Dist:
    """Rank, world size and the collectives (no-ops in one process)."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started = False
        self.device = device  # NCCL reduces CUDA tensors only
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> List[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def average_buffers(self, model: nn.Module) -> None:
        """Average the batch-norm running statistics over ranks (each rank saw its own shards;
        DDP only copies rank 0's at the next forward), so every rank holds the same model."""
        if self.world == 1:
            return
        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.started:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- data

def build_data(cfg: TrainConfig) -> Tuple[CaptchaDataset, CaptchaDataset, Charset]:
    """Train and validation sets and the charset for `cfg`."""
    aug = AugmentConfig() if cfg.augment else None
    if cfg.data == "synthetic":
        from captcha_fast.synth import SynthConfig
        charset = Charset(cfg.charset or "".join(sorted(set(cfg.synth_charset))))
        bad = charset.unknown(cfg.synth_charset)
        if bad:
            raise ValueError(f"synthetic charset has symbols outside --charset: {bad!r}")
        sc = dict(charset=cfg.synth_charset, min_len=cfg.synth_min_len, max_len=cfg.synth_max_len)
        # Validation uses another seed: no image or label sequence is shared with training.
        train_ds = _synthetic(SynthConfig(seed=cfg.seed, **sc), cfg.synth_train, charset, cfg, aug)
        val_ds = (_synthetic(SynthConfig(seed=cfg.seed + 1_000_000, **sc), cfg.synth_val, charset, cfg, None)
                  if cfg.synth_val > 0 else None)
        return train_ds, val_ds, charset
    samples = list_samples(cfg.data)
    if cfg.charset:
        charset = Charset(cfg.charset)
    else:
        charset = Charset.from_labels(s.label for s in samples)
    samples = check_labels(samples, charset, cfg.skip_bad)
    train_s, val_s = split_samples(samples, cfg.val_fraction, cfg.seed)
    if not train_s:
        raise ValueError(f"no training images left after the validation split of {cfg.data!r}")
    train_ds = CaptchaDataset(train_s, charset, cfg.height, cfg.in_channels, aug, cfg.seed, cfg.skip_bad)
    val_ds = (CaptchaDataset(val_s, charset, cfg.height, cfg.in_channels, None, cfg.seed, cfg.skip_bad)
              if val_s else None)
    return train_ds, val_ds, charset


def _synthetic(sc, n: int, charset: Charset, cfg: TrainConfig, aug) -> CaptchaDataset:
    cache = None
    if cfg.synth_cache:
        key = f"{sc.seed}_{n}_{sc.min_len}-{sc.max_len}_{sc.height}_{sc.char_width}_{cfg.height}_{cfg.in_channels}"
        key += "_" + _digest(sc.charset)
        cache = Path(cfg.synth_cache) / f"synth_{key}.pt"
        if cache.exists():
            blob = torch.load(cache, weights_only=True)
            from captcha_fast.data import Sample
            samples = [Sample(f"synthetic:{sc.seed}:{i}", t) for i, t in enumerate(blob["labels"])]
            return CaptchaDataset(samples, charset, cfg.height, cfg.in_channels, aug, cfg.seed, images=blob["images"])
    ds = synthetic_dataset(sc, n, charset, cfg.height, cfg.in_channels, aug, cfg.seed, progress=cfg.progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic({"labels": [s.label for s in ds.samples], "images": ds.images}, cache)
    return ds


def _digest(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def check_lengths(ds: CaptchaDataset, model: CRNN) -> None:
    """Every label must fit its image's frame sequence (CTC: T >= L + repeats)."""
    widths = torch.tensor([ds.width(i) for i in range(len(ds))], dtype=torch.long)
    frames = model.output_lengths(widths).tolist()
    for i, (s, t) in enumerate(zip(ds.samples, frames)):
        need = frames_needed(s.label)
        if t < need:
            raise ValueError(
                f"label {s.label!r} of {s.path!r} needs {need} CTC frames but its image gives {t} "
                f"({ds.width(i)} px wide at height {ds.height}, one frame per 4 px): use a larger --height "
                f"or wider images")


def _check_batch(batch, out_lengths: Tensor) -> None:
    for label, t in zip(batch.labels, out_lengths.tolist()):
        if t < frames_needed(label):
            raise ValueError(f"label {label!r} needs {frames_needed(label)} CTC frames but its image gives {t}: "
                             f"the image is too narrow for its label")


# ---------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig, charset: Charset) -> CRNN:
    mc = CRNNConfig(charset=charset.symbols, height=cfg.height, in_channels=cfg.in_channels,
                    channels=cfg.channels, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout)
    model = CRNN(mc)
    # Start the classifier near uniform: big random logits push CTC onto the all-blank plateau.
    nn.init.normal_(model.classifier.weight, std=0.01)
    nn.init.zeros_(model.classifier.bias)
    return model


def init_from_checkpoint(model: CRNN, path) -> List[str]:
    """Copy the weights of a training checkpoint into `model` wherever names and shapes match;
    classifier rows are copied per symbol (blank and the symbols both charsets share), so a
    model pretrained on one charset starts another. Returns the names left at their init."""
    ckpt = torch.load(_checkpoint_file(path), map_location="cpu", weights_only=True)
    src, dst = ckpt["model"], model.state_dict()
    old = {s: i + 1 for i, s in enumerate(ckpt["model_config"]["charset"])}
    rows = [(0, 0)] + [(i + 1, old[s]) for i, s in enumerate(model.config.charset) if s in old]
    skipped = []
    with torch.no_grad():
        for name, t in dst.items():
            if name.startswith("classifier.") and name in src and src[name].shape[1:] == t.shape[1:]:
                for new_row, old_row in rows:
                    t[new_row] = src[name][old_row]
            elif name in src and src[name].shape == t.shape:
                t.copy_(src[name])
            else:
                skipped.append(name)
    return skipped


def _checkpoint_file(path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "best.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def model_from_checkpoint(ckpt: dict) -> CRNN:
    model = CRNN(CRNNConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_model(path) -> CRNN:
    """The CRNN (eval mode) of a training checkpoint: RUN_DIR/best.ckpt or last.ckpt, or a run
    directory (its best.ckpt)."""
    path = _checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a foreign file
        raise ValueError(f"{str(path)!r} is not a captcha_fast training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{str(path)!r} is not a captcha_fast training checkpoint (no model/model_config)")
    return model_from_checkpoint(ckpt)


def _export(model: CRNN, path: Path) -> bool:
    try:
        from captcha_fast.export import save_recognizer
    except ImportError:
        warnings.warn("captcha_fast.export is not available: model.pt not written (best.ckpt holds the weights)")
        return False
    save_recognizer(model.eval(), path)
    return True


# ---------------------------------------------------------------------------- char warm-up

def char_warmup(net: nn.Module, model: CRNN, cfg: TrainConfig, charset: Charset, device, ddp: "_Dist") -> float:
    """Pretrain on rendered single-character captchas of `charset` with cross-entropy on the
    frame-averaged log-probs; returns the last loss.

    A fresh CRNN sits on the CTC plateau (blank everywhere, 0% read) for hundreds of steps;
    this classification signal teaches the convs and GRU to tell the symbols apart in a few
    hundred cheap steps, after which CTC aligns them within about a hundred more."""
    from captcha_fast.synth import SynthConfig
    n = min(4096, max(512, cfg.char_warmup * cfg.batch_size // 4))
    sc = SynthConfig(charset=charset.symbols, min_len=1, max_len=1, seed=cfg.seed + 2_000_000)
    ones = _synthetic(sc, n, charset, cfg, AugmentConfig() if cfg.augment else None)
    sampler = BucketBatchSampler([ones.width(i) for i in range(n)], cfg.batch_size, cfg.seed + 2_000_000,
                                 rank=ddp.rank, world=ddp.world)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.char_warmup_lr, weight_decay=cfg.weight_decay)
    net.train()
    step, loss = 0, torch.zeros(())
    torch.manual_seed(_epoch_seed(cfg.seed, 1_000_000, ddp.rank))
    while step < cfg.char_warmup:
        sampler.set_epoch(step)
        ones.set_epoch(step)
        for idx in sampler:
            b = collate([ones[i] for i in idx])
            log_probs, out_lengths = net(b.images.to(device), b.widths.to(device))
            T = log_probs.shape[0]
            mask = (torch.arange(T, device=device)[:, None] < out_lengths[None]).to(log_probs.dtype)  # (T, N)
            # Symbols only, renormalised without the blank: the warm-up teaches which symbol, and
            # leaves where (blank or not) to CTC.
            symbols = log_probs[:, :, 1:].float().log_softmax(-1)                                   # (T, N, K - 1)
            pooled = (symbols * mask[..., None]).sum(0) / out_lengths[:, None]                       # (N, K - 1)
            loss = nn.functional.cross_entropy(pooled, b.targets.to(device) - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            step += 1
            if step >= cfg.char_warmup:
                break
    return float(loss.detach())


# ---------------------------------------------------------------------------- plot

def plot_curves(rows: List[dict], path: Path) -> None:
    """Loss and accuracy curves as a PNG (PIL only)."""
    from PIL import Image, ImageDraw
    W, H, pad = 900, 360, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    panels = [("loss", [("train_loss", (31, 119, 180)), ("val_loss", (255, 127, 14))]),
              ("accuracy / 1-CER", [("train_acc", (31, 119, 180)), ("val_acc", (255, 127, 14)),
                                    ("val_char_acc", (44, 160, 44))])]
    pw = (W - 3 * pad) // 2
    epochs = [r["epoch"] for r in rows]
    for p, (title, series) in enumerate(panels):
        x0, y0, x1, y1 = pad + p * (pw + pad), pad, pad + p * (pw + pad) + pw, H - pad
        d.rectangle([x0, y0, x1, y1], outline="black")
        vals = [float(r[k]) for k, _ in series for r in rows if r.get(k) not in (None, "")]
        vals = [v for v in vals if math.isfinite(v)]
        if not vals or not epochs:
            continue
        lo, hi = (0.0, 1.0) if p == 1 else (0.0, max(vals) or 1.0)
        e0, e1 = min(epochs), max(max(epochs), min(epochs) + 1)
        d.text((x0, 8), title, fill="black")
        d.text((x0 - 30, y0), f"{hi:.3g}", fill="black")
        d.text((x0 - 30, y1 - 10), f"{lo:.3g}", fill="black")
        d.text((x1 - 40, y1 + 5), f"epoch {e1}", fill="black")
        for j, (key, colour) in enumerate(series):
            pts = [(x0 + (r["epoch"] - e0) / (e1 - e0) * pw, y1 - (float(r[key]) - lo) / (hi - lo) * (y1 - y0))
                   for r in rows if r.get(key) not in (None, "") and math.isfinite(float(r[key]))]
            pts = [(x, min(max(y, y0), y1)) for x, y in pts]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            d.text((x0 + 8, y0 + 6 + 14 * j), key, fill=colour)
    img.save(path)


# ---------------------------------------------------------------------------- train

def _evaluate(model: nn.Module, ds: CaptchaDataset, cfg: TrainConfig, device, ddp: _Dist, ctc) -> dict:
    sampler = BucketBatchSampler([ds.width(i) for i in range(len(ds))], max(cfg.batch_size * 2, ddp.world),
                                 shuffle=False, bucket=8, rank=ddp.rank, world=ddp.world)
    # Every sample must be seen once: shard leftovers (batches smaller than world) on rank 0.
    batches = list(sampler)
    seen = {i for b in sampler.batches() for i in b}
    rest = [i for i in range(len(ds)) if i not in seen]
    if rest and ddp.main:
        batches.append(rest)
    model.eval()
    n = correct = edits = chars = loss_sum = 0.0
    with torch.no_grad():
        for idx in batches:
            b = collate([ds[i] for i in idx])
            log_probs, out_lengths = model(b.images.to(device), b.widths.to(device))
            loss = ctc(log_probs.float(), b.targets.to(device), out_lengths, b.target_lengths.to(device))
            loss_sum += float(loss) * len(idx)
            for truth, pred in zip(b.labels, greedy_texts(log_probs, out_lengths, ds.charset)):
                n += 1
                correct += truth == pred
                edits += edit_distance(pred, truth)
                chars += len(truth)
    n, correct, edits, chars, loss_sum = ddp.sum([n, correct, edits, chars, loss_sum])
    return {"val_loss": loss_sum / max(n, 1), "val_acc": correct / max(n, 1), "val_cer": edits / max(chars, 1),
            "val_char_acc": 1 - edits / max(chars, 1), "val_n": int(n)}


def _better(m: dict, best: Optional[dict]) -> bool:
    if best is None:
        return True
    return (m["val_acc"], -m["val_cer"], -m["val_loss"]) > (best["val_acc"], -best["val_cer"], -best["val_loss"])


def train(config: TrainConfig) -> Path:
    """Train per `config`; returns the path of the exported recognizer (RUN_DIR/model.pt), or of
    best.ckpt when captcha_fast.export is not available."""
    cfg = config
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ddp = _Dist(device)
    if device.type == "cuda" and ddp.world > 1:
        device = ddp.device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    try:
        return _train(cfg, device, ddp)
    finally:
        ddp.close()


def _train(cfg: TrainConfig, device: torch.device, ddp: _Dist) -> Path:
    out = Path(cfg.out)
    last_path, best_path = out / "last.ckpt", out / "best.ckpt"
    state = None
    if cfg.resume:
        if not last_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint {str(last_path)!r} to resume from")
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        saved = TrainConfig.from_dict(state["config"])
        for key in ("data", "seed", "batch_size", "epochs", "lr", "height", "in_channels", "channels",
                    "hidden_dim", "val_fraction", "warmup", "bucket", "synth_train"):
            if getattr(saved, key) != getattr(cfg, key):
                raise ValueError(f"--resume: {key} is {getattr(cfg, key)!r} but the run in {str(out)!r} used "
                                 f"{getattr(saved, key)!r}")
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    train_ds, val_ds, charset = build_data(cfg)
    if state is not None and state["charset"] != charset.symbols:
        raise ValueError(f"--resume: the data gives charset {charset.symbols!r} but the run used {state['charset']!r}")
    model = build_model(cfg, charset)
    if cfg.init_from and state is None:
        skipped = init_from_checkpoint(model, cfg.init_from)
        if skipped:
            warnings.warn(f"--init-from {cfg.init_from}: kept the fresh init of {', '.join(skipped)} (shapes differ)")
    model = model.to(device)
    check_lengths(train_ds, model)
    if val_ds is not None:
        check_lengths(val_ds, model)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sampler = BucketBatchSampler([train_ds.width(i) for i in range(len(train_ds))], cfg.batch_size, cfg.seed,
                                 shuffle=True, bucket=cfg.bucket, rank=ddp.rank, world=ddp.world)
    steps = len(sampler)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps,
                                                pct_start=cfg.warmup, div_factor=20, final_div_factor=200)
    amp_dtype = None
    if cfg.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ctc = nn.CTCLoss(blank=0, reduction="mean", zero_infinity=False)

    start_epoch, rows, best, bad_epochs, elapsed = 0, [], None, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, rows = state["epoch"] + 1, list(state["metrics"])
        best, bad_epochs, elapsed = state["best"], state["bad_epochs"], state["elapsed"]
    net = model
    if ddp.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch: int, weights_only_model: bool = False) -> dict:
        return {"version": CHECKPOINT_VERSION, "config": asdict(cfg), "model_config": model.config.to_dict(),
                "charset": charset.symbols, "model": model.state_dict(), "epoch": epoch, "metrics": rows,
                "best": best, "bad_epochs": bad_epochs, "elapsed": elapsed,
                **({} if weights_only_model else {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                                  "scaler": scaler.state_dict(), "rng": _rng_state()})}

    if state is None and cfg.char_warmup > 0:
        char_warmup(net, model, cfg, charset, device, ddp)

    stopped = "epochs"
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after is not None and epoch - start_epoch >= cfg.stop_after:
            stopped = "stop_after"
            break
        t0 = time.time()
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, ddp.rank))  # dropout stream of this epoch
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        net.train()
        batches = iter(sampler)
        if cfg.progress and ddp.main:
            from tqdm import tqdm
            batches = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        loss_sum = correct = n = 0.0
        for idx in batches:
            b = collate([train_ds[i] for i in idx])
            images, widths = b.images.to(device, non_blocking=True), b.widths.to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                log_probs, out_lengths = net(images, widths)
            _check_batch(b, out_lengths)
            loss = ctc(log_probs.float(), b.targets.to(device), out_lengths, b.target_lengths.to(device))
            if not torch.isfinite(loss):
                raise RuntimeError(f"CTC loss is {float(loss)} at epoch {epoch + 1} on labels {b.labels}: "
                                   f"lower --lr or check the data")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            preds = greedy_texts(log_probs.detach(), out_lengths, charset)
            loss_sum += float(loss.detach()) * len(idx)
            correct += sum(p == t for p, t in zip(preds, b.labels))
            n += len(idx)
            if cfg.progress and ddp.main:
                batches.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}")
        ddp.average_buffers(model)
        loss_sum, correct, n = ddp.sum([loss_sum, correct, n])
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1),
               "lr": sched.get_last_lr()[0]}
        if val_ds is not None:
            row.update(_evaluate(model, val_ds, cfg, device, ddp, ctc))
        else:  # no validation split: judge by the training numbers
            row.update({"val_loss": row["train_loss"], "val_acc": row["train_acc"], "val_cer": float("nan"),
                        "val_char_acc": float("nan"), "val_n": 0})
        elapsed += time.time() - t0
        row["seconds"] = round(elapsed, 2)
        rows.append(row)
        improved = _better(row, best)
        if improved:
            best, bad_epochs = dict(row), 0
        else:
            bad_epochs += 1
        if ddp.main:
            if improved:
                _save_atomic(checkpoint(epoch, weights_only_model=True), best_path)
            _save_atomic(checkpoint(epoch), last_path)
            _write_metrics(rows, out)
            if cfg.progress:
                from tqdm import tqdm
                tqdm.write(f"epoch {epoch + 1}: loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                           f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} cer {row['val_cer']:.4f} "
                           f"| {row['seconds']:.0f}s")
        if bad_epochs >= cfg.patience:
            stopped = "early_stop"
            break
        # Ranks time themselves apart: stop when any of them is out of time, all together.
        if cfg.max_minutes is not None and ddp.sum([float(elapsed >= cfg.max_minutes * 60)])[0] > 0:
            stopped = "max_minutes"
            break
        if cfg.stop_at_accuracy is not None and val_ds is not None and row["val_acc"] >= cfg.stop_at_accuracy:
            stopped = "accuracy"
            break
    if os.environ.get("CAPTCHA_FAST_DUMP_RANKS") == "1":  # test hook: every rank's final weights
        _save_atomic(model.state_dict(), out / f"rank{ddp.rank}.pt")
    ddp.barrier()
    if stopped == "stop_after":
        return last_path
    result = best_path
    if ddp.main and cfg.export and best_path.exists():
        best_model = model_from_checkpoint(torch.load(best_path, map_location="cpu", weights_only=True))
        if _export(best_model, out / "model.pt"):
            result = out / "model.pt"
    ddp.barrier()
    return result if ddp.main or result == best_path else out / "model.pt"


def _write_metrics(rows: List[dict], out: Path) -> None:
    keys = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_cer", "val_char_acc", "val_n", "lr",
            "seconds"]
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "metrics.csv")
    plot_curves(rows, out / "curves.png")


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = parser.description or (
        "Train a CRNN captcha reader with CTC. DATA is a folder of LABEL.png / LABEL_x.png files, a .tsv "
        "manifest (path<TAB>label), or `synthetic`. Example: captcha-fast train captchas/ --out runs/a   "
        "(multi-process: torchrun --nproc_per_node 2 -m captcha_fast.train captchas/ --out runs/a)")
    d = TrainConfig(data="")
    a = parser.add_argument
    a("data", help="folder of labelled images, a .tsv manifest, or `synthetic`")
    a("--out", required=True, help="run directory (metrics.csv, curves.png, checkpoints, model.pt)")
    a("--epochs", type=int, default=d.epochs)
    a("--batch-size", type=int, default=d.batch_size, help="global batch size (split over torchrun ranks)")
    a("--lr", type=float, default=d.lr, help="peak learning rate (OneCycle)")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--warmup", type=float, default=d.warmup, help="fraction of steps spent warming up")
    a("--clip", type=float, default=d.clip, help="gradient norm clip")
    a("--patience", type=int, default=d.patience, help="epochs without validation improvement before stopping")
    a("--max-minutes", type=float, default=None, help="stop after this much training time")
    a("--stop-at-accuracy", type=float, default=None, help="stop once validation accuracy reaches this (0-1)")
    a("--height", type=int, default=d.height, help="model input height (a multiple of 4)")
    a("--color", action="store_true", help="colour (RGB) input instead of grey")
    a("--channels", type=int, nargs=2, default=list(d.channels), metavar=("C1", "C2"), help="conv block widths")
    a("--hidden", type=int, default=d.hidden_dim, help="GRU size")
    a("--dropout", type=float, default=d.dropout)
    a("--init-from", default=None, help="start from the weights of this checkpoint (RUN_DIR or .ckpt)")
    a("--charset", default=None, help="symbols, in class order (default: sorted symbols of the labels)")
    a("--val-fraction", type=float, default=d.val_fraction)
    a("--seed", type=int, default=d.seed)
    a("--bucket", type=int, default=d.bucket, help="sort windows of this many batches by width (variable widths)")
    a("--no-augment", action="store_true")
    a("--char-warmup", type=int, default=d.char_warmup,
      help="steps of single-character pretraining on rendered captchas of the charset before CTC (0: off)")
    a("--skip-bad", action="store_true", help="skip unreadable images and labels outside the charset, with a warning")
    a("--synth-train", type=int, default=d.synth_train, help="synthetic: training images")
    a("--synth-val", type=int, default=d.synth_val, help="synthetic: validation images (another seed)")
    a("--synth-min-len", type=int, default=d.synth_min_len)
    a("--synth-max-len", type=int, default=d.synth_max_len)
    a("--synth-charset", default=d.synth_charset)
    a("--synth-cache", default=None, help="folder to keep rendered synthetic sets in")
    a("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    a("--no-amp", action="store_true", help="no autocast on CUDA")
    a("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    a("--resume", action="store_true", help="continue the run in --out from its last.ckpt")
    a("--quiet", action="store_true", help="no progress bar")


def config_from_args(args) -> TrainConfig:
    return TrainConfig(
        data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, clip=args.clip, patience=args.patience,
        max_minutes=args.max_minutes, stop_at_accuracy=args.stop_at_accuracy, height=args.height, in_channels=3 if args.color else 1,
        channels=tuple(args.channels), hidden_dim=args.hidden, dropout=args.dropout, charset=args.charset, init_from=args.init_from,
        val_fraction=args.val_fraction, seed=args.seed, bucket=args.bucket, augment=not args.no_augment, char_warmup=args.char_warmup,
        skip_bad=args.skip_bad, synth_train=args.synth_train, synth_val=args.synth_val,
        synth_min_len=args.synth_min_len, synth_max_len=args.synth_max_len, synth_charset=args.synth_charset,
        synth_cache=args.synth_cache, device=args.device, threads=args.threads, amp=not args.no_amp, resume=args.resume,
        progress=not args.quiet)


def run(args) -> None:
    t0 = time.time()
    path = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        rows = list(csv.DictReader(open(Path(args.out) / "metrics.csv")))
        best = max(rows, key=lambda r: (float(r["val_acc"]), -float(r["val_loss"])))
        print(f"best epoch {best['epoch']}: val acc {float(best['val_acc']):.4f} cer {float(best['val_cer']):.4f}; "
              f"{len(rows)} epochs in {time.time() - t0:.0f}s; model: {path}")


def main(argv=None) -> int:
    """`python -m captcha_fast.train` (as torchrun needs): the `captcha-fast train` command."""
    from captcha_fast.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
