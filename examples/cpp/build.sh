#!/bin/sh
# Builds an examples/cpp program against the libtorch inside the installed torch wheel (no CMake
# needed), about a minute:
#   sh examples/cpp/build.sh [output] [source]      (default: recognize, from recognize.cpp)
#   sh examples/cpp/build.sh build/recognize_aoti examples/cpp/recognize_aoti.cpp
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/recognize}
SRC=${2:-$HERE/recognize.cpp}
PY=${PYTHON:-python}
INCLUDES=$($PY -c "from torch.utils import cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
LIBDIR=$($PY -c "from torch.utils import cpp_extension as c; print(c.library_paths()[0])")
ABI=$($PY -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
${CXX:-g++} -std=c++20 -O2 -D_GLIBCXX_USE_CXX11_ABI=$ABI $INCLUDES "$SRC" -o "$OUT" \
  -L"$LIBDIR" -Wl,-rpath,"$LIBDIR" -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -Wl,--as-needed -ldl
echo "$OUT"
