// Shared by the examples: reading binary PGM/PPM images without an image library.
#pragma once

#include <torch/torch.h>

#include <fstream>
#include <stdexcept>
#include <string>

// A binary PGM/PPM file as a (C, H, W) uint8 tensor, C = 1 or 3.
inline torch::Tensor read_pnm(const std::string& path) {
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
