// Floating-point state of the CPU kernels: flush-to-zero and denormals-are-zero while a kernel runs.
//
// Why. Intel cores take a microcode assist (~100+ cycles) for every subnormal float an instruction
// produces or consumes. The kernels made them in bulk: exp of very negative arguments (peaked
// softmaxes: entropy at T = 0.01, cross-entropy with spread logits, sampling with large logits),
// products p * x of such probabilities, and MKL GEMMs consuming them. Measured before this guard
// (2026-11-30, 2-core Xeon, AVX-512, KVM, 2 threads), peaked / flat inputs of the same shape:
// entropy fwd+bwd 5.4x (N 4096, K 16384, D 8, T 0.01 / 1), linear_cross_entropy fwd+bwd 5.9x (N 1024,
// H 256, V 16384, weight x30 / x1), sampling 16x (B 128, V 16384, CFG, logits x100 / x1). With FTZ|DAZ set, a result below the
// smallest normal number (2^-126 in float32, 2^-1022 in float64) becomes 0 and a subnormal input
// reads as 0: no assist. Results change only where a value falls below that, far under the rounding
// of what the kernels return (probabilities next to a row maximum of 1, sums of such terms). The
// kernels also avoid making subnormals on their own: simd::fexp never returns one.
//
// What. FlushDenormals is a scoped guard for the calling thread: it sets FTZ|DAZ (x86: MXCSR bits
// 15 and 6; aarch64: FPCR.FZ) and, when it ends, puts the control bits back exactly as it found
// them; the sticky exception flags (MXCSR bits 0-5: status, not control) raised meanwhile stay
// raised, as they would without the guard. Every kernel entry point holds one for its calling
// thread and runs its parallel regions through fpstate::parallel_for, which holds one in each
// worker for the duration of its chunk. Each thread restores its own state, so a caller with FTZ
// already on (torch.set_flush_denormal(True) sets it on the calling thread only) keeps it, and
// pool threads keep whatever they had.
//
// MKL/oneDNN GEMMs called from a kernel (linear_cross_entropy) run on the OpenMP pool's threads
// outside any of our chunks; AllThreadsFlushDenormals covers them (see its comment).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#define FQGAN_FPSTATE_X86 1
#else
#define FQGAN_FPSTATE_X86 0
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fqgan::cpu::fpstate {

#if FQGAN_FPSTATE_X86
constexpr uint32_t kFlushBits = 0x8040u;    // FTZ (bit 15) | DAZ (bit 6)
constexpr uint32_t kStatusBits = 0x003Fu;   // sticky exception flags IE DE ZE OE UE PE
inline uint32_t get() { return _mm_getcsr(); }
inline void set(uint32_t v) { _mm_setcsr(v); }
#elif defined(__aarch64__)
constexpr uint32_t kFlushBits = 1u << 24;  // FPCR.FZ: flush inputs and results (FPSR holds the flags)
constexpr uint32_t kStatusBits = 0u;
inline uint32_t get() {
  uint64_t v;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(v));
  return static_cast<uint32_t>(v);
}
inline void set(uint32_t v) {
  const uint64_t w = v;
  __asm__ __volatile__("msr fpcr, %0" : : "r"(w));
}
#else
constexpr uint32_t kFlushBits = 0u;  // no known control: subnormals are left to the hardware
constexpr uint32_t kStatusBits = 0u;
inline uint32_t get() { return 0u; }
inline void set(uint32_t) {}
#endif

// FTZ|DAZ on the calling thread for the guard's lifetime; the previous control bits after it.
class FlushDenormals {
 public:
  FlushDenormals() noexcept : saved_(get()) {
    if ((saved_ & kFlushBits) != kFlushBits) set(saved_ | kFlushBits);
  }
  ~FlushDenormals() {
    const uint32_t now = get();
    const uint32_t restored = (saved_ & ~kStatusBits) | (now & kStatusBits);
    if (restored != now) set(restored);
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  uint32_t saved_;
};

// at::parallel_for whose every chunk runs under FlushDenormals (in whichever thread runs it,
// the calling thread included when ATen runs the range inline).
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&f](int64_t b, int64_t e) {
    FlushDenormals guard;
    f(b, e);
  });
}

// FTZ|DAZ on every thread of the calling thread's OpenMP team for the guard's lifetime, for
// library code that runs its own parallel regions on that team (MKL / oneDNN GEMMs in torch's
// OpenMP builds). Each thread saves its own state in one region and restores it in another; ATen
// and MKL always run full-size teams on this pool (ATen avoids the num_threads clause), so the
// same OS threads take part in both. Inside a parallel region (nested: a team of one) or without
// OpenMP it covers only the calling thread.
class AllThreadsFlushDenormals {
 public:
  AllThreadsFlushDenormals() {
#ifdef _OPENMP
    if (!omp_in_parallel()) {
      saved_.assign(static_cast<size_t>(omp_get_max_threads()), 0u);
      std::vector<uint32_t>& saved = saved_;
#pragma omp parallel
      {
        const int t = omp_get_thread_num();
        if (t < static_cast<int>(saved.size())) {
          saved[t] = get() | kValid;
          set(get() | kFlushBits);
        }
      }
      return;
    }
#endif
    saved_.assign(1, get() | kValid);
    set(get() | kFlushBits);
  }
  ~AllThreadsFlushDenormals() {
#ifdef _OPENMP
    if (saved_.size() > 1 || !omp_in_parallel()) {
      const std::vector<uint32_t>& saved = saved_;
#pragma omp parallel
      {
        const int t = omp_get_thread_num();
        if (t < static_cast<int>(saved.size()) && (saved[t] & kValid) != 0u) restore(saved[t] & ~kValid);
      }
      return;
    }
#endif
    restore(saved_[0] & ~kValid);
  }
  AllThreadsFlushDenormals(const AllThreadsFlushDenormals&) = delete;
  AllThreadsFlushDenormals& operator=(const AllThreadsFlushDenormals&) = delete;

 private:
  // MXCSR/FPCR bit 31 is reserved (0): marks a slot that was filled.
  static constexpr uint32_t kValid = 0x80000000u;
  static void restore(uint32_t saved) {
    const uint32_t now = get();
    set((saved & ~kStatusBits) | (now & kStatusBits));
  }
  std::vector<uint32_t> saved_;
};

}  // namespace fqgan::cpu::fpstate
