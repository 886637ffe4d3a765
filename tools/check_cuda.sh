#!/usr/bin/env bash
# Compiles captcha_fast's CUDA kernels and checks that they register, on a
# machine with or without a GPU. One command; exits non-zero on any failure.
#
#   tools/check_cuda.sh
#
# 1. Makes (or reuses) a venv with the CUDA 13 build of torch 2.14.1.
# 2. Builds the extension with FORCE_CUDA=1 from a temporary copy of the tree,
#    so the repository's in-place CPU build (captcha_fast/_C*.so, build/) is
#    left untouched.
# 3. Loads the built library in that venv and checks that both ops have CUDA
#    kernels and that _build_info() says cuda=1. With a GPU it also compares
#    CUDA with CPU on a small batch (tests/test_cuda.py does this fully).
#
# Environment:
#   CAPTCHA_FAST_CUDA_VENV  venv to use/create (default ~/.cache/captcha_fast/venv-torch-2.14.1)
#   TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0")
#   CUDA_HOME               toolkit root (default /usr/local/cuda; /usr/local/bin/nvcc is a
#                           wrapper script, from which torch would guess /usr/local)
#   PYTHON                  interpreter that creates the venv (default python3)
#   KEEP_BUILD=1            keep the temporary build directory and print its path
set -euo pipefail

start=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CAPTCHA_FAST_CUDA_VENV:-$HOME/.cache/captcha_fast/venv-torch-2.14.1}
TORCH_VERSION=2.14.1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export FORCE_CUDA=1

fail() { echo "check_cuda: FAILED: $*" >&2; exit 1; }

[ -x "$CUDA_HOME/bin/nvcc" ] || fail "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME to the CUDA toolkit root)"

# 1. The venv: torch 2.14.1 with CUDA, ninja, setuptools.
venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_VERSION" <<'EOF' >/dev/null 2>&1
import sys, importlib.util
import torch
assert torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda, torch.__version__
for m in ("ninja", "setuptools", "wheel", "numpy"):
    assert importlib.util.find_spec(m), m
EOF
}
venv_note="reused"
if ! venv_ok; then
  venv_note="installed"
  echo "check_cuda: installing torch==$TORCH_VERSION (CUDA) into $VENV (about a minute, 5.4 GB)" >&2
  if [ ! -x "$VENV/bin/python" ]; then
    venv_note="created"
    "${PYTHON:-python3}" -m venv "$VENV" || fail "could not create the venv $VENV"
  fi
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" ninja setuptools wheel numpy \
    || fail "pip could not install torch==$TORCH_VERSION into $VENV"
  venv_ok || fail "$VENV has no CUDA build of torch $TORCH_VERSION after installing"
fi
venv_s=$(( $(date +%s) - start ))
export PATH="$VENV/bin:$PATH"  # torch's build runs `ninja` from PATH

# ATen/cuda/CUDAContext.h includes cuBLAS/cuSPARSE headers, which this minimal
# toolkit lacks; the torch wheel's nvidia packages ship them.
NV_INCLUDE=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))') \
  || fail "no nvidia packages in $VENV"
[ -f "$NV_INCLUDE/cublas_v2.h" ] || fail "no cuBLAS headers in $NV_INCLUDE"
export NVCC_FLAGS="${NVCC_FLAGS:-} -I$NV_INCLUDE"
export CPATH="$NV_INCLUDE${CPATH:+:$CPATH}"

# 2. Build from a temporary copy of the sources (no build products copied).
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/captcha_fast_cuda.XXXXXX")
if [ "${KEEP_BUILD:-0}" = 1 ]; then
  echo "check_cuda: build directory $BUILD" >&2
else
  trap 'rm -rf "$BUILD"' EXIT
fi
(
  cd "$REPO"
  files=(setup.py pyproject.toml csrc captcha_fast)
  [ -f README.md ] && files+=(README.md)
  [ -f LICENSE ] && files+=(LICENSE)
  tar --exclude='*.so' --exclude='__pycache__' --exclude='*.o' -cf - "${files[@]}"
) | tar -C "$BUILD" -xf - || fail "could not copy the sources to $BUILD"
build_start=$(date +%s)
if ! (cd "$BUILD" && "$VENV/bin/python" setup.py build_ext --inplace >"$BUILD/build.log" 2>&1); then
  tail -n 60 "$BUILD/build.log" >&2
  fail "the CUDA build failed (log above)"
fi
build_s=$(( $(date +%s) - build_start ))
LIB=$(ls "$BUILD"/captcha_fast/_C*.so 2>/dev/null | head -n 1)
[ -n "$LIB" ] || fail "the build made no captcha_fast/_C*.so"

# 3. Load it (no GPU needed) and check the registrations.
summary=$("$VENV/bin/python" - "$LIB" <<'EOF'
import sys
import torch

torch.ops.load_library(sys.argv[1])
info = dict(kv.split("=", 1) for kv in torch.ops.captcha_fast._build_info().split(";"))
assert info["cuda"] == "1", f"_build_info() says {info}, expected cuda=1"
assert info["torch"] == torch.__version__, f"built against {info['torch']}, running {torch.__version__}"
ops = ("ctc_greedy_decode", "ctc_beam_search")
for op in ops:
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"captcha_fast::{op}", key), \
            f"captcha_fast::{op} has no {key} kernel"
run = "no GPU here: kernels not run"
if torch.cuda.is_available():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(30, 16, 12, generator=g).log_softmax(-1)
    lens = torch.randint(0, 31, (16,), generator=g)
    for name, args in (("ctc_greedy_decode", ()), ("ctc_beam_search", (8, 2))):
        op = getattr(torch.ops.captcha_fast, name)
        cpu, gpu = op(lp, lens, *args), op(lp.cuda(), lens.cuda(), *args)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu[:2], gpu[:2])), f"{name}: CUDA tokens differ from CPU"
        torch.testing.assert_close(gpu[2].cpu(), cpu[2], atol=1e-4, rtol=0)
    run = f"kernels agree with CPU on {torch.cuda.get_device_name()}"
print(f"torch {torch.__version__}, CUDA kernels registered for {' and '.join(ops)}, _build_info {info}; {run}")
EOF
) || fail "the built library did not pass the checks (see above)"

echo "check_cuda: OK: archs $TORCH_CUDA_ARCH_LIST; $summary; venv $venv_note (${venv_s} s), build ${build_s} s, total $(( $(date +%s) - start )) s"
