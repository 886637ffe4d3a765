#!/usr/bin/env bash
# Builds captcha_fast._C with AddressSanitizer + UBSan (in a temporary copy of
# the tree, so the normal build is untouched) and runs the op tests against it.
#
#   tools/sanitize.sh [pytest args]      (default: tests/test_ops.py tests/test_fuzz.py)
#
# Uses the python on PATH (with torch installed). Any sanitizer report fails
# the run (halt_on_error, no recovery from UB).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cp -r "$REPO/setup.py" "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/csrc" "$REPO/captcha_fast" "$REPO/tests" "$work/"
rm -f "$work"/captcha_fast/_C*.so
(cd "$work" && CAPTCHA_FAST_SANITIZE=1 python setup.py -q build_ext --inplace >/dev/null)

asan=$(g++ -print-file-name=libasan.so)
ubsan=$(g++ -print-file-name=libubsan.so)
cd "$work"
[ $# -gt 0 ] || set -- tests/test_ops.py tests/test_fuzz.py
# Python itself is not instrumented: leak checks would only report its arenas.
LD_PRELOAD="$asan $ubsan" \
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
CAPTCHA_FAST_FUZZ_EXAMPLES=${CAPTCHA_FAST_FUZZ_EXAMPLES:-2000} \
  python -m pytest -q -p no:cacheprovider "$@"
echo "sanitize: ASan + UBSan clean"
