// Fused linear + cross-entropy over k heads, CPU: chunked over rows, ATen (MKL) GEMMs, and a fused
// OpenMP epilogue that turns each logits chunk, in place, into per-row loss, lse and dlogits.
// The maths and the contract are in fqgan_kernels/linear_cross_entropy.py.
//
// The chunk is held code-major, LT = logits^T [V, C] (C * V * 4 bytes ~ 32 MiB, the only buffer
// that scales with V): with W [V, H] row-major every GEMM is then an NN or TN product, which MKL runs
// at the full torch.mm rate; x_chunk @ W^T (NT) ran at 60-75 % of it on the AVX2 test machine.
// Per head, per chunk of C rows:
//   LT = W @ x_chunk^T               (at::mm_out into the reused chunk buffer; x_chunk^T is an H x C copy)
//   epilogue(LT): + bias, lse, loss, and LT <- dlogits^T = g_n ((1 + 2 zl lse) p - eps/V - (1-eps) onehot)
//   grad_hidden[chunk] = LT^T @ W    (at::mm_out straight into the output)
//   grad_weight      += LT @ x_chunk (addmm_ into the output, or a float32 accumulator for bf16/fp16)
//   grad_bias        += row sums of LT
// The epilogue splits the chunk's columns (its rows) into one contiguous range per thread; each
// thread makes three passes down the V codes over its range (max/sum, exp/sum, dlogits), vectorised
// across the columns, with per-column statistics in L1. Each pass streams the chunk in address order
// (a first version gave each 16-column block its own walk down all V codes: one cache line per 2 KiB
// row, every page of the chunk touched per block, and the TLB thrashed: ~1 s per head).
// Low-precision inputs are converted to float32 per head (weight) and per chunk (hidden): on CPUs
// without native bf16 GEMMs the float32 MKL GEMM is both faster and exact in its accumulation.
//
// ISA: the epilogue's block body is the kernel pass at the bottom of this file, compiled once per
// instruction set (cpu/isa.h), for float and double.
#ifndef FQGAN_ISA_PASS  // ======================= driver (compiled once) =======================

#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/fpstate.h"
#include "cpu/isa.h"
#include "cpu/ops.h"
#include "cpu/simd.h"

namespace fqgan::cpu {
namespace {

constexpr int64_t kChunkBytes = int64_t(32) << 20;
constexpr int64_t kMaxBlock = 1024;  // most columns per epilogue task (per-column statistics on the stack)
constexpr int64_t kMinBlock = 16;    // fewest: one 64-byte line of floats per code

// exp(x) for x <= 0 (arguments are z - max): the vectorisable polynomial of cpu/simd.h for float
// (inputs below about -87 give 0, which is 0 next to the row's sum >= 1), std::exp for double.
__attribute__((always_inline)) inline float exp_nonpos(float x) { return simd::fexp(x); }
__attribute__((always_inline)) inline double exp_nonpos(double x) { return std::exp(x); }

__attribute__((always_inline)) inline float keep_if(float x, uint32_t mask) {  // x or +0, no float select
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  b &= mask;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}
__attribute__((always_inline)) inline double keep_if(double x, uint32_t mask) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof(b));
  b &= static_cast<uint64_t>(0) - static_cast<uint64_t>(mask & 1u);
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

struct Args {
  int64_t V;
  int64_t ld;  // row stride of the chunk LT [V, ld] (= the chunk's row count)
  int64_t ignore_index;
  double eps;     // label smoothing
  double z_loss;  // weight of lse^2
};

}  // namespace
}  // namespace fqgan::cpu

#define FQGAN_ISA_SELF "cpu/linear_cross_entropy.cpp"
#include "cpu/isa_passes.h"

namespace fqgan::cpu {
namespace {

// Epilogue over a chunk LT [V, n] (contiguous), bias [V] or null, targets [n], row_grad [n] or null,
// loss/lse [n]: one block of columns per thread (a multiple of kMinBlock, at most kMaxBlock).
template <typename T>
void epilogue(T* L, int64_t n, const T* bias, const int64_t* targets, const T* row_grad, const Args& a,
              T* loss, T* lse) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t width = (n + threads - 1) / threads;
  width = std::min(kMaxBlock, (width + kMinBlock - 1) / kMinBlock * kMinBlock);
  const int64_t blocks = (n + width - 1) / width;
  const auto block_fn = FQGAN_ISA_PICK(block<T>);
  fpstate::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * width;
      const int64_t cb = std::min(width, n - c0);
      const T* g = row_grad != nullptr ? row_grad + c0 : nullptr;
      block_fn(L + c0, cb, bias, targets + c0, g, a, loss + c0, lse + c0);
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
  // FTZ|DAZ on every thread of the pool, not only in the epilogue's chunks: the MKL GEMMs run on
  // those threads and consume the dlogits (subnormal-free, but tiny: their products with the hidden
  // states or the weights can underflow). Measured 2026-11-30 (2-core Xeon, AVX-512, KVM, 2
  // threads), a 1024^3 MKL sgemm on subnormal inputs: 2458 ms in the default state, 2617 ms with
  // FTZ|DAZ on the calling thread only, 48 ms with FTZ|DAZ on every pool thread (13.5 ms on
  // normal inputs).
  const fpstate::AllThreadsFlushDenormals fp_guard;
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
  at::Tensor buf = at::empty({C * V}, opts);

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
      at::Tensor LT = buf.narrow(0, 0, V * n).view({V, n});  // contiguous [V, n]
      const at::Tensor xs = xh.narrow(0, s, n).to(acc);        // [n, H] (a view for float32)
      at::mm_out(LT, W, xs.t().contiguous());
      const Args args{V, n, ignore_index, label_smoothing, z_loss};
      AT_DISPATCH_FLOATING_TYPES(acc, "linear_cross_entropy_epilogue", [&] {
        epilogue<scalar_t>(LT.data_ptr<scalar_t>(), n, has_bias ? b.data_ptr<scalar_t>() : nullptr,
                           t_all.data_ptr<int64_t>() + h * N + s,
                           grad ? g_all.data_ptr<scalar_t>() + h * N + s : nullptr, args,
                           rows.data_ptr<scalar_t>() + h * N + s, lse.data_ptr<scalar_t>() + h * N + s);
      });
      if (!grad) continue;
      at::Tensor ghs = gh.select(0, h).narrow(0, s, n);
      if (gh.scalar_type() == acc) {
        at::mm_out(ghs, LT.t(), W);
      } else {
        ghs.copy_(at::mm(LT.t(), W));
      }
      gw_acc.addmm_(LT, xs);
      if (has_bias) gb_acc.add_(LT.sum(1));
    }
    if (grad) {
      if (w_all.scalar_type() != acc) gw.select(0, h).copy_(gw_acc);
      if (has_bias) gb.select(0, h).copy_(gb_acc);
    }
  }
  return {rows, lse, gh, gw, gb};
}

}  // namespace fqgan::cpu

