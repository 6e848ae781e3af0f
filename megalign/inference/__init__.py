"""In-process inference: KV-cache generation, perplexity scoring, and loading checkpoints for both.

    loaded = load_model("checkpoints/worker", dtype="bf16", device="cuda")     # or load_hf_model("Meta-Llama-3-8B")
    results = loaded.generator().generate([chat_prompt(loaded.tokenizer, messages)],
                                          GenerationParams(max_new_tokens_ratio=1.5, stop=("</rewrite>",)))
    scores = loaded.scorer().score(["some text", "another document"])   # DocumentScore(ppl, tokens, nll)

Import from the modules: generation.py (Generator, chat_prompt), sampling.py (GenerationParams), scoring.py
(PerplexityScorer), model_loading.py (load_model, load_hf_model), batching.py and server.py (``megalign
serve``), model_flags.py (the flags every command that runs a model shares; it imports no torch, so this
package face imports nothing).
"""
