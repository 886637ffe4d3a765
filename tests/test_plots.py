"""Figures: curves.png and the gallery are real PNGs with the data drawn in them."""
import numpy as np
import pytest
import torch
from PIL import Image

from captcha_fast.plots import plot_curves, plot_gallery

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


def _has_colour(path, rgb, tol=40):
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).sum(-1) < tol).sum())


def test_curves(tmp_path):
    rows = [{"epoch": e, "train_loss": 3 / e, "train_acc": e / 10, "val_loss": 2.5 / e, "val_acc": e / 12,
             "val_cer": 1 - e / 12, "val_n": 5} for e in range(1, 11)]
    path = plot_curves(rows, tmp_path / "curves.png")
    assert Image.open(path).size == (1100, 420)
    assert _has_colour(path, BLUE) > 200 and _has_colour(path, ORANGE) > 200
    # no validation split (NaN columns, as metrics.csv strings): only the training curves
    rows = [{"epoch": str(e), "train_loss": str(3 / e), "train_acc": "0.5", "val_loss": "nan", "val_acc": "nan",
             "val_cer": "nan", "val_n": "0"} for e in range(1, 4)]
    path = plot_curves(rows, tmp_path / "train_only.png")
    assert _has_colour(path, BLUE) > 100 and _has_colour(path, ORANGE) == 0


@pytest.mark.parametrize("n", [0, 3])
def test_gallery(tmp_path, n):
    red = torch.zeros(4, 20, 60, dtype=torch.uint8)  # RGBA: transparent white, with a red box
    red[0, 5:15, 10:50], red[3, 5:15, 10:50] = 255, 255
    grey = torch.full((1, 30, 90), 0.2)  # float grey
    images = [red, grey, red][:n]
    path = plot_gallery(images, ["AB", "CD", "EF"][:n], ["A", "", "EF?"][:n], tmp_path / "g.png")
    assert Image.open(path).size[0] > 600
    assert (_has_colour(path, (255, 0, 0), tol=60) > 100) == (n > 0)  # the red box is drawn
