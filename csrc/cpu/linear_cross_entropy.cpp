// Fused linear + cross-entropy over k heads, CPU: chunked over rows, ATen (MKL) GEMMs, and a fused
// OpenMP epilogue that turns each logits chunk, in place, into per-row loss, lse and dlogits.
// The maths and the contract are in fqgan_kernels/linear_cross_entropy.py.
//
// Per head, per chunk of C rows (C * V * 4 bytes ~ 16 MiB, the only buffer that scales with V):
//   L = x_chunk @ W^T                (at::mm_out into the reused chunk buffer)
//   epilogue(L): + bias, lse, loss row, and L <- dlogits = g_n * ((1 + 2 zl lse) p - eps/V - (1-eps) onehot)
//   grad_hidden[chunk] = L @ W       (at::mm_out straight into the output)
//   grad_weight      += L^T @ x_chunk (addmm_ into the output, or a float32 accumulator for bf16/fp16)
//   grad_bias        += column sums of L
// Low-precision inputs are converted to float32 per head (weight) and per chunk (hidden): on CPUs
// without native bf16 GEMMs the float32 MKL GEMM is both faster and exact in its accumulation.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/ops.h"
#include "cpu/simd.h"

namespace fqgan::cpu {
namespace {

constexpr int64_t kChunkBytes = int64_t(16) << 20;

// exp(x) for x <= 0 (arguments are z - max): the vectorisable polynomial of cpu/simd.h for float
// (inputs below about -87 give 0, which is 0 next to the row's sum >= 1), std::exp for double.
__attribute__((always_inline)) inline float exp_nonpos(float x) { return simd::fexp(x); }
__attribute__((always_inline)) inline double exp_nonpos(double x) { return std::exp(x); }

struct RowArgs {
  int64_t V;
  int64_t ignore_index;
  double eps;     // label smoothing
  double z_loss;  // weight of lse^2
  bool grad;
};

// One row of the chunk: z (V logits, overwritten by dlogits when a.grad), bias (or null),
// target t, row gradient g (dL/dloss_n). Writes loss_n and lse_n.
template <typename T>
__attribute__((always_inline)) inline void row_body(T* __restrict z, const T* __restrict bias, int64_t t, T g,
                                                    const RowArgs& a, T* loss, T* lse) {
  const int64_t V = a.V;
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) z[j] += bias[j];
  }
  T m = -std::numeric_limits<T>::infinity();
  T sz = 0;
#pragma omp simd reduction(max : m) reduction(+ : sz)
  for (int64_t j = 0; j < V; ++j) {
    m = z[j] > m ? z[j] : m;
    sz += z[j];
  }
  const bool valid = t != a.ignore_index;
  const T zt = valid ? z[t] : T(0);
  T s = 0;
  if (a.grad) {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < V; ++j) {
      const T e = exp_nonpos(z[j] - m);
      z[j] = e;
      s += e;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < V; ++j) s += exp_nonpos(z[j] - m);
  }
  const T l = m + std::log(s);
  const T eps = static_cast<T>(a.eps), zl = static_cast<T>(a.z_loss);
  *lse = l;
  *loss = valid ? l - (T(1) - eps) * zt - eps / static_cast<T>(V) * sz + zl * l * l : T(0);
  if (!a.grad) return;
  const T gr = valid ? g : T(0);  // ignored rows have a constant (zero) loss
  if (gr == T(0)) {
    std::fill(z, z + V, T(0));
    return;
  }
  const T scale = gr * (T(1) + T(2) * zl * l) / s;  // p_j = e_j / s
  const T shift = -gr * eps / static_cast<T>(V);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) z[j] = scale * z[j] + shift;
  z[t] -= gr * (T(1) - eps);
}

__attribute__((target("avx2,fma"))) void row_avx2(float* z, const float* bias, int64_t t, float g,
                                                   const RowArgs& a, float* loss, float* lse) {
  row_body<float>(z, bias, t, g, a, loss, lse);
}

void row_portable(float* z, const float* bias, int64_t t, float g, const RowArgs& a, float* loss, float* lse) {
  row_body<float>(z, bias, t, g, a, loss, lse);
}

