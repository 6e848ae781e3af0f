"""megatron-to-megalign on synthetic Megatron checkpoints (one process, no megatron-core needed): a megalign
model's tensors written under Megatron's names and layouts (fused, group-interleaved QKV; fc1 = [gate; up]
per TP rank; local layer numbers per stage) in the legacy format at TP 2 x PP 2 and in torch_dist (written by
torch.distributed.checkpoint, layers stacked) convert back to the same tensors and logits; bad input (no
checkpoint, truncated files, pickled code, unsupported architectures) fails naming the file or setting; the
CLI and the tools script. The real megatron-core round trip is tests/distributed/test_convert_megatron.py."""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import numpy
import pytest
import torch
import torch.distributed.checkpoint as dcp

from megalign.checkpoint.model_record import checkpoint_model_config
from megalign.checkpoint.storage import load_checkpoint
from megalign.config.model import ModelConfig, preset
from megalign.convert.megatron_to_megalign import convert_megatron_to_megalign
from megalign.errors import ConfigError, DataFormatError
from megalign.model import GPTModel

ROOT = Path(__file__).resolve().parents[2]
CONFIG = preset("tiny", vocab_size=256, num_layers=4, num_attention_heads=4, num_key_value_heads=2, qkv_bias=True)


def _args(config: ModelConfig, **overrides: Any) -> argparse.Namespace:
    values = dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        group_query_attention=True,
        num_query_groups=config.num_key_value_heads,
        kv_channels=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=config.qkv_bias,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=10000,
        vocab_size=200,
        padded_vocab_size=config.vocab_size,
    )
    return argparse.Namespace(**{**values, **overrides})


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(0)
    out = GPTModel(CONFIG).eval()
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return out


def _megatron_tensors(model: GPTModel, config: ModelConfig) -> Dict[str, torch.Tensor]:
    """The model's tensors under Megatron's global names and whole-tensor layouts (local layer spec)."""
    sd = model.state_dict()
    groups, per_group, d = (
        config.num_key_value_heads,
        config.num_attention_heads // config.num_key_value_heads,
        config.head_dim,
    )
    out = {
        "embedding.word_embeddings.weight": sd["embed_tokens.weight"],
        "decoder.final_layernorm.weight": sd["final_norm.weight"],
    }
    if not config.tie_word_embeddings:
        out["output_layer.weight"] = sd["lm_head.weight"]
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            q, k, v = (sd[f"{ours}attention.{p}_proj.{kind}"] for p in "qkv")
            rest = q.shape[1:]
            fused = torch.cat(
                [q.reshape(groups, per_group * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)],
                dim=1,
            )
            out[f"{theirs}self_attention.linear_qkv.{kind}"] = fused.reshape(-1, *rest)
        out[f"{theirs}self_attention.linear_proj.weight"] = sd[f"{ours}attention.o_proj.weight"]
        out[f"{theirs}input_layernorm.weight"] = sd[f"{ours}input_norm.weight"]
        out[f"{theirs}pre_mlp_layernorm.weight"] = sd[f"{ours}mlp_norm.weight"]
        out[f"{theirs}mlp.linear_fc1.weight"] = torch.cat(
            [sd[f"{ours}mlp.gate_proj.weight"], sd[f"{ours}mlp.up_proj.weight"]]
        )
        out[f"{theirs}mlp.linear_fc2.weight"] = sd[f"{ours}mlp.down_proj.weight"]
    return out


def _rank_part(name: str, tensor: torch.Tensor, t: int, tp: int) -> torch.Tensor:
    if name.endswith("linear_fc1.weight"):  # each rank holds [its gate part; its up part]
        gate, up = tensor.chunk(2)
        return torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return tensor.chunk(tp, dim=1)[t]
    if name.endswith("norm.weight"):
        return tensor
    return tensor.chunk(tp)[t]  # qkv (whole query groups per rank), embedding, output layer


