// Nearest code per sub-codebook, CUDA. Maths and contract: nearest_code.cuh.
//
// ||zh - eh_j||^2 = ||zh||^2 - 2 s_j with s_j = zh . eh_j + b_j, b_j = -0.5 ||eh_j||^2, so each row
// keeps a running argmax of s_j. b_j stays with l2_normalize too: it is -0.5 for unit codes but 0
// for an all-zero codebook row, which the reference scores as distance ||zh||^2.
//
// 1. nearest_code_prep_kernel: one thread per code; eh in float32, rows padded to DP = D rounded up
//    to 4 (zeros), and b. z is never copied: each search thread normalises its rows in registers.
// 2. nearest_code_search_kernel<T, DP, R>: 256 threads; a thread owns R rows of sub-codebook
//    blockIdx.y (z rows in registers, padded to DP with zeros) and S threads (adjacent lanes, S a
//    power of two <= 32, chosen on the host to fill the GPU) split each row's codes: thread s takes
//    codes s, s + S, ... of every tile (interleaved, so a warp's shared-memory reads hit distinct
//    banks or broadcast). Tiles of TILE_K codes (+ their bias) are staged through shared memory,
//    double-buffered with cp.async on sm_80+ (plain copies below). Each thread sees its codes in
//    increasing j and updates with a strict >, keeping its lowest j on ties; the S partial
//    (score, j) pairs of a row are reduced with warp shuffles (higher score, then lower j).
//    Lane s == 0 writes the index and gathers the code row from the packed codebook.
// 3. nearest_code_generic_kernel<T>: D > 64, one thread per row, straight from global memory.
// Offsets that can pass 2^31 (n * k * D, i * K * DP) are int64; code indices (j < K < 2^31) are int.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/nearest_code.cuh"

namespace fqgan::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileFloats = 2048;  // code floats per shared-memory buffer (8 KiB; two buffers + bias < 20 KiB)
constexpr int kMaxTemplatedDim = 64;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// 1 / max(||x||, eps) as F.normalize divides: correctly rounded sqrt and division (not affected by
// --use_fast_math), so the packed codes equal F.normalize's to an ulp.
__device__ __forceinline__ float inv_norm(float sumsq) {
  return __fdiv_rn(1.0f, fmaxf(__fsqrt_rn(sumsq), 1e-12f));
}

// Copies 16 bytes global -> shared; asynchronous on sm_80+.
__device__ __forceinline__ void copy16(float* smem_dst, const float* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(saddr), "l"(gmem_src) : "memory");
#else
  *reinterpret_cast<float4*>(smem_dst) = *reinterpret_cast<const float4*>(gmem_src);
#endif
}

__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `Pending` of this thread's committed copy groups are still in flight.
template <int Pending>
__device__ __forceinline__ void copy_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}

template <typename T>
__global__ void nearest_code_prep_kernel(const T* __restrict__ cb, float* __restrict__ packed,
                                         float* __restrict__ bias, int64_t k, int K, int KP, int D, int DP,
                                         bool l2) {
  const int64_t total = k * static_cast<int64_t>(K);
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < total;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = c / K;
    const int64_t j = c - i * K;
    const T* src = cb + c * D;
    float* dst = packed + c * DP;
    float scale = 1.0f;
    if (l2) {
      float ss = 0.0f;
      for (int d = 0; d < D; ++d) {
        const float x = to_float(src[d]);
        ss = fmaf(x, x, ss);
      }
      scale = inv_norm(ss);
    }
    float ss2 = 0.0f;
    for (int d = 0; d < D; ++d) {
      const float e = l2 ? to_float(src[d]) * scale : to_float(src[d]);
      dst[d] = e;
      ss2 = fmaf(e, e, ss2);
    }
    for (int d = D; d < DP; ++d) dst[d] = 0.0f;
    bias[i * KP + j] = -0.5f * ss2;
  }
}

// Loads rows of z into registers, zero-padded to DP and normalised when l2.
template <typename T, int DP, int R>
__device__ __forceinline__ void load_rows(const T* __restrict__ z, float (&zr)[R][DP], const int64_t (&n)[R],
                                          int64_t N, int64_t k, int64_t i, int D, bool l2) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float ss = 0.0f;
    const T* src = z + (n[r] * k + i) * D;
