"""Small models the tests widen: the authors' MLP, a ResNet-style CNN, and random MLPs and
CNNs drawn from a seed."""
import random

import torch
import torch.nn.functional as F
from torch import nn

import expanse_fast as xf


def authors_mlp() -> nn.Sequential:
    """784-150-80-5, the MLP of the EXPANSE paper's MNIST experiment."""
    return nn.Sequential(nn.Linear(784, 150), nn.ReLU(), nn.Linear(150, 80), nn.ReLU(),
                         nn.Linear(80, 5))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # downsampling shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, classes=5, width=8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def pretrained(model: nn.Module, x: torch.Tensor, steps: int = 5) -> nn.Module:
    """A few real training steps so BatchNorm statistics and weights are not at init."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model.eval()


def _mlp(r: random.Random):
    widths = [r.randint(1, 9) for _ in range(r.randint(2, 4))]
    acts = [nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, lambda: nn.Dropout(0.0)]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(a, b, bias=r.random() < 0.8))
        if r.random() < 0.3:
            layers.append(nn.BatchNorm1d(b))
        layers.append(r.choice(acts)())
    layers.append(nn.Linear(widths[-1], r.randint(1, 5)))
    return nn.Sequential(*layers), (r.randint(2, 7), widths[0])


class _CNN(nn.Module):
    def __init__(self, r: random.Random):
        super().__init__()
        c = r.randint(1, 6)
        self.stem = nn.Conv2d(2, c, 3, padding=1, bias=r.random() < 0.5)
        self.bn = nn.BatchNorm2d(c)
        self.body = nn.Conv2d(c, c, 3, padding=1, groups=c if r.random() < 0.3 else 1,
                              padding_mode=r.choice(["zeros", "reflect"]))
        self.down = nn.Conv2d(c, 2 * c, r.choice([1, 3]), stride=2, bias=False)
        self.fc = nn.Linear(2 * c, r.randint(1, 4))

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(self.body(h) + h)
        return self.fc(F.adaptive_avg_pool2d(self.down(h), 1).flatten(1))


def random_model(seed: int):
    """(random.Random, an MLP or CNN in float64 eval mode, its input shape), from ``seed``."""
    r = random.Random(seed)
    torch.manual_seed(seed)
    if r.random() < 0.5:
        base, shape = _mlp(r)
    else:
        base, shape = _CNN(r), (r.randint(2, 4), 2, r.randint(3, 7), r.randint(3, 7))
    base = base.double()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        base.train()(torch.randn(*shape, dtype=torch.float64))
    return r, base.eval(), shape


def widen_at_random(r: random.Random, base: nn.Module, backend: str):
    """``base`` widened once or twice, isolated or coupled, fused or not, its trainable
    tensors random (as after training); -> (model in eval mode, mode)."""
    mode, fuse = r.choice(["isolated", "coupled"]), r.random() < 0.7
    big = base
    for _ in range(r.randint(1, 2)):
        big = xf.expand(big, width=r.choice([0.3, 1, 2, 0.0]), new_classes=r.randint(0, 3),
                        mode=mode, fuse=fuse, backend=backend)
        with torch.no_grad():  # as after training: nothing is zero any more
            for p in big.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
    return big.eval(), mode


def random_widened(seed: int, backend: str = "torch"):
    """(widened model, its plain float64 copy ``merge``, input shape) drawn from ``seed``."""
    r, base, shape = random_model(seed)
    big, _ = widen_at_random(r, base, backend)
    return big, xf.merge(big).eval(), shape
