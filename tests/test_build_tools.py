"""The model build's data tools (tools/real_sets.py, tools/build_pretrained.py): a real set read from
a git commit keeps the source bytes, drops duplicates and labels outside 0-9a-z and splits as
data.split_samples does; a build round's sources are walked through without repeats."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import captcha_fast
from captcha_fast.checkpoint import PRETRAINED_CHECKPOINT
from captcha_fast.data import Sample, split_samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import build_pretrained  # noqa: E402
import google_fonts  # noqa: E402
import real_sets  # noqa: E402
import style_heads  # noqa: E402


def _png(path: Path, shade: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (40, 16), shade).save(path)
    return path.read_bytes()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    """A git repository shaped like cloudchamb3r/captcha-ds: 02.labeled/LABEL[.N].png."""
    work = tmp_path / "src"
    names = {"1234.png": 10, "1234.1.png": 20, "5678.png": 30, "dup9.png": 10, "AB12.png": 40, "a-b1.png": 50}
    for i in range(40):
        names[f"{i:04d}.png"] = 60 + i
    for name, shade in names.items():
        _png(work / "02.labeled" / name, shade)
    _png(work / "other" / "0000.png", 5)  # outside the set's folder
    _git(work, "init", "-q")
    _git(work, "add", ".")
    _git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data")
    return work, _git(work, "rev-parse", "HEAD").strip()


def test_a_set_is_read_from_its_commit_with_the_source_bytes(repo, tmp_path):
    work, commit = repo
    rs = real_sets.RealSet("demo", "o/n", commit, "02.labeled/*.png", "MIT", "test", False)
    folder = tmp_path / "out" / "demo"
    labelled = real_sets._cloudchamb3r(real_sets.Repo(work / ".git", commit), folder)
    record = real_sets.prepare(rs, labelled, folder, set())

    assert not (folder / "other").exists()
    train = (folder / "train.tsv").read_text().splitlines()
    val = (folder / "val.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in train + val]
    for path, _ in rows:  # the bytes git stores, so check-training-data's hashes match the source
        assert (folder / path).read_bytes() == (work / path).read_bytes()
    labels = {Path(p).name: t for p, t in rows}
    # dup9.png is 1234.png's bytes (dropped as a duplicate); a-b1 has '-', outside 0-9a-z; AB12 is case-folded
    assert "dup9.png" not in labels and "a-b1.png" not in labels
    assert labels["AB12.png"] == "ab12" and labels["1234.1.png"] == "1234"
    assert record["dropped"] == {"label outside 0-9a-z": 1, "duplicate image": 1, "unreadable": 0}
    assert record["train"] + record["val"] == len(rows) == 44
    # the split is data.split_samples' (15% by a hash of the file name, seed 0)
    kept = [Sample(str(folder / p), t) for p, t in rows]
    want_val = {Path(s.path).name for s in split_samples(kept, 0.15, 0)[1]}
    assert {Path(line.split("\t")[0]).name for line in val} == want_val
    assert 0 < len(want_val) < len(rows)


def test_a_missing_commit_is_an_error_naming_it(repo):
    work, _ = repo
    with pytest.raises(SystemExit, match="0123456789abcdef0123456789abcdef01234567"):
        real_sets.Repo(work / ".git", "0123456789abcdef0123456789abcdef01234567")


def test_reading_tii_without_unar_says_so_before_writing_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(real_sets.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="apt-get install unar"):
        real_sets.main(["--repos", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_manifest_sample_picks_by_the_hash_of_the_written_path(tmp_path):
    rows = [(f"x/{i}.png", str(i)) for i in range(30)]
    (tmp_path / "m.tsv").write_text("".join(f"{p}\t{t}\n" for p, t in rows))
    got = real_sets.manifest_sample(tmp_path / "m.tsv", 7)
    want = sorted(rows, key=lambda r: hashlib.sha256(r[0].encode()).hexdigest())[:7]
    assert got == [(str(tmp_path / p), t) for p, t in want]


def test_stream_slices_walk_every_item_once_per_pass():
    rows = list(range(10))
    first = build_pretrained.stream_slice(rows, 0, 4, "s") + build_pretrained.stream_slice(rows, 4, 6, "s")
    assert sorted(first) == rows and first != rows  # one pass: each item once, shuffled
    second = build_pretrained.stream_slice(rows, 10, 10, "s")
    assert sorted(second) == rows and second != first  # the next pass: reshuffled
    assert build_pretrained.stream_slice(rows, 7, 5, "s") == (first + second)[7:12]  # slices across passes agree


def test_round_counts_split_a_group_equally_over_its_sources():
    sources = {"v2": ("v2", []), "varlen": ("varlen", []), "a": ("real", []), "b": ("real", [])}
    shares = build_pretrained.parse_shares("synth=0.5,real=0.2,varlen=0.2,v2=0.05,blank=0.05")
    counts = build_pretrained.round_counts(shares, sources, 1000)
    assert counts == {"synth": 500, "blank": 50, "a": 100, "b": 100, "varlen": 200, "v2": 50}
    with pytest.raises(SystemExit, match="summing to 1"):
        build_pretrained.parse_shares("synth=0.5,real=0.2")
    with_pkg = build_pretrained.round_counts(build_pretrained.parse_shares("synth=0.3,pkg=0.2,real=0.5"), sources, 1000)
    assert with_pkg == {"synth": 300, "pkg": 200, "blank": 0, "a": 250, "b": 250, "varlen": 0, "v2": 0}


def test_the_pkg_group_is_a_seeded_stream_of_package_renders_at_its_common_sizes(tmp_path):
    rows = build_pretrained.render_package_chunk(tmp_path / "a", 0, 6)
    later = build_pretrained.render_package_chunk(tmp_path / "b", 3, 3)  # a later round renders its own indices
    assert [Path(p).read_bytes() for p, _ in rows[3:]] == [Path(p).read_bytes() for p, _ in later]
    assert [label for _, label in rows[3:]] == [label for _, label in later]
    for path, label in rows:
        assert label == label.lower() and 4 <= len(label) <= 6 and set(label) <= set(build_pretrained.CHARSET)
        assert Image.open(path).size in {(160, 60), (200, 50), (280, 90)}
    assert len({Path(p).read_bytes() for p, _ in rows}) == 6
    assert build_pretrained.render_package_chunk(tmp_path / "a", 0, 6) == rows  # rendered already: labels drawn again
    # --pkg-extra: 200 more chances of 0 among 262 make about three symbols in four a 0
    zeros = "".join(label for _, label in build_pretrained.render_package_chunk(tmp_path / "c", 0, 30, "0" * 200))
    assert 0.6 < zeros.count("0") / len(zeros) < 0.9
    assert build_pretrained.extra_text("0Oo0") == " with 0 3x as likely, O 2x as likely, o 2x as likely"
    with pytest.raises(SystemExit, match="'0Oo!' holds symbols outside 0-9a-zA-Z"):
        build_pretrained.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--pkg-extra", "0Oo!"])
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_resumed_build_draws_its_pkg_group_as_it_did_unless_told_otherwise(tmp_path, monkeypatch):
    state = {"run": "r", "init": None, "start_scored": True, "hours": 0.0, "next_round": 3, "font_packages": [],
             "pkg_extra": "0Oo0Oo"}
    build_pretrained.write_json(tmp_path / "state.json", state)
    monkeypatch.setattr(build_pretrained, "fixed_sources", lambda data, real: {})

    class Drawn(Exception):
        pass

    def prepare_round(out, state, sources, shares, args):
        raise Drawn(state["pkg_extra"])
    monkeypatch.setattr(build_pretrained, "prepare_round", prepare_round)
    for given, drawn in (([], "0Oo0Oo"), (["--pkg-extra", ""], ""), (["--pkg-extra", "0"], "0")):
        with pytest.raises(Drawn) as e:
            build_pretrained.main(["--data", str(tmp_path), "--out", str(tmp_path), "--hours", "1", *given])
        assert e.value.args == (drawn,)


def test_a_resumed_build_trains_with_the_parts_it_froze_unless_told_otherwise(tmp_path, monkeypatch):
    state = {"run": "r", "init": None, "start_scored": True, "hours": 0.0, "next_round": 3, "font_packages": [],
             "freeze": ["convs", "project"]}
    build_pretrained.write_json(tmp_path / "state.json", state)
    monkeypatch.setattr(build_pretrained, "fixed_sources", lambda data, real: {})

    class Frozen(Exception):
        pass

    def prepare_round(out, state, sources, shares, args):
        raise Frozen(args.freeze, state["freeze"])
    monkeypatch.setattr(build_pretrained, "prepare_round", prepare_round)
    for given, frozen in (([], ["convs", "project"]), (["--freeze", "convs"], ["convs"])):
        with pytest.raises(Frozen) as e:
            build_pretrained.main(["--data", str(tmp_path), "--out", str(tmp_path), "--hours", "1", *given])
        assert e.value.args == (frozen, frozen)


def test_model_cost_prices_a_width_with_the_checkpoints_own_reads(tmp_path):
    """tools/model_cost.py: NAME=CKPT:C1,C2,H is the checkpoint grown by model.widen (the shape
    priced, the reads unchanged); a spec without NAME= is refused by name."""
    import model_cost
    from captcha_fast.checkpoint import save_checkpoint
    from conftest import tiny_model

    src = tiny_model()
    path = save_checkpoint({"model": src.state_dict(), "model_config": src.config.to_dict()}, tmp_path / "m.ckpt")
    name, wide = model_cost.parse_model(f"wide={path}:12,24,48")
    assert name == "wide" and (wide.config.channels, wide.config.hidden_dim) == ((12, 24), 48)
    x = torch.rand(2, 1, 32, 100)
    widths = torch.tensor([100, 60])
    with torch.no_grad():
        torch.testing.assert_close(wide.eval()(x, widths), src(x, widths), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="NAME=CKPT"):
        model_cost.parse_model(str(path))


def test_a_round_is_scored_as_the_mean_of_the_last_rounds_weights(tmp_path):
    """--average K: round k's candidate holds the mean of rounds k-K+1..k's weights (BatchNorm's running
    statistics too, counters from round k), over the rounds of OUT with round k's model config only."""
    from captcha_fast.checkpoint import model_from_checkpoint, save_checkpoint
    from captcha_fast.model import CRNN, CRNNConfig
    from conftest import TINY_CHARSET, tiny_model

    models = {1: CRNN(CRNNConfig(TINY_CHARSET, channels=(8, 16), hidden_dim=16))}  # another width: not averaged
    for k in (2, 3, 4):
        models[k] = tiny_model(seed=k)
        for name, buf in models[k].named_buffers():
            buf.copy_(torch.rand_like(buf.float()).to(buf.dtype) if buf.is_floating_point() else torch.tensor(10 * k))
    for k, m in models.items():
        save_checkpoint({"model": m.state_dict(), "model_config": m.config.to_dict(), "epoch": k},
                        tmp_path / f"round_{k:04d}" / "last.ckpt")
    assert any("running_mean" in name for name in models[4].state_dict())
    for n, rounds in ((2, (3, 4)), (5, (2, 3, 4)), (1, (4,))):
        ckpt, averaged = build_pretrained.average_rounds(tmp_path, 4, n)
        assert averaged == len(rounds) and ckpt["epoch"] == 4
        for name, got in ckpt["model"].items():
            parts = [models[k].state_dict()[name] for k in rounds]
            want = torch.stack(parts).double().mean(0).to(got.dtype) if got.is_floating_point() else parts[-1]
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
        model_from_checkpoint(ckpt)  # loads as a model of round 4's config


