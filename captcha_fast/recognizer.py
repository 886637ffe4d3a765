"""Recognizer: images -> strings in one TorchScript-able module.

    List[(C, H, W) uint8 or float]  --preprocess-->  (N, C_in, height, W_max) float32 + widths
                                    --CRNN-------->  (T, N, K) float32 log-probs + frame counts
                                    --decode------>  texts (torch.ops.captcha_fast.*) + scores

`torch.jit.script(Recognizer(model))` and `torch.jit.save` give one file with
the weights, the config (JSON) and the charset; it runs wherever the captcha_fast
library is loaded (Python `import captcha_fast`, or `torch.ops.load_library`
from Python or C++), with no captcha_fast Python code.

Precision follows the conv weights: the input batch is cast to their dtype, so
casting `recognizer.model.convs` to bfloat16/float16 runs the convolutions in
low precision while the GRU, classifier, log-softmax and decoding stay float32
(the CRNN casts to float32 before its projection)."""
from __future__ import annotations

import json
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from captcha_fast import ops  # noqa: F401  (registers torch.ops.captcha_fast.*)
from captcha_fast.decode import BLANK_SKIP_THRESHOLD, TOKEN_MIN_LOGP, Hypothesis  # noqa: F401
from captcha_fast.model import CRNN, InferenceCRNN

RECOGNIZER_FORMAT = 1  # bumped when the saved module's interface changes
MIN_WIDTH = 4          # two 2x2 pools: narrower images would give no frame


def resized_width(H: int, W: int, height: int) -> int:
    """The width of an H x W image resized to `height` (aspect kept, rounded), at least MIN_WIDTH."""
    return max(4, int(W * height / H + 0.5))  # 4 = MIN_WIDTH (TorchScript can't read globals)


def check_image(img: Tensor, i: int):
    """ValueError naming images[i] unless it is H x W or C x H x W (C = 1, 3, 4), non-empty,
    uint8 or floating point."""
    name = "images[" + str(i) + "]"
    if img.dim() != 2 and img.dim() != 3:
        raise ValueError(name + ": an image must be H x W or C x H x W, got shape " + str(img.shape))
    if img.dim() == 3 and img.shape[0] != 1 and img.shape[0] != 3 and img.shape[0] != 4:
        raise ValueError(name + ": an image must have 1 (grey), 3 (RGB) or 4 (RGBA) channels first, got shape "
                         + str(img.shape))
    if img.shape[-1] == 0 or img.shape[-2] == 0:
        raise ValueError(name + ": the image is empty, shape " + str(img.shape))
    if img.dtype != torch.uint8 and not img.is_floating_point():
        raise ValueError(name + ": an image must be uint8 or float in [0, 1], got " + str(img.dtype))


def prepare_image(img: Tensor, height: int, in_channels: int) -> Tensor:
    """One (C, H, W) image (C = 1, 3 or 4; uint8, or float in [0, 1]) -> (in_channels, height, W')
    float32 in [0, 1], resized to `height` keeping the aspect ratio, W' >= MIN_WIDTH."""
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.dim() != 3:
        raise ValueError("an image must be H x W or C x H x W, got " + str(img.dim()) + " dimensions")
    C, H, W = img.shape[0], img.shape[1], img.shape[2]
    if H == 0 or W == 0:
        raise ValueError("an image is empty: shape " + str(img.shape))
    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    x = to_channels(x.unsqueeze(0), in_channels)  # (1, in_channels, H, W)
    new_w = resized_width(H, W, height)
    if H != height or W != new_w:
        x = F.interpolate(x, size=[height, new_w], mode="bilinear", align_corners=False, antialias=True)
    return x[0]


