// Fused codebook / commitment / disentanglement losses, CPU. The maths and the gradient paths are
// in fqgan_kernels/vq_losses.py. One pass over z and codes forward (row-parallel, fixed row blocks
// so that the sum order, and hence the result, does not depend on the thread count), one pass
// backward (no reduction: every row writes its own grad_z and grad_codes). The per-row loops are the
// kernel pass at the bottom of this file, compiled once per instruction set (cpu/isa.h).
#ifndef FQGAN_ISA_PASS  // ======================= driver (compiled once) =======================

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "cpu/fpstate.h"
#include "cpu/isa.h"
#include "cpu/ops.h"

namespace fqgan::cpu {
namespace {

constexpr int64_t kRowBlock = 512;  // rows per partial sum (fixed: deterministic results)
constexpr double kL2Eps = 1e-12;    // F.normalize's eps, as the reference

}  // namespace
}  // namespace fqgan::cpu

#define FQGAN_ISA_SELF "cpu/vq_losses.cpp"
#include "cpu/isa_passes.h"

namespace fqgan::cpu {
namespace {

template <typename scalar_t>
at::Tensor forward_impl(const at::Tensor& z, const at::Tensor& codes, bool disentangle) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = z.size(0), k = z.size(1), D = z.size(2);
  const int64_t P = disentangle ? k * (k - 1) / 2 : 0;
  const int64_t slots = k + P;
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  std::vector<acc_t> partial(static_cast<size_t>(std::max<int64_t>(blocks, 1) * slots), acc_t(0));
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t* cp = codes.data_ptr<scalar_t>();
  const auto rows_fn = FQGAN_ISA_PICK(forward_rows<scalar_t>);
  fpstate::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> q(static_cast<size_t>(k * D)), inv(static_cast<size_t>(k));
    std::unique_ptr<bool[]> big(new bool[k]);
    for (int64_t blk = b0; blk < b1; ++blk) {
      rows_fn(zp, cp, blk * kRowBlock, std::min(N, (blk + 1) * kRowBlock), k, D, P,
              partial.data() + blk * slots, q.data(), inv.data(), big.get());
    }
  });
  at::Tensor sums = at::zeros({slots}, z.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* sp = sums.data_ptr<acc_t>();
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t s = 0; s < slots; ++s) sp[s] += partial[blk * slots + s];
  return sums;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& z, const at::Tensor& codes,
                                                 const at::Tensor& coef, bool disentangle) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = z.size(0), k = z.size(1), D = z.size(2);
  const bool dis = disentangle && k > 1;
  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_codes = at::empty_like(codes);
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t* cp = codes.data_ptr<scalar_t>();
  scalar_t* gzp = grad_z.data_ptr<scalar_t>();
  scalar_t* gcp = grad_codes.data_ptr<scalar_t>();
  // coef = [commitment (k) | codebook (k) | disentangle (1)], see fqgan_kernels/vq_losses.py.
  const at::Tensor coef_acc = coef.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* cf = coef_acc.data_ptr<acc_t>();
  const auto rows_fn = FQGAN_ISA_PICK(backward_rows<scalar_t>);
  fpstate::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> q(static_cast<size_t>(k * D)), inv(static_cast<size_t>(k)), dots(static_cast<size_t>(k * k));
    std::vector<acc_t> gq(static_cast<size_t>(D));
    std::unique_ptr<bool[]> big(new bool[k]);
    rows_fn(zp, cp, n0, n1, k, D, dis, cf, gzp, gcp, q.data(), inv.data(), dots.data(), gq.data(), big.get());
  });
  return {grad_z, grad_codes};
}

}  // namespace

at::Tensor vq_losses_forward(const at::Tensor& z, const at::Tensor& codes, bool disentangle) {
  TORCH_CHECK(z.dim() == 3 && z.sizes() == codes.sizes(), "vq_losses: z and codes must both be [N, k, D]");
  TORCH_CHECK(z.scalar_type() == codes.scalar_type(), "vq_losses: z and codes must have the same dtype");
  const fpstate::FlushDenormals fp_guard;
  const at::Tensor zc = z.contiguous(), cc = codes.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "vq_losses_forward",
                                  [&] { out = forward_impl<scalar_t>(zc, cc, disentangle); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> vq_losses_backward(const at::Tensor& z, const at::Tensor& codes,
                                                      const at::Tensor& coef, bool disentangle) {
  TORCH_CHECK(z.dim() == 3 && z.sizes() == codes.sizes(), "vq_losses: z and codes must both be [N, k, D]");
  TORCH_CHECK(coef.numel() == 2 * z.size(1) + 1, "vq_losses_backward: coef must have 2k + 1 entries");
  const fpstate::FlushDenormals fp_guard;
  const at::Tensor zc = z.contiguous(), cc = codes.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "vq_losses_backward",
                                  [&] { out = backward_impl<scalar_t>(zc, cc, coef, disentangle); });
  return out;
}

}  // namespace fqgan::cpu

