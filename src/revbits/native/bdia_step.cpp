// BDIA's fixed-point step (revbits.bdia.step) in one pass over the states, float32 and float64 on CPU.
//
// Per element, with the grid 2^-l, |g| = 2^-b and the per-sample g (constant over a sample's `inner` elements):
//
//   forward   r = a + (-2^b) floor(a 2^-b),  a = x_prev (-2^l)               (residue; bit i of r -> plane i)
//             u = round(y ((1 + g) 2^l) + ((-2 2^l) x) g) 2^-l               (combine)
//             x_next = u + (x_prev + 2^-l r) g                                (forward_step_)
//   inverse   x_prev = (u - x_next) (-(1/g)) + (-2^-l) r                     (inverse_step_, r from the planes)
//   gradients grad_y = (1 + g) dx1;  out = dx2 g1 + ((-2) dx1) g,  or dx1 (-2 g) where there is no dx2
//             (the last sum rounded as ATen's addcmul rounds it on this machine: see skip_run)
//
// Every operation is the one ATen's kernels apply in the Python path, in the same order, each rounded once:
// products by powers of two and sums of grid values are exact, and the one inexact product (y times
// (1 + g) 2^l) and the sum after it round as ATen's separate multiply and add do (built with
// -ffp-contract=off, so no fused multiply-add). round() is round-half-to-even and keeps the sign of a zero
// (nearbyint); floor() is IEEE floor; both are written with the 2^(p-1) trick, exact under the default
// rounding mode, so that no libm call sits in the loop.

// gcc's -O2 vectorises only loops without a remainder, and with trapping math it does not turn the selects of
// round_half_even into vector blends. Neither option changes a result: no-trapping-math only lets the compiler
// ignore floating-point exception flags (no contraction, reassociation or other rounding mode follows from it).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3", "no-trapping-math")
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "rounding.h"

namespace {

using revbits_native::round_half_even;

// The loops over elements are compiled twice on x86-64 Linux with gcc, for AVX2 and for any x86-64, and the
// loader picks one for the machine (no FMA in either: AVX2 alone does not enable it). Both compute the same bits.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BDIA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BDIA_CLONES
#endif

constexpr int64_t kGrainBytes = 4096;  // groups of 8 elements per parallel task

template <typename T>
inline T floor_exact(T v) {
  const T t = round_half_even(v);
  const T below = t - T(1);  // computed either way: loops with no branch are vectorised
  return t > v ? below : t;
}

// g for each sample: g.numel() is 1 (one g for all) or x.size(0); inner = elements per sample.
struct Samples {
  int64_t inner;
  bool single;
};

Samples samples_of(const at::Tensor& g, const at::Tensor& x) {
  TORCH_CHECK(g.is_contiguous() && g.scalar_type() == x.scalar_type() && g.device().is_cpu(),
              "bdia_step: g must be a contiguous CPU tensor of the states' dtype");
  TORCH_CHECK(x.dim() >= 1 && (g.numel() == 1 || g.numel() == x.size(0)),
              "bdia_step: g must hold one value, or one per sample");
  int64_t batch = x.size(0);
  return Samples{batch > 0 ? x.numel() / batch : 0, g.numel() == 1};
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == x.scalar_type() &&
                  t.sizes() == x.sizes(),
              "bdia_step: ", name, " must be a contiguous CPU tensor of x's shape and dtype");
}

template <typename T>
struct Combine {  // u = round(y c + ((v x) g)) s with c = (1 + g) 2^l, v = -2 2^l, s = 2^-l
  T c, v, s, g;
  Combine(T g_, int64_t bits) : g(g_) {
    T scale = std::ldexp(T(1), static_cast<int>(bits));
    c = (T(1) + g_) * scale;
    v = T(-2) * scale;
    s = T(1) / scale;
  }
  inline T operator()(T x, T y) const {
    T u = y * c;
    u = u + (v * x) * g;
    return round_half_even(u) * s;
  }
};

// Elements are handled in tiles of kTile (a multiple of 8, so a tile's residues fill whole bytes): within a tile,
// runs of one sample (one g) go through plain loops the compiler vectorises, into tile buffers that cannot
// alias the inputs (so `out` may be an input), and the residues' bytes are (un)packed a word at a time.
constexpr int64_t kTile = 256;

// Calls run(a, b, sample) for the runs [a, b) of [begin, end) that lie in one sample each.
template <typename Run>
inline void for_each_run(int64_t begin, int64_t end, Samples smp, Run run) {
  if (smp.single) {
    run(begin, end, int64_t(0));
    return;
  }
  int64_t sample = begin / smp.inner;
  for (int64_t a = begin; a < end; ++sample) {
    const int64_t b = std::min(end, (sample + 1) * smp.inner);
    run(a, b, sample);
    a = b;
  }
}