def to_channels(x: Tensor, in_channels: int) -> Tensor:
    """(N, C, H, W) float, C = 1/3/4 -> (N, in_channels, H, W); RGBA is composited on white."""
    C = x.shape[1]
    if C == 4:  # composite on white: the alpha often carries the anti-aliasing
        alpha = x[:, 3:4]
        x = x[:, :3] * alpha + (1.0 - alpha)
        C = 3
    if C != 1 and C != 3:
        raise ValueError("an image must have 1 (grey), 3 (RGB) or 4 (RGBA) channels, got " + str(C))
    if in_channels == 1 and C == 3:  # ITU-R 601 luma, as PIL's convert("L")
        x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    elif in_channels == 3 and C == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def collate(images: List[Tensor], height: int, in_channels: int) -> Tuple[Tensor, Tensor]:
    """Images -> (N, in_channels, height, W_max) float32 right-padded with zeros, widths (N,) int64."""
    if len(images) == 0:
        raise ValueError("no images: the list is empty")
    first = images[0]
    same = first.dim() == 3 and first.dtype == torch.uint8
    for i, img in enumerate(images):
        check_image(img, i)
        same = same and img.shape == first.shape and img.dtype == first.dtype and img.device == first.device
    if same:  # one batched resize instead of N small ones
        x = torch.stack(images).float() / 255.0
        x = to_channels(x, in_channels)
        H, W = x.shape[2], x.shape[3]
        new_w = resized_width(H, W, height)
        if H != height or W != new_w:
            x = F.interpolate(x, size=[height, new_w], mode="bilinear", align_corners=False, antialias=True)
        return x.contiguous(), torch.full([len(images)], new_w, dtype=torch.int64, device=x.device)
    prepared = [prepare_image(img, height, in_channels) for img in images]
    widths = [p.shape[2] for p in prepared]
    batch = prepared[0].new_zeros([len(prepared), in_channels, height, max(widths)])
    for i, p in enumerate(prepared):
        batch[i, :, :, : widths[i]] = p
    return batch, torch.tensor(widths, dtype=torch.int64, device=batch.device)


