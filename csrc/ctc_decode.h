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
//    tensor) is read in place, without a copy. fp16/bf16 are widened to float;
//    all arithmetic is float32.
//  - Probabilities live in the log domain; -inf is probability 0.
//  - Invalid input (NaN or +inf log-probability) is reported through the
//    return status, never by throwing: the caller decides how to raise.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define CF_HD __host__ __device__ __forceinline__
#else
#define CF_HD inline
#endif

namespace captcha_fast {

constexpr float kNegInf = -INFINITY;

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

// NaN and +inf are not log-probabilities; -inf (probability 0) is.
CF_HD bool bad_value(float v) { return v != v || v == INFINITY; }

CF_HD float log_add(float a, float b) {
  if (a < b) { float tmp = a; a = b; b = tmp; }
  // exp(-24) is below float32 resolution relative to a's magnitude in practice;
  // the shortcut also covers b == -inf (and a == b == -inf).
  if (b - a < -24.f || b == kNegInf) return a;
  return a + log1pf(expf(b - a));
}

// ---------------------------------------------------------------------------
// Greedy (best path): argmax per frame, merge repeats, drop blanks.
// Ties go to the lowest class index, as torch.argmax does. A kernel may step
// sequences frame by frame in any interleaving (greedy_step), or decode one
// whole sequence (greedy_decode_one).

// Argmax of frame t; sets *bad on NaN/+inf. Two branch-free passes (max, then
// first index of it) vectorise better than one pass with a running index.
template <typename scalar_t>
CF_HD int64_t frame_argmax(const Frames<scalar_t>& f, int64_t t, int64_t C, float* best_v, bool* bad) {
  float m = f.at(t, 0);
  bool b = false;
  for (int64_t c = 0; c < C; ++c) {
    const float v = f.at(t, c);
    b |= bad_value(v);
    m = v > m ? v : m;
  }
  int64_t i = 0;
  while (i < C - 1 && f.at(t, i) != m) ++i;
  *best_v = m;
  *bad = *bad || b;
  return i;
}

struct GreedyState {
  int32_t len = 0;       // tokens written
  int64_t prev = -1;     // previous frame's class (-1: none yet)
  float score = 0.f;     // best path log-prob
};

CF_HD void greedy_step(GreedyState& s, int64_t best, float best_v, int64_t blank, int32_t* tokens) {
  s.score += best_v;
  if (best != blank && best != s.prev) tokens[s.len++] = static_cast<int32_t>(best);
  s.prev = best;
}

template <typename scalar_t>
CF_HD Status greedy_decode_one(const Frames<scalar_t>& f, int64_t length, int64_t C, int64_t blank,
                               int32_t* tokens, int32_t* out_len, float* score) {
  GreedyState s;
  bool bad = false;
  for (int64_t t = 0; t < length; ++t) {
    float v;
    const int64_t best = frame_argmax(f, t, C, &v, &bad);
    greedy_step(s, best, v, blank, tokens);
  }
  *out_len = s.len;
  *score = s.score;
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
// so far end in blank) and pnb (they end in the prefix's last token). Per
// frame, with p(.) the frame's probabilities:
//   same prefix   pb'  = (pb + pnb) p(blank)
//                 pnb' = pnb p(last)                  (repeat collapses)
//   prefix + c    pnb' = (pb + pnb) p(c)     if c != last
//                        pb p(c)             if c == last (needs a blank between)
// "prefix + c" may already be a beam (a child of this beam); then its mass is
// added to that beam instead of creating a candidate. The beam_width best
// prefixes by pb + pnb survive. Ties keep the earlier candidate, so results
// are deterministic.
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
struct BeamOptions {
  int32_t beam_width;
  float token_min_logp;
  float log_blank_skip;
  int32_t min_len;
  int32_t max_len;  // < 0: no limit
  const bool* allowed;
  int64_t allowed_stride;
};

// Workspace of one sequence, carved out of one byte buffer. Sizes depend only
// on (T, C, beam_width), so a kernel allocates once per thread or per batch.
struct BeamWorkspace {
  int32_t* node_parent;   // [max_nodes]
  int32_t* node_token;    // [max_nodes]
  int32_t* node_len;      // [max_nodes]
  int32_t* node_slot;     // [max_nodes] beam index of a node in the new beam, else -1
  int32_t* table;         // [table_size] (parent, token) -> node, -1 empty
  int32_t* beam_node;     // [K]
  float* beam_pb;         // [K]
  float* beam_pnb;        // [K]
  float* beam_total;      // [K] pb + pnb at the start of the frame
  int32_t* beam_parent;   // [K] beam index of the node's parent in the same beam, else -1
  int32_t* child_head;    // [K] first beam whose parent is this beam, else -1
  int32_t* child_next;    // [K] next sibling in that list
  float* next_pb;         // [K] existing beams after this frame
  float* next_pnb;        // [K]
  int32_t* new_node;      // [K] the beam being built
  float* new_pb;          // [K]
  float* new_pnb;         // [K]
  int32_t* cand_beam;     // [K * C] source beam of a new-prefix candidate
  int32_t* cand_token;    // [K * C]
  float* cand_score;      // [K * C]
  int32_t* top;           // [K] selected candidate ids (ids < K are existing beams)
  float* top_score;       // [K]
  int32_t* frame_tokens;  // [C] characters extended at this frame
  float* frame_logp;      // [C]
  bool* frame_has;        // [C] is c in frame_tokens
  bool* child_mark;       // [C] is prefix + c already a beam (for one beam at a time)
  int32_t max_nodes;
  int32_t table_size;
};

CF_HD int64_t align16(int64_t x) { return (x + 15) & ~int64_t(15); }

CF_HD int32_t table_size_for(int32_t max_nodes) {
  int32_t s = 16;
  while (s < 2 * max_nodes) s <<= 1;
  return s;
}

CF_HD int64_t beam_workspace_bytes(int64_t T, int64_t C, int64_t K) {
  const int64_t nodes = 1 + T * K;
  const int64_t table = table_size_for(static_cast<int32_t>(nodes));
  int64_t b = 0;
  b += 4 * align16(nodes * 4);
  b += align16(table * 4);
  b += 14 * align16(K * 4);
  b += 3 * align16(K * C * 4);
  b += 2 * align16(C * 4) + 2 * align16(C);
  return b;
}

CF_HD BeamWorkspace carve_beam_workspace(char* base, int64_t T, int64_t C, int64_t K) {
  BeamWorkspace w;
  w.max_nodes = static_cast<int32_t>(1 + T * K);
  w.table_size = table_size_for(w.max_nodes);
  char* p = base;
  auto take = [&p](int64_t bytes) { char* q = p; p += align16(bytes); return q; };
  w.node_parent = reinterpret_cast<int32_t*>(take(w.max_nodes * 4));
  w.node_token = reinterpret_cast<int32_t*>(take(w.max_nodes * 4));
  w.node_len = reinterpret_cast<int32_t*>(take(w.max_nodes * 4));
  w.node_slot = reinterpret_cast<int32_t*>(take(w.max_nodes * 4));
  w.table = reinterpret_cast<int32_t*>(take(int64_t(w.table_size) * 4));
  w.beam_node = reinterpret_cast<int32_t*>(take(K * 4));
  w.beam_pb = reinterpret_cast<float*>(take(K * 4));
  w.beam_pnb = reinterpret_cast<float*>(take(K * 4));
  w.beam_total = reinterpret_cast<float*>(take(K * 4));
  w.beam_parent = reinterpret_cast<int32_t*>(take(K * 4));
  w.child_head = reinterpret_cast<int32_t*>(take(K * 4));
  w.child_next = reinterpret_cast<int32_t*>(take(K * 4));
  w.next_pb = reinterpret_cast<float*>(take(K * 4));
  w.next_pnb = reinterpret_cast<float*>(take(K * 4));
  w.new_node = reinterpret_cast<int32_t*>(take(K * 4));
  w.new_pb = reinterpret_cast<float*>(take(K * 4));
  w.new_pnb = reinterpret_cast<float*>(take(K * 4));
  w.top = reinterpret_cast<int32_t*>(take(K * 4));
  w.top_score = reinterpret_cast<float*>(take(K * 4));
  w.cand_beam = reinterpret_cast<int32_t*>(take(K * C * 4));
  w.cand_token = reinterpret_cast<int32_t*>(take(K * C * 4));
  w.cand_score = reinterpret_cast<float*>(take(K * C * 4));
  w.frame_tokens = reinterpret_cast<int32_t*>(take(C * 4));
  w.frame_logp = reinterpret_cast<float*>(take(C * 4));
  w.frame_has = reinterpret_cast<bool*>(take(C));
  w.child_mark = reinterpret_cast<bool*>(take(C));
  return w;
}

// The node for prefix(parent) + token, created if it does not exist yet.
CF_HD int32_t child_node(BeamWorkspace& w, int32_t& num_nodes, int32_t parent, int32_t token) {
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
      w.table[i] = node;
      return node;
    }
    if (w.node_parent[id] == parent && w.node_token[id] == token) return id;
  }
}