def test_a_weighted_mean_of_checkpoints_weighs_every_float_tensor_and_refuses_mixed_shapes(tmp_path):
    from captcha_fast.checkpoint import save_checkpoint
    from captcha_fast.model import CRNN, CRNNConfig
    from conftest import TINY_CHARSET, tiny_model

    a, b = tiny_model(seed=1), tiny_model(seed=2)
    mean = build_pretrained.mean_weights([a.state_dict(), b.state_dict()], [3.0, 1.0])
    for name, t in a.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(mean[name], 0.75 * t + 0.25 * b.state_dict()[name])
        else:
            assert torch.equal(mean[name], t)
    other = CRNN(CRNNConfig(TINY_CHARSET, channels=(8, 16), hidden_dim=16))
    paths = [save_checkpoint({"model": m.state_dict(), "model_config": m.config.to_dict()}, tmp_path / f"{i}.ckpt")
             for i, m in enumerate((a, other))]
    with pytest.raises(SystemExit, match="different model configs"):
        build_pretrained.score_mean([str(tmp_path / "m.pt"), f"1:{paths[0]}", f"1:{paths[1]}", "--data", str(tmp_path)])


def test_a_checkpoint_saved_before_a_config_field_existed_is_the_same_shape(tmp_path):
    """The shipped default.ckpt was saved before res_blocks: its config lacks the field (the default, 0), and it
    averages with rounds saved after (the soup of `mean`, the rounds of --average), but not with a deeper one."""
    from captcha_fast.checkpoint import save_checkpoint
    from captcha_fast.model import CRNN, CRNNConfig
    from conftest import tiny_model

    old, new = tiny_model(seed=1), tiny_model(seed=2)
    legacy = {k: v for k, v in old.config.to_dict().items() if k != "res_blocks"}
    deep = CRNN(CRNNConfig(**{**new.config.to_dict(), "res_blocks": 1}))
    for k, (m, cfg) in enumerate(((old, legacy), (new, new.config.to_dict()), (deep, deep.config.to_dict())), 1):
        save_checkpoint({"model": m.state_dict(), "model_config": cfg, "epoch": k},
                        tmp_path / f"round_{k:04d}" / "last.ckpt")
    assert build_pretrained.average_rounds(tmp_path, 2, 2)[1] == 2
    assert build_pretrained.average_rounds(tmp_path, 3, 3)[1] == 1