class Recognizer(nn.Module):
    """A CRNN with its preprocessing, charset and CTC decoding: forward(images) -> (texts, scores).

    Attributes (saved with the module): config_json (the CRNNConfig as JSON), charset
    (List[str], symbol i is class i + 1), decoder ("greedy" or "beam") and beam_width
    (used by forward), token_min_logp/blank_skip_threshold (beam pruning), format (RECOGNIZER_FORMAT)."""

    def __init__(self, model: CRNN | InferenceCRNN, decoder: str = "beam", beam_width: int = 10):
        super().__init__()
        if not isinstance(model, InferenceCRNN):
            model = InferenceCRNN(model)  # a copy: batch norms folded, eval mode
        if decoder not in ("greedy", "beam"):
            raise ValueError(f"decoder must be 'greedy' or 'beam', got {decoder!r}")
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        self.model = model
        self.config_json: str = json.dumps(model.config.to_dict())
        self.charset: List[str] = list(model.config.charset)
        self.height: int = model.config.height
        self.in_channels: int = model.config.in_channels
        self.decoder: str = decoder
        self.beam_width: int = beam_width
        # beam-search pruning, as captcha_fast.decode.beam_search (None: exact search)
        self.token_min_logp: Optional[float] = TOKEN_MIN_LOGP
        self.blank_skip_threshold: Optional[float] = BLANK_SKIP_THRESHOLD
        self.format: int = RECOGNIZER_FORMAT

    def forward(self, images: List[Tensor]) -> Tuple[List[str], Tensor]:
        """images: (H, W) or (C, H, W) tensors, uint8 or float in [0, 1], any sizes
        -> the best string per image and its score (N,) float32 (a log-probability)."""
        texts, scores = self.recognize(images, self.decoder, self.beam_width, 1)
        return [t[0] for t in texts], scores[:, 0]

    @torch.jit.export
    def recognize(self, images: List[Tensor], decoder: str, beam_width: int, top_k: int) -> Tuple[List[List[str]], Tensor]:
        """The top_k strings per image (best first) and their scores (N, top_k) float32."""
        device = self.model.classifier.weight.device
        with torch.no_grad():
            batch, widths = self.preprocess([img.to(device) for img in images])
            log_probs, lengths = self.logits(batch, widths)
            return self.decode(log_probs, lengths, decoder, beam_width, top_k)

    @torch.jit.export
    def preprocess(self, images: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """-> (N, in_channels, height, W_max) float32 batch, widths (N,) int64."""
        return collate(images, self.height, self.in_channels)

    @torch.jit.export
    def logits(self, batch: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        """(N, C, H, W) float batch, widths (N,) -> log-probs (T, N, K) float32, frame counts (N,).
        The convolutions run in the dtype of the conv weights."""
        return self.model(batch.to(self.model.convs[0].weight.dtype), widths)

    @torch.jit.export
    def decode(self, log_probs: Tensor, lengths: Tensor, decoder: str, beam_width: int, top_k: int) -> Tuple[List[List[str]], Tensor]:
        """(T, N, K) log-probs -> top_k strings per sample and scores (N, top_k) float32."""
        return decode_log_probs(log_probs, lengths, self.charset, decoder, beam_width, top_k,
                                self.token_min_logp, self.blank_skip_threshold)


def decode_log_probs(log_probs: Tensor, lengths: Tensor, charset: List[str], decoder: str, beam_width: int,
                     top_k: int, token_min_logp: Optional[float] = TOKEN_MIN_LOGP,
                     blank_skip_threshold: Optional[float] = BLANK_SKIP_THRESHOLD) -> Tuple[List[List[str]], Tensor]:
    """(T, N, K) log-probs, frame counts (N,) -> top_k strings per sample (best first) and their
    scores (N, top_k) float32 on the CPU; a missing hypothesis (fewer than top_k exist) is ""
    with score -inf. decoder: "greedy" (top_k must be 1) or "beam" (prefix beam search, pruned as
    captcha_fast.decode.beam_search; None for both pruning rules is the exact search)."""
    if decoder == "greedy":
        if top_k != 1:
            raise ValueError("the greedy decoder gives one hypothesis: top_k must be 1, got " + str(top_k))
        tokens, token_lengths, scores = torch.ops.captcha_fast.ctc_greedy_decode(log_probs, lengths, 0)
        tokens, token_lengths, scores = tokens.unsqueeze(1), token_lengths.unsqueeze(1), scores.unsqueeze(1)
    elif decoder == "beam":
        tokens, token_lengths, scores = torch.ops.captcha_fast.ctc_beam_search(
            log_probs, lengths, beam_width, top_k, 0, token_min_logp, blank_skip_threshold, 0, -1, None)
    else:
        raise ValueError("decoder must be 'greedy' or 'beam', got '" + decoder + "'")
    return tokens_to_strings(tokens, token_lengths, charset), scores.cpu()


def tokens_to_strings(tokens: Tensor, token_lengths: Tensor, charset: List[str]) -> List[List[str]]:
    """tokens (N, k, L) int, padded; token_lengths (N, k) -> the strings; class c is charset[c - 1]."""
    rows: List[List[List[int]]] = tokens.cpu().long().tolist()
    lens: List[List[int]] = token_lengths.cpu().long().tolist()
    out: List[List[str]] = []
    for n in range(len(rows)):
        hyps: List[str] = []
        for k in range(len(rows[n])):
            hyps.append("".join([charset[c - 1] for c in rows[n][k][: lens[n][k]]]))
        out.append(hyps)
    return out


def build_recognizer(model: CRNN, decoder: str = "beam", beam_width: int = 10,
                     dtype: torch.dtype = torch.float32) -> Recognizer:
    """An inference Recognizer from a (trained) CRNN: a copy in eval mode with the
    batch norms folded into the convs, convs cast to `dtype` (the model is not changed)."""
    rec = Recognizer(InferenceCRNN(model), decoder=decoder, beam_width=beam_width).eval()
    rec.model.convs.to(dtype)
    return rec
