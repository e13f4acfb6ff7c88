"""What stands in an activation module's place once the expanded Linear before it computes
the activation itself (``activation=...``): FusedReLU, FusedGELU, FusedSiLU."""
from __future__ import annotations

from torch import Tensor, nn


class _Fused:
    """Mixin: forward passes its input through; ``unfused()`` gives the plain module back.

    Each class is still its activation's ``nn`` type, so code that looks for an ``nn.ReLU``
    (or ``nn.GELU``, ``nn.SiLU``) finds one, and the module keeps its place and name in the
    model (state dicts, hooks and module paths do not change).  ``source_model`` and
    ``merge`` put the plain module back.  Call it only on the output of its layer: anywhere
    else it would not apply the activation.
    """

    activation = ""  # the layer's ``activation`` value that this module stands for

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.activation!r}, computed by the expanded layer before it"


class FusedReLU(_Fused, nn.ReLU):
    """An ``nn.ReLU`` already applied by the expanded layer in front of it."""

    activation = "relu"

    def unfused(self) -> nn.ReLU:
        return nn.ReLU(inplace=self.inplace)


class FusedGELU(_Fused, nn.GELU):
    """An ``nn.GELU`` (exact or tanh) already applied by the expanded layer in front of it."""

    @property
    def activation(self) -> str:
        return "gelu" if self.approximate == "none" else "gelu_tanh"

    def unfused(self) -> nn.GELU:
        return nn.GELU(approximate=self.approximate)


class FusedSiLU(_Fused, nn.SiLU):
    """An ``nn.SiLU`` already applied by the expanded layer in front of it."""

    activation = "silu"

    def unfused(self) -> nn.SiLU:
        return nn.SiLU(inplace=self.inplace)


def fused_stand_in(module: nn.Module):
    """(activation name, stand-in module) for a plain activation module the expanded Linear
    can fuse, else None."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu", FusedReLU(inplace=module.inplace)
    if kind is nn.GELU and module.approximate in ("none", "tanh"):
        stand_in = FusedGELU(approximate=module.approximate)
        return stand_in.activation, stand_in
    if kind is nn.SiLU:
        return "silu", FusedSiLU(inplace=module.inplace)
    return None


FUSED_TYPES = (FusedReLU, FusedGELU, FusedSiLU)
