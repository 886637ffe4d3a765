// captcha_fast::gru_train_layer / gru_train_layer_backward: one GRU layer and direction for
// training on the CPU, forward and backpropagation through time, each as one op.
//
// Why: ATen's CPU GRU runs each frame as ~10 small ops (mm, add_, sigmoid, ...) with autograd
// nodes and then their backward; at the CRNN's sizes (batch 32, 128 units, ~150 frames) their
// dispatch, not their arithmetic, is a third of a training step. Here a frame is one GEMM over the
// batch (W_hh h) and a plain loop for the gates, with no autograd graph, and the backward is one
// GEMM per frame (dh W_hh) plus a plain loop; the weight gradients are one GEMM each at the end.
//
// Semantics: those of captcha_fast::gru (csrc/gru.cpp) and of nn.GRU on a packed sequence: sample
// n runs over its own lengths[n] frames (the reverse direction from its last frame), its output is
// zero after them, and its padding frames get no gradient. nn.GRU's equations:
//   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.
// Both ops run in the input's dtype under autocast too (the CRNN's GRU is float32 by design; the
// GEMMs inside would otherwise be autocast to bf16).
// The samples run sorted by length, longest first, so the samples still running at a step are the
// first rows of the state: each step's GEMM covers only them (as packing does).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>
#include <torch/library.h>

#include "ops.h"
#include "vector_exp.h"

namespace captcha_fast {
namespace {

void check_layer_inputs(const char* op, const at::Tensor& input, const at::Tensor& lengths,
                        const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& bias_ih,
                        const at::Tensor& bias_hh) {
  TORCH_CHECK(input.dim() == 3, op, ": input must be 3-D (T, N, F) = (frames, batch, features), got shape ",
              input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
              ": input must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK(input.is_cpu(), op, ": input must be on the CPU (this is the CPU training kernel), got ",
              input.device());
  const int64_t T = input.size(0), N = input.size(1), F = input.size(2);
  TORCH_CHECK(weight_hh.dim() == 2 && weight_hh.size(0) == 3 * weight_hh.size(1), op,
              ": weight_hh must have shape (3H, H), got ", weight_hh.sizes());
  const int64_t H = weight_hh.size(1);
  const std::pair<const char*, const at::Tensor*> params[4] = {
      {"weight_ih", &weight_ih}, {"weight_hh", &weight_hh}, {"bias_ih", &bias_ih}, {"bias_hh", &bias_hh}};
  const std::vector<int64_t> want[4] = {{3 * H, F}, {3 * H, H}, {3 * H}, {3 * H}};
  for (int k = 0; k < 4; ++k) {
    const at::Tensor& p = *params[k].second;
    TORCH_CHECK(p.sizes() == at::IntArrayRef(want[k]), op, ": ", params[k].first, " must have shape ",
                at::IntArrayRef(want[k]), " (H = ", H, ", F = ", F, "), got ", p.sizes());
    TORCH_CHECK(p.scalar_type() == input.scalar_type() && p.is_cpu(), op, ": ", params[k].first, " must be ",
                input.scalar_type(), " on the CPU as input, got ", p.scalar_type(), " on ", p.device());
  }
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == N, op,
              ": lengths must be 1-D with one length per sample (", N, "), got shape ", lengths.sizes());
  TORCH_CHECK((lengths.scalar_type() == at::kLong || lengths.scalar_type() == at::kInt) && lengths.is_cpu(), op,
              ": lengths must be int64 or int32 on the CPU, got ", lengths.scalar_type(), " on ", lengths.device());
  check_lengths_in_range(lengths, T, op, "lengths");
}

// The samples by length, longest first (stable), and their lengths in that order.
std::pair<std::vector<int64_t>, std::vector<int64_t>> sorted_by_length(const at::Tensor& lengths) {
  const at::Tensor len = lengths.to(at::kLong).contiguous();
  const int64_t* l = len.data_ptr<int64_t>();
  const int64_t N = len.numel();
  std::vector<int64_t> order(N);
  for (int64_t i = 0; i < N; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return l[a] > l[b]; });
  std::vector<int64_t> sorted(N);
  for (int64_t i = 0; i < N; ++i) sorted[i] = l[order[i]];
  return {order, sorted};
}

