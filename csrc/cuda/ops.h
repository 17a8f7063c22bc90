// Declarations of the torch-facing CUDA glue, one block per op family (csrc/cuda/<op>.cpp, compiled
// only in CUDA builds). Each wraps the plain launchers of csrc/cuda/<op>.cu (CUDA headers only).
// The schema of every op lives in Python (torch.library in fqgan_kernels/<op>.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fqgan::cuda {

// nearest_code_glue.cpp
// z [N, k, D], codebooks [k, K, D] (CUDA, same float dtype) -> codes [N, k, D] (dtype of z),
// indices [N, k] int64. Equals reference.nearest_code.
std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& z, const at::Tensor& codebooks, bool l2_normalize);

// entropy_loss.cpp (streaming entropy loss; the maths and the sweeps are in fqgan_kernels/entropy_loss.py)
// zn [N, k, D], en [k, K, D] -> lse [k, N], H [k, N], colsum [k, K] (float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_stats(const at::Tensor& zn, const at::Tensor& en,
                                                             double temperature);
// Upstream gradients of (lse, H, colsum) -> (dL/dzn [N, k, D], dL/den [k, K, D]), tiles recomputed.
std::tuple<at::Tensor, at::Tensor> entropy_backward(const at::Tensor& zn, const at::Tensor& en,
                                                    const at::Tensor& lse, const at::Tensor& grad_lse,
                                                    const at::Tensor& grad_ent,
                                                    const at::Tensor& grad_colsum, double temperature);

// linear_cross_entropy.cpp (cuBLAS GEMMs in row chunks + the fused epilogue of linear_cross_entropy.cu;
// maths in fqgan_kernels/linear_cross_entropy.py). Same contract as fqgan::cpu::linear_cross_entropy:
// hidden [k, N, H], weight [k, V, H] (float32/bf16/fp16), targets [k, N] int64, bias [k, V] or None,
// row_grad [k, N] or None -> (loss rows [k, N], lse [k, N]) float32 and, when row_grad is given,
// (grad_hidden, grad_weight, grad_bias or undefined) in the input dtypes. chunk_rows 0 = ~64 MiB chunks.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& row_grad, int64_t ignore_index,
    double label_smoothing, double z_loss, int64_t chunk_rows);

// vq_losses.cpp (fused codebook / commitment / disentanglement losses; maths in fqgan_kernels/vq_losses.py).
// Same contract as fqgan::cpu::vq_losses_forward / vq_losses_backward (float32 sums; k <= 32).
at::Tensor vq_losses_forward(const at::Tensor& z, const at::Tensor& codes, bool disentangle);
std::tuple<at::Tensor, at::Tensor> vq_losses_backward(const at::Tensor& z, const at::Tensor& codes,
                                                      const at::Tensor& coef, bool disentangle);

// sample.cpp (fused CFG + temperature + top-k/top-p sampling; algorithm in fqgan_kernels/sample.py).
// Same contract as fqgan::cpu::sample: cond, uncond [B, V] (float32/bf16/fp16), cfg, temperature, top_p [B]
// float32, top_k [B] int64, uniform [B] float64 -> tokens [B] int64. Extra memory: a [B, V] float32 workspace.
at::Tensor sample(const at::Tensor& cond, const std::optional<at::Tensor>& uncond, const at::Tensor& cfg,
                  const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                  const at::Tensor& uniform);

}  // namespace fqgan::cuda
