// CTC decoding core: greedy and prefix beam search for ONE sequence.
//
// This header knows nothing of PyTorch or Python. Every function is
// __host__ __device__, so the CPU kernel (csrc/cpu) and the CUDA kernel
// (csrc/cuda) run the very same code, and the CPU tests exercise the logic
// the GPU runs.
//
// Conventions
//  - Frames<T> reads log_probs[t, c] of one sequence through strides, so any
//    layout (contiguous (T, N, C), a transposed (N, T, C) view, a sliced
//    tensor) is read in place. A frame is handled as a float32 row: a pointer
//    into log_probs when it already is one (float32, unit class stride), else
//    a copy widened from fp16/bf16/fp64 or gathered through the stride.
//  - Probabilities live in the log domain; -inf is probability 0.
//  - Sums over frames accumulate in double (a T = 5000 float32 sum drifts by
//    ~0.05); the outputs are float32.
//  - Invalid input (NaN or +inf log-probability) is reported through the
//    return status, never by throwing: the caller decides how to raise.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define CF_HD __host__ __device__ __forceinline__
#define CF_HOT __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define CF_HD inline
// The per-frame helpers: inlined even when the kernel instantiates the search
// for four dtypes (GCC then keeps them out of line, ~15% slower).
#define CF_HOT inline __attribute__((always_inline))
#else
#define CF_HD inline
#define CF_HOT inline
#endif

// The row scans use SSE2 on x86-64 hosts (every x86-64 CPU has it): two
// independent 4-wide accumulators, so a 37-class frame costs a few ns. Other
// hosts and CUDA run the plain loops, which give the same results.
#if defined(__SSE2__) && !defined(__CUDACC__)
#include <emmintrin.h>
#define CF_SSE2 1
#endif
#if !defined(__CUDA_ARCH__)
#include <cstring>
#endif

namespace captcha_fast {

constexpr float kNegInf = -INFINITY;
constexpr double kNegInfD = -static_cast<double>(INFINITY);
constexpr int64_t kPrefetch = 2;  // frames read ahead

enum Status : int32_t { kOk = 0, kBadValue = 1 };

template <typename scalar_t>
struct Frames {
  const scalar_t* data;  // log_probs[0, n, 0] of this sequence
  int64_t stride_t;
  int64_t stride_c;
  CF_HD float at(int64_t t, int64_t c) const {
    return static_cast<float>(data[t * stride_t + c * stride_c]);
  }
};

// Frame t as C contiguous floats: in place when possible, else copied into buf.
template <typename scalar_t>
CF_HOT const float* frame_row(const Frames<scalar_t>& f, int64_t t, int64_t C, float* buf) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (f.stride_c == 1) return f.data + t * f.stride_t;
  }
  for (int64_t c = 0; c < C; ++c) buf[c] = f.at(t, c);
  return buf;
}

// The bytes from the start of a frame's row to its last value, or -1 where
// prefetching is not worth it (a class-strided frame). A sequence's frames lie
// N rows apart in the usual (T, N, C) layout, too far for the hardware
// prefetcher, so each frame would otherwise wait on memory.
template <typename scalar_t>
CF_HOT int64_t prefetch_span(const Frames<scalar_t>& f, int64_t C) {
  const int64_t span = (C - 1) * f.stride_c * static_cast<int64_t>(sizeof(scalar_t));
  return span >= 0 && span <= 1024 ? span : -1;
}

// Asks for frame t's row (span: prefetch_span) ahead of its use (host only).
template <typename scalar_t>
CF_HOT void prefetch_frame(const Frames<scalar_t>& f, int64_t t, int64_t span) {
#if !defined(__CUDA_ARCH__) && (defined(__GNUC__) || defined(__clang__))
  const char* first = reinterpret_cast<const char*>(f.data + t * f.stride_t);
  for (int64_t off = 0; off < span; off += 64) __builtin_prefetch(first + off);
  __builtin_prefetch(first + span);
#endif
}

// NaN and +inf are not log-probabilities; -inf (probability 0) is.
CF_HOT bool bad_value(float v) { return !(v < INFINITY); }

// The float whose bits these are.
CF_HOT float float_of_bits(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// exp(x) for x in [-87, 0], relative error < 3e-7: Cody-Waite reduction to
// r in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial; inline and ~3x
// cheaper than a libm call.
CF_HOT float exp_nonpositive(float x) {
  const float k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln 2)
  const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return p * float_of_bits((static_cast<int32_t>(k) + 127) << 23);  // p 2^k
}

#ifdef CF_SSE2
// exp_nonpositive over the lanes of a float vector V, in place (__m128, or __m256 inlined into
// AVX2 code; VI: the int32 vector of as many lanes; by reference, so that no 32-byte vector is
// passed by value in code built for plain x86-64), bit for bit: the same float operations in the
// same order (GCC/Clang vector arithmetic, which the SSE/AVX intrinsics are themselves; no FMA).
template <typename V, typename VI>
inline __attribute__((always_inline)) void exp_nonpositive_lanes(V& x) {
  const V k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const V r = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  V p = r * (1.f / 720) + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const VI bits = (__builtin_convertvector(k, VI) + 127) << 23;  // 2^k (k is whole: truncation is exact)
  x = p * reinterpret_cast<V>(bits);
}

inline __m128 exp_nonpositive4(__m128 x) {
  exp_nonpositive_lanes<__m128, __v4si>(x);
  return x;
}
#endif

// log(1 + e) for e in [0, 1], absolute error < 2e-7: its series where e is
// small (the common case in peaky outputs), else 2 atanh(e / (2 + e)).
// log1p(e) = 2 atanh(e / (2 + e)) by its odd series (e in [0, 1]).
CF_HOT float log1p_atanh(float e) {
  const float z = e / (2.f + e), z2 = z * z;
  float p = 1.f / 13;
  p = p * z2 + 1.f / 11;
  p = p * z2 + 1.f / 9;
  p = p * z2 + 1.f / 7;
  p = p * z2 + 1.f / 5;
  p = p * z2 + 1.f / 3;
  p = p * z2 + 1.f;
  return 2.f * z * p;
}

CF_HOT float log1p_unit(float e) {
  if (e < 0.03f) return e * (1.f - e * (0.5f - e * (1.f / 3 - e * 0.25f)));
  return log1p_atanh(e);
}

// log(exp(a) + exp(b)) in double. The correction log1p(exp(-|a - b|)) is at
// most log 2 and is computed in float (absolute error ~2e-7, which does not
// accumulate the way a float32 running sum does); below exp(-24) it is
// dropped. Also covers b == -inf and a == b == -inf.
CF_HOT double log_add(double a, double b) {
  if (a < b) { const double tmp = a; a = b; b = tmp; }
  const double d = b - a;
  if (!(d > -24.0)) return a;
  return a + static_cast<double>(log1p_unit(exp_nonpositive(static_cast<float>(d))));
}

// out[i] = log_add(a[i], b[i]), branch-free so that the n computations overlap
// (or vectorise); out may alias a or b.
CF_HOT void log_add_n(const double* a, const double* b, double* out, int32_t n) {
  int32_t i = 0;
#ifdef CF_SSE2
  // Four at a time, the same operations in the same order as the loop below
  // (so the same results): the double parts two-wide, the float parts four-wide.
  for (; i + 4 <= n; i += 4) {
    const __m128d a0 = _mm_loadu_pd(a + i), a1 = _mm_loadu_pd(a + i + 2);
    const __m128d b0 = _mm_loadu_pd(b + i), b1 = _mm_loadu_pd(b + i + 2);
    const __m128d gt0 = _mm_cmpgt_pd(a0, b0), gt1 = _mm_cmpgt_pd(a1, b1);
    const __m128d hi0 = _mm_or_pd(_mm_and_pd(gt0, a0), _mm_andnot_pd(gt0, b0));
    const __m128d hi1 = _mm_or_pd(_mm_and_pd(gt1, a1), _mm_andnot_pd(gt1, b1));
    const __m128d lo0 = _mm_or_pd(_mm_and_pd(gt0, b0), _mm_andnot_pd(gt0, a0));
    const __m128d lo1 = _mm_or_pd(_mm_and_pd(gt1, b1), _mm_andnot_pd(gt1, a1));
    const __m128d d0 = _mm_sub_pd(lo0, hi0), d1 = _mm_sub_pd(lo1, hi1);
    const __m128d near0 = _mm_cmpgt_pd(d0, _mm_set1_pd(-24.0)), near1 = _mm_cmpgt_pd(d1, _mm_set1_pd(-24.0));
    // The low 32 bits of each 64-bit mask, as four float lanes.
    const __m128 near = _mm_shuffle_ps(_mm_castpd_ps(near0), _mm_castpd_ps(near1), _MM_SHUFFLE(2, 0, 2, 0));
    const __m128 df = _mm_movelh_ps(_mm_cvtpd_ps(d0), _mm_cvtpd_ps(d1));
    const __m128 x = _mm_or_ps(_mm_and_ps(near, df), _mm_andnot_ps(near, _mm_set1_ps(-24.f)));
    const __m128 e = exp_nonpositive4(x);
    // log1p_unit(e) without its branch
    const __m128 z = _mm_div_ps(e, _mm_add_ps(_mm_set1_ps(2.f), e)), z2 = _mm_mul_ps(z, z);
    __m128 q = _mm_set1_ps(1.f / 13);
    q = _mm_add_ps(_mm_mul_ps(q, z2), _mm_set1_ps(1.f / 11));
    q = _mm_add_ps(_mm_mul_ps(q, z2), _mm_set1_ps(1.f / 9));
    q = _mm_add_ps(_mm_mul_ps(q, z2), _mm_set1_ps(1.f / 7));
    q = _mm_add_ps(_mm_mul_ps(q, z2), _mm_set1_ps(1.f / 5));
    q = _mm_add_ps(_mm_mul_ps(q, z2), _mm_set1_ps(1.f / 3));
    q = _mm_add_ps(_mm_mul_ps(q, z2), _mm_set1_ps(1.f));
    const __m128 corr = _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(2.f), z), q);
    const __m128d sum0 = _mm_add_pd(hi0, _mm_cvtps_pd(corr)), sum1 = _mm_add_pd(hi1, _mm_cvtps_pd(_mm_movehl_ps(corr, corr)));
    _mm_storeu_pd(out + i, _mm_or_pd(_mm_and_pd(near0, sum0), _mm_andnot_pd(near0, hi0)));
    _mm_storeu_pd(out + i + 2, _mm_or_pd(_mm_and_pd(near1, sum1), _mm_andnot_pd(near1, hi1)));
  }
