// Fused CFG + temperature + top-k/top-p sampling, CPU: one thread per row (at::parallel_for over rows).
// The per-row algorithm (guided logits, radix selects on the float keys, inverse-CDF draw) is described in
// fqgan_kernels/sample.py; the reference is fqgan_kernels/reference.py::sample.
//
// Precision: the guided logits are formed in float32 with the reference's operation order
// (uncond + cfg * (cond - uncond), then / T; non-finite logits as reference.guided_logits), exp in
// float32 (the vectorisable polynomial of cpu/simd.h, ~2 ulp), every sum over V in float64. The per-row
// body is the kernel pass at the bottom of this file, compiled once per instruction set (cpu/isa.h), so
// its passes over V vectorise.
// Memory: per row in flight, V uint32 keys + V float32 exps (128 KiB at V = 16384).
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

// Order-preserving map float -> uint32 (x >= y  <=>  key(x) >= key(y) for non-NaN x, y; -0 is
// canonicalised to +0 by the caller so that equal floats have equal keys).
inline uint32_t float_key(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

inline float key_float(uint32_t k) {
  const uint32_t b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

struct RowParams {
  float cfg, temperature, top_p;
  int64_t top_k;
  double u;
};

// Radix selects on the keys, 8 bits per pass (4 passes; after the first only the keys that share the
// prefix chosen so far are binned), in place of the CUDA kernel's 32-step bisections: the same
// answers, ~V + 3 * (matching keys) work instead of 32 * V.

// Largest key K with count(key >= K) >= k: the key of the k-th largest value (1 <= k <= V).
uint32_t kth_largest_key(const uint32_t* key, int64_t V, int64_t k) {
  uint32_t prefix = 0;
  int64_t above = 0;  // count of keys whose bits above the current digit exceed the prefix's
  for (int shift = 24; shift >= 0; shift -= 8) {
    int64_t hist[256] = {0};
    const uint32_t high = shift == 24 ? 0u : (~0u << (shift + 8));
    for (int64_t j = 0; j < V; ++j) {
      if ((key[j] & high) == prefix) ++hist[(key[j] >> shift) & 255u];
    }
    int d = 255;
    for (; d > 0; --d) {  // digit 0 always qualifies: above + all of hist >= k
      if (above + hist[d] >= k) break;
      above += hist[d];
    }
    prefix |= static_cast<uint32_t>(d) << shift;
  }
  return prefix;
}

// Largest key K with sum_{key >= K} e > P (P < sum e): the key of the token whose inclusion makes the
// descending cumulative mass exceed P.
uint32_t crossing_key(const uint32_t* key, const float* e, int64_t V, double P) {
  uint32_t prefix = 0;
  double above = 0.0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    double hist[256] = {0.0};
    const uint32_t high = shift == 24 ? 0u : (~0u << (shift + 8));
    for (int64_t j = 0; j < V; ++j) {
      if ((key[j] & high) == prefix) hist[(key[j] >> shift) & 255u] += e[j];
    }
    int d = 255;
    for (; d > 0; --d) {
      if (above + hist[d] > P) break;
      above += hist[d];
    }
    prefix |= static_cast<uint32_t>(d) << shift;
  }
  return prefix;
}

// The float with bits b, or -inf when b is a NaN's bits (integer ops only, so loops vectorise).
__attribute__((always_inline)) inline float no_nan(uint32_t b) {
  const uint32_t nan = 0u - static_cast<uint32_t>((b & 0x7fffffffu) > 0x7f800000u);
  b = (0xff800000u & nan) | (b & ~nan);
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

// A row whose guided logits hold +inf: uniform draw among its +inf tokens (the softmax's limit),
// token number floor(u * count) in index order, as reference.sample.
inline int64_t draw_posinf(const float* x, int64_t V, double u) {
  int64_t count = 0;
  for (int64_t j = 0; j < V; ++j) count += x[j] == std::numeric_limits<float>::infinity();
  int64_t r = std::min<int64_t>(static_cast<int64_t>(u * static_cast<double>(count)), count - 1);
  for (int64_t j = 0; j < V; ++j) {
    if (x[j] == std::numeric_limits<float>::infinity() && r-- == 0) return j;
  }
  return V - 1;  // unreachable: count >= 1
}

constexpr int64_t kDrawBlock = 256;

// sum of n floats in float64, 8 fixed lanes (the fixed-width inner loop vectorises; a float64
// `omp simd` reduction does not with GCC 12), so the result does not depend on the ISA.
__attribute__((always_inline)) inline double sum_f64(const float* __restrict e, int64_t n) {
  double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += e[j + l];
  }
  double s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < n; ++j) s += e[j];
  return s;
}

