"""Data: labels from file names and manifests, split, bad files, collate, synthetic captchas."""
import random
import warnings

import numpy as np
import pytest
import torch

from captcha_fast.charset import Charset
from captcha_fast.data import (AugmentConfig, BucketBatchSampler, CaptchaDataset, Sample, augment, check_labels,
                               collate, item_generator, label_from_name, list_samples, read_manifest, scan_folder,
                               split_samples)
from captcha_fast.synth import SynthConfig, SyntheticCaptchas, write_synthetic


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six seeded captchas written as LABEL_i.png."""
    d = tmp_path_factory.mktemp("captchas")
    write_synthetic(d, SynthConfig(charset="ABC123", min_len=3, max_len=5, seed=7), 6)
    return d


def test_label_from_name():
    assert label_from_name("x/24pew.png") == "24pew"
    assert label_from_name("24pew_3.png") == "24pew"
    assert label_from_name("24pew-b.png") == "24pew"
    assert label_from_name("mm3nn_x-y.png") == "mm3nn"


def test_scan_folder_and_manifest(folder, tmp_path):
    samples = scan_folder(folder)
    assert len(samples) == 6
    gen = SyntheticCaptchas(SynthConfig(charset="ABC123", min_len=3, max_len=5, seed=7), 6)
    assert sorted(s.label for s in samples) == sorted(gen.label(i) for i in range(6))
    manifest = tmp_path / "m.tsv"
    manifest.write_text("# comment\n" + "".join(f"{s.path}\t{s.label.lower()}\n" for s in samples) + "\n")
    listed = list_samples(manifest)
    assert [s.label for s in listed] == [s.label.lower() for s in samples]
    (tmp_path / "bad.tsv").write_text("only-a-path.png\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: expected 'path<TAB>label'"):
        read_manifest(tmp_path / "bad.tsv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_samples(tmp_path / "nowhere")


def test_charset_from_labels_is_sorted_and_stable():
    a = Charset.from_labels(["b2a", "c1"])
    b = Charset.from_labels(["c1", "b2a"])
    assert a.symbols == b.symbols == "12abc"


def test_split_deterministic_and_order_independent():
    samples = [Sample(f"/d/{i:04d}x.png", "ab") for i in range(400)]
    train, val = split_samples(samples, 0.2, seed=3)
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    train2, val2 = split_samples(shuffled, 0.2, seed=3)
    assert {s.path for s in val} == {s.path for s in val2}
    assert len(train) + len(val) == 400 and 50 < len(val) < 110
    # same file name in another folder lands on the same side; another seed gives another split
    moved = [Sample(s.path.replace("/d/", "/e/"), s.label) for s in samples]
    assert {s.path[3:] for s in split_samples(moved, 0.2, seed=3)[1]} == {s.path[3:] for s in val}
    assert {s.path for s in split_samples(samples, 0.2, seed=4)[1]} != {s.path for s in val}


def test_corrupt_image_error_and_skip(folder, tmp_path):
    bad = tmp_path / "AB1.png"
    bad.write_bytes(b"not a png at all")
    samples = scan_folder(folder) + [Sample(str(bad), "AB1")]
    cs = Charset("123ABC")
    with pytest.raises(ValueError, match=r"AB1\.png.*cannot be read"):
        CaptchaDataset(samples, cs, height=16)
    with pytest.warns(UserWarning, match=r"skipping: .*AB1\.png"):
        ds = CaptchaDataset(samples, cs, height=16, skip_bad=True)
    assert len(ds) == 6


def test_label_outside_charset_error_and_skip(folder):
    samples = scan_folder(folder) + [Sample("/x/AZ1.png", "AZ1")]
    cs = Charset("123ABC")
    with pytest.raises(ValueError, match=r"'AZ1' of '/x/AZ1.png' has characters outside the charset.*'Z'"):
        check_labels(samples, cs)
    with pytest.warns(UserWarning, match="AZ1"):
        assert len(check_labels(samples, cs, skip_bad=True)) == 6


def test_dataset_and_collate(folder):
    samples = scan_folder(folder)
    cs = Charset.from_labels(s.label for s in samples)
    ds = CaptchaDataset(samples, cs, height=16, channels=1)
    items = [ds[i] for i in range(len(ds))]
    for (image, label, targets), s in zip(items, samples):
        assert image.shape[:2] == (1, 16) and 0 <= float(image.min()) and float(image.max()) <= 1
        assert label == s.label and cs.decode(targets.tolist()) == label
    b = collate(items)
    widths = [im.shape[-1] for im, _, _ in items]
    assert b.images.shape == (6, 1, 16, max(widths)) and b.widths.tolist() == widths
    assert b.target_lengths.tolist() == [len(s.label) for s in samples]
    assert b.targets.tolist() == [t for _, _, tg in items for t in tg.tolist()]
    for i, w in enumerate(widths):  # each image intact in its own columns
        assert torch.equal(b.images[i, :, :, :w], items[i][0])


def test_colour_rgba_composited_on_white(tmp_path):
    from PIL import Image
    im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # fully transparent: must read as white
    im.paste((255, 0, 0, 255), (10, 5, 20, 15))
    im.save(tmp_path / "AB.png")
    ds = CaptchaDataset(scan_folder(tmp_path), Charset("AB"), height=20, channels=3)
    x = ds[0][0]
    assert x.shape == (3, 20, 40)
    assert torch.allclose(x[:, 0, 0], torch.ones(3), atol=1 / 255)
    assert torch.allclose(x[:, 10, 15], torch.tensor([1.0, 0, 0]), atol=1 / 255)


def test_augment_is_seeded_and_readable():
    img = torch.rand(1, 32, 100)
    a = augment(img, item_generator(1, 2, 3), AugmentConfig(p=1.0))
    b = augment(img, item_generator(1, 2, 3), AugmentConfig(p=1.0))
    c = augment(img, item_generator(1, 3, 3), AugmentConfig(p=1.0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape[1] == 32 and 85 <= a.shape[2] <= 115 and 0 <= float(a.min()) and float(a.max()) <= 1


def test_bucket_sampler_deterministic_and_sharded():
    widths = [random.Random(i).randint(50, 200) for i in range(103)]
    s = BucketBatchSampler(widths, 8, seed=5, bucket=4)
    s.set_epoch(2)
    first = list(s)
    s2 = BucketBatchSampler(widths, 8, seed=5, bucket=4)
    s2.set_epoch(2)
    assert list(s2) == first
    assert sorted(i for b in first for i in b) == list(range(103))
    s2.set_epoch(3)
    assert list(s2) != first
    shards = []
    for rank in range(2):
        r = BucketBatchSampler(widths, 8, seed=5, bucket=4, rank=rank, world=2)
        r.set_epoch(2)
        shards.append(list(r))
    assert len(shards[0]) == len(shards[1]) == len(first)
    for g, a, b in zip(first, *shards):  # every global batch split over the two ranks
        assert sorted(a + b) == sorted(g)


def test_synthetic_is_seeded():
    cfg = SynthConfig(charset="XYZ9", min_len=2, max_len=6, seed=11)
    a, b = SyntheticCaptchas(cfg, 5), SyntheticCaptchas(cfg, 5)
    for i in (4, 0, 2):  # any order
        (ia, ta), (ib, tb) = a[i], b[i]
        assert ta == tb and np.array_equal(np.asarray(ia), np.asarray(ib))
        assert 2 <= len(ta) <= 6 and set(ta) <= set("XYZ9") and ia.size[1] == 50
    other = SyntheticCaptchas(SynthConfig(charset="XYZ9", min_len=2, max_len=6, seed=12), 5)
    assert [other.label(i) for i in range(5)] != [a.label(i) for i in range(5)]
    with pytest.raises(ValueError, match="min_len"):
        SynthConfig(min_len=5, max_len=3)
