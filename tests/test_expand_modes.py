"""What expand() and load_expansion() carry over besides the weights: each swapped-in layer
takes the training mode of the module it replaces, the old inputs' gradient is skipped
only where no layer is coupled, hooks keep fused and folded pairs apart, and the plain
models of a bare widened layer are plain layers."""
import copy

import pytest
import torch
from torch import nn

import expanse_fast as xf


def _set_trainable(model, seed=0):
    """Nonzero values in every trainable tensor (the coupling blocks start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _bn_mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("fuse", [False, True])
def test_layers_take_the_mode_of_the_model(tmp_path, fuse):
    torch.manual_seed(0)
    base = _bn_mlp().eval()
    big = xf.expand(base, width=2, new_classes=1, fuse=fuse)
    assert not any(m.training for m in big.modules())
    path = str(tmp_path / "e.safetensors")
    xf.save_expansion(big, path)
    loaded = xf.load_expansion(base, path, fuse=fuse)
    assert not any(m.training for m in loaded.modules())
    stats = loaded[1].running_mean_new.clone()
    with torch.no_grad():
        x = torch.randn(5, 4)
        assert torch.equal(loaded(x), big(x))
        loaded(torch.randn(1, 4))  # one sample: fine in eval mode
    assert torch.equal(loaded[1].running_mean_new, stats)
    assert all(m.training for m in xf.expand(_bn_mlp().train(), width=2).modules())


def _merged_grads(big, x):
    """Gradients of every merged (plain) weight: the float64 reference of the staircase."""
    merged = xf.merge(big)
    merged(x).square().sum().backward()
    return merged


def _check_coupling_grads(big, x, names):
    """Each named layer's coupling-block gradient against the merged model's."""
    _set_trainable(big)
    ref = _merged_grads(big, x)
    big(x).square().sum().backward()
    for name in names:
        layer = big.get_submodule(name)
        o_f, i_f = layer.weight_frozen.shape[0], sum(layer.in_groups[:-1])
        want = ref.get_submodule(name).weight.grad[:o_f, i_f:]  # frozen rows, newest inputs
        assert want.abs().sum() > 0
        torch.testing.assert_close(layer.weight_couple.grad, want.reshape_as(
            layer.weight_couple.grad), rtol=1e-10, atol=1e-10)


def test_coupled_model_with_a_depthwise_conv_keeps_coupling_gradients():
    """A depthwise conv is always isolated, but inside a coupled model its old channels
    depend on the coupling blocks before it: their gradient must pass through."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    big = xf.expand(base, width=2, new_classes=1, mode="coupled")
    layers = xf.expanded_layers(big)
    assert layers["3"].mode == "isolated"
    assert not any(m.skip_old_input_grad for m in layers.values())
    _check_coupling_grads(big, torch.randn(2, 3, 5, 5, dtype=torch.float64), ["2"])