// Index of the first token (in index order) whose inclusive cumulative mass exceeds target: the
// inverse-CDF draw when every token with e > 0 is kept. Whole blocks of kDrawBlock tokens are skipped
// with a vectorised float64 sum; the block that crosses is scanned in order. If rounding keeps the
// in-order scan from crossing where the block sum did, it simply goes on. -1 if nothing crosses.
__attribute__((always_inline)) inline int64_t draw_all_kept(const float* __restrict e, int64_t V, double target) {
  double cum = 0.0;
  int64_t j0 = 0;
  for (; j0 + kDrawBlock <= V; j0 += kDrawBlock) {
    const double bs = sum_f64(e + j0, kDrawBlock);
    if (cum + bs > target) break;
    cum += bs;
  }
  for (int64_t j = j0; j < V; ++j) {
    cum += e[j];
    if (cum > target) return j;  // only an e[j] > 0 can cross: target >= 0
  }
  return -1;
}

}  // namespace
}  // namespace fqgan::cpu

#define FQGAN_ISA_SELF "cpu/sample.cpp"
#include "cpu/isa_passes.h"

namespace fqgan::cpu {
namespace {

template <typename T>
void sample_rows(const at::Tensor& cond, const std::optional<at::Tensor>& uncond, const float* cfg,
                 const float* temperature, const int64_t* top_k, const float* top_p, const double* uniform,
                 int64_t* out) {
  const int64_t B = cond.size(0), V = cond.size(1);
  const T* c = cond.data_ptr<T>();
  const T* u = uncond.has_value() ? uncond->data_ptr<T>() : nullptr;
  const auto row_fn = FQGAN_ISA_PICK(sample_row<T>);
  fpstate::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> key(V);
    std::vector<float> e(V);
    for (int64_t b = b0; b < b1; ++b) {
      const RowParams p{cfg[b], temperature[b], top_p[b], top_k[b], uniform[b]};
      out[b] = row_fn(c + b * V, u == nullptr ? nullptr : u + b * V, V, p, key.data(), e.data());
    }
  });
}

}  // namespace

at::Tensor sample(const at::Tensor& cond, const std::optional<at::Tensor>& uncond, const at::Tensor& cfg,
                  const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                  const at::Tensor& uniform) {
  TORCH_CHECK(cond.dim() == 2 && cond.is_contiguous() && cond.device().is_cpu(),
              "sample (cpu): cond must be a contiguous CPU [B, V] tensor, got ", cond.sizes());
  const int64_t B = cond.size(0);
  TORCH_CHECK(cond.size(1) >= 1, "sample (cpu): V must be >= 1");
  if (uncond.has_value()) {
    TORCH_CHECK(uncond->sizes() == cond.sizes() && uncond->scalar_type() == cond.scalar_type() &&
                    uncond->is_contiguous() && uncond->device().is_cpu(),
                "sample (cpu): uncond must match cond ", cond.sizes(), " and ", cond.scalar_type());
  }
  auto check_param = [B](const at::Tensor& t, at::ScalarType dt, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.scalar_type() == dt && t.is_contiguous() && t.device().is_cpu(),
                "sample (cpu): ", name, " must be a contiguous CPU [", B, "] ", dt, " tensor");
  };
  check_param(cfg, at::kFloat, "cfg");
  check_param(temperature, at::kFloat, "temperature");
  check_param(top_k, at::kLong, "top_k");
  check_param(top_p, at::kFloat, "top_p");
  check_param(uniform, at::kDouble, "uniform");
  const fpstate::FlushDenormals fp_guard;
  at::Tensor out = at::empty({B}, cond.options().dtype(at::kLong));
  const float* cf = cfg.data_ptr<float>();
  const float* tp = temperature.data_ptr<float>();
  const int64_t* tk = top_k.data_ptr<int64_t>();
  const float* pp = top_p.data_ptr<float>();
  const double* un = uniform.data_ptr<double>();
  int64_t* o = out.data_ptr<int64_t>();
  switch (cond.scalar_type()) {
    case at::kFloat: sample_rows<float>(cond, uncond, cf, tp, tk, pp, un, o); break;
    case at::kBFloat16: sample_rows<at::BFloat16>(cond, uncond, cf, tp, tk, pp, un, o); break;
    case at::kHalf: sample_rows<at::Half>(cond, uncond, cf, tp, tk, pp, un, o); break;
    default: TORCH_CHECK(false, "sample (cpu): logits must be float32, bfloat16 or float16, got ", cond.scalar_type());
  }
  return out;
}

}  // namespace fqgan::cpu

#else  // ========== kernel pass: compiled once per ISA, in namespace isa_<name> (cpu/isa.h) ==========

