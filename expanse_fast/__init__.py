"""expanse_fast: EXPANSE progressive transfer learning for PyTorch.

Widen a pretrained network (new units in every Linear and Conv2d, pretrained weights
frozen, old units never reading new ones), train only the new units, and keep the source
task exact.  See DESIGN.md for the math.
"""
from . import ops
from .backend_choice import get_backend, set_backend, use_backend
from .checkpoint import load_expansion, save_expansion
from .expand import (ExpansionError, expand, expanded_layers, merge, print_trainable_parameters,
                     source_model)
from .fold import fold_batchnorms
from .fuse import fuse_activations
from .layout import Layout
from .nn import (ExpandedBatchNorm1d, ExpandedBatchNorm2d, ExpandedConv2d, ExpandedLinear,
                 FusedGELU, FusedReLU, FusedSiLU)

__version__ = "0.1.0"

__all__ = [
    "ExpandedLinear", "ExpandedConv2d", "ExpandedBatchNorm1d", "ExpandedBatchNorm2d", "FusedReLU",
    "FusedGELU", "FusedSiLU",
    "Layout", "expand", "fuse_activations", "fold_batchnorms", "source_model", "merge",
    "print_trainable_parameters", "expanded_layers",
    "save_expansion", "load_expansion", "ExpansionError", "set_backend", "use_backend",
    "get_backend", "ops",
]


def __getattr__(name):
    # train and data pull in optional dependencies (tqdm, mlxtend, scikit-learn): load lazily.
    if name in ("train", "data"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
