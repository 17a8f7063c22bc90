// Nearest code per sub-codebook, CUDA: torch-facing glue (outputs, workspace, device, stream) around
// the plain launcher of nearest_code.cu. Declared in cuda/ops.h, bound in bindings_cuda.cpp.
// (Not nearest_code.cpp: setuptools names objects by stem, so <op>.cpp and <op>.cu would both be <op>.o.)
// Inputs are validated by the Python front door (fqgan_kernels/nearest_code.py); the checks here
// only keep a direct call from reading out of bounds.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>

#include "cuda/nearest_code.cuh"
#include "cuda/ops.h"

namespace fqgan::cuda {

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& z, const at::Tensor& codebooks, bool l2_normalize) {
  TORCH_CHECK(z.dim() == 3 && codebooks.dim() == 3, "nearest_code (cuda): z [N,k,D] and codebooks [k,K,D], got ",
              z.sizes(), " and ", codebooks.sizes());
  TORCH_CHECK(z.size(1) == codebooks.size(0) && z.size(2) == codebooks.size(2), "nearest_code (cuda): z ",
              z.sizes(), " does not match codebooks ", codebooks.sizes());
  TORCH_CHECK(z.is_cuda() && codebooks.is_cuda() && z.device() == codebooks.device(),
              "nearest_code (cuda): z and codebooks must be on the same CUDA device, got ", z.device(), " and ",
              codebooks.device());
  TORCH_CHECK(z.scalar_type() == codebooks.scalar_type(), "nearest_code (cuda): z is ", z.scalar_type(),
              " but codebooks are ", codebooks.scalar_type());
  NearestCodeDType dtype = NearestCodeDType::kFloat32;
  switch (z.scalar_type()) {
    case at::kFloat: dtype = NearestCodeDType::kFloat32; break;
    case at::kBFloat16: dtype = NearestCodeDType::kBFloat16; break;
    case at::kHalf: dtype = NearestCodeDType::kFloat16; break;
    default: TORCH_CHECK(false, "nearest_code (cuda): float32, bfloat16 or float16 inputs, got ", z.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  const at::Tensor cb = codebooks.contiguous();
  const int64_t N = zc.size(0), k = zc.size(1), D = zc.size(2), K = cb.size(1);
  at::Tensor codes = at::empty({N, k, D}, zc.options());
  at::Tensor indices = at::empty({N, k}, zc.options().dtype(at::kLong));
  if (N == 0 || k == 0) return {codes, indices};
  TORCH_CHECK(K >= 1, "nearest_code (cuda): the codebooks are empty (K = 0)");
  TORCH_CHECK(D >= 1, "nearest_code (cuda): D = 0");
  at::Tensor workspace = at::empty({nearest_code_workspace_floats(k, K, D)}, zc.options().dtype(at::kFloat));
  const cudaError_t err =
      nearest_code_launch(zc.data_ptr(), cb.data_ptr(), dtype, N, k, K, D, l2_normalize, workspace.data_ptr<float>(),
                          codes.data_ptr(), indices.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "nearest_code (cuda): kernel launch failed with ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ") for z ", zc.sizes(), " ", zc.scalar_type(), ", codebooks ", cb.sizes(),
              ", l2_normalize=", l2_normalize);
  return {codes, indices};
}

}  // namespace fqgan::cuda