#else  // ========== kernel pass: compiled once per ISA, in namespace isa_<name> (cpu/isa.h) ==========

// One block of cb (<= kMaxBlock) columns of LT starting at L: the logits of cb rows, one per column.
// bias [V] or null; targets, row_grad (or null), loss, lse: [cb]. Sums over V are float64 per column
// (the float32 exps are converted; the loops still vectorise).
template <typename T>
void block(T* __restrict L, int64_t cb, const T* __restrict bias, const int64_t* targets, const T* row_grad,
           const Args& a, T* loss, T* lse) {
  const int64_t V = a.V, ld = a.ld;
  alignas(64) T m[kMaxBlock];
  alignas(64) double sz[kMaxBlock], s[kMaxBlock];
  for (int64_t c = 0; c < cb; ++c) {
    m[c] = -std::numeric_limits<T>::infinity();
    sz[c] = 0.0;
    s[c] = 0.0;
  }
  // Pass 1: + bias (stored), max and plain sum (label smoothing) per column.
  for (int64_t v = 0; v < V; ++v) {
    T* __restrict row = L + v * ld;
    if (bias != nullptr) {
      const T b = bias[v];
#pragma omp simd
      for (int64_t c = 0; c < cb; ++c) {
        const T x = row[c] + b;
        row[c] = x;
        m[c] = m[c] > x ? m[c] : x;
        sz[c] += x;
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < cb; ++c) {
        const T x = row[c];
        m[c] = m[c] > x ? m[c] : x;
        sz[c] += x;
      }
    }
  }
  alignas(64) T zt[kMaxBlock];  // the target's logit, read before pass 2 may overwrite it
  for (int64_t c = 0; c < cb; ++c) {
    const int64_t t = targets[c];
    zt[c] = t != a.ignore_index ? L[t * ld + c] : T(0);
  }
  // Pass 2: exps (kept in place when the gradient follows, i.e. row_grad is given) and their sums.
  const bool store = row_grad != nullptr;
  for (int64_t v = 0; v < V; ++v) {
    T* __restrict row = L + v * ld;
    if (store) {
#pragma omp simd
      for (int64_t c = 0; c < cb; ++c) {
        const T e = exp_nonpos(row[c] - m[c]);
        row[c] = e;
        s[c] += e;
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < cb; ++c) s[c] += exp_nonpos(row[c] - m[c]);
    }
  }
  const T eps = static_cast<T>(a.eps), zl = static_cast<T>(a.z_loss), inv_v = T(1) / static_cast<T>(V);
  alignas(64) T scale[kMaxBlock], shift[kMaxBlock];
  alignas(64) uint32_t keep[kMaxBlock];
  for (int64_t c = 0; c < cb; ++c) {
    const bool valid = targets[c] != a.ignore_index;
    const T l = m[c] + static_cast<T>(std::log(s[c]));
    lse[c] = l;
    loss[c] = valid ? l - (T(1) - eps) * zt[c] - eps * inv_v * static_cast<T>(sz[c]) + zl * l * l : T(0);
    const T gr = valid && store ? row_grad[c] : T(0);  // ignored rows: zero gradient
    scale[c] = shift[c] = T(0);
    keep[c] = 0u;
    if (gr != T(0)) {
      scale[c] = gr * (T(1) + T(2) * zl * l) / static_cast<T>(s[c]);  // p = e / s
      shift[c] = -gr * eps * inv_v;
      keep[c] = ~0u;
    }
  }
  if (!store) return;
  // Pass 3: dlogits in place (columns with a zero row gradient become exactly 0, even if not finite).
  for (int64_t v = 0; v < V; ++v) {
    T* __restrict row = L + v * ld;
#pragma omp simd
    for (int64_t c = 0; c < cb; ++c) row[c] = keep_if(scale[c] * row[c] + shift[c], keep[c]);
  }
  for (int64_t c = 0; c < cb; ++c) {
    if (keep[c] != 0u) L[targets[c] * ld + c] -= row_grad[c] * (T(1) - eps);
  }
}

#endif  // FQGAN_ISA_PASS
