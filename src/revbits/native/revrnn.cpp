// The reversible RNN cells' fixed-point chains, one operator each (revbits/revrnn/fused.py says where
// they run).
//
// Each operator computes what a chain of ATen operators in revbits/revrnn/{fixed_point,info_buffer,
// cells}.py computes, bit for bit: sigmoid, tanh, tanh_backward and addcmul go through ATen on the same
// tensors (ATen may round a (1 - y y) or a + b c once, as a fused multiply-add); integer arithmetic is
// exact; every other float product or sum is rounded once, as ATen's loops round it (the library is
// built with -ffp-contract=off). A half-state is [B, H] (int64 for states and words; gate numerators are
// integers held in the gates' float dtype); the
// gates of a RevLSTM half are [B, 5H] in slots [f, g, i, o, p]. `active` is an optional bool [B]:
// rows that are false keep their state and word.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "revrnn_fixed.h"

namespace {

using namespace revrnn_fixed;

// ---- the RevLSTM half ---------------------------------------------------------------------------

// The native LSTMHalf's (c_add, numerators, s, tg) from the logits [B, 5H]: s = sigmoid(logits);
// the numerators of f and p, [B, 2H], clamp(round(s (1 - keep) 2**10 [+ keep 2**10]), lowest, 2**10) (the
// other slots' are never used); tg = tanh(logits of g); c_add = fixed(s_i tg).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_terms(
    const at::Tensor& logits, double keep, int64_t lowest) {
  const int64_t half = logits.size(1) / 5, width = logits.size(1);
  at::Tensor s = at::sigmoid(logits);
  at::Tensor tg = at::tanh(logits.slice(1, half, 2 * half)).contiguous();
  at::Tensor numerators = at::empty({s.size(0), 2 * half}, s.options()), c_add = like(tg, at::kLong);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "lstm_terms", [&] {
    using T = scalar_t;
    const T slope_scale = T((1.0 - keep) * 1024.0), keep_scale = T(keep * 1024.0), low = T(lowest);
    const bool keeps = keep != 0.0;
    for (int64_t b = 0; b < s.size(0); ++b) {
      const T* sr = s.data_ptr<T>() + b * width;
      T* nf = numerators.data_ptr<T>() + b * 2 * half;
      for (int64_t k = 0; k < 2; ++k) {  // f (slot 0) and p (slot 4)
        const T* gate = sr + (k == 0 ? 0 : 4 * half);
        for (int64_t j = 0; j < half; ++j) {
          nf[k * half + j] = gate_numerator(gate[j], slope_scale, keep_scale, keeps, low);
        }
      }
      const T* gr = tg.data_ptr<T>() + b * half;
      int64_t* ca = c_add.data_ptr<int64_t>() + b * half;
      for (int64_t j = 0; j < half; ++j) ca[j] = fixed_product(sr[2 * half + j], gr[j]);
    }
  });
  return {c_add, numerators, s, tg};
}

// fixed(o tanh(c)) per element, with o the slot of s.
template <typename T>
at::Tensor output_gate_products(const at::Tensor& s, const at::Tensor& tanh_c) {
  const int64_t half = tanh_c.size(1);
  at::Tensor products = like(tanh_c, at::kLong);
  for (int64_t b = 0; b < tanh_c.size(0); ++b) {
    const T* o = s.data_ptr<T>() + b * s.stride(0) + 3 * half;
    const T* t = tanh_c.data_ptr<T>() + b * half;
    int64_t* p = products.data_ptr<int64_t>() + b * half;
    for (int64_t j = 0; j < half; ++j) p[j] = fixed_product(o[j], t[j]);
  }
  return products;
}

// The h update of a RevLSTM half after its c update: h' = h p_q + fixed(o tanh(c')).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_h_update(
    const at::Tensor& s, const at::Tensor& n, const at::Tensor& c_value, const at::Tensor& h, const at::Tensor& word,
    const Mask& active) {
  const int64_t half = h.size(1);
  at::Tensor tanh_c = at::tanh(c_value).contiguous();
  at::Tensor h_add;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "lstm_h_update", [&] { h_add = output_gate_products<scalar_t>(s, tanh_c); });
  return fixed_update(h, n.slice(1, half, 2 * half), h_add, word, active, s.scalar_type());
}

