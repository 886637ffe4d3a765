"""captcha_fast: fast CRNN recognition of captchas and short text lines."""
from captcha_fast._extension import CUDA_KERNELS, LIBRARY_PATH
from captcha_fast import ops

__version__ = "0.1.0"