def test_a_build_grown_from_another_builds_round_continues_its_hours_log_and_streams(tmp_path):
    """--init-from OUT/round_K/last.ckpt (a checkpoint without a build entry): the new build inherits
    round K's build.json (hours, data streams, draws) and OUT's log up to round K."""
    from argparse import Namespace

    from captcha_fast.checkpoint import save_checkpoint
    from conftest import tiny_model

    src = tiny_model()
    first = tmp_path / "first"
    folder = first / "round_0002"
    folder.mkdir(parents=True)
    init = save_checkpoint({"model": src.state_dict(), "model_config": src.config.to_dict()}, folder / "last.ckpt")
    rows = [{"run": "r1", "round": str(k), "hours": f"{0.5 * k:.4f}", "score": "0.5"} for k in range(4)]
    build_pretrained.write_log(first / build_pretrained.LOG_NAME, rows)
    entry = {"hours": 1.0, "round": 2, "run": "r1", "synth_next": 640, "draws": {"synth": 640}, "offsets": {"v2": 64},
             "synth_styles": {}, "synth_effects": {}, "started_from": ["random weights (at 0.00 h)"],
             "font_packages": [], "accuracy": {"score": 0.5, "unseen": 0.1}, "eval_sizes": {}}
    build_pretrained.write_json(folder / build_pretrained.ROUND_BUILD, entry)

    out = tmp_path / "second"
    args = Namespace(from_scratch=False, init_from=str(init), log=str(tmp_path / "no_log.csv"), channels=None,
                     hidden=48, res_blocks=None)
    state = build_pretrained.load_state(out, args)
    assert (state["hours"], state["next_round"], state["synth_next"]) == (1.0, 3, 640)
    assert state["offsets"] == {"v2": 64} and state["best"]["score"] == 0.5
    assert state["started_from"] == ["random weights (at 0.00 h)", f"{init}, grown from channels 8/16, GRU 32 to "
                                     "channels 8/16, GRU 48 (model.widen) (at 1.00 h)"]
    assert [r["round"] for r in build_pretrained.read_log(out / build_pretrained.LOG_NAME)] == ["0", "1", "2"]
    deeper = build_pretrained.load_state(tmp_path / "third",
                                         Namespace(**{**vars(args), "hidden": None, "res_blocks": 2}))
    assert deeper["started_from"][-1] == (f"{init}, grown from channels 8/16, GRU 32 to channels 8/16, GRU 32, "
                                          "2 residual blocks (new residual blocks start as the identity) (at 1.00 h)")


