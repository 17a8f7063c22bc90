"""FQTokenizer: shapes through the presets, encode/decode round trip, loss terms, bad input."""

import pytest
import torch

from fqgan.tokenizer import FQTokenizer


@pytest.mark.parametrize("which", ["tiny_config", "tiny_triple_config"])
def test_forward_shapes_and_round_trip(which, request, images):
    config = request.getfixturevalue(which)
    model = FQTokenizer(config).eval()
    x = images(2, config.image_size)
    out = model(x)
    k, g = config.num_codebooks, config.grid_size
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, k, g, g) and out.indices.dtype == torch.int64
    assert len(out.semantic_features) == len(config.semantic_codebooks)
    idx = model.encode(x)
    assert torch.equal(idx, out.indices)
    torch.testing.assert_close(model.decode_indices(idx), out.reconstruction)
