// The op schemas (the one place they are defined) and the shared checks.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <c10/util/safe_numerics.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "ops.h"

namespace captcha_fast {

void check_lengths_in_range(const at::Tensor& lengths, int64_t T, const char* op, const char* name) {
  const at::Tensor lens = lengths.to(at::kLong).contiguous();
  const int64_t* len = lens.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < lens.numel(); ++i) {
    TORCH_CHECK(len[i] >= 0 && len[i] <= T, op, ": ", name, "[", i, "] = ", len[i],
                " is outside [0, T] with T = ", T, " frames");
  }
}

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
  TORCH_CHECK(T < (int64_t(1) << 30) && C < (int64_t(1) << 30), op, ": T and C must be below 2^30, got T = ", T,
              " frames and C = ", C, " classes");
  return {T, N, C};
}

void check_token_output(int64_t N, int64_t per_sequence, int64_t L, const char* op) {
  int64_t count = 0, bytes = 0;
  const bool overflows = c10::mul_overflows(N, per_sequence, &count) || c10::mul_overflows(count, L, &count) ||
                         c10::mul_overflows(count, int64_t(sizeof(int32_t)), &bytes);
  TORCH_CHECK(!overflows, op, ": the token output (N = ", N, " sequences x ", per_sequence, " x ", L,
              " int32 values) is larger than 2^63 bytes; decode fewer sequences at once");
}

namespace {

std::string gib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f GiB", static_cast<double>(bytes) / double(int64_t(1) << 30));
  return text;
}

}  // namespace

void check_beam_workspace(int64_t T, int64_t C, int64_t beam_width, const char* op) {
  const int64_t bytes = beam_workspace_bytes(T, C, beam_width);
  const int64_t nodes = beam_max_nodes(T, beam_width);
  // What fits, for the message: the limit over this size's bytes per trie node.
  const double fits = static_cast<double>(kBeamWorkspaceLimit) * static_cast<double>(nodes) / static_cast<double>(bytes);
  TORCH_CHECK(bytes <= kBeamWorkspaceLimit, op, ": T = ", T, " frames x beam_width ", beam_width, " needs a ",
              gib(bytes), " workspace per sequence (a trie of up to 1 + T x beam_width = ", nodes,
              " prefixes), above the limit of ", gib(kBeamWorkspaceLimit),
              "; decode shorter sequences or use a smaller beam_width (T x beam_width up to about ",
              static_cast<int64_t>(fits / 1e6), " million fits)");
}

BeamOptions check_beam_options(const at::Tensor& log_probs, int64_t beam_width, int64_t top_k,
                               c10::optional<double> token_min_logp, c10::optional<double> blank_skip_threshold,
                               int64_t min_length, int64_t max_length,
                               const c10::optional<at::Tensor>& allowed_tokens, bool certify) {
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
  // 4096: as recognizer.check_decode_args (the widest image gives fewer frames); a larger min_length
  // overflowed the search's length arithmetic (2^62 read as if 0). A large max_length is harmless (the
  // output holds min(T, max_length) tokens).
  TORCH_CHECK(min_length >= 0 && min_length <= 4096, op, ": min_length must be in [0, 4096], got ", min_length);
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
  const int64_t T = log_probs.size(0), N = log_probs.size(1);
  check_beam_workspace(T, C, beam_width, op);
  check_token_output(N, top_k, beam_output_width(T, max_length), op);
  BeamOptions o;
  o.beam_width = static_cast<int32_t>(beam_width);
  o.token_min_logp = static_cast<float>(min_logp);
  // Skipping at probability 1 changes nothing, so 1 means "off".
  o.log_blank_skip = skip >= 1.0 ? INFINITY : static_cast<float>(std::log(skip));
  o.min_len = static_cast<int32_t>(min_length);
  o.max_len = static_cast<int32_t>(max_length);
  o.allowed = nullptr;
  o.allowed_stride = 1;
  o.certify = certify;
  o.scores = true;
  return o;
}