// The first inverse of a RevLSTM half: (h, W, tanh(c')) before its h update, from c' and h'.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_h_reverse(
    const at::Tensor& s, const at::Tensor& n, const at::Tensor& c, const at::Tensor& h_new, const at::Tensor& word,
    const Mask& active) {
  const int64_t half = h_new.size(1);
  at::Tensor c_value = like(c, s.scalar_type()), h_add, tanh_c;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "lstm_h_reverse", [&] {
    const int64_t* ci = c.contiguous().data_ptr<int64_t>();
    scalar_t* cv = c_value.data_ptr<scalar_t>();
    for (int64_t k = 0; k < c.numel(); ++k) cv[k] = static_cast<scalar_t>(ci[k]) * scalar_t(kStateGrid);
    tanh_c = at::tanh(c_value).contiguous();
    h_add = output_gate_products<scalar_t>(s, tanh_c);
  });
  auto [h, w] = fixed_reverse(h_new, n.slice(1, half, 2 * half), h_add, word, active);
  return {h, w, tanh_c};
}

// The second inverse of a RevLSTM half and what its backward needs: (c, W) before its c update, the
// float h before the step, D (dL/d logits = [dc, dc, dc, dh, dh] D) and o tanh'(c'), where
// D = [k c s_f', s_i tanh'(g), tg s_i', tanh(c') s_o', k h s_p'], s' = s (1 - s), k = 1 - keep, computed
// as ATen's sigmoid_backward (a (1 - y) y) and tanh_backward compute them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_c_reverse(
    const at::Tensor& s, const at::Tensor& n, const at::Tensor& tg, const at::Tensor& tanh_c,
    const at::Tensor& c_new, const at::Tensor& c_add, const at::Tensor& h_old, const at::Tensor& word,
    const Mask& active, double keep) {
  const int64_t half = c_new.size(1), width = s.size(1);
  auto [c_old, w] = fixed_reverse(c_new, n.slice(1, 0, half), c_add, word, active);
  at::Tensor h_value = like(h_old, s.scalar_type()), derivatives = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "lstm_c_reverse", [&] {
    using T = scalar_t;
    const T slope = T(1.0 - keep), slope_grid = T((1.0 - keep) * kStateGrid);
    const bool keeps = keep != 0.0;
    for (int64_t b = 0; b < s.size(0); ++b) {
      const T *sr = s.data_ptr<T>() + b * width, *g = tg.data_ptr<T>() + b * half;
      const T* tc = tanh_c.data_ptr<T>() + b * half;
      const int64_t *cr = c_old.data_ptr<int64_t>() + b * half, *hr = h_old.data_ptr<int64_t>() + b * half;
      T *hv = h_value.data_ptr<T>() + b * half, *d = derivatives.data_ptr<T>() + b * width;
      for (int64_t j = 0; j < half; ++j) {
        hv[j] = static_cast<T>(hr[j]) * T(kStateGrid);
        T c_factor = static_cast<T>(cr[j]) * slope_grid;
        T h_factor = keeps ? hv[j] * slope : hv[j];
        d[j] = c_factor * (T(1) - sr[j]) * sr[j];
        d[2 * half + j] = g[j] * (T(1) - sr[2 * half + j]) * sr[2 * half + j];
        d[3 * half + j] = tc[j] * (T(1) - sr[3 * half + j]) * sr[3 * half + j];
        d[4 * half + j] = h_factor * (T(1) - sr[4 * half + j]) * sr[4 * half + j];
      }
    }
  });
  at::Tensor g_slot = derivatives.slice(1, half, 2 * half);
  at::tanh_backward_out(g_slot, s.slice(1, 2 * half, 3 * half), tg);
  at::Tensor tanh_derivative = at::tanh_backward(s.slice(1, 3 * half, 4 * half), tanh_c);
  return {c_old, w, h_value, derivatives, tanh_derivative};
}

