"""Supervised fine-tuning (SFT) conversations: record normalisation and tokenization with a loss mask.

`megalign preprocess --sft` reads one conversation per JSONL record, in either form

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (>= 1 assistant turn)
    {"prompt": "...", "response": "...", "system": "..." (optional)}

the second meaning messages [system?, user=prompt, assistant=response]. A conversation is rendered with
the tokenizer's chat template (Tokenizer.apply_chat_template) and tokenized; its loss mask is 1
exactly on the tokens of each assistant reply (its content and the end-of-turn marker the template
writes after it) and 0 on system/user text and on the template's headers.

Where the replies are is found from the template itself, so any template works that renders
prefixes of a conversation as prefixes of the whole: for assistant message i, render(messages[:i],
add_generation_prompt=True) ends where the reply starts and render(messages[:i + 1]) ends where it
stops. These cut the rendered text into consecutive prompt and reply segments, each tokenized on
its own. When that differs from tokenizing the whole text (SentencePiece adds its "▁" dummy prefix
at the start of every encoded piece of text), the whole text's tokens are used instead, cut where
the tokens of each prefix end, so training sees the tokens inference produces. The tokenizer's BOS
id is put first when it has one and the rendered text does not already start with it. No EOD is
appended: the template's end-of-turn marker ends every reply.
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megalign.data.jsonl import RecordProblem
from megalign.data.tokenizers import CHAT_ROLES, Tokenizer
from megalign.errors import TokenizerError

#: The part key (and output name) of SFT tokens: OUTPUT_PREFIX_sft_document.{bin,idx}.
SFT_KEY = "sft"
#: Appended to a tokens prefix for its loss mask: OUTPUT_PREFIX_sft_document_loss_mask.{bin,idx}.
LOSS_MASK_SUFFIX = "_loss_mask"
#: The reason a record that is JSON but not a usable conversation is counted under.
INVALID_CONVERSATION = "invalid_conversation"

Conversation = List[Dict[str, str]]
Encoded = Tuple[List[int], List[int]]  # (token ids, loss mask of 0/1 per token)
EncodeBatch = Callable[[Sequence[str]], List[List[int]]]

# No system message: some templates refuse one, and records without one must still work with them.
_PROBE = [
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
    {"role": "user", "content": "v"},
    {"role": "assistant", "content": "b"},
]


def loss_mask_prefix(tokens_prefix: str) -> str:
    """The loss-mask dataset that goes with an SFT tokens dataset: TOKENS_PREFIX_loss_mask."""
    return tokens_prefix + LOSS_MASK_SUFFIX


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: object, where: str) -> str:
    """`value` if it is a string of valid Unicode text, else RecordProblem naming `where`."""
    if not isinstance(value, str):
        raise RecordProblem("non_string_value", f"{where} holds {_kind(value)}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RecordProblem(
            "invalid_utf8",
            f"{where} holds an unpaired surrogate escape (\\u{ord(value[error.start]):04x}), not valid text",
        ) from None
    return value


def _messages_form(messages: object) -> Conversation:
    if not isinstance(messages, list):
        raise RecordProblem(
            INVALID_CONVERSATION,
            f"key 'messages' holds {_kind(messages)}, expected a list of {{role, content}} objects",
        )
    conversation: Conversation = []
    for index, message in enumerate(messages):
        where = f"key 'messages': message {index}"
        if not isinstance(message, dict):
            raise RecordProblem(
                INVALID_CONVERSATION, f"{where} is {_kind(message)}, expected an object with 'role' and 'content'"
            )
        for field in ("role", "content"):
            if field not in message:
                raise RecordProblem("missing_key", f"{where} has no '{field}'")
        role = message["role"]
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise RecordProblem(
                INVALID_CONVERSATION, f"{where} has role {role!r}; expected one of {', '.join(CHAT_ROLES)}"
            )
        conversation.append({"role": role, "content": _text(message["content"], f"{where} 'content'")})
    if not any(message["role"] == "assistant" for message in conversation):
        raise RecordProblem(INVALID_CONVERSATION, "key 'messages' has no assistant message: nothing to train on")
    return conversation


def conversation_from_record(record: dict) -> Conversation:
    """The messages of one SFT record (either form, see the module docstring).

    Raises RecordProblem (reasons missing_key, non_string_value, invalid_utf8, invalid_conversation)
    with a detail naming the key; the caller adds FILE:LINE. "system" may be null or "" (no system
    message).
    """
    if "messages" in record:
        if "prompt" in record:
            raise RecordProblem(INVALID_CONVERSATION, "record has both 'messages' and 'prompt'; give one form")
        return _messages_form(record["messages"])
    if "prompt" not in record:
        present = ", ".join(repr(name) for name in list(record)[:8]) or "none"
        raise RecordProblem(
            "missing_key", f"missing key 'messages' (or 'prompt' and 'response') (keys present: {present})"
        )
    if "response" not in record:
        raise RecordProblem("missing_key", "missing key 'response' (a 'prompt' record needs one)")
    conversation: Conversation = []
    system = record.get("system")
    if system is not None and _text(system, "key 'system'"):
        conversation.append({"role": "system", "content": system})
    conversation.append({"role": "user", "content": _text(record["prompt"], "key 'prompt'")})
    conversation.append({"role": "assistant", "content": _text(record["response"], "key 'response'")})
    return conversation


def _describe(tokenizer: Tokenizer) -> str:
    return f"{tokenizer.tokenizer_type} '{tokenizer.model_path}'"


def conversation_segments(tokenizer: Tokenizer, messages: Conversation) -> List[Tuple[str, bool]]:
    """The rendered conversation cut into consecutive (text, is_reply) segments (empty ones dropped).

    Raises TokenizerError naming the tokenizer when its chat template does not render each prompt
    and each conversation prefix as a prefix of the whole conversation.
    """
    full = tokenizer.apply_chat_template(messages)
    segments: List[Tuple[str, bool]] = []
    done = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
        through_reply = tokenizer.apply_chat_template(messages[: index + 1])
        if not (through_reply.startswith(prompt) and full.startswith(through_reply) and len(prompt) >= done):
            raise TokenizerError(
                f"{_describe(tokenizer)}: its chat template does not render conversation prefixes as prefixes of "
                f"the whole conversation (at assistant message {index}), so the assistant replies cannot be "
                "located for the SFT loss mask; use a template that renders turns one after another (such as "
                "megalign's fixed Llama-3 layout)"
            )
        segments += [(full[done : len(prompt)], False), (full[len(prompt) : len(through_reply)], True)]
        done = len(through_reply)
    segments.append((full[done:], False))
    return [(text, is_reply) for text, is_reply in segments if text]


def _token_cuts(prefix_ids: List[List[int]], full_ids: List[int]) -> Optional[List[int]]:
    """Where each prefix's tokens end inside `full_ids`, or None when one is not a token prefix of it."""
    cuts: List[int] = []
    for ids in prefix_ids:
        if full_ids[: len(ids)] != ids or (cuts and len(ids) < cuts[-1]):
            return None
        cuts.append(len(ids))
    return cuts


