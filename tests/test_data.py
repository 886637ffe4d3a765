"""Data: labels from file names and manifests, split, bad files, collate, synthetic captchas."""
import random

import numpy as np
import pytest
import torch

from captcha_fast import preprocess
from captcha_fast.charset import Charset
from captcha_fast.data import (AugmentConfig, BucketBatchSampler, CaptchaDataset, Sample, augment, background_level,
                               check_labels, collate, item_generator, label_from_name, list_samples, load_samples,
                               read_manifest, scan_folder, split_samples, synth_cache_key, synthetic_dataset)
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


def test_a_folder_whose_names_are_not_labels_is_refused(folder, tmp_path):
    """captcha_0001.png ... would each be labelled 'captcha' and trained on silently."""
    image = next(folder.iterdir()).read_bytes()
    for i in range(10):
        (tmp_path / f"captcha_{i:04d}.png").write_bytes(image)
    for label in ("ab12", "cd34", "ef56", "gh78", "ij90", "kl12", "mn34", "op56", "qr78"):
        (tmp_path / f"{label}.png").write_bytes(image)
    with pytest.raises(ValueError, match=r"10 of the 19 images in .* are labelled 'captcha' by their names .*"
                                         r"e\.g\. captcha_0000\.png"):
        scan_folder(tmp_path)
    (tmp_path / "st90.png").write_bytes(image)  # 10 of 20: not over half, a plausible set of repeated labels
    assert len(scan_folder(tmp_path)) == 20


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
    with pytest.raises(ValueError, match=r"AB1\.png' is not a readable image"):
        CaptchaDataset(samples, cs, height=16)
    with pytest.warns(UserWarning, match=r"skipping: .*AB1\.png"):
        ds = CaptchaDataset(samples, cs, height=16, skip_bad=True)
    assert len(ds) == 6
    # evaluation loads through the same function: the same error, the same skip
    with pytest.raises(ValueError, match=r"AB1\.png' is not a readable image"):
        load_samples(samples)
    with pytest.warns(UserWarning, match=r"skipping: .*AB1\.png"):
        kept, images = load_samples(samples, skip_bad=True)
    assert kept == samples[:6] and all(im.dtype == torch.uint8 and im.shape[0] == 3 for im in images)


def test_too_wide_image_error_names_the_file(tmp_path):
    from PIL import Image
    Image.new("L", (1000, 8), 255).save(tmp_path / "AB_wide.png")  # 2000 px at height 16
    Image.new("L", (40, 16), 255).save(tmp_path / "AB.png")
    samples = scan_folder(tmp_path)
    with pytest.raises(ValueError,
                       match=r"AB_wide\.png: a 1000 x 8 image \(width x height\) is 2000 px wide .* max_width = 1999"):
        CaptchaDataset(samples, Charset("AB"), height=16, max_width=1999)
    with pytest.warns(UserWarning, match=r"skipping: .*AB_wide\.png"):
        assert len(CaptchaDataset(samples, Charset("AB"), height=16, max_width=1999, skip_bad=True)) == 1
    assert CaptchaDataset(samples, Charset("AB"), height=16, max_width=2000).width(1) == 2000


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
    ds = CaptchaDataset(samples, cs, height=16, in_channels=1)
    items = [ds[i] for i in range(len(ds))]
    for (image, label, targets), s in zip(items, samples):
        assert image.shape[:2] == (1, 16) and 0 <= float(image.min()) and float(image.max()) <= 1
        assert label == s.label and cs.decode(targets.tolist()) == label
    b = collate(items)
    widths = [im.shape[-1] for im, _, _ in items]
    assert b.images.shape == (6, 1, 16, max(widths)) and b.widths.tolist() == widths
    assert b.target_lengths.tolist() == [len(s.label) for s in samples]
    assert b.targets.tolist() == [t for _, _, tg in items for t in tg.tolist()]
    for i, w in enumerate(widths):  # each image intact in its own columns, padded with PAD_VALUE
        assert torch.equal(b.images[i, :, :, :w], items[i][0])
        assert (b.images[i, :, :, w:] == preprocess.PAD_VALUE).all()


