// The kernel passes of one CPU kernel file, one per instruction set (the pattern is described in
// cpu/isa.h). No include guard: each kernel file includes this once, after defining FQGAN_ISA_SELF
// as its own path; the file is then re-included with FQGAN_ISA_PASS defined, once per ISA.
#ifndef FQGAN_ISA_SELF
#error "define FQGAN_ISA_SELF (the including file's path) before including cpu/isa_passes.h"
#endif
#ifdef FQGAN_ISA_PASS
#error "cpu/isa_passes.h included from a kernel pass"
#endif

#define FQGAN_ISA_PASS 1

namespace fqgan::cpu::isa_portable {
namespace {
using V = simd::Portable;
constexpr isa::Isa kIsa = isa::Isa::kPortable;
#include FQGAN_ISA_SELF
}  // namespace
}  // namespace fqgan::cpu::isa_portable

#if FQGAN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace fqgan::cpu::isa_avx2 {
namespace {
using V = simd::Avx2;
constexpr isa::Isa kIsa = isa::Isa::kAvx2;
#include FQGAN_ISA_SELF
}  // namespace
}  // namespace fqgan::cpu::isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
namespace fqgan::cpu::isa_avx512 {
namespace {
using V = simd::Avx512;
constexpr isa::Isa kIsa = isa::Isa::kAvx512;
#include FQGAN_ISA_SELF
}  // namespace
}  // namespace fqgan::cpu::isa_avx512
#pragma GCC pop_options
#endif  // FQGAN_X86

#undef FQGAN_ISA_PASS
#undef FQGAN_ISA_SELF