#endif
  for (; i < n; ++i) {
    const double hi = a[i] > b[i] ? a[i] : b[i], lo = a[i] > b[i] ? b[i] : a[i];
    const double d = lo - hi;  // NaN when both are -inf
    const bool far = !(d > -24.0);
    const float e = exp_nonpositive(far ? -24.f : static_cast<float>(d));
    out[i] = far ? hi : hi + static_cast<double>(log1p_atanh(e));  // log1p_unit without its branch
  }
}

// ---------------------------------------------------------------------------
// Greedy (best path): argmax per frame, merge repeats, drop blanks.
// Ties go to the lowest class index, as torch.argmax does. A kernel may step
// sequences frame by frame in any interleaving (greedy_step), or decode one
// whole sequence (greedy_decode_one).

// NaN or +inf anywhere in row[0, C): the exact test behind the vector scans'
// quick one (a sum of the values is NaN or +inf whenever one is, and rarely
// otherwise: two huge finite values).
CF_HOT bool any_bad_value(const float* row, int64_t C) {
  bool bad = false;
  for (int64_t c = 0; c < C; ++c) bad |= bad_value(row[c]);
  return bad;
}

#ifdef CF_SSE2
inline float cf_hmax(__m128 v) {
  v = _mm_max_ps(v, _mm_movehl_ps(v, v));
  v = _mm_max_ss(v, _mm_shuffle_ps(v, v, 1));
  return _mm_cvtss_f32(v);
}
inline float cf_hsum(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
  return _mm_cvtss_f32(v);
}
#endif

// max over c of row[c] + add[c] (add == nullptr: row[c] alone), -inf for an
// empty maximum; *bad is set if any row value is NaN or +inf.
CF_HOT float scan_max(const float* row, const float* add, int64_t C, bool* bad) {
#ifdef CF_SSE2
  if (C >= 8) {
    __m128 m0 = _mm_set1_ps(kNegInf), m1 = m0, s0 = _mm_setzero_ps(), s1 = s0;
    for (int64_t c = 0;; c += 8) {
      if (c + 8 > C) c = C - 8;  // the last block may overlap the one before: max and the check do not mind
      __m128 a = _mm_loadu_ps(row + c), b = _mm_loadu_ps(row + c + 4);
      s0 = _mm_add_ps(s0, a);
      s1 = _mm_add_ps(s1, b);
      if (add != nullptr) {
        a = _mm_add_ps(a, _mm_loadu_ps(add + c));
        b = _mm_add_ps(b, _mm_loadu_ps(add + c + 4));
      }
      m0 = _mm_max_ps(m0, a);
      m1 = _mm_max_ps(m1, b);
      if (c + 8 == C) break;
    }
    *bad = !(cf_hsum(_mm_add_ps(s0, s1)) < INFINITY) && any_bad_value(row, C);
    return cf_hmax(_mm_max_ps(m0, m1));
  }
#endif
  float m = kNegInf;
  for (int64_t c = 0; c < C; ++c) {
    const float e = add == nullptr ? row[c] : row[c] + add[c];
    m = e > m ? e : m;
  }
  *bad = any_bad_value(row, C);
  return m;
}

// NaN or +inf anywhere in row[0, C): scan_max's check alone.
CF_HOT bool row_has_bad_value(const float* row, int64_t C) {
#ifdef CF_SSE2
  if (C >= 8) {
    __m128 s0 = _mm_setzero_ps(), s1 = s0;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
      s0 = _mm_add_ps(s0, _mm_loadu_ps(row + c));
      s1 = _mm_add_ps(s1, _mm_loadu_ps(row + c + 4));
    }
    if (c < C) {
      s0 = _mm_add_ps(s0, _mm_loadu_ps(row + C - 8));
      s1 = _mm_add_ps(s1, _mm_loadu_ps(row + C - 4));
    }
    return !(cf_hsum(_mm_add_ps(s0, s1)) < INFINITY) && any_bad_value(row, C);
  }
#endif
  return any_bad_value(row, C);
}

// The first c with row[c] + add[c] >= lo (add == nullptr: row[c] alone) at or
// after `from`, else C.
CF_HOT int64_t find_at_least(const float* row, const float* add, int64_t from, int64_t C, float lo) {
  int64_t c = from;
#ifdef CF_SSE2
  const __m128 lo4 = _mm_set1_ps(lo);
  for (; c + 4 <= C; c += 4) {
    __m128 v = _mm_loadu_ps(row + c);
    if (add != nullptr) v = _mm_add_ps(v, _mm_loadu_ps(add + c));
    const int mask = _mm_movemask_ps(_mm_cmpge_ps(v, lo4));
    if (mask != 0) return c + __builtin_ctz(static_cast<unsigned>(mask));
  }
#endif
  for (; c < C; ++c) {
    if ((add == nullptr ? row[c] : row[c] + add[c]) >= lo) return c;
  }
  return C;
}

// Argmax of a frame row (the first maximum); sets *bad on NaN/+inf.
CF_HOT int64_t row_argmax(const float* row, int64_t C, float* best_v, bool* bad) {
  bool b;
  const float m = scan_max(row, nullptr, C, &b);
  *best_v = m;
  *bad = *bad || b;
  if (b) return 0;
  return row[0] == m ? 0 : find_at_least(row, nullptr, 1, C, m);
}

struct GreedyState {
  int32_t len = 0;      // tokens written
  int64_t prev = -1;    // previous frame's class (-1: none yet)
  double score = 0.0;   // best path log-prob
};

CF_HOT void greedy_step(GreedyState& s, int64_t best, float best_v, int64_t blank, int32_t* tokens) {
  s.score += best_v;
  if (best != blank && best != s.prev) tokens[s.len++] = static_cast<int32_t>(best);
  s.prev = best;
}

// Decodes frames [0, length). buf: C floats of scratch (used for non-float32
// or class-strided inputs).
template <typename scalar_t>
CF_HD Status greedy_decode_one(const Frames<scalar_t>& f, int64_t length, int64_t C, int64_t blank, float* buf,
                               int32_t* tokens, int32_t* out_len, float* score) {
  GreedyState s;
  bool bad = false;
  for (int64_t t = 0; t < length; ++t) {
    float v;
    const int64_t best = row_argmax(frame_row(f, t, C, buf), C, &v, &bad);
    greedy_step(s, best, v, blank, tokens);
  }
  *out_len = s.len;
  *score = static_cast<float>(s.score);
  return bad ? kBadValue : kOk;
}

// ---------------------------------------------------------------------------
// Prefix beam search.
//
// Prefixes are nodes of a trie stored in flat arrays (node_parent,
// node_token, node_len); node 0 is the empty prefix. Invariant: a
// (parent, token) pair has at most one node, kept by an open-addressing
// table of node ids. Hence two prefixes are equal iff their node ids are
// equal, and merging equal prefixes never compares label sequences.
//
// Each beam holds a node and two log-probabilities: pb (all alignments kept
// so far end in blank) and pnb (they end in the prefix's last token), and
// their sum `total`. Per frame, with p(.) the frame's probabilities:
//   same prefix   pb'  = (pb + pnb) p(blank)
//                 pnb' = pnb p(last)                  (repeat collapses)
//   prefix + c    pnb' = (pb + pnb) p(c)     if c != last
//                        pb p(c)             if c == last (needs a blank between)
// "prefix + c" may already be a beam (a child of this beam); then its mass is
// added to that beam instead of creating a candidate. The beam_width best
// prefixes by pb + pnb survive. Ties keep the earlier candidate (existing
// beams first, then by beam, then by token log-prob, then by class), so
// results are deterministic.
//
// Bounds that keep the search exact while building few candidates:
//  - Beams are kept sorted by total, so a candidate from beam b scores at
//    most total[b] + p(c) <= total[0] + p(c): once the beam is full, a class
//    whose log-prob is <= (K-th best score) - total[0] is never considered.
//  - Of one beam's extensions, only the frame's K + 1 best classes can enter:
//    each of the K better ones that is not the repeat of the beam's last token
//    yields a rival (a candidate, or the existing child it lands on) scoring
//    at least as much, and ties keep the earlier. So a frame keeps its K + 1
//    best classes, sorted, and each beam stops at the first that cannot enter.
//  - Scores are stored relative to `base`; a blank-only frame after which
//    every beam ends in blank adds one number to base instead of K.
//
// Options:
//  - token_min_logp: characters below it at a frame are not extended (the
//    frame's best character always is). -inf switches this off.
//  - log_blank_skip: a frame whose blank log-prob is >= this is applied as a
//    blank-only frame (O(beam) instead of O(beam * C)). +inf switches it off.
//  - min_len / max_len: label length bounds, enforced exactly: a prefix that
//    cannot reach min_len in the frames left is dropped, none grows past
//    max_len.
//  - allowed: optional mask over classes (nullptr = all).
//  - certify: see "The top-label certificate" below.
//  - scores: false when the caller reads only the labels (see path_certifies).
struct BeamOptions {
  int32_t beam_width;
  float token_min_logp;
  float log_blank_skip;
  int32_t min_len;
  int32_t max_len;  // < 0: no limit
  const bool* allowed;
  int64_t allowed_stride;
  bool certify;  // top_k = 1: return the label the certificate below proves, without searching
  bool scores;   // false: the scores are not read (a label the path test alone proves is answered without them)
};

