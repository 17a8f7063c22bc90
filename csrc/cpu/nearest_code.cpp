// Nearest code per sub-codebook on the CPU: idx[n, i] = argmin_j ||z_hat[n, i] - e_hat[i, j]||^2.
//
// Maths. ||z - e_j||^2 = ||z||^2 + ||e_j||^2 - 2 z.e_j, so the argmin is argmax_j (z.e_j - 0.5 ||e_j||^2):
// a dot product plus a per-code bias, no N x K matrix. With l2_normalize, z and the codes are
// normalised first (x / max(||x||, 1e-12), as F.normalize) and the bias is still -0.5 ||e_hat_j||^2:
// -0.5 for a unit code (exactly, not its rounded norm), but 0 for an all-zero codebook row,
// whose distance to z_hat is ||z_hat||^2 = 1, as in the reference, Triton and CUDA kernels (with
// bias 0 such a row would lose to every code less than 90 degrees from z, instead of only to those
// within 60 degrees; with raw z the bias would not weigh alike on every row). Ties go to the lowest
// j because every comparison below is a strict `>` taken in ascending code order. All arithmetic is
// fp32; bf16/fp16 inputs are widened when loaded.
//
// Layout. Per call, each sub-codebook is normalised (if asked) and packed once into tiles of T codes
// stored D-major: packed[i][tile][d][0..T), plus bias[i][code] (-inf for the padding codes of the last
// tile, so they never win). One vector load then holds coordinate d of W consecutive codes, so the
// codes sit in the SIMD lanes whatever D is: D = 8 costs 8 FMAs per W (row, code) pairs on AVX2 (W = 8)
// and on AVX-512 (W = 16, i.e. two D = 8 codes' worth of data per vector), with no horizontal sums.
// The packed copy is k*K*D floats (1.5 MiB at k=3, K=16384, D=8); the only other memory is per
// block: an fp32 copy of that block's z rows (normalised when asked), and the running best score /
// index per row.
//
// Micro-kernel (tile()): R rows x C vectors of codes (T = C*W codes) of accumulators in registers,
// started at the bias, then one loop over d: C code-vector loads, R broadcasts of z[r][d], R*C FMAs.
// AVX2 has 16 ymm registers: R=4, C=3 uses 12 accumulators + 3 code vectors + 1 broadcast. AVX-512 has
// 32 zmm: R=6, C=4 (24 + 4 + 1). Then, per row, the C score vectors are max-reduced and compared to
// that row's best so far in one vector compare. Only if some lane beats it (after the first few tiles
// that is rare: a running maximum of K random scores changes about ln K times) are the scores spilled
// to a stack buffer and scanned in order, which keeps the lowest index on ties. So the steady state is
// R*C*D FMAs + R*C max/compare per tile, and no per-lane index bookkeeping.
//
// Blocking. Work items are (sub-codebook, block of up to 256 rows), spread over threads with
// at::parallel_for; items of one thread are consecutive, so they mostly share a sub-codebook. Inside
// an item, codes go in chunks of ~16 KiB of packed data (512 codes at D = 8): the chunk stays in L1
// while all row groups of the block pass over it, and the block's z rows (8 KiB) stay in L1 too.
//
// ISA. The kernel pass at the bottom of this file is compiled once per instruction set (cpu/isa.h),
// with that set's vector type V from cpu/simd.h and its tile shape (R, C above).
//
// Fast paths are templated on D in {4, 8, 16, 32} (the d loop fully unrolled); any other D takes the
// same code with a run-time loop.

#ifndef FQGAN_ISA_PASS  // ======================= driver (compiled once) =======================

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/fpstate.h"
#include "cpu/isa.h"
#include "cpu/ops.h"
#include "cpu/simd.h"

namespace fqgan::cpu {
namespace {

using ScanFn = void (*)(const float*, int64_t, int64_t, const float*, const float*, int64_t, float*, int64_t*);

// What a kernel pass provides: its tile shape and the scan of a block of rows over one sub-codebook.
struct Kernel {
  int64_t tile_codes;  // T: codes per packed tile
  int64_t tile_rows;   // R: rows per micro-kernel call; row blocks are padded to a multiple
  ScanFn scan;
};

}  // namespace
}  // namespace fqgan::cpu

#define FQGAN_ISA_SELF "cpu/nearest_code.cpp"
#include "cpu/isa_passes.h"

