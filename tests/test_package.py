"""Packaging: a wheel that holds the whole package, a clear error for a missing or mismatched
extension, a light import, and setup.py's one sentence when torch is missing."""
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import captcha_fast

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, cwd=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_import_is_light():
    out = python("import sys, captcha_fast; print(' '.join(sorted(sys.modules)))")
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    for heavy in ["captcha_fast.train", "captcha_fast.data", "captcha_fast.synth", "captcha_fast.evaluate",
                  "captcha", "matplotlib"]:
        assert heavy not in loaded, f"import captcha_fast loads {heavy}"


def test_missing_extension_is_a_clear_error(tmp_path):
    pkg = Path(captcha_fast.__file__).parent
    copy = tmp_path / "captcha_fast"
    copy.mkdir()
    for f in pkg.glob("*.py"):  # the Python sources only: no compiled _C
        (copy / f.name).write_text(f.read_text())
    # An editable install's import hook would find the real package first: drop it.
    out = python("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
                 "sys.path.insert(0, '.'); import captcha_fast", cwd=tmp_path)
    assert out.returncode != 0
    assert "compiled extension (captcha_fast._C) could not be loaded" in out.stderr
    assert "pip install --no-build-isolation" in out.stderr


def test_extension_built_for_another_torch_is_refused():
    out = python("import torch; torch.__version__ = '9.9.9'; import captcha_fast")
    assert out.returncode != 0
    assert "was built against torch" in out.stderr and "but torch 9.9.9 is installed" in out.stderr


def test_build_without_torch_says_what_to_do():
    code = f"import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; " \
           f"runpy.run_path({str(ROOT / 'setup.py')!r}, run_name='__main__')"
    out = python(code, cwd=ROOT)
    assert out.returncode != 0
    assert "install torch first" in out.stderr and "pip install --no-build-isolation ." in out.stderr


def test_extension_reports_its_build():
    assert captcha_fast.LIBRARY_PATH.endswith(".so") and Path(captcha_fast.LIBRARY_PATH).is_file()
    # the flag says whether CUDA kernels were really registered with the dispatcher
    for op in ("ctc_greedy_decode", "ctc_beam_search"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"captcha_fast::{op}", "CUDA") == captcha_fast.CUDA_KERNELS
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"captcha_fast::{op}", "CPU")


@pytest.mark.slow
def test_wheel_holds_every_file_of_the_package(tmp_path):
    """A non-editable install (`pip install --no-build-isolation .`) has only what the wheel holds:
    every file of the source package -- the shipped model, its training weights (where `captcha-fast
    train` fine-tunes from by default), the model card -- and the compiled library. Builds the wheel
    from a copy of the sources (compiles the extension: about a minute)."""
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, src / name)
    for name in ("csrc", "captcha_fast"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("captcha_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = src / "captcha_fast"
    sources = {"captcha_fast/" + p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    assert "captcha_fast/pretrained/default.ckpt" in sources and "captcha_fast/pretrained/default.pt" in sources
    assert sorted(sources - names) == []
    assert [n for n in names if re.fullmatch(r"captcha_fast/_C\.[^/]*\.so", n)], sorted(names)