// The backward of a RevLSTM half before its products: (dL/dh, dL/dc before it, dL/d logits) from dh' and
// dc' after it. With z = n / 2**10: dh = z_p dh'; dc' += dh' o tanh'(c') (ATen's addcmul); dc = z_f dc';
// dL/d logits = [dc', dc', dc', dh', dh'] D. Rows that are not active pass dh' and dc' on, no update gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_half_grads(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& n_float, const at::Tensor& tanh_derivative,
    const at::Tensor& derivatives, const Mask& active) {
  const int64_t half = grad_h.size(1), width = derivatives.size(1);
  RowMask mask(active);
  at::Tensor h_update = mask.data == nullptr ? grad_h : at::where(active->unsqueeze(1), grad_h, 0);
  at::Tensor c_totals = at::addcmul(grad_c, h_update, tanh_derivative).contiguous();
  at::Tensor grad_h_in = grad_h.contiguous();
  at::Tensor grad_h_old = at::empty_like(c_totals), grad_c_old = at::empty_like(c_totals);
  at::Tensor grad_logits = at::empty_like(derivatives);
  AT_DISPATCH_FLOATING_TYPES(grad_h.scalar_type(), "lstm_half_grads", [&] {
    using T = scalar_t;
    const T gate_grid = T(1.0 / 1024.0);
    for (int64_t b = 0; b < grad_h.size(0); ++b) {
      const bool on = mask.on(b);
      const T *gh = grad_h_in.data_ptr<T>() + b * half, *ct = c_totals.data_ptr<T>() + b * half;
      const T *nf = n_float.data_ptr<T>() + b * 2 * half, *d = derivatives.data_ptr<T>() + b * width;
      T *gho = grad_h_old.data_ptr<T>() + b * half, *gco = grad_c_old.data_ptr<T>() + b * half;
      T* gl = grad_logits.data_ptr<T>() + b * width;
      for (int64_t j = 0; j < half; ++j) {
        T dh = on ? gh[j] : T(0), dc = on ? ct[j] : T(0);
        gho[j] = on ? gh[j] * (nf[half + j] * gate_grid) : gh[j];
        gco[j] = on ? ct[j] * (nf[j] * gate_grid) : ct[j];
        gl[j] = dc * d[j];
        gl[half + j] = dc * d[half + j];
        gl[2 * half + j] = dc * d[2 * half + j];
        gl[3 * half + j] = dh * d[3 * half + j];
        gl[4 * half + j] = dh * d[4 * half + j];
      }
    }
  });
  return {grad_h_old, grad_c_old, grad_logits};
}

// Both updates of a RevLSTM half in one call, where the host's bound shows the second multiplication needs
// no spill: (h', c', float(h'), float(c'), W').
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_half_update(
    const at::Tensor& s, const at::Tensor& n, const at::Tensor& c_add, const at::Tensor& c, const at::Tensor& h,
    const at::Tensor& word, const Mask& active) {
  const int64_t half = c.size(1);
  auto [c_new, w_c, c_value] = fixed_update(c, n.slice(1, 0, half), c_add, word, active, s.scalar_type());
  auto [h_new, w_h, h_value] = lstm_h_update(s, n, c_value, h, w_c, active);
  return {h_new, c_new, h_value, c_value, w_h};
}

// Both inverses of a RevLSTM half in one call, where neither multiplication spilled: what lstm_h_reverse
// and lstm_c_reverse give, (h, c, W, float(h), D, o tanh'(c')).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_half_reverse(
    const at::Tensor& s, const at::Tensor& n, const at::Tensor& tg, const at::Tensor& c_new, const at::Tensor& h_new,
    const at::Tensor& c_add, const at::Tensor& word, const Mask& active, double keep) {
  auto [h, w_h, tanh_c] = lstm_h_reverse(s, n, c_new, h_new, word, active);
  auto [c, w_c, h_value, derivatives, tanh_derivative] =
      lstm_c_reverse(s, n, tg, tanh_c, c_new, c_add, h, w_h, active, keep);
  return {h, c, w_c, h_value, derivatives, tanh_derivative};
}

// ---- a whole RevLSTM half, its product included -------------------------------------------------
// The products are revbits.revrnn.linear.CellLinear's: oneDNN's matmul (the operator torch's own fused CPU
// paths call) where `onednn`, else addmm with W^T (the forward) and mm with W (the input gradient).

at::Tensor onednn_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>();
  return op.call(x, weight, bias, "none", c10::List<std::optional<at::Scalar>>(), std::optional<c10::string_view>(""));
}

// x W^T + b, with W^T the view weight_t.
at::Tensor cell_product(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_t,
                        const at::Tensor& bias, bool onednn) {
  return onednn ? onednn_product(x, weight, bias) : at::addmm(bias, x, weight_t);
}

// (xo, c_add, numerators, s, tg) of a half from x and the other half's value: lstm_terms of [x; other] W^T + b.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_half_gates(
    const at::Tensor& x, const at::Tensor& other, const at::Tensor& weight, const at::Tensor& weight_t,
    const at::Tensor& bias, bool onednn, double keep, int64_t lowest) {
  at::Tensor xo = at::cat({x, other}, -1);
  auto [c_add, numerators, s, tg] = lstm_terms(cell_product(xo, weight, weight_t, bias, onednn), keep, lowest);
  return {xo, c_add, numerators, s, tg};
}

