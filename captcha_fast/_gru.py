"""torch.ops.captcha_fast.gru (csrc/gru.cpp): the multi-layer (bi)directional GRU over each sample's
own frames as one op (InferenceCRNN's BiGRU in every format), so torch.export keeps the sequence
length symbolic; and its fake kernel (output shape from input shapes only)."""
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
