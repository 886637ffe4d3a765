"""The captcha-fast command line: output formats, exit codes (0 ok, 1 failure, 2 usage)
and one-line errors."""
import json
import subprocess
import sys

import pytest

from captcha_fast import api
from captcha_fast.cli import build_parser, main

COMMANDS = ["demo", "predict", "train", "eval", "export", "bench", "info"]


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
    (["predict", "--model", "{model}", "--greedy", "--top-k", "2", "{folder}"], 2, "needs beam search"),
    (["predict", "--model", "{folder}/3a7f.png", "{folder}"], 1, "is not a captcha_fast recognizer"),
    (["predict", "--model", "{model}", "{corrupt}"], 1, "corrupt.png"),
    (["demo", "-n", "0"], 2, "-n must be at least 1"),
])
def test_errors_are_one_line_with_exit_codes(argv, code, match, tiny_model_path, png_folder, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((png_folder / "3a7f.png").read_bytes()[:100])  # truncated PNG
    argv = [a.format(model=tiny_model_path, folder=png_folder, corrupt=corrupt) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_usage_errors_exit_2():
    for argv in ([], ["predict"], ["predict", "--beam", "x", "a.png"], ["no-such-command"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2


def test_info_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "captcha_fast", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch " in out.stdout and "CUDA kernels built:" in out.stdout


def test_demo_reads_fresh_captchas_with_the_shipped_model(capsys):
    assert api.DEFAULT_MODEL.is_file(), "the shipped model is missing: run tools/train_pretrained.sh"
    assert main(["demo", "-n", "8", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "read right" in out and "images/s" in out
    right = int(out.split("read right")[0].strip().splitlines()[-1].split("/")[0])
    assert right >= 5  # the shipped model reads most fresh captchas (README: its accuracy)


def test_bench_prints_both_tables(capsys):
    assert main(["bench", "-n", "64", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    for row in ["python greedy (seed loop)", "C++ beam, pruned (strings) beam=10", "scripted + C++ beam-10"]:
        assert row in out
    assert "1.0x" in out  # the baseline row
