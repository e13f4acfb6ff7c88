"""Save and load an expansion: only what the pretrained model does not already hold.

The file is safetensors (never pickle).  Its header holds every widened layer's layout,
a fingerprint of the pretrained (task-0) weights the expansion was trained on, and a digest
of the payload, so a different base model, a truncated file or a tampered one are refused
before anything is built.  Loading returns a new model: the base is never modified.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import os
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from .backend_choice import BACKENDS
from .hashing import hash_tensor as _hash_tensor
from .expand import (_freeze_all_but_newest, expanded_layers, plain_layer,
                     set_old_input_grads, watch_input_grad)
from .fold import fold_batchnorms
from .fuse import fuse_activations
from .graph import ExpansionError, swap_modules as _swap_all
from .nn import ExpandedBatchNorm1d, ExpandedBatchNorm2d, ExpandedConv2d, ExpandedLinear
from .nn.conv import _explicit_padding
from .nn.norm import _ExpandedBatchNorm

FORMAT = "expanse_fast.expansion"
VERSION = 1


class ExpansionFileError(ValueError):
    """The expansion file does not fit the base model, or is damaged."""


def fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of a plain model
    (a module's extra state that is not a tensor is no weight: left out)."""
    return _state_digest(_unwrapped(model).state_dict())


def _state_digest(state: Dict[str, object]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        if isinstance(t, Tensor):
            _hash_tensor(h, name, t)
    return h.hexdigest()


def task0_fingerprint(big: nn.Module) -> str:
    """``fingerprint(source_model(big, task=0))``, one layer's plain copy at a time: no copy
    of the whole model (on a GPU near its memory, saving an expansion must not double it)."""
    return _task0_view(big)[0]


def _task0_view(big: nn.Module) -> Tuple[str, list]:
    """(fingerprint, module table) of ``source_model(big, task=0)``, one layer's plain copy
    at a time.  Every path a module is reachable under counts, as in a state dict (a module
    kept under two names is hashed under both, as ``fingerprint`` of the base hashes it)."""
    state: Dict[str, Tensor] = {}
    plain_modules, replaced, restored = [], [], set()
    for path, m in _unwrapped(big).named_modules(remove_duplicate=False):
        prefix = path + "." if path else ""
        if any(prefix.startswith(r) for r in replaced):
            continue  # inside a replaced module: its plain copy holds it
        plain = plain_layer(m, 0)
        plain_modules.append((path, m if plain is None else plain))
        if isinstance(m, _ExpandedBatchNorm):
            restored.add(path)
        if plain is None:
            m._save_to_state_dict(state, prefix, False)  # its own tensors, not its children's
            continue
        state.update(plain.state_dict(prefix=prefix))
        replaced.append(prefix)
    return _state_digest(state), _module_table(plain_modules, restored)


# ---- what the base computes beside its tensors -------------------------------------------
# The module table holds [path, class, settings] for every module of the task-0 model.  On
# load, the classes must agree, and each setting both sides hold (a later version may record
# more: those the file lacks are not compared, so a file loads in the next version).
_WIDENED_KINDS = ((nn.Linear, "Linear"), (nn.Conv2d, "Conv2d"),
                  (nn.BatchNorm1d, "BatchNorm1d"), (nn.BatchNorm2d, "BatchNorm2d"))

# Attributes that set what torch's own activation, pooling, resizing, flattening and
# normalisation modules compute, by the names torch gives them (attributes, not repr(),
# whose wording may change between versions).  A user's module is compared by its class
# alone: it may keep run-time state under such names (a remembered input size, say).
_FUNCTION_SETTINGS = ("approximate", "negative_slope", "alpha", "beta", "lambd", "threshold",
                      "min_val", "max_val", "dim", "start_dim", "end_dim", "kernel_size",
                      "stride", "padding", "dilation", "ceil_mode", "count_include_pad",
                      "divisor_override", "output_size", "norm_type", "scale_factor", "size",
                      "mode", "align_corners", "eps", "normalized_shape", "upscale_factor",
                      "downscale_factor")
_UNCOMPARED = object()


def _setting(v):
    """A setting in one spelling: numbers as floats (1 and 1.0 compute alike), a tuple whose
    entries are all one value as that value (MaxPool2d(2) is MaxPool2d((2, 2)));
    ``_UNCOMPARED`` for what is no plain value."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (list, tuple)):
        items = [_setting(a) for a in v]
        if any(a is _UNCOMPARED for a in items):
            return _UNCOMPARED
        if items and all(json.dumps(a) == json.dumps(items[0]) for a in items):
            return items[0]
        return items
    return _UNCOMPARED


def _padding(conv: nn.Conv2d):
    """A conv's padding as numbers ('same' and 'valid' resolved, as a widened conv and its
    plain copy hold them)."""
    try:
        return _setting(_explicit_padding(conv))
    except ValueError:  # ('same' that pads asymmetrically: no widened conv takes it)
        return _setting(conv.padding)


def _describe(m: nn.Module, restored: bool) -> Tuple[str, Dict[str, object], bool]:
    """(a module's class, the settings that change what it computes, whether it is of a kind
    expand() widens).  Those kinds are named by their torch class (a subclass widens as its
    base class does).  A BatchNorm's momentum trains, it does not compute; the eps of a
    widened one (``restored``) is in the file's layer table and comes back from there."""
    for cls, name in _WIDENED_KINDS:
        if isinstance(m, cls):
            settings: Dict[str, object] = {}
            if isinstance(m, nn.Conv2d):
                settings = {"stride": _setting(m.stride), "padding": _padding(m),
                            "dilation": _setting(m.dilation), "groups": float(m.groups),
                            "padding_mode": m.padding_mode}
            elif cls is not nn.Linear and not restored:
                settings = {"eps": float(m.eps)}
            return name, settings, True
    settings = {}
    if type(m).__module__.startswith("torch.nn."):
        for a in _FUNCTION_SETTINGS:
            v = _setting(m.__dict__[a]) if a in m.__dict__ else _UNCOMPARED
            if v is not _UNCOMPARED:
                settings[a] = v
    return type(m).__name__, settings, False


