// Fused linear + cross-entropy, CUDA launcher of the epilogue (plain pointers, CUDA headers only;
// the torch glue with the cuBLAS GEMMs is linear_cross_entropy.cpp). Maths in
// fqgan_kernels/linear_cross_entropy.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fqgan::cuda {

// Element type of the logits chunk.
enum class LceDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One logits chunk [n, V] (row-major, contiguous), computed by a GEMM, turned in place into dlogits
// (when row_grad != nullptr) while writing per-row loss and lse (float32, [n]). bias [V] float32 or
// nullptr; targets [n] int64, each ignore_index or in [0, V); row_grad [n] float32 (dL/dloss_n) or
// nullptr for a forward without gradients. All arithmetic in float32.
cudaError_t lce_epilogue_launch(LceDtype dtype, void* logits, const float* bias, const int64_t* targets,
                                const float* row_grad, float* loss, float* lse, int64_t n, int64_t V,
                                int64_t ignore_index, float label_smoothing, float z_loss, cudaStream_t stream);

}  // namespace fqgan::cuda
