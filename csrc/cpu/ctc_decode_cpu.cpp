// CPU kernels: unpack tensors, then run the core per sequence, threads over
// the batch with at::parallel_for. Sequences are independent, so the result
// does not depend on the thread count.

// Python's build flags include -fwrapv, which makes the core's loops ~1.5x
// slower (greedy) and ~1.1x (beam search) with GCC; signed overflow never
// happens here, so the standard semantics come back for this file. And no
// a*b+c contraction into FMA even where -march allows it: the CUDA build is
// compiled with --fmad=false (setup.py), so both round every product alike.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-wrapv", "fp-contract=off")
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <new>
#include <vector>

#include "../ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CF_AVX2_GREEDY 1
#endif

namespace captcha_fast {
namespace {

// Records the first sequence with a bad value; checked after the parallel loop
// (throwing from worker threads would lose the sequence index).
struct FirstBad {
  std::atomic<int64_t> index{INT64_MAX};
  void report(int64_t n) {
    int64_t cur = index.load();
    while (n < cur && !index.compare_exchange_weak(cur, n)) {}
  }
  void check(const char* op) const {
    const int64_t n = index.load();
    TORCH_CHECK(n == INT64_MAX, op, ": log_probs of sequence ", n,
                " contain NaN or +inf (log-probabilities must be finite or -inf)");
  }
};

at::Tensor lengths_as_long(const at::Tensor& input_lengths) {
  return input_lengths.to(at::kLong).contiguous();
}

#ifdef CF_AVX2_GREEDY
// Asks for the float32 row kPrefetch frames after `row` (C classes): a sequence's frames lie N rows
// apart in the usual (T, N, C) layout, too far for the hardware prefetcher.
inline void prefetch_ahead(const float* row, int64_t stride_t, int64_t C) {
  _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * stride_t), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * stride_t + C - 1), _MM_HINT_T0);
}

// Greedy decoding of one float32 sequence whose classes are contiguous (C >= 8), 8 classes per
// AVX2 instruction: greedy_decode_one's results bit for bit (the same maximum, exact in any
// order; its first index, as torch.argmax; the same double sum of the frames' maxima). The
// NaN/+inf test is one per sequence: a lane's running sum of the values it saw turns NaN or
// +inf with the first such value and stays so; then the exact test (any_bad_value) decides.
__attribute__((target("avx2"))) Status greedy_decode_one_avx2(const float* data, int64_t stride_t, int64_t length,
                                                              int64_t C, int64_t blank, int32_t* tokens,
                                                              int32_t* out_len, float* score) {
  GreedyState s;
  __m256 sums = _mm256_setzero_ps();
  const int64_t tail = C - 8;  // the last block, overlapping the one before unless 8 divides C
  for (int64_t t = 0; t < length; ++t) {
    const float* row = data + t * stride_t;
    if (t + kPrefetch < length) prefetch_ahead(row, stride_t, C);
    __m256 m = _mm256_loadu_ps(row);
    sums = _mm256_add_ps(sums, m);
    for (int64_t c = 8; c < tail; c += 8) {
      const __m256 v = _mm256_loadu_ps(row + c);
      m = _mm256_max_ps(m, v);
      sums = _mm256_add_ps(sums, v);
    }
    const __m256 last = _mm256_loadu_ps(row + tail);
    m = _mm256_max_ps(m, last);
    sums = _mm256_add_ps(sums, last);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float best_v = _mm_cvtss_f32(h);
    int64_t best = 0;
    if (!(row[0] == best_v)) {  // the first c with row[c] >= the maximum (C for a NaN maximum: flagged)
      const __m256 m8 = _mm256_set1_ps(best_v);
      best = C;
      for (int64_t c = 0;; c += 8) {
        if (c > tail) c = tail;
        const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + c), m8, _CMP_GE_OQ));
        if (mask != 0) {
          best = c + __builtin_ctz(static_cast<unsigned>(mask));
          break;
        }
        if (c == tail) break;
      }
    }
    greedy_step(s, best, best_v, blank, tokens);
  }
  *out_len = s.len;
  *score = static_cast<float>(s.score);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  if (!(_mm_cvtss_f32(h) < INFINITY)) {
    for (int64_t t = 0; t < length; ++t) {
      if (any_bad_value(data + t * stride_t, C)) return kBadValue;
    }
  }
  return kOk;
}
#endif

