// Nearest code per sub-codebook, CUDA launcher (plain pointers, CUDA headers only; torch glue in
// nearest_code.cpp). Equals reference.nearest_code: per sub-codebook i,
// idx[n, i] = argmin_j ||zh[n, i] - eh[i, j]||^2 (ties: lowest j), codes[n, i] = eh[i, idx[n, i]],
// with zh, eh = F.normalize(z), F.normalize(codebooks) (eps 1e-12) when l2_normalize, else as given.
// z [N, k, D] and codebooks [k, K, D] contiguous, same dtype; codes [N, k, D] (that dtype),
// indices [N, k] int64. The kernels are in nearest_code.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fqgan::cuda {

enum class NearestCodeDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Codes are packed with a row stride DP >= D, a multiple of 4 floats (16-byte cp.async chunks):
// the next of 4, 8, 16, 32, 64 (the dims the search kernel is compiled for), else D rounded up to 4.
inline int64_t nearest_code_padded_dim(int64_t D) {
  for (int64_t dp = 4; dp <= 64; dp *= 2) {
    if (D <= dp) return dp;
  }
  return (D + 3) / 4 * 4;
}

// float32 workspace the launcher needs: the packed, normalised codebook [k, K, DP] and the per-code
// bias -0.5 ||eh_j||^2 [k, KP], KP = K rounded up to 4.
inline int64_t nearest_code_workspace_floats(int64_t k, int64_t K, int64_t D) {
  return k * K * nearest_code_padded_dim(D) + k * ((K + 3) / 4 * 4);
}

// Two kernels on `stream`: pack (normalise) the codebook into `workspace`, then search. Returns
// cudaErrorInvalidValue for shapes it does not take (K < 1 or K >= 2^31), otherwise the launch error.
// `workspace` must hold nearest_code_workspace_floats(k, K, D) floats, 16-byte aligned.
cudaError_t nearest_code_launch(const void* z, const void* codebooks, NearestCodeDType dtype, int64_t N, int64_t k,
                                int64_t K, int64_t D, bool l2_normalize, float* workspace, void* codes,
                                int64_t* indices, cudaStream_t stream);

}  // namespace fqgan::cuda