def _module_table(pairs, restored) -> list:
    """[path, class, settings] of every module of a plain (task-0) model, by path; what sits
    inside a widened kind (its plain copy has nothing inside) is left out.  ``restored``:
    the paths of the BatchNorms whose eps the file restores."""
    table, inside = [], []
    for path, m in pairs:
        prefix = path + "." if path else ""
        if any(prefix.startswith(r) for r in inside):
            continue
        kind, settings, widened = _describe(m, path in restored)
        table.append([path, kind, settings])
        if widened:
            inside.append(prefix)
    return table


def _spelled(kind: str, settings: dict) -> str:
    inner = ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
    return f"{kind}({inner})" if inner else kind


def _module_table_differences(base_table: list, saved_table: list) -> list:
    """Lines naming each module where the base differs from the model the expansion was
    trained on: another class, or another value of a setting both record."""
    base = {p: (k, s) for p, k, s in base_table}
    saved = {p: (k, s) for p, k, s in saved_table}
    lines = []
    for path in list(saved) + [p for p in base if p not in saved]:
        name = repr(path) if path else "(the model itself)"
        if path not in base:
            lines.append(f"{name}: the base has none, the expansion's base had "
                         f"{_spelled(*saved[path])}")
        elif path not in saved:
            lines.append(f"{name}: the base has {_spelled(*base[path])}, the expansion's base "
                         "had none")
        else:
            (kind, mine), (was, theirs) = base[path], saved[path]
            shared = [k for k in theirs if k in mine]
            if kind != was or any(json.dumps(mine[k]) != json.dumps(theirs[k]) for k in shared):
                lines.append(f"{name}: the base has {_spelled(kind, mine)}, the expansion's "
                             f"base had {_spelled(was, theirs)}")
    return lines


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``, DataParallel or DistributedDataParallel wrapper holds
    (their state dicts' names carry a prefix that the plain model's lack), else ``model``."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and isinstance(model, wrappers):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _payload_digest(layers_json: str, tensors: Dict[str, Tensor]) -> str:
    h = hashlib.sha256(layers_json.encode())
    for name, t in sorted(tensors.items()):
        _hash_tensor(h, name, t)
    return h.hexdigest()


