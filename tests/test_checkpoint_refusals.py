"""load_expansion refuses files that pass the digest but do not make sense: written by another
tool, edited on purpose (the digest recomputed), or of a layout the base cannot take.  Each
is an ExpansionFileError with a clear message, and the base model is left untouched.
(tests/test_checkpoint.py covers round trips, damaged files, edited headers and other bases.)
"""
import copy
import json

import pytest
import torch
from torch import nn

import expanse_fast as xf
from expanse_fast import checkpoint as ck
from expanse_fast.checkpoint import ExpansionFileError


def _base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    model.train()
    with torch.no_grad():
        model(torch.randn(5, 3, 6, 6))  # BatchNorm statistics that are not the defaults
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = _base()
    big = xf.expand(base, width=0.5, new_classes=2)
    path = str(tmp_path_factory.mktemp("exp") / "good.safetensors")
    xf.save_expansion(big, path)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return base, big, path, meta, tensors


def _forge(tmp_path, meta, tensors, layers=None, edit_tensors=None, edit_meta=None):
    """A file with a valid digest over edited contents."""
    from safetensors.torch import save_file
    meta, tensors = dict(meta), dict(tensors)
    if layers is not None:
        meta["layers"] = layers if isinstance(layers, str) else json.dumps(layers,
                                                                           sort_keys=True)
    if edit_tensors is not None:
        tensors = edit_tensors(tensors)
    meta["payload_digest"] = ck._payload_digest(meta["layers"], tensors)
    if edit_meta is not None:
        edit_meta(meta)
    path = str(tmp_path / "forged.safetensors")
    save_file(tensors, path, metadata=meta)
    return path


def _refused(base, path, match):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    types = [type(m) for m in base.modules()]
    with pytest.raises(ExpansionFileError, match=match):
        xf.load_expansion(base, path)
    after = base.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [type(m) for m in base.modules()] == types


def _layers(meta, fn):
    layers = json.loads(meta["layers"])
    fn(layers)
    return layers


def _first(kind):
    def pick(layers):
        return next(r for r in layers.values() if r["type"] == kind)
    return pick


LINEAR, CONV, BN = _first("linear"), _first("conv2d"), _first("bn2d")

MALFORMED = {
    "unknown layer type": lambda ls: LINEAR(ls).update(type="lstm"),
    "missing mode": lambda ls: LINEAR(ls).pop("mode"),
    "negative width": lambda ls: LINEAR(ls).update(out_groups=[3, -1]),
    "one group only": lambda ls: LINEAR(ls).update(in_groups=[4], out_groups=[3]),
    "unknown mode": lambda ls: CONV(ls).update(mode="sideways"),
    "widths not a list": lambda ls: CONV(ls).update(in_groups="34"),
    "fractional widths": lambda ls: CONV(ls).update(in_groups=[3.0, 0.5]),
    "boolean widths": lambda ls: CONV(ls).update(in_groups=[True, False]),
    "unequal group counts": lambda ls: CONV(ls).update(in_groups=[3, 0, 1]),
    "flag not a bool": lambda ls: LINEAR(ls).update(skip_old_input_grad="yes"),
    "bn with one group": lambda ls: BN(ls).update(groups=[4]),
    "unknown backend": lambda ls: CONV(ls).update(backend="gpu"),
    "backend auto": lambda ls: LINEAR(ls).update(backend="auto"),  # (a pin names one)
    "backend not a string": lambda ls: LINEAR(ls).update(backend=1),
    "negative eps": lambda ls: BN(ls).update(eps=-1e-5),
    "eps not a number": lambda ls: BN(ls).update(eps="1e-5"),
    "infinite eps": lambda ls: BN(ls).update(eps=float("inf")),
    "momentum not a number": lambda ls: BN(ls).update(momentum="fast"),
    "boolean momentum": lambda ls: BN(ls).update(momentum=True),
    "record not an object": lambda ls: ls.update({"0": [1, 2]}),
}


@pytest.mark.parametrize("what", sorted(MALFORMED))
def test_refuses_malformed_layer_records(saved, tmp_path, what):
    base, _, _, meta, tensors = saved
    path = _forge(tmp_path, meta, tensors, layers=_layers(meta, MALFORMED[what]))
    _refused(base, path, r"record of layer .* is malformed")


@pytest.mark.parametrize("text,match", [("{not json", "not JSON"),
                                        ("[1, 2]", "not a JSON object")])
def test_refuses_a_layer_table_that_is_not_an_object(saved, tmp_path, text, match):
    base, _, _, meta, tensors = saved
    _refused(base, _forge(tmp_path, meta, tensors, layers=text), match)


def test_refuses_a_missing_fingerprint(saved, tmp_path):
    base, _, _, meta, tensors = saved
    path = _forge(tmp_path, meta, tensors, edit_meta=lambda m: m.pop("base_fingerprint"))
    _refused(base, path, r"another base model.*\(none\)")


