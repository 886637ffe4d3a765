"""Writing files so that a reader never sees half of one (atomic_write): checkpoints, recognizers,
data caches, metrics and plots all go through it. Imports nothing of captcha_fast."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], object]) -> Path:
    """write(tmp_path) then os.replace, so a reader never sees a half-written file. The temp
    file has the final name (in a temp folder beside it): torch names the archive root after
    it, and matplotlib picks the format from its suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_dir.rmdir()
    return path
