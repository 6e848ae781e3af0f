"""Real vocabularies at any tensor-parallel size: Llama-3's 128,256 rows (padded to 128,512 at TP4 and 129,024 at
TP8) and Qwen2's 151,936 rows with a 151,665-token tokenizer, on tiny hidden sizes, with tokenizers built at
test time to exactly those sizes (tests/distributed/real_tokenizers.py).

An imported Hugging Face model trains at TP1, TP2, TP4 (and TP8 in the slow tier) with the losses of the
single-process run, a checkpoint saved at TP4 resumes at TP1 (rows and optimizer state stripped), and a Qwen2
chat model fine-tuned with --sft at TP2 exports to a folder that transformers loads as it is, chat template
included.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from megalign.config.model import RopeScaling, preset, to_hf_config
from megalign.convert import convert_hf_to_megalign, convert_megalign_to_hf
from megalign.data.preprocess import preprocess
from megalign.data.tokenizers import padded_vocab_size
from megalign.training.checkpoint_args import load_training_config
from megalign.training.trainer import train
from real_tokenizers import LLAMA3_ROWS, QWEN2_ROWS, llama3_tokenizer, qwen2_tokenizer

transformers = pytest.importorskip("transformers")

STEPS = 4


def test_padded_rows_follow_megatron_at_every_tp() -> None:
    assert [padded_vocab_size(LLAMA3_ROWS, 128, tp) for tp in (1, 2, 4, 8)] == [128256, 128256, 128512, 129024]
    assert [padded_vocab_size(QWEN2_ROWS, 128, tp) for tp in (1, 2)] == [151936, 152064]


def _perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory, sample_corpus: Path) -> Dict[str, Path]:
    """A Llama-3-shaped model (128,256 rows, GQA 4:1, Llama-3.1 rope scaling, untied) with a 128,256-token
    tokenizer, imported at TP1, and the sample corpus tokenized with it."""
    root = tmp_path_factory.mktemp("llama3")
    folder = llama3_tokenizer(root / "hf")
    config = preset("tiny", vocab_size=LLAMA3_ROWS, num_attention_heads=8, num_key_value_heads=2,
                    rope_theta=500000.0, max_position_embeddings=256,
                    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=64))
    torch.manual_seed(0)
    model = _perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(config))))
    model.save_pretrained(folder)
    convert_hf_to_megalign(folder, root / "imported", progress=False)
    preprocess([str(sample_corpus)], str(root / "data"), "HuggingFaceTokenizer", str(folder), append_eod=True,
               progress=False)
    return {"hf": folder, "imported": root / "imported", "data": root / "data_text_document", "cache": root / "c"}


def _llama_argv(paths: Dict[str, Path], *extra: str) -> List[str]:
    return ["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--data-path",
            str(paths["data"]), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(paths["hf"]),
            "--data-cache-path", str(paths["cache"]), "--split", "90,10,0", "--seed", "5", "--lr", "2e-3",
            "--lr-warmup-iters", "1", "--train-iters", str(STEPS), "--eval-iters", "0", "--log-interval", "1",
            "--clip-grad", "0.5", *extra]


def _train_rank(rank: int, world: int, argv: List[str], stop_after: Optional[int]) -> Dict[int, float]:
    return train(load_training_config(argv), stream=io.StringIO(), stop_after=stop_after).losses


def _logged(results: List[Dict[int, float]]) -> Dict[int, float]:
    logged = [r for r in results if r and all(v == v for v in r.values())]
    assert logged, results
    return logged[0]


@pytest.fixture(scope="module")
def llama3_single(llama3: Dict[str, Path]) -> Dict[int, float]:
    """The single-process fine-tune of the imported model (the reference)."""
    return train(load_training_config(_llama_argv(llama3, "--load", str(llama3["imported"]), "--finetune")),
                 stream=io.StringIO()).losses


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "4"],
                                    ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]],
                         ids=["tp4", "tp2-dp2-zero1"])
def test_llama3_vocabulary_trains_at_tp_like_one_process(distributed, llama3: Dict[str, Path],
                                                         llama3_single: Dict[int, float], tmp_path: Path,
                                                         layout: List[str]) -> None:
    """Imported at TP1 (128,256 rows), trained at TP4 (128,512 rows: 256 zero rows appended at load) and saved;
    the TP4 checkpoint resumes in one process (rows and moments stripped) and finishes like the straight run."""
    save = tmp_path / "tp"
    argv = _llama_argv(llama3, "--load", str(llama3["imported"]), "--finetune", "--save", str(save), *layout)
    got = _logged(distributed(_train_rank, 4, argv, STEPS // 2))
    assert sorted(got) == [1, 2]
    for step, loss in got.items():
        assert loss == pytest.approx(llama3_single[step], rel=2e-5, abs=2e-6), step
    metadata = json.loads((save / "iter_0000002" / "metadata.json").read_text())
    tp = int(layout[1])
    assert metadata["extra"]["vocab"] == {"true_size": LLAMA3_ROWS, "padded_rows": padded_vocab_size(LLAMA3_ROWS,
                                                                                                       128, tp)}
    resumed = train(load_training_config(_llama_argv(llama3, "--load", str(save))), stream=io.StringIO()).losses
    assert sorted(resumed) == [3, 4]
    for step, loss in resumed.items():
        assert loss == pytest.approx(llama3_single[step], rel=2e-5, abs=2e-6), step


@pytest.mark.slow
def test_llama3_vocabulary_trains_at_tp8_like_one_process(distributed, llama3: Dict[str, Path],
                                                          llama3_single: Dict[int, float]) -> None:
    """129,024 rows at TP8 (each rank 16,128; the last holds 768 padding rows)."""
    argv = _llama_argv(llama3, "--load", str(llama3["imported"]), "--finetune", "--tensor-model-parallel-size", "8")
    got = _logged(distributed(_train_rank, 8, argv, None))
    for step, loss in got.items():
        assert loss == pytest.approx(llama3_single[step], rel=2e-5, abs=2e-6), step


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory, sample_corpus: Path) -> Dict[str, Path]:
    """A Qwen2-shaped chat model (151,936 rows, tied embeddings, q/k/v biases) with a 151,665-token tokenizer
    and chat template, imported at TP1, and SFT conversations tokenized with its chat template."""
    root = tmp_path_factory.mktemp("qwen2")
    folder = qwen2_tokenizer(root / "hf")
    config = preset("tiny", vocab_size=QWEN2_ROWS, qkv_bias=True, tie_word_embeddings=True,
                    rope_theta=1000000.0, rms_norm_eps=1e-6)
    torch.manual_seed(1)
    model = _perturbed(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **to_hf_config(config), bos_token_id=151643, eos_token_id=151645)))
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": True,
         "temperature": 0.7}))
    convert_hf_to_megalign(folder, root / "imported", progress=False)
    with open(sample_corpus, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle][:120]
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"system": "Rewrite.", "prompt": text[:12], "response": text[:10]},
                                    ensure_ascii=False) + "\n")
    preprocess([str(root / "pairs.jsonl")], str(root / "pairs"), "HuggingFaceTokenizer", str(folder), sft=True,
               progress=False)
    return {"hf": folder, "imported": root / "imported", "data": root / "pairs_sft_document", "cache": root / "c"}


def _qwen_argv(paths: Dict[str, Path], *extra: str) -> List[str]:
    """An SFT fine-tune of the imported worker, its shape and tokenizer from the checkpoint (no model flags)."""
    return ["--sft", "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4", "--data-path",
            str(paths["data"]), "--data-cache-path", str(paths["cache"]), "--split", "90,10,0", "--seed", "3",
            "--lr", "1e-3", "--train-iters", "2", "--eval-iters", "0", "--log-interval", "1", "--load",
            str(paths["imported"]), "--finetune", "--use-checkpoint-args", *extra]


def test_qwen2_worker_sft_at_tp2_exports_a_folder_transformers_loads(distributed, qwen2: Dict[str, Path],
                                                                     tmp_path: Path) -> None:
    log = io.StringIO()
    single = train(load_training_config(_qwen_argv(qwen2)), stream=log).losses
    assert "151665 tokens; the checkpoint's vocabulary of 151936 padded to 151936 rows" in log.getvalue()
    assert all(loss > 1.0 for loss in single.values())  # replies are trained on (not cut off)
    save = tmp_path / "worker"
    got = _logged(distributed(_train_rank, 2, _qwen_argv(qwen2, "--tensor-model-parallel-size", "2", "--save",
                                                         str(save)), None))
    for step, loss in got.items():
        assert loss == pytest.approx(single[step], rel=2e-5, abs=2e-6), step
    metadata = json.loads((save / "iter_0000002" / "metadata.json").read_text())
    assert metadata["extra"]["vocab"] == {"true_size": QWEN2_ROWS, "padded_rows": 152064}
    assert metadata["extra"]["tokenizer"]["size"] == 151665

    exported = convert_megalign_to_hf(save, tmp_path / "hf_out", dtype="fp32", progress=False)
    hf_config = json.loads((exported / "config.json").read_text())
    assert hf_config["vocab_size"] == QWEN2_ROWS and hf_config["architectures"] == ["Qwen2ForCausalLM"]
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (151643, 151645)
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["temperature"] == 0.7
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert len(tokenizer) == 151665
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        return_dict=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    from megalign.inference.model_loading import load_model

    ours = load_model(save, dtype="fp32")
    tokens = torch.tensor([ids])
    with torch.no_grad():
        expected = model(tokens).logits
        logits = ours.model(tokens)
    assert logits.shape[-1] == 152064 and expected.shape[-1] == QWEN2_ROWS
    torch.testing.assert_close(logits[..., :QWEN2_ROWS], expected, rtol=0, atol=2e-5)
    assert torch.isinf(logits[..., QWEN2_ROWS:]).all()