# ---- what each layer stores beyond the base --------------------------------------------------
def _layer_record(m: nn.Module) -> dict:
    """One layer's entry of the layer table: its layout, and what else a loaded copy must
    share with it to compute the same (a BatchNorm's eps and momentum, which the base's
    may not have; a layer's pinned backend, kept only where one is pinned)."""
    if isinstance(m, _ExpandedBatchNorm):
        kind = "bn2d" if isinstance(m, ExpandedBatchNorm2d) else "bn1d"
        return {"type": kind, "groups": list(m.groups),
                "skip_old_input_grad": bool(m.skip_old_input_grad),
                "eps": float(m.eps),
                "momentum": None if m.momentum is None else float(m.momentum)}
    rec = {"type": "conv2d" if isinstance(m, ExpandedConv2d) else "linear",
           "in_groups": list(m.in_groups), "out_groups": list(m.out_groups), "mode": m.mode,
           "skip_old_input_grad": bool(m.skip_old_input_grad)}
    if m.backend is not None:
        rec["backend"] = m.backend
    return rec


def _layer_tensors(m: nn.Module) -> Dict[str, Tensor]:
    """The tensors of one widened layer that the base model does not hold."""
    out: Dict[str, Tensor] = {}
    if isinstance(m, _ExpandedBatchNorm):
        n0 = m.groups[0]
        for name in ("weight_new", "bias_new", "running_mean_new", "running_var_new",
                     "num_batches_tracked_new"):
            if getattr(m, name) is not None:
                out[name] = getattr(m, name)
        for name in ("weight_frozen", "bias_frozen", "running_mean_frozen", "running_var_frozen"):
            t = getattr(m, name)
            if t is not None and t.shape[0] > n0:
                out[name + ".later"] = t[n0:]
        return out
    o0, i0 = m.out_groups[0], m.in_groups[0]
    for name in ("weight_new", "bias_new", "weight_couple"):
        if getattr(m, name) is not None:
            out[name] = getattr(m, name)
    if m.weight_frozen.shape[0] > o0:  # groups trained by earlier expansions
        out["weight_frozen.later_rows"] = m.weight_frozen[o0:]
        if m.bias_frozen is not None:
            out["bias_frozen.later_rows"] = m.bias_frozen[o0:]
    if m.mode == "coupled" and m.weight_frozen.shape[1] > i0:
        out["weight_frozen.later_cols"] = m.weight_frozen[:o0, i0:]
    return out


def _module_arg(what: str, name: str, model) -> nn.Module:
    """``model`` unwrapped, refused by name where it is no module or holds no data."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: {name} must be a torch.nn.Module, got {type(model).__name__}")
    model = _unwrapped(model)
    meta = next((n for n, t in model.state_dict().items()
                 if isinstance(t, Tensor) and t.is_meta), None)
    if meta is not None:
        raise ValueError(f"{what}: {name}'s tensor {meta!r} is on the meta device: it holds no "
                         "values to hash or save; load or initialise the weights first")
    return model


def _file_arg(what: str, path) -> str:
    """``path`` as a string, refused where it cannot name a file."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"{what}: path must be a str or os.PathLike, got "
                        f"{type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError(f"{what}: path is empty")
    if os.path.isdir(path) or path.endswith((os.sep, "/")):
        raise IsADirectoryError(f"{what}: {path!r} is a folder; give the file's name")
    return path


