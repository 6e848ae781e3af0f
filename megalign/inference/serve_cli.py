"""Serve a megalign checkpoint over an OpenAI-compatible HTTP API (/v1/models, /v1/completions,
/v1/chat/completions), e.g. as the rewrite stage's worker backend or for evaluation harnesses.

The model runs in this process (one device); concurrent requests with the same settings are generated
in one batch. The server listens on 127.0.0.1 unless --host says otherwise; pass --api-key (or set the
environment variable named by --api-key-env) to require `Authorization: Bearer KEY`. Stop it with Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import signal
from typing import Any

EXAMPLES = """examples:
  megalign serve worker_ckpt --port 8000
  megalign serve --load ckpt/llama3-8b-tamed --dtype bf16 --device cuda --model-name tamed-8b --max-batch-size 32
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "مرحبا"}], "max_tokens": 64}'
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", default=None, help="checkpoint directory (or use --load)")
    parser.add_argument("--load", default=None, help="checkpoint directory (its latest step)")
    parser.add_argument("--ckpt-step", type=int, default=None, help="serve this step instead of the latest")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--model-name", default=None, help="the model id clients use (default: the folder name)")
    parser.add_argument("--tokenizer-type", default=None, help="tokenizer (default: recorded in the checkpoint)")
    parser.add_argument("--tokenizer-model", default=None, help="tokenizer model file or folder")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="prompts generated together (default 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long a batch waits for more requests (default 10 ms)")
    parser.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS to every prompt")
    parser.add_argument("--api-key", default=None, help="require this bearer key (prefer --api-key-env)")
    parser.add_argument("--api-key-env", default="MEGALIGN_SERVE_API_KEY",
                        help="environment variable holding the key (default MEGALIGN_SERVE_API_KEY)")


def build_server(args: argparse.Namespace) -> Any:
    """Load the model and return a ModelServer (not yet serving)."""
    from pathlib import Path

    from megalign.errors import ConfigError
    from megalign.inference.batching import BatchingEngine
    from megalign.inference.model_loading import load_model
    from megalign.inference.server import ModelServer

    path = args.load or args.checkpoint
    if not path:
        raise ConfigError("give the checkpoint to serve: megalign serve CHECKPOINT (or --load CHECKPOINT)")
    if args.load and args.checkpoint and args.load != args.checkpoint:
        raise ConfigError(f"two checkpoints given ({args.checkpoint} and --load {args.load}); give one")
    loaded = load_model(path, args.ckpt_step, args.dtype, args.device, args.tokenizer_type, args.tokenizer_model)
    engine = BatchingEngine(loaded.generator(args.max_batch_size, args.add_bos), args.max_batch_size,
                            args.batch_wait_ms / 1000.0)
    name = args.model_name or Path(path).resolve().name
    key = args.api_key or os.environ.get(args.api_key_env) or None
    try:
        server = ModelServer(engine, name, args.host, args.port, key)
    except OSError as exc:
        engine.close()
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    print(f"serving {loaded.path} (step {loaded.step}, tokenizer {loaded.tokenizer_source}) as {name!r} at "
          f"{server.base_url}{' (API key required)' if key else ''}", flush=True)
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
