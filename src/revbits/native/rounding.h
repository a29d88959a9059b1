// Round half to even without a libm call, for the native kernels (bdia_step.cpp, revrnn_fixed.h).
#pragma once

#include <cmath>
#include <limits>

namespace revbits_native {

// nearbyint under the default rounding mode: for |v| < 2^(p-1), (|v| + 2^(p-1)) - 2^(p-1) rounds |v| to the
// nearest integer, ties to even (each operation rounded to T; no -ffast-math); larger values, Inf and NaN are
// returned as they are. copysign restores the sign, -0 included.
template <typename T>
inline T round_half_even(T v) {
  constexpr T big = T(1) / std::numeric_limits<T>::epsilon();  // 2^(p-1)
  const T m = std::fabs(v);
  const T rounded = std::copysign((m + big) - big, v);
  return m < big ? rounded : v;
}

}  // namespace revbits_native