// One sample's frame, forward: h (H) <- the cell on input gates g_i and W_hh h + b_hh g_h (3H
// each); out (H) gets h', saved (4H) r, z, n and W_hn h + b_hn. Exp is std::exp or vector_exp.
template <typename scalar_t, typename Exp>
__attribute__((always_inline)) inline void forward_row(const scalar_t* g_i, const scalar_t* g_h, scalar_t* h,
                                                       scalar_t* out, scalar_t* saved, int64_t H, Exp exp) {
  const scalar_t one(1), two(2);
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const scalar_t r = one / (one + exp(-(g_i[j] + g_h[j])));
    const scalar_t z = one / (one + exp(-(g_i[H + j] + g_h[H + j])));
    const scalar_t c = one - two / (exp(two * (g_i[2 * H + j] + r * g_h[2 * H + j])) + one);  // tanh
    h[j] = (one - z) * c + z * h[j];
    out[j] = h[j];
    saved[j] = r;
    saved[H + j] = z;
    saved[2 * H + j] = c;
    saved[3 * H + j] = g_h[2 * H + j];
  }
}

// float: vectorized (vector_exp is within 1 ulp of exp; tanh from it within 1.8e-7).
CF_VECTOR_CLONES void forward_frame(const float* g_i, const float* g_h, float* h, float* out, float* saved,
                                    int64_t H) {
  forward_row(g_i, g_h, h, out, saved, H, [](float x) { return vector_exp(x); });
}

// double (gradcheck): libm's exp.
void forward_frame(const double* g_i, const double* g_h, double* h, double* out, double* saved, int64_t H) {
  forward_row(g_i, g_h, h, out, saved, H, [](double x) { return std::exp(x); });
}

// One sample's frame, backward: from d = dL/dh' (H) and the saved gates, the gradients of the input
// gates dgi and of W_hh h + b_hh dgh (3H each, also into dgh_row, the GEMM's operand), and
// dL/dh through z alone (dh_prev; the GEMM adds dgh W_hh). h_prev is null at the first frame.
template <typename scalar_t>
__attribute__((always_inline)) inline void backward_row(const scalar_t* dh, const scalar_t* go,
                                                        const scalar_t* saved, const scalar_t* h_prev,
                                                        scalar_t* dgi, scalar_t* dgh, scalar_t* dgh_row,
                                                        scalar_t* dh_prev, int64_t H) {
  const scalar_t one(1);
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const scalar_t r = saved[j], z = saved[H + j], c = saved[2 * H + j], ghn = saved[3 * H + j];
    const scalar_t hp = h_prev ? h_prev[j] : scalar_t(0);
    const scalar_t d = dh[j] + go[j];
    const scalar_t dc = d * (one - z) * (one - c * c);  // through tanh
    const scalar_t dz = d * (hp - c) * z * (one - z);   // through sigmoid
    const scalar_t dr = dc * ghn * r * (one - r);
    dgi[j] = dr;
    dgi[H + j] = dz;
    dgi[2 * H + j] = dc;
    dgh[j] = dgh_row[j] = dr;
    dgh[H + j] = dgh_row[H + j] = dz;
    dgh[2 * H + j] = dgh_row[2 * H + j] = dc * r;
    dh_prev[j] = d * z;
  }
}

CF_VECTOR_CLONES void backward_frame(const float* dh, const float* go, const float* saved, const float* h_prev,
                                     float* dgi, float* dgh, float* dgh_row, float* dh_prev, int64_t H) {
  backward_row(dh, go, saved, h_prev, dgi, dgh, dgh_row, dh_prev, H);
}

void backward_frame(const double* dh, const double* go, const double* saved, const double* h_prev, double* dgi,
                    double* dgh, double* dgh_row, double* dh_prev, int64_t H) {
  backward_row(dh, go, saved, h_prev, dgi, dgh, dgh_row, dh_prev, H);
}

// Rows the gate loops hand to one task: below this the threads cost more than the loop.
constexpr int64_t kGrainRows = 8;

