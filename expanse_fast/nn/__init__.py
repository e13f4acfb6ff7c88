"""Drop-in expanded layers."""
from .conv import ExpandedConv2d
from .fused import FusedGELU, FusedReLU, FusedSiLU
from .linear import ExpandedLinear
from .norm import ExpandedBatchNorm1d, ExpandedBatchNorm2d

__all__ = ["ExpandedLinear", "ExpandedConv2d", "ExpandedBatchNorm1d", "ExpandedBatchNorm2d",
           "FusedReLU", "FusedGELU", "FusedSiLU"]
