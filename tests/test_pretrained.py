"""The shipped model: it reads freshly rendered captchas of several styles and sizes (a floor well
below its measured accuracy, README "Accuracy"), reads nothing from images with no text, and
ships the weights that `captcha-fast train` fine-tunes from."""
import string

import numpy as np
import pytest
import torch

import captcha_fast
from captcha_fast import synth
from captcha_fast.checkpoint import PRETRAINED_CHECKPOINT, load_model
from captcha_fast.recognizer import build_recognizer

LETTERS = string.digits + string.ascii_letters
SEED = 424242  # a render seed no training run uses


def _renders():
    images, labels = [], []
    for w, h in ((160, 60), (200, 50), (280, 90)):  # the `captcha` package as users call it
        for i in range(8):
            rng = synth.sample_rng(SEED + w, i)
            text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 6)))
            images.append(synth.render_package(text, rng, w, h))
            labels.append(text)
    for style in ("v2", "varlen", "wordpress", "gradient", "kaptcha"):
        for image, text in synth.SyntheticCaptchas(synth.SynthConfig(style=style, charset=LETTERS, min_len=4,
                                                                     max_len=7, seed=SEED), 8):
            images.append(image)
            labels.append(text)
    return images, labels


def test_reads_fresh_captchas_of_several_styles_and_sizes():
    images, labels = _renders()
    reads = captcha_fast.predict_batch(images, device="cpu")
    right = sum(r.lower() == t.lower() for r, t in zip(reads, labels))
    assert right >= 0.5 * len(labels), list(zip(labels, reads))


@pytest.mark.parametrize("image", [
    np.full((50, 200, 3), 255, np.uint8),                                        # white
    np.zeros((50, 200, 3), np.uint8),                                            # black
    np.full((60, 160, 3), (120, 160, 200), np.uint8),                            # one colour
    np.linspace(0, 255, 200).astype(np.uint8)[None, :, None].repeat(50, 0).repeat(3, 2),  # gradient
    np.linspace(255, 80, 60).astype(np.uint8)[:, None, None].repeat(160, 1).repeat(3, 2),  # vertical gradient
])
def test_reads_nothing_from_an_image_with_no_text(image):
    assert captcha_fast.predict_batch([image], device="cpu") == [""]


def test_shipped_training_weights_match_the_shipped_recognizer():
    """default.ckpt (where fine-tuning starts) holds the weights default.pt was exported from. Both in
    float32: on a CPU with native bf16 the loaded model's default precision may read a borderline
    image differently (the model of rounds 22-26 reads one of these eight so)."""
    model = load_model(PRETRAINED_CHECKPOINT)
    rec = build_recognizer(model)
    images = [torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1) for im in _renders()[0][:8]]
    assert rec(images)[0] == captcha_fast.default_model(device="cpu", amp=False)(images)[0]