#ifdef CF_AVX2_GREEDY
// exp_rel_float (csrc/ctc_decode.h) in eight lanes, bit for bit.
__attribute__((target("avx2"), always_inline)) inline __m256 exp_rel8(__m256 x) {
  const __m256 kept = _mm256_cmp_ps(x, _mm256_set1_ps(-30.f), _CMP_GE_OQ);  // false for x < -30, -inf
  exp_nonpositive_lanes<__m256, __v8si>(x);
  return _mm256_and_ps(x, kept);
}

// The row scans of the certificate's passes, 8 classes an AVX2 instruction (C >= 8): the lanes of a
// float vector added or maxed across, the last partial block, the first class at the maximum, and
// float partial sums of at most 16 terms a lane carried into a double.
__attribute__((target("avx2"), always_inline)) inline float hsum8(__m256 v) {
  return cf_hsum(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

__attribute__((target("avx2"), always_inline)) inline float hmax8(__m256 v) {
  return cf_hmax(_mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

// The lanes of row[full, C) (C - full < 8 of them): -1 in each, 0 past C.
__attribute__((target("avx2"), always_inline)) inline __m256i tail_lanes8(int64_t C, int64_t full) {
  static const int32_t kLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanes + 8 - (C - full)));
}

// row[full, C) with -inf past C (all -inf when full == C); its values (0 past C) are added to *sums,
// whose NaN or +inf flags a bad value.
__attribute__((target("avx2"), always_inline)) inline __m256 load_tail8(const float* row, int64_t full, int64_t C,
                                                                       __m256i tail_mask, __m256* sums) {
  if (full == C) return _mm256_set1_ps(kNegInf);
  const __m256 v = _mm256_maskload_ps(row + full, tail_mask);  // 0 in the lanes past C
  *sums = _mm256_add_ps(*sums, v);
  return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), v, _mm256_castsi256_ps(tail_mask));
}

// The first c with row[c] >= m (m8: m in every lane; tail: row[full, C) with -inf past C).
__attribute__((target("avx2"), always_inline)) inline int64_t first_at_least8(const float* row, int64_t full,
                                                                             __m256 tail, __m256 m8) {
  for (int64_t c = 0; c < full; c += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + c), m8, _CMP_GE_OQ));
    if (mask != 0) return c + __builtin_ctz(static_cast<unsigned>(mask));
  }
  return full + __builtin_ctz(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(tail, m8, _CMP_GE_OQ))));
}

struct LaneSums8 {  // float partial sums of at most 16 terms a lane (relative error < 1e-6), in a double
  __m256 part;
  double sum = 0.0;
  int n = 0;
  __attribute__((target("avx2"), always_inline)) LaneSums8() : part(_mm256_setzero_ps()) {}
  __attribute__((target("avx2"), always_inline)) void add(__m256 v) {
    part = _mm256_add_ps(part, v);
    if (++n == 16) {
      sum += static_cast<double>(hsum8(part));
      part = _mm256_setzero_ps();
      n = 0;
    }
  }
  __attribute__((target("avx2"), always_inline)) double total() const {
    return sum + static_cast<double>(hsum8(part));
  }
};

