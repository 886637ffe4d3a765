"""The `captcha-fast` command line (also `python -m captcha_fast`, and `torchrun -m captcha_fast train`).

All argument parsing and printing lives here. A command imports what it needs when it
runs, so `predict` and `info` load no training code.

Exit codes: 0 success, 1 failure (one line on stderr; --debug for the
traceback), 2 usage error, 130 interrupted, 141 (128 + SIGPIPE) when the reader of the output
left early (`captcha-fast predict DIR | head`)."""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shlex
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import List, Optional

from captcha_fast import preprocess


class UsageError(ValueError):
    """Arguments that parse but do not make sense together: exit status 2, as argparse's own."""


def checked_device(device: Optional[str]) -> Optional[str]:
    """--device as given, after the check captcha_fast.load runs (formats.resolve_device), naming the
    flag: a value that is no device is a usage error; CUDA this torch cannot use fails, saying why."""
    from captcha_fast.formats import resolve_device

    try:
        resolve_device(device, "--device")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return device


# ----------------------------------------------------------------------------- demo

def _add_demo(p):
    p.add_argument("-n", type=int, default=None,
                   help="how many captchas to render, the styles taken in turn (default: 2 of each style)")
    p.add_argument("--seed", type=int, default=None, help="render seed (default: a fresh one each run)")
    p.add_argument("--model", default=None, help="recognizer file (default: the shipped pretrained model)")


WEAK = 0.5  # a style the demo reads less than half right is named as weak


def _run_demo(args):
    from captcha_fast import api
    from captcha_fast.synth import DIGITS_LETTERS, MIX, SynthConfig, SyntheticCaptchas

    checked_positive(n=args.n)
    n = 2 * len(MIX) if args.n is None else args.n
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    # Every style in turn, so the ones the model reads badly show too.
    per_style = {style: SyntheticCaptchas(SynthConfig(style=style, charset=DIGITS_LETTERS, min_len=4, max_len=7,
                                                      seed=seed), n) for style in MIX}
    styles = [MIX[i % len(MIX)] for i in range(n)]
    images, truths = zip(*(per_style[style][i] for i, style in enumerate(styles)))  # item i: its own label
    model = api.load(args.model) if args.model else api.default_model()
    api.predict_batch(list(images[:2]), model)  # warm-up: first-call setup is not throughput
    t0 = time.perf_counter()
    reads = [hs[0] for hs in api.predict_batch(list(images), model, return_scores=True)]
    seconds = time.perf_counter() - t0
    print(f"{'style':<13} {'size':<8} {'truth':<10} {'read':<10} {'confidence':>10}   (case ignored)")
    tally = {}  # style -> [right, read, summed confidence]
    for image, truth, read, style in zip(images, truths, reads, styles):
        ok = read.text.lower() == truth.lower()
        t = tally.setdefault(style, [0, 0, 0.0])
        t[0], t[1], t[2] = t[0] + ok, t[1] + 1, t[2] + read.confidence
        size = f"{image.width}x{image.height}"
        print(f"{style:<13} {size:<8} {truth:<10} {read.text:<10} {read.confidence:>10.2f}   "
              f"{'ok' if ok else 'WRONG'}")
    print("\nby style, weakest first:")
    for style, (ok, k, conf) in sorted(tally.items(), key=lambda kv: (kv[1][0] / kv[1][1], kv[1][2] / kv[1][1])):
        note = "   <- weak: the model reads this style badly" if k >= 2 and ok / k < WEAK else ""  # 1 says little
        print(f"  {style:<13} {ok}/{k} right, mean confidence {conf / k:.2f}{note}")
    right = sum(t[0] for t in tally.values())
    sure = [r.text.lower() == t.lower() for r, t in zip(reads, truths) if r.confidence >= 0.9]
    calibrated = calibration_note(model)
    print(f"\n{right}/{n} read right ({right / n:.0%}), {n / seconds:.0f} images/s (render seed {seed}, model: "
          f"{args.model or 'shipped'})\n{len(sure)} read{'s' * (len(sure) != 1)} at confidence >= 0.9, "
          f"{sum(sure)} of them right; below 0.9, ask for a fresh captcha{calibrated}")