// Workspace of one sequence at a time, carved out of one byte buffer. Sizes
// depend only on (T, C, beam_width), so a kernel allocates once per thread or
// per batch, calls init_beam_workspace once, and reuses it: each search
// clears only the hash-table slots it filled.
struct Beam {             // one beam; a frame's beams are sorted by total (descending)
  double pb;
  double pnb;
  double total;           // log_add(pb, pnb)
  int32_t node;
  int32_t last;           // the node's last token (-1: the empty prefix)
  int32_t len;            // the node's label length
  int32_t parent;         // beam index of the node's parent in the same beam, else -1
  int32_t has_child;      // 1 if some beam's parent is this one
};

// One entry of a frame's selection: a beam as it is, or extended by a class.
struct Entry {
  double score;
  int32_t beam;   // the source beam
  int32_t token;  // -1: the beam itself; else the class extending it
};

// The certificate's rivals: labels of paths off the greedy one in one frame (see certify_top_label).
constexpr int kCertRivals = 3;
// The most floats a kernel keeps of one sequence's class probabilities (T x C) for the certificate.
constexpr int64_t kFrameExpLimit = int64_t(1) << 18;
struct FrameStats;
struct PathFlips;

struct BeamWorkspace {
  int32_t* node_parent;   // [max_nodes]
  int32_t* node_token;    // [max_nodes]
  int32_t* node_len;      // [max_nodes]
  int32_t* node_slot;     // [max_nodes] beam index of a node in the current beam, else -1
  int32_t* node_entry;    // [max_nodes] the node's slot in table
  int32_t* table;         // [table_size] (parent, token) -> node, -1 empty
  Beam* beam;             // [K] this frame's beams
  Beam* next;             // [K] the beams being built (swapped with beam per frame)
  double* next_pb;        // [K] existing beams after this frame
  double* next_pnb;       // [K]
  double* score;          // [K] the existing beams' scores after this frame
  Entry* top;             // [K] the selection, best first (and a sentinel at top[-1])
  uint64_t* frame_key;    // [K + 1] scratch of frame_classes (and a sentinel at [-1])
  int32_t* frame_token;   // [K + 1] this frame's best extendable classes, best first
  double* frame_logp;     // [K + 1] their log-probs (floats, held as doubles for the sums)
  float* row_buf;         // [C] a frame widened to float
  float* class_mask;      // [C] 0 for an extendable class, -inf for the blank and disallowed ones
  double* label_pb;       // [T + 1] the certificate's forward pass over the prefixes of one label
  double* label_pnb;      // [T + 1]
  double* chain_pb;       // [T + 1] the same, through the prefixes the search provably keeps
  double* chain_pnb;      // [T + 1]
  double* label_e;        // [T] one frame's probability of each of the label's tokens
  float* frame_max;       // [T] the certificate's per-frame maxima
  int32_t* frame_best;    // [T] the greedy path
  double* frame_z;        // [T] Z_{1:t} / Π max (an upper bound)
  int32_t* rival_label;   // [kCertRivals + 1][T + 1] the certificate's rival labels
  // Host SIMD for the certificate (nullptr: frame_stats_generic, and exps computed where needed):
  // frame_stats_generic, also writing each exp(row[c] - max) to its last argument unless nullptr,
  // and frame_exp [T][C], where it writes them for certify_top_label's forward passes.
  void (*frame_stats)(const float*, int64_t, FrameStats*, float*);
  float* frame_exp;
  // Host SIMD for path_certifies over a float32 sequence whose classes are contiguous (nullptr: the
  // plain loops): (data, stride_t, length, C, limit, best per frame, flips fed) -> Π_t
  // frame_upper_bound, the product so far once it gives up; NaN for a NaN/+inf value or a frame of
  // -inf.
  double (*path_pass)(const float*, int64_t, int64_t, int64_t, double, int32_t*, PathFlips&);
  int64_t max_nodes;
  int64_t table_size;     // a power of two
};

CF_HD int64_t align16(int64_t x) { return (x + 15) & ~int64_t(15); }

CF_HD int64_t table_size_for(int64_t max_nodes) {
  int64_t s = 16;
  while (s < 2 * max_nodes) s <<= 1;
  return s;
}

// Sizes are computed in 64 bits: with T < 2^30 frames and beam_width <= 4096
// (the ops' checks), 1 + T * K < 2^43 and every byte count below fits. Node
// ids and hash-table slots are int32, so a workspace that is used must hold at
// most kMaxBeamNodes nodes (then table_size <= 2^30); the ops refuse larger
// work before allocating (csrc/ops.cpp, check_beam_workspace, whose memory
// limit is tighter than this).
constexpr int64_t kMaxBeamNodes = int64_t(1) << 29;

// Trie nodes one search may create: the empty prefix, then at most K per frame.
CF_HD int64_t beam_max_nodes(int64_t T, int64_t K) { return 1 + T * K; }

// Lays the workspace out from `base` (nullptr: only measures); returns its size in bytes.
CF_HD int64_t beam_workspace_layout(char* base, int64_t T, int64_t C, int64_t K, BeamWorkspace& w) {
  w.max_nodes = beam_max_nodes(T, K);
  w.table_size = table_size_for(w.max_nodes);
  int64_t used = 0;
  auto take = [&](int64_t bytes) {
    char* q = base == nullptr ? nullptr : base + used;
    used += align16(bytes);
    return q;
  };
  auto ints = [&](int64_t n) { return reinterpret_cast<int32_t*>(take(n * 4)); };
  auto doubles = [&](int64_t n) { return reinterpret_cast<double*>(take(n * 8)); };
  auto floats = [&](int64_t n) { return reinterpret_cast<float*>(take(n * 4)); };
  w.node_parent = ints(w.max_nodes);
  w.node_token = ints(w.max_nodes);
  w.node_len = ints(w.max_nodes);
  w.node_slot = ints(w.max_nodes);
  w.node_entry = ints(w.max_nodes);
  w.table = ints(w.table_size);
  w.beam = reinterpret_cast<Beam*>(take(K * sizeof(Beam)));
  w.next = reinterpret_cast<Beam*>(take(K * sizeof(Beam)));
  w.next_pb = doubles(K);
  w.next_pnb = doubles(K);
  w.score = doubles(K);
  Entry* const top = reinterpret_cast<Entry*>(take((K + 1) * sizeof(Entry)));
  w.top = top == nullptr ? nullptr : top + 1;  // top[-1]: insert_top's sentinel
  uint64_t* const keys = reinterpret_cast<uint64_t*>(take((K + 2) * 8));
  w.frame_key = keys == nullptr ? nullptr : keys + 1;  // frame_key[-1]: frame_classes' sentinel
  w.frame_token = ints(K + 1);
  w.frame_logp = doubles(K + 1);
  w.row_buf = floats(C);
  w.class_mask = floats(C);
  w.label_pb = doubles(T + 1);
  w.label_pnb = doubles(T + 1);
  w.chain_pb = doubles(T + 1);
  w.chain_pnb = doubles(T + 1);
  w.label_e = doubles(T);
  w.frame_max = floats(T);
  w.frame_best = ints(T);
  w.frame_z = doubles(T);
  w.rival_label = ints((kCertRivals + 1) * (T + 1));
  return used;
}

CF_HD int64_t beam_workspace_bytes(int64_t T, int64_t C, int64_t K) {
  BeamWorkspace w;
  return beam_workspace_layout(nullptr, T, C, K, w);
}

CF_HD BeamWorkspace carve_beam_workspace(char* base, int64_t T, int64_t C, int64_t K) {
  BeamWorkspace w;
  beam_workspace_layout(base, T, C, K, w);
  w.frame_stats = nullptr;
  w.frame_exp = nullptr;
  w.path_pass = nullptr;
  return w;
}

// Once per workspace: the empty hash table, the per-class state.
CF_HD void init_beam_workspace(BeamWorkspace& w, int64_t C, int64_t blank, const BeamOptions& o) {
  for (int64_t i = 0; i < w.table_size; ++i) w.table[i] = -1;
  w.top[-1] = Entry{static_cast<double>(INFINITY), -1, -1};
  w.frame_key[-1] = ~uint64_t(0);  // above every class_key
  for (int64_t c = 0; c < C; ++c) {
    const bool allowed = o.allowed == nullptr || o.allowed[c * o.allowed_stride];
    w.class_mask[c] = (c == blank || !allowed) ? kNegInf : 0.f;
  }
}

// The node for prefix(parent) + token, created if it does not exist yet.
CF_HOT int32_t child_node(BeamWorkspace& w, int32_t& num_nodes, int32_t parent, int32_t token) {
  const uint32_t mask = static_cast<uint32_t>(w.table_size - 1);
  uint32_t h = (static_cast<uint32_t>(parent) * 2654435761u) ^ (static_cast<uint32_t>(token) * 40503u);
  for (uint32_t i = h & mask;; i = (i + 1) & mask) {
    const int32_t id = w.table[i];
    if (id < 0) {
      const int32_t node = num_nodes++;
      w.node_parent[node] = parent;
      w.node_token[node] = token;
      w.node_len[node] = w.node_len[parent] + 1;
      w.node_slot[node] = -1;
      w.node_entry[node] = static_cast<int32_t>(i);
      w.table[i] = node;
      return node;
    }
    if (w.node_parent[id] == parent && w.node_token[id] == token) return id;
  }
}

