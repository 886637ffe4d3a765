// Glue shared by the CPU and CUDA kernels: argument checks with messages a
// user understands, and output allocation. One place, every backend calls it.
#pragma once

#include <torch/types.h>

#include <string>
#include <tuple>

#include "ctc_decode.h"

namespace captcha_fast {

using Decoded = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Texts = c10::List<c10::List<std::string>>;
using DecodedTexts = std::tuple<Texts, at::Tensor>;

// TORCH_CHECK that every input_lengths[i] (a CPU tensor) lies in [0, T].
void check_lengths_in_range(const at::Tensor& input_lengths, int64_t T, const char* op);

// Checks log_probs (T, N, C) and input_lengths (N,); returns (T, N, C).
// On the CPU it also checks every length lies in [0, T] (on CUDA that would
// need a host sync: the kernel flags such a sequence with a NaN score).
std::tuple<int64_t, int64_t, int64_t> check_decode_inputs(const at::Tensor& log_probs,
                                                          const at::Tensor& input_lengths,
                                                          int64_t blank, const char* op);

// Checks the beam-search options and turns them into the core's BeamOptions
// (without the allowed-mask pointer, which the backend fills in).
BeamOptions check_beam_options(const at::Tensor& log_probs, int64_t beam_width, int64_t top_k,
                               c10::optional<double> token_min_logp, c10::optional<double> blank_skip_threshold,
                               int64_t min_length, int64_t max_length,
                               const c10::optional<at::Tensor>& allowed_tokens);

// Width of the token output: T, or max_length when that is smaller.
int64_t beam_output_width(int64_t T, int64_t max_length);

}  // namespace captcha_fast
