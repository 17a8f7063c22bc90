// Streaming entropy loss, CUDA launchers (plain pointers, CUDA headers only; torch glue in entropy_loss_glue.cpp).
// The maths and the four sweeps are described in fqgan_kernels/entropy_loss.py. All buffers are float32,
// contiguous: zs [k, N, D] = (2/T) z, e [k, K, D], eb [k, K] = -|e|^2 / T, per-row tensors [k, N],
// per-code tensors [k, K], grad_z [N, k, D], grad_e [k, K, D]. D <= kEntropyMaxD.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fqgan::cuda {

constexpr int64_t kEntropyMaxD = 64;

// Forward: sweep 1 (rows: lse, H), sweep 2 (codes: colsum).
cudaError_t entropy_stats_launch(const float* zs, const float* e, const float* eb, float* lse, float* ent,
                                 float* colsum, int64_t N, int64_t K, int64_t D, int64_t k, cudaStream_t stream);

// Backward: sweep 3 (rows: grad_z and, in row_scratch [2, k, N], beta and 1/W), sweep 4 (codes: grad_e).
cudaError_t entropy_backward_launch(const float* zs, const float* e, const float* eb, const float* lse,
                                    const float* grad_lse, const float* grad_ent, const float* grad_col,
                                    float* grad_z, float* row_scratch, float* grad_e, int64_t N, int64_t K,
                                    int64_t D, int64_t k, float two_over_t, cudaStream_t stream);

}  // namespace fqgan::cuda
