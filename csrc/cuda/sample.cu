// Fused CFG + temperature + top-k/top-p sampling, CUDA: one block per row, block reductions.
// The per-row algorithm is described in fqgan_kernels/sample.py:
//   pass 1       x = (uncond + cfg * (cond - uncond)) / T in float32 (explicit _rn intrinsics: no FMA
//                contraction and a correctly rounded divide even under --use_fast_math, so x is
//                bit-identical to the CPU reference's), written to the workspace; block max.
//   top-k        32-step bisection on the order-preserving keys: count(key >= cand), block sum.
//   top-p        32-step bisection: sum_{key >= cand} exp(x - m) (float64), block sum; then the
//                mass above the crossing key, the tie count and the number of ties kept.
//   draw         each thread owns a contiguous chunk of the row; exclusive block scans of the
//                per-thread tie counts and kept masses give each chunk its start, so the first
//                j with cumsum > u * S_kept is found in index order; block min.
// Every reduction runs in a fixed order: deterministic, no atomics. The workspace row is re-read from
// L2 by the later passes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/sample.cuh"

namespace fqgan::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Order-preserving float -> uint32 (x >= y <=> key(x) >= key(y); -0 canonicalised to +0 beforehand).
__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct Sum {
  template <typename R>
  __device__ __forceinline__ R operator()(R a, R b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinI {
  __device__ __forceinline__ long long operator()(long long a, long long b) const { return a < b ? a : b; }
};
struct MaxI {
  __device__ __forceinline__ long long operator()(long long a, long long b) const { return a > b ? a : b; }
};

// Block-wide reduction; every thread gets the result. smem: kWarps slots. Fixed tree: deterministic.
template <typename R, typename Op>
__device__ R block_reduce(R v, R* smem, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  R r = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
  __syncthreads();  // smem may be reused by the next call
  return r;
}

// Block-wide exclusive prefix sum in thread order; smem: kWarps + 1 slots.
template <typename R>
__device__ R block_exclusive_scan(R v, R* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  R inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const R n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  if (lane == 31) smem[warp] = inc;
  __syncthreads();
  R before = R(0);
  for (int w = 0; w < warp; ++w) before += smem[w];
  __syncthreads();
  return before + inc - v;
}

template <typename T, bool kHasUncond>
__global__ void __launch_bounds__(kThreads)
sample_kernel(const T* __restrict__ cond, const T* __restrict__ uncond, float* __restrict__ xws,
              const float* __restrict__ cfgs, const float* __restrict__ temps, const int64_t* __restrict__ top_ks,
              const float* __restrict__ top_ps, const double* __restrict__ uniforms, int64_t* __restrict__ out,
              int64_t V) {
  __shared__ double sd[kWarps + 1];
  __shared__ float sf[kWarps];
  __shared__ long long sl[kWarps + 1];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const T* c = cond + row * V;
  const T* un = kHasUncond ? uncond + row * V : nullptr;
  float* x = xws + row * V;
  const float cfg = cfgs[row], temp = temps[row], top_p = top_ps[row];
  const int64_t top_k = top_ks[row];
  const double u = uniforms[row];

  // pass 1: guided logits -> workspace; max. Non-finite logits as reference.guided_logits: where
  // cond == uncond (bit-equal) the guided logit is cond (a token masked in both stays -inf), and a
  // NaN (opposite infinities, or NaN logits when the caller's scan is off) becomes -inf.
  float m = -INFINITY;
  for (int64_t j = tid; j < V; j += kThreads) {
    float xf = to_float(c[j]);
    if (kHasUncond) {
      const float uf = to_float(un[j]);
      if (__float_as_uint(xf) != __float_as_uint(uf)) xf = __fadd_rn(uf, __fmul_rn(cfg, __fsub_rn(xf, uf)));
    }
    if (isnan(xf)) xf = -INFINITY;
    xf = __fadd_rn(__fdiv_rn(xf, temp), 0.0f);  // + 0: -0 -> +0
    x[j] = xf;
    m = fmaxf(m, xf);
  }
  m = block_reduce(m, sf, Max());  // its __syncthreads also publishes x to the block
  if (m == -INFINITY) {  // nothing to draw: the caller's device-side check reports the row
    if (tid == 0) out[row] = -1;
    return;
  }
  if (m == INFINITY) {  // uniform among the +inf tokens (the softmax's limit): number floor(u * count)
    const int64_t chunk = (V + kThreads - 1) / kThreads;
    const int64_t j0 = min(V, tid * chunk), j1 = min(V, j0 + chunk);
    long long mine = 0;
    for (int64_t j = j0; j < j1; ++j) mine += x[j] == INFINITY;
    const long long before = block_exclusive_scan(mine, sl);
    const long long count = block_reduce(mine, sl, Sum());
    const long long r = min(static_cast<long long>(u * static_cast<double>(count)), count - 1);
    if (r >= before && r < before + mine) {
      long long seen = before;
      for (int64_t j = j0; j < j1; ++j) {
        if (x[j] == INFINITY && seen++ == r) {
          out[row] = j;
          break;
        }
      }
    }
    return;
  }

  // top-k: largest key K with count(key >= K) >= k
  uint32_t lo = 0;
  if (top_k > 0 && top_k < V) {
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = lo | (1u << bit);
      long long cnt = 0;
      for (int64_t j = tid; j < V; j += kThreads) cnt += float_key(x[j]) >= cand;
      cnt = block_reduce(cnt, sl, Sum());
      if (cnt >= top_k) lo = cand;
    }
  }

  // S = sum exp(x - m) over the top-k survivors
  double S = 0.0;
  for (int64_t j = tid; j < V; j += kThreads) {
    const float xf = x[j];
    if (float_key(xf) >= lo) S += static_cast<double>(expf(xf - m));
  }
  S = block_reduce(S, sd, Sum());

  // top-p: crossing key kc, mass above it, ties at it, ties kept
  const bool nucleus = top_p < 1.0f;
  uint32_t kc = 0;
  long long n_keep = 0;
  double S_kept = S;
  if (nucleus) {
    const double P = static_cast<double>(top_p) * S;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = kc | (1u << bit);
      double g = 0.0;
      for (int64_t j = tid; j < V; j += kThreads) {
        const float xf = x[j];
        const uint32_t key = float_key(xf);
        if (key >= lo && key >= cand) g += static_cast<double>(expf(xf - m));
      }
      g = block_reduce(g, sd, Sum());
      if (g > P) kc = cand;
    }
    double above = 0.0;
    long long ties = 0;
    for (int64_t j = tid; j < V; j += kThreads) {
      const float xf = x[j];
      const uint32_t key = float_key(xf);
      if (key >= lo && key > kc) above += static_cast<double>(expf(xf - m));
      ties += key == kc;
    }
    above = block_reduce(above, sd, Sum());
    ties = block_reduce(ties, sl, Sum());
    const double et = static_cast<double>(expf(key_float(kc) - m));
    const double r = et > 0.0 ? floor((P - above) / et) + 1.0 : 1.0;
    n_keep = r >= static_cast<double>(ties) ? ties : (r < 1.0 ? 1 : static_cast<long long>(r));
    S_kept = above + static_cast<double>(n_keep) * et;
  }

  // draw: thread tid owns [j0, j1); ranks of the ties and chunk starts by exclusive scans
  const int64_t chunk = (V + kThreads - 1) / kThreads;
  const int64_t j0 = min(V, tid * chunk), j1 = min(V, j0 + chunk);
  long long my_ties = 0;
  if (nucleus) {
    for (int64_t j = j0; j < j1; ++j) my_ties += float_key(x[j]) == kc;
  }
  const long long rank0 = block_exclusive_scan(my_ties, sl);
  double my_mass = 0.0;
  long long rank = rank0, my_last = -1;
  for (int64_t j = j0; j < j1; ++j) {
    const float xf = x[j];
    const uint32_t key = float_key(xf);
    bool kept = key >= lo;
    if (kept && nucleus) kept = key == kc ? rank++ < n_keep : key > kc;
    if (kept) {
      my_mass += static_cast<double>(expf(xf - m));
      my_last = j;
    }
  }
  const double start = block_exclusive_scan(my_mass, sd);
  const double target = u * S_kept;
  long long hit = V;
  if (start + my_mass > target) {  // the crossing can only be in this chunk
    double cum = start;
    rank = rank0;
    for (int64_t j = j0; j < j1; ++j) {
      const float xf = x[j];
      const uint32_t key = float_key(xf);
      bool kept = key >= lo;
      if (kept && nucleus) kept = key == kc ? rank++ < n_keep : key > kc;
      if (!kept) continue;
      cum += static_cast<double>(expf(xf - m));
      if (cum > target) {
        hit = j;
        break;
      }
    }
  }
  hit = block_reduce(hit, sl, MinI());
  const long long last = block_reduce(my_last, sl, MaxI());
  if (tid == 0) out[row] = hit < V ? hit : (last >= 0 ? last : V - 1);
}

