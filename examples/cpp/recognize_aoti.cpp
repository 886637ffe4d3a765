// Reads the text in images with an AOTInductor-compiled captcha_fast recognizer (.pt2 written by
// `captcha-fast export MODEL --out model.pt2 --compile`, i.e. captcha_fast.export.compile_package),
// from C++ with libtorch only: torch.jit is not used. The package holds two compiled models,
// "features" (the conv stack, run a chunk of images at a time) and "head" (projection, GRU,
// classifier, log-softmax), and the settings as metadata; the preprocessing below is
// captcha_fast.preprocess.prepare_image's (its background grid and crop are the library's ops), and
// the decoding calls the torch.ops.captcha_fast.* decoders, all through the dispatcher. The compiled head calls captcha_fast::gru, so the captcha_fast
// library must be loaded first.
//
//   recognize_aoti <captcha_fast library .so> <compiled .pt2> <image.pgm|ppm> [...]
//
// Output, one line per image: <path>\t<text>\t<score>, as examples/cpp/recognize.
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/nn/functional/upsampling.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "pnm.h"

namespace F = torch::nn::functional;
using torch::indexing::Slice;

// The settings compile_package stores as metadata ("captcha_fast.<name>").
struct Settings {
  std::string charset, decoder;
  int64_t height, in_channels, max_width, chunk, beam_width;
  bool ink;
  std::optional<double> token_min_logp, blank_skip_threshold;
};

static Settings read_settings(const std::unordered_map<std::string, std::string>& meta) {
  auto get = [&](const std::string& name) -> std::optional<std::string> {
    auto it = meta.find("captcha_fast." + name);
    return it == meta.end() ? std::nullopt : std::optional<std::string>(it->second);
  };
  auto need = [&](const std::string& name) {
    auto v = get(name);
    if (!v) throw std::runtime_error("the package has no captcha_fast." + name + ": not a captcha_fast recognizer");
    return *v;
  };
  auto number = [&](const std::string& name) -> std::optional<double> {
    auto v = get(name);  // absent: None (that pruning rule off)
    return v ? std::optional<double>(std::stod(*v)) : std::nullopt;
  };
  return {need("charset"),
          need("decoder"),
          std::stoll(need("height")),
          std::stoll(need("in_channels")),
          std::stoll(need("max_width")),
          std::stoll(need("chunk")),
          std::stoll(need("beam_width")),
          need("ink") == "1",
          number("token_min_logp"),
          number("blank_skip_threshold")};
}

// Calls torch.ops.captcha_fast.<op> with arguments by name; the schema's defaults fill the rest.
static std::vector<c10::IValue> call_op(const char* op, const std::map<std::string, c10::IValue>& args) {
  auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(op, "");
  std::vector<c10::IValue> stack;
  for (const auto& a : handle.schema().arguments()) {
    auto it = args.find(a.name());
    if (it != args.end()) stack.push_back(it->second);
    else if (a.default_value()) stack.push_back(*a.default_value());
    else throw std::runtime_error(std::string(op) + ": no value for argument " + a.name());
  }
  handle.callBoxed(&stack);
  return stack;
}

// ---- captcha_fast.preprocess.prepare_image, step for step

// (1, C, H, W) float, C = 1 or 3 -> (1, in_channels, H, W): grey as ITU-R 601 luma, or grey repeated.
static torch::Tensor to_channels(torch::Tensor x, int64_t in_channels) {
  const int64_t C = x.size(1);
  if (in_channels == 1 && C == 3)
    return 0.299 * x.slice(1, 0, 1) + 0.587 * x.slice(1, 1, 2) + 0.114 * x.slice(1, 2, 3);
  if (in_channels == 3 && C == 1) return x.expand({-1, 3, -1, -1});
  return x;
}

// The local background: per-channel medians of 7 x 7 windows on a sampled grid (8 points high, twice
// the spacing across), a second median without the samples far on the ink's side (the library's
// grid_medians op), interpolated back. preprocess.background.
static torch::Tensor background(const torch::Tensor& x) {
  const int64_t h = x.size(2), w = x.size(3);
  const double step = std::max(1.0, (h - 1) / 7.0);
  auto grid = [&](int64_t n, double spacing) {
    return torch::linspace(0.0, n - 1.0, static_cast<int64_t>((n - 1) / spacing + 0.5) + 1, x.options()).round().to(torch::kLong);
  };
  torch::Tensor samples = x.index_select(2, grid(h, step)).index_select(3, grid(w, 2.0 * step));
  torch::Tensor bg = call_op("captcha_fast::grid_medians", {{"samples", samples}})[0].toTensor();
  return F::interpolate(bg, F::InterpolateFuncOptions().size(std::vector<int64_t>{h, w}).mode(torch::kBilinear).align_corners(true));
}

// Each pixel's distance from the local background (estimated inside the outer 3 px), frame lines
// in the outer 3 px removed, divided by the ink's strength (the library's ink_from_background op).
// preprocess.to_ink.
static torch::Tensor to_ink(const torch::Tensor& x) {
  const int64_t H = x.size(2), W = x.size(3);
  const int64_t b = std::min<int64_t>({3, (H - 1) / 4, (W - 1) / 4});
  torch::Tensor bg = background(x.index({Slice(), Slice(), Slice(b, H - b), Slice(b, W - b)}));
  return call_op("captcha_fast::ink_from_background", {{"x", x}, {"background", bg}, {"border", b}})[0].toTensor();
}

// The part of (1, 1, H, W) ink inside its box (the library's ink_boxes op). preprocess.crop_to_ink.
static torch::Tensor crop_to_ink(const torch::Tensor& ink) {
  torch::Tensor box = call_op("captcha_fast::ink_boxes", {{"ink", ink}})[0].toTensor()[0].contiguous();
  const int64_t* b = box.data_ptr<int64_t>();
  return ink.index({Slice(), Slice(), Slice(b[0], b[1] + 1), Slice(b[2], b[3] + 1)});
}

