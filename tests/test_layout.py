"""Layout's derived sizes (computed once at construction): they equal the sums they stand
for, in both modes and after growth, and a layout pickled before they were stored (a whole
model saved by an older version) computes them on first use."""
import itertools
import pickle

import pytest

from expanse_fast.layout import Layout

GROUPS = [((5,), (3,)), ((0, 4), (2, 0)), ((7, 1, 3), (2, 5, 11)), ((1, 0, 0, 2), (3, 3, 1, 1))]


def _expected(lay):
    ins, outs = lay.in_groups, lay.out_groups
    frozen_in = sum(ins[:-1])
    k_ends = (tuple(frozen_in for _ in outs[:-1]) if lay.mode == "coupled"
              else tuple(itertools.accumulate(ins))[: len(ins) - 1])
    return dict(in_features=sum(ins), out_features=sum(outs), frozen_in=frozen_in,
                frozen_out=sum(outs[:-1]), frozen_out_groups=outs[:-1], frozen_k_ends=k_ends)


@pytest.mark.parametrize("mode", ["isolated", "coupled"])
@pytest.mark.parametrize("ins,outs", GROUPS)
def test_derived_sizes(ins, outs, mode):
    lay = Layout(ins, outs, mode)
    for grown in (lay, lay.expanded(3, 2), lay.expanded(0, 1).expanded(2, 0)):
        for name, want in _expected(grown).items():
            assert getattr(grown, name) == want, (grown, name)


def test_layouts_pickled_without_the_derived_sizes():
    lay = Layout((7, 1, 3), (2, 5, 11), "coupled")
    old = Layout((7, 1, 3), (2, 5, 11), "coupled")
    for name in [k for k in old.__dict__ if k.startswith("_")]:
        del old.__dict__[name]  # what an older version pickled: the fields alone
    restored = pickle.loads(pickle.dumps(old))
    assert restored == lay and hash(restored) == hash(lay)
    for name, want in _expected(lay).items():
        assert getattr(restored, name) == want
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        restored.nothing