@pytest.mark.parametrize("in_channels, ink", [(1, False), (3, False), (1, True)])
def test_training_tensors_are_the_recognizers(folder, tmp_path, in_channels, ink):
    """A model sees at inference what it saw in training: the batch training builds equals the
    scripted Recognizer's preprocess (and preprocess.collate) of the same files, to within the
    1/255 of the uint8 the data set keeps."""
    import captcha_fast
    from PIL import Image

    from captcha_fast.export import save_recognizer
    from captcha_fast.model import CRNN, CRNNConfig
    d = tmp_path / "d"
    d.mkdir()
    for p in sorted(folder.glob("*.png"))[:3]:
        (d / p.name).write_bytes(p.read_bytes())
    rgba = Image.new("RGBA", (60, 25), (0, 0, 0, 0))  # transparent: white once composited
    rgba.paste((200, 30, 30, 160), (10, 5, 40, 20))
    rgba.save(d / "AB_rgba.png")
    Image.new("L", (31, 13), 90).save(d / "C1_grey.png")
    samples = scan_folder(d)
    ds = CaptchaDataset(samples, Charset("123ABC"), height=24, in_channels=in_channels, ink=ink)
    b = collate([ds[i] for i in range(len(ds))])
    files = [preprocess.load_image(s.path) for s in samples]
    model = CRNN(CRNNConfig("123ABC", height=24, in_channels=in_channels, channels=(4, 8), hidden_dim=8, ink=ink))
    rec = captcha_fast.load(save_recognizer(model, tmp_path / "m.pt"), device="cpu")
    for batch, widths in [preprocess.collate(files, 24, in_channels, ink=ink), rec.preprocess(files)]:
        assert widths.tolist() == b.widths.tolist()
        assert batch.shape == b.images.shape
        assert float((batch - b.images).abs().max()) <= 0.5 / 255 + 1e-6


def test_colour_rgba_composited_on_white(tmp_path):
    from PIL import Image
    im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # fully transparent: must read as white
    im.paste((255, 0, 0, 255), (10, 5, 20, 15))
    im.save(tmp_path / "AB.png")
    ds = CaptchaDataset(scan_folder(tmp_path), Charset("AB"), height=20, in_channels=3)
    x = ds[0][0]
    assert x.shape == (3, 20, 40)
    assert torch.allclose(x[:, 0, 0], torch.ones(3), atol=1 / 255)
    assert torch.allclose(x[:, 10, 15], torch.tensor([1.0, 0, 0]), atol=1 / 255)


def _text_block(background: float, ink: float) -> torch.Tensor:
    """(1, 32, 120): 'text' (vertical strokes) in the middle, a plain background around it, with
    the ink-map crop's margins."""
    img = torch.full((1, 32, 120), background)
    for x in range(24, 96, 8):
        img[:, 10:22, x:x + 3] = ink
    return img


def test_augment_fills_with_the_background():
    """Pixels pulled in from outside the image are the image's own background, not white: an ink
    map (black background) stays black at its edges and keeps its ink mass; a grey image's edges
    take its grey. (The old fill was 1.0: a white wedge at every rotated edge of an ink map.)"""
    strong = AugmentConfig(p=1.0, rotate_deg=6, shear=0.3, noise=0.0)
    ink_map = _text_block(background=0.0, ink=1.0)
    mass = float(ink_map.sum())
    for seed in range(20):
        a = augment(ink_map, item_generator(seed, 0, 0), strong, ink=True)
        edges = torch.cat([a[0, 0], a[0, -1], a[0, :, 0], a[0, :, -1]])
        assert float(edges.max()) < 0.05, (seed, float(edges.max()))
        # the affine resamples and the gain scales the ink (+-25%), the width stretch (+-10%)
        assert 0.6 * mass < float(a.sum()) < 1.45 * mass, (seed, float(a.sum()) / mass)
    grey = _text_block(background=0.7, ink=0.1)
    for seed in range(20):
        a = augment(grey, item_generator(seed, 0, 0), AugmentConfig(p=1.0, rotate_deg=8, shear=0.3, noise=0.0),
                    ink=False)
        inside = a[0, 2:5, 2:-2].median()  # background just inside the top edge
        corners = torch.stack([a[0, 0, 0], a[0, 0, -1], a[0, -1, 0], a[0, -1, -1]])
        assert float((corners - inside).abs().max()) < 0.02, seed


