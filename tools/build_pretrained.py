"""Build the shipped model, captcha_fast/pretrained/default.pt (+ default.ckpt, its training weights,
where `captcha-fast train` starts fine-tuning, and MODEL_CARD.md): a long, resumable run on one core.

    python tools/real_sets.py --repos CLONES --out ../shared/data/real         # once: the real sets
    apt-get install -y --no-install-recommends $(python -c \
        "from captcha_fast import synth; print(*synth.DEBIAN_FONT_PACKAGES)")    # once a machine: the fonts
    nohup python tools/build_pretrained.py --data ../shared/data --real ../shared/data/real \\
        --out runs/build --hours 8 --threads 1 > runs/build.log 2>&1 &
    python tools/build_pretrained.py ... --out runs/build --hours 8             # continue (same command)
    python tools/google_fonts.py --out ../shared/fonts/google                  # once: Google Fonts for
    python tools/build_pretrained.py ... --fonts ../shared/fonts/google         #   the synthetic styles
    python tools/build_pretrained.py ... --out runs/build --hours 0 --install   # ship the best so far
    python tools/build_pretrained.py mean soup.pt 0.7:A.ckpt 0.3:B.ckpt --data ../shared/data --real ...
                                                    # score a weighted mean of checkpoints (score_mean)

Rounds. Each round is one `captcha_fast.train` run (a OneCycle schedule over --epochs-per-round
epochs) on a fresh manifest of --round-images images, starting from the previous round's weights
(the first from --init-from, default the shipped default.ckpt, or --from-scratch), so the learning
rate restarts each round and anneals before each evaluation. A round's manifest mixes (--shares):
  synth    fresh synthetic captchas (synth.SynthConfig(style="mix"), 0-9a-zA-Z, 3-8 long, seed 1;
           round k renders its own indices of that stream, so no two rounds share an image)
  pkg      fresh renders of the `captcha` package exactly as the held-out sets draw it (synth.render_package,
           its own font, at 160x60 / 200x50 / 280x90; 0-9a-zA-Z, 4-6 long; seed 2, a stream like synth's),
           where the mix's captcha_pkg style also varies size and font and adds effects; default share 0
  real     the train splits of the real sets prepared by tools/real_sets.py (those not `unseen`), equally
  varlen   the train split of ../shared/data/varlen_upper (data.split_samples: 15%, seed 0)
  v2       the train split of ../shared/data/captcha_images_v2 (same rule)
  blank    images with no text (uniform, gradient, noise, lines) labelled ""
The synthetic styles draw from the fonts of the Debian packages of synth.DEBIAN_FONT_PACKAGES found
here, and with --fonts DIR also from the Google Fonts families tools/google_fonts.py installed in DIR
(one group per family); a build refuses to go on without a package or the families its rounds rendered
with (a fresh machine has none of them).
Each fixed source is read as an endless stream of seeded shuffles, so successive rounds walk through
all of it. Labels are case-folded: the charset is 0-9a-z.

Held-out evaluation after each round (images never trained on; case ignored): the validation splits
of v2, varlen and every real set, the `captcha` package at 160x60 / 200x50 / 280x90 (render seed
12345, as tools/accuracy_table.py), images with no text (uniform, gradient, noise; another seed)
which must read "", and the unseen real sets (whole, never trained on). What is scored after round k
is the average of the weights of rounds k-K+1..k (--average K, default 5; fewer while fewer rounds of
this model are in OUT): consecutive rounds lie in one basin (each starts from the last one's
weights and anneals), and their mean reads better than any one of them (measured on rounds 9-15 of
the GRU-192 build: score 0.894 against 0.876-0.887 per round, unseen 61.0% against 56.3-60.7%). The
next round still starts from round k's own weights. The score is the mean accuracy over all of these
but the unseen sets (kept clean as the unseen-style check); the best is kept in OUT/best/. A row per
round goes to OUT/build_log.csv; --install copies OUT/best into captcha_fast/pretrained/ (or
--install-dir), the log into docs/build_log.csv, plots docs/build_curve.png, writes the model card, fits
the confidence (docs/reliability.*) and remeasures the rest of docs/accuracy.md that depends on the
model (the table with 0/O and 1/I/l merged, printed; the error galleries): one command per install.

Hours. The budget and the curve count training hours as the CPU time (time.process_time) of the
train() calls, setup and per-epoch bookkeeping included; rendering and held-out evaluation are
counted apart (render_hours, eval_hours in the log: this run's totals). CPU time, not wall time: it does not run while
the process is paused (SIGSTOP) or waiting for a busy core, and with --threads 1 it is the single
core's working time. A round starts only if the budget left covers the previous round's hours.

Run a long build from a checkout nobody edits (`git worktree add ../build HEAD`, the compiled
captcha_fast/_C*.so copied in, --out outside it): each round scripts the model from the package's source
files, and TorchScript reads them again then, so an edit under a running build breaks its next export.

Stopping and continuing. Kill it any time: a round resumes from its last finished epoch (train's
--resume), finished rounds are kept, and the hours of a killed epoch are not counted (nor kept).
OUT/ is lost across sessions: a new OUT starts from the shipped default.ckpt, whose "build" entry
holds the hours and round it was trained to, and from docs/build_log.csv, so the curve goes on. A
build may also start from a round of another (--init-from OUT/round_K/last.ckpt, e.g. to widen it with
--hidden): it continues that round's lineage from the build.json beside it and OUT's log."""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import string
import subprocess
import sys
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import captcha_fast  # noqa: E402
from captcha_fast import synth  # noqa: E402
from captcha_fast.checkpoint import (  # noqa: E402
    PRETRAINED_CHECKPOINT, checkpoint_config, load_checkpoint, load_model, model_from_checkpoint, save_checkpoint,
    with_half_weights)
from captcha_fast.data import list_samples, read_manifest, split_samples  # noqa: E402
from captcha_fast.export import save_recognizer  # noqa: E402
from captcha_fast.files import atomic_write  # noqa: E402
from captcha_fast.preprocess import load_image  # noqa: E402
from captcha_fast.train import FREEZABLE, GENERAL_HEAD, TrainConfig, train  # noqa: E402

import accuracy_table  # noqa: E402
import google_fonts  # noqa: E402
import real_sets  # noqa: E402