template <typename scalar_t>
void forward_loop(const at::Tensor& gi, const at::Tensor& weight_hh, const at::Tensor& bias_hh,
                  const std::vector<int64_t>& order, const std::vector<int64_t>& len, bool reverse,
                  at::Tensor& output, at::Tensor& gates) {
  const int64_t N = gi.size(1), H = weight_hh.size(1);
  const at::Tensor h_state = at::zeros({N, H}, gi.options());   // sorted order
  const at::Tensor gh_state = at::empty({N, 3 * H}, gi.options());
  const at::Tensor w_hh_t = weight_hh.t();
  const scalar_t* gi_p = gi.data_ptr<scalar_t>();
  scalar_t* h_p = h_state.data_ptr<scalar_t>();
  const scalar_t* gh_p = gh_state.data_ptr<scalar_t>();
  scalar_t* out_p = output.data_ptr<scalar_t>();
  scalar_t* gates_p = gates.data_ptr<scalar_t>();
  int64_t active = N;
  const int64_t steps = N ? len[0] : 0;
  for (int64_t s = 0; s < steps; ++s) {
    while (active > 0 && len[active - 1] <= s) --active;
    at::Tensor gh = gh_state.narrow(0, 0, active);
    at::addmm_out(gh, bias_hh, h_state.narrow(0, 0, active), w_hh_t);  // W_hh h + b_hh for the running samples
    at::parallel_for(0, active, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = order[i], t = reverse ? len[i] - 1 - s : s;
        const scalar_t* g_i = gi_p + (t * N + n) * 3 * H;
        const scalar_t* g_h = gh_p + i * 3 * H;
        scalar_t* h = h_p + i * H;
        scalar_t* out = out_p + (t * N + n) * H;
        scalar_t* saved = gates_p + (t * N + n) * 4 * H;  // r, z, n, W_hn h + b_hn: what backward needs
        forward_frame(g_i, g_h, h, out, saved, H);
      }
    });
  }
}

// input (T, N, F), lengths (N,) -> output (T, N, H) zero after each length, and the gates
// (T, N, 4H) = r, z, n, W_hn h + b_hn at each sample's frames (undefined elsewhere), for backward.
std::tuple<at::Tensor, at::Tensor> gru_train_layer(const at::Tensor& input, const at::Tensor& lengths,
                                                   const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                                   const at::Tensor& bias_ih, const at::Tensor& bias_hh,
                                                   bool reverse) {
  check_layer_inputs("gru_train_layer", input, lengths, weight_ih, weight_hh, bias_ih, bias_hh);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t T = input.size(0), N = input.size(1), F = input.size(2), H = weight_hh.size(1);
  // The input gates of every frame: one GEMM.
  const at::Tensor gi = at::addmm(bias_ih, input.reshape({T * N, F}), weight_ih.t()).view({T, N, 3 * H});
  at::Tensor output = at::zeros({T, N, H}, input.options());
  at::Tensor gates = at::empty({T, N, 4 * H}, input.options());
  // (no structured binding: lambdas capture them only from C++20)
  const auto by_length = sorted_by_length(lengths);
  const std::vector<int64_t>&order = by_length.first, &len = by_length.second;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_train_layer", [&] {
    forward_loop<scalar_t>(gi, weight_hh.contiguous(), bias_hh.contiguous(), order, len, reverse, output, gates);
  });
  return {output, gates};
}

template <typename scalar_t>
void backward_loop(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& gates,
                   const at::Tensor& weight_hh, const std::vector<int64_t>& order, const std::vector<int64_t>& len,
                   bool reverse, at::Tensor& grad_gi, at::Tensor& grad_gh) {
  const int64_t N = output.size(1), H = output.size(2);
  at::Tensor dh_state = at::zeros({N, H}, output.options());      // dL/dh after the step, sorted order
  const at::Tensor dh_next = at::empty({N, H}, output.options());  // dL/dh before it (through z only)
  const at::Tensor dgh_state = at::empty({N, 3 * H}, output.options());
  const scalar_t* go_p = grad_output.data_ptr<scalar_t>();
  const scalar_t* out_p = output.data_ptr<scalar_t>();
  const scalar_t* gates_p = gates.data_ptr<scalar_t>();
  scalar_t* dgi_p = grad_gi.data_ptr<scalar_t>();
  scalar_t* dgh_p = grad_gh.data_ptr<scalar_t>();
  const scalar_t* dh_p = dh_state.data_ptr<scalar_t>();
  scalar_t* dh_next_p = dh_next.data_ptr<scalar_t>();
  scalar_t* dgh_state_p = dgh_state.data_ptr<scalar_t>();
  int64_t active = 0;
  const int64_t steps = N ? len[0] : 0;
  for (int64_t s = steps - 1; s >= 0; --s) {
    while (active < N && len[active] > s) ++active;
    at::parallel_for(0, active, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = order[i], t = reverse ? len[i] - 1 - s : s;
        // The state before this step: the previous frame's output, zero at the sample's first frame.
        const int64_t t_prev = reverse ? t + 1 : t - 1;
        const scalar_t* h_prev = s == 0 ? nullptr : out_p + (t_prev * N + n) * H;
        const scalar_t* go = go_p + (t * N + n) * H;
        const scalar_t* saved = gates_p + (t * N + n) * 4 * H;
        const scalar_t* dh = dh_p + i * H;
        scalar_t* dgi = dgi_p + (t * N + n) * 3 * H;
        scalar_t* dgh = dgh_p + (t * N + n) * 3 * H;
        scalar_t* dgh_row = dgh_state_p + i * 3 * H;
        scalar_t* dh_prev = dh_next_p + i * H;
        backward_frame(dh, go, saved, h_prev, dgi, dgh, dgh_row, dh_prev, H);
      }
    });
    // dL/dh_prev = d * z + (W_hh^T dgh): one GEMM over the running samples.
    at::Tensor dh = dh_state.narrow(0, 0, active);
    at::addmm_out(dh, dh_next.narrow(0, 0, active), dgh_state.narrow(0, 0, active), weight_hh);
  }
}

