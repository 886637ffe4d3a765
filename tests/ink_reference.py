"""The ink preprocessing as it was before it was made faster (captcha_fast.preprocess at the commit
before "preprocess: sorted-window medians, ..."): the reference the tests hold the fast one to. A
model was trained on this map; the fast one must give the same output up to float rounding. Kept
verbatim (the median by kthvalue, the background by F.interpolate and padding, the channel amax)."""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

# The crop (ink_boxes and its helpers) and the frame band did not change with the speed-up: the
# reference uses preprocess's own (the ATen path of the crop, not its CPU op), and holds only the
# ink map itself to the old code.
from captcha_fast.preprocess import _border_band, check_width, resized_width, to_channels
from captcha_fast.preprocess import _ink_boxes_aten as ink_boxes


def _kept_median(windows: Tensor, dropped: Tensor) -> Tensor:
    """(N, C, 49, P) values in [0, 1] and which of them not to count -> (N, C, 1, P): the (lower)
    median of the counted values of each window (k of them: the ceil(k / 2)-th smallest), exactly,
    by one kthvalue at a fixed rank: of the dropped values, 25 - ceil(k / 2) are put below every
    value and the rest above, so the 25th of the 49 is the counted median (torch.median or sort
    over many short rows cost far more)."""
    kept = 49 - dropped.sum(2, keepdim=True)                            # 49 = BG_WINDOW ** 2
    below = dropped & (dropped.cumsum(2) <= 25 - (kept + 1) // 2)       # 25 - ceil(k / 2) <= 49 - k
    windows = torch.where(below, -1.0, torch.where(dropped, 2.0, windows))
    return windows.kthvalue(25, 2, keepdim=True).values


def background(x: Tensor) -> Tensor:
    """(N, C, h, w) float -> (N, C, h, w): each image's local background colour, estimated as document
    binarisation does. The image is sampled on a grid (8 points high, twice that spacing across); each
    grid point takes the per-channel median of the 7 x 7 samples around it (a window about as high
    as the image and twice as wide, so text covers well under half of it), and the grid is
    interpolated back bilinearly. A median over a symmetric window follows a linear ramp exactly
    (with replicated edges, any monotone one), so gradients, mild vignettes and slowly varying
    textures are background, while glyph strokes, far thinner than the window, are not. Cost: a
    few thousand samples per image whatever its size, then one bilinear resize."""
    h, w = x.shape[2], x.shape[3]
    step = max(1.0, (h - 1) / 7.0)  # 7 = BG_SAMPLES - 1
    rows = torch.linspace(0.0, h - 1.0, int((h - 1) / step + 0.5) + 1, device=x.device).round().long()
    cols = torch.linspace(0.0, w - 1.0, int((w - 1) / (2.0 * step) + 0.5) + 1, device=x.device).round().long()
    samples = x.index_select(2, rows).index_select(3, cols)               # (N, C, sh, sw)
    N, C, sh, sw = samples.shape
    padded = F.pad(samples, [3, 3, 3, 3], mode="replicate")              # BG_WINDOW // 2 at each side
    windows = F.unfold(padded, 7).view(N, C, 49, sh * sw)                # 7 x 7 = BG_WINDOW
    bg = windows.kthvalue(25, 2, keepdim=True).values                   # (N, C, 1, sh * sw): the medians
    # Dense text can hold half a window. The ink's side of each channel (darker or brighter than the
    # background) shows in its skew over the image (Pearson's median skewness; a ramp or a plain
    # background has none); a second median leaves out the samples more than 0.1 beyond the first
    # on that side, so the text cannot pull the background towards itself.
    flat = samples.flatten(2)
    skew = 3.0 * (flat.mean(2) - flat.quantile(0.5, dim=2)) / flat.std(2).clamp_min(1e-6)   # (N, C)
    side = torch.where(skew > 0.5, 1.0, torch.where(skew < -0.5, -1.0, 0.0)).view(N, C, 1, 1)
    bg = _kept_median(windows, side * (windows - bg) > 0.1).view(N, C, sh, sw)
    return F.interpolate(bg, size=[h, w], mode="bilinear", align_corners=True)


def to_ink(x: Tensor) -> Tensor:
    """(N, C, H, W) float in [0, 1], RGB or grey (after compositing) -> (N, 1, H, W) ink in [0, 1]:
    each pixel's distance from the local background (`background`; the largest channel difference),
    divided by the image's ink strength: the mean distance of the pixels within half of the peak,
    the strongest distance two neighbouring pixels share (so a lone noisy pixel cannot set it, a
    1-px stroke can). Pastel glyphs on white, light text on dark, dark text on colour and text on
    a gradient all become the same bright ink on black, however little of the image the text
    covers. A thin frame of any colour is not ink: the background is estimated inside the outer
    3 px (FRAME), and a row or column there that stands out along 80% of its length is a frame
    line. An image whose peak is below MIN_CONTRAST (blank, uniform, a gradient) becomes all zero.
    Each image of the batch is treated on its own, without a host sync."""
    H, W = x.shape[2], x.shape[3]
    b = _border_band(H, W)
    # the background from the inside only (a frame there would pass for background), extended
    # linearly over the band (2 f(edge) - f(edge + k) at edge - k: a ramp goes on to the edges)
    bg = background(x[:, :, b: H - b, b: W - b])
    if b > 0:
        bg = 2.0 * F.pad(bg, [b, b, b, b], mode="replicate") - F.pad(bg, [b, b, b, b], mode="reflect")
    dist = (x - bg).abs().amax(1, keepdim=True)                          # (N, 1, H, W)
    # a frame: a row or column of the border band that stands out along 80% of its length
    lines = (dist > 0.06).float()                                        # 0.06 = MIN_CONTRAST
    rows = torch.arange(H, device=x.device).view(1, 1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, 1, W)
    frame = ((lines.mean(3, keepdim=True) >= 0.8) & ((rows < b) | (rows >= H - b))) \
        | ((lines.mean(2, keepdim=True) >= 0.8) & ((cols < b) | (cols >= W - b)))
    dist = torch.where(frame, torch.zeros_like(dist), dist)
    peak = dist.amax([1, 2, 3], keepdim=True)                            # 1-px-thin images: the strongest
    if H > 1 and W > 1:  # the strongest distance two neighbours share, down or across
        peak = torch.maximum(torch.minimum(dist[:, :, 1:, :], dist[:, :, :-1, :]).amax([1, 2, 3], keepdim=True),
                             torch.minimum(dist[:, :, :, 1:], dist[:, :, :, :-1]).amax([1, 2, 3], keepdim=True))
    strong = (dist >= 0.5 * peak).float()
    strength = (dist * strong).sum([1, 2, 3], keepdim=True) / strong.sum([1, 2, 3], keepdim=True)
    ink = (dist / strength.clamp_min(0.06)).clamp(0.0, 1.0)              # 0.06 = MIN_CONTRAST
    return torch.where(peak >= 0.06, ink, torch.zeros_like(ink))


def prepare(img: Tensor, height: int, max_width: int = 4096) -> Tensor:
    """One (C, H, W) image -> (1, height, W') what preprocess.prepare_image(..., ink=True) gave."""
    check_width(img.shape[1], img.shape[2], height, max_width, "image")
    x = img.unsqueeze(0)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    ink = to_ink(to_channels(x, 3 if x.shape[1] >= 3 else 1))
    box: List[int] = ink_boxes(ink)[0].tolist()
    crop = ink[:, :, box[0]: box[1] + 1, box[2]: box[3] + 1]
    new_w = min(resized_width(crop.shape[2], crop.shape[3], height), max_width)
    if crop.shape[2] != height or crop.shape[3] != new_w:
        crop = F.interpolate(crop, size=[height, new_w], mode="bilinear", align_corners=False, antialias=True)
    return crop[0]