#pragma unroll
    for (int d = 0; d < DP; ++d) {
      zr[r][d] = (n[r] < N && d < D) ? to_float(src[d]) : 0.0f;
      ss = fmaf(zr[r][d], zr[r][d], ss);
    }
    if (l2) {
      const float s = inv_norm(ss);
#pragma unroll
      for (int d = 0; d < DP; ++d) zr[r][d] *= s;
    }
  }
}

// The better of two (score, j) candidates: higher score, then lower j.
__device__ __forceinline__ void merge_candidate(float& best, int& arg, float other, int other_arg) {
  if (other > best || (other == best && other_arg < arg)) {
    best = other;
    arg = other_arg;
  }
}

// Stages tile t of one sub-codebook: its cnt * DP code floats and ceil(cnt / 4) * 4 bias floats (the
// bias rows are padded to KP, a multiple of 4, so the last chunk stays inside the workspace; the
// padding is never read back because the compute loop stops at cnt). Addresses are 16-byte aligned:
// DP, KP, TILE_K are multiples of 4 and the workspace is 16-byte aligned.
template <int DP, int TILE_K>
__device__ __forceinline__ void stage_tile(float* dst_e, float* dst_b, const float* __restrict__ e_src,
                                           const float* __restrict__ b_src, int K, int t, int tid) {
  const int k0 = t * TILE_K;
  const int cnt = min(TILE_K, K - k0);
  const int e_chunks = cnt * (DP / 4);
  const float* e = e_src + static_cast<int64_t>(k0) * DP;
  for (int c = tid; c < e_chunks; c += kThreads) copy16(dst_e + 4 * c, e + 4 * c);
  const int b_chunks = (cnt + 3) / 4;
  for (int c = tid; c < b_chunks; c += kThreads) copy16(dst_b + 4 * c, b_src + k0 + 4 * c);
}

// Blocks per SM asked of ptxas (0: no .minnctapersm). DP = 16: left alone, ptxas 13.0 picks 64
// registers for sm_90a and spills 8 bytes (scripts/check_cuda_compile.sh); with 3 blocks (<= 85
// registers) it uses 78 and spills nothing, on sm_80 as well. Same 24 warps per SM as DP = 8.
template <int DP>
constexpr int search_min_blocks() { return DP == 16 ? 3 : 0; }

