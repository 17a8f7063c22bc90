// Fused CFG + temperature + top-k/top-p sampling, CUDA: torch-facing glue (checks, workspace, stream)
// around the plain launcher of sample.cu. Declared in cuda/ops.h, bound in bindings_cuda.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>

#include "cuda/ops.h"
#include "cuda/sample.cuh"

namespace fqgan::cuda {

at::Tensor sample(const at::Tensor& cond, const std::optional<at::Tensor>& uncond, const at::Tensor& cfg,
                  const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                  const at::Tensor& uniform) {
  TORCH_CHECK(cond.dim() == 2 && cond.is_contiguous() && cond.is_cuda(),
              "sample (cuda): cond must be a contiguous CUDA [B, V] tensor, got ", cond.sizes());
  const int64_t B = cond.size(0), V = cond.size(1);
  TORCH_CHECK(V >= 1, "sample (cuda): V must be >= 1");
  if (uncond.has_value()) {
    TORCH_CHECK(uncond->sizes() == cond.sizes() && uncond->scalar_type() == cond.scalar_type() &&
                    uncond->is_contiguous() && uncond->device() == cond.device(),
                "sample (cuda): uncond must match cond ", cond.sizes(), " and ", cond.scalar_type());
  }
  auto check_param = [&](const at::Tensor& t, at::ScalarType dt, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.scalar_type() == dt && t.is_contiguous() &&
                    t.device() == cond.device(),
                "sample (cuda): ", name, " must be a contiguous [", B, "] ", dt, " tensor on ", cond.device());
  };
  check_param(cfg, at::kFloat, "cfg");
  check_param(temperature, at::kFloat, "temperature");
  check_param(top_k, at::kLong, "top_k");
  check_param(top_p, at::kFloat, "top_p");
  check_param(uniform, at::kDouble, "uniform");
  SampleDtype dtype;
  switch (cond.scalar_type()) {
    case at::kFloat: dtype = SampleDtype::kFloat32; break;
    case at::kBFloat16: dtype = SampleDtype::kBFloat16; break;
    case at::kHalf: dtype = SampleDtype::kFloat16; break;
    default: TORCH_CHECK(false, "sample (cuda): logits must be float32, bfloat16 or float16, got ", cond.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(cond.device());
  at::Tensor out = at::empty({B}, cond.options().dtype(at::kLong));
  if (B == 0) return out;
  at::Tensor x = at::empty({B, V}, cond.options().dtype(at::kFloat));  // guided-logits workspace
  const cudaError_t err = sample_launch(
      cond.data_ptr(), uncond.has_value() ? uncond->data_ptr() : nullptr, dtype, x.data_ptr<float>(),
      cfg.data_ptr<float>(), temperature.data_ptr<float>(), top_k.data_ptr<int64_t>(), top_p.data_ptr<float>(),
      uniform.data_ptr<double>(), out.data_ptr<int64_t>(), B, V, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sample (cuda): ", cudaGetErrorString(err));
  return out;
}

}  // namespace fqgan::cuda