// A half's step where neither update can spill: (h', c', float(h'), float(c'), W').
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_half_step(
    const at::Tensor& x, const at::Tensor& other, const at::Tensor& weight, const at::Tensor& weight_t,
    const at::Tensor& bias, bool onednn, double keep, int64_t lowest, const at::Tensor& c, const at::Tensor& h,
    const at::Tensor& word, const Mask& active) {
  auto [xo, c_add, numerators, s, tg] = lstm_half_gates(x, other, weight, weight_t, bias, onednn, keep, lowest);
  return lstm_half_update(s, numerators, c_add, c, h, word, active);
}

// A half's inverse where neither multiplication spilled: (h, c, W, float(h), D, o tanh'(c'), numerators, xo).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_half_inverse(const at::Tensor& x, const at::Tensor& other, const at::Tensor& weight, const at::Tensor& weight_t,
                  const at::Tensor& bias, bool onednn, double keep, int64_t lowest, const at::Tensor& c_new,
                  const at::Tensor& h_new, const at::Tensor& word, const Mask& active) {
  auto [xo, c_add, numerators, s, tg] = lstm_half_gates(x, other, weight, weight_t, bias, onednn, keep, lowest);
  auto [h, c, w, h_value, derivatives, tanh_derivative] =
      lstm_half_reverse(s, numerators, tg, c_new, h_new, c_add, word, active, keep);
  return {h, c, w, h_value, derivatives, tanh_derivative, numerators, xo};
}

// A half's backward with its products: (dL/dh, dL/dc before it, dL/d[x; other], the bias rows' new sum);
// adds dL/dW = (dL/d logits)^T [x; other] to grad_weight in place (LinearGradients.add's sums, in its order).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_half_backprop(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& numerators,
    const at::Tensor& tanh_derivative, const at::Tensor& derivatives, const Mask& active, const at::Tensor& xo,
    at::Tensor grad_weight, const std::optional<at::Tensor>& bias_rows, const at::Tensor& weight,
    const at::Tensor& weight_t, bool onednn) {
  auto [grad_h_old, grad_c_old, grad_logits] =
      lstm_half_grads(grad_h, grad_c, numerators, tanh_derivative, derivatives, active);
  grad_weight.addmm_(grad_logits.t(), xo);
  at::Tensor rows = bias_rows.has_value() ? bias_rows->add_(grad_logits) : grad_logits.clone();
  at::Tensor grad_xo = onednn ? onednn_product(grad_logits, weight_t, std::nullopt) : at::mm(grad_logits, weight);
  return {grad_h_old, grad_c_old, grad_xo, rows};
}

// ---- the RevGRU half ----------------------------------------------------------------------------

// From the logits of [z; r], [B, 2H], and the other half's value: s = sigmoid(logits), the numerators of z
// (as lstm_terms computes them), and r * other, the other half as the candidate's input sees it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_gates(
    const at::Tensor& logits, const at::Tensor& other, double keep, int64_t lowest) {
  const int64_t half = other.size(1);
  const at::Tensor s = at::sigmoid(logits), others = other.contiguous();
  at::Tensor numerators = at::empty({s.size(0), half}, s.options()), r_other = at::empty_like(numerators);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "gru_gates", [&] {
    using T = scalar_t;
    const T slope_scale = T((1.0 - keep) * 1024.0), keep_scale = T(keep * 1024.0), low = T(lowest);
    const bool keeps = keep != 0.0;
    for (int64_t b = 0; b < s.size(0); ++b) {
      const T *sr = s.data_ptr<T>() + b * 2 * half, *o = others.data_ptr<T>() + b * half;
      T *nf = numerators.data_ptr<T>() + b * half, *ro = r_other.data_ptr<T>() + b * half;
      for (int64_t j = 0; j < half; ++j) {
        nf[j] = gate_numerator(sr[j], slope_scale, keep_scale, keeps, low);
        ro[j] = sr[half + j] * o[j];
      }
    }
  });
  return {s, numerators, r_other};
}

