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

// TORCH_CHECK that every lengths[i] (a CPU tensor) lies in [0, T]; the message calls it `name`.
void check_lengths_in_range(const at::Tensor& lengths, int64_t T, const char* op,
                            const char* name = "input_lengths");

// Checks log_probs (T, N, C) and input_lengths (N,); returns (T, N, C).
// Not the lengths' values: the CPU kernels call check_lengths_in_range once
// the sizes are checked (on CUDA that would need a host sync: the kernel
// flags such a sequence with a NaN score).
std::tuple<int64_t, int64_t, int64_t> check_decode_inputs(const at::Tensor& log_probs,
                                                          const at::Tensor& input_lengths,
                                                          int64_t blank, const char* op);

// TORCH_CHECK that an int32 token output of N x per_sequence x L values has a
// byte count that fits in int64 (whether memory holds it is the allocator's
// question, which it answers with its own error).
void check_token_output(int64_t N, int64_t per_sequence, int64_t L, const char* op);

// The most bytes one sequence's beam-search workspace may take (and, on the
// CPU, all threads' workspaces together; the CUDA kernel has its own, smaller
// budget for all its workers, but always runs at least one). 4 GiB holds a
// trie of about 120 million prefixes (T x beam_width), e.g. T = 29,000 frames
// at the maximum beam of 4096: far beyond any captcha, and well below the
// int32 node ids' bound (kMaxBeamNodes nodes take at least 28 bytes each).
constexpr int64_t kBeamWorkspaceLimit = int64_t(4) << 30;
static_assert(kBeamWorkspaceLimit / 28 < kMaxBeamNodes, "the workspace limit must keep node ids in int32");

// TORCH_CHECK that a beam search over T frames at this width fits the limit,
// before anything is allocated; the message names T, the width and the bytes.
void check_beam_workspace(int64_t T, int64_t C, int64_t beam_width, const char* op);

// Checks the beam-search options (the workspace and output sizes included)
// and turns them into the core's BeamOptions (without the allowed-mask
// pointer, which the backend fills in).
BeamOptions check_beam_options(const at::Tensor& log_probs, int64_t beam_width, int64_t top_k,
                               c10::optional<double> token_min_logp, c10::optional<double> blank_skip_threshold,
                               int64_t min_length, int64_t max_length,
                               const c10::optional<at::Tensor>& allowed_tokens, bool certify);

// Width of the token output: T, or max_length when that is smaller.
int64_t beam_output_width(int64_t T, int64_t max_length);

// The CPU kernel of ctc_beam_search with BeamOptions::scores = with_scores (false: the caller reads only
// the labels, and the scores of the sequences the path test answers are NaN; ctc_beam_search_labels).
Decoded beam_search_cpu_kernel(const at::Tensor& log_probs, const at::Tensor& input_lengths, int64_t beam_width,
                               int64_t top_k, int64_t blank, c10::optional<double> token_min_logp,
                               c10::optional<double> blank_skip_threshold, int64_t min_length, int64_t max_length,
                               const c10::optional<at::Tensor>& allowed_tokens, bool certify, bool with_scores);

}  // namespace captcha_fast
