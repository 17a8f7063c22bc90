"""Triton kernels, one module per op family (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)."""
