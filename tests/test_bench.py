"""What the benchmark scripts count, checked against the model itself (their timings are not
tests: they print tables)."""

import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

from llm.model import GPT, PRESETS

BENCH_TRAIN = runpy.run_path(
    str(Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py")
)


@pytest.mark.parametrize("preset", ["gpt-nano", "gpt-micro-modern"])
def test_kernels_alone_times_every_linear_layer_of_the_model(preset):
    # Grouped-query attention narrows the query/key/value projection; the LM head spans the
    # padded vocabulary.
    config = PRESETS[preset]
    model_shapes = [
        (m.in_features, m.out_features) for m in GPT(config).modules() if isinstance(m, nn.Linear)
    ]
    assert sorted(BENCH_TRAIN["linear_shapes"](config)) == sorted(model_shapes)
    matmuls, attention = BENCH_TRAIN["kernels_alone"](config, 2, 16, torch.device("cpu"), 0, 1)
    assert matmuls > 0 and attention > 0
