"""Model level: one training step (forward, backward, AdamW) of the MLP
1024-1024-1024-1024-10 widened by 25% with 10 new classes (4096 rows of data input) and of a
ResNet-style CNN widened by 25% (batch 32, 3x32x32), against the same model at full width
with gradient masks and against fine-tuning the original model.  Peak memory of a step is
measured beside the time and printed in its own table in the terminal summary.

    pytest benchmarks/test_bench_models.py --benchmark-only
"""
import pytest

from expanse_fast import bench as B

from _cases import DEVICE, case_id, name_id, run

ROUNDS = 9
SPECS = [B.ModelSpec("mlp", B.MLP_WIDTHS, 4096), B.ModelSpec("cnn", (32, 10), 32, hw=32)]
NAMES = [f"expanse_fast [{b}]" for b in B.subject_backends(DEVICE)] + [B.MASKED, B.FINETUNE]


class _MemoryTable:
    """Prints the measured peak memory of each model step in the terminal summary."""

    def __init__(self):
        self.rows = []

    def pytest_terminal_summary(self, terminalreporter):
        if not self.rows:
            return
        tr = terminalreporter
        tr.write_sep("=", "peak memory of one training step")
        tr.write_line(B.environment(DEVICE, "float32")["memory"])
        tr.write_line(f"{'group':70} {'contender':22} {'peak MB':>8} {'grad params':>12}")
        for group, name, peak, params in self.rows:
            mb = f"{peak / 2**20:.0f}" if peak is not None else "-"
            tr.write_line(f"{group:70} {name:22} {mb:>8} {params:12,}")


@pytest.fixture(scope="module")
def memory_table(request):
    manager = request.config.pluginmanager
    table = manager.get_plugin("expanse-memory-table")
    if table is None:
        table = _MemoryTable()
        manager.register(table, "expanse-memory-table")
    return table


@pytest.mark.parametrize("spec,name", [
    pytest.param(spec, name, id=f"{case_id(spec)}-{name_id(name)}")
    for spec in SPECS for name in NAMES])
def test_model_step(benchmark, memory_table, spec, name):
    case, c = run(benchmark, spec, name, ROUNDS)
    peak = B.peak_step_bytes(case.builders[name], DEVICE)
    benchmark.extra_info["peak_bytes"] = peak
    memory_table.rows.append((spec.group, name, peak, c.grad_params))
