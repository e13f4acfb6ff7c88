"""cl_metrics on matrices whose metrics were worked out by hand."""
import math

import numpy as np
import pytest

from expanse_fast.train import cl_metrics

# R[i][j]: accuracy on task j after training tasks 0..i.  Task 0 peaks after task 1 (0.95),
# so Chaudhry's forgetting (from the peak) differs from -BWT (from the diagonal).
R3 = [[0.90, 0.10, 0.20],
      [0.95, 0.70, 0.15],
      [0.60, 0.65, 0.95]]
B3 = [0.10, 0.20, 0.30]


def test_three_tasks_by_hand():
    m = cl_metrics(R3, B3)
    assert math.isclose(m["ACC"], (0.60 + 0.65 + 0.95) / 3)
    assert math.isclose(m["BWT"], ((0.60 - 0.90) + (0.65 - 0.70)) / 2)          # -0.175
    assert math.isclose(m["FWT"], ((0.10 - 0.20) + (0.15 - 0.30)) / 2)          # -0.125
    assert math.isclose(m["forgetting"], ((0.95 - 0.60) + (0.70 - 0.65)) / 2)   # 0.2


def test_forgetting_takes_the_best_earlier_row_even_before_training():
    # Chaudhry et al. 2018: max over every earlier row l < T-1, as the paper writes it.
    R = [[0.5, 0.8, 0.0],
         [0.5, 0.7, 0.0],
         [0.5, 0.6, 0.9]]
    assert math.isclose(cl_metrics(R)["forgetting"], ((0.5 - 0.5) + (0.8 - 0.6)) / 2)


def test_two_tasks_and_percent_units():
    R = np.array([[97.2, 20.0], [80.4, 95.6]])
    m = cl_metrics(R, b=[20.0, 19.0])
    assert math.isclose(m["ACC"], (80.4 + 95.6) / 2)
    assert math.isclose(m["BWT"], 80.4 - 97.2)
    assert math.isclose(m["forgetting"], 97.2 - 80.4)
    assert math.isclose(m["FWT"], 20.0 - 19.0)


def test_no_forgetting_and_positive_transfer():
    m = cl_metrics([[0.9, 0.5], [0.9, 0.8]], b=[0.2, 0.2])
    assert m["BWT"] == 0.0 and m["forgetting"] == 0.0
    assert math.isclose(m["FWT"], 0.3)


def test_fwt_needs_b_and_one_task_has_only_acc():
    assert cl_metrics(R3)["FWT"] is None
    m = cl_metrics([[0.7]])
    assert m == {"ACC": 0.7, "BWT": None, "FWT": None, "forgetting": None}


@pytest.mark.parametrize("R", [[], [[0.1, 0.2]], [[0.1], [0.2]], [0.5]])
def test_rejects_non_square(R):
    with pytest.raises(ValueError):
        cl_metrics(R)


def test_rejects_wrong_b():
    with pytest.raises(ValueError, match="one accuracy per task"):
        cl_metrics(R3, b=[0.1, 0.2])


@pytest.mark.parametrize("cell, b, pattern", [
    ((2, 0), None, r"R is nan at R\[2\]\[0\]"),       # the last row: ACC, BWT
    ((1, 1), None, r"R is nan at R\[1\]\[1\]"),       # the diagonal: BWT
    ((0, 1), None, r"R is inf at R\[0\]\[1\]"),       # read by forgetting (every earlier row)
    ((1, 2), [0.1, 0.1, 0.1], r"R is nan at R\[1\]\[2\]"),  # above the diagonal: FWT
])
def test_a_non_finite_entry_the_metrics_read_is_named(cell, b, pattern):
    """A NaN passed into ACC, BWT, FWT or forgetting without a word."""
    R = np.full((3, 3), 0.5)
    R[cell] = np.inf if cell == (0, 1) else np.nan
    with pytest.raises(ValueError, match=pattern):
        cl_metrics(R, b)


def test_entries_no_metric_reads_may_be_unmeasured():
    R = np.full((3, 3), 0.5)
    R[1, 2] = np.nan  # FWT's entry: read only when b is given
    assert cl_metrics(R)["BWT"] == 0.0
    with pytest.raises(ValueError, match=r"b is nan at b\[2\]"):
        cl_metrics(np.full((3, 3), 0.5), b=[0.1, 0.1, np.nan])


def test_unmeasured_entries_above_the_diagonal_may_be_nan():
    """A matrix filled as tasks are trained (NaN where a task was not evaluated before it
    was trained): forgetting's maximum takes the rows that were measured."""
    nan = float("nan")
    m = cl_metrics([[0.9, nan, nan], [0.8, 0.95, nan], [0.7, 0.85, 0.9]])
    assert math.isclose(m["forgetting"], ((0.9 - 0.7) + (0.95 - 0.85)) / 2)
    assert math.isclose(m["BWT"], ((0.7 - 0.9) + (0.85 - 0.95)) / 2)
    with pytest.raises(ValueError, match=r"R is nan at R\[0\]\[1\]"):  # FWT reads it
        cl_metrics([[0.9, nan, nan], [0.8, 0.95, nan], [0.7, 0.85, 0.9]], b=[0, 0.1, 0.1])
    with pytest.raises(ValueError, match=r"R is inf at R\[0\]\[1\]"):  # not a missing value
        cl_metrics([[0.9, float("inf"), nan], [0.8, 0.95, nan], [0.7, 0.85, 0.9]])


def test_b_is_checked_for_one_task_too():
    with pytest.raises(ValueError, match=r"b must hold one accuracy per task \(1\)"):
        cl_metrics([[0.7]], b=[0.1, 0.2, 0.3])
