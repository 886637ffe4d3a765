// Reads the text in images with a saved captcha_fast recognizer, from C++ with libtorch only
// (no Python): the TorchScript file holds the weights, config, charset, preprocessing and the
// call to the torch.ops.captcha_fast.* decoders, which the captcha_fast library registers.
//
//   recognize <captcha_fast library .so> <recognizer .pt> <image.pgm|ppm> [...]
//
// Images are binary PGM (P5, grey) or PPM (P6, RGB) with maxval 255 (e.g. `convert a.png a.ppm`),
// to keep the example free of image libraries; any size, one line of output per image:
//   <path>\t<text>\t<score>
#include <dlfcn.h>
#include <torch/script.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

// A binary PGM/PPM file as a (C, H, W) uint8 tensor, C = 1 or 3.
static torch::Tensor read_pnm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open image file " + path);
  std::string magic;
  in >> magic;
  if (magic != "P5" && magic != "P6") throw std::runtime_error(path + " is not a binary PGM (P5) or PPM (P6) file");
  auto next_int = [&]() {
    in >> std::ws;
    while (in.peek() == '#') {  // comment lines
      std::string line;
      std::getline(in, line);
      in >> std::ws;
    }
    long v = -1;
    in >> v;
    return v;
  };
  const long W = next_int(), H = next_int(), maxval = next_int();
  if (W <= 0 || H <= 0 || maxval != 255) throw std::runtime_error(path + ": need width, height > 0 and maxval 255");
  in.get();  // the single whitespace before the pixels
  const long C = magic == "P5" ? 1 : 3;
  torch::Tensor hwc = torch::empty({H, W, C}, torch::kUInt8);
  in.read(reinterpret_cast<char*>(hwc.data_ptr<uint8_t>()), H * W * C);
  if (in.gcount() != H * W * C) throw std::runtime_error(path + " is truncated");
  return hwc.permute({2, 0, 1}).contiguous();  // (C, H, W)
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " <captcha_fast library .so> <recognizer .pt> <image.pgm|ppm> [...]\n";
    return 2;
  }
  // Registers torch.ops.captcha_fast.*. RTLD_LAZY: the library's Python module entry point
  // (PyInit__C) refers to libpython, which this program never calls.
  if (!dlopen(argv[1], RTLD_LAZY | RTLD_GLOBAL)) {
    std::cerr << "cannot load the captcha_fast library: " << dlerror() << "\n";
    return 1;
  }
  try {
    torch::jit::Module rec = torch::jit::load(argv[2]);
    rec.eval();
    c10::List<torch::Tensor> images;
    for (int i = 3; i < argc; ++i) images.push_back(read_pnm(argv[i]));
    torch::NoGradGuard no_grad;
    auto out = rec.forward({images}).toTuple();
    auto texts = out->elements()[0].toList();
    torch::Tensor scores = out->elements()[1].toTensor();
    for (size_t i = 0; i < texts.size(); ++i)
      std::cout << argv[i + 3] << "\t" << texts.get(i).toStringRef() << "\t" << scores[i].item<float>() << "\n";
    // Other decoders: rec.get_method("recognize")({images, "beam", 10, 3}) -> (List[List[str]], scores (N, 3)).
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
