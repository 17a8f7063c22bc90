// Fused codebook / commitment / disentanglement losses, CUDA. Contract: vq_losses.cuh; maths:
// fqgan_kernels/vq_losses.py.
//
// Forward: vq_losses_forward_kernel, grid-stride over rows with at most 1024 blocks of 256 threads;
// for each slot (k squared-error sums, then one per pair) every thread sums its rows, the block
// reduces with warp shuffles and one shared-memory pass, and thread 0 writes partial[block, slot].
// vq_losses_sum_kernel then adds the block partials of each slot in block order (deterministic).
// Rows are re-read once per slot; k, D are small (FQGAN: k <= 3, D = 8), so this stays memory-light
// and keeps no per-slot arrays in registers.
// Backward: vq_losses_backward_kernel, one thread per (row, sub-codebook); no reductions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/vq_losses.cuh"

namespace fqgan::cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kEps = 1e-12f;

template <typename T>
__device__ __forceinline__ float load(const T* p);
template <>
__device__ __forceinline__ float load<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
__device__ __forceinline__ float load<__half>(const __half* p) { return __half2float(*p); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// |c| of one code row (correctly rounded sqrt, as F.normalize).
template <typename T>
__device__ __forceinline__ float row_norm(const T* c, int64_t D) {
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float v = load(c + d);
    ss = fmaf(v, v, ss);
  }
  return __fsqrt_rn(ss);
}

template <typename T>
__device__ __forceinline__ float row_dot(const T* a, const T* b, int64_t D) {
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s = fmaf(load(a + d), load(b + d), s);
  return s;
}

// Block-wide sum; the result is valid in thread 0. `scratch` holds kThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  }
  __syncthreads();  // scratch is reused by the next slot
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) vq_losses_forward_kernel(const T* __restrict__ z,
                                                                     const T* __restrict__ codes, int64_t N,
                                                                     int k, int64_t D, int slots,
                                                                     float* __restrict__ partial) {
  __shared__ float scratch[kThreads / 32];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row = static_cast<int64_t>(k) * D;
  for (int s = 0; s < slots; ++s) {
    // Slot s >= k is the pair (a, b), a < b, in row-major order.
    int a = s, b = -1;
    if (s >= k) {
      int p = s - k;
      a = 0;
      while (p >= k - 1 - a) {
        p -= k - 1 - a;
        ++a;
      }
      b = a + 1 + p;
    }
    float acc = 0.f;
    for (int64_t n = first; n < N; n += stride) {
      const T* cr = codes + n * row;
      if (b < 0) {
        const T* zr = z + n * row;
        for (int64_t d = 0; d < D; ++d) {
          const float diff = load(cr + a * D + d) - load(zr + a * D + d);
          acc = fmaf(diff, diff, acc);
        }
      } else {
        const float na = fmaxf(row_norm(cr + a * D, D), kEps), nb = fmaxf(row_norm(cr + b * D, D), kEps);
        const float dot = row_dot(cr + a * D, cr + b * D, D) / (na * nb);
        acc = fmaf(dot, dot, acc);
      }
    }
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.x) * slots + s] = total;
  }
}