int64_t beam_output_width(int64_t T, int64_t max_length) {
  return max_length >= 0 ? std::min(T, max_length) : T;
}

// ---------------------------------------------------------------------------
// The strings ops: the tensor op on the input's device, then the labels as
// strings on the host. One implementation for every device: on CUDA the
// tokens are computed on the GPU and copied back (the op waits for them), and
// a sequence the kernel flagged (NaN score) raises the error the CPU raises.

namespace {

// The text of every class: class c < blank is charset[c], class c > blank is
// charset[c - 1], the blank is "". Symbols may have several characters.
class Symbols {
 public:
  Symbols(const c10::List<std::string>& charset, int64_t C, int64_t blank, const char* op) {
    TORCH_CHECK(static_cast<int64_t>(charset.size()) == C - 1, op,
                ": charset must have one symbol per class except the blank (C - 1 = ", C - 1, "), got ",
                charset.size());
    begin_.assign(C + 1, 0);
    for (int64_t c = 0; c < C; ++c) {
      if (c != blank) bytes_ += charset.get(c < blank ? c : c - 1);
      begin_[c + 1] = static_cast<int64_t>(bytes_.size());
    }
  }
  // The bytes of a label's text, and the text written at p (returns its end).
  int64_t size(const int32_t* tokens, int64_t len) const {
    int64_t size = 0;
    for (int64_t j = 0; j < len; ++j) size += begin_[tokens[j] + 1] - begin_[tokens[j]];
    return size;
  }
  char* write(const int32_t* tokens, int64_t len, char* p) const {
    for (int64_t j = 0; j < len; ++j) {
      const int64_t b = begin_[tokens[j]], n = begin_[tokens[j] + 1] - b;
      std::memcpy(p, bytes_.data() + b, static_cast<size_t>(n));
      p += n;
    }
    return p;
  }
  std::string text(const int32_t* tokens, int64_t len) const {
    std::string out(static_cast<size_t>(size(tokens, len)), '\0');
    write(tokens, len, out.data());
    return out;
  }

 private:
  std::string bytes_;
  std::vector<int64_t> begin_;
};

// The tensor op's outputs, tokens (N, k, L), lengths (N, k), scores (N, k), on the host; a
// sequence the device kernels flagged (NaN score) raises the error the CPU kernels raise.
Decoded to_host(const Decoded& decoded, const at::Tensor& input_lengths, int64_t T, const char* op) {
  at::Tensor tokens = std::get<0>(decoded).cpu().contiguous();
  at::Tensor lengths = std::get<1>(decoded).cpu().contiguous();
  at::Tensor scores = std::get<2>(decoded).cpu().contiguous();
  if (!std::get<2>(decoded).is_cpu()) {
    check_lengths_in_range(input_lengths.cpu(), T, op);
    const int64_t K = scores.dim() == 2 ? scores.size(1) : 1;
    const float* s = scores.const_data_ptr<float>();
    for (int64_t i = 0; i < scores.numel(); ++i) {
      TORCH_CHECK(!std::isnan(s[i]), op, ": log_probs of sequence ", i / K,
                  " contain NaN or +inf (log-probabilities must be finite or -inf)");
    }
  }
  return {tokens, lengths, scores};
}

// Every label of tokens (..., L) with lengths (...) as a string, in row-major order (host tensors).
std::vector<std::string> label_strings(const at::Tensor& tokens, const at::Tensor& lengths, const Symbols& symbols) {
  const int64_t rows = lengths.numel(), L = tokens.size(-1);
  const int32_t* tok = tokens.const_data_ptr<int32_t>();
  const int32_t* len = lengths.const_data_ptr<int32_t>();
  std::vector<std::string> out(static_cast<size_t>(rows));
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = symbols.text(tok + r * L, len[r]);
  });
  return out;
}

