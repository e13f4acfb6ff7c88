"""save_expansion and load_expansion with the bases and arguments users hand them: a module
kept under two names, a DataParallel wrapper, a base with the same weights that computes
otherwise (another activation, padding, stride), a base on the meta device or already
expanded, and paths that name no file.  Each refusal names the problem and leaves the base
as it was.  (tests/test_checkpoint.py covers round trips and damaged files.)
"""
import json
import os

import pytest
import torch
from torch import nn

import expanse_fast as xf
from expanse_fast.checkpoint import ExpansionFileError


def _cnn(act=nn.ReLU, stride=1, padding=1, second_padding_mode="zeros"):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=stride, padding=padding), nn.BatchNorm2d(6), act(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode=second_padding_mode),
        nn.BatchNorm2d(6), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 4)).eval()


def _saved(tmp_path, base, **kw):
    big = xf.expand(base, width=0.5, new_classes=2, **kw).eval()
    path = str(tmp_path / "e.safetensors")
    xf.save_expansion(big, path)
    return big, path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k])
                                                  for k in before)


class _Aliased(nn.Module):
    """A module under two names (an alias kept for old code): state dicts list it twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 4)
        self.tokens = self.emb

    def forward(self, t):
        return self.fc(self.emb(t))


def test_a_module_under_two_names_loads_back(tmp_path):
    base = _Aliased().eval()
    big, path = _saved(tmp_path, base)
    loaded = xf.load_expansion(base, path).eval()
    t = torch.tensor([[1, 2, 3], [9, 0, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(t), big(t))
        assert torch.equal(loaded(t)[..., :4], base(t))


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_a_wrapped_model_saves_as_the_model_it_wraps(tmp_path, wrap):
    base = _cnn()
    big = xf.expand(base, width=0.5, new_classes=2).eval()
    wrapped = nn.DataParallel(big) if wrap == "DataParallel" else torch.compile(big)
    path = str(tmp_path / "w.safetensors")
    xf.save_expansion(wrapped, path)
    loaded = xf.load_expansion(base, path).eval()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x), big(x))


@pytest.mark.parametrize("other, where, what", [
    (dict(act=nn.GELU), "'2'", "GELU(approximate=\"none\"), the expansion's base had ReLU"),
    (dict(act=nn.SiLU), "'5'", "SiLU, the expansion's base had ReLU"),
    (dict(padding=0), "'0'", "padding=0.0"),
    (dict(stride=2), "'0'", "stride=2.0"),
    (dict(second_padding_mode="reflect"), "'3'", "padding_mode=\"reflect\""),
])
def test_a_base_with_the_weights_but_other_settings_is_refused(tmp_path, other, where, what):
    big, path = _saved(tmp_path, _cnn())
    base = _cnn(**other)  # the same tensors (same seed, same shapes)
    before = _state(base)
    with pytest.raises(ExpansionFileError, match="modules compute otherwise") as info:
        xf.load_expansion(base, path)
    assert where in str(info.value) and what in str(info.value)
    assert _unchanged(base, before)


def test_padding_same_and_valid_match_their_numbers(tmp_path):
    """A widened conv holds 'same' and 'valid' as numbers: the check compares numbers."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding="valid"), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 2)).eval()
    big, path = _saved(tmp_path, base)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(xf.load_expansion(base, path).eval()(x), big(x))
    explicit = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                             nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    explicit.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert torch.equal(xf.load_expansion(explicit.eval(), path).eval()(x), big(x))


def test_a_widened_batchnorm_takes_its_eps_from_the_file(tmp_path):
    """The file keeps each widened BatchNorm's eps (a user may set it after expand()): a base
    whose eps differs loads, and computes as the saved model did."""
    big, path = _saved(tmp_path, _cnn())
    base = _cnn()
    base[1].eps = 0.1
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(xf.load_expansion(base, path).eval()(x), big(x))