#else  // ========== kernel pass: compiled once per ISA, in namespace isa_<name> (cpu/isa.h) ==========

// Loads the k codes of row n as acc_t, their L2-normalised copies q and 1 / max(|c|, eps).
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void load_normalized(const scalar_t* c, int64_t k, int64_t D, acc_t* q,
                                                           acc_t* inv, bool* big) {
  for (int64_t a = 0; a < k; ++a) {
    acc_t ss = 0;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t v = static_cast<acc_t>(c[a * D + d]);
      q[a * D + d] = v;
      ss += v * v;
    }
    const acc_t norm = std::sqrt(ss);
    big[a] = norm > static_cast<acc_t>(kL2Eps);
    inv[a] = static_cast<acc_t>(1) / std::max(norm, static_cast<acc_t>(kL2Eps));
    for (int64_t d = 0; d < D; ++d) q[a * D + d] *= inv[a];
  }
}

// Rows [n0, n1) into out[k + P]: sum (codes - z)^2 per sub-codebook, then (q_a . q_b)^2 per pair
// when P > 0. q [k * D], inv [k], big [k]: scratch.
template <typename scalar_t>
void forward_rows(const scalar_t* zp, const scalar_t* cp, int64_t n0, int64_t n1, int64_t k, int64_t D, int64_t P,
                  at::opmath_type<scalar_t>* out, at::opmath_type<scalar_t>* q, at::opmath_type<scalar_t>* inv,
                  bool* big) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* zr = zp + n * k * D;
    const scalar_t* cr = cp + n * k * D;
    for (int64_t a = 0; a < k; ++a) {
      acc_t s = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t diff = static_cast<acc_t>(cr[a * D + d]) - static_cast<acc_t>(zr[a * D + d]);
        s += diff * diff;
      }
      out[a] += s;
    }
    if (P == 0) continue;
    load_normalized(cr, k, D, q, inv, big);
    int64_t p = k;
    for (int64_t a = 0; a < k; ++a)
      for (int64_t b = a + 1; b < k; ++b, ++p) {
        acc_t dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += q[a * D + d] * q[b * D + d];
        out[p] += dot * dot;
      }
  }
}

// grad_z and grad_codes of rows [n0, n1); cf = coef (see backward_impl). q [k * D], inv [k],
// dots [k * k], gq [D], big [k]: scratch.
template <typename scalar_t>
void backward_rows(const scalar_t* zp, const scalar_t* cp, int64_t n0, int64_t n1, int64_t k, int64_t D, bool dis,
                   const at::opmath_type<scalar_t>* cf, scalar_t* gzp, scalar_t* gcp, at::opmath_type<scalar_t>* q,
                   at::opmath_type<scalar_t>* inv, at::opmath_type<scalar_t>* dots, at::opmath_type<scalar_t>* gq,
                   bool* big) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t cdis = cf[2 * k];
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* zr = zp + n * k * D;
    const scalar_t* cr = cp + n * k * D;
    if (dis) {
      load_normalized(cr, k, D, q, inv, big);
      for (int64_t a = 0; a < k; ++a)
        for (int64_t b = a + 1; b < k; ++b) {
          acc_t dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q[a * D + d] * q[b * D + d];
          dots[a * k + b] = dots[b * k + a] = dot;
        }
    }
    for (int64_t a = 0; a < k; ++a) {
      const acc_t cz = cf[a], cc = cf[k + a];
      acc_t radial = 0;
      if (dis) {
        // dL/dq_a = cdis * sum_{b != a} (q_a . q_b) q_b; radial part q_a . dL/dq_a.
        for (int64_t d = 0; d < D; ++d) gq[d] = 0;
        for (int64_t b = 0; b < k; ++b) {
          if (b == a) continue;
          const acc_t w = cdis * dots[a * k + b];
          for (int64_t d = 0; d < D; ++d) gq[d] += w * q[b * D + d];
          radial += w * dots[a * k + b];
        }
        // d normalize(c)/dc = (I - q q^T) / |c| where |c| > eps, I / eps otherwise.
        if (!big[a]) radial = 0;
      }
      for (int64_t d = 0; d < D; ++d) {
        const int64_t o = n * k * D + a * D + d;
        const acc_t diff = static_cast<acc_t>(cr[a * D + d]) - static_cast<acc_t>(zr[a * D + d]);
        acc_t g = -cz * diff;
        if (dis) g += (gq[d] - radial * q[a * D + d]) * inv[a];
        gzp[o] = static_cast<scalar_t>(g);
        gcp[o] = static_cast<scalar_t>(cc * diff);
      }
    }
  }
}

#endif  // FQGAN_ISA_PASS
