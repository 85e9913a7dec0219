"""acmix: ACmix (Pan et al., CVPR 2022) as a fast, tested PyTorch library.

Quick start::

    import torch, acmix
    layer = acmix.ACmix(64, 64, kernel_att=7, head=4, kernel_conv=3)
    y = layer(torch.randn(2, 64, 56, 56))  # (2, 64, 56, 56)
"""

from acmix import analysis, layers, models
from acmix.layers import ACmix, ACmixConv2d, ConvReplacement, WindowACmix, convert_model

__version__ = "0.1.0"

__all__ = [
    "ACmix",
    "ACmixConv2d",
    "ConvReplacement",
    "WindowACmix",
    "__version__",
    "analysis",
    "convert_model",
    "layers",
    "models",
]
