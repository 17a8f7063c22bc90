"""FQGAN tokenizer and FAR generator built on :mod:`fqgan_kernels` (model code lands in later issues)."""
