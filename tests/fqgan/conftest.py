"""Shared fixtures of the fqgan model tests: small tokenizer configs and random images.

``tiny_config`` / ``tiny_triple_config``: the TINY presets with a 64-code codebook (fast);
``images``: a factory ``images(batch=2, size=32, channels=3)`` of random images in [-1, 1];
``one_thread``: torch on one thread for the test (modules with tiny ops use it for every test:
``pytestmark = pytest.mark.usefixtures("one_thread")``).
"""

import pytest
import torch

from fqgan.tokenizer.config import TINY, TINY_TRIPLE, TokenizerConfig


@pytest.fixture
def tiny_config() -> TokenizerConfig:
    return TINY.replace(codebook_size=64)


@pytest.fixture
def tiny_triple_config() -> TokenizerConfig:
    return TINY_TRIPLE.replace(codebook_size=64)


@pytest.fixture
def images():
    def make(batch: int = 2, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(batch, channels, size, size, generator=g) * 2 - 1

    return make


@pytest.fixture
def one_thread():
    """Tiny ops: one thread is faster, and far faster on a shared machine (OpenMP barriers under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
