"""PatchGAN discriminator of the FQGAN tokenizer (pix2pix ``NLayerDiscriminator`` as in taming /
LlamaGen ``discriminator_patchgan.py``), with the same ``main.{i}`` parameter names so the
``"discriminator"`` entry of an official training checkpoint loads unchanged."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PatchGANDiscriminator"]


class PatchGANDiscriminator(nn.Module):
    """``[B, in_channels, H, W] -> [B, 1, H', W']`` patch logits.

    Layers: 4x4 conv stride 2 + LeakyReLU(0.2); ``num_layers - 1`` x (4x4 conv stride 2, BatchNorm,
    LeakyReLU) with ``dim * min(2**n, 8)`` channels; a 4x4 conv stride 1 + BatchNorm + LeakyReLU; a 4x4
    conv stride 1 to one channel. Convs followed by BatchNorm have no bias. Init: conv weights
    N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0 (the official ``_init_weights``); the BatchNorm
    runs on batch statistics whenever the module is in training mode, as in the official training.
    """

    def __init__(self, in_channels: int = 3, dim: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, dim, kernel_size=4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(dim * prev, dim * mult, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(dim * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** num_layers, 8)
        layers += [nn.Conv2d(dim * prev, dim * mult, kernel_size=4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(dim * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(dim * mult, 1, kernel_size=4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.main(images)