// The node for prefix(parent) + token, or -1 if there is none.
CF_HOT int32_t find_node(const BeamWorkspace& w, int32_t parent, int32_t token) {
  const uint32_t mask = static_cast<uint32_t>(w.table_size - 1);
  uint32_t h = (static_cast<uint32_t>(parent) * 2654435761u) ^ (static_cast<uint32_t>(token) * 40503u);
  for (uint32_t i = h & mask;; i = (i + 1) & mask) {
    const int32_t id = w.table[i];
    if (id < 0 || (w.node_parent[id] == parent && w.node_token[id] == token)) return id;
  }
}

// Keeps the K best (score, beam, token) in descending order; a tie keeps the
// earlier one. Returns the new count.
CF_HOT int32_t push_top(BeamWorkspace& w, int32_t count, int32_t K, double score, int32_t beam, int32_t token) {
  if (count == K && !(score > w.top[K - 1].score)) return count;
  int32_t i = count < K ? count++ : K - 1;
  for (; i > 0 && score > w.top[i - 1].score; --i) w.top[i] = w.top[i - 1];
  w.top[i] = Entry{score, beam, token};
  return count;
}

// push_top for an entry known to enter (count < K, or score beats the K-th);
// top[-1].score is +inf (a sentinel that ends the shifting).
CF_HOT int32_t insert_top(Entry* top, int32_t count, int32_t K, double score, int32_t beam, int32_t token) {
  int32_t i = count < K ? count++ : K - 1;
  for (; score > top[i - 1].score; --i) top[i] = top[i - 1];
  top[i] = Entry{score, beam, token};
  return count;
}

// A key that orders (log-prob, class) pairs as frame_classes wants them: by
// log-prob, then by class (the lower first). v is not NaN.
CF_HOT uint64_t class_key(float v, int64_t c) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = static_cast<uint32_t>(__float_as_int(v));
#else
  std::memcpy(&bits, &v, sizeof bits);
#endif
  bits = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;  // IEEE order as unsigned order
  return (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - static_cast<uint32_t>(c));
}

// The log-prob of a class_key.
CF_HOT float logp_of(uint64_t key) {
  uint32_t bits = static_cast<uint32_t>(key >> 32);
  bits = (bits & 0x80000000u) ? bits & 0x7fffffffu : ~bits;
#if defined(__CUDA_ARCH__)
  return __int_as_float(static_cast<int32_t>(bits));
#else
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// The (at most cap) best extendable classes of a frame whose log-prob is
// > cut, best first (ties in class order). best_v: the best extendable
// log-prob; best >= 0 when it is below min_logp (then only it extends).
// keys: scratch for cap keys, after a sentinel keys[-1] above every key.
CF_HOT int32_t frame_classes(const float* row, const float* class_mask, int64_t C, float best_v, int64_t best,
                            float min_logp, double cut, int32_t cap, uint64_t* keys, int32_t* token, double* logp) {
  if (!(best_v > cut) || !(best_v > kNegInf)) return 0;  // no class beats the bound
  if (best >= 0) {
    token[0] = static_cast<int32_t>(best);
    logp[0] = best_v;
    return 1;
  }
  // A float at or below both bounds: the vector search skips the classes below
  // it. The keys of the classes above the bound are sorted as they come in;
  // once cap are held, later ones must beat the last.
  float lo = static_cast<float>(cut);
  if (static_cast<double>(lo) > cut) lo = nextafterf(lo, kNegInf);
  lo = lo > min_logp ? lo : min_logp;
  int32_t n = 0;
  auto consider = [&](int64_t c) {
    const float v = row[c] + class_mask[c];
    if (!(v > cut) || !(v > kNegInf)) return;
    const uint64_t key = class_key(v, c);
    if (n == cap && !(key > keys[cap - 1])) return;
    int32_t i = n < cap ? n++ : cap - 1;
    for (; key > keys[i - 1]; --i) keys[i] = keys[i - 1];  // keys[-1]: a sentinel
    keys[i] = key;
    if (n == cap) lo = lo > logp_of(keys[cap - 1]) ? lo : logp_of(keys[cap - 1]);
  };
  int64_t c0 = 0;
#ifdef CF_SSE2
  for (; c0 + 4 <= C; c0 += 4) {
    const __m128 v = _mm_add_ps(_mm_loadu_ps(row + c0), _mm_loadu_ps(class_mask + c0));
    for (unsigned mask = static_cast<unsigned>(_mm_movemask_ps(_mm_cmpge_ps(v, _mm_set1_ps(lo)))); mask != 0;
         mask &= mask - 1) {
      consider(c0 + __builtin_ctz(mask));
    }
  }
#endif
  for (int64_t c = c0; c < C; ++c) {
    if (row[c] + class_mask[c] >= lo) consider(c);
  }
  for (int32_t i = 0; i < n; ++i) {
    token[i] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(keys[i]));
    logp[i] = logp_of(keys[i]);
  }
  return n;
}

// The outcome of beam_search_one: `count` hypotheses, best first; hypothesis k
// is node w.beam[w.top[k].beam].node with log-prob base + w.top[k].score.
struct BeamResult {
  Status status;
  int32_t count;
  double base;
};

CF_HD int32_t hypothesis_node(const BeamWorkspace& w, int32_t k) { return w.beam[w.top[k].beam].node; }

// Writes the label of `node` into out[0, len) and returns len.
CF_HD int32_t node_label(const BeamWorkspace& w, int32_t node, int32_t* out) {
  const int32_t len = w.node_len[node];
  for (int32_t j = len - 1; j >= 0; --j, node = w.node_parent[node]) out[j] = w.node_token[node];
  return len;
}

