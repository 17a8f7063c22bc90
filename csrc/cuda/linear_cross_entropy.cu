// Fused linear + cross-entropy, CUDA epilogue: one thread block per logits row. The GEMMs around it
// (logits = x W^T, grad_hidden = dlogits W, grad_weight += dlogits^T x) are cuBLAS calls made by the
// glue in linear_cross_entropy.cpp; this is the part where a hand-written kernel beats a chain of
// ATen ops: one read for the online max / sum-exp / sum / target logit, one read + write for dlogits,
// instead of ~6 full passes (and 2-3 N x V temporaries) of softmax + gather + sub in eager PyTorch.
// Includes CUDA headers only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/linear_cross_entropy.cuh"

namespace fqgan::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

// (max, sum of exp(. - max)) pairs; an empty side (m = -inf, s = 0) must not produce exp(-inf + inf).
__device__ __forceinline__ void lse_combine(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  const float a = m == -INFINITY ? 0.f : s * __expf(m - mm);
  const float b = m2 == -INFINITY ? 0.f : s2 * __expf(m2 - mm);
  m = mm;
  s = a + b;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lce_epilogue_kernel(T* __restrict__ logits, const float* __restrict__ bias,
                                                                const int64_t* __restrict__ targets,
                                                                const float* __restrict__ row_grad,
                                                                float* __restrict__ loss, float* __restrict__ lse,
                                                                int64_t V, int64_t ignore_index, float eps,
                                                                float z_loss) {
  __shared__ float sh_m[kWarps], sh_s[kWarps], sh_z[kWarps];
  __shared__ float sh_lse;
  const int64_t row = blockIdx.x;
  T* z = logits + row * V;
  const int64_t t = targets[row];
  const bool valid = t != ignore_index;
  // Thread 0 reads the target logit now: the gradient pass below overwrites the row.
  float zt = 0.f;
  if (threadIdx.x == 0 && valid) zt = to_f32(z[t]) + (bias != nullptr ? bias[t] : 0.f);

  float m = -INFINITY, s = 0.f, sz = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float v = to_f32(z[j]) + (bias != nullptr ? bias[j] : 0.f);
    sz += v;
    if (v > m) {
      s = (m == -INFINITY ? 0.f : s * __expf(m - v)) + 1.f;
      m = v;
    } else {
      s += __expf(v - m);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    sz += __shfl_xor_sync(0xffffffffu, sz, off);
    lse_combine(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
    sh_z[warp] = sz;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? sh_m[lane] : -INFINITY;
    s = lane < kWarps ? sh_s[lane] : 0.f;
    sz = lane < kWarps ? sh_z[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
      sz += __shfl_xor_sync(0xffffffffu, sz, off);
      lse_combine(m, s, m2, s2);
    }
    if (lane == 0) {
      const float l = m + logf(s);
      sh_lse = l;
      lse[row] = l;
      // zt lives in thread 0 (lane 0 of warp 0).
      loss[row] = valid ? l - (1.f - eps) * zt - eps / static_cast<float>(V) * sz + z_loss * l * l : 0.f;
    }
  }
  if (row_grad == nullptr) return;
  __syncthreads();  // sh_lse visible; every thread has finished reading the row
  const float l = sh_lse;
  const float g = valid ? row_grad[row] : 0.f;
  const float coef = g * (1.f + 2.f * z_loss * l);
  const float shift = -g * eps / static_cast<float>(V);
  const float hit = g * (1.f - eps);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float v = to_f32(z[j]) + (bias != nullptr ? bias[j] : 0.f);
    float d = coef * __expf(v - l) + shift;
    if (j == t) d -= hit;
    z[j] = from_f32<T>(d);
  }
}

template <typename T>
cudaError_t launch(void* logits, const float* bias, const int64_t* targets, const float* row_grad, float* loss,
                   float* lse, int64_t n, int64_t V, int64_t ignore_index, float eps, float z_loss,
                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > 2147483647LL) return cudaErrorInvalidValue;
  lce_epilogue_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      static_cast<T*>(logits), bias, targets, row_grad, loss, lse, V, ignore_index, eps, z_loss);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lce_epilogue_launch(LceDtype dtype, void* logits, const float* bias, const int64_t* targets,
                                const float* row_grad, float* loss, float* lse, int64_t n, int64_t V,
                                int64_t ignore_index, float label_smoothing, float z_loss, cudaStream_t stream) {
  switch (dtype) {
    case LceDtype::kFloat32:
      return launch<float>(logits, bias, targets, row_grad, loss, lse, n, V, ignore_index, label_smoothing, z_loss,
                           stream);
    case LceDtype::kBFloat16:
      return launch<__nv_bfloat16>(logits, bias, targets, row_grad, loss, lse, n, V, ignore_index, label_smoothing,
                                   z_loss, stream);
    case LceDtype::kFloat16:
      return launch<__half>(logits, bias, targets, row_grad, loss, lse, n, V, ignore_index, label_smoothing, z_loss,
                            stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fqgan::cuda
