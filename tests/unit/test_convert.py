"""Hugging Face <-> megalign checkpoint conversion: import at TP1/PP1 and TP2/PP2 (global tensors, the parts
each file holds, logits equal to transformers'), export back (bit-identical, loads without warnings, with
the tokenizer), sharded/.bin inputs, errors naming the problem, and the Megatron-style script."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from megalign.convert import convert_hf_to_megalign, convert_megalign_to_hf
from megalign.convert.hf_to_megalign import tensor_split
from megalign.convert.megalign_to_hf import parse_size
from megalign.errors import ConfigError, DataFormatError
from megalign.model import GPTModel
from megalign.config.model import ModelConfig, preset, to_hf_config
from megalign.model.hf_weights import weight_names
from megalign.ops.rotary import RopeScaling
from megalign.parallel.sharding import shard, tensor_parallel_axis, tensor_parallel_replicas
from megalign.parallel.state import ParallelContext
from megalign.checkpoint.storage import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB = 200  # not a multiple of 128: the import pads it to 256
CONFIGS = {
    "llama": preset("tiny", vocab_size=VOCAB, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
    "qwen2": preset("tiny", vocab_size=VOCAB, qkv_bias=True, tie_word_embeddings=True, rope_theta=1000000.0,
                    rms_norm_eps=1e-6),
    "qwen2-kv1": preset("tiny", vocab_size=VOCAB, qkv_bias=True, tie_word_embeddings=True, num_key_value_heads=1),
}


def _hf_model(config: ModelConfig) -> torch.nn.Module:
    if config.qkv_bias:
        cls, model_cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    else:
        cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = model_cls(cls(**to_hf_config(config), attn_implementation="eager")).eval()
    with torch.no_grad():  # norm weights are 1 and biases 0 at init: perturb so that a wrong mapping shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (HF model, folder saved with save_pretrained)."""
    out = {}
    for name, config in CONFIGS.items():
        model = _hf_model(config)
        path = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def _tokens(batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def _megalign_model(ckpt) -> GPTModel:
    config = ModelConfig.from_dict(ckpt.config["model_config"])
    model = GPTModel(config).eval()
    model.load_state_dict(ckpt.model_state(), strict=True)
    return model


def _check_import(hf_model, ckpt, config: ModelConfig) -> None:
    hf_state = hf_model.state_dict()
    assert ckpt.step == 0 and ckpt.extra["hf"]["vocab_size"] == VOCAB
    for ours, hf_name, _ in weight_names(config):
        got = ckpt.read_tensor(ours)
        if got.shape[0] == 256 and hf_state[hf_name].shape[0] == VOCAB:
            assert torch.equal(got[VOCAB:], torch.zeros_like(got[VOCAB:])), ours
            got = got[:VOCAB]
        assert torch.equal(got, hf_state[hf_name]), ours
    tokens = _tokens()
    with torch.no_grad():
        expected = hf_model(input_ids=tokens).logits
        logits = _megalign_model(ckpt)(tokens)
    assert logits.shape[-1] == 256
    torch.testing.assert_close(logits[..., :VOCAB], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_import_tp1_pp1_equals_hf(hf_dirs, tmp_path, name):
    model, path = hf_dirs[name]
    convert_hf_to_megalign(path, tmp_path / "ckpt", progress=False)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert set(ckpt.metadata.files) == {"model_tp0_pp0.safetensors"}
    assert not ckpt.tensor_names("optimizer")
    _check_import(model, ckpt, CONFIGS[name])


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen2-kv1"])
def test_import_tp2_pp2_files_hold_the_right_parts(hf_dirs, tmp_path, name):
    model, path = hf_dirs[name]
    config = CONFIGS[name]
    convert_hf_to_megalign(path, tmp_path / "ckpt", 2, 2, progress=False)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.metadata.parallel == {"tensor": 2, "pipeline": 2, "data": 1}
    assert set(ckpt.metadata.files) == {f"model_tp{t}_pp{p}.safetensors" for t in (0, 1) for p in (0, 1)}
    padded = ModelConfig.from_dict(ckpt.config["model_config"])
    full = ckpt.model_state()
    # the parallel layers' own split rules (meta model at TP=2; replicated k/v heads need a process group)
    truth = {}
    if config.num_key_value_heads >= 2:
        with torch.device("meta"):
            meta = GPTModel(padded, ParallelContext(2, 0, group=object()))
        truth = {n: (tensor_parallel_axis(p), tensor_parallel_replicas(p)) for n, p in meta.named_parameters()}
    for p in (0, 1):
        for t in (0, 1):
            fname = ckpt.path / f"model_tp{t}_pp{p}.safetensors"
            stored = safetensors.torch.load_file(str(fname))
            layer = str(p)  # 2 layers over 2 stages
            for tensor_name, tensor in stored.items():
                parts = tensor_name.split(".")
                if parts[0] == "layers":
                    assert parts[1] == layer, (fname, tensor_name)
                axis, pieces, replicas = tensor_split(tensor_name, padded, 2)
                if tensor_name in truth:
                    assert truth[tensor_name] == (axis, replicas), tensor_name
                assert torch.equal(tensor, shard(full[tensor_name], axis, 2, t, replicas)), (fname, tensor_name)
            if t == 0:  # replicated norms are stored once, by tensor rank 0
                assert (f"layers.{p}.input_norm.weight" in stored)
            else:
                assert not any(n.endswith("norm.weight") for n in stored)
            if p == 1:
                assert "final_norm.weight" in stored or t == 1
            if p == 0 or config.tie_word_embeddings:
                assert "embed_tokens.weight" in stored
    if name == "qwen2-kv1":  # one key/value head over two ranks: one part, held by rank 0's file
        assert ckpt.metadata.tensors["layers.0.attention.k_proj.weight"].parts == 1
    _check_import(model, ckpt, config)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_export_round_trip_bit_identical(hf_dirs, tmp_path, hf_bpe_tokenizer, name):
    model, path = hf_dirs[name]
    hf_in = tmp_path / "hf_in"
    shutil.copytree(path, hf_in)
    shutil.copy(hf_bpe_tokenizer, hf_in / "tokenizer.json")
    convert_hf_to_megalign(hf_in, tmp_path / "ckpt", 2, 2, progress=False)
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    out = convert_megalign_to_hf(tmp_path / "ckpt", tmp_path / "hf_out", dtype="fp32", progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert type(loaded) is type(model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("hello world")["input_ids"]


def test_sharded_and_bin_inputs_and_sharded_export(tmp_path):
    config = CONFIGS["llama"]
    model = _hf_model(config)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()  # transformers 5 only writes safetensors: write the legacy format directly
    shutil.copy(tmp_path / "sharded" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for kind in ("sharded", "bin"):
        convert_hf_to_megalign(tmp_path / kind, tmp_path / f"ckpt_{kind}", 2, 1, progress=False)
        _check_import(model, load_checkpoint(tmp_path / f"ckpt_{kind}"), config)
    out = convert_megalign_to_hf(tmp_path / "ckpt_bin", tmp_path / "out", dtype="bf16", max_shard_size="50KB",
                                 progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, model.state_dict()[key].to(torch.bfloat16)), key


def test_bf16_input_keeps_its_dtype_through_import_and_export(tmp_path):
    """The streamed import plans each file's header from the HF dtypes: bf16 stays bf16, bit for bit."""
    model = _hf_model(CONFIGS["qwen2"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    convert_hf_to_megalign(tmp_path / "hf", tmp_path / "ckpt", 2, 2, progress=False)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert {spec.dtype for spec in ckpt.metadata.tensors.values()} == {"bfloat16"}
    for fname in ckpt.metadata.files:
        header = safetensors.torch.load_file(str(ckpt.path / fname))
        assert header and all(t.dtype == torch.bfloat16 for t in header.values()), fname
    out = convert_megalign_to_hf(tmp_path / "ckpt", tmp_path / "out", dtype="bf16", progress=False)
    loaded = safetensors.torch.load_file(str(out / "model.safetensors"))
    original = model.state_dict()
    assert set(loaded) == {k for k in original if k != "lm_head.weight"}  # tied: stored once, as HF does
    for key, value in loaded.items():
        assert torch.equal(value, original[key]), key


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_errors_name_the_problem(hf_dirs, tmp_path):
    _, path = hf_dirs["llama"]
    bad = _copy(path, tmp_path / "arch")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        convert_hf_to_megalign(bad, tmp_path / "c1", progress=False)

    bad = _copy(path, tmp_path / "missing")
    state = safetensors.torch.load_file(str(bad / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataFormatError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_hf_to_megalign(bad, tmp_path / "c2", progress=False)

    bad = _copy(path, tmp_path / "shape")
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(DataFormatError, match=r"gate_proj\.weight has shape \[128, 64\].*\[96, 64\]"):
        convert_hf_to_megalign(bad, tmp_path / "c3", progress=False)

    bad = _copy(path, tmp_path / "extra")
    state = safetensors.torch.load_file(str(bad / "model.safetensors"))
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(2)
    safetensors.torch.save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataFormatError, match=r"unexpected tensor model\.layers\.2\.mlp\.up_proj\.weight"):
        convert_hf_to_megalign(bad, tmp_path / "c4", progress=False)

    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 3 must divide num_attention_heads=4"):
        convert_hf_to_megalign(path, tmp_path / "c5", 3, 1, progress=False)
    assert not (tmp_path / "c5").exists() and not (tmp_path / "c1").exists()  # nothing written on errors

    convert_hf_to_megalign(path, tmp_path / "ok", progress=False)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        convert_hf_to_megalign(path, tmp_path / "ok", progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        convert_megalign_to_hf(tmp_path / "ok", tmp_path / "taken", progress=False)
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2MiB") == 2 ** 21
    with pytest.raises(ConfigError, match="max-shard-size"):
        parse_size("lots")


def test_convert_command(hf_dirs, tmp_path, monkeypatch, capsys):
    """The subcommand through megalign.cli (registered here until megalign/cli.py lists it) and the script."""
    import megalign.cli

    _, path = hf_dirs["qwen2"]
    monkeypatch.setitem(megalign.cli.COMMANDS, "convert", ("megalign.convert.cli", "convert checkpoints"))
    rc = megalign.cli.run_command("convert", ["hf-to-megalign", "--hf-dir", str(path), "--save",
                                              str(tmp_path / "ckpt"), "--tensor-model-parallel-size", "2",
                                              "--no-progress"])
    assert rc == 0 and "wrote megalign checkpoint" in capsys.readouterr().out
    rc = megalign.cli.run_command("convert", ["megalign-to-hf", "--load", str(tmp_path / "ckpt"),
                                              "--hf-dir", str(tmp_path / "hf"), "--dtype", "fp32"])
    assert rc == 0 and (tmp_path / "hf" / "config.json").is_file()
    rc = megalign.cli.run_command("convert", ["hf-to-megalign", "--hf-dir", str(tmp_path / "nowhere"),
                                              "--save", str(tmp_path / "x")])
    assert rc == 2 and "not a directory" in capsys.readouterr().err



def test_convert_checkpoint_script(hf_dirs, tmp_path, repo_root):
    import megalign.cli

    if "convert" not in megalign.cli.COMMANDS:
        pytest.skip("megalign/cli.py does not list the convert command yet")
    _, path = hf_dirs["llama"]
    script = str(Path(repo_root) / "tools" / "convert_checkpoint.py")
    done = subprocess.run([sys.executable, script, "hf-to-megalign", "--hf-dir", str(path), "--save",
                           str(tmp_path / "ckpt"), "--pipeline-model-parallel-size", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(tmp_path / "ckpt").metadata.parallel["pipeline"] == 2


def test_export_trainer_checkpoint(tmp_path):
    """A checkpoint written by the trainer (training config in its metadata, no HF record) exports too."""
    from megalign.config import load_config
    from megalign.checkpoint.storage import save_checkpoint

    training = load_config(["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "1", "--lr",
                            "1e-3", "--train-iters", "1", "--data-path", "x", "--tokenizer-type", "NullTokenizer",
                            "--vocab-size", str(VOCAB)])
    config = training.model_config(vocab_size=256)
    torch.manual_seed(0)
    ours = GPTModel(config)
    save_checkpoint(tmp_path / "ckpt", 5, ours.state_dict(), config=training.to_dict(), rng=False)
    out = convert_megalign_to_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="fp32", vocab_size=VOCAB, progress=False)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and loaded.config.vocab_size == VOCAB
    expected = ours.state_dict()
    for ours_name, hf_name, _ in weight_names(dataclasses.replace(config, vocab_size=VOCAB)):
        assert torch.equal(loaded.state_dict()[hf_name], expected[ours_name][:VOCAB] if ours_name in
                           ("embed_tokens.weight", "lm_head.weight") else expected[ours_name]), hf_name
    with pytest.raises(ConfigError, match="vocabulary size 300"):
        convert_megalign_to_hf(tmp_path / "ckpt", tmp_path / "hf2", vocab_size=300, progress=False)
