"""captcha_fast: fast CRNN recognition of captchas and short text lines.

    import captcha_fast
    captcha_fast.predict_batch(["a.png", "b.png"])          # the shipped model -> ["k3q9x", ...]
    rec = captcha_fast.load("runs/v2/model.pt")               # .pt2 (torch.export / AOTInductor) or .pt
    captcha_fast.predict_batch(images, rec, top_k=3)          # -> [[Hypothesis(text, score), ...], ...]
"""
from captcha_fast._extension import CUDA_KERNELS, LIBRARY_PATH
from captcha_fast import ops
from captcha_fast.api import DEFAULT_MODEL, default_model, format_of, load, predict_batch
from captcha_fast.charset import Charset
from captcha_fast.decode import Hypothesis, beam_search, greedy_decode
from captcha_fast.export import compile_package, export_program, save_recognizer
from captcha_fast.model import CRNN, CRNNConfig

__version__ = "0.1.0"
__all__ = ["predict_batch", "load", "default_model", "DEFAULT_MODEL", "format_of", "Hypothesis", "beam_search",
           "greedy_decode", "Charset", "CRNN", "CRNNConfig", "save_recognizer", "export_program", "compile_package",
           "CUDA_KERNELS", "LIBRARY_PATH"]
