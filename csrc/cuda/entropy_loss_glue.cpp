// Streaming entropy loss, CUDA: torch-facing glue (validation, preparation, stream) around the plain
// launchers of entropy_loss.cu. Declared in cuda/ops.h, bound in bindings_cuda.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>

#include "cuda/entropy_loss.cuh"
#include "cuda/ops.h"

namespace fqgan::cuda {
namespace {

struct Prepared {
  at::Tensor zs, e, eb;
};

void check_inputs(const at::Tensor& zn, const at::Tensor& en, double temperature) {
  TORCH_CHECK(zn.dim() == 3 && en.dim() == 3, "entropy: zn [N,k,D] and en [k,K,D], got ", zn.sizes(), " and ",
              en.sizes());
  TORCH_CHECK(zn.size(1) == en.size(0) && zn.size(2) == en.size(2), "entropy: zn ", zn.sizes(),
              " does not match en ", en.sizes());
  TORCH_CHECK(zn.is_cuda() && en.is_cuda() && zn.device() == en.device(),
              "entropy (cuda): zn and en must be on the same CUDA device");
  TORCH_CHECK(zn.size(2) <= kEntropyMaxD, "entropy (cuda): D = ", zn.size(2), " > ", kEntropyMaxD,
              " is not supported by the CUDA kernel; use backend='triton' or 'reference'");
  TORCH_CHECK(temperature > 0, "entropy: temperature must be > 0");
}

Prepared prepare(const at::Tensor& zn, const at::Tensor& en, double temperature) {
  Prepared p;
  p.zs = (zn.to(at::kFloat) * (2.0 / temperature)).permute({1, 0, 2}).contiguous();  // [k, N, D]
  p.e = en.to(at::kFloat).contiguous();
  p.eb = (p.e * p.e).sum(-1).mul(-1.0 / temperature).contiguous();  // [k, K]
  return p;
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_stats(const at::Tensor& zn, const at::Tensor& en,
                                                             double temperature) {
  check_inputs(zn, en, temperature);
  const c10::cuda::CUDAGuard guard(zn.device());
  const int64_t N = zn.size(0), k = zn.size(1), D = zn.size(2), K = en.size(1);
  const Prepared p = prepare(zn, en, temperature);
  auto opts = zn.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({k, N}, opts), ent = at::empty({k, N}, opts), colsum = at::zeros({k, K}, opts);
  const cudaError_t err = entropy_stats_launch(p.zs.data_ptr<float>(), p.e.data_ptr<float>(), p.eb.data_ptr<float>(),
                                               lse.data_ptr<float>(), ent.data_ptr<float>(), colsum.data_ptr<float>(),
                                               N, K, D, k, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "entropy_stats (cuda): ", cudaGetErrorString(err));
  return {lse, ent, colsum};
}

std::tuple<at::Tensor, at::Tensor> entropy_backward(const at::Tensor& zn, const at::Tensor& en,
                                                    const at::Tensor& lse, const at::Tensor& grad_lse,
                                                    const at::Tensor& grad_ent,
                                                    const at::Tensor& grad_colsum, double temperature) {
  check_inputs(zn, en, temperature);
  const c10::cuda::CUDAGuard guard(zn.device());
  const int64_t N = zn.size(0), k = zn.size(1), D = zn.size(2), K = en.size(1);
  TORCH_CHECK(lse.numel() == k * N && grad_lse.numel() == k * N &&
                  grad_ent.numel() == k * N && grad_colsum.numel() == k * K,
              "entropy_backward: per-row tensors must be [k, N] and grad_colsum [k, K]");
  const Prepared p = prepare(zn, en, temperature);
  // H is not an input: the backward renormalises p itself (fqgan_kernels/entropy_loss.py, "Rounding").
  at::Tensor l = f32(lse), gl = f32(grad_lse), gh = f32(grad_ent), gc = f32(grad_colsum);
  auto opts = zn.options().dtype(at::kFloat);
  at::Tensor grad_z = at::empty({N, k, D}, opts), grad_e = at::zeros({k, K, D}, opts);
  at::Tensor row_scratch = at::empty({2, k, N}, opts);
  const cudaError_t err = entropy_backward_launch(
      p.zs.data_ptr<float>(), p.e.data_ptr<float>(), p.eb.data_ptr<float>(), l.data_ptr<float>(),
      gl.data_ptr<float>(), gh.data_ptr<float>(), gc.data_ptr<float>(), grad_z.data_ptr<float>(),
      row_scratch.data_ptr<float>(), grad_e.data_ptr<float>(), N, K, D, k, static_cast<float>(2.0 / temperature),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "entropy_backward (cuda): ", cudaGetErrorString(err));
  return {grad_z.to(zn.scalar_type()), grad_e.to(en.scalar_type())};
}

}  // namespace fqgan::cuda
