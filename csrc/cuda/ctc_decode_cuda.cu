// CUDA kernels: unpack tensors, then run the per-sequence core of
// csrc/ctc_decode.h on the GPU. Same checks (csrc/ops.h) and same results as
// the CPU kernels, read on the current stream, with no host synchronisation.
//
// Thread mapping
//  - ctc_greedy_decode: one warp per sequence (a grid-stride loop over the
//    batch, so any N fits the grid). Per frame the 32 lanes scan the
//    classes (lane, lane + 32, ...) and a butterfly reduction picks the argmax
//    with ties to the lowest index, exactly as the core's row_argmax; every
//    lane then holds the same (value, index) and runs the core's greedy_step
//    in frame order, so tokens and score are bit-identical to greedy_decode_one.
//  - ctc_beam_search: one thread per sequence running beam_search_to_tokens. Each
//    worker thread owns a 16-byte-aligned slice of one byte tensor from the
//    caching allocator. There are at most as many workers as can be resident
//    on the GPU at once (and as fit a workspace budget, but at least one);
//    they loop over the batch with a grid stride.
//
// Bad input. The CPU kernels raise on NaN/+inf log-probabilities and on an
// input length outside [0, T]; raising here would need a host sync. So on CUDA
// such a sequence is flagged in its outputs instead: every score NaN, every
// length 0, tokens all -1. Other sequences are decoded normally. (A valid
// result never has a NaN score, so `scores.isnan()` finds the bad ones.)

// Light headers on purpose (no ATen/cuda/CUDAContext.h): torch's headers are
// most of this file's compile time, which nvcc pays once per architecture.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../ops.h"
#include "cuda_utils.cuh"