template <typename T>
BDIA_CLONES void forward_run(const T* xp, const T* xc, const T* y, int64_t count, Combine<T> combine, int64_t bits,
                 int64_t gamma_bits, T* x_next, uint8_t* residues) {
  const T up = std::ldexp(T(-1), static_cast<int>(bits));           // -(2^l)
  const T down = std::ldexp(T(1), -static_cast<int>(gamma_bits));   // 2^-b
  const T alpha = std::ldexp(T(-1), static_cast<int>(gamma_bits));  // -(2^b)
  const T grid = std::ldexp(T(1), -static_cast<int>(bits));         // 2^-l
  const T g = combine.g;
  for (int64_t e = 0; e < count; ++e) {
    const T x_prev = xp[e];
    const T a = x_prev * up;
    const T r = a + alpha * floor_exact(a * down);
    x_next[e] = combine(xc[e], y[e]) + (x_prev + grid * r) * g;
    residues[e] = static_cast<uint8_t>(static_cast<int32_t>(r));  // r in [0, 2^b): its byte, as r.to(int8/uint8)
  }
}

// Plane i of the residue bytes of 8 elements (the bytes of one word, byte t in bits 8t .. 8t + 7): bit t of the
// result is bit i of byte t (the word shifts of revbits.bdia.bits).
inline uint8_t plane_byte(uint64_t word, int64_t i) {
  uint64_t plane = (word >> i) & 0x0101010101010101ULL;
  plane |= plane >> 7;
  plane |= plane >> 14;
  plane |= plane >> 28;
  return static_cast<uint8_t>(plane);
}

// The word whose byte t holds bit t of `packed` (0 or 1).
inline uint64_t spread_byte(uint8_t packed) {
  uint64_t word = 0;
  for (int t = 0; t < 8; ++t) word |= static_cast<uint64_t>((packed >> t) & 1) << (8 * t);
  return word;
}

inline uint64_t load_word(const uint8_t* bytes) {  // bytes[t] in bits 8t .. 8t + 7, whatever the byte order
  uint64_t word = 0;
  for (int t = 0; t < 8; ++t) word |= static_cast<uint64_t>(bytes[t]) << (8 * t);
  return word;
}

inline void store_word(uint64_t word, uint8_t* bytes) {
  for (int t = 0; t < 8; ++t) bytes[t] = static_cast<uint8_t>(word >> (8 * t));
}

template <typename T>
void forward_range(const T* xp, const T* xc, const T* y, const T* g, T* out, uint8_t* planes, int64_t nbytes,
                   int64_t n, Samples smp, int64_t bits, int64_t gamma_bits, int64_t byte_begin, int64_t byte_end) {
  T x_next[kTile];
  uint8_t residues[kTile];
  const int64_t stop = std::min(byte_end * 8, n);
  for (int64_t e0 = byte_begin * 8; e0 < stop; e0 += kTile) {
    const int64_t e1 = std::min(e0 + kTile, stop);
    for_each_run(e0, e1, smp, [&](int64_t a, int64_t b, int64_t sample) {
      forward_run<T>(xp + a, xc + a, y + a, b - a, Combine<T>(g[sample], bits), bits, gamma_bits, x_next + (a - e0),
                     residues + (a - e0));
    });
    std::copy(x_next, x_next + (e1 - e0), out + e0);
    if (!planes) continue;
    std::fill(residues + (e1 - e0), residues + kTile, uint8_t(0));  // the last byte's padding
    for (int64_t j = 0; j < (e1 - e0 + 7) / 8; ++j) {
      const uint64_t word = load_word(residues + 8 * j);
      for (int64_t i = 0; i < gamma_bits; ++i) planes[i * nbytes + e0 / 8 + j] = plane_byte(word, i);
    }
  }
}

