"""torch.ops.captcha_fast.gru (csrc/gru.cpp): the multi-layer (bi)directional GRU over each sample's
own frames as one op (InferenceCRNN's BiGRU in every format), so torch.export keeps the sequence
length symbolic; and its fake kernel (output shape from input shapes only). train_gru: the same
GRU for training on the CPU, one op per layer and direction forward and backward
(csrc/gru_train.cpp)."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
from torch import Tensor

from captcha_fast import _extension  # noqa: F401  (registers the op)


@torch.library.register_fake("captcha_fast::gru")
def _gru_fake(input, lengths, params, num_layers, bidirectional):
    T, N, _ = input.shape
    H = params[1].shape[1]
    return input.new_empty((T, N, (2 if bidirectional else 1) * H))


def gru_params(rnn: nn.GRU) -> List[Tensor]:
    """nn.GRU's weights in the op's order: (weight_ih, weight_hh, bias_ih, bias_hh) per layer
    and direction, layer 0 forward first (nn.GRU's own flat order)."""
    if not rnn.bias or rnn.batch_first:
        raise ValueError("captcha_fast.gru needs a GRU with biases and (T, N, F) input")
    return [getattr(rnn, name) for name in rnn._flat_weights_names]


def gru(rnn: nn.GRU, x: Tensor, lengths: Tensor) -> Tensor:
    """rnn over x (T, N, F), each sample over its first lengths[n] frames -> (T, N, dirs * H),
    zero after each length: what pack_padded_sequence -> rnn -> pad_packed_sequence gives."""
    return torch.ops.captcha_fast.gru(x, lengths, gru_params(rnn), rnn.num_layers, rnn.bidirectional)


class _GRULayer(torch.autograd.Function):
    """One layer and direction of a GRU for CPU training: captcha_fast::gru_train_layer forward and
    its backpropagation through time (csrc/gru_train.cpp), one op each instead of ATen's per-frame
    ops and autograd nodes."""

    @staticmethod
    def forward(ctx, x, lengths, weight_ih, weight_hh, bias_ih, bias_hh, reverse: bool):
        out, gates = torch.ops.captcha_fast.gru_train_layer(x, lengths, weight_ih, weight_hh, bias_ih, bias_hh,
                                                           reverse)
        ctx.save_for_backward(x, lengths, weight_ih, weight_hh, bias_ih, bias_hh, out, gates)
        ctx.reverse = reverse
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = torch.ops.captcha_fast.gru_train_layer_backward(grad_out, *ctx.saved_tensors, ctx.reverse)
        return grads[0], None, *grads[1:], None


def train_gru(rnn: nn.GRU, x: Tensor, lengths: Tensor) -> Tensor:
    """What `gru(rnn, x, lengths)` returns, differentiable and fast on the CPU in training
    (float32 or float64): nn.GRU's dropout between layers applies when rnn is in training mode,
    on each layer's output but the last, as nn.GRU does."""
    params = gru_params(rnn)
    dirs = 2 if rnn.bidirectional else 1
    for layer in range(rnn.num_layers):
        if layer > 0 and rnn.dropout > 0:
            x = nn.functional.dropout(x, rnn.dropout, rnn.training)
        outs = [_GRULayer.apply(x, lengths, *params[4 * (layer * dirs + d): 4 * (layer * dirs + d + 1)], d == 1)
                for d in range(dirs)]
        x = torch.cat(outs, 2) if dirs == 2 else outs[0]
    return x