// frame_stats_generic for one contiguous float32 row (C >= 8), 8 classes per AVX2 instruction:
// the same maximum, first index and runner-up (exact in any order; per lane the largest two
// values, then across lanes), and frame_mass_bound's bound from exp_rel8 (float partial sums of
// at most 16 terms a lane). exps (nullptr: not kept) gets each exp_rel_float(row[c] - max), the
// values the forward passes would compute.
__attribute__((target("avx2"))) void frame_stats_avx2(const float* row, int64_t C, FrameStats* s, float* exps) {
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  const int64_t full = C & ~int64_t(7);
  const __m256i tail_mask = tail_lanes8(C, full);
  __m256 m1 = neg_inf, m2 = neg_inf, sums = _mm256_setzero_ps();
  for (int64_t c = 0; c < full; c += 8) {
    const __m256 v = _mm256_loadu_ps(row + c);
    sums = _mm256_add_ps(sums, v);
    m2 = _mm256_max_ps(m2, _mm256_min_ps(m1, v));
    m1 = _mm256_max_ps(m1, v);
  }
  const __m256 tail = load_tail8(row, full, C, tail_mask, &sums);
  m2 = _mm256_max_ps(m2, _mm256_min_ps(m1, tail));
  m1 = _mm256_max_ps(m1, tail);
  s->bad = !(hsum8(sums) < INFINITY) && any_bad_value(row, C);
  const float m = hmax8(m1);
  s->max = m;
  if (s->bad || !(m > kNegInf)) return;
  const __m256 m8 = _mm256_set1_ps(m);
  const __m256 at_max = _mm256_cmp_ps(m1, m8, _CMP_EQ_OQ);
  if (__builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(at_max))) >= 2) {
    s->second = m;
  } else {  // the runner-up: every lane's second, and the other lanes' first
    s->second = hmax8(_mm256_max_ps(m2, _mm256_blendv_ps(m1, neg_inf, at_max)));
  }
  s->best = first_at_least8(row, full, tail, m8);
  LaneSums8 z;
  for (int64_t c = 0; c < full; c += 8) {
    const __m256 e = exp_rel8(_mm256_sub_ps(_mm256_loadu_ps(row + c), m8));
    if (exps != nullptr) _mm256_storeu_ps(exps + c, e);
    z.add(e);
  }
  if (full < C) {
    const __m256 e = exp_rel8(_mm256_sub_ps(tail, m8));  // 0 past C (-inf there)
    if (exps != nullptr) _mm256_maskstore_ps(exps + full, tail_mask, e);
    z.add(e);
  }
  s->z = z.total() * (1.0 + 1e-5) + static_cast<double>(C) * 1e-13;  // frame_mass_bound's bound
}
#endif

#ifdef CF_AVX2_GREEDY
// path_certifies' pass over a float32 sequence (classes contiguous, C >= 8), 8 classes an
// instruction: each frame's first maximum (as scan_max and find_at_least) into best, flips fed as
// the plain loop feeds them, and the product of frame_upper_bound's bounds, from exp_upper in eight
// lanes (the lanes past C read -inf: exp_upper's floor e^-40 each, still a bound), up to the frame
// where it gives up (as the plain loop). NaN on NaN or +inf
// (one test on the sum of all the values, then the exact one per frame) or a frame of -inf.
__attribute__((target("avx2"))) double path_pass_avx2(const float* data, int64_t stride_t, int64_t length, int64_t C,
                                                      double limit, int32_t* best, PathFlips& flips) {
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  const __m256 floor = _mm256_set1_ps(-40.f), scale = _mm256_set1_ps(kExpUpperScale);
  const __m256i bias = _mm256_set1_epi32(kExpUpperBias);
  const int64_t full = C & ~int64_t(7);
  const __m256i tail_mask = tail_lanes8(C, full);
  __m256 sums = _mm256_setzero_ps();  // NaN or +inf somewhere makes it NaN or +inf
  double product = 1.0;
  int64_t t = 0;
  for (; t < length && product < kPathPassGiveUp * limit * flips.gain(); ++t) {
    const float* row = data + t * stride_t;
    if (t + kPrefetch < length) prefetch_ahead(row, stride_t, C);
    __m256 m1 = neg_inf;
    for (int64_t c = 0; c < full; c += 8) {
      const __m256 v = _mm256_loadu_ps(row + c);
      sums = _mm256_add_ps(sums, v);
      m1 = _mm256_max_ps(m1, v);
    }
    const __m256 tail = load_tail8(row, full, C, tail_mask, &sums);
    m1 = _mm256_max_ps(m1, tail);
    // A NaN lane may be lost by the max (then m is a value of the row, which first_at_least8 finds)
    // or kept (then m is NaN): the sums report it at the end.
    const float m = hmax8(m1);
    if (!(m > kNegInf)) return NAN;
    const __m256 m8 = _mm256_set1_ps(m);
    best[t] = static_cast<int32_t>(first_at_least8(row, full, tail, m8));
    // exp_upper in eight lanes: the same float operations, so the same bounds as the plain loop.
    auto upper = [&](__m256 v) {
      const __m256 r = _mm256_max_ps(_mm256_sub_ps(v, m8), floor);  // -40 for -inf and NaN-free rows
      return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_cvttps_epi32(_mm256_mul_ps(r, scale)), bias));
    };
    LaneSums8 z;
    for (int64_t c = 0; c < full; c += 8) z.add(upper(_mm256_loadu_ps(row + c)));
    if (full < C) z.add(upper(tail));
    const double bound = z.total() * (1.0 + 1e-5);  // frame_upper_bound's bound
    flips.push(row, m, best[t], bound, t > 0 ? (row - stride_t)[best[t]] : 0.f);
    product *= bound;
  }
  if (!(hsum8(sums) < INFINITY)) {
    for (int64_t u = 0; u < t; ++u) {
      if (any_bad_value(data + u * stride_t, C)) return NAN;
    }
  }
  return product;
}
#endif