template <typename scalar_t>
CF_HD BeamResult beam_search_run(const Frames<scalar_t>& f, int64_t length, int64_t C, int64_t blank,
                                 const BeamOptions& o, BeamWorkspace& w, int32_t top_k, int32_t& num_nodes) {
  const int32_t K = o.beam_width;
  BeamResult r{kOk, 0, 0.0};
  if (length < o.min_len) return r;  // no label of min_len fits: no hypothesis

  w.node_parent[0] = -1;
  w.node_token[0] = -1;
  w.node_len[0] = 0;
  w.node_slot[0] = 0;  // node 0 is beam 0
  int32_t num_beams = 1;
  w.beam[0] = Beam{0.0, kNegInfD, 0.0, 0, -1, 0, -1, 0};
  bool pnb_live = false;  // some beam may end in a non-blank
  const float log_blank_skip = o.log_blank_skip;
  const int64_t span = prefetch_span(f, C);
  const float min_logp = o.token_min_logp;
  const int32_t min_len = o.min_len;
  const int32_t len_cap = o.max_len >= 0 ? o.max_len : INT32_MAX;  // no prefix grows from this length

  for (int64_t t = 0; t < length; ++t) {
    if (t + kPrefetch < length && span >= 0) prefetch_frame(f, t + kPrefetch, span);
    // 1. Validate the frame; its best extendable class.
    const float* row = frame_row(f, t, C, w.row_buf);
    const float lp_blank = row[blank];
    Beam* const beam = w.beam;
    if (lp_blank >= log_blank_skip) {
      if (row_has_bad_value(row, C)) {
        r.status = kBadValue;
        return r;
      }
      // 2a. A (nearly) certain blank: everything moves to "ends in blank".
      if (pnb_live) {
        for (int32_t b = 0; b < num_beams; ++b) {
          beam[b].pb = beam[b].total;
          beam[b].pnb = kNegInfD;
        }
        pnb_live = false;
      }
      r.base += lp_blank;
      continue;
    }
    bool bad;
    const float best_v = scan_max(row, w.class_mask, C, &bad);  // the best extendable log-prob
    if (bad) {
      r.status = kBadValue;
      return r;
    }
    // Extended at this frame: classes at or above token_min_logp, and the best.
    int64_t best = -1;
    if (best_v > kNegInf && best_v < min_logp) {
      best = 0;
      while (row[best] + w.class_mask[best] != best_v) ++best;
    }
    // A prefix shorter than this after the frame cannot reach min_len.
    const int64_t need_len = min_len - (length - t - 1);

    // 2b. Existing prefixes: stay by blank or by repeating the last token,
    //     plus the extension of their parent beam that lands on them; they
    //     enter the selection first (token -1).
    //     The log-adds run as one batch: independent, so they overlap.
    for (int32_t b = 0; b < num_beams; ++b) {
      const int32_t last = beam[b].last;
      double stay = kNegInfD;
      if (last >= 0) {
        const float lp_last = row[last];
        stay = beam[b].pnb + lp_last;
        const int32_t p = beam[b].parent;
        if (p >= 0 && lp_last > kNegInf && (lp_last >= min_logp || last == best)) {
          stay = log_add(stay, (beam[p].last == last ? beam[p].pb : beam[p].total) + lp_last);
        }
      }
      w.next_pb[b] = beam[b].total + lp_blank;
      w.next_pnb[b] = stay;
    }
    log_add_n(w.next_pb, w.next_pnb, w.score, num_beams);
    // num_beams <= K: every existing beam with a chance enters.
    Entry* const top = w.top;
    int32_t count = 0;
    bool unchanged = true;  // top[k] is beam k, for every beam so far
    for (int32_t b = 0; b < num_beams; ++b) {
      const double score = w.score[b];
      if (score == kNegInfD || beam[b].len < need_len) {
        unchanged = false;
        continue;
      }
      int32_t i = count++;
      for (; score > top[i - 1].score; --i) top[i] = top[i - 1];  // top[-1]: a sentinel
      top[i] = Entry{score, b, -1};
      unchanged = unchanged && i == b;
    }
    double bar = count == K ? top[K - 1].score : kNegInfD;  // what a candidate must beat

    // 3. New prefixes, from the frame's K + 1 best classes above the bound.
    const double cut = bar - beam[0].total;
    const int32_t nf = frame_classes(row, w.class_mask, C, best_v, best, min_logp, cut, K + 1, w.frame_key,
                                     w.frame_token, w.frame_logp);
    // Beams are sorted by total and frame classes by log-prob, and a
    // candidate scores at most total + its log-prob: once that bound cannot
    // beat the K-th best, no later class or beam can either.
    const double* const frame_logp = w.frame_logp;
    const int32_t* const frame_token = w.frame_token;
    for (int32_t b = 0; b < num_beams && nf > 0; ++b) {
      const double total = beam[b].total;
      if (!(total + frame_logp[0] > bar)) break;
      const int32_t len = beam[b].len;
      if (len >= len_cap || len + 1 < need_len) continue;
      const int32_t last = beam[b].last;
      for (int32_t i = 0; i < nf; ++i) {
        const double bound = total + frame_logp[i];
        if (!(bound > bar)) break;
        const int32_t c = frame_token[i];
        const double s = c == last ? beam[b].pb + frame_logp[i] : bound;
        if (!(s > bar)) continue;  // cannot enter
        // prefix + c that is already a beam was credited in 2b: not a candidate.
        if (beam[b].has_child) {
          const int32_t existing = find_node(w, beam[b].node, c);
          if (existing >= 0 && w.node_slot[existing] >= 0) continue;
        }
        count = insert_top(top, count, K, s, b, c);
        unchanged = false;
        if (count == K) bar = top[K - 1].score;
      }
    }
    // 4. The survivors become the beam; new prefixes get their trie node.
    //    A frame that kept every beam, in order, updates them in place (the
    //    usual case of the exact search on a blank frame).
    if (unchanged) {
      for (int32_t k = 0; k < count; ++k) {
        beam[k].pb = w.next_pb[k];
        beam[k].pnb = w.next_pnb[k];
        beam[k].total = top[k].score;
      }
      pnb_live = true;
      continue;
    }
    //    node_slot maps the nodes of the current beams to their index.
    Beam* const next = w.next;
    for (int32_t b = 0; b < num_beams; ++b) w.node_slot[beam[b].node] = -1;
    for (int32_t k = 0; k < count; ++k) {
      const int32_t b = top[k].beam;
      const int32_t c = top[k].token;
      Beam& nb = next[k];
      if (c < 0) {
        nb.node = beam[b].node;
        nb.last = beam[b].last;
        nb.len = beam[b].len;
        nb.pb = w.next_pb[b];
        nb.pnb = w.next_pnb[b];
      } else {
        nb.node = child_node(w, num_nodes, beam[b].node, c);
        nb.last = c;
        nb.len = beam[b].len + 1;
        nb.pb = kNegInfD;
        nb.pnb = top[k].score;
      }
      nb.total = top[k].score;
      nb.has_child = 0;
      w.node_slot[nb.node] = k;
    }
    for (int32_t k = 0; k < count; ++k) {
      const int32_t parent = w.node_parent[next[k].node];
      next[k].parent = parent >= 0 ? w.node_slot[parent] : -1;
      if (next[k].parent >= 0) next[next[k].parent].has_child = 1;
    }
    w.next = w.beam;
    w.beam = next;
    num_beams = count;
    pnb_live = true;
    if (num_beams == 0) return r;  // the length bounds cannot be met
  }

  // 5. The top_k best, in descending order.
  for (int32_t b = 0; b < num_beams; ++b) {
    const double s = w.beam[b].total;
    if (s == kNegInfD || w.beam[b].len < o.min_len) continue;
    r.count = push_top(w, r.count, top_k, s, b, -1);
  }
  return r;
}

// Decodes one sequence; the hypotheses are read with hypothesis_node and
// node_label until the next call. w must have been through init_beam_workspace.
template <typename scalar_t>
CF_HD BeamResult beam_search_one(const Frames<scalar_t>& f, int64_t length, int64_t C, int64_t blank,
                                 const BeamOptions& o, BeamWorkspace& w, int32_t top_k) {
  int32_t num_nodes = 1;
  const BeamResult r = beam_search_run(f, length, C, blank, o, w, top_k, num_nodes);
  for (int32_t node = 1; node < num_nodes; ++node) w.table[w.node_entry[node]] = -1;  // leave the table empty
  return r;
}

// ---------------------------------------------------------------------------
// The top-label certificate (top_k = 1): when a label provably outscores
// every other label in the search, the search's answer is known without
// searching.
//
// Notation. π is the greedy path (argmax per frame), p_t(c) the frame
// probabilities, Z_t = Σ_c p_t(c) (1 for normalised log-probs),
// Z_{1:t} = Π_{t' <= t} Z_t', Z = Z_{1:T}, P(ℓ) a label's probability (the
// sum over its alignments). The prefix beam search of width K scores a prefix
// at frame t by the paths of frames 1..t that collapse to it and run through
// prefixes it kept; distinct prefixes sum disjoint sets of paths, so the
// candidates of one frame score at most Z_{1:t} together, and a label's final
// score is at most P(ℓ).
//
// The chain of a label ℓ = ℓ_1..ℓ_L. g_t(j), a lower bound of the search's
// score for ℓ's prefix ℓ_{1:j} at frame t, is the CTC forward recursion over
// ℓ's prefixes (the search's own: pb, pnb) run only through prefixes in
// G_{t-1}, where G_t = { j : g_t(j) > Z_{1:t} / (K + 1) }, G_0 = {0} (the
// empty prefix), and S(ℓ) = g_T(L) (0 once some G_t is empty).
// Lemma. The search keeps every prefix of G_t at every frame t, and scores ℓ
// at least S(ℓ). Induction on t: if it kept G_{t'} for t' < t, its candidate
// for ℓ_{1:j}, j in G_t, counts every path g_t(j) counts, so it scores
// s >= g_t(j) > Z_{1:t} / (K + 1); the other candidates sum to at most
// Z_{1:t} - s, so fewer than (Z_{1:t} - s) / s < K of them score s or more:
// it is among the K kept, even when ties go against it.
//
// Claim. Let R be a set of labels holding ℓ (the rivals: the greedy label and
// the labels of paths that differ from π in one frame, at the frames where
// π's class is least sure), and ℓ meet the options' constraints (min/max
// length, allowed classes). If
//     S(ℓ) > P(r) for every other r in R,  and  S(ℓ) > Z - Σ_{r in R} P(r),  (1)
// then the exact prefix beam search (no pruning options) of width K returns ℓ
// as its best hypothesis, and ℓ is the most probable label.
// Proof. The search scores ℓ at least S(ℓ) (lemma), a rival r at most
// P(r) < S(ℓ), and any label outside R at most its probability, at most
// Z - Σ_R P(r) < S(ℓ). The same bounds order the probabilities, as
// P(ℓ) >= S(ℓ). Constraints: max_length and allowed never drop a prefix of ℓ
// when ℓ meets them; min_length drops a prefix that cannot reach it in the
// frames left, and the chain drops the same prefixes (they cannot reach L
// either); rivals need not meet them (their bounds hold either way).
// With R = {ℓ} and K = 1, (1) is the greedy path holding more than half of Z;
// rivals certify a sequence whose doubt sits in a frame or two (two labels
// sharing nearly all the mass), where no label holds half of it. On the
// shipped model's outputs about 94-97% of sequences certify (the greedy path
// alone: 64-71%). The chain holds only what the search provably keeps: a label
// with P(ℓ) > Z / 2 whose mass a narrow beam drops is left to the search
// (tests/test_ops.py has such inputs), so the answer is always the search's own.
//
// As computed: a search score drifts from its exact value by less than
// ~1e-6 per frame (two log-adds of error < 5e-7 each on any chain, and a
// log-add is never below its larger argument, so no kept term is lost), and
// the recursions here by less than ~3e-7 per frame (exp_nonpositive, and terms
// below e^-30 of a frame's best dropped); every test is made with a margin of
// kCertSlackPerFrame per frame, several times that, so the claim holds for
// the search as implemented. Each Z_t is bounded from above
// (frame_mass_bound, within 1e-5 of its value), so the tests can only err
// towards searching, and sequences whose Z_{1:t} / Π max_t p_t passes 1e200
// (hundreds of flat frames) are searched.
//
// The score returned for ℓ is log P(ℓ) over ALL its alignments (the CTC
// forward algorithm): what the search returns for ℓ when its beam keeps every
// alignment of ℓ, and never less than what it returns otherwise.
// top_k > 1 searches: (1) says nothing about the second-best label.
constexpr double kCertSlackPerFrame = 4e-6;

// The tests' margin: at least exp(kCertSlackPerFrame * length + 1e-9), without a libm call where
// that exponent x is at most 1 (e^x <= 1 + x + x^2 there: Σ_{k>=2} x^k / k! <= x^2 (e - 2)).
CF_HOT double cert_margin(int64_t length) {
  const double x = kCertSlackPerFrame * static_cast<double>(length) + 1e-9;
  return x <= 1.0 ? 1.0 + x + x * x : exp(x);
}

