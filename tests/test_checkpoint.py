"""save_expansion / load_expansion: bit-exact round trips, a file holding only what the base
lacks, and refusal (with the base untouched) of a wrong base or a damaged file."""
import copy
import json
import os
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf
from expanse_fast.checkpoint import ExpansionFileError


# ---- small models ------------------------------------------------------------------------------
def mlp():
    return nn.Sequential(nn.Linear(10, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 13),
                         nn.ReLU(), nn.Linear(13, 5))


class SmallResNet(nn.Module):
    """Stem, one residual block (BatchNorm, no conv bias), a depthwise conv, pooled head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        r = F.relu(self.bn1(self.conv1(h)))
        h = F.relu(self.bn2(self.conv2(r)) + h)
        h = F.relu(self.dw(h))
        return self.fc(torch.flatten(self.pool(h), 1))


MODELS = {"mlp": (mlp, (10,)), "cnn": (SmallResNet, (3, 7, 6))}


def _data(shape, n=6):
    return torch.randn(n, *shape)


def _pretrained(kind):
    """A base model whose BatchNorm statistics are not the defaults (a few train passes)."""
    make, shape = MODELS[kind]
    model = make()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(_data(shape) * 2 + 0.5)
    return model.eval()


def _train(big, shape, steps=3):
    """A few AdamW steps so every trainable tensor (and new BN statistics) is non-trivial."""
    opt = torch.optim.AdamW([p for p in big.parameters() if p.requires_grad], lr=0.05)
    big.train()
    for _ in range(steps):
        opt.zero_grad()
        big(_data(shape)).square().mean().backward()
        opt.step()
    big.eval()


def _grow(base, kind, mode, expansions):
    big = base
    for k in range(expansions):
        big = xf.expand(big, width=0.25 + 0.25 * k, new_classes=2 + k, mode=mode)
        _train(big, MODELS[kind][1])
    return big


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def _assert_unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v) and now[k].dtype == v.dtype, k
    assert [(n, type(m)) for n, m in model.named_modules()] == types


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from threads, and on a busy 2-core machine OpenMP's
    # spinning makes each small conv ~20x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "expansion.safetensors")


# ---- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("expansions", [1, 3])
@pytest.mark.parametrize("mode", ["isolated", "coupled"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_round_trip_is_bit_exact(kind, mode, expansions, path):
    base = _pretrained(kind)
    big = _grow(base, kind, mode, expansions)
    base_snap = _snapshot(base)
    xf.save_expansion(big, path)
    loaded = xf.load_expansion(base, path)
    _assert_unchanged(base, base_snap)
    assert loaded is not base

    # every parameter and buffer, bit for bit
    want, got = big.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # the same layers with the same layouts and gradient flags
    lay_want, lay_got = xf.expanded_layers(big), xf.expanded_layers(loaded)
    assert list(lay_got) == list(lay_want) and len(lay_want) > 0
    for p, m in lay_want.items():
        g = lay_got[p]
        assert type(g) is type(m)
        assert (g.in_groups, g.out_groups) == (m.in_groups, m.out_groups)
        assert len(m.in_groups) == expansions + 1
        assert g.skip_old_input_grad == m.skip_old_input_grad, p
        if not isinstance(m, (xf.ExpandedBatchNorm2d, xf.ExpandedBatchNorm1d)):
            assert g.mode == m.mode
    # frozen tensors do not require grad; the newest group (and coupling blocks) do
    trainable = ("weight_new", "bias_new", "weight_couple")
    for (n, p), (n2, q) in zip(big.named_parameters(), loaded.named_parameters()):
        assert n == n2 and q.requires_grad == p.requires_grad
        assert q.requires_grad == n.endswith(trainable), n
    assert any(q.requires_grad for q in loaded.parameters())

    # outputs equal, and one training step gives equal gradients
    shape = MODELS[kind][1]
    x = _data(shape, n=5)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), big.eval()(x))
    big.zero_grad(set_to_none=True)  # _train leaves its last gradients behind
    big.train(), loaded.train()
    big(x).square().sum().backward()
    loaded(x).square().sum().backward()
    for (n, p), (_, q) in zip(big.named_parameters(), loaded.named_parameters()):
        if p.requires_grad:
            assert torch.equal(q.grad, p.grad), n
        else:
            assert p.grad is None and q.grad is None, n

    # only the trainable and later-task tensors travel: the file's size is their size
    extra = (_nbytes(big.state_dict().values()) - _nbytes(base.state_dict().values()))
    size = os.path.getsize(path)
    assert _nbytes(p for p in big.parameters() if p.requires_grad) <= size
    assert size < 1.2 * extra + 16 * 1024


def test_round_trip_with_empty_groups(path):
    """width={name: n} leaves the other layers with empty new groups (zero-size tensors)."""
    base = _pretrained("mlp")
    big = xf.expand(base, width={"0": 3}, new_classes=0)
    _train(big, (10,))
    big = xf.expand(big, width={"3": 2}, new_classes=1)
    _train(big, (10,))
    assert big[0].out_groups == (24, 3, 0) and big[5].in_groups == (13, 0, 2)
    xf.save_expansion(big, path)
    loaded = xf.load_expansion(base, path)
    want, got = big.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x = _data((10,))
    with torch.no_grad():
        assert torch.equal(loaded(x), big(x))


@pytest.mark.parametrize("momentum", [0.05, None])
def test_round_trip_keeps_pinned_backends_and_batchnorm_settings(path, momentum):
    """What a loaded copy must share to compute and train as the saved model does, beyond
    its tensors: each layer's pinned backend, and each BatchNorm's eps and momentum (set
    here after expand(): the base's differ)."""
    base = _pretrained("cnn")
    big = xf.expand(base, width=0.25, new_classes=2, backend="torch")
    layers = xf.expanded_layers(big)
    layers["conv1"].backend = None  # one left to follow xf.set_backend
    for m in layers.values():
        if hasattr(m, "momentum"):
            m.eps, m.momentum = 1e-3, momentum
    _train(big, (3, 8, 8), steps=1)
    xf.save_expansion(big, path)
    loaded = xf.expanded_layers(xf.load_expansion(base, path))
    assert loaded.keys() == layers.keys()
    for name, m in layers.items():
        if hasattr(m, "momentum"):
            assert (loaded[name].eps, loaded[name].momentum) == (1e-3, momentum), name
        else:
            assert loaded[name].backend == m.backend, name
    assert loaded["conv1"].backend is None and loaded["fc"].backend == "torch"
    big.eval()
    x = _data((3, 8, 8))
    with torch.no_grad():
        assert torch.equal(xf.load_expansion(base, path).eval()(x), big(x))


def test_file_is_far_smaller_than_the_model(path):
    base = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).eval()
    big = xf.expand(base, width=4, new_classes=3)
    _train(big, (256,), steps=1)
    xf.save_expansion(big, path)
    size = os.path.getsize(path)
    trainable = _nbytes(p for p in big.parameters() if p.requires_grad)
    whole = _nbytes(big.state_dict().values())
    assert trainable <= size < 1.2 * trainable + 16 * 1024
    assert size < whole / 10
    loaded = xf.load_expansion(base, path)
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(loaded(x), big(x))


