"""ExpandedBatchNorm at its edges: an empty batch (folded or not, train or eval), batched
gradients in training mode, an eval output's gradient taken after a training call, and a
BatchNorm without running statistics (refused by name)."""
import copy

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

import expanse_fast as xf


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_an_empty_batch_runs_forward_and_backward(fuse, train):
    """As for the plain model (aten's BatchNorm takes an empty batch; its raw ops, which
    the folded BatchNorm calls, refused it in train mode and hit SIGFPE in eval)."""
    torch.manual_seed(0)
    big = xf.expand(_cnn(), width=2, new_classes=2, fuse=fuse, backend="torch").train(train)
    assert (big[0].folded_batchnorm is not None) == fuse
    stats = big[1].running_mean_new.clone()
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    y = big(x)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in big.parameters():
        if p.requires_grad:
            assert p.grad is None or not p.grad.abs().sum()
    assert torch.equal(big[1].running_mean_new, stats)


@pytest.mark.parametrize("fuse", [True, False])
def test_an_eval_outputs_gradient_after_a_training_call(fuse):
    """The backward of an eval call reads that call's statistics, not the buffers a
    training call moved in between."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(),
                      nn.Linear(4 * 25, 2)).eval()
    x_val, x_tr = torch.randn(2, 3, 5, 5), torch.randn(8, 3, 5, 5) * 3 + 1
    big = xf.expand(m, width=2, new_classes=2, fuse=fuse, backend="torch")
    ref = copy.deepcopy(big).eval()
    want = torch.autograd.grad(ref(x_val).sum(), ref[0].weight_new)[0]
    big.eval()
    y_val = big(x_val)
    big.train()
    big(x_tr)  # moves running_mean_new / running_var_new in place
    got = torch.autograd.grad(y_val.sum(), big[0].weight_new)[0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("dims", [2, 3])
def test_batched_gradients_in_training_mode(dims):
    torch.manual_seed(0)
    bn = xf.ExpandedBatchNorm1d.from_bn(nn.BatchNorm1d(4).double(), new=2).train()
    bn.skip_old_input_grad = False
    x = torch.randn((5, 6) + (3,) * (dims - 2), dtype=torch.float64)
    loop = jacobian(lambda t: bn(t), x, vectorize=False)
    torch.testing.assert_close(jacobian(lambda t: bn(t), x, vectorize=True), loop)


@pytest.mark.parametrize("affine", [True, False])
def test_a_batchnorm_without_running_statistics_is_refused_by_name(affine):
    bn = nn.BatchNorm2d(4, affine=affine, track_running_stats=False)
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        xf.ExpandedBatchNorm2d.from_bn(bn, 2)


@pytest.mark.parametrize("task", [True, 1.0, -1, 2, "0"])
def test_a_task_index_is_a_whole_number_in_range(task):
    bn = xf.ExpandedBatchNorm1d.from_bn(nn.BatchNorm1d(4), new=2)
    layer = xf.ExpandedLinear.from_linear(nn.Linear(3, 4), 1, 2)
    with pytest.raises(ValueError, match=r"task must be an int in 0\.\.1, got"):
        bn.to_bn(task)
    with pytest.raises(ValueError, match=r"task must be an int in 0\.\.1, got"):
        layer.to_linear(task)


def test_from_bn_takes_its_own_kind_of_batchnorm():
    with pytest.raises(TypeError, match=r"ExpandedBatchNorm2d.from_bn expects an "
                                        r"nn.BatchNorm2d, got BatchNorm1d"):
        xf.ExpandedBatchNorm2d.from_bn(nn.BatchNorm1d(4), 2)
    with pytest.raises(TypeError, match=r"ExpandedBatchNorm1d.from_bn expects an "
                                        r"nn.BatchNorm1d, got BatchNorm2d"):
        xf.ExpandedBatchNorm1d.from_bn(nn.BatchNorm2d(4), 2)


def test_a_failed_expand_leaves_the_batchnorm_as_it_was(monkeypatch):
    """The frozen statistics and the groups were set before the new channels' tensors
    were made: an allocation that failed (out of memory) left a layer that could not run."""
    bn = xf.ExpandedBatchNorm1d.from_bn(nn.BatchNorm1d(4), 2)
    x = torch.randn(5, 6)
    bn.eval()
    before = bn(x)
    state = {k: v.clone() for k, v in bn.state_dict().items()}

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(torch, "ones", out_of_memory)
    with pytest.raises(RuntimeError, match="can't allocate"):
        bn.expand(3)
    monkeypatch.undo()
    assert bn.groups == (4, 2)
    assert {k: v.shape for k, v in bn.state_dict().items()} == {k: v.shape for k, v in
                                                                state.items()}
    assert torch.equal(bn(x), before)


def test_reset_running_stats_resets_only_the_new_channels_and_recomputes_them():
    """What update_bn would do after SWA/EMA (it passes expanded BatchNorms by): reset,
    a cumulative average over the data, and the new channels' statistics are the data's."""
    torch.manual_seed(3)
    bn = xf.ExpandedBatchNorm1d.from_bn(nn.BatchNorm1d(4).eval(), 3)
    with torch.no_grad():
        bn.running_mean_frozen.normal_()
        bn.running_mean_new.normal_()
    frozen = {k: v.clone() for k, v in bn.state_dict().items() if k.endswith("_frozen")}
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean_new, torch.zeros(3))
    assert torch.equal(bn.running_var_new, torch.ones(3))
    assert int(bn.num_batches_tracked_new) == 0
    data = [torch.randn(16, 7) * 2 + 1 for _ in range(4)]
    bn.momentum = None
    bn.train()
    with torch.no_grad():
        for batch in data:
            bn(batch)
    whole = torch.cat(data)[:, 4:]
    torch.testing.assert_close(bn.running_mean_new, whole.mean(0), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, frozen[k]) for k, v in bn.state_dict().items() if k in frozen)
