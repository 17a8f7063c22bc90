// Declarations of the CPU kernels, one block per op family (csrc/cpu/<op>.cpp).
// They take contiguous tensors already validated by the Python front door
// (fqgan_kernels/<op>.py); the schema of every op lives there, in torch.library.
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace fqgan::cpu {

// nearest_code.cpp
// z [N, k, D], codebooks [k, K, D] (same float dtype) -> codes [N, k, D] (dtype of z), indices [N, k] int64.
std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& z, const at::Tensor& codebooks, bool l2_normalize);

// Name of the instruction set the kernels dispatch to on this CPU ("avx512", "avx2", "portable").
std::string isa();

}  // namespace fqgan::cpu
