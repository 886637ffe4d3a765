"""The captcha-fast command line: output formats, exit codes (0 ok, 1 failure, 2 usage)
and one-line errors."""
import dataclasses
import json
import re
import subprocess
import sys
import typing

import pytest

from captcha_fast import api
from captcha_fast.cli import build_parser, config_from_args, main

COMMANDS = ["demo", "predict", "train", "eval", "calibrate", "export", "bench", "info"]
TRAINING_MODULES = ["captcha_fast.train", "captcha_fast.data", "captcha_fast.evaluate", "captcha_fast.plots",
                    "captcha_fast.metrics", "captcha_fast.synth", "matplotlib", "captcha"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "example:\n  captcha-fast " + command in capsys.readouterr().out


def test_predict_lines(tiny_model_path, png_folder, capsys):
    assert main(["predict", "--model", str(tiny_model_path), str(png_folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    paths = sorted(png_folder.glob("*.png"))
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    want = api.predict_batch(paths, tiny_model_path)
    assert [line.split("\t")[1] for line in lines] == want
    assert all(float(line.split("\t")[2]) <= 0 for line in lines)


def test_predict_folder_skips_subfolders_named_like_images(tiny_model_path, png_folder, tmp_path, capsys):
    folder = tmp_path / "with_sub"
    (folder / "sub.png").mkdir(parents=True)
    (folder / "3a7f.png").write_bytes((png_folder / "3a7f.png").read_bytes())
    assert main(["predict", "--model", str(tiny_model_path), str(folder)]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [str(folder / "3a7f.png")]


def test_predict_json_top_k_and_glob(tiny_model_path, png_folder, capsys):
    assert main(["predict", "--model", str(tiny_model_path), "--json", "--top-k", "3",
                 str(png_folder / "*.png")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5
    for row in rows:
        scores = [h["score"] for h in row["hypotheses"]]
        assert 1 <= len(scores) <= 3 and scores == sorted(scores, reverse=True)
        assert row["text"] == row["hypotheses"][0]["text"]


def test_predict_greedy_matches_api(tiny_model_path, png_folder, capsys):
    assert main(["predict", "--model", str(tiny_model_path), "--greedy", "--batch-size", "2", str(png_folder)]) == 0
    texts = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    assert texts == api.predict_batch(sorted(png_folder.glob("*.png")), tiny_model_path, decoder="greedy")


@pytest.mark.parametrize("argv, code, match", [
    (["predict", "--model", "{model}", "/no/such/file.png"], 1, "no such file, folder or glob match: /no/such/file.png"),
    (["predict", "--model", "{model}", "--top-k", "5", "--beam", "2", "{folder}"], 2, "--top-k must be in"),
    (["predict", "--model", "{model}", "--greedy", "--top-k", "2", "{folder}"], 2, "greedy decoder gives one hypothesis"),
    (["predict", "--model", "{model}", "--greedy", "--max-length", "4", "{folder}"], 2,
     "--min-length, --max-length and --allowed need the beam decoder"),
    (["predict", "--model", "{model}", "--beam", "0", "{folder}"], 2, "--beam must be in [1, 4096], got 0"),
    (["predict", "--model", "{model}", "--min-length", "5", "--max-length", "3", "{folder}"], 2,
     "--max-length must be -1 (no limit) or in [max(--min-length, 1), 4096]"),
    (["predict", "--model", "{model}", "--allowed", "xyz", "{folder}"], 1, "allowed characters 'xyz' are not in"),
    (["predict", "--model", "{folder}/3a7f.png", "{folder}"], 1, "is not a captcha_fast recognizer"),
    (["predict", "--model", "{model}", "{corrupt}"], 1, "corrupt.png"),
    (["demo", "-n", "0"], 2, "-n must be >= 1, got 0"),
    (["eval", "{model}", "{folder}", "--batch-size", "0"], 2, "--batch-size must be >= 1, got 0"),
    (["eval", "{model}", "{folder}", "--beam", "0"], 2, "--beam must be in [1, 4096], got 0"),
    (["export", "{model}", "--out", "{folder}/x.pt", "--beam", "0"], 2, "--beam must be in [1, 4096], got 0"),
    (["bench", "--batch", "0"], 2, "--batch must be >= 1, got 0"),
    (["export", "{model}", "--out", "{folder}/x.onnx"], 2, "--out must end in .pt (TorchScript) or .pt2"),
    (["calibrate", "{model}", "{folder}", "--out", "{folder}/x.pt2"], 2,
     "--out must end in .pt: it is a calibrated copy"),
    (["bench", "-n", "0"], 2, "-n must be >= 1, got 0"),
    (["predict", "--model", "{model}", "--device", "foo", "{folder}"], 2,
     "--device must be 'cpu', 'cuda' or 'cuda:N' (N: a GPU's index), got 'foo'"),
    (["eval", "{model}", "{folder}", "--device", "tpu"], 2, "--device must be 'cpu', 'cuda' or 'cuda:N'"),
    (["export", "{model}", "--out", "{folder}/x.pt2", "--device", "mps"], 2, "--device must be 'cpu', 'cuda' or"),
    (["predict", "--model", "{folder}", "{folder}"], 1, "is a folder, not a recognizer file (.pt or .pt2)"),
])
def test_errors_are_one_line_with_exit_codes(argv, code, match, tiny_model_path, png_folder, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((png_folder / "3a7f.png").read_bytes()[:100])  # truncated PNG
    argv = [a.format(model=tiny_model_path, folder=png_folder, corrupt=corrupt) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_warnings_are_one_line_naming_the_command(tiny_model_path, png_folder, tmp_path, capsys):
    folder = tmp_path / "z"
    folder.mkdir()
    (folder / "3a7z.png").write_bytes((png_folder / "3a7f.png").read_bytes())  # z: not in the tiny charset
    assert main(["eval", str(tiny_model_path), str(folder)]) == 0
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "captcha-fast eval: warning: labels use symbols the model cannot read: 'z' (they count as errors)"], err


def test_eval_synthetic_draws_labels_from_the_models_charset(tiny_model_path, capsys):
    """By default the synthetic labels hold what the model reads (0-9A-Z scored the one-case shipped model 0%)."""
    assert main(["eval", str(tiny_model_path), "synthetic", "--synth-n", "6", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out.strip().splitlines()[-1])["n"] == 6
    assert main(["eval", str(tiny_model_path), "synthetic", "--synth-n", "6", "--synth-charset", "XYZ"]) == 0
    assert "cannot read: 'XYZ'" in capsys.readouterr().err


def test_cuda_where_torch_has_none_names_the_flag(tiny_model_path, png_folder, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, argv in (("cuda", ["predict", str(png_folder)]), ("cuda:0", ["eval", str(tiny_model_path),
                                                                            str(png_folder)])):
        assert main(argv + ["--device", device]) == 1
        err = capsys.readouterr().err
        assert f"--device '{device}': CUDA is not available here (torch {torch.__version__}" in err, err
        assert err.strip().endswith("use --device cpu") and len(err.strip().splitlines()) == 1, err


def test_eval_of_a_run_folder_names_its_recognizer(tiny_model_path, png_folder, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_model_path, run / "model.pt")
    assert main(["eval", str(run), str(png_folder)]) == 1
    err = capsys.readouterr().err
    assert f"'{run}' is a folder, not a recognizer file: its recognizer is '{run / 'model.pt'}'" in err, err
    assert main(["eval", str(run / "model.pt"), str(png_folder)]) == 0


def test_options_may_stand_between_a_commands_positionals(tiny_model_path, png_folder, calibration_folder, tmp_path,
                                                          capsys):
    """`eval MODEL --json DATA` scores as `eval MODEL DATA --json` does (argparse alone fills the optional
    MODEL and stops at the option, leaving DATA unfilled); so does calibrate's --out between MODEL and DATA,
    and predict's paths around an option."""
    reports = []
    for argv in (["eval", str(tiny_model_path), str(png_folder), "--json"],
                 ["eval", str(tiny_model_path), "--json", str(png_folder)]):
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        reports.append({k: v for k, v in report.items() if k != "seconds"})
    assert reports[0] == reports[1] and reports[0]["n"] == 5, reports
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", str(tiny_model_path), "--out", str(out), str(calibration_folder)]) == 0
    assert out.is_file()
    capsys.readouterr()
    paths = sorted(png_folder.glob("*.png"))
    assert main(["predict", "--model", str(tiny_model_path), str(paths[0]), "--greedy", str(paths[1])]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [str(p) for p in paths[:2]]


def test_eval_without_a_model_scores_the_shipped_one(png_folder, tmp_path, capsys):
    """eval DATA reads with the shipped model, as predict does; labels in the case the shipped model
    does not read (it reads lower case) get the advice to score case-free."""
    import shutil

    runs = []
    for argv in (["eval", str(png_folder)], ["eval", str(api.DEFAULT_MODEL), str(png_folder)]):
        assert main([*argv, "--json"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        runs.append((report["n"], report["correct"], report["errors"]))
    assert runs[0] == runs[1] and runs[0][0] == 5 and runs[0][1] > 0, runs
    upper = tmp_path / "upper"
    upper.mkdir()
    for p in png_folder.glob("*.png"):
        shutil.copy(p, upper / (p.stem.upper() + ".png"))
    assert main(["eval", str(upper)]) == 0
    assert re.search(r"^captcha-fast eval: warning: labels use symbols the model cannot read: 'ABCDEF' .*"
                     r"--ignore-case scores its reads case-free\)$", capsys.readouterr().err, re.M)


def test_too_many_pixels_gives_advice_a_cli_user_can_follow(tiny_model_path, png_folder, monkeypatch, capsys):
    from captcha_fast import preprocess

    monkeypatch.setattr(preprocess, "MAX_PIXELS", 100)  # the rendered captchas are 50 px high
    assert main(["predict", "--model", str(tiny_model_path), str(png_folder / "3a7f.png")]) == 1
    err = capsys.readouterr().err
    assert "above max_pixels = 100 (a decompression bomb?): crop or shrink it" in err, err
    assert "MAX_PIXELS" not in err  # no flag sets it


def test_usage_errors_exit_2():
    for argv in ([], ["predict"], ["predict", "--beam", "x", "a.png"], ["no-such-command"],
                 ["eval", "--greedy", "--beam", "5", "data"], ["export", "m.pt", "--greedy", "--beam", "5"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2


def test_info_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "captcha_fast", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch " in out.stdout and "CUDA kernels built:" in out.stdout


def test_demo_reads_fresh_captchas_with_the_shipped_model(capsys):
    from captcha_fast.synth import MIX

    assert api.DEFAULT_MODEL.is_file(), "the shipped model is missing: run tools/build_pretrained.py"
    n = len(MIX) + 2
    assert main(["demo", "-n", str(n), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "read right" in out and "images/s" in out
    table, by_style = out.split("by style, weakest first:")
    rows = table.strip().splitlines()[1:]
    assert len(rows) == n and {row.split()[0] for row in rows} == set(MIX)  # every style shown, none hidden
    assert all(0 <= float(row.split()[-2]) <= 1 for row in rows)  # the confidence column
    right = sum(row.endswith(" ok") for row in rows)
    assert f"\n{right}/{n} read right" in out
    summary = by_style.strip().split("\n\n")[0].splitlines()
    assert len(summary) == len(MIX)
    for line in summary:  # a style read less than half right is named as weak (from 2 images or more)
        ok, k = map(int, line.split()[1].split("/"))
        assert ("<- weak" in line) == (k >= 2 and ok / k < 0.5)
    assert right >= 1  # a floor well below the shipped model's accuracy on the style mix (README)


def test_bench_prints_both_tables(capsys):
    """Both tables, every row's ratio its rate over the baseline's: (c), the fastest pure-Python
    greedy, for decoding (with (a), the seed's decoder, beside), the eager pipeline for reading."""
    assert main(["bench", "-n", "64", "--batch", "2"]) == 0
    tables = capsys.readouterr().out.strip().split("\n\n")
    assert len(tables) == 2
    for table, base, columns in ((tables[0], "(c) fastest pure-Python greedy", 2), (tables[1], "eager", 1)):
        rows = {}
        for line in table.splitlines()[2:]:  # a title line, a header line, then name, rate, ratio(s)
            parts = line.rsplit(None, 1 + columns)
            rows[parts[0]] = [float(parts[1].replace(",", ""))] + [float(r.rstrip("x")) for r in parts[2:]]
        base_rate = next(v[0] for name, v in rows.items() if name.startswith(base))
        assert len(rows) >= 3
        for name, (rate, *ratios) in rows.items():
            assert rate > 0 and ratios[0] == pytest.approx(rate / base_rate, rel=0.03, abs=0.006), name  # rates print rounded
        if columns == 2:
            seed_rate = next(v[0] for name, v in rows.items() if name.startswith("(a)"))
            assert all(v[2] == pytest.approx(v[0] / seed_rate, rel=0.03, abs=0.006) for v in rows.values())


def _modules_after(argv):
    code = ("import sys; from captcha_fast.cli import main; rc = main(%r); "
            "print(rc, ' '.join(sorted(m for m in sys.modules)))" % (argv,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rc, modules = out.stdout.splitlines()[-1].split(" ", 1)
    assert rc == "0", out.stderr
    return set(modules.split())


@pytest.mark.parametrize("command", ["predict", "info"])
def test_inference_commands_import_no_training_code(command, tiny_model_path, png_folder):
    argv = ["predict", "--model", str(tiny_model_path), str(png_folder)] if command == "predict" else ["info"]
    loaded = _modules_after(argv)
    assert "captcha_fast.recognizer" in loaded  # the check sees captcha_fast's modules
    assert not loaded & set(TRAINING_MODULES), sorted(loaded & set(TRAINING_MODULES))


def test_export_imports_no_training_code(tmp_path):
    from captcha_fast.checkpoint import save_checkpoint
    from captcha_fast.model import CRNN, CRNNConfig
    model = CRNN(CRNNConfig("ab", height=16, channels=(4, 8), hidden_dim=8))
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "best.ckpt")
    loaded = _modules_after(["export", str(tmp_path), "--out", str(tmp_path / "m.pt")])
    assert "captcha_fast.checkpoint" in loaded and not loaded & set(TRAINING_MODULES)
    assert (tmp_path / "m.pt").is_file()


def _train_args(argv):
    from captcha_fast.train import TrainConfig
    return config_from_args(TrainConfig, build_parser().parse_args(["train"] + argv))


def test_train_flags_come_from_the_config_fields():
    from captcha_fast.train import TrainConfig
    hints = typing.get_type_hints(TrainConfig)
    defaults = _train_args(["DATA", "--out", "RUN"])
    assert defaults == TrainConfig(data="DATA", out="RUN")
    # every field has a flag that sets it (a value unlike its default)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("data", "out"):
            continue
        value = getattr(defaults, f.name)
        flag = {"hidden_dim": "--hidden"}.get(f.name, "--" + f.name.replace("_", "-"))
        if isinstance(value, bool):
            argv, want = [flag if not value else "--no-" + flag[2:]], not value
        elif f.name == "freeze":  # names of parts (none by default)
            argv, want = [flag, "convs", "project"], ("convs", "project")
        elif isinstance(value, tuple):
            argv, want = [flag] + [str(v + 4) for v in value], tuple(v + 4 for v in value)
        elif f.name == "in_channels":
            argv, want = [flag, "3"], 3
        elif f.name == "device":
            argv, want = [flag, "cpu"], "cpu"
        elif f.name == "blend":  # a share in [0, 1]
            argv, want = [flag, "0.25"], 0.25
        elif value is None or isinstance(value, str):  # Optional[X] or str: "7" as an X (a pair: 7 8)
            kind = str if value is not None else next(a for a in typing.get_args(hints[f.name]) if a is not type(None))
            if typing.get_origin(kind) is tuple:
                argv, want = [flag, "7", "8"], (7, 8)
            else:
                argv, want = [flag, "7"], kind("7")
        else:
            argv, want = [flag, str(value + 1)], value + 1
        got = getattr(_train_args(["D", "--out", "R"] + argv), f.name)
        assert got == want and type(got) is type(want), (f.name, got, want)
    # the flags of before the generated parser keep working
    cfg = _train_args(["D", "--out", "R", "--color", "--hidden", "64", "--channels", "8", "16", "--no-augment",
                       "--quiet", "--no-amp", "--skip-bad", "--resume", "--max-minutes", "1.5"])
    assert (cfg.in_channels, cfg.hidden_dim, cfg.channels, cfg.augment, cfg.progress, cfg.amp, cfg.skip_bad,
            cfg.resume, cfg.max_minutes) == (3, 64, (8, 16), False, False, False, True, True, 1.5)
    with pytest.raises(SystemExit):
        _train_args(["D"])  # --out is required


def test_ignore_case_scores_and_prints_case_free(tiny_model_path, png_folder, tmp_path, capsys):
    """eval --ignore-case on upper-cased labels scores as the lower-case labels do; predict
    --ignore-case prints lower case."""
    import shutil
    upper = tmp_path / "upper"
    upper.mkdir()
    for p in png_folder.glob("*.png"):
        shutil.copy(p, upper / (p.stem.upper() + ".png"))
    runs = []
    for folder, extra in ((png_folder, []), (upper, ["--ignore-case"]), (upper, [])):
        assert main(["eval", str(tiny_model_path), str(folder), "--json", *extra]) == 0
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert (runs[1]["accuracy"], runs[1]["cer"]) == (runs[0]["accuracy"], runs[0]["cer"])
    assert runs[2]["cer"] > runs[0]["cer"]  # case counts without the option
    assert main(["predict", "--model", str(tiny_model_path), "--ignore-case", str(upper)]) == 0
    texts = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    assert texts == [t.lower() for t in api.predict_batch(sorted(upper.glob("*.png")), tiny_model_path)]


# ----------------------------------------------------------------------------- predict: bad files, stdin, pipes

def _mixed_folder(png_folder, tmp_path):
    """png_folder's five captchas plus a text file and a truncated PNG, both named .png."""
    import shutil
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in png_folder.glob("*.png"):
        shutil.copy(p, folder / p.name)
    (folder / "notes.png").write_text("this is not an image")
    (folder / "truncated.png").write_bytes((png_folder / "3a7f.png").read_bytes()[:100])
    return folder


def test_predict_skip_bad_goes_on_and_lists_the_bad_files_at_the_end(tiny_model_path, png_folder, tmp_path, capsys):
    folder = _mixed_folder(png_folder, tmp_path)
    assert main(["predict", "--model", str(tiny_model_path), str(folder)]) == 1  # without it: the first bad file
    assert "notes.png" in capsys.readouterr().err
    assert main(["predict", "--model", str(tiny_model_path), "--skip-bad", "--batch-size", "2", str(folder)]) == 0
    out, err = capsys.readouterr()
    good = sorted(png_folder.glob("*.png"))
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(folder / p.name) for p in good]
    assert [line.split("\t")[1] for line in lines] == api.predict_batch(good, tiny_model_path)
    assert "skipped 2 of 7 images" in err
    for name in ("notes.png", "truncated.png"):
        assert any(name in line and "not a readable image" in line for line in err.splitlines()), err


def _cli(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "captcha_fast", *argv], capture_output=True, text=True,
                          timeout=300, **kw)


def test_predict_dash_reads_paths_from_stdin(tiny_model_path, png_folder):
    paths = sorted(png_folder.glob("*.png"), reverse=True)[:3]  # any order: kept
    out = _cli("predict", "--model", str(tiny_model_path), "-", input="\n".join(map(str, paths)) + "\n\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    assert [line.split("\t")[1] for line in lines] == api.predict_batch(paths, tiny_model_path)


def test_predict_into_a_closed_pipe_ends_quietly(tiny_model_path, png_folder):
    """`captcha-fast predict DIR | head`: once the reader has gone, predict stops without an error
    message, with the status of a process ended by SIGPIPE (141), as other Unix tools, and its progress
    bar (shown here: --batch-size 1) cleared."""
    proc = subprocess.Popen([sys.executable, "-m", "captcha_fast", "predict", "--model", str(tiny_model_path),
                             "--batch-size", "1", str(png_folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves before the first line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err.decode()
    assert "img" in err.decode() and err.decode().split("\r")[-1].strip() == ""  # the bar's last state: blank
    shell = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m captcha_fast predict --model "
                            f"{tiny_model_path} {png_folder} {png_folder} | head -n 1; echo status=${{PIPESTATUS[0]}}"],
                           capture_output=True, text=True, timeout=300)
    assert shell.stdout.splitlines()[-1] in ("status=0", "status=141") and len(shell.stdout.splitlines()) == 2
    assert shell.stderr.strip() == ""


def test_errors_from_the_scripted_recognizer_print_their_own_message(png_folder, tmp_path):
    """An error raised inside the TorchScript recognizer (its model emits NaN, which the decoding op
    refuses) reaches the user as its own sentence naming the file, not the interpreter's banner."""
    from captcha_fast import export

    from conftest import tiny_model

    model = tiny_model()
    model.classifier.bias.data[1] = float("nan")
    path = export.save_recognizer(model, tmp_path / "nan.pt")
    out = _cli("predict", "--model", str(path), str(png_folder / "3a7f.png"))
    assert out.returncode == 1
    assert out.stderr.startswith(f"captcha-fast predict: error: ctc_beam_search: log_probs of '{png_folder / '3a7f.png'}'")
    assert "TorchScript" not in out.stderr and len(out.stderr.splitlines()) == 1


def test_predict_length_and_alphabet_flags(tiny_model_path, png_folder, capsys):
    paths = sorted(png_folder.glob("*.png"))
    assert main(["predict", "--model", str(tiny_model_path), "--min-length", "4", "--max-length", "4",
                 "--allowed", "0123456789", str(png_folder)]) == 0
    texts = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    assert texts == api.predict_batch(paths, tiny_model_path, min_length=4, max_length=4, allowed="0123456789")
    assert all(len(t) == 4 and t.isdigit() for t in texts)


def test_an_interrupted_train_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import captcha_fast.train

    def interrupted(cfg, log=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(captcha_fast.train, "train", interrupted)
    out = tmp_path / "my run"
    assert main(["train", "synthetic", "--out", str(out), "--epochs", "2"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"captcha-fast: interrupted; `captcha-fast train synthetic --out '{out}' --epochs 2 --resume` " \
                  f"continues from the last finished epoch"