def test_a_known_format_is_the_labels_case_folded_alphabet_and_lengths(tiny_model_path):
    import accuracy_table

    known = accuracy_table.known_format(["0412", "A19", "7a0b2"])
    assert known == {"allowed": "012479ab", "min_length": 3, "max_length": 5}
    images = [torch.rand(3, 32, 96) for _ in range(6)]
    for hyps in captcha_fast.predict_batch(images, tiny_model_path, top_k=3, **known):  # what --known reads
        assert all(set(h.text) <= set(known["allowed"]) and 3 <= len(h.text) <= 5 for h in hyps)


def test_symbol_recall_counts_each_symbol_where_it_stands_in_reads_of_the_labels_length():
    import accuracy_table

    labels = ["0O1a", "o0ll", "I0", "0000"]
    reads = ["oo1A", "o0L1", "10x", "000"]  # the last two have other lengths: not compared
    recall = accuracy_table.symbol_recall(reads, labels, "0o1il")
    # by hand: 0 is right once of twice (0O1a: o, o0ll: 0); o twice of twice (O, o); 1 once; l once of twice
    assert recall == {"0": (1, 2), "o": (2, 2), "1": (1, 1), "i": (0, 0), "l": (1, 2)}


def test_glyph_separability_draws_one_seeded_package_glyph_inside_its_canvas():
    import glyph_separability

    one, again = (glyph_separability.make_set(["0", "oO"], 5, 4, (0.55, 1.0), 0.55) for _ in range(2))
    assert torch.equal(one[0], again[0]) and torch.equal(one[1], again[1])  # seeded per glyph index
    assert one[0].shape == (4, 1, glyph_separability.CANVAS, glyph_separability.CANVAS)
    for g in one[0][:, 0]:
        rows, cols = (g > 0.5).nonzero(as_tuple=True)
        assert len(rows) > 20 and rows.min() > 0 and cols.min() > 0  # inked, and not cut by the canvas
        assert rows.max() < glyph_separability.CANVAS - 1 and cols.max() < glyph_separability.CANVAS - 1
    # the squeeze narrows: the same glyphs at squeeze 0.5 are about half as wide as at 1.0
    wide, narrow = (glyph_separability.make_set(["8"], 0, 4, (q, q), 1.0)[0] for q in (1.0, 0.5))
    width = lambda x: (x[:, 0] > 0.5).any(1).sum(1).float()  # noqa: E731 (inked columns per glyph)
    assert torch.allclose(width(narrow) / width(wide), torch.full((4,), 0.5), atol=0.1)
    crnn = glyph_separability.GlyphCRNN(2)  # --crnn: one score per class, a CTC loss on one-symbol labels
    assert crnn(one[0]).shape == (4, 2) and torch.isfinite(crnn.loss(one[0], one[1]))


