// The ink map's three CPU ops, each one loop instead of dozens of small ATen ops (one 50 x 200 image's
// preprocessing was ~900 us, most of it per-op overhead; the values are the ATen paths' own):
// - captcha_fast::grid_medians: preprocess._grid_medians, the background estimate. Each 7 x 7 window
//   is sorted by a sorting network, 16 windows at once (float; selection by nth_element for float64
//   or NaN), so every value is one of the samples, as the ATen path's sort and gather give; the
//   side decision uses ATen's own mean and std and the same float math.
// - captcha_fast::ink_from_background: the rest of preprocess.to_ink (distance, frame lines, strength),
//   elementwise here, the strong pixels' sum by ATen.
// - captcha_fast::ink_boxes: preprocess.ink_boxes, the crop. Elementwise steps and integer logic
//   here, the float sums (row and column mass, their running and total sums) by ATen, so that
//   every threshold compares the very numbers the ATen path compares.
// preprocess calls them on the CPU and runs its ATen ops elsewhere; tests/test_preprocess.py checks
// the two are equal.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-wrapv", "fp-contract=off")
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../vector_exp.h"

namespace captcha_fast {
namespace {

constexpr int64_t kHalf = 3;          // the window is 7 x 7 samples (BG_WINDOW), edges replicated
constexpr int64_t kWindow = 49;
constexpr int64_t kMedian = 24;       // the lower median: the 25th of 49

// Index i of a line of `size` with its edges replicated (F.pad's "replicate").
inline int64_t replicated(int64_t i, int64_t size) { return std::min(std::max(i, int64_t(0)), size - 1); }

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
        const T* row = in + replicated(i + di, sh) * sw;
        for (int64_t dj = -kHalf; dj <= kHalf; ++dj) window[k++] = row[replicated(j + dj, sw)];
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

// float planes without NaN: kLanes windows side by side, sorted at once by a sorting network (one
// vector min and max per comparator) instead of one selection each: ~3x faster.
constexpr int64_t kLanes = 16;

// Batcher's odd-even merge sort for 64 inputs, less the comparators that touch positions 49..63
// (were those +inf, they would never move): a network that sorts 49.
const std::vector<std::pair<int, int>>& window_network() {
  static const std::vector<std::pair<int, int>> pairs = [] {
    std::vector<std::pair<int, int>> out;
    const int n = 64;
    for (int p = 1; p < n; p <<= 1)
      for (int k = p; k >= 1; k >>= 1)
        for (int j = k % p; j + k < n; j += 2 * k)
          for (int i = 0; i < std::min(k, n - j - k); ++i)
            if ((i + j) / (2 * p) == (i + j + k) / (2 * p) && i + j + k < kWindow) out.emplace_back(i + j, i + j + k);
    return out;
  }();
  return pairs;
}

// Sorts the windows in v (window l in lane l of v[0..48]) and counts, per window, the samples more
// than 0.1 beyond its median on the ink's side.
CF_VECTOR_CLONES void sort_window_lanes(float (*v)[kLanes], const std::pair<int, int>* pairs, int64_t n_pairs,
                                        float side, int32_t* dropped) {
  for (int64_t c = 0; c < n_pairs; ++c) {
    float* a = v[pairs[c].first];
    float* b = v[pairs[c].second];
    float lo[kLanes], hi[kLanes];  // all reads before the writes: a vector min and max (a != b)
    for (int64_t l = 0; l < kLanes; ++l) lo[l] = std::min(a[l], b[l]), hi[l] = std::max(a[l], b[l]);
    std::copy_n(lo, kLanes, a);
    std::copy_n(hi, kLanes, b);
  }
  for (int64_t l = 0; l < kLanes; ++l) dropped[l] = 0;
  for (int64_t m = 0; m < kWindow; ++m)
    for (int64_t l = 0; l < kLanes; ++l) dropped[l] += side * (v[m][l] - v[kMedian][l]) > 0.1f;
}

void grid_medians_plane_no_nan(const float* in, float* out, int64_t sh, int64_t sw, float side) {
  // the plane with kHalf replicated samples at each side, and kLanes more at the right for the last lanes
  const int64_t ph = sh + 2 * kHalf, pw = sw + 2 * kHalf + kLanes;
  std::vector<float> padded(ph * pw);
  for (int64_t i = 0; i < ph; ++i) {
    const float* src = in + replicated(i - kHalf, sh) * sw;
    for (int64_t j = 0; j < pw; ++j) padded[i * pw + j] = src[replicated(j - kHalf, sw)];
  }
  const auto& net = window_network();
  alignas(64) float v[kWindow][kLanes];
  alignas(64) int32_t dropped[kLanes];
  for (int64_t i = 0; i < sh; ++i) {
    for (int64_t j0 = 0; j0 < sw; j0 += kLanes) {
      for (int64_t di = 0; di < 2 * kHalf + 1; ++di)
        for (int64_t dj = 0; dj < 2 * kHalf + 1; ++dj)
          std::copy_n(&padded[(i + di) * pw + j0 + dj], kLanes, v[di * (2 * kHalf + 1) + dj]);
      sort_window_lanes(v, net.data(), static_cast<int64_t>(net.size()), side, dropped);
      for (int64_t l = 0; l < std::min(kLanes, sw - j0); ++l) {
        const int64_t rank = (kWindow - dropped[l] + 1) / 2 - 1 + (side < 0.0f ? dropped[l] : 0);
        out[i * sw + j0 + l] = v[rank][l];
      }
    }
  }
}

void grid_medians_plane_no_nan(const double* in, double* out, int64_t sh, int64_t sw, double side) {
  grid_medians_plane(in, out, sh, sw, side, [](double a, double b) { return a < b; });
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
  // One sample (a 1 x 1 image) has no spread: std() would give NaN with a "degrees of freedom" warning;
  // zero gives the same side (its skew is 0, or NaN for a NaN sample, as before).
  const at::Tensor mean = flat.mean(1), stdev = S > 1 ? flat.std(1) : at::zeros_like(mean);
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
          grid_medians_plane_no_nan(in + p * S, o + p * S, sh, sw, side);
        }
      }
    });
  });
  return out;
}