def test_loaded_base_outputs_stay_exact(path):
    """The loaded model's old outputs are the base's (isolated layout)."""
    base = _pretrained("mlp")
    big = _grow(base, "mlp", "isolated", 2)
    xf.save_expansion(big, path)
    loaded = xf.load_expansion(base, path)
    x = _data((10,))
    with torch.no_grad():
        assert torch.equal(loaded(x)[:, :5], base(x))
        assert torch.equal(xf.source_model(loaded, 0).eval()(x), base(x))


# ---- refusals ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base, path of a valid expansion of it, its bytes) shared by the refusal tests."""
    base = _pretrained("cnn")
    big = _grow(base, "cnn", "isolated", 2)
    path = str(tmp_path_factory.mktemp("ckpt") / "good.safetensors")
    xf.save_expansion(big, path)
    with open(path, "rb") as f:
        blob = f.read()
    return base, path, blob


def _refused(base, path, match):
    snap = _snapshot(base)
    with pytest.raises(ExpansionFileError, match=match):
        xf.load_expansion(base, path)
    _assert_unchanged(base, snap)


def _split(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _write(tmp_path, blob, name="bad.safetensors"):
    p = str(tmp_path / name)
    with open(p, "wb") as f:
        f.write(blob)
    return p


@pytest.mark.parametrize("what", ["conv weight", "bn buffer", "head bias"])
def test_refuses_another_base(saved, what):
    base, path, _ = saved
    other = copy.deepcopy(base)
    t = {"conv weight": other.conv1.weight, "bn buffer": other.bn1.running_var,
         "head bias": other.fc.bias}[what]
    with torch.no_grad():  # one element, one ulp
        t.view(-1)[3] = torch.nextafter(t.view(-1)[3], torch.tensor(float("inf")))
    _refused(other, path, r"(?i)another base.*fingerprint|fingerprint.*another base")
    xf.load_expansion(base, path)  # the genuine base is still accepted


def test_good_file_loads(saved):
    base, path, _ = saved
    assert xf.expanded_layers(xf.load_expansion(base, path))


def test_refuses_truncated_file(saved, tmp_path):
    base, _, blob = saved
    n = struct.unpack("<Q", blob[:8])[0]
    cuts = [0, 5, 8, 8 + n // 2, 8 + n, 8 + n + 7, (8 + n + len(blob)) // 2, len(blob) - 1]
    for cut in cuts:
        p = _write(tmp_path, blob[:cut], f"cut{cut}.safetensors")
        _refused(base, p, r"(?i)truncated|corrupt|modified|not .*expansion")


@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_refuses_flipped_tensor_byte(saved, tmp_path, where):
    base, _, blob = saved
    header, data = _split(blob)
    i = int(where * (len(data) - 1)) if where >= 0 else len(data) - 1
    data = bytearray(data)
    data[i] ^= 0x10
    p = _write(tmp_path, blob[: len(blob) - len(data)] + bytes(data))
    _refused(base, p, r"(?i)modified|digest")


def _edit_layers(h):
    layers = json.loads(h["__metadata__"]["layers"])
    rec = next(r for r in layers.values() if r["type"] == "linear")
    rec["skip_old_input_grad"] = not rec["skip_old_input_grad"]
    h["__metadata__"]["layers"] = json.dumps(layers, sort_keys=True)


def _swap_shape(h):
    name = next(k for k, v in h.items() if k != "__metadata__" and len(v["shape"]) == 2
                and v["shape"][0] != v["shape"][1])
    h[name]["shape"] = h[name]["shape"][::-1]  # same bytes, another shape


def _meta(key, value):
    def edit(h):
        h["__metadata__"][key] = value
    return edit


HEADER_EDITS = {
    "layers": (_edit_layers, r"(?i)modified|digest"),
    "shape": (_swap_shape, r"(?i)modified|digest"),
    "digest": (_meta("payload_digest", "0" * 64), r"(?i)modified|digest"),
    "format": (_meta("format", "something.else"), r"(?i)not an expanse_fast expansion"),
    "version": (_meta("version", "99"), r"(?i)version 99"),
    "fingerprint": (_meta("base_fingerprint", "f" * 64), r"(?i)fingerprint"),
    "no metadata": (lambda h: h.pop("__metadata__"), r"(?i)not an expanse_fast expansion"),
}


@pytest.mark.parametrize("edit", sorted(HEADER_EDITS))
def test_refuses_edited_header(saved, tmp_path, edit):
    base, _, blob = saved
    header, data = _split(blob)
    fn, match = HEADER_EDITS[edit]
    fn(header)
    _refused(base, _write(tmp_path, _join(header, data)), match)


def test_refuses_header_byte_edit_in_place(saved, tmp_path):
    base, _, blob = saved
    n = struct.unpack("<Q", blob[:8])[0]
    bad = bytearray(blob)
    bad[8] = ord("[")  # the header is no longer a JSON object
    _refused(base, _write(tmp_path, bytes(bad)), r"(?i)truncated|corrupt")
    bad = bytearray(blob)
    bad[:8] = struct.pack("<Q", n + 4)  # the header length points into the data
    _refused(base, _write(tmp_path, bytes(bad)), r"(?i)truncated|corrupt|modified")


def test_refuses_non_safetensors(saved, tmp_path):
    base, _, _ = saved
    p = str(tmp_path / "pickle.pt")
    torch.save(base.state_dict(), p)
    _refused(base, p, r"(?i)not a readable expansion file")
    _refused(base, _write(tmp_path, b"hello, world\n" * 10, "text.txt"),
             r"(?i)not a readable expansion file")
    _refused(base, _write(tmp_path, b"", "empty.safetensors"), r"(?i)not a readable")
    # a valid safetensors file that is not an expansion
    from safetensors.torch import save_file
    p = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.ones(3)}, p)
    _refused(base, p, r"(?i)not an expanse_fast expansion")


def test_missing_file_and_unexpanded_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        xf.load_expansion(mlp(), str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="no expanded layer"):
        xf.save_expansion(mlp(), str(tmp_path / "x.safetensors"))
    assert not os.listdir(tmp_path)  # no partial or temporary file left behind


@pytest.mark.parametrize("seed", range(24))
def test_the_base_fingerprint_needs_no_copy_of_the_model(seed):
    """save_expansion fingerprints the task-0 model one layer at a time: the same digest as
    the whole plain copy source_model() builds, over random MLPs and CNNs widened once or
    twice, isolated or coupled, fused or not."""
    from expanse_fast.checkpoint import fingerprint, task0_fingerprint
    from models import random_model, widen_at_random
    r, base, _ = random_model(seed)
    big, _ = widen_at_random(r, base, "torch")
    assert task0_fingerprint(big) == fingerprint(xf.source_model(big, task=0)) \
        == fingerprint(base)
