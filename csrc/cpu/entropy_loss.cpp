// Streaming entropy loss, CPU: the four sweeps of fqgan_kernels/entropy_loss.py (2 forward, 2 backward).
//
// a_nj = zs_n . e_j + eb_j with zs = (2/T) z and eb_j = -|e_j|^2 / T (the -|z_n|^2/T row constant
// cancels). Nothing N x K is stored: each sweep recomputes a_nj for a chunk of CH codes into an
// L1-resident buffer, then runs vectorisable loops over that chunk. The codebook is transposed to
// [k, D, K] so the loops over codes are unit-stride. exp is a branch-free polynomial (simd::fexp)
// so the loops vectorise; the sweeps are the kernel pass at the bottom of this file, compiled once
// per instruction set (cpu/isa.h).
//
// Parallelism (at::parallel_for, deterministic: each output element is owned by one task and the
// reduction order is fixed by the chunking, not by the thread count):
//   rows sweeps  (lse/H forward, dL/dz backward): tasks = (sub-codebook, block of RB rows);
//   code sweeps  (column sums forward, dL/de backward): tasks = (sub-codebook, block of CH codes),
//                rows swept inside.
#ifndef FQGAN_ISA_PASS  // ======================= driver (compiled once) =======================

#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/fpstate.h"
#include "cpu/isa.h"
#include "cpu/ops.h"
#include "cpu/simd.h"

namespace fqgan::cpu {
namespace {

constexpr int64_t CH = 512;  // codes per chunk: a, p, q buffers of 2 KiB each stay in L1
constexpr int64_t RB = 32;   // rows per task in the row sweeps (the codebook chunk is reused across them)

struct Ctx {
  int64_t N, k, K, D;
  float inv_t;            // 1 / T
  const float* zs;        // [k, N, D], (2/T) * z
  const float* et;        // [k, D, K], codes transposed
  const float* eb;        // [k, K], -|e_j|^2 / T
  const float* e;         // [k, K, D], codes (for dL/de)
  // forward outputs / backward inputs
  float* lse;             // [k, N]
  float* ent;             // [k, N]
  float* colsum;          // [k, K]
  const float* grad_lse;  // [k, N]
  const float* grad_ent;  // [k, N]
  const float* grad_col;  // [k, K]
  float* grad_z;          // [N, k, D]
  float* beta;            // [k, N] scratch: beta of sweep 3 for sweep 4
  float* inv_w;           // [k, N] scratch: 1 / W, W = sum_j exp(a - lse) as recomputed
  float* grad_e;          // [k, K, D]
};

using Kernel = void (*)(const Ctx&, int64_t, int64_t, int64_t);

}  // namespace
}  // namespace fqgan::cpu

#define FQGAN_ISA_SELF "cpu/entropy_loss.cpp"
#include "cpu/isa_passes.h"

namespace fqgan::cpu {
namespace {

// The sweep for this CPU and D (D = 8, FQGAN's code dimension, gets a compile-time D).
#define FQGAN_ENTROPY_SWEEP(NAME, c) ((c).D == 8 ? FQGAN_ISA_PICK(NAME<8>) : FQGAN_ISA_PICK(NAME<0>))

// rows: tasks (i, block of RB rows), kernel(c, i, n0, n1)
void for_rows(const Ctx& c, Kernel kern) {
  const int64_t blocks = (c.N + RB - 1) / RB;
  fpstate::parallel_for(0, c.k * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / blocks, n0 = (t % blocks) * RB;
      kern(c, i, n0, std::min(c.N, n0 + RB));
    }
  });
}

// codes: tasks (i, block of CH codes), kernel(c, i, j0, count)
void for_codes(const Ctx& c, Kernel kern) {
  const int64_t blocks = (c.K + CH - 1) / CH;
  fpstate::parallel_for(0, c.k * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / blocks, j0 = (t % blocks) * CH;
      kern(c, i, j0, std::min(CH, c.K - j0));
    }
  });
}

struct Prepared {
  at::Tensor zs, et, eb, e;
};

Prepared prepare(const at::Tensor& zn, const at::Tensor& en, double temperature) {
  const float inv_t = static_cast<float>(1.0 / temperature);
  at::Tensor z = zn.to(at::kFloat);
  at::Tensor e = en.to(at::kFloat).contiguous();
  Prepared p;
  p.zs = (z * (2.0f * inv_t)).permute({1, 0, 2}).contiguous();  // [k, N, D]
  p.et = e.transpose(1, 2).contiguous();                         // [k, D, K]
  p.eb = (e * e).sum(-1).mul(-inv_t).contiguous();               // [k, K]
  p.e = e;
  return p;
}

