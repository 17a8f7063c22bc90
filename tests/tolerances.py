"""Constants shared by the kernel tests, in a module of their own: ``tests/fqgan/conftest.py`` would
shadow ``from conftest import ...`` once pytest has collected the ``fqgan`` folder."""

import torch

HAS_CUDA = torch.cuda.is_available()

# Tolerances by dtype, one table for all tests: (rtol, atol).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}
