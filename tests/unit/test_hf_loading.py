"""`load_hf_model` (--hf-dir): a Hugging Face Llama / Qwen2 folder loaded in process gives the model, tokenizer,
logits, stop ids and length of the same folder converted with `convert_hf_to_megalign` and loaded from the
checkpoint, for a Llama with the real Llama-3 vocabulary (128,256 rows) and a tied-embedding Qwen2 whose
vocabulary is padded; sharded weights with and without an index; errors naming the folder and the problem."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from megalign.config.model import preset, to_hf_config
from megalign.convert import convert_hf_to_megalign
from megalign.errors import ConfigError, DataFormatError
from megalign.inference.model_loading import load_hf_model, load_model

transformers = pytest.importorskip("transformers")

LLAMA3_VOCAB = 128256  # Meta-Llama-3's rows: already a multiple of 128, so no padding
QWEN_VOCAB = 1000  # padded to 1024, as the converter pads it


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # norms are 1 and biases 0 at init: perturb so that a wrong mapping shows
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def _with_tokenizer(folder: Path, hf_bpe_tokenizer: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(hf_bpe_tokenizer.parent / name, folder / name)
    return folder


def _llama3(tmp_path_factory, hf_bpe_tokenizer, **save_options):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=LLAMA3_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        bos_token_id=1, eos_token_id=[2, 3], tie_word_embeddings=False, attn_implementation="eager")
    model = _perturbed(transformers.LlamaForCausalLM(config))
    folder = tmp_path_factory.mktemp("llama3_hf")
    model.save_pretrained(folder, **save_options)
    return model, _with_tokenizer(folder, hf_bpe_tokenizer)


@pytest.fixture(scope="module")
def llama3_hf(tmp_path_factory, hf_bpe_tokenizer):
    """(transformers model, folder): a tiny-hidden Llama with the real Llama-3 vocabulary size."""
    return _llama3(tmp_path_factory, hf_bpe_tokenizer)


@pytest.fixture(scope="module")
def qwen2_tied_hf(tmp_path_factory, hf_bpe_tokenizer):
    """(transformers model, folder): a tiny Qwen2 with tied embeddings and q/k/v biases, vocabulary 1000."""
    torch.manual_seed(1)
    config = preset("tiny", vocab_size=QWEN_VOCAB, qkv_bias=True, tie_word_embeddings=True, rope_theta=1000000.0,
                    rms_norm_eps=1e-6)
    model = _perturbed(transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**to_hf_config(config), attn_implementation="eager")))
    folder = tmp_path_factory.mktemp("qwen2_tied_hf")
    model.save_pretrained(folder)
    return model, _with_tokenizer(folder, hf_bpe_tokenizer)


def _tokens(vocab: int, batch: int = 2, seq: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(3))


def _assert_same_as_converted(hf_model, folder: Path, tmp_path: Path, vocab: int, padded: int) -> None:
    direct = load_hf_model(folder)
    convert_hf_to_megalign(folder, tmp_path / "ckpt", progress=False)
    converted = load_model(tmp_path / "ckpt")
    assert direct.config == converted.config and direct.config.vocab_size == padded
    assert direct.step == converted.step == 0 and direct.path == folder
    assert direct.max_length == converted.max_length
    assert direct.stop_token_ids == converted.stop_token_ids
    assert direct.tokenizer.vocab_size == converted.tokenizer.vocab_size
    text = "The library opened in 1920. مرحبا بكم"
    assert direct.tokenizer.encode(text) == converted.tokenizer.encode(text)
    state, expected_state = direct.model.state_dict(), converted.model.state_dict()
    assert state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(state[name], tensor), name
    tokens = _tokens(vocab)
    with torch.no_grad():
        logits = direct.model(tokens)
        expected = converted.model(tokens)
        reference = hf_model(input_ids=tokens).logits
    assert logits.shape[-1] == padded
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[..., :vocab], reference, rtol=0, atol=1e-5)
    if padded > vocab:  # padding rows are masked out of the softmax: their logits are -inf
        assert torch.equal(logits[..., vocab:], torch.full_like(logits[..., vocab:], float("-inf")))


def test_llama3_vocabulary_folder_equals_its_converted_checkpoint(llama3_hf, tmp_path):
    model, folder = llama3_hf
    _assert_same_as_converted(model, folder, tmp_path, LLAMA3_VOCAB, LLAMA3_VOCAB)


def test_tied_qwen2_folder_equals_its_converted_checkpoint(qwen2_tied_hf, tmp_path):
    model, folder = qwen2_tied_hf
    assert "lm_head.weight" not in safetensors.torch.load_file(str(folder / "model.safetensors"))
    _assert_same_as_converted(model, folder, tmp_path, QWEN_VOCAB, 1024)
    loaded = load_hf_model(folder)
    assert loaded.model.lm_head is None and "lm_head.weight" not in loaded.model.state_dict()


def test_sharded_weights_with_and_without_an_index(tmp_path_factory, hf_bpe_tokenizer, llama3_hf, tmp_path):
    _, single = llama3_hf
    _, sharded = _llama3(tmp_path_factory, hf_bpe_tokenizer, max_shard_size="5MB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    expected = load_hf_model(single).model.state_dict()
    unindexed = shutil.copytree(sharded, tmp_path / "unindexed")
    (unindexed / "model.safetensors.index.json").unlink()
    for folder in (sharded, unindexed):
        state = load_hf_model(folder).model.state_dict()
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), (folder, name)
    first = min(unindexed.glob("*.safetensors"))
    shutil.copyfile(first, unindexed / "zz-copy.safetensors")
    with pytest.raises(DataFormatError, match="is in both"):
        load_hf_model(unindexed)


def test_dtype_device_and_given_tokenizer(qwen2_tied_hf, hf_bpe_tokenizer):
    _, folder = qwen2_tied_hf
    loaded = load_hf_model(folder, dtype="bf16", tokenizer_model=str(hf_bpe_tokenizer))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.tokenizer_source == "given" and not loaded.model.training
    scores = loaded.scorer().score(["hello world, this is a test", "x"])
    assert scores[0].ppl is not None and scores[0].ppl > 1.0 and scores[1].ppl is None
    null = load_hf_model(folder, tokenizer_type="NullTokenizer")
    assert null.tokenizer.vocab_size == 1024  # covers the padded vocabulary: eod is its last id


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def test_errors_name_the_folder_and_the_problem(qwen2_tied_hf, tmp_path):
    _, folder = qwen2_tied_hf
    with pytest.raises(ConfigError, match=r"--hf-dir .*nowhere: not a directory"):
        load_hf_model(tmp_path / "nowhere")

    bad = _copy(folder, tmp_path / "no_config")
    (bad / "config.json").unlink()
    with pytest.raises(DataFormatError, match=r"no_config/config\.json: file is missing"):
        load_hf_model(bad)

    bad = _copy(folder, tmp_path / "arch")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"arch/config\.json names architecture 'GPT2LMHeadModel'.*supported: "
                                          r"LlamaForCausalLM"):
        load_hf_model(bad)

    bad = _copy(folder, tmp_path / "no_tokenizer")
    (bad / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="holds no tokenizer.json; pass --tokenizer-type and --tokenizer-model"):
        load_hf_model(bad)

    bad = _copy(folder, tmp_path / "missing_tensor")
    state = safetensors.torch.load_file(str(bad / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataFormatError, match=r"missing_tensor: .*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_model(bad)

    bad = _copy(folder, tmp_path / "shape")
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(DataFormatError, match=r"gate_proj\.weight has shape"):
        load_hf_model(bad)

    with pytest.raises(ConfigError, match="--dtype 'fp8'"):
        load_hf_model(folder, dtype="fp8")