// NaN-propagating min / max / clamp_min, as torch.minimum / maximum / clamp_min.
template <typename T>
T nan_min(T a, T b) { return std::isnan(a) ? a : (std::isnan(b) ? b : std::min(a, b)); }
template <typename T>
T nan_max(T a, T b) { return std::isnan(a) ? a : (std::isnan(b) ? b : std::max(a, b)); }
template <typename T>
T nan_clamp_min(T a, T lo) { return std::isnan(a) ? a : std::max(a, lo); }

// "sum(x) > 0" for x >= 0 (or NaN) without summing: some element positive and none NaN.
template <typename T>
bool positive_sum(const T* x, int64_t n) {
  bool positive = false;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return false;
    positive |= x[i] > T(0);
  }
  return positive;
}

// _quantile_index: the first index where running / total reaches q.
template <typename T>
int64_t quantile_index(const T* running, T total, int64_t L, double q) {
  int64_t below = 0;
  for (int64_t i = 0; i < L; ++i) below += running[i] / total < T(q);
  return std::min(below, L - 1);
}

// _reach_back: the lowest index reached from `start` stepping back through inked positions no more
// than `gap` apart, at most `limit` before it; inked(i): whether position i holds strong ink.
template <typename Inked>
int64_t reach_back(Inked inked, int64_t L, int64_t start, int64_t gap, int64_t limit) {
  int64_t previous = -L - 1, first = -1;
  for (int64_t i = 0; i <= start && i < L; ++i) {
    if (!(inked(i) || i == start)) continue;
    if (i - previous - 1 > gap) first = i;  // opens a run
    previous = i;
  }
  return std::max(first, start - limit);
}

int64_t rounded(float scale, int64_t v) { return static_cast<int64_t>(std::floor(scale * static_cast<float>(v) + 0.5f)); }

