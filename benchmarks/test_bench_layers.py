"""Layer level: linear (1024 features, 4096 rows) and conv2d 3x3 (128 channels, batch 8,
16x16), forward, backward and fwd+bwd, widened by 10%, 25%, 50%, 100% and with three groups,
expanse_fast against the masked dense layer, torch.cat modules, fine-tuning the original
layer and LoRA through PEFT (matched trainable parameters).  The layer is a hidden layer of
an expanded model: only its new input features need a gradient.

    pytest benchmarks/test_bench_layers.py --benchmark-only
"""
import pytest

from expanse_fast import bench as B

from _cases import case_id, contender_names, name_id, run

ROUNDS = 7
SPECS = B.layer_specs("linear", 1024, 4096) + B.layer_specs("conv2d", 128, 8, hw=16)


@pytest.mark.parametrize("spec,name", [
    pytest.param(spec, name, id=f"{case_id(spec)}-{name_id(name)}")
    for spec in SPECS for name in contender_names()])
def test_layer(benchmark, spec, name):
    run(benchmark, spec, name, ROUNDS)
