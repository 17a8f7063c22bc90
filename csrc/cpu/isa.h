// Instruction-set dispatch of the CPU kernels: one pattern for every csrc/cpu/<op>.cpp.
//
// One build, no -march flag: each kernel's hot loops are compiled once per instruction set, in the
// same source file, and the set is picked at run time.
//
//   portable  the baseline target (SSE2 on x86-64, NEON on aarch64); the only pass elsewhere
//   avx2      #pragma GCC target("avx2,fma")
//   avx512    #pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
//
// A kernel file has two parts:
//
//   #ifndef FQGAN_ISA_PASS                  // the driver, compiled once
//   #include ... (every header the file needs, the passes' too)
//   ... types the passes share with the driver ...
//   #define FQGAN_ISA_SELF "cpu/<op>.cpp"
//   #include "cpu/isa_passes.h"             // compiles the #else part below once per ISA
//   ... entry points: validation, buffers, threads; kernels picked with FQGAN_ISA_PICK(name) ...
//   #else                                   // the kernel pass (no #include here)
//   ... hot loops ...
//   #endif
//
// cpu/isa_passes.h re-includes the file with FQGAN_ISA_PASS defined, inside each ISA's target
// region and inside `namespace fqgan::cpu::isa_<name> { namespace { ... } }`, with two names in
// scope: `V`, that ISA's vector type from cpu/simd.h (simd::Portable / Avx2 / Avx512), and
// `kIsa`, its isa::Isa value (for per-ISA tile sizes). So a pass may use intrinsics through V or
// plain loops that the compiler vectorises for the target, and every function it defines gets the
// target (templates included). The unnamed namespace gives each file's passes internal linkage:
// two files may both define isa_avx2::scan. FQGAN_ISA_PICK(fn) is &isa_<chosen>::fn, e.g.
// FQGAN_ISA_PICK(rows_fwd<8>) is a function pointer; the driver calls through it (once per task,
// not per element).
//
// The set is chosen once per process (isa::chosen()): the best the CPU and OS support, or the one
// FQGAN_CPU_ISA=portable|avx2|avx512 names (for tests: every path on one machine). A name this CPU
// lacks, or an unknown one, gives the best supported set instead of an illegal instruction;
// fqgan_kernels._C.isa() says which one runs. It covers every CPU kernel.
#pragma once

#include <cstdlib>
#include <string>

#include "cpu/simd.h"

namespace fqgan::cpu::isa {

enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa best_supported() {
#if FQGAN_X86
  __builtin_cpu_init();
  // libgcc's checks include the OS (XCR0) support for the wider register state.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

inline Isa chosen() {
  static const Isa isa = [] {
    const Isa best = best_supported();
    const char* env = std::getenv("FQGAN_CPU_ISA");
    if (env == nullptr) return best;
    const std::string want(env);
    Isa forced;
    if (want == "portable") {
      forced = Isa::kPortable;
    } else if (want == "avx2") {
      forced = Isa::kAvx2;
    } else if (want == "avx512") {
      forced = Isa::kAvx512;
    } else {
      return best;
    }
    return static_cast<int>(forced) <= static_cast<int>(best) ? forced : best;
  }();
  return isa;
}

inline const char* name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

}  // namespace fqgan::cpu::isa

#if FQGAN_X86
#define FQGAN_ISA_PICK(fn)                                                             \
  (::fqgan::cpu::isa::chosen() == ::fqgan::cpu::isa::Isa::kAvx512 ? &isa_avx512::fn \
   : ::fqgan::cpu::isa::chosen() == ::fqgan::cpu::isa::Isa::kAvx2 ? &isa_avx2::fn   \
                                                                   : &isa_portable::fn)
#else
#define FQGAN_ISA_PICK(fn) (&isa_portable::fn)
#endif
