// The fixed-point arithmetic the reversible RNN cells' operators share (revrnn.cpp): row views, exact floor
// division, rounding half to even, the rounded products, and the buffer's exact update and its inverse.
// Included by revrnn.cpp only (revbits.native hashes every header beside the sources into the library's name).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "rounding.h"

namespace revrnn_fixed {

using revbits_native::round_half_even;

constexpr int64_t kGateBits = 10;  // gates are n / 2**10
constexpr int64_t kLowMask = (int64_t{1} << kGateBits) - 1;
constexpr double kStateGrid = 1.0 / 8388608.0;  // states hold round(v * 2**23)

using Mask = std::optional<at::Tensor>;

// A [B, H] block of a row-major tensor whose rows are `stride` elements apart (a gate slot, or a half).
template <typename T>
struct Rows {
  T* data;
  int64_t stride;
  T* row(int64_t b) const { return data + b * stride; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t, int64_t first_column = 0) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, "revbits_revrnn: expected a 2-D tensor with contiguous rows");
  return {t.data_ptr<T>() + first_column, t.stride(0)};
}

struct RowMask {
  at::Tensor owner;
  const bool* data = nullptr;
  explicit RowMask(const Mask& active) {
    if (active.has_value()) {
      owner = active->contiguous();
      data = owner.data_ptr<bool>();
    }
  }
  bool on(int64_t b) const { return data == nullptr || data[b]; }
};

// floor(a / n) for |a| < 2**52 and n >= 1, without a branch (so loops over it vectorise): the truncated
// double quotient is off by at most one, and the remainder's sign and size say which way.
inline int64_t floor_div_small(int64_t a, int64_t n) {
  int64_t q = static_cast<int64_t>(static_cast<double>(a) / static_cast<double>(n));
  const int64_t r = a - q * n;
  return q - (r < 0) + (r >= n);
}

// floor(a / n) for any a and n >= 1: floor_div_small below 2**52, integer division (truncating) above.
inline int64_t floor_div(int64_t a, int64_t n) {
  if (a > -(int64_t{1} << 52) && a < (int64_t{1} << 52)) return floor_div_small(a, n);
  const int64_t q = a / n;
  return q - (a - q * n < 0);
}

// A gate's numerator n = clamp(round(s (1 - keep) 2**10 [+ keep 2**10]), lowest, 2**10) (ForgetGate.numerator),
// with slope_scale = (1 - keep) 2**10 and keep_scale = keep 2**10 in T.
template <typename T>
inline T gate_numerator(T s, T slope_scale, T keep_scale, bool keeps, T lowest) {
  T v = s * slope_scale;
  if (keeps) v = v + keep_scale;
  v = round_half_even(v);
  return v < lowest ? lowest : (v > T(1024) ? T(1024) : v);
}

// round(a b 2**23) as ATen's round(addcmul(0, a, b, value=2**23)) computes it: (2**23 a) b, rounded once.
template <typename T>
inline int64_t fixed_product(T a, T b) {
  return static_cast<int64_t>(round_half_even((T(8388608.0) * a) * b));
}

// h n / 2**10 through the word W: p = W 2**10 + (h mod 2**10), W' = floor(p / n),
// h' = floor(h / 2**10) n + (p mod n) + add.
inline std::pair<int64_t, int64_t> multiply_add(int64_t h, int64_t n, int64_t add, int64_t word) {
  const int64_t pushed = (h & kLowMask) + word * (int64_t{1} << kGateBits);
  const int64_t quotient = floor_div(pushed, n);
  return {(pushed - quotient * n) + (h >> kGateBits) * n + add, quotient};
}

// Its inverse: h = h' - add; p = W' n + (h mod n), W = floor(p / 2**10); h = floor(h / n) 2**10 + (p mod 2**10).
// |h' - add| < 2**32: states stay below 2**31 (the range check) and |add| <= 2**23.
inline std::pair<int64_t, int64_t> subtract_divide(int64_t h_new, int64_t n, int64_t add, int64_t word) {
  const int64_t h = h_new - add;
  const int64_t quotient = floor_div_small(h, n);
  const int64_t pushed = (h - quotient * n) + word * n;
  return {(pushed & kLowMask) + quotient * (int64_t{1} << kGateBits), pushed >> kGateBits};
}

inline at::Tensor like(const at::Tensor& t, at::ScalarType dtype) { return at::empty(t.sizes(), t.options().dtype(dtype)); }

// ---- one update of a half-state, and its inverse ------------------------------------------------

// For every element of [B, H]: (h_out, W_out) = element(h, n, add, W) on active rows; h and W copied on the
// others. The numerators n are integers held in a floating tensor (the gates' dtype).
template <typename Element>
std::tuple<at::Tensor, at::Tensor> over_active_rows(
    const at::Tensor& h, const at::Tensor& n, const at::Tensor& add, const at::Tensor& word, const Mask& active,
    Element element) {
  at::Tensor h_out = like(h, at::kLong), word_out = like(word, at::kLong);
  auto hi = rows_of<int64_t>(h), ai = rows_of<int64_t>(add), wi = rows_of<int64_t>(word);
  auto ho = rows_of<int64_t>(h_out), wo = rows_of<int64_t>(word_out);
  RowMask mask(active);
  AT_DISPATCH_FLOATING_TYPES(n.scalar_type(), "over_active_rows", [&] {
    auto ni = rows_of<scalar_t>(n);
    for (int64_t b = 0; b < h.size(0); ++b) {
      const int64_t *__restrict hr = hi.row(b), *__restrict ar = ai.row(b), *__restrict wr = wi.row(b);
      const scalar_t* __restrict nr = ni.row(b);
      int64_t *__restrict hn = ho.row(b), *__restrict wn = wo.row(b);
      if (mask.on(b)) {
        for (int64_t j = 0; j < h.size(1); ++j) {
          const auto [h_new, w_new] = element(hr[j], static_cast<int64_t>(nr[j]), ar[j], wr[j]);
          hn[j] = h_new;
          wn[j] = w_new;
        }
      } else {
        for (int64_t j = 0; j < h.size(1); ++j) hn[j] = hr[j], wn[j] = wr[j];
      }
    }
  });
  return {h_out, word_out};
}

// (h', W', float(h')) of exact_update: h' = h n / 2**10 + add on active rows (others keep h and W).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> fixed_update(
    const at::Tensor& h, const at::Tensor& n, const at::Tensor& add, const at::Tensor& word, const Mask& active,
    at::ScalarType dtype) {
  auto [h_out, word_out] = over_active_rows(h, n, add, word, active, [](auto... a) { return multiply_add(a...); });
  at::Tensor value = like(h, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fixed_update", [&] {
    const int64_t* hn = h_out.data_ptr<int64_t>();
    scalar_t* v = value.data_ptr<scalar_t>();
    for (int64_t k = 0; k < h_out.numel(); ++k) v[k] = static_cast<scalar_t>(hn[k]) * scalar_t(kStateGrid);
  });
  return {h_out, word_out, value};
}

// (h, W) before fixed_update, from h' and W' (the caller pops a spilled word afterwards).
inline std::tuple<at::Tensor, at::Tensor> fixed_reverse(
    const at::Tensor& h_new, const at::Tensor& n, const at::Tensor& add, const at::Tensor& word, const Mask& active) {
  return over_active_rows(h_new, n, add, word, active, [](auto... a) { return subtract_divide(a...); });
}

}  // namespace revrnn_fixed