at::Tensor ink_boxes_cpu(const at::Tensor& ink_in) {
  TORCH_CHECK(ink_in.dim() == 4 && ink_in.size(1) == 1, "ink_boxes: ink must be (N, 1, H, W), got shape ",
              ink_in.sizes());
  TORCH_CHECK(ink_in.scalar_type() == at::kFloat || ink_in.scalar_type() == at::kDouble,
              "ink_boxes: ink must be float32 or float64, got ", ink_in.scalar_type());
  TORCH_CHECK(ink_in.numel() > 0, "ink_boxes: ink must not be empty, got shape ", ink_in.sizes());
  const at::Tensor ink = ink_in.contiguous();
  const int64_t N = ink.size(0), H = ink.size(2), W = ink.size(3), P = H * W;
  at::Tensor mass = at::empty({N, H, W}, ink.options());
  at::Tensor solid_rows = at::empty({N, H}, ink.options().dtype(at::kBool));
  std::vector<uint8_t> has_ink(N);
  AT_DISPATCH_FLOATING_TYPES(ink.scalar_type(), "ink_boxes", [&] {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> eroded(P), opened(P);
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* x = ink.data_ptr<scalar_t>() + n * P;
        // the vertical opening (3 px, edges replicated), then the haze of 0.1 off
        auto row = [&](int64_t h) { return replicated(h, H) * W; };
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w)
            eroded[h * W + w] = nan_min(nan_min(x[row(h - 1) + w], x[h * W + w]), x[row(h + 1) + w]);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w)
            opened[h * W + w] = nan_clamp_min(
                nan_max(nan_max(eroded[row(h - 1) + w], eroded[h * W + w]), eroded[row(h + 1) + w]) - scalar_t(0.1),
                scalar_t(0));
        bool* solid = solid_rows.data_ptr<bool>() + n * H;
        for (int64_t h = 0; h < H; ++h) {
          solid[h] = false;
          for (int64_t w = 0; w < W; ++w) solid[h] |= opened[h * W + w] > scalar_t(0.4);
        }
        // the mass: the opened map, or the faint one where opening left nothing; all ones without ink
        scalar_t* m = mass.data_ptr<scalar_t>() + n * P;
        if (positive_sum(opened.data(), P)) {
          std::copy(opened.begin(), opened.end(), m);
        } else {
          for (int64_t i = 0; i < P; ++i) m[i] = nan_clamp_min(x[i] - scalar_t(0.1), scalar_t(0));
        }
        has_ink[n] = positive_sum(m, P);
        if (!has_ink[n]) std::fill(m, m + P, scalar_t(1));
      }
    });
  });
  // the float sums as the ATen path computes them
  const at::Tensor rows = mass.sum(2), cols = mass.sum(1);
  const at::Tensor rows_run = rows.cumsum(1), cols_run = cols.cumsum(1);
  const at::Tensor rows_total = rows.sum(1), cols_total = cols.sum(1);
  at::Tensor boxes = at::empty({N, 4}, ink.options().dtype(at::kLong));
  int64_t* box = boxes.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(ink.scalar_type(), "ink_boxes", [&] {
    for (int64_t n = 0; n < N; ++n, box += 4) {
      if (!has_ink[n]) {
        box[0] = 0, box[1] = H - 1, box[2] = 0, box[3] = W - 1;
        continue;
      }
      const scalar_t* rr = rows_run.data_ptr<scalar_t>() + n * H;
      const scalar_t* cr = cols_run.data_ptr<scalar_t>() + n * W;
      const scalar_t rt = rows_total.data_ptr<scalar_t>()[n], ct = cols_total.data_ptr<scalar_t>()[n];
      const int64_t top = quantile_index(rr, rt, H, 0.02), bottom = quantile_index(rr, rt, H, 0.98);
      const int64_t left = quantile_index(cr, ct, W, 0.01), right = quantile_index(cr, ct, W, 0.99);
      const int64_t band = bottom - top + 1, gap = rounded(0.4f, band), reach = rounded(0.6f, band);
      const bool* solid = solid_rows.data_ptr<bool>() + n * H;
      const int64_t up = reach_back([&](int64_t i) { return solid[i]; }, H, top, gap, reach);
      const int64_t down = H - 1 - reach_back([&](int64_t i) { return solid[H - 1 - i]; }, H, H - 1 - bottom, gap, reach);
      const int64_t margin = std::max<int64_t>(rounded(0.15f, band), 2), side = std::max<int64_t>(rounded(0.25f, band), 2);
      box[0] = std::max<int64_t>(std::min(up, top - margin), 0);
      box[1] = std::min(std::max(down, bottom + margin), H - 1);
      box[2] = std::max<int64_t>(left - side, 0);
      box[3] = std::min(right + side, W - 1);
    }
  });
  return boxes;
}

