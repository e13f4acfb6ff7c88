"""Data-parallel training of expanded models on PyTorch's own engine: DDP and FSDP2.

Frozen tensors are ``nn.Parameter(requires_grad=False)``.  DDP builds its gradient buckets
from the parameters that require grad only, so every step all-reduces exactly the trainable
bytes (see :class:`AllReduceCounter`) and ``find_unused_parameters`` is not needed.  FSDP2
(``fully_shard``) shards frozen and trainable tensors of one layer together and
reduce-scatters only the gradients that exist.

Everything here is a no-op (or rank 0 of 1) outside a process group, so code written for
``torchrun`` also runs as a plain ``python`` script.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "make_sampler",
           "all_reduce_metrics", "any_rank", "all_gather", "wrap_ddp", "wrap_fsdp2", "unwrap",
           "ddp_ignored_names", "trainable_bytes", "AllReduceCounter", "sync_batchnorm"]


# ---- where am I ------------------------------------------------------------------------
def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return _initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one process that logs and writes files."""
    return rank() == 0


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and "cpu:gloo,cuda:nccl") takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- data ------------------------------------------------------------------------------
class _Sized:
    """All DistributedSampler reads of a data set is its length."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def make_sampler(dataset_or_tensors, shuffle: bool = True, seed: int = 0) -> DistributedSampler:
    """This rank's share of the examples of a Dataset, a tensor or a tuple of tensors (X, y).

    Every rank gets ceil(n / world_size) indices (a few examples repeat to even the shares
    out), so every rank runs the same number of steps, as DDP requires.  Call
    ``sampler.set_epoch(e)`` before each epoch for a new order; ``seed`` must be the same on
    every rank.  Outside a process group: all indices, one rank.
    """
    data = dataset_or_tensors
    if isinstance(data, (tuple, list)):
        sizes = {len(t) for t in data}
        if len(sizes) != 1:
            raise ValueError(f"make_sampler: the tensors have different lengths {sorted(sizes)}")
        data = _Sized(sizes.pop())
    elif isinstance(data, Tensor):
        data = _Sized(len(data))
    return DistributedSampler(data, num_replicas=world_size(), rank=rank(), shuffle=shuffle,
                              seed=seed, drop_last=False)


# ---- metrics ---------------------------------------------------------------------------
def _is_number(v) -> bool:
    if isinstance(v, Tensor):
        return v.numel() == 1
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def all_reduce_metrics(metrics: Mapping[str, object], op: str = "sum") -> Dict[str, object]:
    """A copy of ``metrics`` with every number summed (``op="sum"``) or averaged
    (``op="mean"``) over the ranks; other values are left as they are.  Ints stay ints
    under "sum".  Every rank must pass the same keys (one collective for all of them).
    Outside a process group: a plain copy.
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
    out = dict(metrics)
    keys = [k for k, v in out.items() if _is_number(v)]
    if not is_distributed() or not keys:
        return out
    # float64: counts stay exact up to 2**53
    t = torch.tensor([float(out[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    if op == "mean":
        t /= dist.get_world_size()
    for k, v in zip(keys, t.tolist()):
        out[k] = int(round(v)) if op == "sum" and isinstance(metrics[k], int) else v
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any: ranks must stop training together,
    or the others wait forever in their next all-reduce."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` outside a
    process group."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def has_sharded_parameters(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` is a DTensor (FSDP2 shards): its bytes are not
    all on this rank."""
    return any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
               for p in model.parameters())


# ---- DDP -------------------------------------------------------------------------------
def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the parameters that require grad: what one DDP step all-reduces."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def ddp_ignored_names(model: nn.Module) -> List[str]:
    """Names DDP should leave alone: the frozen buffers of expanded BatchNorms (they never
    change, so broadcasting them at every forward would be waste) and trainable parameters
    with no elements (a BatchNorm left without new channels never uses its empty
    ``weight_new``; DDP would wait for its gradient and fail at the next step)."""
    from ..nn.norm import _ExpandedBatchNorm

    names = [n for n, p in model.named_parameters() if p.requires_grad and p.numel() == 0]
    for path, m in model.named_modules():
        if isinstance(m, _ExpandedBatchNorm):
            names += [f"{path}.{b}" if path else b
                      for b, _ in m.named_buffers(recurse=False) if b.endswith("_frozen")]
    return names


def _is_fsdp2(model: nn.Module) -> bool:
    cls = _fsdp_module_class()
    return cls is not None and isinstance(model, cls)


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """``model`` under DistributedDataParallel, without ``find_unused_parameters``.

    A model already wrapped by DDP or sharded by FSDP2 comes back unchanged.  On CUDA the
    module's device becomes ``device_ids``.  Frozen BatchNorm buffers and empty trainable
    parameters are excluded (:func:`ddp_ignored_names`); frozen parameters are broadcast
    from rank 0 once, at wrapping, and never again.  ``ddp_kwargs`` go to DDP.
    """
    if isinstance(model, DistributedDataParallel) or _is_fsdp2(model):
        return model
    if not _initialized():
        raise RuntimeError("wrap_ddp needs a process group: start the script with torchrun and "
                           "call torch.distributed.init_process_group() first")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("wrap_ddp: the model has no trainable parameters (requires_grad=True)")
    device = trainable[0].device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
    ignore = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    ignore.update(ddp_ignored_names(model))
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignore))
    ddp_kwargs.setdefault("find_unused_parameters", False)
    return DistributedDataParallel(model, **ddp_kwargs)


def sync_batchnorm(model: nn.Module, process_group=None, enabled: bool = True) -> nn.Module:
    """Every expanded BatchNorm of ``model`` normalises its newest channels, in training
    mode, with the statistics of all ranks' batches together (``process_group``: None for
    the default group), as ``nn.SyncBatchNorm`` does for a whole BatchNorm; the frozen
    channels keep their pretrained map.  Outside a process group of several ranks nothing
    changes.  ``enabled=False`` turns it off again.  Returns ``model``.

    The statistics take two all-reduces of C floats a layer in forward and two in backward
    (see ``expanse_fast.nn.norm_sync``).  Plain ``nn.BatchNorm`` layers of the model are
    left alone (``nn.SyncBatchNorm.convert_sync_batchnorm`` converts those, on GPUs).
    """
    from ..nn.norm import _ExpandedBatchNorm

    for m in unwrap(model).modules():
        if isinstance(m, _ExpandedBatchNorm):
            m.sync_batch_stats = bool(enabled)
            m.sync_group = process_group if enabled else None
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 modules are their own module)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class AllReduceCounter:
    """A DDP communication hook that does what DDP does by default (mean of the gradient
    buckets over the ranks) and counts what it sends: ``bytes``, ``buckets`` and
    ``steps`` (backward passes) since the last ``reset()``.
    ``AllReduceCounter().attach(ddp)`` before the first step."""

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.reset()

    def reset(self):
        self.bytes = self.buckets = self.steps = 0

    def attach(self, ddp: DistributedDataParallel) -> "AllReduceCounter":
        ddp.register_comm_hook(self, AllReduceCounter._hook)
        return self

    @staticmethod
    def _hook(state, bucket):  # no annotations: DDP checks them against real types
        buf = bucket.buffer()  # the flattened gradients of the bucket's parameters
        state.bytes += buf.numel() * buf.element_size()
        state.buckets += 1
        state.steps += int(bucket.is_last())
        buf.div_(dist.get_world_size(state.process_group))
        work = dist.all_reduce(buf, group=state.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])


# ---- FSDP2 -----------------------------------------------------------------------------
def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
        return fully_shard
    except ImportError:
        pass
    try:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
        return fully_shard
    except ImportError:
        return None


def _fsdp_module_class():
    for where in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            return getattr(__import__(where, fromlist=["FSDPModule"]), "FSDPModule")
        except (ImportError, AttributeError):
            continue
    return None


def wrap_fsdp2(model: nn.Module, shard_frozen: bool = True, **fsdp_kwargs) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (``fully_shard``): one unit per expanded layer,
    then the root, so at most one layer's full weights are gathered at a time.

    Frozen and trainable tensors of a layer share its unit; only gradients that exist (the
    trainable ones) are reduce-scattered.  ``shard_frozen=False`` keeps frozen parameters
    whole on every rank (``ignored_params``): no all-gather for them, but full memory.
    Read results with ``p.full_tensor()`` (parameters become DTensors).  Folded BatchNorms
    (``fold_batchnorms``) are unfolded: FSDP2 gathers each layer's tensors in its own unit.
    """
    fully_shard = _fully_shard()
    if fully_shard is None:
        raise RuntimeError(f"FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6 "
                           f"(2.4 as torch.distributed._composable.fsdp); this is torch "
                           f"{torch.__version__}. Use wrap_ddp instead.")
    if not _initialized():
        raise RuntimeError("wrap_fsdp2 needs a process group: start the script with torchrun "
                           "and call torch.distributed.init_process_group() first")
    # Empty trainable tensors (a layer left without new units) cannot be reduce-scattered:
    # FSDP2 leaves them alone.  shard_frozen=False leaves the frozen ones alone too.
    ignored = {p for p in model.parameters()
               if (p.requires_grad and p.numel() == 0) or not (shard_frozen or p.requires_grad)}
    if ignored:
        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise RuntimeError(f"wrap_fsdp2 keeps empty trainable tensors (and frozen ones "
                               f"with shard_frozen=False) out of FSDP2 with fully_shard("
                               f"ignored_params=...), which torch {torch.__version__} lacks")
        fsdp_kwargs["ignored_params"] = ignored | set(fsdp_kwargs.get("ignored_params") or ())
    from ..nn.blocks import ExpandedBlocks
    from ..nn.conv import ExpandedConv2d
    from ..nn.norm import _ExpandedBatchNorm

    for m in list(model.modules()):
        if isinstance(m, ExpandedConv2d):
            # A conv that folds the BatchNorm after it (fold_batchnorms) reads that
            # BatchNorm's frozen weight and bias in its own forward, outside the BatchNorm's
            # unit, where they are shards: apart again, each layer computes its own part.
            m.unfold_batchnorm()
        if m is not model and isinstance(m, (ExpandedBlocks, _ExpandedBatchNorm)):
            fully_shard(m, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model