// Whether the greedy kernel takes its AVX2 path: the CPU has AVX2 and torch's own kernels use
// it or AVX-512 (ATEN_CPU_CAPABILITY=default turns both off, e.g. to test the SSE2 path).
bool greedy_uses_avx2() {
#ifdef CF_AVX2_GREEDY
  static const bool avx2 = __builtin_cpu_supports("avx2") && at::get_cpu_capability() != "DEFAULT";
  return avx2;
#else
  return false;
#endif
}

Decoded greedy_cpu(const at::Tensor& log_probs, const at::Tensor& input_lengths, int64_t blank) {
  const auto [T, N, C] = check_decode_inputs(log_probs, input_lengths, blank, "ctc_greedy_decode");
  check_token_output(N, 1, T, "ctc_greedy_decode");
  check_lengths_in_range(input_lengths, T, "ctc_greedy_decode");
  // Every element is written below (the padding after each label too).
  auto tokens = at::empty({N, T}, log_probs.options().dtype(at::kInt));
  auto lengths = at::empty({N}, log_probs.options().dtype(at::kInt));
  auto scores = at::empty({N}, log_probs.options().dtype(at::kFloat));
  if (N == 0) return {tokens, lengths, scores};
  const at::Tensor lens = lengths_as_long(input_lengths);
  FirstBad bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "ctc_greedy_decode", [&] {
    const scalar_t* data = log_probs.const_data_ptr<scalar_t>();
    const int64_t st = log_probs.stride(0), sn = log_probs.stride(1), sc = log_probs.stride(2);
    const int64_t* len = lens.const_data_ptr<int64_t>();
    int32_t* tok = tokens.mutable_data_ptr<int32_t>();
    int32_t* out_len = lengths.mutable_data_ptr<int32_t>();
    float* out_score = scores.mutable_data_ptr<float>();
    // One sequence at a time, whatever the layout: a frame is a few cache lines
    // wherever it lies, and the state stays in registers.
    const bool avx2 = std::is_same<scalar_t, float>::value && sc == 1 && C >= 8 && greedy_uses_avx2();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(C);  // a frame widened to float, when it is not one already
      for (int64_t n = begin; n < end; ++n) {
        const Frames<scalar_t> f{data + n * sn, st, sc};
        Status status;
#ifdef CF_AVX2_GREEDY
        if (avx2) {
          status = greedy_decode_one_avx2(reinterpret_cast<const float*>(f.data), st, len[n], C, blank, tok + n * T,
                                          out_len + n, out_score + n);
        } else
#endif
        {
          status = greedy_decode_one(f, len[n], C, blank, buf.data(), tok + n * T, out_len + n, out_score + n);
        }
        if (status != kOk) bad.report(n);
        std::fill(tok + n * T + out_len[n], tok + (n + 1) * T, -1);
      }
    });
  });
  bad.check("ctc_greedy_decode");
  return {tokens, lengths, scores};
}

}  // namespace