def calibration_note(model) -> str:
    """"" for a calibrated model, else a sentence saying its confidence is the uncalibrated exp(score)."""
    from captcha_fast.confidence import calibration_of

    return ("" if calibration_of(model) is not None else
            " (this model has no calibration: confidence is its own, uncalibrated exp(score); "
            "`captcha-fast calibrate` fits one)")


# -------------------------------------------------------------------------- predict

def expand_paths(patterns: List[str]) -> List[Path]:
    """Files, folders (their images, sorted) and globs, in the order given; "-": the file paths
    on standard input, one per line."""
    paths: List[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if pattern == "-":
            paths += [Path(line.rstrip("\r\n")) for line in sys.stdin if line.strip()]
        elif p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in preprocess.IMAGE_SUFFIXES and not f.is_dir())
        elif p.exists():
            paths.append(p)
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no such file, folder or glob match: {pattern}")
            paths += [Path(m) for m in matches if Path(m).is_file()]
    if not paths:
        raise FileNotFoundError(f"no images found in {' '.join(patterns)}")
    return paths


def _add_predict(p):
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, folders or globs; - reads file paths from standard input, one per line")
    p.add_argument("--model", default=None, help="recognizer file (.pt or .pt2; default: the shipped model)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--beam", type=int, default=10, metavar="WIDTH", help="beam width (default 10)")
    how.add_argument("--greedy", action="store_true", help="greedy (best path) decoding instead of beam search")
    p.add_argument("--top-k", type=int, default=1, help="hypotheses per image (beam search; default 1)")
    p.add_argument("--min-length", type=int, default=0, metavar="N", help="read labels of at least N symbols (beam search)")
    p.add_argument("--max-length", type=int, default=None, metavar="N", help="read labels of at most N symbols (beam search)")
    p.add_argument("--allowed", default=None, metavar="SYMBOLS",
                   help="read only these symbols, e.g. 0123456789 (beam search; default: the model's charset)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, capped by the CPUs free to this process: affinity, "
                        "cgroup quota, less what other processes keep busy)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line instead of path<TAB>text<TAB>score<TAB>confidence")
    p.add_argument("--ignore-case", action="store_true", help="print the texts in lower case")
    p.add_argument("--skip-bad", action="store_true",
                   help="go on past images that cannot be read (unreadable, too wide, ...); list them at the end")


_FLAGS = {"beam_width": "--beam", "top_k": "--top-k", "min_length": "--min-length", "max_length": "--max-length",
          "allowed": "--allowed"}


def checked_decoding(decoder: str, beam_width: int, top_k: int = 1, min_length: int = 0, max_length: int = -1,
                     allowed: Optional[str] = None) -> None:
    """recognizer.check_decode_args, its arguments named as the command's flags (a usage error)."""
    from captcha_fast.recognizer import check_decode_args

    try:
        check_decode_args(decoder, beam_width, top_k, min_length, max_length, allowed is not None)
    except ValueError as e:
        raise UsageError(re.sub(r"\b(" + "|".join(_FLAGS) + r")\b", lambda m: _FLAGS[m.group(1)], str(e))) from None


def flag_of(name: str) -> str:
    """The command-line flag of an argument or config field: n -> -n, batch_size -> --batch-size."""
    return "-" * min(len(name), 2) + name.replace("_", "-")