namespace fqgan::cpu {
namespace {

// Normalises (if asked) and packs codebooks [k, K, D] into tiles [k][Kpad / T][D][T] (fp32) and the
// per-code bias [k][Kpad], in blocks of 16 tiles per task (the pass's pack_tiles).
template <typename scalar_t>
void pack_codebooks(const scalar_t* cb, int64_t k, int64_t K, int64_t D, int64_t T, int64_t Kpad,
                    bool l2_normalize, float* packed, float* bias) {
  const int64_t ntiles = Kpad / T, per = 16, blocks = (ntiles + per - 1) / per;
  const auto pack_fn = FQGAN_ISA_PICK(pack_tiles<scalar_t>);
  fpstate::parallel_for(0, k * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / blocks, t0 = (item % blocks) * per;
      pack_fn(cb + i * K * D, K, D, l2_normalize, t0, std::min(ntiles, t0 + per), packed + i * Kpad * D,
              bias + i * Kpad);
    }
  });
}

template <typename scalar_t>
void search(const scalar_t* z, int64_t N, int64_t k, int64_t D, bool l2_normalize, const float* packed,
            const float* bias, int64_t Kpad, const Kernel& kern, scalar_t* codes, int64_t* indices) {
  const int64_t T = kern.tile_codes, R = kern.tile_rows;
  // Blocks of 256 rows keep z in L1 next to a code chunk; smaller blocks only when there would
  // otherwise be too few work items to keep every thread busy (small N).
  const int64_t want_items = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t rb = 256;
  while (rb > R && k * ((N + rb - 1) / rb) < want_items) rb /= 2;
  rb = std::max<int64_t>(R, (rb + R - 1) / R * R);
  const int64_t nblk = (N + rb - 1) / rb;

  fpstate::parallel_for(0, k * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(rb * D), best(rb);
    std::vector<int64_t> arg(rb);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / nblk, n0 = (item % nblk) * rb;
      const int64_t rows = std::min(rb, N - n0), prows = (rows + R - 1) / R * R;
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* src = z + ((n0 + r) * k + i) * D;
        float* dst = zbuf.data() + r * D;
        float ss = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = static_cast<float>(src[d]);
          ss += dst[d] * dst[d];
        }
        if (l2_normalize) {
          const float denom = std::max(std::sqrt(ss), 1e-12f);
          for (int64_t d = 0; d < D; ++d) dst[d] /= denom;
        }
      }
      std::fill(zbuf.begin() + rows * D, zbuf.begin() + prows * D, 0.f);
      std::fill(best.begin(), best.begin() + prows, -std::numeric_limits<float>::infinity());
      std::fill(arg.begin(), arg.begin() + prows, 0);

      const float* pk = packed + i * Kpad * D;
      kern.scan(zbuf.data(), prows, D, pk, bias + i * Kpad, Kpad, best.data(), arg.data());

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = arg[r], row = (n0 + r) * k + i;
        indices[row] = j;
        const float* e = pk + (j / T) * T * D + j % T;
        for (int64_t d = 0; d < D; ++d) codes[row * D + d] = static_cast<scalar_t>(e[d * T]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& z, const at::Tensor& codebooks, bool l2_normalize) {
  TORCH_CHECK(z.dim() == 3 && codebooks.dim() == 3, "nearest_code: z [N,k,D] and codebooks [k,K,D], got ",
              z.sizes(), " and ", codebooks.sizes());
  TORCH_CHECK(z.size(1) == codebooks.size(0) && z.size(2) == codebooks.size(2), "nearest_code: z ", z.sizes(),
              " does not match codebooks ", codebooks.sizes());
  TORCH_CHECK(z.scalar_type() == codebooks.scalar_type(), "nearest_code: z and codebooks dtypes differ");
  const int64_t N = z.size(0), k = z.size(1), D = z.size(2), K = codebooks.size(1);
  at::Tensor codes = at::empty({N, k, D}, z.options());
  at::Tensor indices = at::empty({N, k}, z.options().dtype(at::kLong));
  if (N == 0 || k == 0) return {codes, indices};
  TORCH_CHECK(K > 0, "nearest_code: empty codebooks (K = 0)");
  TORCH_CHECK(D > 0, "nearest_code: D = 0");

  const fpstate::FlushDenormals fp_guard;
  const at::Tensor zc = z.contiguous(), cbc = codebooks.contiguous();
  const Kernel& kern = *FQGAN_ISA_PICK(kernel);
  const int64_t Kpad = (K + kern.tile_codes - 1) / kern.tile_codes * kern.tile_codes;
  at::Tensor packed = at::empty({k * Kpad * D}, z.options().dtype(at::kFloat));
  at::Tensor bias = at::empty({k * Kpad}, z.options().dtype(at::kFloat));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "nearest_code_cpu", [&] {
    pack_codebooks<scalar_t>(cbc.data_ptr<scalar_t>(), k, K, D, kern.tile_codes, Kpad, l2_normalize,
                             packed.data_ptr<float>(), bias.data_ptr<float>());
    search<scalar_t>(zc.data_ptr<scalar_t>(), N, k, D, l2_normalize, packed.data_ptr<float>(),
                     bias.data_ptr<float>(), Kpad, kern, codes.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
  });
  return {codes, indices};
}

}  // namespace fqgan::cpu