// The gradients of gru_train_layer's output: (input, weight_ih, weight_hh, bias_ih, bias_hh).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_train_layer_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& lengths, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const at::Tensor& bias_ih, const at::Tensor& bias_hh, const at::Tensor& output,
    const at::Tensor& gates, bool reverse) {
  const char* op = "gru_train_layer_backward";
  check_layer_inputs(op, input, lengths, weight_ih, weight_hh, bias_ih, bias_hh);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t T = input.size(0), N = input.size(1), F = input.size(2), H = weight_hh.size(1);
  const std::vector<int64_t> out_shape = {T, N, H}, gates_shape = {T, N, 4 * H};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_shape) && grad_output.scalar_type() == input.scalar_type(),
              op, ": grad_output must be ", input.scalar_type(), " of shape ", at::IntArrayRef(out_shape), ", got ",
              grad_output.scalar_type(), " of shape ", grad_output.sizes());
  TORCH_CHECK(output.sizes() == at::IntArrayRef(out_shape) && output.scalar_type() == input.scalar_type(), op,
              ": output must be gru_train_layer's output, ", input.scalar_type(), " of shape ",
              at::IntArrayRef(out_shape), ", got ", output.scalar_type(), " of shape ", output.sizes());
  TORCH_CHECK(gates.sizes() == at::IntArrayRef(gates_shape) && gates.scalar_type() == input.scalar_type(), op,
              ": gates must be gru_train_layer's saved gates, ", input.scalar_type(), " of shape ",
              at::IntArrayRef(gates_shape), ", got ", gates.scalar_type(), " of shape ", gates.sizes());
  // Zero where a sample has no frame, so the GEMMs below sum only real frames.
  at::Tensor grad_gi = at::zeros({T, N, 3 * H}, input.options());
  at::Tensor grad_gh = at::zeros({T, N, 3 * H}, input.options());
  // (no structured binding: lambdas capture them only from C++20)
  const auto by_length = sorted_by_length(lengths);
  const std::vector<int64_t>&order = by_length.first, &len = by_length.second;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_train_layer_backward", [&] {
    backward_loop<scalar_t>(grad_output.contiguous(), output.contiguous(), gates.contiguous(), weight_hh.contiguous(),
                            order, len, reverse, grad_gi, grad_gh);
  });
  // The state each frame started from (the output one frame earlier in the direction's order; the
  // output is zero past a sample's length, so a reverse sample's first frame gets zero).
  const at::Tensor zero = at::zeros({1, N, H}, input.options());
  const at::Tensor h_prev = T == 0 ? output
                            : reverse ? at::cat({output.narrow(0, 1, T - 1), zero})
                                      : at::cat({zero, output.narrow(0, 0, T - 1)});
  const at::Tensor dgi = grad_gi.view({T * N, 3 * H}), dgh = grad_gh.view({T * N, 3 * H});
  at::Tensor grad_input = at::mm(dgi, weight_ih).view({T, N, F});
  at::Tensor grad_weight_ih = at::mm(dgi.t(), input.reshape({T * N, F}));
  at::Tensor grad_weight_hh = at::mm(dgh.t(), h_prev.reshape({T * N, H}));
  return {grad_input, grad_weight_ih, grad_weight_hh, dgi.sum(0), dgh.sum(0)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(captcha_fast, m) {
  m.def("gru_train_layer(Tensor input, Tensor lengths, Tensor weight_ih, Tensor weight_hh, Tensor bias_ih, "
        "Tensor bias_hh, bool reverse) -> (Tensor, Tensor)");
  m.def("gru_train_layer_backward(Tensor grad_output, Tensor input, Tensor lengths, Tensor weight_ih, "
        "Tensor weight_hh, Tensor bias_ih, Tensor bias_hh, Tensor output, Tensor gates, bool reverse) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(captcha_fast, CPU, m) {
  m.impl("gru_train_layer", &gru_train_layer);
  m.impl("gru_train_layer_backward", &gru_train_layer_backward);
}

}  // namespace captcha_fast
