"""In-process inference: KV-cache generation, perplexity scoring, and loading checkpoints for both.

    loaded = load_model("checkpoints/worker", dtype="bf16", device="cuda")
    results = loaded.generator().generate([chat_prompt(loaded.tokenizer, messages)],
                                          GenerationParams(max_new_tokens_ratio=1.5, stop=("</rewrite>",)))
    scores = loaded.scorer().score(["some text", "another document"])   # DocumentScore(ppl, tokens, nll)
"""
from __future__ import annotations

from megalign.inference.generation import Completion, Generator, PromptTooLongError, chat_prompt, default_stop_token_ids
from megalign.inference.kv_cache import KVCache
from megalign.inference.model_loading import LoadedModel, load_model, resolve_tokenizer
from megalign.inference.sampling import GenerationParams
from megalign.inference.scoring import DocumentScore, PerplexityScorer

__all__ = ["Completion", "DocumentScore", "GenerationParams", "Generator", "KVCache", "LoadedModel", "PerplexityScorer",
           "PromptTooLongError", "chat_prompt", "default_stop_token_ids", "load_model", "resolve_tokenizer"]