#else  // ========== kernel pass: compiled once per ISA, in namespace isa_<name> (cpu/isa.h) ==========

constexpr int kRows = kIsa == isa::Isa::kAvx512 ? 6 : 4;                           // R
constexpr int kVecs = kIsa == isa::Isa::kAvx512 ? 4 : kIsa == isa::Isa::kAvx2 ? 3 : 2;  // C
constexpr int kTile = kVecs * V::W;                                                // T codes per packed tile

// Scores of kRows rows (z, row stride D) against one packed tile (D x kTile, starting at code `code0`),
// folded into the rows' running best score / index.
// Always inlined into the tile loop: as a call it pays a vzeroupper and a stack realignment per tile.
template <int kD>
__attribute__((always_inline)) inline void tile(const float* z, int64_t D, const float* pk, const float* bias, int64_t code0, float* best,
                 int64_t* arg) {
  const int64_t dn = kD > 0 ? kD : D;
  V::reg acc[kRows][kVecs];
#pragma GCC unroll 8
  for (int c = 0; c < kVecs; ++c) {
    const V::reg b = V::load(bias + c * V::W);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) acc[r][c] = b;
  }
#pragma GCC unroll 32
  for (int64_t d = 0; d < dn; ++d) {
    V::reg e[kVecs];
#pragma GCC unroll 8
    for (int c = 0; c < kVecs; ++c) e[c] = V::load(pk + d * kTile + c * V::W);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const V::reg zr = V::set1(z[r * dn + d]);
#pragma GCC unroll 8
      for (int c = 0; c < kVecs; ++c) acc[r][c] = V::fmadd(zr, e[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    V::reg m = acc[r][0];
#pragma GCC unroll 8
    for (int c = 1; c < kVecs; ++c) m = V::max(m, acc[r][c]);
    if (__builtin_expect(V::any_gt(m, best[r]), 0)) {
      // Rare: the tile's top score beats the row's best. It is the largest lane of m, and its code
      // the first lane holding it in code order (vector c, then lane), so among equal scores the
      // lowest index stays (a later tile needs a strictly greater score). In vector operations: a
      // scalar scan of the tile's scores cost ~30 % of the search at K = 16384 (~7 records a row).
      // With NaN lanes (check_finite=False on non-finite input) top may match no lane: keep the record.
      const float top = V::hmax(m);
#pragma GCC unroll 8
      for (int c = 0; c < kVecs; ++c) {
        const uint32_t eq = V::eq_mask(acc[r][c], top);
        if (eq != 0u) {
          best[r] = top;
          arg[r] = code0 + c * V::W + __builtin_ctz(eq);
          break;
        }
      }
    }
  }
}

// Tiles [t0, t1) of one sub-codebook cb [K, D]: codes normalised as F.normalize (x / max(||x||, eps))
// when l2, transposed into pk [tile][d][kTile], and bias [code] = -||e_hat||^2 / 2 (exactly -0.5 for
// a code divided by its own norm, so that equal distances (z_hat = 0) stay exact ties; below eps a
// code keeps its shorter length, 0 if all zero), -inf for the padding codes past K. Loops over the
// tile's codes, so they vectorise across codes like the search.
template <typename scalar_t, int kD>
void pack_impl(const scalar_t* cb, int64_t K, int64_t D, bool l2, int64_t t0, int64_t t1, float* pk, float* bias) {
  const int64_t dn = kD > 0 ? kD : D;
  alignas(64) float ss[kTile], norm[kTile], ss_hat[kTile];
  for (int64_t t = t0; t < t1; ++t) {
    float* tile = pk + t * kTile * dn;
    float* b = bias + t * kTile;
    const int64_t j0 = t * kTile, n = std::min<int64_t>(kTile, K - j0);
    for (int64_t lane = 0; lane < n; ++lane) {
      const scalar_t* e = cb + (j0 + lane) * dn;
      for (int64_t d = 0; d < dn; ++d) tile[d * kTile + lane] = static_cast<float>(e[d]);
    }
    for (int64_t d = 0; d < dn; ++d)
      for (int64_t lane = n; lane < kTile; ++lane) tile[d * kTile + lane] = 0.f;
    for (int lane = 0; lane < kTile; ++lane) ss[lane] = 0.f;
    for (int64_t d = 0; d < dn; ++d)
      for (int lane = 0; lane < kTile; ++lane) ss[lane] += tile[d * kTile + lane] * tile[d * kTile + lane];
    if (l2) {
      for (int lane = 0; lane < kTile; ++lane) {
        norm[lane] = std::sqrt(ss[lane]);
        ss_hat[lane] = 0.f;
      }
      for (int64_t d = 0; d < dn; ++d) {
        for (int lane = 0; lane < kTile; ++lane) {
          const float x = tile[d * kTile + lane] / std::max(norm[lane], 1e-12f);
          tile[d * kTile + lane] = x;
          ss_hat[lane] += x * x;
        }
      }
      for (int lane = 0; lane < kTile; ++lane) b[lane] = norm[lane] >= 1e-12f ? -0.5f : -0.5f * ss_hat[lane];
    } else {
      for (int lane = 0; lane < kTile; ++lane) b[lane] = -0.5f * ss[lane];
    }
    for (int64_t lane = n; lane < kTile; ++lane) b[lane] = -std::numeric_limits<float>::infinity();
  }
}

template <typename scalar_t>
void pack_tiles(const scalar_t* cb, int64_t K, int64_t D, bool l2, int64_t t0, int64_t t1, float* pk, float* bias) {
  switch (D) {
    case 4:
      return pack_impl<scalar_t, 4>(cb, K, D, l2, t0, t1, pk, bias);
    case 8:
      return pack_impl<scalar_t, 8>(cb, K, D, l2, t0, t1, pk, bias);
    case 16:
      return pack_impl<scalar_t, 16>(cb, K, D, l2, t0, t1, pk, bias);
    case 32:
      return pack_impl<scalar_t, 32>(cb, K, D, l2, t0, t1, pk, bias);
    default:
      return pack_impl<scalar_t, 0>(cb, K, D, l2, t0, t1, pk, bias);
  }
}

// rows (a multiple of kRows) rows of z against Kpad packed codes of one sub-codebook.
template <int kD>
void scan_impl(const float* z, int64_t rows, int64_t D, const float* pk, const float* bias, int64_t Kpad,
               float* best, int64_t* arg) {
  const int64_t dn = kD > 0 ? kD : D;
  // ~16 KiB of packed codes per chunk: it stays in L1 while every row group of the block passes.
  const int64_t chunk = std::max<int64_t>(1, 16384 / (4 * dn * kTile)) * kTile;
  for (int64_t c0 = 0; c0 < Kpad; c0 += chunk) {
    const int64_t c1 = std::min(Kpad, c0 + chunk);
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      for (int64_t t = c0; t < c1; t += kTile) {
        tile<kD>(z + r0 * dn, dn, pk + t * dn, bias + t, t, best + r0, arg + r0);
      }
    }
  }
}

void scan(const float* z, int64_t rows, int64_t D, const float* pk, const float* bias, int64_t Kpad, float* best,
          int64_t* arg) {
  switch (D) {
    case 4:
      return scan_impl<4>(z, rows, D, pk, bias, Kpad, best, arg);
    case 8:
      return scan_impl<8>(z, rows, D, pk, bias, Kpad, best, arg);
    case 16:
      return scan_impl<16>(z, rows, D, pk, bias, Kpad, best, arg);
    case 32:
      return scan_impl<32>(z, rows, D, pk, bias, Kpad, best, arg);
    default:
      return scan_impl<0>(z, rows, D, pk, bias, Kpad, best, arg);
  }
}

const Kernel kernel{kTile, kRows, &scan};

#endif  // FQGAN_ISA_PASS
