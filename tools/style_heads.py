"""Give a general model heads of their own for styles it reads worse than a specialist does
(model.with_style_heads): the general model's checkpoint, one checkpoint per style trained from it
with its convs and projection frozen (`build_pretrained.py --shares pkg=1 --freeze convs project`: heads
of a GRU and classifier) or its first conv block alone (`--freeze block1`: heads that own block 2 on, the
shipped kind), and a gate trained here to tell each style's images from everything else.

    python tools/style_heads.py --general captcha_fast/pretrained/default.ckpt \\
        --head captcha_pkg=runs/pkghead/best/last.ckpt --data ../shared/data --real ../shared/data/real \\
        --out runs/styled.ckpt

The gate (model.StyleGate) reads the general model's conv features that every head shares (the last
conv's, or the first block's where the heads own block 2), so it costs a 3x3 conv over them. It
learns, with class-balanced cross-entropy: a style's own renders (for
captcha_pkg the `captcha` package as the build renders it, synth.render_package at its common sizes,
another seed than any held-out set) against the build's other sources (the synthetic mix, the
captcha_images_v2 and varlen_upper train splits, the real sets' train splits, blank images). Every
image a gate sends to a head is read by that head alone, so the routing rates it prints on held-out
images say what changes: a style's images it misses read as the general model reads them, and others
it takes read as the style's head reads them.

Writes a checkpoint (the general one's, with the combined model, its held-out accuracy as the build
scores it, and a "style_heads" entry naming each head's source and routing) and its recognizer (.pt);
--install ships them as build_pretrained.py --install does. `style_heads.py head CKPT STYLE OUT` takes a
head back out of a shipped model, for a build to train it further."""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_table  # noqa: E402
import build_pretrained  # noqa: E402

import captcha_fast  # noqa: E402
from captcha_fast import synth  # noqa: E402
from captcha_fast.checkpoint import (PRETRAINED_CHECKPOINT, load_checkpoint, model_from_checkpoint,  # noqa: E402
                                     save_checkpoint)
from captcha_fast.export import save_recognizer  # noqa: E402
from captcha_fast.formats import resolve_dtype  # noqa: E402
from captcha_fast.model import (BLOCK_CONVS, STYLE_BRANCHES, InferenceCRNN, StyleGate, convs_to,  # noqa: E402
                                 general_model, style_branch, style_model, with_style_heads)
from captcha_fast.preprocess import from_pil, load_image  # noqa: E402
from captcha_fast.recognizer import Recognizer  # noqa: E402

GATE_SEED = 3  # the style renders' stream (the build renders the package with seed 2, held-out sets 12345)
STYLES = {"captcha_pkg": "the `captcha` package at its common sizes (synth.render_package)"}


def style_renders(style: str, seed: int, n: int) -> list:
    """n renders of a style of STYLES (captcha_pkg: as the build's pkg group draws them, another seed)."""
    return [synth.package_captcha(seed, i)[0] for i in range(n)]