__global__ void vq_losses_sum_kernel(const float* __restrict__ partial, int blocks, int slots,
                                     float* __restrict__ sums) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= slots) return;
  float total = 0.f;
  for (int blk = 0; blk < blocks; ++blk) total += partial[static_cast<int64_t>(blk) * slots + s];
  sums[s] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) vq_losses_backward_kernel(const T* __restrict__ z,
                                                                      const T* __restrict__ codes, int64_t N,
                                                                      int k, int64_t D, bool disentangle,
                                                                      const float* __restrict__ coef,
                                                                      T* __restrict__ grad_z,
                                                                      T* __restrict__ grad_codes) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= N * k) return;
  const int64_t n = t / k;
  const int a = static_cast<int>(t - n * k);
  const int64_t row = static_cast<int64_t>(k) * D;
  const T* zr = z + n * row + a * D;
  const T* cr = codes + n * row;
  const T* ca = cr + a * D;
  const float cz = coef[a], cc = coef[k + a];
  // Disentangle: dL/dq_a = cdis * sum_{b != a} (q_a . q_b) q_b = sum_b w[b] c_b, w[b] = cdis (q_a.q_b) / |c_b|;
  // radial = q_a . dL/dq_a = cdis * sum_b (q_a . q_b)^2.
  float w[kVQLossMaxK];
  float inv_a = 0.f, radial = 0.f;
  if (disentangle) {
    const float cdis = coef[2 * k];
    const float norm_a = row_norm(ca, D);
    inv_a = 1.f / fmaxf(norm_a, kEps);
    for (int b = 0; b < k; ++b) {
      w[b] = 0.f;
      if (b == a) continue;
      const float inv_b = 1.f / fmaxf(row_norm(cr + b * D, D), kEps);
      const float dot = row_dot(ca, cr + b * D, D) * inv_a * inv_b;
      w[b] = cdis * dot * inv_b;
      radial = fmaf(cdis * dot, dot, radial);
    }
    if (!(norm_a > kEps)) radial = 0.f;  // F.normalize below eps is x / eps: no radial part
  }
  T* gz = grad_z + n * row + a * D;
  T* gc = grad_codes + n * row + a * D;
  for (int64_t d = 0; d < D; ++d) {
    const float c = load(ca + d);
    const float diff = c - load(zr + d);
    float g = -cz * diff;
    if (disentangle) {
      float gq = 0.f;
      for (int b = 0; b < k; ++b) gq = fmaf(w[b], load(cr + b * D + d), gq);
      g += (gq - radial * c * inv_a) * inv_a;
    }
    gz[d] = from_float<T>(g);
    gc[d] = from_float<T>(cc * diff);
  }
}

template <typename T>
cudaError_t forward_typed(const void* z, const void* codes, int64_t N, int64_t k, int64_t D, bool disentangle,
                          float* partial, float* sums, cudaStream_t stream) {
  const int slots = static_cast<int>(k + (disentangle ? k * (k - 1) / 2 : 0));
  const int blocks = vq_losses_forward_blocks(N);
  vq_losses_forward_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(z), static_cast<const T*>(codes),
                                                                N, static_cast<int>(k), D, slots, partial);
  vq_losses_sum_kernel<<<(slots + 127) / 128, 128, 0, stream>>>(partial, blocks, slots, sums);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const void* z, const void* codes, int64_t N, int64_t k, int64_t D, bool disentangle,
                           const float* coef, void* grad_z, void* grad_codes, cudaStream_t stream) {
  const int64_t threads = N * k;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  vq_losses_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(z), static_cast<const T*>(codes), N, static_cast<int>(k), D, disentangle, coef,
      static_cast<T*>(grad_z), static_cast<T*>(grad_codes));
  return cudaGetLastError();
}

}  // namespace

cudaError_t vq_losses_forward_launch(const void* z, const void* codes, VQLossDType dtype, int64_t N, int64_t k,
                                     int64_t D, bool disentangle, float* partial, float* sums, cudaStream_t stream) {
  if (N < 1 || k < 1 || D < 1 || k > kVQLossMaxK) return cudaErrorInvalidValue;
  disentangle = disentangle && k > 1;
  switch (dtype) {
    case VQLossDType::kFloat32: return forward_typed<float>(z, codes, N, k, D, disentangle, partial, sums, stream);
    case VQLossDType::kBFloat16:
      return forward_typed<__nv_bfloat16>(z, codes, N, k, D, disentangle, partial, sums, stream);
    case VQLossDType::kFloat16: return forward_typed<__half>(z, codes, N, k, D, disentangle, partial, sums, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t vq_losses_backward_launch(const void* z, const void* codes, VQLossDType dtype, int64_t N, int64_t k,
                                      int64_t D, bool disentangle, const float* coef, void* grad_z, void* grad_codes,
                                      cudaStream_t stream) {
  if (N < 1 || k < 1 || D < 1 || k > kVQLossMaxK) return cudaErrorInvalidValue;
  disentangle = disentangle && k > 1;
  switch (dtype) {
    case VQLossDType::kFloat32:
      return backward_typed<float>(z, codes, N, k, D, disentangle, coef, grad_z, grad_codes, stream);
    case VQLossDType::kBFloat16:
      return backward_typed<__nv_bfloat16>(z, codes, N, k, D, disentangle, coef, grad_z, grad_codes, stream);
    case VQLossDType::kFloat16:
      return backward_typed<__half>(z, codes, N, k, D, disentangle, coef, grad_z, grad_codes, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fqgan::cuda
