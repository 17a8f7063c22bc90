// Fused linear + cross-entropy, CUDA: torch-facing glue. Per head, per chunk of C rows (C x V logits,
// ~64 MiB): logits = x W^T by cuBLAS (at::mm_out, in the input dtype with float32 accumulation, as
// eager PyTorch), the fused epilogue kernel of linear_cross_entropy.cu (loss, lse, dlogits in place),
// then grad_hidden = dlogits W and grad_weight += dlogits^T x by cuBLAS. Maths and contract in
// fqgan_kernels/linear_cross_entropy.py; the CPU twin is csrc/cpu/linear_cross_entropy.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>

#include <algorithm>

#include "cuda/linear_cross_entropy.cuh"
#include "cuda/ops.h"

namespace fqgan::cuda {
namespace {

constexpr int64_t kChunkBytes = int64_t(64) << 20;

LceDtype lce_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return LceDtype::kFloat32;
    case at::kBFloat16:
      return LceDtype::kBFloat16;
    case at::kHalf:
      return LceDtype::kFloat16;
    default:
      TORCH_CHECK(false, "linear_cross_entropy (cuda): dtype ", t, " is not supported (float32, bfloat16, float16)");
  }
  return LceDtype::kFloat32;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& row_grad, int64_t ignore_index,
    double label_smoothing, double z_loss, int64_t chunk_rows) {
  TORCH_CHECK(hidden.dim() == 3 && weight.dim() == 3 && targets.dim() == 2,
              "linear_cross_entropy (cuda): hidden [k,N,H], weight [k,V,H], targets [k,N]");
  const int64_t k = hidden.size(0), N = hidden.size(1), H = hidden.size(2), V = weight.size(1);
  TORCH_CHECK(weight.size(0) == k && weight.size(2) == H && targets.size(0) == k && targets.size(1) == N,
              "linear_cross_entropy (cuda): shapes of hidden, weight and targets do not match");
  TORCH_CHECK(hidden.is_cuda() && weight.device() == hidden.device() && targets.device() == hidden.device(),
              "linear_cross_entropy (cuda): hidden, weight and targets must be on the same CUDA device");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "linear_cross_entropy (cuda): dtype mismatch");
  const LceDtype dt = lce_dtype(hidden.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  const bool grad = row_grad.has_value() && row_grad->defined();
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor x_all = hidden.contiguous();
  const at::Tensor w_all = weight.contiguous();
  const at::Tensor t_all = targets.to(at::kLong).contiguous();
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor g_all;
  if (grad) g_all = row_grad->to(at::kFloat).contiguous();

  at::Tensor rows = at::empty({k, N}, f32), lse = at::empty({k, N}, f32);
  at::Tensor gh, gw, gb;
  if (grad) {
    gh = at::empty_like(x_all);
    gw = at::empty_like(w_all);
    if (has_bias) gb = at::empty_like(*bias);
  }
  int64_t C = chunk_rows > 0 ? chunk_rows : kChunkBytes / std::max<int64_t>(1, V * hidden.element_size());
  C = std::max<int64_t>(1, std::min<int64_t>(C, N));
  at::Tensor buf = at::empty({C, V}, hidden.options());  // logits, then dlogits, in the input dtype

  for (int64_t h = 0; h < k; ++h) {
    const at::Tensor W = w_all.select(0, h);  // [V, H], contiguous
    at::Tensor b;
    if (has_bias) b = bias->select(0, h).to(at::kFloat).contiguous();
    const at::Tensor xh = x_all.select(0, h);
    at::Tensor gw_acc, gb_acc;
    if (grad) {
      // float32 inputs accumulate straight into the output; bf16/fp16 into a float32 accumulator.
      gw_acc = w_all.scalar_type() == at::kFloat ? gw.select(0, h) : at::empty({V, H}, f32);
      gw_acc.zero_();
      if (has_bias) gb_acc = at::zeros({V}, f32);
    }
    for (int64_t s = 0; s < N; s += C) {
      const int64_t n = std::min(C, N - s);
      at::Tensor L = buf.narrow(0, 0, n);
      const at::Tensor xs = xh.narrow(0, s, n);
      at::mm_out(L, xs, W.t());
      const cudaError_t err = lce_epilogue_launch(
          dt, L.data_ptr(), has_bias ? b.data_ptr<float>() : nullptr, t_all.data_ptr<int64_t>() + h * N + s,
          grad ? g_all.data_ptr<float>() + h * N + s : nullptr, rows.data_ptr<float>() + h * N + s,
          lse.data_ptr<float>() + h * N + s, n, V, ignore_index, static_cast<float>(label_smoothing),
          static_cast<float>(z_loss), stream);
      TORCH_CHECK(err == cudaSuccess, "linear_cross_entropy (cuda) epilogue: ", cudaGetErrorString(err));
      if (!grad) continue;
      at::Tensor ghs = gh.select(0, h).narrow(0, s, n);
      at::mm_out(ghs, L, W);
      if (w_all.scalar_type() == at::kFloat) {
        gw_acc.addmm_(L.t(), xs);
      } else {
        gw_acc.add_(at::mm(L.t(), xs));
      }
      if (has_bias) gb_acc.add_(L.sum(0, /*keepdim=*/false, at::kFloat));
    }
    if (grad) {
      if (w_all.scalar_type() != at::kFloat) gw.select(0, h).copy_(gw_acc);
      if (has_bias) gb.select(0, h).copy_(gb_acc);
    }
  }
  return {rows, lse, gh, gw, gb};
}

}  // namespace fqgan::cuda