def checked_positive(**flags: Optional[int]) -> None:
    """Each of --flag-name=value (given as flag_name=value) is None or at least 1, else a usage error."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag_of(name)} must be >= 1, got {value}")


def _run_predict(args):
    from tqdm import tqdm

    from captcha_fast import api

    checked_positive(batch_size=args.batch_size, threads=args.threads)
    decode = dict(decoder="greedy" if args.greedy else "beam", beam_width=args.beam, top_k=args.top_k,
                  min_length=args.min_length, max_length=-1 if args.max_length is None else args.max_length)
    checked_decoding(**decode, allowed=args.allowed)
    checked_device(args.device)
    paths = expand_paths(args.paths)
    model = api.load(args.model, device=args.device) if args.model else api.default_model(device=args.device)
    bar = tqdm(total=len(paths), unit="img", disable=len(paths) < 2 * args.batch_size, file=sys.stderr)
    skipped: List[str] = []  # "path: why", for --skip-bad

    def read(chunk: List[Path]):
        return api.predict_batch([str(p) for p in chunk], model, **decode, allowed=args.allowed, device=args.device,
                                 batch_size=args.batch_size, return_scores=True, threads=args.threads)

    try:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start:start + args.batch_size]
            try:
                results = list(zip(chunk, read(chunk)))
            except (OSError, ValueError, RuntimeError):
                if not args.skip_bad:
                    raise
                results = []
                for path in chunk:  # one at a time, to keep the readable ones
                    try:
                        results += zip([path], read([path]))
                    except (OSError, ValueError, RuntimeError) as e:
                        why = _message(e)  # it names the file, as every image error does
                        skipped.append(why if str(path) in why else f"{path}: {why}")
            for path, hs in results:
                _print_read(path, hs, args.json, args.ignore_case)
            bar.update(len(chunk))
    except BrokenPipeError:
        bar.leave = False  # the reader left (`| head`): clear the bar too, as main ends quietly
        raise
    finally:
        bar.close()
    if skipped:
        sys.stdout.flush()
        print(f"captcha-fast predict: skipped {len(skipped)} of {len(paths)} images:\n  " + "\n  ".join(skipped),
              file=sys.stderr)
        if len(skipped) == len(paths):
            raise ValueError("no image could be read")


def _print_read(path, hypotheses, as_json: bool, ignore_case: bool) -> None:
    """predict's line for one image: path, then text, score and confidence of each hypothesis."""
    if ignore_case:
        hypotheses = [h._replace(text=h.text.lower()) for h in hypotheses]
    if as_json:
        best = hypotheses[0]
        print(json.dumps({"path": str(path), "text": best.text, "score": best.score, "confidence": best.confidence,
                          "hypotheses": [{"text": h.text, "score": h.score, "confidence": h.confidence}
                                         for h in hypotheses]}))
    else:
        print("\t".join([str(path)] + [f"{h.text}\t{h.score:.4f}\t{h.confidence:.4f}" for h in hypotheses]))


# ---------------------------------------------------------------------------- train