namespace captcha_fast {
namespace {

constexpr int kGreedyWarpsPerBlock = 4;
// Enough blocks to fill any GPU; larger batches loop (gridDim.x has a limit).
constexpr int64_t kGreedyMaxBlocks = int64_t(1) << 16;
// Beam search is serial per thread and branchy: small blocks spread a small
// batch over more SMs.
constexpr int kBeamThreadsPerBlock = 32;
// Budget for the beam workspaces of all worker threads together; one worker
// always runs, whose workspace check_beam_workspace bounds by kBeamWorkspaceLimit.
constexpr int64_t kBeamWorkspaceBudget = int64_t(512) << 20;

LengthsView lengths_view(const at::Tensor& input_lengths) {
  LengthsView v;
  const bool is_long = input_lengths.scalar_type() == at::kLong;
  v.p64 = is_long ? input_lengths.const_data_ptr<int64_t>() : nullptr;
  v.p32 = is_long ? nullptr : input_lengths.const_data_ptr<int32_t>();
  v.stride = input_lengths.stride(0);
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kGreedyWarpsPerBlock * kWarpSize)
    greedy_kernel(const scalar_t* __restrict__ data, int64_t st, int64_t sn, int64_t sc, LengthsView lens,
                  int64_t N, int64_t T, int64_t C, int64_t blank, int32_t* __restrict__ tokens,
                  int32_t* __restrict__ out_len, float* __restrict__ out_score) {
  const int lane = threadIdx.x % kWarpSize;
  // n is the same for the whole warp: the warp loops and leaves together.
  for (int64_t n = int64_t(blockIdx.x) * kGreedyWarpsPerBlock + threadIdx.x / kWarpSize; n < N;
       n += int64_t(gridDim.x) * kGreedyWarpsPerBlock) {
    int32_t* tok = tokens + n * T;
    const int64_t length = lens(n);
    const Frames<scalar_t> f{data + n * sn, st, sc};
    const int32_t sentinel = static_cast<int32_t>(C);  // above every class index
    bool bad = length < 0 || length > T;
    GreedyState state;  // identical in every lane
    for (int64_t t = 0; !bad && t < length; ++t) {
      // This lane's classes: the first one, then strictly greater (lowest index wins a tie).
      float best_v = kNegInf;
      int32_t best = sentinel;
      bool lane_bad = false;
      for (int64_t c = lane; c < C; c += kWarpSize) {
        const float v = f.at(t, c);
        lane_bad |= bad_value(v);
        if (v > best_v || best == sentinel) { best_v = v; best = static_cast<int32_t>(c); }
      }
      if (__any_sync(kFullMask, lane_bad)) { bad = true; break; }  // warp-uniform
      // (value desc, index asc) is a total order without NaN, so all lanes agree
      // on row_argmax's (index, value).
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        const float ov = __shfl_xor_sync(kFullMask, best_v, offset);
        const int32_t oi = __shfl_xor_sync(kFullMask, best, offset);
        if (ov > best_v || (ov == best_v && oi < best)) { best_v = ov; best = oi; }
      }
      // The core's merge step, in frame order (bit-identical score). Every lane
      // writes the same token to the same place: one store per warp.
      greedy_step(state, best, best_v, blank, tok);
    }
    if (bad) {
      state.len = 0;
      state.score = NAN;
    }
    __syncwarp();  // the token stores above are ordered before the padding below
    for (int64_t j = state.len + lane; j < T; j += kWarpSize) tok[j] = -1;
    if (lane == 0) {
      out_len[n] = state.len;
      out_score[n] = static_cast<float>(state.score);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBeamThreadsPerBlock)
    beam_kernel(const scalar_t* __restrict__ data, int64_t st, int64_t sn, int64_t sc, LengthsView lens, int64_t N,
                int64_t T, int64_t C, int64_t blank, BeamOptions opts, int32_t top_k, int64_t L, char* workspace,
                int64_t ws_stride, int64_t workers, int32_t* __restrict__ tokens, int32_t* __restrict__ out_len,
                float* __restrict__ out_score) {
  const int64_t worker = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (worker >= workers) return;
  BeamWorkspace ws = carve_beam_workspace(workspace + worker * ws_stride, T, C, opts.beam_width);
  init_beam_workspace(ws, C, blank, opts);
  for (int64_t n = worker; n < N; n += workers) {
    int32_t* tok = tokens + n * top_k * L;
    int32_t* len_out = out_len + n * top_k;
    float* score_out = out_score + n * top_k;
    const int64_t length = lens(n);
    Status s = kBadValue;
    if (length >= 0 && length <= T) {
      const Frames<scalar_t> f{data + n * sn, st, sc};
      s = beam_search_to_tokens(f, length, C, blank, opts, ws, top_k, L, tok, len_out, score_out);
    }
    if (s != kOk) {
      for (int32_t k = 0; k < top_k; ++k) {
        len_out[k] = 0;
        score_out[k] = NAN;
        for (int64_t j = 0; j < L; ++j) tok[k * L + j] = -1;
      }
    }
  }
}

Decoded greedy_cuda(const at::Tensor& log_probs, const at::Tensor& input_lengths, int64_t blank) {
  const auto [T, N, C] = check_decode_inputs(log_probs, input_lengths, blank, "ctc_greedy_decode");
  check_token_output(N, 1, T, "ctc_greedy_decode");
  at::cuda::CUDAGuard device_guard(log_probs.device());
  // The kernel writes every element (padding included): no fill kernels.
  auto tokens = at::empty({N, T}, log_probs.options().dtype(at::kInt));
  auto lengths = at::empty({N}, log_probs.options().dtype(at::kInt));
  auto scores = at::empty({N}, log_probs.options().dtype(at::kFloat));
  if (N == 0) return {tokens, lengths, scores};
  const LengthsView lens = lengths_view(input_lengths);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(N, kGreedyWarpsPerBlock), kGreedyMaxBlocks)));
  const dim3 block(kGreedyWarpsPerBlock * kWarpSize);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "ctc_greedy_decode", [&] {
    greedy_kernel<scalar_t><<<grid, block, 0, stream>>>(
        log_probs.const_data_ptr<scalar_t>(), log_probs.stride(0), log_probs.stride(1), log_probs.stride(2), lens,
        N, T, C, blank, tokens.mutable_data_ptr<int32_t>(), lengths.mutable_data_ptr<int32_t>(),
        scores.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {tokens, lengths, scores};
}

Decoded beam_search_cuda(const at::Tensor& log_probs, const at::Tensor& input_lengths, int64_t beam_width,
                         int64_t top_k, int64_t blank, c10::optional<double> token_min_logp,
                         c10::optional<double> blank_skip_threshold, int64_t min_length, int64_t max_length,
                         const c10::optional<at::Tensor>& allowed_tokens, bool certify) {
  const auto [T, N, C] = check_decode_inputs(log_probs, input_lengths, blank, "ctc_beam_search");
  BeamOptions opts = check_beam_options(log_probs, beam_width, top_k, token_min_logp, blank_skip_threshold,
                                        min_length, max_length, allowed_tokens, certify);
  at::cuda::CUDAGuard device_guard(log_probs.device());
  const int64_t L = beam_output_width(T, max_length);
  // beam_search_to_tokens writes all of its outputs; bad sequences are filled by the kernel.
  auto tokens = at::empty({N, top_k, L}, log_probs.options().dtype(at::kInt));
  auto lengths = at::empty({N, top_k}, log_probs.options().dtype(at::kInt));
  auto scores = at::empty({N, top_k}, log_probs.options().dtype(at::kFloat));
  if (N == 0) return {tokens, lengths, scores};
  if (allowed_tokens.has_value()) {
    // Read in place through its stride (the core supports any stride).
    opts.allowed = allowed_tokens->const_data_ptr<bool>();
    opts.allowed_stride = allowed_tokens->stride(0);
  }
  const LengthsView lens = lengths_view(input_lengths);

  const int64_t ws_stride = align16(beam_workspace_bytes(T, C, beam_width));
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, log_probs.get_device()));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor workspace;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "ctc_beam_search", [&] {
    // Workers: as many as can be resident at once (more would only queue), at
    // most N, and within the workspace budget (but at least one).
    int blocks_per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, beam_kernel<scalar_t>,
                                                                 kBeamThreadsPerBlock, 0));
    const int64_t resident = int64_t(std::max(blocks_per_sm, 1)) * sm_count * kBeamThreadsPerBlock;
    const int64_t by_memory = std::max<int64_t>(1, kBeamWorkspaceBudget / ws_stride);
    const int64_t workers = std::min({N, resident, by_memory});
    workspace = at::empty({workers * ws_stride}, log_probs.options().dtype(at::kByte));
    char* ws_base = reinterpret_cast<char*>(workspace.mutable_data_ptr<uint8_t>());
    TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(ws_base) % 16 == 0, "beam workspace is not 16-byte aligned");
    const dim3 grid(static_cast<unsigned>(ceil_div(workers, kBeamThreadsPerBlock)));
    const dim3 block(kBeamThreadsPerBlock);
    beam_kernel<scalar_t><<<grid, block, 0, stream>>>(
        log_probs.const_data_ptr<scalar_t>(), log_probs.stride(0), log_probs.stride(1), log_probs.stride(2), lens,
        N, T, C, blank, opts, static_cast<int32_t>(top_k), L, ws_base, ws_stride, workers,
        tokens.mutable_data_ptr<int32_t>(), lengths.mutable_data_ptr<int32_t>(), scores.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The workspace goes back to the caching allocator when this returns. It was
  // allocated on the current stream, so only later work on that stream (ordered
  // after this kernel) can reuse it.
  return {tokens, lengths, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(captcha_fast, CUDA, m) {
  m.impl("ctc_greedy_decode", &greedy_cuda);
  m.impl("ctc_beam_search", &beam_search_cuda);
}

}  // namespace captcha_fast
