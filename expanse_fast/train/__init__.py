"""Training helpers: the "basics" of two-step training, the two-step loop, and
continual-learning metrics.  Nothing here knows about kernels or expanded layers."""
from .basics import select_basics
from .metrics import cl_metrics
from .two_step import two_step

__all__ = ["select_basics", "two_step", "cl_metrics"]
