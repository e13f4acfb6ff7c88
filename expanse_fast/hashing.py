"""One way to hash a tensor (name, dtype, shape, bytes), shared by the expansion files, the
training checkpoints and two_step's resume check."""
import torch
from torch import Tensor


def hash_tensor(h, name: str, t: Tensor) -> None:
    """Feed ``name``, dtype, shape and the raw bytes of ``t`` into the hash object ``h``."""
    shape = tuple(t.shape)
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{name}|{t.dtype}|{shape}|".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes())