Ctx make_ctx(const at::Tensor& zn, const at::Tensor& en, double temperature, const Prepared& p) {
  Ctx c{};
  c.N = zn.size(0), c.k = zn.size(1), c.D = zn.size(2), c.K = en.size(1);
  c.inv_t = static_cast<float>(1.0 / temperature);
  c.zs = p.zs.data_ptr<float>();
  c.et = p.et.data_ptr<float>();
  c.eb = p.eb.data_ptr<float>();
  c.e = p.e.data_ptr<float>();
  return c;
}

void check_inputs(const at::Tensor& zn, const at::Tensor& en, double temperature) {
  TORCH_CHECK(zn.dim() == 3 && en.dim() == 3, "entropy: zn [N,k,D] and en [k,K,D], got ", zn.sizes(), " and ",
              en.sizes());
  TORCH_CHECK(zn.size(1) == en.size(0) && zn.size(2) == en.size(2), "entropy: zn ", zn.sizes(),
              " does not match en ", en.sizes());
  TORCH_CHECK(zn.device().is_cpu() && en.device().is_cpu(), "entropy (cpu): tensors must be on the CPU");
  TORCH_CHECK(temperature > 0, "entropy: temperature must be > 0");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_stats(const at::Tensor& zn, const at::Tensor& en,
                                                             double temperature) {
  check_inputs(zn, en, temperature);
  const fpstate::FlushDenormals fp_guard;
  const Prepared p = prepare(zn, en, temperature);
  Ctx c = make_ctx(zn, en, temperature, p);
  auto opts = zn.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({c.k, c.N}, opts), ent = at::empty({c.k, c.N}, opts);
  at::Tensor colsum = at::empty({c.k, c.K}, opts);
  c.lse = lse.data_ptr<float>();
  c.ent = ent.data_ptr<float>();
  c.colsum = colsum.data_ptr<float>();
  if (c.N > 0) {
    for_rows(c, FQGAN_ENTROPY_SWEEP(rows_fwd, c));
    for_codes(c, FQGAN_ENTROPY_SWEEP(colsum, c));
  } else {
    colsum.zero_();
  }
  return {lse, ent, colsum};
}

std::tuple<at::Tensor, at::Tensor> entropy_backward(const at::Tensor& zn, const at::Tensor& en,
                                                    const at::Tensor& lse, const at::Tensor& ent,
                                                    const at::Tensor& grad_lse, const at::Tensor& grad_ent,
                                                    const at::Tensor& grad_colsum, double temperature) {
  check_inputs(zn, en, temperature);
  const fpstate::FlushDenormals fp_guard;
  const Prepared p = prepare(zn, en, temperature);
  Ctx c = make_ctx(zn, en, temperature, p);
  TORCH_CHECK(lse.numel() == c.k * c.N && ent.numel() == c.k * c.N && grad_lse.numel() == c.k * c.N &&
                  grad_ent.numel() == c.k * c.N && grad_colsum.numel() == c.k * c.K,
              "entropy_backward: per-row tensors must be [k, N] and grad_colsum [k, K]");
  // H (ent) is not read: the backward renormalises p itself (fqgan_kernels/entropy_loss.py, "Rounding").
  at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  at::Tensor gl = grad_lse.to(at::kFloat).contiguous(), ge = grad_ent.to(at::kFloat).contiguous();
  at::Tensor gc = grad_colsum.to(at::kFloat).contiguous();
  auto opts = zn.options().dtype(at::kFloat);
  at::Tensor grad_z = at::empty({c.N, c.k, c.D}, opts), grad_e = at::empty({c.k, c.K, c.D}, opts);
  at::Tensor beta = at::empty({c.k, c.N}, opts), inv_w = at::empty({c.k, c.N}, opts);
  c.lse = lse_f.data_ptr<float>();
  c.grad_lse = gl.data_ptr<float>();
  c.grad_ent = ge.data_ptr<float>();
  c.grad_col = gc.data_ptr<float>();
  c.grad_z = grad_z.data_ptr<float>();
  c.grad_e = grad_e.data_ptr<float>();
  c.beta = beta.data_ptr<float>();
  c.inv_w = inv_w.data_ptr<float>();
  if (c.N > 0) {
    for_rows(c, FQGAN_ENTROPY_SWEEP(rows_bwd, c));
    for_codes(c, FQGAN_ENTROPY_SWEEP(grad_e, c));
  } else {
    grad_e.zero_();
  }
  return {grad_z.to(zn.scalar_type()), grad_e.to(en.scalar_type())};
}

}  // namespace fqgan::cpu