def save_expansion(big: nn.Module, path: str) -> None:
    """Write the expansion of ``big`` (trainable and later-task tensors, layouts, base
    fingerprint and module table) to ``path`` atomically (write, then rename)."""
    from safetensors.torch import save_file

    big = _module_arg("save_expansion", "big", big)
    path = _file_arg("save_expansion", path)
    layers = expanded_layers(big)
    if not layers:
        raise ValueError("save_expansion: the model holds no expanded layer")
    records = {p: _layer_record(m) for p, m in layers.items()}
    tensors = {f"{p}.{n}": t.detach().cpu().contiguous()
               for p, m in layers.items() for n, t in _layer_tensors(m).items()}
    layers_json = json.dumps(records, sort_keys=True)
    base_fingerprint, base_modules = _task0_view(big)
    header = {
        "format": FORMAT, "version": str(VERSION), "layers": layers_json,
        "base_fingerprint": base_fingerprint,
        "base_modules": json.dumps(base_modules),
        "payload_digest": _payload_digest(layers_json, tensors),
    }
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"save_expansion: no folder {folder!r} to write {path!r} in")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except Exception as exc:  # (safetensors reports I/O failures as its own error type)
        raise OSError(f"save_expansion: could not write {path!r}: {type(exc).__name__}: "
                      f"{exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str) -> Tuple[dict, Dict[str, Tensor]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_expansion: no file at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated or not safetensors at all
        raise ExpansionFileError(f"{path!r} is not a readable expansion file (truncated or "
                                 f"corrupt?): {type(exc).__name__}: {exc}") from exc
    if header.get("format") != FORMAT:
        raise ExpansionFileError(f"{path!r} is not an expanse_fast expansion file")
    if header.get("version") != str(VERSION):
        raise ExpansionFileError(f"{path!r} has format version {header.get('version')}, this "
                                 f"expanse_fast reads version {VERSION}")
    if _payload_digest(header.get("layers", ""), tensors) != header.get("payload_digest"):
        raise ExpansionFileError(f"{path!r} was modified after it was written: its contents do "
                                 "not match its digest")
    return header, tensors


def _dtype_hint(base_model: nn.Module, tensors: Dict[str, Tensor]) -> str:
    """Where the base's floating dtypes differ from the file's (a base moved with .to()
    before loading), a hint that says so; else nothing."""
    def floats(ts):
        return {str(t.dtype).replace("torch.", "") for t in ts if t.is_floating_point()}
    base, saved = floats(base_model.state_dict().values()), floats(tensors.values())
    if not saved or base == saved:
        return ""
    return (f" (the base holds {'/'.join(sorted(base))} tensors, the file "
            f"{'/'.join(sorted(saved))}: load on the base in the dtype it was saved from, "
            "then convert)")


def _widths(rec: dict, key: str) -> bool:
    v = rec.get(key)
    return (isinstance(v, list) and len(v) >= 2
            and all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in v))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_records(records) -> None:
    """A layer table of the right form (the digest catches damage, not a file written by
    another tool or edited on purpose): refuse it before anything is built."""
    if not isinstance(records, dict):
        raise ExpansionFileError("the file's layer table is not a JSON object")
    if not records:
        raise ExpansionFileError("the file's layer table is empty: it holds no expanded layer")
    for path, rec in records.items():
        ok = isinstance(rec, dict) and rec.get("type") in ("linear", "conv2d", "bn1d", "bn2d")
        if ok and rec["type"].startswith("bn"):
            # files written before BatchNorm had the flag lack it: the full gradient then;
            # and before eps and momentum were kept, the base BatchNorm's hold
            ok = (_widths(rec, "groups")
                  and isinstance(rec.get("skip_old_input_grad", False), bool)
                  and ("eps" not in rec or (_number(rec["eps"]) and rec["eps"] > 0))
                  and ("momentum" not in rec or rec["momentum"] is None
                       or _number(rec["momentum"])))
        elif ok:
            ok = (_widths(rec, "in_groups") and _widths(rec, "out_groups")
                  and len(rec["in_groups"]) == len(rec["out_groups"])
                  and rec.get("mode") in ("isolated", "coupled")
                  and isinstance(rec.get("skip_old_input_grad"), bool)
                  and rec.get("backend", "torch") in BACKENDS[1:])
        if not ok:
            raise ExpansionFileError(f"the file's record of layer {path!r} is malformed: "
                                     f"{json.dumps(rec)[:120]}")