def test_reexpanding_a_coupled_model_keeps_it_coupled():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5),
                         nn.ReLU(), nn.Linear(5, 3)).double().eval()
    once = xf.expand(base, width=2, new_classes=1, mode="coupled")
    twice = xf.expand(once, width=2, new_classes=1)  # the default mode: "isolated"
    layers = xf.expanded_layers(twice)
    assert [getattr(m, "mode", "bn") for m in layers.values()] == [
        "coupled", "coupled", "bn", "coupled"]
    assert not any(m.skip_old_input_grad for m in layers.values())
    # in training mode, where the BatchNorm's frozen channels stay in eval mode (merge()'s
    # plain BatchNorm would not): the reference forms every old input's gradient
    twice.train()
    _set_trainable(twice)
    ref = copy.deepcopy(twice)
    for m in xf.expanded_layers(ref).values():
        m.skip_old_input_grad = False
    x = torch.randn(8, 4, dtype=torch.float64)
    for model in (twice, ref):
        model(x).square().sum().backward()
    assert ref[2].weight_couple.grad.abs().sum() > 0
    for (name, p), q in zip(twice.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_isolated_models_skip_the_old_input_gradient():
    big = xf.expand(_bn_mlp().eval(), width=2, new_classes=1)
    assert all(m.skip_old_input_grad for m in xf.expanded_layers(big).values())


def test_plain_models_of_a_bare_widened_layer(tmp_path):
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    layer = xf.ExpandedLinear.from_linear(base, new_in=0, new_out=2)
    x = torch.randn(2, 4)
    src, merged = xf.source_model(layer, task=0), xf.merge(layer)
    assert type(src) is nn.Linear and type(merged) is nn.Linear
    assert torch.equal(src(x), base(x))
    # merge's one dense product sums in BLAS's order for 5 outputs, the layer's blocks in
    # theirs for 3 and 2 (on an AMD EPYC CPU they differ in the last bit)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-6, atol=1e-6)
    assert not layer.weight_frozen.requires_grad  # the layer itself is unchanged
    path = str(tmp_path / "e.safetensors")
    xf.save_expansion(layer, path)
    loaded = xf.load_expansion(base, path)
    assert type(loaded) is xf.ExpandedLinear and torch.equal(loaded(x), layer(x))


def test_parametrized_layers_are_refused_by_name():
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    torch.nn.utils.parametrizations.weight_norm(base[0])
    with pytest.raises(xf.ExpansionError, match=r"module '0' has a parametrization .*"
                                                r"remove_parametrizations"):
        xf.expand(base, width=2)


def test_a_hooked_activation_is_not_fused():
    """Fusing swaps the activation module for a stand-in: its hooks would be lost."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    seen = []
    base[1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    big = xf.expand(base, width=2, new_classes=1)
    assert type(big[1]) is nn.ReLU and big[0].activation == ""
    big(torch.randn(2, 4))
    assert seen == [(2, 8)]


@pytest.mark.parametrize("hook", ["backward", "backward_pre"])
def test_layers_with_backward_hooks_are_not_fused(hook):
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    big = xf.expand(base, width=2, new_classes=1, fuse=False)
    getattr(big[0], f"register_full_{hook}_hook")(lambda *args: None)
    assert xf.fuse_activations(big) == []
    assert type(big[1]) is nn.ReLU and big[0].activation == ""


class _WithExtraState(nn.Module):
    """A parameter-free module whose extra state is no tensor."""

    def forward(self, x):
        return x

    def get_extra_state(self):
        return {"note": "not a tensor"}

    def set_extra_state(self, state):
        pass


def test_extra_state_that_is_no_tensor_is_left_out_of_the_fingerprint(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), _WithExtraState(), nn.ReLU(), nn.Linear(6, 3)).eval()
    big = xf.expand(base, width=2, new_classes=1)
    path = str(tmp_path / "e.safetensors")
    xf.save_expansion(big, path)
    x = torch.randn(3, 4)
    assert torch.equal(xf.load_expansion(base, path)(x), big(x))


def test_subclasses_of_the_base_layers_load(tmp_path):
    """torch's NonDynamicallyQuantizableLinear (nn.MultiheadAttention's out_proj) is a
    Linear: expand() widens it, so load_expansion() takes it too."""
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
    torch.manual_seed(0)
    base = nn.Sequential(NonDynamicallyQuantizableLinear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    big = xf.expand(base.eval(), width=2, new_classes=1)
    path = str(tmp_path / "e.safetensors")
    xf.save_expansion(big, path)
    x = torch.randn(3, 4)
    assert torch.equal(xf.load_expansion(base, path)(x), big(x))


def test_a_compiled_wrapper_saves_and_loads_as_its_model(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    big = xf.expand(base, width=2, new_classes=1)
    path = str(tmp_path / "e.safetensors")
    xf.save_expansion(torch.compile(big), path)  # (compiles nothing: no call)
    x = torch.randn(3, 6)
    assert torch.equal(xf.load_expansion(base, path)(x), big(x))
    assert torch.equal(xf.load_expansion(torch.compile(copy.deepcopy(base)), path)(x), big(x))


def test_a_coupled_file_that_says_skip_loads_with_the_gradients(tmp_path):
    """Files written before the rule could mark layers of a coupled model as skipping their
    old inputs' gradient; loading forms it anyway."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from expanse_fast import checkpoint as ck
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5),
                         nn.ReLU(), nn.Linear(5, 3)).eval()
    big = xf.expand(base, width=2, new_classes=1, mode="coupled")
    path = str(tmp_path / "e.safetensors")
    xf.save_expansion(big, path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["layers"])
    for rec in layers.values():
        rec["skip_old_input_grad"] = True
    meta["layers"] = json.dumps(layers, sort_keys=True)
    meta["payload_digest"] = ck._payload_digest(meta["layers"], tensors)
    save_file(tensors, path, metadata=meta)
    loaded = xf.load_expansion(base, path)
    assert not any(m.skip_old_input_grad for m in xf.expanded_layers(loaded).values())