def test_refuses_a_layout_the_base_layer_cannot_take(saved, tmp_path):
    """A depthwise conv whose new output group is not multiplier x new input group."""
    base, _, _, meta, tensors = saved
    layers = json.loads(meta["layers"])
    dw = layers["3"]
    assert dw["type"] == "conv2d" and dw["in_groups"][0] == 4
    dw["out_groups"] = [4, dw["in_groups"][1] + 1]

    def one_filter_more(t):  # the tensors agree with the table: the layer's own check refuses
        t = dict(t)
        for name in ("3.weight_new", "3.bias_new"):
            t[name] = torch.cat([t[name], t[name][:1]])
        return t
    _refused(base, _forge(tmp_path, meta, tensors, layers=layers, edit_tensors=one_filter_more),
             r"layer '3': the file's layout does not fit the base layer")


def test_refuses_wider_layout_than_the_tensors(saved, tmp_path):
    base, _, _, meta, tensors = saved
    layers = _layers(meta, lambda ls: LINEAR(ls).update(
        out_groups=[3, LINEAR(ls)["out_groups"][1] + 1]))
    _refused(base, _forge(tmp_path, meta, tensors, layers=layers),
             r"the layer table says \d+, its weight_new has \d+ along dim 0")


@pytest.mark.parametrize("edit", ["huge_out", "huge_in", "huge_bn", "no_layers", "empty"])
def test_refuses_a_table_its_tensors_do_not_back(saved, tmp_path, edit):
    """Widths are checked against the file's tensors before a layer is built: a width
    edited to 10**12 is refused, not allocated; a table missing or empty is refused."""
    base, _, _, meta, tensors = saved
    huge = 10 ** 12
    if edit == "huge_out":
        layers = _layers(meta, lambda ls: LINEAR(ls).update(out_groups=[3, huge]))
        match = r"the layer table says 1000000000000, its weight_new has"
    elif edit == "huge_in":
        layers = _layers(meta, lambda ls: LINEAR(ls).update(
            in_groups=[LINEAR(ls)["in_groups"][0], huge]))
        match = r"the layer table says \d+ inputs, its weight_new has \d+ columns"
    elif edit == "huge_bn":
        layers = _layers(meta, lambda ls: BN(ls).update(groups=[BN(ls)["groups"][0], huge]))
        match = r"the layer table says 1000000000000, its running_mean_new has"
    elif edit == "no_layers":
        layers = None
        match = r"layer table is missing or not JSON"
    else:
        layers, match = {}, r"layer table is empty"
    edit_meta = (lambda m: m.pop("layers")) if edit == "no_layers" else None
    if edit == "no_layers":  # the digest over an absent table: the empty string's
        meta = dict(meta, layers="")
    _refused(base, _forge(tmp_path, meta, tensors, layers=layers, edit_meta=edit_meta), match)


def test_refuses_tensors_of_another_dtype(saved, tmp_path):
    base, _, _, meta, tensors = saved
    path = _forge(tmp_path, meta, tensors, edit_tensors=lambda t: {
        k: v.double() if v.is_floating_point() else v for k, v in t.items()})
    _refused(base, path, r"the file holds torch.float64 .* the layer needs torch.float32")


def test_refuses_a_base_in_another_dtype(saved):
    base, _, path, _, _ = saved
    _refused(copy.deepcopy(base).double(), path,
             r"another base model.*the base holds float64 tensors, the file float32")


def test_save_names_a_missing_folder(saved, tmp_path):
    _, big, _, _, _ = saved
    target = tmp_path / "no" / "such" / "e.safetensors"
    with pytest.raises(FileNotFoundError, match=r"no folder .*no/such.* to write"):
        xf.save_expansion(big, str(target))


def test_refuses_missing_and_extra_tensors(saved, tmp_path):
    base, _, _, meta, tensors = saved
    drop = sorted(tensors)[0]
    _refused(base, _forge(tmp_path, meta, tensors, edit_tensors=lambda t: {
        k: v for k, v in t.items() if k != drop}), rf"lacks tensor '{drop}'")
    _refused(base, _forge(tmp_path, meta, tensors, edit_tensors=lambda t: {
        **t, "6.extra": torch.ones(2)}), r"tensors no layer takes")


def test_a_faithful_rewrite_still_loads(saved, tmp_path):
    """The forging helper itself: the same contents re-written load, bit for bit."""
    base, big, _, meta, tensors = saved
    loaded = xf.load_expansion(base, _forge(tmp_path, meta, tensors))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), big(x))


def test_a_file_without_backend_or_bn_settings_takes_the_bases(saved, tmp_path):
    """Files written before the layer table kept pinned backends and BatchNorm settings:
    no backend pinned, the base BatchNorm's eps and momentum."""
    base, big, _, meta, tensors = saved

    def strip(layers):
        for rec in layers.values():
            for key in ("backend", "eps", "momentum"):
                rec.pop(key, None)
    loaded = xf.load_expansion(base, _forge(tmp_path, meta, tensors, layers=_layers(meta, strip)))
    layers = xf.expanded_layers(loaded)
    assert all(getattr(m, "backend", None) is None for m in layers.values())
    bn = next(m for m in layers.values() if hasattr(m, "momentum"))
    assert (bn.eps, bn.momentum) == (base[1].eps, base[1].momentum)
