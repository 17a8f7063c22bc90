// Python bindings of the CPU kernels. The op schemas are defined once, in Python
// (torch.library.custom_op in fqgan_kernels/<op>.py); this module only exposes kernels.
#include <torch/extension.h>

#include <vector>

#include "common.h"
#include "cpu/fpstate.h"
#include "cpu/isa.h"
#include "cpu/ops.h"

namespace {

// Floating-point control state (x86: MXCSR; aarch64: FPCR) of every thread of one ATen parallel
// region over get_num_threads() items: element t is thread t's (0 = the calling thread). For tests.
std::vector<int64_t> fpstate_all_threads() {
  const int64_t n = at::get_num_threads();
  std::vector<int64_t> out(n, -1);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) out[t] = fqgan::cpu::fpstate::get();
  });
  return out;
}

// Sets (on = true) or clears the flush-to-zero / denormals-are-zero bits in every thread of one
// such region, the calling thread included. For tests of the worker threads' state.
void set_flush_denormal_all_threads(bool on) {
  const int64_t n = at::get_num_threads();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    using namespace fqgan::cpu::fpstate;
    for (int64_t t = b; t < e; ++t) set(on ? (get() | kFlushBits) : (get() & ~kFlushBits));
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fqgan_kernels CPU kernels";
  m.def("sources_digest", [] { return std::string(FQGAN_DIGEST_STRING); });
  m.def("isa", [] { return std::string(fqgan::cpu::isa::name(fqgan::cpu::isa::chosen())); },
        "instruction set every CPU kernel runs on (portable, avx2, avx512; FQGAN_CPU_ISA can force a lower one)");
  m.def("fpstate", [] { return static_cast<int64_t>(fqgan::cpu::fpstate::get()); },
        "floating-point control register of the calling thread (x86: MXCSR, aarch64: FPCR; 0 elsewhere)");
  m.def("fpstate_all_threads", &fpstate_all_threads,
        "fpstate() of every thread of one ATen parallel region (index = thread number, 0 = caller)");
  m.def("fpstate_flush_bits", [] { return static_cast<int64_t>(fqgan::cpu::fpstate::kFlushBits); },
        "the bits the kernels set while they run (x86: FTZ|DAZ = 0x8040; 0 where unsupported)");
  m.def("set_flush_denormal_all_threads", &set_flush_denormal_all_threads,
        "set (True) or clear the flush bits in every thread of one ATen parallel region", pybind11::arg("on"));
  m.def("nearest_code", &fqgan::cpu::nearest_code, "nearest code per sub-codebook",
        pybind11::arg("z"), pybind11::arg("codebooks"), pybind11::arg("l2_normalize"));
  m.def("entropy_stats", &fqgan::cpu::entropy_stats, "entropy loss forward sweeps: (lse, H, colsum)",
        pybind11::arg("zn"), pybind11::arg("en"), pybind11::arg("temperature"));
  m.def("entropy_backward", &fqgan::cpu::entropy_backward, "entropy loss backward sweeps: (grad_zn, grad_en)",
        pybind11::arg("zn"), pybind11::arg("en"), pybind11::arg("lse"), pybind11::arg("ent"),
        pybind11::arg("grad_lse"), pybind11::arg("grad_ent"), pybind11::arg("grad_colsum"),
        pybind11::arg("temperature"));
  m.def("vq_losses_forward", &fqgan::cpu::vq_losses_forward, "fused VQ losses forward: per-slot sums",
        pybind11::arg("z"), pybind11::arg("codes"), pybind11::arg("disentangle"));
  m.def("vq_losses_backward", &fqgan::cpu::vq_losses_backward, "fused VQ losses backward: (grad_z, grad_codes)",
        pybind11::arg("z"), pybind11::arg("codes"), pybind11::arg("coef"), pybind11::arg("disentangle"));
  m.def("linear_cross_entropy", &fqgan::cpu::linear_cross_entropy,
        "fused linear + cross-entropy: (loss rows, lse, grad_hidden, grad_weight, grad_bias)",
        pybind11::arg("hidden"), pybind11::arg("weight"), pybind11::arg("targets"), pybind11::arg("bias"),
        pybind11::arg("row_grad"), pybind11::arg("ignore_index"), pybind11::arg("label_smoothing"),
        pybind11::arg("z_loss"), pybind11::arg("chunk_rows"));
  m.def("sample", &fqgan::cpu::sample, "fused CFG + temperature + top-k/top-p sampling: tokens [B]",
        pybind11::arg("cond"), pybind11::arg("uncond"), pybind11::arg("cfg"), pybind11::arg("temperature"),
        pybind11::arg("top_k"), pybind11::arg("top_p"), pybind11::arg("uniform"));
}
