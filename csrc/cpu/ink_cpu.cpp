// captcha_fast::grid_medians on the CPU: preprocess._grid_medians (the background estimate of the ink
// map) as one loop over the grid instead of ~25 small ATen ops and a sort of every 7 x 7 window,
// which took half of one image's preprocessing. Order statistics are picked by selection
// (nth_element), not computed, so every value is one of the samples, as the ATen path's sort and
// gather give; the side decision uses ATen's own mean and std and the same float arithmetic.
// preprocess._grid_medians calls it on the CPU and runs its ATen ops elsewhere;
// tests/test_preprocess.py checks the two are equal.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-wrapv", "fp-contract=off")
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace captcha_fast {
namespace {

constexpr int64_t kHalf = 3;          // the window is 7 x 7 samples (BG_WINDOW), edges replicated
constexpr int64_t kWindow = 49;
constexpr int64_t kMedian = 24;       // the lower median: the 25th of 49

// The median of one (sh, sw) plane as torch.quantile(0.5) gives it: the middle value, or for an even
// count ATen's lerp of the two middle ones at weight 0.5 (end - (end - start) * 0.5); NaN if any is.
template <typename T>
T plane_median(const T* plane, int64_t S, std::vector<T>& scratch) {
  scratch.assign(plane, plane + S);
  if (std::any_of(scratch.begin(), scratch.end(), [](T v) { return std::isnan(v); })) return NAN;
  const int64_t lo = (S - 1) / 2;
  std::nth_element(scratch.begin(), scratch.begin() + lo, scratch.end());
  const T below = scratch[lo];
  if ((S - 1) % 2 == 0) return below;
  const T above = *std::min_element(scratch.begin() + lo + 1, scratch.end());
  return above - (above - below) * T(0.5);
}

template <typename T, typename Less>
void grid_medians_plane(const T* in, T* out, int64_t sh, int64_t sw, T side, Less less) {
  T window[kWindow];
  for (int64_t i = 0; i < sh; ++i) {
    for (int64_t j = 0; j < sw; ++j) {
      int64_t k = 0;
      for (int64_t di = -kHalf; di <= kHalf; ++di) {
        const T* row = in + std::min(std::max(i + di, int64_t(0)), sh - 1) * sw;
        for (int64_t dj = -kHalf; dj <= kHalf; ++dj) window[k++] = row[std::min(std::max(j + dj, int64_t(0)), sw - 1)];
      }
      std::nth_element(window, window + kMedian, window + kWindow, less);
      const T median = window[kMedian];
      int64_t dropped = 0;  // the samples more than 0.1 beyond the median on the ink's side
      for (int64_t m = 0; m < kWindow; ++m) dropped += side * (window[m] - median) > T(0.1);
      const int64_t kept = kWindow - dropped;
      const int64_t rank = (kept + 1) / 2 - 1 + (side < T(0) ? dropped : 0);
      if (rank < kMedian) {
        std::nth_element(window, window + rank, window + kMedian, less);
      } else if (rank > kMedian) {
        std::nth_element(window + kMedian + 1, window + rank, window + kWindow, less);
      }
      out[i * sw + j] = window[rank];
    }
  }
}

at::Tensor grid_medians_cpu(const at::Tensor& samples) {
  TORCH_CHECK(samples.dim() == 4, "grid_medians: samples must be (N, C, sh, sw), got shape ", samples.sizes());
  TORCH_CHECK(samples.scalar_type() == at::kFloat || samples.scalar_type() == at::kDouble,
              "grid_medians: samples must be float32 or float64, got ", samples.scalar_type());
  TORCH_CHECK(samples.numel() > 0, "grid_medians: samples must not be empty, got shape ", samples.sizes());
  const at::Tensor x = samples.contiguous();
  const int64_t N = x.size(0), C = x.size(1), sh = x.size(2), sw = x.size(3), S = sh * sw;
  // The ink's side of each channel from its skew (Pearson's median skewness), with ATen's mean and
  // std, so the side is the ATen path's to the last bit.
  const at::Tensor flat = x.view({N * C, S});
  const at::Tensor mean = flat.mean(1), stdev = flat.std(1);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grid_medians", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* means = mean.data_ptr<scalar_t>();
    const scalar_t* stds = stdev.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, std::max<int64_t>(1, 4096 / S), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch;
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t skew = scalar_t(3.0) * (means[p] - plane_median(in + p * S, S, scratch))
                              / std::max(stds[p], scalar_t(1e-6));
        const scalar_t side = skew > scalar_t(0.5) ? 1 : (skew < scalar_t(-0.5) ? -1 : 0);
        if (std::isnan(skew)) {  // NaN samples: ordered last, as torch.sort does (a strict weak order)
          grid_medians_plane(in + p * S, o + p * S, sh, sw, side,
                             [](scalar_t a, scalar_t b) { return a < b || (!std::isnan(a) && std::isnan(b)); });
        } else {
          grid_medians_plane(in + p * S, o + p * S, sh, sw, side, [](scalar_t a, scalar_t b) { return a < b; });
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(captcha_fast, m) { m.def("grid_medians(Tensor samples) -> Tensor"); }

TORCH_LIBRARY_IMPL(captcha_fast, CPU, m) { m.impl("grid_medians", &grid_medians_cpu); }

}  // namespace captcha_fast