def write_legacy(root: Path, model: GPTModel, config: ModelConfig, tp: int, pp: int, **args: Any) -> Path:
    """A legacy Megatron-LM checkpoint of ``model`` at TP ``tp`` x PP ``pp`` (iteration 5)."""
    tensors = _megatron_tensors(model, config)
    per_stage = config.num_layers // pp
    for p in range(pp):
        for t in range(tp):
            state = {}
            for name, tensor in tensors.items():
                if name.startswith("decoder.layers."):
                    layer = int(name.split(".")[2])
                    if layer // per_stage != p:
                        continue
                    local = name.replace(f"layers.{layer}.", f"layers.{layer - p * per_stage}.", 1)
                elif p != (0 if name == "embedding.word_embeddings.weight" else pp - 1):
                    continue
                else:
                    local = name
                state[local] = _rank_part(name, tensor, t, tp).clone()
                state[local.rsplit(".", 1)[0] + "._extra_state"] = None
            folder = root / "iter_0000005" / (f"mp_rank_{t:02d}_{p:03d}" if pp > 1 else f"mp_rank_{t:02d}")
            folder.mkdir(parents=True)
            payload = {
                "model": state,
                "args": _args(config, **args),
                "iteration": 5,
                "checkpoint_version": 3.0,
                "rng_state": [{"np_rng_state": numpy.random.get_state(), "torch_rng_state": torch.get_rng_state()}],
            }
            torch.save(payload, folder / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    return root


def write_dist(root: Path, model: GPTModel, config: ModelConfig, **args: Any) -> Path:
    """A torch_dist checkpoint of ``model``: layers stacked, TE norm names, written by torch DCP (iteration 9)."""
    tensors = _megatron_tensors(model, config)
    state: Dict[str, torch.Tensor] = {}
    renames = {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
        "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    }
    for name, tensor in tensors.items():
        if not name.startswith("decoder.layers."):
            state[name] = tensor
    leaves = {name.split(".", 3)[3] for name in tensors if name.startswith("decoder.layers.")}
    for leaf in leaves:
        stacked = torch.stack([tensors[f"decoder.layers.{i}.{leaf}"] for i in range(config.num_layers)])
        state[f"decoder.layers.{renames.get(leaf, leaf)}"] = stacked
    folder = root / "iter_0000009"
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"args": _args(config, **args), "iteration": 9, "checkpoint_version": 3.0}, folder / "common.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("9")
    return root


def _check(save: Path, model: GPTModel, true_vocab: int, fmt: str) -> None:
    ckpt = load_checkpoint(save)
    config = checkpoint_model_config(ckpt)
    assert config.vocab_size == CONFIG.vocab_size and config.true_vocab_size == true_vocab
    assert ckpt.extra["vocab"] == {"true_size": true_vocab, "padded_rows": CONFIG.vocab_size}
    assert ckpt.extra["megatron"]["format"] == fmt and ckpt.step == 0
    state = ckpt.model_state()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    ours = GPTModel(config).eval()
    ours.load_state_dict(state, strict=True)
    tokens = torch.randint(0, true_vocab, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[..., :true_vocab], model(tokens)[..., :true_vocab], rtol=0, atol=1e-6)


def test_legacy_tp2_pp2_round_trip(tmp_path, model):
    write_legacy(tmp_path / "meg", model, CONFIG, 2, 2)
    lines = []
    convert_megatron_to_megalign(tmp_path / "meg", tmp_path / "out", 2, 1, progress=False, log=lines.append)
    assert "200" in lines[0] and "vocab_size" in lines[0]
    _check(tmp_path / "out", model, 200, "torch")
    assert load_checkpoint(tmp_path / "out").extra["megatron"]["iteration"] == 5


def test_dist_round_trip_and_vocab_flag(tmp_path, model):
    write_dist(tmp_path / "meg", model, CONFIG, vocab_size=None)
    lines = []
    convert_megatron_to_megalign(tmp_path / "meg", tmp_path / "a", 1, 2, progress=False, log=lines.append)
    assert "every stored row" in lines[0]
    _check(tmp_path / "a", model, 256, "torch_dist")
    convert_megatron_to_megalign(
        tmp_path / "meg" / "iter_0000009", tmp_path / "b", vocab_size=230, progress=False, log=None
    )
    _check(tmp_path / "b", model, 230, "torch_dist")
    with pytest.raises(ConfigError, match="--vocab-size 300"):
        convert_megatron_to_megalign(tmp_path / "meg", tmp_path / "c", vocab_size=300, progress=False, log=None)


def test_not_a_megatron_checkpoint(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(DataFormatError, match=r"--load .*x: is not a Megatron checkpoint"):
        convert_megatron_to_megalign(tmp_path / "x", tmp_path / "out", progress=False, log=None)
    (tmp_path / "x" / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(DataFormatError, match="no Megatron checkpoint iter_0000003"):
        convert_megatron_to_megalign(tmp_path / "x", tmp_path / "out", progress=False, log=None)
    assert not (tmp_path / "out").exists()


def test_truncated_files_are_named(tmp_path, model):
    write_legacy(tmp_path / "leg", model, CONFIG, 1, 1)
    target = tmp_path / "leg" / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"
    target.write_bytes(target.read_bytes()[:3000])
    with pytest.raises(DataFormatError, match=r"mp_rank_00/model_optim_rng.pt: .*re-copy it"):
        convert_megatron_to_megalign(tmp_path / "leg", tmp_path / "o1", progress=False, log=None)
    write_dist(tmp_path / "dist", model, CONFIG)
    shard = next((tmp_path / "dist" / "iter_0000009").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataFormatError, match=rf"{shard.name}: cannot read tensor"):
        convert_megatron_to_megalign(tmp_path / "dist", tmp_path / "o2", progress=False, log=None)
    meta = tmp_path / "dist" / "iter_0000009" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:50])
    with pytest.raises(DataFormatError, match=r"\.metadata: not a readable"):
        convert_megatron_to_megalign(tmp_path / "dist", tmp_path / "o3", progress=False, log=None)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_is_refused(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_dist(tmp_path / "dist", model, CONFIG)
    (tmp_path / "dist" / "iter_0000009" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(DataFormatError, match=r"\.metadata: holds Python class (posix|os)\.system"):
        convert_megatron_to_megalign(tmp_path / "dist", tmp_path / "o1", progress=False, log=None)
    write_legacy(tmp_path / "leg", model, CONFIG, 1, 1, extra_hook=_Payload())
    with pytest.raises(DataFormatError, match=r"model_optim_rng.pt: holds Python objects of (posix|os)\.system"):
        convert_megatron_to_megalign(tmp_path / "leg", tmp_path / "o2", progress=False, log=None)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "override, setting",
    [
        ({"normalization": "LayerNorm"}, "args.normalization='LayerNorm'"),
        ({"position_embedding_type": "learned_absolute"}, "args.position_embedding_type='learned_absolute'"),
        ({"swiglu": False}, "args.swiglu=False"),
        ({"num_query_groups": 1}, "linear_qkv.weight has shape"),
    ],
)
def test_unsupported_architecture_names_the_setting(tmp_path, model, override, setting):
    write_legacy(tmp_path / "leg", model, CONFIG, 1, 1, **override)
    with pytest.raises((ConfigError, DataFormatError), match=rf"model_optim_rng.pt: .*{setting}|{setting}"):
        convert_megatron_to_megalign(tmp_path / "leg", tmp_path / "o", progress=False, log=None)
    assert not (tmp_path / "o").exists()


def test_cli_and_tools_script(tmp_path, model):
    write_legacy(tmp_path / "meg", model, CONFIG, 2, 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    helped = subprocess.run(
        [sys.executable, "-m", "megalign.cli", "convert", "megatron-to-megalign", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "--ckpt-step" in helped.stdout and "examples:" in helped.stdout
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_checkpoint.py"),
            "megatron-to-megalign",
            "--load",
            str(tmp_path / "meg"),
            "--save",
            str(tmp_path / "out"),
            "--ckpt-step",
            "5",
            "--tensor-model-parallel-size",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "true vocabulary 200 of 256 rows" in done.stdout and "wrote megalign checkpoint" in done.stdout
    _check(tmp_path / "out", model, 200, "torch")