// x_next = u + (x_prev + 2^-l r) g with r the residue of x_prev, written in `out` (which may be x_prev itself:
// each element is read before it is written); returns the [b, ceil(n/8)] uint8 bit planes of r (or an empty
// tensor without `keep`).
at::Tensor forward_step(const at::Tensor& x_prev, const at::Tensor& x_cur, const at::Tensor& y, const at::Tensor& g,
                        int64_t bits, int64_t gamma_bits, bool keep, at::Tensor& out) {
  check_like(x_cur, x_prev, "x_cur");
  check_like(y, x_prev, "y");
  check_like(out, x_prev, "out");
  TORCH_CHECK(x_prev.scalar_type() == at::kFloat || x_prev.scalar_type() == at::kDouble,
              "bdia_step: the states must be float32 or float64");
  TORCH_CHECK(gamma_bits >= 1 && gamma_bits <= 8, "bdia_step: gamma_bits must be 1 to 8");
  Samples smp = samples_of(g, x_prev);
  const int64_t n = x_prev.numel(), nbytes = (n + 7) / 8;
  at::Tensor planes = at::empty({keep ? gamma_bits : 0, keep ? nbytes : 0}, x_prev.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(x_prev.scalar_type(), "bdia_forward_step", [&] {
    const scalar_t *xp = x_prev.data_ptr<scalar_t>(), *xc = x_cur.data_ptr<scalar_t>();
    const scalar_t *yp = y.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    uint8_t* pp = keep ? planes.data_ptr<uint8_t>() : nullptr;
    at::parallel_for(0, nbytes, kGrainBytes, [&](int64_t begin, int64_t end) {
      forward_range<scalar_t>(xp, xc, yp, gp, op, pp, nbytes, n, smp, bits, gamma_bits, begin, end);
    });
  });
  return planes;
}

template <typename T>
BDIA_CLONES void inverse_run(const T* xn, const T* xc, const T* y, const uint8_t* residues, int64_t count, Combine<T> combine,
                 int64_t bits, T* x_prev) {
  const T minus_grid = std::ldexp(T(-1), -static_cast<int>(bits));  // -(2^-l)
  const T factor = -(T(1) / combine.g);
  for (int64_t e = 0; e < count; ++e) {
    x_prev[e] = (combine(xc[e], y[e]) - xn[e]) * factor + minus_grid * static_cast<T>(residues[e]);
  }
}

template <typename T>
void inverse_range(const T* xn, const T* xc, const T* y, const T* g, const uint8_t* planes, int64_t nbytes, int64_t n,
                   Samples smp, int64_t bits, int64_t width, T* out, int64_t byte_begin, int64_t byte_end) {
  T x_prev[kTile];
  uint8_t residues[kTile];
  const int64_t stop = std::min(byte_end * 8, n);
  for (int64_t e0 = byte_begin * 8; e0 < stop; e0 += kTile) {
    const int64_t e1 = std::min(e0 + kTile, stop);
    for (int64_t j = 0; j < (e1 - e0 + 7) / 8; ++j) {
      uint64_t word = 0;
      for (int64_t i = 0; i < width; ++i) word |= spread_byte(planes[i * nbytes + e0 / 8 + j]) << i;
      store_word(word, residues + 8 * j);
    }
    for_each_run(e0, e1, smp, [&](int64_t a, int64_t b, int64_t sample) {
      inverse_run<T>(xn + a, xc + a, y + a, residues + (a - e0), b - a, Combine<T>(g[sample], bits), bits,
                     x_prev + (a - e0));
    });
    std::copy(x_prev, x_prev + (e1 - e0), out + e0);
  }
}

// x_prev = (x_next - u) / g - 2^-l r, written in `out` (which may be x_next itself).
void inverse_step(const at::Tensor& x_next, const at::Tensor& x_cur, const at::Tensor& y, const at::Tensor& g,
                  const at::Tensor& planes, int64_t bits, at::Tensor& out) {
  check_like(x_cur, x_next, "x_cur");
  check_like(y, x_next, "y");
  check_like(out, x_next, "out");
  TORCH_CHECK(x_next.scalar_type() == at::kFloat || x_next.scalar_type() == at::kDouble,
              "bdia_step: the states must be float32 or float64");
  Samples smp = samples_of(g, x_next);
  const int64_t n = x_next.numel(), nbytes = (n + 7) / 8;
  TORCH_CHECK(planes.scalar_type() == at::kByte && planes.is_contiguous() && planes.dim() == 2 &&
                  planes.size(1) == nbytes && planes.size(0) >= 1 && planes.size(0) <= 8,
              "bdia_step: the planes must be a contiguous [b, ceil(n/8)] uint8 tensor");
  const int64_t width = planes.size(0);
  AT_DISPATCH_FLOATING_TYPES(x_next.scalar_type(), "bdia_inverse_step", [&] {
    const scalar_t *xn = x_next.data_ptr<scalar_t>(), *xc = x_cur.data_ptr<scalar_t>();
    const scalar_t *yp = y.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    const uint8_t* pp = planes.data_ptr<uint8_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, nbytes, kGrainBytes, [&](int64_t begin, int64_t end) {
      inverse_range<scalar_t>(xn, xc, yp, gp, pp, nbytes, n, smp, bits, width, op, begin, end);
    });
  });
}

