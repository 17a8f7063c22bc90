// Nearest code per sub-codebook, CPU. Portable first version (to be replaced by the SIMD micro-kernel).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>

#include "cpu/ops.h"

namespace fqgan::cpu {

std::string isa() { return "portable"; }

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& z, const at::Tensor& codebooks, bool l2_normalize) {
  const int64_t N = z.size(0), k = z.size(1), D = z.size(2), K = codebooks.size(1);
  at::Tensor cb = codebooks.to(at::kFloat).contiguous();
  if (l2_normalize) cb = cb / cb.norm(2, -1, true).clamp_min(1e-12);
  at::Tensor zf = z.to(at::kFloat).contiguous();
  at::Tensor bias = -0.5 * (cb * cb).sum(-1);  // [k, K]
  at::Tensor idx = at::empty({N, k}, z.options().dtype(at::kLong));
  const float* zp = zf.data_ptr<float>();
  const float* cp = cb.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, N * k, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / k, i = r % k;
      const float* zr = zp + (n * k + i) * D;
      float best = -std::numeric_limits<float>::infinity();
      int64_t arg = 0;
      for (int64_t j = 0; j < K; ++j) {
        const float* e = cp + (i * K + j) * D;
        float s = l2_normalize ? 0.f : bp[i * K + j];
        for (int64_t d = 0; d < D; ++d) s += zr[d] * e[d];
        if (s > best) { best = s; arg = j; }
      }
      ip[r] = arg;
    }
  });
  at::Tensor codes = at::empty({N, k, D}, z.options());
  for (int64_t i = 0; i < k; ++i)
    codes.select(1, i).copy_(cb.select(0, i).index_select(0, idx.select(1, i)));
  return {codes, idx};
}

}  // namespace fqgan::cpu