template <typename T, int DP, int R>
__global__ void __launch_bounds__(kThreads, search_min_blocks<DP>())
    nearest_code_search_kernel(const T* __restrict__ z, const float* __restrict__ packed,
                               const float* __restrict__ bias, T* __restrict__ codes, int64_t* __restrict__ indices,
                               int64_t N, int64_t k, int K, int KP, int D, int S, bool l2) {
  constexpr int TILE_K = kTileFloats / DP;  // 512, 256, 128, 64, 32: a multiple of 4
  static_assert(DP % 4 == 0 && TILE_K % 4 == 0 && TILE_K >= 4, "16-byte chunks");
  extern __shared__ __align__(16) float smem[];
  // [buffer 0 codes | buffer 1 codes | buffer 0 bias | buffer 1 bias], every part 16-byte aligned
  float* const smem_b = smem + 2 * TILE_K * DP;

  const int64_t i = blockIdx.y;
  const int tid = threadIdx.x;
  const int s = tid % S;                 // this thread's share of each row's codes
  const int g = tid / S;                 // row group
  const int G = kThreads / S;            // row groups per block
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * G * R;

  int64_t n[R];
#pragma unroll
  for (int r = 0; r < R; ++r) n[r] = row0 + static_cast<int64_t>(r) * G + g;
  float zr[R][DP];
  load_rows<T, DP, R>(z, zr, n, N, k, i, D, l2);

  float best[R];
  int arg[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    best[r] = __int_as_float(0xff800000);
    arg[r] = 0;  // stays in range even if no score ever compares greater (NaN input)
  }

  const float* const e_src = packed + i * static_cast<int64_t>(K) * DP;
  const float* const b_src = bias + i * static_cast<int64_t>(KP);
  const int ntiles = (K + TILE_K - 1) / TILE_K;

  stage_tile<DP, TILE_K>(smem, smem_b, e_src, b_src, K, 0, tid);
  copy_commit();
  for (int t = 0; t < ntiles; ++t) {
    const int buf = t & 1;
    // Prefetch tile t + 1 into the other buffer; the trailing __syncthreads of iteration t - 1
    // guarantees nobody still reads it. An empty group is committed on the last tile so that
    // wait_group<1> below always means "tile t has landed".
    if (t + 1 < ntiles) stage_tile<DP, TILE_K>(smem + (buf ^ 1) * (TILE_K * DP), smem_b + (buf ^ 1) * TILE_K, e_src, b_src, K, t + 1, tid);
    copy_commit();
    copy_wait<1>();
    __syncthreads();  // every thread's copies of tile t are visible

    const int k0 = t * TILE_K;
    const int cnt = min(TILE_K, K - k0);
    const float* te = smem + buf * (TILE_K * DP);
    const float* tb = smem_b + buf * TILE_K;
    for (int c = s; c < cnt; c += S) {
      float acc[R];
      const float b = tb[c];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = b;
      const float4* e4 = reinterpret_cast<const float4*>(te + c * DP);
#pragma unroll
      for (int q = 0; q < DP / 4; ++q) {
        const float4 v = e4[q];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          acc[r] = fmaf(zr[r][4 * q + 0], v.x, acc[r]);
          acc[r] = fmaf(zr[r][4 * q + 1], v.y, acc[r]);
          acc[r] = fmaf(zr[r][4 * q + 2], v.z, acc[r]);
          acc[r] = fmaf(zr[r][4 * q + 3], v.w, acc[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (acc[r] > best[r]) {  // strict: this thread's codes come in increasing j
          best[r] = acc[r];
          arg[r] = k0 + c;
        }
      }
    }
    __syncthreads();  // tile t is read by everyone before iteration t + 1 restages this buffer
  }

  // The S threads of a row are adjacent lanes of one warp (S divides 32); xor offsets < S stay
  // inside the group. Every lane of every warp takes part (no early exit above).
#pragma unroll
  for (int r = 0; r < R; ++r) {
    for (int off = S >> 1; off > 0; off >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best[r], off);
      const int oa = __shfl_xor_sync(0xffffffffu, arg[r], off);
      merge_candidate(best[r], arg[r], ob, oa);
    }
  }

  if (s == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (n[r] < N) {
        const int64_t out = n[r] * k + i;
        indices[out] = arg[r];
        const float* e = e_src + static_cast<int64_t>(arg[r]) * DP;
        T* dst = codes + out * D;
        for (int d = 0; d < D; ++d) dst[d] = from_float<T>(e[d]);
      }
    }
  }
}

// Any D: one thread per (row, sub-codebook), codes read straight from the packed workspace.
template <typename T>
__global__ void nearest_code_generic_kernel(const T* __restrict__ z, const float* __restrict__ packed,
                                            const float* __restrict__ bias, T* __restrict__ codes,
                                            int64_t* __restrict__ indices, int64_t N, int64_t k, int K, int KP,
                                            int D, int DP, bool l2) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t i = blockIdx.y;
  if (n >= N) return;
  const T* zr = z + (n * k + i) * D;
  float scale = 1.0f;
  if (l2) {
    float ss = 0.0f;
    for (int d = 0; d < D; ++d) {
      const float x = to_float(zr[d]);
      ss = fmaf(x, x, ss);
    }
    scale = inv_norm(ss);
  }
  const float* e_src = packed + i * static_cast<int64_t>(K) * DP;
  float best = __int_as_float(0xff800000);
  int arg = 0;
  for (int j = 0; j < K; ++j) {
    const float* e = e_src + static_cast<int64_t>(j) * DP;
    float acc = bias[i * KP + j];
    for (int d = 0; d < D; ++d) acc = fmaf(to_float(zr[d]) * scale, e[d], acc);
    if (acc > best) {
      best = acc;
      arg = j;
    }
  }
  const int64_t out = n * k + i;
  indices[out] = arg;
  const float* e = e_src + static_cast<int64_t>(arg) * DP;
  for (int d = 0; d < D; ++d) codes[out * D + d] = from_float<T>(e[d]);
}

int multiprocessors() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                 cudaSuccess) {
    return 108;
  }
  return sms;
}

