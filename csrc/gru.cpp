// captcha_fast::gru: a (bi)directional multi-layer GRU over each sample's own frames, as one op,
// so that torch.export / AOTInductor keep the sequence length symbolic and TorchScript and the
// exported models run the same kernels (exporting nn.GRU with a dynamic length specialises the
// length to a constant).
//
// The result of nn.GRU on a packed sequence (pack_padded_sequence -> GRU -> pad_packed_sequence),
// up to float rounding. On the CPU (where reading the lengths costs nothing): small batches run
// the recurrence as plain loops (small_batch_gru), larger ones nn.GRU's own kernel, packed when
// padded. Elsewhere, without packing and without a host sync: the forward direction runs over all
// T frames (a sample's own frames never see its padding, which comes after them), the backward
// direction runs over each sample reversed within its own length, padding last. Registered as
// CompositeExplicitAutograd: at::gru dispatches per device.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>
#include <torch/library.h>

#include "ops.h"
#include "vector_exp.h"

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
  if (lengths.is_cpu())  // on CUDA this would be a host sync: lengths are clamped instead
    check_lengths_in_range(lengths, T, op, "lengths");
}

// A small batch on the CPU (one image per call): ATen's GRU runs about ten small ops per frame,
// layer and direction, whose dispatch costs far more than their arithmetic at batch 1 (callgrind:
// ~16M instructions for a 30-frame 2-layer BiGRU with 128 units). Here the input gates of a layer
// and direction are one addmm over each sample's frames, and the recurrence runs as plain loops, one task
// per (direction, sample) in parallel: each sample over its own frames (the reverse direction
// from its last frame), zeros after them. nn.GRU's equations, up to float rounding:
//   r = sigmoid(gi_r + W_hr h + b_hr), z = sigmoid(gi_z + W_hz h + b_hz),
//   n = tanh(gi_n + r * (W_hn h + b_hn)), h' = (h - n) * z + n.
constexpr int64_t kSmallBatch = 4;  // above it ATen's batched GEMM per frame wins (measured by instructions)

// One frame: h (H) <- the GRU cell on input gates gi (3H); gh (3H) is scratch. gh = W_hh h + b_hh
// (W_hh: 3H x H) is one dot product per row, eight rows at a time so each load of h serves eight.
CF_VECTOR_CLONES void gru_frame(const float* w_hh, const float* b_hh, const float* gi, float* h, float* gh,
                                int64_t H) {
  const int64_t G = 3 * H;
  int64_t j = 0;
  for (; j + 8 <= G; j += 8) {
    const float* w = w_hh + j * H;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
    for (int64_t k = 0; k < H; ++k) {
      const float hk = h[k];
      a0 += w[k] * hk;
      a1 += w[H + k] * hk;
      a2 += w[2 * H + k] * hk;
      a3 += w[3 * H + k] * hk;
      a4 += w[4 * H + k] * hk;
      a5 += w[5 * H + k] * hk;
      a6 += w[6 * H + k] * hk;
      a7 += w[7 * H + k] * hk;
    }
    const float a[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int64_t r = 0; r < 8; ++r) gh[j + r] = a[r] + b_hh[j + r];
  }
  for (; j < G; ++j) {  // the last rows when 3H is not a multiple of 8
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t k = 0; k < H; ++k) a += w_hh[j * H + k] * h[k];
    gh[j] = a + b_hh[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const float r = 1.f / (1.f + vector_exp(-(gi[j] + gh[j])));
    const float z = 1.f / (1.f + vector_exp(-(gi[H + j] + gh[H + j])));
    const float n = 1.f - 2.f / (vector_exp(2.f * (gi[2 * H + j] + gh[2 * H + j] * r)) + 1.f);  // tanh
    h[j] = (h[j] - n) * z + n;
  }
}

// input (T, N, F) float32 CPU, lengths (N,) in [0, T] -> (T, N, dirs * H), as gru() below.
at::Tensor small_batch_gru(const at::Tensor& input, const at::Tensor& lengths, at::TensorList params,
                           int64_t num_layers, int64_t dirs) {
  const int64_t T = input.size(0), N = input.size(1), H = params[1].size(1);
  const at::Tensor len_tensor = lengths.to(at::kLong).contiguous();
  const int64_t* len = len_tensor.data_ptr<int64_t>();
  at::Tensor x = input.contiguous();
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    at::Tensor out = at::zeros({T, N, dirs * H}, x.options());
    // per direction: W_hh, b_hh, and per sample its input gates (len, 3H): a sample's own frames only
    // (a style head a sample is not routed to runs over one frame of it, not over the batch's T)
    std::vector<at::Tensor> gates, w_hh, b_hh;
    for (int64_t d = 0; d < dirs; ++d) {
      const int64_t i = 4 * (layer * dirs + d);
      for (int64_t n = 0; n < N; ++n)
        gates.push_back(at::addmm(params[i + 2], x.select(1, n).narrow(0, 0, len[n]), params[i].t()).contiguous());
      w_hh.push_back(params[i + 1].contiguous());
      b_hh.push_back(params[i + 3].contiguous());
    }
    float* o = out.data_ptr<float>();
    at::parallel_for(0, dirs * N, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> h(H), gh(3 * H);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t d = task / N, n = task % N;
        const float* gi = gates[task].data_ptr<float>();
        const float* w = w_hh[d].data_ptr<float>();
        const float* b = b_hh[d].data_ptr<float>();
        std::fill(h.begin(), h.end(), 0.f);
        for (int64_t s = 0; s < len[n]; ++s) {
          const int64_t t = d == 0 ? s : len[n] - 1 - s;
          gru_frame(w, b, gi + t * 3 * H, h.data(), gh.data(), H);
          std::copy(h.begin(), h.end(), o + (t * N + n) * dirs * H + d * H);
        }
      }
    });
    x = out;
  }
  return x;
}

// input (T, N, F), lengths (N,) -> (T, N, dirs * H), zero after each sample's length.
at::Tensor gru(const at::Tensor& input, const at::Tensor& lengths, at::TensorList params, int64_t num_layers,
               bool bidirectional) {
  check_gru_inputs(input, lengths, params, num_layers, bidirectional);
  const int64_t T = input.size(0), N = input.size(1), H = params[1].size(1);
  const int64_t dirs = bidirectional ? 2 : 1;
  if (T == 0 || N == 0) return at::zeros({T, N, dirs * H}, input.options());
  if (lengths.is_cpu() && !(lengths > 0).all().item<bool>()) {
    // Samples of length 0 have no frames (a style head's images sent to another head): run the others
    // alone, zeros for them, instead of the masked path's every frame of every sample.
    at::Tensor out = at::zeros({T, N, dirs * H}, input.options());
    const at::Tensor live = at::nonzero(lengths > 0).squeeze(1);
    if (live.numel() > 0)
      out.index_copy_(1, live, gru(input.index_select(1, live), lengths.index_select(0, live), params, num_layers,
                                   bidirectional));
    return out;
  }
  if (input.is_cpu() && input.scalar_type() == at::kFloat && N <= kSmallBatch)
    return small_batch_gru(input, lengths, params, num_layers, dirs);
  if (lengths.is_cpu()) {
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