// A frame probability relative to the frame's best (x = row[c] - max <= 0), e^-30 and below
// dropped: what the certificate's sums and recursions use. Every kernel computes it bit for bit
// alike (exp_rel4 and the AVX2 kernel's eight lanes make the same float operations in the same
// order; no FMA contraction, csrc/cpu's fp-contract=off and nvcc's --fmad=false), so certified
// scores agree across CPU paths and devices.
constexpr double kNegligible = 1e-13;  // masses below it (relative to the greedy path's) are dropped
CF_HOT float exp_rel_float(float x) { return x < -30.f ? 0.f : exp_nonpositive(x); }
CF_HOT double exp_rel(float x) { return static_cast<double>(exp_rel_float(x)); }

#ifdef CF_SSE2
// exp_rel_float in four lanes, bit for bit.
inline __m128 exp_rel4(__m128 x) {
  const __m128 kept = _mm_cmpge_ps(x, _mm_set1_ps(-30.f));  // false for x < -30, -inf
  return _mm_and_ps(exp_nonpositive4(x), kept);
}
#endif

// An upper bound of Σ_c exp(row[c] - m), m the row's (finite) maximum: the sum of exp_rel
// (relative error < 3e-7 each; float partial sums of at most 16 terms a lane, < 1e-6), times
// 1 + 1e-5, plus C e^-30 for the terms exp_rel drops.
CF_HOT double frame_mass_bound(const float* row, int64_t C, float m) {
  double sum = 0.0;
  int64_t c = 0;
#ifdef CF_SSE2
  const __m128 m4 = _mm_set1_ps(m);
  while (c + 4 <= C) {
    __m128 part = _mm_setzero_ps();
    for (int i = 0; i < 16 && c + 4 <= C; ++i, c += 4) part = _mm_add_ps(part, exp_rel4(_mm_sub_ps(_mm_loadu_ps(row + c), m4)));
    sum += static_cast<double>(cf_hsum(part));
  }
#endif
  for (; c < C; ++c) sum += exp_rel(row[c] - m);
  return sum * (1.0 + 1e-5) + static_cast<double>(C) * 1e-13;
}

// The largest row[c] over c != best (-inf if none): how close a frame's runner-up comes.
CF_HOT float second_max(const float* row, int64_t C, int64_t best) {
  float m = kNegInf;
  for (int64_t c = 0; c < C; ++c) {
    const float v = c == best ? kNegInf : row[c];
    m = v > m ? v : m;
  }
  return m;
}

// The first c != best with row[c] == value (second_max's class).
CF_HOT int64_t second_class(const float* row, int64_t C, int64_t best, float value) {
  for (int64_t c = 0; c < C; ++c) {
    if (c != best && row[c] == value) return c;
  }
  return best;  // unreachable for second_max's value
}

// One frame's facts for the certificate: its maximum, the first class holding
// it, the largest value among the other classes (the maximum again on a tie),
// and an upper bound of Σ_c exp(row[c] - max) (frame_mass_bound); bad: NaN or
// +inf in the row (then nothing else is set).
struct FrameStats {
  float max;
  float second;
  int64_t best;
  double z;
  bool bad;
};

CF_HD void frame_stats_generic(const float* row, int64_t C, FrameStats* s) {
  s->max = scan_max(row, nullptr, C, &s->bad);
  if (s->bad || !(s->max > kNegInf)) return;
  s->best = row[0] == s->max ? 0 : find_at_least(row, nullptr, 1, C, s->max);
  s->second = second_max(row, C, s->best);
  s->z = frame_mass_bound(row, C, s->max);
}


// One step of the CTC forward recursion over a label's prefixes [lo, hi]
// (masses pb/pnb, 0 outside), frame probabilities relative to the frame's
// best: the prefix beam search's own recursion (pb, pnb) restricted to them.
// e[j - 1] is prefix j's last token's probability; the band may grow by one.
CF_HOT int32_t label_forward_step(double* pb, double* pnb, int32_t lo, int32_t hi, int32_t L, const int32_t* label,
                                  const double* e, double e_blank) {
  const int32_t top = hi < L ? hi + 1 : hi;
  for (int32_t j = top; j >= (lo > 0 ? lo : 1); --j) {  // descending: j - 1 still holds the previous frame
    const int32_t c = label[j - 1];
    const bool old = j <= hi;
    double from = 0.0;  // prefix j - 1 extended by c (a repeat needs the blank in between)
    if (j - 1 >= lo) from = (j >= 2 && label[j - 2] == c) ? pb[j - 1] : pb[j - 1] + pnb[j - 1];
    const double stay = old ? pnb[j] : 0.0;
    pb[j] = old ? (pb[j] + pnb[j]) * e_blank : 0.0;
    pnb[j] = (stay + from) * e[j - 1];
  }
  if (lo == 0) pb[0] *= e_blank;  // pnb[0] stays 0
  return top;
}

// P(ℓ) and, with chain, S(ℓ) of the certificate above, both relative to
// Π_t max_t (the greedy path weighs exactly 1, so P(ℓ) stays below 1e200 with
// z and masses below kNegligible can be dropped: the prefixes at either end of
// the full recursion's band that hold less). Needs w.frame_max and w.frame_z
// (Z_{1:t} / Π max, an upper bound) from certify_top_label's first pass.
template <typename scalar_t>
CF_HD void label_mass(const Frames<scalar_t>& f, int64_t length, int64_t C, int64_t blank, const BeamOptions& o,
                      BeamWorkspace& w, const int32_t* label, int32_t L, bool chain, double* full, double* kept) {
  double* fpb = w.label_pb;  // the full recursion, band [flo, fhi]
  double* fpnb = w.label_pnb;
  double* pb = w.chain_pb;   // the chain, band [lo, hi] (lo > hi: G_t was empty)
  double* pnb = w.chain_pnb;
  double* e = w.label_e;     // this frame's probability of each label token
  fpb[0] = pb[0] = 1.0;
  fpnb[0] = pnb[0] = 0.0;
  int32_t flo = 0, fhi = 0, lo = 0, hi = chain ? 0 : -1;
  const double keep_share = 1.0 / (static_cast<double>(o.beam_width) + 1.0);
  const double slack_step = exp(kCertSlackPerFrame);
  double margin = 1.0;  // exp(kCertSlackPerFrame * frames so far)
  for (int64_t t = 0; t < length; ++t) {
    margin *= slack_step;
    const int32_t top = fhi > hi ? fhi : hi;
    const int32_t j1 = top < L ? top + 1 : L;
    double e_blank;
    if (w.frame_exp != nullptr) {  // kept by the first pass
      const float* ex = w.frame_exp + t * C;
      e_blank = ex[blank];
      for (int32_t j = flo < 1 ? 1 : flo; j <= j1; ++j) e[j - 1] = ex[label[j - 1]];
    } else {
      const float* row = frame_row(f, t, C, w.row_buf);
      const float m = w.frame_max[t];
      e_blank = exp_rel(row[blank] - m);
      for (int32_t j = flo < 1 ? 1 : flo; j <= j1; ++j) e[j - 1] = exp_rel(row[label[j - 1]] - m);
    }
    const int32_t ftop = label_forward_step(fpb, fpnb, flo, fhi, L, label, e, e_blank);
    if (!(ftop > fhi && ftop < L && fpb[ftop] + fpnb[ftop] < kNegligible)) fhi = ftop;  // a new prefix holding ~0: not yet
    while (flo < fhi && fpb[flo] + fpnb[flo] < kNegligible) ++flo;
    if (lo > hi) continue;  // no chain (asked for none, or broken)
    hi = label_forward_step(pb, pnb, lo, hi, L, label, e, e_blank);
    // G_t: prefixes the search provably keeps; a prefix that cannot reach min_len (or ℓ) in the frames
    // left is one the search may drop, and the chain drops it too.
    const double bar = w.frame_z[t] * keep_share * margin;
    const int64_t need = static_cast<int64_t>(o.min_len > L ? o.min_len : L) - (length - t - 1);
    for (int32_t j = lo; j <= hi; ++j) {
      if (!(pb[j] + pnb[j] > bar) || j < need) pb[j] = pnb[j] = 0.0;
    }
    while (lo <= hi && pb[lo] + pnb[lo] == 0.0) ++lo;
    while (hi >= lo && pb[hi] + pnb[hi] == 0.0) --hi;
  }
  *full = fpb[L] + fpnb[L];
  if (kept != nullptr) *kept = (lo <= hi && hi == L) ? pb[L] + pnb[L] : 0.0;
}

// The label of path π with frame t's class replaced by cls (the rivals' labels).
CF_HOT int32_t flipped_label(const int32_t* path, int64_t length, int64_t blank, int64_t t_flip, int32_t cls,
                             int32_t* label) {
  int32_t L = 0;
  int64_t prev = -1;
  for (int64_t t = 0; t < length; ++t) {
    const int64_t c = t == t_flip ? cls : path[t];
    if (c != blank && c != prev) label[L++] = static_cast<int32_t>(c);
    prev = c;
  }
  return L;
}

CF_HOT bool same_label(const int32_t* a, int32_t La, const int32_t* b, int32_t Lb) {
  if (La != Lb) return false;
  for (int32_t j = 0; j < La; ++j) {
    if (a[j] != b[j]) return false;
  }
  return true;
}