CHARSET = string.digits + string.ascii_lowercase
SYNTH_SEED = 1  # evaluation renders use 12345 (tools/accuracy_table.py)
SYNTH_LENGTHS = (3, 8)
PKG_SEED, PKG_LENGTHS = 2, (4, 6)  # the pkg group's stream (the held-out package renders: seed 12345, 4-6 long)
DEFAULT_SHARES = "synth=0.56,real=0.20,varlen=0.14,v2=0.06,blank=0.04"
LOG_NAME = "build_log.csv"
GOOGLE_FONTS_LIST = "google_fonts.tsv"  # in OUT and, when installed, docs/: the families a build rendered with
ROUND_BUILD = "build.json"  # a round's build entry, beside its last.ckpt
LOG_KEYS = ["run", "round", "hours", "round_hours", "render_hours", "eval_hours", "images", "averaged", "score",
            "unseen"]


# ---------------------------------------------------------------------------- data

def blank(rng: random.Random, lines: bool = True) -> Image.Image:
    """An image with no text: a uniform or gradient background, maybe noise, maybe (lines) lines."""
    w, h = rng.randint(80, 400), rng.randint(30, 100)
    c0, c1 = (np.array([rng.randint(0, 255) for _ in range(3)], float) for _ in range(2))
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    a = c0 + (c1 - c0) * t if rng.random() < 0.6 else c0 + 0 * t
    a = np.broadcast_to(a, (h, w, 3)).copy()
    if rng.random() < 0.4:
        a += np.random.default_rng(rng.randint(0, 2 ** 31)).normal(0, rng.uniform(3, 30), a.shape)
    image = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.choice([0, 0, 1, 2, 4]) if lines else 0):
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        draw.line([(rng.randint(0, w), rng.randint(0, h)), (rng.randint(0, w), rng.randint(0, h))], colour,
                  rng.randint(1, 2))
    return image


def font_packages() -> list:
    """The Debian font packages of synth.DEBIAN_FONT_PACKAGES installed here (the synthetic styles draw from them)."""
    return [p for p in synth.DEBIAN_FONT_PACKAGES if Path("/usr/share/doc", p).is_dir()]


def missing_fonts(state: dict) -> list:
    """The font packages this build's lineage rendered with that are not installed here: its next
    rounds would silently draw other fonts (one machine had lost 33 of 35 between sessions)."""
    here = set(font_packages())
    return [p for p in state["font_packages"] if p not in here]


def installed_families(folder: Path) -> list:
    """The families of a tools/google_fonts.py install (its fonts.tsv rows: family, package, version,
    category, licence, files)."""
    tsv = folder / "fonts.tsv"
    if not tsv.is_file():
        raise SystemExit(f"build_pretrained: --fonts {folder} has no fonts.tsv: install it with "
                         f"python tools/google_fonts.py --out {folder}")
    return google_fonts.read_list(tsv)


def use_google_fonts(out: Path, state: dict, folder: Path | None) -> None:
    """Record --fonts in the state (a lineage adds Google Fonts once, then renders with exactly those
    families), or refuse to go on where its rounds rendered with families not given here: they would
    silently draw other fonts. OUT/google_fonts.tsv keeps the list (tools/google_fonts.py --from it)."""
    recorded = state.get("google_fonts", {}).get("families")  # an OUT from before --fonts has no entry
    here = installed_families(folder) if folder else None
    if recorded and here != recorded:
        raise SystemExit(f"build_pretrained: this build rendered with {len(recorded)} Google Fonts "
                         f"families{' that --fonts ' + str(folder) + ' does not match' if folder else ''}: pass "
                         f"--fonts DIR, installed by python tools/google_fonts.py --out DIR --from "
                         f"{out / GOOGLE_FONTS_LIST}")
    if here is not None:
        state["google_fonts"] = {"folder": str(folder.resolve()), "families": here}
        google_fonts.write_list(here, out / GOOGLE_FONTS_LIST)


def synth_config(font_folder: str | None = None) -> synth.SynthConfig:
    dirs = tuple(d for d in synth.DEBIAN_FONT_DIRS if Path(d).is_dir()) + ((font_folder,) if font_folder else ())
    return synth.SynthConfig(style="mix", charset=synth.DIGITS_LETTERS, min_len=SYNTH_LENGTHS[0],
                             max_len=SYNTH_LENGTHS[1], seed=SYNTH_SEED, font_dirs=dirs)


def save_png(image: Image.Image, path: Path) -> None:
    """Whole or not at all: a build killed mid-write leaves no truncated image to train on."""
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


def render_chunk(folder: Path, start: int, n: int, n_blank: int, round_no: int, font_folder: str | None = None):
    """Synthetic items start..start+n-1 of the seed-1 stream and n_blank images with no text, as PNG
    files in folder: ((path, label) rows, Counter of synthetic styles, Counter of effects)."""
    folder.mkdir(parents=True, exist_ok=True)
    captchas = synth.SyntheticCaptchas(synth_config(font_folder), 10 ** 9)
    rows, styles, effects = [], Counter(), Counter()
    for i in range(start, start + n):
        path = folder / f"s{i:09d}.png"
        if not path.exists():
            save_png(captchas[i][0], path)
        rows.append((str(path), captchas.label(i).lower()))
        styles[captchas.style(i)] += 1
        effects.update(captchas.effects(i))
    for i in range(n_blank):
        path = folder / f"b{round_no:04d}_{i:05d}.png"
        if not path.exists():
            save_png(blank(random.Random(f"blank:{round_no}:{i}")), path)
        rows.append((str(path), ""))
    return rows, styles, effects


def render_package_chunk(folder: Path, start: int, n: int, extra: str = "") -> list:
    """Items start..start+n-1 of the pkg stream as PNG files in folder: (path, label) rows.
    extra: symbols added to the 0-9a-zA-Z draw (--pkg-extra), each occurrence one more chance."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet, rows = synth.DIGITS_LETTERS + extra, []
    for i in range(start, start + n):
        path = folder / f"p{i:09d}.png"
        if path.exists():  # rendered by an earlier run: only its label is drawn again
            text = synth.package_text(PKG_SEED, i, alphabet, PKG_LENGTHS)[0]
        else:
            image, text = synth.package_captcha(PKG_SEED, i, alphabet=alphabet, lengths=PKG_LENGTHS)
            save_png(image, path)
        rows.append((str(path), text.lower()))
    return rows


def stream_slice(rows: list, start: int, count: int, name: str) -> list:
    """Items start..start+count-1 of the endless stream of seeded shuffles of `rows` (pass p is
    shuffled by (name, p)), so successive slices walk through all of them."""
    out, n = [], len(rows)
    for j in range(start, start + count):
        p, i = divmod(j, n)
        if i == 0 or not out:
            order = list(range(n))
            random.Random(f"{name}:{p}").shuffle(order)
        out.append(rows[order[i]])
    return out


def fixed_sources(data: Path, real: Path | None) -> dict:
    """name -> (share group, [(path, label)]): the shared train splits and the real train manifests."""
    sources = {}
    for name, folder in (("v2", "captcha_images_v2"), ("varlen", "varlen_upper")):
        train_s, _ = split_samples(list_samples(data / folder), 0.15, 0)
        sources[name] = (name, [(str(Path(s.path).resolve()), s.label.lower()) for s in train_s])
    for r in real_sets.load_sets(real) if real else []:
        if not r["unseen"]:
            sources[r["name"]] = ("real", [(str(Path(s.path).resolve()), s.label) for s in read_manifest(r["train_tsv"])])
    return sources


def parse_shares(spec: str) -> dict:
    shares = {k: float(v) for k, v in (item.split("=") for item in spec.split(","))}
    unknown = set(shares) - {"synth", "pkg", "real", "varlen", "v2", "blank"}
    if unknown or abs(sum(shares.values()) - 1) > 1e-6:
        raise SystemExit(f"--shares {spec!r}: groups synth, pkg, real, varlen, v2, blank summing to 1")
    return shares


def round_counts(shares: dict, sources: dict, n: int) -> dict:
    """Images per source in a round of n: each group's share, a group split equally over its sources."""
    counts = {"synth": round(shares.get("synth", 0) * n), "blank": round(shares.get("blank", 0) * n)}
    if shares.get("pkg"):
        counts["pkg"] = round(shares["pkg"] * n)
    for group in ("real", "varlen", "v2"):
        members = [name for name, (g, _) in sources.items() if g == group]
        for name in members:
            counts[name] = round(shares.get(group, 0) * n / len(members))
    return counts