def other_images(data: Path, real: Path | None, n: int, seed: int = GATE_SEED) -> list:
    """n images of the build's other sources: half the synthetic mix, half the fixed train sets, a few blank."""
    mix = synth.SyntheticCaptchas(synth.SynthConfig(style="mix", min_len=3, max_len=8, seed=seed), n // 2)
    images = [from_pil(image, f"mix:{i}") for i, (image, _) in enumerate(mix)]
    sources = build_pretrained.fixed_sources(data, real)
    per = (n - len(images)) // (len(sources) + 1)
    for _, rows in sources.values():
        rows = random.Random(seed).sample(rows, min(per, len(rows)))
        images += [load_image(path) for path, _ in rows]
    rng = random.Random(seed)
    images += [from_pil(build_pretrained.blank(rng), f"blank:{i}") for i in range(per)]
    return images


class Features:
    """The general model's conv features of images, one (C, H, T) float32 tensor each: what the gate reads
    (the last conv's, or the first block's where the heads branch off there: `branch`), with the convs in
    `dtype` (a recognizer runs them in bf16 on CPUs with native bf16 and on CUDA)."""

    def __init__(self, general, branch: str, dtype: torch.dtype = torch.float32):
        self.rec = Recognizer(InferenceCRNN(general)).eval()
        if branch == "block2":
            self.rec.model.shared_convs = BLOCK_CONVS // 2
        convs_to(self.rec.model, dtype)

    @torch.no_grad()
    def __call__(self, images: list, batch: int = 64) -> list:
        out = []
        for i in range(0, len(images), batch):
            chunk = [im if torch.is_tensor(im) else from_pil(im, f"image {i}") for im in images[i:i + batch]]
            pixels, widths = self.rec.preprocess(chunk)
            x, w = self.rec.model.features(pixels.to(self.rec.model.convs[0].weight.dtype), widths)
            out += [x[j, :, :, :int(w[j])].float().clone() for j in range(len(chunk))]
        return out


def _batches(items: list, batch: int, rng: random.Random | None):
    order = list(range(len(items)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), batch):
        chunk = [items[j] for j in order[i:i + batch]]
        T = max(f.shape[-1] for f, _ in chunk)
        yield (torch.stack([F.pad(f, (0, T - f.shape[-1])) for f, _ in chunk]),
               torch.tensor([f.shape[-1] for f, _ in chunk]), torch.tensor([y for _, y in chunk]))


def train_gate(features: list, labels: list, heads: int, epochs: int = 12, seed: int = 0) -> StyleGate:
    """A StyleGate fitted to (C, H, T) features and head labels (0 general, i style i), classes weighted
    by the inverse of their counts."""
    torch.manual_seed(seed)
    gate = StyleGate(features[0].shape[0], heads)
    counts = torch.bincount(torch.tensor(labels), minlength=1 + heads).float()
    weight = counts.sum() / (counts.clamp(min=1) * len(counts))
    opt = torch.optim.AdamW(gate.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(features) // 64))
    rng = random.Random(seed)
    for _ in range(epochs):
        for x, w, y in _batches(list(zip(features, labels)), 64, rng):
            loss = F.cross_entropy(gate(x, w), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return gate.eval()


@torch.no_grad()
def routed_to(gate: StyleGate, features: list) -> torch.Tensor:
    """The head the gate picks for each image (N,)."""
    return torch.cat([gate(x, w).argmax(1) for x, w, _ in _batches([(f, 0) for f in features], 256, None)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--general", required=True, help="the general model's checkpoint (one with style heads, e.g. the "
                                                     "shipped default.ckpt: its general head)")
    p.add_argument("--head", action="append", required=True, metavar="STYLE=CKPT",
                   help=f"a style and its model's checkpoint, or the build OUT that trains it (the mean of its last "
                        f"--average rounds) (styles: {', '.join(STYLES)})")
    p.add_argument("--average", type=int, default=5, help="as build_pretrained.py's")
    p.add_argument("--data", type=Path, required=True, help="folder holding captcha_images_v2/ and varlen_upper/")
    p.add_argument("--real", type=Path, default=None, help="tools/real_sets.py's --out")
    p.add_argument("--n", type=int, default=6000, help="training images per style, and of the other sources")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--eval-n", type=int, default=300, help="images per held-out set, as the build's --eval-n")
    p.add_argument("--out", type=Path, required=True, help="the assembled checkpoint (and beside it, .pt: its recognizer)")
    p.add_argument("--install", action="store_true", help="ship it: build_pretrained.install_checkpoint (the weights, "
                   "confidence, model card and the figures of docs/accuracy.md that depend on the model)")
    p.add_argument("--install-dir", type=Path, default=PRETRAINED_CHECKPOINT.parent)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    heads = dict(parse_head(h) for h in args.head)
    if args.out.suffix != ".ckpt":
        raise SystemExit(f"style_heads: --out {args.out} must be a .ckpt (its recognizer goes beside it, .pt)")
    general_ckpt = load_checkpoint(args.general)
    if args.install and "build" not in general_ckpt:
        raise SystemExit(f"style_heads: --install needs a general checkpoint with a build entry (the shipped "
                         f"default.ckpt, a build's best/default.ckpt); {args.general} has none")
    general = model_from_checkpoint(general_ckpt).eval()
    if general.config.style_heads:  # the shipped model: its general head, assembled anew with the heads given
        general = general_model(general)
    head_ckpts = {style: head_checkpoint(Path(path), args.average) for style, path in heads.items()}
    styles = {s: model_from_checkpoint(c).eval() for s, c in head_ckpts.items()}
    branch = style_branch(general, styles)  # refuses a mismatch now
    print(f"the heads branch off at {branch!r}: {STYLE_BRANCHES[branch]}", flush=True)
    # the gate learns the features as the convs give them in float32 and, where the CPU runs a recognizer's
    # convs in bf16 (resolve_dtype), in bf16 too, so that it routes alike in either
    runtime = resolve_dtype("auto", torch.device("cpu"))
    extractors = [Features(general, branch, dtype) for dtype in dict.fromkeys([torch.float32, runtime])]
    other, own = other_images(args.data, args.real, args.n), [style_renders(s, GATE_SEED, args.n) for s in heads]
    feats, labels = [], []
    for features in extractors:
        for i, images in enumerate([other] + own):
            got = features(images)
            feats, labels = feats + got, labels + [i] * len(got)
    gate = train_gate(feats, labels, len(heads), args.epochs)
    sets = build_pretrained.held_out_sets(args.data, args.real, args.eval_n)  # what the build scores: never trained on
    routed = {}
    for name, (images, _, _) in sets.items():
        picks = routed_to(gate, extractors[-1](images))  # as a recognizer loaded here runs
        routed[name] = {style: int((picks == i).sum()) for i, style in enumerate(heads, 1)}
    model = with_style_heads(general, styles, gate)
    model_pt = args.out.with_suffix(".pt")
    save_recognizer(model, model_pt)
    accuracy = build_pretrained.evaluate(model_pt, sets)
    alone = build_pretrained.evaluate(save_recognizer(general, args.out.with_suffix(".general.pt")), sets)
    for name, (images, _, _) in sets.items():
        print(f"{name}: {100 * accuracy[name]:.1f}% (the general model alone {100 * alone[name]:.1f}%), "
              + ", ".join(f"{n} of {len(images)} to {s}" for s, n in routed[name].items()), flush=True)
    for i, style in enumerate(heads, 1):  # the style as the synthetic mix varies it (other fonts, sizes, effects)
        images, labels = accuracy_table.style_renders(style, args.eval_n)
        picks = routed_to(gate, extractors[-1](images))
        reads = {k: captcha_fast.predict_batch(images, str(path), device="cpu")
                 for k, path in (("styled", model_pt), ("alone", args.out.with_suffix(".general.pt")))}
        right = {k: sum(r == t.lower() for r, t in zip(v, labels)) / len(labels) for k, v in reads.items()}
        print(f"synthetic style {style} (its variants in the mix): {100 * right['styled']:.1f}% (the general model "
              f"alone {100 * right['alone']:.1f}%), {int((picks == i).sum())} of {len(images)} to {style}")
    build = {**general_ckpt.get("build", {}), "accuracy": accuracy,
             "eval_sizes": {k: len(v[1]) for k, v in sets.items()}}
    entry = {style: {"about": STYLES[style], "checkpoint": str(heads[style]), "build": c.get("build", {}),
                     "gate_images": {"style": len(own[i]), "other": len(other)},
                     "routed": {k: v[style] for k, v in routed.items()}}
             for i, (style, c) in enumerate(head_ckpts.items())}
    save_checkpoint({**general_ckpt, "model_config": model.config.to_dict(), "model": model.state_dict(),
                     "build": build, "style_heads": entry}, args.out)
    print(f"wrote {args.out} and {model_pt}")
    if args.install:
        build_pretrained.install_checkpoint(args.out, args.install_dir, args)


def parse_head(spec: str) -> tuple:
    """--head STYLE=CKPT -> (style, path), refusing an unknown style or a missing path now, not after the gate."""
    style, sep, path = spec.partition("=")
    if not sep or style not in STYLES or not Path(path).exists():
        raise SystemExit(f"style_heads: --head {spec!r}: give STYLE=CKPT with STYLE one of {', '.join(STYLES)} and "
                         f"CKPT an existing checkpoint or build OUT")
    return style, path


def head_checkpoint(path: Path, average: int) -> dict:
    """A style head's checkpoint: a file, or a build's OUT, whose last round is taken as the build
    scores it (the mean of its last `average` rounds' weights), with that round's build entry."""
    if not (path / "state.json").is_file():
        return load_checkpoint(path)
    k = json.loads((path / "state.json").read_text())["next_round"] - 1
    ckpt, _ = build_pretrained.average_rounds(path, k, average)
    build = path / f"round_{k:04d}" / build_pretrained.ROUND_BUILD
    return {**ckpt, "build": json.loads(build.read_text())}


def extract(argv=None) -> None:
    """`python tools/style_heads.py head CKPT STYLE OUT`: the model of CKPT's head for STYLE (model.style_model)
    as a checkpoint carrying the head's build entry, where a build trains the head further:
    build_pretrained.py --init-from OUT --freeze block1 --shares pkg=1 ... (its hours go on; --freeze convs
    project for a head of a GRU and classifier)."""
    p = argparse.ArgumentParser(prog="style_heads.py head", description=extract.__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("style")
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    try:
        model = style_model(model_from_checkpoint(ckpt), args.style)
    except ValueError as e:
        raise SystemExit(f"style_heads.py head: {args.checkpoint}: {e}") from None
    save_checkpoint({**{k: v for k, v in ckpt.items() if k != "style_heads"}, "model_config": model.config.to_dict(),
                     "model": model.state_dict(), "build": ckpt["style_heads"][args.style].get("build", {})}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["head"]:
        extract(sys.argv[2:])
    else:
        main()