// The label the certificate above proves the search's top-1, if it does:
// writes it to label (at most max_out tokens), its length, and log P(ℓ) over
// all its alignments to *log_prob, and returns true. Bad values (NaN, +inf)
// return false: the search then reports them. A first pass takes the greedy
// path (each frame's best into w.frame_max, its class into w.frame_best), the
// Z_{1:t} bounds and the kCertRivals frames whose second-best class comes
// closest to the best; then (1) with R = {the greedy label}; then, if that
// fails, with the labels of those frames flipped to their second-best class
// as rivals, for the most probable of R.
template <typename scalar_t>
CF_HD bool certify_top_label(const Frames<scalar_t>& f, int64_t length, int64_t C, int64_t blank,
                             const BeamOptions& o, BeamWorkspace& w, int64_t max_out, int32_t* label,
                             int32_t* label_len, double* log_prob) {
  if (length < o.min_len) return false;
  const int64_t span = prefetch_span(f, C);
  double path = 0.0, z = 1.0;
  int32_t L = 0;
  int64_t prev = -1;
  int64_t doubt_t[kCertRivals];  // the frames whose second-best class is closest, closest first
  float doubt_gap[kCertRivals];  // second best - best (<= 0)
  float doubt_second[kCertRivals];  // the second best itself (m + gap need not round back to it)
  int n_doubt = 0;
  for (int64_t t = 0; t < length; ++t) {
    if (t + kPrefetch < length && span >= 0) prefetch_frame(f, t + kPrefetch, span);
    const float* row = frame_row(f, t, C, w.row_buf);
    FrameStats st{};
#if defined(__CUDA_ARCH__)
    frame_stats_generic(row, C, &st);
#else
    if (w.frame_stats != nullptr) {
      w.frame_stats(row, C, &st, w.frame_exp == nullptr ? nullptr : w.frame_exp + t * C);
    } else {
      frame_stats_generic(row, C, &st);
    }
#endif
    if (st.bad || !(st.max > kNegInf)) return false;
    const float m = st.max;
    const int64_t best = st.best;
    path += m;
    if (best != blank && best != prev) {
      if (w.class_mask[best] != 0.f || L >= max_out) return false;  // not allowed, or past max_length
      label[L++] = static_cast<int32_t>(best);
    }
    prev = best;
    w.frame_max[t] = m;
    w.frame_best[t] = static_cast<int32_t>(best);
    z *= st.z;
    if (!(z < 1e200)) return false;
    w.frame_z[t] = z;
    // A frame whose second-best class holds at most e^-20 of the best raises no rival worth its forward pass.
    const float gap = st.second - m;
    if (gap > -20.f && (n_doubt < kCertRivals || gap > doubt_gap[n_doubt - 1])) {
      int i = n_doubt < kCertRivals ? n_doubt++ : kCertRivals - 1;
      for (; i > 0 && doubt_gap[i - 1] < gap; --i) {
        doubt_gap[i] = doubt_gap[i - 1];
        doubt_second[i] = doubt_second[i - 1];
        doubt_t[i] = doubt_t[i - 1];
      }
      doubt_gap[i] = gap;
      doubt_second[i] = st.second;
      doubt_t[i] = t;
    }
  }
  if (L < o.min_len) return false;
  // Bounds compared with a margin: lower bounds divided by it, upper bounds multiplied.
  const double margin = cert_margin(length);
  // What a rival's P loses to dropped terms (a frame probability below e^-30 of the frame's best, a
  // band edge below kNegligible: each frame drops under 4e-13 z of the mass that follows): a slack
  // on the rivals' upper bounds that grows with the frames.
  const double floor_slack = 1e-12 * static_cast<double>(length + 1) * z;
  // The greedy path alone above half (it weighs 1 here): each prefix of its label then holds more than half
  // at every frame, so the chain keeps all of them and S(ℓ) >= P(π) > Z / 2 >= Z - P(ℓ): (1) holds, R = {ℓ}.
  const bool path_holds = 2.0 / margin > z * margin;
  double p_greedy, s_greedy = 1.0;
  label_mass(f, length, C, blank, o, w, label, L, !path_holds, &p_greedy, path_holds ? nullptr : &s_greedy);
  if (path_holds || s_greedy / margin > z * margin - p_greedy / margin) {  // R = {ℓ}: all else holds less than ℓ keeps
    *label_len = L;
    *log_prob = path + log(p_greedy);
    return true;
  }
  // Rivals: the greedy label (index 0 of w.rival_label) and up to kCertRivals flips, distinct.
  int32_t* const rival = w.rival_label;  // [kCertRivals + 1][length + 1]
  const int64_t stride = length + 1;
  int32_t rival_len[kCertRivals + 1];
  double rival_p[kCertRivals + 1];
  for (int32_t j = 0; j < L; ++j) rival[j] = label[j];
  rival_len[0] = L;
  rival_p[0] = p_greedy;
  int n_rivals = 1;
  for (int i = 0; i < n_doubt; ++i) {
    const int64_t t = doubt_t[i];
    const float* row = frame_row(f, t, C, w.row_buf);
    const int32_t cls = static_cast<int32_t>(second_class(row, C, w.frame_best[t], doubt_second[i]));
    int32_t* const r = rival + n_rivals * stride;
    const int32_t len = flipped_label(w.frame_best, length, blank, t, cls, r);
    bool seen = false;
    for (int k = 0; k < n_rivals && !seen; ++k) seen = same_label(r, len, rival + k * stride, rival_len[k]);
    if (seen) continue;
    rival_len[n_rivals] = len;
    label_mass(f, length, C, blank, o, w, r, len, false, &rival_p[n_rivals], nullptr);
    ++n_rivals;
  }
  int win = 0;
  double total = 0.0;
  for (int k = 0; k < n_rivals; ++k) {
    total += rival_p[k];
    if (rival_p[k] > rival_p[win]) win = k;
  }
  const int32_t* const best_label = rival + win * stride;
  const int32_t best_len = rival_len[win];
  if (win != 0) {  // a flip wins: it must meet the constraints itself
    if (best_len < o.min_len || best_len > max_out) return false;
    for (int32_t j = 0; j < best_len; ++j) {
      if (w.class_mask[best_label[j]] != 0.f) return false;
    }
  }
  double p_best = rival_p[0], s_best = s_greedy;
  if (win != 0) label_mass(f, length, C, blank, o, w, best_label, best_len, true, &p_best, &s_best);
  double rival_max = 0.0;
  for (int k = 0; k < n_rivals; ++k) {
    if (k != win && rival_p[k] > rival_max) rival_max = rival_p[k];
  }
  const double lower = s_best / margin;
  if (!(lower > rival_max * margin + floor_slack && lower > z * margin - total / margin + floor_slack)) return false;
  for (int32_t j = 0; j < best_len; ++j) label[j] = best_label[j];
  *label_len = best_len;
  *log_prob = path + log(p_best);
  return true;
}

// The path test alone, for callers that read only the label (BeamOptions::scores false): the
// certificate's case R = {ℓ} with a lower bound B of P(ℓ) above half of Z, decided from one pass
// over the frames without an exp. The certificate computes each frame's probabilities because its
// forward passes and its scores need them; this test needs only an upper bound of
// Z_t = Σ_c exp(row[c] - max), which exp_upper gives from the float's bits, and B: the greedy
// path π and the paths that differ from it by flips at non-adjacent frames (below), so
// B = P(π) Π_{s in F} (1 + Σ_{a in A_s} p_s(a) / p_s(π_s)), F the best set of non-adjacent flip
// frames (a dynamic programme over the frames), A_s the classes a flip may put at s.
//
// The flips, at a frame s with neighbours π_{s-1} and π_{s+1}:
//  - kept prefix: a blank after a run of c becomes c (unless π_{s+1} = c); the last frame of a run
//    of c at least two frames long becomes a blank.
//  - moved prefix: the next run d starts at s (s a blank or the last frame of a run of c at least
//    two frames long, π_{s+1} = d not a blank, and π_{s-1} != d); or the first frame s of a run of
//    c at least two frames long takes its left neighbour's class (the run starts one frame later).
// Every combination of flips at non-adjacent frames collapses to ℓ, frames 1..t of it to π's
// prefix at t, but where t itself took a moved-prefix flip: to π's prefix at t + 1, or at t - 1
// (checked exhaustively for every path of up to 8 frames over two classes and the blank).
//
// Claim: B > Z / 2 (with ℓ meeting the options' constraints), where at each moved-prefix flip s
// both groups, π_s with the kept-prefix class and the moved-prefix class, hold more than
// 2 Z_s / (K + 1), makes ℓ the exact search's top-1 and the most probable label. Proof: B_{1:t},
// the paths' mass over frames 1..t, is at least B Z_{1:t} / Z (a later frame's factor, a sum of
// distinct classes' probabilities, is at most Z_t), above Z_{1:t} / 2. At a frame t that took no
// moved-prefix flip all of it sits on π's prefix; at one that did, each group holds more than
// B_{1:t-1} 2 Z_t / (K + 1) > Z_{1:t} / (K + 1), and both prefixes rejoin π's at t + 1 (t - 1 is
// not flipped). So the chain (certify_top_label) keeps every prefix these paths run through:
// S(ℓ) >= B > Z / 2 >= Z - P(ℓ), and (1) holds with R = {ℓ}. With no flip, the greedy path alone.
// Computed: each ratio p_s(a) / max_s p_s from exp_lower (a lower bound; ratios below e^-16 are
// dropped: still one), Z_s from exp_upper, the groups' test with the test's margin squared, and
// the test itself the certificate's path_holds with this margin. On the shipped model's outputs
// the path alone holds for about 70% of sequences, with the flips about 90%; the rest go on to the
// certificate and the search, unchanged.
//
// exp_upper(x) >= exp(x) for x = fl(row[c] - max) <= 0: with y = x / ln 2, the float whose bits
// are (127 + y) 2^23 is 2^⌊y⌋ (1 + f) >= 2^y, f = y - ⌊y⌋ (2^f <= 1 + f on [0, 1]), at most 6.2%
// above it ((1 + f) / 2^f peaks at 1.0615) and exact at y = 0; positive floats order as their
// bits. Computed: x clamped to >= -40 (-inf too; exp(-40) bounds every term below it), times
// kExpUpperScale (2^23 / ln 2 rounded down: a product nearer 0), truncated towards zero (upwards:
// it is negative), plus 127 2^23 and 64 units of the last place: more than the product's rounding
// (< 16 units, |x 2^23 / ln 2| < 2^29) and x's own (fl(row[c] - max) is within 40 2^-24 of the
// difference: < 29 units) together. exp_lower(x) <= exp(x) for x in (-16, 0] likewise: 2^23 / ln 2
// rounded up, 64 units below, then divided by 1.0615 (times 0.942, rounded down).
constexpr double kPathPassGiveUp = 8.0;  // see path_certifies
constexpr float kExpUpperScale = 12102203.f;             // 2^23 / ln 2 = 12102203.16
constexpr int32_t kExpUpperBias = (127 << 23) + 64;
CF_HOT float exp_upper(float x) {
  const float r = x > -40.f ? x : -40.f;
  return float_of_bits(static_cast<int32_t>(r * kExpUpperScale) + kExpUpperBias);
}
CF_HOT float exp_lower(float x) {
  return float_of_bits(static_cast<int32_t>(x * 12102204.f) + (127 << 23) - 64) * 0.942f;
}