// The token of one row; key, e: V-element scratch.
template <typename T>
int64_t sample_row(const T* __restrict cond, const T* __restrict uncond, int64_t V, const RowParams& p,
                   uint32_t* __restrict key, float* __restrict e) {
  // Pass 1: guided logits (reference op order, float32) into e, their keys, the max. Non-finite
  // inputs follow reference.guided_logits: where cond == uncond (bit-equal; +-0 give the same x
  // either way) the guided logit is cond, so a token masked (-inf) in both stays masked; a NaN left
  // (opposite infinities, or NaN logits when the caller's scan is off) becomes -inf. Integer selects:
  // GCC vectorises them, not float compares in a loop that stores (-ftrapping-math).
  float m = -std::numeric_limits<float>::infinity();
  const float cfg = p.cfg, temp = p.temperature;
  if (uncond != nullptr) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) {
      const float c = static_cast<float>(cond[j]), u = static_cast<float>(uncond[j]);
      const float g = u + cfg * (c - u);
      uint32_t cb, ub, gb;
      std::memcpy(&cb, &c, sizeof(cb));
      std::memcpy(&ub, &u, sizeof(ub));
      std::memcpy(&gb, &g, sizeof(gb));
      const uint32_t same = 0u - static_cast<uint32_t>(cb == ub);
      const float x = no_nan((cb & same) | (gb & ~same)) / temp + 0.0f;  // + 0: -0 -> +0
      e[j] = x;
      key[j] = float_key(x);
      m = m > x ? m : x;
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) {
      const float c = static_cast<float>(cond[j]);
      uint32_t cb;
      std::memcpy(&cb, &c, sizeof(cb));
      const float x = no_nan(cb) / temp + 0.0f;
      e[j] = x;
      key[j] = float_key(x);
      m = m > x ? m : x;
    }
  }
  if (m == -std::numeric_limits<float>::infinity()) return -1;  // nothing to draw: the caller raises
  if (m == std::numeric_limits<float>::infinity()) return draw_posinf(e, V, p.u);
  // top-k: keep x >= the k-th largest (ties kept).
  uint32_t lo = 0;
  if (p.top_k > 0 && p.top_k < V) lo = kth_largest_key(key, V, p.top_k);
  // Pass 2: exps of the survivors (0 for the rest) and their float64 sum.
  // (Integer masking, and the sum in its own loop: GCC vectorises neither a float select nor a
  // float64 reduction inside the exp's loop.)
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float ex = simd::fexp(e[j] - m);
    uint32_t bits;
    std::memcpy(&bits, &ex, sizeof(bits));
    bits &= 0u - static_cast<uint32_t>(key[j] >= lo);
    std::memcpy(&e[j], &bits, sizeof(bits));
  }
  const double S = sum_f64(e, V);
  if (!(p.top_p < 1.0f)) {
    // Inverse-CDF draw in index order over all survivors.
    const int64_t j = draw_all_kept(e, V, p.u * S);
    if (j >= 0) return j;
    for (int64_t i = V - 1; i > 0; --i) {  // rounding put u * S at the very end: the last survivor
      if (key[i] >= lo) return i;
    }
    return 0;
  }
  // top-p: tokens above the crossing value t are kept; of the ties at t, the first n_keep in index order.
  const double P = static_cast<double>(p.top_p) * S;
  const uint32_t kc = crossing_key(key, e, V, P);
  double above = 0.0;
  int64_t ties = 0;
  for (int64_t j = 0; j < V; ++j) {
    above += key[j] > kc ? static_cast<double>(e[j]) : 0.0;
    ties += key[j] == kc;
  }
  const double et = static_cast<double>(simd::fexp(key_float(kc) - m));
  // Tie number r (0-based) is kept iff above + r * et <= P (its mass before, in sorted order).
  const double r = et > 0.0 ? std::floor((P - above) / et) + 1.0 : 1.0;
  const int64_t n_keep = r >= static_cast<double>(ties) ? ties : std::max<int64_t>(1, static_cast<int64_t>(r));
  const double S_kept = above + static_cast<double>(n_keep) * et;
  // Inverse-CDF draw in index order over the kept tokens.
  const double target = p.u * S_kept;
  double cum = 0.0;
  int64_t rank = 0, last = V - 1;
  for (int64_t j = 0; j < V; ++j) {
    const bool kept = key[j] == kc ? rank++ < n_keep : key[j] > kc;
    if (!kept) continue;
    last = j;
    cum += e[j];
    if (cum > target) return j;
  }
  return last;  // only reached when rounding puts u * S_kept at the very end
}

#endif  // FQGAN_ISA_PASS
