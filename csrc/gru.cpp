// captcha_fast::gru: a (bi)directional multi-layer GRU over each sample's own frames, as one op,
// so that torch.export / AOTInductor keep the sequence length symbolic and the native at::gru
// kernel runs (exporting nn.GRU with a dynamic length specialises the length to a constant).
//
// The result of nn.GRU on a packed sequence (pack_padded_sequence -> GRU -> pad_packed_sequence).
// On the CPU it is that (the lengths are read for free there). Elsewhere, without packing and
// without a host sync: the forward direction runs over all T frames (a sample's own frames
// never see its padding, which comes after them), the backward direction runs over each sample
// reversed within its own length, padding last. Registered as CompositeExplicitAutograd: at::gru
// dispatches per device.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace captcha_fast {
namespace {

void check_gru_inputs(const at::Tensor& input, const at::Tensor& lengths, at::TensorList params,
                      int64_t num_layers, bool bidirectional) {
  const char* op = "gru";
  TORCH_CHECK(input.dim() == 3, op, ": input must be 3-D (T, N, F) = (frames, batch, features), got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": input must be floating point, got ",
              input.scalar_type());
  const int64_t T = input.size(0), N = input.size(1);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == N, op,
              ": lengths must be 1-D with one length per sample (", N, "), got shape ", lengths.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kLong || lengths.scalar_type() == at::kInt, op,
              ": lengths must be int64 or int32, got ", lengths.scalar_type());
  TORCH_CHECK(lengths.device() == input.device(), op, ": lengths must be on the same device as input (",
              input.device(), "), got ", lengths.device());
  TORCH_CHECK(num_layers >= 1, op, ": num_layers must be >= 1, got ", num_layers);
  const int64_t dirs = bidirectional ? 2 : 1;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == 4 * num_layers * dirs, op,
              ": params must hold (weight_ih, weight_hh, bias_ih, bias_hh) per layer and direction, in "
              "nn.GRU's order: ", 4 * num_layers * dirs, " tensors, got ", params.size());
  const int64_t H = params[1].dim() == 2 ? params[1].size(1) : -1;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const int64_t in_size = layer == 0 ? input.size(2) : dirs * H;
    for (int64_t d = 0; d < dirs; ++d) {
      const int64_t i = 4 * (layer * dirs + d);
      const std::vector<int64_t> want[4] = {{3 * H, in_size}, {3 * H, H}, {3 * H}, {3 * H}};
      for (int64_t k = 0; k < 4; ++k) {
        const at::Tensor& p = params[i + k];
        TORCH_CHECK(p.sizes() == at::IntArrayRef(want[k]), op, ": params[", i + k, "] (layer ", layer,
                    d ? " reverse" : "", ", ", k == 0 ? "weight_ih" : k == 1 ? "weight_hh" : k == 2 ? "bias_ih" : "bias_hh",
                    ") must have shape ", at::IntArrayRef(want[k]), ", got ", p.sizes());
        TORCH_CHECK(p.scalar_type() == input.scalar_type() && p.device() == input.device(), op, ": params[",
                    i + k, "] must be ", input.scalar_type(), " on ", input.device(), " as input, got ",
                    p.scalar_type(), " on ", p.device());
      }
    }
  }
  if (lengths.is_cpu() && N > 0) {  // on CUDA this would be a host sync: lengths are clamped instead
    const at::Tensor bad = ((lengths < 0) | (lengths > T)).nonzero();
    if (bad.numel() > 0) {
      const int64_t i = bad[0][0].item<int64_t>();
      TORCH_CHECK(false, op, ": lengths[", i, "] = ", lengths[i].item<int64_t>(), " is outside [0, T] with T = ",
                  T, " frames");
    }
  }
}

// input (T, N, F), lengths (N,) -> (T, N, dirs * H), zero after each sample's length.
at::Tensor gru(const at::Tensor& input, const at::Tensor& lengths, at::TensorList params, int64_t num_layers,
               bool bidirectional) {
  check_gru_inputs(input, lengths, params, num_layers, bidirectional);
  const int64_t T = input.size(0), N = input.size(1), H = params[1].size(1);
  const int64_t dirs = bidirectional ? 2 : 1;
  if (T == 0 || N == 0) return at::zeros({T, N, dirs * H}, input.options());
  if (lengths.is_cpu() && (lengths > 0).all().item<bool>()) {
    // On the CPU, reading the lengths costs nothing: run nn.GRU's own path, one call over all
    // layers and directions (packed when padded, which skips the padding frames' work).
    const at::Tensor hx = at::zeros({num_layers * dirs, N, H}, input.options());
    if ((lengths == T).all().item<bool>())
      return std::get<0>(at::gru(input, hx, params, /*has_biases=*/true, num_layers, /*dropout=*/0.0,
                                 /*train=*/false, bidirectional, /*batch_first=*/false));
    const auto [sorted_lengths, order] = lengths.to(at::kLong).sort(0, /*descending=*/true);
    const auto [data, batch_sizes] = at::_pack_padded_sequence(input.index_select(1, order), sorted_lengths, false);
    const at::Tensor out = std::get<0>(at::gru(data, batch_sizes, hx, params, /*has_biases=*/true, num_layers,
                                               /*dropout=*/0.0, /*train=*/false, bidirectional));
    return std::get<0>(at::_pad_packed_sequence(out, batch_sizes, false, 0.0, T)).index_select(1, order.argsort());
  }
  const at::Tensor len = lengths.to(at::kLong).clamp(0, T).unsqueeze(0);              // (1, N)
  const at::Tensor t = at::arange(T, len.options()).unsqueeze(1);                     // (T, 1)
  const at::Tensor valid = t < len;                                                   // (T, N)
  // Frame t of sample n <-> frame len - 1 - t: each sample reversed within its own frames (an
  // involution: the same index turns the result back); padding frames stay where they are.
  const at::Tensor rev = at::where(valid, len - 1 - t, t).unsqueeze(2);               // (T, N, 1)
  const at::Tensor h0 = at::zeros({1, N, H}, input.options());
  auto run = [&](const at::Tensor& x, int64_t layer, int64_t d) {
    const int64_t i = 4 * (layer * dirs + d);
    return std::get<0>(at::gru(x, h0, {params[i], params[i + 1], params[i + 2], params[i + 3]},
                               /*has_biases=*/true, /*num_layers=*/1, /*dropout=*/0.0, /*train=*/false,
                               /*bidirectional=*/false, /*batch_first=*/false));
  };
  at::Tensor x = input.contiguous();
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    at::Tensor forward = run(x, layer, 0);
    if (!bidirectional) {
      x = forward;
      continue;
    }
    at::Tensor backward = run(x.gather(0, rev.expand({T, N, x.size(2)})), layer, 1);
    x = at::cat({forward, backward.gather(0, rev.expand({T, N, H}))}, 2);
  }
  return x * valid.unsqueeze(2).to(x.scalar_type());  // zeros after each length, as pad_packed_sequence
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(captcha_fast, m) {
  m.def(
      "gru(Tensor input, Tensor lengths, Tensor[] params, int num_layers, bool bidirectional) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(captcha_fast, CompositeExplicitAutograd, m) { m.impl("gru", &gru); }

}  // namespace captcha_fast
