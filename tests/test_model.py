"""The inference model: folded batch norms and InferenceCRNN (its captcha_fast::gru BiGRU) agree with
the training CRNN (eager, random weights), per sample in padded batches, scripted and in low
precision."""
import pytest
import torch
import torch.nn.functional as F

from captcha_fast.model import (CRNN, CRNNConfig, InferenceCRNN, StyleGate, fold_batchnorm, general_model, max_pool_2x2,
                                style_model, widen, with_style_heads)


def _model(seed=0, **kw) -> CRNN:
    torch.manual_seed(seed)
    m = CRNN(CRNNConfig("0123456789abcdef", channels=(8, 16), hidden_dim=32, **kw))
    for mod in m.modules():  # non-trivial batch-norm statistics, so folding is really tested
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def _batch(widths, H=32, C=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(widths), C, H, max(widths))
    for i, w in enumerate(widths):
        x[i, :, :, :w] = torch.rand(C, H, w, generator=g)
    return x, torch.tensor(widths)


@torch.no_grad()
def test_fold_batchnorm_same_outputs_and_original_untouched():
    m = _model()
    x, w = _batch([40, 64, 23])
    want, wl = m(x, w)
    fused = fold_batchnorm(m)
    got, gl = fused(x, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(gl, wl)
    assert isinstance(m.convs[0][1], torch.nn.BatchNorm2d) and isinstance(fused.convs[0][1], torch.nn.Identity)


@torch.no_grad()
@pytest.mark.parametrize("channels, hidden", [((12, 16), 32), ((8, 24), 32), ((8, 16), 40), ((12, 20), 48)])
def test_widen_reads_the_same_and_its_new_units_are_wired(channels, hidden):
    m = _model()  # channels (8, 16), hidden 32
    x, w = _batch([40, 64, 23])
    want, _ = m(x, w)
    wide = widen(m, channels, hidden)
    assert (wide.config.channels, wide.config.hidden_dim, wide.training) == (channels, hidden, False)
    got, _ = wide(x, w)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # the new channels and units compute: weights out of them (zero after widen) change the output
    H4 = 32 // 4
    for weight, old_units, new_inputs in [
            (wide.convs[1][0].weight, 8, slice(8, None)), (wide.convs[2][0].weight, 16, slice(8, None)),
            (wide.convs[3][0].weight, 16, slice(16, None)), (wide.project.weight, 32, slice(16 * H4, None)),
            (wide.classifier.weight, None, slice(32, hidden)), (wide.classifier.weight, None, slice(hidden + 32, None))]:
        assert not weight[:old_units, new_inputs].any()
        weight[:old_units, new_inputs] = torch.randn_like(weight[:old_units, new_inputs])
    moved, _ = wide(x, w)
    assert (moved - want).abs().max() > 1e-3


@torch.no_grad()
def test_residual_blocks_start_as_the_identity_and_widen():
    """A deeper model given a shallower one's weights reads what it read (each new block's last BN
    starts at zero scale); once trained (non-zero scales) the blocks change the output, and widen
    keeps a deep model's reads too."""
    m = _model()
    deep = CRNN(CRNNConfig("0123456789abcdef", channels=(8, 16), hidden_dim=32, res_blocks=2)).eval()
    missing = deep.load_state_dict(m.state_dict(), strict=False).missing_keys
    assert {k.split(".")[1] for k in missing} == {"4", "5", "6", "7"}
    x, w = _batch([40, 64, 23])
    want, _ = m(x, w)
    torch.testing.assert_close(deep(x, w)[0], want, atol=0, rtol=0)
    deep.convs[5][1].weight.fill_(1.0)
    moved, _ = deep(x, w)
    assert (moved - want).abs().max() > 1e-3
    torch.testing.assert_close(widen(deep, (12, 24), 40)(x, w)[0], moved, atol=1e-5, rtol=1e-5)


def test_widen_refuses_to_narrow():
    with pytest.raises(ValueError, match=r"channels \(8, 12\), hidden 32 is narrower than the model's \(8, 16\), 32"):
        widen(_model(), (8, 12), 32)


@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 4, 7, 9), (3, 2, 5, 4)])
def test_max_pool_2x2_equals_max_pool2d(shape):
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool_2x2(x), F.max_pool2d(x, 2))