void row_portable(double* z, const double* bias, int64_t t, double g, const RowArgs& a, double* loss,
                  double* lse) {
  row_body<double>(z, bias, t, g, a, loss, lse);
}

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// Epilogue over a chunk of n rows: L [n, V] (contiguous), bias [V] or null, targets [n],
// row_grad [n] or null, loss/lse [n].
template <typename T>
void epilogue(T* L, int64_t n, const T* bias, const int64_t* targets, const T* row_grad, const RowArgs& a,
              T* loss, T* lse) {
  const int64_t V = a.V;
  const bool avx2 = std::is_same<T, float>::value && has_avx2();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T g = row_grad != nullptr ? row_grad[r] : T(0);
      if constexpr (std::is_same<T, float>::value) {
        if (avx2) {
          row_avx2(L + r * V, bias, targets[r], g, a, loss + r, lse + r);
          continue;
        }
      }
      row_portable(L + r * V, bias, targets[r], g, a, loss + r, lse + r);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& row_grad, int64_t ignore_index,
    double label_smoothing, double z_loss, int64_t chunk_rows) {
  TORCH_CHECK(hidden.dim() == 3 && weight.dim() == 3 && targets.dim() == 2,
              "linear_cross_entropy: hidden [k,N,H], weight [k,V,H], targets [k,N]");
  const int64_t k = hidden.size(0), N = hidden.size(1), H = hidden.size(2), V = weight.size(1);
  TORCH_CHECK(weight.size(0) == k && weight.size(2) == H && targets.size(0) == k && targets.size(1) == N,
              "linear_cross_entropy: shapes of hidden, weight and targets do not match");
  const bool has_bias = bias.has_value() && bias->defined();
  const bool grad = row_grad.has_value() && row_grad->defined();
  const at::ScalarType acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = hidden.options().dtype(acc);
  const at::Tensor x_all = hidden.contiguous();
  const at::Tensor w_all = weight.contiguous();
  const at::Tensor t_all = targets.to(at::kLong).contiguous();
  TORCH_CHECK(((t_all == ignore_index) | ((t_all >= 0) & (t_all < V))).all().item<bool>(),
              "linear_cross_entropy: targets must be ignore_index or in [0, V)");
  at::Tensor g_all;
  if (grad) g_all = row_grad->to(acc).contiguous();

  at::Tensor rows = at::empty({k, N}, opts), lse = at::empty({k, N}, opts);
  at::Tensor gh, gw, gb;
  if (grad) {
    gh = at::empty_like(x_all);
    gw = at::empty_like(w_all);
    if (has_bias) gb = at::empty_like(*bias);
  }
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  int64_t C = chunk_rows > 0 ? chunk_rows : kChunkBytes / std::max<int64_t>(1, V * elem);
  C = std::max<int64_t>(1, std::min<int64_t>(C, N));
  at::Tensor buf = at::empty({C, V}, opts);
  const RowArgs args{V, ignore_index, label_smoothing, z_loss, grad};

  for (int64_t h = 0; h < k; ++h) {
    const at::Tensor W = w_all.select(0, h).to(acc).contiguous();  // [V, H]; a copy only for bf16/fp16
    at::Tensor b;
    if (has_bias) b = bias->select(0, h).to(acc).contiguous();
    const at::Tensor xh = x_all.select(0, h);
    at::Tensor gw_acc, gb_acc;
    if (grad) {
      gw_acc = w_all.scalar_type() == acc ? gw.select(0, h) : at::empty({V, H}, opts);
      gw_acc.zero_();
      if (has_bias) gb_acc = at::zeros({V}, opts);
    }
    for (int64_t s = 0; s < N; s += C) {
      const int64_t n = std::min(C, N - s);
      at::Tensor L = buf.narrow(0, 0, n);
      const at::Tensor xs = xh.narrow(0, s, n).to(acc).contiguous();
      at::mm_out(L, xs, W.t());
      AT_DISPATCH_FLOATING_TYPES(acc, "linear_cross_entropy_epilogue", [&] {
        epilogue<scalar_t>(L.data_ptr<scalar_t>(), n, has_bias ? b.data_ptr<scalar_t>() : nullptr,
                           t_all.data_ptr<int64_t>() + h * N + s,
                           grad ? g_all.data_ptr<scalar_t>() + h * N + s : nullptr, args,
                           rows.data_ptr<scalar_t>() + h * N + s, lse.data_ptr<scalar_t>() + h * N + s);
      });
      if (!grad) continue;
      at::Tensor ghs = gh.select(0, h).narrow(0, s, n);
      if (gh.scalar_type() == acc) {
        at::mm_out(ghs, L, W);
      } else {
        ghs.copy_(at::mm(L, W));
      }
      gw_acc.addmm_(L.t(), xs);
      if (has_bias) gb_acc.add_(L.sum(0));
    }
    if (grad) {
      if (w_all.scalar_type() != acc) gw.select(0, h).copy_(gw_acc);
      if (has_bias) gb.select(0, h).copy_(gb_acc);
    }
  }
  return {rows, lse, gh, gw, gb};
}

}  // namespace fqgan::cpu