// From the candidate's logits and z's numerators n: g = tanh(logits) and the additive part
// fixed((1 - n / 2**10) g), computed as round((2**23 - 2**13 n) g) (both factors exact, one rounding).
std::tuple<at::Tensor, at::Tensor> gru_candidate(const at::Tensor& logits, const at::Tensor& numerators) {
  at::Tensor g = at::tanh(logits).contiguous();
  at::Tensor add = like(g, at::kLong);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gru_candidate", [&] {
    using T = scalar_t;
    const T* gr = g.data_ptr<T>();
    const T* nf = numerators.data_ptr<T>();
    int64_t* a = add.data_ptr<int64_t>();
    for (int64_t k = 0; k < g.numel(); ++k) a[k] = static_cast<int64_t>(round_half_even((T(8388608.0) - T(8192.0) * nf[k]) * gr[k]));
  });
  return {g, add};
}

// The backward of h' = z h + (1 - z) g up to the candidate's product: with z = n / 2**10, dh = z dh'
// (dh' on rows that are not active), the update's gradient u = dh' (0 there), and dL/d(candidate logits)
// = tanh_backward(u (1 - z), g) by ATen.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_candidate_grads(
    const at::Tensor& grad_new, const at::Tensor& numerators, const at::Tensor& g, const Mask& active) {
  const int64_t half = g.size(1);
  RowMask mask(active);
  at::Tensor grad_in = grad_new.contiguous();
  at::Tensor grad_old = at::empty_like(grad_in), update = at::empty_like(grad_in), scaled = at::empty_like(grad_in);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gru_candidate_grads", [&] {
    using T = scalar_t;
    const T gate_grid = T(1.0 / 1024.0);
    for (int64_t b = 0; b < g.size(0); ++b) {
      const bool on = mask.on(b);
      const T *gn = grad_in.data_ptr<T>() + b * half, *nf = numerators.data_ptr<T>() + b * half;
      T *go = grad_old.data_ptr<T>() + b * half, *u = update.data_ptr<T>() + b * half;
      T* su = scaled.data_ptr<T>() + b * half;
      for (int64_t j = 0; j < half; ++j) {
        const T z = nf[j] * gate_grid;
        go[j] = on ? gn[j] * z : gn[j];
        u[j] = on ? gn[j] : T(0);
        su[j] = u[j] * (T(1) - z);
      }
    }
  });
  return {grad_old, update, at::tanh_backward(scaled, g)};
}

// dL/d[z; r] logits from the update's gradient u, the old h, g, the gradient of the candidate's input
// [x; r other] and s: sigmoid_backward([(1 - keep) u (h - g), dL/d(r other) other], s), as ATen's
// a (1 - y) y.
at::Tensor gru_gate_grads(
    const at::Tensor& update, const at::Tensor& h_old, const at::Tensor& g, const at::Tensor& grad_xro,
    const at::Tensor& xo, const at::Tensor& s, double keep) {
  const int64_t half = g.size(1), inputs = xo.size(1) - half;
  at::Tensor grad_logits = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "gru_gate_grads", [&] {
    using T = scalar_t;
    const T slope = T(1.0 - keep);
    const bool keeps = keep != 0.0;
    auto hi = rows_of<T>(h_old), gi = rows_of<T>(grad_xro, inputs), oi = rows_of<T>(xo, inputs);
    for (int64_t b = 0; b < s.size(0); ++b) {
      const T *u = update.data_ptr<T>() + b * half, *gr = g.data_ptr<T>() + b * half, *h = hi.row(b);
      const T *gro = gi.row(b), *o = oi.row(b), *sr = s.data_ptr<T>() + b * 2 * half;
      T* gl = grad_logits.data_ptr<T>() + b * 2 * half;
      for (int64_t j = 0; j < half; ++j) {
        T dz = u[j] * (h[j] - gr[j]);
        if (keeps) dz = dz * slope;
        const T dr = gro[j] * o[j];
        gl[j] = dz * (T(1) - sr[j]) * sr[j];
        gl[half + j] = dr * (T(1) - sr[half + j]) * sr[half + j];
      }
    }
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY(revbits_revrnn, m) {
  m.def("fixed_update", &fixed_update);
  m.def("fixed_reverse", &fixed_reverse);
  m.def("lstm_terms", &lstm_terms);
  m.def("lstm_h_update", &lstm_h_update);
  m.def("lstm_h_reverse", &lstm_h_reverse);
  m.def("lstm_c_reverse", &lstm_c_reverse);
  m.def("lstm_half_step", &lstm_half_step);
  m.def("lstm_half_inverse", &lstm_half_inverse);
  m.def("lstm_half_backprop", &lstm_half_backprop);
  m.def("gru_gates", &gru_gates);
  m.def("gru_candidate", &gru_candidate);
  m.def("gru_candidate_grads", &gru_candidate_grads);
  m.def("gru_gate_grads", &gru_gate_grads);
}
