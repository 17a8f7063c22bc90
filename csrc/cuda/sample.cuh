// Fused CFG + temperature + top-k/top-p sampling, CUDA launcher (plain pointers, CUDA headers only;
// torch glue in sample_glue.cpp). The per-row algorithm is described in fqgan_kernels/sample.py.
// cond/uncond [B, V] contiguous in `dtype`; x [B, V] float32 workspace (written, then re-read);
// cfg, temperature, top_p [B] float32; top_k [B] int64; uniform [B] float64; out [B] int64.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fqgan::cuda {

enum class SampleDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

cudaError_t sample_launch(const void* cond, const void* uncond, SampleDtype dtype, float* x, const float* cfg,
                          const float* temperature, const int64_t* top_k, const float* top_p,
                          const double* uniform, int64_t* out, int64_t B, int64_t V, cudaStream_t stream);

}  // namespace fqgan::cuda