def add_config_arguments(parser: argparse.ArgumentParser, config_class) -> None:
    """One argument per field of a config dataclass: its name (or metadata "flag") as --a-name,
    type, default and help from the field. A field without a default is positional; bools are
    --x/--no-x; tuples take one value per element (Tuple[int, ...]: one or more); Optional[X] is X.
    Metadata "also": {flag: value} shortcuts (e.g. --color for --in-channels 3)."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        meta, kind = f.metadata, hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        kw = {"help": meta.get("help", "")}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            args = typing.get_args(kind)
            kw.update(type=args[0], nargs="+" if Ellipsis in args else len(args))
        else:
            kw["type"] = kind
        for key in ("choices", "metavar", "required"):
            if key in meta:
                kw[key] = meta[key]
        if f.default is dataclasses.MISSING:
            parser.add_argument(f.name, **kw)
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if kind is bool:
            kw["help"] += f" (default: {flag if f.default else '--no-' + flag[2:]})"
        elif f.default not in (None, ()) and not meta.get("required"):
            kw["help"] += f" (default: {' '.join(map(str, f.default)) if isinstance(f.default, tuple) else f.default})"
        parser.add_argument(flag, dest=f.name, default=f.default, **kw)
        for alias, value in meta.get("also", {}).items():
            same = (flag if value else "--no-" + flag[2:]) if kind is bool else f"{flag} {value}"
            parser.add_argument(alias, dest=f.name, action="store_const", const=value, default=f.default,
                                help=f"same as {same}")


def config_from_args(config_class, args: argparse.Namespace):
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def _add_train(p):
    from captcha_fast.train import TrainConfig

    add_config_arguments(p, TrainConfig)


def _run_train(args):
    from tqdm import tqdm

    from captcha_fast.checkpoint import load_checkpoint
    from captcha_fast.train import TrainConfig, train

    t0 = time.time()
    cfg = config_from_args(TrainConfig, args)
    path = train(cfg, log=tqdm.write)
    if int(os.environ.get("RANK", "0")) == 0:
        best = load_checkpoint(Path(cfg.out) / "best.ckpt")  # the epoch the model comes from
        row = best["best"]
        which, scores = (("best epoch", f"val acc {row['val_acc']:.4f} cer {row['val_cer']:.4f}") if row["val_n"]
                         else ("last epoch", f"train acc {row['train_acc']:.4f} (no validation split)"))
        took = f"{time.time() - t0:.0f}s" + (" this invocation" if cfg.resume else "")
        print(f"{which} {best['epoch'] + 1}: {scores}; {took}; model: {path}")


# ----------------------------------------------------------------------------- eval

def _add_eval(p):
    a = p.add_argument
    # MODEL is optional (eval DATA reads with the shipped model); options may go anywhere (_CommandParser)
    a("model", nargs="?", metavar="MODEL", help="a recognizer file: TorchScript .pt (e.g. RUN_DIR/model.pt) or "
                                                "torch.export .pt2 (default: the shipped pretrained model)")
    a("data", metavar="DATA", help="folder of LABEL.png files, a .tsv manifest (path<TAB>label), or `synthetic`")
    a("--json", action="store_true", help="print one JSON object (n, accuracy, cer, confusions, ...)")
    a("--gallery", default=None, help="write a PNG of misread images with truth and read text here")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--greedy", action="store_true", help="greedy decoding (default: the model's own decoder)")
    how.add_argument("--beam", type=int, default=None, help="beam width (default: the model's)")
    a("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    a("--merge", default=None, help="also report accuracy with look-alikes merged, e.g. '0O,1I'")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_labelled_data(a, ["all", "train", "val"], synth_n=1000, synth_seed=12345, synth_style="captcha")
    a("--synth-min-len", type=int, default=4, help="synthetic: shortest label (default 4)")
    a("--synth-max-len", type=int, default=8, help="synthetic: longest label (default 8)")
    a("--synth-charset", default=None, help="synthetic: the labels' symbols (default: the model's charset)")


def _add_labelled_data(a, splits, synth_n: int, synth_seed: int, synth_style: str):
    """The options of evaluate.load_labelled, shared by `eval` and `calibrate`."""
    a("--ignore-case", action="store_true", help="a read that differs from its label only in case counts as right")
    a("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    a("--split", default="all", choices=splits,
      help="one side of the split `captcha-fast train` made (pass the run's --val-fraction and --seed)")
    a("--val-fraction", type=float, default=0.15, help="as `train` (default: 0.15)")
    a("--seed", type=int, default=0, help="split seed, as `train` (default: 0)")
    a("--synth-n", type=int, default=synth_n, help=f"synthetic: how many captchas (default: {synth_n})")
    a("--synth-seed", type=int, default=synth_seed,
      help=f"synthetic: render seed (default {synth_seed}; training renders with SEED and SEED + 1000000)")
    a("--synth-style", default=synth_style,
      help="synthetic: a style of captcha_fast.synth, 'mix', or names joined by ','")


def _run_eval(args):
    from captcha_fast import api
    from captcha_fast.evaluate import evaluate, load_labelled
    from captcha_fast.synth import SynthConfig

    checked_positive(batch_size=args.batch_size)
    if args.beam is not None:
        checked_decoding("beam", args.beam)
    device = checked_device(args.device)
    rec = api.load(args.model, device=device) if args.model else api.default_model(device=device)
    # by default the labels hold what the model reads: the shipped model reads one case, so labels drawn
    # from 0-9A-Z would all count as wrong
    synth = SynthConfig(charset=args.synth_charset or "".join(rec.charset), min_len=args.synth_min_len,
                        max_len=args.synth_max_len, seed=args.synth_seed, style=args.synth_style)
    images, labels, paths = load_labelled(args.data, args.skip_bad, args.split, args.val_fraction, args.seed,
                                          synth, args.synth_n)
    known = set(rec.charset) | ({c.swapcase() for c in rec.charset} if args.ignore_case else set())
    unknown = "".join(sorted(set("".join(labels)) - known))
    if unknown:
        folded = all(c.swapcase() in rec.charset for c in unknown)  # a model of one case, as the shipped one
        warnings.warn(f"labels use symbols the model cannot read: {unknown!r} (they count as errors"
                      + ("; the model reads one case: --ignore-case scores its reads case-free)" if folded else ")"))
    report = evaluate(rec, images, labels, paths, args.batch_size, "greedy" if args.greedy else None, args.beam,
                      args.merge, args.ignore_case)
    if args.gallery:
        from captcha_fast.plots import plot_gallery
        index = {p: i for i, p in enumerate(paths)}
        plot_gallery([images[index[p]] for p, _, _ in report.errors], [t for _, t, _ in report.errors],
                     [r for _, _, r in report.errors], args.gallery)
    if args.json:
        print(json.dumps(report.to_json()))
        return
    print(f"{report.n} images: accuracy {report.accuracy:.4f} ({report.correct}/{report.n}), "
          f"CER {report.cer:.4f} ({report.char_errors}/{report.chars} chars), {report.seconds:.1f}s")
    if report.accuracy_merged is not None:
        print(f"accuracy with {report.merge} merged: {report.accuracy_merged:.4f}")
    if report.confusions:
        print("most confused (truth -> read): " + ", ".join(f"{t}->{r} x{c}" for t, r, c in report.confusions[:10]))
    if args.gallery:
        print(f"gallery of misreads: {args.gallery}")


# --------------------------------------------------------------------------- export

def _add_export(p):
    p.add_argument("source", metavar="CHECKPOINT",
                   help="a training checkpoint (RUN_DIR/best.ckpt or last.ckpt), a run directory, or a recognizer .pt")
    p.add_argument("--out", default=None,
                   help="where to write the recognizer: model.pt (TorchScript) or model.pt2 (torch.export; "
                        "with --compile an AOTInductor package). --compile without --out: the cache where "
                        "`predict --model SOURCE` finds it")
    p.add_argument("--compile", action="store_true",
                   help="AOTInductor-compile the model for this machine (.pt2; about a minute of one CPU)")
    p.add_argument("--device", default="cpu", help="the device a .pt2 runs on (default cpu)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--greedy", action="store_true",
                     help="make greedy decoding the default (default: beam search; a recognizer .pt: its own)")
    how.add_argument("--beam", type=int, default=None,
                     help="make beam search of this width the default (default 10; a recognizer .pt: its own)")


def _run_export(args):
    from captcha_fast import api, export, formats

    if args.out is None and not (args.compile and args.source.endswith(".pt")):
        raise UsageError("--out is required, except with --compile from a recognizer .pt (then the cache)")
    if args.out is not None and args.compile and not args.out.endswith(".pt2"):
        raise UsageError(f"--compile writes a .pt2 package: --out must end in .pt2, got {args.out}")
    if args.out is not None and Path(args.out).suffix not in (".pt", ".pt2"):
        raise UsageError(f"--out must end in .pt (TorchScript) or .pt2 (torch.export), got {args.out}")
    checked_device(args.device)
    settings = dict(decoder="greedy" if args.greedy else "beam", beam_width=10 if args.beam is None else args.beam)
    checked_decoding(**settings)
    if formats.file_kind(args.source) == "torchscript":  # a recognizer: its own decoder settings unless given
        model = formats.eager_recognizer(args.source)
        if args.greedy or args.beam is not None:
            model.decoder, model.beam_width = settings["decoder"], settings["beam_width"]
    else:
        from captcha_fast.checkpoint import load_checkpoint, model_from_checkpoint
        from captcha_fast.confidence import Calibration
        ckpt = load_checkpoint(args.source)
        model = model_from_checkpoint(ckpt)
        settings["calibration"] = Calibration.from_dict(ckpt.get("calibration"))
    if args.compile:
        out = export.compile_package(model, args.out or api.compiled_path(args.source, args.device),
                                     device=args.device, **settings)
    elif args.out.endswith(".pt2"):
        out = export.export_program(model, args.out, device=args.device, **settings)
    else:
        out = export.save_recognizer(model, args.out, **settings)
    print(f"wrote {out}")


# ------------------------------------------------------------------------ calibrate

def _add_calibrate(p):
    a = p.add_argument
    # MODEL is optional, as for eval (calibrate DATA fits the shipped model)
    a("model", nargs="?", metavar="MODEL", help="a recognizer (.pt or .pt2) or a training checkpoint "
                                                "(RUN_DIR/best.ckpt) (default: the shipped pretrained model)")
    a("data", metavar="DATA", help="labelled images the model never trained on: a folder of LABEL.png files, "
                                   "a .tsv manifest, or `synthetic`")
    a("--out", required=True, help="where to write the calibrated copy (the model's own path replaces it)")
    _add_labelled_data(a, ["all", "val"], synth_n=2000, synth_seed=424242, synth_style="mix")
    a("--plot", default=None, help="also write a reliability diagram of the fit here (PNG)")


CALIBRATE_MIN_IMAGES = 50  # fewer fit a slope and intercept to noise (2 images gave one confidence for every read)


def _run_calibrate(args):
    from captcha_fast import api, confidence, export, formats
    from captcha_fast.evaluate import load_labelled
    from captcha_fast.synth import DIGITS_LETTERS, SynthConfig

    model = args.model or str(api.DEFAULT_MODEL)
    kind = formats.file_kind(model)
    suffix = {"torchscript": ".pt", "program": ".pt2", "compiled": ".pt2"}.get(kind, ".ckpt")  # the model's kind
    if Path(args.out).suffix != suffix:
        raise UsageError(f"--out must end in {suffix}: it is a calibrated copy of {model} "
                         f"({'a training checkpoint' if kind == 'unknown' else kind}), got {args.out}")
    if kind == "unknown":  # a training checkpoint (load_checkpoint names a foreign file)
        from captcha_fast.checkpoint import load_model
        from captcha_fast.recognizer import build_recognizer
        rec = build_recognizer(load_model(model))
    else:
        rec = api.load(model, device="cpu", compiled=False)
    synth = SynthConfig(style=args.synth_style, charset=DIGITS_LETTERS, min_len=4, max_len=8, seed=args.synth_seed)
    images, labels, _ = load_labelled(args.data, args.skip_bad, args.split, args.val_fraction, args.seed, synth,
                                      args.synth_n)
    if len(images) < CALIBRATE_MIN_IMAGES:
        raise ValueError(f"{len(images)} labelled images are too few to fit a confidence on: give at least "
                         f"{CALIBRATE_MIN_IMAGES} the model never trained on")
    reads = confidence.read_labelled(rec, images, labels, ignore_case=args.ignore_case)
    source = (f"{args.data}" + (f" (val split {args.val_fraction:g}, seed {args.seed})" if args.split == "val" else "")
              + (f" ({args.synth_n} of style {args.synth_style}, seed {args.synth_seed})" if args.data == "synthetic"
                 else ""))
    cal = confidence.fit_calibration(reads, source)
    out = export.with_calibration(model, cal, args.out)
    rels = {}
    for d in confidence.DECODERS:
        r = reads[d]
        rels[d] = {name: confidence.reliability(confidence.apply(c, d, r.scores), r.right)
                   for name, c in (("exp(score), uncalibrated", None), ("calibrated", cal))}
        slope, intercept = getattr(cal, d)
        cal_rel = rels[d]["calibrated"]
        print(f"{d}: confidence = sigmoid({slope:.4f} * logit(exp(score)) + {intercept:.4f}); on these {cal_rel.n} "
              f"reads ({cal_rel.accuracy:.1%} right): ECE {rels[d]['exp(score), uncalibrated'].ece:.3f} uncalibrated, "
              f"{cal_rel.ece:.3f} calibrated; {cal_rel.n_high} at confidence >= 0.9"
              + (f", {cal_rel.accuracy_high:.1%} right" if cal_rel.n_high else ""))
    if args.plot:
        from captcha_fast.plots import plot_reliability
        plot_reliability({f"{d} decoding": rels[d] for d in confidence.DECODERS}, args.plot,
                         title=f"{Path(model).name} on {source} (the reads it was fitted on)")
    print(f"wrote {out}")


# ---------------------------------------------------------------------------- bench

def _add_bench(p):
    p.add_argument("-n", type=int, default=1024, help="sequences to decode (default 1024)")
    p.add_argument("--beam", type=int, default=10, help="beam width (default 10)")
    p.add_argument("--batch", type=int, default=64, help="images per predict call (default 64)")


def _run_bench(args):
    import torch

    from captcha_fast import bench

    checked_positive(n=args.n, batch=args.batch)
    checked_decoding("beam", args.beam)
    threads = torch.get_num_threads()
    print(bench.format_table(bench.decode_table(N=args.n, beam_width=args.beam),
                             f"decoding the shipped model's log-probs for {args.n} fresh captchas, {threads} threads"))
    print()
    print(bench.format_table(bench.predict_table(batch=args.batch),
                             f"reading {args.batch} fresh 50x200 captchas with the shipped model, {threads} threads",
                             unit="img/s"))


# ---------------------------------------------------------------------------- serve

def _add_serve(p):
    from captcha_fast.preprocess import MAX_PIXELS

    p.add_argument("--model", default=None, help="recognizer file (.pt or .pt2; default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, printed at start)")
    p.add_argument("--max-batch", type=int, default=32, help="most images per model call (default 32; 1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long an idle server waits to gather a batch (default 0: batches form from "
                        "what queues while the model runs)")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting; more get 503 (default 1024)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body; larger get 413 (default 8)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"largest image (width x height pixels, read before decoding); larger get 400 "
                        f"(default {MAX_PIXELS})")
    p.add_argument("--max-images", type=int, default=None,
                   help="most images in one JSON request; more get 413 (default: serve.MAX_IMAGES, 256)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _run_serve(args):
    from captcha_fast import serve  # ImportError naming the extra when it is not installed

    checked_device(args.device)
    fields = [f.name for f in dataclasses.fields(serve.ServeConfig)]
    try:
        config = serve.ServeConfig(**{name: getattr(args, name) for name in fields
                                      if getattr(args, name) is not None})  # None: ServeConfig's default
    except ValueError as e:  # named as the flags
        raise UsageError(re.sub(r"\b(" + "|".join(fields) + r")\b", lambda m: flag_of(m.group(1)), str(e))) from None
    serve.run(config)


# ----------------------------------------------------------------------------- info

def _run_info(args):
    import platform

    import torch

    import captcha_fast

    print(f"captcha_fast {captcha_fast.__version__} ({Path(captcha_fast.__file__).parent})")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    print(f"compiled library: {captcha_fast.LIBRARY_PATH}")
    print(f"CUDA kernels built: {'yes' if captcha_fast.CUDA_KERNELS else 'no'}")
    print(f"CPU threads: {torch.get_num_threads()} ({torch.__config__.parallel_info().splitlines()[-1].strip()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("CUDA devices: none")
    from captcha_fast import api
    print(f"shipped model: {api.DEFAULT_MODEL} ({'present' if api.DEFAULT_MODEL.exists() else 'MISSING'})")
    if api.DEFAULT_MODEL.exists():
        rec = api.default_model()
        device = getattr(rec, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        how = {"compiled": f"AOTInductor package {api.compiled_path(api.DEFAULT_MODEL, device)}",
               "torchscript": "TorchScript (`captcha-fast export " + str(api.DEFAULT_MODEL) +
                              " --compile` makes it faster: AOTInductor)"}.get(api.format_of(rec), api.format_of(rec))
        print(f"predict uses: {how}, on {device}")
    from captcha_fast.machine import thread_decision
    d = thread_decision()
    quota = "none" if d.quota is None else f"{d.quota:g} CPUs"
    print(f"predict threads now: {d.threads} (torch's {d.cap}; {d.cpus} CPUs in the affinity mask, "
          f"{d.others:.1f} kept busy by other processes, cgroup quota {quota})")


# ----------------------------------------------------------------------------- main

# name, help, example, add_arguments (None: no arguments), run
COMMANDS = [
    ("demo", "render fresh captchas and read them with the shipped model", "captcha-fast demo -n 32",
     _add_demo, _run_demo),
    ("predict", "read images: one line per image, path<TAB>text<TAB>score<TAB>confidence (P(right), 0-1)",
     "captcha-fast predict --model runs/v2/model.pt captchas/ 'more/*.png' --top-k 3", _add_predict, _run_predict),
    ("train", "train a recognizer on a folder of images named by their labels (DATA: folder, .tsv or `synthetic`)",
     "captcha-fast train ../shared/data/captcha_images_v2 --out runs/v2\n"
     "  torchrun --nproc_per_node 2 -m captcha_fast train ../shared/data/captcha_images_v2 --out runs/v2",
     _add_train, _run_train),
    ("eval", "accuracy, character error rate and confusions of a model on labelled images",
     "captcha-fast eval runs/v2/model.pt ../shared/data/captcha_images_v2 --split val --json\n"
     "  captcha-fast eval my_labelled_captchas/     (the shipped model)", _add_eval, _run_eval),
    ("export", "write a recognizer (TorchScript .pt, torch.export .pt2, or with --compile an AOTInductor .pt2)",
     "captcha-fast export runs/v2/best.ckpt --out model.pt\n"
     "  captcha-fast export runs/v2/model.pt --compile     (predict --model runs/v2/model.pt then uses it)",
     _add_export, _run_export),
    ("calibrate", "fit a model's confidence (P(right) of a read) on labelled held-out images; write it into a copy",
     "captcha-fast calibrate runs/v2/model.pt ../shared/data/captcha_images_v2 --split val --out runs/v2/model.pt",
     _add_calibrate, _run_calibrate),
    ("bench", "decode and predict throughput on this machine", "captcha-fast bench -n 1024", _add_bench, _run_bench),
    ("serve", "an HTTP server that reads images, batching concurrent requests (needs the serve extra)",
     "captcha-fast serve --port 8000\n  curl --data-binary @captcha.png -H 'Content-Type: image/png' "
     "localhost:8000/predict", _add_serve, _run_serve),
    ("info", "versions, compiled kernels, threads and devices", "captcha-fast info", None, _run_info),
]
_ALL = object()


class _CommandParser(argparse.ArgumentParser):
    """A command's parser, which takes options between its positionals too: argparse's plain parse
    fills an optional positional greedily, so `eval MODEL --json DATA` would leave DATA unfilled."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls this method itself
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser(only=_ALL) -> argparse.ArgumentParser:
    """The parser of every command; with `only` a command name (or None), only that command gets
    its arguments, so parsing one command imports nothing another one needs."""
    parser = argparse.ArgumentParser(prog="captcha-fast", description="Read captchas and short text lines, fast.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    for name, help, example, add, run in COMMANDS:
        p = sub.add_parser(name, help=help, description=f"{help}\n\nexample:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(run=run)
        if add is not None and only in (_ALL, name):
            add(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the only top-level option is a flag
    args = build_parser(only=command).parse_args(argv)  # usage errors exit 2
    try:
        with warnings.catch_warnings():  # restores showwarning after the command (main may run again in-process)
            if not args.debug:
                warnings.showwarning = lambda message, *_, **__: print(
                    f"captcha-fast {args.command}: warning: {_message(message)}", file=sys.stderr)
            args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except UsageError as e:
        print(f"captcha-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # train keeps every finished epoch in last.ckpt: say how to go on from it
        more = (f"; `captcha-fast {shlex.join(argv)} --resume` continues from the last finished epoch"
                if args.command == "train" and not args.resume else "")
        print(f"captcha-fast: interrupted{more}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`captcha-fast predict DIR | head`): stop quietly, with the status of a
        # process ended by SIGPIPE as other Unix tools; stdout goes to /dev/null so that Python's
        # final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except Exception as e:  # noqa: BLE001 - one clear line for users, the traceback with --debug
        if args.debug:
            raise
        print(f"captcha-fast {args.command}: error: {_message(e)}", file=sys.stderr)
        return 1
    return 0


def _message(e: BaseException) -> str:
    """The first line of an error's own message (a TorchScript error's, not the interpreter's banner)."""
    if "The following operation failed in the TorchScript interpreter" in str(e):
        from captcha_fast.recognizer import original_error
        e = original_error(e)
    text = str(e).strip().replace(preprocess.RAISE_MAX_PIXELS, "")  # advice for Python callers: no flag sets it
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
