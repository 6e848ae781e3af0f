"""Have the alignment expert rewrite the seed documents following the polishing guidelines (the paper's step 2).

Each seed record is sent to an OpenAI-compatible chat-completions endpoint (OpenAI, a vLLM or TGI server,
or `megalign serve`) as the guideline's expert messages in the record's language (detected from its
script). The reply is validated like a worker rewrite (empty, truncated, wrong script, length ratio,
meta-text, refusal, lost numbers or names); an invalid reply is asked for again (--retry-invalid times),
transport errors are retried with backoff (see megalign/align/openai_client.py). Every record ends in
the output exactly once, as

  status "annotated": ``rewritten`` holds the expert's text;
  status "failed":    ``reason`` (e.g. http_500, timeout, lost_numbers) and ``detail`` say why,

with ``language``, ``expert`` (the model), ``guideline_version``, ``attempts`` and token ``usage``. The
output is the cache: a rerun (after a crash, Ctrl-C or a wrong key) sends only the records not yet
there. The API key comes from --api-key-env (default OPENAI_API_KEY) or --api-key and is never logged.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Iterator, Optional, Sequence

from megalign.align.cli import add_io_arguments
from megalign.align.openai_client import (
    ChatClient,
    ClientConfig,
    CompletionRequest,
    CompletionResult,
    add_client_arguments,
    config_from_args,
)
from megalign.align.records import Record, StageInput
from megalign.align.stage_output import ShardOutput

__all__ = ["ANNOTATED", "FAILED", "run_annotate"]

EXAMPLES = """examples:
  export OPENAI_API_KEY=...   # never pass keys on the command line of a shared machine
  megalign align annotate --input work/seed --output work/pairs --base-url https://api.openai.com/v1 \\
      --model gpt-4o --concurrency 16 --requests-per-minute 500
  megalign align annotate --input work/seed --output work/pairs --base-url http://127.0.0.1:8000/v1 --model expert
"""

ANNOTATED, FAILED = "annotated", "failed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_io_arguments(parser)
    parser.add_argument("--guidelines", default=None, help="polishing guidelines YAML (default: the packaged ones)")
    parser.add_argument(
        "--retry-invalid", type=int, default=2, help="extra requests for a reply that fails validation (default 2)"
    )
    add_client_arguments(parser, default_concurrency=8)


class _Annotator:
    """Builds the expert requests of records and turns replies into output records."""

    def __init__(self, guidelines_path: Optional[str], model: str) -> None:
        from megalign.align.guidelines import load_guidelines
        from megalign.align.validation import ValidationConfig

        self.guidelines = load_guidelines(guidelines_path)
        self.validation = ValidationConfig(scripts=self.guidelines.scripts)
        self.model = model
        self.pending: Dict[str, Record] = {}

    def request(self, record: Record) -> CompletionRequest:
        from megalign.align.validation import validate_rewrite

        language = record.get("language") or self.guidelines.detect_language(record["text"])
        record["language"] = language
        self.pending[record["id"]] = record
        original = record["text"]

        def validator(text: str) -> Optional[str]:
            return validate_rewrite(original, text, language, self.validation).reason

        return CompletionRequest(
            key=record["id"], messages=self.guidelines.expert_messages(original, language), validator=validator
        )

    def finish(self, result: CompletionResult) -> Record:
        record = self.pending.pop(result.key)
        record.update(
            {
                "status": ANNOTATED if result.ok else FAILED,
                "expert": self.model,
                "guideline_version": self.guidelines.version,
                "attempts": result.attempts,
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            }
        )
        if result.ok and result.text is not None:
            record.update({"rewritten": result.text.strip(), "reason": None})
        else:
            record.update({"rewritten": None, "reason": result.reason, "detail": result.message})
        return record


def run_annotate(
    inputs: Sequence[str],
    output: str,
    client_config: ClientConfig,
    guidelines_path: Optional[str] = None,
    shard_index: int = 0,
    num_shards: int = 1,
    skip_bad_records: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Annotate the records of one shard of ``inputs`` into ``output``; returns the shard summary."""
    annotator = _Annotator(guidelines_path, client_config.model)
    records = StageInput(list(inputs), shard_index, num_shards, skip_bad_records)
    settings = {
        "expert": client_config.model,
        "guideline_version": annotator.guidelines.version,
        "temperature": client_config.temperature,
        "max_tokens": client_config.max_tokens,
    }
    with ShardOutput(output, "annotate", shard_index, num_shards, settings) as out:
        if out.already_finished:
            print(f"annotate: shard {shard_index} of {num_shards} is already finished in {output}")
            return out.finish()
        todo = records.count() - len(out.done_ids) if progress else None

        def requests() -> Iterator[CompletionRequest]:
            for record in records:
                if not out.is_done(record["id"]):
                    yield annotator.request(record)

        with ChatClient(client_config) as client:
            usage = client.run_many(
                requests(),
                lambda result: out.write(annotator.finish(result)),
                total=todo,
                progress="annotate" if progress else None,
            )
        return out.finish({"client": usage, "resumed": out.resumed, "bad_records": records.stats.to_dict()})


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args, retry_invalid=args.retry_invalid)
    summary = run_annotate(
        args.input, args.output, config, args.guidelines, args.shard_index, args.num_shards, args.skip_bad_records
    )
    statuses = ", ".join(f"{count} {status}" for status, count in sorted(summary["statuses"].items()))
    print(f"annotate: {summary['records']} records ({statuses}) -> {args.output}")
    return 0
