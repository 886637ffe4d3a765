"""The fused CPU training GRU (captcha_fast._gru.train_gru, csrc/gru_train.cpp) against nn.GRU on
packed sequences: outputs and every gradient, gradcheck in float64, dropout between layers,
autocast, bad input, and a few CRNN optimizer steps with the fused path and with nn.GRU's."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from captcha_fast import _gru
from captcha_fast.model import CRNN, CRNNConfig


def packed_gru(rnn: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The reference: nn.GRU over each sample's own frames, zeros after them."""
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    return nn.utils.rnn.pad_packed_sequence(rnn(packed)[0], total_length=x.shape[0])[0]


def outputs_and_grads(run, rnn, x, lengths, grad_out):
    x = x.detach().requires_grad_()
    out = run(rnn, x, lengths)
    grads = torch.autograd.grad(out, [x, *rnn.parameters()], grad_out)
    return out.detach(), grads


@pytest.mark.parametrize("num_layers, bidirectional", [(2, True), (1, True), (2, False)])
@pytest.mark.parametrize("lengths", [[11, 3, 1, 7], [11, 11], [1]])  # the full length T, short ones, a lone frame
def test_outputs_and_gradients_match_packed_nn_gru(num_layers, bidirectional, lengths):
    torch.manual_seed(0)
    rnn = nn.GRU(10, 16, num_layers=num_layers, bidirectional=bidirectional)  # dropout 0: deterministic
    x = torch.randn(11, len(lengths), 10)
    lengths = torch.tensor(lengths)
    grad_out = torch.randn(11, len(lengths), 16 * (2 if bidirectional else 1))
    out, grads = outputs_and_grads(_gru.train_gru, rnn, x, lengths, grad_out)
    want_out, want_grads = outputs_and_grads(packed_gru, rnn, x, lengths, grad_out)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    names = ["input", *(name for name, _ in rnn.named_parameters())]
    for name, got, want in zip(names, grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    assert not out[lengths[-1]:, -1].any(), "frames past a sample's length must be zero"


@pytest.mark.parametrize("reverse", [False, True])
def test_layer_gradcheck_float64(reverse):
    torch.manual_seed(1)
    T, N, F_in, H = 5, 3, 4, 3
    lengths = torch.tensor([2, 5, 0])  # a short sample, one over all T frames, an empty one
    x = torch.randn(T, N, F_in, dtype=torch.double, requires_grad=True)
    weights = [torch.randn(3 * H, F_in), torch.randn(3 * H, H), torch.randn(3 * H), torch.randn(3 * H)]
    weights = [(w * 0.5).double().requires_grad_() for w in weights]
    layer = lambda x, *w: _gru._GRULayer.apply(x, lengths, *w, reverse)  # noqa: E731
    assert torch.autograd.gradcheck(layer, (x, *weights))


def test_stacked_bidirectional_gradcheck_float64():
    """Through layer stacking and the directions' concatenation, for the input and every weight."""
    torch.manual_seed(2)
    rnn = nn.GRU(4, 3, num_layers=2, bidirectional=True).double()
    x = torch.randn(6, 3, 4, dtype=torch.double, requires_grad=True)
    lengths = torch.tensor([6, 2, 4])
    names = rnn._flat_weights_names
    weights = [getattr(rnn, name).detach().clone().requires_grad_() for name in names]

    def run(x, *weights):
        rnn._parameters.update(zip(names, weights))  # the tensors gradcheck perturbs, as rnn's weights
        return _gru.train_gru(rnn, x, lengths)

    assert torch.autograd.gradcheck(run, (x, *weights))


def test_dropout_between_layers_as_nn_gru():
    """nn.GRU drops each layer's output but the last: with the same dropout masks (same seed, the
    same tensor shape), stacking single-layer nn.GRUs gives the same result."""
    torch.manual_seed(3)
    rnn = nn.GRU(6, 5, num_layers=3, bidirectional=True, dropout=0.5).train()
    x, lengths = torch.randn(9, 4, 6), torch.tensor([9, 4, 1, 6])
    layers = [nn.GRU(6 if layer == 0 else 10, 5, bidirectional=True) for layer in range(3)]
    for layer, single in enumerate(layers):
        for name in ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]:
            for suffix in ["", "_reverse"]:
                getattr(single, f"{name}_l0{suffix}").data = getattr(rnn, f"{name}_l{layer}{suffix}").data
    torch.manual_seed(4)
    got = _gru.train_gru(rnn, x, lengths)
    torch.manual_seed(4)
    want = x
    for layer, single in enumerate(layers):
        if layer:
            want = F.dropout(want, 0.5, training=True)
        want = packed_gru(single, want, lengths)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    rnn.eval()  # and no dropout outside training
    torch.testing.assert_close(_gru.train_gru(rnn, x, lengths), packed_gru(rnn, x, lengths), atol=1e-6, rtol=1e-5)