// An upper bound of Σ_c exp(row[c] - m), m the row's (finite) maximum: exp_upper's terms in float
// partial sums of at most 16 (relative error < 1e-6), times 1 + 1e-5.
CF_HOT double frame_upper_bound(const float* row, int64_t C, float m) {
  double sum = 0.0;
  for (int64_t c = 0; c < C; c += 16) {
    float part = 0.f;
    for (int64_t i = c; i < c + 16 && i < C; ++i) part += exp_upper(row[i] - m);
    sum += static_cast<double>(part);
  }
  return sum * (1.0 + 1e-5);
}

// The path test's flips (above), fed the greedy path a frame at a time: the largest
// Π_{s in F} (1 + Σ_{A_s} p_s(a) / p_s(π_s)) over sets F of non-adjacent flip frames. A frame's
// flips are decided one frame later, once the class after it is known.
struct PathFlips {
  int64_t blank;
  double bar;                        // 2 margin^2 / (K + 1): a moved-prefix flip's groups hold more than bar Z_s
  double flipped = 1.0, kept = 1.0;  // the best product so far, the last decided frame flipped or not
  int32_t before = -1, last = -1;    // π at the frame pending and the one before it (-1: none)
  // The frame pending (the one before the current): the class of the run its kept-prefix flip
  // touches (-1: none) and that flip's ratio, the ratio of its left neighbour's class (for a run
  // that starts there), its maximum and its bound of Z_s / max_s.
  int32_t kept_run = -1;
  float kept_ratio = 0.f, start_ratio = 0.f, max = 0.f;
  double z = 1.0;

  CF_HOT static float ratio(float x) { return x > -16.f ? exp_lower(x) : 0.f; }

  // Frame t: its row, maximum m, class and bound of Z_t / m, and frame t - 1's value at that class
  // (read only for t > 0). Decides frame t - 1, then holds frame t.
  CF_HOT void push(const float* row, float m, int32_t best, double z_bound, float before_at_best) {
    if (last >= 0) decide(best, before_at_best);
    const int32_t prev = last;
    kept_run = -1;
    kept_ratio = start_ratio = 0.f;
    if (best == blank) {
      if (prev >= 0 && prev != blank) kept_run = prev;  // the run before, one frame longer
    } else if (best == prev) {
      kept_run = best;  // the run's last frame (if it is), a blank
    } else if (prev >= 0) {
      start_ratio = ratio(row[prev] - m);  // the run's first frame (if it runs on), its left neighbour's class
    }
    if (kept_run >= 0) kept_ratio = ratio(row[best == blank ? kept_run : blank] - m);
    max = m;
    z = z_bound;
    before = prev;
    last = best;
  }
  // The pending frame's flips, now that the class after it (next; -1 past the end) and the pending
  // frame's value at that class are known.
  CF_HOT void decide(int32_t next, float at_next) {
    const int32_t here = last;
    float same = 1.f;  // π's class and the kept-prefix one, relative to π's
    if (kept_run >= 0 && next != kept_run) same += kept_ratio;
    float moved = 0.f;  // the moved-prefix class
    if (next >= 0 && next != blank && next != here && next != before && (here == blank || here == before)) {
      moved = ratio(at_next - max);  // the next run starts here
    } else if (here != blank && next == here && before != here && before >= 0) {
      moved = start_ratio;  // this run starts one frame later
    }
    const double limit = bar * z;
    const double factor = moved > limit && same > limit ? static_cast<double>(same) + moved : same;
    const double flip = kept * factor;
    kept = flipped > kept ? flipped : kept;
    flipped = flip;
  }
  CF_HOT double gain() const { return flipped > kept ? flipped : kept; }
};

// The greedy label, if the path test proves it the exact search's top-1 (and the most probable
// label) and it meets the options' constraints: written to label (at most max_out tokens), its
// length to *label_len, true. False: not proven (the certificate or the search decides), or a bad
// value, which they report. The pass stops once the product of the Z_t bounds passes the limit
// times 8 times the flips' gain so far (later flips could make up for it, but almost never do).
template <typename scalar_t>
CF_HD bool path_certifies(const Frames<scalar_t>& f, int64_t length, int64_t C, int64_t blank, const BeamOptions& o,
                          BeamWorkspace& w, int64_t max_out, int32_t* label, int32_t* label_len) {
  if (length < o.min_len) return false;
  // The test: 2 B / margin > z margin, z = Π_t (an upper bound of Z_t / max_t p_t), B relative to
  // the greedy path (which weighs 1), margin as certify_top_label's.
  const double margin = cert_margin(length);
  const double limit = 2.0 / (margin * margin);
  PathFlips flips{blank, 2.0 * margin * margin / (static_cast<double>(o.beam_width) + 1.0)};
  double z = 1.0;
  int32_t* const best = w.frame_best;
#if !defined(__CUDA_ARCH__)
  if (std::is_same<scalar_t, float>::value && w.path_pass != nullptr) {
    z = w.path_pass(reinterpret_cast<const float*>(f.data), f.stride_t, length, C, limit, best, flips);
  } else
#endif
  {
    const int64_t span = prefetch_span(f, C);
    for (int64_t t = 0; t < length && z < kPathPassGiveUp * limit * flips.gain(); ++t) {
      if (t + kPrefetch < length && span >= 0) prefetch_frame(f, t + kPrefetch, span);
      const float* row = frame_row(f, t, C, w.row_buf);
      bool bad = false;
      const float m = scan_max(row, nullptr, C, &bad);
      if (bad || !(m > kNegInf)) return false;
      best[t] = static_cast<int32_t>(row[0] == m ? 0 : find_at_least(row, nullptr, 1, C, m));
      const double bound = frame_upper_bound(row, C, m);
      flips.push(row, m, best[t], bound, t > 0 ? f.at(t - 1, best[t]) : 0.f);
      z *= bound;
    }
  }
  // The last frame's flips; after giving up, the pending frame's (a factor of at most 3) cannot pass.
  flips.decide(-1, 0.f);
  const double ratio = z / flips.gain();
  if (!(ratio < limit)) return false;  // z / B; NaN too: a bad value, which the certificate or the search reports
  int32_t L = 0;
  int64_t prev = -1;
  for (int64_t t = 0; t < length; ++t) {
    const int64_t c = best[t];
    if (c != blank && c != prev) {
      if (w.class_mask[c] != 0.f || L >= max_out) return false;  // not allowed, or past max_length
      label[L++] = static_cast<int32_t>(c);
    }
    prev = c;
  }
  if (L < o.min_len) return false;
  *label_len = L;
  return true;
}

// beam_search_one into padded outputs: tokens [top_k, max_out] (-1 padded),
// lengths and float32 log-probs (0 and -inf where fewer hypotheses exist).
// With o.certify and top_k = 1, a sequence the certificate covers skips the
// search (same label; its score is log P(label) over all alignments); without
// o.scores, one the path test covers skips the certificate too (score NaN).
template <typename scalar_t>
CF_HD Status beam_search_to_tokens(const Frames<scalar_t>& f, int64_t length, int64_t C, int64_t blank,
                                   const BeamOptions& o, BeamWorkspace& w, int32_t top_k, int64_t max_out,
                                   int32_t* tokens, int32_t* lengths, float* scores) {
  int32_t len;
  double log_prob;
  if (o.certify && top_k == 1 && !o.scores && path_certifies(f, length, C, blank, o, w, max_out, tokens, &len)) {
    lengths[0] = len;
    scores[0] = NAN;  // not computed: the caller reads only the labels
    for (int64_t j = len; j < max_out; ++j) tokens[j] = -1;
    return kOk;
  }
  if (o.certify && top_k == 1 && certify_top_label(f, length, C, blank, o, w, max_out, tokens, &len, &log_prob)) {
    lengths[0] = len;
    scores[0] = static_cast<float>(log_prob);
    for (int64_t j = len; j < max_out; ++j) tokens[j] = -1;
    return kOk;
  }
  const BeamResult r = beam_search_one(f, length, C, blank, o, w, top_k);
  for (int32_t k = 0; k < top_k; ++k) {
    int32_t* const row = tokens + k * max_out;  // 64-bit offset
    int32_t len = 0;
    scores[k] = kNegInf;
    if (r.status == kOk && k < r.count) {
      len = node_label(w, hypothesis_node(w, k), row);
      scores[k] = static_cast<float>(r.base + w.top[k].score);
    }
    lengths[k] = len;
    for (int64_t j = len; j < max_out; ++j) row[j] = -1;
  }
  return r.status;
}

}  // namespace captcha_fast