Decoded beam_search_cpu_kernel(const at::Tensor& log_probs, const at::Tensor& input_lengths, int64_t beam_width,
                               int64_t top_k, int64_t blank, c10::optional<double> token_min_logp,
                               c10::optional<double> blank_skip_threshold, int64_t min_length, int64_t max_length,
                               const c10::optional<at::Tensor>& allowed_tokens, bool certify, bool with_scores) {
  const auto [T, N, C] = check_decode_inputs(log_probs, input_lengths, blank, "ctc_beam_search");
  BeamOptions opts = check_beam_options(log_probs, beam_width, top_k, token_min_logp, blank_skip_threshold,
                                        min_length, max_length, allowed_tokens, certify);
  opts.scores = with_scores;
  check_lengths_in_range(input_lengths, T, "ctc_beam_search");
  const int64_t L = beam_output_width(T, max_length);
  // beam_search_to_tokens writes every element.
  auto tokens = at::empty({N, top_k, L}, log_probs.options().dtype(at::kInt));
  auto lengths = at::empty({N, top_k}, log_probs.options().dtype(at::kInt));
  auto scores = at::empty({N, top_k}, log_probs.options().dtype(at::kFloat));
  if (N == 0) return {tokens, lengths, scores};
  const at::Tensor lens = lengths_as_long(input_lengths);
  at::Tensor allowed;
  if (allowed_tokens.has_value()) {
    allowed = allowed_tokens->contiguous();
    opts.allowed = allowed.const_data_ptr<bool>();
  }
  const int64_t ws_bytes = beam_workspace_bytes(T, C, beam_width);  // within kBeamWorkspaceLimit (checked)
  // One workspace per parallel chunk: at most kBeamWorkspaceLimit for all of
  // them together (but one always), by making the chunks large enough.
  const int64_t max_chunks = std::max<int64_t>(1, kBeamWorkspaceLimit / (ws_bytes + 16));
  const int64_t grain = std::max<int64_t>(8, (N + max_chunks - 1) / max_chunks);
  FirstBad bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, log_probs.scalar_type(), "ctc_beam_search", [&] {
    const scalar_t* data = log_probs.const_data_ptr<scalar_t>();
    const int64_t st = log_probs.stride(0), sn = log_probs.stride(1), sc = log_probs.stride(2);
    const int64_t* len = lens.const_data_ptr<int64_t>();
    int32_t* tok = tokens.mutable_data_ptr<int32_t>();
    int32_t* out_len = lengths.mutable_data_ptr<int32_t>();
    float* out_score = scores.mutable_data_ptr<float>();
    // Grain 8 (unless memory asks for more): beam search costs enough per
    // sequence to split small batches.
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      // One workspace per chunk, reused per sequence; not zeroed (init_beam_workspace
      // writes what is read), so a large one costs only the pages the search touches.
      std::unique_ptr<char[]> buffer(new (std::nothrow) char[ws_bytes + 16]);
      TORCH_CHECK(buffer != nullptr, "ctc_beam_search: could not allocate the ", ws_bytes,
                  "-byte search workspace (T = ", T, " frames x beam_width ", beam_width, ")");
      char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(buffer.get()) + 15) & ~uintptr_t(15));
      BeamWorkspace ws = carve_beam_workspace(base, T, C, beam_width);
      init_beam_workspace(ws, C, blank, opts);
#ifdef CF_AVX2_GREEDY
      // The certificate's frame statistics in AVX2, and each frame's class probabilities kept for
      // its forward passes when they take little room.
      std::vector<float> exps;
      if (opts.certify && top_k == 1 && !opts.scores && std::is_same<scalar_t, float>::value && sc == 1 && C >= 8 &&
          greedy_uses_avx2()) {
        ws.path_pass = path_pass_avx2;
      }
      if (opts.certify && top_k == 1 && C >= 8 && greedy_uses_avx2()) {
        ws.frame_stats = frame_stats_avx2;
        if (T * C <= kFrameExpLimit) {
          exps.resize(static_cast<size_t>(T * C));
          ws.frame_exp = exps.data();
        }
      }
#endif
      for (int64_t n = begin; n < end; ++n) {
        const Frames<scalar_t> f{data + n * sn, st, sc};
        const Status s = beam_search_to_tokens(f, len[n], C, blank, opts, ws, static_cast<int32_t>(top_k), L,
                                               tok + n * top_k * L, out_len + n * top_k, out_score + n * top_k);
        if (s != kOk) bad.report(n);
      }
    });
  });
  bad.check("ctc_beam_search");
  return {tokens, lengths, scores};
}

namespace {

Decoded beam_search_cpu(const at::Tensor& log_probs, const at::Tensor& input_lengths, int64_t beam_width,
                        int64_t top_k, int64_t blank, c10::optional<double> token_min_logp, c10::optional<double> blank_skip_threshold,
                        int64_t min_length, int64_t max_length, const c10::optional<at::Tensor>& allowed_tokens,
                        bool certify) {
  return beam_search_cpu_kernel(log_probs, input_lengths, beam_width, top_k, blank, token_min_logp,
                                blank_skip_threshold, min_length, max_length, allowed_tokens, certify, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(captcha_fast, CPU, m) {
  m.impl("ctc_greedy_decode", &greedy_cpu);
  m.impl("ctc_beam_search", &beam_search_cpu);
}

}  // namespace captcha_fast