// to_ink after the background estimate: the distance from the background (extended linearly over
// the border band), frame lines of the band removed, divided by the ink's strength.
at::Tensor ink_from_background_cpu(const at::Tensor& x_in, const at::Tensor& bg_in, int64_t b) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.numel() > 0, "ink_from_background: x must be a non-empty (N, C, H, W), got shape ",
              x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "ink_from_background: x must be float32 or float64, got ", x_in.scalar_type());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(b >= 0 && 2 * b < H && 2 * b < W, "ink_from_background: border ", b, " too wide for a ",
              W, " x ", H, " (width x height) image");
  const int64_t h = H - 2 * b, w = W - 2 * b;
  TORCH_CHECK(bg_in.scalar_type() == x_in.scalar_type() && bg_in.dim() == 4 && bg_in.size(0) == N &&
                  bg_in.size(1) == C && bg_in.size(2) == h && bg_in.size(3) == w,
              "ink_from_background: the background must be x's inside its border, (", N, ", ", C, ", ", h, ", ", w,
              ") ", x_in.scalar_type(), ", got ", bg_in.sizes(), " ", bg_in.scalar_type());
  TORCH_CHECK(b == 0 || (b < h && b < w), "ink_from_background: border ", b, " too wide for a ",
              W, " x ", H, " (width x height) image");
  const at::Tensor x = x_in.contiguous(), bg = bg_in.contiguous();
  at::Tensor dist = at::empty({N, 1, H, W}, x.options()), masked = at::empty_like(dist);
  at::Tensor peaks = at::empty({N}, x.options());
  std::vector<int64_t> strong(N);  // pixels within half of the peak
  const int64_t P = H * W;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ink_from_background", [&] {
    using T = scalar_t;
    const T threshold = T(0.06);  // MIN_CONTRAST
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* xn = x.data_ptr<T>() + n * C * P;
        const T* bn = bg.data_ptr<T>() + n * C * h * w;
        T* d = dist.data_ptr<T>() + n * P;
        auto reflect = [](int64_t i, int64_t size) { return i < 0 ? -i : (i >= size ? 2 * (size - 1) - i : i); };
        for (int64_t i = 0; i < H; ++i) {
          const int64_t ir = replicated(i - b, h), if_ = reflect(i - b, h);
          for (int64_t j = 0; j < W; ++j) {
            const int64_t jr = replicated(j - b, w), jf = reflect(j - b, w);
            T m = 0;
            for (int64_t c = 0; c < C; ++c) {
              const T* bc = bn + c * h * w;
              const T back = b > 0 ? T(2) * bc[ir * w + jr] - bc[if_ * w + jf] : bc[i * w + j];
              const T diff = std::abs(xn[c * P + i * W + j] - back);
              m = c == 0 ? diff : nan_max(m, diff);
            }
            d[i * W + j] = m;
          }
        }
        if (b > 0) {  // frame lines: a row or column of the band that stands out along 80% of its length
          std::vector<uint8_t> drop_row(H, 0), drop_col(W, 0);
          for (int64_t i = 0; i < H; ++i) {
            if (i >= b && i < H - b) continue;
            int64_t count = 0;
            for (int64_t j = 0; j < W; ++j) count += d[i * W + j] > threshold;
            drop_row[i] = !(T(count) / T(W) < T(0.8));
          }
          for (int64_t j = 0; j < W; ++j) {
            if (j >= b && j < W - b) continue;
            int64_t count = 0;
            for (int64_t i = 0; i < H; ++i) count += d[i * W + j] > threshold;
            drop_col[j] = !(T(count) / T(H) < T(0.8));
          }
          for (int64_t i = 0; i < H; ++i)
            for (int64_t j = 0; j < W; ++j)
              if (drop_row[i] || drop_col[j]) d[i * W + j] = d[i * W + j] * T(0);
        }
        // the peak: the strongest distance two neighbouring pixels share (the strongest on 1-px-thin images)
        bool nan = false;
        T peak = -std::numeric_limits<T>::infinity();
        auto take = [&](T v) {
          nan |= std::isnan(v);
          peak = std::max(peak, v);
        };
        if (H > 1 && W > 1) {
          for (int64_t i = 0; i < H; ++i)
            for (int64_t j = 0; j < W; ++j) {
              if (i + 1 < H) take(nan_min(d[(i + 1) * W + j], d[i * W + j]));
              if (j + 1 < W) take(nan_min(d[i * W + j + 1], d[i * W + j]));
            }
        } else {
          for (int64_t i = 0; i < P; ++i) take(d[i]);
        }
        peaks.data_ptr<T>()[n] = nan ? std::numeric_limits<T>::quiet_NaN() : peak;
        T* mk = masked.data_ptr<T>() + n * P;
        const T half = T(0.5) * peaks.data_ptr<T>()[n];
        int64_t count = 0;
        for (int64_t i = 0; i < P; ++i) {
          count += d[i] >= half;
          mk[i] = d[i] * (d[i] >= half ? T(1) : T(0));
        }
        strong[n] = count;
      }
    });
  });
  // the strength: the mean distance of the strong pixels, the sum by ATen as the ATen path's
  const at::Tensor strong_sum = masked.sum({1, 2, 3});
  at::Tensor ink = at::empty_like(dist);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ink_from_background", [&] {
    using T = scalar_t;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* d = dist.data_ptr<T>() + n * P;
        const T peak = peaks.data_ptr<T>()[n];
        const T strength = nan_clamp_min(strong_sum.data_ptr<T>()[n] / T(strong[n]), T(0.06));
        const T on = peak >= T(0.06) ? T(1) : T(0);
        T* out = ink.data_ptr<T>() + n * P;
        for (int64_t i = 0; i < P; ++i) out[i] = nan_min(d[i] / strength, T(1)) * on;
      }
    });
  });
  return ink;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(captcha_fast, m) {
  m.def("grid_medians(Tensor samples) -> Tensor");
  m.def("ink_boxes(Tensor ink) -> Tensor");
  m.def("ink_from_background(Tensor x, Tensor background, int border) -> Tensor");
}

TORCH_LIBRARY_IMPL(captcha_fast, CPU, m) {
  m.impl("grid_medians", &grid_medians_cpu);
  m.impl("ink_boxes", &ink_boxes_cpu);
  m.impl("ink_from_background", &ink_from_background_cpu);
}

}  // namespace captcha_fast