// tokens (N, k, L), lengths (N, k), scores (N, k) from the tensor op -> texts
// (N lists of k) and the scores, on the host.
DecodedTexts to_texts(const Decoded& decoded, const at::Tensor& input_lengths, int64_t T, const Symbols& symbols,
                      const char* op) {
  const auto [tokens, lengths, scores] = to_host(decoded, input_lengths, T, op);
  const int64_t N = tokens.size(0), K = tokens.size(1);
  std::vector<std::string> strings = label_strings(tokens, lengths, symbols);
  Texts texts;
  texts.reserve(N);
  for (int64_t n = 0; n < N; ++n) {
    c10::List<std::string> row;
    row.reserve(K);
    for (int64_t k = 0; k < K; ++k) row.push_back(std::move(strings[n * K + k]));
    texts.push_back(std::move(row));
  }
  return {std::move(texts), scores};
}

Decoded greedy_tokens(const at::Tensor& log_probs, const at::Tensor& input_lengths, int64_t blank) {
  static const auto greedy = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("captcha_fast::ctc_greedy_decode", "")
                                 .typed<Decoded(const at::Tensor&, const at::Tensor&, int64_t)>();
  return greedy.call(log_probs, input_lengths, blank);
}

DecodedTexts greedy_strings(const at::Tensor& log_probs, const at::Tensor& input_lengths,
                            const c10::List<std::string>& charset, int64_t blank) {
  const char* op = "ctc_greedy_decode";
  const auto [T, N, C] = check_decode_inputs(log_probs, input_lengths, blank, op);
  const Symbols symbols(charset, C, blank, "ctc_greedy_decode_strings");
  const auto [tokens, lengths, scores] = greedy_tokens(log_probs, input_lengths, blank);
  return to_texts({tokens.unsqueeze(1), lengths.unsqueeze(1), scores.unsqueeze(1)}, input_lengths, T, symbols, op);
}

// The top-1 labels of every sequence packed into one string, each ended by a NUL (Python:
// labels.split("\0")[:-1]), as greedy_decode and beam_search return them: one string crosses into
// Python instead of one per sequence (each a boxed value and a Python object: ~0.2 us a label,
// as long as the whole greedy decode of a short captcha takes in C++).
std::tuple<std::string, at::Tensor> to_labels(const Decoded& decoded, const at::Tensor& input_lengths, int64_t T,
                                              const Symbols& symbols, const char* op) {
  const auto [tokens, lengths, scores] = to_host(decoded, input_lengths, T, op);
  const int64_t rows = lengths.numel(), L = tokens.size(-1);
  const int32_t* tok = tokens.const_data_ptr<int32_t>();
  const int32_t* len = lengths.const_data_ptr<int32_t>();
  std::vector<int64_t> end(static_cast<size_t>(rows));  // where each label's NUL goes
  int64_t at = 0;
  for (int64_t r = 0; r < rows; ++r) end[r] = at += symbols.size(tok + r * L, len[r]) + 1;
  std::string labels(static_cast<size_t>(at), '\0');  // the NULs already in place
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t stop) {
    for (int64_t r = begin; r < stop; ++r) {
      symbols.write(tok + r * L, len[r], labels.data() + (r == 0 ? 0 : end[r - 1]));
    }
  });
  return {std::move(labels), scores.reshape({-1})};
}

// A NUL in a symbol would split its label: refused by name.
void check_no_nul(const c10::List<std::string>& charset, const char* op) {
  for (size_t i = 0; i < charset.size(); ++i) {
    TORCH_CHECK(charset.get(i).find('\0') == std::string::npos, op, ": charset[", i,
                "] contains a NUL character, which ends each label of the packed output");
  }
}

std::tuple<std::string, at::Tensor> greedy_labels(const at::Tensor& log_probs, const at::Tensor& input_lengths,
                                                  const c10::List<std::string>& charset, int64_t blank) {
  const char* op = "ctc_greedy_decode";
  const auto [T, N, C] = check_decode_inputs(log_probs, input_lengths, blank, op);
  const Symbols symbols(charset, C, blank, "ctc_greedy_decode_labels");
  check_no_nul(charset, "ctc_greedy_decode_labels");
  return to_labels(greedy_tokens(log_probs, input_lengths, blank), input_lengths, T, symbols, op);
}