def test_glyph_separability_in_context_crops_the_models_input_where_it_emits_each_round_glyph():
    """--in-context: the emitting frames are where the best path's symbols come from (the reference greedy
    decoder's symbols, in order); each 0/O/o of a read of the label's length gives one crop of the model's
    input, CROP columns around its frame, the same on a second run."""
    import glyph_separability
    from captcha_fast._reference import greedy_decode_reference

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        frames = torch.randn(30, 5, generator=g) * 2
        best = frames.argmax(-1).tolist()
        symbols, _ = greedy_decode_reference(frames.tolist())
        assert [best[t] for t in glyph_separability.spike_frames(best)] == list(symbols)
    found = glyph_separability.in_context(str(PRETRAINED_CHECKPOINT), 24, batch=8)
    again = glyph_separability.in_context(str(PRETRAINED_CHECKPOINT), 24, batch=24)
    assert len(found) >= 10 and {s for s, _, _ in found} == set("0Oo")
    assert [(s, ok) for s, ok, _ in found] == [(s, ok) for s, ok, _ in again]
    for (_, _, crop), (_, _, other) in zip(found, again):
        assert crop.shape == (32, glyph_separability.CROP) and torch.allclose(crop, other, atol=1e-5)


def test_a_build_refuses_to_go_on_without_the_fonts_it_rendered_with(tmp_path, monkeypatch):
    state = {"font_packages": ["fonts-dejavu-core", "fonts-lobster"]}
    build_pretrained.write_json(tmp_path / "state.json", state)
    monkeypatch.setattr(build_pretrained, "font_packages", lambda: ["fonts-dejavu-core"])
    with pytest.raises(SystemExit, match="not installed here \\(fonts-lobster\\).*apt-get install"):
        build_pretrained.main(["--data", str(tmp_path), "--out", str(tmp_path), "--hours", "1"])
    monkeypatch.setattr(build_pretrained, "font_packages", lambda: ["fonts-dejavu-core", "fonts-lobster"])
    assert build_pretrained.missing_fonts(state) == []


