"""Activation recomputation: the plan of recomputed layer runs, identical gradients, and less stored memory."""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch

from megalign.errors import ConfigError
from megalign.model import GPTModel, ModelOptions, preset
from megalign.model.decoder import recompute_plan

CONFIG = preset("tiny", num_layers=4)
FULL_UNIFORM_2 = ModelOptions(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)


def _plan(options: ModelOptions, layers: int = 5):
    return [(list(run), recomputed) for run, recomputed in recompute_plan(layers, options)]


def test_recompute_plan() -> None:
    assert _plan(ModelOptions()) == [([0, 1, 2, 3, 4], False)]
    assert _plan(ModelOptions(recompute_granularity="selective")) == [([0, 1, 2, 3, 4], False)]
    assert _plan(FULL_UNIFORM_2) == [([0, 1], True), ([2, 3], True), ([4], True)]
    block = ModelOptions(recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
    assert _plan(block) == [([0], True), ([1], True), ([2, 3, 4], False)]
    assert _plan(block, layers=2) == [([0], True), ([1], True)]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(recompute_granularity="partial"), "full, selective or None"),
    (dict(recompute_granularity="full"), "uniform or block"),
    (dict(recompute_granularity="full", recompute_method="uniform"), "positive integer"),
    (dict(recompute_granularity="selective", recompute_num_layers=2), "only used with"),
    (dict(attention_backend="xformers"), "must be one of"),
])
def test_options_validation(kwargs, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ModelOptions(**kwargs)


def _batch() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=g)
    segments = torch.cat([torch.zeros(2, 10, dtype=torch.long), torch.ones(2, 14, dtype=torch.long)], dim=1)
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "segment_ids": segments}


def _run(options: ModelOptions) -> Tuple[float, Dict[str, torch.Tensor], int]:
    """Loss, gradients and bytes of tensors autograd stored for the backward pass."""
    torch.manual_seed(0)
    model = GPTModel(CONFIG, options=options)
    stored = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal stored
        stored += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**_batch())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, stored


OPTIONS = {
    "selective": ModelOptions(recompute_granularity="selective"),
    "full-uniform-1": ModelOptions(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-2": FULL_UNIFORM_2,
    "full-block-3": ModelOptions(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
}


@pytest.fixture(scope="module")
def baseline():
    return _run(ModelOptions())


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_recompute_gives_identical_loss_and_gradients(baseline, name: str) -> None:
    loss, grads, _ = _run(OPTIONS[name])
    assert loss == baseline[0]
    assert grads.keys() == baseline[1].keys()
    for key in grads:  # the recomputed forward is the same computation, so the gradients are bitwise equal
        assert torch.equal(grads[key], baseline[1][key]), key


def test_recompute_stores_less(baseline) -> None:
    stored = {name: _run(options)[2] for name, options in OPTIONS.items()}
    none = baseline[2]
    # full recomputation keeps only each run's input (plus what is outside the layers: embeddings, head, loss)
    assert stored["full-uniform-1"] < stored["full-block-3"] < none
    assert stored["full-uniform-2"] < stored["full-uniform-1"]
    # selective drops the attention core's intermediates (the [seq, seq] document mask among them)
    assert stored["selective"] < none


def test_no_recompute_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = GPTModel(CONFIG, options=FULL_UNIFORM_2)
    with torch.no_grad():
        logits = model(_batch()["tokens"])
    torch.manual_seed(0)
    assert torch.equal(logits, GPTModel(CONFIG)(_batch()["tokens"]).detach())