def _check_sizes(records: dict, tensors: Dict[str, Tensor]) -> None:
    """Every width of the layer table against the sizes of the tensors the file holds, before
    any layer is built (a width edited to 10**12 would otherwise be allocated first)."""
    def dim(path: str, name: str, d: int) -> int:
        t = tensors.get(f"{path}.{name}")
        if t is None or t.dim() <= d:
            raise ExpansionFileError(f"the file lacks tensor {path + '.' + name!r} of layer "
                                     f"{path!r}, or it has too few dimensions")
        return t.shape[d]

    for path, rec in records.items():
        if rec["type"].startswith("bn"):
            groups = rec["groups"]
            want = [("running_mean_new", 0, groups[-1])]
            if sum(groups[1:-1]):  # (stored where earlier expansions added channels)
                want.append(("running_mean_frozen.later", 0, sum(groups[1:-1])))
        else:
            ins, outs = rec["in_groups"], rec["out_groups"]
            want = [("weight_new", 0, outs[-1])]
            if sum(outs[1:-1]):
                want.append(("weight_frozen.later_rows", 0, sum(outs[1:-1])))
            cols = dim(path, "weight_new", 1)
            # a depthwise conv's new filters read one channel each, as many as they are
            if cols != sum(ins) and not (rec["type"] == "conv2d" and cols == 1
                                         and sum(ins) <= sum(outs)):
                raise ExpansionFileError(f"layer {path!r}: the layer table says {sum(ins)} "
                                         f"inputs, its weight_new has {cols} columns")
        for name, d, n in want:
            if dim(path, name, d) != n:
                raise ExpansionFileError(f"layer {path!r}: the layer table says {n}, its "
                                         f"{name} has {dim(path, name, d)} along dim {d}")


def _build_layer(base_layer: nn.Module, rec: dict, path: str) -> nn.Module:
    kind = rec["type"]
    expect = {"linear": nn.Linear, "conv2d": nn.Conv2d, "bn1d": nn.BatchNorm1d,
              "bn2d": nn.BatchNorm2d}[kind]
    if not isinstance(base_layer, expect):  # (as expand() widens subclasses too)
        raise ExpansionFileError(f"layer {path!r}: the file expects a {expect.__name__}, the base "
                                 f"model has a {type(base_layer).__name__}")
    if kind in ("bn1d", "bn2d"):
        groups = rec["groups"]
        cls = ExpandedBatchNorm2d if kind == "bn2d" else ExpandedBatchNorm1d
        if base_layer.num_features != groups[0]:
            raise ExpansionFileError(f"layer {path!r}: base has {base_layer.num_features} "
                                     f"channels, the file expects {groups[0]}")
        layer = cls.from_bn(base_layer, groups[1])
        for g in groups[2:]:
            layer.expand(g)
        layer.skip_old_input_grad = rec.get("skip_old_input_grad", False)
        layer.eps = float(rec.get("eps", layer.eps))
        if "momentum" in rec:
            layer.momentum = None if rec["momentum"] is None else float(rec["momentum"])
        return layer
    ins, outs = rec["in_groups"], rec["out_groups"]
    base_in = base_layer.in_features if kind == "linear" else base_layer.in_channels
    base_out = base_layer.out_features if kind == "linear" else base_layer.out_channels
    if (base_in, base_out) != (ins[0], outs[0]):
        raise ExpansionFileError(f"layer {path!r}: base is {base_in}->{base_out}, the file "
                                 f"expects {ins[0]}->{outs[0]}")
    make = ExpandedLinear.from_linear if kind == "linear" else ExpandedConv2d.from_conv
    mode = rec["mode"]
    layer = make(base_layer, ins[1], outs[1], mode=mode)
    for i, o in zip(ins[2:], outs[2:]):
        layer.expand(i, o)
    layer.skip_old_input_grad = rec["skip_old_input_grad"]
    layer.backend = rec.get("backend")
    return layer


def _fill(layer: nn.Module, path: str, tensors: Dict[str, Tensor]):
    wanted = _layer_tensors(layer)
    with torch.no_grad():
        for name, dst in wanted.items():
            key = f"{path}.{name}"
            if key not in tensors:
                raise ExpansionFileError(f"the file lacks tensor {key!r}")
            src = tensors[key]
            if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                raise ExpansionFileError(
                    f"tensor {key!r}: the file holds {src.dtype} {tuple(src.shape)}, the layer "
                    f"needs {dst.dtype} {tuple(dst.shape)}")
            dst.copy_(src)  # dst may be a view into a frozen tensor: writes land in place