def test_error_gallery_draws_one_row_per_misread_up_to_show(tiny_model_path, png_folder):
    """tools/error_gallery.py: a row (ROW_H + 4 px) per misread, at most --show of them."""
    import error_gallery
    from captcha_fast import api
    from captcha_fast.preprocess import load_image

    model = api.load(tiny_model_path)
    paths = sorted(png_folder.glob("*.png"))
    images, labels = [load_image(p) for p in paths], [p.stem for p in paths]
    reads = list(labels)
    reads[1], reads[3] = "", labels[3].upper() + "x"  # two misreads (case alone is not one)
    reads[4] = labels[4].upper()
    sheet = error_gallery.gallery(model, images, labels, reads, show=8)
    assert sheet.height == 2 * (error_gallery.ROW_H + 4)
    assert error_gallery.gallery(model, images, labels, reads, show=1).height == error_gallery.ROW_H + 4


def _font_package(tmp: Path, name: str, version: str, ttf: bytes) -> Path:
    """An npm tarball shaped like @expo-google-fonts/<name>: package.json, two weights, the font licence."""
    import io
    import json
    import tarfile

    stem = name.title().replace("-", "")
    files = {"package/package.json": json.dumps({"name": f"@expo-google-fonts/{name}", "version": version}).encode(),
             f"package/400Regular/{stem}_400Regular.ttf": ttf, f"package/500Medium/{stem}_500Medium.ttf": ttf,
             "package/LICENSE_FONT": b"This Font Software is licensed under the SIL Open Font License, Version 1.1."}
    path = tmp / f"{name}-{version}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for n, data in files.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_google_fonts_installs_each_familys_regular_face_and_licence_and_pins_versions(tmp_path, monkeypatch):
    """tools/google_fonts.py with npm replaced by local tarballs: one folder per family holding its 400
    face (not the 500) and LICENSE_FONT; fonts.tsv rows name package, version and licence; a family whose
    face FreeType cannot render is dropped; --from asks for exactly the versions of another install."""
    from captcha_fast import synth

    ttf = Path(next(p for p in synth.pip_fonts() if p.endswith("DejaVuSans.ttf"))).read_bytes()
    packed = {"@expo-google-fonts/good-one": _font_package(tmp_path, "good-one", "0.4.1", ttf),
              "@expo-google-fonts/broken": _font_package(tmp_path, "broken", "0.2.0", b"not a font")}
    asked = []

    def npm_pack(spec, dest):
        asked.append(spec)
        name = spec.rsplit("@", 1)[0] if spec.count("@") == 2 else spec
        if name not in packed:
            raise subprocess.CalledProcessError(1, ["npm", "pack", spec])
        return packed[name]

    monkeypatch.setattr(google_fonts, "npm_pack", npm_pack)
    monkeypatch.setattr(google_fonts, "families",
                        lambda categories: {"Good One": "display", "Broken": "serif", "Absent": "serif"})
    google_fonts.main(["--out", str(tmp_path / "fonts"), "--jobs", "2"])
    assert sorted(p.name for p in (tmp_path / "fonts").iterdir()) == ["fonts.tsv", "good-one"]
    assert sorted(p.name for p in (tmp_path / "fonts" / "good-one").iterdir()) == ["GoodOne_400Regular.ttf",
                                                                                 "LICENSE_FONT"]
    rows = build_pretrained.installed_families(tmp_path / "fonts")
    assert rows == [{"family": "Good One", "package": "@expo-google-fonts/good-one", "version": "0.4.1",
                     "category": "display", "licence": "SIL OFL 1.1", "files": "GoodOne_400Regular.ttf"}]
    assert synth.font_fits(str(tmp_path / "fonts" / "good-one" / "GoodOne_400Regular.ttf"), synth.DIGITS_UPPER)
    asked.clear()
    google_fonts.main(["--out", str(tmp_path / "again"), "--from", str(tmp_path / "fonts" / "fonts.tsv")])
    assert asked == ["@expo-google-fonts/good-one@0.4.1"]
    assert build_pretrained.installed_families(tmp_path / "again") == rows


