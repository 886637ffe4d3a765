// Small helpers shared by the CUDA kernels.
#pragma once

#include <cstdint>

namespace captcha_fast {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// input_lengths read in place: int64 or int32, any stride (no cast kernel, no copy).
struct LengthsView {
  const int64_t* p64;  // exactly one of p64 / p32 is set
  const int32_t* p32;
  int64_t stride;
  __device__ __forceinline__ int64_t operator()(int64_t n) const {
    return p64 != nullptr ? p64[n * stride] : static_cast<int64_t>(p32[n * stride]);
  }
};

}  // namespace captcha_fast