template <typename T>
cudaError_t launch_typed(const void* cond, const void* uncond, float* x, const float* cfg, const float* temperature,
                         const int64_t* top_k, const float* top_p, const double* uniform, int64_t* out, int64_t B,
                         int64_t V, cudaStream_t stream) {
  const T* c = static_cast<const T*>(cond);
  const T* u = static_cast<const T*>(uncond);
  const dim3 grid(static_cast<unsigned>(B)), block(kThreads);
  if (u != nullptr) {
    sample_kernel<T, true><<<grid, block, 0, stream>>>(c, u, x, cfg, temperature, top_k, top_p, uniform, out, V);
  } else {
    sample_kernel<T, false><<<grid, block, 0, stream>>>(c, u, x, cfg, temperature, top_k, top_p, uniform, out, V);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t sample_launch(const void* cond, const void* uncond, SampleDtype dtype, float* x, const float* cfg,
                          const float* temperature, const int64_t* top_k, const float* top_p,
                          const double* uniform, int64_t* out, int64_t B, int64_t V, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (B > 2147483647LL || V < 1) return cudaErrorInvalidValue;
  switch (dtype) {
    case SampleDtype::kFloat32:
      return launch_typed<float>(cond, uncond, x, cfg, temperature, top_k, top_p, uniform, out, B, V, stream);
    case SampleDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(cond, uncond, x, cfg, temperature, top_k, top_p, uniform, out, B, V, stream);
    case SampleDtype::kFloat16:
      return launch_typed<__half>(cond, uncond, x, cfg, temperature, top_k, top_p, uniform, out, B, V, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fqgan::cuda