// (C, H, W) uint8 -> (in_channels, height, W') float in [0, 1], aspect kept. preprocess.prepare_image.
static torch::Tensor prepare_image(const torch::Tensor& img, const Settings& s, const std::string& name) {
  auto resized_width = [&](int64_t H, int64_t W) {
    return std::max<int64_t>(4, static_cast<int64_t>(W * s.height / static_cast<double>(H) + 0.5));
  };
  // max_width is checked on the image as given; a crop still wider at the model's height is squeezed
  int64_t new_w = resized_width(img.size(1), img.size(2));
  if (new_w > s.max_width)
    throw std::runtime_error(name + ": a " + std::to_string(img.size(2)) + " x " + std::to_string(img.size(1)) +
                             " image (width x height) is " + std::to_string(new_w) +
                             " px wide at the model's height, above max_width");
  torch::Tensor x = img.unsqueeze(0).to(torch::kFloat) / 255.0;
  if (s.ink) {
    x = crop_to_ink(to_ink(to_channels(x, x.size(1) >= 3 ? 3 : 1)));
    new_w = std::min(resized_width(x.size(2), x.size(3)), s.max_width);
  }
  x = to_channels(x, s.in_channels);
  if (x.size(2) != s.height || x.size(3) != new_w)
    x = F::interpolate(x, F::InterpolateFuncOptions()
                              .size(std::vector<int64_t>{s.height, new_w})
                              .mode(torch::kBilinear)
                              .align_corners(false)
                              .antialias(true));
  return x[0];
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " <captcha_fast library .so> <compiled .pt2> <image.pgm|ppm> [...]\n";
    return 2;
  }
  // Registers torch.ops.captcha_fast.* (the decoders, the ink ops and the gru op the head calls). RTLD_LAZY:
  // the library's Python entry point refers to libpython, which this program never calls.
  if (!dlopen(argv[1], RTLD_LAZY | RTLD_GLOBAL)) {
    std::cerr << "cannot load the captcha_fast library: " << dlerror() << "\n";
    return 1;
  }
  try {
    torch::inductor::AOTIModelPackageLoader features(argv[2], "features"), head(argv[2], "head");
    const Settings s = read_settings(head.get_metadata());
    torch::NoGradGuard no_grad;

    // Preprocess: each image at the model's height, right-padded into one batch; the width is
    // padded to a multiple of 4 (at least 8), as the compiled models take (exact: masked).
    std::vector<torch::Tensor> images;
    std::vector<int64_t> widths;
    for (int i = 3; i < argc; ++i) {
      images.push_back(prepare_image(read_pnm(argv[i]), s, argv[i]));
      widths.push_back(images.back().size(2));
    }
    const int64_t N = images.size(), W_max = *std::max_element(widths.begin(), widths.end());
    const int64_t W = std::max<int64_t>(8, (W_max + 3) / 4 * 4);
    torch::Tensor batch = torch::zeros({N, s.in_channels, s.height, W});
    for (int64_t n = 0; n < N; ++n) batch[n].narrow(2, 0, widths[n]).copy_(images[n]);
    torch::Tensor lengths = torch::tensor(widths, torch::kLong);

    // Model: the conv stack a chunk of images at a time (activations stay in cache), the head once.
    const int64_t n_chunks = std::max<int64_t>(1, N / s.chunk);
    std::vector<torch::Tensor> xs, ws;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t a = N * c / n_chunks, b = N * (c + 1) / n_chunks;
      auto out = features.run({batch.slice(0, a, b).contiguous(), lengths.slice(0, a, b).contiguous()});
      xs.push_back(out[0]), ws.push_back(out[1]);
    }
    auto out = head.run({torch::cat(xs), torch::cat(ws)});
    torch::Tensor log_probs = out[0], frames = out[1];

    // Decode, as the Recognizer does.
    std::vector<c10::IValue> result;
    if (s.decoder == "greedy") {
      result = call_op("captcha_fast::ctc_greedy_decode", {{"log_probs", log_probs}, {"input_lengths", frames}, {"blank", 0}});
    } else {
      std::map<std::string, c10::IValue> args = {{"log_probs", log_probs}, {"input_lengths", frames},
                                                 {"beam_width", s.beam_width}, {"top_k", 1}, {"blank", 0}};
      args["token_min_logp"] = s.token_min_logp ? c10::IValue(*s.token_min_logp) : c10::IValue();
      args["blank_skip_threshold"] = s.blank_skip_threshold ? c10::IValue(*s.blank_skip_threshold) : c10::IValue();
      result = call_op("captcha_fast::ctc_beam_search", args);
    }
    torch::Tensor tokens = result[0].toTensor().reshape({N, -1}).to(torch::kLong);  // best hypothesis
    torch::Tensor token_lengths = result[1].toTensor().reshape({N}).to(torch::kLong);
    torch::Tensor scores = result[2].toTensor().reshape({N});
    std::vector<std::string> symbols;  // the charset's characters (UTF-8 code points)
    for (char ch : s.charset) {
      if ((static_cast<unsigned char>(ch) & 0xC0) != 0x80) symbols.emplace_back();  // not a continuation byte
      symbols.back() += ch;
    }
    for (int64_t n = 0; n < N; ++n) {
      std::string text;
      for (int64_t j = 0; j < token_lengths[n].item<int64_t>(); ++j)
        text += symbols.at(tokens[n][j].item<int64_t>() - 1);  // class c is symbol c - 1
      std::cout << argv[n + 3] << "\t" << text << "\t" << scores[n].item<float>() << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
