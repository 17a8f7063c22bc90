// Declarations of the CPU kernels, one block per op family (csrc/cpu/<op>.cpp).
// They take contiguous tensors already validated by the Python front door
// (fqgan_kernels/<op>.py); the schema of every op lives there, in torch.library.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fqgan::cpu {

// nearest_code.cpp
// z [N, k, D], codebooks [k, K, D] (same float dtype) -> codes [N, k, D] (dtype of z), indices [N, k] int64.
std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& z, const at::Tensor& codebooks, bool l2_normalize);

// entropy_loss.cpp (streaming entropy loss; the maths and the sweeps are in fqgan_kernels/entropy_loss.py)
// zn [N, k, D], en [k, K, D] (normalised when asked, float32) -> lse [k, N], H [k, N], colsum [k, K] (float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_stats(const at::Tensor& zn, const at::Tensor& en,
                                                             double temperature);
// Upstream gradients of (lse, H, colsum) -> (dL/dzn [N, k, D], dL/den [k, K, D]), tiles recomputed.
std::tuple<at::Tensor, at::Tensor> entropy_backward(const at::Tensor& zn, const at::Tensor& en,
                                                    const at::Tensor& lse, const at::Tensor& ent,
                                                    const at::Tensor& grad_lse, const at::Tensor& grad_ent,
                                                    const at::Tensor& grad_colsum, double temperature);

// vq_losses.cpp (fused codebook / commitment / disentanglement losses; maths in fqgan_kernels/vq_losses.py)
// z, codes [N, k, D] (same dtype) -> sums [k + P] in the accumulation dtype (float32; float64 for
// float64): sum (codes - z)^2 per sub-codebook, then sum_n (q_a . q_b)^2 per pair a < b when disentangle.
at::Tensor vq_losses_forward(const at::Tensor& z, const at::Tensor& codes, bool disentangle);
// coef [2k + 1] = (commitment per k | codebook per k | disentangle) scale -> (grad_z, grad_codes).
std::tuple<at::Tensor, at::Tensor> vq_losses_backward(const at::Tensor& z, const at::Tensor& codes,
                                                      const at::Tensor& coef, bool disentangle);

// linear_cross_entropy.cpp (fused linear + cross-entropy over k heads; maths in fqgan_kernels/linear_cross_entropy.py)
// hidden [k, N, H], weight [k, V, H], targets [k, N] int64, bias [k, V] or None, row_grad [k, N] (dL/dloss_n,
// any float dtype) or None -> (loss rows [k, N], lse [k, N]) in float32 (float64 for float64 inputs) and, when row_grad
// is given, (grad_hidden, grad_weight, grad_bias or undefined) in the input dtypes. chunk_rows 0 = ~16 MiB chunks.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& row_grad, int64_t ignore_index,
    double label_smoothing, double z_loss, int64_t chunk_rows);

// sample.cpp (fused CFG + temperature + top-k/top-p sampling; algorithm in fqgan_kernels/sample.py)
// cond, uncond [B, V] (same dtype: float32/bfloat16/float16), per-row cfg, temperature, top_p [B] float32,
// top_k [B] int64, uniform [B] float64 in [0, 1) -> tokens [B] int64.
at::Tensor sample(const at::Tensor& cond, const std::optional<at::Tensor>& uncond, const at::Tensor& cfg,
                  const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                  const at::Tensor& uniform);

}  // namespace fqgan::cpu
