"""FusedReLU: what stands in a ReLU's place once the layer before it computes the ReLU."""
from __future__ import annotations

from torch import Tensor, nn


class FusedReLU(nn.ReLU):
    """A ReLU already applied by the expanded layer in front of it (``activation="relu"``),
    so its forward passes its input through.

    It keeps the ReLU's place and name in the model (state dicts, hooks and module paths do
    not change) and is still an ``nn.ReLU`` for code that looks for one; ``source_model``
    and ``merge`` turn it back into a plain ``nn.ReLU``.  Call it only on the output of its
    layer: anywhere else it would not clamp.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x

    def to_relu(self) -> nn.ReLU:
        return nn.ReLU(inplace=self.inplace)

    def extra_repr(self) -> str:
        return "computed by the expanded layer before it"