Decoded beam_tokens(const at::Tensor& log_probs, const at::Tensor& input_lengths, int64_t beam_width, int64_t top_k,
                    int64_t blank, c10::optional<double> token_min_logp, c10::optional<double> blank_skip_threshold,
                    int64_t min_length, int64_t max_length, const c10::optional<at::Tensor>& allowed_tokens,
                    bool certify) {
  static const auto beam = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("captcha_fast::ctc_beam_search", "")
                               .typed<Decoded(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                                              c10::optional<double>, c10::optional<double>, int64_t, int64_t,
                                              const c10::optional<at::Tensor>&, bool)>();
  return beam.call(log_probs, input_lengths, beam_width, top_k, blank, token_min_logp, blank_skip_threshold,
                   min_length, max_length, allowed_tokens, certify);
}

DecodedTexts beam_search_strings(const at::Tensor& log_probs, const at::Tensor& input_lengths,
                                 const c10::List<std::string>& charset, int64_t beam_width, int64_t top_k,
                                 int64_t blank, c10::optional<double> token_min_logp,
                                 c10::optional<double> blank_skip_threshold, int64_t min_length, int64_t max_length,
                                 const c10::optional<at::Tensor>& allowed_tokens, bool certify) {
  const char* op = "ctc_beam_search";
  const auto [T, N, C] = check_decode_inputs(log_probs, input_lengths, blank, op);
  const Symbols symbols(charset, C, blank, "ctc_beam_search_strings");
  return to_texts(beam_tokens(log_probs, input_lengths, beam_width, top_k, blank, token_min_logp, blank_skip_threshold,
                              min_length, max_length, allowed_tokens, certify),
                  input_lengths, T, symbols, op);
}

