// Fused codebook / commitment / disentanglement losses, CUDA: torch-facing glue (outputs, workspace,
// device, stream) around the plain launchers of vq_losses.cu. Declared in cuda/ops.h, bound in
// bindings_cuda.cpp. Inputs are validated by the Python front door (fqgan_kernels/vq_losses.py); the
// checks here only keep a direct call from reading out of bounds.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>

#include "cuda/ops.h"
#include "cuda/vq_losses.cuh"

namespace fqgan::cuda {
namespace {

VQLossDType check_inputs(const at::Tensor& z, const at::Tensor& codes, const char* what) {
  TORCH_CHECK(z.dim() == 3 && z.sizes() == codes.sizes(), what, ": z and codes must both be [N, k, D], got ",
              z.sizes(), " and ", codes.sizes());
  TORCH_CHECK(z.is_cuda() && codes.is_cuda() && z.device() == codes.device(), what,
              ": z and codes must be on the same CUDA device, got ", z.device(), " and ", codes.device());
  TORCH_CHECK(z.scalar_type() == codes.scalar_type(), what, ": z is ", z.scalar_type(), " but codes are ",
              codes.scalar_type());
  TORCH_CHECK(z.size(0) >= 1 && z.size(1) >= 1 && z.size(2) >= 1, what, ": empty input ", z.sizes());
  TORCH_CHECK(z.size(1) <= kVQLossMaxK, what, ": at most ", kVQLossMaxK, " sub-codebooks, got ", z.size(1));
  switch (z.scalar_type()) {
    case at::kFloat: return VQLossDType::kFloat32;
    case at::kBFloat16: return VQLossDType::kBFloat16;
    case at::kHalf: return VQLossDType::kFloat16;
    default: TORCH_CHECK(false, what, ": float32, bfloat16 or float16 inputs, got ", z.scalar_type());
  }
  return VQLossDType::kFloat32;  // not reached
}

void check_launch(cudaError_t err, const char* what, const at::Tensor& z) {
  TORCH_CHECK(err == cudaSuccess, what, ": kernel launch failed with ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ") for z ", z.sizes(), " ", z.scalar_type());
}

}  // namespace

at::Tensor vq_losses_forward(const at::Tensor& z, const at::Tensor& codes, bool disentangle) {
  const VQLossDType dtype = check_inputs(z, codes, "vq_losses_forward (cuda)");
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), cc = codes.contiguous();
  const int64_t N = zc.size(0), k = zc.size(1), D = zc.size(2);
  const bool dis = disentangle && k > 1;
  const int64_t slots = k + (dis ? k * (k - 1) / 2 : 0);
  const auto opts = zc.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({vq_losses_forward_blocks(N), slots}, opts);
  at::Tensor sums = at::empty({slots}, opts);
  check_launch(vq_losses_forward_launch(zc.data_ptr(), cc.data_ptr(), dtype, N, k, D, dis, partial.data_ptr<float>(),
                                        sums.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
               "vq_losses_forward (cuda)", zc);
  return sums;
}

std::tuple<at::Tensor, at::Tensor> vq_losses_backward(const at::Tensor& z, const at::Tensor& codes,
                                                      const at::Tensor& coef, bool disentangle) {
  const VQLossDType dtype = check_inputs(z, codes, "vq_losses_backward (cuda)");
  TORCH_CHECK(coef.numel() == 2 * z.size(1) + 1, "vq_losses_backward (cuda): coef must have 2k + 1 entries, got ",
              coef.numel());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), cc = codes.contiguous();
  const at::Tensor cf = coef.to(zc.device(), at::kFloat).contiguous();
  const int64_t N = zc.size(0), k = zc.size(1), D = zc.size(2);
  at::Tensor grad_z = at::empty_like(zc), grad_codes = at::empty_like(cc);
  check_launch(vq_losses_backward_launch(zc.data_ptr(), cc.data_ptr(), dtype, N, k, D, disentangle && k > 1,
                                         cf.data_ptr<float>(), grad_z.data_ptr(), grad_codes.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream().stream()),
               "vq_losses_backward (cuda)", zc);
  return {grad_z, grad_codes};
}

}  // namespace fqgan::cuda