#else  // ========== kernel pass: compiled once per ISA, in namespace isa_<name> (cpu/isa.h) ==========

// a[0:m] = eb[j0:j0+m] + sum_d zrow[d] * et[d, j0:j0+m]. DC > 0: D known at compile time (one
// fused pass over the chunk); DC = 0: any D (one pass per d).
template <int DC>
__attribute__((always_inline)) inline void logits_chunk(const Ctx& c, int64_t i, const float* zrow, int64_t j0,
                                                        int64_t m, float* a) {
  const float* eb = c.eb + i * c.K + j0;
  if constexpr (DC > 0) {
    const float* et = c.et + i * DC * c.K + j0;
    float zr[DC];
    for (int d = 0; d < DC; ++d) zr[d] = zrow[d];
    const int64_t K = c.K;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      float s = eb[j];
      for (int d = 0; d < DC; ++d) s += zr[d] * et[d * K + j];
      a[j] = s;
    }
  } else {
    for (int64_t j = 0; j < m; ++j) a[j] = eb[j];
    for (int64_t d = 0; d < c.D; ++d) {
      const float zd = zrow[d];
      const float* et = c.et + (i * c.D + d) * c.K + j0;
      for (int64_t j = 0; j < m; ++j) a[j] += zd * et[j];
    }
  }
}

// Sweep 1: online log-sum-exp and entropy per row. With m the running max, l = sum exp(a - m) and
// t = sum exp(a - m) (a - m); a new max m' rescales l *= exp(m - m'), t = exp(m - m') (t + (m - m') l).
// At the end lse = m + log l and H = -sum p (a - lse) = log l - t / l.
template <int DC>
void rows_fwd(const Ctx& c, int64_t i, int64_t n0, int64_t n1) {
  alignas(64) float a[CH];
  float mx[RB], ls[RB], ts[RB];
  for (int64_t r = 0; r < n1 - n0; ++r) mx[r] = -std::numeric_limits<float>::infinity(), ls[r] = 0.f, ts[r] = 0.f;
  for (int64_t j0 = 0; j0 < c.K; j0 += CH) {
    const int64_t m = std::min(CH, c.K - j0);
    for (int64_t r = 0; r < n1 - n0; ++r) {
      logits_chunk<DC>(c, i, c.zs + (i * c.N + n0 + r) * (DC > 0 ? DC : c.D), j0, m, a);
      float cm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : cm)
      for (int64_t j = 0; j < m; ++j) cm = std::max(cm, a[j]);
      if (cm > mx[r]) {
        if (ls[r] > 0.f) {
          const float dm = mx[r] - cm, sc = std::exp(dm);
          ts[r] = sc * (ts[r] + dm * ls[r]);
          ls[r] *= sc;
        }
        mx[r] = cm;
      }
      const float mr = mx[r];
      float l = 0.f, t = 0.f;
#pragma omp simd reduction(+ : l, t)
      for (int64_t j = 0; j < m; ++j) {
        const float x = a[j] - mr;
        const float ex = simd::fexp(x);
        l += ex;
        t += ex * x;
      }
      ls[r] += l;
      ts[r] += t;
    }
  }
  for (int64_t r = 0; r < n1 - n0; ++r) {
    const float logl = std::log(ls[r]);
    c.lse[i * c.N + n0 + r] = mx[r] + logl;
    c.ent[i * c.N + n0 + r] = logl - ts[r] / ls[r];
  }
}

// Sweep 2: S_j = sum_n exp(a_nj - lse_n) for the codes [j0, j0 + m).
template <int DC>
void colsum(const Ctx& c, int64_t i, int64_t j0, int64_t m) {
  alignas(64) float a[CH];
  alignas(64) float acc[CH];
  for (int64_t j = 0; j < m; ++j) acc[j] = 0.f;
  for (int64_t n = 0; n < c.N; ++n) {
    logits_chunk<DC>(c, i, c.zs + (i * c.N + n) * (DC > 0 ? DC : c.D), j0, m, a);
    const float L = c.lse[i * c.N + n];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) acc[j] += simd::fexp(a[j] - L);
  }
  std::memcpy(c.colsum + i * c.K + j0, acc, m * sizeof(float));
}