def test_a_build_renders_with_its_google_fonts_and_refuses_to_go_on_without_them(tmp_path):
    def install(folder, version):
        folder.mkdir(parents=True)
        rows = [{"family": "Good One", "package": "@expo-google-fonts/good-one", "version": version,
                 "category": "display", "licence": "SIL OFL 1.1", "files": "GoodOne_400Regular.ttf"}]
        google_fonts.write_list(rows, folder / "fonts.tsv")
        return rows

    rows = install(tmp_path / "fonts", "0.4.1")
    out, state = tmp_path / "out", {}
    build_pretrained.use_google_fonts(out, state, None)  # a build without them stays without them
    assert "google_fonts" not in state
    build_pretrained.use_google_fonts(out, state, tmp_path / "fonts")
    assert state["google_fonts"] == {"folder": str((tmp_path / "fonts").resolve()), "families": rows}
    assert google_fonts.read_list(out / "google_fonts.tsv") == rows  # what --from reinstalls
    assert build_pretrained.synth_config(state["google_fonts"]["folder"]).font_dirs[-1] == str(tmp_path / "fonts")
    with pytest.raises(SystemExit, match="rendered with 1 Google Fonts families: pass --fonts DIR.*--from"):
        build_pretrained.use_google_fonts(out, state, None)
    install(tmp_path / "other", "0.5.0")
    with pytest.raises(SystemExit, match="that --fonts .*other does not match"):
        build_pretrained.use_google_fonts(out, state, tmp_path / "other")


def test_the_model_card_counts_the_google_fonts_families_by_licence():
    families = [{"family": f, "licence": lic} for f, lic in
                (("A", "SIL OFL 1.1"), ("B", "Apache 2.0"), ("C", "SIL OFL 1.1"))]
    text = build_pretrained.google_fonts_text(families)
    assert "3 Google Fonts families" in text and text.endswith(": 2 SIL OFL 1.1, 1 Apache 2.0.")
    assert build_pretrained.google_fonts_text([]) == ""  # a build without them says nothing


def test_the_style_gate_learns_to_tell_a_style_by_its_features_and_frame_count():
    """Two kinds of (C, H, T) features: the style's brighter in channel 0 and wider; the gate trained on
    some routes held-out ones of each kind to their head."""
    g = torch.Generator().manual_seed(0)

    def kind(style: bool, n: int):
        return [torch.rand(4, 2, int(torch.randint(20, 30, (1,), generator=g)) + 10 * style, generator=g)
                + torch.tensor([0.6 * style, 0, 0, 0])[:, None, None] for _ in range(n)]
    train = kind(False, 120) + kind(True, 40)  # unbalanced, as the build's sources are
    gate = style_heads.train_gate(train, [0] * 120 + [1] * 40, heads=1, epochs=20)
    assert style_heads.routed_to(gate, kind(True, 50)).float().mean() > 0.95
    assert style_heads.routed_to(gate, kind(False, 50)).float().mean() < 0.05


@pytest.mark.parametrize("branch", ["rnn", "block2"])
def test_the_gate_learns_from_the_features_the_assembled_model_routes_by(branch):
    """style_heads.Features gives, per image, the shared features (the last conv's, or the first block's) that
    the assembled model's gate reads: a gate routes images alike from either, padded batches included."""
    from captcha_fast.model import StyleGate, with_style_heads
    from conftest import tiny_model
    from test_export import mixed_images
    from test_model import SHARED
    general, style = tiny_model(seed=0), tiny_model(seed=1)
    style.load_state_dict({k: v for k, v in general.state_dict().items() if k.startswith(SHARED[branch])},
                          strict=False)
    torch.manual_seed(2)
    model = with_style_heads(general, {"wide": style}, StyleGate(general.config.channels[1 if branch == "rnn" else 0], 1))
    gate, images = model.gate[0], mixed_images(12)
    with torch.no_grad():
        x, w = model.features(*captcha_fast.recognizer.build_recognizer(model).preprocess(images))
        scores = gate(x, w)
        gate.out.bias[1] -= (scores[:, 1] - scores[:, 0]).median() - 1e-4  # half the images to each head
        want = model.route(x, w)
        assert 0 < int(want.sum()) < len(images)
        assert torch.equal(style_heads.routed_to(gate, style_heads.Features(general, branch)(images)), want)


