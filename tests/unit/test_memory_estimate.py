"""The theoretical memory estimate per rank and `megalign estimate-memory`."""
from __future__ import annotations

import pytest

from megalign.cli import main as cli_main
from megalign.errors import ConfigError
from megalign.config.model import parameter_count, preset
from megalign.parallel.memory import Layout, estimate_memory
from megalign.parallel.memory_cli import parse_layout


def test_single_rank_counts_every_parameter_and_megatron_bytes() -> None:
    config = preset("llama3-8b")
    estimate = estimate_memory(config, Layout(bf16=True))
    assert estimate.parameters == parameter_count(config)
    assert estimate.weights == 2 * estimate.parameters and estimate.gradients == 4 * estimate.parameters
    assert estimate.optimizer == 12 * estimate.parameters  # fp32 master + two moments
    fp32 = estimate_memory(config, Layout(bf16=False))
    assert fp32.weights == 4 * fp32.parameters and fp32.optimizer == 8 * fp32.parameters  # no separate master


def test_splits_scale_as_the_layout_says() -> None:
    config = preset("llama3-8b")
    base = estimate_memory(config, Layout(data_parallel_size=8))
    tp4 = estimate_memory(config, Layout(tensor_model_parallel_size=4, data_parallel_size=2))
    norms = config.num_layers * 2 * config.hidden_size + config.hidden_size  # replicated under TP
    assert tp4.parameters == pytest.approx((base.parameters - norms) / 4 + norms, rel=1e-6)
    zero1 = estimate_memory(config, Layout(data_parallel_size=8, use_distributed_optimizer=True))
    assert zero1.optimizer == pytest.approx(base.optimizer / 8, rel=1e-6)
    assert zero1.weights == base.weights and zero1.gradients == base.gradients
    pp4 = estimate_memory(config, Layout(pipeline_model_parallel_size=4))
    layer = (base.parameters - 2 * config.vocab_size * config.hidden_size - config.hidden_size) // config.num_layers
    assert pp4.parameters == 8 * layer + config.vocab_size * config.hidden_size + config.hidden_size


def test_activation_savings_are_ordered() -> None:
    config = preset("llama3-8b")
    common = dict(tensor_model_parallel_size=4, seq_length=8192)
    plain = estimate_memory(config, Layout(**common, flash_attention=False)).activations
    flash = estimate_memory(config, Layout(**common)).activations
    sequence_parallel = estimate_memory(config, Layout(**common, sequence_parallel=True)).activations
    full = estimate_memory(config, Layout(**common, sequence_parallel=True, recompute_granularity="full")).activations
    assert full < sequence_parallel < flash < plain


def test_layout_errors_and_cli(capsys: pytest.CaptureFixture) -> None:
    assert parse_layout("4x2x8") == (4, 2, 8)
    with pytest.raises(ConfigError, match="TPxPPxDP"):
        parse_layout("4x2")
    with pytest.raises(ConfigError, match="must divide num_attention_heads"):
        estimate_memory(preset("llama3-8b"), Layout(tensor_model_parallel_size=3))
    assert cli_main(["estimate-memory", "--model-preset", "llama3-70b", "--layouts", "8x4x2",
                     "--use-distributed-optimizer", "--sequence-parallel"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama3-70b TP8 PP4 DP2 (64 ranks):") and "total" in out
    assert cli_main(["estimate-memory", "--model-preset", "tiny", "--layouts", "2by2"]) == 2