// Keeps the K best (score, id) pairs in descending order; a tie keeps the
// earlier one. Returns the new count.
CF_HD int32_t push_top(int32_t* top, float* top_score, int32_t count, int32_t K, int32_t id, float score) {
  if (count == K && !(score > top_score[K - 1])) return count;
  int32_t i = count < K ? count++ : K - 1;
  while (i > 0 && score > top_score[i - 1]) {
    top[i] = top[i - 1];
    top_score[i] = top_score[i - 1];
    --i;
  }
  top[i] = id;
  top_score[i] = score;
  return count;
}

// Decodes one sequence. Writes the top_k best labels into tokens
// [top_k, max_out] (padded with -1), their lengths and log-probabilities
// (padded with 0 and -inf when fewer hypotheses exist).
template <typename scalar_t>
CF_HD Status beam_search_one(const Frames<scalar_t>& f, int64_t length, int64_t C, int64_t blank,
                             const BeamOptions& o, BeamWorkspace& w, int32_t top_k, int32_t max_out,
                             int32_t* tokens, int32_t* lengths, float* scores) {
  const int32_t K = o.beam_width;
  for (int32_t i = 0; i < w.table_size; ++i) w.table[i] = -1;
  for (int32_t k = 0; k < top_k; ++k) {
    lengths[k] = 0;
    scores[k] = kNegInf;
    for (int32_t j = 0; j < max_out; ++j) tokens[k * max_out + j] = -1;
  }
  if (length < o.min_len) return kOk;  // no label of min_len fits: no hypothesis

  int32_t num_nodes = 1;
  w.node_parent[0] = -1;
  w.node_token[0] = -1;
  w.node_len[0] = 0;
  w.node_slot[0] = -1;
  int32_t num_beams = 1;
  w.beam_node[0] = 0;
  w.beam_pb[0] = 0.f;
  w.beam_pnb[0] = kNegInf;
  w.beam_parent[0] = -1;
  for (int64_t c = 0; c < C; ++c) w.frame_has[c] = w.child_mark[c] = false;

  for (int64_t t = 0; t < length; ++t) {
    // 1. This frame's characters: validate, and pick those worth extending.
    const float lp_blank = f.at(t, blank);
    if (bad_value(lp_blank)) return kBadValue;
    int32_t nf = 0;
    int64_t best = -1;
    float best_v = kNegInf;
    for (int64_t c = 0; c < C; ++c) {
      const float v = f.at(t, c);
      if (bad_value(v)) return kBadValue;
      if (c == blank || (o.allowed != nullptr && !o.allowed[c * o.allowed_stride])) continue;
      if (v > best_v || best < 0) { best_v = v; best = c; }
      if (v >= o.token_min_logp && v > kNegInf) {
        // Insertion keeps frame tokens sorted by log-prob, descending; equal
        // values stay in class order, so tie-breaking is that of class order.
        int32_t i = nf++;
        for (; i > 0 && v > w.frame_logp[i - 1]; --i) {
          w.frame_tokens[i] = w.frame_tokens[i - 1];
          w.frame_logp[i] = w.frame_logp[i - 1];
        }
        w.frame_tokens[i] = static_cast<int32_t>(c);
        w.frame_logp[i] = v;
      }
    }
    if (best >= 0 && best_v > kNegInf && best_v < o.token_min_logp) {  // the best always extends (alone: nothing passed)
      w.frame_tokens[nf] = static_cast<int32_t>(best);
      w.frame_logp[nf++] = best_v;
    }
    const int64_t frames_left = length - t - 1;

    if (lp_blank >= o.log_blank_skip) {
      // 2a. A (nearly) certain blank: everything moves to "ends in blank".
      for (int32_t b = 0; b < num_beams; ++b) {
        w.beam_pb[b] = log_add(w.beam_pb[b], w.beam_pnb[b]) + lp_blank;
        w.beam_pnb[b] = kNegInf;
      }
      continue;
    }
    for (int32_t i = 0; i < nf; ++i) w.frame_has[w.frame_tokens[i]] = true;

    // 2b. Existing prefixes: stay by blank or by repeating the last token,
    //     plus the extension of their parent beam that lands on them.
    for (int32_t b = 0; b < num_beams; ++b) {
      const int32_t last = w.node_token[w.beam_node[b]];
      w.beam_total[b] = log_add(w.beam_pb[b], w.beam_pnb[b]);
      w.next_pb[b] = w.beam_total[b] + lp_blank;
      w.next_pnb[b] = last >= 0 ? w.beam_pnb[b] + f.at(t, last) : kNegInf;
    }
    for (int32_t b = 0; b < num_beams; ++b) {
      const int32_t p = w.beam_parent[b];
      const int32_t c = w.node_token[w.beam_node[b]];
      if (p < 0 || !w.frame_has[c]) continue;
      const float lp = f.at(t, c);
      const bool repeat = w.node_token[w.beam_node[p]] == c;
      const float ext = (repeat ? w.beam_pb[p] : w.beam_total[p]) + lp;
      w.next_pnb[b] = log_add(w.next_pnb[b], ext);
    }

    // 3. Select: existing beams (ids 0..num_beams-1) then new prefixes.
    int32_t count = 0;
    for (int32_t b = 0; b < num_beams; ++b) {
      const float s = log_add(w.next_pb[b], w.next_pnb[b]);
      if (s == kNegInf || w.node_len[w.beam_node[b]] + frames_left < o.min_len) continue;
      count = push_top(w.top, w.top_score, count, K, b, s);
    }
    for (int32_t b = 0; b < num_beams; ++b) w.child_head[b] = -1;
    for (int32_t j = 0; j < num_beams; ++j) {
      const int32_t p = w.beam_parent[j];
      if (p >= 0) { w.child_next[j] = w.child_head[p]; w.child_head[p] = j; }
    }
    // Beams are sorted by beam_total (descending) and frame tokens by log-prob,
    // and a candidate scores at most beam_total + its log-prob: once that
    // bound cannot beat the K-th best, no later token or beam can either.
    int32_t nc = 0;
    for (int32_t b = 0; b < num_beams && nf > 0; ++b) {
      if (count == K && !(w.beam_total[b] + w.frame_logp[0] > w.top_score[K - 1])) break;
      const int32_t node = w.beam_node[b];
      const int32_t len = w.node_len[node];
      if ((o.max_len >= 0 && len >= o.max_len) || len + 1 + frames_left < o.min_len) continue;
      // prefix + c that is already a beam was credited in 2b: not a candidate.
      for (int32_t j = w.child_head[b]; j >= 0; j = w.child_next[j]) w.child_mark[w.node_token[w.beam_node[j]]] = true;
      const int32_t last = w.node_token[node];
      for (int32_t i = 0; i < nf; ++i) {
        if (count == K && !(w.beam_total[b] + w.frame_logp[i] > w.top_score[K - 1])) break;
        const int32_t c = w.frame_tokens[i];
        if (w.child_mark[c]) continue;
        const float s = (c == last ? w.beam_pb[b] : w.beam_total[b]) + w.frame_logp[i];
        if (s == kNegInf || (count == K && !(s > w.top_score[K - 1]))) continue;  // cannot enter
        w.cand_beam[nc] = b;
        w.cand_token[nc] = c;
        w.cand_score[nc] = s;
        count = push_top(w.top, w.top_score, count, K, num_beams + nc, s);
        ++nc;
      }
      for (int32_t j = w.child_head[b]; j >= 0; j = w.child_next[j]) w.child_mark[w.node_token[w.beam_node[j]]] = false;
    }
    for (int32_t i = 0; i < nf; ++i) w.frame_has[w.frame_tokens[i]] = false;

    // 4. The survivors become the beam; new prefixes get their trie node.
    for (int32_t k = 0; k < count; ++k) {
      const int32_t id = w.top[k];
      if (id < num_beams) {
        w.new_node[k] = w.beam_node[id];
        w.new_pb[k] = w.next_pb[id];
        w.new_pnb[k] = w.next_pnb[id];
      } else {
        const int32_t j = id - num_beams;
        w.new_node[k] = child_node(w, num_nodes, w.beam_node[w.cand_beam[j]], w.cand_token[j]);
        w.new_pb[k] = kNegInf;
        w.new_pnb[k] = w.cand_score[j];
      }
    }
    num_beams = count;
    for (int32_t k = 0; k < count; ++k) {
      w.beam_node[k] = w.new_node[k];
      w.beam_pb[k] = w.new_pb[k];
      w.beam_pnb[k] = w.new_pnb[k];
      w.node_slot[w.beam_node[k]] = k;
    }
    for (int32_t k = 0; k < count; ++k) {
      const int32_t parent = w.node_parent[w.beam_node[k]];
      w.beam_parent[k] = parent >= 0 ? w.node_slot[parent] : -1;
    }
    for (int32_t k = 0; k < count; ++k) w.node_slot[w.beam_node[k]] = -1;
    if (num_beams == 0) return kOk;  // the length bounds cannot be met
  }

  // 5. Final scores and the top_k best, in descending order.
  int32_t count = 0;
  for (int32_t b = 0; b < num_beams; ++b) {
    const float s = log_add(w.beam_pb[b], w.beam_pnb[b]);
    if (s == kNegInf || w.node_len[w.beam_node[b]] < o.min_len) continue;
    count = push_top(w.top, w.top_score, count, top_k, b, s);
  }
  for (int32_t k = 0; k < count; ++k) {
    int32_t node = w.beam_node[w.top[k]];
    const int32_t len = w.node_len[node];
    lengths[k] = len;
    scores[k] = w.top_score[k];
    for (int32_t j = len - 1; j >= 0; --j, node = w.node_parent[node]) tokens[k * max_out + j] = w.node_token[node];
  }
  return kOk;
}

}  // namespace captcha_fast
