// Python bindings of the CPU kernels. The op schemas are defined once, in Python
// (torch.library.custom_op in fqgan_kernels/<op>.py); this module only exposes kernels.
#include <torch/extension.h>

#include "common.h"
#include "cpu/ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fqgan_kernels CPU kernels";
  m.def("sources_digest", [] { return std::string(FQGAN_DIGEST_STRING); });
  m.def("isa", &fqgan::cpu::isa, "instruction set the kernels use on this CPU");
  m.def("nearest_code", &fqgan::cpu::nearest_code, "nearest code per sub-codebook",
        pybind11::arg("z"), pybind11::arg("codebooks"), pybind11::arg("l2_normalize"));
}