def _check_base_modules(base_model: nn.Module, header: dict, records: dict) -> None:
    """Refuse a base whose modules compute otherwise than the one the expansion was trained
    on while holding the same tensors (another activation, stride, padding or BatchNorm eps).
    Files written before the module table was kept lack it: not checked."""
    if "base_modules" not in header:
        return
    try:
        saved = json.loads(header["base_modules"])
        ok = isinstance(saved, list) and all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
            and isinstance(e[1], str) and isinstance(e[2], dict) for e in saved)
    except ValueError:
        ok = False
    if not ok:
        raise ExpansionFileError("the file's module table (base_modules) is malformed")
    named = list(base_model.named_modules(remove_duplicate=False))
    widened_bns = {id(m) for p, m in named
                   if records.get(p, {}).get("type", "").startswith("bn")}
    restored = {p for p, m in named if id(m) in widened_bns}  # (every name of each)
    table = _module_table(named, restored)
    lines = _module_table_differences(table, saved)
    if lines:
        more = f"; and {len(lines) - 3} more" if len(lines) > 3 else ""
        raise ExpansionFileError(
            "the base holds the expansion's pretrained weights but its modules compute "
            f"otherwise: {'; '.join(lines[:3])}{more}")


def load_expansion(base_model: nn.Module, path: str, fuse: bool = True) -> nn.Module:
    """Rebuild the expanded model saved at ``path`` on top of ``base_model``.

    Refuses a base whose weights differ from the one the expansion was trained on, and any
    truncated or modified file.  ``base_model`` is never changed.  ``fuse``: fuse activation
    modules (ReLU, GELU, SiLU) into the layers before them and fold BatchNorms' frozen
    channels into the convs before them, as ``expand()`` does (skipped for a model torch.fx
    cannot trace).
    """
    base_model = _module_arg("load_expansion", "base_model", base_model)
    widened = next(iter(expanded_layers(base_model)), None)
    if widened is not None:
        raise ValueError(f"load_expansion: base_model is already expanded (layer {widened!r}); "
                         "pass the pretrained model the expansion was made from (or "
                         "xf.source_model(big))")
    header, tensors = _read(path)
    got, want = fingerprint(base_model), str(header.get("base_fingerprint", ""))
    if got != want:
        raise ExpansionFileError(
            f"this expansion was trained on another base model: base fingerprint "
            f"{got[:16]}... differs from the file's {want[:16] or '(none)'}..."
            f"{_dtype_hint(base_model, tensors)}")
    try:
        records = json.loads(header.get("layers", ""))
    except ValueError as exc:
        raise ExpansionFileError(f"the file's layer table is missing or not JSON: {exc}") \
            from exc
    _check_records(records)
    _check_sizes(records, tensors)
    _check_base_modules(base_model, header, records)
    big = copy.deepcopy(base_model)
    modules = dict(big.named_modules())
    used, swaps = set(), []
    for path_, rec in records.items():
        if path_ not in modules:
            raise ExpansionFileError(f"the base model has no module {path_!r}")
        try:
            layer = _build_layer(modules[path_], rec, path_)
        except ExpansionFileError:
            raise
        except (ValueError, TypeError) as exc:  # the layers' own checks (depthwise, ...)
            raise ExpansionFileError(f"layer {path_!r}: the file's layout does not fit the "
                                     f"base layer: {exc}") from exc
        _fill(layer, path_, tensors)
        used.update(f"{path_}.{n}" for n in _layer_tensors(layer))
        swaps.append((path_, layer))
    extra = set(tensors) - used
    if extra:
        raise ExpansionFileError(f"the file holds tensors no layer takes: {sorted(extra)[:5]}")
    big = _swap_all(big, swaps)
    if any(getattr(m, "mode", "") == "coupled" for m in expanded_layers(big).values()):
        set_old_input_grads(big)  # (a file written before that rule may say skip)
    _freeze_all_but_newest(big)
    watch_input_grad(big)
    if fuse:
        try:
            fuse_activations(big)
            fold_batchnorms(big)
        except ExpansionError:
            pass  # not traceable: the unfused model computes the same
    return big
