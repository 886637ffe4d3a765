"""Builds captcha_fast and its C++/CUDA extension captcha_fast._C.

The extension is compiled against the torch already installed, so install
torch first and build without isolation:

    pip install torch==2.13.0            # or your own CUDA build of torch
    pip install --no-build-isolation .

Environment:
    FORCE_CUDA=1            build the CUDA kernels even if torch or nvcc is not detected
    TORCH_CUDA_ARCH_LIST    GPU architectures to compile for, e.g. "8.0;9.0" (read by torch)
    CUDA_HOME               CUDA toolkit root (default: found by torch)
    CAPTCHA_FAST_DEBUG=1    -O0 -g, for debuggers and sanitizers
    CAPTCHA_FAST_SANITIZE=1 build with AddressSanitizer and UBSan (see tools/sanitize.sh)
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "captcha_fast compiles against the installed torch and none was found: "
        "install torch first (e.g. `pip install torch==2.13.0`), then `pip install --no-build-isolation .`"
    )


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _cuda_wanted() -> bool:
    if _flag("FORCE_CUDA"):
        return True
    # Compiling needs torch's CUDA headers and nvcc, not a GPU.
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extensions():
    with_cuda = _cuda_wanted()
    debug, sanitize = _flag("CAPTCHA_FAST_DEBUG"), _flag("CAPTCHA_FAST_SANITIZE")
    csrc = ROOT / "csrc"
    sources = [csrc / "ops.cpp", csrc / "gru.cpp", csrc / "gru_train.cpp", csrc / "python_module.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]
    # The C++ standard is left to torch (its 2.13 headers need C++20; our code is C++17-clean).
    opt = ["-O0", "-g"] if debug or sanitize else ["-O3"]
    cxx = [*opt, "-fopenmp", f'-DCF_TORCH_VERSION="{torch.__version__}"']
    link = ["-fopenmp"]  # without it at::parallel_for runs on one thread
    if sanitize:
        cxx += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        link += ["-fsanitize=address,undefined"]
    ext_cls = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    if with_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources += sorted((csrc / "cuda").glob("*.cu"))
        extra["cxx"] = cxx + ["-DCF_WITH_CUDA"]
        # --fmad=false: no a*b+c contraction into FMA, which the host compiler does not do on
        # x86-64, so the CUDA kernels round as the CPU's and return bit-identical beams.
        extra["nvcc"] = [*opt, "-DCF_WITH_CUDA", f'-DCF_TORCH_VERSION="{torch.__version__}"',
                         "--expt-relaxed-constexpr", "--fmad=false", *os.environ.get("NVCC_FLAGS", "").split()]
        extra["nvcc"] = [f for f in extra["nvcc"] if f]
    print(
        "captcha_fast build: "
        f"torch {torch.__version__}, torch CUDA {torch.version.cuda}, CUDA_HOME {cpp_extension.CUDA_HOME}, "
        f"CUDA kernels {'on' if with_cuda else 'off'}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}, "
        f"{'debug' if debug else 'sanitize' if sanitize else 'release'}",
        file=sys.stderr,
    )
    return [
        ext_cls(
            "captcha_fast._C",
            [str(s.relative_to(ROOT)) for s in sources],
            include_dirs=[str(csrc)],
            extra_compile_args=extra,
            extra_link_args=link,
        )
    ]


setup(
    packages=find_packages(include=["captcha_fast", "captcha_fast.*"]),
    # Everything under pretrained/: default.pt (predict's model), default.ckpt (its training weights,
    # where `captcha-fast train` fine-tunes from by default) and the model card.
    package_data={"captcha_fast": ["pretrained/*"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