# ---------------------------------------------------------------------------- held-out sets

def held_out_sets(data: Path, real: Path | None, n: int) -> dict:
    """name -> (images, labels, selects): what every round is scored on (see the module doc)."""
    sets = {}
    for name, folder in (("v2", "captcha_images_v2"), ("varlen", "varlen_upper")):
        sets[name] = (*accuracy_table.folder_val(str(data / folder), n), True)
    for w, h in accuracy_table.PACKAGE_SIZES:
        sets[f"pkg_{w}x{h}"] = (*accuracy_table.package_renders(w, h, n), True)
    for r in real_sets.load_sets(real) if real else []:
        items = real_sets.manifest_sample(r["all_tsv"] if r["unseen"] else r["val_tsv"], n)  # unseen: the whole set
        key = f"unseen_{r['name']}" if r["unseen"] else r["name"]
        sets[key] = ([load_image(path) for path, _ in items], [label for _, label in items], not r["unseen"])
    sets["blank"] = ([blank(random.Random(f"blank-eval:{i}"), lines=False) for i in range(n)], [""] * n, True)
    return sets


def evaluate(model_path: Path, sets: dict) -> dict:
    """Case-insensitive accuracy per set, the selection score and the unseen mean."""
    acc = {}
    for name, (images, labels, _) in sets.items():
        reads = captcha_fast.predict_batch(images, str(model_path), device="cpu", threads=1)
        acc[name] = sum(r.lower() == t.lower() for r, t in zip(reads, labels)) / len(labels)
    chosen = [acc[k] for k, (_, _, selects) in sets.items() if selects]
    unseen = [acc[k] for k, (_, _, selects) in sets.items() if not selects]
    acc["score"] = sum(chosen) / len(chosen)
    acc["unseen"] = sum(unseen) / len(unseen) if unseen else float("nan")
    return acc


# ---------------------------------------------------------------------------- state and log

def read_log(path: Path) -> list:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_log(path: Path, rows: list) -> None:
    keys = LOG_KEYS + sorted({k for r in rows for k in r} - set(LOG_KEYS))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def lineage(init, ckpt, log: Path) -> tuple:
    """The build entry of the checkpoint a build starts from and the log its curve continues. A shipped or best
    checkpoint carries its entry (the log: docs/build_log.csv, `log`); a round's last.ckpt has it in build.json beside
    it, and its build's log is in the OUT above (so a build grown from another's round continues its hours and
    its data streams instead of starting over at 0 h). ckpt: init's loaded checkpoint."""
    if init is None:
        return {}, log
    build = ckpt.get("build", {})
    if not build and (init.parent / ROUND_BUILD).is_file():
        return json.loads((init.parent / ROUND_BUILD).read_text()), init.parent.parent / LOG_NAME
    return build, log


def grown(ckpt, args) -> str:
    """", grown from channels A/B, GRU H to ..." when --channels/--hidden/--res-blocks grow the start
    checkpoint, else ""."""
    if ckpt is None:
        return ""
    cfg = checkpoint_config(ckpt)
    old = (cfg.channels, cfg.hidden_dim, cfg.res_blocks)
    new = (tuple(args.channels or old[0]), args.hidden or old[1],
           old[2] if args.res_blocks is None else args.res_blocks)

    def size(c, h, r):
        return f"channels {c[0]}/{c[1]}, GRU {h}" + (f", {r} residual block{'s' * (r > 1)}" if r else "")
    how = ["model.widen"] * (new[:2] != old[:2]) + ["new residual blocks start as the identity"] * (new[2] > old[2])
    return "" if new == old else f", grown from {size(*old)} to {size(*new)} ({'; '.join(how)})"


def load_state(out: Path, args) -> dict:
    """OUT/state.json, or a fresh state continuing the checkpoint the build starts from."""
    path = out / "state.json"
    if path.is_file():
        return json.loads(path.read_text())
    init = None if args.from_scratch else Path(args.init_from).resolve()
    ckpt = load_checkpoint(init) if init else None
    build, log = lineage(init, ckpt, Path(args.log))
    # The curve is the lineage of the starting checkpoint: rounds of its run after it were not kept.
    history = [r for r in read_log(log)
               if not (r["run"] == build.get("run") and int(r["round"]) > int(build.get("round", 0)))]
    started = list(build.get("started_from", [])) + [f"{describe(init)}{grown(ckpt, args)} (at "
                                                     f"{float(build.get('hours', 0.0)):.2f} h)"]
    state = {"run": time.strftime("%Y%m%d-%H%M%S"), "init": str(init) if init else None, "started_from": started,
             "font_packages": sorted({*build.get("font_packages", []), *font_packages()}),
             "google_fonts": {"folder": None, "families": build.get("google_fonts", [])},  # folder: --fonts
             "hours": float(build.get("hours", 0.0)), "next_round": int(build.get("round", 0)) + 1,
             "synth_next": int(build.get("synth_next", 0)), "draws": dict(build.get("draws", {})),
             "synth_styles": dict(build.get("synth_styles", {})), "synth_effects": dict(build.get("synth_effects", {})),
             "offsets": dict(build.get("offsets", {})), "pkg_extra": build.get("pkg_extra", ""),
             "render_hours": 0.0, "eval_hours": 0.0, "start_scored": init is None or bool(build),  # built: in the log
             # a round is installed only if it beats the start
             "best": {"round": build["round"], "score": build["accuracy"]["score"], "start": True} if build else None}
    out.mkdir(parents=True, exist_ok=True)
    write_log(out / LOG_NAME, history)  # the committed history, continued by this run
    save_state(out, state)
    return state