def test_joined_items_are_two_samples_side_by_side_with_a_background_gap(folder):
    samples = scan_folder(folder)
    cs = Charset.from_labels(s.label for s in samples)
    plain = CaptchaDataset(samples, cs, height=16)
    ds = CaptchaDataset(samples, cs, height=16, join=1.0, seed=3)
    joined = 0
    for i in range(len(ds)):
        image, label, targets = ds[i]
        first = plain[i]
        assert label.startswith(first[1]) and cs.decode(targets.tolist()) == label
        w1 = first[0].shape[-1]
        assert torch.equal(image[..., :w1], first[0])
        others = [plain[j][0] for j in range(len(plain)) if plain[j][1] == label[len(first[1]):]]
        other = next(o for o in others if torch.equal(image[..., image.shape[-1] - o.shape[-1]:], o))
        gap = image.shape[-1] - w1 - other.shape[-1]
        assert 4 <= gap <= 12  # at least a frame for a blank between equal neighbours
        assert torch.allclose(image[..., w1: w1 + gap], background_level(first[0], False).expand(1, 16, gap))
        joined += 1
    assert joined == len(ds)
    again = CaptchaDataset(samples, cs, height=16, join=1.0, seed=3)
    assert [again[i][1] for i in range(len(ds))] == [ds[i][1] for i in range(len(ds))]  # seeded
    ds.set_epoch(1)
    assert [ds[i][1] for i in range(len(ds))] != [again[i][1] for i in range(len(ds))]  # a new partner each epoch
    half = CaptchaDataset(samples * 20, cs, height=16, join=0.5)
    assert 30 < sum(len(half[i][1]) > len(half.samples[i].label) for i in range(len(half))) < 90
    with pytest.raises(ValueError, match="join must be a share in \\[0, 1\\], got 1.5"):
        CaptchaDataset(samples, cs, height=16, join=1.5)


def test_augment_is_seeded():
    img = _text_block(0.0, 1.0)
    a = augment(img, item_generator(1, 2, 3), AugmentConfig(p=1.0), ink=True)
    b = augment(img, item_generator(1, 2, 3), AugmentConfig(p=1.0), ink=True)
    c = augment(img, item_generator(1, 3, 3), AugmentConfig(p=1.0), ink=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape[1] == 32 and 108 <= a.shape[2] <= 132 and 0 <= float(a.min()) and float(a.max()) <= 1


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


def test_synth_cache_key_covers_every_field():
    import copy
    import dataclasses
    base = SynthConfig(charset="AB12", min_len=2, max_len=3)
    key = synth_cache_key(base, 10, 32, 1)
    assert synth_cache_key(SynthConfig(charset="AB12", min_len=2, max_len=3), 10, 32, 1) == key
    changed = {str: lambda v: v + "Z", int: lambda v: v + 1, bool: lambda v: not v, tuple: lambda v: v + (44,)}
    for f in dataclasses.fields(SynthConfig):
        other = copy.copy(base)  # set without __post_init__: the key must not care whether a value is valid
        setattr(other, f.name, changed[type(getattr(base, f.name))](getattr(base, f.name)))
        assert synth_cache_key(other, 10, 32, 1) != key, f"SynthConfig.{f.name} is not in the cache key"
    assert len({key, synth_cache_key(base, 11, 32, 1), synth_cache_key(base, 10, 16, 1),
                synth_cache_key(base, 10, 32, 3), synth_cache_key(base, 10, 32, 1, ink=True)}) == 5


def test_synthetic_cache_is_reused(tmp_path, monkeypatch):
    sc, cs = SynthConfig(charset="AB12", min_len=2, max_len=3, seed=4), Charset("12AB")
    first = synthetic_dataset(sc, 5, cs, height=16, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [synth_cache_key(sc, 5, 16, 1)]

    def no_rendering(*args):
        raise AssertionError("rendered again instead of reading the cache")
    monkeypatch.setattr("captcha_fast.synth.SyntheticCaptchas.item", no_rendering)
    monkeypatch.setattr("captcha_fast.synth.SyntheticCaptchas.__getitem__", no_rendering)
    again = synthetic_dataset(sc, 5, cs, height=16, cache_dir=tmp_path)
    assert [s.label for s in again.samples] == [s.label for s in first.samples]
    assert all(torch.equal(a, b) for a, b in zip(again.images, first.images))
    with pytest.raises(AssertionError, match="rendered again"):  # another set is not served from this file
        synthetic_dataset(SynthConfig(charset="AB12", min_len=2, max_len=3, seed=4, clean=True), 5, cs, height=16,
                          cache_dir=tmp_path)