// Sweep 3: per row W = sum_j p, Q = sum_j q, A = sum_j q e_j, B = sum_j p e_j with
// q = p (c_j - w (a - lse)); then, with the probabilities renormalised by W (see entropy_loss.py),
// beta = u - Q / W and dL/dz = (2/T) (A + beta B) / W. Stores beta and 1 / W for sweep 4.
template <int DC>
void rows_bwd(const Ctx& c, int64_t i, int64_t n0, int64_t n1) {
  alignas(64) float a[CH];
  alignas(64) float q[CH];
  const int64_t R = n1 - n0, D = DC > 0 ? DC : c.D;
  std::vector<float> A(R * D, 0.f), B(R * D, 0.f), Ws(R, 0.f), Qs(R, 0.f);
  const float* cj = c.grad_col + i * c.K;
  for (int64_t j0 = 0; j0 < c.K; j0 += CH) {
    const int64_t m = std::min(CH, c.K - j0);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = n0 + r;
      logits_chunk<DC>(c, i, c.zs + (i * c.N + n) * D, j0, m, a);
      const float L = c.lse[i * c.N + n], w = c.grad_ent[i * c.N + n];
      float sw = 0.f, sq = 0.f;
#pragma omp simd reduction(+ : sw, sq)
      for (int64_t j = 0; j < m; ++j) {
        const float lp = a[j] - L;
        const float p = simd::fexp(lp);
        const float qj = p * (cj[j0 + j] - w * lp);
        sw += p;
        sq += qj;
        q[j] = qj;
        a[j] = p;
      }
      Ws[r] += sw;
      Qs[r] += sq;
      for (int64_t d = 0; d < D; ++d) {
        const float* et = c.et + (i * D + d) * c.K + j0;
        float sa = 0.f, sb = 0.f;
#pragma omp simd reduction(+ : sa, sb)
        for (int64_t j = 0; j < m; ++j) {
          sa += q[j] * et[j];
          sb += a[j] * et[j];
        }
        A[r * D + d] += sa;
        B[r * D + d] += sb;
      }
    }
  }
  const float two_t = 2.0f * c.inv_t;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = n0 + r, row = i * c.N + n;
    const float inv_w = 1.0f / Ws[r];
    const float b = c.grad_lse[row] - Qs[r] * inv_w;
    c.beta[row] = b;
    c.inv_w[row] = inv_w;
    float* gz = c.grad_z + (n * c.k + i) * D;
    for (int64_t d = 0; d < D; ++d) gz[d] = two_t * inv_w * (A[r * D + d] + b * B[r * D + d]);
  }
}

// Sweep 4: for the codes [j0, j0 + m): G_nj = (p / W_n) (c_j - w_n (a - lse_n) + beta_n),
// dL/de_j = sum_n G_nj zs_n - (2/T) e_j sum_n G_nj.
template <int DC>
void grad_e(const Ctx& c, int64_t i, int64_t j0, int64_t m) {
  alignas(64) float a[CH];
  alignas(64) float gs[CH];
  const int64_t D = DC > 0 ? DC : c.D;
  std::vector<float> gz(D * CH, 0.f);
  for (int64_t j = 0; j < m; ++j) gs[j] = 0.f;
  const float* cj = c.grad_col + i * c.K + j0;
  for (int64_t n = 0; n < c.N; ++n) {
    const float* zrow = c.zs + (i * c.N + n) * D;
    logits_chunk<DC>(c, i, zrow, j0, m, a);
    const int64_t row = i * c.N + n;
    const float L = c.lse[row], w = c.grad_ent[row], b = c.beta[row], iw = c.inv_w[row];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const float lp = a[j] - L;
      const float g = simd::fexp(lp) * iw * (cj[j] - w * lp + b);
      gs[j] += g;
      a[j] = g;
    }
    for (int64_t d = 0; d < D; ++d) {
      const float zd = zrow[d];
      float* acc = gz.data() + d * CH;
      for (int64_t j = 0; j < m; ++j) acc[j] += a[j] * zd;
    }
  }
  const float two_t = 2.0f * c.inv_t;
  for (int64_t j = 0; j < m; ++j) {
    const float* e = c.e + (i * c.K + j0 + j) * D;
    float* out = c.grad_e + (i * c.K + j0 + j) * D;
    for (int64_t d = 0; d < D; ++d) out[d] = gz[d * CH + j] - two_t * e[d] * gs[j];
  }
}

#endif  // FQGAN_ISA_PASS
