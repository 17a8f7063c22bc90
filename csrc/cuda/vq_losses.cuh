// Fused codebook / commitment / disentanglement losses, CUDA launchers (plain pointers, CUDA headers
// only; torch glue in vq_losses_glue.cpp). Maths and gradients: fqgan_kernels/vq_losses.py.
// z, codes [N, k, D] contiguous, same dtype (float32, bfloat16 or float16); all sums in float32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fqgan::cuda {

enum class VQLossDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kVQLossMaxK = 32;  // the backward keeps one weight per other sub-codebook in registers

// Number of forward blocks (rows of the partial-sum workspace) for N rows.
inline int vq_losses_forward_blocks(int64_t N) {
  const int64_t blocks = (N + 255) / 256;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 1024 ? 1024 : blocks));
}

// sums[s], s < k: sum over rows and dims of (codes - z)^2 of sub-codebook s; s = k + p: sum over
// rows of (q_a . q_b)^2 for the p-th pair a < b (row-major), q = codes / max(|codes|, 1e-12), when
// disentangle. `partial` must hold vq_losses_forward_blocks(N) * slots floats (slots = k + pairs);
// the block partials are summed in a fixed order (deterministic, no atomics).
cudaError_t vq_losses_forward_launch(const void* z, const void* codes, VQLossDType dtype, int64_t N, int64_t k,
                                     int64_t D, bool disentangle, float* partial, float* sums, cudaStream_t stream);

// grad_z, grad_codes [N, k, D] (dtype of the inputs) from coef [2k + 1] float32 =
// (commitment scale per k | codebook scale per k | disentangle scale). k <= kVQLossMaxK.
cudaError_t vq_losses_backward_launch(const void* z, const void* codes, VQLossDType dtype, int64_t N, int64_t k,
                                      int64_t D, bool disentangle, const float* coef, void* grad_z, void* grad_codes,
                                      cudaStream_t stream);

}  // namespace fqgan::cuda
