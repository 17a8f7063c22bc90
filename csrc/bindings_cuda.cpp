// Python bindings of the CUDA kernels (module fqgan_kernels._C_cuda, built only when torch is a CUDA
// build and nvcc exists). The op schemas are defined once, in Python (torch.library.custom_op in
// fqgan_kernels/<op>.py); this module only exposes kernels. Mirrors bindings_cpu.cpp.
#include <torch/extension.h>

#include "common.h"
#include "cuda/ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fqgan_kernels CUDA kernels";
  m.def("sources_digest", [] { return std::string(FQGAN_DIGEST_STRING); });
  m.def("nearest_code", &fqgan::cuda::nearest_code, "nearest code per sub-codebook",
        pybind11::arg("z"), pybind11::arg("codebooks"), pybind11::arg("l2_normalize"));
  m.def("entropy_stats", &fqgan::cuda::entropy_stats, "entropy loss forward sweeps: (lse, H, colsum)",
        pybind11::arg("zn"), pybind11::arg("en"), pybind11::arg("temperature"));
  m.def("entropy_backward", &fqgan::cuda::entropy_backward, "entropy loss backward sweeps: (grad_zn, grad_en)",
        pybind11::arg("zn"), pybind11::arg("en"), pybind11::arg("lse"), pybind11::arg("grad_lse"),
        pybind11::arg("grad_ent"), pybind11::arg("grad_colsum"),
        pybind11::arg("temperature"));
  m.def("linear_cross_entropy", &fqgan::cuda::linear_cross_entropy,
        "fused linear + cross-entropy: (loss rows, lse, grad_hidden, grad_weight, grad_bias)",
        pybind11::arg("hidden"), pybind11::arg("weight"), pybind11::arg("targets"), pybind11::arg("bias"),
        pybind11::arg("row_grad"), pybind11::arg("ignore_index"), pybind11::arg("label_smoothing"),
        pybind11::arg("z_loss"), pybind11::arg("chunk_rows"));
  m.def("vq_losses_forward", &fqgan::cuda::vq_losses_forward, "fused VQ losses forward: per-slot sums",
        pybind11::arg("z"), pybind11::arg("codes"), pybind11::arg("disentangle"));
  m.def("vq_losses_backward", &fqgan::cuda::vq_losses_backward, "fused VQ losses backward: (grad_z, grad_codes)",
        pybind11::arg("z"), pybind11::arg("codes"), pybind11::arg("coef"), pybind11::arg("disentangle"));
  m.def("sample", &fqgan::cuda::sample, "fused CFG + temperature + top-k/top-p sampling: tokens [B]",
        pybind11::arg("cond"), pybind11::arg("uncond"), pybind11::arg("cfg"), pybind11::arg("temperature"),
        pybind11::arg("top_k"), pybind11::arg("top_p"), pybind11::arg("uniform"));
}