def describe(init: Path | None) -> str:
    """Where a run starts, for the card: the shipped checkpoint of a commit, another file, or random weights."""
    if init is None:
        return "random weights"
    if init == PRETRAINED_CHECKPOINT.resolve():
        commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", str(init)],
                                capture_output=True, text=True).stdout.strip()
        return f"the shipped captcha_fast/pretrained/default.ckpt of commit {commit or '(uncommitted)'}"
    return str(init.relative_to(ROOT)) if init.is_relative_to(ROOT) else str(init)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def save_state(out: Path, state: dict) -> None:
    write_json(out / "state.json", state)


# ---------------------------------------------------------------------------- rounds

def prepare_round(out: Path, state: dict, sources: dict, shares: dict, args) -> Path:
    """Write round k's manifest (rendering its synthetic chunk) once; its plan goes into the state."""
    k = state["next_round"]
    folder = out / f"round_{k:04d}"
    plan_path = folder / "plan.json"
    if plan_path.is_file():
        return folder
    t0 = time.process_time()
    counts = round_counts(shares, sources, args.round_images)
    rows, styles, effects = render_chunk(out / "synth" / f"round_{k:04d}", state["synth_next"], counts["synth"],
                                counts["blank"], k, state.get("google_fonts", {}).get("folder"))
    # the pkg stream renders indices 0.. in order, so its next index is how many were drawn
    rows += render_package_chunk(out / "synth" / f"round_{k:04d}", state["draws"].get("pkg", 0), counts.get("pkg", 0),
                                 state["pkg_extra"])
    for name, (_, source_rows) in sources.items():
        start = state["offsets"].get(name, 0)
        rows += stream_slice(source_rows, start, counts[name], name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("".join(f"{p}\t{label}\n" for p, label in rows))
    plan = {"counts": counts, "synth_start": state["synth_next"], "styles": dict(styles), "effects": dict(effects),
            "pkg_extra": state["pkg_extra"], "teacher": state.get("teacher"),
            "render_hours": (time.process_time() - t0) / 3600}
    plan_path.write_text(json.dumps(plan, indent=1))
    return folder


def train_round(folder: Path, init: str | None, args, teacher: dict | None = None) -> float:
    """Train (or resume) round `folder`; returns the training hours of its kept epochs."""
    hours_file = folder / "hours.json"
    done = json.loads(hours_file.read_text()) if hours_file.is_file() else {}  # epoch -> hours so far
    resume = (folder / "last.ckpt").is_file()
    base = done.get(str(load_checkpoint(folder / "last.ckpt")["epoch"] + 1), 0.0) if resume else 0.0
    t0 = time.process_time()

    def on_epoch(line: str) -> None:
        print(f"  {folder.name}: {line}", flush=True)
        if line.startswith("epoch "):
            epoch = line.split()[1].split("/")[0]
            done[epoch] = base + (time.process_time() - t0) / 3600
            hours_file.write_text(json.dumps(done))

    cfg = TrainConfig(data=str(folder / "train.tsv"), out=str(folder), charset=CHARSET, epochs=args.epochs_per_round,
                      init_from=init, from_scratch=init is None, start_head=None if init is None else GENERAL_HEAD,
                      val_fraction=0.0, bucket=16, skip_bad=True, threads=args.threads, progress=False,
                      export=False, resume=resume, lr=args.lr, batch_size=args.batch_size, patience=args.epochs_per_round + 1,
                      channels=args.channels and tuple(args.channels), hidden_dim=args.hidden,
                      res_blocks=args.res_blocks, join=args.join, freeze=tuple(args.freeze or ()),
                      **({"teacher": teacher["path"], "teacher_on": teacher["on"], "teacher_weight": teacher["weight"]}
                         if teacher else {}))
    if "min_steps" in {f.name for f in fields(TrainConfig)}:
        cfg.min_steps = 0  # a round is one pass per epoch (train.py's small-set floor is for a user's few images)
    train(cfg, log=on_epoch)
    return done[str(args.epochs_per_round)]


def score_checkpoint(ckpt: dict, model_pt: Path, sets: dict, state: dict) -> dict:
    """Export the loaded checkpoint `ckpt` as the recognizer `model_pt` and score it on the held-out sets (eval
    hours counted)."""
    t0 = time.process_time()
    model_pt.parent.mkdir(parents=True, exist_ok=True)
    save_recognizer(model_from_checkpoint(ckpt), model_pt)
    acc = evaluate(model_pt, sets)
    state["eval_hours"] += (time.process_time() - t0) / 3600
    return acc


def score_start(out: Path, state: dict, sets: dict) -> None:
    """Round 0: the checkpoint a new OUT starts from, scored once, so the curve has its starting point."""
    acc = score_checkpoint(load_checkpoint(state["init"]), out / "round_0000" / "model.pt", sets, state)
    row = {"run": state["run"], "round": state["next_round"] - 1, "hours": f"{state['hours']:.4f}",
           "round_hours": "0", "render_hours": "0", "eval_hours": f"{state['eval_hours']:.4f}", "images": 0,
           **{name: f"{v:.4f}" for name, v in acc.items()}}
    write_log(out / LOG_NAME, read_log(out / LOG_NAME) + [row])
    state["start_scored"] = True
    state["best"] = {"round": row["round"], "score": acc["score"], "start": True}
    save_state(out, state)
    print(f"start ({state['init']}): score {acc['score']:.4f}, unseen {acc['unseen']:.4f}", flush=True)


def average_rounds(out: Path, k: int, n: int) -> tuple:
    """(checkpoint, rounds): round k's last.ckpt with its weights replaced by the mean over rounds
    k-n+1..k of OUT that hold a last.ckpt of the same model config (checkpoint_config; round k at least).
    Floating-point tensors, BatchNorm's running statistics among them, are averaged in float64; counters are
    round k's."""
    ckpt = load_checkpoint(out / f"round_{k:04d}" / "last.ckpt")
    states = [ckpt["model"]]
    for j in range(k - 1, k - n, -1):
        path = out / f"round_{j:04d}" / "last.ckpt"
        if not path.is_file():
            break
        other = load_checkpoint(path)
        if checkpoint_config(other) != checkpoint_config(ckpt):
            break
        states.append(other["model"])
    return {**ckpt, "model": mean_weights(states, [1.0] * len(states))}, len(states)


def mean_weights(states: list, weights: list) -> dict:
    """The weighted mean of state dicts of one model config: floating-point tensors (BatchNorm's running
    statistics among them) in float64, the rest (counters) from the first."""
    total = sum(weights)
    return {name: (sum(w * s[name].double() for w, s in zip(weights, states)) / total).to(t.dtype)
            if t.is_floating_point() else t for name, t in states[0].items()}


def score_mean(argv=None) -> dict:
    """`python tools/build_pretrained.py mean OUT.pt W:CKPT ... --data DATA [--real REAL]`: export the weighted
    mean of checkpoints (e.g. of two runs from one start: a "soup") as a recognizer and score it as a round is
    scored; prints the accuracies as JSON."""
    p = argparse.ArgumentParser(prog="build_pretrained.py mean", description=score_mean.__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("parts", nargs="+", metavar="W:CKPT", help="weight and checkpoint (weights are normalised)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--real", type=Path, default=None)
    p.add_argument("--eval-n", type=int, default=300)
    args = p.parse_args(argv)
    weights, ckpts = zip(*((float(w), load_checkpoint(c)) for w, c in (x.split(":", 1) for x in args.parts)))
    if any(checkpoint_config(c) != checkpoint_config(ckpts[0]) for c in ckpts[1:]):
        raise SystemExit("build_pretrained.py mean: the checkpoints hold different model configs")
    save_recognizer(model_from_checkpoint({**ckpts[0], "model": mean_weights([c["model"] for c in ckpts],
                                                                             weights)}), args.out)
    acc = evaluate(args.out, held_out_sets(args.data, args.real, args.eval_n))
    print(json.dumps({"model": str(args.out), "parts": args.parts, **{k: round(v, 4) for k, v in acc.items()}}))
    return acc


def finish_round(out: Path, folder: Path, state: dict, hours: float, sets: dict, average: int) -> dict:
    """Score the average of the last `average` rounds' weights, append the log row, keep it in OUT/best if it is
    the best."""
    plan = json.loads((folder / "plan.json").read_text())
    model_pt = folder / "model.pt"
    k = state["next_round"]
    ckpt, averaged = average_rounds(out, k, average)
    acc = score_checkpoint(ckpt, model_pt, sets, state)
    state["hours"] += hours
    state["render_hours"] += plan["render_hours"]
    state["synth_next"] = plan["synth_start"] + plan["counts"]["synth"]
    for name, n in plan["counts"].items():
        state["draws"][name] = state["draws"].get(name, 0) + n
        if name not in ("synth", "pkg", "blank"):
            state["offsets"][name] = state["offsets"].get(name, 0) + n
    for key in ("styles", "effects"):
        for name, n in plan[key].items():
            state[f"synth_{key}"][name] = state[f"synth_{key}"].get(name, 0) + n
    row = {"run": state["run"], "round": k, "hours": f"{state['hours']:.4f}", "round_hours": f"{hours:.4f}",
           "render_hours": f"{state['render_hours']:.4f}", "eval_hours": f"{state['eval_hours']:.4f}",
           "images": sum(plan["counts"].values()) * int(ckpt["epoch"] + 1), "averaged": averaged,
           **{name: f"{v:.4f}" for name, v in acc.items()}}
    log = read_log(out / LOG_NAME) + [row]
    write_log(out / LOG_NAME, log)
    write_json(folder / ROUND_BUILD, build_entry(state, row))
    if state["best"] is None or acc["score"] > state["best"]["score"]:
        best = out / "best"
        best.mkdir(exist_ok=True)
        shutil.copy(model_pt, best / "default.pt")
        keep = {key: ckpt[key] for key in ("model", "model_config", "charset", "epoch")}
        save_checkpoint({**keep, "best": ckpt["metrics"][-1], "build": build_entry(state, row)}, best / "default.ckpt")
        state["best"] = {"round": k, "score": acc["score"], "row": row}
    state["next_round"] = k + 1
    state["last_round_hours"] = hours
    save_state(out, state)
    shutil.rmtree(out / "synth" / folder.name, ignore_errors=True)  # a finished round never reads its images again
    return row


def build_entry(state: dict, row: dict) -> dict:
    """What default.ckpt carries about its build: where the next session continues, and the card's facts."""
    return {"hours": state["hours"], "round": row["round"], "run": state["run"], "synth_next": state["synth_next"],
            "averaged": int(row.get("averaged") or 1),
            "draws": state["draws"], "offsets": state["offsets"], "synth_styles": state["synth_styles"],
            "synth_effects": state["synth_effects"], "pkg_extra": state["pkg_extra"],
            "started_from": state["started_from"], "font_packages": state["font_packages"],
            "google_fonts": state.get("google_fonts", {}).get("families", []),
            "accuracy": {k: float(v) for k, v in row.items() if k not in LOG_KEYS or k in ("score", "unseen")},
            "eval_sizes": state["eval_sizes"]}


# ---------------------------------------------------------------------------- install, card, curve

def install(out: Path, target: Path, log_target: Path, args) -> None:
    best = out / "best"
    if not (best / "default.pt").is_file():
        raise SystemExit(f"--install: no round of {out} has beaten the checkpoint it started from yet: nothing to "
                         f"install")
    log_target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / LOG_NAME, log_target)
    families = load_checkpoint(best / "default.ckpt")["build"].get("google_fonts")
    if families:  # the list the card cites, beside the log
        google_fonts.write_list(families, log_target.with_name(GOOGLE_FONTS_LIST))
    plot_log(read_log(log_target), log_target.with_name("build_curve.png"))
    install_checkpoint(best / "default.ckpt", target, args)
    print(f"and {log_target}, build_curve.png")


def install_checkpoint(ckpt_path: Path, target: Path, args) -> None:
    """Ship a checkpoint that carries a build entry: default.ckpt (its weights rounded to float16:
    checkpoint.with_half_weights), default.pt exported from it, its confidence, the model card and the
    figures of docs/accuracy.md that depend on the model, all measured with the rounded weights.
    args: data, real, eval_n, threads."""
    target.mkdir(parents=True, exist_ok=True)
    save_checkpoint(with_half_weights(load_checkpoint(ckpt_path)), target / "default.ckpt")  # weights in float16
    # exported anew, not copied: the round's default.pt holds the preprocessing code of the process that
    # trained it, which may predate this checkout's (TorchScript saves the code with the weights)
    save_recognizer(load_model(target / "default.ckpt"), target / "default.pt")
    calibrate(target, args)
    write_model_card(target, load_checkpoint(target / "default.ckpt"), args)
    remeasure(target, args)
    print(f"installed {target / 'default.pt'}, default.ckpt, MODEL_CARD.md")


def remeasure(target: Path, args) -> None:
    """The figures of docs/accuracy.md that depend on the model, measured on the installed one: the table of
    reads with 0/O and 1/I/l merged (printed, as markdown) and the two error galleries (docs/errors_*.png)."""
    import accuracy_table
    import error_gallery

    model = str(target / "default.pt")
    folders = [x for name, folder in SHARED.items() for x in ("--folder", f"{name}={args.data / folder}")]
    accuracy_table.main([model, *folders, "-n", str(args.eval_n), "--styles", "captcha_pkg"])
    error_gallery.main([model, "--package", "160x60", "--show", "10", "--out", str(ROOT / "docs" / "errors_pkg160.png")])
    error_gallery.main([model, "--folder", f"varlen={args.data / SHARED['varlen']}", "--show", "10",
                        "--out", str(ROOT / "docs" / "errors_varlen.png")])


def calibrate(target: Path, args) -> None:
    """The installed model's confidence (tools/reliability.py --per-set): fitted on renders of seed 424242 and the
    even half of each validation split, lowered until each of those sets keeps the >= 0.9 promise on its reads at
    >= 0.9 (confidence.keeps_promise), measured on seed 12345, the odd halves and the unseen sets; stored in
    default.pt and default.ckpt; docs/reliability.png and docs/reliability.json."""
    import reliability

    folders = [f"{name}={args.data / folder}" for name, folder in SHARED.items()]
    sets = real_sets.load_sets(args.real) if args.real else []
    reliability.main([str(target / "default.pt"), "--per-set", "--write-model", str(target / "default.pt"), "--also",
                      str(target / "default.ckpt"), "--plot", str(ROOT / "docs" / "reliability.png"), "--json",
                      str(ROOT / "docs" / "reliability.json"), "-n", str(args.eval_n), "--threads", str(args.threads),
                      *[x for f in folders for x in ("--folder", f)],
                      *[x for r in sets for x in ("--unseen" if r["unseen"] else "--manifest",
                                                  f"{r['name']}={r['all_tsv'] if r['unseen'] else r['val_tsv']}")]])


SET_TITLES = {"v2": "captcha_images_v2, val split", "varlen": "varlen_upper, val split",
              "pkg_160x60": "`captcha` package 160x60, render seed 12345", "pkg_200x50": "`captcha` package 200x50, "
              "render seed 12345", "pkg_280x90": "`captcha` package 280x90, render seed 12345",
              "blank": "no text (uniform, gradient, noise; reads \"\")"}
SHARED = {"v2": "captcha_images_v2", "varlen": "varlen_upper"}


def write_model_card(target: Path, ckpt: dict, args) -> None:
    """MODEL_CARD.md beside the weights, from the build entry of the installed checkpoint and the real
    sets' sets.json: every source with its provenance and use, the synthetic styles, the held-out scores."""
    b, cfg = ckpt["build"], ckpt["model_config"]
    params = sum(p.numel() for p in model_from_checkpoint(ckpt).parameters())
    size = (target / "default.pt").stat().st_size / 1e6
    draws, total = b["draws"], sum(b["draws"].values())
    sets = {r["name"]: r for r in real_sets.load_sets(args.real)} if args.real else {}
    L = ["# Model card: captcha_fast's shipped model", "",
         "`default.pt` (TorchScript recognizer) and `default.ckpt` (its training weights, where `captcha-fast train` "
         "starts fine-tuning). Written by `tools/build_pretrained.py --install`.", "",
         "## Model", "",
         f"- CRNN: two conv blocks of {cfg['channels'][0]} and {cfg['channels'][1]} channels"
         + (f", {cfg['res_blocks']} residual blocks of {cfg['channels'][1]}" if cfg.get("res_blocks") else "") + ", a "
         f"{cfg['hidden_dim']}-unit bidirectional GRU, CTC; {params:,} parameters, {size:.1f} MB as TorchScript "
         "(its GRU weights stored in float16, as the checkpoint's are: the shipped weights are rounded to float16).",
         f"- Input: {'the ink map cropped to the text (preprocess.to_ink)' if cfg.get('ink') else 'grey'}, "
         f"height {cfg['height']}. Output: 0-9a-z (labels were case-folded; upper case reads as lower case).",
         f"- Training: {b['hours']:.2f} training hours (CPU time of one core) in rounds of a one-cycle schedule "
         f"(AdamW, CTC), up to build round {b['round']} (run {b['run']}){averaged_text(b)}; started from: "
         f"{'; then '.join(b['started_from'])}. The held-out accuracy against training hours is "
         "docs/build_curve.png (docs/build_log.csv).", *style_heads_text(ckpt, b), "",
         "## Training data", "",
         f"{total:,} training images drawn in all, each round a fresh mix; a fixed source is walked through in seeded "
         "shuffles, so `distinct` is how many of its images were used at least once. Labels case-folded. No image "
         "of any source is in this package.", "",
         "| source | repository @ commit | path | licence | drawn | share | distinct |",
         "|---|---|---|---|---:|---:|---:|"]
    for name, n in sorted(draws.items(), key=lambda kv: -kv[1]):
        share = f"{100 * n / total:.1f}%"
        if name == "synth":
            row = (f"synthetic captchas: synth.SynthConfig(style=\"mix\"), seed {SYNTH_SEED}, 0-9a-zA-Z, "
                   f"{SYNTH_LENGTHS[0]}-{SYNTH_LENGTHS[1]} long", "this package", "captcha_fast/synth.py",
                   "MIT (this package); fonts below", b["synth_next"])  # the stream renders indices 0..synth_next-1
        elif name == "pkg":
            row = (f"the `captcha` package's ImageCaptcha at {', '.join(f'{w}x{h}' for w, h in synth.PACKAGE_SIZES)}"
                   f" (synth.render_package), seed {PKG_SEED}, 0-9a-zA-Z{extra_text(b.get('pkg_extra', ''))}, "
                   f"{PKG_LENGTHS[0]}-{PKG_LENGTHS[1]} long",
                   "this package", "captcha_fast/synth.py", "MIT (this package); the `captcha` package's own font", n)
        elif name == "blank":
            row = ("images with no text, label \"\"", "this package", "tools/build_pretrained.py (blank)", "MIT", n)
        elif name in SHARED:
            n_train = len(split_samples(list_samples(Path(args.data) / SHARED[name]), 0.15, 0)[0])
            row = (f"{SHARED[name]}, train split (data.split_samples: 15% val, seed 0)", "the project's shared data",
                   f"{SHARED[name]}/", "none stated: train and evaluate, never redistribute", min(n, n_train))
        else:
            r = sets.get(name, {"repository": "?", "commit": "?", "paths": "?", "licence": "?", "train": n})
            row = (f"{name}, train split ({r.get('style', '')})", f"{r['repository']} @ {r['commit']}",
                   r["paths"], r["licence"], min(n, r["train"]))
        L.append(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {n:,} | {share} | {row[4]:,} |")
    styles, effects = b["synth_styles"], b.get("synth_effects", {})
    n_synth = sum(styles.values())
    L += ["", "Synthetic styles and effects (synth.STYLES, synth.EFFECTS: an image has one style and any number of "
          "effects), as drawn: share of the synthetic images.", "",
          "| style or effect | images | share | what |", "|---|---:|---:|---|"]
    for kind, table, about in (("style", styles, synth.STYLES), ("effect", effects, getattr(synth, "EFFECTS", {}))):
        L += [f"| {kind} `{name}` | {n:,} | {100 * n / n_synth:.1f}% | "
              f"{getattr(about.get(name), 'about', '')} |" for name, n in sorted(table.items(), key=lambda kv: -kv[1])]
    fonts = b.get("font_packages", [])
    L += ["", "Fonts: the `captcha` package's DejaVu plus these Debian packages (licences from their copyright "
          "files, as synth.DEBIAN_FONT_PACKAGES lists): " +
          (", ".join(f"{f} ({synth.DEBIAN_FONT_PACKAGES.get(f, '?')})" for f in fonts) or "none") + "." +
          google_fonts_text(b.get("google_fonts", [])), "",
          "## Held out (never trained on)", "",
          "Real sets kept out of training entirely, to measure styles the model has never seen:", "",
          "| set | repository @ commit | path | licence | images |", "|---|---|---|---|---:|"]
    for r in sets.values():
        if r["unseen"]:
            L.append(f"| {r['name']} ({r['style']}) | {r['repository']} @ {r['commit']} | {r['paths']} | "
                     f"{r['licence']} | {r['train'] + r['val']:,} |")
    acc, sizes = b["accuracy"], b.get("eval_sizes", {})
    L += ["", f"Accuracy of this model (whole captcha, case ignored) on held-out images, as the build scores every "
          f"round (at most {args.eval_n} images a set):", "",
          "| set | images | accuracy |", "|---|---:|---:|"]
    for name, v in acc.items():
        if name in ("score", "unseen"):
            continue
        title = SET_TITLES.get(name)
        if title is None:
            real_name = name.removeprefix("unseen_")
            r = sets.get(real_name, {})
            title = (f"{real_name} ({r.get('repository', '?')}), "
                     f"{'unseen: whole set' if name.startswith('unseen_') else 'val split'}")
        L.append(f"| {title} | {sizes.get(name, '')} | {100 * v:.1f}% |")
    L += [f"| mean of the above but the unseen sets (what picks the shipped weights) | | {100 * acc['score']:.1f}% |",
          f"| mean of the unseen real styles | | {100 * acc['unseen']:.1f}% |", ""]
    (target / "MODEL_CARD.md").write_text("\n".join(L))


def style_heads_text(ckpt: dict, b: dict) -> list:
    """The card's lines on the model's style heads (tools/style_heads.py), if it has any."""
    lines = []
    for style, h in ckpt.get("style_heads", {}).items():
        hb = h.get("build", {})
        draws = ", ".join(f"{k} {n - b['draws'].get(k, 0):,}" for k, n in hb.get("draws", {}).items()
                          if n > b["draws"].get(k, 0))  # the head's own: the entry counts the lineage
        routed = "; ".join(f"{name} {n} of {b.get('eval_sizes', {}).get(name, '?')}" for name, n in h["routed"].items())
        trained = (f"{float(hb['hours']) - b['hours']:.2f} training hours from these weights, build round "
                   f"{hb['round']}, drawn: {draws}" if hb else "its build unrecorded")
        own, shared = (("second conv block, projection, BiGRU and classifier", "first conv block")
                       if ckpt.get("model_config", {}).get("style_branch") == "block2" else
                       ("BiGRU and classifier", "convs and projection"))
        lines.append(f"- Style head `{style}` ({h['about']}): its own {own} on the shared {shared} (trained with "
                     f"them frozen: {trained}); a gate on the shared features, trained on "
                     f"{h['gate_images']['style']:,} of its renders and {h['gate_images']['other']:,} other "
                     f"images, sends an image to it. Held-out images it sent there: {routed}.")
    return lines


def google_fonts_text(families: list) -> str:
    """The card's sentence on the Google Fonts families of a build ("" without them)."""
    if not families:
        return ""
    licences = Counter(r["licence"] for r in families)
    return (f" And {len(families)} Google Fonts families, each from its `@expo-google-fonts` npm package "
            f"(tools/google_fonts.py; docs/{GOOGLE_FONTS_LIST} lists each with its version, category and licence): "
            + ", ".join(f"{n} {name}" for name, n in licences.most_common()) + ".")


def extra_text(extra: str) -> str:
    """The card's words for --pkg-extra: how much likelier its symbols were drawn."""
    if not extra:
        return ""
    return " with " + ", ".join(f"{ch} {1 + extra.count(ch)}x as likely" for ch in dict.fromkeys(extra))


def averaged_text(build: dict) -> str:
    n, k = build.get("averaged", 1), build["round"]
    return f"; the weights are the mean of rounds {k - n + 1}-{k} (--average)" if n > 1 else ""


def plot_log(rows: list, path: Path) -> None:
    """Held-out accuracy per set against cumulative training hours."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        return
    import matplotlib

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    hours = [float(r["hours"]) for r in rows]
    names = [k for k in rows[-1] if k not in LOG_KEYS] + ["score", "unseen"]
    colours = matplotlib.colormaps["tab20"].colors
    for i, name in enumerate(names):
        pts = [(h, 100 * float(r[name])) for h, r in zip(hours, rows) if r.get(name) not in (None, "", "nan")]
        if not pts:
            continue
        if name in ("score", "unseen"):
            label = {"score": "mean (picks what ships)", "unseen": "unseen real styles (mean)"}[name]
            ax.plot(*zip(*pts), "k-" if name == "score" else "k--", label=label, lw=2)
        else:
            ax.plot(*zip(*pts), ".-", color=colours[2 * i % 20 + (2 * i // 20) % 2], label=name, lw=1, ms=3)
    starts = [h for h, r, prev in zip(hours[1:], rows[1:], rows) if r["run"] != prev["run"]]
    for i, h in enumerate(starts):  # a later run continues from a round (the card's started_from says how)
        ax.axvline(h, color="grey", ls=":", lw=1, label="a run continues (started_from)" if i == 0 else None)
    averaged = [h for h, r in zip(hours, rows) if int(r.get("averaged") or 1) > 1]
    if averaged:  # from here on a point is the mean of the last rounds' weights
        ax.axvline(averaged[0], color="grey", ls="-.", lw=1, label="scored as the mean of the last rounds (--average)")
    ax.set_xlabel("training hours (CPU time, one core)")
    ax.set_ylabel("held-out accuracy (%, case ignored)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- main

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding captcha_images_v2/ and varlen_upper/")
    p.add_argument("--real", type=Path, default=None, help="tools/real_sets.py's --out (sets.json)")
    p.add_argument("--out", type=Path, default=Path("runs/build"))
    p.add_argument("--hours", type=float, default=1.0, help="training hours (CPU time) for this invocation")
    p.add_argument("--round-images", type=int, default=32000,
                   help="images per round's manifest (2 epochs of 32000: about 16 CPU minutes at ~68 img/s)")
    p.add_argument("--epochs-per-round", type=int, default=2)
    p.add_argument("--shares", default=DEFAULT_SHARES)
    p.add_argument("--fonts", type=Path, default=None, help="a Google Fonts folder installed by tools/google_fonts.py: "
                   "the synthetic styles draw from its families too (a build that used one needs it again)")
    p.add_argument("--pkg-extra", default=None, help="symbols added to the pkg group's 0-9a-zA-Z draw, each "
                   "occurrence one more chance (0Oo0Oo0Oo0Oo: 0, O and o five times as likely as another symbol, still "
                   "1:1:1 as in the held-out renders); default: what the build it continues drew with, else none")
    p.add_argument("--teacher", default=None, help="distil this checkpoint's frame outputs into each round (train's "
                   "--teacher) on the items --teacher-on matches; default: what the build it continues used, else none")
    p.add_argument("--teacher-on", default=r"/p\d+\.png$",
                   help="train's --teacher-on (default: the pkg group's renders)")
    p.add_argument("--teacher-weight", type=float, default=1.0, help="train's --teacher-weight")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of each round's OneCycle")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--join", type=float, default=0.0, help="share of each round's items made of two images side by "
                                                           "side (train's --join; default 0: off)")
    p.add_argument("--init-from", default=str(PRETRAINED_CHECKPOINT), help="weights of a new OUT's first round")
    p.add_argument("--from-scratch", action="store_true", help="a new OUT starts from random weights")
    p.add_argument("--channels", type=int, nargs=2, metavar=("C1", "C2"), default=None,
                   help="conv widths (default: the start model's); wider than --init-from's grows it (model.widen)")
    p.add_argument("--hidden", type=int, default=None, help="GRU size (default: the start model's); as --channels")
    p.add_argument("--res-blocks", type=int, default=None,
                   help="residual blocks after the conv blocks (default: the start model's); more grows it")
    p.add_argument("--freeze", nargs="+", default=None, choices=FREEZABLE, metavar="PART",
                   help="train's --freeze: e.g. convs project, to train a style head (tools/style_heads.py); kept "
                        "for the run's later rounds")
    p.add_argument("--average", type=int, default=5, help="score (and ship) the mean weights of the last K rounds")
    p.add_argument("--eval-n", type=int, default=300, help="images per held-out set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log", default=str(ROOT / "docs" / LOG_NAME), help="the committed build log (history; "
                                                                         "--install writes it)")
    p.add_argument("--install", action="store_true", help="copy the best scored weights into --install-dir at the end")
    p.add_argument("--install-dir", type=Path, default=PRETRAINED_CHECKPOINT.parent)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shares = parse_shares(args.shares)
    if set(args.pkg_extra or "") - set(synth.DIGITS_LETTERS):
        raise SystemExit(f"build_pretrained: --pkg-extra {args.pkg_extra!r} holds symbols outside 0-9a-zA-Z")
    out = args.out.resolve()  # manifests hold absolute paths
    state = load_state(out, args)
    if args.pkg_extra is not None:  # else a resumed run draws as it did (the card says how)
        state["pkg_extra"] = args.pkg_extra
    state.setdefault("pkg_extra", "")  # an OUT from before --pkg-extra
    if args.freeze is not None:  # kept like --pkg-extra
        state["freeze"] = args.freeze
    args.freeze = state.setdefault("freeze", [])
    if args.teacher is not None:  # kept like --pkg-extra: a resumed run distils as it did
        state["teacher"] = {"path": str(Path(args.teacher).resolve()), "on": args.teacher_on,
                            "weight": args.teacher_weight}
    if args.fonts or args.hours > 0:  # --install alone renders nothing
        use_google_fonts(out, state, args.fonts)
        save_state(out, state)  # a round killed while rendering resumes with the same fonts
    missing = missing_fonts(state)
    if missing and args.hours > 0:
        raise SystemExit(f"build_pretrained: this build rendered with font packages not installed here "
                         f"({', '.join(missing)}); install them first: apt-get install -y "
                         f"--no-install-recommends {' '.join(missing)}")
    sources = fixed_sources(args.data, args.real)
    sets = None
    spent = 0.0
    if state["init"] and not state.get("start_scored"):
        sets = held_out_sets(args.data, args.real, args.eval_n)
        state["eval_sizes"] = {name: len(labels) for name, (_, labels, _) in sets.items()}
        score_start(out, state, sets)
    print(f"build {state['run']}: at {state['hours']:.2f} training hours, round {state['next_round']}; "
          f"budget {args.hours:g} h", flush=True)
    while True:
        k = state["next_round"]
        folder = out / f"round_{k:04d}"
        started = (folder / "last.ckpt").is_file()
        if not started and spent + state.get("last_round_hours", 0.0) > args.hours:
            break
        if spent >= args.hours:
            break
        prepare_round(out, state, sources, shares, args)
        previous = out / f"round_{k - 1:04d}" / "last.ckpt"
        init = str(previous) if previous.is_file() else state["init"]
        hours = train_round(folder, init, args, state.get("teacher"))
        if sets is None:
            t0 = time.process_time()
            sets = held_out_sets(args.data, args.real, args.eval_n)
            state["eval_sizes"] = {name: len(labels) for name, (_, labels, _) in sets.items()}
            state["eval_hours"] += (time.process_time() - t0) / 3600
        row = finish_round(out, folder, state, hours, sets, args.average)
        spent += hours
        print(f"round {k}: {hours:.3f} h (total {state['hours']:.3f} h): score {float(row['score']):.4f}, unseen "
              f"{float(row['unseen']):.4f} | " + " ".join(f"{k2} {float(v):.3f}" for k2, v in row.items()
                                                      if k2 not in LOG_KEYS), flush=True)
    if args.install:
        install(out, args.install_dir, Path(args.log), args)


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1:2] == ["mean"]:
        score_mean(sys.argv[2:])
    else:
        main()
