import pytest
import torch

from captcha_fast import export
from captcha_fast.model import CRNN, CRNNConfig
from captcha_fast.synth import render, sample_rng


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A small untrained recognizer over 0-9a-f with confident (if meaningless) outputs:
    enough to check plumbing, formats and agreement between paths."""
    torch.manual_seed(0)
    m = CRNN(CRNNConfig("0123456789abcdef", channels=(8, 16), hidden_dim=32)).eval()
    m.classifier.weight.data *= 8
    return export.save_recognizer(m, tmp_path_factory.mktemp("tiny") / "model.pt")


@pytest.fixture(scope="session")
def png_folder(tmp_path_factory):
    """A folder of five rendered captchas, named by their labels."""
    folder = tmp_path_factory.mktemp("pngs")
    for i, text in enumerate(["3a7f", "0b1c", "c4d5e6", "ffff", "12ab"]):
        render(text, sample_rng(7, i), height=50).save(folder / f"{text}.png")
    return folder
