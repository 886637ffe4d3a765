// vector_exp and CF_VECTOR_CLONES: the GRU kernels' (gru.cpp, gru_train.cpp) exp for loops the
// compiler vectorizes, and the attribute that compiles such loops for AVX-512, AVX2 and plain x86-64.
#pragma once

#include <algorithm>
#include <cstdint>

namespace captcha_fast {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// one build for every x86-64 CPU; the loops are compiled for AVX-512 and AVX2 too, picked at load time
#define CF_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CF_VECTOR_CLONES
#endif

// exp(x) for a loop the compiler vectorizes (std::exp is a libm call per element: libm's exp and
// tanh took 2.3M of the op's 7.9M instructions on one image). Cephes' expf: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by a polynomial, 2^n built in the exponent bits: within 1 ulp of exp for
// every float in [-87, 88] (tanh from it: within 1.8e-7), clamped outside, where sigmoid and tanh
// saturate. Rounding to n adds and subtracts 1.5 * 2^23: exact under round-to-nearest (no -ffast-math).
__attribute__((always_inline)) inline float vector_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

}  // namespace captcha_fast