def tokenize_conversations(
    tokenizer: Tokenizer, conversations: Sequence[Conversation], encode_batch: Optional[EncodeBatch] = None
) -> List[Encoded]:
    """(token ids, loss mask) of each conversation; texts are encoded in few `encode_batch` calls.

    `encode_batch` defaults to tokenizer.encode_batch (preprocess passes its faster exact encoder).
    """
    encode = encode_batch or tokenizer.encode_batch
    all_segments = [conversation_segments(tokenizer, messages) for messages in conversations]
    texts = [text for segments in all_segments for text, _ in segments]
    fulls = ["".join(text for text, _ in segments) for segments in all_segments]
    encoded = encode(texts + fulls) if texts else []
    pieces, full_ids = iter(encoded[: len(texts)]), encoded[len(texts) :]
    results: List[Encoded] = []
    retry: List[int] = []  # conversations whose segments tokenize differently from the whole text
    for number, segments in enumerate(all_segments):
        ids: List[int] = []
        mask: List[int] = []
        for (_, is_reply), segment_ids in zip(segments, pieces):
            ids += segment_ids
            mask += [int(is_reply)] * len(segment_ids)
        results.append((ids, mask))
        if ids != full_ids[number]:
            retry.append(number)
    if retry:
        prefixes = [list(itertools.accumulate(text for text, _ in all_segments[number])) for number in retry]
        prefix_ids = iter(encode([text for texts_of in prefixes for text in texts_of]))
        for number, texts_of in zip(retry, prefixes):
            cuts = _token_cuts([next(prefix_ids) for _ in texts_of], full_ids[number])
            if cuts is None:
                continue  # no token boundary at some segment boundary: keep the segment-wise tokens
            mask = []
            for (_, is_reply), low, high in zip(all_segments[number], [0] + cuts, cuts):
                mask += [int(is_reply)] * (high - low)
            results[number] = (list(full_ids[number]), mask)
    bos = tokenizer.bos
    finished: List[Encoded] = []
    for ids, mask in results:
        if bos is not None and (not ids or ids[0] != bos):
            ids, mask = [bos] + ids, [0] + mask
        finished.append((ids, mask))
    return finished


def tokenize_conversation(
    tokenizer: Tokenizer, messages: Conversation, encode_batch: Optional[EncodeBatch] = None
) -> Encoded:
    """(token ids, loss mask) of one conversation (see tokenize_conversations)."""
    return tokenize_conversations(tokenizer, [messages], encode_batch)[0]


def check_chat_template(tokenizer: Tokenizer) -> None:
    """Fail early (TokenizerError naming the tokenizer) when it cannot render SFT conversations."""
    try:
        conversation_segments(tokenizer, _PROBE)
    except TokenizerError as error:
        message = str(error)
        if tokenizer.tokenizer_type not in message:
            message = f"{_describe(tokenizer)}: {message}"
        raise TokenizerError(f"--sft needs a tokenizer with a chat template: {message}") from None


__all__ = [
    "INVALID_CONVERSATION",
    "LOSS_MASK_SUFFIX",
    "SFT_KEY",
    "Conversation",
    "check_chat_template",
    "conversation_from_record",
    "conversation_segments",
    "loss_mask_prefix",
    "tokenize_conversation",
    "tokenize_conversations",
]
