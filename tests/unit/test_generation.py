"""In-process generation: KV-cache decoding equals full recomputation (also left-padded and after dropping
rows), the fast decoder equals the model's cached forward (and is rebuilt when the weights change), greedy
generation equals transformers' generate() token for token on a converted HF Llama (fast and reference), sampling
is reproducible, stop tokens / stop strings / the length rule end completions with the right reason, and
checkpoints of both kinds load with their tokenizer (or fail naming what to pass)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from megalign.config import load_config
from megalign.data.tokenizers import build_tokenizer, padded_vocab_size
from megalign.errors import ConfigError, DataFormatError, TokenizerError
from megalign.inference.generation import Generator, PromptTooLongError, chat_prompt
from megalign.inference.model_loading import load_model
from megalign.inference.sampling import GenerationParams
from megalign.model.kv_cache import KVCache
from megalign.inference.fast_decode import DEFAULT_COPY_LIMIT_BYTES, FastDecoder, ModelDecoder
from megalign.model import GPTModel, ModelOptions
from megalign.config.model import preset
from megalign.checkpoint.storage import save_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB = 1000  # the hf_bpe_tokenizer fixture's size; the import pads the model to 1024 rows
CONFIG = preset("tiny", vocab_size=VOCAB, rope_theta=500000.0)  # the conftest tiny_llama_hf model


@pytest.fixture(scope="module")
def converted(tiny_llama_hf, tiny_llama_checkpoint):
    """(HF LlamaForCausalLM of CONFIG, its checkpoint written by convert_hf_to_megalign, LoadedModel in fp32)."""
    return tiny_llama_hf[0], tiny_llama_checkpoint, load_model(tiny_llama_checkpoint, attention_backend="sdpa")


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _model(vocab=256):
    torch.manual_seed(3)
    return GPTModel(preset("tiny", vocab_size=vocab), options=ModelOptions(attention_backend="sdpa")).eval()


# ------------------------------------------------------------------------------------------------ KV cache
def test_cached_incremental_logits_equal_full_recompute():
    model = _model()
    tokens = torch.randint(0, 256, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(tokens)
        cache = KVCache.for_model(model, 3, 32)
        steps = [model(tokens[:, :9], kv_cache=cache)]
        steps += [model(tokens[:, i:i + 1], kv_cache=cache) for i in range(9, 17)]
        steps.append(model(tokens[:, 17:], kv_cache=cache))  # several new tokens after a cached prefix
    assert cache.length == 21
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)


def test_left_padded_cached_batch_equals_each_prompt_alone():
    model = _model()
    lengths, steps = [3, 7, 5], 6
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    continuation = torch.randint(0, 256, (3, steps), generator=g)
    width = max(lengths)
    tokens = torch.zeros(3, width, dtype=torch.long)
    valid = torch.zeros(3, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):], valid[i, width - len(p):] = p, True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        cache = KVCache.for_model(model, 3, width + steps)
        prefill = model(tokens, position_ids=positions, segment_ids=valid.long(), kv_cache=cache)
        got = [prefill[:, -1]]
        pos = positions[:, -1:] + 1
        for s in range(steps - 1):
            got.append(model(continuation[:, s:s + 1], position_ids=pos + s, kv_cache=cache)[:, -1])
        # the same padded batch recomputed in full with document masking gives the same logits
        padded_full = model(torch.cat([tokens, continuation[:, :-1]], 1),
                            position_ids=torch.cat([positions, pos + torch.arange(steps - 1)], 1),
                            segment_ids=torch.cat([valid.long(), torch.ones(3, steps - 1, dtype=torch.long)], 1))
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, continuation[i, :-1]]).unsqueeze(0))[0, len(p) - 1:]
            torch.testing.assert_close(torch.stack([step[i] for step in got]), alone, rtol=0, atol=2e-5)
            torch.testing.assert_close(padded_full[i, width - 1:], alone, rtol=0, atol=2e-5)


def test_cache_select_keeps_the_chosen_rows():
    model = _model()
    tokens = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        full = model(tokens)
        cache = KVCache.for_model(model, 4, 12)
        model(tokens[:, :8], kv_cache=cache)
        cache.select(torch.tensor([3, 1]))
        out = model(tokens[[3, 1], 8:], kv_cache=cache)
    assert cache.batch_size == 2
    torch.testing.assert_close(out, full[[3, 1], 8:], rtol=0, atol=2e-5)


def test_cache_rejects_overflow_and_training_path_is_unchanged():
    model = _model()
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    cache = KVCache.for_model(model, 2, 6)
    with pytest.raises(ValueError, match="max_length=6"):
        model(tokens, kv_cache=cache)
    assert cache.length == 0
    labels = torch.roll(tokens, -1, 1)
    loss = model(tokens, labels=labels)
    assert torch.equal(loss, model(tokens, labels=labels, kv_cache=None))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(tokens, labels=labels, logits_to_keep=1)
    assert torch.equal(model(tokens, logits_to_keep=2), model(tokens)[:, -2:])


# ------------------------------------------------------------------------------------------ fast decoder
def _decode(decoder, tokens, valid, continuation, drop_after=2):
    """Logits of a prefill and of one decode step per continuation column; rows 0 and 2 kept after
    ``drop_after`` steps (the others dropped)."""
    state, logits = decoder.prefill(tokens, valid, tokens.shape[1] + continuation.shape[1])
    out = [logits]
    for s in range(continuation.shape[1]):
        if s == drop_after:
            state.select(torch.tensor([2, 0]))
            continuation = continuation[[2, 0]]
            out = [o[[2, 0]] for o in out]
        out.append(decoder.step(state, continuation[:, s]))
    return torch.stack(out)


@pytest.mark.parametrize("copy_limit", [DEFAULT_COPY_LIMIT_BYTES, 0])  # fused/transposed copies, weights in place
@pytest.mark.parametrize("variant", [{}, {"qkv_bias": True, "tie_word_embeddings": True}])
def test_fast_decoder_equals_the_models_cached_forward(copy_limit, variant):
    torch.manual_seed(3)
    model = GPTModel(preset("tiny", vocab_size=256, **variant), options=ModelOptions(attention_backend="sdpa")).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (3, 7), generator=g)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, :4], valid[2, :2] = False, False  # left padding
    continuation = torch.randint(0, 256, (3, 5), generator=g)
    with torch.inference_mode():
        fast = FastDecoder(model, 250, 64, copy_limit_bytes=copy_limit)
        assert fast.copied == (copy_limit > 0)
        got = _decode(fast, tokens, valid, continuation)
        expected = _decode(ModelDecoder(model, 250), tokens, valid, continuation)
    assert got.shape == (6, 2, 250)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_fast_decoder_is_rebuilt_when_the_weights_change(converted):
    _, _, loaded = converted
    generator = loaded.generator()
    assert generator.decoder() is generator.decoder() is loaded.generator().decoder()  # built once per model
    model = GPTModel(loaded.config, options=ModelOptions(attention_backend="sdpa")).eval()  # a copy to change
    model.load_state_dict(loaded.model.state_dict())
    generator = Generator(model, loaded.tokenizer)
    prompts, params = _prompts([6, 4], seed=9), GenerationParams(max_new_tokens=6, stop_token_ids=())
    before, decoder = generator.generate(prompts, params), generator.decoder()
    with torch.no_grad():
        model.layers["1"].mlp.up_proj.weight.mul_(-3.0)
    assert generator.decoder() is not decoder
    after = generator.generate(prompts, params)
    assert [r.token_ids for r in after] != [r.token_ids for r in before]
    assert [r.token_ids for r in after] == [r.token_ids for r in Generator(model, loaded.tokenizer, fast=False)
                                            .generate(prompts, params)]


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("fast", [True, False])
def test_greedy_generation_matches_transformers_generate(converted, fast):
    hf_model, _, loaded = converted
    prompts = _prompts([5, 11, 8, 2])
    params = GenerationParams(max_new_tokens=12, stop_token_ids=())
    results = Generator(loaded.model, loaded.tokenizer, max_batch_size=3, fast=fast).generate(prompts, params)
    width = max(map(len, prompts))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        expected = hf_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                     eos_token_id=None, pad_token_id=0)[:, width:]
    for i, result in enumerate(results):
        assert result.token_ids == expected[i].tolist()
        assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == ("length", len(prompts[i]), 12)
        assert result.text == loaded.tokenizer.decode(result.token_ids)


@pytest.mark.parametrize("fast", [True, False])
def test_finished_rows_leave_the_batch(converted, monkeypatch, fast):
    _, _, loaded = converted
    prompts = _prompts([6, 6, 6], seed=3)
    batch_sizes = []
    if fast:  # every prefill and decode step of the fast decoder runs _forward
        forward = FastDecoder._forward
        monkeypatch.setattr(FastDecoder, "_forward",
                            lambda self, tokens, *a: batch_sizes.append(tokens.shape[0]) or forward(self, tokens, *a))
    else:
        hook = loaded.model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    generator = Generator(loaded.model, loaded.tokenizer, fast=fast)
    try:
        limits = GenerationParams(max_new_tokens=None, max_new_tokens_ratio=1.0, ratio_slack=0, stop_token_ids=())
        together = generator.generate([p[:2] for p in prompts[:2]] + prompts[2:], limits)
    finally:
        if not fast:
            hook.remove()
    assert [r.completion_tokens for r in together] == [2, 2, 6]
    assert batch_sizes == [3, 3, 1, 1, 1, 1]  # prefill, then one step with all three, then only the long one
    alone = generator.generate(prompts[2:], limits)
    assert together[2].token_ids == alone[0].token_ids


def test_stop_token_ends_with_stop_reason(converted):
    _, _, loaded = converted
    prompt = _prompts([7], seed=5)
    free = loaded.generator().generate(prompt, GenerationParams(max_new_tokens=10, stop_token_ids=()))[0]
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    result = loaded.generator().generate(prompt, GenerationParams(max_new_tokens=10, stop_token_ids=(stop,)))[0]
    assert result.finish_reason == "stop"
    assert result.token_ids == free.token_ids[:first + 1]
    assert result.text == loaded.tokenizer.decode(free.token_ids[:first])
    assert result.completion_tokens == first + 1


def test_stop_string_cuts_the_text(converted):
    _, _, loaded = converted
    prompt = _prompts([4], seed=6)
    free = loaded.generator().generate(prompt, GenerationParams(max_new_tokens=16, stop_token_ids=()))[0]
    text = free.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), "pick a stop string with visible characters"
    result = loaded.generator().generate(prompt, GenerationParams(max_new_tokens=16, stop_token_ids=(),
                                                                  stop=("never there", stop)))[0]
    assert result.finish_reason == "stop"
    assert result.text == text[:text.find(stop)]
    assert free.token_ids[:len(result.token_ids)] == result.token_ids
    assert stop in loaded.tokenizer.decode(result.token_ids) and stop not in loaded.tokenizer.decode(
        result.token_ids[:-1])


def test_length_rule():
    ratio = GenerationParams(max_new_tokens=None, max_new_tokens_ratio=1.5, ratio_slack=4)
    assert ratio.max_new_tokens_for(10, 1000) == 19  # ceil(15) + 4
    assert ratio.max_new_tokens_for(11, 1000) == 21  # ceil(16.5) + 4
    assert ratio.max_new_tokens_for(10, 20) == 10  # capped by the model's positions
    both = GenerationParams(max_new_tokens=12, max_new_tokens_ratio=1.5, ratio_slack=4)
    assert both.max_new_tokens_for(10, 1000) == 12 and both.max_new_tokens_for(4, 1000) == 10
    assert GenerationParams(max_new_tokens=None, max_new_tokens_ratio=1.1, ratio_slack=0).max_new_tokens_for(
        10, 100) == 11  # 1.1 * 10 is 11.000000000000002 in floating point


def test_length_limits_per_prompt_and_model_positions(converted):
    _, _, loaded = converted
    params = GenerationParams(max_new_tokens=None, max_new_tokens_ratio=0.5, ratio_slack=1, stop_token_ids=())
    results = loaded.generator().generate(_prompts([4, 9]), params)
    assert [(r.completion_tokens, r.finish_reason) for r in results] == [(3, "length"), (6, "length")]
    capped = Generator(loaded.model, loaded.tokenizer, max_length=12).generate(
        _prompts([9]), GenerationParams(max_new_tokens=50, stop_token_ids=()))
    assert capped[0].completion_tokens == 3
    for fast in (True, False):  # a short prompt next to a long one may fill its own positions to the end
        mixed = Generator(loaded.model, loaded.tokenizer, max_length=12, fast=fast).generate(
            _prompts([3, 9]), GenerationParams(max_new_tokens=50, stop_token_ids=()))
        assert [r.completion_tokens for r in mixed] == [9, 3]
        alone = Generator(loaded.model, loaded.tokenizer, max_length=12, fast=fast).generate(
            _prompts([3, 9])[:1], GenerationParams(max_new_tokens=50, stop_token_ids=()))
        assert alone[0].token_ids == mixed[0].token_ids
    with pytest.raises(PromptTooLongError, match="prompt 1 has 12 tokens"):
        Generator(loaded.model, loaded.tokenizer, max_length=12).generate(_prompts([3, 12]))
    with pytest.raises(PromptTooLongError, match="prompt 0 is empty"):
        loaded.generator().generate([[]])


def test_sampling_is_reproducible_and_independent_of_the_batch(converted):
    _, _, loaded = converted
    prompts = _prompts([5, 9, 3], seed=7)
    params = GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50, seed=11, stop_token_ids=())
    first = loaded.generator().generate(prompts, params)
    again = loaded.generator(max_batch_size=1).generate(prompts, params)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    other = loaded.generator().generate(prompts, dataclasses.replace(params, seed=12))
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    greedy = loaded.generator().generate(prompts, GenerationParams(max_new_tokens=10, stop_token_ids=()))
    assert [r.token_ids for r in first] != [r.token_ids for r in greedy]
    for narrow in (dict(top_k=1), dict(top_p=1e-6)):  # one token left: sampling is greedy
        sampled = loaded.generator().generate(prompts, dataclasses.replace(params, **narrow))
        assert [r.token_ids for r in sampled] == [r.token_ids for r in greedy]


def test_string_prompts_and_chat_prompt(converted):
    hf_model, _, loaded = converted
    tokenizer = loaded.tokenizer
    messages = [{"role": "system", "content": "Rewrite politely."}, {"role": "user", "content": "hello world"}]
    prompt = chat_prompt(tokenizer, messages)
    assert prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("assistant<|end_header_id|>\n\n")
    generator = loaded.generator(add_bos=True)
    result = generator.generate(["hello world"], GenerationParams(max_new_tokens=3, stop_token_ids=()))[0]
    assert result.prompt_tokens == len(tokenizer.encode("hello world")) + 1
    assert generator.encode("hello world")[0] == tokenizer.bos
    # the tokenizer's end-of-document / end-of-sequence / end-of-turn ids and the HF config's EOS stop by default
    assert set(loaded.stop_token_ids) == {tokenizer.eos, tokenizer.special_tokens["<|eot_id|>"],
                                          hf_model.config.eos_token_id}


def test_generation_params_are_validated():
    for bad in (dict(max_new_tokens=None), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1),
                dict(max_new_tokens_ratio=0.0), dict(stop="x"), dict(stop=("",)), dict(stop_token_ids=(-1,))):
        with pytest.raises(ConfigError):
            GenerationParams(**bad)


# ----------------------------------------------------------------------------------------- model loading
def test_converted_checkpoint_loads_with_its_tokenizer(converted):
    hf_model, ckpt, loaded = converted
    assert loaded.tokenizer_source == str(ckpt / "tokenizer") and loaded.tokenizer.vocab_size == VOCAB
    assert loaded.config.vocab_size == 1024 and loaded.max_length == CONFIG.max_position_embeddings
    assert not loaded.model.training and loaded.step == 0
    tokens = torch.tensor(_prompts([13, 13], seed=8))
    with torch.no_grad():
        ours = loaded.model(tokens)[..., :VOCAB]
        torch.testing.assert_close(ours, hf_model(tokens).logits, rtol=0, atol=5e-5)
    bf16 = load_model(ckpt, dtype="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    out = bf16.generator().generate(_prompts([5]), GenerationParams(max_new_tokens=4, stop_token_ids=()))
    assert out[0].completion_tokens == 4


def _trainer_checkpoint(root: Path, tokenizer_model: Path, vocab: int = padded_vocab_size(VOCAB)) -> Path:
    config = load_config(["--model-preset", "tiny", "--seq-length", "64", "--micro-batch-size", "1",
                          "--train-iters", "1", "--lr", "1e-3", "--tokenizer-type", "HuggingFaceTokenizer",
                          "--tokenizer-model", str(tokenizer_model)])
    torch.manual_seed(0)
    model = GPTModel(config.model_config(vocab_size=vocab))
    save_checkpoint(root, 5, model.state_dict(), config=config.to_dict(), rng=False)
    return root


def test_trainer_checkpoint_uses_the_recorded_tokenizer(tmp_path, hf_bpe_tokenizer):
    tok_dir = tmp_path / "tok"
    shutil.copytree(hf_bpe_tokenizer.parent, tok_dir)
    root = _trainer_checkpoint(tmp_path / "run", tok_dir)
    loaded = load_model(root)
    assert loaded.step == 5 and loaded.max_length == 64  # the training --seq-length caps the positions
    assert loaded.tokenizer.model_path == str(tok_dir) and loaded.tokenizer_source.startswith("training config")
    given = load_model(root, step=5, tokenizer_model=str(hf_bpe_tokenizer))  # a tokenizer.json alone: HF type
    assert given.tokenizer_source == "given"

    shutil.rmtree(tok_dir)  # the recorded tokenizer is gone and the checkpoint carries none
    with pytest.raises(ConfigError, match="no longer exists.*--tokenizer-type and --tokenizer-model"):
        load_model(root)
    shutil.copytree(hf_bpe_tokenizer.parent, root / "tokenizer")  # ... CKPT/tokenizer/ is the fallback
    assert load_model(root).tokenizer_source == str(root / "tokenizer")


def test_model_loading_errors(tmp_path, converted, sentencepiece_model, hf_bpe_tokenizer):
    _, ckpt, loaded = converted
    with pytest.raises(DataFormatError, match="holds no completed checkpoint"):
        load_model(tmp_path)
    with pytest.raises(DataFormatError, match="step 3 does not exist"):
        load_model(ckpt, step=3)
    with pytest.raises(ConfigError, match="--dtype"):
        load_model(ckpt, dtype="int8")
    with pytest.raises(ConfigError, match="give --tokenizer-type too"):
        load_model(ckpt, tokenizer_model=str(sentencepiece_model))
    small = _trainer_checkpoint(tmp_path / "small", hf_bpe_tokenizer.parent, vocab=512)
    with pytest.raises(TokenizerError, match="1000 tokens.*vocabulary of 512"):
        load_model(small)
    with pytest.raises(TokenizerError, match="4001 tokens, more than the model's vocabulary of 1024"):
        Generator(loaded.model, build_tokenizer("NullTokenizer", vocab_size=4000))
