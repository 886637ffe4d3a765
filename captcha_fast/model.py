"""The CRNN: two conv blocks (and optional residual blocks after them), a projection, a 2-layer
BiGRU, CTC log-probs.

    (N, C_in, H, W) images in [0, 1]  ->  (T, N, K) log-probs, T = W // 4

Each sample keeps its own width: padding columns are zeroed after every conv
layer and the GRU runs on packed sequences, so a sample in a padded batch gets
the same output as alone (up to float rounding)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from captcha_fast import _gru  # registers captcha_fast::gru and its fake kernel; train_gru
from captcha_fast.charset import Charset


@dataclass
class CRNNConfig:
    charset: str                       # symbols; class 0 is the blank, symbol i is class i + 1
    height: int = 32                   # input height (images are resized to it)
    in_channels: int = 1               # 1: grey, 3: RGB
    channels: Tuple[int, int] = (32, 64)  # output channels of the two conv blocks (in_channels: the input)
    hidden_dim: int = 128              # projection and GRU size
    res_blocks: int = 0                # residual blocks (two convs of channels[1]) after the second pool
    dropout: float = 0.1
    ink: bool = False                  # input: the ink map cropped to the text (preprocess.to_ink), grey only
    style_heads: Tuple[str, ...] = ()  # styles read by heads of their own on the shared convs (StyleGate picks)
    style_branch: str = "rnn"          # where the style heads branch off (STYLE_BRANCHES)

    def __post_init__(self):
        Charset(self.charset)  # validates
        self.channels = tuple(self.channels)
        self.style_heads = tuple(self.style_heads)
        if self.ink and self.in_channels != 1:
            raise ValueError(f"ink=True gives one channel: in_channels must be 1, got {self.in_channels}")
        if self.res_blocks < 0:
            raise ValueError(f"res_blocks must be >= 0, got {self.res_blocks}")
        if self.height % 4 or self.height < 4:
            raise ValueError(f"height must be a positive multiple of 4 (two 2x2 pools), got {self.height}")
        if self.style_branch not in STYLE_BRANCHES:
            raise ValueError(f"style_branch must be one of {', '.join(STYLE_BRANCHES)}, got {self.style_branch!r}")
        if not self.style_heads:
            self.style_branch = "rnn"  # (where no head branches off; a config without heads reads as before them)

    @property
    def num_classes(self) -> int:
        return len(self.charset) + 1

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.style_heads:  # as before style heads existed: an older captcha_fast reads it
            del d["style_heads"]
        if self.style_branch == "rnn":  # as before heads could own a conv block
            del d["style_branch"]
        return d


STYLE_BRANCHES = {
    "rnn": "the style heads own a BiGRU and classifier; they share the convs and projection (StyleHead)",
    "block2": "the style heads own the second conv block (and any residual blocks), projection, BiGRU and "
              "classifier; they share the first conv block (a CRNN each, in CRNN.style_models)",
}


BLOCK_CONVS = 4  # convs of the two pooled blocks; those after them in CRNN.convs are residual pairs


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _residual_pair(c: int) -> Tuple[nn.Sequential, nn.Sequential]:
    """conv-BN-ReLU, conv-BN; the block adds its input before the last ReLU. The last BN starts at
    zero scale (Goyal et al. 2017): a new block passes its input through (ReLU'd input: unchanged),
    so a model grown from one with fewer blocks reads what that one read, and training adds to it."""
    second = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
    nn.init.zeros_(second[1].weight)
    return _conv_bn_relu(c, c), second


def column_mask(widths: Tensor, W: int) -> Tensor:
    """(N, 1, 1, W) float mask: 1 on each sample's own columns, 0 on padding."""
    cols = torch.arange(W, device=widths.device)
    return (cols[None, :] < widths[:, None]).to(torch.float32)[:, None, None, :]


class StyleHead(nn.Module):
    """A BiGRU and classifier of their own for one style, on the CRNN's shared convs and projection:
    projected frames (T, N, hidden) float32, frames (N,) -> log-probs (T, N, K). Trained as a CRNN whose
    convs and projection stay the general model's (train --freeze convs project). A head's GRU skips
    the images it is not sent (length 0); in the inference CRNN it is the gru op, which on CUDA runs
    every frame of the batch, so each head costs its GRU there."""

    def __init__(self, config: CRNNConfig):
        super().__init__()
        H = config.hidden_dim
        self.rnn = nn.GRU(H, H, num_layers=2, bidirectional=True)
        self.classifier = nn.Linear(2 * H, config.num_classes)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.classifier(self.recurrent(x, lengths)).log_softmax(-1)

    def recurrent(self, x: Tensor, lengths: Tensor) -> Tensor:
        return gru_over_lengths(self.rnn, x, lengths)


class InferenceStyleHead(StyleHead):
    """A StyleHead whose BiGRU is the captcha_fast::gru op, as InferenceCRNN's."""

    def __init__(self, head: StyleHead):
        nn.Module.__init__(self)
        self.rnn, self.classifier = InferenceGRU(head.rnn), head.classifier

    def recurrent(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.rnn(x, lengths)


_GRU_WEIGHTS = [f"{kind}_{part}_l{layer}{suffix}" for layer in range(2) for suffix in ("", "_reverse")
                for kind, part in (("weight", "ih"), ("weight", "hh"), ("bias", "ih"), ("bias", "hh"))]


class InferenceGRU(nn.Module):
    """A 2-layer BiGRU (nn.GRU's weights, by its names) as the captcha_fast::gru op: (T, N, H) frames,
    lengths (N,) -> (T, N, 2H), each sample over its own frames.

    Saved in a TorchScript recognizer, its weights are stored in float16 when float16 holds them exactly
    (a shipped model's do: checkpoint.with_half_weights) and widened to float32 as the file loads, in
    Python and in C++ (torch.jit.load runs __setstate__): the GRUs are most of a model's weights, so
    the file is about half as large, and every number is the same."""

    def __init__(self, rnn: nn.GRU):
        super().__init__()
        if rnn._flat_weights_names != _GRU_WEIGHTS:
            raise ValueError(f"InferenceGRU takes a 2-layer bidirectional nn.GRU with biases, not {rnn}")
        for name in _GRU_WEIGHTS:
            self.register_parameter(name, getattr(rnn, name))

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return torch.ops.captcha_fast.gru(x, lengths, self.weights(), 2, True)

    def weights(self) -> List[Tensor]:
        """In nn.GRU's _flat_weights order, read each call (a cached list would miss a moved or assigned one)."""
        return [self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0,
                self.weight_ih_l0_reverse, self.weight_hh_l0_reverse, self.bias_ih_l0_reverse, self.bias_hh_l0_reverse,
                self.weight_ih_l1, self.weight_hh_l1, self.bias_ih_l1, self.bias_hh_l1,
                self.weight_ih_l1_reverse, self.weight_hh_l1_reverse, self.bias_ih_l1_reverse, self.bias_hh_l1_reverse]

    @torch.jit.export
    def __getstate__(self):
        if torch.jit.is_scripting():  # saving a TorchScript module (a Python copy or pickle: as any module)
            weights = self.weights()
            exact = True
            for w in weights:
                exact = exact and bool(torch.equal(w.detach().half().float(), w.detach().float()))
            return [w.detach().half() if exact else w.detach() for w in weights], self.training
        return nn.Module.__getstate__(self)

    @torch.jit.export
    def __setstate__(self, state: Tuple[List[Tensor], bool]):
        if torch.jit.is_scripting():  # loading one: every attribute is set here (TorchScript has no setattr)
            w = [t.float() for t in state[0]]
            self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0 = w[0], w[1], w[2], w[3]
            self.weight_ih_l0_reverse, self.weight_hh_l0_reverse = w[4], w[5]
            self.bias_ih_l0_reverse, self.bias_hh_l0_reverse = w[6], w[7]
            self.weight_ih_l1, self.weight_hh_l1, self.bias_ih_l1, self.bias_hh_l1 = w[8], w[9], w[10], w[11]
            self.weight_ih_l1_reverse, self.weight_hh_l1_reverse = w[12], w[13]
            self.bias_ih_l1_reverse, self.bias_hh_l1_reverse = w[14], w[15]
            self.training = state[1]
        else:
            nn.Module.__setstate__(self, state)


def branch_model(config: CRNNConfig) -> CRNN:
    """A style head that owns the layers after the first conv block (style_branch "block2"): a CRNN of
    `config` without style heads whose first block is a placeholder (the owner's is shared), so its
    weights keep a plain CRNN's names (style_model, with_style_heads)."""
    model = CRNN(replace(config, style_heads=(), style_branch="rnn"))
    for i in range(BLOCK_CONVS // 2):
        model.convs[i] = nn.Identity()
    return model


def gru_over_lengths(rnn: nn.GRU, x: Tensor, lengths: Tensor) -> Tensor:
    """nn.GRU over each sample's own frames (packed when lengths differ; length 0: a sample another head
    reads, zeros) -> (T, N, 2 * hidden), zero after each length. Eager only: the inference models
    (scripted, exported) run the gru op instead."""
    T = x.shape[0]
    if bool((lengths == T).all()):
        return rnn(x)[0]
    out = x.new_zeros(T, x.shape[1], 2 * rnn.hidden_size)
    live = (lengths > 0).nonzero().squeeze(1)
    if live.numel() > 0:
        packed = nn.utils.rnn.pack_padded_sequence(x[:, live], lengths[live].cpu(), enforce_sorted=False)
        out[:, live] = nn.utils.rnn.pad_packed_sequence(rnn(packed)[0], total_length=T)[0]
    return out


GATE_WIDTH = 32  # the style gate's conv channels


class StyleGate(nn.Module):
    """Which head reads each image, from the shared conv features: (N, C, H, T) and frames (N,) ->
    scores (N, 1 + style heads), 0 the general head. A 3x3 conv, its mean over each image's own
    frames, and the image's frame count (its aspect ratio) to a linear layer: on the last conv's
    features 147 k multiply-adds a frame of the shipped shape (3.5% of the CRNN's), on the first block's
    (heads that own block 2) 295 k (7%). Pooled statistics of a 1x1 conv, or of the features
    themselves, through a linear layer or an MLP cost 8-15x less and routed worse (session 27: more of
    the unseen styles and of varlen_upper to the package head, less of the package)."""

    def __init__(self, channels: int, heads: int, width: int = GATE_WIDTH):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.out = nn.Linear(width + 1, 1 + heads)

    def forward(self, x: Tensor, frames: Tensor) -> Tensor:
        frames = frames.clamp(min=1)
        mask = column_mask(frames, x.shape[-1])
        h = F.relu(self.conv(x.float())) * mask
        pooled = h.sum((2, 3)) / (frames.to(torch.float32) * x.shape[2])[:, None]
        return self.out(torch.cat([pooled, torch.log(frames.to(torch.float32))[:, None]], 1))


class CRNN(nn.Module):
    """forward = features (conv stack) -> head (projection, BiGRU, classifier, log-softmax).
    The inference and export variants below override only what they do differently."""

    def __init__(self, config: CRNNConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        self.convs = nn.ModuleList([
            _conv_bn_relu(config.in_channels, c1), _conv_bn_relu(c1, c1),
            _conv_bn_relu(c1, c2), _conv_bn_relu(c2, c2),
        ] + [conv for _ in range(config.res_blocks) for conv in _residual_pair(c2)])
        self.project = nn.Linear(c2 * (config.height // 4), config.hidden_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.rnn = nn.GRU(config.hidden_dim, config.hidden_dim, num_layers=2, bidirectional=True,
                          dropout=config.dropout)
        self.classifier = nn.Linear(2 * config.hidden_dim, config.num_classes)
        own_block2 = config.style_branch == "block2"
        self.style_heads = nn.ModuleList([] if own_block2 else [StyleHead(config) for _ in config.style_heads])
        self.style_models = nn.ModuleList([branch_model(config) for _ in config.style_heads] if own_block2 else [])
        self.gate = nn.ModuleList([StyleGate(c1 if own_block2 else c2, len(config.style_heads))]
                                  if config.style_heads else [])
        # the convs every head reads: the first block's where the heads own block 2, else all of them
        self.shared_convs: int = BLOCK_CONVS // 2 if self.style_models else len(self.convs)

    def output_lengths(self, widths: Tensor) -> Tensor:
        """Frames per sample: each 2x2 max-pool halves (floors) the width."""
        return widths // 4

    def forward(self, images: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        """images (N, C_in, H, W) in [0, 1], right-padded; widths (N,) int64
        -> log-probs (T, N, K) float32, frames per sample (N,)."""
        x, w = self.features(images, widths)
        return self.head(x, w)

    def features(self, images: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        """-> the shared conv features (N, C, H / 4, W / 4), widths / 4 (floored per pool); where the style
        heads own block 2, the first block's (N, C1, H / 2, W / 2), widths / 2."""
        x = (images - 0.5) * column_mask(widths, images.shape[-1]).to(images.dtype)
        return self.run_convs(x, widths, 0, self.shared_convs, False)

    def run_convs(self, x: Tensor, w: Tensor, start: int, stop: int, unpadded: bool) -> Tuple[Tensor, Tensor]:
        """convs[start:stop] (whole blocks) on x, the masked output of those before them; widths w ->
        their output and widths. join, pool and after_conv are what InferenceCRNN does differently
        (unpadded: its masks skipped; every column is masked here)."""
        skip = x
        for i, conv in enumerate(self.convs):
            if i < start or i >= stop:  # (no `continue`: TorchScript unrolls the loop)
                pass
            else:
                if i >= 4 and i % 2 == 0:  # a residual block's input (4 = BLOCK_CONVS: TorchScript can't read globals)
                    skip = x
                x = conv(x)
                if i >= 4 and i % 2 == 1:
                    x = self.join(x, skip)
                elif i % 2 == 1:  # end of a block: pool, and the widths halve (floor)
                    x = self.pool(x)
                    w = w // 2
                x = self.after_conv(x, w, unpadded)
        return x, w

    def join(self, x: Tensor, skip: Tensor) -> Tensor:
        """A residual block's output: its input added before the last ReLU."""
        return F.relu(x + skip)

    def pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2)

    def after_conv(self, x: Tensor, w: Tensor, unpadded: bool) -> Tensor:
        # Zero the padding columns, so the next conv sees what a lone image's
        # zero padding gives. (Before a pool this is not needed: the columns it
        # would clean only reach pooled columns that are masked after it.)
        return x * column_mask(w, x.shape[-1]).to(x.dtype)

    def head(self, x: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
        """Shared conv features (features()) -> log-probs (T, N, K) float32, frames (N,); the GRU runs in
        float32. With style heads, the gate picks one head per image; the others' GRUs skip it."""
        if len(self.style_models) > 0:
            return self.read_by_branch(x, w, self.route(x, w))
        if len(self.style_heads) == 0:
            return self.read(x, w.clamp(min=1)), w
        p = self.projected(x)
        choice = self.route(x, w)
        frames, none = w.clamp(min=1), torch.zeros_like(w)  # a head's GRU skips the images it is not sent
        out = self.classifier(self.dropout(self.recurrent(p, torch.where(choice == 0, frames, none)))).log_softmax(-1)
        for i, style in enumerate(self.style_heads):
            mine = choice == i + 1
            out = torch.where(mine[None, :, None], style(p, torch.where(mine, frames, none)), out)
        return out, w

    def projected(self, x: Tensor) -> Tensor:
        """Conv features (N, C, H, T) -> projected frames (T, N, hidden) float32."""
        N, C, H, T = x.shape
        p = x.permute(3, 0, 1, 2).reshape(T, N, C * H)        # width is the sequence axis
        return self.dropout(F.relu(self.project(p.float())))

    def read(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Last conv features (N, C, H, T) -> log-probs (T, N, K), the GRU over `lengths` frames (0: skipped)."""
        return self.classifier(self.dropout(self.recurrent(self.projected(x), lengths))).log_softmax(-1)

    def read_by_branch(self, x: Tensor, w: Tensor, choice: Tensor) -> Tuple[Tensor, Tensor]:
        """First-block features -> log-probs, each image read by the head `choice` picks (0 this model's
        layers after the block, i the i-th of style_models). A head runs only if the batch holds an image
        sent to it (branch_if): a batch of one style pays for one block 2."""
        out = self.branch_if(choice == 0, x, w)
        for i, style in enumerate(self.style_models):
            mine = choice == i + 1
            out = torch.where(mine[None, :, None], style.branch_if(mine, x, w), out)
        return out, w // 2

    def branch_if(self, mine: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """This model's convs after the first block and its head, on first-block features, for the images
        in `mine` (N,) bool; zeros for the others. Run (eager, TorchScript), on those images alone; traced
        (torch.export), on the whole batch if it holds any of them (torch.cond keeps the choice in the
        program: a per-image split compiles wrongly under AOTInductor, docs/accuracy.md)."""
        if not torch.jit.is_scripting():
            if torch.compiler.is_compiling():
                return torch.cond(mine.any(), self.branch, self.no_branch, (mine, x, w))
        if bool(mine.all()):
            return self.branch(mine, x, w)
        out = self.no_branch(mine, x, w)
        if bool(mine.any()):
            mine_at = mine.nonzero().squeeze(1)
            out = out.index_copy(1, mine_at, self.branch(mine[mine_at], x[mine_at], w[mine_at]))
        return out

    def branch(self, mine: Tensor, x: Tensor, w: Tensor) -> Tensor:
        x, w = self.branch_convs(x, w)
        return self.read(x, torch.where(mine, w.clamp(min=1), torch.zeros_like(w)))

    def branch_convs(self, x: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
        """The convs after the first block (a style model's own, or the general model's)."""
        return self.run_convs(x, w, 2, len(self.convs), False)  # 2 = BLOCK_CONVS // 2 (TorchScript reads no globals)

    def no_branch(self, mine: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return torch.zeros(x.shape[-1] // 2, x.shape[0], self.classifier.out_features, dtype=torch.float32,
                           device=x.device)

    def route(self, x: Tensor, w: Tensor) -> Tensor:
        """The head each image goes to (N,) int64: 0 the general one, i the i-th style head."""
        choice = torch.zeros_like(w)
        for gate in self.gate:  # none or one
            choice = gate(x, w).argmax(1)
        return choice

    def recurrent(self, x: Tensor, lengths: Tensor) -> Tensor:
        """The BiGRU over each sample's own frames (packed when lengths differ)."""
        if self.training and torch.is_grad_enabled() and x.device.type == "cpu" and x.is_floating_point():
            # ATen's CPU GRU runs ~10 small ops and autograd nodes per frame: a third of a step.
            # Under bf16 autocast too, in float32, as head() promises (and inference runs it).
            return _gru.train_gru(self.rnn, x if x.dtype == torch.float64 else x.float(), lengths)
        return gru_over_lengths(self.rnn, x, lengths)


def widen(model: CRNN, channels: Tuple[int, int], hidden_dim: int) -> CRNN:
    """A copy of `model` with wider conv blocks and GRU that computes the same outputs (eval mode):
    each new channel or unit gets fresh incoming weights and zero outgoing ones, so training a
    wider model can start from what a narrower one reads instead of from scratch (Net2Net's aim,
    with zero fan-out in place of split copies)."""
    old, (c1, c2), H = model.config, model.config.channels, model.config.hidden_dim
    if old.style_heads:
        raise ValueError("widen: a model with style heads cannot be widened (widen its general model, then "
                         "train the style heads again)")
    if channels[0] < c1 or channels[1] < c2 or hidden_dim < H:
        raise ValueError(f"widen: channels {tuple(channels)}, hidden {hidden_dim} is narrower than the model's "
                         f"{old.channels}, {H}")
    wide = CRNN(replace(old, channels=tuple(channels), hidden_dim=hidden_dim))
    W = hidden_dim
    prefix = torch.arange
    gates = torch.cat([g * W + prefix(H) for g in range(3)])  # r, z, n blocks of a GRU weight's rows
    both = torch.cat([prefix(H), W + prefix(H)])               # forward and reverse halves of a BiGRU output
    conv_out = [c1, c1, c2, c2] + [c2] * (2 * old.res_blocks)
    rows, cols = {}, {}                                         # parameter name -> old indices' places
    for i, c in enumerate(conv_out):
        rows[f"convs.{i}.0.weight"], cols[f"convs.{i}.0.weight"] = prefix(c), prefix(([old.in_channels] + conv_out)[i])
        for part in ("weight", "bias", "running_mean", "running_var"):
            rows[f"convs.{i}.1.{part}"] = prefix(c)
    rows["project.weight"], cols["project.weight"] = prefix(H), prefix(c2 * (old.height // 4))  # index c * H/4 + h
    rows["project.bias"] = prefix(H)
    for layer in range(2):
        for sfx in (f"_l{layer}", f"_l{layer}_reverse"):
            rows[f"rnn.weight_ih{sfx}"], cols[f"rnn.weight_ih{sfx}"] = gates, prefix(H) if layer == 0 else both
            rows[f"rnn.weight_hh{sfx}"], cols[f"rnn.weight_hh{sfx}"] = gates, prefix(H)
            rows[f"rnn.bias_ih{sfx}"] = rows[f"rnn.bias_hh{sfx}"] = gates
    rows["classifier.weight"], cols["classifier.weight"] = prefix(old.num_classes), both
    rows["classifier.bias"] = prefix(old.num_classes)
    src, dst = model.state_dict(), wide.state_dict()
    with torch.no_grad():
        for name, t in dst.items():
            if name not in rows:  # num_batches_tracked
                t.copy_(src[name])
                continue
            value = src[name]
            if name in cols:  # the old units' rows read nothing from the new ones
                value = value.new_zeros((value.shape[0], t.shape[1]) + value.shape[2:])
                value[:, cols[name]] = src[name]
            t[rows[name]] = value
    return wide.train(model.training)


def with_style_heads(general: CRNN, styles: Dict[str, CRNN], gate: StyleGate) -> CRNN:
    """One CRNN (eval mode) that reads each image with `general`'s head or one of `styles`' (a style
    name -> a CRNN trained from `general` with some of its first layers frozen), as `gate` picks: gate
    score 0 is the general head, i the i-th style. Where the heads branch off (STYLE_BRANCHES) follows
    from what the style models share with `general`: the convs and projection (train --freeze convs
    project: heads of a BiGRU and classifier), else the first conv block (--freeze block1: heads that
    own the rest). ValueError if they share neither, differ among themselves, or differ otherwise."""
    if not styles or general.config.style_heads:
        raise ValueError("with_style_heads takes a general model without style heads and at least one style model")
    model = CRNN(replace(general.config, style_heads=tuple(styles), style_branch=style_branch(general, styles)))
    state = general.state_dict()
    for i, (prefix, m) in enumerate(zip(_head_prefixes(model), styles.values())):
        own = m.state_dict()
        state.update({prefix + k: own[k] for k in getattr(model, _heads_attr(model))[i].state_dict()})
    if gate.out.out_features != 1 + len(styles) or gate.conv.in_channels != model.gate[0].conv.in_channels:
        raise ValueError(f"the gate reads {gate.conv.in_channels} channels and scores {gate.out.out_features} heads; "
                         f"the heads branch off at {model.config.style_branch!r}: {model.gate[0].conv.in_channels} "
                         f"channels, 1 + {len(styles)} styles")
    state.update({f"gate.0.{k}": v for k, v in gate.state_dict().items()})
    model.load_state_dict(state)
    return model.eval()


def style_branch(general: CRNN, styles: Dict[str, CRNN]) -> str:
    """Where the style models branch off `general` (STYLE_BRANCHES), from the weights they share with it;
    ValueError if they share neither the convs and projection nor the first block, or not alike."""
    state = general.state_dict()
    branches = {name: _branch_of(name, m, general, state) for name, m in styles.items()}
    if len(set(branches.values())) > 1:
        raise ValueError(f"the style models share different layers with the general model: {branches}")
    return next(iter(branches.values()))


def _branch_of(name: str, m: CRNN, general: CRNN, state: Dict[str, Tensor]) -> str:
    """Where style model `name` branches off `general`, whose state dict is `state`."""
    differ = [f"{k} {getattr(m.config, k)!r} (the general model's: {getattr(general.config, k)!r})"
              for k in m.config.to_dict() if k != "dropout" and getattr(m.config, k) != getattr(general.config, k)]
    if differ:
        raise ValueError(f"style head {name!r}: its model differs from the general one: {', '.join(differ)}")
    own = m.state_dict()
    block1 = tuple(f"convs.{i}." for i in range(BLOCK_CONVS // 2))
    same = {k for k, v in state.items() if torch.equal(own[k], v)}
    if all(k in same for k in state if k.startswith(("convs.", "project."))):
        return "rnn"
    if all(k in same for k in state if k.startswith(block1)):
        return "block2"
    raise ValueError(f"style head {name!r}: its first conv block differs from the general model's (a style head is "
                     f"trained with it frozen: train --freeze convs project, or --freeze block1)")


def _heads_attr(model: CRNN) -> str:
    """Where `model`'s style heads are: style_models (they own block 2) or style_heads (a GRU and classifier)."""
    return "style_models" if model.config.style_branch == "block2" else "style_heads"


def _head_prefixes(model: CRNN) -> List[str]:
    """The state-dict prefix of each style head's weights, in config.style_heads' order."""
    return [f"{_heads_attr(model)}.{i}." for i in range(len(model.config.style_heads))]


def general_model(model: CRNN) -> CRNN:
    """The CRNN that reads as `model`'s general head (its convs, projection, GRU and classifier; no style
    heads, no gate): with_style_heads' `general` again, e.g. to assemble it with heads trained further."""
    single = CRNN(replace(model.config, style_heads=(), style_branch="rnn"))
    heads = ("style_heads.", "style_models.", "gate.")
    single.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(heads)})
    return single.train(model.training)


def style_model(model: CRNN, style: str) -> CRNN:
    """The CRNN that reads as `model`'s head for `style` (the shared layers and the head's own): with_style_heads'
    part for it, e.g. to train the head further with the shared layers frozen."""
    if style not in model.config.style_heads:
        raise ValueError(f"the model has no style head {style!r} (it has: {', '.join(model.config.style_heads)})")
    prefix = _head_prefixes(model)[model.config.style_heads.index(style)]
    single = general_model(model)
    own = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    single.load_state_dict({**single.state_dict(), **own})
    return single


def conv_lists(model: nn.Module) -> list:
    """The conv ModuleLists of a CRNN or InferenceCRNN (scripted too): its own and each style model's."""
    styles = model.style_models.named_children() if hasattr(model, "style_models") else []  # (a loaded ModuleList
    return [model.convs] + [m.convs for _, m in styles]                                       # does not iterate)


def convs_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every conv of `model` (conv_lists) to `dtype` in place: the convs run in it, the rest in float32."""
    for convs in conv_lists(model):
        convs.to(dtype)


def fold_batchnorm(model: CRNN) -> CRNN:
    """An inference copy of `model` (eval mode) with each BatchNorm folded into the conv
    before it (conv gets a bias, the BatchNorm becomes Identity): same outputs, two
    fewer passes over every activation. The original is not changed."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for block in fused.convs:
        if isinstance(block, nn.Sequential) and isinstance(block[1], nn.BatchNorm2d):  # (not a placeholder)
            block[0] = fuse_conv_bn_eval(block[0], block[1])
            block[1] = nn.Identity()
    return fused


def max_pool_2x2(x: Tensor) -> Tensor:
    """F.max_pool2d(x, 2) (floor mode) as three elementwise maxima of strided views:
    the same values, ~8x faster than the CPU pooling kernel on channels-last input."""
    H, W = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    x = x[:, :, :H, :W]
    return torch.maximum(torch.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]),
                         torch.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))


class InferenceCRNN(CRNN):
    """A CRNN prepared for fast inference, with the same forward and head; what differs is how the convs
    run (features, run_convs' steps, branch_convs) and the GRU:

    - batch norms folded into the convs (no BN passes), no dropout;
    - channels-last activations (oneDNN's native layout) and a 2x2 max-pool made of maxima;
    - the conv stack runs `chunk` images at a time on the CPU, so each activation stays in cache;
    - the column masks are skipped when no sample is padded (they would multiply by 1);
    - the BiGRU is one captcha_fast::gru op (csrc/gru.cpp): each sample over its own frames without
      packing or a host sync, with a path for small CPU batches that skips ATen's per-frame ops
      (one image per call), and export keeps the sequence length symbolic.

    The convs run in their weights' dtype (cast them for bf16/fp16); projection, GRU,
    classifier and log-softmax run in float32."""

    def __init__(self, model: CRNN, chunk: int = 16):
        nn.Module.__init__(self)
        fused = fold_batchnorm(model)
        self.config = fused.config
        # convs with folded BN bias (a style model's shared first block: its placeholders)
        self.convs = nn.ModuleList([b[0] if isinstance(b, nn.Sequential) else b for b in fused.convs])
        self.project, self.rnn, self.classifier = fused.project, InferenceGRU(fused.rnn), fused.classifier
        self.style_heads = nn.ModuleList([InferenceStyleHead(head) for head in fused.style_heads])
        self.style_models = nn.ModuleList([InferenceCRNN(m, chunk) for m in fused.style_models])
        self.gate = fused.gate
        self.shared_convs: int = fused.shared_convs
        self.dropout = nn.Identity()
        self.chunk = chunk

    def features(self, images: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        N, W = images.shape[0], images.shape[-1]
        unpadded = bool((widths >= W).all())  # no padding anywhere: masks are all ones
        if N <= self.chunk or images.is_cuda:  # GPUs want big kernels, not cache-sized chunks
            return self.conv_stack(images, widths, unpadded)
        parts = [self.conv_stack(images[i: i + self.chunk], widths[i: i + self.chunk], unpadded)
                 for i in range(0, N, self.chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def recurrent(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.rnn(x, lengths)

    def conv_stack(self, images: Tensor, widths: Tensor, unpadded: bool) -> Tuple[Tensor, Tensor]:
        """(n, C_in, H, W) -> the shared conv features (channels-last; features()), their widths."""
        x = images - 0.5
        if not unpadded:
            x = x * column_mask(widths, x.shape[-1]).to(x.dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        return self.run_convs(x, widths, 0, self.shared_convs, unpadded)

    def branch_convs(self, x: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
        """As CRNN's, `chunk` images at a time on the CPU and without masks when nothing is padded, as
        features runs the first block (traced for export: the whole batch, masked)."""
        if not torch.jit.is_scripting():
            if torch.compiler.is_compiling():
                return self.run_convs(x, w, 2, len(self.convs), False)
        N = x.shape[0]
        unpadded = bool((w >= x.shape[-1]).all())
        if N <= self.chunk or x.is_cuda:
            return self.run_convs(x, w, 2, len(self.convs), unpadded)
        parts = [self.run_convs(x[i: i + self.chunk], w[i: i + self.chunk], 2, len(self.convs), unpadded)
                 for i in range(0, N, self.chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def join(self, x: Tensor, skip: Tensor) -> Tensor:
        return x + skip  # (the ReLU: after_conv)

    def pool(self, x: Tensor) -> Tensor:
        return max_pool_2x2(x)

    def after_conv(self, x: Tensor, w: Tensor, unpadded: bool) -> Tensor:
        x = F.relu(x, inplace=True)  # after the pool: max and ReLU commute, 4x fewer elements
        if not unpadded:
            x = x * column_mask(w, x.shape[-1]).to(x.dtype)
        return x
