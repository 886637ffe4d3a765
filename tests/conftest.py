import pytest
import torch

from captcha_fast import export
from captcha_fast.model import CRNN, CRNNConfig
from captcha_fast.synth import render, sample_rng


TINY_CHARSET = "0123456789abcdef"


def tiny_model(seed: int = 0, in_channels: int = 1) -> CRNN:
    """A small untrained CRNN over 0-9a-f with a sharpened classifier: confident, non-trivial
    (if meaningless) outputs, so small numeric differences do not flip strings. Enough to check
    plumbing, formats and agreement between paths."""
    torch.manual_seed(seed)
    m = CRNN(CRNNConfig(TINY_CHARSET, channels=(8, 16), hidden_dim=32, in_channels=in_channels)).eval()
    m.classifier.weight.data *= 8
    return m


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """tiny_model() saved as a TorchScript recognizer (beam search by default)."""
    return export.save_recognizer(tiny_model(), tmp_path_factory.mktemp("tiny") / "model.pt")


@pytest.fixture(scope="session")
def png_folder(tmp_path_factory):
    """A folder of five rendered captchas, named by their labels."""
    folder = tmp_path_factory.mktemp("pngs")
    for i, text in enumerate(["3a7f", "0b1c", "c4d5e6", "ffff", "12ab"]):
        render(text, sample_rng(7, i), height=50).save(folder / f"{text}.png")
    return folder


@pytest.fixture(scope="session")
def calibration_folder(tmp_path_factory):
    """CALIBRATE_MIN_IMAGES (50) rendered captchas over TINY_CHARSET, named by their labels: the fewest
    `captcha-fast calibrate` fits on."""
    folder = tmp_path_factory.mktemp("cal_pngs")
    for i in range(50):
        rng = sample_rng(11, i)
        text = "".join(rng.choice(TINY_CHARSET) for _ in range(4))
        render(text, rng, height=50).save(folder / f"{text}_{i}.png")
    return folder