// out = g1 dx2 + ((-2) dx1) g for one sample's run, into a tile buffer, and grad_y = (1 + g) dx1; returns whether
// some product ((-2) dx1) g was subnormal, the one case where it is not exact and ATen's addcmul, compiled with
// fused multiply-adds (AVX2, AVX-512), rounds the sum differently from a separate product and sum.
template <typename T>
BDIA_CLONES int skip_run(const T* dx1, const T* dx2, T g1, T g, int64_t count, T* grad_y, T* skip) {
  const T one_plus = T(1) + g, smallest = std::numeric_limits<T>::min();
  int subnormal = 0;
  for (int64_t e = 0; e < count; ++e) {
    const T d1 = dx1[e], product = (T(-2) * d1) * g;
    grad_y[e] = one_plus * d1;
    skip[e] = dx2[e] * g1 + product;
    subnormal |= (std::fabs(product) < smallest) & (d1 != T(0));
  }
  return subnormal;
}

// out = dx1 (-2 g) (block K-1, no dx2: one product, one rounding) and grad_y = (1 + g) dx1.
template <typename T>
BDIA_CLONES void top_run(const T* dx1, T g, int64_t count, T* grad_y, T* skip) {
  const T one_plus = T(1) + g, minus_two_g = T(-2) * g;
  for (int64_t e = 0; e < count; ++e) {
    grad_y[e] = one_plus * dx1[e];
    skip[e] = dx1[e] * minus_two_g;
  }
}

template <typename T>
void gradients_range(const T* dx1, const T* dx2, const T* g1, const T* g, Samples smp, T* grad_y, T* out,
                     bool fused, int64_t begin, int64_t end) {
  T skip[kTile];  // written to out once the tile's dx2 has been read (out may be dx2)
  for (int64_t e0 = begin; e0 < end; e0 += kTile) {
    const int64_t e1 = std::min(e0 + kTile, end);
    for_each_run(e0, e1, smp, [&](int64_t a, int64_t b, int64_t sample) {
      T* tile = skip + (a - e0);
      if (!dx2) {
        top_run<T>(dx1 + a, g[sample], b - a, grad_y + a, tile);
      } else if (skip_run<T>(dx1 + a, dx2 + a, g1[sample], g[sample], b - a, grad_y + a, tile) && fused) {
        for (int64_t e = a; e < b; ++e) tile[e - a] = std::fma(T(-2) * dx1[e], g[sample], dx2[e] * g1[sample]);
      }
    });
    std::copy(skip, skip + (e1 - e0), out + e0);
  }
}

// grad_y = (1 + g) dx1 (returned) and out = g1 dx2 - 2 g dx1 (or -2 g dx1 without dx2), for block k >= 1 of the
// backward; `out` may be dx2 itself. `fused`: round the sum with the product once, as ATen's addcmul does here.
at::Tensor step_gradients(const at::Tensor& dx1, const c10::optional<at::Tensor>& dx2,
                          const c10::optional<at::Tensor>& g1, const at::Tensor& g, bool fused, at::Tensor& out) {
  TORCH_CHECK(dx1.device().is_cpu() && dx1.is_contiguous() &&
                  (dx1.scalar_type() == at::kFloat || dx1.scalar_type() == at::kDouble),
              "bdia_step: the gradients must be contiguous float32 or float64 CPU tensors");
  check_like(out, dx1, "out");
  Samples smp = samples_of(g, dx1);
  TORCH_CHECK(dx2.has_value() == g1.has_value(), "bdia_step: dx2 and g1 come together");
  if (dx2.has_value()) {
    check_like(*dx2, dx1, "dx2");
    Samples other = samples_of(*g1, dx1);
    TORCH_CHECK(other.single == smp.single, "bdia_step: g and g1 must have the same shape");
  }
  at::Tensor grad_y = at::empty_like(dx1, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(dx1.scalar_type(), "bdia_step_gradients", [&] {
    const scalar_t* d1 = dx1.data_ptr<scalar_t>();
    const scalar_t* d2 = dx2.has_value() ? dx2->data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp1 = g1.has_value() ? g1->data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t *gy = grad_y.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>();
    at::parallel_for(0, dx1.numel(), kGrainBytes * 8, [&](int64_t begin, int64_t end) {
      gradients_range<scalar_t>(d1, d2, gp1, gp, smp, gy, op, fused, begin, end);
    });
  });
  return grad_y;
}

}  // namespace

TORCH_LIBRARY(revbits_bdia_step, m) {
  m.def("forward_step(Tensor x_prev, Tensor x_cur, Tensor y, Tensor g, int bits, int gamma_bits, bool keep, "
        "Tensor(a!) out) -> Tensor",
        &forward_step);
  m.def("inverse_step(Tensor x_next, Tensor x_cur, Tensor y, Tensor g, Tensor planes, int bits, Tensor(a!) out) -> ()",
        &inverse_step);
  m.def("step_gradients(Tensor dx1, Tensor? dx2, Tensor? g1, Tensor g, bool fused, Tensor(a!) out) -> Tensor",
        &step_gradients);
}
