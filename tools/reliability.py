"""Calibrate a recognizer's confidence on one set of held-out images and measure it on another.

    python tools/reliability.py captcha_fast/pretrained/default.pt --folder v2=DATA/captcha_images_v2 \\
        --folder varlen=DATA/varlen_upper -n 300 --plot docs/reliability.png --json reliability.json

Fit: synthetic renders of every style and the `captcha` package at its common sizes with render
seed 424242, and the even-numbered half (by file name) of each folder's validation split. Measure:
the same styles and sizes with render seed 12345, and the odd half of each validation split. Both
seeds are evaluation seeds: no training run renders them. Case ignored. Prints, per measured set
and decoder, accuracy, ECE and the reads at confidence >= 0.9 with their accuracy, for exp(score)
(the model's own probability) and for the fitted calibration; --write-model stores the fit in a copy
of the model (export.with_calibration)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import torch  # noqa: E402

import captcha_fast  # noqa: E402
from captcha_fast import confidence, export, synth  # noqa: E402
from captcha_fast.data import list_samples, split_samples  # noqa: E402
from captcha_fast.preprocess import load_image, to_tensors  # noqa: E402

import accuracy_table  # noqa: E402

FIT_SEED, MEASURE_SEED = 424242, 12345


def val_halves(folder: str, n: int):
    """The validation split of `folder` (as `captcha-fast train`'s), sorted by name, as two halves
    (even and odd positions), each of at most n images: (images, labels) pairs."""
    _, val = split_samples(list_samples(folder), 0.15, 0)
    val = sorted(val, key=lambda s: Path(s.path).name)
    halves = [val[0::2][:n], val[1::2][:n]]
    return [([load_image(s.path) for s in h], [s.label for s in h]) for h in halves]


def manifest_halves(tsv: str, n: int):
    """A .tsv manifest's items (tools/real_sets.py) as two halves (even and odd positions), each of at most n."""
    import real_sets  # tools/real_sets.py, beside this file

    items = real_sets.manifest_sample(tsv, 2 * n)
    return [([load_image(path) for path, _ in h], [label for _, label in h]) for h in (items[0::2], items[1::2])]


def synthetic_sets(seed: int, n: int) -> dict:
    sets = {f"captcha package {w}x{h}": accuracy_table.package_renders(w, h, n, seed)
            for w, h in accuracy_table.PACKAGE_SIZES}
    sets.update({f"synth {style}": accuracy_table.style_renders(style, n, seed) for style in synth.STYLES})
    return sets


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--folder", action="append", default=[], metavar="NAME=PATH", help="a labelled folder (its val split)")
    p.add_argument("--manifest", action="append", default=[], metavar="NAME=TSV",
                   help="a held-out manifest (a real set's val split): fitted on its even half, measured on the odd")
    p.add_argument("--unseen", action="append", default=[], metavar="NAME=TSV",
                   help="a manifest of a style never trained on: measured only (odd half), never fitted on")
    p.add_argument("-n", type=int, default=300, help="images per set and side (default 300)")
    p.add_argument("--plot", default=None, help="write the reliability diagram here (PNG)")
    p.add_argument("--json", default=None, help="write the measurements here")
    p.add_argument("--write-model", default=None, help="a copy of MODEL with the fitted calibration (MODEL: in place)")
    p.add_argument("--also", action="append", default=[], help="another file to store the calibration in (its "
                                                                  "training checkpoint), in place")
    p.add_argument("--per-set", action="store_true",
                   help="lower the fit until every fitting set keeps the promise on its reads at >= 0.9 (confidence."
                        "keeps_promise, fit_calibration groups); default: the plain Platt fit of the pooled reads")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rec = captcha_fast.load(args.model, device="cpu", compiled=False)
    fit_sets, measure_sets = synthetic_sets(FIT_SEED, args.n), synthetic_sets(MEASURE_SEED, args.n)
    for spec in args.folder:
        name, path = spec.split("=", 1)
        fit_sets[f"{name} (val split, even)"], measure_sets[f"{name} (val split, odd)"] = val_halves(path, args.n)
    for spec in args.manifest:
        name, path = spec.split("=", 1)
        fit_sets[f"{name} (even)"], measure_sets[f"{name} (odd)"] = manifest_halves(path, args.n)
    for spec in args.unseen:
        name, path = spec.split("=", 1)
        measure_sets[f"{name} (unseen style, odd)"] = manifest_halves(path, args.n)[1]

    def read(sets):
        return {name: confidence.read_labelled(rec, to_tensors(images), labels, ignore_case=True)
                for name, (images, labels) in sets.items()}

    fit_reads, measure_reads = read(fit_sets), read(measure_sets)
    pooled = {d: confidence.Reads(*[sum((getattr(r[d], f) for r in fit_reads.values()), []) for f in
                                    confidence.Reads._fields]) for d in confidence.DECODERS}
    source = (f"{args.n} images per set: styles {', '.join(synth.STYLES)} and the captcha package at "
              f"{', '.join(f'{w}x{h}' for w, h in accuracy_table.PACKAGE_SIZES)} (render seed {FIT_SEED})"
              + "".join(f", {s.split('=')[0]} val split (even half)" for s in args.folder + args.manifest))
    groups = [name for name, r in fit_reads.items() for _ in r["beam"].right] if args.per_set else None
    paid_for = {}
    cal = confidence.fit_calibration(pooled, source, groups=groups, paid_for=paid_for)
    for d, (shift, broken) in paid_for.items():
        print(f"{d}: the pooled fit's intercept lowered by {shift:.2f} for {', '.join(broken) or 'no set'}")
    print(f"fitted on {cal.n} reads: beam slope {cal.beam[0]:.4f} intercept {cal.beam[1]:.4f}; greedy slope "
          f"{cal.greedy[0]:.4f} intercept {cal.greedy[1]:.4f}")
    results, curves = {}, {d: {} for d in confidence.DECODERS}
    all_measured = {d: {"raw": ([], []), "calibrated": ([], [])} for d in confidence.DECODERS}
    print(f"{'measured set':<34} {'dec':<6} {'acc':>6} | {'ECE raw':>7} {'n>=.9':>5} {'acc':>6} | "
          f"{'ECE cal':>7} {'n>=.9':>5} {'acc':>6}")
    for name, reads in measure_reads.items():
        results[name] = {}
        for d in confidence.DECODERS:
            r = reads[d]
            row = {}
            for kind, cal_used in (("raw", None), ("calibrated", cal)):
                conf = confidence.apply(cal_used, d, r.scores)
                rel = confidence.reliability(conf, r.right)
                row[kind] = {"ece": rel.ece, "n_high": rel.n_high, "accuracy_high": rel.accuracy_high,
                             "high_ok": rel.high_ok, "bins": rel.bins}
                all_measured[d][kind][0].extend(conf)
                all_measured[d][kind][1].extend(r.right)
            row["accuracy"] = sum(r.right) / len(r.right)
            results[name][d] = row
            flag = "" if row["calibrated"]["high_ok"] else "  <- below 90% at >= 0.9"
            print(f"{name:<34} {d:<6} {row['accuracy']:>6.1%} | {row['raw']['ece']:>7.3f} {row['raw']['n_high']:>5} "
                  f"{row['raw']['accuracy_high']:>6.1%} | {row['calibrated']['ece']:>7.3f} "
                  f"{row['calibrated']['n_high']:>5} {row['calibrated']['accuracy_high']:>6.1%}{flag}")
    for d in confidence.DECODERS:
        for kind, (conf, right) in all_measured[d].items():
            rel = confidence.reliability(conf, right)
            curves[d]["exp(score), uncalibrated" if kind == "raw" else "calibrated"] = rel
            print(f"all measured sets, {d}, {kind}: {rel.n} reads, accuracy {rel.accuracy:.1%}, ECE {rel.ece:.3f}, "
                  f"{rel.n_high} at >= 0.9 read {rel.accuracy_high:.1%} right")
    if args.plot:
        from captcha_fast.plots import plot_reliability
        plot_reliability({f"{d} decoding": curves[d] for d in confidence.DECODERS}, args.plot,
                         title=f"{Path(args.model).name}: {sum(len(r['beam'].right) for r in measure_reads.values())} "
                               f"held-out reads (case ignored)")
        print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "calibration": cal.to_dict(),
                                               "sets": results}, indent=1))
    if args.write_model:
        print(f"wrote {export.with_calibration(args.model, cal, args.write_model)}")
    for path in args.also:
        print(f"wrote {export.with_calibration(path, cal)}")


if __name__ == "__main__":
    main()
