"""Loads the compiled extension (captcha_fast._C), which registers the
torch.ops.captcha_fast.* ops, and refuses a build made for another torch."""
from __future__ import annotations

import torch

_REBUILD = "rebuild it against the installed torch: pip install --no-build-isolation --force-reinstall --no-deps ."


def _load():
    try:
        from captcha_fast import _C
    except ImportError as e:
        raise ImportError(
            f"captcha_fast's compiled extension (captcha_fast._C) could not be loaded ({e}); "
            f"it is missing or was built against another torch than {torch.__version__}: {_REBUILD}"
        ) from e
    info = dict(item.split("=", 1) for item in torch.ops.captcha_fast._build_info().split(";"))
    if info["torch"] != torch.__version__:
        raise ImportError(
            f"captcha_fast._C was built against torch {info['torch']} but torch {torch.__version__} "
            f"is installed: {_REBUILD}"
        )
    return _C, info


_C, BUILD_INFO = _load()
LIBRARY_PATH: str = _C.__file__
"""Path of the compiled library; `torch.ops.load_library(LIBRARY_PATH)` registers
the ops in a process that does not import captcha_fast (e.g. to run a saved
recognizer)."""
CUDA_KERNELS: bool = BUILD_INFO["cuda"] == "1"
