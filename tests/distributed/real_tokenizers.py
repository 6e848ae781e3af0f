"""Hugging Face tokenizers of the exact sizes of Llama-3's and Qwen2's, built at test time (nothing downloaded).

A byte-level BPE whose merges are generated (every byte pair, then pair + byte, in a fixed order) up to the
real number of BPE tokens, plus the real number of special tokens after them:

* Llama-3: 128,000 BPE tokens + 256 special (``<|begin_of_text|>`` 128000, ``<|end_of_text|>`` 128001,
  ``<|eot_id|>`` 128009, reserved ones) = 128,256 = the model's rows;
* Qwen2: 151,643 BPE tokens + 22 special (``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>``
  151645, ...) = 151,665 tokens, while the model has 151,936 rows.

The encoding of real text is not Llama-3's, but the sizes, the special ids and the chat template are.
Import as ``from real_tokenizers import llama3_tokenizer, qwen2_tokenizer`` (tests/distributed is on sys.path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

LLAMA3_BPE, LLAMA3_SPECIAL, LLAMA3_ROWS = 128_000, 256, 128_256
QWEN2_BPE, QWEN2_SPECIAL, QWEN2_ROWS = 151_643, 22, 151_936

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _bpe_vocab(size: int) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """A byte-level BPE vocabulary of ``size`` tokens and the merges that build it."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    merges: List[Tuple[str, str]] = []
    pieces = list(alphabet)
    level = list(alphabet)
    while len(vocab) < size:
        grown = []
        for left in level:
            for right in alphabet:
                if len(vocab) == size:
                    break
                token = left + right
                if token in vocab:
                    continue
                vocab[token] = len(vocab)
                merges.append((left, right))
                grown.append(token)
            if len(vocab) == size:
                break
        pieces += grown
        level = grown
    return vocab, merges


def _build(folder: Path, bpe_size: int, specials: List[str], template: str, bos: str, eos: str, pad: str) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _bpe_vocab(bpe_size)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def llama3_tokenizer(folder: Path) -> Path:
    """A 128,256-token tokenizer shaped like Llama-3's (bos 128000, eos 128009 ``<|eot_id|>``); its folder."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + LLAMA3_SPECIAL - len(named))]
    return _build(folder, LLAMA3_BPE, named + reserved, LLAMA3_CHAT_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>",
                  "<|finetune_right_pad_id|>")


def qwen2_tokenizer(folder: Path) -> Path:
    """A 151,665-token tokenizer shaped like Qwen2's (eos/pad ``<|im_end|>`` / ``<|endoftext|>``); its folder."""
    named = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
             "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
             "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
             "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
    assert len(named) == QWEN2_SPECIAL
    return _build(folder, QWEN2_BPE, named, QWEN2_CHAT_TEMPLATE, "<|endoftext|>", "<|im_end|>", "<|endoftext|>")