@pytest.mark.parametrize("widths", [[64, 37, 12, 64, 50], [37], [64, 12, 50]])  # GRU: ATen's batched path, small-batch path
@pytest.mark.parametrize("chunk, res_blocks", [(2, 0), (64, 0), (2, 2)])
@torch.no_grad()
def test_inference_crnn_matches_crnn_per_sample(chunk, res_blocks, widths):
    """Mixed widths and chunking: each sample's frames equal the CRNN's (nn.GRU on packed
    sequences) on that sample alone."""
    m = _model(res_blocks=res_blocks)
    fast = InferenceCRNN(m, chunk=chunk).eval()
    x, w = _batch(widths)
    got, gl = fast(x, w)
    for n in range(len(w)):
        alone, al = m(x[n:n + 1, :, :, : int(w[n])], w[n:n + 1])
        T = int(al[0])
        assert int(gl[n]) == T
        torch.testing.assert_close(got[:T, n], alone[:T, 0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("res_blocks", [0, 1])
def test_inference_crnn_scripts_and_matches_eager(res_blocks):
    fast = InferenceCRNN(_model(res_blocks=res_blocks), chunk=2).eval()
    scripted = torch.jit.script(fast)
    for widths in ([48, 48, 48], [48, 20, 33]):  # unpadded (no masks) and padded paths
        x, w = _batch(widths)
        want = fast(x, w)[0]
        torch.testing.assert_close(scripted(x, w)[0], want, atol=0, rtol=0)


SHARED = {"rnn": ("convs.", "project."), "block2": ("convs.0.", "convs.1.")}  # what a style model shares


def _styled(branch="rnn"):
    """A general tiny model, a style model sharing its convs and projection (branch "rnn": its own GRU and
    classifier) or its first conv block ("block2": its own block 2 on), and a gate that sends images more
    than 40 px wide to the style head (10 frames of the last conv's, 20 of the first block's)."""
    general = _model(seed=0)
    style = _model(seed=5)
    style.load_state_dict({k: v for k, v in general.state_dict().items() if k.startswith(SHARED[branch])},
                          strict=False)
    return general, style, width_gate(16, 10) if branch == "rnn" else width_gate(8, 20)


def width_gate(channels: int, frames: int) -> StyleGate:
    """A gate that sends images of more than `frames` frames to style head 1."""
    gate = StyleGate(channels, 1)
    with torch.no_grad():
        for p in gate.parameters():
            p.zero_()
        gate.out.weight[1, -1], gate.out.bias[1] = 1.0, -float(torch.log(torch.tensor(float(frames))))
    return gate


@torch.no_grad()
@pytest.mark.parametrize("branch", ["rnn", "block2"])
@pytest.mark.parametrize("chunk, widths", [(2, [24, 60, 48, 36, 80]), (64, [24, 60, 48, 36, 80]), (64, [60, 24]),
                                           (64, [24]), (64, [60])])
def test_style_heads_read_each_image_as_the_model_its_gate_picks(branch, chunk, widths):
    """Images over 40 px go to the style head; batches above and within the gru op's small-batch size; batches of
    one head's images (where a head owns block 2, the other's does not run) and mixed ones."""
    general, style, gate = _styled(branch)
    routed = with_style_heads(general, {"wide": style}, gate)
    x, w = _batch(widths)
    for model in (routed, InferenceCRNN(routed, chunk=chunk).eval(), torch.jit.script(InferenceCRNN(routed).eval())):
        got, frames = model(x, w)
        for n, width in enumerate(widths):
            alone, al = (style if width > 40 else general)(x[n:n + 1, :, :, :width], w[n:n + 1])
            T = int(al[0])
            assert int(frames[n]) == T
            torch.testing.assert_close(got[:T, n], alone[:T, 0], atol=1e-5, rtol=1e-5)
    assert routed.config.style_branch == branch


@torch.no_grad()
@pytest.mark.parametrize("widths, runs", [([24, 36], {"general"}), ([60, 80], {"style"}),
                                          ([24, 60], {"general", "style"})])
def test_a_head_that_owns_block_2_runs_only_for_batches_it_is_sent_images_of(widths, runs):
    general, style, gate = _styled("block2")
    routed = with_style_heads(general, {"wide": style}, gate)
    for model in (routed, InferenceCRNN(routed).eval()):
        ran = set()
        hooks = [convs[2].register_forward_hook(lambda *_, name=name: ran.add(name))
                 for name, convs in (("general", model.convs), ("style", model.style_models[0].convs))]
        model(*_batch(widths))
        for hook in hooks:
            hook.remove()
        assert ran == runs


@pytest.mark.parametrize("branch", ["rnn", "block2"])
def test_the_style_and_general_models_taken_back_out_are_the_ones_put_in(branch):
    general, style, gate = _styled(branch)
    routed = with_style_heads(general, {"wide": style}, gate)
    for back, put_in in ((style_model(routed, "wide"), style), (general_model(routed), general)):
        assert back.config == put_in.config
        assert back.state_dict().keys() == put_in.state_dict().keys()
        assert all(torch.equal(back.state_dict()[k], v) for k, v in put_in.state_dict().items())
    with pytest.raises(ValueError, match="no style head 'tall'"):
        style_model(routed, "tall")


def test_style_heads_refuse_a_model_that_does_not_share_the_convs():
    general, style, gate = _styled()
    with torch.no_grad():
        style.convs[0][0].weight.add_(0.01)
    with pytest.raises(ValueError, match="style head 'wide': its first conv block differs"):
        with_style_heads(general, {"wide": style}, gate)
    with pytest.raises(ValueError, match=r"share different layers with the general model: \{'a': 'rnn', 'b': 'block2'"):
        with_style_heads(general, {"a": _styled()[1], "b": _styled("block2")[1]}, StyleGate(8, 2))
    with pytest.raises(ValueError, match="the gate reads 16 channels .* branch off at 'block2': 8 channels"):
        with_style_heads(general, {"wide": _styled("block2")[1]}, gate)
    with pytest.raises(ValueError, match="scores 2 heads; .*: 16 channels, 1 \\+ 2 styles"):
        with_style_heads(general, {"a": _styled()[1], "b": _styled()[1]}, gate)
    with pytest.raises(ValueError, match="style head 'tall': its model differs from the general one: height 16"):
        with_style_heads(general, {"tall": _model(height=16)}, gate)
    with pytest.raises(ValueError, match="at least one style model"):
        with_style_heads(general, {}, gate)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_convs_are_used_and_close(dtype):
    m = _model()
    fp32 = InferenceCRNN(m).eval()
    low = InferenceCRNN(m).eval()
    low.convs.to(dtype)
    x, w = _batch([64, 40])
    seen = []
    hook = low.convs[1].register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    got, _ = low(x.to(dtype), w)
    hook.remove()
    want, _ = fp32(x, w)
    assert seen and all(d == (dtype, dtype) for d in seen)  # the convs really ran in low precision
    assert got.dtype == torch.float32                        # log-softmax in float32
    assert not torch.equal(got, want)                        # ... and the result is really different
    torch.testing.assert_close(got, want, atol=0.1, rtol=0)


def test_a_config_names_what_is_wrong_with_it():
    with pytest.raises(ValueError, match="style_branch must be one of rnn, block2, got 'block3'"):
        CRNNConfig("0123", style_heads=("a",), style_branch="block3")
    with pytest.raises(ValueError, match="height must be a positive multiple of 4"):
        CRNNConfig("0123", height=30)
    with pytest.raises(ValueError, match="res_blocks must be >= 0"):
        CRNNConfig("0123", res_blocks=-1)
    # a branch without heads is where no head branches off: the config reads as one saved before heads
    assert "style_branch" not in CRNNConfig("0123", style_branch="block2").to_dict()