def test_float32_under_bf16_autocast():
    """The GRU is float32 by design: autocast must not turn its GEMMs into bf16."""
    torch.manual_seed(5)
    rnn = nn.GRU(32, 32, bidirectional=True)
    x, lengths = torch.randn(20, 3, 32), torch.tensor([20, 12, 5])
    want = _gru.train_gru(rnn, x, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _gru.train_gru(rnn, x, lengths)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_bad_input_names_the_argument():
    rnn = nn.GRU(4, 3)
    w = [p.detach() for p in rnn.parameters()]
    x, lengths = torch.randn(5, 2, 4), torch.tensor([5, 2])
    op = torch.ops.captcha_fast.gru_train_layer
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 6 is outside \[0, T\]"):
        op(x, torch.tensor([5, 6]), *w, False)
    with pytest.raises(RuntimeError, match="weight_ih must have shape"):
        op(torch.randn(5, 2, 7), lengths, *w, False)
    with pytest.raises(RuntimeError, match="bias_hh must be Float"):
        op(x, lengths, *w[:3], w[3].double(), False)
    with pytest.raises(RuntimeError, match="input must be 3-D"):
        op(x[0], lengths, *w, False)
    with pytest.raises(RuntimeError, match="lengths must be 1-D with one length per sample"):
        op(x, torch.tensor([5]), *w, False)
    with pytest.raises(RuntimeError, match="input must be float32 or float64"):
        op(x.half(), lengths, *w, False)
    out, gates = op(x, lengths, *w, False)
    with pytest.raises(RuntimeError, match="gates must be gru_train_layer's saved gates"):
        torch.ops.captcha_fast.gru_train_layer_backward(out, x, lengths, *w, out, out, False)


def _train_losses(model: CRNN, steps: int):
    torch.manual_seed(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # linear in the gradients, unlike Adam
    images = torch.rand(6, 1, 32, 64)
    widths = torch.tensor([64, 64, 40, 23, 57, 31])
    targets = torch.randint(1, model.config.num_classes, (6, 4))
    losses = []
    for _ in range(steps):
        log_probs, frames = model(images, widths)
        loss = F.ctc_loss(log_probs, targets, frames, torch.full((6,), 4), zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_crnn_training_matches_nn_gru(monkeypatch):
    """CRNN.recurrent takes the fused path in CPU float32 training: a few SGD steps follow the
    same loss trajectory as with nn.GRU (packed)."""
    torch.manual_seed(6)
    model = CRNN(CRNNConfig("0123456789", channels=(8, 16), hidden_dim=24, dropout=0.0)).train()
    reference = copy.deepcopy(model)
    calls = []
    fused = _gru.train_gru
    monkeypatch.setattr(_gru, "train_gru", lambda *a: calls.append(1) or fused(*a))
    losses = _train_losses(model, 5)
    assert len(calls) == 5, "the training forward must take the fused GRU"
    monkeypatch.setattr(_gru, "train_gru", lambda rnn, x, lengths: packed_gru(rnn, x, lengths))
    want = _train_losses(reference, 5)
    assert want[-1] < want[0]  # the steps train: the comparison is not between constants
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), atol=1e-5, rtol=1e-4)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    calls.clear()
    monkeypatch.setattr(_gru, "train_gru", lambda *a: calls.append(1) or fused(*a))
    with torch.no_grad():
        model(torch.rand(2, 1, 32, 64), torch.tensor([64, 30]))
    model.eval()
    model(torch.rand(2, 1, 32, 64), torch.tensor([64, 30]))
    assert not calls, "inference keeps nn.GRU's path"
