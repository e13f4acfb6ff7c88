"""expand(): earlier tasks stay exact, only the newest group trains, and a step equals a
float64 dense model whose gradients are masked to the trainable rows."""
import copy

import pytest
import torch
from torch import nn

import expanse_fast as xf
from models import SmallResNet, authors_mlp, pretrained

MLP_WIDTH = {"0": 106, "2": 48}  # 784-150-80-5 -> 784-256-128-10


def _frozen_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _train(big, x, y, steps=50):
    opt = torch.optim.AdamW([p for p in big.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    big.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(big(x), y).backward()
        opt.step()
    return opt


def _mlp_case():
    base = pretrained(authors_mlp(), torch.randn(64, 784))
    x, y = torch.randn(96, 784), torch.randint(0, 10, (96,))
    return base, dict(width=MLP_WIDTH, new_classes=5), x, y, 5


def _cnn_case():
    base = pretrained(SmallResNet(), torch.randn(16, 1, 12, 12))
    x, y = torch.randn(24, 1, 12, 12), torch.randint(0, 8, (24,))
    return base, dict(width=0.25, new_classes=3), x, y, 5


@pytest.mark.parametrize("case", [_mlp_case, _cnn_case], ids=["mlp", "resnet"])
def test_source_task_exact_before_and_after_training(case):
    base, kw, x, y, n_old = case()
    reference = copy.deepcopy(base)
    base_out = base(x)
    big = xf.expand(base, **kw)
    frozen = _frozen_state(big)
    for phase in ("before", "after"):
        if phase == "after":
            opt = _train(big, x, y)
            # optimizer state exists for trainable tensors only
            assert all(p.requires_grad for p in opt.state)
            assert all(p.grad is None for n, p in big.named_parameters() if not p.requires_grad)
        for train_mode in (True, False):
            big.train(train_mode)
            with torch.no_grad():
                out = big(x)
            torch.testing.assert_close(out[:, :n_old], base_out, rtol=1e-5, atol=1e-5)
        src = xf.source_model(big, task=0).eval()
        assert torch.equal(src(x), base_out), f"source_model not bit-exact {phase} training"
    for n, t in _frozen_state(big).items():
        assert torch.equal(t, frozen[n]), f"frozen tensor {n} changed"
    # the user's model is untouched
    for (n, a), b in zip(base.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), n
    assert not any(isinstance(m, xf.ExpandedLinear) for m in base.modules())


def test_mlp_shape_matches_the_paper():
    base, kw, x, _, _ = _mlp_case()
    big = xf.expand(base, **kw)
    assert big[0].out_groups == (150, 106) and big[0].in_groups == (784, 0)
    assert big[2].in_groups == (150, 106) and big[2].out_groups == (80, 48)
    assert big[4].out_features == 10 and big(x).shape == (96, 10)


@pytest.mark.parametrize("case", [_mlp_case, _cnn_case], ids=["mlp", "resnet"])
def test_three_successive_expansions_keep_every_task(case):
    base, kw, x, y, n_old = case()
    models, outs = [base], [base(x).detach()]
    for task in range(1, 4):
        big = xf.expand(models[-1], **kw)
        _train(big, x, y % big(x).shape[1], steps=10)
        big.eval()
        models.append(big)
        outs.append(big(x).detach())
        for k in range(task):  # every earlier task, through the widened model and back
            n_k = outs[k].shape[1]
            torch.testing.assert_close(big(x)[:, :n_k], outs[k], rtol=1e-5, atol=1e-5)
            src = xf.source_model(big, task=k).eval()
            if k == 0:
                assert torch.equal(src(x), outs[0])
            else:
                torch.testing.assert_close(src(x), outs[k], rtol=1e-5, atol=1e-5)
    trainable = {n.rpartition(".")[2] for n, p in models[-1].named_parameters() if p.requires_grad}
    assert trainable <= {"weight_new", "bias_new"}


def test_merge_gives_the_same_outputs():
    base, kw, x, y, _ = _cnn_case()
    big = xf.expand(base, **kw)
    _train(big, x, y, steps=5)
    big.eval()
    merged = xf.merge(big).eval()
    assert not any(isinstance(m, (xf.ExpandedConv2d, xf.ExpandedLinear)) for m in merged.modules())
    torch.testing.assert_close(merged(x), big(x), rtol=1e-5, atol=1e-5)
    # the upper (old reads new) blocks are zeros
    w = merged.layer1.conv1.weight
    assert torch.count_nonzero(w[:8, 8:]) == 0 and torch.count_nonzero(w[8:, 8:]) > 0


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
@pytest.mark.parametrize("case", [_mlp_case, _cnn_case], ids=["mlp", "resnet"])
def test_one_step_equals_masked_dense_float64(case, mode):
    base, kw, x, y, _ = case()
    base = base.double()
    x = x.double()
    big = xf.expand(base, mode=mode, **kw)
    # A plain BatchNorm cannot hold frozen (eval) and training channels at once, so the
    # dense reference and the widened model both normalise with running statistics here.
    training = not any(isinstance(m, nn.BatchNorm2d) for m in base.modules())
    big.train(training)
    dense = xf.merge(big).train(training)
    # the mask: a dense entry is trainable iff it belongs to a trainable block
    masks = {}
    for path, layer in xf.expanded_layers(big).items():
        if isinstance(layer, (xf.ExpandedLinear, xf.ExpandedConv2d)):
            m = torch.zeros_like(layer.dense_weight())
            m[layer.layout.frozen_out:] = 1
            if layer.weight_couple is not None:
                m[: layer.layout.frozen_out, layer.layout.frozen_in:] = 1
            masks[f"{path}.weight"] = m
            bm = torch.zeros(layer.layout.out_features, dtype=m.dtype)
            bm[layer.layout.frozen_out:] = 1
            masks[f"{path}.bias"] = bm
        else:
            bm = torch.zeros(layer.num_features, dtype=torch.float64)
            bm[-layer.groups[-1]:] = 1 if layer.groups[-1] else 0
            masks[f"{path}.weight"] = masks[f"{path}.bias"] = bm
    for opt_cls in (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),):
        big_opt = opt_cls([p for p in big.parameters() if p.requires_grad])
        dense_opt = opt_cls(list(dense.parameters()))
        for model, opt in ((big, big_opt), (dense, dense_opt)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        for name, p in dense.named_parameters():
            p.grad.mul_(masks[name])
        big_opt.step()
        dense_opt.step()
    after = xf.merge(big)
    for (name, p), q in zip(dense.named_parameters(), after.parameters()):
        err = (p - q).norm() / p.norm()
        assert err < 1e-10, f"{name}: relative error {err:.2e}"
    # the dense model's BatchNorm running stats of the new channels moved the same way
    for (name, b), c in zip(dense.named_buffers(), after.buffers()):
        if b.is_floating_point():
            assert (b - c).norm() <= 1e-10 * max(1.0, b.norm()), name


def test_width_forms():
    base = authors_mlp()
    assert xf.expand(base, width=0.5)[0].out_groups == (150, 75)
    assert xf.expand(base, width=7)[2].out_groups == (80, 7)
    big = xf.expand(base, width={"2": 9}, new_classes=2)
    assert big[0].out_groups == (150, 0) and big[2].in_groups == (150, 0)
    assert big[2].out_groups == (80, 9) and big[4].in_groups == (80, 9)
    assert big[4].out_groups == (5, 2)
    assert xf.expand(base, new_classes=0)[4].out_groups == (5, 0)
    # head= names an output layer: a hidden one would widen the layers after it with the
    # new "classes" and the model's output with them
    with pytest.raises(xf.ExpansionError, match=r"head='2' feeds '4' \(Linear\)"):
        xf.expand(base, new_classes=1, head="2")


def test_multiple_of_rounds_every_hidden_layers_new_units_up():
    base = authors_mlp()  # 784-150-80-5
    big = xf.expand(base, width=0.1, new_classes=3, multiple_of=8)
    assert big[0].out_groups == (150, 16) and big[2].in_groups == (150, 16)  # 15 -> 16
    assert big[2].out_groups == (80, 8) and big[4].in_groups == (80, 8)  # 8 stays 8
    assert big[4].out_groups == (5, 3)  # the head's new classes are what they are
    # every width form; a layer given none keeps none
    big = xf.expand(base, width={"2": 9}, new_classes=2, multiple_of=4)
    assert big[0].out_groups == (150, 0) and big[2].out_groups == (80, 12)
    assert xf.expand(base, width=7, multiple_of=1)[2].out_groups == (80, 7)
    # convolutions and the layers that follow a widened tensor (BatchNorm, residual adds)
    torch.manual_seed(0)
    res = xf.expand(SmallResNet(classes=5, width=6).eval(), width=0.5, new_classes=2,
                    multiple_of=4)
    layers = {n: m for n, m in res.named_modules() if isinstance(m, xf.ExpandedConv2d)}
    assert all(g[-1] % 4 == 0 for m in layers.values() for g in (m.out_groups,)), layers
    assert res.fc.out_groups == (5, 2)
    x = torch.randn(2, 1, 9, 9)
    assert res(x).shape == (2, 7)
    for bad in (0, -8):
        with pytest.raises(ValueError, match=f"multiple_of must be >= 1, got {bad}"):
            xf.expand(base, multiple_of=bad)
    for bad in (2.0, True, "8"):
        with pytest.raises(TypeError, match="multiple_of must be an int, got"):
            xf.expand(base, multiple_of=bad)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.digits, self.letters = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.digits(h), self.letters(h)


def test_head_names_one_of_several_outputs():
    base = TwoHeads().eval()
    x = torch.randn(5, 6)
    big = xf.expand(base, width=2, new_classes=2, head="digits")
    assert big.digits.out_groups == (3, 2) and big.letters.out_groups == (4, 2)
    digits, letters = big(x)
    assert torch.equal(digits[:, :3], base(x)[0]) and torch.equal(letters[:, :4], base(x)[1])


class TokensThenMLP(nn.Module):
    """Parameterised modules that read only the data (an Embedding of tokens, a LayerNorm
    of the raw features): nothing they compute is widened, so they stay as they are."""

    def __init__(self):
        super().__init__()
        self.emb, self.norm = nn.Embedding(10, 4), nn.LayerNorm(6)
        self.fc1, self.fc2 = nn.Linear(2 * 4 + 6, 12), nn.Linear(12, 3)

    def forward(self, tokens, feats):
        h = torch.cat([self.emb(tokens).flatten(1), self.norm(feats)], dim=1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_parameterised_modules_on_the_data_stay_frozen_and_exact(tmp_path):
    base = TokensThenMLP().eval()
    tokens, feats = torch.randint(0, 10, (16, 2)), torch.randn(16, 6)
    y = torch.randint(0, 5, (16,))
    ref = base(tokens, feats)
    big = xf.expand(base, width=4, new_classes=2)
    assert type(big.emb) is nn.Embedding and type(big.norm) is nn.LayerNorm
    assert not any(p.requires_grad for p in [*big.emb.parameters(), *big.norm.parameters()])
    assert big.fc1.in_groups == (14, 0)
    frozen = _frozen_state(big)
    opt = torch.optim.AdamW([p for p in big.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    big.train()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(big(tokens, feats), y).backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in big.named_parameters() if n in frozen)
    assert torch.equal(xf.source_model(big, task=0)(tokens, feats), ref)
    torch.testing.assert_close(big.eval()(tokens, feats)[:, :3], ref, rtol=0, atol=1e-6)
    xf.save_expansion(big, tmp_path / "e.safetensors")
    again = xf.load_expansion(base, tmp_path / "e.safetensors")
    assert torch.equal(again(tokens, feats), big(tokens, feats))


def test_a_module_with_buffers_on_the_data_is_refused_by_name():
    """Its buffers may change in training mode (running statistics), which would move the
    old task: refused as before, the buffers named."""
    model = nn.Sequential(nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
                          nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(xf.ExpansionError, match=r"module '0' \(InstanceNorm1d\) holds "
                                                r"parameters.*buffers \['running_mean'"):
        xf.expand(model, width=2)


class SizeFromLogits(nn.Module):
    """A second output whose layer takes only the batch size from the head's logits."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.proj = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 4)

    def forward(self, x):
        f = torch.relu(self.body(x))
        logits = self.head(f)
        return logits, self.proj(f.reshape(logits.shape[0], -1))


def test_a_size_read_off_the_head_is_no_feature_path():
    base = SizeFromLogits().eval()
    x = torch.randn(4, 6)
    big = xf.expand(base, width=2, new_classes=2, head="head", example_inputs=(x,))
    logits, other = big(x)
    assert logits.shape == (4, 5) and torch.equal(logits[:, :3], base(x)[0])
    assert torch.equal(other[:, :4], base(x)[1])
