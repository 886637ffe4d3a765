#!/usr/bin/env bash
# Rebuilds the shipped model captcha_fast/pretrained/default.pt: a CRNN trained on seeded
# synthetic captchas from the `captcha` package (DroidSansMono, 50 px high, 4-8 characters
# of 0-9A-Z), then checks it on 1000 fresh captchas of another seed.
#
#   tools/train_pretrained.sh [RUN_DIR]   (default runs/pretrained; about 20 min of training plus
#                                          3 min rendering 25k captchas, 1 thread of a busy 2-core CPU)
#
# Extra arguments after RUN_DIR go to `captcha-fast train` (e.g. --threads 2).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/pretrained}
shift || true
python -m captcha_fast train synthetic --out "$RUN" \
    --synth-train 24000 --synth-val 1000 --synth-min-len 4 --synth-max-len 8 \
    --synth-charset 0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ --synth-cache runs/synth-cache \
    --height 32 --channels 16 32 --hidden 96 --dropout 0.1 --bucket 16 \
    --epochs 5 --batch-size 32 --lr 3e-3 --warmup 0.15 --seed 0 --threads 1 "$@"
cp "$RUN/model.pt" captcha_fast/pretrained/default.pt
# Fresh captchas (seed 12345, never seen in training or validation) -> accuracy.
python -m captcha_fast eval captcha_fast/pretrained/default.pt synthetic --synth-n 1000 --synth-seed 12345 --merge 0O,1I
