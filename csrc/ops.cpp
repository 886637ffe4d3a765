// The op schemas (the one place they are defined) and the shared checks.
#include <Python.h>
#include <torch/library.h>

#include <cmath>

#include "ops.h"

namespace captcha_fast {

std::tuple<int64_t, int64_t, int64_t> check_decode_inputs(const at::Tensor& log_probs,
                                                          const at::Tensor& input_lengths,
                                                          int64_t blank, const char* op) {
  TORCH_CHECK(log_probs.dim() == 3, op, ": log_probs must be 3-D (T, N, C) = (frames, batch, classes), got a ",
              log_probs.dim(), "-D tensor of shape ", log_probs.sizes());
  TORCH_CHECK(at::isFloatingType(log_probs.scalar_type()), op,
              ": log_probs must be float32, float16, bfloat16 or float64, got ", log_probs.scalar_type());
  const int64_t T = log_probs.size(0), N = log_probs.size(1), C = log_probs.size(2);
  TORCH_CHECK(C >= 1, op, ": log_probs has no classes (C = 0)");
  TORCH_CHECK(blank >= 0 && blank < C, op, ": blank must be a class index in [0, ", C, "), got ", blank);
  TORCH_CHECK(input_lengths.dim() == 1 && input_lengths.size(0) == N, op,
              ": input_lengths must be 1-D with one length per sequence (", N, "), got shape ",
              input_lengths.sizes());
  TORCH_CHECK(input_lengths.scalar_type() == at::kLong || input_lengths.scalar_type() == at::kInt, op,
              ": input_lengths must be int64 or int32, got ", input_lengths.scalar_type());
  TORCH_CHECK(input_lengths.device() == log_probs.device(), op,
              ": input_lengths must be on the same device as log_probs (", log_probs.device(), "), got ",
              input_lengths.device());
  TORCH_CHECK(T < (int64_t(1) << 30) && C < (int64_t(1) << 30), op, ": T and C must be below 2^30");
  if (input_lengths.is_cpu() && N > 0) {
    const at::Tensor bad = ((input_lengths < 0) | (input_lengths > T)).nonzero();
    if (bad.numel() > 0) {
      const int64_t i = bad[0][0].item<int64_t>();
      TORCH_CHECK(false, op, ": input_lengths[", i, "] = ", input_lengths[i].item<int64_t>(),
                  " is outside [0, T] with T = ", T, " frames");
    }
  }
  return {T, N, C};
}

BeamOptions check_beam_options(const at::Tensor& log_probs, int64_t beam_width, int64_t top_k,
                               c10::optional<double> token_min_logp, c10::optional<double> blank_skip_threshold,
                               int64_t min_length, int64_t max_length,
                               const c10::optional<at::Tensor>& allowed_tokens) {
  const char* op = "ctc_beam_search";
  const int64_t C = log_probs.size(2);
  TORCH_CHECK(beam_width >= 1 && beam_width <= 4096, op, ": beam_width must be in [1, 4096], got ", beam_width);
  TORCH_CHECK(top_k >= 1 && top_k <= beam_width, op, ": top_k must be in [1, beam_width = ", beam_width,
              "], got ", top_k);
  const double min_logp = token_min_logp.value_or(-INFINITY);
  const double skip = blank_skip_threshold.value_or(1.0);
  TORCH_CHECK(!std::isnan(min_logp), op, ": token_min_logp is NaN (None switches this pruning off)");
  TORCH_CHECK(skip > 0.0 && skip <= 1.0, op,
              ": blank_skip_threshold is a probability in (0, 1] (None switches skipping off), got ", skip);
  TORCH_CHECK(min_length >= 0, op, ": min_length must be >= 0, got ", min_length);
  TORCH_CHECK(max_length == -1 || max_length >= std::max<int64_t>(min_length, 1), op,
              ": max_length must be -1 (no limit) or >= max(min_length, 1), got ", max_length,
              " with min_length = ", min_length);
  if (allowed_tokens.has_value()) {
    const at::Tensor& a = *allowed_tokens;
    TORCH_CHECK(a.dim() == 1 && a.size(0) == C && a.scalar_type() == at::kBool, op,
                ": allowed_tokens must be a 1-D bool mask with one entry per class (", C, "), got ",
                a.scalar_type(), " of shape ", a.sizes());
    TORCH_CHECK(a.device() == log_probs.device(), op, ": allowed_tokens must be on ", log_probs.device(),
                ", got ", a.device());
  }
  BeamOptions o;
  o.beam_width = static_cast<int32_t>(beam_width);
  o.token_min_logp = static_cast<float>(min_logp);
  // Skipping at probability 1 changes nothing, so 1 means "off".
  o.log_blank_skip = skip >= 1.0 ? INFINITY : static_cast<float>(std::log(skip));
  o.min_len = static_cast<int32_t>(min_length);
  o.max_len = static_cast<int32_t>(max_length);
  o.allowed = nullptr;
  o.allowed_stride = 1;
  return o;
}

int64_t beam_output_width(int64_t T, int64_t max_length) {
  return max_length >= 0 ? std::min(T, max_length) : T;
}

// Version and build facts, so that Python can refuse a stale build.
std::string build_info() {
  std::string info = "torch=" CF_TORCH_VERSION;
#ifdef CF_WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
  return info;
}

TORCH_LIBRARY(captcha_fast, m) {
  // Layout, for both ops: log_probs is (T, N, C) = (frames, batch, classes),
  // the layout of nn.CTCLoss and of our model; any strides are read in place.
  // input_lengths (N,) int64/int32: sequence n uses frames [0, input_lengths[n]).
  // float32/float16/bfloat16/float64 are read; arithmetic is float32.
  //
  // ctc_greedy_decode -> tokens (N, T) int32 padded with -1,
  //                      lengths (N,) int32, scores (N,) float32 = best-path log-prob.
  m.def("ctc_greedy_decode(Tensor log_probs, Tensor input_lengths, int blank=0) -> (Tensor, Tensor, Tensor)");
  // ctc_beam_search (prefix beam search) -> tokens (N, top_k, L) int32 padded
  //   with -1, L = T or max_length if smaller; lengths (N, top_k) int32;
  //   scores (N, top_k) float32 = log-prob of the label summed over the kept
  //   alignments, best first; missing hypotheses have length 0, score -inf.
  // Options: token_min_logp (characters below it are not extended, the
  //   frame's best always is; None = exact), blank_skip_threshold (frames whose
  //   blank probability is >= it are applied as blank-only; None = exact),
  //   min_length/max_length (label length bounds; -1 = no maximum),
  //   allowed_tokens (bool mask over classes).
  m.def(
      "ctc_beam_search(Tensor log_probs, Tensor input_lengths, int beam_width=10, int top_k=1, int blank=0, "
      "float? token_min_logp=None, float? blank_skip_threshold=None, int min_length=0, int max_length=-1, "
      "Tensor? allowed_tokens=None) -> (Tensor, Tensor, Tensor)");
  m.def("_build_info() -> str", &build_info);
}

}  // namespace captcha_fast

// `import captcha_fast._C` needs a module init; the ops register at load time
// (loading the library with torch.ops.load_library works the same, no Python
// module involved).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
