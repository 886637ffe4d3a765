"""captcha_fast: fast CRNN recognition of captchas and short text lines.

    import captcha_fast
    captcha_fast.predict_batch(["a.png", "b.png"])          # the shipped model -> ["K3Q9X", ...]
    rec = captcha_fast.load("runs/v2/model.pt")               # TorchScript (.pt) or torch.export (.pt2)
    captcha_fast.predict_batch(images, rec, top_k=3)          # -> [[Hypothesis(text, score), ...], ...]
"""
from captcha_fast._extension import CUDA_KERNELS, LIBRARY_PATH
from captcha_fast import ops
from captcha_fast.api import DEFAULT_MODEL, default_model, load, predict_batch
from captcha_fast.charset import Charset
from captcha_fast.decode import Hypothesis, beam_search, greedy_decode
from captcha_fast.export import export_program, save_recognizer
from captcha_fast.model import CRNN, CRNNConfig

__version__ = "0.1.0"
__all__ = ["predict_batch", "load", "default_model", "DEFAULT_MODEL", "Hypothesis", "beam_search", "greedy_decode", "Charset",
           "CRNN", "CRNNConfig", "save_recognizer", "export_program", "CUDA_KERNELS", "LIBRARY_PATH"]