def test_files_without_a_module_table_still_load(tmp_path):
    """Files written before the module table was kept are loaded unchecked."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    _, path = _saved(tmp_path, _cnn())
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta.pop("base_modules"))[0] == ["", "Sequential", {}]
    old = str(tmp_path / "old.safetensors")
    save_file(tensors, old, metadata=meta)
    gelu = _cnn(act=nn.GELU)
    loaded = xf.load_expansion(gelu, old).eval()  # unchecked: built on the base given
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x)[:, :4], gelu(x))
    with pytest.raises(ExpansionFileError, match="compute otherwise"):
        xf.load_expansion(_cnn(act=nn.GELU), path)


def test_a_malformed_module_table_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    _, path = _saved(tmp_path, _cnn())
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for table in ("not json", json.dumps({"0": "Conv2d"}), json.dumps([["0", 3]]),
                  json.dumps([["0", "Conv2d"]])):
        meta["base_modules"] = table
        bad = str(tmp_path / "bad.safetensors")
        save_file(tensors, bad, metadata=meta)
        with pytest.raises(ExpansionFileError, match="module table"):
            xf.load_expansion(_cnn(), bad)


def test_an_expanded_or_meta_base_is_refused_by_name(tmp_path):
    big, path = _saved(tmp_path, _cnn())
    with pytest.raises(ValueError, match="already expanded.*source_model"):
        xf.load_expansion(big, path)
    with torch.device("meta"):
        meta = _cnn()
    with pytest.raises(ValueError, match="'0.weight' is on the meta device"):
        xf.load_expansion(meta, path)
    with pytest.raises(TypeError, match="base_model must be a torch.nn.Module, got str"):
        xf.load_expansion("model", path)


def test_save_names_bad_arguments_and_leaves_no_file(tmp_path):
    big = xf.expand(_cnn(), width=0.5, new_classes=2)
    with pytest.raises(TypeError, match="big must be a torch.nn.Module, got NoneType"):
        xf.save_expansion(None, str(tmp_path / "x.safetensors"))
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        xf.save_expansion(big, 3)
    with pytest.raises(ValueError, match="path is empty"):
        xf.save_expansion(big, "")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        xf.save_expansion(big, str(tmp_path))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        xf.save_expansion(big, str(tmp_path / "sub") + "/")
    with pytest.raises(FileNotFoundError, match="no folder"):
        xf.save_expansion(big, str(tmp_path / "missing" / "x.safetensors"))
    assert os.listdir(tmp_path) == []


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def refuse(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a partial file, as a full disk leaves
            f.write(b"\0" * 8)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    big = xf.expand(_cnn(), width=0.5, new_classes=2)
    target = tmp_path / "x.safetensors"
    with pytest.raises(OSError, match="could not write .*x.safetensors.*No space left"):
        xf.save_expansion(big, target)
    assert os.listdir(tmp_path) == []


class _AliasedBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=(2,), dilation=(1,))
        self.bn = nn.BatchNorm2d(8)
        self.alias_bn = self.bn
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_an_aliased_batchnorm_and_one_element_strides_load(tmp_path):
    base = _AliasedBatchNorm().eval()
    big, path = _saved(tmp_path, base)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(xf.load_expansion(base, path).eval()(x), big(x))


@pytest.mark.parametrize("change, what", [
    (lambda m: setattr(m[2], "negative_slope", 0.3), "LeakyReLU(negative_slope=0.3)"),
    (lambda m: setattr(m[3], "kernel_size", 3), "MaxPool2d(kernel_size=3.0"),
])
def test_other_settings_of_unwidened_modules_are_refused(tmp_path, change, what):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6),
                             nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(6, 4)).eval()
    _, path = _saved(tmp_path, make())
    other = make()
    change(other)
    with pytest.raises(ExpansionFileError, match="compute otherwise") as info:
        xf.load_expansion(other, path)
    assert what in str(info.value)


@pytest.mark.parametrize("saved, loaded", [
    (nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d((1, 1))),
    (nn.MaxPool2d(2), nn.MaxPool2d((2, 2), stride=(2, 2))),
    (nn.ELU(alpha=1), nn.ELU()),
    (nn.LeakyReLU(0), nn.LeakyReLU(0.0)),
])
def test_settings_spelled_otherwise_but_computing_alike_load(tmp_path, saved, loaded):
    def make(pool):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), pool,
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    big, path = _saved(tmp_path, make(saved))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(xf.load_expansion(make(loaded), path).eval()(x), big(x))


class _RemembersSize(nn.Module):
    """A user's module with run-time state under a name torch's modules use for a setting."""

    def __init__(self):
        super().__init__()
        self.size = None

    def forward(self, x):
        self.size = x.shape[-2:]
        return x


def test_a_users_module_is_compared_by_its_class_alone(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(_RemembersSize(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    big = xf.expand(base, width=0.5, new_classes=2).eval()
    x = torch.randn(2, 3, 6, 6)
    big(x)  # its size is (6, 6) now; the base's is None
    path = str(tmp_path / "u.safetensors")
    xf.save_expansion(big, path)
    with torch.no_grad():
        assert torch.equal(xf.load_expansion(base, path).eval()(x), big(x))