def test_a_style_head_from_a_build_out_is_the_mean_of_its_last_rounds_with_their_build_entry(tmp_path):
    from captcha_fast.checkpoint import save_checkpoint
    from conftest import tiny_model

    models = {k: tiny_model(seed=k) for k in (5, 6, 7)}
    for k, m in models.items():
        save_checkpoint({"model": m.state_dict(), "model_config": m.config.to_dict(), "epoch": 1},
                        tmp_path / f"round_{k:04d}" / "last.ckpt")
        build_pretrained.write_json(tmp_path / f"round_{k:04d}" / build_pretrained.ROUND_BUILD, {"round": k})
    build_pretrained.write_json(tmp_path / "state.json", {"next_round": 8})
    ckpt = style_heads.head_checkpoint(tmp_path, average=2)
    assert ckpt["build"] == {"round": 7}
    want = (models[6].classifier.weight.double() + models[7].classifier.weight.double()) / 2
    torch.testing.assert_close(ckpt["model"]["classifier.weight"], want.float())
    single = style_heads.head_checkpoint(tmp_path / "round_0005" / "last.ckpt", average=2)
    assert torch.equal(single["model"]["classifier.weight"], models[5].classifier.weight)


def test_the_model_card_says_what_each_style_head_was_trained_on_and_what_it_was_sent():
    b = {"hours": 12.0, "draws": {"pkg": 100, "synth": 500}, "eval_sizes": {"pkg_160x60": 300, "v2": 156}}
    head = {"about": "the package", "gate_images": {"style": 3000, "other": 2990},
            "routed": {"pkg_160x60": 290, "v2": 0},
            "build": {"hours": 12.5, "round": 50, "draws": {"pkg": 64100, "synth": 500}}}
    line, = build_pretrained.style_heads_text({"style_heads": {"captcha_pkg": head}}, b)
    assert "0.50 training hours" in line and "round 50" in line and "pkg 64,000" in line and "synth" not in line
    assert "3,000 of its renders and 2,990 other images" in line and "pkg_160x60 290 of 300; v2 0 of 156" in line
    assert "its own BiGRU and classifier on the shared convs and projection" in line
    block2 = {"style_heads": {"captcha_pkg": head}, "model_config": {"style_branch": "block2"}}
    line, = build_pretrained.style_heads_text(block2, b)
    assert "its own second conv block, projection, BiGRU and classifier on the shared first conv block" in line
    line, = build_pretrained.style_heads_text({"style_heads": {"captcha_pkg": {**head, "build": {}}}}, b)
    assert "its build unrecorded" in line
    assert build_pretrained.style_heads_text({}, b) == []


def test_a_head_taken_out_of_a_model_with_style_heads_carries_its_build(tmp_path):
    from captcha_fast.checkpoint import load_checkpoint, save_checkpoint
    from captcha_fast.model import StyleGate, with_style_heads
    from conftest import tiny_model

    general, style = tiny_model(seed=0), tiny_model(seed=1)
    style.load_state_dict({k: v for k, v in general.state_dict().items() if k.startswith(("convs.", "project."))},
                          strict=False)
    styled = with_style_heads(general, {"captcha_pkg": style}, StyleGate(16, 1))
    save_checkpoint({"model": styled.state_dict(), "model_config": styled.config.to_dict(), "build": {"round": 45},
                     "style_heads": {"captcha_pkg": {"build": {"round": 53}}}}, tmp_path / "s.ckpt")
    style_heads.extract([str(tmp_path / "s.ckpt"), "captcha_pkg", str(tmp_path / "head.ckpt")])
    head = load_checkpoint(tmp_path / "head.ckpt")
    assert head["build"] == {"round": 53} and "style_heads" not in head and head["version"] == 1
    assert all(torch.equal(head["model"][k], v) for k, v in style.state_dict().items())
    with pytest.raises(SystemExit, match="no style head 'other'"):
        style_heads.extract([str(tmp_path / "s.ckpt"), "other", str(tmp_path / "x.ckpt")])