std::tuple<std::string, at::Tensor> beam_search_labels(
    const at::Tensor& log_probs, const at::Tensor& input_lengths, const c10::List<std::string>& charset,
    int64_t beam_width, int64_t blank, c10::optional<double> token_min_logp, c10::optional<double> blank_skip_threshold,
    int64_t min_length, int64_t max_length, const c10::optional<at::Tensor>& allowed_tokens, bool certify,
    bool with_scores) {
  const char* op = "ctc_beam_search";
  const auto [T, N, C] = check_decode_inputs(log_probs, input_lengths, blank, op);
  const Symbols symbols(charset, C, blank, "ctc_beam_search_labels");
  check_no_nul(charset, "ctc_beam_search_labels");
  // Labels only (with_scores false): the CPU kernel answers a sequence whose greedy path with its
  // flips provably holds most of the mass from one pass (path_certifies); other devices compute
  // every score.
  const Decoded decoded = with_scores || !log_probs.is_cpu()
                              ? beam_tokens(log_probs, input_lengths, beam_width, 1, blank, token_min_logp,
                                            blank_skip_threshold, min_length, max_length, allowed_tokens, certify)
                              : beam_search_cpu_kernel(log_probs, input_lengths, beam_width, 1, blank, token_min_logp,
                                                       blank_skip_threshold, min_length, max_length, allowed_tokens,
                                                       certify, false);
  return to_labels(decoded, input_lengths, T, symbols, op);
}

}  // namespace

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
  // Layout, for all ops: log_probs is (T, N, C) = (frames, batch, classes),
  // the layout of nn.CTCLoss and of our model; any strides are read in place.
  // input_lengths (N,) int64/int32: sequence n uses frames [0, input_lengths[n]).
  // float32/float16/bfloat16/float64 are read; sums over frames are double,
  // outputs float32.
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
  // certify (top_k = 1 only): a sequence whose top label is proven without
  //   searching is answered so: the greedy label or a rival (the greedy path
  //   flipped at one of its least sure frames) whose mass along prefixes the
  //   beam provably keeps beats every other rival's probability and all the
  //   mass the rivals leave (with a rounding margin). That label is provably
  //   the exact search's top-1 at this beam width and the most probable label
  //   (proof: csrc/ctc_decode.h, "The top-label certificate"); its score is then
  //   log P(label) over all its alignments (the CTC forward algorithm). False:
  //   always search.
  // Sizes: its workspace (a trie of up to 1 + T x beam_width prefixes) may
  //   take at most kBeamWorkspaceLimit = 4 GiB per sequence (T x beam_width
  //   up to about 120 million); larger work is refused before allocating.
  m.def(
      "ctc_beam_search(Tensor log_probs, Tensor input_lengths, int beam_width=10, int top_k=1, int blank=0, "
      "float? token_min_logp=None, float? blank_skip_threshold=None, int min_length=0, int max_length=-1, "
      "Tensor? allowed_tokens=None, bool certify=True) -> (Tensor, Tensor, Tensor)");
  // The same two decoders, returning strings: texts[n][k] is hypothesis k of
  // sequence n (k < 1 for greedy, k < top_k for beam search; a missing one is
  // "" with score -inf) and scores (N, k) float32 on the CPU. charset: the
  // symbols of the non-blank classes in class order (C - 1 strings, any
  // length): class c is charset[c] below the blank, charset[c - 1] above it.
  // On CUDA the tokens are decoded on the GPU and the strings built on the
  // host, and a bad sequence raises as on the CPU. Strings depend on the data,
  // so these ops have no fake kernels: torch.compile/export use the tensor ops.
  m.def("ctc_greedy_decode_strings(Tensor log_probs, Tensor input_lengths, str[] charset, int blank=0) "
        "-> (str[][] texts, Tensor scores)");
  // ctc_greedy_decode_labels: the greedy labels packed into one string, each ended by a NUL
  // (labels.split("\0")[:-1]: one string per sequence, what Python's greedy_decode returns), and
  // scores (N,) float32 on the CPU; a symbol holding a NUL is refused.
  m.def("ctc_greedy_decode_labels(Tensor log_probs, Tensor input_lengths, str[] charset, int blank=0) "
        "-> (str labels, Tensor scores)");
  m.def(
      "ctc_beam_search_strings(Tensor log_probs, Tensor input_lengths, str[] charset, int beam_width=10, "
      "int top_k=1, int blank=0, float? token_min_logp=None, float? blank_skip_threshold=None, int min_length=0, "
      "int max_length=-1, Tensor? allowed_tokens=None, bool certify=True) -> (str[][] texts, Tensor scores)");
  // ctc_beam_search_labels: the beam search's top-1 labels packed as ctc_greedy_decode_labels packs
  // them, and scores (N,): ctc_beam_search_strings with top_k = 1 (Python's beam_search). With
  // with_scores=False (the caller reads only the labels), on the CPU a sequence whose greedy path
  // and its flips (paths keeping its label, "The path test alone" in csrc/ctc_decode.h) provably
  // hold more than half of the mass (its label is then the top-1) costs one pass over its frames,
  // and its score is NaN (not computed); the other sequences' labels and scores are as
  // with_scores=True gives them.
  m.def(
      "ctc_beam_search_labels(Tensor log_probs, Tensor input_lengths, str[] charset, int beam_width=10, "
      "int blank=0, float? token_min_logp=None, float? blank_skip_threshold=None, int min_length=0, "
      "int max_length=-1, Tensor? allowed_tokens=None, bool certify=True, bool with_scores=True) "
      "-> (str labels, Tensor scores)");
  m.def("_build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(captcha_fast, CompositeExplicitAutograd, m) {
  m.impl("ctc_greedy_decode_strings", &greedy_strings);
  m.impl("ctc_greedy_decode_labels", &greedy_labels);
  m.impl("ctc_beam_search_strings", &beam_search_strings);
  m.impl("ctc_beam_search_labels", &beam_search_labels);
}

}  // namespace captcha_fast
