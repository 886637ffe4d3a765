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

#include "pnm.h"

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
