"""What the benchmark scripts count, checked against the model itself (their timings are not
tests: they print tables)."""

import runpy
from pathlib import Path

import pytest
import torch

from llm.model import PRESETS

BENCH_TRAIN = runpy.run_path(
    str(Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py")
)


@pytest.mark.parametrize("preset", ["gpt-nano", "gpt-micro-modern"])
def test_kernels_alone_times_every_linear_layer_of_the_model(preset):
    # Grouped-query attention narrows the query/key/value projection; the LM head spans the
    # padded vocabulary.
    config = PRESETS[preset]
    qkv_width = (config.n_head + 2 * config.kv_heads) * config.head_size
    shapes = BENCH_TRAIN["linear_shapes"](config)
    assert len(shapes) == 4 * config.n_layer + 1
    assert shapes[0] == (config.n_embd, qkv_width)
    assert shapes[-1] == (config.n_embd, config.padded_vocab_size)
    matmuls, attention = BENCH_TRAIN["kernels_alone"](config, 2, 16, torch.device("cpu"), 0, 1)
    assert matmuls > 0 and attention > 0
