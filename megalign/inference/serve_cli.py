"""Serve a megalign checkpoint (or a Hugging Face Llama/Qwen2 folder, --hf-dir) over an OpenAI-compatible HTTP
API (/v1/models, /v1/completions, /v1/chat/completions), e.g. as the rewrite stage's worker backend or for
evaluation harnesses. The model takes the shared model flags (megalign/inference/model_flags.py); the
positional CHECKPOINT is the same as --load.

The model runs in this process (one device); concurrent requests with the same settings are generated
in one batch. The server listens on 127.0.0.1 unless --host says otherwise; pass --api-key (or set the
environment variable named by --api-key-env) to require `Authorization: Bearer KEY`. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from megalign.errors import ConfigError
from megalign.inference.model_flags import add_model_arguments, load_model_from_args, model_label

EXAMPLES = """examples:
  megalign serve worker_ckpt --port 8000
  megalign serve --load ckpt/llama3-8b-tamed --dtype bf16 --device cuda --model-name tamed-8b --max-batch-size 32
  megalign serve --hf-dir Meta-Llama-3-8B-Instruct --dtype bf16 --device cuda --port 8001
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "مرحبا"}], "max_tokens": 64}'
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", nargs="?", default=None, metavar="CHECKPOINT", help="checkpoint directory (the same as --load)"
    )
    add_model_arguments(
        parser,
        required=True,
        title="model (CHECKPOINT, --load CHECKPOINT or --hf-dir DIR)",
        batch_size=16,
        batch_size_help="prompts generated together",
        batch_flags=("--max-batch-size", "--batch-size"),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--model-name", default=None, help="the model id clients use (default: the folder name)")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests (default 10 ms)"
    )
    parser.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS to every prompt")
    parser.add_argument("--api-key", default=None, help="require this bearer key (prefer --api-key-env)")
    parser.add_argument(
        "--api-key-env",
        default="MEGALIGN_SERVE_API_KEY",
        help="environment variable holding the key (default MEGALIGN_SERVE_API_KEY)",
    )


def _with_positional_checkpoint(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the positional CHECKPOINT as --load (a copy; errors when it conflicts with --load/--hf-dir)."""
    if not args.checkpoint:
        if not (args.load or args.hf_dir):
            raise ConfigError(
                "give the model to serve: megalign serve CHECKPOINT (or --load CHECKPOINT, or --hf-dir DIR)"
            )
        return args
    if args.hf_dir:
        raise ConfigError(
            f"CHECKPOINT {args.checkpoint} and --hf-dir {args.hf_dir}: give one model, not both "
            "(CHECKPOINT is the same as --load)"
        )
    if args.load and args.load != args.checkpoint:
        raise ConfigError(f"two checkpoints given ({args.checkpoint} and --load {args.load}); give one")
    return argparse.Namespace(**{**vars(args), "load": args.checkpoint})


def build_server(args: argparse.Namespace) -> Any:
    """Load the model and return a ModelServer (not yet serving)."""
    from pathlib import Path

    from megalign.inference.batching import BatchingEngine
    from megalign.inference.server import ModelServer

    args = _with_positional_checkpoint(args)
    path = model_label(args)
    loaded = load_model_from_args(args)
    engine = BatchingEngine(
        loaded.generator(args.max_batch_size, args.add_bos), args.max_batch_size, args.batch_wait_ms / 1000.0
    )
    name = args.model_name or Path(str(path)).resolve().name
    key = args.api_key or os.environ.get(args.api_key_env) or None
    try:
        server = ModelServer(engine, name, args.host, args.port, key)
    except OSError as exc:
        engine.close()
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    origin = "Hugging Face folder" if args.hf_dir else f"step {loaded.step}"
    print(
        f"serving {loaded.path} ({origin}, tokenizer {loaded.tokenizer_source}) as {name!r} at "
        f"{server.base_url}{' (API key required)' if key else ''}",
        flush=True,
    )
    return server


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    server = build_server(args)
    signal.signal(signal.SIGTERM, _interrupt)  # SLURM / docker stop: shut down like Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        server.engine.close()
    print("server stopped", flush=True)
    return 0