template <typename T, int DP, int R>
cudaError_t launch_search(const T* z, const float* packed, const float* bias, T* codes, int64_t* indices, int64_t N,
                          int64_t k, int K, int KP, int D, bool l2, cudaStream_t stream) {
  // Split each row's codes over S lanes until the grid fills the GPU (2048 threads per SM), but no
  // further than the codes go round.
  const int64_t row_threads = (N + R - 1) / R * k;
  const int64_t target = static_cast<int64_t>(multiprocessors()) * 2048;
  int S = 1;
  while (S < 32 && S < K && row_threads * S < target) S *= 2;
  const int64_t rows_per_block = static_cast<int64_t>(kThreads / S) * R;
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  if (blocks > 2147483647LL || k > 65535) return cudaErrorInvalidValue;
  constexpr int TILE_K = kTileFloats / DP;
  const size_t smem = (2 * TILE_K * DP + 2 * TILE_K) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(k));
  nearest_code_search_kernel<T, DP, R>
      <<<grid, kThreads, smem, stream>>>(z, packed, bias, codes, indices, N, k, K, KP, D, S, l2);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const T* z, const T* cb, int64_t N, int64_t k, int64_t K64, int64_t D64, bool l2,
                         float* workspace, T* codes, int64_t* indices, cudaStream_t stream) {
  const int K = static_cast<int>(K64);
  const int D = static_cast<int>(D64);
  const int DP = static_cast<int>(nearest_code_padded_dim(D64));
  const int KP = (K + 3) / 4 * 4;
  float* packed = workspace;
  float* bias = workspace + k * K64 * DP;

  const int64_t codes_total = k * K64;
  const int64_t prep_blocks = (codes_total + kThreads - 1) / kThreads;
  const unsigned prep_grid = static_cast<unsigned>(prep_blocks < 65535 * 8 ? prep_blocks : 65535 * 8);
  nearest_code_prep_kernel<T><<<prep_grid, kThreads, 0, stream>>>(cb, packed, bias, k, K, KP, D, DP, l2);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  switch (DP) {
    case 4:
      return launch_search<T, 4, 4>(z, packed, bias, codes, indices, N, k, K, KP, D, l2, stream);
    case 8:
      return launch_search<T, 8, 4>(z, packed, bias, codes, indices, N, k, K, KP, D, l2, stream);
    case 16:
      return launch_search<T, 16, 2>(z, packed, bias, codes, indices, N, k, K, KP, D, l2, stream);
    case 32:
      return launch_search<T, 32, 1>(z, packed, bias, codes, indices, N, k, K, KP, D, l2, stream);
    case kMaxTemplatedDim:
      return launch_search<T, kMaxTemplatedDim, 1>(z, packed, bias, codes, indices, N, k, K, KP, D, l2, stream);
    default:
      break;
  }
  if (k > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((N + kThreads - 1) / kThreads), static_cast<unsigned>(k));
  nearest_code_generic_kernel<T><<<grid, kThreads, 0, stream>>>(z, packed, bias, codes, indices, N, k, K, KP, D, DP,
                                                               l2);
  return cudaGetLastError();
}

}  // namespace

cudaError_t nearest_code_launch(const void* z, const void* codebooks, NearestCodeDType dtype, int64_t N, int64_t k,
                                int64_t K, int64_t D, bool l2_normalize, float* workspace, void* codes,
                                int64_t* indices, cudaStream_t stream) {
  if (N < 0 || k < 0 || K < 1 || K > 2147483647LL - 4 || D < 1 || D > (1 << 20)) return cudaErrorInvalidValue;
  if (N == 0 || k == 0) return cudaSuccess;
  switch (dtype) {
    case NearestCodeDType::kFloat32:
      return launch_typed<float>(static_cast<const float*>(z), static_cast<const float*>(codebooks), N, k, K, D,
                                 l2_normalize, workspace, static_cast<float*>(codes), indices, stream);
    case NearestCodeDType::kBFloat16:
      return launch_typed<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(z),
                                         static_cast<const __nv_bfloat16*>(codebooks), N, k, K, D, l2_normalize,
                                         workspace, static_cast<__nv_bfloat16*>(codes), indices, stream);
    case NearestCodeDType::kFloat16:
      return launch_typed<__half>(static_cast<const __half*>(z), static_cast<const __half*>(codebooks), N, k, K, D,
                                  l2_normalize, workspace, static_cast<__half*>(codes), indices, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fqgan::cuda
